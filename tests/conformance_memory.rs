//! The store conformance suite against `MemoryStore`: one test per rule
//! group, with the default shard count and with a single shard (every scope
//! in one lock).

use tollgate::{conformance, MemoryStore};

fn one_shard() -> MemoryStore {
    MemoryStore::with_shards(1)
}

#[test]
fn batches_are_all_or_nothing() {
    conformance::batches_are_all_or_nothing(MemoryStore::new);
    conformance::batches_are_all_or_nothing(one_shard);
}

#[test]
fn bad_batches_change_nothing() {
    conformance::bad_batches_change_nothing(MemoryStore::new);
}

#[test]
fn windows_roll_exactly() {
    conformance::windows_roll_exactly(MemoryStore::new);
}

#[test]
fn holds_count_and_settle() {
    conformance::holds_count_and_settle(MemoryStore::new);
    conformance::holds_count_and_settle(one_shard);
}

#[test]
fn leases_expire_and_renew() {
    conformance::leases_expire_and_renew(MemoryStore::new);
}

#[test]
fn events_apply_once() {
    conformance::events_apply_once(MemoryStore::new);
}

#[test]
fn cooldowns_block_until_they_end() {
    conformance::cooldowns_block_until_they_end(MemoryStore::new);
}

#[test]
fn concurrent_batches_never_over_admit() {
    conformance::concurrent_batches_never_over_admit(MemoryStore::new);
    conformance::concurrent_batches_never_over_admit(one_shard);
}

#[test]
fn a_store_restored_from_a_snapshot_conforms() {
    conformance::run_all(|| {
        tollgate::MemoryStore::restore(MemoryStore::new().snapshot()).expect("restore")
    });
}

#[test]
fn balances_consume_grants_in_order() {
    conformance::balances_consume_grants_in_order(MemoryStore::new);
}

#[test]
fn grants_are_idempotent() {
    conformance::grants_are_idempotent(MemoryStore::new);
}

#[test]
fn balance_holds_settle() {
    conformance::balance_holds_settle(MemoryStore::new);
}

#[test]
fn concurrent_debits_never_overdraw() {
    conformance::concurrent_debits_never_overdraw(MemoryStore::new);
    conformance::concurrent_debits_never_overdraw(one_shard);
}

#[test]
fn closed_periods_are_kept() {
    conformance::closed_periods_are_kept(MemoryStore::new);
    conformance::closed_periods_are_kept(one_shard);
    conformance::closed_periods_are_kept(|| {
        MemoryStore::new()
            .with_history_periods(12)
            .expect("12 periods is a valid depth")
    });
    conformance::closed_periods_are_kept(|| {
        MemoryStore::new()
            .with_history_periods(0)
            .expect("0 periods is a valid depth")
    });
}
