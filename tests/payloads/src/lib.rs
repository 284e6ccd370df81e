//! Guest payloads for rkvm's tests: small flat binaries assembled here with
//! iced-x86's code assembler, so every guest a test runs is built from source
//! in this repository.
//!
//! Each payload documents where it must be loaded and what it does; the
//! conventions are those of `rkvm run`: serial output on COM1 (0x3f8), exit
//! status through QEMU's isa-debug-exit port (0xf4), HLT with interrupts
//! disabled for a clean stop.

use iced_x86::code_asm::*;

mod multiboot;

pub use multiboot::{multiboot_test_kernel, FPU_EXIT_ITERATIONS, MODULE_TEXT};

/// COM1, where payloads print.
pub const SERIAL_PORT: u16 = 0x3f8;
/// isa-debug-exit: writing V makes the VMM exit with status (V << 1) | 1.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Where real-mode payloads are loaded and entered (`rkvm run` default).
pub const REAL_MODE_LOAD: u64 = 0x1000;

/// A named payload.
pub struct Payload {
    /// File name, e.g. `hello-real.bin` (or `mbtest.elf`).
    pub name: &'static str,
    /// The image: a flat binary, or an ELF executable (`mbtest.elf`).
    pub image: Vec<u8>,
}

/// Prints `msg` on COM1 from `bits`-bit code at [`REAL_MODE_LOAD`], then
/// runs `tail`. The message follows the code; its address is found by
/// assembling twice (`mov si/esi, imm` has one encoding per mode, so the
/// length does not change). In real mode DS is zeroed first; in protected
/// and long mode the VMM's flat segments are used.
fn print_program(
    bits: u32,
    msg: &str,
    tail: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, IcedError> {
    let code = |text_addr: u64| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(bits)?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        if bits == 16 {
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(si, text_addr as u32)?;
        } else {
            a.mov(esi, text_addr as u32)?;
        }
        a.mov(dx, u32::from(SERIAL_PORT))?;
        a.cld()?;
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.out(dx, al)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        tail(&mut a)?;
        a.assemble(REAL_MODE_LOAD)
    };
    let len = code(0)?.len() as u64;
    let mut image = code(REAL_MODE_LOAD + len)?;
    assert_eq!(image.len() as u64, len, "code length changed between passes");
    image.extend_from_slice(msg.as_bytes());
    image.push(0);
    Ok(image)
}

