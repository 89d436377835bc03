//! Review findings on capacity leases, checked against a real Redis
//! (`TOLLGATE_REDIS_URL`; skipped without it). Each test has its own key
//! prefix. The memory-store versions, with the diagnosis, are in
//! `tests/capacity_attacks.rs`.

#[path = "support/capacity.rs"]
mod capacity;
#[path = "support/redis_env.rs"]
mod redis_env;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capacity::Dyn;
use chrono::{DateTime, Utc};
use tollgate::capacity::CapacityStore;
use tollgate::store::{
    Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo, RedisConfig, TimeSource,
};
use tollgate::{Allocation, Engine, Error, ManualClock, Window};

async fn store(url: &str, prefix: &str) -> Dyn {
    Arc::new(
        RedisConfig::new(url)
            .prefix(prefix)
            .time_source(TimeSource::Batch)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to TOLLGATE_REDIS_URL"),
    )
}

fn reader(shared: Dyn, max: u64, window: Window, clock: ManualClock) -> Engine<Dyn, ManualClock> {
    let r = Engine::with_store_and_clock(capacity::catalog(max, window), shared, clock);
    r.allocate(Allocation::new("agent", "plan")).unwrap();
    r
}

/// A host's event id starting with `tollgate:` goes to Redis (as every
/// host id does, whatever its shape), whose ledger replays its retry: it
/// counts once.
#[tokio::test]
async fn redis_host_event_id_with_engine_prefix_counts_once() {
    let Some(url) = redis_env::url() else { return };
    let prefix = redis_env::unique_prefix("review-prefix");
    let shared = store(&url, &prefix).await;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(100_000, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    let req = capacity::request(10).event("tollgate:order-42");
    assert!(engine.admit_async(&req).await.unwrap().allowed);
    assert!(engine.admit_async(&req).await.unwrap().allowed);
    cap.shutdown(clock.now_utc()).await;
    let r = reader(shared, 100_000, window, clock);
    assert_eq!(capacity::read(&r, "tokens").await, (10, 0));
}

/// Redis behind a switch that makes every call fail with `Error::Store`.
struct Down {
    inner: Dyn,
    down: AtomicBool,
}

#[async_trait]
impl AsyncAllowanceStore for Down {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        if self.down.load(Ordering::Relaxed) {
            return Err(Error::Store {
                message: "connection refused".into(),
            });
        }
        self.inner.apply(batch).await
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.inner.overdue(now).await
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.inner.failure_policy()
    }

    fn needs_event_ids(&self) -> bool {
        self.inner.needs_event_ids()
    }
}

/// One maintain pass during a Redis blip: the settle's three immediate
/// tries fail, it stays pending, the next maintain lands it, and the same
/// live replica never admits past the maximum.
#[tokio::test]
async fn redis_a_settle_that_fails_three_times_is_retried_and_never_over_admits() {
    const MAX: u64 = 1_000;
    let Some(url) = redis_env::url() else { return };
    let prefix = redis_env::unique_prefix("review-settle");
    let redis = store(&url, &prefix).await;
    let flaky = Arc::new(Down {
        inner: Arc::clone(&redis),
        down: AtomicBool::new(false),
    });
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap = Arc::new(CapacityStore::new(Arc::clone(&flaky) as Dyn, capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(MAX, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    let mut admitted = 0;
    for _ in 0..10 {
        assert!(
            engine
                .admit_async(&capacity::request(10))
                .await
                .unwrap()
                .allowed
        );
        admitted += 10;
    }
    flaky.down.store(true, Ordering::Relaxed);
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    flaky.down.store(false, Ordering::Relaxed);
    for _ in 0..60 {
        clock.advance(Duration::from_millis(100));
        cap.maintain(clock.now_utc()).await;
    }
    for _ in 0..400 {
        if engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
        {
            admitted += 10;
        }
        clock.advance(Duration::from_millis(20));
        cap.maintain(clock.now_utc()).await;
    }
    cap.shutdown(clock.now_utc()).await;
    let r = reader(redis, MAX, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!(
        "admitted {admitted}, redis used {used} held {held}, {:?}",
        cap.stats()
    );
    assert!(admitted <= MAX, "over-admitted: {admitted} > {MAX}");
}

/// The clock steps 5 s forward (lease 4 s) between two maintain calls:
/// Redis finds the slice's lease expired at its settle, and what the slice
/// admitted is charged late as plain usage, so the same replica never
/// admits past the maximum.
#[tokio::test]
async fn redis_a_forward_clock_step_charges_late_and_never_over_admits() {
    const MAX: u64 = 1_000;
    let Some(url) = redis_env::url() else { return };
    let prefix = redis_env::unique_prefix("review-step");
    let redis = store(&url, &prefix).await;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap = Arc::new(CapacityStore::new(Arc::clone(&redis), capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(MAX, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    let mut admitted = 0;
    for _ in 0..10 {
        let d = engine.admit_async(&capacity::request(10)).await.unwrap();
        assert!(d.allowed);
        admitted += 10;
    }
    clock.advance(Duration::from_secs(5));
    cap.maintain(clock.now_utc()).await;
    for _ in 0..400 {
        if engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
        {
            admitted += 10;
        }
        clock.advance(Duration::from_millis(20));
        cap.maintain(clock.now_utc()).await;
    }
    cap.shutdown(clock.now_utc()).await;
    let stats = cap.stats();
    let r = reader(redis, MAX, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!("admitted {admitted}, redis used {used} held {held}, {stats:?}");
    assert!(admitted <= MAX, "over-admitted: {admitted} > {MAX}");
    assert_eq!((used, held), (admitted, 0));
    assert_eq!((stats.late_charges, stats.lost_units), (1, 0));
}
