//! The checker's own test: every check it makes holds on the host's KVM
//! (where /dev/kvm exists; these machines have one), so a failure on
//! /dev/rkvm in the testbed is rkvm's, not the checker's.

use std::process::Command;

#[test]
fn every_check_passes_on_kvm() {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rkvm-abi-check"))
        .args(["--dev", "/dev/kvm"])
        .output()
        .expect("rkvm-abi-check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.lines().last().is_some_and(|l| l.ends_with(" passed, 0 failed")), "{stdout}");
    assert!(!stdout.contains("not ok"), "{stdout}");
}

#[test]
fn reset_state_dump_names_both_vcpus() {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rkvm-abi-check"))
        .args(["--dev", "/dev/kvm", "--dump-reset-state"])
        .output()
        .expect("rkvm-abi-check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vcpu 0 cs kvm_segment { base: ffff0000"), "{stdout}");
    assert!(stdout.contains("apic_base 0xfee00900"), "{stdout}");
    assert!(stdout.contains("apic_base 0xfee00800"), "{stdout}");
}
