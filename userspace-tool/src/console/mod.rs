//! The guest's serial console on the VMM's stdin, as QEMU's `-nographic`
//! (`-serial mon:stdio`) gives it: what the user types goes to the guest,
//! what the guest sends goes to stdout (the serial device writes it there).
//!
//! # Terminal or not
//!
//! When stdin is a terminal, [`Console::start`] puts it in raw mode for the
//! guest's benefit: no line editing, no echo, no signals from Ctrl-C or
//! Ctrl-Z, no XON/XOFF, Enter sends CR (the guest's tty turns it into LF),
//! 8-bit characters. Output processing (`OPOST`) stays on and the other
//! output flags are left as they were, as QEMU's stdio backend does: the
//! terminal normally has `ONLCR`, so the VMM's own diagnostics, which end
//! in a bare "\n", still start at the left margin instead of drifting right.
//! A Linux guest's tty already sends "\r\n", which `ONLCR` turns into
//! "\r\r\n": the same on screen. The cost: a guest program that puts its own
//! tty in raw mode and moves the cursor down with a bare LF gets a carriage
//! return with it. That trade is QEMU's, and what its users expect.
//!
//! The terminal's settings are restored on every way out: when the
//! [`Console`] is dropped (normal or error return, unwinding), from a panic
//! hook (before the panic message), from an `atexit` handler
//! (`std::process::exit`), and from handlers for SIGHUP, SIGINT, SIGQUIT,
//! SIGTERM and SIGABRT, which restore the settings and then let the signal
//! end the process with its default action (so the exit status still says
//! "killed by SIGTERM"). Signals that were not at their default action
//! (ignored under `nohup`, say) are left alone. On SIGCONT, after the
//! process was stopped and the shell took the terminal back, raw mode is
//! applied again if the process is in the foreground.
//!
//! Without a terminal (a pipe, a file, /dev/null), stdin is passed to the
//! guest byte for byte, with no escapes, and its end just stops the input.
//!
//! # Escapes
//!
//! On a terminal, Ctrl-A starts an escape, as in QEMU (parsed in
//! `escape.rs`):
//!
//! - Ctrl-A x: quit. "rkvm: terminated by Ctrl-A x" goes to stderr and the
//!   console reports [`ConsoleEvent::Quit`]; the VMM ends the run with exit
//!   status 0.
//! - Ctrl-A Ctrl-A: one Ctrl-A for the guest.
//! - Ctrl-A h (or ?): a short help on stderr.
//! - Ctrl-A and any other key: the key is dropped (QEMU drops it silently)
//!   and stderr says which escape was unknown.
//!
//! Escapes are off without a terminal, so that piped input reaches the guest
//! unchanged whatever bytes it holds (QEMU applies them to any stdio).
//!
//! # Threads
//!
//! A reader thread waits for stdin with poll(2) and sends what it reads to
//! the VMM through a channel, then calls the `kick` callback so that a vCPU
//! inside KVM_RUN comes out and delivers it. [`Console::try_recv`] takes
//! events without waiting; [`Console::recv_timeout`] parks a halted vCPU
//! until input arrives or its timer is due. Dropping the [`Console`] stops
//! and joins the reader before the terminal is restored: after that no
//! stdin is read and `kick` is not called again.

use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

mod escape;
mod terminal;

use escape::{unknown_escape_message, EscapeParser, Escaped, HELP};
use terminal::RawModeGuard;

/// The line on stderr when Ctrl-A x ends the run.
pub const QUIT_MESSAGE: &str = "rkvm: terminated by Ctrl-A x";

const STDIN: RawFd = 0;

/// What the console has for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Bytes for the guest's serial port, in order.
    Input(Vec<u8>),
    /// The user typed Ctrl-A x: end the run with exit status 0. The message
    /// is already on stderr. Nothing follows.
    Quit,
    /// stdin ended (or failed, with a warning logged): no more input.
    /// Nothing follows.
    Eof,
}

