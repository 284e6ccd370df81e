//! Phase 4, teardown: 100 VMs built up (vCPUs, kvm_run and odd mappings,
//! statistics fds, guest memory under slots, a short run) and torn down in
//! a random order: a VM fd before its vCPUs, a vCPU fd before its mapping,
//! guest memory before the slot's VM. One in twenty is left open for the
//! kernel to close at process exit. Every close and munmap is watched: a
//! device that blocks in its release path is a hang.
//!
//! Then VMMs killed in the middle of KVM_RUN: a child process (this
//! program with `--kill-target`) runs a spinning guest on 1 vCPU, then on 2
//! vCPU threads, is SIGKILLed once every vCPU is in KVM_RUN, and must be
//! reaped within 10 s.
//!
//! Context: process context, the main thread.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::Phase;
use crate::ctx::{Arg, Call, Ctx, Shared};
use crate::ioctl_table::{nr, FdKind};
use crate::memory::Chunk;
use crate::objects::{adopt, RunPage, Vm};
use crate::rng::Rng;
use crate::runner::{self, Checks};
use crate::sys::{self, DeviceMapping};
use crate::tally::Tally;
use crate::{region, stats_fd};

/// The stream of the teardown.
const STREAM: u64 = 4;
/// VMs built and torn down.
const VMS: u64 = 100;
/// How long a killed VMM may take to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(10);

/// Something to release.
enum Object {
    VmFd(OwnedFd),
    VcpuFd(OwnedFd),
    Run(RunPage),
    Stats(OwnedFd),
    Memory(Chunk),
    Mapping(DeviceMapping),
}

impl Object {
    /// Releases the object: close or munmap, by its drop.
    fn release(self) {
        match self {
            Object::VmFd(f) | Object::VcpuFd(f) | Object::Stats(f) => drop(f),
            Object::Run(r) => drop(r),
            Object::Memory(c) => drop(c),
            Object::Mapping(m) => drop(m),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Object::VmFd(_) => "close of a VM fd",
            Object::VcpuFd(_) => "close of a vCPU fd",
            Object::Run(_) => "munmap of kvm_run",
            Object::Stats(_) => "close of a stats fd",
            Object::Memory(_) => "munmap of guest memory",
            Object::Mapping(_) => "munmap of a vCPU mapping",
        }
    }
}

/// Runs the phase.
pub fn run(shared: &Shared) -> Tally {
    let seed = shared.opts.seed;
    let Ok(mut ctx) = Ctx::new(shared, Phase::Teardown, Rng::new(seed), None) else {
        eprintln!("rkvm-fuzz: teardown: no scratch mapping");
        return Tally::default();
    };
    let start = Instant::now();
    for i in 0..VMS {
        ctx.step = i;
        ctx.rng = Rng::stream(seed, &[STREAM, i]);
        let objects = build(&mut ctx);
        if ctx.rng.chance(1, 20) {
            ctx.tally
                .note("VMs left open for the kernel to close at exit");
            std::mem::forget(objects);
        } else {
            release(&mut ctx, objects);
        }
        if (i + 1) % (VMS / 2) == 0 && i + 1 < VMS {
            crate::report_progress("teardown", i + 1, VMS, start);
        }
    }
    for vcpus in [1, 2] {
        ctx.step = VMS + u64::from(vcpus);
        kill_in_run(&mut ctx, vcpus);
    }
    ctx.tally
}

