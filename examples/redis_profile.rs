//! Server-side cost of one `admit_async` on a `RedisStore`: runs the bench's
//! admit (day + rolling 24h/24) sequentially and reads Redis's
//! `INFO commandstats` before and after, so the output says how many
//! `redis.call`s one admit makes (by command) and the server's µs per
//! `FCALL` (the store's function library; `EVALSHA` for an older build).
//!
//! ```text
//! TOLLGATE_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run --release --features redis --example redis_profile -- 20000 50
//! ```
//!
//! Arguments: the number of admits (default 20,000), of concurrent tasks
//! (default 1), and `no-ids` to turn off the event id the engine gives
//! every admit (`RedisConfig::engine_event_ids(false)`: what the ledger
//! costs). One task measures a server that waits for every call (cold
//! caches); many, a busy one, as in the bench at 50 tasks.
//!
//! Commandstats are server-wide: other clients running at the same time
//! show up in the counts.

use std::collections::BTreeMap;

use tollgate::store::RedisConfig;
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig, Request,
    SystemClock, Window,
};

async fn stats(c: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("info");
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |k: &str| {
            rest.split(',')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_owned(), (field("calls"), field("usec")));
    }
    out
}

#[tokio::main]
async fn main() {
    let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    };
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let tasks: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let made_ids = std::env::args().nth(3).as_deref() != Some("no-ids");
    let prefix = format!("tollgate-profile:{}", std::process::id());
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let store = RedisConfig::new(url.clone())
        .prefix(prefix.clone())
        .engine_event_ids(made_ids)
        .connect()
        .await
        .expect("connect RedisStore");
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
    let engine = std::sync::Arc::new(Engine::with_store_and_clock(catalog, store, SystemClock));
    engine
        .allocate(Allocation::new("agent", "plan"))
        .expect("allocate");
    let req = Request::new("agent").units("tokens", 1);
    for _ in 0..100 {
        engine.admit_async(&req).await.expect("admit");
    }
    let before = stats(&mut conn).await;
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let req = Request::new("agent").units("tokens", 1);
            for _ in 0..n / tasks {
                let d = engine.admit_async(&req).await.expect("admit");
                assert!(d.allowed);
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let n = n / tasks * tasks;
    let wall = started.elapsed();
    let after = stats(&mut conn).await;
    println!(
        "{n} admits from {tasks} tasks{}, {:.1} µs wall each",
        if made_ids {
            ""
        } else {
            " (no engine event ids)"
        },
        wall.as_secs_f64() * 1e6 / n as f64
    );
    let mut inner = 0;
    for (name, (calls, usec)) in &after {
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
        let (dc, du) = (calls - c0, usec - u0);
        if dc == 0 || name == "info" {
            continue;
        }
        // The script or function call itself is not a `redis.call` inside it.
        if !name.starts_with("evalsha") && !name.starts_with("fcall") && name != "function" {
            inner += dc;
        }
        println!(
            "{name:<24} {:>7.2} per admit {:>7.2} µs per call",
            dc as f64 / n as f64,
            du as f64 / dc as f64
        );
    }
    println!("redis.call per admit: {:.2}", inner as f64 / n as f64);

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}
