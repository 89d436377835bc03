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
//! 2. **Roll windows at `batch.now_ms`** (or at a clock the backend documents):
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
//!    batch's [`Applied`] with [`Applied::replayed_at_ms`] set to its `now_ms`,
//!    changing nothing — or [`Error::EventConflict`] if the fingerprint
//!    differs. The fingerprint compared is the event's together with the
//!    batch's lease owner ([`event_fingerprint`]), so a replay never answers
//!    another owner's settlement. Otherwise run the batch; if it applied, remember it under the
//!    id. The ledger is consulted before lease state, so a retried commit
//!    replays instead of failing as settled. [`EventKey::engine_made`]
//!    changes none of this: it says the engine made the id for this call
//!    (no earlier try of it exists); a backend may only keep such an id
//!    for a shorter time.
//! 9. **Keep cooldowns** ([`CooldownOp`]): in `Check` and `WithinLimits`, a
//!    listed scope whose cooldown runs past `now` makes the batch not fit.
//!    When the batch applies, a `start_until_ms` extends the scope's cooldown
//!    to at least that time. [`Applied::cooldowns`] reports each listed
//!    scope's cooldown end if it is still running after the batch.
//! 10. **Keep prepaid balances** ([`BalanceOp`]). A balance is identified by
//!     `(scope, meter)` (the meter is the money meter it is kept in, in its
//!     smallest unit); one that does not exist is empty. It holds *grants*
//!     (credits), *holds* under leases, and a *debt*:
//!     - A grant is *live* at `now` when `effective_at_ms <= now` and (no
//!       expiry, or) `now < expires_at_ms`: from its expiry on, to the
//!       millisecond, what it has left stops counting. Its *remaining* is
//!       `amount - spent`. Grants are consumed in one order every backend
//!       keeps: `priority` ascending, then `expires_at_ms` ascending (no
//!       expiry last), then `effective_at_ms` ascending, then the id's bytes
//!       ascending.
//!     - A clock stepping back (rule 2): grants are read at the later of
//!       `now` and the latest `now` of a batch that applied to the balance,
//!       so an expired grant never counts again. Holds go by `now`, as a
//!       counter's do.
//!     - A balance's *available* amount is the remaining of its live grants,
//!       less its live holds, less its debt (it may be negative).
//!     - [`BalanceAction::Debit`] `{ amount, overdraft }` *fits* when `amount`
//!       is zero or `amount <= available`. Its place in the batch's decision
//!       is that of an op: in `Check` and `WithinLimits` a debit that does
//!       not fit makes the batch not fit. When the batch applies:
//!       with no lease, `amount` is *consumed*; with [`LeaseAction::Open`]
//!       or [`LeaseAction::Grow`], `amount` becomes (or is added to) the
//!       lease's hold on the balance instead (a lease holds on at most one
//!       balance: naming another is [`Error::InvalidBatch`]); with
//!       [`LeaseAction::Settle`], see below. *Consuming* `n` takes from the
//!       live grants in order until `n` is covered; what no grant covers
//!       becomes debt as long as the debt stays at or below `overdraft`; the
//!       rest is *uncovered* (reported, never recorded). Consuming ignores
//!       holds: usage that happened (`Force`) may take what a reservation
//!       held, and that reservation's own charge may then be uncovered.
//!     - A lease's hold on a balance counts while the lease is live and moves
//!       with its expiry ([`LeaseAction::Renew`]); [`LeaseAction::Settle`]
//!       removes it and consumes `keep.ceil_of(hold)`, whether or not the
//!       batch names the balance, then consumes the batch's own debit.
//!     - [`BalanceAction::Grant`] (mode `Force`, no ops, no lease) adds a
//!       grant. Its id is the host's payment id: a grant whose id the balance
//!       already has, with the same amount, times and priority, changes
//!       nothing and answers with [`Applied::replayed_at_ms`] set to when it
//!       was first granted; with anything different it is
//!       [`Error::GrantConflict`]. A new grant that is live (read at the
//!       balance's time, as above) first pays the debt off (`spent` starts
//!       at what it repays); one not yet effective or already expired
//!       leaves the debt. A zero amount, an empty id, or
//!       an expiry at or before the effective time is [`Error::InvalidBatch`];
//!       grants whose amounts together pass a `u64` are [`Error::Overflow`].
//!       Grants are records: a backend keeps them (spent and expired ones
//!       too) as long as the balance exists.
//!
//!     [`Applied::balance`] reports the batch's balance, as of after the
//!     batch if it applied: live remaining, holds, debt, whether the debit
//!     fit, what was uncovered, and every grant not yet expired with
//!     something left, in consumption order.
//!
//! 11. **Keep closed periods** (an opt-out part of the contract:
//!     [`AllowanceStore::history_periods`] says how many, `N`; a store that
//!     keeps none says 0). A [`Window::Calendar`] counter's usage in each
//!     of the `N` periods before the one containing `now` stays readable
//!     through [`AllowanceStore::period_usage`]: a batch that rolls a
//!     counter past a period holding usage, and a backend that forgets
//!     such a counter (a sweep, a TTL, a reclaim), keeps that period's
//!     total first. A total more than `N` periods behind `now` may be
//!     forgotten, so what is kept is flat in traffic: at most `N` totals
//!     per counter. `period_usage` answers, per [`PeriodOp`], the usage the
//!     counter counted in the period starting at `start_ms`: the counter's
//!     own if it still holds that period (rolled or not), else the total
//!     kept for it, else 0 (nothing was counted, or it was forgotten). It
//!     changes nothing. An op whose window is not calendar, or whose
//!     `start_ms` is not the start of one of its periods, is
//!     [`Error::InvalidBatch`]. Holds are not kept: a period's total is its
//!     usage.
//!
//! Policy — statuses, warning ratios, prices, allowlists, refund shares,
//! fingerprints — stays in the engine, so a backend stays small.
//!
//! # Ambiguous outcomes
//!
//! A network store (an `AsyncAllowanceStore`, feature `async`, whose
//! `needs_event_ids` is `true`: `RedisStore`, and every store that talks to
//! a server) tells two failures apart:
//!
//! - [`Error::Store`]: the call did not reach the backend, or the backend
//!   refused it whole (a refused connection, a server error). **Nothing
//!   changed**; a retry is a first try.
//! - [`Error::StoreOutcomeUnknown`]: the call left (or may have) and no
//!   answer came back in time (a timeout, a connection lost mid-call). It
//!   **may or may not have applied**. Its `event` names the batch's event
//!   id: retrying the call with that id applies it at most once (rule 8) —
//!   a replay if the first try applied, the call itself if it did not.
//!   A batch in [`Mode::Check`] changes nothing either way, so a network
//!   store reports its failure as [`Error::Store`].
//!
//! So that every mutating call can be retried this way, the async engine
//! gives `admit_async`, `record_async` and `commit_async` an event id of
//! its own (`tollgate:` and 128 random bits) when the host gave none and
//! the store needs one; the batch's key then says so
//! ([`EventKey::engine_made`]: the engine made this id for this call, no
//! earlier try of it exists). A host that retries with the id the error
//! named passes it as its own ([`Request::event`](crate::Request::event)),
//! and the key of the retry is not engine-made. Under `FailurePolicy::FailOpen` a fail-open
//! decision says which case it met:
//! [`Decision::record_unknown`](crate::Decision::record_unknown) is the
//! event id to retry with when the record is unknown, and `None` when
//! nothing was recorded. Calls that take no event id are retried by their
//! own rules: a `reserve_async` whose outcome is unknown may have left a
//! lease, whose holds return at its expiry (a retry opens another); a
//! retried `release_async` of a lease that did settle answers
//! [`Error::ReservationSettled`]; a `renew_async` retried sets the same
//! expiry; a `grow_async` whose outcome is unknown may have grown the
//! holds, which return when the reservation settles or expires.
//!
//! # Times, names and answers
//!
//! Every instant in a batch and in its answer is an `i64` of Unix
//! milliseconds (UTC), the unit a window's calendar bounds and rolling
//! buckets are computed in: a backend builds no `DateTime`. A meter is a
//! [`Name`], interned when the catalog is built, so two ops name the same
//! meter exactly when their names are one pointer ([`Name::as_str`]'s
//! address): a backend may key its counters by it and never compare
//! strings (a store or test that builds its own ops interns a name with
//! [`Name::new`]). An answer keeps up to [`INLINE_STATES`] counter states
//! and cooldowns inline ([`InlineVec`]), so a batch of an ordinary plan is
//! answered without a heap allocation.
//!
//! [`AllowanceStore::overdue`] and its [`LeaseInfo`] keep `DateTime`s: a
//! maintenance call whose answer is read by people and logs, not a
//! per-decision one.

