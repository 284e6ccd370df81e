//! The guest's x87/MMX/SSE state: kept in an FXSAVE image per vCPU and
//! loaded into the CPU only while the guest runs. The VMM thread's own FPU
//! state is saved by `kernel_fpu_begin_mask` (the task gets it back on return
//! to user mode), so host tasks never see guest registers or the reverse.
//! Guests cannot enable AVX (CR4.OSXSAVE is not offered yet), so FXSAVE
//! covers everything a guest can change.
//!
//! Layout: SDM Vol. 1, 10.5.1 "FXSAVE Area", Table 10-2 (64-bit format).

use core::arch::asm;

use kernel::bindings;
use kernel::error::{code::EINVAL, Result};

use crate::kvm_abi::kvm_fpu;

/// An FXSAVE image (512 bytes, 16-byte aligned).
#[repr(C, align(16))]
pub(crate) struct FxArea(pub(crate) [u8; 512]);

const FCW: usize = 0;
const FSW: usize = 2;
const FTW: usize = 4;
const FOP: usize = 6;
const FIP: usize = 8;
const FDP: usize = 16;
const MXCSR: usize = 24;
const ST: usize = 32;
const XMM: usize = 160;

impl FxArea {
    /// The state after reset and FNINIT (SDM Vol. 3A, Table 10-1): FCW
    /// 0x37f, MXCSR 0x1f80, everything else zero.
    pub(crate) fn reset() -> Self {
        let mut a = Self([0; 512]);
        a.0[FCW..FCW + 2].copy_from_slice(&0x37fu16.to_le_bytes());
        a.0[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }

    fn u16_at(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.0[o], self.0[o + 1]])
    }

    fn u64_at(&self, o: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[o..o + 8]);
        u64::from_le_bytes(b)
    }

    /// KVM_GET_FPU's view (KVM copies the FXSAVE fields one to one).
    pub(crate) fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.u16_at(FCW),
            fsw: self.u16_at(FSW),
            ftwx: self.0[FTW],
            last_opcode: self.u16_at(FOP),
            last_ip: self.u64_at(FIP),
            last_dp: self.u64_at(FDP),
            mxcsr: u32::from_le_bytes([self.0[MXCSR], self.0[MXCSR + 1], self.0[MXCSR + 2], self.0[MXCSR + 3]]),
            ..Default::default()
        };
        for i in 0..8 {
            f.fpr[i].copy_from_slice(&self.0[ST + 16 * i..ST + 16 * (i + 1)]);
        }
        for i in 0..16 {
            f.xmm[i].copy_from_slice(&self.0[XMM + 16 * i..XMM + 16 * (i + 1)]);
        }
        f
    }

    /// KVM_SET_FPU.
    ///
    /// # Errors
    /// `EINVAL` for MXCSR bits above 15: they are reserved, and FXRSTOR
    /// would fault on them.
    pub(crate) fn from_kvm(f: &kvm_fpu) -> Result<Self> {
        if f.mxcsr > 0xffff {
            return Err(EINVAL);
        }
        let mut a = Self([0; 512]);
        a.0[FCW..FCW + 2].copy_from_slice(&f.fcw.to_le_bytes());
        a.0[FSW..FSW + 2].copy_from_slice(&f.fsw.to_le_bytes());
        a.0[FTW] = f.ftwx;
        a.0[FOP..FOP + 2].copy_from_slice(&f.last_opcode.to_le_bytes());
        a.0[FIP..FIP + 8].copy_from_slice(&f.last_ip.to_le_bytes());
        a.0[FDP..FDP + 8].copy_from_slice(&f.last_dp.to_le_bytes());
        a.0[MXCSR..MXCSR + 4].copy_from_slice(&f.mxcsr.to_le_bytes());
        for i in 0..8 {
            a.0[ST + 16 * i..ST + 16 * (i + 1)].copy_from_slice(&f.fpr[i]);
        }
        for i in 0..16 {
            a.0[XMM + 16 * i..XMM + 16 * (i + 1)].copy_from_slice(&f.xmm[i]);
        }
        Ok(a)
    }
}

/// The guest's FPU state is in the CPU for as long as this lives.
pub(crate) struct GuestFpu<'a> {
    area: &'a mut FxArea,
}

impl<'a> GuestFpu<'a> {
    /// Saves the VMM thread's FPU state for it and loads the guest's.
    pub(crate) fn load(area: &'a mut FxArea) -> Self {
        // SAFETY: process context; paired with `kernel_fpu_end` in `Drop`.
        // No mask bits: the guest's state replaces the registers right away.
        unsafe { bindings::kernel_fpu_begin_mask(0) };
        // SAFETY: `area` is a 16-byte aligned FXSAVE image with a valid
        // MXCSR (`from_kvm` checks it; the CPU wrote it otherwise), and the
        // kernel FPU section lets us own the registers.
        unsafe { asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack, readonly)) };
        Self { area }
    }
}

impl Drop for GuestFpu<'_> {
    fn drop(&mut self) {
        // SAFETY: 512 aligned, writable bytes; still in the kernel FPU section.
        unsafe { asm!("fxsave64 [{}]", in(reg) self.area.0.as_mut_ptr(), options(nostack)) };
        // SAFETY: pairs with `kernel_fpu_begin_mask` in `load`.
        unsafe { bindings::kernel_fpu_end() };
    }
}
