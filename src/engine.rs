//! The engine: turns requests into batches and counter states into decisions.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hasher as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::catalog::{cost_minor, first_duplicate, Catalog, Limit, LimitConfig, Plan, Pool, Unit};
use crate::clock::{Clock, SystemClock};
use crate::decision::{Decision, LimitState, Money, Refusal, Status};
use crate::inline::Inline;
use crate::name::Name;
use crate::request::{Quantity, Request};
use crate::store::{
    AllowanceStore, Applied, Batch, CounterOp, CounterState, MemoryStore, Mode, ScopeKey,
};
use crate::store::{
    CooldownOp, EventKey, Fraction, LeaseAction, LeaseId, LeaseInfo, LeaseOp, SettledHold,
};
use crate::window::Window;
use crate::Error;

#[cfg(feature = "async")]
mod asynchronous;

/// Binds a subject to a plan.
///
/// ```
/// use tollgate::{Allocation, LimitConfig, Period, Window};
/// use rust_decimal_macros::dec;
///
/// let a = Allocation::new("agent-7", "plan_plus")
///     // A monthly cost cap of $50 for this subject only (seed 001).
///     .with_override(LimitConfig::new("cost", Window::calendar(Period::Month), dec!(50)))
///     .with_models(["claude-sonnet", "claude-haiku"])
///     .with_pool("account:acme");
/// # let _ = a;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    /// The subject: an agent, user, API key or account id.
    pub subject: String,
    /// The plan it is on.
    pub plan: String,
    /// Limits for this subject only. An override with the same meter and
    /// window as a plan limit replaces it (same counter, new maximum); any
    /// other override is added. A cap on the plan's cost meter limits the
    /// computed cost of every request; on a plan without a cost meter, a
    /// money limit counts only money the host passes with
    /// [`Request::money`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<LimitConfig>,
    /// The models the subject may use; `None` allows every model. A request
    /// that names no model is not a model call and is not checked. `check` and
    /// `admit` refuse another model with [`Refusal::ModelNotAllowed`] and
    /// record nothing; `record` records the usage (it happened) and reports
    /// the same refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Shared pools the subject also draws on (an account pool). A model's
    /// global pool cannot be listed here: it applies to every request that
    /// names its model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

impl Allocation {
    /// Bind `subject` to `plan` with no overrides.
    pub fn new(subject: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            plan: plan.into(),
            overrides: Vec::new(),
            models: None,
            pools: Vec::new(),
        }
    }

    /// Add a per-allocation limit.
    #[must_use]
    pub fn with_override(mut self, limit: LimitConfig) -> Self {
        self.overrides.push(limit);
        self
    }

    /// Restrict the models the subject may use.
    #[must_use]
    pub fn with_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Draw on a shared pool too.
    #[must_use]
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pools.push(pool.into());
        self
    }
}

/// An allocation resolved against the catalog: one per subject, so it keeps
/// nothing twice. The subject's id lives once, in `scope` (the table's key
/// shares it); the plan's limits are the plan's own unless overridden; the
/// plan and pool ids of the [`Allocation`] are those of `plan` and `pools`.
/// What most allocations lack (pools, an allowlist, overrides) sits behind
/// one optional box.
#[derive(Debug)]
struct Resolved {
    scope: ScopeKey,
    plan: Arc<Plan>,
    limits: Arc<[Limit]>,
    more: Option<Box<More>>,
}

/// The rarer parts of an allocation; never all empty.
#[derive(Debug)]
struct More {
    pools: Vec<Arc<Pool>>,
    models: Option<Vec<String>>,
    overrides: Vec<LimitConfig>,
}

impl Resolved {
    /// The pools the allocation lists.
    #[inline]
    fn pools(&self) -> &[Arc<Pool>] {
        self.more.as_ref().map_or(&[], |m| &m.pools)
    }

    /// The allocation as it was given to [`Engine::allocate`].
    fn allocation(&self) -> Allocation {
        let mut a = Allocation::new(self.scope.id(), &*self.plan.id);
        if let Some(m) = &self.more {
            a.overrides.clone_from(&m.overrides);
            a.models.clone_from(&m.models);
            a.pools = m.pools.iter().map(|p| p.id.to_string()).collect();
        }
        a
    }
}

/// The allocation table: subject → resolved allocation, split in
/// [`TABLE_SHARDS`] locks, each on its own cache line, so calls on different
/// subjects from different threads do not all write one lock word.
///
/// Each shard's map is keyed by the scope's id (one allocation, shared with
/// the scope) under std's randomly keyed SipHash, so callers cannot aim ids
/// at one bucket. The shard comes from a cheap unkeyed hash of the id: ids
/// aimed at one shard only bring back a single lock.
#[derive(Default)]
struct Table {
    shards: [Shard; TABLE_SHARDS],
}

/// Shards of the allocation table.
const TABLE_SHARDS: usize = 16;

/// One lock of the table, alone on its cache line.
#[derive(Default)]
#[repr(align(64))]
struct Shard(RwLock<HashMap<Arc<str>, Arc<Resolved>>>);

impl Table {
    /// The shard holding `subject`: its last eight bytes (where ids like
    /// `agent-7` differ) and its length, multiplied into the top bits.
    #[inline]
    fn shard(&self, subject: &str) -> &RwLock<HashMap<Arc<str>, Arc<Resolved>>> {
        let b = subject.as_bytes();
        let tail = b
            .len()
            .checked_sub(8)
            .and_then(|i| <[u8; 8]>::try_from(&b[i..]).ok())
            .map_or_else(
                || b.iter().fold(0u64, |h, &x| (h << 8) | u64::from(x)),
                u64::from_le_bytes,
            );
        let h = (tail ^ b.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The top four bits: TABLE_SHARDS is 16.
        &self.shards[(h >> 60) as usize].0
    }

    /// Subjects allocated.
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().len()).sum()
    }
}

/// Which engine call made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Call {
    /// [`Engine::check`].
    Check,
    /// [`Engine::admit`].
    Admit,
    /// [`Engine::record`].
    Record,
    /// [`Engine::reserve`].
    Reserve,
    /// [`Engine::grow`].
    Grow,
    /// [`Engine::commit`].
    Commit,
    /// [`Engine::release`].
    Release,
}

/// How a reservation's work ended, for [`Engine::release`]. The plan's
/// [`RefundPolicy`](crate::RefundPolicy) says how much of the hold returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The work finished; by default none of the hold returns (all of it
    /// counts as used). Use [`Engine::commit`] when the actual amounts are
    /// known.
    Completed,
    /// The work failed; by default 50 % of the hold returns, and scopes that
    /// declare a cooldown start it.
    Failed,
    /// The work was cancelled; by default all of the hold returns.
    Cancelled,
}

/// In-flight work: estimates held on every limit of every scope the request
/// touches, and one slot on each concurrent limit, under a lease that
/// expires unless renewed.
///
/// Settle it exactly once with [`Engine::commit`] or [`Engine::release`]; a
/// reservation that is neither, nor renewed, gives everything back at
/// [`Reservation::expires_at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    id: LeaseId,
    subject: String,
    model: Option<String>,
    pools: Vec<String>,
    held: Vec<(usize, Name, u64)>,
    opened_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
    decision: Decision,
}

