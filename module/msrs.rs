//! The guest MSRs a boot needs, readable and writable by the guest (RDMSR
//! and WRMSR exit: there is no MSR bitmap) and by the VMM (KVM_GET_MSRS and
//! KVM_SET_MSRS, api.rst 4.18-4.19).
//!
//! Where each lives:
//! - EFER, FS.base, GS.base: in `kvm_sregs` between runs, in the VMCS during
//!   one (the guest changes them without exits: CR0.PG sets EFER.LMA,
//!   segment loads set the bases);
//! - PAT, SYSENTER_CS/ESP/EIP: here, copied into the VMCS at every load and
//!   on every guest write (the CPU loads them at entry, SDM 27.3.2.1);
//! - TSC: the VMCS TSC offset (RDTSC runs without exits);
//! - STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE: here between runs, in the
//!   VM-entry/VM-exit MSR lists during one (vmx/msr_area.rs), so SYSCALL
//!   and SWAPGS in the guest use the guest's values and the host's are back
//!   at every exit;
//! - TSC_AUX: here only (a guest RDTSCP still reads the host's value).

use core::arch::asm;

use x86::msr;

use rkvm_core::cpu_state::GUEST_EFER_ALLOWED;

use crate::kvm_abi::kvm_sregs;

/// IA32_APIC_BASE (not in the `x86` crate's list under this name).
const IA32_APIC_BASE: u32 = 0x1b;

/// MSR values kept per vCPU.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub(crate) struct GuestMsrs {
    pub(crate) pat: u64,
    pub(crate) sysenter_cs: u64,
    pub(crate) sysenter_esp: u64,
    pub(crate) sysenter_eip: u64,
    pub(crate) star: u64,
    pub(crate) lstar: u64,
    pub(crate) cstar: u64,
    pub(crate) sfmask: u64,
    pub(crate) kernel_gs_base: u64,
    pub(crate) tsc_aux: u64,
    /// Guest TSC = host TSC + offset (SDM 26.6.5).
    pub(crate) tsc_offset: u64,
}

impl Default for GuestMsrs {
    fn default() -> Self {
        Self {
            // The power-up PAT: WB, WT, UC-, UC repeated (SDM Vol. 3A, 13.12.4).
            pat: 0x0007_0406_0007_0406,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            tsc_aux: 0,
            tsc_offset: 0,
        }
    }
}

