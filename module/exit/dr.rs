//! MOV to and from debug registers (MOV-DR exiting; SDM Vol. 3C, 26.1.3 and
//! Table 28-4). DR7 is the VMCS's guest DR7 (loaded at entry, saved at
//! exit: the debug-controls entry/exit controls); DR0-DR3 and DR6 are kept
//! per vCPU and go into the CPU around an entry when the guest arms
//! breakpoints or left DR6 changed (glue_cpu.c), the host's coming back
//! right after the exit. DR4/DR5 alias DR6/DR7 unless
//! CR4.DE is set, where they raise #UD; a value with bits 63:32 set in DR6
//! or DR7 raises #GP (SDM Vol. 3A, 19.2).

use kernel::error::Result;
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::exit::DrAccess;

use super::{ExitAction, ExitContext};

/// DR0-DR3 and DR6 of a vCPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DebugRegs {
    pub(crate) dr: [u64; 4],
    pub(crate) dr6: u64,
    /// DR7 as the last exit left it (the VMCS holds the live value).
    pub(crate) dr7: u64,
}

impl Default for DebugRegs {
    fn default() -> Self {
        // DR6 reads 0xffff0ff0 after reset (SDM Vol. 3A, Table 10-1).
        Self { dr: [0; 4], dr6: 0xffff_0ff0, dr7: 0x400 }
    }
}

const CR4_DE: u64 = 1 << 3;

/// Handles a MOV DR exit.
pub(crate) fn handle(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let a = DrAccess::decode(ctx.vmcs.read(ro::EXIT_QUALIFICATION));
    let cr4 = ctx.vmcs.read(control::CR4_READ_SHADOW);
    let dr = match a.dr {
        4 | 5 if cr4 & CR4_DE != 0 => return ctx.inject_ud(),
        4 => 6,
        5 => 7,
        n => n,
    };
    let gpr = usize::from(a.gpr);
    if a.read {
        let value = match dr {
            0..=3 => ctx.g.debug.dr[usize::from(dr)],
            6 => ctx.g.debug.dr6,
            _ => ctx.vmcs.read(guest::DR7),
        };
        if gpr == 4 {
            ctx.vmcs.write(guest::RSP, value)?;
        } else {
            ctx.g.gprs.0[gpr] = value;
        }
    } else {
        let value = if gpr == 4 { ctx.vmcs.read(guest::RSP) } else { ctx.g.gprs.0[gpr] };
        match dr {
            0..=3 => ctx.g.debug.dr[usize::from(dr)] = value,
            _ if value >> 32 != 0 => return ctx.inject_gp(),
            // DR6 bits 4-11, 16-31 read as 1; DR7 bit 10 reads as 1.
            6 => ctx.g.debug.dr6 = value | 0xffff_0ff0,
            _ => {
                ctx.vmcs.write(guest::DR7, value | 0x400)?;
                // Kept here too: the next entry loads DR0-DR3 if DR7 arms them.
                ctx.g.debug.dr7 = value | 0x400;
            }
        }
    }
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
