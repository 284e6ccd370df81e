//! What a hostile guest or VMM does to a device, checked the same way on
//! rkvm and KVM: each check here reproduces a way rkvm once let a guest or a
//! VMM hurt the host (issue 10), and asserts KVM's behaviour instead.
//!
//! - an MMIO access by an instruction in the last bytes of the address
//!   space, by 64-bit code with a nonzero CS base, and during the delivery
//!   of an exception;
//! - a REP INS whose RCX the VMM lowers before the I/O completes;
//! - memory slots too large, or beyond the guest-physical space, next to a
//!   guest that must keep its RAM;
//! - INS/OUTS at CPL 3 on pages the guest's page tables protect;
//! - guest memory the VMM gives up (MADV_DONTNEED, munmap, a new mapping);
//! - a forked child using its parent's VM;
//! - the host's hardware watchpoint after a guest ran (DR7 after VM exit);
//! - a CPUID table header that runs into a page that cannot be read
//!   (found by rkvm-fuzz).
//!
//! Guests are tiny and written as bytes, each instruction commented.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::guest::{reported, Guest, CODE, HLT};
use crate::{region, set_region, Checks, Mapping};

/// Where MMIO lives for these guests: no slot covers it.
const MMIO: u64 = 0xd000_0000;

fn describe(exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> String {
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => format!("out {port:#x} {data:x?}"),
        Ok(VcpuExit::MmioWrite(addr, data)) => format!("mmio write {addr:#x} {data:x?}"),
        Ok(VcpuExit::MmioRead(addr, data)) => format!("mmio read {addr:#x} {}", data.len()),
        Ok(VcpuExit::IoIn(port, data)) => format!("in {port:#x} {}", data.len()),
        Ok(VcpuExit::InternalError) => "InternalError".to_string(),
        Ok(exit) => format!("{exit:x?}"),
        Err(e) => format!("KVM_RUN failed: {e}"),
    }
}

/// The KVM_EXIT_INTERNAL_ERROR suberror of the last exit.
fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, whose member is
    // `internal`; it holds integers only.
    unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror }
}

