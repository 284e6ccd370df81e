//! XSETBV exits (unconditional in VMX non-root operation, SDM Vol. 3C,
//! 26.1.2). The CPU has already checked CPL 0 and CR4.OSXSAVE (those faults
//! come before the exit, 26.1.1); rkvm checks the rest as the XSETBV
//! reference does: ECX selects XCR0 (the only XCR), and the value must keep
//! x87 on, enable AVX only with SSE, and name only components the guest's
//! CPUID offers (CPUID.(0DH,0):EDX:EAX) and rkvm switches. Anything else
//! raises #GP(0). The new XCR0 is loaded at the next entry (fpu.rs).

use kernel::error::Result;

use rkvm_core::xsave;

use super::{ExitAction, ExitContext};

/// The components the guest may enable: its CPUID's leaf 0DH, limited to
/// what this host lets guests have.
pub(crate) fn allowed_xcr0(cpuid: &[rkvm_core::cpuid::Entry]) -> u64 {
    let [eax, _, _, edx] = rkvm_core::cpuid::lookup(cpuid, 0xd, 0);
    ((u64::from(edx) << 32) | u64::from(eax)) & crate::fpu::supported_xcr0()
}

/// XSETBV: ECX = XCR number, EDX:EAX = value.
pub(crate) fn handle(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let index = ctx.g.gprs.0[1] as u32;
    let value = (ctx.g.gprs.0[2] << 32) | (ctx.g.gprs.0[0] & 0xffff_ffff);
    if index != 0 || !xsave::valid_xcr0(value, allowed_xcr0(&ctx.g.cpuid)) {
        return ctx.inject_gp();
    }
    ctx.g.xcr0 = value;
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
