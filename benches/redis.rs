//! Redis throughput: `admit_async` on a `RedisStore` beside a trivial
//! `EVALSHA` INCRBY script and seed 004's sorted-set pattern
//! (ZREMRANGEBYSCORE + ZRANGE + ZADD, one pipeline) at 10 and 1,000 entries
//! per key, each at 1 and 50 concurrent tasks on one multiplexed connection;
//! and floor scripts doing only the Redis commands of the admits (`FLOOR`,
//! `FLOOR4`). Each script case (the store's `FCALL`, the others' `EVALSHA`)
//! also prints the server's µs per call, from
//! `INFO commandstats` around the case (server-wide: run it on a Redis no
//! one else uses). Two plans: two limits (a calendar day and a rolling 24 h
//! in 24 buckets) and four (day, week, rolling 24 h, lifetime: the plan of
//! issue 18's target), each admitted with the event id the engine gives
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

/// [`FLOOR`] for the four-limit admit: the same Redis work with four
/// counters (one `HMGET` of the expiry field and four fields, one `HSET` of
/// four) and a reply of that admit's shape (26 words).
const FLOOR4: &str = r"
local t = redis.call('TIME')
local h = ARGV[11]
local v = redis.call('HMGET', h, 'x', ARGV[12], ARGV[19], ARGV[26], ARGV[33])
local a = tonumber(string.match(v[2] or '0', '^%d+')) + 1
local b = tonumber(string.match(v[3] or '0', '^%d+')) + 1
local c = tonumber(string.match(v[4] or '0', '^%d+')) + 1
local d = tonumber(string.match(v[5] or '0', '^%d+')) + 1
redis.call('HSET', h, ARGV[12], a .. ' 0 1795996800000 1796083200000',
  ARGV[19], b .. ' 0 1795737600000 1796342400000', ARGV[26], c .. ' 0 498907 498907 ' .. c,
  ARGV[33], d .. ' 0')
return {'OK', 1, t[1] * 1000, 4, 1, a, 1795996800000, 1796083200000, '-',
  1, b, 1795737600000, 1796342400000, '-', 1, c, 1795979660072, 1796155200000, '-',
  1, d, '-', '-', '-', 0, 0}
";

/// [`FLOOR4`]'s key and arguments: the four-limit admit's 38 (as `MONITOR`
/// shows them).
fn floor4_args(prefix: &str) -> (String, Vec<String>) {
    let h = format!("{{{prefix}}}:c:floor4");
    let max = "9223372036854775807";
    let mut args: Vec<String> = [
        "1796065967344",
        "1",
        "w",
        "86400000",
        "3600000",
        "316224000000",
        "4",
        "0",
        "-",
        "-",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for op in [
        ["6:tokens:cd0", "C", "d", "0"],
        ["6:tokens:cw0", "C", "w", "0"],
        ["6:tokens:r86400/24", "R", "3600000", "25"],
        ["6:tokens:l", "L", "-", "-"],
    ] {
        args.push(h.clone());
        args.extend(op.iter().map(|s| (*s).to_owned()));
        args.push("1".to_owned());
        args.push(max.to_owned());
    }
    (format!("{{{prefix}}}:od"), args)
}

/// Script calls (`EVALSHA` and `FCALL`: the store's library runs with
/// `FCALL`, the trivial and floor scripts with `EVALSHA`) and their µs so
/// far, from `INFO commandstats`.
async fn evalsha_stats(c: &ConnectionManager) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c.clone())
        .await
        .expect("info");
    let mut out = (0, 0);
    for line in info.lines().filter_map(|l| {
        l.strip_prefix("cmdstat_evalsha:")
            .or_else(|| l.strip_prefix("cmdstat_fcall:"))
    }) {
        let field = |k: &str| {
            line.split(',')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.0 += field("calls");
        out.1 += field("usec");
    }
    out
}