mod applied;
#[cfg(feature = "async")]
mod async_store;
mod history;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod validate;

use std::sync::Arc;

use chrono::{DateTime, Utc};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{PostgresConfig, PostgresStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisAllocations, RedisConfig, RedisStore, TimeSource};
pub(crate) use applied::{interned, ms_to_time};
pub use applied::{
    Applied, BalanceState, CounterState, GrantState, InlineVec, LeaseInfo, SettledHold,
    INLINE_STATES,
};
#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
pub use async_store::{AsyncAllowanceStore, FailurePolicy};
pub(crate) use history::{checked_depth, period_back, validate_period_ops};
pub use history::{PeriodOp, DEFAULT_HISTORY_PERIODS, MAX_HISTORY_PERIODS};
pub use memory::{MemoryStore, Snapshot};

// The model's types a batch names, kept at their `store::` paths.
pub use crate::model::lease::{Fraction, LeaseId};
pub(crate) use crate::model::scope::ScopeMap;
pub use crate::model::scope::{ScopeKey, ScopeKind};

use crate::name::Name;
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
    /// Which meter: interned, so equal meters are one pointer (see the
    /// [module docs](self#times-names-and-answers)).
    pub meter: Name,
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
        /// The holds count until this instant (Unix milliseconds) unless
        /// renewed.
        expires_at_ms: i64,
        /// When the work is overdue (a maximum job duration; Unix
        /// milliseconds); reported by [`AllowanceStore::overdue`].
        deadline_ms: Option<i64>,
    },
    /// Move the lease's expiry.
    Renew {
        /// The new expiry (Unix milliseconds).
        expires_at_ms: i64,
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
    /// Set by the async engine only: see [`EventKey::engine_made`].
    pub(crate) engine_made: bool,
}

