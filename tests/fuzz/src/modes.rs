//! The CPU modes a guest starts in, and the memory layout that makes them
//! work: real mode (with an IVT), 32-bit protected mode with flat segments
//! (GDT, IDT, TSS), and 64-bit long mode with identity-mapped 2 MiB pages
//! over the first GiB (SDM Vol. 3A, 10.8.5 "Initializing IA-32e Mode";
//! 4.5 "4-Level Paging"). KVM_SET_SREGS sets the hidden segment state
//! directly; the tables in memory are there for what the guest's code
//! does with them (far jumps, interrupts, IRET).
//!
//! Context: pure logic on guest memory bytes.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::arch::*;
use crate::rng::Rng;

/// Guest-physical addresses of the guest's structures, all in the first
/// 2 MiB slot.
pub mod layout {
    /// The real-mode IVT (256 far pointers).
    pub const IVT: u64 = 0x0;
    /// The GDT.
    pub const GDT: u64 = 0x1000;
    /// The IDT (256 gates of 8 or 16 bytes).
    pub const IDT: u64 = 0x2000;
    /// The TSS.
    pub const TSS: u64 = 0x3000;
    /// PML4, PDPT and PD of long mode.
    pub const PML4: u64 = 0x4000;
    /// The PDPT.
    pub const PDPT: u64 = 0x5000;
    /// The PD: 512 entries of 2 MiB.
    pub const PD: u64 = 0x6000;
    /// Interrupt handler stubs: `hlt; iret` (`hlt; jmp $-1` for
    /// `--interrupts-on`).
    pub const STUBS: u64 = 0x7000;
    /// The initial stack pointer (the stack grows down from here).
    pub const STACK_TOP: u64 = 0x8000;
    /// The code.
    pub const CODE: u64 = 0x1_0000;
    /// Room for code.
    pub const CODE_MAX: u64 = 0x1_0000;
    /// The size of the RAM slot at 0.
    pub const RAM: u64 = 2 << 20;
}

/// GDT selectors.
pub mod sel {
    /// Flat 32-bit code.
    pub const CODE32: u16 = 0x08;
    /// Flat data.
    pub const DATA: u16 = 0x10;
    /// The TSS (16 bytes in long mode).
    pub const TSS: u16 = 0x18;
    /// 64-bit code.
    pub const CODE64: u16 = 0x28;
}

/// A start mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Real mode, CS = 0x1000 (base 0x10000).
    Real,
    /// 32-bit protected mode, flat segments, no paging.
    Protected,
    /// 64-bit long mode, identity-mapped first GiB.
    Long,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Real, Mode::Protected, Mode::Long];

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Real => "real",
            Mode::Protected => "protected",
            Mode::Long => "long",
        }
    }
}

