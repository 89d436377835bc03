//! Capacity leases (`tollgate::capacity`) over the in-process
//! `MemoryStore`: the shared scenarios that need no server, and the
//! configuration's checks. The same scenarios run against Redis
//! (`capacity_redis.rs`) and PostgreSQL (`capacity_postgres.rs`).

#[path = "support/capacity.rs"]
mod capacity;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capacity::Dyn;
use chrono::{DateTime, Utc};
use tollgate::capacity::{CapacityConfig, CapacityStore};
use tollgate::store::{Applied, AsyncAllowanceStore, Batch, LeaseInfo, MemoryStore, Mode};
use tollgate::{Allocation, Engine, Error, ManualClock, Outcome, Period, Snapshot, Window};

fn memory() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_over_admits_on_memory() {
    let shared = memory();
    let stores: Vec<Dyn> = (0..8).map(|_| Arc::clone(&shared) as Dyn).collect();
    let out = capacity::never_over_admits(stores, shared as Dyn).await;
    eprintln!("memory: {out:?}");
}

#[tokio::test]
async fn killed_replica_on_memory() {
    let shared = memory();
    capacity::killed_replica_loses_nothing_past_expiry(Arc::clone(&shared) as Dyn, shared as Dyn)
        .await;
}

#[tokio::test]
async fn round_trips_and_lag_on_memory() {
    let out = capacity::round_trips_and_lag(memory() as Dyn).await;
    eprintln!("memory: {out:?}");
}

#[tokio::test]
async fn period_roll_on_memory() {
    capacity::period_roll_gives_back(memory() as Dyn).await;
}

#[tokio::test]
async fn evented_and_reservations_on_memory() {
    capacity::evented_and_reservations_are_exact(memory() as Dyn).await;
}

#[tokio::test]
async fn near_the_limit_on_memory() {
    capacity::near_the_limit_goes_to_the_store(memory() as Dyn).await;
}

#[test]
fn a_bad_config_is_a_typed_error_and_changes_nothing() {
    let bad = [
        ("capacity.replicas", CapacityConfig::new().replicas(0)),
        (
            "capacity.top_up_interval",
            CapacityConfig::new().top_up_interval(Duration::ZERO),
        ),
        (
            "capacity.lease_ttl",
            CapacityConfig::new().lease_ttl(Duration::from_millis(399)),
        ),
        (
            "capacity.min_slice_decisions",
            CapacityConfig::new().min_slice_decisions(0),
        ),
        (
            "capacity.slice_decisions",
            CapacityConfig::new().slice_decisions(3),
        ),
        ("capacity.max_shapes", CapacityConfig::new().max_shapes(0)),
    ];
    let store = memory();
    let before: Snapshot = store.snapshot();
    for (field, config) in bad {
        match CapacityStore::new(Arc::clone(&store), config) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert_eq!(store.snapshot(), before, "the store is untouched");
    assert!(CapacityStore::new(store, CapacityConfig::new()).is_ok());
}

/// A store that applies the next plain admit it is given, then answers
/// that its outcome is unknown (a timeout after the call left), as a
/// network store may; it asks for engine event ids.
struct Flaky {
    inner: MemoryStore,
    fail_next: AtomicBool,
}

#[async_trait]
impl AsyncAllowanceStore for Flaky {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let a = AsyncAllowanceStore::apply(&self.inner, batch).await?;
        if batch.lease.is_none()
            && batch.mode == Mode::WithinLimits
            && self.fail_next.swap(false, Ordering::Relaxed)
        {
            return Err(Error::StoreOutcomeUnknown {
                message: "timed out".into(),
                event: batch.event.map(|e| e.id.to_owned()),
            });
        }
        Ok(a)
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        AsyncAllowanceStore::overdue(&self.inner, now).await
    }

    fn needs_event_ids(&self) -> bool {
        true
    }
}

