//! The VMCS (SDM Vol. 3C, 25 "Virtual Machine Control Structures"): a page
//! per vCPU, made current on a CPU for the duration of one KVM_RUN.
//!
//! rkvm keeps a VMCS current only while preemption is disabled: every
//! KVM_RUN does VMCLEAR + VMPTRLD on entry and VMCLEAR before preemption is
//! enabled again ([`LoadedVmcs`]'s `Drop`). So no VMCS is ever cached on a
//! CPU the vCPU has left, a vCPU can run on another CPU next time without an
//! IPI, and CPU hotplug never meets a loaded VMCS (SDM 25.11.1: software must
//! VMCLEAR a VMCS before loading it on another processor). The cost is a
//! VMCLEAR/VMPTRLD pair and a host-state refresh per KVM_RUN, not per exit.
//!
//! Context: VMX root operation, preemption disabled ([`PreemptDisabled`]).

use core::sync::atomic::{AtomicU64, Ordering};

use kernel::error::{code::EIO, Result};
use kernel::prelude::*;

use super::insn::{self, VmFail};
use crate::glue::PreemptDisabled;
use crate::mm::Page;

/// A VMCS region.
pub(crate) struct Vmcs {
    region: Page,
    /// Unique for the module's life (not reused as the page may be), to
    /// tell vCPUs apart on a CPU (`host::switch_vmcs`).
    id: u64,
}

/// The next VMCS id (0 means "none").
static NEXT_VMCS_ID: AtomicU64 = AtomicU64::new(1);

impl Vmcs {
    /// A new VMCS region with `revision` (IA32_VMX_BASIC bits 30:0) in its
    /// first four bytes (SDM 25.2).
    pub(crate) fn new(revision: u32) -> Result<Self> {
        let mut region = Page::alloc_zeroed()?;
        region.as_mut_bytes()[..4].copy_from_slice(&revision.to_le_bytes());
        Ok(Self { region, id: NEXT_VMCS_ID.fetch_add(1, Ordering::Relaxed) })
    }

    /// Makes this VMCS current on this CPU until the result is dropped.
    ///
    /// # Errors
    /// `EIO` if VMCLEAR or VMPTRLD fail (a bad region: never expected).
    pub(crate) fn load<'a>(&'a mut self, cpu: &'a PreemptDisabled) -> Result<LoadedVmcs<'a>> {
        let phys = self.region.phys();
        // SAFETY: our region, with its revision identifier; this CPU is in
        // VMX root operation (rkvm holds VMX on every online CPU while
        // loaded) and stays put (preemption disabled by `cpu`); no other
        // CPU has it current (see the module comment).
        unsafe { insn::vmclear(phys) }.map_err(|e| log_fail("VMCLEAR", e))?;
        // SAFETY: as above.
        unsafe { insn::vmptrld(phys) }.map_err(|e| log_fail("VMPTRLD", e))?;
        super::host::switch_vmcs(cpu, self.id);
        Ok(LoadedVmcs { vmcs: self, launched: false })
    }
}

fn log_fail(what: &str, e: VmFail) -> kernel::error::Error {
    // A fault means a reboot took the CPU out of VMX operation: expected.
    if e != VmFail::Fault {
        pr_err!("{what} failed: {e:?}\n");
    }
    EIO
}

/// The current VMCS of this CPU.
///
/// # Invariants
/// `vmcs` is current on this CPU, which cannot change (preemption is
/// disabled for `'a`), until `Drop` clears it.
pub(crate) struct LoadedVmcs<'a> {
    vmcs: &'a mut Vmcs,
    /// VMLAUNCH succeeded since the load: the next entry is VMRESUME.
    pub(crate) launched: bool,
}

impl LoadedVmcs<'_> {
    /// Reads `field`; 0 if the read fails (only for a field this CPU does
    /// not have, which rkvm does not use), logged.
    pub(crate) fn read(&self, field: u32) -> u64 {
        // SAFETY: by the type invariant there is a current VMCS.
        match unsafe { insn::vmread(field) } {
            Ok(v) => v,
            // A reboot took this CPU out of VMX operation: quietly nothing.
            Err(VmFail::Fault) => 0,
            Err(e) => {
                pr_err!("VMREAD of field {field:#x} failed: {e:?}\n");
                0
            }
        }
    }

    /// Writes `field`.
    ///
    /// # Errors
    /// `EIO` (logged) for a field this CPU does not have or a read-only one.
    pub(crate) fn write(&mut self, field: u32, value: u64) -> Result {
        // SAFETY: by the type invariant the current VMCS is ours.
        unsafe { insn::vmwrite(field, value) }.map_err(|e| {
            if e != VmFail::Fault {
                pr_err!("VMWRITE of {value:#x} to field {field:#x} failed: {e:?}\n");
            }
            EIO
        })
    }
}

impl Drop for LoadedVmcs<'_> {
    fn drop(&mut self) {
        // SAFETY: the VMCS is current on this CPU (type invariant); clearing
        // it flushes its state to memory for the next load.
        match unsafe { insn::vmclear(self.vmcs.region.phys()) } {
            Ok(()) | Err(VmFail::Fault) => {}
            Err(e) => pr_err!("VMCLEAR failed: {e:?}\n"),
        }
    }
}
