//! `rkvm-fuzz --dev PATH [--seed N] [--ioctls N] [--guests N] [--threads N]
//! [--guest-ms MS] [--phases LIST] [--interrupts-on] [--trace-guest N] [--verbose]`
//!
//! Drives a KVM-like device (/dev/rkvm or /dev/kvm: the same checks hold
//! on both) with the input of a hostile VMM and of random guests, from a
//! seed, and reports what it did and every thing the device must never do.
//! Kernel-side crashes (BUG, Oops, WARNING, hung tasks) are for the test
//! harness to catch in dmesg; the fuzzer's part is to drive the device
//! hard, never crash or hang itself, and flag the ABI violations it can
//! see from userspace.
//!
//! # Options
//! - `--dev PATH`: the device (required).
//! - `--seed N` (1): every random choice follows from it. The storm and
//!   guests phases make the same calls for the same seed; each of their
//!   steps has its own stream, so a finding's "seed S, phase step N" names
//!   where it happened. What cannot repeat exactly is a KVM_RUN that ends
//!   about when its time bound does: the storm's exits may then differ
//!   (not its calls), and a guest run may make a different number of
//!   KVM_RUNs (see `guests.rs`).
//! - `--ioctls N` (20000): random ioctls of the storm (three quarters, one
//!   thread) and the race (a quarter, shared by the threads); the race's
//!   scripted races repeat N/4000 times (1 to 20).
//! - `--guests N` (500): random guest runs.
//! - `--threads N` (4): threads of the race.
//! - `--guest-ms MS` (20): how long a guest may run without an exit; a
//!   guest run is at most 50 KVM_RUNs, so at most 50 times this. Storm and
//!   race runs get a tenth of it. The watchdog ends a KVM_RUN at its bound by
//!   setting `immediate_exit` and signalling the thread (KVM_RUN returns
//!   EINTR), since a random guest may loop forever.
//! - `--phases LIST` (storm,race,guests,teardown): a comma list; they run
//!   in this order.
//! - `--verbose`: print each finding when it is first seen.
//! - `--interrupts-on`: guests always run with RFLAGS.IF set (every
//!   KVM_SET_REGS and synced register state sets it; guest code has no
//!   CLI, POPF or IRET), for a device that cannot take its vCPU back from a
//!   guest with interrupts off: KVM under Bochs, where external interrupts
//!   do not exit while IF is 0 (the CPU would be lost to such a guest).
//!   A guest run that still reaches its time bound with IF clear is
//!   counted in the report's notes ("... IF clear ...").
//! - `--trace-guest N`: replay guest run N of the seed (a finding's
//!   "guests step N"): the guests phase runs only N's VM up to N (the runs
//!   before it in that VM may have left it changed), prints N's code in
//!   hex and, for each of its KVM_RUNs, the exit and where the guest
//!   stands. With `--phases guests` it takes seconds.
//!
//! # Phases
//! - storm (`storm.rs`): a pool of VMs, vCPUs, kvm_run mappings, stats fds
//!   and guest memory takes random ioctls (known, bent, random numbers;
//!   boundary, random, mutated and bad-pointer arguments), object churn,
//!   adversarial memory slots with their memory unmapped, protected and
//!   moved underneath, stats reads, odd mmaps, and short runs.
//! - race (`race.rs`, `fork_child.rs`): threads on one VM's fds at once,
//!   then scripted races: one vCPU run from two threads, slot churn under a
//!   running guest, fds closed and kvm_run unmapped during KVM_RUN, fork
//!   while a vCPU runs.
//! - guests (`guests.rs`): random code in real, protected and long mode,
//!   with perturbed system state; exits answered like a VMM would.
//! - teardown (`teardown.rs`): 100 VMs torn down in random orders; VMMs
//!   SIGKILLed inside KVM_RUN.
//!
//! # What is a finding
//! - a call that does not return within 10 s ("hang in ..."); after 60 s
//!   the run gives up with a partial report and exit status 1;
//! - an errno no kernel may return (ERESTARTSYS, ERESTARTNOINTR,
//!   ERESTARTNOHAND, ENOIOCTLCMD, ERESTART_RESTARTBLOCK, above 133, or none
//!   with a -1 result), or a result below -1;
//! - a known ioctl succeeding wrongly: a result other than 0 where 0 is
//!   the answer, more entries than given, an API version other than 12, an
//!   argument pointer to no memory, a result into a read-only page, a
//!   struct running into an unmapped page; writing outside what it may
//!   write; a known number with other direction or size bits accepted;
//!   KVM_SET_SREGS accepting (or refusing other than with EINVAL) a state
//!   no CPU can be in; KVM_SET_CPUID2 refusing the device's own supported
//!   table;
//! - KVM_RUN returning 0 with an exit reason the ABI does not define or of
//!   another architecture, a KVM_EXIT_IO with a size other than 1, 2 or 4,
//!   a direction other than 0 or 1, a count of 0, or data beyond the
//!   vCPU mapping; a KVM_EXIT_MMIO of length 0 or over 8; an
//!   INTERNAL_ERROR with more than 16 data words; an unreadable kvm_run;
//! - a stats file whose header, id or descriptors do not fit the file, a
//!   read of one returning more than asked or more than the buffer holds;
//! - a vCPU mapping at offset 0 unreadable within KVM_GET_VCPU_MMAP_SIZE;
//! - a fork child blocked in an ioctl on its parent's fds, or not
//!   reapable; a SIGKILLed VMM not reaped within 10 s;
//! - the fuzzer faulting on its own memory (the device corrupted the VMM):
//!   reported at once, with the report's first and last lines.
//!
//! # Output
//! One progress line per phase (and per tenth of a long one) on stderr;
//! the report on stdout, from `rkvm-fuzz: seed S: I ioctls, G guest runs,
//! F findings` to `rkvm-fuzz: PASS` or `rkvm-fuzz: FAIL (F findings)`.
//! Exit status 0 without findings, 1 with findings, 2 for a usage error or
//! a device that cannot be opened.
//!
//! # Limits
//! - Numbers of KVM ioctls rkvm lacks that would hurt the fuzzer or fake a
//!   finding on /dev/kvm are never issued (`ioctl_table::deny`).
//! - A slot larger than 32 GiB goes with a misaligned userspace address,
//!   so the device refuses it before allocating anything (`region.rs`).
//! - `--kill-target VCPUS --dev PATH` is internal: the VMM the teardown
//!   phase kills (`kill_target.rs`).
//!
//! Context: a userspace program; the fuzzer's own memory is never handed
//! to the device (`scratch.rs`, `memory.rs`).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli::{Command, Phase};
use ctx::Shared;
use findings::Findings;
use tally::Tally;

