//! Holding every online CPU in VMX root operation while rkvm is loaded.
//!
//! - Each possible CPU gets a VMXON region at load (SDM Vol. 3C, 25.11.5,
//!   "VMXON Region"): a zeroed page whose first 4 bytes hold the VMCS
//!   revision identifier from IA32_VMX_BASIC.
//! - A CPU-hotplug state (CPUHP_AP_ONLINE_DYN) runs [`cpu_online`] on every
//!   online CPU now and on every CPU that comes online later, and
//!   [`cpu_offline`] on a CPU going offline and on every CPU at unload. The
//!   hotplug core rolls back: if VMXON fails on one CPU, the CPUs that
//!   already succeeded run [`cpu_offline`], so none is left in VMX operation.
//! - A CPU in VMX root operation ignores INIT (SDM Vol. 3C, 25.2), which
//!   firmware and a kexec'd or kdump kernel use to take over CPUs. So a
//!   reboot notifier ([`reboot_vmxoff`]) leaves VMX operation on every CPU
//!   before reboot, halt, power-off and kexec, and the kernel's emergency
//!   virtualization callback ([`emergency_vmxoff`]) does it on crash and
//!   emergency reboot.
//!
//! Context: the hotplug callbacks run in the hotplug thread of the CPU they
//! act on (pinned to it, preemptible); the emergency callback runs in NMI
//! context on every CPU.

use core::ffi::{c_int, c_uint};
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};

use kernel::alloc::{flags::GFP_KERNEL, KBox, KVec};
use kernel::bindings;
use kernel::c_str;
use kernel::error::{
    code::{EBUSY, EINVAL, EIO},
    Error, Result,
};
use kernel::prelude::*;

use rkvm_core::caps::VmxCaps;

use super::{probe, CR4_VMXE};
use crate::glue;
use crate::mm::Page;

/// One CPU's VMX state.
struct PerCpu {
    /// The VMXON region, revision identifier already written.
    vmxon_region: Page,
    /// Set by a successful VMXON on this CPU, cleared by VMXOFF.
    in_vmx: AtomicBool,
    /// The id of the last VMCS loaded here (0: none), to tell when this CPU
    /// switches to another vCPU (IBPB, see `switch_vmcs`).
    last_vmcs: AtomicU64,
}

/// State shared with the hotplug callbacks, which take no context argument.
struct Shared {
    caps: VmxCaps,
    /// Indexed by CPU number, one entry per possible CPU (`nr_cpu_ids`).
    cpus: KVec<PerCpu>,
    /// Where the module is in its life: decides what a callback logs.
    phase: AtomicU8,
}

/// Values of [`Shared::phase`].
mod phase {
    /// Load-time VMXON in progress: a teardown now is a rollback.
    pub(super) const LOADING: u8 = 0;
    /// Loaded: callbacks are CPU hotplug events.
    pub(super) const LOADED: u8 = 1;
    /// Unloading, rebooting: VMXOFF everywhere, not worth a line per CPU.
    pub(super) const LEAVING: u8 = 2;
}

/// The [`Shared`] of the loaded module, for the hotplug callbacks.
///
/// Set before the hotplug state is installed and cleared after it is
/// removed, so every callback invocation finds it valid. The module is
/// single-instance: there is one VMX host per kernel.
static SHARED: AtomicPtr<Shared> = AtomicPtr::new(ptr::null_mut());

/// Set once the reboot hook starts taking CPUs out of VMX operation: no
/// guest is entered after that (see `run.rs`), and VMX instructions that
/// meet a CPU already out of it fail instead of faulting (glue.c).
static LEAVING_VMX: AtomicBool = AtomicBool::new(false);

/// Whether the system is rebooting (or kexecing) and VMX is being shut down.
pub(crate) fn leaving_vmx() -> bool {
    LEAVING_VMX.load(Ordering::Acquire)
}

/// Every online CPU in VMX root operation, for as long as this value lives.
///
/// # Invariants
/// `hotplug_state` is the dynamic hotplug state installed for `shared`, and
/// [`SHARED`] points to `shared` until `Drop` has removed that state.
pub(crate) struct VmxHost {
    shared: KBox<Shared>,
    hotplug_state: c_int,
}

