//! A vCPU's pending and injected events between runs, and their exchange
//! with the VMM through KVM_GET_VCPU_EVENTS and KVM_SET_VCPU_EVENTS
//! (api.rst 4.31-4.32).
//!
//! Between runs the events are the VMX fields that carry them (SDM Vol. 3C,
//! 25.4.2 interruptibility state, 25.8.3 VM-entry event injection) plus
//! what KVM_INTERRUPT and KVM_NMI queued; `VcpuEvents` is the subset of
//! `struct kvm_vcpu_events` rkvm implements (no SMM, no exception
//! payloads, no SIPI: one vCPU model without those).

use crate::exit::InterruptionInfo;

/// Interruptibility state: blocking by STI.
pub const BLOCKING_STI: u32 = 1 << 0;
/// Blocking by MOV SS.
pub const BLOCKING_MOV_SS: u32 = 1 << 1;
/// Blocking by NMI.
pub const BLOCKING_NMI: u32 = 1 << 3;

/// Event type: software interrupt (INT n).
pub const SOFTWARE_INTERRUPT: u32 = 4;
/// Event type: privileged software exception (INT1).
pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
/// Event type: software exception (INT3, INTO).
pub const SOFTWARE_EXCEPTION: u32 = 6;

/// `kvm_vcpu_events.flags` bits (uapi kvm.h).
pub mod flags {
    #![allow(missing_docs)]
    pub const NMI_PENDING: u32 = 0x1;
    pub const SIPI_VECTOR: u32 = 0x2;
    pub const SHADOW: u32 = 0x4;
    pub const SMM: u32 = 0x8;
    pub const PAYLOAD: u32 = 0x10;
    pub const TRIPLE_FAULT: u32 = 0x20;
}

/// KVM's interrupt-shadow bits (`interrupt.shadow`): note the order differs
/// from the VMX interruptibility state.
const KVM_SHADOW_MOV_SS: u8 = 1;
const KVM_SHADOW_STI: u8 = 2;

/// The event state kept per vCPU between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventState {
    /// VM-entry interruption-information field: an event the next entry
    /// delivers (valid bit set), e.g. one an exit interrupted.
    pub entry_info: u32,
    /// Its error code.
    pub error_code: u32,
    /// Its instruction length (software interrupts and exceptions).
    pub instruction_len: u32,
    /// Guest interruptibility state.
    pub interruptibility: u32,
    /// An external interrupt queued by KVM_INTERRUPT, delivered when the
    /// guest can take it.
    pub pending_irq: Option<u8>,
    /// An NMI queued by KVM_NMI.
    pub nmi_pending: bool,
}

/// The fields of `struct kvm_vcpu_events` rkvm reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: bool,
    pub exception_nr: u8,
    pub exception_has_error_code: bool,
    pub exception_pending: bool,
    pub exception_error_code: u32,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub interrupt_soft: bool,
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    pub nmi_masked: bool,
    pub flags: u32,
    /// `smi.smm` and `smi.pending`: SMM is not implemented.
    pub smm: bool,
    pub smi_pending: bool,
}

/// Why KVM_SET_VCPU_EVENTS is refused (EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidEvents {
    /// Unknown flags, or ones naming features rkvm lacks (payloads,
    /// triple-fault events).
    Flags,
    /// An exception vector above 31, or 2 (NMI is not an exception).
    ExceptionVector,
    /// SMM state: rkvm has no SMM.
    Smm,
}

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;

/// Whether a guest with `rflags` and guest interruptibility state
/// `interruptibility` takes an external interrupt now: IF set, no STI or
/// MOV SS shadow (SDM Vol. 3C, 26.3.1.5).
pub fn accepts_interrupt(rflags: u64, interruptibility: u32) -> bool {
    rflags & RFLAGS_IF != 0 && interruptibility & (BLOCKING_STI | BLOCKING_MOV_SS) == 0
}

impl EventState {
    /// `kvm_run.ready_for_interrupt_injection` for a guest with `rflags`:
    /// KVM_INTERRUPT may queue a vector now, because none is queued, no
    /// event rides on the next entry and the guest takes interrupts
    /// ([`accepts_interrupt`]). KVM reports it on
    /// every return from KVM_RUN, an interrupted one included
    /// (`post_kvm_run_save`); a VMM that saw a stale 1 would acknowledge a
    /// second interrupt at its PIC and replace the queued one, which would
    /// then never be delivered nor end.
    pub fn ready_for_interrupt(&self, rflags: u64) -> bool {
        self.pending_irq.is_none()
            && !InterruptionInfo(self.entry_info).valid()
            && accepts_interrupt(rflags, self.interruptibility)
    }

