//! Ambiguous outcomes on a real Redis: a redis-server of the test's own,
//! paused (SIGSTOP) while calls are in flight, so they leave and get no
//! answer within the timeout. Such a call is `Error::StoreOutcomeUnknown`
//! naming an event id (the host's, or one the engine made); retrying with
//! it counts once. A fail-open decision says its record is unknown, and
//! one made when nothing left says it is absent. Needs `TOLLGATE_REDIS_URL`
//! (as the other Redis tests) and `redis-server` and `kill` on the path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate::store::{FailurePolicy, RedisConfig, RedisStore};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, Meter, Period, PlanConfig, Request,
    SystemClock, Window,
};

fn enabled() -> bool {
    let on = std::env::var("TOLLGATE_REDIS_URL").is_ok_and(|u| !u.is_empty());
    if !on {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
    }
    on
}

/// A redis-server on a free port, killed when dropped.
struct Server {
    port: u16,
    child: std::process::Child,
}

impl Server {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = Server { port, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "tollgate-test:ambiguous:{}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn engine(url: &str, policy: FailurePolicy) -> Engine<RedisStore, SystemClock> {
    let store = RedisConfig::new(url)
        .prefix(prefix())
        .timeout(Duration::from_millis(200))
        .failure_policy(policy)
        .connect()
        .await
        .expect("connect");
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("plan").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            1_000u64,
        )))
        .build()
        .expect("catalog");
    let engine = Engine::with_store_and_clock(catalog, store, SystemClock);
    engine
        .allocate(Allocation::new("agent", "plan"))
        .expect("allocate");
    engine
}

