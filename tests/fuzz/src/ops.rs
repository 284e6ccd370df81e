//! Random ioctls on one fd, shared by the storm and the race: a known
//! ioctl with a built argument, a known number with bent direction or size
//! bits, a random number of KVM's type, a random 32-bit number.
//!
//! Integer arguments of known ioctls take any boundary value (the device
//! reads them as integers). An unknown number's integer argument might be
//! read as a pointer by whatever the number turns out to be, so it is
//! [`safe_int`]: below the lowest mappable address, above user space, or
//! inside the arena's reservation, never an address of the fuzzer.
//!
//! Context: process context, the `Ctx`'s thread.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use kvm_bindings::kvm_sregs;

use crate::args;
use crate::ctx::{Arg, Call, Ctx, Shared};
use crate::ioctl_table::{self, nr, ArgKind, FdKind, IoctlDef, Shape};
use crate::objects::{RunPage, SlotInfo};
use crate::region;
use crate::runner::{self, Checks};
use crate::scratch::{from_bytes, BadPtr};
use crate::sregs;

/// What the ops know about the object an fd belongs to.
pub struct Info<'a> {
    /// The VM's slots (for memory regions).
    pub slots: &'a BTreeMap<u32, SlotInfo>,
    /// Live guest memory.
    pub chunks: &'a [(u64, usize)],
    /// The id a new vCPU would get.
    pub next_vcpu_id: u64,
    /// The vCPU's kvm_run, for KVM_RUN.
    pub run: Option<&'a RunPage>,
    /// How much of a KVM_RUN exit to check.
    pub checks: Checks,
}

/// What an op issued.
pub struct Issued {
    /// The ioctl it issued (None: nothing).
    pub nr: Option<u32>,
    /// The result.
    pub result: Result<i64, i32>,
    /// The argument bytes.
    pub bytes: Vec<u8>,
    /// Whether they went in the scratch buffer (not a bad pointer).
    pub in_scratch: bool,
}

impl Issued {
    fn nothing() -> Issued {
        Issued {
            nr: None,
            result: Err(0),
            bytes: Vec::new(),
            in_scratch: false,
        }
    }
}

/// The GET that returns what a SET takes, for a template.
fn getter(set: u32) -> Option<u32> {
    Some(match set {
        nr::KVM_SET_REGS => nr::KVM_GET_REGS,
        nr::KVM_SET_SREGS => nr::KVM_GET_SREGS,
        nr::KVM_SET_FPU => nr::KVM_GET_FPU,
        nr::KVM_SET_VCPU_EVENTS => nr::KVM_GET_VCPU_EVENTS,
        nr::KVM_SET_XSAVE => nr::KVM_GET_XSAVE,
        nr::KVM_SET_XCRS => nr::KVM_GET_XCRS,
        nr::KVM_SET_MSRS => nr::KVM_GET_MSRS,
        _ => return None,
    })
}

fn env<'a>(shared: &'a Shared, info: &'a Info<'_>) -> args::Env<'a> {
    args::Env {
        msrs: &shared.dev.msrs,
        cpuid: &shared.dev.cpuid,
        region: region::Env {
            bounds: region::Bounds {
                base: shared.arena.base(),
                end: shared.arena.base() + shared.arena.size(),
            },
            chunks: info.chunks,
            slots: info.slots,
        },
    }
}

/// The bytes for a `shape` argument, from a template (the matching GET,
/// issued first) half of the time when there is one.
fn build(
    ctx: &mut Ctx<'_>,
    fd: RawFd,
    kind: FdKind,
    set_nr: u32,
    shape: Shape,
    info: &Info<'_>,
) -> Vec<u8> {
    let shared = ctx.shared;
    let template = match getter(set_nr) {
        Some(get) if ctx.rng.chance(1, 2) => {
            // KVM_GET_MSRS needs the indices to read.
            let seed = if shape == Shape::Msrs {
                args::build(&mut ctx.rng, Shape::Msrs, None, &env(shared, info))
            } else {
                vec![0; shape.fixed_size()]
            };
            let len = seed.len().max(shape.fixed_size());
            ctx.ioctl(Call::new(fd, kind, get, Arg::Data(&seed)))
                .ok()
                .map(|_| ctx.scratch.bytes()[..len].to_vec())
        }
        _ => None,
    };
    args::build(&mut ctx.rng, shape, template.as_deref(), &env(shared, info))
}

