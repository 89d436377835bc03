//! Capacity-lease scenarios (`tollgate::capacity`), written once and run
//! against every shared store: `tests/capacity_redis.rs`,
//! `tests/capacity_postgres.rs` and (for the ones that need no network)
//! `tests/capacity_memory.rs`. Each takes stores that share one backend's
//! counters (one per engine, as replicas would have) and a clock the
//! backend rolls windows by (the batch's).

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate::capacity::{CapacityConfig, CapacityStore};
use tollgate::store::{Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo};
use tollgate::{
    Allocation, Catalog, CatalogConfig, Clock, Engine, LimitConfig, ManualClock, Meter, Period,
    PlanConfig, Request, SystemClock, Window,
};

/// A shared store as the scenarios take it.
pub type Dyn = Arc<dyn AsyncAllowanceStore>;

/// A store that counts its `apply` calls: the round trips.
#[derive(Debug)]
pub struct Counting<S> {
    pub inner: S,
    pub calls: AtomicU64,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            calls: AtomicU64::new(0),
        }
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<S: AsyncAllowanceStore> AsyncAllowanceStore for Counting<S> {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, tollgate::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.apply(batch).await
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, tollgate::Error> {
        self.inner.overdue(now).await
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.inner.failure_policy()
    }

    fn needs_event_ids(&self) -> bool {
        self.inner.needs_event_ids()
    }
}

/// One plan: `tokens` capped at `max_tokens` over `tokens_window`, and
/// `requests` capped at a million a rolling day.
pub fn catalog(max_tokens: u64, tokens_window: Window) -> Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("requests"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new("tokens", tokens_window, max_tokens))
                .limit(LimitConfig::new(
                    "requests",
                    Window::rolling(Duration::from_secs(86_400), 24).expect("window"),
                    1_000_000u64,
                )),
        )
        .build()
        .expect("catalog")
}

pub fn request(size: u64) -> Request<'static> {
    Request::new("agent")
        .units("tokens", size)
        .units("requests", 1)
}

pub fn config() -> CapacityConfig {
    CapacityConfig::new()
        .replicas(8)
        .lease_ttl(Duration::from_secs(4))
        .top_up_interval(Duration::from_millis(100))
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
}

/// `(used, held)` of `meter` for "agent", read through a plain engine on
/// the shared store.
pub async fn read<C: Clock>(engine: &Engine<Dyn, C>, meter: &str) -> (u64, u64) {
    let report = engine.usage_async("agent").await.expect("usage");
    let row = report
        .meters
        .iter()
        .find(|m| m.meter.as_str() == meter)
        .expect("meter row");
    let int = |d: Decimal| u64::try_from(d).expect("whole units");
    (int(row.units), int(row.held))
}

