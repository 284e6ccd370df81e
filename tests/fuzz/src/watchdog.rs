//! The watchdog: one thread that bounds every blocking call the fuzzer
//! makes on the device.
//!
//! Each worker thread registers a [`Watch`] and brackets every call with
//! [`Watch::begin`]; the watchdog polls the watches every millisecond.
//! A call with a kick time (KVM_RUN: the guest bound) gets, once that time
//! has passed, `immediate_exit = 1` written into its vCPU's kvm_run and the
//! kick signal, again every 5 ms until it returns: the signal ends a run in
//! progress with EINTR and `immediate_exit` ends one that had not started
//! yet (api.rst 4.10, KVM_CAP_IMMEDIATE_EXIT). A call still in progress
//! after 10 s is a finding ("hang in ..."), kicked every 100 ms from then
//! on; after 60 s the watchdog gives up: it prints what it has and ends the
//! process with status 1, so that a run always ends.
//!
//! Context: the watchdog thread, plus `begin`/`end` on worker threads. A
//! watch's lock is held by the watchdog while it kicks, so a worker that
//! has unregistered is never kicked or written to afterwards; a thread
//! whose kvm_run may be unmapped while it runs registers its KVM_RUN
//! without it (`race.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::findings::{self, SharedFindings};
use crate::{memcopy, progress, sys};

/// A call running this long is a hang.
pub const HANG: Duration = Duration::from_secs(10);
/// A call running this long ends the run.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// Polling period.
const TICK: Duration = Duration::from_millis(1);
/// How often a call past its kick time is kicked again.
const REKICK: Duration = Duration::from_millis(5);
/// How often a hung call is kicked again.
const HUNG_REKICK: Duration = Duration::from_millis(100);

/// A call in progress on a watched thread.
struct InFlight {
    /// What the call is ("KVM_RUN", "pread of a stats fd", ...).
    op: &'static str,
    /// Where, for the finding: "seed 1, storm step 12: ...".
    context: String,
    started: Instant,
    /// When to start kicking it, if ever before [`HANG`].
    kick_at: Option<Instant>,
    /// The address of `immediate_exit` in the vCPU's kvm_run mapping.
    immediate_exit: Option<usize>,
    last_kick: Option<Instant>,
    hang_reported: bool,
}

/// A watched thread.
struct Slot {
    thread: libc::pthread_t,
    call: Mutex<Option<InFlight>>,
}

// SAFETY: `pthread_t` is an opaque handle that any thread may use to
// signal the thread it names; the rest is Sync already.
unsafe impl Send for Slot {}
// SAFETY: as above.
unsafe impl Sync for Slot {}

struct Inner {
    slots: Mutex<Vec<Arc<Slot>>>,
    stop: AtomicBool,
}

