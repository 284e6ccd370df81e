//! The local APIC of the one vCPU (APIC ID 0), in xAPIC mode: its register
//! page at [`APIC_BASE`], its timer, self-IPIs and interrupt acceptance,
//! following the Intel SDM Vol. 3A chapter 11, "Advanced Programmable
//! Interrupt Controller (APIC)"; the section numbers below are that
//! chapter's.
//!
//! # Model
//!
//! Registers sit at 16-byte-aligned offsets and are accessed with aligned
//! 32-bit loads and stores only (11.4.1); other accesses are undefined on
//! hardware, and here read all ones and drop writes, with a debug log.
//! Reserved offsets read 0 and drop writes (no "illegal register address"
//! error, as KVM's). The page answers as QEMU's and KVM's for CPU 0: ID 0,
//! version 0x14 (an integrated xAPIC) with six LVT entries (timer, thermal,
//! performance counters, LINT0, LINT1, error; no CMCI), no EOI-broadcast
//! suppression (so SVR bit 12 is reserved).
//!
//! Interrupts (11.8): an interrupt the APIC accepts sets its vector in IRR;
//! the VMM asks [`LocalApic::pending_vector`] which one the CPU would take
//! now and, when it injects it, [`LocalApic::acknowledge`]s it, moving the
//! bit to ISR (the INTA cycle); the guest's EOI write clears the highest ISR
//! bit. A vector is delivered only if its priority class (bits 7:4) is above
//! the processor priority's (PPR, 11.8.3.1): the task priority (TPR) or the
//! class of the highest vector in service, whichever is higher. IRR holds
//! one request per vector, so requests for a vector already requested
//! coalesce. Every source here is edge-triggered: TMR stays 0 and EOI never
//! broadcasts. Vectors 0-15 are illegal (11.5.3): they are not accepted and
//! set "received illegal vector" in the error status.
//!
//! Software disable (11.4.7.2): with SVR bit 8 clear (as at reset) every
//! LVT entry is masked, and writes cannot unmask one; a write of SVR that
//! disables masks them all again. Enabling leaves them masked until the
//! guest rewrites them. While disabled, the APIC delivers nothing and drops
//! fixed interrupts sent to it, as KVM's does; IRR and ISR keep what they
//! hold, and EOI still works. [`LocalApic::with_virtual_wire`] is the one
//! exception: the hand-off state it gives an OS has LINT0 unmasked in
//! ExtINT mode with the APIC still software-disabled, as KVM's reset gives
//! CPU 0 (quirk `KVM_X86_QUIRK_LINT0_REENABLED`), so the 8259A's interrupts
//! reach the CPU before the OS has set the APIC up.
//!
//! The 8259A is wired to LINT0 (the "virtual wire", 11.5.1 and MP spec
//! 3.6.2.2): its interrupts do not go through IRR at all; the VMM asks
//! [`LocalApic::accepts_pic_interrupts`] and takes the vector from the PIC's
//! own INTA cycle. ExtINT is not subject to the processor priority. LINT1
//! (NMI) has nothing wired to it here.
//!
//! The timer, its modes and its count on the VM's clock, are in [`timer`];
//! the tests, in `tests.rs`.
//!
//! # What Linux 6.12 does with it (arch/x86/kernel/apic/)
//!
//! - Probing: reads ID and version (`apic_read_boot_cpu_id`); the maximum
//!   LVT index 5 makes it use the ESR and the performance and thermal LVTs
//!   but not CMCI.
//! - `setup_local_APIC`: SVR with the enable bit cleared (masking LINT0 too:
//!   the 8259A is cut off until LVT0 is rewritten, with interrupts
//!   disabled), TPR = 0x10, `apic_pending_intr_clear` (reads the eight IRR
//!   and ISR registers, writes EOI once per ISR bit), SVR = 0x1ff (enabled,
//!   spurious vector 0xff), LVT0 = 0x700 (ExtINT, unmasked on CPU 0 with no
//!   I/O APIC), LVT1 = 0x400 (NMI). `lapic_setup_esr`: ESR write, read,
//!   LVT error = 0xfe, ESR write, read.
//! - Timer (`__setup_APIC_LVTT`): LVTT = 0xec, periodic or one-shot,
//!   masked if no interrupt is wanted; divide configuration read, set to
//!   16 (0x3); in periodic mode TMICT = `lapic_timer_period` / 16. In
//!   one-shot mode `lapic_next_event` writes TMICT once per event;
//!   `lapic_timer_shutdown` sets the LVTT mask bit and writes TMICT = 0.
//!   `lapic_timer_period` comes from CPUID leaf 15H's crystal clock
//!   (`native_calibrate_tsc`); without it `calibrate_APIC_clock` runs a
//!   masked periodic count of 0xffffffff / 16 and reads TMCCT.
//! - Self-IPI (irq_work, vector 0xf6): `__default_send_IPI_shortcut` reads
//!   ICR until the delivery status bit is clear, then writes ICR low with
//!   shorthand "self", fixed mode and the vector. IPIs to a CPU by number
//!   (the physical flat driver) write ICR high (APIC ID << 24), then ICR
//!   low with no shorthand.
//! - Every handler ends with an EOI write; the spurious-interrupt handler
//!   reads the ISR register holding its vector.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::bus::MmioDevice;

