//! `rkvm-abi-check --dev PATH [--rkvm] [--unrestricted-guest] [--dump-reset-state]`
//!
//! Exercises the KVM ioctls that rkvm implements with valid and hostile
//! input, and checks every answer against KVM's documented behaviour
//! (Documentation/virt/kvm/api.rst and virt/kvm/kvm_main.c): the same checks
//! pass on /dev/kvm, which is how the checker itself is tested. Prints
//! "ok - ..." / "not ok - ..." lines and "N passed, M failed"; exits 1 if any
//! check failed.
//!
//! `--rkvm` adds the checks where rkvm deliberately differs from KVM (the
//! CPUID it offers, the MSRs it lists, hardware breakpoints).
//!
//! `--unrestricted-guest` (first named `--with-invalid-state`) says that
//! the device runs real-mode guests on the CPU (VMX unrestricted guest), as
//! rkvm and the testbed's KVM do, and adds the checks that depend on it: a
//! guest state the CPU refuses to enter (KVM without unrestricted guest
//! emulates it instead), XGETBV (KVM's instruction emulator has none), and
//! the debug exits of OUT, HLT and INT3. The host tests run on a KVM that
//! emulates real-mode code (kvm_pvm), so they do not ask for these.
//!
//! `--spin N [--sti]` runs a VM whose N vCPUs spin in `jmp $` forever
//! (interrupts off, or on), until the process is killed (`spin.rs`).
//!
//! `--hostile NAME` runs one of the hostile-input regression checks alone
//! (`hostile.rs`; NAME is a part of its name, e.g. `rep-ins`), to watch it
//! fail on a device that has the bug.
//!
//! `--dump-reset-state` prints a new vCPU's registers instead, so that the
//! testbed can compare /dev/rkvm with /dev/kvm line by line.
//!
//! `--host-fpu-stress SECONDS` opens no device: it is the host task of the
//! FPU isolation test (`host_fpu.rs`), run beside guests; exits 1 if its
//! SSE/AVX registers ever changed under it.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use kvm_bindings::{kvm_userspace_memory_region, KVM_API_VERSION};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use guest::{reported, Guest, HLT};

mod cpu;
mod cr8;
mod events;
mod guest;
mod host_fpu;
mod hostile;
mod spin;

/// Guest memory for the checks: an anonymous mapping, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Mapping {
        // SAFETY: anonymous private mapping; the result is checked.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
                       libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
        Mapping { addr, len }
    }

    fn hva(&self) -> u64 {
        self.addr as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("ok - {name}");
        } else {
            self.failed += 1;
            println!("not ok - {name}: {detail}");
        }
    }

    /// Checks that `result` is the error `errno`.
    fn errno<T>(&mut self, name: &str, result: Result<T, kvm_ioctls::Error>, errno: i32) {
        match result {
            Ok(_) => self.check(name, false, format!("succeeded, expected errno {errno}")),
            Err(e) => self.check(name, e.errno() == errno, format!("errno {}, expected {errno}", e.errno())),
        }
    }

    fn success<T, E: std::fmt::Display>(&mut self, name: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => {
                self.check(name, true, "");
                Some(v)
            }
            Err(e) => {
                self.check(name, false, format!("failed: {e}"));
                None
            }
        }
    }
}

fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva }
}

fn set_region(vm: &VmFd, r: kvm_userspace_memory_region) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: every region given here either is refused or maps memory of a
    // `Mapping` that outlives the VM in `memory_slot_checks`.
    unsafe { vm.set_user_memory_region(r) }
}

/// What an ioctl returned: its value, or the errno.
fn ioctl_result(r: i32) -> Result<i32, i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

/// A raw ioctl, for numbers kvm-ioctls does not offer.
fn raw_ioctl(fd: &impl AsRawFd, request: u64, arg: u64) -> Result<i32, i32> {
    // SAFETY: the requests used here take no pointer or an invalid one that
    // the kernel must reject; nothing in this process is written.
    ioctl_result(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) })
}

/// KVM_INTERRUPT, `_IOW(KVMIO, 0x86, struct kvm_interrupt)`: kvm-ioctls has
/// no wrapper on x86.
fn kvm_interrupt(vcpu: &VcpuFd, irq: u32) -> Result<(), i32> {
    let arg = kvm_bindings::kvm_interrupt { irq };
    // SAFETY: KVM_INTERRUPT reads a 4-byte struct from the pointer.
    ioctl_result(unsafe { libc::ioctl(vcpu.as_raw_fd(), 0x4004_ae86, &arg) }).map(|_| ())
}

