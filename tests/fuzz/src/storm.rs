//! Phase 1, storm: one thread, most of the ioctl budget. A small pool of
//! live objects (1 to 3 VMs of up to 4 vCPUs each, their kvm_run
//! mappings, statistics fds, guest memory in the arena) takes random
//! operations, each step picking one:
//!
//! - a known ioctl with a built argument (`ops::known`), a bent number, a
//!   random number of KVM's type, a random 32-bit number;
//! - creating and closing objects (a VM with live vCPUs, a vCPU with a
//!   live mapping, a second system fd, a supported CPUID table);
//! - memory: adversarial slots (`region.rs`), and guest memory unmapped,
//!   protected, moved or re-created under the slots that use it;
//! - reads and seeks of statistics fds, odd mmaps of vCPU fds;
//! - a short KVM_RUN after random state setters, with kvm_run scribbled
//!   (sync-regs requests, interrupt window) a quarter of the time.
//!
//! Each step draws from its own stream (seed, step), so the same seed
//! makes the same calls, and a finding's step can be replayed. A new KVM
//! fd from a number rkvm lacks is closed (`Pool::close_stray`).
//!
//! Context: process context, the main thread.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::cli::Phase;
use crate::ctx::{Ctx, Shared};
use crate::ioctl_table::{self, nr, FdKind, IoctlDef, Returns};
use crate::memory::{Access, Chunk};
use crate::objects::{adopt, Vm};
use crate::ops::{self, Info};
use crate::rng::Rng;
use crate::runner::Checks;
use crate::scratch::from_bytes;
use crate::tally::Tally;
use crate::{device, region, stats_fd, vcpu_mmap};

/// The stream of the storm's steps.
const STREAM: u64 = 1;
const MAX_VMS: usize = 3;
const MAX_VCPUS: usize = 4;
const MAX_STATS: usize = 3;
const MAX_CHUNKS: usize = 8;

/// The objects the storm works on.
struct Pool {
    /// VMs (dropped before the memory their slots point at).
    vms: Vec<Vm>,
    /// Guest memory, shared by all VMs.
    chunks: Vec<Chunk>,
    /// System fds opened besides the device's own.
    systems: Vec<OwnedFd>,
}

/// An fd of the pool.
#[derive(Clone, Copy)]
enum Target {
    System(RawFd),
    Vm(usize),
    Vcpu(usize, usize),
    Stats(RawFd),
}

/// The share of `--ioctls` the storm gets when the race runs too.
pub fn budget(total: u64, race_too: bool) -> u64 {
    if race_too {
        total - total / 4
    } else {
        total
    }
}

/// Runs the storm.
pub fn run(shared: &Shared, budget: u64) -> Tally {
    let seed = shared.opts.seed;
    let mut ctx = match Ctx::new(shared, Phase::Storm, Rng::new(seed), None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rkvm-fuzz: storm: no scratch mapping (errno {e})");
            return Tally::default();
        }
    };
    let mut pool = Pool {
        vms: Vec::new(),
        chunks: Vec::new(),
        systems: Vec::new(),
    };
    let start = Instant::now();
    let mut reported = 0;
    let max_steps = budget.saturating_mul(4) + 100;
    for step in 0..max_steps {
        if ctx.tally.ioctls() >= budget {
            break;
        }
        ctx.step = step;
        ctx.rng = Rng::stream(seed, &[STREAM, step]);
        pool.ensure(&mut ctx);
        match ctx.rng.weighted(&[36, 8, 5, 3, 7, 9, 6, 4, 8]) {
            0 => known_op(&mut ctx, &mut pool),
            1 => unknown_op(&mut ctx, &mut pool, ops::bent),
            2 => unknown_op(&mut ctx, &mut pool, ops::random_kvmio),
            3 => unknown_op(&mut ctx, &mut pool, ops::random32),
            4 => lifecycle_op(&mut ctx, &mut pool),
            5 => memory_op(&mut ctx, &mut pool),
            6 => stats_op(&mut ctx, &mut pool),
            7 => mmap_op(&mut ctx, &mut pool),
            _ => run_op(&mut ctx, &mut pool),
        }
        let tenth = ctx.tally.ioctls() * 10 / budget.max(1);
        if tenth > reported && tenth < 10 {
            reported = tenth;
            crate::report_progress("storm", ctx.tally.ioctls(), budget, start);
        }
    }
    drop(pool);
    ctx.tally
}

