//! A VM's guest-physical memory: its slots, and the EPT that maps them onto
//! the VMM's pages (SDM Vol. 3C, 29.3). The table layout is
//! `rkvm_core::ept`'s; this file gives it real pages and keeps it in step
//! with the VMM's address space, as KVM does:
//!
//! - A slot is only a record: creating one pins or allocates nothing, so a
//!   VM of any size starts at once and a slot's size costs nothing.
//! - A guest access to a page not in the EPT exits (EPT violation). If a
//!   slot covers it, the page is looked up in the VMM's page tables
//!   (get_user_pages, faulting it in if needed) and mapped; the EPT entry
//!   holds a reference on the page for as long as it exists.
//! - An MMU notifier on the VMM's mm is told before any page leaves the
//!   VMM's page tables (munmap, madvise, reclaim, migration, fork's
//!   copy-on-write, exit). Its entries are removed first, every CPU's
//!   EPT-derived translations are flushed (INVEPT), and only then is the
//!   page reference dropped and an emptied table freed. So the guest never
//!   uses a page the VMM gave up: its next access faults again and finds
//!   the VMM's new page, or KVM_RUN fails with EFAULT if there is none.
//! - A fault that raced with an invalidation is retried: it reads the
//!   invalidation sequence before looking the page up and maps it only if
//!   no invalidation started or ended meanwhile (KVM's mmu_invalidate_seq).
//!
//! Everything is under one spinlock, because the notifier may be called
//! where it must not sleep. Nothing under it allocates (tables come from a
//! small cache filled beforehand, zapped pages go to a preallocated batch)
//! or sleeps; INVEPT on every CPU is an IPI that waits with interrupts on.
//!
//! Context: process context of the VMM (page lookups use its mm), or the
//! notifier's context (any task changing the VMM's mm, maybe not allowed to
//! sleep).

use core::ffi::c_void;

use kernel::alloc::{flags::GFP_KERNEL, KBox};
use kernel::bindings;
use kernel::error::{
    code::{EEXIST, EFAULT, EINTR, EINVAL, ENOMEM},
    Error, Result,
};
use kernel::new_spinlock;
use kernel::prelude::*;
use kernel::sync::SpinLock;
use kernel::uaccess::UserSlice;

use rkvm_core::ept::{Ept, EptError, TableMemory, SIZE_4K};
use rkvm_core::memslot::{Change, Request, Slot, SlotError, SlotTable, MAX_SLOTS};

use crate::glue::{self, mm::Counter, mm::PageRef};
use crate::vmx::host;

/// Tables a 4 KiB mapping may need besides the root: PDPT, PD and PT.
const TABLES_PER_MAPPING: usize = 3;
/// Zapped pages whose references wait for the INVEPT that must come first.
const ZAP_BATCH: usize = 512;
/// Fault-around: on a fault, the aligned group of this many pages around
/// the faulting one (within its slot) is mapped. Without sleeping (from the
/// exit handler) only the pages the VMM has present are taken: a kernel or
/// an initrd the VMM wrote into guest RAM is mapped 64 pages per exit. The
/// path that may sleep faults the whole group into the VMM.
const FAULT_AROUND: u64 = 64;

/// Page references for one fault-around group.
type Pages = [Option<PageRef>; FAULT_AROUND as usize];

/// The aligned group of [`FAULT_AROUND`] frames around `gfn` within
/// `slot`: its first frame and its length.
fn neighbourhood(slot: &Slot, gfn: u64) -> (u64, u64) {
    let first = (gfn & !(FAULT_AROUND - 1)).max(slot.base_gfn);
    (first, (first + FAULT_AROUND).min(slot.end_gfn()) - first)
}

/// Takes, without sleeping, references on the pages of frames `[first,
/// first + count)` of `slot` that the VMM has present and writable, into
/// the empty places of `pages`.
fn present_pages(slot: &Slot, first: u64, count: u64, pages: &mut Pages) {
    for (i, place) in pages.iter_mut().enumerate().take(count as usize) {
        if place.is_none() {
            *place = glue::mm::get_user_page_fast(slot.userspace_addr_of(first + i as u64));
        }
    }
}

/// Zeroed pages for EPT tables, allocated before the lock is taken.
#[derive(Default)]
struct TableCache {
    pages: [u64; TABLES_PER_MAPPING],
    len: usize,
}

