//! The embedded default store.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use super::{
    fits, AllowanceStore, Applied, Batch, CounterOp, CounterState, Fraction, LeaseAction, LeaseId,
    LeaseInfo, Mode, ScopeKey, ScopeMap, SettledHold,
};
use crate::inline::Inline;
use crate::window::Window;
use crate::Error;

const DEFAULT_SHARDS: usize = 64;
/// Shards of the lease table and of the event ledger.
const SIDE_SHARDS: usize = 16;
/// Every this many batches counted on a shard, one shard is swept of idle
/// counters, in turn.
const SWEEP_EVERY: u64 = 1_024;
/// How long an event id is remembered by default: 24 hours.
const DEFAULT_HORIZON_MS: i64 = 86_400_000;
/// Snapshot format version.
const SNAPSHOT_VERSION: u32 = 1;

/// An in-memory [`AllowanceStore`]: the embedded default for a single process.
///
/// Scopes are spread over shards, each behind a `parking_lot` mutex. A
/// scope's counters live together in one map entry. A batch locks, in this
/// order, the ledger shard of its event id (if any), the lease shard of its
/// lease (if any), then every counter shard it touches in ascending order —
/// so two batches never deadlock — checks every op, then applies all or none
/// before unlocking: check and record are one step.
///
/// Counters that read zero and hold nothing (a calendar period that has
/// ended, a rolling window whose buckets have all left, holds that expired)
/// are reclaimed by a sweep of one shard every 1,024 batches, or all at once
/// by [`MemoryStore::reclaim`], so memory follows the number of active
/// counters, not the traffic. The same sweep forgets event ids older than the
/// idempotency horizon (24 hours unless set with
/// [`MemoryStore::with_event_horizon`]) and leases that settled or expired
/// more than a horizon ago.
///
/// Holds expire lazily but exactly: every batch drops, before it reads a
/// counter, the holds whose lease expired at or before its `now`.
///
/// [`MemoryStore::snapshot`] and [`MemoryStore::restore`] carry every counter,
/// hold, lease, cooldown and ledger entry through serde, so a single-node host
/// can persist state across restarts.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    leases: Box<[Mutex<HashMap<LeaseId, Lease>>]>,
    ledger: Box<[Mutex<Ledger>]>,
    horizon_ms: i64,
}

/// Event id to the batch it applied.
type Ledger = HashMap<Box<str>, Entry>;

#[derive(Debug, Default)]
struct Shard {
    scopes: ScopeMap<Vec<Counter>>,
    /// Cooldown end (Unix ms) per scope that has one.
    cooldowns: ScopeMap<i64>,
    /// Batches that locked this shard first; every `SWEEP_EVERY` of them,
    /// one shard (round robin) is swept.
    batches: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    meter: Arc<str>,
    window: Window,
    data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holds: Option<Box<Holds>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Data {
    /// Usage in the period `[start, end)`; rolled when `now >= end`.
    Calendar {
        start: i64,
        end: i64,
        used: u64,
    },
    Rolling(Rolling),
    Lifetime {
        used: u64,
    },
    /// Holds only.
    Concurrent,
}

/// A rolling window: `slots.len() == buckets + 1` buckets of `width_ms`, the
/// newest at bucket index `head`, and their running `total`. `tail` is the
/// oldest bucket still holding usage (when `total > 0`), kept as buckets
/// leave, so no read walks every bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rolling {
    width_ms: i64,
    head: i64,
    tail: i64,
    total: u64,
    slots: Box<[u64]>,
}

/// A counter's live holds, sorted by `(expires_ms, lease)`, and their total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Holds {
    total: u64,
    entries: Vec<Hold>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    expires_ms: i64,
    lease: LeaseId,
    amount: u64,
}

/// A lease: who owns it, when it ends, and which counters it holds (the
/// amounts live in the counters' holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    owner: ScopeKey,
    opened_ms: i64,
    expires_ms: i64,
    #[serde(default)]
    deadline_ms: Option<i64>,
    #[serde(default)]
    settled: bool,
    holds: Vec<HoldRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HoldRef {
    scope: ScopeKey,
    meter: Arc<str>,
    window: Window,
}

/// An applied event: what it was and what it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    fingerprint: u64,
    at_ms: i64,
    applied: Applied,
}

/// Everything a [`MemoryStore`] holds, as plain data: counters with their
/// buckets and holds, leases, cooldowns and the event ledger. Serialize it
/// with any serde format; [`MemoryStore::restore`] checks it before use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    version: u32,
    horizon_ms: i64,
    scopes: Vec<(ScopeKey, Vec<Counter>)>,
    cooldowns: Vec<(ScopeKey, i64)>,
    leases: Vec<(LeaseId, Lease)>,
    events: Vec<(String, Entry)>,
}

impl Snapshot {
    /// Number of counters in the snapshot.
    pub fn counter_count(&self) -> usize {
        self.scopes.iter().map(|(_, c)| c.len()).sum()
    }

    /// Number of leases (live, or ended and not yet forgotten).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Number of remembered event ids.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }
}

impl Rolling {
    fn new(width_ms: i64, buckets: u32, now_ms: i64) -> Self {
        let head = now_ms.div_euclid(width_ms);
        Self {
            width_ms,
            head,
            tail: head,
            total: 0,
            slots: vec![0; buckets as usize + 1].into_boxed_slice(),
        }
    }

    fn n(&self) -> i64 {
        self.slots.len() as i64
    }

