//! CPUID as rkvm offers it to guests: which host leaves KVM_GET_SUPPORTED_CPUID
//! reports and which feature bits survive (only what a vCPU virtualizes
//! correctly), and how a guest's CPUID is answered from the table that
//! KVM_SET_CPUID2 installs (api.rst 4.46 and 4.20).

/// One CPUID result, as `struct kvm_cpuid_entry2` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Entry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX (1): `index` selects a sub-leaf.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `index` matters for this leaf.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// The hypervisor leaf rkvm adds: signature "rkvmrkvmrkvm".
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;

/// Highest basic leaf offered (newer leaves describe features rkvm does not
/// virtualize).
const MAX_BASIC: u32 = 0xd;
/// Highest extended leaf offered.
const MAX_EXTENDED: u32 = 0x8000_0008;

/// Leaf 1 ECX bits offered: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2,
/// MOVBE, POPCNT, AES, RDRAND; plus the hypervisor bit. Not offered: MONITOR
/// (MWAIT exits), VMX, SMX, EST, TM2, PDCM, x2APIC (not emulated),
/// TSC-deadline (no APIC timer). OSXSAVE is set at run time from CR4.
const LEAF1_ECX: u32 = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20)
    | (1 << 22) | (1 << 23) | (1 << 25) | (1 << 30);
/// Leaf 1 ECX bits offered where the host lets guests use XSAVE with AVX:
/// FMA, XSAVE, AVX, F16C.
const LEAF1_ECX_AVX: u32 = (1 << 12) | LEAF1_ECX_XSAVE | (1 << 28) | (1 << 29);
/// XSAVE (CPUID.1:ECX[26]).
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// OSXSAVE (CPUID.1:ECX[27]): CR4.OSXSAVE as the guest set it.
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// AVX2 (CPUID.(7,0):EBX[5]), with XSAVE and AVX.
const LEAF7_EBX_AVX2: u32 = 1 << 5;
/// CPUID.(0DH,1):EAX offered: XSAVEOPT, XSAVEC, XGETBV with ECX=1. Not
/// XSAVES: it needs IA32_XSS, which is not virtualized.
const XSAVE_LEAF1_EAX: u32 = 0b111;
/// On-chip APIC (CPUID.1:EDX[9]).
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// Hypervisor present (CPUID.1:ECX[31]).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits offered: FPU, VME, DE, PSE, TSC, MSR, PAE, CX8, APIC,
/// SEP, MTRR, PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2. The APIC
/// is the VMM's to emulate (its page is MMIO, its interrupts come through
/// KVM_INTERRUPT), as with KVM without an in-kernel irqchip, which offers the
/// bit too. Not offered: MCE, MCA (no machine-check MSRs), DS, ACPI, SS,
/// HTT, TM, PBE.
const LEAF1_EDX: u32 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6)
    | (1 << 8) | LEAF1_EDX_APIC | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 15) | (1 << 16) | (1 << 17) | (1 << 19)
    | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26);
/// Leaf 7.0 EBX bits offered: FSGSBASE, TSC_ADJUST, BMI1, SMEP, BMI2, ERMS,
/// SMAP, ADX, CLFLUSHOPT.
const LEAF7_EBX: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23);
/// Leaf 0x80000001 EDX bits offered: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// Leaf 0x80000001 ECX bits offered: LAHF/SAHF in 64-bit mode, LZCNT,
/// PREFETCHW.
const EXT1_ECX: u32 = (1 << 0) | (1 << 5) | (1 << 8);

/// The leaves and sub-leaves to report, given the host's maximum basic and
/// extended leaves and whether guests get XSAVE. Sub-leaf-indexed leaves
/// (4, 7, 0xb) get index 0 only, enough for the features rkvm offers; leaf
/// 0DH gets sub-leaves 0-2 (x87/SSE, XSAVE instructions, AVX) with XSAVE.
pub fn leaves(host_max_basic: u32, host_max_extended: u32, xsave: bool) -> impl Iterator<Item = (u32, u32)> {
    let basic = 0..=host_max_basic.min(MAX_BASIC);
    let extended = 0x8000_0000..=host_max_extended.min(MAX_EXTENDED);
    let last_xsave_subleaf = if xsave && host_max_basic >= 0xd { 2 } else { 0 };
    basic.chain(extended).map(|f| (f, 0)).chain((1..=last_xsave_subleaf).map(|i| (0xd, i)))
}

/// Whether `function`'s result depends on ECX.
pub fn indexed(function: u32) -> bool {
    matches!(function, 4 | 7 | 0xb | 0xd)
}

