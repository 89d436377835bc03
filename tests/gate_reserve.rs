//! Reservations in the gate (issue 14, deliverable 2) over real HTTP on
//! 127.0.0.1, each test run through both layers on the same memory store:
//! `QuotaLayer::new` (sync calls) and `QuotaLayer::new_async` (the async
//! path a `RedisStore` takes).

mod gate_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::Method;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource, Usage};
use tollgate::{Allocation, CatalogConfig, Engine, Error, LimitConfig, Meter, Period, Window};

use gate_support::{eventually, request_bytes, send_bytes, serve};

const TOKENS: &str = "llm_tokens_input";
const SLOTS: &str = "requests_in_flight";
const COST: &str = "cost";
const KEY: &str = "user-1";
const MAX: u64 = 250_000;
/// A subject on a plan without an in-flight limit.
const WIDE: &str = "user-wide";

#[derive(Clone, Copy, Debug)]
enum Layering {
    Sync,
    Async,
}

/// The handlers' shared state: how many entered, and permits to leave.
struct Gatekeeper {
    entered: AtomicUsize,
    go: Semaphore,
}

struct App {
    addr: std::net::SocketAddr,
    engine: Arc<Engine>,
    keeper: Arc<Gatekeeper>,
}

impl App {
    /// (used, held) on `meter`.
    fn usage(&self, meter: &str) -> (u64, u64) {
        self.usage_of(KEY, meter)
    }
    fn usage_of(&self, subject: &str, meter: &str) -> (u64, u64) {
        let report = self.engine.usage(subject).unwrap();
        let row = report.meters.iter().find(|m| &*m.meter == meter).unwrap();
        let int = |d: rust_decimal::Decimal| u64::try_from(d.mantissa()).unwrap();
        (int(row.units), int(row.held))
    }
    fn entered(&self) -> usize {
        self.keeper.entered.load(Ordering::SeqCst)
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// `x-wait`: wait for a permit; `x-used: n`: report n tokens used;
/// `x-status`: answer that status.
async fn work(State(keeper): State<Arc<Gatekeeper>>, headers: HeaderMap) -> Response {
    keeper.entered.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key("x-wait") {
        keeper.go.acquire().await.expect("open").forget();
    }
    let status = header(&headers, "x-status").map_or(StatusCode::OK, |s| {
        StatusCode::from_u16(u16::try_from(s).unwrap()).unwrap()
    });
    let mut response = (status, "done").into_response();
    if let Some(n) = header(&headers, "x-used") {
        response.headers_mut().insert("x-used", n.into());
    }
    response
}

fn routes() -> Routes {
    Routes::new()
        .route(
            Route::new(Method::POST, "/chat")
                .reserve_with(|parts| {
                    let max = header(&parts.headers, "x-max-tokens").unwrap_or(1_000);
                    Usage::new().units(TOKENS, max)
                })
                .record_after(|parts| match parts.headers.remove("x-used") {
                    Some(v) => Usage::new().units(TOKENS, v.to_str().unwrap().parse().unwrap()),
                    None => Usage::new(),
                }),
        )
        .route(Route::new(Method::POST, "/slot").in_flight())
}

fn engine() -> Arc<Engine> {
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .meter(Meter::count(SLOTS))
        .meter(Meter::money(COST, "USD", 6))
        .plan(
            tollgate::PlanConfig::new("p")
                .limit(LimitConfig::new(
                    TOKENS,
                    Window::calendar(Period::Month),
                    MAX,
                ))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 2u64)),
        )
        // No in-flight limit: every reservation may run at once.
        .plan(tollgate::PlanConfig::new("wide").limit(LimitConfig::new(
            TOKENS,
            Window::calendar(Period::Month),
            MAX,
        )))
        .build()
        .unwrap();
    let engine = Arc::new(Engine::new(catalog));
    engine.allocate(Allocation::new(KEY, "p")).unwrap();
    engine.allocate(Allocation::new(WIDE, "wide")).unwrap();
    engine
}

fn layer(engine: &Arc<Engine>, layering: Layering) -> QuotaLayer {
    let subject = SubjectSource::header("x-api-key");
    match layering {
        Layering::Sync => QuotaLayer::new(engine.clone(), subject, routes()),
        Layering::Async => QuotaLayer::new_async(engine.clone(), subject, routes())
            .map(|l| l.spawn_with(|f| drop(tokio::spawn(f)))),
    }
    .expect("valid routes")
}

