//! Argument builders: the bytes of an ioctl's struct, as a hostile VMM
//! would fill it. Each build picks one style:
//!
//! - random bytes;
//! - boundary words: every field 0, 1, -1, a signed extreme, a 32-bit
//!   edge, an aligned or unaligned address (`Rng::boundary_u64`);
//! - sparse: zeroes with a few boundary fields;
//! - a mutation of a template (what the matching GET ioctl returned): a
//!   few fields changed or bits flipped, which is what gets past the
//!   device's first checks;
//! - valid-looking: the struct a well-behaved VMM would send, with counts
//!   (nmsrs, nent, nr_xcrs) on their limits.
//!
//! Counted arrays get a boundary count, with at most [`MAX_ENTRIES`]
//! entries filled: a larger count makes the device read past them into the
//! rest of the scratch buffer, or into its guard page.
//!
//! Context: pure logic.

use kvm_bindings::*;

use crate::arch::INTERESTING_MSRS;
use crate::device::cpuid2_bytes;
use crate::ioctl_table::Shape;
use crate::region;
use crate::rng::Rng;
use crate::scratch::{bytes_of, from_bytes, put};
use crate::sregs;

/// Entries filled in a counted array at most.
pub const MAX_ENTRIES: usize = 300;

/// What the builders draw valid values from.
pub struct Env<'a> {
    /// The device's MSR index list.
    pub msrs: &'a [u32],
    /// The device's supported CPUID entries.
    pub cpuid: &'a [kvm_cpuid_entry2],
    /// For memory regions.
    pub region: region::Env<'a>,
}

/// The bytes of a `shape` argument; `template` is what the matching GET
/// returned, if the caller asked for it first.
pub fn build(rng: &mut Rng, shape: Shape, template: Option<&[u8]>, env: &Env<'_>) -> Vec<u8> {
    if shape == Shape::Region {
        return bytes_of(&region::region(rng, &env.region)).to_vec();
    }
    let style = rng.below(10);
    if let (Some(t), 0..=3) = (template, style) {
        let mut b = t.to_vec();
        if shape == Shape::Sregs && rng.chance(1, 2) {
            let mut s: kvm_sregs = from_bytes(&b);
            sregs::perturb(rng, &mut s);
            return bytes_of(&s).to_vec();
        }
        mutate(rng, &mut b);
        return b;
    }
    let mut b = match style {
        0..=4 => valid(rng, shape, env),
        5 | 6 => {
            let mut b = vec![0; full_len(shape)];
            for _ in 0..rng.range(1, 4) {
                mutate(rng, &mut b);
            }
            b
        }
        7 => {
            let mut b = vec![0; full_len(shape)];
            rng.fill(&mut b);
            b
        }
        _ => boundary_words(rng, full_len(shape)),
    };
    if shape.entry_size().is_some() && (style >= 5 || rng.chance(1, 4)) {
        b[..4].copy_from_slice(&rng.boundary_count().to_le_bytes());
    }
    b
}

/// Bytes for the fixed part plus [`MAX_ENTRIES`] entries (for counted
/// shapes), or just the struct.
fn full_len(shape: Shape) -> usize {
    shape.fixed_size() + shape.entry_size().map_or(0, |e| e * MAX_ENTRIES)
}

fn boundary_words(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len + 8);
    while b.len() < len {
        b.extend_from_slice(&rng.boundary_u64().to_le_bytes());
    }
    b.truncate(len);
    b
}

/// Changes one field-sized piece of `b`: a boundary value of 1, 2, 4 or 8
/// bytes at an aligned offset, or one flipped bit.
pub fn mutate(rng: &mut Rng, b: &mut [u8]) {
    if b.is_empty() {
        return;
    }
    let width = 1usize << rng.below(4);
    if rng.chance(1, 3) || b.len() < width {
        let bit = rng.below(b.len() as u64 * 8) as usize;
        b[bit / 8] ^= 1 << (bit % 8);
        return;
    }
    let at = rng.below((b.len() / width) as u64) as usize * width;
    let v = rng.boundary_u64().to_le_bytes();
    b[at..at + width].copy_from_slice(&v[..width]);
}

