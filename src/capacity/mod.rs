//! Capacity leases: shared counters at memory speed (feature `async`).
//!
//! [`CapacityStore`] wraps a shared [`AsyncAllowanceStore`] (Redis,
//! PostgreSQL) and is itself one, so an [`Engine`](crate::Engine) runs on it
//! unchanged. For each *shape* of admit (the exact list of counters a
//! request touches: its scopes, meters, windows and maxima) it borrows a
//! **slice** of every counter from the shared store as holds under one
//! lease ([`LeaseAction::Open`]), admits locally while the slice covers a
//! request, and turns what it admitted into usage when the slice
//! **settles** ([`LeaseAction::Settle`] with `keep` zero and the admitted
//! amounts as the batch's usage, mode `Force`). A hold counts for every
//! other replica at once and returns by itself at the lease's expiry, so a
//! replica that dies with slices out leaves nothing behind past
//! [`CapacityConfig::lease_ttl`].
//!
//! ```no_run
//! # async fn demo<S: tollgate::store::AsyncAllowanceStore + 'static>(
//! #     shared: S, catalog: tollgate::Catalog) -> Result<(), tollgate::Error> {
//! use std::sync::Arc;
//! use tollgate::capacity::{CapacityConfig, CapacityStore};
//! use tollgate::{Allocation, Clock, Engine, Request, SystemClock};
//!
//! // `shared`: a RedisStore or PostgresStore every replica uses.
//! let store = Arc::new(CapacityStore::new(shared, CapacityConfig::new().replicas(4))?);
//! let engine = Engine::with_store_and_clock(catalog, Arc::clone(&store), SystemClock);
//! engine.allocate(Allocation::new("agent-7", "plan_free"))?;
//! // Top up and settle every `top_up_interval`, in the background:
//! let bg = Arc::clone(&store);
//! tokio::spawn(async move {
//!     loop {
//!         bg.maintain(SystemClock.now()).await;
//!         tokio::time::sleep(bg.config().top_up_interval_value()).await;
//!     }
//! });
//! let decision = engine.admit_async(&Request::new("agent-7").units("tokens", 120)).await?;
//! // … and before the process exits, give every slice back:
//! store.shutdown(SystemClock.now()).await;
//! # Ok(()) }
//! ```
//!
//! # What goes local and what goes to the store
//!
//! Only a plain admit is decided locally: a [`Mode::WithinLimits`] batch
//! with no lease, no cooldown, no balance, no [`Window::Concurrent`]
//! counter, and either no event id or one the async engine made for that
//! very call ([`EventKey::engine_made`], see below). A [`Mode::Check`] of
//! such a shape is answered
//! locally when the slice covers it. **Everything else goes straight to
//! the inner store, unchanged**, so it keeps its exact semantics:
//!
//! - *Evented calls* (a host's event id): the store's ledger applies them
//!   once (contract rule 8). The slices this engine holds count there as
//!   holds, so the store decides against used + every replica's holds.
//!   Every id the host passes ([`Request::event`](crate::Request::event))
//!   is the host's, whatever its shape, and goes to the store; so does a
//!   host's retry with an id the engine once made.
//! - *Reservations* (`reserve`, `renew`, `grow`, `commit`, `release`) and
//!   *concurrency limits*: a concurrent "in flight" counter is a count of
//!   live leases and cannot be sliced; those batches carry a lease and go
//!   to the store.
//! - *Balances and priced plans that spend a balance*, *cooldowns*, and
//!   `record` (mode `Force`): straight to the store in this first version.
//! - *Usage reports* ([`Engine::usage_async`](crate::Engine::usage_async))
//!   read the store. What this engine admitted locally becomes usage when
//!   its slice settles, at the latest one [`CapacityConfig::top_up_interval`]
//!   later if [`CapacityStore::maintain`] runs every interval: **a usage
//!   report lags by at most one top-up interval** (plus one settle's round
//!   trip).
//!
//! An event id the engine made (`tollgate:` and 128 random bits, given to
//! every async admit on a store that [needs event
//! ids](AsyncAllowanceStore::needs_event_ids)) exists only so that a retry
//! after [`Error::StoreOutcomeUnknown`] counts once. The engine marks the
//! batch's key ([`EventKey::engine_made`]): no earlier try of that id
//! exists, so deciding it locally cannot count anything twice. The host
//! retries with the id the error named through
//! [`Request::event`](crate::Request::event), unmarked, so the retry goes
//! to the store, whose ledger replays it if the first try applied — on
//! this replica or any other, before or after a restart.
//!
//! # Slices: size, top-up, give back
//!
//! - A slice covers about [`CapacityConfig::slice_decisions`] requests of
//!   the shape's last size, or twice what the shape used in the last
//!   top-up interval, whichever is larger.
//! - It shrinks near the limit: at most `free / replicas` of each counter,
//!   where `free = max - used - held` as the store last answered (for a
//!   shape's first slice, before any answer, the whole maximum; for an
//!   unlimited counter, `u64::MAX`, so no slice can make another
//!   replica's counter overflow). When
//!   that is less than [`CapacityConfig::min_slice_decisions`] requests of
//!   the current size, the slice is given back and the shape's decisions
//!   go **straight to the store** for one top-up interval, then it looks
//!   again.
//! - A request its slice cannot cover grows the lease by what is missing
//!   plus a new slice (one round trip); [`CapacityStore::maintain`] tops up
//!   slices that are three-quarters used, and replaces every slice that
//!   admitted anything in the last interval, in the background: it opens
//!   the next slice first (local admits go on from the old one), then
//!   settles the old one.
//! - A slice is given back (settled: its admitted part becomes usage, the
//!   rest returns) when it has been idle for four top-up intervals, before
//!   its calendar period ends (no local admit within two top-up intervals
//!   of the period's end), halfway through its lease, on
//!   [`CapacityStore::shutdown`], and when the shape goes straight to the
//!   store.
//!
//! # Guarantees
//!
//! - **Never over-admits.** Every local admit is covered by a hold the
//!   shared store counted before it; the store refuses a slice that does
//!   not fit, and a grown slice is used only if it still covers the
//!   request once the store answered. A slice is used locally only until
//!   half its lease has run; `maintain` settles it long before the lease
//!   expires, so what it admitted becomes usage. A settle that fails on a
//!   store error, or whose future is dropped midway (an admit's request
//!   timeout, a `maintain` pass the host bounds with a timeout), is kept
//!   and tried again by every `maintain` and `shutdown` (its event id,
//!   `tollgate-capacity:{lease}`, makes a retry safe); meanwhile its hold
//!   still counts. If the lease expired first
//!   (the store unreachable for about half a lease, a forward clock step
//!   past the lease, or no `maintain`), what the slice admitted is charged
//!   as plain usage (mode `Force`) when the store answers: counted late,
//!   never dropped. Between that expiry and the late charge, other
//!   replicas may use the returned hold, so the counter can end above its
//!   maximum by at most what that slice admitted
//!   ([`CapacityStats::late_charges`] counts these). One case is not
//!   charged late: a settle one of whose tries ended with an unknown
//!   outcome (it may have applied) and that the store answers with an
//!   unknown lease (it forgot the lease, its event horizon past the
//!   lease's expiry). Charging it could count it twice; it is counted in
//!   [`CapacityStats::uncertain_settles`] instead, and the counter may be
//!   short by at most what that slice admitted. Tested by
//!   `tests/capacity_{redis,postgres,memory}.rs` (eight engines at once,
//!   random sizes: the counters end equal to what was admitted, at or
//!   below the maximum) and, step by step with every interleaving of
//!   admits, `maintain`, clock steps and restarts a seeded generator
//!   makes, by `tests/capacity_memory.rs`.
//! - **A killed replica loses nothing past its lease expiry.** Its holds
//!   return at expiry, nothing charged (contract rule 7), and the whole
//!   maximum less what was settled can be admitted again. What it had
//!   admitted locally since its last settle is *not* charged: like the
//!   work of a reservation whose holder crashed, it is forgotten, so a
//!   crash can let that much through past the maximum. Bound: what the
//!   replica admitted in its last top-up interval, at most its slices.
//! - **Extra refusals near the limit are bounded.** A request is refused
//!   only when `used + held_by_others + (delta - own_unused) > max`: this
//!   engine's own unused slice never refuses its own request on its slow
//!   path, and neither do its other shapes' slices: on a refusal that
//!   holds make, it settles its other shapes' slices on the same counters
//!   and asks once more (a scan of the shape table, on such refusals
//!   only). A refusal a single store would not make comes from other
//!   replicas' unused slices (each at most `free / replicas` at its grant,
//!   given back within one top-up interval of its replica seeing free
//!   space below the sharing threshold, or after four idle intervals), or
//!   from a request that reached the store while this engine's own slice
//!   was being grown. Once every replica goes straight to the store, the
//!   capacity left unadmitted is below one request, as with a single
//!   store (asserted by the eight-engine tests).
//!   [`CapacityStats::refused_by_holds`] counts refusals that would have
//!   fit with no hold at all; BENCHMARKS.md has the measured counts.
//!
//! # Running it
//!
//! - Run [`CapacityStore::maintain`] every
//!   [`CapacityConfig::top_up_interval`] (a background task) and
//!   [`CapacityStore::shutdown`] before exit. Without `maintain`, a slice
//!   is settled only when a request it cannot cover comes; one left alone
//!   past its lease's expiry is charged late (see Guarantees). Settles
//!   that still fail at `shutdown` stay pending
//!   ([`CapacityStats::pending_settles`]): call `shutdown` (or `maintain`)
//!   again once the store is back; a process that exits with settles
//!   pending loses them as a killed replica would. `shutdown` waits for
//!   shapes whose store call is running (an admit growing its slice, a
//!   `maintain` job) at most four top-up intervals of real time in all;
//!   past that (a hung call) it settles such a slice anyway and gives the
//!   shape up: the running call's request goes to the store, and a slice
//!   it opens meanwhile is given back at once. After `shutdown`,
//!   `maintain` settles slices and never opens new ones.
//! - Cancellation: every future may be dropped at any await (a request
//!   timeout, a bounded `maintain` pass). A shape's store call marks it
//!   busy under a guard that unmarks it on drop, and a settle under way is
//!   put back on the pending list on drop: nothing admitted is lost and no
//!   shape stays busy. A dropped open or grow may leave holds, which
//!   return when the slice settles or at the lease's expiry.
//! - Clock steps: a step forward past a lease is a late charge (see
//!   Guarantees); after a step back of an interval or more, `maintain`
//!   settles every used slice at once and goes on every interval.
//! - The engine's clock sets the leases' expiry. On a store that rolls on
//!   its own clock (`RedisStore` with `TimeSource::Server`, the default),
//!   keep the two within half a lease of each other.
//! - Round trips: about two per shape with admits per top-up interval
//!   (open the next slice, settle the last), plus one per slice that runs
//!   out between intervals; far from the limits that is well under 0.05
//!   per decision (measured in BENCHMARKS.md). `maintain` runs up to 16
//!   shapes' calls at once: the usage-report lag stays one interval while
//!   a pass (about `2 × active shapes / 16` round trips) fits in one;
//!   with more active shapes, lengthen the interval.
//! - A slice whose open or grow ended with an unknown outcome may have
//!   left holds: they return when the slice settles, or at the lease's
//!   expiry.
//! - Shares are per shape: a pool counter that many subjects' shapes draw
//!   on may be held by one slice per shape per replica, each at most
//!   `free / replicas`; idle shapes give theirs back after four intervals.
//! - On a store that needs event ids (Redis, PostgreSQL), the async
//!   engine makes one for every admit, local ones included; that costs
//!   about a third of a local admit (BENCHMARKS.md). The store's own
//!   switch (`RedisConfig::engine_event_ids(false)`) removes it, with the
//!   trade-off it documents for calls that reach the store.
//! - A usage report reads the store: it shows this engine's unused slices
//!   as held, and its local admissions once they settle.
//!
//! # Windows
//!
//! - *Calendar*: a slice is not used locally within two top-up intervals
//!   of its period's end; `maintain` settles it before the roll, so its
//!   usage lands in the period it was admitted in. A settle that comes
//!   after another replica rolled the counter lands in the new period
//!   (contract rule 2: counted late, never lost).
//! - *Rolling*: usage is written when the slice settles, so it enters its
//!   bucket up to one top-up interval late and leaves the window that much
//!   late (never early).
//! - *Lifetime*: as calendar, with no roll.
//! - *Usage history* (`period_usage`, `Engine::usage_in_async`) reads the
//!   inner store: a closed period holds what its slices admitted, since
//!   they settled before it ended.
//!
//! The answers of local decisions report each counter as the store last
//! answered this engine, plus what this engine admitted since: other
//! replicas' admissions since then show only as their holds.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::name::Name;
use crate::store::{
    Applied, AsyncAllowanceStore, Batch, CounterOp, CounterState, EventKey, FailurePolicy,
    Fraction, LeaseAction, LeaseId, LeaseInfo, LeaseOp, Mode, PeriodOp, ScopeKey,
};
use crate::window::Window;
use crate::Error;

