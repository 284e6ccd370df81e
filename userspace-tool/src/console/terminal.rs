//! The host terminal in raw mode for the console (see the parent module for
//! the settings chosen), and every way of putting it back: the guard's
//! drop, a panic hook, an exit handler, and handlers for the signals that
//! end the process (restore, then re-raise), plus raw mode again after
//! SIGCONT.

use std::ffi::c_int;
use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

/// The settings to put back, where the signal handlers, the panic hook and
/// the exit handler find them.
pub(super) struct SavedModes {
    fd: RawFd,
    original: libc::termios,
    raw: libc::termios,
}

/// The terminal in raw mode, if any: a `SavedModes` that is never freed
/// (a signal handler on another thread may be reading it when the guard
/// drops), leaked once per raw-mode session.
pub(super) static SAVED: AtomicPtr<SavedModes> = AtomicPtr::new(ptr::null_mut());

/// Signals whose default action ends the process; their handlers restore
/// the terminal first.
const FATAL_SIGNALS: [c_int; 5] = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGABRT];

/// A terminal in raw mode; dropping it restores the original settings and
/// the signal actions it replaced.
pub struct RawModeGuard {
    fd: RawFd,
    original: libc::termios,
    /// The signal actions replaced by ours.
    replaced: Vec<(c_int, libc::sigaction)>,
}

