//! Translating a guest-linear address to a guest-physical one by walking
//! the guest's own page tables (SDM Vol. 3A, 5 "Paging"): what the run loop
//! needs to reach a string instruction's memory operand or the bytes of an
//! instruction to emulate. Permission bits are not checked: the hardware
//! already allowed the access that exited, and the emulated accesses are
//! the instruction's own.

/// Reads guest-physical memory.
pub trait GuestPhysical {
    /// The 8 bytes at `gpa` (little endian), or `None` outside guest RAM.
    fn read_u64(&mut self, gpa: u64) -> Option<u64>;
}

/// The control-register state that selects the paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct PagingState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// A paging-structure entry is not present: the guest would #PF.
    NotPresent,
    /// A paging structure is outside guest RAM.
    OutsideRam,
}

const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

fn entry(mem: &mut impl GuestPhysical, table: u64, index: u64, size: u64) -> Result<u64, WalkError> {
    let gpa = table + index * size;
    let raw = mem.read_u64(gpa).ok_or(WalkError::OutsideRam)?;
    let e = if size == 4 { raw & 0xffff_ffff } else { raw };
    if e & PRESENT == 0 {
        return Err(WalkError::NotPresent);
    }
    Ok(e)
}

/// The guest-physical address of `linear`.
///
/// # Errors
/// [`WalkError`] when the walk cannot finish.
pub fn translate(mem: &mut impl GuestPhysical, p: &PagingState, linear: u64) -> Result<u64, WalkError> {
    if p.cr0 & CR0_PG == 0 {
        // No paging: linear is physical (32-bit outside long mode).
        return Ok(linear & 0xffff_ffff);
    }
    if p.efer & EFER_LMA != 0 {
        // 4-level paging: PML4 (39), PDPT (30, 1 GiB pages), PD (21, 2 MiB
        // pages), PT (12).
        let mut table = p.cr3 & ADDR;
        for shift in [39u32, 30, 21, 12] {
            let e = entry(mem, table, (linear >> shift) & 0x1ff, 8)?;
            if shift != 39 && shift != 12 && e & LARGE != 0 {
                let mask = (1u64 << shift) - 1;
                return Ok((e & ADDR & !mask) | (linear & mask));
            }
            table = e & ADDR;
        }
        return Ok(table | (linear & 0xfff));
    }
    let linear = linear & 0xffff_ffff;
    if p.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPTEs at CR3[31:5], then PD (2 MiB pages) and PT.
        let pdpte = entry(mem, p.cr3 & 0xffff_ffe0, linear >> 30, 8)?;
        let pde = entry(mem, pdpte & ADDR, (linear >> 21) & 0x1ff, 8)?;
        if pde & LARGE != 0 {
            return Ok((pde & ADDR & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = entry(mem, pde & ADDR, (linear >> 12) & 0x1ff, 8)?;
        return Ok((pte & ADDR) | (linear & 0xfff));
    }
    // 32-bit paging: PD (4 MiB pages with CR4.PSE), PT.
    let pde = entry(mem, p.cr3 & 0xffff_f000, linear >> 22, 4)?;
    if pde & LARGE != 0 && p.cr4 & CR4_PSE != 0 {
        let high = ((pde >> 13) & 0xff) << 32; // PSE-36 bits 39:32
        return Ok(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = entry(mem, pde & 0xffff_f000, (linear >> 12) & 0x3ff, 4)?;
    Ok((pte & 0xffff_f000) | (linear & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Ram(BTreeMap<u64, u64>);

    impl Ram {
        fn put(&mut self, gpa: u64, v: u64) {
            self.0.insert(gpa, v);
        }
    }

    impl GuestPhysical for Ram {
        fn read_u64(&mut self, gpa: u64) -> Option<u64> {
            if gpa >= 1 << 30 {
                return None;
            }
            // 4-byte reads of 32-bit tables see the low half of a u64 put
            // at an 8-aligned address, or the high half.
            let base = gpa & !7;
            let v = self.0.get(&base).copied().unwrap_or(0);
            Some(if gpa & 4 != 0 { v >> 32 } else { v })
        }
    }

    #[test]
    fn without_paging_linear_is_physical() {
        let p = PagingState { cr0: 0x11, ..Default::default() };
        assert_eq!(translate(&mut Ram::default(), &p, 0x1_2345_6789), Ok(0x2345_6789));
    }

    #[test]
    fn four_level_with_a_2m_page_and_a_4k_page() {
        let mut ram = Ram::default();
        ram.put(0x1000, 0x2000 | 3); // PML4[0] -> PDPT
        ram.put(0x2000, 0x3000 | 3); // PDPT[0] -> PD
        ram.put(0x3000, 0x40_0000 | 0x83); // PD[0]: 2 MiB page at 4 MiB
        ram.put(0x3008, 0x4000 | 3); // PD[1] -> PT
        ram.put(0x4000 + 5 * 8, 0x9000 | 3); // PT[5]
        let p = PagingState { cr0: 0x8000_0011, cr3: 0x1000, cr4: 0x20, efer: 0x500 };
        assert_eq!(translate(&mut ram, &p, 0x1_2345), Ok(0x41_2345));
        assert_eq!(translate(&mut ram, &p, 0x20_5abc), Ok(0x9abc));
        assert_eq!(translate(&mut ram, &p, 0x20_6000), Err(WalkError::NotPresent));
    }

    #[test]
    fn pae_and_32_bit_paging() {
        let mut ram = Ram::default();
        // PAE: PDPT at 0x1000, PD at 0x2000 with a 2 MiB page.
        ram.put(0x1000, 0x2000 | 1);
        ram.put(0x2000 + 8, 0x60_0000 | 0x83);
        let pae = PagingState { cr0: 0x8000_0011, cr3: 0x1000, cr4: 0x20, efer: 0 };
        assert_eq!(translate(&mut ram, &pae, 0x20_0010), Ok(0x60_0010));
        // 32-bit: PD at 0x5000, PDE 1 a 4 MiB page (PSE), PDE 0 -> PT.
        ram.put(0x5000, (0x6000 | 3) | ((0x80_0000u64 | 0x83) << 32));
        ram.put(0x6000 + 8, 0x7000 | 3); // PTE 2 (4-byte entries: index 2 at 0x6008 low half)
        let p32 = PagingState { cr0: 0x8000_0011, cr3: 0x5000, cr4: 0x10, efer: 0 };
        assert_eq!(translate(&mut ram, &p32, 0x40_1234), Ok(0x80_1234));
        assert_eq!(translate(&mut ram, &p32, 0x2abc), Ok(0x7abc));
    }

    #[test]
    fn tables_outside_ram_are_reported() {
        let p = PagingState { cr0: 0x8000_0011, cr3: 1 << 31, cr4: 0x20, efer: 0x500 };
        assert_eq!(translate(&mut Ram::default(), &p, 0), Err(WalkError::OutsideRam));
    }
}