mod timer;
#[cfg(test)]
mod tests;

use timer::{Countdown, MIN_PERIOD};

/// Default guest-physical base of the local APIC (IA32_APIC_BASE at reset).
pub const APIC_BASE: u64 = 0xfee0_0000;
/// One 4 KiB page of registers.
pub const APIC_LEN: u64 = 0x1000;

/// Local APIC version register: version 0x14 (an integrated xAPIC), max
/// LVT entry 5 (timer, thermal, performance, LINT0, LINT1, error), bit 24
/// (EOI-broadcast suppression) clear.
const VERSION: u32 = 0x0005_0014;

/// Vectors 0-15 are reserved for exceptions and illegal in interrupts
/// (11.5.3, "Received Illegal Vector").
const FIRST_LEGAL_VECTOR: u8 = 16;

/// TPR: the task priority, bits 7:0 (11.8.3.1).
const TPR_WRITABLE: u32 = 0xff;
/// LDR: the logical APIC ID, bits 31:24 (11.6.2.2).
const LDR_WRITABLE: u32 = 0xff00_0000;
/// DFR: the model, bits 31:28 (1111 flat, 0000 cluster); the rest reads as
/// ones (11.6.2.2).
const DFR_MODEL: u32 = 0xf000_0000;
const DFR_FLAT: u32 = 0xf;
const DFR_CLUSTER: u32 = 0x0;
/// SVR (11.9, Figure 11-23): spurious vector (bits 7:0), APIC software
/// enable (8), focus processor checking (9). Bit 12, EOI-broadcast
/// suppression, is reserved: the version register does not offer it.
const SVR_WRITABLE: u32 = 0x3ff;
const SVR_ENABLED: u32 = 1 << 8;
/// SVR at reset: spurious vector 0xff, software-disabled (11.4.7.1).
const SVR_RESET: u32 = 0xff;

/// ICR low (11.6.1, Figure 11-12): vector, delivery mode, destination mode,
/// level, trigger mode and shorthand are writable; the delivery status (bit
/// 12) reads 0: every IPI is sent by the time the write completes.
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
const ICR_LOGICAL: u32 = 1 << 11;
const ICR_SHORTHAND_SHIFT: u32 = 18;
/// ICR high: the destination field, bits 63:56 of the ICR.
const ICR_HIGH_WRITABLE: u32 = 0xff00_0000;
/// The physical and logical destination that addresses every APIC
/// (11.6.2.1, 11.6.2.2).
const BROADCAST: u8 = 0xff;
/// This CPU's APIC ID.
const APIC_ID: u8 = 0;

/// Delivery modes of ICR and LVT entries (bits 10:8).
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_FIXED: u32 = 0b000;
const DELIVERY_LOWEST_PRIORITY: u32 = 0b001;
const DELIVERY_NMI: u32 = 0b100;
const DELIVERY_EXTINT: u32 = 0b111;