async fn app(layering: Layering) -> App {
    let engine = engine();
    let layer = layer(&engine, layering);
    let keeper = Arc::new(Gatekeeper {
        entered: AtomicUsize::new(0),
        go: Semaphore::new(0),
    });
    let router = Router::new()
        .route("/chat", post(work))
        .route("/slot", post(work))
        .with_state(keeper.clone())
        .layer(layer);
    App {
        addr: serve(router).await,
        engine,
        keeper,
    }
}

/// A request with the key and `headers` (`name: value` lines).
fn request(path: &str, headers: &[(&str, u64)]) -> Vec<u8> {
    request_as(KEY, path, headers)
}

/// [`request`] as `key`.
fn request_as(key: &str, path: &str, headers: &[(&str, u64)]) -> Vec<u8> {
    let mut bytes = request_bytes("POST", path, Some(key.as_bytes()), "");
    let at = bytes.len() - "content-length: 0\r\n\r\n".len();
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    bytes.splice(at..at, extra.into_bytes());
    bytes
}

const BOTH: [Layering; 2] = [Layering::Sync, Layering::Async];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimate_is_held_then_the_actual_usage_is_committed() {
    for layering in BOTH {
        let app = app(layering).await;
        let bytes = request(
            "/chat",
            &[("x-max-tokens", 4_000), ("x-used", 1_234), ("x-wait", 1)],
        );
        let addr = app.addr;
        let call = tokio::spawn(async move { send_bytes(addr, &bytes).await });
        assert!(eventually(|| app.entered() == 1).await, "{layering:?}");
        assert_eq!(
            app.usage(TOKENS),
            (0, 4_000),
            "{layering:?}: held during the work"
        );
        app.keeper.go.add_permits(1);
        let answer = call.await.unwrap();
        assert_eq!(answer.status, 200, "{layering:?}: {answer:?}");
        assert!(answer.header("x-used").is_none(), "the hook removed it");
        assert!(answer.header("ratelimit").is_some(), "{answer:?}");
        assert_eq!(
            app.usage(TOKENS),
            (1_234, 0),
            "{layering:?}: the actual counts"
        );
        // No usage reported: the estimate is what counts.
        let answer = send_bytes(app.addr, &request("/chat", &[("x-max-tokens", 500)])).await;
        assert_eq!(answer.status, 200);
        assert_eq!(app.usage(TOKENS), (1_734, 0), "{layering:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_keeps_only_the_policy_share() {
    for layering in BOTH {
        let app = app(layering).await;
        for status in [500, 503] {
            let bytes = request("/chat", &[("x-max-tokens", 1_000), ("x-status", status)]);
            assert_eq!(send_bytes(app.addr, &bytes).await.status, status as u16);
        }
        // The default refund policy keeps 50 % of a failed hold.
        assert_eq!(app.usage(TOKENS), (1_000, 0), "{layering:?}");
        // A 4xx the handler chose is work done: the estimate counts.
        let bytes = request("/chat", &[("x-max-tokens", 100), ("x-status", 422)]);
        assert_eq!(send_bytes(app.addr, &bytes).await.status, 422);
        assert_eq!(app.usage(TOKENS), (1_100, 0), "{layering:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_gets_its_hold_back() {
    for layering in BOTH {
        let app = app(layering).await;
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let bytes = request("/chat", &[("x-max-tokens", 7_000), ("x-wait", 1)]);
        stream.write_all(&bytes).await.unwrap();
        assert!(eventually(|| app.entered() == 1).await, "{layering:?}");
        assert_eq!(app.usage(TOKENS), (0, 7_000), "{layering:?}");
        drop(stream);
        assert!(
            eventually(|| app.usage(TOKENS) == (0, 0)).await,
            "{layering:?}: released as cancelled, got {:?}",
            app.usage(TOKENS)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_limit_holds_a_slot_per_request() {
    for layering in BOTH {
        let app = app(layering).await;
        let addr = app.addr;
        let waiting = |n| {
            let bytes = request("/slot", &[("x-wait", n)]);
            tokio::spawn(async move { send_bytes(addr, &bytes).await })
        };
        let (a, b) = (waiting(1), waiting(2));
        assert!(eventually(|| app.entered() == 2).await, "{layering:?}");
        let third = send_bytes(app.addr, &request("/slot", &[])).await;
        assert_eq!(third.status, 429, "{layering:?}: {third:?}");
        assert_eq!(app.entered(), 2, "the third never reached the handler");
        app.keeper.go.add_permits(2);
        assert_eq!(a.await.unwrap().status, 200);
        assert_eq!(b.await.unwrap().status, 200);
        assert_eq!(app.usage(SLOTS), (0, 0), "{layering:?}: slots given back");
        let fourth = send_bytes(app.addr, &request("/slot", &[])).await;
        assert_eq!(fourth.status, 200, "{layering:?}: {fourth:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_overshoot() {
    // The overshoot: 200 concurrent calls through `requires` +
    // `record_after` ended at 260,000 of 250,000 tokens. Holding the
    // estimate first, they cannot.
    for layering in BOTH {
        let app = app(layering).await;
        let calls: Vec<_> = (0..200)
            .map(|_| {
                let bytes =
                    request_as(WIDE, "/chat", &[("x-max-tokens", 1_300), ("x-used", 1_300)]);
                let addr = app.addr;
                tokio::spawn(async move { send_bytes(addr, &bytes).await.status })
            })
            .collect();
        let mut ok = 0;
        for call in calls {
            match call.await.unwrap() {
                200 => ok += 1,
                402 => {}
                other => panic!("{layering:?}: status {other}"),
            }
        }
        let (used, held) = app.usage_of(WIDE, TOKENS);
        assert_eq!(held, 0);
        assert!(used <= MAX, "{layering:?}: {used} of {MAX}");
        assert_eq!(used, ok * 1_300, "{layering:?}");
        // Every reservation that took tokens ran and committed them, so
        // the calls refused for tokens left exactly what no call fits in.
        assert_eq!(ok, MAX / 1_300, "{layering:?}: every call that fit ran");
    }
}

#[test]
fn bad_reservation_settings_are_refused_with_typed_errors() {
    let engine = engine();
    let subject = || SubjectSource::header("x-api-key");
    let money = Routes::new().route(Route::new(Method::POST, "/a").reserve(COST, 1));
    match QuotaLayer::new(engine.clone(), subject(), money) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "routes[0].reserve[0]"),
        other => panic!("{other:?}"),
    }
    let unknown = Routes::new().route(Route::new(Method::POST, "/a").reserve("nope", 1));
    assert!(matches!(
        QuotaLayer::new(engine.clone(), subject(), unknown),
        Err(Error::UnknownMeter { .. })
    ));
    let layer = QuotaLayer::new(engine.clone(), subject(), routes()).unwrap();
    for bad in [Duration::ZERO, Duration::from_secs(86_401)] {
        match layer.clone().lease_ttl(bad) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "lease_ttl"),
            other => panic!("{other:?}"),
        }
    }
    assert!(layer.lease_ttl(Duration::from_secs(30)).is_ok());
}

/// An inner service that fails (not a response: an error, as a hyper or
/// tower stack's service can).
#[derive(Clone)]
struct Failing;

impl tower_service::Service<http::Request<String>> for Failing {
    type Response = http::Response<String>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<String>) -> Self::Future {
        std::future::ready(Err("handler failed"))
    }
}

#[tokio::test]
async fn an_inner_service_error_releases_the_hold_as_failed() {
    use tower_layer::Layer;
    use tower_service::Service;
    for layering in BOTH {
        let engine = engine();
        let mut service = layer(&engine, layering).layer(Failing);
        let request = http::Request::post("/chat")
            .header("x-api-key", KEY)
            .header("x-max-tokens", "1000")
            .body(String::new())
            .unwrap();
        let answer = service.call(request).await;
        assert_eq!(answer.err(), Some("handler failed"), "{layering:?}");
        let report = engine.usage(KEY).unwrap();
        let row = report.meters.iter().find(|m| &*m.meter == TOKENS).unwrap();
        // The default refund policy keeps 50 % of a failed hold.
        assert_eq!(
            (row.units, row.held),
            (500.into(), 0.into()),
            "{layering:?}"
        );
    }
}
