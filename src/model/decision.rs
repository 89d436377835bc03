//! The answer: a [`Decision`] with the numbers behind it.

use crate::model::name::Name;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use smallvec::SmallVec;

use crate::model::catalog::Unit;
use crate::model::scope::ScopeKey;
use crate::model::window::Window;

/// How close a limit, or a whole decision, is to its maximum.
///
/// Ordered: `Ok < Warning < Exceeded`; a decision's status is its worst limit's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
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
    /// The request's cost is more than the prepaid balance has available
    /// (for `record`, `commit` and `release`, which count the usage anyway:
    /// more than it and the plan's overdraft could cover); see
    /// [`Decision::balance`]. HTTP 402.
    InsufficientBalance {
        /// The cost that did not fit (for a `release`, the kept share).
        needed: Money,
        /// For `check`, `admit`, `reserve` and `grow`: what the balance had
        /// available before the request (after it, for a growth, which is
        /// held anyway); for `record`, `commit` and `release`: what is
        /// available after it. Its live grants' remaining, less holds and
        /// debt (negative in debt).
        available: Money,
    },
}

/// A prepaid balance as a decision, a usage report or a top-up reads it
/// (amounts in the cost meter's major unit and currency, exact).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Balance {
    /// Whose balance: the subject's, or the pool the plan keeps it on.
    pub scope: ScopeKey,
    /// Its currency.
    pub currency: Name,
    /// What the live grants have left.
    pub remaining: Decimal,
    /// What live reservations hold on it.
    pub held: Decimal,
    /// What usage past the grants took under the plan's overdraft; the
    /// next top-up repays it first.
    pub debt: Decimal,
    /// `remaining - held - debt`: what `admit` may still spend (negative
    /// in debt).
    pub available: Decimal,
    /// Of this call's cost, what neither the grants nor the overdraft
    /// covered (never recorded on the balance); zero outside `record`,
    /// `commit` and `release`.
    pub uncovered: Decimal,
    /// Every grant not yet expired with something left, in the order they
    /// are spent: lowest priority, then soonest expiry (none last), then
    /// earliest effective time (a top-up without one first), then payment
    /// id bytes.
    pub grants: Vec<Grant>,
}

/// A credit grant (a top-up) on a [`Balance`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Grant {
    /// The host's payment id.
    pub id: String,
    /// The amount credited.
    pub amount: Decimal,
    /// What it has left.
    pub remaining: Decimal,
    /// From when it counts: the top-up's `effective_at`, or when it was
    /// credited if it gave none.
    pub effective_at: DateTime<Utc>,
    /// When it stops counting, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// Lower is spent first.
    pub priority: u32,
    /// When the store first credited it.
    pub granted_at: DateTime<Utc>,
}

/// Money: an exact decimal amount in a currency, in its major unit (the
/// public form of money, as [`Amount::Money`] with its currency).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Money {
    /// The amount in major units (dollars).
    pub amount: Decimal,
    /// The currency.
    pub currency: Name,
}

/// An amount in its public form, the one every answer reads the same way:
/// whole units of a count or seconds meter as a `u64` (1,200 tokens are
/// `Units(1200)`), money as an exact [`Decimal`] in the meter's major unit
/// ($0.99 is `Money(0.99)`, whatever the meter's scale). No float anywhere:
/// the store's integers convert to it exactly.
///
/// [`LimitState`] and [`MeterUsage`](crate::MeterUsage) give their amounts
/// in this form through the same accessors (`used_amount`, `held_amount`,
/// `max_amount`, …), so a limit in a [`Decision`] and its row in a usage
/// report read alike.
///
/// ```
/// # use rust_decimal::Decimal;
/// use tollgate::Amount;
///
/// assert_eq!(Amount::Units(1_200).units(), Some(1_200));
/// assert_eq!(Amount::Money(Decimal::new(99, 2)).money(), Some(Decimal::new(99, 2)));
/// assert_eq!(Amount::Money(Decimal::new(99, 2)).units(), None);
/// assert_eq!(Amount::Money(Decimal::new(990_000, 6)).to_string(), "0.990000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Amount {
    /// Whole units of a count meter (tokens, requests, jobs) or a seconds
    /// meter (seconds).
    Units(u64),
    /// Money in the meter's major unit (dollars, not cents), exact, at the
    /// meter's scale (`0.990000` at scale 6; equal to `0.99`). The
    /// currency is the meter's ([`Meter::currency`](crate::Meter::currency)).
    Money(Decimal),
}

