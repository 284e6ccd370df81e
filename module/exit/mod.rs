//! VM-exit dispatch: one handler per exit reason, grouped by family in the
//! files beside this one. A handler either finishes the exit in the kernel
//! (the guest resumes) or fills `struct kvm_run` for the VMM. An exit rkvm
//! does not handle becomes KVM_EXIT_INTERNAL_ERROR carrying the exit reason,
//! as KVM reports unexpected exits: the host never panics on a guest.
//!
//! Context: preemption disabled, interrupts enabled, the VMCS loaded.

pub(crate) mod cr;
pub(crate) mod debug;
pub(crate) mod dr;
pub(crate) mod io;
pub(crate) mod msr;
pub(crate) mod slow;
pub(crate) mod xsetbv;

use kernel::error::Result;
use x86::vmx::vmcs::{control, guest, ro};

use rkvm_core::exit::{reason, ExitReason, InterruptionInfo};

use crate::glue;
use crate::kvm_abi::*;
use crate::memory::Fault;
use crate::run::run_struct;
use crate::vcpu::{GuestState, Vcpu};
use crate::vmx::vmcs::LoadedVmcs;

/// What happens after an exit.
pub(crate) enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// Return from KVM_RUN; `kvm_run` says why.
    ToUser,
    /// Needs guest memory, which may sleep: finished by `exit::slow` after
    /// the VMCS is put away and preemption is back on.
    Slow(slow::SlowExit),
}

/// Everything a handler may need.
pub(crate) struct ExitContext<'a, 'v> {
    pub(crate) vcpu: &'a Vcpu,
    pub(crate) vmcs: &'a mut LoadedVmcs<'v>,
    /// The guest's registers and state outside the VMCS.
    pub(crate) g: &'a mut GuestState,
}

impl ExitContext<'_, '_> {
    /// The shared `struct kvm_run`.
    pub(crate) fn run(&self) -> *mut kvm_run {
        run_struct(self.vcpu)
    }

    /// Moves RIP past the instruction that exited (its length is in the
    /// VMCS: SDM 28.2.5) and drops blocking by STI or MOV SS, as the
    /// instruction completed (KVM's skip_emulated_instruction).
    pub(crate) fn skip_instruction(&mut self) -> Result {
        let len = self.vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
        let rip = self.vmcs.read(guest::RIP);
        self.vmcs.write(guest::RIP, rip.wrapping_add(len))?;
        let blocking = self.vmcs.read(guest::INTERRUPTIBILITY_STATE);
        if blocking & 3 != 0 {
            self.vmcs.write(guest::INTERRUPTIBILITY_STATE, blocking & !3)?;
        }
        self.g.instruction_done();
        Ok(())
    }

    /// Injects hardware exception `vector` at the next entry (SDM 27.6.1).
    /// Real-mode exceptions have no error code, and VM entry refuses to
    /// deliver one there (26.2.1.3).
    pub(crate) fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result {
        let protected = crate::vmx::guest_state::guest_cr0(self.vmcs) & 1 != 0;
        let error_code = error_code.filter(|_| protected);
        let info = InterruptionInfo::new(vector, InterruptionInfo::HARDWARE_EXCEPTION, error_code.is_some());
        self.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.0.into())?;
        if let Some(code) = error_code {
            self.vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, code.into())?;
        }
        Ok(())
    }

    /// #GP(0) for the guest.
    pub(crate) fn inject_gp(&mut self) -> Result<ExitAction> {
        self.inject_exception(13, Some(0))?;
        Ok(ExitAction::Resume)
    }

    /// #UD for the guest.
    pub(crate) fn inject_ud(&mut self) -> Result<ExitAction> {
        self.inject_exception(6, None)?;
        Ok(ExitAction::Resume)
    }
}

