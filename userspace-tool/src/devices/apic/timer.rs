//! The local APIC's timer (SDM Vol. 3A, 11.5.4): its modes, its count
//! and the expiries it requests, on the VM's clock.
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

use std::time::Duration;

use super::{lvt_vector, LocalApic, LVT_MASKED, LVT_TIMER};

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// The LVT timer entry's mode field: bits 18:17.
const TIMER_MODE_SHIFT: u32 = 17;
/// Divide configuration: bits 0, 1 and 3 (11.5.4, Figure 11-10).
const DIVIDE_WRITABLE: u32 = 0b1011;

/// A time `nanos` after time 0, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // Below 10^9, so it fits and carries nothing into the seconds.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// The LVT timer entry's mode (bits 18:17, 11.5.4 Table 11-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TimerMode {
    OneShot,
    Periodic,
    /// TSC-deadline (10), not offered, or reserved (11): the timer stays
    /// stopped.
    Unsupported,
}

impl TimerMode {
    pub(super) fn of(lvt_timer: u32) -> Self {
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
pub(super) struct Countdown {
    /// The initial count, reloaded in periodic mode: at least 1.
    pub(super) initial: u32,
    /// At least 1.
    pub(super) from: u32,
    pub(super) since: Duration,
    /// 1 to 128.
    pub(super) divide: u32,
    /// Expiries since `since` already latched (or dropped, if masked).
    pub(super) latched: u128,
}

impl Countdown {
    /// Counts (decrements) made by time `now`, for an input clock of `hz`.
    pub(super) fn counts_by(&self, now: Duration, hz: u64) -> u128 {
        let nanos = now.saturating_sub(self.since).as_nanos();
        nanos.saturating_mul(u128::from(hz)) / (NANOS_PER_SEC * u128::from(self.divide))
    }

    /// Expiries after `counts` counts.
    pub(super) fn expiries(&self, counts: u128, periodic: bool) -> u128 {
        let from = u128::from(self.from);
        match counts.checked_sub(from) {
            None => 0,
            Some(past) if periodic => 1 + past / u128::from(self.initial.max(1)),
            Some(_) => 1,
        }
    }

    /// The current count after `counts` counts: in periodic mode it reloads
    /// as it reaches 0, so it reads the initial count, never 0.
    pub(super) fn current_count(&self, counts: u128, periodic: bool) -> u32 {
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
    pub(super) fn expiry_time(&self, n: u128, hz: u64) -> Duration {
        let counts = u128::from(self.from).saturating_add((n - 1).saturating_mul(u128::from(self.initial)));
        let nanos = counts.saturating_mul(u128::from(self.divide) * NANOS_PER_SEC).div_ceil(u128::from(hz));
        self.since.saturating_add(duration_from_nanos(nanos))
    }
}

/// The shortest period of a periodic timer, as KVM's `min_timer_period_us`
/// (200 µs): a guest asking for less gets this, so it cannot make the VMM
/// kick it out of the guest (an exit, a signal, an injection) millions of
/// times a second. One-shot counts are not limited: each takes a TMICT
/// write, itself an exit. Linux programs the timer one-shot.
pub(super) const MIN_PERIOD: Duration = Duration::from_micros(200);

impl LocalApic {
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

    pub(super) fn timer_mode(&self) -> TimerMode {
        TimerMode::of(self.lvt[LVT_TIMER])
    }

    /// 2, 4, 8, ..., 128, or 1: the divide configuration's bits 3, 1 and 0
    /// as a 3-bit number n give 2^(n + 1), 111 giving 1 (Figure 11-10).
    pub(super) fn divider(&self) -> u32 {
        let code = (self.divide_config & 0b11) | ((self.divide_config >> 1) & 0b100);
        if code == 0b111 {
            1
        } else {
            2 << code
        }
    }

    /// Latches the expiries due by `now`.
    pub(super) fn update(&mut self, now: Duration) {
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
    pub(super) fn current_count(&self, now: Duration) -> u32 {
        let periodic = self.timer_mode() == TimerMode::Periodic;
        self.timer.map_or(0, |countdown| countdown.current_count(countdown.counts_by(now, self.timer_hz), periodic))
    }

    /// Counts down from `from` as of `now`, reloading TMICT in periodic
    /// mode; 0 stops the timer.
    /// The reload count is at least [`MIN_PERIOD`]'s worth of counts; the
    /// count under way is not shortened or lengthened.
    pub(super) fn start_timer(&mut self, now: Duration, from: u32) {
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

    /// The LVT timer entry. A change between one-shot and periodic lets a
    /// running count go on; one to or from TSC-deadline (or the reserved)
    /// mode disarms the timer (11.5.4.1).
    pub(super) fn write_lvt_timer(&mut self, now: Duration, value: u32) {
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
    pub(super) fn write_initial_count(&mut self, now: Duration, value: u32) {
        if self.timer_mode() == TimerMode::Unsupported {
            log::debug!("APIC: TMICT {value:#x} ignored: the LVT timer mode is TSC-deadline or reserved");
            return;
        }
        self.initial_count = value;
        self.start_timer(now, value);
    }

    /// The divide configuration: a running count goes on from its current
    /// value at the new rate.
    pub(super) fn write_divide_config(&mut self, now: Duration, value: u32) {
        let (before, current) = (self.divider(), self.current_count(now));
        self.divide_config = value & DIVIDE_WRITABLE;
        if self.timer.is_some() && self.divider() != before {
            self.start_timer(now, current);
        }
    }
}
