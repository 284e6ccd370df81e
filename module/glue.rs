//! Safe wrappers over `glue.c`, the module's only C: the misc device, `__pa`,
//! the kernel's CR4 helpers, fault-tolerant VMXON/VMXOFF, and the kernel's
//! emergency virtualization callback. Nothing else in the module declares an
//! `extern "C"` function.

use kernel::bindings;
use kernel::error::{to_result, Result};

mod ffi {
    extern "C" {
        // `fops` is a `struct file_operations *`; passed untyped because some
        // of its member types (e.g. an empty `lockdep_map`) are not FFI-safe.
        pub(super) fn rkvm_misc_register(fops: *const core::ffi::c_void) -> i32;
        pub(super) fn rkvm_misc_deregister();
        pub(super) fn rkvm_anon_inode_getfd(
            name: *const u8,
            fops: *const core::ffi::c_void,
            private: *mut core::ffi::c_void,
        ) -> i32;
        pub(super) fn rkvm_vma_insert_pages(
            vma: *mut core::ffi::c_void,
            pages: *const *const core::ffi::c_void,
            n: usize,
        ) -> i32;
        pub(super) fn rkvm_virt_to_phys(addr: *const core::ffi::c_void) -> u64;
        pub(super) fn rkvm_this_cpu() -> u32;
        pub(super) fn rkvm_read_cr4() -> u64;
        pub(super) fn rkvm_cr4_set_vmxe();
        pub(super) fn rkvm_cr4_clear_vmxe();
        pub(super) fn rkvm_vmxon(phys: u64) -> i32;
        pub(super) fn rkvm_vmxoff() -> i32;
        pub(super) fn rkvm_fail_vmxon_on_cpu() -> i32;
        pub(super) fn rkvm_register_reboot(leave_vmx: unsafe extern "C" fn()) -> i32;
        pub(super) fn rkvm_unregister_reboot();
        // arch/x86/kernel/reboot.c, EXPORT_SYMBOL_GPL.
        pub(super) fn cpu_emergency_register_virt_callback(cb: unsafe extern "C" fn());
        pub(super) fn cpu_emergency_unregister_virt_callback(cb: unsafe extern "C" fn());
    }
}

/// Registers the `/dev/rkvm` misc device (mode 0600) with `fops`.
///
/// # Safety
/// `fops` must stay valid and unmoved until [`misc_deregister`] returns.
pub(crate) unsafe fn misc_register(fops: *const bindings::file_operations) -> Result {
    // SAFETY: the caller keeps `fops` alive until deregistration; the C side
    // only stores the pointer in its static miscdevice.
    to_result(unsafe { ffi::rkvm_misc_register(fops.cast()) })
}

/// Removes `/dev/rkvm`. Open files keep the module pinned through
/// `fops.owner`, so no file operation runs after the module is gone.
pub(crate) fn misc_deregister() {
    // SAFETY: only called after a successful `misc_register`, once (the
    // owning `dev::Device` calls it from `Drop`).
    unsafe { ffi::rkvm_misc_deregister() }
}

/// Installs a new file descriptor for an anonymous inode file with `fops`
/// and `private` as its `private_data`; returns the descriptor.
///
/// # Safety
/// `fops` must be valid for the module's lifetime (its owner is this
/// module, which the file pins), and `fops.release` must take over
/// `private` when the file closes. On error nothing took `private`.
pub(crate) unsafe fn anon_inode_getfd(
    name: &'static kernel::str::CStr,
    fops: *const bindings::file_operations,
    private: *mut core::ffi::c_void,
) -> Result<i32> {
    // SAFETY: the caller guarantees `fops` and the ownership of `private`.
    let fd = unsafe { ffi::rkvm_anon_inode_getfd(name.as_char_ptr(), fops.cast(), private) };
    if fd < 0 {
        Err(kernel::error::Error::from_errno(fd))
    } else {
        Ok(fd)
    }
}

/// Maps `pages` (page-aligned direct-map addresses of whole pages) into
/// `vma`, from page `vma->vm_pgoff` on, as many as the VMA covers.
///
/// # Errors
/// `EINVAL` if the VMA reaches past the last page; errors of `vm_insert_page`.
///
/// # Safety
/// Called from an mmap file operation with `vma` as given by the kernel;
/// each address in `pages` is a page from the page allocator that stays
/// allocated until this returns (mapping takes its own reference).
pub(crate) unsafe fn vma_insert_pages(vma: *mut bindings::vm_area_struct, pages: &[*const u8]) -> Result {
    // SAFETY: the caller guarantees the VMA context and the pages.
    to_result(unsafe { ffi::rkvm_vma_insert_pages(vma.cast(), pages.as_ptr().cast(), pages.len()) })
}

/// Physical address of a directly mapped kernel address (`__pa`).
pub(crate) fn virt_to_phys(addr: *const core::ffi::c_void) -> u64 {
    // SAFETY: `__pa` is arithmetic on the address; callers pass addresses of
    // the direct map (pages from the page allocator).
    unsafe { ffi::rkvm_virt_to_phys(addr) }
}