fn real_mode_print(
    msg: &str,
    tail: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, IcedError> {
    print_program(16, msg, tail)
}

fn cli_hlt(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cli()?;
    a.hlt()
}

/// `hello-protected.bin`: 32-bit protected mode (`rkvm run --mode
/// protected`), prints "Hello from protected mode!\n", then `cli; hlt`.
pub fn hello_protected() -> Payload {
    let image = print_program(32, "Hello from protected mode!\n", cli_hlt).expect("hello-protected assembles");
    Payload { name: "hello-protected.bin", image }
}

/// `hello-long.bin`: 64-bit long mode with paging (`rkvm run --mode long`),
/// prints "Hello from long mode!\n", then `cli; hlt`.
pub fn hello_long() -> Payload {
    let image = print_program(64, "Hello from long mode!\n", cli_hlt).expect("hello-long assembles");
    Payload { name: "hello-long.bin", image }
}

/// `hello-real.bin`: real mode, prints "Hello from real mode!\n", then
/// `cli; hlt` (the VMM exits 0).
pub fn hello_real() -> Payload {
    let image = real_mode_print("Hello from real mode!\n", |a| {
        a.cli()?;
        a.hlt()
    })
    .expect("hello-real assembles");
    Payload { name: "hello-real.bin", image }
}

/// `exit-status-real.bin`: real mode, prints "exiting with 0x21\n" and
/// writes 0x21 to the debug-exit port: the VMM exits with 0x43 (67).
pub fn exit_status_real() -> Payload {
    let image = real_mode_print("exiting with 0x21\n", |a| {
        a.mov(al, 0x21u32)?;
        a.out(u32::from(DEBUG_EXIT_PORT), al)?;
        a.cli()?;
        a.hlt()
    })
    .expect("exit-status-real assembles");
    Payload { name: "exit-status-real.bin", image }
}

/// Sets up a real-mode stack below the load address: SS:SP = 0:0x1000.
fn real_mode_stack(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.xor(ax, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, REAL_MODE_LOAD as u32)
}

/// `loop-real.bin`: real mode, `jmp $` forever. Only a signal stops it.
pub fn loop_real() -> Payload {
    let mut a = CodeAssembler::new(16).expect("16-bit assembler");
    let mut here = a.create_label();
    a.set_label(&mut here).expect("label");
    a.jmp(here).expect("jmp $");
    Payload { name: "loop-real.bin", image: a.assemble(REAL_MODE_LOAD).expect("loop-real assembles") }
}

/// `triple-fault-real.bin`: starts in real mode, loads an IDT with limit 0,
/// sets CR0.PE (CS keeps its cached real-mode values) and executes INT3: in
/// protected mode the #BP cannot be delivered (#GP), nor can the #GP (#DF),
/// nor the #DF: a triple fault, which the VMM sees as a shutdown.
pub fn triple_fault_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        real_mode_stack(&mut a)?;
        // A 6-byte pseudo-descriptor of zeros on the stack: base 0, limit 0.
        a.push(ax)?;
        a.push(ax)?;
        a.push(ax)?;
        a.mov(bp, sp)?;
        a.lidt(ptr(bp))?;
        // PE and ET only: caches on, as a real guest would run.
        a.mov(eax, 0x11u32)?;
        a.mov(cr0, eax)?;
        a.int3()?;
        a.hlt()?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "triple-fault-real.bin", image: build().expect("triple-fault-real assembles") }
}

/// Emits the subroutine `print_hex` at `label`: prints EAX on COM1 as 8 hex
/// digits and a newline; clobbers EBX, CX, DX. 16-bit code.
fn emit_print_hex(a: &mut CodeAssembler, label: &mut CodeLabel) -> Result<(), IcedError> {
    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    a.set_label(label)?;
    a.mov(cx, 8u32)?;
    a.mov(dx, u32::from(SERIAL_PORT))?;
    a.set_label(&mut digit)?;
    a.rol(eax, 4u32)?;
    a.mov(ebx, eax)?;
    a.and(bl, 0xfu32)?;
    a.add(bl, u32::from(b'0'))?;
    a.cmp(bl, u32::from(b'9'))?;
    a.jbe(decimal)?;
    a.add(bl, 7u32)?;
    a.set_label(&mut decimal)?;
    a.push(eax)?;
    a.mov(al, bl)?;
    a.out(dx, al)?;
    a.pop(eax)?;
    a.dec(cx)?;
    a.jnz(digit)?;
    a.mov(al, u32::from(b'\n'))?;
    a.out(dx, al)?;
    a.ret()
}

/// A benchmark: runs `body` (which may clobber EAX, EBX, ECX, EDX) `count`
/// times between two RDTSCs and prints the average TSC ticks per
/// iteration as 8 hex digits. Real mode.
fn tsc_benchmark(
    name: &'static str,
    count: u32,
    body: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        let mut again = a.create_label();
        real_mode_stack(&mut a)?;
        a.rdtsc()?;
        a.mov(esi, eax)?;
        a.mov(edi, count)?;
        a.set_label(&mut again)?;
        body(&mut a)?;
        a.dec(edi)?;
        a.jnz(again)?;
        a.rdtsc()?;
        a.sub(eax, esi)?;
        a.xor(edx, edx)?;
        a.mov(ecx, count)?;
        a.div(ecx)?;
        a.call(print_hex)?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name, image: build().expect("benchmark assembles") }
}

/// `bench-cpuid-real.bin`: TSC ticks per CPUID (an exit handled in the
/// kernel), averaged over 1000, printed in hex.
pub fn bench_cpuid_real() -> Payload {
    tsc_benchmark("bench-cpuid-real.bin", 1000, |a| {
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?;
        a.cpuid()
    })
}