impl Amount {
    /// The units of a count or seconds meter; `None` for money.
    #[inline]
    pub fn units(self) -> Option<u64> {
        match self {
            Self::Units(n) => Some(n),
            Self::Money(_) => None,
        }
    }

    /// The money, in the major unit; `None` for units.
    #[inline]
    pub fn money(self) -> Option<Decimal> {
        match self {
            Self::Money(d) => Some(d),
            Self::Units(_) => None,
        }
    }

    /// Whether the amount is zero.
    #[inline]
    pub fn is_zero(self) -> bool {
        match self {
            Self::Units(n) => n == 0,
            Self::Money(d) => d.is_zero(),
        }
    }
}

/// The number alone: `1200`, `0.990000`.
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Units(n) => fmt::Display::fmt(n, f),
            Self::Money(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// How a meter's smallest unit reads in the public form: as units, or as
/// money with a number of decimal places. Four bytes, kept in the padding
/// of a [`LimitState`]: the money scale (at most
/// [`MAX_MONEY_SCALE`](crate::MAX_MONEY_SCALE)), or [`Scale::UNITS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Scale(u32);

impl Scale {
    /// A count or seconds meter: the smallest unit is the unit.
    pub(crate) const UNITS: Self = Self(u32::MAX);

    /// The scale of a meter's `unit`.
    #[inline(always)]
    pub(crate) fn of(unit: &Unit) -> Self {
        match unit {
            Unit::Money { scale, .. } => Self(*scale),
            _ => Self::UNITS,
        }
    }

    /// `minor` of the smallest unit in the public form, exactly: units as
    /// they are, money as `minor × 10^-scale` (990000 at scale 6 is
    /// 0.990000). Every `u64` converts at every scale a catalog allows: a
    /// `Decimal` keeps 96 bits and 28 decimal places.
    #[inline]
    pub(crate) fn amount(self, minor: u64) -> Amount {
        match self.money_scale() {
            None => Amount::Units(minor),
            Some(scale) => {
                let mut d = Decimal::from(minor);
                // Fails only past 28 places, never at a built catalog's
                // scale (at most 12).
                let _ = d.set_scale(scale);
                Amount::Money(d)
            }
        }
    }

    /// The decimal places of a money meter; `None` for units.
    #[inline]
    pub(crate) fn money_scale(self) -> Option<u32> {
        (self != Self::UNITS).then_some(self.0)
    }
}

/// One limit of one scope, as the decision found it.
///
/// # Amounts
///
/// The fields `requested`, `used`, `held`, `max` and `remaining` are the
/// exact integers the store counts, in the meter's **smallest unit**: units
/// for a count or seconds meter (tokens, seconds), `10^-scale` of the major
/// unit for a money meter (990,000 for $0.99 at scale 6). The public form
/// of each — `u64` units for counts and seconds, [`Decimal`] major units for
/// money, as [`Amount`] — is its `*_amount` accessor
/// ([`used_amount`](Self::used_amount), [`max_amount`](Self::max_amount),
/// …), the same accessors a usage report's [`MeterUsage`](crate::MeterUsage)
/// has, so both read a $0.99 cost as `0.99` and 1,200 tokens as `1200`.
///
/// ```
/// # use rust_decimal::Decimal;
/// # use tollgate::{Allocation, Amount, Catalog, Engine, Request};
/// # let catalog: Catalog = serde_json::from_str(r#"{
/// #   "meters": [{"id": "tok", "unit": "count"},
/// #              {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
/// #   "plans": [{"id": "p", "cost_meter": "cost", "prices": {"tok": "0.000825"},
/// #     "limits": [
/// #       {"meter": "tok", "window": {"calendar": {"period": "day"}}, "max": 10000},
/// #       {"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": "5.00"}
/// #     ]}]
/// # }"#)?;
/// # let engine = Engine::new(catalog);
/// # engine.allocate(Allocation::new("a", "p"))?;
/// let d = engine.admit(&Request::new("a").units("tok", 1_200))?;
/// let (tok, cost) = (&d.limits[0], &d.limits[1]);
/// assert_eq!(tok.used, 1_200);
/// assert_eq!(tok.used_amount(), Amount::Units(1_200));
/// assert_eq!(cost.used, 990_000); // micro-dollars: scale 6
/// assert_eq!(cost.used_amount(), Amount::Money(Decimal::new(99, 2)));
/// assert_eq!(cost.remaining_amount(), Some(Amount::Money(Decimal::new(401, 2))));
/// assert_eq!(cost.money_scale(), Some(6));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Its instants are kept as Unix milliseconds and become `DateTime`s only
/// when read, through [`period_start`](Self::period_start) and
/// [`resets_at`](Self::resets_at).
#[derive(Clone, PartialEq, Eq)]
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
    /// Start of the current period, Unix milliseconds.
    pub(crate) period_start_ms: Option<i64>,
    /// When usage next leaves the window, Unix milliseconds.
    pub(crate) resets_at_ms: Option<i64>,
    /// This limit's status for the request.
    pub status: Status,
    /// How the meter's smallest unit reads in the public form.
    pub(crate) scale: Scale,
}

