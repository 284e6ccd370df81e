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

/// Guest-physical addresses a 4-level EPT can map: 48 bits (SDM 29.3.2).
pub const GPA_LIMIT: u64 = 1 << 48;

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
        if !gpa.is_multiple_of(size) || !hpa.is_multiple_of(size) || gpa >= GPA_LIMIT || hpa & !ADDR_MASK != 0 {
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

    /// Removes every mapping in `[gpa, gpa + size)` (whole pages; the part
    /// beyond [`GPA_LIMIT`] holds nothing and is ignored), calls
    /// `on_leaf(hpa, size)` for each mapping removed, and frees page tables
    /// that become empty. The caller flushes the TLBs (INVEPT) before it
    /// lets go of the pages `on_leaf` named or reuses the freed tables.
    ///
    /// `on_leaf` returns whether to go on: if it says stop, the walk ends
    /// after that mapping and `unmap` returns where to resume (the caller
    /// flushes, then calls again from there); otherwise `None`.
    pub fn unmap(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        size: u64,
        mut on_leaf: impl FnMut(u64, u64) -> bool,
    ) -> Option<u64> {
        let end = gpa.saturating_add(size).min(GPA_LIMIT);
        let mut addr = gpa;
        while addr < end {
            let (covered, go_on) = Self::unmap_one(mem, self.pml4, 3, addr, &mut on_leaf);
            addr += covered;
            if !go_on {
                return (addr < end).then_some(addr);
            }
        }
        None
    }

    /// Clears the leaf covering `gpa` under `table` (at `level`), freeing
    /// child tables left empty; returns how many bytes were covered (the
    /// size of the leaf, or of the empty region skipped) and whether
    /// `on_leaf` wants more.
    fn unmap_one(
        mem: &mut impl TableMemory,
        table: u64,
        level: u32,
        gpa: u64,
        on_leaf: &mut impl FnMut(u64, u64) -> bool,
    ) -> (u64, bool) {
        let span = 1u64 << (12 + 9 * level);
        let i = index(gpa, level);
        let entry = mem.table(table)[i];
        let rest = span - (gpa & (span - 1));
        if entry & RWX == 0 {
            return (rest, true);
        }
        if level == 0 || entry & LARGE_PAGE != 0 {
            mem.table(table)[i] = 0;
            return (rest, on_leaf(entry & ADDR_MASK, span));
        }
        let child = entry & ADDR_MASK;
        let result = Self::unmap_one(mem, child, level - 1, gpa, on_leaf);
        if mem.table(child).iter().all(|&e| e == 0) {
            mem.table(table)[i] = 0;
            mem.free_table(child);
        }
        result
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

    /// Frees every table, the root included, calling `on_leaf(hpa, size)`
    /// for each mapping still there. The caller flushes the TLBs first.
    pub fn destroy(self, mem: &mut impl TableMemory, mut on_leaf: impl FnMut(u64, u64)) {
        fn free(mem: &mut impl TableMemory, table: u64, level: u32, on_leaf: &mut impl FnMut(u64, u64)) {
            for i in 0..512 {
                let e = mem.table(table)[i];
                if e & RWX == 0 {
                    continue;
                }
                if level == 0 || e & LARGE_PAGE != 0 {
                    on_leaf(e & ADDR_MASK, 1 << (12 + 9 * level));
                } else {
                    free(mem, e & ADDR_MASK, level - 1, on_leaf);
                }
            }
            mem.free_table(table);
        }
        free(mem, self.pml4, 3, &mut on_leaf);
    }
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
        let mut leaves = Vec::new();
        ept.unmap(&mut mem, 0x1000, SIZE_4K, |h, s| {
            leaves.push((h, s));
            true
        });
        assert_eq!(leaves, [(0x2000, SIZE_4K)]);
        assert_eq!(ept.translate(&mut mem, 0x1000), None);
        assert_eq!(ept.translate(&mut mem, 0x40_0000), Some(0x4000_0000));
        assert_eq!(mem.tables.len(), 3, "the emptied page table is gone");
        ept.unmap(&mut mem, 0, 1 << 30, |h, s| {
            leaves.push((h, s));
            true
        });
        assert_eq!(leaves[1..], [(0x4000_0000, SIZE_2M)]);
        assert_eq!(mem.tables.len(), 1, "only the root is left");
        ept.destroy(&mut mem, |_, _| panic!("nothing is mapped"));
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn running_out_of_memory_is_an_error_not_a_panic() {
        let mut mem = FakeMemory { limit: Some(2), ..Default::default() };
        let mut ept = Ept::new(&mut mem).unwrap();
        assert_eq!(ept.map(&mut mem, 0, 0x1000, SIZE_4K), Err(EptError::NoMemory));
        ept.destroy(&mut mem, |_, _| panic!("nothing is mapped"));
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn destroy_names_every_page_still_mapped() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(&mut mem, 0x1000, 0x2000, SIZE_4K).unwrap();
        ept.map(&mut mem, 0x8000_0000, 0x3000, SIZE_4K).unwrap();
        ept.map(&mut mem, 0x40_0000, 0x4000_0000, SIZE_2M).unwrap();
        let mut leaves = Vec::new();
        ept.destroy(&mut mem, |h, s| leaves.push((h, s)));
        leaves.sort_unstable();
        assert_eq!(leaves, [(0x2000, SIZE_4K), (0x3000, SIZE_4K), (0x4000_0000, SIZE_2M)]);
        assert!(mem.tables.is_empty());
    }

    /// An unmap reaching past the 48 bits EPT covers must not wrap its table
    /// indexes around to low addresses and remove what is mapped there.
    #[test]
    fn unmapping_beyond_48_bits_leaves_low_mappings_alone() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        ept.map(&mut mem, 0, 0x4000_0000, SIZE_2M).unwrap();
        ept.map(&mut mem, GPA_LIMIT - SIZE_4K, 0x5000, SIZE_4K).unwrap();
        let mut leaves = Vec::new();
        let mut record = |h, s| {
            leaves.push((h, s));
            true
        };
        assert_eq!(ept.unmap(&mut mem, GPA_LIMIT - SIZE_4K, 16 * SIZE_2M, &mut record), None);
        assert_eq!(ept.unmap(&mut mem, GPA_LIMIT, SIZE_2M, &mut record), None);
        assert_eq!(ept.unmap(&mut mem, u64::MAX & !0xfff, u64::MAX, &mut record), None);
        assert_eq!(leaves, [(0x5000, SIZE_4K)]);
        assert_eq!(ept.translate(&mut mem, 0x1234), Some(0x4000_1234));
    }

    #[test]
    fn an_unmap_stopped_by_its_caller_resumes_where_it_stopped() {
        let mut mem = FakeMemory::default();
        let mut ept = Ept::new(&mut mem).unwrap();
        for i in 0..5 {
            ept.map(&mut mem, i * SIZE_4K, 0x10_0000 + i * SIZE_4K, SIZE_4K).unwrap();
        }
        let mut leaves = Vec::new();
        let mut at = Some(0);
        let mut rounds = 0;
        while let Some(gpa) = at {
            let mut room = 2;
            at = ept.unmap(&mut mem, gpa, 5 * SIZE_4K - gpa, |h, _| {
                leaves.push(h);
                room -= 1;
                room > 0
            });
            rounds += 1;
        }
        assert_eq!(rounds, 3);
        assert_eq!(leaves, (0..5).map(|i| 0x10_0000 + i * SIZE_4K).collect::<Vec<_>>());
        assert_eq!(mem.tables.len(), 1, "the emptied tables are gone");
    }
}