/// Lock shards of the shape table.
const SHARDS: usize = 16;
/// How many times a settle is retried after a store error.
const SETTLE_TRIES: usize = 3;
/// How many shapes `maintain` works on at once.
const MAINTAIN_AT_ONCE: usize = 16;

mod admit;
mod background;
mod config;
mod stats;

pub use config::CapacityConfig;
pub use stats::CapacityStats;
use stats::{bump, Counters};

/// One counter of a shape.
#[derive(Clone, PartialEq, Eq, Hash)]
struct OpKey {
    scope: ScopeKey,
    meter: Name,
    window: Window,
    max: Option<u64>,
}

impl OpKey {
    fn matches(&self, op: &CounterOp<'_>) -> bool {
        self.meter == op.meter
            && self.window == op.window
            && self.max == op.max
            && self.scope == *op.scope
    }
}

/// One counter's slice.
#[derive(Clone, Copy, Default)]
struct OpSlice {
    /// Held under the lease.
    granted: u64,
    /// Admitted locally, not yet settled.
    consumed: u64,
    /// The store's `used` at the last answer.
    base_used: u64,
    /// The store's `held` at the last answer, less this slice's hold.
    base_held_others: u64,
    /// What was free at the last answer (`max - used - held`, all holds).
    free: u64,
    period_start_ms: Option<i64>,
    resets_at_ms: Option<i64>,
    /// The last request's delta.
    last_delta: u64,
    /// Admitted since the last settle or top-up sizing.
    demand: u64,
}

