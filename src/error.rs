//! The one error type. A refusal is a [`Decision`](crate::Decision), never an
//! error: `Err` means the input was bad or the store failed, and nothing
//! changed — except [`Error::StoreOutcomeUnknown`], a network store's call
//! that left without an answer.

use rust_decimal::Decimal;

/// Everything that can go wrong in tollgate. Each variant names the input
/// that caused it; when an engine call returns `Err`, no counter changed,
/// except with [`Error::StoreOutcomeUnknown`], whose call may have applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No allocation binds this subject to a plan.
    #[error("unknown subject `{subject}`")]
    UnknownSubject {
        /// The subject asked about.
        subject: String,
    },
    /// No plan with this id is in the catalog.
    #[error("unknown plan `{plan}`")]
    UnknownPlan {
        /// The plan named.
        plan: String,
    },
    /// No meter with this id is in the catalog.
    #[error("unknown meter `{meter}`")]
    UnknownMeter {
        /// The meter named.
        meter: String,
    },
    /// No pool (shared scope) with this id is in the catalog.
    #[error("unknown pool `{pool}`")]
    UnknownPool {
        /// The pool named.
        pool: String,
    },
    /// An amount below zero.
    #[error("negative amount {amount} for meter `{meter}`")]
    NegativeAmount {
        /// The meter the amount was for.
        meter: String,
        /// The amount given.
        amount: Decimal,
    },
    /// An amount, cost or counter that does not fit the integer it is kept in.
    #[error("amount overflows for meter `{meter}`")]
    Overflow {
        /// The meter whose amount or counter overflowed.
        meter: String,
    },
    /// Money given in a currency other than the meter's.
    #[error("meter `{meter}` counts {expected}, not {found}")]
    CurrencyMismatch {
        /// The money meter.
        meter: String,
        /// The meter's currency.
        expected: String,
        /// The currency given.
        found: String,
    },
    /// A count given for a money meter, or money for a count meter.
    #[error("meter `{meter}` is {expected}; the amount given was not")]
    WrongUnit {
        /// The meter.
        meter: String,
        /// What the meter counts: "money" or "a count".
        expected: &'static str,
    },
    /// Configuration refused at load. `field` is a path such as
    /// `plans[plan_free].limits[0].max`.
    #[error("invalid config at `{field}`: {reason}")]
    InvalidConfig {
        /// Where in the configuration the problem is.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A batch handed to a store breaks the store contract: a counter named
    /// twice, or an invalid window. The engine never builds one; a host
    /// calling a store directly can.
    #[error("invalid batch: {reason}")]
    InvalidBatch {
        /// What is wrong with it.
        reason: String,
    },
    /// No live or recently ended reservation has this id (never opened,
    /// opened for another subject, or forgotten long after it ended).
    #[error("unknown reservation `{id}`")]
    UnknownReservation {
        /// The reservation's id.
        id: String,
    },
    /// The reservation's lease ran out before this call: its holds and slots
    /// have already returned.
    #[error("reservation `{id}` expired")]
    ReservationExpired {
        /// The reservation's id.
        id: String,
    },
    /// The reservation was already committed or released.
    #[error("reservation `{id}` is already settled")]
    ReservationSettled {
        /// The reservation's id.
        id: String,
    },
    /// An event id already applied with different amounts (or a different
    /// subject, call or plan) within the idempotency horizon.
    #[error("event id `{event}` was already used for a different request")]
    EventConflict {
        /// The event id.
        event: String,
    },
    /// A grant (top-up) whose payment id the balance already holds with
    /// another amount, expiry or priority: a payment id credits once.
    /// Nothing changed.
    #[error("payment id `{payment}` was already granted with other terms")]
    GrantConflict {
        /// The payment id.
        payment: String,
    },
    /// A top-up that cannot be credited: an amount of zero or less, an
    /// amount finer than the balance's smallest unit, an empty payment id,
    /// one longer than [`MAX_PAYMENT_ID_BYTES`](crate::MAX_PAYMENT_ID_BYTES)
    /// or with a control character, or an expiry at or before the time it
    /// takes effect. Nothing changed.
    #[error("invalid top-up `{payment}`: {reason}")]
    InvalidTopUp {
        /// The payment id given.
        payment: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A top-up or balance query for a subject whose plan keeps no prepaid
    /// balance ([`PlanConfig::balance`](crate::PlanConfig::balance)).
    #[error("the plan of `{subject}` keeps no prepaid balance")]
    NoBalance {
        /// The subject.
        subject: String,
    },
    /// A request that cannot be made this way: an empty event id, an event id
    /// on a call that does not take one, or amounts for another subject than
    /// the reservation's.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// An allocation from a shared
    /// [`AllocationSource`](crate::AllocationSource) that cannot be used:
    /// it names a plan, pool or meter the catalog lacks, or has a bad
    /// override. An allocation this engine had cached for the subject stays
    /// in force.
    #[error("invalid allocation for subject `{subject}`: {reason}")]
    InvalidAllocation {
        /// The subject it was loaded for.
        subject: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A snapshot that cannot be restored: it breaks an invariant the store
    /// keeps (bucket counts, totals, duplicate counters or leases).
    #[error("invalid snapshot: {reason}")]
    InvalidSnapshot {
        /// What is wrong with it.
        reason: String,
    },
    /// A report of a calendar period further back than the store keeps
    /// ([`Engine::usage_in`](crate::Engine::usage_in); contract rule 11 of
    /// the [store](crate::store)). Nothing was read.
    #[error("usage history: {asked} periods back asked, the store keeps {kept}")]
    HistoryNotKept {
        /// How many periods back the report asked for.
        asked: u32,
        /// How many closed periods the store keeps per counter.
        kept: u32,
    },
    /// The store failed before the call reached it, or refused it (no
    /// connection, a server error): nothing changed. Retrying is safe.
    #[error("store failed: {message}")]
    Store {
        /// What the backend reported.
        message: String,
    },
    /// A batch a Redis Cluster store cannot apply safely: one spanning
    /// hash slots in a way its protocol does not cover (see `RedisStore`'s
    /// section on Redis Cluster). Nothing changed.
    #[error("batch spans cluster slots: {reason}")]
    CrossSlot {
        /// What the batch does that cannot span slots.
        reason: String,
    },
    /// A network store's call left and no answer came back (a timeout, a
    /// connection lost mid-call): the call may or may not have applied.
    /// Retry it with `event` as its event id
    /// ([`Request::event`](crate::Request::event)): a store applies an
    /// event at most once, so the retry answers what happened (applying
    /// the call if it had not been). See the
    /// [store contract](crate::store#ambiguous-outcomes).
    #[error("store outcome unknown: {message}")]
    StoreOutcomeUnknown {
        /// What the backend reported.
        message: String,
        /// The event id the call carried — the host's, or one the async
        /// engine made for it — if it carried one: a `reserve`, `renew`,
        /// `grow` or `release` carries none (see the store contract).
        event: Option<String>,
    },
}

impl Error {
    pub(crate) fn request(reason: impl Into<String>) -> Self {
        Error::InvalidRequest {
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
