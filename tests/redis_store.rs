//! `RedisStore` against a real Redis named by `TOLLGATE_REDIS_URL`: the
//! conformance suite unchanged (through a blocking adapter), many engines on
//! one limit, an outage and its recovery, and TTLs on every key written.
//! Without the variable every test prints that it was skipped and passes.

#[path = "support/conformance.rs"]
#[macro_use]
mod conformance_tests;
#[path = "support/balance_replicas.rs"]
mod balance_replicas;
#[path = "support/differential.rs"]
mod differential;

#[path = "support/redis_env.rs"]
mod redis_env;
use redis_env::{unique_prefix, url};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeZone;
use chrono::{DateTime, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo, RedisConfig,
    RedisStore, TimeSource,
};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, Meter, Period, PlanConfig,
    Request, ScopeKey, SystemClock, Window,
};

/// A store on batch time under its own prefix `name`.
async fn batch_store(url: &str, name: &str) -> RedisStore {
    RedisConfig::new(url)
        .prefix(unique_prefix(name))
        .time_source(TimeSource::Batch)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to TOLLGATE_REDIS_URL")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The sync seam over a `RedisStore`: what the conformance suite takes.
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

/// Delete every key under `tag` (the store's own prefix only).
async fn flush(url: &str, tag: &str) -> usize {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
    keys.len()
}

async fn scan(conn: &mut redis::aio::MultiplexedConnection, tag: &str) -> Vec<String> {
    // Match the tag literally: escape glob characters.
    let mut pattern = String::new();
    for ch in tag.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern.push_str(":*");
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Keys under `tag` with no TTL (the generated secret's excepted: it must
/// outlive every key it names).
async fn keys_without_ttl(url: &str, tag: &str) -> (usize, Vec<String>) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    let mut without = Vec::new();
    for k in keys.iter().filter(|k| **k != format!("{tag}:secret")) {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        if ttl == -1 {
            without.push(k.clone());
        }
    }
    (keys.len(), without)
}

fn conformance_on(name: &str, run: impl FnOnce(&dyn Fn() -> Blocking)) {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let tags = std::sync::Mutex::new(Vec::new());
    let new = || {
        let store = rt.block_on(batch_store(&url, name));
        tags.lock().unwrap().push(store.key_tag().to_owned());
        Blocking {
            rt: rt.clone(),
            store,
        }
    };
    run(&new);
    for tag in tags.into_inner().unwrap() {
        let (n, without) = rt.block_on(keys_without_ttl(&url, &tag));
        assert!(without.is_empty(), "{n} keys, without a TTL: {without:?}");
        rt.block_on(flush(&url, &tag));
    }
}

conformance_tests!();

/// Random batches, the same on `MemoryStore` and `RedisStore` (see
/// `support/differential.rs`). Amounts reach past 2^53 and up to
/// `u64::MAX`, where the script's limb arithmetic takes over.
#[test]
fn answers_as_the_memory_store_does() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let store = rt.block_on(batch_store(&url, "differential"));
    let tag = store.key_tag().to_owned();
    let redis = Blocking {
        rt: Arc::new(rt),
        store,
    };
    differential::answers_as_the_memory_store_does("redis", |batch, scopes| {
        // A held scope the batch does not name comes back as its keyed
        // digest: the test maps it back as a host would (`digest_of`).
        redis.apply(batch).map(|mut g| {
            for h in &mut g.settled {
                if let Some(s) = scopes.iter().find(|s| {
                    s.kind() == h.scope.kind() && redis.store.digest_of(s) == h.scope.id()
                }) {
                    h.scope = s.clone();
                }
            }
            g
        })
    });
    let (_, without) = redis.rt.block_on(keys_without_ttl(&url, &tag));
    assert!(without.is_empty(), "keys without a TTL: {without:?}");
    redis.rt.block_on(flush(&url, &tag));
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

/// Prepaid balances through eight engines on one Redis, on the server's
/// clock (the default): top-ups credit once across replicas, spending
/// never passes the balance.
#[test]
fn replicas_spend_one_balance() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let prefix = unique_prefix("replicas");
    rt.block_on(balance_replicas::replicas_spend_one_balance(|| {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            RedisConfig::new(url)
                .prefix(prefix)
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .expect("connect")
        }
    }));
    rt.block_on(flush(&url, &format!("{{{prefix}}}")));
}

/// On the server's clock, a top-up says when the store credited it, the
/// same on its redelivery, whatever the engine's clock reads.
#[test]
fn a_top_up_reports_the_stores_time_on_every_delivery() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let prefix = unique_prefix("granted");
    let hour_behind = Utc::now() - chrono::Duration::hours(1);
    rt.block_on(async {
        let store = RedisConfig::new(url.clone())
            .prefix(prefix.clone())
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let clock = ManualClock::new(hour_behind);
        let engine =
            Engine::with_store_and_clock(balance_replicas::catalog(), store, clock.clone());
        engine
            .allocate(Allocation::new("acct", "payg"))
            .expect("allocate");
        let pack = tollgate::TopUp::new("pay-1", rust_decimal::Decimal::new(100, 2), "USD");
        let first = engine.top_up_async("acct", &pack).await.expect("top up");
        clock.advance(Duration::from_secs(60));
        let again = engine.top_up_async("acct", &pack).await.expect("again");
        assert!(first.new && !again.new);
        assert_eq!(first.granted_at, again.granted_at);
        assert_eq!(first.balance.grants[0].granted_at, first.granted_at);
        assert!(
            first.granted_at > hour_behind + chrono::Duration::minutes(30),
            "the server's time"
        );
    });
    rt.block_on(flush(&url, &format!("{{{prefix}}}")));
}

/// Eight engines, each with its own connection, admit against one limit at
/// once: never more than the maximum, and exactly the maximum when demand
/// exceeds it.
#[test]
fn eight_engines_share_one_limit() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let prefix = unique_prefix("eight");
    let admitted = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = RedisConfig::new(url.clone())
                .prefix(prefix.clone())
                .timeout(Duration::from_secs(5))
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
    let tag = format!("{{{prefix}}}");
    let (n, without) = rt.block_on(keys_without_ttl(&url, &tag));
    assert!(
        n > 0 && without.is_empty(),
        "{n} keys; without TTL: {without:?}"
    );
    rt.block_on(flush(&url, &tag));
}

