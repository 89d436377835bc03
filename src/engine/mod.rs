//! The engine: turns requests into batches and counter states into decisions.
//!
//! Every call runs the same stages, each in its own module:
//! [`prepare`] (the request resolved: amounts, cost, allowlist) →
//! [`plan`] (pure: the store batch) → the store's `apply` (the only I/O) →
//! [`conclude`] (pure: the decision from the store's answer). [`calls`]
//! writes each call's stages in order once; the sync front doors here and
//! the async ones in `asynchronous` expand it with their own store call.
//! [`allocations`] holds who is on which plan, [`reservation`] the leases,
//! [`observe`] what an [`Observer`] sees.

use std::fmt;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::clock::{Clock, SystemClock};
use crate::decision::Decision;
use crate::request::Request;
use crate::store::{AllowanceStore, Applied, Batch, LeaseInfo, MemoryStore};
use crate::Error;

#[macro_use]
mod calls;
mod allocations;
#[cfg(feature = "async")]
mod asynchronous;
mod audit;
mod balance;
mod conclude;
mod history;
mod observe;
mod plan;
mod prepare;
mod reservation;
mod shared;

pub use allocations::Allocation;
pub use audit::{AuditChange, AuditEvent, AuditPart};
pub use balance::{Credit, TopUp, MAX_PAYMENT_ID_BYTES};
pub use conclude::{MeterUsage, UsageReport};
pub use observe::{Call, DecisionEvent, Observer};
pub use reservation::{Outcome, Reservation};
#[cfg(feature = "async")]
pub use shared::AsyncAllocationSource;
pub use shared::{AllocationSource, MemoryAllocations};

use allocations::{Resolved, Table};
use shared::{Shared, Source};

