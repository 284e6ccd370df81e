//! VMX capabilities: what IA32_FEATURE_CONTROL and the IA32_VMX_* capability
//! MSRs say this CPU can do (SDM Vol. 3C, Appendix A).
//!
//! Reading is done through a caller-supplied `rdmsr`, in the order the SDM
//! requires: a capability MSR that the CPU does not implement raises #GP, so
//! each one is read only when an earlier MSR says it exists.

use core::fmt;

use bitflags::bitflags;
use x86::vmx::vmcs::control::{PinbasedControls, PrimaryControls, SecondaryControls};

use crate::fixed::FixedBits;
use crate::msr;

bitflags! {
    /// IA32_FEATURE_CONTROL (MSR 0x3a), SDM Vol. 3C, 24.7 "Enabling and
    /// Entering VMX Operation".
    pub struct FeatureControl: u64 {
        /// Lock bit: once set, the MSR cannot change until reset, and VMXON
        /// raises #GP if the bit is clear.
        const LOCKED = 1 << 0;
        /// VMXON is allowed inside SMX operation (after GETSEC[SENTER]).
        const VMX_INSIDE_SMX = 1 << 1;
        /// VMXON is allowed outside SMX operation: the bit an OS needs.
        const VMX_OUTSIDE_SMX = 1 << 2;
    }
}

/// Whether firmware lets an OS use VMX, according to IA32_FEATURE_CONTROL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareVmx {
    /// Locked with VMX enabled outside SMX: VMXON may be executed.
    Enabled,
    /// Locked with VMX disabled outside SMX: VMXON would raise #GP until reset.
    Disabled,
    /// Not locked: VMXON would raise #GP. Linux locks the MSR at boot
    /// (CONFIG_IA32_FEAT_CTL), so this means the kernel chose not to enable VMX.
    Unlocked,
}

impl FeatureControl {
    /// Decodes the raw MSR value; reserved bits are ignored.
    pub fn from_msr(value: u64) -> Self {
        Self::from_bits_truncate(value)
    }

    /// What the MSR means for VMXON outside SMX operation.
    pub fn vmx_state(self) -> FirmwareVmx {
        if !self.contains(Self::LOCKED) {
            FirmwareVmx::Unlocked
        } else if self.contains(Self::VMX_OUTSIDE_SMX) {
            FirmwareVmx::Enabled
        } else {
            FirmwareVmx::Disabled
        }
    }
}

/// IA32_VMX_BASIC (MSR 0x480), SDM Vol. 3C, A.1 "Basic VMX Information".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxBasic(pub u64);

impl VmxBasic {
    /// Memory type the CPU uses for the VMCS and VMXON region: write-back.
    pub const MEMORY_TYPE_WB: u8 = 6;

    /// VMCS revision identifier, bits 30:0: written into the first 4 bytes
    /// of every VMXON region and VMCS (bit 31 stays 0).
    pub fn revision_id(self) -> u32 {
        (self.0 & 0x7fff_ffff) as u32
    }

    /// Bytes the CPU needs for the VMXON region and each VMCS, bits 44:32
    /// (at most 4096).
    pub fn region_size(self) -> u32 {
        ((self.0 >> 32) & 0x1fff) as u32
    }

    /// Bit 48: VMXON region, VMCS and the structures they point to must lie
    /// below 4 GiB (only on CPUs without Intel 64).
    pub fn physical_addresses_limited_to_32_bits(self) -> bool {
        self.0 & (1 << 48) != 0
    }

    /// Memory type for VMCS accesses, bits 53:50.
    pub fn memory_type(self) -> u8 {
        ((self.0 >> 50) & 0xf) as u8
    }

    /// Bit 54: INS/OUTS exits report instruction information.
    pub fn ins_outs_info(self) -> bool {
        self.0 & (1 << 54) != 0
    }

    /// Bit 55: the IA32_VMX_TRUE_*_CTLS MSRs exist and report which
    /// "default1" controls may be 0 (A.2).
    pub fn true_controls(self) -> bool {
        self.0 & (1 << 55) != 0
    }
}

