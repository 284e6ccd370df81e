//! Programming a loaded VMCS: controls, host state (SDM Vol. 3C, 25.5 and
//! 27.2.2-27.2.3), and the guest state to and from KVM's `kvm_regs` and
//! `kvm_sregs` (25.4, checked by the CPU at entry per 27.3.1).
//!
//! CR0 and CR4 (25.6.6): the guest reads its own values through the read
//! shadows; the bits the host must control are in the guest/host masks, so
//! a guest write to them exits (`exit/cr.rs`):
//! - CR0: NE must be 1 in VMX operation (IA32_VMX_CR0_FIXED0), and the host
//!   keeps caching on (CD, NW clear) whatever the guest asks; PE and PG may
//!   be 0 thanks to unrestricted guest, so the guest owns them.
//! - CR4: VMXE must be 1 (CR4_FIXED0) but the guest sees it clear; bits the
//!   vCPU does not support stay owned by the host so that setting them
//!   exits and raises #GP.

use kernel::error::Result;
use x86::controlregs::{Cr0, Cr4};
use x86::vmx::vmcs::{control, guest, host};

use rkvm_core::cpu_state::{efer, GUEST_CR4_ALLOWED};
use rkvm_core::guest_msr::GuestMsrs;
use rkvm_core::segment::Segment;

use super::entry;
use super::vmcs::LoadedVmcs;
use crate::glue::HostState;
use crate::kvm_abi::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use crate::vm::Vm;
use crate::vmx::entry::GuestRegs;
use crate::vmx::CR4_VMXE;

const CR0_NE: u64 = Cr0::CR0_NUMERIC_ERROR.bits() as u64;
const CR0_CD: u64 = Cr0::CR0_CACHE_DISABLE.bits() as u64;
const CR0_NW: u64 = Cr0::CR0_NOT_WRITE_THROUGH.bits() as u64;

/// CR0 bits the host owns.
pub(crate) const CR0_HOST_OWNED: u64 = CR0_NE | CR0_CD | CR0_NW;
/// CR4 bits the host owns: VMXE and everything the guest may not set, and
/// OSXSAVE, which a guest may set only if its CPUID offers XSAVE.
pub(crate) const CR4_HOST_OWNED: u64 = !GUEST_CR4_ALLOWED | Cr4::CR4_ENABLE_OS_XSAVE.bits() as u64;

/// The CR0 the CPU runs the guest with, for the guest's `cr0`.
pub(crate) fn hardware_cr0(cr0: u64) -> u64 {
    (cr0 | CR0_NE) & !(CR0_CD | CR0_NW)
}

/// The CR4 the CPU runs the guest with, for the guest's `cr4`.
pub(crate) fn hardware_cr4(cr4: u64) -> u64 {
    cr4 | CR4_VMXE
}

/// The guest's view of CR0: host-owned bits from the read shadow, the rest
/// from the CPU (SDM 25.6.6).
pub(crate) fn guest_cr0(vmcs: &LoadedVmcs<'_>) -> u64 {
    (vmcs.read(control::CR0_READ_SHADOW) & CR0_HOST_OWNED) | (vmcs.read(guest::CR0) & !CR0_HOST_OWNED)
}

/// The guest's view of CR4, as [`guest_cr0`].
pub(crate) fn guest_cr4(vmcs: &LoadedVmcs<'_>) -> u64 {
    (vmcs.read(control::CR4_READ_SHADOW) & CR4_HOST_OWNED) | (vmcs.read(guest::CR4) & !CR4_HOST_OWNED)
}