#[derive(Default)]
struct ShapeState {
    /// A store call for this shape is running: others pass through.
    busy: bool,
    lease: Option<LeaseId>,
    expires_at_ms: i64,
    /// Local admits only before this instant.
    use_until_ms: i64,
    last_settle_ms: i64,
    last_use_ms: i64,
    /// Straight to the store until this instant.
    direct_until_ms: i64,
    /// Removed from the shape table by `forget`: whoever still holds it
    /// passes its batches to the store (no slice on a shape no `maintain`
    /// or `shutdown` would see).
    gone: bool,
    slices: SmallVec<[OpSlice; 4]>,
    /// Counted here, under the lock already taken, not on a shared atomic.
    local_admits: u64,
    local_checks: u64,
}

struct Shape {
    ops: SmallVec<[OpKey; 4]>,
    owner: ScopeKey,
    state: Mutex<ShapeState>,
}

type Shard = RwLock<HashMap<u64, SmallVec<[Arc<Shape>; 1]>, BuildHasherDefault<KeyHasher>>>;

/// The shape table's keys are keyed hashes already: used as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// An [`AsyncAllowanceStore`] that admits from slices of a shared store's
/// counters, borrowed as holds under leases. See the [module docs](self).
pub struct CapacityStore<S> {
    inner: S,
    config: CapacityConfig,
    shards: Box<[Shard]>,
    shapes: AtomicU64,
    hasher: foldhash::fast::RandomState,
    /// Settles that failed on a store error (or whose future was
    /// dropped), retried by `maintain` and `shutdown`.
    pending: Mutex<Vec<PendingSettle>>,
    /// How many settles are pending, those being retried included.
    pending_count: AtomicU64,
    closed: AtomicBool,
    counters: Counters,
}

