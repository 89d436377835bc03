//! Windows: when usage stops counting.
//!
//! All arithmetic here is on integer milliseconds since the Unix epoch, so a
//! store in another engine (a Lua script, SQL) can reproduce it exactly.

use std::fmt;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::Error;

const SECOND_MS: i64 = 1_000;
const DAY_MS: i64 = 86_400 * SECOND_MS;

/// A calendar period: the unit a [`Window::Calendar`] resets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Resets at midnight.
    Day,
    /// Resets at midnight at the start of Monday (ISO 8601 weeks).
    Week,
    /// Resets at midnight on the 1st of the month.
    Month,
}

/// When usage stops counting against a limit.
///
/// Windows are small `Copy` values; together with the scope and meter they
/// identify a counter, so changing a limit's maximum keeps its usage while
/// changing its window starts a new counter.
///
/// Serializes in its configuration form, [`WindowConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "WindowConfig", try_from = "WindowConfig")]
pub enum Window {
    /// Usage resets at the start of each calendar period, in UTC shifted by a
    /// fixed offset (seconds east of UTC; `0` is UTC).
    Calendar {
        /// The period.
        period: Period,
        /// Fixed offset from UTC in seconds, east positive (UTC+9 is `32_400`).
        utc_offset_secs: i32,
    },
    /// Usage counts for `span_secs` after it happened, kept in `buckets` equal
    /// buckets aligned to the Unix epoch. Usage recorded in the bucket
    /// `[b, b + width)` leaves at `b + width + span`: never early, at most
    /// one bucket late.
    Rolling {
        /// Length of the window in seconds.
        span_secs: u64,
        /// Number of buckets the span is divided into (at least 1, and the
        /// span is divisible by it).
        buckets: u32,
    },
    /// Usage never leaves: a prepaid balance, a grant, a lifetime cap.
    Lifetime,
    /// In-flight work: the counter holds one slot per live reservation and
    /// never accumulates usage (max concurrent jobs). Only
    /// [`Engine::reserve`](crate::Engine::reserve) takes a slot; a slot returns
    /// when its reservation is committed, released or expires.
    Concurrent,
}

impl Window {
    /// A calendar window in UTC.
    ///
    /// ```
    /// use tollgate::{Period, Window};
    ///
    /// let w = Window::calendar(Period::Month);
    /// assert_eq!(w, Window::Calendar { period: Period::Month, utc_offset_secs: 0 });
    /// ```
    pub const fn calendar(period: Period) -> Self {
        Window::Calendar {
            period,
            utc_offset_secs: 0,
        }
    }

    /// A calendar window whose periods start at midnight in a fixed offset
    /// from UTC: `offset_secs` east of UTC (UTC+9 is `9 * 3600`, UTC−5:30 is
    /// `-(5 * 3600 + 30 * 60)`). The same checks as a configured window.
    ///
    /// ```
    /// use tollgate::{Error, Period, Window};
    ///
    /// let tokyo = Window::calendar_at_offset(Period::Day, 9 * 3600)?;
    /// assert_eq!(tokyo.to_string(), "day+09:00");
    ///
    /// // A day or more, or part of a minute, is refused.
    /// assert!(matches!(
    ///     Window::calendar_at_offset(Period::Day, 24 * 3600),
    ///     Err(Error::InvalidConfig { .. })
    /// ));
    /// assert!(Window::calendar_at_offset(Period::Week, 90).is_err());
    /// # Ok::<(), Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `window`) when the offset is 24 hours
    /// or more either way, or not a whole number of minutes.
    pub fn calendar_at_offset(period: Period, offset_secs: i32) -> Result<Self, Error> {
        Window::Calendar {
            period,
            utc_offset_secs: offset_secs,
        }
        .checked()
    }

