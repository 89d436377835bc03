//! The `tower` feature over real HTTP: an axum router behind `QuotaLayer`,
//! served on 127.0.0.1:0 and called with hyper's client. The plans are the
//! seed-003 Takos plans (Free: 100 vector searches, 20,000 input and 10,000
//! output tokens a month). Time only moves through a `ManualClock`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tollgate::http::{RATELIMIT, RATELIMIT_POLICY, X_QUOTA_WARNING};
use tollgate::store::{Applied, Batch};
use tollgate::tower::{QuotaLayer, RecordError, Route, Routes, SubjectSource, Usage};
use tollgate::{
    Allocation, AllowanceStore, Catalog, Engine, Error, ManualClock, MemoryStore, Request,
};

/// A memory store that fails on demand.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    fail: AtomicBool,
}

impl AllowanceStore for Flaky {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Store {
                message: "down".into(),
            });
        }
        self.inner.apply(batch)
    }
    fn overdue(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<tollgate::LeaseInfo>, Error> {
        self.inner.overdue(now)
    }
}

type TestEngine = Engine<Arc<Flaky>, ManualClock>;

const SEARCH: &str = "vector_search_count";
const TOKENS_IN: &str = "llm_tokens_input";
const TOKENS_OUT: &str = "llm_tokens_output";
/// 2026-03-10 12:00 UTC to 2026-04-01 00:00 UTC.
const TO_APRIL: u64 = 21 * 86_400 + 12 * 3_600;