impl<S: std::fmt::Debug> std::fmt::Debug for CapacityStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapacityStore")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("shapes", &self.shapes.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A settle that failed on a store error: retried until it lands.
struct PendingSettle {
    ops: SmallVec<[OpKey; 4]>,
    owner: ScopeKey,
    lease: LeaseId,
    consumed: SmallVec<[u64; 4]>,
    /// A try ended with an unknown outcome: the settle may have applied.
    maybe_applied: bool,
}

/// A settle whose lease is out of its shape: until it has landed, it is
/// this value's. Dropped unfinished (every try failed, or the future
/// running it was dropped: a request timeout, a `maintain` pass bounded
/// by the host), it goes to the pending list, so what the slice admitted
/// is still charged.
struct Unsettled<'a, S> {
    store: &'a CapacityStore<S>,
    item: Option<PendingSettle>,
    /// Already counted in `pending_count` (taken from the pending list).
    counted: bool,
}

impl<S> Unsettled<'_, S> {
    /// It landed: nothing to keep.
    fn done(&mut self) {
        if self.item.take().is_some() && self.counted {
            self.store.pending_count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<S> Drop for Unsettled<'_, S> {
    fn drop(&mut self) {
        if let Some(p) = self.item.take() {
            if !self.counted {
                bump(&self.store.pending_count, 1);
            }
            self.store.pending.lock().push(p);
        }
    }
}

/// A shape marked busy (a store call for it is running): unmarked when
/// this is dropped, whether the call finished or its future was dropped.
struct Claimed(Arc<Shape>);

impl Claimed {
    /// Mark `shape` busy if no one else has.
    fn try_new(shape: &Arc<Shape>) -> Option<Self> {
        claim(shape).then(|| Self(Arc::clone(shape)))
    }

    /// `shape`, marked busy already (by `decide` or `job`).
    fn marked(shape: Arc<Shape>) -> Self {
        Self(shape)
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.0.state.lock().busy = false;
    }
}

/// How one try of a settle ended.
enum SettleTry {
    /// Landed (settled, already settled, or charged late); the store's
    /// answer to the settle when there was one.
    Done(Option<Box<Applied>>),
    /// A store error: try again later. `unknown`: the outcome is unknown,
    /// so this try may have applied.
    Retry { unknown: bool },
}

/// Whether `shape` is the shape of `ops`.
fn same_ops(shape: &Shape, ops: &[CounterOp<'_>]) -> bool {
    shape.ops.len() == ops.len() && shape.ops.iter().zip(ops).all(|(k, op)| k.matches(op))
}

/// What a shape's slow path decided to do, taken under its lock.
enum Plan {
    /// Go to the inner store with the batch as it is.
    Pass,
    /// Settle the current lease (if any), then open a new one.
    Reopen,
    /// Grow the current lease.
    Grow,
}

/// What was free on `k` at the last answer, as if `s`'s unused part were
/// free too: `max - used - held by others - admitted from the slice`
/// (`u64::MAX` stands for the maximum of an unlimited counter).
fn free_of(k: &OpKey, s: &OpSlice) -> u64 {
    k.max.unwrap_or(u64::MAX).saturating_sub(
        s.base_used
            .saturating_add(s.base_held_others)
            .saturating_add(s.consumed),
    )
}

/// The sum of `amounts`, saturated.
fn total(amounts: &[u64]) -> u64 {
    amounts.iter().fold(0u64, |t, &a| t.saturating_add(a))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<S> CapacityStore<S> {
    /// Counts of what this store did.
    pub fn stats(&self) -> CapacityStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (mut admits, mut checks) = (l(&c.local_admits), l(&c.local_checks));
        for shard in self.shards.iter() {
            for shape in shard.read().values().flatten() {
                let st = shape.state.lock();
                admits += st.local_admits;
                checks += st.local_checks;
            }
        }
        CapacityStats {
            local_admits: admits,
            local_checks: checks,
            passed_through: l(&c.passed_through),
            store_calls: l(&c.store_calls),
            refusals: l(&c.refusals),
            refused_by_holds: l(&c.refused_by_holds),
            settles: l(&c.settles),
            lost_units: l(&c.lost_units),
            pending_settles: l(&self.pending_count),
            late_charges: l(&c.late_charges),
            uncertain_settles: l(&c.uncertain_settles),
        }
    }
}

impl<S: AsyncAllowanceStore> CapacityStore<S> {
    /// A capacity store over `inner`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` is out of range (see each
    /// setter of [`CapacityConfig`]); `inner` is dropped untouched.
    pub fn new(inner: S, config: CapacityConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            inner,
            config,
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            shapes: AtomicU64::new(0),
            hasher: foldhash::fast::RandomState::default(),
            pending: Mutex::new(Vec::new()),
            pending_count: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The configuration.
    pub fn config(&self) -> &CapacityConfig {
        &self.config
    }
}

/// What `maintain` does with one shape.
enum Job {
    None,
    /// Settle the slice; with `reopen`, open the next one first.
    Flush {
        reopen: bool,
    },
    TopUp,
    Forget,
}

/// Polls every future to the end (a `join_all` without a dependency).
struct JoinAll<'a>(Vec<Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>>);

impl Future for JoinAll<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut pending = false;
        for slot in &mut self.0 {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// Mark `shape` busy if no one else has.
fn claim(shape: &Shape) -> bool {
    let mut st = shape.state.lock();
    !std::mem::replace(&mut st.busy, true)
}

/// Yield to the executor without naming a runtime.
async fn tokio_free_yield() {
    struct Yield(bool);
    impl std::future::Future for Yield {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0 {
                std::task::Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
    Yield(false).await;
}

#[async_trait]
impl<S: AsyncAllowanceStore> AsyncAllowanceStore for CapacityStore<S> {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        if self.eligible(batch) {
            self.apply_sliced(batch).await
        } else {
            Box::pin(self.pass(batch)).await
        }
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.inner.overdue(now).await
    }

    /// The inner store's.
    fn history_periods(&self) -> u32 {
        self.inner.history_periods()
    }

    /// Straight to the inner store. Usage a slice admitted is in a past
    /// period once the slice settled before that period ended (see
    /// [Windows](self#windows)).
    async fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        bump(&self.counters.store_calls, 1);
        self.inner.period_usage(ops, now_ms).await
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.inner.failure_policy()
    }

    fn needs_event_ids(&self) -> bool {
        self.inner.needs_event_ids()
    }
}