fn system_checks(c: &mut Checks, kvm: &Kvm, rkvm_semantics: bool) {
    c.check("KVM_GET_API_VERSION is 12", kvm.get_api_version() == KVM_API_VERSION as i32,
            kvm.get_api_version());
    c.check("KVM_CAP_USER_MEMORY is supported", kvm.check_extension(Cap::UserMemory), "0");
    // _IO(KVMIO, 0x03) with a capability number no kernel defines.
    let r = raw_ioctl(kvm, 0xae03, 100_000);
    c.check("KVM_CHECK_EXTENSION of an unknown capability is 0", r == Ok(0), format!("{r:?}"));
    let size = kvm.get_vcpu_mmap_size();
    c.check("KVM_GET_VCPU_MMAP_SIZE is at least kvm_run and the PIO page",
            matches!(size, Ok(s) if s >= 2 * 4096 && s % 4096 == 0), format!("{size:?}"));
    // _IO(KVMIO, 0xff) is no KVM ioctl. rkvm answers ENOTTY ("not an ioctl
    // of this device"); KVM answers EINVAL on the system and vCPU fds (its
    // arch fallbacks), ENOTTY on the VM fd.
    let r = raw_ioctl(kvm, 0xaeff, 0);
    c.check("an unknown system ioctl fails with ENOTTY (KVM: EINVAL)",
            r == Err(libc::ENOTTY) || r == Err(libc::EINVAL), format!("{r:?}"));
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
    let leaf1 = cpuid.as_ref().ok().and_then(|t| t.as_slice().iter().find(|e| e.function == 1).copied());
    c.check("KVM_GET_SUPPORTED_CPUID has leaves 0 and 1",
            leaf1.is_some() && cpuid.as_ref().is_ok_and(|t| t.as_slice().iter().any(|e| e.function == 0)),
            format!("{:?}", cpuid.as_ref().err()));
    if rkvm_semantics {
        // KVM offers VMX when nested is on and leaves the hypervisor bit to
        // the VMM; rkvm offers only what it virtualizes (no VMX) and says it
        // is a hypervisor.
        c.check("rkvm: KVM_GET_SUPPORTED_CPUID hides VMX and sets the hypervisor bit",
                leaf1.is_some_and(|e| e.ecx & (1 << 5) == 0 && e.ecx & (1 << 31) != 0), format!("{leaf1:x?}"));
        c.check("rkvm: leaf 0x40000000 names rkvm",
                cpuid.as_ref().is_ok_and(|t| t.as_slice().iter().any(|e| e.function == 0x4000_0000
                    && e.ebx.to_le_bytes() == *b"rkvm")), "missing");
    }
    c.errno("KVM_GET_SUPPORTED_CPUID into 1 entry fails with E2BIG", kvm.get_supported_cpuid(1), libc::E2BIG);
    c.errno("KVM_CREATE_VM with an unknown VM type fails with EINVAL",
            kvm.create_vm_with_type(0x7f), libc::EINVAL);
}

