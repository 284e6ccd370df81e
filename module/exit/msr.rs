//! RDMSR and WRMSR exits (no MSR bitmap: every access exits). rkvm emulates
//! the MSRs whose guest values the VMCS holds; every other MSR raises #GP,
//! as on a CPU without it (SDM Vol. 4 lists the architectural MSRs).
//! KVM_GET/SET_MSRS and the rest of the MSRs a guest boot needs come next.

use kernel::error::Result;
use x86::vmx::vmcs::guest;

use rkvm_core::cpu_state::GUEST_EFER_ALLOWED;

use super::{ExitAction, ExitContext};

/// The VMCS field holding a guest MSR, for the MSRs emulated so far.
fn vmcs_field(msr: u32) -> Option<u32> {
    use x86::msr::*;
    Some(match msr {
        IA32_EFER => guest::IA32_EFER_FULL,
        IA32_PAT => guest::IA32_PAT_FULL,
        IA32_SYSENTER_CS => guest::IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP => guest::IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP => guest::IA32_SYSENTER_EIP,
        IA32_FS_BASE => guest::FS_BASE,
        IA32_GS_BASE => guest::GS_BASE,
        _ => return None,
    })
}

/// RDMSR: ECX names the MSR; EDX:EAX receive it.
pub(crate) fn rdmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let msr = ctx.gprs.0[1] as u32;
    let Some(field) = vmcs_field(msr) else { return ctx.inject_gp() };
    let value = ctx.vmcs.read(field);
    ctx.gprs.0[0] = value & 0xffff_ffff;
    ctx.gprs.0[2] = value >> 32;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}

/// WRMSR: ECX names the MSR; EDX:EAX is the value.
pub(crate) fn wrmsr(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let msr = ctx.gprs.0[1] as u32;
    let value = (ctx.gprs.0[2] << 32) | (ctx.gprs.0[0] & 0xffff_ffff);
    let Some(field) = vmcs_field(msr) else { return ctx.inject_gp() };
    if msr == x86::msr::IA32_EFER {
        // LMA is read-only: it follows CR0.PG and LME (SDM Vol. 3A, 10.8.5).
        let current = ctx.vmcs.read(field);
        let lma = rkvm_core::cpu_state::efer::LMA;
        if value & !GUEST_EFER_ALLOWED != 0 || (value ^ current) & lma != 0 {
            return ctx.inject_gp();
        }
    }
    ctx.vmcs.write(field, value)?;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
