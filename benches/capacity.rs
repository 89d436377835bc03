//! Capacity leases: `admit_async` far from the limits on a
//! `CapacityStore` over Redis, beside the same admit on the in-process
//! `MemoryStore` and straight on a `RedisStore`; each at 1 and 8
//! concurrent tasks (a 2-worker tokio runtime), over 1 and 100 subjects.
//! The capacity store's `maintain` runs every top-up interval (100 ms) in
//! a background task, as a host would run it; a wrapper counts the Redis
//! store's `apply` calls, printed as round trips per decision. The
//! capacity rows run twice: with the event id the async engine makes for
//! every admit on a Redis store (the default), and without
//! (`RedisConfig::engine_event_ids(false)`).
//!
//! `TOLLGATE_REDIS_URL=redis://127.0.0.1:6379 cargo bench --features redis --bench capacity`
//! (skipped without the variable). `TOLLGATE_BENCH_SECS` sets the time per
//! case (default 3 s), `TOLLGATE_BENCH_ROUNDS` how many interleaved rounds
//! of the memory and capacity cases run (default 3; medians are printed).
//! Keys live under their own prefix.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tollgate::capacity::{CapacityConfig, CapacityStore};
use tollgate::store::{
    Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo, MemoryStore, RedisConfig,
};
use tollgate::{
    Allocation, Catalog, CatalogConfig, Clock, Engine, LimitConfig, Meter, Period, PlanConfig,
    Request, SystemClock, Window,
};

/// Counts `apply` calls: the round trips.
struct Counting<S> {
    inner: S,
    calls: AtomicU64,
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

/// Far from the limits: a monthly token cap and a rolling daily request
/// cap, both huge.
fn catalog() -> Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("requests"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Month),
                    1_000_000_000_000u64,
                ))
                .limit(LimitConfig::new(
                    "requests",
                    Window::rolling(Duration::from_secs(86_400), 24).expect("window"),
                    1_000_000_000u64,
                )),
        )
        .build()
        .expect("catalog")
}

fn engine<S>(store: S, subjects: usize) -> Arc<Engine<S>> {
    let e = Engine::with_store_and_clock(catalog(), store, SystemClock);
    for i in 0..subjects {
        e.allocate(Allocation::new(format!("agent-{i}"), "plan"))
            .expect("allocate");
    }
    Arc::new(e)
}

