//! A shard: its keys, the counters, holds and cooldowns of its scopes, and the locks a batch holds.

use parking_lot::MutexGuard;

use super::counters::Counter;
use super::history::History;
use super::holds::{expire_holds, with_holds, HoldMap, Holds};
use super::keys::{KeyId, Keys};
use super::{SWEEP_BATCHES_PER_SCOPE, SWEEP_EVERY};
use crate::name::Name;
use crate::store::{CounterOp, LeaseId, ScopeKey, ScopeMap};
use crate::window::Window;

/// The end of the run of ops from `i` on that name the same scope (so one
/// map lookup serves them all).
pub(super) fn run_end(ops: &[CounterOp<'_>], shards: &[usize], i: usize) -> usize {
    let (scope, shard) = (ops[i].scope, shards[i]);
    let mut j = i + 1;
    while j < ops.len()
        && shards[j] == shard
        && (std::ptr::eq(ops[j].scope, scope) || ops[j].scope == scope)
    {
        j += 1;
    }
    j
}

#[derive(Debug, Default)]
pub(super) struct Shard {
    /// The `(meter, window)` pairs this shard's counters are kept for.
    pub(super) keys: Keys,
    /// Each scope's counters, in one exactly sized allocation.
    pub(super) scopes: ScopeMap<Box<[Counter]>>,
    /// The live holds of the counters that have some, per scope and key.
    pub(super) holds: HoldMap,
    /// Cooldown end (Unix ms) per scope that has one.
    pub(super) cooldowns: ScopeMap<i64>,
    /// Batches that locked this shard first since it last triggered a
    /// sweep; at `SWEEP_EVERY` or 4 per scope it holds, whichever is more,
    /// one shard (round robin) is swept.
    pub(super) batches: u64,
    /// Sweeps this shard has triggered: picks the next shard in turn.
    pub(super) sweeps: u64,
    /// The calendar periods its counters closed (contract rule 11).
    pub(super) history: History,
}

impl Shard {
    /// The position of the counter `key` in `scope`'s counters.
    pub(super) fn position(&self, scope: &ScopeKey, key: KeyId) -> Option<usize> {
        self.scopes.get(scope)?.iter().position(|c| c.key() == key)
    }

    /// The key and position of the counter `(meter, window)` of `scope`.
    pub(super) fn find(
        &self,
        scope: &ScopeKey,
        meter: Name,
        window: Window,
    ) -> Option<(KeyId, usize)> {
        let key = self.keys.find(meter, window, 0)?;
        Some((key, self.position(scope, key)?))
    }

    /// The counter `key` (of `window`) of `scope`, created if absent, and its
    /// position.
    pub(super) fn counter_or_new(
        &mut self,
        scope: &ScopeKey,
        key: KeyId,
        window: Window,
        now_ms: i64,
    ) -> Option<(usize, &mut Counter)> {
        // Clone the scope key only when the scope is new.
        if !self.scopes.contains_key(scope) {
            self.scopes.insert(scope.clone(), Box::new([]));
        }
        let counters = self.scopes.get_mut(scope)?;
        let idx = match counters.iter().position(|c| c.key() == key) {
            Some(i) => i,
            None => {
                // Grow by exactly one: a scope's counters have no slack.
                let mut v = std::mem::take(counters).into_vec();
                v.reserve_exact(1);
                v.push(Counter::new(key, window, now_ms));
                *counters = v.into_boxed_slice();
                counters.len() - 1
            }
        };
        counters.get_mut(idx).map(|c| (idx, c))
    }

    pub(super) fn holds(&self, scope: &ScopeKey, key: KeyId) -> Option<&Holds> {
        if self.holds.is_empty() {
            return None;
        }
        self.holds
            .get(scope)?
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, h)| h)
    }

    /// Add a hold (already checked not to overflow).
    pub(super) fn add_hold(
        &mut self,
        scope: &ScopeKey,
        key: KeyId,
        lease: LeaseId,
        expires: i64,
        n: u64,
    ) {
        if !self.holds.contains_key(scope) {
            self.holds.insert(scope.clone(), Vec::new());
        }
        let Some(list) = self.holds.get_mut(scope) else {
            return;
        };
        let i = match list.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                list.push((key, Holds::default()));
                list.len() - 1
            }
        };
        list[i].1.add(lease, expires, n);
    }

    pub(super) fn remove_hold(
        &mut self,
        scope: &ScopeKey,
        key: KeyId,
        lease: LeaseId,
        expires: i64,
    ) -> u64 {
        with_holds(&mut self.holds, scope, key, |h| h.remove(lease, expires)).unwrap_or(0)
    }

    /// Roll the counter at `idx` of `scope` (of `window`) to `now_ms` and
    /// drop its expired holds; returns its usage and holds, or `None` if
    /// there is no such counter.
    pub(super) fn advance(
        &mut self,
        scope: &ScopeKey,
        idx: usize,
        window: Window,
        now_ms: i64,
    ) -> Option<(u64, u64)> {
        let c = self.scopes.get_mut(scope)?.get_mut(idx)?;
        let closed = c.advance(window, now_ms);
        let (used, key) = (c.used(), c.key());
        if let (Some(closed), Some(&(meter, _))) = (closed, self.keys.get(key)) {
            self.history.keep(scope, meter, window, closed, now_ms);
        }
        Some((used, expire_holds(&mut self.holds, scope, key, now_ms)))
    }

    /// Count a batch on this shard, `id`, the first it locked: see
    /// [`Locked::count_batch`].
    #[inline]
    pub(super) fn count_batch(&mut self, id: usize) -> Option<(usize, u64)> {
        self.batches += 1;
        let period = SWEEP_EVERY.max(SWEEP_BATCHES_PER_SCOPE * self.scopes.len() as u64);
        (self.batches >= period).then(|| {
            self.batches = 0;
            self.sweeps += 1;
            (id, self.sweeps)
        })
    }

    /// Drop the keys no counter uses, renumbering the rest.
    #[cold]
    #[inline(never)]
    pub(super) fn compact_keys(&mut self) {
        let mut used = vec![false; self.keys.0.len()];
        for c in self.scopes.values().flat_map(|cs| cs.iter()) {
            if let Some(u) = used.get_mut(usize::from(c.key())) {
                *u = true;
            }
        }
        let mut map = vec![0; used.len()];
        let mut kept = Vec::new();
        for (i, k) in std::mem::take(&mut self.keys.0).into_iter().enumerate() {
            if used[i] {
                map[i] = kept.len() as KeyId;
                kept.push(k);
            }
        }
        self.keys.0 = kept;
        for c in self.scopes.values_mut().flat_map(|cs| cs.iter_mut()) {
            let k = map[usize::from(c.key())];
            c.set_key(k);
        }
        for (k, _) in self.holds.values_mut().flat_map(|l| l.iter_mut()) {
            *k = map[usize::from(*k)];
        }
    }
}