impl Pool {
    /// Keeps at least one VM with one vCPU, and some guest memory.
    fn ensure(&mut self, ctx: &mut Ctx<'_>) {
        if self.vms.is_empty() {
            if let Some(vm) = Vm::create(ctx, ctx.shared.dev.fd()) {
                self.vms.push(vm);
            }
        }
        if self.vms.iter().all(|v| v.vcpus.is_empty()) {
            if let Some(vm) = self.vms.first_mut() {
                let id = vm.next_vcpu_id;
                vm.add_vcpu(ctx, id);
            }
        }
        if self.chunks.is_empty() {
            self.new_chunk(ctx, 1 << 20);
        }
    }

    fn new_chunk(&mut self, ctx: &mut Ctx<'_>, len: usize) {
        if self.chunks.len() >= MAX_CHUNKS {
            self.chunks.remove(0);
        }
        match ctx.shared.arena.chunk(len) {
            Ok(mut c) => {
                if let Some(b) = c.bytes_mut() {
                    let n = b.len().min(64 << 10);
                    ctx.rng.fill(&mut b[..n]);
                }
                self.chunks.push(c);
            }
            Err(_) => ctx
                .tally
                .note("guest memory chunks the arena could not map"),
        }
    }

    fn chunk_list(&self) -> Vec<(u64, usize)> {
        self.chunks
            .iter()
            .filter(|c| c.access() != Access::Unmapped)
            .map(|c| (c.addr(), c.len()))
            .collect()
    }

    fn pick(&self, rng: &mut Rng, kind: FdKind, sys: RawFd) -> Option<Target> {
        match kind {
            FdKind::System => {
                let i = rng.below(self.systems.len() as u64 + 2) as usize;
                Some(Target::System(
                    self.systems.get(i).map_or(sys, |f| f.as_raw_fd()),
                ))
            }
            FdKind::Vm => (!self.vms.is_empty()).then(|| Target::Vm(rng.index(self.vms.len()))),
            FdKind::Vcpu => {
                let all: Vec<(usize, usize)> = self
                    .vms
                    .iter()
                    .enumerate()
                    .flat_map(|(v, vm)| (0..vm.vcpus.len()).map(move |c| (v, c)))
                    .collect();
                (!all.is_empty()).then(|| {
                    let (v, c) = *rng.pick(&all);
                    Target::Vcpu(v, c)
                })
            }
            FdKind::Stats => {
                let all: Vec<RawFd> = self
                    .vms
                    .iter()
                    .flat_map(|vm| {
                        vm.stats
                            .iter()
                            .chain(vm.vcpus.iter().flat_map(|c| c.stats.iter()))
                    })
                    .map(|f| f.as_raw_fd())
                    .collect();
                (!all.is_empty()).then(|| Target::Stats(*rng.pick(&all)))
            }
        }
    }

    fn fd(&self, t: Target) -> (RawFd, FdKind) {
        match t {
            Target::System(fd) => (fd, FdKind::System),
            Target::Vm(v) => (self.vms[v].raw(), FdKind::Vm),
            Target::Vcpu(v, c) => (self.vms[v].vcpus[c].raw(), FdKind::Vcpu),
            Target::Stats(fd) => (fd, FdKind::Stats),
        }
    }

    /// Keeps an fd that known ioctl `def` returned, if there is room for it
    /// (else it is closed when dropped).
    fn adopt(&mut self, ctx: &mut Ctx<'_>, t: Target, def: &IoctlDef, value: i64) {
        let Some(fd) = adopt(value) else { return };
        match (def.nr, t) {
            (nr::KVM_CREATE_VM, _) if self.vms.len() < MAX_VMS => self.vms.push(Vm::adopt(fd)),
            (nr::KVM_CREATE_VCPU, Target::Vm(v)) if self.vms[v].vcpus.len() < MAX_VCPUS => {
                self.vms[v].adopt_vcpu(ctx, fd);
            }
            (nr::KVM_GET_STATS_FD, Target::Vm(v)) if self.vms[v].stats.len() < MAX_STATS => {
                self.vms[v].stats.push(fd)
            }
            (nr::KVM_GET_STATS_FD, Target::Vcpu(v, c))
                if self.vms[v].vcpus[c].stats.len() < MAX_STATS =>
            {
                self.vms[v].vcpus[c].stats.push(fd);
            }
            _ => drop(fd),
        }
    }

