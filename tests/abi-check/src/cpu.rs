//! MSRs and XSAVE state: the ioctls that read and write them
//! (KVM_GET_MSR_INDEX_LIST, KVM_GET_MSRS/KVM_SET_MSRS,
//! KVM_GET_XCRS/KVM_SET_XCRS, KVM_GET_XSAVE/KVM_SET_XSAVE) and what a guest
//! sees of them through RDMSR/WRMSR and XGETBV/XSETBV.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use crate::guest::{cpuid_entry, report_and_halt, reported, Guest, GP_VECTOR, HLT};
use crate::{ioctl_result, Checks};

const TSC: u32 = 0x10;
const APIC_BASE: u32 = 0x1b;
const MTRR_CAP: u32 = 0xfe;
const SYSENTER_CS: u32 = 0x174;
const MISC_ENABLE: u32 = 0x1a0;
const MTRR_PHYSBASE0: u32 = 0x200;
const MTRR_PHYSMASK0: u32 = 0x201;
const PAT: u32 = 0x277;
const MTRR_DEF_TYPE: u32 = 0x2ff;
const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const SFMASK: u32 = 0xc000_0084;
const KERNEL_GS_BASE: u32 = 0xc000_0102;
const TSC_AUX: u32 = 0xc000_0103;
/// In KVM's paravirtual range, unassigned.
const UNKNOWN_PV: u32 = 0x4b56_4d99;
/// Implemented by no CPU or hypervisor.
const UNKNOWN: u32 = 0x8765_4321;

fn msr_list(entries: &[(u32, u64)]) -> Msrs {
    let e: Vec<kvm_bindings::kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    Msrs::from_entries(&e).expect("a short MSR list")
}

/// KVM_GET_MSRS of one MSR: its value, or what the ioctl answered.
fn get_msr(vcpu: &VcpuFd, index: u32) -> Result<u64, String> {
    let mut msrs = msr_list(&[(index, 0)]);
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        r => Err(format!("KVM_GET_MSRS: {r:?}")),
    }
}

/// KVM_SET_MSRS of one MSR, then KVM_GET_MSRS of it.
fn set_and_get_msr(vcpu: &VcpuFd, index: u32, value: u64) -> Result<u64, String> {
    match vcpu.set_msrs(&msr_list(&[(index, value)])) {
        Ok(1) => get_msr(vcpu, index),
        r => Err(format!("KVM_SET_MSRS: {r:?}")),
    }
}

