//! The Intel 8254 programmable interval timer (PIT), and the PC's port
//! 0x61 (system control port B), which gates and reads its counter 2.
//!
//! # Model
//!
//! Three 16-bit down counters share a 1.193182 MHz input clock (CLK); each
//! has a GATE input and an OUT output. On a PC, OUT0 is IRQ 0, counter 1
//! once paced DRAM refresh, and counter 2 drives the speaker, its GATE and
//! OUT on port B. Counters are programmed through the control word register
//! (0x43) and loaded and read through their data ports (0x40-0x42). The
//! references below are sections of the Intel 8254 datasheet.
//!
//! Nothing here runs by itself. Time comes from a clock handed over at
//! construction (the time since the VM started), counted in CLK ticks, and
//! a counter's value and OUT level are computed from the ticks it has
//! counted, when an access or the VMM asks. A counting counter is a `Run`:
//! its initial count, the tick it was loaded on and the pulses it had
//! counted then; each mode is a function from pulses counted to (count,
//! OUT). Whatever changes a counter (a control word, a count, a GATE edge)
//! first brings it up to date, then starts a new run.
//!
//! What the model keeps of the datasheet ("Operation Common to All Modes",
//! "Mode Definitions", "GATE Pin Operations Summary"):
//! - A control word resets the counter's logic: counting stops, OUT takes
//!   the mode's initial level (low in mode 0, high in the others), and
//!   latches and byte sequences are reset.
//! - A count is loaded on the CLK tick after it is written (or, in modes 1
//!   and 5, after a trigger); that tick does not decrement it, so a mode 0
//!   counter loaded with N raises OUT N + 1 ticks after the write.
//! - A count of 0 is 65536 (10000 in BCD). After terminal count, modes 0,
//!   1, 4 and 5 wrap around and go on counting; modes 2 and 3 reload.
//!   Modes 2 and 3 need a count of at least 2 ("Minimum and Maximum Initial
//!   Counts"): a 1 counts as 2.
//! - GATE low suspends counting in modes 0, 2, 3 and 4, and forces OUT high
//!   in modes 2 and 3; a GATE rising edge reloads the count in modes 2 and
//!   3 and triggers modes 1 and 5. Counters 0 and 1 have GATE tied high.
//! - A count written while counting is loaded on the next tick in modes 0
//!   and 4, at the end of the current period in mode 2 or half period in
//!   mode 3, and on the next trigger in modes 1 and 5. In mode 0 the first
//!   byte of a two-byte count already stops counting and sets OUT low.
//! - Reads ("Read Operations"): a counter latch command freezes the count
//!   until it is read, the read-back command latches counts and status
//!   bytes of several counters, and a counter read without a latch gives
//!   the count at the moment of each byte's read. A second latch of the
//!   same thing before it is read is ignored; a latched status is read
//!   before a latched count. Two-byte counts are read and written LSB
//!   first; a latched count starts its own LSB, MSB sequence.
//!
//! Power-on state is undefined on hardware. Here, as no firmware programs
//! the PIT for the guest, each counter starts as after a mode 0 control
//! word with no count: stopped at 0, OUT low, no IRQ 0 until the guest
//! programs counter 0.
//!
//! # Interrupts
//!
//! The 8259 takes IRQ 0 on OUT0's rising edges. [`Pit::poll`] returns how
//! many counting produced since the last poll; the VMM raises IRQ 0 once if
//! there were any, because the 8259's request register holds one request
//! per line: edges the guest was too slow to take coalesce, as on hardware
//! with interrupts masked for longer than a period. [`Pit::next_irq_deadline`]
//! says when the next edge is due, for the VMM to sleep or to arm a timer
//! that kicks the vCPU out of the guest then. A control word taking OUT0
//! from low to high (mode 0 to mode 2, say) also makes a rising edge on
//! hardware; like QEMU's and KVM's PITs, this one interrupts only at the
//! ends of counts, which is all a guest programs it for.
//!
//! # What Linux 6.12 does with it
//!
//! - Periodic tick (drivers/clocksource/i8253.c): `0x34` (counter 0, mode
//!   2, LSB then MSB), then `PIT_LATCH` = (1193182 + HZ/2) / HZ.
//! - One-shot tick: `0x38` (counter 0, mode 4) once, then the LSB and MSB of
//!   each event's delta, 0xf to 0x7fff ticks. The write of the MSB retriggers.
//! - Shutdown: `0x30`, count 0 (LSB and MSB), `0x30` again: mode 0 with no
//!   count, so counter 0 stops and never fires.
//! - TSC calibration (arch/x86/kernel/tsc.c): set GATE2 through port B
//!   (speaker off), `0xb0` (counter 2, mode 0, LSB then MSB) and a count.
//!   `pit_calibrate_tsc` polls port B bit 5 until OUT2 goes high;
//!   `quick_pit_calibrate` loads 0xffff and reads the count unlatched, LSB
//!   then MSB (`pit_verify_msb`), expecting the MSB to fall by one every 256
//!   ticks with no value skipped.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::bus::PortDevice;

/// Counter 0's data port; counters 1 and 2 and the control word register
/// follow.
pub const PIT_BASE: u16 = 0x40;
/// Three data ports and the control word register.
pub const PIT_LEN: u16 = 4;
/// System control port B: counter 2's GATE and OUT, the speaker enable,
/// the NMI source bits.
pub const PORT_B: u16 = 0x61;
/// One port.
pub const PORT_B_LEN: u16 = 1;
/// The counters' input clock in Hz (Linux's `PIT_TICK_RATE`).
pub const PIT_HZ: u64 = 1_193_182;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Control word ("Control Word Format"): SC1 SC0 RW1 RW0 M2 M1 M0 BCD.
const SELECT_SHIFT: u8 = 6;
/// SC = 3: a read-back command rather than a control word.
const SELECT_READ_BACK: u8 = 3;
/// RW = 0: a counter latch command rather than a control word.
const RW_MASK: u8 = 0x30;
const CONTROL_BCD: u8 = 1 << 0;
/// What a counter keeps of its control word, and repeats in its status.
const CONTROL_KEPT: u8 = 0x3f;
/// Read-back command ("Read-Back Command"): the bits are active low.
const READ_BACK_NO_COUNT: u8 = 1 << 5;
const READ_BACK_NO_STATUS: u8 = 1 << 4;
/// Status byte ("Status Byte"): OUT and null count, then the control word.
const STATUS_OUT: u8 = 1 << 7;
const STATUS_NULL_COUNT: u8 = 1 << 6;

/// Port B: GATE2, speaker data enable, parity and channel check disables
/// are read-write; the high half is read-only.
const PORT_B_GATE2: u8 = 1 << 0;
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_REFRESH: u8 = 1 << 4;
const PORT_B_OUT2: u8 = 1 << 5;
/// A PC BIOS sets counter 1 to request a DRAM refresh every 18 ticks
/// (15 us); port B bit 4 toggles with each request. Guests only see the
/// bit, so it is derived from time, not from counter 1.
const REFRESH_TICKS: u64 = 18;

