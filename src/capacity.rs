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
//! counter, and either no event id or one of the exact shape the async
//! engine makes itself (`tollgate:` and 32 lowercase hex digits, see
//! below). A [`Mode::Check`] of such a shape is answered
//! locally when the slice covers it. **Everything else goes straight to
//! the inner store, unchanged**, so it keeps its exact semantics:
//!
//! - *Evented calls* (a host's event id): the store's ledger applies them
//!   once (contract rule 8). The slices this engine holds count there as
//!   holds, so the store decides against used + every replica's holds.
//!   **An id of the engine's shape (`tollgate:` and exactly 32 lowercase
//!   hex digits) is reserved**: it is taken for one the engine made and
//!   may be decided locally. Any other id, `tollgate:order-42` included,
//!   is the host's and goes to the store.
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
//! after [`Error::StoreOutcomeUnknown`] counts once. A local admit has no
//! unknown outcome; a slice grown with an unknown outcome only grew holds,
//! never usage, so a retry admitted locally counts once too. An id that
//! came back from this store in a `StoreOutcomeUnknown` answered by the
//! inner store is remembered for [`CapacityConfig::unknown_id_window`]
//! (15 minutes by default, as long as Redis keeps engine-made ids), and a
//! retry with it within that time goes to the store. Up to 16,384 such
//! ids are kept at once; past that, every engine-made id goes to the store
//! until the remembered ones have aged out.
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
//!   store error is kept and tried again by every `maintain` and
//!   `shutdown` (its event id, `tollgate-capacity:{lease}`, makes a retry
//!   safe); meanwhile its hold still counts. If the lease expired first
//!   (the store unreachable for about half a lease, a forward clock step
//!   past the lease, or no `maintain`), what the slice admitted is charged
//!   as plain usage (mode `Force`) when the store answers: counted late,
//!   never dropped. Between that expiry and the late charge, other
//!   replicas may use the returned hold, so the counter can end above its
//!   maximum by at most what that slice admitted
//!   ([`CapacityStats::late_charges`] counts these). Tested by
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
//!   pending loses them as a killed replica would.
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

/// The prefix of the event ids the async engine makes itself.
const ENGINE_EVENT_PREFIX: &str = "tollgate:";
/// How many event ids answered `StoreOutcomeUnknown` are remembered at
/// once; past it, every engine-made id goes to the store until the
/// remembered ones have aged out.
const UNKNOWN_IDS_KEPT: usize = 16_384;
/// Lock shards of the shape table.
const SHARDS: usize = 16;
/// How many times a settle is retried after a store error.
const SETTLE_TRIES: usize = 3;
/// How many shapes `maintain` works on at once.
const MAINTAIN_AT_ONCE: usize = 16;

/// How a [`CapacityStore`] sizes, tops up and gives back its slices.
///
/// Build one with [`CapacityConfig::new`] and change what you need; a
/// [`CapacityStore::new`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityConfig {
    replicas: u32,
    lease_ttl: Duration,
    top_up_interval: Duration,
    slice_decisions: u32,
    min_slice_decisions: u32,
    max_shapes: usize,
    unknown_id_window: Duration,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl CapacityConfig {
    /// The defaults: 8 replicas, a 30 s lease, a 100 ms top-up interval,
    /// slices of 64 requests, straight to the store below 4 requests a
    /// slice, at most 65,536 shapes with slices out.
    pub fn new() -> Self {
        Self {
            replicas: 8,
            lease_ttl: Duration::from_secs(30),
            top_up_interval: Duration::from_millis(100),
            slice_decisions: 64,
            min_slice_decisions: 4,
            max_shapes: 65_536,
            unknown_id_window: Duration::from_secs(900),
        }
    }

    /// How many engines share the store (default 8): a slice takes at most
    /// `1 / replicas` of what is free. At least 1.
    #[must_use]
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long a slice's lease lasts (default 30 s): a killed replica's
    /// holds return this long after they were last opened. At least four
    /// top-up intervals.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often [`CapacityStore::maintain`] is meant to run (default
    /// 100 ms): the usage-report lag, and the slice sizing's unit of time.
    /// At least 1 ms.
    #[must_use]
    pub fn top_up_interval(mut self, interval: Duration) -> Self {
        self.top_up_interval = interval;
        self
    }

    /// How many requests of the last size a fresh slice covers at least
    /// (default 64). At least `min_slice_decisions`.
    #[must_use]
    pub fn slice_decisions(mut self, n: u32) -> Self {
        self.slice_decisions = n;
        self
    }

    /// Below this many requests of the current size in a slice, a shape
    /// goes straight to the store (default 4). At least 1.
    #[must_use]
    pub fn min_slice_decisions(mut self, n: u32) -> Self {
        self.min_slice_decisions = n;
        self
    }

    /// At most this many shapes hold slices at once (default 65,536);
    /// past it, new shapes go straight to the store. At least 1.
    #[must_use]
    pub fn max_shapes(mut self, n: usize) -> Self {
        self.max_shapes = n;
        self
    }

    /// How long an engine-made event id that came back in an
    /// [`Error::StoreOutcomeUnknown`] from the inner store is remembered
    /// (default 15 minutes, the default `RedisConfig::retry_horizon`):
    /// a retry with it within this time goes to the store, whose ledger
    /// replays it. Set it to at least the time the inner store keeps
    /// engine-made ids. At least 1 ms, at most a week.
    #[must_use]
    pub fn unknown_id_window(mut self, window: Duration) -> Self {
        self.unknown_id_window = window;
        self
    }

    /// The configured top-up interval (how often to call
    /// [`CapacityStore::maintain`]).
    pub fn top_up_interval_value(&self) -> Duration {
        self.top_up_interval
    }

    /// The configured lease time.
    pub fn lease_ttl_value(&self) -> Duration {
        self.lease_ttl
    }

    /// The configured replica count.
    pub fn replicas_value(&self) -> u32 {
        self.replicas
    }

    fn validate(&self) -> Result<(), Error> {
        let bad =
            |field: &str, reason: &str| Err(Error::config(format!("capacity.{field}"), reason));
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1");
        }
        if self.top_up_interval < Duration::from_millis(1) {
            return bad("top_up_interval", "must be at least 1 ms");
        }
        if self.top_up_interval > Duration::from_secs(86_400) {
            return bad("top_up_interval", "must be at most a day");
        }
        if self.lease_ttl < self.top_up_interval.saturating_mul(4) {
            return bad("lease_ttl", "must be at least four top-up intervals");
        }
        if self.lease_ttl > Duration::from_secs(86_400 * 7) {
            return bad("lease_ttl", "must be at most a week");
        }
        if self.min_slice_decisions == 0 {
            return bad("min_slice_decisions", "must be at least 1");
        }
        if self.slice_decisions < self.min_slice_decisions {
            return bad("slice_decisions", "must be at least min_slice_decisions");
        }
        if self.max_shapes == 0 {
            return bad("max_shapes", "must be at least 1");
        }
        if self.unknown_id_window < Duration::from_millis(1)
            || self.unknown_id_window > Duration::from_secs(86_400 * 7)
        {
            return bad("unknown_id_window", "must be between 1 ms and a week");
        }
        Ok(())
    }
}

