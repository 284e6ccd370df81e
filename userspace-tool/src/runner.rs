//! The vCPU loop: KVM_RUN, then hand each exit to the devices, until the
//! guest stops. Between runs it does what a PC's hardware would do
//! meanwhile: timers fire, console input arrives in the UART, and the
//! interrupt the APIC or the PIC has for the CPU is injected with
//! KVM_INTERRUPT when the guest can take it (`ready_for_interrupt_injection`), or an interrupt-window exit is
//! requested so that it can be injected as soon as it can (api.rst 4.10,
//! 5 "The kvm_run structure"; no in-kernel irqchip, on rkvm as on KVM).
//!
//! While the guest runs, a POSIX timer kicks KVM_RUN at the next timer
//! deadline and the console thread kicks it when input arrives. A HLT with
//! interrupts enabled parks the thread until the next timer deadline or
//! console event: an idle guest costs (almost) no host CPU.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::console::{Console, ConsoleEvent};
use crate::devices::debug_exit::DebugExit;
use crate::kick::{self, Alarm, Kick};
use crate::platform::Platform;
use crate::status::Failure;
use crate::step::Stepper;

/// The KVM ioctl numbers, from the structs kvm-bindings defines (the same
/// macro gives the module its numbers).
mod ioctls {
    #![allow(dead_code)]
    rkvm_core::kvm_ioctl_numbers!(kvm_bindings);
}

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// The longest a halted guest parks without a timer: it is woken by input
/// or a kick anyway; this only bounds how late a missed wake-up is noticed.
const MAX_PARK: Duration = Duration::from_secs(1);

/// How a run ended, besides errors of the device.
pub struct Outcome {
    /// The process exit status (see `status.rs`).
    pub status: u8,
    /// What to say on stderr, if the end deserves it.
    pub message: Option<String>,
}

impl Outcome {
    fn ended(status: u8) -> Self {
        Outcome { status, message: None }
    }

    /// The guest stopped in a way that is a failure of the run (`failure`
    /// gives the status), explained by `message` and a register dump.
    fn failed(failure: Failure, message: String) -> Self {
        Outcome { status: failure.status(), message: Some(message) }
    }
}

