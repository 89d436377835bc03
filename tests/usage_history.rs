//! Usage history (issue 15, deliverable 4): reports of closed calendar
//! periods (`Engine::usage_in`), kept by the store as one total per counter
//! per period (contract rule 11), at most `history_periods` per counter, so
//! memory is flat in traffic.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tollgate::{
    Allocation, Catalog, Engine, Error, ManualClock, MemoryStore, Period, Request, UsageReport,
};

/// `free`: 20,000 input tokens a month, 10 jobs a day, no prices. `payg`:
/// input tokens at $0.03, jobs free, a monthly cost cap.
fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
      "meters": [{"id": "tok_in", "unit": "count"}, {"id": "jobs", "unit": "count"},
                 {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
      "plans": [
        {"id": "free",
         "limits": [{"meter": "tok_in", "window": {"calendar": {"period": "month"}}, "max": 20000},
                    {"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": 10}]},
        {"id": "payg", "cost_meter": "cost", "prices": {"tok_in": "0.03"},
         "limits": [{"meter": "tok_in", "window": {"calendar": {"period": "month"}}, "max": -1},
                    {"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": 10},
                    {"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": 1000}]}
      ]
    }"#,
    )
    .unwrap()
}

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn engine(store: MemoryStore) -> (Engine<Arc<MemoryStore>, Arc<ManualClock>>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(at(2026, 3, 10, 12)));
    let e = Engine::with_store_and_clock(catalog(), Arc::new(store), clock.clone());
    (e, clock)
}

/// A row's units, cost, period start and period end.
type Row = (
    Decimal,
    Option<Decimal>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// The row for `meter`.
fn row(r: &UsageReport, meter: &str) -> Row {
    let m = r
        .meters
        .iter()
        .find(|m| m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter} in {r:?}"));
    (
        m.units,
        m.cost.as_ref().map(|c| c.amount),
        m.period_start,
        m.resets_at,
    )
}

fn meters(r: &UsageReport) -> Vec<&str> {
    r.meters.iter().map(|m| m.meter.as_str()).collect()
}

#[test]
fn march_is_read_in_april_with_its_charges() {
    let (e, clock) = engine(MemoryStore::new());
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 15_000))
        .unwrap();
    clock.set(at(2026, 3, 20, 9));
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 1_000))
        .unwrap();
    clock.set(at(2026, 4, 2, 9));
    // March, before anything is written in April: read from its counter.
    let march = e.usage_in("acct", Period::Month, 1).unwrap();
    assert_eq!(
        meters(&march),
        ["tok_in", "cost"],
        "the monthly limits only"
    );
    assert_eq!(
        row(&march, "tok_in"),
        (
            dec!(16000),
            Some(dec!(30)),
            Some(at(2026, 3, 1, 0)),
            Some(at(2026, 4, 1, 0))
        ),
        "March's tokens, charged as they were: the free ones at $0"
    );
    assert_eq!(row(&march, "cost").0, dec!(30));
    // April's first request rolls March's counters: the same report.
    e.admit(&Request::new("acct").units("tok_in", 500)).unwrap();
    assert_eq!(
        e.usage_in("acct", Period::Month, 1).unwrap().meters,
        march.meters
    );
    let april = e.usage_in("acct", Period::Month, 0).unwrap();
    assert_eq!(row(&april, "tok_in").0, dec!(500));
    assert_eq!(row(&april, "tok_in").1, Some(dec!(15)));
    // Back 0 is `usage`'s rows for the period.
    let now = e.usage("acct").unwrap();
    assert_eq!(
        april.meters,
        now.meters
            .iter()
            .filter(|m| m.meter != "jobs")
            .cloned()
            .collect::<Vec<_>>()
    );
}

