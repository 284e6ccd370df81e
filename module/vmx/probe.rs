//! Finding out whether this CPU can do VMX for rkvm, and what it offers.
//!
//! Context: module init, process context, on whichever CPU runs it. Every CPU
//! is checked again before its own VMXON (see `host.rs`).

use kernel::bindings;
use kernel::error::{
    code::{EIO, ENODEV},
    Error, Result,
};
use kernel::prelude::*;

use rkvm_core::caps::{FeatureControl, FirmwareVmx, RawCaps, VmxBasic, VmxCaps};
use rkvm_core::msr::IA32_FEATURE_CONTROL;

use super::rdmsr;

/// CPUID.1:ECX bit 5, "VMX" (SDM Vol. 3C, 24.6 "Discovering Support for VMX").
const CPUID_1_ECX_VMX: u32 = 1 << 5;

/// `-EOPNOTSUPP`: the kernel crate of 6.12 names no such code.
pub(crate) fn eopnotsupp() -> Error {
    Error::from_errno(-(bindings::EOPNOTSUPP as i32))
}

/// Whether firmware left VMX usable on this CPU.
///
/// # Errors
/// `EOPNOTSUPP`, with a log line quoting IA32_FEATURE_CONTROL, when it did not.
pub(crate) fn check_firmware(cpu: u32) -> Result {
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU that reports VMX in
    // CPUID (SDM Vol. 3C, 24.7), which `probe` checked before any caller.
    let value = unsafe { rdmsr(IA32_FEATURE_CONTROL) };
    match FeatureControl::from_msr(value).vmx_state() {
        FirmwareVmx::Enabled => Ok(()),
        FirmwareVmx::Disabled => {
            pr_err!(
                "CPU {cpu}: VMX is disabled by firmware (IA32_FEATURE_CONTROL = {value:#x}: \
                 locked with VMX outside SMX off); enable VT-x in the BIOS setup\n"
            );
            Err(eopnotsupp())
        }
        FirmwareVmx::Unlocked => {
            pr_err!(
                "CPU {cpu}: VMX is not enabled (IA32_FEATURE_CONTROL = {value:#x} is not \
                 locked; the kernel needs CONFIG_X86_FEATURE_CONTROL and VT-x enabled)\n"
            );
            Err(eopnotsupp())
        }
    }
}

/// Checks that the CPU supports VMX and firmware enabled it, then reads and
/// decodes the capability MSRs.
///
/// # Errors
/// - `ENODEV`: no VMX (CPUID.1:ECX.VMX is 0), e.g. an AMD CPU or an emulator
///   without VMX;
/// - `EOPNOTSUPP`: VMX disabled by firmware;
/// - `EIO`: a VMXON region larger than a page or not write-back (never seen
///   on real CPUs; rkvm's allocations assume both).
pub(crate) fn probe() -> Result<VmxCaps> {
    let leaf1 = x86::cpuid::native_cpuid::cpuid_count(1, 0);
    if leaf1.ecx & CPUID_1_ECX_VMX == 0 {
        pr_err!("this CPU does not support VMX (CPUID.1:ECX.VMX is 0); rkvm needs Intel VT-x\n");
        return Err(ENODEV);
    }
    check_firmware(crate::glue::this_cpu())?;
    // SAFETY: `RawCaps::read` only reads capability MSRs that exist given
    // CPUID.1:ECX.VMX = 1 and the MSRs it read before (SDM Vol. 3C, A.1-A.10).
    let raw = RawCaps::read(|msr| unsafe { rdmsr(msr) });
    if crate::glue::dump_caps() {
        pr_info!("raw VMX capability MSRs: {raw:#x?}\n");
    }
    let caps = VmxCaps::decode(&raw);
    let basic = caps.basic;
    if basic.region_size() as usize > crate::mm::PAGE_SIZE
        || basic.memory_type() != VmxBasic::MEMORY_TYPE_WB
    {
        pr_err!("unsupported IA32_VMX_BASIC {:#x}: VMXON region over 4 KiB or not write-back\n", basic.0);
        return Err(EIO);
    }
    Ok(caps)
}
