//! `/dev/rkvm`: the system file descriptor, speaking KVM's system ioctls
//! (api.rst section 4) with KVM's numbers and structs. A VMM opens it, checks
//! the API version and the capabilities, and creates VMs.
//!
//! Context: file operations run in the calling process's context and may
//! sleep. An open file holds a reference on the module (`fops.owner`), so the
//! module cannot be unloaded while one exists, nor while any VM or vCPU file
//! does.

use core::ffi::c_uint;

use kernel::bindings;
use kernel::error::{
    code::{EINVAL, ENODEV, ENOTTY},
    Result,
};

use crate::glue;
use crate::kvm_abi::*;
use crate::mm::PAGE_SIZE;
use crate::vcpu::MMAP_PAGES;
use crate::vm::{Vm, MAX_VCPUS};
use crate::vmx::host::current_caps;

/// The `file_operations` of `/dev/rkvm`.
struct DevFops(bindings::file_operations);

// SAFETY: immutable after construction; `owner` is THIS_MODULE.
unsafe impl Sync for DevFops {}

static DEV_FOPS: DevFops = DevFops({
    // SAFETY: all-zero is a valid `file_operations` (no callbacks).
    let mut fops: bindings::file_operations = unsafe { core::mem::zeroed() };
    fops.owner = crate::THIS_MODULE.as_ptr();
    fops.unlocked_ioctl = Some(rkvm_ioctl);
    fops.compat_ioctl = Some(rkvm_ioctl);
    fops.llseek = Some(bindings::noop_llseek);
    fops
});

/// The registered misc device; deregistered on drop.
///
/// # Invariants
/// `/dev/rkvm` is registered with [`DEV_FOPS`] until `Drop`.
pub(crate) struct Device(());

impl Device {
    /// Creates `/dev/rkvm` (root only, mode 0600).
    ///
    /// # Errors
    /// The error of `misc_register` (e.g. `EBUSY` if the name is taken).
    pub(crate) fn register() -> Result<Self> {
        // SAFETY: `DEV_FOPS` is a static.
        unsafe { glue::misc_register(&DEV_FOPS.0)? };
        // INVARIANT: registered just above.
        Ok(Self(()))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        glue::misc_deregister();
    }
}

/// KVM_CHECK_EXTENSION, on the system and VM fds: what rkvm implements, and
/// 0 for everything else (api.rst 4.4). A capability appears here only once
/// it works.
pub(crate) fn check_extension(cap: usize) -> isize {
    let Ok(cap) = u32::try_from(cap) else { return 0 };
    match cap {
        KVM_CAP_USER_MEMORY | KVM_CAP_SET_TSS_ADDR | KVM_CAP_SET_IDENTITY_MAP_ADDR => 1,
        // KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2.
        KVM_CAP_EXT_CPUID => 1,
        // kvm_run.immediate_exit makes KVM_RUN return -EINTR at once.
        KVM_CAP_IMMEDIATE_EXIT => 1,
        // Deleting a slot with memory_size 0 works.
        KVM_CAP_DESTROY_MEMORY_REGION_WORKS => 1,
        // KVM_GET/SET_XSAVE and KVM_GET/SET_XCRS, where guests get XSAVE.
        KVM_CAP_XSAVE | KVM_CAP_XCRS => crate::fpu::host_xcr0().is_some().into(),
        // KVM_GET/SET_VCPU_EVENTS, KVM_NMI, KVM_SET_GUEST_DEBUG (single
        // step and software breakpoints).
        KVM_CAP_VCPU_EVENTS | KVM_CAP_USER_NMI | KVM_CAP_SET_GUEST_DEBUG => 1,
        // KVM_GET_STATS_FD on vCPU fds (exit counts by reason).
        KVM_CAP_BINARY_STATS_FD => 1,
        // KVM_GET_TSC_KHZ (no KVM_SET_TSC_KHZ: the TSC is not scaled).
        KVM_CAP_GET_TSC_KHZ => 1,
        KVM_CAP_NR_MEMSLOTS => rkvm_core::memslot::MAX_SLOTS as isize,
        KVM_CAP_NR_VCPUS | KVM_CAP_MAX_VCPUS => MAX_VCPUS as isize,
        KVM_CAP_MAX_VCPU_ID => MAX_VCPUS as isize,
        _ => 0,
    }
}

fn create_vm(vm_type: usize) -> Result<isize> {
    // Only the default VM type (KVM_X86_DEFAULT_VM) exists here.
    if vm_type != 0 {
        return Err(EINVAL);
    }
    let caps = current_caps().ok_or(ENODEV)?;
    // Checked at load: the CPU has every control rkvm needs.
    let controls = rkvm_core::controls::Controls::compute(&caps).map_err(|_| ENODEV)?;
    Ok(Vm::create(caps, controls)? as isize)
}

fn system_ioctl(cmd: u32, arg: usize) -> Result<isize> {
    match cmd {
        KVM_GET_API_VERSION => Ok(KVM_API_VERSION as isize),
        KVM_CHECK_EXTENSION => Ok(check_extension(arg)),
        KVM_CREATE_VM => create_vm(arg),
        KVM_GET_VCPU_MMAP_SIZE => Ok((MMAP_PAGES * PAGE_SIZE) as isize),
        KVM_GET_SUPPORTED_CPUID => crate::cpuid::get_supported(arg),
        KVM_GET_MSR_INDEX_LIST => crate::msrs::get_index_list(arg),
        _ => Err(ENOTTY),
    }
}

/// ioctl on `/dev/rkvm`. (The kernel's `unsigned long` and `long` are
/// `usize` and `isize` here.)
unsafe extern "C" fn rkvm_ioctl(_file: *mut bindings::file, cmd: c_uint, arg: usize) -> isize {
    match system_ioctl(cmd, arg) {
        Ok(value) => value,
        Err(e) => e.to_errno() as isize,
    }
}
