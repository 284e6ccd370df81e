//! The `rkvm` binary end to end: payloads from `rkvm-payloads` run on the
//! host's /dev/kvm (where it exists; these machines have one), and bad input
//! gives a one-line error and exit status 2 (a device failure 4). The same payloads run on
//! /dev/rkvm in the testbed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// Bad input: one line on stderr, exit status 2, no guest output.
fn one_line_error(out: &Output) -> String {
    one_line_error_with_status(out, 2)
}

fn one_line_error_with_status(out: &Output, status: i32) -> String {
    assert_eq!(out.status.code(), Some(status), "exit status; stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("rkvm: error: "), "{err}");
    assert!(out.stdout.is_empty(), "no guest ran: {err}");
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
    // A device failure, not bad input: status 4 (status.rs).
    assert!(one_line_error_with_status(&out, 4).contains("/dev/null does not speak the KVM API"));
}

#[test]
fn debug_step_traces_the_first_instructions_then_runs_on() {
    if !kvm_available() {
        return;
    }
    let image = write_payload(rkvm_payloads::hello_real());
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--debug-step", "5", image.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from real mode!\n");
    assert_eq!(out.status.code(), Some(0));
    // xor ax, ax; mov ds, ax; mov si, imm16; mov dx, imm16; cld
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "step 1: rip 0x00001000\nstep 2: rip 0x00001002\nstep 3: rip 0x00001004\n\
         step 4: rip 0x00001007\nstep 5: rip 0x0000100a\n"
    );
}

#[test]
fn debug_step_through_a_whole_guest_ends_at_its_hlt() {
    if !kvm_available() {
        return;
    }
    let image = write_payload(rkvm_payloads::hello_protected());
    let out =
        rkvm(&["run", "--dev", "/dev/kvm", "--mode", "protected", "--debug-step", "100000", image.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from protected mode!\n");
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("step {}: rip 0x000010", i + 1)), "{line}");
    }
    // Three instructions, five per character (lodsb; test; jz; out; jmp),
    // three to leave the loop, cli, hlt; or four per character where the
    // device reports no step for an OUT handled by the VMM (kvm_pvm).
    let chars = "Hello from protected mode!\n".len();
    let steps = [3 + 5 * chars + 3 + 2, 3 + 4 * chars + 3 + 2];
    assert!(steps.contains(&lines.len()), "{} lines: {err}", lines.len());
    assert_eq!(lines.last().unwrap().split(": ").nth(1), Some("rip 0x00001013"), "the last is the HLT");
}

/// A tiny x86 assembler: bytes, labels and jumps to labels.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    /// (offset of a rel32 field, target label)
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.code.len());
        self
    }
    /// A jump with a 32-bit displacement: `opcode` is E9 (jmp) or 0F 8x.
    fn jump(&mut self, opcode: &[u8], target: &'static str) -> &mut Self {
        self.emit(opcode);
        self.fixups.push((self.code.len(), target));
        self.emit(&[0; 4])
    }
    fn finish(&mut self) -> Vec<u8> {
        for &(at, target) in &self.fixups {
            let rel = self.labels[target] as i32 - (at as i32 + 4);
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code.clone()
    }
}

const JNE: &[u8] = &[0x0f, 0x85];
const JZ: &[u8] = &[0x0f, 0x84];
const JMP: &[u8] = &[0xe9];