/// `bench-pio-real.bin`: TSC ticks per OUT to an unclaimed port (an exit to
/// the VMM and back through KVM_RUN), averaged over 200, printed in hex.
pub fn bench_pio_real() -> Payload {
    tsc_benchmark("bench-pio-real.bin", 200, |a| {
        a.mov(dx, 0x80u32)?;
        a.out(dx, al)
    })
}

/// `io-real.bin`: real mode, port I/O of every size in both directions:
/// IN of 1, 2 and 4 bytes from an unclaimed port (0x80, all ones) and from
/// the UART's line status register (0x3fd), OUT of 1, 2 and 4 bytes to
/// 0x80; each IN result is printed on COM1 as 8 hex digits and a newline.
/// Then `cli; hlt`.
pub fn io_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        real_mode_stack(&mut a)?;
        for (port, width) in [(0x80u32, 1), (0x80, 2), (0x80, 4), (0x3fd, 1)] {
            a.mov(dx, port)?;
            match width {
                1 => {
                    a.in_(al, dx)?;
                    a.movzx(eax, al)?;
                }
                2 => {
                    a.in_(ax, dx)?;
                    a.movzx(eax, ax)?;
                }
                _ => a.in_(eax, dx)?,
            }
            a.call(print_hex)?;
        }
        a.mov(dx, 0x80u32)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "io-real.bin", image: build().expect("io-real assembles") }
}

/// `cpuid-real.bin`: real mode, prints the CPU vendor (CPUID leaf 0: EBX,
/// EDX, ECX), then "vmx=V hypervisor=H" from CPUID.1:ECX bits 5 and 31: a
/// hypervisor hides VMX and says it is there. Then `cli; hlt`.
pub fn cpuid_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        real_mode_stack(&mut a)?;
        a.xor(eax, eax)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(esi, ecx)?;
        a.mov(edi, edx)?;
        a.mov(dx, u32::from(SERIAL_PORT))?;
        for reg in [ebx, edi, esi] {
            a.mov(eax, reg)?;
            for _ in 0..4 {
                a.out(dx, al)?;
                a.shr(eax, 8u32)?;
            }
        }
        a.mov(al, u32::from(b'\n'))?;
        a.out(dx, al)?;
        a.mov(eax, 1u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(dx, u32::from(SERIAL_PORT))?;
        for (text, bit) in [("vmx=", 5u32), (" hypervisor=", 31)] {
            for b in text.bytes() {
                a.mov(al, u32::from(b))?;
                a.out(dx, al)?;
            }
            a.mov(eax, ecx)?;
            a.shr(eax, bit)?;
            a.and(al, 1u32)?;
            a.add(al, u32::from(b'0'))?;
            a.out(dx, al)?;
        }
        a.mov(al, u32::from(b'\n'))?;
        a.out(dx, al)?;
        a.cli()?;
        a.hlt()?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "cpuid-real.bin", image: build().expect("cpuid-real assembles") }
}

/// `msr-real.bin`: real mode, WRMSR of IA32_STAR then RDMSR of it, and
/// RDMSR of IA32_EFER; prints EDX and EAX of STAR and EAX of EFER in hex:
/// "9ABCDEF0", "12345678", "00000000". Then `cli; hlt`.
pub fn msr_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        real_mode_stack(&mut a)?;
        a.mov(ecx, 0xc000_0081u32)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.mov(edx, 0x9abc_def0u32)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.rdmsr()?;
        a.push(eax)?;
        a.mov(eax, edx)?;
        a.call(print_hex)?;
        a.pop(eax)?;
        a.call(print_hex)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.call(print_hex)?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "msr-real.bin", image: build().expect("msr-real assembles") }
}

/// Where `string-io-real.bin` keeps its data: the code is padded up to here.
const STRING_IO_DATA: u64 = REAL_MODE_LOAD + 0x800;

