//! RDMSR and WRMSR exits (no MSR bitmap: every access exits). The MSRs are
//! those of msrs.rs; an MSR rkvm does not implement, or a value the MSR
//! cannot hold, raises #GP, as on a CPU without it (SDM Vol. 4).
//!
//! During a run the VMCS holds EFER, FS.base, GS.base, PAT, SYSENTER_* and
//! the TSC offset, and the MSR area the SYSCALL MSRs and KERNEL_GS_BASE, so
//! those are read and written there.

use kernel::error::Result;
use x86::msr;
use x86::vmx::vmcs::{control, guest};

use super::{ExitAction, ExitContext};
use crate::msrs;

/// The VMCS field holding MSR `index` during a run, if any.
fn vmcs_field(index: u32) -> Option<u32> {
    Some(match index {
        msr::IA32_EFER => guest::IA32_EFER_FULL,
        msr::IA32_FS_BASE => guest::FS_BASE,
        msr::IA32_GS_BASE => guest::GS_BASE,
        msr::IA32_PAT => guest::IA32_PAT_FULL,
        msr::IA32_SYSENTER_CS => guest::IA32_SYSENTER_CS,
        msr::IA32_SYSENTER_ESP => guest::IA32_SYSENTER_ESP,
        msr::IA32_SYSENTER_EIP => guest::IA32_SYSENTER_EIP,
        _ => return None,
    })
}

fn read(ctx: &ExitContext<'_, '_>, index: u32) -> Option<u64> {
    if !msrs::known(index) {
        return None;
    }
    match index {
        msr::IA32_TIME_STAMP_COUNTER => Some(msrs::rdtsc().wrapping_add(ctx.msrs.tsc_offset)),
        0x1b => Some(ctx.apic_base),
        _ => vmcs_field(index)
            .map(|f| ctx.vmcs.read(f))
            .or_else(|| ctx.msr_area.guest(index))
            .or_else(|| msrs::kept(ctx.msrs, index)),
    }
}

/// RDMSR: ECX names the MSR; EDX:EAX receive it.
pub(crate) fn rdmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let index = ctx.gprs.0[1] as u32;
    let Some(value) = read(ctx, index) else { return ctx.inject_gp() };
    ctx.gprs.0[0] = value & 0xffff_ffff;
    ctx.gprs.0[2] = value >> 32;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}

/// WRMSR: ECX names the MSR; EDX:EAX is the value.
pub(crate) fn wrmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let index = ctx.gprs.0[1] as u32;
    let value = (ctx.gprs.0[2] << 32) | (ctx.gprs.0[0] & 0xffff_ffff);
    // IA32_APIC_BASE stays read-only until the local APIC is emulated: a
    // guest write never reaches the host's APIC.
    if !msrs::known(index) || !msrs::valid(index, value) || index == 0x1b {
        return ctx.inject_gp();
    }
    if index == msr::IA32_EFER {
        // LMA is read-only: it follows CR0.PG and LME (SDM Vol. 3A, 10.8.5).
        let lma = rkvm_core::cpu_state::efer::LMA;
        if (value ^ ctx.vmcs.read(guest::IA32_EFER_FULL)) & lma != 0 {
            return ctx.inject_gp();
        }
    }
    if index == msr::IA32_TIME_STAMP_COUNTER {
        ctx.msrs.tsc_offset = value.wrapping_sub(msrs::rdtsc());
        if ctx.vcpu.vm.controls().tsc_offsetting() {
            ctx.vmcs.write(control::TSC_OFFSET_FULL, ctx.msrs.tsc_offset)?;
        }
    } else {
        if let Some(field) = vmcs_field(index) {
            ctx.vmcs.write(field, value)?;
        }
        // The SYSCALL MSRs and KERNEL_GS_BASE: loaded at the next entry.
        ctx.msr_area.set_guest(index, value);
        msrs::keep(ctx.msrs, index, value);
    }
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
