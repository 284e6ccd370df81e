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
//! # Timer
//!
//! The timer (11.5.4) counts down at `timer_hz` / divide, where the divide
//! configuration register selects 1 to 128, from the initial count written
//! to TMICT. When the count reaches 0 the timer expires: its LVT vector is
//! requested (unless the entry is masked; the count goes on regardless). In
//! one-shot mode it then stays at 0; in periodic mode it reloads the initial
//! count and counts on, though never with a period under 200 µs (as KVM;
//! see [`MIN_PERIOD`]). A write of TMICT starts a new count (0 stops the
//! timer). TSC-deadline mode is not offered (CPUID does not advertise it):
//! an LVT timer entry selecting it, or the reserved mode 11, stops the timer
//! and makes TMICT writes ignored, as 11.5.4.1 says of TSC-deadline mode.
//!
//! Nothing here runs by itself, as in the PIT model: time comes from a
//! clock handed over at construction (the time since the VM started), and
//! the counting timer is a [`Countdown`]: the count it had at an instant
//! and the expiries already taken. The current count and the expiries are
//! computed from the clock when asked, so nothing is stored per tick, and
//! the arithmetic is in `u128`. [`LocalApic::poll`] latches expiries into
//! IRR; several periods elapsed between polls request the vector once, as
//! IRR's single bit per vector makes hardware do too.
//! [`LocalApic::next_deadline`] says when the next expiry is due, for the
//! VMM to kick the vCPU out of the guest then. Every register access polls
//! first, so a guest reading IRR or reprogramming the timer sees expiries up
//! to the moment of the access.
//!
//! What the SDM leaves open, settled as simply as KVM does:
//! - Changing the timer mode between one-shot and periodic (11.5.4: that
//!   does not start a stopped timer) lets a running count go on from its
//!   current value; what happens when it reaches 0 follows the new mode.
//! - Changing the divide configuration while counting restarts the count
//!   from its current value at the new rate (the fraction of a count under
//!   way is lost); a periodic timer then still reloads the initial count.
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

/// Default guest-physical base of the local APIC (IA32_APIC_BASE at reset).
pub const APIC_BASE: u64 = 0xfee0_0000;
/// One 4 KiB page of registers.
pub const APIC_LEN: u64 = 0x1000;

const NANOS_PER_SEC: u128 = 1_000_000_000;

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
const TIMER_MODE_SHIFT: u32 = 17;

/// Divide configuration: bits 0, 1 and 3 (11.5.4, Figure 11-10).
const DIVIDE_WRITABLE: u32 = 0b1011;

fn lvt_vector(lvt: u32) -> u8 {
    lvt.to_le_bytes()[0]
}

fn delivery_mode(value: u32) -> u32 {
    (value >> DELIVERY_MODE_SHIFT) & 0b111
}

/// A time `nanos` after time 0, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // Below 10^9, so it fits and carries nothing into the seconds.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
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

/// The LVT timer entry's mode (bits 18:17, 11.5.4 Table 11-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    /// TSC-deadline (10), not offered, or reserved (11): the timer stays
    /// stopped.
    Unsupported,
}

impl TimerMode {
    fn of(lvt_timer: u32) -> Self {
        match (lvt_timer >> TIMER_MODE_SHIFT) & 0b11 {
            0b00 => Self::OneShot,
            0b01 => Self::Periodic,
            _ => Self::Unsupported,
        }
    }
}

/// A counting timer: its current count was `from` at time `since`, and
/// falls by one every `divide` ticks of the input clock. It expires when
/// the count reaches 0 (after `from` counts), and in periodic mode again
/// every `initial` counts after that.
#[derive(Clone, Copy, Debug)]
struct Countdown {
    /// The initial count, reloaded in periodic mode: at least 1.
    initial: u32,
    /// At least 1.
    from: u32,
    since: Duration,
    /// 1 to 128.
    divide: u32,
    /// Expiries since `since` already latched (or dropped, if masked).
    latched: u128,
}

impl Countdown {
    /// Counts (decrements) made by time `now`, for an input clock of `hz`.
    fn counts_by(&self, now: Duration, hz: u64) -> u128 {
        let nanos = now.saturating_sub(self.since).as_nanos();
        nanos.saturating_mul(u128::from(hz)) / (NANOS_PER_SEC * u128::from(self.divide))
    }

    /// Expiries after `counts` counts.
    fn expiries(&self, counts: u128, periodic: bool) -> u128 {
        let from = u128::from(self.from);
        match counts.checked_sub(from) {
            None => 0,
            Some(past) if periodic => 1 + past / u128::from(self.initial.max(1)),
            Some(_) => 1,
        }
    }

    /// The current count after `counts` counts: in periodic mode it reloads
    /// as it reaches 0, so it reads the initial count, never 0.
    fn current_count(&self, counts: u128, periodic: bool) -> u32 {
        let from = u128::from(self.from);
        let count = match counts.checked_sub(from) {
            None => from - counts,
            Some(past) if periodic => {
                let initial = u128::from(self.initial.max(1));
                initial - past % initial
            }
            Some(_) => 0,
        };
        // Never above `from` or `initial`, both u32.
        u32::try_from(count).unwrap_or(0)
    }