/// The quota engine: plans, allocations, a store and a clock.
///
/// ```
/// use tollgate::{Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig,
///                Request, Status, Window};
///
/// let catalog = CatalogConfig::default()
///     .meter(Meter::count("llm_tokens_input"))
///     .plan(PlanConfig::new("plan_free").limit(LimitConfig::new(
///         "llm_tokens_input", Window::calendar(Period::Month), 20_000u64)))
///     .build()?;
/// let engine = Engine::new(catalog);
/// engine.allocate(Allocation::new("agent-7", "plan_free"))?;
///
/// let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", 16_000))?;
/// assert!(d.allowed);
/// assert_eq!(d.status, Status::Warning);
/// let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", 4_001))?;
/// assert!(!d.allowed);
/// assert_eq!(d.status, Status::Exceeded);
/// # Ok::<(), tollgate::Error>(())
/// ```
///
/// # Subject ids and hash flooding
///
/// Subject ids often come from outside (API keys, user ids), so the engine's
/// table of allocations hashes them with a keyed hash: foldhash's fast
/// hasher with random secrets drawn once per process (and per map), not
/// std's SipHash, which cost about 180 instructions more on every call.
/// What that means for a caller that lets clients choose subject ids:
///
/// - **Cannot:** precompute ids that collide. Without the process's secrets
///   an attacker cannot build a set of ids that land in one bucket of the
///   table, and the secrets differ in every process, so a list that hurts
///   one process is useless against the next. Lookups stay constant time
///   on average.
/// - **Can:** slow one process down if it can learn its secrets. foldhash
///   is not a cryptographic hash or a keyed PRF: an attacker who can
///   observe hash outputs, or time many lookups against one long-running
///   process, may in principle recover enough of the key to craft colliding
///   ids for that process, making its lookups for those ids linear in their
///   number. It can also pick ids that fall in one of the table's 16 lock
///   shards (chosen by an unkeyed hash), which costs lock contention, not
///   correctness or complexity.
/// - **Never:** change a decision. Collisions only cost time; every id is
///   compared in full, so no subject can read or spend another's quota.
///
/// Only allocated subjects are in the table (a request for an unknown id is
/// [`Error::UnknownSubject`] and adds nothing), so a flood needs the host
/// to [`allocate`](Engine::allocate) the attacker's ids. A host that allocates
/// ids chosen by untrusted clients, in one process that lives long enough
/// to be studied, can bound the risk by limiting how many subjects one
/// client may create, or by mapping client ids to its own.
pub struct Engine<S = MemoryStore, C = SystemClock> {
    catalog: Arc<Catalog>,
    store: S,
    clock: C,
    /// Subject → its resolved allocation, in shards (see `allocations::Table`).
    allocations: Table,
    /// The shared source of allocations, if any (see [`shared`]).
    shared: Option<Shared>,
    observer: Option<Arc<dyn Observer>>,
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for Engine<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .field("clock", &self.clock)
            .field("allocations", &self.allocations.len())
            .field("shared_allocations", &self.shared.is_some())
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine<MemoryStore, SystemClock> {
    /// An engine on the embedded [`MemoryStore`] and the system clock.
    pub fn new(catalog: Catalog) -> Self {
        Self::with_store_and_clock(catalog, MemoryStore::new(), SystemClock)
    }
}

impl<C: Clock> Engine<MemoryStore, C> {
    /// An engine on a [`MemoryStore`] with the given clock (a
    /// [`ManualClock`](crate::ManualClock) in tests).
    pub fn with_clock(catalog: Catalog, clock: C) -> Self {
        Self::with_store_and_clock(catalog, MemoryStore::new(), clock)
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// An engine on any store and clock.
    pub fn with_store_and_clock(catalog: Catalog, store: S, clock: C) -> Self {
        Self {
            catalog: Arc::new(catalog),
            store,
            clock,
            allocations: Table::default(),
            shared: None,
            observer: None,
        }
    }

    /// Attach an observer that sees every decision.
    #[must_use]
    pub fn with_observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Take allocations from `source`, shared by every replica, caching
    /// each for at most `max_age` (see the [`AllocationSource`] docs and
    /// the rules in the `shared` module: a miss asks the source, writes go
    /// through it, a failing source keeps what is cached). Allocations
    /// already made on this engine stay cached until `max_age` passes.
    #[must_use]
    pub fn with_allocation_source(
        mut self,
        source: impl AllocationSource + 'static,
        max_age: std::time::Duration,
    ) -> Self {
        self.shared = Some(Shared {
            source: Source::Sync(Arc::new(source)),
            max_age_ms: duration_ms(max_age),
        });
        self
    }

    /// [`Engine::with_allocation_source`] with an async source, for an
    /// engine on an async store (feature `async`): its `*_async` calls and
    /// [`Engine::allocate_async`] / [`Engine::deallocate_async`] use it;
    /// the sync `allocate` and `deallocate` then fail with
    /// [`Error::InvalidRequest`] rather than block.
    #[cfg(feature = "async")]
    #[must_use]
    pub fn with_async_allocation_source(
        mut self,
        source: impl AsyncAllocationSource + 'static,
        max_age: std::time::Duration,
    ) -> Self {
        self.shared = Some(Shared {
            source: Source::Async(Arc::new(source)),
            max_age_ms: duration_ms(max_age),
        });
        self
    }

    /// Bind a subject to a plan, replacing any earlier allocation of the same
    /// subject. Usage is kept per subject, meter and window, so moving to a
    /// plan with the same windows keeps the usage already counted. With an
    /// [allocation source](Engine::with_allocation_source) the allocation
    /// is saved there first. The observer's
    /// [`on_audit`](Observer::on_audit) sees the change, with no actor
    /// (see [`Engine::allocate_as`]).
    ///
    /// # Errors
    /// [`Error::UnknownPlan`], [`Error::UnknownPool`], or
    /// [`Error::InvalidConfig`] for an empty subject or a bad override (the
    /// field is `overrides[i]…`); the source's error; with an async source,
    /// [`Error::InvalidRequest`] (use `allocate_async`). Nothing changes on
    /// error.
    pub fn allocate(&self, allocation: Allocation) -> Result<(), Error> {
        self.allocate_by(allocation, None)
    }

    /// [`Engine::allocate`], audited as made by `actor` (an operator, an
    /// admin API's caller, a billing webhook).
    ///
    /// # Errors
    /// As [`Engine::allocate`].
    pub fn allocate_as(&self, allocation: Allocation, actor: &str) -> Result<(), Error> {
        self.allocate_by(allocation, Some(actor))
    }

    pub(super) fn allocate_by(
        &self,
        allocation: Allocation,
        actor: Option<&str>,
    ) -> Result<(), Error> {
        let saved = self.shared.as_ref().map(|_| allocation.clone());
        let (key, resolved) = Resolved::new(&self.catalog, allocation, self.clock.now_ms())?;
        let before = match (&self.shared, &saved) {
            (Some(shared), Some(a)) => match &shared.source {
                Source::Sync(src) => src.save(a)?,
                #[cfg(feature = "async")]
                Source::Async(_) => return Err(async_source("allocate")),
            },
            _ => None,
        };
        let from_source = self.shared.is_some();
        self.bind(key, resolved, before, from_source, actor);
        Ok(())
    }

    /// The allocation binding `subject`, as it was given to
    /// [`Engine::allocate`] (with a source: the copy this engine has
    /// cached, if any).
    pub fn allocation(&self, subject: &str) -> Option<Allocation> {
        self.allocations.get(subject).map(|r| r.allocation())
    }

    /// Remove a subject's allocation (with a source, there first). Its
    /// counters stay in the store until they age out. Returns whether it
    /// was allocated. The observer's [`on_audit`](Observer::on_audit) sees
    /// the removal.
    ///
    /// # Errors
    /// The source's error; with an async source, [`Error::InvalidRequest`]
    /// (use `deallocate_async`). Nothing changes on error. Without a
    /// source it never fails.
    pub fn deallocate(&self, subject: &str) -> Result<bool, Error> {
        self.deallocate_by(subject, None)
    }

    /// [`Engine::deallocate`], audited as made by `actor`.
    ///
    /// # Errors
    /// As [`Engine::deallocate`].
    pub fn deallocate_as(&self, subject: &str, actor: &str) -> Result<bool, Error> {
        self.deallocate_by(subject, Some(actor))
    }

    pub(super) fn deallocate_by(&self, subject: &str, actor: Option<&str>) -> Result<bool, Error> {
        let before = match &self.shared {
            Some(shared) => match &shared.source {
                Source::Sync(src) => src.remove(subject)?,
                #[cfg(feature = "async")]
                Source::Async(_) => return Err(async_source("deallocate")),
            },
            None => None,
        };
        Ok(self.unbind(subject, before, self.shared.is_some(), actor))
    }
}

/// A duration in whole milliseconds, saturating.
fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The error of a sync write on an engine whose source is async.
#[cfg(feature = "async")]
fn async_source(call: &str) -> Error {
    Error::request(format!(
        "allocations come from an async source: use `{call}_async`"
    ))
}

/// The sync calls, for an [`AllowanceStore`] (the embedded [`MemoryStore`]
/// among them). Each is a front door over its stages (see the `calls` module).
impl<S: AllowanceStore, C: Clock> Engine<S, C> {
    /// Preflight: what would `admit` decide now? Changes nothing. An event
    /// id on the request is ignored. A request of zero is answered as by
    /// [`Engine::admit`]: never `Exceeded`, never refused for a cooldown.
    ///
    /// # Errors
    /// Bad input (see [`Error`]) or a failing store.
    pub fn check(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Check)
    }

