//! Booting Linux through the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): the bzImage's
//! protected-mode kernel is loaded at its `code32_start` by linux-loader,
//! and the VMM fills the zero page (`struct boot_params`) with the setup
//! header, an e820 memory map, the command line and the initrd, then enters
//! `startup_64` (load address + 0x200) in 64-bit mode with RSI pointing at
//! the zero page.
//!
//! ```text
//! 0x0000_0500  GDT: selectors 0x10 (code) and 0x18 (data), as the protocol
//!              asks (__BOOT_CS, __BOOT_DS)
//! 0x0000_7000  the zero page (boot_params)
//! 0x0000_8ff0  initial stack (the kernel soon moves off it)
//! 0x0002_0000  the command line
//! 0x0009_0000  identity-mapped page tables for the first GiB (layout.rs)
//! 0x0010_0000  the kernel (code32_start), decompressed in place up to
//!              init_size
//!     ...      the initrd, at the top of RAM below initrd_addr_max
//! ```
//! Everything is checked before the VM is created: a truncated or foreign
//! image, an old boot protocol, an initrd that does not fit, or too little
//! RAM is a one-line error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The stack at entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the command line goes, and the most it may take.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 0x1_0000;
/// Selectors the 64-bit boot protocol requires: __BOOT_CS and __BOOT_DS.
pub const BOOT_CS: u16 = 0x10;
/// See [`BOOT_CS`].
pub const BOOT_DS: u16 = 0x18;
/// The highest RAM end accepted: below the 32-bit MMIO hole where the tool
/// puts devices (virtio-mmio at 0xd000_0000, the xAPIC at 0xfee0_0000).
pub const MAX_RAM: u64 = 0xc000_0000;

/// `startup_64` is 0x200 past the protected-mode kernel's start.
const STARTUP_64_OFFSET: u64 = 0x200;
/// "HdrS" at 0x202, and the boot flag 0xaa55 at 0x1fe.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// Boot protocol 2.12 brought `xloadflags` (64-bit entry).
const MIN_PROTOCOL: u16 = 0x020c;
/// xloadflags: the kernel has a 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// type_of_loader: "undefined" (0xff), as VMMs without an ID use.
const LOADER_UNDEFINED: u8 = 0xff;
/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// `boot_params` as bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// `boot_params` is the kernel's packed C struct (bindgen-generated) of
// integers and arrays of integers: no padding, no pointers.
// SAFETY: every byte pattern is a valid `boot_params`.
unsafe impl ByteValued for ZeroPage {}

/// A Linux boot, ready to enter.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBoot {
    /// RIP at entry: `startup_64`.
    pub entry: u64,
    /// RSI at entry: the zero page.
    pub boot_params: u64,
}

/// Whether the file at `path` looks like a bzImage (the boot sector's flag
/// and the setup header's magic).
///
/// # Errors
/// The file cannot be read.
pub fn is_bzimage(path: &Path) -> Result<bool> {
    let mut file = File::open(path).with_context(|| format!("kernel {}", path.display()))?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut file, &mut head).with_context(|| format!("kernel {}", path.display()))?;
    if n < head.len() {
        return Ok(false);
    }
    let flag = u16::from_le_bytes([head[0x1fe], head[0x1ff]]);
    let magic = u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]);
    Ok(flag == BOOT_FLAG && magic == HDRS_MAGIC)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The e820 map for `mem_size` bytes of RAM: conventional memory below the
