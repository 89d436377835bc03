//! The embedded default store.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, NaiveTime, Utc};
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
/// Every this many batches counted on a shard (at least; see
/// [`SWEEP_BATCHES_PER_SCOPE`]), one shard is swept of idle counters, in turn.
const SWEEP_EVERY: u64 = 1_024;
/// A shard counts this many batches per scope it holds before it triggers a
/// sweep, so a sweep (which visits every scope of a shard) costs each batch
/// a quarter of a scope visit on average, whatever the number of subjects.
const SWEEP_BATCHES_PER_SCOPE: u64 = 4;
/// How long an event id is remembered by default: 24 hours.
const DEFAULT_HORIZON_MS: i64 = 86_400_000;
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
/// lock), so no counter keeps a name or a window of its own. A rolling
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

/// Event id to the batch it applied, and the oldest entry's time, so a
/// sweep walks the map only when a good share of it can go.
#[derive(Debug)]
struct Ledger {
    map: HashMap<Box<str>, Entry>,
    /// `at_ms` of the oldest entry (`i64::MAX` when empty).
    oldest_ms: i64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            oldest_ms: i64::MAX,
        }
    }
}

impl Ledger {
    fn get(&self, id: &str) -> Option<&Entry> {
        self.map.get(id)
    }

    fn insert(&mut self, id: Box<str>, entry: Entry) -> Option<Entry> {
        self.oldest_ms = self.oldest_ms.min(entry.at_ms);
        self.map.insert(id, entry)
    }

    /// Forget the entries older than `horizon_ms`. Unless `exact`, walk the
    /// map only once the oldest is an eighth of a horizon past it: each walk
    /// then drops at least that eighth's entries, so walks cost a bounded
    /// number of visits per entry ever inserted, however large the ledger.
    /// Entries kept past the horizon meanwhile are never replayed (`apply`
    /// checks the age), only held in memory a little longer.
    fn sweep(&mut self, now_ms: i64, horizon_ms: i64, exact: bool) {
        let slack = if exact { 0 } else { horizon_ms / 8 };
        if now_ms.saturating_sub(self.oldest_ms) < horizon_ms.saturating_add(slack) {
            return;
        }
        let mut oldest = i64::MAX;
        self.map.retain(|_, e| {
            let keep = now_ms.saturating_sub(e.at_ms) < horizon_ms;
            if keep {
                oldest = oldest.min(e.at_ms);
            }
            keep
        });
        self.oldest_ms = oldest;
    }
}

