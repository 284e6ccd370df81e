//! Exits that need guest memory, finished after the VMCS is put away and
//! preemption is enabled again (reading guest memory takes the VM's mutex,
//! which may sleep). The guest's registers are then in `kvm_regs` and
//! `kvm_sregs`, and changes to them are written back at the next entry.
//!
//! INS and OUTS (with or without REP) become KVM_EXIT_IO with `count`
//! elements in the PIO page, as KVM does: at most a page of data per exit;
//! RSI/RDI and RCX advance by what was transferred, and RIP moves past the
//! instruction only when RCX reaches 0 (otherwise it runs again).
//!
//! An access to a guest-physical address outside every slot (an EPT
//! violation) is MMIO: the instruction at RIP is fetched through the guest's
//! page tables and, if it is a plain MOV (rkvm_core::decode), becomes
//! KVM_EXIT_MMIO; a load completes at the next KVM_RUN with the VMM's data.
//! Any other instruction is KVM_EXIT_INTERNAL_ERROR (emulation failure).
//!
//! Context: process context, vCPU mutex held; takes the VM mutex.

use kernel::error::{code::EFAULT, Result};

use rkvm_core::decode::{self, Access, CodeSize, Reg};
use rkvm_core::exit::IoQualification;
use rkvm_core::walk::{self, GuestPhysical, PagingState};

use crate::kvm_abi::*;
use crate::mm::PAGE_SIZE;
use crate::run::run_struct;
use crate::vcpu::{Vcpu, VcpuState};
use crate::vm::VmMemoryView;

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
}

/// An INS whose data the VMM supplies in the PIO page before the next
/// KVM_RUN, then copied into guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingStringIn {
    size: u8,
    count: u32,
    linear: u64,
    backwards: bool,
    address_bits: u32,
    rep: bool,
    instruction_len: u64,
}

const RFLAGS_DF: u64 = 1 << 10;

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

/// Guest memory through the VM's slots, for the page walk.
impl GuestPhysical for VmMemoryView<'_> {
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Why an emulated access to guest-linear memory failed.
#[derive(Debug, Clone, Copy)]
enum CopyError {
    /// The guest's page tables do not map `linear`: the guest gets #PF.
    PageFault { linear: u64 },
    /// The page tables or the page are outside guest RAM: KVM_RUN fails
    /// with EFAULT, as KVM's emulator does for such accesses.
    Efault,
}

impl From<CopyError> for kernel::error::Error {
    fn from(_: CopyError) -> Self {
        EFAULT
    }
}

/// Copies between guest-linear memory and `buf`, byte by byte through the
/// guest's page tables.
fn copy_linear(mem: &mut VmMemoryView<'_>, sregs: &kvm_sregs, linear: u64, buf: &mut [u8], to_guest: bool) -> Result<(), CopyError> {
    let p = paging(sregs);
    for (i, b) in buf.iter_mut().enumerate() {
        let address = linear.wrapping_add(i as u64);
        let gpa = walk::translate(mem, &p, address).map_err(|e| match e {
            walk::WalkError::NotPresent => CopyError::PageFault { linear: address },
            walk::WalkError::OutsideRam => CopyError::Efault,
        })?;
        let mut one = [*b];
        if to_guest {
            mem.write(gpa, &one).map_err(|_| CopyError::Efault)?;
        } else {
            mem.read(gpa, &mut one).map_err(|_| CopyError::Efault)?;
            *b = one[0];
        }
    }
    Ok(())
}

/// Raises #PF in the guest for an emulated access to `linear` that its page
/// tables do not map (SDM Vol. 3A, 5.7: CR2 = the address; error code P=0,
/// W/R = the access, U/S = CPL 3). The instruction does not complete: the
/// guest's handler sees RIP at it, as for a fault on real hardware.
fn inject_page_fault(state: &mut VcpuState, linear: u64, write: bool) {
    let user = state.g.sregs.ss.dpl == 3;
    let code = (u32::from(write) << 1) | (u32::from(user) << 2);
    let info = rkvm_core::exit::InterruptionInfo::new(14, rkvm_core::exit::InterruptionInfo::HARDWARE_EXCEPTION, true);
    state.g.events.entry_info = info.0;
    state.g.events.error_code = code;
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
    let run = run_struct(vcpu);
    // SAFETY: our run page; `internal` is the member for this exit reason.
    unsafe {
        (*run).exit_reason = KVM_EXIT_INTERNAL_ERROR;
        (*run).__bindgen_anon_1.internal.suberror = suberror;
        (*run).__bindgen_anon_1.internal.ndata = 0;
    }
}

fn code_size(sregs: &kvm_sregs) -> CodeSize {
    if sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0 {
        CodeSize::Bits64
    } else if sregs.cr0 & 1 != 0 && sregs.cs.db != 0 {
        CodeSize::Bits32
    } else {
        CodeSize::Bits16
    }
}

