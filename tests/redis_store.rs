//! `RedisStore` against a real Redis named by `TOLLGATE_REDIS_URL`: the
//! conformance suite unchanged (through a blocking adapter), many engines on
//! one limit, an outage and its recovery, and TTLs on every key written.
//! Without the variable every test prints that it was skipped and passes.

#[path = "support/conformance.rs"]
#[macro_use]
mod conformance_tests;
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
                let (fields, pttl, time): (Vec<String>, i64, (i64, i64)) = redis::pipe()
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
                    .find(|kv| kv[0] == "x")
                    .map(|kv| kv[1].parse::<i64>().expect("x"))
                    .unwrap_or_else(|| panic!("{step}: {key} has no x"));
                assert!(pttl > 0, "{step}: {key} pttl {pttl}");
                assert!(
                    (now + pttl - x).abs() <= 50,
                    "{step}: {key} expires at {} but records {x}",
                    now + pttl
                );
                // A calendar counter's field packs `used held start end`.
                for kv in fields.chunks(2) {
                    if kv[0] == "x" || kv[0].contains('|') {
                        continue;
                    }
                    counters += 1;
                    let words: Vec<i64> = kv[1]
                        .split(' ')
                        .map(|w| w.parse().expect("number"))
                        .collect();
                    if kv[0].ends_with(":cd0") {
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