/// A pointer for `bytes`: the scratch buffer most of the time, otherwise
/// one of the bad pointers.
fn pointer<'b>(ctx: &mut Ctx<'_>, bytes: &'b [u8], fixed: usize) -> Arg<'b> {
    match ctx.rng.below(20) {
        0 => Arg::Bad(BadPtr::Null, bytes),
        1 => Arg::Bad(BadPtr::Unmapped, bytes),
        2 => Arg::Bad(BadPtr::ReadOnly, bytes),
        3 => Arg::Bad(
            BadPtr::Straddle(ctx.rng.range(1, fixed as u64 + 8) as usize),
            bytes,
        ),
        4 if ctx.rng.chance(1, 2) => Arg::Bad(BadPtr::Kernel, bytes),
        4 => Arg::Bad(BadPtr::NonCanonical, bytes),
        _ => Arg::Data(bytes),
    }
}

/// An integer for known ioctl `def`'s integer argument.
fn int_arg(ctx: &mut Ctx<'_>, def: &IoctlDef, info: &Info<'_>) -> u64 {
    let r = &mut ctx.rng;
    match def.nr {
        nr::KVM_CREATE_VM => {
            let any = r.boundary_u64();
            *r.pick(&[0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, any])
        }
        nr::KVM_CREATE_VCPU if r.chance(3, 5) => info.next_vcpu_id,
        nr::KVM_CREATE_VCPU => {
            let any = r.boundary_u64();
            *r.pick(&[
                0,
                1,
                254,
                255,
                256,
                1023,
                1024,
                4095,
                4096,
                1 << 32,
                u64::MAX,
                any,
            ])
        }
        nr::KVM_CHECK_EXTENSION if r.chance(3, 5) => r.below(260),
        nr::KVM_SET_TSS_ADDR if r.chance(1, 2) => *r.pick(&[
            0xfffb_d000,
            0,
            0xffff_d000,
            0xffff_e000,
            0xffff_f000,
            0xffff_ffff,
        ]),
        _ => r.boundary_u64(),
    }
}

/// An integer argument for a number the fuzzer does not know (see the
/// module doc).
pub fn safe_int(ctx: &mut Ctx<'_>) -> u64 {
    let arena = &ctx.shared.arena;
    let r = &mut ctx.rng;
    match r.below(6) {
        // Below vm.mmap_min_addr (64 KiB by default): never mapped.
        0 | 1 => r.below(0x1_0000),
        2 => *r.pick(&[u64::MAX, 1 << 63, i64::MAX as u64, region::USER_END]),
        3 => region::USER_END + r.next_u64() % (u64::MAX - region::USER_END),
        // The arena's reservation beyond the chunks: nobody's memory.
        4 => arena.base() + arena.size() / 2 + r.below(arena.size() / 4),
        _ => 0,
    }
}

/// Issues known ioctl `def` on `fd` with a random argument; KVM_RUN goes
/// through the runner. KVM_SET_SREGS of a state no CPU can be in must be
/// refused with EINVAL.
pub fn known(
    ctx: &mut Ctx<'_>,
    fd: RawFd,
    kind: FdKind,
    def: &IoctlDef,
    info: &Info<'_>,
) -> Issued {
    if def.nr == nr::KVM_RUN {
        let imm = ctx.rng.chance(1, 2);
        let bound = ctx.shared.short_run();
        let result = runner::run(ctx, fd, info.run, bound, imm, info.checks).map(|_| 0);
        return Issued {
            nr: Some(def.nr),
            result,
            bytes: Vec::new(),
            in_scratch: false,
        };
    }
    match def.arg {
        ArgKind::None => {
            let arg = if ctx.rng.chance(9, 10) {
                Arg::None
            } else {
                Arg::Int(ctx.rng.boundary_u64())
            };
            let result = ctx.ioctl(Call::new(fd, kind, def.nr, arg));
            Issued {
                nr: Some(def.nr),
                result,
                bytes: Vec::new(),
                in_scratch: false,
            }
        }
        ArgKind::Int => {
            let v = int_arg(ctx, def, info);
            let result = ctx.ioctl(Call::new(fd, kind, def.nr, Arg::Int(v)));
            Issued {
                nr: Some(def.nr),
                result,
                bytes: Vec::new(),
                in_scratch: false,
            }
        }
        ArgKind::Ptr(shape) => {
            let bytes = build(ctx, fd, kind, def.nr, shape, info);
            let arg = pointer(ctx, &bytes, shape.fixed_size());
            let in_scratch = matches!(arg, Arg::Data(_));
            let result = ctx.ioctl(Call::new(fd, kind, def.nr, arg));
            if def.nr == nr::KVM_SET_SREGS && in_scratch {
                check_set_sregs(ctx, &from_bytes(&bytes), result);
            }
            Issued {
                nr: Some(def.nr),
                result,
                bytes,
                in_scratch,
            }
        }
    }
}

