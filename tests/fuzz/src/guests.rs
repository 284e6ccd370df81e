//! Phase 3, guests: random guests, one run after another. A VM (2 MiB of
//! RAM at 0, reused for 50 runs and reset in between, replaced early if
//! the device declares it dead with EIO) gets, for each run:
//!
//! - a start mode (real, 32-bit protected, 64-bit long; `modes.rs`) with
//!   its tables, and random code (`codegen.rs`);
//! - sometimes a second slot of 1 MiB elsewhere (the holes around it are
//!   MMIO), random data next to the code;
//! - the mode's KVM_SET_SREGS, perturbed a third of the time
//!   (`sregs.rs`): a state no CPU can be in must be refused with EINVAL;
//!   registers with random values and RFLAGS; sometimes single-step or
//!   software breakpoints (KVM_SET_GUEST_DEBUG);
//!
//! and then up to 50 KVM_RUNs: IN and MMIO reads are answered with
//! random data, HLT may get an interrupt (KVM_INTERRUPT), and the run ends
//! at SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR, any other exit, the fourth HLT
//! exit in a row (from there a guest only walks the HLT fill of
//! `--interrupts-on` one byte per exit, or halts again in its handlers:
//! such chains were 90 % of all KVM_RUNs and tested nothing new), an error, or
//! the time bound: the watchdog kicks a KVM_RUN still inside the guest
//! after `--guest-ms` (a random guest may loop forever), so a run takes at
//! most 50 times that.
//!
//! The bound applies to each KVM_RUN rather than to the run as a whole so
//! that the number of exits a guest makes does not depend on how fast the
//! device makes them (the host's KVM emulates real mode, and there some
//! exits take 5 to 10 ms; a bound on the whole run made a few runs in 500
//! end differently from one execution to the next). Only a guest that
//! runs for about `--guest-ms` between two exits can still do so. For
//! the same reason the guests get no interrupt window requests (KVM opens
//! the window wherever a host interrupt happens to stop the guest; the
//! storm asks for windows) and their code does not read the clock MSRs.
//! Each run draws from its own stream (seed, run), so a run that ended
//! differently does not change the runs after it.
//!
//! Context: process context, the main thread.

use std::time::Instant;

use kvm_bindings::*;

use crate::cli::Phase;
use crate::codegen;
use crate::ctx::{Arg, Call, Ctx, Shared};
use crate::exit::ExitView;
use crate::fixture::{self, Fixture};
use crate::ioctl_table::{nr, FdKind};
use crate::memory::Chunk;
use crate::modes::{self, layout, Mode};
use crate::rng::Rng;
use crate::runner::{self, Checks};
use crate::scratch::{bytes_of, from_bytes};
use crate::tally::Tally;
use crate::{ops, progress, sregs};

/// The stream of the guests phase.
const STREAM: u64 = 3;
/// Runs per VM.
const RUNS_PER_VM: u64 = 50;
/// KVM_RUNs per guest run.
const MAX_RUNS: usize = 50;
/// HLT exits in a row that end a guest run.
const MAX_HLT_CHAIN: usize = 4;

/// A VM and its optional second slot.
struct Machine {
    fixture: Fixture,
    extra: Option<Chunk>,
    dead: bool,
}

/// Runs the phase.
pub fn run(shared: &Shared, count: u64) -> Tally {
    let seed = shared.opts.seed;
    let Ok(mut ctx) = Ctx::new(shared, Phase::Guests, Rng::new(seed), None) else {
        eprintln!("rkvm-fuzz: guests: no scratch mapping");
        return Tally::default();
    };
    let start = Instant::now();
    let mut machine: Option<Machine> = None;
    let mut reported = 0;
    // `--trace-guest N` replays run N: from the first run of its VM, which
    // the runs before it in that VM may have left changed.
    let runs = match shared.opts.trace_guest {
        Some(n) => n - n % RUNS_PER_VM..n + 1,
        None => 0..count,
    };
    for run in runs {
        ctx.step = run;
        if run % RUNS_PER_VM == 0 || machine.as_ref().is_some_and(|m| m.dead) {
            // The old VM first (its slots point at memory dropped with it).
            drop(machine.take());
            ctx.rng = Rng::stream(seed, &[STREAM, run, 1]);
            machine =
                Fixture::new(&mut ctx, Mode::Real, &fixture::SPIN, 1).map(|fixture| Machine {
                    fixture,
                    extra: None,
                    dead: false,
                });
        }
        ctx.rng = Rng::stream(seed, &[STREAM, run]);
        match machine.as_mut() {
            Some(m) => one_run(&mut ctx, m),
            None => ctx
                .tally
                .note("guest runs without a VM (KVM_CREATE_VM or its setup failed)"),
        }
        let tenth = (run + 1) * 10 / count.max(1);
        if tenth > reported && tenth < 10 {
            reported = tenth;
            crate::report_progress("guests", run + 1, count, start);
        }
    }
    drop(machine);
    ctx.tally
}