/// The watchdog thread's handle.
pub struct Watchdog {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the watchdog prints when it gives up, besides the hung call.
pub type GiveUpReport = Box<dyn Fn() -> String + Send + Sync>;

impl Watchdog {
    /// Starts the watchdog; `findings` receives the hangs; `report` renders
    /// what the run has found when the watchdog gives up.
    pub fn start(findings: Arc<SharedFindings>, report: GiveUpReport) -> Watchdog {
        let inner = Arc::new(Inner {
            slots: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let watched = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch_loop(&watched, &findings, &report))
            .expect("the watchdog thread starts");
        Watchdog {
            inner,
            thread: Some(thread),
        }
    }

    /// Registers the calling thread; its calls are watched from now until
    /// the returned watch is dropped.
    pub fn watch(&self) -> Watch {
        let slot = Arc::new(Slot {
            thread: sys::this_thread(),
            call: Mutex::new(None),
        });
        lock(&self.inner.slots).push(Arc::clone(&slot));
        Watch {
            inner: Arc::clone(&self.inner),
            slot,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One thread's registration.
pub struct Watch {
    inner: Arc<Inner>,
    slot: Arc<Slot>,
}

/// How the watchdog may end a call early.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kick {
    /// Kick after this long.
    pub after: Option<Duration>,
    /// The vCPU's `immediate_exit` byte, to set when kicking.
    pub immediate_exit: Option<usize>,
}

impl Watch {
    /// Marks the start of `op`; `context` says where, for a hang finding.
    pub fn begin(&self, op: &'static str, context: impl FnOnce() -> String, kick: Kick) {
        let now = Instant::now();
        let call = InFlight {
            op,
            context: context(),
            started: now,
            kick_at: kick.after.map(|d| now + d),
            immediate_exit: kick.immediate_exit,
            last_kick: None,
            hang_reported: false,
        };
        *lock(&self.slot.call) = Some(call);
    }

    /// Marks the end of the call begun last.
    pub fn end(&self) {
        *lock(&self.slot.call) = None;
    }

    /// A handle another thread may use to learn whether this thread is
    /// inside a call.
    pub fn remote(&self) -> RemoteWatch {
        RemoteWatch {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.inner.slots).retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

/// Another thread's view of a [`Watch`].
#[derive(Clone)]
pub struct RemoteWatch {
    slot: Arc<Slot>,
}

impl RemoteWatch {
    /// The operation the thread is in, if any.
    pub fn current(&self) -> Option<&'static str> {
        lock(&self.slot.call).as_ref().map(|c| c.op)
    }
}

fn watch_loop(inner: &Inner, findings: &SharedFindings, report: &GiveUpReport) {
    while !inner.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let slots = lock(&inner.slots);
        let now = Instant::now();
        for slot in slots.iter() {
            let mut call = lock(&slot.call);
            let Some(c) = call.as_mut() else { continue };
            let running = now - c.started;
            if running >= GIVE_UP {
                give_up(c, report);
            }
            if running >= HANG && !c.hang_reported {
                c.hang_reported = true;
                let what = format!("hang in {} (no return within {} s)", c.op, HANG.as_secs());
                findings::record(findings, &what, || c.context.clone());
                eprintln!("rkvm-fuzz: {what}: {}", c.context);
            }
            let period = if c.hang_reported { HUNG_REKICK } else { REKICK };
            let due = c.hang_reported || c.kick_at.is_some_and(|t| now >= t);
            let quiet = match c.last_kick {
                Some(t) => now - t >= period,
                None => true,
            };
            if due && quiet {
                if let Some(addr) = c.immediate_exit {
                    // SAFETY: the address is immediate_exit in the kvm_run
                    // mapping of the vCPU this call runs, which its owner
                    // keeps mapped for the whole call (one that may lose it
                    // registers none), and the call is still registered
                    // (this lock); a failed copy is ignored, the signal
                    // still goes.
                    let _ = unsafe { memcopy::write(addr, &[1]) };
                }
                // SAFETY: the thread is registered, so it has not exited
                // (it unregisters under the slots lock, held here).
                unsafe { sys::kick(slot.thread) };
                c.last_kick = Some(now);
            }
        }
    }
}

/// Prints the partial report and ends the process: a call has not
/// returned for [`GIVE_UP`].
fn give_up(c: &InFlight, report: &GiveUpReport) -> ! {
    let findings = progress::findings().max(1);
    let text = format!(
        "{}\nrkvm-fuzz: giving up: {} has not returned for {} s ({}); the report below is partial\n{}{}\n",
        progress::headline(progress::seed(), progress::ioctls(), progress::guest_runs(), findings),
        c.op,
        GIVE_UP.as_secs(),
        c.context,
        report(),
        progress::verdict(findings),
    );
    sys::write_all(1, text.as_bytes());
    sys::write_all(
        2,
        format!(
            "rkvm-fuzz: giving up: {} hung for {} s\n",
            c.op,
            GIVE_UP.as_secs()
        )
        .as_bytes(),
    );
    sys::exit_now(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::Findings;

    fn watchdog() -> Watchdog {
        sys::install_kick_handler();
        Watchdog::start(
            Arc::new(Mutex::new(Findings::default())),
            Box::new(String::new),
        )
    }

    /// A blocking read stands in for a KVM_RUN that never exits.
    fn blocked_read(w: &Watch, kick: Kick) -> (isize, i32, Duration) {
        let (rd, wr) = sys::pipe().expect("pipe");
        w.begin("read", || "a test".into(), kick);
        let start = Instant::now();
        let mut b = [0u8; 1];
        // SAFETY: reads into `b`, owned by this frame.
        let r = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
        let e = sys::errno();
        w.end();
        sys::close(rd);
        sys::close(wr);
        (r, e, start.elapsed())
    }

    #[test]
    fn a_call_past_its_kick_time_is_interrupted() {
        let wd = watchdog();
        let w = wd.watch();
        let (r, e, took) = blocked_read(
            &w,
            Kick {
                after: Some(Duration::from_millis(10)),
                immediate_exit: None,
            },
        );
        assert_eq!((r, e), (-1, libc::EINTR));
        assert!(
            took >= Duration::from_millis(10) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn the_kick_sets_immediate_exit_first() {
        let wd = watchdog();
        let w = wd.watch();
        let flag = Box::new([0u8; 8]);
        let addr = flag.as_ptr() as usize + 1;
        let (r, _, _) = blocked_read(
            &w,
            Kick {
                after: Some(Duration::from_millis(5)),
                immediate_exit: Some(addr),
            },
        );
        assert_eq!(r, -1);
        assert_eq!(flag[1], 1, "immediate_exit was not set");
        assert_eq!(flag[0], 0);
    }

    #[test]
    fn other_threads_see_the_call_in_progress() {
        let wd = watchdog();
        let w = wd.watch();
        let remote = w.remote();
        w.begin("KVM_RUN", String::new, Kick::default());
        assert_eq!(remote.current(), Some("KVM_RUN"));
        w.end();
        assert_eq!(remote.current(), None);
    }
}
