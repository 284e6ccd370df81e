//! Where the tool puts things in guest memory: nothing but documented
//! address constants (as Firecracker's arch/x86_64/layout.rs).
//!
//! ```text
//! 0x0000_0000  real-mode IVT and BIOS data area (left zero)
//! 0x0000_0500  GDT (protected and long mode): null, code, data
//! 0x0000_1000  default load and entry address of the image
//!     ...      the image, then free RAM
//! 0x0009_0000  long-mode page tables: PML4, PDPT, PD (2 MiB pages)
//! 0x0009_3000  end of the tool's structures
//! ```
//! The stack grows down from the load address.
//!
//! A Multiboot kernel (`--kernel`) goes where its headers say, normally at
//! 1 MiB, and the rest follows QEMU's PC layout:
//!
//! ```text
//! 0x0000_0500  GDT, as above (selectors 0x08 and 0x10, as GRUB's)
//! 0x0000_9000  Multiboot information, then the memory map, the module
//!              list and the strings; the stack grows down from here
//! 0x0009_fc00  reserved in the memory map (where the EBDA would be)
//! 0x000a_0000  nothing in the memory map (VGA, option ROMs: RAM here)
//! 0x000f_0000  reserved in the memory map (where the BIOS would be)
//! 0x0010_0000  the kernel, then each module at the next page boundary
//! ```

/// The GDT's guest-physical address.
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the code segment (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// The PML4 of the identity map (long mode).
pub const PML4_ADDR: u64 = 0x9_0000;
/// The PDPT (one entry: the first GiB).
pub const PDPT_ADDR: u64 = 0x9_1000;
/// The page directory: 512 2 MiB pages, the first GiB identity-mapped.
pub const PD_ADDR: u64 = 0x9_2000;
/// One past the tool's structures.
pub const SYSTEM_END: u64 = 0x9_3000;

/// Multiboot information structure: where QEMU's loader puts it too.
pub const MULTIBOOT_INFO_ADDR: u64 = 0x9000;
/// End of conventional memory (640 KiB less the 1 KiB EBDA), as the
/// memory map reports it; the Multiboot information must end below it.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// 640 KiB: end of the reserved region that starts at [`LOW_RAM_END`].
pub const EBDA_END: u64 = 0xa_0000;
/// The BIOS area the memory map reserves below 1 MiB.
pub const BIOS_START: u64 = 0xf_0000;
/// 1 MiB: "upper memory" in Multiboot's terms.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// GDT entries: null; flat 4 GiB code and data (protected mode); or a
/// 64-bit code segment (long mode). SDM Vol. 3A, 3.4.5.
pub fn gdt(long_mode: bool) -> [u64; 3] {
    const CODE32: u64 = 0x00cf_9a00_0000_ffff; // base 0, limit 4G, G, D, P, DPL0, exec/read
    const CODE64: u64 = 0x00af_9a00_0000_ffff; // as above with L instead of D
    const DATA: u64 = 0x00cf_9200_0000_ffff; // base 0, limit 4G, G, B, P, DPL0, read/write
    [0, if long_mode { CODE64 } else { CODE32 }, DATA]
}

// The structures sit below the VGA hole, do not overlap, and the GDT ends
// below the default load address (0x1000): checked when compiling.
const _: () = assert!(GDT_ADDR + 24 <= 0x1000);
const _: () = assert!(PML4_ADDR < PDPT_ADDR && PDPT_ADDR < PD_ADDR && PD_ADDR + 4096 == SYSTEM_END);
const _: () = assert!(SYSTEM_END <= 0xa_0000);
const _: () = assert!(GDT_ADDR + 24 <= MULTIBOOT_INFO_ADDR && MULTIBOOT_INFO_ADDR < LOW_RAM_END);
const _: () = assert!(LOW_RAM_END < EBDA_END && EBDA_END <= BIOS_START && BIOS_START < HIGH_RAM_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segments_differ_in_d_and_l() {
        let (pm, lm) = (gdt(false)[1], gdt(true)[1]);
        assert_ne!(pm & (1 << 54), 0, "D set in 32-bit code");
        assert_ne!(lm & (1 << 53), 0, "L set in 64-bit code");
        assert_eq!(lm & (1 << 54), 0, "D clear in 64-bit code");
    }
}
