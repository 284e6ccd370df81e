//! A worker thread's context, and the one place where the fuzzer calls into
//! the device: [`Ctx::ioctl`] places the argument (in the scratch mapping or
//! as a bad pointer), brackets the call for the watchdog, counts it, and
//! checks the answer against what the ABI allows:
//!
//! - no failure with an errno a kernel must never return (`errno.rs`), no
//!   result below -1;
//! - a known ioctl returns what it should on success (0, a count no larger
//!   than the one given, API version 12);
//! - no success with an argument the device cannot have read or written:
//!   a pointer to no memory, a read-only page for a result, a struct that
//!   runs into an unmapped page;
//! - no write outside the argument: the scratch is compared before and
//!   after each known ioctl, and only the bytes the ioctl may write (its
//!   struct, or the entries its count covers) may differ, up to
//!   [`WRITE_CHECK_SLACK`] bytes past the argument or what it may write;
//! - no success for a known ioctl's number with other direction or size
//!   bits: the size is part of the ABI (a VMM built against another struct
//!   layout must be refused, not misread).
//!
//! Context: process context, the thread that owns the `Ctx`.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{Options, Phase};
use crate::device::Device;
use crate::findings::{self, SharedFindings};
use crate::ioctl_table::{self, ArgKind, FdKind, IoctlDef, Returns, Shape};
use crate::memory::Arena;
use crate::rng::Rng;
use crate::scratch::{BadPtr, Scratch, SCRATCH_LEN};
use crate::tally::Tally;
use crate::watchdog::{Kick, Watch, Watchdog};
use crate::{errno, fault, progress, sys};

/// Where `struct kvm_regs` (also at the start of `kvm_sync_regs`) keeps
/// RFLAGS.IF: bit 9 of RFLAGS, which follows 16 registers and RIP.
pub const RFLAGS_IF_BYTE: usize = 17 * 8 + 1;
/// The bit of IF in that byte.
pub const RFLAGS_IF_BIT: u8 = 1 << 1;
/// The end of RFLAGS in `struct kvm_regs`.
const RFLAGS_END: usize = 18 * 8;

/// How far past an argument (or past what the ioctl may write, if more)
/// the scratch is compared. Not the whole 64 KiB scratch: copying it
/// before every call took about 1.3 ms under Bochs (glibc copies that much
/// with REP MOVSB, which Bochs runs byte by byte), most of a simple
/// ioctl's time in the fuzzer.
pub const WRITE_CHECK_SLACK: usize = 4096;

/// How long any call but KVM_RUN may take before the watchdog kicks it: a
/// bent number that a device mistakes for KVM_RUN then ends anyway.
const CALL_KICK: Duration = Duration::from_secs(1);

/// What all threads share.
pub struct Shared {
    /// The options.
    pub opts: Options,
    /// The device and what it told about itself.
    pub dev: Device,
    /// Where guest memory lives.
    pub arena: Arena,
    /// The findings.
    pub findings: Arc<SharedFindings>,
    /// The watchdog.
    pub watchdog: Watchdog,
}

impl Shared {
    /// Records one occurrence of finding `what`.
    pub fn finding(&self, what: &str, example: impl FnOnce() -> String) {
        let mut first = None;
        findings::record(&self.findings, what, || {
            let e = example();
            first = Some(e.clone());
            e
        });
        if self.opts.verbose {
            if let Some(e) = first {
                eprintln!("rkvm-fuzz: FINDING: {what}: {e}");
            }
        }
    }

    /// The bound of a short KVM_RUN (storm, race): a tenth of the guest
    /// bound, at least 1 ms.
    pub fn short_run(&self) -> Duration {
        (self.opts.guest_time / 10).max(Duration::from_millis(1))
    }
}

