//! Extended page tables (SDM Vol. 3C, 29.3 "The Extended Page Table
//! Mechanism"): 4-level tables mapping guest-physical to host-physical
//! addresses, built over a [`TableMemory`] that the kernel implements with
//! real pages and the host tests with a `Vec`.

/// Read, write and execute permission (bits 2:0 of every entry).
pub const RWX: u64 = 0b111;
/// Leaf memory type write-back (bits 5:3 = 6), Table 29-6.
const MEMTYPE_WB: u64 = 6 << 3;
/// Bit 7 of a PDE or PDPTE: it maps a page.
const LARGE_PAGE: u64 = 1 << 7;
/// Bits 51:12: the address in an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// 4 KiB.
pub const SIZE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const SIZE_2M: u64 = 1 << 21;

/// The memory the tables live in.
pub trait TableMemory {
    /// A new zeroed 4 KiB table; its physical address, or `None` when out of
    /// memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The 512 entries of the table at `phys`.
    fn table(&mut self, phys: u64) -> &mut [u64; 512];
    /// Gives back a table that no entry points to any more.
    fn free_table(&mut self, phys: u64);
}

/// Why a mapping could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EptError {
    /// No memory for a table.
    NoMemory,
    /// Addresses not aligned to the page size, or beyond 48 bits.
    Misaligned,
    /// Something is mapped there already.
    AlreadyMapped,
}

/// An EPT hierarchy.
pub struct Ept {
    pml4: u64,
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 0x1ff) as usize
}