/// A second redis-server on its own port, started and stopped by the test.
struct Server {
    port: u16,
    child: Option<std::process::Child>,
}

impl Server {
    fn start(port: u16) -> Option<Self> {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = Server {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Redis goes away mid-run: fail closed answers `Err` within the timeout
/// (plus 50 ms), fail open allows and marks the decision, and both work
/// again once Redis is back, without a new store.
#[test]
fn an_outage_fails_closed_or_open_and_recovers() {
    if url().is_none() {
        return;
    }
    let port = free_port();
    let Some(mut server) = Server::start(port) else {
        eprintln!("skipped: redis-server could not be started");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let rt = runtime();
    let timeout = Duration::from_millis(200);
    let seen_on_error = Arc::new(AtomicU64::new(0));
    let (closed, open) = rt.block_on(async {
        let connect = |policy| {
            RedisConfig::new(url.clone())
                .prefix(unique_prefix("outage"))
                .timeout(timeout)
                .failure_policy(policy)
                .connect()
        };
        let closed = Engine::with_store_and_clock(
            catalog(100),
            connect(FailurePolicy::FailClosed).await.expect("connect"),
            SystemClock,
        );
        let counter = seen_on_error.clone();
        let open = Engine::with_store_and_clock(
            catalog(100),
            connect(FailurePolicy::FailOpen).await.expect("connect"),
            SystemClock,
        )
        .with_observer(move |e: &tollgate::DecisionEvent<'_>| {
            if e.decision.allowed_on_error {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        for e in [&closed, &open] {
            e.allocate(Allocation::new("agent", "plan"))
                .expect("allocate");
        }
        (closed, open)
    });
    let req = Request::new("agent").units("tokens", 1);
    rt.block_on(async {
        let d = closed.admit_async(&req).await.expect("admit while up");
        assert!(d.allowed && d.recorded && !d.allowed_on_error);
    });

    server.stop();
    const SLACK: Duration = Duration::from_secs(2);
    rt.block_on(async {
        for _ in 0..3 {
            let started = Instant::now();
            let r = closed.admit_async(&req).await;
            let took = started.elapsed();
            // The first call after the kill may have been written to the
            // dead connection (outcome unknown); then reconnecting is
            // refused and nothing leaves.
            assert!(
                matches!(
                    r,
                    Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. })
                ),
                "{r:?}"
            );
            // Bounded by the timeout, not hanging on the dead server; the slack
            // is for a loaded machine's scheduling, not a speed claim.
            assert!(took <= timeout + SLACK, "took {took:?}");

            let started = Instant::now();
            let d = open.admit_async(&req).await.expect("fail open");
            let took = started.elapsed();
            assert!(d.allowed && d.allowed_on_error && !d.recorded, "{d:?}");
            // Bounded by the timeout, not hanging on the dead server; the slack
            // is for a loaded machine's scheduling, not a speed claim.
            assert!(took <= timeout + SLACK, "took {took:?}");
            // Reservations cannot be made up: they fail closed.
            assert!(open
                .reserve_async(&req, Duration::from_secs(60))
                .await
                .is_err());
        }
    });
    assert_eq!(
        seen_on_error.load(Ordering::Relaxed),
        3,
        "the observer counts them"
    );

    let _server = Server::start(port).expect("restart redis-server");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match closed.admit_async(&req).await {
                Ok(d) => {
                    // The restarted server is empty: usage starts again.
                    assert!(d.allowed && d.recorded, "{d:?}");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let d = open.admit_async(&req).await.expect("admit");
        assert!(d.recorded && !d.allowed_on_error);
    });
}

/// The reservation calls and `overdue` through the async engine, on batch
/// time with a manual clock.
#[test]
fn reservations_through_the_async_engine() {
    let Some(url) = url() else { return };
    let rt = runtime();
    rt.block_on(async {
        let store = batch_store(&url, "reserve").await;
        let tag = store.key_tag().to_owned();
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
        let secret = "sk_live_51HxYzAbCdEfGhIjKlMnOp";
        engine
            .allocate(Allocation::new(secret, "plan"))
            .expect("allocate");
        let ttl = Duration::from_secs(3600);
        let mut res = engine
            .reserve_async(&Request::new(secret).units("tokens", 60), ttl)
            .await
            .expect("reserve")
            .expect("admitted");
        let refused = engine
            .reserve_async(&Request::new(secret).units("tokens", 10), ttl)
            .await
            .expect("reserve");
        assert!(refused.is_err(), "one slot only");
        engine
            .grow_async(&mut res, &Request::new(secret).units("tokens", 5))
            .await
            .expect("grow");
        engine.renew_async(&mut res, ttl).await.expect("renew");
        clock.advance(chrono::Duration::minutes(11));
        let overdue = engine.overdue_async().await.expect("overdue");
        assert_eq!(overdue.len(), 1);
        assert_eq!(overdue[0].id, res.id());
        assert_eq!(
            overdue[0].owner,
            ScopeKey::subject(engine.store().digest_of(&ScopeKey::subject(secret))),
            "an owner is reported as its keyed digest"
        );
        let d = engine
            .commit_async(&res, &Request::new(secret).units("tokens", 40).event("c1"))
            .await
            .expect("commit");
        let again = engine
            .commit_async(&res, &Request::new(secret).units("tokens", 40).event("c1"))
            .await
            .expect("a retried commit replays");
        assert_eq!(d.limits, again.limits);
        let l = d
            .limit(&ScopeKey::subject(secret), "tokens")
            .expect("limit");
        assert_eq!((l.used, l.held), (40, 0));
        assert!(engine.overdue_async().await.expect("overdue").is_empty());
        assert!(matches!(
            engine.release_async(&res, tollgate::Outcome::Failed).await,
            Err(Error::ReservationSettled { .. })
        ));

        // No raw id in any key or value under the prefix.
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for key in scan(&mut conn, &tag).await {
            assert!(!key.contains(secret), "{key}");
            let dump: Vec<u8> = redis::cmd("DUMP")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("dump");
            assert!(
                !dump.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{key} holds the raw id"
            );
        }
        let (_, without) = keys_without_ttl(&url, &tag).await;
        assert!(without.is_empty(), "{without:?}");
        flush(&url, &tag).await;
    });
}

/// On the server's clock a scope's hash skips `PEXPIRE` when it already
/// lives long enough, trusting the expiry it wrote last (field `x`): that
/// field must match the key's real TTL after every kind of write, and cover
/// every calendar counter's period end and every hold's expiry, plus the
/// margin; the hold-expiry set lives as long as its hash.
/// A counter field's numbers (or the expiry field `x`'s): `#` and
/// little-endian doubles (every value below 2^53), or decimal words
/// separated by spaces.
fn counter_words(v: &[u8]) -> Vec<i64> {
    match v.split_first() {
        Some((b'#', rest)) => rest
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as i64)
            .collect(),
        _ => std::str::from_utf8(v)
            .expect("text")
            .split(' ')
            .map(|w| w.parse().expect("number"))
            .collect(),
    }
}

#[test]
fn server_clock_expiries_match_what_keys_record() {
    let Some(url) = url() else { return };
    let rt = runtime();
    rt.block_on(async {
        let margin = Duration::from_secs(600);
        let store = RedisConfig::new(url.clone())
            .prefix(unique_prefix("expiry"))
            .expiry_margin(margin)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let tag = store.key_tag().to_owned();
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .meter(Meter::count("jobs"))
            .plan(
                PlanConfig::new("plan")
                    .max_job_duration("3d")
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::calendar(Period::Day),
                        1_000u64,
                    ))
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::Rolling {
                            span_secs: 86_400,
                            buckets: 24,
                        },
                        1_000u64,
                    ))
                    .limit(LimitConfig::new("jobs", Window::Concurrent, 5u64)),
            )
            .build()
            .expect("catalog");
        let engine = Engine::with_store_and_clock(catalog, store, SystemClock);
        engine
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let margin_ms = i64::try_from(margin.as_millis()).unwrap();
        let mut check = async |step: &str| {
            let mut counters = 0;
            for key in scan(&mut conn, &tag).await {
                if !key.contains(":c:") || key.ends_with(":x") {
                    continue;
                }
                let (fields, pttl, time): (Vec<Vec<u8>>, i64, (i64, i64)) = redis::pipe()
                    .cmd("HGETALL")
                    .arg(&key)
                    .cmd("PTTL")
                    .arg(&key)
                    .cmd("TIME")
                    .query_async(&mut conn)
                    .await
                    .expect("read");
                let now = time.0 * 1000 + time.1 / 1000;
                let x = fields
                    .chunks(2)
                    .find(|kv| kv[0] == b"x")
                    .map(|kv| counter_words(&kv[1])[0])
                    .unwrap_or_else(|| panic!("{step}: {key} has no x"));
                assert!(pttl > 0, "{step}: {key} pttl {pttl}");
                assert!(
                    (now + pttl - x).abs() <= 50,
                    "{step}: {key} expires at {} but records {x}",
                    now + pttl
                );
                // A calendar counter's field packs `used held start end`.
                for kv in fields.chunks(2) {
                    if kv[0] == b"x" || kv[0].contains(&b'|') {
                        continue;
                    }
                    counters += 1;
                    let words = counter_words(&kv[1]);
                    if kv[0].ends_with(b":cd0") {
                        assert_eq!(words.len(), 4, "{step}: {kv:?}");
                        assert!(
                            x >= words[3] + margin_ms,
                            "{step}: {key} x {x} before {kv:?}"
                        );
                    }
                }
                let holds: Vec<(String, i64)> = redis::cmd("ZRANGE")
                    .arg(format!("{key}:x"))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .expect("zrange");
                if let Some(last) = holds.iter().map(|h| h.1).max() {
                    assert!(
                        x >= last + margin_ms,
                        "{step}: {key} x {x} before hold {last}"
                    );
                    let zttl: i64 = redis::cmd("PTTL")
                        .arg(format!("{key}:x"))
                        .query_async(&mut conn)
                        .await
                        .expect("pttl");
                    assert!((zttl - pttl).abs() <= 50, "{step}: {key} {zttl} / {pttl}");
                }
            }
            assert!(counters > 0, "{step}: no counters");
        };
        let tokens = |n: u64| Request::new("agent").units("tokens", n);
        for _ in 0..3 {
            engine.admit_async(&tokens(1)).await.expect("admit");
        }
        check("admits").await;
        let mut res = engine
            .reserve_async(&tokens(5).units("jobs", 1), Duration::from_secs(30 * 3600))
            .await
            .expect("reserve")
            .expect("admitted");
        check("reserve past the day").await;
        engine.admit_async(&tokens(1)).await.expect("admit");
        check("admit beside a hold").await;
        engine
            .renew_async(&mut res, Duration::from_secs(50 * 3600))
            .await
            .expect("renew");
        check("renew").await;
        engine.commit_async(&res, &tokens(4)).await.expect("commit");
        check("commit").await;
        engine.admit_async(&tokens(1)).await.expect("admit");
        check("admit after").await;
        let (_, without) = keys_without_ttl(&url, &tag).await;
        assert!(without.is_empty(), "{without:?}");
        flush(&url, &tag).await;
    });
}