/// A running console: the reader thread, its channel, and the terminal's
/// raw mode (restored on drop).
pub struct Console {
    rx: Receiver<ConsoleEvent>,
    /// Keeps the channel open once the reader has stopped, so that
    /// `recv_timeout` still waits for its timeout instead of returning at
    /// once when there can be no more input.
    _tx: Sender<ConsoleEvent>,
    /// Dropping this end wakes the reader and stops it.
    stop: Option<io::PipeWriter>,
    reader: Option<JoinHandle<()>>,
    /// Dropped after the reader has been joined (see `Drop`); only its drop
    /// matters (tests look at it).
    #[cfg_attr(not(test), allow(dead_code))]
    raw: Option<RawModeGuard>,
}

impl Console {
    /// Starts reading stdin for the guest. If stdin is a terminal it goes
    /// into raw mode and Ctrl-A escapes apply; otherwise its bytes are
    /// passed on unchanged. `kick` is called on the reader thread after
    /// each batch of events, until the `Console` is dropped.
    ///
    /// # Errors
    /// stdin is a terminal whose settings cannot be read or changed, another
    /// `Console` has it in raw mode, or the reader thread cannot start.
    pub fn start(kick: impl Fn() + Send + 'static) -> io::Result<Self> {
        let raw = if io::stdin().is_terminal() { Some(RawModeGuard::enable(STDIN)?) } else { None };
        let escapes = raw.is_some();
        Self::spawn(STDIN, raw, escapes, kick, Box::new(io::stderr()))
    }

    /// The console on `input` (which must stay open until it is dropped),
    /// with its messages on `messages`.
    fn spawn(
        input: RawFd,
        raw: Option<RawModeGuard>,
        escapes: bool,
        kick: impl Fn() + Send + 'static,
        mut messages: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        // A pipe, not a socket pair: the test kernel has no networking.
        let (stop_peer, stop) = io::pipe()?;
        let (tx, rx) = mpsc::channel();
        let reader_tx = tx.clone();
        let reader = std::thread::Builder::new().name("rkvm-console".into()).spawn(move || {
            let parser = escapes.then(EscapeParser::new);
            pump(input, &stop_peer, parser, &reader_tx, &kick, &mut *messages);
        })?;
        Ok(Self { rx, _tx: tx, stop: Some(stop), reader: Some(reader), raw })
    }

    /// Whether stdin is a terminal in raw mode, with escapes.
    #[cfg(test)]
    pub fn is_terminal(&self) -> bool {
        self.raw.is_some()
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<ConsoleEvent> {
        self.rx.try_recv().ok()
    }

    /// The next event, waiting up to `timeout` for it. After
    /// [`ConsoleEvent::Quit`] or [`ConsoleEvent::Eof`] this waits the whole
    /// timeout and returns `None`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<ConsoleEvent> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Closing our end makes the reader's poll return; it stops without
        // reading more, so no typed-ahead input is lost to a dead guest's
        // console once the shell has the terminal back.
        drop(self.stop.take());
        if let Some(reader) = self.reader.take() {
            // A panic in the reader (in `kick`) was already reported.
            let _ = reader.join();
        }
        // `raw` is dropped next, restoring the terminal.
    }
}

/// What woke the reader.
enum Ready {
    /// stdin has data, an end or an error for read(2) to report.
    Input,
    /// The console is being dropped.
    Stop,
    /// stdin is not an open file descriptor.
    Closed,
}

