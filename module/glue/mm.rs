//! Safe wrappers over `glue_mm.c`: the VMM's memory as guest RAM. A page
//! reference taken through get_user_pages, an MMU notifier on the VMM's mm,
//! and the module's page counters (`/sys/kernel/debug/rkvm/pages`).
//!
//! Context: process context of the VMM, except where a function says
//! otherwise.

use core::ffi::c_void;
use core::ptr::NonNull;

use kernel::bindings;
use kernel::error::{code::EFAULT, Error, Result};

mod ffi {
    extern "C" {
        pub(super) fn rkvm_mmu_notifier_register(
            cb: *const super::MmuCallbacks,
            owner: *const core::ffi::c_void,
            err: *mut i32,
        ) -> *mut core::ffi::c_void;
        pub(super) fn rkvm_mmu_notifier_unregister(n: *mut core::ffi::c_void);
        pub(super) fn rkvm_mmu_notifier_mm(n: *const core::ffi::c_void) -> *const core::ffi::c_void;
        pub(super) fn rkvm_current_mm() -> *const core::ffi::c_void;
        // `struct page *` passed untyped: bindgen's `page` holds a
        // zero-sized `lockdep_map`, which is not FFI-safe.
        pub(super) fn rkvm_get_user_page_fast_only(hva: usize, page: *mut *mut core::ffi::c_void) -> i32;
        pub(super) fn rkvm_get_user_pages(hva: usize, n: usize, pages: *mut *mut core::ffi::c_void) -> isize;
        pub(super) fn rkvm_put_page(page: *mut core::ffi::c_void);
        pub(super) fn rkvm_phys_to_page(phys: u64) -> *mut core::ffi::c_void;
        pub(super) fn rkvm_count(counter: u32, delta: isize);
        pub(super) fn rkvm_counter(counter: u32) -> isize;
        pub(super) fn rkvm_debugfs_init();
        pub(super) fn rkvm_debugfs_exit();
    }
}

/// The callbacks an [`MmuNotifier`] calls, with the owner it was registered
/// with (layout: `struct rkvm_mmu_callbacks` in glue_mm.c).
#[repr(C)]
pub(crate) struct MmuCallbacks {
    /// Pages of the VMM's `[start, end)` are about to leave its page tables:
    /// stop using them. `blockable` false: must not sleep; return `-EAGAIN`
    /// to be retried instead. Returns 0 or `-EAGAIN`.
    pub(crate) invalidate_start: unsafe extern "C" fn(owner: *const c_void, start: u64, end: u64, blockable: bool) -> i32,
    /// The change to `[start, end)` is done.
    pub(crate) invalidate_end: unsafe extern "C" fn(owner: *const c_void, start: u64, end: u64),
    /// The address space is going away (or the notifier is unregistered).
    pub(crate) release: unsafe extern "C" fn(owner: *const c_void),
}

/// Identifies an mm_struct: compared, never dereferenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MmId(usize);

/// The calling process's mm (none for a kernel thread).
pub(crate) fn current_mm() -> MmId {
    // SAFETY: reads `current->mm`; no precondition.
    MmId(unsafe { ffi::rkvm_current_mm() } as usize)
}

/// An MMU notifier registered on the mm of the process that created it.
///
/// # Invariants
/// `raw` is a registered `struct rkvm_mmu_notifier` until `Drop`
/// unregisters and frees it; it holds a reference on its mm_struct.
pub(crate) struct MmuNotifier {
    raw: NonNull<c_void>,
}

// SAFETY: the C object is only touched through functions that may be
// called from any thread (registration state is the kernel's, under its
// own locks).
unsafe impl Send for MmuNotifier {}
// SAFETY: `&self` methods only read the immutable mm pointer.
unsafe impl Sync for MmuNotifier {}

impl MmuNotifier {
    /// Registers `callbacks` with `owner` on the calling process's mm.
    ///
    /// # Errors
    /// `EINVAL` from a kernel thread (no mm), `ENOMEM`, or the error of
    /// `mmu_notifier_register`.
    ///
    /// # Safety
    /// `owner` must stay valid, and the callbacks callable with it from any
    /// thread and in non-sleeping context, until the result is dropped.
    pub(crate) unsafe fn register(callbacks: &'static MmuCallbacks, owner: *const c_void) -> Result<Self> {
        let mut err = 0;
        // SAFETY: `callbacks` is static; `owner`'s lifetime is the caller's
        // guarantee.
        let raw = unsafe { ffi::rkvm_mmu_notifier_register(callbacks, owner, &mut err) };
        // INVARIANT: a non-null result is registered.
        NonNull::new(raw).map(|raw| Self { raw }).ok_or_else(|| Error::from_errno(err))
    }

    /// The mm this notifier watches: the VM's.
    pub(crate) fn mm(&self) -> MmId {
        // SAFETY: `raw` is live (type invariant).
        MmId(unsafe { ffi::rkvm_mmu_notifier_mm(self.raw.as_ptr()) } as usize)
    }
}

impl Drop for MmuNotifier {
    fn drop(&mut self) {
        // SAFETY: registered (type invariant) and unregistered only here;
        // this waits until no callback runs, so `owner` is no longer used.
        unsafe { ffi::rkvm_mmu_notifier_unregister(self.raw.as_ptr()) };
    }
}

/// A reference on a page of the VMM's memory, taken by get_user_pages;
/// `Drop` puts it.
///
/// # Invariants
/// `page` is a page on which this value owns one reference.
pub(crate) struct PageRef {
    page: NonNull<bindings::page>,
}

impl PageRef {
    /// The page's physical address.
    pub(crate) fn phys(&self) -> u64 {
        super::page_to_phys(self.page.as_ptr())
    }

