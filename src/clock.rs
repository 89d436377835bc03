//! Time as an injected dependency, so tests move it by hand.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use parking_lot::Mutex;

/// A source of the current time. The engine asks it once per call.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// The current instant in Unix milliseconds (rounded down), as
    /// `now().timestamp_millis()` gives it, which is the default. The
    /// engine's decisions read this (the store seam speaks milliseconds); a
    /// clock that can tell it without building a `DateTime` overrides it.
    fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    /// The same instant [`Utc::now`] gives, with the calendar date of the
    /// current day computed once per thread and day rather than per call.
    #[inline]
    fn now(&self) -> DateTime<Utc> {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => from_unix(since).unwrap_or_else(Utc::now),
            Err(_) => Utc::now(),
        }
    }

    /// The instant [`SystemClock::now`] reads, in Unix milliseconds, with
    /// no calendar date computed.
    #[inline]
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
            Err(_) => Utc::now().timestamp_millis(),
        }
    }
}

thread_local! {
    /// The last Unix day this thread's [`SystemClock`] read, and its date.
    static TODAY: Cell<Option<(u64, NaiveDate)>> = const { Cell::new(None) };
}

/// The instant `since` after the Unix epoch, as [`DateTime::from_timestamp`]
/// makes it, with the day's date taken from the thread's cache when it is
/// the same day. `None` when out of chrono's range.
fn from_unix(since: std::time::Duration) -> Option<DateTime<Utc>> {
    const DAY_SECS: u64 = 86_400;
    let secs = since.as_secs();
    let day = secs / DAY_SECS;
    let date = match TODAY.with(Cell::get) {
        Some((d, date)) if d == day => date,
        _ => {
            let midnight = i64::try_from(day * DAY_SECS).ok()?;
            let date = DateTime::from_timestamp(midnight, 0)?.date_naive();
            TODAY.with(|t| t.set(Some((day, date))));
            date
        }
    };
    // secs % DAY_SECS < 86_400 fits a u32.
    let time = NaiveTime::from_num_seconds_from_midnight_opt(
        (secs % DAY_SECS) as u32,
        since.subsec_nanos(),
    )?;
    Some(date.and_time(time).and_utc())
}

/// A clock that only moves when told to. Clones share the same time, so a
/// test keeps one handle and gives another to the engine.
///
/// Steps are [`std::time::Duration`]s, the one duration type of the public
/// API (lease terms take it too): [`advance`](ManualClock::advance) moves
/// forward, [`rewind`](ManualClock::rewind) moves back, and
/// [`set`](ManualClock::set) jumps to an instant.
///
/// ```
/// use std::time::Duration;
/// use tollgate::ManualClock;
/// use chrono::{TimeZone, Utc};
///
/// let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 31, 23, 59, 0).unwrap());
/// clock.advance(Duration::from_secs(60));
/// assert_eq!(clock.now_utc(), Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap());
/// clock.rewind(Duration::from_secs(3_600));
/// assert_eq!(clock.now_utc(), Utc.with_ymd_and_hms(2026, 3, 31, 23, 0, 0).unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    /// The time, and the same in Unix milliseconds (for
    /// [`Clock::now_ms`]), set together.
    now: Arc<Mutex<(DateTime<Utc>, i64)>>,
}

/// A span a [`ManualClock`] can [`advance`](ManualClock::advance) by.
///
/// Implemented for [`std::time::Duration`], the crate's public duration
/// type (always forward), and for chrono's [`TimeDelta`](chrono::TimeDelta)
/// (`chrono::Duration`), which `advance` took before and which may be
/// negative (a step back). chrono's stays accepted so tests written against
/// it keep compiling; new code passes std's and steps back with
/// [`ManualClock::rewind`]. Sealed: no other type implements it.
pub trait ClockStep: sealed::Sealed {}

impl ClockStep for std::time::Duration {}
impl ClockStep for TimeDelta {}

mod sealed {
    use chrono::TimeDelta;

    /// The step as a signed span; `None` when it does not fit one.
    pub trait Sealed {
        fn signed(self) -> Option<TimeDelta>;
    }

    impl Sealed for std::time::Duration {
        fn signed(self) -> Option<TimeDelta> {
            TimeDelta::from_std(self).ok()
        }
    }

