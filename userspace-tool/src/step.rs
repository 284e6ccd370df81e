//! `rkvm run --debug-step N`: a trace of the first N instructions the
//! guest executes, by KVM_SET_GUEST_DEBUG single-stepping, to compare a
//! guest's path on /dev/rkvm with its path on /dev/kvm line by line.
//!
//! With KVM_GUESTDBG_SINGLESTEP the vCPU leaves KVM_RUN with
//! KVM_EXIT_DEBUG (#DB, vector 1) after each instruction, with RIP at the
//! next one. The trace prints the address of each instruction before it
//! runs: the entry point first, then RIP at each of the first N - 1 debug
//! exits; at the Nth, single-stepping is turned off and the guest runs on.
//! RIP comes from KVM_GET_REGS, which both devices answer alike, rather
//! than from the exit's `pc`, a linear address whose meaning is the
//! device's.
//!
//! The trace has a line for each step the device reports, and devices
//! differ at the edges: the PVM backend of KVM (kvm_pvm) reports no step
//! for an OUT handled by the VMM, so the instruction after it has no line,
//! and it reports a step after MOV SS, which the CPU holds back for one
//! instruction (SDM Vol. 3A 6.8.3).
//!
//! HLT ends the trace, because single-stepping it is where devices
//! disagree most: kvm_intel reports the HLT and drops the step (the TODO
//! in kvm_emulate_halt()), kvm_pvm reports the step with RIP past the HLT
//! and lets the guest run on. When the next instruction is HLT, the stepper
//! prints it and turns single-stepping off, so the HLT runs as it would
//! untraced. Which instruction is next is read from guest memory through
//! the guest's page tables (rkvm-core's walk), so that every device agrees.

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use rkvm_core::walk::{self, GuestPhysical, PagingState};

/// The debug exception: what a single step raises.
const DB_VECTOR: u32 = 1;
/// HLT's opcode, which no prefix or other opcode starts with.
const HLT: u8 = 0xf4;
const EFER_LMA: u64 = 1 << 10;

/// One line of the trace: the `n`th instruction is at `rip`.
pub fn trace_line(n: u64, rip: u64) -> String {
    format!("step {n}: rip {rip:#010x}")
}

/// Single-steps the first `limit` instructions.
pub struct Stepper<'a> {
    limit: u64,
    /// Lines printed: instructions seen about to run.
    printed: u64,
    stepping: bool,
    /// Guest RAM, to see whether the next instruction is HLT.
    mem: &'a GuestMemoryMmap,
}

impl<'a> Stepper<'a> {
    /// A tracer of `limit` instructions of the guest with RAM `mem`; 0
    /// traces nothing.
    pub fn new(limit: u64, mem: &'a GuestMemoryMmap) -> Self {
        Self { limit, printed: 0, stepping: false, mem }
    }

    /// Turns single-stepping on, if there is anything to trace, and prints
    /// the first instruction: call it once the vCPU's registers are set.
    ///
    /// # Errors
    /// KVM_SET_GUEST_DEBUG or KVM_GET_REGS fails.
    pub fn start(&mut self, vcpu: &VcpuFd) -> Result<()> {
        if self.limit == 0 {
            return Ok(());
        }
        set_single_step(vcpu, true)?;
        self.stepping = true;
        self.print_next(vcpu)
    }

    /// Handles KVM_EXIT_DEBUG: the instruction last printed has run.
    ///
    /// # Errors
    /// A debug exit that is not a single step (nothing else was asked
    /// for), or a failed ioctl.
    pub fn debug_exit(&mut self, vcpu: &VcpuFd, arch: &kvm_debug_exit_arch) -> Result<()> {
        if !self.stepping || arch.exception != DB_VECTOR {
            bail!(
                "unexpected debug exit: exception {} at {:#x}, DR6 {:#x}, single-stepping {}",
                arch.exception,
                arch.pc,
                arch.dr6,
                if self.stepping { "on" } else { "off" }
            );
        }
        if self.printed < self.limit {
            self.print_next(vcpu)
        } else {
            self.stepping = false;
            set_single_step(vcpu, false)
        }
    }

    fn print_next(&mut self, vcpu: &VcpuFd) -> Result<()> {
        let rip = vcpu.get_regs().context("KVM_GET_REGS failed")?.rip;
        self.printed += 1;
        eprintln!("{}", trace_line(self.printed, rip));
        if self.fetches_hlt(vcpu, rip)? {
            self.stepping = false;
            set_single_step(vcpu, false)?;
        }
        Ok(())
    }

    /// Whether the instruction at `rip` is HLT. An address that does not
    /// translate to RAM (not present, MMIO) is not.
    fn fetches_hlt(&self, vcpu: &VcpuFd, rip: u64) -> Result<bool> {
        let sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
        // 64-bit code ignores the CS base; elsewhere addresses wrap at 4 GiB.
        let linear = if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
            rip
        } else {
            sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
        };
        let paging = PagingState { cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer };
        // The VMM looks, it does not execute: a supervisor read that SMAP
        // does not stop (AC), so only "not mapped" hides the byte.
        let look = walk::Access { ac: true, ..Default::default() };
        let opcode = walk::translate(&mut Ram(self.mem), &paging, linear, look)
            .ok()
            .and_then(|phys| self.mem.read_obj::<u8>(GuestAddress(phys)).ok());
        Ok(opcode == Some(HLT))
    }
}

/// Guest RAM for the page walk of rkvm-core, the same walk the module
/// does for the instructions it emulates.
struct Ram<'a>(&'a GuestMemoryMmap);

impl GuestPhysical for Ram<'_> {
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        self.0.read_obj::<u64>(GuestAddress(gpa)).ok()
    }
}

fn set_single_step(vcpu: &VcpuFd, on: bool) -> Result<()> {
    let control = if on { KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP } else { 0 };
    let debug = kvm_guest_debug { control, ..Default::default() };
    vcpu.set_guest_debug(&debug).context("KVM_SET_GUEST_DEBUG failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_are_fixed_width_for_32_bit_addresses() {
        assert_eq!(trace_line(1, 0x1000), "step 1: rip 0x00001000");
        assert_eq!(trace_line(12, 0x10_0000), "step 12: rip 0x00100000");
        assert_eq!(trace_line(3, 0xffff_8000_0000_1000), "step 3: rip 0xffff800000001000");
    }
}
