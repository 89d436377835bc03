//! The storage seam: [`AllowanceStore`], the one trait a backend implements.
//!
//! A store knows counters, not plans. The engine turns a request into a
//! [`Batch`] of [`CounterOp`]s — one per limit per scope the request touches —
//! and the store applies the whole batch atomically in one call. A batch may
//! also carry a [`LeaseOp`] (a reservation's holds), an [`EventKey`] (an
//! idempotency key) and [`CooldownOp`]s (a scope blocked after a failure):
//! all of it is one atomic step.
//!
//! # Contract
//!
//! An implementation of [`AllowanceStore::apply`] must:
//!
//! 1. **Identify a counter** by `(scope, meter, window)`. A counter that does
//!    not exist reads as zero. Refuse with [`Error::InvalidBatch`], changing
//!    nothing, a batch that names a counter twice, has an invalid window
//!    (a rolling window with no buckets, a span not divisible into them), or
//!    pairs a lease action with the wrong mode (see rule 7).
//! 2. **Roll windows at `batch.now`** (or at a clock the backend documents):
//!    a [`Window::Calendar`] counter reads zero once `now` is past the period
//!    it was written in; a [`Window::Rolling`] counter keeps `buckets + 1`
//!    integer buckets of width `span / buckets` aligned to the Unix epoch,
//!    so usage written in bucket `[b, b + width)` leaves at
//!    `b + width + span` (never early, at most one bucket late); a
//!    [`Window::Lifetime`] counter never rolls; a [`Window::Concurrent`]
//!    counter never has usage, only holds. `now` may step back (a clock set
//!    back, replicas whose clocks disagree), and a backward step never frees
//!    usage a forward batch counted:
//!    - *Only a batch that applies writes a roll.* A counter (and its
//!      expired holds, rule 7) is rolled to `now` only by a batch that
//!      applies ([`Mode::WithinLimits`] that fits, or [`Mode::Force`]),
//!      which rolls every counter it names. A [`Mode::Check`], a refused
//!      batch and a batch that returns an error read each counter as rolling
//!      would leave it, and change nothing: a read at a later `now`, then a
//!      step back, finds the usage where it was.
//!    - *A counter's time never goes back.* When `now` is earlier than the
//!      period (calendar) or newest bucket (rolling) a counter holding usage
//!      was last rolled to, the counter keeps that period or bucket and its
//!      usage counts; usage added then joins that later period or bucket (so
//!      it leaves late, never early). A counter holding no usage has nothing
//!      to keep and follows `now`.
//!
//!    A backend that rolls on its own clock follows that clock instead:
//!    `RedisStore` (feature `redis`) with `TimeSource::Server` takes `now`
//!    from Redis's `TIME`, so the engine's clock stepping back changes
//!    nothing there, and a step back of the server's own clock is met by
//!    the same two rules.
//! 3. **Decide all or nothing** by `batch.mode`: an op *fits* when its delta is
//!    zero, its `max` is `None`, or `used + held + delta <= max`, where
//!    `held` is the sum of the counter's live holds (rule 7).
//!    - [`Mode::Check`]: change nothing; `applied` is `false`.
//!    - [`Mode::WithinLimits`]: if every op fits and no listed cooldown is
//!      running (rule 9), apply the batch; otherwise change nothing.
//!      `applied` says which.
//!    - [`Mode::Force`]: apply the batch; `applied` is `true`.
//! 4. **Never wrap**: an op whose `used + delta` (or `held + delta` for a
//!    hold) does not fit a `u64` does not fit its maximum, if it has one; in
//!    [`Mode::Force`], or with no maximum, return [`Error::Overflow`] and
//!    change nothing. `Check` answers exactly as `WithinLimits` would.
//! 5. **Be atomic**: no other batch observes or interleaves with a partly
//!    applied batch. One Lua script, one SQL transaction, or locks held over
//!    the whole batch.
//! 6. **Return one [`CounterState`] per op, in order**, as of after the batch.
//! 7. **Keep leases** ([`LeaseOp`]). A hold counts toward `held` on its
//!    counter while `now < expires_at`; from `expires_at` on it is gone, with
//!    nothing charged, as if it had never been (a lazy sweep is fine, but no
//!    batch at or after `expires_at` may see it). Actions:
//!    - [`LeaseAction::Open`] (mode `WithinLimits` or `Check`): the deltas
//!      become holds of a new lease instead of usage. An id already known is
//!      [`Error::InvalidBatch`].
//!    - [`LeaseAction::Renew`] (no ops): move the lease's expiry, for every
//!      hold.
//!    - [`LeaseAction::Grow`] (`WithinLimits` or `Force`): the deltas are
//!      added to the lease's holds.
//!    - [`LeaseAction::Settle`] (`Force`): every hold of the lease is removed
//!      and `keep.ceil_of(hold)` of it is added to the counter's usage
//!      (nothing for a `Concurrent` counter); then the ops' deltas are added
//!      as usage. [`Applied::settled`] lists each hold and its charge.
//!
//!    A lease op on an id never opened (or opened for another owner) is
//!    [`Error::UnknownReservation`]; on a settled lease,
//!    [`Error::ReservationSettled`]; at or after its expiry,
//!    [`Error::ReservationExpired`]. A backend may forget a lease some time
//!    after it settled or expired; it then reads as unknown.
//! 8. **Apply an event once** ([`EventKey`]): if the ledger holds the id from
//!    a batch that applied less than the backend's horizon ago, return that
//!    batch's [`Applied`] with [`Applied::replayed_at`] set to its `now`,
//!    changing nothing — or [`Error::EventConflict`] if the fingerprint
//!    differs. The fingerprint compared is the event's together with the
//!    batch's lease owner ([`event_fingerprint`]), so a replay never answers
//!    another owner's settlement. Otherwise run the batch; if it applied, remember it under the
//!    id. The ledger is consulted before lease state, so a retried commit
//!    replays instead of failing as settled.
//! 9. **Keep cooldowns** ([`CooldownOp`]): in `Check` and `WithinLimits`, a
//!    listed scope whose cooldown runs past `now` makes the batch not fit.
//!    When the batch applies, a `start_until` extends the scope's cooldown
//!    to at least that time. [`Applied::cooldowns`] reports each listed
//!    scope's cooldown end if it is still running after the batch.
//!
//! Policy — statuses, warning ratios, prices, allowlists, refund shares,
//! fingerprints — stays in the engine, so a backend stays small.

