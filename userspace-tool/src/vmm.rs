//! Creating a VM with one vCPU, loading a flat image or a Multiboot
//! kernel, and the run loop that hands port I/O and MMIO to the devices
//! until the guest stops.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::apic::APIC_BASE;
use crate::devices::virtio_blk::VirtioBlk;
use crate::platform::Platform;
use crate::multiboot::{self, Boot};
use crate::step::Stepper;
use crate::status::Failed;
use crate::{kvm, layout, linux, loader, mptable, runner, Mode};

/// RFLAGS bit 1 is reserved and always 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// CPUID.1:ECX bit 5: VMX.
const CPUID1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 21: x2APIC; bit 24: TSC-deadline timer (an APIC mode).
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 9: on-chip local APIC.
const CPUID1_EDX_APIC: u32 = 1 << 9;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// IA32_APIC_BASE bit 8: this is the bootstrap processor; bit 11: APIC
/// globally enabled.
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_ENABLE: u64 = 1 << 11;
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
    /// A disk image for virtio-blk, and whether it is read-only.
    pub disk: Option<(PathBuf, bool)>,
    /// Print exit statistics when the guest ends.
    pub stats: bool,
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
    /// A Linux bzImage, booted through the 64-bit boot protocol.
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// The initrd, if any.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
}

/// A guest whose files have been read and checked, before RAM exists.
enum Prepared<'a> {
    Flat { image: &'a Path, mode: Mode, load: u64, entry: u64 },
    Multiboot(Boot),
    Linux { kernel: &'a Path, initrd: Option<&'a Path>, cmdline: &'a str },
}

/// CPU state at the first instruction.
enum Start {
    /// Real mode at `entry`.
    Real(u64),
    /// Protected or long mode with flat segments, and these registers.
    Flat(Mode, kvm_regs),
    /// 64-bit mode as the Linux boot protocol wants it.
    Linux(linux::LinuxBoot),
}

/// Runs the guest; returns the process exit status (see `status.rs`).
///
/// # Errors
/// [`Failed`]: bad input (nothing was created), or a device that cannot be
/// opened or fails an ioctl.
pub fn run(cfg: &RunConfig) -> Result<u8, Failed> {
    // Guest memory first, so that it outlives the VM that maps it.
    let (mem, start, disk) = prepare(cfg).map_err(Failed::input)?;
    run_prepared(cfg, &mem, start, disk).map_err(Failed::device)
}

/// Reads and checks every input and lays the guest out in its RAM, before
/// any device is opened.
fn prepare(cfg: &RunConfig) -> Result<(GuestMemoryMmap<()>, Start, Option<VirtioBlk>)> {
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
        Guest::Linux { kernel, initrd, cmdline } => {
            Prepared::Linux { kernel, initrd: initrd.as_deref(), cmdline }
        }
    };
    // The disk is opened before anything else exists, so a bad path is a
    // one-line error with nothing created.
    let disk = match &cfg.disk {
        Some((path, read_only)) => Some(VirtioBlk::open(path, *read_only)?),
        None => None,
    };
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
        Prepared::Linux { kernel, initrd, cmdline } => {
            // "noapic": this PC has a local APIC but no I/O APIC, and the
            // 8259A's interrupts come through LINT0. Unless told so, a 64-bit
            // Linux that finds an MP table sets LINT0 up masked, expecting an
            // I/O APIC to carry the ISA interrupts (setup_local_APIC in
            // arch/x86/kernel/apic/apic.c keeps ExtINT open only in PIC mode
            // or with the I/O APIC disabled), and the console, the disk and
            // the reset controller would never interrupt.
            let mut cmdline = format!("noapic {cmdline}");
            if disk.is_some() {
                cmdline = format!("{cmdline} {}", Platform::disk_cmdline());
            }
            let boot = linux::load(&mem, cfg.mem_size, kernel, initrd, cmdline.trim())?;
            mptable::write(&mem)?;
            write_system_tables(&mem, Mode::Long)?;
            for (i, entry) in linux::gdt().iter().enumerate() {
                mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + 8 * i as u64)).context("writing the GDT")?;
            }
            Start::Linux(boot)
        }
    };

    Ok((mem, start, disk))
}

