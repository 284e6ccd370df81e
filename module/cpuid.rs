//! KVM_GET_SUPPORTED_CPUID (system fd) and KVM_SET_CPUID2 (vCPU fd): moving
//! `struct kvm_cpuid2` (a count, then `nent` entries) across the ABI. What
//! is offered and how the guest's CPUID is answered is in rkvm_core::cpuid.
//!
//! Context: process context; user memory moved only through UserSlice.

use kernel::alloc::{flags::GFP_KERNEL, KVec};
use kernel::error::{code::E2BIG, Result};
use kernel::uaccess::UserSlice;

use rkvm_core::cpuid::{self, Entry};

use crate::kvm_abi::kvm_cpuid_entry2;

/// The most entries a table may have (KVM's KVM_MAX_CPUID_ENTRIES).
pub(crate) const MAX_ENTRIES: u32 = 256;

/// Bytes before the entries: `nent` and padding.
const HEADER: usize = 8;

/// `nent`, read with the padding after it as KVM reads the header
/// (`copy_from_user` of the whole `struct kvm_cpuid2`): a header that runs
/// into an unmapped page is EFAULT although the padding is never used.
/// (rkvm-fuzz found rkvm reading 4 bytes where KVM reads 8.)
fn read_nent(arg: usize) -> Result<u32> {
    let header: u64 = UserSlice::new(arg, HEADER).reader().read()?;
    // The count is the low half (x86 is little-endian).
    Ok(header as u32)
}

fn to_abi(e: &Entry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        padding: [0; 3],
    }
}

fn host_cpuid(function: u32, index: u32) -> [u32; 4] {
    let r = x86::cpuid::native_cpuid::cpuid_count(function, index);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// KVM_GET_SUPPORTED_CPUID at user address `arg`.
///
/// # Errors
/// `E2BIG` if the caller's `nent` is too small (api.rst 4.46), `EFAULT`.
pub(crate) fn get_supported(arg: usize) -> Result<isize> {
    let mut entries = KVec::new();
    let max_basic = host_cpuid(0, 0)[0];
    let max_extended = host_cpuid(0x8000_0000, 0)[0];
    let xsave = crate::fpu::host_xcr0().is_some();
    for (function, index) in cpuid::leaves(max_basic, max_extended, xsave) {
        entries.push(cpuid::supported(function, index, host_cpuid(function, index), xsave), GFP_KERNEL)?;
    }
    entries.push(cpuid::hypervisor_leaf(), GFP_KERNEL)?;

    let nent = read_nent(arg)?;
    if (nent as usize) < entries.len() {
        return Err(E2BIG);
    }
    let size = HEADER + entries.len() * core::mem::size_of::<kvm_cpuid_entry2>();
    let mut out = UserSlice::new(arg, size).writer();
    out.write(&(entries.len() as u32))?;
    out.write(&0u32)?;
    for e in entries.iter() {
        out.write(&to_abi(e))?;
    }
    Ok(0)
}

/// KVM_SET_CPUID2 at user address `arg`: the table the guest's CPUID reads.
///
/// # Errors
/// `E2BIG` above [`MAX_ENTRIES`], `EFAULT`, `ENOMEM`.
pub(crate) fn read_table(arg: usize) -> Result<KVec<Entry>> {
    let nent = read_nent(arg)?;
    if nent > MAX_ENTRIES {
        return Err(E2BIG);
    }
    let size = HEADER + nent as usize * core::mem::size_of::<kvm_cpuid_entry2>();
    let mut reader = UserSlice::new(arg, size).reader();
    reader.skip(HEADER)?;
    let mut table = KVec::with_capacity(nent as usize, GFP_KERNEL)?;
    for _ in 0..nent {
        let e: kvm_cpuid_entry2 = reader.read()?;
        table.push(
            Entry { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx },
            GFP_KERNEL,
        )?;
    }
    Ok(table)
}