impl LimitState {
    /// [`requested`](Self::requested) in the public form: `u64` units, or
    /// money as a major-unit [`Decimal`].
    #[inline]
    pub fn requested_amount(&self) -> Amount {
        self.scale.amount(self.requested)
    }

    /// [`used`](Self::used) in the public form: `u64` units, or money as a
    /// major-unit [`Decimal`].
    #[inline]
    pub fn used_amount(&self) -> Amount {
        self.scale.amount(self.used)
    }

    /// [`held`](Self::held) in the public form: `u64` units, or money as a
    /// major-unit [`Decimal`].
    #[inline]
    pub fn held_amount(&self) -> Amount {
        self.scale.amount(self.held)
    }

    /// [`max`](Self::max) in the public form (`None`: unlimited).
    #[inline]
    pub fn max_amount(&self) -> Option<Amount> {
        self.max.map(|m| self.scale.amount(m))
    }

    /// [`remaining`](Self::remaining) in the public form (`None`:
    /// unlimited).
    #[inline]
    pub fn remaining_amount(&self) -> Option<Amount> {
        self.remaining.map(|m| self.scale.amount(m))
    }

    /// The decimal places of the meter's smallest unit when it is money
    /// (6: the integers count micro-dollars); `None` for a count or seconds
    /// meter, whose integers are the units themselves.
    #[inline]
    pub fn money_scale(&self) -> Option<u32> {
        self.scale.money_scale()
    }

    /// Start of the current period (`None` for lifetime and concurrent
    /// windows).
    #[inline]
    pub fn period_start(&self) -> Option<DateTime<Utc>> {
        self.period_start_ms
            .and_then(DateTime::from_timestamp_millis)
    }

    /// When usage next leaves the window (`None`: never, or nothing to
    /// leave).
    #[inline]
    pub fn resets_at(&self) -> Option<DateTime<Utc>> {
        self.resets_at_ms.and_then(DateTime::from_timestamp_millis)
    }
}

/// Like a derived `Debug`, with the instants as `DateTime`s.
impl fmt::Debug for LimitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitState")
            .field("scope", &self.scope)
            .field("meter", &self.meter)
            .field("window", &self.window)
            .field("requested", &self.requested)
            .field("used", &self.used)
            .field("held", &self.held)
            .field("max", &self.max)
            .field("remaining", &self.remaining)
            .field("period_start", &self.period_start())
            .field("resets_at", &self.resets_at())
            .field("status", &self.status)
            .field("money_scale", &self.money_scale())
            .finish()
    }
}