    /// A rolling window: usage counts for `span` after it happened, kept in
    /// `buckets` equal buckets (memory does not grow with traffic; usage
    /// leaves at most one bucket late, never early). The same checks as a
    /// configured window.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{Error, Window};
    ///
    /// // 7 days in hourly buckets.
    /// let week = Window::rolling(Duration::from_secs(7 * 86_400), 168)?;
    /// assert_eq!(week, Window::Rolling { span_secs: 604_800, buckets: 168 });
    /// assert_eq!(week.to_string(), "rolling 1w/168");
    ///
    /// // Each refused with a reason: a zero span, no buckets, a span not
    /// // divisible into whole-second buckets, a fraction of a second, too
    /// // many buckets.
    /// assert!(Window::rolling(Duration::ZERO, 1).is_err());
    /// assert!(Window::rolling(Duration::from_secs(3_600), 0).is_err());
    /// assert!(Window::rolling(Duration::from_secs(100), 7).is_err());
    /// assert!(Window::rolling(Duration::from_millis(1_500), 1).is_err());
    /// assert!(matches!(
    ///     Window::rolling(Duration::from_secs(86_400), 86_400),
    ///     Err(Error::InvalidConfig { .. })
    /// ));
    /// # Ok::<(), Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `window`) when the span is zero, not
    /// a whole number of seconds, or longer than ten years; when `buckets`
    /// is zero or above 10,000; or when the span does not divide into
    /// `buckets` whole seconds.
    pub fn rolling(span: std::time::Duration, buckets: u32) -> Result<Self, Error> {
        if span.subsec_nanos() != 0 {
            return Err(Error::config(
                "window",
                format!("a rolling span must be whole seconds, not {span:?}"),
            ));
        }
        Window::Rolling {
            span_secs: span.as_secs(),
            buckets,
        }
        .checked()
    }

    /// The window if it passes [`Window::validate`], the checks a
    /// configured window passes.
    fn checked(self) -> Result<Self, Error> {
        self.validate().map_err(|r| Error::config("window", r))?;
        Ok(self)
    }

    /// Start of the calendar period containing `now_ms`, and the start of the
    /// next one, both in Unix milliseconds.
    pub(crate) fn calendar_bounds(period: Period, offset_secs: i32, now_ms: i64) -> (i64, i64) {
        let offset_ms = i64::from(offset_secs) * SECOND_MS;
        let local = now_ms.saturating_add(offset_ms);
        let day = local.div_euclid(DAY_MS);
        let (start_day, next_day) = match period {
            Period::Day => (day, day + 1),
            Period::Week => {
                // 1970-01-01 was a Thursday: Monday-based weekday index is (day + 3) mod 7.
                let monday = day - (day + 3).rem_euclid(7);
                (monday, monday + 7)
            }
            Period::Month => {
                let (first, next) = month_bounds_days(day);
                (first, next)
            }
        };
        (
            start_day * DAY_MS - offset_ms,
            next_day * DAY_MS - offset_ms,
        )
    }

    /// Bucket width in milliseconds of a rolling window.
    pub(crate) fn bucket_ms(span_secs: u64, buckets: u32) -> i64 {
        // Validated at load: span divisible by buckets, both non-zero, span
        // small enough to fit (see `Window::validate`).
        (span_secs as i64 / i64::from(buckets.max(1))) * SECOND_MS
    }

    /// Check the invariants a store relies on. Returns a reason on failure.
    ///
    /// Run on every op of every batch: the common valid case is a few
    /// compares inline, and only a bad window builds its reason.
    #[inline]
    pub(crate) fn validate(&self) -> Result<(), String> {
        let valid = match *self {
            Window::Calendar {
                utc_offset_secs, ..
            } => utc_offset_secs.unsigned_abs() < 86_400 && utc_offset_secs % 60 == 0,
            Window::Rolling { span_secs, buckets } => {
                buckets != 0
                    && span_secs != 0
                    && span_secs <= MAX_SPAN_SECS
                    && buckets <= MAX_BUCKETS
                    && span_secs % u64::from(buckets) == 0
            }
            Window::Lifetime | Window::Concurrent => true,
        };
        if valid {
            Ok(())
        } else {
            self.invalid_reason()
        }
    }

    /// The reason [`Window::validate`] gives for an invalid window.
    #[cold]
    #[inline(never)]
    fn invalid_reason(&self) -> Result<(), String> {
        match *self {
            Window::Calendar {
                utc_offset_secs, ..
            } => {
                if utc_offset_secs.unsigned_abs() >= 86_400 {
                    return Err("utc offset must be less than 24 hours".into());
                }
                if utc_offset_secs % 60 != 0 {
                    return Err("utc offset must be a whole number of minutes".into());
                }
                Ok(())
            }
            Window::Rolling { span_secs, buckets } => {
                if buckets == 0 {
                    return Err("a rolling window needs at least one bucket".into());
                }
                if span_secs == 0 {
                    return Err("a rolling window needs a span above zero".into());
                }
                if span_secs > MAX_SPAN_SECS {
                    return Err(format!("span is longer than {MAX_SPAN_SECS} seconds"));
                }
                if buckets > MAX_BUCKETS {
                    return Err(format!("at most {MAX_BUCKETS} buckets"));
                }
                if span_secs % u64::from(buckets) != 0 {
                    return Err(format!(
                        "span of {span_secs} s is not divisible into {buckets} buckets"
                    ));
                }
                Ok(())
            }
            Window::Lifetime | Window::Concurrent => Ok(()),
        }
    }
}

