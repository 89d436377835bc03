//! An axum service gated by tollgate on the Takos plans (seed 003), with two
//! path families from seed 000:
//!
//! - `POST|GET /api/spaces/{id}/search*` — each search counts one
//!   `vector_search_count` (Free: 100 a month); `HEAD` is gated as `GET`.
//! - `POST /api/spaces/{id}/threads*` — an agent call: an estimate of its
//!   tokens (100 input and 50 output per byte of prompt, from
//!   `Content-Length`) is reserved before the handler runs, then settled
//!   with the tokens it reports; a 5xx keeps half the estimate, a client
//!   that goes away gets it all back.
//!
//! It runs on the memory store by default, and on Redis when
//! `TOLLGATE_REDIS_URL` is set and the `redis` feature is on: then every
//! replica started the same way shares the counters.
//!
//! On the memory store:
//!
//! ```sh
//! cargo run --example axum_gate --features tower
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search
//! for i in $(seq 79); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search; done
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search   # X-Quota-Warning
//! for i in $(seq 20); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search; done
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search   # 402
//! curl -si -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search           # GET still answers
//! curl -si -X POST -H 'x-api-key: plus-user' -d 'hello agent' localhost:3000/api/spaces/s1/threads
//! curl -s -H 'x-api-key: plus-user' localhost:3000/api/billing/usage
//! ```
//!
//! On Redis, two replicas sharing one quota:
//!
//! ```sh
//! export TOLLGATE_REDIS_URL=redis://127.0.0.1:6379 TOLLGATE_PREFIX=demo-$RANDOM
//! PORT=3000 cargo run --example axum_gate --features tower,redis &
//! PORT=3001 cargo run --example axum_gate --features tower,redis &
//! for i in $(seq 50); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search; done
//! for i in $(seq 50); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3001/api/spaces/s1/search; done
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search   # 402: 100 used across both
//! curl -s -H 'x-api-key: free-user' localhost:3001/api/billing/usage                # vector_search_count 100 of 100
//! ```
//!
//! The port is 3000, or `PORT` from the environment; the Redis key prefix
//! is `tollgate`, or `TOLLGATE_PREFIX`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header::CONTENT_LENGTH, request, HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource, Usage};
use tollgate::{Allocation, Catalog, Engine, UsageReport};

/// What the agent handler reports about its work, read by the record hook.
#[derive(Clone, Copy)]
struct TokensUsed {
    input: u64,
    output: u64,
}

/// The engine, on whichever store the example runs on.
#[derive(Clone)]
enum Quotas {
    Memory(Arc<Engine>),
    #[cfg(feature = "redis")]
    Redis(Arc<Engine<tollgate::store::RedisStore>>),
}

impl Quotas {
    async fn usage(&self, subject: &str) -> Result<UsageReport, tollgate::Error> {
        match self {
            Quotas::Memory(engine) => engine.usage(subject),
            #[cfg(feature = "redis")]
            Quotas::Redis(engine) => engine.usage_async(subject).await,
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalog: Catalog = toml::from_str(include_str!("takos_plans.toml"))?;
    let subject = SubjectSource::header("x-api-key");
    let (quotas, layer) = match std::env::var("TOLLGATE_REDIS_URL").ok() {
        None => {
            let engine = Arc::new(Engine::new(catalog));
            allocate(|a| engine.allocate(a))?;
            println!("store: memory");
            let layer = QuotaLayer::new(engine.clone(), subject, routes())?;
            (Quotas::Memory(engine), layer)
        }
        #[cfg(feature = "redis")]
        Some(url) => {
            use tollgate::store::RedisConfig;
            let prefix = std::env::var("TOLLGATE_PREFIX").unwrap_or_else(|_| "tollgate".into());
            let store = RedisConfig::new(url.as_str())
                .prefix(prefix)
                .connect()
                .await?;
            let engine = Arc::new(Engine::with_store_and_clock(
                catalog,
                store,
                tollgate::SystemClock,
            ));
            allocate(|a| engine.allocate(a))?;
            println!("store: redis at {url}");
            let layer = QuotaLayer::new_async(engine.clone(), subject, routes())?;
            (Quotas::Redis(engine), layer)
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => {
            return Err("TOLLGATE_REDIS_URL is set: run with `--features tower,redis`".into());
        }
    };

    let app = Router::new()
        .route(
            "/api/spaces/{id}/search",
            post(search_handler).get(search_handler),
        )
        .route("/api/spaces/{id}/threads", post(thread_handler))
        .route("/api/billing/usage", get(usage_handler))
        .with_state(quotas)
        .layer(layer);

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

fn allocate(
    mut allocate: impl FnMut(Allocation) -> Result<(), tollgate::Error>,
) -> Result<(), tollgate::Error> {
    allocate(Allocation::new("free-user", "plan_free"))?;
    allocate(Allocation::new("plus-user", "plan_plus"))
}

fn routes() -> Routes {
    let search = "/api/spaces/{id}/search*";
    Routes::new()
        .route(Route::new(Method::POST, search).consumes("vector_search_count", 1))
        .route(Route::new(Method::GET, search).consumes("vector_search_count", 1))
        .route(
            Route::new(Method::POST, "/api/spaces/{id}/threads*")
                .reserve_with(estimate)
                .record_after(
                    |response| match response.extensions.remove::<TokensUsed>() {
                        Some(t) => Usage::new()
                            .units("llm_tokens_input", t.input)
                            .units("llm_tokens_output", t.output),
                        None => Usage::new(),
                    },
                ),
        )
        // No meters: the subject must be known, nothing is counted.
        .route(Route::new(Method::GET, "/api/billing/usage"))
}

/// The most an agent call can use: 100 input and 50 output tokens per byte
/// of prompt (at least one byte's worth).
fn estimate(request: &request::Parts) -> Usage {
    let bytes = request
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0)
        .max(1);
    Usage::new()
        .units("llm_tokens_input", bytes.saturating_mul(100))
        .units("llm_tokens_output", bytes.saturating_mul(50))
}

async fn search_handler() -> &'static str {
    "{\"results\":[]}\n"
}

/// A stand-in for an agent run: "uses" 100 input tokens per byte of prompt
/// and half as many output tokens, and says so in a response extension.
async fn thread_handler(body: String) -> impl IntoResponse {
    let input = 100 * body.len() as u64;
    let mut response = "{\"reply\":\"done\"}\n".into_response();
    response.extensions_mut().insert(TokensUsed {
        input,
        output: input / 2,
    });
    response
}

/// Seed 003's `/usage`: units per meter in the current periods.
async fn usage_handler(
    State(quotas): State<Quotas>,
    headers: HeaderMap,
) -> Result<String, StatusCode> {
    // The layer already checked the header names a known subject.
    let subject = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let report = quotas
        .usage(subject)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let mut out = String::new();
    for m in report.meters.iter().filter(|m| !m.units.is_zero()) {
        let max = m.max.map_or("unlimited".into(), |x| x.to_string());
        out.push_str(&format!(
            "{} {} of {} ({:?})\n",
            m.meter, m.units, max, m.status
        ));
    }
    Ok(out)
}
