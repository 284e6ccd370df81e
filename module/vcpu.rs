//! A vCPU: its architectural state and the `struct kvm_run` page shared with
//! the VMM, reached through the file descriptor KVM_CREATE_VCPU returns
//! (api.rst section 4, "vCPU ioctls"). KVM_RUN is in `run.rs`, the exit
//! handlers in `exit/`.
//!
//! Context: ioctls run in the VMM's process context and may sleep; the
//! vCPU's mutex serializes them, as KVM's `vcpu->mutex` does, and waiting
//! for it is killable, as there.

use kernel::alloc::{KBox, KVec};
use kernel::bindings;
use kernel::c_str;
use kernel::error::{
    code::{EINVAL, ENOTTY},
    Result,
};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow};
use kernel::types::{AsBytes, FromBytes};
use kernel::uaccess::UserSlice;

use rkvm_core::cpu_state::ControlState;

use crate::file::{self, FileObject, FileOps};
use crate::fpu::FpuArea;
use crate::msrs;
use rkvm_core::events::{EventState, VcpuEvents};
use rkvm_core::guest_msr::{GuestMsrs, MsrFeatures};
use crate::glue;
use crate::glue::mm::{Counted, Counter};
use crate::glue::sync::{new_killable_mutex, KillableMutex};
use crate::kvm_abi::*;
use crate::mm::Page;
use crate::vm::Vm;
use crate::vmx::entry::GuestRegs;
use crate::vmx::vmcs::Vmcs;
use crate::exit::debug::RFLAGS_TF;

/// Pages a VMM maps from the vCPU fd (KVM_GET_VCPU_MMAP_SIZE): `struct
/// kvm_run`, then the port-I/O data page at KVM_PIO_PAGE_OFFSET.
pub(crate) const MMAP_PAGES: usize = 2;

/// The guest's physical-address width (CPUID.80000008H:EAX[7:0]) until
/// KVM_SET_CPUID2 says otherwise.
pub(crate) const GUEST_PHYS_ADDR_BITS: u32 = 39;

static VCPU_FOPS: FileOps = FileOps::new::<Vcpu>(&crate::THIS_MODULE);

/// An IN whose data the VMM supplies in the PIO page before the next
/// KVM_RUN.
#[derive(Clone, Copy)]
pub(crate) struct PendingIn {
    /// 1, 2 or 4 bytes.
    pub(crate) size: u8,
    /// RIP after the IN: the data goes in only if it is still there.
    pub(crate) rip: u64,
}

/// What the vCPU's mutex protects: the VMCS, and everything else about the
/// guest, kept apart so that the run loop can hold the loaded VMCS and the
/// guest state at once.
pub(crate) struct VcpuState {
    pub(crate) vmcs: Vmcs,
    pub(crate) g: GuestState,
}

