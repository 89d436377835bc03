//! The storage seam from outside the crate, as a backend author sees it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tollgate::store::{Applied, Batch, CounterState, Mode};
use tollgate::{
    Allocation, AllowanceStore, CatalogConfig, Engine, Error, LimitConfig, ManualClock,
    MemoryStore, Meter, Period, PlanConfig, Request, Window,
};

fn catalog() -> tollgate::Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("jobs"))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    100u64,
                ))
                .limit(LimitConfig::new(
                    "jobs",
                    Window::calendar(Period::Month),
                    5u64,
                )),
        )
        .build()
        .unwrap()
}

fn clock() -> ManualClock {
    use chrono::TimeZone;
    ManualClock::new(chrono::Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap())
}

/// Delegates to a memory store and counts calls and modes.
#[derive(Default)]
struct Counting {
    inner: MemoryStore,
    calls: AtomicUsize,
    last_ops: AtomicUsize,
}

impl AllowanceStore for Counting {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.last_ops.store(batch.ops.len(), Ordering::SeqCst);
        self.inner.apply(batch)
    }
    fn overdue(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<tollgate::LeaseInfo>, Error> {
        self.inner.overdue(now)
    }
}

#[test]
fn one_store_call_per_decision_and_none_for_bad_input() {
    let store = Arc::new(Counting::default());
    let e = Engine::with_store_and_clock(catalog(), store.clone(), clock());
    e.allocate(Allocation::new("a", "p")).unwrap();
    let req = Request::new("a").units("tokens", 10).units("jobs", 1);
    e.check(&req).unwrap();
    e.admit(&req).unwrap();
    e.record(&req).unwrap();
    e.usage("a").unwrap();
    assert_eq!(store.calls.load(Ordering::SeqCst), 4, "one round trip each");
    assert_eq!(
        store.last_ops.load(Ordering::SeqCst),
        2,
        "usage reads both limits"
    );
    // Bad input is refused before the store is asked.
    assert!(e.admit(&Request::new("nobody").units("tokens", 1)).is_err());
    assert!(e.admit(&Request::new("a").units("nope", 1)).is_err());
    assert_eq!(store.calls.load(Ordering::SeqCst), 4);
}

/// A backend whose database is down.
struct Down;

impl AllowanceStore for Down {
    fn apply(&self, _: &Batch<'_>) -> Result<Applied, Error> {
        Err(Error::Store {
            message: "connection refused".into(),
        })
    }
    fn overdue(&self, _: chrono::DateTime<chrono::Utc>) -> Result<Vec<tollgate::LeaseInfo>, Error> {
        Err(Error::Store {
            message: "connection refused".into(),
        })
    }
}

#[test]
fn a_failing_store_is_an_error_and_the_observer_sees_no_decision() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let e = Engine::with_store_and_clock(catalog(), Down, clock()).with_observer(
        move |_: &tollgate::DecisionEvent<'_>| {
            s.fetch_add(1, Ordering::SeqCst);
        },
    );
    e.allocate(Allocation::new("a", "p")).unwrap();
    let err = e.admit(&Request::new("a").units("tokens", 1)).unwrap_err();
    assert!(matches!(err, Error::Store { .. }));
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

/// A backend that answers with the wrong number of counters.
struct Short;

impl AllowanceStore for Short {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let mut out = Applied::default();
        out.applied = batch.mode != Mode::Check;
        let mut state = CounterState::default();
        state.used = 1;
        out.counters = vec![state; batch.ops.len().saturating_sub(1)].into();
        Ok(out)
    }
    fn overdue(&self, _: chrono::DateTime<chrono::Utc>) -> Result<Vec<tollgate::LeaseInfo>, Error> {
        Ok(Vec::new())
    }
}

#[test]
fn a_store_that_breaks_the_contract_is_reported_not_trusted() {
    let e = Engine::with_store_and_clock(catalog(), Short, clock());
    e.allocate(Allocation::new("a", "p")).unwrap();
    let err = e
        .admit(&Request::new("a").units("tokens", 1).units("jobs", 1))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Store { message } if message.contains("1 counters for 2 ops")),
        "{err:?}"
    );
    // The usage report is not built from a short answer either.
    assert!(matches!(e.usage("a"), Err(Error::Store { .. })));
}