/// Server µs per script call between two readings (NaN without calls).
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

    let day = || LimitConfig::new("tokens", Window::calendar(Period::Day), u64::MAX / 2);
    let rolling = || {
        LimitConfig::new(
            "tokens",
            Window::Rolling {
                span_secs: 86_400,
                buckets: 24,
            },
            u64::MAX / 2,
        )
    };
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("two").limit(day()).limit(rolling()))
        .plan(
            PlanConfig::new("four")
                .limit(day())
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Week),
                    u64::MAX / 2,
                ))
                .limit(rolling())
                .limit(LimitConfig::new("tokens", Window::Lifetime, u64::MAX / 2)),
        )
        .build()
        .expect("catalog");
    // (name, engine, subject): each case admits one subject of its plan.
    let mut engines = Vec::new();
    for (made_ids, ids) in [(true, "engine event id"), (false, "no engine event id")] {
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
        for plan in ["two", "four"] {
            let subject = format!("agent-{plan}-{made_ids}");
            engine
                .allocate(Allocation::new(subject.as_str(), plan))
                .expect("allocate");
            let name: &'static str = Box::leak(
                format!("admit, {} limits, {ids}", if plan == "two" { 2 } else { 4 })
                    .into_boxed_str(),
            );
            engines.push((name, engine.clone(), subject));
        }
    }

    println!(
        "case                                     tasks    ops/s   server µs per call  (µs/op at 1 task; {secs} s each)"
    );
    let mut results: Vec<(&str, usize, f64, f64)> = Vec::new();
    for tasks in [1usize, 50] {
        for (name, e, subject) in &engines {
            let (e, subject) = (e.clone(), Arc::new(subject.clone()));
            let s0 = evalsha_stats(&conn).await;
            let admit = run(tasks, secs, move || {
                let (e, subject) = (e.clone(), subject.clone());
                async move {
                    let d = e
                        .admit_async(&Request::new(subject.as_str()).units("tokens", 1))
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

        for (name, src, (key, args), words) in [
            (
                "floor: TIME + HMGET + HSET, 2 counters",
                FLOOR,
                floor_args(&prefix),
                16,
            ),
            (
                "floor: TIME + HMGET + HSET, 4 counters",
                FLOOR4,
                floor4_args(&prefix),
                26,
            ),
        ] {
            let script = Arc::new(redis::Script::new(src));
            let c = conn.clone();
            let args = Arc::new(args);
            let s0 = evalsha_stats(&conn).await;
            let floor = run(tasks, secs, move || {
                let (script, mut c, key, args) =
                    (script.clone(), c.clone(), key.clone(), args.clone());
                async move {
                    let mut inv = script.key(&key);
                    for a in args.iter() {
                        inv.arg(a);
                    }
                    let v: redis::Value = inv.invoke_async(&mut c).await.expect("evalsha");
                    assert!(matches!(v, redis::Value::Array(ref w) if w.len() == words));
                }
            })
            .await;
            let us = server_us(s0, evalsha_stats(&conn).await);
            results.push((name, tasks, floor, us));
        }

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
        println!("{name:<40} {tasks:>5} {ops:>9.0}   {server:>17}   {per}");
    }
    let find = |n: &str, t: usize| {
        results
            .iter()
            .find(|(name, tasks, _, _)| name.starts_with(n) && *tasks == t)
            .map_or(f64::NAN, |r| r.2)
    };
    let server = |n: &str, t: usize| {
        results
            .iter()
            .find(|(name, tasks, _, _)| name.starts_with(n) && *tasks == t)
            .map_or(f64::NAN, |r| r.3)
    };
    for tasks in [1usize, 50] {
        println!(
            "server µs per decision at {tasks} task(s): 4 limits: admit {:.1}, no engine event id {:.1}, floor {:.1}; 2 limits: admit {:.1}, no engine event id {:.1}, floor {:.1}; trivial {:.1}; trivial / admit (4 limits) {:.2}×",
            server("admit, 4 limits, engine", tasks),
            server("admit, 4 limits, no", tasks),
            server("floor: TIME + HMGET + HSET, 4", tasks),
            server("admit, 2 limits, engine", tasks),
            server("admit, 2 limits, no", tasks),
            server("floor: TIME + HMGET + HSET, 2", tasks),
            server("trivial", tasks),
            server("trivial", tasks) / server("admit, 4 limits, engine", tasks),
        );
    }
    println!(
        "at 50 tasks, ops/s: admit (4 limits) / trivial {:.2}×; admit (2 limits) / sorted set (1,000) {:.1}×; floor (2) / trivial {:.2}×",
        find("admit, 4 limits, engine", 50) / find("trivial", 50),
        find("admit, 2 limits, engine", 50) / find("seed-004 sorted set, 1,000", 50),
        find("floor: TIME + HMGET + HSET, 2", 50) / find("trivial", 50),
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
