//! Exits that need guest memory or may sleep, finished after the VMCS is
//! put away and preemption is enabled again. The guest's registers are then
//! in `kvm_regs` and `kvm_sregs`, and changes to them are written back at
//! the next entry.
//!
//! - A guest access to RAM not yet in the EPT, whose page the VMM has not
//!   touched yet: the page is faulted into the VMM and mapped
//!   (`GuestMemory::map`), and the guest retries the access.
//! - INS and OUTS (with or without REP) become KVM_EXIT_IO with `count`
//!   elements in the PIO page, as KVM does: at most a page of data per
//!   exit; RSI/RDI and RCX advance by what was transferred, and RIP moves
//!   past the instruction only when RCX reaches 0 (otherwise it runs
//!   again); a batch stays within one page of guest memory. The memory
//!   operands go through the guest's page tables with the access rights
//!   the CPU would check, so a guest's user process with I/O permission
//!   gets #PF where the CPU would give it one.
//! - An access to a guest-physical address outside every slot (an EPT
//!   violation) is MMIO: the instruction at RIP is fetched through the
//!   guest's page tables and, if it is a plain MOV (rkvm_core::decode),
//!   becomes KVM_EXIT_MMIO; a load completes at the next KVM_RUN with the
//!   VMM's data. Any other instruction is KVM_EXIT_INTERNAL_ERROR
//!   (emulation failure).
//!
//! What the VMM supplies for an IN, INS or MMIO load is taken at the next
//! KVM_RUN only if RIP is still where the exit left it: a VMM that moved
//! the guest on (KVM_SET_REGS) drops the data, as KVM drops a completion
//! whose RIP changed (`complete_fast_pio_in`). For INS, as in KVM's
//! emulator (which re-reads the registers), the data goes where RDI points
//! then, and a REP moves at most as many elements as RCX still counts: a
//! VMM that lowered RCX never makes the count wrap.
//!
//! Context: process context, vCPU mutex held; may sleep.

use kernel::error::{code::EFAULT, Result};

use rkvm_core::decode::{self, Access as MovAccess, CodeSize, Reg};
use rkvm_core::exit::IoQualification;
use rkvm_core::walk::{self, Access, GuestPhysical, PagingState, WalkError};

use crate::kvm_abi::*;
use crate::memory::GuestMemory;
use crate::mm::PAGE_SIZE;
use crate::run::run_struct;
use crate::vcpu::{Vcpu, VcpuState};

/// What the atomic part captured from the VMCS.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SlowExit {
    /// INS or OUTS.
    StringIo {
        io: IoQualification,
        /// Linear address of the first element's memory operand.
        linear: u64,
        /// 16, 32 or 64: the width of RSI/RDI/RCX the instruction uses.
        address_bits: u32,
        instruction_len: u64,
    },
    /// Guest RAM whose page must be faulted into the VMM first.
    MapRam { gpa: u64 },
    /// An access outside every slot.
    Mmio {
        gpa: u64,
        /// An instruction fetch: cannot be emulated.
        fetch: bool,
    },
}

/// An MMIO load whose data the VMM supplies in `kvm_run.mmio.data`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingMmioLoad {
    reg: Reg,
    size: u8,
    len: u8,
    /// RIP of the MOV: the load completes only if it is still there.
    rip: u64,
}

/// An INS whose data the VMM supplies in the PIO page before the next
/// KVM_RUN, then copied into guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingStringIn {
    size: u8,
    /// Elements the VMM supplies.
    count: u32,
    address_bits: u32,
    rep: bool,
    instruction_len: u64,
    /// RIP of the INS: the data goes in only if the guest is still there.
    rip: u64,
}

const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;

fn mask(bits: u32) -> u64 {
    if bits == 64 { u64::MAX } else { (1 << bits) - 1 }
}

/// Replaces the low `bits` of `reg` (a 32-bit write zero-extends, as the
/// CPU does in 64-bit mode).
fn set_low(reg: &mut u64, bits: u32, value: u64) {
    *reg = match bits {
        16 => (*reg & !0xffff) | (value & 0xffff),
        32 => value & 0xffff_ffff,
        _ => value,
    };
}

fn paging(sregs: &kvm_sregs) -> PagingState {
    PagingState { cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer }
}

/// Guest memory for the page walk.
struct Ram<'a>(&'a GuestMemory);

