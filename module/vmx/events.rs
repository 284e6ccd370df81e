//! Event injection (SDM Vol. 3C, 27.6 "Event Injection"):
//! - an event whose delivery an exit interrupted (IDT-vectoring information,
//!   28.2.4) is injected again at the next entry, so it is not lost;
//! - an external interrupt queued by KVM_INTERRUPT is injected when the
//!   guest can take it (RFLAGS.IF set, no STI or MOV SS blocking: 26.3.1.5);
//!   until then interrupt-window exiting (26.7.5) brings the loop back as
//!   soon as it can;
//! - KVM_RUN's `request_interrupt_window` asks for that window too, and the
//!   VMM then sees KVM_EXIT_IRQ_WINDOW_OPEN; `if_flag` and
//!   `ready_for_interrupt_injection` tell it where the guest stands.
//!
//! Context: VMCS loaded, preemption disabled.

use kernel::error::Result;
use x86::vmx::vmcs::control::PrimaryControls;
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::exit::InterruptionInfo;

use super::vmcs::LoadedVmcs;

const RFLAGS_IF: u64 = 1 << 9;
/// Interruptibility state: blocking by STI (bit 0) or MOV SS (bit 1).
const BLOCKING_STI_MOVSS: u64 = 3;

/// Whether the guest accepts an external interrupt now.
pub(crate) fn interruptible(vmcs: &LoadedVmcs<'_>) -> bool {
    vmcs.read(guest::RFLAGS) & RFLAGS_IF != 0 && vmcs.read(guest::INTERRUPTIBILITY_STATE) & BLOCKING_STI_MOVSS == 0
}

/// Whether the next entry already injects an event.
fn entry_event_pending(vmcs: &LoadedVmcs<'_>) -> bool {
    InterruptionInfo(vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32).valid()
}

/// After an exit: re-inject the event it interrupted, if any (bit 12, "NMI
/// unblocking due to IRET", is not part of the entry format and is dropped).
pub(crate) fn reinject_vectored_event(vmcs: &mut LoadedVmcs<'_>) -> Result {
    let info = vmcs.read(ro::IDT_VECTORING_INFO) as u32;
    if !InterruptionInfo(info).valid() {
        return Ok(());
    }
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, (info & !(1 << 12)).into())?;
    if info & (1 << 11) != 0 {
        let code = vmcs.read(ro::IDT_VECTORING_ERR_CODE);
        vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, code)?;
    }
    // Software interrupts and exceptions need the instruction length.
    let len = vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
    vmcs.write(control::VMENTRY_INSTRUCTION_LEN, len)
}

fn set_window_exiting(vmcs: &mut LoadedVmcs<'_>, on: bool) -> Result {
    let bit = u64::from(PrimaryControls::INTERRUPT_WINDOW_EXITING.bits());
    let current = vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    let wanted = if on { current | bit } else { current & !bit };
    if wanted != current {
        vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, wanted)?;
    }
    Ok(())
}

/// Before an entry: inject the queued interrupt if the guest can take it,
/// else ask for an interrupt-window exit; ask for one as well if the VMM
/// requested the window.
pub(crate) fn prepare_entry(vmcs: &mut LoadedVmcs<'_>, pending_irq: &mut Option<u8>, request_window: bool) -> Result {
    if let Some(vector) = *pending_irq {
        if !entry_event_pending(vmcs) && interruptible(vmcs) {
            let info = InterruptionInfo::new(vector, InterruptionInfo::EXTERNAL, false);
            vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.0.into())?;
            *pending_irq = None;
        }
    }
    set_window_exiting(vmcs, pending_irq.is_some() || request_window)
}

/// `kvm_run.if_flag` and `ready_for_interrupt_injection` for the VMM.
pub(crate) fn status(vmcs: &LoadedVmcs<'_>, pending_irq: Option<u8>) -> (bool, bool) {
    let if_flag = vmcs.read(guest::RFLAGS) & RFLAGS_IF != 0;
    (if_flag, pending_irq.is_none() && !entry_event_pending(vmcs) && interruptible(vmcs))
}
