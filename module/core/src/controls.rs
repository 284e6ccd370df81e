//! The VM-execution, VM-exit and VM-entry controls rkvm runs guests with,
//! computed once from the capability MSRs (never hard-coded: SDM Vol. 3C,
//! A.2-A.5 and 26.2.1.1; a value outside the allowed settings fails VM entry).

use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};

use crate::caps::{AllowedControls, MissingControls, VmxCaps};

/// The five control fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Controls {
    pub pinbased: u32,
    pub procbased: u32,
    pub procbased2: u32,
    pub exit: u32,
    pub entry: u32,
}

/// A control field rkvm needs and the bits this CPU lacks in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlsMissing {
    /// Which field: "pin-based", "processor-based", ...
    pub field: &'static str,
    /// The required bits the CPU cannot set.
    pub bits: u32,
}

fn adjust(
    field: &'static str,
    allowed: AllowedControls,
    required: u32,
    optional: u32,
) -> Result<u32, ControlsMissing> {
    allowed
        .adjust(required, optional)
        .map_err(|MissingControls(bits)| ControlsMissing { field, bits })
}

impl Controls {
    /// The controls for `caps`:
    /// - pin-based: exit on external interrupts (the host keeps them; they
    ///   are not acknowledged on exit, so the host takes them once interrupts
    ///   are enabled) and on NMIs (handed to the host's NMI handler); the
    ///   VMX-preemption timer where the CPU has it, as a time slice that
    ///   brings the host back even if an interrupt exit is missed (Bochs
    ///   2.7 misses them while the guest's RFLAGS.IF is 0); virtual NMIs
    ///   where the CPU has them (the CPU tracks the guest's NMI blocking and
    ///   NMI-window exiting works: 25.3, 26.7.6);
    /// - processor-based: exit on HLT, on every I/O instruction, on MOV CR8
    ///   (no TPR shadow: a guest must not reach the host's TPR), on MOV DR,
    ///   RDPMC, MONITOR and MWAIT; secondary controls on; TSC offsetting
    ///   where available (the guest's TSC is writable without RDTSC exits);
    ///   MSR bitmaps where available (otherwise every RDMSR/WRMSR exits,
    ///   which is slower but as correct);
    /// - secondary: EPT and unrestricted guest (real mode and unpaged
    ///   protected mode run natively); RDTSCP if the CPU has it; WBINVD
    ///   exiting if available (a guest must not flush the host's caches);
    /// - exit: 64-bit host, save/load IA32_EFER and IA32_PAT;
    /// - entry: load IA32_EFER and IA32_PAT ("IA-32e mode guest" is set per
    ///   entry from the guest's EFER.LMA).
    ///
    /// # Errors
    /// The first field whose required bits the CPU cannot set.
    pub fn compute(caps: &VmxCaps) -> Result<Self, ControlsMissing> {
        let pinbased = adjust(
            "pin-based",
            caps.pinbased,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::NMI_EXITING).bits(),
            (PinbasedControls::VMX_PREEMPTION_TIMER | PinbasedControls::VIRTUAL_NMIS).bits(),
        )?;
        let procbased = adjust(
            "processor-based",
            caps.procbased,
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::UNCOND_IO_EXITING
                | PrimaryControls::CR8_LOAD_EXITING
                | PrimaryControls::CR8_STORE_EXITING
                | PrimaryControls::MOV_DR_EXITING
                | PrimaryControls::RDPMC_EXITING
                | PrimaryControls::MONITOR_EXITING
                | PrimaryControls::MWAIT_EXITING
                | PrimaryControls::SECONDARY_CONTROLS)
                .bits(),
            (PrimaryControls::USE_TSC_OFFSETTING | PrimaryControls::USE_MSR_BITMAPS).bits(),
        )?;
        // CR3 load/store exiting may be 0 with EPT (A.3.2, TRUE controls):
        // the adjust above keeps them only if the CPU forces them.
        let procbased2 = adjust(
            "secondary processor-based",
            caps.procbased2,
            (SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST).bits(),
            (SecondaryControls::ENABLE_RDTSCP | SecondaryControls::WBINVD_EXITING).bits(),
        )?;
        let exit = adjust(
            "VM-exit",
            caps.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT)
                .bits(),
            0,
        )?;
        let entry = adjust(
            "VM-entry",
            caps.entry,
            (EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits(),
            0,
        )?;
        Ok(Self { pinbased, procbased, procbased2, exit, entry })
    }

    /// Whether RDTSC and the TSC MSR are offset by the VMCS TSC offset.
    pub fn tsc_offsetting(&self) -> bool {
        self.procbased & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0
    }

    /// Whether the guest may run RDTSCP (else it raises #UD: 26.3).
    pub fn rdtscp(&self) -> bool {
        self.procbased2 & SecondaryControls::ENABLE_RDTSCP.bits() != 0
    }

    /// Whether MSR accesses go through an MSR bitmap.
    pub fn msr_bitmaps(&self) -> bool {
        self.procbased & PrimaryControls::USE_MSR_BITMAPS.bits() != 0
    }

    /// Whether the CPU tracks virtual-NMI blocking (NMI-window exiting).
    pub fn virtual_nmis(&self) -> bool {
        self.pinbased & PinbasedControls::VIRTUAL_NMIS.bits() != 0
    }

    /// Whether the VMX-preemption timer is on.
    pub fn preemption_timer(&self) -> bool {
        self.pinbased & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0
    }

    /// The entry controls for a guest whose EFER.LMA is `long_mode`.
    pub fn entry_for(&self, long_mode: bool) -> u32 {
        let ia32e = EntryControls::IA32E_MODE_GUEST.bits();
        if long_mode {
            self.entry | ia32e
        } else {
            self.entry & !ia32e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::RawCaps;
    use crate::testdata::{BOCHS_HASWELL, NO_SECONDARY};

    fn caps(set: &crate::testdata::MsrSet) -> VmxCaps {
        VmxCaps::decode(&RawCaps::read(|m| set.value(m).expect("implemented MSR")))
    }

    #[test]
    fn bochs_haswell_gets_every_control_rkvm_needs() {
        let caps = caps(&BOCHS_HASWELL);
        let c = Controls::compute(&caps).expect("all required controls");
        // Each value respects the allowed settings.
        for (value, allowed) in [
            (c.pinbased, caps.pinbased),
            (c.procbased, caps.procbased),
            (c.procbased2, caps.procbased2),
            (c.exit, caps.exit),
            (c.entry, caps.entry),
        ] {
            assert_eq!(value & allowed.must_be_one, allowed.must_be_one);
            assert!(allowed.allows(value));
        }
        assert_ne!(c.procbased2 & SecondaryControls::UNRESTRICTED_GUEST.bits(), 0);
        assert_ne!(c.procbased & PrimaryControls::UNCOND_IO_EXITING.bits(), 0);
        // TRUE controls let CR3 exiting be off.
        assert_eq!(c.procbased & PrimaryControls::CR3_LOAD_EXITING.bits(), 0);
        assert_eq!(c.exit & ExitControls::ACK_INTERRUPT_ON_EXIT.bits(), 0);
        assert!(c.preemption_timer(), "Bochs has the preemption timer");
        assert!(c.tsc_offsetting());
        assert!(c.rdtscp() && c.msr_bitmaps() && c.virtual_nmis());
    }

    #[test]
    fn every_captured_cpu_model_gets_controls_within_its_allowed_settings() {
        for (name, set) in crate::testdata::CAPTURED {
            let caps = caps(set);
            let c = Controls::compute(&caps).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            for (value, allowed) in [
                (c.pinbased, caps.pinbased),
                (c.procbased, caps.procbased),
                (c.procbased2, caps.procbased2),
                (c.exit, caps.exit),
                (c.entry_for(true), caps.entry),
                (c.entry_for(false), caps.entry),
            ] {
                assert_eq!(value & allowed.must_be_one, allowed.must_be_one, "{name}");
                assert!(allowed.allows(value), "{name}: {value:#x} beyond {:#x}", allowed.may_be_one);
            }
            assert!(caps.unrestricted_guest(), "{name}");
        }
    }

    #[test]
    fn ia32e_mode_follows_the_guest() {
        let c = Controls::compute(&caps(&BOCHS_HASWELL)).unwrap();
        let ia32e = EntryControls::IA32E_MODE_GUEST.bits();
        assert_ne!(c.entry_for(true) & ia32e, 0);
        assert_eq!(c.entry_for(false) & ia32e, 0);
    }

    #[test]
    fn a_cpu_without_secondary_controls_is_refused_by_name() {
        let err = Controls::compute(&caps(&NO_SECONDARY)).unwrap_err();
        assert_eq!(err.field, "processor-based");
        assert_eq!(err.bits, PrimaryControls::SECONDARY_CONTROLS.bits());
    }
}