impl VmxHost {
    /// Allocates the VMXON regions, enters VMX operation on every online CPU
    /// and installs the emergency callback.
    ///
    /// # Errors
    /// - `EBUSY`: VMX is in use on some CPU (CR4.VMXE already set), e.g. by
    ///   kvm_intel loaded with enable_virt_at_load=1 or running a VM;
    /// - `EOPNOTSUPP`: firmware disabled VMX on some CPU;
    /// - `EIO`: CR0/CR4 violate the VMX fixed bits, or VMXON failed;
    /// - `ENOMEM`.
    ///
    /// On error no CPU is in VMX operation and every CR4 is as it was.
    pub(crate) fn enable(caps: VmxCaps) -> Result<Self> {
        // SAFETY: `nr_cpu_ids` is set during early boot and never changes
        // once modules can load.
        let possible = unsafe { bindings::nr_cpu_ids } as usize;
        let revision = caps.basic.revision_id().to_le_bytes();
        let mut cpus = KVec::with_capacity(possible, GFP_KERNEL)?;
        for _ in 0..possible {
            let mut vmxon_region = Page::alloc_zeroed()?;
            vmxon_region.as_mut_bytes()[..4].copy_from_slice(&revision);
            cpus.push(PerCpu { vmxon_region, in_vmx: AtomicBool::new(false), last_vmcs: AtomicU64::new(0) }, GFP_KERNEL)?;
        }
        let shared = KBox::new(Shared { caps, cpus, phase: AtomicU8::new(phase::LOADING) }, GFP_KERNEL)?;
        let shared_ptr = ptr::from_ref::<Shared>(&shared).cast_mut();
        if SHARED
            .compare_exchange(ptr::null_mut(), shared_ptr, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(EBUSY);
        }

        // The reboot hook goes first, so that no CPU is ever in VMX operation
        // without it. Until VMXON it finds nothing to do.
        // SAFETY: `reboot_vmxoff` runs in IPI context and only touches this
        // CPU's state; it lives as long as the module; `Drop` (or the error
        // path below) unregisters it.
        if let Err(e) = unsafe { glue::register_reboot(reboot_vmxoff) } {
            SHARED.store(ptr::null_mut(), Ordering::Release);
            return Err(e);
        }

        // SAFETY: the name is a static C string; the callbacks are valid for
        // as long as the module is loaded, and `Drop` removes the state.
        let state = unsafe {
            bindings::__cpuhp_setup_state(
                bindings::cpuhp_state_CPUHP_AP_ONLINE_DYN,
                c_str!("rkvm:online").as_char_ptr(),
                true,
                Some(cpu_online),
                Some(cpu_offline),
                false,
            )
        };
        if state < 0 {
            // The hotplug core already ran `cpu_offline` on the CPUs where
            // `cpu_online` had succeeded.
            glue::unregister_reboot();
            SHARED.store(ptr::null_mut(), Ordering::Release);
            return Err(Error::from_errno(state));
        }
        shared.phase.store(phase::LOADED, Ordering::Release);

        // Installed only now: had VMX been in use by another hypervisor, we
        // failed above without touching the single callback slot it holds.
        // SAFETY: `emergency_vmxoff` is NMI-safe and lives as long as the
        // module; `Drop` unregisters it.
        unsafe { glue::register_emergency_callback(emergency_vmxoff) };

        // INVARIANT: `state` is installed for `shared`, which SHARED points to.
        Ok(Self { shared, hotplug_state: state })
    }

    /// The capabilities every CPU was checked against.
    pub(crate) fn caps(&self) -> &VmxCaps {
        &self.shared.caps
    }

    /// How many CPUs are in VMX operation now.
    pub(crate) fn cpus_in_vmx(&self) -> usize {
        self.shared.cpus.iter().filter(|c| c.in_vmx.load(Ordering::Acquire)).count()
    }
}