/// The entry rkvm reports for a host result `r` of leaf `function`; `xsave`
/// says whether guests get XSAVE with x87, SSE and AVX.
pub fn supported(function: u32, index: u32, r: [u32; 4], xsave: bool) -> Entry {
    let [mut eax, mut ebx, mut ecx, mut edx] = r;
    match function {
        0 => eax = eax.min(MAX_BASIC),
        1 => {
            // EBX[31:24] (initial APIC ID) is the VMM's to set per vCPU.
            ebx &= 0x00ff_ffff;
            let offered = if xsave { LEAF1_ECX | LEAF1_ECX_AVX } else { LEAF1_ECX };
            ecx = (ecx & offered) | LEAF1_ECX_HYPERVISOR;
            edx &= LEAF1_EDX;
        }
        // Thermal/power, DCA, the PMU (no counters virtualized yet): empty.
        6 | 9 | 0xa => (eax, ebx, ecx, edx) = (0, 0, 0, 0),
        0xd if !xsave => (eax, ebx, ecx, edx) = (0, 0, 0, 0),
        // The components rkvm switches, and the area size they need.
        0xd if index == 0 => {
            eax &= crate::xsave::SUPPORTED as u32;
            ebx = crate::xsave::required_size(eax.into());
            (ecx, edx) = (ebx, 0);
        }
        0xd if index == 1 => (eax, ebx, ecx, edx) = (eax & XSAVE_LEAF1_EAX, 0, 0, 0),
        // Sub-leaf 2 (AVX: size and offset) as the host has it.
        0xd => (ecx, edx) = (0, 0),
        7 => {
            eax = 0;
            ebx &= if xsave { LEAF7_EBX | LEAF7_EBX_AVX2 } else { LEAF7_EBX };
            (ecx, edx) = (0, 0);
        }
        0x8000_0000 => eax = eax.min(MAX_EXTENDED),
        0x8000_0001 => {
            ecx &= EXT1_ECX;
            edx &= EXT1_EDX;
        }
        _ => {}
    }
    Entry { function, index, flags: if indexed(function) { FLAG_SIGNIFICANT_INDEX } else { 0 }, eax, ebx, ecx, edx }
}

/// The parts of a CPUID result that follow the vCPU's state rather than the
/// table, as KVM's `kvm_update_cpuid_runtime`: CPUID.1:ECX.OSXSAVE mirrors
/// CR4.OSXSAVE (when the table offers XSAVE), CPUID.1:EDX.APIC is clear
/// while IA32_APIC_BASE.EN is (SDM Vol. 3A, 11.4.3: a globally disabled
/// APIC is not reported), and CPUID.(0DH,0):EBX is the XSAVE area size for
/// the current XCR0 (SDM Vol. 1, 13.2).
pub fn runtime(function: u32, index: u32, r: &mut [u32; 4], cr4_osxsave: bool, xcr0: u64, apic_enabled: bool) {
    match (function, index) {
        (1, _) => {
            r[2] &= !LEAF1_ECX_OSXSAVE;
            if cr4_osxsave && r[2] & LEAF1_ECX_XSAVE != 0 {
                r[2] |= LEAF1_ECX_OSXSAVE;
            }
            if !apic_enabled {
                r[3] &= !LEAF1_EDX_APIC;
            }
        }
        (0xd, 0) if r[0] != 0 => r[1] = crate::xsave::required_size(xcr0),
        _ => {}
    }
}

/// The hypervisor leaf: the highest hypervisor leaf (itself) and the
/// signature "rkvmrkvmrkvm" in EBX, ECX, EDX.
pub fn hypervisor_leaf() -> Entry {
    let sig = u32::from_le_bytes(*b"rkvm");
    Entry { function: HYPERVISOR_LEAF, index: 0, flags: 0, eax: HYPERVISOR_LEAF, ebx: sig, ecx: sig, edx: sig }
}