mod arch;
mod args;
mod cli;
mod codegen;
mod ctx;
mod device;
mod errno;
mod exit;
mod fault;
mod findings;
mod fixture;
mod fork_child;
mod guests;
mod ioctl_table;
mod kill_target;
mod memcopy;
mod memory;
mod modes;
mod objects;
mod ops;
mod progress;
mod race;
mod region;
mod rng;
mod runner;
mod scratch;
mod sregs;
mod stats_fd;
mod storm;
mod sys;
mod tally;
mod teardown;
mod vcpu_mmap;
mod watchdog;

/// Prints a progress line on stderr.
pub fn report_progress(phase: &str, done: u64, total: u64, start: Instant) {
    let pct = done * 100 / total.max(1);
    eprintln!(
        "rkvm-fuzz: {phase}: {done}/{total} ({pct}%), {} ioctls so far, {} findings, {:.1} s",
        progress::ioctls(),
        progress::findings(),
        start.elapsed().as_secs_f64()
    );
}

/// What one phase did, for the report.
struct PhaseSummary {
    phase: Phase,
    ioctls: u64,
    guest_runs: u64,
    runs: u64,
    time: Duration,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match cli::parse(&args) {
        Ok(Command::Fuzz(o)) => o,
        Ok(Command::KillTarget {
            dev,
            vcpus,
            interrupts_on,
        }) => kill_target::serve(&dev, vcpus, interrupts_on),
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rkvm-fuzz: {e}\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    progress::set_seed(opts.seed);
    sys::install_handlers(fault::on_fault);
    let dev = match device::Device::open(&opts.dev) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rkvm-fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    let arena = match memory::Arena::reserve(if opts.interrupts_on {
        crate::cli::HLT
    } else {
        0
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "rkvm-fuzz: cannot reserve the guest memory arena: {}",
                errno::name(e)
            );
            return ExitCode::from(2);
        }
    };
    let findings = Arc::new(Mutex::new(Findings::default()));
    let for_give_up = Arc::clone(&findings);
    let watchdog = watchdog::Watchdog::start(
        Arc::clone(&findings),
        Box::new(move || for_give_up.lock().map(|f| f.render()).unwrap_or_default()),
    );
    let shared = Shared {
        opts,
        dev,
        arena,
        findings,
        watchdog,
    };
    let (total, phases, time) = fuzz(&shared);
    let (report, findings) = render(&shared, &total, &phases, time);
    print!("{report}");
    if findings == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the phases; returns the merged tally, each phase's summary and the
/// total time.
fn fuzz(shared: &Shared) -> (Tally, Vec<PhaseSummary>, Duration) {
    let o = &shared.opts;
    eprintln!(
        "rkvm-fuzz: seed {} on {}: {} ioctls, {} guest runs, {} threads, {} ms per guest, phases {}",
        o.seed,
        o.dev,
        o.ioctls,
        o.guests,
        o.threads,
        o.guest_time.as_millis(),
        o.phases.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
    );
    if shared.dev.mmap_size < std::mem::size_of::<kvm_bindings::kvm_run>() {
        shared.finding(
            "KVM_GET_VCPU_MMAP_SIZE is smaller than struct kvm_run",
            || format!("seed {}, setup: {} bytes", o.seed, shared.dev.mmap_size),
        );
    }
    let start = Instant::now();
    let mut total = Tally::default();
    let mut phases = Vec::new();
    for &phase in &o.phases {
        progress::set_phase(phase.progress_index());
        eprintln!("rkvm-fuzz: {}: starting", phase.name());
        let t0 = Instant::now();
        let race_too = o.phases.contains(&Phase::Race);
        let tally = match phase {
            Phase::Storm => storm::run(shared, storm::budget(o.ioctls, race_too)),
            Phase::Race => race::run(shared, o.ioctls - storm::budget(o.ioctls, true)),
            Phase::Guests => guests::run(shared, o.guests),
            Phase::Teardown => teardown::run(shared),
        };
        let s = PhaseSummary {
            phase,
            ioctls: tally.ioctls(),
            guest_runs: tally.guest_runs(),
            runs: tally.runs(),
            time: t0.elapsed(),
        };
        eprintln!(
            "rkvm-fuzz: {} done: {} ioctls, {} KVM_RUNs, {} guest runs, {} findings so far, {:.1} s",
            phase.name(),
            s.ioctls,
            s.runs,
            s.guest_runs,
            progress::findings(),
            s.time.as_secs_f64()
        );
        total.merge(&tally);
        phases.push(s);
    }
    (total, phases, start.elapsed())
}

/// The report (see the crate doc), and the number of findings in it.
fn render(
    shared: &Shared,
    total: &Tally,
    phases: &[PhaseSummary],
    time: Duration,
) -> (String, u64) {
    let findings = shared.findings.lock().unwrap_or_else(|e| e.into_inner());
    let n = findings.distinct() as u64;
    let dev = &shared.dev;
    let mut o = String::new();
    o.push_str(&progress::headline(
        shared.opts.seed,
        total.ioctls(),
        total.guest_runs(),
        n,
    ));
    o.push('\n');
    o.push_str(&format!(
        "device: {} (kvm_run mapping {} bytes, {} supported CPUID entries, {} MSRs listed)\n",
        dev.path,
        dev.mmap_size,
        dev.cpuid.len(),
        dev.msrs.len()
    ));
    for p in phases {
        o.push_str(&format!(
            "phase {}: {} ioctls, {} KVM_RUNs, {} guest runs, {:.1} s\n",
            p.phase.name(),
            p.ioctls,
            p.runs,
            p.guest_runs,
            p.time.as_secs_f64()
        ));
    }
    o.push_str(&format!("time: {:.1} s\n", time.as_secs_f64()));
    o.push_str(&total.render());
    o.push_str(&findings.render());
    o.push_str(&progress::verdict(n));
    o.push('\n');
    (o, n)
}