    fn slot(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.n()) as usize
    }

    /// Drop the buckets that have left by `now_ms`.
    fn advance(&mut self, now_ms: i64) {
        let cur = now_ms.div_euclid(self.width_ms);
        if cur <= self.head {
            // Same bucket, or a clock that stepped back: keep writing to head.
            return;
        }
        let steps = (cur - self.head).min(self.n());
        for k in 1..=steps {
            let i = self.slot(self.head + k);
            self.total -= self.slots[i];
            self.slots[i] = 0;
        }
        self.head = cur;
        if self.total == 0 {
            self.tail = cur;
        } else if self.tail < self.oldest_bucket() {
            // Some bucket in [oldest, head] holds usage; walk to it. Each
            // bucket index is walked past at most once in a counter's life.
            self.tail = self.oldest_bucket();
            while self.slots[self.slot(self.tail)] == 0 {
                self.tail += 1;
            }
        }
    }

    fn add(&mut self, delta: u64) {
        if self.total == 0 {
            self.tail = self.head;
        }
        let i = self.slot(self.head);
        self.slots[i] += delta;
        self.total += delta;
    }

    /// Time a bucket's usage leaves: the start of bucket `b + n`.
    fn leaves_at(&self, bucket: i64) -> i64 {
        (bucket + self.n()).saturating_mul(self.width_ms)
    }

    fn oldest_bucket(&self) -> i64 {
        self.head - self.n() + 1
    }

    fn resets_at(&self) -> Option<i64> {
        (self.total > 0).then(|| self.leaves_at(self.tail))
    }

    /// Earliest time `total - left + delta <= max`, if `delta <= max`.
    fn available_at(&self, delta: u64, max: u64) -> Option<i64> {
        if delta > max {
            return None;
        }
        let need = (u128::from(self.total) + u128::from(delta)).saturating_sub(u128::from(max));
        let mut freed = 0u128;
        for b in self.tail..=self.head {
            freed += u128::from(self.slots[self.slot(b)]);
            if freed >= need {
                return Some(self.leaves_at(b));
            }
        }
        None
    }

    /// Snapshot invariants: the layout matches the window, the total is the
    /// sum of the buckets, and the tail is a counted bucket.
    fn check(&self, span_secs: u64, buckets: u32) -> Result<(), String> {
        if self.width_ms != Window::bucket_ms(span_secs, buckets)
            || self.slots.len() != buckets as usize + 1
        {
            return Err("rolling buckets do not match the window".into());
        }
        let sum = self
            .slots
            .iter()
            .try_fold(0u64, |a, &b| a.checked_add(b))
            .ok_or("rolling buckets overflow")?;
        if sum != self.total {
            return Err("rolling total is not the sum of its buckets".into());
        }
        if self.total > 0 && !(self.oldest_bucket() <= self.tail && self.tail <= self.head) {
            return Err("rolling tail is outside the window".into());
        }
        Ok(())
    }
}

impl Holds {
    /// Drop the holds that expired at or before `now_ms`.
    fn expire(&mut self, now_ms: i64) {
        let n = self.entries.partition_point(|h| h.expires_ms <= now_ms);
        if n > 0 {
            for h in self.entries.drain(..n) {
                self.total -= h.amount;
            }
        }
    }

    fn position(&self, lease: LeaseId, expires_ms: i64) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|h| (h.expires_ms, h.lease).cmp(&(expires_ms, lease)))
    }

    /// Add `amount` to the lease's hold (already checked not to overflow).
    fn add(&mut self, lease: LeaseId, expires_ms: i64, amount: u64) {
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
    fn remove(&mut self, lease: LeaseId, expires_ms: i64) -> u64 {
        match self.position(lease, expires_ms) {
            Ok(i) => {
                let h = self.entries.remove(i);
                self.total -= h.amount;
                h.amount
            }
            Err(_) => 0,
        }
    }

    fn amount(&self, lease: LeaseId, expires_ms: i64) -> u64 {
        self.position(lease, expires_ms)
            .map_or(0, |i| self.entries[i].amount)
    }
}

impl Counter {
    fn new(meter: &str, window: Window, now_ms: i64) -> Self {
        let data = match window {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                let (start, end) = Window::calendar_bounds(period, utc_offset_secs, now_ms);
                Data::Calendar {
                    start,
                    end,
                    used: 0,
                }
            }
            Window::Rolling { span_secs, buckets } => Data::Rolling(Rolling::new(
                Window::bucket_ms(span_secs, buckets),
                buckets,
                now_ms,
            )),
            Window::Lifetime => Data::Lifetime { used: 0 },
            Window::Concurrent => Data::Concurrent,
        };
        Self {
            meter: Arc::from(meter),
            window,
            data,
            holds: None,
        }
    }

    /// Roll the counter forward to `now_ms` and drop expired holds.
    fn advance(&mut self, now_ms: i64) {
        match (&mut self.data, self.window) {
            (
                Data::Calendar { start, end, used },
                Window::Calendar {
                    period,
                    utc_offset_secs,
                },
            ) if now_ms >= *end || (now_ms < *start && *used == 0) => {
                // A clock that steps back into an earlier period keeps a
                // counter holding usage in its own period (usage never moves
                // to an earlier one); an empty counter follows the clock.
                (*start, *end) = Window::calendar_bounds(period, utc_offset_secs, now_ms);
                *used = 0;
            }
            (Data::Rolling(r), _) => r.advance(now_ms),
            _ => {}
        }
        if let Some(h) = &mut self.holds {
            h.expire(now_ms);
            if h.entries.is_empty() {
                self.holds = None;
            }
        }
    }

    fn used(&self) -> u64 {
        match &self.data {
            Data::Calendar { used, .. } | Data::Lifetime { used } => *used,
            Data::Rolling(r) => r.total,
            Data::Concurrent => 0,
        }
    }

    fn held(&self) -> u64 {
        self.holds.as_ref().map_or(0, |h| h.total)
    }

    /// Add `delta` to usage (already checked not to overflow). A concurrent
    /// counter has no usage (the batch was validated not to add any).
    fn add(&mut self, delta: u64) {
        match &mut self.data {
            Data::Calendar { used, .. } | Data::Lifetime { used } => *used += delta,
            Data::Rolling(r) => r.add(delta),
            Data::Concurrent => {}
        }
    }

    fn holds_mut(&mut self) -> &mut Holds {
        self.holds.get_or_insert_with(Box::default)
    }

    fn remove_hold(&mut self, lease: LeaseId, expires_ms: i64) -> u64 {
        let Some(h) = &mut self.holds else {
            return 0;
        };
        let amount = h.remove(lease, expires_ms);
        if h.entries.is_empty() {
            self.holds = None;
        }
        amount
    }

    fn matches(&self, meter: &str, window: Window) -> bool {
        self.window == window && &*self.meter == meter
    }

    /// Snapshot invariants.
    fn check(&self) -> Result<(), String> {
        match (&self.data, self.window) {
            (Data::Calendar { start, end, .. }, Window::Calendar { .. }) if start < end => {}
            (Data::Rolling(r), Window::Rolling { span_secs, buckets }) => {
                r.check(span_secs, buckets)?;
            }
            (Data::Lifetime { .. }, Window::Lifetime) | (Data::Concurrent, Window::Concurrent) => {}
            _ => {
                return Err(format!(
                    "counter data does not match window {}",
                    self.window
                ))
            }
        }
        if let Some(h) = &self.holds {
            let sum = h
                .entries
                .iter()
                .try_fold(0u64, |a, e| a.checked_add(e.amount))
                .ok_or("holds overflow")?;
            if sum != h.total || h.entries.is_empty() {
                return Err("hold total is not the sum of its holds".into());
            }
            if !h
                .entries
                .windows(2)
                .all(|w| (w[0].expires_ms, w[0].lease) < (w[1].expires_ms, w[1].lease))
            {
                return Err("holds are not sorted by expiry".into());
            }
        }
        Ok(())
    }
}

