//! Phase 2, race: threads against one VM.
//!
//! First `--threads` threads share a VM with 2 vCPUs (running an I/O loop),
//! its statistics fds and the system fd, and issue random ioctls on them at
//! once (`ops.rs`), a quarter of the ioctl budget between them. Exits of
//! shared vCPUs are checked for their reason only, since another thread's
//! run may rewrite kvm_run while it is read.
//!
//! Then scripted races, each repeated `--ioctls / 4000` times (1 to 20):
//! KVM_RUN of one vCPU from two threads at once; memory slots added,
//! moved and deleted, and their memory unmapped, protected and moved,
//! under a vCPU that reads and writes that memory in a loop; the vCPU fd,
//! the VM fd, both, or kvm_run closed or unmapped while another thread is
//! inside KVM_RUN (that thread then woken by a signal); and fork() while a
//! vCPU runs (`fork_child.rs`).
//!
//! Context: process context; the main thread and the threads it scopes.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_EXIT_MMIO};

use crate::cli::Phase;
use crate::ctx::{Ctx, Shared};
use crate::fixture::{self, Fixture};
use crate::ioctl_table::{self, nr, FdKind, Returns};
use crate::memory::{Access, Chunk};
use crate::modes::Mode;
use crate::objects::{adopt, Vcpu, Vm};
use crate::ops::{self, Info};
use crate::rng::Rng;
use crate::runner::{self, Checks};
use crate::tally::Tally;
use crate::watchdog::RemoteWatch;
use crate::{fork_child, stats_fd, sys, vcpu_mmap};

/// The stream of the race.
const STREAM: u64 = 2;

/// How a scripted race takes a running vCPU's objects away.
#[derive(Clone, Copy, Debug)]
enum Takeaway {
    VcpuFd,
    VmFd,
    Both,
    RunMapping,
}

impl Takeaway {
    fn label(self) -> &'static str {
        match self {
            Takeaway::VcpuFd => "close of the vCPU fd",
            Takeaway::VmFd => "close of the VM fd",
            Takeaway::Both => "close of the VM and vCPU fds",
            Takeaway::RunMapping => "munmap of kvm_run",
        }
    }
}

/// Runs the phase with `budget` random ioctls.
pub fn run(shared: &Shared, budget: u64) -> Tally {
    let seed = shared.opts.seed;
    let Ok(mut main) = Ctx::new(
        shared,
        Phase::Race,
        Rng::stream(seed, &[STREAM, 1 << 20]),
        // "race thread 99": the main thread's scripted races.
        Some(99),
    ) else {
        eprintln!("rkvm-fuzz: race: no scratch mapping");
        return Tally::default();
    };
    let start = Instant::now();
    let mut total = random_threads(&mut main, budget);
    crate::report_progress("race (threads)", total.ioctls(), budget, start);
    let reps = (shared.opts.ioctls / 4000).clamp(1, 20);
    for rep in 0..reps {
        main.step = rep;
        main.rng = Rng::stream(seed, &[STREAM, 1 << 21, rep]);
        double_run(&mut main, rep % 2 == 0);
        slot_churn(&mut main);
        for how in [
            Takeaway::VcpuFd,
            Takeaway::VmFd,
            Takeaway::Both,
            Takeaway::RunMapping,
        ] {
            takeaway(&mut main, how);
        }
        fork_child::fork_while_running(&mut main);
    }
    crate::report_progress("race (scripted)", reps, reps, start);
    total.merge(&main.tally);
    total
}

