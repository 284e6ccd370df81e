//! A VM: its memory slots and its vCPUs, reached through the VM file
//! descriptor that KVM_CREATE_VM returns (api.rst section 4, "VM ioctls").
//!
//! Only the process that created the VM may use it (its memory is guest
//! RAM): VM and vCPU ioctls from any other fail with EIO, as in KVM.
//!
//! Context: ioctls run in the VMM's process context and may sleep; the VM's
//! mutex serializes vCPU creation, the memory's own lock slot changes.

use kernel::alloc::flags::GFP_KERNEL;
use kernel::c_str;
use kernel::error::{
    code::{EEXIST, EINVAL, EIO, ENOTTY},
    Error, Result,
};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow};
use kernel::uaccess::UserSlice;

use rkvm_core::caps::VmxCaps;
use rkvm_core::controls::Controls;
use rkvm_core::memslot::Request;

use crate::file::{self, FileObject, FileOps};
use crate::glue::mm::{self as glue_mm, Counted, Counter, MmuNotifier};
use crate::glue::sync::{new_killable_mutex, KillableMutex};
use crate::kvm_abi::*;
use crate::memory::GuestMemory;
use crate::vcpu::Vcpu;

/// How many vCPUs a VM may have (KVM_CAP_MAX_VCPUS).
pub(crate) const MAX_VCPUS: u32 = 8;

static VM_FOPS: FileOps = FileOps::new::<Vm>(&crate::THIS_MODULE);

/// What the VM's mutex protects.
struct VmState {
    /// Bit N set: vCPU N exists.
    vcpu_ids: u32,
    /// KVM_SET_TSS_ADDR and KVM_SET_IDENTITY_MAP_ADDR: accepted and kept.
    /// KVM needs these pages only without unrestricted guest; rkvm always
    /// has it, so nothing uses them.
    tss_addr: Option<u64>,
    identity_map_addr: Option<u64>,
}

/// A VM.
#[pin_data]
pub(crate) struct Vm {
    /// Capabilities of the CPUs, as found at load.
    caps: VmxCaps,
    /// The VMCS controls every vCPU runs with.
    controls: Controls,
    /// Watches the creating process's address space, where guest RAM
    /// lives. Declared before `memory` so that it is unregistered (and no
    /// callback can run) before the memory goes.
    notifier: MmuNotifier,
    /// Guest-physical memory: slots and the EPT.
    #[pin]
    memory: GuestMemory,
    #[pin]
    state: KillableMutex<VmState>,
    _counted: Counted,
}

impl Vm {
    /// KVM_CREATE_VM: a new VM and its file descriptor. Its guest RAM must
    /// be the calling process's memory, and only that process may use it
    /// (as KVM's `kvm->mm`).
    pub(crate) fn create(caps: VmxCaps, controls: Controls) -> Result<i32> {
        let memory = GuestMemory::new()?;
        let vm = Arc::pin_init(
            try_pin_init!(&this in Vm {
                caps,
                controls,
                memory <- memory,
                // SAFETY: `memory` is initialized above at its final place
                // in the VM, which drops the notifier before it.
                notifier: unsafe {
                    MmuNotifier::register(
                        GuestMemory::notifier_callbacks(),
                        core::ptr::addr_of!((*this.as_ptr()).memory).cast(),
                    )?
                },
                state <- new_killable_mutex!(VmState {
                    vcpu_ids: 0,
                    tss_addr: None,
                    identity_map_addr: None,
                }, "rkvm_vm"),
                _counted: Counted::new(Counter::Vms),
            }? Error),
            GFP_KERNEL,
        )?;
        file::install(&VM_FOPS, vm)
    }

    /// Whether the calling process is the one whose memory is guest RAM.
    /// VM and vCPU ioctls from any other (a forked child, a process that
    /// received the fd) fail with EIO, as in KVM: they would see another
    /// address space under the slots.
    pub(crate) fn check_caller(&self) -> Result {
        if glue_mm::current_mm() == self.notifier.mm() {
            Ok(())
        } else {
            Err(EIO)
        }
    }

    fn set_user_memory_region(&self, arg: usize) -> Result<isize> {
        let region: kvm_userspace_memory_region =
            UserSlice::new(arg, core::mem::size_of::<kvm_userspace_memory_region>()).reader().read()?;
        self.memory.set_slot(&Request {
            slot: region.slot,
            flags: region.flags,
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            userspace_addr: region.userspace_addr,
        })?;
        Ok(0)
    }

    fn create_vcpu(this: ArcBorrow<'_, Self>, id: usize) -> Result<isize> {
        let id = u32::try_from(id).map_err(|_| EINVAL)?;
        if id >= MAX_VCPUS {
            return Err(EINVAL);
        }
        let mut state = this.state.lock_killable()?;
        if state.vcpu_ids & (1 << id) != 0 {
            return Err(EEXIST);
        }
        let fd = Vcpu::create(this.into(), id)?;
        state.vcpu_ids |= 1 << id;
        Ok(fd as isize)
    }

    /// The capabilities of the CPUs this VM runs on.
    pub(crate) fn caps(&self) -> &VmxCaps {
        &self.caps
    }

    /// The VMCS controls.
    pub(crate) fn controls(&self) -> &Controls {
        &self.controls
    }

    /// Guest-physical memory.
    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The EPT pointer of this VM's memory.
    pub(crate) fn eptp(&self) -> u64 {
        self.memory.eptp()
    }

    fn set_tss_addr(&self, addr: usize) -> Result<isize> {
        self.state.lock_killable()?.tss_addr = Some(addr as u64);
        Ok(0)
    }

    fn set_identity_map_addr(&self, arg: usize) -> Result<isize> {
        let addr: u64 = UserSlice::new(arg, core::mem::size_of::<u64>()).reader().read()?;
        let mut state = self.state.lock_killable()?;
        // As KVM: too late once vCPUs exist.
        if state.vcpu_ids != 0 {
            return Err(EINVAL);
        }
        state.identity_map_addr = Some(addr);
        Ok(0)
    }
}

impl FileObject for Vm {
    const NAME: &'static CStr = c_str!("kvm-vm");

    fn ioctl(this: ArcBorrow<'_, Self>, cmd: u32, arg: usize) -> Result<isize> {
        this.check_caller()?;
        match cmd {
            KVM_CHECK_EXTENSION => Ok(crate::dev::check_extension(arg)),
            KVM_CREATE_VCPU => Vm::create_vcpu(this, arg),
            KVM_SET_USER_MEMORY_REGION => this.set_user_memory_region(arg),
            KVM_SET_TSS_ADDR => this.set_tss_addr(arg),
            KVM_SET_IDENTITY_MAP_ADDR => this.set_identity_map_addr(arg),
            _ => Err(ENOTTY),
        }
    }
}
