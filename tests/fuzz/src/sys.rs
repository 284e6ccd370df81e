//! The system calls the fuzzer makes, each wrapped once: mappings, raw
//! ioctls and reads on device fds, signals, and child processes (copies
//! to and from device mappings are in `memcopy.rs`).
//!
//! Context: process context, any thread; everything here is a thin
//! libc call plus errno.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// An error number (errno).
pub type Errno = i32;

/// The page size of x86-64.
pub const PAGE: usize = 4096;

/// The errno of the last failed call on this thread.
pub fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(r: libc::c_int) -> Result<libc::c_int, Errno> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn mmap_anon(
    addr: usize,
    len: usize,
    prot: libc::c_int,
    extra: libc::c_int,
) -> Result<usize, Errno> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | extra;
    // SAFETY: an anonymous mapping; with MAP_FIXED the callers guarantee
    // (as their own safety contract) that the range is theirs to replace,
    // and without it the kernel replaces nothing.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p as usize)
    }
}

/// Reserves `len` bytes at `addr` (`PROT_NONE`), or wherever the kernel
/// puts them if it does not honour MAP_FIXED_NOREPLACE (before Linux 4.17
/// the flag is a hint). Returns the address.
///
/// # Errors
/// The errno of mmap; EEXIST if the range is in use.
pub fn reserve(addr: usize, len: usize) -> Result<usize, Errno> {
    mmap_anon(addr, len, libc::PROT_NONE, libc::MAP_FIXED_NOREPLACE)
}

/// Maps fresh anonymous memory over `[addr, addr + len)` with `prot`.
///
/// # Safety
/// The range must be memory of the caller that nothing else references:
/// whatever was mapped there is gone.
///
/// # Errors
/// The errno of mmap.
pub unsafe fn map_fixed(addr: usize, len: usize, prot: libc::c_int) -> Result<(), Errno> {
    mmap_anon(addr, len, prot, libc::MAP_FIXED).map(|_| ())
}

/// Replaces `[addr, addr + len)` with a `PROT_NONE` reservation.
///
/// # Safety
/// As [`map_fixed`].
///
/// # Errors
/// The errno of mmap.
pub unsafe fn map_fixed_reserved(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller's contract is map_fixed's.
    unsafe { map_fixed(addr, len, libc::PROT_NONE) }
}

/// mprotect.
///
/// # Safety
/// The range must be memory of the caller that nothing else accesses in a
/// way the new protection would break.
///
/// # Errors
/// The errno of mprotect.
pub unsafe fn protect(addr: usize, len: usize, prot: libc::c_int) -> Result<(), Errno> {
    // SAFETY: the caller owns the range (contract above).
    check(unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) }).map(|_| ())
}

/// Unmaps `[addr, addr + len)` and reserves it again at once.
///
/// # Safety
/// As [`map_fixed`].
///
/// # Errors
/// The errno of munmap; EEXIST if something was mapped into the hole in
/// between.
pub unsafe fn unmap_and_rereserve(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller owns the range (contract above).
    check(unsafe { libc::munmap(addr as *mut libc::c_void, len) })?;
    reserve(addr, len).map(|_| ())
}

/// Moves the pages of `[from, from + len)` to `to` (mremap with
/// MREMAP_FIXED) and reserves the old range again.
///
/// # Safety
/// Both ranges must be the caller's, as in [`map_fixed`].
///
/// # Errors
/// The errno of mremap; nothing moved then.
pub unsafe fn move_mapping(from: usize, len: usize, to: usize) -> Result<(), Errno> {
    // SAFETY: both ranges are the caller's (contract above).
    let p = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    reserve(from, len).map(|_| ())
}

/// A mapping of a device fd (a vCPU's kvm_run, or one of the fuzzer's odd
/// mmaps of it), unmapped on drop.
///
/// # Invariants
/// `[addr, addr + len)` was returned by mmap and is unmapped only by drop.
pub struct DeviceMapping {
    addr: usize,
    len: usize,
}

impl DeviceMapping {
    /// mmap(NULL, len, prot, flags, fd, offset).
    ///
    /// # Errors
    /// The errno of mmap.
    pub fn new(
        fd: RawFd,
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        offset: i64,
    ) -> Result<Self, Errno> {
        // SAFETY: the kernel picks the address, so no existing mapping is
        // replaced; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        // INVARIANT: just mapped.
        Ok(DeviceMapping {
            addr: p as usize,
            len,
        })
    }

    /// The address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The length.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for DeviceMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned (invariant), which only
        // this value refers to.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// ioctl(fd, nr, arg), returning the raw result or the errno.
///
/// Through syscall(2), not glibc's `int ioctl()`: the kernel returns a
/// `long`, and the checks must see it as the kernel returned it, not
/// truncated to an `int`.
///
/// # Safety
/// If the device treats `arg` as a pointer, whatever it may read or write
/// there must be memory that nothing of the fuzzer relies on (a scratch
/// buffer), or memory that does not exist.
pub unsafe fn ioctl(fd: RawFd, nr: u32, arg: u64) -> (i64, Errno) {
    // SAFETY: the caller vouches for `arg` (contract above); the ioctl
    // number is passed zero-extended, as the kernel reads it (unsigned int).
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            libc::c_long::from(fd),
            libc::c_ulong::from(nr),
            arg,
        )
    };
    let e = if r < 0 { errno() } else { 0 };
    (r, e)
}

/// pread(fd, buf, len, offset), returning the raw result or the errno.
///
/// # Safety
/// `[buf, buf + len)` must be memory that nothing of the fuzzer relies on,
/// or memory that does not exist (as for [`ioctl`]).
pub unsafe fn pread(fd: RawFd, buf: usize, len: usize, offset: i64) -> (i64, Errno) {
    // SAFETY: the caller vouches for the buffer (contract above).
    let r = unsafe { libc::pread(fd, buf as *mut libc::c_void, len, offset) };
    let e = if r < 0 { errno() } else { 0 };
    (r as i64, e)
}