/// An ioctl argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    /// The integer 0 (what `_IO` ioctls without an argument want).
    None,
    /// An integer.
    Int(u64),
    /// These bytes, placed at the start of the scratch.
    Data(&'a [u8]),
    /// A bad pointer, with the bytes placed where it points, if anywhere.
    Bad(BadPtr, &'a [u8]),
}

impl Arg<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Arg::Data(b) | Arg::Bad(_, b) => b,
            _ => &[],
        }
    }

    fn describe(&self) -> String {
        match self {
            Arg::None => "0".into(),
            Arg::Int(v) => format!("{v:#x}"),
            Arg::Data(b) => format!("{} bytes in the scratch buffer", b.len()),
            Arg::Bad(p, _) => p.describe(),
        }
    }
}

/// One ioctl to issue.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The fd.
    pub fd: RawFd,
    /// What the fd is.
    pub kind: FdKind,
    /// The number.
    pub nr: u32,
    /// The argument.
    pub arg: Arg<'a>,
    /// How the watchdog may end it (KVM_RUN); `None`: the default.
    pub kick: Option<Kick>,
}

impl<'a> Call<'a> {
    /// A call with the default kick.
    pub fn new(fd: RawFd, kind: FdKind, nr: u32, arg: Arg<'a>) -> Self {
        Call {
            fd,
            kind,
            nr,
            arg,
            kick: None,
        }
    }

    fn describe(&self) -> String {
        let name = ioctl_table::name_of(self.kind, self.nr);
        format!(
            "{name} {} on a {} fd, argument: {}",
            ioctl_table::describe(self.nr),
            self.kind.name(),
            self.arg.describe()
        )
    }
}

/// A worker thread's context.
pub struct Ctx<'s> {
    /// What all threads share.
    pub shared: &'s Shared,
    /// This thread's randomness.
    pub rng: Rng,
    /// What this thread did.
    pub tally: Tally,
    /// This thread's scratch mapping.
    pub scratch: Scratch,
    /// The scratch as it was before the current call.
    before: Vec<u8>,
    watch: Watch,
    /// The phase.
    pub phase: Phase,
    /// The step of the phase (or of this thread in it).
    pub step: u64,
    /// The thread index in a multi-threaded phase.
    pub thread: Option<usize>,
}

impl<'s> Ctx<'s> {
    /// A context for the calling thread, registered with the watchdog.
    ///
    /// # Errors
    /// The errno of the scratch mapping.
    pub fn new(
        shared: &'s Shared,
        phase: Phase,
        rng: Rng,
        thread: Option<usize>,
    ) -> Result<Self, sys::Errno> {
        let scratch = Scratch::new()?;
        Ok(Ctx {
            shared,
            rng,
            tally: Tally::default(),
            before: vec![0; scratch.bytes().len()],
            scratch,
            watch: shared.watchdog.watch(),
            phase,
            step: 0,
            thread,
        })
    }

    /// This thread's watchdog registration.
    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    /// Where the fuzzer is: "seed 1, storm step 12" (with the thread).
    pub fn place(&self) -> String {
        let thread = self
            .thread
            .map(|t| format!(" thread {t}"))
            .unwrap_or_default();
        format!(
            "seed {}, {}{thread} step {}",
            self.shared.opts.seed,
            self.phase.name(),
            self.step
        )
    }

    /// Records finding `what`, with `detail` after the place.
    pub fn finding(&self, what: &str, detail: impl FnOnce() -> String) {
        let place = self.place();
        self.shared
            .finding(what, || format!("{place}: {}", detail()));
    }

    /// Runs `f`, a call on the device other than an ioctl (`op` names it),
    /// under the watchdog with its default bound.
    pub fn watched<T>(
        &self,
        op: &'static str,
        detail: impl FnOnce() -> String,
        f: impl FnOnce() -> T,
    ) -> T {
        fault::set_op(op);
        self.watch.begin(
            op,
            || format!("{}: {}", self.place(), detail()),
            Kick {
                after: Some(CALL_KICK),
                immediate_exit: None,
            },
        );
        let r = f();
        self.watch.end();
        r
    }