    /// When expiry number `n` (from 1) comes: the first nanosecond at which
    /// `counts_by` has counted to it.
    fn expiry_time(&self, n: u128, hz: u64) -> Duration {
        let counts = u128::from(self.from).saturating_add((n - 1).saturating_mul(u128::from(self.initial)));
        let nanos = counts.saturating_mul(u128::from(self.divide) * NANOS_PER_SEC).div_ceil(u128::from(hz));
        self.since.saturating_add(duration_from_nanos(nanos))
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

/// The shortest period of a periodic timer, as KVM's `min_timer_period_us`
/// (200 µs): a guest asking for less gets this, so it cannot make the VMM
/// kick it out of the guest (an exit, a signal, an injection) millions of
/// times a second. One-shot counts are not limited: each takes a TMICT
/// write, itself an exit. Linux programs the timer one-shot.
const MIN_PERIOD: Duration = Duration::from_micros(200);

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

    /// Latches timer expiries up to now: requests the timer's vector
    /// (unless LVTT is masked), ends a one-shot count, and lets a periodic
    /// one go on.
    pub fn poll(&mut self) {
        let now = (self.clock)();
        self.update(now);
    }

    /// When the timer next requests its vector (time since the VM
    /// started): in the past if an expiry is waiting for [`Self::poll`];
    /// `None` if the timer is stopped, or its LVT entry masked (it counts,
    /// but requests nothing: a register write unmasking it is an exit after
    /// which the VMM asks again).
    pub fn next_deadline(&self) -> Option<Duration> {
        let countdown = self.timer.as_ref()?;
        if self.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        Some(countdown.expiry_time(countdown.latched + 1, self.timer_hz))
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

    fn timer_mode(&self) -> TimerMode {
        TimerMode::of(self.lvt[LVT_TIMER])
    }

    /// 2, 4, 8, ..., 128, or 1: the divide configuration's bits 3, 1 and 0
    /// as a 3-bit number n give 2^(n + 1), 111 giving 1 (Figure 11-10).
    fn divider(&self) -> u32 {
        let code = (self.divide_config & 0b11) | ((self.divide_config >> 1) & 0b100);
        if code == 0b111 {
            1
        } else {
            2 << code
        }
    }

    /// Latches the expiries due by `now`.
    fn update(&mut self, now: Duration) {
        let periodic = self.timer_mode() == TimerMode::Periodic;
        let hz = self.timer_hz;
        let Some(countdown) = self.timer.as_mut() else { return };
        let expiries = countdown.expiries(countdown.counts_by(now, hz), periodic);
        if expiries <= countdown.latched {
            return;
        }
        countdown.latched = expiries;
        if !periodic {
            self.timer = None;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt_vector(lvt));
        }
    }

    /// TMCCT at `now`, after `update(now)`.
    fn current_count(&self, now: Duration) -> u32 {
        let periodic = self.timer_mode() == TimerMode::Periodic;
        self.timer.map_or(0, |countdown| countdown.current_count(countdown.counts_by(now, self.timer_hz), periodic))
    }

    /// Counts down from `from` as of `now`, reloading TMICT in periodic
    /// mode; 0 stops the timer.
    /// The reload count is at least [`MIN_PERIOD`]'s worth of counts; the
    /// count under way is not shortened or lengthened.
    fn start_timer(&mut self, now: Duration, from: u32) {
        let divide = self.divider();
        let shortest = (self.min_period.as_nanos() * u128::from(self.timer_hz))
            .div_ceil(NANOS_PER_SEC * u128::from(divide));
        let shortest = u32::try_from(shortest).unwrap_or(u32::MAX);
        self.timer = (from != 0).then(|| Countdown {
            initial: self.initial_count.max(1).max(shortest),
            from,
            since: now,
            divide,
            latched: 0,
        });
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

    /// The LVT timer entry. A change between one-shot and periodic lets a
    /// running count go on; one to or from TSC-deadline (or the reserved)
    /// mode disarms the timer (11.5.4.1).
    fn write_lvt_timer(&mut self, now: Duration, value: u32) {
        let (before, current) = (self.timer_mode(), self.current_count(now));
        self.lvt[LVT_TIMER] = self.lvt_value(LVT_TIMER, value);
        let after = self.timer_mode();
        match (before, after) {
            _ if before == after => {}
            (_, TimerMode::Unsupported) => {
                log::debug!("APIC: LVT timer {value:#x}: TSC-deadline or reserved mode, not offered; timer stopped");
                self.initial_count = 0;
                self.timer = None;
            }
            // Stopped on entering that mode; a TMICT write starts it again.
            (TimerMode::Unsupported, _) => {}
            // A count that changes mode goes on from where it is; this also
            // ends the periods already counted, which the new mode does not
            // reckon with.
            _ if self.timer.is_some() => self.start_timer(now, current),
            _ => {}
        }
    }

    /// TMICT (11.5.4): (re)starts the count; 0 stops the timer.
    fn write_initial_count(&mut self, now: Duration, value: u32) {
        if self.timer_mode() == TimerMode::Unsupported {
            log::debug!("APIC: TMICT {value:#x} ignored: the LVT timer mode is TSC-deadline or reserved");
            return;
        }
        self.initial_count = value;
        self.start_timer(now, value);
    }

    /// The divide configuration: a running count goes on from its current
    /// value at the new rate.
    fn write_divide_config(&mut self, now: Duration, value: u32) {
        let (before, current) = (self.divider(), self.current_count(now));
        self.divide_config = value & DIVIDE_WRITABLE;
        if self.timer.is_some() && self.divider() != before {
            self.start_timer(now, current);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::MmioBus;
    use std::cell::Cell;

    const ID: u64 = 0x20;
    const VERSION_REG: u64 = 0x30;
    const TPR: u64 = 0x80;
    const PPR: u64 = 0xa0;
    const EOI: u64 = 0xb0;
    const LDR: u64 = 0xd0;
    const DFR: u64 = 0xe0;
    const SVR: u64 = 0xf0;
    const ISR: u64 = 0x100;
    const TMR: u64 = 0x180;
    const IRR: u64 = 0x200;
    const ESR: u64 = 0x280;
    const ICR: u64 = 0x300;
    const ICR2: u64 = 0x310;
    const LVTT: u64 = 0x320;
    const LVT0: u64 = 0x350;
    const LVT1: u64 = 0x360;
    const LVTERR: u64 = 0x370;
    const TMICT: u64 = 0x380;
    const TMCCT: u64 = 0x390;
    const TDCR: u64 = 0x3e0;

    const PERIODIC: u32 = 1 << 17;
    const TSC_DEADLINE: u32 = 2 << 17;
    const MASKED: u32 = 1 << 16;
    const SELF: u32 = 1 << 18;
    const ALL_INCLUDING_SELF: u32 = 2 << 18;
    const ALL_EXCLUDING_SELF: u32 = 3 << 18;
    /// Linux's timer vector.
    const TIMER_VECTOR: u32 = 0xec;

    /// An APIC with a fake clock, software-enabled unless built with
    /// `reset`.
    struct Machine {
        apic: LocalApic,
        now: Rc<Cell<Duration>>,
    }

    impl Machine {
        /// Without the periodic timer's floor, so that the count
        /// arithmetic can be checked with short periods (the floor has a
        /// test of its own).
        fn reset(timer_hz: u64) -> Self {
            let now = Rc::new(Cell::new(Duration::ZERO));
            let clock = now.clone();
            let mut apic = LocalApic::new(move || clock.get(), timer_hz);
            apic.min_period = Duration::ZERO;
            Self { apic, now }
        }

        /// As firmware leaves it.
        fn virtual_wire(timer_hz: u64) -> Self {
            let Self { apic, now } = Self::reset(timer_hz);
            Self { apic: apic.with_virtual_wire(), now }
        }

        /// Software-enabled, spurious vector 0xff, as Linux sets it.
        fn new(timer_hz: u64) -> Self {
            let mut machine = Self::reset(timer_hz);
            machine.write(SVR, 0x1ff);
            machine
        }

        fn read(&mut self, offset: u64) -> u32 {
            let mut data = [0u8; 4];
            self.apic.read(offset, &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, offset: u64, value: u32) {
            self.apic.write(offset, &value.to_le_bytes());
        }

        fn at(&self, time: Duration) {
            self.now.set(time);
        }

        fn at_nanos(&self, nanos: u64) {
            self.at(Duration::from_nanos(nanos));
        }

        /// The vectors set in IRR, from the registers.
        fn irr(&mut self) -> Vec<u32> {
            self.vectors(IRR)
        }

        fn isr(&mut self) -> Vec<u32> {
            self.vectors(ISR)
        }

        fn vectors(&mut self, base: u64) -> Vec<u32> {
            let mut vectors = Vec::new();
            for index in 0..8 {
                let word = self.read(base + 16 * index);
                let index = u32::try_from(index).unwrap();
                vectors.extend((0..32).filter(|bit| word & (1 << bit) != 0).map(|bit| index * 32 + bit));
            }
            vectors
        }

        /// Sends a fixed self-IPI through the shorthand, as Linux's
        /// `__default_send_IPI_shortcut` does.
        fn self_ipi(&mut self, vector: u32) {
            self.write(ICR, SELF | vector);
        }

        /// Takes the pending interrupt, as the VMM injecting it would.
        fn take(&mut self) -> Option<u8> {
            self.apic.acknowledge()
        }
    }

    #[test]
    fn id_and_version_are_qemus_for_cpu_0() {
        let mut m = Machine::reset(1_000_000);
        assert_eq!(m.read(ID), 0);
        assert_eq!(m.read(VERSION_REG), 0x0005_0014);
        m.write(ID, 0x0500_0000);
        m.write(VERSION_REG, 0);
        assert_eq!((m.read(ID), m.read(VERSION_REG)), (0, 0x0005_0014));
    }

    #[test]
    fn reset_values_follow_the_sdm() {
        let mut m = Machine::reset(1_000_000);
        for lvt in (0x320..=0x370).step_by(16) {
            assert_eq!(m.read(lvt), 0x0001_0000, "LVT {lvt:#x} masked");
        }
        assert_eq!(m.read(DFR), 0xffff_ffff, "DFR");
        assert_eq!(m.read(SVR), 0xff, "SVR");
        for offset in [TPR, PPR, LDR, ESR, ICR, ICR2, TMICT, TMCCT, TDCR] {
            assert_eq!(m.read(offset), 0, "{offset:#x}");
        }
        assert!(m.irr().is_empty() && m.isr().is_empty() && m.vectors(TMR).is_empty());
        assert_eq!(m.apic.pending_vector(), None);
        assert_eq!(m.apic.next_deadline(), None);
        assert!(!m.apic.accepts_pic_interrupts());
        // The default APIC is the same.
        let mut apic = LocalApic::default();
        let mut data = [0u8; 4];
        apic.read(SVR, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xff);
    }

    #[test]
    fn settings_read_back_with_their_writable_bits() {
        let mut m = Machine::new(1_000_000);
        m.write(TPR, 0xffff_ff45);
        m.write(LDR, 0xffff_ffff);
        m.write(DFR, 0x0000_0000);
        m.write(SVR, 0xffff_ffff);
        m.write(ICR2, 0xffff_ffff);
        m.write(TDCR, 0xffff_ffff);
        m.write(LVTT, 0xffff_ffff);
        m.write(0x330, 0xffff_ffff);
        m.write(0x340, 0xffff_ffff);
        m.write(LVT0, 0xffff_ffff);
        m.write(LVT1, 0xffff_ffff);
        m.write(LVTERR, 0xffff_ffff);
        assert_eq!(m.read(TPR), 0x45);
        assert_eq!(m.read(LDR), 0xff00_0000);
        assert_eq!(m.read(DFR), 0x0fff_ffff, "cluster model, low bits ones");
        assert_eq!(m.read(SVR), 0x3ff, "no EOI-broadcast suppression");
        assert_eq!(m.read(ICR2), 0xff00_0000);
        assert_eq!(m.read(TDCR), 0xb);
        assert_eq!(m.read(LVTT), 0x0007_00ff, "no delivery status");
        assert_eq!(m.read(0x330), 0x0001_07ff);
        assert_eq!(m.read(0x340), 0x0001_07ff);
        assert_eq!(m.read(LVT0), 0x0001_a7ff, "no remote IRR");
        assert_eq!(m.read(LVT1), 0x0001_a7ff);
        assert_eq!(m.read(LVTERR), 0x0001_00ff);
    }

    #[test]
    fn read_only_and_reserved_registers_ignore_writes() {
        let mut m = Machine::new(1_000_000);
        for offset in [0x90, PPR, 0xc0, ISR, 0x170, TMR, IRR, 0x270, TMCCT, 0x40, 0x2f0, 0x3f0, 0x800] {
            m.write(offset, 0xdead_beef);
            assert_eq!(m.read(offset), 0, "{offset:#x}");
        }
        assert_eq!(m.apic.pending_vector(), None);
        m.write(EOI, 0xdead_beef);
        assert_eq!(m.read(EOI), 0);
    }

    #[test]
    fn unaligned_or_narrow_accesses_read_all_ones_and_change_nothing() {
        let mut m = Machine::new(1_000_000);
        m.apic.write(SVR, &[0x00]);
        m.apic.write(SVR + 4, &0u32.to_le_bytes());
        m.apic.write(SVR, &0u64.to_le_bytes());
        m.apic.write(ICR + 1, &0x40u32.to_le_bytes());
        m.apic.write(TMICT, &[1, 2]);
        assert_eq!(m.read(SVR), 0x1ff);
        assert_eq!((m.read(TMICT), m.apic.pending_vector()), (0, None));
        let mut byte = [0u8];
        m.apic.read(VERSION_REG, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut wide = [0u8; 8];
        m.apic.read(VERSION_REG, &mut wide);
        assert_eq!(wide, [0xff; 8]);
        assert_eq!(m.read(VERSION_REG + 4), 0xffff_ffff);
        assert_eq!(m.read(APIC_LEN - 4), 0xffff_ffff);
    }

    #[test]
    fn one_shot_expires_after_count_times_divide_input_ticks() {
        // 10 MHz: 100 ns per input tick.
        for (config, divide) in [(0xb, 1), (0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xa, 128)] {
            let mut m = Machine::new(10_000_000);
            m.at_nanos(5_000);
            m.write(LVTT, 0x30);
            m.write(TDCR, config);
            m.write(TMICT, 1000);
            let expiry = 5_000 + 1000 * divide * 100;
            assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(expiry)), "divide {divide}");
            assert_eq!(m.read(TMCCT), 1000);
            m.at_nanos(5_000 + 250 * divide * 100);
            assert_eq!(m.read(TMCCT), 750, "divide {divide}");
            m.at_nanos(expiry - 1);
            m.apic.poll();
            assert_eq!((m.read(TMCCT), m.apic.pending_vector()), (1, None), "divide {divide}");
            m.at_nanos(expiry);
            m.apic.poll();
            assert_eq!(m.apic.pending_vector(), Some(0x30), "divide {divide}");
            assert_eq!(m.read(TMCCT), 0);
            assert_eq!(m.read(TMICT), 1000, "TMICT reads as written");
            assert_eq!(m.apic.next_deadline(), None);
            // Once only.
            assert_eq!(m.take(), Some(0x30));
            m.write(EOI, 0);
            m.at_nanos(expiry * 10);
            m.apic.poll();
            assert_eq!((m.apic.pending_vector(), m.read(TMCCT)), (None, 0));
        }
    }

    #[test]
    fn one_shot_deadline_rounds_up_to_the_nanosecond() {
        // 3 MHz: a tick is 333.3 ns; 10 counts at divide 2 take 6666.7 ns.
        let mut m = Machine::new(3_000_000);
        m.write(LVTT, 0x31);
        m.write(TDCR, 0);
        m.write(TMICT, 10);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(6667)));
        m.at_nanos(6666);
        m.apic.poll();
        assert_eq!((m.read(TMCCT), m.apic.pending_vector()), (1, None));
        m.at_nanos(6667);
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), Some(0x31));
    }