/// MMIO: decode the MOV at RIP and hand the access to the VMM.
fn mmio(vcpu: &Vcpu, state: &mut VcpuState, gpa: u64, fetch: bool) -> Result<()> {
    let mut view = vcpu.vm.memory();
    if fetch || view.contains(gpa) {
        drop(view);
        internal_error(vcpu, KVM_INTERNAL_ERROR_EMULATION);
        return Ok(());
    }
    let mut bytes = [0u8; 15];
    let linear = state.g.sregs.cs.base.wrapping_add(state.g.regs.rip);
    let mut got = 0;
    while got < bytes.len() && copy_linear(&mut view, &state.g.sregs, linear + got as u64, &mut bytes[got..got + 1], false).is_ok() {
        got += 1;
    }
    drop(view);
    let Some(mov) = decode::decode_mov(&bytes[..got], code_size(&state.g.sregs)) else {
        internal_error(vcpu, KVM_INTERNAL_ERROR_EMULATION);
        return Ok(());
    };
    let size = usize::from(mov.size);
    let run = run_struct(vcpu);
    let mut data = [0u8; 8];
    let is_write = match mov.access {
        Access::StoreReg(r) => {
            let v = *gpr(&mut state.g.regs, r.index);
            let v = if r.high_byte { v >> 8 } else { v };
            data = v.to_le_bytes();
            true
        }
        Access::StoreImm(v) => {
            data = v.to_le_bytes();
            true
        }
        Access::Load(reg) => {
            state.g.pending_mmio = Some(PendingMmioLoad { reg, size: mov.size, len: mov.len });
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
/// RIP past the MOV.
pub(crate) fn complete_mmio_load(vcpu: &Vcpu, state: &mut VcpuState) {
    let Some(p) = state.g.pending_mmio.take() else { return };
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
        (4, _) => value,
        _ => value,
    };
    state.g.regs.rip = state.g.regs.rip.wrapping_add(p.len.into());
    state.g.instruction_done();
    state.g.dirty = true;
}

/// Finishes a slow exit: `Ok(true)` if `kvm_run` now says what the VMM must
/// do, `Ok(false)` if the guest runs on (an exception was raised in it).
pub(crate) fn handle(vcpu: &Vcpu, state: &mut VcpuState, exit: SlowExit) -> Result<bool> {
    let (io, linear, address_bits, instruction_len) = match exit {
        SlowExit::StringIo { io, linear, address_bits, instruction_len } => (io, linear, address_bits, instruction_len),
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
    let count = if io.rep { count_reg.min((PAGE_SIZE / size) as u64) } else { 1 } as u32;
    let backwards = regs.rflags & RFLAGS_DF != 0;
    let run = run_struct(vcpu);
    let pio = vcpu.pio_page.as_ptr().cast_mut();
    if io.is_in {
        state.g.pending_string_in = Some(PendingStringIn {
            size: io.size,
            count,
            linear,
            backwards,
            address_bits,
            rep: io.rep,
            instruction_len,
        });
    } else {
        let mut view = vcpu.vm.memory();
        for i in 0..count as u64 {
            let offset = i * size as u64;
            let element = if backwards { linear.wrapping_sub(offset) } else { linear.wrapping_add(offset) };
            let mut data = [0u8; 4];
            match copy_linear(&mut view, &state.g.sregs, element, &mut data[..size], false) {
                Ok(()) => {}
                Err(CopyError::PageFault { linear }) => {
                    drop(view);
                    inject_page_fault(state, linear, false);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            // SAFETY: the PIO page is ours; offset + size <= PAGE_SIZE.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pio.add(offset as usize), size) };
        }
        advance(state, count, size, address_bits, io.rep, instruction_len, false, backwards);
    }
    super::io::report(run, &io, count);
    Ok(true)
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
        let left = (regs.rcx & mask(bits)) - u64::from(count);
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
/// of the next KVM_RUN).
pub(crate) fn complete_string_in(vcpu: &Vcpu, state: &mut VcpuState) -> Result {
    let Some(p) = state.g.pending_string_in.take() else { return Ok(()) };
    let size = usize::from(p.size);
    let pio = vcpu.pio_page.as_ptr();
    let mut view = vcpu.vm.memory();
    for i in 0..p.count as u64 {
        let offset = i * size as u64;
        let element = if p.backwards { p.linear.wrapping_sub(offset) } else { p.linear.wrapping_add(offset) };
        let mut data = [0u8; 4];
        // SAFETY: the PIO page is ours; offset + size <= PAGE_SIZE.
        unsafe { core::ptr::copy_nonoverlapping(pio.add(offset as usize), data.as_mut_ptr(), size) };
        match copy_linear(&mut view, &state.g.sregs, element, &mut data[..size], true) {
            Ok(()) => {}
            Err(CopyError::PageFault { linear }) => {
                drop(view);
                inject_page_fault(state, linear, true);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(view);
    advance(state, p.count, size, p.address_bits, p.rep, p.instruction_len, true, p.backwards);
    Ok(())
}