/// EPT tables for the walker: from the cache, and freed only after the
/// next INVEPT (another CPU may still walk a table just unlinked).
struct Tables<'a> {
    cache: &'a mut TableCache,
    /// Freed tables, linked through their first entry (an unlinked table
    /// is all zeros; a link is 4 KiB-aligned, so a CPU still walking the
    /// table reads "not present"). 0 ends the list.
    freed: &'a mut u64,
}

impl TableMemory for Tables<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.cache.len == 0 {
            return None;
        }
        self.cache.len -= 1;
        Some(self.cache.pages[self.cache.len])
    }

    fn table(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: `Ept` only passes tables it allocated (from this cache,
        // pages from `alloc_table_page`) and has not freed; such a page is
        // ours, 4 KiB, reached through the direct map.
        unsafe { &mut *glue::phys_to_virt(phys).cast::<[u64; 512]>() }
    }

    fn free_table(&mut self, phys: u64) {
        self.table(phys)[0] = *self.freed;
        *self.freed = phys;
    }
}

/// A zeroed page for a table, counted.
fn alloc_table_page() -> Option<u64> {
    // SAFETY: plain allocator call in process context (may sleep).
    let addr = unsafe { bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL_ACCOUNT) };
    if addr == 0 {
        return None;
    }
    glue::mm::count(Counter::EptTablePages, 1);
    Some(glue::virt_to_phys(addr as *const c_void))
}

/// Frees a table page from `alloc_table_page`.
///
/// # Safety
/// No EPT entry points to it and no CPU can hold a translation through it
/// (an INVEPT on every CPU came after it was unlinked), or it never was in
/// an EPT.
unsafe fn free_table_page(phys: u64) {
    // SAFETY: the caller's guarantee; the page came from the page allocator.
    unsafe { bindings::free_pages(glue::phys_to_virt(phys) as usize, 0) };
    glue::mm::count(Counter::EptTablePages, -1);
}

/// Zapped guest pages whose references are dropped after an INVEPT.
struct ZapBatch {
    pages: KBox<[u64; ZAP_BATCH]>,
    len: usize,
}

/// The state under the lock.
struct Mmu {
    slots: SlotTable,
    /// `None` once the VM is gone.
    ept: Option<Ept>,
    cache: TableCache,
    freed_tables: u64,
    zapped: ZapBatch,
    /// Invalidations between their start and their end.
    invalidating: u32,
    /// Bumped at the end of every invalidation and on every slot change.
    sequence: u64,
    /// The VMM's address space is gone: nothing is mapped any more.
    released: bool,
}

/// INVEPT on every CPU, then the references and tables that waited for it.
fn flush(eptp: u64, zapped: &mut ZapBatch, freed_tables: &mut u64) {
    if zapped.len == 0 && *freed_tables == 0 {
        return;
    }
    host::invept_everywhere(eptp);
    for &phys in &zapped.pages[..zapped.len] {
        // SAFETY: each was handed to the EPT by `PageRef::into_phys` when
        // mapped, and its entry is gone: taken back once, here, and put.
        drop(unsafe { PageRef::from_phys(phys) });
    }
    glue::mm::count(Counter::GuestPagesHeld, -(zapped.len as isize));
    glue::mm::count(Counter::PagesUnmapped, zapped.len as isize);
    zapped.len = 0;
    while *freed_tables != 0 {
        let phys = *freed_tables;
        // SAFETY: a freed table (see `Tables`), so ours; its first entry
        // holds the link.
        *freed_tables = unsafe { *glue::phys_to_virt(phys).cast::<u64>() };
        // SAFETY: unlinked before the INVEPT above.
        unsafe { free_table_page(phys) };
    }
}

impl Mmu {
    /// Removes every mapping of guest-physical `[gpa, gpa + len)`, flushes
    /// every CPU, then drops the page references and tables they held.
    fn zap(&mut self, eptp: u64, gpa: u64, len: u64) {
        let Mmu { ept, cache, freed_tables, zapped, .. } = self;
        let Some(ept) = ept.as_mut() else { return };
        let end = gpa.saturating_add(len);
        let mut at = Some(gpa);
        while let Some(start) = at {
            let mut tables = Tables { cache: &mut *cache, freed: &mut *freed_tables };
            at = ept.unmap(&mut tables, start, end - start, |hpa, _size| {
                // Every leaf is a 4 KiB page from `map_page`.
                zapped.pages[zapped.len] = hpa;
                zapped.len += 1;
                zapped.len < ZAP_BATCH
            });
            flush(eptp, zapped, freed_tables);
        }
    }

