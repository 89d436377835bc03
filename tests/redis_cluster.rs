//! `RedisStore` on a Redis Cluster named by `TOLLGATE_REDIS_CLUSTER_URLS`
//! (comma-separated node URLs; `.ci/run` starts a local 3-primary cluster):
//! the conformance suite unchanged, eight engines sharing a subject's and
//! a pool's limits, subjects spread over the primaries, `overdue` across
//! them, and a cluster node refused as a single Redis. Without the
//! variable every test prints that it was skipped and passes.

#[path = "support/conformance.rs"]
#[macro_use]
mod conformance_tests;

#[path = "support/balance_replicas.rs"]
mod balance_replicas;
#[path = "support/redis_env.rs"]
mod redis_env;
use redis_env::unique_prefix;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, Batch, CounterOp, LeaseInfo, Mode, RedisConfig,
    RedisStore, TimeSource,
};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, Meter, Name, Period,
    PlanConfig, PoolConfig, Request, ScopeKey, SystemClock, Window,
};

fn nodes() -> Option<Vec<String>> {
    match std::env::var("TOLLGATE_REDIS_CLUSTER_URLS") {
        Ok(u) if !u.is_empty() => Some(u.split(',').map(str::to_owned).collect()),
        _ => {
            eprintln!("skipped: TOLLGATE_REDIS_CLUSTER_URLS not set");
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn store(nodes: &[String], prefix: &str, time: TimeSource) -> RedisStore {
    RedisConfig::cluster(nodes.iter().cloned())
        .prefix(prefix)
        .time_source(time)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the cluster")
}

/// Every key under `prefix` on every primary, by node URL.
async fn keys_by_node(nodes: &[String], prefix: &str) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for url in nodes {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .expect("role");
        if !matches!(&role[0], redis::Value::BulkString(b) if b == b"master") {
            continue;
        }
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{{{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.insert(url.clone(), keys);
    }
    out
}

async fn flush(nodes: &[String], prefix: &str) {
    for (url, keys) in keys_by_node(nodes, prefix).await {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for k in keys {
            let _: () = redis::cmd("DEL")
                .arg(k)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
    }
}

/// The sync seam over a `RedisStore`, for the conformance suite.
struct Blocking {
    rt: Arc<tokio::runtime::Runtime>,
    store: RedisStore,
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

fn conformance_on(name: &str, run: impl FnOnce(&dyn Fn() -> Blocking)) {
    let Some(nodes) = nodes() else { return };
    let rt = Arc::new(runtime());
    let prefixes = std::sync::Mutex::new(Vec::new());
    let new = || {
        let prefix = unique_prefix(name);
        let store = rt.block_on(store(&nodes, &prefix, TimeSource::Batch));
        prefixes.lock().unwrap().push(prefix);
        Blocking {
            rt: rt.clone(),
            store,
        }
    };
    run(&new);
    for prefix in prefixes.into_inner().unwrap() {
        // Every key written has a TTL (the generated secret excepted).
        let without = rt.block_on(keys_without_ttl(&nodes, &prefix));
        assert!(without.is_empty(), "keys without a TTL: {without:?}");
        rt.block_on(flush(&nodes, &prefix));
    }
}

conformance_tests!();

async fn keys_without_ttl(nodes: &[String], prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (url, keys) in keys_by_node(nodes, prefix).await {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for k in keys.into_iter().filter(|k| !k.ends_with("}:secret")) {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("pttl");
            if ttl == -1 {
                out.push(k);
            }
        }
    }
    out
}

/// A cluster node given as a single Redis would answer `MOVED` to most
/// calls: refused at connect, saying what to do.
#[test]
fn a_cluster_node_is_refused_as_a_single_redis() {
    let Some(nodes) = nodes() else { return };
    runtime().block_on(async {
        let err = RedisConfig::new(nodes[0].as_str())
            .prefix(unique_prefix("single"))
            .connect()
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, Error::InvalidConfig { field, reason }
                if field == "redis.url" && reason.contains("RedisConfig::cluster")),
            "{err:?}"
        );
    });
}

/// 10,000 subjects, one counter each: their keys spread over the three
/// primaries within ±20 % of an even share.
#[test]
fn subjects_spread_over_the_primaries() {
    let Some(nodes) = nodes() else { return };
    let rt = runtime();
    let prefix = unique_prefix("spread");
    rt.block_on(async {
        let store = store(&nodes, &prefix, TimeSource::Server).await;
        let meter = Name::new("t");
        let mut tasks = Vec::new();
        for part in 0..8u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in (part..10_000).step_by(8) {
                    let scope = ScopeKey::subject(format!("user-{i}"));
                    let ops = [CounterOp::new(&scope, meter, Window::Lifetime, 1, Some(5))];
                    let r = store
                        .apply(&Batch::new(&ops, Mode::WithinLimits, 0))
                        .await
                        .expect("apply");
                    assert!(r.applied);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let by_node = keys_by_node(&nodes, &prefix).await;
        // Counter hashes only (the generated secret is one more key).
        let counts: Vec<usize> = by_node
            .values()
            .map(|keys| keys.iter().filter(|k| k.ends_with("}:c")).count())
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 10_000, "{counts:?}");
        assert_eq!(counts.len(), 3, "three primaries: {counts:?}");
        let share = 10_000.0 / counts.len() as f64;
        for c in &counts {
            let off = (*c as f64 - share).abs() / share;
            assert!(off <= 0.2, "{counts:?}: {c} is {off:.2} off an even share");
        }
        flush(&nodes, &prefix).await;
    });
}

fn catalog() -> tollgate::Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(
            PlanConfig::new("plan")
                .max_job_duration("10m")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    1_000u64,
                )),
        )
        .pool(PoolConfig::new("team").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            600u64,
        )))
        .build()
        .expect("catalog")
}

