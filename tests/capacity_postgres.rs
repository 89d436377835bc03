//! Capacity leases (`tollgate::capacity`) against a real PostgreSQL named
//! by `TOLLGATE_POSTGRES_URL`: the scenarios of `capacity_redis.rs`, each
//! in its own schema, dropped at the end. Without the variable every test
//! prints that it was skipped and passes.

#[path = "support/capacity.rs"]
mod capacity;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacity::Dyn;
use tollgate::store::{PostgresConfig, PostgresStore};

fn url() -> Option<String> {
    match std::env::var("TOLLGATE_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
            None
        }
    }
}

/// A schema no other test run uses.
fn unique_schema(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tg_cap_{name}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(url: &str, schema: &str) -> Arc<PostgresStore> {
    Arc::new(
        PostgresConfig::new(url)
            .schema(schema)
            .pool_size(2)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to TOLLGATE_POSTGRES_URL"),
    )
}

/// `n` stores on one new, migrated schema, and the first of them to drop
/// the schema with at the end.
async fn stores(url: &str, name: &str, n: usize) -> (Vec<Dyn>, Arc<PostgresStore>) {
    let schema = unique_schema(name);
    let first = connect(url, &schema).await;
    first.migrate().await.expect("migrate");
    let mut all: Vec<Dyn> = vec![Arc::clone(&first) as Dyn];
    for _ in 1..n {
        all.push(connect(url, &schema).await as Dyn);
    }
    (all, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_engines_never_over_admit() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "over", 9).await;
    let reader = all.pop().expect("nine stores");
    let out = capacity::never_over_admits(all, reader).await;
    eprintln!("postgres: {out:?}");
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn a_killed_replica_loses_nothing_past_its_lease() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "kill", 2).await;
    let other = all.pop().expect("two stores");
    let killed = all.pop().expect("two stores");
    capacity::killed_replica_loses_nothing_past_expiry(killed, other).await;
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn round_trips_per_decision_and_usage_lag() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "rt", 1).await;
    let out = capacity::round_trips_and_lag(all.pop().expect("a store")).await;
    eprintln!("postgres: {out:?}");
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn a_period_roll_gives_slices_back() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "roll", 1).await;
    capacity::period_roll_gives_back(all.pop().expect("a store")).await;
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn evented_calls_and_reservations_stay_exact() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "ev", 1).await;
    capacity::evented_and_reservations_are_exact(all.pop().expect("a store")).await;
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn near_the_limit_decisions_go_to_the_store() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "near", 1).await;
    capacity::near_the_limit_goes_to_the_store(all.pop().expect("a store")).await;
    owner.drop_schema().await.expect("drop schema");
}

#[tokio::test]
async fn one_maintain_settles_many_subjects() {
    let Some(url) = url() else { return };
    let (mut all, owner) = stores(&url, "many", 1).await;
    capacity::one_maintain_settles_many_subjects(all.pop().expect("a store")).await;
    owner.drop_schema().await.expect("drop schema");
}
