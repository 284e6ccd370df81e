//! Creating a VM with one vCPU, loading a flat image or a Multiboot
//! kernel, and the run loop that hands port I/O and MMIO to the devices
//! until the guest stops.

use std::cell::Cell;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::bus::{MmioBus, PortBus};
use crate::devices::apic::{LocalApic, APIC_BASE, APIC_LEN};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_BASE, DEBUG_EXIT_LEN};
use crate::devices::fw_cfg::{FwCfg, FW_CFG_BASE, FW_CFG_LEN};
use crate::devices::pci::{PciConfig, PCI_CONFIG_BASE, PCI_CONFIG_LEN};
use crate::devices::pic::{Pic, PIC_LEN, PIC_MASTER_BASE, PIC_SLAVE_BASE};
use crate::devices::post::{PostCode, POST_LEN, POST_PORT};
use crate::devices::serial::{SerialPort, COM1_BASE, COM1_LEN};
use crate::multiboot::{self, Boot};
use crate::step::Stepper;
use crate::{kvm, layout, loader, Mode};

/// RFLAGS.IF: a HLT with it clear can only end by NMI, SMI or reset, so the
/// run is over.
const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bit 1 is reserved and always 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// CPUID.1:ECX bit 5: VMX.
const CPUID1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Smallest guest RAM accepted: room for the real-mode IVT, BDA and a payload.
const MIN_MEM: u64 = 64 << 10;
const PAGE_SIZE: u64 = 4096;

/// What `rkvm run` was asked to do.
pub struct RunConfig {
    /// Device path (/dev/rkvm or /dev/kvm).
    pub dev: PathBuf,
    /// Bytes of guest RAM at guest-physical 0.
    pub mem_size: u64,
    /// What to run.
    pub guest: Guest,
    /// Instructions to single-step and trace at the start (0: none).
    pub debug_step: u64,
}

/// The guest software and how it starts.
pub enum Guest {
    /// A flat binary, entered directly in the given mode.
    Flat {
        /// The file.
        image: PathBuf,
        /// CPU mode at the first instruction.
        mode: Mode,
        /// Where the image goes.
        load: u64,
        /// First instruction.
        entry: u64,
    },
    /// A Multiboot kernel, loaded and entered as a Multiboot loader does.
    Multiboot {
        /// The kernel file.
        kernel: PathBuf,
        /// Module files, in order.
        modules: Vec<PathBuf>,
        /// The kernel's arguments.
        args: OsString,
    },
}

/// A guest whose files have been read and checked, before RAM exists.
enum Prepared<'a> {
    Flat { image: &'a Path, mode: Mode, load: u64, entry: u64 },
    Multiboot(Boot),
}

