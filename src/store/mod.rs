//! The storage seam: [`AllowanceStore`], the one trait a backend implements.
//!
//! A store knows counters, not plans. The engine turns a request into a
//! [`Batch`] of [`CounterOp`]s — one per limit per scope the request touches —
//! and the store applies the whole batch atomically in one call.
//!
//! # Contract
//!
//! An implementation of [`AllowanceStore::apply`] must:
//!
//! 1. **Identify a counter** by `(scope, meter, window)`. A counter that does
//!    not exist reads as zero. Refuse with [`Error::InvalidBatch`], changing
//!    nothing, a batch that names a counter twice or has an invalid window
//!    (a rolling window with no buckets, a span not divisible into them).
//! 2. **Roll windows at `batch.now`** (or at a clock the backend documents):
//!    a [`Window::Calendar`] counter reads zero once `now` is past the period
//!    it was written in; a [`Window::Rolling`] counter keeps `buckets + 1`
//!    integer buckets of width `span / buckets` aligned to the Unix epoch,
//!    so usage written in bucket `[b, b + width)` leaves at
//!    `b + width + span` (never early, at most one bucket late); a
//!    [`Window::Lifetime`] counter never rolls.
//! 3. **Decide all or nothing** by `batch.mode`: an op *fits* when its delta is
//!    zero, its `max` is `None`, or `used + delta <= max`.
//!    - [`Mode::Check`]: change nothing; `applied` is `false`.
//!    - [`Mode::WithinLimits`]: if every op fits, add every delta; otherwise
//!      add none. `applied` says which.
//!    - [`Mode::Force`]: add every delta; `applied` is `true`.
//! 4. **Never wrap**: an op whose `used + delta` does not fit a `u64` does
//!    not fit its maximum, if it has one; in [`Mode::Force`], or with no
//!    maximum, return [`Error::Overflow`] and change nothing. `Check` answers
//!    exactly as `WithinLimits` would.
//! 5. **Be atomic**: no other batch observes or interleaves with a partly
//!    applied batch. One Lua script, one SQL transaction, or locks held over
//!    the whole batch.
//! 6. **Return one [`CounterState`] per op, in order**, as of after the batch.
//!
//! Policy — statuses, warning ratios, prices, allowlists — stays in the
//! engine, so a backend stays small.

mod memory;

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub use memory::MemoryStore;

use crate::window::Window;
use crate::Error;

/// Whose counter it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    /// A subject: an agent, user, API key or account bound to a plan.
    Subject,
    /// A shared pool: an account pool, a model's global budget.
    Pool,
}

/// A scope: the owner of a set of counters. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey {
    kind: ScopeKind,
    id: Arc<str>,
}

impl ScopeKey {
    /// The scope of a subject.
    pub fn subject(id: impl Into<Arc<str>>) -> Self {
        Self {
            kind: ScopeKind::Subject,
            id: id.into(),
        }
    }

    /// The scope of a pool.
    pub fn pool(id: impl Into<Arc<str>>) -> Self {
        Self {
            kind: ScopeKind::Pool,
            id: id.into(),
        }
    }

    /// Subject or pool.
    pub fn kind(&self) -> ScopeKind {
        self.kind
    }

    /// The subject's or pool's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScopeKind::Subject => write!(f, "subject:{}", self.id),
            ScopeKind::Pool => write!(f, "pool:{}", self.id),
        }
    }
}

/// How a batch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Read only: report the counters, change nothing.
    Check,
    /// All or nothing: add every delta only if every op fits its maximum.
    WithinLimits,
    /// Add every delta whatever the maximum (usage that already happened).
    Force,
}

/// One counter's part in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CounterOp<'a> {
    /// Whose counter.
    pub scope: &'a ScopeKey,
    /// Which meter.
    pub meter: &'a str,
    /// Over which window.
    pub window: Window,
    /// Amount to add, in the meter's smallest unit.
    pub delta: u64,
    /// The maximum in the meter's smallest unit; `None` is unlimited.
    pub max: Option<u64>,
}

/// A set of counter operations applied as one atomic step.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Batch<'a> {
    /// The operations; each counter appears at most once.
    pub ops: &'a [CounterOp<'a>],
    /// How to apply them.
    pub mode: Mode,
    /// The engine's clock reading for this decision.
    pub now: DateTime<Utc>,
}

/// A counter as it stands after a batch.
///
/// A backend builds one with `CounterState::default()` and sets the fields
/// it knows; fields added later default to "nothing to report".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CounterState {
    /// Usage counted in the window now: after the batch if it was applied,
    /// the current usage otherwise.
    pub used: u64,
    /// Start of the current period (calendar), `now - span` (rolling), or
    /// `None` (lifetime).
    pub period_start: Option<DateTime<Utc>>,
    /// When usage next leaves: the next period start (calendar), when the
    /// oldest counted bucket leaves (rolling, `None` if empty), `None`
    /// (lifetime).
    pub resets_at: Option<DateTime<Utc>>,
    /// Set only when `used + delta` is past the maximum (for an applied
    /// batch, `delta` counts as 0, so this is a counter `Force` took past its
    /// maximum): the earliest time at which it would not be, if nothing else
    /// were added. `None` there means waiting never helps (a lifetime
    /// counter, or a delta above the maximum).
    pub available_at: Option<DateTime<Utc>>,
}

/// The outcome of [`AllowanceStore::apply`]. Build it with
/// `Applied::default()` and set its fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Applied {
    /// Whether the deltas were added.
    pub applied: bool,
    /// One state per op, in the batch's order.
    pub counters: Vec<CounterState>,
}

impl<'a> CounterOp<'a> {
    /// An op adding `delta` to `(scope, meter, window)` with maximum `max`.
    pub fn new(
        scope: &'a ScopeKey,
        meter: &'a str,
        window: Window,
        delta: u64,
        max: Option<u64>,
    ) -> Self {
        Self {
            scope,
            meter,
            window,
            delta,
            max,
        }
    }
}

impl<'a> Batch<'a> {
    /// A batch of `ops` applied in `mode` at `now`.
    pub fn new(ops: &'a [CounterOp<'a>], mode: Mode, now: DateTime<Utc>) -> Self {
        Self { ops, mode, now }
    }
}

/// The storage seam. See the [module docs](self) for the contract.
pub trait AllowanceStore: Send + Sync {
    /// Apply `batch` atomically and report every counter it names.
    ///
    /// # Errors
    /// [`Error::Overflow`] if a counter would pass `u64::MAX` (contract rule
    /// 4), [`Error::InvalidBatch`] for a malformed batch (rule 1) — nothing
    /// changes in either case; [`Error::Store`] if the backend fails.
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error>;
}

impl<T: AllowanceStore + ?Sized> AllowanceStore for Arc<T> {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        (**self).apply(batch)
    }
}

/// Whether an op with this usage fits (contract rule 3).
pub(crate) fn fits(used: u64, delta: u64, max: Option<u64>) -> bool {
    delta == 0
        || match max {
            None => true,
            Some(m) => used.checked_add(delta).is_some_and(|t| t <= m),
        }
}
