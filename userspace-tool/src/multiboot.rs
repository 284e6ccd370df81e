//! Multiboot (version 1) kernels, loaded the way QEMU's `-kernel` loads
//! them, so that a kernel developed against QEMU boots here unchanged.
//!
//! What the specification asks of a boot loader (Multiboot Specification
//! 0.6.96, sections 3.1-3.3), in the order done here:
//! 1. find the header: magic 0x1BADB002, flags, and a checksum making the
//!    three sum to 0 (mod 2^32), 4-byte aligned within the first 8 KiB;
//! 2. load the kernel from the header's address fields if flag 16 says they
//!    are valid (QEMU and GRUB prefer them even in an ELF file), otherwise
//!    from the ELF32 program headers, at physical addresses, with the bss
//!    zeroed;
//! 3. load each module at the next page boundary after the kernel;
//! 4. describe RAM, the command line and the modules in the information
//!    structure;
//! 5. enter the kernel in 32-bit protected mode, paging off, EAX =
//!    0x2BADB002, EBX = the information's address.
//!
//! [`parse`] and [`plan`] are pure functions of the file contents and the
//! RAM size, so every error is found (and tested) before the VM exists;
//! [`Boot`] reads the files and copies the result into guest memory.

use std::ffi::OsStr;
use std::fs;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// EAX at the kernel's entry: tells it a Multiboot loader started it.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Where EBX points at entry.
pub const INFO_ADDR: u64 = layout::MULTIBOOT_INFO_ADDR;

const HEADER_MAGIC: u32 = 0x1bad_b002;
/// The header must lie within the file's first 8 KiB.
const HEADER_SEARCH_LEN: usize = 8192;
/// Header flags 0-15 are requirements: a loader must refuse a kernel that
/// sets one it does not understand. Bit 0 (modules page-aligned) and bit 1
/// (memory information) are always met here; bit 2 (video mode) is not.
const FLAGS_REQUIRED: u32 = 0xffff;
const FLAGS_MET: u32 = 0b11;
/// Header flag 16: the address fields are valid; load with them.
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;

/// Multiboot addresses are 32-bit.
const ADDRESS_LIMIT: u64 = 1 << 32;
const PAGE_SIZE: u64 = 4096;

/// The kernel's name for itself in the information structure.
const BOOTLOADER_NAME: &[u8] = b"rkvm";

/// A piece of the kernel image in guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// The file's bytes copied there.
    pub file: Range<usize>,
    /// Bytes it covers in RAM: the file's, then zeros (the bss).
    pub mem_size: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.addr + self.mem_size
    }
}

/// What a kernel image asks to be loaded.
#[derive(Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Its pieces, non-overlapping, each below 4 GiB.
    pub segments: Vec<Segment>,
    /// Physical address of its first instruction.
    pub entry: u64,
    /// Requirement flags of the header that this loader does not meet.
    /// QEMU boots such kernels anyway (without a video mode, say), and so
    /// does this loader, with a warning.
    pub unmet_flags: u32,
}

/// The little-endian u32 at `at`, if the bytes are there.
fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    let field = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(field.try_into().ok()?))
}

/// Finds the Multiboot header in `image` and works out what to load.
///
/// # Errors
/// A message naming what is wrong: no header, a bad checksum, an ELF file
/// of the wrong kind, fields that contradict each other, a truncated file.
pub fn parse(image: &[u8]) -> Result<Kernel> {
    let (offset, flags) = find_header(image)?;
    let mut kernel =
        if flags & FLAG_ADDRESS_FIELDS != 0 { from_address_fields(image, offset)? } else { from_elf(image)? };
    kernel.unmet_flags = flags & FLAGS_REQUIRED & !FLAGS_MET;
    Ok(kernel)
}

/// The offset and flags of the first valid header.
fn find_header(image: &[u8]) -> Result<(usize, u32)> {
    let window = &image[..image.len().min(HEADER_SEARCH_LEN)];
    let mut bad_checksum = None;
    for offset in (0..window.len()).step_by(4) {
        let (Some(magic), Some(flags), Some(checksum)) =
            (le32(window, offset), le32(window, offset + 4), le32(window, offset + 8))
        else {
            break;
        };
        if magic != HEADER_MAGIC {
            continue;
        }
        if magic.wrapping_add(flags).wrapping_add(checksum) == 0 {
            return Ok((offset, flags));
        }
        // The magic can occur by chance; a later header may be the real one.
        bad_checksum.get_or_insert((offset, flags, checksum));
    }
    match bad_checksum {
        Some((offset, flags, checksum)) => bail!(
            "the Multiboot header at offset {offset:#x} has a bad checksum {checksum:#010x} \
             (magic + flags + checksum must be 0: expected {:#010x} for flags {flags:#x})",
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)
        ),
        None => bail!(
            "not a Multiboot kernel: no header (magic 0x1BADB002 and a valid checksum) \
             at a 4-byte boundary in its first 8 KiB"
        ),
    }
}