#[test]
fn further_back_than_kept_is_a_typed_error_that_reads_nothing() {
    let (e, clock) = engine(MemoryStore::new());
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 100)).unwrap();
    clock.set(at(2026, 5, 2, 9));
    match e.usage_in("acct", Period::Month, 2) {
        Err(Error::HistoryNotKept { asked: 2, kept: 1 }) => {}
        other => panic!("expected HistoryNotKept, got {other:?}"),
    }
    // Nothing rolled or changed: March is still the counter's, and April
    // (one back) read nothing.
    assert_eq!(
        row(&e.usage_in("acct", Period::Month, 1).unwrap(), "tok_in").0,
        dec!(0)
    );
    assert_eq!(e.store().history_count(), 0);
    let (e0, _) = engine(MemoryStore::new().with_history_periods(0).unwrap());
    e0.allocate(Allocation::new("acct", "payg")).unwrap();
    match e0.usage_in("acct", Period::Day, 1) {
        Err(Error::HistoryNotKept { asked: 1, kept: 0 }) => {}
        other => panic!("expected HistoryNotKept, got {other:?}"),
    }
    match e.usage_in("stranger", Period::Month, 1) {
        Err(Error::UnknownSubject { .. }) => {}
        other => panic!("expected UnknownSubject, got {other:?}"),
    }
}

#[test]
fn a_depth_past_the_maximum_is_refused() {
    match MemoryStore::new().with_history_periods(tollgate::store::MAX_HISTORY_PERIODS + 1) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "history_periods"),
        other => panic!("expected InvalidConfig, got {:?}", other.map(|_| ())),
    }
    assert!(MemoryStore::new()
        .with_history_periods(tollgate::store::MAX_HISTORY_PERIODS)
        .is_ok());
}

#[test]
fn daily_history_keeps_each_day_of_the_depth() {
    let (e, clock) = engine(MemoryStore::new().with_history_periods(5).unwrap());
    e.allocate(Allocation::new("acct", "free")).unwrap();
    for day in 0..8u32 {
        clock.set(at(2026, 3, 10 + day, 12));
        e.admit(&Request::new("acct").units("jobs", u64::from(day) + 1))
            .unwrap();
    }
    // Day 17 is current (8 jobs); 16 back to 12 are kept.
    for back in 1..=5u32 {
        let r = e.usage_in("acct", Period::Day, back).unwrap();
        assert_eq!(meters(&r), ["jobs"]);
        let (units, cost, start, end) = row(&r, "jobs");
        assert_eq!(units, Decimal::from(8 - back), "{back} days back");
        assert_eq!(cost, None, "a plan without a cost meter shows no cost");
        assert_eq!(start, Some(at(2026, 3, 17 - back, 0)));
        assert_eq!(end, Some(at(2026, 3, 18 - back, 0)));
    }
    assert!(matches!(
        e.usage_in("acct", Period::Day, 6),
        Err(Error::HistoryNotKept { asked: 6, kept: 5 })
    ));
    assert_eq!(
        e.store().history_count(),
        5,
        "at most the depth per counter"
    );
}

#[test]
fn a_swept_counter_keeps_its_closed_total() {
    let (e, clock) = engine(MemoryStore::new());
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("jobs", 3)).unwrap();
    clock.set(at(2026, 3, 11, 12));
    // The day counter's period ended: reclaim drops it, keeping its total.
    let removed = e.store().reclaim(clock.now_utc());
    assert!(removed >= 1, "the ended day counter is reclaimed");
    assert_eq!(e.store().history_count(), 1);
    assert_eq!(
        row(&e.usage_in("acct", Period::Day, 1).unwrap(), "jobs").0,
        dec!(3)
    );
    // Two days on, it is more than one period back: forgotten.
    clock.set(at(2026, 3, 13, 12));
    e.store().reclaim(clock.now_utc());
    assert_eq!(e.store().history_count(), 0);
    assert_eq!(
        row(&e.usage_in("acct", Period::Day, 1).unwrap(), "jobs").0,
        dec!(0)
    );
}

#[test]
fn history_is_flat_in_traffic() {
    // 200 subjects, 40 days, a request each every day: the store keeps at
    // most 2 totals per counter (the depth) whatever the traffic, and none
    // once every kept period is more than 2 periods old.
    let (e, clock) = engine(MemoryStore::new().with_history_periods(2).unwrap());
    for i in 0..200 {
        e.allocate(Allocation::new(format!("s{i}"), "free"))
            .unwrap();
    }
    let mut most = 0;
    for day in 0..40i64 {
        clock.set(at(2026, 3, 1, 12) + chrono::Duration::days(day));
        for i in 0..200 {
            e.admit(&Request::new(&format!("s{i}")).units("jobs", 1))
                .unwrap();
        }
        most = most.max(e.store().history_count());
    }
    // 200 day counters (and 200 month counters: tok_in is not used).
    assert!(most <= 400, "history grew to {most}");
    assert!(most >= 200, "history kept nothing: {most}");
    assert_eq!(
        row(&e.usage_in("s7", Period::Day, 2).unwrap(), "jobs").0,
        dec!(1)
    );
    clock.set(at(2026, 5, 1, 12));
    e.store().reclaim(clock.now_utc());
    assert_eq!(e.store().history_count(), 0, "nothing kept past the depth");
}