/// ESR bits (11.5.3, Figure 11-9) this APIC can set.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// The LVT entries, in register order from 0x320 (Figure 11-8).
const LVT_FIRST: u64 = 0x320;
const LVT_LAST: u64 = 0x370;
const LVT_COUNT: usize = 6;
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
/// Writable bits of each entry (Figure 11-8): all have a vector and a mask
/// (bit 16); the timer a mode (bits 18:17); thermal, performance and the
/// LINTs a delivery mode; the LINTs a polarity (13) and trigger mode (15).
/// Delivery status (12) and remote IRR (14) are read-only, and 0 here.
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x0007_00ff, 0x0001_07ff, 0x0001_07ff, 0x0001_a7ff, 0x0001_a7ff, 0x0001_00ff];
const LVT_MASKED: u32 = 1 << 16;

fn lvt_vector(lvt: u32) -> u8 {
    lvt.to_le_bytes()[0]
}

fn delivery_mode(value: u32) -> u32 {
    (value >> DELIVERY_MODE_SHIFT) & 0b111
}

/// What an offset (16-byte aligned) holds. SDM Table 11-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    /// APIC ID: 0, the only CPU; writes are ignored.
    Id,
    Version,
    TaskPriority,
    /// Arbitration priority: reads 0 (not used with system-bus delivery).
    ArbitrationPriority,
    ProcessorPriority,
    /// Written to signal end of interrupt; reads 0.
    Eoi,
    /// Remote read: no remote reads are ever made; reads 0.
    RemoteRead,
    LogicalDestination,
    DestinationFormat,
    SpuriousVector,
    /// ISR, TMR and IRR: 256 bits each, as eight read-only registers of 32
    /// vectors (the index).
    InService(usize),
    TriggerMode(usize),
    Request(usize),
    ErrorStatus,
    CommandLow,
    CommandHigh,
    /// LVT entries, indexed as in `LVT_WRITABLE`.
    Lvt(usize),
    InitialCount,
    CurrentCount,
    DivideConfig,
    Reserved,
}

fn register(offset: u64) -> Reg {
    // An index below 8 (or 6 for the LVT): offsets are 16-byte aligned.
    let index = |first: u64| usize::try_from((offset - first) >> 4).unwrap_or(usize::MAX);
    match offset {
        0x020 => Reg::Id,
        0x030 => Reg::Version,
        0x080 => Reg::TaskPriority,
        0x090 => Reg::ArbitrationPriority,
        0x0a0 => Reg::ProcessorPriority,
        0x0b0 => Reg::Eoi,
        0x0c0 => Reg::RemoteRead,
        0x0d0 => Reg::LogicalDestination,
        0x0e0 => Reg::DestinationFormat,
        0x0f0 => Reg::SpuriousVector,
        0x100..=0x170 => Reg::InService(index(0x100)),
        0x180..=0x1f0 => Reg::TriggerMode(index(0x180)),
        0x200..=0x270 => Reg::Request(index(0x200)),
        0x280 => Reg::ErrorStatus,
        0x300 => Reg::CommandLow,
        0x310 => Reg::CommandHigh,
        LVT_FIRST..=LVT_LAST => Reg::Lvt(index(LVT_FIRST)),
        0x380 => Reg::InitialCount,
        0x390 => Reg::CurrentCount,
        0x3e0 => Reg::DivideConfig,
        _ => Reg::Reserved,
    }
}

/// The register an access addresses, if it is an aligned 32-bit one.
fn aligned(offset: u64, len: usize) -> Option<Reg> {
    (len == 4 && offset.is_multiple_of(16)).then(|| register(offset))
}

/// 256 vectors, one bit each, laid out as the eight 32-bit ISR, TMR or IRR
/// registers are: vector v is bit v % 32 of register v / 32 (11.8.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn insert(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] |= 1 << (vector & 31);
    }

    fn remove(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] &= !(1 << (vector & 31));
    }

    /// The highest vector in the set: the one of highest priority.
    fn highest(&self) -> Option<u8> {
        (0u8..8).rev().find_map(|index| {
            let word = self.0[usize::from(index)];
            // leading_zeros is below 32 for a nonzero word.
            (word != 0).then(|| index * 32 + (31 - word.leading_zeros() as u8))
        })
    }

    /// Register `index` (0-7): vectors 32 * index to 32 * index + 31.
    fn register(&self, index: usize) -> u32 {
        self.0.get(index).copied().unwrap_or(0)
    }
}