/// `usage_async` on a `RedisStore` reports what `usage` reports on a
/// `MemoryStore` after the same calls (batch time, one manual clock):
/// calendar, rolling and lifetime usage, a hold, and a rolled period.
#[test]
fn usage_async_on_redis_matches_usage_in_memory() {
    let Some(url) = url() else { return };
    let rt = runtime();
    rt.block_on(async {
        let store = batch_store(&url, "usage").await;
        let tag = store.key_tag().to_owned();
        let catalog = || {
            CatalogConfig::default()
                .meter(Meter::count("tokens"))
                .meter(Meter::count("jobs"))
                .plan(
                    PlanConfig::new("plan")
                        .limit(LimitConfig::new(
                            "tokens",
                            Window::calendar(Period::Day),
                            1_000u64,
                        ))
                        .limit(LimitConfig::new(
                            "tokens",
                            Window::Rolling {
                                span_secs: 3_600,
                                buckets: 6,
                            },
                            500u64,
                        ))
                        .limit(LimitConfig::new("tokens", Window::Lifetime, 5_000u64))
                        .limit(LimitConfig::new("jobs", Window::Concurrent, 2u64)),
                )
                .build()
                .expect("catalog")
        };
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 23, 30, 0).unwrap());
        let redis = Engine::with_store_and_clock(catalog(), store, clock.clone());
        let memory = Engine::with_clock(catalog(), clock.clone());
        redis
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        memory
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        let same = async |step: &str| {
            assert_eq!(
                redis.usage_async("agent").await.expect("usage_async"),
                memory.usage("agent").expect("usage"),
                "{step}"
            );
        };
        same("empty").await;
        let req = Request::new("agent").units("tokens", 120);
        redis.admit_async(&req).await.expect("admit");
        memory.admit(&req).expect("admit");
        let job = Request::new("agent").units("tokens", 30).units("jobs", 1);
        let ttl = Duration::from_secs(7_200);
        let _r = redis.reserve_async(&job, ttl).await.expect("reserve");
        let _m = memory.reserve(&job, ttl).expect("reserve");
        same("admit and hold").await;
        clock.advance(chrono::Duration::minutes(45));
        same("next day, next buckets").await;
        redis.admit_async(&req).await.expect("admit");
        memory.admit(&req).expect("admit");
        same("admit after").await;
        assert!(matches!(
            redis.usage_async("nobody").await,
            Err(Error::UnknownSubject { .. })
        ));
        let (_, without) = keys_without_ttl(&url, &tag).await;
        assert!(without.is_empty(), "{without:?}");
        flush(&url, &tag).await;
    });
}