/// A flat segment: 64-bit code (`long`), or 32-bit code or data, of `dpl`.
fn flat(selector: u16, code: bool, long: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Page-table flags: present, writable, user.
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;

/// Long mode with the first 2 MiB and the 2 MiB at [`MMIO`] identity
/// mapped, and one more page, `top`, mapped at the last page of the
/// address space (0xffff_ffff_ffff_f000).
pub(crate) fn enter_long_mode(g: &Guest, top: u64) -> Result<(), kvm_ioctls::Error> {
    const PML4: u64 = 0x10000;
    g.write(PML4, &(0x11000 | P | RW).to_le_bytes()); // PML4[0] -> PDPT0
    g.write(PML4 + 511 * 8, &(0x13000 | P | RW).to_le_bytes()); // PML4[511] -> PDPT1
    g.write(0x11000, &(0x12000 | P | RW).to_le_bytes()); // PDPT0[0] -> PD0
    g.write(0x12000, &(P | RW | PS).to_le_bytes()); // PD0[0]: 2 MiB at 0
    g.write(0x11000 + 8 * (MMIO >> 30), &(0x17000 | P | RW).to_le_bytes()); // PDPT0[3] -> PD2
    g.write(0x17000 + 8 * ((MMIO >> 21) & 0x1ff), &(MMIO | P | RW | PS).to_le_bytes()); // 2 MiB at MMIO
    g.write(0x13000 + 511 * 8, &(0x14000 | P | RW).to_le_bytes()); // PDPT1[511] -> PD1
    g.write(0x14000 + 511 * 8, &(0x15000 | P | RW).to_le_bytes()); // PD1[511] -> PT1
    g.write(0x15000 + 511 * 8, &(top | P | RW).to_le_bytes()); // PT1[511] -> top
    let mut s = g.vcpu.get_sregs()?;
    s.cs = flat(8, true, true, 0);
    s.ds = flat(0x10, false, false, 0);
    s.es = s.ds;
    s.ss = s.ds;
    s.cr0 = 0x8000_0031; // PG, NE, ET, PE
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LME, LMA
    g.vcpu.set_sregs(&s)
}

/// An MMIO store by an instruction in the last 8 bytes of the 64-bit
/// address space: fetching it for emulation must wrap, not overflow (it
/// crashed rkvm), and give the MMIO exit KVM gives.
fn mmio_at_the_top_of_the_address_space(c: &mut Checks, kvm: &Kvm) {
    const TOP_PAGE: u64 = 0x16000;
    let Some(mut g) = c.success("a long-mode guest with code in the last page", Guest::new(kvm, &HLT)) else { return };
    // At 0xffff_ffff_ffff_fff8: mov [rbx], al; hlt.
    g.write(TOP_PAGE + 0xff8, &[0x88, 0x03, 0xf4]);
    if c.success("entering long mode with KVM_SET_SREGS", enter_long_mode(&g, TOP_PAGE)).is_none() {
        return;
    }
    let regs = kvm_regs { rip: 0xffff_ffff_ffff_fff8, rbx: MMIO, rax: 0x5a, rflags: 2, ..Default::default() };
    c.success("KVM_SET_REGS at the top of the address space", g.vcpu.set_regs(&regs));
    let first = describe(g.vcpu.run());
    c.check("an MMIO store from the last bytes of the address space is a KVM_EXIT_MMIO",
            first == format!("mmio write {MMIO:#x} [5a]"), &first);
    let second = describe(g.vcpu.run());
    c.check("the guest then runs on to the HLT after it", second == "Hlt", second);
}

/// 64-bit code ignores the CS base (SDM Vol. 3A, 3.4.4): the instruction
/// emulated for MMIO is the one at RIP, not at CS.base + RIP.
fn mmio_in_64_bit_mode_ignores_the_cs_base(c: &mut Checks, kvm: &Kvm) {
    let Some(mut g) = c.success("a long-mode guest with a nonzero CS base", Guest::new(kvm, &HLT)) else { return };
    // At 0x2000: mov [rbx], al; hlt. At CS.base + 0x2000 (0x12000) is
    // page-table data that decodes as something else.
    g.write(0x2000, &[0x88, 0x03, 0xf4]);
    if c.success("entering long mode", enter_long_mode(&g, 0x16000)).is_none() {
        return;
    }
    let mut s = g.vcpu.get_sregs().unwrap_or_default();
    s.cs.base = 0x10000;
    c.success("KVM_SET_SREGS with CS base 0x10000 in 64-bit mode", g.vcpu.set_sregs(&s));
    let regs = kvm_regs { rip: 0x2000, rbx: MMIO, rax: 0x5b, rflags: 2, ..Default::default() };
    c.success("KVM_SET_REGS", g.vcpu.set_regs(&regs));
    let first = describe(g.vcpu.run());
    c.check("64-bit MMIO emulation fetches at RIP, not at CS base + RIP",
            first == format!("mmio write {MMIO:#x} [5b]"), first);
}

/// A #UD whose delivery reads an IVT in MMIO: an EPT violation during
/// event delivery. There is no instruction to emulate (the UD2 at RIP
/// did not cause the access): KVM_EXIT_INTERNAL_ERROR with
/// KVM_INTERNAL_ERROR_DELIVERY_EV, as KVM reports MMIO during delivery on
/// its other paths (EPT misconfig). rkvm only: on this first EPT violation
/// KVM's emulator runs the instruction at RIP instead (here a UD2 it
/// cannot emulate: suberror 1; before a MOV, see the next check).
fn mmio_during_event_delivery(c: &mut Checks, kvm: &Kvm) {
    const DELIVERY_EV: u32 = 3;
    let Some(mut g) = c.success("a guest whose IVT is in MMIO", Guest::new(kvm, &[0x0f, 0x0b])) else { return };
    let mut s = g.vcpu.get_sregs().unwrap_or_default();
    s.idt.base = MMIO;
    s.idt.limit = 0x3ff;
    c.success("KVM_SET_SREGS with the IDT base in MMIO", g.vcpu.set_sregs(&s));
    let exit = describe(g.vcpu.run());
    let suberror = if exit == "InternalError" { internal_suberror(&mut g.vcpu) } else { 0 };
    c.check("an MMIO access during exception delivery is an internal error of suberror 3 (DELIVERY_EV)",
            exit == "InternalError" && suberror == DELIVERY_EV, format!("{exit}, suberror {suberror}"));
}

/// REP INSB of 8 bytes; before the I/O completes, the VMM lowers RCX to
/// 3. The completion must not subtract 8 from 3 (it crashed rkvm): as in
/// KVM's emulator, which re-reads the registers, 3 of the 8 bytes read
/// land and the INS is done.
fn rep_ins_with_rcx_lowered_by_the_vmm(c: &mut Checks, kvm: &Kvm) {
    let code = [
        0xbf, 0x00, 0x30, // mov di, 0x3000
        0xb9, 0x08, 0x00, // mov cx, 8
        0xba, 0x99, 0x00, // mov dx, 0x99
        0xf3, 0x6c, // rep insb
        0xb0, b'Z', // mov al, 'Z'
        0xe6, 0x99, // out 0x99, al
        0xf4, // hlt
    ];
    let Some(mut g) = c.success("a guest doing REP INSB of 8 bytes", Guest::new(kvm, &code)) else { return };
    let first = match g.vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            data.copy_from_slice(&b"abcdefgh"[..data.len()]);
            format!("in {port:#x} {}", data.len())
        }
        other => describe(other),
    };
    c.check("REP INSB exits to the VMM for port 0x99 with 8 bytes", first == "in 0x99 8", &first);
    let mut regs = g.vcpu.get_regs().unwrap_or_default();
    regs.rcx = 3;
    c.success("KVM_SET_REGS lowers RCX to 3 before the I/O completes", g.vcpu.set_regs(&regs));
    let exits = g.run_to_hlt(4);
    let regs = g.vcpu.get_regs().unwrap_or_default();
    c.check("the guest goes on to its OUT and HLT", exits == [reported(b'Z'), "Hlt".to_string()], format!("{exits:?}"));
    c.check("3 of the bytes read land at 0x3000 and RCX ends at 0",
            g.read(0x3000, 4) == b"abc\0" && regs.rcx & 0xffff == 0 && regs.rdi & 0xffff == 0x3003,
            format!("memory {:?} rcx {:#x} rdi {:#x}", g.read(0x3000, 4), regs.rcx, regs.rdi));
}