/// `string-io-real.bin`: real mode, string port I/O: REP OUTSB of a
/// message to COM1; REP INSB of 4 bytes from an unclaimed port (all ones)
/// and INSW from the UART's line status register into memory, printed in
/// hex ("FFFFFFFF", then "FFFF0060": the word replaced the low half); REP
/// OUTSB with DF=1 from the end of "\n!ti" prints "it!\n". Then `cli; hlt`.
pub fn string_io_real() -> Payload {
    const MSG: &[u8] = b"String I/O works\n";
    const BACKWARDS: &[u8] = b"\n!ti";
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        let msg = STRING_IO_DATA as u32;
        let buf = msg + 0x40;
        let back = msg + 0x80;
        real_mode_stack(&mut a)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.cld()?;
        a.mov(si, msg)?;
        a.mov(cx, MSG.len() as u32)?;
        a.mov(dx, u32::from(SERIAL_PORT))?;
        a.rep().outsb()?;
        a.mov(di, buf)?;
        a.mov(cx, 4u32)?;
        a.mov(dx, 0x80u32)?;
        a.rep().insb()?;
        a.mov(eax, dword_ptr(buf))?;
        a.call(print_hex)?;
        a.mov(di, buf)?;
        a.mov(dx, 0x3fdu32)?;
        a.insw()?;
        a.mov(eax, dword_ptr(buf))?;
        a.call(print_hex)?;
        a.std()?;
        a.mov(si, back + BACKWARDS.len() as u32 - 1)?;
        a.mov(cx, BACKWARDS.len() as u32)?;
        a.mov(dx, u32::from(SERIAL_PORT))?;
        a.rep().outsb()?;
        a.cld()?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        let mut image = a.assemble(REAL_MODE_LOAD)?;
        assert!(image.len() as u64 <= STRING_IO_DATA - REAL_MODE_LOAD, "code overlaps its data");
        image.resize((STRING_IO_DATA - REAL_MODE_LOAD) as usize, 0);
        let mut data = [0u8; 0xc0];
        data[..MSG.len()].copy_from_slice(MSG);
        data[0x80..0x80 + BACKWARDS.len()].copy_from_slice(BACKWARDS);
        image.extend_from_slice(&data);
        Ok(image)
    };
    Payload { name: "string-io-real.bin", image: build().expect("string-io-real assembles") }
}

/// `mmio-real.bin`: real mode with 64 KiB of RAM (`rkvm run --mem 64K`):
/// plain MOVs to and from 0x20010-0x20040, beyond RAM, so each is an MMIO
/// exit: a byte store of an immediate, byte, word and dword loads (the VMM
/// answers all ones; printed in hex: "000000FF", "0000FFFF", "FFFFFFFF"),
/// a dword store of EAX and a store of AH. Then `cli; hlt`.
pub fn mmio_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        real_mode_stack(&mut a)?;
        a.mov(ax, 0x2000u32)?;
        a.mov(ds, ax)?;
        a.mov(byte_ptr(0x10u32), 0x5au32)?;
        a.mov(al, byte_ptr(0x10u32))?;
        a.movzx(eax, al)?;
        a.call(print_hex)?;
        a.xor(eax, eax)?;
        a.mov(ax, word_ptr(0x20u32))?;
        a.call(print_hex)?;
        a.mov(eax, dword_ptr(0x30u32))?;
        a.call(print_hex)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.mov(dword_ptr(0x40u32), eax)?;
        a.mov(byte_ptr(0x44u32), ah)?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "mmio-real.bin", image: build().expect("mmio-real assembles") }
}

