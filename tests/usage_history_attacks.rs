//! Attacks on usage history (issue 15, deliverable 4), from an adversarial review: plan changes, clock steps back, extreme instants, the async allocation source, depth changes, concurrency, a random model, hostile snapshots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tollgate::store::{AllowanceStore, Batch, CounterOp, Mode, PeriodOp};
use tollgate::{
    Allocation, Catalog, Engine, Error, ManualClock, MemoryStore, Name, Period, Request, ScopeKey,
    UsageReport, Window,
};

/// `payg`: tokens at $0.03 (unlimited), a day window on `jobs` and `b`.
/// `free`: the same limits, no prices.
fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
      "meters": [{"id": "tok_in", "unit": "count"}, {"id": "jobs", "unit": "count"},
                 {"id": "b", "unit": "count"},
                 {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
      "plans": [
        {"id": "free",
         "limits": [{"meter": "tok_in", "window": {"calendar": {"period": "month"}}, "max": 20000},
                    {"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": -1},
                    {"meter": "b", "window": {"calendar": {"period": "day"}}, "max": -1}]},
        {"id": "payg", "cost_meter": "cost", "prices": {"tok_in": "0.03"},
         "limits": [{"meter": "tok_in", "window": {"calendar": {"period": "month"}}, "max": -1},
                    {"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": -1},
                    {"meter": "b", "window": {"calendar": {"period": "day"}}, "max": -1}]}
      ]
    }"#,
    )
    .unwrap()
}

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

type E = Engine<Arc<MemoryStore>, Arc<ManualClock>>;

fn engine(store: MemoryStore, now: DateTime<Utc>) -> (E, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now));
    let e = Engine::with_store_and_clock(catalog(), Arc::new(store), clock.clone());
    (e, clock)
}

fn units(r: &UsageReport, meter: &str) -> Decimal {
    r.meters
        .iter()
        .find(|m| m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter} in {r:?}"))
        .units
}

fn cost(r: &UsageReport, meter: &str) -> Option<Decimal> {
    r.meters
        .iter()
        .find(|m| m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter} in {r:?}"))
        .cost
        .as_ref()
        .map(|c| c.amount)
}

/// Found in review (fixed): a past report prices nothing once the subject's plan has no
/// cost meter. Pay-as-you-go in March, Free from April 1: March's bill,
/// read in April, shows no cost although $30 was charged in March (and its
/// counter of money charged is kept). "Money charged ... as charged" and
/// "a plan change never re-prices past usage" (issue 15) say $30.
#[test]
fn a_downgrade_keeps_last_months_charge() {
    let (e, clock) = engine(MemoryStore::new(), at(2026, 3, 10, 12));
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 1_000))
        .unwrap();
    clock.set(at(2026, 3, 31, 12));
    let before = e.usage_in("acct", Period::Month, 0).unwrap();
    assert_eq!(cost(&before, "tok_in"), Some(dec!(30)), "March, in March");
    clock.set(at(2026, 4, 1, 9));
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 1)).unwrap();
    let march = e.usage_in("acct", Period::Month, 1).unwrap();
    assert_eq!(units(&march, "tok_in"), dec!(1000));
    assert_eq!(
        cost(&march, "tok_in"),
        Some(dec!(30)),
        "March's charge, as charged, read in April after a downgrade"
    );
}

/// Found in review (fixed): a hostile snapshot panics `restore` (overflow in the period
/// check of a history total) instead of `InvalidSnapshot`.
#[test]
fn restore_refuses_a_history_total_at_the_end_of_time_without_panicking() {
    let (e, clock) = engine(MemoryStore::new(), at(2026, 3, 10, 12));
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("jobs", 4)).unwrap();
    clock.set(at(2026, 3, 11, 12));
    e.admit(&Request::new("acct").units("jobs", 1)).unwrap();
    let json = serde_json::to_value(e.store().snapshot()).unwrap();
    assert!(json["history"][0][1][0].is_object(), "{json}");
    const DAY_MS: i64 = 86_400_000;
    // The last whole day an i64 of milliseconds starts.
    let last_day = (i64::MAX / DAY_MS) * DAY_MS;
    for (start, end) in [
        (last_day, i64::MAX),
        (last_day, last_day),
        (i64::MIN, i64::MIN),
        (
            (i64::MIN / DAY_MS) * DAY_MS,
            (i64::MIN / DAY_MS) * DAY_MS + DAY_MS,
        ),
    ] {
        let mut j = json.clone();
        j["history"][0][1][0]["start"] = start.into();
        j["history"][0][1][0]["end"] = end.into();
        let snap: tollgate::store::Snapshot = serde_json::from_value(j).unwrap();
        let r = std::panic::catch_unwind(|| MemoryStore::restore(snap).map(|_| ()));
        match r {
            Ok(Err(Error::InvalidSnapshot { .. })) => {}
            Ok(other) => panic!("start {start}: expected InvalidSnapshot, got {other:?}"),
            Err(_) => panic!("start {start}: restore panicked"),
        }
    }
}

