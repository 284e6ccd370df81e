//! The `rkvm` binary end to end: payloads from `rkvm-payloads` run on the
//! host's /dev/kvm (where it exists; these machines have one), and bad input
//! gives a one-line error and exit status 1. The same payloads run on
//! /dev/rkvm in the testbed.

use std::path::PathBuf;
use std::process::{Command, Output};

fn rkvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rkvm")).args(args).output().expect("rkvm runs")
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        eprintln!("skipped: /dev/kvm is not usable here");
    }
    ok
}

fn write_payload(p: rkvm_payloads::Payload) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rkvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(p.name);
    std::fs::write(&path, &p.image).unwrap();
    path
}

fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "exit status");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("rkvm: error: "), "{err}");
    err
}

#[test]
fn hello_real_prints_on_com1_and_halts_with_status_0() {
    if !kvm_available() {
        return;
    }
    let image = write_payload(rkvm_payloads::hello_real());
    let out = rkvm(&["run", "--dev", "/dev/kvm", image.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from real mode!\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn debug_exit_status_becomes_the_exit_code_as_in_qemu() {
    if !kvm_available() {
        return;
    }
    let image = write_payload(rkvm_payloads::exit_status_real());
    let out = rkvm(&["run", "--dev", "/dev/kvm", image.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exiting with 0x21\n");
    assert_eq!(out.status.code(), Some((0x21 << 1) | 1));
}

#[test]
fn port_io_of_every_size_reads_all_ones_and_the_uart_status() {
    if !kvm_available() {
        return;
    }
    let image = write_payload(rkvm_payloads::io_real());
    let out = rkvm(&["run", "--dev", "/dev/kvm", image.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000000FF\n0000FFFF\nFFFFFFFF\n00000060\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn protected_and_long_mode_guests_print_and_halt() {
    if !kvm_available() {
        return;
    }
    for (payload, mode, text) in [
        (rkvm_payloads::hello_protected(), "protected", "Hello from protected mode!\n"),
        (rkvm_payloads::hello_long(), "long", "Hello from long mode!\n"),
    ] {
        let image = write_payload(payload);
        let out = rkvm(&["run", "--dev", "/dev/kvm", "--mode", mode, image.to_str().unwrap()]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), text, "{mode}");
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn an_image_over_the_page_tables_is_refused() {
    let image = write_payload(rkvm_payloads::hello_long());
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--mode", "long", "--load", "0x90000", image.to_str().unwrap()]);
    assert!(one_line_error(&out).contains("overlaps"));
}

#[test]
fn missing_image_is_a_one_line_error() {
    let out = rkvm(&["run", "--dev", "/dev/kvm", "/nonexistent/guest.bin"]);
    assert!(one_line_error(&out).contains("cannot read image /nonexistent/guest.bin"));
}

#[test]
fn image_larger_than_ram_is_refused() {
    let dir = std::env::temp_dir().join(format!("rkvm-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![0xf4u8; 128 << 10]).unwrap();
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--mem", "64K", big.to_str().unwrap()]);
    assert!(one_line_error(&out).contains("does not fit in guest RAM"));
}

#[test]
fn too_little_memory_and_bad_entry_are_refused() {
    let image = write_payload(rkvm_payloads::hello_real());
    let img = image.to_str().unwrap();
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--mem", "4K", img]);
    assert!(one_line_error(&out).contains("at least 64 KiB"));
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--entry", "0x900000", img]);
    assert!(one_line_error(&out).contains("outside guest RAM"));
}

#[test]
fn a_device_that_is_not_kvm_is_named() {
    let image = write_payload(rkvm_payloads::hello_real());
    let out = rkvm(&["run", "--dev", "/dev/null", image.to_str().unwrap()]);
    assert!(one_line_error(&out).contains("/dev/null does not speak the KVM API"));
}
