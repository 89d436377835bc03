//! `PostgresStore` against a real PostgreSQL named by
//! `TOLLGATE_POSTGRES_URL`: the conformance suite unchanged (through a
//! blocking adapter), the same answers as the memory store on random
//! batches, many engines on one limit, reservations through the async
//! engine, and `migrate()` run twice. Each store lives in its own schema,
//! dropped when the store is. Without the variable every test prints that
//! it was skipped and passes.

#[path = "support/conformance.rs"]
#[macro_use]
mod conformance_tests;
#[path = "support/differential.rs"]
mod differential;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use chrono::{DateTime, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, Batch, CooldownOp, CounterOp, EventKey,
    LeaseInfo, Mode, PostgresConfig, PostgresStore,
};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, Meter, Period, PlanConfig,
    Request, ScopeKey, SystemClock, Window,
};

fn url() -> Option<String> {
    match std::env::var("TOLLGATE_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
            None
        }
    }
}

/// A schema no other test run uses.
fn unique_schema(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tg_test_{name}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated store in its own schema `name`.
async fn new_store(url: &str, name: &str) -> PostgresStore {
    let store = PostgresConfig::new(url)
        .schema(unique_schema(name))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to TOLLGATE_POSTGRES_URL");
    store.migrate().await.expect("migrate");
    store
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The sync seam over a `PostgresStore`: what the conformance suite takes.
/// Dropping it drops the store's schema.
struct Blocking {
    rt: Arc<tokio::runtime::Runtime>,
    store: PostgresStore,
}

impl Drop for Blocking {
    fn drop(&mut self) {
        let r = self.rt.block_on(self.store.drop_schema());
        if let Err(e) = r {
            eprintln!("could not drop schema {}: {e}", self.store.schema());
        }
    }
}

impl AllowanceStore for Blocking {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::apply(&self.store, batch))
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::overdue(&self.store, now))
    }
}

fn blocking(rt: &Arc<tokio::runtime::Runtime>, url: &str, name: &str) -> Blocking {
    Blocking {
        rt: rt.clone(),
        store: rt.block_on(new_store(url, name)),
    }
}

fn conformance_on(name: &str, run: impl FnOnce(&dyn Fn() -> Blocking)) {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let new = || blocking(&rt, &url, name);
    run(&new);
}

conformance_tests!();

/// Random batches, the same on `MemoryStore` and `PostgresStore` (see
/// `support/differential.rs`). Amounts reach past 2^63 and up to
/// `u64::MAX`, past what a `bigint` holds.
#[test]
fn answers_as_the_memory_store_does() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let pg = blocking(&rt, &url, "differential");
    differential::answers_as_the_memory_store_does("postgres", |batch, _| pg.apply(batch));
}

fn catalog(max: u64) -> tollgate::Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("plan").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            max,
        )))
        .build()
        .expect("catalog")
}

/// Eight engines, each with its own pool, admit against one limit in one
/// schema at once: never more than the maximum, and exactly the maximum
/// when demand exceeds it; the counter row says the same.
#[test]
fn eight_engines_share_one_limit() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "eight");
    let schema = guard.store.schema().to_owned();
    let admitted = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = PostgresConfig::new(url.clone())
                .schema(schema.clone())
                .pool_size(2)
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .expect("connect");
            let engine = Engine::with_store_and_clock(catalog(1_000), store, SystemClock);
            engine
                .allocate(Allocation::new("agent", "plan"))
                .expect("allocate");
            tasks.push(tokio::spawn(async move {
                let mut mine = 0u64;
                for _ in 0..100 {
                    let d = engine
                        .admit_async(&Request::new("agent").units("tokens", 3))
                        .await
                        .expect("admit");
                    if d.allowed {
                        mine += 3;
                    }
                }
                mine
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        total
    });
    // 8 × 100 × 3 = 2,400 asked for; 999 is the most that fits in steps of 3.
    assert_eq!(admitted, 999, "admitted exactly what fits, never more");
    let used = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let row = client
            .query_one(
                &format!(
                    "SELECT used::text FROM \"{schema}\".counters \
                     WHERE scope_id = 'agent' AND meter = 'tokens'"
                ),
                &[],
            )
            .await
            .expect("counter row");
        row.get::<_, String>(0)
    });
    assert_eq!(used, "999", "the table a host reads agrees");
}

