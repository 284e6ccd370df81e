//! Safe wrappers over `glue_cpu.c`: what the host CPU needs around a
//! guest's run so that the host does not notice it ran (debug registers,
//! machine checks, speculative-execution barriers). Which mitigations apply
//! is decided once at load from the kernel's own choices for this CPU; see
//! glue_cpu.c for the list and the reasons.
//!
//! Context: the vCPU thread, preemption disabled (the run loop).

use kernel::error::{to_result, Result};

mod ffi {
    extern "C" {
        pub(super) fn rkvm_host_debugctl() -> usize;
        pub(super) fn rkvm_restore_host_debug(debugctl: usize);
        pub(super) fn rkvm_machine_check();
        pub(super) fn rkvm_mitigations() -> u32;
        pub(super) fn rkvm_mitigations_init() -> i32;
        pub(super) fn rkvm_mitigations_exit();
        pub(super) fn rkvm_ibpb();
        pub(super) fn rkvm_host_spec_ctrl() -> u64;
        pub(super) fn rkvm_l1d_flush();
        pub(super) fn rkvm_load_guest_debug(dr: *const u64, dr6: u64, breakpoints: bool);
        pub(super) fn rkvm_take_guest_dr6() -> u64;
    }
}

/// The VM entry/exit mitigations in force (bits as in glue_cpu.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mitigations(u32);

impl Mitigations {
    /// Fill the return stack buffer after VM exit (32 entries).
    pub(crate) const RSB_FILL: u32 = 1 << 0;
    /// One call retired before the first RET after VM exit (PBRSB, eIBRS).
    pub(crate) const RSB_FILL_LITE: u32 = 1 << 1;
    /// VERW right before VM entry (clears CPU buffers).
    pub(crate) const VERW: u32 = 1 << 2;
    /// The branch-history clearing loop after VM exit (BHI).
    pub(crate) const BHB_CLEAR: u32 = 1 << 3;
    /// Rewrite IA32_SPEC_CTRL with the host's value after VM exit.
    pub(crate) const SPEC_CTRL_RESTORE: u32 = 1 << 4;
    /// IBPB when a CPU switches to another vCPU's VMCS.
    pub(crate) const IBPB_ON_SWITCH: u32 = 1 << 5;
    /// Flush L1D before VM entry (L1TF).
    pub(crate) const L1D_FLUSH: u32 = 1 << 6;

    /// Whether `bit` is in force.
    pub(crate) fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// The raw bits, as the entry routine tests them.
    pub(crate) fn bits(self) -> u32 {
        self.0
    }
}

/// The mitigations, decided for this CPU and kernel, for as long as this
/// value lives.
pub(crate) struct MitigationsInForce(());

impl MitigationsInForce {
    /// Decides the mitigations, allocates what they need, logs them.
    ///
    /// # Errors
    /// `ENOMEM` (the software L1D flush needs a 64 KiB buffer).
    pub(crate) fn decide() -> Result<Self> {
        // SAFETY: called once at load; `Drop` undoes it.
        to_result(unsafe { ffi::rkvm_mitigations_init() })?;
        Ok(Self(()))
    }
}

impl Drop for MitigationsInForce {
    fn drop(&mut self) {
        // SAFETY: after `decide`, at unload, when no vCPU runs (every VM
        // file pins the module).
        unsafe { ffi::rkvm_mitigations_exit() }
    }
}

/// The mitigations in force (decided at load).
pub(crate) fn mitigations() -> Mitigations {
    // SAFETY: reads a value set once at load.
    Mitigations(unsafe { ffi::rkvm_mitigations() })
}

/// The host's IA32_DEBUGCTL, to restore after VM exits.
pub(crate) fn host_debugctl() -> u64 {
    // SAFETY: reads an MSR every CPU with VMX has.
    unsafe { ffi::rkvm_host_debugctl() as u64 }
}

/// After a VM exit: the host's hardware breakpoints (DR7 and the address
/// registers, if the host uses any) and its `debugctl`, which the exit
/// reset (SDM Vol. 3C, 28.5.1).
pub(crate) fn restore_host_debug(debugctl: u64) {
    // SAFETY: writes the host's own values back; called on the CPU that
    // just left the guest, before anything that could rely on them.
    unsafe { ffi::rkvm_restore_host_debug(debugctl as usize) }
}

/// Right before VM entry: the guest's DR0-DR3 into the CPU if its DR7
/// arms `breakpoints`, and its DR6 if it is not the reset value (VM entry
/// loads DR7 only).
///
/// # Safety
/// Interrupts are disabled until the entry, and [`take_guest_dr6`] and
/// [`restore_host_debug`] follow the exit.
pub(crate) unsafe fn load_guest_debug(dr: &[u64; 4], dr6: u64, breakpoints: bool) {
    // Nothing runs between this and the entry; the host's registers come
    // back after the exit (the caller's guarantee).
    // SAFETY: debug-register writes only, undone right after the exit.
    unsafe { ffi::rkvm_load_guest_debug(dr.as_ptr(), dr6, breakpoints) }
}

/// Right after VM exit: the DR6 the guest left in the CPU, which goes back
/// to its reset value (a stale bit would add to the host's next #DB).
pub(crate) fn take_guest_dr6() -> u64 {
    // SAFETY: reads DR6 and resets it to what the kernel keeps there.
    unsafe { ffi::rkvm_take_guest_dr6() }
}

/// Hands a machine check that caused the last VM exit to the host's
/// handler.
///
/// # Safety
/// Interrupts are disabled and the last exit was a machine check (#MC, or
/// exit reason 41).
pub(crate) unsafe fn machine_check() {
    // SAFETY: the caller's guarantee; this is what KVM does then.
    unsafe { ffi::rkvm_machine_check() }
}

/// Indirect Branch Prediction Barrier.
pub(crate) fn ibpb() {
    // SAFETY: a barrier MSR write, only where the CPU has it.
    unsafe { ffi::rkvm_ibpb() }
}

/// The IA32_SPEC_CTRL value the kernel uses on this CPU.
pub(crate) fn host_spec_ctrl() -> u64 {
    // SAFETY: reads a per-CPU variable; preemption is disabled by callers.
    unsafe { ffi::rkvm_host_spec_ctrl() }
}

/// Flushes L1D (before VM entry, on CPUs with L1TF).
pub(crate) fn l1d_flush() {
    // SAFETY: an MSR write or reads of our own buffer.
    unsafe { ffi::rkvm_l1d_flush() }
}