/// The state of a counter (or of an absent one, `counter == None`).
fn state_of(
    counter: Option<&Counter>,
    window: Window,
    now_ms: i64,
    delta: u64,
    max: Option<u64>,
) -> CounterState {
    let used = counter.map_or(0, Counter::used);
    let held = counter.map_or(0, Counter::held);
    // Past the maximum with this delta: for a zero delta, a counter that
    // `Force` already took past it.
    let over = max
        .is_some_and(|m| u128::from(used) + u128::from(held) + u128::from(delta) > u128::from(m));
    // Holds are in-flight work: waiting for the window does not free them.
    let pending = held.saturating_add(delta);
    let (period_start, resets_at, available_at) = match window {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => {
            // A counter reports the period its usage belongs to (after a
            // clock step back, that can be later than `now`'s period).
            let (start, next) = match counter.map(|c| &c.data) {
                Some(&Data::Calendar { start, end, .. }) => (start, end),
                _ => Window::calendar_bounds(period, utc_offset_secs, now_ms),
            };
            let avail = match max {
                Some(m) if over && pending <= m => Some(next),
                _ => None,
            };
            (Some(start), Some(next), avail)
        }
        Window::Rolling { span_secs, .. } => {
            let start = now_ms.saturating_sub((span_secs as i64).saturating_mul(1_000));
            let rolling = counter.and_then(|c| match &c.data {
                Data::Rolling(r) => Some(r),
                _ => None,
            });
            let resets = rolling.and_then(Rolling::resets_at);
            let avail = match (max, rolling) {
                (Some(m), Some(r)) if over => r.available_at(pending, m),
                _ => None,
            };
            (Some(start), resets, avail)
        }
        Window::Lifetime | Window::Concurrent => (None, None, None),
    };
    CounterState {
        used,
        held,
        period_start: period_start.map(ms_to_time),
        resets_at: resets_at.map(ms_to_time),
        available_at: available_at.map(ms_to_time),
    }
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidBatch {
        reason: reason.into(),
    }
}

/// Contract rules 1 and 7: valid windows, each counter at most once, lease
/// actions in the right mode, no usage on a concurrent counter.
pub(super) fn validate(batch: &Batch<'_>) -> Result<(), Error> {
    let ops = batch.ops;
    let holding = matches!(
        batch.lease.map(|l| l.action),
        Some(LeaseAction::Open { .. } | LeaseAction::Grow)
    );
    for (i, op) in ops.iter().enumerate() {
        op.window
            .validate()
            .map_err(|reason| invalid(format!("ops[{i}]: {reason}")))?;
        if ops[..i]
            .iter()
            .any(|o| o.window == op.window && o.meter == op.meter && o.scope == op.scope)
        {
            return Err(invalid(format!(
                "ops[{i}]: counter {} {} {} named twice",
                op.scope, op.meter, op.window
            )));
        }
        if op.window == Window::Concurrent && op.delta > 0 && !holding {
            return Err(invalid(format!(
                "ops[{i}]: a concurrent counter takes holds, not usage"
            )));
        }
    }
    if let Some(lease) = batch.lease {
        let ok = match lease.action {
            LeaseAction::Open { .. } => matches!(batch.mode, Mode::WithinLimits | Mode::Check),
            LeaseAction::Renew { .. } => ops.is_empty(),
            LeaseAction::Grow => matches!(batch.mode, Mode::WithinLimits | Mode::Force),
            LeaseAction::Settle { .. } => batch.mode == Mode::Force,
        };
        if !ok {
            return Err(invalid(format!(
                "lease action {:?} cannot run in mode {:?} with {} ops",
                lease.action,
                batch.mode,
                ops.len()
            )));
        }
    }
    Ok(())
}

/// No counter found yet for an op.
const NONE: usize = usize::MAX;

/// The counter shards a batch holds, in ascending order.
struct Locked<'s> {
    order: Inline<usize>,
    /// The lowest shard's guard, then the others (most batches lock one).
    first: Option<MutexGuard<'s, Shard>>,
    rest: Vec<MutexGuard<'s, Shard>>,
}