#[test]
fn snapshots_keep_history_and_refuse_bad_totals() {
    let (e, clock) = engine(MemoryStore::new().with_history_periods(3).unwrap());
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("jobs", 4)).unwrap();
    clock.set(at(2026, 3, 11, 12));
    e.admit(&Request::new("acct").units("jobs", 1)).unwrap();
    let snap = e.store().snapshot();
    let restored = MemoryStore::restore(snap.clone()).unwrap();
    assert_eq!(restored.history_count(), 1);
    assert_eq!(
        restored.snapshot(),
        snap,
        "a restored store snapshots the same"
    );
    let e2 = Engine::with_store_and_clock(catalog(), Arc::new(restored), clock.clone());
    e2.allocate(Allocation::new("acct", "free")).unwrap();
    assert_eq!(
        row(&e2.usage_in("acct", Period::Day, 1).unwrap(), "jobs").0,
        dec!(4)
    );
    assert!(matches!(
        e2.usage_in("acct", Period::Day, 4),
        Err(Error::HistoryNotKept { kept: 3, .. })
    ));

    let json = serde_json::to_value(&snap).unwrap();
    let bad = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        edit(&mut j);
        let s: tollgate::store::Snapshot = serde_json::from_value(j).unwrap();
        match MemoryStore::restore(s) {
            Err(Error::InvalidSnapshot { .. }) => {}
            other => panic!("expected InvalidSnapshot, got {:?}", other.map(|_| ())),
        }
    };
    let past = |j: &mut serde_json::Value| -> serde_json::Value { j["history"][0][1][0].clone() };
    bad(&|j| j["history"][0][1][0]["start"] = (at(2026, 3, 10, 1).timestamp_millis()).into());
    bad(&|j| j["history"][0][1][0]["end"] = (at(2026, 3, 12, 0).timestamp_millis()).into());
    bad(&|j| j["history"][0][1][0]["used"] = 0.into());
    bad(&|j| j["history"][0][1][0]["window"] = "lifetime".into());
    bad(&|j| {
        let p = past(j);
        j["history"][0][1].as_array_mut().unwrap().push(p);
    });
    bad(&|j| {
        let h = j["history"][0].clone();
        j["history"].as_array_mut().unwrap().push(h);
    });
    bad(&|j| j["history_periods"] = 10_000.into());
    bad(&|j| j["history_periods"] = 0.into());
}

#[test]
fn past_reports_serialize_with_their_period() {
    let (e, clock) = engine(MemoryStore::new());
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 10)).unwrap();
    clock.set(at(2026, 4, 1, 0));
    let j = serde_json::to_value(e.usage_in("acct", Period::Month, 1).unwrap()).unwrap();
    assert_eq!(j["meters"][0]["meter"], "tok_in");
    assert_eq!(j["meters"][0]["period_start"], "2026-03-01T00:00:00Z");
    assert_eq!(j["meters"][0]["resets_at"], "2026-04-01T00:00:00Z");
    assert_eq!(j["meters"][0]["units"], 10);
    assert_eq!(j["meters"][0]["held"], 0);
    assert_eq!(j["meters"][0]["cost"]["amount"], "0.300000");
}

#[cfg(feature = "async")]
#[test]
fn the_async_twin_reads_the_same() {
    let (e, clock) = engine(MemoryStore::new());
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 10)).unwrap();
    clock.set(at(2026, 4, 3, 0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let past = rt
        .block_on(e.usage_in_async("acct", Period::Month, 1))
        .unwrap();
    assert_eq!(past, e.usage_in("acct", Period::Month, 1).unwrap());
    assert!(matches!(
        rt.block_on(e.usage_in_async("acct", Period::Month, 3)),
        Err(Error::HistoryNotKept { asked: 3, kept: 1 })
    ));
}
