//! Creating a VM with one vCPU, loading a flat image, and the run loop that
//! hands port I/O to the devices until the guest stops.

use std::cell::Cell;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::bus::PortBus;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_BASE, DEBUG_EXIT_LEN};
use crate::devices::serial::{SerialPort, COM1_BASE, COM1_LEN};
use crate::{kvm, loader};

/// RFLAGS.IF: a HLT with it clear can only end by NMI, SMI or reset, so the
/// run is over.
const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bit 1 is reserved and always 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// Smallest guest RAM accepted: room for the real-mode IVT, BDA and a payload.
const MIN_MEM: u64 = 64 << 10;
const PAGE_SIZE: u64 = 4096;

/// What `rkvm run` was asked to do.
pub struct RunConfig {
    /// Device path (/dev/rkvm or /dev/kvm).
    pub dev: PathBuf,
    /// Bytes of guest RAM at guest-physical 0.
    pub mem_size: u64,
    /// Where the image goes.
    pub load: u64,
    /// First instruction.
    pub entry: u64,
    /// The flat binary.
    pub image: PathBuf,
}

/// Runs the guest; returns the process exit status.
///
/// # Errors
/// Bad input, a device that is not KVM-like, a failed ioctl, or a guest that
/// shut down or could not be entered (with a register dump).
pub fn run(cfg: &RunConfig) -> Result<u8> {
    if cfg.mem_size < MIN_MEM || !cfg.mem_size.is_multiple_of(PAGE_SIZE) {
        bail!("--mem {:#x}: guest RAM must be a multiple of 4 KiB and at least 64 KiB", cfg.mem_size);
    }
    if cfg.entry >= cfg.mem_size {
        bail!("entry address {:#x} is outside guest RAM ({:#x} bytes)", cfg.entry, cfg.mem_size);
    }
    if cfg.entry >= 1 << 20 {
        bail!("entry address {:#x} is not reachable in real mode (must be below 1 MiB)", cfg.entry);
    }
    // Guest memory first, so that it outlives the VM that maps it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.mem_size as usize)])
        .context("cannot allocate guest RAM")?;
    loader::load_flat(&mem, cfg.mem_size, &cfg.image, cfg.load)?;

    let kvm = kvm::open(&cfg.dev)?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
    let host_addr = mem.get_host_address(GuestAddress(0)).context("guest RAM has no host mapping")?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: cfg.mem_size,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: `mem` maps `memory_size` bytes at `host_addr` and is declared
    // before `vm`, so it is unmapped only after the VM is gone.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    enter_real_mode(&vcpu, cfg.entry)?;

    let exit_status = Rc::new(Cell::new(None));
    let mut bus = PortBus::default();
    bus.insert(COM1_BASE, COM1_LEN, Box::new(SerialPort::new(std::io::stdout())));
    bus.insert(DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, Box::new(DebugExit::new(exit_status.clone())));
    run_loop(&mut vcpu, &mut bus, &exit_status)
}

/// Real mode with CS:IP pointing at `entry` (which is below 1 MiB):
/// CS = (entry >> 4) & 0xf000, so IP stays within 64 KiB.
fn enter_real_mode(vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    let selector = ((entry >> 4) & 0xf000) as u16;
    sregs.cs.selector = selector;
    sregs.cs.base = u64::from(selector) << 4;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
    let regs = kvm_regs { rip: entry - sregs.cs.base, rflags: RFLAGS_FIXED, ..Default::default() };
    vcpu.set_regs(&regs).context("KVM_SET_REGS failed")?;
    Ok(())
}

fn run_loop(vcpu: &mut VcpuFd, bus: &mut PortBus, exit_status: &Cell<Option<u32>>) -> Result<u8> {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.write(port, data);
                if let Some(value) = exit_status.get() {
                    return Ok(DebugExit::exit_code(value));
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::Hlt) => {
                let regs = vcpu.get_regs().context("KVM_GET_REGS failed")?;
                if regs.rflags & RFLAGS_IF == 0 {
                    return Ok(0);
                }
                bail!("guest halted with interrupts enabled, and nothing can interrupt it yet\n{}", dump(vcpu));
            }
            Ok(VcpuExit::Shutdown) => bail!("guest shut down (triple fault)\n{}", dump(vcpu)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                bail!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}\n{}", dump(vcpu))
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                log::debug!("MMIO read of {} bytes at {addr:#x}: nothing there, all ones", data.len());
                data.fill(0xff);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                log::debug!("MMIO write {data:x?} at {addr:#x}: nothing there, ignored");
            }
            Ok(VcpuExit::InternalError) => bail!("KVM internal error\n{}", dump(vcpu)),
            Ok(other) => {
                let what = format!("{other:?}");
                bail!("unexpected exit {what}\n{}", dump(vcpu))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => bail!("KVM_RUN failed: {e}"),
        }
    }
}

/// The vCPU's registers, for error reports.
fn dump(vcpu: &VcpuFd) -> String {
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
