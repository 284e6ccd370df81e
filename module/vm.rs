//! A VM: its memory slots and its vCPUs, reached through the VM file
//! descriptor that KVM_CREATE_VM returns (api.rst section 4, "VM ioctls").
//!
//! Context: ioctls run in the VMM's process context and may sleep; the VM's
//! mutex serializes slot changes and vCPU creation.

use kernel::alloc::flags::GFP_KERNEL;
use kernel::c_str;
use kernel::error::{
    code::{EEXIST, EINVAL, ENOTTY},
    Result,
};
use kernel::new_mutex;
use kernel::prelude::*;
use kernel::sync::lock::{mutex::MutexBackend, Guard};
use kernel::sync::{Arc, ArcBorrow, Mutex};
use kernel::uaccess::UserSlice;

use rkvm_core::caps::VmxCaps;
use rkvm_core::controls::Controls;
use rkvm_core::memslot::{self, Change, SlotError, SlotTable};

use crate::file::{self, FileObject, FileOps};
use crate::glue;
use crate::kvm_abi::*;
use crate::memory::GuestMemory;
use crate::vcpu::Vcpu;

/// How many vCPUs a VM may have (KVM_CAP_MAX_VCPUS).
pub(crate) const MAX_VCPUS: u32 = 8;

static VM_FOPS: FileOps = FileOps::new::<Vm>(&crate::THIS_MODULE);

/// What the VM's mutex protects.
struct VmState {
    slots: SlotTable,
    memory: GuestMemory,
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
    /// The EPT pointer: the root table is fixed for the VM's life, so it is
    /// read without the lock (from the run loop, where sleeping is not
    /// allowed).
    eptp: u64,
    #[pin]
    state: Mutex<VmState>,
}

impl Vm {
    /// KVM_CREATE_VM: a new VM and its file descriptor.
    pub(crate) fn create(caps: VmxCaps, controls: Controls) -> Result<i32> {
        let memory = GuestMemory::new()?;
        let eptp = memory.eptp();
        let vm = Arc::pin_init(
            pin_init!(Vm {
                caps,
                controls,
                eptp,
                state <- new_mutex!(VmState {
                    slots: SlotTable::default(),
                    memory,
                    vcpu_ids: 0,
                    tss_addr: None,
                    identity_map_addr: None,
                }, "rkvm_vm"),
            }),
            GFP_KERNEL,
        )?;
        file::install(&VM_FOPS, vm)
    }

    fn set_user_memory_region(&self, arg: usize) -> Result<isize> {
        let region: kvm_userspace_memory_region =
            UserSlice::new(arg, core::mem::size_of::<kvm_userspace_memory_region>()).reader().read()?;
        let request = memslot::Request {
            slot: region.slot,
            flags: region.flags,
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            userspace_addr: region.userspace_addr,
        };
        let mut state = self.state.lock();
        let change = state.slots.plan(&request, glue::task_size_max()).map_err(|e| match e {
            SlotError::Invalid => EINVAL,
            SlotError::Overlap => EEXIST,
        })?;
        match change {
            Change::Create(slot) => state.memory.add(&slot)?,
            Change::Delete(id) => {
                let slot = state.slots.iter().find(|s| s.id == id).copied();
                if let Some(slot) = slot {
                    state.memory.remove(&slot);
                }
            }
            Change::Move { old, new } => {
                if let Err(e) = state.memory.relocate(&old, &new) {
                    // The slot is gone: say so in the table too.
                    state.slots.apply(Change::Delete(old.id));
                    return Err(e);
                }
            }
            Change::Nothing => {}
        }
        state.slots.apply(change);
        Ok(0)
    }

    fn create_vcpu(this: ArcBorrow<'_, Self>, id: usize) -> Result<isize> {
        let id = u32::try_from(id).map_err(|_| EINVAL)?;
        if id >= MAX_VCPUS {
            return Err(EINVAL);
        }
        let mut state = this.state.lock();
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

    /// Guest-physical memory, for exits that emulate an access; holds the
    /// VM's mutex (so slots cannot change) until dropped. May sleep.
    pub(crate) fn memory(&self) -> VmMemoryView<'_> {
        VmMemoryView { state: self.state.lock() }
    }

    /// The EPT pointer of this VM's memory.
    pub(crate) fn eptp(&self) -> u64 {
        self.eptp
    }

    fn set_tss_addr(&self, addr: usize) -> Result<isize> {
        self.state.lock().tss_addr = Some(addr as u64);
        Ok(0)
    }

    fn set_identity_map_addr(&self, arg: usize) -> Result<isize> {
        let addr: u64 = UserSlice::new(arg, core::mem::size_of::<u64>()).reader().read()?;
        let mut state = self.state.lock();
        // As KVM: too late once vCPUs exist.
        if state.vcpu_ids != 0 {
            return Err(EINVAL);
        }
        state.identity_map_addr = Some(addr);
        Ok(0)
    }
}

/// Guest-physical memory of a VM, its slots locked.
pub(crate) struct VmMemoryView<'a> {
    state: Guard<'a, VmState, MutexBackend>,
}

impl VmMemoryView<'_> {
    /// The kernel address of guest-physical `gpa` and how many bytes of its
    /// page follow, or `EFAULT` outside every slot.
    fn locate(&self, gpa: u64) -> Result<(*mut u8, usize)> {
        let slot = self.state.slots.find(gpa >> 12).ok_or(kernel::error::code::EFAULT)?;
        let page = self.state.memory.page(slot, gpa >> 12).ok_or(kernel::error::code::EFAULT)?;
        let offset = (gpa & 0xfff) as usize;
        // SAFETY: `page` is the direct-map address of a pinned page.
        Ok((unsafe { page.add(offset) }, 4096 - offset))
    }

    /// Whether `gpa` is guest RAM (in a slot).
    pub(crate) fn contains(&self, gpa: u64) -> bool {
        self.state.slots.find(gpa >> 12).is_some()
    }

    /// Reads guest-physical memory.
    ///
    /// # Errors
    /// `EFAULT` if any byte is outside guest RAM.
    pub(crate) fn read(&mut self, mut gpa: u64, buf: &mut [u8]) -> Result {
        let mut done = 0;
        while done < buf.len() {
            let (src, avail) = self.locate(gpa)?;
            let n = avail.min(buf.len() - done);
            // SAFETY: `src` has `avail` bytes of a pinned guest page; the
            // guest may write them concurrently, which only changes values.
            unsafe { core::ptr::copy_nonoverlapping(src, buf[done..].as_mut_ptr(), n) };
            done += n;
            gpa += n as u64;
        }
        Ok(())
    }

    /// Writes guest-physical memory.
    ///
    /// # Errors
    /// `EFAULT` if any byte is outside guest RAM.
    pub(crate) fn write(&mut self, mut gpa: u64, buf: &[u8]) -> Result {
        let mut done = 0;
        while done < buf.len() {
            let (dst, avail) = self.locate(gpa)?;
            let n = avail.min(buf.len() - done);
            // SAFETY: as in `read`; the page is pinned writable.
            unsafe { core::ptr::copy_nonoverlapping(buf[done..].as_ptr(), dst, n) };
            done += n;
            gpa += n as u64;
        }
        Ok(())
    }
}

impl FileObject for Vm {
    const NAME: &'static CStr = c_str!("kvm-vm");

    fn ioctl(this: ArcBorrow<'_, Self>, cmd: u32, arg: usize) -> Result<isize> {
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
