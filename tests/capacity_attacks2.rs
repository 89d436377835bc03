//! Second adversarial review of capacity leases (`tollgate::capacity`),
//! attacking the first review's fixes (pending settles, late charges,
//! engine-made ids, give-back), kept as regression tests of the fixes:
//! drop guards for busy shapes and for settles under way, a bounded
//! `shutdown`, the engine's own mark on the ids it makes
//! (`EventKey::engine_made`), and uncertain settles. Every test states the
//! promise it checks. Feature `async`;
//! `cargo test --all-features --test capacity_attacks2`.

#[path = "support/capacity.rs"]
mod capacity;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capacity::Dyn;
use chrono::{DateTime, Utc};
use tollgate::capacity::CapacityStore;
use tollgate::store::{
    Applied, AsyncAllowanceStore, Batch, LeaseAction, LeaseInfo, MemoryStore, Mode,
};
use tollgate::{Allocation, Engine, Error, ManualClock, Outcome, Window};

/// A wrapper over a `MemoryStore` with switches. It asks for engine event
/// ids, as Redis and PostgreSQL do.
#[derive(Default)]
struct Gate {
    inner: MemoryStore,
    /// Every call fails with `Error::Store` (nothing applied).
    down: AtomicBool,
    /// Lease grows never answer (a hung connection).
    stall_grow: AtomicBool,
    /// Lease settles never answer (a hung connection).
    stall_settle: AtomicBool,
    /// The next N settles are applied and answered `StoreOutcomeUnknown`.
    settle_unknown: AtomicU64,
    /// The next N plain admits are applied and answered unknown.
    apply_then_unknown: AtomicU64,
    /// After a settle answered unknown, go down.
    down_after_unknown_settle: AtomicBool,
    /// The next N settles fail with `Error::Store` (nothing applied).
    settle_fail: AtomicU64,
}

impl Gate {
    fn with_horizon(h: Duration) -> Self {
        Self {
            inner: MemoryStore::new().with_event_horizon(h),
            ..Self::default()
        }
    }
}