/// KVM_GET_MSR_INDEX_LIST names the MSRs a VMM saves and restores; asked
/// into too small a list it fails with E2BIG and writes back the count
/// needed (api.rst 4.3). KVM does not list IA32_APIC_BASE (VMMs move it
/// with KVM_GET_SREGS/KVM_SET_SREGS) or the MTRRs (VMMs know them from
/// CPUID), though KVM_GET_MSRS and KVM_SET_MSRS take them; rkvm lists
/// every MSR it takes.
pub fn msr_index_list_checks(c: &mut Checks, kvm: &Kvm, rkvm_semantics: bool) {
    let Some(list) = c.success("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list()) else { return };
    let listed = list.as_slice();
    let missing = |wanted: &[u32]| -> Vec<String> {
        wanted.iter().filter(|i| !listed.contains(i)).map(|i| format!("{i:#x}")).collect()
    };
    let m = missing(&[TSC, PAT, STAR, MISC_ENABLE]);
    c.check("KVM_GET_MSR_INDEX_LIST has TSC, PAT, STAR and MISC_ENABLE", m.is_empty(), format!("missing {m:?}"));
    // KVM lists TSC_AUX where it offers RDTSCP (CPUID.80000001H:EDX[27])
    // or RDPID (CPUID.(EAX=7,ECX=0):ECX[22]).
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
    let entry = |function| cpuid.as_ref().ok().and_then(|t| cpuid_entry(t, function, 0));
    let tsc_aux = entry(0x8000_0001).is_some_and(|e| e.edx & (1 << 27) != 0)
        || entry(7).is_some_and(|e| e.ecx & (1 << 22) != 0);
    c.check("KVM_GET_MSR_INDEX_LIST has TSC_AUX if RDTSCP or RDPID is offered",
            !tsc_aux || listed.contains(&TSC_AUX), "missing");
    if rkvm_semantics {
        let m = missing(&[APIC_BASE, MTRR_CAP, MTRR_DEF_TYPE, MTRR_PHYSBASE0, MTRR_PHYSMASK0, TSC_AUX]);
        c.check("rkvm: KVM_GET_MSR_INDEX_LIST also has APIC_BASE, the MTRRs and TSC_AUX (KVM: not all)",
                m.is_empty(), format!("missing {m:?}"));
    }
    // struct kvm_msr_list { nmsrs = 1; indices[1] }.
    let mut short: [u32; 2] = [1, 0];
    // SAFETY: _IOWR(KVMIO, 0x02, struct kvm_msr_list) writes at most nmsrs
    // (1) indices after the count, and `short` has room for both.
    let r = ioctl_result(unsafe { libc::ioctl(kvm.as_raw_fd(), 0xc004_ae02, short.as_mut_ptr()) });
    c.check("KVM_GET_MSR_INDEX_LIST into 1 entry fails with E2BIG and writes back the count",
            r == Err(libc::E2BIG) && short[0] as usize == listed.len(),
            format!("{r:?}, count {} of {}", short[0], listed.len()));
}

/// KVM_GET_MSRS and KVM_SET_MSRS for the MSRs a guest boot needs: values
/// round-trip, processing stops at the first unknown MSR or bad value and
/// the count says so, and the TSC is accepted.
pub fn msr_checks(c: &mut Checks, kvm: &Kvm) {
    let Some(vm) = c.success("KVM_CREATE_VM for MSR checks", kvm.create_vm()) else { return };
    let Some(vcpu) = c.success("KVM_CREATE_VCPU for MSR checks", vm.create_vcpu(0)) else { return };
    let values = [
        (STAR, 0x0023_0010_0000_0000),
        (LSTAR, 0xffff_ffff_8100_0000),
        (SFMASK, 0x4_7700),
        (KERNEL_GS_BASE, 0x7fff_0000_1000),
        (SYSENTER_CS, 0x10),
        (PAT, 0x0007_0406_0007_0406),
    ];
    let set = vcpu.set_msrs(&msr_list(&values));
    c.check("KVM_SET_MSRS sets STAR, LSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS, PAT",
            matches!(set, Ok(6)), format!("{set:?}"));
    let mut back = msr_list(&values.map(|(i, _)| (i, 0)));
    let got = vcpu.get_msrs(&mut back);
    c.check("KVM_GET_MSRS returns them",
            matches!(got, Ok(6)) && back.as_slice().iter().zip(values).all(|(e, (_, v))| e.data == v),
            format!("{got:?} {:x?}", back.as_slice().iter().map(|e| e.data).collect::<Vec<_>>()));
    let partial = vcpu.set_msrs(&msr_list(&[(STAR, 1), (UNKNOWN_PV, 2), (LSTAR, 3)]));
    c.check("KVM_SET_MSRS stops at an unknown MSR and counts what it set", matches!(partial, Ok(1)),
            format!("{partial:?}"));
    let set_tsc = vcpu.set_msrs(&msr_list(&[(TSC, 1 << 40)]));
    let mut tsc = msr_list(&[(TSC, 0)]);
    let got = vcpu.get_msrs(&mut tsc);
    // KVM may adjust a host-written TSC (its TSC synchronization), so only
    // the ioctls' answers are compared here.
    c.check("KVM_SET_MSRS and KVM_GET_MSRS take the TSC", matches!(set_tsc, Ok(1)) && matches!(got, Ok(1)),
            format!("{set_tsc:?} {got:?}"));
}

/// A new vCPU's APIC base and MTRRs as the host sees them (SDM Vol. 3A,
/// 11.4.4 "Local APIC Status and Location" and 12.11 "Memory Type Range
/// Registers"), and an MSR no one implements, refused by both ioctls.
pub fn msr_state_checks(c: &mut Checks, kvm: &Kvm) {
    let Some(g) = c.success("a vCPU with the supported CPUID for MSR state checks", Guest::new(kvm, &HLT)) else {
        return;
    };
    let vcpu = &g.vcpu;
    let r = get_msr(vcpu, APIC_BASE);
    c.check("IA32_APIC_BASE of vCPU 0 is 0xfee00900 (enabled, BSP)", r == Ok(0xfee0_0900), format!("{r:x?}"));
    let r = get_msr(vcpu, MTRR_CAP);
    c.check("MTRRcap has 8 variable-range MTRRs (VCNT)", r.as_ref().is_ok_and(|v| v & 0xff == 8), format!("{r:x?}"));
    let r = set_and_get_msr(vcpu, MTRR_DEF_TYPE, 0xc06);
    c.check("MTRR_DEF_TYPE 0xc06 (enabled, fixed enabled, WB) is set and read back", r == Ok(0xc06),
            format!("{r:x?}"));
    let base = set_and_get_msr(vcpu, MTRR_PHYSBASE0, 0x6);
    let mask = set_and_get_msr(vcpu, MTRR_PHYSMASK0, 0xff00_0800);
    c.check("MTRR_PHYSBASE0 0x6 and PHYSMASK0 0xff000800 are set and read back",
            base == Ok(0x6) && mask == Ok(0xff00_0800), format!("{base:x?} {mask:x?}"));
    let r = get_msr(vcpu, MISC_ENABLE);
    c.check("MISC_ENABLE is readable", r.is_ok(), format!("{r:x?}"));
    let set = vcpu.set_msrs(&msr_list(&[(UNKNOWN, 1)]));
    c.check("KVM_SET_MSRS of MSR 0x87654321 sets none", matches!(set, Ok(0)), format!("{set:?}"));
    let got = vcpu.get_msrs(&mut msr_list(&[(UNKNOWN, 0)]));
    c.check("KVM_GET_MSRS of MSR 0x87654321 gets none", matches!(got, Ok(0)), format!("{got:?}"));
}

/// RDMSR and WRMSR from the guest (legal in real mode, CPL 0): an MSR no
/// one implements raises #GP (SDM Vol. 2B, RDMSR "Real-Address Mode
/// Exceptions"), and IA32_APIC_BASE keeps what the guest writes.
pub fn msr_guest_checks(c: &mut Checks, kvm: &Kvm) {
    let rdmsr_unknown = [
        0x66, 0xb9, 0x21, 0x43, 0x65, 0x87, // mov ecx, 0x87654321
        0x0f, 0x32,                         // rdmsr: #GP
        0xb0, b'R', 0xe6, 0x99,             // mov al, 'R'; out 0x99, al (RDMSR succeeded)
        0xf4,                               // hlt
    ];
    let Some(mut g) = c.success("a real-mode guest that reads MSR 0x87654321", Guest::new(kvm, &rdmsr_unknown))
    else { return };
    g.handle(GP_VECTOR, &report_and_halt(b'G'));
    let exit = g.run();
    c.check("RDMSR of MSR 0x87654321 raises #GP in the guest", exit == reported(b'G'), exit);

    let apic_base = [
        0x66, 0xb9, 0x1b, 0x00, 0x00, 0x00, // mov ecx, 0x1b (IA32_APIC_BASE)
        0x66, 0xb8, 0x00, 0x09, 0xe0, 0xfe, // mov eax, 0xfee00900
        0x66, 0x31, 0xd2,                   // xor edx, edx
        0x0f, 0x30,                         // wrmsr
        0x66, 0x31, 0xc0,                   // xor eax, eax
        0x0f, 0x32,                         // rdmsr
        0x66, 0x3d, 0x00, 0x09, 0xe0, 0xfe, // cmp eax, 0xfee00900
        0xb0, b'Y',                         // mov al, 'Y'
        0x74, 0x02,                         // je out
        0xb0, b'N',                         // mov al, 'N'
        0xe6, 0x99,                         // out: out 0x99, al
        0xf4,                               // hlt
    ];
    let Some(mut g) = c.success("a real-mode guest that writes and reads IA32_APIC_BASE", Guest::new(kvm, &apic_base))
    else { return };
    g.handle(GP_VECTOR, &report_and_halt(b'G'));
    let exit = g.run();
    c.check("the guest's WRMSR of IA32_APIC_BASE 0xfee00900 is read back by RDMSR", exit == reported(b'Y'), exit);
}

/// XSAVE area offsets (SDM Vol. 1, 13.4 "XSAVE Area"), as indices of the
/// u32 words of `kvm_xsave::region`.
const XSAVE_XMM1: usize = (160 + 16) / 4;
const XSAVE_XSTATE_BV: usize = 512 / 4;
const XSAVE_XCOMP_BV: usize = 520 / 4;
const XSAVE_HEADER_RESERVED: usize = 528 / 4;

/// XCR0 bits (SDM Vol. 1, 13.3).
const XCR0_X87: u64 = 1;
const XCR0_SSE: u64 = 2;
const XCR0_AVX: u64 = 4;

/// KVM_GET_XCRS/KVM_SET_XCRS and KVM_GET_XSAVE/KVM_SET_XSAVE (api.rst 4.42
/// to 4.45), and XSETBV from a guest, if the device reports them. XGETBV
/// only with `unrestricted_guest`: KVM's instruction emulator has no XGETBV.
pub fn xsave_checks(c: &mut Checks, kvm: &Kvm, unrestricted_guest: bool) {
    let (xsave, xcrs) = (kvm.check_extension(Cap::Xsave), kvm.check_extension(Cap::Xcrs));
    if !xsave || !xcrs {
        c.check("KVM_CAP_XSAVE and KVM_CAP_XCRS are reported absent together (XSAVE checks skipped)",
                !xsave && !xcrs, format!("KVM_CAP_XSAVE {xsave}, KVM_CAP_XCRS {xcrs}"));
        return;
    }
    // KVM_SET_XSAVE reads as much as the vCPU's XSAVE state takes, which is
    // more than struct kvm_xsave only with features a process must ask for
    // (arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)); this one asks for none.
    let size = kvm.check_extension_int(Cap::Xsave2);
    c.check("the XSAVE state fits struct kvm_xsave (KVM_CAP_XSAVE2 is 0 or 4096)", size == 0 || size == 4096, size);
    if size > 4096 {
        return;
    }
    xsave_state_checks(c, kvm);
    xsave_guest_checks(c, kvm);
    if unrestricted_guest {
        xgetbv_checks(c, kvm);
    }
}

/// XCR0 = `value` as KVM_SET_XCRS takes it.
fn xcr0(value: u64) -> kvm_xcrs {
    let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
    xcrs.xcrs[0].value = value;
    xcrs
}

/// x87|SSE|AVX if the supported CPUID offers AVX state in XCR0 (leaf 0xd
/// subleaf 0 EAX), else x87|SSE.
fn widest_xcr0(g: &Guest) -> u64 {
    let avx = g.cpuid_entry(0xd, 0).is_some_and(|e| u64::from(e.eax) & XCR0_AVX != 0);
    XCR0_X87 | XCR0_SSE | if avx { XCR0_AVX } else { 0 }
}

fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the vCPU's XSAVE state fits struct kvm_xsave (checked in
    // `xsave_checks`), so KVM_SET_XSAVE reads only `xsave`.
    unsafe { vcpu.set_xsave(xsave) }
}

