//! fork() while a vCPU runs: the child uses the VM and vCPU fds it
//! inherited (KVM_RUN, KVM_GET_REGS, KVM_SET_USER_MEMORY_REGION,
//! KVM_CREATE_VCPU) and exits. KVM answers EIO to any process but the VM's
//! creator (api.rst 2, "File descriptors"); what the device answers is
//! counted, not judged: the API does not promise it. What is judged is
//! that the child finishes: a child still inside an ioctl after 10 s is a
//! finding, it is then SIGKILLed, and a child that cannot be reaped 10 s
//! after that is another (one in D state cannot be killed at all; the
//! parent goes on without it).
//!
//! The child reports through a pipe: `B i` before ioctl `i`, `R i errno`
//! after it (errno 0 for success).
//!
//! Context: the child runs only async-signal-safe code (raw syscalls
//! through libc, no allocation, no locks: other threads of the parent may
//! have held any lock at the fork) and ends with `_exit`.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;

use crate::ctx::Ctx;
use crate::fixture::{self, Fixture};
use crate::ioctl_table::nr;
use crate::modes::Mode;
use crate::runner::{self, Checks};
use crate::scratch::put;
use crate::sys;

/// The child's ioctls, by index in its reports.
const OPS: [&str; 4] = [
    "KVM_RUN",
    "KVM_GET_REGS",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_CREATE_VCPU",
];
/// How long the child may take, and then how long its reaping may take.
const CHILD_LIMIT: Duration = Duration::from_secs(10);

/// One fork race (see the module doc).
pub fn fork_while_running(main: &mut Ctx<'_>) {
    let Some(f) = Fixture::new(main, Mode::Real, &fixture::SPIN, 1) else {
        return;
    };
    let vcpu = &f.vm.vcpus[0];
    let (vm_fd, vcpu_fd) = (f.vm.raw(), vcpu.raw());
    // The child's arguments, in the scratch buffer (the child's copy of it
    // after the fork): KVM_GET_REGS writes at 0; a slot of one page of the
    // VM's own RAM at 4096.
    let region = kvm_userspace_memory_region {
        slot: 39,
        flags: 0,
        guest_phys_addr: 1 << 30,
        memory_size: 4096,
        userspace_addr: f.ram.addr(),
    };
    put(main.scratch.bytes_mut(), 4096, &region);
    let args: [(RawFd, u32, u64); 4] = [
        (vcpu_fd, nr::KVM_RUN, 0),
        (vcpu_fd, nr::KVM_GET_REGS, main.scratch.addr(0)),
        (
            vm_fd,
            nr::KVM_SET_USER_MEMORY_REGION,
            main.scratch.addr(4096),
        ),
        (vm_fd, nr::KVM_CREATE_VCPU, 100),
    ];
    let Ok((rd, wr)) = sys::pipe() else { return };
    let (tx, rx) = mpsc::channel();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let done = &done;
        let shared = main.shared;
        let rng = main.rng.clone();
        let h = s.spawn(move || {
            let Ok(mut ctx) = Ctx::new(shared, crate::cli::Phase::Race, rng, Some(40)) else {
                return None;
            };
            let _ = tx.send((sys::this_thread(), ctx.watch().remote()));
            let _ = runner::run(
                &mut ctx,
                vcpu_fd,
                None,
                Duration::from_millis(500),
                false,
                Checks::Full,
            );
            let end = Instant::now() + Duration::from_secs(25);
            while !done.load(Ordering::Relaxed) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            Some(ctx.tally)
        });
        let Ok((thread, remote)) = rx.recv() else {
            return;
        };
        crate::race::wait_until_running(&remote);
        // SAFETY: the child runs `child`, which makes raw syscalls only and
        // ends with _exit (see the module doc); the parent goes on as usual.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child(wr, &args);
        }
        sys::close(wr);
        if pid < 0 {
            main.tally.note("fork races skipped: fork failed");
        } else {
            collect(main, pid, rd);
        }
        sys::close(rd);
        // SAFETY: the thread stays alive until `done` is set below.
        unsafe { sys::kick(thread) };
        done.store(true, Ordering::Relaxed);
        match h.join() {
            Ok(Some(t)) => main.tally.merge(&t),
            _ => eprintln!("rkvm-fuzz: race: the fork race's vCPU thread failed"),
        }
    });
    drop(f);
    main.tally.note("scripted races: fork while a vCPU runs");
}

/// The child: the ioctls of `args`, reported on `wr`, then `_exit`.
fn child(wr: RawFd, args: &[(RawFd, u32, u64); 4]) -> ! {
    // A KVM_RUN that the device lets this process make spins forever in
    // the guest: SIGALRM (ignored, but not restarted) ends it.
    sys::alarm_every(200);
    for (i, &(fd, n, arg)) in args.iter().enumerate() {
        sys::write_all(wr, &[b'B', i as u8]);
        // SAFETY: `arg` is 0, an integer, or the child's copy of the
        // scratch buffer; the child ends right after.
        let (r, e) = unsafe { sys::ioctl(fd, n, arg) };
        let code = if r < 0 { e } else { 0 };
        let c = code.to_le_bytes();
        sys::write_all(wr, &[b'R', i as u8, c[0], c[1], c[2], c[3]]);
    }
    sys::exit_now(0)
}

/// Reads the child's reports and reaps it, within the limits.
fn collect(main: &mut Ctx<'_>, pid: libc::pid_t, rd: RawFd) {
    let (bytes, eof) = sys::read_until_eof(rd, CHILD_LIMIT);
    let mut begun = None;
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let i = bytes[at + 1] as usize;
        match bytes[at] {
            b'B' => {
                begun = OPS.get(i).copied();
                at += 2;
            }
            b'R' if at + 6 <= bytes.len() => {
                let code = i32::from_le_bytes([
                    bytes[at + 2],
                    bytes[at + 3],
                    bytes[at + 4],
                    bytes[at + 5],
                ]);
                if let Some(op) = OPS.get(i) {
                    main.tally.child_result(op, code);
                }
                begun = None;
                at += 6;
            }
            _ => break,
        }
    }
    let blocked_in = begun.unwrap_or("no ioctl (before its first report)");
    if !eof {
        main.finding(&format!("fork child blocked in {blocked_in}"), || {
            format!(
                "a child using its parent's VM and vCPU fds did not finish within {} s",
                CHILD_LIMIT.as_secs()
            )
        });
        sys::kill(pid);
    }
    if sys::reap(pid, CHILD_LIMIT).is_none() {
        main.finding("a fork child could not be reaped", || {
            format!(
                "pid {pid}, last in {blocked_in}, still there {} s after its end (or SIGKILL)",
                CHILD_LIMIT.as_secs()
            )
        });
    }
}
