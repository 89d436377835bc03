//! `PostgresStore` against a real PostgreSQL named by
//! `TOLLGATE_POSTGRES_URL`: the conformance suite unchanged (through a
//! blocking adapter), the same answers as the memory store on random
//! batches, many engines on one limit, reservations through the async
//! engine, `migrate()` run twice and from a version 1 schema, and prepaid
//! balances on random batches as the memory store keeps them. Each store lives in its own schema,
//! dropped when the store is. Without the variable every test prints that
//! it was skipped and passes.

#[path = "support/conformance.rs"]
#[macro_use]
mod conformance_tests;
#[path = "support/balance_replicas.rs"]
mod balance_replicas;
#[path = "support/differential.rs"]
mod differential;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use chrono::{DateTime, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, BalanceAction, BalanceOp, Batch, CooldownOp,
    CounterOp, EventKey, Fraction, GrantOp, LeaseAction, LeaseId, LeaseInfo, LeaseOp, Mode,
    PostgresConfig, PostgresStore,
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

    fn history_periods(&self) -> u32 {
        AsyncAllowanceStore::history_periods(&self.store)
    }

    fn period_usage(
        &self,
        ops: &[tollgate::store::PeriodOp<'_>],
        now_ms: i64,
    ) -> Result<Vec<u64>, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::period_usage(&self.store, ops, now_ms))
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

/// Prepaid balances through eight engines on one schema: top-ups credit
/// once across replicas, spending never passes the balance.
#[test]
fn replicas_spend_one_balance() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "replicas");
    let schema = guard.store.schema().to_owned();
    rt.block_on(balance_replicas::replicas_spend_one_balance(|| {
        let (url, schema) = (url.clone(), schema.clone());
        async move {
            PostgresConfig::new(url)
                .schema(schema)
                .pool_size(2)
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .expect("connect")
        }
    }));
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
        assert_eq!((x.unwrap(), y.unwrap()), (3, 3));
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

