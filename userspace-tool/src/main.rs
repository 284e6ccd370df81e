//! `rkvm`: the userspace side of rkvm. It runs guests through any device that
//! speaks KVM's ioctl ABI: `/dev/rkvm` (the rkvm module) or `/dev/kvm`, so
//! the same guest can be compared on both.
//!
//! stdout is the guest's serial console; diagnostics go to stderr.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use status::Failed;

mod bus;
mod console;
mod devices;
mod kick;
mod kvm;
mod layout;
mod linux;
mod loader;
mod mptable;
mod multiboot;
mod platform;
mod runner;
mod status;
mod step;
mod vmm;

/// Command-line interface.
#[derive(Parser)]
#[command(
    name = "rkvm",
    version,
    about = "Run guests on /dev/rkvm (or /dev/kvm) through the KVM ioctl ABI",
    after_help = "Environment: RKVM_LOG=debug logs every access to an unclaimed port or MMIO address on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest until it exits through port 0xf4, halts with interrupts
    /// disabled, shuts down or fails to enter.
    ///
    /// The guest is a flat binary (IMAGE), entered at --entry in --mode, or
    /// a Multiboot v1 kernel (--kernel), loaded as QEMU's -kernel loads it:
    /// ELF32 segments at their physical addresses (or the header's address
    /// fields), --initrd files as modules at page boundaries after it, the
    /// command line "KERNEL ARGS", and entry in 32-bit protected mode with
    /// EAX = 0x2BADB002 and EBX = the Multiboot information (at 0x9000).
    ///
    /// Devices: COM1 (0x3f8, on stdout), isa-debug-exit (0xf4), the PICs'
    /// masks (0x20, 0xa0), POST codes (0x80), PCI configuration with no
    /// devices (0xcf8), fw_cfg (0x510) and the local APIC's registers
    /// (0xfee00000). Other ports and addresses read as all ones.
    ///
    /// Exit status: 0 when the guest ends normally (HLT with interrupts
    /// disabled, power-off, reset); odd when it writes V to isa-debug-exit,
    /// (V << 1) | 1 as QEMU gives it; even for failures: 2 bad command line
    /// or input, 4 the device or an ioctl failed, 6 the guest shut down
    /// (triple fault), 8 VM entry failed, 10 internal error or unhandled
    /// exit.
    Run(RunArgs),
    /// Show what a KVM-like device offers: API version and capabilities.
    Info {
        /// The device to open.
        #[arg(long, default_value = "/dev/rkvm")]
        dev: PathBuf,
    },
}

/// CPU mode the guest starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// 16-bit real mode (CS:IP from the entry address, which must be below
    /// 1 MiB).
    Real,
    /// 32-bit protected mode, flat 4 GiB segments from a GDT, paging off.
    Protected,
    /// 64-bit long mode, the first GiB identity-mapped with 2 MiB pages.
    Long,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The KVM-like device: /dev/rkvm or /dev/kvm.
    #[arg(long, default_value = "/dev/rkvm")]
    dev: PathBuf,
    /// Guest RAM, e.g. 2M, 64M, 1G (bytes without a suffix). A Multiboot
    /// kernel needs more than 1 MiB, and room above it for its modules.
    #[arg(long, default_value = "2M", value_parser = loader::parse_size)]
    mem: u64,
    /// CPU mode the guest starts in.
    #[arg(long, value_enum, default_value = "real")]
    mode: Mode,
    /// Guest-physical address where IMAGE is loaded.
    #[arg(long, default_value = "0x1000", value_parser = loader::parse_addr)]
    load: u64,
    /// Guest-physical address of the first instruction (default: --load).
    #[arg(long, value_parser = loader::parse_addr)]
    entry: Option<u64>,
    /// Kernel to boot instead of a flat IMAGE: a Linux bzImage (64-bit boot
    /// protocol) or a Multiboot v1 kernel, told apart by their headers.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["image", "mode", "load", "entry"])]
    kernel: Option<PathBuf>,
    /// Linux: the initrd. Multiboot: modules, in order (comma-separated, or
    /// --initrd repeated); each module's string is its file name as given.
    #[arg(long, value_name = "FILE[,FILE...]", value_delimiter = ',', requires = "kernel", conflicts_with = "image")]
    initrd: Vec<PathBuf>,
    /// The kernel command line (Multiboot: after the kernel's name).
    #[arg(long, value_name = "ARGS", requires = "kernel", conflicts_with = "image")]
    append: Option<OsString>,
    /// Single-step the first N instructions, printing each one's address on
    /// stderr ("step 1: rip 0x00001000"), then run normally. A HLT is the
    /// last line: it runs unstepped, so that it halts. The lines are the
    /// steps the device reports (some fold an OUT into the next step).
    #[arg(long, value_name = "N", default_value_t = 0)]
    debug_step: u64,
    /// A disk for the guest: virtio-blk over virtio-mmio at 0xd0000000,
    /// IRQ 5, backed by the raw image FILE (announced on a Linux kernel's
    /// command line). `,ro` makes it read-only: the file is opened
    /// read-only and guest writes fail.
    #[arg(long, value_name = "FILE[,ro]", value_parser = parse_disk)]
    disk: Option<DiskArg>,
    /// When the guest ends, print the vCPU's exits by reason (from the
    /// device's KVM_GET_STATS_FD) and the accesses each of the tool's
    /// devices handled, on stderr.
    #[arg(long)]
    stats: bool,
    /// Flat binary to load.
    #[arg(required_unless_present = "kernel")]
    image: Option<PathBuf>,
}

