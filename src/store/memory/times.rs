//! Unix milliseconds to `DateTime<Utc>`, cached per shard.

use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, NaiveTime, Utc};

pub(super) fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

pub(super) const DAY_MS: i64 = 86_400_000;

/// The instants a shard reported lately, each in one of the two slots of
/// the pair a hash of its Unix milliseconds picks: a calendar period's bounds
/// are reported by every call for the whole period, and are converted once.
/// Two slots a pair, so two instants that hash alike (a day's start and a
/// rolling window's bucket edge, say) do not evict each other call after
/// call.
#[derive(Debug)]
pub(super) struct Shown(pub(super) [[(i64, DateTime<Utc>); 2]; 8]);

impl Default for Shown {
    fn default() -> Self {
        // A true entry, so no sentinel is needed.
        Self([[(i64::MIN, ms_to_time(i64::MIN)); 2]; 8])
    }
}

/// Unix milliseconds to `DateTime<Utc>`, as [`ms_to_time`], for the several
/// instants of one report: one the shard showed lately is copied; otherwise
/// the first date is found from scratch (a 400-year cycle division), the
/// next ones by a day offset from it, which within a year is a few
/// instructions. Any base gives the same answers, so a shard keeps one
/// across batches.
#[derive(Debug, Default)]
pub(super) struct Times {
    pub(super) base: Option<(i64, NaiveDate)>,
}

impl Times {
    #[inline]
    pub(super) fn at(&mut self, ms: i64, shown: &mut Shown) -> DateTime<Utc> {
        let pair = &mut shown.0[((ms as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize];
        if pair[0].0 == ms {
            return pair[0].1;
        }
        if pair[1].0 == ms {
            return pair[1].1;
        }
        // The newer entry first; the older one goes.
        pair[1] = pair[0];
        pair[0] = (ms, self.convert(ms));
        pair[0].1
    }

    // Out of line, so the cache probe in `at` inlines into its callers.
    #[inline(never)]
    pub(super) fn convert(&mut self, ms: i64) -> DateTime<Utc> {
        let day = ms.div_euclid(DAY_MS);
        let date = self.base.and_then(|(d0, date0)| {
            let diff = day.checked_sub(d0)?;
            if diff == 0 {
                Some(date0)
            } else if diff > 0 {
                date0.checked_add_days(Days::new(diff.unsigned_abs()))
            } else {
                date0.checked_sub_days(Days::new(diff.unsigned_abs()))
            }
        });
        let Some(date) = date else {
            // Only a time in range is a base: a clamped one's date is not
            // its day's.
            return match DateTime::from_timestamp_millis(ms) {
                Some(t) => {
                    self.base = Some((day, t.date_naive()));
                    t
                }
                None => ms_to_time(ms),
            };
        };
        // The next conversion is often of the same day (a rolling window's
        // start, call after call): it then needs no day arithmetic.
        self.base = Some((day, date));
        let in_day = ms.rem_euclid(DAY_MS);
        // `in_day` is in [0, 86_400_000): both parts are in range.
        let time = NaiveTime::from_num_seconds_from_midnight_opt(
            (in_day / 1_000) as u32,
            (in_day % 1_000) as u32 * 1_000_000,
        );
        time.map_or_else(
            || ms_to_time(ms),
            |time| NaiveDateTime::new(date, time).and_utc(),
        )
    }
}
