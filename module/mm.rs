//! Owned, zeroed 4 KiB pages with a known physical address: the memory every
//! VMX structure lives in (VMXON region, VMCS, EPT tables, bitmaps).
//!
//! Context: allocation sleeps (GFP_KERNEL), so pages are allocated in process
//! context; reading the address and freeing do not sleep.

use core::ptr::NonNull;

use kernel::bindings;
use kernel::error::{code::ENOMEM, Result};

use crate::glue;

/// Size of a page, and of every VMX structure rkvm allocates.
pub(crate) const PAGE_SIZE: usize = 4096;

/// A zeroed, 4 KiB-aligned page from the page allocator.
///
/// # Invariants
/// `virt` is the direct-map address of a page allocated by
/// `get_zeroed_page` and owned by this value until `Drop` frees it.
pub(crate) struct Page {
    virt: NonNull<u8>,
}

// SAFETY: the page is plain memory owned by this value; moving ownership to
// another thread is fine.
unsafe impl Send for Page {}
// SAFETY: shared references only allow reads of the address and
// `write_u32`-style accessors that take `&mut self`.
unsafe impl Sync for Page {}

impl Page {
    /// Allocates a zeroed page (may sleep).
    ///
    /// # Errors
    /// `ENOMEM` when the allocator has no page.
    pub(crate) fn alloc_zeroed() -> Result<Self> {
        // SAFETY: plain allocator call in process context.
        let addr = unsafe { bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL) };
        let virt = NonNull::new(addr as *mut u8).ok_or(ENOMEM)?;
        // INVARIANT: `virt` is a freshly allocated page that we now own.
        Ok(Self { virt })
    }

    /// Physical address, for VMX instructions and VMCS pointer fields.
    pub(crate) fn phys(&self) -> u64 {
        glue::virt_to_phys(self.virt.as_ptr().cast())
    }

    /// The page's direct-map address, for mapping it into userspace.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.virt.as_ptr()
    }

    /// The page's contents.
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8; PAGE_SIZE] {
        // SAFETY: by the type invariant `virt` points to PAGE_SIZE bytes that
        // this value owns exclusively; `&mut self` rules out other borrows.
        unsafe { &mut *self.virt.as_ptr().cast::<[u8; PAGE_SIZE]>() }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: by the type invariant the page came from `get_zeroed_page`
        // and is owned by us; nothing (no CPU in VMX operation) uses it now,
        // which the owners of VMX structures guarantee before dropping.
        unsafe { bindings::free_pages(self.virt.as_ptr() as _, 0) };
    }
}
