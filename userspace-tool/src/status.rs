//! The exit status of `rkvm`, so that a script can tell a guest's verdict
//! from a failure of the VMM or the device.
//!
//! A guest can only produce odd statuses, through QEMU's isa-debug-exit
//! convention (`(value << 1) | 1`), and 0 when it ends normally. Every
//! failure of the VMM therefore has an even status of its own:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest ended normally (HLT with interrupts off, power-off, reset, Ctrl-A x) |
//! | odd | the guest wrote `value` to isa-debug-exit: `(value << 1) \| 1` |
//! | 2 | bad command line or input (a file, a size, an option); no guest ran |
//! | 4 | the device failed: it cannot be opened, or an ioctl (KVM_RUN included) failed |
//! | 6 | the guest shut down (triple fault, KVM_EXIT_SHUTDOWN) |
//! | 8 | VM entry failed (KVM_EXIT_FAIL_ENTRY) |
//! | 10 | the device reported an internal error, or an exit the VMM cannot handle |

use std::fmt;

/// Why a run failed, each with its own even exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad command line or input: nothing ran (clap's usage errors are 2 too).
    BadInput,
    /// Opening the device or an ioctl failed.
    Device,
    /// The guest shut down (triple fault).
    Shutdown,
    /// The CPU refused to enter the guest.
    EntryFailed,
    /// KVM_EXIT_INTERNAL_ERROR or an exit the VMM does not handle.
    Internal,
}

impl Failure {
    /// The process exit status.
    pub fn status(self) -> u8 {
        match self {
            Failure::BadInput => 2,
            Failure::Device => 4,
            Failure::Shutdown => 6,
            Failure::EntryFailed => 8,
            Failure::Internal => 10,
        }
    }
}

/// An error and the failure it stands for.
#[derive(Debug)]
pub struct Failed {
    /// Which kind of failure, hence the exit status.
    pub failure: Failure,
    /// What to tell the user.
    pub error: anyhow::Error,
}

impl Failed {
    /// Bad input.
    pub fn input(error: anyhow::Error) -> Self {
        Failed { failure: Failure::BadInput, error }
    }

    /// A device or ioctl failure.
    pub fn device(error: anyhow::Error) -> Self {
        Failed { failure: Failure::Device, error }
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_status_is_even_nonzero_and_distinct() {
        let all = [Failure::BadInput, Failure::Device, Failure::Shutdown, Failure::EntryFailed, Failure::Internal];
        let statuses: Vec<u8> = all.iter().map(|f| f.status()).collect();
        for s in &statuses {
            assert!(*s != 0 && s % 2 == 0, "{s} would read as a guest's verdict");
        }
        let mut unique = statuses.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), statuses.len(), "{statuses:?}");
    }

    #[test]
    fn no_guest_verdict_collides_with_a_failure() {
        let failures = [Failure::BadInput, Failure::Device, Failure::Shutdown, Failure::EntryFailed, Failure::Internal];
        for value in [0, 1, 2, 3, 4, 5, 0x7f, 0x80, 0xff, 0x100, u32::MAX] {
            let verdict = crate::devices::debug_exit::DebugExit::exit_code(value);
            assert!(failures.iter().all(|f| f.status() != verdict), "value {value:#x} gives {verdict}");
        }
    }
}
