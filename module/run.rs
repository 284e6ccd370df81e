//! KVM_RUN: the run loop (api.rst 4.10).
//!
//! ```text
//! KVM_RUN ─ complete a pending IN ─┐
//!   ┌──────────────────────────────┘
//!   │ signal pending? → KVM_EXIT_INTR, -EINTR
//!   │ preemption off, VMCS loaded on this CPU, host state written
//!   │   ┌ interrupts off, enter guest … VM exit, NMI handed to the host
//!   │   │ interrupts on: pending host interrupts are taken here
//!   │   └ handle the exit: in the kernel (loop) or for the VMM (return)
//!   │ guest state saved, VMCS cleared, host segments restored
//!   └ preemption on; rescheduled if needed, then loop or return
//! ```
//!
//! Context: process context of the VMM thread, vCPU mutex held.

use core::arch::asm;

use kernel::error::{code::EINTR, Result};
use kernel::prelude::*;
use x86::vmx::vmcs::ro;

use rkvm_core::exit::{ExitReason, InterruptionInfo};

use crate::exit::{self, ExitAction};
use crate::glue::cpu::Mitigations;
use crate::glue::{self, PreemptDisabled};
use crate::kvm_abi::*;
use crate::vcpu::{GuestState, Vcpu, VcpuState};
use crate::vmx::entry::{self, EntryResult};
use crate::vmx::guest_state as gs;
use crate::vmx::insn;
use crate::vmx::vmcs::LoadedVmcs;

/// DR7's local and global enable bits for DR0-DR3 (SDM Vol. 3B, 19.2.4).
const DR7_ENABLES: u64 = 0xff;

/// What this CPU's host needs back after each exit, read once per
/// KVM_RUN.
struct HostCpu {
    /// IA32_DEBUGCTL (a VM exit clears it).
    debugctl: u64,
    /// The VM entry/exit mitigations in force.
    mitigations: Mitigations,
    /// IA32_SPEC_CTRL to write back after exits, where the kernel needs it.
    spec_ctrl: u64,
}

/// Why the inner loop stopped.
enum Stop {
    /// Back to the VMM with this `kvm_run` filled in.
    ToUser,
    /// The scheduler or a signal wants this thread: leave, then come back.
    Yield,
    /// An exit that needs guest memory: finish it outside the atomic part.
    Slow(exit::slow::SlowExit),
}

fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn write_cr2(v: u64) {
    // SAFETY: CR2 only reports page-fault addresses; with interrupts off
    // nothing on the host reads it before the guest runs.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// While single-stepping, after an instruction finished outside the guest:
/// KVM_EXIT_DEBUG with the next instruction's address. True if reported.
fn report_step_between_runs(run: *mut kvm_run, g: &mut GuestState) -> bool {
    if !g.step_done {
        return false;
    }
    let (cs_base, rip, dr7) = (g.sregs.cs.base, g.regs.rip, g.debug.dr7);
    exit::debug::report_step(run, g, cs_base, rip, dr7);
    true
}

/// The shared `struct kvm_run`.
pub(crate) fn run_struct(vcpu: &Vcpu) -> *mut kvm_run {
    vcpu.run_page.as_ptr().cast_mut().cast()
}

impl Vcpu {
    /// KVM_RUN.
    pub(crate) fn run(&self) -> Result<isize> {
        let mut state = self.state.lock_killable()?;
        let run = run_struct(self);
        let result = self.run_locked(&mut state, run);
        // Where the guest stands, on every way out (an interrupted run
        // included, as KVM's post_kvm_run_save): the VMM decides on its
        // next KVM_INTERRUPT from these (IF, the TPR, the APIC base).
        let g = &state.g;
        // SAFETY: our run page; the VMM only reads these.
        unsafe {
            (*run).if_flag = u8::from(g.regs.rflags & rkvm_core::events::RFLAGS_IF != 0);
            (*run).cr8 = g.sregs.cr8;
            (*run).apic_base = g.msrs.apic_base;
            (*run).ready_for_interrupt_injection = g.events.ready_for_interrupt(g.regs.rflags).into();
        }
        result
    }

    fn run_locked(&self, state: &mut VcpuState, run: *mut kvm_run) -> Result<isize> {
        // SAFETY: the run page is ours and mapped into the VMM, which may
        // write it at any time: fields are read once, as untrusted values.
        let immediate_exit = unsafe { core::ptr::read_volatile(&(*run).immediate_exit) };
        // SAFETY: as above.
        let request_window = unsafe { core::ptr::read_volatile(&(*run).request_interrupt_window) } != 0;
        // The TPR belongs to the VMM's local APIC (there is none in the
        // kernel): as KVM ("re-sync apic's tpr" in kvm_arch_vcpu_ioctl_run),
        // each run starts from kvm_run->cr8, and reserved bits fail it.
        // SAFETY: as above.
        let cr8 = unsafe { core::ptr::read_volatile(&(*run).cr8) };
        if cr8 >> 4 != 0 {
            return Err(EINVAL);
        }
        state.g.sregs.cr8 = cr8;
        exit::io::complete_pending_in(self, state);
        exit::slow::complete_string_in(self, state)?;
        exit::slow::complete_mmio_load(self, state);
        // The instruction the VMM completed (port I/O, MMIO) was a step:
        // report it before the guest runs on.
        if report_step_between_runs(run, &mut state.g) {
            return Ok(0);
        }
        if immediate_exit != 0 {
            // SAFETY: as above; writing our own page.
            unsafe { (*run).exit_reason = KVM_EXIT_INTR };
            return Err(EINTR);
        }
        loop {
            if glue::signal_pending() {
                // SAFETY: as above.
                unsafe { (*run).exit_reason = KVM_EXIT_INTR };
                self.exit_stats.signal_exit();
                return Err(EINTR);
            }
            match self.run_on_this_cpu(state, request_window)? {
                Stop::ToUser => return Ok(0),
                Stop::Yield => glue::cond_resched(),
                Stop::Slow(slow) => {
                    if exit::slow::handle(self, state, slow)? {
                        return Ok(0);
                    }
                    // An emulated instruction (REP with RCX = 0) was a step.
                    if report_step_between_runs(run, &mut state.g) {
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// Loads the VMCS here and runs the guest until an exit needs the VMM
    /// or this CPU is wanted elsewhere.
    fn run_on_this_cpu(&self, state: &mut VcpuState, request_window: bool) -> Result<Stop> {
        let cpu = PreemptDisabled::new();
        let host = cpu.host_state();
        let mitigations = glue::cpu::mitigations();
        let host_cpu = HostCpu {
            debugctl: glue::cpu::host_debugctl(),
            mitigations,
            spec_ctrl: if mitigations.has(Mitigations::SPEC_CTRL_RESTORE) { glue::cpu::host_spec_ctrl() } else { 0 },
        };
        let VcpuState { vmcs, g } = state;
        let mut loaded = vmcs.load(&cpu)?;
        let fpu = crate::fpu::GuestFpu::load(&g.fpu);
        let result = (|| -> Result<Stop> {
            gs::write_controls(&mut loaded, &self.vm, gs::long_mode(&g.sregs), g.msr_bitmap.phys())?;
            gs::write_host(&mut loaded, &host)?;
            gs::write_msrs(&mut loaded, &self.vm, &g.msrs)?;
            crate::vmx::events::load(&mut loaded, &g.events, g.sregs.cr0)?;
            exit::debug::load(&mut loaded, g)?;
            g.msr_area.load(&mut loaded, &mut g.msrs)?;
            if g.dirty {
                gs::write_regs(&mut loaded, &g.regs, &mut g.gprs)?;
                gs::write_sregs(&mut loaded, &g.sregs)?;
                if !loaded.launched {
                    gs::write_reset_extras(&mut loaded)?;
                }
                g.dirty = false;
            }
            // Translations this CPU cached for this EPT may be stale (the
            // vCPU ran elsewhere, or slots changed while it did not run).
            // SAFETY: VMX root operation on this pinned CPU.
            if unsafe { insn::invept_single_context(self.vm.eptp()) }.is_err() {
                pr_err!("INVEPT failed\n");
            }
            self.inner_loop(&mut loaded, g, &fpu, request_window, &cpu, &host_cpu)
        })();
        // Save what the guest changed, whatever happened.
        g.regs = gs::read_regs(&loaded, &g.gprs);
        crate::vmx::events::save(&loaded, &mut g.events);
        g.debug.dr7 = loaded.read(x86::vmx::vmcs::guest::DR7);
        g.sregs = gs::read_sregs(&loaded, &g.sregs);
        g.msr_area.save(&mut g.msrs);
        gs::read_msrs(&loaded, &mut g.msrs);
        fpu.save(&mut g.fpu);
        drop(loaded);
        cpu.restore_host_segments(&host);
        result
    }

    fn inner_loop(
        &self,
        vmcs: &mut LoadedVmcs<'_>,
        g: &mut GuestState,
        fpu: &crate::fpu::GuestFpu,
        request_window: bool,
        cpu: &PreemptDisabled,
        host_cpu: &HostCpu,
    ) -> Result<Stop> {
        let run = run_struct(self);
        // A 1 ms time slice in VMX-preemption-timer units (SDM 26.5.1: the
        // timer counts down once per 2^shift TSC ticks).
        let slice = self.vm.controls().preemption_timer().then(|| {
            (u64::from(glue::tsc_khz()) >> self.vm.caps().misc.preemption_timer_tsc_shift()).max(1)
        });
        loop {
            if let Some(ticks) = slice {
                vmcs.write(x86::vmx::vmcs::guest::VMX_PREEMPTION_TIMER_VALUE, ticks)?;
            }
            let virtual_nmis = self.vm.controls().virtual_nmis();
            crate::vmx::events::prepare_entry(vmcs, &mut g.events, request_window, virtual_nmis)?;
            exit::debug::before_entry(vmcs, g)?;
            glue::local_irq_disable();
            // With interrupts off, the reboot hook's IPI cannot take this
            // CPU out of VMX operation between this check and the entry.
            if crate::vmx::host::leaving_vmx() {
                glue::local_irq_enable();
                return Err(kernel::error::code::EIO);
            }
            write_cr2(g.sregs.cr2);
            fpu.enter(g.xcr0);
            if host_cpu.mitigations.has(Mitigations::L1D_FLUSH) {
                glue::cpu::l1d_flush();
            }
            // The guest's DR6 and the host's debug state are taken back
            // right after the exit.
            // SAFETY: interrupts are off from here until the entry.
            unsafe { glue::cpu::load_guest_debug(&g.debug.dr, g.debug.dr6, g.debug.dr7 & DR7_ENABLES != 0) };
            // SAFETY: interrupts and preemption are off; the VMCS is loaded
            // here with host state for this CPU and checked guest state;
            // the mitigations are the ones decided for this CPU.
            let result = unsafe { entry::enter(&mut g.gprs, vmcs.launched, host_cpu.mitigations, host_cpu.spec_ctrl) };
            // The exit left DR7 at 0x400 and DEBUGCTL at 0, and DR6 as the
            // guest made it: the guest's DR6 is kept, the host's debug state
            // comes back before anything else runs.
            g.debug.dr6 = glue::cpu::take_guest_dr6();
            glue::cpu::restore_host_debug(host_cpu.debugctl);
            fpu.exit(g.xcr0);
            g.sregs.cr2 = read_cr2();
            if result == EntryResult::Exited {
                vmcs.launched = true;
                let reason = ExitReason(vmcs.read(ro::EXIT_REASON) as u32);
                let info = InterruptionInfo(vmcs.read(ro::VMEXIT_INTERRUPTION_INFO) as u32);
                if reason.basic() == rkvm_core::exit::reason::EXCEPTION_NMI && info.is_nmi() {
                    // SAFETY: interrupts are off and the exit was an NMI.
                    unsafe { entry::handle_host_nmi() };
                }
                if rkvm_core::exit::host_machine_check(reason, info) {
                    // SAFETY: interrupts are off and the exit was a
                    // machine check (#MC intercepted, or during entry).
                    unsafe { glue::cpu::machine_check() };
                }
            }
            // Host interrupts that arrived while the guest ran (they caused
            // the exit, unacknowledged) are taken now.
            glue::local_irq_enable();

            if result == EntryResult::Exited {
                let exit = ExitReason(vmcs.read(ro::EXIT_REASON) as u32);
                self.exit_stats.exit(exit.basic(), exit.entry_failed());
                crate::vmx::events::reinject_vectored_event(vmcs)?;
                let reason = exit.basic();
                if reason == rkvm_core::exit::reason::INTERRUPT_WINDOW {
                    // The guest can take an interrupt: a queued one goes in
                    // at the next entry; a VMM that asked is told.
                    if g.events.pending_irq.is_none() && request_window {
                        // SAFETY: our run page.
                        unsafe { (*run).exit_reason = KVM_EXIT_IRQ_WINDOW_OPEN };
                        return Ok(Stop::ToUser);
                    }
                    continue;
                }
                if reason == rkvm_core::exit::reason::NMI_WINDOW {
                    // NMIs are unblocked: the queued one goes in next.
                    continue;
                }
            }
            let action = match result {
                EntryResult::Exited => exit::handle(exit::ExitContext { vcpu: self, vmcs: &mut *vmcs, g: &mut *g })?,
                EntryResult::FailInvalid | EntryResult::FailValid => {
                    let error = vmcs.read(ro::VM_INSTRUCTION_ERROR);
                    // A VMM can make every KVM_RUN fail this way: the log
                    // is rate-limited, the VMM hears of it in kvm_run.
                    if glue::ratelimit() {
                        pr_warn!("VM entry failed: VM-instruction error {error}\n");
                    }
                    // SAFETY: our run page.
                    unsafe {
                        (*run).exit_reason = KVM_EXIT_FAIL_ENTRY;
                        (*run).__bindgen_anon_1.fail_entry.hardware_entry_failure_reason = error;
                        (*run).__bindgen_anon_1.fail_entry.cpu = glue::this_cpu();
                    }
                    ExitAction::ToUser
                }
            };
            match action {
                ExitAction::ToUser => return Ok(Stop::ToUser),
                ExitAction::Slow(slow) => return Ok(Stop::Slow(slow)),
                ExitAction::Resume if g.step_done => {
                    let (cs_base, rip) = (vmcs.read(x86::vmx::vmcs::guest::CS_BASE), vmcs.read(x86::vmx::vmcs::guest::RIP));
                    let dr7 = vmcs.read(x86::vmx::vmcs::guest::DR7);
                    exit::debug::report_step(run, g, cs_base, rip, dr7);
                    return Ok(Stop::ToUser);
                }
                ExitAction::Resume => {}
            }
            if cpu.need_resched() || glue::signal_pending() {
                return Ok(Stop::Yield);
            }
        }
    }
}
