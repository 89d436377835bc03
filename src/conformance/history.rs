//! Rule 11: closed calendar periods stay readable.

use super::{apply, op, t, DAY};
use crate::name::Name;
use crate::store::{period_back, AllowanceStore, Batch, Mode, PeriodOp};
use crate::{Error, Period, ScopeKey, Window};

const DAY_SECS: i64 = 86_400;

fn read<S: AllowanceStore>(s: &S, ops: &[PeriodOp<'_>], now: i64) -> Vec<u64> {
    match s.period_usage(ops, now) {
        Ok(v) => v,
        Err(e) => panic!("rule 11: period_usage refused a valid query: {e}"),
    }
}

/// The start of the period of `window` `back` periods before the one
/// containing `now`.
fn start(window: Window, now: i64, back: u32) -> i64 {
    period_back(window, now, back).map_or(0, |(s, _)| s)
}

/// Rule 11: the usage of each of the `history_periods()` periods before the
/// current one is read exactly, whether its counter rolled (a write in a
/// later period) or not (nothing written since); a `Check` rolls nothing;
/// a period with no usage reads 0; a query naming no calendar period is
/// `InvalidBatch`. A store that keeps none says so with `HistoryNotKept`.
pub fn closed_periods_are_kept<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("history");
    let n = s.history_periods();
    let q =
        |w: Window, now: i64, back: u32| PeriodOp::new(&a, Name::new("t"), w, start(w, now, back));
    if n == 0 {
        // Nothing is promised but the answer's shape: one number per op,
        // or `HistoryNotKept`.
        let r = s.period_usage(&[q(DAY, t(0), 1), q(DAY, t(0), 0)], t(0));
        assert!(
            matches!(&r, Err(Error::HistoryNotKept { kept: 0, .. })) || matches!(&r, Ok(v) if v.len() == 2),
            "rule 11: a store keeping no history answers one number per op or HistoryNotKept, got {r:?}"
        );
        return;
    }
    // Day 0: 5 units. Day 1: 7, which rolls day 0.
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 5, None)], Mode::Force, t(3_600)),
    );
    let d1 = t(DAY_SECS + 3_600);
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 7, Some(100))], Mode::WithinLimits, d1),
    );
    assert_eq!(
        read(&s, &[q(DAY, d1, 1), q(DAY, d1, 0)], d1),
        [5, 7],
        "rule 11: a rolled period's total, then the live one"
    );
    // Day 2: nothing written, and a Check (which rolls nothing): day 1 is
    // read from its counter, unrolled.
    let d2 = t(2 * DAY_SECS + 60);
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 1, Some(100))], Mode::Check, d2),
    );
    assert_eq!(
        read(&s, &[q(DAY, d2, 1), q(DAY, d2, 0)], d2),
        [7, 0],
        "rule 11: an ended period not yet rolled, then the empty current one"
    );
    if n >= 2 {
        assert_eq!(
            read(&s, &[q(DAY, d2, 2)], d2),
            [5],
            "rule 11: two periods back"
        );
    }
    // A counter never written, and another meter, read 0.
    let other = PeriodOp::new(&a, Name::new("never"), DAY, start(DAY, d2, 1));
    assert_eq!(
        read(&s, &[other], d2),
        [0],
        "rule 11: nothing counted reads 0"
    );
    // Bad queries: not calendar, not a period start.
    for bad in [
        PeriodOp::new(&a, Name::new("t"), Window::Lifetime, 0),
        PeriodOp::new(&a, Name::new("t"), DAY, t(3_600)),
    ] {
        let r = s.period_usage(&[bad], d2);
        assert!(
            matches!(r, Err(Error::InvalidBatch { .. })),
            "rule 11: a query naming no calendar period is InvalidBatch, got {r:?}"
        );
    }
    assert_eq!(
        read(&s, &[q(DAY, d2, 1)], d2),
        [7],
        "rule 11: a refused query changes nothing"
    );

    // Depth: n + 1 days of writes (day k: k + 1 units) on a month window in
    // UTC+9 beside a day window; every kept period reads exactly.
    let b = ScopeKey::subject("history-depth");
    let month9 = match Window::calendar_at_offset(Period::Month, 9 * 3_600) {
        Ok(w) => w,
        Err(e) => panic!("a valid window: {e}"),
    };
    let days = i64::from(n.min(40)) + 1;
    let base = 30 * DAY_SECS;
    for k in 0..=days {
        let now = t(base + k * DAY_SECS + 7_200);
        let ops = [
            op(&b, "t", DAY, k as u64 + 1, None),
            op(&b, "t", month9, k as u64 + 1, None),
        ];
        apply(&s, Batch::new(&ops, Mode::Force, now));
    }
    let now = t(base + days * DAY_SECS + 7_200);
    for back in 1..=n.min(40) {
        let qd = PeriodOp::new(&b, Name::new("t"), DAY, start(DAY, now, back));
        assert_eq!(
            read(&s, &[qd], now),
            [(days - i64::from(back)) as u64 + 1],
            "rule 11: day {back} back"
        );
    }
    // The month in UTC+9: every write of the month the query names.
    let (ms, me) = period_back(month9, now, 1).unwrap_or_default();
    let expected: u64 = (0..=days)
        .filter(|k| {
            let w = t(base + k * DAY_SECS + 7_200);
            w >= ms && w < me
        })
        .map(|k| k as u64 + 1)
        .sum();
    let qm = PeriodOp::new(&b, Name::new("t"), month9, ms);
    assert_eq!(
        read(&s, &[qm], now),
        [expected],
        "rule 11: last month in UTC+9"
    );
}