/// What a [`CapacityStore`] has done so far (counts since it was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CapacityStats {
    /// Admits decided from a slice, with no store call.
    pub local_admits: u64,
    /// Checks answered from a slice.
    pub local_checks: u64,
    /// Batches passed to the inner store unchanged.
    pub passed_through: u64,
    /// Calls to the inner store, of every kind: `apply` (pass-through,
    /// open, grow, settle, late charge) and `period_usage`.
    pub store_calls: u64,
    /// Admits of a sliceable shape refused (by a lease that could not grow,
    /// or by the store when the shape went straight to it).
    pub refusals: u64,
    /// Of those, the ones that would have fit had no counter had any hold
    /// (an upper bound of the refusals a single store would not make).
    pub refused_by_holds: u64,
    /// Slices settled (given back, their admitted part made usage).
    pub settles: u64,
    /// Units admitted locally that could never be charged: the store
    /// refused both the settle and the late charge with an error other
    /// than an outage (for example [`Error::Overflow`]). Summed over every
    /// counter of the slice, whatever its meter. A settle the store could
    /// not be reached for is not lost: it stays pending
    /// ([`pending_settles`](Self::pending_settles)).
    pub lost_units: u64,
    /// Settles that failed on a store error and wait for the next
    /// [`CapacityStore::maintain`] or [`CapacityStore::shutdown`] to try
    /// again (now, not a total).
    pub pending_settles: u64,
    /// Slices whose lease had expired when they settled (a store outage
    /// longer than half a lease, a forward clock step, no `maintain`):
    /// what they admitted was charged as plain usage instead.
    pub late_charges: u64,
}