/// The random-ioctl threads.
fn random_threads(main: &mut Ctx<'_>, budget: u64) -> Tally {
    let shared = main.shared;
    let mut total = Tally::default();
    let Some(f) = Fixture::new(main, Mode::Real, &fixture::IO_LOOP, 2) else {
        return total;
    };
    let mut stats: Vec<OwnedFd> = Vec::new();
    let mut fds = vec![f.vm.raw()];
    fds.extend(f.vm.vcpus.iter().map(Vcpu::raw));
    for (i, &fd) in fds.iter().enumerate() {
        let kind = if i == 0 { FdKind::Vm } else { FdKind::Vcpu };
        let call = crate::ctx::Call::new(fd, kind, nr::KVM_GET_STATS_FD, crate::ctx::Arg::None);
        stats.extend(main.ioctl(call).ok().and_then(adopt));
    }
    let chunks: Vec<Chunk> = (0..3)
        .filter_map(|_| shared.arena.chunk(1 << 20).ok())
        .collect();
    let mut list: Vec<(u64, usize)> = chunks.iter().map(|c| (c.addr(), c.len())).collect();
    list.push((f.ram.addr(), f.ram.len()));
    let stats_fds: Vec<RawFd> = stats.iter().map(|s| s.as_raw_fd()).collect();
    let threads = shared.opts.threads;
    let per_thread = budget / threads as u64;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (f, list, stats_fds) = (&f, &list, &stats_fds);
                s.spawn(move || random_thread(shared, t, per_thread, f, list, stats_fds))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(t) => total.merge(&t),
                Err(_) => eprintln!("rkvm-fuzz: race: a thread panicked"),
            }
        }
    });
    drop(stats);
    drop(f);
    drop(chunks);
    total
}

fn random_thread(
    shared: &Shared,
    t: usize,
    budget: u64,
    f: &Fixture,
    chunks: &[(u64, usize)],
    stats: &[RawFd],
) -> Tally {
    let seed = shared.opts.seed;
    let Ok(mut ctx) = Ctx::new(
        shared,
        Phase::Race,
        Rng::stream(seed, &[STREAM, t as u64]),
        Some(t),
    ) else {
        return Tally::default();
    };
    let vm = &f.vm;
    for step in 0..budget.saturating_mul(4) + 10 {
        if ctx.tally.ioctls() >= budget {
            break;
        }
        ctx.step = step;
        let (fd, kind, run) = match ctx.rng.weighted(&[10, 25, 55, 10]) {
            0 => (shared.dev.fd(), FdKind::System, None),
            1 => (vm.raw(), FdKind::Vm, None),
            2 if !vm.vcpus.is_empty() => {
                let c = &vm.vcpus[ctx.rng.index(vm.vcpus.len())];
                (c.raw(), FdKind::Vcpu, c.run.as_ref())
            }
            _ if !stats.is_empty() => (*ctx.rng.pick(stats), FdKind::Stats, None),
            _ => continue,
        };
        let info = Info {
            slots: &vm.slots,
            chunks,
            next_vcpu_id: 2,
            run,
            checks: Checks::ReasonOnly,
        };
        let issued = match (ctx.rng.weighted(&[60, 12, 8, 5, 8, 7]), kind) {
            (4, FdKind::Stats) => {
                stats_fd::odd_read(&mut ctx, fd);
                continue;
            }
            (5, FdKind::Vcpu) => {
                vcpu_mmap::odd_mmap(&mut ctx, fd);
                continue;
            }
            (0 | 5, FdKind::Stats) | (1, _) => ops::bent(&mut ctx, fd, kind, &info),
            (0 | 4 | 5, _) => {
                let defs: Vec<_> = ioctl_table::for_kind(kind).collect();
                let def = *ctx.rng.pick(&defs);
                ops::known(&mut ctx, fd, kind, def, &info)
            }
            (2, _) => ops::random_kvmio(&mut ctx, fd, kind, &info),
            _ => ops::random32(&mut ctx, fd, kind, &info),
        };
        // A new fd is this thread's alone: close it at once.
        if let (Some(n), Ok(v)) = (issued.nr, issued.result) {
            if ioctl_table::lookup(kind, n).is_some_and(|d| d.returns == Returns::Fd) {
                drop(adopt(v));
            }
        }
    }
    ctx.tally
}

/// Runs `f` on a new thread of the scope with its own context; the result
/// goes into `main`'s tally.
fn helper<'s, 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    main: &Ctx<'e>,
    id: usize,
    f: impl FnOnce(&mut Ctx<'e>) + Send + 's,
) -> std::thread::ScopedJoinHandle<'s, Tally> {
    let shared = main.shared;
    let rng = Rng::stream(shared.opts.seed, &[STREAM, 1 << 22, main.step, id as u64]);
    s.spawn(move || match Ctx::new(shared, Phase::Race, rng, Some(id)) {
        Ok(mut ctx) => {
            f(&mut ctx);
            ctx.tally
        }
        Err(_) => Tally::default(),
    })
}

