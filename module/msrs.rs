//! The guest's MSRs between runs, for KVM_GET_MSRS and KVM_SET_MSRS
//! (api.rst 4.18-4.19), KVM_GET_MSR_INDEX_LIST (4.3), and the per-vCPU MSR
//! bitmap. What each MSR holds and accepts is `rkvm_core::guest_msr`.
//!
//! Where each lives:
//! - EFER, FS.base, GS.base: in `kvm_sregs` between runs, in the VMCS during
//!   one (the guest changes them without exits: CR0.PG sets EFER.LMA,
//!   segment loads and WRFSBASE set the bases);
//! - IA32_APIC_BASE: in `GuestMsrs` (`kvm_sregs.apic_base` is a copy made
//!   for KVM_GET_SREGS);
//! - PAT, SYSENTER_*: in `GuestMsrs`, copied into the VMCS at every load
//!   (the CPU loads them at entry, SDM 27.3.2.1) and back after the run;
//! - TSC: the VMCS TSC offset (RDTSC and RDTSCP run without exits);
//! - STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, TSC_AUX: in `GuestMsrs`
//!   between runs, in the VM-entry/VM-exit MSR lists during one
//!   (vmx/msr_area.rs), so SYSCALL, SWAPGS and RDTSCP use the guest's values
//!   and the host's are back at every exit.
//!
//! Context: process context, the vCPU mutex held.

use core::arch::asm;

use kernel::error::{code::E2BIG, Result};
use kernel::uaccess::UserSlice;
use x86::msr;

use rkvm_core::cpu_state::GUEST_EFER_ALLOWED;
use rkvm_core::guest_msr::{self, Access, GuestMsrs, MsrBitmap, MsrFeatures};

use crate::kvm_abi::kvm_sregs;
use crate::mm::Page;

/// The host's TSC.
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC at CPL 0 reads the time-stamp counter; no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// KVM_GET_MSRS for one MSR.
pub(crate) fn get(m: &mut GuestMsrs, sregs: &kvm_sregs, f: &MsrFeatures, index: u32) -> Option<u64> {
    match index {
        msr::IA32_EFER => Some(sregs.efer),
        msr::IA32_FS_BASE => Some(sregs.fs.base),
        msr::IA32_GS_BASE => Some(sregs.gs.base),
        _ => m.read(index, Access::Host, rdtsc(), f).ok(),
    }
}

/// KVM_SET_MSRS for one MSR; false if the MSR is unknown or refuses the
/// value. EFER's LMA is the VMM's to set, as in KVM_SET_SREGS.
pub(crate) fn set(m: &mut GuestMsrs, sregs: &mut kvm_sregs, f: &MsrFeatures, index: u32, value: u64) -> bool {
    match index {
        msr::IA32_EFER if value & !GUEST_EFER_ALLOWED == 0 => sregs.efer = value,
        msr::IA32_FS_BASE if guest_msr::canonical(value) => sregs.fs.base = value,
        msr::IA32_GS_BASE if guest_msr::canonical(value) => sregs.gs.base = value,
        msr::IA32_EFER | msr::IA32_FS_BASE | msr::IA32_GS_BASE => return false,
        _ => {
            if m.write(index, value, Access::Host, rdtsc(), f).is_err() {
                return false;
            }
            sregs.apic_base = m.apic_base;
        }
    }
    true
}

/// KVM_GET_MSR_INDEX_LIST at user address `arg`: `struct kvm_msr_list`, a
/// count the caller sets to its room, then the indices.
///
/// # Errors
/// `E2BIG` (with the needed count written back) if the room is too small;
/// `EFAULT`.
pub(crate) fn get_index_list(arg: usize) -> Result<isize> {
    let room: u32 = UserSlice::new(arg, 4).reader().read()?;
    let count = guest_msr::index_list().count() as u32;
    UserSlice::new(arg, 4).writer().write(&count)?;
    if room < count {
        return Err(E2BIG);
    }
    let mut out = UserSlice::new(arg + 4, count as usize * 4).writer();
    for index in guest_msr::index_list() {
        out.write(&index)?;
    }
    Ok(0)
}

/// A vCPU's MSR bitmap page: everything exits except the MSRs the CPU
/// switches itself (`guest_msr::PASS_THROUGH`); TSC_AUX only when the
/// guest has RDTSCP and the MSR lists switch it, so that an RDMSR of it
/// otherwise exits and raises #GP.
pub(crate) fn build_bitmap(page: &mut Page, tsc_aux_switched: bool, f: &MsrFeatures) {
    let mut bitmap = MsrBitmap(page.as_mut_bytes());
    bitmap.exit_all();
    for index in guest_msr::PASS_THROUGH {
        if index != msr::IA32_TSC_AUX || (tsc_aux_switched && f.rdtscp) {
            bitmap.pass_through(index);
        }
    }
}
