//! Feature `metrics`: what the engine reports through the `metrics` facade,
//! read back with metrics-util's `DebuggingRecorder`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tollgate::store::{Applied, Batch};
use tollgate::{
    Allocation, AllowanceStore, CatalogConfig, Engine, Error, LeaseInfo, LimitConfig, ManualClock,
    MemoryStore, Meter, Period, PlanConfig, Request, Window,
};

/// A memory store that fails every call while `down` is set.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

impl AllowanceStore for Flaky {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Store {
                message: "down".into(),
            });
        }
        self.inner.apply(batch)
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.inner.overdue(now)
    }
}

fn engine() -> (Engine<Arc<Flaky>, ManualClock>, Arc<Flaky>, ManualClock) {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            100u64,
        )))
        .build()
        .unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 9, 0, 0).unwrap());
    let store = Arc::new(Flaky::default());
    let engine = Engine::with_store_and_clock(catalog, store.clone(), clock.clone());
    engine.allocate(Allocation::new("a", "p")).unwrap();
    (engine, store, clock)
}

/// Every metric as `(name, sorted labels, value)`.
type Metrics = Vec<(String, Vec<(String, String)>, DebugValue)>;

/// The metrics recorded since the last read.
fn read(recorder: &DebuggingRecorder) -> Metrics {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    m.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn gauge(m: &Metrics, name: &str) -> f64 {
    m.iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, v)| match v {
            DebugValue::Gauge(g) => g.into_inner(),
            other => panic!("{name} is not a gauge: {other:?}"),
        })
        .unwrap_or(0.0)
}

#[test]
fn decisions_are_counted_by_call_status_and_reason() {
    let recorder = DebuggingRecorder::new();
    let (engine, _, _) = engine();
    metrics::with_local_recorder(&recorder, || {
        let ok = engine
            .admit(&Request::new("a").units("tokens", 50))
            .unwrap();
        assert!(ok.allowed);
        let warn = engine
            .admit(&Request::new("a").units("tokens", 40))
            .unwrap();
        assert!(warn.allowed);
        let no = engine
            .admit(&Request::new("a").units("tokens", 40))
            .unwrap();
        assert!(!no.allowed);
        engine.check(&Request::new("a").units("tokens", 1)).unwrap();
        engine
            .record(&Request::new("a").units("tokens", 1))
            .unwrap();
        // Bad input is an error, not a decision.
        assert!(engine.admit(&Request::new("b").units("tokens", 1)).is_err());
    });
    let m = read(&recorder);
    let d = "tollgate_decisions_total";
    let admit = ("call", "admit");
    assert_eq!(
        counter(&m, d, &[admit, ("status", "ok"), ("reason", "none")]),
        1
    );
    assert_eq!(
        counter(&m, d, &[admit, ("status", "warning"), ("reason", "none")]),
        1
    );
    assert_eq!(
        counter(
            &m,
            d,
            &[admit, ("status", "exceeded"), ("reason", "limit_exceeded")]
        ),
        1
    );
    assert_eq!(counter(&m, d, &[("call", "check")]), 1);
    assert_eq!(counter(&m, d, &[("call", "record")]), 1);
    assert_eq!(counter(&m, d, &[]), 5, "the bad request counted: {m:?}");

    // One store latency sample per store call: three admits, a check, a record.
    let samples: usize = m
        .iter()
        .filter(|(n, _, _)| n == "tollgate_store_seconds")
        .map(|(_, _, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            other => panic!("not a histogram: {other:?}"),
        })
        .sum();
    assert_eq!(samples, 5);
}

#[test]
fn store_errors_are_counted_and_decide_nothing() {
    let recorder = DebuggingRecorder::new();
    let (engine, store, _) = engine();
    metrics::with_local_recorder(&recorder, || {
        store.down.store(true, Ordering::SeqCst);
        let e = engine
            .admit(&Request::new("a").units("tokens", 5))
            .unwrap_err();
        assert!(matches!(e, Error::Store { .. }));
    });
    let m = read(&recorder);
    assert_eq!(
        counter(&m, "tollgate_store_errors_total", &[("call", "admit")]),
        1
    );
    assert_eq!(counter(&m, "tollgate_decisions_total", &[]), 0);
    assert_eq!(counter(&m, "tollgate_fail_open_total", &[]), 0);
}

/// `name`'s value summed over snapshots (the debugging recorder hands out
/// each change once: a snapshot resets what it read).
fn total(snaps: &[Metrics], name: &str) -> f64 {
    snaps
        .iter()
        .map(|m| match name {
            "tollgate_reservations_in_flight" => gauge(m, name),
            _ => counter(m, name, &[]) as f64,
        })
        .sum()
}