/// Eight engines, each with its own cluster connection, admit at once for
/// four subjects sharing one pool (so each decision spans two slots): the
/// pool never admits past its maximum, and admits exactly it.
/// Prepaid balances through eight engines on the cluster: top-ups credit
/// once across replicas, spending never passes the balance.
#[test]
fn replicas_spend_one_balance() {
    let Some(nodes) = nodes() else { return };
    let rt = runtime();
    let prefix = unique_prefix("replicas");
    rt.block_on(balance_replicas::replicas_spend_one_balance(|| {
        let (nodes, prefix) = (nodes.clone(), prefix.clone());
        async move { store(&nodes, &prefix, TimeSource::Server).await }
    }));
    rt.block_on(flush(&nodes, &prefix));
}

#[test]
fn eight_engines_share_a_pool_across_slots() {
    let Some(nodes) = nodes() else { return };
    let rt = runtime();
    let prefix = unique_prefix("eight");
    let admitted = rt.block_on(async {
        let mut tasks = Vec::new();
        for e in 0..8 {
            let store = store(&nodes, &prefix, TimeSource::Server).await;
            let engine = Engine::with_store_and_clock(catalog(), store, SystemClock);
            for s in 0..4 {
                engine
                    .allocate(Allocation::new(format!("agent-{s}"), "plan").with_pool("team"))
                    .expect("allocate");
            }
            tasks.push(tokio::spawn(async move {
                let mut mine = 0u64;
                let subject = format!("agent-{}", e % 4);
                for _ in 0..100 {
                    let d = engine
                        .admit_async(&Request::new(&subject).units("tokens", 3))
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
    assert_eq!(admitted, 600, "the pool admitted exactly its maximum");
    rt.block_on(async {
        let store = store(&nodes, &prefix, TimeSource::Server).await;
        let engine = Engine::with_store_and_clock(catalog(), store, SystemClock);
        engine
            .allocate(Allocation::new("agent-0", "plan").with_pool("team"))
            .expect("allocate");
        let d = engine
            .check_async(&Request::new("agent-0").units("tokens", 0))
            .await
            .expect("check");
        let pool = d.limit(&ScopeKey::pool("team"), "tokens").expect("pool");
        assert_eq!((pool.used, pool.held), (600, 0), "no hold left behind");
        flush(&nodes, &prefix).await;
    });
}

/// Reservations of subjects on different primaries: `overdue` finds every
/// one, on every primary.
#[test]
fn overdue_reads_every_primary() {
    let Some(nodes) = nodes() else { return };
    let rt = runtime();
    let prefix = unique_prefix("overdue");
    rt.block_on(async {
        let store = store(&nodes, &prefix, TimeSource::Batch).await;
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .plan(
                PlanConfig::new("plan")
                    .max_job_duration("10m")
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::calendar(Period::Day),
                        1_000u64,
                    )),
            )
            .build()
            .expect("catalog");
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        let engine = Engine::with_store_and_clock(catalog, store, clock.clone());
        let mut ids = Vec::new();
        for s in 0..12 {
            let subject = format!("worker-{s}");
            engine
                .allocate(Allocation::new(subject.as_str(), "plan"))
                .expect("allocate");
            let res = engine
                .reserve_async(
                    &Request::new(&subject).units("tokens", 5),
                    Duration::from_secs(3600),
                )
                .await
                .expect("reserve")
                .expect("admitted");
            ids.push(res.id());
        }
        clock.advance(chrono::Duration::minutes(11));
        let mut found: Vec<_> = engine
            .overdue_async()
            .await
            .expect("overdue")
            .into_iter()
            .map(|l| l.id)
            .collect();
        found.sort();
        ids.sort();
        assert_eq!(found, ids);
        let by_node = keys_by_node(&nodes, &prefix).await;
        assert!(
            by_node.values().filter(|k| !k.is_empty()).count() >= 2,
            "the leases live on more than one primary"
        );
        flush(&nodes, &prefix).await;
    });
}

/// A spanning admit that one slot refuses changes nothing anywhere: the
/// slot that held gives its hold back. A grow spanning slots is refused
/// with `Error::CrossSlot`, and changes nothing either.
#[test]
fn spanning_refusals_and_grows_change_nothing() {
    let Some(nodes) = nodes() else { return };
    let rt = runtime();
    let prefix = unique_prefix("span-refuse");
    rt.block_on(async {
        let store = store(&nodes, &prefix, TimeSource::Batch).await;
        let (a, p) = (ScopeKey::subject("a"), ScopeKey::pool("p"));
        let t = Name::new("t");
        let day = Window::calendar(Period::Day);
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let now_ms = now.timestamp_millis();
        let read = |store: RedisStore| {
            let (a, p) = (a.clone(), p.clone());
            async move {
                let ops = [
                    CounterOp::new(&a, t, day, 0, None),
                    CounterOp::new(&p, t, day, 0, None),
                ];
                let r = store
                    .apply(&Batch::new(&ops, Mode::Check, now_ms))
                    .await
                    .expect("check");
                (
                    (r.counters[0].used, r.counters[0].held),
                    (r.counters[1].used, r.counters[1].held),
                )
            }
        };
        let ops = [
            CounterOp::new(&a, t, day, 5, Some(10)),
            CounterOp::new(&p, t, day, 5, Some(4)),
        ];
        let r = store
            .apply(&Batch::new(&ops, Mode::WithinLimits, now_ms))
            .await
            .expect("apply");
        assert!(!r.applied);
        assert_eq!(read(store.clone()).await, ((0, 0), (0, 0)), "no hold kept");
        // Refused by the first slot: the second is only read.
        let ops = [
            CounterOp::new(&a, t, day, 11, Some(10)),
            CounterOp::new(&p, t, day, 1, Some(4)),
        ];
        let r = store
            .apply(&Batch::new(&ops, Mode::WithinLimits, now_ms))
            .await
            .expect("apply");
        assert!(!r.applied);
        assert_eq!(
            read(store.clone()).await,
            ((0, 0), (0, 0)),
            "nothing applied"
        );

        // A reservation across both slots, then a grow across them.
        let id = tollgate::store::LeaseId::random();
        let open = tollgate::store::LeaseOp::new(
            id,
            &a,
            tollgate::store::LeaseAction::Open {
                expires_at_ms: now_ms + 60_000,
                deadline_ms: None,
            },
        );
        let hold = [
            CounterOp::new(&a, t, day, 2, Some(10)),
            CounterOp::new(&p, t, day, 3, Some(4)),
        ];
        let r = store
            .apply(&Batch::new(&hold, Mode::WithinLimits, now_ms).with_lease(open))
            .await
            .expect("open");
        assert!(r.applied);
        assert_eq!(read(store.clone()).await, ((0, 2), (0, 3)));
        let grow = tollgate::store::LeaseOp::new(id, &a, tollgate::store::LeaseAction::Grow);
        let err = store
            .apply(&Batch::new(&hold, Mode::WithinLimits, now_ms).with_lease(grow))
            .await
            .expect_err("a grow across slots");
        assert!(matches!(err, Error::CrossSlot { .. }), "{err:?}");
        assert_eq!(read(store.clone()).await, ((0, 2), (0, 3)), "unchanged");
        // Renew reaches both slots; a settlement charges both.
        let renew = tollgate::store::LeaseOp::new(
            id,
            &a,
            tollgate::store::LeaseAction::Renew {
                expires_at_ms: now_ms + 600_000,
            },
        );
        store
            .apply(&Batch::new(&[], Mode::Force, now_ms).with_lease(renew))
            .await
            .expect("renew");
        let later = now_ms + 120_000;
        let ops = [
            CounterOp::new(&a, t, day, 0, None),
            CounterOp::new(&p, t, day, 0, None),
        ];
        let r = store
            .apply(&Batch::new(&ops, Mode::Check, later))
            .await
            .expect("check");
        assert_eq!(
            (r.counters[0].held, r.counters[1].held),
            (2, 3),
            "both holds renewed past their first expiry"
        );
        let settle = tollgate::store::LeaseOp::new(
            id,
            &a,
            tollgate::store::LeaseAction::Settle {
                keep: tollgate::store::Fraction::ONE,
            },
        );
        let r = store
            .apply(&Batch::new(&[], Mode::Force, later).with_lease(settle))
            .await
            .expect("settle");
        assert_eq!(r.settled.len(), 2, "a hold settled on each slot");
        let r = store
            .apply(&Batch::new(&ops, Mode::Check, later))
            .await
            .expect("check");
        assert_eq!(
            (
                r.counters[0].used,
                r.counters[0].held,
                r.counters[1].used,
                r.counters[1].held
            ),
            (2, 0, 3, 0)
        );
        flush(&nodes, &prefix).await;
    });
}

/// Prepaid balances on a cluster (contract rule 10): a balance lives in
/// its scope's slot, and a batch whose balance is in another slot than
/// (some of) its ops takes the spanning steps — an admit holds the debit
/// with the deltas and then consumes it, a reservation holds on the
/// balance's slot and settles there — answering as `MemoryStore` does for
/// the same batches. A grant whose cooldowns are in another slot is
/// refused ([`Error::CrossSlot`]), changing nothing.
#[test]
fn balances_across_slots_answer_as_the_memory_store_does() {
    use tollgate::store::{
        BalanceAction, BalanceOp, CooldownOp, Fraction, GrantOp, LeaseAction, LeaseId, LeaseOp,
        MemoryStore,
    };
    let Some(nodes) = nodes() else { return };
    let rt = Arc::new(runtime());
    let prefix = unique_prefix("balances");
    let store = rt.block_on(store(&nodes, &prefix, TimeSource::Batch));
    let slot = |s: &ScopeKey| {
        let d = store.digest_of(s);
        let tag = format!("{{{prefix}:{}}}", d.trim_start_matches("hmac:"));
        rt.block_on(async {
            let client = redis::Client::open(nodes[0].as_str()).expect("url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(tag)
                .query_async::<i64>(&mut conn)
                .await
                .expect("keyslot")
        })
    };
    let a = ScopeKey::subject("a");
    let p = (0..50)
        .map(|i| ScopeKey::pool(format!("team-{i}")))
        .find(|p| slot(p) != slot(&a))
        .expect("a pool in another slot");
    let redis = Blocking {
        rt: rt.clone(),
        store: store.clone(),
    };
    let memory = MemoryStore::new();
    let both = |batch: &Batch<'_>| -> Applied {
        let want = AllowanceStore::apply(&memory, batch).expect("memory");
        let got = redis.apply(batch).expect("redis");
        assert_eq!(
            (got.applied, &got.counters, &got.balance, got.replayed_at_ms),
            (
                want.applied,
                &want.counters,
                &want.balance,
                want.replayed_at_ms
            ),
            "{batch:?}"
        );
        got
    };
    let cost = Name::new("cost");
    let t = Name::new("t");
    let day = Window::calendar(Period::Day);
    let now = Utc
        .with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .unwrap()
        .timestamp_millis();
    let debit =
        |s, amount, overdraft| BalanceOp::new(s, cost, BalanceAction::Debit { amount, overdraft });
    let grant = |s, id, amount| {
        BalanceOp::new(s, cost, BalanceAction::Grant(GrantOp::new(id, amount, now)))
    };
    // Grants, each in its balance's slot.
    both(&Batch::new(&[], Mode::Force, now).with_balance(grant(&a, "pay-a", 100)));
    both(&Batch::new(&[], Mode::Force, now).with_balance(grant(&p, "pay-p", 50)));
    let ops = [
        CounterOp::new(&a, t, day, 1, Some(10)),
        CounterOp::new(&p, t, day, 1, Some(10)),
    ];
    // An admit over both slots, debiting the subject's balance: held with
    // the deltas, then consumed.
    let r = both(&Batch::new(&ops, Mode::WithinLimits, now + 1).with_balance(debit(&a, 30, 0)));
    assert!(r.applied);
    assert_eq!(
        r.balance.as_ref().map(|b| (b.remaining, b.held)),
        Some((70, 0))
    );
    // Refused by the balance, then by the pool's limit: nothing held.
    let r = both(&Batch::new(&ops, Mode::WithinLimits, now + 2).with_balance(debit(&a, 80, 0)));
    assert!(!r.applied);
    let full = [
        CounterOp::new(&a, t, day, 1, Some(10)),
        CounterOp::new(&p, t, day, 10, Some(10)),
    ];
    let r = both(&Batch::new(&full, Mode::WithinLimits, now + 3).with_balance(debit(&a, 5, 0)));
    assert!(!r.applied);
    assert_eq!(
        r.balance.as_ref().map(|b| (b.remaining, b.held)),
        Some((70, 0))
    );
    // The pool's balance, debited by a batch whose ops are the subject's.
    let mine = [CounterOp::new(&a, t, day, 1, Some(10))];
    let r = both(&Batch::new(&mine, Mode::WithinLimits, now + 4).with_balance(debit(&p, 20, 0)));
    assert_eq!(r.balance.as_ref().map(|b| b.remaining), Some(30));
    // A record past the balance: debt within the overdraft, the rest
    // uncovered.
    let r = both(&Batch::new(&ops, Mode::Force, now + 5).with_balance(debit(&p, 45, 10)));
    assert_eq!(
        r.balance
            .as_ref()
            .map(|b| (b.remaining, b.debt, b.uncovered)),
        Some((0, 10, 5))
    );
    both(&Batch::new(&[], Mode::Force, now + 6).with_balance(grant(&p, "pay-p2", 60)));
    // A check over both slots reports the balance.
    let r = both(&Batch::new(&ops, Mode::Check, now + 6).with_balance(debit(&p, 51, 0)));
    assert!(!r.balance.expect("reported").fits);
    // A reservation across slots holding on the pool's balance: renewed,
    // then settled keeping half, with a debit of its own.
    for (who, keep) in [(&p, Fraction::new(1, 2)), (&a, Some(Fraction::ONE))] {
        let keep = keep.unwrap_or(Fraction::ONE);
        let id = LeaseId::random();
        let open = LeaseOp::new(
            id,
            &a,
            LeaseAction::Open {
                expires_at_ms: now + 1_000,
                deadline_ms: None,
            },
        );
        let r = both(
            &Batch::new(&ops, Mode::WithinLimits, now + 7)
                .with_lease(open)
                .with_balance(debit(who, 20, 0)),
        );
        assert_eq!(r.balance.as_ref().map(|b| b.held), Some(20));
        let renew = LeaseOp::new(
            id,
            &a,
            LeaseAction::Renew {
                expires_at_ms: now + 2_000,
            },
        );
        both(&Batch::new(&[], Mode::Force, now + 8).with_lease(renew));
        let read = Batch::new(&[], Mode::Check, now + 1_500).with_balance(debit(who, 0, 0));
        assert_eq!(both(&read).balance.map(|b| b.held), Some(20), "renewed");
        let settle = LeaseOp::new(id, &a, LeaseAction::Settle { keep });
        let r = both(
            &Batch::new(&ops, Mode::Force, now + 9)
                .with_lease(settle)
                .with_balance(debit(who, 5, 0)),
        );
        assert_eq!(r.balance.as_ref().map(|b| b.held), Some(0));
    }
    // A grant whose cooldown is in another slot: refused, nothing changed.
    let cools = [CooldownOp::new(&a, None)];
    let err = redis
        .apply(
            &Batch::new(&[], Mode::Force, now + 10)
                .with_cooldowns(&cools)
                .with_balance(grant(&p, "pay-p3", 5)),
        )
        .expect_err("a grant across slots");
    assert!(matches!(err, Error::CrossSlot { .. }), "{err:?}");
    let read = Batch::new(&[], Mode::Check, now + 10).with_balance(debit(&p, 0, 0));
    assert_eq!(both(&read).balance.map(|b| b.grants.len()), Some(1));
    let without = rt.block_on(keys_without_ttl(&nodes, &prefix));
    assert!(without.is_empty(), "keys without a TTL: {without:?}");
    rt.block_on(flush(&nodes, &prefix));
}