/// A vCPU's architectural state outside the VMCS, and what is in flight
/// between the kernel and the VMM.
pub(crate) struct GuestState {
    /// General-purpose registers, RIP and RFLAGS (authoritative between
    /// runs).
    pub(crate) regs: kvm_regs,
    /// Segment, descriptor-table and control registers (authoritative
    /// between runs).
    pub(crate) sregs: kvm_sregs,
    /// `regs`/`sregs` changed since the VMCS last saw them.
    pub(crate) dirty: bool,
    /// The registers the entry routine switches.
    pub(crate) gprs: GuestRegs,
    pub(crate) pending_in: Option<PendingIn>,
    /// The guest's CPUID, from KVM_SET_CPUID2.
    pub(crate) cpuid: KVec<rkvm_core::cpuid::Entry>,
    /// The guest's x87/SSE/AVX registers.
    pub(crate) fpu: KBox<FpuArea>,
    /// The guest's XCR0 (x87 only after reset).
    pub(crate) xcr0: u64,
    /// MSRs kept per vCPU (see msrs.rs).
    pub(crate) msrs: GuestMsrs,
    /// Which MSRs exist for the guest, from its CPUID.
    pub(crate) msr_features: MsrFeatures,
    /// The MSR bitmap (used if the CPU has MSR bitmaps).
    pub(crate) msr_bitmap: Page,
    /// Set by an INS exit: completed at the next KVM_RUN.
    pub(crate) pending_string_in: Option<crate::exit::slow::PendingStringIn>,
    /// Set by an MMIO load: completed at the next KVM_RUN.
    pub(crate) pending_mmio: Option<crate::exit::slow::PendingMmioLoad>,
    /// The SYSCALL MSRs and KERNEL_GS_BASE, switched at entry and exit.
    pub(crate) msr_area: crate::vmx::msr_area::MsrArea,
    /// DR0-DR3 and DR6 (DR7 is in the VMCS).
    pub(crate) debug: crate::exit::dr::DebugRegs,
    /// Events in flight: one the next entry injects, interrupt and NMI
    /// blocking, and what KVM_INTERRUPT and KVM_NMI queued (vmx/events.rs).
    pub(crate) events: EventState,
    /// KVM_SET_GUEST_DEBUG's `control` (0 when debugging is off).
    pub(crate) guest_debug: u32,
    /// Single-stepping, and an instruction rkvm emulated or skipped has
    /// completed: the VMM gets KVM_EXIT_DEBUG before the guest goes on.
    pub(crate) step_done: bool,
}

impl GuestState {
    /// Whether the VMM single-steps the guest.
    pub(crate) fn single_stepping(&self) -> bool {
        self.guest_debug & KVM_GUESTDBG_SINGLESTEP != 0
    }

    /// An instruction the guest did not execute itself (rkvm skipped or
    /// emulated it) is done: when single-stepping, that is a step.
    pub(crate) fn instruction_done(&mut self) {
        if self.single_stepping() {
            self.step_done = true;
        }
    }
}

/// A vCPU.
#[pin_data]
pub(crate) struct Vcpu {
    /// The VM: its memory and controls; kept alive while the vCPU exists.
    pub(crate) vm: Arc<Vm>,
    /// `struct kvm_run`, shared with the VMM by mmap.
    pub(crate) run_page: Page,
    /// Port-I/O data, shared with the VMM by mmap.
    pub(crate) pio_page: Page,
    /// Exit counts, for KVM_GET_STATS_FD.
    pub(crate) exit_stats: crate::stats::ExitStats,
    #[pin]
    pub(crate) state: KillableMutex<VcpuState>,
    _counted: Counted,
}

/// A segment in the state KVM gives a vCPU at reset.
fn reset_segment(selector: u16, base: u64, type_: u8, s: u8) -> kvm_segment {
    kvm_segment { base, limit: 0xffff, selector, type_, present: 1, s, ..Default::default() }
}

/// The architectural state after RESET, as KVM sets it (SDM Vol. 3A, 10.1.1
/// "Processor State After Reset"; `kvm_vcpu_reset` and `vmx_vcpu_reset`):
/// real mode, CS:IP = F000:FFF0 with CS base FFFF0000, EDX = the processor
/// signature (KVM uses 0x600 before KVM_SET_CPUID2), CR0 = CD|NW|ET.
fn reset_registers(id: u32) -> (kvm_regs, kvm_sregs) {
    const CODE_READ_ACCESSED: u8 = 0xb;
    const DATA_WRITE_ACCESSED: u8 = 0x3;
    const LDT: u8 = 0x2;
    const TSS_BUSY: u8 = 0xb;
    const APIC_BASE: u64 = 0xfee0_0000;
    const APIC_BASE_ENABLE: u64 = 1 << 11;
    const APIC_BASE_BSP: u64 = 1 << 8;

    let data = reset_segment(0, 0, DATA_WRITE_ACCESSED, 1);
    let table = kvm_dtable { base: 0, limit: 0xffff, ..Default::default() };
    let sregs = kvm_sregs {
        cs: reset_segment(0xf000, 0xffff_0000, CODE_READ_ACCESSED, 1),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: reset_segment(0, 0, TSS_BUSY, 0),
        ldt: reset_segment(0, 0, LDT, 0),
        gdt: table,
        idt: table,
        cr0: 0x6000_0010,
        apic_base: APIC_BASE | APIC_BASE_ENABLE | if id == 0 { APIC_BASE_BSP } else { 0 },
        ..Default::default()
    };
    let regs = kvm_regs { rip: 0xfff0, rflags: 0x2, rdx: 0x600, ..Default::default() };
    (regs, sregs)
}