/// CLK ticks by `time`: tick n comes at n / `PIT_HZ` seconds.
fn ticks_by(time: Duration) -> u64 {
    let ticks = time.as_nanos() * u128::from(PIT_HZ) / NANOS_PER_SEC;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// When CLK tick `tick` comes: the first nanosecond `ticks_by` counts it.
fn tick_time(tick: u64) -> Duration {
    let nanos = (u128::from(tick) * NANOS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The counting modes ("Mode Definitions"). Mode bits 6 and 7 are modes 2
/// and 3 (M2 is "don't care" for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Mode 0: OUT low, high at terminal count until rewritten.
    InterruptOnTerminalCount,
    /// Mode 1: a GATE rising edge sets OUT low until terminal count.
    HardwareOneShot,
    /// Mode 2: OUT low for the last of every N ticks.
    RateGenerator,
    /// Mode 3: OUT high for the first half of every N ticks (rounded up).
    SquareWave,
    /// Mode 4: OUT low for one tick at terminal count, once per count.
    SoftwareStrobe,
    /// Mode 5: mode 4 started by a GATE rising edge.
    HardwareStrobe,
}

impl Mode {
    fn from_control(control: u8) -> Self {
        match (control >> 1) & 7 {
            0 => Self::InterruptOnTerminalCount,
            1 => Self::HardwareOneShot,
            2 | 6 => Self::RateGenerator,
            3 | 7 => Self::SquareWave,
            4 => Self::SoftwareStrobe,
            _ => Self::HardwareStrobe,
        }
    }

    /// OUT right after a control word.
    fn initial_out(self) -> bool {
        self != Self::InterruptOnTerminalCount
    }

    /// Modes 2 and 3 reload at terminal count.
    fn is_periodic(self) -> bool {
        matches!(self, Self::RateGenerator | Self::SquareWave)
    }

    /// Modes 1 and 5 start on a GATE rising edge, not on a count write.
    fn is_triggered(self) -> bool {
        matches!(self, Self::HardwareOneShot | Self::HardwareStrobe)
    }

    /// Modes 0 and 4 hold their count while GATE is low.
    fn is_suspended_by_gate(self) -> bool {
        matches!(self, Self::InterruptOnTerminalCount | Self::SoftwareStrobe)
    }

    /// The count a counter runs with: at least 2 in modes 2 and 3.
    fn effective(self, count: u64) -> u64 {
        if self.is_periodic() {
            count.max(2)
        } else {
            count
        }
    }

    /// The counting element (before reduction to the counter's range) and
    /// OUT after `pulses` decrementing ticks from the load of `initial`.
    fn state(self, initial: u64, modulus: u64, pulses: u64) -> (u64, bool) {
        let down = (initial + modulus - pulses % modulus) % modulus;
        match self {
            Self::InterruptOnTerminalCount | Self::HardwareOneShot => (down, pulses >= initial),
            Self::SoftwareStrobe | Self::HardwareStrobe => (down, pulses != initial),
            Self::RateGenerator => {
                let phase = pulses % initial;
                (initial - phase, phase != initial - 1)
            }
            Self::SquareWave => {
                // Both halves count down by two from the count rounded down
                // to even; the high half lasts one tick longer if it is odd.
                let (phase, high) = (pulses % initial, initial.div_ceil(2));
                let into_half = if phase < high { phase } else { phase - high };
                ((initial & !1) - 2 * into_half, phase < high)
            }
        }
    }

    /// The first pulse count after `after` at which OUT rises.
    fn next_rising_edge(self, initial: u64, after: u64) -> Option<u64> {
        match self {
            Self::RateGenerator | Self::SquareWave => Some((after / initial + 1) * initial),
            Self::InterruptOnTerminalCount | Self::HardwareOneShot => (after < initial).then_some(initial),
            // OUT rises at the end of its one-tick low pulse.
            Self::SoftwareStrobe | Self::HardwareStrobe => (after <= initial).then_some(initial + 1),
        }
    }

    /// How many times OUT rises between pulse counts `from` (excluded) and
    /// `to` (included).
    fn rising_edges(self, initial: u64, from: u64, to: u64) -> u64 {
        if self.is_periodic() {
            to / initial - from / initial
        } else {
            u64::from(self.next_rising_edge(initial, from).is_some_and(|edge| edge <= to))
        }
    }

    /// Modes 2 and 3: the pulse count at which a count written at `pulses`
    /// is loaded: the end of the current period, or half period in mode 3.
    fn reload_point(self, initial: u64, pulses: u64) -> u64 {
        let (period_start, high) = (pulses - pulses % initial, initial.div_ceil(2));
        match self {
            Self::SquareWave if pulses - period_start < high => period_start + high,
            _ => period_start + initial,
        }
    }
}

/// How a counter's data port is read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    /// LSB, then MSB.
    Word,
}

/// A counter counting down from `initial`.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// The count it runs with, in ticks: 1 to 65536 (10000 in BCD).
    initial: u64,
    /// Ticks after this one decrement it; the first is the load tick.
    since: u64,
    /// Pulses it had counted at tick `since`: nonzero when it resumes after
    /// GATE suspended it, or takes over from a period cut short.
    base: u64,
    /// Pulses up to which OUT's rising edges are accounted for.
    accounted: u64,
    /// Modes 2 and 3: the pulse count at which a count written meanwhile
    /// replaces `initial`, and that count.
    reload: Option<(u64, u64)>,
}

impl Run {
    /// `initial`, loaded on the tick after `tick`.
    fn load(initial: u64, tick: u64) -> Self {
        Self { initial, since: tick + 1, base: 0, accounted: 0, reload: None }
    }

    /// Pulses counted by `tick`.
    fn pulses(&self, tick: u64) -> u64 {
        self.base + tick.saturating_sub(self.since)
    }

    /// The tick on which it has counted `pulses` (at least `base`).
    fn tick_of(&self, pulses: u64) -> u64 {
        self.since + (pulses - self.base)
    }

    /// The run `initial` starts on reaching pulse count `at`: a new period
    /// in mode 2, or the half period `at` begins in mode 3.
    fn reloaded(&self, at: u64, initial: u64) -> Self {
        let base = if at.is_multiple_of(self.initial) { 0 } else { initial.div_ceil(2) };
        Self { initial, since: self.tick_of(at), base, accounted: base, reload: None }
    }
}

/// What a counter's counting element is doing.
#[derive(Clone, Copy, Debug)]
enum Activity {
    /// Not counting: after a control word, until a count is written (or a
    /// trigger comes, in modes 1 and 5), or with GATE low in modes 2 and 3.
    Stopped {
        count: u64,
        out: bool,
    },
    Counting(Run),
    /// Modes 0 and 4 with GATE low: the run holds its pulses.
    Suspended(Run),
}

/// A count latched for reading, in the counter's binary or BCD format.
#[derive(Clone, Copy, Debug)]
struct Latched {
    value: u16,
    msb_next: bool,
}

