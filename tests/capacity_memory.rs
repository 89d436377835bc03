//! Capacity leases (`tollgate::capacity`) over the in-process
//! `MemoryStore`: the shared scenarios that need no server, and the
//! configuration's checks. The same scenarios run against Redis
//! (`capacity_redis.rs`) and PostgreSQL (`capacity_postgres.rs`).

#[path = "support/capacity.rs"]
mod capacity;

use std::sync::Arc;
use std::time::Duration;

use capacity::Dyn;
use tollgate::capacity::{CapacityConfig, CapacityStore};
use tollgate::store::MemoryStore;
use tollgate::{Error, Snapshot};

fn memory() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_over_admits_on_memory() {
    let shared = memory();
    let stores: Vec<Dyn> = (0..8).map(|_| Arc::clone(&shared) as Dyn).collect();
    let out = capacity::never_over_admits(stores, shared as Dyn).await;
    eprintln!("memory: {out:?}");
}

#[tokio::test]
async fn killed_replica_on_memory() {
    let shared = memory();
    capacity::killed_replica_loses_nothing_past_expiry(Arc::clone(&shared) as Dyn, shared as Dyn)
        .await;
}

#[tokio::test]
async fn round_trips_and_lag_on_memory() {
    let out = capacity::round_trips_and_lag(memory() as Dyn).await;
    eprintln!("memory: {out:?}");
}

#[tokio::test]
async fn period_roll_on_memory() {
    capacity::period_roll_gives_back(memory() as Dyn).await;
}

#[tokio::test]
async fn evented_and_reservations_on_memory() {
    capacity::evented_and_reservations_are_exact(memory() as Dyn).await;
}

#[tokio::test]
async fn near_the_limit_on_memory() {
    capacity::near_the_limit_goes_to_the_store(memory() as Dyn).await;
}

#[test]
fn a_bad_config_is_a_typed_error_and_changes_nothing() {
    let bad = [
        ("capacity.replicas", CapacityConfig::new().replicas(0)),
        (
            "capacity.top_up_interval",
            CapacityConfig::new().top_up_interval(Duration::ZERO),
        ),
        (
            "capacity.lease_ttl",
            CapacityConfig::new().lease_ttl(Duration::from_millis(399)),
        ),
        (
            "capacity.min_slice_decisions",
            CapacityConfig::new().min_slice_decisions(0),
        ),
        (
            "capacity.slice_decisions",
            CapacityConfig::new().slice_decisions(3),
        ),
        ("capacity.max_shapes", CapacityConfig::new().max_shapes(0)),
    ];
    let store = memory();
    let before: Snapshot = store.snapshot();
    for (field, config) in bad {
        match CapacityStore::new(Arc::clone(&store), config) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert_eq!(store.snapshot(), before, "the store is untouched");
    assert!(CapacityStore::new(store, CapacityConfig::new()).is_ok());
}
