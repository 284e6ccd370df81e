//! The device's objects as the fuzzer holds them: VMs, vCPUs with their
//! kvm_run mappings, statistics fds, and the memory slots a VM has (as far
//! as the fuzzer knows: a slot ioctl it sent may have been accepted or
//! refused), each owning what it must release.
//!
//! Context: process context; an object belongs to one thread at a time
//! (the race phase shares them by reference, read-only).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kvm_bindings::{kvm_run, kvm_userspace_memory_region};

use crate::ctx::{Arg, Call, Ctx};
use crate::ioctl_table::{nr, FdKind};
use crate::sys::{DeviceMapping, Errno};
use crate::{memcopy, scratch};

/// Adopts a descriptor an ioctl returned.
pub fn adopt(value: i64) -> Option<OwnedFd> {
    let fd = RawFd::try_from(value).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the device just returned `fd` as a new descriptor (KVM_CREATE_*,
    // KVM_GET_STATS_FD); nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A vCPU's kvm_run mapping (`MAP_SHARED` of the vCPU fd at offset 0,
/// KVM_GET_VCPU_MMAP_SIZE bytes).
pub struct RunPage {
    map: DeviceMapping,
}

/// Offsets in `struct kvm_run` (include/uapi/linux/kvm.h).
mod offset {
    pub const REQUEST_INTERRUPT_WINDOW: usize = 0;
    pub const IMMEDIATE_EXIT: usize = 1;
    /// The exit union.
    pub const EXIT: usize = 32;
    /// `mmio.data` in the exit union.
    pub const MMIO_DATA: usize = EXIT + 8;
    /// `kvm_valid_regs`, after the 256-byte union.
    pub const VALID_REGS: usize = EXIT + 256;
}

impl RunPage {
    /// Maps the kvm_run of vCPU `fd`.
    ///
    /// # Errors
    /// The errno of mmap.
    pub fn map(fd: RawFd, size: usize) -> Result<RunPage, Errno> {
        let map = DeviceMapping::new(
            fd,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        )?;
        Ok(RunPage { map })
    }

    /// The length of the mapping.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The address of `immediate_exit`, for the watchdog.
    pub fn immediate_exit_addr(&self) -> usize {
        self.map.addr() + offset::IMMEDIATE_EXIT
    }

    /// A copy of `struct kvm_run` as the device left it.
    ///
    /// # Errors
    /// EFAULT if the mapping cannot be read (the device broke it), EINVAL
    /// if it is smaller than the struct.
    pub fn snapshot(&self) -> Result<kvm_run, Errno> {
        let mut buf = vec![0u8; std::mem::size_of::<kvm_run>()];
        if buf.len() > self.map.len() {
            return Err(libc::EINVAL);
        }
        memcopy::read(self.map.addr(), &mut buf)?;
        Ok(scratch::from_bytes(&buf))
    }

    /// Writes `bytes` at `offset` of the mapping.
    ///
    /// # Errors
    /// EINVAL beyond the mapping; EFAULT if the device broke it.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), Errno> {
        match offset.checked_add(bytes.len()) {
            Some(end) if end <= self.map.len() => {}
            _ => return Err(libc::EINVAL),
        }
        // SAFETY: inside this vCPU's kvm_run mapping (checked above), which
        // holds no data of the fuzzer: only the device's and the VMM's
        // requests to it.
        unsafe { memcopy::write(self.map.addr() + offset, bytes) }
    }

    /// Sets `immediate_exit`.
    pub fn set_immediate_exit(&self, on: bool) {
        let _ = self.write(offset::IMMEDIATE_EXIT, &[u8::from(on)]);
    }

    /// Sets `request_interrupt_window`.
    pub fn set_request_interrupt_window(&self, on: bool) {
        let _ = self.write(offset::REQUEST_INTERRUPT_WINDOW, &[u8::from(on)]);
    }

    /// Answers an MMIO read: `data` into `mmio.data`.
    pub fn answer_mmio(&self, data: &[u8]) {
        let _ = self.write(offset::MMIO_DATA, &data[..data.len().min(8)]);
    }

    /// Asks for register synchronisation through kvm_run (api.rst 5,
    /// "kvm_valid_regs", "kvm_dirty_regs", "s.regs"): `valid` and `dirty`
    /// bit masks and the bytes of `struct kvm_sync_regs`, as a hostile VMM
    /// may write them.
    pub fn write_sync_regs(&self, valid: u64, dirty: u64, regs: &[u8]) {
        let _ = self.write(offset::VALID_REGS, &valid.to_le_bytes());
        let _ = self.write(offset::VALID_REGS + 8, &dirty.to_le_bytes());
        let _ = self.write(offset::VALID_REGS + 16, regs);
    }

    /// Clears `kvm_valid_regs` and `kvm_dirty_regs`.
    pub fn clear_sync_regs(&self) {
        let _ = self.write(offset::VALID_REGS, &[0; 16]);
    }
}

/// A vCPU.
pub struct Vcpu {
    /// The kvm_run mapping (declared first, so dropped before the fd).
    pub run: Option<RunPage>,
    /// Its statistics fds.
    pub stats: Vec<OwnedFd>,
    /// The fd.
    pub fd: OwnedFd,
}

impl Vcpu {
    /// The raw fd.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A memory slot as the fuzzer last set it.
#[derive(Clone, Copy, Debug)]
pub struct SlotInfo {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Userspace address.
    pub hva: u64,
}

/// A VM.
pub struct Vm {
    /// Its vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Its statistics fds.
    pub stats: Vec<OwnedFd>,
    /// The slots the device accepted, by slot number.
    pub slots: BTreeMap<u32, SlotInfo>,
    /// The fd.
    pub fd: OwnedFd,
    /// The id the next vCPU gets.
    pub next_vcpu_id: u64,
}

impl Vm {
    /// Creates a VM of type 0 through `ctx` on the system fd `sys`.
    pub fn create(ctx: &mut Ctx<'_>, sys: RawFd) -> Option<Vm> {
        let fd = adopt(
            ctx.ioctl(Call::new(
                sys,
                FdKind::System,
                nr::KVM_CREATE_VM,
                Arg::Int(0),
            ))
            .ok()?,
        )?;
        Some(Vm::adopt(fd))
    }

    /// A VM around an fd the device returned.
    pub fn adopt(fd: OwnedFd) -> Vm {
        Vm {
            vcpus: Vec::new(),
            stats: Vec::new(),
            slots: BTreeMap::new(),
            fd,
            next_vcpu_id: 0,
        }
    }

    /// The raw fd.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Creates vCPU `id` and maps its kvm_run; keeps it and returns its
    /// index.
    pub fn add_vcpu(&mut self, ctx: &mut Ctx<'_>, id: u64) -> Option<usize> {
        // Taken or not, the next try uses the next id (another path may
        // have created this one).
        self.next_vcpu_id = self.next_vcpu_id.max(id.wrapping_add(1));
        let fd = adopt(
            ctx.ioctl(Call::new(
                self.raw(),
                FdKind::Vm,
                nr::KVM_CREATE_VCPU,
                Arg::Int(id),
            ))
            .ok()?,
        )?;
        Some(self.adopt_vcpu(ctx, fd))
    }

    /// Keeps vCPU fd `fd` with its kvm_run mapped; returns its index.
    pub fn adopt_vcpu(&mut self, ctx: &mut Ctx<'_>, fd: OwnedFd) -> usize {
        let run = ctx.watched(
            "mmap of kvm_run",
            || "mmap of a new vCPU's kvm_run".into(),
            || RunPage::map(fd.as_raw_fd(), ctx.shared.dev.mmap_size),
        );
        ctx.tally.file_op("mmap kvm_run", run.is_ok());
        self.vcpus.push(Vcpu {
            run: run.ok(),
            stats: Vec::new(),
            fd,
        });
        self.vcpus.len() - 1
    }

    /// KVM_SET_USER_MEMORY_REGION; remembers the slot if the device took it.
    pub fn set_region(
        &mut self,
        ctx: &mut Ctx<'_>,
        r: kvm_userspace_memory_region,
    ) -> Result<i64, Errno> {
        let result = ctx.ioctl(Call::new(
            self.raw(),
            FdKind::Vm,
            nr::KVM_SET_USER_MEMORY_REGION,
            Arg::Data(scratch::bytes_of(&r)),
        ));
        if result.is_ok() {
            if r.memory_size == 0 {
                self.slots.remove(&r.slot);
            } else {
                self.slots.insert(
                    r.slot,
                    SlotInfo {
                        gpa: r.guest_phys_addr,
                        size: r.memory_size,
                        hva: r.userspace_addr,
                    },
                );
            }
        }
        result
    }
}
