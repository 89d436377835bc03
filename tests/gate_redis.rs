//! The gate on `RedisStore` over real HTTP on 127.0.0.1 (issue 14,
//! deliverable 4): two gate servers, each with its own engine and store
//! connection, sharing one real Redis named by `TOLLGATE_REDIS_URL`.
//! Without the variable every test prints that it was skipped and passes.
//! Each test uses its own key prefix and deletes its keys at the end.

mod gate_support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use http::Method;
use tokio::io::AsyncWriteExt;
use tollgate::store::{RedisConfig, RedisStore};
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
use tollgate::{Allocation, Catalog, Engine, SystemClock};

use gate_support::{eventually, request_bytes, send, send_bytes, serve};

const SEARCH: &str = "vector_search_count";
const KEY: &str = "free-1";

type RedisEngine = Engine<RedisStore, SystemClock>;

fn url() -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_REDIS_URL not set");
            None
        }
    }
}

/// A prefix no other test run uses.
fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "tollgate-gate-test:{name}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An engine on the Takos plans with `free-1` on Free, on its own
/// connection to the store under `prefix`.
async fn engine(url: &str, prefix: &str) -> Arc<RedisEngine> {
    let store = RedisConfig::new(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to TOLLGATE_REDIS_URL");
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/takos_plans.toml")).expect("takos plans");
    let engine = Arc::new(Engine::with_store_and_clock(catalog, store, SystemClock));
    engine.allocate(Allocation::new(KEY, "plan_free")).unwrap();
    engine
}

/// (used, held) searches of `free-1`, read from Redis by a fresh engine.
async fn searches(url: &str, prefix: &str) -> (u64, u64) {
    let engine = engine(url, prefix).await;
    let report = engine.usage_async(KEY).await.expect("usage");
    let row = report.meters.iter().find(|m| &*m.meter == SEARCH).unwrap();
    let int = |d: rust_decimal::Decimal| u64::try_from(d.mantissa()).unwrap();
    (int(row.units), int(row.held))
}

/// Calls that entered the handler.
#[derive(Default)]
struct Entered(AtomicUsize);

/// `x-status`: answer that status; `x-wait`: never answer.
async fn search(State(entered): State<Arc<Entered>>, headers: HeaderMap) -> impl IntoResponse {
    entered.0.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key("x-wait") {
        std::future::pending::<()>().await;
    }
    let status = headers
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    (status, "results")
}

/// A gate server on its own engine; its address and handler counter.
async fn gate_server(url: &str, prefix: &str) -> (std::net::SocketAddr, Arc<Entered>) {
    let engine = engine(url, prefix).await;
    let routes = Routes::new()
        .route(Route::new(Method::POST, "/api/spaces/{id}/search*").consumes(SEARCH, 1));
    // No spawner set: with `redis`, a dropped request is released on the
    // current tokio runtime by default.
    let layer = QuotaLayer::new_async(engine, SubjectSource::header("x-api-key"), routes)
        .expect("valid routes");
    let entered = Arc::new(Entered::default());
    let app = Router::new()
        .route("/api/spaces/{id}/search", post(search))
        .with_state(entered.clone())
        .layer(layer);
    (serve(app).await, entered)
}

/// Delete every key under the prefix's tag.
async fn flush(url: &str, prefix: &str) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut pattern = String::new();
    for ch in format!("{{{prefix}}}").chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern.push('*');
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .expect("keys");
    for key in keys {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gates_on_one_redis_admit_exactly_what_remains() {
    let Some(url) = url() else { return };
    let prefix = unique_prefix("two-gates");
    let (a, entered_a) = gate_server(&url, &prefix).await;
    let (b, entered_b) = gate_server(&url, &prefix).await;
    // Free has 100 searches a month: 150 concurrent writes, split across
    // the two servers.
    let calls: Vec<_> = (0..150)
        .map(|i| {
            let addr = if i % 2 == 0 { a } else { b };
            tokio::spawn(async move {
                send(addr, "POST", "/api/spaces/s1/search", Some(KEY))
                    .await
                    .status
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    let handled = entered_a.0.load(Ordering::SeqCst) + entered_b.0.load(Ordering::SeqCst);
    let shown = searches(&url, &prefix).await;
    flush(&url, &prefix).await;
    assert_eq!((ok, refused), (100, 50));
    assert_eq!(handled, 100, "only admitted calls reached a handler");
    assert_eq!(shown, (100, 0), "Redis shows 100 used, nothing held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_failures_keep_the_policy_share_and_404s_nothing() {
    let Some(url) = url() else { return };
    let prefix = unique_prefix("failures");
    let (a, _) = gate_server(&url, &prefix).await;
    let fail = |status: u16| {
        let mut bytes = request_bytes("POST", "/api/spaces/s1/search", Some(KEY.as_bytes()), "");
        let at = bytes.len() - "content-length: 0\r\n\r\n".len();
        bytes.splice(at..at, format!("x-status: {status}\r\n").into_bytes());
        bytes
    };
    // Two failed searches keep 50 % each, rounded up: 1 each.
    assert_eq!(send_bytes(a, &fail(500)).await.status, 500);
    assert_eq!(send_bytes(a, &fail(502)).await.status, 502);
    let after_failures = searches(&url, &prefix).await;
    for path in ["/api/spaces/s1/search/", "/api/spaces/s1/searchX"] {
        assert_eq!(send(a, "POST", path, Some(KEY)).await.status, 404, "{path}");
    }
    let after_404s = searches(&url, &prefix).await;
    flush(&url, &prefix).await;
    assert_eq!(after_failures, (2, 0));
    assert_eq!(after_404s, (2, 0), "a 404 keeps nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_client_that_goes_away_gets_its_hold_back() {
    let Some(url) = url() else { return };
    let prefix = unique_prefix("disconnect");
    let (a, entered) = gate_server(&url, &prefix).await;
    let mut bytes = request_bytes("POST", "/api/spaces/s1/search", Some(KEY.as_bytes()), "");
    let at = bytes.len() - "content-length: 0\r\n\r\n".len();
    bytes.splice(at..at, b"x-wait: 1\r\n".to_vec());
    let mut stream = tokio::net::TcpStream::connect(a).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let went_in = eventually(|| entered.0.load(Ordering::SeqCst) == 1).await;
    let during = searches(&url, &prefix).await;
    drop(stream);
    let mut after = during;
    for _ in 0..500 {
        after = searches(&url, &prefix).await;
        if after == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flush(&url, &prefix).await;
    assert!(went_in);
    assert_eq!(during, (0, 1), "held while the handler runs");
    assert_eq!(after, (0, 0), "released as cancelled");
}