fn memory_slot_checks(c: &mut Checks, kvm: &Kvm) {
    const MIB: u64 = 1 << 20;
    let mem = Mapping::new(4 * MIB as usize);
    let Some(vm) = c.success("KVM_CREATE_VM", kvm.create_vm()) else { return };
    let hva = mem.hva();
    c.success("a 2 MiB slot at 0", set_region(&vm, region(0, 0, 2 * MIB, hva, 0)));
    c.success("a second slot beside it", set_region(&vm, region(1, 2 * MIB, MIB, hva + 2 * MIB, 0)));
    c.success("repeating a slot unchanged", set_region(&vm, region(1, 2 * MIB, MIB, hva + 2 * MIB, 0)));
    c.errno("an overlapping slot fails with EEXIST",
            set_region(&vm, region(2, MIB, 2 * MIB, hva + MIB, 0)), libc::EEXIST);
    c.errno("a size that is not a multiple of 4 KiB fails with EINVAL",
            set_region(&vm, region(2, 8 * MIB, 4097, hva, 0)), libc::EINVAL);
    c.errno("a misaligned guest address fails with EINVAL",
            set_region(&vm, region(2, 8 * MIB + 1, MIB, hva, 0)), libc::EINVAL);
    c.errno("a misaligned userspace address fails with EINVAL",
            set_region(&vm, region(2, 8 * MIB, MIB, hva + 1, 0)), libc::EINVAL);
    c.errno("a guest range that wraps around fails with EINVAL",
            set_region(&vm, region(2, !0xfff, 2 * 4096, hva, 0)), libc::EINVAL);
    c.errno("a userspace range beyond user space fails with EINVAL",
            set_region(&vm, region(2, 8 * MIB, MIB, 0xffff_8000_0000_0000, 0)), libc::EINVAL);
    c.errno("an unknown flag fails with EINVAL",
            set_region(&vm, region(2, 8 * MIB, MIB, hva, 1 << 20)), libc::EINVAL);
    c.errno("resizing a slot fails with EINVAL",
            set_region(&vm, region(1, 2 * MIB, 2 * MIB, hva + 2 * MIB, 0)), libc::EINVAL);
    c.errno("deleting a slot that does not exist fails with EINVAL",
            set_region(&vm, region(7, 0, 0, 0, 0)), libc::EINVAL);
    c.success("deleting a slot (size 0)", set_region(&vm, region(1, 0, 0, 0, 0)));
    c.success("its range can be used again", set_region(&vm, region(3, 2 * MIB, MIB, hva + 2 * MIB, 0)));
    c.success("moving a slot", set_region(&vm, region(3, 3 * MIB, MIB, hva + 2 * MIB, 0)));
    c.success("KVM_SET_TSS_ADDR", vm.set_tss_address(0xfffb_d000));
    c.success("KVM_SET_IDENTITY_MAP_ADDR before any vCPU", vm.set_identity_map_address(0xfffb_c000));
    drop(vm);
}

fn vcpu_checks(c: &mut Checks, kvm: &Kvm) {
    let Some(vm) = c.success("KVM_CREATE_VM for vCPUs", kvm.create_vm()) else { return };
    let Some(vcpu) = c.success("KVM_CREATE_VCPU 0 (and mmap of kvm_run)", vm.create_vcpu(0)) else { return };
    c.errno("KVM_CREATE_VCPU with an existing id fails with EEXIST", vm.create_vcpu(0), libc::EEXIST);
    c.errno("KVM_SET_IDENTITY_MAP_ADDR after a vCPU fails with EINVAL",
            vm.set_identity_map_address(0xfffb_c000), libc::EINVAL);
    let Some(mut sregs) = c.success("KVM_GET_SREGS", vcpu.get_sregs()) else { return };
    c.check("a new vCPU is at F000:FFF0 with CS base FFFF0000",
            sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000, format!("{:x?}", sregs.cs));
    let Some(mut regs) = c.success("KVM_GET_REGS", vcpu.get_regs()) else { return };
    c.check("a new vCPU has RIP FFF0 and RFLAGS 2", regs.rip == 0xfff0 && regs.rflags == 2,
            format!("rip {:#x} rflags {:#x}", regs.rip, regs.rflags));
    regs.rax = 0x1234_5678_9abc_def0;
    regs.rip = 0x1000;
    c.success("KVM_SET_REGS", vcpu.set_regs(&regs));
    let back = vcpu.get_regs();
    c.check("KVM_GET_REGS returns what KVM_SET_REGS set",
            matches!(back, Ok(r) if r.rax == regs.rax && r.rip == 0x1000), format!("{back:x?}"));
    sregs.cr0 |= 1; // protected mode
    sregs.cs.base = 0;
    c.success("KVM_SET_SREGS into protected mode", vcpu.set_sregs(&sregs));
    let mut bad = sregs;
    bad.efer |= 1 << 10; // EFER.LMA without paging
    c.errno("KVM_SET_SREGS with EFER.LMA but no paging fails with EINVAL", vcpu.set_sregs(&bad), libc::EINVAL);
    let mut bad = sregs;
    bad.cr0 = 0x8000_0000; // PG without PE
    c.errno("KVM_SET_SREGS with CR0.PG but not CR0.PE fails with EINVAL", vcpu.set_sregs(&bad), libc::EINVAL);
    let back = vcpu.get_sregs();
    c.check("refused KVM_SET_SREGS left the state alone",
            matches!(back, Ok(s) if s.cr0 == sregs.cr0 && s.efer == sregs.efer), format!("{back:x?}"));
    // A bad pointer is a fault, never a crash.
    let r = raw_ioctl(&vcpu, u64::from(kvm_get_regs_nr()), 8);
    c.check("KVM_GET_REGS into an unmapped address fails with EFAULT", r == Err(libc::EFAULT), format!("{r:?}"));
    c.check("KVM_CAP_IMMEDIATE_EXIT is supported", kvm.check_extension(Cap::ImmediateExit), "0");
    let mut vcpu = vcpu;
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|e| format!("{e:?}"));
    c.check("KVM_RUN with immediate_exit set fails with EINTR at once",
            r.as_ref().is_err_and(|e| e.errno() == libc::EINTR), format!("{r:?}"));
    vcpu.set_kvm_immediate_exit(0);
    let r = raw_ioctl(&vcpu, 0xaeff, 0);
    c.check("an unknown vCPU ioctl fails with ENOTTY (KVM: EINVAL)",
            r == Err(libc::ENOTTY) || r == Err(libc::EINVAL), format!("{r:?}"));
    let r = raw_ioctl(&vm, 0xaeff, 0);
    c.check("an unknown VM ioctl fails with ENOTTY", r == Err(libc::ENOTTY), format!("{r:?}"));
}

