//! The embedded default store.
//!
//! The store's parts, one file each: [`counters`] (calendar, rolling and
//! lifetime counters), [`holds`] (holds under leases), [`keys`] (the
//! `(meter, window)` ids of a shard), [`ledger`] (event ids), [`shard`] (a
//! shard and the locks a batch holds), [`apply`] (the compact path and the
//! phases both paths share), [`general`] (event ids, leases, cooldowns),
//! [`report`] (counter states; rolls and views of counters due a roll)
//! and [`snapshot`] (snapshot and restore). Times are Unix milliseconds
//! throughout, as the seam passes them.

mod apply;
mod balance;
mod counters;
mod general;
mod history;
mod holds;
mod keys;
mod ledger;
mod report;
mod shard;
mod snapshot;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use super::{
    ms_to_time, validate_period_ops, AllowanceStore, Applied, Batch, LeaseId, LeaseInfo, PeriodOp,
    ScopeKey,
};
use crate::Error;

// The batch checks moved to the seam (`super::validate`); the Redis backend
// still calls them by this path.
pub(super) use super::validate::validate;

use counters::Counter;
use holds::Lease;
use keys::KEYS_COMPACT_AT;
use ledger::Ledger;
use shard::Shard;
pub use snapshot::Snapshot;
#[cfg(test)]
use {crate::window::Window, keys::KeyId, snapshot::Data};
const DEFAULT_SHARDS: usize = 64;
/// Shards of the lease table and of the event ledger.
const SIDE_SHARDS: usize = 16;
/// Every this many batches counted on a shard (at least; see
/// [`SWEEP_BATCHES_PER_SCOPE`]), one shard is swept of idle counters, in turn.
const SWEEP_EVERY: u64 = 1_024;
/// A shard counts this many batches per scope it holds before it triggers a
/// sweep, so a sweep (which visits every scope of a shard) costs each batch
/// a quarter of a scope visit on average, whatever the number of subjects.
const SWEEP_BATCHES_PER_SCOPE: u64 = 4;
/// How long an event id is remembered by default: 24 hours.
const DEFAULT_HORIZON_MS: i64 = 86_400_000;
/// How far behind the triggering batch's `now` an automatic sweep reads
/// counters, holds and cooldowns: one is reclaimed only once it would be
/// gone 24 hours before that batch, so a clock that steps back by up to
/// this much after a sweep still finds the usage a forward call counted
/// (contract rule 2). Event ids and ended leases go by the batch's own
/// time and the horizon.
const SWEEP_GRACE_MS: i64 = 86_400_000;
/// Snapshot format version.
const SNAPSHOT_VERSION: u32 = 1;

