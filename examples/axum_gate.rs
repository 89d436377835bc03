//! An axum service gated by tollgate on the Takos plans (seed 003), with two
//! path families from seed 000:
//!
//! - `POST|GET /api/spaces/{id}/search*` — each search counts one
//!   `vector_search_count` (Free: 100 a month).
//! - `POST /api/spaces/{id}/threads*` — an agent call: refused unless input
//!   tokens are left; the tokens it actually used are recorded after it
//!   answers.
//!
//! Run it and call it with curl:
//!
//! ```sh
//! cargo run --example axum_gate --features tower
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search
//! for i in $(seq 79); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search; done
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search   # X-Quota-Warning
//! for i in $(seq 20); do curl -s -o /dev/null -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search; done
//! curl -si -X POST -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search   # 402
//! curl -si -H 'x-api-key: free-user' localhost:3000/api/spaces/s1/search           # GET still answers
//! curl -s -H 'x-api-key: free-user' localhost:3000/api/billing/usage
//! ```
//!
//! The port is 3000, or `PORT` from the environment.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource, Usage};
use tollgate::{Allocation, Catalog, Engine};

/// What the agent handler reports about its work, read by the record hook.
#[derive(Clone, Copy)]
struct TokensUsed {
    input: u64,
    output: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let catalog: Catalog = toml::from_str(include_str!("takos_plans.toml"))?;
    let engine = Arc::new(Engine::new(catalog));
    engine.allocate(Allocation::new("free-user", "plan_free"))?;
    engine.allocate(Allocation::new("plus-user", "plan_plus"))?;

    let search = "/api/spaces/{id}/search*";
    let routes = Routes::new()
        .route(Route::new(Method::POST, search).consumes("vector_search_count", 1))
        .route(Route::new(Method::GET, search).consumes("vector_search_count", 1))
        .route(
            Route::new(Method::POST, "/api/spaces/{id}/threads*")
                .requires("llm_tokens_input", 1)
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
        .route(Route::new(Method::GET, "/api/billing/usage"));
    let layer = QuotaLayer::new(engine.clone(), SubjectSource::header("x-api-key"), routes)?;

    let app = Router::new()
        .route(
            "/api/spaces/{id}/search",
            post(search_handler).get(search_handler),
        )
        .route("/api/spaces/{id}/threads", post(thread_handler))
        .route("/api/billing/usage", get(usage_handler))
        .with_state(engine)
        .layer(layer);

    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
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
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
) -> Result<String, StatusCode> {
    // The layer already checked the header names a known subject.
    let subject = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let report = engine.usage(subject).map_err(|_| StatusCode::NOT_FOUND)?;
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