/// Found in review (fixed): after a clock step back, a kept total within the depth is
/// evicted at once. Depth 2: days 8-10 counted; reclaim on day 11 keeps
/// days 9 and 10. The clock steps back to day 5; 4 units on day 5, then a
/// write on day 6 rolls day 5: `keep` evicts the oldest start, which is
/// day 5 itself (days 9 and 10 are "newer"). On day 6, yesterday reads 0.
#[test]
fn a_clock_step_back_keeps_the_period_just_closed() {
    let (e, clock) = engine(
        MemoryStore::new().with_history_periods(2).unwrap(),
        at(2026, 3, 8, 12),
    );
    e.allocate(Allocation::new("acct", "free")).unwrap();
    for (day, n) in [(8, 1u64), (9, 2), (10, 3)] {
        clock.set(at(2026, 3, day, 12));
        e.admit(&Request::new("acct").units("b", n)).unwrap();
    }
    clock.set(at(2026, 3, 11, 12));
    e.store().reclaim(clock.now_utc());
    assert_eq!(
        units(&e.usage_in("acct", Period::Day, 1).unwrap(), "b"),
        dec!(3)
    );
    assert_eq!(
        units(&e.usage_in("acct", Period::Day, 2).unwrap(), "b"),
        dec!(2)
    );
    // The clock steps back (an operator's correction).
    clock.set(at(2026, 3, 5, 12));
    e.admit(&Request::new("acct").units("b", 4)).unwrap();
    clock.set(at(2026, 3, 6, 12));
    e.admit(&Request::new("acct").units("b", 1)).unwrap();
    let r = e.usage_in("acct", Period::Day, 1).unwrap();
    assert_eq!(
        units(&r, "b"),
        dec!(4),
        "day 5 is one period back on day 6 (rule 11: readable), report {r:?}"
    );
}