    /// Zaps what every slot maps.
    fn zap_all(&mut self, eptp: u64) {
        for id in 0..MAX_SLOTS {
            if let Some(slot) = self.slots.get(id).copied() {
                self.zap(eptp, slot.base_gfn << 12, slot.npages << 12);
            }
        }
    }

    /// Maps guest page `gpa` to `page`, the reference going to the EPT.
    /// `Ok(false)` if the page was mapped already (by another vCPU: the
    /// reference is dropped).
    ///
    /// # Errors
    /// `ENOMEM` if the table cache ran dry (fill it and retry), `EFAULT`
    /// once the VM or its address space is gone.
    fn map_page(&mut self, gpa: u64, page: PageRef) -> Result<bool> {
        if self.released {
            return Err(EFAULT);
        }
        let Mmu { ept, cache, freed_tables, .. } = self;
        let ept = ept.as_mut().ok_or(EFAULT)?;
        let mut tables = Tables { cache, freed: freed_tables };
        match ept.map(&mut tables, gpa, page.phys(), SIZE_4K) {
            Ok(()) => {
                page.into_phys();
                glue::mm::count(Counter::GuestPagesHeld, 1);
                Ok(true)
            }
            Err(EptError::AlreadyMapped) => Ok(false),
            Err(EptError::NoMemory) => Err(ENOMEM),
            // `gpa` is in a slot, and slots lie below GPA_LIMIT.
            Err(EptError::Misaligned) => Err(EINVAL),
        }
    }
}

/// What a guest access to a page outside the EPT is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Mapped now: the guest can retry the access.
    Mapped,
    /// No slot covers it: MMIO for the VMM.
    NotRam,
    /// RAM, but mapping it needs to sleep: call [`GuestMemory::map`].
    NeedsSleep,
}

/// The host's MAXPHYADDR (CPUID 80000008H:EAX[7:0]), which bounds the
/// guest-physical space as in KVM (`kvm_host.maxphyaddr`).
fn host_phys_bits() -> u32 {
    // Leaf 80000008H exists on every x86-64 CPU.
    let leaf = core::arch::x86_64::__cpuid(0x8000_0008);
    leaf.eax & 0xff
}

/// A VM's guest-physical address space.
#[pin_data(PinnedDrop)]
pub(crate) struct GuestMemory {
    /// The EPT pointer: the root table is fixed for the VM's life, so it is
    /// read without the lock.
    eptp: u64,
    /// Where the guest-physical space ends (slots must end below).
    gpa_limit: u64,
    #[pin]
    mmu: SpinLock<Mmu>,
}