/// A small deterministic generator for the balance differential.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random prepaid-balance batches (contract rule 10) — grants (replayed,
/// conflicting, tied on their terms so the ids' bytes order them, past a
/// `u64`), debits in every mode with overdrafts, holds under leases that
/// open, grow, renew, settle and expire, on a subject's and a pool's
/// balance, with a clock that now and then steps back — give the same
/// answers (or the same kind of error) on `MemoryStore` and `RedisStore`.
#[test]
fn balances_answer_as_the_memory_store_does() {
    use tollgate::store::{
        BalanceAction, BalanceOp, CounterOp, Fraction, GrantOp, LeaseAction, LeaseId, LeaseOp,
        MemoryStore, Mode,
    };
    use tollgate::Name;

    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let store = rt.block_on(batch_store(&url, "baldiff"));
    let tag = store.key_tag().to_owned();
    let redis = Blocking {
        rt: rt.clone(),
        store,
    };
    let memory = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let team = ScopeKey::pool("team");
    let cost = Name::new("cost");
    let meter = Name::new("t");
    let ids = [
        "pay-b", "pay-a", "pay-c", "Pay-0", "pi_1", "pi_10", "é-ü", "pay a",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = 1_767_225_600_000_i64;
    let mut now = base;
    let mut leases: Vec<(LeaseId, bool)> = Vec::new();
    let mut seen = [0usize; 6];
    // Replays, uncovered, in debt, applied, refused, conflicts, overflows,
    // other errors.
    let mut outcomes = [0usize; 8];
    // Answers listing grants tied on their terms (ordered by id bytes).
    let mut ties = 0;
    // Events applied again and replayed.
    let mut replays = 0;
    for step in 0..1_500 {
        now += rng.below(20) as i64;
        if rng.below(10) == 0 {
            now -= rng.below(40) as i64;
        }
        let scope = if rng.below(4) == 0 { &team } else { &a };
        let amount = match rng.below(20) {
            0 => 0,
            1 => u64::MAX - rng.below(3),
            2 => 1 << 53,
            _ => 1 + rng.below(60),
        };
        let overdraft = [0, 0, 5, 30, u64::MAX][rng.below(5) as usize];
        let debit = BalanceOp::new(scope, cost, BalanceAction::Debit { amount, overdraft });
        let mode = [Mode::Check, Mode::WithinLimits, Mode::Force][rng.below(3) as usize];
        let ops_one = [CounterOp::new(
            &a,
            meter,
            Window::Lifetime,
            rng.below(3),
            Some(1_000),
        )];
        let ops: &[CounterOp<'_>] = if rng.below(3) == 0 { &ops_one } else { &[] };
        // Mostly one of the latest leases, on the balance it holds on.
        let pick_lease = |rng: &mut Rng, leases: &[(LeaseId, bool)]| {
            if leases.is_empty() || rng.below(10) == 0 {
                (LeaseId::random(), false)
            } else {
                let back = 1 + rng.below(leases.len().min(3) as u64) as usize;
                leases[leases.len() - back]
            }
        };
        let kind = rng.below(12);
        // Ids come in generations, so new grants keep arriving; an id's
        // terms are its own but for now and then (a conflict).
        let which = rng.below(ids.len() as u64) as usize;
        let id_pick = format!("{}#{}", ids[which], step / 250);
        let grant_op;
        let batch = match kind {
            0..=2 => {
                seen[0] += 1;
                // Terms from small sets, so grants tie and ids repeat.
                let w = which as u64;
                let gen = (step / 250) as i64;
                // Ids 0 and 6, 1 and 7 have the same terms: tied, the
                // ids' bytes order them.
                let eff = base + gen * 250 + [0, 50][(w % 2) as usize];
                let amount = match rng.below(25) {
                    0 => u64::MAX - rng.below(100),
                    1 => 1 + rng.below(80),
                    _ => 10 + w * 7,
                };
                let mut g = GrantOp::new(&id_pick, amount, eff);
                if w % 3 != 0 {
                    g = g.expiring(eff + [1, 100, 300][(w % 3) as usize]);
                }
                g = g.priority(if rng.below(15) == 0 {
                    9
                } else {
                    (w % 2) as u32
                });
                grant_op = BalanceOp::new(scope, cost, BalanceAction::Grant(g));
                Batch::new(&[], Mode::Force, now).with_balance(grant_op)
            }
            3..=5 => {
                seen[1] += 1;
                Batch::new(ops, mode, now).with_balance(debit)
            }
            6 | 7 => {
                seen[2] += 1;
                let id = LeaseId::random();
                leases.push((id, scope == &team));
                let open = LeaseOp::new(
                    id,
                    &a,
                    LeaseAction::Open {
                        expires_at_ms: now + 1 + rng.below(150) as i64,
                        deadline_ms: None,
                    },
                );
                let m = if rng.below(4) == 0 {
                    Mode::Check
                } else {
                    Mode::WithinLimits
                };
                Batch::new(ops, m, now).with_lease(open).with_balance(debit)
            }
            8 => {
                seen[3] += 1;
                let (id, on_team) = pick_lease(&mut rng, &leases);
                let grow = LeaseOp::new(id, &a, LeaseAction::Grow);
                let m = if rng.below(2) == 0 {
                    Mode::Force
                } else {
                    Mode::WithinLimits
                };
                let s = if on_team == (rng.below(8) != 0) {
                    &team
                } else {
                    &a
                };
                let debit = BalanceOp::new(s, cost, BalanceAction::Debit { amount, overdraft });
                Batch::new(ops, m, now).with_lease(grow).with_balance(debit)
            }
            9 => {
                seen[4] += 1;
                let renew = LeaseOp::new(
                    pick_lease(&mut rng, &leases).0,
                    &a,
                    LeaseAction::Renew {
                        expires_at_ms: now + 1 + rng.below(150) as i64,
                    },
                );
                Batch::new(&[], Mode::Force, now).with_lease(renew)
            }
            _ => {
                seen[5] += 1;
                let keep = Fraction::new(rng.below(4), 3).unwrap_or(Fraction::ONE);
                let (id, on_team) = pick_lease(&mut rng, &leases);
                let settle = LeaseOp::new(id, &a, LeaseAction::Settle { keep });
                let b = Batch::new(ops, Mode::Force, now).with_lease(settle);
                let s = if on_team == (rng.below(8) != 0) {
                    &team
                } else {
                    &a
                };
                if rng.below(2) == 0 {
                    b.with_balance(BalanceOp::new(
                        s,
                        cost,
                        BalanceAction::Debit { amount, overdraft },
                    ))
                } else {
                    b
                }
            }
        };
        // Now and then under an event id, applied twice: the second is a
        // replay of the first answer, balance and all.
        let ev = format!("ev-{step}");
        let evented = rng.below(6) == 0;
        let batch = if evented {
            batch.with_event(tollgate::store::EventKey::new(&ev, step as u64))
        } else {
            batch
        };
        let want = AllowanceStore::apply(&memory, &batch);
        let got = redis.apply(&batch);
        if evented {
            let again = (AllowanceStore::apply(&memory, &batch), redis.apply(&batch));
            match again {
                (Ok(w), Ok(g)) => {
                    replays += usize::from(w.replayed_at_ms == Some(now));
                    assert_eq!(g, w, "step {step}, again: {batch:?}");
                }
                (Err(w), Err(g)) => assert_eq!(
                    std::mem::discriminant(&g),
                    std::mem::discriminant(&w),
                    "step {step}, again: {batch:?}: {g:?} for {w:?}"
                ),
                (w, g) => panic!("step {step}, again: {batch:?}: redis {g:?}, memory {w:?}"),
            }
        }
        if let Ok(Some(b)) = want.as_ref().map(|w| w.balance.as_ref()) {
            ties += b
                .grants
                .windows(2)
                .filter(|p| {
                    (p[0].priority, p[0].expires_at_ms, p[0].effective_at_ms)
                        == (p[1].priority, p[1].expires_at_ms, p[1].effective_at_ms)
                })
                .count();
        }
        match &want {
            Ok(w) if w.replayed_at_ms.is_some() => outcomes[0] += 1,
            Ok(w) if w.applied && w.balance.as_ref().is_some_and(|b| b.uncovered > 0) => {
                outcomes[1] += 1
            }
            Ok(w) if w.applied && w.balance.as_ref().is_some_and(|b| b.debt > 0) => {
                outcomes[2] += 1
            }
            Ok(w) if w.applied => outcomes[3] += 1,
            Ok(_) => outcomes[4] += 1,
            Err(Error::GrantConflict { .. }) => outcomes[5] += 1,
            Err(Error::Overflow { .. }) => outcomes[6] += 1,
            Err(_) => outcomes[7] += 1,
        }
        match (&want, &got) {
            (Ok(w), Ok(g)) => assert_eq!(g, w, "step {step}: {batch:?}"),
            (Err(w), Err(g)) => assert_eq!(
                std::mem::discriminant(g),
                std::mem::discriminant(w),
                "step {step}: {batch:?}: {g:?} for {w:?}"
            ),
            _ => panic!("step {step}: {batch:?}: redis {got:?}, memory {want:?}"),
        }
        // A read of both balances at the same time agrees too.
        for s in [&a, &team] {
            let read = BalanceOp::new(
                s,
                cost,
                BalanceAction::Debit {
                    amount: 0,
                    overdraft: 0,
                },
            );
            let b = Batch::new(&[], Mode::Check, now).with_balance(read);
            assert_eq!(
                redis.apply(&b).ok(),
                AllowanceStore::apply(&memory, &b).ok(),
                "step {step}: read of {s:?}"
            );
        }
    }
    assert!(
        seen.iter().all(|&n| n > 50),
        "every kind of batch ran: {seen:?}"
    );
    assert!(
        outcomes.iter().all(|&n| n > 0),
        "every kind of answer was compared: {outcomes:?}"
    );
    assert!(ties > 5, "grants tied on their terms: {ties}");
    assert!(replays > 20, "events replayed: {replays}");
    let (_, without) = rt.block_on(keys_without_ttl(&url, &tag));
    assert!(without.is_empty(), "keys without a TTL: {without:?}");
    rt.block_on(flush(&url, &tag));
}

/// Grants tied on priority, expiry and start are consumed in the order of
/// their ids' bytes, which only the client can read (the script asks for
/// their order and the call is made again): the same on every store.
#[test]
fn tied_grants_go_by_their_ids_bytes() {
    use tollgate::store::{BalanceAction, BalanceOp, GrantOp, Mode};
    use tollgate::Name;

    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let store = rt.block_on(batch_store(&url, "ties"));
    let tag = store.key_tag().to_owned();
    let redis = Blocking {
        rt: rt.clone(),
        store,
    };
    let a = ScopeKey::subject("a");
    let cost = Name::new("cost");
    let now = 1_767_225_600_000_i64;
    for id in ["pay-c", "pay-a", "Pay-z", "pay-b", "pay-a2"] {
        let g = BalanceOp::new(&a, cost, BalanceAction::Grant(GrantOp::new(id, 10, now)));
        let r = redis
            .apply(&Batch::new(&[], Mode::Force, now).with_balance(g))
            .expect("grant");
        assert!(r.applied && r.replayed_at_ms.is_none());
    }
    let debit = BalanceOp::new(
        &a,
        cost,
        BalanceAction::Debit {
            amount: 25,
            overdraft: 0,
        },
    );
    let r = redis
        .apply(&Batch::new(&[], Mode::WithinLimits, now + 1).with_balance(debit))
        .expect("debit");
    let b = r.balance.expect("reported");
    let left: Vec<(&str, u64)> = b.grants.iter().map(|g| (g.id.as_str(), g.spent)).collect();
    assert_eq!(
        left,
        [("pay-a2", 5), ("pay-b", 0), ("pay-c", 0)],
        "`Pay-z` then `pay-a` spent first (bytes: `P` < `p`), then half of `pay-a2`"
    );
    assert_eq!(b.remaining, 25);
    rt.block_on(flush(&url, &tag));
}

/// The raw value of a counter's field: `scope`'s hash, the field of
/// `meter` (length-prefixed) and window code `w`.
async fn raw_field(url: &str, store: &RedisStore, scope: &ScopeKey, field: &str) -> Vec<u8> {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let digest = store.digest_of(scope);
    let key = format!(
        "{}:c:{}",
        store.key_tag(),
        digest.strip_prefix("hmac:").expect("digest")
    );
    let v: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&key)
        .arg(field)
        .query_async(&mut conn)
        .await
        .expect("hget");
    v.unwrap_or_default()
}

/// Counters below 2^53 are packed as doubles, at or past it kept as
/// decimal text: near, at and past 2^53 and up to `u64::MAX` a counter
/// stays exact beside small ones in the same scope hash (a lifetime, a
/// calendar and a rolling window, fast and slow in one batch), and a sum
/// past `u64::MAX` is refused with nothing changed.
#[test]
fn counters_stay_exact_across_2_53() {
    use tollgate::store::{CounterOp, Mode};
    use tollgate::Name;
    let Some(url) = url() else { return };
    let rt = runtime();
    let store = rt.block_on(batch_store(&url, "exact53"));
    let tag = store.key_tag().to_owned();
    let s = ScopeKey::subject("big");
    let t = Name::new("t");
    let day = Window::calendar(Period::Day);
    let rolling = Window::Rolling {
        span_secs: 3_600,
        buckets: 4,
    };
    let now = Utc
        .with_ymd_and_hms(2026, 12, 6, 12, 0, 0)
        .unwrap()
        .timestamp_millis();
    const P53: u64 = 1 << 53;
    let apply = |deltas: [u64; 3], mode: Mode, max: Option<u64>| {
        let ops = [
            CounterOp::new(&s, t, Window::Lifetime, deltas[0], max),
            CounterOp::new(&s, t, day, deltas[1], Some(1_000)),
            CounterOp::new(&s, t, rolling, deltas[2], None),
        ];
        rt.block_on(AsyncAllowanceStore::apply(
            &store,
            &Batch::new(&ops, mode, now),
        ))
    };
    let used = |a: &Applied| -> Vec<u64> { a.counters.iter().map(|c| c.used).collect() };
    // (lifetime delta, day delta, rolling delta) and the counters after.
    let steps: [([u64; 3], [u64; 3]); 6] = [
        ([P53 - 2, 1, 1], [P53 - 2, 1, 1]),
        ([1, 1, P53 - 2], [P53 - 1, 2, P53 - 1]),
        ([1, 1, 1], [P53, 3, P53]),
        ([1, 1, 2], [P53 + 1, 4, P53 + 2]),
        ([0, 1, 0], [P53 + 1, 5, P53 + 2]),
        (
            [u64::MAX - P53 - 2, 1, u64::MAX - P53 - 2],
            [u64::MAX - 1, 6, u64::MAX],
        ),
    ];
    for (i, (deltas, want)) in steps.iter().enumerate() {
        let a = apply(*deltas, Mode::Force, None).expect("force");
        assert!(a.applied, "step {i}");
        assert_eq!(used(&a), want.to_vec(), "step {i}");
        // Read back (from the stored fields) by a check.
        let a = apply([0; 3], Mode::Check, None).expect("check");
        assert_eq!(used(&a), want.to_vec(), "step {i}, read back");
    }
    // The small counter is packed; the large ones are decimal text.
    rt.block_on(async {
        let small = raw_field(&url, &store, &s, "1:t:cd0").await;
        assert_eq!(small.first(), Some(&b'#'), "{small:?}");
        let large = raw_field(&url, &store, &s, "1:t:l").await;
        assert_eq!(
            std::str::from_utf8(&large).ok(),
            Some(format!("{} 0", u64::MAX - 1).as_str())
        );
    });
    // Past u64::MAX: refused (forced, or with no maximum), nothing changed.
    assert!(matches!(
        apply([2, 1, 0], Mode::Force, None),
        Err(Error::Overflow { .. })
    ));
    assert!(matches!(
        apply([0, 1, 1], Mode::Force, None),
        Err(Error::Overflow { .. })
    ));
    // Within limits: the lifetime counter's last unit fits u64::MAX, two
    // do not.
    let a = apply([2, 1, 0], Mode::WithinLimits, Some(u64::MAX)).expect("within");
    assert!(!a.applied);
    let a = apply([0; 3], Mode::Check, None).expect("check");
    assert_eq!(used(&a), vec![u64::MAX - 1, 6, u64::MAX]);
    let a = apply([1, 1, 0], Mode::WithinLimits, Some(u64::MAX)).expect("within");
    assert!(a.applied);
    assert_eq!(used(&a), vec![u64::MAX, 7, u64::MAX]);
    rt.block_on(flush(&url, &tag));
}

/// Counter fields and ledger entries written as decimal text (before
/// counters were packed) are read as they were meant, and a counter is
/// written back packed.
#[test]
fn text_fields_and_ledger_entries_are_still_read() {
    use tollgate::store::{CounterOp, EventKey, Mode};
    use tollgate::Name;
    let Some(url) = url() else { return };
    let rt = runtime();
    let store = rt.block_on(batch_store(&url, "text-format"));
    let tag = store.key_tag().to_owned();
    let s = ScopeKey::subject("old");
    let t = Name::new("t");
    let day = Window::calendar(Period::Day);
    let start = Utc
        .with_ymd_and_hms(2026, 12, 6, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let (end, now) = (start + 86_400_000, start + 43_200_000);
    let key = format!(
        "{tag}:c:{}",
        store
            .digest_of(&s)
            .strip_prefix("hmac:")
            .expect("digest")
            .to_owned()
    );
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        // Today's counter at 40 and a lifetime one at 2^53 + 3, as text.
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("1:t:cd0")
            .arg(format!("40 0 {start} {end}"))
            .arg("1:t:l")
            .arg(format!("{} 0", (1u64 << 53) + 3))
            .query_async(&mut conn)
            .await
            .expect("hset");
        let _: () = redis::cmd("PEXPIRE")
            .arg(&key)
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("pexpire");
        let ops = [
            CounterOp::new(&s, t, day, 2, Some(100)),
            CounterOp::new(&s, t, Window::Lifetime, 1, None),
        ];
        let a = AsyncAllowanceStore::apply(&store, &Batch::new(&ops, Mode::WithinLimits, now))
            .await
            .expect("admit");
        assert!(a.applied);
        assert_eq!(a.counters[0].used, 42);
        assert_eq!(a.counters[0].period_start_ms, Some(start));
        assert_eq!(a.counters[1].used, (1 << 53) + 4);
        let day_field = raw_field(&url, &store, &s, "1:t:cd0").await;
        assert_eq!(day_field.first(), Some(&b'#'), "{day_field:?}");

        // On the server's clock, a hash's expiry field `x` in decimal text
        // is read too (and a lifetime counter beside it).
        let srv = RedisConfig::new(url.as_str())
            .prefix(tag.trim_matches(['{', '}']))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let s2 = ScopeKey::subject("old-server-clock");
        let key2 = format!(
            "{tag}:c:{}",
            srv.digest_of(&s2).strip_prefix("hmac:").expect("digest")
        );
        let far = Utc::now().timestamp_millis() + 86_400_000;
        let _: () = redis::cmd("HSET")
            .arg(&key2)
            .arg("x")
            .arg(far.to_string())
            .arg("1:t:l")
            .arg("7 0")
            .query_async(&mut conn)
            .await
            .expect("hset");
        let _: () = redis::cmd("PEXPIRE")
            .arg(&key2)
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("pexpire");
        let ops2 = [CounterOp::new(&s2, t, Window::Lifetime, 1, None)];
        let a = AsyncAllowanceStore::apply(&srv, &Batch::new(&ops2, Mode::Force, now))
            .await
            .expect("server clock");
        assert_eq!(a.counters[0].used, 8);

        // A ledger entry in the text form: "<fingerprint digest> <time>
        // <answer words>". Its fingerprint digest is taken from the entry
        // this store writes (msgpack: str8 of 32 bytes first).
        let once = [CounterOp::new(&s, t, Window::Lifetime, 5, None)];
        let batch = Batch::new(&once, Mode::Force, now).with_event(EventKey::new("evt-old", 9));
        let first = AsyncAllowanceStore::apply(&store, &batch)
            .await
            .expect("record");
        assert_eq!(first.counters[0].used, (1 << 53) + 9);
        let ekeys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{tag}:e:*"))
            .query_async(&mut conn)
            .await
            .expect("keys");
        assert_eq!(ekeys.len(), 1, "{ekeys:?}");
        let entry: Vec<u8> = redis::cmd("GET")
            .arg(&ekeys[0])
            .query_async(&mut conn)
            .await
            .expect("get");
        assert_eq!(&entry[..2], &[0xd9, 32], "{entry:?}");
        let fp = std::str::from_utf8(&entry[2..34]).expect("digest");
        let text = format!("{fp} {now} OK 1 {now} 1 777 0 - - - 0 0");
        let _: () = redis::cmd("SET")
            .arg(&ekeys[0])
            .arg(text)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("set");
        let again = AsyncAllowanceStore::apply(&store, &batch)
            .await
            .expect("replay");
        assert_eq!(again.replayed_at_ms, Some(now));
        assert_eq!(again.counters[0].used, 777, "answered from the entry");
        let other = Batch::new(&once, Mode::Force, now).with_event(EventKey::new("evt-old", 10));
        assert!(matches!(
            AsyncAllowanceStore::apply(&store, &other).await,
            Err(Error::EventConflict { .. })
        ));
        // And a replay of an entry in the new form answers the same.
        let b2 = Batch::new(&once, Mode::Force, now).with_event(EventKey::new("evt-new", 9));
        let a1 = AsyncAllowanceStore::apply(&store, &b2).await.expect("new");
        let a2 = AsyncAllowanceStore::apply(&store, &b2)
            .await
            .expect("replay");
        assert_eq!(a2.replayed_at_ms, Some(now));
        assert_eq!(a1.counters, a2.counters);
        assert_eq!(a1.applied, a2.applied);
    });
    rt.block_on(flush(&url, &tag));
}