    /// Whether `fd` is one the pool (or the device) holds.
    fn owns(&self, fd: RawFd, dev: RawFd) -> bool {
        fd == dev
            || self.systems.iter().any(|s| s.as_raw_fd() == fd)
            || self.vms.iter().any(|vm| {
                vm.raw() == fd
                    || vm.stats.iter().any(|s| s.as_raw_fd() == fd)
                    || vm
                        .vcpus
                        .iter()
                        .any(|c| c.raw() == fd || c.stats.iter().any(|s| s.as_raw_fd() == fd))
            })
    }

    /// Closes what an unknown number returned if it is a new KVM fd (a
    /// random number may be a KVM ioctl rkvm lacks, such as
    /// KVM_CREATE_DEVICE): any value that is not one of the pool's fds and
    /// names an anonymous KVM inode. The storm is the only thread making
    /// fds, so no other owner can hold it.
    fn close_stray(&self, ctx: &mut Ctx<'_>, value: i64) {
        let Ok(fd) = RawFd::try_from(value) else {
            return;
        };
        if fd <= 2 || self.owns(fd, ctx.shared.dev.fd()) {
            return;
        }
        if crate::sys::fd_target(fd)
            .is_some_and(|t| t.starts_with("anon_inode:") && t.contains("kvm"))
        {
            crate::sys::close(fd);
            ctx.tally.note("new fds from numbers rkvm lacks, closed");
        }
    }

    fn info<'a>(
        &'a self,
        t: Target,
        chunks: &'a [(u64, usize)],
        empty: &'a std::collections::BTreeMap<u32, crate::objects::SlotInfo>,
    ) -> Info<'a> {
        let (slots, next, run) = match t {
            Target::Vm(v) => (&self.vms[v].slots, self.vms[v].next_vcpu_id, None),
            Target::Vcpu(v, c) => (
                &self.vms[v].slots,
                self.vms[v].next_vcpu_id,
                self.vms[v].vcpus[c].run.as_ref(),
            ),
            _ => (empty, 0, None),
        };
        Info {
            slots,
            chunks,
            next_vcpu_id: next,
            run,
            checks: Checks::Full,
        }
    }
}

/// Issues known ioctl `def` on target `t` and keeps what it created.
fn issue_known(ctx: &mut Ctx<'_>, pool: &mut Pool, t: Target, def: &IoctlDef) {
    let chunks = pool.chunk_list();
    let empty = Default::default();
    let (fd, kind) = pool.fd(t);
    let issued = ops::known(ctx, fd, kind, def, &pool.info(t, &chunks, &empty));
    let Ok(value) = issued.result else { return };
    if def.returns == Returns::Fd {
        pool.adopt(ctx, t, def, value);
    }
    if let (nr::KVM_SET_USER_MEMORY_REGION, Target::Vm(v), true) = (def.nr, t, issued.in_scratch) {
        let r: kvm_bindings::kvm_userspace_memory_region = from_bytes(&issued.bytes);
        let slots = &mut pool.vms[v].slots;
        if r.memory_size == 0 {
            slots.remove(&r.slot);
        } else {
            slots.insert(
                r.slot,
                crate::objects::SlotInfo {
                    gpa: r.guest_phys_addr,
                    size: r.memory_size,
                    hva: r.userspace_addr,
                },
            );
        }
    }
}

fn known_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    let kind = [FdKind::System, FdKind::Vm, FdKind::Vcpu][ctx.rng.weighted(&[15, 30, 55])];
    let Some(t) = pool.pick(&mut ctx.rng, kind, ctx.shared.dev.fd()) else {
        return;
    };
    let defs: Vec<&IoctlDef> = ioctl_table::for_kind(kind).collect();
    let def = *ctx.rng.pick(&defs);
    issue_known(ctx, pool, t, def);
}

type UnknownOp = fn(&mut Ctx<'_>, RawFd, FdKind, &Info<'_>) -> ops::Issued;

fn unknown_op(ctx: &mut Ctx<'_>, pool: &mut Pool, op: UnknownOp) {
    let kind = FdKind::ALL[ctx.rng.weighted(&[15, 25, 45, 15])];
    let Some(t) = pool.pick(&mut ctx.rng, kind, ctx.shared.dev.fd()) else {
        return;
    };
    let chunks = pool.chunk_list();
    let empty = Default::default();
    let (fd, kind) = pool.fd(t);
    let issued = op(ctx, fd, kind, &pool.info(t, &chunks, &empty));
    let (Some(n), Ok(v)) = (issued.nr, issued.result) else {
        return;
    };
    if let Some(def) = ioctl_table::lookup(kind, n).filter(|d| d.returns == Returns::Fd) {
        // A random number that is exactly a known fd-returning ioctl.
        pool.adopt(ctx, t, def, v);
    } else if ioctl_table::lookup(kind, n).is_none() {
        pool.close_stray(ctx, v);
    }
}