/// The host's MAXPHYADDR (CPUID 80000008H:EAX[7:0]): KVM refuses guest
/// physical addresses beyond it (EPT cannot map them).
fn host_phys_bits() -> u32 {
    let leaf = core::arch::x86_64::__cpuid(0x8000_0008);
    (leaf.eax & 0xff).clamp(36, 52)
}

/// Slots too large or beyond the guest-physical space are refused with
/// EINVAL, and nothing else changes: the guest still reads its RAM (rkvm
/// once unmapped another slot's memory on that error path). A slot of the
/// largest size KVM takes (2^31 - 1 pages) is refused or accepted and
/// removed again, with no allocation the size of it (the testbed's kernel
/// log shows any WARNING).
///
/// Only with EPT (`tdp`): without it KVM allows any 52-bit address.
fn slots_beyond_the_guest_physical_space(c: &mut Checks, kvm: &Kvm, tdp: bool) {
    const PAGE: u64 = 4096;
    let code = [
        0xa0, 0x00, 0x30, // mov al, [0x3000]
        0xe6, 0x99, // out 0x99, al
        0xf4, // hlt
    ];
    let Some(mut g) = c.success("a guest reading its RAM next to refused slots", Guest::new(kvm, &code)) else { return };
    g.write(0x3000, &[0x42]);
    let spare = Mapping::new(3 * PAGE as usize);
    c.errno("a slot at 2^63 fails with EINVAL", set_region(&g.vm, region(1, 1 << 63, PAGE, spare.hva(), 0)),
            libc::EINVAL);
    if tdp {
        let limit = 1u64 << host_phys_bits();
        for (what, gpa, size) in [
            // 2^48 + 0x1000 wraps, in a 4-level EPT's indexes, to the
            // guest's code page at 0x1000: refusing must not unmap it
            // (rkvm's error path once did).
            ("at 2^48 + 0x1000 (3 pages)", (1 << 48) + 0x1000, 3 * PAGE),
            ("straddling 2^48", (1 << 48) - PAGE, 2 * PAGE),
            ("at the host's MAXPHYADDR", limit, PAGE),
            ("straddling the host's MAXPHYADDR", limit - PAGE, 2 * PAGE),
        ] {
            c.errno(&format!("a slot {what} fails with EINVAL"),
                    set_region(&g.vm, region(1, gpa, size, spare.hva(), 0)), libc::EINVAL);
        }
        c.success("a slot ending at the host's MAXPHYADDR",
                  set_region(&g.vm, region(2, limit - PAGE, PAGE, spare.hva(), 0)));
        c.errno("moving it beyond fails with EINVAL",
                set_region(&g.vm, region(2, limit, PAGE, spare.hva(), 0)), libc::EINVAL);
        c.success("deleting it", set_region(&g.vm, region(2, 0, 0, 0, 0)));
    }
    // The VMM's range need not be mapped for a slot to be made (KVM maps
    // on use): a low, unmapped address leaves room for 8 TiB below the end
    // of user space, so the size itself is what the device must cope with
    // (rkvm once allocated an array of that many page pointers first).
    //
    // Only with EPT: a KVM without it takes such a slot, and its shadow
    // paging allocates metadata for every page of it (16 GiB, a minute).
    let unmapped = 0x1000_0000;
    let max_pages = (1u64 << 31) - 1;
    if tdp {
        match set_region(&g.vm, region(3, 1 << 32, max_pages * PAGE, unmapped, 0)) {
            Ok(()) => {
                c.check("a slot of 2^31-1 pages is accepted (KVM on a host with room for it)", true, "");
                c.success("and deleted", set_region(&g.vm, region(3, 0, 0, 0, 0)));
            }
            Err(e) => c.check("a slot of 2^31-1 pages is refused with EINVAL (beyond the host's MAXPHYADDR)",
                              e.errno() == libc::EINVAL, e),
        }
    }
    c.errno("a slot of 2^31 pages fails with EINVAL",
            set_region(&g.vm, region(3, 1 << 32, (1 << 31) * PAGE, unmapped, 0)), libc::EINVAL);
    let exits = g.run_to_hlt(4);
    c.check("the guest still reads its RAM at 0x3000", exits == [reported(0x42), "Hlt".to_string()],
            format!("{exits:?}"));
}