/// CPU state at the first instruction.
enum Start {
    /// Real mode at `entry`.
    Real(u64),
    /// Protected or long mode with flat segments, and these registers.
    Flat(Mode, kvm_regs),
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
    // RAM is one block from 0: past the local APIC it would hide the APIC.
    if cfg.mem_size > APIC_BASE {
        bail!("--mem {:#x}: guest RAM must end at or below the local APIC at {APIC_BASE:#x}", cfg.mem_size);
    }
    // Checks first: a Multiboot guest's files are read and laid out before
    // anything is created.
    let prepared = match &cfg.guest {
        Guest::Flat { image, mode, load, entry } => {
            check_flat(cfg.mem_size, *mode, *entry)?;
            Prepared::Flat { image, mode: *mode, load: *load, entry: *entry }
        }
        Guest::Multiboot { kernel, modules, args } => {
            Prepared::Multiboot(Boot::prepare(kernel, modules, args, cfg.mem_size)?)
        }
    };
    // Guest memory first, so that it outlives the VM that maps it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.mem_size as usize)])
        .context("cannot allocate guest RAM")?;
    let start = match prepared {
        Prepared::Flat { image, mode, load, entry } => load_flat_guest(&mem, cfg.mem_size, image, mode, load, entry)?,
        Prepared::Multiboot(boot) => {
            boot.write(&mem)?;
            write_system_tables(&mem, Mode::Protected)?;
            // The Multiboot state (specification 3.2). The stack is not
            // promised; it is given anyway, below the information.
            let regs = kvm_regs {
                rip: boot.entry(),
                rax: multiboot::BOOTLOADER_MAGIC.into(),
                rbx: multiboot::INFO_ADDR,
                rsp: multiboot::INFO_ADDR,
                rflags: RFLAGS_FIXED,
                ..Default::default()
            };
            Start::Flat(Mode::Protected, regs)
        }
    };

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
    // The guest sees what the device supports (KVM refuses long mode to a
    // vCPU whose CPUID lacks it), adjusted as QEMU does for a guest without
    // nested virtualization: VMX hidden, the hypervisor bit set.
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID failed")?;
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx = (entry.ecx & !CPUID1_ECX_VMX) | CPUID1_ECX_HYPERVISOR;
        }
    }
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2 failed")?;
    match start {
        Start::Real(entry) => enter_real_mode(&vcpu, entry)?,
        Start::Flat(mode, regs) => enter_flat_mode(&vcpu, mode, &regs)?,
    }

    let exit_status = Rc::new(Cell::new(None));
    let mut buses = platform(cfg.mem_size, &exit_status);
    let mut stepper = Stepper::new(cfg.debug_step, &mem);
    stepper.start(&vcpu)?;
    run_loop(&mut vcpu, &mut buses, &mut stepper, &exit_status)
}

/// Checks a flat image's entry point against the RAM and the mode.
fn check_flat(mem_size: u64, mode: Mode, entry: u64) -> Result<()> {
    if entry >= mem_size {
        bail!("entry address {entry:#x} is outside guest RAM ({mem_size:#x} bytes)");
    }
    if mode == Mode::Real && entry >= 1 << 20 {
        bail!("entry address {entry:#x} is not reachable in real mode (must be below 1 MiB)");
    }
    if mode == Mode::Long && mem_size < layout::SYSTEM_END {
        bail!("long mode needs at least {:#x} bytes of RAM for its page tables", layout::SYSTEM_END);
    }
    Ok(())
}

/// Loads a flat image and, outside real mode, the tables its mode needs.
fn load_flat_guest(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    image: &Path,
    mode: Mode,
    load: u64,
    entry: u64,
) -> Result<Start> {
    let len = loader::load_flat(mem, mem_size, image, load)?;
    if mode == Mode::Real {
        return Ok(Start::Real(entry));
    }
    let system = if mode == Mode::Long { layout::PML4_ADDR..layout::SYSTEM_END } else { 0..0 };
    let image = load..load + len;
    if image.start < layout::GDT_ADDR + 24 && layout::GDT_ADDR < image.end
        || image.start < system.end && system.start < image.end
    {
        bail!(
            "image at {:#x}..{:#x} overlaps the GDT (0x500) or the page tables (0x90000..0x93000); use another --load",
            image.start,
            image.end
        );
    }
    write_system_tables(mem, mode)?;
    // The stack grows down from the image.
    Ok(Start::Flat(mode, kvm_regs { rip: entry, rsp: load, rflags: RFLAGS_FIXED, ..Default::default() }))
}

/// The devices a PC guest expects, on their buses. Present for every
/// guest: a flat image that does not touch them sees no difference.
struct Buses {
    pio: PortBus,
    mmio: MmioBus,
}

