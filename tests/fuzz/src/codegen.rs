//! Guest code: random bytes mixed with instructions that make a VMM's
//! life hard, encoded for the mode the guest starts in (SDM Vol. 2,
//! chapter 2 "Instruction Format"): port I/O (also REP INS/OUTS), memory
//! accesses to RAM, to holes (MMIO) and beyond, CPUID, RDMSR/WRMSR of
//! interesting MSRs, HLT, INT3, UD2, moves to and from control and debug
//! registers, XSETBV, VMCALL/VMMCALL, LGDT/LIDT of random operands,
//! STI/CLI, segment loads, jumps to random places and to themselves.
//!
//! No RDTSC, RDRAND, RDPMC or clock MSRs on purpose: their values differ
//! from run to run, and a guest that branches on them would make the
//! guests phase depend on more than its seed (random bytes still produce
//! them rarely).
//!
//! Context: pure logic.

use crate::arch::{CLOCK_MSRS, INTERESTING_MSRS};
use crate::modes::{layout, Mode};
use crate::rng::Rng;

/// General registers by their encoding (SDM Vol. 2A, Table 2-1).
const EAX: u8 = 0;
const ECX: u8 = 1;
const EDX: u8 = 2;
const ESI: u8 = 6;
const EDI: u8 = 7;

/// An instruction stream for one mode.
struct Asm {
    mode: Mode,
    out: Vec<u8>,
}

fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | ((reg & 7) << 3) | (rm & 7)
}

impl Asm {
    fn b(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// `mov r32, imm32` (zero-extending in long mode).
    fn mov_imm(&mut self, reg: u8, v: u32) {
        if self.mode == Mode::Real {
            self.b(&[0x66]);
        }
        self.b(&[0xb8 + reg]);
        self.b(&v.to_le_bytes());
    }

    /// `opcode` with an absolute memory operand at `addr` and `reg` in
    /// ModRM.reg (16-bit addressing in real mode, a SIB with no base in
    /// long mode so that it is not RIP-relative).
    fn mem(&mut self, opcode: &[u8], reg: u8, addr: u64) {
        self.b(opcode);
        match self.mode {
            Mode::Real => {
                self.b(&[modrm(0, reg, 6)]);
                self.b(&(addr as u16).to_le_bytes());
            }
            Mode::Protected => {
                self.b(&[modrm(0, reg, 5)]);
                self.b(&(addr as u32).to_le_bytes());
            }
            Mode::Long => {
                self.b(&[modrm(0, reg, 4), 0x25]);
                self.b(&(addr as u32).to_le_bytes());
            }
        }
    }
}

/// Instructions a guest kernel uses that a hypervisor must handle or
/// refuse: wbinvd, invd, clts, pause, monitor, mwait, syscall, sysenter,
/// swapgs.
const PRIVILEGED: [&[u8]; 9] = [
    &[0x0f, 0x09],
    &[0x0f, 0x08],
    &[0x0f, 0x06],
    &[0xf3, 0x90],
    &[0x0f, 0x01, 0xc8],
    &[0x0f, 0x01, 0xc9],
    &[0x0f, 0x05],
    &[0x0f, 0x34],
    &[0x0f, 0x01, 0xf8],
];

/// An address a guest touches: RAM, its own tables, holes in the physical
/// address space (MMIO exits), the local APIC page, or far beyond.
fn address(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=2 => rng.below(layout::RAM),
        3 => rng.below(layout::CODE),
        4..=6 => layout::RAM + rng.below((1 << 32) - layout::RAM),
        7 => *rng.pick(&[0xfee0_0000, 0xfec0_0000, 0xfed0_0000, 0xa0000, 0xffff_fff0]),
        8 => rng.below(1 << 40),
        _ => rng.boundary_u64(),
    }
}

/// A port: the PC's well-known ones or any.
fn port(rng: &mut Rng) -> u16 {
    if rng.chance(1, 2) {
        *rng.pick(&[
            0x20, 0x21, 0x40, 0x43, 0x60, 0x64, 0x70, 0x71, 0x80, 0x92, 0x3f8, 0x3fd, 0xcf8, 0xcfc,
            0x510, 0xffff,
        ])
    } else {
        rng.next_u32() as u16
    }
}