/// One of the three counters.
struct Counter {
    /// RW, mode and BCD bits of the last control word.
    control: u8,
    gate: bool,
    /// The count register: the count last written, in ticks (1 to 65536),
    /// until the next control word.
    initial: Option<u64>,
    /// The LSB of a two-byte count, waiting for its MSB.
    lsb: Option<u8>,
    /// The next unlatched read of a two-byte count returns the MSB.
    read_msb: bool,
    status: Option<u8>,
    latched: Option<Latched>,
    activity: Activity,
    /// The tick the count register reaches the counting element: the
    /// status byte's null count bit is set until then.
    loaded_on: u64,
    /// OUT's rising edges not yet taken, and the tick of the first.
    edges: u64,
    first_edge: Option<u64>,
}

impl Counter {
    fn new(gate: bool) -> Self {
        Self {
            control: RW_MASK,
            gate,
            initial: None,
            lsb: None,
            read_msb: false,
            status: None,
            latched: None,
            activity: Activity::Stopped { count: 0, out: false },
            loaded_on: u64::MAX,
            edges: 0,
            first_edge: None,
        }
    }

    fn mode(&self) -> Mode {
        Mode::from_control(self.control)
    }

    fn access(&self) -> Access {
        match (self.control & RW_MASK) >> 4 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        }
    }

    fn bcd(&self) -> bool {
        self.control & CONTROL_BCD != 0
    }

    /// Counts range over `0..modulus`.
    fn modulus(&self) -> u64 {
        if self.bcd() {
            10_000
        } else {
            0x1_0000
        }
    }

    /// A count as written, in ticks: 0 is the largest count.
    fn decode(&self, raw: u16) -> u64 {
        let value = if self.bcd() { from_bcd(raw) % self.modulus() } else { u64::from(raw) };
        if value == 0 {
            self.modulus()
        } else {
            value
        }
    }

    /// A count (below the modulus) as read.
    fn encode(&self, count: u64) -> u16 {
        let count = count as u16;
        if self.bcd() {
            to_bcd(count)
        } else {
            count
        }
    }

    /// Brings the counter up to `tick`: accounts for OUT's rising edges and
    /// loads a count due in modes 2 and 3.
    fn advance(&mut self, tick: u64) {
        let Activity::Counting(mut run) = self.activity else { return };
        if let Some((at, initial)) = run.reload.filter(|&(at, _)| run.pulses(tick) >= at) {
            self.account(&mut run, at);
            run = run.reloaded(at, initial);
        }
        let pulses = run.pulses(tick);
        self.account(&mut run, pulses);
        self.activity = Activity::Counting(run);
    }

    fn account(&mut self, run: &mut Run, to: u64) {
        if to <= run.accounted {
            return;
        }
        let mode = self.mode();
        let edges = mode.rising_edges(run.initial, run.accounted, to);
        if edges > 0 && self.first_edge.is_none() {
            self.first_edge = mode.next_rising_edge(run.initial, run.accounted).map(|pulses| run.tick_of(pulses));
        }
        self.edges = self.edges.saturating_add(edges);
        run.accounted = to;
    }

    /// The counting element (below the modulus) and OUT at `tick`, which
    /// the counter has been advanced to.
    fn state(&self, tick: u64) -> (u64, bool) {
        let (run, pulses) = match self.activity {
            Activity::Stopped { count, out } => return (count, out),
            Activity::Counting(run) => (run, run.pulses(tick)),
            Activity::Suspended(run) => (run, run.base),
        };
        let (count, out) = self.mode().state(run.initial, self.modulus(), pulses);
        (count % self.modulus(), out)
    }

    fn out(&mut self, tick: u64) -> bool {
        self.advance(tick);
        self.state(tick).1
    }

    fn count(&mut self, tick: u64) -> u16 {
        self.advance(tick);
        self.encode(self.state(tick).0)
    }

    /// A control word for this counter.
    fn program(&mut self, tick: u64, control: u8) {
        self.advance(tick);
        let (count, _) = self.state(tick);
        self.control = control & CONTROL_KEPT;
        self.activity = Activity::Stopped { count: count % self.modulus(), out: self.mode().initial_out() };
        self.initial = None;
        self.lsb = None;
        self.read_msb = false;
        self.status = None;
        self.latched = None;
        self.loaded_on = u64::MAX;
    }

    fn write(&mut self, tick: u64, byte: u8) {
        let raw = match (self.access(), self.lsb.take()) {
            (Access::Lsb, _) => u16::from(byte),
            (Access::Msb, _) => u16::from(byte) << 8,
            (Access::Word, Some(lsb)) => u16::from_le_bytes([lsb, byte]),
            (Access::Word, None) => {
                self.lsb = Some(byte);
                self.first_byte_written(tick);
                return;
            }
        };
        self.write_count(tick, raw);
    }

    /// Mode 0: "writing the first byte disables counting", OUT going low.
    fn first_byte_written(&mut self, tick: u64) {
        if self.mode() == Mode::InterruptOnTerminalCount {
            self.advance(tick);
            let (count, _) = self.state(tick);
            self.activity = Activity::Stopped { count, out: false };
        }
    }

    fn write_count(&mut self, tick: u64, raw: u16) {
        self.advance(tick);
        let mode = self.mode();
        let initial = mode.effective(self.decode(raw));
        self.initial = Some(initial);
        // The count waits in the count register until it is loaded.
        self.loaded_on = u64::MAX;
        match self.activity {
            // Loaded by the next trigger.
            _ if mode.is_triggered() => {}
            Activity::Counting(mut run) if mode.is_periodic() => {
                let at = mode.reload_point(run.initial, run.pulses(tick));
                run.reload = Some((at, initial));
                self.loaded_on = run.tick_of(at);
                self.activity = Activity::Counting(run);
            }
            _ => self.start(tick, initial),
        }
    }

    /// Loads `initial` on the tick after `tick`, and counts from there if
    /// GATE allows it.
    fn start(&mut self, tick: u64, initial: u64) {
        let run = Run::load(initial, tick);
        // A trigger reloads a count loaded before: null count stays clear.
        self.loaded_on = self.loaded_on.min(run.since);
        self.activity = match self.mode() {
            _ if self.gate => Activity::Counting(run),
            mode if mode.is_periodic() => Activity::Stopped { count: initial % self.modulus(), out: true },
            _ => Activity::Suspended(run),
        };
    }

    fn set_gate(&mut self, tick: u64, high: bool) {
        if high == self.gate {
            return;
        }
        self.advance(tick);
        self.gate = high;
        let mode = self.mode();
        match self.activity {
            Activity::Counting(mut run) if !high && mode.is_suspended_by_gate() => {
                run.base = run.pulses(tick);
                run.since = run.since.max(tick);
                self.activity = Activity::Suspended(run);
            }
            Activity::Counting(_) if !high && mode.is_periodic() => {
                let (count, _) = self.state(tick);
                self.activity = Activity::Stopped { count, out: true };
            }
            Activity::Suspended(mut run) if high => {
                run.since = run.since.max(tick);
                self.activity = Activity::Counting(run);
            }
            _ if high && (mode.is_triggered() || mode.is_periodic()) => {
                if let Some(initial) = self.initial {
                    self.start(tick, initial);
                }
            }
            _ => {}
        }
    }

    fn latch_count(&mut self, tick: u64) {
        if self.latched.is_none() {
            self.latched = Some(Latched { value: self.count(tick), msb_next: false });
        }
    }

    fn latch_status(&mut self, tick: u64) {
        if self.status.is_none() {
            let out = if self.out(tick) { STATUS_OUT } else { 0 };
            let null_count = if tick < self.loaded_on { STATUS_NULL_COUNT } else { 0 };
            self.status = Some(out | null_count | self.control);
        }
    }

    fn read(&mut self, tick: u64) -> u8 {
        if let Some(status) = self.status.take() {
            return status;
        }
        if let Some(latched) = self.latched {
            return self.read_latched(latched);
        }
        let [lsb, msb] = self.count(tick).to_le_bytes();
        match self.access() {
            Access::Lsb => lsb,
            Access::Msb => msb,
            Access::Word => {
                let msb_now = self.read_msb;
                self.read_msb = !msb_now;
                if msb_now {
                    msb
                } else {
                    lsb
                }
            }
        }
    }

    fn read_latched(&mut self, latched: Latched) -> u8 {
        let [lsb, msb] = latched.value.to_le_bytes();
        match (self.access(), latched.msb_next) {
            (Access::Word, false) => {
                self.latched = Some(Latched { msb_next: true, ..latched });
                lsb
            }
            (Access::Lsb, _) => {
                self.latched = None;
                lsb
            }
            _ => {
                self.latched = None;
                msb
            }
        }
    }

    /// OUT's rising edges by `tick` since the last call.
    fn take_edges(&mut self, tick: u64) -> u64 {
        self.advance(tick);
        self.first_edge = None;
        std::mem::take(&mut self.edges)
    }

    /// The tick of the first rising edge of OUT not yet taken.
    fn next_edge(&self) -> Option<u64> {
        if self.first_edge.is_some() {
            return self.first_edge;
        }
        let Activity::Counting(run) = self.activity else { return None };
        let mode = self.mode();
        let next = mode.next_rising_edge(run.initial, run.accounted);
        match run.reload {
            Some((at, initial)) if next.is_none_or(|pulses| pulses > at) => {
                let reloaded = run.reloaded(at, initial);
                let next = mode.next_rising_edge(reloaded.initial, reloaded.accounted);
                next.map(|pulses| reloaded.tick_of(pulses))
            }
            _ => next.map(|pulses| run.tick_of(pulses)),
        }
    }
}

