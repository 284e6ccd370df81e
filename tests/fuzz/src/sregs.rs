//! KVM_SET_SREGS under attack: random perturbations of segment,
//! descriptor-table and control-register state, and the states that a
//! device must refuse with EINVAL because no CPU can be in them (KVM's
//! `kvm_is_valid_sregs()`, arch/x86/kvm/x86.c, after the SDM's rules for
//! CR0, CR4 and IA-32e mode: Vol. 3A 2.5 "Control Registers" and 10.8.5
//! "Initializing IA-32e Mode").
//!
//! Context: pure logic.

use kvm_bindings::{kvm_segment, kvm_sregs};

use crate::arch::*;
use crate::rng::Rng;

/// Why no CPU can be in `s`, if it cannot: the device must refuse it.
pub fn must_refuse(s: &kvm_sregs) -> Option<&'static str> {
    let long_paging = s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0;
    if s.cr0 >> 32 != 0 {
        Some("CR0 bits 63:32 set")
    } else if s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        Some("CR0.PG without CR0.PE")
    } else if s.cr0 & CR0_NW != 0 && s.cr0 & CR0_CD == 0 {
        Some("CR0.NW without CR0.CD")
    } else if s.cr4 & CR4_RESERVED_HIGH != 0 {
        Some("CR4 bits 63:48 set")
    } else if long_paging && s.cr4 & CR4_PAE == 0 {
        Some("EFER.LME and CR0.PG without CR4.PAE")
    } else if long_paging && s.efer & EFER_LMA == 0 {
        Some("EFER.LME and CR0.PG without EFER.LMA")
    } else if !long_paging && s.efer & EFER_LMA != 0 {
        Some("EFER.LMA without EFER.LME and CR0.PG")
    } else {
        None
    }
}

/// Applies 1 to 3 random perturbations to `s`.
pub fn perturb(rng: &mut Rng, s: &mut kvm_sregs) {
    for _ in 0..rng.range(1, 3) {
        match rng.below(12) {
            0 => s.cr0 ^= 1 << rng.below(32),
            1 => s.cr0 ^= 1 << rng.range(29, 63),
            2 => {
                s.cr4 ^= 1
                    << if rng.chance(3, 4) {
                        rng.below(26)
                    } else {
                        rng.range(26, 63)
                    }
            }
            3 => {
                s.efer ^= *rng.pick(&[
                    EFER_SCE,
                    EFER_LME,
                    EFER_LMA,
                    EFER_NXE,
                    1 << 12,
                    1 << 13,
                    1 << 14,
                    1 << 63,
                ])
            }
            4 => s.cr3 = rng.boundary_u64(),
            5 => {
                s.cr2 = rng.boundary_u64();
                s.cr8 = if rng.chance(1, 2) {
                    rng.below(16)
                } else {
                    rng.boundary_u64()
                };
            }
            6 => s.apic_base = rng.boundary_u64(),
            7 | 8 => {
                let seg = segment_mut(s, rng.below(8) as usize);
                perturb_segment(rng, seg);
            }
            9 => {
                let t = if rng.chance(1, 2) {
                    &mut s.gdt
                } else {
                    &mut s.idt
                };
                t.base = rng.boundary_u64();
                t.limit = rng.boundary_u32() as u16;
            }
            10 => s.interrupt_bitmap[rng.below(4) as usize] |= 1 << rng.below(64),
            _ => {
                // A consistent switch to another mode, with nothing else set up.
                s.cr0 |= CR0_PE | if rng.chance(1, 2) { CR0_PG } else { 0 };
                if rng.chance(1, 2) {
                    s.efer |= EFER_LME | EFER_LMA;
                    s.cr4 |= CR4_PAE;
                }
            }
        }
    }
}

/// Segment register `i`: cs, ds, es, fs, gs, ss, tr, ldt.
pub fn segment_mut(s: &mut kvm_sregs, i: usize) -> &mut kvm_segment {
    match i {
        0 => &mut s.cs,
        1 => &mut s.ds,
        2 => &mut s.es,
        3 => &mut s.fs,
        4 => &mut s.gs,
        5 => &mut s.ss,
        6 => &mut s.tr,
        _ => &mut s.ldt,
    }
}

fn perturb_segment(rng: &mut Rng, seg: &mut kvm_segment) {
    match rng.below(7) {
        0 => seg.base = rng.boundary_u64(),
        1 => seg.limit = rng.boundary_u32(),
        2 => seg.selector = rng.next_u32() as u16,
        3 => seg.type_ = rng.below(16) as u8,
        4 => {
            // One attribute bit, sometimes with a value no bit can have.
            let v = if rng.chance(1, 4) {
                rng.next_u32() as u8
            } else {
                rng.below(2) as u8
            };
            match rng.below(8) {
                0 => seg.present = v,
                1 => seg.dpl = v & 3,
                2 => seg.db = v,
                3 => seg.s = v,
                4 => seg.l = v,
                5 => seg.g = v,
                6 => seg.avl = v,
                _ => seg.unusable = v,
            }
        }
        5 => seg.dpl = rng.below(4) as u8,
        _ => {
            *seg = kvm_segment {
                unusable: 1,
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat_long_mode() -> kvm_sregs {
        kvm_sregs {
            cr0: CR0_PE | CR0_PG | CR0_ET,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..Default::default()
        }
    }

    #[test]
    fn the_reset_state_and_long_mode_are_valid() {
        let reset = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        assert_eq!(must_refuse(&reset), None);
        assert_eq!(must_refuse(&flat_long_mode()), None);
        let protected = kvm_sregs {
            cr0: CR0_PE | CR0_ET,
            ..Default::default()
        };
        assert_eq!(must_refuse(&protected), None);
    }

    #[test]
    fn impossible_states_are_named() {
        type Break = fn(&mut kvm_sregs);
        let cases: [(Break, &str); 7] = [
            (|s| s.cr0 |= 1 << 40, "CR0 bits 63:32"),
            (|s| s.cr0 &= !CR0_PE, "CR0.PG without CR0.PE"),
            (|s| s.cr0 |= CR0_NW, "CR0.NW without CR0.CD"),
            (|s| s.cr4 |= 1 << 63, "CR4 bits 63:48"),
            (|s| s.cr4 &= !CR4_PAE, "without CR4.PAE"),
            (|s| s.efer &= !EFER_LMA, "without EFER.LMA"),
            (|s| s.cr0 &= !CR0_PG, "EFER.LMA without"),
        ];
        for (break_it, name) in cases {
            let mut s = flat_long_mode();
            break_it(&mut s);
            let why = must_refuse(&s);
            assert!(why.is_some_and(|w| w.contains(name)), "{name}: {why:?}");
        }
        // NW with CD is a valid (if slow) combination.
        let mut s = flat_long_mode();
        s.cr0 |= CR0_NW | CR0_CD;
        assert_eq!(must_refuse(&s), None);
    }

    #[test]
    fn perturbations_break_the_rules_some_of_the_time() {
        let mut rng = Rng::new(4);
        let mut refused = 0;
        for _ in 0..2000 {
            let mut s = flat_long_mode();
            perturb(&mut rng, &mut s);
            refused += usize::from(must_refuse(&s).is_some());
        }
        assert!(
            refused > 100 && refused < 1900,
            "{refused} of 2000 must be refused"
        );
    }
}
