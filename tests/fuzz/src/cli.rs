//! The command line (see the crate doc in main.rs for what each option
//! means), parsed by hand: eight options do not need a parser crate, and
//! the static testbed build stays small.
//!
//! Context: pure logic.

use std::time::Duration;

/// A phase of the run, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Random ioctls on a pool of objects, one thread.
    Storm,
    /// Threads racing on shared fds, and scripted races.
    Race,
    /// Random guests.
    Guests,
    /// Creating and destroying VMs; killed VMMs.
    Teardown,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 4] = [Phase::Storm, Phase::Race, Phase::Guests, Phase::Teardown];

    /// The name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Storm => "storm",
            Phase::Race => "race",
            Phase::Guests => "guests",
            Phase::Teardown => "teardown",
        }
    }

    /// The index of the phase in `progress::PHASES`.
    pub fn progress_index(self) -> usize {
        self as usize + 1
    }
}

/// The options of a run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The device to open.
    pub dev: String,
    /// The seed of every random choice.
    pub seed: u64,
    /// Random ioctls in total (storm and race).
    pub ioctls: u64,
    /// Random guest runs.
    pub guests: u64,
    /// Threads of the race phase.
    pub threads: usize,
    /// Wall-clock bound of one guest run.
    pub guest_time: Duration,
    /// The phases to run, in order.
    pub phases: Vec<Phase>,
    /// Print findings as they happen, and more progress.
    pub verbose: bool,
    /// Keep every guest's RFLAGS.IF set (see `interrupts_on`).
    pub interrupts_on: bool,
    /// Replay guest run N alone (with the runs of its VM before it) and
    /// print each of its KVM_RUNs.
    pub trace_guest: Option<u64>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// A fuzzing run.
    Fuzz(Options),
    /// `--kill-target VCPUS --dev PATH`: be the VMM that the teardown
    /// phase kills in the middle of KVM_RUN (internal).
    KillTarget {
        /// The device.
        dev: String,
        /// vCPU threads to run.
        vcpus: u32,
        /// Spin with interrupts on.
        interrupts_on: bool,
    },
    /// `--help`.
    Help,
}

/// The usage text.
pub const USAGE: &str =
    "usage: rkvm-fuzz --dev PATH [--seed N] [--ioctls N] [--guests N] [--threads N] \
[--guest-ms MS] [--phases storm,race,guests,teardown] [--interrupts-on] [--trace-guest N] [--verbose]";

fn number<T: std::str::FromStr>(opt: &str, value: Option<&String>) -> Result<T, String> {
    let v = value.ok_or_else(|| format!("{opt} needs a value"))?;
    let v = v.replace('_', "");
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
            .ok()
            .and_then(|n| n.to_string().parse().ok())
    } else {
        v.parse().ok()
    };
    parsed.ok_or_else(|| format!("{opt}: not a number: {v}"))
}

/// Parses the arguments after the program name.
///
/// # Errors
/// A message for the user: an unknown option, a missing or malformed
/// value, or a missing `--dev`.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut dev = None;
    let mut o = Options {
        dev: String::new(),
        seed: 1,
        ioctls: 20_000,
        guests: 500,
        threads: 4,
        guest_time: Duration::from_millis(20),
        phases: Phase::ALL.to_vec(),
        verbose: false,
        interrupts_on: false,
        trace_guest: None,
    };
    let mut kill_target = None;
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].as_str();
        let value = args.get(i + 1);
        i += 2;
        match opt {
            "--dev" => dev = Some(value.ok_or("--dev needs a path")?.clone()),
            "--seed" => o.seed = number(opt, value)?,
            "--ioctls" => o.ioctls = number(opt, value)?,
            "--guests" => o.guests = number(opt, value)?,
            "--threads" => o.threads = number(opt, value)?,
            "--guest-ms" => o.guest_time = Duration::from_millis(number(opt, value)?),
            "--phases" => o.phases = phases(value.ok_or("--phases needs a list")?)?,
            "--kill-target" => kill_target = Some(number(opt, value)?),
            "--trace-guest" => o.trace_guest = Some(number(opt, value)?),
            "--verbose" | "-v" => {
                o.verbose = true;
                i -= 1;
            }
            "--interrupts-on" => {
                o.interrupts_on = true;
                i -= 1;
            }
            "--help" | "-h" => return Ok(Command::Help),
            _ => return Err(format!("unknown option {opt}")),
        }
    }
    let dev = dev.ok_or("--dev PATH is required")?;
    if let Some(vcpus) = kill_target {
        return Ok(Command::KillTarget {
            dev,
            vcpus,
            interrupts_on: o.interrupts_on,
        });
    }
    if o.threads == 0 || o.threads > 64 {
        return Err("--threads must be 1 to 64".into());
    }
    if o.guest_time.is_zero() {
        return Err("--guest-ms must be at least 1".into());
    }
    o.dev = dev;
    Ok(Command::Fuzz(o))
}

