//! VMX: finding out what the CPU offers ([`probe`]) and holding every CPU in
//! VMX root operation while rkvm is loaded ([`host`]).

pub(crate) mod entry;
pub(crate) mod events;
pub(crate) mod guest_state;
pub(crate) mod host;
pub(crate) mod insn;
pub(crate) mod msr_area;
pub(crate) mod probe;
pub(crate) mod vmcs;

pub(crate) use host::VmxHost;
pub(crate) use probe::probe;

/// CR4.VMXE (bit 13): VMXON is allowed only while it is set, and it cannot be
/// cleared in VMX operation (SDM Vol. 3C, 24.7 and 24.8).
pub(crate) const CR4_VMXE: u64 = x86::controlregs::Cr4::CR4_ENABLE_VMX.bits() as u64;

/// Reads an MSR of this CPU.
///
/// # Safety
/// The MSR must exist on this CPU (reading one that does not raises #GP):
/// callers establish that from CPUID or from another MSR, as the SDM says.
pub(crate) unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists; RDMSR at CPL 0 has no
    // other precondition and no side effect on the MSRs rkvm reads.
    unsafe { x86::msr::rdmsr(msr) }
}