/// `--disk FILE[,ro]`.
#[derive(Clone, Debug)]
struct DiskArg {
    path: PathBuf,
    read_only: bool,
}

fn parse_disk(arg: &str) -> Result<DiskArg, String> {
    let (path, read_only) = match arg.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((_, other)) => return Err(format!("unknown disk option {other:?} (only \"ro\")")),
        None => (arg, false),
    };
    if path.is_empty() {
        return Err("no disk image file named".into());
    }
    Ok(DiskArg { path: PathBuf::from(path), read_only })
}

/// Diagnostics on stderr, at the level RKVM_LOG names (error, warn, info,
/// debug, trace; default warn). stdout stays the guest's console.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("rkvm: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }

    fn flush(&self) {}
}

fn init_logging() {
    let level = std::env::var("RKVM_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}

/// A bzImage boot: one initrd at most, and a UTF-8 command line.
fn linux_guest(kernel: PathBuf, initrd: Vec<PathBuf>, append: Option<OsString>) -> anyhow::Result<vmm::Guest> {
    if initrd.len() > 1 {
        anyhow::bail!("--initrd: a Linux kernel takes one initrd, not {}", initrd.len());
    }
    let cmdline = match append {
        Some(a) => a.into_string().map_err(|a| anyhow::anyhow!("--append {a:?}: not UTF-8"))?,
        None => String::new(),
    };
    Ok(vmm::Guest::Linux { kernel, initrd: initrd.into_iter().next(), cmdline })
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Info { dev } => kvm::info(&dev).map(|()| 0).map_err(Failed::device),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failed) => {
            eprintln!("rkvm: error: {failed}");
            ExitCode::from(failed.failure.status())
        }
    }
}

/// `rkvm run`.
fn run(args: RunArgs) -> Result<u8, Failed> {
    let guest = match (args.kernel, args.image) {
        // A file that cannot be read is reported by the Multiboot loader,
        // which names it.
        (Some(kernel), _) => match linux::is_bzimage(&kernel) {
            Ok(true) => linux_guest(kernel, args.initrd, args.append).map_err(Failed::input)?,
            Ok(false) | Err(_) => vmm::Guest::Multiboot { kernel, modules: args.initrd, args: args.append.unwrap_or_default() },
        },
        (None, Some(image)) => vmm::Guest::Flat { image, mode: args.mode, load: args.load, entry: args.entry.unwrap_or(args.load) },
        (None, None) => unreachable!("clap requires IMAGE without --kernel"),
    };
    vmm::run(&vmm::RunConfig {
        dev: args.dev,
        mem_size: args.mem,
        guest,
        debug_step: args.debug_step,
        disk: args.disk.map(|d| (d.path, d.read_only)),
        stats: args.stats,
    })
}