    /// KVM_GET_VCPU_EVENTS.
    pub fn to_kvm(&self) -> VcpuEvents {
        let info = InterruptionInfo(self.entry_info);
        let kind = info.kind();
        let mut e = VcpuEvents {
            flags: flags::NMI_PENDING | flags::SHADOW | flags::SMM,
            nmi_pending: self.nmi_pending,
            nmi_masked: self.interruptibility & BLOCKING_NMI != 0,
            ..Default::default()
        };
        if self.interruptibility & BLOCKING_STI != 0 {
            e.interrupt_shadow |= KVM_SHADOW_STI;
        }
        if self.interruptibility & BLOCKING_MOV_SS != 0 {
            e.interrupt_shadow |= KVM_SHADOW_MOV_SS;
        }
        if info.valid() {
            match kind {
                InterruptionInfo::HARDWARE_EXCEPTION | PRIVILEGED_SOFTWARE_EXCEPTION | SOFTWARE_EXCEPTION => {
                    e.exception_injected = true;
                    e.exception_nr = info.vector();
                    e.exception_has_error_code = self.entry_info & (1 << 11) != 0;
                    e.exception_error_code = self.error_code;
                }
                InterruptionInfo::NMI => e.nmi_injected = true,
                _ => {
                    e.interrupt_injected = true;
                    e.interrupt_nr = info.vector();
                    e.interrupt_soft = kind == SOFTWARE_INTERRUPT;
                }
            }
        }
        // As KVM without an in-kernel irqchip: KVM_INTERRUPT's vector is
        // the injected interrupt.
        if let (false, Some(v)) = (e.interrupt_injected, self.pending_irq) {
            e.interrupt_injected = true;
            e.interrupt_nr = v;
        }
        e
    }