/// The guest's SSE registers go in and out through KVM_SET_FPU/KVM_GET_FPU,
/// and KVM_GET_FPU shows what the guest computed: a real-mode guest runs
/// `movups xmm0, [0x2000]; movaps xmm2, xmm0; hlt` and XMM2 comes back
/// holding the pattern at 0x2000.
fn fpu_checks(c: &mut Checks, kvm: &Kvm) {
    const PATTERN: [u8; 16] = *b"rkvm fpu pattern";
    let code = [0x0f, 0x10, 0x06, 0x00, 0x20, 0x0f, 0x28, 0xd0, 0xf4];
    let Some(mut g) = c.success("a real-mode guest for FPU checks", Guest::new(kvm, &code)) else { return };
    g.write(0x2000, &PATTERN);
    let Some(mut fpu) = c.success("KVM_GET_FPU", g.vcpu.get_fpu()) else { return };
    // MXCSR resets to 0x1f80 (SDM Vol. 3A, Table 10-1); KVM shows 0 until
    // the state is first written (its XSAVE image is in the init state).
    c.check("a new vCPU's FPU has FCW 0x37f and MXCSR 0x1f80 (KVM: 0)",
            fpu.fcw == 0x37f && (fpu.mxcsr == 0x1f80 || fpu.mxcsr == 0),
            format!("fcw {:#x} mxcsr {:#x}", fpu.fcw, fpu.mxcsr));
    fpu.xmm[1] = PATTERN;
    c.success("KVM_SET_FPU", g.vcpu.set_fpu(&fpu));
    let back = g.vcpu.get_fpu();
    c.check("KVM_GET_FPU returns what KVM_SET_FPU set", back.as_ref().is_ok_and(|f| f.xmm[1] == PATTERN), "differs");
    let mut sregs = g.vcpu.get_sregs().unwrap_or_default();
    sregs.cr4 |= 1 << 9; // OSFXSR: SSE instructions allowed
    c.success("KVM_SET_SREGS with CR4.OSFXSR", g.vcpu.set_sregs(&sregs));
    let exit = g.run();
    c.check("the FPU guest runs to HLT", exit == "Hlt", exit);
    let after = g.vcpu.get_fpu();
    c.check("what the guest loaded into XMM0 and XMM2 is seen through KVM_GET_FPU",
            after.as_ref().is_ok_and(|f| f.xmm[2] == PATTERN && f.xmm[0] == PATTERN), "xmm2 differs");
    let mut bad = after.unwrap_or_default();
    bad.mxcsr = 0xffff_ffff;
    let r = g.vcpu.set_fpu(&bad);
    c.check("KVM_SET_FPU with reserved MXCSR bits is refused (rkvm) or tolerated (KVM), never fatal",
            r.is_ok() || r.as_ref().is_err_and(|e| e.errno() == libc::EINVAL), format!("{r:?}"));
}