    /// Issues `call` and checks the answer (see the module doc). Returns
    /// the result, or the errno.
    pub fn ioctl(&mut self, call: Call<'_>) -> Result<i64, i32> {
        if ioctl_table::denied(call.nr) {
            self.tally.note("denied ioctl numbers not issued");
            return Err(libc::EPERM);
        }
        let def = ioctl_table::lookup(call.kind, call.nr);
        let name = def.map_or("unknown", |d| d.name);
        let ptr = match call.arg {
            Arg::None => 0,
            Arg::Int(v) => v,
            Arg::Data(b) => {
                let n = b.len().min(self.scratch.bytes().len());
                self.scratch.bytes_mut()[..n].copy_from_slice(&b[..n]);
                if self.shared.opts.interrupts_on
                    && call.nr == ioctl_table::nr::KVM_SET_REGS
                    && n >= RFLAGS_END
                {
                    // `--interrupts-on`: RFLAGS.IF stays set.
                    self.scratch.bytes_mut()[RFLAGS_IF_BYTE] |= RFLAGS_IF_BIT;
                }
                self.scratch.addr(0)
            }
            Arg::Bad(p, b) => self.scratch.place_bad(p, b),
        };
        // The bytes compared before and after the call, if any.
        let compared = match (def, call.arg) {
            (Some(d), Arg::Data(b)) => Some(compared_len(d, b)),
            _ => None,
        };
        if let Some(n) = compared {
            self.before[..n].copy_from_slice(&self.scratch.bytes()[..n]);
        }
        let kick = call.kick.unwrap_or_else(|| {
            let run_like =
                call.kind == FdKind::Vcpu && call.nr & 0xffff == ioctl_table::nr::KVM_RUN & 0xffff;
            let after = if run_like {
                self.shared.short_run()
            } else {
                CALL_KICK
            };
            Kick {
                after: Some(after),
                immediate_exit: None,
            }
        });
        fault::set_op(name);
        self.watch.begin(
            name,
            || format!("{}: {}", self.place(), call.describe()),
            kick,
        );
        // SAFETY: `ptr` is an integer, the scratch mapping (which holds no
        // data of the fuzzer), or a bad pointer into its guard, read-only
        // page or nowhere (`Arg`): whatever the device writes through it
        // hurts nothing the fuzzer relies on.
        let (ret, e) = unsafe { sys::ioctl(call.fd, call.nr, ptr) };
        self.watch.end();
        progress::ioctl();
        // A result below -1 is no success either (it is reported below);
        // it counts as a failure without an errno.
        let result = match ret {
            -1 => Err(e),
            r if r < 0 => Err(0),
            r => Ok(r),
        };
        self.tally.ioctl(call.kind, name, result);
        if let Some(why) = errno::bad_result(ret, e) {
            self.finding(&format!("{name} {why}"), || call.describe());
        }
        if let (Some(def), Ok(value)) = (def, result) {
            if let Some(what) = success_violation(def, call.arg, value) {
                self.finding(&what, || format!("{} (returned {value})", call.describe()));
            }
        }
        if let (Some(def), Some(n)) = (def, compared) {
            self.check_writes(def, &call, n);
        }
        if let (None, Ok(value)) = (def, result) {
            self.bent_succeeded(&call, value);
        }
        result
    }

    /// Checks that a known ioctl wrote nothing outside what it may write,
    /// in the first `compared` bytes of the scratch.
    fn check_writes(&self, def: &IoctlDef, call: &Call<'_>, compared: usize) {
        let after = &self.scratch.bytes()[..compared];
        let allowed = write_extent(def, call.arg.bytes())
            .unwrap_or(after.len())
            .min(after.len());
        if after[allowed..] == self.before[allowed..] {
            return;
        }
        if let Some(at) = (allowed..after.len()).find(|&i| after[i] != self.before[i]) {
            let what = if allowed == 0 {
                format!("{} wrote into its write-only argument", def.name)
            } else {
                format!("{} wrote past the bytes it may write", def.name)
            };
            self.finding(&what, || {
                format!(
                    "{}: byte {at} changed, {allowed} may change",
                    call.describe()
                )
            });
        }
    }