fn take_one(c: &AtomicU64) -> bool {
    c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl AsyncAllowanceStore for Gate {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        if self.down.load(Ordering::Relaxed) {
            return Err(Error::Store {
                message: "connection refused".into(),
            });
        }
        let action = batch.lease.map(|l| l.action);
        let unknown = || Error::StoreOutcomeUnknown {
            message: "timed out".into(),
            event: batch.event.map(|e| e.id.to_owned()),
        };
        match action {
            Some(LeaseAction::Grow) if self.stall_grow.load(Ordering::Relaxed) => {
                std::future::pending::<()>().await;
            }
            Some(LeaseAction::Settle { .. }) if self.stall_settle.load(Ordering::Relaxed) => {
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        if matches!(action, Some(LeaseAction::Settle { .. })) && take_one(&self.settle_fail) {
            return Err(Error::Store {
                message: "connection reset".into(),
            });
        }
        let a = AsyncAllowanceStore::apply(&self.inner, batch).await?;
        if matches!(action, Some(LeaseAction::Settle { .. })) && take_one(&self.settle_unknown) {
            if self.down_after_unknown_settle.load(Ordering::Relaxed) {
                self.down.store(true, Ordering::Relaxed);
            }
            return Err(unknown());
        }
        if action.is_none()
            && batch.mode == Mode::WithinLimits
            && take_one(&self.apply_then_unknown)
        {
            return Err(unknown());
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

type Cap = Arc<CapacityStore<Dyn>>;

fn engine_on(cap: &Cap, max: u64, window: Window, clock: &ManualClock) -> Engine<Cap, ManualClock> {
    let e = Engine::with_store_and_clock(
        capacity::catalog(max, window),
        Arc::clone(cap),
        clock.clone(),
    );
    e.allocate(Allocation::new("agent", "plan")).unwrap();
    e
}

fn reader(shared: Dyn, max: u64, window: Window, clock: ManualClock) -> Engine<Dyn, ManualClock> {
    let r = Engine::with_store_and_clock(capacity::catalog(max, window), shared, clock);
    r.allocate(Allocation::new("agent", "plan")).unwrap();
    r
}

/// Promise: "`shutdown` … give[s] every slice back"; "nothing held after
/// shutdown". An admit future dropped while its slice grows (a request
/// timeout, a client that hung up: tower/axum drop the handler's future)
/// used to leave the shape marked busy forever: `maintain` skipped it from then
/// on, and `shutdown` spun waiting for it. The busy mark is now a drop
/// guard: the shape is freed, `maintain` goes on with it and `shutdown`
/// returns with nothing held.
#[tokio::test]
async fn a_cancelled_grow_frees_the_shape_and_shutdown_returns() {
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = engine_on(&cap, 100_000, window, &clock);
    assert!(
        engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
    );
    // A request the slice does not cover grows the lease; the store hangs
    // and the host's timeout drops the admit's future.
    gate.stall_grow.store(true, Ordering::Relaxed);
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        engine.admit_async(&capacity::request(1_000)),
    )
    .await;
    assert!(r.is_err(), "the admit was expected to hang");
    gate.stall_grow.store(false, Ordering::Relaxed);
    // The store is back: the store and its replica go on as documented.
    for _ in 0..5 {
        clock.advance(Duration::from_millis(100));
        cap.maintain(clock.now_utc()).await;
    }
    let done = tokio::time::timeout(Duration::from_secs(3), cap.shutdown(clock.now_utc())).await;
    let r = reader(shared, 100_000, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!("used {used} held {held} {:?}", cap.stats());
    assert!(
        done.is_ok(),
        "shutdown never returned: the shape stays busy after its admit future was dropped"
    );
    assert_eq!((used, held), (10, 0));
}

/// Promise: "counted late, never dropped"; a live replica never
/// over-admits. An admit future dropped while its slow path settles the
/// old slice (`settle` takes the lease out of the shape before the store
/// call) used to lose that slice's admissions: neither settled nor
/// pending, never charged, and once the hold expired the whole maximum
/// was admitted again. The settle under way is now owned by a guard that
/// puts it on the pending list when dropped: the next `maintain` settles
/// it and everything admitted is counted.
#[tokio::test]
async fn a_cancelled_settle_keeps_the_slices_admissions_pending() {
    const MAX: u64 = 1_000;
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = engine_on(&cap, MAX, window, &clock);
    let mut admitted = 0;
    for _ in 0..5 {
        assert!(
            engine
                .admit_async(&capacity::request(10))
                .await
                .unwrap()
                .allowed
        );
        admitted += 10;
    }
    assert_eq!(cap.stats().local_admits, 5);
    // Half the lease (4 s) passes with no maintain: the next admit settles
    // and reopens on its slow path. The settle hangs; the host's timeout
    // drops the admit.
    clock.advance(Duration::from_millis(2_100));
    gate.stall_settle.store(true, Ordering::Relaxed);
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        engine.admit_async(&capacity::request(10)),
    )
    .await;
    assert!(r.is_err(), "the admit was expected to hang");
    gate.stall_settle.store(false, Ordering::Relaxed);
    let stats = cap.stats();
    eprintln!("after the drop: {stats:?}");
    // The replica lives on, maintained as documented, past the old lease.
    for _ in 0..50 {
        clock.advance(Duration::from_millis(100));
        cap.maintain(clock.now_utc()).await;
    }
    let other = reader(Arc::clone(&shared), MAX, window, clock.clone());
    let (used, _) = capacity::read(&other, "tokens").await;
    eprintln!("admitted {admitted}, store used {used}, {:?}", cap.stats());
    assert_eq!(
        used,
        admitted,
        "admissions of a slice whose settle was cancelled are never charged (pending_settles {})",
        cap.stats().pending_settles
    );
}

/// Promise: a retry of an unknown-outcome admit with its event id counts
/// once, as on the plain shared store. Unknown-outcome ids used to be
/// remembered in one process's `CapacityStore`, so the host's retry of an
/// engine-made id on another replica (a load-balanced retry, or this one
/// after a restart) was decided locally from a slice and counted twice.
/// Now only a batch the engine marked as carrying an id it made for that
/// very call (`EventKey::engine_made`) is decided locally; the host's
/// retry, through `Request::event`, is unmarked and goes to the store's
/// ledger, on any replica.
#[tokio::test]
async fn an_unknown_admit_retried_on_another_replica_counts_once() {
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let plain = reader(Arc::clone(&shared), 1_000, window, clock.clone());
    // Near the limit, replica A's admit goes straight to the store, which
    // applies it and times out.
    let held = plain
        .reserve_async(&capacity::request(990), Duration::from_secs(60))
        .await
        .unwrap()
        .expect("reserved");
    let a: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let ea = engine_on(&a, 1_000, window, &clock);
    gate.apply_then_unknown.store(1, Ordering::Relaxed);
    let id = match ea.admit_async(&capacity::request(3)).await {
        Err(Error::StoreOutcomeUnknown {
            event: Some(id), ..
        }) => id,
        other => panic!("expected an unknown outcome, got {other:?}"),
    };
    plain
        .release_async(&held, Outcome::Cancelled)
        .await
        .unwrap();
    // The host retries with the id it was given, on replica B.
    let b: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let eb = engine_on(&b, 1_000, window, &clock);
    let retry = capacity::request(3).event(&id);
    assert!(eb.admit_async(&retry).await.unwrap().allowed);
    a.shutdown(clock.now_utc()).await;
    b.shutdown(clock.now_utc()).await;
    let (used, held) = capacity::read(&plain, "tokens").await;
    eprintln!("B: {:?}", b.stats());
    assert_eq!(
        (used, held),
        (3, 0),
        "the retry of an applied admit must count once (it does on the plain store)"
    );
}

/// Promise: a pending settle's retry "is replayed by the store's ledger,
/// never applied twice"; the late charge is for a lease that expired
/// *unsettled*. A settle that was applied but answered unknown, whose
/// retries fail until the store has forgotten both the settle's id and the
/// settled lease (its event horizon past the lease's expiry), is answered
/// `UnknownReservation`; it used to be charged again as a late charge
/// (double counted). A pending settle now remembers that a try may have
/// applied, and such a settle is counted in `uncertain_settles` instead of
/// charged again. Here the memory store's horizon is 2 s (Redis: the lease
/// record lives `horizon` past its expiry too).
#[tokio::test]
async fn a_settle_applied_unknown_then_retried_past_the_horizon_is_charged_once() {
    let gate = Arc::new(Gate::with_horizon(Duration::from_secs(2)));
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = engine_on(&cap, 100_000, window, &clock);
    let mut admitted = 0;
    for _ in 0..5 {
        assert!(
            engine
                .admit_async(&capacity::request(10))
                .await
                .unwrap()
                .allowed
        );
        admitted += 10;
    }
    // The settle lands but its answer is lost; the store then stays
    // unreachable for the two immediate retries and the next passes.
    gate.settle_unknown.store(1, Ordering::Relaxed);
    clock.advance(Duration::from_millis(100));
    gate.down_after_unknown_settle
        .store(true, Ordering::Relaxed);
    cap.maintain(clock.now_utc()).await;
    assert!(gate.down.load(Ordering::Relaxed));
    eprintln!("after the lost answer: {:?}", cap.stats());
    // The outage lasts past the lease's expiry (4 s) plus the horizon.
    for _ in 0..80 {
        clock.advance(Duration::from_millis(100));
        cap.maintain(clock.now_utc()).await;
    }
    // The store forgets ids and ended leases older than its horizon (Redis:
    // the keys' TTLs; the memory store: `reclaim`).
    gate.inner.reclaim(clock.now_utc());
    gate.down.store(false, Ordering::Relaxed);
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    cap.shutdown(clock.now_utc()).await;
    let r = reader(shared, 100_000, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!(
        "admitted {admitted}, used {used} held {held}, {:?}",
        cap.stats()
    );
    assert_eq!(
        (used, held),
        (admitted, 0),
        "a settle applied once was charged again late"
    );
    assert_eq!(cap.stats().uncertain_settles, 1);
}

/// Promise (`Request::event`): "`admit` … appl[ies] a request with an
/// event id once within the store's horizon". The capacity module used
/// to take ids of the shape `tollgate:` + 32 lowercase hex digits for its
/// engine's own, so a host whose idempotency keys had that shape
/// (`tollgate:` + an MD5/UUID-simple of its order id) had every retry
/// decided locally and counted again. No id shape is reserved now: every
/// id the host passes goes to the store.
#[tokio::test]
async fn a_host_id_of_the_engine_shape_counts_once() {
    let shared: Dyn = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = engine_on(&cap, 100_000, window, &clock);
    let req = capacity::request(10).event("tollgate:0123456789abcdef0123456789abcdef");
    assert!(engine.admit_async(&req).await.unwrap().allowed);
    assert!(engine.admit_async(&req).await.unwrap().allowed);
    cap.shutdown(clock.now_utc()).await;
    let r = reader(shared, 100_000, window, clock);
    assert_eq!(
        capacity::read(&r, "tokens").await,
        (10, 0),
        "a host's evented admit retried with the same id must count once"
    );
}

/// Held (kept as a regression test): the store fails exactly while a
/// refusal gives back this engine's other shapes' slices. One engine
/// (`replicas(1)`), three shapes on one 1,000-token counter; the first
/// two take it all; the third's refusal gives them back while the first
/// three settles fail. Admits go on to the limit; after shutdown the
/// counter equals what was admitted, at most the maximum, nothing held.
#[tokio::test]
async fn give_back_during_a_store_failure_counts_everything() {
    use tollgate::{CatalogConfig, LimitConfig, Meter, PlanConfig, Request};
    const MAX: u64 = 1_000;
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("requests"))
        .meter(Meter::count("images"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new("tokens", window, MAX))
                .limit(LimitConfig::new("requests", window, 1_000_000u64))
                .limit(LimitConfig::new("images", window, 1_000_000u64)),
        )
        .build()
        .unwrap();
    let cap: Cap = Arc::new(
        CapacityStore::new(
            Arc::clone(&shared),
            tollgate::capacity::CapacityConfig::new().replicas(1),
        )
        .unwrap(),
    );
    let engine = Engine::with_store_and_clock(catalog.clone(), Arc::clone(&cap), clock.clone());
    engine.allocate(Allocation::new("agent", "plan")).unwrap();
    let shapes = [
        Request::new("agent").units("tokens", 10u64),
        Request::new("agent")
            .units("tokens", 10u64)
            .units("requests", 1u64),
        Request::new("agent")
            .units("tokens", 10u64)
            .units("images", 1u64),
    ];
    let mut admitted = 0;
    for (i, r) in shapes.iter().enumerate() {
        if i == 2 {
            gate.settle_fail.store(3, Ordering::Relaxed);
        }
        match engine.admit_async(r).await {
            Ok(d) if d.allowed => admitted += 10,
            Ok(_) => {}
            Err(e) => eprintln!("shape {i}: {e}"),
        }
    }
    eprintln!("after give-back: {:?}", cap.stats());
    for round in 0..300 {
        let r = &shapes[round % 3];
        if let Ok(d) = engine.admit_async(r).await {
            if d.allowed {
                admitted += 10;
            }
        }
        clock.advance(Duration::from_millis(20));
        if round % 5 == 0 {
            cap.maintain(clock.now_utc()).await;
        }
    }
    cap.shutdown(clock.now_utc()).await;
    let st = cap.stats();
    let plain = Engine::with_store_and_clock(catalog, Arc::clone(&shared), clock.clone());
    plain.allocate(Allocation::new("agent", "plan")).unwrap();
    let (used, held) = capacity::read(&plain, "tokens").await;
    eprintln!("admitted {admitted}, used {used} held {held}, {st:?}");
    assert!(admitted <= MAX);
    assert_eq!((used, held), (admitted, 0));
    assert_eq!(st.pending_settles, 0);
}

/// Promise: a pending settle "is kept and tried again by every `maintain`
/// and `shutdown` … until it lands"; `pending_settles` is honest. A
/// `maintain` pass dropped while it retries pending settles (a host that
/// bounds each pass with `tokio::time::timeout(interval, …)`, or a
/// shutdown with a deadline) used to lose the settles it had taken out of
/// the list (still counted in `pending_settles`, never charged). Each is
/// now held by a guard while it is tried and put back when the pass is
/// dropped: later passes settle it and `pending_settles` ends at zero.
#[tokio::test]
async fn a_cancelled_maintain_keeps_the_pending_settles_it_was_retrying() {
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = engine_on(&cap, 100_000, window, &clock);
    let mut admitted = 0;
    for _ in 0..5 {
        assert!(
            engine
                .admit_async(&capacity::request(10))
                .await
                .unwrap()
                .allowed
        );
        admitted += 10;
    }
    // A blip: the settle fails three times and goes pending.
    gate.settle_fail.store(3, Ordering::Relaxed);
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    assert_eq!(cap.stats().pending_settles, 1);
    // The next pass's retry hangs; the host's per-pass timeout drops it.
    gate.stall_settle.store(true, Ordering::Relaxed);
    clock.advance(Duration::from_millis(100));
    let r = tokio::time::timeout(Duration::from_millis(100), cap.maintain(clock.now_utc())).await;
    assert!(r.is_err(), "the pass was expected to hang");
    gate.stall_settle.store(false, Ordering::Relaxed);
    for _ in 0..10 {
        clock.advance(Duration::from_millis(100));
        cap.maintain(clock.now_utc()).await;
    }
    cap.shutdown(clock.now_utc()).await;
    let st = cap.stats();
    let r = reader(shared, 100_000, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!("admitted {admitted}, used {used} held {held}, {st:?}");
    assert_eq!(
        (used, held, st.pending_settles),
        (admitted, 0, 0),
        "a pending settle taken by a dropped maintain is lost"
    );
}

/// Promise (`shutdown`): a shape whose store call is running is waited
/// for at most four top-up intervals; past that its slice is settled
/// anyway and the shape given up. An admit whose grow hangs for good (a
/// dead connection, its future still alive in a spawned task) does not
/// keep `shutdown` from returning, and nothing stays held.
#[tokio::test]
async fn shutdown_gives_up_a_shape_whose_grow_hangs() {
    let gate = Arc::new(Gate::default());
    let shared: Dyn = Arc::clone(&gate) as Dyn;
    let clock = ManualClock::new(capacity::t0());
    let window = Window::Lifetime;
    let cap: Cap = Arc::new(CapacityStore::new(Arc::clone(&shared), capacity::config()).unwrap());
    let engine = Arc::new(engine_on(&cap, 100_000, window, &clock));
    assert!(
        engine
            .admit_async(&capacity::request(10))
            .await
            .unwrap()
            .allowed
    );
    gate.stall_grow.store(true, Ordering::Relaxed);
    let hung = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.admit_async(&capacity::request(1_000)).await })
    };
    // Let the spawned admit reach its hung grow.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!hung.is_finished(), "the admit was expected to hang");
    let done = tokio::time::timeout(Duration::from_secs(10), cap.shutdown(clock.now_utc())).await;
    hung.abort();
    let r = reader(shared, 100_000, window, clock);
    let (used, held) = capacity::read(&r, "tokens").await;
    eprintln!("used {used} held {held} {:?}", cap.stats());
    assert!(done.is_ok(), "shutdown never returned while a grow hung");
    assert_eq!((used, held), (10, 0));
    assert_eq!(cap.stats().pending_settles, 0);
}
