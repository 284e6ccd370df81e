//! The PC's CMOS real-time clock, a Motorola MC146818A: an index port at
//! 0x70 (bits 6-0 select one of 128 bytes; bit 7, the PC's NMI mask, is
//! ignored) and a data port at 0x71.
//!
//! The registers (MC146818A datasheet, "Address Map" and "Registers"):
//! - 0x00-0x09: seconds, seconds alarm, minutes, minutes alarm, hours, hours
//!   alarm, day of week (1-7, Sunday is 1), day of month, month, year
//!   (00-99); 0x32 holds the century, by the PC/AT's convention (Linux reads
//!   it where ACPI's FADT names it). Values are BCD unless register B's DM
//!   bit selects binary; hours are 0-23 unless its 24/12 bit is clear, then
//!   1-12 with bit 7 set for PM.
//! - Register A: UIP (bit 7, read-only) is set from 244 µs before each
//!   update of the time registers until the update, so software that sees
//!   it clear has 244 µs to read a consistent time; the divider and rate
//!   bits are stored (0x26 after power-on, the 32.768 kHz time base and the
//!   1024 Hz rate every PC BIOS programs).
//! - Register B: SET stops updates so the time can be written (setting it
//!   clears UIE, as the datasheet says); the interrupt enables and SQWE are
//!   stored; DM and 24/12 as above (after power-on 0x02: 24-hour BCD, what
//!   Linux and PC firmware expect).
//! - Register C (read-only): interrupt flags, cleared by reading. Only UF
//!   is ever set, when an update happened since the last read; IRQF with it
//!   if UIE is set. No interrupt is raised on IRQ 8 and the periodic and
//!   alarm flags stay clear.
//! - Register D (read-only): VRT, valid RAM and time, always set.
//! - 0x0e-0x7f: battery-backed RAM, which keeps what is written.
//!
//! The time is not stored but computed: a wall clock given at construction
//! ([`WallClock`], the time since the Unix epoch) plus an offset, 0 at
//! power-on. A guest writing the time changes the offset, as QEMU does, so
//! it reads back what it set, counting on from there, without touching the
//! host's clock. Updates happen on the wall clock's second boundaries; UIP
//! is set in the 244 µs before each one. With SET, the time registers hold
//! what the guest writes (first, what they showed when SET was written);
//! clearing SET starts the clock from them. As on the chip, they are
//! decoded then with register B's formats at that moment. While the clock
//! runs, reads always give the time in the current formats (the chip would
//! need the time rewritten after a format change), and the day of week
//! follows the date: one written is not kept, as in QEMU.
//!
//! Linux (drivers/rtc/rtc-mc146818-lib.c, 6.12) reads the time in
//! `mc146818_get_time`: it reads the seconds, retries (100 µs apart) while
//! UIP is set, reads the other fields and register B, then checks UIP and
//! the seconds again. `mc146818_set_time` sets SET and the divider reset in
//! registers B and A, writes year, month, day, hours, minutes and seconds,
//! then restores B and A.

use std::time::{Duration, SystemTime};

use crate::bus::PortDevice;

/// The index port; the data port follows.
pub const RTC_BASE: u16 = 0x70;
/// Index and data.
pub const RTC_LEN: u16 = 2;

/// The time since the Unix epoch, in UTC: what the RTC counts from.
pub trait WallClock {
    /// Now.
    fn now(&self) -> Duration;
}

/// The host's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_else(|e| {
            log::warn!("RTC: the host clock is before 1970 ({e}); using the epoch");
            Duration::ZERO
        })
    }
}

impl<F: Fn() -> Duration> WallClock for F {
    fn now(&self) -> Duration {
        self()
    }
}

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const DAY_OF_WEEK: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// The PC/AT's century byte in CMOS RAM.
const CENTURY: usize = 0x32;
/// Registers that count time.
const TIME_REGISTERS: [usize; 8] = [SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY];

