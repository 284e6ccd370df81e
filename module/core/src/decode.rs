//! Decoding the instructions an MMIO exit can be emulated for: plain MOV
//! loads and stores (SDM Vol. 2B, "MOV—Move": 88, 89, 8A, 8B, C6 /0, C7 /0,
//! and the accumulator forms A0-A3 with a direct address).
//! Anything else is refused, and the VMM sees KVM_EXIT_INTERNAL_ERROR.
//!
//! Only what emulation needs is extracted: the register or immediate, the
//! operand size and the instruction length. The memory operand's address is
//! not computed: the EPT violation already gave the guest-physical address.

/// A general-purpose register as a MOV names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg {
    /// 0 = RAX ... 15 = R15.
    pub index: u8,
    /// AH, CH, DH or BH (8-bit operand, no REX, index 4-7 meaning 0-3).
    pub high_byte: bool,
}

/// What the MOV does with memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// memory -> register.
    Load(Reg),
    /// register -> memory.
    StoreReg(Reg),
    /// immediate -> memory (sign-extended to the operand size).
    StoreImm(u64),
}

/// A decoded MOV with a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mov {
    /// Bytes of the instruction.
    pub len: u8,
    /// Operand size: 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// The access.
    pub access: Access,
}

/// Code size of the instruction: from CS.D and CS.L (and CR0.PE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSize {
    /// Real mode, or a 16-bit code segment.
    Bits16,
    /// A 32-bit code segment.
    Bits32,
    /// 64-bit mode.
    Bits64,
}

/// Decodes `bytes` (the instruction at RIP, up to 15 bytes).
pub fn decode_mov(bytes: &[u8], code: CodeSize) -> Option<Mov> {
    let mut i = 0;
    let mut opsize_prefix = false;
    let mut addrsize_prefix = false;
    loop {
        match *bytes.get(i)? {
            0x66 => opsize_prefix = true,
            0x67 => addrsize_prefix = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            _ => break,
        }
        i += 1;
        if i > 14 {
            return None;
        }
    }
    let mut rex = 0u8;
    if code == CodeSize::Bits64 && (0x40..=0x4f).contains(bytes.get(i)?) {
        rex = bytes[i];
        i += 1;
    }
    let rex_w = rex & 8 != 0;
    let opcode = *bytes.get(i)?;
    i += 1;
    let wide = match code {
        CodeSize::Bits16 => if opsize_prefix { 4 } else { 2 },
        _ if rex_w => 8,
        _ => if opsize_prefix { 2 } else { 4 },
    };
    if (0xa0..=0xa3).contains(&opcode) {
        // MOV AL/AX/EAX/RAX to or from a direct address (moffs), as wide as
        // the address size.
        let moffs = match code {
            CodeSize::Bits16 => if addrsize_prefix { 4 } else { 2 },
            CodeSize::Bits32 => if addrsize_prefix { 2 } else { 4 },
            CodeSize::Bits64 => if addrsize_prefix { 4 } else { 8 },
        };
        i += moffs;
        if i > 15 || i > bytes.len() {
            return None;
        }
        let acc = Reg { index: 0, high_byte: false };
        let size = if opcode & 1 == 0 { 1 } else { wide };
        let access = if opcode < 0xa2 { Access::Load(acc) } else { Access::StoreReg(acc) };
        return Some(Mov { len: i as u8, size, access });
    }
    let modrm = *bytes.get(i)?;
    i += 1;
    let mode = modrm >> 6;
    if mode == 3 {
        return None; // a register operand: no memory access
    }
    let reg = ((modrm >> 3) & 7) | ((rex & 4) << 1);
    let rm = modrm & 7;
    let addr16 = match code {
        CodeSize::Bits16 => !addrsize_prefix,
        CodeSize::Bits32 => addrsize_prefix,
        CodeSize::Bits64 => false,
    };
    // ModRM displacement (and SIB) lengths: SDM Vol. 2A, Tables 2-1 to 2-3.
    if addr16 {
        i += match (mode, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        };
    } else {
        if rm == 4 {
            let sib = *bytes.get(i)?;
            i += 1;
            if mode == 0 && sib & 7 == 5 {
                i += 4;
            }
        }
        i += match (mode, rm) {
            (0, 5) | (2, _) => 4,
            (1, _) => 1,
            _ => 0,
        };
    }
    let reg8 = Reg { index: if rex == 0 && (4..8).contains(&reg) { reg - 4 } else { reg }, high_byte: rex == 0 && (4..8).contains(&reg) };
    let regw = Reg { index: reg, high_byte: false };
    let (size, access) = match opcode {
        0x88 => (1, Access::StoreReg(reg8)),
        0x89 => (wide, Access::StoreReg(regw)),
        0x8a => (1, Access::Load(reg8)),
        0x8b => (wide, Access::Load(regw)),
        0xc6 | 0xc7 if reg & 7 == 0 => {
            let (size, imm_len) = if opcode == 0xc6 { (1, 1) } else { (wide, if wide == 2 { 2 } else { 4 }) };
            let imm = bytes.get(i..i + imm_len)?;
            i += imm_len;
            let mut raw = [0u8; 8];
            raw[..imm_len].copy_from_slice(imm);
            // Sign-extend a 32-bit immediate for a 64-bit store.
            let value = if imm_len == 4 && size == 8 {
                i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as i64 as u64
            } else {
                u64::from_le_bytes(raw)
            };
            (size, Access::StoreImm(value))
        }
        _ => return None,
    };
    if i > 15 || i > bytes.len() {
        return None;
    }
    Some(Mov { len: i as u8, size, access })
}