/// An in-memory [`AllowanceStore`]: the embedded default for a single process.
///
/// Scopes are spread over shards, each behind a `parking_lot` mutex. A batch
/// locks, in this order, the ledger shard of its event id (if any), the lease
/// shard of its lease (if any), then every counter shard it touches in
/// ascending order — so two batches never deadlock — checks every op, then
/// applies all or none before unlocking: check and record are one step.
///
/// A scope's counters live together in one map entry, in one allocation
/// sized exactly to them. A counter takes 24 bytes: its meter and window are
/// named by a two-byte id into a small per-shard table of the `(meter,
/// window)` pairs in use (a catalog's handful, scanned under the shard's
/// lock, a meter found by its interned name's pointer), so no counter keeps
/// a name or a window of its own. A rolling
/// counter's buckets (8 bytes each) are one more allocation, with its head
/// and total in front. Holds, which only reservations make, live in a
/// per-shard side table. For a plan of four limits, one of them rolling over
/// 168 buckets, a subject's counters take about 165–200 bytes beside its 169
/// bucket slots (a map slot is a 24-byte scope key and the 16-byte counter
/// list); the spread is the map's growth slack.
///
/// Counters that read zero and hold nothing (a calendar period that has
/// ended, a rolling window whose buckets have all left, holds that expired)
/// are reclaimed by sweeps, or all at once by [`MemoryStore::reclaim`], so
/// memory follows the number of active counters, not the traffic. A shard
/// triggers a sweep of one shard, in turn, after 1,024 batches or 4 per scope
/// it holds, whichever is more: a sweep visits every scope of its shard, so
/// spread over the batches that paid for it, it costs about a quarter of a
/// scope visit per batch at any number of subjects (a fixed 1,024 made it
/// the larger part of a call at 1,000,000 subjects). With traffic spread over
/// the shards, an idle counter goes within about max(65,536, 4 × scopes)
/// batches. The same sweeps forget event ids older than the
/// idempotency horizon (24 hours unless set with
/// [`MemoryStore::with_event_horizon`]) — a ledger shard is walked once its
/// oldest id is an eighth of a horizon past it, so walks stay cheap however
/// many ids a horizon holds; an id past the horizon is never replayed, only
/// kept in memory up to that eighth longer — and leases that settled or
/// expired more than a horizon ago, and drop the `(meter, window)` ids no counter
/// uses once a shard has more than 64. A batch drops them before it starts
/// once a shard has 32,768, so only a shard whose live counters use all
/// 65,536 ids refuses a batch that needs another ([`Error::InvalidBatch`],
/// nothing changed).
///
/// Holds expire lazily but exactly: no batch counts a hold whose lease
/// expired at or before its `now`; a batch that applies drops them from the
/// counters it names.
///
/// A clock that steps back (contract rule 2): only a batch that applies
/// rolls a counter, and only the counters it names; a `Check`, a refused
/// batch, a batch that returns an error and
/// [`Engine::usage`](crate::Engine::usage) read each counter as it would be
/// at their `now` without writing it ([`MemoryStore::snapshot`] copies
/// counters as they are). A counter already current costs nothing more; one
/// due a roll is read in a view (the calendar period of `now`, or the
/// rolling buckets still in the window) out of line. A counter holding usage
/// never moves to an earlier period or bucket: after a step back, usage a
/// forward batch wrote still counts, and new usage joins that later period
/// or bucket. Reclaiming keeps to this within a day: an automatic sweep
/// reads counters, holds and cooldowns 24 hours behind the `now` of the
/// batch that triggered it, so it removes a counter only once its usage had
/// all left a day earlier, and a clock that steps back by up to a day after
/// a sweep still finds every unit a forward call counted; a step back of
/// more than a day behind a sweep can find an idle counter reclaimed (and
/// read it as empty). [`MemoryStore::reclaim`] is exact at the time it is
/// given. A sweep rolls no counter it keeps. The day of grace keeps an idle
/// counter in memory up to a day longer than its window needs.
///
/// [`MemoryStore::snapshot`] and [`MemoryStore::restore`] carry every counter,
/// hold, lease, cooldown and ledger entry through serde, so a single-node host
/// can persist state across restarts.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    leases: Box<[Mutex<LeaseMap>]>,
    ledger: Box<[Mutex<Ledger>]>,
    /// Prepaid balances (contract rule 10), by the side shard of their scope.
    balances: Box<[Mutex<balance::BalanceMap>]>,
    // Keyed at random per store: picks the side shard of a lease or event id.
    side_hasher: foldhash::fast::RandomState,
    horizon_ms: i64,
}

/// One side shard's lease table. A `LeaseId` is random already, so foldhash's
/// fast keyed hash (not SipHash) is enough; it stays keyed because a caller
/// can name any id through `LeaseId::from_u128`.
type LeaseMap = HashMap<LeaseId, Lease, foldhash::fast::RandomState>;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn side_shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SIDE_SHARDS).map(|_| Mutex::new(T::default())).collect()
}

impl MemoryStore {
    /// The side shard (lease table, ledger) of `key`: foldhash under this
    /// store's random key, cheaper than std's SipHash on the reserve path.
    fn side_index<T: Hash + ?Sized>(&self, key: &T) -> usize {
        (self.side_hasher.hash_one(key) % SIDE_SHARDS as u64) as usize
    }

    /// A store with the default number of shards (64).
    pub fn new() -> Self {
        Self::with_shards(DEFAULT_SHARDS)
    }