/// About `len` bytes of guest code for `mode`.
pub fn generate(rng: &mut Rng, mode: Mode, len: usize) -> Vec<u8> {
    let mut a = Asm {
        mode,
        out: Vec::with_capacity(len + 32),
    };
    let long = mode == Mode::Long;
    while a.out.len() < len {
        match rng.weighted(&[
            10, 8, 6, 6, 4, 10, 3, 4, 5, 5, 4, 4, 3, 2, 3, 3, 4, 5, 3, 1, 3, 2, 2,
        ]) {
            0 => {
                let mut junk = vec![0u8; rng.range(1, 6) as usize];
                rng.fill(&mut junk);
                a.b(&junk);
            }
            1 => {
                a.mov_imm(EAX, rng.next_u32());
                let op = *rng.pick(&[&[0xe6][..], &[0xe7], &[0x66, 0xe7]]);
                a.b(op);
                a.b(&[port(rng) as u8]);
            }
            2 => {
                let op = *rng.pick(&[&[0xe4][..], &[0xe5], &[0x66, 0xe5]]);
                a.b(op);
                a.b(&[port(rng) as u8]);
            }
            3 => {
                a.mov_imm(EDX, u32::from(port(rng)));
                a.mov_imm(EAX, rng.next_u32());
                a.b(&[*rng.pick(&[0xec, 0xed, 0xee, 0xef])]);
            }
            4 => {
                let count = if rng.chance(3, 4) {
                    rng.range(1, 64) as u32
                } else {
                    rng.boundary_u32()
                };
                a.mov_imm(ECX, count);
                a.mov_imm(EDX, u32::from(port(rng)));
                a.mov_imm(EDI, address(rng) as u32);
                a.mov_imm(ESI, address(rng) as u32);
                a.b(&[0xf3, *rng.pick(&[0x6c, 0x6d, 0x6e, 0x6f])]);
            }
            5 => {
                a.mov_imm(EAX, rng.next_u32());
                let store = rng.chance(1, 2);
                let addr = address(rng);
                if long && addr >= 1 << 31 {
                    // movabs with a 64-bit address.
                    a.b(&[if store { 0xa3 } else { 0xa1 }]);
                    a.b(&addr.to_le_bytes());
                } else {
                    a.mem(&[if store { 0x89 } else { 0x8b }], EAX, addr);
                }
            }
            6 => {
                let addr = address(rng);
                a.mem(&[0xc6], 0, addr);
                a.b(&[rng.next_u32() as u8]);
            }
            7 => {
                let any = rng.next_u32();
                let leaf = *rng.pick(&[
                    0,
                    1,
                    4,
                    7,
                    0xb,
                    0xd,
                    0x14,
                    0x8000_0000,
                    0x8000_0001,
                    0x8000_0008,
                    0x4000_0000,
                    any,
                ]);
                a.mov_imm(EAX, leaf);
                a.mov_imm(ECX, rng.below(4) as u32);
                a.b(&[0x0f, 0xa2]);
            }
            8 => {
                let msr = if rng.chance(4, 5) {
                    *rng.pick(&INTERESTING_MSRS)
                } else {
                    rng.next_u32()
                };
                let msr = if CLOCK_MSRS.contains(&msr) {
                    x86::msr::IA32_EFER
                } else {
                    msr
                };
                a.mov_imm(ECX, msr);
                if rng.chance(1, 2) {
                    a.b(&[0x0f, 0x32]);
                } else {
                    let v = rng.boundary_u64();
                    a.mov_imm(EAX, v as u32);
                    a.mov_imm(EDX, (v >> 32) as u32);
                    a.b(&[0x0f, 0x30]);
                }
            }
            9 => a.b(&[0xf4]),
            10 => {
                // int3, int n, ud2, icebp
                let int_n = [0xcd, rng.next_u32() as u8];
                let op = *rng.pick(&[&[0xcc][..], &int_n, &[0x0f, 0x0b], &[0xf1]]);
                a.b(op);
            }
            11 => {
                let cr = *rng.pick(&[0u8, 2, 3, 4]);
                a.mov_imm(EAX, rng.boundary_u32());
                if rng.chance(1, 2) {
                    a.b(&[0x0f, 0x22, modrm(3, cr, EAX)]);
                } else {
                    a.b(&[0x0f, 0x20, modrm(3, cr, EAX)]);
                }
                if long && rng.chance(1, 4) {
                    // mov cr8, rax
                    a.b(&[0x44, 0x0f, 0x22, modrm(3, 0, EAX)]);
                }
            }
            12 => {
                let dr = *rng.pick(&[0u8, 1, 2, 3, 6, 7]);
                a.mov_imm(EAX, rng.boundary_u32());
                let op = if rng.chance(1, 2) { 0x23 } else { 0x21 };
                a.b(&[0x0f, op, modrm(3, dr, EAX)]);
            }
            13 => {
                a.b(&[0x31, 0xc9]); // xor ecx, ecx: XCR0
                let any = rng.next_u32();
                a.mov_imm(EAX, *rng.pick(&[1, 3, 7, 0xe7, 0, 2, any]));
                a.mov_imm(EDX, if rng.chance(3, 4) { 0 } else { rng.next_u32() });
                a.b(&[0x0f, 0x01, *rng.pick(&[0xd1, 0xd0])]);
            }
            14 => a.b(&[0x0f, 0x01, *rng.pick(&[0xc1, 0xd9])]),
            15 => {
                let which = *rng.pick(&[0u8, 1, 2, 3]); // sgdt, sidt, lgdt, lidt
                a.mem(&[0x0f, 0x01], which, address(rng));
            }
            16 => a.b(&[*rng.pick(&[0xfb, 0xfa, 0x9c, 0x9d, 0xcf])]),
            17 => match rng.below(4) {
                0 => a.b(&[0xeb, 0xfe]),
                1 => a.b(&[0xeb, rng.next_u32() as u8]),
                2 => {
                    a.b(&[0xe9]);
                    let rel = rng.below(layout::CODE_MAX) as u32;
                    a.b(&if mode == Mode::Real {
                        (rel as u16).to_le_bytes().to_vec()
                    } else {
                        rel.to_le_bytes().to_vec()
                    });
                }
                _ => {
                    // An indirect jump to a random place in RAM.
                    a.mov_imm(EAX, rng.below(layout::RAM) as u32);
                    a.b(&[0xff, modrm(3, 4, EAX)]);
                }
            },
            18 => {
                let any = rng.next_u32() & 0xffff;
                a.mov_imm(
                    EAX,
                    *rng.pick(&[0, 0x8, 0x10, 0x18, 0x28, 0x33, 0x1000, any]),
                );
                a.b(&[0x8e, modrm(3, *rng.pick(&[0u8, 2, 3, 4, 5]), EAX)]);
            }
            19 => {
                a.mov_imm(EAX, rng.next_u32() & 0xffff);
                a.b(&[0x0f, 0x00, modrm(3, *rng.pick(&[2u8, 3]), EAX)]); // lldt, ltr
            }
            20 => {
                let op = *rng.pick(&PRIVILEGED);
                a.b(op);
                if rng.chance(1, 4) {
                    a.mem(&[0x0f, 0x01], 7, address(rng)); // invlpg
                }
            }
            21 => {
                a.mov_imm(4, address(rng) as u32); // esp
                a.b(&[*rng.pick(&[0x50, 0x58, 0x9c, 0x60])]);
            }
            _ => {
                let n = rng.range(1, 8) as usize;
                a.b(&vec![0x90; n]);
            }
        }
    }
    a.out
}