/// 32-bit paging at CPL 3 with IOPL 3, so user code may do port I/O: a
/// page directory at 0x20000 and a table at 0x21000 identity-map the first
/// MiB, user read-write, except the three test pages; no IDT, so any
/// exception ends in a triple fault (KVM_EXIT_SHUTDOWN).
const USER_RO: u64 = 0x30000;
const SUPERVISOR: u64 = 0x31000;
const USER_RW: u64 = 0x32000;

fn user_mode_guest(kvm: &Kvm, code: &[u8]) -> Result<Guest, String> {
    let g = Guest::new(kvm, code)?;
    // 32-bit paging: 4-byte entries.
    g.write(0x20000, &((0x21000 | P | RW | US) as u32).to_le_bytes());
    for page in 0..256u64 {
        let flags = match page << 12 {
            USER_RO => P | US,
            SUPERVISOR => P | RW,
            _ => P | RW | US,
        };
        g.write(0x21000 + 4 * page, &(((page << 12) | flags) as u32).to_le_bytes());
    }
    let mut s: kvm_sregs = g.vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    s.cs = flat(0x1b, true, false, 3);
    s.ds = flat(0x23, false, false, 3);
    s.es = s.ds;
    s.ss = s.ds;
    s.fs = s.ds;
    s.gs = s.ds;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x8001_0031; // PG, WP, NE, ET, PE
    s.cr3 = 0x20000;
    s.cr4 = 0;
    g.vcpu.set_sregs(&s).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_regs { rip: CODE, rflags: 0x3002, ..Default::default() }; // IOPL 3
    g.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    Ok(g)
}

/// Runs a user-mode guest: IN data is "wxyz"; the outcome is "shutdown"
/// (the guest faulted), "reported X" (it got to its OUT 0x99 of X), or
/// the unexpected exit.
fn user_mode_outcome(g: &mut Guest) -> String {
    for _ in 0..8 {
        match g.vcpu.run() {
            Ok(VcpuExit::IoIn(_, data)) => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = b"wxyz"[i % 4];
                }
            }
            Ok(VcpuExit::IoOut(0x99, data)) if data.len() == 1 => return format!("reported {}", data[0] as char),
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::Shutdown) => return "shutdown".to_string(),
            other => return describe(other),
        }
    }
    "no end".to_string()
}

/// `mov e?i, target; mov ecx, 4; mov dx, 0x99; rep insb/outsb; mov al,
/// 'D'; out 0x99, al; jmp $` in 32-bit code.
fn string_io_code(target: u64, ins: bool) -> Vec<u8> {
    let mut code = vec![if ins { 0xbf } else { 0xbe }]; // mov edi/esi, imm32
    code.extend_from_slice(&(target as u32).to_le_bytes());
    code.extend_from_slice(&[0xb9, 4, 0, 0, 0]); // mov ecx, 4
    code.extend_from_slice(&[0x66, 0xba, 0x99, 0x00]); // mov dx, 0x99
    code.extend_from_slice(&[0xf3, if ins { 0x6c } else { 0x6e }]); // rep insb / rep outsb
    code.extend_from_slice(&[0xb0, b'D', 0xe6, 0x99, 0xeb, 0xfe]); // mov al, 'D'; out 0x99, al; jmp $
    code
}

/// INS and OUTS at CPL 3 obey the guest's page tables: user code with I/O
/// permission may not write a read-only page, nor touch a supervisor page,
/// through them (rkvm once emulated them without looking): #PF, here a
/// triple fault. A user read-write page works.
fn string_io_obeys_guest_page_permissions(c: &mut Checks, kvm: &Kvm) {
    let cases = [
        ("REP INSB at CPL 3 into a user read-write page works", USER_RW, true, "reported D"),
        ("REP INSB at CPL 3 into a read-only page faults", USER_RO, true, "shutdown"),
        ("REP INSB at CPL 3 into a supervisor page faults", SUPERVISOR, true, "shutdown"),
        ("REP OUTSB at CPL 3 from a supervisor page faults", SUPERVISOR, false, "shutdown"),
    ];
    for (name, target, ins, expected) in cases {
        let mut g = match user_mode_guest(kvm, &string_io_code(target, ins)) {
            Ok(g) => g,
            Err(e) => {
                c.check(name, false, e);
                continue;
            }
        };
        g.write(target, b"....");
        let outcome = user_mode_outcome(&mut g);
        let memory = g.read(target, 4);
        let unchanged = !ins || target == USER_RW || memory == b"....";
        c.check(name, outcome == expected && unchanged, format!("{outcome}, memory {:?}", String::from_utf8_lossy(&memory)));
    }
}

