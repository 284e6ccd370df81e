//! Getting the vCPU thread out of KVM_RUN when something outside the guest
//! needs it: a timer falls due, console input arrives. As in Firecracker and
//! cloud-hypervisor, a signal (SIGUSR1, handler installed without
//! SA_RESTART) interrupts KVM_RUN with EINTR, and the handler also sets
//! `kvm_run.immediate_exit` (api.rst 4.10), so a kick that lands just
//! before KVM_RUN is entered is not lost: KVM_RUN then returns at once.
//!
//! An [`Alarm`] (a POSIX timer aimed at the vCPU thread) sends the same
//! signal when the next timer deadline passes, so the guest gets its timer
//! interrupts while it runs, without busy waiting or helper threads.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use kvm_bindings::kvm_run;

/// The signal that kicks the vCPU thread.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// The vCPU's `kvm_run` (one vCPU per process), for the signal handler.
static RUN: AtomicPtr<kvm_run> = AtomicPtr::new(ptr::null_mut());

extern "C" fn on_kick(_signal: libc::c_int) {
    let run = RUN.load(Ordering::Acquire);
    if !run.is_null() {
        // `Kick::install` registered `run` and unregisters it before it is unmapped.
        // SAFETY: `run` is the vCPU's mapped `kvm_run`; a volatile byte store is async-signal-safe.
        unsafe { ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Kicks one thread (the vCPU's) out of KVM_RUN; cheap to clone and send.
#[derive(Clone, Copy)]
pub struct Kick {
    thread: libc::pthread_t,
}

impl Kick {
    /// Installs the handler and registers `run` (the calling thread's
    /// vCPU). The returned guard unregisters it.
    ///
    /// # Errors
    /// `sigaction` fails.
    pub fn install(run: *mut kvm_run) -> Result<(Kick, KickGuard)> {
        // No SA_RESTART, so KVM_RUN returns EINTR.
        // SAFETY: an all-zero sigaction is valid; the handler only does a volatile store.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK_SIGNAL, &sa, ptr::null_mut())
        };
        if rc != 0 {
            bail!("cannot install the vCPU kick handler: {}", std::io::Error::last_os_error());
        }
        RUN.store(run, Ordering::Release);
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Ok((Kick { thread }, KickGuard))
    }

    /// Interrupts KVM_RUN on the vCPU thread (or makes the next one return
    /// at once).
    pub fn kick(&self) {
        // The VMM joins or stops the threads holding a Kick before it returns.
        // SAFETY: the vCPU thread `self.thread` outlives every Kick.
        unsafe { libc::pthread_kill(self.thread, KICK_SIGNAL) };
    }
}

/// Unregisters `kvm_run` from the signal handler when dropped.
pub struct KickGuard;

impl Drop for KickGuard {
    fn drop(&mut self) {
        RUN.store(ptr::null_mut(), Ordering::Release);
    }
}

/// Clears `immediate_exit` before the next KVM_RUN (the kick was seen).
pub fn rearm(run: &mut kvm_run) {
    // The handler may store 1 concurrently: a kick that raced with this is
    // seen at the next exit anyway.
    // SAFETY: `run` is our own mapped `kvm_run`; a volatile byte store.
    unsafe { ptr::write_volatile(&raw mut run.immediate_exit, 0) };
}

/// A one-shot timer that kicks the vCPU thread when the next timer deadline
/// passes: a POSIX timer (timer_create) delivering the kick signal to that
/// thread (SIGEV_THREAD_ID), so no helper thread is woken on every change.
pub struct Alarm {
    timer: libc::timer_t,
    armed: Option<Instant>,
}

impl Alarm {
    /// A timer aimed at the calling thread (the vCPU's, after
    /// [`Kick::install`]).
    ///
    /// # Errors
    /// timer_create fails (a kernel without CONFIG_POSIX_TIMERS).
    pub fn new() -> Result<Alarm> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // The fields set below say "send KICK_SIGNAL to thread `tid`".
        // SAFETY: an all-zero sigevent is a valid value.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = KICK_SIGNAL;
        event.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = ptr::null_mut();
        // SAFETY: valid pointers to `event` and `timer` for the call.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            bail!("cannot create the vCPU timer (timer_create): {}", std::io::Error::last_os_error());
        }
        Ok(Alarm { timer, armed: None })
    }

    /// Kicks the vCPU at `deadline` (`None`: never); a no-op if that is
    /// already what is armed.
    pub fn set(&mut self, deadline: Option<Instant>) {
        if deadline == self.armed {
            return;
        }
        self.armed = deadline;
        // A zero it_value disarms; a deadline already past fires at once.
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()).max(std::time::Duration::from_nanos(1)));
        let value = left.map_or(libc::timespec { tv_sec: 0, tv_nsec: 0 }, |d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos().into(),
        });
        let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        // SAFETY: `self.timer` is a live timer; `spec` outlives the call.
        if unsafe { libc::timer_settime(self.timer, 0, &spec, ptr::null_mut()) } != 0 {
            log::warn!("timer_settime failed: {}", std::io::Error::last_os_error());
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // SAFETY: a live timer, deleted once.
        unsafe { libc::timer_delete(self.timer) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_alarm_interrupts_a_sleep_on_this_thread_and_sets_immediate_exit() {
        // SAFETY: `kvm_run` is plain data; all zeros is a valid value.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        let (_kick, guard) = Kick::install(&mut run).unwrap();
        let Ok(mut alarm) = Alarm::new() else {
            eprintln!("skipped: no POSIX timers here");
            return;
        };
        alarm.set(Some(Instant::now() + Duration::from_millis(20)));
        // A blocking call without SA_RESTART returns EINTR when kicked.
        let start = Instant::now();
        // SAFETY: plain sleep; interrupted by the signal.
        let left = unsafe { libc::sleep(5) };
        assert!(left > 0, "sleep was interrupted");
        assert!(start.elapsed() < Duration::from_secs(4));
        // SAFETY: reading our own struct.
        assert_eq!(unsafe { ptr::read_volatile(&raw const run.immediate_exit) }, 1);
        rearm(&mut run);
        assert_eq!(run.immediate_exit, 0);
        alarm.set(None);
        drop(alarm);
        drop(guard);
    }
}