fn join_into(main: &mut Ctx<'_>, h: std::thread::ScopedJoinHandle<'_, Tally>) {
    match h.join() {
        Ok(t) => main.tally.merge(&t),
        Err(_) => eprintln!("rkvm-fuzz: race: a thread panicked"),
    }
}

/// KVM_RUN of one vCPU from two threads at once, on an I/O loop (short
/// runs) or a spin loop (one thread inside the guest, the other waiting).
fn double_run(main: &mut Ctx<'_>, spin: bool) {
    let code: &[u8] = if spin {
        &fixture::SPIN
    } else {
        &fixture::IO_LOOP
    };
    let Some(f) = Fixture::new(main, Mode::Real, code, 1) else {
        return;
    };
    let vcpu = &f.vm.vcpus[0];
    let (runs, bound) = if spin {
        (4, Duration::from_millis(5))
    } else {
        (30, Duration::from_millis(20))
    };
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|k| {
                helper(s, main, 10 + k, move |ctx| {
                    for _ in 0..runs {
                        let _ = runner::run(
                            ctx,
                            vcpu.raw(),
                            vcpu.run.as_ref(),
                            bound,
                            false,
                            Checks::ReasonOnly,
                        );
                    }
                })
            })
            .collect();
        for h in hs {
            join_into(main, h);
        }
    });
    main.tally
        .note("scripted races: KVM_RUN of one vCPU from two threads");
}

/// Slots and their memory changing under a vCPU that uses them.
fn slot_churn(main: &mut Ctx<'_>) {
    let Some(mut f) = Fixture::new(main, Mode::Protected, &fixture::MEMORY_LOOP, 1) else {
        return;
    };
    let Some(vcpu) = f.vm.vcpus.pop() else { return };
    let mut data: Vec<Chunk> = (0..2)
        .filter_map(|_| main.shared.arena.chunk(1 << 20).ok())
        .collect();
    if data.len() < 2 {
        return;
    }
    let slot = |gpa: u64, c: &Chunk| kvm_userspace_memory_region {
        slot: 1,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: 1 << 20,
        userspace_addr: c.addr(),
    };
    let _ =
        f.vm.set_region(main, slot(fixture::MEMORY_LOOP_GPA, &data[0]));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (vcpu, stop) = (&vcpu, &stop);
        let h = helper(s, main, 20, move |ctx| {
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match runner::run(
                    ctx,
                    vcpu.raw(),
                    vcpu.run.as_ref(),
                    Duration::from_millis(20),
                    false,
                    Checks::Full,
                ) {
                    Ok(Some(e)) if e.reason == KVM_EXIT_MMIO && e.mmio.is_write == 0 => {
                        if let Some(r) = vcpu.run.as_ref() {
                            r.answer_mmio(&[0x5a; 8]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    _ => {}
                }
            }
        });
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1));
            let i = main.rng.index(2);
            let (what, ok) = match main.rng.below(8) {
                0 => (
                    "slot deleted under a running vCPU",
                    f.vm.set_region(
                        main,
                        kvm_userspace_memory_region {
                            memory_size: 0,
                            ..slot(0, &data[i])
                        },
                    )
                    .is_ok(),
                ),
                1 | 2 => (
                    "slot added under a running vCPU",
                    f.vm.set_region(main, slot(fixture::MEMORY_LOOP_GPA, &data[i]))
                        .is_ok(),
                ),
                3 => (
                    "slot moved under a running vCPU",
                    f.vm.set_region(main, slot(0x40_0000, &data[i])).is_ok(),
                ),
                4 => (
                    "slot memory unmapped under a running vCPU",
                    data[i].unmap().is_ok(),
                ),
                5 => {
                    let to = *main.rng.pick(&[Access::None, Access::ReadOnly]);
                    (
                        "slot memory protected under a running vCPU",
                        data[i].protect(to).is_ok(),
                    )
                }
                6 => (
                    "slot memory re-created under a running vCPU",
                    data[i].protect(Access::ReadWrite).is_ok(),
                ),
                _ => (
                    "slot memory moved (mremap) under a running vCPU",
                    data[i].relocate(&main.shared.arena).is_ok(),
                ),
            };
            main.tally.file_op(what, ok);
        }
        stop.store(true, Ordering::Relaxed);
        join_into(main, h);
    });
    // The VM before its memory.
    drop(vcpu);
    drop(f);
    drop(data);
    main.tally
        .note("scripted races: slot churn under a running vCPU");
}