/// What a well-behaved VMM would send, on the edges.
fn valid(rng: &mut Rng, shape: Shape, env: &Env<'_>) -> Vec<u8> {
    match shape {
        Shape::Regs => {
            let r = kvm_regs {
                rip: rng.below(0x10_0000),
                rsp: rng.below(0x10_0000),
                rflags: crate::arch::RFLAGS_FIXED | (rng.next_u64() & 0x3f_7fd5),
                rax: rng.boundary_u64(),
                rcx: rng.boundary_u64(),
                rdx: rng.boundary_u64(),
                ..Default::default()
            };
            bytes_of(&r).to_vec()
        }
        Shape::Fpu => {
            let f = kvm_fpu {
                fcw: 0x37f,
                mxcsr: if rng.chance(3, 4) {
                    0x1f80
                } else {
                    rng.next_u32()
                },
                ..Default::default()
            };
            bytes_of(&f).to_vec()
        }
        Shape::Interrupt => {
            let irq = if rng.chance(3, 4) {
                rng.below(256) as u32
            } else {
                rng.boundary_u32()
            };
            bytes_of(&kvm_interrupt { irq }).to_vec()
        }
        Shape::Msrs => msrs(rng, env),
        Shape::MsrList => {
            let n = if rng.chance(1, 2) {
                env.msrs.len() as u32
            } else {
                rng.boundary_count()
            };
            let mut b = vec![0; full_len(shape)];
            b[..4].copy_from_slice(&n.to_le_bytes());
            b
        }
        Shape::Cpuid2 => cpuid2(rng, env),
        Shape::GuestDebug => {
            let flags = [
                KVM_GUESTDBG_ENABLE,
                KVM_GUESTDBG_SINGLESTEP,
                KVM_GUESTDBG_USE_SW_BP,
                KVM_GUESTDBG_USE_HW_BP,
                KVM_GUESTDBG_INJECT_DB,
                KVM_GUESTDBG_INJECT_BP,
                KVM_GUESTDBG_BLOCKIRQ,
                1 << 30,
            ];
            let control = flags
                .iter()
                .filter(|_| rng.chance(1, 3))
                .fold(0, |a, f| a | f);
            let mut d = kvm_guest_debug {
                control,
                ..Default::default()
            };
            for r in d.arch.debugreg.iter_mut() {
                *r = if rng.chance(1, 2) {
                    rng.below(0x10_0000)
                } else {
                    rng.boundary_u64()
                };
            }
            bytes_of(&d).to_vec()
        }
        Shape::VcpuEvents => {
            let mut e = kvm_vcpu_events::default();
            let valid = [
                KVM_VCPUEVENT_VALID_NMI_PENDING,
                KVM_VCPUEVENT_VALID_SIPI_VECTOR,
                KVM_VCPUEVENT_VALID_SHADOW,
                KVM_VCPUEVENT_VALID_SMM,
                KVM_VCPUEVENT_VALID_PAYLOAD,
                KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
                1 << 20,
            ];
            e.flags = valid
                .iter()
                .filter(|_| rng.chance(1, 4))
                .fold(0, |a, f| a | f);
            e.exception.injected = rng.below(2) as u8;
            e.exception.pending = rng.below(2) as u8;
            e.exception.nr = rng.below(33) as u8;
            e.exception.has_error_code = rng.below(2) as u8;
            e.exception.error_code = rng.boundary_u32();
            e.interrupt.injected = rng.below(2) as u8;
            e.interrupt.nr = rng.next_u32() as u8;
            e.interrupt.shadow = rng.below(4) as u8;
            e.nmi.injected = rng.below(2) as u8;
            e.nmi.pending = rng.below(2) as u8;
            e.nmi.masked = rng.below(2) as u8;
            e.smi.smm = rng.below(2) as u8;
            e.triple_fault.pending = rng.below(2) as u8;
            e.exception_has_payload = rng.below(2) as u8;
            e.exception_payload = rng.boundary_u64();
            bytes_of(&e).to_vec()
        }
        Shape::Xsave => {
            // The legacy region's FCW and MXCSR, and XSTATE_BV in the header
            // (SDM Vol. 1, 13.4 "XSAVE Area").
            let mut b = vec![0u8; shape.fixed_size()];
            b[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
            b[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
            let any = rng.boundary_u64();
            let bv: u64 = *rng.pick(&[1, 3, 7, 0xe7, any]);
            b[512..520].copy_from_slice(&bv.to_le_bytes());
            if rng.chance(1, 4) {
                b[520..528].copy_from_slice(&(rng.boundary_u64() | 1 << 63).to_le_bytes());
            }
            b
        }
        Shape::Xcrs => {
            let any = rng.boundary_u32();
            let mut x = kvm_xcrs {
                nr_xcrs: *rng.pick(&[0, 1, 1, 1, 2, 16, 17, any]),
                ..Default::default()
            };
            x.flags = if rng.chance(3, 4) {
                0
            } else {
                rng.boundary_u32()
            };
            for e in x.xcrs.iter_mut() {
                e.xcr = if rng.chance(3, 4) {
                    0
                } else {
                    rng.boundary_u32()
                };
                let any = rng.boundary_u64();
                e.value = *rng.pick(&[1, 3, 7, 0xe7, 0x2e7, 2, 0, any]);
            }
            bytes_of(&x).to_vec()
        }
        Shape::U64 => rng.boundary_u64().to_le_bytes().to_vec(),
        Shape::Sregs => {
            // Without a template: the reset state, perturbed.
            let mut s = kvm_sregs {
                cr0: 0x6000_0010,
                ..Default::default()
            };
            for (i, sel) in [0xf000u16, 0, 0, 0, 0, 0].iter().enumerate() {
                let seg = sregs::segment_mut(&mut s, i);
                *seg = kvm_segment {
                    base: u64::from(*sel) << 4,
                    limit: 0xffff,
                    selector: *sel,
                    type_: if i == 0 { 0xb } else { 3 },
                    present: 1,
                    s: 1,
                    ..Default::default()
                };
            }
            s.tr = kvm_segment {
                limit: 0xffff,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            s.ldt = kvm_segment {
                limit: 0xffff,
                type_: 2,
                present: 1,
                ..Default::default()
            };
            sregs::perturb(rng, &mut s);
            bytes_of(&s).to_vec()
        }
        Shape::Region => unreachable!("built by region.rs"),
    }
}

fn msrs(rng: &mut Rng, env: &Env<'_>) -> Vec<u8> {
    let n = if rng.chance(3, 4) {
        rng.range(1, 8) as usize
    } else {
        rng.below(MAX_ENTRIES as u64 + 1) as usize
    };
    let mut b = vec![0u8; 8 + 16 * n];
    b[..4].copy_from_slice(&(n as u32).to_le_bytes());
    for i in 0..n {
        let index = match rng.below(10) {
            0..=4 if !env.msrs.is_empty() => *rng.pick(env.msrs),
            0..=7 => *rng.pick(&INTERESTING_MSRS),
            _ => rng.boundary_u32(),
        };
        let data = if rng.chance(1, 3) {
            0
        } else {
            rng.boundary_u64()
        };
        put(
            &mut b,
            8 + 16 * i,
            &kvm_msr_entry {
                index,
                reserved: 0,
                data,
            },
        );
    }
    b
}

fn cpuid2(rng: &mut Rng, env: &Env<'_>) -> Vec<u8> {
    let mut entries = env.cpuid.to_vec();
    for _ in 0..rng.below(4) {
        if entries.is_empty() {
            break;
        }
        let i = rng.index(entries.len());
        let e = &mut entries[i];
        match rng.below(5) {
            0 => e.eax = rng.boundary_u32(),
            1 => e.ebx ^= 1 << rng.below(32),
            2 => e.ecx ^= 1 << rng.below(32),
            3 => e.edx ^= 1 << rng.below(32),
            _ => e.flags = rng.boundary_u32(),
        }
    }
    if rng.chance(1, 4) {
        entries.truncate(rng.below(entries.len() as u64 + 1) as usize);
    }
    if rng.chance(1, 4) {
        let any = rng.next_u32();
        let function = *rng.pick(&[0, 1, 7, 0xd, 0x4000_0000, 0x8000_0000, 0x8000_0008, any]);
        entries.push(kvm_cpuid_entry2 {
            function,
            index: rng.below(4) as u32,
            eax: rng.boundary_u32(),
            ..Default::default()
        });
    }
    entries.truncate(MAX_ENTRIES);
    cpuid2_bytes(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env<'a>(slots: &'a BTreeMap<u32, crate::objects::SlotInfo>) -> Env<'a> {
        Env {
            msrs: &[0x10, 0xc000_0080],
            cpuid: &[],
            region: region::Env {
                bounds: region::Bounds {
                    base: 1 << 44,
                    end: 3 << 44,
                },
                chunks: &[],
                slots,
            },
        }
    }

    #[test]
    fn every_shape_builds_at_least_its_fixed_part() {
        let slots = BTreeMap::new();
        let env = env(&slots);
        let mut rng = Rng::new(1);
        let shapes = [
            Shape::Regs,
            Shape::Sregs,
            Shape::Fpu,
            Shape::Interrupt,
            Shape::Msrs,
            Shape::MsrList,
            Shape::GuestDebug,
            Shape::VcpuEvents,
            Shape::Xsave,
            Shape::Xcrs,
            Shape::Region,
            Shape::U64,
        ];
        for shape in shapes {
            for _ in 0..200 {
                let b = build(&mut rng, shape, None, &env);
                assert!(
                    b.len() >= shape.fixed_size(),
                    "{shape:?}: {} bytes",
                    b.len()
                );
            }
        }
        // An empty supported table still makes a well-formed header.
        assert!(build(&mut rng, Shape::Cpuid2, None, &env).len() >= 8);
    }

    #[test]
    fn counts_reach_their_boundaries() {
        let slots = BTreeMap::new();
        let env = env(&slots);
        let mut rng = Rng::new(2);
        let mut counts = Vec::new();
        for _ in 0..3000 {
            let b = build(&mut rng, Shape::Msrs, None, &env);
            counts.push(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
        for edge in [0, 1, 255, 256, 257, u32::MAX] {
            assert!(counts.contains(&edge), "nmsrs {edge} never built");
        }
    }

    #[test]
    fn templates_are_mutated_not_replaced() {
        let slots = BTreeMap::new();
        let env = env(&slots);
        let mut rng = Rng::new(3);
        let template = vec![0u8; Shape::Regs.fixed_size()];
        let mut changed_a_little = 0;
        for _ in 0..1000 {
            let b = build(&mut rng, Shape::Regs, Some(&template), &env);
            let diff = b.iter().zip(&template).filter(|(x, y)| x != y).count();
            changed_a_little += usize::from(diff > 0 && diff <= 8);
        }
        assert!(changed_a_little > 200, "{changed_a_little}");
    }

    #[test]
    fn mutate_touches_one_field() {
        let mut rng = Rng::new(4);
        for _ in 0..1000 {
            let mut b = vec![0u8; 64];
            mutate(&mut rng, &mut b);
            let first = b.iter().position(|&x| x != 0);
            let last = b.iter().rposition(|&x| x != 0);
            if let (Some(f), Some(l)) = (first, last) {
                assert!(l - f < 8, "{b:?}");
            }
        }
    }
}