#[test]
fn reservations_in_flight_and_lease_expiries() {
    let recorder = DebuggingRecorder::new();
    let (engine, _, clock) = engine();
    let mut snaps = Vec::new();
    let in_flight = "tollgate_reservations_in_flight";
    metrics::with_local_recorder(&recorder, || {
        let ttl = Duration::from_secs(60);
        let r1 = engine
            .reserve(&Request::new("a").units("tokens", 10), ttl)
            .unwrap()
            .unwrap();
        let r2 = engine
            .reserve(&Request::new("a").units("tokens", 10), ttl)
            .unwrap()
            .unwrap();
        snaps.push(read(&recorder));
        assert_eq!(total(&snaps, in_flight), 2.0);
        engine
            .commit(&r1, &Request::new("a").units("tokens", 5))
            .unwrap();
        snaps.push(read(&recorder));
        assert_eq!(total(&snaps, in_flight), 1.0);
        // r2's lease runs out; settling it finds it expired.
        clock.advance(Duration::from_secs(61));
        let e = engine
            .commit(&r2, &Request::new("a").units("tokens", 5))
            .unwrap_err();
        assert!(matches!(e, Error::ReservationExpired { .. }));
        // Found expired again: the same expiry, not counted twice.
        let e = engine
            .release(&r2, tollgate::Outcome::Cancelled)
            .unwrap_err();
        assert!(matches!(e, Error::ReservationExpired { .. }));
        snaps.push(read(&recorder));
    });
    assert_eq!(total(&snaps, in_flight), 0.0);
    assert_eq!(total(&snaps, "tollgate_lease_expired_total"), 1.0);
    let all: Vec<_> = snaps.into_iter().flatten().collect();
    assert_eq!(
        counter(
            &all,
            "tollgate_lease_expired_total",
            &[("call", "commit"), ("found", "call")]
        ),
        1
    );
    assert_eq!(
        counter(&all, "tollgate_decisions_total", &[("call", "reserve")]),
        2
    );
    assert_eq!(
        counter(&all, "tollgate_decisions_total", &[("call", "commit")]),
        1
    );
}

#[test]
fn a_lease_never_settled_is_counted_once_by_the_sweep() {
    let recorder = DebuggingRecorder::new();
    let (engine, store, clock) = engine();
    let mut snaps = Vec::new();
    let in_flight = "tollgate_reservations_in_flight";
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 9, 0, 0).unwrap();
    metrics::with_local_recorder(&recorder, || {
        let ttl = Duration::from_secs(60);
        let r = engine
            .reserve(&Request::new("a").units("tokens", 10), ttl)
            .unwrap()
            .unwrap();
        snaps.push(read(&recorder));
        assert_eq!(total(&snaps, in_flight), 1.0);
        clock.advance(Duration::from_secs(61));
        // Nobody settles it; the memory store's sweep finds it expired.
        store.inner.reclaim(start + chrono::Duration::seconds(61));
        snaps.push(read(&recorder));
        assert_eq!(total(&snaps, in_flight), 0.0);
        assert_eq!(total(&snaps, "tollgate_lease_expired_total"), 1.0);
        // A later sweep, and a call finding it expired, count nothing more.
        store.inner.reclaim(start + chrono::Duration::seconds(62));
        let e = engine
            .commit(&r, &Request::new("a").units("tokens", 5))
            .unwrap_err();
        assert!(matches!(e, Error::ReservationExpired { .. }));
        snaps.push(read(&recorder));
    });
    assert_eq!(total(&snaps, in_flight), 0.0);
    assert_eq!(total(&snaps, "tollgate_lease_expired_total"), 1.0);
    let all: Vec<_> = snaps.into_iter().flatten().collect();
    assert_eq!(
        counter(
            &all,
            "tollgate_lease_expired_total",
            &[("call", "none"), ("found", "sweep")]
        ),
        1
    );
}

#[test]
fn a_call_found_expiry_is_not_counted_again_by_the_sweep() {
    let recorder = DebuggingRecorder::new();
    let (engine, store, clock) = engine();
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 9, 0, 0).unwrap();
    metrics::with_local_recorder(&recorder, || {
        let mut r = engine
            .reserve(
                &Request::new("a").units("tokens", 10),
                Duration::from_secs(60),
            )
            .unwrap()
            .unwrap();
        clock.advance(Duration::from_secs(61));
        let e = engine.renew(&mut r, Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, Error::ReservationExpired { .. }));
        store.inner.reclaim(start + chrono::Duration::seconds(61));
    });
    let m = read(&recorder);
    assert_eq!(gauge(&m, "tollgate_reservations_in_flight"), 0.0);
    assert_eq!(counter(&m, "tollgate_lease_expired_total", &[]), 1);
    assert_eq!(
        counter(
            &m,
            "tollgate_lease_expired_total",
            &[("call", "renew"), ("found", "call")]
        ),
        1
    );
}