/// Register A: update in progress.
const A_UIP: u8 = 1 << 7;
/// Register A after power-on: DV = 010 (32.768 kHz), RS = 0110 (1024 Hz).
const A_POWER_ON: u8 = 0x26;
/// Register B: updates stopped to set the time.
const B_SET: u8 = 1 << 7;
/// Register B: update-ended interrupt enable.
const B_UIE: u8 = 1 << 4;
/// Register B: binary, not BCD.
const B_DM_BINARY: u8 = 1 << 2;
/// Register B: 24-hour mode.
const B_24H: u8 = 1 << 1;
/// Register B after power-on: 24-hour, BCD.
const B_POWER_ON: u8 = B_24H;
/// Register C: an enabled interrupt flag is set.
const C_IRQF: u8 = 1 << 7;
/// Register C: an update ended.
const C_UF: u8 = 1 << 4;
/// Register D: valid RAM and time.
const D_VRT: u8 = 1 << 7;
/// Hours register in 12-hour mode: PM.
const HOUR_PM: u8 = 1 << 7;
/// UIP leads the update by 244 µs (8 cycles of the 32.768 kHz time base).
const UIP_LEAD_NS: u32 = 244_141;
const NANOS_PER_SECOND: u32 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// A UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    /// The date `unix` seconds after the epoch (proleptic Gregorian).
    fn from_unix(unix: i64) -> Self {
        let (days, secs) = (unix.div_euclid(SECONDS_PER_DAY), unix.rem_euclid(SECONDS_PER_DAY));
        let (year, month, day) = civil_from_days(days);
        Self { year, month, day, hour: (secs / 3600) as u8, minute: (secs / 60 % 60) as u8, second: (secs % 60) as u8 }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * SECONDS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// 1 (Sunday) to 7 (Saturday), the RTC's numbering.
    fn day_of_week(self) -> u8 {
        // 1970-01-01 was a Thursday.
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8 + 1
    }
}

/// Days from 1970-01-01 to `year`-`month`-`day`, counting in 400-year eras
/// of the Gregorian calendar (each 146097 days) with years starting in
/// March, so that the leap day ends the year.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u8;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u8;
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    (year, month, day)
}

fn whole_seconds(time: Duration) -> i64 {
    i64::try_from(time.as_secs()).unwrap_or(i64::MAX)
}

/// The formats register B selects.
#[derive(Clone, Copy, Debug)]
struct Format {
    binary: bool,
    hours_24: bool,
}

impl Format {
    fn of(reg_b: u8) -> Self {
        Self { binary: reg_b & B_DM_BINARY != 0, hours_24: reg_b & B_24H != 0 }
    }

    fn encode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            (value >> 4) * 10 + (value & 0xf)
        }
    }

    fn encode_hour(self, hour: u8) -> u8 {
        if self.hours_24 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(match hour % 12 {
            0 => 12,
            h => h,
        }) | pm
    }

    fn decode_hour(self, value: u8) -> u8 {
        if self.hours_24 {
            return self.decode(value);
        }
        let pm = if value & HOUR_PM != 0 { 12 } else { 0 };
        self.decode(value & !HOUR_PM) % 12 + pm
    }

    /// The time registers showing `time`, indexed like CMOS.
    fn encode_time(self, time: DateTime, ram: &mut [u8; 128]) {
        let year = time.year.rem_euclid(100) as u8;
        let century = time.year.div_euclid(100).clamp(0, 99) as u8;
        ram[SECONDS] = self.encode(time.second);
        ram[MINUTES] = self.encode(time.minute);
        ram[HOURS] = self.encode_hour(time.hour);
        ram[DAY_OF_WEEK] = self.encode(time.day_of_week());
        ram[DAY_OF_MONTH] = self.encode(time.day);
        ram[MONTH] = self.encode(time.month);
        ram[YEAR] = self.encode(year);
        ram[CENTURY] = self.encode(century);
    }

    /// The time the registers show; fields out of range are clamped (a
    /// day past the month's end runs into the next month).
    fn decode_time(self, ram: &[u8; 128]) -> DateTime {
        let year = self.decode(ram[YEAR]).min(99);
        let century = self.decode(ram[CENTURY]).min(99);
        DateTime {
            year: i64::from(century) * 100 + i64::from(year),
            month: self.decode(ram[MONTH]).clamp(1, 12),
            day: self.decode(ram[DAY_OF_MONTH]).clamp(1, 31),
            hour: self.decode_hour(ram[HOURS]).min(23),
            minute: self.decode(ram[MINUTES]).min(59),
            second: self.decode(ram[SECONDS]).min(59),
        }
    }
}

