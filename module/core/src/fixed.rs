//! CR0 and CR4 bits fixed in VMX operation (SDM Vol. 3C, A.7 and A.8).
//!
//! "If bit X is 1 in IA32_VMX_CRn_FIXED0, then that bit of CRn is fixed to 1
//! in VMX operation. Similarly, if bit X is 0 in IA32_VMX_CRn_FIXED1, then
//! that bit of CRn is fixed to 0 in VMX operation." VMXON fails with #GP when
//! CR0 or CR4 violate them (24.8), and so does a later write that would.

/// The fixed-bit pair of one control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FixedBits {
    /// IA32_VMX_CRn_FIXED0: a 1 bit must be 1.
    pub fixed0: u64,
    /// IA32_VMX_CRn_FIXED1: a 0 bit must be 0.
    pub fixed1: u64,
}

/// How a control-register value breaks the fixed bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedBitsViolation {
    /// Bits that are 0 but must be 1.
    pub must_set: u64,
    /// Bits that are 1 but must be 0.
    pub must_clear: u64,
}

impl FixedBits {
    /// `value` with every fixed bit forced to its fixed setting.
    pub fn apply(self, value: u64) -> u64 {
        (value | self.fixed0) & self.fixed1
    }

    /// Checks `value` against the fixed bits.
    ///
    /// # Errors
    /// [`FixedBitsViolation`] naming the bits that are wrong.
    pub fn check(self, value: u64) -> Result<(), FixedBitsViolation> {
        let must_set = self.fixed0 & !value;
        let must_clear = value & !self.fixed1;
        if must_set == 0 && must_clear == 0 {
            Ok(())
        } else {
            Err(FixedBitsViolation { must_set, must_clear })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x86::controlregs::{Cr0, Cr4};

    // Typical values: CR0 fixed to PE, NE, PG; CR4 fixed to VMXE (A.7, A.8).
    const CR0: FixedBits = FixedBits { fixed0: 0x8000_0021, fixed1: 0xffff_ffff };
    const CR4: FixedBits = FixedBits { fixed0: 0x2000, fixed1: 0x0037_67ff };

    #[test]
    fn linux_cr0_already_satisfies_cr0_fixed_bits() {
        let linux_cr0 = (Cr0::CR0_PROTECTED_MODE
            | Cr0::CR0_MONITOR_COPROCESSOR
            | Cr0::CR0_EXTENSION_TYPE
            | Cr0::CR0_NUMERIC_ERROR
            | Cr0::CR0_WRITE_PROTECT
            | Cr0::CR0_ALIGNMENT_MASK
            | Cr0::CR0_ENABLE_PAGING)
            .bits() as u64;
        assert_eq!(CR0.check(linux_cr0), Ok(()));
        assert_eq!(CR0.apply(linux_cr0), linux_cr0);
    }

    #[test]
    fn cr4_without_vmxe_must_set_vmxe() {
        let vmxe = Cr4::CR4_ENABLE_VMX.bits() as u64;
        let cr4 = 0x0000_06f0;
        assert_eq!(CR4.check(cr4), Err(FixedBitsViolation { must_set: vmxe, must_clear: 0 }));
        assert_eq!(CR4.apply(cr4), cr4 | vmxe);
        assert_eq!(CR4.check(cr4 | vmxe), Ok(()));
    }

    #[test]
    fn bits_outside_fixed1_must_be_cleared() {
        let cr4 = 0x2000 | (1 << 30);
        assert_eq!(CR4.check(cr4), Err(FixedBitsViolation { must_set: 0, must_clear: 1 << 30 }));
        assert_eq!(CR4.apply(cr4), 0x2000);
    }
}
