//! `rkvm-abi-check --dev D --spin N [--sti]`: a VM whose N vCPUs spin in
//! `jmp $` forever, each on its own thread, with interrupts off (or on,
//! `--sti`). It never exits voluntarily: the testbed checks that the host
//! stays responsive meanwhile, that SIGKILL ends it, and that the device
//! gives everything back afterwards.

use kvm_ioctls::Kvm;

use crate::{region, set_region, Mapping};

/// Runs the spinning VM until the process is killed; returns only on error.
pub fn spin(kvm: &Kvm, vcpus: u64, sti: bool) -> String {
    let mem = Mapping::new(1 << 20);
    let code: &[u8] = if sti { &[0xfb, 0xeb, 0xfe] } else { &[0xeb, 0xfe] }; // [sti;] jmp $
    // SAFETY: the mapping is 1 MiB and ours; the code goes at 0x1000.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), (mem.addr as *mut u8).add(0x1000), code.len()) };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => return format!("KVM_CREATE_VM: {e}"),
    };
    if let Err(e) = set_region(&vm, region(0, 0, 1 << 20, mem.hva(), 0)) {
        return format!("KVM_SET_USER_MEMORY_REGION: {e}");
    }
    let mut threads = Vec::new();
    for id in 0..vcpus {
        let mut vcpu = match vm.create_vcpu(id) {
            Ok(v) => v,
            Err(e) => return format!("KVM_CREATE_VCPU {id}: {e}"),
        };
        let mut sregs = vcpu.get_sregs().unwrap_or_default();
        sregs.cs.selector = 0;
        sregs.cs.base = 0;
        let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
        if let Err(e) = vcpu.set_sregs(&sregs).and_then(|()| vcpu.set_regs(&regs)) {
            return format!("vCPU {id} setup: {e}");
        }
        threads.push(std::thread::spawn(move || loop {
            // Returns only for a signal (EINTR), then spins on.
            let _ = vcpu.run();
        }));
    }
    println!("spinning {vcpus} vCPUs in jmp $ with interrupts {}", if sti { "on" } else { "off" });
    for t in threads {
        let _ = t.join();
    }
    drop(vm);
    "the vCPU threads ended".to_string()
}