/// The allowed settings of one VM-execution, VM-exit or VM-entry control
/// field, as a capability MSR reports them (SDM Vol. 3C, A.3-A.5): the low
/// 32 bits are the allowed 0-settings (a 1 there means the control must be 1),
/// the high 32 bits the allowed 1-settings (a 0 there means it must be 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllowedControls {
    /// Controls that must be 1.
    pub must_be_one: u32,
    /// Controls that may be 1.
    pub may_be_one: u32,
}

/// Controls that were required but that this CPU cannot set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingControls(pub u32);

impl AllowedControls {
    /// Decodes a capability MSR value.
    pub fn from_msr(value: u64) -> Self {
        Self { must_be_one: value as u32, may_be_one: (value >> 32) as u32 }
    }

    /// Whether every bit in `bits` may be 1.
    pub fn allows(self, bits: u32) -> bool {
        bits & !self.may_be_one == 0
    }

    /// The value to program: every must-be-one control, every `required`
    /// control, and those of `optional` that the CPU allows (SDM Vol. 3C,
    /// A.2 and 26.2.1.1: a control written against its allowed settings makes
    /// VM entry fail).
    ///
    /// # Errors
    /// [`MissingControls`] with the `required` bits the CPU cannot set.
    pub fn adjust(self, required: u32, optional: u32) -> Result<u32, MissingControls> {
        let missing = required & !self.may_be_one;
        if missing != 0 {
            return Err(MissingControls(missing));
        }
        Ok(self.must_be_one | required | (optional & self.may_be_one))
    }
}

bitflags! {
    /// IA32_VMX_EPT_VPID_CAP (MSR 0x48c), SDM Vol. 3C, A.10 "VPID and EPT
    /// Capabilities". Only the bits rkvm looks at are named.
    pub struct EptVpidCap: u64 {
        /// EPT entries may allow execute without read.
        const EXECUTE_ONLY = 1 << 0;
        /// A page-walk length of 4 is supported.
        const PAGE_WALK_4 = 1 << 6;
        /// A page-walk length of 5 is supported.
        const PAGE_WALK_5 = 1 << 7;
        /// The EPT paging structures may be uncacheable.
        const MEMORY_TYPE_UC = 1 << 8;
        /// The EPT paging structures may be write-back.
        const MEMORY_TYPE_WB = 1 << 14;
        /// A PDE may map a 2 MiB page.
        const PAGE_2M = 1 << 16;
        /// A PDPTE may map a 1 GiB page.
        const PAGE_1G = 1 << 17;
        /// INVEPT is supported.
        const INVEPT = 1 << 20;
        /// Accessed and dirty flags for EPT.
        const ACCESSED_DIRTY = 1 << 21;
        /// Single-context INVEPT.
        const INVEPT_SINGLE_CONTEXT = 1 << 25;
        /// All-context INVEPT.
        const INVEPT_ALL_CONTEXT = 1 << 26;
        /// INVVPID is supported.
        const INVVPID = 1 << 32;
        /// Individual-address INVVPID.
        const INVVPID_INDIVIDUAL_ADDRESS = 1 << 40;
        /// Single-context INVVPID.
        const INVVPID_SINGLE_CONTEXT = 1 << 41;
        /// All-context INVVPID.
        const INVVPID_ALL_CONTEXT = 1 << 42;
    }
}

/// IA32_VMX_MISC (MSR 0x485), SDM Vol. 3C, A.6 "Miscellaneous Data".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxMisc(pub u64);

impl VmxMisc {
    /// Bits 4:0: the VMX-preemption timer counts down by 1 every time bit X
    /// of the TSC changes, X being this value.
    pub fn preemption_timer_tsc_shift(self) -> u8 {
        (self.0 & 0x1f) as u8
    }
}

/// The raw values of every capability MSR that exists on a CPU; an MSR the
/// CPU does not implement reads as 0 here and is never accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct RawCaps {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub procbased2: u64,
    pub ept_vpid_cap: u64,
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
}

