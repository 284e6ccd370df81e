//! Capability MSR values for tests.
//!
//! The `BOCHS_*` sets were captured from Bochs 2.7's CPU models (Haswell is
//! the testbed's CPU) by loading rkvm.ko with `dump_caps=1`, which logs what
//! [`RawCaps::read`] read; MSRs absent there are absent here, so a test that
//! reads one fails.
//! `NO_SECONDARY` is synthetic: an early VMX CPU (Merom-like) without
//! secondary controls, TRUE controls or EPT, built from SDM Appendix A.
//!
//! [`RawCaps::read`]: crate::caps::RawCaps::read

use crate::msr::*;

/// The capability MSRs one CPU implements, with their values.
pub struct MsrSet(pub &'static [(u32, u64)]);

impl MsrSet {
    /// The value of `msr`, or `None` if this CPU does not implement it.
    pub fn value(&self, msr: u32) -> Option<u64> {
        self.0.iter().find(|(m, _)| *m == msr).map(|(_, v)| *v)
    }
}

/// Bochs 2.7 `corei7_haswell_4770`, captured in the testbed.
pub const BOCHS_HASWELL: MsrSet = MsrSet(&[
    (IA32_VMX_BASIC, 0x00d8_1000_0000_002b),
    (IA32_VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_PROCBASED_CTLS, 0xf7f9_fffe_0401_e172),
    (IA32_VMX_EXIT_CTLS, 0x007f_ffff_0003_6dff),
    (IA32_VMX_ENTRY_CTLS, 0x0000_ffff_0000_11ff),
    (IA32_VMX_MISC, 0x2004_01e0),
    (IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (IA32_VMX_CR4_FIXED0, 0x2000),
    (IA32_VMX_CR4_FIXED1, 0x0017_27ff),
    (IA32_VMX_PROCBASED_CTLS2, 0x0004_7fff_0000_0000),
    (IA32_VMX_EPT_VPID_CAP, 0x0000_0f01_0633_4141),
    (IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_TRUE_PROCBASED_CTLS, 0xf7f9_fffe_0400_6172),
    (IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
    (IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
]);

/// Bochs 2.7 `corei7_skylake_x`, captured in the testbed.
pub const BOCHS_SKYLAKE_X: MsrSet = MsrSet(&[
    (IA32_VMX_BASIC, 0x00d8_1000_0000_002b),
    (IA32_VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_PROCBASED_CTLS, 0xf7f9_fffe_0401_e172),
    (IA32_VMX_EXIT_CTLS, 0x007f_ffff_0003_6dff),
    (IA32_VMX_ENTRY_CTLS, 0x0000_ffff_0000_11ff),
    (IA32_VMX_MISC, 0x6004_01e0),
    (IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (IA32_VMX_CR4_FIXED0, 0x2000),
    (IA32_VMX_CR4_FIXED1, 0x0037_27ff),
    (IA32_VMX_PROCBASED_CTLS2, 0x0217_7fff_0000_0000),
    (IA32_VMX_EPT_VPID_CAP, 0x0000_0f01_0633_4141),
    (IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_TRUE_PROCBASED_CTLS, 0xf7f9_fffe_0400_6172),
    (IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
    (IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
]);

/// Bochs 2.7 `corei7_icelake_u`, captured in the testbed (VMCS revision 4).
pub const BOCHS_ICELAKE_U: MsrSet = MsrSet(&[
    (IA32_VMX_BASIC, 0x00d8_1000_0000_0004),
    (IA32_VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_PROCBASED_CTLS, 0xfff9_fffe_0401_e172),
    (IA32_VMX_EXIT_CTLS, 0x007f_ffff_0003_6dff),
    (IA32_VMX_ENTRY_CTLS, 0x0000_ffff_0000_11ff),
    (IA32_VMX_MISC, 0x6004_01e0),
    (IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (IA32_VMX_CR4_FIXED0, 0x2000),
    (IA32_VMX_CR4_FIXED1, 0x0077_2fff),
    (IA32_VMX_PROCBASED_CTLS2, 0x0297_7fff_0000_0000),
    (IA32_VMX_EPT_VPID_CAP, 0x0000_0f01_0633_4141),
    (IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_TRUE_PROCBASED_CTLS, 0xfff9_fffe_0400_6172),
    (IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
    (IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
]);

/// Every captured CPU model, with its name.
pub const CAPTURED: [(&str, &MsrSet); 3] =
    [("haswell", &BOCHS_HASWELL), ("skylake_x", &BOCHS_SKYLAKE_X), ("icelake_u", &BOCHS_ICELAKE_U)];

/// A synthetic early VMX CPU: revision 1, 4 KiB regions, write-back, no
/// TRUE MSRs, and "activate secondary controls" not allowed (bit 63 of
/// PROCBASED_CTLS clear), so PROCBASED_CTLS2 and EPT_VPID_CAP do not exist.
pub const NO_SECONDARY: MsrSet = MsrSet(&[
    (IA32_VMX_BASIC, 0x0018_1000_0000_0001),
    (IA32_VMX_PINBASED_CTLS, 0x0000_003f_0000_0016),
    (IA32_VMX_PROCBASED_CTLS, 0x77f9_fffe_0401_e172),
    (IA32_VMX_EXIT_CTLS, 0x0003_6fff_0003_6dff),
    (IA32_VMX_ENTRY_CTLS, 0x0000_13ff_0000_11ff),
    (IA32_VMX_MISC, 0x0004_0000),
    (IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (IA32_VMX_CR4_FIXED0, 0x2000),
    (IA32_VMX_CR4_FIXED1, 0x0000_27ff),
]);