fn plain<C: Clock>(store: Dyn, catalog: Catalog, clock: C) -> Engine<Dyn, C> {
    let e = Engine::with_store_and_clock(catalog, store, clock);
    e.allocate(Allocation::new("agent", "plan"))
        .expect("allocate");
    e
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// What `never_over_admits` measured.
#[derive(Debug)]
pub struct OverAdmit {
    pub max: u64,
    pub admitted_tokens: u64,
    pub admitted_requests: u64,
    pub used_tokens: u64,
    pub used_requests: u64,
    pub held_tokens: u64,
    pub refusals: u64,
    pub refused_by_holds: u64,
    pub local_admits: u64,
    /// Refusals the engines saw.
    pub engine_refusals: u64,
    /// Of those, the ones a single store that had admitted everything
    /// admitted so far would not have made.
    pub extra_refusals: u64,
    pub extra_refused_units: u64,
}

/// Eight engines, each on its own capacity store over its own connection
/// to one shared backend, admit random sizes (1..=50 tokens) at once until
/// each has met 30 refusals in a row, then shut down. The counters end
/// at or below the maximum and equal to what was admitted; nothing is
/// held; what is left unadmitted is less than the largest request.
pub async fn never_over_admits(stores: Vec<Dyn>, reader: Dyn) -> OverAdmit {
    const MAX: u64 = 200_000;
    const LARGEST: u64 = 50;
    let window = Window::Lifetime;
    let mut tasks = Vec::new();
    let total = Arc::new(AtomicU64::new(0));
    for (i, store) in stores.into_iter().enumerate() {
        let total = Arc::clone(&total);
        tasks.push(tokio::spawn(async move {
            let cap = Arc::new(CapacityStore::new(store, config()).expect("config"));
            let engine = cap_engine(Arc::clone(&cap), catalog(MAX, window), SystemClock);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let bg = {
                let (cap, stop) = (Arc::clone(&cap), Arc::clone(&stop));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        cap.maintain(SystemClock.now()).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            };
            let mut rng = Rng::new(i as u64 + 1);
            let (mut tokens, mut requests, mut refused_in_a_row) = (0u64, 0u64, 0);
            let (mut refusals, mut extra, mut extra_units) = (0u64, 0u64, 0u64);
            for _ in 0..200_000 {
                let size = 1 + rng.below(LARGEST);
                let d = engine.admit_async(&request(size)).await.expect("admit");
                if d.allowed {
                    tokens += size;
                    requests += 1;
                    refused_in_a_row = 0;
                    total.fetch_add(size, Ordering::Relaxed);
                } else {
                    refusals += 1;
                    // One store that had admitted what every engine had so
                    // far would have admitted this one.
                    if total.load(Ordering::Relaxed) + size <= MAX {
                        extra += 1;
                        extra_units += size;
                    }
                    refused_in_a_row += 1;
                    if refused_in_a_row == 30 {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            bg.await.expect("maintenance task");
            cap.shutdown(SystemClock.now()).await;
            (
                tokens,
                requests,
                cap.stats(),
                (refusals, extra, extra_units),
            )
        }));
    }
    let mut out = OverAdmit {
        max: MAX,
        admitted_tokens: 0,
        admitted_requests: 0,
        used_tokens: 0,
        used_requests: 0,
        held_tokens: 0,
        refusals: 0,
        refused_by_holds: 0,
        local_admits: 0,
        engine_refusals: 0,
        extra_refusals: 0,
        extra_refused_units: 0,
    };
    for t in tasks {
        let (tokens, requests, stats, (refusals, extra, extra_units)) =
            t.await.expect("engine task");
        out.engine_refusals += refusals;
        out.extra_refusals += extra;
        out.extra_refused_units += extra_units;
        out.admitted_tokens += tokens;
        out.admitted_requests += requests;
        out.refusals += stats.refusals;
        out.refused_by_holds += stats.refused_by_holds;
        out.local_admits += stats.local_admits;
        assert_eq!(stats.lost_units, 0, "a settle failed");
    }
    let reader = plain(reader, catalog(MAX, window), SystemClock);
    (out.used_tokens, out.held_tokens) = read(&reader, "tokens").await;
    out.used_requests = read(&reader, "requests").await.0;
    assert!(out.used_tokens <= MAX, "{out:?}");
    assert_eq!(out.used_tokens, out.admitted_tokens, "{out:?}");
    assert_eq!(out.used_requests, out.admitted_requests, "{out:?}");
    assert_eq!(out.held_tokens, 0, "{out:?}");
    assert!(
        MAX - out.used_tokens < LARGEST,
        "capacity stranded: {out:?}"
    );
    assert!(out.local_admits > out.admitted_requests / 2, "{out:?}");
    out
}

/// A replica dropped without `shutdown`, with a slice out: the slice
/// counts for the others until its lease expires, then nothing of it is
/// left: the whole maximum less what was settled can be admitted.
pub async fn killed_replica_loses_nothing_past_expiry(killed: Dyn, other: Dyn) {
    const MAX: u64 = 10_000;
    let clock = ManualClock::new(t0());
    let window = Window::calendar(Period::Month);
    let cap = Arc::new(CapacityStore::new(killed, config()).expect("config"));
    let engine = cap_engine(Arc::clone(&cap), catalog(MAX, window), clock.clone());
    for _ in 0..20 {
        assert!(engine.admit_async(&request(10)).await.unwrap().allowed);
    }
    assert!(cap.stats().local_admits >= 19, "{:?}", cap.stats());
    let survivor = plain(other, catalog(MAX, window), clock.clone());
    let (used, held) = read(&survivor, "tokens").await;
    assert_eq!(used, 0, "nothing settled yet");
    assert!(held >= 200, "the slice counts for every replica: {held}");
    // Killed: dropped with its slice out, no shutdown.
    drop(engine);
    drop(cap);
    clock.advance(Duration::from_secs(4));
    let (used, held) = read(&survivor, "tokens").await;
    assert_eq!((used, held), (0, 0), "the hold returned at its expiry");
    let d = survivor.admit_async(&request(MAX)).await.unwrap();
    assert!(d.allowed, "the whole maximum is there again: {d:?}");
}

fn cap_engine<C: Clock>(
    cap: Arc<CapacityStore<Dyn>>,
    catalog: Catalog,
    clock: C,
) -> Engine<Arc<CapacityStore<Dyn>>, C> {
    let e = Engine::with_store_and_clock(catalog, cap, clock);
    e.allocate(Allocation::new("agent", "plan"))
        .expect("allocate");
    e
}

/// What `round_trips_and_lag` measured.
#[derive(Debug)]
pub struct RoundTrips {
    pub decisions: u64,
    pub calls: u64,
    pub local_admits: u64,
}

/// One engine far from its limits, maintained every top-up interval
/// (100 ms of its clock every 200 decisions): at most 0.05 store calls a
/// decision; and after the next interval's `maintain`, the usage report
/// shows every unit admitted.
pub async fn round_trips_and_lag(store: Dyn) -> RoundTrips {
    const N: u64 = 20_000;
    let clock = ManualClock::new(t0());
    let window = Window::calendar(Period::Month);
    let counting = Arc::new(Counting::new(Arc::clone(&store)));
    let cap = Arc::new(CapacityStore::new(Arc::clone(&counting) as Dyn, config()).expect("config"));
    let engine = cap_engine(
        Arc::clone(&cap),
        catalog(u64::MAX / 4, window),
        clock.clone(),
    );
    let mut rng = Rng::new(7);
    let mut admitted = 0;
    for i in 0..N {
        let size = 1 + rng.below(50);
        assert!(engine.admit_async(&request(size)).await.unwrap().allowed);
        admitted += size;
        if i % 200 == 199 {
            clock.advance(Duration::from_millis(100));
            cap.maintain(clock.now_utc()).await;
        }
    }
    let calls = counting.calls();
    let out = RoundTrips {
        decisions: N,
        calls,
        local_admits: cap.stats().local_admits,
    };
    assert!(
        calls * 20 <= N,
        "more than 0.05 store calls a decision: {out:?}"
    );
    // Lag: one more interval and `maintain`, and the report has it all.
    let reader = plain(store, catalog(u64::MAX / 4, window), clock.clone());
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    let (used, _) = read(&reader, "tokens").await;
    assert_eq!(used, admitted, "usage lags by at most one top-up interval");
    out
}

/// A calendar day: slices admitted before midnight settle into that day
/// (no local admit in the last two intervals; `maintain` gives the slice
/// back), and the next day starts from zero.
pub async fn period_roll_gives_back(store: Dyn) {
    let day_end = Utc.with_ymd_and_hms(2026, 5, 2, 0, 0, 0).unwrap();
    let clock = ManualClock::new(day_end - chrono::TimeDelta::seconds(1));
    let window = Window::calendar(Period::Day);
    let cap = Arc::new(CapacityStore::new(Arc::clone(&store), config()).expect("config"));
    let engine = cap_engine(Arc::clone(&cap), catalog(1_000_000, window), clock.clone());
    for _ in 0..50 {
        assert!(engine.admit_async(&request(10)).await.unwrap().allowed);
    }
    let reader = plain(store, catalog(1_000_000, window), clock.clone());
    // Within two intervals of midnight: maintain gives the slice back.
    clock.set(day_end - chrono::TimeDelta::milliseconds(150));
    cap.maintain(clock.now_utc()).await;
    assert_eq!(
        read(&reader, "tokens").await,
        (500, 0),
        "settled into its day: {:?}",
        cap.stats()
    );
    // An admit this close to midnight goes straight to the store.
    let before = cap.stats().passed_through;
    assert!(engine.admit_async(&request(5)).await.unwrap().allowed);
    assert_eq!(cap.stats().passed_through, before + 1);
    assert_eq!(read(&reader, "tokens").await, (505, 0));
    clock.set(day_end + chrono::TimeDelta::milliseconds(10));
    for _ in 0..10 {
        assert!(engine.admit_async(&request(10)).await.unwrap().allowed);
    }
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    let (used, _) = read(&reader, "tokens").await;
    assert_eq!(used, 100, "the new day counts only its own");
    // A store that keeps closed periods (memory, PostgreSQL) has the day
    // before with everything its slices admitted, read through the
    // capacity store.
    if cap.history_periods() > 0 {
        let past = engine
            .usage_in_async("agent", Period::Day, 1)
            .await
            .expect("usage of the day before");
        let tokens = past
            .meters
            .iter()
            .find(|m| m.meter.as_str() == "tokens")
            .expect("tokens row");
        assert_eq!(
            tokens.units,
            Decimal::from(505u64),
            "the day before kept it all"
        );
    }
}

/// A host's event id goes to the store: replayed once, counted once;
/// a reservation and its commit keep their semantics beside slices.
pub async fn evented_and_reservations_are_exact(store: Dyn) {
    let clock = ManualClock::new(t0());
    let window = Window::calendar(Period::Month);
    let cap = Arc::new(CapacityStore::new(Arc::clone(&store), config()).expect("config"));
    let engine = cap_engine(Arc::clone(&cap), catalog(1_000, window), clock.clone());
    let reader = plain(store, catalog(1_000, window), clock.clone());
    let ev = request(30).event("host-event-1");
    let first = engine.admit_async(&ev).await.unwrap();
    let again = engine.admit_async(&ev).await.unwrap();
    assert!(first.allowed && again.allowed);
    assert_eq!(
        read(&reader, "tokens").await,
        (30, 0),
        "counted once, at once"
    );
    // A reservation beside a slice.
    assert!(engine.admit_async(&request(10)).await.unwrap().allowed);
    let r = engine
        .reserve_async(&request(100), Duration::from_secs(60))
        .await
        .unwrap()
        .expect("reserved");
    engine.commit_async(&r, &request(40)).await.unwrap();
    cap.shutdown(clock.now_utc()).await;
    assert_eq!(read(&reader, "tokens").await, (30 + 10 + 40, 0));
}

/// Near the limit the slices shrink, then decisions go to the store:
/// one engine admits exactly up to the maximum, refusing only what does
/// not fit.
pub async fn near_the_limit_goes_to_the_store(store: Dyn) {
    const MAX: u64 = 1_000;
    let clock = ManualClock::new(t0());
    let window = Window::calendar(Period::Month);
    let cap = Arc::new(CapacityStore::new(Arc::clone(&store), config()).expect("config"));
    let engine = cap_engine(Arc::clone(&cap), catalog(MAX, window), clock.clone());
    let mut admitted = 0;
    for _ in 0..200 {
        if engine.admit_async(&request(7)).await.unwrap().allowed {
            admitted += 7;
        }
    }
    assert_eq!(admitted, MAX / 7 * 7, "every request that fits is admitted");
    let reader = plain(store, catalog(MAX, window), clock.clone());
    cap.shutdown(clock.now_utc()).await;
    assert_eq!(read(&reader, "tokens").await, (admitted, 0));
    assert!(
        cap.stats().passed_through > 0,
        "the last ones went to the store"
    );
}

/// Fifty subjects, each with a slice that admitted something: one
/// `maintain` an interval later settles them all (its store calls run
/// several shapes at once), and every report shows what was admitted.
pub async fn one_maintain_settles_many_subjects(store: Dyn) {
    let clock = ManualClock::new(t0());
    let window = Window::calendar(Period::Month);
    let cap = Arc::new(CapacityStore::new(Arc::clone(&store), config()).expect("config"));
    let engine =
        Engine::with_store_and_clock(catalog(1_000_000, window), Arc::clone(&cap), clock.clone());
    let reader = Engine::with_store_and_clock(catalog(1_000_000, window), store, clock.clone());
    let ids: Vec<String> = (0..50).map(|i| format!("subject-{i}")).collect();
    for id in &ids {
        engine
            .allocate(Allocation::new(id.as_str(), "plan"))
            .expect("allocate");
        reader
            .allocate(Allocation::new(id.as_str(), "plan"))
            .expect("allocate");
    }
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..=i % 5 {
            let req = Request::new(id).units("tokens", 7).units("requests", 1);
            assert!(engine.admit_async(&req).await.unwrap().allowed);
        }
    }
    clock.advance(Duration::from_millis(100));
    cap.maintain(clock.now_utc()).await;
    for (i, id) in ids.iter().enumerate() {
        let report = reader.usage_async(id).await.expect("usage");
        let tokens = report
            .meters
            .iter()
            .find(|m| m.meter.as_str() == "tokens")
            .unwrap();
        let expect = 7 * (i as u64 % 5 + 1);
        assert_eq!(tokens.units, Decimal::from(expect), "{id}");
    }
    assert_eq!(cap.stats().lost_units, 0);
    cap.shutdown(clock.now_utc()).await;
}