/// Guest memory follows the VMM's mapping: after the VMM maps a new page
/// over it the guest reads the new page, after munmap KVM_RUN fails with
/// EFAULT, and a new mapping at the same address is what the guest reads
/// next (rkvm once kept the pages it had pinned at slot creation).
///
/// The munmap part needs the guest's access to reach EPT (`tdp`): a KVM
/// that emulates real-mode code treats unreadable memory as MMIO instead.
fn guest_memory_follows_the_vmm(c: &mut Checks, kvm: &Kvm, tdp: bool) {
    const PAGE: usize = 4096;
    let code = [
        0xbb, 0x00, 0x10, // mov bx, 0x1000
        0x8e, 0xdb, // mov ds, bx
        0xa0, 0x00, 0x00, // 1: mov al, [0] (gpa 0x10000)
        0xe6, 0x99, // out 0x99, al
        0xeb, 0xf9, // jmp 1b
    ];
    let Some(mut g) = c.success("a guest reading a second slot in a loop", Guest::new(kvm, &code)) else { return };
    let data = Mapping::new(PAGE);
    // The second slot replaces the top of slot 0's range: slot 0 shrinks
    // to 64 KiB (delete and re-create it first).
    let ok = set_region(&g.vm, region(0, 0, 0, 0, 0))
        .and_then(|()| set_region(&g.vm, region(0, 0, 0x10000, g.hva(), 0)))
        .and_then(|()| set_region(&g.vm, region(1, 0x10000, PAGE as u64, data.hva(), 0)));
    if c.success("a second slot at 0x10000 backed by its own mapping", ok).is_none() {
        return;
    }
    // SAFETY: `data` maps PAGE writable bytes; the guest only reads them.
    unsafe { *(data.addr as *mut u8) = 0x55 };
    let first = g.run();
    c.check("the guest reads what the VMM wrote", first == reported(0x55), &first);
    // A new page over the old one (MAP_FIXED replaces the mapping: the
    // old page leaves the VMM).
    // SAFETY: replaces our own mapping with a fresh anonymous page.
    let replaced = unsafe {
        libc::mmap(data.addr, PAGE, libc::PROT_READ | libc::PROT_WRITE,
                   libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0)
    };
    c.check("mmap(MAP_FIXED) of a new page over the slot's memory", replaced == data.addr,
            std::io::Error::last_os_error());
    // SAFETY: the new page is mapped writable at the same address.
    unsafe { *(data.addr as *mut u8) = 0x66 };
    let second = g.run();
    c.check("the guest reads the new page, not the one the VMM replaced", second == reported(0x66), &second);
    if !tdp {
        return;
    }
    // SAFETY: unmaps the page; the slot still names it (hostile but legal).
    unsafe { libc::munmap(data.addr, PAGE) };
    let third = g.run();
    c.check("after munmap of a slot's memory KVM_RUN fails with EFAULT",
            third == "KVM_RUN failed: Bad address (os error 14)", &third);
    // SAFETY: a new anonymous page at the same address (MAP_FIXED over
    // nothing: it was just unmapped).
    let again = unsafe {
        libc::mmap(data.addr, PAGE, libc::PROT_READ | libc::PROT_WRITE,
                   libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0)
    };
    if again == data.addr {
        // SAFETY: mapped just above.
        unsafe { *(again as *mut u8) = 0x77 };
        let fourth = g.run();
        c.check("a new mapping where the unmapped one was is what the guest reads", fourth == reported(0x77), &fourth);
    } else {
        c.check("re-mapping the slot's address", false, std::io::Error::last_os_error());
    }
    // `data` unmaps the page again when dropped; the VM goes first.
    drop(g);
}

/// A forked child may not use its parent's VM: KVM answers EIO at once
/// for another process (rkvm once let the child wait, unkillable, for the
/// vCPU its parent was running, or add slots of its own memory).
/// `struct kvm_cpuid2` is `nent` and 4 bytes of padding; KVM reads all 8
/// bytes before anything else, so a header whose padding lies in a page
/// that cannot be read is EFAULT, for KVM_SET_CPUID2 and for
/// KVM_GET_SUPPORTED_CPUID alike (rkvm read only `nent`: SET_CPUID2 with
/// `nent` 0 succeeded, GET_SUPPORTED_CPUID said E2BIG).
fn cpuid_header_into_an_inaccessible_page(c: &mut Checks, kvm: &Kvm) {
    let Some(g) = c.success("a guest for KVM_SET_CPUID2", Guest::new(kvm, &HLT)) else { return };
    const PAGE: u64 = 4096;
    let pages = Mapping::new(2 * PAGE as usize);
    // PROT_NONE rather than munmap: the mapping stays this function's, so
    // nothing else can be mapped there before it is dropped.
    // SAFETY: the second page of this function's own mapping, unreferenced.
    let r = unsafe { libc::mprotect((pages.hva() + PAGE) as *mut libc::c_void, PAGE as usize, libc::PROT_NONE) };
    if r != 0 {
        c.check("mprotect of the second page", false, std::io::Error::last_os_error());
        return;
    }
    // nent = 0 in the last 4 bytes of the first page; the padding would
    // be the first bytes of the inaccessible one.
    let header = pages.hva() + PAGE - 4;
    // SAFETY: `header` is the last 4 bytes of the mapped page.
    unsafe { (header as *mut u32).write(0) };
    let set = crate::raw_ioctl(&g.vcpu, 0x4008_ae90, header);
    c.check("KVM_SET_CPUID2 with the header's padding in an inaccessible page fails with EFAULT",
            set == Err(libc::EFAULT), format!("{set:?}"));
    let get = crate::raw_ioctl(kvm, 0xc008_ae05, header);
    c.check("KVM_GET_SUPPORTED_CPUID with the header's padding in an inaccessible page fails with EFAULT",
            get == Err(libc::EFAULT), format!("{get:?}"));
}

