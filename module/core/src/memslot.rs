//! Guest memory slots: checking a KVM_SET_USER_MEMORY_REGION request the way
//! KVM does (virt/kvm/kvm_main.c, `__kvm_set_memory_region` in Linux 6.12)
//! and deciding what it changes. The kernel side then pins pages and edits
//! the EPT; everything that can be decided from numbers alone is here.

/// Bytes in a page: slots are made of whole 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// How many slots rkvm keeps per VM (reported as KVM_CAP_NR_MEMSLOTS).
pub const MAX_SLOTS: u16 = 32;
/// KVM's limit on one slot's pages on x86 (`KVM_MEM_MAX_NR_PAGES`).
pub const MAX_PAGES_PER_SLOT: u64 = (1 << 31) - 1;

/// The request, as `struct kvm_userspace_memory_region` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// Bits 15:0 slot id, bits 31:16 address space (only 0 exists here).
    pub slot: u32,
    /// KVM_MEM_* flags; rkvm supports none yet.
    pub flags: u32,
    /// Guest-physical start.
    pub guest_phys_addr: u64,
    /// Bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Start of the VMM's mapping of this memory.
    pub userspace_addr: u64,
}

/// A slot in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Slot id (bits 15:0 of the request's `slot`).
    pub id: u16,
    /// First guest page frame.
    pub base_gfn: u64,
    /// Number of pages.
    pub npages: u64,
    /// The VMM's address of the first page.
    pub userspace_addr: u64,
    /// KVM_MEM_* flags.
    pub flags: u32,
}

impl Slot {
    /// One past the last guest page frame.
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }

    /// Whether guest page frame `gfn` is in this slot.
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.end_gfn()
    }

    /// The VMM address backing guest page frame `gfn` (which is in the slot).
    pub fn userspace_addr_of(&self, gfn: u64) -> u64 {
        self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)
    }
}

/// What a valid request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new slot.
    Create(Slot),
    /// The slot with this id goes away.
    Delete(u16),
    /// Same memory at another guest-physical address.
    Move {
        /// The slot as it was.
        old: Slot,
        /// The slot at its new place.
        new: Slot,
    },
    /// The request repeats the slot as it is.
    Nothing,
}

/// Why a request is refused, with the errno KVM gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// `EINVAL`: bad flags, alignment, size, id, address space or wrap-around,
    /// deleting a slot that does not exist, or resizing one.
    Invalid,
    /// `EEXIST`: the range overlaps another slot.
    Overlap,
}

/// The end of the guest-physical space for a host whose MAXPHYADDR
/// (CPUID 80000008H:EAX[7:0]) is `host_phys_bits`: what the host can
/// address, and at most what a 4-level EPT maps (48 bits).
pub fn gpa_limit(host_phys_bits: u32) -> u64 {
    1u64 << host_phys_bits.clamp(32, 48)
}

/// A VM's slots, indexed by slot id: fixed size, no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    slots: [Option<Slot>; MAX_SLOTS as usize],
}

impl Default for SlotTable {
    fn default() -> Self {
        Self { slots: [None; MAX_SLOTS as usize] }
    }
}