    /// Atomic check-then-record: the request is recorded on every limit of
    /// every scope it touches only if all of them stay within their maximum
    /// (counting what reservations hold) and no scope is cooling down;
    /// otherwise nothing is recorded and the decision says why. Concurrent
    /// limits are for reservations and are not touched.
    ///
    /// A request whose amounts are all zero is never `Exceeded` and is never
    /// refused for a cooldown (it adds nothing); a model outside the
    /// allowlist still refuses it, with `allowed: false`, reason
    /// [`Refusal::ModelNotAllowed`](crate::Refusal::ModelNotAllowed) and status `Ok`.
    ///
    /// With an event id ([`Request::event`]), a retry within the store's
    /// horizon answers the first decision and records nothing. An event id is
    /// spent only by a call that recorded: a refused admit may be retried
    /// with the same id.
    ///
    /// # Errors
    /// Bad input (see [`Error`]), [`Error::EventConflict`], or a failing
    /// store; nothing is recorded.
    pub fn admit(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Admit)
    }

    /// Record usage that already happened (actual output tokens, runtime).
    /// Always recorded, even past a maximum or during a cooldown; the
    /// decision may be `Exceeded`, telling the host to stop further work.
    /// With an event id, recorded once within the store's horizon.
    ///
    /// # Errors
    /// Bad input (see [`Error`]), [`Error::EventConflict`], a counter that
    /// would overflow, or a failing store; nothing is recorded.
    pub fn record(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Record)
    }

    /// Hold the request's amounts as estimates on every limit of every scope
    /// it touches, and one slot on each concurrent limit of those scopes, in
    /// one atomic step, under a lease of `lease_ttl`. Held amounts count for
    /// every other caller at once. Returns the [`Reservation`], or the
    /// refusing [`Decision`] (a limit or slot that does not fit, a cooldown,
    /// a model outside the allowlist) with nothing held.
    ///
    /// A reservation opens work, so a cooldown refuses it whatever its
    /// amounts; a request whose amounts are all zero is still never made
    /// `Exceeded` by the refusal (its status is its limits', where the slot
    /// it takes on a full concurrent limit is `Exceeded`).
    ///
    /// # Errors
    /// Bad input (see [`Error`]); [`Error::InvalidRequest`] for a zero or
    /// out-of-range `lease_ttl` or an event id; a failing store. Nothing is
    /// held.
    pub fn reserve(
        &self,
        request: &Request<'_>,
        lease_ttl: std::time::Duration,
    ) -> Result<Result<Reservation, Decision>, Error> {
        reserve_call!(self, request, lease_ttl, apply: |b| self.apply(b))
    }

    /// Extend a live reservation's lease to `now + lease_ttl` (a heartbeat).
    ///
    /// # Errors
    /// [`Error::ReservationExpired`] after its expiry (its holds have already
    /// returned), [`Error::ReservationSettled`], [`Error::UnknownReservation`],
    /// [`Error::InvalidRequest`] for a zero or out-of-range `lease_ttl`, or a
    /// failing store. Nothing changes on error.
    pub fn renew(
        &self,
        reservation: &mut Reservation,
        lease_ttl: std::time::Duration,
    ) -> Result<(), Error> {
        renew_call!(self, reservation, lease_ttl, apply: |b| self.apply(b))
    }

    /// Grow a live reservation's holds by `more` (a stream's running tokens
    /// or cost). The growth is always held, like [`Engine::record`]: it
    /// already happened. The decision is `Exceeded` once usage plus holds is
    /// past a maximum, or (reason [`Refusal::InsufficientBalance`](crate::Refusal::InsufficientBalance))
    /// once the growth's cost is more than the prepaid balance had
    /// available: the host should stop the work there. `more` must name
    /// the reservation's subject (and its model, if it names one).
    ///
    /// # Errors
    /// Bad input (see [`Error`]); [`Error::InvalidRequest`] for another
    /// subject or model, or an event id; the reservation errors of
    /// [`Engine::renew`]; a failing store. Nothing changes on error.
    pub fn grow(
        &self,
        reservation: &mut Reservation,
        more: &Request<'_>,
    ) -> Result<Decision, Error> {
        grow_call!(self, reservation, more, apply: |b| self.apply(b))
    }

    /// Settle a reservation with the actual amounts: every hold and slot is
    /// given back and `actual` is recorded in one atomic step, so the
    /// difference from the estimate is settled; an actual above the estimate
    /// is recorded as [`Engine::record`] would. `actual` names the
    /// reservation's subject; with an event id, a retried commit answers the
    /// first decision.
    ///
    /// `actual` is the whole usage of the work: a meter the reservation held
    /// that `actual` does not name is settled at zero. Name every meter that
    /// counts — `jobs: 1` to keep counting a job that ran.
    ///
    /// # Errors
    /// Bad input (see [`Error`]); [`Error::InvalidRequest`] for another
    /// subject or model; [`Error::ReservationSettled`],
    /// [`Error::ReservationExpired`], [`Error::UnknownReservation`];
    /// [`Error::EventConflict`]; a counter that would overflow; a failing
    /// store. Nothing changes on error.
    pub fn commit(
        &self,
        reservation: &Reservation,
        actual: &Request<'_>,
    ) -> Result<Decision, Error> {
        let settling = self.settling_commit(reservation, actual)?;
        settle_call!(self, settling, apply: |b| self.apply(b))
    }

    /// Release a reservation without actual amounts: every hold and slot is
    /// given back, and the share of each hold that the plan's refund policy
    /// keeps for `outcome` is recorded as usage, rounded up (by default:
    /// failed keeps 50 %, cancelled 0 %, completed 100 %). A failure starts
    /// the cooldown of every scope of the reservation that declares one.
    ///
    /// # Errors
    /// [`Error::ReservationSettled`], [`Error::ReservationExpired`],
    /// [`Error::UnknownReservation`], [`Error::UnknownSubject`], a counter
    /// that would overflow, or a failing store. Nothing changes on error.
    pub fn release(&self, reservation: &Reservation, outcome: Outcome) -> Result<Decision, Error> {
        let request = Request::new(&reservation.subject);
        let settling = self.settling_release(reservation, &request, outcome)?;
        settle_call!(self, settling, apply: |b| self.apply(b))
    }

    /// Live reservations past the maximum job duration of their plan, oldest
    /// deadline first, so the host can kill the work.
    ///
    /// # Errors
    /// A failing store.
    pub fn overdue(&self) -> Result<Vec<LeaseInfo>, Error> {
        self.store.overdue(self.clock.now())
    }

    /// Usage for `subject` in the current period of each of its own limits:
    /// units, holds and cost per meter, the cost **as charged** when the
    /// usage was counted (a plan or price change never re-prices past
    /// usage; see [`MeterUsage::cost`]). Each row reads its amounts in the
    /// public form a [`Decision`]'s limit states use (`used_amount`,
    /// `held_amount`, `max_amount`: `u64` units for counts and seconds, a
    /// major-unit `Decimal` for money); see [`MeterUsage`].
    ///
    /// # Errors
    /// [`Error::UnknownSubject`], or a failing store.
    pub fn usage(&self, subject: &str) -> Result<UsageReport, Error> {
        usage_call!(self, subject, apply: |b| self.apply(b))
    }

    /// `check`, `admit` and `record`: a store error is an error.
    fn decide(&self, req: &Request<'_>, call: Call) -> Result<Decision, Error> {
        decide_call!(
            self, req, call,
            apply: |b| self.apply(b),
            on_store_error: |e, _, _| Err(e),
        )
    }

    /// One store call, with the contract's answer shape checked. The
    /// store's result is returned as it came, not unwrapped and wrapped
    /// again: an answer is several hundred bytes, each move a copy.
    /// Inlined, so the store writes its answer into the caller's frame.
    #[inline(always)]
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let result = self.store.apply(batch);
        match &result {
            Ok(applied) => check_shape(batch, applied)?,
            Err(Error::Overflow { .. }) => return Err(charged_overflow(result)),
            Err(_) => {}
        }
        result
    }
}

