//! Counters in memory: calendar periods, rolling rings, lifetime totals.

use super::keys::KeyId;
use crate::window::Window;

/// A counter in memory: 24 bytes, with its key and the one-byte variant tag
/// sharing the first word. The window lives in the shard's [`Keys`](super::keys::Keys); a
/// rolling counter's buckets in one allocation (see [`Ring`]); holds in
/// [`Shard::holds`](super::shard::Shard::holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Counter {
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
pub(super) const RING_HEADER: usize = 2;

/// A rolling window over a counter's buffer: `n` buckets of `width_ms`, the
/// newest at bucket index `head` (word 0), their running `total` (word 1),
/// and the oldest bucket still holding usage (when `total > 0`) at `tail =
/// head - back` (`back < n`, so it fits the counter's spare four bytes);
/// bucket `b` is slot `b mod n`. The tail is kept as buckets leave, so no
/// read walks every bucket.
pub(super) struct Ring<B> {
    pub(super) width_ms: i64,
    pub(super) back: u32,
    pub(super) buf: B,
}

impl<B: AsRef<[u64]>> Ring<B> {
    pub(super) fn words(&self) -> &[u64] {
        self.buf.as_ref()
    }

    pub(super) fn head(&self) -> i64 {
        self.words()[0] as i64
    }

    pub(super) fn tail(&self) -> i64 {
        self.head() - i64::from(self.back)
    }

    pub(super) fn total(&self) -> u64 {
        self.words()[1]
    }

    pub(super) fn n(&self) -> i64 {
        (self.words().len() - RING_HEADER) as i64
    }

    /// The buffer index of bucket `bucket`.
    pub(super) fn slot(&self, bucket: i64) -> usize {
        RING_HEADER + bucket.rem_euclid(self.n()) as usize
    }

    /// Time a bucket's usage leaves: the start of bucket `b + n`.
    pub(super) fn leaves_at(&self, bucket: i64) -> i64 {
        (bucket + self.n()).saturating_mul(self.width_ms)
    }

    pub(super) fn oldest_bucket(&self) -> i64 {
        self.head() - self.n() + 1
    }

    pub(super) fn resets_at(&self) -> Option<i64> {
        self.resets_at_in(self.tail(), self.total())
    }

    /// [`Ring::resets_at`] of a ring whose tail and total are `tail` and
    /// `total` (its [`Ring::view`]).
    pub(super) fn resets_at_in(&self, tail: i64, total: u64) -> Option<i64> {
        (total > 0).then(|| self.leaves_at(tail))
    }

    /// Earliest time `total - left + delta <= max`, if `delta <= max`.
    pub(super) fn available_at(&self, delta: u64, max: u64) -> Option<i64> {
        self.available_at_in(self.tail(), self.total(), delta, max)
    }

    /// [`Ring::available_at`] of a ring whose tail and total are `tail` and
    /// `total` (its [`Ring::view`]).
    pub(super) fn available_at_in(
        &self,
        tail: i64,
        total: u64,
        delta: u64,
        max: u64,
    ) -> Option<i64> {
        if delta > max {
            return None;
        }
        let need = (u128::from(total) + u128::from(delta)).saturating_sub(u128::from(max));
        let mut freed = 0u128;
        for b in tail..=self.head() {
            freed += u128::from(self.words()[self.slot(b)]);
            if freed >= need {
                return Some(self.leaves_at(b));
            }
        }
        None
    }
}

impl<B: AsRef<[u64]>> Ring<B> {
    /// The tail and total the ring would have once advanced to `now_ms`
    /// (see [`Ring::advance`]), read without changing it. The buckets a
    /// roll would keep are those from the tail (or the oldest bucket still
    /// in the window at `now_ms`) to the head; a roll adds only empty ones.
    pub(super) fn view(&self, now_ms: i64) -> (i64, u64) {
        let cur = now_ms.div_euclid(self.width_ms);
        if cur <= self.head() || self.total() == 0 {
            return (self.tail(), self.total());
        }
        let oldest = cur - self.n() + 1;
        let (mut tail, mut total) = (None, 0);
        for b in self.tail().max(oldest)..=self.head() {
            let v = self.words()[self.slot(b)];
            if v > 0 {
                tail.get_or_insert(b);
                total += v;
            }
        }
        (tail.unwrap_or(cur), total)
    }
}

impl<B: AsRef<[u64]> + AsMut<[u64]>> Ring<B> {
    pub(super) fn set(&mut self, i: usize, v: u64) {
        self.buf.as_mut()[i] = v;
    }

    /// Drop the buckets that have left by `now_ms`.
    pub(super) fn advance(&mut self, now_ms: i64) {
        let cur = now_ms.div_euclid(self.width_ms);
        let head = self.head();
        if cur <= head {
            // Same bucket, or a clock that stepped back: keep writing to
            // head, whose usage must not leave early; an empty ring has
            // nothing to keep there and follows the clock.
            if cur < head && self.total() == 0 {
                self.back = 0;
                self.set(0, cur as u64);
            }
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
    pub(super) fn add(&mut self, delta: u64) {
        if self.total() == 0 {
            self.back = 0;
        }
        let i = self.slot(self.head());
        self.set(i, self.words()[i] + delta);
        self.set(1, self.total() + delta);
    }
}

/// A calendar period a counter closed with usage in it: `[start, end)` and
/// its total (contract rule 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed {
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) used: u64,
}