/// The devices at their PC addresses; the debug-exit device reports in
/// `exit_status`.
fn platform(mem_size: u64, exit_status: &Rc<Cell<Option<u32>>>) -> Buses {
    let mut pio = PortBus::default();
    pio.insert(PIC_MASTER_BASE, PIC_LEN, Box::new(Pic::new(PIC_MASTER_BASE)));
    pio.insert(POST_PORT, POST_LEN, Box::new(PostCode));
    pio.insert(PIC_SLAVE_BASE, PIC_LEN, Box::new(Pic::new(PIC_SLAVE_BASE)));
    pio.insert(DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, Box::new(DebugExit::new(exit_status.clone())));
    pio.insert(COM1_BASE, COM1_LEN, Box::new(SerialPort::new(std::io::stdout())));
    pio.insert(FW_CFG_BASE, FW_CFG_LEN, Box::new(FwCfg::new(mem_size)));
    pio.insert(PCI_CONFIG_BASE, PCI_CONFIG_LEN, Box::new(PciConfig::default()));
    let mut mmio = MmioBus::default();
    mmio.insert(APIC_BASE, APIC_LEN, Box::new(LocalApic::default()));
    Buses { pio, mmio }
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

/// The GDT, and for long mode the identity-mapped page tables.
fn write_system_tables(mem: &GuestMemoryMmap, mode: Mode) -> Result<()> {
    let long = mode == Mode::Long;
    for (i, entry) in layout::gdt(long).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + 8 * i as u64)).context("writing the GDT")?;
    }
    if long {
        const PRESENT_WRITABLE: u64 = 0b11;
        const PAGE_SIZE_2M: u64 = 1 << 7;
        mem.write_obj(layout::PDPT_ADDR | PRESENT_WRITABLE, GuestAddress(layout::PML4_ADDR))
            .context("writing the PML4")?;
        mem.write_obj(layout::PD_ADDR | PRESENT_WRITABLE, GuestAddress(layout::PDPT_ADDR))
            .context("writing the PDPT")?;
        // Map the first GiB whatever the RAM size: addresses beyond RAM are
        // MMIO, reached through these same tables.
        for i in 0..512u64 {
            mem.write_obj((i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE, GuestAddress(layout::PD_ADDR + 8 * i))
                .context("writing the page directory")?;
        }
    }
    Ok(())
}

/// A flat segment as the GDT describes it (the hidden part KVM_SET_SREGS
/// loads directly).
fn flat_segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!(code && long)),
        s: 1,
        l: u8::from(code && long),
        g: 1,
        ..Default::default()
    }
}

/// Protected mode (CR0.PE) or long mode (CR0.PG, CR4.PAE, EFER.LME|LMA):
/// flat segments, the GDT loaded, then `regs`.
fn enter_flat_mode(vcpu: &VcpuFd, mode: Mode, regs: &kvm_regs) -> Result<()> {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let long = mode == Mode::Long;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    let data = flat_segment(layout::DATA_SELECTOR, false, long);
    sregs.cs = flat_segment(layout::CODE_SELECTOR, true, long);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr0 = CR0_PE | CR0_ET;
    if long {
        sregs.cr0 |= CR0_PG;
        sregs.cr3 = layout::PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
    vcpu.set_regs(regs).context("KVM_SET_REGS failed")?;
    Ok(())
}

fn run_loop(
    vcpu: &mut VcpuFd,
    buses: &mut Buses,
    stepper: &mut Stepper<'_>,
    exit_status: &Cell<Option<u32>>,
) -> Result<u8> {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(..)) => {
                for_each_io_element(vcpu, |port, element| buses.pio.write(port, element));
                if let Some(value) = exit_status.get() {
                    return Ok(DebugExit::exit_code(value));
                }
            }
            Ok(VcpuExit::IoIn(..)) => for_each_io_element(vcpu, |port, element| buses.pio.read(port, element)),
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
            Ok(VcpuExit::MmioRead(addr, data)) => buses.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => buses.mmio.write(addr, data),
            Ok(VcpuExit::Debug(arch)) => stepper.debug_exit(vcpu, &arch)?,
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
    let Some(len) = size.checked_mul(count).filter(|&l| (io.data_offset as usize).checked_add(l).is_some_and(|end| end <= 2 * 4096)) else {
        log::warn!("KVM_EXIT_IO with {count} elements of {size} bytes at {:#x}: ignored", io.data_offset);
        return;
    };
    // SAFETY: the kernel put `count * size` bytes at `data_offset` inside the
    // vCPU's mapping (KVM_GET_VCPU_MMAP_SIZE covers the PIO page; checked
    // above against the two pages every KVM-like device maps); nothing else uses them until the next run.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
    for element in data.chunks_mut(size.max(1)) {
        f(io.port, element);
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