#[cfg(feature = "async")]
mod async_store;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod validate;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisConfig, RedisStore, TimeSource};
#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
pub use async_store::{AsyncAllowanceStore, FailurePolicy};
pub use memory::{MemoryStore, Snapshot};

// The model's types a batch names, kept at their `store::` paths.
pub use crate::model::lease::{Fraction, LeaseId};
pub(crate) use crate::model::scope::ScopeMap;
pub use crate::model::scope::{ScopeKey, ScopeKind};

use crate::window::Window;
use crate::Error;

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

/// What a batch does to a lease (contract rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseAction {
    /// Open the lease: the ops' deltas become its holds.
    Open {
        /// The holds count until this instant unless renewed.
        expires_at: DateTime<Utc>,
        /// When the work is overdue (a maximum job duration); reported by
        /// [`AllowanceStore::overdue`].
        deadline: Option<DateTime<Utc>>,
    },
    /// Move the lease's expiry.
    Renew {
        /// The new expiry.
        expires_at: DateTime<Utc>,
    },
    /// Add the ops' deltas to the lease's holds.
    Grow,
    /// Remove every hold, keep `keep` of each as usage, then add the ops'
    /// deltas as usage. The lease is settled.
    Settle {
        /// The share of each hold charged as usage.
        keep: Fraction,
    },
}

/// A batch's lease: which one, whose, and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseOp<'a> {
    /// The lease.
    pub id: LeaseId,
    /// The subject that owns it; a lease op naming another owner is
    /// [`Error::UnknownReservation`].
    pub owner: &'a ScopeKey,
    /// What to do.
    pub action: LeaseAction,
}