/// The local APIC of the vCPU, timed by the VM's clock.
pub struct LocalApic {
    clock: Box<dyn Fn() -> Duration>,
    /// The timer's input clock, before the divider.
    timer_hz: u64,
    tpr: u8,
    ldr: u32,
    /// DFR's model bits (31:28); the rest reads as ones.
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    irr: VectorSet,
    /// Errors detected since the last ESR write; the ESR, what that write
    /// latched of them (11.5.3).
    errors: u32,
    esr: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; LVT_COUNT],
    /// TMICT as written (0 when stopped by TSC-deadline mode).
    initial_count: u32,
    divide_config: u32,
    /// `None`: stopped (never started, TMICT 0, or a one-shot count ended),
    /// the current count reads 0.
    timer: Option<Countdown>,
    /// The shortest period a periodic timer reloads with ([`MIN_PERIOD`]).
    min_period: Duration,
}

impl Default for LocalApic {
    /// A reset APIC whose clock stays at 0, for guests that only probe the
    /// page: its timer never counts.
    fn default() -> Self {
        Self::new(|| Duration::ZERO, 1_000_000_000)
    }
}

impl LocalApic {
    /// An APIC as after reset (11.4.7.1): LVT entries masked, DFR all ones
    /// (flat model), spurious vector 0xff with the APIC software-disabled,
    /// the rest 0. `clock` gives the time since the VM started and never
    /// goes backwards; `timer_hz` is the timer's input clock (the core
    /// crystal clock the VMM announces in CPUID leaf 15H): the timer counts
    /// at `timer_hz` / divide.
    ///
    /// # Panics
    /// If `timer_hz` is 0: a wiring bug in the VMM.
    pub fn new(clock: impl Fn() -> Duration + 'static, timer_hz: u64) -> Self {
        assert!(timer_hz > 0, "the APIC timer needs an input clock");
        Self {
            clock: Box::new(clock),
            timer_hz,
            tpr: 0,
            ldr: 0,
            dfr: DFR_MODEL,
            svr: SVR_RESET,
            isr: VectorSet::default(),
            irr: VectorSet::default(),
            errors: 0,
            esr: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            initial_count: 0,
            divide_config: 0,
            timer: None,
            min_period: MIN_PERIOD,
        }
    }

    /// The state firmware hands an OS: LINT0 unmasked in ExtINT mode (0x700)
    /// and LINT1 unmasked in NMI mode (0x400), the "virtual wire" through
    /// which the 8259A's interrupts reach the CPU. SVR stays at its reset
    /// value 0xff (software-disabled), as in KVM's reset state for CPU 0;
    /// SeaBIOS instead software-enables the APIC before writing the LINTs
    /// (level-triggered, 0x8700 and 0x8400), since software cannot unmask
    /// an LVT entry while the APIC is disabled. Either way the OS keeps
    /// this state until it sets the APIC up itself, which Linux begins by
    /// disabling it.
    pub fn with_virtual_wire(mut self) -> Self {
        self.lvt[LVT_LINT0] = DELIVERY_EXTINT << DELIVERY_MODE_SHIFT;
        self.lvt[LVT_LINT1] = DELIVERY_NMI << DELIVERY_MODE_SHIFT;
        self
    }