/// Flag 16: one block of the file, loaded at `load_addr`. The header's own
/// address (`header_addr`) ties file offsets to addresses.
fn from_address_fields(image: &[u8], offset: usize) -> Result<Kernel> {
    let field = |i: usize| le32(image, offset + 12 + 4 * i).map(u64::from);
    let (Some(header_addr), Some(load_addr), Some(load_end_addr), Some(bss_end_addr), Some(entry)) =
        (field(0), field(1), field(2), field(3), field(4))
    else {
        bail!("the Multiboot header at offset {offset:#x} sets flag 16, but the file ends inside its address fields")
    };
    ensure!(load_addr <= header_addr, "Multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}");
    let Some(start) = (offset as u64).checked_sub(header_addr - load_addr) else {
        bail!(
            "Multiboot header_addr {header_addr:#x} and load_addr {load_addr:#x} put the start of the image \
             before the start of the file (the header is at file offset {offset:#x})"
        )
    };
    let file_len = image.len() as u64;
    let load_len = if load_end_addr == 0 {
        file_len - start // the rest of the file
    } else {
        ensure!(
            load_addr <= load_end_addr,
            "Multiboot load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
        );
        load_end_addr - load_addr
    };
    ensure!(
        start + load_len <= file_len,
        "the file is truncated: Multiboot load_addr..load_end_addr ({load_addr:#x}..{:#x}) takes {load_len:#x} bytes \
         from file offset {start:#x}, and the file has {file_len:#x} bytes",
        load_addr + load_len
    );
    let mem_size = if bss_end_addr == 0 {
        load_len
    } else {
        ensure!(
            load_addr + load_len <= bss_end_addr,
            "Multiboot bss_end_addr {bss_end_addr:#x} is below the end of the loaded image {:#x}",
            load_addr + load_len
        );
        bss_end_addr - load_addr
    };
    ensure!(mem_size > 0, "the Multiboot address fields load nothing");
    ensure!(
        load_addr + mem_size <= ADDRESS_LIMIT,
        "the kernel image at {load_addr:#x} ({mem_size:#x} bytes) ends above 4 GiB"
    );
    // Both are within the file: checked above.
    let file = start as usize..(start + load_len) as usize;
    Ok(Kernel { segments: vec![Segment { addr: load_addr, file, mem_size }], entry, unmet_flags: 0 })
}

/// ELF32 for i386 (System V ABI, Intel386 supplement): every PT_LOAD
/// segment at its physical address.
fn from_elf(image: &[u8]) -> Result<Kernel> {
    const EHDR_LEN: usize = 52;
    const PHDR_LEN: usize = 32;
    const ELFCLASS32: u8 = 1;
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    const EM_386: u16 = 3;
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;

    ensure!(
        image.starts_with(b"\x7fELF"),
        "not an ELF file, and its Multiboot header has no load addresses (flag 16): nothing says where to load it"
    );
    match image.get(4) {
        Some(&ELFCLASS32) => {}
        Some(&ELFCLASS64) => bail!(
            "a 64-bit ELF file: a Multiboot kernel is 32-bit ELF, or gives load addresses in its header (flag 16)"
        ),
        _ => bail!("not a valid ELF file: bad class (byte 4)"),
    }
    ensure!(image.get(5) == Some(&ELFDATA2LSB), "a big-endian ELF file: an i386 kernel is little-endian");
    ensure!(image.len() >= EHDR_LEN, "the file is truncated inside its ELF header ({} bytes)", image.len());
    // In range: the header is complete.
    let half = |at| le16(image, at).unwrap_or_default();
    let word = |at| le32(image, at).unwrap_or_default();
    let machine = half(18);
    ensure!(machine == EM_386, "ELF machine {machine} is not i386 (3)");
    let (entry, phoff, phentsize, phnum) = (word(24), word(28) as usize, usize::from(half(42)), usize::from(half(44)));
    ensure!(phnum == 0 || phentsize >= PHDR_LEN, "ELF program headers of {phentsize} bytes are too small (32)");
    let table_end = phnum.checked_mul(phentsize).and_then(|len| len.checked_add(phoff));
    ensure!(
        table_end.is_some_and(|end| end <= image.len()),
        "the file is truncated: its {phnum} ELF program headers at offset {phoff:#x} end past the end of the file ({:#x} bytes)",
        image.len()
    );

    let mut segments = Vec::new();
    let mut entry_addr = u64::from(entry);
    for i in 0..phnum {
        let ph = &image[phoff + i * phentsize..][..PHDR_LEN];
        let field = |at| u64::from(le32(ph, at).unwrap_or_default());
        let (kind, offset, vaddr, paddr, filesz, memsz, flags) =
            (field(0), field(4), field(8), field(12), field(16), field(20), field(24));
        // Empty segments occur in real files; they load nothing.
        if kind != u64::from(PT_LOAD) || memsz == 0 {
            continue;
        }
        ensure!(filesz <= memsz, "ELF segment {i}: file size {filesz:#x} exceeds memory size {memsz:#x}");
        ensure!(
            offset + filesz <= image.len() as u64,
            "the file is truncated: ELF segment {i} takes {filesz:#x} bytes from offset {offset:#x}, \
             and the file has {:#x} bytes",
            image.len()
        );
        ensure!(paddr + memsz <= ADDRESS_LIMIT, "ELF segment {i} at {paddr:#x} ({memsz:#x} bytes) ends above 4 GiB");
        // A kernel linked to run at a virtual address names its entry point
        // by that address; QEMU turns it into the physical one through the
        // executable segment holding it, and so does this loader.
        if flags & u64::from(PF_X) != 0 && vaddr != paddr && (vaddr..vaddr + filesz).contains(&u64::from(entry)) {
            entry_addr = u64::from(entry) - vaddr + paddr;
        }
        segments.push(Segment { addr: paddr, file: offset as usize..(offset + filesz) as usize, mem_size: memsz });
    }
    ensure!(!segments.is_empty(), "the ELF file has no loadable segment");
    let mut sorted: Vec<&Segment> = segments.iter().collect();
    sorted.sort_by_key(|s| s.addr);
    for pair in sorted.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        ensure!(
            a.end() <= b.addr,
            "ELF segments at {:#x}..{:#x} and {:#x}..{:#x} overlap",
            a.addr,
            a.end(),
            b.addr,
            b.end()
        );
    }
    Ok(Kernel { segments, entry: entry_addr, unmet_flags: 0 })
}