/// A small deterministic generator (xorshift64*) for the balance
/// differential test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Contract rule 10 on random batches, the same on `MemoryStore` and
/// `PostgresStore`: grants (repeated and conflicting payment ids, ids whose
/// byte order is not a locale's, expiries to the millisecond, priorities,
/// amounts up to `u64::MAX`), debits in every mode with overdrafts, holds
/// under leases (open, grow, renew, settle with every kind of keep,
/// expired, other owners, other balances), with counter ops, events and a
/// clock stepping back. Every answer, balance and grants included, and
/// which error, must be equal.
#[test]
fn balances_answer_as_the_memory_store_does() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let pg = blocking(&rt, &url, "bal_diff");
    let memory = tollgate::MemoryStore::new();
    let seed = std::env::var("TOLLGATE_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x51ed_2701_a5a5_0f0f_u64);
    eprintln!("balance differential seed {seed}");
    let mut rng = Rng(seed);
    let scopes = [
        ScopeKey::subject("a"),
        ScopeKey::subject("b"),
        ScopeKey::pool("p{x}:y"),
    ];
    let meters = [tollgate::Name::new("cost"), tollgate::Name::new("usd")];
    let ids = ["g0", "g1", "B", "a", "é", "a b", "Z", "ab", "g2", "g3"];
    let fractions = [
        Fraction::ZERO,
        Fraction::ONE,
        Fraction::new(1, 2).unwrap(),
        Fraction::new(1, 3).unwrap(),
        Fraction::new(u64::MAX - 1, u64::MAX).unwrap(),
    ];
    let mut now: i64 = 1_767_225_600_000;
    let mut leases: Vec<(LeaseId, usize)> = Vec::new();
    let mut ended: Vec<(LeaseId, usize)> = Vec::new();
    let mut next_lease = 1u128;
    // Grants applied, replayed, conflicts; debits applied with uncovered,
    // with debt; settlements that consumed; refused debits.
    let mut seen = [0usize; 7];
    for step in 0..1_000 {
        now += if rng.next() % 40 == 0 {
            rng.pick(&[600_000, 3_600_000, 86_400_000, -3_600_000])
        } else {
            rng.pick(&[0, 0, 1, 7, 500, 1_000, 60_000, -1, -500, -60_000])
        };
        let s = (rng.next() % 3) as usize;
        let scope = &scopes[s];
        let meter = meters[(rng.next() % 4 == 0) as usize];
        let kind = match rng.next() % 10 {
            // With no lease to act on, open one.
            k if k > 5 && leases.is_empty() => 5,
            k => k,
        };
        let grant;
        let gid;
        let balance;
        let mut mode = rng.pick(&[Mode::Check, Mode::WithinLimits, Mode::Force]);
        let mut lease = None;
        let mut opened = None;
        if kind < 3 {
            let eff = now + rng.pick(&[0, 0, -1_000, 5, 60_000]);
            gid = if rng.next() % 3 == 0 {
                rng.pick(&ids).to_owned()
            } else {
                format!("n{}", rng.next() % 200)
            };
            let mut g = GrantOp::new(
                &gid,
                if rng.next() % 8 == 0 {
                    rng.pick(&[u64::MAX / 2, u64::MAX])
                } else {
                    rng.pick(&[1, 5, 20, 50, 100, 1_000])
                },
                eff,
            )
            .priority(rng.pick(&[0, 0, 1, 2, u32::MAX]));
            if rng.next() % 2 == 0 {
                g = g.expiring(eff + rng.pick(&[1, 10, 1_000, 60_000, 3_600_000]));
            }
            grant = g;
            balance = Some(BalanceOp::new(scope, meter, BalanceAction::Grant(grant)));
            mode = Mode::Force;
        } else {
            let amount = if kind == 3 && rng.next() % 3 == 0 {
                rng.pick(&[u64::MAX / 2, u64::MAX])
            } else {
                rng.pick(&[0, 1, 3, 10, 25, 100, 400])
            };
            let debit = BalanceAction::Debit {
                amount,
                overdraft: rng.pick(&[0, 0, 0, 5, 100, 100, u64::MAX]),
            };
            balance = (rng.next() % 8 != 0).then(|| BalanceOp::new(scope, meter, debit));
            if kind >= 5 {
                let (id, owner) = if kind == 5 || leases.is_empty() {
                    next_lease += 1;
                    (LeaseId::from_u128(next_lease), s)
                } else if !ended.is_empty() && rng.next() % 8 == 0 {
                    ended[(rng.next() % ended.len() as u64) as usize]
                } else {
                    leases[(rng.next() % leases.len() as u64) as usize]
                };
                // Now and then another owner: an unknown reservation.
                let owner = if rng.next() % 15 == 0 {
                    (owner + 1) % 3
                } else {
                    owner
                };
                let action = match kind {
                    5 => LeaseAction::Open {
                        expires_at_ms: now
                            + rng.pick(&[1, 50, 1_000, 60_000, 7_200_000, 172_800_000]),
                        deadline_ms: None,
                    },
                    6 | 7 => LeaseAction::Grow,
                    8 => LeaseAction::Renew {
                        expires_at_ms: now + rng.pick(&[1, 1_000, 120_000]),
                    },
                    _ => LeaseAction::Settle {
                        keep: rng.pick(&fractions),
                    },
                };
                mode = match action {
                    LeaseAction::Open { .. } => {
                        rng.pick(&[Mode::WithinLimits, Mode::WithinLimits, Mode::Check])
                    }
                    LeaseAction::Grow => rng.pick(&[Mode::WithinLimits, Mode::Force]),
                    _ => Mode::Force,
                };
                if kind == 5 {
                    opened = Some((id, owner));
                }
                lease = Some(LeaseOp::new(id, &scopes[owner], action));
            }
        }
        let balance = match lease.map(|l| l.action) {
            // A renewal debits nothing (the contract refuses it).
            Some(LeaseAction::Renew { .. }) => None,
            // Holds stay small: settling a hold near 2^64 and a debit past
            // the balance is uncovered past a u64.
            Some(_) => balance.filter(
                |b| matches!(b.action, BalanceAction::Debit { amount, .. } if amount <= 400),
            ),
            None => balance,
        };
        let op_scope = &scopes[s];
        let ops = if rng.next() % 3 == 0
            && !matches!(balance.map(|b| b.action), Some(BalanceAction::Grant(_)))
            && !matches!(lease.map(|l| l.action), Some(LeaseAction::Renew { .. }))
        {
            vec![CounterOp::new(
                op_scope,
                tollgate::Name::new("t"),
                Window::Lifetime,
                rng.pick(&[0, 1, 5]),
                Some(20),
            )]
        } else {
            Vec::new()
        };
        let mut batch = Batch::new(&ops, mode, now);
        if let Some(l) = lease {
            batch = batch.with_lease(l);
        }
        if let Some(b) = balance {
            batch = batch.with_balance(b);
        }
        let event_id;
        if rng.next() % 10 == 0 {
            event_id = format!("ev{}", rng.next() % 5);
            batch = batch.with_event(EventKey::new(&event_id, rng.next() % 2));
        }
        let want = AllowanceStore::apply(&memory, &batch);
        let got = pg.apply(&batch);
        match (&want, &got) {
            (Ok(w), Ok(g)) => {
                assert_eq!(w, g, "step {step}: {batch:#?}");
                let b = w.balance.as_deref();
                let grant = matches!(
                    batch.balance.map(|b| b.action),
                    Some(BalanceAction::Grant(_))
                );
                seen[0] += usize::from(grant && w.applied && w.replayed_at_ms.is_none());
                seen[1] += usize::from(grant && w.replayed_at_ms.is_some());
                seen[3] += usize::from(b.is_some_and(|b| b.uncovered > 0));
                seen[4] += usize::from(b.is_some_and(|b| b.debt > 0));
                seen[5] += usize::from(
                    w.applied
                        && matches!(
                            batch.lease.map(|l| l.action),
                            Some(LeaseAction::Settle { .. })
                        )
                        && b.is_some(),
                );
                seen[6] += usize::from(!w.applied && b.is_some_and(|b| !b.fits));
            }
            (Err(w), Err(g)) => {
                assert_eq!(
                    std::mem::discriminant(w),
                    std::mem::discriminant(g),
                    "step {step}: {w} / {g}"
                );
                seen[2] += usize::from(matches!(w, Error::GrantConflict { .. }));
            }
            _ => panic!("step {step}: memory {want:?}, postgres {got:?}, batch {batch:#?}"),
        }
        if let (Some(l), Ok(a)) = (opened, &want) {
            if a.applied {
                leases.push(l);
            }
        }
        // A lease settled or ended is tried now and then, not as often.
        if let (Some(l), false) = (batch.lease, opened.is_some()) {
            let gone = match &want {
                Ok(a) => a.applied && matches!(l.action, LeaseAction::Settle { .. }),
                Err(e) => matches!(
                    e,
                    Error::ReservationExpired { .. } | Error::ReservationSettled { .. }
                ),
            };
            if let (true, Some(i)) = (gone, leases.iter().position(|x| x.0 == l.id)) {
                ended.push(leases.swap_remove(i));
            }
        }
    }
    eprintln!("paths taken: {seen:?}");
    assert!(
        seen.iter().all(|&n| n > 0) || std::env::var("TOLLGATE_DIFF_SEED").is_ok(),
        "every path was taken: {seen:?}"
    );
}

