//! The MSRs a vCPU implements, as a guest (RDMSR/WRMSR) and the VMM
//! (KVM_GET_MSRS/KVM_SET_MSRS) see them: which exist, what they hold, which
//! values are refused (#GP for the guest, a short count for the VMM), and
//! which pass through the MSR bitmap without exits.
//!
//! Kept here, per vCPU: PAT, SYSENTER_*, the SYSCALL MSRs and
//! KERNEL_GS_BASE, TSC_AUX, the TSC offset and TSC_ADJUST, MISC_ENABLE,
//! IA32_APIC_BASE (virtual: nothing reaches the host's APIC), the MTRRs
//! (stored and validated, not enforced: EPT maps guest memory write-back),
//! and the microcode revision. EFER and the FS/GS bases live in `kvm_sregs`
//! and the VMCS; the module handles those.
//!
//! Semantics follow the SDM (Vol. 4 for the MSRs; Vol. 3A 13.11 for MTRRs,
//! 13.12 for PAT, 18.17 for the TSC) and KVM where the SDM leaves a choice
//! to the implementation (reset values, MTRRcap, the microcode revision,
//! TSC_ADJUST following TSC writes).

use x86::msr::*;

/// UC, WC, WT, WP, WB: the memory types an MTRR may name (SDM Vol. 3A,
/// Table 13-8); PAT also accepts UC- (7).
fn mtrr_type(t: u8) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

/// Every byte of a PAT value names a memory type (SDM Vol. 3A, 13.12.2).
pub fn valid_pat(value: u64) -> bool {
    value.to_le_bytes().iter().all(|&b| mtrr_type(b) || b == 7)
}

/// A canonical 48-bit address (bits 63:47 equal).
pub fn canonical(value: u64) -> bool {
    let top = value as i64 >> 47;
    top == 0 || top == -1
}

/// Variable-range MTRR pairs rkvm offers (KVM's KVM_NR_VAR_MTRR).
pub const VARIABLE_MTRRS: u32 = 8;
/// IA32_MTRRCAP: VCNT = 8, fixed ranges (bit 8), write-combining (bit 10);
/// no SMRR. KVM reports the same.
pub const MTRRCAP: u64 = 0x500 | VARIABLE_MTRRS as u64;

/// The fixed-range MTRRs in storage order (SDM Vol. 3A, 13.11.2.2).
pub const FIXED_MTRRS: [u32; 11] = [
    IA32_MTRR_FIX64K_00000,
    IA32_MTRR_FIX16K_80000,
    IA32_MTRR_FIX16K_A0000,
    IA32_MTRR_FIX4K_C0000,
    IA32_MTRR_FIX4K_C8000,
    IA32_MTRR_FIX4K_D0000,
    IA32_MTRR_FIX4K_D8000,
    IA32_MTRR_FIX4K_E0000,
    IA32_MTRR_FIX4K_E8000,
    IA32_MTRR_FIX4K_F0000,
    IA32_MTRR_FIX4K_F8000,
];

/// IA32_MISC_ENABLE at reset, as KVM: BTS and PEBS unavailable (bits 11,
/// 12), which are read-only to the guest.
pub const MISC_ENABLE_RESET: u64 = (1 << 11) | (1 << 12);
const MISC_ENABLE_READ_ONLY: u64 = (1 << 11) | (1 << 12);
/// Performance monitoring available (bit 7): writes are ignored.
const MISC_ENABLE_EMON: u64 = 1 << 7;

/// The microcode revision a guest reads (KVM's default: revision 1 in the
/// high half, where RDMSR after CPUID puts it).
pub const UCODE_REV: u64 = 0x1_0000_0000;

/// IA32_APIC_BASE: BSP (bit 8), x2APIC enable (10, not offered), global
/// enable (11), base from bit 12. Bits 0-7 and 9 are reserved.
const APIC_BASE_RESERVED: u64 = 0x2ff | (1 << 10);

/// Who is accessing an MSR: the guest, or the VMM through the ioctls (which
/// may set values the guest may not, as KVM's `host_initiated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// RDMSR/WRMSR in the guest.
    Guest,
    /// KVM_GET_MSRS/KVM_SET_MSRS.
    Host,
}

