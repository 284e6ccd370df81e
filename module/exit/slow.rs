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
//! Context: process context, vCPU mutex held; takes the VM mutex.

use kernel::error::{code::EFAULT, Result};

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

/// Copies between guest-linear memory and `buf`, byte by byte through the
/// guest's page tables.
fn copy_linear(mem: &mut VmMemoryView<'_>, sregs: &kvm_sregs, linear: u64, buf: &mut [u8], to_guest: bool) -> Result {
    let p = paging(sregs);
    for (i, b) in buf.iter_mut().enumerate() {
        let gpa = walk::translate(mem, &p, linear.wrapping_add(i as u64)).map_err(|_| EFAULT)?;
        let mut one = [*b];
        if to_guest {
            mem.write(gpa, &one)?;
        } else {
            mem.read(gpa, &mut one)?;
            *b = one[0];
        }
    }
    Ok(())
}

/// Finishes a slow exit; the result is KVM_RUN's.
pub(crate) fn handle(vcpu: &Vcpu, state: &mut VcpuState, exit: SlowExit) -> Result<()> {
    let SlowExit::StringIo { io, linear, address_bits, instruction_len } = exit;
    let size = usize::from(io.size);
    let regs = &mut state.regs;
    let count_reg = regs.rcx & mask(address_bits);
    if io.rep && count_reg == 0 {
        // REP with a zero count does nothing.
        regs.rip = regs.rip.wrapping_add(instruction_len);
        state.dirty = true;
        return Ok(());
    }
    let count = if io.rep { count_reg.min((PAGE_SIZE / size) as u64) } else { 1 } as u32;
    let backwards = regs.rflags & RFLAGS_DF != 0;
    let run = run_struct(vcpu);
    let pio = vcpu.pio_page.as_ptr().cast_mut();
    if io.is_in {
        state.pending_string_in = Some(PendingStringIn {
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
            copy_linear(&mut view, &state.sregs, element, &mut data[..size], false)?;
            // SAFETY: the PIO page is ours; offset + size <= PAGE_SIZE.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pio.add(offset as usize), size) };
        }
        advance(state, count, size, address_bits, io.rep, instruction_len, false, backwards);
    }
    // SAFETY: our run page; `io` is the member for KVM_EXIT_IO.
    unsafe {
        (*run).exit_reason = KVM_EXIT_IO;
        let r = &mut (*run).__bindgen_anon_1.io;
        r.direction = if io.is_in { KVM_EXIT_IO_IN } else { KVM_EXIT_IO_OUT } as u8;
        r.size = io.size;
        r.port = io.port;
        r.count = count;
        r.data_offset = PAGE_SIZE as u64;
    }
    Ok(())
}

/// Moves RSI (OUTS) or RDI (INS) past `count` elements, counts RCX down
/// for REP, and moves RIP past the instruction once it is done.
#[allow(clippy::too_many_arguments)]
fn advance(state: &mut VcpuState, count: u32, size: usize, bits: u32, rep: bool, len: u64, is_in: bool, backwards: bool) {
    let regs = &mut state.regs;
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
    }
    state.dirty = true;
}

/// Copies the VMM's data for the last INS into guest memory (at the start
/// of the next KVM_RUN).
pub(crate) fn complete_string_in(vcpu: &Vcpu, state: &mut VcpuState) -> Result {
    let Some(p) = state.pending_string_in.take() else { return Ok(()) };
    let size = usize::from(p.size);
    let pio = vcpu.pio_page.as_ptr();
    let mut view = vcpu.vm.memory();
    for i in 0..p.count as u64 {
        let offset = i * size as u64;
        let element = if p.backwards { p.linear.wrapping_sub(offset) } else { p.linear.wrapping_add(offset) };
        let mut data = [0u8; 4];
        // SAFETY: the PIO page is ours; offset + size <= PAGE_SIZE.
        unsafe { core::ptr::copy_nonoverlapping(pio.add(offset as usize), data.as_mut_ptr(), size) };
        copy_linear(&mut view, &state.sregs, element, &mut data[..size], true)?;
    }
    drop(view);
    advance(state, p.count, size, p.address_bits, p.rep, p.instruction_len, true, p.backwards);
    Ok(())
}
