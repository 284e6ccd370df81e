//! A host task that computes with the SSE/AVX registers while guests run
//! beside it, and checks that what it left in them is still there after
//! being preempted and after system calls: the host half of the FPU
//! isolation test (guests check their own half). rkvm loads guest registers
//! only inside a kernel-FPU section and puts XCR0 back before host code
//! runs; a leak in either direction shows up here or in the guest.
//!
//! Each round fills XMM0-15 (YMM0-15 with AVX) with a pattern derived from
//! the round number, spins (so the scheduler preempts it) and yields (so
//! another task runs on this CPU), then reads every register back, all in
//! one `asm!` block so that the compiler never touches the registers in
//! between.

use std::arch::asm;
use std::time::{Duration, Instant};

/// Register contents for round `round`: 16 registers of 32 bytes.
fn pattern(round: u64) -> [[u8; 32]; 16] {
    let mut p = [[0u8; 32]; 16];
    for (r, reg) in p.iter_mut().enumerate() {
        for (i, byte) in reg.iter_mut().enumerate() {
            *byte = (round as u8).wrapping_mul(31).wrapping_add((r * 32 + i) as u8) ^ 0x5a;
        }
    }
    p
}

/// One round with YMM registers: load, spin and yield, store.
///
/// # Safety
/// The CPU and OS must support AVX (checked by the caller).
#[target_feature(enable = "avx")]
unsafe fn round_avx(input: &[[u8; 32]; 16], output: &mut [[u8; 32]; 16], spins: u64) {
    // SAFETY: the pointers cover 16 * 32 bytes each; every YMM register and
    // the registers SYSCALL (sched_yield, 24) clobbers are declared.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{i}]", "vmovdqu ymm1, [{i} + 32]", "vmovdqu ymm2, [{i} + 64]", "vmovdqu ymm3, [{i} + 96]",
            "vmovdqu ymm4, [{i} + 128]", "vmovdqu ymm5, [{i} + 160]", "vmovdqu ymm6, [{i} + 192]", "vmovdqu ymm7, [{i} + 224]",
            "vmovdqu ymm8, [{i} + 256]", "vmovdqu ymm9, [{i} + 288]", "vmovdqu ymm10, [{i} + 320]", "vmovdqu ymm11, [{i} + 352]",
            "vmovdqu ymm12, [{i} + 384]", "vmovdqu ymm13, [{i} + 416]", "vmovdqu ymm14, [{i} + 448]", "vmovdqu ymm15, [{i} + 480]",
            "2:", "pause", "dec {n}", "jnz 2b",
            "mov eax, 24", "syscall",
            "vmovdqu [{o}], ymm0", "vmovdqu [{o} + 32], ymm1", "vmovdqu [{o} + 64], ymm2", "vmovdqu [{o} + 96], ymm3",
            "vmovdqu [{o} + 128], ymm4", "vmovdqu [{o} + 160], ymm5", "vmovdqu [{o} + 192], ymm6", "vmovdqu [{o} + 224], ymm7",
            "vmovdqu [{o} + 256], ymm8", "vmovdqu [{o} + 288], ymm9", "vmovdqu [{o} + 320], ymm10", "vmovdqu [{o} + 352], ymm11",
            "vmovdqu [{o} + 384], ymm12", "vmovdqu [{o} + 416], ymm13", "vmovdqu [{o} + 448], ymm14", "vmovdqu [{o} + 480], ymm15",
            i = in(reg) input.as_ptr(),
            o = in(reg) output.as_mut_ptr(),
            n = inout(reg) spins.max(1) => _,
            out("rax") _, out("rcx") _, out("r11") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _, out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        );
    }
}

/// One round with XMM registers only (the low 16 bytes of each pattern).
fn round_sse(input: &[[u8; 32]; 16], output: &mut [[u8; 32]; 16], spins: u64) {
    // SAFETY: as in `round_avx`, with the XMM registers, which every
    // x86-64 CPU has.
    unsafe {
        asm!(
            "movdqu xmm0, [{i}]", "movdqu xmm1, [{i} + 32]", "movdqu xmm2, [{i} + 64]", "movdqu xmm3, [{i} + 96]",
            "movdqu xmm4, [{i} + 128]", "movdqu xmm5, [{i} + 160]", "movdqu xmm6, [{i} + 192]", "movdqu xmm7, [{i} + 224]",
            "movdqu xmm8, [{i} + 256]", "movdqu xmm9, [{i} + 288]", "movdqu xmm10, [{i} + 320]", "movdqu xmm11, [{i} + 352]",
            "movdqu xmm12, [{i} + 384]", "movdqu xmm13, [{i} + 416]", "movdqu xmm14, [{i} + 448]", "movdqu xmm15, [{i} + 480]",
            "2:", "pause", "dec {n}", "jnz 2b",
            "mov eax, 24", "syscall",
            "movdqu [{o}], xmm0", "movdqu [{o} + 32], xmm1", "movdqu [{o} + 64], xmm2", "movdqu [{o} + 96], xmm3",
            "movdqu [{o} + 128], xmm4", "movdqu [{o} + 160], xmm5", "movdqu [{o} + 192], xmm6", "movdqu [{o} + 224], xmm7",
            "movdqu [{o} + 256], xmm8", "movdqu [{o} + 288], xmm9", "movdqu [{o} + 320], xmm10", "movdqu [{o} + 352], xmm11",
            "movdqu [{o} + 384], xmm12", "movdqu [{o} + 416], xmm13", "movdqu [{o} + 448], xmm14", "movdqu [{o} + 480], xmm15",
            i = in(reg) input.as_ptr(),
            o = in(reg) output.as_mut_ptr(),
            n = inout(reg) spins.max(1) => _,
            out("rax") _, out("rcx") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _, out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
    }
}

/// Runs rounds for `duration`; returns the number of rounds, or a
/// description of the first register that changed under the task.
pub fn stress(duration: Duration) -> Result<u64, String> {
    let avx = std::arch::is_x86_feature_detected!("avx");
    let bytes = if avx { 32 } else { 16 };
    let start = Instant::now();
    let mut round = 0u64;
    while start.elapsed() < duration {
        let input = pattern(round);
        let mut output = [[0u8; 32]; 16];
        if avx {
            // SAFETY: AVX is supported (checked above).
            unsafe { round_avx(&input, &mut output, 20_000) };
        } else {
            round_sse(&input, &mut output, 20_000);
        }
        for r in 0..16 {
            if input[r][..bytes] != output[r][..bytes] {
                return Err(format!(
                    "round {round}: {}{r} changed: wrote {:02x?}, read {:02x?}",
                    if avx { "ymm" } else { "xmm" },
                    &input[r][..bytes],
                    &output[r][..bytes]
                ));
            }
        }
        round += 1;
    }
    Ok(round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_survive_preemption_and_yields_on_this_host() {
        let rounds = stress(Duration::from_millis(200)).expect("registers kept");
        assert!(rounds > 0);
    }

    #[test]
    fn patterns_differ_between_rounds_and_registers() {
        let (a, b) = (pattern(1), pattern(2));
        assert_ne!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
