//! The server side of the gate's HTTP benchmark (issue 14, deliverable 6):
//! one trivial handler, `POST /api/spaces/{id}/search` answering `ok`,
//! served on 127.0.0.1 with or without `QuotaLayer`, for a load generator
//! (wrk) in a second process. BENCHMARKS.md has the commands and figures.
//!
//! ```sh
//! cargo build --release --example gate_bench --features tower,redis
//! target/release/examples/gate_bench plain 3200 &    # no layer
//! target/release/examples/gate_bench memory 3201 &   # QuotaLayer::new, memory store
//! target/release/examples/gate_bench redis 3202 &    # QuotaLayer::new_async, RedisStore
//! wrk -t1 -c16 -d10s -s benches/gate_post.lua http://127.0.0.1:3201/api/spaces/s1/search
//! ```
//!
//! Modes: `plain`, `memory`, `memory-async` (the async path on the memory
//! store) and, with the `redis` feature, `redis` (`TOLLGATE_REDIS_URL`,
//! default `redis://127.0.0.1:6379`, under a fresh key prefix it prints:
//! delete its keys after the run). The quota is a billion searches a
//! month, so nothing is refused. The server runs on one
//! tokio worker thread (`WORKERS` to change it), so the second core is the
//! load generator's.

use std::sync::Arc;

use axum::routing::post;
use axum::Router;
use http::Method;
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
use tollgate::{Allocation, Catalog, CatalogConfig, Engine, LimitConfig, Meter, Period, Window};

const SEARCH: &str = "vector_search_count";

fn catalog() -> Catalog {
    CatalogConfig::default()
        .meter(Meter::count(SEARCH))
        .plan(tollgate::PlanConfig::new("bench").limit(LimitConfig::new(
            SEARCH,
            Window::calendar(Period::Month),
            1_000_000_000u64,
        )))
        .build()
        .expect("catalog")
}

fn routes() -> Routes {
    Routes::new().route(Route::new(Method::POST, "/api/spaces/{id}/search*").consumes(SEARCH, 1))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "plain".into());
    let port: u16 = args.next().map_or(Ok(3200), |p| p.parse())?;
    let workers: usize = std::env::var("WORKERS").map_or(Ok(1), |w| w.parse())?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(serve(mode, port))
}

async fn serve(mode: String, port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let app = Router::new().route("/api/spaces/{id}/search", post(|| async { "ok" }));
    let subject = SubjectSource::header("x-api-key");
    let app = match mode.as_str() {
        "plain" => app,
        "memory" => {
            let engine = Arc::new(Engine::new(catalog()));
            engine.allocate(Allocation::new("bench-user", "bench"))?;
            app.layer(QuotaLayer::new(engine, subject, routes())?)
        }
        "memory-async" => {
            let engine = Arc::new(Engine::new(catalog()));
            engine.allocate(Allocation::new("bench-user", "bench"))?;
            app.layer(QuotaLayer::new_async(engine, subject, routes())?)
        }
        #[cfg(feature = "redis")]
        "redis" => {
            let url = std::env::var("TOLLGATE_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let prefix = format!("tollgate-gate-bench:{}", std::process::id());
            let store = tollgate::store::RedisConfig::new(url)
                .prefix(prefix.clone())
                .connect()
                .await?;
            println!("redis prefix {{{prefix}}}");
            let engine = Arc::new(Engine::with_store_and_clock(
                catalog(),
                store,
                tollgate::SystemClock,
            ));
            engine.allocate(Allocation::new("bench-user", "bench"))?;
            app.layer(QuotaLayer::new_async(engine, subject, routes())?)
        }
        other => return Err(format!("unknown mode `{other}`").into()),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{mode} on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