fn a_forked_child_gets_eio(c: &mut Checks, kvm: &Kvm) {
    // sti; jmp $: the vCPU never leaves the guest by itself. (Interrupts
    // on: under Bochs, KVM's vCPU would not even see the signal that stops
    // it otherwise, as external interrupts do not exit while IF is 0.)
    let Some(g) = c.success("a guest spinning in jmp $", Guest::new(kvm, &[0xfb, 0xeb, 0xfe])) else { return };
    let vcpu_fd = g.vcpu.as_raw_fd();
    let vm_fd = g.vm.as_raw_fd();
    let stop = AtomicBool::new(false);
    let runner_thread = AtomicU64::new(0);
    let results = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            runner_thread.store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
            while !stop.load(Ordering::Acquire) {
                vcpu_run(vcpu_fd);
            }
        });
        // Let the vCPU thread get into the guest.
        std::thread::sleep(Duration::from_millis(300));
        let results = fork_and_try(vcpu_fd, vm_fd);
        stop.store(true, Ordering::Release);
        while !runner.is_finished() {
            let thread = runner_thread.load(Ordering::Acquire);
            if thread != 0 {
                // SAFETY: interrupts the vCPU thread's KVM_RUN (SIGUSR1
                // has a no-op handler, installed by `fork_and_try`); the
                // thread is alive until `is_finished`.
                unsafe { libc::pthread_kill(thread as libc::pthread_t, libc::SIGUSR1) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        results
    });
    match results {
        Ok(errnos) => {
            c.check("a forked child's KVM_GET_REGS on the parent's running vCPU fails with EIO at once",
                    errnos[0] == libc::EIO, format!("errno {}", errnos[0]));
            c.check("a forked child's KVM_SET_USER_MEMORY_REGION on the parent's VM fails with EIO",
                    errnos[1] == libc::EIO, format!("errno {}", errnos[1]));
            c.check("a forked child's KVM_CREATE_VCPU on the parent's VM fails with EIO",
                    errnos[2] == libc::EIO, format!("errno {}", errnos[2]));
        }
        Err(e) => c.check("a forked child's ioctls on the parent's VM return at once", false, e),
    }
}

/// KVM_RUN on a raw vCPU fd (from a thread that does not own the VcpuFd).
fn vcpu_run(fd: i32) {
    // SAFETY: KVM_RUN takes no argument; the fd stays open meanwhile.
    unsafe { libc::ioctl(fd, 0xae80, 0) };
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Forks a child that tries three ioctls on the parent's fds and sends
/// their errnos (0 for success) through a pipe; waits at most 5 s.
fn fork_and_try(vcpu_fd: i32, vm_fd: i32) -> Result<[i32; 3], String> {
    // SAFETY: installs a handler that does nothing, for SIGUSR1, which
    // only this check sends (to interrupt KVM_RUN).
    unsafe { libc::signal(libc::SIGUSR1, ignore_signal as *const () as libc::sighandler_t) };
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the child only makes raw system calls and exits with _exit,
    // which is all a child of a multithreaded process may do.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let errno = |r: i64| if r < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(-1) } else { 0 };
        let mut regs = [0u8; 144];
        // struct kvm_userspace_memory_region: slot 5 (flags 0), 4 KiB at
        // gpa 0x1000_0000, backed by the child's own stack page.
        let region: [u64; 4] = [5, 0x1000_0000, 4096, regs.as_mut_ptr() as u64 & !0xfff];
        // SAFETY: raw ioctls with buffers of the right sizes; only the
        // errno matters.
        let results = unsafe {
            [
                errno(libc::ioctl(vcpu_fd, 0x8090_ae81, regs.as_mut_ptr()) as i64),
                errno(libc::ioctl(vm_fd, 0x4020_ae46, region.as_ptr()) as i64),
                errno(libc::ioctl(vm_fd, 0xae41, 7) as i64),
            ]
        };
        let bytes: Vec<u8> = results.iter().flat_map(|e| e.to_le_bytes()).collect();
        // SAFETY: writes 12 bytes from a live buffer, then exits at once.
        unsafe {
            libc::write(pipe[1], bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    // SAFETY: closes the parent's copy of the write end.
    unsafe { libc::close(pipe[1]) };
    let mut poll = libc::pollfd { fd: pipe[0], events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
    let mut buf = [0u8; 12];
    let n = if ready == 1 {
        // SAFETY: reads at most 12 bytes into `buf`.
        unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) }
    } else {
        -1
    };
    // SAFETY: our descriptor.
    unsafe { libc::close(pipe[0]) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status = 0;
        // SAFETY: reaps our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if n != 12 {
        return Err("the child did not answer within 5 s (blocked in an ioctl)".into());
    }
    let e = |i: usize| i32::from_le_bytes(buf[4 * i..4 * i + 4].try_into().unwrap_or_default());
    Ok([e(0), e(1), e(2)])
}

/// `struct perf_event_attr` up to `bp_len` (PERF_ATTR_SIZE_VER1, 72 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
}

/// A hardware write watchpoint on `addr` for this thread, or the errno.
fn watchpoint(addr: u64) -> Result<i32, i32> {
    const PERF_TYPE_BREAKPOINT: u32 = 5;
    const HW_BREAKPOINT_W: u32 = 2;
    const EXCLUDE_KERNEL: u64 = 1 << 5;
    const EXCLUDE_HV: u64 = 1 << 6;
    let attr = PerfEventAttr {
        type_: PERF_TYPE_BREAKPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        flags: EXCLUDE_KERNEL | EXCLUDE_HV,
        bp_type: HW_BREAKPOINT_W,
        bp_addr: addr,
        bp_len: 4,
        ..Default::default()
    };
    // SAFETY: perf_event_open with a valid attr for this thread (pid 0,
    // any CPU).
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, 0, -1, -1, 0) };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(fd as i32)
    }
}

