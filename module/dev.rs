//! `/dev/rkvm`: the character device through which userspace reaches rkvm.
//!
//! It will speak a subset of KVM's ioctl ABI (Documentation/virt/kvm/api.rst).
//! Until an ioctl is implemented it is unknown, and unknown ioctls fail with
//! `ENOTTY`, as on `/dev/kvm`.
//!
//! Context: file operations run in the calling process's context and may
//! sleep. An open file holds a reference on the module (`fops.owner`), so the
//! module cannot be unloaded while one exists.

use core::ffi::c_uint;

use kernel::alloc::{flags::GFP_KERNEL, KBox};
use kernel::bindings;
use kernel::error::{code::ENOTTY, Result};
use kernel::ThisModule;

use crate::glue;

/// The registered misc device; deregistered on drop.
///
/// # Invariants
/// `fops` is registered with the misc device until `Drop`.
pub(crate) struct Device {
    fops: KBox<bindings::file_operations>,
}

// SAFETY: `Device` only holds the registered `file_operations`, which is
// immutable after registration; its raw `owner` pointer is `THIS_MODULE`,
// valid for the module's lifetime from any thread.
unsafe impl Send for Device {}
// SAFETY: as for `Send`: no method mutates the table.
unsafe impl Sync for Device {}

impl Device {
    /// Creates `/dev/rkvm` (root only, mode 0600).
    ///
    /// # Errors
    /// `ENOMEM`, or the error of `misc_register` (e.g. `EBUSY` if the name
    /// is taken).
    pub(crate) fn register(module: &'static ThisModule) -> Result<Self> {
        let fops = KBox::new(
            bindings::file_operations {
                owner: module.as_ptr(),
                unlocked_ioctl: Some(rkvm_ioctl),
                compat_ioctl: Some(rkvm_ioctl),
                llseek: Some(bindings::noop_llseek),
                ..Default::default()
            },
            GFP_KERNEL,
        )?;
        // SAFETY: `fops` is boxed (stable address) and lives in the returned
        // `Device`, whose `Drop` deregisters before freeing it.
        unsafe { glue::misc_register(&*fops)? };
        // INVARIANT: registered just above.
        Ok(Self { fops })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        glue::misc_deregister();
        // `self.fops` is freed after this; no new open can reach it, and
        // open files pin the module, so none is left.
        let _ = &self.fops;
    }
}

/// ioctl on `/dev/rkvm`: none is implemented yet.
/// (The kernel's `unsigned long` and `long` are `usize` and `isize` here.)
unsafe extern "C" fn rkvm_ioctl(_file: *mut bindings::file, _cmd: c_uint, _arg: usize) -> isize {
    ENOTTY.to_errno() as isize
}

