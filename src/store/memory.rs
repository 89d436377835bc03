//! The embedded default store.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, MutexGuard};

use super::{fits, AllowanceStore, Applied, Batch, CounterState, Mode, ScopeKey};
use crate::window::Window;
use crate::Error;

const DEFAULT_SHARDS: usize = 64;
/// Every this many batches, one shard is swept of idle counters.
const SWEEP_EVERY: u64 = 1_024;

/// An in-memory [`AllowanceStore`]: the embedded default for a single process.
///
/// Scopes are spread over shards, each behind a `parking_lot` mutex. A
/// scope's counters live together in one map entry. A batch locks every shard
/// it touches in ascending order (so two batches never deadlock), checks every
/// op, then applies all or none before unlocking: check and record are one
/// step.
///
/// Counters that read zero (a calendar period that has ended, a rolling window
/// whose buckets have all left) are reclaimed by a sweep of one shard every
/// 1,024 batches, or all at once by [`MemoryStore::reclaim`], so memory follows
/// the number of active counters, not the traffic.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    batches: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    scopes: HashMap<ScopeKey, Vec<Counter>>,
}

#[derive(Debug, Clone)]
struct Counter {
    meter: Arc<str>,
    window: Window,
    data: Data,
}

#[derive(Debug, Clone)]
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
}

/// A rolling window: `slots.len() == buckets + 1` buckets of `width_ms`, the
/// newest at bucket index `head`, and their running `total`. `tail` is the
/// oldest bucket still holding usage (when `total > 0`), kept as buckets
/// leave, so no read walks every bucket.
#[derive(Debug, Clone)]
struct Rolling {
    width_ms: i64,
    head: i64,
    tail: i64,
    total: u64,
    slots: Box<[u64]>,
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
        };
        Self {
            meter: Arc::from(meter),
            window,
            data,
        }
    }

    /// Roll the counter forward to `now_ms`.
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
    }

    fn used(&self) -> u64 {
        match &self.data {
            Data::Calendar { used, .. } | Data::Lifetime { used } => *used,
            Data::Rolling(r) => r.total,
        }
    }

    /// Add `delta` (already checked not to overflow).
    fn add(&mut self, delta: u64) {
        match &mut self.data {
            Data::Calendar { used, .. } | Data::Lifetime { used } => *used += delta,
            Data::Rolling(r) => r.add(delta),
        }
    }

    fn matches(&self, meter: &str, window: Window) -> bool {
        self.window == window && &*self.meter == meter
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
    // Past the maximum with this delta: for a zero delta, a counter that
    // `Force` already took past it.
    let over = max.is_some_and(|m| u128::from(used) + u128::from(delta) > u128::from(m));
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
                Some(m) if over && delta <= m => Some(next),
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
                (Some(m), Some(r)) if over => r.available_at(delta, m),
                _ => None,
            };
            (Some(start), resets, avail)
        }
        Window::Lifetime => (None, None, None),
    };
    CounterState {
        used,
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

/// Contract rule 1: valid windows, each counter at most once.
fn validate(ops: &[super::CounterOp<'_>]) -> Result<(), Error> {
    for (i, op) in ops.iter().enumerate() {
        op.window.validate().map_err(|reason| Error::InvalidBatch {
            reason: format!("ops[{i}]: {reason}"),
        })?;
        if ops[..i]
            .iter()
            .any(|o| o.window == op.window && o.meter == op.meter && o.scope == op.scope)
        {
            return Err(Error::InvalidBatch {
                reason: format!(
                    "ops[{i}]: counter {} {} {} named twice",
                    op.scope, op.meter, op.window
                ),
            });
        }
    }
    Ok(())
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
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
            batches: AtomicU64::new(0),
        }
    }

    fn shard_of(&self, scope: &ScopeKey) -> usize {
        let mut h = DefaultHasher::new();
        scope.hash(&mut h);
        (h.finish() % self.shards.len() as u64) as usize
    }

    /// Remove every counter that reads zero at `now`, and every scope left
    /// with no counters. Returns how many counters were removed.
    ///
    /// Pass the engine's current time: a `now` in the future ends periods
    /// early and drops usage that still counts.
    pub fn reclaim(&self, now: DateTime<Utc>) -> usize {
        (0..self.shards.len())
            .map(|i| Self::sweep(&mut self.shards[i].lock(), now.timestamp_millis()))
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
                let keep = c.used() > 0;
                removed += usize::from(!keep);
                keep
            });
            !counters.is_empty()
        });
        removed
    }
}

impl AllowanceStore for MemoryStore {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now.timestamp_millis();
        let ops = batch.ops;
        validate(ops)?;

        // Lock every shard the batch touches, in ascending order.
        let mut shard_ids: Vec<usize> = ops.iter().map(|op| self.shard_of(op.scope)).collect();
        let mut order = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<MutexGuard<'_, Shard>> =
            order.iter().map(|&i| self.shards[i].lock()).collect();
        for id in &mut shard_ids {
            // Position of this op's shard among the held guards.
            *id = order.binary_search(id).unwrap_or(0);
        }