/// A copy of `xsave` with `change` made to its region.
fn changed(xsave: &kvm_xsave, change: impl FnOnce(&mut [u32; 1024])) -> kvm_xsave {
    let mut copy = kvm_xsave { region: xsave.region, ..Default::default() };
    change(&mut copy.region);
    copy
}

fn xsave_state_checks(c: &mut Checks, kvm: &Kvm) {
    const PATTERN: [u8; 16] = *b"rkvm xsave xmm1!";
    let Some(g) = c.success("a vCPU with the supported CPUID for XSAVE checks", Guest::new(kvm, &HLT)) else {
        return;
    };
    let vcpu = &g.vcpu;
    let r = vcpu.get_xcrs();
    c.check("a new vCPU's KVM_GET_XCRS has one register, XCR0 = 1 (x87)",
            r.as_ref().is_ok_and(|x| x.nr_xcrs == 1 && x.xcrs[0].xcr == 0 && x.xcrs[0].value == XCR0_X87),
            format!("{:x?}", r.map(|x| (x.nr_xcrs, x.xcrs[0]))));
    let wide = widest_xcr0(&g);
    let r = vcpu.set_xcrs(&xcr0(wide)).map_err(|e| e.to_string())
        .and_then(|()| vcpu.get_xcrs().map(|x| x.xcrs[0].value).map_err(|e| e.to_string()));
    c.check("KVM_SET_XCRS of XCR0 = x87|SSE|AVX (x87|SSE without AVX) is read back", r == Ok(wide),
            format!("set {wide:#x}, got {r:x?}"));
    // XCR0 bit 0 is always 1 (SDM Vol. 1, 13.3).
    c.errno("KVM_SET_XCRS of XCR0 = 2 (x87 clear) fails with EINVAL", vcpu.set_xcrs(&xcr0(XCR0_SSE)), libc::EINVAL);

    let Some(xsave) = c.success("KVM_GET_XSAVE", vcpu.get_xsave()) else { return };
    c.success("KVM_SET_XSAVE of what KVM_GET_XSAVE gave", set_xsave(vcpu, &xsave));
    let with_xmm1 = changed(&xsave, |region| {
        for (i, word) in PATTERN.chunks(4).enumerate() {
            region[XSAVE_XMM1 + i] = u32::from_le_bytes(word.try_into().expect("4 bytes"));
        }
        // XRSTOR loads XMM registers only if XSTATE_BV says SSE state is
        // there (SDM Vol. 1, 13.8.1); otherwise they are initialized.
        region[XSAVE_XSTATE_BV] |= XCR0_SSE as u32;
    });
    let r = set_xsave(vcpu, &with_xmm1).map_err(|e| e.to_string())
        .and_then(|()| vcpu.get_fpu().map_err(|e| e.to_string()));
    c.check("XMM1 set through KVM_SET_XSAVE is seen by KVM_GET_FPU",
            r.as_ref().is_ok_and(|f| f.xmm[1] == PATTERN), format!("{:x?}", r.map(|f| f.xmm[1])));
    // KVM takes the standard format only: XCOMP_BV and the rest of the
    // header must be 0 (SDM Vol. 1, 13.4.2; arch/x86/kernel/fpu/xstate.c).
    let compacted = changed(&xsave, |region| region[XSAVE_XCOMP_BV + 1] = 1 << 31); // XCOMP_BV bit 63
    c.errno("KVM_SET_XSAVE with XCOMP_BV set fails with EINVAL", set_xsave(vcpu, &compacted), libc::EINVAL);
    let bad = changed(&xsave, |region| region[XSAVE_HEADER_RESERVED + 3] = 1);
    c.errno("KVM_SET_XSAVE with a reserved header byte set fails with EINVAL", set_xsave(vcpu, &bad), libc::EINVAL);
}