/// KVM_INTERRUPT without an in-kernel irqchip: a real-mode guest installs
/// an IVT entry for vector 0x20, enables interrupts and halts; the queued
/// interrupt runs its handler (OUT 0x99 of 'I', then IRET back to HLT);
/// `if_flag` and `ready_for_interrupt_injection` say the guest can take it.
fn interrupt_checks(c: &mut Checks, kvm: &Kvm) {
    let code = [
        0x31, 0xc0,                         // xor ax, ax
        0x8e, 0xd8,                         // mov ds, ax
        0xc7, 0x06, 0x80, 0x00, 0x00, 0x11, // mov word [0x80], 0x1100
        0xc7, 0x06, 0x82, 0x00, 0x00, 0x00, // mov word [0x82], 0
        0xfb,                               // sti
        0xf4,                               // hlt
        0xeb, 0xfd,                         // jmp hlt
    ];
    let handler = [0xb0, b'I', 0xe6, 0x99, 0xcf]; // mov al, 'I'; out 0x99, al; iret
    let Some(mut g) = c.success("a real-mode guest for interrupts", Guest::new(kvm, &code)) else { return };
    g.write(0x1100, &handler);
    let first = g.run();
    c.check("the guest halts with interrupts enabled", first == "Hlt", first);
    let run = g.vcpu.get_kvm_run();
    let (if_flag, ready) = (run.if_flag, run.ready_for_interrupt_injection);
    c.check("kvm_run says IF is set and an interrupt can be injected", if_flag == 1 && ready == 1,
            format!("if_flag {if_flag} ready {ready}"));
    let r = kvm_interrupt(&g.vcpu, 0x21);
    c.check("KVM_INTERRUPT of vector 0x21", r.is_ok(), format!("{r:?}"));
    let r = kvm_interrupt(&g.vcpu, 0x20);
    c.check("KVM_INTERRUPT of vector 0x20 replaces it (no in-kernel irqchip)", r.is_ok(), format!("{r:?}"));
    let r = kvm_interrupt(&g.vcpu, 256);
    c.check("KVM_INTERRUPT of vector 256 fails with EINVAL", r == Err(libc::EINVAL), format!("{r:?}"));
    // A run cut short before entry (immediate_exit, as a VMM's timer kick
    // does) still reports where the guest stands: with a vector queued the
    // VMM must not acknowledge another at its PIC.
    g.vcpu.set_kvm_immediate_exit(1);
    let r = g.vcpu.run().map(|_| ()).map_err(|e| e.errno());
    g.vcpu.set_kvm_immediate_exit(0);
    c.check("KVM_RUN with immediate_exit set fails with EINTR", r == Err(libc::EINTR), format!("{r:?}"));
    let run = g.vcpu.get_kvm_run();
    let (if_flag, ready) = (run.if_flag, run.ready_for_interrupt_injection);
    c.check("after it, kvm_run says IF is set but no interrupt can be injected (one is queued)",
            if_flag == 1 && ready == 0, format!("if_flag {if_flag} ready {ready}"));
    let second = g.run();
    c.check("the interrupt runs the guest's handler (OUT 0x99 of 'I')", second == reported(b'I'), second);
    let third = g.run();
    c.check("IRET returns to the halt loop", third == "Hlt", third);
}

/// A state the CPU refuses at VM entry (TR with a non-TSS type: SDM Vol.
/// 3C, 27.3.1.2) becomes KVM_EXIT_FAIL_ENTRY with the exit reason "VM-entry
/// failure due to invalid guest state" (0x80000021).
fn fail_entry_checks(c: &mut Checks, kvm: &Kvm) {
    let Some(mut g) = c.success("a guest with an invalid state", Guest::new(kvm, &HLT)) else { return };
    let mut sregs = g.vcpu.get_sregs().unwrap_or_default();
    sregs.tr.type_ = 1; // an available 16-bit TSS: TR must be busy
    c.success("KVM_SET_SREGS with a TR the CPU refuses", g.vcpu.set_sregs(&sregs));
    let exit = g.run();
    c.check("KVM_RUN reports KVM_EXIT_FAIL_ENTRY with reason 0x80000021", exit.starts_with("FailEntry(80000021"),
            exit);
}

/// `_IOR(KVMIO, 0x81, struct kvm_regs)`.
fn kvm_get_regs_nr() -> u32 {
    (2 << 30) | ((std::mem::size_of::<kvm_bindings::kvm_regs>() as u32) << 16) | (0xae << 8) | 0x81
}