    /// Hands the reference to whoever keeps the physical address (an EPT
    /// entry); [`PageRef::from_phys`] takes it back.
    pub(crate) fn into_phys(self) -> u64 {
        let phys = self.phys();
        core::mem::forget(self);
        phys
    }

    /// Takes back a reference handed over by [`PageRef::into_phys`]
    /// (`None` only if `phys` had no `struct page`, which cannot be: it
    /// was RAM when the reference was taken).
    ///
    /// # Safety
    /// `phys` came from `into_phys`, and its reference is taken back once.
    pub(crate) unsafe fn from_phys(phys: u64) -> Option<Self> {
        // SAFETY: `phys` is the address of a page we hold a reference on,
        // so it is RAM with a `struct page`.
        let page = unsafe { ffi::rkvm_phys_to_page(phys) }.cast::<bindings::page>();
        // INVARIANT: the reference `into_phys` handed over comes back here.
        NonNull::new(page).map(|page| Self { page })
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference (type invariant). put_page does not
        // sleep and may be called with preemption disabled or a spinlock.
        unsafe { ffi::rkvm_put_page(self.page.as_ptr().cast()) };
    }
}

/// The page behind the calling process's address `hva`, writable, without
/// sleeping: `None` unless it is present and writable already (GUP-fast).
/// May be called with preemption disabled.
pub(crate) fn get_user_page_fast(hva: u64) -> Option<PageRef> {
    let mut page: *mut c_void = core::ptr::null_mut();
    // SAFETY: `page` is a valid out-pointer for one page; GUP-fast checks
    // `hva` against the caller's address space itself.
    let r = unsafe { ffi::rkvm_get_user_page_fast_only(hva as usize, &mut page) };
    // INVARIANT: on success the page comes with a reference.
    if r == 0 { NonNull::new(page.cast()).map(|page| PageRef { page }) } else { None }
}

/// The most pages [`get_user_pages`] takes at once.
pub(crate) const MAX_PAGES_AT_ONCE: usize = 64;

/// Faults in and takes up to `n` (at most [`MAX_PAGES_AT_ONCE`]) writable
/// pages of the calling process from `hva` on, calling `f(i, page)` for
/// each; returns how many (the first ones). May sleep.
///
/// # Errors
/// `EFAULT` (or `EINTR` for a fatal signal) if not even the first page can
/// be had.
pub(crate) fn get_user_pages(hva: u64, n: usize, mut f: impl FnMut(usize, PageRef)) -> Result<usize> {
    let n = n.min(MAX_PAGES_AT_ONCE);
    let mut pages: [*mut c_void; MAX_PAGES_AT_ONCE] = [core::ptr::null_mut(); MAX_PAGES_AT_ONCE];
    // SAFETY: `pages` has room for `n` pointers; GUP checks `hva`.
    let got = unsafe { ffi::rkvm_get_user_pages(hva as usize, n, pages.as_mut_ptr()) };
    if got <= 0 {
        let err = i32::try_from(got).unwrap_or(-(bindings::EFAULT as i32));
        return Err(if err == -(bindings::EINTR as i32) || err == -(bindings::ERESTARTSYS as i32) {
            kernel::error::code::EINTR
        } else {
            EFAULT
        });
    }
    let got = (got as usize).min(n);
    for (i, page) in pages[..got].iter().enumerate() {
        // INVARIANT: GUP returned `got` pages, each with a reference (and
        // never a null one).
        if let Some(page) = NonNull::new(page.cast()) {
            f(i, PageRef { page });
        }
    }
    Ok(got)
}

/// What the module holds, for leak checks (`/sys/kernel/debug/rkvm/pages`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum Counter {
    /// Pages of VMMs referenced by EPT entries.
    GuestPagesHeld = 0,
    /// EPT paging-structure pages.
    EptTablePages = 1,
    /// VMs alive.
    Vms = 2,
    /// vCPUs alive.
    Vcpus = 3,
    /// Since load: guest pages mapped from the exit handler (the VMM had
    /// them present).
    PagesMappedFast = 4,
    /// Since load: guest pages mapped after faulting them into the VMM.
    PagesMappedSlow = 5,
    /// Since load: MMU-notifier invalidations of guest memory.
    Invalidations = 6,
    /// Since load: guest pages unmapped (invalidations, slot changes, VMs
    /// going away).
    PagesUnmapped = 7,
}

/// One object counted in a [`Counter`] for as long as this value lives.
pub(crate) struct Counted(Counter);

impl Counted {
    /// Counts one more in `counter`.
    pub(crate) fn new(counter: Counter) -> Self {
        count(counter, 1);
        Self(counter)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        count(self.0, -1);
    }
}

/// Adds `delta` to `counter`.
pub(crate) fn count(counter: Counter, delta: isize) {
    // SAFETY: an atomic add on a static; any context.
    unsafe { ffi::rkvm_count(counter as u32, delta) }
}

/// The current value of `counter`.
pub(crate) fn counter(counter: Counter) -> isize {
    // SAFETY: an atomic read of a static.
    unsafe { ffi::rkvm_counter(counter as u32) }
}

/// `/sys/kernel/debug/rkvm/pages` for as long as this value lives (nothing
/// if debugfs is absent).
pub(crate) struct Debugfs(());

impl Debugfs {
    /// Creates the file. Only one may exist (the module's).
    pub(crate) fn create() -> Self {
        // SAFETY: called once at load; `Drop` removes it.
        unsafe { ffi::rkvm_debugfs_init() };
        Self(())
    }
}

impl Drop for Debugfs {
    fn drop(&mut self) {
        // SAFETY: created by `create`; waits for open files to close.
        unsafe { ffi::rkvm_debugfs_exit() }
    }
}