impl GuestMemory {
    /// An empty address space (the EPT root only).
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let mut cache = TableCache::default();
        let root = alloc_table_page().ok_or(ENOMEM)?;
        cache.pages[0] = root;
        cache.len = 1;
        let mut freed = 0;
        let ept = match Ept::new(&mut Tables { cache: &mut cache, freed: &mut freed }) {
            Ok(ept) => ept,
            Err(_) => {
                // SAFETY: never part of an EPT.
                unsafe { free_table_page(root) };
                return Err(ENOMEM);
            }
        };
        let eptp = ept.eptp();
        let zapped = ZapBatch { pages: KBox::new([0; ZAP_BATCH], GFP_KERNEL)?, len: 0 };
        let mmu = Mmu {
            slots: SlotTable::default(),
            ept: Some(ept),
            cache,
            freed_tables: 0,
            zapped,
            invalidating: 0,
            sequence: 0,
            released: false,
        };
        let gpa_limit = rkvm_core::memslot::gpa_limit(host_phys_bits());
        Ok(try_pin_init!(GuestMemory { eptp, gpa_limit, mmu <- new_spinlock!(mmu, "rkvm_mmu") }? Error))
    }

    /// The EPT pointer for the VMCS.
    pub(crate) fn eptp(&self) -> u64 {
        self.eptp
    }

    /// KVM_SET_USER_MEMORY_REGION: checks `req` as KVM does and makes the
    /// change. Removing or moving a slot removes what it mapped first.
    ///
    /// # Errors
    /// `EINVAL` or `EEXIST` as KVM (rkvm_core::memslot), `EFAULT` once the
    /// VMM's address space is gone.
    pub(crate) fn set_slot(&self, req: &Request) -> Result {
        let mut mmu = self.mmu.lock();
        let change = mmu.slots.plan(req, glue::task_size_max(), self.gpa_limit).map_err(|e| match e {
            SlotError::Invalid => EINVAL,
            SlotError::Overlap => EEXIST,
        })?;
        let gone = match change {
            Change::Delete(id) => mmu.slots.iter().find(|s| s.id == id).copied(),
            Change::Move { old, .. } => Some(old),
            Change::Create(_) | Change::Nothing => None,
        };
        mmu.slots.apply(change);
        if let Some(old) = gone {
            mmu.zap(self.eptp, old.base_gfn << 12, old.npages << 12);
        }
        // Faults in flight looked at the old slots: they retry.
        mmu.sequence = mmu.sequence.wrapping_add(1);
        Ok(())
    }

    /// The slot holding guest-physical `gpa`, if any.
    fn slot(&self, gpa: u64) -> Option<Slot> {
        self.mmu.lock().slots.find(gpa >> 12).copied()
    }

    /// Whether `gpa` is guest RAM (in a slot).
    pub(crate) fn is_ram(&self, gpa: u64) -> bool {
        self.slot(gpa).is_some()
    }

    /// After an EPT violation at `gpa`: maps the page, and its neighbours
    /// the VMM has present (see [`FAULT_AROUND`]), if the VMM has the page
    /// present and writable and the table cache suffices, without sleeping
    /// (callable with preemption disabled).
    pub(crate) fn map_fast(&self, gpa: u64) -> Fault {
        let gfn = gpa >> 12;
        let (slot, sequence) = {
            let mmu = self.mmu.lock();
            (mmu.slots.find(gfn).copied(), mmu.sequence)
        };
        let Some(slot) = slot else { return Fault::NotRam };
        let (first, count) = neighbourhood(&slot, gfn);
        let mut pages: Pages = core::array::from_fn(|_| None);
        present_pages(&slot, first, count, &mut pages);
        if pages[(gfn - first) as usize].is_none() {
            return Fault::NeedsSleep;
        }
        match self.map_pages(first, &mut pages[..count as usize], (gfn - first) as usize, sequence) {
            Ok(n) if n > 0 => {
                glue::mm::count(Counter::PagesMappedFast, n as isize);
                Fault::Mapped
            }
            _ => Fault::NeedsSleep,
        }
    }

    /// After an EPT violation at `gpa`: faults the page into the VMM if
    /// needed and maps it, with its neighbours the VMM has present.
    /// `Ok(false)` if no slot covers `gpa`. May sleep.
    ///
    /// # Errors
    /// `EFAULT` if the VMM's memory behind `gpa` is gone or not writable
    /// (as KVM: the VMM unmapped memory a slot still names), `EINTR` if a
    /// signal arrived while retrying, `ENOMEM`.
    pub(crate) fn map(&self, gpa: u64) -> Result<bool> {
        let gfn = gpa >> 12;
        loop {
            self.fill_cache()?;
            let (slot, sequence) = {
                let mmu = self.mmu.lock();
                (mmu.slots.find(gfn).copied(), mmu.sequence)
            };
            let Some(slot) = slot else { return Ok(false) };
            let (first, count) = neighbourhood(&slot, gfn);
            let mut pages: Pages = core::array::from_fn(|_| None);
            let must = (gfn - first) as usize;
            // The whole group, faulted in (allocated and cleared where the
            // VMM never touched it): on a guest's first touch of fresh
            // memory its neighbours are the likeliest next, and one exit
            // through this path costs as much as clearing ~10 pages.
            let got = glue::mm::get_user_pages(slot.userspace_addr_of(first), count as usize, |i, page| {
                pages[i] = Some(page);
            })
            .unwrap_or(0);
            if got <= must {
                // Not up to the faulting page: ask for it alone, for its
                // error (or it came back meanwhile).
                glue::mm::get_user_pages(slot.userspace_addr_of(gfn), 1, |_, page| pages[must] = Some(page))?;
            }
            let mapped = self.map_pages(first, &mut pages[..count as usize], must, sequence)?;
            if mapped > 0 {
                glue::mm::count(Counter::PagesMappedSlow, mapped as isize);
                return Ok(true);
            }
            // An invalidation or a slot change raced with the lookup.
            if glue::signal_pending() {
                return Err(EINTR);
            }
            glue::cond_resched();
        }
    }

    /// Maps `pages` at consecutive frames from `first`, under the lock, if
    /// nothing changed since `sequence` was read: `pages[must]` first, then
    /// the others while the table cache lasts. Returns how many pages it
    /// mapped; 0: retry (nothing is lost; mapped pages stay).
    fn map_pages(&self, first: u64, pages: &mut [Option<PageRef>], must: usize, sequence: u64) -> Result<usize> {
        let mut mmu = self.mmu.lock();
        if mmu.invalidating != 0 || mmu.sequence != sequence {
            return Ok(0);
        }
        let Some(page) = pages.get_mut(must).and_then(Option::take) else { return Ok(0) };
        let mut mapped = match mmu.map_page((first + must as u64) << 12, page) {
            Ok(new) => usize::from(new),
            // The cache ran dry: refill and retry.
            Err(e) if e == ENOMEM => return Ok(0),
            Err(e) => return Err(e),
        };
        for (i, page) in pages.iter_mut().enumerate() {
            let Some(page) = page.take() else { continue };
            // Neighbours are a bonus: stop quietly when the cache is dry.
            match mmu.map_page((first + i as u64) << 12, page) {
                Ok(new) => mapped += usize::from(new),
                Err(_) => break,
            }
        }
        // The faulting page was mapped, by us or by another vCPU.
        Ok(mapped.max(1))
    }

    /// Fills the table cache, allocating outside the lock.
    fn fill_cache(&self) -> Result {
        let missing = TABLES_PER_MAPPING - self.mmu.lock().cache.len;
        let mut new = [0u64; TABLES_PER_MAPPING];
        for page in new.iter_mut().take(missing) {
            *page = alloc_table_page().ok_or(ENOMEM)?;
        }
        let mut mmu = self.mmu.lock();
        for page in new.into_iter().take(missing) {
            if mmu.cache.len < TABLES_PER_MAPPING {
                let n = mmu.cache.len;
                mmu.cache.pages[n] = page;
                mmu.cache.len += 1;
            } else {
                // Filled meanwhile by another vCPU.
                // SAFETY: never part of an EPT.
                unsafe { free_table_page(page) };
            }
        }
        Ok(())
    }

    /// Reads guest-physical memory, through the VMM's mapping of it.
    ///
    /// # Errors
    /// `EFAULT` if any byte is outside guest RAM or the VMM's memory is
    /// gone.
    pub(crate) fn read(&self, mut gpa: u64, buf: &mut [u8]) -> Result {
        let mut done = 0;
        while done < buf.len() {
            let slot = self.slot(gpa).ok_or(EFAULT)?;
            let n = ((SIZE_4K - (gpa & (SIZE_4K - 1))) as usize).min(buf.len() - done);
            let hva = slot.userspace_addr_of(gpa >> 12) + (gpa & (SIZE_4K - 1));
            UserSlice::new(hva as usize, n).reader().read_slice(&mut buf[done..done + n])?;
            done += n;
            gpa += n as u64;
        }
        Ok(())
    }

    /// Writes guest-physical memory, through the VMM's mapping of it.
    ///
    /// # Errors
    /// As [`GuestMemory::read`].
    pub(crate) fn write(&self, mut gpa: u64, buf: &[u8]) -> Result {
        let mut done = 0;
        while done < buf.len() {
            let slot = self.slot(gpa).ok_or(EFAULT)?;
            let n = ((SIZE_4K - (gpa & (SIZE_4K - 1))) as usize).min(buf.len() - done);
            let hva = slot.userspace_addr_of(gpa >> 12) + (gpa & (SIZE_4K - 1));
            UserSlice::new(hva as usize, n).writer().write_slice(&buf[done..done + n])?;
            done += n;
            gpa += n as u64;
        }
        Ok(())
    }

    /// The MMU notifier's callbacks for this memory.
    pub(crate) fn notifier_callbacks() -> &'static glue::mm::MmuCallbacks {
        &NOTIFIER_CALLBACKS
    }

    /// The VMM's `[start, end)` is about to change: remove what maps it.
    fn invalidate_start(&self, start: u64, end: u64) {
        glue::mm::count(Counter::Invalidations, 1);
        let mut mmu = self.mmu.lock();
        mmu.invalidating += 1;
        for id in 0..MAX_SLOTS {
            let Some(slot) = mmu.slots.get(id).copied() else { continue };
            let (slot_start, slot_end) = (slot.userspace_addr, slot.userspace_addr + (slot.npages << 12));
            let (from, to) = (start.max(slot_start), end.min(slot_end));
            if from < to {
                // Whole pages: from the one holding `from` to the one
                // holding `to - 1`.
                let first = (slot.base_gfn << 12) + ((from - slot_start) & !(SIZE_4K - 1));
                let last = (slot.base_gfn << 12) + ((to - 1 - slot_start) & !(SIZE_4K - 1));
                mmu.zap(self.eptp, first, last - first + SIZE_4K);
            }
        }
    }

    fn invalidate_end(&self) {
        let mut mmu = self.mmu.lock();
        mmu.sequence = mmu.sequence.wrapping_add(1);
        mmu.invalidating = mmu.invalidating.saturating_sub(1);
    }

    /// The VMM's address space is going away: nothing stays mapped.
    fn release(&self) {
        let mut mmu = self.mmu.lock();
        mmu.released = true;
        mmu.zap_all(self.eptp);
        mmu.sequence = mmu.sequence.wrapping_add(1);
    }
}