impl<'a> LeaseOp<'a> {
    /// A lease op.
    pub fn new(id: LeaseId, owner: &'a ScopeKey, action: LeaseAction) -> Self {
        Self { id, owner, action }
    }
}

/// An idempotency key (contract rule 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventKey<'a> {
    /// The caller's event id.
    pub id: &'a str,
    /// A digest of what the event does; a replay with another fingerprint is
    /// [`Error::EventConflict`].
    pub fingerprint: u64,
}

impl<'a> EventKey<'a> {
    /// An event key.
    pub fn new(id: &'a str, fingerprint: u64) -> Self {
        Self { id, fingerprint }
    }
}

/// A scope's cooldown in a batch (contract rule 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CooldownOp<'a> {
    /// The scope.
    pub scope: &'a ScopeKey,
    /// When set and the batch applies: the scope cools down until at least
    /// this instant.
    pub start_until: Option<DateTime<Utc>>,
}

impl<'a> CooldownOp<'a> {
    /// Check (and with `start_until`, start) a scope's cooldown.
    pub fn new(scope: &'a ScopeKey, start_until: Option<DateTime<Utc>>) -> Self {
        Self { scope, start_until }
    }
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
    /// A reservation's lease, if the batch is part of one.
    pub lease: Option<LeaseOp<'a>>,
    /// An idempotency key, if the caller gave one.
    pub event: Option<EventKey<'a>>,
    /// Cooldowns to check, and to start when the batch applies.
    pub cooldowns: &'a [CooldownOp<'a>],
}

/// A counter as it stands after a batch.
///
/// A backend builds one with `CounterState::default()` and sets the fields
/// it knows; fields added later default to "nothing to report".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CounterState {
    /// Usage counted in the window now: after the batch if it was applied,
    /// the current usage otherwise. Holds are not usage.
    pub used: u64,
    /// Sum of the counter's live holds (in-flight reservations), after the
    /// batch if it was applied.
    #[serde(default)]
    pub held: u64,
    /// Start of the current period (calendar), `now - span` (rolling), or
    /// `None` (lifetime, concurrent).
    pub period_start: Option<DateTime<Utc>>,
    /// When usage next leaves: the next period start (calendar), when the
    /// oldest counted bucket leaves (rolling, `None` if empty), `None`
    /// (lifetime, concurrent).
    pub resets_at: Option<DateTime<Utc>>,
    /// Set only when `used + held + delta` is past the maximum (for an
    /// applied batch, `delta` counts as 0): the earliest time at which it
    /// would not be, if nothing else were added and every hold stayed.
    /// `None` there means waiting for the window never helps (a lifetime or
    /// concurrent counter, or `held + delta` above the maximum).
    pub available_at: Option<DateTime<Utc>>,
}

/// One hold removed by [`LeaseAction::Settle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SettledHold {
    /// Whose counter.
    pub scope: ScopeKey,
    /// Which meter.
    pub meter: Arc<str>,
    /// Over which window.
    pub window: Window,
    /// The amount the lease held there.
    pub held: u64,
    /// The part of it charged as usage.
    pub charged: u64,
}

impl SettledHold {
    /// A settled hold.
    pub fn new(scope: ScopeKey, meter: Arc<str>, window: Window, held: u64, charged: u64) -> Self {
        Self {
            scope,
            meter,
            window,
            held,
            charged,
        }
    }
}

/// The outcome of [`AllowanceStore::apply`]. Build it with
/// `Applied::default()` and set its fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Applied {
    /// Whether the batch was applied.
    pub applied: bool,
    /// One state per op, in the batch's order.
    pub counters: Vec<CounterState>,
    /// For [`LeaseAction::Settle`]: every hold the lease had, and its charge.
    #[serde(default)]
    pub settled: Vec<SettledHold>,
    /// One entry per [`CooldownOp`], in order: when its scope's cooldown
    /// ends, if it runs past `now` after the batch.
    #[serde(default)]
    pub cooldowns: Vec<Option<DateTime<Utc>>>,
    /// Set when the batch's event id was already applied: the `now` of that
    /// first batch, whose answer this is. Nothing changed.
    #[serde(default)]
    pub replayed_at: Option<DateTime<Utc>>,
}

