//! Translating a guest-linear address to a guest-physical one by walking
//! the guest's own page tables (SDM Vol. 3A, 5 "Paging"), with the access
//! rights the CPU would check (5.6 "Access Rights"): what rkvm needs to
//! reach the memory operands of the string I/O instructions it emulates
//! and the bytes of an instruction that touched MMIO.
//!
//! Emulated accesses must fault exactly where the CPU's own would: a user
//! process allowed to do port I/O must not write a read-only or a
//! supervisor-only page through `REP INSB` just because rkvm, not the CPU,
//! performs the store. A denied access is a page fault with the error code
//! the CPU would push (5.7 "Page-Fault Exceptions", Figure 5-12).

/// Reads guest-physical memory.
pub trait GuestPhysical {
    /// The 8 bytes at `gpa` (little endian), or `None` outside guest RAM.
    fn read_u64(&mut self, gpa: u64) -> Option<u64>;
}

/// The control-register state that selects the paging mode and the
/// access-rights rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct PagingState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// One access to translate: what kind, and by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A data write (else a read or a fetch).
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// A user-mode access (CPL 3); else supervisor-mode.
    pub user: bool,
    /// RFLAGS.AC, which lets supervisor data accesses reach user pages
    /// under SMAP (5.6.1).
    pub ac: bool,
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The guest takes #PF with this error code (Figure 5-12).
    PageFault {
        /// P, W/R, U/S, RSVD and I/D bits.
        error_code: u32,
    },
    /// A paging structure is outside guest RAM.
    OutsideRam,
}