/// No counter found yet for an op.
pub(super) const NONE: usize = usize::MAX;

/// The counter shards a batch holds, in ascending order.
pub(super) struct Locked<'s> {
    /// The lowest shard's id and guard (most batches lock only it; `None`
    /// for a batch that names no shard).
    pub(super) first_id: usize,
    pub(super) first: Option<MutexGuard<'s, Shard>>,
    /// The others, by ascending id.
    pub(super) rest: Vec<(usize, MutexGuard<'s, Shard>)>,
}

impl Locked<'_> {
    pub(super) fn shard(&mut self, shard_id: usize) -> &mut Shard {
        // Every shard a batch names was locked up front.
        match (&mut self.first, shard_id == self.first_id) {
            (Some(g), true) => g,
            _ => {
                let i = self
                    .rest
                    .binary_search_by_key(&shard_id, |(id, _)| *id)
                    .unwrap_or(0);
                &mut self.rest[i].1
            }
        }
    }

    /// Count the batch on the first shard it holds (no counter shared by
    /// every thread); every `SWEEP_EVERY` batches or more, the shard and
    /// its sweep count, for a sweep of a shard in turn once the locks are
    /// released.
    #[inline]
    pub(super) fn count_batch(&mut self) -> Option<(usize, u64)> {
        let first = self.first_id;
        self.first
            .as_deref_mut()
            .and_then(|shard| shard.count_batch(first))
    }
}
