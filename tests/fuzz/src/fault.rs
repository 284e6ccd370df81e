//! The last resort: the fuzzer faulting (SIGSEGV, SIGBUS) on its own
//! memory. The fuzzer only touches memory it owns, so a fault means that a
//! device broke the VMM's address space (a page it unmapped, a mapping it
//! corrupted), unless the fuzzer itself has a bug; either way the run
//! cannot go on. The handler prints the greppable report lines with this
//! fault as one more finding and ends the process with status 1.
//!
//! Context: signal handler on the thread's alternate stack: only atomics,
//! a thread-local `Cell` and write(2); no allocation, no locks.

use std::cell::Cell;

use crate::{progress, sys};

thread_local! {
    /// The operation this thread started last, for the fault report.
    static LAST_OP: Cell<&'static str> = const { Cell::new("none") };
}

/// Records `op` as this thread's current operation.
pub fn set_op(op: &'static str) {
    LAST_OP.with(|c| c.set(op));
}

/// A fixed buffer that formats without allocating.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    fn num(&mut self, mut v: u64, radix: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v % radix) as usize];
            v /= radix;
            if v == 0 {
                break;
            }
        }
        if radix == 16 {
            self.push(b"0x");
        }
        self.push(&digits[i..])
    }
}

/// The SIGSEGV/SIGBUS handler.
pub extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // si_addr is defined for SIGSEGV and SIGBUS.
    let addr = unsafe { (*info).si_addr() } as u64;
    let op = LAST_OP.with(|c| c.get());
    let findings = progress::findings() + 1;
    let mut l = Line {
        buf: [0; 512],
        len: 0,
    };
    l.push(b"rkvm-fuzz: seed ").num(progress::seed(), 10);
    l.push(b": ").num(progress::ioctls(), 10).push(b" ioctls, ");
    l.num(progress::guest_runs(), 10)
        .push(b" guest runs, ")
        .num(findings, 10)
        .push(b" findings\n");
    l.push(b"  FINDING (1x) the fuzzer faulted on its own memory: the device corrupted the VMM's address space");
    l.push(b" (or the fuzzer has a bug)\n      first: seed ")
        .num(progress::seed(), 10);
    l.push(b", phase ").push(progress::phase().as_bytes());
    l.push(if signal == libc::SIGBUS {
        b": SIGBUS"
    } else {
        b": SIGSEGV"
    });
    l.push(b" at ")
        .num(addr, 16)
        .push(b", last operation of the thread: ")
        .push(op.as_bytes());
    l.push(b"\nrkvm-fuzz: FAIL (")
        .num(findings, 10)
        .push(b" findings)\n");
    sys::write_all(1, &l.buf[..l.len]);
    sys::write_all(2, &l.buf[..l.len]);
    sys::exit_now(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that faults prints the report's first and last lines and
    /// ends with status 1.
    #[test]
    fn a_fault_ends_the_run_with_a_report() {
        let (rd, wr) = sys::pipe().expect("pipe");
        // SAFETY: the child only installs handlers, redirects its output
        // and faults: all async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: dup2 onto the child's own stdout and stderr.
            unsafe {
                libc::dup2(wr, 1);
                libc::dup2(wr, 2);
            }
            sys::install_handlers(on_fault);
            // Other tests of this process may have counted findings.
            progress::found(0);
            set_op("a test's null read");
            // SAFETY: deliberately faults (address 8 is never mapped); the
            // handler ends the process.
            unsafe { std::ptr::read_volatile(8 as *const u8) };
            sys::exit_now(0);
        }
        sys::close(wr);
        let (out, _) = sys::read_until_eof(rd, std::time::Duration::from_secs(10));
        sys::close(rd);
        let status = sys::reap(pid, std::time::Duration::from_secs(10)).expect("the child ends");
        let text = String::from_utf8_lossy(&out);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1,
            "status {status:#x}: {text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("rkvm-fuzz: seed ") && lines[0].ends_with(" 1 findings"),
            "{text}"
        );
        assert!(
            text.contains("SIGSEGV at 0x8, last operation of the thread: a test's null read"),
            "{text}"
        );
        assert!(lines.contains(&"rkvm-fuzz: FAIL (1 findings)"), "{text}");
    }

    #[test]
    fn lines_format_numbers_without_allocating() {
        let mut l = Line {
            buf: [0; 512],
            len: 0,
        };
        l.push(b"x ")
            .num(0, 10)
            .push(b" ")
            .num(1234, 10)
            .push(b" ")
            .num(0xdead_beef, 16);
        assert_eq!(&l.buf[..l.len], b"x 0 1234 0xdeadbeef");
        l.num(u64::MAX, 10);
        assert!(l.buf[..l.len].ends_with(b"18446744073709551615"));
    }
}