impl Ept {
    /// An empty hierarchy.
    ///
    /// # Errors
    /// `NoMemory`.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, EptError> {
        Ok(Self { pml4: mem.alloc_table().ok_or(EptError::NoMemory)? })
    }

    /// The EPT pointer for the VMCS (Table 25-9): write-back paging
    /// structures (bits 2:0 = 6), page-walk length 4 (bits 5:3 = 3), no
    /// accessed/dirty flags.
    pub fn eptp(&self) -> u64 {
        self.pml4 | (3 << 3) | 6
    }

    /// Maps `[gpa, gpa + size)` to `hpa` with read/write/execute access and
    /// write-back memory; `size` is [`SIZE_4K`] or [`SIZE_2M`].
    ///
    /// # Errors
    /// `Misaligned`, `AlreadyMapped`, or `NoMemory` (tables allocated before
    /// the failure stay, empty, and are freed with the hierarchy).
    pub fn map(&mut self, mem: &mut impl TableMemory, gpa: u64, hpa: u64, size: u64) -> Result<(), EptError> {
        let leaf_level = match size {
            SIZE_4K => 0,
            SIZE_2M => 1,
            _ => return Err(EptError::Misaligned),
        };
        if !gpa.is_multiple_of(size) || !hpa.is_multiple_of(size) || gpa >> 48 != 0 || hpa & !ADDR_MASK != 0 {
            return Err(EptError::Misaligned);
        }
        let mut table = self.pml4;
        for level in (leaf_level + 1..=3).rev() {
            let entry = mem.table(table)[index(gpa, level)];
            table = if entry & RWX == 0 {
                let next = mem.alloc_table().ok_or(EptError::NoMemory)?;
                mem.table(table)[index(gpa, level)] = next | RWX;
                next
            } else if entry & LARGE_PAGE != 0 {
                return Err(EptError::AlreadyMapped);
            } else {
                entry & ADDR_MASK
            };
        }
        let slot = &mut mem.table(table)[index(gpa, leaf_level)];
        if *slot & RWX != 0 {
            return Err(EptError::AlreadyMapped);
        }
        *slot = hpa | MEMTYPE_WB | RWX | if leaf_level == 1 { LARGE_PAGE } else { 0 };
        Ok(())
    }

    /// Removes every mapping in `[gpa, gpa + size)` (whole pages) and frees
    /// page tables that become empty. The caller flushes the TLBs (INVEPT).
    pub fn unmap(&mut self, mem: &mut impl TableMemory, gpa: u64, size: u64) {
        let mut addr = gpa;
        while addr < gpa + size {
            addr += Self::unmap_one(mem, self.pml4, 3, addr);
        }
    }

    /// Clears the leaf covering `gpa` under `table` (at `level`), freeing
    /// child tables left empty; returns how many bytes were covered (the
    /// size of the leaf, or of the empty region skipped).
    fn unmap_one(mem: &mut impl TableMemory, table: u64, level: u32, gpa: u64) -> u64 {
        let span = 1u64 << (12 + 9 * level);
        let i = index(gpa, level);
        let entry = mem.table(table)[i];
        if entry & RWX == 0 {
            return span - (gpa & (span - 1));
        }
        if level == 0 || entry & LARGE_PAGE != 0 {
            mem.table(table)[i] = 0;
            return span - (gpa & (span - 1));
        }
        let child = entry & ADDR_MASK;
        let done = Self::unmap_one(mem, child, level - 1, gpa);
        if mem.table(child).iter().all(|&e| e == 0) {
            mem.table(table)[i] = 0;
            mem.free_table(child);
        }
        done
    }

    /// The host-physical address `gpa` maps to, if any.
    pub fn translate(&self, mem: &mut impl TableMemory, gpa: u64) -> Option<u64> {
        let mut table = self.pml4;
        for level in (0..=3).rev() {
            let entry = mem.table(table)[index(gpa, level)];
            if entry & RWX == 0 {
                return None;
            }
            if level == 0 || entry & LARGE_PAGE != 0 {
                let offset_mask = (1u64 << (12 + 9 * level)) - 1;
                return Some((entry & ADDR_MASK & !offset_mask) | (gpa & offset_mask));
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Frees every table, the root included.
    pub fn destroy(self, mem: &mut impl TableMemory) {
        fn free(mem: &mut impl TableMemory, table: u64, level: u32) {
            if level > 0 {
                for i in 0..512 {
                    let e = mem.table(table)[i];
                    if e & RWX != 0 && e & LARGE_PAGE == 0 {
                        free(mem, e & ADDR_MASK, level - 1);
                    }
                }
            }
            mem.free_table(table);
        }
        free(mem, self.pml4, 3);
    }
}

/// How to map `npages` guest pages starting at `gpa` onto host pages whose
/// physical addresses `hpa_of(i)` gives: 2 MiB mappings where both sides are
/// 2 MiB-aligned and the 512 host pages are contiguous, 4 KiB elsewhere.
/// Calls `emit(gpa, hpa, size)` for each mapping, in order.
///
/// # Errors
/// The first error `emit` returns.
pub fn plan_mappings<E>(
    gpa: u64,
    npages: u64,
    hpa_of: impl Fn(u64) -> u64,
    mut emit: impl FnMut(u64, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let per_2m = SIZE_2M / SIZE_4K;
    let mut i = 0;
    while i < npages {
        let g = gpa + i * SIZE_4K;
        let h = hpa_of(i);
        let large = g.is_multiple_of(SIZE_2M)
            && h.is_multiple_of(SIZE_2M)
            && i + per_2m <= npages
            && (1..per_2m).all(|k| hpa_of(i + k) == h + k * SIZE_4K);
        if large {
            emit(g, h, SIZE_2M)?;
            i += per_2m;
        } else {
            emit(g, h, SIZE_4K)?;
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// Tables in a map keyed by fake physical addresses.
    #[derive(Default)]
    struct FakeMemory {
        tables: BTreeMap<u64, [u64; 512]>,
        next: u64,
        limit: Option<usize>,
    }

    impl TableMemory for FakeMemory {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.limit.is_some_and(|l| self.tables.len() >= l) {
                return None;
            }
            self.next += 0x1000;
            self.tables.insert(0x1000_0000 + self.next, [0; 512]);
            Some(0x1000_0000 + self.next)
        }
        fn table(&mut self, phys: u64) -> &mut [u64; 512] {
            self.tables.get_mut(&phys).expect("a live table")
        }
        fn free_table(&mut self, phys: u64) {
            assert!(self.tables.remove(&phys).is_some(), "double free");
        }
    }

    #[test]
    fn eptp_says_write_back_and_four_levels() {
        let mut mem = FakeMemory::default();
        let ept = Ept::new(&mut mem).unwrap();
        assert_eq!(ept.eptp() & 0xfff, 0x1e);
    }

    #[test]
    fn a_4k_mapping_translates_and_uses_four_tables() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(&mut mem, 0x1000, 0x7654_3000, SIZE_4K).unwrap();
        assert_eq!(ept.translate(&mut mem, 0x1abc), Some(0x7654_3abc));
        assert_eq!(ept.translate(&mut mem, 0x2000), None);
        assert_eq!(mem.tables.len(), 4);
        let leaf = mem.tables.values().find(|t| t[1] != 0).unwrap()[1];
        assert_eq!(leaf, 0x7654_3000 | 6 << 3 | 7);
    }

    #[test]
    fn a_2m_mapping_is_a_large_pde() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(&mut mem, 0x20_0000, 0x4000_0000, SIZE_2M).unwrap();
        assert_eq!(ept.translate(&mut mem, 0x21_2345), Some(0x4001_2345));
        assert_eq!(mem.tables.len(), 3, "no page table below a 2 MiB page");
        assert_eq!(ept.map(&mut mem, 0x20_1000, 0x5000, SIZE_4K), Err(EptError::AlreadyMapped));
    }

    #[test]
    fn misaligned_and_double_mappings_are_refused() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        assert_eq!(ept.map(&mut mem, 0x1000, 0x4000_0000, SIZE_2M), Err(EptError::Misaligned));
        assert_eq!(ept.map(&mut mem, 1 << 48, 0x1000, SIZE_4K), Err(EptError::Misaligned));
        ept.map(&mut mem, 0x1000, 0x2000, SIZE_4K).unwrap();
        assert_eq!(ept.map(&mut mem, 0x1000, 0x3000, SIZE_4K), Err(EptError::AlreadyMapped));
    }

    #[test]
    fn unmapping_frees_empty_tables_and_destroy_frees_the_rest() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(&mut mem, 0x1000, 0x2000, SIZE_4K).unwrap();
        ept.map(&mut mem, 0x40_0000, 0x4000_0000, SIZE_2M).unwrap();
        ept.unmap(&mut mem, 0x1000, SIZE_4K);
        assert_eq!(ept.translate(&mut mem, 0x1000), None);
        assert_eq!(ept.translate(&mut mem, 0x40_0000), Some(0x4000_0000));
        assert_eq!(mem.tables.len(), 3, "the emptied page table is gone");
        ept.unmap(&mut mem, 0, 1 << 30);
        assert_eq!(mem.tables.len(), 1, "only the root is left");
        ept.destroy(&mut mem);
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn running_out_of_memory_is_an_error_not_a_panic() {
        let mut mem = FakeMemory { limit: Some(2), ..Default::default() };
        let mut ept = Ept::new(&mut mem).unwrap();
        assert_eq!(ept.map(&mut mem, 0, 0x1000, SIZE_4K), Err(EptError::NoMemory));
        ept.destroy(&mut mem);
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn plan_uses_2m_pages_only_where_alignment_and_contiguity_allow() {
        let mut out = Vec::new();
        // 4 MiB at gpa 1 MiB, host contiguous from 0x4010_0000: the first
        // 1 MiB is 4K pages until gpa reaches 2 MiB (host 0x4020_0000), then
        // one 2 MiB page, then 4K pages for the last 1 MiB.
        plan_mappings(0x10_0000, 1024, |i| 0x4010_0000 + i * SIZE_4K, |g, h, s| {
            out.push((g, h, s));
            Ok::<(), ()>(())
        })
        .unwrap();
        let large: Vec<_> = out.iter().filter(|m| m.2 == SIZE_2M).collect();
        assert_eq!(large, [&(0x20_0000, 0x4020_0000, SIZE_2M)]);
        assert_eq!(out.len(), 256 + 1 + 256);
        // Scattered host pages never make a 2 MiB page.
        let mut n = 0;
        plan_mappings(0, 512, |i| (511 - i) * SIZE_4K, |_, _, s| {
            assert_eq!(s, SIZE_4K);
            n += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(n, 512);
    }
}
