//! The guest's x87/SSE/AVX state and XCR0. The registers are kept per vCPU
//! in an XSAVE area (standard format, `rkvm_core::xsave`) and are in the CPU
//! only while the vCPU runs: `kernel_fpu_begin_mask` saves the VMM thread's
//! own state for it (the task gets it back on return to user mode), so host
//! tasks never see guest registers or the reverse.
//!
//! XCR0: the guest's value is loaded right before each VM entry and the
//! host's put back right after the exit, with interrupts off (VMX does not
//! switch XCR0), so host code never runs with the guest's XCR0.
//!
//! On a host without XSAVE (or whose XCR0 lacks AVX) the area holds only the
//! legacy FXSAVE region, and XSAVE/AVX are not offered to guests.
//!
//! Layout: SDM Vol. 1, 10.5.1 (legacy region) and 13.4 (XSAVE area).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use kernel::bindings;
use kernel::error::{code::EINVAL, Result};

use rkvm_core::xsave;

use crate::kvm_abi::kvm_fpu;

/// A vCPU's extended-state area, 64-byte aligned as XSAVE requires.
#[repr(C, align(64))]
pub(crate) struct FpuArea(pub(crate) [u8; 1024]);

const FCW: usize = 0;
const FSW: usize = 2;
const FTW: usize = 4;
const FOP: usize = 6;
const FIP: usize = 8;
const FDP: usize = 16;
const MXCSR: usize = xsave::MXCSR_OFFSET;
const MXCSR_MASK: usize = 28;
const ST: usize = 32;
const XMM: usize = 160;