/// Drops every CPU's cached translations derived from the EPT `eptp`
/// (INVEPT single-context on each online CPU in VMX operation, by IPI,
/// waiting for all). Called after EPT entries are removed and before the
/// memory they mapped is released.
pub(crate) fn invept_everywhere(eptp: u64) {
    unsafe extern "C" fn flush(info: *mut core::ffi::c_void) {
        // SAFETY: SHARED is valid while the module is loaded (see `SHARED`);
        // a VM exists, so the module is.
        let Some(shared) = (unsafe { SHARED.load(Ordering::Acquire).as_ref() }) else { return };
        let cpu = glue::this_cpu() as usize;
        // A CPU that is online but not yet (or no more) in VMX operation
        // has nothing cached, and INVEPT would fault there.
        if shared.cpus.get(cpu).is_some_and(|c| c.in_vmx.load(Ordering::Acquire)) {
            // SAFETY: this CPU is in VMX root operation (checked just above,
            // in an IPI, so it cannot leave it meanwhile).
            if let Err(e) = unsafe { super::insn::invept_single_context(info as u64) } {
                pr_err!("CPU {cpu}: INVEPT failed: {e:?}\n");
            }
        }
    }
    // SAFETY: `flush` only reads per-CPU state and runs INVEPT.
    unsafe { glue::on_each_cpu(flush, eptp as *mut core::ffi::c_void) };
}

/// Records that the VMCS with `id` is loaded on this CPU; with the
/// IBPB-on-switch mitigation in force, issues an Indirect Branch Prediction
/// Barrier if the last VMCS loaded here was another vCPU's, so that one
/// guest cannot steer another's (or its VMM's) indirect branches (KVM's
/// vmx_vcpu_load_vmcs does the same).
pub(crate) fn switch_vmcs(_cpu: &glue::PreemptDisabled, id: u64) {
    // SAFETY: SHARED is valid while the module is loaded, and a vCPU exists.
    let Some(shared) = (unsafe { SHARED.load(Ordering::Acquire).as_ref() }) else { return };
    let Some(this) = shared.cpus.get(glue::this_cpu() as usize) else { return };
    // Only this CPU writes its entry, with preemption disabled (`_cpu`).
    if this.last_vmcs.swap(id, Ordering::Relaxed) != id
        && glue::cpu::mitigations().has(glue::cpu::Mitigations::IBPB_ON_SWITCH)
    {
        glue::cpu::ibpb();
    }
}

/// The capabilities found at load. `None` only while loading or unloading;
/// every open file pins the module, so file operations always see `Some`.
pub(crate) fn current_caps() -> Option<VmxCaps> {
    // SAFETY: SHARED is null or points to the live `Shared` (see `SHARED`);
    // the module cannot unload while a file operation runs.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }.map(|s| s.caps)
}

impl Drop for VmxHost {
    fn drop(&mut self) {
        // From here on, `cpu_offline` runs because of the unload: not logged.
        self.shared.phase.store(phase::LEAVING, Ordering::Release);
        // A later load starts afresh (a reboot hook that ran and was then
        // survived, e.g. by a failed kexec, does not stay in force).
        LEAVING_VMX.store(false, Ordering::Release);
        // SAFETY: by the type invariant `hotplug_state` is ours; removing it
        // runs `cpu_offline` (VMXOFF) on every online CPU and waits for it.
        unsafe { bindings::__cpuhp_remove_state(self.hotplug_state as _, true) };
        // No CPU is in VMX operation any more: the reboot hook and the
        // emergency callback have nothing left to do. Unregistering waits
        // for running invocations.
        glue::unregister_reboot();
        // SAFETY: `emergency_vmxoff` is the callback `enable` registered.
        unsafe { glue::unregister_emergency_callback(emergency_vmxoff) };
        SHARED.store(ptr::null_mut(), Ordering::Release);
        pr_info!("VMXOFF done on every CPU\n");
        // `shared` (the VMXON regions) is freed after this: no CPU uses them.
    }
}