/// What the guest's CPUID offers that decides whether an MSR exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrFeatures {
    /// CPUID.80000008H:EAX[7:0].
    pub phys_addr_bits: u32,
    /// RDTSCP (CPUID.80000001H:EDX[27]): IA32_TSC_AUX exists.
    pub rdtscp: bool,
    /// CPUID.(EAX=7,ECX=0):EBX[1]: IA32_TSC_ADJUST exists.
    pub tsc_adjust: bool,
}

impl MsrFeatures {
    /// From the guest's CPUID table (36 address bits without leaf
    /// 80000008H, as the SDM says for such CPUs).
    pub fn from_cpuid(table: &[crate::cpuid::Entry]) -> Self {
        let lookup = |f, i| crate::cpuid::lookup(table, f, i);
        let max_ext = lookup(0x8000_0000, 0)[0];
        let bits = if max_ext >= 0x8000_0008 { lookup(0x8000_0008, 0)[0] & 0xff } else { 0 };
        Self {
            phys_addr_bits: if (32..=52).contains(&bits) { bits } else { 36 },
            rdtscp: lookup(0x8000_0001, 0)[3] & (1 << 27) != 0,
            tsc_adjust: lookup(7, 0)[1] & (1 << 1) != 0,
        }
    }

    /// Bits at and above the physical-address width.
    fn reserved_phys_bits(&self) -> u64 {
        !0u64 << self.phys_addr_bits
    }
}

/// IA32_APIC_BASE bit 11: the APIC is globally enabled (SDM Vol. 3A,
/// 11.4.4).
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Whether `value` is a valid IA32_APIC_BASE: no reserved bit, and the
/// base within the physical-address width.
pub fn valid_apic_base(value: u64, f: &MsrFeatures) -> bool {
    value & (APIC_BASE_RESERVED | f.reserved_phys_bits()) == 0
}

/// Why an access fails: the guest gets #GP(0); KVM_GET/SET_MSRS stop there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrError {
    /// The vCPU has no such MSR.
    Unknown,
    /// The MSR cannot hold that value (or is read-only).
    Invalid,
}

/// The per-vCPU MSR state described in the module comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct GuestMsrs {
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    /// Guest TSC = host TSC + offset (SDM Vol. 3C, 26.6.5).
    pub tsc_offset: u64,
    pub tsc_adjust: u64,
    pub misc_enable: u64,
    pub apic_base: u64,
    pub mtrr_def_type: u64,
    pub mtrr_fixed: [u64; 11],
    /// PHYSBASE0, PHYSMASK0, PHYSBASE1, ...
    pub mtrr_var: [u64; 2 * VARIABLE_MTRRS as usize],
}

impl GuestMsrs {
    /// The values after RESET: PAT at its power-up value (SDM Vol. 3A,
    /// 13.12.4), MTRRs disabled, the rest as KVM resets them.
    pub fn reset(apic_base: u64) -> Self {
        Self {
            pat: 0x0007_0406_0007_0406,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            tsc_aux: 0,
            tsc_offset: 0,
            tsc_adjust: 0,
            misc_enable: MISC_ENABLE_RESET,
            apic_base,
            mtrr_def_type: 0,
            mtrr_fixed: [0; 11],
            mtrr_var: [0; 2 * VARIABLE_MTRRS as usize],
        }
    }

    fn slot(&mut self, index: u32, access: Access, f: &MsrFeatures) -> Option<&mut u64> {
        Some(match index {
            IA32_PAT => &mut self.pat,
            IA32_SYSENTER_CS => &mut self.sysenter_cs,
            IA32_SYSENTER_ESP => &mut self.sysenter_esp,
            IA32_SYSENTER_EIP => &mut self.sysenter_eip,
            IA32_STAR => &mut self.star,
            IA32_LSTAR => &mut self.lstar,
            IA32_CSTAR => &mut self.cstar,
            IA32_FMASK => &mut self.sfmask,
            IA32_KERNEL_GSBASE => &mut self.kernel_gs_base,
            // The VMM may save and restore it whatever the guest's CPUID.
            IA32_TSC_AUX if f.rdtscp || access == Access::Host => &mut self.tsc_aux,
            IA32_MISC_ENABLE => &mut self.misc_enable,
            IA32_APIC_BASE => &mut self.apic_base,
            IA32_MTRR_DEF_TYPE => &mut self.mtrr_def_type,
            _ => {
                if let Some(i) = FIXED_MTRRS.iter().position(|&m| m == index) {
                    &mut self.mtrr_fixed[i]
                } else if (IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * VARIABLE_MTRRS).contains(&index) {
                    &mut self.mtrr_var[(index - IA32_MTRR_PHYSBASE0) as usize]
                } else {
                    return None;
                }
            }
        })
    }

