//! Holds under leases: per counter, sorted by expiry, and the leases that own them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use super::keys::KeyId;
use crate::name::Name;
use crate::store::{LeaseId, ScopeKey, ScopeMap};
use crate::window::Window;

/// The holds of a shard's counters that have some, per scope and key.
pub(super) type HoldMap = ScopeMap<Vec<(KeyId, Holds)>>;

/// What `(scope, key)` holds.
pub(super) fn held_in(holds: &HoldMap, scope: &ScopeKey, key: KeyId) -> u64 {
    if holds.is_empty() {
        return 0;
    }
    holds
        .get(scope)
        .and_then(|l| l.iter().find(|(k, _)| *k == key))
        .map_or(0, |(_, h)| h.total)
}

/// What `(scope, key)` holds at `now_ms`, read without dropping the holds
/// that expired by then, and whether any did (a batch that applies drops
/// them with [`expire_holds`]; one that does not changes nothing).
#[inline]
pub(super) fn held_at(holds: &HoldMap, scope: &ScopeKey, key: KeyId, now_ms: i64) -> (u64, bool) {
    // Most shards have no holds: this test alone, inlined.
    if holds.is_empty() {
        return (0, false);
    }
    some_held_at(holds, scope, key, now_ms)
}

#[inline(never)]
fn some_held_at(holds: &HoldMap, scope: &ScopeKey, key: KeyId, now_ms: i64) -> (u64, bool) {
    let Some(h) = holds
        .get(scope)
        .and_then(|l| l.iter().find(|(k, _)| *k == key))
        .map(|(_, h)| h)
    else {
        return (0, false);
    };
    let n = h.entries.partition_point(|e| e.expires_ms <= now_ms);
    let gone: u64 = h.entries[..n].iter().map(|e| e.amount).sum();
    (h.total - gone, n > 0)
}

/// Apply `f` to the holds of `(scope, key)`, then forget them if empty.
pub(super) fn with_holds<R>(
    holds: &mut HoldMap,
    scope: &ScopeKey,
    key: KeyId,
    f: impl FnOnce(&mut Holds) -> R,
) -> Option<R> {
    let list = holds.get_mut(scope)?;
    let i = list.iter().position(|(k, _)| *k == key)?;
    let r = f(&mut list[i].1);
    if list[i].1.entries.is_empty() {
        list.swap_remove(i);
        if list.is_empty() {
            holds.remove(scope);
        }
    }
    Some(r)
}

/// What lease `lease` (expiring at `expires_ms`) holds on `(scope, key)`.
pub(super) fn held_by(
    holds: &HoldMap,
    scope: &ScopeKey,
    key: KeyId,
    lease: LeaseId,
    expires_ms: i64,
) -> u64 {
    holds
        .get(scope)
        .and_then(|l| l.iter().find(|(k, _)| *k == key))
        .map_or(0, |(_, h)| h.amount(lease, expires_ms))
}

/// Add `amount` to lease `lease`'s hold on `key` in a scope's `list`
/// (already checked not to overflow).
pub(super) fn add_to(
    list: &mut Vec<(KeyId, Holds)>,
    key: KeyId,
    lease: LeaseId,
    expires_ms: i64,
    amount: u64,
) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, h)) => h.add(lease, expires_ms, amount),
        None => {
            let mut h = Holds::default();
            h.add(lease, expires_ms, amount);
            list.push((key, h));
        }
    }
}

/// Settle lease `lease`'s hold on `(scope, key)` at `now_ms`: drop the
/// holds that expired by then and the lease's own, in one visit (two
/// before: an expiry pass, then a removal). Returns the amount removed.
pub(super) fn settle_hold(
    holds: &mut HoldMap,
    scope: &ScopeKey,
    key: KeyId,
    lease: LeaseId,
    expires_ms: i64,
    now_ms: i64,
) -> u64 {
    if holds.is_empty() {
        return 0;
    }
    with_holds(holds, scope, key, |h| {
        h.expire(now_ms);
        h.remove(lease, expires_ms)
    })
    .unwrap_or(0)
}

/// Drop the holds of `(scope, key)` that expired by `now_ms`; returns what
/// is still held.
#[inline]
pub(super) fn expire_holds(holds: &mut HoldMap, scope: &ScopeKey, key: KeyId, now_ms: i64) -> u64 {
    // Only reservations make holds: most shards have none, and pay for
    // this test alone, inlined, rather than a call.
    if holds.is_empty() {
        return 0;
    }
    expire_some_holds(holds, scope, key, now_ms)
}

#[inline(never)]
pub(super) fn expire_some_holds(
    holds: &mut HoldMap,
    scope: &ScopeKey,
    key: KeyId,
    now_ms: i64,
) -> u64 {
    with_holds(holds, scope, key, |h| {
        h.expire(now_ms);
        h.total
    })
    .unwrap_or(0)
}