/// Many threads rolling one day counter at a boundary while another reads
/// yesterday: yesterday always reads exactly what was admitted in it, and
/// at the end, yesterday + today = everything admitted.
#[test]
fn concurrent_rolls_neither_lose_nor_double_count() {
    for round in 0..20 {
        let (e, clock) = engine(MemoryStore::new(), at(2026, 3, 10, 23));
        let e = Arc::new(e);
        e.allocate(Allocation::new("acct", "free")).unwrap();
        let threads = 4;
        let per = 50u64;
        // Day 10.
        std::thread::scope(|s| {
            for _ in 0..threads {
                let e = e.clone();
                s.spawn(move || {
                    for _ in 0..per {
                        e.admit(&Request::new("acct").units("jobs", 1)).unwrap();
                    }
                });
            }
        });
        let yesterday = Decimal::from(threads * per);
        clock.set(at(2026, 3, 11, 0));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = {
                let e = e.clone();
                let stop = &stop;
                s.spawn(move || {
                    let mut reads = 0;
                    while !stop.load(Ordering::Relaxed) || reads < 10 {
                        let r = e.usage_in("acct", Period::Day, 1).unwrap();
                        assert_eq!(units(&r, "jobs"), yesterday, "round {round}");
                        reads += 1;
                    }
                })
            };
            // A sweep racing the rolls (it may drop the ended counter,
            // keeping its total, before a write rolls it).
            let sweeper = {
                let e = e.clone();
                let stop = &stop;
                let clock = clock.clone();
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        e.store().reclaim(clock.now_utc());
                    }
                })
            };
            let writers: Vec<_> = (0..threads)
                .map(|_| {
                    let e = e.clone();
                    s.spawn(move || {
                        for _ in 0..per {
                            e.admit(&Request::new("acct").units("jobs", 1)).unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap();
            sweeper.join().unwrap();
        });
        let today = e.usage_in("acct", Period::Day, 0).unwrap();
        assert_eq!(units(&today, "jobs"), Decimal::from(threads * per));
        assert_eq!(e.store().history_count(), 1);
    }
}

/// A tiny deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random traffic with a clock moving forward by random steps (minutes to
/// days), reservations committed or released in a later period than they
/// opened, reclaims at random times, day and week windows at a UTC offset:
/// every day and week within the depth reads what was counted in it (the
/// period of the admit, or of the commit for a reservation).
#[test]
fn random_forward_traffic_matches_a_model() {
    use std::collections::HashMap;
    let cat: Catalog = serde_json::from_str(
        r#"{
      "meters": [{"id": "t", "unit": "count"}],
      "plans": [{"id": "p", "limits": [
         {"meter": "t", "window": {"calendar": {"period": "day", "utc_offset": "-05:00"}}, "max": -1},
         {"meter": "t", "window": {"calendar": {"period": "week", "utc_offset": "+09:30"}}, "max": -1},
         {"meter": "t", "window": {"calendar": {"period": "month", "utc_offset": "+14:00"}}, "max": -1}]}]
    }"#,
    )
    .unwrap_or_else(|e| panic!("catalog: {e}"));
    let day = Window::calendar_at_offset(Period::Day, -5 * 3600).unwrap();
    let week = Window::calendar_at_offset(Period::Week, 9 * 3600 + 1800).unwrap();
    let month = Window::calendar_at_offset(Period::Month, 14 * 3600).unwrap();
    for seed in 1..=30u64 {
        let depth = 1 + (seed % 6) as u32;
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let clock = Arc::new(ManualClock::new(at(2026, 1, 27, 3)));
        let store = Arc::new(MemoryStore::new().with_history_periods(depth).unwrap());
        let e = Engine::with_store_and_clock(cat.clone(), store.clone(), clock.clone());
        e.allocate(Allocation::new("s", "p")).unwrap();
        // (window, period start ms) -> units.
        let mut model: HashMap<(Window, i64), u64> = HashMap::new();
        let count = |model: &mut HashMap<(Window, i64), u64>, now: DateTime<Utc>, n: u64| {
            for w in [day, week, month] {
                let s = start_of(w, now.timestamp_millis(), 0);
                *model.entry((w, s)).or_default() += n;
            }
        };
        let mut open = Vec::new();
        for _ in 0..300 {
            let step = match rng.below(6) {
                0 => Duration::minutes(rng.below(90) as i64),
                1 | 2 => Duration::hours(rng.below(30) as i64),
                3 => Duration::days(rng.below(4) as i64),
                4 => Duration::days(rng.below(12) as i64),
                _ => Duration::seconds(1),
            };
            clock.advance(step.to_std().unwrap());
            let now = clock.now_utc();
            match rng.below(7) {
                0..=2 => {
                    let n = 1 + rng.below(9);
                    e.admit(&Request::new("s").units("t", n)).unwrap();
                    count(&mut model, now, n);
                }
                3 => {
                    let n = 1 + rng.below(9);
                    if let Ok(r) = e
                        .reserve(
                            &Request::new("s").units("t", n),
                            std::time::Duration::from_secs(40 * 86_400),
                        )
                        .unwrap()
                    {
                        open.push((r, n));
                    }
                }
                4 => {
                    if let Some((r, n)) = open.pop() {
                        let actual = rng.below(n + 3);
                        match e.commit(&r, &Request::new("s").units("t", actual)) {
                            Ok(_) => count(&mut model, now, actual),
                            Err(
                                Error::ReservationExpired { .. } | Error::UnknownReservation { .. },
                            ) => {}
                            Err(x) => panic!("commit: {x}"),
                        }
                    }
                }
                5 => {
                    if !open.is_empty() {
                        let (r, _) = open.remove(0);
                        // A release may keep a share of the hold: counted
                        // now, as the current day reads it.
                        let cur = |e: &Engine<_, _>| {
                            units(&e.usage_in("s", Period::Day, 0).unwrap(), "t")
                        };
                        let before = cur(&e);
                        match e.release(&r, tollgate::Outcome::Failed) {
                            Ok(_) => {}
                            Err(
                                Error::ReservationExpired { .. } | Error::UnknownReservation { .. },
                            ) => {}
                            Err(x) => panic!("release: {x}"),
                        }
                        let kept = cur(&e) - before;
                        let kept: u64 = kept.try_into().unwrap();
                        count(&mut model, now, kept);
                    }
                }
                _ => {
                    // A reclaim at now, or a day behind (as a batch's sweep).
                    let when = if rng.below(2) == 0 {
                        now
                    } else {
                        now - Duration::days(1)
                    };
                    store.reclaim(when);
                }
            }
            let now_ms = clock.now_utc().timestamp_millis();
            let (p, w) = [
                (Period::Day, day),
                (Period::Week, week),
                (Period::Month, month),
            ][rng.below(3) as usize];
            let back = 1 + rng.below(u64::from(depth)) as u32;
            let r = e.usage_in("s", p, back).unwrap();
            let s = start_of(w, now_ms, back);
            let want = model.get(&(w, s)).copied().unwrap_or(0);
            assert_eq!(
                units(&r, "t"),
                Decimal::from(want),
                "seed {seed} depth {depth}: {p:?} {back} back at {}",
                clock.now_utc()
            );
        }
    }
}

