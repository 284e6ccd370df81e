//! The VMX instructions the run loop uses, each wrapped once and returning
//! `Result` (SDM Vol. 3C, 31.3 "VMX Instructions"). VMCLEAR, VMPTRLD, VMREAD
//! and VMWRITE come from the `x86` crate; INVEPT is written here (the crate
//! lacks it). VMXON/VMXOFF are in glue.c (they need exception fixups), and
//! VMLAUNCH/VMRESUME in entry.rs (they need the register switch).
//!
//! Context: VMX root operation, on a CPU that stays put (preemption off).

use core::arch::asm;

use x86::bits64::vmx;

/// A VMX instruction failed (SDM 31.2, "Conventions"): `Invalid` when there
/// was no current VMCS, `Valid(n)` with the VM-instruction error number
/// (31.4, "VM Instruction Error Numbers") otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmFail {
    /// VMfailInvalid.
    Invalid,
    /// VMfailValid, with VM-instruction error `n`.
    Valid(u32),
}

fn fail(f: x86::vmx::VmFail) -> VmFail {
    match f {
        x86::vmx::VmFail::VmFailInvalid => VmFail::Invalid,
        // SAFETY: after VMfailValid there is a current VMCS whose
        // VM-instruction error field says why.
        x86::vmx::VmFail::VmFailValid => VmFail::Valid(unsafe {
            vmx::vmread(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR).map_or(0, |v| v as u32)
        }),
    }
}

/// VMCLEAR: flushes the VMCS at `phys` to memory and makes it not current,
/// with launch state "clear".
///
/// # Safety
/// `phys` is the address of a VMCS region this CPU may have loaded; this CPU
/// is in VMX root operation.
pub(crate) unsafe fn vmclear(phys: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantees.
    unsafe { vmx::vmclear(phys) }.map_err(fail)
}

/// VMPTRLD: makes the VMCS at `phys` this CPU's current VMCS.
///
/// # Safety
/// As [`vmclear`], and the VMCS is not current on any other CPU.
pub(crate) unsafe fn vmptrld(phys: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantees.
    unsafe { vmx::vmptrld(phys) }.map_err(fail)
}

/// VMREAD of `field` from the current VMCS.
///
/// # Safety
/// There is a current VMCS on this CPU.
pub(crate) unsafe fn vmread(field: u32) -> Result<u64, VmFail> {
    // SAFETY: the caller's guarantee; VMREAD has no other side effect.
    unsafe { vmx::vmread(field) }.map_err(fail)
}

/// VMWRITE of `value` to `field` of the current VMCS.
///
/// # Safety
/// There is a current VMCS on this CPU, and it is not one a running guest's
/// safety depends on being left alone (the caller owns it).
pub(crate) unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantees.
    unsafe { vmx::vmwrite(field, value) }.map_err(fail)
}

/// INVEPT single-context (type 1): drops this CPU's cached translations
/// derived from the EPT whose pointer is `eptp` (SDM 31.3, "INVEPT").
///
/// # Safety
/// This CPU is in VMX root operation and supports single-context INVEPT.
pub(crate) unsafe fn invept_single_context(eptp: u64) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let failed: u8;
    // SAFETY: the descriptor is 16 bytes on the stack; INVEPT reads it and
    // touches nothing else; the caller guarantees VMX root operation.
    unsafe {
        asm!(
            "invept {ty}, [{desc}]",
            "setbe {failed}",
            ty = in(reg) 1u64,
            desc = in(reg) descriptor.as_ptr(),
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    if failed != 0 {
        Err(VmFail::Invalid)
    } else {
        Ok(())
    }
}
