//! Event injection (SDM Vol. 3C, 27.6 "Event Injection"):
//! - an event whose delivery an exit interrupted (IDT-vectoring information,
//!   28.2.4) is injected again at the next entry, so it is not lost;
//! - an NMI queued by KVM_NMI is injected when NMIs are not blocked, with
//!   NMI-window exiting until then;
//! - an external interrupt queued by KVM_INTERRUPT is injected when the
//!   guest can take it (RFLAGS.IF set, no STI or MOV SS blocking: 26.3.1.5);
//!   until then interrupt-window exiting (26.7.5) brings the loop back as
//!   soon as it can;
//! - KVM_RUN's `request_interrupt_window` asks for that window too, and the
//!   VMM then sees KVM_EXIT_IRQ_WINDOW_OPEN; `if_flag` and
//!   `ready_for_interrupt_injection` tell it where the guest stands.
//!
//! - between runs all of it is in `rkvm_core::events::EventState`, which
//!   KVM_GET/SET_VCPU_EVENTS read and write.
//!
//! Context: VMCS loaded, preemption disabled.

use kernel::error::Result;
use x86::vmx::vmcs::control::PrimaryControls;
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::events::{accepts_interrupt, EventState, BLOCKING_MOV_SS, BLOCKING_NMI, BLOCKING_STI};
use rkvm_core::exit::InterruptionInfo;

use super::vmcs::LoadedVmcs;

/// Whether the guest accepts an external interrupt now.
pub(crate) fn interruptible(vmcs: &LoadedVmcs<'_>) -> bool {
    accepts_interrupt(vmcs.read(guest::RFLAGS), vmcs.read(guest::INTERRUPTIBILITY_STATE) as u32)
}

/// Whether the guest accepts an NMI now (as KVM: not while NMIs are
/// blocked, nor in an STI or MOV SS shadow; 26.3.1.5).
fn nmi_allowed(vmcs: &LoadedVmcs<'_>) -> bool {
    vmcs.read(guest::INTERRUPTIBILITY_STATE) as u32 & (BLOCKING_STI | BLOCKING_MOV_SS | BLOCKING_NMI) == 0
}

/// Whether the next entry already injects an event.
fn entry_event_pending(vmcs: &LoadedVmcs<'_>) -> bool {
    InterruptionInfo(vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32).valid()
}

/// Before a run: the events kept between runs into the VMCS. `cr0` is the
/// guest's: in real mode an exception is delivered without its error code
/// (26.2.1.3 refuses one there; KVM drops it too).
pub(crate) fn load(vmcs: &mut LoadedVmcs<'_>, e: &EventState, cr0: u64) -> Result {
    let deliver_error_code = 1 << 11;
    let info = if cr0 & 1 == 0 { e.entry_info & !deliver_error_code } else { e.entry_info };
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.into())?;
    // Bits 31:16 of the error code must be 0 for VM entry (26.2.1.3),
    // though KVM's ABI carries 32 bits: dropped, as KVM does, so that a
    // VMM's value cannot make every entry fail.
    vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, (e.error_code & 0xffff).into())?;
    vmcs.write(control::VMENTRY_INSTRUCTION_LEN, e.instruction_len.into())?;
    vmcs.write(guest::INTERRUPTIBILITY_STATE, e.interruptibility.into())
}

/// After a run: what is still to be injected and the blocking state.
pub(crate) fn save(vmcs: &LoadedVmcs<'_>, e: &mut EventState) {
    e.entry_info = vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32;
    e.error_code = vmcs.read(control::VMENTRY_EXCEPTION_ERR_CODE) as u32;
    e.instruction_len = vmcs.read(control::VMENTRY_INSTRUCTION_LEN) as u32;
    e.interruptibility = vmcs.read(guest::INTERRUPTIBILITY_STATE) as u32;
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

/// Sets the window-exiting controls in `mask` to `wanted` (bits outside the
/// mask untouched): one VMREAD, and a VMWRITE only on change, per entry.
fn set_window_exiting(vmcs: &mut LoadedVmcs<'_>, mask: PrimaryControls, wanted: PrimaryControls) -> Result {
    let current = vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    let value = (current & !u64::from(mask.bits())) | u64::from(wanted.bits());
    if value != current {
        vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, value)?;
    }
    Ok(())
}

/// Before an entry: inject a queued NMI, else the queued interrupt, if the
/// guest can take it; otherwise ask for an NMI-window (with virtual NMIs,
/// 26.7.6) or interrupt-window exit (26.7.5), which brings the loop back as
/// soon as it can. The interrupt window is also opened if the VMM asked.
pub(crate) fn prepare_entry(vmcs: &mut LoadedVmcs<'_>, e: &mut EventState, request_window: bool, virtual_nmis: bool) -> Result {
    if e.nmi_pending && !entry_event_pending(vmcs) && nmi_allowed(vmcs) {
        let info = InterruptionInfo::new(2, InterruptionInfo::NMI, false);
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.0.into())?;
        e.nmi_pending = false;
    }
    if let Some(vector) = e.pending_irq {
        if !entry_event_pending(vmcs) && interruptible(vmcs) {
            let info = InterruptionInfo::new(vector, InterruptionInfo::EXTERNAL, false);
            vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.0.into())?;
            e.pending_irq = None;
        }
    }
    let mut mask = PrimaryControls::INTERRUPT_WINDOW_EXITING;
    let mut wanted = PrimaryControls::empty();
    if e.pending_irq.is_some() || request_window {
        wanted |= PrimaryControls::INTERRUPT_WINDOW_EXITING;
    }
    if virtual_nmis {
        mask |= PrimaryControls::NMI_WINDOW_EXITING;
        if e.nmi_pending {
            wanted |= PrimaryControls::NMI_WINDOW_EXITING;
        }
    }
    set_window_exiting(vmcs, mask, wanted)
}