fn start_of(w: Window, now_ms: i64, back: u32) -> i64 {
    let Window::Calendar { .. } = w else { panic!() };
    // Walk back through the engine's own report bounds via a store query:
    // recompute here independently with chrono.
    let (period, off) = match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => (period, utc_offset_secs),
        _ => unreachable!(),
    };
    let off = chrono::FixedOffset::east_opt(off).unwrap();
    let local = Utc
        .timestamp_millis_opt(now_ms)
        .unwrap()
        .with_timezone(&off);
    use chrono::Datelike;
    let d = local.date_naive();
    let first = match period {
        Period::Day => d - chrono::Days::new(u64::from(back)),
        Period::Week => {
            let monday = d - chrono::Days::new(u64::from(d.weekday().num_days_from_monday()));
            monday - chrono::Days::new(7 * u64::from(back))
        }
        Period::Month => {
            let m1 = d.with_day(1).unwrap();
            m1 - chrono::Months::new(back)
        }
    };
    first
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_local_timezone(off)
        .unwrap()
        .timestamp_millis()
}

/// Store level: `period_usage` on a fresh store at depth 0 and at the
/// maximum, with a month window swept far later.
#[test]
fn depth_extremes() {
    let a = ScopeKey::subject("x");
    let day = Window::calendar(Period::Day);
    let s0 = MemoryStore::new().with_history_periods(0).unwrap();
    let ops = [CounterOp::new(&a, Name::new("t"), day, 5, None)];
    assert!(
        s0.apply(&Batch::new(&ops, Mode::Force, 3_600_000))
            .unwrap()
            .applied
    );
    assert!(
        s0.apply(&Batch::new(&ops, Mode::Force, 86_400_000 + 3_600_000))
            .unwrap()
            .applied
    );
    assert_eq!(s0.history_count(), 0);
    let q = [PeriodOp::new(&a, Name::new("t"), day, 0)];
    // Depth 0 keeps nothing: what it answers is 0, never a wrong total.
    assert_eq!(s0.period_usage(&q, 86_400_000 + 7_200_000).unwrap(), [0]);
    let max = tollgate::store::MAX_HISTORY_PERIODS;
    let sm = MemoryStore::new().with_history_periods(max).unwrap();
    for d in 0..400i64 {
        assert!(
            sm.apply(&Batch::new(&ops, Mode::Force, d * 86_400_000 + 1))
                .unwrap()
                .applied
        );
    }
    assert_eq!(sm.history_count(), max as usize);
    sm.reclaim(Utc.timestamp_millis_opt(400 * 86_400_000).unwrap());
    assert_eq!(sm.history_count(), max as usize);
    let q = [PeriodOp::new(
        &a,
        Name::new("t"),
        day,
        (400 - 366) * 86_400_000,
    )];
    assert_eq!(sm.period_usage(&q, 400 * 86_400_000).unwrap(), [5]);
    assert!(MemoryStore::new().with_history_periods(max + 1).is_err());
}