/// The reservation calls and `overdue` through the async engine, on a
/// manual clock: one slot, grow, renew, overdue, commit under an event id
/// (a retry replays), release after commit refused.
#[test]
fn reservations_through_the_async_engine() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "reserve");
    let store = guard.store.clone();
    rt.block_on(async {
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .meter(Meter::count("jobs"))
            .plan(
                PlanConfig::new("plan")
                    .max_job_duration("10m")
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::calendar(Period::Day),
                        100u64,
                    ))
                    .limit(LimitConfig::new("jobs", Window::Concurrent, 1u64)),
            )
            .build()
            .expect("catalog");
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        let engine = Engine::with_store_and_clock(catalog, store, clock.clone());
        engine
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        let ttl = Duration::from_secs(3600);
        let mut res = engine
            .reserve_async(&Request::new("agent").units("tokens", 60), ttl)
            .await
            .expect("reserve")
            .expect("admitted");
        let refused = engine
            .reserve_async(&Request::new("agent").units("tokens", 10), ttl)
            .await
            .expect("reserve");
        assert!(refused.is_err(), "one slot only");
        engine
            .grow_async(&mut res, &Request::new("agent").units("tokens", 5))
            .await
            .expect("grow");
        engine.renew_async(&mut res, ttl).await.expect("renew");
        clock.advance(chrono::Duration::minutes(11));
        let overdue = engine.overdue_async().await.expect("overdue");
        assert_eq!(overdue.len(), 1);
        assert_eq!(overdue[0].id, res.id());
        assert_eq!(overdue[0].owner, ScopeKey::subject("agent"));
        let d = engine
            .commit_async(&res, &Request::new("agent").units("tokens", 40).event("c1"))
            .await
            .expect("commit");
        let again = engine
            .commit_async(&res, &Request::new("agent").units("tokens", 40).event("c1"))
            .await
            .expect("a retried commit replays");
        assert_eq!(d.limits, again.limits);
        let l = d
            .limit(&ScopeKey::subject("agent"), "tokens")
            .expect("limit");
        assert_eq!((l.used, l.held), (40, 0));
        assert!(engine.overdue_async().await.expect("overdue").is_empty());
        assert!(matches!(
            engine.release_async(&res, tollgate::Outcome::Failed).await,
            Err(Error::ReservationSettled { .. })
        ));
    });
}

/// `migrate()` twice (and by two stores at once) leaves one version and the
/// data in place.
#[test]
fn migrate_is_idempotent() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "migrate");
    let store = guard.store.clone();
    let scope = ScopeKey::subject("s");
    rt.block_on(async {
        let a = CounterOp::new(
            &scope,
            tollgate::Name::new("m"),
            Window::Lifetime,
            5,
            Some(10),
        );
        let ops = [a];
        let batch = Batch::new(&ops, Mode::WithinLimits, 1_000);
        assert!(
            AsyncAllowanceStore::apply(&store, &batch)
                .await
                .unwrap()
                .applied
        );
        let other = store.clone();
        let (x, y) = tokio::join!(store.migrate(), other.migrate());
        assert_eq!((x.unwrap(), y.unwrap()), (1, 1));
        let check = Batch::new(&ops, Mode::Check, 2_000);
        let got = AsyncAllowanceStore::apply(&store, &check).await.unwrap();
        assert_eq!(got.counters[0].used, 5, "data kept across migrate()");
    });
}

