//! The CPU as a guest kernel first meets it: exception delivery through
//! its own IDT, paging, and CPUID.
//!
//! CPUID results are host facts: compared, never printed.

use super::runtime::{Eip, Kernel, MAPPED, R};
use iced_x86::code_asm::*;

/// CR0.PG (SDM Vol. 3A, 2.5 "Control Registers").
const CR0_PG: u32 = 1 << 31;

/// Exceptions delivered through the kernel's IDT, with the vector, error
/// code and saved EIP the SDM specifies (Vol. 3A, 6.15 "Exception and
/// Interrupt Reference").
pub fn exceptions(k: &mut Kernel) -> R {
    let nothing = |_: &mut Kernel| Ok(());
    k.expect_exception(
        "exception-de",
        (0, 0),
        Eip::Fault,
        |k| {
            k.a.mov(eax, 1u32)?;
            k.a.xor(edx, edx)?;
            k.a.xor(ecx, ecx)
        },
        |k| k.a.div(ecx),
    )?;
    k.expect_exception("exception-ud", (6, 0), Eip::Fault, nothing, |k| k.a.ud2())?;
    // INT3 is a trap: the saved EIP is that of the next instruction.
    k.expect_exception("exception-bp", (3, 0), Eip::Trap, nothing, |k| k.a.int3())?;
    // Selector 0xfffb (index 0x1fff, GDT, RPL 3) is beyond the GDT limit:
    // #GP(selector) (SDM Vol. 2B, MOV: "If segment selector index is
    // outside descriptor table limits"). The error code keeps index and
    // TI; bits 1:0 are IDT and EXT, both 0 (SDM Vol. 3A, 6.13 "Error
    // Code"), not the RPL: 0xfff8.
    k.expect_exception(
        "exception-gp-selector",
        (13, 0xfff8),
        Eip::Fault,
        |k| k.a.mov(eax, 0xfffbu32),
        |k| k.a.mov(ds, ax),
    )?;
    paging(k)
}

/// 32-bit paging (SDM Vol. 3A, 4.3) with 4 KiB pages identity-mapping
/// [`MAPPED`] except one page: a read and a write to it fault with CR2 =
/// its address and the error codes of SDM Vol. 3A, 4.7 (P = 0: not
/// present; W/R: the access was a write; U/S = 0: supervisor).
fn paging(k: &mut Kernel) -> R {
    const PRESENT_WRITABLE: u32 = 0b11;
    let (page_dir, page_tables, hole) = (k.lay.page_dir, k.lay.page_tables, k.lay.hole);
    assert!(hole < MAPPED, "the unmapped page must be inside the map");
    let tables = MAPPED >> 22;
    k.a.mov(edi, page_dir)?;
    k.a.mov(ecx, 1024u32)?;
    k.a.xor(eax, eax)?;
    k.a.rep().stosd()?;
    k.a.mov(edi, page_tables)?;
    k.a.mov(eax, PRESENT_WRITABLE)?;
    k.a.mov(ecx, MAPPED >> 12)?;
    let fill = k.here()?;
    k.a.stosd()?;
    k.a.add(eax, 0x1000u32)?;
    k.a.dec(ecx)?;
    k.a.jnz(fill)?;
    k.a.mov(dword_ptr(page_tables + (hole >> 12) * 4), 0u32)?;
    for i in 0..tables {
        k.a.mov(dword_ptr(page_dir + 4 * i), (page_tables + 0x1000 * i) | PRESENT_WRITABLE)?;
    }
    // Guarded: a VMM that cannot run this paging mode fails here, and
    // the page-fault checks below then report that nothing faulted.
    k.expect_no_exception("paging-enable", |k| {
        k.a.mov(eax, page_dir)?;
        k.a.mov(cr3, eax)?;
        k.a.mov(eax, cr0)?;
        k.a.or(eax, CR0_PG)?;
        k.a.mov(cr0, eax)
    })?;

    let nothing = |_: &mut Kernel| Ok(());
    k.expect_exception("exception-pf-read", (14, 0), Eip::Fault, nothing, |k| k.a.mov(eax, dword_ptr(hole)))?;
    k.a.mov(eax, cr2)?;
    k.check32("exception-pf-read-cr2", hole)?;
    k.expect_exception("exception-pf-write", (14, 2), Eip::Fault, nothing, |k| k.a.mov(dword_ptr(hole), eax))?;
    k.a.mov(eax, cr2)?;
    k.check32("exception-pf-write-cr2", hole)?;

    k.a.mov(eax, cr0)?;
    k.a.and(eax, !CR0_PG)?;
    k.a.mov(cr0, eax)?;
    // With paging off the page is plain memory again.
    k.expect_no_exception("paging-off", |k| k.a.mov(eax, dword_ptr(hole)))
}

/// CPUID as a hypervisor should shape it: only features compared, never
/// printed (SDM Vol. 2A, CPUID).
pub fn cpuid(k: &mut Kernel) -> R {
    let leaf = |k: &mut Kernel, eax_in: u32| -> R {
        k.a.mov(eax, eax_in)?;
        k.a.xor(ecx, ecx)?;
        k.a.cpuid()
    };
    leaf(k, 0)?;
    k.a.cmp(eax, 1u32)?;
    k.a.setae(al)?;
    k.a.movzx(eax, al)?;
    k.check_bool("cpuid-max-leaf")?;

    // FPU, TSC, MSR, PAE, CX8, FXSR, SSE, SSE2.
    const EDX1: u32 = 1 << 0 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 24 | 1 << 25 | 1 << 26;
    leaf(k, 1)?;
    k.a.and(edx, EDX1)?;
    k.a.cmp(edx, EDX1)?;
    k.a.sete(al)?;
    k.a.movzx(eax, al)?;
    k.check_bool("cpuid-1-edx-features")?;
    // ECX[31] says a hypervisor is there; ECX[5] (VMX) is hidden.
    leaf(k, 1)?;
    k.a.mov(eax, ecx)?;
    k.a.shr(eax, 31u32)?;
    k.check_bool("cpuid-hypervisor-bit")?;
    leaf(k, 1)?;
    k.a.test(ecx, 1u32 << 5)?;
    k.a.setz(al)?;
    k.a.movzx(eax, al)?;
    k.check_bool("cpuid-vmx-hidden")?;
    // The hypervisor range: 0x40000000 reports its highest leaf.
    leaf(k, 0x4000_0000)?;
    k.a.cmp(eax, 0x4000_0000u32)?;
    k.a.setae(al)?;
    k.a.movzx(eax, al)?;
    k.check_bool("cpuid-hypervisor-leaf")
}