/// The apply library is loaded at connect; a server that loses it
/// (`FUNCTION DELETE`, a restart without persistence) gets it again on the
/// next call, which then applies once.
#[test]
fn a_server_without_the_library_gets_it_again() {
    use tollgate::store::{CounterOp, Mode};
    use tollgate::Name;
    let Some(url) = url() else { return };
    let rt = runtime();
    let store = rt.block_on(batch_store(&url, "reload"));
    let tag = store.key_tag().to_owned();
    let s = ScopeKey::subject("a");
    let ops = [CounterOp::new(
        &s,
        Name::new("t"),
        Window::Lifetime,
        1,
        None,
    )];
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let libraries = async |conn: &mut redis::aio::MultiplexedConnection| -> Vec<String> {
            fn words(v: &redis::Value, out: &mut Vec<String>) {
                match v {
                    redis::Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into()),
                    redis::Value::SimpleString(s) => out.push(s.clone()),
                    redis::Value::Array(items) => items.iter().for_each(|i| words(i, out)),
                    redis::Value::Map(kv) => kv.iter().for_each(|(k, v)| {
                        words(k, out);
                        words(v, out);
                    }),
                    _ => {}
                }
            }
            let list: redis::Value = redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg("tollgate_*")
                .query_async(conn)
                .await
                .expect("function list");
            let mut all = Vec::new();
            words(&list, &mut all);
            all.windows(2)
                .filter(|w| w[0] == "library_name")
                .map(|w| w[1].clone())
                .collect()
        };
        let loaded = libraries(&mut conn).await;
        assert!(!loaded.is_empty(), "no tollgate library loaded");
        for name in &loaded {
            let _: () = redis::cmd("FUNCTION")
                .arg("DELETE")
                .arg(name)
                .query_async(&mut conn)
                .await
                .expect("function delete");
        }
        let a = AsyncAllowanceStore::apply(&store, &Batch::new(&ops, Mode::Force, 1_000))
            .await
            .expect("apply after FUNCTION DELETE");
        assert_eq!(a.counters[0].used, 1, "applied once");
        assert!(!libraries(&mut conn).await.is_empty(), "loaded again");
    });
    rt.block_on(flush(&url, &tag));
}