    #[test]
    fn an_expiry_is_seen_by_register_accesses_without_a_poll() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, 0x40);
        m.write(TDCR, 0xb);
        m.write(TMICT, 100);
        m.at_nanos(100);
        assert_eq!(m.irr(), [0x40]);
    }

    #[test]
    fn periodic_mode_reloads_and_coalesces_missed_periods() {
        // 1 GHz, divide 16, count 100: a period of 1600 ns.
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, PERIODIC | TIMER_VECTOR);
        m.write(TDCR, 0x3);
        m.write(TMICT, 100);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1600)));
        m.at_nanos(1599);
        assert_eq!(m.read(TMCCT), 1);
        m.at_nanos(1600);
        assert_eq!(m.read(TMCCT), 100, "reloaded, never reads 0");
        assert_eq!(m.take(), Some(0xec));
        m.write(EOI, 0);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(3200)));
        // Two and a half periods later: two expiries, one request.
        m.at_nanos(1600 * 3 + 800);
        m.apic.poll();
        assert_eq!(m.read(TMCCT), 50);
        assert_eq!(m.take(), Some(0xec));
        assert_eq!(m.take(), None);
        m.write(EOI, 0);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1600 * 4)));
        m.at_nanos(1600 * 4);
        m.apic.poll();
        assert_eq!(m.take(), Some(0xec));
        // A request still pending when the next period ends stays one.
        m.at_nanos(1600 * 5);
        m.apic.poll();
        m.at_nanos(1600 * 6);
        m.apic.poll();
        assert_eq!(m.irr(), [0xec]);
    }

    #[test]
    fn a_periodic_timer_reloads_no_faster_than_every_200_microseconds() {
        // 1 GHz, divide 1, count 10: asked for a 10 ns period.
        let mut m = Machine::new(1_000_000_000);
        m.apic.min_period = MIN_PERIOD;
        m.write(LVTT, PERIODIC | TIMER_VECTOR);
        m.write(TDCR, 0xb);
        m.write(TMICT, 10);
        assert_eq!(m.read(TMICT), 10, "the register keeps what was written");
        // The count under way ends as asked; the reloads are 200 µs.
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(10)));
        m.at_nanos(10);
        m.apic.poll();
        assert_eq!(m.take(), Some(0xec));
        m.write(EOI, 0);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(10 + 200_000)));
        // A millisecond later: requested once, due again in whole periods.
        m.at_nanos(1_000_000);
        m.apic.poll();
        assert_eq!(m.take(), Some(0xec));
        assert_eq!(m.take(), None);
        m.write(EOI, 0);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(10 + 5 * 200_000)));
        // A period above the floor is kept as asked.
        m.write(TMICT, 300_000);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1_000_000 + 300_000)));
        m.at_nanos(1_300_000);
        m.apic.poll();
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1_600_000)));
    }

    #[test]
    fn a_tmict_write_restarts_the_count_and_zero_stops_it() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, PERIODIC | 0x30);
        m.write(TDCR, 0xb);
        m.write(TMICT, 1000);
        m.at_nanos(600);
        m.write(TMICT, 1000);
        assert_eq!(m.read(TMCCT), 1000);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1600)));
        m.write(TMICT, 0);
        assert_eq!((m.read(TMCCT), m.apic.next_deadline()), (0, None));
        m.at(Duration::from_secs(10));
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), None);
        // Linux's one-shot shutdown: mask, then TMICT 0.
        m.write(LVTT, 0x30);
        m.write(TMICT, 500);
        let value = m.read(LVTT);
        m.write(LVTT, value | MASKED | 0x30);
        m.write(TMICT, 0);
        m.at(Duration::from_secs(11));
        m.apic.poll();
        assert_eq!((m.apic.pending_vector(), m.apic.next_deadline()), (None, None));
    }

    #[test]
    fn a_masked_timer_counts_but_requests_nothing() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, MASKED | 0x30);
        m.write(TDCR, 0xb);
        m.write(TMICT, 100);
        assert_eq!(m.apic.next_deadline(), None, "nothing to wake up for");
        m.at_nanos(40);
        assert_eq!(m.read(TMCCT), 60);
        m.at_nanos(100);
        m.apic.poll();
        assert_eq!((m.read(TMCCT), m.apic.pending_vector()), (0, None));
        // Unmasking later does not deliver the expiry missed while masked.
        m.write(LVTT, 0x30);
        assert_eq!((m.apic.pending_vector(), m.apic.next_deadline()), (None, None));

        // Linux's calibration: masked periodic, TMCCT read as it falls.
        m.at_nanos(1000);
        m.write(LVTT, MASKED | PERIODIC | TIMER_VECTOR);
        m.write(TDCR, 0x3);
        m.write(TMICT, 0xffff_ffff / 16);
        m.at_nanos(1000 + 16 * 1000);
        assert_eq!(m.read(TMCCT), 0xffff_ffff / 16 - 1000);
        // A masked periodic timer unmasked goes on requesting, from the
        // next period on.
        let period = 16 * u64::from(0xffff_ffff / 16_u32);
        m.at_nanos(1000 + 3 * period + 5);
        m.write(LVTT, PERIODIC | TIMER_VECTOR);
        assert_eq!(m.apic.pending_vector(), None);
        let deadline = m.apic.next_deadline().unwrap();
        assert_eq!(deadline, Duration::from_nanos(1000 + 4 * period));
        m.at(deadline);
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), Some(0xec));
    }

    #[test]
    fn a_divide_change_goes_on_from_the_current_count_at_the_new_rate() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, 0x30);
        m.write(TDCR, 0xb); // divide by 1
        m.write(TMICT, 100);
        m.at_nanos(40);
        m.write(TDCR, 0x0); // divide by 2: 60 counts left, 120 ns
        assert_eq!(m.read(TMCCT), 60);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(160)));
        m.at_nanos(100);
        assert_eq!(m.read(TMCCT), 30);
        // Rewriting the same divide changes nothing.
        m.write(TDCR, 0x0);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(160)));
        m.at_nanos(160);
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), Some(0x30));
    }

    #[test]
    fn a_mode_change_lets_the_count_go_on_under_the_new_mode() {
        let mut m = Machine::new(1_000_000_000);
        m.write(TDCR, 0xb);
        m.write(LVTT, PERIODIC | 0x30);
        m.write(TMICT, 100);
        m.at_nanos(250);
        m.apic.poll();
        assert_eq!(m.take(), Some(0x30));
        m.write(EOI, 0);
        // Periodic to one-shot at count 50: one more expiry, at 300.
        m.write(LVTT, 0x30);
        assert_eq!(m.read(TMCCT), 50);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(300)));
        m.at_nanos(300);
        m.apic.poll();
        assert_eq!(m.take(), Some(0x30));
        m.write(EOI, 0);
        assert_eq!((m.read(TMCCT), m.apic.next_deadline()), (0, None));
        // One-shot ended: switching to periodic does not start it (11.5.4).
        m.write(LVTT, PERIODIC | 0x30);
        assert_eq!(m.apic.next_deadline(), None);
        // One-shot to periodic while counting: reloads from TMICT.
        m.write(LVTT, 0x30);
        m.write(TMICT, 100);
        m.at_nanos(350);
        m.write(LVTT, PERIODIC | 0x30);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(400)));
        m.at_nanos(450);
        assert_eq!(m.read(TMCCT), 50);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(500)));
    }

    #[test]
    fn tsc_deadline_mode_is_not_offered_and_stops_the_timer() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, 0x30);
        m.write(TMICT, 1000);
        m.write(LVTT, TSC_DEADLINE | 0x30);
        assert_eq!((m.read(TMCCT), m.read(TMICT), m.apic.next_deadline()), (0, 0, None));
        m.write(TMICT, 1000);
        assert_eq!((m.read(TMICT), m.apic.next_deadline()), (0, None), "TMICT writes ignored");
        m.at(Duration::from_secs(1));
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), None);
        // Back to one-shot: stopped until a TMICT write.
        m.write(LVTT, 0x30);
        assert_eq!(m.apic.next_deadline(), None);
        m.write(TMICT, 10);
        assert!(m.apic.next_deadline().is_some());
    }

    #[test]
    fn extreme_counts_and_clocks_do_not_overflow() {
        let mut m = Machine::new(1);
        m.write(LVTT, PERIODIC | 0x30);
        m.write(TDCR, 0xa); // divide by 128
        m.write(TMICT, u32::MAX);
        let period = Duration::from_secs(u64::from(u32::MAX) * 128);
        assert_eq!(m.apic.next_deadline(), Some(period));
        m.at(Duration::MAX);
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), Some(0x30));
        let _ = m.read(TMCCT);
        assert!(m.apic.next_deadline().is_some());
        let mut fast = Machine::new(u64::MAX);
        fast.write(LVTT, PERIODIC | 0x30);
        fast.write(TMICT, 1);
        fast.at(Duration::MAX);
        fast.apic.poll();
        assert_eq!((fast.apic.pending_vector(), fast.read(TMCCT)), (Some(0x30), 1));
    }

    #[test]
    fn the_task_priority_blocks_lower_and_equal_classes() {
        let mut m = Machine::new(1_000_000);
        m.write(TPR, 0x45);
        m.self_ipi(0x4f);
        assert_eq!(m.apic.pending_vector(), None, "class 4 is not above TPR's");
        assert_eq!(m.read(PPR), 0x45);
        m.self_ipi(0x50);
        assert_eq!(m.apic.pending_vector(), Some(0x50));
        assert_eq!(m.take(), Some(0x50));
        assert_eq!(m.take(), None);
        m.write(EOI, 0);
        m.write(TPR, 0x30);
        assert_eq!(m.take(), Some(0x4f));
    }

    #[test]
    fn a_vector_in_service_blocks_its_class_until_eoi() {
        let mut m = Machine::new(1_000_000);
        m.write(TPR, 0x10);
        m.self_ipi(0x61);
        assert_eq!(m.take(), Some(0x61));
        assert_eq!(m.read(PPR), 0x60);
        m.self_ipi(0x65);
        m.self_ipi(0x50);
        assert_eq!(m.apic.pending_vector(), None);
        // A higher class nests.
        m.self_ipi(0x71);
        assert_eq!(m.take(), Some(0x71));
        assert_eq!(m.isr(), [0x61, 0x71]);
        assert_eq!(m.read(PPR), 0x70);
        // EOI ends the highest in service.
        m.write(EOI, 0);
        assert_eq!(m.isr(), [0x61]);
        assert_eq!(m.apic.pending_vector(), None);
        m.write(EOI, 0);
        assert_eq!(m.isr(), Vec::<u32>::new());
        assert_eq!(m.read(PPR), 0x10);
        assert_eq!(m.take(), Some(0x65));
        m.write(EOI, 0);
        assert_eq!(m.take(), Some(0x50));
        m.write(EOI, 0);
        // An EOI with nothing in service does nothing.
        m.write(EOI, 0);
        assert_eq!((m.irr(), m.isr()), (Vec::new(), Vec::new()));
    }

    #[test]
    fn irr_and_isr_bits_appear_in_their_registers() {
        let mut m = Machine::new(1_000_000);
        for vector in [0x10, 0x21, 0x3f, 0x40, 0xec, 0xff] {
            m.self_ipi(vector);
        }
        assert_eq!(m.read(IRR), 1 << 16);
        assert_eq!(m.read(IRR + 0x10), (1 << 1) | (1 << 31));
        assert_eq!(m.read(IRR + 0x20), 1);
        assert_eq!(m.read(IRR + 0x70), (1 << 12) | (1 << 31));
        assert_eq!(m.take(), Some(0xff));
        assert_eq!(m.read(ISR + 0x70), 1 << 31);
        assert_eq!(m.read(IRR + 0x70), 1 << 12);
        // Linux's spurious handler finds the vector's ISR register so.
        let vector = 0xffu64;
        assert_ne!(m.read(ISR + ((vector & !0x1f) >> 1)) & (1 << (vector & 0x1f)), 0);
        assert_eq!(m.vectors(TMR), Vec::<u32>::new(), "all edge-triggered");
    }

    #[test]
    fn self_ipis_reach_this_cpu_only() {
        let mut m = Machine::new(1_000_000);
        m.write(ICR, SELF | 0x30);
        m.write(ICR, ALL_INCLUDING_SELF | 0x31);
        m.write(ICR, ALL_EXCLUDING_SELF | 0x32);
        assert_eq!(m.irr(), [0x30, 0x31]);
        // No shorthand, physical destination: APIC ID 0, or broadcast.
        m.write(ICR2, 0);
        m.write(ICR, 0x33);
        m.write(ICR2, 0x0100_0000);
        m.write(ICR, 0x34);
        m.write(ICR2, 0xff00_0000);
        m.write(ICR, 0x35);
        assert_eq!(m.irr(), [0x30, 0x31, 0x33, 0x35]);
        // Logical, flat model: a destination bit of the logical ID.
        m.write(LDR, 0x0400_0000);
        m.write(ICR2, 0x0500_0000);
        m.write(ICR, ICR_LOGICAL | 0x36);
        m.write(ICR2, 0x0200_0000);
        m.write(ICR, ICR_LOGICAL | 0x37);
        // Cluster model: cluster 1, member bit 2.
        m.write(DFR, 0x0fff_ffff);
        m.write(LDR, 0x1400_0000);
        m.write(ICR2, 0x1600_0000);
        m.write(ICR, ICR_LOGICAL | 0x38);
        m.write(ICR2, 0x2400_0000);
        m.write(ICR, ICR_LOGICAL | 0x39);
        assert_eq!(m.irr(), [0x30, 0x31, 0x33, 0x35, 0x36, 0x38]);
        // Lowest priority picks the only CPU.
        m.write(ICR, SELF | (DELIVERY_LOWEST_PRIORITY << 8) | 0x3a);
        assert_eq!(m.read(ICR), SELF | 0x13a, "written value, delivery status idle");
        assert!(m.irr().contains(&0x3a));
    }

    #[test]
    fn icr_reads_back_idle_and_other_delivery_modes_are_ignored() {
        let mut m = Machine::new(1_000_000);
        // Linux's NMI to self, INIT level de-assert, INIT and SIPI.
        for icr in [SELF | 0x402, ALL_INCLUDING_SELF | 0x8500, 0x4500, 0x4608, ALL_INCLUDING_SELF | 0x200] {
            m.write(ICR, icr);
            assert_eq!(m.read(ICR), icr & ICR_LOW_WRITABLE);
        }
        m.write(ICR, 0xffff_ffff);
        assert_eq!(m.read(ICR) & (1 << 12), 0, "delivery status idle");
        assert_eq!(m.read(ICR), 0x000c_cfff);
        assert_eq!(m.irr(), Vec::<u32>::new());
        assert_eq!(m.read(ESR), 0);
    }

    #[test]
    fn illegal_vectors_are_not_accepted_and_set_error_bits() {
        let mut m = Machine::new(1_000_000_000);
        m.self_ipi(0x05);
        assert_eq!((m.irr(), m.apic.pending_vector()), (Vec::new(), None));
        assert_eq!(m.read(ESR), 0, "until an ESR write latches them");
        m.write(ESR, 0);
        assert_eq!(m.read(ESR), ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR);
        m.write(ESR, 0);
        assert_eq!(m.read(ESR), 0);
        // An illegal vector sent elsewhere is only a send error.
        m.write(ICR, ALL_EXCLUDING_SELF | 0x0f);
        m.write(ESR, 0);
        assert_eq!(m.read(ESR), ESR_SEND_ILLEGAL_VECTOR);
        // An illegal timer vector, with the error LVT (Linux's 0xfe) set up.
        m.write(LVTERR, 0xfe);
        m.write(LVTT, 0x0f);
        m.write(TMICT, 1);
        m.at_nanos(2);
        m.apic.poll();
        assert_eq!(m.irr(), [0xfe]);
        m.write(ESR, 0);
        assert_eq!(m.read(ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
        // An illegal error vector raises no interrupt.
        assert_eq!(m.take(), Some(0xfe));
        m.write(EOI, 0);
        m.write(LVTERR, 0x01);
        m.self_ipi(0x02);
        assert_eq!(m.irr(), Vec::<u32>::new());
        m.write(ESR, 0);
        assert_eq!(m.read(ESR), ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    #[test]
    fn software_disable_masks_lvts_and_blocks_delivery() {
        let mut m = Machine::new(1_000_000_000);
        m.write(LVTT, 0x30);
        m.write(LVT0, 0x700);
        m.write(LVTERR, 0xfe);
        m.self_ipi(0x40);
        assert_eq!(m.apic.pending_vector(), Some(0x40));
        m.write(SVR, 0xff);
        for lvt in [LVTT, LVT0, LVTERR] {
            assert_ne!(m.read(lvt) & MASKED, 0, "{lvt:#x}");
        }
        assert_eq!(m.read(LVT0), 0x0001_0700, "the rest of the entry stays");
        assert_eq!(m.apic.pending_vector(), None);
        assert_eq!(m.take(), None);
        assert_eq!(m.irr(), [0x40], "IRR holds its requests");
        assert!(!m.apic.accepts_pic_interrupts());
        // Entries cannot be unmasked while disabled.
        m.write(LVTT, 0x30);
        m.write(LVT0, 0x700);
        assert_eq!((m.read(LVTT), m.read(LVT0)), (0x0001_0030, 0x0001_0700));
        // Fixed interrupts sent to it are dropped; the timer requests
        // nothing, though it counts.
        m.self_ipi(0x50);
        m.write(TDCR, 0xb);
        m.write(TMICT, 10);
        assert_eq!(m.apic.next_deadline(), None);
        m.at_nanos(5);
        assert_eq!(m.read(TMCCT), 5);
        m.at_nanos(10);
        m.apic.poll();
        assert_eq!(m.irr(), [0x40]);
        // Enabling delivers what IRR holds; entries stay masked.
        m.write(SVR, 0x1ff);
        assert_eq!(m.read(LVTT), 0x0001_0030);
        assert_eq!(m.take(), Some(0x40));
    }

    #[test]
    fn virtual_wire_passes_pic_interrupts_until_the_os_takes_over() {
        let mut m = Machine::virtual_wire(1_000_000);
        assert!(m.apic.accepts_pic_interrupts());
        assert_eq!((m.read(SVR), m.read(LVT0), m.read(LVT1)), (0xff, 0x700, 0x400));
        assert_eq!(m.read(LVTT), MASKED);
        assert_eq!(m.apic.pending_vector(), None);
        // Linux's setup_local_APIC: disabling cuts LINT0 off...
        let svr = m.read(SVR);
        m.write(SVR, svr & !0x100);
        assert!(!m.apic.accepts_pic_interrupts());
        m.write(TPR, 0x10);
        m.write(SVR, 0x1ff);
        assert!(!m.apic.accepts_pic_interrupts());
        // ...until it rewrites LVT0.
        m.write(LVT0, 0x700);
        m.write(LVT1, 0x400);
        assert!(m.apic.accepts_pic_interrupts());
        // Masked, or a delivery mode other than ExtINT: no.
        m.write(LVT0, 0x10700);
        assert!(!m.apic.accepts_pic_interrupts());
        m.write(LVT0, 0x0030);
        assert!(!m.apic.accepts_pic_interrupts());
        assert!(!LocalApic::default().accepts_pic_interrupts());
    }

    #[test]
    fn linux_sets_up_the_apic_and_runs_a_one_shot_tick() {
        // The crystal clock QEMU announces: 25 MHz; HZ = 1000.
        let mut m = Machine::virtual_wire(25_000_000);
        let lapic_timer_period = 25_000_000 / 1000;
        // setup_local_APIC
        let svr = m.read(SVR);
        m.write(SVR, svr & !0x100);
        let tpr = m.read(TPR);
        m.write(TPR, (tpr & !0xff) | 0x10);
        let (irr, isr) = (m.irr(), m.isr());
        assert!(irr.is_empty() && isr.is_empty());
        let svr = m.read(SVR);
        m.write(SVR, (svr & !0xff) | 0x100 | 0xff);
        let _ = m.read(LVT0) & MASKED;
        m.write(LVT0, 0x700);
        m.write(LVT1, 0x400);
        // lapic_setup_esr
        m.write(ESR, 0);
        let before = m.read(ESR);
        m.write(LVTERR, 0xfe);
        m.write(ESR, 0);
        assert_eq!((before, m.read(ESR)), (0, 0));
        // Periodic tick first (setup_APIC_timer), then one-shot.
        m.write(LVTT, PERIODIC | TIMER_VECTOR);
        let tdcr = m.read(TDCR);
        m.write(TDCR, (tdcr & !0xf) | 0x3);
        m.write(TMICT, lapic_timer_period / 16);
        // 1562 counts of 16 ticks of 40 ns: Linux's division rounds down.
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_nanos(1562 * 16 * 40)));
        m.at(Duration::from_millis(1));
        m.apic.poll();
        assert_eq!(m.take(), Some(0xec));
        m.write(EOI, 0);
        // lapic_timer_set_oneshot, lapic_next_event(delta = 2 ms of counts)
        m.write(LVTT, TIMER_VECTOR);
        let tdcr = m.read(TDCR);
        m.write(TDCR, (tdcr & !0xf) | 0x3);
        m.write(TMICT, 2 * lapic_timer_period / 16);
        assert_eq!(m.apic.next_deadline(), Some(Duration::from_millis(3)));
        // irq_work raised meanwhile: wait for ICR idle, self-IPI 0xf6.
        assert_eq!(m.read(ICR) & (1 << 12), 0);
        m.write(ICR, SELF | 0xf6);
        assert_eq!(m.take(), Some(0xf6));
        m.at(Duration::from_millis(3));
        m.apic.poll();
        assert_eq!(m.apic.pending_vector(), None, "blocked while 0xf6 is in service");
        m.write(EOI, 0);
        assert_eq!(m.take(), Some(0xec));
        m.write(EOI, 0);
        assert_eq!(m.apic.next_deadline(), None);
        // PIC interrupts still come through LINT0.
        assert!(m.apic.accepts_pic_interrupts());
    }

    #[test]
    fn the_shared_apic_on_the_bus_is_the_one_the_vmm_polls() {
        let now = Rc::new(Cell::new(Duration::ZERO));
        let clock = now.clone();
        let apic = Rc::new(RefCell::new(LocalApic::new(move || clock.get(), 1_000_000_000)));
        let mut bus = MmioBus::default();
        bus.insert(APIC_BASE, APIC_LEN, "apic", Box::new(SharedApic(apic.clone())));
        bus.write(APIC_BASE + SVR, &0x1ffu32.to_le_bytes());
        bus.write(APIC_BASE + LVTT, &0x30u32.to_le_bytes());
        bus.write(APIC_BASE + TMICT, &8u32.to_le_bytes());
        now.set(Duration::from_nanos(16));
        apic.borrow_mut().poll();
        assert_eq!(apic.borrow_mut().acknowledge(), Some(0x30));
        let mut data = [0u8; 4];
        bus.read(APIC_BASE + ISR + 0x10, &mut data);
        assert_eq!(u32::from_le_bytes(data), 1 << 16);
    }
}
