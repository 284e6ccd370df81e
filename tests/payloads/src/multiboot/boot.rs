//! What the Multiboot loader passed and how it loaded the kernel
//! (Multiboot 0.6.96, 3.2 "Machine state" and 3.3 "Boot information
//! format").

use super::runtime::{Kernel, R};
use iced_x86::code_asm::*;

/// What the kernel expects at the start of its one Multiboot module.
pub const MODULE_TEXT: &str = "rkvm-module\n";
/// The magic a Multiboot loader leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

// Multiboot information structure (Multiboot 0.6.96, 3.3 "Boot
// information format"): offsets and `flags` bits.
const MBI_MEM_UPPER: i32 = 8;
const MBI_CMDLINE: i32 = 16;
const MBI_MODS_COUNT: i32 = 20;
const MBI_MODS_ADDR: i32 = 24;
const MBI_MMAP_LENGTH: i32 = 44;
const MBI_MMAP_ADDR: i32 = 48;
const MBI_FLAG_MEM: u32 = 1 << 0;
const MBI_FLAG_CMDLINE: u32 = 1 << 2;
const MBI_FLAG_MODS: u32 = 1 << 3;
const MBI_FLAG_MMAP: u32 = 1 << 6;
/// An `mmap` entry type: RAM available for use.
const MMAP_AVAILABLE: u32 = 1;