    /// A store with `shards` shards (at least 1). More shards means less
    /// contention between threads working on different scopes.
    pub fn with_shards(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            leases: side_shards(),
            ledger: side_shards(),
            balances: side_shards(),
            side_hasher: foldhash::fast::RandomState::default(),
            horizon_ms: DEFAULT_HORIZON_MS,
        }
        .with_depth(crate::store::DEFAULT_HISTORY_PERIODS)
    }

    /// The same store keeping the totals of `periods` closed calendar
    /// periods per counter (contract rule 11; default
    /// [`DEFAULT_HISTORY_PERIODS`](crate::store::DEFAULT_HISTORY_PERIODS),
    /// 0 keeps none). Each kept total is about 100 bytes, made when a
    /// period with usage closes; totals more than `periods` periods old are
    /// dropped by sweeps, so memory is flat in traffic.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `history_periods`) past
    /// [`MAX_HISTORY_PERIODS`](crate::store::MAX_HISTORY_PERIODS).
    pub fn with_history_periods(self, periods: u32) -> Result<Self, Error> {
        Ok(self.with_depth(crate::store::checked_depth("history_periods", periods)?))
    }

    fn with_depth(mut self, periods: u32) -> Self {
        for shard in self.shards.iter_mut() {
            let history = &mut shard.get_mut().history;
            history.depth = periods;
            history.trim();
        }
        self
    }

    /// Number of closed-period totals kept (contract rule 11).
    pub fn history_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().history.len()).sum()
    }

    /// The same store remembering event ids (and ended leases) for `horizon`
    /// instead of 24 hours. A horizon below one millisecond is taken as one
    /// millisecond.
    #[must_use]
    pub fn with_event_horizon(mut self, horizon: std::time::Duration) -> Self {
        self.horizon_ms = i64::try_from(horizon.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        self
    }

    /// How long event ids are remembered.
    pub fn event_horizon(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.horizon_ms.unsigned_abs())
    }

    fn shard_of(&self, scope: &ScopeKey) -> usize {
        // Bits above those a shard's own map indexes by, below its control
        // bits: the scopes of one shard still spread over its buckets.
        ((scope.hash_value() >> 24) % self.shards.len() as u64) as usize
    }

    /// Remove every counter that reads zero and holds nothing at `now`, every
    /// scope left with no counters, ended cooldowns, and event ids and ended
    /// leases older than the horizon. Returns how many counters were removed.
    ///
    /// Pass the engine's current time: a `now` in the future ends periods
    /// early and drops usage that still counts.
    pub fn reclaim(&self, now: DateTime<Utc>) -> usize {
        let now_ms = now.timestamp_millis();
        for i in 0..SIDE_SHARDS {
            self.sweep_side(i, now_ms, true);
        }
        (0..self.shards.len())
            .map(|i| Self::sweep(&mut self.shards[i].lock(), now_ms))
            .sum()
    }

    /// Number of counters held, live or idle-but-not-yet-reclaimed.
    pub fn counter_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().scopes.values().map(|c| c.len()).sum::<usize>())
            .sum()
    }

    fn sweep(shard: &mut Shard, now_ms: i64) -> usize {
        let Shard {
            keys,
            scopes,
            holds,
            cooldowns,
            history,
            ..
        } = shard;
        holds.retain(|_, list| {
            list.retain_mut(|(_, h)| {
                h.expire(now_ms);
                !h.entries.is_empty()
            });
            !list.is_empty()
        });
        let mut removed = 0;
        scopes.retain(|scope, counters| {
            let held = holds.get(scope);
            // A counter is read as of now, not rolled: a sweep runs at the
            // time of whichever batch triggered it, and only a batch that
            // applies rolls a counter (contract rule 2).
            let keep = |c: &Counter| {
                let key = c.key();
                let Some(&(_, window)) = keys.get(key) else {
                    return true;
                };
                let holds = held.is_some_and(|l| l.iter().any(|(k, _)| *k == key));
                c.used_now(window, now_ms) > 0 || holds
            };
            if counters.iter().all(keep) {
                return true;
            }
            let mut v = std::mem::take(counters).into_vec();
            let before = v.len();
            v.retain(|c| {
                let kept = keep(c);
                // A calendar counter dropped with usage in a closed period:
                // its total is kept first (contract rule 11).
                if let (false, Some(closed), Some(&(meter, window))) =
                    (kept, c.closed_by(now_ms), keys.get(c.key()))
                {
                    history.keep(scope, meter, window, closed, now_ms);
                }
                kept
            });
            removed += before - v.len();
            *counters = v.into_boxed_slice();
            !counters.is_empty()
        });
        cooldowns.retain(|_, until| *until > now_ms);
        history.prune(now_ms);
        if shard.keys.0.len() > KEYS_COMPACT_AT {
            shard.compact_keys();
        }
        removed
    }

    fn sweep_side(&self, i: usize, now_ms: i64, exact: bool) {
        let horizon = self.horizon_ms;
        self.leases[i].lock().retain(|_, l| {
            let ended = l.settled || now_ms >= l.expires_ms;
            if ended && !l.settled && !l.expiry_counted.0 {
                // Expired unsettled, and no call found it: counted here, once.
                l.expiry_counted.0 = true;
                crate::telemetry::lease_swept();
            }
            !(ended && now_ms.saturating_sub(l.expires_ms) >= horizon)
        });
        self.ledger[i].lock().sweep(now_ms, horizon, exact);
        // Balances are records (grants stay); only their holds of ended
        // leases go, read a day behind as counters' holds are.
        let behind = if exact {
            now_ms
        } else {
            now_ms.saturating_sub(SWEEP_GRACE_MS)
        };
        for list in self.balances[i].lock().values_mut() {
            for (_, b) in list.iter_mut() {
                b.holds.expire(behind);
            }
        }
    }
}