/// A live lease past its deadline, as [`AllowanceStore::overdue`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The lease.
    pub id: LeaseId,
    /// The subject that owns it.
    pub owner: ScopeKey,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// When its holds return unless renewed.
    pub expires_at: DateTime<Utc>,
    /// When the work became overdue.
    pub deadline: Option<DateTime<Utc>>,
}

impl LeaseInfo {
    /// A lease's description.
    pub fn new(
        id: LeaseId,
        owner: ScopeKey,
        opened_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        deadline: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            id,
            owner,
            opened_at,
            expires_at,
            deadline,
        }
    }
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
    /// A batch of `ops` applied in `mode` at `now`, with no lease, event or
    /// cooldown.
    pub fn new(ops: &'a [CounterOp<'a>], mode: Mode, now: DateTime<Utc>) -> Self {
        Self {
            ops,
            mode,
            now,
            lease: None,
            event: None,
            cooldowns: &[],
        }
    }

    /// The same batch as part of a lease.
    #[must_use]
    pub fn with_lease(mut self, lease: LeaseOp<'a>) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The same batch under an idempotency key.
    #[must_use]
    pub fn with_event(mut self, event: EventKey<'a>) -> Self {
        self.event = Some(event);
        self
    }

    /// The same batch checking (and starting) cooldowns.
    #[must_use]
    pub fn with_cooldowns(mut self, cooldowns: &'a [CooldownOp<'a>]) -> Self {
        self.cooldowns = cooldowns;
        self
    }
}

/// The storage seam. See the [module docs](self) for the contract.
pub trait AllowanceStore: Send + Sync {
    /// Apply `batch` atomically and report every counter it names.
    ///
    /// # Errors
    /// [`Error::Overflow`] if a counter would pass `u64::MAX` (contract rule
    /// 4), [`Error::InvalidBatch`] for a malformed batch (rules 1 and 7),
    /// [`Error::UnknownReservation`], [`Error::ReservationSettled`] or
    /// [`Error::ReservationExpired`] for a lease op on a lease that cannot
    /// take it (rule 7), [`Error::EventConflict`] for an event id reused with
    /// another fingerprint (rule 8) — nothing changes in any of these cases;
    /// [`Error::Store`] if the backend fails.
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error>;

    /// Live leases whose deadline is at or before `now` (work past its
    /// maximum duration), oldest deadline first.
    ///
    /// # Errors
    /// [`Error::Store`] if the backend fails.
    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error>;
}

impl<T: AllowanceStore + ?Sized> AllowanceStore for Arc<T> {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        (**self).apply(batch)
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        (**self).overdue(now)
    }
}

/// The fingerprint a store keeps and compares for `batch`'s event (contract
/// rule 8): the event's own, mixed with the lease owner's kind and id when
/// the batch has a lease. Stable across processes (FNV-1a), so ledgers in
/// snapshots and shared backends agree. `None` without an event.
pub fn event_fingerprint(batch: &Batch<'_>) -> Option<u64> {
    let ev = batch.event?;
    let Some(lease) = batch.lease else {
        return Some(ev.fingerprint);
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ ev.fingerprint;
    let kind: u8 = match lease.owner.kind() {
        ScopeKind::Subject => 1,
        ScopeKind::Pool => 2,
    };
    for &b in std::iter::once(&kind).chain(lease.owner.id().as_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(h)
}

/// Whether an op with this usage and these holds fits (contract rule 3).
pub(crate) fn fits(used: u64, held: u64, delta: u64, max: Option<u64>) -> bool {
    delta == 0
        || match max {
            None => true,
            Some(m) => u128::from(used) + u128::from(held) + u128::from(delta) <= u128::from(m),
        }
}