        // Phase 1: roll every named counter to now, and decide.
        let mut all_fit = true;
        for (op, &g) in ops.iter().zip(&shard_ids) {
            let used = match guards[g].scopes.get_mut(op.scope) {
                Some(counters) => {
                    match counters.iter_mut().find(|c| c.matches(op.meter, op.window)) {
                        Some(c) => {
                            c.advance(now_ms);
                            c.used()
                        }
                        None => 0,
                    }
                }
                None => 0,
            };
            // Past u64: an error where the delta would be added regardless
            // (Force, or no maximum); elsewhere it simply does not fit.
            if used.checked_add(op.delta).is_none()
                && (batch.mode == Mode::Force || op.max.is_none())
            {
                return Err(Error::Overflow {
                    meter: op.meter.to_owned(),
                });
            }
            all_fit &= fits(used, op.delta, op.max);
        }
        let applied = match batch.mode {
            Mode::Check => false,
            Mode::WithinLimits => all_fit,
            Mode::Force => true,
        };

        // Phase 2: apply every delta, or none.
        if applied {
            for (op, &g) in ops.iter().zip(&shard_ids) {
                if op.delta == 0 {
                    continue;
                }
                let scopes = &mut guards[g].scopes;
                // Clone the key only when the scope is new.
                if !scopes.contains_key(op.scope) {
                    scopes.insert(op.scope.clone(), Vec::new());
                }
                let Some(counters) = scopes.get_mut(op.scope) else {
                    continue;
                };
                let idx = match counters.iter().position(|c| c.matches(op.meter, op.window)) {
                    Some(i) => i,
                    None => {
                        counters.push(Counter::new(op.meter, op.window, now_ms));
                        counters.len() - 1
                    }
                };
                counters[idx].add(op.delta);
            }
        }

        // Phase 3: report.
        let counters = ops
            .iter()
            .zip(&shard_ids)
            .map(|(op, &g)| {
                let counter = guards[g]
                    .scopes
                    .get(op.scope)
                    .and_then(|cs| cs.iter().find(|c| c.matches(op.meter, op.window)));
                // When applied, the delta is already in `used`; ask about a
                // zero delta so `available_at` is not set for a fitting op.
                let delta = if applied { 0 } else { op.delta };
                state_of(counter, op.window, now_ms, delta, op.max)
            })
            .collect();
        drop(guards);

        let n = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        if n % SWEEP_EVERY == 0 {
            let i = ((n / SWEEP_EVERY) % self.shards.len() as u64) as usize;
            Self::sweep(&mut self.shards[i].lock(), now_ms);
        }
        Ok(Applied { applied, counters })
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
        let run = |delta, mode, now| {
            store
                .apply(&Batch {
                    ops: &[op(delta)],
                    mode,
                    now,
                })
                .unwrap()
        };
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
            .apply(&Batch {
                ops: &ops,
                mode: Mode::WithinLimits,
                now: at(0),
            })
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
            .apply(&Batch {
                ops: &[op(u64::MAX - 1)],
                mode: Mode::Force,
                now: at(0),
            })
            .unwrap();
        let err = store
            .apply(&Batch {
                ops: &[op(2)],
                mode: Mode::Force,
                now: at(0),
            })
            .unwrap_err();
        assert!(matches!(err, Error::Overflow { .. }));
        let r = store
            .apply(&Batch {
                ops: &[op(0)],
                mode: Mode::Check,
                now: at(0),
            })
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
            .apply(&Batch {
                ops: &twice,
                mode: Mode::WithinLimits,
                now: at(0),
            })
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
                .apply(&Batch {
                    ops: &[op, bad],
                    mode: Mode::Force,
                    now: at(0),
                })
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
            .apply(&Batch {
                ops: &[op(10)],
                mode: Mode::Force,
                now: feb,
            })
            .unwrap();
        let jan = Utc.with_ymd_and_hms(2026, 1, 20, 0, 0, 0).unwrap();
        let s = store
            .apply(&Batch {
                ops: &[op(0)],
                mode: Mode::Check,
                now: jan,
            })
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
            let batch = Batch {
                ops: &[op(&s)],
                mode: Mode::Force,
                now: at(0),
            };
            store.apply(&batch).unwrap();
        }
        // The next day, one busy subject keeps working; yesterday's 100 are idle.
        let busy = ScopeKey::subject("busy");
        let tomorrow = at(0) + chrono::Duration::days(1);
        for _ in 0..2 * SWEEP_EVERY {
            let batch = Batch {
                ops: &[op(&busy)],
                mode: Mode::Force,
                now: tomorrow,
            };
            store.apply(&batch).unwrap();
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
                .apply(&Batch {
                    ops: &[CounterOp {
                        scope: &s,
                        meter: "t",
                        window: w,
                        delta: 1,
                        max: None,
                    }],
                    mode: Mode::Force,
                    now: at(0),
                })
                .unwrap();
        }
        assert_eq!(store.counter_count(), 100);
        assert_eq!(store.reclaim(at(23)), 0, "today's usage stays");
        assert_eq!(store.reclaim(at(0) + chrono::Duration::days(1)), 100);
        assert_eq!(store.counter_count(), 0);
    }
}
