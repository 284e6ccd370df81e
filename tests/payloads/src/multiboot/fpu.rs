//! x87, SSE and AVX register state must survive exits to the VMM, which
//! runs on the same CPU between guest instructions and may use those
//! registers itself; and XSETBV must enforce XCR0's rules.

use super::runtime::{Kernel, R};
use iced_x86::code_asm::*;

/// Exits to the VMM (OUT to port 0x80) while FPU, SSE and AVX state must
/// survive in the registers. A constant so a stress run can raise it.
pub const FPU_EXIT_ITERATIONS: u32 = 2000;
/// Iterations of the busy loop between two of those exits: guest time in
/// which a host interrupt or preemption may land.
const FPU_SPIN: u32 = 200;

// Control register bits (SDM Vol. 3A, 2.5 "Control Registers").
const CR0_MP: u32 = 1 << 1;
const CR0_EM: u32 = 1 << 2;
const CR0_TS: u32 = 1 << 3;
const CR0_NE: u32 = 1 << 5;
const CR4_OSFXSR: u32 = 1 << 9;
const CR4_OSXMMEXCPT: u32 = 1 << 10;
const CR4_OSXSAVE: u32 = 1 << 18;

/// Bytes `k * mul + add` for k in 0..len: distinct enough that any mixed
/// up or zeroed register shows.
fn pattern(len: usize, mul: usize, add: usize) -> Vec<u8> {
    (0..len).map(|i| (i * mul + add) as u8).collect()
}

/// `FPU_EXIT_ITERATIONS` exits to the VMM with a busy loop in between;
/// touches only ESI, ECX and flags.
fn exit_loop(k: &mut Kernel) -> R {
    k.a.mov(esi, FPU_EXIT_ITERATIONS)?;
    let outer = k.here()?;
    k.a.out(0x80u32, al)?;
    k.a.mov(ecx, FPU_SPIN)?;
    let spin = k.here()?;
    k.a.dec(ecx)?;
    k.a.jnz(spin)?;
    k.a.dec(esi)?;
    k.a.jnz(outer)
}

/// x87 and SSE state survives exits: the registers are loaded, thousands
/// of exits run (each a return to the VMM, which may use the FPU itself),
/// and everything is compared.
pub fn fpu(k: &mut Kernel) -> R {
    // x87 values, a control word (53-bit precision, round up, all
    // exceptions masked) and an MXCSR (round down, all masked): none of
    // them the state FNINIT or reset leaves.
    const FCW: u32 = 0x0a7f;
    const MXCSR: u32 = 0x3f80;
    let ints: Vec<u8> = [123_456_789i32, -987_654, 31_415_926].iter().flat_map(|v| v.to_le_bytes()).collect();
    let ints = k.data(4, &ints);
    let xmm_pattern = k.data(16, &pattern(8 * 16, 37, 11));
    let fcw = k.data(2, &(FCW as u16).to_le_bytes());
    let mxcsr = k.data(4, &MXCSR.to_le_bytes());
    let lay = &k.lay;
    let (x87_save, fcw_save, mxcsr_save, xmm_save) = (lay.x87_save, lay.fcw_save, lay.mxcsr_save, lay.xmm_save);
    let xmms = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7];

    k.guarded(|k| {
        // SDM Vol. 3A, "Initialization of the SSE Extensions": no
        // emulation, native x87 errors, OS supports FXSAVE and #XM.
        k.a.mov(eax, cr0)?;
        k.a.and(eax, !(CR0_EM | CR0_TS))?;
        k.a.or(eax, CR0_MP | CR0_NE)?;
        k.a.mov(cr0, eax)?;
        k.a.mov(eax, cr4)?;
        k.a.or(eax, CR4_OSFXSR | CR4_OSXMMEXCPT)?;
        k.a.mov(cr4, eax)?;
        k.a.fninit()?;
        k.a.fldcw(word_ptr(fcw))?;
        for i in 0..3 {
            k.a.fild(dword_ptr(ints + 4 * i))?;
        }
        k.a.ldmxcsr(dword_ptr(mxcsr))?;
        for (i, &x) in (0..).zip(&xmms) {
            k.a.movdqu(x, xmmword_ptr(xmm_pattern + 16 * i))?;
        }
        exit_loop(k)?;
        for (i, &x) in (0..).zip(&xmms) {
            k.a.movdqu(xmmword_ptr(xmm_save + 16 * i), x)?;
        }
        k.a.fnstcw(word_ptr(fcw_save))?;
        k.a.stmxcsr(dword_ptr(mxcsr_save))?;
        // The stack pops in reverse.
        for i in (0..3).rev() {
            k.a.fistp(dword_ptr(x87_save + 4 * i))?;
        }
        Ok(())
    })?;
    k.memeq(xmm_save, xmm_pattern, 8 * 16)?;
    k.check_bool("fpu-xmm-preserved")?;
    k.memeq(x87_save, ints, 12)?;
    k.check_bool("fpu-x87-preserved")?;
    k.a.movzx(eax, word_ptr(fcw_save))?;
    k.check32("fpu-fcw-preserved", FCW)?;
    k.a.mov(eax, dword_ptr(mxcsr_save))?;
    k.check32("fpu-mxcsr-preserved", MXCSR)
}