/// Four BCD digits as a number (a digit above 9 counts its value).
fn from_bcd(raw: u16) -> u64 {
    (0..4).rev().fold(0, |value, digit| value * 10 + u64::from((raw >> (4 * digit)) & 0xf))
}

/// A number below 10000 as four BCD digits.
fn to_bcd(value: u16) -> u16 {
    (0..4).rev().fold(0, |bcd, digit| (bcd << 4) | (value / 10u16.pow(digit) % 10))
}

/// The PIT's three counters and port B, timed by the VM's clock.
pub struct Pit {
    clock: Box<dyn Fn() -> Duration>,
    counters: [Counter; 3],
    /// Port B bits 1-3 as last written; bit 0 is counter 2's GATE.
    port_b: u8,
}

impl Pit {
    /// A PIT as at power-on. `clock` gives the time since the VM started and
    /// never goes backwards; the PIT reads it on each access, poll and
    /// deadline, and has no timer of its own.
    pub fn new(clock: impl Fn() -> Duration + 'static) -> Self {
        // Port B bit 0 (GATE2) is clear at reset.
        Self {
            clock: Box::new(clock),
            counters: [Counter::new(true), Counter::new(true), Counter::new(false)],
            port_b: 0,
        }
    }

    fn tick(&self) -> u64 {
        ticks_by((self.clock)())
    }

    /// Reads the port at `offset` from [`PIT_BASE`].
    pub fn read(&mut self, offset: u16) -> u8 {
        let tick = self.tick();
        match self.counters.get_mut(usize::from(offset)) {
            Some(counter) => counter.read(tick),
            // The control word register is write-only: nothing drives the bus.
            None => 0xff,
        }
    }

    /// Writes the port at `offset` from [`PIT_BASE`].
    pub fn write(&mut self, offset: u16, value: u8) {
        let tick = self.tick();
        match self.counters.get_mut(usize::from(offset)) {
            Some(counter) => {
                log::trace!("PIT: counter {offset} data {value:#04x}");
                counter.write(tick, value);
            }
            None => self.command(tick, value),
        }
    }

    /// A write to the control word register.
    fn command(&mut self, tick: u64, value: u8) {
        let select = value >> SELECT_SHIFT;
        if select == SELECT_READ_BACK {
            return self.read_back(tick, value);
        }
        let counter = &mut self.counters[usize::from(select)];
        if value & RW_MASK == 0 {
            counter.latch_count(tick);
        } else {
            log::debug!("PIT: counter {select} control word {value:#04x}");
            counter.program(tick, value);
        }
    }

    /// Bits 1-3 select counters 0-2; each gets its count latched unless bit
    /// 5 is set, and its status unless bit 4 is.
    fn read_back(&mut self, tick: u64, value: u8) {
        for (index, counter) in self.counters.iter_mut().enumerate() {
            if value & (2 << index) == 0 {
                continue;
            }
            if value & READ_BACK_NO_COUNT == 0 {
                counter.latch_count(tick);
            }
            if value & READ_BACK_NO_STATUS == 0 {
                counter.latch_status(tick);
            }
        }
    }

    /// Reads port B: the stored bits, the refresh toggle, OUT2. The NMI
    /// sources (bits 6 and 7: I/O channel check, parity error) never fire.
    pub fn read_port_b(&mut self) -> u8 {
        let tick = self.tick();
        let counter2 = &mut self.counters[2];
        let refresh = if (tick / REFRESH_TICKS) % 2 == 1 { PORT_B_REFRESH } else { 0 };
        let out2 = if counter2.out(tick) { PORT_B_OUT2 } else { 0 };
        self.port_b | u8::from(counter2.gate) | refresh | out2
    }

    /// Writes port B: bit 0 is counter 2's GATE, bits 1-3 are stored.
    pub fn write_port_b(&mut self, value: u8) {
        let tick = self.tick();
        self.port_b = value & PORT_B_WRITABLE & !PORT_B_GATE2;
        self.counters[2].set_gate(tick, value & PORT_B_GATE2 != 0);
    }

    /// How many rising edges OUT0 (IRQ 0) made since the last poll. The VMM
    /// raises IRQ 0 once if there were any: the 8259 would hold only one
    /// request for them anyway.
    pub fn poll(&mut self) -> u32 {
        let tick = self.tick();
        let edges = self.counters[0].take_edges(tick);
        u32::try_from(edges).unwrap_or(u32::MAX)
    }