/// Finding (same root as the restore panic): `period_usage` must answer a
/// query naming no calendar period with `InvalidBatch` (rule 11), but a
/// day start at the end of an i64 panics (debug) in the check itself.
#[test]
fn period_usage_refuses_a_period_at_the_end_of_time_without_panicking() {
    const DAY_MS: i64 = 86_400_000;
    let a = ScopeKey::subject("x");
    let s = MemoryStore::new();
    for start in [(i64::MAX / DAY_MS) * DAY_MS, (i64::MIN / DAY_MS) * DAY_MS] {
        let q = [PeriodOp::new(
            &a,
            Name::new("t"),
            Window::calendar(Period::Day),
            start,
        )];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.period_usage(&q, 0)));
        match r {
            Ok(Ok(v)) => assert_eq!(v, [0]),
            Ok(Err(Error::InvalidBatch { .. })) => {}
            Ok(Err(e)) => panic!("start {start}: {e}"),
            Err(_) => panic!("start {start}: period_usage panicked"),
        }
    }
}

/// Found in review (fixed): `usage_in_async` (back >= 1) never asks an async allocation
/// source. Replica `a` allocates through the shared source; replica `b`
/// (same store, same source) answers `usage_async` but `usage_in_async`
/// says UnknownSubject — the sync path (`allocation_of`) cannot load from
/// an async source, and `usage_in_async` skips `refresh_async`, which every
/// other async call (and `usage_in_async` with back 0) makes first.
#[cfg(feature = "async")]
#[test]
fn usage_in_async_loads_from_the_async_allocation_source() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let source = tollgate::MemoryAllocations::new();
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(at(2026, 3, 10, 12)));
    let replica = || {
        Engine::with_store_and_clock(catalog(), store.clone(), clock.clone())
            .with_async_allocation_source(source.clone(), std::time::Duration::from_secs(60))
    };
    let a = replica();
    rt.block_on(a.allocate_async(Allocation::new("acct", "payg")))
        .unwrap();
    rt.block_on(a.admit_async(&Request::new("acct").units("tok_in", 100)))
        .unwrap();
    clock.set(at(2026, 4, 2, 12));
    // A replica started later.
    let b = replica();
    let past = rt.block_on(b.usage_in_async("acct", Period::Month, 1));
    match past {
        Ok(r) => assert_eq!(units(&r, "tok_in"), dec!(100)),
        Err(e) => panic!("replica b, usage_in_async before any other call: {e:?}"),
    }
}

/// Found in review (fixed): a store restored from a snapshot and given a smaller depth
/// (`restore(..)?.with_history_periods(n)`, a host changing its
/// configuration) keeps every restored total, so its own next snapshot
/// lists more totals per counter than its depth, and `restore` refuses it:
/// the store's own snapshot cannot be restored.
#[test]
fn lowering_the_depth_trims_what_is_kept() {
    let (e, clock) = engine(
        MemoryStore::new().with_history_periods(5).unwrap(),
        at(2026, 3, 10, 12),
    );
    e.allocate(Allocation::new("acct", "free")).unwrap();
    for day in 10..16 {
        clock.set(at(2026, 3, day, 12));
        e.admit(&Request::new("acct").units("jobs", 1)).unwrap();
    }
    let snap = e.store().snapshot();
    let smaller = MemoryStore::restore(snap)
        .unwrap()
        .with_history_periods(2)
        .unwrap();
    assert_eq!(smaller.history_periods(), 2);
    let again = smaller.snapshot();
    match MemoryStore::restore(again) {
        Ok(s) => assert!(
            s.history_count() <= 2,
            "{} totals kept at depth 2",
            s.history_count()
        ),
        Err(e) => panic!("a store's own snapshot is refused: {e}"),
    }
}