/// The reader thread: stdin to `tx` until it ends, the user quits, or
/// `stop`'s peer is closed.
fn pump(
    input: RawFd,
    stop: &io::PipeReader,
    mut parser: Option<EscapeParser>,
    tx: &Sender<ConsoleEvent>,
    kick: &dyn Fn(),
    messages: &mut dyn Write,
) {
    let mut buf = [0u8; 4096];
    loop {
        let len = match wait_readable(input, stop.as_raw_fd()) {
            Ok(Ready::Stop) => return,
            Ok(Ready::Input) => match read_fd(input, &mut buf) {
                Ok(len) => len,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => continue,
                Err(e) => {
                    log::warn!("console: reading stdin failed: {e}; no more input for the guest");
                    0
                }
            },
            Ok(Ready::Closed) => 0,
            Err(e) => {
                log::warn!("console: waiting for stdin failed: {e}; no more input for the guest");
                0
            }
        };
        if len == 0 {
            if tx.send(ConsoleEvent::Eof).is_ok() {
                kick();
            }
            return;
        }
        let events = match &mut parser {
            None => vec![ConsoleEvent::Input(buf[..len].to_vec())],
            Some(parser) => act_on(parser.feed(&buf[..len]), messages),
        };
        let quit = events.last() == Some(&ConsoleEvent::Quit);
        if !events.is_empty() {
            for event in events {
                if tx.send(event).is_err() {
                    // The console is gone.
                    return;
                }
            }
            kick();
        }
        if quit {
            return;
        }
    }
}

/// Prints the messages that escapes ask for and turns the rest into events.
fn act_on(escaped: Vec<Escaped>, messages: &mut dyn Write) -> Vec<ConsoleEvent> {
    let mut events = Vec::new();
    for item in escaped {
        let message = match item {
            Escaped::Guest(bytes) => {
                events.push(ConsoleEvent::Input(bytes));
                continue;
            }
            Escaped::Help => HELP.to_string(),
            Escaped::Unknown(key) => unknown_escape_message(key),
            Escaped::Quit => {
                events.push(ConsoleEvent::Quit);
                format!("\r\n{QUIT_MESSAGE}\r\n")
            }
        };
        // One write per message, so that it is not split by other output.
        let _ = messages.write_all(message.as_bytes()).and_then(|()| messages.flush());
    }
    events
}