/// The host's TSC.
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC at CPL 0 reads the time-stamp counter; no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Every byte of a PAT value must name a memory type: 0 (UC), 1 (WC),
/// 4 (WT), 5 (WP), 6 (WB) or 7 (UC-) (SDM Vol. 3A, 13.12.2).
fn valid_pat(value: u64) -> bool {
    value.to_le_bytes().iter().all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// A canonical 48-bit address (bits 63:47 all equal).
fn canonical(value: u64) -> bool {
    let top = value as i64 >> 47;
    top == 0 || top == -1
}

/// The MSRs KVM_GET_MSRS and KVM_SET_MSRS accept, and that RDMSR and WRMSR
/// reach; every other MSR is unknown (#GP for the guest).
pub(crate) fn known(index: u32) -> bool {
    matches!(
        index,
        msr::IA32_EFER
            | msr::IA32_FS_BASE
            | msr::IA32_GS_BASE
            | msr::IA32_PAT
            | msr::IA32_SYSENTER_CS
            | msr::IA32_SYSENTER_ESP
            | msr::IA32_SYSENTER_EIP
            | msr::IA32_STAR
            | msr::IA32_LSTAR
            | msr::IA32_CSTAR
            | msr::IA32_FMASK
            | msr::IA32_KERNEL_GSBASE
            | msr::IA32_TSC_AUX
            | msr::IA32_TIME_STAMP_COUNTER
            | IA32_APIC_BASE
    )
}

/// Reads MSR `index` from the state kept between runs.
pub(crate) fn get(msrs: &GuestMsrs, sregs: &kvm_sregs, index: u32) -> Option<u64> {
    Some(match index {
        msr::IA32_EFER => sregs.efer,
        msr::IA32_FS_BASE => sregs.fs.base,
        msr::IA32_GS_BASE => sregs.gs.base,
        IA32_APIC_BASE => sregs.apic_base,
        msr::IA32_TIME_STAMP_COUNTER => rdtsc().wrapping_add(msrs.tsc_offset),
        _ => *field(msrs, index)?,
    })
}

/// The field of `msrs` holding MSR `index`, for those kept only here.
fn field(msrs: &GuestMsrs, index: u32) -> Option<&u64> {
    Some(match index {
        msr::IA32_PAT => &msrs.pat,
        msr::IA32_SYSENTER_CS => &msrs.sysenter_cs,
        msr::IA32_SYSENTER_ESP => &msrs.sysenter_esp,
        msr::IA32_SYSENTER_EIP => &msrs.sysenter_eip,
        msr::IA32_STAR => &msrs.star,
        msr::IA32_LSTAR => &msrs.lstar,
        msr::IA32_CSTAR => &msrs.cstar,
        msr::IA32_FMASK => &msrs.sfmask,
        msr::IA32_KERNEL_GSBASE => &msrs.kernel_gs_base,
        msr::IA32_TSC_AUX => &msrs.tsc_aux,
        _ => return None,
    })
}

fn field_mut(msrs: &mut GuestMsrs, index: u32) -> Option<&mut u64> {
    Some(match index {
        msr::IA32_PAT => &mut msrs.pat,
        msr::IA32_SYSENTER_CS => &mut msrs.sysenter_cs,
        msr::IA32_SYSENTER_ESP => &mut msrs.sysenter_esp,
        msr::IA32_SYSENTER_EIP => &mut msrs.sysenter_eip,
        msr::IA32_STAR => &mut msrs.star,
        msr::IA32_LSTAR => &mut msrs.lstar,
        msr::IA32_CSTAR => &mut msrs.cstar,
        msr::IA32_FMASK => &mut msrs.sfmask,
        msr::IA32_KERNEL_GSBASE => &mut msrs.kernel_gs_base,
        msr::IA32_TSC_AUX => &mut msrs.tsc_aux,
        _ => return None,
    })
}

/// Whether `value` is a value MSR `index` can hold (what WRMSR would #GP
/// on). EFER's LMA is checked by the callers, which know the paging state.
pub(crate) fn valid(index: u32, value: u64) -> bool {
    match index {
        msr::IA32_EFER => value & !GUEST_EFER_ALLOWED == 0,
        msr::IA32_PAT => valid_pat(value),
        msr::IA32_FS_BASE | msr::IA32_GS_BASE | msr::IA32_KERNEL_GSBASE | msr::IA32_LSTAR | msr::IA32_CSTAR
        | msr::IA32_SYSENTER_ESP | msr::IA32_SYSENTER_EIP => canonical(value),
        msr::IA32_TSC_AUX => value >> 32 == 0,
        _ => true,
    }
}

/// Writes MSR `index` into the state kept between runs (KVM_SET_MSRS).
/// Returns false for an unknown MSR or a value it cannot hold.
pub(crate) fn set(msrs: &mut GuestMsrs, sregs: &mut kvm_sregs, index: u32, value: u64) -> bool {
    if !known(index) || !valid(index, value) {
        return false;
    }
    match index {
        msr::IA32_EFER => sregs.efer = value,
        msr::IA32_FS_BASE => sregs.fs.base = value,
        msr::IA32_GS_BASE => sregs.gs.base = value,
        IA32_APIC_BASE => sregs.apic_base = value,
        msr::IA32_TIME_STAMP_COUNTER => msrs.tsc_offset = value.wrapping_sub(rdtsc()),
        _ => match field_mut(msrs, index) {
            Some(f) => *f = value,
            None => return false,
        },
    }
    true
}

/// The value kept here for an MSR that is neither in `kvm_sregs` nor the
/// TSC (for the exit handler).
pub(crate) fn kept(msrs: &GuestMsrs, index: u32) -> Option<u64> {
    field(msrs, index).copied()
}

/// Stores an MSR kept here (for the exit handler).
pub(crate) fn keep(msrs: &mut GuestMsrs, index: u32, value: u64) -> bool {
    match field_mut(msrs, index) {
        Some(f) => {
            *f = value;
            true
        }
        None => false,
    }
}