impl<'a> EventKey<'a> {
    /// An event key (not [engine-made](EventKey::engine_made)).
    pub fn new(id: &'a str, fingerprint: u64) -> Self {
        Self {
            id,
            fingerprint,
            engine_made: false,
        }
    }

    /// The key of an id the async engine made for this very call.
    pub(crate) fn made_by_engine(mut self) -> Self {
        self.engine_made = true;
        self
    }

    /// Whether the async engine made this id for this very call (see
    /// [Ambiguous outcomes](self#ambiguous-outcomes)): no earlier try of
    /// it exists, so no ledger entry can hold it yet. `false` for every
    /// id the host gave, a host's retry with an id the engine once made
    /// included, and for every key built with [`EventKey::new`]. A store
    /// applies a batch the same way whatever it says (rule 8); it may use
    /// it to keep such ids for a shorter time, and a
    /// `capacity::CapacityStore` decides such a batch locally.
    pub fn engine_made(&self) -> bool {
        self.engine_made
    }
}

/// A scope's cooldown in a batch (contract rule 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CooldownOp<'a> {
    /// The scope.
    pub scope: &'a ScopeKey,
    /// When set and the batch applies: the scope cools down until at least
    /// this instant (Unix milliseconds).
    pub start_until_ms: Option<i64>,
}

impl<'a> CooldownOp<'a> {
    /// Check (and with `start_until_ms`, start) a scope's cooldown.
    pub fn new(scope: &'a ScopeKey, start_until_ms: Option<i64>) -> Self {
        Self {
            scope,
            start_until_ms,
        }
    }
}

/// A batch's prepaid balance (contract rule 10): which balance, and what
/// the batch does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalanceOp<'a> {
    /// Whose balance: a subject's or a pool's.
    pub scope: &'a ScopeKey,
    /// The money meter it is kept in (amounts in its smallest unit);
    /// interned, as an op's meter.
    pub meter: Name,
    /// What to do.
    pub action: BalanceAction<'a>,
}

impl<'a> BalanceOp<'a> {
    /// A balance op.
    pub fn new(scope: &'a ScopeKey, meter: Name, action: BalanceAction<'a>) -> Self {
        Self {
            scope,
            meter,
            action,
        }
    }
}