fn dump_reset_state(kvm: &Kvm) -> Result<(), String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    for id in [0, 1] {
        let vcpu = vm.create_vcpu(id).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        println!("vcpu {id} regs {regs:x?}");
        for (name, s) in [("cs", sregs.cs), ("ds", sregs.ds), ("es", sregs.es), ("fs", sregs.fs),
                          ("gs", sregs.gs), ("ss", sregs.ss), ("tr", sregs.tr), ("ldt", sregs.ldt)] {
            println!("vcpu {id} {name} {s:x?}");
        }
        println!("vcpu {id} gdt {:x?} idt {:x?}", sregs.gdt, sregs.idt);
        println!("vcpu {id} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x} apic_base {:#x}",
                 sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer, sregs.apic_base);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--host-fpu-stress") {
        let Some(seconds) = args.get(i + 1).and_then(|s| s.parse::<u64>().ok()) else {
            eprintln!("rkvm-abi-check: --host-fpu-stress needs a number of seconds");
            return ExitCode::from(2);
        };
        return match host_fpu::stress(std::time::Duration::from_secs(seconds)) {
            Ok(rounds) => {
                println!("host task: registers kept over {rounds} rounds");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("host task: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let dev = args.iter().position(|a| a == "--dev").and_then(|i| args.get(i + 1)).cloned()
        .unwrap_or_else(|| "/dev/rkvm".to_string());
    let path = CString::new(dev.clone()).expect("no NUL in a path");
    let kvm = match Kvm::new_with_path(&path) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("rkvm-abi-check: cannot open {dev}: {e}");
            return ExitCode::from(2);
        }
    };
    if args.iter().any(|a| a == "--dump-reset-state") {
        return match dump_reset_state(&kvm) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rkvm-abi-check: {dev}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(i) = args.iter().position(|a| a == "--spin") {
        let Some(n) = args.get(i + 1).and_then(|s| s.parse::<u64>().ok()).filter(|n| (1..=8).contains(n)) else {
            eprintln!("rkvm-abi-check: --spin needs a number of vCPUs, 1 to 8");
            return ExitCode::from(2);
        };
        eprintln!("rkvm-abi-check: {}", spin::spin(&kvm, n, args.iter().any(|a| a == "--sti")));
        return ExitCode::FAILURE;
    }
    if let Some(i) = args.iter().position(|a| a == "--hostile") {
        // One of the hostile-input regression checks alone (hostile.rs),
        // e.g. to see it fail on an old rkvm.ko.
        let Some(name) = args.get(i + 1).filter(|n| hostile::names().any(|h| h.contains(n.as_str()))) else {
            eprintln!("rkvm-abi-check: --hostile needs one of: {}", hostile::names().collect::<Vec<_>>().join(", "));
            return ExitCode::from(2);
        };
        let mut c = Checks { passed: 0, failed: 0 };
        let rkvm_semantics = args.iter().any(|a| a == "--rkvm");
        let unrestricted_guest = args.iter().any(|a| a == "--unrestricted-guest");
        hostile::checks(&mut c, &kvm, unrestricted_guest, rkvm_semantics, Some(name));
        println!("{} passed, {} failed", c.passed, c.failed);
        return if c.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let mut c = Checks { passed: 0, failed: 0 };
    let rkvm_semantics = args.iter().any(|a| a == "--rkvm");
    let unrestricted_guest = args.iter().any(|a| a == "--unrestricted-guest" || a == "--with-invalid-state");
    system_checks(&mut c, &kvm, rkvm_semantics);
    memory_slot_checks(&mut c, &kvm);
    vcpu_checks(&mut c, &kvm);
    fpu_checks(&mut c, &kvm);
    cpu::msr_index_list_checks(&mut c, &kvm, rkvm_semantics);
    cpu::msr_checks(&mut c, &kvm);
    cpu::msr_state_checks(&mut c, &kvm);
    cpu::msr_guest_checks(&mut c, &kvm);
    cpu::xsave_checks(&mut c, &kvm, unrestricted_guest);
    if unrestricted_guest {
        cr8::cr8_checks(&mut c, &kvm);
    }
    interrupt_checks(&mut c, &kvm);
    events::vcpu_event_checks(&mut c, &kvm);
    events::nmi_checks(&mut c, &kvm);
    events::guest_debug_checks(&mut c, &kvm, rkvm_semantics, unrestricted_guest);
    if unrestricted_guest {
        fail_entry_checks(&mut c, &kvm);
    }
    hostile::checks(&mut c, &kvm, unrestricted_guest, rkvm_semantics, None);
    println!("{} passed, {} failed", c.passed, c.failed);
    if c.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
