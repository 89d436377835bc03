//! The engine's async calls on `MemoryStore` (feature `async`): the same
//! answers as the sync calls, and the fail-open policy on a failing store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use tollgate::store::{Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, Meter, Outcome, Period,
    PlanConfig, Request, Window,
};

fn catalog() -> tollgate::Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("jobs"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    100u64,
                ))
                .limit(LimitConfig::new("jobs", Window::Concurrent, 2u64)),
        )
        .build()
        .expect("catalog")
}

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap())
}

#[tokio::test]
async fn async_calls_answer_as_the_sync_calls() {
    let sync = Engine::with_clock(catalog(), clock());
    let asy = Engine::with_clock(catalog(), clock());
    for e in [&sync, &asy] {
        e.allocate(Allocation::new("a", "plan")).unwrap();
        e.allocate(Allocation::new("b", "plan")).unwrap();
    }
    for n in [30u64, 50, 30, 0, 20] {
        let req = Request::new("a").units("tokens", n);
        assert_eq!(
            sync.check(&req).unwrap(),
            asy.check_async(&req).await.unwrap()
        );
        assert_eq!(
            sync.admit(&req).unwrap(),
            asy.admit_async(&req).await.unwrap()
        );
    }
    let req = Request::new("a").units("tokens", 7).event("e1");
    assert_eq!(
        sync.record(&req).unwrap(),
        asy.record_async(&req).await.unwrap()
    );
    assert_eq!(
        sync.record(&req).unwrap(),
        asy.record_async(&req).await.unwrap()
    );

    let ttl = Duration::from_secs(60);
    let r = Request::new("b").units("tokens", 1);
    let mut s = sync.reserve(&r, ttl).unwrap().unwrap();
    let mut a = asy.reserve_async(&r, ttl).await.unwrap().unwrap();
    assert_eq!(s.decision(), a.decision());
    assert_eq!(
        sync.grow(&mut s, &r).unwrap(),
        asy.grow_async(&mut a, &r).await.unwrap()
    );
    sync.renew(&mut s, ttl).unwrap();
    asy.renew_async(&mut a, ttl).await.unwrap();
    assert_eq!(
        sync.release(&s, Outcome::Failed).unwrap(),
        asy.release_async(&a, Outcome::Failed).await.unwrap()
    );
    let s = sync.reserve(&r, ttl).unwrap().unwrap();
    let a = asy.reserve_async(&r, ttl).await.unwrap().unwrap();
    assert_eq!(
        sync.commit(&s, &r).unwrap(),
        asy.commit_async(&a, &r).await.unwrap()
    );
    assert_eq!(sync.overdue().unwrap(), asy.overdue_async().await.unwrap());
    assert!(matches!(
        asy.admit_async(&Request::new("nobody").units("tokens", 1))
            .await,
        Err(Error::UnknownSubject { .. })
    ));
}

/// A store that always fails, with a chosen policy.
struct Down(FailurePolicy);

#[async_trait]
impl AsyncAllowanceStore for Down {
    async fn apply(&self, _: &Batch<'_>) -> Result<Applied, Error> {
        Err(Error::Store {
            message: "down".into(),
        })
    }
    async fn overdue(&self, _: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        Err(Error::Store {
            message: "down".into(),
        })
    }
    fn failure_policy(&self) -> FailurePolicy {
        self.0
    }
}

