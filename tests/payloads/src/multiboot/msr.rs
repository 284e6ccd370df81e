//! MSRs a guest OS touches early: reset values, write and read back, and
//! the #GP rules, each executed with the IDT in place so a #GP is caught
//! and reported.
//!
//! The TSC's values are the host's: only compared, never printed.

use super::runtime::{Kernel, R};
use iced_x86::code_asm::*;

// MSRs (SDM Vol. 4, chapter 2).
const IA32_TSC: u32 = 0x10;
const IA32_APIC_BASE: u32 = 0x1b;
const IA32_MTRRCAP: u32 = 0xfe;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_MTRR_PHYSBASE0: u32 = 0x200;
const IA32_MTRR_PHYSMASK0: u32 = 0x201;
const IA32_PAT: u32 = 0x277;
const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
const IA32_EFER: u32 = 0xc000_0080;
const IA32_TSC_AUX: u32 = 0xc000_0103;
/// No processor or hypervisor defines it: outside the architectural,
/// Hyper-V (0x4000_00xx) and KVM (0x4b56_4dxx) ranges.
const UNKNOWN_MSR: u32 = 0x8765_4321;

/// ECX = `msr`, EDX:EAX = `value`: WRMSR's operands.
fn msr_operands(k: &mut Kernel, msr: u32, value: u64) -> R {
    k.a.mov(ecx, msr)?;
    k.a.mov(eax, value as u32)?;
    k.a.mov(edx, (value >> 32) as u32)
}

/// WRMSR of `value` to `msr`.
fn wrmsr(k: &mut Kernel, msr: u32, value: u64) -> R {
    msr_operands(k, msr, value)?;
    k.a.wrmsr()
}

/// Reports `name`: ok if RDMSR of `msr` does not fault and reads `expected`.
fn rdmsr_is(k: &mut Kernel, name: &str, msr: u32, expected: u64) -> R {
    k.guarded(|k| {
        k.a.mov(ecx, msr)?;
        k.a.rdmsr()
    })?;
    k.check64(name, expected)
}

/// Reports `name`: ok if `value` written to `msr` reads back; the old
/// value is written back afterwards.
fn write_reads_back(k: &mut Kernel, name: &str, msr: u32, value: u64) -> R {
    let scratch = k.lay.scratch;
    k.guarded(|k| {
        k.a.mov(ecx, msr)?;
        k.a.rdmsr()?;
        k.a.mov(dword_ptr(scratch), eax)?;
        k.a.mov(dword_ptr(scratch + 4), edx)?;
        k.a.mov(eax, value as u32)?;
        k.a.mov(edx, (value >> 32) as u32)?;
        k.a.wrmsr()?;
        k.a.xor(eax, eax)?;
        k.a.xor(edx, edx)?;
        k.a.rdmsr()?;
        k.a.mov(dword_ptr(scratch + 8), eax)?;
        k.a.mov(dword_ptr(scratch + 12), edx)?;
        k.a.mov(eax, dword_ptr(scratch))?;
        k.a.mov(edx, dword_ptr(scratch + 4))?;
        k.a.wrmsr()
    })?;
    k.a.mov(eax, dword_ptr(scratch + 8))?;
    k.a.mov(edx, dword_ptr(scratch + 12))?;
    k.check64(name, value)
}