impl Locked<'_> {
    fn shard(&mut self, shard_id: usize) -> &mut Shard {
        // Every shard a batch names was locked up front.
        let i = self.order.as_slice().binary_search(&shard_id).unwrap_or(0);
        match (i, &mut self.first) {
            (0, Some(g)) => g,
            _ => &mut self.rest[i - 1],
        }
    }

    fn counter(
        &mut self,
        shard_id: usize,
        scope: &ScopeKey,
        meter: &str,
        window: Window,
    ) -> Option<&mut Counter> {
        self.shard(shard_id)
            .scopes
            .get_mut(scope)?
            .iter_mut()
            .find(|c| c.matches(meter, window))
    }

    /// The position of a counter in its scope's list, or `NONE`.
    fn position(
        &mut self,
        shard_id: usize,
        scope: &ScopeKey,
        meter: &str,
        window: Window,
    ) -> usize {
        self.shard(shard_id)
            .scopes
            .get(scope)
            .and_then(|cs| cs.iter().position(|c| c.matches(meter, window)))
            .unwrap_or(NONE)
    }

    /// The counter at `idx` of `scope` (a position found in this batch).
    fn at(&mut self, shard_id: usize, scope: &ScopeKey, idx: usize) -> Option<&mut Counter> {
        if idx == NONE {
            return None;
        }
        self.shard(shard_id).scopes.get_mut(scope)?.get_mut(idx)
    }

    /// The counter, created if absent, and its position.
    fn counter_or_new(
        &mut self,
        shard_id: usize,
        scope: &ScopeKey,
        meter: &str,
        window: Window,
        now_ms: i64,
    ) -> Option<(usize, &mut Counter)> {
        let scopes = &mut self.shard(shard_id).scopes;
        // Clone the key only when the scope is new.
        if !scopes.contains_key(scope) {
            scopes.insert(scope.clone(), Vec::new());
        }
        let counters = scopes.get_mut(scope)?;
        let idx = match counters.iter().position(|c| c.matches(meter, window)) {
            Some(i) => i,
            None => {
                counters.push(Counter::new(meter, window, now_ms));
                counters.len() - 1
            }
        };
        counters.get_mut(idx).map(|c| (idx, c))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn side_index<T: Hash + ?Sized>(key: &T) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % SIDE_SHARDS as u64) as usize
}

fn side_shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SIDE_SHARDS).map(|_| Mutex::new(T::default())).collect()
}

impl MemoryStore {
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
            horizon_ms: DEFAULT_HORIZON_MS,
        }
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
            self.sweep_side(i, now_ms);
        }
        (0..self.shards.len())
            .map(|i| Self::sweep(&mut self.shards[i].lock(), now_ms))
            .sum()
    }

    /// Number of counters held, live or idle-but-not-yet-reclaimed.
    pub fn counter_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().scopes.values().map(Vec::len).sum::<usize>())
            .sum()
    }

    fn sweep(shard: &mut Shard, now_ms: i64) -> usize {
        let mut removed = 0;
        shard.scopes.retain(|_, counters| {
            counters.retain_mut(|c| {
                c.advance(now_ms);
                let keep = c.used() > 0 || c.held() > 0;
                removed += usize::from(!keep);
                keep
            });
            !counters.is_empty()
        });
        shard.cooldowns.retain(|_, until| *until > now_ms);
        removed
    }

    fn sweep_side(&self, i: usize, now_ms: i64) {
        let horizon = self.horizon_ms;
        self.leases[i].lock().retain(|_, l| {
            let ended = l.settled || now_ms >= l.expires_ms;
            !(ended && now_ms.saturating_sub(l.expires_ms) >= horizon)
        });
        self.ledger[i]
            .lock()
            .retain(|_, e| now_ms.saturating_sub(e.at_ms) < horizon);
    }

    /// A consistent copy of everything the store holds.
    pub fn snapshot(&self) -> Snapshot {
        // Lock order as in `apply`: ledger, leases, counters.
        let ledger: Vec<_> = self.ledger.iter().map(|m| m.lock()).collect();
        let leases: Vec<_> = self.leases.iter().map(|m| m.lock()).collect();
        let shards: Vec<_> = self.shards.iter().map(|m| m.lock()).collect();
        let mut scopes: Vec<(ScopeKey, Vec<Counter>)> = shards
            .iter()
            .flat_map(|s| s.scopes.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect();
        scopes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut cooldowns: Vec<(ScopeKey, i64)> = shards
            .iter()
            .flat_map(|s| s.cooldowns.iter().map(|(k, v)| (k.clone(), *v)))
            .collect();
        cooldowns.sort();
        let mut lease_list: Vec<(LeaseId, Lease)> = leases
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (*k, v.clone())))
            .collect();
        lease_list.sort_by_key(|(id, _)| *id);
        let mut events: Vec<(String, Entry)> = ledger
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect();
        events.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            version: SNAPSHOT_VERSION,
            horizon_ms: self.horizon_ms,
            scopes,
            cooldowns,
            leases: lease_list,
            events,
        }
    }

    /// A store holding exactly what `snapshot` holds, with the default number
    /// of shards and the snapshot's event horizon.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`] when the snapshot breaks an invariant: an
    /// unknown version, a counter named twice, buckets that do not match
    /// their window or do not add up to their total, holds that are unsorted
    /// or belong to no live lease, a lease or event id listed twice.
    pub fn restore(snapshot: Snapshot) -> Result<Self, Error> {
        let bad = |reason: String| Error::InvalidSnapshot { reason };
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(bad(format!("unknown version {}", snapshot.version)));
        }
        if snapshot.horizon_ms <= 0 {
            return Err(bad("event horizon must be positive".into()));
        }
        let mut store = Self::new();
        store.horizon_ms = snapshot.horizon_ms;
        let mut leases: HashMap<LeaseId, Lease> = HashMap::new();
        for (id, lease) in snapshot.leases {
            if leases.insert(id, lease).is_some() {
                return Err(bad(format!("lease {id} listed twice")));
            }
        }
        for (scope, counters) in snapshot.scopes {
            for (i, c) in counters.iter().enumerate() {
                c.check()
                    .map_err(|r| bad(format!("{scope} {}: {r}", c.meter)))?;
                if counters[..i].iter().any(|o| o.matches(&c.meter, c.window)) {
                    return Err(bad(format!(
                        "{scope} {} {} listed twice",
                        c.meter, c.window
                    )));
                }
                for h in c.holds.iter().flat_map(|h| &h.entries) {
                    let owned = leases.get(&h.lease).is_some_and(|l| {
                        !l.settled
                            && l.expires_ms == h.expires_ms
                            && l.holds.iter().any(|r| {
                                r.scope == scope && r.meter == c.meter && r.window == c.window
                            })
                    });
                    if !owned {
                        return Err(bad(format!(
                            "{scope} {} holds for lease {} that does not hold it",
                            c.meter, h.lease
                        )));
                    }
                }
            }
            let shard = store.shard_of(&scope);
            let map = &mut store.shards[shard].get_mut().scopes;
            if map.insert(scope.clone(), counters).is_some() {
                return Err(bad(format!("scope {scope} listed twice")));
            }
        }
        for (scope, until) in snapshot.cooldowns {
            let shard = store.shard_of(&scope);
            store.shards[shard].get_mut().cooldowns.insert(scope, until);
        }
        for (id, lease) in leases {
            store.leases[side_index(&id)].get_mut().insert(id, lease);
        }
        for (id, entry) in snapshot.events {
            let map = store.ledger[side_index(id.as_str())].get_mut();
            if map.insert(id.clone().into_boxed_str(), entry).is_some() {
                return Err(bad(format!("event `{id}` listed twice")));
            }
        }
        Ok(store)
    }
}