/// Host facts read once at load: XCR0 (0 if XSAVE cannot be used for
/// guests) and the MXCSR bits the CPU accepts.
static HOST_XCR0: AtomicU64 = AtomicU64::new(0);
static HOST_MXCSR_MASK: AtomicU64 = AtomicU64::new(0xffbf);

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called when CPUID says the OS enabled XSAVE
    // (CR4.OSXSAVE), so XGETBV(0) is defined; it has no side effects.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn xsetbv0(value: u64) {
    // SAFETY: callers pass the host's XCR0 or a guest value checked by
    // `xsave::valid_xcr0` against components the host's XCR0 has, with
    // interrupts off; the other XCR0 is restored before host code uses the
    // FPU.
    unsafe {
        asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the host's XCR0 and MXCSR mask; called once at module load.
pub(crate) fn probe() {
    let leaf1 = x86::cpuid::native_cpuid::cpuid_count(1, 0);
    // CPUID.1:ECX.OSXSAVE[27] mirrors CR4.OSXSAVE.
    if leaf1.ecx & (1 << 27) != 0 {
        let xcr0 = xgetbv0();
        if xcr0 & xsave::SUPPORTED == xsave::SUPPORTED {
            HOST_XCR0.store(xcr0, Ordering::Relaxed);
        }
    }
    let mut area = FpuArea([0; 1024]);
    // SAFETY: process context; paired with `kernel_fpu_end` below.
    unsafe { bindings::kernel_fpu_begin_mask(0) };
    // SAFETY: 512 writable, 16-byte aligned bytes, inside the FPU section.
    unsafe { asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
    // SAFETY: pairs with the begin above.
    unsafe { bindings::kernel_fpu_end() };
    let mask = u32::from_le_bytes([area.0[MXCSR_MASK], area.0[MXCSR_MASK + 1], area.0[MXCSR_MASK + 2], area.0[MXCSR_MASK + 3]]);
    // A zero mask means the CPU predates DAZ: 0xffbf (SDM Vol. 1, 11.6.6).
    HOST_MXCSR_MASK.store(if mask == 0 { 0xffbf } else { mask.into() }, Ordering::Relaxed);
}

/// The host's XCR0 if guests get XSAVE (x87, SSE and AVX enabled on the
/// host), else `None`.
pub(crate) fn host_xcr0() -> Option<u64> {
    match HOST_XCR0.load(Ordering::Relaxed) {
        0 => None,
        xcr0 => Some(xcr0),
    }
}

/// The XSAVE components a guest may enable on this host.
pub(crate) fn supported_xcr0() -> u64 {
    if host_xcr0().is_some() {
        xsave::SUPPORTED
    } else {
        xsave::X87 | xsave::SSE
    }
}

fn mxcsr_mask() -> u32 {
    HOST_MXCSR_MASK.load(Ordering::Relaxed) as u32
}

impl FpuArea {
    /// The state after reset and FNINIT (SDM Vol. 3A, Table 10-1): FCW
    /// 0x37f, MXCSR 0x1f80, everything else zero; x87 and SSE marked as
    /// present so that XRSTOR loads those values.
    pub(crate) fn reset() -> Self {
        let mut a = Self([0; 1024]);
        a.0[FCW..FCW + 2].copy_from_slice(&0x37fu16.to_le_bytes());
        a.0[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        xsave::set_xstate_bv(&mut a.0, xsave::X87 | xsave::SSE);
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

    /// The area with components in their initial state written out.
    fn normalized(&self) -> [u8; xsave::AREA_SIZE] {
        let mut out = [0u8; xsave::AREA_SIZE];
        out.copy_from_slice(&self.0[..xsave::AREA_SIZE]);
        if host_xcr0().is_some() {
            xsave::fill_init(&mut out);
        }
        out
    }

    /// KVM_GET_FPU's view (KVM copies the legacy-region fields one to one).
    pub(crate) fn to_kvm(&self) -> kvm_fpu {
        let a = Self::from_bytes(&self.normalized());
        let mut f = kvm_fpu {
            fcw: a.u16_at(FCW),
            fsw: a.u16_at(FSW),
            ftwx: a.0[FTW],
            last_opcode: a.u16_at(FOP),
            last_ip: a.u64_at(FIP),
            last_dp: a.u64_at(FDP),
            mxcsr: u32::from_le_bytes([a.0[MXCSR], a.0[MXCSR + 1], a.0[MXCSR + 2], a.0[MXCSR + 3]]),
            ..Default::default()
        };
        for i in 0..8 {
            f.fpr[i].copy_from_slice(&a.0[ST + 16 * i..ST + 16 * (i + 1)]);
        }
        for i in 0..16 {
            f.xmm[i].copy_from_slice(&a.0[XMM + 16 * i..XMM + 16 * (i + 1)]);
        }
        f
    }

    fn from_bytes(bytes: &[u8; xsave::AREA_SIZE]) -> Self {
        let mut a = Self([0; 1024]);
        a.0[..xsave::AREA_SIZE].copy_from_slice(bytes);
        a
    }

    /// KVM_SET_FPU: the legacy region; the AVX state is kept.
    ///
    /// # Errors
    /// `EINVAL` for MXCSR bits the CPU does not support: XRSTOR would
    /// fault on them.
    pub(crate) fn set_from_kvm(&mut self, f: &kvm_fpu) -> Result {
        if f.mxcsr & !mxcsr_mask() != 0 {
            return Err(EINVAL);
        }
        let a = &mut self.0;
        a[..xsave::LEGACY_SIZE].fill(0);
        a[FCW..FCW + 2].copy_from_slice(&f.fcw.to_le_bytes());
        a[FSW..FSW + 2].copy_from_slice(&f.fsw.to_le_bytes());
        a[FTW] = f.ftwx;
        a[FOP..FOP + 2].copy_from_slice(&f.last_opcode.to_le_bytes());
        a[FIP..FIP + 8].copy_from_slice(&f.last_ip.to_le_bytes());
        a[FDP..FDP + 8].copy_from_slice(&f.last_dp.to_le_bytes());
        a[MXCSR..MXCSR + 4].copy_from_slice(&f.mxcsr.to_le_bytes());
        for i in 0..8 {
            a[ST + 16 * i..ST + 16 * (i + 1)].copy_from_slice(&f.fpr[i]);
        }
        for i in 0..16 {
            a[XMM + 16 * i..XMM + 16 * (i + 1)].copy_from_slice(&f.xmm[i]);
        }
        // As KVM: the x87 and SSE state are now present.
        let bv = xsave::xstate_bv(a);
        xsave::set_xstate_bv(a, bv | xsave::X87 | xsave::SSE);
        Ok(())
    }

    /// KVM_GET_XSAVE: `struct kvm_xsave`, 4096 bytes in the standard format.
    pub(crate) fn to_uabi(&self, out: &mut [u8; 4096]) {
        out.fill(0);
        out[..xsave::AREA_SIZE].copy_from_slice(&self.normalized());
        if host_xcr0().is_none() {
            xsave::set_xstate_bv(out, xsave::X87 | xsave::SSE);
        }
    }

    /// KVM_SET_XSAVE.
    ///
    /// # Errors
    /// `EINVAL` for anything XRSTOR would fault on (`xsave::validate`).
    pub(crate) fn set_from_uabi(&mut self, buf: &[u8; 4096]) -> Result {
        xsave::validate(buf, supported_xcr0(), mxcsr_mask()).map_err(|_| EINVAL)?;
        self.0.fill(0);
        self.0[..xsave::AREA_SIZE].copy_from_slice(&buf[..xsave::AREA_SIZE]);
        if host_xcr0().is_none() {
            // Only the legacy region is loaded (FXRSTOR): the components
            // XSTATE_BV marks as initial get their initial values here.
            xsave::fill_init(&mut self.0[..xsave::LEGACY_SIZE + 64]);
        }
        Ok(())
    }
}

/// The guest's FPU state is in the CPU from [`GuestFpu::load`] until
/// [`GuestFpu::save`] (a kernel-FPU section: preemption is off).
pub(crate) struct GuestFpu {
    host_xcr0: Option<u64>,
}

impl GuestFpu {
    /// Saves the VMM thread's FPU state for it and loads the guest's.
    pub(crate) fn load(area: &FpuArea) -> Self {
        let host_xcr0 = host_xcr0();
        // SAFETY: process context; paired with `kernel_fpu_end` in `save`
        // or `Drop`. No mask bits: the guest's state replaces the registers.
        unsafe { bindings::kernel_fpu_begin_mask(0) };
        if host_xcr0.is_some() {
            // SAFETY: a 64-byte aligned area in the standard format whose
            // header and MXCSR were checked (`set_from_uabi`,
            // `set_from_kvm`) or written by XSAVE; the host's XCR0 covers
            // the requested components (x87, SSE, AVX), and the kernel FPU
            // section lets us own the registers.
            unsafe {
                asm!("xrstor64 [{}]", in(reg) area.0.as_ptr(), in("eax") xsave::SUPPORTED as u32, in("edx") 0u32,
                    options(nostack, readonly))
            };
        } else {
            // SAFETY: a 16-byte aligned FXSAVE image with a checked MXCSR,
            // inside the kernel FPU section.
            unsafe { asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack, readonly)) };
        }
        Self { host_xcr0 }
    }

    /// Right before VM entry, interrupts off: the guest's XCR0.
    pub(crate) fn enter(&self, guest_xcr0: u64) {
        if let Some(host) = self.host_xcr0 {
            if host != guest_xcr0 {
                xsetbv0(guest_xcr0);
            }
        }
    }

    /// Right after VM exit, interrupts still off: the host's XCR0 back.
    pub(crate) fn exit(&self, guest_xcr0: u64) {
        if let Some(host) = self.host_xcr0 {
            if host != guest_xcr0 {
                xsetbv0(host);
            }
        }
    }

    /// Saves the guest's registers into `area` and gives the FPU back.
    pub(crate) fn save(self, area: &mut FpuArea) {
        if self.host_xcr0.is_some() {
            // SAFETY: as in `load`; XSAVE writes at most AREA_SIZE bytes
            // for these components, within the 1024-byte area.
            unsafe {
                asm!("xsave64 [{}]", in(reg) area.0.as_mut_ptr(), in("eax") xsave::SUPPORTED as u32, in("edx") 0u32,
                    options(nostack))
            };
        } else {
            // SAFETY: 512 aligned, writable bytes; still in the FPU section.
            unsafe { asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
        }
        // `Drop` ends the section.
    }
}

impl Drop for GuestFpu {
    fn drop(&mut self) {
        // SAFETY: pairs with `kernel_fpu_begin_mask` in `load`.
        unsafe { bindings::kernel_fpu_end() };
    }
}