/// A VM with everything around it, as a list of objects to release.
fn build(ctx: &mut Ctx<'_>) -> Vec<Object> {
    let mut out = Vec::new();
    let Some(mut vm) = Vm::create(ctx, ctx.shared.dev.fd()) else {
        return out;
    };
    for _ in 0..ctx.rng.range(1, 3) {
        let Ok(c) = ctx
            .shared
            .arena
            .chunk(*ctx.rng.pick(&[64 << 10, 1 << 20, 2 << 20]))
        else {
            continue;
        };
        let bounds = region::Bounds {
            base: ctx.shared.arena.base(),
            end: ctx.shared.arena.base() + ctx.shared.arena.size(),
        };
        let r = region::vet(
            kvm_bindings::kvm_userspace_memory_region {
                slot: vm.slots.len() as u32,
                flags: 0,
                guest_phys_addr: (vm.slots.len() as u64) << 24,
                memory_size: c.len() as u64,
                userspace_addr: c.addr(),
            },
            bounds,
        );
        let _ = vm.set_region(ctx, r);
        out.push(Object::Memory(c));
    }
    for id in 0..ctx.rng.below(4) {
        vm.add_vcpu(ctx, id);
    }
    if ctx.rng.chance(1, 2) {
        stats(ctx, vm.raw(), FdKind::Vm, &mut out);
    }
    let Vm { vcpus, fd, .. } = vm;
    for (k, v) in vcpus.into_iter().enumerate() {
        if k == 0 {
            let imm = ctx.rng.chance(1, 2);
            let _ = runner::run(
                ctx,
                v.raw(),
                v.run.as_ref(),
                Duration::from_millis(1),
                imm,
                Checks::Full,
            );
        }
        if ctx.rng.chance(1, 2) {
            stats(ctx, v.raw(), FdKind::Vcpu, &mut out);
        }
        if ctx.rng.chance(1, 3) {
            let len = ctx.shared.dev.mmap_size;
            let m = DeviceMapping::new(v.raw(), len, libc::PROT_READ, libc::MAP_SHARED, 0);
            ctx.tally.file_op("mmap vcpu (extra)", m.is_ok());
            out.extend(m.ok().map(Object::Mapping));
        }
        out.extend(v.run.map(Object::Run));
        out.extend(v.stats.into_iter().map(Object::Stats));
        out.push(Object::VcpuFd(v.fd));
    }
    out.push(Object::VmFd(fd));
    out
}

fn stats(ctx: &mut Ctx<'_>, fd: i32, kind: FdKind, out: &mut Vec<Object>) {
    let Some(s) = ctx
        .ioctl(Call::new(fd, kind, nr::KVM_GET_STATS_FD, Arg::None))
        .ok()
        .and_then(adopt)
    else {
        return;
    };
    stats_fd::check_image(ctx, s.as_raw_fd());
    out.push(Object::Stats(s));
}

/// Releases `objects` in a random order, each under the watchdog.
fn release(ctx: &mut Ctx<'_>, mut objects: Vec<Object>) {
    while !objects.is_empty() {
        let o = objects.swap_remove(ctx.rng.index(objects.len()));
        let name = o.name();
        ctx.watched(
            name,
            || format!("{name} in a random teardown order"),
            || o.release(),
        );
        ctx.tally.file_op(name, true);
    }
}

/// A VMM SIGKILLed while `vcpus` threads are in KVM_RUN must be reaped.
fn kill_in_run(ctx: &mut Ctx<'_>, vcpus: u32) {
    let Ok(exe) = std::env::current_exe() else {
        ctx.tally
            .note("kill tests skipped: no path to this program");
        return;
    };
    let mut args = vec![
        "--kill-target".to_string(),
        vcpus.to_string(),
        "--dev".to_string(),
        ctx.shared.dev.path.clone(),
    ];
    if ctx.shared.opts.interrupts_on {
        args.push("--interrupts-on".to_string());
    }
    let child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        ctx.tally
            .note("kill tests skipped: the child did not start");
        return;
    };
    let ready = child.stdout.as_ref().map_or(0, |o| {
        sys::read_n(o.as_raw_fd(), vcpus as usize, REAP_LIMIT)
    });
    if ready < vcpus as usize {
        ctx.tally
            .note("kill tests whose child did not get every vCPU into KVM_RUN");
    }
    // Let every vCPU get into the guest.
    std::thread::sleep(Duration::from_millis(20));
    let _ = child.kill();
    let end = Instant::now() + REAP_LIMIT;
    let reaped = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    ctx.tally.note(if vcpus == 1 {
        "VMMs killed in KVM_RUN (1 vCPU)"
    } else {
        "VMMs killed in KVM_RUN (2 vCPU threads)"
    });
    if !reaped {
        ctx.finding("a SIGKILLed VMM could not be reaped", || {
            format!("{vcpus} vCPU thread(s) in KVM_RUN of a spinning guest, not reaped {} s after SIGKILL", REAP_LIMIT.as_secs())
        });
    }
}