/// Sets CR4.OSXSAVE (allowed as the supported CPUID offers XSAVE).
const SET_OSXSAVE: [u8; 12] = [
    0x0f, 0x20, 0xe0,                   // mov eax, cr4
    0x66, 0x0d, 0x00, 0x00, 0x04, 0x00, // or eax, 1 << 18 (OSXSAVE)
    0x0f, 0x22, 0xe0,                   // mov cr4, eax
];

/// A real-mode guest sets CR4.OSXSAVE, reports CPUID.1:ECX.OSXSAVE, and
/// sets XCR0 = 5 (AVX without SSE), which raises #GP (SDM Vol. 2C, XSETBV).
fn xsave_guest_checks(c: &mut Checks, kvm: &Kvm) {
    let code = [&SET_OSXSAVE[..], &[
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2,                         // cpuid
        0x66, 0xc1, 0xe9, 0x1b,             // shr ecx, 27
        0x88, 0xc8,                         // mov al, cl
        0x24, 0x01,                         // and al, 1
        0xe6, 0x99,                         // out 0x99, al: OSXSAVE
        0x66, 0xb8, 0x05, 0x00, 0x00, 0x00, // mov eax, 5
        0x66, 0x31, 0xd2,                   // xor edx, edx
        0x66, 0x31, 0xc9,                   // xor ecx, ecx (XCR0)
        0x0f, 0x01, 0xd1,                   // xsetbv: #GP
        0xb0, b'X', 0xe6, 0x99,             // mov al, 'X'; out 0x99, al (XSETBV succeeded)
        0xf4,                               // hlt
    ]].concat();
    let Some(mut g) = c.success("a real-mode guest that sets CR4.OSXSAVE", Guest::new(kvm, &code)) else { return };
    g.handle(GP_VECTOR, &report_and_halt(b'G'));
    let exit = g.run();
    c.check("CPUID.1:ECX.OSXSAVE is 1 once the guest set CR4.OSXSAVE", exit == reported(1), exit);
    let exit = g.run();
    let r = g.vcpu.get_xcrs().map(|x| x.xcrs[0].value);
    c.check("XSETBV of AVX without SSE raises #GP and leaves XCR0 alone",
            exit == reported(b'G') && r.as_ref().is_ok_and(|&v| v == XCR0_X87), format!("{exit}, XCR0 {r:x?}"));
}

