//! rkvm: a minimal type-2 hypervisor for Intel VMX.
//!
//! At load it checks that the CPU has VMX and firmware enabled it, reads the
//! VMX capability MSRs, enters VMX root operation on every online CPU (and
//! follows CPU hotplug), and registers `/dev/rkvm`. At unload it leaves VMX
//! operation everywhere and frees everything.
//!
//! Map of the module:
//! - `vmx/probe.rs`: CPUID and MSR checks, capability decoding;
//! - `vmx/host.rs`: VMXON/VMXOFF per CPU, hotplug, emergency VMXOFF;
//! - `dev.rs`: the `/dev/rkvm` misc device;
//! - `mm.rs`: owned pages with physical addresses;
//! - `glue.rs` + `glue.c`: the kernel facilities 6.12's Rust bindings lack.
//!
//! Pure logic (capability decoding, fixed bits) lives in the `rkvm_core`
//! crate (`module/core`), which host `cargo test` checks.

use kernel::prelude::*;

mod cpuid;
mod dev;
mod exit;
mod file;
mod fpu;
mod glue;
mod kvm_abi;
mod memory;
mod mm;
mod msrs;
mod run;
mod stats;
mod vcpu;
mod vm;
mod vmx;

module! {
    type: Rkvm,
    name: "rkvm",
    author: "rkvm developers",
    description: "Minimal Intel VMX hypervisor with a KVM-compatible /dev/rkvm",
    license: "GPL",
}

/// The loaded module. Fields drop in order: `/dev/rkvm` goes away before the
/// CPUs leave VMX operation.
struct Rkvm {
    _dev: dev::Device,
    _vmx: vmx::VmxHost,
    _mitigations: glue::cpu::MitigationsInForce,
    _debugfs: glue::mm::Debugfs,
}

impl Drop for Rkvm {
    fn drop(&mut self) {
        // Every VM and vCPU file pins the module, so by now all of them are
        // gone, and with them every page they held: anything left is a leak.
        use glue::mm::{counter, Counter};
        for c in [Counter::GuestPagesHeld, Counter::EptTablePages, Counter::Vms, Counter::Vcpus] {
            let n = counter(c);
            if n != 0 {
                pr_err!("unloading with {n} left in {c:?}: a leak\n");
            }
        }
    }
}

impl kernel::Module for Rkvm {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let caps = vmx::probe()?;
        if let Err(missing) = rkvm_core::controls::Controls::compute(&caps) {
            pr_err!(
                "this CPU lacks VMX controls rkvm needs: {} controls {:#x} (EPT and unrestricted guest are required)\n",
                missing.field,
                missing.bits
            );
            return Err(ENODEV);
        }
        fpu::probe();
        let mitigations = glue::cpu::MitigationsInForce::decide()?;
        let vmx = vmx::VmxHost::enable(caps)?;
        pr_info!("VMX root operation on {} CPUs; {}\n", vmx.cpus_in_vmx(), vmx.caps());
        let debugfs = glue::mm::Debugfs::create();
        let dev = dev::Device::register()?;
        Ok(Rkvm { _dev: dev, _vmx: vmx, _mitigations: mitigations, _debugfs: debugfs })
    }
}