/// Usage history (contract rule 11) through the engine on Redis: last
/// month read before its counter rolled (the hash lives `history_periods`
/// months past the period's end for it) and after (the total the roll kept
/// in the hash), a depth past the maximum refused at connect, and a report
/// further back than kept refused.
#[test]
fn closed_periods_are_reported_through_the_engine() {
    let Some(url) = url() else { return };
    let rt = runtime();
    rt.block_on(async {
        match RedisConfig::new(url.clone())
            .history_periods(tollgate::store::MAX_HISTORY_PERIODS + 1)
            .connect()
            .await
        {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "redis.history_periods"),
            other => panic!("expected InvalidConfig, got {:?}", other.map(|_| ())),
        }
        let store = RedisConfig::new(url.clone())
            .prefix(unique_prefix("history"))
            .time_source(TimeSource::Batch)
            .timeout(Duration::from_secs(5))
            .history_periods(2)
            .connect()
            .await
            .expect("connect");
        let tag = store.key_tag().to_owned();
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .plan(PlanConfig::new("plan").limit(LimitConfig::new(
                "tokens",
                Window::calendar(Period::Month),
                1_000_000u64,
            )))
            .build()
            .expect("catalog");
        let march = Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap();
        let clock = Arc::new(ManualClock::new(march));
        let e = Engine::with_store_and_clock(catalog, store, clock.clone());
        e.allocate(Allocation::new("acct", "plan")).unwrap();
        e.admit_async(&Request::new("acct").units("tokens", 1_234))
            .await
            .unwrap();
        // The scope's hash lives two months' worth past March's end.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys = scan(&mut conn, &tag).await;
        let hash = keys
            .iter()
            .find(|k| k.contains(":c:") && !k.ends_with(":x"))
            .expect("the scope's counters hash");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(hash)
            .query_async(&mut conn)
            .await
            .unwrap();
        let april = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
        let readable_until = (april - march).num_milliseconds() + 2 * 31 * 86_400_000;
        assert!(
            pttl >= readable_until,
            "the hash expires in {pttl} ms, before March stops being readable ({readable_until} ms)"
        );
        let units = |r: &tollgate::UsageReport| r.meters[0].units;
        clock.set(Utc.with_ymd_and_hms(2026, 4, 2, 0, 0, 0).unwrap());
        let before = e.usage_in_async("acct", Period::Month, 1).await.unwrap();
        assert_eq!(units(&before), 1_234.into(), "March, from its counter");
        e.admit_async(&Request::new("acct").units("tokens", 5))
            .await
            .unwrap();
        let after = e.usage_in_async("acct", Period::Month, 1).await.unwrap();
        assert_eq!(after, before, "March, from the total its roll kept");
        assert_eq!(
            units(&e.usage_in_async("acct", Period::Month, 0).await.unwrap()),
            5.into()
        );
        // May: April is one back, March two.
        clock.set(Utc.with_ymd_and_hms(2026, 5, 3, 0, 0, 0).unwrap());
        e.admit_async(&Request::new("acct").units("tokens", 1))
            .await
            .unwrap();
        assert_eq!(
            units(&e.usage_in_async("acct", Period::Month, 1).await.unwrap()),
            5.into()
        );
        assert_eq!(
            units(&e.usage_in_async("acct", Period::Month, 2).await.unwrap()),
            1_234.into()
        );
        assert!(matches!(
            e.usage_in_async("acct", Period::Month, 3).await,
            Err(Error::HistoryNotKept { asked: 3, kept: 2 })
        ));
        flush(&url, &tag).await;
    });
}
