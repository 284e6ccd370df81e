//! Guest debugging for the VMM (KVM_SET_GUEST_DEBUG, api.rst 4.59), as KVM
//! does it on VMX:
//! - single-step: RFLAGS.TF is set in the guest when the VMM turns stepping
//!   on (and on KVM_SET_REGS while it is on) and #DB exits (exception bitmap
//!   bit 1); after each instruction the guest runs, the #DB trap exits and
//!   the VMM sees KVM_EXIT_DEBUG with the next RIP. As on KVM, delivering an
//!   exception or interrupt clears TF, so a handler runs unstepped until its
//!   IRET restores the flags.
//!   An instruction rkvm emulates or skips (CPUID, port I/O, MMIO...) does
//!   not trap on the CPU, so completing it is reported as a step too
//!   (`GuestState::instruction_done`), as KVM's `kvm_vcpu_do_singlestep`;
//! - software breakpoints: #BP exits (bitmap bit 3) and is reported with
//!   the RIP of the INT3, which the VMM may replace and resume.
//!
//! TF is hidden from KVM_GET_REGS while stepping (KVM hides it too); a
//! guest that reads its own RFLAGS with PUSHF sees it, as under KVM.
//! (`GuestState::regs` keeps the real value.)
//!
//! Context: VMCS loaded, preemption disabled.

use kernel::error::Result;
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::events::{BLOCKING_MOV_SS, BLOCKING_STI};

use super::{ExitAction, ExitContext};
use crate::kvm_abi::*;
use crate::vcpu::GuestState;
use crate::vmx::vmcs::LoadedVmcs;

/// RFLAGS.TF.
pub(crate) const RFLAGS_TF: u64 = 1 << 8;
/// DR6 bits that read as 1 (SDM Vol. 3B, 19.2.3), as KVM reports DR6.
const DR6_ACTIVE_LOW: u64 = 0xffff_0ff0;
/// DR6.BS: the #DB was a single-step trap.
const DR6_BS: u64 = 1 << 14;

/// At the start of a run: intercept #DB and #BP as the VMM asked, and #MC
/// always: a machine check while the guest runs is the host's, and without
/// the intercept the CPU would deliver it through the guest's IDT (SDM Vol.
/// 3C, 26.2; KVM intercepts it too).
pub(crate) fn load(vmcs: &mut LoadedVmcs<'_>, g: &GuestState) -> Result {
    const MC: u64 = 1 << 18;
    let mut bitmap = MC;
    if g.single_stepping() {
        bitmap |= 1 << 1;
    }
    if g.guest_debug & KVM_GUESTDBG_USE_SW_BP != 0 {
        bitmap |= 1 << 3;
    }
    vmcs.write(control::EXCEPTION_BITMAP, bitmap)
}

/// Before each entry while single-stepping: no STI or MOV SS shadow. With
/// TF set, such blocking makes VM entry demand a pending single-step trap
/// (BS, 26.3.1.5) that the step over STI has not raised yet; KVM's
/// `vmx_vcpu_run` drops the shadow instead, and so does rkvm, so that the
/// two step alike.
pub(crate) fn before_entry(vmcs: &mut LoadedVmcs<'_>, g: &GuestState) -> Result {
    if !g.single_stepping() {
        return Ok(());
    }
    let blocking = vmcs.read(guest::INTERRUPTIBILITY_STATE);
    if blocking as u32 & (BLOCKING_STI | BLOCKING_MOV_SS) != 0 {
        vmcs.write(guest::INTERRUPTIBILITY_STATE, blocking & !u64::from(BLOCKING_STI | BLOCKING_MOV_SS))?;
    }
    Ok(())
}

/// Fills `kvm_run` for KVM_EXIT_DEBUG: the exception, the linear address of
/// the guest's next instruction (CS base + RIP, as KVM's `pc`), DR6, DR7.
pub(crate) fn report(run: *mut kvm_run, exception: u32, pc: u64, dr6: u64, dr7: u64) {
    // SAFETY: our run page; the union member matches the exit reason.
    unsafe {
        (*run).exit_reason = KVM_EXIT_DEBUG;
        let arch = &mut (*run).__bindgen_anon_1.debug.arch;
        arch.exception = exception;
        arch.pad = 0;
        arch.pc = pc;
        arch.dr6 = dr6;
        arch.dr7 = dr7;
    }
}

/// A completed emulated instruction while stepping: KVM_EXIT_DEBUG as for
/// a single-step trap.
pub(crate) fn report_step(run: *mut kvm_run, g: &mut GuestState, cs_base: u64, rip: u64, dr7: u64) {
    g.step_done = false;
    report(run, 1, cs_base.wrapping_add(rip), DR6_ACTIVE_LOW | DR6_BS, dr7);
}

/// A #DB or #BP exit (only intercepted while the VMM debugs the guest).
pub(crate) fn exception(ctx: &mut ExitContext<'_, '_>, vector: u8) -> Result<ExitAction> {
    let pc = ctx.vmcs.read(guest::CS_BASE).wrapping_add(ctx.vmcs.read(guest::RIP));
    let dr7 = ctx.vmcs.read(guest::DR7);
    // For #DB the exit qualification holds the DR6 bits the exception
    // would have set (28.2.1).
    let dr6 = if vector == 1 { DR6_ACTIVE_LOW | ctx.vmcs.read(ro::EXIT_QUALIFICATION) } else { DR6_ACTIVE_LOW };
    ctx.g.step_done = false;
    report(ctx.run(), vector.into(), pc, dr6, dr7);
    Ok(ExitAction::ToUser)
}
