//! Control-register exits (SDM Vol. 3C, 26.1.3 and Table 28-3): MOV to CR0
//! or CR4 touching a bit the host owns (see vmx/guest_state.rs), CLTS, LMSW,
//! and MOV to/from CR8 (always exiting: the guest's TPR is virtual). Each is
//! emulated with the checks the CPU itself makes (SDM Vol. 3A, 2.5), raising
//! #GP in the guest where the CPU would.

use kernel::error::Result;
use x86::controlregs::{Cr0, Cr4};
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::cpu_state::{efer, GUEST_CR4_ALLOWED};
use rkvm_core::exit::CrAccess;

use super::{ExitAction, ExitContext};
use crate::kvm_abi::KVM_EXIT_SET_TPR;
use crate::vmx::guest_state::{guest_cr0, guest_cr4, hardware_cr0, hardware_cr4};

const PE: u64 = Cr0::CR0_PROTECTED_MODE.bits() as u64;
const PG: u64 = Cr0::CR0_ENABLE_PAGING.bits() as u64;
const CD: u64 = Cr0::CR0_CACHE_DISABLE.bits() as u64;
const NW: u64 = Cr0::CR0_NOT_WRITE_THROUGH.bits() as u64;
const TS: u64 = Cr0::CR0_TASK_SWITCHED.bits() as u64;
const PAE: u64 = Cr4::CR4_ENABLE_PAE.bits() as u64;
const OSXSAVE: u64 = Cr4::CR4_ENABLE_OS_XSAVE.bits() as u64;

/// MOV to CR0: #GP for reserved bits, PG without PE, NW without CD, or
/// paging with EFER.LME but not CR4.PAE; entering or leaving paging with
/// EFER.LME set switches IA-32e mode (EFER.LMA and the entry control).
fn set_cr0(ctx: &mut ExitContext<'_, '_>, value: u64) -> Result<ExitAction> {
    let guest_efer = ctx.vmcs.read(guest::IA32_EFER_FULL);
    if value >> 32 != 0
        || (value & PG != 0 && value & PE == 0)
        || (value & NW != 0 && value & CD == 0)
        || (value & PG != 0 && guest_efer & efer::LME != 0 && guest_cr4(ctx.vmcs) & PAE == 0)
    {
        return ctx.inject_gp();
    }
    let long_mode = value & PG != 0 && guest_efer & efer::LME != 0;
    let new_efer = if long_mode { guest_efer | efer::LMA } else { guest_efer & !efer::LMA };
    if new_efer != guest_efer {
        ctx.vmcs.write(guest::IA32_EFER_FULL, new_efer)?;
        let entry = ctx.vcpu.vm.controls().entry_for(long_mode);
        ctx.vmcs.write(control::VMENTRY_CONTROLS, entry.into())?;
    }
    ctx.vmcs.write(control::CR0_READ_SHADOW, value)?;
    ctx.vmcs.write(guest::CR0, hardware_cr0(value))?;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}

/// Whether the guest may set CR4.OSXSAVE: its CPUID offers XSAVE and the
/// host lets guests use it.
pub(crate) fn osxsave_allowed(cpuid: &[rkvm_core::cpuid::Entry]) -> bool {
    crate::fpu::host_xcr0().is_some() && rkvm_core::cpuid::lookup(cpuid, 1, 0)[2] & (1 << 26) != 0
}

/// MOV to CR4: #GP for bits the vCPU does not support (VMXE among them),
/// and for OSXSAVE unless the guest's CPUID offers XSAVE.
fn set_cr4(ctx: &mut ExitContext<'_, '_>, value: u64) -> Result<ExitAction> {
    if value & !GUEST_CR4_ALLOWED != 0 || (value & OSXSAVE != 0 && !osxsave_allowed(&ctx.g.cpuid)) {
        return ctx.inject_gp();
    }
    ctx.vmcs.write(control::CR4_READ_SHADOW, value)?;
    ctx.vmcs.write(guest::CR4, hardware_cr4(value))?;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}

/// MOV to CR8 (the TPR; 64-bit mode only, SDM Vol. 3A, 2.5 "Control
/// Registers"): #GP for any of bits 63:4 set, as the SDM says (KVM first
/// truncates the value to 8 bits, so it takes 0x100 as 0). There is no
/// local APIC in the kernel
/// to act on it, so as KVM without an in-kernel irqchip (handle_cr): a
/// lowered TPR may unmask an interrupt the VMM holds back, and the VMM
/// hears of it through KVM_EXIT_SET_TPR, after the instruction.
fn set_cr8(ctx: &mut ExitContext<'_, '_>, value: u64) -> Result<ExitAction> {
    if value >> 4 != 0 {
        return ctx.inject_gp();
    }
    let lowered = value < ctx.g.sregs.cr8;
    ctx.g.sregs.cr8 = value;
    ctx.skip_instruction()?;
    if !lowered {
        return Ok(ExitAction::Resume);
    }
    // SAFETY: our own run page; the VMM reads the reason after KVM_RUN.
    unsafe { (*ctx.run()).exit_reason = KVM_EXIT_SET_TPR };
    Ok(ExitAction::ToUser)
}

/// Handles a control-register access exit.
pub(crate) fn handle(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    match CrAccess::decode(ctx.vmcs.read(ro::EXIT_QUALIFICATION)) {
        CrAccess::MovTo { cr, gpr } => {
            // RSP is not among the saved registers: it is in the VMCS.
            let value = if gpr == 4 { ctx.vmcs.read(guest::RSP) } else { ctx.g.gprs.0[usize::from(gpr)] };
            match cr {
                0 => set_cr0(ctx, value),
                4 => set_cr4(ctx, value),
                8 => set_cr8(ctx, value),
                _ => ctx.inject_ud(),
            }
        }
        CrAccess::MovFrom { cr: 8, gpr } => {
            if gpr == 4 {
                ctx.vmcs.write(guest::RSP, ctx.g.sregs.cr8)?;
            } else {
                ctx.g.gprs.0[usize::from(gpr)] = ctx.g.sregs.cr8;
            }
            ctx.skip_instruction()?;
            Ok(ExitAction::Resume)
        }
        CrAccess::MovFrom { .. } => ctx.inject_ud(),
        CrAccess::Clts => {
            let cr0 = guest_cr0(ctx.vmcs) & !TS;
            set_cr0(ctx, cr0)
        }
        CrAccess::Lmsw { source } => {
            // LMSW loads CR0 bits 3:0 but cannot clear PE.
            let cr0 = guest_cr0(ctx.vmcs);
            let value = (cr0 & !0xe) | (u64::from(source) & 0xf);
            set_cr0(ctx, value)
        }
    }
}