/// Writes the controls and the fields that never change for a vCPU.
pub(crate) fn write_controls(vmcs: &mut LoadedVmcs<'_>, vm: &Vm, long_mode: bool, msr_bitmap: u64) -> Result {
    let c = vm.controls();
    vmcs.write(control::PINBASED_EXEC_CONTROLS, c.pinbased.into())?;
    vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, c.procbased.into())?;
    vmcs.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, c.procbased2.into())?;
    vmcs.write(control::VMEXIT_CONTROLS, c.exit.into())?;
    vmcs.write(control::VMENTRY_CONTROLS, c.entry_for(long_mode).into())?;
    vmcs.write(control::EXCEPTION_BITMAP, 0)?;
    vmcs.write(control::CR3_TARGET_COUNT, 0)?;
    vmcs.write(control::VMEXIT_MSR_STORE_COUNT, 0)?;
    vmcs.write(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
    vmcs.write(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
    vmcs.write(control::CR0_GUEST_HOST_MASK, CR0_HOST_OWNED)?;
    vmcs.write(control::CR4_GUEST_HOST_MASK, CR4_HOST_OWNED)?;
    vmcs.write(control::EPTP_FULL, vm.eptp())?;
    if c.msr_bitmaps() {
        vmcs.write(control::MSR_BITMAPS_ADDR_FULL, msr_bitmap)?;
    }
    // No VMCS shadowing: the link pointer must be all ones (26.3.1.5).
    vmcs.write(guest::LINK_PTR_FULL, u64::MAX)?;
    Ok(())
}

/// Writes this CPU's host state (27.2.2, 27.2.3: selectors with RPL 0 and
/// TI 0, canonical bases, the 64-bit host).
pub(crate) fn write_host(vmcs: &mut LoadedVmcs<'_>, h: &HostState) -> Result {
    vmcs.write(host::CR0, h.cr0)?;
    vmcs.write(host::CR3, h.cr3)?;
    vmcs.write(host::CR4, h.cr4)?;
    vmcs.write(host::CS_SELECTOR, h.cs_sel.into())?;
    vmcs.write(host::SS_SELECTOR, h.ss_sel.into())?;
    // Null DS and ES, as KVM: restored after the run if the task had others.
    vmcs.write(host::DS_SELECTOR, 0)?;
    vmcs.write(host::ES_SELECTOR, 0)?;
    vmcs.write(host::FS_SELECTOR, h.fs_sel.into())?;
    vmcs.write(host::GS_SELECTOR, h.gs_sel.into())?;
    vmcs.write(host::TR_SELECTOR, h.tr_sel.into())?;
    vmcs.write(host::FS_BASE, h.fs_base)?;
    vmcs.write(host::GS_BASE, h.gs_base)?;
    vmcs.write(host::TR_BASE, h.tr_base)?;
    vmcs.write(host::GDTR_BASE, h.gdtr_base)?;
    vmcs.write(host::IDTR_BASE, h.idtr_base)?;
    vmcs.write(host::IA32_SYSENTER_CS, h.sysenter_cs)?;
    vmcs.write(host::IA32_SYSENTER_ESP, h.sysenter_esp)?;
    vmcs.write(host::IA32_SYSENTER_EIP, h.sysenter_eip)?;
    vmcs.write(host::IA32_EFER_FULL, h.efer)?;
    vmcs.write(host::IA32_PAT_FULL, h.pat)?;
    vmcs.write(host::RIP, entry::host_rip())?;
    Ok(())
}

fn to_core(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn from_core(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

/// (selector, base, limit, access rights) field encodings of a segment.
type SegmentFields = (u32, u32, u32, u32);

const ES: SegmentFields = (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS);
const CS: SegmentFields = (guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS);
const SS: SegmentFields = (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS);
const DS: SegmentFields = (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS);
const FS: SegmentFields = (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS);
const GS: SegmentFields = (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS);
const TR: SegmentFields = (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS);
const LDTR: SegmentFields =
    (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS);

fn write_segment(vmcs: &mut LoadedVmcs<'_>, f: SegmentFields, s: &kvm_segment) -> Result {
    let seg = to_core(s);
    vmcs.write(f.0, seg.selector.into())?;
    vmcs.write(f.1, seg.base)?;
    vmcs.write(f.2, seg.limit.into())?;
    vmcs.write(f.3, seg.access_rights().into())
}

fn read_segment(vmcs: &LoadedVmcs<'_>, f: SegmentFields) -> kvm_segment {
    from_core(&Segment::from_vmcs(
        vmcs.read(f.0) as u16,
        vmcs.read(f.1),
        vmcs.read(f.2) as u32,
        vmcs.read(f.3) as u32,
    ))
}

/// Moves `kvm_regs` into the entry routine's registers and the VMCS.
pub(crate) fn write_regs(vmcs: &mut LoadedVmcs<'_>, regs: &kvm_regs, gprs: &mut GuestRegs) -> Result {
    gprs.0 = [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ];
    vmcs.write(guest::RSP, regs.rsp)?;
    vmcs.write(guest::RIP, regs.rip)?;
    // Bit 1 is reserved as 1, bits 3, 5, 15 and 22-63 as 0 (26.3.1.4).
    vmcs.write(guest::RFLAGS, (regs.rflags & 0x3f_7fd7) | 2)
}

/// The registers after a run.
pub(crate) fn read_regs(vmcs: &LoadedVmcs<'_>, gprs: &GuestRegs) -> kvm_regs {
    let g = &gprs.0;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: vmcs.read(guest::RSP),
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: vmcs.read(guest::RIP),
        rflags: vmcs.read(guest::RFLAGS),
    }
}

/// Writes segment, descriptor-table and control registers, and the other
/// guest-state fields a vCPU starts with (25.4.2: DR7 0x400, PAT at its
/// reset value, active, nothing blocked or pending).
pub(crate) fn write_sregs(vmcs: &mut LoadedVmcs<'_>, s: &kvm_sregs) -> Result {
    for (f, seg) in [(ES, &s.es), (CS, &s.cs), (SS, &s.ss), (DS, &s.ds), (FS, &s.fs), (GS, &s.gs), (TR, &s.tr), (LDTR, &s.ldt)] {
        write_segment(vmcs, f, seg)?;
    }
    vmcs.write(guest::GDTR_BASE, s.gdt.base)?;
    vmcs.write(guest::GDTR_LIMIT, s.gdt.limit.into())?;
    vmcs.write(guest::IDTR_BASE, s.idt.base)?;
    vmcs.write(guest::IDTR_LIMIT, s.idt.limit.into())?;
    vmcs.write(guest::CR0, hardware_cr0(s.cr0))?;
    vmcs.write(control::CR0_READ_SHADOW, s.cr0)?;
    vmcs.write(guest::CR3, s.cr3)?;
    vmcs.write(guest::CR4, hardware_cr4(s.cr4))?;
    vmcs.write(control::CR4_READ_SHADOW, s.cr4)?;
    vmcs.write(guest::IA32_EFER_FULL, s.efer)?;
    Ok(())
}

/// Fields that are not part of `kvm_sregs`, at their reset values; written
/// on the first run only (the interruptibility state is an event: events.rs).
pub(crate) fn write_reset_extras(vmcs: &mut LoadedVmcs<'_>) -> Result {
    vmcs.write(guest::DR7, 0x400)?;
    vmcs.write(guest::IA32_DEBUGCTL_FULL, 0)?;
    vmcs.write(guest::ACTIVITY_STATE, 0)?;
    vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    Ok(())
}

/// The segment, descriptor-table and control registers after a run; `cr2`
/// and `cr8` come from the caller (they are not in the VMCS).
pub(crate) fn read_sregs(vmcs: &LoadedVmcs<'_>, old: &kvm_sregs) -> kvm_sregs {
    kvm_sregs {
        es: read_segment(vmcs, ES),
        cs: read_segment(vmcs, CS),
        ss: read_segment(vmcs, SS),
        ds: read_segment(vmcs, DS),
        fs: read_segment(vmcs, FS),
        gs: read_segment(vmcs, GS),
        tr: read_segment(vmcs, TR),
        ldt: read_segment(vmcs, LDTR),
        gdt: kvm_dtable { base: vmcs.read(guest::GDTR_BASE), limit: vmcs.read(guest::GDTR_LIMIT) as u16, ..Default::default() },
        idt: kvm_dtable { base: vmcs.read(guest::IDTR_BASE), limit: vmcs.read(guest::IDTR_LIMIT) as u16, ..Default::default() },
        cr0: guest_cr0(vmcs),
        cr3: vmcs.read(guest::CR3),
        cr4: guest_cr4(vmcs),
        efer: vmcs.read(guest::IA32_EFER_FULL),
        ..*old
    }
}

/// Copies the MSRs the CPU loads at entry from the per-vCPU copies, and the
/// TSC offset (when the CPU offsets the TSC).
pub(crate) fn write_msrs(vmcs: &mut LoadedVmcs<'_>, vm: &Vm, m: &GuestMsrs) -> Result {
    vmcs.write(guest::IA32_PAT_FULL, m.pat)?;
    vmcs.write(guest::IA32_SYSENTER_CS, m.sysenter_cs)?;
    vmcs.write(guest::IA32_SYSENTER_ESP, m.sysenter_esp)?;
    vmcs.write(guest::IA32_SYSENTER_EIP, m.sysenter_eip)?;
    if vm.controls().tsc_offsetting() {
        vmcs.write(control::TSC_OFFSET_FULL, m.tsc_offset)?;
    }
    Ok(())
}

/// After a run: the MSRs the CPU saved into the VMCS at the last exit
/// (SYSENTER_* always, 28.3.1; PAT by the exit control), which the guest
/// may have written without exits.
pub(crate) fn read_msrs(vmcs: &LoadedVmcs<'_>, m: &mut GuestMsrs) {
    m.pat = vmcs.read(guest::IA32_PAT_FULL);
    m.sysenter_cs = vmcs.read(guest::IA32_SYSENTER_CS);
    m.sysenter_esp = vmcs.read(guest::IA32_SYSENTER_ESP);
    m.sysenter_eip = vmcs.read(guest::IA32_SYSENTER_EIP);
}

/// Whether the guest is in IA-32e mode (EFER.LMA).
pub(crate) fn long_mode(sregs: &kvm_sregs) -> bool {
    sregs.efer & efer::LMA != 0
}