    /// A number rkvm does not implement succeeded: if it is a known number
    /// with other direction or size bits, that is a finding.
    fn bent_succeeded(&self, call: &Call<'_>, value: i64) {
        let bent_from = ioctl_table::same_function(call.kind, call.nr)
            .filter(|d| (call.nr >> 8) & 0xff == rkvm_core::abi::KVMIO && d.nr != call.nr);
        if let Some(d) = bent_from {
            self.finding(
                &format!(
                    "{}'s number with other direction or size bits succeeded",
                    d.name
                ),
                || format!("{} (returned {value})", call.describe()),
            );
        }
    }
}

/// The bytes a known ioctl may write from the start of its argument
/// `arg`: nothing for `_IOW` ioctls, the struct for fixed-size results,
/// the header and the entries its count covers for counted arrays (None
/// if that overflows).
pub fn write_extent(def: &IoctlDef, arg: &[u8]) -> Option<usize> {
    let ArgKind::Ptr(shape) = def.arg else {
        return Some(0);
    };
    if !def.writes_arg() {
        return Some(0);
    }
    match shape.entry_size() {
        None => Some(shape.fixed_size()),
        Some(entry) => {
            let count = arg_count(arg) as usize;
            entry.checked_mul(count)?.checked_add(shape.fixed_size())
        }
    }
}

/// How many bytes of the scratch to compare around a call of `def` with
/// `arg`: the argument or what the call may write, whichever is longer,
/// and [`WRITE_CHECK_SLACK`] more.
fn compared_len(def: &IoctlDef, arg: &[u8]) -> usize {
    write_extent(def, arg)
        .unwrap_or(SCRATCH_LEN)
        .max(arg.len())
        .saturating_add(WRITE_CHECK_SLACK)
        .min(SCRATCH_LEN)
}