/// One guest run (see the module doc).
fn one_run(ctx: &mut Ctx<'_>, m: &mut Machine) {
    let mode = *ctx.rng.pick(&Mode::ALL);
    let len = ctx.rng.range(64, 8192) as usize;
    let mut code = codegen::generate(&mut ctx.rng, mode, len);
    if ctx.shared.opts.interrupts_on {
        codegen::keep_interrupts_on(&mut code);
    }
    let trace = ctx.shared.opts.trace_guest == Some(ctx.step);
    if trace {
        let hex: String = code.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!(
            "rkvm-fuzz: guest run {} starts in {} mode; its code: {hex}",
            ctx.step,
            mode.name()
        );
    }
    if m.fixture.load(ctx, mode, &code).is_none() {
        m.dead = true;
        return;
    }
    if let Some(mem) = m.fixture.ram.bytes_mut() {
        if ctx.rng.chance(1, 2) {
            let data = (layout::CODE + layout::CODE_MAX) as usize;
            ctx.rng.fill(&mut mem[data..data + 0x1_0000]);
            if ctx.shared.opts.interrupts_on {
                // Data a guest may also jump into.
                codegen::keep_interrupts_on(&mut mem[data..data + 0x1_0000]);
            }
        }
    }
    second_slot(ctx, m);
    ctx.tally.guest_run(mode.name());
    progress::guest_run();
    if !reset_vcpu(ctx, m, mode, code.len() as u64) {
        return;
    }
    let vcpu = &m.fixture.vm.vcpus[0];
    let Some(run) = vcpu.run.as_ref() else { return };
    let fd = vcpu.raw();
    let bound = ctx.shared.opts.guest_time;
    // `--interrupts-on`: the interrupt tables and stubs as loaded.
    let guarded: Vec<Vec<u8>> = match m.fixture.ram.bytes_mut() {
        Some(mem) if ctx.shared.opts.interrupts_on => modes::guarded(mode)
            .iter()
            .map(|r| mem[r.start as usize..r.end as usize].to_vec())
            .collect(),
        _ => Vec::new(),
    };
    let mut hlt_chain = 0;
    for _ in 0..MAX_RUNS {
        let result = runner::run(ctx, fd, Some(run), bound, false, Checks::Full);
        if trace {
            trace_run(ctx, fd, &result);
        }
        let exit = match result {
            Ok(Some(exit)) => exit,
            Err(libc::EINTR) => {
                ctx.tally
                    .note("guest runs ended by the time bound (the guest ran on without an exit)");
                if ctx.shared.opts.interrupts_on && run.snapshot().is_ok_and(|r| r.if_flag == 0) {
                    // What `--interrupts-on` exists to prevent: a device
                    // that needs IF to take its CPU back (KVM under Bochs)
                    // would have hung here. Counted, to keep the mode honest.
                    ctx.tally.note(IF_CLEAR_AT_BOUND);
                }
                break;
            }
            Err(libc::EIO) => {
                m.dead = true;
                break;
            }
            _ => break,
        };
        if !guarded.is_empty() && !tables_intact(&m.fixture.ram, mode, &guarded) {
            ctx.tally.note(
                "guest runs ended when the guest wrote over its interrupt tables (--interrupts-on)",
            );
            break;
        }
        hlt_chain = if exit.reason == KVM_EXIT_HLT {
            hlt_chain + 1
        } else {
            0
        };
        if hlt_chain == MAX_HLT_CHAIN {
            break;
        }
        let go_on = match exit.reason {
            KVM_EXIT_IO => {
                if u32::from(exit.io.direction) == KVM_EXIT_IO_IN {
                    if let Some(range) = exit.io_data(run.len()) {
                        let mut data = vec![0u8; range.len()];
                        ctx.rng.fill(&mut data);
                        let _ = run.write(range.start, &data);
                    }
                }
                true
            }
            KVM_EXIT_MMIO => {
                if exit.mmio.is_write == 0 {
                    let mut data = [0u8; 8];
                    ctx.rng.fill(&mut data);
                    run.answer_mmio(&data[..exit.mmio.len.min(8) as usize]);
                }
                true
            }
            KVM_EXIT_HLT => {
                if exit.ready_for_interrupt && exit.if_flag && ctx.rng.chance(2, 3) {
                    let irq = kvm_interrupt {
                        irq: ctx.rng.range(0x20, 0xff) as u32,
                    };
                    let _ = ctx.ioctl(Call::new(
                        fd,
                        FdKind::Vcpu,
                        nr::KVM_INTERRUPT,
                        Arg::Data(bytes_of(&irq)),
                    ));
                }
                true
            }
            KVM_EXIT_DEBUG => true,
            _ => false,
        };
        if !go_on {
            break;
        }
    }
}

/// Whether the interrupt tables and stubs of `mode` still hold what
/// `loaded` says they held at the start of the run.
fn tables_intact(ram: &Chunk, mode: Mode, loaded: &[Vec<u8>]) -> bool {
    let Some(mem) = ram.bytes() else { return true };
    modes::guarded(mode)
        .iter()
        .zip(loaded)
        .all(|(r, was)| mem[r.start as usize..r.end as usize] == was[..])
}

/// The note of a guest run that the time bound ended with IF clear.
pub const IF_CLEAR_AT_BOUND: &str =
    "guest runs ended by the time bound with IF clear (--interrupts-on did not hold)";