impl AllowanceStore for MemoryStore {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        validate(batch)?;
        // Most batches only count: no event id, no lease, no cooldowns. They
        // take a compact path; the rest take the general one, out of line,
        // so its code stays out of the instruction cache of the usual call.
        if batch.event.is_none()
            && batch.lease.is_none()
            && batch.cooldowns.is_empty()
            && batch.balance.is_none()
        {
            self.apply_counters(batch)
        } else {
            self.apply_general(batch)
        }
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        let now_ms = now.timestamp_millis();
        let mut out: Vec<LeaseInfo> = Vec::new();
        for shard in self.leases.iter() {
            for (id, l) in shard.lock().iter() {
                let live = !l.settled && now_ms < l.expires_ms;
                if live && l.deadline_ms.is_some_and(|d| d <= now_ms) {
                    out.push(LeaseInfo::new(
                        *id,
                        l.owner.clone(),
                        ms_to_time(l.opened_ms),
                        ms_to_time(l.expires_ms),
                        l.deadline_ms.map(ms_to_time),
                    ));
                }
            }
        }
        out.sort_by_key(|l| (l.deadline, l.id));
        Ok(out)
    }

    fn history_periods(&self) -> u32 {
        self.shards[0].lock().history.depth
    }

    fn period_usage(&self, ops: &[PeriodOp<'_>], _now_ms: i64) -> Result<Vec<u64>, Error> {
        validate_period_ops(ops)?;
        Ok(ops
            .iter()
            .map(|op| {
                let shard = self.shards[self.shard_of(op.scope)].lock();
                // The counter's own, if it still holds the period, and what
                // a roll or sweep kept of it: disjoint usage of one period.
                let live = shard
                    .find(op.scope, op.meter, op.window)
                    .and_then(|(_, idx)| shard.scopes.get(op.scope)?.get(idx))
                    .and_then(|c| c.calendar_period())
                    .filter(|&(start, _)| start == op.start_ms)
                    .map_or(0, |(_, used)| used);
                let kept = shard
                    .history
                    .get(op.scope, op.meter, op.window, op.start_ms)
                    .unwrap_or(0);
                live.saturating_add(kept)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