/// Bad settings are typed errors before anything connects.
#[test]
fn bad_config_is_refused() {
    let rt = runtime();
    rt.block_on(async {
        for (cfg, field) in [
            (
                PostgresConfig::new("postgres://x@127.0.0.1/db").schema("Bad-Name"),
                "postgres.schema",
            ),
            (
                PostgresConfig::new("postgres://x@127.0.0.1/db").schema(""),
                "postgres.schema",
            ),
            (
                PostgresConfig::new("postgres://x@127.0.0.1/db").pool_size(0),
                "postgres.pool_size",
            ),
            (
                PostgresConfig::new("postgres://x@127.0.0.1/db").timeout(Duration::ZERO),
                "postgres.timeout",
            ),
            (PostgresConfig::new("not a url at all ="), "postgres.url"),
        ] {
            match cfg.connect().await {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    });
}

/// A call that times out after its statement was sent says its outcome is
/// unknown, and it is: the statement waits on a lock another session holds,
/// the call gives up, and once the lock is free the server commits it.
#[test]
fn a_timeout_after_sending_says_the_outcome_is_unknown() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "unknown");
    let schema = guard.store.schema().to_owned();
    rt.block_on(async {
        let store = PostgresConfig::new(url.clone())
            .schema(schema.clone())
            .timeout(Duration::from_millis(300))
            .connect()
            .await
            .expect("connect");
        let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        // The scope's lock, as apply() names it.
        let lock = format!("hashtextextended('{schema}|s|subject:x', 0)");
        other
            .batch_execute(&format!("SELECT pg_advisory_lock({lock})"))
            .await
            .expect("lock");
        let scope = ScopeKey::subject("x");
        let ops = [CounterOp::new(
            &scope,
            tollgate::Name::new("m"),
            Window::Lifetime,
            7,
            Some(100),
        )];
        let batch = Batch::new(&ops, Mode::WithinLimits, 1_000);
        // Warm the pooled connection (prepared statement) on another scope.
        let warm_scope = ScopeKey::subject("y");
        let warm_ops = [CounterOp::new(
            &warm_scope,
            tollgate::Name::new("m"),
            Window::Lifetime,
            0,
            None,
        )];
        AsyncAllowanceStore::apply(&store, &Batch::new(&warm_ops, Mode::Check, 1_000))
            .await
            .expect("warm");
        match AsyncAllowanceStore::apply(&store, &batch).await {
            Err(Error::StoreOutcomeUnknown { message, .. }) => {
                assert!(message.contains("outcome unknown"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        other
            .batch_execute(&format!("SELECT pg_advisory_unlock({lock})"))
            .await
            .expect("unlock");
        let check = Batch::new(&ops, Mode::Check, 2_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = AsyncAllowanceStore::apply(&guard.store, &check)
                .await
                .expect("check");
            if got.counters[0].used == 7 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sent statement never committed: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// `reclaim` forgets event ids past the horizon (the id applies again),
/// ended cooldowns and long-ended leases, and keeps what is live.
#[test]
fn reclaim_forgets_only_what_has_ended() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "reclaim");
    let store = guard.store.clone();
    let scope = ScopeKey::subject("r");
    rt.block_on(async {
        let ops = [CounterOp::new(
            &scope,
            tollgate::Name::new("m"),
            Window::Lifetime,
            1,
            None,
        )];
        let day = 86_400_000;
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).unwrap();
        let ev = |now| Batch::new(&ops, Mode::WithinLimits, now).with_event(EventKey::new("e", 1));
        assert!(
            AsyncAllowanceStore::apply(&store, &ev(day))
                .await
                .unwrap()
                .applied
        );
        let cool = [CooldownOp::new(&scope, Some(day + 60_000))];
        let c = Batch::new(&[], Mode::Force, day).with_cooldowns(&cool);
        AsyncAllowanceStore::apply(&store, &c).await.unwrap();
        // Within the horizon nothing goes and the event replays.
        assert_eq!(store.reclaim(at(day + 1_000)).await.unwrap(), 0);
        let replay = AsyncAllowanceStore::apply(&store, &ev(day + 1_000))
            .await
            .unwrap();
        assert_eq!(replay.replayed_at_ms, Some(day));
        // A horizon later: the event id and the ended cooldown go.
        assert_eq!(store.reclaim(at(2 * day)).await.unwrap(), 2);
        let again = AsyncAllowanceStore::apply(&store, &ev(2 * day))
            .await
            .unwrap();
        assert!(again.applied && again.replayed_at_ms.is_none());
        assert_eq!(again.counters[0].used, 2, "counters are kept");
    });
}

/// An admit without the host's event id gets one the engine makes (a row
/// in `events`, so a retry after an unknown outcome counts once), unless
/// the store turns them off; a host's id is kept either way.
#[test]
fn engine_event_ids_can_be_turned_off() {
    let Some(url) = url() else { return };
    let rt = runtime();
    for on in [true, false] {
        let schema = unique_schema("made_ids");
        let events = rt.block_on(async {
            let store = PostgresConfig::new(url.clone())
                .schema(schema.clone())
                .timeout(Duration::from_secs(10))
                .engine_event_ids(on)
                .connect()
                .await
                .expect("connect");
            store.migrate().await.expect("migrate");
            let engine = Engine::with_store_and_clock(catalog(10), store.clone(), SystemClock);
            engine.allocate(Allocation::new("agent", "plan")).unwrap();
            let req = Request::new("agent").units("tokens", 1);
            assert!(engine.admit_async(&req).await.unwrap().allowed);
            assert!(
                engine
                    .admit_async(&req.clone().event("host-1"))
                    .await
                    .unwrap()
                    .allowed
            );
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let row = client
                .query_one(&format!("SELECT count(*) FROM \"{schema}\".events"), &[])
                .await
                .expect("events");
            store.drop_schema().await.expect("drop schema");
            row.get::<_, i64>(0)
        });
        assert_eq!(events, if on { 2 } else { 1 }, "engine ids on: {on}");
    }
}
