//! `mbtest.elf`: a Multiboot (v1) test kernel, an ELF32 executable loaded
//! at 1 MiB and entered the way QEMU's `-kernel` or GRUB enter one: 32-bit
//! flat protected mode, paging off, EAX = 0x2BADB002, EBX = the physical
//! address of the Multiboot information.
//!
//! It checks what the loader passed (magic, memory size and map, command
//! line, one module, a zeroed bss), exception delivery through its own
//! GDT and IDT (#DE, #UD, #BP, #GP with a selector, #PF under 32-bit
//! paging), MSRs with their reset values and #GP rules, CPUID as a
//! hypervisor shapes it, and that x87, SSE and AVX registers survive
//! thousands of exits to the VMM. One line per check on COM1 (`ok NAME`
//! or `FAIL NAME: ...`, see [`runtime`]), then `mbtest: N failures`, and
//! N is written to the isa-debug-exit port 0xf4 with a 32-bit OUT, so the
//! VMM exits with (N << 1) | 1: 1 when everything passed. The output
//! depends only on pass or fail, never on the host, so runs under
//! /dev/kvm and /dev/rkvm compare line for line.
//!
//! What the loader must pass:
//! - RAM with its size on the command line, which must end in `mem=SIZE`
//!   (decimal MiB with an `M`, as in `mem=16M`, or hex bytes, as in
//!   `mem=0x1000000`), preceded by anything (QEMU puts the file name first);
//! - exactly one module, whose contents start with [`MODULE_TEXT`].
//!
//! ```text
//! printf 'rkvm-module\n' > mod.txt
//! qemu-system-x86_64 -m 16M -kernel mbtest.elf -append mem=16M -initrd mod.txt \
//!     -serial stdio -display none -device isa-debug-exit,iobase=0xf4,iosize=4
//! rkvm run --dev /dev/rkvm --mem 16M --kernel mbtest.elf --initrd mod.txt --append mem=16M
//! ```

mod boot;
mod builder;
mod cpu;
mod elf;
mod fpu;
mod msr;
mod routines;
mod runtime;

pub use boot::MODULE_TEXT;
pub use fpu::FPU_EXIT_ITERATIONS;

use crate::Payload;
use iced_x86::code_asm::IcedError;
use runtime::{Kernel, Layout};

/// Where the kernel is linked and loaded: 1 MiB, above the PC's legacy
/// holes, where Multiboot loaders expect kernels.
pub const LOAD_ADDRESS: u32 = 0x10_0000;
/// The Multiboot header: magic, flags, checksum (Multiboot 0.6.96, 3.1.1
/// "The layout of Multiboot header").
const HEADER_MAGIC: u32 = 0x1bad_b002;
/// Flags bit 0: modules page-aligned; bit 1: memory information wanted.
/// Bit 16 (load addresses in the header) stays clear: the loader takes
/// them from the ELF program headers.
const HEADER_FLAGS: u32 = 1 << 0 | 1 << 1;
const HEADER_SIZE: u32 = 12;
/// The header must lie, 32-bit aligned, in the first 8 KiB of the file
/// (3.1.1); it follows the ELF headers directly.
const HEADER_OFFSET: u32 = elf::HEADERS_SIZE;
/// The entry point: the code follows the Multiboot header.
const CODE_BASE: u32 = LOAD_ADDRESS + HEADER_OFFSET + HEADER_SIZE;

fn multiboot_header() -> [u8; HEADER_SIZE as usize] {
    let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(HEADER_FLAGS);
    let mut h = [0; HEADER_SIZE as usize];
    for (i, word) in [HEADER_MAGIC, HEADER_FLAGS, checksum].into_iter().enumerate() {
        h[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    h
}

/// The code and data, from [`CODE_BASE`] to the end of the file.
fn kernel_code() -> Result<Vec<u8>, IcedError> {
    builder::assemble(CODE_BASE, |a, s| {
        let mut k = Kernel::new(a, s);
        k.entry()?;
        boot::multiboot(&mut k)?;
        cpu::exceptions(&mut k)?;
        msr::msrs(&mut k)?;
        cpu::cpuid(&mut k)?;
        fpu::fpu(&mut k)?;
        fpu::avx(&mut k)?;
        k.finish()?;
        k.routines()
    })
}

/// `mbtest.elf`, the Multiboot test kernel described in this module.
pub fn multiboot_test_kernel() -> Payload {
    let code = kernel_code().expect("mbtest assembles");
    let image_end = CODE_BASE + code.len() as u32;
    let bss = Layout::new(image_end).bss_end - image_end;
    let mut body = multiboot_header().to_vec();
    body.extend_from_slice(&code);
    Payload { name: "mbtest.elf", image: elf::exec_image(LOAD_ADDRESS, CODE_BASE, &body, bss) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(image: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn is_an_elf32_executable_loaded_at_1m_with_a_bss() {
        let image = multiboot_test_kernel().image;
        let elf = elf::parse(&image).unwrap();
        assert_eq!(elf.entry, CODE_BASE);
        let [[p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _]] = elf.segments[..] else {
            panic!("expected one segment, got {:?}", elf.segments);
        };
        assert_eq!((p_type, p_offset), (1, 0), "PT_LOAD of the whole file");
        assert_eq!((p_vaddr, p_paddr), (LOAD_ADDRESS, LOAD_ADDRESS));
        assert_eq!(p_filesz as usize, image.len());
        assert!(p_memsz > p_filesz, "no bss");
        assert!((p_vaddr..p_vaddr + p_filesz).contains(&elf.entry));
        // The bss holds the page tables and stack: it must not run into
        // where a loader puts modules right after the kernel, nor past
        // the 16 MiB the paging checks map.
        let layout = Layout::new(p_vaddr + p_filesz);
        assert_eq!(layout.bss_end, p_vaddr + p_memsz);
        assert!(layout.bss_end < runtime::MAPPED);
        // The first instruction is CLD.
        assert_eq!(image[(CODE_BASE - LOAD_ADDRESS) as usize], 0xfc);
    }

    #[test]
    fn has_a_multiboot_header_in_the_first_8k() {
        let image = multiboot_test_kernel().image;
        let search = &image[..image.len().min(8192)];
        let offset = (0..search.len() - 11)
            .step_by(4)
            .find(|&o| u32_at(search, o) == HEADER_MAGIC)
            .expect("no Multiboot header in the first 8 KiB");
        let flags = u32_at(search, offset + 4);
        let checksum = u32_at(search, offset + 8);
        assert_eq!(HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum), 0, "checksum");
        assert_eq!(flags & 0b11, 0b11, "page-aligned modules and memory information");
        assert_eq!(flags & 1 << 16, 0, "addresses come from the ELF headers");
    }

    #[test]
    fn carries_what_it_compares_against() {
        let image = multiboot_test_kernel().image;
        let has = |text: &[u8]| image.windows(text.len()).any(|w| w == text);
        assert!(has(MODULE_TEXT.as_bytes()));
        assert!(has(b"multiboot-magic\0"));
        assert!(has(b" failures\n\0"));
    }

    #[test]
    fn builds_the_same_image_every_time() {
        assert_eq!(multiboot_test_kernel().image, multiboot_test_kernel().image);
    }
}