/// What settling a lease does to one of its holds.
struct Charge {
    shard: usize,
    hold: HoldRef,
    held: u64,
    charged: u64,
}

impl AllowanceStore for MemoryStore {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now.timestamp_millis();
        let ops = batch.ops;
        validate(batch)?;

        // The ledger first (rule 8): a replay changes nothing.
        let mut ledger = None;
        if let Some(ev) = batch.event {
            let guard = self.ledger[side_index(ev.id)].lock();
            if let Some(e) = guard.get(ev.id) {
                if now_ms.saturating_sub(e.at_ms) < self.horizon_ms {
                    if Some(e.fingerprint) != super::event_fingerprint(batch) {
                        return Err(Error::EventConflict {
                            event: ev.id.to_owned(),
                        });
                    }
                    let mut replay = e.applied.clone();
                    replay.replayed_at = Some(ms_to_time(e.at_ms));
                    return Ok(replay);
                }
            }
            ledger = Some(guard);
        }

        // Then the lease (rule 7).
        let mut lease_guard = None;
        let mut lease_holds: Vec<HoldRef> = Vec::new();
        let mut lease_expires = 0;
        if let Some(l) = batch.lease {
            let guard = self.leases[side_index(&l.id)].lock();
            let id = || l.id.to_string();
            match (guard.get(&l.id), l.action) {
                (Some(_), LeaseAction::Open { .. }) => {
                    return Err(invalid(format!("lease {} is already open", l.id)));
                }
                (None, LeaseAction::Open { .. }) => {}
                (None, _) => return Err(Error::UnknownReservation { id: id() }),
                (Some(rec), _) if rec.owner != *l.owner => {
                    return Err(Error::UnknownReservation { id: id() });
                }
                (Some(rec), _) if rec.settled => {
                    return Err(Error::ReservationSettled { id: id() })
                }
                (Some(rec), _) if now_ms >= rec.expires_ms => {
                    return Err(Error::ReservationExpired { id: id() })
                }
                (Some(rec), _) => {
                    lease_holds.clone_from(&rec.holds);
                    lease_expires = rec.expires_ms;
                }
            }
            lease_guard = Some(guard);
        }

        // Lock every counter shard the batch touches, in ascending order.
        let mut op_shards: Inline<usize> = Inline::new();
        for op in ops {
            op_shards.push(self.shard_of(op.scope));
        }
        let cooldown_shards: Vec<usize> = batch
            .cooldowns
            .iter()
            .map(|c| self.shard_of(c.scope))
            .collect();
        let hold_shards: Vec<usize> = lease_holds
            .iter()
            .map(|h| self.shard_of(&h.scope))
            .collect();
        let mut all: Inline<usize> = Inline::new();
        for &i in op_shards
            .as_slice()
            .iter()
            .chain(&cooldown_shards)
            .chain(&hold_shards)
        {
            all.push(i);
        }
        all.as_mut_slice().sort_unstable();
        let mut order: Inline<usize> = Inline::new();
        for &i in all.as_slice() {
            if order.as_slice().last() != Some(&i) {
                order.push(i);
            }
        }
        let mut shards_in_order = order.as_slice().iter().map(|&i| self.shards[i].lock());
        let first = shards_in_order.next();
        let rest = shards_in_order.collect();
        let mut locked = Locked { order, first, rest };
        let op_shards = op_shards.as_slice();
        // Each op's counter position, found in phase 1 (or made in phase 2).
        let mut op_idx: Inline<usize> = Inline::new();

        let action = batch.lease.map(|l| l.action);
        let settle_keep = match action {
            Some(LeaseAction::Settle { keep }) => Some(keep),
            _ => None,
        };
        let lease_id = batch.lease.map(|l| l.id);

