//! The answer: a [`Decision`] with the numbers behind it.

use crate::model::name::Name;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::model::scope::ScopeKey;
use crate::model::window::Window;

/// How close a limit, or a whole decision, is to its maximum.
///
/// Ordered: `Ok < Warning < Exceeded`; a decision's status is its worst limit's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Below the warning ratio.
    Ok,
    /// Usage after the request reaches the warning ratio (default 80 %) but
    /// stays within the maximum.
    Warning,
    /// The request would take usage past the maximum (for `record`: it did).
    /// A request of zero is never `Exceeded`.
    Exceeded,
}

/// Why a request may not proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// One or more limits would be exceeded; see [`Decision::binding`].
    LimitExceeded,
    /// The request names a model outside the allocation's allowlist.
    ModelNotAllowed {
        /// The model named.
        model: String,
    },
    /// A scope is cooling down after a failed reservation.
    Cooldown {
        /// The scope cooling down.
        scope: ScopeKey,
        /// When the cooldown ends.
        until: DateTime<Utc>,
    },
}

/// Money: an exact decimal amount in a currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// The amount in major units (dollars).
    pub amount: Decimal,
    /// The currency.
    pub currency: Name,
}

/// One limit of one scope, as the decision found it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitState {
    /// Whose counter: the subject, or a pool.
    pub scope: ScopeKey,
    /// The meter.
    pub meter: Name,
    /// The window.
    pub window: Window,
    /// This call's amount on the limit, in the meter's smallest unit: the
    /// request's amount; for `reserve` and `grow`, the amount held (one slot
    /// on a concurrent limit); for `commit`, the actual amount; for
    /// `release`, the part of the hold charged as usage.
    pub requested: u64,
    /// Usage counted now, in the meter's smallest unit: including this
    /// request if it was recorded, excluding it otherwise. Holds are not in
    /// it.
    pub used: u64,
    /// Held by in-flight reservations (including this one, if it reserved),
    /// in the meter's smallest unit. For a concurrent limit: the slots taken.
    pub held: u64,
    /// The maximum; `None` is unlimited.
    pub max: Option<u64>,
    /// `max - used - held`, floored at zero; `None` when unlimited.
    pub remaining: Option<u64>,
    /// Start of the current period (`None` for lifetime).
    pub period_start: Option<DateTime<Utc>>,
    /// When usage next leaves the window (`None`: never, or nothing to leave).
    pub resets_at: Option<DateTime<Utc>>,
    /// This limit's status for the request.
    pub status: Status,
}

/// The answer to "may this subject spend this much now?".
///
/// A refusal is a `Decision` with `allowed == false`, never an `Err`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The worst status over all limits.
    pub status: Status,
    /// Whether the work may proceed. For `admit`, whether it was admitted; for
    /// `record`, whether usage is still within every limit.
    pub allowed: bool,
    /// Whether this call added anything to a counter: `false` for `check`, a
    /// refused `admit`, and a request of zero. A meter is counted only where
    /// some limit on it exists: give a plan an unlimited limit (`-1`) on a
    /// meter to count it without ever refusing it.
    pub recorded: bool,
    /// Why the request was refused, when it was.
    pub reason: Option<Refusal>,
    /// Every limit the request touched, in order: the subject's limits, then
    /// its pools', then the named model's pools'. A limit is touched when the
    /// request names its meter (an amount of zero counts), or, for the plan's
    /// cost meter, when the request costs more than zero. Empty when the
    /// request was refused before any counter was read (a model outside the
    /// allowlist).
    pub limits: Vec<LimitState>,
    /// Index into `limits` of the binding limit: the exceeded limit that frees
    /// up last when refused, otherwise the one with the least headroom.
    pub binding: Option<usize>,
    /// When refused: how long until every exceeded limit has room for this
    /// request, if waiting helps at all.
    pub retry_after: Option<Duration>,
    /// The request's cost (rounded up to the cost meter's smallest unit), when
    /// the plan has a cost meter.
    pub cost: Option<Money>,
    /// Meters in the request that have no price in the plan: they cost 0 and
    /// are listed here so unpriced usage is never silent.
    pub unpriced: Vec<Name>,
    /// `true` only for a decision made without the store: the store failed
    /// (an outage, a timeout) under the fail-open policy
    /// (`FailurePolicy::FailOpen`, feature `async`), so the request was
    /// allowed unchecked and unrecorded. Such a decision has status `Ok`,
    /// `allowed: true`, `recorded: false` and no limit states; the observer
    /// sees it like any other decision, so it can count it.
    pub allowed_on_error: bool,
}

impl Decision {
    /// The binding limit, if any.
    pub fn binding_limit(&self) -> Option<&LimitState> {
        self.binding.and_then(|i| self.limits.get(i))
    }

    /// The state of `meter` in `scope`'s first limit on it, if touched.
    pub fn limit(&self, scope: &ScopeKey, meter: &str) -> Option<&LimitState> {
        self.limits
            .iter()
            .find(|l| &l.scope == scope && &*l.meter == meter)
    }
}