impl Vcpu {
    /// KVM_CREATE_VCPU: a new vCPU in reset state, and its file descriptor.
    pub(crate) fn create(vm: Arc<Vm>, id: u32) -> Result<i32> {
        let run_page = Page::alloc_zeroed()?;
        let pio_page = Page::alloc_zeroed()?;
        let vmcs = Vmcs::new(vm.caps().basic.revision_id())?;
        let (regs, sregs) = reset_registers(id);
        let msr_features = MsrFeatures::from_cpuid(&[]);
        let msr_area = crate::vmx::msr_area::MsrArea::new(vm.controls().rdtscp())?;
        let mut msr_bitmap = Page::alloc_zeroed()?;
        msrs::build_bitmap(&mut msr_bitmap, msr_area.switches_tsc_aux(), &msr_features);
        let g = GuestState {
            regs,
            sregs,
            dirty: true,
            gprs: GuestRegs::default(),
            pending_in: None,
            cpuid: KVec::new(),
            fpu: KBox::new(FpuArea::reset(), GFP_KERNEL)?,
            xcr0: rkvm_core::xsave::X87,
            msrs: GuestMsrs::reset(sregs.apic_base),
            msr_features,
            msr_bitmap,
            pending_string_in: None,
            pending_mmio: None,
            msr_area,
            debug: Default::default(),
            events: EventState::default(),
            guest_debug: 0,
            step_done: false,
        };
        let state = VcpuState { vmcs, g };
        let vcpu = Arc::pin_init(
            pin_init!(Vcpu {
                vm,
                run_page,
                pio_page,
                exit_stats: crate::stats::ExitStats::new(),
                state <- new_killable_mutex!(state, "rkvm_vcpu"),
                _counted: Counted::new(Counter::Vcpus),
            }),
            GFP_KERNEL,
        )?;
        file::install(&VCPU_FOPS, vcpu)
    }

    fn get<T: AsBytes>(arg: usize, value: &T) -> Result<isize> {
        UserSlice::new(arg, core::mem::size_of::<T>()).writer().write(value)?;
        Ok(0)
    }

    fn read<T: FromBytes>(arg: usize) -> Result<T> {
        UserSlice::new(arg, core::mem::size_of::<T>()).reader().read()
    }

    fn set_sregs(&self, arg: usize) -> Result<isize> {
        let sregs: kvm_sregs = Self::read(arg)?;
        let control = ControlState {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            cs_l: sregs.cs.l != 0,
        };
        control.validate(GUEST_PHYS_ADDR_BITS).map_err(|_| EINVAL)?;
        let mut state = self.state.lock_killable()?;
        // As KVM: CR4 bits the guest's CPUID does not offer, or an APIC
        // base the MSR would refuse, fail the ioctl.
        if sregs.cr4 & x86::controlregs::Cr4::CR4_ENABLE_OS_XSAVE.bits() as u64 != 0
            && !crate::exit::cr::osxsave_allowed(&state.g.cpuid)
        {
            return Err(EINVAL);
        }
        if !rkvm_core::guest_msr::valid_apic_base(sregs.apic_base, &state.g.msr_features) {
            return Err(EINVAL);
        }
        state.g.msrs.apic_base = sregs.apic_base;
        // CR8 is not in the VMCS (MOV CR8 exits): `sregs.cr8` is the one
        // copy. As KVM's kvm_set_cr8, a value with reserved bits (above
        // bit 3) leaves the TPR as it was, without failing the ioctl.
        let cr8 = if sregs.cr8 >> 4 == 0 { sregs.cr8 } else { state.g.sregs.cr8 };
        state.g.sregs = kvm_sregs { cr8, ..sregs };
        state.g.dirty = true;
        Ok(0)
    }
}