/// XGETBV in a real-mode guest reads a new vCPU's XCR0, then the XCR0 the
/// guest set with XSETBV, which KVM_GET_XCRS shows too: the device loads
/// the guest's XCR0 into the CPU and keeps what the guest writes.
fn xgetbv_checks(c: &mut Checks, kvm: &Kvm) {
    let code = [&SET_OSXSAVE[..], &[
        0x66, 0x31, 0xc9,                   // xor ecx, ecx (XCR0)
        0x0f, 0x01, 0xd0,                   // xgetbv
        0xe6, 0x99,                         // out 0x99, al
        0x66, 0x89, 0xd8,                   // mov eax, ebx
        0x66, 0x31, 0xd2,                   // xor edx, edx
        0x0f, 0x01, 0xd1,                   // xsetbv
        0x0f, 0x01, 0xd0,                   // xgetbv
        0xe6, 0x99,                         // out 0x99, al
        0xf4,                               // hlt
    ]].concat();
    let Some(mut g) = c.success("a real-mode guest that reads and sets XCR0", Guest::new(kvm, &code)) else { return };
    g.handle(GP_VECTOR, &report_and_halt(b'G'));
    let wide = widest_xcr0(&g);
    let regs = g.vcpu.get_regs().map(|r| kvm_bindings::kvm_regs { rbx: wide, ..r });
    c.success("KVM_SET_REGS with the XCR0 to set in EBX", regs.and_then(|r| g.vcpu.set_regs(&r)));
    let exit = g.run();
    c.check("XGETBV of a new vCPU's XCR0 is 1", exit == reported(1), exit);
    let exit = g.run();
    let r = g.vcpu.get_xcrs().map(|x| x.xcrs[0].value);
    c.check("XSETBV of x87|SSE|AVX (x87|SSE without AVX) is read back by XGETBV and KVM_GET_XCRS",
            exit == reported(wide as u8) && r.as_ref().is_ok_and(|&v| v == wide), format!("{exit}, XCR0 {r:x?}"));
}
