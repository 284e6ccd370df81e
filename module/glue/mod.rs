//! Safe wrappers over the module's C (`glue.c`, `glue_mm.c`, `glue_cpu.c`):
//! the kernel facilities Linux 6.12's Rust bindings lack. This file: the
//! misc device and anonymous-inode files, `__pa`, the kernel's CR4 helpers,
//! fault-tolerant VMX instructions, host state, the reboot hook and the
//! emergency virtualization callback; `mm.rs`: the VMM's memory as guest
//! RAM; `cpu.rs`: debug registers, machine checks and speculation barriers
//! around a guest's run; `sync.rs`: a killable mutex. Nothing else in the
//! module declares an `extern "C"` function.

pub(crate) mod cpu;
pub(crate) mod mm;
pub(crate) mod sync;

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
            stats: bool,
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
        pub(super) fn rkvm_vmclear(phys: u64) -> i32;
        pub(super) fn rkvm_vmptrld(phys: u64) -> i32;
        pub(super) fn rkvm_vmread(field: usize, value: *mut u64) -> i32;
        pub(super) fn rkvm_vmwrite(field: usize, value: u64) -> i32;
        pub(super) fn rkvm_invept(ty: usize, descriptor: *const u64) -> i32;
        pub(super) fn rkvm_fail_vmxon_on_cpu() -> i32;
        pub(super) fn rkvm_dump_caps() -> bool;
        pub(super) fn rkvm_register_reboot(leave_vmx: unsafe extern "C" fn()) -> i32;
        pub(super) fn rkvm_unregister_reboot();
        pub(super) fn rkvm_ratelimit() -> bool;
        pub(super) fn rkvm_read_host_state(h: *mut super::HostState);
        pub(super) fn rkvm_restore_host_segments(h: *const super::HostState);
        pub(super) fn rkvm_preempt_disable();
        pub(super) fn rkvm_preempt_enable();
        pub(super) fn rkvm_local_irq_disable();
        pub(super) fn rkvm_local_irq_enable();
        pub(super) fn rkvm_need_resched() -> bool;
        pub(super) fn rkvm_signal_pending() -> bool;
        pub(super) fn rkvm_cond_resched();
        pub(super) fn rkvm_page_to_phys(page: *mut core::ffi::c_void) -> u64;
        pub(super) fn rkvm_phys_to_virt(phys: u64) -> *mut core::ffi::c_void;
        pub(super) fn rkvm_task_size_max() -> usize;
        pub(super) fn rkvm_tsc_khz() -> u32;
        pub(super) fn rkvm_on_each_cpu(
            f: unsafe extern "C" fn(*mut core::ffi::c_void),
            info: *mut core::ffi::c_void,
        );
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
/// With `stats` the file is read-only and allows pread(2), as KVM's
/// statistics files.
///
/// `fops` must be valid for the module's lifetime (its owner is this
/// module, which the file pins), and `fops.release` must take over
/// `private` when the file closes. On error nothing took `private`.
pub(crate) unsafe fn anon_inode_getfd(
    name: &'static kernel::str::CStr,
    fops: *const bindings::file_operations,
    private: *mut core::ffi::c_void,
    stats: bool,
) -> Result<i32> {
    // SAFETY: the caller guarantees `fops` and the ownership of `private`.
    let fd = unsafe { ffi::rkvm_anon_inode_getfd(name.as_char_ptr(), fops.cast(), private, stats) };
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

/// `-EIO` as the VMX glue returns it for VMfail.
pub(crate) const EIO: i32 = -(bindings::EIO as i32);

/// VMCLEAR (see vmx/insn.rs, the only caller of these raw forms).
///
/// # Safety
/// `phys` is a VMCS region the caller owns.
pub(crate) unsafe fn raw_vmclear(phys: u64) -> i32 {
    // SAFETY: the caller's guarantee; faults are caught in glue.c.
    unsafe { ffi::rkvm_vmclear(phys) }
}

/// VMPTRLD.
///
/// # Safety
/// `phys` is a VMCS region the caller owns, current on no other CPU.
pub(crate) unsafe fn raw_vmptrld(phys: u64) -> i32 {
    // SAFETY: the caller's guarantee; faults are caught in glue.c.
    unsafe { ffi::rkvm_vmptrld(phys) }
}

/// VMREAD into `*value`.
///
/// # Safety
/// The caller loaded the current VMCS (or accepts a VMfail).
pub(crate) unsafe fn raw_vmread(field: u32, value: &mut u64) -> i32 {
    // SAFETY: `value` is a valid u64; faults are caught in glue.c.
    unsafe { ffi::rkvm_vmread(field as usize, value) }
}

/// VMWRITE.
///
/// # Safety
/// The current VMCS is the caller's.
pub(crate) unsafe fn raw_vmwrite(field: u32, value: u64) -> i32 {
    // SAFETY: the caller's guarantee; faults are caught in glue.c.
    unsafe { ffi::rkvm_vmwrite(field as usize, value) }
}

/// INVEPT of `ty` with `descriptor`.
///
/// # Safety
/// `ty` is supported by the CPU.
pub(crate) unsafe fn raw_invept(ty: usize, descriptor: &[u64; 2]) -> i32 {
    // SAFETY: a 16-byte descriptor; faults are caught in glue.c.
    unsafe { ffi::rkvm_invept(ty, descriptor.as_ptr()) }
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

/// Whether the `dump_caps` module parameter asks for the raw capability
/// MSRs in the log.
pub(crate) fn dump_caps() -> bool {
    // SAFETY: reads a bool module parameter.
    unsafe { ffi::rkvm_dump_caps() }
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

/// The host state a VMCS needs, read on the CPU about to enter a guest
/// (layout: `struct rkvm_host_state` in glue.c).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)]
pub(crate) struct HostState {
    pub(crate) cr0: u64,
    pub(crate) cr3: u64,
    pub(crate) cr4: u64,
    pub(crate) fs_base: u64,
    pub(crate) gs_base: u64,
    pub(crate) tr_base: u64,
    pub(crate) gdtr_base: u64,
    pub(crate) idtr_base: u64,
    pub(crate) sysenter_cs: u64,
    pub(crate) sysenter_esp: u64,
    pub(crate) sysenter_eip: u64,
    pub(crate) efer: u64,
    pub(crate) pat: u64,
    pub(crate) cs_sel: u16,
    pub(crate) ss_sel: u16,
    pub(crate) tr_sel: u16,
    pub(crate) fs_sel: u16,
    pub(crate) gs_sel: u16,
    ds_sel: u16,
    es_sel: u16,
    ldt_sel: u16,
    real_fs_sel: u16,
    real_gs_sel: u16,
}

/// Preemption is disabled for as long as this value lives: code holding a
/// `&PreemptDisabled` runs on one CPU. Not `Send`.
pub(crate) struct PreemptDisabled(core::marker::PhantomData<*mut ()>);

impl PreemptDisabled {
    /// Disables preemption.
    pub(crate) fn new() -> Self {
        // SAFETY: balanced by `Drop`.
        unsafe { ffi::rkvm_preempt_disable() };
        Self(core::marker::PhantomData)
    }

    /// Reads this CPU's host state (see [`HostState`]).
    pub(crate) fn host_state(&self) -> HostState {
        let mut h = HostState::default();
        // SAFETY: fills `h`; preemption is disabled, so every per-CPU value
        // is this CPU's and stays so while `self` lives.
        unsafe { ffi::rkvm_read_host_state(&mut h) };
        h
    }

    /// Reloads what VM exits changed in the host's segment and descriptor
    /// table state, from `h` as read by [`Self::host_state`] on this CPU.
    pub(crate) fn restore_host_segments(&self, h: &HostState) {
        // SAFETY: `h` was read on this CPU in this preemption-disabled span.
        unsafe { ffi::rkvm_restore_host_segments(h) };
    }

    /// Whether the scheduler wants this CPU back.
    pub(crate) fn need_resched(&self) -> bool {
        // SAFETY: reads a thread flag.
        unsafe { ffi::rkvm_need_resched() }
    }
}

impl Drop for PreemptDisabled {
    fn drop(&mut self) {
        // SAFETY: balances `new`.
        unsafe { ffi::rkvm_preempt_enable() };
    }
}

/// Disables interrupts on this CPU (they were enabled).
pub(crate) fn local_irq_disable() {
    // SAFETY: callers re-enable with `local_irq_enable` before sleeping.
    unsafe { ffi::rkvm_local_irq_disable() }
}

/// Enables interrupts on this CPU: pending host interrupts are taken now.
pub(crate) fn local_irq_enable() {
    // SAFETY: called in process context where interrupts may be on.
    unsafe { ffi::rkvm_local_irq_enable() }
}

/// Whether a signal is pending for the current task.
pub(crate) fn signal_pending() -> bool {
    // SAFETY: reads the current task's flags.
    unsafe { ffi::rkvm_signal_pending() }
}

/// Lets the scheduler run something else (may sleep).
pub(crate) fn cond_resched() {
    // SAFETY: process context, no locks held that forbid sleeping.
    unsafe { ffi::rkvm_cond_resched() }
}

/// Physical address of a `struct page`.
pub(crate) fn page_to_phys(page: *mut bindings::page) -> u64 {
    // SAFETY: arithmetic on the page's position in the memory map; callers
    // pass pages they hold a pin on.
    unsafe { ffi::rkvm_page_to_phys(page.cast()) }
}

/// Direct-map address of physical address `phys` (RAM only).
pub(crate) fn phys_to_virt(phys: u64) -> *mut u8 {
    // SAFETY: arithmetic; dereferencing the result is the caller's concern.
    unsafe { ffi::rkvm_phys_to_virt(phys).cast() }
}

/// End of the user address space (`TASK_SIZE_MAX`).
pub(crate) fn task_size_max() -> u64 {
    // SAFETY: reads a constant (or the boot-time paging mode).
    unsafe { ffi::rkvm_task_size_max() as u64 }
}

/// TSC ticks per millisecond (`tsc_khz`).
pub(crate) fn tsc_khz() -> u32 {
    // SAFETY: reads a variable set at boot.
    unsafe { ffi::rkvm_tsc_khz() }
}

/// Whether a message a VMM or a guest can cause may be logged now: at most
/// 10 per 5 seconds (printk_ratelimited's defaults), so that no process can
/// flood the kernel log.
pub(crate) fn ratelimit() -> bool {
    // SAFETY: a static ratelimit state, taken under its own lock.
    unsafe { ffi::rkvm_ratelimit() }
}

/// Runs `f(info)` on every online CPU, this one included, and waits for all.
///
/// # Safety
/// `f` must be safe to run in IPI context with `info`.
pub(crate) unsafe fn on_each_cpu(f: unsafe extern "C" fn(*mut core::ffi::c_void), info: *mut core::ffi::c_void) {
    // SAFETY: the caller's guarantee.
    unsafe { ffi::rkvm_on_each_cpu(f, info) }
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