/// The multiboot checks: what the loader passed and how it loaded us.
///
/// The command line must end in `mem=SIZE`, SIZE being the guest's RAM as
/// decimal MiB with an `M` (`mem=16M`) or as hex bytes (`mem=0x1000000`);
/// a loader that puts the kernel's file name first (QEMU) is fine. There
/// must be exactly one module, starting with [`MODULE_TEXT`].
pub fn multiboot(k: &mut Kernel) -> R {
    let (mb_info, mem_expected) = (k.lay.mb_info, k.lay.mem_expected);
    k.a.mov(eax, dword_ptr(k.lay.mb_magic))?;
    k.check32("multiboot-magic", BOOTLOADER_MAGIC)?;
    k.a.mov(eax, dword_ptr(k.lay.bss_ok))?;
    k.check_bool("multiboot-bss-zeroed")?;
    k.a.mov(ebx, dword_ptr(mb_info))?;
    k.a.mov(eax, dword_ptr(ebx))?;
    k.a.and(eax, MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP)?;
    k.check32("multiboot-flags", MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP)?;

    // Each check below reads its part of the information only if `flags`
    // says it is there, and fails otherwise.
    let if_flag = |k: &mut Kernel, flag: u32, missing: CodeLabel| -> R {
        k.a.mov(ebx, dword_ptr(mb_info))?;
        k.a.test(dword_ptr(ebx), flag)?;
        k.a.jz(missing)
    };

    let mut no_cmdline = k.a.create_label();
    k.a.xor(eax, eax)?;
    if_flag(k, MBI_FLAG_CMDLINE, no_cmdline)?;
    k.a.mov(esi, dword_ptr(ebx + MBI_CMDLINE))?;
    parse_mem(k)?;
    k.a.set_label(&mut no_cmdline)?;
    k.a.mov(dword_ptr(mem_expected), eax)?;
    k.check_bool("multiboot-cmdline-mem")?;

    // mem_upper counts the KiB from 1 MiB to the first hole (Multiboot
    // 0.6.96, 3.3). A VMM without firmware has no hole below the end of
    // RAM, so mem_upper is the RAM size less 1 MiB. (The specification
    // allows less: QEMU's loader, through SeaBIOS's E820 map, reports 128
    // KiB less, and fails this check.)
    let mut no_mem = k.a.create_label();
    k.a.mov(eax, u32::MAX)?;
    if_flag(k, MBI_FLAG_MEM, no_mem)?;
    k.a.mov(eax, dword_ptr(ebx + MBI_MEM_UPPER))?;
    k.a.shl(eax, 10u32)?;
    k.a.add(eax, 0x10_0000u32)?;
    k.a.set_label(&mut no_mem)?;
    k.a.xor(edx, edx)?;
    k.a.mov(ebx, dword_ptr(mem_expected))?;
    k.a.xor(ecx, ecx)?;
    k.check_value("multiboot-mem-upper", 8)?;

    // The memory map: entries of `size` (not counting the size field
    // itself), base (64-bit), length (64-bit), type; find the RAM at 1 MiB.
    let mut no_mmap = k.a.create_label();
    let mut next = k.a.create_label();
    let mut scan = k.a.create_label();
    k.a.xor(eax, eax)?;
    if_flag(k, MBI_FLAG_MMAP, no_mmap)?;
    k.a.mov(esi, dword_ptr(ebx + MBI_MMAP_ADDR))?;
    k.a.mov(edi, dword_ptr(ebx + MBI_MMAP_LENGTH))?;
    k.a.add(edi, esi)?;
    k.a.set_label(&mut scan)?;
    k.a.cmp(esi, edi)?;
    k.a.jae(no_mmap)?;
    k.a.cmp(dword_ptr(esi + 4), 0x10_0000u32)?;
    k.a.jne(next)?;
    k.a.cmp(dword_ptr(esi + 8), 0u32)?;
    k.a.jne(next)?;
    k.a.cmp(dword_ptr(esi + 20), MMAP_AVAILABLE)?;
    k.a.jne(next)?;
    k.a.mov(eax, dword_ptr(esi + 12))?;
    k.a.or(eax, dword_ptr(esi + 16))?;
    k.a.jnz(no_mmap)?; // found: EAX is the (non-zero) length
    k.a.set_label(&mut next)?;
    k.a.add(esi, dword_ptr(esi))?;
    k.a.add(esi, 4u32)?;
    k.a.jmp(scan)?;
    k.a.set_label(&mut no_mmap)?;
    k.check_bool("multiboot-mmap-ram-at-1m")?;

    let mut no_mods = k.a.create_label();
    k.a.xor(eax, eax)?;
    if_flag(k, MBI_FLAG_MODS, no_mods)?;
    k.a.mov(eax, dword_ptr(ebx + MBI_MODS_COUNT))?;
    k.a.set_label(&mut no_mods)?;
    k.check32("multiboot-module-count", 1)?;

    // The first module entry: mod_start, mod_end (exclusive), string.
    let module = |k: &mut Kernel, missing: CodeLabel| -> R {
        k.a.xor(eax, eax)?;
        if_flag(k, MBI_FLAG_MODS, missing)?;
        k.a.cmp(dword_ptr(ebx + MBI_MODS_COUNT), 0u32)?;
        k.a.je(missing)?;
        k.a.mov(esi, dword_ptr(ebx + MBI_MODS_ADDR))?;
        k.a.mov(ecx, dword_ptr(esi))?;
        k.a.mov(edx, dword_ptr(esi + 4))?;
        k.a.sub(edx, ecx)
    };
    // Multiboot header flag 0 asks for modules aligned on 4 KiB.
    let mut no_mods = k.a.create_label();
    module(k, no_mods)?;
    k.a.test(ecx, 0xfffu32)?;
    k.a.setz(al)?;
    k.a.set_label(&mut no_mods)?;
    k.check_bool("multiboot-module-aligned")?;

    let mut no_mods = k.a.create_label();
    module(k, no_mods)?;
    let text = k.string(MODULE_TEXT);
    k.a.cmp(edx, MODULE_TEXT.len() as u32)?;
    k.a.jb(no_mods)?;
    k.a.mov(esi, ecx)?;
    k.a.mov(edi, text)?;
    k.a.mov(ecx, MODULE_TEXT.len() as u32)?;
    k.a.repe().cmpsb()?;
    k.a.setz(al)?;
    k.a.set_label(&mut no_mods)?;
    k.check_bool("multiboot-module-content")
}