/// `a == b`, for the short names meters have: compared a word at a time
/// inline (two overlapping loads cover 4 to 16 bytes) rather than through a
/// `memcmp` call, which cost a batch's hot path some 25 instructions an op.
#[inline]
fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], i: usize| {
        s.get(i..i + 8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
    };
    let w4 = |s: &[u8], i: usize| {
        s.get(i..i + 4)
            .map(|w| u32::from_ne_bytes(w.try_into().unwrap_or_default()))
    };
    match n {
        0 => true,
        // Bytes 0, n / 2 and n - 1 cover 1 to 3 bytes.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// A counter's `(meter, window)`: its index in its shard's [`Keys`].
type KeyId = u16;

/// The holds of a shard's counters that have some, per scope and key.
type HoldMap = ScopeMap<Vec<(KeyId, Holds)>>;

/// What `(scope, key)` holds.
fn held_in(holds: &HoldMap, scope: &ScopeKey, key: KeyId) -> u64 {
    if holds.is_empty() {
        return 0;
    }
    holds
        .get(scope)
        .and_then(|l| l.iter().find(|(k, _)| *k == key))
        .map_or(0, |(_, h)| h.total)
}

/// Apply `f` to the holds of `(scope, key)`, then forget them if empty.
fn with_holds<R>(
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

/// Drop the holds of `(scope, key)` that expired by `now_ms`; returns what
/// is still held.
#[inline]
fn expire_holds(holds: &mut HoldMap, scope: &ScopeKey, key: KeyId, now_ms: i64) -> u64 {
    // Only reservations make holds: most shards have none, and pay for
    // this test alone, inlined, rather than a call.
    if holds.is_empty() {
        return 0;
    }
    expire_some_holds(holds, scope, key, now_ms)
}

#[inline(never)]
fn expire_some_holds(holds: &mut HoldMap, scope: &ScopeKey, key: KeyId, now_ms: i64) -> u64 {
    with_holds(holds, scope, key, |h| {
        h.expire(now_ms);
        h.total
    })
    .unwrap_or(0)
}

/// The end of the run of ops from `i` on that name the same scope (so one
/// map lookup serves them all).
fn run_end(ops: &[CounterOp<'_>], shards: &[usize], i: usize) -> usize {
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

/// Past this many keys a sweep of the shard drops the keys no counter uses.
const KEYS_COMPACT_AT: usize = 64;
/// From this many keys a batch drops the unused ones before it starts, so
/// only a shard whose counters use this many keys can run out of ids.
const KEYS_HIGH_WATER: usize = 1 << 15;

#[derive(Debug, Default)]
struct Shard {
    /// The `(meter, window)` pairs this shard's counters are kept for.
    keys: Keys,
    /// Each scope's counters, in one exactly sized allocation.
    scopes: ScopeMap<Box<[Counter]>>,
    /// The live holds of the counters that have some, per scope and key.
    holds: HoldMap,
    /// Cooldown end (Unix ms) per scope that has one.
    cooldowns: ScopeMap<i64>,
    /// Instants reported lately, as `DateTime`s.
    shown: Shown,
    /// The date the shard's last conversion started from, kept across
    /// batches so a report seldom converts from scratch.
    times: Times,
    /// Batches that locked this shard first since it last triggered a
    /// sweep; at `SWEEP_EVERY` or 4 per scope it holds, whichever is more,
    /// one shard (round robin) is swept.
    batches: u64,
    /// Sweeps this shard has triggered: picks the next shard in turn.
    sweeps: u64,
}

/// The `(meter, window)` pairs of one shard, each stored once, so a counter
/// names its own by a two-byte [`KeyId`]. Catalogs have a handful of meters:
/// the list is scanned (under the shard's lock), never hashed.
#[derive(Debug, Default)]
struct Keys(Vec<(Arc<str>, Window)>);

impl Keys {
    /// The key of `(meter, window)`, trying index `hint` first: a batch's
    /// ops come in the order their keys were first made.
    #[inline]
    fn find(&self, meter: &str, window: Window, hint: usize) -> Option<KeyId> {
        // The hint inline (it is right for every op of a usual batch), the
        // scan out of line.
        match self.0.get(hint) {
            Some((m, w)) if *w == window && same_name(m, meter) => KeyId::try_from(hint).ok(),
            _ => self.scan(meter, window),
        }
    }

    #[inline(never)]
    fn scan(&self, meter: &str, window: Window) -> Option<KeyId> {
        let i = self
            .0
            .iter()
            .position(|(m, w)| *w == window && **m == *meter)?;
        KeyId::try_from(i).ok()
    }

    /// The key of `(meter, window)`, added if new; `None` when the shard
    /// already has `KeyId::MAX + 1` keys.
    #[inline]
    fn intern(&mut self, meter: &str, window: Window, hint: usize) -> Option<KeyId> {
        match self.find(meter, window, hint) {
            Some(k) => Some(k),
            None => self.add(meter, window),
        }
    }

    /// Add `(meter, window)`, known to be new; out of line, as it is rare.
    #[inline(never)]
    fn add(&mut self, meter: &str, window: Window) -> Option<KeyId> {
        let k = KeyId::try_from(self.0.len()).ok()?;
        self.0.push((Arc::from(meter), window));
        Some(k)
    }

    fn get(&self, key: KeyId) -> Option<&(Arc<str>, Window)> {
        self.0.get(usize::from(key))
    }
}

/// A counter in memory: 24 bytes, with its key and the one-byte variant tag
/// sharing the first word. The window lives in the shard's [`Keys`]; a
/// rolling counter's buckets in one allocation (see [`Ring`]); holds in
/// [`Shard::holds`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Counter {
    /// Usage in the period `[start, start + len_ms)`; rolled when `now` is
    /// past it. The longest period (a 31-day month) is 2.7e9 ms: a `u32`.
    Calendar {
        key: KeyId,
        len_ms: u32,
        start: i64,
        used: u64,
    },
    /// `buf` is `[head, total, slot 0, …, slot n-1]`; the oldest bucket
    /// holding usage is `head - back` (see [`Ring`]).
    Rolling {
        key: KeyId,
        back: u32,
        buf: Box<[u64]>,
    },
    Lifetime {
        key: KeyId,
        used: u64,
    },
    /// Holds only.
    Concurrent {
        key: KeyId,
    },
}

/// Words of a rolling counter's buffer before its slots.
const RING_HEADER: usize = 2;

/// A rolling window over a counter's buffer: `n` buckets of `width_ms`, the
/// newest at bucket index `head` (word 0), their running `total` (word 1),
/// and the oldest bucket still holding usage (when `total > 0`) at `tail =
/// head - back` (`back < n`, so it fits the counter's spare four bytes);
/// bucket `b` is slot `b mod n`. The tail is kept as buckets leave, so no
/// read walks every bucket.
struct Ring<B> {
    width_ms: i64,
    back: u32,
    buf: B,
}

impl<B: AsRef<[u64]>> Ring<B> {
    fn words(&self) -> &[u64] {
        self.buf.as_ref()
    }

    fn head(&self) -> i64 {
        self.words()[0] as i64
    }

    fn tail(&self) -> i64 {
        self.head() - i64::from(self.back)
    }

    fn total(&self) -> u64 {
        self.words()[1]
    }

    fn n(&self) -> i64 {
        (self.words().len() - RING_HEADER) as i64
    }

    /// The buffer index of bucket `bucket`.
    fn slot(&self, bucket: i64) -> usize {
        RING_HEADER + bucket.rem_euclid(self.n()) as usize
    }

    /// Time a bucket's usage leaves: the start of bucket `b + n`.
    fn leaves_at(&self, bucket: i64) -> i64 {
        (bucket + self.n()).saturating_mul(self.width_ms)
    }

    fn oldest_bucket(&self) -> i64 {
        self.head() - self.n() + 1
    }

    fn resets_at(&self) -> Option<i64> {
        (self.total() > 0).then(|| self.leaves_at(self.tail()))
    }

    /// Earliest time `total - left + delta <= max`, if `delta <= max`.
    fn available_at(&self, delta: u64, max: u64) -> Option<i64> {
        if delta > max {
            return None;
        }
        let need = (u128::from(self.total()) + u128::from(delta)).saturating_sub(u128::from(max));
        let mut freed = 0u128;
        for b in self.tail()..=self.head() {
            freed += u128::from(self.words()[self.slot(b)]);
            if freed >= need {
                return Some(self.leaves_at(b));
            }
        }
        None
    }
}

impl<B: AsRef<[u64]> + AsMut<[u64]>> Ring<B> {
    fn set(&mut self, i: usize, v: u64) {
        self.buf.as_mut()[i] = v;
    }

    /// Drop the buckets that have left by `now_ms`.
    fn advance(&mut self, now_ms: i64) {
        let cur = now_ms.div_euclid(self.width_ms);
        let head = self.head();
        if cur <= head {
            // Same bucket, or a clock that stepped back: keep writing to head.
            return;
        }
        let mut tail = self.tail();
        let steps = (cur - head).min(self.n());
        let mut total = self.total();
        for k in 1..=steps {
            let i = self.slot(head + k);
            total -= self.words()[i];
            self.set(i, 0);
        }
        self.set(0, cur as u64);
        self.set(1, total);
        if total == 0 {
            tail = cur;
        } else if tail < self.oldest_bucket() {
            // Some bucket in [oldest, head] holds usage; walk to it. Each
            // bucket index is walked past at most once in a counter's life.
            tail = self.oldest_bucket();
            while self.words()[self.slot(tail)] == 0 {
                tail += 1;
            }
        }
        // The tail is in [oldest, head]: `cur - tail < n <= 10_001`.
        self.back = u32::try_from(cur - tail).unwrap_or(0);
    }

    /// Add `delta` to the head bucket (already checked not to overflow).
    fn add(&mut self, delta: u64) {
        if self.total() == 0 {
            self.back = 0;
        }
        let i = self.slot(self.head());
        self.set(i, self.words()[i] + delta);
        self.set(1, self.total() + delta);
    }
}

/// The bucket width of a window (0 for any but a rolling one).
fn width_of(window: Window) -> i64 {
    match window {
        Window::Rolling { span_secs, buckets } => Window::bucket_ms(span_secs, buckets),
        _ => 0,
    }
}

/// A counter in a snapshot: its meter and window spelled out, its buckets
/// and holds inline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapCounter {
    meter: Arc<str>,
    window: Window,
    data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holds: Option<Box<Holds>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Data {
    /// Usage in the period `[start, end)`.
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

/// A rolling window in a snapshot: `slots.len() == buckets + 1` buckets of
/// `width_ms`, the newest at bucket index `head`, the oldest holding usage at
/// `tail`, and their running `total` (see [`Ring`]).
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
    scopes: Vec<(ScopeKey, Vec<SnapCounter>)>,
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
        // Every bucket the counter can name, and when it leaves, is a time.
        let n = self.slots.len() as i64;
        let (Some(oldest), Some(_)) = (
            self.head.checked_sub(n - 1),
            self.head
                .checked_add(n)
                .and_then(|b| b.checked_mul(self.width_ms)),
        ) else {
            return Err("rolling head is out of range".into());
        };
        if self.total > 0 && !(oldest <= self.tail && self.tail <= self.head) {
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

    /// Snapshot invariants.
    fn check(&self) -> Result<(), String> {
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

/// The length of a calendar period as a counter keeps it. Every period is at
/// most 31 days (2.7e9 ms < `u32::MAX`).
fn period_len(start: i64, end: i64) -> u32 {
    u32::try_from(end.saturating_sub(start)).unwrap_or(u32::MAX)
}

impl Counter {
    fn new(key: KeyId, window: Window, now_ms: i64) -> Self {
        match window {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                let (start, end) = Window::calendar_bounds(period, utc_offset_secs, now_ms);
                Counter::Calendar {
                    key,
                    len_ms: period_len(start, end),
                    start,
                    used: 0,
                }
            }
            Window::Rolling { buckets, .. } => {
                let head = now_ms.div_euclid(width_of(window)) as u64;
                let mut buf = vec![0; RING_HEADER + buckets as usize + 1];
                buf[0] = head;
                Counter::Rolling {
                    key,
                    back: 0,
                    buf: buf.into_boxed_slice(),
                }
            }
            Window::Lifetime => Counter::Lifetime { key, used: 0 },
            Window::Concurrent => Counter::Concurrent { key },
        }
    }

    fn key(&self) -> KeyId {
        match *self {
            Counter::Calendar { key, .. }
            | Counter::Rolling { key, .. }
            | Counter::Lifetime { key, .. }
            | Counter::Concurrent { key } => key,
        }
    }

    fn set_key(&mut self, to: KeyId) {
        match self {
            Counter::Calendar { key, .. }
            | Counter::Rolling { key, .. }
            | Counter::Lifetime { key, .. }
            | Counter::Concurrent { key } => *key = to,
        }
    }

    /// Roll the counter (of `window`) forward to `now_ms`.
    #[inline]
    fn advance(&mut self, window: Window, now_ms: i64) {
        // Inlined for the usual answer, nothing to do: a calendar counter
        // within its period, a rolling one within its head bucket, a
        // lifetime or concurrent counter.
        match *self {
            Counter::Calendar {
                len_ms,
                start,
                used,
                ..
            } if now_ms < start.saturating_add(i64::from(len_ms))
                && (now_ms >= start || used > 0) => {}
            // A rolling counter whose head bucket is still current (or
            // later, after a clock step back): `Ring::advance` would return
            // at once.
            Counter::Rolling { ref buf, .. }
                if now_ms.div_euclid(width_of(window)) <= buf[0] as i64 => {}
            Counter::Lifetime { .. } | Counter::Concurrent { .. } => {}
            _ => self.roll(window, now_ms),
        }
    }

    #[inline(never)]
    fn roll(&mut self, window: Window, now_ms: i64) {
        match (self, window) {
            (
                Counter::Calendar {
                    len_ms,
                    start,
                    used,
                    ..
                },
                Window::Calendar {
                    period,
                    utc_offset_secs,
                },
            ) if now_ms >= start.saturating_add(i64::from(*len_ms))
                || (now_ms < *start && *used == 0) =>
            {
                // A clock that steps back into an earlier period keeps a
                // counter holding usage in its own period (usage never moves
                // to an earlier one); an empty counter follows the clock.
                let (s, e) = Window::calendar_bounds(period, utc_offset_secs, now_ms);
                *start = s;
                *len_ms = period_len(s, e);
                *used = 0;
            }
            (Counter::Rolling { back, buf, .. }, _) => {
                let mut ring = Ring {
                    width_ms: width_of(window),
                    back: *back,
                    buf: &mut **buf,
                };
                ring.advance(now_ms);
                *back = ring.back;
            }
            _ => {}
        }
    }

    fn used(&self) -> u64 {
        match self {
            Counter::Calendar { used, .. } | Counter::Lifetime { used, .. } => *used,
            Counter::Rolling { buf, .. } => buf[1],
            Counter::Concurrent { .. } => 0,
        }
    }

    /// Add `delta` to usage (already checked not to overflow). A concurrent
    /// counter has no usage (the batch was validated not to add any).
    fn add(&mut self, window: Window, delta: u64) {
        match self {
            Counter::Calendar { used, .. } | Counter::Lifetime { used, .. } => *used += delta,
            Counter::Rolling { back, buf, .. } => {
                let mut ring = Ring {
                    width_ms: width_of(window),
                    back: *back,
                    buf: &mut **buf,
                };
                ring.add(delta);
                *back = ring.back;
            }
            Counter::Concurrent { .. } => {}
        }
    }

    /// The counter as a snapshot spells it.
    fn to_snap(&self, meter: Arc<str>, window: Window, holds: Option<&Holds>) -> SnapCounter {
        let data = match self {
            Counter::Calendar {
                len_ms,
                start,
                used,
                ..
            } => Data::Calendar {
                start: *start,
                end: start.saturating_add(i64::from(*len_ms)),
                used: *used,
            },
            Counter::Rolling { back, buf, .. } => Data::Rolling(Rolling {
                width_ms: width_of(window),
                head: buf[0] as i64,
                tail: buf[0] as i64 - i64::from(*back),
                total: buf[1],
                slots: buf[RING_HEADER..].into(),
            }),
            Counter::Lifetime { used, .. } => Data::Lifetime { used: *used },
            Counter::Concurrent { .. } => Data::Concurrent,
        };
        SnapCounter {
            meter,
            window,
            data,
            holds: holds.map(|h| Box::new(h.clone())),
        }
    }
}

impl SnapCounter {
    /// The counter in memory, once its data is checked against its window.
    fn to_counter(&self, key: KeyId) -> Result<Counter, String> {
        let c = match (&self.data, self.window) {
            (&Data::Calendar { start, end, used }, Window::Calendar { .. }) if start < end => {
                let len_ms = end
                    .checked_sub(start)
                    .and_then(|len| u32::try_from(len).ok())
                    .ok_or("calendar period is longer than 49 days")?;
                Counter::Calendar {
                    key,
                    len_ms,
                    start,
                    used,
                }
            }
            (Data::Rolling(r), Window::Rolling { span_secs, buckets }) => {
                r.check(span_secs, buckets)?;
                // Checked: with usage, the tail is within the window; without,
                // the tail is the head.
                let back = if r.total == 0 {
                    0
                } else {
                    r.head
                        .checked_sub(r.tail)
                        .and_then(|back| u32::try_from(back).ok())
                        .ok_or("rolling tail is outside the window")?
                };
                let mut buf = Vec::with_capacity(RING_HEADER + r.slots.len());
                buf.extend([r.head as u64, r.total]);
                buf.extend_from_slice(&r.slots);
                Counter::Rolling {
                    key,
                    back,
                    buf: buf.into_boxed_slice(),
                }
            }
            (&Data::Lifetime { used }, Window::Lifetime) => Counter::Lifetime { key, used },
            (Data::Concurrent, Window::Concurrent) => Counter::Concurrent { key },
            _ => {
                return Err(format!(
                    "counter data does not match window {}",
                    self.window
                ))
            }
        };
        if let Some(h) = &self.holds {
            h.check()?;
        }
        Ok(c)
    }
}

impl Shard {
    /// The position of the counter `key` in `scope`'s counters.
    fn position(&self, scope: &ScopeKey, key: KeyId) -> Option<usize> {
        self.scopes.get(scope)?.iter().position(|c| c.key() == key)
    }

    /// The key and position of the counter `(meter, window)` of `scope`.
    fn find(&self, scope: &ScopeKey, meter: &str, window: Window) -> Option<(KeyId, usize)> {
        let key = self.keys.find(meter, window, 0)?;
        Some((key, self.position(scope, key)?))
    }

    fn counter_mut(&mut self, scope: &ScopeKey, idx: usize) -> Option<&mut Counter> {
        self.scopes.get_mut(scope)?.get_mut(idx)
    }

    /// The counter `key` (of `window`) of `scope`, created if absent, and its
    /// position.
    fn counter_or_new(
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

    fn holds(&self, scope: &ScopeKey, key: KeyId) -> Option<&Holds> {
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
    fn add_hold(&mut self, scope: &ScopeKey, key: KeyId, lease: LeaseId, expires: i64, n: u64) {
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

    fn remove_hold(&mut self, scope: &ScopeKey, key: KeyId, lease: LeaseId, expires: i64) -> u64 {
        with_holds(&mut self.holds, scope, key, |h| h.remove(lease, expires)).unwrap_or(0)
    }

    /// Roll the counter at `idx` of `scope` (of `window`) to `now_ms` and
    /// drop its expired holds; returns its usage and holds, or `None` if
    /// there is no such counter.
    fn advance(
        &mut self,
        scope: &ScopeKey,
        idx: usize,
        window: Window,
        now_ms: i64,
    ) -> Option<(u64, u64)> {
        let c = self.counter_mut(scope, idx)?;
        c.advance(window, now_ms);
        let (used, key) = (c.used(), c.key());
        Some((used, expire_holds(&mut self.holds, scope, key, now_ms)))
    }

    /// Drop the keys no counter uses, renumbering the rest.
    #[cold]
    #[inline(never)]
    fn compact_keys(&mut self) {
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

/// The state of a counter of `window` (or of an absent one, `counter ==
/// None`) holding `held`.
#[allow(clippy::too_many_arguments)]
// Inlined into both reports (its result is a large value, built in place).
#[inline(always)]
fn state_of(
    counter: Option<&Counter>,
    held: u64,
    window: Window,
    now_ms: i64,
    delta: u64,
    max: Option<u64>,
    times: &mut Times,
    shown: &mut Shown,
) -> CounterState {
    let used = counter.map_or(0, Counter::used);
    // Past the maximum with this delta: for a zero delta, a counter that
    // `Force` already took past it.
    let over = max
        .is_some_and(|m| u128::from(used) + u128::from(held) + u128::from(delta) > u128::from(m));
    // Holds are in-flight work: waiting for the window does not free them.
    let pending = held.saturating_add(delta);
    // Calendar bounds (and a rolling counter's bucket edges) recur across
    // calls, so they go through the shard's `shown` instants; a rolling
    // window's start is `now` less the span, new every call, so it is
    // converted directly and evicts none of them.
    let (period_start, resets_at, available_at) = match window {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => {
            // A counter reports the period its usage belongs to (after a
            // clock step back, that can be later than `now`'s period).
            let (start, next) = match counter {
                Some(&Counter::Calendar { start, len_ms, .. }) => {
                    (start, start.saturating_add(i64::from(len_ms)))
                }
                _ => Window::calendar_bounds(period, utc_offset_secs, now_ms),
            };
            let avail = match max {
                Some(m) if over && pending <= m => Some(next),
                _ => None,
            };
            (Some(times.at(start, shown)), Some(next), avail)
        }
        Window::Rolling { span_secs, .. } => {
            let start = now_ms.saturating_sub((span_secs as i64).saturating_mul(1_000));
            let ring = counter.and_then(|c| match c {
                Counter::Rolling { back, buf, .. } => Some(Ring {
                    width_ms: width_of(window),
                    back: *back,
                    buf: &**buf,
                }),
                _ => None,
            });
            let resets = ring.as_ref().and_then(Ring::resets_at);
            let avail = match (max, &ring) {
                (Some(m), Some(r)) if over => r.available_at(pending, m),
                _ => None,
            };
            (Some(times.convert(start)), resets, avail)
        }
        Window::Lifetime | Window::Concurrent => (None, None, None),
    };
    let mut time = |ms| times.at(ms, shown);
    CounterState {
        used,
        held,
        period_start,
        resets_at: resets_at.map(&mut time),
        available_at: available_at.map(time),
    }
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

const DAY_MS: i64 = 86_400_000;

/// The instants a shard reported lately, each in one of the two slots of
/// the pair a hash of its Unix milliseconds picks: a calendar period's bounds
/// are reported by every call for the whole period, and are converted once.
/// Two slots a pair, so two instants that hash alike (a day's start and a
/// rolling window's bucket edge, say) do not evict each other call after
/// call.
#[derive(Debug)]
struct Shown([[(i64, DateTime<Utc>); 2]; 8]);

impl Default for Shown {
    fn default() -> Self {
        // A true entry, so no sentinel is needed.
        Self([[(i64::MIN, ms_to_time(i64::MIN)); 2]; 8])
    }
}

/// Unix milliseconds to `DateTime<Utc>`, as [`ms_to_time`], for the several
/// instants of one report: one the shard showed lately is copied; otherwise
/// the first date is found from scratch (a 400-year cycle division), the
/// next ones by a day offset from it, which within a year is a few
/// instructions. Any base gives the same answers, so a shard keeps one
/// across batches.
#[derive(Debug, Default)]
struct Times {
    base: Option<(i64, NaiveDate)>,
}

impl Times {
    #[inline]
    fn at(&mut self, ms: i64, shown: &mut Shown) -> DateTime<Utc> {
        let pair = &mut shown.0[((ms as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize];
        if pair[0].0 == ms {
            return pair[0].1;
        }
        if pair[1].0 == ms {
            return pair[1].1;
        }
        // The newer entry first; the older one goes.
        pair[1] = pair[0];
        pair[0] = (ms, self.convert(ms));
        pair[0].1
    }

    // Out of line, so the cache probe in `at` inlines into its callers.
    #[inline(never)]
    fn convert(&mut self, ms: i64) -> DateTime<Utc> {
        let day = ms.div_euclid(DAY_MS);
        let date = self.base.and_then(|(d0, date0)| {
            let diff = day.checked_sub(d0)?;
            if diff == 0 {
                Some(date0)
            } else if diff > 0 {
                date0.checked_add_days(Days::new(diff.unsigned_abs()))
            } else {
                date0.checked_sub_days(Days::new(diff.unsigned_abs()))
            }
        });
        let Some(date) = date else {
            // Only a time in range is a base: a clamped one's date is not
            // its day's.
            return match DateTime::from_timestamp_millis(ms) {
                Some(t) => {
                    self.base = Some((day, t.date_naive()));
                    t
                }
                None => ms_to_time(ms),
            };
        };
        // The next conversion is often of the same day (a rolling window's
        // start, call after call): it then needs no day arithmetic.
        self.base = Some((day, date));
        let in_day = ms.rem_euclid(DAY_MS);
        // `in_day` is in [0, 86_400_000): both parts are in range.
        let time = NaiveTime::from_num_seconds_from_midnight_opt(
            (in_day / 1_000) as u32,
            (in_day % 1_000) as u32 * 1_000_000,
        );
        time.map_or_else(
            || ms_to_time(ms),
            |time| NaiveDateTime::new(date, time).and_utc(),
        )
    }
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
    /// The lowest shard's id and guard (most batches lock only it; `None`
    /// for a batch that names no shard).
    first_id: usize,
    first: Option<MutexGuard<'s, Shard>>,
    /// The others, by ascending id.
    rest: Vec<(usize, MutexGuard<'s, Shard>)>,
}

impl Locked<'_> {
    fn shard(&mut self, shard_id: usize) -> &mut Shard {
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
    fn count_batch(&mut self) -> Option<(usize, u64)> {
        let first = self.first_id;
        self.first.as_deref_mut().and_then(|shard| {
            shard.batches += 1;
            let period = SWEEP_EVERY.max(SWEEP_BATCHES_PER_SCOPE * shard.scopes.len() as u64);
            (shard.batches >= period).then(|| {
                shard.batches = 0;
                shard.sweeps += 1;
                (first, shard.sweeps)
            })
        })
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
            let mut keep = |c: &mut Counter| {
                let key = c.key();
                let Some(&(_, window)) = keys.get(key) else {
                    return true;
                };
                c.advance(window, now_ms);
                let holds = held.is_some_and(|l| l.iter().any(|(k, _)| *k == key));
                c.used() > 0 || holds
            };
            if counters.iter_mut().all(&mut keep) {
                return true;
            }
            let mut v = std::mem::take(counters).into_vec();
            let before = v.len();
            v.retain_mut(keep);
            removed += before - v.len();
            *counters = v.into_boxed_slice();
            !counters.is_empty()
        });
        cooldowns.retain(|_, until| *until > now_ms);
        if shard.keys.0.len() > KEYS_COMPACT_AT {
            shard.compact_keys();
        }
        removed
    }

    fn sweep_side(&self, i: usize, now_ms: i64, exact: bool) {
        let horizon = self.horizon_ms;
        self.leases[i].lock().retain(|_, l| {
            let ended = l.settled || now_ms >= l.expires_ms;
            !(ended && now_ms.saturating_sub(l.expires_ms) >= horizon)
        });
        self.ledger[i].lock().sweep(now_ms, horizon, exact);
    }

    /// A consistent copy of everything the store holds.
    pub fn snapshot(&self) -> Snapshot {
        // Lock order as in `apply`: ledger, leases, counters.
        let ledger: Vec<_> = self.ledger.iter().map(|m| m.lock()).collect();
        let leases: Vec<_> = self.leases.iter().map(|m| m.lock()).collect();
        let shards: Vec<_> = self.shards.iter().map(|m| m.lock()).collect();
        let mut scopes: Vec<(ScopeKey, Vec<SnapCounter>)> = shards
            .iter()
            .flat_map(|s| {
                s.scopes.iter().map(|(scope, counters)| {
                    let snap = counters
                        .iter()
                        .filter_map(|c| {
                            let (meter, window) = s.keys.get(c.key())?;
                            let holds = s.holds(scope, c.key());
                            Some(c.to_snap(meter.clone(), *window, holds))
                        })
                        .collect();
                    (scope.clone(), snap)
                })
            })
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
            .flat_map(|m| m.map.iter().map(|(k, v)| (k.to_string(), v.clone())))
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
            let shard_id = store.shard_of(&scope);
            let shard = store.shards[shard_id].get_mut();
            if shard.scopes.contains_key(&scope) {
                return Err(bad(format!("scope {scope} listed twice")));
            }
            let mut list: Vec<Counter> = Vec::with_capacity(counters.len());
            for c in &counters {
                let key = shard
                    .keys
                    .intern(&c.meter, c.window, list.len())
                    .ok_or_else(|| bad("too many meter and window pairs".into()))?;
                if list.iter().any(|o| o.key() == key) {
                    return Err(bad(format!(
                        "{scope} {} {} listed twice",
                        c.meter, c.window
                    )));
                }
                let counter = c
                    .to_counter(key)
                    .map_err(|r| bad(format!("{scope} {}: {r}", c.meter)))?;
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
                if let Some(h) = &c.holds {
                    shard
                        .holds
                        .entry(scope.clone())
                        .or_default()
                        .push((key, (**h).clone()));
                }
                list.push(counter);
            }
            shard.scopes.insert(scope, list.into_boxed_slice());
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

/// `apply`'s parts: the compact path of a batch of counter ops only, the
/// general path, and the steps they share.
impl MemoryStore {
    /// A batch with no event id, no lease and no cooldowns: the steps of
    /// [`MemoryStore::apply_general`] that such a batch takes, and no more.
    #[inline]
    fn apply_counters(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now.timestamp_millis();
        let ops = batch.ops;
        let mut op_shards: Inline<usize> = Inline::new();
        for op in ops {
            op_shards.push(self.shard_of(op.scope));
        }
        let op_shards = op_shards.as_slice();
        let mut locked = self.lock_shards(op_shards.iter().copied());
        let mut op_at: Inline<(KeyId, usize)> = Inline::new();
        let mut runs: Inline<usize> = Inline::new();
        let all_fit = check_ops(
            &mut locked,
            batch,
            op_shards,
            false,
            now_ms,
            &mut op_at,
            &mut runs,
        )?;
        let applied = match batch.mode {
            Mode::Check => false,
            Mode::WithinLimits => all_fit,
            Mode::Force => true,
        };
        let counters = add_and_report(
            &mut locked,
            ops,
            op_shards,
            &runs,
            &mut op_at,
            applied,
            now_ms,
        );
        let sweep_turn = locked.count_batch();
        drop(locked);
        let result = Applied {
            applied,
            counters,
            settled: Vec::new(),
            cooldowns: Vec::new(),
            replayed_at: None,
        };
        if let Some((first, k)) = sweep_turn {
            self.sweep_in_turn(first, k, now_ms);
        }
        Ok(result)
    }

    /// Any batch: event ids, leases, cooldowns and all.
    #[inline(never)]
    fn apply_general(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now.timestamp_millis();
        let ops = batch.ops;

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
        // Most batches have no cooldowns and no lease holds: skip the
        // (out of line) collect of an empty list.
        let cooldown_shards: Vec<usize> = match batch.cooldowns {
            [] => Vec::new(),
            cs => cs.iter().map(|c| self.shard_of(c.scope)).collect(),
        };
        let hold_shards: Vec<usize> = match lease_holds.as_slice() {
            [] => Vec::new(),
            hs => hs.iter().map(|h| self.shard_of(&h.scope)).collect(),
        };
        let mut locked = self.lock_shards(
            op_shards
                .as_slice()
                .iter()
                .chain(&cooldown_shards)
                .chain(&hold_shards)
                .copied(),
        );
        let op_shards = op_shards.as_slice();
        // Each op's key (for an op that adds, interned in phase 1, so phase 2
        // cannot fail) and counter position, found in phase 1 (or made in
        // phase 2).
        let mut op_at: Inline<(KeyId, usize)> = Inline::new();

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
                let sh = locked.shard(shard);
                let held = match sh.find(&h.scope, &h.meter, h.window) {
                    Some((key, idx)) => {
                        sh.advance(&h.scope, idx, h.window, now_ms);
                        sh.holds(&h.scope, key)
                            .map_or(0, |x| x.amount(id, lease_expires))
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
                let sh = locked.shard(ch.shard);
                let used = sh
                    .find(&ch.hold.scope, &ch.hold.meter, ch.hold.window)
                    .and_then(|(_, idx)| sh.scopes.get(&ch.hold.scope)?.get(idx))
                    .map_or(0, Counter::used);
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
        // Where each run of ops on one scope ends.
        let mut runs: Inline<usize> = Inline::new();
        let mut all_fit = check_ops(
            &mut locked,
            batch,
            op_shards,
            holding,
            now_ms,
            &mut op_at,
            &mut runs,
        )?;
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
                    for ((op, &shard), (key, idx)) in
                        ops.iter().zip(op_shards).zip(op_at.as_mut_slice())
                    {
                        let key = *key;
                        if op.delta == 0 {
                            continue;
                        }
                        let sh = locked.shard(shard);
                        if let Some((i, _)) = sh.counter_or_new(op.scope, key, op.window, now_ms) {
                            *idx = i;
                            sh.add_hold(op.scope, key, l.id, expires_ms, op.delta);
                            if let Some((meter, _)) = sh.keys.get(key) {
                                holds.push(HoldRef {
                                    scope: op.scope.clone(),
                                    meter: meter.clone(),
                                    window: op.window,
                                });
                            }
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
                        let sh = locked.shard(shard);
                        if let Some((key, _)) = sh.find(&h.scope, &h.meter, h.window) {
                            let amount = sh.remove_hold(&h.scope, key, l.id, lease_expires);
                            if amount > 0 {
                                sh.add_hold(&h.scope, key, l.id, new_ms, amount);
                            }
                        }
                    }
                    if let Some(rec) = lease_guard.as_mut().and_then(|g| g.get_mut(&l.id)) {
                        rec.expires_ms = new_ms;
                    }
                }
                (Some(l), Some(LeaseAction::Grow)) => {
                    let mut added = Vec::new();
                    for ((op, &shard), (key, idx)) in
                        ops.iter().zip(op_shards).zip(op_at.as_mut_slice())
                    {
                        let key = *key;
                        if op.delta == 0 {
                            continue;
                        }
                        let sh = locked.shard(shard);
                        if let Some((i, _)) = sh.counter_or_new(op.scope, key, op.window, now_ms) {
                            *idx = i;
                            sh.add_hold(op.scope, key, l.id, lease_expires, op.delta);
                            let known = lease_holds.iter().any(|h| {
                                h.scope == *op.scope
                                    && &*h.meter == op.meter
                                    && h.window == op.window
                            });
                            if let (false, Some((meter, _))) = (known, sh.keys.get(key)) {
                                added.push(HoldRef {
                                    scope: op.scope.clone(),
                                    meter: meter.clone(),
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
                        let sh = locked.shard(ch.shard);
                        let (scope, window) = (&ch.hold.scope, ch.hold.window);
                        if let Some((key, idx)) = sh.find(scope, &ch.hold.meter, window) {
                            sh.remove_hold(scope, key, l.id, lease_expires);
                            if let Some(c) = sh.counter_mut(scope, idx) {
                                c.add(window, ch.charged);
                            }
                        }
                        settled.push(SettledHold::new(
                            ch.hold.scope,
                            ch.hold.meter,
                            ch.hold.window,
                            ch.held,
                            ch.charged,
                        ));
                    }
                    add_usage(&mut locked, ops, op_shards, &runs, &mut op_at, now_ms);
                    if let Some(rec) = lease_guard.as_mut().and_then(|g| g.get_mut(&l.id)) {
                        rec.settled = true;
                        rec.holds.clear();
                    }
                }
                _ => add_usage(&mut locked, ops, op_shards, &runs, &mut op_at, now_ms),
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
        let counters = report(&mut locked, ops, op_shards, &runs, &op_at, applied, now_ms);
        let sweep_turn = locked.count_batch();
        drop(locked);
        drop(lease_guard);
        let result = Applied {
            applied,
            counters,
            settled,
            cooldowns: if cooling.is_empty() {
                Vec::new()
            } else {
                cooling.into_iter().map(|u| u.map(ms_to_time)).collect()
            },
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
            self.sweep_in_turn(first, k, now_ms);
        }
        Ok(result)
    }

    /// Lock the counter shards `ids` (repeats allowed), in ascending order,
    /// and drop the unused keys of a shard that has too many.
    #[inline]
    fn lock_shards(&self, ids: impl Iterator<Item = usize> + Clone) -> Locked<'_> {
        let mut locked = match ids.clone().next() {
            // Most batches name one scope, so one shard: nothing to sort.
            Some(f) if ids.clone().all(|i| i == f) => Locked {
                first_id: f,
                first: Some(self.shards[f].lock()),
                rest: Vec::new(),
            },
            Some(_) => return self.lock_sorted(ids),
            None => Locked {
                first_id: 0,
                first: None,
                rest: Vec::new(),
            },
        };
        if let Some(sh) = &mut locked.first {
            if sh.keys.0.len() >= KEYS_HIGH_WATER {
                sh.compact_keys();
            }
        }
        locked
    }

    /// [`MemoryStore::lock_shards`] for a batch over several shards.
    #[cold]
    #[inline(never)]
    fn lock_sorted(&self, ids: impl Iterator<Item = usize>) -> Locked<'_> {
        let mut all: Inline<usize> = Inline::new();
        for i in ids {
            all.push(i);
        }
        all.as_mut_slice().sort_unstable();
        let (&f, others) = all.as_slice().split_first().unwrap_or((&0, &[]));
        let mut locked = Locked {
            first_id: f,
            first: Some(self.shards[f].lock()),
            rest: Vec::new(),
        };
        let mut last = f;
        for &i in others {
            if i != last {
                locked.rest.push((i, self.shards[i].lock()));
                last = i;
            }
        }
        for sh in locked
            .first
            .iter_mut()
            .chain(locked.rest.iter_mut().map(|(_, g)| g))
        {
            if sh.keys.0.len() >= KEYS_HIGH_WATER {
                sh.compact_keys();
            }
        }
        locked
    }

    /// The sweep a batch triggered (see [`Locked::count_batch`]), once the
    /// locks are released.
    #[cold]
    #[inline(never)]
    fn sweep_in_turn(&self, first: usize, k: u64, now_ms: i64) {
        let i = ((first as u64 + k) % self.shards.len() as u64) as usize;
        Self::sweep(&mut self.shards[i].lock(), now_ms);
        self.sweep_side(
            ((first as u64 + k) % SIDE_SHARDS as u64) as usize,
            now_ms,
            false,
        );
    }
}

/// Phase 1 for a batch's ops: roll every named counter to now, note each
/// op's key (for an op that adds, interned now, so phase 2 cannot fail) and
/// counter position in `op_at` and where each run of ops on one scope ends
/// in `runs`; returns whether every op fits. `holding`: the ops take holds
/// (a lease opens or grows), so overflow is of the holds.
#[inline]
fn check_ops(
    locked: &mut Locked<'_>,
    batch: &Batch<'_>,
    op_shards: &[usize],
    holding: bool,
    now_ms: i64,
    op_at: &mut Inline<(KeyId, usize)>,
    runs: &mut Inline<usize>,
) -> Result<bool, Error> {
    let ops = batch.ops;
    let mut all_fit = true;
    let mut hint = 0;
    let mut i = 0;
    while i < ops.len() {
        let end = run_end(ops, op_shards, i);
        runs.push(end);
        let Shard {
            keys,
            scopes,
            holds,
            ..
        } = locked.shard(op_shards[i]);
        let scope = ops[i].scope;
        let counters: &mut [Counter] = scopes.get_mut(scope).map_or(&mut [], |c| c);
        for op in &ops[i..end] {
            let key = if op.delta > 0 {
                Some(
                    keys.intern(op.meter, op.window, hint)
                        .ok_or_else(keys_full)?,
                )
            } else {
                // A zero delta never makes a counter: no new key.
                keys.find(op.meter, op.window, hint)
            };
            hint = key.map_or(0, |k| usize::from(k) + 1);
            let idx = key.and_then(|k| counters.iter().position(|c| c.key() == k));
            // Phase 2 reads the key only of an op that adds.
            op_at.push((key.unwrap_or_default(), idx.unwrap_or(NONE)));
            let (used, held) = match idx.and_then(|x| counters.get_mut(x)) {
                Some(c) => {
                    c.advance(op.window, now_ms);
                    let held = expire_holds(holds, scope, c.key(), now_ms);
                    (c.used(), held)
                }
                None => (0, 0),
            };
            // Past u64: an error where the delta would be added
            // regardless (Force, or no maximum); elsewhere it simply does
            // not fit.
            let target = if holding { held } else { used };
            if target.checked_add(op.delta).is_none()
                && (batch.mode == Mode::Force || op.max.is_none())
            {
                return Err(overflow(op.meter));
            }
            all_fit &= fits(used, held, op.delta, op.max);
        }
        i = end;
    }
    Ok(all_fit)
}

/// The error of a shard whose `(meter, window)` ids are all in use.
#[cold]
#[inline(never)]
fn keys_full() -> Error {
    invalid(format!(
        "more than {} meter and window pairs in use",
        usize::from(KeyId::MAX) + 1
    ))
}

/// The error of usage or holds that would pass a `u64`.
#[cold]
#[inline(never)]
fn overflow(meter: &str) -> Error {
    Error::Overflow {
        meter: meter.to_owned(),
    }
}

/// Phase 3: each op's counter as it stands (see `state_of`).
#[inline]
fn report(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &[(KeyId, usize)],
    applied: bool,
    now_ms: i64,
) -> Vec<CounterState> {
    let mut counters = Vec::with_capacity(ops.len());
    // When applied, the delta is already in `used` or `held`; ask about
    // a zero delta so `available_at` is not set for a fitting op.
    let delta_of = |op: &CounterOp<'_>| if applied { 0 } else { op.delta };
    let mut i = 0;
    for &end in runs {
        let Shard {
            scopes,
            holds,
            shown,
            times,
            ..
        } = locked.shard(op_shards[i]);
        let list: &[Counter] = scopes.get(ops[i].scope).map_or(&[], |c| c);
        for (op, &(_, idx)) in ops[i..end].iter().zip(&op_at[i..end]) {
            let counter = list.get(idx);
            let held = counter.map_or(0, |c| held_in(holds, op.scope, c.key()));
            let (delta, max) = (delta_of(op), op.max);
            counters.push(state_of(
                counter, held, op.window, now_ms, delta, max, times, shown,
            ));
        }
        i = end;
    }
    counters
}

impl AllowanceStore for MemoryStore {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        validate(batch)?;
        // Most batches only count: no event id, no lease, no cooldowns. They
        // take a compact path; the rest take the general one, out of line,
        // so its code stays out of the instruction cache of the usual call.
        if batch.event.is_none() && batch.lease.is_none() && batch.cooldowns.is_empty() {
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
}

fn keep_of(keep: Fraction, held: u64) -> u64 {
    keep.ceil_of(held)
}

/// Add every op's delta to its counter's usage (checked not to overflow).
fn add_usage(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    shards: &[usize],
    runs: &[usize],
    at: &mut [(KeyId, usize)],
    now_ms: i64,
) {
    let mut i = 0;
    for &end in runs {
        add_run(
            locked.shard(shards[i]),
            ops[i].scope,
            &ops[i..end],
            &mut at[i..end],
            now_ms,
        );
        i = end;
    }
}

/// [`add_usage`] for one run of ops on `scope`.
fn add_run(
    sh: &mut Shard,
    scope: &ScopeKey,
    ops: &[CounterOp<'_>],
    at: &mut [(KeyId, usize)],
    now_ms: i64,
) {
    // Phase 1 found most counters: one lookup for the run.
    if let Some(list) = sh.scopes.get_mut(scope) {
        for (op, &(_, idx)) in ops.iter().zip(&*at) {
            if let (true, Some(c)) = (op.delta > 0, list.get_mut(idx)) {
                c.add(op.window, op.delta);
            }
        }
    }
    // Then the ones that are new.
    for (op, (key, idx)) in ops.iter().zip(at) {
        if op.delta == 0 || *idx != NONE {
            continue;
        }
        if let Some((x, c)) = sh.counter_or_new(scope, *key, op.window, now_ms) {
            *idx = x;
            c.add(op.window, op.delta);
        }
    }
}

/// Phases 2 and 3 of a batch of counter ops only: [`add_usage`] (if
/// `applied`), then [`report`], with one counter lookup a run where both
/// would take one. A run's report reads only its own ops' counters, so each
/// run can be reported as soon as it is added to.
#[inline(never)]
fn add_and_report(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &mut [(KeyId, usize)],
    applied: bool,
    now_ms: i64,
) -> Vec<CounterState> {
    let mut counters = Vec::with_capacity(ops.len());
    let mut i = 0;
    for &end in runs {
        let sh = locked.shard(op_shards[i]);
        let scope = ops[i].scope;
        let (run, at) = (&ops[i..end], &mut op_at[i..end]);
        // A run that makes a counter takes `add_usage`'s steps first; the
        // usual run adds in the loop below, through the same lookup.
        let mut add = applied;
        if add
            && run
                .iter()
                .zip(&*at)
                .any(|(op, &(_, idx))| op.delta > 0 && idx == NONE)
        {
            add_run(sh, scope, run, at, now_ms);
            add = false;
        }
        let Shard {
            scopes,
            holds,
            shown,
            times,
            ..
        } = sh;
        let list: &mut [Counter] = scopes.get_mut(scope).map_or(&mut [], |c| c);
        for (op, &(_, idx)) in run.iter().zip(&*at) {
            let mut counter = list.get_mut(idx);
            if let (true, Some(c)) = (add && op.delta > 0, &mut counter) {
                c.add(op.window, op.delta);
            }
            let counter = counter.map(|c| &*c);
            let held = counter.map_or(0, |c| held_in(holds, op.scope, c.key()));
            // As in `report`: once applied, the delta is in `used` or `held`.
            let delta = if applied { 0 } else { op.delta };
            counters.push(state_of(
                counter, held, op.window, now_ms, delta, op.max, times, shown,
            ));
        }
        i = end;
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CooldownOp, CounterOp, EventKey, LeaseOp};
    use crate::window::Period;
    use chrono::TimeZone;

    #[test]
    fn a_counter_is_three_words() {
        assert_eq!(std::mem::size_of::<Counter>(), 24);
    }

    #[test]
    fn a_scope_key_is_three_words_and_keeps_its_kind_exactly() {
        use crate::store::ScopeKind;
        assert_eq!(std::mem::size_of::<ScopeKey>(), 24);
        let (s, p) = (ScopeKey::subject("a"), ScopeKey::pool("a"));
        assert_ne!(s, p);
        assert_eq!((s.kind(), p.kind()), (ScopeKind::Subject, ScopeKind::Pool));
        assert_eq!((s.id(), p.id()), ("a", "a"));
        assert_ne!(s.hash_value(), p.hash_value());
        // Equal ids of equal kind are equal, through distinct allocations.
        let s2 = ScopeKey::subject(String::from("a"));
        assert_eq!(s, s2);
        assert_eq!(s.hash_value(), s2.hash_value());
        assert_eq!(ScopeKey::pool("a"), p);
        assert_ne!(ScopeKey::subject("b"), s);
        // Both kinds in one map stay apart.
        let mut m: ScopeMap<u8> = ScopeMap::default();
        m.insert(s.clone(), 1);
        m.insert(p.clone(), 2);
        assert_eq!((m.get(&s2), m.get(&p), m.len()), (Some(&1), Some(&2), 2));
        assert!(s < p, "subjects sort before pools");
        assert_eq!(format!("{s} {p}"), "subject:a pool:a");
        // Many ids of both kinds: no two keys of different kind compare
        // equal, and the kind survives a serde round trip.
        for i in 0..1_000 {
            let id = i.to_string();
            let (s, p) = (ScopeKey::subject(id.as_str()), ScopeKey::pool(id.as_str()));
            assert_ne!(s, p);
            assert_eq!((s.kind(), p.kind()), (ScopeKind::Subject, ScopeKind::Pool));
            let back: ScopeKey = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, p);
            assert_eq!(back.hash_value(), p.hash_value());
        }
    }

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

    /// The compact path (no event id, lease or cooldown) answers and counts
    /// as the general path does: every batch is applied to one store as is
    /// and to another with an event id, which takes the general path.
    #[test]
    fn the_compact_path_answers_as_the_general_path() {
        let (plain, general) = (MemoryStore::with_shards(4), MemoryStore::with_shards(4));
        let scopes: Vec<ScopeKey> = (0..6).map(|i| ScopeKey::subject(format!("s{i}"))).collect();
        let windows = [
            Window::calendar(Period::Day),
            Window::Calendar {
                period: Period::Month,
                utc_offset_secs: -5 * 3_600,
            },
            Window::Rolling {
                span_secs: 7 * 86_400,
                buckets: 168,
            },
            Window::Lifetime,
        ];
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = at(0);
        for step in 0..600 {
            // Mostly forward, by up to 3 days, now and then a step back.
            now = match next(10) {
                0 => now - chrono::Duration::hours(5),
                _ => now + chrono::Duration::minutes(next(3 * 24 * 60) as i64),
            };
            // One or two scopes (so one shard or more), each op on a window.
            let picked = [next(6) as usize, next(6) as usize];
            let n = if next(3) == 0 { 2 } else { 1 };
            let mut ops = Vec::new();
            for (j, &s) in picked[..n].iter().enumerate() {
                if j == 1 && picked[1] == picked[0] {
                    break;
                }
                for (k, &window) in windows.iter().enumerate() {
                    if next(5) == 0 {
                        continue;
                    }
                    ops.push(CounterOp {
                        scope: &scopes[s],
                        meter: ["tokens", "jobs"][k % 2],
                        window,
                        delta: next(40),
                        max: (next(4) != 0).then_some(200),
                    });
                }
            }
            // Now and then the scopes interleave: runs of one op each, a
            // scope named by runs apart.
            if next(3) == 0 {
                ops.sort_by_key(|o| windows.iter().position(|w| *w == o.window));
            }
            let mode = [Mode::WithinLimits, Mode::Check, Mode::Force][next(3) as usize];
            let id = format!("e{step}");
            let batch = Batch::new(&ops, mode, now);
            let a = plain.apply(&batch).unwrap();
            let b = general
                .apply(&batch.with_event(EventKey::new(&id, 0)))
                .unwrap();
            assert_eq!(a, b, "step {step}");
        }
        assert_eq!(plain.snapshot().scopes, general.snapshot().scopes);
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

    /// A store with `idle` subjects recorded on day 0 and a function that
    /// runs `n` batches of one busy subject on day 1 (the idle ones can go).
    fn idle_then_busy(shards: usize, idle: usize) -> (MemoryStore, impl Fn(&MemoryStore, u64)) {
        fn op(scope: &ScopeKey) -> CounterOp<'_> {
            CounterOp {
                scope,
                meter: "t",
                window: Window::calendar(Period::Day),
                delta: 1,
                max: None,
            }
        }
        let store = MemoryStore::with_shards(shards);
        for i in 0..idle {
            let s = ScopeKey::subject(format!("old{i}"));
            store
                .apply(&Batch::new(&[op(&s)], Mode::Force, at(0)))
                .unwrap();
        }
        let busy = ScopeKey::subject("busy");
        let tomorrow = at(0) + chrono::Duration::days(1);
        let run = move |store: &MemoryStore, n: u64| {
            for _ in 0..n {
                store
                    .apply(&Batch::new(&[op(&busy)], Mode::Force, tomorrow))
                    .unwrap();
            }
        };
        (store, run)
    }

    #[test]
    fn a_batch_over_many_shards_locks_each_once_and_finds_every_counter() {
        // Scopes spread over most of 8 shards, in no order, several per
        // shard, plus a cooldown on a shard no op names.
        let store = MemoryStore::with_shards(8);
        // Scope hashes are keyed per process: the scopes are picked off the
        // cooled scope's shard (12 scopes picked blindly cover all 8 shards
        // about one run in ten).
        let cooled = ScopeKey::subject("c0");
        let scopes: Vec<ScopeKey> = (0..)
            .map(|i| match i % 3 {
                0 => ScopeKey::pool(format!("p{i}")),
                _ => ScopeKey::subject(format!("s{i}")),
            })
            .filter(|s| store.shard_of(s) != store.shard_of(&cooled))
            .take(12)
            .collect();
        let ops: Vec<CounterOp<'_>> = scopes
            .iter()
            .map(|s| CounterOp {
                scope: s,
                meter: "t",
                window: Window::calendar(Period::Day),
                delta: 2,
                max: Some(3),
            })
            .collect();
        let cool = [CooldownOp::new(&cooled, Some(at(5)))];
        let mut batch = Batch::new(&ops, Mode::WithinLimits, at(0));
        batch.cooldowns = &cool;
        let first = store.apply(&batch).unwrap();
        assert!(first.applied);
        assert!(first.counters.iter().all(|c| c.used == 2));
        assert_eq!(first.cooldowns, vec![Some(at(5))]);
        // The cooldown now runs: nothing fits, and every counter reads 2.
        let second = store.apply(&batch).unwrap();
        assert!(!second.applied);
        assert!(second.counters.iter().all(|c| c.used == 2));
        assert_eq!(store.counter_count(), scopes.len());
    }

    #[test]
    fn idle_counters_are_swept_without_being_asked() {
        // Two shards: every shard is swept within 2 × 1,024 batches.
        let (store, run) = idle_then_busy(2, 100);
        run(&store, 2 * SWEEP_EVERY);
        assert_eq!(
            store.counter_count(),
            1,
            "only the busy subject's counter is left"
        );
    }

    #[test]
    fn sweeps_wait_four_batches_per_scope_then_reclaim() {
        // One shard: 2,000 subjects idle since yesterday and one busy one.
        // A sweep visits every scope, so it waits for 4 batches per scope
        // (8,004 here, counting the 2,000 that made them), then runs.
        let (store, run) = idle_then_busy(1, 2_000);
        run(&store, 5_000);
        assert_eq!(
            store.counter_count(),
            2_001,
            "no sweep yet at 7,000 batches"
        );
        run(&store, 1_100);
        assert_eq!(store.counter_count(), 1, "swept by 8,100 batches");
    }

    #[test]
    fn sweeps_forget_events_an_eighth_of_a_horizon_after_it() {
        // One hour horizon: an event recorded at 0 is no longer replayed
        // after 1 h; automatic sweeps walk the ledger once its oldest entry
        // is 1 h 7.5 min old, `reclaim` at once.
        let store =
            MemoryStore::with_shards(1).with_event_horizon(std::time::Duration::from_secs(3_600));
        let scope = ScopeKey::subject("s");
        let ops = [CounterOp {
            scope: &scope,
            meter: "t",
            window: Window::Lifetime,
            delta: 1,
            max: None,
        }];
        let minutes = |m: i64| at(0) + chrono::Duration::minutes(m);
        store
            .apply(&Batch::new(&ops, Mode::Force, minutes(0)).with_event(EventKey::new("e", 1)))
            .unwrap();
        // 16 side shards, one swept per 1,024 batches here: 20,000 batches
        // reach every one.
        let busy = |m: i64| {
            for _ in 0..20_000 {
                store
                    .apply(&Batch::new(&ops, Mode::Force, minutes(m)))
                    .unwrap();
            }
        };
        busy(61);
        assert_eq!(store.snapshot().event_count(), 1, "kept within the slack");
        busy(68);
        assert_eq!(store.snapshot().event_count(), 0, "forgotten after it");

        let store =
            MemoryStore::with_shards(1).with_event_horizon(std::time::Duration::from_secs(3_600));
        store
            .apply(&Batch::new(&ops, Mode::Force, minutes(0)).with_event(EventKey::new("e", 1)))
            .unwrap();
        store.reclaim(minutes(61));
        assert_eq!(store.snapshot().event_count(), 0, "reclaim is exact");
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

    /// One counter of each window, one of them holding for a lease.
    fn busy_store() -> (MemoryStore, ScopeKey, Vec<Window>) {
        let store = MemoryStore::new();
        let a = ScopeKey::subject("a");
        let windows = vec![
            Window::calendar(Period::Day),
            Window::calendar(Period::Month),
            Window::Rolling {
                span_secs: 86_400,
                buckets: 24,
            },
            Window::Lifetime,
        ];
        for (h, delta) in [(1, 5), (3, 7)] {
            let ops: Vec<_> = windows
                .iter()
                .map(|&window| CounterOp {
                    scope: &a,
                    meter: "t",
                    window,
                    delta,
                    max: None,
                })
                .collect();
            store.apply(&Batch::new(&ops, Mode::Force, at(h))).unwrap();
        }
        let hold = [CounterOp {
            scope: &a,
            meter: "jobs",
            window: Window::Concurrent,
            delta: 1,
            max: Some(3),
        }];
        let open = LeaseOp::new(
            LeaseId::from_u128(7),
            &a,
            LeaseAction::Open {
                expires_at: at(20),
                deadline: None,
            },
        );
        let r = store
            .apply(&Batch::new(&hold, Mode::WithinLimits, at(4)).with_lease(open))
            .unwrap();
        assert!(r.applied);
        (store, a, windows)
    }

    #[test]
    fn a_restored_snapshot_keeps_every_counter_and_hold() {
        let (store, a, windows) = busy_store();
        let snap = store.snapshot();
        assert_eq!(snap.counter_count(), 5);
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        let restored = MemoryStore::restore(back).unwrap();
        assert_eq!(restored.snapshot(), snap);
        for &window in &windows {
            let op = [CounterOp {
                scope: &a,
                meter: "t",
                window,
                delta: 0,
                max: Some(100),
            }];
            let was = store.apply(&Batch::new(&op, Mode::Check, at(5))).unwrap();
            let now = restored
                .apply(&Batch::new(&op, Mode::Check, at(5)))
                .unwrap();
            assert_eq!(now.counters, was.counters, "{window}");
            assert_eq!(now.counters[0].used, 12, "{window}");
        }
        let jobs = [CounterOp {
            scope: &a,
            meter: "jobs",
            window: Window::Concurrent,
            delta: 0,
            max: Some(3),
        }];
        let r = restored
            .apply(&Batch::new(&jobs, Mode::Check, at(5)))
            .unwrap();
        assert_eq!(r.counters[0].held, 1);
        // The hold still ends with its lease.
        let r = restored
            .apply(&Batch::new(&jobs, Mode::Check, at(20)))
            .unwrap();
        assert_eq!(r.counters[0].held, 0);
    }

    #[test]
    fn a_snapshot_that_breaks_an_invariant_is_refused() {
        let (store, _, _) = busy_store();
        let snap = store.snapshot();
        let mut tampered = Vec::new();
        for i in 0..snap.scopes[0].1.len() {
            let mut s = snap.clone();
            match &mut s.scopes[0].1[i].data {
                Data::Calendar { start, end, .. } => *end = *start + 60 * DAY_MS,
                Data::Rolling(r) => r.total += 1,
                Data::Lifetime { .. } => s.scopes[0].1[i].window = Window::Concurrent,
                Data::Concurrent => {
                    if let Some(h) = &mut s.scopes[0].1[i].holds {
                        h.total += 1;
                    }
                }
            }
            tampered.push(s);
        }
        // Extremes that would overflow the arithmetic.
        for i in 0..snap.scopes[0].1.len() {
            let mut s = snap.clone();
            match &mut s.scopes[0].1[i].data {
                Data::Calendar { start, end, .. } => (*start, *end) = (i64::MIN, i64::MAX),
                Data::Rolling(r) => (r.head, r.tail) = (i64::MAX, i64::MAX),
                _ => continue,
            }
            tampered.push(s);
        }
        let mut twice = snap.clone();
        let first = twice.scopes[0].1[0].clone();
        twice.scopes[0].1.push(first);
        tampered.push(twice);
        for s in tampered {
            let err = MemoryStore::restore(s).map(|_| ()).unwrap_err();
            assert!(matches!(err, Error::InvalidSnapshot { .. }), "{err}");
        }
        assert!(MemoryStore::restore(snap).is_ok());
    }

    #[test]
    fn times_agree_with_a_conversion_from_scratch() {
        let year = 365 * DAY_MS;
        let samples = [
            0,
            -1,
            1,
            1_764_460_800_123,
            1_764_460_800_123 + 3 * DAY_MS - 7,
            1_764_460_800_123 - 40 * DAY_MS,
            1_764_460_800_123 + 2 * year,
            -3 * year - 999,
            DAY_MS - 1,
            i64::MAX,
            i64::MIN,
            DateTime::<Utc>::MAX_UTC.timestamp_millis(),
            DateTime::<Utc>::MIN_UTC.timestamp_millis(),
            1_764_460_800_000,
        ];
        // Shown afresh, then again (from the shard's slots or converted
        // again where two collide), in both orders.
        let mut shown = Shown::default();
        for _ in 0..2 {
            let mut times = Times::default();
            for &ms in samples.iter().chain(samples.iter().rev()) {
                assert_eq!(times.at(ms, &mut shown), ms_to_time(ms), "{ms}");
            }
        }
        // One base kept across every sample, as a shard keeps it, from
        // either end of the range.
        for first in [i64::MIN, 0, i64::MAX] {
            let (mut shown, mut times) = (Shown::default(), Times::default());
            times.at(first, &mut shown);
            for &ms in samples.iter().chain(samples.iter().rev()) {
                assert_eq!(times.convert(ms), ms_to_time(ms), "{first} {ms}");
                assert_eq!(times.at(ms, &mut shown), ms_to_time(ms), "{first} {ms}");
            }
        }
    }

    /// Two instants of one pair both stay shown, however they alternate;
    /// a third of that pair drops the older one.
    #[test]
    fn shown_keeps_two_instants_that_hash_alike() {
        let pair = |ms: i64| ((ms as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize;
        let t0 = 1_764_460_800_000;
        let mut alike = (1..)
            .map(|k| t0 + k * 3_600_000)
            .filter(|&ms| pair(ms) == pair(t0));
        let (a, b, c) = (t0, alike.next().unwrap(), alike.next().unwrap());
        let (mut shown, mut times) = (Shown::default(), Times::default());
        let held = |shown: &Shown, ms| shown.0[pair(ms)].iter().any(|&(m, _)| m == ms);
        times.at(a, &mut shown);
        for ms in [b, a, b, a] {
            assert_eq!(times.at(ms, &mut shown), ms_to_time(ms));
            assert!(held(&shown, a) && held(&shown, b), "{ms}");
        }
        assert_eq!(times.at(c, &mut shown), ms_to_time(c));
        assert!(held(&shown, c) && held(&shown, b) && !held(&shown, a));
        for ms in [a, b, c] {
            assert_eq!(times.at(ms, &mut shown), ms_to_time(ms));
        }
    }

    /// `same_name` agrees with `==` for names of every length up to 40
    /// bytes that differ (or not) at any one byte, or in length.
    #[test]
    fn same_name_agrees_with_string_equality() {
        let base: String = "llm_tokens_input_runtime_seconds_cost_usd".into();
        for n in 0..=40 {
            let a = &base[..n];
            assert!(same_name(a, a) && same_name(a, &String::from(a)), "{a}");
            for i in 0..n {
                let mut b = a.as_bytes().to_vec();
                b[i] = b'#';
                let b = String::from_utf8(b).unwrap();
                assert!(!same_name(a, &b) && !same_name(&b, a), "{a} {b}");
            }
            for m in 0..=40 {
                assert_eq!(same_name(a, &base[..m]), n == m, "{n} {m}");
            }
        }
    }

    /// A conversion moves the base to its own day, so the next one of the
    /// same day takes no day arithmetic: same-day, next-day and earlier
    /// instants still convert exactly, whichever came last.
    #[test]
    fn times_convert_from_the_last_day_converted() {
        let t0 = 1_764_460_800_123;
        let mut times = Times::default();
        let steps = [
            0,
            5,
            DAY_MS - 200,
            DAY_MS - 123,
            DAY_MS + 1,
            -1,
            -DAY_MS,
            40 * DAY_MS + 9,
            40 * DAY_MS + 10,
            -400 * DAY_MS,
            -400 * DAY_MS + 1,
        ];
        for &d in &steps {
            let ms = t0 + d;
            assert_eq!(times.convert(ms), ms_to_time(ms), "{d}");
            assert_eq!(times.base.map(|(day, _)| day), Some(ms.div_euclid(DAY_MS)));
            assert_eq!(times.convert(ms + 1), ms_to_time(ms + 1), "{d} + 1");
        }
    }

    #[test]
    fn a_full_key_table_refuses_the_batch_and_recovers_when_keys_are_unused() {
        let store = MemoryStore::with_shards(1);
        let a = ScopeKey::subject("a");
        let op = |meter, delta| CounterOp {
            scope: &a,
            meter,
            window: Window::Lifetime,
            delta,
            max: None,
        };
        // Every id but one in use by an empty counter of another scope.
        {
            let mut sh = store.shards[0].lock();
            let filler: Vec<Counter> = (0..KeyId::MAX)
                .map(|key| {
                    // Distinct names: pushed without a search.
                    sh.keys
                        .0
                        .push((Arc::from(format!("m{key}")), Window::Lifetime));
                    Counter::Lifetime { key, used: 0 }
                })
                .collect();
            sh.scopes
                .insert(ScopeKey::subject("filler"), filler.into_boxed_slice());
        }
        let run = |meter, delta, mode| store.apply(&Batch::new(&[op(meter, delta)], mode, at(0)));
        run("kept", 4, Mode::Force).unwrap();
        let err = run("one too many", 1, Mode::Force).unwrap_err();
        assert!(matches!(err, Error::InvalidBatch { .. }), "{err}");
        assert_eq!(
            run("one too many", 0, Mode::Check).unwrap().counters[0].used,
            0
        );
        assert_eq!(
            store.counter_count(),
            KeyId::MAX as usize + 1,
            "nothing changed"
        );
        // The empty counters go; their keys with them; the kept counter is
        // renumbered and keeps its usage.
        assert_eq!(store.reclaim(at(0)), KeyId::MAX as usize);
        assert_eq!(store.shards[0].lock().keys.0.len(), 1);
        run("one too many", 1, Mode::Force).unwrap();
        assert_eq!(run("kept", 0, Mode::Check).unwrap().counters[0].used, 4);
        assert_eq!(
            run("one too many", 0, Mode::Check).unwrap().counters[0].used,
            1
        );
    }
}