/// The bucket width of a window (0 for any but a rolling one).
pub(super) fn width_of(window: Window) -> i64 {
    match window {
        Window::Rolling { span_secs, buckets } => Window::bucket_ms(span_secs, buckets),
        _ => 0,
    }
}

/// The length of a calendar period as a counter keeps it. Every period is at
/// most 31 days (2.7e9 ms < `u32::MAX`).
pub(super) fn period_len(start: i64, end: i64) -> u32 {
    u32::try_from(end.saturating_sub(start)).unwrap_or(u32::MAX)
}

impl Counter {
    pub(super) fn new(key: KeyId, window: Window, now_ms: i64) -> Self {
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

    pub(super) fn key(&self) -> KeyId {
        match *self {
            Counter::Calendar { key, .. }
            | Counter::Rolling { key, .. }
            | Counter::Lifetime { key, .. }
            | Counter::Concurrent { key } => key,
        }
    }

    pub(super) fn set_key(&mut self, to: KeyId) {
        match self {
            Counter::Calendar { key, .. }
            | Counter::Rolling { key, .. }
            | Counter::Lifetime { key, .. }
            | Counter::Concurrent { key } => *key = to,
        }
    }

    /// Whether rolling the counter (of `window`) to `now_ms` would change
    /// nothing: the usual answer, inlined. A calendar counter within its
    /// period (or holding usage of a later one, after a clock step back), a
    /// rolling one within its head bucket (or holding usage in a later one),
    /// a lifetime or concurrent counter.
    #[inline]
    pub(super) fn current(&self, window: Window, now_ms: i64) -> bool {
        match *self {
            Counter::Calendar {
                len_ms,
                start,
                used,
                ..
            } => now_ms < start.saturating_add(i64::from(len_ms)) && (now_ms >= start || used > 0),
            // `Ring::advance` would change nothing: the head bucket is
            // current, or later (a clock step back) and holds usage.
            Counter::Rolling { ref buf, .. } => {
                let (cur, head) = (now_ms.div_euclid(width_of(window)), buf[0] as i64);
                cur == head || (cur < head && buf[1] > 0)
            }
            Counter::Lifetime { .. } | Counter::Concurrent { .. } => true,
        }
    }

    /// Roll the counter (of `window`) forward to `now_ms`: only for a batch
    /// that applies (contract rule 2); others read [`Counter::used_at`].
    /// Returns the period a calendar counter closed with usage in it, for
    /// the shard's history (contract rule 11).
    #[inline]
    #[must_use]
    pub(super) fn advance(&mut self, window: Window, now_ms: i64) -> Option<Closed> {
        if self.current(window, now_ms) {
            None
        } else {
            self.roll(window, now_ms)
        }
    }

    /// The period a calendar counter holding usage has closed by `now_ms`
    /// (read, not rolled: a sweep about to drop it keeps its total).
    pub(super) fn closed_by(&self, now_ms: i64) -> Option<Closed> {
        match *self {
            Counter::Calendar {
                len_ms,
                start,
                used,
                ..
            } if used > 0 && now_ms >= start.saturating_add(i64::from(len_ms)) => Some(Closed {
                start,
                end: start.saturating_add(i64::from(len_ms)),
                used,
            }),
            _ => None,
        }
    }

    /// The usage the counter reads at `now_ms`, rolled or not; changes
    /// nothing.
    #[inline]
    pub(super) fn used_now(&self, window: Window, now_ms: i64) -> u64 {
        if self.current(window, now_ms) {
            self.used()
        } else {
            self.used_at(window, now_ms)
        }
    }

    /// The usage the counter would read once rolled to `now_ms`, for one
    /// that is not [`Counter::current`]; changes nothing.
    #[cold]
    #[inline(never)]
    pub(super) fn used_at(&self, window: Window, now_ms: i64) -> u64 {
        match self {
            // Not current: its period has ended (or it is empty).
            Counter::Calendar { .. } => 0,
            Counter::Rolling { back, buf, .. } => {
                Ring {
                    width_ms: width_of(window),
                    back: *back,
                    buf: &**buf,
                }
                .view(now_ms)
                .1
            }
            _ => self.used(),
        }
    }

    #[inline(never)]
    #[must_use]
    pub(super) fn roll(&mut self, window: Window, now_ms: i64) -> Option<Closed> {
        let closed = self.closed_by(now_ms);
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
        closed
    }

    /// A calendar counter's period start and usage, as kept (not rolled).
    pub(super) fn calendar_period(&self) -> Option<(i64, u64)> {
        match *self {
            Counter::Calendar { start, used, .. } => Some((start, used)),
            _ => None,
        }
    }

    pub(super) fn used(&self) -> u64 {
        match self {
            Counter::Calendar { used, .. } | Counter::Lifetime { used, .. } => *used,
            Counter::Rolling { buf, .. } => buf[1],
            Counter::Concurrent { .. } => 0,
        }
    }

    /// Add `delta` to usage (already checked not to overflow; the counter
    /// already rolled to now). A concurrent counter has no usage (the batch
    /// was validated not to add any).
    #[inline]
    pub(super) fn add(&mut self, window: Window, delta: u64) {
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
}