    /// When OUT0's next rising edge not yet polled comes: in the past if one
    /// is waiting for [`Pit::poll`]; `None` if counter 0 will not fire (not
    /// programmed, stopped, or its one-shot count already reached).
    pub fn next_irq_deadline(&self) -> Option<Duration> {
        self.counters[0].next_edge().map(tick_time)
    }
}

/// A PIT shared by its two port ranges and the VMM's run loop.
pub type SharedPit = Rc<RefCell<Pit>>;

/// Ports 0x40-0x43 of a shared PIT, for the port bus.
pub struct PitPorts(SharedPit);

impl PitPorts {
    /// The counters' and control word ports of `pit`.
    pub fn new(pit: SharedPit) -> Self {
        Self(pit)
    }
}

impl PortDevice for PitPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // 8-bit registers: a wider access reads the first one.
        data.fill(0);
        data[0] = self.0.borrow_mut().read(offset);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.0.borrow_mut().write(offset, data[0]);
    }
}

/// Port 0x61 of a shared PIT, for the port bus.
pub struct PortB(SharedPit);

impl PortB {
    /// Port B of `pit`.
    pub fn new(pit: SharedPit) -> Self {
        Self(pit)
    }
}

impl PortDevice for PortB {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.borrow_mut().read_port_b();
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        self.0.borrow_mut().write_port_b(data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortBus;
    use std::cell::Cell;

    const CH0: u16 = PIT_BASE;
    const CH2: u16 = PIT_BASE + 2;
    const MODE: u16 = PIT_BASE + 3;
    /// Linux's `PIT_LATCH` for HZ=1000: (1193182 + HZ/2) / HZ.
    const LATCH_HZ_1000: u16 = 1193;

    /// A guest's view of the PIT: its ports on a bus, and a fake clock that
    /// each port access moves on by `io_cost`, as I/O takes time on hardware.
    struct Machine {
        bus: PortBus,
        pit: SharedPit,
        now: Rc<Cell<Duration>>,
        io_cost: Duration,
    }

    impl Machine {
        fn new() -> Self {
            Self::with_io_cost(Duration::ZERO)
        }

        fn with_io_cost(io_cost: Duration) -> Self {
            let now = Rc::new(Cell::new(Duration::ZERO));
            let clock = now.clone();
            let pit = Rc::new(RefCell::new(Pit::new(move || clock.get())));
            let mut bus = PortBus::default();
            bus.insert(PIT_BASE, PIT_LEN, "pit", Box::new(PitPorts::new(pit.clone())));
            bus.insert(PORT_B, PORT_B_LEN, "pit", Box::new(PortB::new(pit.clone())));
            Self { bus, pit, now, io_cost }
        }

        fn outb(&mut self, port: u16, value: u8) {
            self.bus.write(port, &[value]);
            self.elapse(self.io_cost);
        }

        fn inb(&mut self, port: u16) -> u8 {
            let mut data = [0];
            self.bus.read(port, &mut data);
            self.elapse(self.io_cost);
            data[0]
        }

        fn elapse(&self, time: Duration) {
            self.now.set(self.now.get() + time);
        }

        /// Sets the clock to the moment of CLK tick `tick`.
        fn at_tick(&self, tick: u64) {
            self.now.set(tick_time(tick));
        }

        fn tick(&self) -> u64 {
            ticks_by(self.now.get())
        }

        /// The TSC of a 1 GHz CPU; reading it takes no time.
        fn rdtsc(&self) -> u64 {
            self.now.get().as_nanos() as u64
        }

        fn poll(&self) -> u32 {
            self.pit.borrow_mut().poll()
        }

        fn deadline(&self) -> Option<Duration> {
            self.pit.borrow().next_irq_deadline()
        }

        /// LSB, then MSB.
        fn write_count(&mut self, port: u16, count: u16) {
            let [lsb, msb] = count.to_le_bytes();
            self.outb(port, lsb);
            self.outb(port, msb);
        }

        /// LSB, then MSB.
        fn read_count(&mut self, port: u16) -> u16 {
            let lsb = self.inb(port);
            u16::from_le_bytes([lsb, self.inb(port)])
        }

        /// A counter latch command, then the two bytes.
        fn latched_count(&mut self, counter: u8) -> u16 {
            self.outb(MODE, counter << 6);
            self.read_count(CH0 + u16::from(counter))
        }

        /// A read-back command for the status alone, then the status byte.
        fn status(&mut self, counter: u8) -> u8 {
            self.outb(MODE, 0xe0 | (2 << counter));
            self.inb(CH0 + u16::from(counter))
        }

        fn out0(&mut self) -> bool {
            self.status(0) & 0x80 != 0
        }

        fn out2(&mut self) -> bool {
            self.inb(PORT_B) & 0x20 != 0
        }

        /// Linux: "Set the Gate high, disable speaker".
        fn gate2_high(&mut self) {
            let port_b = self.inb(PORT_B);
            self.outb(PORT_B, (port_b & !0x02) | 0x01);
        }
    }

    #[test]
    fn clk_ticks_convert_to_time_and_back() {
        assert_eq!(ticks_by(Duration::from_secs(1)), PIT_HZ);
        assert_eq!(ticks_by(Duration::from_nanos(838)), 0, "a tick is 838.1 ns");
        assert_eq!(ticks_by(Duration::from_nanos(839)), 1);
        for tick in [1, 2, 1193, PIT_HZ, 3 * PIT_HZ + 7, 1 << 40] {
            assert_eq!(ticks_by(tick_time(tick)), tick);
            assert_eq!(ticks_by(tick_time(tick) - Duration::from_nanos(1)), tick - 1);
        }
    }

    #[test]
    fn an_unprogrammed_pit_neither_counts_nor_interrupts() {
        let mut m = Machine::new();
        m.elapse(Duration::from_secs(5));
        assert_eq!((m.poll(), m.deadline()), (0, None));
        assert!(!m.out2());
        assert_eq!(m.latched_count(0), 0);
    }

    #[test]
    fn mode_0_raises_out_n_plus_1_ticks_after_the_count_is_written() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb0);
        assert!(!m.out2(), "a mode 0 control word sets OUT low");
        m.at_tick(100);
        m.write_count(CH2, 1000);
        assert_eq!(m.latched_count(2), 1000, "loaded on the next tick, which does not count");
        m.at_tick(100 + 1000);
        assert_eq!((m.latched_count(2), m.out2()), (1, false));
        m.at_tick(100 + 1001);
        assert_eq!((m.latched_count(2), m.out2()), (0, true));
        m.at_tick(100 + 1002);
        assert_eq!((m.latched_count(2), m.out2()), (0xffff, true), "the count wraps, OUT stays high");
        m.at_tick(100 + 1001 + 65536);
        assert!(m.out2());
    }

    #[test]
    fn a_mode_0_count_stops_at_its_first_byte_and_restarts_at_its_second() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, 100);
        m.at_tick(200);
        assert!(m.out2());
        m.outb(CH2, 50);
        assert!(!m.out2(), "the first byte sets OUT low");
        m.at_tick(300);
        assert_eq!(m.status(2) & 0xc0, 0x00, "OUT low; null count is about the count register");
        m.outb(CH2, 0);
        m.at_tick(300 + 50);
        assert!(!m.out2());
        m.at_tick(300 + 51);
        assert!(m.out2());
    }

    /// arch/x86/kernel/tsc.c `pit_calibrate_tsc`: the TSC frequency in kHz,
    /// or `None` for Linux's `ULONG_MAX`.
    fn pit_calibrate_tsc(m: &mut Machine, latch: u16, ms: u64, loopmin: u64) -> Option<u64> {
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, latch);
        let t1 = m.rdtsc();
        let (mut tsc, mut t2, mut pitcnt, mut tscmin, mut tscmax) = (t1, t1, 0, u64::MAX, 0);
        while m.inb(PORT_B) & 0x20 == 0 {
            t2 = m.rdtsc();
            let delta = t2 - tsc;
            tsc = t2;
            tscmin = tscmin.min(delta);
            tscmax = tscmax.max(delta);
            pitcnt += 1;
            assert!(pitcnt < 10_000_000, "OUT2 never went high");
        }
        (pitcnt >= loopmin && tscmax <= 10 * tscmin).then_some((t2 - t1) / ms)
    }

    #[test]
    fn pit_calibrate_tsc_times_the_tsc_against_out2() {
        // (CAL_LATCH, CAL_MS, CAL_PIT_LOOPS), then the CAL2_ retry values.
        for (latch, ms, loopmin) in [(11931, 10, 1000), (59659, 50, 5000)] {
            let mut m = Machine::with_io_cost(Duration::from_micros(1));
            let khz = pit_calibrate_tsc(&mut m, latch, ms, loopmin).expect("calibration passes its checks");
            assert!(khz.abs_diff(1_000_000) < 1_000, "{khz} kHz for a 1 GHz TSC");
        }
    }

    /// tsc.c `pit_verify_msb`: the LSB read is ignored.
    fn verify_msb(m: &mut Machine, val: u8) -> bool {
        m.inb(CH2);
        m.inb(CH2) == val
    }

    /// tsc.c `pit_expect_msb`: whether `val` was seen more than 5 times, the
    /// TSC when it last was, and the error bound on that TSC.
    fn expect_msb(m: &mut Machine, val: u8) -> (bool, u64, u64) {
        let (mut count, mut tsc, mut prev_tsc) = (0, 0, 0);
        while count < 50_000 && verify_msb(m, val) {
            prev_tsc = tsc;
            tsc = m.rdtsc();
            count += 1;
        }
        (count > 5, tsc, m.rdtsc() - prev_tsc)
    }

    /// tsc.c `quick_pit_calibrate`: the TSC frequency in kHz, or `None` for
    /// "Fast TSC calibration failed".
    fn quick_pit_calibrate(m: &mut Machine) -> Option<u64> {
        const MAX_QUICK_PIT_ITERATIONS: u64 = 50 * PIT_HZ / 1000 / 256;
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, 0xffff);
        verify_msb(m, 0);
        let (seen, tsc, d1) = expect_msb(m, 0xff);
        if !seen {
            return None;
        }
        for i in 1..=MAX_QUICK_PIT_ITERATIONS {
            let (seen, tsc_i, d2) = expect_msb(m, 0xff - i as u8);
            if !seen {
                return None;
            }
            let delta = tsc_i - tsc;
            if i == 1 && d1 + d2 >= (delta * MAX_QUICK_PIT_ITERATIONS) >> 11 {
                return None;
            }
            if d1 + d2 >= delta >> 11 {
                continue;
            }
            return verify_msb(m, 0xfe - i as u8).then_some(delta * PIT_HZ / (i * 256 * 1000));
        }
        None
    }

    #[test]
    fn quick_pit_calibrate_succeeds_within_500_ppm() {
        let mut m = Machine::with_io_cost(Duration::from_micros(1));
        let khz = quick_pit_calibrate(&mut m).expect("Fast TSC calibration using PIT");
        assert!(khz.abs_diff(1_000_000) <= 500, "{khz} kHz for a 1 GHz TSC");
    }

    #[test]
    fn unlatched_reads_see_the_msb_fall_by_one_every_256_ticks() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, 0xffff); // at tick 0: loaded on tick 1
        for step in 0..255u64 {
            let msb = 0xff - step as u8;
            for tick in [1 + 256 * step, 256 * (step + 1)] {
                m.at_tick(tick);
                let expected = 0xffff - (tick - 1) as u16;
                assert_eq!(m.read_count(CH2), expected, "tick {tick}");
                assert_eq!(expected >> 8, u16::from(msb));
            }
        }
    }

    #[test]
    fn linux_periodic_mode_2_interrupts_every_latch_ticks() {
        let mut m = Machine::new();
        m.outb(MODE, 0x34);
        m.write_count(CH0, LATCH_HZ_1000); // loaded on tick 1
        let first = 1 + 1193;
        assert_eq!(m.deadline(), Some(tick_time(first)));
        m.at_tick(first - 1);
        assert_eq!(m.poll(), 0);
        assert_eq!((m.latched_count(0), m.out0()), (1, false), "OUT0 low for the period's last tick");
        for period in 0..10 {
            let edge = first + period * 1193;
            assert_eq!(m.deadline(), Some(tick_time(edge)));
            m.at_tick(edge);
            assert_eq!(m.poll(), 1);
            assert_eq!((m.latched_count(0), m.out0()), (1193, true));
        }
        // A second later, HZ edges have come (1193 is PIT_HZ / 1000 rounded down).
        let now = m.tick();
        m.at_tick(now + PIT_HZ);
        assert_eq!(m.poll(), 1000);
    }

    #[test]
    fn edges_wait_for_a_poll_and_the_first_unpolled_one_is_the_deadline() {
        let mut m = Machine::new();
        m.outb(MODE, 0x34);
        m.write_count(CH0, 100); // edges on ticks 101, 201, ...
        m.at_tick(1000);
        assert_eq!(m.deadline(), Some(tick_time(101)), "already due");
        m.outb(MODE, 0x34);
        assert_eq!(m.deadline(), Some(tick_time(101)), "a control word keeps edges that came before it");
        assert_eq!(m.poll(), 9);
        assert_eq!((m.poll(), m.deadline()), (0, None));
    }

    #[test]
    fn linux_one_shot_mode_4_interrupts_once_per_count() {
        let mut m = Machine::new();
        m.outb(MODE, 0x38);
        assert!(m.out0(), "mode 4 starts with OUT high");
        assert_eq!(m.deadline(), None, "nothing until a count is written");
        m.at_tick(500);
        m.write_count(CH0, 0x100);
        // Loaded on tick 501, terminal count 256 ticks later, for one tick.
        let edge = 501 + 0x100 + 1;
        assert_eq!(m.deadline(), Some(tick_time(edge)));
        m.at_tick(edge - 1);
        assert_eq!(m.poll(), 0);
        assert!(!m.out0(), "the strobe");
        m.at_tick(edge);
        assert_eq!(m.poll(), 1);
        assert!(m.out0());
        assert_eq!(m.deadline(), None);
        m.at_tick(edge + 3 * 65536);
        assert_eq!(m.poll(), 0, "the count wraps around without another strobe");

        // The next event: another count, LSB then MSB.
        let now = m.tick();
        m.write_count(CH0, 0xf);
        assert_eq!(m.deadline(), Some(tick_time(now + 1 + 0xf + 1)));
    }

    #[test]
    fn a_count_written_mid_count_replaces_the_pending_event() {
        let mut m = Machine::new();
        m.outb(MODE, 0x38);
        m.write_count(CH0, 1000); // would fire on tick 1002
        m.at_tick(500);
        m.write_count(CH0, 100);
        assert_eq!(m.deadline(), Some(tick_time(602)));
        m.at_tick(5000);
        assert_eq!(m.poll(), 1, "only the second count fired");

        m.outb(MODE, 0x30);
        m.write_count(CH0, 1000); // mode 0: would fire on tick 6001
        m.at_tick(5500);
        m.write_count(CH0, 10);
        assert_eq!(m.deadline(), Some(tick_time(5511)));
        m.at_tick(7000);
        assert_eq!(m.poll(), 1);
    }

    #[test]
    fn mode_0_on_counter_0_interrupts_once() {
        let mut m = Machine::new();
        m.outb(MODE, 0x30);
        m.write_count(CH0, 50);
        assert_eq!(m.deadline(), Some(tick_time(51)));
        m.at_tick(51);
        assert_eq!(m.poll(), 1);
        assert_eq!(m.deadline(), None);
        m.at_tick(51 + 10 * 65536);
        assert_eq!(m.poll(), 0);
    }

    #[test]
    fn linux_shutdown_stops_counter_0_for_good() {
        let mut m = Machine::new();
        m.outb(MODE, 0x34);
        m.write_count(CH0, LATCH_HZ_1000); // edges on ticks 1194, 2387, 3580, 4773, ...
        m.at_tick(5000);
        // clockevent_i8253_disable
        m.outb(MODE, 0x30);
        m.write_count(CH0, 0);
        assert_eq!(m.poll(), 4);
        assert_eq!(m.deadline(), Some(tick_time(5001 + 65536)), "mode 0 with a count of 65536");
        m.outb(MODE, 0x30);
        assert_eq!(m.deadline(), None);
        m.elapse(Duration::from_secs(10));
        assert_eq!((m.poll(), m.deadline()), (0, None));
    }

    #[test]
    fn a_count_of_0_is_65536() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, 0); // loaded on tick 1
        m.at_tick(1);
        assert_eq!(m.latched_count(2), 0);
        m.at_tick(2);
        assert_eq!(m.latched_count(2), 0xffff);
        m.at_tick(65536);
        assert_eq!((m.latched_count(2), m.out2()), (1, false));
        m.at_tick(65537);
        assert!(m.out2());

        m.outb(MODE, 0x34);
        m.write_count(CH0, 0);
        assert_eq!(m.deadline(), Some(tick_time(65538 + 65536)));
    }

    #[test]
    fn a_latched_count_holds_until_read_and_a_second_latch_is_ignored() {
        let mut m = Machine::new();
        m.outb(MODE, 0x34);
        m.write_count(CH0, 1000); // loaded on tick 1
        m.at_tick(101);
        m.outb(MODE, 0x00);
        m.at_tick(301);
        m.outb(MODE, 0x00);
        assert_eq!(m.inb(CH0), (900 & 0xff) as u8);
        m.at_tick(401);
        assert_eq!(m.inb(CH0), (900 >> 8) as u8);
        assert_eq!(m.read_count(CH0), 600, "unlatched: the count at each read");

        m.outb(MODE, 0x00);
        m.at_tick(501);
        m.outb(MODE, 0x34);
        m.write_count(CH0, 1000);
        m.at_tick(602);
        assert_eq!(m.read_count(CH0), 900, "a control word drops the latched count");
    }

    #[test]
    fn read_back_latches_status_before_count() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb6); // counter 2, mode 3, as the PC speaker driver
        assert_eq!(m.status(2), 0x80 | 0x40 | 0x36, "OUT high, null count, then the control word");
        m.at_tick(10);
        m.write_count(CH2, 1000);
        assert_eq!(m.status(2), 0x80 | 0x40 | 0x36, "the count is loaded on the next tick");
        m.at_tick(11);
        assert_eq!(m.status(2), 0x80 | 0x36);

        m.outb(MODE, 0x30);
        m.write_count(CH0, 0x1234); // loaded on tick 12
        m.at_tick(20);
        m.outb(MODE, 0xc0 | 0x08 | 0x02); // count and status of counters 0 and 2
        m.outb(MODE, 0xe2); // counter 0's status again: ignored
        m.at_tick(500);
        assert_eq!(m.inb(CH0), 0x30, "mode 0, OUT low");
        assert_eq!(m.read_count(CH0), 0x1234 - 8);
        assert_eq!(m.read_count(CH0), 0x1234 - 488, "unlatched again");
        assert_eq!(m.inb(CH2), 0x80 | 0x36);
        assert_eq!(m.read_count(CH2), 1000 - 2 * 9, "mode 3 counts by two");
        m.at_tick(12 + 0x1234);
        assert_eq!(m.status(0), 0x80 | 0x30);
    }

    #[test]
    fn lsb_only_and_msb_only_counts() {
        let mut m = Machine::new();
        m.outb(MODE, 0x14); // counter 0, LSB only, mode 2
        m.outb(CH0, 200);
        assert_eq!(m.deadline(), Some(tick_time(201)));
        m.at_tick(51);
        assert_eq!((m.inb(CH0), m.inb(CH0)), (150, 150), "every read is the LSB");
        m.outb(MODE, 0x24); // MSB only, mode 2
        m.outb(CH0, 0x02); // 512 ticks, loaded on tick 52
        m.at_tick(52 + 256);
        assert_eq!(m.inb(CH0), 0x01);
        assert_eq!(m.deadline(), Some(tick_time(52 + 512)));
    }

    #[test]
    fn square_wave_mode_3_halves_each_period_and_counts_by_two() {
        let mut m = Machine::new();
        m.gate2_high();
        for (count, high, counts) in [(10, 5, vec![10, 8, 6, 4, 2, 10, 8, 6, 4, 2]), (7, 4, vec![6, 4, 2, 0, 6, 4, 2])]
        {
            m.outb(MODE, 0xb6);
            let start = m.tick() + 1;
            m.write_count(CH2, count);
            let (mut outs, mut values) = (Vec::new(), Vec::new());
            for tick in start..start + 2 * u64::from(count) {
                m.at_tick(tick);
                outs.push(m.out2());
                values.push(m.latched_count(2));
            }
            let half: Vec<bool> = (0..count).map(|phase| phase < high).collect();
            assert_eq!(outs, [half.clone(), half].concat(), "count {count}");
            assert_eq!(values, [counts.clone(), counts].concat(), "count {count}");
        }

        m.outb(MODE, 0x36);
        let now = m.tick();
        m.write_count(CH0, 7);
        assert_eq!(m.deadline(), Some(tick_time(now + 1 + 7)), "IRQ 0 rises once per period");
    }

    #[test]
    fn a_count_written_while_counting_in_mode_2_waits_for_the_period_to_end() {
        let mut m = Machine::new();
        m.outb(MODE, 0x34);
        m.write_count(CH0, 100); // edges on ticks 101, 201, ...
        m.at_tick(150);
        m.write_count(CH0, 40);
        assert_eq!(m.status(0) & 0x40, 0x40, "null count until the period ends");
        assert_eq!(m.poll(), 1);
        assert_eq!(m.deadline(), Some(tick_time(201)));
        m.at_tick(200);
        assert_eq!(m.latched_count(0), 1);
        m.at_tick(201);
        assert_eq!((m.latched_count(0), m.status(0) & 0x40), (40, 0));
        m.at_tick(281);
        assert_eq!(m.poll(), 3, "ticks 201, 241, 281");
    }

    #[test]
    fn a_count_written_while_counting_in_mode_3_waits_for_the_half_period_to_end() {
        let mut m = Machine::new();
        m.outb(MODE, 0x36);
        m.write_count(CH0, 100); // loaded on tick 1, high for 50 ticks
        m.at_tick(11);
        m.write_count(CH0, 20);
        assert_eq!(m.deadline(), Some(tick_time(51 + 10)), "after the new count's low half");
        m.at_tick(50);
        assert!(m.out0());
        m.at_tick(51);
        assert_eq!((m.out0(), m.latched_count(0)), (false, 20));
        m.at_tick(60);
        assert!(!m.out0());
        m.at_tick(61);
        assert!(m.out0());
        assert_eq!(m.poll(), 1);
        assert_eq!(m.deadline(), Some(tick_time(81)));
    }

    #[test]
    fn gate2_low_suspends_mode_0_and_restarts_mode_2() {
        let mut m = Machine::new();
        m.gate2_high();
        m.outb(MODE, 0xb0);
        m.write_count(CH2, 100); // loaded on tick 1
        m.at_tick(51);
        m.outb(PORT_B, 0x00);
        m.at_tick(1000);
        assert_eq!((m.latched_count(2), m.out2()), (50, false));
        m.outb(PORT_B, 0x01);
        m.at_tick(1049);
        assert!(!m.out2());
        m.at_tick(1050);
        assert!(m.out2());

        m.outb(MODE, 0xb4);
        m.at_tick(2000);
        m.write_count(CH2, 100); // loaded on tick 2001, OUT low on tick 2100
        m.at_tick(2100);
        assert!(!m.out2());
        m.outb(PORT_B, 0x00);
        assert!(m.out2(), "GATE low sets OUT high at once");
        m.at_tick(3000);
        assert_eq!(m.latched_count(2), 1);
        m.outb(PORT_B, 0x01); // reloaded on tick 3001
        m.at_tick(3001);
        assert_eq!(m.latched_count(2), 100);
        m.at_tick(3099);
        assert!(m.out2());
        m.at_tick(3100);
        assert!(!m.out2());
    }

    #[test]
    fn modes_1_and_5_start_on_a_gate2_rising_edge() {
        let mut m = Machine::new();
        m.outb(MODE, 0xb2); // counter 2, mode 1
        m.write_count(CH2, 100);
        m.at_tick(500);
        assert!(m.out2(), "a count alone does not start mode 1");
        assert_eq!(m.status(2) & 0x40, 0x40, "null count until a trigger");
        m.outb(PORT_B, 0x01); // loaded on tick 501
        m.at_tick(501);
        assert!(!m.out2());
        assert_eq!(m.status(2) & 0x40, 0);
        m.at_tick(600);
        assert!(!m.out2());
        m.at_tick(601);
        assert!(m.out2());
        m.outb(PORT_B, 0x00);
        m.at_tick(650);
        m.outb(PORT_B, 0x01);
        assert_eq!(m.status(2) & 0x40, 0, "a retrigger loads no new count");
        m.at_tick(750);
        assert!(!m.out2(), "retriggered");
        m.at_tick(751);
        assert!(m.out2());

        m.outb(PORT_B, 0x00);
        m.outb(MODE, 0xba); // mode 5
        m.write_count(CH2, 10);
        m.at_tick(1000);
        m.outb(PORT_B, 0x01); // loaded on tick 1001, terminal count on 1011
        let outs: Vec<bool> = (1010..1013)
            .map(|tick| {
                m.at_tick(tick);
                m.out2()
            })
            .collect();
        assert_eq!(outs, [true, false, true]);
    }

    #[test]
    fn bcd_counts_are_decimal() {
        let mut m = Machine::new();
        m.outb(MODE, 0x35); // counter 0, mode 2, BCD
        m.write_count(CH0, 0x1000);
        assert_eq!(m.deadline(), Some(tick_time(1 + 1000)));
        m.at_tick(2);
        assert_eq!(m.latched_count(0), 0x0999);

        m.outb(MODE, 0x31); // mode 0, BCD
        m.write_count(CH0, 0);
        assert_eq!(m.deadline(), Some(tick_time(3 + 10_000)));
        m.at_tick(4);
        assert_eq!(m.latched_count(0), 0x9999);
    }

    #[test]
    fn port_b_keeps_its_low_bits_and_reports_out2_and_the_refresh_toggle() {
        let mut m = Machine::new();
        m.outb(PORT_B, 0xff);
        assert_eq!(m.inb(PORT_B) & 0xcf, 0x0f, "bits 0-3 read back, no NMI source");
        m.outb(PORT_B, 0x0c);
        assert_eq!(m.inb(PORT_B) & 0x0f, 0x0c);
        let refresh: Vec<bool> = (0..4)
            .map(|period| {
                m.at_tick(period * REFRESH_TICKS);
                m.inb(PORT_B) & 0x10 != 0
            })
            .collect();
        assert_eq!(refresh, [false, true, false, true]);
    }

    #[test]
    fn the_control_register_reads_all_ones_and_wide_accesses_use_the_first_byte() {
        let mut m = Machine::new();
        assert_eq!(m.inb(MODE), 0xff);
        m.bus.write(MODE, &[0x14, 0xff]); // counter 0, LSB only, mode 2
        m.bus.write(CH0, &[100, 0xff]);
        let mut data = [0xaa; 4];
        m.bus.read(CH0, &mut data);
        assert_eq!(data, [100, 0, 0, 0]);
        m.bus.read(PORT_B, &mut data[..2]);
        assert_eq!(data[1], 0);
    }
}
