//! A minimal ELF32 executable writer: an ELF header and one `PT_LOAD`
//! program header covering the whole file, which is loaded at a fixed
//! physical address with a zero-filled tail (the bss).
//!
//! Field layouts are those of the System V ABI, "Object Files" chapter
//! (`Elf32_Ehdr`, `Elf32_Phdr`); the machine is EM_386.

/// Size of `Elf32_Ehdr`.
pub const EHDR_SIZE: u32 = 52;
/// Size of one `Elf32_Phdr`.
pub const PHDR_SIZE: u32 = 32;
/// Bytes the headers take at the start of the file (and of the loaded
/// image: the single segment starts at file offset 0, headers included,
/// which keeps `p_offset` and `p_vaddr` congruent modulo the page size).
pub const HEADERS_SIZE: u32 = EHDR_SIZE + PHDR_SIZE;

const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const EV_CURRENT: u8 = 1;
const ELFCLASS32: u8 = 1;
const ELFDATA2LSB: u8 = 1;
const PT_LOAD: u32 = 1;
/// PF_R | PF_W | PF_X: the kernel keeps code, constants and variables in
/// one segment and never enables write protection, so one RWX segment is
/// honest.
const PF_RWX: u32 = 7;
const PAGE: u32 = 0x1000;

/// Builds an ELF32 executable whose single `PT_LOAD` segment is the whole
/// file, loaded at `load` (`p_paddr = p_vaddr = load`: a Multiboot loader
/// uses the physical address) and followed by `bss` zero bytes
/// (`p_memsz = p_filesz + bss`). `body` is everything after the headers;
/// it is loaded at `load + HEADERS_SIZE`. `entry` is `e_entry`.
pub fn exec_image(load: u32, entry: u32, body: &[u8], bss: u32) -> Vec<u8> {
    let filesz = HEADERS_SIZE + u32::try_from(body.len()).expect("image fits in 4 GiB");
    let memsz = filesz.checked_add(bss).expect("image and bss fit in 4 GiB");
    assert!(load & (PAGE - 1) == 0, "the segment must start on a page");
    assert!((load + HEADERS_SIZE..load + filesz).contains(&entry), "entry lies outside the loaded code");

    let mut f = Vec::with_capacity(filesz as usize);
    // e_ident: magic, class, data encoding, version, OS ABI (System V), padding.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', ELFCLASS32, ELFDATA2LSB, EV_CURRENT, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&ET_EXEC.to_le_bytes()); // e_type
    f.extend_from_slice(&EM_386.to_le_bytes()); // e_machine
    f.extend_from_slice(&u32::from(EV_CURRENT).to_le_bytes()); // e_version
    f.extend_from_slice(&entry.to_le_bytes()); // e_entry
    f.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff: right after this header
    f.extend_from_slice(&0u32.to_le_bytes()); // e_shoff: no section headers
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize: no sections
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx: SHN_UNDEF
    debug_assert_eq!(f.len() as u32, EHDR_SIZE);

    for word in [PT_LOAD, 0, load, load, filesz, memsz, PF_RWX, PAGE] {
        // p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
        f.extend_from_slice(&word.to_le_bytes());
    }
    debug_assert_eq!(f.len() as u32, HEADERS_SIZE);
    f.extend_from_slice(body);
    f
}

/// The fields of an ELF32 image the tests (and a loader) look at.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub entry: u32,
    /// `(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags)`
    pub segments: Vec<[u32; 7]>,
}

/// Parses `image` back the way a Multiboot loader would, checking every
/// identification field; `Err` names the first bad one.
#[cfg(test)]
pub fn parse(image: &[u8]) -> Result<Parsed, String> {
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap());
    if image.len() < EHDR_SIZE as usize {
        return Err("shorter than an ELF header".into());
    }
    if image[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err("bad magic".into());
    }
    let expect = |what: &str, got: u32, want: u32| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what} is {got:#x}, expected {want:#x}"))
        }
    };
    expect("EI_CLASS", image[4].into(), ELFCLASS32.into())?;
    expect("EI_DATA", image[5].into(), ELFDATA2LSB.into())?;
    expect("EI_VERSION", image[6].into(), EV_CURRENT.into())?;
    expect("e_type", u16_at(16).into(), ET_EXEC.into())?;
    expect("e_machine", u16_at(18).into(), EM_386.into())?;
    expect("e_version", u32_at(20), EV_CURRENT.into())?;
    expect("e_ehsize", u16_at(40).into(), EHDR_SIZE)?;
    expect("e_phentsize", u16_at(42).into(), PHDR_SIZE)?;
    let entry = u32_at(24);
    let phoff = u32_at(28) as usize;
    let phnum = usize::from(u16_at(44));
    if phoff + phnum * PHDR_SIZE as usize > image.len() {
        return Err("program headers beyond the file".into());
    }
    let segments = (0..phnum)
        .map(|i| {
            let p = phoff + i * PHDR_SIZE as usize;
            std::array::from_fn(|f| u32_at(p + 4 * f))
        })
        .collect();
    Ok(Parsed { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_back() {
        let body = [0x90u8; 100];
        let image = exec_image(0x10_0000, 0x10_0060, &body, 0x3000);
        assert_eq!(image.len(), HEADERS_SIZE as usize + body.len());
        let p = parse(&image).unwrap();
        assert_eq!(p.entry, 0x10_0060);
        let filesz = image.len() as u32;
        assert_eq!(p.segments, vec![[PT_LOAD, 0, 0x10_0000, 0x10_0000, filesz, filesz + 0x3000, PF_RWX]]);
        // p_align
        assert_eq!(&image[(EHDR_SIZE + 28) as usize..HEADERS_SIZE as usize], &PAGE.to_le_bytes());
        assert_eq!(&image[HEADERS_SIZE as usize..], &body);
    }

    #[test]
    fn parse_rejects_a_wrong_machine() {
        let mut image = exec_image(0x10_0000, 0x10_0060, &[0; 64], 0);
        image[18] = 62; // EM_X86_64
        assert_eq!(parse(&image).unwrap_err(), "e_machine is 0x3e, expected 0x3");
    }

    #[test]
    #[should_panic(expected = "entry lies outside")]
    fn entry_must_be_in_the_body() {
        exec_image(0x10_0000, 0x10_0000, &[0; 16], 0);
    }
}