impl RawModeGuard {
    /// Puts the terminal on `fd` in raw mode (see the module documentation)
    /// until the guard is dropped.
    ///
    /// # Errors
    /// `fd` is not a terminal, its settings cannot be changed, a signal
    /// handler cannot be installed, or a guard already exists.
    pub fn enable(fd: RawFd) -> io::Result<Self> {
        let original = get_modes(fd)?;
        let saved = Box::into_raw(Box::new(SavedModes { fd, original, raw: raw_modes(&original) }));
        if SAVED.compare_exchange(ptr::null_mut(), saved, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // SAFETY: `saved` is from Box::into_raw above and unpublished: this is its only owner.
            drop(unsafe { Box::from_raw(saved) });
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the terminal is already in raw mode for a console",
            ));
        }
        install_exit_hooks();
        // From here on, a failure drops the guard, which undoes what was done.
        let mut guard = Self { fd, original, replaced: Vec::new() };
        for signal in FATAL_SIGNALS {
            guard.handle(signal, restore_and_reraise, libc::SA_RESETHAND)?;
        }
        guard.handle(libc::SIGCONT, reapply_raw_modes, libc::SA_RESTART)?;
        // Only this guard's drop unpublishes SAVED, and what it points at is never freed.
        // SAFETY: `saved` points at the published, never freed SavedModes.
        set_modes(fd, unsafe { &(*saved).raw })?;
        Ok(guard)
    }

    /// Installs `handler` for `signal` if the signal has its default action.
    fn handle(&mut self, signal: c_int, handler: extern "C" fn(c_int), flags: c_int) -> io::Result<()> {
        // SAFETY: sigaction is plain data, for which all zeroes is valid.
        let mut old: libc::sigaction = unsafe { mem::zeroed() };
        // SAFETY: a null new action only queries; `old` is valid for writes.
        if unsafe { libc::sigaction(signal, ptr::null(), &mut old) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if old.sa_sigaction != libc::SIG_DFL {
            // Ignored (nohup) or someone else's handler: theirs to keep.
            return Ok(());
        }
        // SAFETY: as above.
        let mut new: libc::sigaction = unsafe { mem::zeroed() };
        new.sa_sigaction = handler as libc::sighandler_t;
        new.sa_flags = flags;
        // SAFETY: `new.sa_mask` is valid for writes.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        // The handlers do only async-signal-safe things.
        // SAFETY: `new` is initialized and its handler has the non-SA_SIGINFO signature.
        if unsafe { libc::sigaction(signal, &new, ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.replaced.push((signal, old));
        Ok(())
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if let Err(e) = set_modes(self.fd, &self.original) {
            log::warn!("console: cannot restore the terminal's settings: {e}");
        }
        // Unpublished only after the restore: a signal in between finds the
        // settings restored already, or restores them again.
        SAVED.store(ptr::null_mut(), Ordering::Release);
        for (signal, old) in self.replaced.drain(..) {
            // SAFETY: `old` is the action sigaction returned for `signal`.
            unsafe { libc::sigaction(signal, &old, ptr::null_mut()) };
        }
    }
}

/// The terminal's settings on `fd`.
pub(super) fn get_modes(fd: RawFd) -> io::Result<libc::termios> {
    let mut modes = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: `modes` is valid for writes of a termios.
    if unsafe { libc::tcgetattr(fd, modes.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr succeeded, so it filled `modes`.
    Ok(unsafe { modes.assume_init() })
}

/// Applies `modes` to the terminal on `fd` at once.
fn set_modes(fd: RawFd, modes: &libc::termios) -> io::Result<()> {
    // SAFETY: `modes` is a valid termios; tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, modes) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `original` made raw for the guest: cfmakeraw(3) except that output
/// processing stays on (see the module documentation).
pub(super) fn raw_modes(original: &libc::termios) -> libc::termios {
    let mut modes = *original;
    modes.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    modes.c_oflag |= libc::OPOST;
    modes.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    modes.c_cflag &= !(libc::CSIZE | libc::PARENB);
    modes.c_cflag |= libc::CS8;
    modes.c_cc[libc::VMIN] = 1;
    modes.c_cc[libc::VTIME] = 0;
    modes
}

/// Restores the original settings if a terminal is in raw mode. Only
/// async-signal-safe calls: it runs in signal handlers.
fn restore_original_modes() {
    let saved = SAVED.load(Ordering::Acquire);
    if saved.is_null() {
        return;
    }
    // SAFETY: a non-null SAVED points at a SavedModes filled before publication, never freed.
    let saved = unsafe { &*saved };
    // SAFETY: tcsetattr is async-signal-safe and only reads the termios.
    unsafe { libc::tcsetattr(saved.fd, libc::TCSANOW, &saved.original) };
}

/// The handler for `FATAL_SIGNALS`.
extern "C" fn restore_and_reraise(signal: c_int) {
    restore_original_modes();
    // SA_RESETHAND put the default action back on entry and the signal stays
    // blocked while this handler runs, so it is delivered again on return
    // and ends the process as if no handler had been installed.
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(signal) };
}

/// The handler for SIGCONT: raw mode again after a stop, in the foreground
/// only (from the background, tcsetattr would stop the process again with
/// SIGTTOU).
extern "C" fn reapply_raw_modes(_signal: c_int) {
    // The interrupted code may be about to read errno: it is put back below.
    // SAFETY: __errno_location returns this thread's errno, valid to read.
    let errno = unsafe { *libc::__errno_location() };
    let saved = SAVED.load(Ordering::Acquire);
    if !saved.is_null() {
        // SAFETY: as in `restore_original_modes`.
        let saved = unsafe { &*saved };
        // SAFETY: tcgetpgrp, getpgrp and tcsetattr are async-signal-safe; the termios is only read.
        unsafe {
            if libc::tcgetpgrp(saved.fd) == libc::getpgrp() {
                libc::tcsetattr(saved.fd, libc::TCSANOW, &saved.raw);
            }
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The panic hook and the atexit handler, installed once per process; they
/// do nothing while no terminal is in raw mode.
fn install_exit_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The settings go back before the panic message is printed, so that
        // it is readable; the previous hook prints it.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_original_modes();
            previous(info);
        }));
        // SAFETY: `restore_at_exit` is an argument-less C-ABI fn that only reads SAVED, calls tcsetattr.
        if unsafe { libc::atexit(restore_at_exit) } != 0 {
            log::warn!("console: cannot register the terminal's restore at exit");
        }
    });
}

extern "C" fn restore_at_exit() {
    restore_original_modes();
}