fn lifecycle_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    let sys = ctx.shared.dev.fd();
    match ctx.rng.weighted(&[15, 25, 15, 8, 10, 10, 5, 5, 7]) {
        0 if pool.vms.len() < MAX_VMS => {
            if let Some(vm) = Vm::create(ctx, sys) {
                pool.vms.push(vm);
            }
        }
        1 => {
            let Some(Target::Vm(v)) = pool.pick(&mut ctx.rng, FdKind::Vm, sys) else {
                return;
            };
            if pool.vms[v].vcpus.len() < MAX_VCPUS {
                let id = if ctx.rng.chance(4, 5) {
                    pool.vms[v].next_vcpu_id
                } else {
                    ctx.rng.below(8)
                };
                pool.vms[v].add_vcpu(ctx, id);
            }
        }
        2 => {
            let kind = if ctx.rng.chance(1, 2) {
                FdKind::Vm
            } else {
                FdKind::Vcpu
            };
            let Some(t) = pool.pick(&mut ctx.rng, kind, sys) else {
                return;
            };
            let def =
                ioctl_table::lookup(kind, nr::KVM_GET_STATS_FD).expect("KVM_GET_STATS_FD is known");
            issue_known(ctx, pool, t, def);
        }
        3 if !pool.vms.is_empty() => {
            // The VM goes first; its vCPUs, mappings and stats fds after it.
            let i = ctx.rng.index(pool.vms.len());
            let mut vm = pool.vms.remove(i);
            let vcpus = std::mem::take(&mut vm.vcpus);
            drop(vm);
            drop(vcpus);
            ctx.tally.note("VMs closed with live vCPUs");
        }
        4 => {
            if let Some(Target::Vcpu(v, c)) = pool.pick(&mut ctx.rng, FdKind::Vcpu, sys) {
                let vcpu = pool.vms[v].vcpus.remove(c);
                // The fd first, the kvm_run mapping after it.
                let (fd, run) = (vcpu.fd, vcpu.run);
                drop(fd);
                drop(run);
                ctx.tally.note("vCPU fds closed before their mapping");
            }
        }
        5 => {
            if let Some(vm) = pool.vms.iter_mut().find(|vm| !vm.stats.is_empty()) {
                vm.stats.pop();
            } else if let Some(c) = pool
                .vms
                .iter_mut()
                .flat_map(|vm| vm.vcpus.iter_mut())
                .find(|c| !c.stats.is_empty())
            {
                c.stats.pop();
            }
        }
        6 => {
            if let Some(Target::Vcpu(v, c)) = pool.pick(&mut ctx.rng, FdKind::Vcpu, sys) {
                pool.vms[v].vcpus[c].run = None;
                ctx.tally.file_op("munmap kvm_run", true);
            }
        }
        7 => {
            if pool.systems.len() < 2 && ctx.rng.chance(1, 2) {
                let fd = device::open(&ctx.shared.dev.path);
                ctx.tally.file_op("open device", fd.is_ok());
                pool.systems.extend(fd.ok());
            } else {
                pool.systems.pop();
            }
        }
        _ => {
            if let Some(Target::Vcpu(v, c)) = pool.pick(&mut ctx.rng, FdKind::Vcpu, sys) {
                let table = ctx.shared.dev.cpuid2_bytes();
                let call = crate::ctx::Call::new(
                    pool.vms[v].vcpus[c].raw(),
                    FdKind::Vcpu,
                    nr::KVM_SET_CPUID2,
                    crate::ctx::Arg::Data(&table),
                );
                let _ = ctx.ioctl(call);
            }
        }
    }
}