/// A store's [`Error::Overflow`] on a counter of money charged (named by
/// `catalog::charged_name`, written by `plan`'s `charge_ops`) names the
/// cost meter it is kept in, as an
/// overflow of the cost itself does: the counter's own name is the
/// engine's. Every other result as it is.
#[cold]
#[inline(never)]
fn charged_overflow(result: Result<Applied, Error>) -> Error {
    match result {
        Ok(_) => Error::Store {
            message: "no error to map".into(),
        },
        Err(Error::Overflow { meter }) => match meter.split_once("\u{1f}charged:") {
            Some((_, cost_meter)) => Error::Overflow {
                meter: cost_meter.to_owned(),
            },
            None => Error::Overflow { meter },
        },
        Err(e) => e,
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// [`Engine::observe`] at `at_ms` (Unix milliseconds): the instant is
    /// made a `DateTime` only when there is an observer to show it to.
    #[inline(always)]
    fn observe_at(&self, call: Call, req: &Request<'_>, at_ms: i64, decision: &Decision) {
        if self.observer.is_some() {
            self.observe(call, req, crate::store::ms_to_time(at_ms), decision);
        }
    }
}

/// The contract's answer shape: one counter state per op, one cooldown
/// answer per cooldown. Inlined into `apply` and `apply_async`, as the
/// check was when it was written in `apply`.
#[inline(always)]
fn check_shape(batch: &Batch<'_>, applied: &Applied) -> Result<(), Error> {
    // A store that does not keep balances must not pass for one that does:
    // a batch naming a balance needs an answer with one.
    if applied.counters.len() != batch.ops.len()
        || applied.cooldowns.len() != batch.cooldowns.len()
        || batch.balance.is_some() != applied.balance.is_some()
    {
        return Err(shape_error(batch, applied));
    }
    Ok(())
}

/// The error for a store whose answer does not match its batch.
#[cold]
#[inline(never)]
fn shape_error(batch: &Batch<'_>, applied: &Applied) -> Error {
    Error::Store {
        message: format!(
            "store returned {} counters for {} ops, {} cooldowns for {} and {} balance for {}",
            applied.counters.len(),
            batch.ops.len(),
            applied.cooldowns.len(),
            batch.cooldowns.len(),
            u8::from(applied.balance.is_some()),
            u8::from(batch.balance.is_some()),
        ),
    }
}