impl Reservation {
    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.id
    }
    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// The model named at reserve time.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    /// When it was opened.
    pub fn opened_at(&self) -> DateTime<Utc> {
        self.opened_at
    }
    /// When its holds return unless renewed.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }
    /// When the work is overdue under the plan's maximum job duration.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.deadline
    }
    /// The amount held on `meter` (estimate plus growth) in its smallest
    /// unit, if the reservation holds any.
    pub fn held(&self, meter: &str) -> Option<u64> {
        self.held
            .iter()
            .find(|(_, m, _)| &**m == meter)
            .map(|&(_, _, n)| n)
    }
    /// The decision that admitted it (the latest `grow` decision after a
    /// growth).
    pub fn decision(&self) -> &Decision {
        &self.decision
    }
}

/// A decision as an [`Observer`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DecisionEvent<'a> {
    /// The call that made it.
    pub call: Call,
    /// The subject asked about.
    pub subject: &'a str,
    /// The model named, if any.
    pub model: Option<&'a str>,
    /// The engine's clock at the decision.
    pub at: DateTime<Utc>,
    /// The decision.
    pub decision: &'a Decision,
}

/// Sees every decision the engine makes: log rejections with their reason,
/// count unpriced usage, export metrics. Called after the store has applied
/// the batch, outside every lock; keep it quick.
pub trait Observer: Send + Sync {
    /// Called once per decision.
    fn on_decision(&self, event: &DecisionEvent<'_>);
}

impl<F: Fn(&DecisionEvent<'_>) + Send + Sync> Observer for F {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self(event);
    }
}

/// One row of a [`UsageReport`]: a limit of the subject's own scope.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeterUsage {
    /// The meter.
    pub meter: Name,
    /// The window the row counts over.
    pub window: Window,
    /// Start of the current period (`None` for lifetime windows).
    pub period_start: Option<DateTime<Utc>>,
    /// When usage next leaves the window.
    pub resets_at: Option<DateTime<Utc>>,
    /// Usage in the meter's major unit (tokens, seconds, dollars).
    pub units: Decimal,
    /// Held by in-flight reservations, in the meter's major unit (for a
    /// concurrent limit: the slots taken).
    pub held: Decimal,
    /// The maximum in the meter's major unit; `None` is unlimited.
    pub max: Option<Decimal>,
    /// `units × unit price`, rounded up to the cost meter's smallest unit;
    /// `None` when the plan has no price for the meter.
    pub cost: Option<Money>,
    /// Status of usage plus holds against the maximum: `Exceeded` when past
    /// it (only `record` can put it there), `Warning` at the warning ratio.
    pub status: Status,
}