    impl Sealed for TimeDelta {
        fn signed(self) -> Option<TimeDelta> {
            Some(self)
        }
    }
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new((start, start.timestamp_millis()))),
        }
    }

    /// Move the clock forward by `by`: a [`std::time::Duration`] (or, for
    /// tests written against chrono, a [`TimeDelta`](chrono::TimeDelta),
    /// which moves back when negative). A step past the range of
    /// [`DateTime`] leaves the clock where it stands.
    pub fn advance(&self, by: impl ClockStep) {
        if let Some(by) = sealed::Sealed::signed(by) {
            self.step(|now| now.checked_add_signed(by));
        }
    }

    /// Move the clock back by `by`. A step past the range of [`DateTime`]
    /// leaves the clock where it stands.
    pub fn rewind(&self, by: std::time::Duration) {
        if let Ok(by) = TimeDelta::from_std(by) {
            self.step(|now| now.checked_sub_signed(by));
        }
    }

    /// Set the clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock() = (to, to.timestamp_millis());
    }

    /// The time the clock stands at.
    pub fn now_utc(&self) -> DateTime<Utc> {
        self.now.lock().0
    }

    fn step(&self, to: impl FnOnce(DateTime<Utc>) -> Option<DateTime<Utc>>) {
        let mut now = self.now.lock();
        if let Some(t) = to(now.0) {
            *now = (t, t.timestamp_millis());
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.now_utc()
    }

    /// The time the clock stands at, in Unix milliseconds, kept beside it.
    fn now_ms(&self) -> i64 {
        self.now.lock().1
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }

    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::{from_unix, Clock, ManualClock, SystemClock};
    use chrono::{DateTime, TimeDelta, TimeZone, Utc};
    use std::time::Duration;

    #[test]
    fn manual_clock_steps_forward_and_back_in_either_duration_type() {
        let start = Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap();
        let clock = ManualClock::new(start);
        let handle = clock.clone();
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(handle.now(), start + TimeDelta::milliseconds(1_500));
        clock.rewind(Duration::from_millis(500));
        assert_eq!(handle.now(), start + TimeDelta::seconds(1));
        // chrono's, as tests written before took it: signed.
        clock.advance(TimeDelta::days(2));
        assert_eq!(
            handle.now(),
            start + TimeDelta::days(2) + TimeDelta::seconds(1)
        );
        clock.advance(TimeDelta::days(-2));
        assert_eq!(handle.now(), start + TimeDelta::seconds(1));
        clock.rewind(Duration::from_secs(1));
        assert_eq!(handle.now(), start);
        // Out of range: the clock stays where it stands.
        clock.advance(Duration::MAX);
        clock.rewind(Duration::MAX);
        clock.advance(TimeDelta::MAX);
        clock.advance(Duration::from_secs(400_000 * 366 * 86_400));
        clock.rewind(Duration::from_secs(400_000 * 366 * 86_400));
        assert_eq!(handle.now(), start);
        let end = DateTime::<Utc>::MAX_UTC;
        clock.set(end);
        clock.advance(Duration::from_nanos(1));
        assert_eq!(handle.now(), end);
    }

    #[test]
    fn system_clock_reads_the_instant_utc_now_reads() {
        let before = Utc::now();
        let now = SystemClock.now();
        let now_ms = SystemClock.now_ms();
        let after = Utc::now();
        assert!(before <= now && now <= after, "{before} {now} {after}");
        let (lo, hi) = (before.timestamp_millis(), after.timestamp_millis());
        assert!(lo <= now_ms && now_ms <= hi, "{lo} {now_ms} {hi}");
    }

    /// `now_ms` is `now()` in Unix milliseconds, rounded down, through every
    /// way a manual clock moves (and through an `Arc`, and the default a
    /// clock of its own gets).
    #[test]
    fn now_ms_is_now_in_milliseconds() {
        struct Fixed(DateTime<Utc>);
        impl Clock for Fixed {
            fn now(&self) -> DateTime<Utc> {
                self.0
            }
        }
        let start = Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap();
        let clock = ManualClock::new(start + TimeDelta::nanoseconds(1_999_999));
        let shared = std::sync::Arc::new(clock.clone());
        let same = |c: &ManualClock| {
            assert_eq!(c.now_ms(), c.now().timestamp_millis(), "{}", c.now());
            assert_eq!(shared.now_ms(), c.now_ms());
        };
        same(&clock);
        assert_eq!(clock.now_ms(), start.timestamp_millis() + 1);
        clock.advance(Duration::from_millis(1_500));
        same(&clock);
        clock.rewind(Duration::from_secs(86_400));
        same(&clock);
        clock.advance(TimeDelta::days(-3));
        same(&clock);
        clock.advance(Duration::MAX);
        same(&clock);
        let before_epoch =
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap() + TimeDelta::microseconds(500);
        clock.set(before_epoch);
        same(&clock);
        assert_eq!(clock.now_ms(), -1_000);
        let fixed = Fixed(before_epoch);
        assert_eq!(fixed.now_ms(), before_epoch.timestamp_millis());
    }

    #[test]
    fn cached_days_give_the_timestamp_conversion_across_day_changes() {
        // Forward, backward and repeated days, so the cache is hit, missed
        // and refilled.
        let secs = [
            0,
            1,
            86_399,
            86_400,
            86_401,
            1_764_460_800 - 1,
            1_764_460_800,
            1_764_460_800 + 43_210,
            951_782_400,
            86_399,
            253_402_300_799,
            253_402_300_800,
        ];
        for &s in &secs {
            for nanos in [0, 1, 999_999_999] {
                let got = from_unix(Duration::new(s, nanos));
                let want = DateTime::<Utc>::from_timestamp(s as i64, nanos);
                assert_eq!(got, want, "{s}.{nanos}");
            }
        }
        // Past chrono's range: none, as the timestamp conversion.
        let far = u64::MAX / 2;
        assert_eq!(from_unix(Duration::new(far, 0)), None);
        assert_eq!(from_unix(Duration::new(u64::MAX, 0)), None);
    }
}