/// Fills `kvm_run` for KVM_EXIT_INTERNAL_ERROR: `suberror` and its data
/// words (at most 16, as the ABI holds).
pub(crate) fn report_internal_error(run: *mut kvm_run, suberror: u32, data: &[u64]) {
    // SAFETY: `run` is the vCPU's own run page; `internal` is the union
    // member for this exit reason.
    unsafe {
        (*run).exit_reason = KVM_EXIT_INTERNAL_ERROR;
        let internal = &mut (*run).__bindgen_anon_1.internal;
        internal.suberror = suberror;
        let n = data.len().min(internal.data.len());
        internal.ndata = n as u32;
        internal.data[..n].copy_from_slice(&data[..n]);
    }
}

/// KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON with the exit reason and CPU.
fn unexpected(ctx: &mut ExitContext<'_, '_>, exit: ExitReason) -> Result<ExitAction> {
    report_internal_error(ctx.run(), KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, &[exit.0.into(), glue::this_cpu().into()]);
    Ok(ExitAction::ToUser)
}

/// Handles the exit that just happened.
pub(crate) fn handle(mut ctx: ExitContext<'_, '_>) -> Result<ExitAction> {
    let exit = ExitReason(ctx.vmcs.read(ro::EXIT_REASON) as u32);
    if exit.entry_failed() {
        // Invalid guest state or MSR loading (SDM 27.8): the guest never ran.
        let run = ctx.run();
        // SAFETY: our run page.
        unsafe {
            (*run).exit_reason = KVM_EXIT_FAIL_ENTRY;
            (*run).__bindgen_anon_1.fail_entry.hardware_entry_failure_reason = exit.0.into();
            (*run).__bindgen_anon_1.fail_entry.cpu = glue::this_cpu();
        }
        return Ok(ExitAction::ToUser);
    }
    match exit.basic() {
        // Host NMIs were handed over already; host interrupts were taken
        // when interrupts came back on.
        // The time slice ran out: the run loop checks for signals and
        // rescheduling, then resumes.
        reason::EXCEPTION_NMI => {
            let info = InterruptionInfo(ctx.vmcs.read(ro::VMEXIT_INTERRUPTION_INFO) as u32);
            match info.vector() {
                // Intercepted only while the VMM debugs the guest.
                1 | 3 if !info.is_nmi() => debug::exception(&mut ctx, info.vector()),
                // NMIs and machine checks were the host's, and were handed
                // to it right after the exit (run.rs).
                _ => Ok(ExitAction::Resume),
            }
        }
        reason::EXTERNAL_INTERRUPT | reason::PREEMPTION_TIMER => Ok(ExitAction::Resume),
        reason::TRIPLE_FAULT => {
            // SAFETY: our run page.
            unsafe { (*ctx.run()).exit_reason = KVM_EXIT_SHUTDOWN };
            Ok(ExitAction::ToUser)
        }
        reason::HLT => {
            ctx.skip_instruction()?;
            // As KVM: the VMM sees the HLT, not a single-step.
            ctx.g.step_done = false;
            // SAFETY: our run page.
            unsafe { (*ctx.run()).exit_reason = KVM_EXIT_HLT };
            Ok(ExitAction::ToUser)
        }
        reason::CPUID => cpuid(&mut ctx),
        reason::EPT_VIOLATION => ept_violation(&mut ctx, exit),
        reason::IO_INSTRUCTION => io::handle(&mut ctx),
        reason::CR_ACCESS => cr::handle(&mut ctx),
        reason::DR_ACCESS => dr::handle(&mut ctx),
        // INVD would drop the host's dirty cache lines, and WBINVD flush
        // every cache of the host: both are no-ops (EPT maps guest memory
        // write-back and no device does non-coherent DMA, so the caches
        // never hold anything a guest must see written back).
        reason::INVD | reason::WBINVD => {
            ctx.skip_instruction()?;
            Ok(ExitAction::Resume)
        }
        // No performance counters are virtualized (CPUID's PMU leaf is
        // empty): RDPMC raises #GP, as for a counter that does not exist.
        reason::RDPMC => ctx.inject_gp(),
        // CPUID hides MONITOR/MWAIT: #UD, as on a CPU without them.
        reason::MONITOR | reason::MWAIT => ctx.inject_ud(),
        reason::XSETBV => xsetbv::handle(&mut ctx),
        reason::RDMSR => msr::rdmsr(&mut ctx),
        reason::WRMSR => msr::wrmsr(&mut ctx),
        // The guest may not use VMX: #UD, as on a CPU without it (CPUID
        // hides VMX from the guest).
        reason::VMCALL..=reason::VMXON | reason::INVEPT | reason::INVVPID => ctx.inject_ud(),
        _ => unexpected(&mut ctx, exit),
    }
}