#[tokio::test]
async fn a_failing_store_fails_closed_or_open_as_configured() {
    let closed = Engine::with_store_and_clock(catalog(), Down(FailurePolicy::FailClosed), clock());
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let open = Engine::with_store_and_clock(catalog(), Down(FailurePolicy::FailOpen), clock())
        .with_observer(move |e: &tollgate::DecisionEvent<'_>| {
            if e.decision.allowed && e.decision.allowed_on_error {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    for e in [&closed, &open] {
        e.allocate(Allocation::new("a", "plan")).unwrap();
    }
    let req = Request::new("a").units("tokens", 1_000);
    assert!(matches!(
        closed.admit_async(&req).await,
        Err(Error::Store { .. })
    ));
    let d = open.admit_async(&req).await.unwrap();
    assert!(d.allowed && d.allowed_on_error && !d.recorded && d.limits.is_empty());
    assert!(open.check_async(&req).await.unwrap().allowed_on_error);
    assert!(open.record_async(&req).await.unwrap().allowed_on_error);
    assert_eq!(seen.load(Ordering::Relaxed), 3);
    // Reservations and bad input are never made up.
    assert!(open
        .reserve_async(&req, Duration::from_secs(1))
        .await
        .is_err());
    assert!(matches!(
        open.admit_async(&Request::new("a").units("nope", 1)).await,
        Err(Error::UnknownMeter { .. })
    ));
    assert!(open.overdue_async().await.is_err());
}

/// `usage_async` reports what `usage` reports, records nothing, and fails
/// as `usage` does (an unknown subject; a failing store whatever its
/// policy: a report is never made up).
#[tokio::test]
async fn usage_async_reports_as_usage_does() {
    let sync = Engine::with_clock(catalog(), clock());
    let asy = Engine::with_clock(catalog(), clock());
    for e in [&sync, &asy] {
        e.allocate(Allocation::new("a", "plan")).unwrap();
    }
    assert_eq!(
        sync.usage("a").unwrap(),
        asy.usage_async("a").await.unwrap()
    );
    let ttl = Duration::from_secs(60);
    let r = Request::new("a").units("tokens", 30).units("jobs", 1);
    sync.admit(&Request::new("a").units("tokens", 40)).unwrap();
    asy.admit_async(&Request::new("a").units("tokens", 40))
        .await
        .unwrap();
    let _s = sync.reserve(&r, ttl).unwrap().unwrap();
    let _a = asy.reserve_async(&r, ttl).await.unwrap().unwrap();
    let report = asy.usage_async("a").await.unwrap();
    assert_eq!(sync.usage("a").unwrap(), report);
    let tokens = report
        .meters
        .iter()
        .find(|m| &*m.meter == "tokens")
        .unwrap();
    assert_eq!(tokens.units.to_string(), "40");
    assert_eq!(tokens.held.to_string(), "30");
    // Reading recorded nothing.
    assert_eq!(asy.usage_async("a").await.unwrap(), report);
    assert!(matches!(
        asy.usage_async("nobody").await,
        Err(Error::UnknownSubject { .. })
    ));
    for policy in [FailurePolicy::FailClosed, FailurePolicy::FailOpen] {
        let down = Engine::with_store_and_clock(catalog(), Down(policy), clock());
        down.allocate(Allocation::new("a", "plan")).unwrap();
        assert!(matches!(
            down.usage_async("a").await,
            Err(Error::Store { .. })
        ));
    }
}

/// A plan spending a prepaid balance never fails open on a priced request:
/// that would hand out the money the balance guards.
#[tokio::test]
async fn a_prepaid_balance_never_fails_open() {
    let catalog: tollgate::Catalog = serde_json::from_str(
        r#"{"meters": [{"id": "tokens", "unit": "count"},
                       {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 2}}}],
            "plans": [{"id": "payg", "cost_meter": "cost", "balance": {},
                       "prices": {"tokens": "0.01"},
                       "limits": [{"meter": "tokens", "window": "lifetime", "max": -1}]}]}"#,
    )
    .unwrap();
    let open = Engine::with_store_and_clock(catalog, Down(FailurePolicy::FailOpen), clock());
    open.allocate(Allocation::new("a", "payg")).unwrap();
    let priced = Request::new("a").units("tokens", 5);
    assert!(matches!(
        open.admit_async(&priced).await,
        Err(Error::Store { .. })
    ));
    assert!(matches!(
        open.record_async(&priced).await,
        Err(Error::Store { .. })
    ));
    // Nothing to pay: the store's policy applies.
    let free = Request::new("a").units("tokens", 0);
    assert!(open.admit_async(&free).await.unwrap().allowed_on_error);
}

/// `EventKey::engine_made` is set on the batch of an admit, record or
/// commit whose id the async engine made for that very call, and on no
/// other: a host's id, and the host's retry with an id an unknown outcome
/// named, are unmarked.
#[tokio::test]
async fn only_the_ids_the_engine_makes_are_marked_engine_made() {
    #[derive(Default)]
    struct Marks {
        inner: tollgate::MemoryStore,
        seen: std::sync::Mutex<Vec<(String, bool)>>,
    }
    #[async_trait]
    impl AsyncAllowanceStore for Marks {
        async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
            if let Some(e) = batch.event {
                self.seen
                    .lock()
                    .unwrap()
                    .push((e.id.to_owned(), e.engine_made()));
            }
            AsyncAllowanceStore::apply(&self.inner, batch).await
        }
        async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
            AsyncAllowanceStore::overdue(&self.inner, now).await
        }
        fn needs_event_ids(&self) -> bool {
            true
        }
    }
    let store = Arc::new(Marks::default());
    let engine = Engine::with_store_and_clock(catalog(), Arc::clone(&store), clock());
    engine.allocate(Allocation::new("a", "plan")).unwrap();
    let req = Request::new("a").units("tokens", 1);
    engine.admit_async(&req).await.unwrap();
    engine.record_async(&req).await.unwrap();
    let r = engine
        .reserve_async(&req, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    engine.commit_async(&r, &req).await.unwrap();
    let made: Vec<String> = store
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        made.len(),
        3,
        "admit, record and commit carried ids: {made:?}"
    );
    assert!(store.seen.lock().unwrap().iter().all(|(_, m)| *m));
    store.seen.lock().unwrap().clear();
    // The host's own id, and its retry with an id the engine made.
    engine
        .admit_async(&req.clone().event("host-1"))
        .await
        .unwrap();
    engine
        .admit_async(&req.clone().event(&made[0]))
        .await
        .unwrap();
    let seen = store.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, m)| !m), "{seen:?}");
}
