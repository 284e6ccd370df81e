//! Architectural checks on the control registers userspace hands to
//! KVM_SET_SREGS, as KVM does them (`kvm_is_valid_sregs` in
//! arch/x86/kvm/regs.c of Linux 6.12): a state the CPU could never be in is
//! refused with `EINVAL` before it can reach the VMCS.

use x86::controlregs::{Cr0, Cr4};

/// EFER bits (SDM Vol. 3A, 2.2.1 "Extended Feature Enable Register").
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
}

/// CR4 bits a guest may set: what rkvm's vCPU can virtualize. VMXE is not
/// among them (no nested VMX), nor are features without CPUID support here.
pub const GUEST_CR4_ALLOWED: u64 = (Cr4::CR4_ENABLE_VME.bits()
    | Cr4::CR4_VIRTUAL_INTERRUPTS.bits()
    | Cr4::CR4_TIME_STAMP_DISABLE.bits()
    | Cr4::CR4_DEBUGGING_EXTENSIONS.bits()
    | Cr4::CR4_ENABLE_PSE.bits()
    | Cr4::CR4_ENABLE_PAE.bits()
    | Cr4::CR4_ENABLE_MACHINE_CHECK.bits()
    | Cr4::CR4_ENABLE_GLOBAL_PAGES.bits()
    | Cr4::CR4_ENABLE_PPMC.bits()
    | Cr4::CR4_ENABLE_SSE.bits()
    | Cr4::CR4_UNMASKED_SSE.bits()
    | Cr4::CR4_ENABLE_FSGSBASE.bits()
    | Cr4::CR4_ENABLE_PCID.bits()
    | Cr4::CR4_ENABLE_OS_XSAVE.bits()
    | Cr4::CR4_ENABLE_SMEP.bits()
    | Cr4::CR4_ENABLE_SMAP.bits()) as u64;

/// EFER bits a guest may set.
pub const GUEST_EFER_ALLOWED: u64 = efer::SCE | efer::LME | efer::LMA | efer::NXE;

/// The control-register part of `struct kvm_sregs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// CS.L: a 64-bit code segment.
    pub cs_l: bool,
}

/// Why a control state is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidState {
    /// CR0 has reserved bits, PG without PE, or NW without CD.
    Cr0,
    /// CR4 has bits the vCPU does not support.
    Cr4,
    /// EFER has bits the vCPU does not support.
    Efer,
    /// Paging with EFER.LME needs CR4.PAE and EFER.LMA.
    LongModeIncomplete,
    /// EFER.LMA or CS.L without long mode being on.
    LongModeWithoutPaging,
    /// CR3 has bits above the physical-address width.
    Cr3,
}

impl ControlState {
    /// Checks the state; `phys_addr_bits` is the guest's MAXPHYADDR.
    ///
    /// # Errors
    /// The first rule broken, in KVM's order.
    pub fn validate(&self, phys_addr_bits: u32) -> Result<(), InvalidState> {
        let pg = self.cr0 & Cr0::CR0_ENABLE_PAGING.bits() as u64 != 0;
        if self.efer & efer::LME != 0 && pg {
            if self.cr4 & Cr4::CR4_ENABLE_PAE.bits() as u64 == 0 || self.efer & efer::LMA == 0 {
                return Err(InvalidState::LongModeIncomplete);
            }
            if self.cr3 >> phys_addr_bits != 0 {
                return Err(InvalidState::Cr3);
            }
        } else if self.efer & efer::LMA != 0 || self.cs_l {
            return Err(InvalidState::LongModeWithoutPaging);
        }
        if self.cr4 & !GUEST_CR4_ALLOWED != 0 {
            return Err(InvalidState::Cr4);
        }
        let pe = self.cr0 & Cr0::CR0_PROTECTED_MODE.bits() as u64 != 0;
        let cd = self.cr0 & Cr0::CR0_CACHE_DISABLE.bits() as u64 != 0;
        let nw = self.cr0 & Cr0::CR0_NOT_WRITE_THROUGH.bits() as u64 != 0;
        if self.cr0 >> 32 != 0 || (pg && !pe) || (nw && !cd) {
            return Err(InvalidState::Cr0);
        }
        if self.efer & !GUEST_EFER_ALLOWED != 0 {
            return Err(InvalidState::Efer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET_CR0: u64 = 0x6000_0010; // CD | NW | ET, KVM's reset value
    const PE: u64 = 1;
    const PG: u64 = 1 << 31;
    const PAE: u64 = 1 << 5;

    #[test]
    fn reset_state_and_the_three_modes_are_valid() {
        let real = ControlState { cr0: RESET_CR0, ..Default::default() };
        let protected = ControlState { cr0: PE | 0x10, ..Default::default() };
        let long = ControlState {
            cr0: PE | PG | 0x10,
            cr3: 0x2000,
            cr4: PAE,
            efer: efer::LME | efer::LMA,
            cs_l: true,
        };
        for s in [real, protected, long] {
            assert_eq!(s.validate(39), Ok(()), "{s:x?}");
        }
    }

    #[test]
    fn long_mode_needs_pae_and_lma() {
        let s = ControlState { cr0: PE | PG, cr4: 0, efer: efer::LME | efer::LMA, ..Default::default() };
        assert_eq!(s.validate(39), Err(InvalidState::LongModeIncomplete));
        let s = ControlState { cr0: PE | PG, cr4: PAE, efer: efer::LME, ..Default::default() };
        assert_eq!(s.validate(39), Err(InvalidState::LongModeIncomplete));
    }

    #[test]
    fn lma_or_a_64_bit_cs_without_long_mode_is_invalid() {
        let s = ControlState { cr0: PE, efer: efer::LMA, ..Default::default() };
        assert_eq!(s.validate(39), Err(InvalidState::LongModeWithoutPaging));
        let s = ControlState { cr0: PE, cs_l: true, ..Default::default() };
        assert_eq!(s.validate(39), Err(InvalidState::LongModeWithoutPaging));
    }

    #[test]
    fn cr3_beyond_maxphyaddr_is_invalid_in_long_mode() {
        let s = ControlState {
            cr0: PE | PG,
            cr3: 1 << 40,
            cr4: PAE,
            efer: efer::LME | efer::LMA,
            cs_l: true,
        };
        assert_eq!(s.validate(39), Err(InvalidState::Cr3));
        assert_eq!(s.validate(46), Ok(()));
    }

    #[test]
    fn reserved_cr0_cr4_efer_bits_are_invalid() {
        let vmxe = Cr4::CR4_ENABLE_VMX.bits() as u64;
        assert_eq!(ControlState { cr4: vmxe, ..Default::default() }.validate(39), Err(InvalidState::Cr4));
        assert_eq!(ControlState { cr0: 1 << 32, ..Default::default() }.validate(39), Err(InvalidState::Cr0));
        assert_eq!(ControlState { cr0: PG, ..Default::default() }.validate(39), Err(InvalidState::Cr0));
        assert_eq!(ControlState { cr0: 1 << 29, ..Default::default() }.validate(39), Err(InvalidState::Cr0));
        assert_eq!(ControlState { efer: 1 << 12, ..Default::default() }.validate(39), Err(InvalidState::Efer));
    }
}
