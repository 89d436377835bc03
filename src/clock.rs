//! Time as an injected dependency, so tests move it by hand.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use parking_lot::Mutex;

/// A source of the current time. The engine asks it once per call.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
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
/// ```
/// use tollgate::ManualClock;
/// use chrono::{Duration, TimeZone, Utc};
///
/// let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 31, 23, 59, 0).unwrap());
/// clock.advance(Duration::minutes(1));
/// assert_eq!(clock.now_utc(), Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Move the clock forward (or backward, with a negative duration).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock();
        *now = now.checked_add_signed(by).unwrap_or(*now);
    }

    /// Set the clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock() = to;
    }

    /// The time the clock stands at.
    pub fn now_utc(&self) -> DateTime<Utc> {
        *self.now.lock()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.now_utc()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::{from_unix, Clock, SystemClock};
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    #[test]
    fn system_clock_reads_the_instant_utc_now_reads() {
        let before = Utc::now();
        let now = SystemClock.now();
        let after = Utc::now();
        assert!(before <= now && now <= after, "{before} {now} {after}");
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