/// Prints the NUL-terminated string at ESI on COM1 (DX = 0x3f8), then a
/// newline. `name` keeps the labels apart.
fn print_string(a: &mut Asm, next: &'static str, done: &'static str) {
    a.label(next)
        .emit(&[0xac]) // lodsb
        .emit(&[0x84, 0xc0]) // test al, al
        .jump(JZ, done)
        .emit(&[0xee]) // out dx, al
        .jump(JMP, next)
        .label(done)
        .emit(&[0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
}

/// A Multiboot ELF32 kernel loaded and entered at 1 MiB. It checks EAX
/// (0x2BADB002) and the information's flags (cmdline, mods, mmap), prints
/// the command line, the one module's contents (REP OUTSB) and string, and
/// exits through isa-debug-exit with 0x10 (status 0x21); any failed check
/// exits with 1 (status 3).
fn multiboot_kernel() -> Vec<u8> {
    let mut a = Asm::default();
    a.emit(&[0x3d, 0x02, 0xb0, 0xad, 0x2b]) // cmp eax, 0x2badb002
        .jump(JNE, "fail")
        .emit(&[0x8b, 0x03]) // mov eax, [ebx]
        .emit(&[0x83, 0xe0, 0x4c]) // and eax, 0x4c
        .emit(&[0x83, 0xf8, 0x4c]) // cmp eax, 0x4c
        .jump(JNE, "fail")
        .emit(&[0x66, 0xba, 0xf8, 0x03]) // mov dx, 0x3f8
        .emit(&[0x8b, 0x73, 0x10]); // mov esi, [ebx + 16]: cmdline
    print_string(&mut a, "cmdline", "cmdline_done");
    a.emit(&[0x83, 0x7b, 0x14, 0x01]) // cmp dword [ebx + 20], 1: mods_count
        .jump(JNE, "fail")
        .emit(&[0x8b, 0x7b, 0x18]) // mov edi, [ebx + 24]: mods_addr
        .emit(&[0x8b, 0x37]) // mov esi, [edi]: mod_start
        .emit(&[0x8b, 0x4f, 0x04]) // mov ecx, [edi + 4]: mod_end
        .emit(&[0xf7, 0xc6, 0xff, 0x0f, 0x00, 0x00]) // test esi, 0xfff
        .jump(JNE, "fail")
        .emit(&[0x29, 0xf1]) // sub ecx, esi
        .emit(&[0xfc, 0xf3, 0x6e]) // cld; rep outsb
        .emit(&[0x8b, 0x77, 0x08]); // mov esi, [edi + 8]: the module's string
    print_string(&mut a, "string", "string_done");
    a.emit(&[0xb0, 0x10, 0xe6, 0xf4]) // mov al, 0x10; out 0xf4, al
        .label("fail")
        .emit(&[0xb0, 0x01, 0xe6, 0xf4]) // mov al, 1; out 0xf4, al
        .emit(&[0xfa, 0xf4]); // cli; hlt
    multiboot_elf(&a.finish(), 0x10_0000)
}

/// An ELF32 i386 executable with one PT_LOAD segment, `code` at `addr`
/// (also the entry point), after the ELF header, the program header and
/// the Multiboot header (flags 0).
fn multiboot_elf(code: &[u8], addr: u32) -> Vec<u8> {
    let code_offset = 52 + 32 + 12;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x01\x01\x01");
    out.resize(16, 0);
    for half in [2u16, 3] {
        out.extend_from_slice(&half.to_le_bytes()); // ET_EXEC, EM_386
    }
    for word in [1u32, addr, 52, 0, 0] {
        out.extend_from_slice(&word.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for half in [52u16, 32, 1, 40, 0, 0] {
        out.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let size = code.len() as u32;
    for word in [1u32, code_offset, addr, addr, size, size, 5, 4] {
        out.extend_from_slice(&word.to_le_bytes()); // PT_LOAD, offset, vaddr, paddr, filesz, memsz, R|X, align
    }
    for word in [0x1bad_b002u32, 0, 0u32.wrapping_sub(0x1bad_b002)] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    assert_eq!(out.len(), code_offset as usize);
    out.extend_from_slice(code);
    out
}

fn write_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rkvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_multiboot_kernel_gets_its_command_line_and_module() {
    if !kvm_available() {
        return;
    }
    let kernel = write_file("mb-kernel.elf", &multiboot_kernel());
    let module = write_file("mb-module.txt", b"module contents\n");
    let out = rkvm(&[
        "run",
        "--dev",
        "/dev/kvm",
        "--kernel",
        path_str(&kernel),
        "--initrd",
        path_str(&module),
        "--append",
        "console=ttyS0 x=1",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{} console=ttyS0 x=1\nmodule contents\n{}\n", kernel.display(), module.display())
    );
    assert_eq!(out.status.code(), Some(0x21), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_multiboot_kernel_without_arguments_has_just_its_name_and_can_be_stepped() {
    if !kvm_available() {
        return;
    }
    let kernel = write_file("mb-kernel-noargs.elf", &multiboot_kernel());
    let module = write_file("mb-empty-module", b"");
    let out = rkvm(&[
        "run",
        "--dev",
        "/dev/kvm",
        "--debug-step",
        "3",
        "--kernel",
        path_str(&kernel),
        "--initrd",
        path_str(&module),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n{}\n", kernel.display(), module.display()));
    assert_eq!(out.status.code(), Some(0x21));
    // cmp eax, imm32; jne rel32; mov eax, [ebx]
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "step 1: rip 0x00100000\nstep 2: rip 0x00100005\nstep 3: rip 0x0010000b\n"
    );
}

#[test]
fn bad_multiboot_input_is_a_one_line_error() {
    let kernel_bytes = multiboot_kernel();
    let kernel = write_file("mb-kernel-bad.elf", &kernel_bytes);
    let k = path_str(&kernel);
    let flat = write_payload(rkvm_payloads::hello_real());
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--kernel", path_str(&flat)]);
    assert!(one_line_error(&out).contains("not a Multiboot kernel: no header"));

    let mut bad = kernel_bytes.clone();
    bad[52 + 32 + 8] ^= 0xff;
    let bad = write_file("mb-bad-checksum.elf", &bad);
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--kernel", path_str(&bad)]);
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!("kernel {}: the Multiboot header at offset 0x54 has a bad checksum", bad.display())),
        "{err}"
    );

    let truncated = write_file("mb-truncated.elf", &kernel_bytes[..kernel_bytes.len() - 4]);
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--kernel", path_str(&truncated)]);
    assert!(one_line_error(&out).contains("the file is truncated: ELF segment 0"));

    let out = rkvm(&["run", "--dev", "/dev/kvm", "--kernel", "/nonexistent/kernel.elf"]);
    assert!(one_line_error(&out).contains("cannot read kernel /nonexistent/kernel.elf"));
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--kernel", k, "--initrd", "/nonexistent/module"]);
    assert!(one_line_error(&out).contains("cannot read module /nonexistent/module"));

    let out = rkvm(&["run", "--dev", "/dev/kvm", "--mem", "1M", "--kernel", k]);
    assert!(one_line_error(&out).contains("needs RAM above 1 MiB"));
    let big = write_file("mb-big-module", &[0; 8192]);
    let out = rkvm(&["run", "--dev", "/dev/kvm", "--mem", "1028K", "--kernel", k, "--initrd", path_str(&big)]);
    let err = one_line_error(&out);
    assert!(err.contains("does not fit in guest RAM of 0x101000 bytes; use a larger --mem"), "{err}");
}

#[test]
fn kernel_excludes_flat_image_options() {
    let kernel = write_file("mb-kernel-cli.elf", &multiboot_kernel());
    let k = path_str(&kernel);
    for extra in [&["--mode", "protected"][..], &["--load", "0x2000"], &["--entry", "0x2000"], &["image.bin"]] {
        let mut args = vec!["run", "--dev", "/dev/kvm", "--kernel", k];
        args.extend_from_slice(extra);
        let out = rkvm(&args);
        assert_eq!(out.status.code(), Some(2), "a usage error: {extra:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{extra:?}");
        assert!(out.stdout.is_empty());
    }
    for args in [&["--initrd", "m", "image.bin"][..], &["--append", "a"], &["--initrd", "m"]] {
        let out = rkvm(&[&["run", "--dev", "/dev/kvm"][..], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?} needs --kernel");
    }
}