impl SlotTable {
    /// The slots in use.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().flatten()
    }

    /// The slot with id `id`, if it is in use.
    pub fn get(&self, id: u16) -> Option<&Slot> {
        self.slots.get(usize::from(id))?.as_ref()
    }

    /// The slot holding guest page frame `gfn`, if any.
    pub fn find(&self, gfn: u64) -> Option<&Slot> {
        self.iter().find(|s| s.contains(gfn))
    }

    /// Checks `req` against the slots in use and says what it changes.
    /// `user_limit` is the end of the user address space (`TASK_SIZE_MAX`):
    /// the VMM's range must lie below it (KVM's `access_ok`). `gpa_limit`
    /// is the end of the guest-physical space: a slot must end at or below
    /// it (KVM's `kvm_mmu_max_gfn`, from the host's MAXPHYADDR: EPT cannot
    /// map more; see [`gpa_limit`]).
    ///
    /// # Errors
    /// The [`SlotError`] KVM would return, in KVM's order of checks.
    pub fn plan(&self, req: &Request, user_limit: u64, gpa_limit: u64) -> Result<Change, SlotError> {
        use SlotError::{Invalid, Overlap};
        // rkvm supports no KVM_MEM_* flag (no dirty logging, no read-only
        // memory, no guest_memfd), and says so through KVM_CHECK_EXTENSION.
        if req.flags != 0 {
            return Err(Invalid);
        }
        let as_id = req.slot >> 16;
        let id = req.slot as u16;
        if !req.memory_size.is_multiple_of(PAGE_SIZE) || !req.guest_phys_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Invalid);
        }
        match req.userspace_addr.checked_add(req.memory_size) {
            Some(end) if req.userspace_addr.is_multiple_of(PAGE_SIZE) && end <= user_limit => {}
            _ => return Err(Invalid),
        }
        if as_id != 0 || id >= MAX_SLOTS {
            return Err(Invalid);
        }
        if req.guest_phys_addr.checked_add(req.memory_size).is_none() {
            return Err(Invalid);
        }
        let npages = req.memory_size >> PAGE_SHIFT;
        if npages > MAX_PAGES_PER_SLOT {
            return Err(Invalid);
        }
        let old = self.slots[usize::from(id)];
        if npages == 0 {
            return old.map(|s| Change::Delete(s.id)).ok_or(Invalid);
        }
        let new = Slot {
            id,
            base_gfn: req.guest_phys_addr >> PAGE_SHIFT,
            npages,
            userspace_addr: req.userspace_addr,
            flags: req.flags,
        };
        // Created or moved, the slot must fit the guest-physical space
        // (kvm_arch_prepare_memory_region).
        if new.end_gfn() > gpa_limit >> PAGE_SHIFT && !matches!(old, Some(o) if o.base_gfn == new.base_gfn) {
            return Err(Invalid);
        }
        let change = match old {
            None => Change::Create(new),
            Some(old) if old.userspace_addr != new.userspace_addr || old.npages != new.npages => {
                return Err(Invalid)
            }
            Some(old) if old.base_gfn != new.base_gfn => Change::Move { old, new },
            Some(_) => return Ok(Change::Nothing),
        };
        let overlaps = self
            .iter()
            .any(|s| s.id != id && s.base_gfn < new.end_gfn() && new.base_gfn < s.end_gfn());
        if overlaps {
            return Err(Overlap);
        }
        Ok(change)
    }

    /// Makes a planned change.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Create(slot) | Change::Move { new: slot, .. } => {
                self.slots[usize::from(slot.id)] = Some(slot)
            }
            Change::Delete(id) => self.slots[usize::from(id)] = None,
            Change::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 0x0000_7fff_ffff_f000;
    /// A host with a 39-bit MAXPHYADDR (the testbed's Bochs CPU).
    const GPA: u64 = 1 << 39;
    const MIB: u64 = 1 << 20;

    fn req(slot: u32, gpa: u64, size: u64, hva: u64) -> Request {
        Request { slot, flags: 0, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva }
    }

    fn table(requests: &[Request]) -> SlotTable {
        let mut t = SlotTable::default();
        for r in requests {
            let change = t.plan(r, LIMIT, GPA).expect("valid request");
            t.apply(change);
        }
        t
    }

    fn created(r: &Request) -> Slot {
        match SlotTable::default().plan(r, LIMIT, GPA) {
            Ok(Change::Create(s)) => s,
            other => panic!("expected a new slot, got {other:?}"),
        }
    }

    #[test]
    fn a_new_slot_is_created_with_its_frames() {
        let s = created(&req(0, 0x10_0000, 2 * MIB, 0x7f00_0000_0000));
        assert_eq!((s.id, s.base_gfn, s.npages), (0, 0x100, 512));
        assert_eq!(s.userspace_addr_of(0x101), 0x7f00_0000_1000);
        assert!(s.contains(0x2ff) && !s.contains(0x300));
    }

    #[test]
    fn misalignment_flags_address_space_and_id_are_einval() {
        for bad in [
            Request { flags: 1, ..req(0, 0, MIB, 0x1000) },        // KVM_MEM_LOG_DIRTY_PAGES
            Request { flags: 2, ..req(0, 0, MIB, 0x1000) },        // KVM_MEM_READONLY
            req(0, 0, MIB + 1, 0x1000),                             // size not page-aligned
            req(0, 0x800, MIB, 0x1000),                             // gpa not page-aligned
            req(0, 0, MIB, 0x1001),                                 // hva not page-aligned
            req(1 << 16, 0, MIB, 0x1000),                           // address space 1 (SMM)
            req(u32::from(MAX_SLOTS), 0, MIB, 0x1000),              // id out of range
            req(0, 0, MIB, LIMIT),                                  // beyond user space
            req(0, !0xfff, 2 * PAGE_SIZE, 0x1000),                  // gpa wraps around
            req(0, GPA, PAGE_SIZE, 0x1000),                         // beyond MAXPHYADDR
            req(0, GPA - PAGE_SIZE, 2 * PAGE_SIZE, 0x1000),         // straddling it
            req(0, 1 << 63, PAGE_SIZE, 0x1000),                     // far beyond
            req(0, 0, 1 << 44, 0x1000),                             // more than 2^31-1 pages
        ] {
            assert_eq!(SlotTable::default().plan(&bad, LIMIT, GPA), Err(SlotError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn overlapping_slots_are_eexist_and_neighbours_are_fine() {
        let t = table(&[req(0, 0, 2 * MIB, 0x1000_0000)]);
        assert_eq!(t.plan(&req(1, MIB, 2 * MIB, 0x2000_0000), LIMIT, GPA), Err(SlotError::Overlap));
        assert!(matches!(t.plan(&req(1, 2 * MIB, MIB, 0x2000_0000), LIMIT, GPA), Ok(Change::Create(_))));
    }

    #[test]
    fn size_zero_deletes_an_existing_slot_and_einval_otherwise() {
        let mut t = table(&[req(3, 0, MIB, 0x1000_0000)]);
        assert_eq!(t.plan(&req(4, 0, 0, 0), LIMIT, GPA), Err(SlotError::Invalid));
        let delete = t.plan(&req(3, 0, 0, 0), LIMIT, GPA);
        assert_eq!(delete, Ok(Change::Delete(3)));
        t.apply(delete.unwrap());
        assert_eq!(t.iter().count(), 0);
        assert_eq!(t.plan(&req(3, 0, 0, 0), LIMIT, GPA), Err(SlotError::Invalid));
    }

    #[test]
    fn an_existing_slot_may_move_but_not_change_size_or_backing() {
        let mut t = table(&[req(0, 0, MIB, 0x1000_0000)]);
        assert_eq!(t.plan(&req(0, 0, MIB, 0x1000_0000), LIMIT, GPA), Ok(Change::Nothing));
        assert_eq!(t.plan(&req(0, 0, 2 * MIB, 0x1000_0000), LIMIT, GPA), Err(SlotError::Invalid));
        assert_eq!(t.plan(&req(0, 0, MIB, 0x2000_0000), LIMIT, GPA), Err(SlotError::Invalid));
        let moved = t.plan(&req(0, 4 * MIB, MIB, 0x1000_0000), LIMIT, GPA).unwrap();
        assert!(matches!(moved, Change::Move { .. }));
        t.apply(moved);
        assert_eq!(t.find(0x400).map(|s| s.id), Some(0));
        assert_eq!(t.find(0), None);
    }

    #[test]
    fn a_slot_may_end_at_the_top_of_the_guest_physical_space_but_not_move_beyond() {
        let top = req(0, GPA - MIB, MIB, 0x1000_0000);
        let t = table(&[top]);
        let beyond = req(0, GPA, MIB, 0x1000_0000);
        assert_eq!(t.plan(&beyond, LIMIT, GPA), Err(SlotError::Invalid));
        assert_eq!(t.find(top.guest_phys_addr >> 12).map(|s| s.id), Some(0), "nothing changed");
    }

    #[test]
    fn the_guest_physical_space_is_the_hosts_up_to_what_ept_maps() {
        assert_eq!(gpa_limit(39), 1 << 39);
        assert_eq!(gpa_limit(52), crate::ept::GPA_LIMIT);
        assert_eq!(gpa_limit(0), 1 << 32, "a CPU that reports nothing still has 4 GiB");
    }

    #[test]
    fn find_picks_the_slot_holding_a_frame() {
        let t = table(&[req(0, 0, MIB, 0x1000_0000), req(1, 4 * MIB, MIB, 0x2000_0000)]);
        assert_eq!(t.find(0x400).map(|s| s.id), Some(1));
        assert_eq!(t.find(0xff).map(|s| s.id), Some(0));
        assert_eq!(t.find(0x100), None);
    }
}