/// One-byte opcodes that clear IF: CLI, POPF, IRET.
const IF_CLEARING_OPCODES: [u8; 3] = [0xfa, 0x9d, 0xcf];

/// Second bytes after 0x0F of the instructions that continue with IF
/// cleared by a value the guest controls: SYSCALL (RFLAGS &= ~SFMASK),
/// SYSRET (RFLAGS = R11), SYSENTER (IF cleared).
const IF_CLEARING_0F: [u8; 3] = [0x05, 0x07, 0x34];

/// `--interrupts-on` (cli.rs): makes `bytes`, code or data a guest may
/// run, free of what would leave it running with IF clear, by turning the
/// opcode byte into a NOP wherever it occurs (at any alignment, since a
/// guest may jump into the middle of an instruction): CLI, POPF and IRET;
/// SYSCALL, SYSRET and SYSENTER; and LGDT and LIDT (0F 01 /2, /3 with a
/// memory operand), which would send interrupts through tables the
/// fuzzer does not control. Task switches and code the guest writes
/// itself remain; the report counts runs that still ended with IF clear.
pub fn keep_interrupts_on(bytes: &mut [u8]) {
    const NOP: u8 = 0x90;
    // From the end: the bytes after `i` are final when `i` is decided, so
    // a NOP put in (0x90 is also a ModRM byte: /2) is judged too.
    for i in (0..bytes.len()).rev() {
        let next = bytes.get(i + 1).copied();
        let after = bytes.get(i + 2).copied();
        let two_byte = bytes[i] == 0x0f
            && match next {
                Some(op) if IF_CLEARING_0F.contains(&op) => true,
                Some(0x01) => after.is_some_and(|m| m >> 6 != 3 && matches!((m >> 3) & 7, 2 | 3)),
                _ => false,
            };
        if two_byte || IF_CLEARING_OPCODES.contains(&bytes[i]) {
            bytes[i] = NOP;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupts_on_code_has_no_way_to_clear_if() {
        // cli; popf; iret; syscall; sysret; sysenter; lidt [bx]; lgdt [eax]
        let mut code = vec![
            0xfa, 0x9d, 0xcf, 0x0f, 0x05, 0x0f, 0x07, 0x0f, 0x34, 0x0f, 0x01, 0x1f, 0x0f, 0x01,
            0x10,
        ];
        keep_interrupts_on(&mut code);
        assert_eq!(
            code,
            [
                0x90, 0x90, 0x90, 0x90, 0x05, 0x90, 0x07, 0x90, 0x34, 0x90, 0x01, 0x1f, 0x90, 0x01,
                0x10
            ]
        );
        // XGETBV (0F 01 D0: register form of /2), SGDT, CPUID stay.
        let mut kept = vec![0x0f, 0x01, 0xd0, 0x0f, 0x01, 0x00, 0x0f, 0xa2, 0x0f];
        // IRET as the ModRM byte of 0F 01 becomes a NOP, which is LGDT's.
        let mut nested = vec![0x0f, 0x01, 0xcf];
        keep_interrupts_on(&mut nested);
        assert_eq!(nested, [0x90, 0x01, 0x90]);
        let before = kept.clone();
        keep_interrupts_on(&mut kept);
        assert_eq!(kept, before);
    }

    #[test]
    fn interrupts_on_holds_for_any_generated_code() {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let mut junk = vec![0u8; 4096];
            rng.fill(&mut junk);
            keep_interrupts_on(&mut junk);
            let mode = Mode::ALL[(seed % 3) as usize];
            let mut code = generate(&mut rng, mode, 4096);
            keep_interrupts_on(&mut code);
            for bytes in [&code, &junk] {
                for (i, w) in bytes.windows(3).enumerate() {
                    assert!(!IF_CLEARING_OPCODES.contains(&w[0]), "seed {seed} at {i}");
                    assert!(
                        !(w[0] == 0x0f && IF_CLEARING_0F.contains(&w[1])),
                        "seed {seed} at {i}"
                    );
                    let lxdt = w[0] == 0x0f
                        && w[1] == 0x01
                        && w[2] >> 6 != 3
                        && matches!((w[2] >> 3) & 7, 2 | 3);
                    assert!(!lxdt, "seed {seed} at {i}");
                }
                let tail = &bytes[bytes.len() - 2..];
                assert!(
                    !tail.iter().any(|b| IF_CLEARING_OPCODES.contains(b)),
                    "seed {seed}: {tail:x?}"
                );
                assert!(
                    !(tail[0] == 0x0f && IF_CLEARING_0F.contains(&tail[1])),
                    "seed {seed}: {tail:x?}"
                );
            }
        }
    }

    #[test]
    fn code_has_about_the_asked_length_in_every_mode() {
        let mut rng = Rng::new(1);
        for mode in Mode::ALL {
            let code = generate(&mut rng, mode, 1000);
            assert!(
                code.len() >= 1000 && code.len() < 1100,
                "{mode:?}: {}",
                code.len()
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_code() {
        let a = generate(&mut Rng::new(7), Mode::Long, 4096);
        let b = generate(&mut Rng::new(7), Mode::Long, 4096);
        assert_eq!(a, b);
    }

    #[test]
    fn useful_instructions_appear() {
        let code = generate(&mut Rng::new(3), Mode::Protected, 20_000);
        let has = |pat: &[u8]| code.windows(pat.len()).any(|w| w == pat);
        assert!(has(&[0x0f, 0xa2]), "cpuid");
        assert!(has(&[0xf4]), "hlt");
        assert!(has(&[0x0f, 0x01, 0xd1]), "xsetbv");
        assert!(has(&[0xeb, 0xfe]), "jmp $");
    }

    #[test]
    fn absolute_operands_are_not_rip_relative_in_long_mode() {
        let mut a = Asm {
            mode: Mode::Long,
            out: Vec::new(),
        };
        a.mem(&[0x89], EAX, 0x1234);
        assert_eq!(a.out, [0x89, 0x04, 0x25, 0x34, 0x12, 0, 0]);
    }
}
