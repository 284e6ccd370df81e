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