/// EBDA, the EBDA and BIOS areas reserved, and RAM from 1 MiB up.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry { addr: 0, size: layout::LOW_RAM_END, r#type: E820_RAM },
        boot_e820_entry { addr: layout::LOW_RAM_END, size: layout::EBDA_END - layout::LOW_RAM_END, r#type: E820_RESERVED },
        boot_e820_entry { addr: layout::BIOS_START, size: layout::HIGH_RAM_START - layout::BIOS_START, r#type: E820_RESERVED },
        boot_e820_entry { addr: layout::HIGH_RAM_START, size: mem_size - layout::HIGH_RAM_START, r#type: E820_RAM },
    ]
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as RAM and
/// the kernel's `initrd_addr_max` allow, above `low` (the end of the
/// kernel's decompression area). `None` if it does not fit.
pub fn initrd_address(size: u64, mem_size: u64, initrd_addr_max: u64, low: u64) -> Option<u64> {
    let top = mem_size.min(initrd_addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !0xfff;
    (start >= low).then_some(start)
}

/// Loads `kernel` (a bzImage), `initrd` and `cmdline` into `mem` and fills
/// the zero page.
///
/// # Errors
/// Anything that makes the boot impossible, as one line naming the file.
pub fn load(mem: &GuestMemoryMmap, mem_size: u64, kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Result<LinuxBoot> {
    let name = kernel.display();
    if mem_size > MAX_RAM {
        bail!("--mem {mem_size:#x}: a Linux guest may have at most {MAX_RAM:#x} bytes (3 GiB) of RAM here");
    }
    let mut file = File::open(kernel).with_context(|| format!("kernel {name}"))?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(layout::HIGH_RAM_START)))
        .map_err(|e| anyhow::anyhow!("kernel {name}: not a loadable bzImage ({e}); is it truncated?"))?;
    let Some(hdr) = loaded.setup_header else { bail!("kernel {name}: no setup header") };
    // The header says how long the protected-mode kernel is (syssize, in
    // 16-byte units, after the setup sectors): a shorter file was cut off.
    let file_len = file.metadata().with_context(|| format!("kernel {name}"))?.len();
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let expected = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
    if file_len < expected {
        bail!("kernel {name} is truncated: {file_len} bytes, its header says {expected}");
    }
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        bail!("kernel {name}: boot protocol {:x}.{:02x} without a 64-bit entry point (needs 2.12 and XLF_KERNEL_64)", version >> 8, version & 0xff);
    }
    // The kernel decompresses itself in place: it needs init_size bytes
    // from where it was loaded.
    let load = loaded.kernel_load.0;
    let init_end = load + u64::from(hdr.init_size);
    if init_end.max(loaded.kernel_end) > mem_size {
        bail!("kernel {name} needs {:#x} bytes of RAM to decompress; give more with --mem (e.g. --mem 128M)", init_end.max(loaded.kernel_end));
    }

    let cmdline_size = hdr.cmdline_size as usize;
    let limit = if cmdline_size == 0 { 255 } else { cmdline_size.min(CMDLINE_MAX - 1) };
    if cmdline.len() > limit {
        bail!("kernel command line is {} bytes; the kernel takes at most {limit}", cmdline.len());
    }
    if cmdline.as_bytes().contains(&0) {
        bail!("kernel command line contains a NUL byte");
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR)).context("writing the command line")?;

    let mut params = ZeroPage::default();
    params.0.hdr = hdr;
    params.0.hdr.type_of_loader = LOADER_UNDEFINED;
    params.0.hdr.boot_flag = BOOT_FLAG;
    params.0.hdr.header = HDRS_MAGIC;
    params.0.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.0.hdr.cmdline_size = bytes.len() as u32;

    if let Some(initrd) = initrd {
        let iname = initrd.display();
        let mut f = File::open(initrd).with_context(|| format!("initrd {iname}"))?;
        let size = f.seek(SeekFrom::End(0)).with_context(|| format!("initrd {iname}"))?;
        f.seek(SeekFrom::Start(0)).with_context(|| format!("initrd {iname}"))?;
        let max = u64::from(hdr.initrd_addr_max);
        let Some(addr) = initrd_address(size, mem_size, max, init_end.max(loaded.kernel_end)) else {
            bail!("initrd {iname} ({size} bytes) does not fit in RAM above the kernel; give more with --mem");
        };
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .with_context(|| format!("initrd {iname}: reading {size} bytes"))?;
        params.0.hdr.ramdisk_image = addr as u32;
        params.0.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    for (slot, entry) in params.0.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.0.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).context("writing the zero page")?;
    Ok(LinuxBoot { entry: load + STARTUP_64_OFFSET, boot_params: ZERO_PAGE_ADDR })
}

