//! CR8, the task-priority register of 64-bit mode (SDM Vol. 3A, 2.5
//! "Control Registers", 11.8.6 "Task Priority in IA-32e Mode"), as a VMM
//! without an in-kernel irqchip sees it (KVM: `handle_cr`, `kvm_set_cr8`,
//! `post_kvm_run_save`):
//!
//! - a guest's MOV to CR8 is what KVM_GET_SREGS and `kvm_run->cr8` report;
//! - KVM_SET_SREGS sets it (a value with reserved bits is ignored without
//!   failing the ioctl), but what the guest runs with is `kvm_run->cr8`,
//!   which KVM_RUN takes as the VMM's APIC TPR before each run (reserved
//!   bits there fail the run with EINVAL);
//! - lowering the TPR exits with KVM_EXIT_SET_TPR after the instruction (it
//!   may unmask an interrupt the VMM holds back); raising it does not exit.
//!
//! rkvm once kept the guest's CR8 apart from `kvm_sregs.cr8`, so the first
//! two failed (issue 11). These run with `--unrestricted-guest`, on VMX:
//! the host tests' kvm_pvm handles a guest's CR8 its own way (KVM_SET_SREGS
//! does not reach it, lowering it does not exit).

use kvm_ioctls::Kvm;

use crate::guest::{reported, Guest, CODE};
use crate::hostile::enter_long_mode;
use crate::Checks;

/// The guest, at [`CODE`] in 64-bit mode; each `out` reports AL.
const CODE_BYTES: [u8; 40] = [
    0x48, 0xc7, 0xc0, 0x0b, 0, 0, 0, // mov rax, 0xb
    0x44, 0x0f, 0x22, 0xc0, // mov cr8, rax (raised: no exit)
    0xe6, 0x99, // out 0x99, al
    0x44, 0x0f, 0x20, 0xc3, // mov rbx, cr8
    0x88, 0xd8, // mov al, bl
    0xe6, 0x99, // out 0x99, al
    0x48, 0xc7, 0xc0, 0x02, 0, 0, 0, // mov rax, 2
    0x44, 0x0f, 0x22, 0xc0, // mov cr8, rax (lowered: KVM_EXIT_SET_TPR)
    0xe6, 0x99, // out 0x99, al
    0xf4, // hlt
    0x90, 0x90, 0x90, 0x90, 0x90, // padding
];

/// `kvm_run->cr8` and KVM_GET_SREGS's `cr8`, as "run R, sregs S".
fn reported_cr8(g: &mut Guest) -> String {
    let run = g.vcpu.get_kvm_run().cr8;
    let sregs = g.vcpu.get_sregs().map_or_else(|e| format!("KVM_GET_SREGS failed: {e}"), |s| s.cr8.to_string());
    format!("run {run}, sregs {sregs}")
}

pub fn cr8_checks(c: &mut Checks, kvm: &Kvm) {
    let Some(mut g) = c.success("a long-mode guest for CR8", Guest::new(kvm, &CODE_BYTES)) else { return };
    if c.success("entering long mode", enter_long_mode(&g, 0x16000)).is_none() {
        return;
    }
    let regs = kvm_bindings::kvm_regs { rip: CODE, rsp: 0x800, rflags: 2, ..Default::default() };
    c.success("KVM_SET_REGS", g.vcpu.set_regs(&regs));
    let first = g.run();
    c.check("a MOV to CR8 that raises the TPR runs on without an exit", first == reported(0xb), &first);
    let seen = reported_cr8(&mut g);
    c.check("the guest's CR8 is what kvm_run->cr8 and KVM_GET_SREGS report", seen == "run 11, sregs 11", seen);

    let Some(mut s) = c.success("KVM_GET_SREGS", g.vcpu.get_sregs()) else { return };
    s.cr8 = 5;
    c.success("KVM_SET_SREGS with cr8 5", g.vcpu.set_sregs(&s));
    let set = g.vcpu.get_sregs().map(|s| s.cr8);
    c.check("KVM_SET_SREGS's cr8 is what KVM_GET_SREGS reports", matches!(set, Ok(5)), format!("{set:?}"));
    s.cr8 = 0x25;
    c.success("KVM_SET_SREGS with reserved bits in cr8 succeeds", g.vcpu.set_sregs(&s));
    let kept = g.vcpu.get_sregs().map(|s| s.cr8);
    c.check("... and leaves CR8 as it was", matches!(kept, Ok(5)), format!("{kept:?}"));
    g.vcpu.get_kvm_run().cr8 = 0x17;
    let refused = g.vcpu.run().map(|_| ()).map_err(|e| e.errno());
    c.check("KVM_RUN refuses reserved bits in kvm_run->cr8 with EINVAL", refused == Err(libc::EINVAL), format!("{refused:?}"));
    let seen = reported_cr8(&mut g);
    c.check("... and puts the TPR back in kvm_run->cr8", seen == "run 5, sregs 5", seen);
    // The VMM's APIC owns the TPR: before each run it is taken from
    // kvm_run->cr8, over what KVM_SET_SREGS said.
    g.vcpu.get_kvm_run().cr8 = 7;
    let second = g.run();
    c.check("KVM_RUN gives the guest the TPR in kvm_run->cr8", second == reported(7), &second);

    let third = g.run();
    c.check("a MOV to CR8 that lowers the TPR exits with KVM_EXIT_SET_TPR", third == "SetTpr", &third);
    let seen = reported_cr8(&mut g);
    c.check("... with the new TPR in kvm_run->cr8 and KVM_GET_SREGS", seen == "run 2, sregs 2", seen);
    let fourth = g.run();
    c.check("... after the instruction: the guest runs on", fourth == reported(2), &fourth);
}
