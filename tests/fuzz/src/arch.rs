//! The architectural constants the fuzzer builds guest state from (Intel
//! SDM Vol. 3A, order number 325462-084US, chapter 2 "System Architecture
//! Overview" and chapter 4 "Paging"), from the `x86` crate where it has
//! them, so that no control-register bit or MSR number is typed in by hand
//! twice.
//!
//! Context: constants only.

use x86::controlregs::{Cr0, Cr4};

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = Cr0::CR0_PROTECTED_MODE.bits() as u64;
/// CR0.ET: extension type (hardwired to 1 on every CPU since the 486).
pub const CR0_ET: u64 = Cr0::CR0_EXTENSION_TYPE.bits() as u64;
/// CR0.NE: native FPU error reporting.
pub const CR0_NE: u64 = Cr0::CR0_NUMERIC_ERROR.bits() as u64;
/// CR0.WP: write protect in supervisor mode.
pub const CR0_WP: u64 = Cr0::CR0_WRITE_PROTECT.bits() as u64;
/// CR0.NW: not write-through.
pub const CR0_NW: u64 = Cr0::CR0_NOT_WRITE_THROUGH.bits() as u64;
/// CR0.CD: cache disable.
pub const CR0_CD: u64 = Cr0::CR0_CACHE_DISABLE.bits() as u64;
/// CR0.PG: paging.
pub const CR0_PG: u64 = Cr0::CR0_ENABLE_PAGING.bits() as u64;

/// CR4.PAE: physical address extension (required by long mode).
pub const CR4_PAE: u64 = Cr4::CR4_ENABLE_PAE.bits() as u64;
/// CR4.OSFXSR: SSE instructions enabled.
pub const CR4_OSFXSR: u64 = Cr4::CR4_ENABLE_SSE.bits() as u64;
/// CR4.OSXMMEXCPT: SIMD exceptions enabled.
pub const CR4_OSXMMEXCPT: u64 = Cr4::CR4_UNMASKED_SSE.bits() as u64;
/// CR4 bits 63:48, reserved on every processor so far.
pub const CR4_RESERVED_HIGH: u64 = 0xffff_0000_0000_0000;

/// IA32_EFER.SCE: SYSCALL enable (SDM Vol. 3A, 2.2.1, Table 2-1).
pub const EFER_SCE: u64 = 1 << 0;
/// IA32_EFER.LME: IA-32e mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// IA32_EFER.LMA: IA-32e mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE: execute-disable enable.
pub const EFER_NXE: u64 = 1 << 11;

/// RFLAGS bit 1, always 1.
pub const RFLAGS_FIXED: u64 = x86::bits64::rflags::RFlags::FLAGS_A1.bits();
/// RFLAGS.IF: interrupts enabled.
pub const RFLAGS_IF: u64 = x86::bits64::rflags::RFlags::FLAGS_IF.bits();
/// RFLAGS.VM: virtual-8086 mode.
pub const RFLAGS_VM: u64 = x86::bits64::rflags::RFlags::FLAGS_VM.bits();

/// Page-table entry: present.
pub const PTE_P: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_RW: u64 = 1 << 1;
/// Page-directory entry: maps a 2 MiB page (PS).
pub const PTE_PS: u64 = 1 << 7;

/// Segment descriptor types (SDM Vol. 3A, 3.4.5.1, Table 3-1, and
/// 3.5, Table 3-2).
pub mod seg {
    /// Read/write data, accessed.
    pub const DATA_RW_ACCESSED: u8 = 0x3;
    /// Execute/read code, accessed.
    pub const CODE_RX_ACCESSED: u8 = 0xb;
    /// 32-bit (or 64-bit) busy TSS.
    pub const TSS_BUSY: u8 = 0xb;
    /// 32-bit (or 64-bit) interrupt gate.
    pub const INTERRUPT_GATE: u8 = 0xe;
}

/// MSRs whose values follow the clock (TSC, TSC deadline, performance
/// counters, KVM's paravirtual clock, which the host then updates in guest
/// memory): guest code leaves them alone, so that a guest's behaviour does
/// not depend on time.
pub const CLOCK_MSRS: [u32; 6] = [
    x86::msr::IA32_TIME_STAMP_COUNTER,
    x86::msr::IA32_TSC_ADJUST,
    x86::msr::IA32_TSC_DEADLINE,
    x86::msr::IA32_PMC0,
    0x4b56_4d00,
    0x4b56_4d01,
];

/// The MSRs a hostile VMM pokes: the architectural ones KVM and rkvm
/// virtualize, some they refuse, and the paravirtual ones of KVM.
pub const INTERESTING_MSRS: [u32; 34] = [
    x86::msr::IA32_TIME_STAMP_COUNTER,
    x86::msr::IA32_APIC_BASE,
    x86::msr::IA32_FEATURE_CONTROL,
    x86::msr::IA32_TSC_ADJUST,
    x86::msr::IA32_BIOS_SIGN_ID,
    x86::msr::IA32_PMC0,
    x86::msr::IA32_MTRRCAP,
    x86::msr::IA32_SYSENTER_CS,
    x86::msr::IA32_SYSENTER_ESP,
    x86::msr::IA32_SYSENTER_EIP,
    x86::msr::IA32_MCG_CAP,
    x86::msr::IA32_PERFEVTSEL0,
    x86::msr::IA32_MISC_ENABLE,
    x86::msr::IA32_DEBUGCTL,
    x86::msr::IA32_MTRR_PHYSBASE0,
    x86::msr::IA32_PAT,
    x86::msr::IA32_MTRR_DEF_TYPE,
    x86::msr::IA32_MC0_CTL,
    x86::msr::IA32_VMX_BASIC,
    x86::msr::IA32_TSC_DEADLINE,
    x86::msr::IA32_X2APIC_APICID,
    x86::msr::IA32_EFER,
    x86::msr::IA32_STAR,
    x86::msr::IA32_LSTAR,
    x86::msr::IA32_CSTAR,
    x86::msr::IA32_FMASK,
    x86::msr::IA32_FS_BASE,
    x86::msr::IA32_GS_BASE,
    x86::msr::IA32_KERNEL_GSBASE,
    x86::msr::IA32_TSC_AUX,
    // KVM's paravirtual clock and features (Documentation/virt/kvm/x86/msr.rst).
    0x4b56_4d00,
    0x4b56_4d01,
    // Hyper-V's guest OS id, and an MSR no CPU has.
    0x4000_0000,
    0xdead_beef,
];