    /// Reads MSR `index`; `host_tsc` is the host's TSC now.
    ///
    /// # Errors
    /// [`MsrError::Unknown`] for an MSR this vCPU does not have.
    pub fn read(&mut self, index: u32, access: Access, host_tsc: u64, f: &MsrFeatures) -> Result<u64, MsrError> {
        match index {
            IA32_TIME_STAMP_COUNTER => Ok(host_tsc.wrapping_add(self.tsc_offset)),
            IA32_TSC_ADJUST if f.tsc_adjust || access == Access::Host => Ok(self.tsc_adjust),
            IA32_MTRRCAP => Ok(MTRRCAP),
            IA32_BIOS_SIGN_ID => Ok(UCODE_REV),
            _ => self.slot(index, access, f).copied().ok_or(MsrError::Unknown),
        }
    }

    /// Writes MSR `index`.
    ///
    /// # Errors
    /// [`MsrError::Unknown`] for an MSR this vCPU does not have,
    /// [`MsrError::Invalid`] for a value it cannot hold.
    pub fn write(&mut self, index: u32, value: u64, access: Access, host_tsc: u64, f: &MsrFeatures) -> Result<(), MsrError> {
        let guest = access == Access::Guest;
        let ok = |valid: bool| if valid { Ok(()) } else { Err(MsrError::Invalid) };
        match index {
            IA32_TIME_STAMP_COUNTER => {
                let offset = value.wrapping_sub(host_tsc);
                if guest {
                    // A guest write moves TSC_ADJUST by as much (SDM Vol.
                    // 3B, 18.17.3); the VMM restoring a TSC does not.
                    self.tsc_adjust = self.tsc_adjust.wrapping_add(offset.wrapping_sub(self.tsc_offset));
                }
                self.tsc_offset = offset;
                return Ok(());
            }
            IA32_TSC_ADJUST => {
                if guest && !f.tsc_adjust {
                    return Err(MsrError::Unknown);
                }
                if guest {
                    // Writing TSC_ADJUST moves the TSC by the difference.
                    self.tsc_offset = self.tsc_offset.wrapping_add(value.wrapping_sub(self.tsc_adjust));
                }
                self.tsc_adjust = value;
                return Ok(());
            }
            IA32_MTRRCAP => return if guest { Err(MsrError::Invalid) } else { ok(value == MTRRCAP) },
            // Accepted and ignored from the guest, as KVM.
            IA32_BIOS_SIGN_ID => return Ok(()),
            _ => {}
        }
        let phys = f.reserved_phys_bits();
        match index {
            IA32_PAT => ok(valid_pat(value))?,
            IA32_KERNEL_GSBASE | IA32_LSTAR | IA32_CSTAR | IA32_SYSENTER_ESP | IA32_SYSENTER_EIP => ok(canonical(value))?,
            IA32_TSC_AUX => ok(value >> 32 == 0)?,
            IA32_APIC_BASE => ok(valid_apic_base(value, f))?,
            IA32_MISC_ENABLE if guest => {
                ok((value ^ self.misc_enable) & MISC_ENABLE_READ_ONLY == 0)?;
                let value = (value & !MISC_ENABLE_EMON) | (self.misc_enable & MISC_ENABLE_EMON);
                self.misc_enable = value;
                return Ok(());
            }
            // Type, FE (bit 10), E (bit 11); the rest reserved.
            IA32_MTRR_DEF_TYPE => ok(value & !0xcff == 0 && mtrr_type(value as u8))?,
            _ if FIXED_MTRRS.contains(&index) => ok(value.to_le_bytes().iter().all(|&t| mtrr_type(t)))?,
            _ if (IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * VARIABLE_MTRRS).contains(&index) => {
                if (index - IA32_MTRR_PHYSBASE0).is_multiple_of(2) {
                    ok(value & (phys | 0xf00) == 0 && mtrr_type(value as u8))?;
                } else {
                    // PHYSMASK: V is bit 11; bits 10:0 reserved.
                    ok(value & (phys | 0x7ff) == 0)?;
                }
            }
            _ => {}
        }
        *self.slot(index, access, f).ok_or(MsrError::Unknown)? = value;
        Ok(())
    }
}