#[cfg(test)]
mod tests {
    use super::*;
    use CodeSize::*;

    fn reg(index: u8) -> Reg {
        Reg { index, high_byte: false }
    }

    #[test]
    fn real_mode_moves_with_16_bit_addressing() {
        // mov [0x1234], al ; mov ax, [bx+si] ; mov byte [0x10], 0x5a
        assert_eq!(decode_mov(&[0x88, 0x06, 0x34, 0x12], Bits16), Some(Mov { len: 4, size: 1, access: Access::StoreReg(reg(0)) }));
        assert_eq!(decode_mov(&[0x8b, 0x00], Bits16), Some(Mov { len: 2, size: 2, access: Access::Load(reg(0)) }));
        assert_eq!(decode_mov(&[0xc6, 0x06, 0x10, 0x00, 0x5a], Bits16), Some(Mov { len: 5, size: 1, access: Access::StoreImm(0x5a) }));
        // 0x66 makes it 32-bit: mov eax, [di+0x10]
        assert_eq!(decode_mov(&[0x66, 0x8b, 0x45, 0x10], Bits16), Some(Mov { len: 4, size: 4, access: Access::Load(reg(0)) }));
    }

    #[test]
    fn eight_bit_high_registers_without_rex() {
        // mov [bx], ah
        let m = decode_mov(&[0x88, 0x27], Bits16).unwrap();
        assert_eq!(m.access, Access::StoreReg(Reg { index: 0, high_byte: true }));
        // with REX the same encoding is SPL
        let m = decode_mov(&[0x40, 0x88, 0x27], Bits64).unwrap();
        assert_eq!(m.access, Access::StoreReg(Reg { index: 4, high_byte: false }));
    }

    #[test]
    fn long_mode_sib_rip_relative_rex_and_immediates() {
        // mov rax, [rip+0x100]
        assert_eq!(decode_mov(&[0x48, 0x8b, 0x05, 0, 1, 0, 0], Bits64), Some(Mov { len: 7, size: 8, access: Access::Load(reg(0)) }));
        // mov [rsp+8], r9  (REX.WR, SIB, disp8)
        assert_eq!(decode_mov(&[0x4c, 0x89, 0x4c, 0x24, 0x08], Bits64), Some(Mov { len: 5, size: 8, access: Access::StoreReg(reg(9)) }));
        // mov qword [rax], -1 (imm32 sign-extended)
        assert_eq!(decode_mov(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], Bits64), Some(Mov { len: 7, size: 8, access: Access::StoreImm(u64::MAX) }));
        // mov dword [abs 0x20000000] via SIB with no base: 8b 04 25 disp32
        assert_eq!(decode_mov(&[0x8b, 0x04, 0x25, 0, 0, 0, 0x20], Bits64), Some(Mov { len: 7, size: 4, access: Access::Load(reg(0)) }));
        // mov word [rdi], 0x1234
        assert_eq!(decode_mov(&[0x66, 0xc7, 0x07, 0x34, 0x12], Bits64), Some(Mov { len: 5, size: 2, access: Access::StoreImm(0x1234) }));
    }

    #[test]
    fn accumulator_moves_with_a_direct_address() {
        // mov al, [0x10] ; mov [0x40], eax (16-bit code, 0x66) ; mov rax, [abs 64-bit]
        assert_eq!(decode_mov(&[0xa0, 0x10, 0x00], Bits16), Some(Mov { len: 3, size: 1, access: Access::Load(reg(0)) }));
        assert_eq!(decode_mov(&[0x66, 0xa3, 0x40, 0x00], Bits16), Some(Mov { len: 4, size: 4, access: Access::StoreReg(reg(0)) }));
        assert_eq!(decode_mov(&[0x48, 0xa1, 0, 0, 0, 0x20, 0, 0, 0, 0], Bits64), Some(Mov { len: 10, size: 8, access: Access::Load(reg(0)) }));
        assert_eq!(decode_mov(&[0xa1, 0x10], Bits16), None, "truncated moffs");
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(decode_mov(&[0x89, 0xc0], Bits32), None, "register to register");
        assert_eq!(decode_mov(&[0x01, 0x00], Bits32), None, "ADD");
        assert_eq!(decode_mov(&[0xf3, 0xa4], Bits32), None, "REP MOVSB");
        assert_eq!(decode_mov(&[0xc7, 0x08, 0, 0, 0, 0], Bits32), None, "C7 /1 is not MOV");
        assert_eq!(decode_mov(&[0x8b], Bits32), None, "truncated");
        assert_eq!(decode_mov(&[0x66; 20], Bits32), None, "prefixes only");
    }
}