/// Longest rolling span accepted: 10 years.
const MAX_SPAN_SECS: u64 = 10 * 366 * 86_400;
/// Most buckets a rolling window may have.
const MAX_BUCKETS: u32 = 10_000;

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                let p = match period {
                    Period::Day => "day",
                    Period::Week => "week",
                    Period::Month => "month",
                };
                if utc_offset_secs == 0 {
                    write!(f, "{p}")
                } else {
                    write!(f, "{p}{}", format_offset(utc_offset_secs))
                }
            }
            Window::Rolling { span_secs, buckets } => {
                write!(f, "rolling {}/{buckets}", format_span(span_secs))
            }
            Window::Lifetime => write!(f, "lifetime"),
            Window::Concurrent => write!(f, "concurrent"),
        }
    }
}

/// Days since the epoch of the 1st of the month containing `day`, and of the
/// 1st of the following month.
fn month_bounds_days(day: i64) -> (i64, i64) {
    // Unix day 0 is 1970-01-01, which is day 719_163 counted from 0001-01-01 (CE day 1).
    const CE_OFFSET: i64 = 719_163;
    let ce = day + CE_OFFSET;
    let Some(date) = i32::try_from(ce)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
    else {
        // Outside chrono's range (hundreds of thousands of years): treat as 30-day periods.
        let first = day - day.rem_euclid(30);
        return (first, first + 30);
    };
    let first = date.with_day(1).unwrap_or(date);
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    };
    let first_day = i64::from(first.num_days_from_ce()) - CE_OFFSET;
    // Past chrono's last year the next month has no date: a 31-day period
    // keeps the window from collapsing to nothing.
    let next_day = next.map_or(first_day + 31, |n| {
        i64::from(n.num_days_from_ce()) - CE_OFFSET
    });
    (first_day, next_day)
}

/// Parse a span such as `"90s"`, `"30m"`, `"24h"`, `"7d"`, `"2w"` or `"3600"`
/// (seconds) into seconds.
pub(crate) fn parse_span(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a span like 90s, 30m, 24h, 7d or 2w"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("`{text}` has an unknown unit; use s, m, h, d or w")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too long"))
}

fn format_span(secs: u64) -> String {
    for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs % size == 0 {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Parse `"+09:00"`, `"-05:30"`, `"Z"` or `"UTC"` into seconds east of UTC.
pub(crate) fn parse_offset(text: &str) -> Result<i32, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") || t.is_empty() {
        return Ok(0);
    }
    let bad = || format!("`{text}` is not a UTC offset like +09:00 or -05:30");
    let (sign, rest) = match t.as_bytes()[0] {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    // HH, HH:MM or HH:MM:SS (seconds only so a programmatic offset round-trips
    // exactly; validation then refuses offsets that are not whole minutes).
    let mut parts = rest.split(':');
    let mut next = |max: i32| -> Result<i32, String> {
        match parts.next() {
            None => Ok(0),
            Some(p) => p
                .parse::<i32>()
                .ok()
                .filter(|v| (0..max).contains(v))
                .ok_or_else(bad),
        }
    };
    let (h, m, s) = (next(24)?, next(60)?, next(60)?);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(sign * (h * 3_600 + m * 60 + s))
}

fn format_offset(secs: i32) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.unsigned_abs();
    let hm = format!("{sign}{:02}:{:02}", a / 3_600, (a % 3_600) / 60);
    if a % 60 == 0 {
        hm
    } else {
        format!("{hm}:{:02}", a % 60)
    }
}

/// The serde form of a window, as written in configuration.
///
/// ```json
/// {"calendar": {"period": "month"}}
/// {"calendar": {"period": "day", "utc_offset": "+09:00"}}
/// {"rolling": {"span": "7d", "buckets": 168}}
/// "lifetime"
/// "concurrent"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowConfig {
    /// A calendar window.
    Calendar {
        /// Day, week or month.
        period: Period,
        /// A fixed offset such as `"+09:00"`; UTC when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utc_offset: Option<String>,
    },
    /// A rolling window.
    Rolling {
        /// The span: `"24h"`, `"7d"`, or a number of seconds.
        span: String,
        /// Number of buckets the span is kept in.
        buckets: u32,
    },
    /// Never resets.
    Lifetime,
    /// In-flight reservations (max concurrent jobs).
    Concurrent,
}