impl GuestPhysical for Ram<'_> {
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.0.read(gpa, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Why an emulated access to guest-linear memory failed.
#[derive(Debug, Clone, Copy)]
enum CopyError {
    /// The guest's page tables refuse the access: the guest gets #PF.
    PageFault { linear: u64, error_code: u32 },
    /// The page tables or the page are outside guest RAM: KVM_RUN fails
    /// with EFAULT, as KVM's emulator does for such accesses.
    Efault,
}

impl From<CopyError> for kernel::error::Error {
    fn from(_: CopyError) -> Self {
        EFAULT
    }
}

/// The access rights a guest instruction's own access has: user-mode at
/// CPL 3 (SS.DPL is the CPL, SDM Vol. 3C 26.3.1.2), RFLAGS.AC for SMAP.
fn access_of(state: &VcpuState, write: bool, fetch: bool) -> Access {
    Access {
        write,
        fetch,
        user: state.g.sregs.ss.dpl == 3,
        ac: state.g.regs.rflags & RFLAGS_AC != 0,
    }
}

/// Copies between guest-linear memory and `buf` through the guest's page
/// tables, with `access`'s rights checked: one walk per page touched (the
/// rights and the translation hold for a whole page), then one copy.
fn copy_linear(mem: &GuestMemory, sregs: &kvm_sregs, linear: u64, buf: &mut [u8], access: Access) -> Result<(), CopyError> {
    let p = paging(sregs);
    let mut done = 0;
    while done < buf.len() {
        let address = linear.wrapping_add(done as u64);
        let gpa = walk::translate(&mut Ram(mem), &p, address, access).map_err(|e| match e {
            WalkError::PageFault { error_code } => CopyError::PageFault { linear: address, error_code },
            WalkError::OutsideRam => CopyError::Efault,
        })?;
        let in_page = (PAGE_SIZE - (address as usize & (PAGE_SIZE - 1))).min(buf.len() - done);
        let chunk = &mut buf[done..done + in_page];
        if access.write {
            mem.write(gpa, chunk).map_err(|_| CopyError::Efault)?;
        } else {
            mem.read(gpa, chunk).map_err(|_| CopyError::Efault)?;
        }
        done += in_page;
    }
    Ok(())
}

/// Raises #PF in the guest for an emulated access the guest's page tables
/// refuse (SDM Vol. 3A, 5.7: CR2 = the address, the error code the walk
/// computed). The instruction does not complete: the guest's handler sees
/// RIP at it, as for a fault on real hardware.
fn inject_page_fault(state: &mut VcpuState, linear: u64, error_code: u32) {
    let info = rkvm_core::exit::InterruptionInfo::new(14, rkvm_core::exit::InterruptionInfo::HARDWARE_EXCEPTION, true);
    state.g.events.entry_info = info.0;
    state.g.events.error_code = error_code;
    state.g.sregs.cr2 = linear;
    state.g.dirty = true;
}

/// The 64-bit register `index` of `regs` (0 = RAX ... 15 = R15).
fn gpr(regs: &mut kvm_regs, index: u8) -> &mut u64 {
    match index & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn internal_error(vcpu: &Vcpu, suberror: u32) {
    super::report_internal_error(run_struct(vcpu), suberror, &[]);
}

fn code_size(sregs: &kvm_sregs) -> CodeSize {
    if long_mode_code(sregs) {
        CodeSize::Bits64
    } else if sregs.cr0 & 1 != 0 && sregs.cs.db != 0 {
        CodeSize::Bits32
    } else {
        CodeSize::Bits16
    }
}

/// 64-bit code: IA-32e mode with CS.L.
fn long_mode_code(sregs: &kvm_sregs) -> bool {
    sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0
}

/// The linear address of the instruction at RIP: in 64-bit mode the CS
/// base is ignored (SDM Vol. 3A, 3.4.4), elsewhere it is added and the
/// address wraps at 4 GiB.
fn instruction_pointer(sregs: &kvm_sregs, rip: u64) -> u64 {
    if long_mode_code(sregs) {
        rip
    } else {
        sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
    }
}

/// The up-to-15 bytes of the instruction at RIP that the guest's tables
/// let it fetch, for decoding.
fn fetch_instruction(mem: &GuestMemory, state: &VcpuState, bytes: &mut [u8; 15]) -> usize {
    let linear = instruction_pointer(&state.g.sregs, state.g.regs.rip);
    let access = access_of(state, false, true);
    let mut got = 0;
    while got < bytes.len() {
        // Wrapping: an instruction may start in the last bytes of the
        // address space (and the guest chose where).
        let at = linear.wrapping_add(got as u64);
        let at = if long_mode_code(&state.g.sregs) { at } else { at & 0xffff_ffff };
        // The rest of this page at most: a second page may be unmapped.
        let n = (PAGE_SIZE - (at as usize & (PAGE_SIZE - 1))).min(bytes.len() - got);
        if copy_linear(mem, &state.g.sregs, at, &mut bytes[got..got + n], access).is_err() {
            break;
        }
        got += n;
    }
    got
}

/// MMIO: decode the MOV at RIP and hand the access to the VMM.
fn mmio(vcpu: &Vcpu, state: &mut VcpuState, gpa: u64, fetch: bool) -> Result<()> {
    let mem = vcpu.vm.memory();
    if fetch {
        // Code in MMIO cannot be emulated (neither can KVM).
        internal_error(vcpu, KVM_INTERNAL_ERROR_EMULATION);
        return Ok(());
    }
    let mut bytes = [0u8; 15];
    let got = fetch_instruction(mem, state, &mut bytes);
    let Some(mov) = decode::decode_mov(&bytes[..got], code_size(&state.g.sregs)) else {
        internal_error(vcpu, KVM_INTERNAL_ERROR_EMULATION);
        return Ok(());
    };
    let size = usize::from(mov.size);
    let run = run_struct(vcpu);
    let mut data = [0u8; 8];
    let is_write = match mov.access {
        MovAccess::StoreReg(r) => {
            let v = *gpr(&mut state.g.regs, r.index);
            let v = if r.high_byte { v >> 8 } else { v };
            data = v.to_le_bytes();
            true
        }
        MovAccess::StoreImm(v) => {
            data = v.to_le_bytes();
            true
        }
        MovAccess::Load(reg) => {
            state.g.pending_mmio = Some(PendingMmioLoad { reg, size: mov.size, len: mov.len, rip: state.g.regs.rip });
            false
        }
    };
    // SAFETY: our run page; `mmio` is the member for KVM_EXIT_MMIO.
    unsafe {
        (*run).exit_reason = KVM_EXIT_MMIO;
        let m = &mut (*run).__bindgen_anon_1.mmio;
        m.phys_addr = gpa;
        m.data = [0; 8];
        m.data[..size].copy_from_slice(&data[..size]);
        m.len = mov.size.into();
        m.is_write = is_write.into();
    }
    if is_write {
        state.g.regs.rip = state.g.regs.rip.wrapping_add(mov.len.into());
        state.g.instruction_done();
        state.g.dirty = true;
    }
    Ok(())
}

/// Moves the VMM's data for the last MMIO load into the destination
/// register (8- and 16-bit loads merge, 32-bit loads zero-extend) and moves
/// RIP past the MOV; nothing if the VMM moved RIP meanwhile.
pub(crate) fn complete_mmio_load(vcpu: &Vcpu, state: &mut VcpuState) {
    let Some(p) = state.g.pending_mmio.take() else { return };
    if state.g.regs.rip != p.rip {
        return;
    }
    let run = run_struct(vcpu);
    // SAFETY: our run page; the VMM may have written `data` (untrusted).
    let data = unsafe { core::ptr::read_volatile(&(*run).__bindgen_anon_1.mmio.data) };
    let mut raw = [0u8; 8];
    raw[..usize::from(p.size)].copy_from_slice(&data[..usize::from(p.size)]);
    let value = u64::from_le_bytes(raw);
    let reg = gpr(&mut state.g.regs, p.reg.index);
    *reg = match (p.size, p.reg.high_byte) {
        (1, true) => (*reg & !0xff00) | (value << 8),
        (1, false) => (*reg & !0xff) | value,
        (2, _) => (*reg & !0xffff) | value,
        _ => value,
    };
    state.g.regs.rip = state.g.regs.rip.wrapping_add(p.len.into());
    state.g.instruction_done();
    state.g.dirty = true;
}

/// Finishes a slow exit: `Ok(true)` if `kvm_run` now says what the VMM must
/// do, `Ok(false)` if the guest runs on (a page was mapped, or an exception
/// was raised in it).
pub(crate) fn handle(vcpu: &Vcpu, state: &mut VcpuState, exit: SlowExit) -> Result<bool> {
    let (io, linear, address_bits, instruction_len) = match exit {
        SlowExit::StringIo { io, linear, address_bits, instruction_len } => (io, linear, address_bits, instruction_len),
        SlowExit::MapRam { gpa } => {
            // `false`: the slot went away meanwhile; the guest's retry then
            // finds MMIO.
            vcpu.vm.memory().map(gpa)?;
            return Ok(false);
        }
        // A slot created meanwhile: the guest's retry finds RAM.
        SlowExit::Mmio { gpa, .. } if vcpu.vm.memory().is_ram(gpa) => return Ok(false),
        SlowExit::Mmio { gpa, fetch } => return mmio(vcpu, state, gpa, fetch).map(|()| true),
    };
    let size = usize::from(io.size);
    let regs = &mut state.g.regs;
    let count_reg = regs.rcx & mask(address_bits);
    if io.rep && count_reg == 0 {
        // REP with a zero count does nothing.
        regs.rip = regs.rip.wrapping_add(instruction_len);
        state.g.dirty = true;
        state.g.instruction_done();
        return Ok(false);
    }
    let backwards = regs.rflags & RFLAGS_DF != 0;
    let wanted = if io.rep { count_reg } else { 1 };
    let count = elements_in_page(linear, size, wanted, backwards);
    // The first element's page decides for the whole batch: if the guest
    // may not access it, #PF now, before any I/O (the CPU faults on the
    // element's memory access too; for INS no port is read then).
    let mem = vcpu.vm.memory();
    let access = access_of(state, io.is_in, false);
    match probe(mem, &state.g.sregs, linear, size, access) {
        Ok(()) => {}
        Err(CopyError::PageFault { linear, error_code }) => {
            inject_page_fault(state, linear, error_code);
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    }
    let run = run_struct(vcpu);
    let pio = vcpu.pio_page.as_ptr().cast_mut();
    let regs = &state.g.regs;
    if io.is_in {
        state.g.pending_string_in = Some(PendingStringIn {
            size: io.size,
            count,
            address_bits,
            rep: io.rep,
            instruction_len,
            rip: regs.rip,
        });
    } else {
        let batch = StringBatch { linear, size, count, backwards };
        match batch.move_data(mem, &state.g.sregs, access, pio) {
            Ok(()) => {}
            Err(CopyError::PageFault { linear, error_code }) => {
                // The page changed since the probe (another vCPU): fault
                // now, nothing was sent.
                inject_page_fault(state, linear, error_code);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        advance(state, count, size, address_bits, io.rep, instruction_len, false, backwards);
    }
    super::io::report(run, &io, count);
    Ok(true)
}

/// How many elements of `size` bytes, at most `wanted`, a string
/// instruction moves from `linear` on while staying in the page of the
/// first (at least one: an element may straddle two pages). Like KVM's
/// emulator, rkvm batches a REP INS/OUTS one page at a time, so that the
/// first element's translation holds for the batch.
fn elements_in_page(linear: u64, size: usize, wanted: u64, backwards: bool) -> u32 {
    let offset = linear & (PAGE_SIZE as u64 - 1);
    // Bytes from the first element to the end of its page, or (backwards)
    // from the start of the page to the end of the first element.
    let room = if backwards { offset + size as u64 } else { PAGE_SIZE as u64 - offset };
    (room / size as u64).clamp(1, wanted.max(1)) as u32
}

/// The elements one INS/OUTS exit moves: `count` of `size` bytes from the
/// guest-linear `linear` on, going down if `backwards`.
struct StringBatch {
    linear: u64,
    size: usize,
    count: u32,
    backwards: bool,
}

impl StringBatch {
    /// Moves the elements between guest memory and the PIO page `pio`
    /// (element `i` at offset `i * size` there): into the guest for a write
    /// `access` (INS), out of it otherwise (OUTS). A batch within one page
    /// takes one walk of the guest's tables; otherwise each element its own.
    fn move_data(&self, mem: &GuestMemory, sregs: &kvm_sregs, access: Access, pio: *mut u8) -> Result<(), CopyError> {
        let step = self.size as u64;
        let span = u64::from(self.count) * step;
        let low = if self.backwards { self.linear.wrapping_sub(span - step) } else { self.linear };
        let high = low.wrapping_add(span - 1);
        let one_page = self.count > 1 && high >= low && low >> 12 == high >> 12;
        let base = if one_page {
            let p = paging(sregs);
            Some(walk::translate(&mut Ram(mem), &p, self.linear, access).map_err(|e| match e {
                WalkError::PageFault { error_code } => CopyError::PageFault { linear: self.linear, error_code },
                WalkError::OutsideRam => CopyError::Efault,
            })?)
        } else {
            None
        };
        for i in 0..u64::from(self.count) {
            let offset = i * step;
            let mut data = [0u8; 4];
            let data = &mut data[..self.size];
            // SAFETY: the PIO page is ours (4 KiB) and offset + size fits
            // it: a batch is at most a page of elements (`elements_in_page`).
            let slot = unsafe { pio.add(offset as usize) };
            if access.write {
                // SAFETY: as above; the VMM may write the page meanwhile,
                // which only changes the data.
                unsafe { core::ptr::copy_nonoverlapping(slot, data.as_mut_ptr(), self.size) };
            }
            match base {
                // Same page as the first: its address, offset in the page.
                Some(base) => {
                    let gpa = if self.backwards { base.wrapping_sub(offset) } else { base.wrapping_add(offset) };
                    let moved = if access.write { mem.write(gpa, data) } else { mem.read(gpa, data) };
                    moved.map_err(|_| CopyError::Efault)?;
                }
                None => {
                    let element = if self.backwards { self.linear.wrapping_sub(offset) } else { self.linear.wrapping_add(offset) };
                    copy_linear(mem, sregs, element, data, access)?;
                }
            }
            if !access.write {
                // SAFETY: as above.
                unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), slot, self.size) };
            }
        }
        Ok(())
    }
}

/// Checks that the guest may make `access` to the `len` bytes at `linear`.
fn probe(mem: &GuestMemory, sregs: &kvm_sregs, linear: u64, len: usize, access: Access) -> Result<(), CopyError> {
    let p = paging(sregs);
    // The first byte's page, and the last byte's if the range crosses into
    // the next one.
    let last = linear.wrapping_add(len.saturating_sub(1) as u64);
    for address in [linear, last] {
        walk::translate(&mut Ram(mem), &p, address, access).map_err(|e| match e {
            WalkError::PageFault { error_code } => CopyError::PageFault { linear: address, error_code },
            WalkError::OutsideRam => CopyError::Efault,
        })?;
    }
    Ok(())
}

/// Moves RSI (OUTS) or RDI (INS) past `count` elements, counts RCX down
/// for REP, and moves RIP past the instruction once it is done.
#[allow(clippy::too_many_arguments)]
fn advance(state: &mut VcpuState, count: u32, size: usize, bits: u32, rep: bool, len: u64, is_in: bool, backwards: bool) {
    let regs = &mut state.g.regs;
    let delta = u64::from(count) * size as u64;
    let pointer = if is_in { &mut regs.rdi } else { &mut regs.rsi };
    let moved = if backwards { pointer.wrapping_sub(delta) } else { pointer.wrapping_add(delta) };
    set_low(pointer, bits, moved);
    let done = if rep {
        // `count` never exceeds the count register: it was taken from it,
        // and a completion whose RCX changed is dropped.
        let left = (regs.rcx & mask(bits)).saturating_sub(u64::from(count));
        set_low(&mut regs.rcx, bits, left);
        left == 0
    } else {
        true
    };
    if done {
        regs.rip = regs.rip.wrapping_add(len);
        state.g.instruction_done();
    }
    state.g.dirty = true;
}

/// Copies the VMM's data for the last INS into guest memory (at the start
/// of the next KVM_RUN): to ES:RDI as the registers are now, at most as
/// many elements as RCX counts for REP; nothing if the VMM moved RIP.
pub(crate) fn complete_string_in(vcpu: &Vcpu, state: &mut VcpuState) -> Result {
    let Some(p) = state.g.pending_string_in.take() else { return Ok(()) };
    let regs = &state.g.regs;
    if regs.rip != p.rip {
        return Ok(());
    }
    let count = if p.rep { u64::from(p.count).min(regs.rcx & mask(p.address_bits)) as u32 } else { p.count };
    let backwards = regs.rflags & RFLAGS_DF != 0;
    let linear = string_destination(&state.g.sregs, regs.rdi, p.address_bits);
    let size = usize::from(p.size);
    let pio = vcpu.pio_page.as_ptr().cast_mut();
    let mem = vcpu.vm.memory();
    let access = access_of(state, true, false);
    let batch = StringBatch { linear, size, count, backwards };
    match batch.move_data(mem, &state.g.sregs, access, pio) {
        Ok(()) => {}
        Err(CopyError::PageFault { linear, error_code }) => {
            inject_page_fault(state, linear, error_code);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    advance(state, count, size, p.address_bits, p.rep, p.instruction_len, true, backwards);
    Ok(())
}

/// The linear address of ES:RDI, the destination of INS (SDM Vol. 2A,
/// INS): RDI masked to the address size, plus the ES base outside 64-bit
/// mode (wrapping at 4 GiB there).
fn string_destination(sregs: &kvm_sregs, rdi: u64, address_bits: u32) -> u64 {
    let offset = rdi & mask(address_bits);
    if long_mode_code(sregs) {
        offset
    } else {
        sregs.es.base.wrapping_add(offset) & 0xffff_ffff
    }
}