    /// The vector the APIC would deliver now: the highest requested whose
    /// priority class is above the processor priority's (11.8.3.1); `None`
    /// if there is none or the APIC is software-disabled.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.processor_priority() >> 4).then_some(vector)
    }

    /// The INTA cycle: moves [`Self::pending_vector`] from IRR to ISR and
    /// returns it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pending_vector()?;
        self.irr.remove(vector);
        self.isr.insert(vector);
        Some(vector)
    }

    /// Whether an 8259A interrupt (ExtINT, through LINT0) may reach the
    /// CPU: LVT0 unmasked in ExtINT delivery mode, as KVM's
    /// `kvm_apic_accept_pic_intr` decides. The processor priority does not
    /// apply to ExtINT.
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        lint0 & LVT_MASKED == 0 && delivery_mode(lint0) == DELIVERY_EXTINT
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLED != 0
    }

    /// PPR (11.8.3.1): the task priority, or the class of the highest
    /// vector in service if that is higher (with sub-class 0).
    fn processor_priority(&self) -> u8 {
        let in_service = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= in_service >> 4 {
            self.tpr
        } else {
            in_service & 0xf0
        }
    }

    /// An interrupt reaching the APIC with fixed delivery (11.8.3).
    fn accept(&mut self, vector: u8) {
        if !self.software_enabled() {
            log::debug!("APIC: vector {vector:#04x} dropped: the APIC is software-disabled");
        } else if vector < FIRST_LEGAL_VECTOR {
            log::debug!("APIC: illegal vector {vector} not accepted");
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
        } else {
            self.irr.insert(vector);
        }
    }

    /// Records an error for the next ESR write to latch, and requests the
    /// LVT error entry's vector unless it is masked (11.5.3). An illegal
    /// vector there is itself an error, but raises no further interrupt.
    fn signal_error(&mut self, bits: u32) {
        self.errors |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        match lvt_vector(lvt) {
            vector if vector < FIRST_LEGAL_VECTOR => self.errors |= ESR_RECEIVE_ILLEGAL_VECTOR,
            vector => self.irr.insert(vector),
        }
    }

    /// EOI (11.8.5): the highest vector in service is done. Every vector is
    /// edge-triggered, so nothing is broadcast.
    fn end_of_interrupt(&mut self) {
        if let Some(vector) = self.isr.highest() {
            self.isr.remove(vector);
        }
    }

    /// An LVT entry's new value: its writable bits, masked while the APIC
    /// is software-disabled (11.4.7.2).
    fn lvt_value(&self, index: usize, value: u32) -> u32 {
        let value = value & LVT_WRITABLE[index];
        if self.software_enabled() {
            value
        } else {
            value | LVT_MASKED
        }
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_WRITABLE;
        if !self.software_enabled() {
            for lvt in &mut self.lvt {
                *lvt |= LVT_MASKED;
            }
        }
    }

    /// Whether an IPI with no shorthand addresses this APIC (11.6.2):
    /// physical destination = APIC ID, or logical destination matching LDR
    /// in the flat or cluster model; all ones is a broadcast in both.
    fn is_destination(&self, destination: u8, logical: bool) -> bool {
        if destination == BROADCAST {
            return true;
        }
        if !logical {
            return destination == APIC_ID;
        }
        let logical_id = self.ldr.to_be_bytes()[0];
        match self.dfr >> 28 {
            DFR_FLAT => destination & logical_id != 0,
            DFR_CLUSTER => destination >> 4 == logical_id >> 4 && destination & logical_id & 0xf != 0,
            model => {
                log::debug!("APIC: logical IPI with reserved DFR model {model:#x} reaches no APIC");
                false
            }
        }
    }

    /// A write of ICR low sends the IPI it describes (11.6.1). With one
    /// CPU, only fixed (and lowest-priority, which picks this CPU) IPIs to
    /// this APIC do anything: they request their vector.
    fn send_ipi(&mut self) {
        let icr = self.icr_low;
        let vector = lvt_vector(icr);
        let to_self = match (icr >> ICR_SHORTHAND_SHIFT) & 0b11 {
            0b00 => self.is_destination(self.icr_high.to_be_bytes()[0], icr & ICR_LOGICAL != 0),
            // Self, all including self.
            0b01 | 0b10 => true,
            // All excluding self: there is no other CPU.
            _ => false,
        };
        match delivery_mode(icr) {
            DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY => {
                if vector < FIRST_LEGAL_VECTOR {
                    self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
                }
                if to_self {
                    self.accept(vector);
                } else {
                    log::debug!("APIC: IPI {icr:#x} to {:#x} reaches no CPU", self.icr_high);
                }
            }
            mode => log::debug!("APIC: IPI {icr:#x} with delivery mode {mode:#05b} ignored"),
        }
    }

    fn read_register(&self, now: Duration, reg: Reg, offset: u64) -> u32 {
        match reg {
            Reg::Id | Reg::ArbitrationPriority | Reg::Eoi | Reg::RemoteRead | Reg::TriggerMode(_) => 0,
            Reg::Version => VERSION,
            Reg::TaskPriority => u32::from(self.tpr),
            Reg::ProcessorPriority => u32::from(self.processor_priority()),
            Reg::LogicalDestination => self.ldr,
            Reg::DestinationFormat => self.dfr | !DFR_MODEL,
            Reg::SpuriousVector => self.svr,
            Reg::InService(index) => self.isr.register(index),
            Reg::Request(index) => self.irr.register(index),
            Reg::ErrorStatus => self.esr,
            Reg::CommandLow => self.icr_low,
            Reg::CommandHigh => self.icr_high,
            Reg::Lvt(index) => self.lvt[index],
            Reg::InitialCount => self.initial_count,
            Reg::CurrentCount => self.current_count(now),
            Reg::DivideConfig => self.divide_config,
            Reg::Reserved => {
                log::debug!("APIC: read of reserved register {offset:#x} reads 0");
                0
            }
        }
    }

    fn write_register(&mut self, now: Duration, reg: Reg, offset: u64, value: u32) {
        match reg {
            Reg::TaskPriority => self.tpr = (value & TPR_WRITABLE).to_le_bytes()[0],
            Reg::Eoi => self.end_of_interrupt(),
            Reg::LogicalDestination => self.ldr = value & LDR_WRITABLE,
            Reg::DestinationFormat => self.dfr = value & DFR_MODEL,
            Reg::SpuriousVector => self.write_svr(value),
            // Latches the errors since the last write; the value is
            // irrelevant (11.5.3).
            Reg::ErrorStatus => self.esr = std::mem::take(&mut self.errors),
            Reg::CommandLow => {
                self.icr_low = value & ICR_LOW_WRITABLE;
                self.send_ipi();
            }
            Reg::CommandHigh => self.icr_high = value & ICR_HIGH_WRITABLE,
            Reg::Lvt(LVT_TIMER) => self.write_lvt_timer(now, value),
            Reg::Lvt(index) => self.lvt[index] = self.lvt_value(index, value),
            Reg::InitialCount => self.write_initial_count(now, value),
            Reg::DivideConfig => self.write_divide_config(now, value),
            Reg::Id
            | Reg::Version
            | Reg::ArbitrationPriority
            | Reg::ProcessorPriority
            | Reg::RemoteRead
            | Reg::InService(_)
            | Reg::TriggerMode(_)
            | Reg::Request(_)
            | Reg::CurrentCount
            | Reg::Reserved => log::debug!("APIC: write {value:#x} to {reg:?} register {offset:#x} ignored"),
        }
    }
}

impl MmioDevice for LocalApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(reg) = aligned(offset, data.len()) else {
            log::debug!("APIC: {}-byte read at offset {offset:#x} reads as all ones", data.len());
            data.fill(0xff);
            return;
        };
        let now = (self.clock)();
        self.update(now);
        data.copy_from_slice(&self.read_register(now, reg, offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(reg), Ok(bytes)) = (aligned(offset, data.len()), <[u8; 4]>::try_from(data)) else {
            log::debug!("APIC: {}-byte write at offset {offset:#x} ignored", data.len());
            return;
        };
        let now = (self.clock)();
        self.update(now);
        self.write_register(now, reg, offset, u32::from_le_bytes(bytes));
    }
}

/// The local APIC on the MMIO bus, shared with the VMM's run loop, which
/// polls it and acknowledges its interrupts (device models run on one
/// thread).
pub struct SharedApic(pub Rc<RefCell<LocalApic>>);

impl MmioDevice for SharedApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.borrow_mut().read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.borrow_mut().write(offset, data);
    }
}