#[pinned_drop]
impl PinnedDrop for GuestMemory {
    fn drop(self: Pin<&mut Self>) {
        // No vCPU runs (each holds the VM) and the notifier is gone (the VM
        // drops it first): remove every mapping with its flush, then free
        // the tables.
        let mut mmu = self.mmu.lock();
        mmu.zap_all(self.eptp);
        let Mmu { ept, cache, freed_tables, .. } = &mut *mmu;
        if let Some(ept) = ept.take() {
            let mut tables = Tables { cache: &mut *cache, freed: &mut *freed_tables };
            // Everything was zapped: no leaf is left.
            ept.destroy(&mut tables, |_, _| {});
        }
        host::invept_everywhere(self.eptp);
        while *freed_tables != 0 {
            let phys = *freed_tables;
            // SAFETY: a freed table; its first entry holds the link.
            *freed_tables = unsafe { *glue::phys_to_virt(phys).cast::<u64>() };
            // SAFETY: no EPT is left and every CPU was flushed above.
            unsafe { free_table_page(phys) };
        }
        for &phys in &cache.pages[..cache.len] {
            // SAFETY: cached pages never were in an EPT.
            unsafe { free_table_page(phys) };
        }
        cache.len = 0;
    }
}

/// The callbacks the VM's MMU notifier calls with its `GuestMemory`.
static NOTIFIER_CALLBACKS: glue::mm::MmuCallbacks = glue::mm::MmuCallbacks {
    invalidate_start: notifier_invalidate_start,
    invalidate_end: notifier_invalidate_end,
    release: notifier_release,
};

/// # Safety
/// `owner` is the `GuestMemory` the notifier was registered with, alive
/// until the notifier is unregistered (the VM drops the notifier first).
unsafe fn owner<'a>(owner: *const c_void) -> &'a GuestMemory {
    // SAFETY: the caller's guarantee.
    unsafe { &*owner.cast::<GuestMemory>() }
}

unsafe extern "C" fn notifier_invalidate_start(o: *const c_void, start: u64, end: u64, _blockable: bool) -> i32 {
    // Nothing here sleeps, so a non-blockable call is served too.
    // SAFETY: called by the notifier with its owner.
    unsafe { owner(o) }.invalidate_start(start, end);
    0
}

unsafe extern "C" fn notifier_invalidate_end(o: *const c_void, _start: u64, _end: u64) {
    // SAFETY: called by the notifier with its owner.
    unsafe { owner(o) }.invalidate_end();
}

unsafe extern "C" fn notifier_release(o: *const c_void) {
    // SAFETY: called by the notifier with its owner.
    unsafe { owner(o) }.release();
}