/// The boot GDT: null, null, 64-bit code at [`BOOT_CS`], data at
/// [`BOOT_DS`] (SDM Vol. 3A, 3.4.5).
pub fn gdt() -> [u64; 4] {
    let [_, code64, data] = layout::gdt(true);
    [0, 0, code64, data]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: boot sector with the flag, a setup header with
    /// the given protocol and flags, `setup_sects` = 1, then a body.
    fn bzimage(version: u16, xloadflags: u16, body: usize) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + body];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x1f4..0x1f8].copy_from_slice(&((body as u32) / 16).to_le_bytes()); // syssize
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&0x20_0000u32.to_le_bytes()); // init_size
        for (i, b) in img[1024..].iter_mut().enumerate() {
            *b = i as u8;
        }
        img
    }

    fn file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rkvm-linux-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn ram(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn a_bzimage_loads_with_its_zero_page_command_line_and_initrd() {
        let k = file("ok.bzimage", &bzimage(0x020f, XLF_KERNEL_64, 4096));
        let i = file("ok.initrd", b"initrd bytes");
        assert!(is_bzimage(&k).unwrap());
        let size = 16 << 20;
        let mem = ram(size);
        let boot = load(&mem, size, &k, Some(&i), "console=ttyS0 quiet").unwrap();
        assert_eq!(boot.entry, 0x10_0200);
        let zp: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let p = zp.0;
        let (loader, ptr, rd, rd_size, n) =
            (p.hdr.type_of_loader, p.hdr.cmd_line_ptr, p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.e820_entries);
        assert_eq!(loader, 0xff);
        assert_eq!(ptr as u64, CMDLINE_ADDR);
        assert_eq!(n, 4);
        assert_eq!(rd_size, 12);
        assert_eq!(rd % 4096, 0);
        assert!(u64::from(rd) + 12 <= size);
        let mut got = [0u8; 12];
        mem.read_slice(&mut got, GuestAddress(rd.into())).unwrap();
        assert_eq!(&got, b"initrd bytes");
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        // The body is at 1 MiB.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0005)).unwrap(), 5);
        let last = p.e820_table[3];
        let (addr, len) = (last.addr, last.size);
        assert_eq!((addr, addr + len), (0x10_0000, size));
    }

    #[test]
    fn bad_kernels_are_refused_by_name() {
        let size = 16 << 20;
        let mem = ram(size);
        let truncated = file("trunc.bzimage", &bzimage(0x020f, XLF_KERNEL_64, 4096)[..0x300]);
        let e = load(&mem, size, &truncated, None, "").unwrap_err().to_string();
        assert!(e.contains("trunc.bzimage") && e.contains("bzImage"), "{e}");
        let cut = file("cut.bzimage", &bzimage(0x020f, XLF_KERNEL_64, 4096)[..3000]);
        let e = load(&mem, size, &cut, None, "").unwrap_err().to_string();
        assert!(e.contains("cut.bzimage is truncated: 3000 bytes, its header says 5120"), "{e}");
        let old = file("old.bzimage", &bzimage(0x0206, 0, 4096));
        let e = load(&mem, size, &old, None, "").unwrap_err().to_string();
        assert!(e.contains("64-bit entry"), "{e}");
        let elf = file("not.bzimage", b"\x7fELF and more bytes than the header needs to be read at all...");
        assert!(!is_bzimage(&elf).unwrap());
        let e = load(&mem, size, std::path::Path::new("/nonexistent/bzImage"), None, "").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/bzImage"), "{e:#}");
    }

    #[test]
    fn initrd_and_ram_limits_are_checked() {
        let k = file("lim.bzimage", &bzimage(0x020f, XLF_KERNEL_64, 4096));
        let small = 2 << 20;
        let e = load(&ram(small), small, &k, None, "").unwrap_err().to_string();
        assert!(e.contains("--mem"), "{e}");
        let big = file("big.initrd", &vec![0u8; 15 << 20]);
        let size = 16 << 20;
        let e = load(&ram(size), size, &k, Some(&big), "").unwrap_err().to_string();
        assert!(e.contains("big.initrd") && e.contains("does not fit"), "{e}");
        let e = load(&ram(size), size, &k, Some(std::path::Path::new("/nonexistent/initrd")), "").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/initrd"), "{e:#}");
        let e = load(&ram(size), size, &k, None, &"x".repeat(3000)).unwrap_err().to_string();
        assert!(e.contains("command line"), "{e}");
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        assert_eq!(initrd_address(0x1800, 0x100_0000, u64::MAX, 0x40_0000), Some(0xff_e000));
        assert_eq!(initrd_address(0x1000, 0x100_0000, 0x7f_ffff, 0x40_0000), Some(0x7f_f000));
        assert_eq!(initrd_address(0x100_0000, 0x100_0000, u64::MAX, 0x40_0000), None);
    }

    #[test]
    fn the_boot_gdt_has_code_at_0x10_and_data_at_0x18() {
        let g = gdt();
        assert_ne!(g[(BOOT_CS / 8) as usize] & (1 << 53), 0, "64-bit code");
        assert_eq!(g[(BOOT_DS / 8) as usize] & (1 << 43), 0, "data, not code");
        assert_ne!(g[(BOOT_DS / 8) as usize] & (1 << 47), 0, "present");
    }
}