fn memory_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    let sys = ctx.shared.dev.fd();
    match ctx.rng.weighted(&[60, 10, 10, 8, 7, 5]) {
        0 => {
            let Some(Target::Vm(v)) = pool.pick(&mut ctx.rng, FdKind::Vm, sys) else {
                return;
            };
            let chunks = pool.chunk_list();
            let bounds = region::Bounds {
                base: ctx.shared.arena.base(),
                end: ctx.shared.arena.base() + ctx.shared.arena.size(),
            };
            let env = region::Env {
                bounds,
                chunks: &chunks,
                slots: &pool.vms[v].slots,
            };
            let r = region::region(&mut ctx.rng, &env);
            let _ = pool.vms[v].set_region(ctx, r);
        }
        1 => {
            let len = *ctx
                .rng
                .pick(&[16 << 10, 64 << 10, 1 << 20, 2 << 20, 4 << 20]);
            pool.new_chunk(ctx, len);
        }
        choice if !pool.chunks.is_empty() => {
            let i = ctx.rng.index(pool.chunks.len());
            let c = &mut pool.chunks[i];
            let (what, ok) = match choice {
                2 => ("munmap guest memory under slots", c.unmap()),
                3 => {
                    let to = *ctx
                        .rng
                        .pick(&[Access::ReadOnly, Access::None, Access::ReadWrite]);
                    ("mprotect guest memory under slots", c.protect(to))
                }
                4 => (
                    "mremap guest memory under slots",
                    c.relocate(&ctx.shared.arena),
                ),
                _ => {
                    pool.chunks.remove(i);
                    ("drop guest memory under slots", Ok(()))
                }
            };
            if ok == Err(libc::EEXIST) {
                eprintln!("rkvm-fuzz: warning: a hole in the arena was taken by another mapping");
            }
            ctx.tally.file_op(what, ok.is_ok());
        }
        _ => {}
    }
}

fn stats_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    let Some(Target::Stats(fd)) = pool.pick(&mut ctx.rng, FdKind::Stats, ctx.shared.dev.fd())
    else {
        // None yet: make one.
        let kind = if ctx.rng.chance(1, 2) {
            FdKind::Vm
        } else {
            FdKind::Vcpu
        };
        if let Some(t) = pool.pick(&mut ctx.rng, kind, ctx.shared.dev.fd()) {
            let def =
                ioctl_table::lookup(kind, nr::KVM_GET_STATS_FD).expect("KVM_GET_STATS_FD is known");
            issue_known(ctx, pool, t, def);
        }
        return;
    };
    if ctx.rng.chance(3, 10) {
        stats_fd::check_image(ctx, fd);
    } else {
        stats_fd::odd_read(ctx, fd);
    }
}

fn mmap_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    if let Some(Target::Vcpu(v, c)) = pool.pick(&mut ctx.rng, FdKind::Vcpu, ctx.shared.dev.fd()) {
        vcpu_mmap::odd_mmap(ctx, pool.vms[v].vcpus[c].raw());
    }
}

/// Random state setters, then a short KVM_RUN.
fn run_op(ctx: &mut Ctx<'_>, pool: &mut Pool) {
    let Some(t @ Target::Vcpu(v, c)) = pool.pick(&mut ctx.rng, FdKind::Vcpu, ctx.shared.dev.fd())
    else {
        return;
    };
    const SETTERS: [u32; 8] = [
        nr::KVM_SET_REGS,
        nr::KVM_SET_SREGS,
        nr::KVM_SET_MSRS,
        nr::KVM_SET_VCPU_EVENTS,
        nr::KVM_SET_XSAVE,
        nr::KVM_SET_GUEST_DEBUG,
        nr::KVM_INTERRUPT,
        nr::KVM_NMI,
    ];
    for _ in 0..ctx.rng.below(5) {
        let n = *ctx.rng.pick(&SETTERS);
        let def = ioctl_table::lookup(FdKind::Vcpu, n).expect("setters are known");
        issue_known(ctx, pool, t, def);
    }
    let vcpu = &pool.vms[v].vcpus[c];
    if let Some(run) = vcpu.run.as_ref() {
        if ctx.rng.chance(1, 4) {
            let valid = if ctx.rng.chance(3, 4) {
                ctx.rng.below(8)
            } else {
                ctx.rng.boundary_u64()
            };
            let dirty = if ctx.rng.chance(3, 4) {
                ctx.rng.below(8)
            } else {
                ctx.rng.boundary_u64()
            };
            let mut regs = vec![0u8; 520];
            for w in regs.chunks_mut(8) {
                w.copy_from_slice(&ctx.rng.boundary_u64().to_le_bytes());
            }
            if ctx.shared.opts.interrupts_on {
                regs[crate::ctx::RFLAGS_IF_BYTE] |= crate::ctx::RFLAGS_IF_BIT;
            }
            run.write_sync_regs(valid, dirty, &regs);
        }
        run.set_request_interrupt_window(ctx.rng.chance(1, 3));
    }
    let imm = ctx.rng.chance(1, 2);
    let bound = ctx.shared.short_run();
    let _ = crate::runner::run(ctx, vcpu.raw(), vcpu.run.as_ref(), bound, imm, Checks::Full);
    if let Some(run) = vcpu.run.as_ref() {
        run.clear_sync_regs();
        run.set_request_interrupt_window(false);
    }
}