/// The MC146818A and its CMOS RAM.
pub struct Rtc<C = SystemClock> {
    clock: C,
    /// The byte the data port reaches.
    index: u8,
    /// Registers A and B, the alarms and RAM; the time registers only
    /// while SET holds them.
    ram: [u8; 128],
    /// Guest time minus wall-clock time, in seconds.
    offset: i64,
    /// The guest second when register C was last read (or the clock set).
    flags_read_at: i64,
}

impl Rtc<SystemClock> {
    /// An RTC on the host's clock.
    pub fn host() -> Self {
        Self::new(SystemClock)
    }
}

impl<C: WallClock> Rtc<C> {
    /// An RTC as after power-on, showing `clock`'s time: registers A and B
    /// as the BIOS leaves them (0x26, 24-hour BCD), RAM zeroed.
    pub fn new(clock: C) -> Self {
        let mut ram = [0; 128];
        ram[REG_A] = A_POWER_ON;
        ram[REG_B] = B_POWER_ON;
        let now = whole_seconds(clock.now());
        Self { clock, index: 0, ram, offset: 0, flags_read_at: now }
    }

    /// The guest's time: whole seconds since the epoch, and nanoseconds
    /// into the current second.
    fn now(&self) -> (i64, u32) {
        let wall = self.clock.now();
        (whole_seconds(wall).saturating_add(self.offset), wall.subsec_nanos())
    }

    fn format(&self) -> Format {
        Format::of(self.ram[REG_B])
    }

    fn halted(&self) -> bool {
        self.ram[REG_B] & B_SET != 0
    }

    /// Copies the running time into the time registers.
    fn latch(&mut self) {
        let time = DateTime::from_unix(self.now().0);
        self.format().encode_time(time, &mut self.ram);
    }

    /// Runs the clock from the time registers.
    fn start_from_registers(&mut self) {
        let time = self.format().decode_time(&self.ram).to_unix();
        self.offset = time.saturating_sub(whole_seconds(self.clock.now()));
        self.flags_read_at = time;
        log::debug!("RTC: set to {} s after the epoch (offset {} s)", time, self.offset);
    }

    fn read_register(&mut self, index: usize) -> u8 {
        match index {
            _ if TIME_REGISTERS.contains(&index) => {
                if self.halted() {
                    self.ram[index]
                } else {
                    let mut registers = [0; 128];
                    self.format().encode_time(DateTime::from_unix(self.now().0), &mut registers);
                    registers[index]
                }
            }
            REG_A => self.ram[REG_A] | if self.update_in_progress() { A_UIP } else { 0 },
            REG_C => self.read_flags(),
            REG_D => D_VRT,
            _ => self.ram[index],
        }
    }

    fn update_in_progress(&self) -> bool {
        !self.halted() && self.now().1 >= NANOS_PER_SECOND - UIP_LEAD_NS
    }

    /// Register C, which reading clears.
    fn read_flags(&mut self) -> u8 {
        let second = self.now().0;
        let mut flags = 0;
        if !self.halted() && second != self.flags_read_at {
            flags |= C_UF;
            if self.ram[REG_B] & B_UIE != 0 {
                flags |= C_IRQF;
            }
        }
        self.flags_read_at = second;
        flags
    }

    fn write_register(&mut self, index: usize, value: u8) {
        match index {
            _ if TIME_REGISTERS.contains(&index) => {
                if self.halted() {
                    self.ram[index] = value;
                } else {
                    self.latch();
                    self.ram[index] = value;
                    self.start_from_registers();
                }
            }
            REG_A => self.ram[REG_A] = value & !A_UIP,
            REG_B => self.write_b(value),
            REG_C | REG_D => log::debug!("RTC: register {index:#x} is read-only; {value:#04x} ignored"),
            _ => self.ram[index] = value,
        }
    }