/// Every MSR KVM_GET_MSRS and KVM_SET_MSRS accept (KVM_GET_MSR_INDEX_LIST),
/// besides the ones in `kvm_sregs` listed first.
pub fn index_list() -> impl Iterator<Item = u32> {
    [
        IA32_EFER,
        IA32_FS_BASE,
        IA32_GS_BASE,
        IA32_TIME_STAMP_COUNTER,
        IA32_TSC_ADJUST,
        IA32_APIC_BASE,
        IA32_BIOS_SIGN_ID,
        IA32_MTRRCAP,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_MISC_ENABLE,
        IA32_PAT,
        IA32_MTRR_DEF_TYPE,
        IA32_STAR,
        IA32_LSTAR,
        IA32_CSTAR,
        IA32_FMASK,
        IA32_KERNEL_GSBASE,
        IA32_TSC_AUX,
    ]
    .into_iter()
    .chain(FIXED_MTRRS)
    .chain(IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * VARIABLE_MTRRS)
}

/// The 4 KiB MSR bitmap (SDM Vol. 3C, 25.6.9): one bit per MSR for reads
/// of 0-1FFFH, reads of C0000000H-C0001FFFH, then writes of each; a set bit
/// makes the access exit. Works on the page the VMCS points to.
pub struct MsrBitmap<'a>(pub &'a mut [u8; 4096]);

impl MsrBitmap<'_> {
    /// Every access exits.
    pub fn exit_all(&mut self) {
        self.0.fill(0xff);
    }

    /// Byte offset and bit of `index` in the read half; `None` outside the
    /// two ranges the bitmap covers (those always exit).
    fn position(index: u32) -> Option<(usize, u8)> {
        let (base, n) = match index {
            0..=0x1fff => (0, index),
            0xc000_0000..=0xc000_1fff => (1024, index - 0xc000_0000),
            _ => return None,
        };
        Some((base + (n / 8) as usize, 1 << (n % 8)))
    }

    /// Lets the guest read and write `index` without exits.
    pub fn pass_through(&mut self, index: u32) {
        if let Some((byte, bit)) = Self::position(index) {
            self.0[byte] &= !bit;
            self.0[byte + 2048] &= !bit;
        }
    }

    /// Whether a read (`write` false) or write of `index` exits.
    pub fn exits(&self, index: u32, write: bool) -> bool {
        Self::position(index).is_none_or(|(byte, bit)| self.0[byte + if write { 2048 } else { 0 }] & bit != 0)
    }
}

/// The MSRs a guest may access without exits: their guest values are in the
/// CPU for the whole run and the CPU itself switches them at entry and exit
/// (the FS/GS bases and SYSENTER_* through the VMCS guest-state area, SDM
/// 27.3.2.1 and 28.3.1; the SYSCALL MSRs, KERNEL_GS_BASE and TSC_AUX through
/// the MSR-load/store lists), and the CPU checks what is written as it would
/// outside VMX. PAT, EFER, the TSC and everything emulated still exit.
pub const PASS_THROUGH: [u32; 11] = [
    IA32_FS_BASE,
    IA32_GS_BASE,
    IA32_KERNEL_GSBASE,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_ESP,
    IA32_SYSENTER_EIP,
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_TSC_AUX,
];

#[cfg(test)]
mod tests {
    use super::*;

    const F: MsrFeatures = MsrFeatures { phys_addr_bits: 36, rdtscp: true, tsc_adjust: true };

