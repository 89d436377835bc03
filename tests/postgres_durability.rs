//! `PostgresStore` on a PostgreSQL server the test starts itself (initdb
//! and pg_ctl from `pg_config --bindir`, in a temp dir, on a free port):
//! killed with SIGKILL mid-run and restarted, it has counted every
//! acknowledged decision and admitted nothing past the maximum (and, on a
//! prepaid balance, consumed every acknowledged debit and never overdrew);
//! and an engine fails closed or open while it is down, as on Redis.
//!
//! Runs where `TOLLGATE_POSTGRES_URL` is set (CI) and the machine has
//! PostgreSQL's server binaries; otherwise prints that it was skipped.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::store::{
    Applied, AsyncAllowanceStore, BalanceAction, BalanceOp, Batch, CounterOp, FailurePolicy,
    GrantOp, Mode, PostgresConfig, PostgresStore,
};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, Meter, Name, PlanConfig, Request,
    ScopeKey, SystemClock, Window,
};

/// A PostgreSQL server of the test's own: data directory, port, binaries.
struct Server {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `args` run as the `postgres` user when we are root (initdb and pg_ctl
/// refuse root), as ourselves otherwise.
fn as_postgres(program: &PathBuf, args: &[&str]) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

impl Server {
    /// initdb in a fresh temp dir and start on a free port; `None` (the
    /// test skips) where the binaries are missing.
    fn start() -> Option<Self> {
        if std::env::var("TOLLGATE_POSTGRES_URL").map_or(true, |u| u.is_empty()) {
            eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
            return None;
        }
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        let bindir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        if !bindir.join("initdb").exists() {
            eprintln!("skipped: no initdb in {}", bindir.display());
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("tollgate-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        // The data directory must belong to the user the server runs as.
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let server = Server {
            dir,
            port: free_port(),
            bindir,
        };
        let data = server.data();
        let ok = as_postgres(
            &server.bindir.join("initdb"),
            &["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        )
        .arg("--locale=C")
        .output()
        .expect("run initdb");
        assert!(
            ok.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        server.up();
        Some(server)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// pg_ctl start, waiting until it accepts connections (crash recovery
    /// included).
    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        let out = as_postgres(
            &self.bindir.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .output()
        .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The postmaster's pid, from its pid file.
    fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGKILL the postmaster and every backend it started (a crash: no
    /// shutdown checkpoint, no flush but what each commit already did),
    /// and wait until they are gone.
    fn kill9(&self) {
        let pid = self.pid().expect("postmaster.pid");
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut pids: Vec<String> = vec![pid.to_string()];
        pids.extend(children.split_whitespace().map(str::to_owned));
        let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while pids
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(Instant::now() < deadline, "server processes still alive");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bindir.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        )
        .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn store_on(url: &str, policy: FailurePolicy) -> PostgresStore {
    let store = PostgresConfig::new(url)
        .schema("durable")
        .pool_size(4)
        .timeout(Duration::from_secs(2))
        .failure_policy(policy)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// One caller's call: a batch of its own, applied.
type Call = fn(PostgresStore) -> Pin<Box<dyn Future<Output = Result<Applied, Error>> + Send>>;

/// What callers saw through a kill: calls acknowledged (applied), calls
/// whose outcome was unknown, and calls acknowledged before the kill.
struct ThroughKill {
    acked: u64,
    unknown: u64,
    at_kill: u64,
}

/// Eight callers run `call` until one is refused (an answer that did not
/// apply, checked by `refused_well`); the server is SIGKILLed once 200
/// calls are acknowledged, restarted 300 ms later, and the callers go on.
fn eight_callers_through_a_kill(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    store: &PostgresStore,
    call: Call,
    refused_well: fn(&Applied),
) -> ThroughKill {
    let acked = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, acked, unknown, refused) = (
                store.clone(),
                acked.clone(),
                unknown.clone(),
                refused.clone(),
            );
            rt.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !refused.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match call(store.clone()).await {
                        Ok(a) if a.applied => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(a) => {
                            refused_well(&a);
                            refused.store(true, Ordering::SeqCst);
                        }
                        Err(Error::StoreOutcomeUnknown { .. }) => {
                            unknown.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(Error::Store { .. }) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    // Kill mid-run, once 200 calls are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 200 {
        assert!(Instant::now() < deadline, "no progress before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill9();
    let at_kill = acked.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    server.up();
    for t in tasks {
        rt.block_on(t).expect("caller");
    }
    assert!(
        refused.load(Ordering::SeqCst),
        "a caller was refused at the end"
    );
    ThroughKill {
        acked: acked.load(Ordering::SeqCst),
        unknown: unknown.load(Ordering::SeqCst),
        at_kill,
    }
}

/// Eight callers admit one unit at a time against a lifetime maximum; the
/// server is SIGKILLed once 200 are acknowledged, restarted, and the
/// callers go on until the maximum is reached. Every acknowledged admit is
/// counted (the counter is at least the acknowledged total), nothing passed
/// the maximum, and only a call whose outcome was unknown can have counted
/// without an acknowledgement.
#[test]
fn acknowledged_decisions_survive_sigkill() {
    let Some(server) = Server::start() else {
        return;
    };
    const MAX: u64 = 600;
    let rt = runtime();
    let store = rt.block_on(store_on(&server.url(), FailurePolicy::FailClosed));
    fn admit_one(
        store: PostgresStore,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, Error>> + Send>> {
        Box::pin(async move {
            let scope = ScopeKey::subject("agent");
            let ops = [CounterOp::new(
                &scope,
                Name::new("tokens"),
                Window::Lifetime,
                1,
                Some(MAX),
            )];
            let now_ms = chrono::Utc::now().timestamp_millis();
            store
                .apply(&Batch::new(&ops, Mode::WithinLimits, now_ms))
                .await
        })
    }
    let ThroughKill {
        acked,
        unknown,
        at_kill,
    } = eight_callers_through_a_kill(&rt, &server, &store, admit_one, |a| {
        assert!(a.counters[0].used <= MAX, "{a:?}");
    });
    // What the server holds after crash recovery.
    let used = rt.block_on(async {
        let scope = ScopeKey::subject("agent");
        let ops = [CounterOp::new(
            &scope,
            Name::new("tokens"),
            Window::Lifetime,
            0,
            Some(MAX),
        )];
        let batch = Batch::new(&ops, Mode::Check, chrono::Utc::now().timestamp_millis());
        store.apply(&batch).await.expect("check").counters[0].used
    });
    eprintln!("acked {acked} ({at_kill} before the kill), unknown {unknown}, counted {used}");
    assert!(acked > at_kill, "admits acknowledged after the restart too");
    assert!(
        used >= acked,
        "every acknowledged admit counted: {used} < {acked}"
    );
    assert!(used <= MAX, "never past the maximum: {used}");
    assert!(
        used <= acked + unknown,
        "only unknown outcomes count unacknowledged: {used} > {acked} + {unknown}"
    );
    assert_eq!(used, MAX, "the callers went on until it was full");
}

/// A prepaid balance (contract rule 10) through a crash: a grant of 600,
/// then eight callers debit one unit at a time; the server is SIGKILLed
/// once 200 debits are acknowledged, restarted, and the callers go on until
/// a debit is refused. The grant is still there, once; every acknowledged
/// debit was consumed, only unknown outcomes may have been consumed
/// unacknowledged, and the balance never went below zero.
#[test]
fn acknowledged_debits_survive_sigkill() {
    let Some(server) = Server::start() else {
        return;
    };
    const GRANT: u64 = 600;
    let rt = runtime();
    let store = rt.block_on(store_on(&server.url(), FailurePolicy::FailClosed));
    let cost = Name::new("cost");
    let scope = ScopeKey::subject("payer");
    let grant = |now_ms| {
        let g = GrantOp::new("payment-1", GRANT, 0);
        let op = BalanceOp::new(&scope, cost, BalanceAction::Grant(g));
        let store = store.clone();
        let batch = Batch::new(&[], Mode::Force, now_ms).with_balance(op);
        rt.block_on(async move { store.apply(&batch).await })
    };
    let first = grant(1_000).expect("grant");
    assert_eq!(first.balance.expect("balance").remaining, GRANT);
    fn debit_one(
        store: PostgresStore,
    ) -> Pin<Box<dyn Future<Output = Result<Applied, Error>> + Send>> {
        Box::pin(async move {
            let scope = ScopeKey::subject("payer");
            let debit = BalanceAction::Debit {
                amount: 1,
                overdraft: 0,
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let batch = Batch::new(&[], Mode::WithinLimits, now_ms).with_balance(BalanceOp::new(
                &scope,
                Name::new("cost"),
                debit,
            ));
            store.apply(&batch).await
        })
    }
    let ThroughKill {
        acked,
        unknown,
        at_kill,
    } = eight_callers_through_a_kill(&rt, &server, &store, debit_one, |a| {
        let b = a.balance.as_deref().expect("balance");
        assert!(!b.fits && b.available() >= 0, "{b:?}");
    });
    // The same grant again, after recovery: a replay, credited once.
    let again = grant(chrono::Utc::now().timestamp_millis()).expect("grant again");
    assert_eq!(again.replayed_at_ms, Some(1_000), "the grant survived");
    let b = again.balance.expect("balance");
    let consumed = GRANT - b.remaining;
    eprintln!("acked {acked} ({at_kill} before the kill), unknown {unknown}, consumed {consumed}");
    assert!(acked > at_kill, "debits acknowledged after the restart too");
    assert_eq!((b.debt, b.held), (0, 0), "never overdrawn");
    assert!(
        consumed >= acked,
        "every acknowledged debit consumed: {consumed} < {acked}"
    );
    assert!(
        consumed <= acked + unknown,
        "only unknown outcomes consume unacknowledged: {consumed} > {acked} + {unknown}"
    );
    assert_eq!(consumed, GRANT, "the callers went on until it was spent");
}

fn catalog() -> tollgate::Catalog {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("plan").limit(LimitConfig::new("tokens", Window::Lifetime, 100u64)))
        .build()
        .expect("catalog")
}

/// The server goes away: fail closed answers `Err(Store)`, fail open allows
/// and marks the decision (recording nothing), reservations fail closed;
/// both work again once the server is back, with the same stores.
#[test]
fn an_outage_fails_closed_or_open_and_recovers() {
    let Some(server) = Server::start() else {
        return;
    };
    let rt = runtime();
    let (closed, open) = rt.block_on(async {
        let closed = Engine::with_store_and_clock(
            catalog(),
            store_on(&server.url(), FailurePolicy::FailClosed).await,
            SystemClock,
        );
        let open = Engine::with_store_and_clock(
            catalog(),
            store_on(&server.url(), FailurePolicy::FailOpen).await,
            SystemClock,
        );
        for e in [&closed, &open] {
            e.allocate(Allocation::new("agent", "plan"))
                .expect("allocate");
        }
        (closed, open)
    });
    let req = Request::new("agent").units("tokens", 1);
    rt.block_on(async {
        let d = closed.admit_async(&req).await.expect("admit while up");
        assert!(d.allowed && d.recorded && !d.allowed_on_error);
    });
    server.kill9();
    rt.block_on(async {
        for _ in 0..3 {
            let r = closed.admit_async(&req).await;
            assert!(matches!(r, Err(Error::Store { .. })), "{r:?}");
            let d = open.admit_async(&req).await.expect("fail open");
            assert!(d.allowed && d.allowed_on_error && !d.recorded, "{d:?}");
            assert!(open
                .reserve_async(&req, Duration::from_secs(60))
                .await
                .is_err());
        }
    });
    server.up();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match closed.admit_async(&req).await {
                Ok(d) => {
                    assert!(d.allowed && d.recorded, "{d:?}");
                    // Durable: the admit before the outage still counts.
                    let l = d.limit(&ScopeKey::subject("agent"), "tokens").unwrap();
                    assert_eq!(l.used, 2, "{d:?}");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let d = open.admit_async(&req).await.expect("admit");
        assert!(d.recorded && !d.allowed_on_error);
    });
}