fn hits(fd: i32) -> u64 {
    let mut count = 0u64;
    // SAFETY: reads the 8-byte counter of our perf event.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
    count
}

/// The host's own hardware watchpoint still fires right after KVM_RUN
/// returns: the VM exit left DR7 at 0x400 (SDM 28.5.1), and rkvm once left
/// it so until the next context switch. Returns whether it could run (the
/// CPU or emulator must have hardware breakpoints, and perf events).
pub fn host_watchpoint_after_a_guest(c: &mut Checks, kvm: &Kvm) -> bool {
    let mut target = Box::new(0u32);
    let addr = std::ptr::from_mut::<u32>(&mut target) as u64;
    let fd = match watchpoint(addr) {
        Ok(fd) => fd,
        Err(errno) => {
            println!("skip - the host watchpoint check: perf_event_open failed with errno {errno}");
            return false;
        }
    };
    // SAFETY: a volatile write to our own box, so that it happens.
    unsafe { std::ptr::write_volatile(&mut *target, 1) };
    if hits(fd) != 1 {
        println!("skip - the host watchpoint check: hardware watchpoints do not fire on this CPU");
        // SAFETY: our perf fd.
        unsafe { libc::close(fd) };
        return false;
    }
    // out 0x99, al; jmp back: every KVM_RUN is one exit.
    let Some(mut g) = c.success("a guest for the watchpoint check", Guest::new(kvm, &[0xe6, 0x99, 0xeb, 0xfc])) else {
        return true;
    };
    let exits: Vec<String> = (0..3).map(|_| g.run()).collect();
    // No system call between the last KVM_RUN and this write: no context
    // switch restores DR7 meanwhile.
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(&mut *target, 2) };
    let after = hits(fd);
    c.check("the host's hardware watchpoint fires right after KVM_RUN returns (DR7 restored)",
            after == 2, format!("{after} hits after the guest ran ({exits:?})"));
    // SAFETY: our perf fd.
    unsafe { libc::close(fd) };
    true
}

/// An interrupt injected while RIP is at a MOV to MMIO, with the IVT in
/// MMIO: delivering it touches MMIO before the MOV runs. The MOV must not
/// be emulated for that access (rkvm once reported its store). rkvm only:
/// KVM (6.12 on the testbed) emulates the MOV, reporting a store the
/// guest never made before its interrupt handler ran; rkvm reports
/// DELIVERY_EV instead.
fn mmio_during_interrupt_delivery_is_not_the_instruction_at_rip(c: &mut Checks, kvm: &Kvm) {
    // mov [0], al (DS base is MMIO); hlt
    let Some(mut g) = c.success("a guest at a MOV to MMIO, with its IVT in MMIO",
                                Guest::new(kvm, &[0xa2, 0x00, 0x00, 0xf4])) else { return };
    let mut s = g.vcpu.get_sregs().unwrap_or_default();
    s.ds.base = MMIO;
    s.idt.base = MMIO + 0x1000;
    c.success("KVM_SET_SREGS", g.vcpu.set_sregs(&s));
    let mut regs = g.vcpu.get_regs().unwrap_or_default();
    regs.rflags = 0x202; // IF: the interrupt goes in at the first entry
    c.success("KVM_SET_REGS", g.vcpu.set_regs(&regs));
    let queued = crate::kvm_interrupt(&g.vcpu, 0x20);
    c.check("KVM_INTERRUPT of vector 0x20", queued.is_ok(), format!("{queued:?}"));
    let exit = describe(g.vcpu.run());
    let sub = if exit == "InternalError" { internal_suberror(&mut g.vcpu) } else { 0 };
    println!("# interrupt delivery through an IVT in MMIO: {exit} (suberror {sub})");
    c.check("an interrupt whose delivery touches MMIO does not emulate the MOV at RIP",
            !exit.starts_with("mmio write"), format!("{exit} suberror {sub}"));
}