/// KVM_SET_SREGS of `s`, a state no CPU can be in, must fail with EINVAL
/// (or EIO, which every vCPU ioctl of a VM the device killed returns: KVM
/// kills a VM whose SMM entry failed, silently, and says EIO from then on;
/// or EINTR, a signal during the wait for the vCPU).
pub fn check_set_sregs(ctx: &mut Ctx<'_>, s: &kvm_sregs, result: Result<i64, i32>) {
    let Some(why) = sregs::must_refuse(s) else {
        return;
    };
    ctx.tally.note("KVM_SET_SREGS of impossible states");
    let values = || format!("cr0 {:#x} cr4 {:#x} efer {:#x}", s.cr0, s.cr4, s.efer);
    match result {
        Ok(_) => ctx.finding(
            &format!("KVM_SET_SREGS accepted a state no CPU can be in ({why})"),
            values,
        ),
        Err(libc::EINVAL | libc::EIO | libc::EINTR) => {}
        Err(e) => ctx.finding(
            &format!(
                "KVM_SET_SREGS refused a state no CPU can be in ({why}) with {}, not EINVAL",
                crate::errno::name(e)
            ),
            values,
        ),
    }
}

/// An argument for unknown number `n`: the struct of the known ioctl with
/// the same function, if any; else random bytes, a safe integer or a bad
/// pointer. Returns the bytes and how to pass them.
fn unknown_arg(
    ctx: &mut Ctx<'_>,
    fd: RawFd,
    kind: FdKind,
    n: u32,
    info: &Info<'_>,
) -> (Vec<u8>, u8) {
    let shape = ioctl_table::same_function(kind, n).and_then(|d| match d.arg {
        ArgKind::Ptr(s) => Some((d.nr, s)),
        _ => None,
    });
    if let Some((set_nr, s)) = shape {
        return (build(ctx, fd, kind, set_nr, s, info), 0);
    }
    match ctx.rng.below(10) {
        0..=3 => {
            let len = rkvm_core::abi::size(n).max(8);
            let mut b = vec![0; len];
            ctx.rng.fill(&mut b);
            (b, 0)
        }
        4..=6 => (safe_int(ctx).to_le_bytes().to_vec(), 1),
        _ => (Vec::new(), 2),
    }
}

/// Issues unknown number `n` on `fd`.
fn issue_unknown(ctx: &mut Ctx<'_>, fd: RawFd, kind: FdKind, n: u32, info: &Info<'_>) -> Issued {
    if ioctl_table::denied(n) {
        return Issued::nothing();
    }
    if let Some(def) = ioctl_table::lookup(kind, n) {
        return known(ctx, fd, kind, def, info);
    }
    let (bytes, how) = unknown_arg(ctx, fd, kind, n, info);
    let arg = match how {
        0 => pointer(ctx, &bytes, bytes.len()),
        1 => Arg::Int(u64::from_le_bytes(
            bytes[..8].try_into().unwrap_or_default(),
        )),
        _ => Arg::Bad(
            *ctx.rng.pick(&[
                BadPtr::Null,
                BadPtr::Unmapped,
                BadPtr::ReadOnly,
                BadPtr::Kernel,
            ]),
            &bytes,
        ),
    };
    let in_scratch = matches!(arg, Arg::Data(_));
    let result = ctx.ioctl(Call::new(fd, kind, n, arg));
    Issued {
        nr: Some(n),
        result,
        bytes,
        in_scratch,
    }
}

/// A known ioctl of `kind`'s number with other direction or size bits
/// (`ioctl_table::bend`); on a stats fd, any known number bent.
pub fn bent(ctx: &mut Ctx<'_>, fd: RawFd, kind: FdKind, info: &Info<'_>) -> Issued {
    let defs: Vec<&IoctlDef> = if kind == FdKind::Stats {
        ioctl_table::TABLE.iter().collect()
    } else {
        ioctl_table::for_kind(kind).collect()
    };
    let def = *ctx.rng.pick(&defs);
    let n = ioctl_table::bend(def.nr, ctx.rng.next_u64());
    issue_unknown(ctx, fd, kind, n, info)
}

/// A random number of KVM's type.
pub fn random_kvmio(ctx: &mut Ctx<'_>, fd: RawFd, kind: FdKind, info: &Info<'_>) -> Issued {
    let n = ioctl_table::random_kvmio(ctx.rng.next_u64());
    issue_unknown(ctx, fd, kind, n, info)
}

/// A random 32-bit number.
pub fn random32(ctx: &mut Ctx<'_>, fd: RawFd, kind: FdKind, info: &Info<'_>) -> Issued {
    let n = ctx.rng.next_u32();
    issue_unknown(ctx, fd, kind, n, info)
}
