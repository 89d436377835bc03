//! `MemoryStore::restore` refuses counters whose period does not match
//! their window.

use chrono::{TimeZone, Utc};
use serde_json::Value;
use tollgate::store::{Batch, CounterOp, Mode};
use tollgate::{AllowanceStore, Error, MemoryStore, Name, Period, ScopeKey, Snapshot, Window};

/// 2026-04-`d` at `h`:00 UTC, in Unix milliseconds.
fn t(d: u32, h: u32) -> i64 {
    Utc.with_ymd_and_hms(2026, 4, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

const DAY_MS: i64 = 86_400_000;

/// A snapshot of one subject with a day counter and a rolling one, as JSON.
fn snapshot_json() -> Value {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let ops = [
        CounterOp::new(
            &a,
            Name::new("day"),
            Window::calendar(Period::Day),
            10,
            Some(10),
        ),
        CounterOp::new(
            &a,
            Name::new("hour"),
            Window::Rolling {
                span_secs: 3_600,
                buckets: 60,
            },
            10,
            Some(10),
        ),
    ];
    assert!(
        store
            .apply(&Batch::new(&ops, Mode::WithinLimits, t(8, 12)))
            .unwrap()
            .applied
    );
    serde_json::to_value(store.snapshot()).unwrap()
}

/// The data of counter `meter` in the snapshot.
fn data<'v>(snap: &'v mut Value, meter: &str) -> &'v mut Value {
    let counters = snap["scopes"][0][1].as_array_mut().unwrap();
    let c = counters.iter_mut().find(|c| c["meter"] == meter).unwrap();
    &mut c["data"]
}

fn restore(snap: Value) -> Result<MemoryStore, Error> {
    let snap: Snapshot = serde_json::from_value(snap).unwrap();
    MemoryStore::restore(snap)
}

#[test]
fn the_untampered_snapshot_restores() {
    let store = restore(snapshot_json()).unwrap();
    assert_eq!(store.counter_count(), 2);
}

#[test]
fn a_day_counter_that_ends_forty_days_out_is_refused() {
    let mut snap = snapshot_json();
    let cal = &mut data(&mut snap, "day")["calendar"];
    let start = cal["start"].as_i64().unwrap();
    cal["end"] = (start + 40 * DAY_MS).into();
    let err = restore(snap).map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::InvalidSnapshot { .. }), "{err}");
}

#[test]
fn calendar_periods_other_than_one_period_of_the_window_are_refused() {
    let base = snapshot_json();
    let start = base["scopes"][0][1][0]["data"]["calendar"]["start"]
        .as_i64()
        .unwrap();
    // A day long but not a day (noon to noon), the day forty days out but
    // two days long, a day ending early, a period that ends where it starts.
    for (s, e) in [
        (start + DAY_MS / 2, start + DAY_MS + DAY_MS / 2),
        (start + 40 * DAY_MS, start + 42 * DAY_MS),
        (start, start + DAY_MS - 1),
        (start, start),
    ] {
        let mut snap = base.clone();
        let cal = &mut data(&mut snap, "day")["calendar"];
        cal["start"] = s.into();
        cal["end"] = e.into();
        let err = restore(snap).map(|_| ()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSnapshot { .. }),
            "{s} {e}: {err}"
        );
    }
    // One day, another day than the one recorded: a period of the window.
    let mut snap = base.clone();
    let cal = &mut data(&mut snap, "day")["calendar"];
    cal["start"] = (start + DAY_MS).into();
    cal["end"] = (start + 2 * DAY_MS).into();
    assert!(restore(snap).is_ok());
}

#[test]
fn a_rolling_ring_of_another_geometry_is_refused() {
    let base = snapshot_json();
    let tamper: [fn(&mut Value); 3] = [
        // Buckets of two minutes: the same 60 slots span two hours.
        |r| r["width_ms"] = 120_000.into(),
        // One slot more than the window's buckets.
        |r| {
            r["slots"].as_array_mut().unwrap().push(0.into());
        },
        // One slot fewer (the last one, empty).
        |r| {
            r["slots"].as_array_mut().unwrap().pop();
        },
    ];
    for (i, f) in tamper.iter().enumerate() {
        let mut snap = base.clone();
        f(&mut data(&mut snap, "hour")["rolling"]);
        let err = restore(snap).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::InvalidSnapshot { .. }), "{i}: {err}");
    }
}

/// A read, a refused batch and a batch that ends in an error, two days
/// after the counters were written, change nothing: the snapshot after them
/// is the snapshot before (contract rule 2), with expired holds too.
#[test]
fn reads_refusals_and_errors_at_a_later_time_change_no_counter() {
    use tollgate::store::{LeaseAction, LeaseOp};
    use tollgate::LeaseId;
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let day = Window::calendar(Period::Day);
    let hour = Window::Rolling {
        span_secs: 3_600,
        buckets: 60,
    };
    let ops = [
        CounterOp::new(&a, Name::new("day"), day, 10, Some(10)),
        CounterOp::new(&a, Name::new("hour"), hour, 10, Some(10)),
        CounterOp::new(&a, Name::new("life"), Window::Lifetime, u64::MAX - 1, None),
    ];
    assert!(
        store
            .apply(&Batch::new(&ops, Mode::Force, t(8, 12)))
            .unwrap()
            .applied
    );
    let held = [CounterOp::new(&a, Name::new("day"), day, 1, None)];
    let open = LeaseOp::new(
        LeaseId::from_u128(7),
        &a,
        LeaseAction::Open {
            expires_at_ms: t(8, 13),
            deadline_ms: None,
        },
    );
    let b = Batch::new(&held, Mode::WithinLimits, t(8, 12)).with_lease(open);
    assert!(store.apply(&b).unwrap().applied);
    let before = store.snapshot();
    let later = t(10, 9);
    let read = store
        .apply(&Batch::new(&ops[..2], Mode::Check, later))
        .unwrap();
    assert_eq!((read.counters[0].used, read.counters[1].used), (0, 0));
    assert_eq!(read.counters[0].held, 0, "the hold expired");
    let too_much = [
        CounterOp::new(&a, Name::new("day"), day, 5, Some(10)),
        CounterOp::new(&a, Name::new("hour"), hour, 11, Some(10)),
    ];
    let r = store
        .apply(&Batch::new(&too_much, Mode::WithinLimits, later))
        .unwrap();
    assert!(!r.applied);
    let overflow = [
        CounterOp::new(&a, Name::new("day"), day, 1, None),
        CounterOp::new(&a, Name::new("hour"), hour, 1, None),
        CounterOp::new(&a, Name::new("life"), Window::Lifetime, 2, None),
    ];
    assert!(matches!(
        store.apply(&Batch::new(&overflow, Mode::Force, later)),
        Err(Error::Overflow { .. })
    ));
    assert_eq!(store.snapshot(), before, "a counter or hold was written");
}