#[test]
fn renew_and_usage_time_their_store_calls() {
    let recorder = DebuggingRecorder::new();
    let (engine, store, _) = engine();
    metrics::with_local_recorder(&recorder, || {
        let mut r = engine
            .reserve(
                &Request::new("a").units("tokens", 10),
                Duration::from_secs(60),
            )
            .unwrap()
            .unwrap();
        engine.renew(&mut r, Duration::from_secs(120)).unwrap();
        engine.usage("a").unwrap();
        store.down.store(true, Ordering::SeqCst);
        assert!(engine.usage("a").is_err());
        assert!(engine.renew(&mut r, Duration::from_secs(120)).is_err());
    });
    let m = read(&recorder);
    let samples = |call: &str| -> usize {
        m.iter()
            .filter(|(n, l, _)| {
                n == "tollgate_store_seconds" && l.iter().any(|(k, v)| k == "call" && v == call)
            })
            .map(|(_, _, v)| match v {
                DebugValue::Histogram(h) => h.len(),
                other => panic!("not a histogram: {other:?}"),
            })
            .sum()
    };
    assert_eq!(samples("renew"), 2);
    assert_eq!(samples("usage"), 2);
    for call in ["renew", "usage"] {
        assert_eq!(
            counter(&m, "tollgate_store_errors_total", &[("call", call)]),
            1
        );
        // They decide nothing.
        assert_eq!(
            counter(&m, "tollgate_decisions_total", &[("call", call)]),
            0
        );
    }
}

/// An async store that is down, and fails open; `.0`: whether its calls
/// leave without an answer (outcome unknown) rather than being refused.
#[cfg(feature = "async")]
#[derive(Debug)]
struct DownOpen(bool);

#[cfg(feature = "async")]
#[async_trait::async_trait]
impl tollgate::store::AsyncAllowanceStore for DownOpen {
    async fn apply(&self, _: &Batch<'_>) -> Result<Applied, Error> {
        let message = "down".to_owned();
        Err(if self.0 {
            Error::StoreOutcomeUnknown {
                message,
                event: None,
            }
        } else {
            Error::Store { message }
        })
    }

    async fn overdue(&self, _: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        Ok(Vec::new())
    }

    fn failure_policy(&self) -> tollgate::store::FailurePolicy {
        tollgate::store::FailurePolicy::FailOpen
    }
}

#[cfg(feature = "async")]
#[test]
fn a_fail_open_decision_is_counted() {
    let recorder = DebuggingRecorder::new();
    let (sync_engine, _, clock) = engine();
    let engine = Engine::with_store_and_clock(
        sync_engine.catalog().clone(),
        DownOpen(false),
        clock.clone(),
    );
    engine.allocate(Allocation::new("a", "p")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let d = engine
                .admit_async(&Request::new("a").units("tokens", 5))
                .await
                .unwrap();
            assert!(d.allowed && d.allowed_on_error);
        });
    });
    let m = read(&recorder);
    assert_eq!(
        counter(&m, "tollgate_fail_open_total", &[("call", "admit")]),
        1
    );
    assert_eq!(
        counter(&m, "tollgate_store_errors_total", &[("call", "admit")]),
        1
    );
    assert_eq!(
        counter(&m, "tollgate_decisions_total", &[("call", "admit")]),
        1
    );
}

#[cfg(feature = "async")]
#[test]
fn an_unknown_outcome_is_counted() {
    let recorder = DebuggingRecorder::new();
    let (sync_engine, _, clock) = engine();
    let engine = Engine::with_store_and_clock(sync_engine.catalog().clone(), DownOpen(true), clock);
    engine.allocate(Allocation::new("a", "p")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let d = engine
                .admit_async(&Request::new("a").units("tokens", 5).event("e-1"))
                .await
                .unwrap();
            assert!(d.allowed && d.allowed_on_error);
            assert_eq!(d.record_unknown.as_deref(), Some("e-1"));
        });
    });
    let m = read(&recorder);
    assert_eq!(
        counter(&m, "tollgate_outcome_unknown_total", &[("call", "admit")]),
        1
    );
    assert_eq!(
        counter(&m, "tollgate_fail_open_total", &[("call", "admit")]),
        1
    );
}

#[cfg(feature = "async")]
#[test]
fn an_unknown_outcome_of_a_reservation_call_is_counted() {
    let recorder = DebuggingRecorder::new();
    let (sync_engine, _, clock) = engine();
    // A reservation for the settling calls, opened on a store that works.
    let r = sync_engine
        .reserve(
            &Request::new("a").units("tokens", 5),
            Duration::from_secs(60),
        )
        .unwrap()
        .unwrap();
    let engine = Engine::with_store_and_clock(sync_engine.catalog().clone(), DownOpen(true), clock);
    engine.allocate(Allocation::new("a", "p")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let e = engine
                .reserve_async(
                    &Request::new("a").units("tokens", 5),
                    Duration::from_secs(60),
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::StoreOutcomeUnknown { .. }));
            let mut g = r.clone();
            let more = Request::new("a").units("tokens", 1);
            assert!(engine.grow_async(&mut g, &more).await.is_err());
            let actual = Request::new("a").units("tokens", 1);
            assert!(engine.commit_async(&r, &actual).await.is_err());
            let cancelled = tollgate::Outcome::Cancelled;
            assert!(engine.release_async(&r, cancelled).await.is_err());
        });
    });
    let m = read(&recorder);
    for call in ["reserve", "grow", "commit", "release"] {
        assert_eq!(
            counter(&m, "tollgate_outcome_unknown_total", &[("call", call)]),
            1,
            "{call}"
        );
    }
    // Reservations fail closed: no fail-open decision.
    assert_eq!(counter(&m, "tollgate_fail_open_total", &[]), 0);
}