/// Waits until `input` can be read or `stop` is readable or closed.
fn wait_readable(input: RawFd, stop: RawFd) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd { fd: input, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` holds `fds.len()` initialized pollfds for the call; poll writes only `revents`.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Stop);
        }
        if fds[0].revents & libc::POLLNVAL != 0 {
            return Ok(Ready::Closed);
        }
        if fds[0].revents != 0 {
            return Ok(Ready::Input);
        }
    }
}

/// read(2) into `buf`.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, the most read writes.
    let len = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(len).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::terminal::{get_modes, raw_modes, SAVED};
    use std::mem;
    use std::ptr;
    use std::sync::atomic::Ordering;
    use std::os::unix::net::UnixStream;
    use std::io::Read;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use super::*;

    #[test]
    fn raw_modes_keep_output_processing() {
        // SAFETY: termios is plain data, for which all zeroes is valid.
        let mut cooked: libc::termios = unsafe { mem::zeroed() };
        cooked.c_iflag = libc::ICRNL | libc::IXON | libc::BRKINT | libc::IUTF8;
        cooked.c_oflag = libc::OPOST | libc::ONLCR;
        cooked.c_lflag = libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN | libc::ECHOE;
        cooked.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        let raw = raw_modes(&cooked);
        assert_eq!(raw.c_iflag, libc::IUTF8);
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR, "output flags as they were");
        assert_eq!(raw.c_lflag, libc::ECHOE);
        assert_eq!(raw.c_cflag, libc::CS8 | libc::CREAD);
        assert_eq!((raw.c_cc[libc::VMIN], raw.c_cc[libc::VTIME]), (1, 0));
        cooked.c_oflag = 0;
        assert_eq!(raw_modes(&cooked).c_oflag, libc::OPOST, "ONLCR not added");
    }

    /// Messages, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A console reading `input`'s peer; the kicks counted.
    fn console_on(input: &UnixStream, escapes: bool) -> (Console, Arc<AtomicUsize>, Captured) {
        let kicks = Arc::new(AtomicUsize::new(0));
        let counter = kicks.clone();
        let messages = Captured::default();
        let console = Console::spawn(
            input.as_raw_fd(),
            None,
            escapes,
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            Box::new(messages.clone()),
        )
        .unwrap();
        (console, kicks, messages)
    }

    fn next(console: &Console) -> ConsoleEvent {
        console.recv_timeout(Duration::from_secs(10)).expect("an event")
    }

    #[test]
    fn without_a_terminal_input_is_passed_unchanged_until_eof() {
        let (mut user, input) = UnixStream::pair().unwrap();
        let (console, kicks, messages) = console_on(&input, false);
        assert!(!console.is_terminal());
        user.write_all(b"a\x01xb\x01").unwrap();
        assert_eq!(next(&console), ConsoleEvent::Input(b"a\x01xb\x01".to_vec()));
        user.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(next(&console), ConsoleEvent::Eof);
        drop(console);
        assert_eq!(kicks.load(Ordering::SeqCst), 2, "one kick per batch");
        assert!(messages.0.lock().unwrap().is_empty());
    }

    #[test]
    fn escapes_print_on_messages_and_quit_ends_the_input() {
        let (mut user, input) = UnixStream::pair().unwrap();
        let (console, kicks, messages) = console_on(&input, true);
        user.write_all(b"hi\x01hyo\x01").unwrap();
        assert_eq!(next(&console), ConsoleEvent::Input(b"hi".to_vec()));
        assert_eq!(next(&console), ConsoleEvent::Input(b"yo".to_vec()));
        user.write_all(b"q\x01xafter").unwrap();
        assert_eq!(next(&console), ConsoleEvent::Quit);
        // The reader has stopped: nothing more, even with input waiting.
        user.write_all(b"more").unwrap();
        assert_eq!(console.recv_timeout(Duration::from_millis(50)), None);
        drop(console);
        assert_eq!(kicks.load(Ordering::SeqCst), 2);
        let text = String::from_utf8(messages.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, format!("{HELP}{}\r\n{QUIT_MESSAGE}\r\n", unknown_escape_message(b'q')));
        // Unread input stays for whoever reads next.
        let mut rest = [0u8; 16];
        let mut input = input;
        input.set_nonblocking(true).unwrap();
        let len = input.read(&mut rest).unwrap();
        assert_eq!(&rest[..len], b"more");
    }

    #[test]
    fn drop_stops_an_idle_reader() {
        let (_user, input) = UnixStream::pair().unwrap();
        let (console, kicks, _) = console_on(&input, true);
        assert_eq!(console.try_recv(), None);
        let start = Instant::now();
        drop(console);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(kicks.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn recv_timeout_waits_after_eof() {
        let (user, input) = UnixStream::pair().unwrap();
        let (console, _, _) = console_on(&input, false);
        drop(user);
        assert_eq!(next(&console), ConsoleEvent::Eof);
        let start = Instant::now();
        assert_eq!(console.recv_timeout(Duration::from_millis(50)), None);
        assert!(start.elapsed() >= Duration::from_millis(50), "no busy loop once the input is over");
    }

    #[test]
    fn raw_mode_on_a_pty_is_undone_on_drop() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: both out-pointers are valid; name, settings and size are optional (null).
        let r = unsafe { libc::openpty(&mut master, &mut slave, ptr::null_mut(), ptr::null(), ptr::null()) };
        assert_eq!(r, 0, "openpty: {}", io::Error::last_os_error());
        let before = get_modes(slave).unwrap();
        let guard = RawModeGuard::enable(slave).unwrap();
        let during = get_modes(slave).unwrap();
        assert_eq!(during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        assert_eq!(during.c_iflag & libc::ICRNL, 0);
        assert_eq!(during.c_oflag, before.c_oflag | libc::OPOST);
        let second = RawModeGuard::enable(slave).err().expect("one raw-mode guard at a time");
        assert_eq!(second.kind(), io::ErrorKind::AlreadyExists);
        drop(guard);
        let after = get_modes(slave).unwrap();
        assert_eq!(
            (after.c_iflag, after.c_oflag, after.c_lflag, after.c_cflag, after.c_cc),
            (before.c_iflag, before.c_oflag, before.c_lflag, before.c_cflag, before.c_cc)
        );
        assert!(SAVED.load(Ordering::Acquire).is_null());
        // SAFETY: both descriptors come from openpty and are closed once.
        unsafe {
            libc::close(slave);
            libc::close(master);
        }
    }
}