/// Creates the VM and runs the prepared guest.
fn run_prepared(cfg: &RunConfig, mem: &GuestMemoryMmap<()>, start: Start, disk: Option<VirtioBlk>) -> Result<u8> {
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
    // SAFETY: `mem` maps `memory_size` bytes at `host_addr` and is borrowed
    // from the caller, so it is unmapped only after the VM, which this
    // function owns, is gone.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    // Linux guests get the tool's local APIC (its timer is their clock-event
    // device; the PIC's interrupts come through LINT0) and an MP table that
    // tells Linux to use it, and the console. Other guests see no APIC and
    // use the PICs.
    let linux = matches!(cfg.guest, Guest::Linux { .. });
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID failed")?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = guest_cpuid(supported.as_slice(), tsc_khz, linux)?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2 failed")?;
    match start {
        Start::Real(entry) => enter_real_mode(&vcpu, entry)?,
        Start::Flat(mode, regs) => enter_flat_mode(&vcpu, mode, &regs)?,
        Start::Linux(boot) => enter_linux(&vcpu, &boot)?,
    }

    // The APIC timer counts the crystal clock leaf 15H announces.
    let apic_timer_hz = linux.then(|| tsc_khz.map_or(1_000_000_000, |khz| u64::from(khz) * 1000));
    let mut platform = Platform::new(mem, cfg.mem_size, disk, apic_timer_hz)?;
    let mut stepper = Stepper::new(cfg.debug_step, mem);
    stepper.start(&vcpu)?;
    let result = runner::run(&mut vcpu, &mut platform, &mut stepper, linux);
    if cfg.stats {
        print_stats(&vcpu, &platform);
    }
    let outcome = result?;
    if let Some(message) = outcome.message {
        eprintln!("rkvm: {message}");
    }
    Ok(outcome.status)
}

/// `--stats`: the device's exit counts for the vCPU, then the accesses the
/// tool's devices handled, on stderr.
fn print_stats(vcpu: &VcpuFd, platform: &Platform) {
    eprintln!("rkvm: exits (KVM_GET_STATS_FD of the vCPU):");
    match runner::exit_stats(vcpu) {
        Ok(stats) => {
            for (name, value) in stats {
                eprintln!("  {name:<40} {value:>12}");
            }
        }
        Err(e) => eprintln!("  unavailable: {e:#}"),
    }
    eprintln!("rkvm: accesses handled by the tool's devices:");
    for (bus, counts) in [("port", platform.pio.accesses()), ("mmio", platform.mmio.accesses())] {
        for (name, n) in counts {
            eprintln!("  {bus} {name:<35} {n:>12}");
        }
    }
}

/// CPUID.06H:EAX bit 2: ARAT, the APIC timer runs in every C-state.
const CPUID6_EAX_ARAT: u32 = 1 << 2;
/// CPUID leaf 15H, "Time Stamp Counter and Nominal Core Crystal Clock".
const TSC_LEAF: u32 = 0x15;

/// The guest's CPUID: what the device supports, adjusted as QEMU does for a
/// guest without nested virtualization (VMX hidden, the hypervisor bit set;
/// KVM refuses long mode to a vCPU whose CPUID lacks it, so nothing is made
/// up from scratch). x2APIC and the TSC-deadline timer are hidden: the
/// tool's APIC is an xAPIC with a count-down timer.
///
/// - With `local_apic`, the APIC bit stays and ARAT is set: the tool's APIC
///   timer never stops, and without ARAT Linux rates it below the PIT
///   (apic.c, setup_APIC_timer) and keeps waking every 27 ms, the PIT's
///   longest one-shot. Without it the APIC bit is cleared and a guest uses
///   the 8259A PICs (as with QEMU's `-cpu ...,-apic`).
/// - With `tsc_khz`, leaf 15H says the TSC runs at that frequency, from a
///   crystal of that frequency (1:1), which is also the APIC timer's input
///   clock (SDM Vol. 3A, 11.5.4). Without it a Linux guest calibrates the
///   TSC and the APIC timer against the PIT, which needs port reads far
///   faster than VM exits to the VMM are (under an emulator it fails and
///   Linux falls back to jiffies, with a periodic tick).
fn guest_cpuid(
    supported: &[kvm_bindings::kvm_cpuid_entry2],
    tsc_khz: Option<u32>,
    local_apic: bool,
) -> Result<kvm_bindings::CpuId> {
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(tsc_khz.is_some() && e.function == TSC_LEAF))
        .copied()
        .collect();
    let max_basic = if tsc_khz.is_some() { TSC_LEAF } else { 6 };
    for entry in &mut entries {
        match entry.function {
            0 if local_apic || tsc_khz.is_some() => entry.eax = entry.eax.max(max_basic),
            1 => {
                entry.ecx = (entry.ecx & !CPUID1_ECX_VMX & !CPUID1_ECX_X2APIC & !CPUID1_ECX_TSC_DEADLINE)
                    | CPUID1_ECX_HYPERVISOR;
                // The APIC is the tool's own device, whatever the device says.
                if local_apic {
                    entry.edx |= CPUID1_EDX_APIC;
                } else {
                    entry.edx &= !CPUID1_EDX_APIC;
                }
            }
            6 if local_apic => entry.eax |= CPUID6_EAX_ARAT,
            _ => {}
        }
    }
    if local_apic && !entries.iter().any(|e| e.function == 6) {
        entries.push(kvm_bindings::kvm_cpuid_entry2 { function: 6, eax: CPUID6_EAX_ARAT, ..Default::default() });
    }
    if let Some(khz) = tsc_khz {
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: TSC_LEAF,
            eax: 1,
            ebx: 1,
            ecx: khz.saturating_mul(1000),
            ..Default::default()
        });
    }
    kvm_bindings::CpuId::from_entries(&entries).map_err(|e| anyhow::anyhow!("CPUID table: {e:?}"))
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