/// Page-fault error code bits (SDM Vol. 3A, Figure 5-12).
pub mod pf {
    /// The fault was a protection violation (the page was present).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch.
    pub const FETCH: u32 = 1 << 4;
}

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const XD: u64 = 1 << 63;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_NXE: u64 = 1 << 11;
const EFER_LMA: u64 = 1 << 10;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The rights the entries on the way to a page grant together (5.6: a
/// right holds only if every level grants it).
#[derive(Debug, Clone, Copy)]
struct Rights {
    writable: bool,
    user: bool,
    no_execute: bool,
}

impl Rights {
    const ALL: Rights = Rights { writable: true, user: true, no_execute: false };

    fn and(self, entry: u64, xd_exists: bool) -> Rights {
        Rights {
            writable: self.writable && entry & WRITABLE != 0,
            user: self.user && entry & USER != 0,
            no_execute: self.no_execute || (xd_exists && entry & XD != 0),
        }
    }
}

/// The error code bits that describe `access` itself.
fn access_bits(p: &PagingState, access: Access) -> u32 {
    let mut code = 0;
    if access.write {
        code |= pf::WRITE;
    }
    if access.user {
        code |= pf::USER;
    }
    // I/D is reported only where fetches can be refused (Figure 5-12).
    let nx_paging = p.cr4 & CR4_PAE != 0 && p.efer & EFER_NXE != 0;
    if access.fetch && (nx_paging || p.cr4 & CR4_SMEP != 0) {
        code |= pf::FETCH;
    }
    code
}

/// Whether `rights` allow `access` (5.6.1 "Determination of Access Rights").
fn allowed(p: &PagingState, rights: Rights, access: Access) -> bool {
    if access.fetch && rights.no_execute {
        return false;
    }
    if access.user {
        return rights.user && (!access.write || rights.writable);
    }
    // Supervisor-mode access.
    if access.write && !rights.writable && p.cr0 & CR0_WP != 0 {
        return false;
    }
    if rights.user {
        if access.fetch && p.cr4 & CR4_SMEP != 0 {
            return false;
        }
        if !access.fetch && p.cr4 & CR4_SMAP != 0 && !access.ac {
            return false;
        }
    }
    true
}

/// Reads the entry `index` of the table at `table` (`size`-byte entries).
fn entry(mem: &mut impl GuestPhysical, table: u64, index: u64, size: u64) -> Result<u64, WalkError> {
    let gpa = table + index * size;
    let raw = mem.read_u64(gpa).ok_or(WalkError::OutsideRam)?;
    Ok(if size == 4 { raw & 0xffff_ffff } else { raw })
}

/// The guest-physical address that `access` to `linear` reaches.
///
/// # Errors
/// [`WalkError::PageFault`] where the CPU would fault (an entry not present,
/// a reserved bit set, or rights that deny the access), or
/// [`WalkError::OutsideRam`] when a paging structure is not in guest RAM.
pub fn translate(mem: &mut impl GuestPhysical, p: &PagingState, linear: u64, access: Access) -> Result<u64, WalkError> {
    if p.cr0 & CR0_PG == 0 {
        // No paging: linear is physical (32-bit outside long mode), and
        // every access is allowed.
        return Ok(linear & 0xffff_ffff);
    }
    let bits = access_bits(p, access);
    let not_present = WalkError::PageFault { error_code: bits };
    let reserved = WalkError::PageFault { error_code: bits | pf::PRESENT | pf::RSVD };
    let denied = WalkError::PageFault { error_code: bits | pf::PRESENT };
    let xd_exists = p.efer & EFER_NXE != 0;
    let check = |rights: Rights, gpa: u64| if allowed(p, rights, access) { Ok(gpa) } else { Err(denied) };

    if p.efer & EFER_LMA != 0 {
        // 4-level paging: PML4 (39), PDPT (30, 1 GiB pages), PD (21, 2 MiB
        // pages), PT (12).
        let mut table = p.cr3 & ADDR;
        let mut rights = Rights::ALL;
        for shift in [39u32, 30, 21, 12] {
            let e = entry(mem, table, (linear >> shift) & 0x1ff, 8)?;
            if e & PRESENT == 0 {
                return Err(not_present);
            }
            // XD is reserved without EFER.NXE; PS is reserved in a PML4E
            // (5.3.1.2, Table 5-15).
            if (!xd_exists && e & XD != 0) || (shift == 39 && e & LARGE != 0) {
                return Err(reserved);
            }
            rights = rights.and(e, xd_exists);
            if shift != 39 && shift != 12 && e & LARGE != 0 {
                let mask = (1u64 << shift) - 1;
                return check(rights, (e & ADDR & !mask) | (linear & mask));
            }
            table = e & ADDR;
        }
        return check(rights, table | (linear & 0xfff));
    }
    let linear = linear & 0xffff_ffff;
    if p.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPTEs at CR3[31:5] (they carry no access rights), then PD
        // (2 MiB pages) and PT.
        let pdpte = entry(mem, p.cr3 & 0xffff_ffe0, linear >> 30, 8)?;
        if pdpte & PRESENT == 0 {
            return Err(not_present);
        }
        let mut rights = Rights::ALL;
        let pde = entry(mem, pdpte & ADDR, (linear >> 21) & 0x1ff, 8)?;
        if pde & PRESENT == 0 {
            return Err(not_present);
        }
        if !xd_exists && pde & XD != 0 {
            return Err(reserved);
        }
        rights = rights.and(pde, xd_exists);
        if pde & LARGE != 0 {
            return check(rights, (pde & ADDR & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = entry(mem, pde & ADDR, (linear >> 12) & 0x1ff, 8)?;
        if pte & PRESENT == 0 {
            return Err(not_present);
        }
        if !xd_exists && pte & XD != 0 {
            return Err(reserved);
        }
        return check(rights.and(pte, xd_exists), (pte & ADDR) | (linear & 0xfff));
    }
    // 32-bit paging: PD (4 MiB pages with CR4.PSE), PT; no execute-disable.
    let pde = entry(mem, p.cr3 & 0xffff_f000, linear >> 22, 4)?;
    if pde & PRESENT == 0 {
        return Err(not_present);
    }
    let rights = Rights::ALL.and(pde, false);
    if pde & LARGE != 0 && p.cr4 & CR4_PSE != 0 {
        let high = ((pde >> 13) & 0xff) << 32; // PSE-36 bits 39:32
        return check(rights, high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = entry(mem, pde & 0xffff_f000, (linear >> 12) & 0x3ff, 4)?;
    if pte & PRESENT == 0 {
        return Err(not_present);
    }
    check(rights.and(pte, false), (pte & 0xffff_f000) | (linear & 0xfff))
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

    const READ: Access = Access { write: false, fetch: false, user: false, ac: false };
    const WRITE: Access = Access { write: true, ..READ };
    const USER_READ: Access = Access { user: true, ..READ };
    const USER_WRITE: Access = Access { user: true, write: true, ..READ };
    const FETCH: Access = Access { fetch: true, ..READ };

    fn fault(code: u32) -> Result<u64, WalkError> {
        Err(WalkError::PageFault { error_code: code })
    }

    /// 4-level paging with CR0.WP: PML4[0] -> PDPT -> PD; PD[0] is a 2 MiB
    /// page at 4 MiB; PD[1] -> PT with PT[5] at 0x9000. `leaf` and `upper`
    /// are the flags of PT[5] and of every table entry above it.
    fn four_level(leaf: u64, upper: u64) -> (Ram, PagingState) {
        let mut ram = Ram::default();
        ram.put(0x1000, 0x2000 | upper); // PML4[0] -> PDPT
        ram.put(0x2000, 0x3000 | upper); // PDPT[0] -> PD
        ram.put(0x3000, 0x40_0000 | 0x80 | upper); // PD[0]: 2 MiB page at 4 MiB
        ram.put(0x3008, 0x4000 | upper); // PD[1] -> PT
        ram.put(0x4000 + 5 * 8, 0x9000 | leaf); // PT[5]
        let p = PagingState { cr0: 0x8001_0011, cr3: 0x1000, cr4: 0x20, efer: 0xd00 };
        (ram, p)
    }

    #[test]
    fn without_paging_linear_is_physical() {
        let p = PagingState { cr0: 0x11, ..Default::default() };
        assert_eq!(translate(&mut Ram::default(), &p, 0x1_2345_6789, WRITE), Ok(0x2345_6789));
    }

    #[test]
    fn four_level_with_a_2m_page_and_a_4k_page() {
        let (mut ram, p) = four_level(0x7, 0x7);
        assert_eq!(translate(&mut ram, &p, 0x1_2345, READ), Ok(0x41_2345));
        assert_eq!(translate(&mut ram, &p, 0x20_5abc, WRITE), Ok(0x9abc));
    }

    #[test]
    fn a_page_not_present_faults_with_p_clear() {
        let (mut ram, p) = four_level(0x7, 0x7);
        assert_eq!(translate(&mut ram, &p, 0x20_6000, READ), fault(0));
        assert_eq!(translate(&mut ram, &p, 0x20_6000, USER_WRITE), fault(pf::USER | pf::WRITE));
    }

    #[test]
    fn a_user_write_to_a_read_only_page_faults() {
        let (mut ram, p) = four_level(0x5, 0x7); // PT[5]: present, user, read-only
        assert_eq!(translate(&mut ram, &p, 0x20_5000, USER_READ), Ok(0x9000));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, USER_WRITE), fault(pf::PRESENT | pf::WRITE | pf::USER));
    }

    #[test]
    fn read_only_at_any_level_makes_the_page_read_only() {
        let (mut ram, p) = four_level(0x7, 0x5); // every table entry read-only
        assert_eq!(translate(&mut ram, &p, 0x20_5000, USER_WRITE), fault(pf::PRESENT | pf::WRITE | pf::USER));
    }

    #[test]
    fn a_user_access_to_a_supervisor_page_faults() {
        let (mut ram, p) = four_level(0x3, 0x7); // PT[5]: supervisor
        assert_eq!(translate(&mut ram, &p, 0x20_5000, USER_READ), fault(pf::PRESENT | pf::USER));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, READ), Ok(0x9000));
    }

    #[test]
    fn supervisor_writes_to_read_only_pages_fault_only_with_cr0_wp() {
        let (mut ram, mut p) = four_level(0x1, 0x7); // PT[5]: present, read-only, supervisor
        assert_eq!(translate(&mut ram, &p, 0x20_5000, WRITE), fault(pf::PRESENT | pf::WRITE));
        p.cr0 &= !CR0_WP;
        assert_eq!(translate(&mut ram, &p, 0x20_5000, WRITE), Ok(0x9000));
    }

    #[test]
    fn smap_blocks_supervisor_data_accesses_to_user_pages_unless_ac() {
        let (mut ram, mut p) = four_level(0x7, 0x7);
        p.cr4 |= CR4_SMAP;
        assert_eq!(translate(&mut ram, &p, 0x20_5000, WRITE), fault(pf::PRESENT | pf::WRITE));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, Access { ac: true, ..WRITE }), Ok(0x9000));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, USER_WRITE), Ok(0x9000));
    }

    #[test]
    fn execute_disable_and_smep_block_fetches() {
        let (mut ram, mut p) = four_level(0x7 | XD, 0x7);
        assert_eq!(translate(&mut ram, &p, 0x20_5000, FETCH), fault(pf::PRESENT | pf::FETCH));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, READ), Ok(0x9000));
        let (mut ram, _) = four_level(0x7, 0x7);
        p.cr4 |= CR4_SMEP;
        assert_eq!(translate(&mut ram, &p, 0x20_5000, FETCH), fault(pf::PRESENT | pf::FETCH));
        assert_eq!(translate(&mut ram, &p, 0x20_5000, Access { user: true, ..FETCH }), Ok(0x9000));
    }

    #[test]
    fn reserved_bits_fault_with_rsvd() {
        // XD without EFER.NXE, and PS in a PML4E.
        let (mut ram, mut p) = four_level(0x7 | XD, 0x7);
        p.efer &= !EFER_NXE;
        assert_eq!(translate(&mut ram, &p, 0x20_5000, READ), fault(pf::PRESENT | pf::RSVD));
        let (mut ram, p) = four_level(0x7, 0x7);
        ram.put(0x1000, 0x2000 | 0x87);
        assert_eq!(translate(&mut ram, &p, 0x20_5000, READ), fault(pf::PRESENT | pf::RSVD));
    }

    #[test]
    fn pae_and_32_bit_paging() {
        let mut ram = Ram::default();
        // PAE: PDPT at 0x1000, PD at 0x2000 with a 2 MiB page.
        ram.put(0x1000, 0x2000 | 1);
        ram.put(0x2000 + 8, 0x60_0000 | 0x87);
        let pae = PagingState { cr0: 0x8001_0011, cr3: 0x1000, cr4: 0x20, efer: 0 };
        assert_eq!(translate(&mut ram, &pae, 0x20_0010, USER_WRITE), Ok(0x60_0010));
        // 32-bit: PD at 0x5000, PDE 1 a 4 MiB page (PSE), PDE 0 -> PT.
        ram.put(0x5000, (0x6000 | 7) | ((0x80_0000u64 | 0x83) << 32));
        ram.put(0x6000 + 8, 0x7000 | 5); // PTE 2, user read-only (index 2 at 0x6008 low half)
        let p32 = PagingState { cr0: 0x8001_0011, cr3: 0x5000, cr4: 0x10, efer: 0 };
        assert_eq!(translate(&mut ram, &p32, 0x40_1234, READ), Ok(0x80_1234));
        assert_eq!(translate(&mut ram, &p32, 0x40_1234, USER_READ), fault(pf::PRESENT | pf::USER));
        assert_eq!(translate(&mut ram, &p32, 0x2abc, USER_READ), Ok(0x7abc));
        assert_eq!(translate(&mut ram, &p32, 0x2abc, USER_WRITE), fault(pf::PRESENT | pf::WRITE | pf::USER));
        assert_eq!(translate(&mut ram, &p32, 0x3000, READ), fault(0));
    }

    #[test]
    fn tables_outside_ram_are_reported() {
        let p = PagingState { cr0: 0x8000_0011, cr3: 1 << 31, cr4: 0x20, efer: 0x500 };
        assert_eq!(translate(&mut Ram::default(), &p, 0, READ), Err(WalkError::OutsideRam));
    }
}