/// A boot module as [`plan`] sees it.
pub struct ModuleInfo<'a> {
    /// Its string in the module list (the file name it was given by).
    pub string: &'a [u8],
    /// Its size in bytes.
    pub len: u64,
}

/// Where the modules go, and the information structure describing it all.
#[derive(Debug)]
pub struct Layout {
    /// Guest-physical ranges of the modules, in command-line order.
    pub modules: Vec<Range<u64>>,
    /// The information structure, the memory map, the module list and the
    /// strings, to be copied to [`INFO_ADDR`].
    pub info: Vec<u8>,
}

/// Information structure fields (specification 3.3), by offset.
mod mbi {
    pub const FLAGS: usize = 0;
    pub const MEM_LOWER: usize = 4;
    pub const MEM_UPPER: usize = 8;
    pub const BOOT_DEVICE: usize = 12;
    pub const CMDLINE: usize = 16;
    pub const MODS_COUNT: usize = 20;
    pub const MODS_ADDR: usize = 24;
    pub const MMAP_LENGTH: usize = 44;
    pub const MMAP_ADDR: usize = 48;
    pub const BOOT_LOADER_NAME: usize = 64;
    /// The structure is 116 bytes with the framebuffer fields; what follows
    /// it starts at a round offset.
    pub const LEN: usize = 0x80;

    /// Flags: which fields are valid.
    pub const HAS_MEMORY: u32 = 1 << 0;
    pub const HAS_BOOT_DEVICE: u32 = 1 << 1;
    pub const HAS_CMDLINE: u32 = 1 << 2;
    pub const HAS_MODS: u32 = 1 << 3;
    pub const HAS_MMAP: u32 = 1 << 6;
    pub const HAS_BOOT_LOADER_NAME: u32 = 1 << 9;

    /// A memory map entry: size (of the rest, 20), base, length, type.
    pub const MMAP_ENTRY_LEN: usize = 24;
    pub const MEMORY_AVAILABLE: u32 = 1;
    pub const MEMORY_RESERVED: u32 = 2;
    /// A module: start, end (exclusive), string, reserved.
    pub const MOD_LEN: usize = 16;
}

/// The memory map: PC RAM with the holes a BIOS would leave, as QEMU's
/// (SeaBIOS's) E820 map has them. `mem_size` is above 1 MiB.
fn memory_map(mem_size: u64) -> [(u64, u64, u32); 4] {
    use layout::{BIOS_START, EBDA_END, HIGH_RAM_START, LOW_RAM_END};
    [
        (0, LOW_RAM_END, mbi::MEMORY_AVAILABLE),
        (LOW_RAM_END, EBDA_END - LOW_RAM_END, mbi::MEMORY_RESERVED),
        (BIOS_START, HIGH_RAM_START - BIOS_START, mbi::MEMORY_RESERVED),
        (HIGH_RAM_START, mem_size - HIGH_RAM_START, mbi::MEMORY_AVAILABLE),
    ]
}