/// The 64-bit boot protocol's state: long mode with the identity map, CS
/// and DS/ES/SS from the boot GDT (__BOOT_CS, __BOOT_DS), interrupts off,
/// RSI = the zero page.
fn enter_linux(vcpu: &VcpuFd, boot: &linux::LinuxBoot) -> Result<()> {
    let regs = kvm_regs {
        rip: boot.entry,
        rsi: boot.boot_params,
        rsp: linux::BOOT_STACK,
        rbp: linux::BOOT_STACK,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
    enter_flat_mode(vcpu, Mode::Long, &regs)?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    let data = flat_segment(linux::BOOT_DS, false, true);
    sregs.cs = flat_segment(linux::BOOT_CS, true, true);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.limit = (8 * linux::gdt().len() - 1) as u16;
    // IA32_APIC_BASE as firmware leaves it for the bootstrap processor (SDM
    // Vol. 3A, 11.4.4): enabled, BSP flag set, at the default address. KVM
    // without an in-kernel APIC takes the value as given; a Linux guest
    // that finds the BSP flag clear warns of a firmware bug.
    sregs.apic_base = APIC_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(table: &kvm_bindings::CpuId, function: u32) -> Option<kvm_cpuid_entry2> {
        table.as_slice().iter().find(|e| e.function == function).copied()
    }

    /// A device's supported CPUID: max basic leaf 0xd, VMX, x2APIC, the
    /// TSC-deadline timer and the APIC offered, no leaf 6.
    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 { function: 0, eax: 0xd, ..Default::default() },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: CPUID1_ECX_VMX | CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE | 1,
                edx: CPUID1_EDX_APIC | 1,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn a_linux_guest_gets_an_xapic_with_arat_and_the_crystal_leaf() {
        let cpuid = guest_cpuid(&supported(), Some(2_000_000), true).unwrap();
        let one = leaf(&cpuid, 1).unwrap();
        assert_eq!(one.edx, CPUID1_EDX_APIC | 1);
        assert_eq!(one.ecx, CPUID1_ECX_HYPERVISOR | 1, "VMX, x2APIC and TSC-deadline hidden");
        assert_eq!(leaf(&cpuid, 6).unwrap().eax, CPUID6_EAX_ARAT);
        let crystal = leaf(&cpuid, TSC_LEAF).unwrap();
        assert_eq!((crystal.eax, crystal.ebx, crystal.ecx), (1, 1, 2_000_000_000));
        assert_eq!(leaf(&cpuid, 0).unwrap().eax, TSC_LEAF);
        let mut without_apic = supported();
        without_apic[1].edx = 1;
        let cpuid = guest_cpuid(&without_apic, None, true).unwrap();
        assert_eq!(leaf(&cpuid, 1).unwrap().edx, CPUID1_EDX_APIC | 1, "the tool's APIC is announced anyway");
    }

    #[test]
    fn other_guests_see_no_apic_and_no_arat() {
        let cpuid = guest_cpuid(&supported(), None, false).unwrap();
        assert_eq!(leaf(&cpuid, 1).unwrap().edx, 1);
        assert!(leaf(&cpuid, 6).is_none());
        assert!(leaf(&cpuid, TSC_LEAF).is_none());
        assert_eq!(leaf(&cpuid, 0).unwrap().eax, 0xd, "the maximum leaf is left alone");
    }

    #[test]
    fn an_existing_leaf_6_keeps_its_bits_and_gains_arat() {
        let mut table = supported();
        table.push(kvm_cpuid_entry2 { function: 6, eax: 1, ecx: 8, ..Default::default() });
        let cpuid = guest_cpuid(&table, None, true).unwrap();
        let six = leaf(&cpuid, 6).unwrap();
        assert_eq!((six.eax, six.ecx), (1 | CPUID6_EAX_ARAT, 8));
        assert_eq!(cpuid.as_slice().iter().filter(|e| e.function == 6).count(), 1);
    }
}