/// KVM_GET_MSRS/KVM_SET_MSRS take fewer entries than this (KVM's
/// MAX_IO_MSRS: 256 or more is E2BIG).
const MAX_IO_MSRS: u32 = 256;

impl Vcpu {
    /// KVM_GET_MSRS (`set` false) or KVM_SET_MSRS: `struct kvm_msrs`, an
    /// 8-byte header (count, padding) then the entries. As KVM's `msr_io`:
    /// the header and every entry are read first (EFAULT if any cannot be),
    /// processing stops at the first unknown MSR or refused value, and
    /// KVM_GET_MSRS writes every entry back (EFAULT if it cannot). Returns
    /// how many MSRs were processed.
    fn msr_ioctl(&self, arg: usize, set: bool) -> Result<isize> {
        // The count, then 4 bytes of padding: both must be readable.
        let header: u64 = UserSlice::new(arg, 8).reader().read()?;
        let nmsrs = header as u32;
        if nmsrs >= MAX_IO_MSRS {
            return Err(kernel::error::code::E2BIG);
        }
        let entry_size = core::mem::size_of::<kvm_msr_entry>();
        let mut reader = UserSlice::new(arg, 8 + nmsrs as usize * entry_size).reader();
        reader.skip(8)?;
        let mut entries = KVec::with_capacity(nmsrs as usize, GFP_KERNEL)?;
        for _ in 0..nmsrs {
            entries.push(reader.read::<kvm_msr_entry>()?, GFP_KERNEL)?;
        }
        let mut done = 0;
        {
            let mut state = self.state.lock_killable()?;
            let GuestState { msrs: kept, msr_features, sregs, dirty, .. } = &mut state.g;
            for entry in entries.iter_mut() {
                if set {
                    if !msrs::set(kept, sregs, msr_features, entry.index, entry.data) {
                        break;
                    }
                    *dirty = true;
                } else {
                    let Some(value) = msrs::get(kept, sregs, msr_features, entry.index) else { break };
                    entry.data = value;
                }
                done += 1;
            }
        }
        if !set {
            let mut writer = UserSlice::new(arg + 8, nmsrs as usize * entry_size).writer();
            for entry in entries.iter() {
                writer.write(entry)?;
            }
        }
        Ok(done)
    }
}

fn events_to_kvm(e: &VcpuEvents) -> kvm_vcpu_events {
    // SAFETY: all-zero is a valid `kvm_vcpu_events` (integers only).
    let mut k: kvm_vcpu_events = unsafe { core::mem::zeroed() };
    k.exception.injected = e.exception_injected.into();
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = e.exception_has_error_code.into();
    k.exception.error_code = e.exception_error_code;
    k.interrupt.injected = e.interrupt_injected.into();
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = e.interrupt_soft.into();
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = e.nmi_injected.into();
    k.nmi.pending = e.nmi_pending.into();
    k.nmi.masked = e.nmi_masked.into();
    k.flags = e.flags;
    k
}

fn events_from_kvm(k: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: k.exception.injected != 0,
        exception_nr: k.exception.nr,
        exception_has_error_code: k.exception.has_error_code != 0,
        exception_pending: k.exception.pending != 0,
        exception_error_code: k.exception.error_code,
        interrupt_injected: k.interrupt.injected != 0,
        interrupt_nr: k.interrupt.nr,
        interrupt_soft: k.interrupt.soft != 0,
        interrupt_shadow: k.interrupt.shadow,
        nmi_injected: k.nmi.injected != 0,
        nmi_pending: k.nmi.pending != 0,
        nmi_masked: k.nmi.masked != 0,
        flags: k.flags,
        smm: k.smi.smm != 0,
        smi_pending: k.smi.pending != 0,
    }
}