/// Runs `vcpu` with `platform` until the guest stops.
///
/// With `console`, stdin feeds COM1 (and Ctrl-A x ends the run).
///
/// A guest that shut down, failed to enter or hit an internal error ends
/// the run with that failure's status and a register dump.
///
/// # Errors
/// A failed ioctl.
pub fn run(vcpu: &mut VcpuFd, platform: &mut Platform, stepper: &mut Stepper<'_>, with_console: bool) -> Result<Outcome> {
    let (kick, _guard) = Kick::install(vcpu.get_kvm_run())?;
    let mut alarm = Alarm::new()?;
    let console = if with_console { Some(Console::start(move || kick.kick())?) } else { None };
    let mut input = Vec::new();
    let mut input_done = console.is_none();
    loop {
        // A kick from now on makes the next KVM_RUN return at once; one that
        // came earlier is covered by the polling below.
        kick::rearm(vcpu.get_kvm_run());
        // What happened outside the guest since the last exit.
        if let Some(c) = &console {
            while let Some(event) = c.try_recv() {
                if handle_console(event, &mut input, &mut input_done) {
                    return Ok(Outcome::ended(0));
                }
            }
        }
        platform.feed_serial(&mut input);
        platform.poll_timers();
        inject_interrupt(vcpu, platform)?;
        alarm.set(platform.next_deadline());

        match vcpu.run() {
            Ok(VcpuExit::IoOut(..)) => {
                for_each_io_element(vcpu, |port, element| platform.pio.write(port, element));
                if let Some(value) = platform.exit_status.get() {
                    return Ok(Outcome::ended(DebugExit::exit_code(value)));
                }
                if platform.reset.get() {
                    return Ok(Outcome { status: 0, message: Some("guest reset itself (i8042 reset line): run ended".into()) });
                }
            }
            Ok(VcpuExit::IoIn(..)) => for_each_io_element(vcpu, |port, element| platform.pio.read(port, element)),
            Ok(VcpuExit::MmioRead(addr, data)) => platform.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => platform.mmio.write(addr, data),
            Ok(VcpuExit::Hlt) => {
                let regs = vcpu.get_regs().context("KVM_GET_REGS failed")?;
                if regs.rflags & RFLAGS_IF == 0 {
                    // Nothing can wake it: the guest is done (Linux's
                    // power-off without ACPI ends here too).
                    return Ok(Outcome::ended(0));
                }
                // The thread waits for the deadline itself: no signal.
                alarm.set(None);
                if park(platform, console.as_ref(), &mut input, &mut input_done) {
                    return Ok(Outcome::ended(0));
                }
            }
            // A guest lowered CR8 (KVM_EXIT_SET_TPR, no in-kernel irqchip):
            // interrupts here come from the tool's APIC, whose own TPR is
            // what Linux programs, so there is nothing to re-evaluate.
            Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) | Ok(VcpuExit::SetTpr) => {}
            Ok(VcpuExit::Shutdown) => {
                return Ok(Outcome::failed(Failure::Shutdown, format!("guest shut down (triple fault)\n{}", dump(vcpu))))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let message = format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}\n{}", dump(vcpu));
                return Ok(Outcome::failed(Failure::EntryFailed, message));
            }
            Ok(VcpuExit::Debug(arch)) => stepper.debug_exit(vcpu, &arch)?,
            Ok(VcpuExit::InternalError) => {
                let message = format!("KVM internal error{}\n{}", internal_error(vcpu), dump(vcpu));
                return Ok(Outcome::failed(Failure::Internal, message));
            }
            Ok(other) => {
                let what = format!("{other:?}");
                let message = format!("unexpected exit {what}\n{}", dump(vcpu));
                return Ok(Outcome::failed(Failure::Internal, message));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => bail!("KVM_RUN failed: {e}"),
        }
    }
}

/// Takes a console event; true if the run must end (Ctrl-A x).
fn handle_console(event: ConsoleEvent, input: &mut Vec<u8>, done: &mut bool) -> bool {
    match event {
        ConsoleEvent::Input(bytes) => input.extend_from_slice(&bytes),
        ConsoleEvent::Quit => return true,
        ConsoleEvent::Eof => *done = true,
    }
    false
}

/// The guest halted with interrupts on: wait for what can wake it, the next
/// timer deadline or console input, without spinning. True if the console
/// asked to quit meanwhile.
fn park(platform: &Platform, console: Option<&Console>, input: &mut Vec<u8>, input_done: &mut bool) -> bool {
    // Input still pending waits for the guest to listen or read: it does not
    // keep a halted guest awake.
    if platform.interrupt_pending() {
        return false;
    }
    let wait = platform.next_deadline().map_or(MAX_PARK, |d| d.saturating_duration_since(Instant::now()).min(MAX_PARK));
    match console {
        Some(c) if !*input_done => c.recv_timeout(wait).is_some_and(|event| handle_console(event, input, input_done)),
        _ => {
            std::thread::sleep(wait);
            false
        }
    }
}

/// Injects the pending interrupt if the guest can take it now, else
/// asks for an interrupt-window exit.
fn inject_interrupt(vcpu: &mut VcpuFd, platform: &Platform) -> Result<()> {
    let pending = platform.interrupt_pending();
    let run = vcpu.get_kvm_run();
    if !pending {
        run.request_interrupt_window = 0;
        return Ok(());
    }
    if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
        let Some(vector) = platform.acknowledge_interrupt() else { return Ok(()) };
        run.request_interrupt_window = 0;
        let irq = kvm_bindings::kvm_interrupt { irq: vector.into() };
        // SAFETY: KVM_INTERRUPT reads a `struct kvm_interrupt` from `&irq`, live across the call.
        let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), ioctls::KVM_INTERRUPT.into(), &irq) };
        if rc < 0 {
            bail!("KVM_INTERRUPT of vector {vector:#x} failed: {}", std::io::Error::last_os_error());
        }
    } else {
        run.request_interrupt_window = 1;
    }
    Ok(())
}

