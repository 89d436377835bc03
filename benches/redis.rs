//! Redis throughput: `admit_async` on a `RedisStore` beside a trivial
//! `EVALSHA` INCRBY script and seed 004's sorted-set pattern
//! (ZREMRANGEBYSCORE + ZRANGE + ZADD, one pipeline) at 10 and 1,000 entries
//! per key, each at 1 and 50 concurrent tasks on one multiplexed connection;
//! and a floor script doing only the Redis commands of the admit (`FLOOR`).
//! Each `EVALSHA` case also prints the server's µs per call, from
//! `INFO commandstats` around the case (server-wide: run it on a Redis no
//! one else uses); the admit runs twice, with the event id the engine gives
//! every admit (the ledger) and without (`RedisConfig::engine_event_ids`).
//!
//! `TOLLGATE_REDIS_URL=redis://127.0.0.1:6379 cargo bench --features redis --bench redis`
//! (skipped without the variable). `TOLLGATE_BENCH_SECS` sets the time per
//! case (default 3 s). Keys live under their own prefix and are deleted
//! afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tollgate::store::RedisConfig;
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig, Request,
    SystemClock, Window,
};

const TRIVIAL: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

/// The Redis work any script with tollgate's key layout must do for the
/// bench's admit, and nothing else: the server's `TIME`, one `HMGET` of the
/// scope hash's expiry field and two counters, one number parsed from each,
/// one `HSET` writing both back, and a reply of the admit's shape (16
/// words). It takes the admit's own key and 24 arguments (as `MONITOR`
/// shows them). No windows, no limits, no holds, no ledger: a lower bound
/// on the real script's cost, not a quota.
const FLOOR: &str = r"
local t = redis.call('TIME')
local h = ARGV[11]
local v = redis.call('HMGET', h, 'x', ARGV[12], ARGV[19])
local a = tonumber(string.match(v[2] or '0', '^%d+')) + 1
local b = tonumber(string.match(v[3] or '0', '^%d+')) + 1
redis.call('HSET', h, ARGV[12], a .. ' 0 1795996800000 1796083200000',
  ARGV[19], b .. ' 0 498907 498907 ' .. b)
return {'OK', 1, t[1] * 1000, 2, 1, a, 1795996800000, 1796083200000, '-',
  1, b, 1795979660072, 1796155200000, '-', 0, 0}
";

/// The floor script's key and arguments: the admit's 24 (as `MONITOR`
/// shows them), with its scope hash (arguments 11 and 18) under this run's
/// prefix.
fn floor_args(prefix: &str) -> (String, Vec<String>) {
    let h = format!("{{{prefix}}}:c:floor");
    let args = [
        "1796065967344",
        "1",
        "w",
        "86400000",
        "3600000",
        "316224000000",
        "2",
        "0",
        "-",
        "-",
        &h,
        "6:tokens:cd0",
        "C",
        "d",
        "0",
        "1",
        "9223372036854775807",
        &h,
        "6:tokens:r86400/24",
        "R",
        "3600000",
        "25",
        "1",
        "9223372036854775807",
    ];
    (
        format!("{{{prefix}}}:od"),
        args.iter().map(|s| (*s).to_owned()).collect(),
    )
}

/// `EVALSHA`'s calls and µs so far, from `INFO commandstats`.
async fn evalsha_stats(c: &ConnectionManager) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c.clone())
        .await
        .expect("info");
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .unwrap_or_default();
    let field = |k: &str| {
        line.split(',')
            .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("calls"), field("usec"))
}

/// Server µs per `EVALSHA` between two readings (NaN without calls).
fn server_us(before: (u64, u64), after: (u64, u64)) -> f64 {
    let calls = after.0.saturating_sub(before.0);
    if calls == 0 {
        return f64::NAN;
    }
    after.1.saturating_sub(before.1) as f64 / calls as f64
}