/// A list kept inline up to a fixed number of items and on the heap only
/// past it: one public newtype per item type, so the small-vector crate
/// behind it stays out of the public API. Reads like a slice (it derefs to
/// one): index it, iterate it (`for x in &list`), take its `len`, compare
/// it with a `Vec`, a slice or an array.
macro_rules! inline_list {
    ($(#[$meta:meta])* $list:ident, $item:ty, $inline:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Default)]
        pub struct $list(SmallVec<[$item; $inline]>);

        impl $list {
            /// How many items the list keeps without allocating.
            pub const INLINE: usize = $inline;

            /// An empty list (no allocation).
            #[inline]
            pub fn new() -> Self {
                Self(SmallVec::new())
            }

            /// Whether the list outgrew its inline space and lives on the
            /// heap: more than [`Self::INLINE`] items.
            #[inline]
            pub fn spilled(&self) -> bool {
                self.0.spilled()
            }

            /// The items as a slice.
            #[inline]
            pub fn as_slice(&self) -> &[$item] {
                &self.0
            }

            /// The items in a `Vec` (an allocation, unless empty).
            pub fn into_vec(self) -> Vec<$item> {
                self.0.into_vec()
            }

            /// The items as a mutable slice, for the engine to finish them.
            #[allow(dead_code)]
            #[inline]
            pub(crate) fn as_mut_slice(&mut self) -> &mut [$item] {
                &mut self.0
            }

            /// Append `item`, spilling to the heap past [`Self::INLINE`].
            #[inline(always)]
            pub(crate) fn push(&mut self, item: $item) {
                self.0.push(item);
            }
        }

        impl std::ops::Deref for $list {
            type Target = [$item];
            #[inline]
            fn deref(&self) -> &[$item] {
                &self.0
            }
        }

        impl AsRef<[$item]> for $list {
            #[inline]
            fn as_ref(&self) -> &[$item] {
                &self.0
            }
        }

        impl std::borrow::Borrow<[$item]> for $list {
            #[inline]
            fn borrow(&self) -> &[$item] {
                &self.0
            }
        }

        impl fmt::Debug for $list {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.iter()).finish()
            }
        }

        impl<'a> IntoIterator for &'a $list {
            type Item = &'a $item;
            type IntoIter = std::slice::Iter<'a, $item>;
            #[inline]
            fn into_iter(self) -> Self::IntoIter {
                self.0.iter()
            }
        }

        impl FromIterator<$item> for $list {
            #[inline]
            fn from_iter<I: IntoIterator<Item = $item>>(iter: I) -> Self {
                Self(iter.into_iter().collect())
            }
        }

        impl Extend<$item> for $list {
            #[inline]
            fn extend<I: IntoIterator<Item = $item>>(&mut self, iter: I) {
                self.0.extend(iter);
            }
        }

        impl From<Vec<$item>> for $list {
            /// The items of `v`, inline if they fit.
            fn from(v: Vec<$item>) -> Self {
                Self(SmallVec::from_vec(v))
            }
        }

        impl From<$list> for Vec<$item> {
            fn from(list: $list) -> Self {
                list.into_vec()
            }
        }

        impl PartialEq<[$item]> for $list {
            fn eq(&self, other: &[$item]) -> bool {
                self.as_slice() == other
            }
        }

        impl PartialEq<&[$item]> for $list {
            fn eq(&self, other: &&[$item]) -> bool {
                self.as_slice() == *other
            }
        }

        impl<const M: usize> PartialEq<[$item; M]> for $list {
            fn eq(&self, other: &[$item; M]) -> bool {
                self.as_slice() == other.as_slice()
            }
        }

        impl PartialEq<Vec<$item>> for $list {
            fn eq(&self, other: &Vec<$item>) -> bool {
                self.as_slice() == other.as_slice()
            }
        }

        impl PartialEq<$list> for Vec<$item> {
            fn eq(&self, other: &$list) -> bool {
                self.as_slice() == other.as_slice()
            }
        }

        impl PartialEq<$list> for [$item] {
            fn eq(&self, other: &$list) -> bool {
                self == other.as_slice()
            }
        }
    };
}