/// Decisions per second of `tasks` tasks admitting for `secs` over
/// `subjects` subjects.
async fn run<S: AsyncAllowanceStore + 'static>(
    engine: &Arc<Engine<S>>,
    tasks: usize,
    subjects: usize,
    secs: f64,
) -> (f64, u64) {
    let ids: Arc<Vec<String>> = Arc::new((0..subjects).map(|i| format!("agent-{i}")).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (engine, ids, stop, done) = (
            Arc::clone(engine),
            Arc::clone(&ids),
            Arc::clone(&stop),
            Arc::clone(&done),
        );
        handles.push(tokio::spawn(async move {
            let mut i = t;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = Request::new(&ids[i % ids.len()])
                    .units("tokens", 1 + (i as u64 % 50))
                    .units("requests", 1);
                let d = engine.admit_async(&req).await.expect("admit");
                assert!(d.allowed);
                n += 1;
                i = i.wrapping_add(7);
                if n % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            done.fetch_add(n, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.expect("task");
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

/// Decisions per second and store calls per decision of `admit_async` on
/// a `CapacityStore` over `redis`, maintained every top-up interval.
async fn capacity<S: AsyncAllowanceStore + 'static>(
    redis: S,
    tasks: usize,
    subjects: usize,
    secs: f64,
) -> (f64, f64) {
    let counting = Arc::new(Counting {
        inner: redis,
        calls: AtomicU64::new(0),
    });
    let cap =
        Arc::new(CapacityStore::new(Arc::clone(&counting), CapacityConfig::new()).expect("config"));
    let stop = Arc::new(AtomicBool::new(false));
    let bg = {
        let (cap, stop) = (Arc::clone(&cap), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                cap.maintain(SystemClock.now()).await;
                tokio::time::sleep(cap.config().top_up_interval_value()).await;
            }
        })
    };
    let e = engine(Arc::clone(&cap), subjects);
    let (rate, n) = run(&e, tasks, subjects, secs).await;
    stop.store(true, Ordering::Relaxed);
    bg.await.expect("maintenance");
    cap.shutdown(SystemClock.now()).await;
    let calls = counting.calls.load(Ordering::Relaxed);
    (rate, calls as f64 / n as f64)
}

/// The median of `v` (the upper one of an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    };
    // `cargo bench` passes `--bench`; a name filter is not supported.
    let secs: f64 = std::env::var("TOLLGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("TOLLGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        println!(
            "{:<34} {:>6} {:>9} {:>14} {:>9} {:>12}",
            "case", "tasks", "subjects", "decisions/s", "vs mem", "calls/dec"
        );
        for subjects in [1usize, 100] {
            for tasks in [1usize, 8] {
                // Interleaved rounds, medians: the machine is shared and
                // its speed drifts; each round runs every case once.
                let prefix = format!("tollgate-bench:capacity:{nanos}:{subjects}:{tasks}");
                let (mut mem, mut ids_on, mut ids_off) = (Vec::new(), Vec::new(), Vec::new());
                for round in 0..rounds {
                    let m = engine(MemoryStore::new(), subjects);
                    mem.push(run(&m, tasks, subjects, secs).await.0);
                    for ids in [true, false] {
                        let redis = RedisConfig::new(url.clone())
                            .prefix(format!("{prefix}:{ids}:{round}"))
                            .engine_event_ids(ids)
                            .connect()
                            .await
                            .expect("connect");
                        let r = capacity(redis, tasks, subjects, secs).await;
                        if ids {
                            ids_on.push(r);
                        } else {
                            ids_off.push(r);
                        }
                    }
                }
                let mem_rate = median(&mut mem);
                println!(
                    "{:<34} {:>6} {:>9} {:>14.0} {:>9} {:>12}",
                    "memory", tasks, subjects, mem_rate, "1.00", "-"
                );
                for (name, runs) in [
                    ("capacity over redis", &mut ids_on),
                    ("capacity over redis, no engine ids", &mut ids_off),
                ] {
                    let mut rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
                    let mut per: Vec<f64> = runs.iter().map(|r| r.1).collect();
                    let rate = median(&mut rates);
                    println!(
                        "{:<34} {:>6} {:>9} {:>14.0} {:>9.2} {:>12.4}",
                        name,
                        tasks,
                        subjects,
                        rate,
                        rate / mem_rate,
                        median(&mut per)
                    );
                }

                let direct = RedisConfig::new(url.clone())
                    .prefix(format!("{prefix}:direct"))
                    .connect()
                    .await
                    .expect("connect");
                let e = engine(direct, subjects);
                let (rate, _) = run(&e, tasks, subjects, secs).await;
                println!(
                    "{:<34} {:>6} {:>9} {:>14.0} {:>9.2} {:>12}",
                    "redis (one round trip each)",
                    tasks,
                    subjects,
                    rate,
                    rate / mem_rate,
                    "1"
                );
            }
        }
        // Every key this run wrote starts with its prefix: delete them (a
        // run writes an event key per admit; left, they pile up in a
        // shared Redis until their TTL).
        let deleted = delete_keys(&url, &format!("{{tollgate-bench:capacity:{nanos}:*")).await;
        println!("deleted {deleted} keys");
    });
}

/// `SCAN` for `pattern` and `UNLINK` what it finds; returns how many.
async fn delete_keys(url: &str, pattern: &str) -> usize {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let (mut cursor, mut n) = (0u64, 0usize);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("unlink");
            n += keys.len();
        }
        if next == 0 {
            return n;
        }
        cursor = next;
    }
}
