//! Port I/O exits (SDM Vol. 3C, 28.2.1, Table 28-5) become KVM_EXIT_IO: the
//! data goes through the PIO page at `data_offset` (api.rst, "KVM_EXIT_IO").
//! An OUT is complete when the VMM has seen it; an IN completes at the next
//! KVM_RUN, when the VMM's data is moved into AL/AX/EAX.

use kernel::error::Result;
use x86::vmx::vmcs::ro;

use rkvm_core::exit::IoQualification;

use super::{ExitAction, ExitContext};
use crate::kvm_abi::*;
use crate::mm::PAGE_SIZE;
use crate::vcpu::{PendingIn, Vcpu, VcpuState};

/// Handles an I/O instruction exit.
pub(crate) fn handle(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let q = ctx.vmcs.read(ro::EXIT_QUALIFICATION);
    let Some(io) = IoQualification::decode(q) else {
        return ctx.inject_ud();
    };
    if io.string {
        // INS/OUTS: the memory operand's guest-linear address and the
        // address size are in the VMCS (SDM 28.2.1 and Table 28-8); the
        // data moves through guest memory, outside this atomic section.
        let info = ctx.vmcs.read(ro::VMEXIT_INSTRUCTION_INFO);
        return Ok(ExitAction::Slow(super::slow::SlowExit::StringIo {
            io,
            linear: ctx.vmcs.read(ro::GUEST_LINEAR_ADDR),
            address_bits: match (info >> 7) & 7 {
                0 => 16,
                1 => 32,
                _ => 64,
            },
            instruction_len: ctx.vmcs.read(ro::VMEXIT_INSTRUCTION_LEN),
        }));
    }
    let size = usize::from(io.size);
    let pio = ctx.vcpu.pio_page.as_ptr().cast_mut();
    if !io.is_in {
        let value = ctx.g.gprs.0[0].to_le_bytes();
        // SAFETY: the PIO page is ours (4 KiB); `size` is at most 4.
        unsafe { core::ptr::copy_nonoverlapping(value.as_ptr(), pio, size) };
    }
    report(ctx.run(), &io, 1);
    ctx.skip_instruction()?;
    if io.is_in {
        // The data goes into RAX at the next KVM_RUN if RIP is still just
        // past the IN then.
        ctx.g.pending_in = Some(PendingIn { size: io.size, rip: ctx.vmcs.read(x86::vmx::vmcs::guest::RIP) });
    }
    Ok(ExitAction::ToUser)
}

/// Fills `kvm_run` for KVM_EXIT_IO: `count` elements of the access `io`
/// describes, in the PIO page (at `data_offset`, one page into the mapping).
pub(crate) fn report(run: *mut kvm_run, io: &IoQualification, count: u32) {
    // SAFETY: `run` is the vCPU's own run page; `io` is the union member for
    // KVM_EXIT_IO.
    unsafe {
        (*run).exit_reason = KVM_EXIT_IO;
        let r = &mut (*run).__bindgen_anon_1.io;
        r.direction = if io.is_in { KVM_EXIT_IO_IN } else { KVM_EXIT_IO_OUT } as u8;
        r.size = io.size;
        r.port = io.port;
        r.count = count;
        r.data_offset = PAGE_SIZE as u64;
    }
}

/// Moves the VMM's data for the last IN into the guest's accumulator: AL and
/// AX merge into RAX, EAX zero-extends (as KVM's complete_fast_pio_in).
/// Nothing if the VMM moved RIP meanwhile (KVM drops the completion then).
pub(crate) fn complete_pending_in(vcpu: &Vcpu, state: &mut VcpuState) {
    let Some(PendingIn { size, rip }) = state.g.pending_in.take() else { return };
    if state.g.regs.rip != rip {
        return;
    }
    let mut bytes = [0u8; 8];
    // SAFETY: the PIO page is ours; the VMM may be writing it concurrently,
    // which only changes the value the guest reads.
    unsafe { core::ptr::copy_nonoverlapping(vcpu.pio_page.as_ptr(), bytes.as_mut_ptr(), usize::from(size)) };
    let data = u64::from_le_bytes(bytes);
    let rax = state.g.regs.rax;
    state.g.regs.rax = match size {
        1 => (rax & !0xff) | data,
        2 => (rax & !0xffff) | data,
        _ => data,
    };
    state.g.dirty = true;
}
