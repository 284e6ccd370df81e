//! One KVM_RUN, bounded and checked: `immediate_exit` set as asked, the
//! watchdog armed to end the run after its bound, and the exit the device
//! reports in kvm_run checked against the ABI (`exit.rs`) and counted.
//!
//! Context: process context, the thread of the `Ctx`.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::ctx::{Arg, Call, Ctx};
use crate::exit::{self, ExitView};
use crate::ioctl_table::{nr, FdKind};
use crate::objects::RunPage;
use crate::sys::Errno;
use crate::watchdog::Kick;

/// How much of an exit to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checks {
    /// Every rule: the vCPU is run by this thread alone.
    Full,
    /// Only the exit reason: another thread may run the same vCPU, so the
    /// union may already describe its exit, not this one (a torn read).
    ReasonOnly,
}

/// Runs the vCPU `fd` (whose kvm_run is `run`, if mapped) for at most
/// `bound`, with `immediate_exit` set if asked. Returns the exit, None if
/// kvm_run cannot be read, or the errno.
pub fn run(
    ctx: &mut Ctx<'_>,
    fd: RawFd,
    run: Option<&RunPage>,
    bound: Duration,
    immediate_exit: bool,
    checks: Checks,
) -> Result<Option<ExitView>, Errno> {
    if let Some(r) = run {
        r.set_immediate_exit(immediate_exit);
    }
    let kick = Kick {
        after: Some(bound),
        immediate_exit: run.map(RunPage::immediate_exit_addr),
    };
    let call = Call {
        kick: Some(kick),
        ..Call::new(fd, FdKind::Vcpu, nr::KVM_RUN, Arg::None)
    };
    let result = ctx.ioctl(call);
    if let Some(r) = run {
        // The watchdog may have set it; the next run decides afresh.
        r.set_immediate_exit(false);
    }
    match result {
        Err(e) => {
            ctx.tally.run(Err(e));
            Err(e)
        }
        Ok(_) => {
            let Some(r) = run else {
                ctx.tally
                    .note("KVM_RUN returns of vCPUs without a kvm_run mapping");
                return Ok(None);
            };
            let view = match r.snapshot() {
                Ok(k) => ExitView::decode(&k),
                Err(e) => {
                    ctx.finding("the kvm_run mapping cannot be read after KVM_RUN", || {
                        format!("reading kvm_run failed with {}", crate::errno::name(e))
                    });
                    return Ok(None);
                }
            };
            ctx.tally.run(Ok(view.reason));
            let broken = match checks {
                Checks::Full => exit::violation(&view, r.len()),
                Checks::ReasonOnly => exit::reason_violation(view.reason),
            };
            if let Some(what) = broken {
                ctx.finding(what, || {
                    format!("KVM_RUN returned 0 with {}", exit::describe(&view))
                });
            }
            Ok(Some(view))
        }
    }
}