        // Phase 1: roll every named counter to now, and decide.
        let mut charges: Vec<Charge> = Vec::new();
        if let (Some(keep), Some(id)) = (settle_keep, lease_id) {
            for (h, &shard) in lease_holds.iter().zip(&hold_shards) {
                let held = match locked.counter(shard, &h.scope, &h.meter, h.window) {
                    Some(c) => {
                        c.advance(now_ms);
                        c.holds.as_ref().map_or(0, |x| x.amount(id, lease_expires))
                    }
                    None => 0,
                };
                let charged = if h.window == Window::Concurrent {
                    0
                } else {
                    keep_of(keep, held)
                };
                charges.push(Charge {
                    shard,
                    hold: h.clone(),
                    held,
                    charged,
                });
            }
            // Usage added by the charges must fit a u64 (rule 4).
            for ch in &charges {
                let used = locked
                    .counter(ch.shard, &ch.hold.scope, &ch.hold.meter, ch.hold.window)
                    .map_or(0, |c| c.used());
                let also = ops
                    .iter()
                    .find(|o| {
                        *o.scope == ch.hold.scope
                            && o.meter == &*ch.hold.meter
                            && o.window == ch.hold.window
                    })
                    .map_or(0, |o| o.delta);
                if used
                    .checked_add(ch.charged)
                    .and_then(|u| u.checked_add(also))
                    .is_none()
                {
                    return Err(Error::Overflow {
                        meter: ch.hold.meter.to_string(),
                    });
                }
            }
        }
        let holding = matches!(action, Some(LeaseAction::Open { .. } | LeaseAction::Grow));
        let mut all_fit = true;
        for (op, &shard) in ops.iter().zip(op_shards) {
            let idx = locked.position(shard, op.scope, op.meter, op.window);
            op_idx.push(idx);
            let (used, held) = match locked.at(shard, op.scope, idx) {
                Some(c) => {
                    c.advance(now_ms);
                    (c.used(), c.held())
                }
                None => (0, 0),
            };
            // Past u64: an error where the delta would be added regardless
            // (Force, or no maximum); elsewhere it simply does not fit.
            let target = if holding { held } else { used };
            if target.checked_add(op.delta).is_none()
                && (batch.mode == Mode::Force || op.max.is_none())
            {
                return Err(Error::Overflow {
                    meter: op.meter.to_owned(),
                });
            }
            all_fit &= fits(used, held, op.delta, op.max);
        }
        let mut cooling = Vec::with_capacity(batch.cooldowns.len());
        for (c, &shard) in batch.cooldowns.iter().zip(&cooldown_shards) {
            let until = locked
                .shard(shard)
                .cooldowns
                .get(c.scope)
                .copied()
                .filter(|&u| u > now_ms);
            all_fit &= until.is_none();
            cooling.push(until);
        }
        let applied = match batch.mode {
            Mode::Check => false,
            Mode::WithinLimits => all_fit,
            Mode::Force => true,
        };

        // Phase 2: apply the whole batch, or nothing.
        let mut settled = Vec::new();
        if applied {
            match (batch.lease, action) {
                (
                    Some(l),
                    Some(LeaseAction::Open {
                        expires_at,
                        deadline,
                    }),
                ) => {
                    let expires_ms = expires_at.timestamp_millis();
                    let mut holds = Vec::new();
                    for ((op, &shard), idx) in ops.iter().zip(op_shards).zip(op_idx.as_mut_slice())
                    {
                        if op.delta == 0 {
                            continue;
                        }
                        if let Some((i, c)) =
                            locked.counter_or_new(shard, op.scope, op.meter, op.window, now_ms)
                        {
                            *idx = i;
                            c.holds_mut().add(l.id, expires_ms, op.delta);
                            holds.push(HoldRef {
                                scope: op.scope.clone(),
                                meter: c.meter.clone(),
                                window: op.window,
                            });
                        }
                    }
                    if let Some(g) = &mut lease_guard {
                        g.insert(
                            l.id,
                            Lease {
                                owner: l.owner.clone(),
                                opened_ms: now_ms,
                                expires_ms,
                                deadline_ms: deadline.map(|d| d.timestamp_millis()),
                                settled: false,
                                holds,
                            },
                        );
                    }
                }
                (Some(l), Some(LeaseAction::Renew { expires_at })) => {
                    let new_ms = expires_at.timestamp_millis();
                    for (h, &shard) in lease_holds.iter().zip(&hold_shards) {
                        if let Some(c) = locked.counter(shard, &h.scope, &h.meter, h.window) {
                            let amount = c.remove_hold(l.id, lease_expires);
                            if amount > 0 {
                                c.holds_mut().add(l.id, new_ms, amount);
                            }
                        }
                    }
                    if let Some(rec) = lease_guard.as_mut().and_then(|g| g.get_mut(&l.id)) {
                        rec.expires_ms = new_ms;
                    }
                }
                (Some(l), Some(LeaseAction::Grow)) => {
                    let mut added = Vec::new();
                    for ((op, &shard), idx) in ops.iter().zip(op_shards).zip(op_idx.as_mut_slice())
                    {
                        if op.delta == 0 {
                            continue;
                        }
                        if let Some((i, c)) =
                            locked.counter_or_new(shard, op.scope, op.meter, op.window, now_ms)
                        {
                            *idx = i;
                            c.holds_mut().add(l.id, lease_expires, op.delta);
                            if !lease_holds.iter().any(|h| {
                                h.scope == *op.scope
                                    && &*h.meter == op.meter
                                    && h.window == op.window
                            }) {
                                added.push(HoldRef {
                                    scope: op.scope.clone(),
                                    meter: c.meter.clone(),
                                    window: op.window,
                                });
                            }
                        }
                    }
                    if let Some(rec) = lease_guard.as_mut().and_then(|g| g.get_mut(&l.id)) {
                        rec.holds.extend(added);
                    }
                }
                (Some(l), Some(LeaseAction::Settle { .. })) => {
                    for ch in charges {
                        if let Some(c) =
                            locked.counter(ch.shard, &ch.hold.scope, &ch.hold.meter, ch.hold.window)
                        {
                            c.remove_hold(l.id, lease_expires);
                            c.add(ch.charged);
                        }
                        settled.push(SettledHold::new(
                            ch.hold.scope,
                            ch.hold.meter,
                            ch.hold.window,
                            ch.held,
                            ch.charged,
                        ));
                    }
                    add_usage(&mut locked, ops, op_shards, op_idx.as_mut_slice(), now_ms);
                    if let Some(rec) = lease_guard.as_mut().and_then(|g| g.get_mut(&l.id)) {
                        rec.settled = true;
                        rec.holds.clear();
                    }
                }
                _ => add_usage(&mut locked, ops, op_shards, op_idx.as_mut_slice(), now_ms),
            }
            for ((c, &shard), until) in batch
                .cooldowns
                .iter()
                .zip(&cooldown_shards)
                .zip(&mut cooling)
            {
                if let Some(t) = c.start_until {
                    let t = t.timestamp_millis();
                    let e = locked
                        .shard(shard)
                        .cooldowns
                        .entry(c.scope.clone())
                        .or_insert(t);
                    *e = (*e).max(t);
                    if *e > now_ms {
                        *until = Some(*e);
                    }
                }
            }
        }