struct App {
    addr: SocketAddr,
    engine: Arc<TestEngine>,
    store: Arc<Flaky>,
    /// Calls that reached the search handler (any method).
    searches: Arc<AtomicUsize>,
    /// Calls that reached the agent handler.
    runs: Arc<AtomicUsize>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

fn routes() -> Routes {
    let search = "/api/spaces/{id}/search*";
    Routes::new()
        .route(Route::new(Method::POST, search).consumes(SEARCH, 1))
        .route(Route::new(Method::GET, search).consumes(SEARCH, 1))
        .route(Route::new(Method::HEAD, search).consumes(SEARCH, 1))
        .route(
            Route::new(Method::POST, "/api/spaces/{id}/threads*")
                .requires(TOKENS_IN, 1)
                .record_after(|parts| {
                    // The handler reports the tokens it used in headers that
                    // must not leak to the client.
                    let mut usage = Usage::new();
                    for (header, meter) in [("x-used-in", TOKENS_IN), ("x-used-out", TOKENS_OUT)] {
                        if let Some(n) = parts
                            .headers
                            .remove(header)
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        {
                            usage = usage.units(meter, n);
                        }
                    }
                    if parts.headers.remove("x-used-bogus").is_some() {
                        usage = usage.units("no_such_meter", 1);
                    }
                    usage
                }),
        )
        .route(Route::new(Method::POST, "/api/billing*"))
}

/// Serve the test router behind `configure(layer)` on 127.0.0.1:0.
async fn serve(configure: impl FnOnce(QuotaLayer) -> QuotaLayer) -> App {
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/takos_plans.toml")).expect("takos plans");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap());
    let store = Arc::new(Flaky::default());
    let engine = Arc::new(Engine::with_store_and_clock(catalog, store.clone(), clock));
    for (subject, plan) in [
        ("free-1", "plan_free"),
        ("free-2", "plan_free"),
        ("payg-1", "plan_payg"),
    ] {
        engine.allocate(Allocation::new(subject, plan)).unwrap();
    }
    let layer = QuotaLayer::new(engine.clone(), SubjectSource::header("x-api-key"), routes())
        .expect("routes are valid");
    let layer = configure(layer);

    let searches = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let s = searches.clone();
    let r = runs.clone();
    let router = Router::new()
        .route(
            "/api/spaces/{id}/search",
            post({
                let s = s.clone();
                move || async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    "results"
                }
            })
            .get(move || async move {
                s.fetch_add(1, Ordering::SeqCst);
                "listing"
            }),
        )
        .route(
            "/api/spaces/{id}/threads",
            post(move |headers: HeaderMap| async move {
                r.fetch_add(1, Ordering::SeqCst);
                // Echo the test's token counts as if the model had reported them.
                let mut response = Response::new(Body::from("answer"));
                for name in ["x-used-in", "x-used-out", "x-used-bogus"] {
                    if let Some(v) = headers.get(format!("x-test-{}", &name[7..])) {
                        response.headers_mut().insert(name, v.clone());
                    }
                }
                response
            }),
        )
        .route("/api/billing", post(|| async { "billing" }))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .layer(layer)
        // An outer layer, as a host would add, that surfaces failed records.
        .layer(axum::middleware::map_response(
            |mut res: Response| async move {
                if let Some(e) = res.extensions().get::<RecordError>() {
                    let v = HeaderValue::from_str(&e.to_string()).unwrap();
                    res.headers_mut().insert("x-record-error", v);
                }
                res
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    App {
        addr,
        engine,
        store,
        searches,
        runs,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

impl App {
    /// Send `method path` with the given raw `x-api-key` values and extra headers.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        keys: &[&[u8]],
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for k in keys {
            req = req.header("x-api-key", HeaderValue::from_bytes(k).unwrap());
        }
        for (name, value) in extra {
            req = req.header(*name, *value);
        }
        let res = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("the server answers");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    async fn send(&self, method: Method, path: &str, subject: &str) -> Answer {
        self.send_raw(method, path, &[subject.as_bytes()], &[])
            .await
    }

    fn used(&self, subject: &str, meter: &str) -> u64 {
        let report = self.engine.usage(subject).unwrap();
        let row = report.meters.iter().find(|m| &*m.meter == meter).unwrap();
        u64::try_from(row.units.mantissa()).unwrap()
    }

    fn admit(&self, subject: &str, meter: &str, n: u64) {
        let d = self
            .engine
            .admit(&Request::new(subject).units(meter, n))
            .unwrap();
        assert!(d.allowed);
    }
}

const SEARCH_PATH: &str = "/api/spaces/s1/search";

#[tokio::test]
async fn a_prepaid_balance_runs_out_with_402_and_a_top_up_reopens_it() {
    let app = serve(|l| l).await;
    // No credit: a $0.02 search is refused before the handler runs.
    let a = app.send(Method::POST, SEARCH_PATH, "payg-1").await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    let b = a.json();
    assert_eq!(b["error"], "insufficient_balance");
    assert_eq!(
        (b["needed"].as_str(), b["available"].as_str()),
        (Some("0.020000"), Some("0.000000"))
    );
    assert_eq!(app.searches.load(Ordering::SeqCst), 0, "handler not called");

    // A $0.05 pack pays for two searches ($0.04), not a third.
    let pack = tollgate::TopUp::new("pay-7", rust_decimal::Decimal::new(5, 2), "USD");
    app.engine.top_up("payg-1", &pack).unwrap();
    for _ in 0..2 {
        let a = app.send(Method::POST, SEARCH_PATH, "payg-1").await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let a = app.send(Method::POST, SEARCH_PATH, "payg-1").await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(a.json()["available"], "0.010000");
    assert_eq!(app.searches.load(Ordering::SeqCst), 2);
    assert_eq!(
        app.used("payg-1", SEARCH),
        2,
        "refused searches record nothing"
    );
    let left = app.engine.balance("payg-1").unwrap();
    assert_eq!(left.available, rust_decimal::Decimal::new(1, 2));
}

#[tokio::test]
async fn writes_go_ok_then_warning_then_402_while_reads_still_answer() {
    let app = serve(|l| l).await;
    app.admit("free-1", SEARCH, 78);

    // 79 of 100: Ok, no warning; the RateLimit fields describe the monthly quota.
    let a = app.send(Method::POST, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "results");
    assert_eq!(a.header(X_QUOTA_WARNING), None);
    assert_eq!(
        a.header(RATELIMIT_POLICY),
        Some("\"vector_search_count/month\";q=100;w=2678400")
    );
    assert_eq!(
        a.header(RATELIMIT),
        Some(format!("\"vector_search_count/month\";r=21;t={TO_APRIL}").as_str())
    );

    // 80 of 100: the warning.
    let a = app.send(Method::POST, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header(X_QUOTA_WARNING), Some("approaching"));

    app.admit("free-1", SEARCH, 20);
    assert_eq!(app.used("free-1", SEARCH), 100);
    let before = app.searches.load(Ordering::SeqCst);

    // 101: refused with 402, a JSON body, and Retry-After at the month end.
    let a = app
        .send(Method::POST, "/api/spaces/s1/search/deep", "free-1")
        .await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("retry-after"), Some(TO_APRIL.to_string().as_str()));
    let b = a.json();
    assert_eq!(b["error"], "quota_exceeded");
    assert_eq!(b["meter"], SEARCH);
    assert_eq!(b["used"], 100);
    assert_eq!(b["max"], 100);
    assert_eq!(b["reset"], "2026-04-01T00:00:00Z");
    assert_eq!(
        app.searches.load(Ordering::SeqCst),
        before,
        "handler not called"
    );
    assert_eq!(
        app.used("free-1", SEARCH),
        100,
        "refused writes record nothing"
    );

    // Reads (GET, HEAD) still answer, carry the warning, and record nothing.
    let a = app.send(Method::GET, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "listing");
    assert_eq!(a.header(X_QUOTA_WARNING), Some("approaching"));
    assert!(a.header(RATELIMIT).unwrap().contains(";r=0;"));
    assert_eq!(a.header("retry-after"), None);
    let a = app.send(Method::HEAD, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header(X_QUOTA_WARNING), Some("approaching"));
    assert_eq!(app.searches.load(Ordering::SeqCst), before + 2);
    assert_eq!(app.used("free-1", SEARCH), 100);

    // Another subject is untouched by free-1's usage.
    let a = app.send(Method::POST, SEARCH_PATH, "free-2").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header(X_QUOTA_WARNING), None);
    assert_eq!(app.used("free-2", SEARCH), 1);
}

#[tokio::test]
async fn reads_are_counted_while_within_the_quota() {
    let app = serve(|l| l).await;
    let a = app.send(Method::GET, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(app.used("free-1", SEARCH), 1);
}

#[tokio::test]
async fn unknown_and_missing_subjects_get_401_by_default() {
    let app = serve(|l| l).await;
    let a = app.send(Method::POST, SEARCH_PATH, "nobody").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"], "unknown_subject");
    let a = app.send_raw(Method::POST, SEARCH_PATH, &[], &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Reads are gated by subject too: a read passes a quota, not auth.
    let a = app.send(Method::GET, SEARCH_PATH, "nobody").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // A route with no meters still requires a known subject.
    let a = app.send(Method::POST, "/api/billing", "nobody").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = app.send(Method::POST, "/api/billing", "free-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(app.searches.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_unknown_subject_status_is_configurable() {
    let app = serve(|l| l.unknown_subject(StatusCode::FORBIDDEN)).await;
    let a = app.send(Method::POST, SEARCH_PATH, "nobody").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = app.send_raw(Method::POST, SEARCH_PATH, &[], &[]).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn malformed_subject_headers_get_400_and_record_nothing() {
    let app = serve(|l| l).await;
    for keys in [
        &[b"free-1\xff".as_slice()][..],
        &[b"\xe3\x81\x82"],
        &[b""],
        &[b"free-1", b"free-2"],
    ] {
        let a = app.send_raw(Method::POST, SEARCH_PATH, keys, &[]).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{keys:?}");
        assert_eq!(a.json()["error"], "malformed_subject");
    }
    assert_eq!(app.searches.load(Ordering::SeqCst), 0);
    assert_eq!(app.used("free-1", SEARCH), 0);
    assert_eq!(app.used("free-2", SEARCH), 0);
}

#[tokio::test]
async fn paths_outside_the_route_table_pass_untouched() {
    let app = serve(|l| l).await;
    let a = app.send_raw(Method::GET, "/health", &[], &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "ok");
    assert!(a.header(RATELIMIT).is_none());
    // The method is part of the route: DELETE on the search path is not gated
    // (axum answers 405 itself).
    let a = app.send_raw(Method::DELETE, SEARCH_PATH, &[], &[]).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn actual_usage_is_recorded_after_the_response() {
    let app = serve(|l| l).await;
    let path = "/api/spaces/s1/threads";
    let a = app
        .send_raw(
            Method::POST,
            path,
            &[b"free-1"],
            &[("x-test-in", "15000"), ("x-test-out", "9000")],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "answer");
    assert_eq!(app.used("free-1", TOKENS_IN), 15_000);
    assert_eq!(app.used("free-1", TOKENS_OUT), 9_000);
    // The hook took the internal headers off; 9,000 of 10,000 output tokens
    // is past 80 %.
    assert!(a.header("x-used-in").is_none() && a.header("x-used-out").is_none());
    assert_eq!(a.header(X_QUOTA_WARNING), Some("approaching"));
    assert_eq!(
        a.header(RATELIMIT),
        Some(format!("\"llm_tokens_output/month\";r=1000;t={TO_APRIL}").as_str())
    );

    // Recording is forced: actual usage past the maximum is counted, and the
    // response (the work is done) still passes.
    let a = app
        .send_raw(Method::POST, path, &[b"free-1"], &[("x-test-in", "6000")])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(app.used("free-1", TOKENS_IN), 21_000);

    // Now the input-token preflight refuses: nothing reaches the handler.
    let runs = app.runs.load(Ordering::SeqCst);
    let a = app
        .send_raw(Method::POST, path, &[b"free-1"], &[("x-test-in", "1")])
        .await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(a.json()["meter"], TOKENS_IN);
    assert_eq!(app.runs.load(Ordering::SeqCst), runs);
    assert_eq!(app.used("free-1", TOKENS_IN), 21_000);
}

#[tokio::test]
async fn a_failed_record_keeps_the_response_and_is_surfaced() {
    let app = serve(|l| l).await;
    let a = app
        .send_raw(
            Method::POST,
            "/api/spaces/s1/threads",
            &[b"free-1"],
            &[("x-test-in", "10"), ("x-test-bogus", "1")],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "answer");
    assert_eq!(
        a.header("x-record-error"),
        Some("recording usage after the response failed: unknown meter `no_such_meter`")
    );
    // The engine records all or nothing: the good meter was not counted either.
    assert_eq!(app.used("free-1", TOKENS_IN), 0);
}

#[tokio::test]
async fn a_failing_store_answers_503_and_does_not_call_the_handler() {
    let app = serve(|l| l).await;
    app.store.fail.store(true, Ordering::SeqCst);
    let a = app.send(Method::POST, SEARCH_PATH, "free-1").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json()["error"], "quota_unavailable");
    assert_eq!(app.searches.load(Ordering::SeqCst), 0);
    app.store.fail.store(false, Ordering::SeqCst);
    assert_eq!(app.used("free-1", SEARCH), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_over_admit() {
    let app = Arc::new(serve(|l| l).await);
    app.admit("free-1", SEARCH, 40);
    let mut tasks = Vec::new();
    for _ in 0..120 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.send(Method::POST, SEARCH_PATH, "free-1").await.status
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, refused), (60, 60));
    assert_eq!(app.used("free-1", SEARCH), 100);
    assert_eq!(app.searches.load(Ordering::SeqCst), 60);
}

#[test]
fn bad_route_tables_are_refused_with_typed_errors() {
    let catalog: Catalog = toml::from_str(include_str!("../examples/takos_plans.toml")).unwrap();
    let engine = Arc::new(Engine::new(catalog));
    let source = || SubjectSource::header("x-api-key");
    let err = |routes: Routes| QuotaLayer::new(engine.clone(), source(), routes).unwrap_err();

    let e = err(Routes::new()
        .route(Route::new(Method::POST, "/ok"))
        .route(Route::new(Method::POST, "/a/*/b")));
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field == "routes[1].pattern"),
        "{e:?}"
    );
    let e = err(Routes::new().route(Route::new(Method::POST, "no-slash")));
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = err(Routes::new().route(Route::new(Method::POST, "/x").consumes("nope", 1)));
    assert_eq!(
        e,
        Error::UnknownMeter {
            meter: "nope".into()
        }
    );
    let e = err(Routes::new().route(Route::new(Method::POST, "/x").requires("cost", 1)));
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field == "routes[0].requires[0]"),
        "{e:?}"
    );
}