/// The guest's CPUID for (`function`, `index`) from `table`: the matching
/// entry (the index counts only where the entry says so), or zeros, as KVM
/// gives for leaves it has no entry for.
pub fn lookup(table: &[Entry], function: u32, index: u32) -> [u32; 4] {
    table
        .iter()
        .find(|e| e.function == function && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == index))
        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn vmx_is_hidden_and_the_hypervisor_bit_set() {
        let e = supported(1, 0, [0x306c3, 0x0102_0800, 0xffff_ffff, 0xffff_ffff], false);
        assert_eq!(e.ecx & (1 << 5), 0, "VMX");
        assert_ne!(e.ecx & (1 << 31), 0, "hypervisor");
        assert_eq!(e.ecx & (1 << 26), 0, "XSAVE");
        assert_eq!(e.ecx & (1 << 21), 0, "x2APIC");
        assert_eq!(e.ebx >> 24, 0, "APIC ID left to the VMM");
        assert_eq!(e.eax, 0x306c3, "family/model/stepping pass through");
    }

    #[test]
    fn long_mode_and_nx_survive_in_the_extended_leaf() {
        let e = supported(0x8000_0001, 0, [0, 0, 0, (1 << 29) | (1 << 20) | (1 << 2)], true);
        assert_eq!(e.edx, (1 << 29) | (1 << 20));
    }

    #[test]
    fn the_leaf_list_is_capped_and_pmu_and_xsave_are_empty() {
        let all: Vec<_> = leaves(0x16, 0x8000_0008, false).collect();
        assert_eq!(all.first(), Some(&(0, 0)));
        assert!(all.contains(&(0xd, 0)) && !all.contains(&(0xe, 0)) && !all.contains(&(0xd, 1)));
        assert_eq!(all.last(), Some(&(0x8000_0008, 0)));
        assert_eq!(supported(0, 0, [0x16, 1, 2, 3], true).eax, MAX_BASIC);
        let xsave = supported(0xd, 0, [7, 832, 832, 0], false);
        assert_eq!([xsave.eax, xsave.ebx, xsave.ecx, xsave.edx], [0; 4]);
        let pmu = supported(0xa, 0, [0x0730_0403, 0, 0, 0x603], true);
        assert_eq!([pmu.eax, pmu.ebx, pmu.ecx, pmu.edx], [0; 4]);
    }

    #[test]
    fn with_xsave_avx_is_offered_and_leaf_0xd_limited_to_x87_sse_avx() {
        let e = supported(1, 0, [0x306c3, 0, 0xffff_ffff, 0xffff_ffff], true);
        assert_ne!(e.ecx & LEAF1_ECX_XSAVE, 0);
        assert_ne!(e.ecx & (1 << 28), 0, "AVX");
        assert_eq!(e.ecx & LEAF1_ECX_OSXSAVE, 0, "OSXSAVE follows CR4 at run time");
        let all: Vec<_> = leaves(0xd, 0x8000_0008, true).collect();
        assert!(all.contains(&(0xd, 1)) && all.contains(&(0xd, 2)));
        // A host with AVX-512 (XCR0 bits 5-7) still offers x87/SSE/AVX only.
        let d0 = supported(0xd, 0, [0xe7, 2696, 2696, 0], true);
        assert_eq!([d0.eax, d0.ebx, d0.ecx, d0.edx], [7, 832, 832, 0]);
        let d1 = supported(0xd, 1, [0xf, 0x100, 0x300, 0], true);
        assert_eq!([d1.eax, d1.ebx, d1.ecx, d1.edx], [0x7, 0, 0, 0], "no XSAVES");
        assert_eq!(d0.flags, FLAG_SIGNIFICANT_INDEX);
    }

    #[test]
    fn osxsave_and_the_xsave_size_follow_the_vcpu() {
        let mut leaf1 = [0, 0, LEAF1_ECX_XSAVE, 0];
        runtime(1, 0, &mut leaf1, true, 1, true);
        assert_ne!(leaf1[2] & LEAF1_ECX_OSXSAVE, 0);
        runtime(1, 0, &mut leaf1, false, 1, true);
        assert_eq!(leaf1[2] & LEAF1_ECX_OSXSAVE, 0);
        let mut no_xsave = [0, 0, LEAF1_ECX_OSXSAVE, 0];
        runtime(1, 0, &mut no_xsave, true, 1, true);
        assert_eq!(no_xsave[2], 0, "no OSXSAVE without XSAVE in the table");
        let mut d0 = [7, 0, 832, 0];
        runtime(0xd, 0, &mut d0, true, 3, true);
        assert_eq!(d0[1], 576);
        runtime(0xd, 0, &mut d0, true, 7, true);
        assert_eq!(d0[1], 832);
    }

    #[test]
    fn the_apic_bit_is_offered_and_follows_apic_base_enable() {
        assert_ne!(supported(1, 0, [0, 0, 0, u32::MAX], false).edx & LEAF1_EDX_APIC, 0);
        let mut leaf1 = [0, 0, 0, LEAF1_EDX_APIC | 1];
        runtime(1, 0, &mut leaf1, false, 1, true);
        assert_eq!(leaf1[3], LEAF1_EDX_APIC | 1);
        runtime(1, 0, &mut leaf1, false, 1, false);
        assert_eq!(leaf1[3], 1, "a globally disabled APIC is not reported");
    }

    #[test]
    fn lookup_respects_significant_index() {
        let table = [
            Entry { function: 1, eax: 0x600, ..Default::default() },
            Entry { function: 7, index: 0, flags: FLAG_SIGNIFICANT_INDEX, ebx: 7, ..Default::default() },
        ];
        assert_eq!(lookup(&table, 1, 99)[0], 0x600, "index ignored without the flag");
        assert_eq!(lookup(&table, 7, 0)[1], 7);
        assert_eq!(lookup(&table, 7, 1), [0; 4]);
        assert_eq!(lookup(&table, 0x8000_0000, 0), [0; 4]);
    }

    #[test]
    fn hypervisor_signature_reads_rkvm() {
        let e = hypervisor_leaf();
        let mut sig = Vec::new();
        for r in [e.ebx, e.ecx, e.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"rkvmrkvmrkvm");
    }
}