/// A schema left at version 1 (before balances) by an older tollgate,
/// with a counter and a live lease in it, upgrades in place: `migrate()`
/// answers 2, the counter and the lease are kept (the lease settles), and
/// balances work; a second `migrate()` changes nothing.
#[test]
fn a_version_1_schema_upgrades() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let schema = unique_schema("upgrade");
    let store = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        // What `migrate()` of version 1 did.
        let v1 = include_str!("../src/store/postgres/migrations/001_schema.sql")
            .replace("__SCHEMA__", &format!("\"{schema}\""));
        client
            .batch_execute(&format!(
                "BEGIN;
                 CREATE SCHEMA \"{schema}\";
                 CREATE TABLE \"{schema}\".schema_version (
                     version int PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now());
                 {v1}
                 INSERT INTO \"{schema}\".schema_version (version) VALUES (1);
                 COMMIT;"
            ))
            .await
            .expect("a version 1 schema");
        PostgresConfig::new(url.clone())
            .schema(schema.clone())
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect")
    });
    // Dropped (with its schema) at the end of the test.
    let guard = Blocking {
        rt: rt.clone(),
        store: store.clone(),
    };
    let a = ScopeKey::subject("a");
    let t = tollgate::Name::new("t");
    let cost = tollgate::Name::new("cost");
    let ops = [CounterOp::new(&a, t, Window::Lifetime, 3, Some(100))];
    assert!(
        guard
            .apply(&Batch::new(&ops, Mode::Force, 1_000))
            .unwrap()
            .applied
    );
    let id = LeaseId::from_u128(7);
    let open = LeaseOp::new(
        id,
        &a,
        LeaseAction::Open {
            expires_at_ms: 1_000_000,
            deadline_ms: None,
        },
    );
    let hold = [CounterOp::new(&a, t, Window::Lifetime, 10, Some(100))];
    let r = guard
        .apply(&Batch::new(&hold, Mode::WithinLimits, 1_000).with_lease(open))
        .unwrap();
    assert_eq!((r.counters[0].used, r.counters[0].held), (3, 10));
    // A day counter written on version 1, rolled after the upgrade: its
    // day is kept (version 3's trigger).
    let day = Window::calendar(Period::Day);
    let daily = [CounterOp::new(&a, t, day, 4, None)];
    assert!(
        guard
            .apply(&Batch::new(&daily, Mode::Force, 1_000))
            .unwrap()
            .applied
    );
    // Version 1 refuses nothing about balances itself: the crate does.
    assert_eq!(rt.block_on(store.migrate()).unwrap(), 3, "upgraded");
    assert_eq!(rt.block_on(store.migrate()).unwrap(), 3, "once");
    const DAY_MS: i64 = 86_400_000;
    let next = [CounterOp::new(&a, t, day, 1, None)];
    assert!(
        guard
            .apply(&Batch::new(&next, Mode::Force, DAY_MS + 1_000))
            .unwrap()
            .applied
    );
    let q = [tollgate::store::PeriodOp::new(&a, t, day, 0)];
    assert_eq!(guard.period_usage(&q, DAY_MS + 2_000).unwrap(), [4]);
    let grant = BalanceOp::new(
        &a,
        cost,
        BalanceAction::Grant(GrantOp::new("pay-1", 100, 0)),
    );
    let r = guard
        .apply(&Batch::new(&[], Mode::Force, 2_000).with_balance(grant))
        .unwrap();
    assert_eq!(r.balance.as_ref().unwrap().remaining, 100);
    let settle = LeaseOp::new(
        id,
        &a,
        LeaseAction::Settle {
            keep: Fraction::ONE,
        },
    );
    let debit = BalanceOp::new(
        &a,
        cost,
        BalanceAction::Debit {
            amount: 30,
            overdraft: 0,
        },
    );
    let r = guard
        .apply(
            &Batch::new(&[], Mode::Force, 3_000)
                .with_lease(settle)
                .with_balance(debit),
        )
        .expect("a lease opened before the upgrade settles");
    assert_eq!(r.settled.len(), 1);
    assert_eq!(r.settled[0].charged, 10);
    assert_eq!(r.balance.unwrap().remaining, 70);
    let check = guard.apply(&Batch::new(&ops, Mode::Check, 4_000)).unwrap();
    assert_eq!(
        (check.counters[0].used, check.counters[0].held),
        (13, 0),
        "data kept across the upgrade"
    );
}