fn align_up(addr: u64) -> u64 {
    addr.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Places the modules after `kernel` and builds the information structure
/// for `mem_size` bytes of RAM, checking that everything fits in RAM and
/// that nothing overlaps what the VMM puts in low memory.
///
/// The areas the memory map reserves below 1 MiB are RAM in this VM, with
/// nothing of the VMM's in them, so segments may go there as they may in
/// QEMU: `ld -Ttext=0x100000` puts the ELF headers in a segment at 0xff000.
///
/// # Errors
/// Too little RAM, a kernel segment, module or entry point outside RAM, or
/// one overlapping the GDT or the information structure.
pub fn plan(kernel: &Kernel, cmdline: &[u8], modules: &[ModuleInfo<'_>], mem_size: u64) -> Result<Layout> {
    ensure!(
        mem_size > layout::HIGH_RAM_START,
        "a Multiboot kernel needs RAM above 1 MiB, and guest RAM is {mem_size:#x} bytes; use --mem 2M or more"
    );
    ensure!(mem_size <= ADDRESS_LIMIT, "a Multiboot kernel is given RAM below 4 GiB, not {mem_size:#x} bytes");
    let mut next = align_up(kernel.segments.iter().map(Segment::end).max().unwrap_or(0));
    let mut ranges = Vec::with_capacity(modules.len());
    for module in modules {
        ranges.push(next..next + module.len);
        next = align_up(next + module.len);
    }
    let info = information(cmdline, modules, &ranges, mem_size);
    let info_end = INFO_ADDR + info.len() as u64;
    ensure!(
        info_end <= layout::LOW_RAM_END,
        "the command line and module names are too long: the Multiboot information would take {:#x} bytes, \
         at most {:#x} fit",
        info.len(),
        layout::LOW_RAM_END - INFO_ADDR
    );
    let reserved =
        [("the GDT", layout::GDT_ADDR..layout::GDT_ADDR + 24), ("the Multiboot information", INFO_ADDR..info_end)];
    let check = |what: &str, range: &Range<u64>| -> Result<()> {
        ensure!(
            range.end <= mem_size,
            "{what} at {:#x}..{:#x} does not fit in guest RAM of {mem_size:#x} bytes; use a larger --mem",
            range.start,
            range.end
        );
        if let Some((name, r)) = reserved.iter().find(|(_, r)| range.start < r.end && r.start < range.end) {
            bail!("{what} at {:#x}..{:#x} overlaps {name} at {:#x}..{:#x}", range.start, range.end, r.start, r.end);
        }
        Ok(())
    };
    for segment in &kernel.segments {
        check("kernel segment", &(segment.addr..segment.end()))?;
    }
    for (module, range) in modules.iter().zip(&ranges) {
        check(&format!("module {} ({} bytes)", String::from_utf8_lossy(module.string), module.len), range)?;
    }
    ensure!(
        kernel.entry < mem_size,
        "the kernel's entry point {:#x} is outside guest RAM of {mem_size:#x} bytes",
        kernel.entry
    );
    Ok(Layout { modules: ranges, info })
}

/// The information structure at [`INFO_ADDR`], followed by the memory map,
/// the module list and the NUL-terminated strings. The fields QEMU fills,
/// filled as QEMU does.
fn information(cmdline: &[u8], modules: &[ModuleInfo<'_>], ranges: &[Range<u64>], mem_size: u64) -> Vec<u8> {
    let map = memory_map(mem_size);
    let mmap_offset = mbi::LEN;
    let mods_offset = mmap_offset + map.len() * mbi::MMAP_ENTRY_LEN;
    let strings_offset = mods_offset + modules.len() * mbi::MOD_LEN;
    let mut info = vec![0u8; strings_offset];
    // Addresses below LOW_RAM_END or of modules in RAM below 4 GiB (both
    // checked by the caller): all fit in 32 bits.
    let addr = |offset: usize| (INFO_ADDR + offset as u64) as u32;
    let add_string = |info: &mut Vec<u8>, s: &[u8]| {
        let at = addr(info.len());
        info.extend_from_slice(s);
        info.push(0);
        at
    };
    let cmdline_addr = add_string(&mut info, cmdline);
    let module_strings: Vec<u32> = modules.iter().map(|m| add_string(&mut info, m.string)).collect();
    let name_addr = add_string(&mut info, BOOTLOADER_NAME);

    let put = |info: &mut Vec<u8>, at: usize, value: u32| info[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let put64 = |info: &mut Vec<u8>, at: usize, value: u64| info[at..at + 8].copy_from_slice(&value.to_le_bytes());
    let flags = mbi::HAS_MEMORY
        | mbi::HAS_BOOT_DEVICE
        | mbi::HAS_CMDLINE
        | mbi::HAS_MODS
        | mbi::HAS_MMAP
        | mbi::HAS_BOOT_LOADER_NAME;
    put(&mut info, mbi::FLAGS, flags);
    // Lower memory up to the EBDA, as the memory map says (and QEMU).
    put(&mut info, mbi::MEM_LOWER, (layout::LOW_RAM_END >> 10) as u32);
    put(&mut info, mbi::MEM_UPPER, ((mem_size - layout::HIGH_RAM_START) >> 10) as u32);
    // BIOS drive 0x80, no partition: what QEMU says. There is no disk; the
    // field is there because kernels written for GRUB expect it.
    put(&mut info, mbi::BOOT_DEVICE, 0x8000_ffff);
    put(&mut info, mbi::CMDLINE, cmdline_addr);
    put(&mut info, mbi::MODS_COUNT, modules.len() as u32);
    put(&mut info, mbi::MODS_ADDR, addr(mods_offset));
    put(&mut info, mbi::MMAP_LENGTH, (map.len() * mbi::MMAP_ENTRY_LEN) as u32);
    put(&mut info, mbi::MMAP_ADDR, addr(mmap_offset));
    put(&mut info, mbi::BOOT_LOADER_NAME, name_addr);
    for (i, (base, len, kind)) in map.into_iter().enumerate() {
        let at = mmap_offset + i * mbi::MMAP_ENTRY_LEN;
        put(&mut info, at, (mbi::MMAP_ENTRY_LEN - 4) as u32);
        put64(&mut info, at + 4, base);
        put64(&mut info, at + 12, len);
        put(&mut info, at + 20, kind);
    }
    for (i, (range, string)) in ranges.iter().zip(module_strings).enumerate() {
        let at = mods_offset + i * mbi::MOD_LEN;
        put(&mut info, at, range.start as u32);
        put(&mut info, at + 4, range.end as u32);
        put(&mut info, at + 8, string);
    }
    info
}

/// The kernel's command line as QEMU builds it: the kernel's file name as
/// given, then a space and the arguments if there are any.
pub fn command_line(kernel: &OsStr, args: &OsStr) -> Vec<u8> {
    let mut line = kernel.as_bytes().to_vec();
    if !args.is_empty() {
        line.push(b' ');
        line.extend_from_slice(args.as_bytes());
    }
    line
}

/// A Multiboot guest read from its files and laid out, ready to copy into
/// guest RAM.
pub struct Boot {
    image: Vec<u8>,
    kernel: Kernel,
    modules: Vec<Vec<u8>>,
    layout: Layout,
}

impl Boot {
    /// Reads `kernel` and the `modules`, and lays them out in `mem_size`
    /// bytes of RAM with `args` as the kernel's arguments.
    ///
    /// # Errors
    /// A file cannot be read, or [`parse`] or [`plan`] refuses it.
    pub fn prepare(kernel: &Path, modules: &[PathBuf], args: &OsStr, mem_size: u64) -> Result<Self> {
        let image = fs::read(kernel).with_context(|| format!("cannot read kernel {}", kernel.display()))?;
        let parsed = parse(&image).with_context(|| format!("kernel {}", kernel.display()))?;
        if parsed.unmet_flags != 0 {
            const VIDEO_MODE: u32 = 1 << 2;
            log::warn!(
                "kernel {}: Multiboot header flags {:#x} ask for what rkvm does not provide{}; booting it anyway, as QEMU does",
                kernel.display(),
                parsed.unmet_flags,
                if parsed.unmet_flags & VIDEO_MODE != 0 { " (bit 2: a video mode)" } else { "" }
            );
        }
        let contents = modules
            .iter()
            .map(|m| fs::read(m).with_context(|| format!("cannot read module {}", m.display())))
            .collect::<Result<Vec<_>>>()?;
        let infos: Vec<ModuleInfo<'_>> = modules
            .iter()
            .zip(&contents)
            .map(|(path, bytes)| ModuleInfo { string: path.as_os_str().as_bytes(), len: bytes.len() as u64 })
            .collect();
        let layout = plan(&parsed, &command_line(kernel.as_os_str(), args), &infos, mem_size)?;
        Ok(Self { image, kernel: parsed, modules: contents, layout })
    }

    /// Where the kernel starts.
    pub fn entry(&self) -> u64 {
        self.kernel.entry
    }

    /// Copies the kernel, its modules and the information into `mem`, which
    /// is the RAM [`Boot::prepare`] planned for. Zeroes the bss explicitly:
    /// the loader promises it, whatever RAM held before.
    ///
    /// # Errors
    /// A write outside `mem`: RAM smaller than planned.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<()> {
        const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        for segment in &self.kernel.segments {
            let data = &self.image[segment.file.clone()];
            mem.write_slice(data, GuestAddress(segment.addr)).context("copying the kernel into guest RAM")?;
            let mut addr = segment.addr + data.len() as u64;
            while addr < segment.end() {
                let len = (segment.end() - addr).min(PAGE_SIZE);
                mem.write_slice(&ZEROS[..len as usize], GuestAddress(addr)).context("zeroing the kernel's bss")?;
                addr += len;
            }
        }
        for (bytes, range) in self.modules.iter().zip(&self.layout.modules) {
            mem.write_slice(bytes, GuestAddress(range.start)).context("copying a module into guest RAM")?;
        }
        mem.write_slice(&self.layout.info, GuestAddress(INFO_ADDR)).context("writing the Multiboot information")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A PT_LOAD segment for [`elf`].
    struct Load {
        paddr: u32,
        vaddr: u32,
        data: Vec<u8>,
        memsz: u32,
        exec: bool,
    }

    fn load(paddr: u32, data: &[u8], memsz: u32) -> Load {
        Load { paddr, vaddr: paddr, data: data.to_vec(), memsz, exec: true }
    }

    fn multiboot_header(flags: u32) -> Vec<u8> {
        [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// An ELF32 i386 executable: the ELF header, program headers, the
    /// Multiboot header with `flags`, then each segment's data.
    fn elf(segments: &[Load], entry: u32, flags: u32) -> Vec<u8> {
        let phoff = 52;
        let header_at = phoff + 32 * segments.len();
        let mut data_at = header_at + 12;
        let mut out = vec![0u8; data_at];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4..7].copy_from_slice(&[1, 1, 1]); // ELFCLASS32, little-endian, version 1
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..28].copy_from_slice(&entry.to_le_bytes());
        out[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
        out[40..42].copy_from_slice(&52u16.to_le_bytes());
        out[42..44].copy_from_slice(&32u16.to_le_bytes());
        out[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        out[header_at..header_at + 12].copy_from_slice(&multiboot_header(flags));
        for (i, s) in segments.iter().enumerate() {
            let ph = [1, data_at as u32, s.vaddr, s.paddr, s.data.len() as u32, s.memsz, 4 | u32::from(s.exec), 4];
            let at = phoff + 32 * i;
            for (j, v) in ph.iter().enumerate() {
                out[at + 4 * j..at + 4 * j + 4].copy_from_slice(&v.to_le_bytes());
            }
            data_at += s.data.len();
        }
        for s in segments {
            out.extend_from_slice(&s.data);
        }
        out
    }

    fn err(result: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.expect_err("an error"))
    }

    #[test]
    fn an_elf_kernel_loads_its_segments_at_physical_addresses() {
        let image = elf(&[load(0x10_0000, &[0xf4; 0x30], 0x30), load(0x10_2000, &[1, 2, 3], 0x1000)], 0x10_0000, 0);
        let kernel = parse(&image).unwrap();
        let data_at = 52 + 64 + 12;
        assert_eq!(
            kernel.segments,
            vec![
                Segment { addr: 0x10_0000, file: data_at..data_at + 0x30, mem_size: 0x30 },
                Segment { addr: 0x10_2000, file: data_at + 0x30..data_at + 0x33, mem_size: 0x1000 },
            ]
        );
        assert_eq!((kernel.entry, kernel.unmet_flags), (0x10_0000, 0));
    }

    #[test]
    fn a_virtual_entry_point_is_translated_through_its_segment() {
        let mut text = load(0x10_0000, &[0x90; 0x100], 0x100);
        text.vaddr = 0xc010_0000;
        let image = elf(&[text], 0xc010_0010, 0);
        assert_eq!(parse(&image).unwrap().entry, 0x10_0010);
    }

    #[test]
    fn empty_and_non_load_segments_are_skipped() {
        let mut image = elf(&[load(0x10_0000, &[1], 1), load(0x20_0000, &[], 0)], 0x10_0000, 0);
        assert_eq!(parse(&image).unwrap().segments.len(), 1);
        image[52..56].copy_from_slice(&6u32.to_le_bytes()); // the first is now PT_PHDR
        assert!(err(parse(&image)).contains("no loadable segment"));
    }

    #[test]
    fn the_header_must_be_there_with_a_valid_checksum() {
        assert!(err(parse(&[0x90; 100])).contains("not a Multiboot kernel: no header"));
        let mut image = elf(&[load(0x10_0000, &[0xf4], 1)], 0x10_0000, 0);
        let at = 52 + 32 + 8;
        image[at] ^= 1;
        let e = err(parse(&image));
        assert!(e.contains("header at offset 0x54 has a bad checksum"), "{e}");
    }

    #[test]
    fn the_header_must_start_in_the_first_8k_at_a_4_byte_boundary() {
        let mut image = vec![0u8; 8192];
        image.extend_from_slice(&multiboot_header(0));
        assert!(err(parse(&image)).contains("no header"));
        let mut image = vec![0u8; 2];
        image.extend_from_slice(&multiboot_header(0));
        assert!(err(parse(&image)).contains("no header"));
    }

    #[test]
    fn a_truncated_elf_file_is_named_as_such() {
        let image = elf(&[load(0x10_0000, &[0xf4; 64], 64)], 0x10_0000, 0);
        let e = err(parse(&image[..image.len() - 1]));
        assert!(e.contains("truncated: ELF segment 0 takes 0x40 bytes"), "{e}");
        // Cut inside the program headers: the Multiboot header (after them)
        // is gone too.
        let mut cut = image[..60].to_vec();
        cut.extend_from_slice(&multiboot_header(0));
        let e = err(parse(&cut));
        assert!(e.contains("truncated: its 1 ELF program headers"), "{e}");
    }

    #[test]
    fn elf_files_of_the_wrong_kind_are_refused() {
        let image = elf(&[load(0x10_0000, &[0xf4], 1)], 0x10_0000, 0);
        let mut elf64 = image.clone();
        elf64[4] = 2;
        assert!(err(parse(&elf64)).contains("64-bit ELF"));
        let mut arm = image.clone();
        arm[18] = 40;
        assert!(err(parse(&arm)).contains("ELF machine 40 is not i386"));
        let mut not_elf = image;
        not_elf[0] = 0;
        assert!(err(parse(&not_elf)).contains("not an ELF file"));
    }

    #[test]
    fn overlapping_or_inconsistent_elf_segments_are_refused() {
        let image = elf(&[load(0x10_0000, &[1; 16], 0x2000), load(0x10_1000, &[2], 1)], 0x10_0000, 0);
        assert!(err(parse(&image)).contains("ELF segments at 0x100000..0x102000 and 0x101000..0x101001 overlap"));
        let image = elf(&[load(0x10_0000, &[1; 16], 8)], 0x10_0000, 0);
        assert!(err(parse(&image)).contains("file size 0x10 exceeds memory size 0x8"));
        let image = elf(&[load(0xffff_f000, &[1], 0x2000)], 0xffff_f000, 0);
        assert!(err(parse(&image)).contains("ends above 4 GiB"));
    }

    /// An a.out-style kernel: 0x20 bytes of padding, the header with the
    /// address fields, code; loaded so that the header is at 0x100020.
    fn address_field_kernel(load_end: u32, bss_end: u32) -> Vec<u8> {
        let mut image = vec![0u8; 0x20];
        image.extend_from_slice(&multiboot_header(FLAG_ADDRESS_FIELDS));
        for v in [0x10_0020u32, 0x10_0000, load_end, bss_end, 0x10_0040] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.resize(0x50, 0xf4);
        image
    }

    #[test]
    fn address_fields_load_the_file_from_load_addr() {
        let kernel = parse(&address_field_kernel(0, 0)).unwrap();
        assert_eq!(kernel.segments, vec![Segment { addr: 0x10_0000, file: 0..0x50, mem_size: 0x50 }]);
        assert_eq!(kernel.entry, 0x10_0040);
        let kernel = parse(&address_field_kernel(0x10_0048, 0x10_1000)).unwrap();
        assert_eq!(kernel.segments, vec![Segment { addr: 0x10_0000, file: 0..0x48, mem_size: 0x1000 }]);
    }

    #[test]
    fn address_fields_take_precedence_over_elf_as_in_qemu() {
        let mut image = elf(&[load(0x20_0000, &[0xf4; 16], 16)], 0x20_0000, FLAG_ADDRESS_FIELDS);
        let header_at = 52 + 32;
        // header_addr = 0x100000 + header_at: the file is loaded from its start.
        let fields = [0x10_0000 + header_at as u32, 0x10_0000, 0, 0, 0x10_0000];
        image.splice(header_at + 12..header_at + 12, fields.iter().flat_map(|v| v.to_le_bytes()));
        let kernel = parse(&image).unwrap();
        assert_eq!(kernel.segments[0].addr, 0x10_0000);
        assert_eq!(kernel.segments[0].file, 0..image.len());
    }

    #[test]
    fn inconsistent_address_fields_are_refused() {
        let e = err(parse(&address_field_kernel(0x10_0100, 0)));
        assert!(e.contains("the file is truncated: Multiboot load_addr..load_end_addr"), "{e}");
        assert!(err(parse(&address_field_kernel(0xf_0000, 0))).contains("load_end_addr 0xf0000 is below load_addr"));
        assert!(err(parse(&address_field_kernel(0x10_0048, 0x10_0010))).contains("bss_end_addr 0x100010 is below"));
        let mut image = address_field_kernel(0, 0);
        image[0x2c..0x30].copy_from_slice(&0x10_0040u32.to_le_bytes()); // header_addr: 0x40 bytes in
        assert!(err(parse(&image)).contains("before the start of the file"));
        let e = err(parse(&image[..0x34]));
        assert!(e.contains("sets flag 16, but the file ends inside its address fields"), "{e}");
    }

    #[test]
    fn unmet_requirements_are_reported_not_refused() {
        let image = elf(&[load(0x10_0000, &[0xf4], 1)], 0x10_0000, 0b111);
        assert_eq!(parse(&image).unwrap().unmet_flags, 0b100);
    }

    fn kernel_at(addr: u64, mem_size: u64) -> Kernel {
        Kernel { segments: vec![Segment { addr, file: 0..0, mem_size }], entry: addr, unmet_flags: 0 }
    }

    fn u32_at(info: &[u8], at: usize) -> u32 {
        le32(info, at).unwrap()
    }

    /// The NUL-terminated string at guest address `addr` in `info`.
    fn string_at(info: &[u8], addr: u32) -> &[u8] {
        let from = (u64::from(addr) - INFO_ADDR) as usize;
        let len = info[from..].iter().position(|&b| b == 0).unwrap();
        &info[from..from + len]
    }

    #[test]
    fn modules_follow_the_kernel_page_aligned_and_the_information_describes_them() {
        let kernel = kernel_at(0x10_0000, 0x1234);
        let modules = [ModuleInfo { string: b"a.bin", len: 0x1001 }, ModuleInfo { string: b"b", len: 0 }];
        let layout = plan(&kernel, b"k.elf console=com1", &modules, 2 * MIB).unwrap();
        assert_eq!(layout.modules, vec![0x10_2000..0x10_3001, 0x10_4000..0x10_4000]);
        let info = &layout.info;
        assert_eq!(u32_at(info, mbi::FLAGS), 0x24f, "QEMU's: memory, boot device, cmdline, mods, mmap, name");
        assert_eq!(u32_at(info, mbi::MEM_LOWER), 639);
        assert_eq!(u32_at(info, mbi::MEM_UPPER), 1024);
        assert_eq!(string_at(info, u32_at(info, mbi::CMDLINE)), b"k.elf console=com1");
        assert_eq!(string_at(info, u32_at(info, mbi::BOOT_LOADER_NAME)), b"rkvm");
        assert_eq!(u32_at(info, mbi::MODS_COUNT), 2);
        let mods = (u64::from(u32_at(info, mbi::MODS_ADDR)) - INFO_ADDR) as usize;
        assert_eq!((u32_at(info, mods), u32_at(info, mods + 4)), (0x10_2000, 0x10_3001));
        assert_eq!(string_at(info, u32_at(info, mods + 8)), b"a.bin");
        assert_eq!((u32_at(info, mods + 16), u32_at(info, mods + 20)), (0x10_4000, 0x10_4000));
        assert_eq!(string_at(info, u32_at(info, mods + 24)), b"b");
    }

    #[test]
    fn the_memory_map_has_the_pc_holes_and_the_rest_of_ram() {
        let layout = plan(&kernel_at(0x10_0000, 0x1000), b"k", &[], 64 * MIB).unwrap();
        let info = &layout.info;
        assert_eq!(u32_at(info, mbi::MEM_UPPER), 63 * 1024);
        assert_eq!(u32_at(info, mbi::MODS_COUNT), 0);
        let (mmap, len) =
            ((u64::from(u32_at(info, mbi::MMAP_ADDR)) - INFO_ADDR) as usize, u32_at(info, mbi::MMAP_LENGTH));
        let entries: Vec<(u32, u64, u64, u32)> = info[mmap..mmap + len as usize]
            .chunks(24)
            .map(|e| {
                let q = |at: usize| u64::from_le_bytes(e[at..at + 8].try_into().unwrap());
                (u32_at(e, 0), q(4), q(12), u32_at(e, 20))
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                (20, 0, 0x9_fc00, 1),
                (20, 0x9_fc00, 0x400, 2),
                (20, 0xf_0000, 0x1_0000, 2),
                (20, 0x10_0000, 63 * MIB, 1),
            ]
        );
    }

    #[test]
    fn the_command_line_is_the_file_name_then_the_arguments() {
        assert_eq!(command_line(OsStr::new("/boot/k.elf"), OsStr::new("a=1 b")), b"/boot/k.elf a=1 b");
        assert_eq!(command_line(OsStr::new("k.elf"), OsStr::new("")), b"k.elf");
    }

    #[test]
    fn a_segment_outside_ram_asks_for_more_memory() {
        let e = err(plan(&kernel_at(0x10_0000, 0x20_0000), b"k", &[], 2 * MIB));
        assert!(
            e.contains(
                "kernel segment at 0x100000..0x300000 does not fit in guest RAM of 0x200000 bytes; use a larger --mem"
            ),
            "{e}"
        );
        let e = err(plan(&kernel_at(0x10_0000, 0x1000), b"k", &[], MIB));
        assert!(e.contains("needs RAM above 1 MiB"), "{e}");
        assert!(err(plan(&kernel_at(0x10_0000, 0x1000), b"k", &[], 8 << 30)).contains("below 4 GiB"));
        let mut kernel = kernel_at(0x10_0000, 0x1000);
        kernel.entry = 0x30_0000;
        assert!(err(plan(&kernel, b"k", &[], 2 * MIB)).contains("entry point 0x300000 is outside guest RAM"));
    }

    #[test]
    fn a_module_past_the_end_of_ram_asks_for_more_memory() {
        let modules = [ModuleInfo { string: b"initrd.img", len: MIB }];
        let e = err(plan(&kernel_at(0x10_0000, 0x1000), b"k", &modules, 2 * MIB));
        assert!(e.contains("module initrd.img (1048576 bytes) at 0x101000..0x201000 does not fit"), "{e}");
    }

    #[test]
    fn low_memory_kernels_and_modules_must_not_overlap_the_vmms_structures() {
        let modules = [ModuleInfo { string: b"m", len: 0x2000 }];
        let e = err(plan(&kernel_at(0x8000, 0x800), b"k", &modules, 2 * MIB));
        assert!(
            e.contains("module m (8192 bytes) at 0x9000..0xb000 overlaps the Multiboot information at 0x9000.."),
            "{e}"
        );
        let e = err(plan(&kernel_at(0x400, 0x200), b"k", &[], 2 * MIB));
        assert!(e.contains("kernel segment at 0x400..0x600 overlaps the GDT"), "{e}");
        let modules = [ModuleInfo { string: b"m", len: 0x1000 }];
        assert!(plan(&kernel_at(0x1_0000, 0x800), b"k", &modules, 2 * MIB).is_ok(), "below 640 KiB, clear of it all");
        assert!(plan(&kernel_at(0xf_f000, 0x1000), b"k", &[], 2 * MIB).is_ok(), "RAM, reserved only in the map");
    }

    #[test]
    fn an_overlong_command_line_is_refused() {
        let line = vec![b'x'; 0x10_0000];
        assert!(err(plan(&kernel_at(0x10_0000, 0x1000), &line, &[], 4 * MIB)).contains("too long"));
    }
}