/// An admit that went to the store and came back unknown is retried with
/// the event id the engine made for it; by then the shape could slice
/// again, but the retry goes to the store, whose ledger counts it once.
#[tokio::test]
async fn a_retry_after_an_unknown_outcome_counts_once() {
    let flaky = Arc::new(Flaky {
        inner: MemoryStore::new(),
        fail_next: AtomicBool::new(false),
    });
    let clock = ManualClock::new(capacity::t0());
    let window = Window::calendar(Period::Month);
    let other = Engine::with_store_and_clock(
        capacity::catalog(1_000, window),
        Arc::clone(&flaky),
        clock.clone(),
    );
    other.allocate(Allocation::new("agent", "plan")).unwrap();
    let cap = Arc::new(CapacityStore::new(Arc::clone(&flaky), capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(1_000, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    // Another replica holds 990: too little is left to share, so this
    // admit goes straight to the store, which applies it and times out.
    let held = other
        .reserve_async(&capacity::request(990), Duration::from_secs(60))
        .await
        .unwrap()
        .expect("reserved");
    flaky.fail_next.store(true, Ordering::Relaxed);
    let id = match engine.admit_async(&capacity::request(3)).await {
        Err(Error::StoreOutcomeUnknown {
            event: Some(id), ..
        }) => id,
        other => panic!("expected an unknown outcome with an event id, got {other:?}"),
    };
    assert!(id.starts_with("tollgate:"), "{id}");
    // Room again, and past the straight-to-the-store interval.
    other
        .release_async(&held, Outcome::Cancelled)
        .await
        .unwrap();
    clock.advance(Duration::from_millis(500));
    let retry = capacity::request(3).event(&id);
    assert!(engine.admit_async(&retry).await.unwrap().allowed);
    cap.shutdown(clock.now_utc()).await;
    let report = other.usage_async("agent").await.unwrap();
    let tokens = report
        .meters
        .iter()
        .find(|m| m.meter.as_str() == "tokens")
        .unwrap();
    assert_eq!(tokens.units, 3.into(), "the retry counted once");
}

/// A check the slice covers is answered locally; after `shutdown` every
/// batch goes to the store.
#[tokio::test]
async fn checks_from_the_slice_and_shutdown_sends_all_to_the_store() {
    let shared = memory();
    let clock = ManualClock::new(capacity::t0());
    let window = Window::calendar(Period::Month);
    let cap = Arc::new(CapacityStore::new(Arc::clone(&shared) as Dyn, capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(100_000, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    assert!(
        engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
    );
    let d = engine.check_async(&capacity::request(10)).await.unwrap();
    assert!(d.allowed);
    assert_eq!(cap.stats().local_checks, 1);
    cap.shutdown(clock.now_utc()).await;
    let before = cap.stats();
    assert!(
        engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
    );
    let after = cap.stats();
    assert_eq!(after.local_admits, before.local_admits);
    assert_eq!(after.passed_through, before.passed_through + 1);
    let reader: Engine<Dyn, ManualClock> =
        Engine::with_store_and_clock(capacity::catalog(100_000, window), shared, clock);
    reader.allocate(Allocation::new("agent", "plan")).unwrap();
    assert_eq!(capacity::read(&reader, "tokens").await, (20, 0));
}

/// Four engines on one memory store, driven one step at a time from a
/// seeded generator: admits of random sizes, `maintain` on one engine,
/// the clock moving (with every engine's `maintain` run, as a host's
/// background task would, at least every top-up interval), and an engine
/// restarted (shut down, made anew). After every step: what was admitted
/// is at most the maximum, and the store counts it all — as usage, or
/// inside the holds of slices not settled yet. At the end, after
/// `shutdown`, usage equals what was admitted and nothing is held.
#[tokio::test]
async fn random_interleavings_never_over_admit() {
    const MAX: u64 = 5_000;
    let window = Window::Lifetime;
    for seed in 1..=12u64 {
        let shared = memory();
        let clock = ManualClock::new(capacity::t0());
        let make = || {
            let cap = Arc::new(
                CapacityStore::new(Arc::clone(&shared) as Dyn, capacity::config()).unwrap(),
            );
            let e = Engine::with_store_and_clock(
                capacity::catalog(MAX, window),
                Arc::clone(&cap),
                clock.clone(),
            );
            e.allocate(Allocation::new("agent", "plan")).unwrap();
            (cap, e)
        };
        let mut engines: Vec<_> = (0..4).map(|_| make()).collect();
        let reader: Engine<Dyn, ManualClock> = Engine::with_store_and_clock(
            capacity::catalog(MAX, window),
            Arc::clone(&shared) as Dyn,
            clock.clone(),
        );
        reader.allocate(Allocation::new("agent", "plan")).unwrap();
        let mut rng = capacity::Rng::new(seed);
        let mut admitted = 0u64;
        for step in 0..1_500 {
            let i = rng.below(4) as usize;
            match rng.below(100) {
                0..=69 => {
                    let size = 1 + rng.below(60);
                    let d = engines[i]
                        .1
                        .admit_async(&capacity::request(size))
                        .await
                        .unwrap();
                    if d.allowed {
                        admitted += size;
                    }
                }
                70..=84 => engines[i].0.maintain(clock.now_utc()).await,
                85..=96 => {
                    clock.advance(Duration::from_millis(rng.below(101)));
                    for (cap, _) in &engines {
                        cap.maintain(clock.now_utc()).await;
                    }
                }
                _ => {
                    engines[i].0.shutdown(clock.now_utc()).await;
                    engines[i] = make();
                }
            }
            let (used, held) = capacity::read(&reader, "tokens").await;
            assert!(
                admitted <= MAX,
                "seed {seed} step {step}: over-admitted {admitted}"
            );
            assert!(
                used <= admitted && admitted <= used + held,
                "seed {seed} step {step}: used {used} held {held} admitted {admitted}"
            );
        }
        for (cap, _) in &engines {
            cap.shutdown(clock.now_utc()).await;
            assert_eq!(cap.stats().lost_units, 0, "seed {seed}");
        }
        assert_eq!(
            capacity::read(&reader, "tokens").await,
            (admitted, 0),
            "seed {seed}"
        );
    }
}

/// Amounts near `u64::MAX`: no panic, no wrap, never past the maximum.
#[tokio::test]
async fn huge_amounts_neither_panic_nor_over_admit() {
    const MAX: u64 = u64::MAX / 2;
    let shared = memory();
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap = Arc::new(CapacityStore::new(Arc::clone(&shared) as Dyn, capacity::config()).unwrap());
    let engine = Engine::with_store_and_clock(
        capacity::catalog(MAX, window),
        Arc::clone(&cap),
        clock.clone(),
    );
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    let mut admitted = 0u64;
    for size in [
        u64::MAX / 8,
        u64::MAX / 8,
        u64::MAX / 4,
        u64::MAX,
        1,
        u64::MAX / 8,
    ] {
        if let Ok(d) = engine.admit_async(&capacity::request(size)).await {
            if d.allowed {
                admitted += size;
            }
        }
        cap.maintain(clock.now_utc()).await;
    }
    cap.shutdown(clock.now_utc()).await;
    let reader: Engine<Dyn, ManualClock> =
        Engine::with_store_and_clock(capacity::catalog(MAX, window), shared, clock);
    reader.allocate(Allocation::new("agent", "plan")).unwrap();
    let (used, held) = capacity::read(&reader, "tokens").await;
    assert!(admitted <= MAX);
    assert_eq!((used, held), (admitted, 0));
    assert_eq!(cap.stats().lost_units, 0);
}

#[tokio::test]
async fn one_maintain_settles_many_subjects_on_memory() {
    capacity::one_maintain_settles_many_subjects(memory() as Dyn).await;
}