async fn used(engine: &Engine<RedisStore, SystemClock>) -> rust_decimal::Decimal {
    let report = engine.usage_async("agent").await.expect("usage");
    report.meters[0].units
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Retry an unknown outcome until the store answers (it may still be
/// catching up right after SIGCONT).
async fn retry(engine: &Engine<RedisStore, SystemClock>, req: &Request<'_>) -> tollgate::Decision {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.admit_async(req).await {
            Ok(d) if !d.allowed_on_error => return d,
            other => assert!(Instant::now() < deadline, "no answer: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_retried_ambiguous_call_counts_once() {
    if !enabled() {
        return;
    }
    let Some(server) = Server::start() else {
        eprintln!("skipped: redis-server could not be started");
        return;
    };
    runtime().block_on(async {
        let closed = engine(&server.url(), FailurePolicy::FailClosed).await;
        let open = engine(&server.url(), FailurePolicy::FailOpen).await;
        let req = Request::new("agent").units("tokens", 1);
        assert!(closed.admit_async(&req).await.expect("admit").recorded);
        assert!(open.admit_async(&req).await.expect("admit").recorded);

        server.signal("-STOP");
        // No event id from the host: the engine made one, and names it.
        let made = match closed.admit_async(&req).await {
            Err(Error::StoreOutcomeUnknown {
                event: Some(id), ..
            }) => id,
            other => panic!("expected an unknown outcome: {other:?}"),
        };
        // The host's own event id is the one named.
        let hosts = Request::new("agent").units("tokens", 1).event("host-7");
        assert!(matches!(
            closed.admit_async(&hosts).await,
            Err(Error::StoreOutcomeUnknown { event: Some(ref id), .. }) if id == "host-7"
        ));
        // Fail open: allowed, not known to be recorded, and says so.
        let d = open.admit_async(&req).await.expect("fail open");
        assert!(d.allowed_on_error && !d.recorded, "{d:?}");
        let open_made = d.record_unknown.clone().expect("the record is unknown");
        // A read changes nothing: it is never ambiguous.
        assert!(matches!(
            closed.usage_async("agent").await,
            Err(Error::Store { .. })
        ));
        server.signal("-CONT");

        // The paused calls ran when Redis resumed (or not): either way the
        // retries with their event ids leave each counted once.
        retry(
            &closed,
            &Request::new("agent").units("tokens", 1).event(&made),
        )
        .await;
        retry(&closed, &hosts).await;
        retry(&closed, &hosts).await;
        assert_eq!(
            used(&closed).await,
            3.into(),
            "1 + the two ambiguous calls, once each"
        );
        let again = Request::new("agent").units("tokens", 1).event(&open_made);
        retry(&open, &again).await;
        retry(&open, &again).await;
        assert_eq!(used(&open).await, 2.into(), "1 + the ambiguous call, once");
    });
}

#[test]
fn nothing_sent_is_a_plain_store_error() {
    if !enabled() {
        return;
    }
    let Some(mut server) = Server::start() else {
        eprintln!("skipped: redis-server could not be started");
        return;
    };
    runtime().block_on(async {
        let closed = engine(&server.url(), FailurePolicy::FailClosed).await;
        let open = engine(&server.url(), FailurePolicy::FailOpen).await;
        let req = Request::new("agent").units("tokens", 1);
        assert!(closed.admit_async(&req).await.expect("admit").recorded);
        assert!(open.admit_async(&req).await.expect("admit").recorded);
        let _ = server.child.kill();
        let _ = server.child.wait();
        // Once the connection is known gone, reconnecting is refused: the
        // request never leaves, and the error says nothing changed.
        let mut store_errors = 0;
        let mut absent = 0;
        for _ in 0..10 {
            match closed.admit_async(&req).await {
                Err(Error::Store { .. }) => store_errors += 1,
                Err(Error::StoreOutcomeUnknown { message, .. }) => eprintln!("unknown: {message}"),
                other => panic!("{other:?}"),
            }
            let d = open.admit_async(&req).await.expect("fail open");
            assert!(d.allowed_on_error && !d.recorded);
            absent += usize::from(d.record_unknown.is_none());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            store_errors >= 8,
            "{store_errors} of 10 said nothing changed"
        );
        assert!(
            absent >= 8,
            "{absent} of 10 fail-open decisions said absent"
        );
    });
}

/// Every admit gets an event id (the engine's when the host gives none);
/// the engine's are kept for the retry horizon, the host's for the event
/// horizon. A retry with the host's id replays.
#[test]
fn engine_made_event_ids_are_kept_for_the_retry_horizon() {
    let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    };
    runtime().block_on(async {
        let prefix = prefix();
        let store = RedisConfig::new(url.as_str())
            .prefix(&prefix)
            .retry_horizon(Duration::from_secs(60))
            .expiry_margin(Duration::from_secs(1))
            .connect()
            .await
            .expect("connect");
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .plan(PlanConfig::new("plan").limit(LimitConfig::new(
                "tokens",
                Window::calendar(Period::Day),
                1_000u64,
            )))
            .build()
            .expect("catalog");
        let engine = Engine::with_store_and_clock(catalog, store, SystemClock);
        engine
            .allocate(Allocation::new("agent", "plan"))
            .expect("allocate");
        let mut conn = redis::Client::open(url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let ttls = |pattern: String| {
            let mut conn = conn.clone();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .expect("keys");
                let mut out = Vec::new();
                for k in keys {
                    let t: i64 = redis::cmd("PTTL")
                        .arg(&k)
                        .query_async(&mut conn)
                        .await
                        .expect("pttl");
                    out.push(t);
                }
                out
            }
        };
        let req = Request::new("agent").units("tokens", 1);
        engine.admit_async(&req).await.expect("admit");
        let made = ttls(format!("{{{prefix}}}:e:*")).await;
        assert_eq!(made.len(), 1, "the admit carried an event id");
        assert!(
            made[0] > 0 && made[0] <= 61_000,
            "kept for the retry horizon: {made:?}"
        );
        let hosts = Request::new("agent").units("tokens", 1).event("host-1");
        engine.admit_async(&hosts).await.expect("admit");
        let again = engine.admit_async(&hosts).await.expect("replay");
        assert!(
            again.recorded || again.allowed,
            "a replay answers the first"
        );
        let all = ttls(format!("{{{prefix}}}:e:*")).await;
        assert_eq!(all.len(), 2);
        assert!(
            all.iter().any(|&t| t > 3_600_000),
            "the host's id is kept for the event horizon: {all:?}"
        );
        assert_eq!(used(&engine).await, 2.into(), "the replay counted once");
        // The host's id of the engine's own shape is the host's all the
        // same: only the engine's mark on the batch shortens the horizon.
        let shaped = Request::new("agent")
            .units("tokens", 1)
            .event("tollgate:0123456789abcdef0123456789abcdef");
        engine.admit_async(&shaped).await.expect("admit");
        let all = ttls(format!("{{{prefix}}}:e:*")).await;
        assert_eq!(all.len(), 3);
        assert_eq!(
            all.iter().filter(|&&t| t > 3_600_000).count(),
            2,
            "a host id of the engine's shape is kept for the event horizon: {all:?}"
        );
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
    });
}