/// A VMM whose vCPU can never be entered (an injected #UD with an error
/// code, which VM entry refuses: SDM Vol. 3C 26.2.1.3) and that keeps
/// calling KVM_RUN: each run is KVM_EXIT_FAIL_ENTRY, and the kernel log
/// must not grow by a line per run (the testbed suite counts the lines;
/// rkvm once logged every one).
fn failed_entries_in_a_loop(c: &mut Checks, kvm: &Kvm) {
    let Some(mut g) = c.success("a protected-mode guest for failed entries", Guest::new(kvm, &HLT)) else { return };
    let mut s = g.vcpu.get_sregs().unwrap_or_default();
    s.cs = flat(8, true, false, 0);
    s.ds = flat(0x10, false, false, 0);
    s.es = s.ds;
    s.ss = s.ds;
    s.cr0 |= 1;
    c.success("KVM_SET_SREGS into protected mode", g.vcpu.set_sregs(&s));
    let mut events = g.vcpu.get_vcpu_events().unwrap_or_default();
    events.exception.injected = 1;
    events.exception.nr = 6; // #UD has no error code...
    events.exception.has_error_code = 1; // ...so VM entry fails.
    c.success("KVM_SET_VCPU_EVENTS with #UD and an error code", g.vcpu.set_vcpu_events(&events));
    let mut failed = 0;
    let mut other = None;
    for _ in 0..200 {
        match g.vcpu.run() {
            Ok(VcpuExit::FailEntry(..)) => failed += 1,
            exit => {
                other = Some(describe(exit));
                break;
            }
        }
    }
    c.check("200 KVM_RUNs of an unenterable vCPU each end in KVM_EXIT_FAIL_ENTRY", failed == 200,
            format!("{failed} failed entries, then {other:?}"));
}

/// Which devices a check applies to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Applies {
    /// Every KVM-like device.
    Always,
    /// Devices that run guests on the CPU with EPT (rkvm, and KVM in the
    /// testbed): real-mode and CPL-3 guests, EPT's limits.
    UnrestrictedGuest,
    /// rkvm only: where it deliberately differs from KVM.
    Rkvm,
}

/// Every check, by name (for `--only`).
const CHECKS: &[(&str, Applies, fn(&mut Checks, &Kvm, bool))] = &[
    ("slots-beyond-gpa-space", Applies::Always, |c, k, tdp| slots_beyond_the_guest_physical_space(c, k, tdp)),
    ("memory-follows-vmm", Applies::Always, |c, k, tdp| guest_memory_follows_the_vmm(c, k, tdp)),
    ("fork-child-eio", Applies::Always, |c, k, _| a_forked_child_gets_eio(c, k)),
    ("mmio-top-of-address-space", Applies::Always, |c, k, _| mmio_at_the_top_of_the_address_space(c, k)),
    ("mmio-64-bit-cs-base", Applies::Always, |c, k, _| mmio_in_64_bit_mode_ignores_the_cs_base(c, k)),
    ("rep-ins-rcx-lowered", Applies::UnrestrictedGuest, |c, k, _| rep_ins_with_rcx_lowered_by_the_vmm(c, k)),
    ("string-io-page-permissions", Applies::UnrestrictedGuest, |c, k, _| string_io_obeys_guest_page_permissions(c, k)),
    ("mmio-during-event-delivery", Applies::Rkvm, |c, k, _| mmio_during_event_delivery(c, k)),
    ("mmio-during-interrupt-delivery", Applies::Rkvm, |c, k, _| {
        mmio_during_interrupt_delivery_is_not_the_instruction_at_rip(c, k)
    }),
    ("failed-entries", Applies::UnrestrictedGuest, |c, k, _| failed_entries_in_a_loop(c, k)),
    ("cpuid-header-inaccessible", Applies::Always, |c, k, _| cpuid_header_into_an_inaccessible_page(c, k)),
    ("host-watchpoint", Applies::Always, |c, k, _| {
        host_watchpoint_after_a_guest(c, k);
    }),
];

/// The checks that apply (see [`Applies`]) and whose name contains `only`
/// (all of them without).
pub fn checks(c: &mut Checks, kvm: &Kvm, unrestricted_guest: bool, rkvm: bool, only: Option<&str>) {
    for (name, applies, check) in CHECKS {
        let applies = match applies {
            Applies::Always => true,
            Applies::UnrestrictedGuest => unrestricted_guest,
            Applies::Rkvm => rkvm && unrestricted_guest,
        };
        if applies && only.is_none_or(|o| name.contains(o)) {
            check(c, kvm, unrestricted_guest);
        }
    }
}

/// The names `--only` takes.
pub fn names() -> impl Iterator<Item = &'static str> {
    CHECKS.iter().map(|(name, ..)| *name)
}