/// The guest touched a guest-physical address the EPT does not map (SDM
/// 29.3.3.2): guest RAM not mapped yet (rkvm maps pages on first use:
/// memory.rs), or no slot at all, which is MMIO for the VMM.
fn ept_violation(ctx: &mut ExitContext<'_, '_>, exit: ExitReason) -> Result<ExitAction> {
    let gpa = ctx.vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL);
    match ctx.vcpu.vm.memory().map_fast(gpa) {
        Fault::Mapped => return Ok(ExitAction::Resume),
        Fault::NeedsSleep => return Ok(ExitAction::Slow(slow::SlowExit::MapRam { gpa })),
        Fault::NotRam => {}
    }
    let qualification = ctx.vmcs.read(ro::EXIT_QUALIFICATION);
    let vectoring = ctx.vmcs.read(ro::IDT_VECTORING_INFO);
    if InterruptionInfo(vectoring as u32).valid() {
        // The access was part of delivering an event (the IDT, a stack or
        // a TSS in MMIO): the instruction at RIP did not make it, so there
        // is nothing to emulate. KVM reports this the same way
        // (KVM_INTERNAL_ERROR_DELIVERY_EV with these data words).
        report_internal_error(
            ctx.run(),
            KVM_INTERNAL_ERROR_DELIVERY_EV,
            &[vectoring, exit.0.into(), qualification, gpa, glue::this_cpu().into()],
        );
        return Ok(ExitAction::ToUser);
    }
    Ok(ExitAction::Slow(slow::SlowExit::Mmio { gpa, fetch: rkvm_core::exit::EptViolation::decode(qualification).fetch }))
}

/// CPUID: answered from the table KVM_SET_CPUID2 set (zeros for a leaf it
/// lacks, as KVM): EAX selects the leaf, ECX the sub-leaf; the results go to
/// EAX, EBX, ECX, EDX with the upper halves cleared.
fn cpuid(ctx: &mut ExitContext<'_, '_>) -> Result<ExitAction> {
    let (function, index) = (ctx.g.gprs.0[0] as u32, ctx.g.gprs.0[1] as u32);
    let mut result = rkvm_core::cpuid::lookup(&ctx.g.cpuid, function, index);
    let osxsave = crate::vmx::guest_state::guest_cr4(ctx.vmcs) & x86::controlregs::Cr4::CR4_ENABLE_OS_XSAVE.bits() as u64 != 0;
    let apic_enabled = ctx.g.msrs.apic_base & rkvm_core::guest_msr::APIC_BASE_ENABLE != 0;
    rkvm_core::cpuid::runtime(function, index, &mut result, osxsave, ctx.g.xcr0, apic_enabled);
    let [eax, ebx, ecx, edx] = result;
    // GuestRegs order: RAX, RCX, RDX, RBX.
    ctx.g.gprs.0[0] = eax.into();
    ctx.g.gprs.0[1] = ecx.into();
    ctx.g.gprs.0[2] = edx.into();
    ctx.g.gprs.0[3] = ebx.into();
    ctx.skip_instruction()?;
    Ok(ExitAction::Resume)
}
