//! PostgreSQL throughput, in one run: `admit_async` of a four-limit plan
//! (day, week, rolling 24h/24 and lifetime on one meter) on a
//! `PostgresStore`, beside a trivial one-row `UPDATE … RETURNING` on the
//! same server through the same client and pool size, each at 1 and 32
//! concurrent callers: all callers on one subject (one row for the
//! baseline), and at 32 callers also one subject (one row) per caller.
//!
//! `TOLLGATE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --features postgres --bench postgres`
//! (skipped without the variable). `TOLLGATE_BENCH_SECS` sets the time per
//! case (default 3 s). Everything lives in a schema of its own, dropped
//! afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tollgate::store::PostgresConfig;
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig, Request,
    SystemClock, Window,
};

const POOL: usize = 32;

/// Run `op(caller)` from `tasks` tasks for `secs`; returns operations per
/// second.
async fn run<F, Fut>(tasks: usize, secs: f64, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut handles = Vec::new();
    for caller in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < until {
                op(caller).await;
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
    let Ok(url) = std::env::var("TOLLGATE_POSTGRES_URL") else {
        eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
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
    let schema = format!("tollgate_bench_{}", std::process::id());
    let store = PostgresConfig::new(url.clone())
        .schema(schema.clone())
        .pool_size(POOL)
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect PostgresStore");
    store.migrate().await.expect("migrate");
    let cleanup = store.clone();
    let big = u64::MAX / 2;
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    big,
                ))
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Week),
                    big,
                ))
                .limit(LimitConfig::new(
                    "tokens",
                    Window::Rolling {
                        span_secs: 86_400,
                        buckets: 24,
                    },
                    big,
                ))
                .limit(LimitConfig::new("tokens", Window::Lifetime, big)),
        )
        .build()
        .expect("catalog");
    let engine = Arc::new(Engine::with_store_and_clock(catalog, store, SystemClock));
    let subjects: Arc<Vec<String>> = Arc::new((0..POOL).map(|i| format!("agent{i}")).collect());
    for s in subjects.iter() {
        engine
            .allocate(Allocation::new(s.as_str(), "plan"))
            .expect("allocate");
    }

    let pg: tokio_postgres::Config = url.parse().expect("url");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(POOL).build().expect("pool");
    {
        let c = pool.get().await.expect("connect");
        c.batch_execute(&format!(
            "CREATE TABLE \"{schema}\".trivial (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO \"{schema}\".trivial SELECT g, 0 FROM generate_series(0, {}) g;",
            POOL - 1
        ))
        .await
        .expect("trivial table");
    }
    let update = Arc::new(format!(
        "UPDATE \"{schema}\".trivial SET n = n + 1 WHERE id = $1 RETURNING n"
    ));

    println!("case                                        tasks    ops/s   (µs/op at 1 task; {secs} s each)");
    let mut results = Vec::new();
    for (tasks, spread) in [(1usize, false), (32, false), (32, true)] {
        let (e, subs) = (engine.clone(), subjects.clone());
        let admit = run(tasks, secs, move |caller| {
            let e = e.clone();
            let who = subs[if spread { caller } else { 0 }].clone();
            async move {
                let d = e
                    .admit_async(&Request::new(&who).units("tokens", 1))
                    .await
                    .expect("admit");
                assert!(d.allowed);
            }
        })
        .await;
        let label = if spread {
            "tollgate admit, 4 limits, a subject each"
        } else {
            "tollgate admit, 4 limits, one subject"
        };
        results.push((label, tasks, admit));

        let (p, sql) = (pool.clone(), update.clone());
        let trivial = run(tasks, secs, move |caller| {
            let (p, sql) = (p.clone(), sql.clone());
            let id = if spread { caller as i32 } else { 0 };
            async move {
                let c = p.get().await.expect("pool");
                let stmt = c.prepare_cached(&sql).await.expect("prepare");
                let row = c.query_one(&stmt, &[&id]).await.expect("update");
                assert!(row.get::<_, i64>(0) > 0);
            }
        })
        .await;
        let label = if spread {
            "trivial UPDATE … RETURNING, a row each"
        } else {
            "trivial UPDATE … RETURNING, one row"
        };
        results.push((label, tasks, trivial));
    }
    for (name, tasks, ops) in &results {
        let per = if *tasks == 1 {
            format!("{:.0} µs", 1e6 / ops)
        } else {
            String::new()
        };
        println!("{name:<43} {tasks:>5} {ops:>9.0}   {per}");
    }
    for pair in results.chunks(2) {
        println!(
            "{} / {} at {} tasks: {:.2}×",
            pair[0].0,
            pair[1].0,
            pair[0].1,
            pair[0].2 / pair[1].2
        );
    }
    cleanup.drop_schema().await.expect("drop schema");
}