impl Shared {
    /// Enters VMX root operation on `cpu`, the CPU this runs on.
    fn enable_on(&self, cpu: usize) -> Result {
        let this = self.cpus.get(cpu).ok_or(EINVAL)?;
        let cr4 = glue::read_cr4();
        if cr4 & CR4_VMXE != 0 {
            pr_err!(
                "CPU {cpu}: VMX is already in use (CR4.VMXE is set): another hypervisor, \
                 e.g. kvm_intel, holds it; unload it or load kvm with enable_virt_at_load=0\n"
            );
            return Err(EBUSY);
        }
        probe::check_firmware(cpu as u32)?;

        // SAFETY: reading CR0 at CPL 0 has no side effects.
        let cr0 = unsafe { x86::controlregs::cr0() }.bits() as u64;
        if let Err(v) = self.caps.cr0_fixed.check(cr0) {
            pr_err!("CPU {cpu}: CR0 {cr0:#x} violates the VMX fixed bits (set {:#x}, clear {:#x})\n", v.must_set, v.must_clear);
            return Err(EIO);
        }
        if let Err(v) = self.caps.cr4_fixed.check(cr4 | CR4_VMXE) {
            pr_err!("CPU {cpu}: CR4 {cr4:#x} violates the VMX fixed bits (set {:#x}, clear {:#x})\n", v.must_set, v.must_clear);
            return Err(EIO);
        }

        glue::cr4_set_vmxe();
        if glue::fail_vmxon_on_cpu() == Some(cpu as u32) {
            glue::cr4_clear_vmxe();
            pr_err!("CPU {cpu}: VMXON failed (injected by fail_vmxon_on_cpu={cpu}); CR4.VMXE restored\n");
            return Err(EIO);
        }
        // SAFETY: the region is a page owned by `self.cpus[cpu]`, prepared
        // with the revision identifier and used by no other CPU; the hotplug
        // thread running this is pinned to `cpu`.
        match unsafe { glue::vmxon(this.vmxon_region.phys()) } {
            Ok(()) => {
                this.in_vmx.store(true, Ordering::Release);
                if self.phase.load(Ordering::Acquire) == phase::LOADED {
                    pr_info!("CPU {cpu} came online: VMXON done\n");
                }
                Ok(())
            }
            Err(e) => {
                glue::cr4_clear_vmxe();
                pr_err!("CPU {cpu}: VMXON failed ({e:?}); CR4.VMXE restored\n");
                Err(EIO)
            }
        }
    }

    /// Leaves VMX operation on `cpu`, the CPU this runs on.
    fn disable_on(&self, cpu: usize) {
        let Some(this) = self.cpus.get(cpu) else { return };
        if !this.in_vmx.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = glue::vmxoff() {
            pr_err!("CPU {cpu}: VMXOFF failed ({e:?})\n");
        }
        glue::cr4_clear_vmxe();
        match self.phase.load(Ordering::Acquire) {
            phase::LOADING => pr_info!("CPU {cpu}: VMXOFF done, rolling back the failed load\n"),
            phase::LOADED => pr_info!("CPU {cpu} going offline: VMXOFF done\n"),
            _ => {}
        }
    }
}

/// Hotplug startup callback: VMXON on `cpu`.
unsafe extern "C" fn cpu_online(cpu: c_uint) -> c_int {
    // SAFETY: SHARED is valid while the hotplug state exists (see `SHARED`).
    let Some(shared) = (unsafe { SHARED.load(Ordering::Acquire).as_ref() }) else {
        return EINVAL.to_errno();
    };
    match shared.enable_on(cpu as usize) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// Hotplug teardown callback: VMXOFF on `cpu`.
unsafe extern "C" fn cpu_offline(cpu: c_uint) -> c_int {
    // SAFETY: SHARED is valid while the hotplug state exists (see `SHARED`).
    if let Some(shared) = unsafe { SHARED.load(Ordering::Acquire).as_ref() } {
        shared.disable_on(cpu as usize);
    }
    0
}

/// Reboot hook, on every CPU by IPI: leave VMX operation on this CPU.
unsafe extern "C" fn reboot_vmxoff() {
    LEAVING_VMX.store(true, Ordering::Release);
    // SAFETY: SHARED is valid while the hook is registered (it is removed in
    // `Drop` before SHARED is cleared).
    let Some(shared) = (unsafe { SHARED.load(Ordering::Acquire).as_ref() }) else { return };
    if shared.phase.swap(phase::LEAVING, Ordering::AcqRel) != phase::LEAVING {
        pr_info!("leaving VMX operation on every CPU for reboot, halt or kexec\n");
    }
    shared.disable_on(glue::this_cpu() as usize);
}

/// Emergency callback (crash, emergency reboot, kexec): leave VMX operation
/// on this CPU if it is in it. NMI context: no locks, no allocation, no
/// printing; VMXOFF outside VMX operation is caught by its exception fixup.
unsafe extern "C" fn emergency_vmxoff() {
    if glue::read_cr4() & CR4_VMXE != 0 {
        let _ = glue::vmxoff();
        glue::cr4_clear_vmxe();
    }
}