/// Hands each element of the last KVM_EXIT_IO to `f`: one for IN and OUT,
/// `count` for INS and OUTS (api.rst: `count` elements of `size` bytes at
/// `data_offset` in the mmap'd area). kvm-ioctls' `VcpuExit` gives the data
/// as one slice without the element size, so it is read from `kvm_run`.
fn for_each_io_element(vcpu: &mut VcpuFd, mut f: impl FnMut(u16, &mut [u8])) {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the valid member.
    let io = unsafe { run.__bindgen_anon_1.io };
    let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
    let (size, count) = (usize::from(io.size), io.count as usize);
    let Some(len) = size
        .checked_mul(count)
        .filter(|&l| (io.data_offset as usize).checked_add(l).is_some_and(|end| end <= 2 * 4096))
    else {
        log::warn!("KVM_EXIT_IO with {count} elements of {size} bytes at {:#x}: ignored", io.data_offset);
        return;
    };
    // KVM_GET_VCPU_MMAP_SIZE covers the PIO page; the range was checked
    // above against the two pages every KVM-like device maps.
    // SAFETY: `len` bytes at `data_offset` lie in the vCPU's mapping, unused by others until the next run.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
    for element in data.chunks_mut(size.max(1)) {
        f(io.port, element);
    }
}

/// The vCPU's exit statistics from the device's KVM_GET_STATS_FD, as
/// `name value` lines (zeros left out).
pub fn exit_stats(vcpu: &VcpuFd) -> Result<Vec<(String, u64)>> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
    let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), ioctls::KVM_GET_STATS_FD.into(), 0) };
    if fd < 0 {
        bail!("KVM_GET_STATS_FD failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut image = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut chunk, image.len() as u64)
            .context("reading the statistics")?;
        if n == 0 {
            break;
        }
        image.extend_from_slice(&chunk[..n]);
    }
    let parsed = rkvm_core::stats::parse(&image).map_err(|_| anyhow::anyhow!("malformed statistics from the device"))?;
    Ok(parsed.filter(|&(_, v)| v > 0).map(|(n, v)| (n.to_string(), v)).collect())
}

/// KVM_EXIT_INTERNAL_ERROR's details: the suberror and its data words
/// (api.rst, "KVM_EXIT_INTERNAL_ERROR").
fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR: `internal` is the
    // valid member; every field is an integer.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "exit during event delivery",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    format!(": suberror {} ({what}), data [{}]", internal.suberror, data.join(", "))
}

/// The vCPU's registers, for error reports.
pub fn dump(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            let _ = write_regs(&mut out, &r, &s);
        }
        (Err(e), _) | (_, Err(e)) => {
            let _ = write!(out, "  (registers unavailable: {e})");
        }
    }
    out
}

fn write_regs(out: &mut String, r: &kvm_regs, s: &kvm_sregs) -> std::fmt::Result {
    writeln!(out, "  rip {:016x}  rflags {:016x}  rsp {:016x}", r.rip, r.rflags, r.rsp)?;
    writeln!(out, "  rax {:016x}  rbx {:016x}  rcx {:016x}  rdx {:016x}", r.rax, r.rbx, r.rcx, r.rdx)?;
    writeln!(out, "  rsi {:016x}  rdi {:016x}  rbp {:016x}", r.rsi, r.rdi, r.rbp)?;
    writeln!(out, "  cr0 {:016x}  cr3 {:016x}  cr4 {:016x}  efer {:016x}", s.cr0, s.cr3, s.cr4, s.efer)?;
    write!(out, "  cs {:04x} base {:x}  ss {:04x} base {:x}", s.cs.selector, s.cs.base, s.ss.selector, s.ss.base)
}