/// The count at the start of a counted argument (nmsrs, nent).
fn arg_count(arg: &[u8]) -> u32 {
    arg.get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// What is wrong with a known ioctl succeeding with `value`, given its
/// argument `arg`, if anything.
pub fn success_violation(def: &IoctlDef, arg: Arg<'_>, value: i64) -> Option<String> {
    match def.returns {
        Returns::Zero if value != 0 => {
            return Some(format!("{} succeeded with a result other than 0", def.name))
        }
        Returns::ApiVersion if value != i64::from(kvm_bindings::KVM_API_VERSION) => {
            return Some(format!(
                "{} is not {}",
                def.name,
                kvm_bindings::KVM_API_VERSION
            ))
        }
        Returns::Count
            if !matches!(arg, Arg::Bad(p, _) if p.inaccessible())
                && value > i64::from(arg_count(arg.bytes())) =>
        {
            return Some(format!(
                "{} returned more entries than it was given",
                def.name
            ))
        }
        _ => {}
    }
    let (ArgKind::Ptr(shape), Arg::Bad(p, bytes)) = (def.arg, arg) else {
        return None;
    };
    match p {
        p if p.inaccessible() => Some(format!(
            "{} succeeded with an argument pointer to no memory",
            def.name
        )),
        BadPtr::ReadOnly if must_write(def, shape, bytes) => Some(format!(
            "{} succeeded although its result goes to a read-only page",
            def.name
        )),
        BadPtr::Straddle(n) if n < shape.fixed_size() => Some(format!(
            "{} succeeded with an argument that runs into an unmapped page",
            def.name
        )),
        _ => None,
    }
}

/// Whether every success of `def` writes through its argument: results of
/// `_IOR`/`_IOWR` ioctls, except KVM_GET_MSRS of no entries.
fn must_write(def: &IoctlDef, shape: Shape, arg: &[u8]) -> bool {
    def.writes_arg() && (shape != Shape::Msrs || arg_count(arg) > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioctl_table::nr;

    fn def(kind: FdKind, n: u32) -> &'static IoctlDef {
        ioctl_table::lookup(kind, n).expect("known")
    }

    #[test]
    fn compared_bytes_cover_the_argument_what_may_be_written_and_the_slack() {
        let get = def(FdKind::Vcpu, nr::KVM_GET_REGS);
        assert_eq!(compared_len(get, &[]), 144 + WRITE_CHECK_SLACK);
        let set = def(FdKind::Vcpu, nr::KVM_SET_REGS);
        assert_eq!(compared_len(set, &[0; 144]), 144 + WRITE_CHECK_SLACK);
        let msrs = def(FdKind::Vcpu, nr::KVM_GET_MSRS);
        // A count whose entries overflow the scratch: all of it.
        assert_eq!(compared_len(msrs, &u32::MAX.to_le_bytes()), SCRATCH_LEN);
    }

    #[test]
    fn write_extents_cover_results_and_counted_entries() {
        let regs = def(FdKind::Vcpu, nr::KVM_GET_REGS);
        assert_eq!(write_extent(regs, &[]), Some(144));
        let set = def(FdKind::Vcpu, nr::KVM_SET_REGS);
        assert_eq!(write_extent(set, &[]), Some(0));
        let msrs = def(FdKind::Vcpu, nr::KVM_GET_MSRS);
        assert_eq!(write_extent(msrs, &3u32.to_le_bytes()), Some(8 + 3 * 16));
        let cpuid = def(FdKind::System, nr::KVM_GET_SUPPORTED_CPUID);
        assert_eq!(write_extent(cpuid, &2u32.to_le_bytes()), Some(8 + 2 * 40));
        let list = def(FdKind::System, nr::KVM_GET_MSR_INDEX_LIST);
        assert_eq!(
            write_extent(list, &u32::MAX.to_le_bytes()),
            Some(4 + 4 * u32::MAX as usize)
        );
    }

    #[test]
    fn successes_the_abi_rules_out() {
        let get = def(FdKind::Vcpu, nr::KVM_GET_REGS);
        let set = def(FdKind::Vcpu, nr::KVM_SET_REGS);
        let none: &[u8] = &[];
        assert!(success_violation(get, Arg::Bad(BadPtr::Null, none), 0).is_some());
        assert!(success_violation(set, Arg::Bad(BadPtr::Unmapped, none), 0).is_some());
        assert!(success_violation(get, Arg::Bad(BadPtr::ReadOnly, none), 0).is_some());
        // A read-only page is fine for an argument the device only reads.
        assert!(success_violation(set, Arg::Bad(BadPtr::ReadOnly, none), 0).is_none());
        assert!(success_violation(set, Arg::Bad(BadPtr::Straddle(100), none), 0).is_some());
        assert!(success_violation(set, Arg::Bad(BadPtr::Straddle(144), none), 0).is_none());
        assert!(success_violation(get, Arg::Data(none), 0).is_none());
        assert!(success_violation(get, Arg::Data(none), 1).is_some());
    }

    #[test]
    fn counts_and_versions_are_checked() {
        let msrs = def(FdKind::Vcpu, nr::KVM_GET_MSRS);
        let two = 2u32.to_le_bytes();
        assert!(success_violation(msrs, Arg::Data(&two), 2).is_none());
        assert!(success_violation(msrs, Arg::Data(&two), 3).is_some());
        // No entries: nothing to write, so a read-only page may succeed.
        let zero = 0u32.to_le_bytes();
        assert!(success_violation(msrs, Arg::Bad(BadPtr::ReadOnly, &zero), 0).is_none());
        assert!(success_violation(msrs, Arg::Bad(BadPtr::ReadOnly, &two), 1).is_some());
        let api = def(FdKind::System, nr::KVM_GET_API_VERSION);
        assert!(success_violation(api, Arg::None, 12).is_none());
        assert!(success_violation(api, Arg::None, 11).is_some());
        let check = def(FdKind::System, nr::KVM_CHECK_EXTENSION);
        assert!(success_violation(check, Arg::Int(1), 4096).is_none());
    }
}