/// A counter's live holds, sorted by `(expires_ms, lease)`, and their total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Holds {
    pub(super) total: u64,
    /// One hold inline: a counter usually has one lease on it at a time,
    /// and this saves its allocation and free per reservation.
    #[serde(serialize_with = "entries_out", deserialize_with = "entries_in")]
    pub(super) entries: SmallVec<[Hold; 1]>,
}

/// A counter's holds serialized as a plain list, as when they were a `Vec`.
fn entries_out<S: Serializer>(entries: &SmallVec<[Hold; 1]>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(entries.iter())
}

fn entries_in<'de, D: Deserializer<'de>>(d: D) -> Result<SmallVec<[Hold; 1]>, D::Error> {
    Vec::<Hold>::deserialize(d).map(SmallVec::from_vec)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Hold {
    pub(super) expires_ms: i64,
    pub(super) lease: LeaseId,
    pub(super) amount: u64,
}

/// A lease: who owns it, when it ends, and which counters it holds (the
/// amounts live in the counters' holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lease {
    pub(super) owner: ScopeKey,
    pub(super) opened_ms: i64,
    pub(super) expires_ms: i64,
    #[serde(default)]
    pub(super) deadline_ms: Option<i64>,
    #[serde(default)]
    pub(super) settled: bool,
    /// Whether its expiry was counted (telemetry): by the first call that
    /// found it expired, or by a sweep. Not kept in snapshots.
    #[serde(skip)]
    pub(super) expiry_counted: Counted,
    pub(super) holds: Vec<HoldRef>,
    /// The balance it holds on, if any (contract rule 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) balance: Option<BalanceRef>,
}

/// Whether a lease's expiry was counted: telemetry's bookkeeping, not the
/// lease's state, so two leases compare equal whatever it says (a
/// snapshot, which does not keep it, restores an equal store).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counted(pub(super) bool);

impl PartialEq for Counted {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Counted {}

/// A balance a lease holds on: its scope and money meter (serialized as its
/// string, interned when read back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BalanceRef {
    pub(super) scope: ScopeKey,
    #[serde(with = "crate::store::interned")]
    pub(super) meter: Name,
}

/// A batch's copy of its lease's counters, inline up to four: saves an
/// allocation per settlement.
pub(super) type HoldRefs = SmallVec<[HoldRef; 4]>;

/// A counter a lease holds. Its meter is serialized (in a snapshot) as its
/// string, and interned again when read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HoldRef {
    pub(super) scope: ScopeKey,
    #[serde(with = "crate::store::interned")]
    pub(super) meter: Name,
    pub(super) window: Window,
}

impl Holds {
    /// Drop the holds that expired at or before `now_ms`.
    pub(super) fn expire(&mut self, now_ms: i64) {
        let n = self.entries.partition_point(|h| h.expires_ms <= now_ms);
        if n > 0 {
            for h in self.entries.drain(..n) {
                self.total -= h.amount;
            }
        }
    }

    pub(super) fn position(&self, lease: LeaseId, expires_ms: i64) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|h| (h.expires_ms, h.lease).cmp(&(expires_ms, lease)))
    }

    /// Add `amount` to the lease's hold (already checked not to overflow).
    pub(super) fn add(&mut self, lease: LeaseId, expires_ms: i64, amount: u64) {
        match self.position(lease, expires_ms) {
            Ok(i) => self.entries[i].amount += amount,
            Err(i) => self.entries.insert(
                i,
                Hold {
                    expires_ms,
                    lease,
                    amount,
                },
            ),
        }
        self.total += amount;
    }

    /// Remove the lease's hold; returns its amount (0 if it had none).
    pub(super) fn remove(&mut self, lease: LeaseId, expires_ms: i64) -> u64 {
        match self.position(lease, expires_ms) {
            Ok(i) => {
                let h = self.entries.remove(i);
                self.total -= h.amount;
                h.amount
            }
            Err(_) => 0,
        }
    }

    pub(super) fn amount(&self, lease: LeaseId, expires_ms: i64) -> u64 {
        self.position(lease, expires_ms)
            .map_or(0, |i| self.entries[i].amount)
    }

    /// Snapshot invariants.
    pub(super) fn check(&self) -> Result<(), String> {
        let sum = self
            .entries
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(e.amount))
            .ok_or("holds overflow")?;
        if sum != self.total || self.entries.is_empty() {
            return Err("hold total is not the sum of its holds".into());
        }
        if !self
            .entries
            .windows(2)
            .all(|w| (w[0].expires_ms, w[0].lease) < (w[1].expires_ms, w[1].lease))
        {
            return Err("holds are not sorted by expiry".into());
        }
        Ok(())
    }
}