#[derive(Default)]
struct Counters {
    local_admits: AtomicU64,
    local_checks: AtomicU64,
    passed_through: AtomicU64,
    store_calls: AtomicU64,
    refusals: AtomicU64,
    refused_by_holds: AtomicU64,
    settles: AtomicU64,
    lost_units: AtomicU64,
    late_charges: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

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
    unknown_ids: Mutex<UnknownIds>,
    /// Whether `unknown_ids` has ever held an id: the fast path's test.
    unknown_any: AtomicBool,
    /// Settles that failed on a store error, retried by `maintain` and
    /// `shutdown`.
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

/// Engine-made event ids that came back from the inner store in a
/// `StoreOutcomeUnknown`, with when (batch time).
#[derive(Default)]
struct UnknownIds {
    ids: HashMap<Box<str>, i64>,
    /// Every engine-made id goes to the store until this instant: set when
    /// `ids` was full.
    all_until_ms: i64,
}

/// A settle that failed on a store error: retried until it lands.
struct PendingSettle {
    ops: SmallVec<[OpKey; 4]>,
    owner: ScopeKey,
    lease: LeaseId,
    consumed: SmallVec<[u64; 4]>,
}

/// How one try of a settle ended.
enum SettleTry {
    /// Landed (settled, already settled, or charged late); the store's
    /// answer to the settle when there was one.
    Done(Option<Box<Applied>>),
    /// A store error: try again later.
    Retry,
}

/// Whether `id` has the exact shape of an event id the async engine makes
/// (`tollgate:` and 32 lowercase hex digits, a [`LeaseId`] as displayed).
/// A host id of that shape is reserved: it is taken for an engine-made id.
fn engine_made(id: &str) -> bool {
    id.strip_prefix(ENGINE_EVENT_PREFIX).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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
            unknown_ids: Mutex::new(UnknownIds::default()),
            unknown_any: AtomicBool::new(false),
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

    async fn call(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        bump(&self.counters.store_calls, 1);
        self.inner.apply(batch).await
    }

    async fn pass(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        bump(&self.counters.passed_through, 1);
        let r = self.call(batch).await;
        if let (Err(Error::StoreOutcomeUnknown { .. }), Some(ev)) = (&r, batch.event) {
            if engine_made(ev.id) {
                self.remember_unknown(ev.id, batch.now_ms);
            }
        }
        r
    }

    /// Remember an engine-made id whose outcome is unknown, for
    /// [`CapacityConfig::unknown_id_window`]. When the list is full of
    /// ids younger than that, every engine-made id goes to the store until
    /// they have aged out.
    fn remember_unknown(&self, id: &str, now: i64) {
        let window = ms(self.config.unknown_id_window);
        let mut u = self.unknown_ids.lock();
        if u.ids.len() >= UNKNOWN_IDS_KEPT && !u.ids.contains_key(id) {
            u.ids.retain(|_, &mut at| now.saturating_sub(at) < window);
            if u.ids.len() >= UNKNOWN_IDS_KEPT {
                // Every id dropped here is younger than `window`.
                let newest = u.ids.values().copied().max().unwrap_or(now).max(now);
                u.all_until_ms = u.all_until_ms.max(newest.saturating_add(window));
                u.ids.clear();
            }
        }
        let at = u.ids.entry(id.into()).or_insert(now);
        *at = (*at).max(now);
        self.unknown_any.store(true, Ordering::Relaxed);
    }

    /// Whether an engine-made `id` must go to the store: it came back
    /// unknown within the window, or the list overflowed.
    fn unknown_at(&self, id: &str, now: i64) -> bool {
        let window = ms(self.config.unknown_id_window);
        let u = self.unknown_ids.lock();
        now < u.all_until_ms
            || u.ids
                .get(id)
                .is_some_and(|&at| now.saturating_sub(at) < window)
    }

    /// Whether `batch` may be decided from slices.
    fn eligible(&self, batch: &Batch<'_>) -> bool {
        if self.closed.load(Ordering::Relaxed)
            || batch.lease.is_some()
            || batch.balance.is_some()
            || !batch.cooldowns.is_empty()
            || batch.ops.is_empty()
            || batch.ops.len() > 16
            || !matches!(batch.mode, Mode::WithinLimits | Mode::Check)
            || batch.ops.iter().all(|op| op.delta == 0)
            || batch
                .ops
                .iter()
                .any(|op| matches!(op.window, Window::Concurrent))
        {
            return false;
        }
        match batch.event {
            None => true,
            // Only an id of the exact shape the engine makes: any other
            // is the host's, applied once by the store's ledger.
            Some(ev) => {
                engine_made(ev.id)
                    && !(self.unknown_any.load(Ordering::Relaxed)
                        && self.unknown_at(ev.id, batch.now_ms))
            }
        }
    }

    fn hash_ops(&self, ops: &[CounterOp<'_>]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for op in ops {
            op.scope.hash(&mut h);
            // Interned: one name, one address.
            h.write_usize(op.meter.as_str().as_ptr() as usize);
            op.window.hash(&mut h);
            op.max.hash(&mut h);
        }
        h.finish()
    }

    fn shard(&self, hash: u64) -> &Shard {
        // The shard count is a power of two; the low bits pick it.
        &self.shards[usize::try_from(hash % SHARDS as u64).unwrap_or(0)]
    }

    fn find(&self, hash: u64, ops: &[CounterOp<'_>]) -> Option<Arc<Shape>> {
        let shard = self.shard(hash).read();
        shard
            .get(&hash)?
            .iter()
            .find(|s| same_ops(s, ops))
            .map(Arc::clone)
    }

    fn find_or_add(&self, hash: u64, ops: &[CounterOp<'_>], now: i64) -> Option<Arc<Shape>> {
        if let Some(s) = self.find(hash, ops) {
            return Some(s);
        }
        let mut shard = self.shard(hash).write();
        let list = shard.entry(hash).or_default();
        if let Some(s) = list.iter().find(|s| same_ops(s, ops)) {
            return Some(Arc::clone(s));
        }
        if self.shapes.load(Ordering::Relaxed) >= self.config.max_shapes as u64 {
            return None;
        }
        self.shapes.fetch_add(1, Ordering::Relaxed);
        let shape = Arc::new(Shape {
            ops: ops
                .iter()
                .map(|op| OpKey {
                    scope: op.scope.clone(),
                    meter: op.meter,
                    window: op.window,
                    max: op.max,
                })
                .collect(),
            owner: ops[0].scope.clone(),
            // In use from its making: not idle for `maintain` to forget
            // before its first decision.
            state: Mutex::new(ShapeState {
                slices: SmallVec::from_elem(OpSlice::default(), ops.len()),
                last_use_ms: now,
                ..ShapeState::default()
            }),
        });
        list.push(Arc::clone(&shape));
        Some(shape)
    }

    /// The answer of a decision taken from `st`'s slices.
    fn local_answer(st: &ShapeState, applied: bool) -> Applied {
        let mut a = Applied {
            applied,
            ..Applied::default()
        };
        for s in &st.slices {
            let c = CounterState {
                used: s.base_used.saturating_add(s.consumed),
                held: s.base_held_others,
                period_start_ms: s.period_start_ms,
                resets_at_ms: s.resets_at_ms,
                ..CounterState::default()
            };
            a.counters.push(c);
        }
        a
    }

    /// The end of the earliest calendar period among `st`'s counters.
    fn period_end(shape: &Shape, st: &ShapeState) -> Option<i64> {
        shape
            .ops
            .iter()
            .zip(&st.slices)
            .filter(|(k, _)| matches!(k.window, Window::Calendar { .. }))
            .filter_map(|(_, s)| s.resets_at_ms)
            .min()
    }

    fn usable(&self, shape: &Shape, st: &ShapeState, now: i64) -> bool {
        st.lease.is_some()
            && now < st.use_until_ms
            && Self::period_end(shape, st)
                .is_none_or(|end| now < end.saturating_sub(2 * ms(self.config.top_up_interval)))
    }

    /// The slice to ask for on op `i` beyond what a request needs: demand
    /// sized, at most `free / replicas`; `None` when too small to share.
    /// `free` unknown (a shape's first slice) is taken as the whole
    /// maximum. An unlimited counter's maximum is `u64::MAX`: its slices
    /// too are at most `free / replicas`, so no replica's hold can make
    /// another's overflow.
    fn slice_size(&self, key: &OpKey, s: &OpSlice, delta: u64, free: Option<u64>) -> Option<u64> {
        let size = delta.max(s.last_delta).max(1);
        let want = size
            .saturating_mul(u64::from(self.config.slice_decisions))
            .max(s.demand.saturating_mul(2));
        let free = free.unwrap_or_else(|| key.max.unwrap_or(u64::MAX));
        let share = free / u64::from(self.config.replicas);
        let min = size.saturating_mul(u64::from(self.config.min_slice_decisions));
        (share >= min).then(|| want.min(share))
    }

    /// Decide `batch` from slices, or from the store on their behalf.
    async fn apply_sliced(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let hash = self.hash_ops(batch.ops);
        // The fast path: the shard's read lock and the shape's lock, no
        // store call, no reference count touched.
        let found = {
            let shard = self.shard(hash).read();
            shard
                .get(&hash)
                .and_then(|l| l.iter().find(|s| same_ops(s, batch.ops)))
                .map(|shape| match self.decide(shape, batch) {
                    Ok(a) => Ok(a),
                    Err(plan) => Err((Arc::clone(shape), plan)),
                })
        };
        let (shape, plan) = match found {
            Some(Ok(a)) => return Ok(a),
            Some(Err(slow)) => slow,
            None if batch.mode == Mode::Check => return Box::pin(self.pass(batch)).await,
            None => {
                let Some(shape) = self.find_or_add(hash, batch.ops, batch.now_ms) else {
                    return Box::pin(self.pass(batch)).await;
                };
                match self.decide(&shape, batch) {
                    Ok(a) => return Ok(a),
                    Err(plan) => (shape, plan),
                }
            }
        };
        match plan {
            // Boxed: the slow paths' state (their batches and store calls)
            // would otherwise size every call's future, which the fast
            // path builds and moves on each admit.
            Plan::Pass => Box::pin(self.pass_shape(&shape, batch)).await,
            Plan::Grow | Plan::Reopen => {
                let r = Box::pin(self.slow(&shape, batch, matches!(plan, Plan::Grow))).await;
                shape.state.lock().busy = false;
                r
            }
        }
    }

    /// Decide `batch` from `shape`'s slice under its lock, or say which
    /// slow path to take (marking the shape busy for `Grow` and `Reopen`).
    fn decide(&self, shape: &Shape, batch: &Batch<'_>) -> Result<Applied, Plan> {
        let now = batch.now_ms;
        let mut st = shape.state.lock();
        if st.gone {
            return Err(Plan::Pass);
        }
        let usable = self.usable(shape, &st, now);
        let covered = usable
            && st.slices.iter().zip(batch.ops).all(|(s, op)| {
                s.consumed
                    .checked_add(op.delta)
                    .is_some_and(|c| c <= s.granted)
            });
        if covered {
            if batch.mode == Mode::Check {
                st.local_checks += 1;
                return Ok(Self::local_answer(&st, false));
            }
            for (s, op) in st.slices.iter_mut().zip(batch.ops) {
                s.consumed = s.consumed.saturating_add(op.delta);
                s.demand = s.demand.saturating_add(op.delta);
                s.last_delta = op.delta;
            }
            st.last_use_ms = st.last_use_ms.max(now);
            st.local_admits += 1;
            return Ok(Self::local_answer(&st, true));
        }
        Err(
            if batch.mode == Mode::Check
                || st.busy
                || now < st.direct_until_ms
                || self.closed.load(Ordering::Relaxed)
            {
                Plan::Pass
            } else if usable {
                st.busy = true;
                Plan::Grow
            } else {
                st.busy = true;
                Plan::Reopen
            },
        )
    }

    /// The slow path, with the shape marked busy: grow (or settle and
    /// reopen) the lease to cover the request, or go to the store.
    async fn slow(&self, shape: &Shape, batch: &Batch<'_>, grow: bool) -> Result<Applied, Error> {
        let now = batch.now_ms;
        if !grow {
            self.settle(shape, now).await;
        }
        // First try: what is missing plus a slice, sized from what the
        // store last said was free.
        let mut needs: SmallVec<[u64; 4]> = SmallVec::new();
        let (lease, first, share) = {
            let st = shape.state.lock();
            let mut first: SmallVec<[u64; 4]> = SmallVec::new();
            let mut share = true;
            for ((key, s), op) in shape.ops.iter().zip(&st.slices).zip(batch.ops) {
                let need = s
                    .consumed
                    .saturating_add(op.delta)
                    .saturating_sub(s.granted);
                needs.push(need);
                let known = st.lease.is_some() || s.base_used > 0 || s.free > 0;
                match self.slice_size(key, s, op.delta, known.then_some(s.free)) {
                    Some(extra) => first.push(need.saturating_add(extra)),
                    None => {
                        share = false;
                        first.push(need);
                    }
                }
            }
            (st.lease, first, share)
        };
        if !share || self.near_period_end(shape, now) {
            // Too little left to share, or the period is about to roll:
            // give the slice back and let the store decide.
            return self.go_direct(shape, batch).await;
        }
        let a = match self.take(shape, lease, &first, now).await {
            Ok(a) => a,
            Err(
                Error::UnknownReservation { .. }
                | Error::ReservationExpired { .. }
                | Error::ReservationSettled { .. },
            ) => {
                // The lease is gone (the clock passed its expiry): settle
                // charges what it admitted as plain usage. Start over from
                // the store.
                self.settle(shape, now).await;
                return self.pass_shape(shape, batch).await;
            }
            // A slice the counter cannot hold (near `u64::MAX`): the
            // store decides.
            Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
            Err(e) => return Err(e),
        };
        if a.applied {
            if let Some(a) = self.consume(shape, batch, &first, &a, now) {
                return Ok(a);
            }
            return self.pass_shape(shape, batch).await;
        }
        // Refused: what is free now, counting every hold but this slice's
        // unused part?
        let (fits, frees) = {
            let mut fits = true;
            let mut frees: SmallVec<[u64; 4]> = SmallVec::new();
            for ((key, c), need) in shape.ops.iter().zip(&a.counters).zip(&needs) {
                // `held` counts this slice's whole hold: `need` is what
                // the request needs beyond its unused part.
                let free = key
                    .max
                    .unwrap_or(u64::MAX)
                    .saturating_sub(c.used.saturating_add(c.held));
                if *need > free {
                    fits = false;
                }
                frees.push(free);
            }
            (fits, frees)
        };
        if !fits {
            // This engine's other shapes' slices on the same counters are
            // holds too: give them back and ask once more for what is
            // missing.
            if self.give_back_own(shape, &a, &needs, now).await {
                let lease = shape.state.lock().lease;
                match self.take(shape, lease, &needs, now).await {
                    Ok(b) if b.applied => {
                        if let Some(d) = self.consume(shape, batch, &needs, &b, now) {
                            return Ok(d);
                        }
                        return self.pass_shape(shape, batch).await;
                    }
                    Ok(mut b) => {
                        self.refused(shape, batch, &mut b);
                        return Ok(b);
                    }
                    Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
                    Err(e) => return Err(e),
                }
            }
            let mut a = a;
            self.refused(shape, batch, &mut a);
            return Ok(a);
        }
        // It fits: near the limit. Take what is missing and a shrunken
        // slice, or give the slice back and go straight to the store.
        let mut second: SmallVec<[u64; 4]> = SmallVec::new();
        let mut share = true;
        {
            let st = shape.state.lock();
            for (((key, s), op), (need, free)) in shape
                .ops
                .iter()
                .zip(&st.slices)
                .zip(batch.ops)
                .zip(needs.iter().zip(&frees))
            {
                let rest = free.saturating_sub(*need);
                match self.slice_size(key, s, op.delta, Some(rest)) {
                    Some(extra) => second.push(need + extra),
                    None => {
                        share = false;
                        second.push(*need);
                    }
                }
            }
        }
        if !share {
            return self.go_direct(shape, batch).await;
        }
        let lease = shape.state.lock().lease;
        let a = match self.take(shape, lease, &second, now).await {
            Ok(a) => a,
            Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
            Err(e) => return Err(e),
        };
        if a.applied {
            if let Some(a) = self.consume(shape, batch, &second, &a, now) {
                return Ok(a);
            }
        }
        // Another replica took it meanwhile: the store decides.
        self.pass_shape(shape, batch).await
    }

    /// On a refusal that holds make (each counter's usage leaves room for
    /// what the request needs), settle this engine's other shapes' slices
    /// on any of `shape`'s counters; whether any was given back. Scans the
    /// shape table: it runs on such refusals only.
    async fn give_back_own(&self, shape: &Shape, a: &Applied, needs: &[u64], now: i64) -> bool {
        let by_holds = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(needs)
            .all(|((k, c), &need)| k.max.is_none_or(|m| c.used.saturating_add(need) <= m));
        if !by_holds {
            return false;
        }
        // The counters whose holds are in the way.
        let full: SmallVec<[&OpKey; 4]> = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(needs)
            .filter(|((k, c), &need)| {
                k.max
                    .is_some_and(|m| c.used.saturating_add(c.held).saturating_add(need) > m)
            })
            .map(|((k, _), _)| k)
            .collect();
        if full.is_empty() {
            return false;
        }
        let mut gave = false;
        for other in self.all_shapes() {
            if std::ptr::eq(&*other, shape) {
                continue;
            }
            let shares = other.ops.iter().any(|o| {
                full.iter()
                    .any(|k| k.scope == o.scope && k.meter == o.meter && k.window == o.window)
            });
            if !shares || other.state.lock().lease.is_none() || !claim(&other) {
                continue;
            }
            if other.state.lock().lease.is_some() {
                self.settle(&other, now).await;
                gave = true;
            }
            other.state.lock().busy = false;
        }
        gave
    }

    /// Pass a batch of `shape` to the store; count a refused admit.
    async fn pass_shape(&self, shape: &Shape, batch: &Batch<'_>) -> Result<Applied, Error> {
        let mut a = self.pass(batch).await?;
        if batch.mode == Mode::WithinLimits && !a.applied {
            self.refused(shape, batch, &mut a);
        } else {
            Self::own_slice_is_free(shape, &mut a);
        }
        Ok(a)
    }

    /// Count a refused admit of `shape`, and report its counters with this
    /// engine's own unused slice left out of `held`.
    fn refused(&self, shape: &Shape, batch: &Batch<'_>, a: &mut Applied) {
        bump(&self.counters.refusals, 1);
        let by_holds = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(batch.ops)
            .all(|((k, c), op)| k.max.is_none_or(|m| c.used.saturating_add(op.delta) <= m));
        if by_holds {
            bump(&self.counters.refused_by_holds, 1);
        }
        Self::own_slice_is_free(shape, a);
    }

    /// This engine's own unused slice is not in its way: leave it out of
    /// the answer's `held`.
    fn own_slice_is_free(shape: &Shape, a: &mut Applied) {
        let st = shape.state.lock();
        if st.lease.is_some() {
            for (c, s) in a.counters.iter_mut().zip(&st.slices) {
                c.held = c.held.saturating_sub(s.granted.saturating_sub(s.consumed));
            }
        }
    }

    /// Give the shape's slice back and send its decisions straight to the
    /// store for one top-up interval, starting with `batch`.
    async fn go_direct(&self, shape: &Shape, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now = batch.now_ms;
        self.settle(shape, now).await;
        shape.state.lock().direct_until_ms = now.saturating_add(ms(self.config.top_up_interval));
        self.pass_shape(shape, batch).await
    }

    /// Whether `now` is within two top-up intervals before the end of the
    /// shape's earliest calendar period (as the store last answered).
    fn near_period_end(&self, shape: &Shape, now: i64) -> bool {
        let st = shape.state.lock();
        self.near_end(shape, &st, now)
    }

    /// Whether `now` is within three top-up intervals before the end of
    /// the shape's earliest calendar period, or past it (for `maintain`,
    /// which runs once an interval: a slice it would reopen could not be
    /// used).
    fn near_end(&self, shape: &Shape, st: &ShapeState, now: i64) -> bool {
        Self::period_end(shape, st)
            .is_some_and(|end| now >= end.saturating_sub(3 * ms(self.config.top_up_interval)))
    }

    /// Open a lease holding `amounts`, or grow `lease` by them.
    async fn take(
        &self,
        shape: &Shape,
        lease: Option<LeaseId>,
        amounts: &[u64],
        now: i64,
    ) -> Result<Applied, Error> {
        let ops: SmallVec<[CounterOp<'_>; 4]> = shape
            .ops
            .iter()
            .zip(amounts)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let (id, action) = match lease {
            Some(id) => (id, LeaseAction::Grow),
            None => (
                LeaseId::random(),
                LeaseAction::Open {
                    expires_at_ms: now.saturating_add(ms(self.config.lease_ttl)),
                    deadline_ms: None,
                },
            ),
        };
        let batch = Batch::new(&ops, Mode::WithinLimits, now).with_lease(LeaseOp::new(
            id,
            &shape.owner,
            action,
        ));
        let mut a = self.call(&batch).await?;
        if a.applied && lease.is_none() {
            let mut st = shape.state.lock();
            st.lease = Some(id);
            st.expires_at_ms = now.saturating_add(ms(self.config.lease_ttl));
            st.use_until_ms = now.saturating_add(ms(self.config.lease_ttl) / 2);
            st.last_settle_ms = now;
            a.settled.clear();
        }
        Ok(a)
    }

    /// Record a successful open or grow of `amounts`, and consume `batch`.
    fn consume(
        &self,
        shape: &Shape,
        batch: &Batch<'_>,
        amounts: &[u64],
        a: &Applied,
        now: i64,
    ) -> Option<Applied> {
        let mut st = shape.state.lock();
        for ((s, &amt), c) in st.slices.iter_mut().zip(amounts).zip(&a.counters) {
            s.granted = s.granted.saturating_add(amt);
            s.base_used = c.used;
            s.base_held_others = c.held.saturating_sub(s.granted);
            s.period_start_ms = c.period_start_ms;
            s.resets_at_ms = c.resets_at_ms;
        }
        // `free` as if this slice's unused part were free too.
        for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
            s.free = free_of(k, s);
        }
        // Local admits went on while the store answered: the request is
        // admitted only if the grown slice still covers it.
        let covered = st.slices.iter().zip(batch.ops).all(|(s, op)| {
            s.consumed
                .checked_add(op.delta)
                .is_some_and(|c| c <= s.granted)
        });
        if !covered {
            return None;
        }
        for (s, op) in st.slices.iter_mut().zip(batch.ops) {
            s.consumed = s.consumed.saturating_add(op.delta);
            s.demand = s.demand.saturating_add(op.delta);
            s.last_delta = op.delta;
        }
        st.last_use_ms = st.last_use_ms.max(now);
        st.local_admits += 1;
        Some(Self::local_answer(&st, true))
    }

    /// Settle the shape's lease, if any: what it admitted becomes usage,
    /// the rest returns. A settle that fails on store errors stays
    /// pending (see `settle_lease`).
    async fn settle(&self, shape: &Shape, now: i64) {
        let (lease, consumed) = {
            let mut st = shape.state.lock();
            let Some(lease) = st.lease.take() else {
                return;
            };
            let consumed: SmallVec<[u64; 4]> = st.slices.iter().map(|s| s.consumed).collect();
            for s in &mut st.slices {
                s.granted = 0;
                s.consumed = 0;
                s.demand = 0;
            }
            st.last_settle_ms = now;
            (lease, consumed)
        };
        self.settle_lease(shape, lease, &consumed, now).await;
    }

    /// Settle `lease` (no longer the shape's current one), charging
    /// `consumed` as usage. Tried three times; then kept pending, and
    /// retried by every `maintain` and `shutdown` until it lands.
    async fn settle_lease(&self, shape: &Shape, lease: LeaseId, consumed: &[u64], now: i64) {
        for _ in 0..SETTLE_TRIES {
            match self
                .try_settle(&shape.ops, &shape.owner, lease, consumed, now)
                .await
            {
                SettleTry::Done(Some(a)) => {
                    let mut st = shape.state.lock();
                    for (s, c) in st.slices.iter_mut().zip(&a.counters) {
                        s.base_used = c.used;
                        s.base_held_others = c.held.saturating_sub(s.granted);
                        s.period_start_ms = c.period_start_ms;
                        s.resets_at_ms = c.resets_at_ms;
                    }
                    for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
                        s.free = free_of(k, s);
                    }
                    return;
                }
                SettleTry::Done(None) => return,
                SettleTry::Retry => {}
            }
        }
        bump(&self.pending_count, 1);
        self.pending.lock().push(PendingSettle {
            ops: shape.ops.clone(),
            owner: shape.owner.clone(),
            lease,
            consumed: consumed.iter().copied().collect(),
        });
    }

    /// One try of a settle. The settle carries the event id
    /// `tollgate-capacity:{lease}`, so a retry after an unknown outcome
    /// is replayed by the store's ledger, never applied twice. If the
    /// lease is gone (expired, or forgotten after its expiry), what it
    /// admitted is charged as plain usage (mode `Force`, event id
    /// `tollgate-capacity:{lease}:late`): counted late, never lost.
    async fn try_settle(
        &self,
        keys: &[OpKey],
        owner: &ScopeKey,
        lease: LeaseId,
        consumed: &[u64],
        now: i64,
    ) -> SettleTry {
        let ops: SmallVec<[CounterOp<'_>; 4]> = keys
            .iter()
            .zip(consumed)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let id = format!("tollgate-capacity:{lease}");
        let fingerprint = consumed.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &c| {
            (h ^ c).wrapping_mul(0x0100_0000_01b3)
        });
        let batch = Batch::new(&ops, Mode::Force, now)
            .with_lease(LeaseOp::new(
                lease,
                owner,
                LeaseAction::Settle {
                    keep: Fraction::ZERO,
                },
            ))
            .with_event(EventKey::new(&id, fingerprint));
        match self.call(&batch).await {
            Ok(a) => {
                bump(&self.counters.settles, 1);
                SettleTry::Done(Some(Box::new(a)))
            }
            Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. }) => SettleTry::Retry,
            // Settled by an earlier try whose answer was lost, and its
            // ledger entry forgotten since: charged then.
            Err(Error::ReservationSettled { .. }) => {
                bump(&self.counters.settles, 1);
                SettleTry::Done(None)
            }
            Err(Error::ReservationExpired { .. } | Error::UnknownReservation { .. }) => {
                let charged: SmallVec<[CounterOp<'_>; 4]> =
                    ops.iter().filter(|op| op.delta > 0).copied().collect();
                if charged.is_empty() {
                    bump(&self.counters.settles, 1);
                    return SettleTry::Done(None);
                }
                let late = format!("{id}:late");
                let batch = Batch::new(&charged, Mode::Force, now)
                    .with_event(EventKey::new(&late, fingerprint));
                match self.call(&batch).await {
                    Ok(_) => {
                        bump(&self.counters.settles, 1);
                        bump(&self.counters.late_charges, 1);
                        SettleTry::Done(None)
                    }
                    Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. }) => {
                        SettleTry::Retry
                    }
                    Err(_) => {
                        bump(&self.counters.lost_units, total(consumed));
                        SettleTry::Done(None)
                    }
                }
            }
            Err(_) => {
                bump(&self.counters.lost_units, total(consumed));
                SettleTry::Done(None)
            }
        }
    }

    /// Try every pending settle once more (up to 16 at once); keep the
    /// ones that fail again.
    async fn retry_pending(&self, now: i64) {
        let mut work = std::mem::take(&mut *self.pending.lock());
        let tried = work.len() as u64;
        let failed = Mutex::new(Vec::new());
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|p| {
                    let failed = &failed;
                    Box::pin(async move {
                        if let SettleTry::Retry = self
                            .try_settle(&p.ops, &p.owner, p.lease, &p.consumed, now)
                            .await
                        {
                            failed.lock().push(p);
                        }
                    }) as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
        }
        let failed = failed.into_inner();
        self.pending_count
            .fetch_sub(tried - failed.len() as u64, Ordering::Relaxed);
        if !failed.is_empty() {
            self.pending.lock().extend(failed);
        }
    }

    /// Open a fresh slice, then settle the old one: local admits go on
    /// from the old slice while the new one opens. Falls back to settle
    /// and refill when the store refuses the new slice beside the old.
    async fn roll_over(&self, shape: &Shape, now: i64) {
        let amounts: Option<SmallVec<[u64; 4]>> = {
            let st = shape.state.lock();
            shape
                .ops
                .iter()
                .zip(&st.slices)
                .map(|(k, s)| self.slice_size(k, s, s.last_delta, Some(s.free)))
                .collect()
        };
        let opened = match amounts {
            Some(amounts) => match self.open(shape, &amounts, now).await {
                Ok((id, a)) if a.applied => Some((id, amounts, a)),
                _ => None,
            },
            None => None,
        };
        let Some((id, amounts, a)) = opened else {
            self.settle(shape, now).await;
            self.refill(shape, None, now).await;
            return;
        };
        let old = {
            let mut st = shape.state.lock();
            let old = st.lease.replace(id).map(|lease| {
                let consumed: SmallVec<[u64; 4]> = st.slices.iter().map(|s| s.consumed).collect();
                (lease, consumed)
            });
            for ((s, &amt), c) in st.slices.iter_mut().zip(&amounts).zip(&a.counters) {
                s.granted = amt;
                s.consumed = 0;
                s.demand = 0;
                s.base_used = c.used;
                s.period_start_ms = c.period_start_ms;
                s.resets_at_ms = c.resets_at_ms;
            }
            st.expires_at_ms = now.saturating_add(ms(self.config.lease_ttl));
            st.use_until_ms = now.saturating_add(ms(self.config.lease_ttl) / 2);
            st.last_settle_ms = now;
            old
        };
        if let Some((lease, consumed)) = old {
            self.settle_lease(shape, lease, &consumed, now).await;
        }
    }

    /// Open a new lease holding `amounts`; the shape's state is untouched.
    async fn open(
        &self,
        shape: &Shape,
        amounts: &[u64],
        now: i64,
    ) -> Result<(LeaseId, Applied), Error> {
        let ops: SmallVec<[CounterOp<'_>; 4]> = shape
            .ops
            .iter()
            .zip(amounts)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let id = LeaseId::random();
        let action = LeaseAction::Open {
            expires_at_ms: now.saturating_add(ms(self.config.lease_ttl)),
            deadline_ms: None,
        };
        let batch = Batch::new(&ops, Mode::WithinLimits, now).with_lease(LeaseOp::new(
            id,
            &shape.owner,
            action,
        ));
        Ok((id, self.call(&batch).await?))
    }

    fn all_shapes(&self) -> Vec<Arc<Shape>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .values()
                    .flat_map(|l| l.iter().cloned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Background work, meant to run every [`CapacityConfig::top_up_interval`]
    /// at the engine clock's `now`: replace (open the next, settle the
    /// last) every slice that admitted anything since its last settle an
    /// interval or more ago, or has run half its lease; settle without
    /// replacing the slices near their calendar period's end and those
    /// idle for four intervals; top up slices three quarters used; forget
    /// idle shapes. First, it tries every pending settle again. Up to 16
    /// shapes' store calls run at once. Store errors are absorbed: a slice
    /// that cannot be topped up is grown or reopened on demand, and a
    /// settle that fails three times stays pending
    /// ([`CapacityStats::pending_settles`]) for the next pass.
    pub async fn maintain(&self, now: DateTime<Utc>) {
        let now = now.timestamp_millis();
        self.retry_pending(now).await;
        let mut work = Vec::new();
        for shape in self.all_shapes() {
            match self.job(&shape, now) {
                Job::None => {}
                Job::Forget => self.forget(&shape),
                job => work.push((shape, job)),
            }
        }
        // Up to `MAINTAIN_AT_ONCE` shapes' store calls in flight at once,
        // so a pass over many shapes stays within an interval.
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|(shape, job)| {
                    Box::pin(async move { self.run_job(&shape, job, now).await })
                        as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
        }
    }

    /// What `maintain` does with `shape` now; marks it busy for a job
    /// with store calls.
    fn job(&self, shape: &Shape, now: i64) -> Job {
        let interval = ms(self.config.top_up_interval);
        let mut st = shape.state.lock();
        if st.busy {
            return Job::None;
        }
        // The clock stepped back: a last use in the future is a use now.
        st.last_use_ms = st.last_use_ms.min(now);
        let idle = now.saturating_sub(st.last_use_ms) > 4 * interval;
        if st.lease.is_none() {
            return if idle && now >= st.direct_until_ms {
                Job::Forget
            } else {
                Job::None
            };
        }
        let stale = !self.usable(shape, &st, now.saturating_add(interval));
        let used = st.slices.iter().any(|s| s.consumed > 0);
        // A last settle an interval or more in the future (the clock
        // stepped back) is due now, as one an interval in the past.
        let due = now.saturating_sub(st.last_settle_ms) >= interval
            || st.last_settle_ms.saturating_sub(now) >= interval;
        let low = st
            .slices
            .iter()
            .any(|s| s.granted > 0 && s.consumed >= s.granted / 4 * 3);
        if idle || stale || (used && due) {
            st.busy = true;
            Job::Flush {
                reopen: !idle && !self.near_end(shape, &st, now),
            }
        } else if low {
            st.busy = true;
            Job::TopUp
        } else {
            Job::None
        }
    }

    async fn run_job(&self, shape: &Shape, job: Job, now: i64) {
        match job {
            Job::None | Job::Forget => {}
            Job::Flush { reopen: true } => self.roll_over(shape, now).await,
            Job::Flush { reopen: false } => self.settle(shape, now).await,
            Job::TopUp => {
                let lease = shape.state.lock().lease;
                self.refill(shape, lease, now).await;
            }
        }
        shape.state.lock().busy = false;
    }

    /// Open (or grow) a slice sized from demand, if there is room to share.
    async fn refill(&self, shape: &Shape, lease: Option<LeaseId>, now: i64) {
        let amounts: Option<SmallVec<[u64; 4]>> = {
            let st = shape.state.lock();
            shape
                .ops
                .iter()
                .zip(&st.slices)
                .map(|(k, s)| {
                    let free = s.free.saturating_sub(s.granted.saturating_sub(s.consumed));
                    self.slice_size(k, s, s.last_delta, Some(free))
                })
                .collect()
        };
        let Some(amounts) = amounts else {
            return;
        };
        if let Ok(a) = self.take(shape, lease, &amounts, now).await {
            if a.applied {
                let mut st = shape.state.lock();
                for ((s, &amt), c) in st.slices.iter_mut().zip(&amounts).zip(&a.counters) {
                    s.granted = s.granted.saturating_add(amt);
                    s.base_used = c.used;
                    s.base_held_others = c.held.saturating_sub(s.granted);
                    s.demand = 0;
                }
                for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
                    s.free = free_of(k, s);
                }
            }
        }
    }

    fn forget(&self, shape: &Arc<Shape>) {
        let mut shard = self.shard(self.hash_keys(&shape.ops)).write();
        for list in shard.values_mut() {
            let before = list.len();
            list.retain(|s| {
                // Still idle and leaseless under the shard lock: its
                // counts move to the store's.
                !(Arc::ptr_eq(s, shape) && {
                    let mut st = s.state.lock();
                    let gone = st.lease.is_none() && !st.busy;
                    if gone {
                        st.gone = true;
                        bump(&self.counters.local_admits, st.local_admits);
                        bump(&self.counters.local_checks, st.local_checks);
                    }
                    gone
                })
            });
            if list.len() < before {
                self.shapes.fetch_sub(1, Ordering::Relaxed);
            }
        }
        shard.retain(|_, l| !l.is_empty());
    }

    fn hash_keys(&self, keys: &[OpKey]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for k in keys {
            k.scope.hash(&mut h);
            h.write_usize(k.meter.as_str().as_ptr() as usize);
            k.window.hash(&mut h);
            k.max.hash(&mut h);
        }
        h.finish()
    }

    /// Give every slice back (their admitted parts become usage), try every
    /// pending settle again, and send every later batch straight to the
    /// store. Call it before the process exits; a replica that never calls
    /// it loses its unsettled admissions and its holds return at their
    /// lease's expiry. Settles that fail on a store error stay pending
    /// ([`CapacityStats::pending_settles`]): call it again to retry them.
    pub async fn shutdown(&self, now: DateTime<Utc>) {
        self.closed.store(true, Ordering::Relaxed);
        let now = now.timestamp_millis();
        for shape in self.all_shapes() {
            // Wait out a running slow path: it clears `busy` when done.
            while !claim(&shape) {
                tokio_free_yield().await;
            }
            self.settle(&shape, now).await;
            shape.state.lock().busy = false;
        }
        self.retry_pending(now).await;
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