impl WindowConfig {
    /// Turn the configuration form into a validated [`Window`].
    pub(crate) fn resolve(&self) -> Result<Window, String> {
        let w = match self {
            WindowConfig::Calendar { period, utc_offset } => Window::Calendar {
                period: *period,
                utc_offset_secs: match utc_offset {
                    Some(o) => parse_offset(o)?,
                    None => 0,
                },
            },
            WindowConfig::Rolling { span, buckets } => Window::Rolling {
                span_secs: parse_span(span)?,
                buckets: *buckets,
            },
            WindowConfig::Lifetime => Window::Lifetime,
            WindowConfig::Concurrent => Window::Concurrent,
        };
        w.validate()?;
        Ok(w)
    }
}

impl TryFrom<WindowConfig> for Window {
    type Error = String;
    fn try_from(c: WindowConfig) -> Result<Self, String> {
        c.resolve()
    }
}

impl From<Window> for WindowConfig {
    fn from(w: Window) -> Self {
        match w {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => WindowConfig::Calendar {
                period,
                utc_offset: (utc_offset_secs != 0).then(|| format_offset(utc_offset_secs)),
            },
            Window::Rolling { span_secs, buckets } => WindowConfig::Rolling {
                span: format_span(span_secs),
                buckets,
            },
            Window::Lifetime => WindowConfig::Lifetime,
            Window::Concurrent => WindowConfig::Concurrent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn ms(y: i32, mo: u32, d: u32, h: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, 0, 0)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn month_bounds_cover_month_ends_and_leap_years() {
        let (s, e) = Window::calendar_bounds(Period::Month, 0, ms(2028, 2, 29, 23));
        assert_eq!((s, e), (ms(2028, 2, 1, 0), ms(2028, 3, 1, 0)));
        let (s, e) = Window::calendar_bounds(Period::Month, 0, ms(2026, 12, 31, 23));
        assert_eq!((s, e), (ms(2026, 12, 1, 0), ms(2027, 1, 1, 0)));
        let (s, e) = Window::calendar_bounds(Period::Month, 0, ms(2027, 1, 31, 12));
        assert_eq!((s, e), (ms(2027, 1, 1, 0), ms(2027, 2, 1, 0)));
    }

    #[test]
    fn periods_never_collapse_at_the_end_of_time() {
        for period in [Period::Day, Period::Week, Period::Month] {
            for now in [
                chrono::DateTime::<Utc>::MAX_UTC.timestamp_millis(),
                chrono::DateTime::<Utc>::MIN_UTC.timestamp_millis(),
                i64::MAX / 2,
                i64::MIN / 2,
            ] {
                let (s, e) = Window::calendar_bounds(period, 0, now);
                assert!(s <= now && now < e, "{period:?} at {now}: [{s}, {e})");
            }
        }
    }

    #[test]
    fn offset_shifts_the_period_start() {
        // 2026-03-31 16:00 UTC is 2026-04-01 01:00 in UTC+9: April has begun there.
        let (s, _) = Window::calendar_bounds(Period::Month, 9 * 3600, ms(2026, 3, 31, 16));
        assert_eq!(s, ms(2026, 3, 31, 15));
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-11-23 is a Monday.
        let (s, e) = Window::calendar_bounds(Period::Week, 0, ms(2026, 11, 29, 23));
        assert_eq!((s, e), (ms(2026, 11, 23, 0), ms(2026, 11, 30, 0)));
    }

    #[test]
    fn spans_and_offsets_parse_and_reject() {
        assert_eq!(parse_span("7d"), Ok(604_800));
        assert_eq!(parse_span("24h"), Ok(86_400));
        assert_eq!(parse_span("90"), Ok(90));
        assert!(parse_span("7x").is_err());
        assert!(parse_span("-1d").is_err());
        assert_eq!(parse_offset("+09:00"), Ok(32_400));
        assert_eq!(parse_offset("-05:30"), Ok(-19_800));
        assert!(parse_offset("+24:00").is_err());
        assert!(parse_offset("9").is_err());
    }

    #[test]
    fn rolling_validation_names_the_problem() {
        let w = Window::Rolling {
            span_secs: 100,
            buckets: 7,
        };
        assert!(w.validate().unwrap_err().contains("not divisible"));
        let w = Window::Rolling {
            span_secs: 100,
            buckets: 0,
        };
        assert!(w.validate().unwrap_err().contains("at least one bucket"));
    }

    fn reason(r: Result<Window, Error>) -> String {
        match r {
            Err(Error::InvalidConfig { field, reason }) => {
                assert_eq!(field, "window");
                reason
            }
            other => panic!("not a config error: {other:?}"),
        }
    }

    #[test]
    fn rolling_constructor_refuses_what_configuration_refuses() {
        use std::time::Duration;
        let secs = Duration::from_secs;
        assert_eq!(
            Window::rolling(secs(86_400), 24),
            Ok(Window::Rolling {
                span_secs: 86_400,
                buckets: 24
            })
        );
        // One bucket as long as the span, and the longest span.
        assert!(Window::rolling(secs(1), 1).is_ok());
        assert!(Window::rolling(secs(MAX_SPAN_SECS), 1).is_ok());
        assert!(Window::rolling(secs(MAX_BUCKETS.into()), MAX_BUCKETS).is_ok());
        let zero_span = reason(Window::rolling(Duration::ZERO, 4));
        assert!(zero_span.contains("span above zero"), "{zero_span}");
        let no_buckets = reason(Window::rolling(secs(3_600), 0));
        assert!(no_buckets.contains("at least one bucket"), "{no_buckets}");
        let uneven = reason(Window::rolling(secs(100), 7));
        assert!(uneven.contains("not divisible"), "{uneven}");
        let fraction = reason(Window::rolling(Duration::from_millis(60_500), 1));
        assert!(fraction.contains("whole seconds"), "{fraction}");
        let sub_second = reason(Window::rolling(Duration::from_nanos(1), 1));
        assert!(sub_second.contains("whole seconds"), "{sub_second}");
        let many = reason(Window::rolling(secs(86_400), MAX_BUCKETS + 1));
        assert!(many.contains("at most"), "{many}");
        let long = reason(Window::rolling(secs(MAX_SPAN_SECS + 1), 1));
        assert!(long.contains("longer than"), "{long}");
        let huge = reason(Window::rolling(Duration::MAX, 1));
        assert!(huge.contains("whole seconds"), "{huge}");
        // The same answer as the configuration form.
        for (span, buckets) in [(86_400, 24), (100, 7), (0, 1), (60, 0)] {
            let cfg = WindowConfig::Rolling {
                span: span.to_string(),
                buckets,
            }
            .resolve();
            let built = Window::rolling(secs(span), buckets);
            assert_eq!(built.is_ok(), cfg.is_ok(), "{span}/{buckets}");
            if let (Ok(a), Ok(b)) = (built, cfg) {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn offset_calendar_constructor_refuses_what_configuration_refuses() {
        for period in [Period::Day, Period::Week, Period::Month] {
            assert_eq!(
                Window::calendar_at_offset(period, -19_800),
                Ok(Window::Calendar {
                    period,
                    utc_offset_secs: -19_800
                })
            );
            assert_eq!(
                Window::calendar_at_offset(period, 0),
                Ok(Window::calendar(period))
            );
            assert!(Window::calendar_at_offset(period, 86_340).is_ok());
            assert!(Window::calendar_at_offset(period, -86_340).is_ok());
            for bad in [86_400, -86_400, i32::MAX, i32::MIN] {
                let r = reason(Window::calendar_at_offset(period, bad));
                assert!(r.contains("less than 24 hours"), "{bad}: {r}");
            }
            for bad in [1, 59, -30, 32_401] {
                let r = reason(Window::calendar_at_offset(period, bad));
                assert!(r.contains("whole number of minutes"), "{bad}: {r}");
            }
        }
    }

    #[test]
    fn quick_validation_agrees_with_the_reasons() {
        let mut windows = vec![Window::Lifetime, Window::Concurrent];
        for period in [Period::Day, Period::Week, Period::Month] {
            for utc_offset_secs in [
                0,
                60,
                -60,
                59,
                32_400,
                -86_340,
                86_399,
                86_400,
                -86_400,
                i32::MIN,
                i32::MAX,
            ] {
                windows.push(Window::Calendar {
                    period,
                    utc_offset_secs,
                });
            }
        }
        for span_secs in [
            0,
            1,
            60,
            100,
            604_800,
            MAX_SPAN_SECS,
            MAX_SPAN_SECS + 1,
            u64::MAX,
        ] {
            for buckets in [0, 1, 7, 60, 168, MAX_BUCKETS, MAX_BUCKETS + 1, u32::MAX] {
                windows.push(Window::Rolling { span_secs, buckets });
            }
        }
        for w in windows {
            assert_eq!(w.validate().is_ok(), w.invalid_reason().is_ok(), "{w:?}");
        }
    }
}