/// Waits (up to a second) until the thread behind `remote` is inside
/// KVM_RUN.
pub fn wait_until_running(remote: &RemoteWatch) {
    let end = Instant::now() + Duration::from_secs(1);
    while remote.current() != Some("KVM_RUN") && Instant::now() < end {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A vCPU fd, the VM fd, both, or kvm_run taken away while another thread
/// is inside KVM_RUN of a spinning guest; that thread is then woken by the
/// kick signal, and must return (the watchdog reports it if not).
fn takeaway(main: &mut Ctx<'_>, how: Takeaway) {
    let Some(f) = Fixture::new(main, Mode::Real, &fixture::SPIN, 1) else {
        return;
    };
    let Fixture { vm, ram, .. } = f;
    let Vm {
        vcpus, fd: vm_fd, ..
    } = vm;
    let Some(Vcpu {
        run,
        fd: vcpu_fd,
        stats,
    }) = vcpus.into_iter().next()
    else {
        return;
    };
    let (mut vm_fd, mut vcpu_fd, mut run) = (Some(vm_fd), Some(vcpu_fd), run);
    let raw = vcpu_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
    let (tx, rx) = mpsc::channel();
    let returned = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (returned, done) = (&returned, &done);
        let h = helper(s, main, 30, move |ctx| {
            let _ = tx.send((sys::this_thread(), ctx.watch().remote()));
            // No kvm_run for the watchdog to write: it may be unmapped.
            let _ = runner::run(
                ctx,
                raw,
                None,
                Duration::from_millis(500),
                false,
                Checks::Full,
            );
            returned.store(true, Ordering::Relaxed);
            // Stay until the main thread is done signalling this thread.
            let end = Instant::now() + Duration::from_secs(15);
            while !done.load(Ordering::Relaxed) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let Ok((thread, remote)) = rx.recv() else {
            return;
        };
        wait_until_running(&remote);
        std::thread::sleep(Duration::from_millis(main.rng.range(1, 5)));
        let label = how.label();
        main.watched(
            label,
            || format!("{label} while another thread is in KVM_RUN"),
            || match how {
                Takeaway::VcpuFd => drop(vcpu_fd.take()),
                Takeaway::VmFd => drop(vm_fd.take()),
                Takeaway::Both => {
                    drop(vcpu_fd.take());
                    drop(vm_fd.take());
                }
                Takeaway::RunMapping => drop(run.take()),
            },
        );
        std::thread::sleep(Duration::from_millis(1));
        let end = Instant::now() + Duration::from_secs(12);
        while !returned.load(Ordering::Relaxed) && Instant::now() < end {
            // SAFETY: the helper thread stays alive until `done` is set
            // below, and this is the only thread that sets it.
            unsafe { sys::kick(thread) };
            std::thread::sleep(Duration::from_millis(2));
        }
        done.store(true, Ordering::Relaxed);
        join_into(main, h);
    });
    drop((run, stats, vcpu_fd, vm_fd));
    drop(ram);
    main.tally.note(match how {
        Takeaway::VcpuFd => "scripted races: vCPU fd closed during KVM_RUN",
        Takeaway::VmFd => "scripted races: VM fd closed during KVM_RUN",
        Takeaway::Both => "scripted races: both fds closed during KVM_RUN",
        Takeaway::RunMapping => "scripted races: kvm_run unmapped during KVM_RUN",
    });
}
