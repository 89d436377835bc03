//! Allocations shared through `RedisAllocations` by two engines on one real
//! Redis (`TOLLGATE_REDIS_URL`; without it each test prints that it was
//! skipped and passes).

#![cfg(feature = "redis")]

#[path = "support/redis_env.rs"]
mod redis_env;
use redis_env::{unique_prefix, url};

use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::store::{RedisAllocations, RedisConfig, RedisStore, TimeSource};
use tollgate::{
    Allocation, AsyncAllocationSource, Catalog, Engine, Error, LimitConfig, ManualClock, Period,
    Request, Window,
};

fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
      "meters": [{"id": "jobs", "unit": "count"}],
      "plans": [
        {"id": "free", "limits": [{"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": 10}]}
      ]
    }"#,
    )
    .unwrap()
}

const MAX_AGE: Duration = Duration::from_secs(5);
const SUBJECT: &str = "sk-live-4f9a2c7e1b";

async fn replica(url: &str, prefix: &str, clock: &ManualClock) -> Engine<RedisStore, ManualClock> {
    let store = RedisConfig::new(url)
        .prefix(prefix)
        .time_source(TimeSource::Batch)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to TOLLGATE_REDIS_URL");
    let source = RedisAllocations::connect(url, prefix, b"test secret")
        .await
        .expect("connect to TOLLGATE_REDIS_URL");
    Engine::with_store_and_clock(catalog(), store, clock.clone())
        .with_async_allocation_source(source, MAX_AGE)
}

/// Every key under `prefix` and every string value, for leak checks; then
/// the keys are deleted.
async fn dump_and_flush(url: &str, prefix: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut seen = keys.clone();
    for k in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "string" {
            // (The event ledger's values are binary msgpack.)
            let v: Vec<u8> = redis::cmd("GET")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            seen.push(String::from_utf8_lossy(&v).into_owned());
        }
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_allocations_through_redis() {
    let Some(url) = url() else { return };
    let prefix = unique_prefix("share");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap());
    let a = replica(&url, &prefix, &clock).await;
    a.allocate_async(Allocation::new(SUBJECT, "free"))
        .await
        .unwrap();
    // The sync write would block: refused with a typed error, nothing changed.
    assert!(matches!(
        a.allocate(Allocation::new(SUBJECT, "free")),
        Err(Error::InvalidRequest { .. })
    ));
    let jobs = |n| Request::new(SUBJECT).units("jobs", n);
    assert!(a.admit_async(&jobs(4)).await.unwrap().allowed);

    // A replica started later knows the subject.
    let b = replica(&url, &prefix, &clock).await;
    let d = b.admit_async(&jobs(6)).await.unwrap();
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.limits[0].used, 10);
    assert!(!b.admit_async(&jobs(1)).await.unwrap().allowed);

    // A cap raised through a is enforced by b within max_age.
    let raised = Allocation::new(SUBJECT, "free").with_override(LimitConfig::new(
        "jobs",
        Window::calendar(Period::Day),
        15u64,
    ));
    a.allocate_async(raised.clone()).await.unwrap();
    assert!(
        !b.admit_async(&jobs(1)).await.unwrap().allowed,
        "b's copy is fresh"
    );
    clock.advance(MAX_AGE);
    let d = b.admit_async(&jobs(5)).await.unwrap();
    assert!(d.allowed, "{d:?}");
    assert_eq!((d.limits[0].used, d.limits[0].max), (15, Some(15)));
    assert_eq!(b.allocation(SUBJECT), Some(raised));

    // Removed through b: a refuses it after max_age.
    assert!(b.deallocate_async(SUBJECT).await.unwrap());
    clock.advance(MAX_AGE);
    assert!(matches!(
        a.check_async(&jobs(1)).await,
        Err(Error::UnknownSubject { .. })
    ));

    // A bad allocation written to Redis by another hand is refused, naming
    // the subject.
    let other = RedisAllocations::connect(&url, &prefix, b"test secret")
        .await
        .unwrap();
    other.save(&Allocation::new(SUBJECT, "gold")).await.unwrap();
    let err = a.check_async(&jobs(1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidAllocation { subject, .. } if subject == SUBJECT),
        "{err:?}"
    );

    // No key and no value gives the subject id back.
    let seen = dump_and_flush(&url, &prefix).await;
    assert!(seen.iter().any(|s| s.contains(":alloc:")), "{seen:?}");
    assert!(seen.iter().all(|s| !s.contains(SUBJECT)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_redis_allocation_settings_are_refused() {
    let Some(url) = url() else { return };
    assert!(matches!(
        RedisAllocations::connect(&url, "p", b"").await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        RedisAllocations::connect(&url, "p{x}", b"s").await,
        Err(Error::InvalidConfig { .. })
    ));
}
