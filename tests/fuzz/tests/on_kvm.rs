//! The fuzzer's own test on the host's KVM (where /dev/kvm exists; these
//! machines have one): a short run of every phase finds nothing there, so
//! a finding on /dev/rkvm in the testbed is rkvm's, not the fuzzer's; and
//! the report keeps its greppable first and last lines.

use std::process::Command;

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[test]
fn a_short_run_passes_on_kvm() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rkvm-fuzz"))
        .args([
            "--dev",
            "/dev/kvm",
            "--seed",
            "1",
            "--ioctls",
            "4000",
            "--guests",
            "100",
            "--threads",
            "2",
        ])
        .output()
        .expect("rkvm-fuzz runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(out.status.success(), "{stdout}");
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("rkvm-fuzz: seed 1: ")
                && l.ends_with(" 100 guest runs, 0 findings")),
        "{stdout}"
    );
    assert_eq!(lines.last(), Some(&"rkvm-fuzz: PASS"), "{stdout}");
}

#[test]
fn a_device_that_cannot_be_opened_is_exit_status_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_rkvm-fuzz"))
        .args(["--dev", "/nonexistent/kvm"])
        .output()
        .expect("rkvm-fuzz runs");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_rkvm-fuzz"))
        .args(["--bogus"])
        .output()
        .expect("rkvm-fuzz runs");
    assert_eq!(out.status.code(), Some(2));
}