/// Whether a guest may run with RFLAGS.IF clear: not with
/// `--interrupts-on`, for a device that cannot take its vCPU back from such
/// a guest (KVM under Bochs: external interrupts there do not exit while the
/// guest's IF is 0, and KVM has no other way back). Then every KVM_SET_REGS
/// and synced register state the fuzzer gives sets IF; guest code and data
/// have none of the instructions that clear IF or lead to code that runs
/// with it clear (`codegen::keep_interrupts_on`); guest memory is filled
/// with HLT around the code and every interrupt handler is a `hlt; jmp $-1`
/// stub; and a run ends at the first exit after the guest wrote over its
/// interrupt tables or stubs (`modes::guarded`), which would send the next
/// interrupt somewhere random with IF clear.
/// HLT, which guest memory is filled with under `--interrupts-on`
/// (`memory::Arena::reserve`).
pub const HLT: u8 = 0xf4;

/// Parses a comma list of phase names; they run in the canonical order.
fn phases(list: &str) -> Result<Vec<Phase>, String> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = Phase::ALL
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("unknown phase {name}"))?;
        if !out.contains(p) {
            out.push(*p);
        }
    }
    if out.is_empty() {
        return Err("--phases names no phase".into());
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn defaults_follow_the_documented_ones() {
        let Ok(Command::Fuzz(o)) = parse(&args("--dev /dev/kvm")) else {
            panic!("parses")
        };
        assert_eq!(o.dev, "/dev/kvm");
        assert_eq!((o.seed, o.ioctls, o.guests, o.threads), (1, 20_000, 500, 4));
        assert_eq!(o.guest_time, Duration::from_millis(20));
        assert_eq!(o.phases, Phase::ALL.to_vec());
        assert!(!o.verbose);
        assert!(!o.interrupts_on);
        assert_eq!(o.trace_guest, None);
    }

    #[test]
    fn every_option_is_read() {
        let a = args("--seed 0x10 --ioctls 5 --guests 6 --threads 2 --guest-ms 7 --verbose --phases guests,storm --interrupts-on --trace-guest 1404 --dev d");
        let Ok(Command::Fuzz(o)) = parse(&a) else {
            panic!("parses")
        };
        assert_eq!((o.seed, o.ioctls, o.guests, o.threads), (16, 5, 6, 2));
        assert_eq!(o.guest_time, Duration::from_millis(7));
        assert_eq!(o.phases, vec![Phase::Storm, Phase::Guests]);
        assert!(o.verbose);
        assert!(o.interrupts_on);
        assert_eq!(o.trace_guest, Some(1404));
    }

    #[test]
    fn mistakes_are_usage_errors() {
        for bad in [
            "",
            "--dev",
            "--dev d --seed",
            "--dev d --seed x",
            "--dev d --bogus 1",
            "--dev d --phases storm,nope",
            "--dev d --threads 0",
            "--dev d --guest-ms 0",
            "--dev d --phases ,",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_kill_target_is_internal_but_parsed() {
        let Ok(Command::KillTarget { dev, vcpus, .. }) =
            parse(&args("--kill-target 2 --dev /dev/kvm"))
        else {
            panic!("parses")
        };
        assert_eq!((dev.as_str(), vcpus), ("/dev/kvm", 2));
        let Ok(Command::KillTarget { interrupts_on, .. }) =
            parse(&args("--kill-target 1 --interrupts-on --dev /dev/kvm"))
        else {
            panic!("parses")
        };
        assert!(interrupts_on, "the kill target spins as its parent fuzzes");
    }
}