/// What a batch does to a balance (contract rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BalanceAction<'a> {
    /// Debit `amount` (or hold it, under a lease the batch opens or grows).
    Debit {
        /// The amount, in the meter's smallest unit.
        amount: u64,
        /// How far a consumption may take the balance below zero (as debt)
        /// before the rest is uncovered.
        overdraft: u64,
    },
    /// Add a grant (a top-up), idempotent by its id.
    Grant(GrantOp<'a>),
}

/// A grant to add to a balance (contract rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrantOp<'a> {
    /// The host's payment id: the grant's id within its balance.
    pub id: &'a str,
    /// The amount credited, in the meter's smallest unit; not zero.
    pub amount: u64,
    /// From when it counts (Unix milliseconds).
    pub effective_at_ms: i64,
    /// When it stops counting (Unix milliseconds), if ever.
    pub expires_at_ms: Option<i64>,
    /// Lower is consumed first.
    pub priority: u32,
}

impl<'a> GrantOp<'a> {
    /// A grant of `amount` under `id`, effective at `effective_at_ms`, with
    /// no expiry and priority 0.
    pub fn new(id: &'a str, amount: u64, effective_at_ms: i64) -> Self {
        Self {
            id,
            amount,
            effective_at_ms,
            expires_at_ms: None,
            priority: 0,
        }
    }

    /// The same grant expiring at `expires_at_ms` (Unix milliseconds).
    #[must_use]
    pub fn expiring(mut self, expires_at_ms: i64) -> Self {
        self.expires_at_ms = Some(expires_at_ms);
        self
    }

    /// The same grant with `priority` (lower is consumed first).
    #[must_use]
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
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
    /// The engine's clock reading for this decision, in Unix milliseconds.
    pub now_ms: i64,
    /// A reservation's lease, if the batch is part of one.
    pub lease: Option<LeaseOp<'a>>,
    /// An idempotency key, if the caller gave one.
    pub event: Option<EventKey<'a>>,
    /// Cooldowns to check, and to start when the batch applies.
    pub cooldowns: &'a [CooldownOp<'a>],
    /// A prepaid balance to debit, hold on, or credit (contract rule 10).
    pub balance: Option<BalanceOp<'a>>,
}

impl<'a> CounterOp<'a> {
    /// An op adding `delta` to `(scope, meter, window)` with maximum `max`.
    pub fn new(
        scope: &'a ScopeKey,
        meter: Name,
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
    /// A batch of `ops` applied in `mode` at `now_ms` (Unix milliseconds),
    /// with no lease, event or cooldown.
    pub fn new(ops: &'a [CounterOp<'a>], mode: Mode, now_ms: i64) -> Self {
        Self {
            ops,
            mode,
            now_ms,
            lease: None,
            event: None,
            cooldowns: &[],
            balance: None,
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

    /// The same batch acting on a prepaid balance (contract rule 10).
    #[must_use]
    pub fn with_balance(mut self, balance: BalanceOp<'a>) -> Self {
        self.balance = Some(balance);
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
    /// another fingerprint (rule 8), [`Error::GrantConflict`] for a grant id
    /// reused with other terms (rule 10) — nothing changes in any of these cases;
    /// [`Error::Store`] if the backend fails.
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error>;

    /// Live leases whose deadline is at or before `now` (work past its
    /// maximum duration), oldest deadline first.
    ///
    /// # Errors
    /// [`Error::Store`] if the backend fails.
    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error>;

    /// How many closed periods of each calendar counter the store keeps
    /// (contract rule 11). The default, 0, is a store that keeps none.
    fn history_periods(&self) -> u32 {
        0
    }

    /// The usage each op's counter counted in the calendar period starting
    /// at its `start_ms`, one number per op in order, as of `now_ms`
    /// (contract rule 11). Changes nothing.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for an op that names no calendar period;
    /// [`Error::HistoryNotKept`] from a store that keeps none (the
    /// default); [`Error::Store`] if the backend fails.
    fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        let _ = (ops, now_ms);
        Err(history::no_history())
    }
}

impl<T: AllowanceStore + ?Sized> AllowanceStore for Arc<T> {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        (**self).apply(batch)
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        (**self).overdue(now)
    }

    fn history_periods(&self) -> u32 {
        (**self).history_periods()
    }

    fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        (**self).period_usage(ops, now_ms)
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