/// `--trace-guest`: one KVM_RUN of the traced run and where the guest is.
fn trace_run(ctx: &mut Ctx<'_>, fd: std::os::fd::RawFd, result: &Result<Option<ExitView>, i32>) {
    let outcome = match result {
        Ok(Some(exit)) => crate::exit::name(exit.reason),
        Ok(None) => "no kvm_run".to_string(),
        Err(e) => format!("errno {e}"),
    };
    let get = |ctx: &mut Ctx<'_>, nr| {
        ctx.ioctl(Call::new(fd, FdKind::Vcpu, nr, Arg::Data(&[])))
            .ok()
            .map(|_| ctx.scratch.bytes().to_vec())
    };
    let regs: Option<kvm_regs> = get(ctx, nr::KVM_GET_REGS).map(|b| from_bytes(&b));
    let sregs: Option<kvm_sregs> = get(ctx, nr::KVM_GET_SREGS).map(|b| from_bytes(&b));
    match (regs, sregs) {
        (Some(r), Some(s)) => eprintln!(
            "rkvm-fuzz:   KVM_RUN: {outcome}; cs {:#x} (base {:#x}) rip {:#x} rflags {:#x} cr0 {:#x} efer {:#x}",
            s.cs.selector, s.cs.base, r.rip, r.rflags, s.cr0, s.efer
        ),
        _ => eprintln!("rkvm-fuzz:   KVM_RUN: {outcome}; registers unreadable"),
    }
}

/// Adds, moves or removes a second slot of 1 MiB (slot 1).
fn second_slot(ctx: &mut Ctx<'_>, m: &mut Machine) {
    if m.extra.is_none() {
        m.extra = ctx.shared.arena.chunk(1 << 20).ok();
    }
    let Some(extra) = m.extra.as_ref() else {
        return;
    };
    let gpa = *ctx.rng.pick(&[
        0x20_0000,
        0x40_0000,
        0x1000_0000,
        0xc000_0000,
        0xfe00_0000,
        0x1_0000_0000,
    ]);
    let size = if ctx.rng.chance(2, 3) { 0 } else { 1 << 20 };
    let r = kvm_userspace_memory_region {
        slot: 1,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: extra.addr(),
    };
    if size == 0 && !m.fixture.vm.slots.contains_key(&1) {
        return;
    }
    if size != 0 && m.fixture.vm.slots.contains_key(&1) {
        // A slot moves by deletion and re-creation (or in place, which KVM
        // allows for the guest address only).
        let del = kvm_userspace_memory_region {
            memory_size: 0,
            ..r
        };
        let _ = m.fixture.vm.set_region(ctx, del);
    }
    let _ = m.fixture.vm.set_region(ctx, r);
}

/// Sets the vCPU up for a run in `mode`; false if the device refuses the
/// plain state (the VM is then replaced).
fn reset_vcpu(ctx: &mut Ctx<'_>, m: &mut Machine, mode: Mode, code_len: u64) -> bool {
    let fd = m.fixture.vm.vcpus[0].raw();
    // No pending exception, interrupt or NMI from the last run.
    let events = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    let _ = ctx.ioctl(Call::new(
        fd,
        FdKind::Vcpu,
        nr::KVM_SET_VCPU_EVENTS,
        Arg::Data(bytes_of(&events)),
    ));
    let control = match ctx.rng.below(10) {
        0 => KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        1 => KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
        _ => 0,
    };
    let debug = kvm_guest_debug {
        control,
        ..Default::default()
    };
    let _ = ctx.ioctl(Call::new(
        fd,
        FdKind::Vcpu,
        nr::KVM_SET_GUEST_DEBUG,
        Arg::Data(bytes_of(&debug)),
    ));
    let plain = modes::sregs(mode, &m.fixture.reset_sregs);
    let mut s = plain;
    let perturbed = ctx.rng.chance(1, 3);
    if perturbed {
        sregs::perturb(&mut ctx.rng, &mut s);
    }
    let result = ctx.ioctl(Call::new(
        fd,
        FdKind::Vcpu,
        nr::KVM_SET_SREGS,
        Arg::Data(bytes_of(&s)),
    ));
    if perturbed {
        ops::check_set_sregs(ctx, &s, result);
    }
    if result.is_err() {
        ctx.tally
            .note("guest runs whose perturbed KVM_SET_SREGS was refused");
        if ctx
            .ioctl(Call::new(
                fd,
                FdKind::Vcpu,
                nr::KVM_SET_SREGS,
                Arg::Data(bytes_of(&plain)),
            ))
            .is_err()
        {
            m.dead = true;
            return false;
        }
    }
    let entry = if ctx.rng.chance(3, 4) {
        0
    } else {
        ctx.rng.below(code_len.max(1))
    };
    let regs = modes::regs(mode, entry, &mut ctx.rng);
    ctx.ioctl(Call::new(
        fd,
        FdKind::Vcpu,
        nr::KVM_SET_REGS,
        Arg::Data(bytes_of(&regs)),
    ))
    .is_ok()
}
