//! A VM's guest-physical memory: the VMM's pages, pinned while mapped, and
//! the EPT that maps them (SDM Vol. 3C, 29.3). The table layout is
//! `rkvm_core::ept`'s; this file gives it real pages and pins the memory.
//!
//! - Adding a slot pins its pages (`pin_user_pages_fast` with FOLL_LONGTERM:
//!   they cannot move or be reclaimed while the guest may access them) and
//!   maps them, with 2 MiB pages where alignment and contiguity allow.
//! - Removing or moving a slot unmaps it, flushes every CPU's EPT-derived
//!   translations (INVEPT), and only then unpins the pages.
//!
//! Context: process context of the VMM (pinning uses its mm), under the VM's
//! mutex.

use kernel::alloc::{flags::GFP_KERNEL, KVVec};
use kernel::bindings;
use kernel::error::{
    code::{EFAULT, ENOMEM},
    Error, Result,
};

use rkvm_core::ept::{self, Ept, EptError, TableMemory};
use rkvm_core::memslot::{Slot, MAX_SLOTS};

use crate::glue;
use crate::vmx::host;

/// Page tables in pages from the page allocator, addressed through the
/// direct map.
struct KernelTables;

impl TableMemory for KernelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        // SAFETY: plain allocator call in process context.
        let addr = unsafe { bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL) };
        (addr != 0).then(|| glue::virt_to_phys(addr as *const core::ffi::c_void))
    }

    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: `Ept` only passes addresses of tables it allocated with
        // `alloc_table` and has not freed (its tests check this logic); such
        // a page is ours, 4 KiB, and reached through the direct map.
        unsafe { &mut *glue::phys_to_virt(phys).cast::<[u64; 512]>() }
    }

    fn free_table(&mut self, phys: u64) {
        // SAFETY: a table from `alloc_table` that no entry points to any
        // more (`Ept`'s contract), after the caller flushed translations.
        unsafe { bindings::free_pages(glue::phys_to_virt(phys) as _, 0) };
    }
}

/// The pinned pages of one slot.
struct PinnedSlot {
    pages: KVVec<*mut bindings::page>,
}

// SAFETY: the pointers are pinned pages owned by this value; they are only
// passed to the kernel's page functions, from any thread.
unsafe impl Send for PinnedSlot {}

impl PinnedSlot {
    /// Pins the VMM's pages `[hva, hva + npages * 4 KiB)`, writable.
    fn pin(hva: u64, npages: u64) -> Result<Self> {
        const CHUNK: u64 = 512;
        let mut pages: KVVec<*mut bindings::page> = KVVec::with_capacity(npages as usize, GFP_KERNEL)?;
        let mut done = 0u64;
        let mut slot = Self { pages: KVVec::new() };
        while done < npages {
            let want = (npages - done).min(CHUNK);
            let start = pages.len();
            // SAFETY: `pages` has room for `npages` pointers; we write at
            // most `want` of them past `start` and count only those the
            // kernel reports as filled.
            let got = unsafe {
                bindings::pin_user_pages_fast(
                    (hva + done * ept::SIZE_4K) as _,
                    want as i32,
                    bindings::FOLL_WRITE | bindings::FOLL_LONGTERM,
                    pages.as_mut_ptr().add(start),
                )
            };
            if got <= 0 {
                slot.pages = pages;
                drop(slot);
                return Err(if got < 0 { Error::from_errno(got) } else { EFAULT });
            }
            // SAFETY: the kernel filled `got` entries after `start`.
            unsafe { pages.set_len(start + got as usize) };
            done += got as u64;
        }
        slot.pages = pages;
        Ok(slot)
    }

    fn phys(&self, i: u64) -> u64 {
        glue::page_to_phys(self.pages[i as usize])
    }
}