/// What the conformance suite leaves out: a refused grant (conflict, zero,
/// overflow, NUL byte) changes nothing and never panics; ids with a NUL
/// byte anywhere are a typed error; `reclaim` forgets ended leases (their
/// holds on a balance with them) but never balances or grants, spent and
/// expired ones included; grants come back in byte order of their ids.
#[test]
fn balances_keep_their_records() {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let guard = blocking(&rt, &url, "bal_records");
    let store = guard.store.clone();
    let a = ScopeKey::subject("a");
    let cost = tollgate::Name::new("cost");
    let grant = |g: GrantOp<'static>, now: i64| {
        guard.apply(
            &Batch::new(&[], Mode::Force, now).with_balance(BalanceOp::new(
                &a,
                cost,
                BalanceAction::Grant(g),
            )),
        )
    };
    let debit = |amount: u64| {
        BalanceOp::new(
            &a,
            cost,
            BalanceAction::Debit {
                amount,
                overdraft: 0,
            },
        )
    };
    // Ids whose byte order differs from a locale's ("B" < "a" < "b" < "é").
    for id in ["é", "b", "a", "B"] {
        grant(GrantOp::new(id, 10, 0), 1_000).expect("grant");
    }
    let short = grant(GrantOp::new("short", 5, 0).expiring(2_000), 1_000).expect("grant");
    let order: Vec<String> = short
        .balance
        .unwrap()
        .grants
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(order, ["short", "B", "a", "b", "é"]);
    for bad in [
        GrantOp::new("a", 11, 0),
        GrantOp::new("nul\0id", 5, 0),
        GrantOp::new("huge", u64::MAX, 0),
    ] {
        let r = grant(bad, 1_500);
        assert!(
            matches!(
                r,
                Err(Error::GrantConflict { .. }
                    | Error::InvalidBatch { .. }
                    | Error::Overflow { .. })
            ),
            "{r:?}"
        );
    }
    let nul = ScopeKey::subject("x\0y");
    let r = guard.apply(
        &Batch::new(&[], Mode::Force, 1_500).with_balance(BalanceOp::new(
            &nul,
            cost,
            BalanceAction::Debit {
                amount: 1,
                overdraft: 0,
            },
        )),
    );
    assert!(matches!(r, Err(Error::InvalidBatch { .. })), "{r:?}");
    // A hold under a lease that ends, then a debit that spends "short".
    let open = LeaseOp::new(
        LeaseId::from_u128(1),
        &a,
        LeaseAction::Open {
            expires_at_ms: 3_000,
            deadline_ms: None,
        },
    );
    let r = guard
        .apply(
            &Batch::new(&[], Mode::WithinLimits, 1_500)
                .with_lease(open)
                .with_balance(debit(20)),
        )
        .unwrap();
    assert_eq!(r.balance.unwrap().held, 20);
    let r = guard
        .apply(&Batch::new(&[], Mode::WithinLimits, 1_600).with_balance(debit(8)))
        .unwrap();
    let b = r.balance.unwrap();
    assert_eq!((b.remaining, b.held), (37, 20), "short spent, then B");
    let count = |table: &str| {
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let row = client
                .query_one(
                    &format!("SELECT count(*) FROM \"{}\".{table}", store.schema()),
                    &[],
                )
                .await
                .expect("count");
            row.get::<_, i64>(0)
        })
    };
    assert_eq!((count("grants"), count("balance_holds")), (5, 1));
    // Long after: the ended lease and its hold go; the balance, every grant
    // (the spent, expired "short" too) stay.
    let later = Utc.timestamp_millis_opt(3_000 + 86_400_000).unwrap();
    assert!(rt.block_on(store.reclaim(later)).unwrap() >= 1);
    assert_eq!(
        (count("balances"), count("grants"), count("balance_holds")),
        (1, 5, 0)
    );
    let r = grant(GrantOp::new("short", 5, 0).expiring(2_000), 90_000_000).expect("replay");
    assert_eq!(
        r.replayed_at_ms,
        Some(1_000),
        "a spent, expired grant still replays"
    );
    let b = r.balance.unwrap();
    assert_eq!((b.remaining, b.held, b.grants.len()), (37, 0, 4));
}