/// Parses the last word of the NUL-terminated command line at ESI as
/// `mem=<N>M` (decimal MiB) or `mem=0x<hex bytes>`; EAX = the size in
/// bytes, 0 if it does not parse (or is 4 GiB or more). Clobbers EBX,
/// ECX, EDX, EDI.
fn parse_mem(k: &mut Kernel) -> R {
    let a = &mut *k.a;
    let mut fail = a.create_label();
    let mut done = a.create_label();
    let mut at_end = a.create_label();
    let mut word = a.create_label();
    let mut hex = a.create_label();
    let mut dec_end = a.create_label();
    // EDI = the terminating NUL.
    a.mov(edi, esi)?;
    let mut find_end = a.create_label();
    a.set_label(&mut find_end)?;
    a.cmp(byte_ptr(edi), 0u32)?;
    a.je(at_end)?;
    a.inc(edi)?;
    a.jmp(find_end)?;
    // EBX = the start of the last word.
    a.set_label(&mut at_end)?;
    a.mov(ebx, edi)?;
    let mut back = a.create_label();
    a.set_label(&mut back)?;
    a.cmp(ebx, esi)?;
    a.je(word)?;
    a.cmp(byte_ptr(ebx - 1), u32::from(b' '))?;
    a.je(word)?;
    a.dec(ebx)?;
    a.jmp(back)?;
    // "mem=" as one dword; a shorter word differs in its NUL.
    a.set_label(&mut word)?;
    a.cmp(dword_ptr(ebx), u32::from_le_bytes(*b"mem="))?;
    a.jne(fail)?;
    a.add(ebx, 4u32)?;
    a.xor(eax, eax)?;
    a.cmp(word_ptr(ebx), u32::from(u16::from_le_bytes(*b"0x")))?;
    a.je(hex)?;

    // Decimal MiB, then "M" and the end: at most 4095.
    a.mov(edx, ebx)?;
    let mut dec_digit = a.create_label();
    a.set_label(&mut dec_digit)?;
    a.movzx(ecx, byte_ptr(ebx))?;
    a.sub(ecx, u32::from(b'0'))?;
    a.cmp(ecx, 9u32)?;
    a.ja(dec_end)?;
    a.imul_3(eax, eax, 10)?;
    a.add(eax, ecx)?;
    a.cmp(eax, 4096u32)?;
    a.jae(fail)?;
    a.inc(ebx)?;
    a.jmp(dec_digit)?;
    a.set_label(&mut dec_end)?;
    a.cmp(ebx, edx)?;
    a.je(fail)?; // no digits
    a.cmp(word_ptr(ebx), u32::from(b'M'))?; // "M" and the NUL
    a.jne(fail)?;
    a.shl(eax, 20u32)?;
    a.jmp(done)?;

    // Hex bytes: up to 8 digits.
    a.set_label(&mut hex)?;
    a.add(ebx, 2u32)?;
    a.mov(edx, ebx)?;
    let mut hex_digit = a.create_label();
    let mut hex_end = a.create_label();
    let mut have_digit = a.create_label();
    a.set_label(&mut hex_digit)?;
    a.movzx(ecx, byte_ptr(ebx))?;
    a.test(ecx, ecx)?;
    a.jz(hex_end)?;
    a.sub(ecx, u32::from(b'0'))?;
    a.cmp(ecx, 9u32)?;
    a.jbe(have_digit)?;
    a.movzx(ecx, byte_ptr(ebx))?;
    a.or(ecx, 0x20u32)?; // lower case
    a.sub(ecx, u32::from(b'a'))?;
    a.cmp(ecx, 5u32)?;
    a.ja(fail)?;
    a.add(ecx, 10u32)?;
    a.set_label(&mut have_digit)?;
    a.test(eax, 0xf000_0000u32)?;
    a.jnz(fail)?;
    a.shl(eax, 4u32)?;
    a.or(eax, ecx)?;
    a.inc(ebx)?;
    a.jmp(hex_digit)?;
    a.set_label(&mut hex_end)?;
    a.cmp(ebx, edx)?;
    a.jne(done)?;

    a.set_label(&mut fail)?;
    a.xor(eax, eax)?;
    a.set_label(&mut done)?;
    a.nop()
}
