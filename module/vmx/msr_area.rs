//! The MSRs VMX does not switch by itself but a 64-bit guest needs in the
//! CPU: the SYSCALL MSRs (STAR, LSTAR, CSTAR, SFMASK), KERNEL_GS_BASE, and
//! TSC_AUX where the guest may run RDTSCP (SDM Vol. 3C, 25.7.2 and 25.8.2,
//! "MSR-load" and "MSR-store" areas).
//!
//! One page per vCPU holds two lists of `{index u32, reserved u32, data
//! u64}` entries (25.7.2): the guest's values at offset 0, which VM entry
//! loads and VM exit stores back into (so SWAPGS in the guest is kept), and
//! the host's at offset 2048, which VM exit loads. The host's are read at
//! every VMCS load: they are per CPU (LSTAR...) and per task (the VMM
//! thread's user GS base, in KERNEL_GS_BASE while in the kernel).
//!
//! Context: VMCS loaded, preemption disabled.

use kernel::error::Result;
use x86::msr;
use x86::vmx::vmcs::control;

use super::vmcs::LoadedVmcs;
use crate::mm::Page;
use rkvm_core::guest_msr::GuestMsrs;

/// The MSRs switched through the lists, in list order; TSC_AUX last, and
/// only on CPUs with RDTSCP (loading an MSR the CPU lacks fails the entry).
pub(crate) const SWITCHED: [u32; 6] =
    [msr::IA32_STAR, msr::IA32_LSTAR, msr::IA32_CSTAR, msr::IA32_FMASK, msr::IA32_KERNEL_GSBASE, msr::IA32_TSC_AUX];

const GUEST: usize = 0;
const HOST: usize = 2048;
const ENTRY: usize = 16;

/// The guest and host MSR lists of one vCPU.
pub(crate) struct MsrArea {
    page: Page,
    /// How many of [`SWITCHED`] are in the lists.
    count: usize,
}

/// The guest's value of switched MSR `index`, kept between runs.
fn field(m: &mut GuestMsrs, index: u32) -> &mut u64 {
    match index {
        msr::IA32_STAR => &mut m.star,
        msr::IA32_LSTAR => &mut m.lstar,
        msr::IA32_CSTAR => &mut m.cstar,
        msr::IA32_FMASK => &mut m.sfmask,
        msr::IA32_KERNEL_GSBASE => &mut m.kernel_gs_base,
        _ => &mut m.tsc_aux,
    }
}

impl MsrArea {
    /// Both lists, with their MSR indices filled in; TSC_AUX among them if
    /// `tsc_aux` (the CPU has RDTSCP and rkvm lets guests use it).
    pub(crate) fn new(tsc_aux: bool) -> Result<Self> {
        let mut page = Page::alloc_zeroed()?;
        let count = if tsc_aux { SWITCHED.len() } else { SWITCHED.len() - 1 };
        let bytes = page.as_mut_bytes();
        for (i, m) in SWITCHED[..count].iter().enumerate() {
            bytes[GUEST + i * ENTRY..GUEST + i * ENTRY + 4].copy_from_slice(&m.to_le_bytes());
            bytes[HOST + i * ENTRY..HOST + i * ENTRY + 4].copy_from_slice(&m.to_le_bytes());
        }
        Ok(Self { page, count })
    }

    fn slot(&self, msr: u32) -> Option<usize> {
        SWITCHED[..self.count].iter().position(|&m| m == msr)
    }

    /// Whether TSC_AUX is switched.
    pub(crate) fn switches_tsc_aux(&self) -> bool {
        self.count == SWITCHED.len()
    }

    fn data(&self, base: usize, i: usize) -> u64 {
        let p = self.page.as_ptr();
        let mut b = [0u8; 8];
        // SAFETY: within the page (i < 6); the CPU writes these bytes only
        // during VM exits, which cannot happen while this runs.
        unsafe { core::ptr::copy_nonoverlapping(p.add(base + i * ENTRY + 8), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }

    fn set_data(&mut self, base: usize, i: usize, value: u64) {
        self.page.as_mut_bytes()[base + i * ENTRY + 8..base + i * ENTRY + 16].copy_from_slice(&value.to_le_bytes());
    }

    /// The guest's current value of a switched MSR.
    pub(crate) fn guest(&self, msr: u32) -> Option<u64> {
        self.slot(msr).map(|i| self.data(GUEST, i))
    }

    /// Sets the guest's value of a switched MSR (loaded at the next entry);
    /// false if `msr` is not switched here.
    pub(crate) fn set_guest(&mut self, msr: u32, value: u64) -> bool {
        match self.slot(msr) {
            Some(i) => {
                self.set_data(GUEST, i, value);
                true
            }
            None => false,
        }
    }

    /// Before a run: the guest's values from `m`, the host's from this CPU
    /// and task, and the list addresses and counts in the VMCS.
    pub(crate) fn load(&mut self, vmcs: &mut LoadedVmcs<'_>, m: &mut GuestMsrs) -> Result {
        for (i, &index) in SWITCHED[..self.count].iter().enumerate() {
            let guest = *field(m, index);
            self.set_data(GUEST, i, guest);
            // SAFETY: these architectural MSRs exist on every 64-bit CPU
            // (SDM Vol. 4, Table 2-2), TSC_AUX on those with RDTSCP, which
            // `new` checked; reading has no side effect.
            let host = unsafe { msr::rdmsr(index) };
            self.set_data(HOST, i, host);
        }
        let base = self.page.phys();
        let count = self.count as u64;
        vmcs.write(control::VMENTRY_MSR_LOAD_ADDR_FULL, base + GUEST as u64)?;
        vmcs.write(control::VMEXIT_MSR_STORE_ADDR_FULL, base + GUEST as u64)?;
        vmcs.write(control::VMEXIT_MSR_LOAD_ADDR_FULL, base + HOST as u64)?;
        vmcs.write(control::VMENTRY_MSR_LOAD_COUNT, count)?;
        vmcs.write(control::VMEXIT_MSR_STORE_COUNT, count)?;
        vmcs.write(control::VMEXIT_MSR_LOAD_COUNT, count)
    }

    /// After a run: the guest's values (as the last exit stored them) into `m`.
    pub(crate) fn save(&self, m: &mut GuestMsrs) {
        for (i, &index) in SWITCHED[..self.count].iter().enumerate() {
            *field(m, index) = self.data(GUEST, i);
        }
    }
}