/// MSRs a guest OS touches early, with their reset values (SDM Vol. 3A,
/// table "IA-32 and Intel 64 Processor States Following Power-up, Reset,
/// or INIT", and Vol. 4) and their #GP rules.
pub fn msrs(k: &mut Kernel) -> R {
    // The BSP flag (bit 8), the global enable (bit 11), the default base.
    rdmsr_is(k, "msr-apic-base", IA32_APIC_BASE, 0xfee0_0900)?;
    write_reads_back(k, "msr-apic-base-write", IA32_APIC_BASE, 0xfee0_0900)?;

    // PAT (SDM Vol. 3A, "Programming the PAT"): WB, WT, UC-, UC in each
    // half after reset. Writing a reserved type (2 or 3) into any entry is
    // #GP(0).
    const PAT_RESET: u64 = 0x0007_0406_0007_0406;
    rdmsr_is(k, "msr-pat", IA32_PAT, PAT_RESET)?;
    // PA1 and PA5 become WC (1).
    write_reads_back(k, "msr-pat-write", IA32_PAT, 0x0007_0106_0007_0106)?;
    k.expect_gp0("msr-pat-reserved-type-gp", |k| msr_operands(k, IA32_PAT, (PAT_RESET & !0xff) | 2), |k| k.a.wrmsr())?;
    // Had the bad value been taken, the reset value goes back.
    k.guarded_quiet(|k| wrmsr(k, IA32_PAT, PAT_RESET))?;

    // MTRRs (SDM Vol. 3A, "Memory Type Range Registers (MTRRs)"): 8
    // variable ranges. Values chosen valid on any MAXPHYADDR: nothing at or
    // above bit 32.
    k.guarded(|k| {
        k.a.mov(ecx, IA32_MTRRCAP)?;
        k.a.rdmsr()?;
        k.a.and(eax, 0xffu32)
    })?;
    k.check32("msr-mtrrcap-vcnt", 8)?;
    // E (bit 11), FE (bit 10), default type WB (6).
    write_reads_back(k, "msr-mtrr-def-type", IA32_MTRR_DEF_TYPE, 0xc06)?;
    // Range 0: base 0, WB; mask: valid (bit 11), 16 MiB.
    write_reads_back(k, "msr-mtrr-physbase0", IA32_MTRR_PHYSBASE0, 0x6)?;
    write_reads_back(k, "msr-mtrr-physmask0", IA32_MTRR_PHYSMASK0, 0xff00_0800)?;

    tsc(k)?;

    k.expect_no_exception("msr-misc-enable-read", |k| {
        k.a.mov(ecx, IA32_MISC_ENABLE)?;
        k.a.rdmsr()
    })?;
    k.expect_gp0("msr-unknown-read-gp", |k| k.a.mov(ecx, UNKNOWN_MSR), |k| k.a.rdmsr())?;
    k.expect_gp0("msr-unknown-write-gp", |k| msr_operands(k, UNKNOWN_MSR, 0), |k| k.a.wrmsr())?;

    // EFER: no LME/LMA in protected mode, and SCE and NXE start clear;
    // bit 1 is reserved (SDM Vol. 3A, 2.2.1 "Extended Feature Enable
    // Register"), and WRMSR setting a reserved bit is #GP(0).
    rdmsr_is(k, "msr-efer", IA32_EFER, 0)?;
    k.expect_gp0("msr-efer-reserved-gp", |k| msr_operands(k, IA32_EFER, 1 << 1), |k| k.a.wrmsr())?;
    k.guarded_quiet(|k| wrmsr(k, IA32_EFER, 0))
}

/// IA32_TSC writes (SDM Vol. 3B, "Time-Stamp Counter"), and
/// IA32_TSC_AUX as RDTSCP returns it.
fn tsc(k: &mut Kernel) -> R {
    let t = k.lay.scratch;
    // Written 0, the TSC then reads small (not above 32 bits) and counts
    // up. Nothing about the values is printed: they are the host's.
    k.guarded(|k| {
        wrmsr(k, IA32_TSC, 0)?;
        k.a.rdtsc()?;
        k.a.mov(dword_ptr(t), eax)?;
        k.a.mov(dword_ptr(t + 4), edx)?;
        k.a.mov(ecx, 1000u32)?;
        let spin = k.here()?;
        k.a.dec(ecx)?;
        k.a.jnz(spin)?;
        k.a.rdtsc()?;
        k.a.mov(dword_ptr(t + 8), eax)?;
        k.a.mov(dword_ptr(t + 12), edx)
    })?;
    let mut bad = k.a.create_label();
    k.a.xor(eax, eax)?;
    k.a.cmp(dword_ptr(t + 4), 0u32)?;
    k.a.jne(bad)?;
    k.a.mov(ecx, dword_ptr(t + 8))?;
    k.a.mov(edx, dword_ptr(t + 12))?;
    k.a.sub(ecx, dword_ptr(t))?;
    k.a.sbb(edx, dword_ptr(t + 4))?;
    k.a.jb(bad)?;
    k.a.or(ecx, edx)?;
    k.a.setnz(al)?;
    k.a.set_label(&mut bad)?;
    k.check_bool("msr-tsc-write")?;

    // RDTSCP is CPUID.80000001H:EDX[27].
    let mut absent = k.a.create_label();
    let mut done = k.a.create_label();
    k.a.mov(eax, 0x8000_0000u32)?;
    k.a.cpuid()?;
    k.a.cmp(eax, 0x8000_0001u32)?;
    k.a.jb(absent)?;
    k.a.mov(eax, 0x8000_0001u32)?;
    k.a.xor(ecx, ecx)?;
    k.a.cpuid()?;
    k.a.bt(edx, 27u32)?;
    k.a.jae(absent)?; // CF is the bit
    write_reads_back(k, "msr-tsc-aux", IA32_TSC_AUX, 0x1234)?;
    k.guarded(|k| {
        wrmsr(k, IA32_TSC_AUX, 0x1234)?;
        k.a.rdtscp()?;
        k.a.mov(eax, ecx)
    })?;
    k.check32("rdtscp-tsc-aux", 0x1234)?;
    k.a.jmp(done)?;
    k.a.set_label(&mut absent)?;
    k.fail("rdtscp", "not offered")?;
    k.a.set_label(&mut done)?;
    k.a.nop()
}