/// A zeroed `struct kvm_xsave` (4 KiB: too big for the kernel stack).
fn xsave_buffer() -> Result<KBox<[u8; 4096]>> {
    let buf = KBox::<[u8; 4096]>::new_uninit(GFP_KERNEL)?;
    Ok(buf.write([0; 4096]))
}

/// The most XCRs `struct kvm_xcrs` carries (KVM_MAX_XCRS).
const MAX_XCRS: u32 = 16;

impl Vcpu {
    /// KVM_SET_GUEST_DEBUG: single-stepping and software breakpoints
    /// (api.rst 4.59); hardware breakpoints and injection flags are not
    /// implemented (EINVAL).
    fn set_guest_debug(&self, control: u32) -> Result<isize> {
        let supported = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_SW_BP;
        if control & !supported != 0 {
            return Err(EINVAL);
        }
        let mut state = self.state.lock_killable()?;
        let was_stepping = state.g.single_stepping();
        state.g.guest_debug = if control & KVM_GUESTDBG_ENABLE != 0 { control } else { 0 };
        if state.g.single_stepping() {
            state.g.regs.rflags |= RFLAGS_TF;
        } else {
            state.g.step_done = false;
            if was_stepping {
                state.g.regs.rflags &= !RFLAGS_TF;
            }
        }
        // RFLAGS is written back at the next entry, and the exception
        // bitmap at every run.
        state.g.dirty = true;
        Ok(0)
    }

    /// KVM_GET_XCRS: XCR0, or nothing on a host without XSAVE for guests.
    fn get_xcrs(&self, arg: usize) -> Result<isize> {
        // SAFETY: all-zero is a valid `kvm_xcrs` (integers only).
        let mut xcrs: kvm_xcrs = unsafe { core::mem::zeroed() };
        if crate::fpu::host_xcr0().is_some() {
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = self.state.lock_killable()?.g.xcr0;
        }
        Self::get(arg, &xcrs)
    }

    /// KVM_SET_XCRS: XCR0 checked as XSETBV checks it (other XCR numbers
    /// are ignored, as in KVM).
    ///
    /// # Errors
    /// `EINVAL` without XSAVE for guests, for nonzero flags, too many
    /// entries, or an XCR0 the guest's CPUID does not allow.
    fn set_xcrs(&self, arg: usize) -> Result<isize> {
        let xcrs: kvm_xcrs = Self::read(arg)?;
        if crate::fpu::host_xcr0().is_none() || xcrs.flags != 0 || xcrs.nr_xcrs > MAX_XCRS {
            return Err(EINVAL);
        }
        let mut state = self.state.lock_killable()?;
        if let Some(x) = xcrs.xcrs[..xcrs.nr_xcrs as usize].iter().find(|x| x.xcr == 0) {
            let allowed = crate::exit::xsetbv::allowed_xcr0(&state.g.cpuid);
            if !rkvm_core::xsave::valid_xcr0(x.value, allowed) {
                return Err(EINVAL);
            }
            state.g.xcr0 = x.value;
        }
        Ok(0)
    }
}

impl FileObject for Vcpu {
    const NAME: &'static CStr = c_str!("kvm-vcpu");