impl RawCaps {
    /// Reads the capability MSRs of the current CPU through `rdmsr`, touching
    /// only MSRs that exist (SDM Vol. 3C, A.1-A.10):
    /// - 0x480-0x489 exist on every CPU with VMX;
    /// - IA32_VMX_PROCBASED_CTLS2 only if "activate secondary controls" may be 1;
    /// - IA32_VMX_EPT_VPID_CAP only if "enable EPT" or "enable VPID" may be 1;
    /// - the TRUE_* MSRs only if IA32_VMX_BASIC bit 55 is 1.
    ///
    /// The caller has checked CPUID.1:ECX.VMX.
    pub fn read(mut rdmsr: impl FnMut(u32) -> u64) -> Self {
        let mut raw = Self {
            basic: rdmsr(msr::IA32_VMX_BASIC),
            pinbased: rdmsr(msr::IA32_VMX_PINBASED_CTLS),
            procbased: rdmsr(msr::IA32_VMX_PROCBASED_CTLS),
            exit: rdmsr(msr::IA32_VMX_EXIT_CTLS),
            entry: rdmsr(msr::IA32_VMX_ENTRY_CTLS),
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
            ..Self::default()
        };
        let procbased = AllowedControls::from_msr(raw.procbased);
        if procbased.allows(PrimaryControls::SECONDARY_CONTROLS.bits()) {
            raw.procbased2 = rdmsr(msr::IA32_VMX_PROCBASED_CTLS2);
            let secondary = AllowedControls::from_msr(raw.procbased2);
            if secondary.may_be_one
                & (SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID).bits()
                != 0
            {
                raw.ept_vpid_cap = rdmsr(msr::IA32_VMX_EPT_VPID_CAP);
            }
        }
        if VmxBasic(raw.basic).true_controls() {
            raw.true_pinbased = rdmsr(msr::IA32_VMX_TRUE_PINBASED_CTLS);
            raw.true_procbased = rdmsr(msr::IA32_VMX_TRUE_PROCBASED_CTLS);
            raw.true_exit = rdmsr(msr::IA32_VMX_TRUE_EXIT_CTLS);
            raw.true_entry = rdmsr(msr::IA32_VMX_TRUE_ENTRY_CTLS);
        }
        raw
    }
}

/// The decoded capabilities of a CPU: what every later decision (controls,
/// EPT, VPID) is computed from, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_VMX_BASIC.
    pub basic: VmxBasic,
    /// Pin-based VM-execution controls (TRUE MSR when it exists).
    pub pinbased: AllowedControls,
    /// Primary processor-based VM-execution controls (TRUE MSR when it exists).
    pub procbased: AllowedControls,
    /// Secondary processor-based controls (all zero when there are none).
    pub procbased2: AllowedControls,
    /// VM-exit controls (TRUE MSR when it exists).
    pub exit: AllowedControls,
    /// VM-entry controls (TRUE MSR when it exists).
    pub entry: AllowedControls,
    /// IA32_VMX_MISC.
    pub misc: VmxMisc,
    /// EPT and VPID capabilities (empty when neither exists).
    pub ept_vpid: EptVpidCap,
    /// CR0 bits fixed in VMX operation (A.7).
    pub cr0_fixed: FixedBits,
    /// CR4 bits fixed in VMX operation (A.8).
    pub cr4_fixed: FixedBits,
}

impl VmxCaps {
    /// Decodes raw MSR values. When IA32_VMX_BASIC bit 55 is set, the TRUE
    /// MSRs replace the legacy ones for the allowed settings (SDM Vol. 3C,
    /// A.2: they may allow some "default1" controls to be 0).
    pub fn decode(raw: &RawCaps) -> Self {
        let basic = VmxBasic(raw.basic);
        let pick = |legacy: u64, true_msr: u64| {
            AllowedControls::from_msr(if basic.true_controls() { true_msr } else { legacy })
        };
        Self {
            basic,
            pinbased: pick(raw.pinbased, raw.true_pinbased),
            procbased: pick(raw.procbased, raw.true_procbased),
            exit: pick(raw.exit, raw.true_exit),
            entry: pick(raw.entry, raw.true_entry),
            procbased2: AllowedControls::from_msr(raw.procbased2),
            misc: VmxMisc(raw.misc),
            ept_vpid: EptVpidCap::from_bits_truncate(raw.ept_vpid_cap),
            cr0_fixed: FixedBits { fixed0: raw.cr0_fixed0, fixed1: raw.cr0_fixed1 },
            cr4_fixed: FixedBits { fixed0: raw.cr4_fixed0, fixed1: raw.cr4_fixed1 },
        }
    }