    fn msrs() -> GuestMsrs {
        GuestMsrs::reset(0xfee0_0900)
    }

    #[test]
    fn unknown_msrs_do_not_exist_for_guest_or_host() {
        let mut m = msrs();
        for index in [0x8765_4321, IA32_FEATURE_CONTROL, 0x186 /* PERFEVTSEL0 */, 0x345 /* PERF_CAPABILITIES */] {
            assert_eq!(m.read(index, Access::Guest, 0, &F), Err(MsrError::Unknown), "{index:#x}");
            assert_eq!(m.write(index, 0, Access::Host, 0, &F), Err(MsrError::Unknown), "{index:#x}");
        }
    }

    #[test]
    fn apic_base_is_virtual_and_checked() {
        let mut m = msrs();
        assert_eq!(m.read(IA32_APIC_BASE, Access::Guest, 0, &F), Ok(0xfee0_0900));
        assert_eq!(m.write(IA32_APIC_BASE, 0xfed0_0800, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.apic_base, 0xfed0_0800);
        for bad in [0xfee0_0901, 0xfee0_0d00 /* x2APIC */, 1 << 36] {
            assert_eq!(m.write(IA32_APIC_BASE, bad, Access::Guest, 0, &F), Err(MsrError::Invalid), "{bad:#x}");
        }
    }

    #[test]
    fn tsc_writes_move_tsc_adjust_only_when_the_guest_writes() {
        let mut m = msrs();
        m.write(IA32_TIME_STAMP_COUNTER, 1000, Access::Guest, 5000, &F).unwrap();
        assert_eq!(m.read(IA32_TIME_STAMP_COUNTER, Access::Guest, 5100, &F), Ok(1100));
        assert_eq!(m.tsc_adjust as i64, -4000);
        m.write(IA32_TIME_STAMP_COUNTER, 0, Access::Host, 5000, &F).unwrap();
        assert_eq!(m.tsc_adjust as i64, -4000, "host writes leave TSC_ADJUST");
        // Writing TSC_ADJUST moves the TSC by the difference.
        m.write(IA32_TSC_ADJUST, (-3000i64) as u64, Access::Guest, 5000, &F).unwrap();
        assert_eq!(m.read(IA32_TIME_STAMP_COUNTER, Access::Guest, 5000, &F), Ok(1000));
        let no_adjust = MsrFeatures { tsc_adjust: false, ..F };
        assert_eq!(m.read(IA32_TSC_ADJUST, Access::Guest, 0, &no_adjust), Err(MsrError::Unknown));
        assert!(m.read(IA32_TSC_ADJUST, Access::Host, 0, &no_adjust).is_ok());
    }

    #[test]
    fn tsc_aux_exists_with_rdtscp_and_holds_32_bits() {
        let mut m = msrs();
        assert_eq!(m.write(IA32_TSC_AUX, 0x1234, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.write(IA32_TSC_AUX, 1 << 32, Access::Guest, 0, &F), Err(MsrError::Invalid));
        let no_rdtscp = MsrFeatures { rdtscp: false, ..F };
        assert_eq!(m.read(IA32_TSC_AUX, Access::Guest, 0, &no_rdtscp), Err(MsrError::Unknown));
        assert_eq!(m.read(IA32_TSC_AUX, Access::Host, 0, &no_rdtscp), Ok(0x1234));
    }

    #[test]
    fn mtrrs_are_stored_and_validated() {
        let mut m = msrs();
        assert_eq!(m.read(IA32_MTRRCAP, Access::Guest, 0, &F), Ok(0x508));
        assert_eq!(m.write(IA32_MTRRCAP, 0, Access::Guest, 0, &F), Err(MsrError::Invalid));
        assert_eq!(m.write(IA32_MTRR_DEF_TYPE, 0xc06, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.read(IA32_MTRR_DEF_TYPE, Access::Guest, 0, &F), Ok(0xc06));
        for bad in [0x1006, 0xc07, 0xc02] {
            assert_eq!(m.write(IA32_MTRR_DEF_TYPE, bad, Access::Guest, 0, &F), Err(MsrError::Invalid), "{bad:#x}");
        }
        assert_eq!(m.write(IA32_MTRR_FIX4K_F8000, 0x0606_0606_0505_0000, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.write(IA32_MTRR_FIX4K_F8000, 0x0700, Access::Guest, 0, &F), Err(MsrError::Invalid));
        // PHYSBASE0 = 0 WB; PHYSMASK0 = 16 MiB, valid.
        assert_eq!(m.write(IA32_MTRR_PHYSBASE0, 0x6, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.write(IA32_MTRR_PHYSMASK0, 0xf_ff00_0800, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.read(IA32_MTRR_PHYSMASK0, Access::Guest, 0, &F), Ok(0xf_ff00_0800));
        assert_eq!(m.write(IA32_MTRR_PHYSMASK0, 0x1f_ff00_0800, Access::Guest, 0, &F), Err(MsrError::Invalid), "beyond 36 bits");
        assert_eq!(m.write(IA32_MTRR_PHYSBASE0, 0x106, Access::Guest, 0, &F), Err(MsrError::Invalid), "reserved bit 8");
        assert_eq!(m.read(IA32_MTRR_PHYSBASE0 + 16, Access::Guest, 0, &F), Err(MsrError::Unknown), "only 8 pairs");
    }

    #[test]
    fn pat_and_misc_enable_follow_their_rules() {
        let mut m = msrs();
        assert_eq!(m.write(IA32_PAT, 0x0007_0106_0007_0106, Access::Guest, 0, &F), Ok(()));
        assert_eq!(m.write(IA32_PAT, 0x0007_0206_0007_0106, Access::Guest, 0, &F), Err(MsrError::Invalid));
        assert_eq!(m.read(IA32_MISC_ENABLE, Access::Guest, 0, &F), Ok(MISC_ENABLE_RESET));
        assert_eq!(m.write(IA32_MISC_ENABLE, 0, Access::Guest, 0, &F), Err(MsrError::Invalid), "read-only bits");
        m.write(IA32_MISC_ENABLE, MISC_ENABLE_RESET | 1 | MISC_ENABLE_EMON, Access::Guest, 0, &F).unwrap();
        assert_eq!(m.misc_enable, MISC_ENABLE_RESET | 1, "EMON ignored");
        m.write(IA32_MISC_ENABLE, 0, Access::Host, 0, &F).unwrap();
        assert_eq!(m.misc_enable, 0, "the VMM sets anything");
    }

    #[test]
    fn every_listed_msr_is_readable_by_the_vmm() {
        let mut m = msrs();
        let sregs_msrs = [IA32_EFER, IA32_FS_BASE, IA32_GS_BASE];
        for index in index_list().filter(|i| !sregs_msrs.contains(i)) {
            assert!(m.read(index, Access::Host, 0, &F).is_ok(), "{index:#x}");
        }
        assert_eq!(index_list().count(), 20 + 11 + 16);
    }

    #[test]
    fn bitmap_passes_through_only_what_it_is_told() {
        let mut page = [0u8; 4096];
        let mut b = MsrBitmap(&mut page);
        b.exit_all();
        for m in PASS_THROUGH {
            b.pass_through(m);
        }
        assert!(!b.exits(IA32_FS_BASE, false) && !b.exits(IA32_FS_BASE, true));
        assert!(!b.exits(IA32_SYSENTER_CS, true));
        assert!(b.exits(IA32_EFER, true) && b.exits(IA32_PAT, false) && b.exits(IA32_APIC_BASE, false));
        assert!(b.exits(IA32_TIME_STAMP_COUNTER, false));
        assert!(b.exits(0x4000_0000, false), "outside the bitmap always exits");
        // SYSENTER_CS is 0x174: read-low byte 0x2e bit 4, write-low 0x82e.
        assert_eq!(b.0[0x2e] & 0x10, 0);
        assert_eq!(b.0[0x82e] & 0x10, 0);
        // FS_BASE is 0xc0000100: read-high byte 1024 + 0x20, bit 0.
        assert_eq!(b.0[1024 + 0x20] & 1, 0);
        assert_eq!(b.0.iter().map(|byte| byte.count_zeros()).sum::<u32>(), 2 * PASS_THROUGH.len() as u32);
    }
}
