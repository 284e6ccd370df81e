//! Process-wide progress counters: ioctls issued, guest runs, distinct
//! findings, the seed and the phase. They exist for the two reports that
//! cannot wait for the threads' tallies: the watchdog giving up on a hang,
//! and the fault handler (`fault.rs`), which may only read atomics.
//!
//! Context: any thread, and signal handlers (atomics only).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

static SEED: AtomicU64 = AtomicU64::new(0);
static IOCTLS: AtomicU64 = AtomicU64::new(0);
static GUEST_RUNS: AtomicU64 = AtomicU64::new(0);
static FINDINGS: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicUsize = AtomicUsize::new(0);

/// The phase names, by the index [`set_phase`] takes.
pub const PHASES: [&str; 5] = ["setup", "storm", "race", "guests", "teardown"];

/// Records the seed.
pub fn set_seed(seed: u64) {
    SEED.store(seed, Relaxed);
}

/// The seed.
pub fn seed() -> u64 {
    SEED.load(Relaxed)
}

/// Records that phase `index` (into [`PHASES`]) has begun.
pub fn set_phase(index: usize) {
    PHASE.store(index, Relaxed);
}

/// The name of the current phase.
pub fn phase() -> &'static str {
    PHASES.get(PHASE.load(Relaxed)).copied().unwrap_or("?")
}

/// Counts one ioctl.
pub fn ioctl() {
    IOCTLS.fetch_add(1, Relaxed);
}

/// Ioctls issued so far.
pub fn ioctls() -> u64 {
    IOCTLS.load(Relaxed)
}

/// Counts one guest run.
pub fn guest_run() {
    GUEST_RUNS.fetch_add(1, Relaxed);
}

/// Guest runs so far.
pub fn guest_runs() -> u64 {
    GUEST_RUNS.load(Relaxed)
}

/// Records that there are now `n` distinct findings.
pub fn found(n: u64) {
    FINDINGS.store(n, Relaxed);
}

/// Distinct findings so far.
pub fn findings() -> u64 {
    FINDINGS.load(Relaxed)
}

/// The report's first line: "rkvm-fuzz: seed S: I ioctls, G guest runs,
/// F findings".
pub fn headline(seed: u64, ioctls: u64, guest_runs: u64, findings: u64) -> String {
    format!("rkvm-fuzz: seed {seed}: {ioctls} ioctls, {guest_runs} guest runs, {findings} findings")
}

/// The report's last line.
pub fn verdict(findings: u64) -> String {
    if findings == 0 {
        "rkvm-fuzz: PASS".to_string()
    } else {
        format!("rkvm-fuzz: FAIL ({findings} findings)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lines_are_greppable() {
        assert_eq!(
            headline(1, 20000, 500, 0),
            "rkvm-fuzz: seed 1: 20000 ioctls, 500 guest runs, 0 findings"
        );
        assert_eq!(verdict(0), "rkvm-fuzz: PASS");
        assert_eq!(verdict(3), "rkvm-fuzz: FAIL (3 findings)");
    }
}