/// Emits code printing `text` on COM1 one character at a time (no memory).
fn emit_print(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    a.mov(dx, u32::from(SERIAL_PORT))?;
    for b in text.bytes() {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// `syscall-long.bin`: 64-bit long mode (`rkvm run --mode long`): sets
/// KERNEL_GS_BASE and swaps it in with SWAPGS (checked through RDMSR of
/// GS_BASE), then points LSTAR at a handler, STAR at the flat code segment,
/// sets EFER.SCE and executes SYSCALL; prints "SWAPGS ok" and "SYSCALL ok"
/// (the handler runs only if the guest's LSTAR, not the host's, is in the
/// CPU). Then `cli; hlt`.
pub fn syscall_long() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut handler = a.create_label();
        let mut bad = a.create_label();
        let mut after = a.create_label();
        let wrmsr = |a: &mut CodeAssembler, msr: u32, value: u32| -> Result<(), IcedError> {
            a.mov(ecx, msr)?;
            a.mov(eax, value)?;
            a.xor(edx, edx)?;
            a.wrmsr()
        };
        wrmsr(&mut a, 0xc000_0102, 0x1234)?; // KERNEL_GS_BASE
        a.swapgs()?;
        a.mov(ecx, 0xc000_0101u32)?; // GS_BASE
        a.rdmsr()?;
        a.cmp(eax, 0x1234u32)?;
        a.jne(bad)?;
        emit_print(&mut a, "SWAPGS ok\n")?;
        a.jmp(after)?;
        a.set_label(&mut bad)?;
        emit_print(&mut a, "SWAPGS bad\n")?;
        a.set_label(&mut after)?;
        a.lea(rax, ptr(handler))?;
        a.mov(ecx, 0xc000_0082u32)?; // LSTAR
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0081u32)?; // STAR: SYSCALL CS = 0x08, SS = 0x10
        a.xor(eax, eax)?;
        a.mov(edx, 0x0008u32)?;
        a.wrmsr()?;
        wrmsr(&mut a, 0xc000_0084, 0)?; // SFMASK
        a.mov(ecx, 0xc000_0080u32)?; // EFER.SCE
        a.rdmsr()?;
        a.or(eax, 1u32)?;
        a.wrmsr()?;
        a.syscall()?;
        emit_print(&mut a, "SYSCALL returned\n")?;
        a.cli()?;
        a.hlt()?;
        a.set_label(&mut handler)?;
        emit_print(&mut a, "SYSCALL ok\n")?;
        a.cli()?;
        a.hlt()?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "syscall-long.bin", image: build().expect("syscall-long assembles") }
}

/// `dr-real.bin`: real mode, debug registers: DR0 written and read back
/// ("00001234"), DR7 and DR6 at their reset values ("00000400",
/// "FFFF0FF0"), DR7 with LE set ("00000500"). Then `cli; hlt`.
pub fn dr_real() -> Payload {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut print_hex = a.create_label();
        real_mode_stack(&mut a)?;
        a.mov(eax, 0x1234u32)?;
        a.mov(dr0, eax)?;
        a.xor(eax, eax)?;
        a.mov(eax, dr0)?;
        a.call(print_hex)?;
        a.mov(eax, dr7)?;
        a.call(print_hex)?;
        a.mov(eax, dr6)?;
        a.call(print_hex)?;
        a.mov(eax, 0x500u32)?;
        a.mov(dr7, eax)?;
        a.xor(eax, eax)?;
        a.mov(eax, dr7)?;
        a.call(print_hex)?;
        a.cli()?;
        a.hlt()?;
        emit_print_hex(&mut a, &mut print_hex)?;
        a.assemble(REAL_MODE_LOAD)
    };
    Payload { name: "dr-real.bin", image: build().expect("dr-real assembles") }
}

/// Every payload, for writing them all out.
pub fn all() -> Vec<Payload> {
    vec![
        hello_real(),
        exit_status_real(),
        loop_real(),
        triple_fault_real(),
        io_real(),
        hello_protected(),
        hello_long(),
        cpuid_real(),
        msr_real(),
        string_io_real(),
        mmio_real(),
        syscall_long(),
        dr_real(),
        bench_cpuid_real(),
        bench_pio_real(),
        multiboot_test_kernel(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_real_carries_its_message_and_ends_in_cli_hlt_before_it() {
        let image = hello_real().image;
        let text = b"Hello from real mode!\n\0";
        assert!(image.ends_with(text));
        let code = &image[..image.len() - text.len()];
        assert_eq!(&code[code.len() - 2..], &[0xfa, 0xf4], "cli; hlt");
    }

    #[test]
    fn exit_status_real_writes_0x21_to_port_0xf4() {
        let image = exit_status_real().image;
        // mov al, 0x21; out 0xf4, al
        assert!(image.windows(4).any(|w| w == [0xb0, 0x21, 0xe6, 0xf4]));
    }
}
