//! The VMCS instructions the run loop uses, each wrapped once and returning
//! `Result` (SDM Vol. 3C, 31.3 "VMX Instructions"). They execute in glue.c
//! with exception-table fixups, as KVM's vmx_ops.h: a reboot can take a CPU
//! out of VMX operation under a vCPU thread (see glue.c), and the faulting
//! instruction must become an error, not an oops. VMXON/VMXOFF are in glue.c
//! too; VMLAUNCH/VMRESUME in entry.rs (entered with interrupts disabled
//! after checking that no reboot is under way, so they cannot meet it).
//!
//! Context: VMX root operation, on a CPU that stays put (preemption off).

use crate::glue;

/// Why a VMX instruction did not succeed (SDM 31.2, "Conventions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmFail {
    /// VMfailInvalid or VMfailValid; for VMfailValid the VM-instruction
    /// error number (31.4) if it could be read, else 0.
    Fail(u32),
    /// The instruction faulted: this CPU is not in VMX operation (a reboot
    /// or kexec took it out).
    Fault,
}

fn result(ret: i32) -> Result<(), VmFail> {
    match ret {
        0 => Ok(()),
        r if r == glue::EIO => {
            let mut error = 0;
            // VM_INSTRUCTION_ERROR: valid after VMfailValid; after
            // VMfailInvalid this read fails too and 0 stays.
            // SAFETY: a VMREAD into a local; faults are caught.
            let _ = unsafe { glue::raw_vmread(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR, &mut error) };
            Err(VmFail::Fail(error as u32))
        }
        _ => Err(VmFail::Fault),
    }
}

/// VMCLEAR: flushes the VMCS at `phys` to memory and makes it not current,
/// with launch state "clear".
///
/// # Safety
/// `phys` is the address of a VMCS region owned by the caller.
pub(crate) unsafe fn vmclear(phys: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantee; faults are caught in glue.c.
    result(unsafe { glue::raw_vmclear(phys) })
}

/// VMPTRLD: makes the VMCS at `phys` this CPU's current VMCS.
///
/// # Safety
/// As [`vmclear`], and the VMCS is not current on any other CPU.
pub(crate) unsafe fn vmptrld(phys: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantees; faults are caught in glue.c.
    result(unsafe { glue::raw_vmptrld(phys) })
}

/// VMREAD of `field` from the current VMCS.
///
/// # Safety
/// There is a current VMCS on this CPU, loaded by the caller.
pub(crate) unsafe fn vmread(field: u32) -> Result<u64, VmFail> {
    let mut value = 0;
    // SAFETY: a VMREAD into a local; faults are caught in glue.c.
    result(unsafe { glue::raw_vmread(field, &mut value) })?;
    Ok(value)
}

/// VMWRITE of `value` to `field` of the current VMCS.
///
/// # Safety
/// There is a current VMCS on this CPU, owned by the caller.
pub(crate) unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    // SAFETY: the caller's guarantees; faults are caught in glue.c.
    result(unsafe { glue::raw_vmwrite(field, value) })
}

/// INVEPT single-context (type 1): drops this CPU's cached translations
/// derived from the EPT whose pointer is `eptp` (SDM 31.3, "INVEPT").
///
/// # Safety
/// Single-context INVEPT is supported (EPT is required at load).
pub(crate) unsafe fn invept_single_context(eptp: u64) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    // SAFETY: a 16-byte descriptor on the stack; faults are caught.
    result(unsafe { glue::raw_invept(1, &descriptor) })
}