/// XSAVE-managed AVX state survives exits, and XSETBV checks XCR0 (SDM
/// Vol. 1, 13.3 "Enabling the XSAVE Feature Set"; Vol. 2C, XSETBV).
pub fn avx(k: &mut Kernel) -> R {
    const XCR0_X87_SSE_AVX: u32 = 0b111;
    let mut absent = k.a.create_label();
    let mut done = k.a.create_label();
    // XSAVE is CPUID.1:ECX[26], AVX is CPUID.1:ECX[28].
    const ECX1: u32 = 1 << 26 | 1 << 28;
    k.a.mov(eax, 1u32)?;
    k.a.xor(ecx, ecx)?;
    k.a.cpuid()?;
    k.a.and(ecx, ECX1)?;
    k.a.cmp(ecx, ECX1)?;
    k.a.jne(absent)?;

    // XSETBV's operands: ECX = 0 (XCR0), EDX:EAX = the value.
    let xcr0_operands = |k: &mut Kernel, xcr0: u32| -> R {
        k.a.xor(ecx, ecx)?;
        k.a.mov(eax, xcr0)?;
        k.a.xor(edx, edx)
    };
    let xsetbv = |k: &mut Kernel, xcr0: u32| -> R {
        xcr0_operands(k, xcr0)?;
        k.a.xsetbv()
    };
    k.guarded(|k| {
        k.a.mov(eax, cr4)?;
        k.a.or(eax, CR4_OSXSAVE)?;
        k.a.mov(cr4, eax)?;
        xsetbv(k, XCR0_X87_SSE_AVX)?;
        k.a.xor(ecx, ecx)?;
        k.a.xgetbv()
    })?;
    k.check64("xcr0-x87-sse-avx", XCR0_X87_SSE_AVX.into())?;

    let ymm_pattern = k.data(32, &pattern(8 * 32, 53, 7));
    let ymm_save = k.lay.ymm_save;
    let ymms = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7];
    k.guarded(|k| {
        for (i, &y) in (0..).zip(&ymms) {
            k.a.vmovdqu(y, ymmword_ptr(ymm_pattern + 32 * i))?;
        }
        exit_loop(k)?;
        for (i, &y) in (0..).zip(&ymms) {
            k.a.vmovdqu(ymmword_ptr(ymm_save + 32 * i), y)?;
        }
        Ok(())
    })?;
    k.memeq(ymm_save, ymm_pattern, 8 * 32)?;
    k.check_bool("avx-ymm-preserved")?;

    // XCR0[0] (x87) must stay set, and AVX state needs SSE state.
    k.expect_gp0("xsetbv-x87-clear-gp", |k| xcr0_operands(k, 0b110), |k| k.a.xsetbv())?;
    k.guarded_quiet(|k| xsetbv(k, XCR0_X87_SSE_AVX))?;
    k.expect_gp0("xsetbv-avx-without-sse-gp", |k| xcr0_operands(k, 0b101), |k| k.a.xsetbv())?;
    k.guarded_quiet(|k| xsetbv(k, XCR0_X87_SSE_AVX))?;
    k.a.jmp(done)?;

    k.a.set_label(&mut absent)?;
    k.fail("avx", "xsave or avx not offered")?;
    k.a.set_label(&mut done)?;
    k.a.nop()
}
