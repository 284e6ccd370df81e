//! Copies to and from memory that the device controls (the kvm_run
//! mapping, odd mappings of a vCPU fd) that cannot fault: the bytes go
//! through a pipe, so the kernel's user-copy does the access, and a page
//! that is not there is EFAULT rather than a SIGSEGV or SIGBUS that would
//! end the run. A device that breaks its mapping is then a finding like
//! any other.
//!
//! A pipe rather than process_vm_readv/writev: those need
//! CONFIG_CROSS_MEMORY_ATTACH, which the testbed's tinyconfig kernel does
//! not have; pipes exist everywhere, and the same path is tested on the
//! host.
//!
//! Context: process context, any thread; each thread has its own pipe
//! (non-blocking, so a copy never waits; copies are far smaller than the
//! pipe's 64 KiB).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::{self, Errno};

thread_local! {
    /// This thread's pipe: (read end, write end), made on first use.
    static PIPE: RefCell<Option<(OwnedFd, OwnedFd)>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's pipe.
fn with_pipe<T>(f: impl FnOnce(RawFd, RawFd) -> Result<T, Errno>) -> Result<T, Errno> {
    PIPE.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_none() {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into `fds`.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
                return Err(sys::errno());
            }
            // SAFETY: both descriptors were just made and are owned by
            // nothing else.
            *p = Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) });
        }
        let (rd, wr) = p
            .as_ref()
            .map(|(r, w)| (r.as_raw_fd(), w.as_raw_fd()))
            .ok_or(libc::EBADF)?;
        f(rd, wr)
    })
}

/// read(2) or write(2) of `len` bytes at `addr`, retried on EINTR.
fn transfer(write: bool, fd: RawFd, addr: usize, len: usize) -> isize {
    loop {
        // SAFETY: the kernel accesses `addr` through its user-copy, which
        // fails with EFAULT where nothing is mapped (or, for a read into
        // it, nothing writable); the callers vouch for what it may write.
        let n = unsafe {
            if write {
                libc::write(fd, addr as *const libc::c_void, len)
            } else {
                libc::read(fd, addr as *mut libc::c_void, len)
            }
        };
        if n >= 0 || sys::errno() != libc::EINTR {
            return n;
        }
    }
}

/// Empties the pipe (after a copy that stopped half-way).
fn drain(rd: RawFd) {
    let mut junk = [0u8; 4096];
    while transfer(false, rd, junk.as_mut_ptr() as usize, junk.len()) > 0 {}
}

/// Copies `buf.len()` bytes at `addr` of this process into `buf`.
///
/// # Errors
/// EFAULT if any byte cannot be read.
pub fn read(addr: usize, buf: &mut [u8]) -> Result<(), Errno> {
    with_pipe(|rd, wr| {
        let n = transfer(true, wr, addr, buf.len());
        let got = transfer(false, rd, buf.as_mut_ptr() as usize, n.max(0) as usize);
        drain(rd);
        if n < 0 {
            Err(sys::errno().max(libc::EFAULT))
        } else if n as usize != buf.len() || got != n {
            Err(libc::EFAULT)
        } else {
            Ok(())
        }
    })
}

/// Copies `buf` to `addr` of this process.
///
/// # Safety
/// `[addr, addr + buf.len())` must be memory nothing of the fuzzer relies
/// on (a device mapping such as kvm_run).
///
/// # Errors
/// EFAULT if any byte cannot be written.
pub unsafe fn write(addr: usize, buf: &[u8]) -> Result<(), Errno> {
    with_pipe(|rd, wr| {
        let n = transfer(true, wr, buf.as_ptr() as usize, buf.len());
        if n < 0 || n as usize != buf.len() {
            drain(rd);
            return Err(libc::EAGAIN);
        }
        let put = transfer(false, rd, addr, buf.len());
        drain(rd);
        if put < 0 || put as usize != buf.len() {
            Err(libc::EFAULT)
        } else {
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_mapped_memory_go_through() {
        let src = [1u8, 2, 3, 4, 5];
        let mut dst = [0u8; 5];
        read(src.as_ptr() as usize, &mut dst).expect("readable");
        assert_eq!(dst, src);
        let mut target = [0u8; 3];
        // SAFETY: `target` is this test's own buffer.
        unsafe { write(target.as_mut_ptr() as usize, &[7, 8, 9]) }.expect("writable");
        assert_eq!(target, [7, 8, 9]);
    }

    #[test]
    fn a_missing_page_is_efault_and_leaves_the_pipe_empty() {
        let mut buf = [0u8; 16];
        assert_eq!(read(8, &mut buf), Err(libc::EFAULT));
        // SAFETY: address 8 is never mapped: the write must fail.
        assert_eq!(unsafe { write(8, &[1, 2]) }, Err(libc::EFAULT));
        // Nothing left over from the failed copies.
        let src = [9u8; 16];
        read(src.as_ptr() as usize, &mut buf).expect("readable");
        assert_eq!(buf, src);
    }
}
