//! The device under test: its path, the system fd the fuzzer keeps open,
//! and what it says about itself before the fuzzing starts (the kvm_run
//! mapping size, the supported CPUID table, the MSR index list), which the
//! phases need to build valid-looking input.
//!
//! These setup calls are made once, outside the tallies, with the same
//! rule as every other call: arguments live in a scratch mapping.
//!
//! Context: process context, main thread, before the phases.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kvm_bindings::kvm_cpuid_entry2;

/// KVM_MAX_CPUID_ENTRIES (arch/x86/include/asm/kvm_host.h), as kvm-bindings
/// sizes its CpuId wrapper.
const KVM_MAX_CPUID_ENTRIES: usize = 256;

use crate::ioctl_table::nr;
use crate::scratch::{self, Scratch};
use crate::sys::{self, Errno};

/// The device and what it reported.
pub struct Device {
    /// The path given with `--dev`.
    pub path: String,
    sys: OwnedFd,
    /// KVM_GET_VCPU_MMAP_SIZE.
    pub mmap_size: usize,
    /// KVM_GET_SUPPORTED_CPUID's entries.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_MSR_INDEX_LIST (empty if the device refused it).
    pub msrs: Vec<u32>,
}

/// Opens `path` read-write with close-on-exec.
///
/// # Errors
/// The errno of open.
pub fn open(path: &str) -> Result<OwnedFd, Errno> {
    let c = CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: `c` is a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(sys::errno());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw ioctl whose pointer argument, if any, is in `scratch`.
fn scratch_ioctl(fd: RawFd, nr: u32, scratch: &Scratch, pointer: bool) -> Result<i64, Errno> {
    let arg = if pointer { scratch.addr(0) } else { 0 };
    // SAFETY: the argument is 0 or the scratch mapping, which holds no data
    // of the fuzzer.
    let (r, e) = unsafe { sys::ioctl(fd, nr, arg) };
    if r < 0 {
        Err(e)
    } else {
        Ok(r)
    }
}

impl Device {
    /// Opens the device and asks it about itself.
    ///
    /// # Errors
    /// A message: the device cannot be opened, or refuses what every VMM
    /// needs first (KVM_GET_VCPU_MMAP_SIZE, KVM_GET_SUPPORTED_CPUID).
    pub fn open(path: &str) -> Result<Device, String> {
        let sys =
            open(path).map_err(|e| format!("cannot open {path}: {}", crate::errno::name(e)))?;
        let mut s = Scratch::new().map_err(|e| format!("scratch mapping: errno {e}"))?;
        let fd = sys.as_raw_fd();
        let mmap_size = scratch_ioctl(fd, nr::KVM_GET_VCPU_MMAP_SIZE, &s, false)
            .map_err(|e| format!("KVM_GET_VCPU_MMAP_SIZE: {}", crate::errno::name(e)))?
            as usize;
        let cpuid = supported_cpuid(fd, &mut s)?;
        let msrs = msr_index_list(fd, &mut s);
        Ok(Device {
            path: path.to_string(),
            sys,
            mmap_size,
            cpuid,
            msrs,
        })
    }

    /// The system fd.
    pub fn fd(&self) -> RawFd {
        self.sys.as_raw_fd()
    }

    /// The supported CPUID table as a KVM_SET_CPUID2 argument.
    pub fn cpuid2_bytes(&self) -> Vec<u8> {
        cpuid2_bytes(&self.cpuid)
    }
}

/// `struct kvm_cpuid2` with `entries`.
pub fn cpuid2_bytes(entries: &[kvm_cpuid_entry2]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * 40);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        out.extend_from_slice(scratch::bytes_of(e));
    }
    out
}

fn supported_cpuid(fd: RawFd, s: &mut Scratch) -> Result<Vec<kvm_cpuid_entry2>, String> {
    let header = (KVM_MAX_CPUID_ENTRIES as u32).to_le_bytes();
    s.bytes_mut()[..4].copy_from_slice(&header);
    scratch_ioctl(fd, nr::KVM_GET_SUPPORTED_CPUID, s, true)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {}", crate::errno::name(e)))?;
    let b = s.bytes();
    let nent = (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).min(KVM_MAX_CPUID_ENTRIES);
    Ok((0..nent)
        .map(|i| scratch::from_bytes(&b[8 + 40 * i..8 + 40 * (i + 1)]))
        .collect())
}

fn msr_index_list(fd: RawFd, s: &mut Scratch) -> Vec<u32> {
    // A first call with room for none tells the count (E2BIG).
    s.bytes_mut()[..4].copy_from_slice(&0u32.to_le_bytes());
    let _ = scratch_ioctl(fd, nr::KVM_GET_MSR_INDEX_LIST, s, true);
    let b = s.bytes();
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]).min(4096);
    s.bytes_mut()[..4].copy_from_slice(&n.to_le_bytes());
    if scratch_ioctl(fd, nr::KVM_GET_MSR_INDEX_LIST, s, true).is_err() {
        return Vec::new();
    }
    let b = s.bytes();
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]).min(n) as usize;
    (0..n)
        .map(|i| u32::from_le_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]))
        .collect()
}