    fn write_b(&mut self, mut value: u8) {
        let was_halted = self.halted();
        if value & B_SET != 0 {
            value &= !B_UIE;
            if !was_halted {
                // The registers hold the time in the formats it ran in.
                self.latch();
            }
        }
        self.ram[REG_B] = value;
        if was_halted && value & B_SET == 0 {
            self.start_from_registers();
        }
    }
}

impl<C: WallClock> PortDevice for Rtc<C> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // 8-bit registers: a wider access reads the first one.
        data.fill(0);
        data[0] = match offset {
            // The index port is write-only on a PC: nothing drives the bus.
            0 => 0xff,
            _ => self.read_register(usize::from(self.index)),
        };
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match offset {
            // Bit 7 masks NMIs on a PC; there are none to mask.
            0 => self.index = data[0] & 0x7f,
            _ => self.write_register(usize::from(self.index), data[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// 2024-02-29 13:45:30 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_214_330;

    /// A settable clock.
    fn clock(at: Duration) -> (Rc<Cell<Duration>>, impl Fn() -> Duration) {
        let now = Rc::new(Cell::new(at));
        let shared = now.clone();
        (now, move || shared.get())
    }

    fn cmos<C: WallClock>(rtc: &mut Rtc<C>, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut data = [0];
        rtc.read(1, &mut data);
        data[0]
    }

    fn set_cmos<C: WallClock>(rtc: &mut Rtc<C>, index: u8, value: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[value]);
    }

    /// Seconds, minutes, hours, day of week, day, month, year, century.
    fn time<C: WallClock>(rtc: &mut Rtc<C>) -> [u8; 8] {
        TIME_REGISTERS.map(|index| cmos(rtc, index as u8))
    }

    #[test]
    fn a_known_date_reads_in_bcd() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        assert_eq!(time(&mut rtc), [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
        assert_eq!(cmos(&mut rtc, 0x0b), 0x02, "24-hour BCD after power-on");
        assert_eq!(cmos(&mut rtc, 0x0a), 0x26);
        assert_eq!(cmos(&mut rtc, 0x0d), 0x80, "valid RAM and time");
    }

    #[test]
    fn binary_mode_reads_the_same_date_in_binary() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        set_cmos(&mut rtc, 0x0b, 0x06);
        assert_eq!(time(&mut rtc), [30, 45, 13, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn twelve_hour_mode_marks_pm_and_shows_12_for_midnight_and_noon() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY));
        let mut rtc = Rtc::new(clock);
        set_cmos(&mut rtc, 0x0b, 0x00);
        assert_eq!(cmos(&mut rtc, 0x04), 0x81, "1 PM");
        // 2024-07-14 00:30 and 12:05.
        now.set(Duration::from_secs(1_720_917_000));
        assert_eq!(cmos(&mut rtc, 0x04), 0x12);
        now.set(Duration::from_secs(1_720_958_700));
        assert_eq!(cmos(&mut rtc, 0x04), 0x92);
        set_cmos(&mut rtc, 0x0b, 0x04);
        assert_eq!(cmos(&mut rtc, 0x04), 0x8c, "binary 12 PM");
        // Writing 11 PM in 12-hour binary sets 23:05.
        set_cmos(&mut rtc, 0x04, 0x8b);
        set_cmos(&mut rtc, 0x0b, 0x06);
        assert_eq!(cmos(&mut rtc, 0x04), 23);
        assert_eq!(cmos(&mut rtc, 0x02), 5);
    }

    #[test]
    fn the_time_runs_with_the_clock_across_days_years_and_centuries() {
        let (now, clock) = clock(Duration::from_secs(946_684_799));
        let mut rtc = Rtc::new(clock);
        assert_eq!(time(&mut rtc), [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]);
        now.set(Duration::from_secs(946_684_800));
        assert_eq!(time(&mut rtc), [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]);
        now.set(Duration::from_secs(4_102_444_800));
        assert_eq!(time(&mut rtc), [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]);
    }

    /// As mc146818_set_time: SET and the divider reset, the fields, then B
    /// and A restored. The clock then runs on from what was written.
    #[test]
    fn setting_the_time_as_linux_does_offsets_the_clock() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY));
        let mut rtc = Rtc::new(clock);
        let (b, a) = (cmos(&mut rtc, 0x0b), cmos(&mut rtc, 0x0a));
        set_cmos(&mut rtc, 0x0b, b | 0x80);
        set_cmos(&mut rtc, 0x0a, a | 0x70);
        // 2031-12-25 08:00:00.
        for (index, value) in [(0x09, 0x31), (0x08, 0x12), (0x07, 0x25), (0x04, 0x08), (0x02, 0x00), (0x00, 0x00)] {
            set_cmos(&mut rtc, index, value);
        }
        now.set(now.get() + Duration::from_secs(3));
        assert_eq!(cmos(&mut rtc, 0x00), 0x00, "held while SET");
        set_cmos(&mut rtc, 0x0b, b);
        set_cmos(&mut rtc, 0x0a, a);
        assert_eq!(time(&mut rtc), [0x00, 0x00, 0x08, 0x05, 0x25, 0x12, 0x31, 0x20]);
        now.set(now.get() + Duration::from_secs(61));
        assert_eq!(time(&mut rtc)[..3], [0x01, 0x01, 0x08]);
        assert_eq!(rtc.offset, 1_955_952_000 - (LEAP_DAY as i64 + 3));
    }

    #[test]
    fn a_field_written_while_running_takes_effect_at_once() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY));
        let mut rtc = Rtc::new(clock);
        set_cmos(&mut rtc, 0x02, 0x10);
        assert_eq!(time(&mut rtc)[..3], [0x30, 0x10, 0x13]);
        now.set(now.get() + Duration::from_secs(45));
        assert_eq!(time(&mut rtc)[..3], [0x15, 0x11, 0x13]);
        set_cmos(&mut rtc, 0x06, 0x01);
        assert_eq!(cmos(&mut rtc, 0x06), 0x05, "the day of week follows the date");
    }

    #[test]
    fn set_holds_the_registers_and_clears_uie() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY) + Duration::from_nanos(999_900_000));
        let mut rtc = Rtc::new(clock);
        set_cmos(&mut rtc, 0x0b, 0x92);
        assert_eq!(cmos(&mut rtc, 0x0b), 0x82, "UIE cleared by SET");
        assert_eq!(cmos(&mut rtc, 0x0a) & 0x80, 0, "no update, no UIP");
        set_cmos(&mut rtc, 0x06, 0x03);
        now.set(now.get() + Duration::from_secs(100));
        assert_eq!(time(&mut rtc), [0x30, 0x45, 0x13, 0x03, 0x29, 0x02, 0x24, 0x20]);
        set_cmos(&mut rtc, 0x0b, 0x12);
        assert_eq!(cmos(&mut rtc, 0x0b), 0x12, "UIE can be set without SET");
    }

    #[test]
    fn a_format_change_under_set_reinterprets_the_registers() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        set_cmos(&mut rtc, 0x0b, 0x82);
        assert_eq!(cmos(&mut rtc, 0x00), 0x30, "BCD as it ran");
        set_cmos(&mut rtc, 0x0b, 0x06);
        assert_eq!(cmos(&mut rtc, 0x00), 48, "0x30 taken as binary");
    }

    #[test]
    fn uip_is_set_only_just_before_the_update() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY) + Duration::from_millis(500));
        let mut rtc = Rtc::new(clock);
        assert_eq!(cmos(&mut rtc, 0x0a), 0x26);
        now.set(Duration::from_secs(LEAP_DAY) + Duration::from_nanos(999_800_000));
        assert_eq!(cmos(&mut rtc, 0x0a), 0xa6);
        assert_eq!(cmos(&mut rtc, 0x00), 0x30, "the update has not happened yet");
        now.set(Duration::from_secs(LEAP_DAY + 1));
        assert_eq!(cmos(&mut rtc, 0x0a), 0x26);
        assert_eq!(cmos(&mut rtc, 0x00), 0x31);
        set_cmos(&mut rtc, 0x0a, 0xff);
        assert_eq!(cmos(&mut rtc, 0x0a), 0x7f, "UIP is read-only");
    }

    /// mc146818_avoid_UIP, started inside the UIP window: it waits 100 µs
    /// at a time and gets a consistent time as soon as the update is done.
    #[test]
    fn linux_reading_inside_the_uip_window_is_never_stuck() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY) + Duration::from_nanos(999_850_000));
        let mut rtc = Rtc::new(clock);
        let mut retries = 0;
        let time = loop {
            let seconds = cmos(&mut rtc, 0x00);
            if cmos(&mut rtc, 0x0a) & 0x80 != 0 {
                retries += 1;
                assert!(retries < 10_000, "stuck");
                now.set(now.get() + Duration::from_micros(100));
                continue;
            }
            let time = time(&mut rtc);
            if cmos(&mut rtc, 0x0a) & 0x80 == 0 && cmos(&mut rtc, 0x00) == seconds {
                break time;
            }
        };
        assert_eq!(retries, 2);
        assert_eq!(time[0], 0x31);
    }

    #[test]
    fn register_c_reports_an_update_once_and_reading_clears_it() {
        let (now, clock) = clock(Duration::from_secs(LEAP_DAY));
        let mut rtc = Rtc::new(clock);
        assert_eq!(cmos(&mut rtc, 0x0c), 0);
        now.set(now.get() + Duration::from_secs(1));
        assert_eq!(cmos(&mut rtc, 0x0c), 0x10);
        assert_eq!(cmos(&mut rtc, 0x0c), 0);
        set_cmos(&mut rtc, 0x0b, 0x12);
        now.set(now.get() + Duration::from_secs(2));
        assert_eq!(cmos(&mut rtc, 0x0c), 0x90, "IRQF with UIE");
        set_cmos(&mut rtc, 0x0c, 0xff);
        set_cmos(&mut rtc, 0x0d, 0x00);
        assert_eq!((cmos(&mut rtc, 0x0c), cmos(&mut rtc, 0x0d)), (0, 0x80), "read-only");
    }

    #[test]
    fn cmos_ram_and_alarms_keep_what_is_written() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        let ram = (0x0e..0x80).filter(|&index| index != CENTURY as u8);
        for index in [0x01, 0x03, 0x05].into_iter().chain(ram.clone()) {
            set_cmos(&mut rtc, index, index ^ 0xa5);
        }
        for index in [0x01, 0x03, 0x05].into_iter().chain(ram) {
            assert_eq!(cmos(&mut rtc, index), index ^ 0xa5, "byte {index:#x}");
        }
        assert_eq!(time(&mut rtc), [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
    }

    #[test]
    fn the_nmi_bit_is_ignored_and_the_index_port_reads_all_ones() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        set_cmos(&mut rtc, 0x80 | 0x40, 0x12);
        assert_eq!(cmos(&mut rtc, 0x40), 0x12);
        assert_eq!(cmos(&mut rtc, 0x80), 0x30, "0x80 selects the seconds");
        let mut data = [0];
        rtc.read(0, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn the_century_register_can_be_set() {
        let mut rtc = Rtc::new(|| Duration::from_secs(LEAP_DAY));
        set_cmos(&mut rtc, 0x32, 0x19);
        assert_eq!(time(&mut rtc)[6..], [0x24, 0x19]);
        assert_eq!(cmos(&mut rtc, 0x06), 0x06, "1924-02-29 was a Friday");
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for (unix, date) in [
            (0, (1970, 1, 1)),
            (951_868_800, (2000, 3, 1)),
            (LEAP_DAY as i64 - 49_530, (2024, 2, 29)),
            (-86_400, (1969, 12, 31)),
        ] {
            let time = DateTime::from_unix(unix);
            assert_eq!((time.year, time.month, time.day), date);
            assert_eq!(time.to_unix(), unix);
        }
        for days in (-800_000..800_000).step_by(997) {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days);
        }
        assert_eq!(DateTime::from_unix(0).day_of_week(), 5, "a Thursday");
    }
}