/// read(fd, buf, len) at the file position.
///
/// # Safety
/// As [`pread`].
pub unsafe fn read(fd: RawFd, buf: usize, len: usize) -> (i64, Errno) {
    // SAFETY: the caller vouches for the buffer (contract above).
    let r = unsafe { libc::read(fd, buf as *mut libc::c_void, len) };
    let e = if r < 0 { errno() } else { 0 };
    (r as i64, e)
}

/// lseek(fd, offset, whence).
pub fn lseek(fd: RawFd, offset: i64, whence: libc::c_int) -> (i64, Errno) {
    // SAFETY: lseek touches no memory of the process.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    let e = if r < 0 { errno() } else { 0 };
    (r, e)
}

/// close(fd) of a descriptor the caller owns and forgets.
pub fn close(fd: RawFd) {
    // SAFETY: closing only ends the caller's use of its own descriptor.
    unsafe { libc::close(fd) };
}

/// The target of /proc/self/fd/`fd` ("anon_inode:kvm-vm", ...), if any.
pub fn fd_target(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The calling thread.
pub fn this_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// The signal that ends a KVM_RUN (or any interruptible wait) of a thread:
/// its handler does nothing, and is installed without SA_RESTART, so the
/// interrupted call returns EINTR.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Sends [`KICK_SIGNAL`] to `thread`.
///
/// # Safety
/// `thread` must be a thread of this process that has not been joined or
/// detached-and-exited (its registration with the watchdog guarantees it).
pub unsafe fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is alive (contract above).
    unsafe { libc::pthread_kill(thread, KICK_SIGNAL) };
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs `handler` for `signal` with `flags`.
fn install(signal: libc::c_int, handler: usize, flags: libc::c_int) {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    // SAFETY: `sa` is initialised and `handler` is an extern "C" function
    // of the signature `flags` announces; the old action is not wanted.
    unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(signal, &sa, std::ptr::null_mut());
    }
}

/// Installs the kick handler, also for SIGALRM (the fork children's
/// timer): a handler that does nothing, so that the signal only
/// interrupts.
pub fn install_kick_handler() {
    let ignore = ignore_signal as extern "C" fn(libc::c_int) as usize;
    install(KICK_SIGNAL, ignore, 0);
    install(libc::SIGALRM, ignore, 0);
}

/// Installs the kick handler and `on_fault` for SIGSEGV and SIGBUS, on
/// the alternate stack that the Rust runtime gives every thread.
pub fn install_handlers(
    on_fault: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
) {
    install_kick_handler();
    for s in [libc::SIGSEGV, libc::SIGBUS] {
        install(
            s,
            on_fault as usize,
            libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER,
        );
    }
}

/// A pipe whose ends are closed on exec.
///
/// # Errors
/// The errno of pipe2.
pub fn pipe() -> Result<(RawFd, RawFd), Errno> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// Reads what `fd` delivers until EOF or until `timeout` passes; returns
/// the bytes and whether EOF was reached.
pub fn read_until_eof(fd: RawFd, timeout: Duration) -> (Vec<u8>, bool) {
    let end = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, owned by this frame.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as libc::c_int) };
        if r <= 0 {
            continue;
        }
        let mut buf = [0u8; 256];
        // SAFETY: reads into `buf`, owned by this frame.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return (out, true),
            n if n > 0 => out.extend_from_slice(&buf[..n as usize]),
            _ if errno() == libc::EINTR || errno() == libc::EAGAIN => {}
            _ => return (out, true),
        }
    }
}

/// Reads from `fd` until `n` bytes came, EOF, or `timeout`; returns how
/// many came.
pub fn read_n(fd: RawFd, n: usize, timeout: Duration) -> usize {
    let end = Instant::now() + timeout;
    let mut got = 0;
    while got < n {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, owned by this frame.
        if unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as libc::c_int) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        let want = (n - got).min(buf.len());
        // SAFETY: reads into `buf`, owned by this frame.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) };
        match r {
            0 => break,
            r if r > 0 => got += r as usize,
            _ if errno() == libc::EINTR => {}
            _ => break,
        }
    }
    got
}

/// Sends SIGKILL to `pid`.
pub fn kill(pid: libc::pid_t) {
    // SAFETY: signals a child of this process, which it has not reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Waits up to `timeout` for child `pid` to end; returns its wait status,
/// or None if it is still there.
pub fn reap(pid: libc::pid_t, timeout: Duration) -> Option<libc::c_int> {
    let end = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waits for the caller's own child; writes `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || (r < 0 && errno() == libc::ECHILD) {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Arms this process's real-time interval timer (SIGALRM) to fire after
/// `ms` milliseconds and every `ms` after that. Async-signal-safe: for
/// fork children.
pub fn alarm_every(ms: i64) {
    let t = libc::timeval {
        tv_sec: ms / 1000,
        tv_usec: (ms % 1000) * 1000,
    };
    let it = libc::itimerval {
        it_interval: t,
        it_value: t,
    };
    // SAFETY: setitimer reads `it`; the old value is not wanted.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
}

/// Writes all of `bytes` to `fd`, as far as it goes. Async-signal-safe.
pub fn write_all(fd: RawFd, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: reads the caller's buffer only.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return;
        }
        done += n as usize;
    }
}

/// Ends this process at once, without running destructors or atexit
/// handlers (a fork child, or the watchdog giving up). Async-signal-safe.
pub fn exit_now(status: libc::c_int) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(status) }
}