        // Phase 3: report.
        let counters = ops
            .iter()
            .zip(op_shards)
            .zip(op_idx.as_slice())
            .map(|((op, &shard), &idx)| {
                let counter = locked.at(shard, op.scope, idx);
                // When applied, the delta is already in `used` or `held`; ask
                // about a zero delta so `available_at` is not set for a
                // fitting op.
                let delta = if applied { 0 } else { op.delta };
                state_of(counter.map(|c| &*c), op.window, now_ms, delta, op.max)
            })
            .collect();
        // Count the batch on the first shard it holds (no counter shared by
        // every thread); every SWEEP_EVERY, sweep a shard in turn once the
        // locks are released.
        let sweep_turn = locked.order.as_slice().first().copied().and_then(|first| {
            let shard = locked.shard(first);
            shard.batches += 1;
            (shard.batches % SWEEP_EVERY == 0).then_some((first, shard.batches / SWEEP_EVERY))
        });
        drop(locked);
        drop(lease_guard);
        let result = Applied {
            applied,
            counters,
            settled,
            cooldowns: cooling.into_iter().map(|u| u.map(ms_to_time)).collect(),
            replayed_at: None,
        };
        if let (Some(mut guard), Some(ev)) = (ledger, batch.event) {
            if applied {
                guard.insert(
                    Box::from(ev.id),
                    Entry {
                        fingerprint: super::event_fingerprint(batch).unwrap_or(ev.fingerprint),
                        at_ms: now_ms,
                        applied: result.clone(),
                    },
                );
            }
        }

        if let Some((first, k)) = sweep_turn {
            let i = ((first as u64 + k) % self.shards.len() as u64) as usize;
            Self::sweep(&mut self.shards[i].lock(), now_ms);
            self.sweep_side(((first as u64 + k) % SIDE_SHARDS as u64) as usize, now_ms);
        }
        Ok(result)
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
}

fn keep_of(keep: Fraction, held: u64) -> u64 {
    keep.ceil_of(held)
}

