//! RDMSR and WRMSR exits: the MSRs the bitmap does not pass through (and
//! all of them on a CPU without MSR bitmaps). What each MSR holds is
//! `rkvm_core::guest_msr`; an MSR the vCPU does not implement, or a value it
//! cannot hold, raises #GP(0), as on a CPU without it (SDM Vol. 4).
//!
//! During a run some guest values are live elsewhere, and are read and
//! written there: EFER, FS/GS.base and SYSENTER_* in the VMCS guest-state
//! area, the SYSCALL MSRs, KERNEL_GS_BASE and TSC_AUX in the MSR lists.

use kernel::error::Result;
use x86::msr;
use x86::vmx::vmcs::{control, guest};

use rkvm_core::cpu_state::{efer, GUEST_EFER_ALLOWED};
use rkvm_core::guest_msr::{canonical, Access};

use super::{ExitAction, ExitContext};
use crate::msrs::rdtsc;

/// The VMCS guest field holding MSR `index` during a run, if any.
fn vmcs_field(index: u32) -> Option<u32> {
    Some(match index {
        msr::IA32_EFER => guest::IA32_EFER_FULL,
        msr::IA32_FS_BASE => guest::FS_BASE,
        msr::IA32_GS_BASE => guest::GS_BASE,
        msr::IA32_SYSENTER_CS => guest::IA32_SYSENTER_CS,
        msr::IA32_SYSENTER_ESP => guest::IA32_SYSENTER_ESP,
        msr::IA32_SYSENTER_EIP => guest::IA32_SYSENTER_EIP,
        _ => return None,
    })
}

fn read(ctx: &mut ExitContext<'_, '_>, index: u32) -> Option<u64> {
    if let Some(field) = vmcs_field(index) {
        return Some(ctx.vmcs.read(field));
    }
    if let Some(value) = ctx.g.msr_area.guest(index) {
        return Some(value);
    }
    ctx.g.msrs.read(index, Access::Guest, rdtsc(), &ctx.g.msr_features).ok()
}

/// RDMSR: ECX names the MSR; EDX:EAX receive it.
pub(crate) fn rdmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let index = ctx.g.gprs.0[1] as u32;
    let Some(value) = read(ctx, index) else { return ctx.inject_gp() };
    ctx.g.gprs.0[0] = value & 0xffff_ffff;
    ctx.g.gprs.0[2] = value >> 32;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}

/// EFER: only the bits the vCPU supports; LMA is read-only (it follows
/// CR0.PG and LME, SDM Vol. 3A, 10.8.5), and LME cannot change while
/// paging is on.
fn write_efer(ctx: &mut ExitContext<'_, '_>, value: u64) -> Result<bool> {
    let old = ctx.vmcs.read(guest::IA32_EFER_FULL);
    let paging = crate::vmx::guest_state::guest_cr0(ctx.vmcs) & (1 << 31) != 0;
    if value & !GUEST_EFER_ALLOWED != 0
        || (value ^ old) & efer::LMA != 0
        || (paging && (value ^ old) & efer::LME != 0)
    {
        return Ok(false);
    }
    ctx.vmcs.write(guest::IA32_EFER_FULL, value)?;
    Ok(true)
}

fn write(ctx: &mut ExitContext<'_, '_>, index: u32, value: u64) -> Result<bool> {
    match index {
        msr::IA32_EFER => return write_efer(ctx, value),
        msr::IA32_FS_BASE | msr::IA32_GS_BASE => {
            if !canonical(value) {
                return Ok(false);
            }
            ctx.vmcs.write(vmcs_field(index).unwrap_or(guest::FS_BASE), value)?;
            return Ok(true);
        }
        _ => {}
    }
    let offset = ctx.g.msrs.tsc_offset;
    if ctx.g.msrs.write(index, value, Access::Guest, rdtsc(), &ctx.g.msr_features).is_err() {
        return Ok(false);
    }
    // Mirror the new value wherever the CPU uses it during the run.
    if let Some(field) = vmcs_field(index) {
        ctx.vmcs.write(field, value)?;
    }
    ctx.g.msr_area.set_guest(index, value);
    if index == msr::IA32_PAT {
        ctx.vmcs.write(guest::IA32_PAT_FULL, value)?;
    }
    if ctx.g.msrs.tsc_offset != offset && ctx.vcpu.vm.controls().tsc_offsetting() {
        ctx.vmcs.write(control::TSC_OFFSET_FULL, ctx.g.msrs.tsc_offset)?;
    }
    Ok(true)
}

/// WRMSR: ECX names the MSR; EDX:EAX is the value.
pub(crate) fn wrmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let index = ctx.g.gprs.0[1] as u32;
    let value = (ctx.g.gprs.0[2] << 32) | (ctx.g.gprs.0[0] & 0xffff_ffff);
    if !write(ctx, index, value)? {
        return ctx.inject_gp();
    }
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