/// A flat descriptor (SDM Vol. 3A, 3.4.5, Figure 3-8): base 0, limit
/// 0xfffff in 4 KiB units, with `access` (P, DPL, S, type) and `flags`
/// (G, D/B, L).
const fn flat_descriptor(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The 8 or 16 bytes of a system descriptor of `kind` at `base`.
fn system_descriptor(base: u64, limit: u64, kind: u8) -> [u64; 2] {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(kind) << 40)
        | (1 << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

fn put64(mem: &mut [u8], at: u64, v: u64) {
    mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes the tables of `mode` into `mem` (guest-physical 0 onwards):
/// IVT, GDT, IDT, TSS, page tables and handler stubs. Interrupt vectors
/// lead into the code at random places or to a `hlt; iret` stub.
///
/// With `halting_handlers` every vector goes to a stub that halts for good
/// (for `--interrupts-on`: a handler in random code, or an IRET, would run
/// on with IF clear).
pub fn write_tables(
    mem: &mut [u8],
    mode: Mode,
    code_len: u64,
    rng: &mut Rng,
    halting_handlers: bool,
) {
    let stub = layout::STUBS;
    let stubs: [u8; 5] = if halting_handlers {
        // hlt; jmp $-1: halts for good. No IRET anywhere: a guest that
        // jumps here without an interrupt frame would pop its IF from
        // whatever the stack holds.
        [0xf4, 0xeb, 0xfd, 0xf4, 0xf4]
    } else {
        // hlt; iret, and at stub + 2: hlt; iretq.
        [0xf4, 0xcf, 0xf4, 0x48, 0xcf]
    };
    mem[stub as usize..stub as usize + 5].copy_from_slice(&stubs);
    let handler = |rng: &mut Rng| {
        // Both draws happen either way, so that the rest of the run takes
        // the same random numbers with and without `halting_handlers`.
        if rng.chance(1, 2) && !halting_handlers {
            layout::CODE + rng.below(code_len.max(1))
        } else if mode == Mode::Long && !halting_handlers {
            stub + 2
        } else {
            stub
        }
    };
    match mode {
        Mode::Real => {
            for v in 0..256u64 {
                let target = handler(rng);
                // A far pointer: offset, then segment (paragraphs).
                let (seg, off) = (target >> 4 & 0xf000, target & 0xffff);
                let entry = off | (seg << 16);
                mem[(layout::IVT + 4 * v) as usize..(layout::IVT + 4 * v + 4) as usize]
                    .copy_from_slice(&(entry as u32).to_le_bytes());
            }
        }
        Mode::Protected | Mode::Long => {
            let gdt = [0, flat_descriptor(0x9b, 0xc), flat_descriptor(0x93, 0xc)];
            for (i, d) in gdt.iter().enumerate() {
                put64(mem, layout::GDT + 8 * i as u64, *d);
            }
            let [tss_low, tss_high] = system_descriptor(layout::TSS, 0x67, seg::TSS_BUSY);
            put64(mem, layout::GDT + u64::from(sel::TSS), tss_low);
            put64(mem, layout::GDT + u64::from(sel::TSS) + 8, tss_high);
            put64(
                mem,
                layout::GDT + u64::from(sel::CODE64),
                flat_descriptor(0x9b, 0xa),
            );
            // The rest of the GDT: sometimes garbage, for segment loads.
            for i in 6..32u64 {
                let d = if rng.chance(1, 4) { rng.next_u64() } else { 0 };
                put64(mem, layout::GDT + 8 * i, d);
            }
            let long = mode == Mode::Long;
            let code = if long { sel::CODE64 } else { sel::CODE32 };
            for v in 0..256u64 {
                let target = handler(rng);
                let gate = (target & 0xffff)
                    | (u64::from(code) << 16)
                    | (u64::from(0x80 | seg::INTERRUPT_GATE) << 40)
                    | ((target >> 16 & 0xffff) << 48);
                // Sometimes garbage (drawn either way, as above), but not
                // for `--interrupts-on`: it may be a gate into random code.
                let garbage = rng.chance(1, 32).then(|| rng.next_u64());
                let gate = match garbage {
                    Some(g) if !halting_handlers => g,
                    _ => gate,
                };
                if long {
                    put64(mem, layout::IDT + 16 * v, gate);
                    put64(mem, layout::IDT + 16 * v + 8, target >> 32);
                } else {
                    put64(mem, layout::IDT + 8 * v, gate);
                }
            }
            if long {
                put64(mem, layout::PML4, layout::PDPT | PTE_P | PTE_RW);
                put64(mem, layout::PDPT, layout::PD | PTE_P | PTE_RW);
                for i in 0..512 {
                    put64(mem, layout::PD + 8 * i, (i << 21) | PTE_P | PTE_RW | PTE_PS);
                }
            }
        }
    }
}

/// The guest-physical ranges that decide where an interrupt in `mode`
/// goes: the IVT, or the GDT and IDT; and the handler stubs. Under
/// `--interrupts-on` a guest run ends at the first exit after the guest
/// changed any of them (cli.rs). The CPU itself writes none of them: the
/// descriptors are loaded accessed, and the TSS busy.
pub fn guarded(mode: Mode) -> [core::ops::Range<u64>; 3] {
    let stubs = layout::STUBS..layout::STUBS + 5;
    match mode {
        Mode::Real => [layout::IVT..layout::IVT + 0x400, stubs, 0..0],
        Mode::Protected => [
            layout::GDT..layout::GDT + 0x100,
            layout::IDT..layout::IDT + 0x800,
            stubs,
        ],
        Mode::Long => [
            layout::GDT..layout::GDT + 0x100,
            layout::IDT..layout::IDT + 0x1000,
            stubs,
        ],
    }
}

fn segment(selector: u16, base: u64, limit: u32, type_: u8, code_or_data: bool) -> kvm_segment {
    kvm_segment {
        base,
        limit,
        selector,
        type_,
        present: 1,
        s: u8::from(code_or_data),
        ..Default::default()
    }
}

/// `template` (a vCPU's KVM_GET_SREGS) switched to `mode`.
pub fn sregs(mode: Mode, template: &kvm_sregs) -> kvm_sregs {
    let mut s = *template;
    s.interrupt_bitmap = [0; 4];
    match mode {
        Mode::Real => {
            let code_seg = (layout::CODE >> 4) as u16;
            s.cs = segment(code_seg, layout::CODE, 0xffff, seg::CODE_RX_ACCESSED, true);
            let data = segment(0, 0, 0xffff, seg::DATA_RW_ACCESSED, true);
            (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
            s.cr0 = CR0_ET;
            s.cr4 = 0;
            s.efer = 0;
            s.gdt.base = layout::GDT;
            s.idt.base = layout::IVT;
            s.idt.limit = 0x3ff;
        }
        Mode::Protected | Mode::Long => {
            let long = mode == Mode::Long;
            let mut code = segment(
                if long { sel::CODE64 } else { sel::CODE32 },
                0,
                0xffff_ffff,
                seg::CODE_RX_ACCESSED,
                true,
            );
            code.g = 1;
            code.db = u8::from(!long);
            code.l = u8::from(long);
            let mut data = segment(sel::DATA, 0, 0xffff_ffff, seg::DATA_RW_ACCESSED, true);
            data.g = 1;
            data.db = 1;
            s.cs = code;
            (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
            s.tr = segment(sel::TSS, layout::TSS, 0x67, seg::TSS_BUSY, false);
            s.gdt.base = layout::GDT;
            s.gdt.limit = 0xff;
            s.idt.base = layout::IDT;
            s.idt.limit = if long { 0xfff } else { 0x7ff };
            s.cr0 = CR0_PE | CR0_ET | CR0_NE;
            s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
            s.efer = 0;
            if long {
                s.cr0 |= CR0_PG | CR0_WP;
                s.cr3 = layout::PML4;
                s.cr4 |= CR4_PAE;
                s.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE;
            }
        }
    }
    s
}

/// Registers for a start at `entry` (an offset into the code) in `mode`:
/// RFLAGS random but for bit 1, some of the time.
pub fn regs(mode: Mode, entry: u64, rng: &mut Rng) -> kvm_regs {
    let rip = if mode == Mode::Real {
        entry
    } else {
        layout::CODE + entry
    };
    let mut r = kvm_regs {
        rip,
        rsp: layout::STACK_TOP,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
    if rng.chance(1, 3) {
        // IF, TF, DF, AC, IOPL, NT, RF and the arithmetic flags; VM rarely.
        let mask = 0x7_7fd5 & !RFLAGS_VM | if rng.chance(1, 16) { RFLAGS_VM } else { 0 };
        r.rflags |= rng.next_u64() & mask;
    }
    if rng.chance(1, 3) {
        r.rflags |= RFLAGS_IF;
    }
    for reg in [&mut r.rax, &mut r.rbx, &mut r.rdx, &mut r.rsi, &mut r.rdi] {
        *reg = if rng.chance(1, 2) {
            rng.below(layout::RAM)
        } else {
            rng.boundary_u64()
        };
    }
    // RCX counts LOOP and REP iterations: mostly few, so that a guest's
    // time between exits rarely approaches the time bound.
    r.rcx = if rng.chance(7, 8) {
        rng.below(256)
    } else {
        rng.boundary_u64()
    };
    if rng.chance(1, 8) {
        r.rsp = rng.boundary_u64();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        // The classic flat 32-bit code and data descriptors.
        assert_eq!(flat_descriptor(0x9b, 0xc), 0x00cf_9b00_0000_ffff);
        assert_eq!(flat_descriptor(0x93, 0xc), 0x00cf_9300_0000_ffff);
        assert_eq!(flat_descriptor(0x9b, 0xa), 0x00af_9b00_0000_ffff);
        // Limit 0x67, base bits 23:0 and 31:24, type 0xb with P set.
        let [low, high] = system_descriptor(0x1234_5678_9abc, 0x67, seg::TSS_BUSY);
        assert_eq!(low, 0x5600_8b78_9abc_0067);
        assert_eq!(high, 0x1234);
    }

    #[test]
    fn long_mode_tables_map_the_first_gib() {
        let mut mem = vec![0u8; layout::RAM as usize];
        write_tables(&mut mem, Mode::Long, 16, &mut Rng::new(1), false);
        let at = |a: u64| {
            u64::from_le_bytes(mem[a as usize..a as usize + 8].try_into().expect("8 bytes"))
        };
        assert_eq!(at(layout::PML4) & !0xfff, layout::PDPT);
        assert_eq!(at(layout::PDPT) & !0xfff, layout::PD);
        assert_eq!(
            at(layout::PD + 8 * 511),
            (511 << 21) | PTE_P | PTE_RW | PTE_PS
        );
        assert_eq!(
            at(layout::GDT + u64::from(sel::CODE64)),
            0x00af_9b00_0000_ffff
        );
    }

    #[test]
    fn halting_handlers_lead_every_vector_to_a_stub_without_iret() {
        for mode in Mode::ALL {
            for seed in 0..20 {
                let mut mem = vec![crate::cli::HLT; layout::RAM as usize];
                write_tables(&mut mem, mode, 4096, &mut Rng::new(seed), true);
                let stubs = &mem[layout::STUBS as usize..layout::STUBS as usize + 5];
                assert!(!stubs.contains(&0xcf), "{mode:?}: no IRET in {stubs:x?}");
                let at = |a: u64| {
                    u64::from_le_bytes(mem[a as usize..a as usize + 8].try_into().expect("8 bytes"))
                };
                for v in 0..256u64 {
                    let target = match mode {
                        Mode::Real => {
                            let far = at(layout::IVT + 4 * v) & 0xffff_ffff;
                            ((far >> 16) << 4) + (far & 0xffff)
                        }
                        Mode::Protected => {
                            let gate = at(layout::IDT + 8 * v);
                            (gate & 0xffff) | (gate >> 48) << 16
                        }
                        Mode::Long => {
                            let gate = at(layout::IDT + 16 * v);
                            (gate & 0xffff)
                                | (gate >> 48) << 16
                                | at(layout::IDT + 16 * v + 8) << 32
                        }
                    };
                    assert_eq!(target, layout::STUBS, "{mode:?} seed {seed} vector {v}");
                }
            }
        }
    }

    #[test]
    fn mode_sregs_are_states_a_cpu_can_be_in() {
        let template = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        for mode in Mode::ALL {
            let s = sregs(mode, &template);
            assert_eq!(crate::sregs::must_refuse(&s), None, "{mode:?}");
        }
        let long = sregs(Mode::Long, &template);
        assert_eq!((long.cs.l, long.cs.db), (1, 0));
        assert_eq!(sregs(Mode::Real, &template).cs.base, layout::CODE);
    }
}