/// Add every op's delta to its counter's usage (checked not to overflow).
fn add_usage(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    shards: &[usize],
    op_idx: &mut [usize],
    now_ms: i64,
) {
    for ((op, &shard), idx) in ops.iter().zip(shards).zip(op_idx) {
        if op.delta == 0 {
            continue;
        }
        // Phase 1 found most counters; only a new one is searched for again.
        if let Some(c) = locked.at(shard, op.scope, *idx) {
            c.add(op.delta);
        } else if let Some((i, c)) =
            locked.counter_or_new(shard, op.scope, op.meter, op.window, now_ms)
        {
            *idx = i;
            c.add(op.delta);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CounterOp;
    use crate::window::Period;
    use chrono::TimeZone;

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap()
    }

    #[test]
    fn rolling_usage_leaves_at_most_one_bucket_late_never_early() {
        let store = MemoryStore::new();
        let scope = ScopeKey::subject("a");
        // 24 h in 4 buckets of 6 h.
        let window = Window::Rolling {
            span_secs: 86_400,
            buckets: 4,
        };
        let op = |delta| CounterOp {
            scope: &scope,
            meter: "t",
            window,
            delta,
            max: Some(100),
        };
        let run = |delta, mode, now| store.apply(&Batch::new(&[op(delta)], mode, now)).unwrap();
        // Recorded at 01:00, in the bucket [00:00, 06:00).
        run(40, Mode::Force, at(1));
        // Still counted a full span later minus a moment: never early.
        let day_later = at(1) + chrono::Duration::hours(24) - chrono::Duration::seconds(1);
        assert_eq!(run(0, Mode::Check, day_later).counters[0].used, 40);
        // Leaves at the bucket boundary after 01:00 + 24 h: 2026-01-02 06:00.
        let s = run(0, Mode::Check, at(1) + chrono::Duration::hours(24));
        assert_eq!(s.counters[0].used, 40);
        assert_eq!(
            s.counters[0].resets_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 2, 6, 0, 0).unwrap())
        );
        let s = run(
            0,
            Mode::Check,
            Utc.with_ymd_and_hms(2026, 1, 2, 6, 0, 0).unwrap(),
        );
        assert_eq!(s.counters[0].used, 0);
    }

    #[test]
    fn a_batch_that_does_not_fit_changes_nothing() {
        let store = MemoryStore::new();
        let a = ScopeKey::subject("a");
        let p = ScopeKey::pool("p");
        let w = Window::calendar(Period::Day);
        let ops = [
            CounterOp {
                scope: &a,
                meter: "t",
                window: w,
                delta: 5,
                max: Some(10),
            },
            CounterOp {
                scope: &p,
                meter: "t",
                window: w,
                delta: 5,
                max: Some(4),
            },
        ];
        let r = store
            .apply(&Batch::new(&ops, Mode::WithinLimits, at(0)))
            .unwrap();
        assert!(!r.applied);
        assert_eq!(r.counters[0].used, 0);
        assert_eq!(r.counters[1].used, 0);
        assert_eq!(
            r.counters[1].available_at, None,
            "5 > max 4: waiting never helps"
        );
        assert_eq!(store.counter_count(), 0);
    }

    #[test]
    fn overflow_is_an_error_and_changes_nothing() {
        let store = MemoryStore::new();
        let a = ScopeKey::subject("a");
        let w = Window::Lifetime;
        let op = |delta| CounterOp {
            scope: &a,
            meter: "t",
            window: w,
            delta,
            max: None,
        };
        store
            .apply(&Batch::new(&[op(u64::MAX - 1)], Mode::Force, at(0)))
            .unwrap();
        let err = store
            .apply(&Batch::new(&[op(2)], Mode::Force, at(0)))
            .unwrap_err();
        assert!(matches!(err, Error::Overflow { .. }));
        let r = store
            .apply(&Batch::new(&[op(0)], Mode::Check, at(0)))
            .unwrap();
        assert_eq!(r.counters[0].used, u64::MAX - 1);
    }

    #[test]
    fn malformed_batches_are_refused_and_change_nothing() {
        let store = MemoryStore::new();
        let a = ScopeKey::subject("a");
        let w = Window::calendar(Period::Day);
        let op = CounterOp {
            scope: &a,
            meter: "t",
            window: w,
            delta: 60,
            max: Some(100),
        };
        // The same counter twice would be checked against the same usage and
        // added twice: 120 past a maximum of 100.
        let twice = [op, op];
        let err = store
            .apply(&Batch::new(&twice, Mode::WithinLimits, at(0)))
            .unwrap_err();
        assert!(matches!(&err, Error::InvalidBatch { reason } if reason.contains("twice")));
        // Buckets narrower than a second, and an empty span.
        for window in [
            Window::Rolling {
                span_secs: 5,
                buckets: 10,
            },
            Window::Rolling {
                span_secs: 0,
                buckets: 1,
            },
        ] {
            let bad = CounterOp { window, ..op };
            let err = store
                .apply(&Batch::new(&[op, bad], Mode::Force, at(0)))
                .unwrap_err();
            assert!(matches!(err, Error::InvalidBatch { .. }), "{window}");
        }
        assert_eq!(store.counter_count(), 0);
    }

    #[test]
    fn a_clock_stepping_back_keeps_usage_in_its_own_period() {
        let store = MemoryStore::new();
        let a = ScopeKey::subject("a");
        let op = |delta| CounterOp {
            scope: &a,
            meter: "t",
            window: Window::calendar(Period::Month),
            delta,
            max: Some(100),
        };
        let feb = Utc.with_ymd_and_hms(2026, 2, 10, 0, 0, 0).unwrap();
        store
            .apply(&Batch::new(&[op(10)], Mode::Force, feb))
            .unwrap();
        let jan = Utc.with_ymd_and_hms(2026, 1, 20, 0, 0, 0).unwrap();
        let s = store
            .apply(&Batch::new(&[op(0)], Mode::Check, jan))
            .unwrap()
            .counters[0];
        assert_eq!(s.used, 10);
        assert_eq!(
            s.period_start,
            Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(
            s.resets_at,
            Some(Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap())
        );
    }

    #[test]
    fn idle_counters_are_swept_without_being_asked() {
        // Two shards: every shard is swept within 2 × 1,024 batches.
        let store = MemoryStore::with_shards(2);
        fn op(scope: &ScopeKey) -> CounterOp<'_> {
            CounterOp {
                scope,
                meter: "t",
                window: Window::calendar(Period::Day),
                delta: 1,
                max: None,
            }
        }
        for i in 0..100 {
            let s = ScopeKey::subject(format!("old{i}"));
            store
                .apply(&Batch::new(&[op(&s)], Mode::Force, at(0)))
                .unwrap();
        }
        // The next day, one busy subject keeps working; yesterday's 100 are idle.
        let busy = ScopeKey::subject("busy");
        let tomorrow = at(0) + chrono::Duration::days(1);
        for _ in 0..2 * SWEEP_EVERY {
            store
                .apply(&Batch::new(&[op(&busy)], Mode::Force, tomorrow))
                .unwrap();
        }
        assert_eq!(
            store.counter_count(),
            1,
            "only the busy subject's counter is left"
        );
    }

    #[test]
    fn reclaim_drops_counters_of_ended_periods() {
        let store = MemoryStore::new();
        let w = Window::calendar(Period::Day);
        for i in 0..100 {
            let s = ScopeKey::subject(format!("s{i}"));
            store
                .apply(&Batch::new(
                    &[CounterOp {
                        scope: &s,
                        meter: "t",
                        window: w,
                        delta: 1,
                        max: None,
                    }],
                    Mode::Force,
                    at(0),
                ))
                .unwrap();
        }
        assert_eq!(store.counter_count(), 100);
        assert_eq!(store.reclaim(at(23)), 0, "today's usage stays");
        assert_eq!(store.reclaim(at(0) + chrono::Duration::days(1)), 100);
        assert_eq!(store.counter_count(), 0);
    }
}