/// Hostile snapshots: random edits of the history part of a valid
/// snapshot never panic `restore`; each is restored or refused with
/// `InvalidSnapshot`, and a restored store answers `period_usage` and
/// `reclaim` without panicking. Extreme instants are excluded (see
/// `restore_refuses_a_history_total_at_the_end_of_time_without_panicking`).
#[test]
fn hostile_history_snapshots_never_panic_within_sane_instants() {
    let (e, clock) = engine(
        MemoryStore::new().with_history_periods(3).unwrap(),
        at(2026, 3, 10, 12),
    );
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    for day in 10..14 {
        clock.set(at(2026, 3, day, 12));
        e.admit(&Request::new("acct").units("jobs", 2).units("tok_in", 5))
            .unwrap();
    }
    let json = serde_json::to_value(e.store().snapshot()).unwrap();
    assert!(
        json["history"][0][1].as_array().unwrap().len() >= 2,
        "{json}"
    );
    let mut rng = Rng(7);
    let base = at(2026, 3, 1, 0).timestamp_millis();
    let mut restored = 0;
    for _ in 0..3000 {
        let mut j = json.clone();
        for _ in 0..1 + rng.below(3) {
            let list = j["history"][0][1].as_array_mut().unwrap();
            let n = list.len() as u64;
            let i = rng.below(n) as usize;
            match rng.below(9) {
                0 => list[i]["start"] = (base + (rng.below(80) as i64 - 40) * 3_600_000).into(),
                1 => list[i]["end"] = (base + (rng.below(80) as i64 - 40) * 3_600_000).into(),
                2 => list[i]["used"] = [0u64, 1, u64::MAX][rng.below(3) as usize].into(),
                3 => {
                    let w = [
                        serde_json::json!({"calendar": {"period": "week"}}),
                        serde_json::json!({"calendar": {"period": "month", "utc_offset": "+23:59"}}),
                        serde_json::json!({"calendar": {"period": "day", "utc_offset": "-23:59"}}),
                        serde_json::json!("concurrent"),
                        serde_json::json!({"rolling": {"span": "1h", "buckets": 60}}),
                    ];
                    list[i]["window"] = w[rng.below(5) as usize].clone();
                }
                4 => {
                    list[i]["meter"] =
                        ["", "jobs", "tok_in\u{1f}charged:cost", "x"][rng.below(4) as usize].into()
                }
                5 => {
                    let p = list[i].clone();
                    list.push(p);
                }
                6 => {
                    list.remove(i);
                    if list.is_empty() {
                        break;
                    }
                }
                7 => j["history_periods"] = rng.below(6).into(),
                _ => {
                    let mut p = list[i].clone();
                    p["start"] = (base - 86_400_000 * rng.below(5) as i64).into();
                    p["end"] = (p["start"].as_i64().unwrap() + 86_400_000).into();
                    list.push(p);
                }
            }
        }
        let snap: tollgate::store::Snapshot = match serde_json::from_value(j.clone()) {
            Ok(s) => s,
            Err(_) => continue,
        };
        let r = std::panic::catch_unwind(|| MemoryStore::restore(snap));
        match r {
            Err(_) => panic!("restore panicked on {}", j["history"]),
            Ok(Err(Error::InvalidSnapshot { .. })) => {}
            Ok(Err(e)) => panic!("restore: untyped error {e:?}"),
            Ok(Ok(s)) => {
                restored += 1;
                let a = ScopeKey::subject("acct");
                let q = [PeriodOp::new(
                    &a,
                    Name::new("jobs"),
                    Window::calendar(Period::Day),
                    at(2026, 3, 12, 0).timestamp_millis(),
                )];
                let _ = s
                    .period_usage(&q, at(2026, 3, 13, 0).timestamp_millis())
                    .unwrap();
                s.reclaim(at(2026, 3, 20, 0));
                // Whatever was restored snapshots to something restorable.
                MemoryStore::restore(s.snapshot()).unwrap();
            }
        }
    }
    assert!(restored > 0);
}

/// Context for `a_downgrade_keeps_last_months_charge`: the current
/// period's report has the same gap (pre-existing, deliverable 3), so a
/// mid-month downgrade hides the month's charges until and after it closes.
#[test]
fn a_mid_month_downgrade_keeps_this_months_charge() {
    let (e, clock) = engine(MemoryStore::new(), at(2026, 3, 10, 12));
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 1_000))
        .unwrap();
    clock.set(at(2026, 3, 20, 12));
    e.allocate(Allocation::new("acct", "free")).unwrap();
    let now = e.usage("acct").unwrap();
    assert_eq!(cost(&now, "tok_in"), Some(dec!(30)), "charged on March 10");
}