/// Usage for one subject in its current periods: units and cost per meter
/// (the shape of seed 003's `/usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The subject.
    pub subject: String,
    /// Its plan.
    pub plan: String,
    /// When the report was read.
    pub at: DateTime<Utc>,
    /// One row per limit of the subject's own scope, in plan order then
    /// override order.
    pub meters: Vec<MeterUsage>,
}

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
pub struct Engine<S = MemoryStore, C = SystemClock> {
    catalog: Arc<Catalog>,
    store: S,
    clock: C,
    /// Subject → its resolved allocation, in shards (see [`Table`]).
    allocations: Table,
    observer: Option<Arc<dyn Observer>>,
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for Engine<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .field("clock", &self.clock)
            .field("allocations", &self.allocations.len())
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

/// A call's ops kept inline (no allocation): enough for a plan's limits
/// and a pool or two; more spill to the heap.
const INLINE_OPS: usize = 8;

/// Fills the unused inline slots of a call's limit list; never read.
static NO_LIMIT: std::sync::LazyLock<Limit> = std::sync::LazyLock::new(|| Limit {
    meter: Name::intern(""),
    meter_idx: 0,
    window: Window::Lifetime,
    max: None,
    warn_at: Decimal::ONE,
    warn_threshold: u64::MAX,
});

impl<S, C: Clock> Engine<S, C> {
    /// An engine on any store and clock.
    pub fn with_store_and_clock(catalog: Catalog, store: S, clock: C) -> Self {
        Self {
            catalog: Arc::new(catalog),
            store,
            clock,
            allocations: Table::default(),
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

    /// Bind a subject to a plan, replacing any earlier allocation of the same
    /// subject. Usage is kept per subject, meter and window, so moving to a
    /// plan with the same windows keeps the usage already counted.
    ///
    /// # Errors
    /// [`Error::UnknownPlan`], [`Error::UnknownPool`], or
    /// [`Error::InvalidConfig`] for an empty subject or a bad override (the
    /// field is `overrides[i]…`). Nothing changes on error.
    pub fn allocate(&self, allocation: Allocation) -> Result<(), Error> {
        if allocation.subject.is_empty() {
            return Err(Error::config("subject", "empty subject id"));
        }
        let plan = self
            .catalog
            .plans
            .get(&allocation.plan)
            .cloned()
            .ok_or_else(|| Error::UnknownPlan {
                plan: allocation.plan.clone(),
            })?;
        let overrides = self
            .catalog
            .resolve_limits(&allocation.overrides, "overrides")?;
        let limits = if overrides.is_empty() {
            plan.limits.clone()
        } else {
            let mut limits = plan.limits.to_vec();
            for o in overrides {
                match limits
                    .iter_mut()
                    .find(|l| l.meter_idx == o.meter_idx && l.window == o.window)
                {
                    Some(l) => *l = o,
                    None => limits.push(o),
                }
            }
            limits.into()
        };
        if let Some(dup) = first_duplicate(allocation.pools.iter().map(String::as_str)) {
            return Err(Error::config("pools", format!("pool `{dup}` listed twice")));
        }
        let pools = allocation
            .pools
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let pool = self
                    .catalog
                    .pools
                    .get(id)
                    .cloned()
                    .ok_or_else(|| Error::UnknownPool { pool: id.clone() })?;
                if self.catalog.model_pools.values().flatten().any(|p| p.id == pool.id) {
                    return Err(Error::config(
                        format!("pools[{i}]"),
                        format!("pool `{id}` is a model's global pool: requests naming the model draw on it"),
                    ));
                }
                Ok(pool)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let subject: Arc<str> = Arc::from(allocation.subject);
        let resolved = Resolved {
            scope: ScopeKey::subject(subject.clone()),
            plan,
            limits,
            more: (!pools.is_empty()
                || allocation.models.is_some()
                || !allocation.overrides.is_empty())
            .then(|| {
                Box::new(More {
                    pools,
                    models: allocation.models,
                    overrides: allocation.overrides,
                })
            }),
        };
        self.allocations
            .shard(&subject)
            .write()
            .insert(subject, Arc::new(resolved));
        Ok(())
    }

    /// The allocation binding `subject`, as it was given to [`Engine::allocate`].
    pub fn allocation(&self, subject: &str) -> Option<Allocation> {
        self.allocations
            .shard(subject)
            .read()
            .get(subject)
            .map(|r| r.allocation())
    }

    /// Remove a subject's allocation. Its counters stay in the store until
    /// they age out. Returns whether it was allocated.
    pub fn deallocate(&self, subject: &str) -> bool {
        self.allocations
            .shard(subject)
            .write()
            .remove(subject)
            .is_some()
    }

    /// Preflight: what would `admit` decide now? Changes nothing. An event
    /// id on the request is ignored. A request of zero is answered as by
    /// [`Engine::admit`]: never `Exceeded`, never refused for a cooldown.
    ///
    /// # Errors
    /// Bad input (see [`Error`]) or a failing store.
    pub fn check(&self, request: &Request<'_>) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
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
    /// [`Refusal::ModelNotAllowed`] and status `Ok`.
    ///
    /// With an event id ([`Request::event`]), a retry within the store's
    /// horizon answers the first decision and records nothing. An event id is
    /// spent only by a call that recorded: a refused admit may be retried
    /// with the same id.
    ///
    /// # Errors
    /// Bad input (see [`Error`]), [`Error::EventConflict`], or a failing
    /// store; nothing is recorded.
    pub fn admit(&self, request: &Request<'_>) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
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
    pub fn record(&self, request: &Request<'_>) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
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
    ) -> Result<Result<Reservation, Decision>, Error>
    where
        S: AllowanceStore,
    {
        let o = match self.open(request, lease_ttl)? {
            Ok(o) => o,
            Err(refused) => return Ok(Err(refused)),
        };
        let mut list = OpList::new(&o.p.alloc.scope);
        self.ops_for(&mut list, &o.p, request.model, Shape::Reserve);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let cooldowns = self.cooldowns_for(&o.p, request.model, None, false);
        let applied = self.apply(&o.batch(ops, &cooldowns))?;
        Ok(self.opened(request, &o, ops, limits, &applied, &cooldowns))
    }

    /// A reservation's checks before its store call: no event id, the
    /// request resolved, the lease's expiry and deadline, the allowlist
    /// (`Err` is the refusing decision, observed).
    fn open(
        &self,
        request: &Request<'_>,
        lease_ttl: std::time::Duration,
    ) -> Result<Result<Opening, Decision>, Error> {
        if request.event.is_some() {
            return Err(Error::request(
                "reserve takes no event id: a retried reserve is a new reservation",
            ));
        }
        let p = self.prepare(request)?;
        let now = self.clock.now();
        let expires_at = after(now, lease_ttl)?;
        if let Some(decision) = self.refuse_model(&p, Call::Reserve, request, now) {
            return Ok(Err(decision));
        }
        let deadline = p
            .alloc
            .plan
            .max_job_ms
            .and_then(|ms| now.checked_add_signed(chrono::Duration::milliseconds(ms)));
        Ok(Ok(Opening {
            id: LeaseId::random(),
            p,
            now,
            expires_at,
            deadline,
        }))
    }

    /// A reservation's answer after its store call: the `Reservation`, or
    /// the refusing decision (as `reserve` returns it).
    #[allow(clippy::too_many_arguments, clippy::result_large_err)]
    fn opened(
        &self,
        request: &Request<'_>,
        o: &Opening,
        ops: &[CounterOp<'_>],
        limits: &[&Limit],
        applied: &Applied,
        cooldowns: &[CooldownOp<'_>],
    ) -> Result<Reservation, Decision> {
        let decision = self.finish(
            Call::Reserve,
            request,
            &o.p,
            ops,
            limits,
            applied,
            cooldowns,
            o.now,
        );
        if !applied.applied {
            return Err(decision);
        }
        Ok(Reservation {
            id: o.id,
            subject: request.subject.to_owned(),
            model: request.model.map(str::to_owned),
            pools: request.pools.iter().map(|s| (*s).to_owned()).collect(),
            held: o
                .p
                .amounts
                .iter()
                .map(|&(i, n)| (i, self.catalog.meter_ids[i], n))
                .collect(),
            opened_at: o.now,
            expires_at: o.expires_at,
            deadline: o.deadline,
            decision,
        })
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
    ) -> Result<(), Error>
    where
        S: AllowanceStore,
    {
        let now = self.clock.now();
        let expires_at = after(now, lease_ttl)?;
        let owner = ScopeKey::subject(reservation.subject.as_str());
        let lease = LeaseOp::new(reservation.id, &owner, LeaseAction::Renew { expires_at });
        self.apply(&Batch::new(&[], Mode::Force, now).with_lease(lease))?;
        reservation.expires_at = expires_at;
        Ok(())
    }

    /// Grow a live reservation's holds by `more` (a stream's running tokens
    /// or cost). The growth is always held, like [`Engine::record`]: it
    /// already happened. The decision is `Exceeded` once usage plus holds is
    /// past a maximum: the host should stop the work there. `more` must name
    /// the reservation's subject (and its model, if it names one).
    ///
    /// # Errors
    /// Bad input (see [`Error`]); [`Error::InvalidRequest`] for another
    /// subject or model, or an event id; the reservation errors of
    /// [`Engine::renew`]; a failing store. Nothing changes on error.
    pub fn grow(&self, reservation: &mut Reservation, more: &Request<'_>) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
        if more.event.is_some() {
            return Err(Error::request("grow takes no event id"));
        }
        let p = self.prepare_for(reservation, more)?;
        let now = self.clock.now();
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(&mut list, &p, reservation.model.as_deref(), Shape::Usage);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let lease = LeaseOp::new(reservation.id, &p.alloc.scope, LeaseAction::Grow);
        let batch = Batch::new(ops, Mode::Force, now).with_lease(lease);
        let applied = self.apply(&batch)?;
        let decision = self.finish(Call::Grow, more, &p, ops, limits, &applied, &[], now);
        for &(i, n) in &p.amounts {
            match reservation.held.iter_mut().find(|(j, _, _)| *j == i) {
                Some((_, _, h)) => *h = h.saturating_add(n),
                None => reservation.held.push((i, self.catalog.meter_ids[i], n)),
            }
        }
        reservation.decision = decision.clone();
        Ok(decision)
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
    pub fn commit(&self, reservation: &Reservation, actual: &Request<'_>) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
        let p = self.prepare_for(reservation, actual)?;
        self.settle(reservation, actual, &p, Fraction::ZERO, Call::Commit, None)
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
    pub fn release(&self, reservation: &Reservation, outcome: Outcome) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
        let request = Request::new(&reservation.subject);
        let p = self.prepare_for(reservation, &request)?;
        let keep = &p.alloc.plan.keep;
        let keep = match outcome {
            Outcome::Completed => keep.completed,
            Outcome::Failed => keep.failed,
            Outcome::Cancelled => keep.cancelled,
        };
        let cooldown = (outcome == Outcome::Failed).then_some(());
        self.settle(reservation, &request, &p, keep, Call::Release, cooldown)
    }

    /// Live reservations past the maximum job duration of their plan, oldest
    /// deadline first, so the host can kill the work.
    ///
    /// # Errors
    /// A failing store.
    pub fn overdue(&self) -> Result<Vec<LeaseInfo>, Error>
    where
        S: AllowanceStore,
    {
        self.store.overdue(self.clock.now())
    }

    fn settle(
        &self,
        reservation: &Reservation,
        request: &Request<'_>,
        p: &Prepared,
        keep: Fraction,
        call: Call,
        failed: Option<()>,
    ) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
        let now = self.clock.now();
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(
            &mut list,
            p,
            reservation.model.as_deref(),
            Shape::Settle(&reservation.held),
        );
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let start = failed.map(|()| now);
        let cooldowns = self.cooldowns_for(p, reservation.model.as_deref(), start, false);
        let lease = LeaseOp::new(reservation.id, &p.alloc.scope, LeaseAction::Settle { keep });
        let fp;
        let mut batch = Batch::new(ops, Mode::Force, now)
            .with_lease(lease)
            .with_cooldowns(&cooldowns);
        if let Some(id) = request.event {
            fp = fingerprint(call, Some(reservation.id), ops);
            batch = batch.with_event(EventKey::new(id, fp));
        }
        let applied = self.apply(&batch)?;
        let at = applied.replayed_at.unwrap_or(now);
        Ok(self.finish(call, request, p, ops, limits, &applied, &[], at))
    }

    /// Usage for `subject` in the current period of each of its own limits:
    /// units, holds and cost per meter.
    ///
    /// # Errors
    /// [`Error::UnknownSubject`], [`Error::Overflow`] if a meter's cost does
    /// not fit the cost meter's integer, or a failing store.
    pub fn usage(&self, subject: &str) -> Result<UsageReport, Error>
    where
        S: AllowanceStore,
    {
        let alloc = self.allocation_of(subject)?;
        let now = self.clock.now();
        let ops = usage_ops(&alloc);
        let applied = self.apply(&Batch::new(&ops, Mode::Check, now))?;
        self.usage_report(subject, &alloc, &applied, now)
    }

    /// The report [`Engine::usage`] (and its async twin) answers, from the
    /// store's answer to [`usage_ops`].
    fn usage_report(
        &self,
        subject: &str,
        alloc: &Resolved,
        applied: &Applied,
        now: DateTime<Utc>,
    ) -> Result<UsageReport, Error> {
        let cost_meter_idx = alloc.plan.cost_meter.unwrap_or_default();
        let cost_meter = alloc.plan.cost_meter.map(|i| &self.catalog.meters[i]);
        let meters = alloc
            .limits
            .iter()
            .zip(&applied.counters)
            .map(|(l, s)| -> Result<MeterUsage, Error> {
                let meter = &self.catalog.meters[l.meter_idx];
                let price = alloc.plan.price_units_of(l.meter_idx);
                let cost = match (price, cost_meter) {
                    (Some(p), Some(cm)) => Some(Money {
                        amount: cm.to_decimal(cost_minor([(s.used, p)], cm.scale()).ok_or_else(
                            || Error::Overflow {
                                meter: cm.id.clone(),
                            },
                        )?),
                        currency: self.catalog.currency(cost_meter_idx),
                    }),
                    _ => None,
                };
                Ok(MeterUsage {
                    meter: l.meter,
                    window: l.window,
                    period_start: s.period_start,
                    resets_at: s.resets_at,
                    units: meter.to_decimal(s.used),
                    held: meter.to_decimal(s.held),
                    max: l.max.map(|m| meter.to_decimal(m)),
                    cost,
                    status: report_status(l, s.used.saturating_add(s.held)),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(UsageReport {
            subject: subject.to_owned(),
            plan: alloc.plan.id.to_string(),
            at: now,
            meters,
        })
    }

    /// One store call, with the contract's answer shape checked.
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error>
    where
        S: AllowanceStore,
    {
        let applied = self.store.apply(batch)?;
        if applied.counters.len() != batch.ops.len()
            || applied.cooldowns.len() != batch.cooldowns.len()
        {
            return Err(shape_error(batch, &applied));
        }
        Ok(applied)
    }

    fn allocation_of(&self, subject: &str) -> Result<Arc<Resolved>, Error> {
        self.allocations
            .shard(subject)
            .read()
            .get(subject)
            .cloned()
            .ok_or_else(|| unknown_subject(subject))
    }

    /// Resolve a request: allocation, pools named for it, amounts in smallest
    /// units, cost and the allowlist's answer. Bad input fails here, before
    /// any store call.
    fn prepare(&self, req: &Request<'_>) -> Result<Prepared, Error> {
        self.prepare_inline(req)
    }

    /// [`Engine::prepare`], inlined into the hot `decide`.
    #[inline(always)]
    fn prepare_inline(&self, req: &Request<'_>) -> Result<Prepared, Error> {
        if req.event.is_some_and(str::is_empty) {
            return Err(Error::request("empty event id"));
        }
        let alloc = self.allocation_of(req.subject)?;
        // Pools named for a request are rare: resolved out of line.
        let extra = if req.pools.is_empty() {
            Vec::new()
        } else {
            self.request_pools(&alloc, &req.pools)?
        };

        let mut amounts: Inline<(usize, u64), 6> = Inline::new();
        for &(meter_id, qty) in &req.amounts {
            let Some(idx) = self.catalog.meter_idx(meter_id) else {
                return Err(unknown_meter(meter_id));
            };
            let minor = self.to_minor(idx, qty)?;
            add_amount(&mut amounts, idx, minor, &self.catalog.meter_ids[idx])?;
        }

        // Cost: Σ units × price, exact, rounded up once to the cost meter.
        let mut cost = None;
        if let Some(cm) = &alloc.plan.cost {
            let terms = amounts
                .iter()
                .filter_map(|&(idx, units)| Some((units, alloc.plan.price_units_of(idx)?)));
            let Some(minor) = cost_minor(terms, cm.scale) else {
                return Err(overflow(&cm.id));
            };
            if minor > 0 {
                add_amount(&mut amounts, cm.idx, minor, &cm.id)?;
            }
            let charged = amounts
                .iter()
                .find(|(i, _)| *i == cm.idx)
                .map_or(0, |&(_, m)| m);
            cost = Some(Money {
                amount: cm.to_decimal(charged),
                currency: cm.currency,
            });
        }

        // Model allowlist: only an allocation with its rarer parts has one.
        let model_refused = match (req.model, &alloc.more) {
            (Some(model), Some(more)) => refused_model(more, model),
            _ => None,
        };
        Ok(Prepared {
            alloc,
            extra,
            amounts,
            cost,
            model_refused,
        })
    }

    /// The pools named for a request and not listed by its allocation, in
    /// order, without repeats.
    #[cold]
    #[inline(never)]
    fn request_pools(&self, alloc: &Resolved, ids: &[&str]) -> Result<Vec<Arc<Pool>>, Error> {
        let mut extra: Vec<Arc<Pool>> = Vec::new();
        for &id in ids {
            let pool = self
                .catalog
                .pools
                .get(id)
                .ok_or_else(|| Error::UnknownPool {
                    pool: id.to_owned(),
                })?;
            if !alloc.pools().iter().chain(&extra).any(|p| p.id == pool.id) {
                extra.push(pool.clone());
            }
        }
        Ok(extra)
    }

    /// Prepare a request made on a reservation: same subject, same model.
    fn prepare_for(&self, res: &Reservation, req: &Request<'_>) -> Result<Prepared, Error> {
        if req.subject != res.subject {
            return Err(Error::request(format!(
                "reservation {} belongs to `{}`, not `{}`",
                res.id, res.subject, req.subject
            )));
        }
        if req.model.is_some_and(|m| Some(m) != res.model.as_deref()) {
            return Err(Error::request(format!(
                "reservation {} was made for model {:?}",
                res.id, res.model
            )));
        }
        if !req.pools.is_empty() {
            return Err(Error::request(
                "the pools of a reservation are fixed when it is made",
            ));
        }
        let mut full = req.clone();
        full.pools = res.pools.iter().map(String::as_str).collect();
        let mut p = self.prepare(&full)?;
        // The allowlist was checked when the work was admitted.
        p.model_refused = None;
        Ok(p)
    }

    /// Every scope a call draws on, in order: the subject, its pools, the
    /// pools named for the request, then the model's global pools not
    /// already listed. With each: its limits and its cooldown.
    #[inline]
    fn scopes<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
    ) -> impl Iterator<Item = (&'a ScopeKey, &'a [Limit], Option<i64>)> + 'a {
        let model_pools: &'a [Arc<Pool>] = model
            .and_then(|m| self.catalog.model_pools.get(m))
            .map_or(&[], Vec::as_slice);
        let alloc = &*p.alloc;
        std::iter::once((&alloc.scope, &*alloc.limits, alloc.plan.cooldown_ms))
            .chain(
                alloc
                    .pools()
                    .iter()
                    .chain(&p.extra)
                    .map(|pool| (&pool.scope, pool.limits.as_slice(), pool.cooldown_ms)),
            )
            .chain(
                model_pools
                    .iter()
                    .filter(move |mp| !alloc.pools().iter().chain(&p.extra).any(|q| q.id == mp.id))
                    .map(|pool| (&pool.scope, pool.limits.as_slice(), pool.cooldown_ms)),
            )
    }

    /// One op per limit per scope: where the request names the limit's meter
    /// (a reservation also takes a slot on each concurrent limit; a
    /// settlement also reports the limits the reservation held). The scopes
    /// are those of [`Engine::scopes`], in its order, walked without its
    /// iterator chain.
    ///
    /// Appended to `list`, made by the caller ([`OpList::new`]) in its own
    /// frame, so the list is never moved.
    #[inline(always)]
    fn ops_for<'a>(
        &'a self,
        list: &mut OpList<'a>,
        p: &'a Prepared,
        model: Option<&str>,
        shape: Shape<'_>,
    ) {
        let alloc = &*p.alloc;
        push_ops(
            list,
            &alloc.scope,
            &alloc.limits,
            p.amounts.as_slice(),
            shape,
        );
        // Pools, listed, named or the model's: out of line.
        if alloc.more.is_some() || !p.extra.is_empty() || model.is_some() {
            self.pool_ops(list, p, model, shape);
        }
    }

    /// The pool part of [`Engine::ops_for`]: the allocation's pools, those
    /// named for the request, then the model's global pools not listed.
    #[inline(never)]
    fn pool_ops<'a>(
        &'a self,
        list: &mut OpList<'a>,
        p: &'a Prepared,
        model: Option<&str>,
        shape: Shape<'_>,
    ) {
        let amounts = p.amounts.as_slice();
        let listed = p.alloc.pools().iter().chain(&p.extra);
        for pool in listed.clone() {
            push_ops(list, &pool.scope, &pool.limits, amounts, shape);
        }
        if let Some(model_pools) = model.and_then(|m| self.catalog.model_pools.get(m)) {
            for pool in model_pools {
                if !listed.clone().any(|q| q.id == pool.id) {
                    push_ops(list, &pool.scope, &pool.limits, amounts, shape);
                }
            }
        }
    }

    /// The cooldowns of the scopes a call draws on; with `start`, each
    /// starts at `start` for its own length. With `zero_passes`, none for a
    /// request whose amounts are all zero: a cooldown does not refuse it.
    #[inline(always)]
    fn cooldowns_for<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
        start: Option<DateTime<Utc>>,
        zero_passes: bool,
    ) -> Vec<CooldownOp<'a>> {
        // A request drawing only on its own scope, whose plan declares no
        // cooldown, has none to check: skip the walk over the scopes (the
        // check inline in the caller, the walk out of line).
        if model.is_none()
            && p.alloc.plan.cooldown_ms.is_none()
            && p.alloc.more.is_none()
            && p.extra.is_empty()
        {
            return Vec::new();
        }
        self.cooldown_walk(p, model, start, zero_passes)
    }

    /// [`Engine::cooldowns_for`] over every scope of the call.
    #[inline(never)]
    fn cooldown_walk<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
        start: Option<DateTime<Utc>>,
        zero_passes: bool,
    ) -> Vec<CooldownOp<'a>> {
        if zero_passes && p.is_zero() {
            return Vec::new();
        }
        self.scopes(p, model)
            .filter_map(|(scope, _, ms)| {
                let ms = ms?;
                let until =
                    start.and_then(|t| t.checked_add_signed(chrono::Duration::milliseconds(ms)));
                Some(CooldownOp::new(scope, until))
            })
            .collect()
    }

    /// The decision for a request refused by the allowlist, observed; `None`
    /// if the model is allowed.
    #[cold]
    #[inline(never)]
    fn refuse_model(
        &self,
        p: &Prepared,
        call: Call,
        req: &Request<'_>,
        now: DateTime<Utc>,
    ) -> Option<Decision> {
        let reason = p.model_refused.clone()?;
        let decision = Decision {
            // A request of zero is never `Exceeded`, whatever refuses it.
            status: if p.is_zero() {
                Status::Ok
            } else {
                Status::Exceeded
            },
            allowed: false,
            recorded: false,
            reason: Some(reason),
            limits: Vec::new(),
            binding: None,
            retry_after: None,
            cost: p.cost.clone(),
            unpriced: p.unpriced_ids(),
            allowed_on_error: false,
        };
        self.observe(call, req, now, &decision);
        Some(decision)
    }

    fn decide(&self, req: &Request<'_>, call: Call) -> Result<Decision, Error>
    where
        S: AllowanceStore,
    {
        // Inlined here: the prepared request is built in this frame, not
        // returned through two copies.
        let p = self.prepare_inline(req)?;
        let now = self.clock.now();

        // `check` and `admit` refuse a model outside the allowlist without
        // touching a counter; `record` still records (the work happened) and
        // reports the refusal.
        if call != Call::Record && p.model_refused.is_some() {
            if let Some(decision) = self.refuse_model(&p, call, req, now) {
                return Ok(decision);
            }
        }
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(&mut list, &p, req.model, Shape::Usage);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let cooldowns = if call == Call::Record {
            Vec::new()
        } else {
            self.cooldowns_for(&p, req.model, None, true)
        };
        let mode = match call {
            Call::Check => Mode::Check,
            Call::Admit => Mode::WithinLimits,
            _ => Mode::Force,
        };
        let fp;
        let mut batch = Batch::new(ops, mode, now).with_cooldowns(&cooldowns);
        if let (Some(id), Call::Admit | Call::Record) = (req.event, call) {
            fp = fingerprint(call, None, ops);
            batch = batch.with_event(EventKey::new(id, fp));
        }
        let applied = self.apply(&batch)?;
        let at = applied.replayed_at.unwrap_or(now);
        let mut decision = self.finish_quiet(call, &p, ops, limits, &applied, &cooldowns, at);
        if let Some(reason) = &p.model_refused {
            refuse(&mut decision, reason, p.is_zero());
        }
        self.observe(call, req, at, &decision);
        Ok(decision)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        call: Call,
        req: &Request<'_>,
        p: &Prepared,
        ops: &[CounterOp<'_>],
        limits: &[&Limit],
        applied: &Applied,
        cooldowns: &[CooldownOp<'_>],
        at: DateTime<Utc>,
    ) -> Decision {
        let decision = self.finish_quiet(call, p, ops, limits, applied, cooldowns, at);
        self.observe(call, req, at, &decision);
        decision
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn finish_quiet(
        &self,
        call: Call,
        p: &Prepared,
        ops: &[CounterOp<'_>],
        limits: &[&Limit],
        applied: &Applied,
        cooldowns: &[CooldownOp<'_>],
        at: DateTime<Utc>,
    ) -> Decision {
        // The latest cooldown still running, for the calls it blocks.
        let cooling = match call {
            Call::Check | Call::Admit | Call::Reserve => cooldowns
                .iter()
                .zip(&applied.cooldowns)
                .filter_map(|(c, u)| Some((c.scope, (*u)?)))
                .max_by_key(|(_, u)| *u),
            _ => None,
        };
        build_decision(
            ops,
            limits,
            applied,
            call,
            at,
            p.cost.clone(),
            p.unpriced_ids(),
            cooling,
            cooling.is_some() && p.is_zero(),
        )
    }

    /// `qty` in the smallest unit of meter `idx`: a count as it is, inline;
    /// money (and every error) out of line.
    #[inline(always)]
    fn to_minor(&self, idx: usize, qty: Quantity<'_>) -> Result<u64, Error> {
        match (&self.catalog.meters[idx].unit, qty) {
            (Unit::Count | Unit::Seconds, Quantity::Units(n)) => Ok(n),
            _ => self.to_minor_other(idx, qty),
        }
    }

    /// [`Engine::to_minor`] past a count: money, or a unit mismatch.
    #[inline(never)]
    fn to_minor_other(&self, idx: usize, qty: Quantity<'_>) -> Result<u64, Error> {
        let meter = &self.catalog.meters[idx];
        match (&meter.unit, qty) {
            (Unit::Count | Unit::Seconds, Quantity::Units(n)) => Ok(n),
            (Unit::Money { .. }, Quantity::Units(_)) => Err(Error::WrongUnit {
                meter: meter.id.clone(),
                expected: "money",
            }),
            (Unit::Count | Unit::Seconds, Quantity::Money { .. }) => Err(Error::WrongUnit {
                meter: meter.id.clone(),
                expected: "a count",
            }),
            (
                Unit::Money { currency, .. },
                Quantity::Money {
                    amount,
                    currency: c,
                },
            ) => {
                if c != currency {
                    return Err(Error::CurrencyMismatch {
                        meter: meter.id.clone(),
                        expected: currency.clone(),
                        found: c.to_owned(),
                    });
                }
                if amount.is_sign_negative() && !amount.is_zero() {
                    return Err(Error::NegativeAmount {
                        meter: meter.id.clone(),
                        amount,
                    });
                }
                meter.to_minor_ceil(amount).ok_or_else(|| Error::Overflow {
                    meter: meter.id.clone(),
                })
            }
        }
    }

    fn observe(&self, call: Call, req: &Request<'_>, at: DateTime<Utc>, decision: &Decision) {
        if let Some(o) = &self.observer {
            o.on_decision(&DecisionEvent {
                call,
                subject: req.subject,
                model: req.model,
                at,
                decision,
            });
        }
    }
}

/// A request resolved against its allocation.
struct Prepared {
    alloc: Arc<Resolved>,
    /// Pools named by the request and not listed by the allocation.
    extra: Vec<Arc<Pool>>,
    /// Amount per meter index, in smallest units, the cost meter included.
    amounts: Inline<(usize, u64), 6>,
    cost: Option<Money>,
    model_refused: Option<Refusal>,
}

impl Prepared {
    /// Whether every amount of the request is zero (its cost too).
    fn is_zero(&self) -> bool {
        self.amounts.iter().all(|&(_, n)| n == 0)
    }

    /// The ids of the request's unpriced meters, in request order, for a
    /// decision. The plan's table has an id only where a meter is
    /// unpriced (never the cost meter, which `amounts` may end with), so
    /// the amounts give them; counted first, for one allocation of the
    /// right size, none when there is none.
    #[inline]
    fn unpriced_ids(&self) -> Vec<Name> {
        let plan = &self.alloc.plan;
        let n = self
            .amounts
            .iter()
            .filter(|&&(i, _)| plan.unpriced_of(i).is_some())
            .count();
        if n == 0 {
            return Vec::new();
        }
        let mut v = Vec::with_capacity(n);
        v.extend(
            self.amounts
                .iter()
                .filter_map(|&(i, _)| plan.unpriced_of(i)),
        );
        v
    }
}

/// The ops of one scope's limits for [`Engine::ops_for`], appended to
/// `list`.
#[inline(always)]
fn push_ops<'a>(
    list: &mut OpList<'a>,
    scope: &'a ScopeKey,
    limits: &'a [Limit],
    amounts: &[(usize, u64)],
    shape: Shape<'_>,
) {
    for l in limits {
        let named = amounts
            .iter()
            .find(|(i, _)| *i == l.meter_idx)
            .map(|&(_, d)| d);
        let delta = match (l.window, shape) {
            (Window::Concurrent, Shape::Usage) => None,
            (Window::Concurrent, Shape::Reserve) => Some(1),
            (Window::Concurrent, Shape::Settle(_)) => Some(0),
            (_, Shape::Settle(held)) => {
                named.or_else(|| held.iter().any(|(i, _, _)| *i == l.meter_idx).then_some(0))
            }
            _ => named,
        };
        if let Some(delta) = delta {
            list.ops
                .push(CounterOp::new(scope, &l.meter, l.window, delta, l.max));
            list.limits.push(l);
        }
    }
}

/// A call's ops and, for each, the limit it counts against.
struct OpList<'a> {
    ops: Inline<CounterOp<'a>, INLINE_OPS>,
    limits: Inline<&'a Limit, INLINE_OPS>,
}

impl<'a> OpList<'a> {
    /// An empty list; its spare slots (never read) name `scope`.
    #[inline(always)]
    fn new(scope: &'a ScopeKey) -> Self {
        OpList {
            ops: Inline::filled(CounterOp::new(scope, "", Window::Lifetime, 0, None)),
            limits: Inline::filled(&*NO_LIMIT),
        }
    }
}

/// A reservation between its checks and its store call.
struct Opening {
    id: LeaseId,
    p: Prepared,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
}

impl Opening {
    /// The batch that opens the lease over `ops`.
    fn batch<'a>(&'a self, ops: &'a [CounterOp<'a>], cooldowns: &'a [CooldownOp<'a>]) -> Batch<'a> {
        let lease = LeaseOp::new(
            self.id,
            &self.p.alloc.scope,
            LeaseAction::Open {
                expires_at: self.expires_at,
                deadline: self.deadline,
            },
        );
        Batch::new(ops, Mode::WithinLimits, self.now)
            .with_lease(lease)
            .with_cooldowns(cooldowns)
    }
}

/// Which limits a call's batch names.
#[derive(Clone, Copy)]
enum Shape<'r> {
    /// Limits whose meter the request names; no concurrent limits.
    Usage,
    /// As `Usage`, plus one slot on every concurrent limit.
    Reserve,
    /// As `Usage`, plus the limits the reservation holds and every
    /// concurrent limit, to report them.
    Settle(&'r [(usize, Name, u64)]),
}

/// `now + ttl`, refusing a zero or unrepresentable lease.
fn after(now: DateTime<Utc>, ttl: std::time::Duration) -> Result<DateTime<Utc>, Error> {
    if ttl.is_zero() {
        return Err(Error::request("a lease needs a ttl above zero"));
    }
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| Error::request(format!("lease ttl {ttl:?} is out of range")))
}

/// FNV-1a, 64 bit ([`fnv::FnvHasher`]): a digest that is the same in every
/// process and build, so a ledger restored from a snapshot (or shared
/// through a backend) still recognises its events. Integers are written as
/// little-endian bytes, never through `Hasher::write_u64` (native endian).
struct Fnv(fnv::FnvHasher);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        self.0.write(b);
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

/// What an event does: the call, the lease, and every op (scope, meter,
/// window, delta, maximum). A retry of the same request on the same plan
/// has the same fingerprint.
#[inline(never)]
fn fingerprint(call: Call, lease: Option<LeaseId>, ops: &[CounterOp<'_>]) -> u64 {
    let mut h = Fnv(fnv::FnvHasher::default());
    h.u64(match call {
        Call::Check => 0,
        Call::Admit => 1,
        Call::Record => 2,
        Call::Reserve => 3,
        Call::Grow => 4,
        Call::Commit => 5,
        Call::Release => 6,
    });
    let bits = lease.map_or(0, LeaseId::as_u128);
    h.bytes(&bits.to_le_bytes());
    for op in ops {
        h.u64(op.scope.kind() as u64);
        h.str(op.scope.id());
        h.str(op.meter);
        match op.window {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                h.u64(1);
                h.u64(period as u64);
                h.u64(i64::from(utc_offset_secs) as u64);
            }
            Window::Rolling { span_secs, buckets } => {
                h.u64(2);
                h.u64(span_secs);
                h.u64(u64::from(buckets));
            }
            Window::Lifetime => h.u64(3),
            Window::Concurrent => h.u64(4),
        }
        h.u64(op.delta);
        h.u64(op.max.map_or(u64::MAX, |m| m));
        h.u64(u64::from(op.max.is_some()));
    }
    h.0.finish()
}

#[inline]
fn add_amount(
    amounts: &mut Inline<(usize, u64), 6>,
    idx: usize,
    n: u64,
    id: &str,
) -> Result<(), Error> {
    match amounts.as_mut_slice().iter_mut().find(|(i, _)| *i == idx) {
        Some((_, v)) => match v.checked_add(n) {
            Some(sum) => *v = sum,
            None => return Err(overflow(id)),
        },
        None => amounts.push((idx, n)),
    }
    Ok(())
}

/// [`Error::Overflow`] on `meter`, built out of the way of the common path.
#[cold]
#[inline(never)]
fn overflow(meter: &str) -> Error {
    Error::Overflow {
        meter: meter.to_owned(),
    }
}

/// [`Error::UnknownSubject`], built out of the way of the common path.
#[cold]
#[inline(never)]
fn unknown_subject(subject: &str) -> Error {
    Error::UnknownSubject {
        subject: subject.to_owned(),
    }
}

/// [`Error::UnknownMeter`], built out of the way of the common path.
#[cold]
#[inline(never)]
fn unknown_meter(meter: &str) -> Error {
    Error::UnknownMeter {
        meter: meter.to_owned(),
    }
}

/// The error for a store whose answer does not match its batch.
#[cold]
#[inline(never)]
fn shape_error(batch: &Batch<'_>, applied: &Applied) -> Error {
    Error::Store {
        message: format!(
            "store returned {} counters for {} ops and {} cooldowns for {}",
            applied.counters.len(),
            batch.ops.len(),
            applied.cooldowns.len(),
            batch.cooldowns.len()
        ),
    }
}

/// The allowlist refusal of `model`, if the allocation has an allowlist
/// without it.
#[inline(never)]
fn refused_model(more: &More, model: &str) -> Option<Refusal> {
    match &more.models {
        Some(allowed) if !allowed.iter().any(|m| m == model) => Some(Refusal::ModelNotAllowed {
            model: model.to_owned(),
        }),
        _ => None,
    }
}

/// Turn `decision` into the allowlist's refusal: a recorded request
/// (`record`) still reports the counters it touched. A request of `zero`
/// keeps the status of its limits (never `Exceeded`).
#[cold]
#[inline(never)]
fn refuse(decision: &mut Decision, reason: &Refusal, zero: bool) {
    if !zero {
        decision.status = Status::Exceeded;
    }
    decision.allowed = false;
    decision.reason = Some(reason.clone());
    decision.retry_after = None;
}

/// The status rule: `Exceeded` when a positive request takes usage (with
/// holds) past the maximum; `Warning` when it is positive and reaches the
/// warning threshold; `Ok` otherwise.
fn status_of(limit: &Limit, after: u64, delta: u64) -> Status {
    match limit.max {
        Some(m) if delta > 0 && after > m => Status::Exceeded,
        Some(_) if after > 0 && after >= limit.warn_threshold => Status::Warning,
        _ => Status::Ok,
    }
}

/// The batch behind a usage report: every limit of the allocation, read
/// (delta 0) in check mode.
fn usage_ops(alloc: &Resolved) -> Vec<CounterOp<'_>> {
    alloc
        .limits
        .iter()
        .map(|l| CounterOp::new(&alloc.scope, &l.meter, l.window, 0, l.max))
        .collect()
}

/// A report's status: like [`status_of`] for a zero request, except that
/// usage already past the maximum (through `record`) is `Exceeded`.
fn report_status(limit: &Limit, used: u64) -> Status {
    match limit.max {
        Some(m) if used > m => Status::Exceeded,
        _ => status_of(limit, used, 0),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_decision(
    ops: &[CounterOp<'_>],
    limits: &[&Limit],
    applied: &Applied,
    call: Call,
    now: DateTime<Utc>,
    cost: Option<Money>,
    unpriced: Vec<Name>,
    cooling: Option<(&ScopeKey, DateTime<Utc>)>,
    zero: bool,
) -> Decision {
    let mut any_exceeded = false;
    // Found in the same pass: the worst status, and the limit with the least
    // headroom as a fraction of its maximum (remaining_a / max_a <
    // remaining_b / max_b; the first of equals), the binding limit unless
    // one is exceeded.
    let mut status = Status::Ok;
    let mut least: Option<(usize, u128, u128)> = None;
    // Collected from zipped slices: one allocation of exactly `ops.len()`
    // (the store answers one state per op), each state written in place
    // rather than built and then copied by a push.
    let states: Vec<LimitState> = ops
        .iter()
        .zip(limits)
        .zip(&applied.counters)
        .enumerate()
        .map(|(i, ((op, limit), s))| {
            let s: &CounterState = s;
            // What this call adds here: its delta, plus what a settlement charged.
            let charged: u64 = applied
                .settled
                .iter()
                .filter(|h: &&SettledHold| {
                    h.scope == *op.scope && &*h.meter == op.meter && h.window == op.window
                })
                .map(|h| h.charged)
                .sum();
            let requested = op.delta.saturating_add(charged);
            // Usage with holds as if the request were recorded: for an applied
            // batch the store already includes it.
            let now_total = s.used.saturating_add(s.held);
            let after = if applied.applied {
                now_total
            } else {
                now_total.saturating_add(op.delta)
            };
            let this = status_of(limit, after, requested);
            any_exceeded |= this == Status::Exceeded;
            status = status.max(this);
            let remaining = op.max.map(|m| m.saturating_sub(now_total));
            if let (Some(max), Some(rem)) = (op.max, remaining) {
                let (r, m) = (u128::from(rem), u128::from(max.max(1)));
                if least.is_none_or(|(_, br, bm)| r * bm < br * m) {
                    least = Some((i, r, m));
                }
            }
            LimitState {
                scope: op.scope.clone(),
                meter: limit.meter,
                window: op.window,
                requested,
                used: s.used,
                held: s.held,
                max: op.max,
                remaining,
                period_start: s.period_start,
                resets_at: s.resets_at,
                status: this,
            }
        })
        .collect();
    let allowed = match call {
        Call::Admit | Call::Reserve => applied.applied,
        Call::Check => !any_exceeded && cooling.is_none(),
        _ => !any_exceeded,
    };

    // Binding limit and retry time.
    let mut binding = None;
    let mut retry_at: Option<Option<DateTime<Utc>>> = None;
    if any_exceeded {
        for (i, (st, s)) in states.iter().zip(&applied.counters).enumerate() {
            if st.status != Status::Exceeded {
                continue;
            }
            let later = match (retry_at, s.available_at) {
                (None, _) => true,
                (Some(None), _) => false,
                (Some(Some(_)), None) => true,
                (Some(Some(a)), Some(b)) => b > a,
            };
            if later {
                binding = Some(i);
                retry_at = Some(s.available_at);
            }
        }
    } else {
        binding = least.map(|(i, _, _)| i);
    }
    let mut reason = (!allowed).then_some(Refusal::LimitExceeded);
    if let (Some((scope, until)), false) = (cooling, allowed) {
        // A cooldown refuses whatever the limits say (a request of zero
        // keeps their status: it is never `Exceeded`); waiting helps only
        // if it also helps every exceeded limit.
        if !zero {
            status = Status::Exceeded;
        }
        reason = Some(Refusal::Cooldown {
            scope: scope.clone(),
            until,
        });
        retry_at = match retry_at {
            None => Some(Some(until)),
            Some(Some(t)) => Some(Some(t.max(until))),
            Some(None) => Some(None),
        };
    }
    let retry_after = if allowed {
        None
    } else {
        retry_at
            .flatten()
            .map(|t| (t - now).to_std().unwrap_or_default())
    };
    let charged_any = applied.settled.iter().any(|h| h.charged > 0);
    Decision {
        status,
        allowed,
        // A request none of whose meters has a limit touches no counter.
        recorded: applied.applied && (ops.iter().any(|op| op.delta > 0) || charged_any),
        reason,
        limits: states,
        binding,
        retry_after,
        cost,
        unpriced,
        allowed_on_error: false,
    }
}

#[cfg(test)]
mod tests {
    use super::{Table, TABLE_SHARDS};
    use crate::{
        Allocation, CatalogConfig, Engine, LimitConfig, MaxConfig, Meter, Period, PlanConfig,
        Request, Status, Window,
    };

    /// The binding limit of an allowed request is the one with the least
    /// headroom as a fraction of its maximum, the first of equals; an
    /// unlimited limit never binds; the status is the worst limit's.
    #[test]
    fn least_headroom_binds_first_of_equals_and_status_is_the_worst() {
        let day = Window::calendar(Period::Day);
        let catalog = CatalogConfig::default()
            .meter(Meter::count("x"))
            .meter(Meter::count("y"))
            .meter(Meter::count("z"))
            .meter(Meter::count("u"))
            .plan(
                PlanConfig::new("p")
                    .limit(LimitConfig::new("u", day, MaxConfig::Unlimited))
                    .limit(LimitConfig::new("x", day, 10u64))
                    .limit(LimitConfig::new("y", day, 20u64))
                    .limit(LimitConfig::new("z", day, 20u64)),
            )
            .build()
            .unwrap();
        let engine = Engine::new(catalog);
        for s in ["a", "b", "c"] {
            engine.allocate(Allocation::new(s, "p")).unwrap();
        }
        let ask = |s, x, y, z| {
            let d = engine
                .admit(
                    &Request::new(s)
                        .units("u", 1_000)
                        .units("x", x)
                        .units("y", y)
                        .units("z", z),
                )
                .unwrap();
            (d.binding, d.status)
        };
        // Admitted, so usage grows. x and y both have half left: the
        // first (x, index 1) binds.
        assert_eq!(ask("a", 5, 10, 1), (Some(1), Status::Ok));
        // y has less left than x and z.
        assert_eq!(ask("b", 4, 10, 2), (Some(2), Status::Ok));
        // z has the least left, at the warning ratio (80 %).
        assert_eq!(ask("c", 0, 0, 17), (Some(3), Status::Warning));
        // Refused: the exceeded limit binds, whatever the headroom elsewhere.
        assert_eq!(ask("a", 1, 11, 1), (Some(2), Status::Exceeded));
    }

    /// The unpriced meters are listed once each, in request order (a meter
    /// named twice counts once; priced, money and cost meters never), and
    /// both lists of a decision are allocated at their exact length.
    #[test]
    fn unpriced_meters_in_request_order_and_lists_at_exact_capacity() {
        let day = Window::calendar(Period::Day);
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tok"))
            .meter(Meter::count("jobs"))
            .meter(Meter::seconds("run"))
            .meter(Meter::money("cost", "USD", 6))
            .meter(Meter::money("spend", "USD", 2))
            .plan(
                PlanConfig::new("p")
                    .limit(LimitConfig::new("tok", day, 1_000u64))
                    .limit(LimitConfig::new("run", day, 1_000u64))
                    .limit(LimitConfig::new("cost", day, rust_decimal::Decimal::ONE))
                    .cost_meter("cost")
                    .price("tok", rust_decimal::Decimal::new(3, 3)),
            )
            .plan(PlanConfig::new("free").limit(LimitConfig::new("tok", day, 1_000u64)))
            .build()
            .unwrap();
        let engine = Engine::new(catalog);
        engine.allocate(Allocation::new("a", "p")).unwrap();
        engine.allocate(Allocation::new("b", "free")).unwrap();
        let request = |s| {
            Request::new(s)
                .units("run", 2)
                .units("tok", 10)
                .money("spend", rust_decimal::Decimal::ONE, "USD")
                .units("jobs", 1)
                .units("run", 3)
        };
        let d = engine.admit(&request("a")).unwrap();
        let ids: Vec<&str> = d.unpriced.iter().map(|m| &**m).collect();
        assert_eq!(ids, ["run", "jobs"]);
        assert_eq!(d.unpriced.capacity(), 2);
        // tok, run and the cost of tok.
        assert_eq!(d.limits.len(), 3);
        assert_eq!(d.limits.capacity(), 3);
        // Without a cost meter nothing is unpriced, and nothing is allocated.
        let d = engine.admit(&request("b")).unwrap();
        assert!(d.unpriced.is_empty());
        assert_eq!(d.unpriced.capacity(), 0);
        assert_eq!(d.limits.capacity(), d.limits.len());
    }

    /// Fingerprints are compared across processes and builds (a restored
    /// snapshot, a shared Redis ledger): pinned, so a change to the hash or
    /// to what it reads cannot pass unnoticed.
    #[test]
    fn fingerprint_is_pinned() {
        use super::{fingerprint, Call};
        use crate::store::{CounterOp, LeaseId, ScopeKey};
        let agent = ScopeKey::subject("agent-7");
        let pool = ScopeKey::pool("account:acme");
        let ops = [
            CounterOp::new(
                &agent,
                "llm_tokens_input",
                Window::calendar(Period::Month),
                1_200,
                Some(20_000),
            ),
            CounterOp::new(&agent, "jobs", Window::Concurrent, 1, Some(2)),
            CounterOp::new(
                &agent,
                "requests",
                Window::Calendar {
                    period: Period::Day,
                    utc_offset_secs: -9 * 3_600,
                },
                0,
                Some(0),
            ),
            CounterOp::new(&pool, "cost", Window::Lifetime, 36_000, None),
            CounterOp::new(
                &pool,
                "exec_seconds",
                Window::Rolling {
                    span_secs: 7 * 86_400,
                    buckets: 28,
                },
                90,
                Some(18_000),
            ),
        ];
        let lease = LeaseId::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(fingerprint(Call::Admit, None, &ops), 0x2aa2_b381_fed4_70d1);
        assert_eq!(
            fingerprint(Call::Commit, Some(lease), &ops),
            0x9410_4d6a_489b_4ad5
        );
        assert_eq!(fingerprint(Call::Record, None, &[]), 0xcf21_924e_7b0f_f7c7);
    }

    fn index(t: &Table, id: &str) -> usize {
        let shard = t.shard(id);
        t.shards
            .iter()
            .position(|s| std::ptr::eq(&s.0, shard))
            .expect("a shard of the table")
    }

    #[test]
    fn table_shards_spread_ordinary_ids_and_take_any_id() {
        let t = Table::default();
        let mut used = [0usize; TABLE_SHARDS];
        for i in 0..1_000 {
            used[index(&t, &format!("agent-{i}"))] += 1;
        }
        assert!(used.iter().all(|&n| n > 20), "{used:?}");
        for id in [
            "",
            "a",
            "7",
            "ünïcödé-subject-ids",
            "x".repeat(10_000).as_str(),
        ] {
            assert_eq!(index(&t, id), index(&t, id));
        }
        assert_eq!(t.len(), 0);
    }
}