    fn ioctl(this: ArcBorrow<'_, Self>, cmd: u32, arg: usize) -> Result<isize> {
        // Only the VM's own process, and every wait for the vCPU killable
        // (a vCPU may run a guest that never exits by itself).
        this.vm.check_caller()?;
        match cmd {
            KVM_RUN if arg == 0 => this.run(),
            KVM_RUN => Err(EINVAL),
            KVM_GET_REGS => {
                let state = this.state.lock_killable()?;
                let mut regs = state.g.regs;
                if state.g.single_stepping() {
                    // The TF rkvm set is not the guest's (exit/debug.rs).
                    regs.rflags &= !RFLAGS_TF;
                }
                Self::get(arg, &regs)
            }
            KVM_SET_REGS => {
                let mut regs: kvm_regs = Self::read(arg)?;
                let mut state = this.state.lock_killable()?;
                if state.g.single_stepping() {
                    regs.rflags |= RFLAGS_TF;
                }
                state.g.regs = regs;
                state.g.dirty = true;
                Ok(0)
            }
            KVM_GET_SREGS => {
                let state = this.state.lock_killable()?;
                Self::get(arg, &kvm_sregs { apic_base: state.g.msrs.apic_base, ..state.g.sregs })
            }
            KVM_SET_SREGS => this.set_sregs(arg),
            KVM_INTERRUPT => {
                let irq: kvm_interrupt = Self::read(arg)?;
                // As KVM without an in-kernel irqchip: one queued vector; a
                // new one replaces it.
                let vector = u8::try_from(irq.irq).map_err(|_| EINVAL)?;
                this.state.lock_killable()?.g.events.pending_irq = Some(vector);
                Ok(0)
            }
            KVM_NMI => {
                this.state.lock_killable()?.g.events.nmi_pending = true;
                Ok(0)
            }
            KVM_GET_VCPU_EVENTS => Self::get(arg, &events_to_kvm(&this.state.lock_killable()?.g.events.to_kvm())),
            KVM_SET_VCPU_EVENTS => {
                let events: kvm_vcpu_events = Self::read(arg)?;
                this.state.lock_killable()?.g.events.set_from_kvm(&events_from_kvm(&events)).map_err(|_| EINVAL)?;
                Ok(0)
            }
            KVM_GET_STATS_FD => crate::stats::open(this),
            // The guest's TSC runs at the host's rate (offset, not scaled).
            KVM_GET_TSC_KHZ => Ok(glue::tsc_khz() as isize),
            KVM_SET_GUEST_DEBUG => {
                let debug: kvm_guest_debug = Self::read(arg)?;
                this.set_guest_debug(debug.control)
            }
            KVM_GET_MSRS => this.msr_ioctl(arg, false),
            KVM_SET_MSRS => this.msr_ioctl(arg, true),
            KVM_GET_FPU => Self::get(arg, &this.state.lock_killable()?.g.fpu.to_kvm()),
            KVM_SET_FPU => {
                let fpu: kvm_fpu = Self::read(arg)?;
                this.state.lock_killable()?.g.fpu.set_from_kvm(&fpu)?;
                Ok(0)
            }
            KVM_GET_XSAVE => {
                let mut buf = xsave_buffer()?;
                this.state.lock_killable()?.g.fpu.to_uabi(&mut buf);
                UserSlice::new(arg, buf.len()).writer().write_slice(&buf[..])?;
                Ok(0)
            }
            KVM_SET_XSAVE => {
                let mut buf = xsave_buffer()?;
                UserSlice::new(arg, buf.len()).reader().read_slice(&mut buf[..])?;
                this.state.lock_killable()?.g.fpu.set_from_uabi(&buf)?;
                Ok(0)
            }
            KVM_GET_XCRS => this.get_xcrs(arg),
            KVM_SET_XCRS => this.set_xcrs(arg),
            KVM_SET_CPUID2 => {
                let table = crate::cpuid::read_table(arg)?;
                let mut state = this.state.lock_killable()?;
                let state = &mut state.g;
                state.msr_features = MsrFeatures::from_cpuid(&table);
                msrs::build_bitmap(&mut state.msr_bitmap, state.msr_area.switches_tsc_aux(), &state.msr_features);
                state.cpuid = table;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }

    fn mmap(this: ArcBorrow<'_, Self>, vma: *mut bindings::vm_area_struct) -> Result {
        let pages = [this.run_page.as_ptr(), this.pio_page.as_ptr()];
        // SAFETY: called from the mmap file operation with the kernel's VMA;
        // both pages belong to this vCPU, which the open file keeps alive
        // for the duration of the call.
        unsafe { glue::vma_insert_pages(vma, &pages) }
    }
}
