//! `rkvm`: the userspace side of rkvm. It runs guests through any device that
//! speaks KVM's ioctl ABI: `/dev/rkvm` (the rkvm module) or `/dev/kvm`, so
//! the same guest can be compared on both.
//!
//! stdout is the guest's serial console; diagnostics go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod bus;
mod devices;
mod kvm;
mod layout;
mod loader;
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
    /// Run a flat binary guest until it exits through port 0xf4, halts with
    /// interrupts disabled, shuts down or fails to enter.
    ///
    /// Exit status: the guest's debug-exit status as QEMU's isa-debug-exit
    /// gives it ((value << 1) | 1), 0 after HLT with interrupts disabled, 1
    /// for an error (bad input, triple fault, failed VM entry).
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
    /// Guest RAM, e.g. 2M, 64M, 1G (bytes without a suffix).
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
    /// Flat binary to load.
    image: PathBuf,
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

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => vmm::run(&vmm::RunConfig {
            dev: args.dev,
            mem_size: args.mem,
            load: args.load,
            entry: args.entry.unwrap_or(args.load),
            mode: args.mode,
            image: args.image,
        }),
        Command::Info { dev } => kvm::info(&dev).map(|()| 0),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("rkvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