/// Run `op` from `tasks` tasks for `secs`; returns operations per second.
async fn run<F, Fut>(tasks: usize, secs: f64, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < until {
                op().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("bench task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    };
    let secs: f64 = std::env::var("TOLLGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(url, secs));
}

async fn bench(url: String, secs: f64) {
    let prefix = format!("tollgate-bench:{}", std::process::id());
    let client = redis::Client::open(url.as_str()).expect("url");
    let conn = ConnectionManager::new(client).await.expect("connect");

    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    u64::MAX / 2,
                ))
                .limit(LimitConfig::new(
                    "tokens",
                    Window::Rolling {
                        span_secs: 86_400,
                        buckets: 24,
                    },
                    u64::MAX / 2,
                )),
        )
        .build()
        .expect("catalog");
    let mut engines = Vec::new();
    for made_ids in [true, false] {
        let store = RedisConfig::new(url.clone())
            .prefix(prefix.clone())
            .engine_event_ids(made_ids)
            .connect()
            .await
            .expect("connect RedisStore");
        let engine = Arc::new(Engine::with_store_and_clock(
            catalog.clone(),
            store,
            SystemClock,
        ));
        engine
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        engines.push(engine);
    }

    println!(
        "case                                   tasks    ops/s   server µs/EVALSHA   (µs/op at 1 task; {secs} s each)"
    );
    let mut results: Vec<(&str, usize, f64, f64)> = Vec::new();
    for tasks in [1usize, 50] {
        for (e, name) in engines.iter().zip([
            "tollgate admit (day + rolling 24h/24)",
            "tollgate admit, no engine event id",
        ]) {
            let e = e.clone();
            let s0 = evalsha_stats(&conn).await;
            let admit = run(tasks, secs, move || {
                let e = e.clone();
                async move {
                    let d = e
                        .admit_async(&Request::new("agent").units("tokens", 1))
                        .await
                        .expect("admit");
                    assert!(d.allowed);
                }
            })
            .await;
            let us = server_us(s0, evalsha_stats(&conn).await);
            results.push((name, tasks, admit, us));
        }

        let script = Arc::new(redis::Script::new(TRIVIAL));
        let c = conn.clone();
        let key = format!("{{{prefix}}}:trivial");
        let s0 = evalsha_stats(&conn).await;
        let trivial = run(tasks, secs, move || {
            let (script, mut c, key) = (script.clone(), c.clone(), key.clone());
            async move {
                let _: i64 = script
                    .key(&key)
                    .arg(1)
                    .invoke_async(&mut c)
                    .await
                    .expect("evalsha");
            }
        })
        .await;
        let us = server_us(s0, evalsha_stats(&conn).await);
        results.push(("trivial EVALSHA INCRBY", tasks, trivial, us));

        let script = Arc::new(redis::Script::new(FLOOR));
        let c = conn.clone();
        let (key, args) = floor_args(&prefix);
        let args = Arc::new(args);
        let s0 = evalsha_stats(&conn).await;
        let floor = run(tasks, secs, move || {
            let (script, mut c, key, args) = (script.clone(), c.clone(), key.clone(), args.clone());
            async move {
                let mut inv = script.key(&key);
                for a in args.iter() {
                    inv.arg(a);
                }
                let v: redis::Value = inv.invoke_async(&mut c).await.expect("evalsha");
                assert!(matches!(v, redis::Value::Array(ref w) if w.len() == 16));
            }
        })
        .await;
        let us = server_us(s0, evalsha_stats(&conn).await);
        results.push(("floor: TIME + HMGET + HSET, same args", tasks, floor, us));

        for entries in [10usize, 1_000] {
            let key = format!("{{{prefix}}}:zset{entries}");
            let mut c = conn.clone();
            let now = now_ms();
            let mut fill = redis::pipe();
            for i in 0..entries {
                fill.zadd(&key, format!("task{i}:100"), now).ignore();
            }
            let _: () = fill.query_async(&mut c).await.expect("fill");
            let c = conn.clone();
            let zset = run(tasks, secs, move || {
                let (mut c, key) = (c.clone(), key.clone());
                async move {
                    let now = now_ms();
                    let (members,): (Vec<String>,) = redis::pipe()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&key)
                        .arg("-inf")
                        .arg(now - 86_400_000)
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .cmd("ZADD")
                        .arg(&key)
                        .arg(now)
                        .arg("task0:100")
                        .ignore()
                        .query_async(&mut c)
                        .await
                        .expect("zset pattern");
                    let used: u64 = members
                        .iter()
                        .filter_map(|m| m.rsplit(':').next()?.parse::<u64>().ok())
                        .sum();
                    assert!(used > 0);
                }
            })
            .await;
            results.push((
                if entries == 10 {
                    "seed-004 sorted set, 10 entries"
                } else {
                    "seed-004 sorted set, 1,000 entries"
                },
                tasks,
                zset,
                f64::NAN,
            ));
        }
    }
    for (name, tasks, ops, us) in &results {
        let per = if *tasks == 1 {
            format!("{:.0} µs", 1e6 / ops)
        } else {
            String::new()
        };
        let server = if us.is_nan() {
            "-".to_owned()
        } else {
            format!("{us:.1}")
        };
        println!("{name:<38} {tasks:>5} {ops:>9.0}   {server:>17}   {per}");
    }
    let find = |n: &str, t: usize| {
        results
            .iter()
            .find(|(name, tasks, _, _)| name.starts_with(n) && *tasks == t)
            .map_or(f64::NAN, |r| r.2)
    };
    let server = |n: &str| {
        results
            .iter()
            .find(|(name, tasks, _, _)| name.starts_with(n) && *tasks == 50)
            .map_or(f64::NAN, |r| r.3)
    };
    println!(
        "server µs per decision at 50 tasks: admit {:.1} (no engine event id {:.1}), trivial {:.1}, floor {:.1}; trivial / admit {:.2}×",
        server("tollgate admit (day"),
        server("tollgate admit, no"),
        server("trivial"),
        server("floor"),
        server("trivial") / server("tollgate admit (day"),
    );
    println!(
        "admit / trivial at 50 tasks: {:.2}×; admit / sorted set (1,000) at 50 tasks: {:.1}×",
        find("tollgate", 50) / find("trivial", 50),
        find("tollgate", 50) / find("seed-004 sorted set, 1,000", 50)
    );
    println!(
        "floor / trivial at 50 tasks: {:.2}×; admit / floor at 50 tasks: {:.2}×",
        find("floor", 50) / find("trivial", 50),
        find("tollgate", 50) / find("floor", 50)
    );

    // Clean up: only this run's prefix.
    let mut c = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}:*"))
        .query_async(&mut c)
        .await
        .expect("keys");
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("del");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
