//! No way around the gate (issue 14, deliverable 3), over real HTTP on
//! 127.0.0.1: each bypass an independent test of `examples/axum_gate.rs`
//! found has its own test here. Each failed on the gate before the fix
//! (checked by running this file against it).

mod gate_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use http::Method;
use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
use tollgate::{Allocation, Catalog, Engine};

use gate_support::{request_bytes, send, send_bytes, serve};

const SEARCH: &str = "vector_search_count";
const KEY: &str = "free-1";

struct App {
    addr: std::net::SocketAddr,
    engine: Arc<Engine>,
    /// Calls that reached a handler.
    served: Arc<AtomicUsize>,
}

impl App {
    fn used(&self) -> u64 {
        let report = self.engine.usage(KEY).unwrap();
        let row = report.meters.iter().find(|m| &*m.meter == SEARCH).unwrap();
        assert!(row.held.is_zero(), "nothing stays held: {row:?}");
        u64::try_from(row.units.mantissa()).unwrap()
    }
    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

/// The example's search family: `POST|GET /api/spaces/{id}/search*` count
/// one search each (no HEAD route: HEAD must follow GET), and a `docs*`
/// family gated for POST where the app only routes GET.
async fn app() -> App {
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/takos_plans.toml")).expect("takos plans");
    let engine = Arc::new(Engine::new(catalog));
    engine.allocate(Allocation::new(KEY, "plan_free")).unwrap();
    let search = "/api/spaces/{id}/search*";
    let routes = Routes::new()
        .route(Route::new(Method::POST, search).consumes(SEARCH, 1))
        .route(Route::new(Method::GET, search).consumes(SEARCH, 1))
        .route(Route::new(Method::POST, "/api/spaces/{id}/docs*").consumes(SEARCH, 1));
    let layer = QuotaLayer::new(engine.clone(), SubjectSource::header("x-api-key"), routes)
        .expect("valid routes");
    let served = Arc::new(AtomicUsize::new(0));
    let (s1, s2) = (served.clone(), served.clone());
    let handler = move || {
        s1.fetch_add(1, Ordering::SeqCst);
        async { "results" }
    };
    let router = Router::new()
        .route(
            "/api/spaces/{id}/search",
            post(handler.clone()).get(handler),
        )
        .route(
            "/api/spaces/{id}/docs",
            get(move || {
                s2.fetch_add(1, Ordering::SeqCst);
                async { "docs" }
            }),
        )
        .layer(layer);
    App {
        addr: serve(router).await,
        engine,
        served,
    }
}

#[tokio::test]
async fn an_empty_path_parameter_is_gated() {
    let app = app().await;
    let anonymous = send(app.addr, "POST", "/api/spaces//search", None).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(app.served(), 0, "the handler never ran without a key");
    let keyed = send(app.addr, "POST", "/api/spaces//search", Some(KEY)).await;
    assert_eq!(keyed.status, 200, "{keyed:?}");
    assert_eq!(
        (app.served(), app.used()),
        (1, 1),
        "served once, counted once"
    );
}

#[tokio::test]
async fn head_is_gated_wherever_get_is() {
    let app = app().await;
    let anonymous = send(app.addr, "HEAD", "/api/spaces/s1/search", None).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(app.served(), 0);
    let keyed = send(app.addr, "HEAD", "/api/spaces/s1/search", Some(KEY)).await;
    assert_eq!(keyed.status, 200, "{keyed:?}");
    assert!(keyed.header("ratelimit").is_some(), "{keyed:?}");
    assert_eq!((app.served(), app.used()), (1, 1));
}

#[tokio::test]
async fn a_404_under_a_star_route_gives_its_usage_back() {
    let app = app().await;
    for path in [
        "/api/spaces/s1/search/",
        "/api/spaces/s1/searchX",
        "/api/spaces/s1/search%00",
        "/api/spaces/s1/search/deeper/still",
    ] {
        let answer = send(app.addr, "POST", path, Some(KEY)).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
    }
    assert_eq!(
        (app.served(), app.used()),
        (0, 0),
        "nothing served, nothing counted"
    );
    // The same subject's real searches still count, so the family is gated.
    assert_eq!(
        send(app.addr, "POST", "/api/spaces/s1/search", Some(KEY))
            .await
            .status,
        200
    );
    assert_eq!(app.used(), 1);
}

#[tokio::test]
async fn a_405_gives_its_usage_back() {
    let app = app().await;
    let answer = send(app.addr, "POST", "/api/spaces/s1/docs", Some(KEY)).await;
    assert_eq!(answer.status, 405, "{answer:?}");
    assert_eq!((app.served(), app.used()), (0, 0));
    // Still gated: no key, no answer from the router either.
    let anonymous = send(app.addr, "POST", "/api/spaces/s1/docs", None).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
}

#[tokio::test]
async fn percent_encoded_paths_are_served_only_when_counted() {
    let app = app().await;
    // The router matches the path as sent, so `%73earch` is not `search`;
    // whatever it answers, a request that reached the handler was counted.
    for path in [
        "/api/spaces/s%31/search",
        "/api/spaces/s1/%73earch",
        "/api/%73paces/s1/search",
    ] {
        let before = (app.served(), app.used());
        let answer = send(app.addr, "POST", path, Some(KEY)).await;
        let served = app.served() - before.0;
        let counted = app.used() - before.1;
        assert_eq!(served as u64, counted, "{path}: {answer:?}");
        let anonymous = send(app.addr, "POST", path, None).await;
        assert!(
            anonymous.status == 401 || anonymous.status == 404,
            "{path}: {anonymous:?}"
        );
        assert_eq!(
            app.served() - before.0,
            served,
            "{path}: served without a key"
        );
    }
}

#[tokio::test]
async fn subject_headers_must_be_visible_ascii() {
    let app = app().await;
    for key in [
        &b"free\t1"[..],
        b"free 1",
        b"free-1\tx",
        b"free-\xc3\xa91",
        b"free-\x801",
    ] {
        let bytes = request_bytes("POST", "/api/spaces/s1/search", Some(key), "");
        let answer = send_bytes(app.addr, &bytes).await;
        assert_eq!(answer.status, 400, "{key:?}: {answer:?}");
        assert!(answer.body.contains("malformed_subject"), "{answer:?}");
    }
    assert_eq!((app.served(), app.used()), (0, 0));
}