    /// Whether secondary controls can be activated at all.
    fn has_secondary(&self) -> bool {
        self.procbased.allows(PrimaryControls::SECONDARY_CONTROLS.bits())
    }

    /// EPT as rkvm uses it: the control can be set, with 4-level tables in
    /// write-back memory (SDM Vol. 3C, 29.3.2 and A.10).
    pub fn ept(&self) -> bool {
        self.has_secondary()
            && self.procbased2.allows(SecondaryControls::ENABLE_EPT.bits())
            && self.ept_vpid.contains(EptVpidCap::PAGE_WALK_4 | EptVpidCap::MEMORY_TYPE_WB)
    }

    /// VPID with INVVPID.
    pub fn vpid(&self) -> bool {
        self.has_secondary()
            && self.procbased2.allows(SecondaryControls::ENABLE_VPID.bits())
            && self.ept_vpid.contains(EptVpidCap::INVVPID)
    }

    /// Unrestricted guest: real mode and unpaged protected mode run natively.
    /// It requires EPT (SDM Vol. 3C, 26.2.1.1).
    pub fn unrestricted_guest(&self) -> bool {
        self.ept() && self.procbased2.allows(SecondaryControls::UNRESTRICTED_GUEST.bits())
    }

    /// The VMX-preemption timer.
    pub fn preemption_timer(&self) -> bool {
        self.pinbased.allows(PinbasedControls::VMX_PREEMPTION_TIMER.bits())
    }
}

/// Writes `yes` or `no ` before a feature name.
fn feature(f: &mut fmt::Formatter<'_>, present: bool, name: &str) -> fmt::Result {
    write!(f, ", {}{}", if present { "" } else { "no " }, name)
}

/// The one-line capability summary rkvm logs at load, e.g.
/// `VMCS revision 0x4, EPT (4-level, 2M 1G pages, INVEPT), VPID, unrestricted
/// guest, no preemption timer, TRUE controls`.
impl fmt::Display for VmxCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VMCS revision {:#x}", self.basic.revision_id())?;
        if self.ept() {
            let cap = self.ept_vpid;
            write!(f, ", EPT (4-level")?;
            if cap.contains(EptVpidCap::PAGE_WALK_5) {
                write!(f, ", 5-level")?;
            }
            write!(f, ", 4K")?;
            if cap.contains(EptVpidCap::PAGE_2M) {
                write!(f, " 2M")?;
            }
            if cap.contains(EptVpidCap::PAGE_1G) {
                write!(f, " 1G")?;
            }
            write!(f, " pages")?;
            if cap.contains(EptVpidCap::INVEPT) {
                write!(f, ", INVEPT")?;
            }
            if cap.contains(EptVpidCap::ACCESSED_DIRTY) {
                write!(f, ", A/D")?;
            }
            write!(f, ")")?;
        } else {
            write!(f, ", no EPT")?;
        }
        feature(f, self.vpid(), "VPID")?;
        feature(f, self.unrestricted_guest(), "unrestricted guest")?;
        feature(f, self.preemption_timer(), "preemption timer")?;
        feature(f, self.basic.true_controls(), "TRUE controls")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{BOCHS_HASWELL, NO_SECONDARY};

    use std::{string::ToString, vec::Vec};

    #[test]
    fn feature_control_states_follow_lock_and_outside_smx_bits() {
        assert_eq!(FeatureControl::from_msr(0x5).vmx_state(), FirmwareVmx::Enabled);
        assert_eq!(FeatureControl::from_msr(0x3).vmx_state(), FirmwareVmx::Disabled);
        assert_eq!(FeatureControl::from_msr(0x1).vmx_state(), FirmwareVmx::Disabled);
        assert_eq!(FeatureControl::from_msr(0x4).vmx_state(), FirmwareVmx::Unlocked);
        assert_eq!(FeatureControl::from_msr(0).vmx_state(), FirmwareVmx::Unlocked);
        // Reserved and SGX/LMCE bits do not change the verdict.
        assert_eq!(FeatureControl::from_msr(0xff05).vmx_state(), FirmwareVmx::Enabled);
    }