    /// KVM_SET_VCPU_EVENTS. One event can ride on the next entry: an
    /// exception first, then an interrupt or NMI; an external interrupt
    /// that does not fit waits as KVM_INTERRUPT's does, an NMI becomes
    /// pending.
    ///
    /// # Errors
    /// [`InvalidEvents`], leaving the state unchanged.
    pub fn set_from_kvm(&mut self, e: &VcpuEvents) -> Result<(), InvalidEvents> {
        let known = flags::NMI_PENDING | flags::SIPI_VECTOR | flags::SHADOW | flags::SMM;
        if e.flags & !known != 0 {
            return Err(InvalidEvents::Flags);
        }
        if (e.exception_injected || e.exception_pending) && (e.exception_nr > 31 || e.exception_nr == 2) {
            return Err(InvalidEvents::ExceptionVector);
        }
        if e.flags & flags::SMM != 0 && (e.smm || e.smi_pending) {
            return Err(InvalidEvents::Smm);
        }
        let mut next = EventState { entry_info: 0, error_code: 0, pending_irq: None, ..*self };
        if e.exception_injected || e.exception_pending {
            // #BP and #OF come from INT3 and INTO: software exceptions,
            // which need the instruction length (kept from the last exit).
            let kind = if matches!(e.exception_nr, 3 | 4) { SOFTWARE_EXCEPTION } else { InterruptionInfo::HARDWARE_EXCEPTION };
            next.entry_info = InterruptionInfo::new(e.exception_nr, kind, e.exception_has_error_code).0;
            next.error_code = e.exception_error_code;
        }
        if e.interrupt_injected {
            if e.interrupt_soft && next.entry_info == 0 {
                next.entry_info = InterruptionInfo::new(e.interrupt_nr, SOFTWARE_INTERRUPT, false).0;
            } else if !e.interrupt_soft {
                next.pending_irq = Some(e.interrupt_nr);
            }
        }
        let mut nmi_pending = e.flags & flags::NMI_PENDING != 0 && e.nmi_pending;
        if e.flags & flags::NMI_PENDING == 0 {
            nmi_pending = self.nmi_pending;
        }
        if e.nmi_injected {
            if next.entry_info == 0 {
                next.entry_info = InterruptionInfo::new(2, InterruptionInfo::NMI, false).0;
            } else {
                nmi_pending = true;
            }
        }
        next.nmi_pending = nmi_pending;
        next.interruptibility &= !BLOCKING_NMI;
        if e.nmi_masked {
            next.interruptibility |= BLOCKING_NMI;
        }
        if e.flags & flags::SHADOW != 0 {
            next.interruptibility &= !(BLOCKING_STI | BLOCKING_MOV_SS);
            if e.interrupt_shadow & KVM_SHADOW_STI != 0 {
                next.interruptibility |= BLOCKING_STI;
            }
            if e.interrupt_shadow & KVM_SHADOW_MOV_SS != 0 {
                next.interruptibility |= BLOCKING_MOV_SS;
            }
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_interrupt_reads_back_as_injected_as_in_kvm() {
        let s = EventState { pending_irq: Some(0x30), ..Default::default() };
        let e = s.to_kvm();
        assert!(e.interrupt_injected && !e.interrupt_soft);
        assert_eq!(e.interrupt_nr, 0x30);
        assert_eq!(e.flags, flags::NMI_PENDING | flags::SHADOW | flags::SMM);
    }

    #[test]
    fn events_round_trip() {
        let mut s = EventState::default();
        let e = VcpuEvents {
            exception_injected: true,
            exception_nr: 13,
            exception_has_error_code: true,
            exception_error_code: 0x18,
            interrupt_injected: true,
            interrupt_nr: 0x21,
            interrupt_shadow: KVM_SHADOW_STI,
            nmi_pending: true,
            nmi_masked: true,
            flags: flags::NMI_PENDING | flags::SHADOW,
            ..Default::default()
        };
        s.set_from_kvm(&e).unwrap();
        assert_eq!(s.entry_info, InterruptionInfo::new(13, 3, true).0);
        assert_eq!(s.interruptibility, BLOCKING_STI | BLOCKING_NMI);
        assert_eq!(s.pending_irq, Some(0x21));
        let back = s.to_kvm();
        assert_eq!(back, VcpuEvents { flags: flags::NMI_PENDING | flags::SHADOW | flags::SMM, ..e });
    }

    #[test]
    fn ready_for_an_interrupt_only_with_nothing_queued_and_if_set_outside_a_shadow() {
        let idle = EventState::default();
        assert!(idle.ready_for_interrupt(RFLAGS_IF | 2));
        assert!(!idle.ready_for_interrupt(2), "IF clear");
        assert!(!EventState { pending_irq: Some(0x20), ..idle }.ready_for_interrupt(RFLAGS_IF), "one queued");
        let injecting = EventState { entry_info: InterruptionInfo::new(0x21, 0, false).0, ..idle };
        assert!(!injecting.ready_for_interrupt(RFLAGS_IF), "an event rides on the next entry");
        for shadow in [BLOCKING_STI, BLOCKING_MOV_SS] {
            assert!(!EventState { interruptibility: shadow, ..idle }.ready_for_interrupt(RFLAGS_IF));
        }
        assert!(EventState { interruptibility: BLOCKING_NMI, ..idle }.ready_for_interrupt(RFLAGS_IF));
    }

    #[test]
    fn shadow_bits_are_swapped_between_kvm_and_vmx() {
        let s = EventState { interruptibility: BLOCKING_MOV_SS, ..Default::default() };
        assert_eq!(s.to_kvm().interrupt_shadow, KVM_SHADOW_MOV_SS);
    }

    #[test]
    fn an_nmi_that_does_not_fit_becomes_pending() {
        let mut s = EventState::default();
        let e = VcpuEvents { exception_injected: true, exception_nr: 6, nmi_injected: true, ..Default::default() };
        s.set_from_kvm(&e).unwrap();
        assert!(s.nmi_pending);
        let mut t = EventState::default();
        t.set_from_kvm(&VcpuEvents { nmi_injected: true, ..Default::default() }).unwrap();
        assert!(InterruptionInfo(t.entry_info).is_nmi());
        assert!(t.to_kvm().nmi_injected);
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut s = EventState { nmi_pending: true, ..Default::default() };
        let before = s;
        for (e, why) in [
            (VcpuEvents { exception_injected: true, exception_nr: 2, ..Default::default() }, InvalidEvents::ExceptionVector),
            (VcpuEvents { exception_pending: true, exception_nr: 32, ..Default::default() }, InvalidEvents::ExceptionVector),
            (VcpuEvents { flags: flags::PAYLOAD, ..Default::default() }, InvalidEvents::Flags),
            (VcpuEvents { flags: 0x1000, ..Default::default() }, InvalidEvents::Flags),
            (VcpuEvents { flags: flags::SMM, smm: true, ..Default::default() }, InvalidEvents::Smm),
        ] {
            assert_eq!(s.set_from_kvm(&e), Err(why));
            assert_eq!(s, before);
        }
    }

    #[test]
    fn breakpoints_are_software_exceptions() {
        let mut s = EventState::default();
        s.set_from_kvm(&VcpuEvents { exception_injected: true, exception_nr: 3, ..Default::default() }).unwrap();
        assert_eq!(InterruptionInfo(s.entry_info).kind(), SOFTWARE_EXCEPTION);
    }
}
