//! `rkvm-fuzz --kill-target VCPUS --dev PATH`: the VMM that the teardown
//! phase kills. It creates a VM with 1 MiB of RAM holding `jmp $` at
//! 0x1000, starts `VCPUS` vCPU threads in real mode there, writes one byte
//! to stdout as each enters KVM_RUN, and runs forever; only SIGKILL ends
//! it. A fresh process (not a fork of the multi-threaded fuzzer) so that
//! it may start threads of its own.
//!
//! Context: its own process; exits with status 3 if the device refuses
//! the setup.

use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};

use crate::ioctl_table::nr;
use crate::memory::Arena;
use crate::objects::adopt;
use crate::scratch::{bytes_of, from_bytes, Scratch};
use crate::sys;

/// Where the guest's `jmp $` is.
const CODE: u64 = 0x1000;

/// A raw ioctl with its argument copied into `s` (or an integer).
fn call(fd: RawFd, n: u32, s: &mut Scratch, arg: Option<&[u8]>, int: u64) -> Result<i64, i32> {
    let ptr = match arg {
        Some(b) => {
            s.bytes_mut()[..b.len()].copy_from_slice(b);
            s.addr(0)
        }
        None => int,
    };
    // SAFETY: the argument is an integer or the scratch mapping.
    let (r, e) = unsafe { sys::ioctl(fd, n, ptr) };
    if r < 0 {
        Err(e)
    } else {
        Ok(r)
    }
}

fn fail(what: &str, e: i32) -> ! {
    eprintln!("rkvm-fuzz --kill-target: {what}: {}", crate::errno::name(e));
    sys::exit_now(3)
}

/// Runs the target; never returns.
pub fn serve(dev: &str, vcpus: u32, interrupts_on: bool) -> ! {
    let sysfd = crate::device::open(dev).unwrap_or_else(|e| fail("open", e));
    let mut s = Scratch::new().unwrap_or_else(|e| fail("scratch", e));
    let size = call(
        sysfd.as_raw_fd(),
        nr::KVM_GET_VCPU_MMAP_SIZE,
        &mut s,
        None,
        0,
    )
    .unwrap_or_else(|e| fail("KVM_GET_VCPU_MMAP_SIZE", e));
    let vm = call(sysfd.as_raw_fd(), nr::KVM_CREATE_VM, &mut s, None, 0)
        .unwrap_or_else(|e| fail("KVM_CREATE_VM", e));
    let vm = adopt(vm).unwrap_or_else(|| fail("KVM_CREATE_VM", 0));
    let arena = Arena::reserve(0).unwrap_or_else(|e| fail("arena", e));
    let mut mem = arena
        .chunk(1 << 20)
        .unwrap_or_else(|e| fail("guest memory", e));
    if let Some(b) = mem.bytes_mut() {
        b[CODE as usize..CODE as usize + 2].copy_from_slice(&crate::fixture::SPIN);
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: mem.addr(),
    };
    call(
        vm.as_raw_fd(),
        nr::KVM_SET_USER_MEMORY_REGION,
        &mut s,
        Some(bytes_of(&region)),
        0,
    )
    .unwrap_or_else(|e| fail("KVM_SET_USER_MEMORY_REGION", e));
    let mut fds = Vec::new();
    for id in 0..u64::from(vcpus.max(1)) {
        let fd = call(vm.as_raw_fd(), nr::KVM_CREATE_VCPU, &mut s, None, id)
            .unwrap_or_else(|e| fail("KVM_CREATE_VCPU", e));
        let fd = adopt(fd).unwrap_or_else(|| fail("KVM_CREATE_VCPU", 0));
        call(fd.as_raw_fd(), nr::KVM_GET_SREGS, &mut s, Some(&[]), 0)
            .unwrap_or_else(|e| fail("KVM_GET_SREGS", e));
        let mut sregs: kvm_sregs = from_bytes(s.bytes());
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        call(
            fd.as_raw_fd(),
            nr::KVM_SET_SREGS,
            &mut s,
            Some(bytes_of(&sregs)),
            0,
        )
        .unwrap_or_else(|e| fail("KVM_SET_SREGS", e));
        let regs = kvm_regs {
            rip: CODE,
            // `--interrupts-on`: spin with IF set (see cli.rs).
            rflags: crate::arch::RFLAGS_FIXED
                | if interrupts_on {
                    crate::arch::RFLAGS_IF
                } else {
                    0
                },
            ..Default::default()
        };
        call(
            fd.as_raw_fd(),
            nr::KVM_SET_REGS,
            &mut s,
            Some(bytes_of(&regs)),
            0,
        )
        .unwrap_or_else(|e| fail("KVM_SET_REGS", e));
        // The kvm_run mapping, as a VMM has it while it is killed.
        let run = sys::DeviceMapping::new(
            fd.as_raw_fd(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            0,
        );
        fds.push((fd, run.ok()));
    }
    let threads: Vec<_> = fds
        .iter()
        .skip(1)
        .map(|(fd, _)| {
            let fd = fd.as_raw_fd();
            std::thread::spawn(move || spin(fd))
        })
        .collect();
    spin(fds[0].0.as_raw_fd());
    drop(threads);
    sys::exit_now(0)
}

/// Reports and runs vCPU `fd` forever.
fn spin(fd: RawFd) {
    sys::write_all(1, b"r");
    loop {
        // SAFETY: KVM_RUN takes no argument.
        let _ = unsafe { sys::ioctl(fd, nr::KVM_RUN, 0) };
    }
}