    #[test]
    fn vmx_basic_fields_decode_per_sdm_a1() {
        let basic = VmxBasic(BOCHS_HASWELL.value(msr::IA32_VMX_BASIC).expect("basic"));
        assert_eq!(basic.revision_id(), 0x2b);
        assert_eq!(basic.region_size(), 4096);
        assert_eq!(basic.memory_type(), VmxBasic::MEMORY_TYPE_WB);
        assert!(basic.true_controls());
        assert!(!basic.physical_addresses_limited_to_32_bits());
        // Bit 31 is not part of the revision identifier.
        assert_eq!(VmxBasic(0xffff_ffff).revision_id(), 0x7fff_ffff);
    }

    #[test]
    fn adjust_sets_must_be_one_and_only_allowed_optional_bits() {
        // must be one: bits 1, 2; may be one: bits 0-7.
        let allowed = AllowedControls::from_msr(0x0000_00ff_0000_0006);
        assert_eq!(allowed.adjust(0x1, 0x300), Ok(0x7));
        assert_eq!(allowed.adjust(0x0, 0x80), Ok(0x86));
        assert_eq!(allowed.adjust(0x101, 0), Err(MissingControls(0x100)));
    }

    #[test]
    fn read_touches_only_msrs_that_exist() {
        let mut touched = Vec::new();
        let raw = RawCaps::read(|m| {
            touched.push(m);
            NO_SECONDARY.value(m).expect("read an MSR the CPU does not implement")
        });
        assert!(!touched.contains(&msr::IA32_VMX_PROCBASED_CTLS2));
        assert!(!touched.contains(&msr::IA32_VMX_EPT_VPID_CAP));
        assert!(!touched.contains(&msr::IA32_VMX_TRUE_PINBASED_CTLS));
        let caps = VmxCaps::decode(&raw);
        assert!(!caps.ept() && !caps.vpid() && !caps.unrestricted_guest());
        assert_eq!(caps.procbased2, AllowedControls::default());
        assert_eq!(
            caps.to_string(),
            "VMCS revision 0x1, no EPT, no VPID, no unrestricted guest, \
             no preemption timer, no TRUE controls"
        );
    }

    #[test]
    fn bochs_haswell_summary_names_every_feature_rkvm_relies_on() {
        let raw = RawCaps::read(|m| BOCHS_HASWELL.value(m).expect("unimplemented MSR read"));
        let caps = VmxCaps::decode(&raw);
        assert!(caps.ept() && caps.vpid() && caps.unrestricted_guest());
        assert!(caps.preemption_timer());
        assert_eq!(caps.misc.preemption_timer_tsc_shift(), 0);
        assert_eq!(
            caps.to_string(),
            "VMCS revision 0x2b, EPT (4-level, 4K 2M 1G pages, INVEPT, A/D), VPID, \
             unrestricted guest, preemption timer, TRUE controls"
        );
    }

    #[test]
    fn icelake_has_another_vmcs_revision_and_the_same_features() {
        let raw = RawCaps::read(|m| crate::testdata::BOCHS_ICELAKE_U.value(m).expect("unimplemented MSR read"));
        let caps = VmxCaps::decode(&raw);
        assert_eq!(caps.basic.revision_id(), 4);
        assert!(caps.to_string().starts_with("VMCS revision 0x4, EPT (4-level, 4K 2M 1G pages"));
    }

    #[test]
    fn true_msrs_replace_legacy_ones_when_basic_bit_55_is_set() {
        let raw = RawCaps::read(|m| BOCHS_HASWELL.value(m).expect("unimplemented MSR read"));
        let caps = VmxCaps::decode(&raw);
        assert_eq!(caps.procbased, AllowedControls::from_msr(raw.true_procbased));
        let legacy = VmxCaps::decode(&RawCaps { basic: raw.basic & !(1 << 55), ..raw });
        assert_eq!(legacy.procbased, AllowedControls::from_msr(raw.procbased));
    }
}