impl Drop for PinnedSlot {
    fn drop(&mut self) {
        if self.pages.is_empty() {
            return;
        }
        // SAFETY: every pointer was pinned by `pin` and is unpinned once;
        // the guest wrote to them, so they are marked dirty.
        unsafe { bindings::unpin_user_pages_dirty_lock(self.pages.as_mut_ptr(), self.pages.len() as _, true) };
    }
}

/// A VM's guest-physical address space.
pub(crate) struct GuestMemory {
    ept: Option<Ept>,
    pinned: [Option<PinnedSlot>; MAX_SLOTS as usize],
}

fn ept_error(e: EptError) -> Error {
    match e {
        EptError::NoMemory => ENOMEM,
        // `plan_mappings` only asks for aligned, free ranges of a checked slot.
        EptError::Misaligned | EptError::AlreadyMapped => kernel::error::code::EINVAL,
    }
}

impl GuestMemory {
    /// An empty address space.
    pub(crate) fn new() -> Result<Self> {
        Ok(Self { ept: Some(Ept::new(&mut KernelTables).map_err(ept_error)?), pinned: Default::default() })
    }

    /// The EPT pointer for the VMCS.
    pub(crate) fn eptp(&self) -> u64 {
        self.ept.as_ref().map_or(0, Ept::eptp)
    }

    fn map(&mut self, slot: &Slot, pages: &PinnedSlot) -> Result {
        let ept = self.ept.as_mut().ok_or(ENOMEM)?;
        ept::plan_mappings(slot.base_gfn << 12, slot.npages, |i| pages.phys(i), |gpa, hpa, size| {
            ept.map(&mut KernelTables, gpa, hpa, size)
        })
        .map_err(ept_error)
    }

    fn unmap(&mut self, slot: &Slot) {
        if let Some(ept) = self.ept.as_mut() {
            ept.unmap(&mut KernelTables, slot.base_gfn << 12, slot.npages << 12);
        }
        host::invept_everywhere(self.eptp());
    }

    /// Pins and maps a new slot.
    ///
    /// # Errors
    /// `EFAULT` if the VMM's range is not mapped writable, `ENOMEM`.
    pub(crate) fn add(&mut self, slot: &Slot) -> Result {
        let pages = PinnedSlot::pin(slot.userspace_addr, slot.npages)?;
        if let Err(e) = self.map(slot, &pages) {
            self.unmap(slot);
            return Err(e);
        }
        self.pinned[usize::from(slot.id)] = Some(pages);
        Ok(())
    }

    /// Unmaps a slot and unpins its pages.
    pub(crate) fn remove(&mut self, slot: &Slot) {
        self.unmap(slot);
        self.pinned[usize::from(slot.id)] = None;
    }

    /// Maps a slot's pages at its new place.
    ///
    /// # Errors
    /// `ENOMEM`; the slot is then unmapped and unpinned.
    pub(crate) fn relocate(&mut self, old: &Slot, new: &Slot) -> Result {
        self.unmap(old);
        let Some(pages) = self.pinned[usize::from(old.id)].take() else { return Ok(()) };
        if let Err(e) = self.map(new, &pages) {
            self.unmap(new);
            return Err(e);
        }
        self.pinned[usize::from(new.id)] = Some(pages);
        Ok(())
    }
}

impl GuestMemory {
    /// The direct-map address of the pinned page backing guest frame `gfn`
    /// of `slot`.
    pub(crate) fn page(&self, slot: &Slot, gfn: u64) -> Option<*mut u8> {
        let pinned = self.pinned.get(usize::from(slot.id))?.as_ref()?;
        let page = *pinned.pages.get((gfn - slot.base_gfn) as usize)?;
        Some(glue::phys_to_virt(glue::page_to_phys(page)))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some(ept) = self.ept.take() {
            // No vCPU can run any more (each holds a reference to the VM):
            // flush what CPUs cached, then free the tables, then unpin.
            host::invept_everywhere(ept.eptp());
            ept.destroy(&mut KernelTables);
        }
        for p in self.pinned.iter_mut() {
            *p = None;
        }
    }
}
