//! A vCPU: its architectural state and the `struct kvm_run` page shared with
//! the VMM, reached through the file descriptor KVM_CREATE_VCPU returns
//! (api.rst section 4, "vCPU ioctls"). KVM_RUN is in `run.rs`, the exit
//! handlers in `exit/`.
//!
//! Context: ioctls run in the VMM's process context and may sleep; the
//! vCPU's mutex serializes them, as KVM's `vcpu->mutex` does.

use kernel::alloc::{KBox, KVec};
use kernel::bindings;
use kernel::c_str;
use kernel::error::{
    code::{EINVAL, ENOTTY},
    Result,
};
use kernel::new_mutex;
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow, Mutex};
use kernel::types::{AsBytes, FromBytes};
use kernel::uaccess::UserSlice;

use rkvm_core::cpu_state::ControlState;

use crate::file::{self, FileObject, FileOps};
use crate::fpu::FxArea;
use crate::msrs::{self, GuestMsrs};
use crate::glue;
use crate::kvm_abi::*;
use crate::mm::Page;
use crate::vm::Vm;
use crate::vmx::entry::GuestRegs;
use crate::vmx::vmcs::Vmcs;

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
}

/// What the vCPU's mutex protects.
pub(crate) struct VcpuState {
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
    pub(crate) vmcs: Vmcs,
    pub(crate) pending_in: Option<PendingIn>,
    /// The guest's CR8 (TPR), virtualized: MOV CR8 exits.
    pub(crate) cr8: u64,
    /// The guest's CPUID, from KVM_SET_CPUID2.
    pub(crate) cpuid: KVec<rkvm_core::cpuid::Entry>,
    /// The guest's x87/SSE registers.
    pub(crate) fpu: KBox<FxArea>,
    /// MSRs kept per vCPU (see msrs.rs).
    pub(crate) msrs: GuestMsrs,
    /// Set by an INS exit: completed at the next KVM_RUN.
    pub(crate) pending_string_in: Option<crate::exit::slow::PendingStringIn>,
    /// Set by an MMIO load: completed at the next KVM_RUN.
    pub(crate) pending_mmio: Option<crate::exit::slow::PendingMmioLoad>,
    /// The SYSCALL MSRs and KERNEL_GS_BASE, switched at entry and exit.
    pub(crate) msr_area: crate::vmx::msr_area::MsrArea,
    /// DR0-DR3 and DR6 (DR7 is in the VMCS).
    pub(crate) debug: crate::exit::dr::DebugRegs,
    /// An external interrupt queued by KVM_INTERRUPT, injected as soon as
    /// the guest can take it (events.rs).
    pub(crate) pending_irq: Option<u8>,
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
    #[pin]
    pub(crate) state: Mutex<VcpuState>,
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
        let state = VcpuState {
            regs,
            sregs,
            dirty: true,
            gprs: GuestRegs::default(),
            vmcs,
            pending_in: None,
            cr8: 0,
            cpuid: KVec::new(),
            fpu: KBox::new(FxArea::reset(), GFP_KERNEL)?,
            msrs: GuestMsrs::default(),
            pending_string_in: None,
            pending_mmio: None,
            msr_area: crate::vmx::msr_area::MsrArea::new()?,
            debug: Default::default(),
            pending_irq: None,
        };
        let vcpu = Arc::pin_init(
            pin_init!(Vcpu { vm, run_page, pio_page, state <- new_mutex!(state, "rkvm_vcpu") }),
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
        let mut state = self.state.lock();
        state.sregs = sregs;
        state.dirty = true;
        Ok(0)
    }
}

/// The most entries one KVM_GET_MSRS/KVM_SET_MSRS may carry (KVM's
/// KVM_MAX_MSR_ENTRIES).
const MAX_MSR_ENTRIES: u32 = 256;

impl Vcpu {
    /// KVM_GET_MSRS (`set` false) or KVM_SET_MSRS: `struct kvm_msrs`, a
    /// count then entries. Returns how many MSRs were processed: processing
    /// stops at the first unknown MSR or refused value, as in KVM.
    fn msr_ioctl(&self, arg: usize, set: bool) -> Result<isize> {
        let nmsrs: u32 = UserSlice::new(arg, 4).reader().read()?;
        if nmsrs > MAX_MSR_ENTRIES {
            return Err(kernel::error::code::E2BIG);
        }
        let entry_size = core::mem::size_of::<kvm_msr_entry>();
        let mut reader = UserSlice::new(arg, 8 + nmsrs as usize * entry_size).reader();
        reader.skip(8)?;
        let mut state = self.state.lock();
        let VcpuState { msrs: kept, sregs, dirty, .. } = &mut *state;
        let mut done = 0;
        for i in 0..nmsrs as usize {
            let mut entry: kvm_msr_entry = reader.read()?;
            if set {
                if !msrs::set(kept, sregs, entry.index, entry.data) {
                    break;
                }
                *dirty = true;
            } else {
                let Some(value) = msrs::get(kept, sregs, entry.index) else { break };
                entry.data = value;
                UserSlice::new(arg + 8 + i * entry_size, entry_size).writer().write(&entry)?;
            }
            done += 1;
        }
        Ok(done)
    }
}

impl FileObject for Vcpu {
    const NAME: &'static CStr = c_str!("kvm-vcpu");

    fn ioctl(this: ArcBorrow<'_, Self>, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            KVM_RUN if arg == 0 => this.run(),
            KVM_RUN => Err(EINVAL),
            KVM_GET_REGS => Self::get(arg, &this.state.lock().regs),
            KVM_SET_REGS => {
                let regs: kvm_regs = Self::read(arg)?;
                let mut state = this.state.lock();
                state.regs = regs;
                state.dirty = true;
                Ok(0)
            }
            KVM_GET_SREGS => Self::get(arg, &this.state.lock().sregs),
            KVM_SET_SREGS => this.set_sregs(arg),
            KVM_INTERRUPT => {
                let irq: kvm_interrupt = Self::read(arg)?;
                // As KVM without an in-kernel irqchip: one queued vector; a
                // new one replaces it.
                let vector = u8::try_from(irq.irq).map_err(|_| EINVAL)?;
                this.state.lock().pending_irq = Some(vector);
                Ok(0)
            }
            KVM_GET_MSRS => this.msr_ioctl(arg, false),
            KVM_SET_MSRS => this.msr_ioctl(arg, true),
            KVM_GET_FPU => Self::get(arg, &this.state.lock().fpu.to_kvm()),
            KVM_SET_FPU => {
                let fpu: kvm_fpu = Self::read(arg)?;
                let area = FxArea::from_kvm(&fpu)?;
                *this.state.lock().fpu = area;
                Ok(0)
            }
            KVM_SET_CPUID2 => {
                let table = crate::cpuid::read_table(arg)?;
                this.state.lock().cpuid = table;
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