inline_list! {
    /// A [`Decision`]'s limit states, in order: kept inline up to
    /// [`LimitStates::INLINE`] (4) limits, so a decision on a plan of up to
    /// four touched limits allocates nothing; more spill to the heap, with
    /// the same answers.
    ///
    /// Four, not eight: a decision is returned by value, and each inline
    /// slot adds a limit state (152 bytes) to every copy of it. Measured on
    /// the four-limit bench plan (callgrind, `examples/profile_admit.rs`),
    /// eight slots cost 156 instructions more per `admit` than four and
    /// saved nothing.
    ///
    /// ```
    /// # use tollgate::{Allocation, Catalog, Engine, Request};
    /// # let catalog: Catalog = serde_json::from_str(r#"{
    /// #   "meters": [{"id": "tok", "unit": "count"}],
    /// #   "plans": [{"id": "p", "limits": [
    /// #     {"meter": "tok", "window": {"calendar": {"period": "day"}}, "max": 100}
    /// #   ]}]
    /// # }"#)?;
    /// # let engine = Engine::new(catalog);
    /// # engine.allocate(Allocation::new("a", "p"))?;
    /// let d = engine.admit(&Request::new("a").units("tok", 30))?;
    /// assert_eq!(d.limits.len(), 1);
    /// assert_eq!(d.limits[0].remaining, Some(70));
    /// for l in &d.limits {
    ///     assert_eq!(&*l.meter, "tok");
    /// }
    /// assert!(!d.limits.spilled());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    LimitStates, LimitState, 4
}

inline_list! {
    /// A [`Decision`]'s unpriced meters, in request order: kept inline up
    /// to [`MeterList::INLINE`] (4) meters, spilling to the heap only past
    /// that. Reads like a slice of [`Name`]s.
    MeterList, Name, 4
}

impl<const M: usize> PartialEq<[&str; M]> for MeterList {
    /// Whether the list names exactly these meters, in order:
    /// `d.unpriced == ["jobs"]`.
    fn eq(&self, other: &[&str; M]) -> bool {
        self.len() == M && self.iter().zip(other).all(|(a, b)| a.as_str() == *b)
    }
}

/// The answer to "may this subject spend this much now?".
///
/// A refusal is a `Decision` with `allowed == false`, never an `Err`.
///
/// # Amounts
///
/// One public form, as the rest of the API takes them: counts and seconds
/// as `u64`, money as an exact [`Decimal`] in its major unit (dollars) —
/// [`Amount`]. [`cost`](Self::cost) is [`Money`] in that form. A
/// [`LimitState`] keeps the exact integers the store counts, in the meter's
/// smallest unit (990,000 micro-dollars for $0.99 at scale 6), and reads
/// each in the public form through its `*_amount` accessors
/// ([`LimitState::used_amount`], …): the same accessors, with the same
/// answers, as a usage report's [`MeterUsage`](crate::MeterUsage). Never a
/// float.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The plan whose limits applied: the subject's plan when the decision
    /// was made. A plan change mid-period keeps the usage already counted
    /// on every limit of the same meter and window; the new plan's maximums
    /// apply from the next decision on, and each decision (like each usage
    /// report, [`UsageReport::plan`](crate::UsageReport::plan)) names the
    /// plan it was made under.
    pub plan: Name,
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
    /// allowlist). Kept inline up to [`LimitStates::INLINE`] limits.
    pub limits: LimitStates,
    /// Index into `limits` of the binding limit: the exceeded limit that frees
    /// up last when refused, otherwise the one with the least headroom.
    pub binding: Option<usize>,
    /// When refused: how long until every exceeded limit has room for this
    /// request, if waiting helps at all.
    pub retry_after: Option<Duration>,
    /// The request's cost in the cost meter's major unit (rounded up to its
    /// smallest unit), when the plan has a cost meter: the amount the cost
    /// limit's [`LimitState::requested_amount`] reads.
    pub cost: Option<Money>,
    /// Meters in the request that have no price in the plan: they cost 0 and
    /// are listed here so unpriced usage is never silent. Kept inline up to
    /// [`MeterList::INLINE`] meters.
    pub unpriced: MeterList,
    /// `true` only for a decision made without the store: the store failed
    /// (an outage, a timeout) under the fail-open policy
    /// (`FailurePolicy::FailOpen`, feature `async`), so the request was
    /// allowed unchecked and unrecorded. Such a decision has status `Ok`,
    /// `allowed: true`, `recorded: false` and no limit states; the observer
    /// sees it like any other decision, so it can count it.
    pub allowed_on_error: bool,
    /// On a fail-open decision (`allowed_on_error`) of `admit_async` or
    /// `record_async` whose store call left without an answer
    /// ([`Error::StoreOutcomeUnknown`](crate::Error::StoreOutcomeUnknown)):
    /// the event id the call carried, the host's or one the engine made.
    /// The request may or may not have been recorded; retrying it with
    /// this event id ([`Request::event`](crate::Request::event)) records
    /// it exactly once. `None` everywhere else: a fail-open decision with
    /// `None` here was not recorded.
    pub record_unknown: Option<String>,
    /// When the plan spends from a prepaid balance: the balance after the
    /// call (before it, if nothing was recorded), with its live grants.
    /// Boxed: most plans keep none, and a decision stays small.
    pub balance: Option<Box<Balance>>,
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