/// Usage history (contract rule 11) through the engine on PostgreSQL: a
/// month read back after it rolled (the trigger's `counter_history` row, a
/// table the host can read) and before (the counter's own row), a depth
/// past the maximum refused at connect, and `reclaim` deleting totals past
/// the depth.
#[test]
fn closed_periods_are_reported_and_reclaimed() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let schema = unique_schema("history");
    rt.block_on(async {
        match PostgresConfig::new(url.clone())
            .history_periods(tollgate::store::MAX_HISTORY_PERIODS + 1)
            .connect()
            .await
        {
            Err(Error::InvalidConfig { field, .. }) => {
                assert_eq!(field, "postgres.history_periods")
            }
            other => panic!("expected InvalidConfig, got {:?}", other.map(|_| ())),
        }
        let store = PostgresConfig::new(url.clone())
            .schema(schema.clone())
            .timeout(Duration::from_secs(10))
            .history_periods(2)
            .connect()
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .plan(PlanConfig::new("plan").limit(LimitConfig::new(
                "tokens",
                Window::calendar(Period::Month),
                1_000_000,
            )))
            .build()
            .expect("catalog");
        let clock = Arc::new(ManualClock::new(
            Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap(),
        ));
        let store = Arc::new(store);
        let e = Engine::with_store_and_clock(catalog, store.clone(), clock.clone());
        e.allocate(Allocation::new("acct", "plan")).unwrap();
        e.admit_async(&Request::new("acct").units("tokens", 1_234))
            .await
            .unwrap();
        clock.set(Utc.with_ymd_and_hms(2026, 4, 2, 0, 0, 0).unwrap());
        let units = |r: &tollgate::UsageReport| r.meters[0].units;
        // March, read from its counter's row (nothing written in April yet).
        let march = e.usage_in_async("acct", Period::Month, 1).await.unwrap();
        assert_eq!(units(&march), 1_234.into());
        e.admit_async(&Request::new("acct").units("tokens", 5))
            .await
            .unwrap();
        // March, read from the row the roll kept.
        assert_eq!(
            e.usage_in_async("acct", Period::Month, 1).await.unwrap(),
            march
        );
        assert_eq!(
            units(&e.usage_in_async("acct", Period::Month, 0).await.unwrap()),
            5.into()
        );
        assert!(matches!(
            e.usage_in_async("acct", Period::Month, 3).await,
            Err(Error::HistoryNotKept { asked: 3, kept: 2 })
        ));
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let rows = |sql: &'static str| {
            let client = &client;
            let schema = schema.clone();
            async move {
                client
                    .query(&sql.replace("__S__", &schema), &[])
                    .await
                    .expect("query")
            }
        };
        let kept = rows(
            "SELECT used::text, period_start_ms, period_end_ms FROM \"__S__\".counter_history \
             WHERE scope_id = 'acct'",
        )
        .await;
        assert_eq!(kept.len(), 1, "one closed period kept");
        assert_eq!(kept[0].get::<_, String>(0), "1234");
        assert_eq!(
            kept[0].get::<_, i64>(1),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        // Reclaim within the depth keeps it; well past it, it goes.
        store
            .reclaim(Utc.with_ymd_and_hms(2026, 5, 15, 0, 0, 0).unwrap())
            .await
            .unwrap();
        assert_eq!(
            rows("SELECT 1 FROM \"__S__\".counter_history").await.len(),
            1
        );
        store
            .reclaim(Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).unwrap())
            .await
            .unwrap();
        assert_eq!(
            rows("SELECT 1 FROM \"__S__\".counter_history").await.len(),
            0
        );
        store.drop_schema().await.expect("drop schema");
    });
}
