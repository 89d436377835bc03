//! Closed calendar periods (contract rule 11): what a report of a past
//! period asks a store, and the checks every backend makes of it.

use crate::name::Name;
use crate::window::Window;
use crate::Error;

use super::ScopeKey;

/// How many closed periods of each calendar counter a store keeps unless
/// told otherwise: the one before the current, so the month (or day, or
/// week) that just ended can still be billed.
pub const DEFAULT_HISTORY_PERIODS: u32 = 1;

/// The most closed periods a store may be asked to keep per counter (a
/// configuration past it is [`Error::InvalidConfig`]): ten years of
/// months, or a year of days.
pub const MAX_HISTORY_PERIODS: u32 = 366;

/// The earliest and latest period starts a query may name: ±2^47 ms
/// (about ±4,460 years around 1970), well inside what a `DateTime` and the
/// calendar arithmetic hold.
const MIN_PERIOD_MS: i64 = -(1 << 47);
const MAX_PERIOD_MS: i64 = 1 << 47;

/// One calendar period of one counter a report of a past period reads
/// ([`AllowanceStore::period_usage`](super::AllowanceStore::period_usage),
/// contract rule 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeriodOp<'a> {
    /// Whose counter.
    pub scope: &'a ScopeKey,
    /// Which meter (interned, as an op's).
    pub meter: Name,
    /// The counter's window: a [`Window::Calendar`].
    pub window: Window,
    /// The start of the period asked for (Unix milliseconds): a period
    /// start of `window`.
    pub start_ms: i64,
}

impl<'a> PeriodOp<'a> {
    /// The period of `scope`'s counter `(meter, window)` starting at
    /// `start_ms`.
    pub fn new(scope: &'a ScopeKey, meter: Name, window: Window, start_ms: i64) -> Self {
        Self {
            scope,
            meter,
            window,
            start_ms,
        }
    }

    /// The end of the period (the start of the next), if the op is valid:
    /// a calendar window, and a start that is one of its periods' within
    /// the instants a `DateTime` holds.
    pub(crate) fn end_ms(&self) -> Option<i64> {
        if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&self.start_ms) {
            return None;
        }
        match self.window {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                let (s, e) = Window::calendar_bounds(period, utc_offset_secs, self.start_ms);
                (s == self.start_ms).then_some(e)
            }
            _ => None,
        }
    }
}

/// Contract rule 11's check of a query: every op names a calendar window
/// and the start of one of its periods.
///
/// # Errors
/// [`Error::InvalidBatch`] naming the first op that does not.
pub(crate) fn validate_period_ops(ops: &[PeriodOp<'_>]) -> Result<(), Error> {
    for op in ops {
        if op.end_ms().is_none() {
            return Err(Error::InvalidBatch {
                reason: format!(
                    "period query on `{}`: not the start of a calendar period ({} ms, {:?})",
                    op.meter, op.start_ms, op.window
                ),
            });
        }
    }
    Ok(())
}

/// The start of the period `back` periods before the one of calendar
/// `window` containing `now_ms` (`back` 0: that period), with its end;
/// `None` for a window that is not calendar.
pub(crate) fn period_back(window: Window, now_ms: i64, back: u32) -> Option<(i64, i64)> {
    let Window::Calendar {
        period,
        utc_offset_secs,
    } = window
    else {
        return None;
    };
    let mut bounds = Window::calendar_bounds(period, utc_offset_secs, now_ms);
    for _ in 0..back {
        bounds = Window::calendar_bounds(period, utc_offset_secs, bounds.0.saturating_sub(1));
    }
    Some(bounds)
}

/// The error of a store that keeps no closed periods, asked for one.
pub(crate) fn no_history() -> Error {
    Error::HistoryNotKept { asked: 1, kept: 0 }
}

/// A history depth as configured (`field`): at most
/// [`MAX_HISTORY_PERIODS`].
///
/// # Errors
/// [`Error::InvalidConfig`] naming `field` past it.
pub(crate) fn checked_depth(field: &str, periods: u32) -> Result<u32, Error> {
    if periods > MAX_HISTORY_PERIODS {
        return Err(Error::config(
            field,
            format!("{periods} is more than the {MAX_HISTORY_PERIODS} a store keeps"),
        ));
    }
    Ok(periods)
}