#[cfg(test)]
mod tests {
    use super::{Amount, Scale};
    use crate::catalog::{Meter, MAX_MONEY_SCALE};
    use rust_decimal::Decimal;

    fn money(scale: u32) -> Scale {
        Scale::of(&Meter::money("m", "USD", scale).unit)
    }

    /// Counts and seconds read as the integers themselves, every `u64`.
    #[test]
    fn units_read_as_the_integer() {
        for meter in [Meter::count("c"), Meter::seconds("s")] {
            let scale = Scale::of(&meter.unit);
            assert_eq!(scale.money_scale(), None);
            for n in [0, 1, 1_200, u64::MAX] {
                assert_eq!(scale.amount(n), Amount::Units(n));
            }
        }
    }

    /// Money reads as `minor × 10^-scale`, exactly, at scale 0, 2, 6 and the
    /// largest a catalog allows, up to the largest `u64`.
    #[test]
    fn money_reads_in_the_major_unit_exactly_at_every_scale() {
        let cases: [(u32, u64, &str); 9] = [
            (0, 99, "99"),
            (0, u64::MAX, "18446744073709551615"),
            (2, 99, "0.99"),
            (2, 123_456, "1234.56"),
            (2, u64::MAX, "184467440737095516.15"),
            (6, 990_000, "0.990000"),
            (6, u64::MAX, "18446744073709.551615"),
            (MAX_MONEY_SCALE, 1, "0.000000000001"),
            (MAX_MONEY_SCALE, u64::MAX, "18446744.073709551615"),
        ];
        for (scale, minor, want) in cases {
            let s = money(scale);
            assert_eq!(s.money_scale(), Some(scale));
            let got = s.amount(minor);
            let want: Decimal = want.parse().unwrap();
            assert_eq!(got, Amount::Money(want), "{minor} at scale {scale}");
            // Exact: the same digits, at the meter's scale.
            assert_eq!(got.money().unwrap().mantissa(), i128::from(minor));
            assert_eq!(got.money().unwrap().scale(), scale);
            assert_eq!(got.to_string(), want.to_string());
        }
        // Zero at scale 6 is zero, and equal to a plain zero.
        assert!(money(6).amount(0).is_zero());
        assert_eq!(money(6).amount(0), Amount::Money(Decimal::ZERO));
        // 0.990000 equals 0.99: a Decimal compares values, not digits.
        assert_eq!(money(6).amount(990_000), Amount::Money(Decimal::new(99, 2)));
    }

    /// The scale lives in the padding of a limit state: a decision copies
    /// four of them inline, so the state stays 152 bytes.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_limit_state_stays_152_bytes() {
        assert_eq!(std::mem::size_of::<super::LimitState>(), 152);
    }

    /// A money amount is never a count, even of the same number.
    #[test]
    fn money_at_scale_zero_is_not_units() {
        assert_ne!(money(0).amount(5), Amount::Units(5));
        assert_eq!(money(0).amount(5).units(), None);
        assert_eq!(Amount::Units(5).money(), None);
    }
}