/// The number of the CPU this runs on. Only meaningful for logging unless the
/// caller cannot migrate (pinned thread, preemption disabled).
pub(crate) fn this_cpu() -> u32 {
    // SAFETY: `raw_smp_processor_id` reads a per-CPU variable; no precondition.
    unsafe { ffi::rkvm_this_cpu() }
}

/// This CPU's CR4, read from the register.
pub(crate) fn read_cr4() -> u64 {
    // SAFETY: reading CR4 at CPL 0 has no side effects.
    unsafe { ffi::rkvm_read_cr4() }
}

/// Sets CR4.VMXE on this CPU, through the kernel's CR4 shadow.
pub(crate) fn cr4_set_vmxe() {
    // SAFETY: `cr4_set_bits` disables interrupts around the update; setting
    // VMXE has no effect outside VMX operation other than allowing VMXON.
    unsafe { ffi::rkvm_cr4_set_vmxe() }
}

/// Clears CR4.VMXE on this CPU. Only valid outside VMX operation (clearing it
/// inside raises #GP), i.e. after VMXOFF or a failed VMXON.
pub(crate) fn cr4_clear_vmxe() {
    // SAFETY: callers only clear VMXE after VMXOFF or a failed VMXON (see the
    // doc comment), so the write cannot fault.
    unsafe { ffi::rkvm_cr4_clear_vmxe() }
}

/// Why VMXON or VMXOFF did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmxInsnError {
    /// VMfailInvalid or VMfailValid (CF or ZF set).
    VmFail,
    /// The instruction faulted (#GP or #UD), caught by the exception table.
    Fault,
}

fn insn_result(ret: i32) -> core::result::Result<(), VmxInsnError> {
    match ret {
        0 => Ok(()),
        r if r == -(bindings::EIO as i32) => Err(VmxInsnError::VmFail),
        _ => Err(VmxInsnError::Fault),
    }
}

/// VMXON with the region at `phys` on this CPU.
///
/// # Safety
/// `phys` is the physical address of a 4 KiB-aligned page, owned by the
/// caller and not used for anything else until VMXOFF on this CPU, whose
/// first 4 bytes hold the VMCS revision identifier. The caller stays on this
/// CPU (pinned or preemption disabled) until it records the outcome.
pub(crate) unsafe fn vmxon(phys: u64) -> core::result::Result<(), VmxInsnError> {
    // SAFETY: faults are caught by the exception table in glue.c; the region
    // requirements are the caller's.
    insn_result(unsafe { ffi::rkvm_vmxon(phys) })
}

/// VMXOFF on this CPU. Safe to call outside VMX operation: the resulting #UD
/// is caught and reported as [`VmxInsnError::Fault`].
pub(crate) fn vmxoff() -> core::result::Result<(), VmxInsnError> {
    // SAFETY: faults are caught by the exception table in glue.c; leaving
    // VMX operation invalidates nothing the host relies on (no VMCS is in
    // use by rkvm while it owns no vCPUs on this CPU).
    insn_result(unsafe { ffi::rkvm_vmxoff() })
}

/// The CPU on which the `fail_vmxon_on_cpu` module parameter asks VMXON to
/// fail (testing the rollback of a partial load), if any.
pub(crate) fn fail_vmxon_on_cpu() -> Option<u32> {
    // SAFETY: reads an int module parameter; no precondition.
    u32::try_from(unsafe { ffi::rkvm_fail_vmxon_on_cpu() }).ok()
}

/// Runs `leave_vmx` on every CPU (by IPI, interrupts disabled) when the
/// system reboots, halts, powers off or kexecs.
///
/// # Safety
/// `leave_vmx` must be callable in IPI context until [`unregister_reboot`]
/// returns.
pub(crate) unsafe fn register_reboot(leave_vmx: unsafe extern "C" fn()) -> Result {
    // SAFETY: the caller guarantees `leave_vmx`'s lifetime and context.
    to_result(unsafe { ffi::rkvm_register_reboot(leave_vmx) })
}

/// Removes the reboot hook; waits for a running notifier chain.
pub(crate) fn unregister_reboot() {
    // SAFETY: only called after a successful `register_reboot`.
    unsafe { ffi::rkvm_unregister_reboot() }
}

/// Installs `cb` as the kernel's emergency virtualization callback: it runs
/// on every CPU on crash, emergency reboot and kexec (NMI context).
///
/// # Safety
/// `cb` must be NMI-safe and stay callable until
/// [`unregister_emergency_callback`] with the same `cb` returns.
pub(crate) unsafe fn register_emergency_callback(cb: unsafe extern "C" fn()) {
    // SAFETY: the caller guarantees `cb`'s lifetime and NMI safety.
    unsafe { ffi::cpu_emergency_register_virt_callback(cb) }
}

/// Removes the emergency callback installed by [`register_emergency_callback`]
/// and waits until no CPU runs it (the kernel does `synchronize_rcu`).
///
/// # Safety
/// `cb` must be the callback this module registered.
pub(crate) unsafe fn unregister_emergency_callback(cb: unsafe extern "C" fn()) {
    // SAFETY: the caller passes the registered callback.
    unsafe { ffi::cpu_emergency_unregister_virt_callback(cb) }
}
