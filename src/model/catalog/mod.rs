//! The domain model: meters, limits, plans and pools, loaded from
//! configuration and validated once.
//!
//! [`CatalogConfig`] is the serde form operators write (JSON, TOML, anything
//! serde reads). [`Catalog`] is the validated form the engine runs on; it
//! deserializes through `CatalogConfig`, so a bad file fails at load with an
//! error naming the field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::lease::Fraction;
use crate::model::name::Name;
use crate::model::scope::ScopeKey;
use crate::model::window::{parse_span, Window, WindowConfig};
use crate::Error;

/// Most decimal places a money meter may keep (10^12 minor units per major
/// unit still leaves room for 18 million major units in a `u64`).
pub const MAX_MONEY_SCALE: u32 = 12;

/// Most decimal places a unit price may have. Prices are kept as exact
/// integers of `10^-18` major units so a cost is summed without rounding.
pub const MAX_PRICE_SCALE: u32 = 18;

/// The default warning ratio: a limit turns `Warning` at 80 % of its maximum.
pub const DEFAULT_WARN_AT: Decimal = Decimal::from_parts(8, 0, 0, false, 1);

/// What a meter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Unit {
    /// Whole things: tokens, requests, jobs, messages.
    Count,
    /// Whole seconds of runtime.
    Seconds,
    /// Money in one currency, kept as an integer of `10^-scale` major units
    /// (scale 2 is cents; scale 6 is micro-dollars).
    Money {
        /// ISO 4217 code or any label; amounts in another currency are refused.
        currency: String,
        /// Decimal places kept, at most [`MAX_MONEY_SCALE`].
        scale: u32,
    },
}

/// A named quantity with a unit, such as `llm_tokens_input` or `cost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// The meter's id, unique in the catalog.
    pub id: String,
    /// What it counts.
    pub unit: Unit,
}

impl Meter {
    /// A meter of whole things.
    pub fn count(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Count,
        }
    }

    /// A meter of seconds.
    pub fn seconds(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Seconds,
        }
    }

    /// A money meter in `currency`, keeping `scale` decimal places.
    pub fn money(id: impl Into<String>, currency: impl Into<String>, scale: u32) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Money {
                currency: currency.into(),
                scale,
            },
        }
    }

    /// Decimal places of the meter's smallest unit (0 for counts and seconds).
    pub fn scale(&self) -> u32 {
        match self.unit {
            Unit::Money { scale, .. } => scale,
            _ => 0,
        }
    }

    /// The currency of a money meter.
    pub fn currency(&self) -> Option<&str> {
        match &self.unit {
            Unit::Money { currency, .. } => Some(currency),
            _ => None,
        }
    }

    /// Convert an integer of the meter's smallest unit to a decimal of its
    /// major unit (for money: 1234 at scale 2 is 12.34). The scale is valid
    /// in any meter of a built [`Catalog`] (at most [`MAX_MONEY_SCALE`]).
    pub fn to_decimal(&self, minor: u64) -> Decimal {
        // scale <= MAX_MONEY_SCALE, within Decimal's 28.
        minor_to_decimal(minor, self.scale())
    }

    /// Convert a decimal amount to the meter's smallest unit, rounding any
    /// fraction **up** so a charge never rounds down to zero. `None` if it does
    /// not fit a `u64` or is negative.
    pub fn to_minor_ceil(&self, amount: Decimal) -> Option<u64> {
        if amount.is_zero() {
            return Some(0);
        }
        if amount.is_sign_negative() {
            return None;
        }
        // Integer arithmetic on the mantissa: Decimal multiplication may round
        // away trailing digits, and a rounded-away tail must still round up.
        let m = u128::try_from(amount.mantissa()).ok()?;
        let (have, want) = (amount.scale(), self.scale());
        let minor = if have <= want {
            m.checked_mul(10u128.checked_pow(want - have)?)?
        } else {
            let div = 10u128.checked_pow(have - want)?;
            m / div + u128::from(m % div != 0)
        };
        u64::try_from(minor).ok()
    }
}

/// A limit's maximum as written in configuration: `-1` or `"unlimited"` for
/// no maximum, `0` for "not available", or an amount in the meter's major
/// unit (`20000` tokens, `"50.00"` dollars).
///
/// Fractional money is written as a string so it is never a float.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaxConfig {
    /// No maximum: usage is counted, never refused.
    Unlimited,
    /// A maximum in the meter's major unit. Negative values other than `-1`
    /// are refused at load.
    Amount(Decimal),
}

impl From<u64> for MaxConfig {
    fn from(v: u64) -> Self {
        MaxConfig::Amount(Decimal::from(v))
    }
}

impl From<Decimal> for MaxConfig {
    fn from(v: Decimal) -> Self {
        MaxConfig::Amount(v)
    }
}

impl Serialize for MaxConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxConfig::Unlimited => s.serialize_str("unlimited"),
            MaxConfig::Amount(d) => match u64::try_from(*d) {
                Ok(v) if d.fract().is_zero() => s.serialize_u64(v),
                _ => s.serialize_str(&d.to_string()),
            },
        }
    }
}

impl<'de> Deserialize<'de> for MaxConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = d.deserialize_any(ExactDecimal {
            what: "maximum",
            unlimited: true,
        })?;
        Ok(v.map_or(MaxConfig::Unlimited, MaxConfig::Amount))
    }
}

/// Reads an integer or a decimal string, never a float (floats are never
/// money). With `unlimited`, `-1` and `"unlimited"` read as `None`.
struct ExactDecimal {
    what: &'static str,
    unlimited: bool,
}

impl Visitor<'_> for ExactDecimal {
    type Value = Option<Decimal>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unlimited {
            f.write_str("-1, \"unlimited\", an integer, or a decimal string such as \"50.00\"")
        } else {
            f.write_str("an integer or a decimal string such as \"0.03\"")
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((!(self.unlimited && v == -1)).then(|| Decimal::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Decimal::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(E::custom(format_args!(
            "{} {v} is a float; write fractional amounts as strings, e.g. \"12.50\"",
            self.what
        )))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let t = v.trim();
        if self.unlimited && (t.eq_ignore_ascii_case("unlimited") || t == "-1") {
            return Ok(None);
        }
        // Exact: a value with more digits than a Decimal holds is refused,
        // never rounded.
        Decimal::from_str_exact(t)
            .map(Some)
            .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
    }
}

/// A limit as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// The meter it limits.
    pub meter: String,
    /// When usage stops counting.
    pub window: WindowConfig,
    /// The maximum.
    pub max: MaxConfig,
    /// Warning ratio in (0, 1]; 0.8 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Decimal>,
}

impl LimitConfig {
    /// A limit on `meter` over `window` with maximum `max` and the default
    /// warning ratio.
    pub fn new(meter: impl Into<String>, window: Window, max: impl Into<MaxConfig>) -> Self {
        Self {
            meter: meter.into(),
            window: window.into(),
            max: max.into(),
            warn_at: None,
        }
    }

    /// The same limit with a warning ratio.
    #[must_use]
    pub fn warn_at(mut self, ratio: Decimal) -> Self {
        self.warn_at = Some(ratio);
        self
    }
}

/// A validated limit: meter, window, maximum in the meter's smallest unit and
/// the warning threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub(crate) meter: Name,
    pub(crate) meter_idx: usize,
    pub(crate) window: Window,
    pub(crate) max: Option<u64>,
    pub(crate) warn_at: Decimal,
    /// Smallest usage that is `Warning`: ceil(max × warn_at).
    pub(crate) warn_threshold: u64,
}

impl Limit {
    /// The meter limited.
    pub fn meter(&self) -> &str {
        &self.meter
    }
    /// When usage stops counting.
    pub fn window(&self) -> Window {
        self.window
    }
    /// Maximum in the meter's smallest unit; `None` is unlimited.
    pub fn max(&self) -> Option<u64> {
        self.max
    }
    /// The warning ratio.
    pub fn warn_at(&self) -> Decimal {
        self.warn_at
    }
}

/// A plan as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The plan's id, unique in the catalog.
    pub id: String,
    /// Its limits. At most one limit per meter and window.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// The money meter that costs are charged to. Required when `prices` is
    /// not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_meter: Option<String>,
    /// Unit prices: money (in the cost meter's currency, major units) per
    /// unit of a meter. Write them as strings (`"0.03"`) or integers; floats
    /// are refused so a price is never inexact.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "strict_prices"
    )]
    pub prices: BTreeMap<String, Decimal>,
    /// How long a reservation may run before it is overdue (seed 002's
    /// maximum job duration): a span such as `"2h"`. Overdue reservations are
    /// reported by [`Engine::overdue`](crate::Engine::overdue); the host kills
    /// the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_job_duration: Option<String>,
    /// Shares of a reservation's holds returned when it is released; the
    /// default returns 50 % on failure, 100 % on cancel and nothing on
    /// completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunds: Option<RefundPolicy>,
    /// After a reservation of a subject on this plan is released as
    /// [`Outcome::Failed`](crate::Outcome::Failed), the subject may not be
    /// admitted or reserved for this span (`"10m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_after_failure: Option<String>,
}

/// The share of a reservation's holds returned to the quota when it is
/// released, per outcome: `0` returns nothing (all of the estimate counts as
/// used), `1` returns everything. Written as integers or decimal strings,
/// never floats.
///
/// ```json
/// {"failed": "0.5", "cancelled": 1, "completed": 0}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundPolicy {
    /// Returned when the work failed (default 0.5).
    #[serde(default = "half", deserialize_with = "strict_decimal")]
    pub failed: Decimal,
    /// Returned when the work was cancelled (default 1).
    #[serde(default = "one", deserialize_with = "strict_decimal")]
    pub cancelled: Decimal,
    /// Returned when the work completed without reporting actual amounts
    /// (default 0).
    #[serde(default, deserialize_with = "strict_decimal")]
    pub completed: Decimal,
}

fn half() -> Decimal {
    Decimal::new(5, 1)
}

fn one() -> Decimal {
    Decimal::ONE
}

impl Default for RefundPolicy {
    fn default() -> Self {
        Self {
            failed: half(),
            cancelled: one(),
            completed: Decimal::ZERO,
        }
    }
}

/// A validated refund policy: the share of each hold kept as usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keep {
    pub(crate) failed: Fraction,
    pub(crate) cancelled: Fraction,
    pub(crate) completed: Fraction,
}

impl PlanConfig {
    /// An empty plan.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            limits: Vec::new(),
            cost_meter: None,
            prices: BTreeMap::new(),
            max_job_duration: None,
            refunds: None,
            cooldown_after_failure: None,
        }
    }
    /// Set the maximum job duration (a span such as `"2h"`).
    #[must_use]
    pub fn max_job_duration(mut self, span: impl Into<String>) -> Self {
        self.max_job_duration = Some(span.into());
        self
    }
    /// Set the refund policy.
    #[must_use]
    pub fn refunds(mut self, policy: RefundPolicy) -> Self {
        self.refunds = Some(policy);
        self
    }
    /// Set the cooldown after a failed reservation (a span such as `"10m"`).
    #[must_use]
    pub fn cooldown_after_failure(mut self, span: impl Into<String>) -> Self {
        self.cooldown_after_failure = Some(span.into());
        self
    }
    /// Add a limit.
    #[must_use]
    pub fn limit(mut self, limit: LimitConfig) -> Self {
        self.limits.push(limit);
        self
    }
    /// Set the cost meter.
    #[must_use]
    pub fn cost_meter(mut self, meter: impl Into<String>) -> Self {
        self.cost_meter = Some(meter.into());
        self
    }
    /// Add a unit price.
    #[must_use]
    pub fn price(mut self, meter: impl Into<String>, per_unit: Decimal) -> Self {
        self.prices.insert(meter.into(), per_unit);
        self
    }
}

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub(crate) id: Arc<str>,
    /// Shared with every allocation of the plan that overrides nothing.
    pub(crate) limits: Arc<[Limit]>,
    pub(crate) cost_meter: Option<usize>,
    /// The cost meter with what a call needs of it (its id, scale and
    /// currency), kept here so a call does not look them up in the catalog.
    pub(crate) cost: Option<CostMeter>,
    /// The plan's own unit prices, one entry per price it sets, sorted by
    /// meter index: sized by the plan, not by the catalog's meters.
    pub(crate) prices: Box<[PlanPrice]>,
    /// When the plan has a cost meter: the catalog's one table of the ids a
    /// request lists as unpriced (every meter but money), shared by all
    /// plans. `None` without a cost meter: then nothing is unpriced.
    pub(crate) unpriced: Option<UnpricedIds>,
    /// Maximum job duration in milliseconds.
    pub(crate) max_job_ms: Option<i64>,
    /// Share of holds kept as usage per release outcome.
    pub(crate) keep: Keep,
    /// Cooldown after a failure, in milliseconds.
    pub(crate) cooldown_ms: Option<i64>,
}

impl Plan {
    /// The plan's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Its limits.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Its unit price for `meter` (money per unit, in the cost meter's
    /// currency), if it has one.
    pub fn price(&self, catalog: &Catalog, meter: &str) -> Option<Decimal> {
        let idx = *catalog.meter_index.get(meter)?;
        self.price_of(idx).map(|p| p.price)
    }

    /// Its price entry for the meter at catalog index `idx`, if it sets one.
    #[inline]
    fn price_of(&self, idx: usize) -> Option<&PlanPrice> {
        // A plan sets a handful of prices: a scan beats a binary search there.
        if self.prices.len() <= 8 {
            self.prices.iter().find(|p| p.meter_idx == idx)
        } else {
            self.prices
                .binary_search_by_key(&idx, |p| p.meter_idx)
                .ok()
                .map(|i| &self.prices[i])
        }
    }

    /// Its price for the meter at catalog index `idx`, as exact integers of
    /// `10^-MAX_PRICE_SCALE` major units; `None` when unpriced.
    #[inline]
    pub(crate) fn price_units_of(&self, idx: usize) -> Option<u128> {
        self.price_of(idx).map(|p| p.units)
    }

    /// The id of the meter at catalog index `idx` when a request naming it
    /// is listed as unpriced in a decision: the plan has a cost meter, sets
    /// no price for the meter, and the meter is not money. `None` otherwise.
    #[inline]
    pub(crate) fn unpriced_of(&self, idx: usize) -> Option<Name> {
        let id = self.unpriced.as_ref()?.get(idx)?;
        if self.price_of(idx).is_some() {
            return None;
        }
        Some(id)
    }

    /// How many entries the plan's own tables hold (its limits and its
    /// prices); the catalog-wide unpriced table is not the plan's.
    #[cfg(test)]
    pub(crate) fn table_entries(&self) -> usize {
        self.limits.len() + self.prices.len()
    }

    /// The id of the money meter its costs are charged to, if any.
    pub fn cost_meter<'c>(&self, catalog: &'c Catalog) -> Option<&'c str> {
        self.cost_meter.map(|i| catalog.meters[i].id.as_str())
    }
}

/// One unit price a plan sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanPrice {
    /// The priced meter's index in the catalog.
    pub(crate) meter_idx: usize,
    /// Money per unit, in the cost meter's currency.
    pub(crate) price: Decimal,
    /// The same price as an exact integer of `10^-MAX_PRICE_SCALE` major units.
    pub(crate) units: u128,
}

/// The catalog's table, by meter index, of the id a request naming the meter
/// lists as unpriced in a plan with a cost meter and no price for it: every
/// meter's id but a money meter's (money is never priced, so never
/// unpriced). Built once per catalog and shared by its plans through an
/// `Arc`, so a plan pays one pointer for it, whatever the meter count.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct UnpricedIds(Arc<[Option<Name>]>);

impl UnpricedIds {
    fn new(meters: &[Meter], ids: &[Name]) -> Self {
        Self(
            meters
                .iter()
                .zip(ids)
                .map(|(m, &id)| (!matches!(m.unit, Unit::Money { .. })).then_some(id))
                .collect(),
        )
    }

    /// The id listed for meter `idx`, if it is not money.
    #[inline]
    fn get(&self, idx: usize) -> Option<Name> {
        self.0.get(idx).copied().flatten()
    }
}

impl fmt::Debug for UnpricedIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The catalog's, shared by every plan: not repeated in each plan's output.
        write!(f, "UnpricedIds({} meters)", self.0.len())
    }
}

/// A plan's cost meter, as a call prices a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CostMeter {
    /// Its index in the catalog.
    pub(crate) idx: usize,
    /// Its id.
    pub(crate) id: Name,
    /// Its decimal places.
    pub(crate) scale: u32,
    /// Its currency.
    pub(crate) currency: Name,
}

impl CostMeter {
    /// `minor` of the meter's smallest unit in its major unit, as
    /// [`Meter::to_decimal`] converts it.
    #[inline]
    pub(crate) fn to_decimal(self, minor: u64) -> Decimal {
        minor_to_decimal(minor, self.scale)
    }
}

/// `minor` smallest units of a unit with `scale` decimal places, in the
/// major unit (1234 at scale 2 is 12.34); a scale past `Decimal`'s (never
/// in a built catalog) is left at 0.
#[inline]
fn minor_to_decimal(minor: u64, scale: u32) -> Decimal {
    let mut d = Decimal::from(minor);
    d.set_scale(scale).ok();
    d
}

/// `ceil(Σ units × price)` in the smallest unit of a money meter with
/// `scale` decimal places, from prices in `10^-MAX_PRICE_SCALE` units. Exact
/// integer arithmetic: `None` when it does not fit a `u64`, never a rounded
/// result.
/// `a == b`, for the short ids of meters: a length of 4 to 16 bytes is
/// compared as two overlapping words each, without a call to `memcmp`.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    fn word8(s: &[u8], at: usize) -> Option<u64> {
        s.get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_le_bytes)
    }
    fn word4(s: &[u8], at: usize) -> Option<u32> {
        s.get(at..at + 4)
            .and_then(|w| <[u8; 4]>::try_from(w).ok())
            .map(u32::from_le_bytes)
    }
    match n {
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        _ => a == b,
    }
}

/// `10^n` for `n` in `0..=MAX_PRICE_SCALE`: a call looks its divisor up
/// rather than computing the power.
const POW10: [u64; MAX_PRICE_SCALE as usize + 1] = {
    let mut t = [1u64; MAX_PRICE_SCALE as usize + 1];
    let mut i = 1;
    while i < t.len() {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

pub(crate) fn cost_minor(terms: impl IntoIterator<Item = (u64, u128)>, scale: u32) -> Option<u64> {
    let mut total: u128 = 0;
    for (units, price) in terms {
        let term = match u64::try_from(price) {
            // A u64 × u64 product always fits a u128: no overflow check.
            Ok(p) => u128::from(units) * u128::from(p),
            Err(_) => u128::from(units).checked_mul(price)?,
        };
        total = total.checked_add(term)?;
    }
    // scale <= MAX_MONEY_SCALE < MAX_PRICE_SCALE = 18, so div <= 10^18 fits a
    // u64; the index is at most 18, within the table.
    let div = POW10[MAX_PRICE_SCALE.saturating_sub(scale) as usize];
    match u64::try_from(total) {
        // One 64-bit division instead of a 128-bit one; no overflow: with
        // div = 1 the remainder is 0, otherwise the quotient is at most half.
        Ok(t) => Some(t / div + u64::from(t % div != 0)),
        Err(_) => {
            let div = u128::from(div);
            u64::try_from(total / div + u128::from(total % div != 0)).ok()
        }
    }
}

/// A shared scope as written in configuration: an account pool, or a model's
/// global budget that every request naming the model draws on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's id, unique among pools.
    pub id: String,
    /// When set, every request naming this model draws on the pool, whatever
    /// its allocation says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its limits.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// After a reservation drawing on this pool is released as
    /// [`Outcome::Failed`](crate::Outcome::Failed), nothing drawing on the
    /// pool may be admitted or reserved for this span (seed 002's per-repository
    /// cooldown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_after_failure: Option<String>,
}

impl PoolConfig {
    /// An empty pool.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            model: None,
            limits: Vec::new(),
            cooldown_after_failure: None,
        }
    }
    /// Set the cooldown after a failed reservation (a span such as `"10m"`).
    #[must_use]
    pub fn cooldown_after_failure(mut self, span: impl Into<String>) -> Self {
        self.cooldown_after_failure = Some(span.into());
        self
    }
    /// Make it the global pool of `model`.
    #[must_use]
    pub fn for_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
    /// Add a limit.
    #[must_use]
    pub fn limit(mut self, limit: LimitConfig) -> Self {
        self.limits.push(limit);
        self
    }
}

/// A validated pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub(crate) id: Arc<str>,
    pub(crate) scope: ScopeKey,
    pub(crate) limits: Vec<Limit>,
    pub(crate) cooldown_ms: Option<i64>,
}

impl Pool {
    /// The pool's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Its limits.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }
}

/// The whole configuration: meters, plans and pools.
///
/// ```json
/// {
///   "meters": [{"id": "llm_tokens_input", "unit": "count"},
///              {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
///   "plans": [{"id": "plan_free",
///              "limits": [{"meter": "llm_tokens_input",
///                          "window": {"calendar": {"period": "month"}}, "max": 20000}]}],
///   "pools": []
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Meters.
    #[serde(default)]
    pub meters: Vec<Meter>,
    /// Plans.
    #[serde(default)]
    pub plans: Vec<PlanConfig>,
    /// Shared scopes.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

impl CatalogConfig {
    /// Add a meter.
    #[must_use]
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meters.push(meter);
        self
    }
    /// Add a plan.
    #[must_use]
    pub fn plan(mut self, plan: PlanConfig) -> Self {
        self.plans.push(plan);
        self
    }
    /// Add a pool.
    #[must_use]
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pools.push(pool);
        self
    }

    /// Validate into a [`Catalog`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field: a duplicate id, a
    /// limit or price for an unknown meter, a negative maximum other than -1,
    /// a warning ratio outside (0, 1], a rolling window with zero buckets or a
    /// span not divisible into them, a money scale above [`MAX_MONEY_SCALE`],
    /// a maximum with more decimals than its meter keeps, prices without a
    /// money cost meter, or a negative price.
    pub fn build(self) -> Result<Catalog, Error> {
        Catalog::from_config(self)
    }
}

/// The validated catalog the engine runs on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "CatalogConfig")]
pub struct Catalog {
    pub(crate) meters: Vec<Meter>,
    pub(crate) meter_ids: Vec<Name>,
    /// Currency of each money meter, interned so a decision clones, not allocates.
    pub(crate) currencies: Vec<Option<Name>>,
    pub(crate) meter_index: HashMap<String, usize>,
    pub(crate) plans: HashMap<String, Arc<Plan>>,
    pub(crate) pools: HashMap<String, Arc<Pool>>,
    pub(crate) model_pools: HashMap<String, Vec<Arc<Pool>>>,
    /// The ids a request lists as unpriced, shared by every plan with a cost meter.
    unpriced_ids: UnpricedIds,
    config: CatalogConfig,
}

impl TryFrom<CatalogConfig> for Catalog {
    type Error = Error;
    fn try_from(c: CatalogConfig) -> Result<Self, Error> {
        Catalog::from_config(c)
    }
}

impl Serialize for Catalog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.config.serialize(s)
    }
}

impl Catalog {
    /// Validate a configuration. Same as [`CatalogConfig::build`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field.
    pub fn from_config(config: CatalogConfig) -> Result<Self, Error> {
        let mut meter_index = HashMap::new();
        let mut meter_ids = Vec::new();
        for (i, m) in config.meters.iter().enumerate() {
            let field = format!("meters[{i}]");
            if m.id.is_empty() {
                return Err(Error::config(format!("{field}.id"), "empty id"));
            }
            if meter_index.insert(m.id.clone(), i).is_some() {
                return Err(Error::config(
                    format!("{field}.id"),
                    format!("duplicate meter id `{}`", m.id),
                ));
            }
            if let Unit::Money { scale, currency } = &m.unit {
                if *scale > MAX_MONEY_SCALE {
                    return Err(Error::config(
                        format!("{field}.unit.money.scale"),
                        format!("scale {scale} is above {MAX_MONEY_SCALE}"),
                    ));
                }
                if currency.is_empty() {
                    return Err(Error::config(
                        format!("{field}.unit.money.currency"),
                        "empty currency",
                    ));
                }
            }
            meter_ids.push(Name::intern(&m.id));
        }

        let mut catalog = Catalog {
            meters: config.meters.clone(),
            currencies: config
                .meters
                .iter()
                .map(|m| m.currency().map(Name::intern))
                .collect(),
            unpriced_ids: UnpricedIds::new(&config.meters, &meter_ids),
            meter_ids,
            meter_index,
            plans: HashMap::new(),
            pools: HashMap::new(),
            model_pools: HashMap::new(),
            config: CatalogConfig::default(),
        };

        for p in &config.plans {
            let field = format!("plans[{}]", p.id);
            if p.id.is_empty() {
                return Err(Error::config(field, "empty plan id"));
            }
            if catalog.plans.contains_key(&p.id) {
                return Err(Error::config(
                    format!("{field}.id"),
                    format!("duplicate plan id `{}`", p.id),
                ));
            }
            let plan = catalog.resolve_plan(p, &field)?;
            catalog.plans.insert(p.id.clone(), Arc::new(plan));
        }

        for p in &config.pools {
            let field = format!("pools[{}]", p.id);
            if p.id.is_empty() {
                return Err(Error::config(field, "empty pool id"));
            }
            if catalog.pools.contains_key(&p.id) {
                return Err(Error::config(
                    format!("{field}.id"),
                    format!("duplicate pool id `{}`", p.id),
                ));
            }
            let limits = catalog.resolve_limits(&p.limits, &format!("{field}.limits"))?;
            let id: Arc<str> = Arc::from(p.id.as_str());
            let cooldown_ms = span_ms(
                p.cooldown_after_failure.as_deref(),
                &format!("{field}.cooldown_after_failure"),
            )?;
            let pool = Arc::new(Pool {
                scope: ScopeKey::pool(id.clone()),
                id,
                limits,
                cooldown_ms,
            });
            if let Some(model) = &p.model {
                catalog
                    .model_pools
                    .entry(model.clone())
                    .or_default()
                    .push(pool.clone());
            }
            catalog.pools.insert(p.id.clone(), pool);
        }
        catalog.config = config;
        Ok(catalog)
    }

    /// The index of the meter with this id. A handful of meters is scanned
    /// (cheaper than hashing the id); a large catalog uses its map.
    #[inline(always)]
    pub(crate) fn meter_idx(&self, id: &str) -> Option<usize> {
        if self.meter_ids.len() <= 16 {
            let id = id.as_bytes();
            self.meter_ids
                .iter()
                .position(|m| same_bytes(m.as_bytes(), id))
        } else {
            self.meter_index.get(id).copied()
        }
    }

    /// The meter with this id.
    pub fn meter(&self, id: &str) -> Option<&Meter> {
        self.meter_index.get(id).map(|&i| &self.meters[i])
    }

    /// The interned currency of money meter `idx` (empty for other meters).
    pub(crate) fn currency(&self, idx: usize) -> Name {
        self.currencies
            .get(idx)
            .copied()
            .flatten()
            .unwrap_or_else(|| Name::intern(""))
    }

    /// The plan with this id.
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id).map(|p| &**p)
    }

    /// The pool with this id.
    pub fn pool(&self, id: &str) -> Option<&Pool> {
        self.pools.get(id).map(|p| &**p)
    }

    /// The configuration this catalog was built from.
    pub fn config(&self) -> &CatalogConfig {
        &self.config
    }

    /// How many entries the catalog's tables hold in all: its per-meter
    /// tables once, each plan's and each pool's own tables, and the model
    /// pools' lists.
    #[cfg(test)]
    pub(crate) fn table_entries(&self) -> usize {
        let per_meter = self.meters.len()
            + self.meter_ids.len()
            + self.currencies.len()
            + self.meter_index.len()
            + self.unpriced_ids.0.len();
        let plans: usize = self.plans.values().map(|p| p.table_entries()).sum();
        let pools: usize = self.pools.values().map(|p| p.limits.len()).sum();
        let models: usize = self.model_pools.values().map(Vec::len).sum();
        per_meter + plans + pools + models
    }

    fn resolve_plan(&self, p: &PlanConfig, field: &str) -> Result<Plan, Error> {
        let limits = self.resolve_limits(&p.limits, &format!("{field}.limits"))?;
        let cost_meter = match &p.cost_meter {
            None => None,
            Some(id) => {
                let f = format!("{field}.cost_meter");
                let idx = *self
                    .meter_index
                    .get(id)
                    .ok_or_else(|| Error::config(&f, format!("unknown meter `{id}`")))?;
                if !matches!(self.meters[idx].unit, Unit::Money { .. }) {
                    return Err(Error::config(f, format!("meter `{id}` is not money")));
                }
                Some(idx)
            }
        };
        let mut prices = Vec::with_capacity(p.prices.len());
        for (meter, price) in &p.prices {
            let f = format!("{field}.prices.{meter}");
            let idx = *self
                .meter_index
                .get(meter)
                .ok_or_else(|| Error::config(&f, format!("price for unknown meter `{meter}`")))?;
            if cost_meter.is_none() {
                return Err(Error::config(
                    format!("{field}.cost_meter"),
                    "a plan with prices needs a money cost_meter",
                ));
            }
            if Some(idx) == cost_meter {
                return Err(Error::config(f, "the cost meter cannot have a price"));
            }
            if matches!(self.meters[idx].unit, Unit::Money { .. }) {
                return Err(Error::config(f, "money meters cannot have a unit price"));
            }
            if price.is_sign_negative() && !price.is_zero() {
                return Err(Error::config(f, format!("negative price {price}")));
            }
            if price.scale() > MAX_PRICE_SCALE {
                return Err(Error::config(
                    f,
                    format!("price {price} has more than {MAX_PRICE_SCALE} decimal places"),
                ));
            }
            // mantissa × 10^(18 - scale): exact integer arithmetic.
            let units = u128::try_from(price.mantissa())
                .ok()
                .and_then(|m| m.checked_mul(10u128.pow(MAX_PRICE_SCALE - price.scale())))
                .ok_or_else(|| Error::config(&f, format!("price {price} is too large")))?;
            prices.push(PlanPrice {
                meter_idx: idx,
                price: *price,
                units,
            });
        }
        prices.sort_unstable_by_key(|p| p.meter_idx);
        let policy = p.refunds.clone().unwrap_or_default();
        let keep = |share: Decimal, name: &str| {
            keep_fraction(share)
                .ok_or_else(|| Error::config(format!("{field}.refunds.{name}"), format!("refund share {share} is not an exact number in [0, 1] with at most 18 decimal places")))
        };
        Ok(Plan {
            id: Arc::from(p.id.as_str()),
            limits: limits.into(),
            cost_meter,
            cost: cost_meter.map(|idx| CostMeter {
                idx,
                id: self.meter_ids[idx],
                scale: self.meters[idx].scale(),
                currency: self.currency(idx),
            }),
            prices: prices.into(),
            // Money meters are never priced, so they are not "unpriced".
            unpriced: cost_meter.map(|_| self.unpriced_ids.clone()),
            max_job_ms: span_ms(
                p.max_job_duration.as_deref(),
                &format!("{field}.max_job_duration"),
            )?,
            keep: Keep {
                failed: keep(policy.failed, "failed")?,
                cancelled: keep(policy.cancelled, "cancelled")?,
                completed: keep(policy.completed, "completed")?,
            },
            cooldown_ms: span_ms(
                p.cooldown_after_failure.as_deref(),
                &format!("{field}.cooldown_after_failure"),
            )?,
        })
    }

    /// Validate a list of limits; `field` is its path.
    pub(crate) fn resolve_limits(
        &self,
        limits: &[LimitConfig],
        field: &str,
    ) -> Result<Vec<Limit>, Error> {
        let mut out: Vec<Limit> = Vec::with_capacity(limits.len());
        // A set, so a plan of many limits is checked in linear time.
        let mut seen = HashSet::with_capacity(limits.len());
        for (i, l) in limits.iter().enumerate() {
            let limit = self.resolve_limit(l, &format!("{field}[{i}]"))?;
            if !seen.insert((limit.meter_idx, limit.window)) {
                return Err(Error::config(
                    format!("{field}[{i}]"),
                    format!(
                        "duplicate limit for meter `{}` over window `{}`",
                        l.meter, limit.window
                    ),
                ));
            }
            out.push(limit);
        }
        Ok(out)
    }

    pub(crate) fn resolve_limit(&self, l: &LimitConfig, field: &str) -> Result<Limit, Error> {
        let meter_idx = *self.meter_index.get(&l.meter).ok_or_else(|| {
            Error::config(
                format!("{field}.meter"),
                format!("limit for unknown meter `{}`", l.meter),
            )
        })?;
        let meter = &self.meters[meter_idx];
        let window = l
            .window
            .resolve()
            .map_err(|r| Error::config(format!("{field}.window"), r))?;
        let max = match &l.max {
            MaxConfig::Unlimited => None,
            MaxConfig::Amount(d) => {
                let f = format!("{field}.max");
                if d.is_sign_negative() && !d.is_zero() {
                    return Err(Error::config(
                        f,
                        format!("negative maximum {d}; use -1 or \"unlimited\" for no maximum"),
                    ));
                }
                let minor = meter
                    .to_minor_ceil(*d)
                    .ok_or_else(|| Error::config(&f, format!("maximum {d} does not fit")))?;
                if meter.to_decimal(minor) != *d {
                    return Err(Error::config(
                        f,
                        format!(
                            "maximum {d} has more decimal places than meter `{}` keeps ({})",
                            l.meter,
                            meter.scale()
                        ),
                    ));
                }
                Some(minor)
            }
        };
        if window == Window::Concurrent && meter.unit != Unit::Count {
            return Err(Error::config(
                format!("{field}.window"),
                format!(
                    "a concurrent limit counts jobs: meter `{}` must be a count",
                    l.meter
                ),
            ));
        }
        let warn_at = l.warn_at.unwrap_or(DEFAULT_WARN_AT);
        if warn_at <= Decimal::ZERO || warn_at > Decimal::ONE {
            return Err(Error::config(
                format!("{field}.warn_at"),
                format!("warning ratio {warn_at} is outside (0, 1]"),
            ));
        }
        let warn_threshold = match max {
            None => u64::MAX,
            Some(m) => {
                // m fits u64 and warn_at <= 1, so the product fits too.
                Decimal::from(m)
                    .checked_mul(warn_at)
                    .and_then(|t| u64::try_from(t.ceil()).ok())
                    .unwrap_or(m)
            }
        };
        Ok(Limit {
            meter: self.meter_ids[meter_idx],
            meter_idx,
            window,
            max,
            warn_at,
            warn_threshold,
        })
    }
}

/// A price: an exact decimal, never a float.
struct Price(Decimal);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = d.deserialize_any(ExactDecimal {
            what: "price",
            unlimited: false,
        })?;
        // `unlimited: false` never yields None.
        Ok(Price(v.unwrap_or_default()))
    }
}

fn strict_prices<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Decimal>, D::Error> {
    let raw = BTreeMap::<String, Price>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// Check a set of ids for duplicates; used by allocation validation.
pub(crate) fn first_duplicate<'a>(ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    ids.into_iter().find(|id| !seen.insert(*id))
}

/// A configured span (`"10m"`, `"2h"`) in milliseconds, above zero.
fn span_ms(span: Option<&str>, field: &str) -> Result<Option<i64>, Error> {
    let Some(text) = span else {
        return Ok(None);
    };
    let secs = parse_span(text).map_err(|r| Error::config(field, r))?;
    if secs == 0 {
        return Err(Error::config(field, "span must be above zero"));
    }
    secs.checked_mul(1_000)
        .and_then(|ms| i64::try_from(ms).ok())
        .map(Some)
        .ok_or_else(|| Error::config(field, format!("`{text}` is too long")))
}

/// `1 - refund` as an exact fraction, if `refund` is in `[0, 1]`.
fn keep_fraction(refund: Decimal) -> Option<Fraction> {
    if refund.is_sign_negative() && !refund.is_zero() || refund > Decimal::ONE {
        return None;
    }
    let scale = refund.scale();
    if scale > MAX_PRICE_SCALE {
        return None;
    }
    let den = 10u64.checked_pow(scale)?;
    let num = u64::try_from(refund.mantissa().unsigned_abs()).ok()?;
    Fraction::new(den.checked_sub(num)?, den)
}

fn strict_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    Price::deserialize(d).map(|p| p.0)
}

#[cfg(test)]
mod tests {
    use super::{cost_minor, MAX_MONEY_SCALE, MAX_PRICE_SCALE};
    use crate::{CatalogConfig, LimitConfig, Meter, Period, PlanConfig, Window};

    /// A plan's cost meter carries what the catalog says of that meter (of
    /// two money meters, the one named), and its conversion is the meter's.
    #[test]
    fn a_plans_cost_meter_is_the_catalogs_meter() {
        let day = Window::calendar(Period::Day);
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tok"))
            .meter(Meter::money("eur", "EUR", 2))
            .meter(Meter::money("usd", "USD", 6))
            .plan(
                PlanConfig::new("p")
                    .limit(LimitConfig::new("tok", day, 10u64))
                    .cost_meter("usd"),
            )
            .plan(PlanConfig::new("free").limit(LimitConfig::new("tok", day, 10u64)))
            .build()
            .unwrap();
        let plan = &catalog.plans["p"];
        let cm = plan.cost.expect("a cost meter");
        assert_eq!(Some(cm.idx), plan.cost_meter);
        assert_eq!(&*cm.id, "usd");
        assert_eq!(cm.scale, 6);
        assert_eq!(&*cm.currency, "USD");
        let meter = &catalog.meters[cm.idx];
        for minor in [0, 1, 1_234_567, u64::MAX] {
            assert_eq!(cm.to_decimal(minor), meter.to_decimal(minor));
        }
        assert_eq!(cm.to_decimal(1_234_567).to_string(), "1.234567");
        assert!(catalog.plans["free"].cost.is_none());
    }

    /// `cost_minor` in plain u128 arithmetic, as it was first written.
    fn reference(terms: &[(u64, u128)], scale: u32) -> Option<u64> {
        let mut total: u128 = 0;
        for &(units, price) in terms {
            total = total.checked_add(u128::from(units).checked_mul(price)?)?;
        }
        let div = 10u128.pow(MAX_PRICE_SCALE - scale);
        u64::try_from(total / div + u128::from(total % div != 0)).ok()
    }

    #[test]
    fn cost_minor_is_the_exact_ceiling_on_both_sides_of_u64() {
        let big = u128::from(u64::MAX);
        let units = [
            0,
            1,
            7,
            100,
            999_999,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ];
        let prices = [
            0,
            1,
            3_000_000_000_000,
            10u128.pow(18),
            big,
            big + 1,
            big * 1_000,
            u128::MAX / 2,
            u128::MAX,
        ];
        for scale in 0..=MAX_MONEY_SCALE {
            for &u in &units {
                for &p in &prices {
                    let one = [(u, p)];
                    assert_eq!(
                        cost_minor(one, scale),
                        reference(&one, scale),
                        "{u} × {p} @ {scale}"
                    );
                    let two = [(u, p), (u / 3 + 1, p / 7 + 1)];
                    assert_eq!(
                        cost_minor(two, scale),
                        reference(&two, scale),
                        "{two:?} @ {scale}"
                    );
                }
            }
        }
        // Rounds up, once: 100 tokens at $0.000003 is $0.0003 at scale 6;
        // one token at $0.0000031 is $0.000004.
        assert_eq!(cost_minor([(100, 3_000_000_000_000)], 6), Some(300));
        assert_eq!(cost_minor([(1, 3_100_000_000_000)], 6), Some(4));
        // Past u64 after rounding: an overflow, never a wrapped amount.
        assert_eq!(cost_minor([(u64::MAX, 10u128.pow(18))], 0), Some(u64::MAX));
        assert_eq!(cost_minor([(u64::MAX, 10u128.pow(18) + 1)], 0), None);
    }

    #[test]
    fn short_id_comparison_is_string_equality() {
        let ids = [
            "",
            "a",
            "ab",
            "abc",
            "jobs",
            "cost",
            "costs",
            "abcdefg",
            "abcdefgh",
            "abcdefgi",
            "bbcdefgh",
            "runtime_seconds",
            "runtime_secondz",
            "xuntime_seconds",
            "llm_tokens_input",
            "llm_tokens_inpuT",
            "llm_tokens_input!",
            "ünï",
            "ünïcödé",
        ];
        for a in ids {
            for b in ids {
                assert_eq!(
                    super::same_bytes(a.as_bytes(), b.as_bytes()),
                    a == b,
                    "{a} {b}"
                );
            }
        }
        // Every length from 0 to 20, one byte changed at every position.
        for n in 0..=20usize {
            let a: Vec<u8> = (0..n as u8).collect();
            assert!(super::same_bytes(&a, &a.clone()));
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 0x80;
                assert!(!super::same_bytes(&a, &b), "{n} {i}");
            }
        }
    }

    /// `meters` count meters, one money meter `usd`, and `plans` plans:
    /// plan `i` limits meter `i`, prices meter `i + 1` and charges `usd`;
    /// every third plan sets no cost meter and no price.
    fn wide_catalog(meters: usize, plans: usize) -> crate::Catalog {
        use rust_decimal::Decimal;
        let day = Window::calendar(Period::Day);
        let mut c = CatalogConfig::default().meter(Meter::money("usd", "USD", 6));
        for m in 0..meters {
            c = c.meter(Meter::count(format!("m{m}")));
        }
        for p in 0..plans {
            let mut plan = PlanConfig::new(format!("p{p}")).limit(LimitConfig::new(
                format!("m{}", p % meters),
                day,
                10u64,
            ));
            if p % 3 != 0 {
                plan = plan
                    .cost_meter("usd")
                    .price(format!("m{}", (p + 1) % meters), Decimal::new(3, 2));
            }
            c = c.plan(plan);
        }
        c.build().unwrap()
    }

    /// Issue 13: 4,000 meters × 4,000 plans peaked at 934 MB, because each
    /// plan kept three tables with one entry per catalog meter. A plan's own
    /// tables now hold its limits and its prices, nothing per meter.
    #[test]
    fn a_plans_tables_are_sized_by_the_plan_not_the_catalog() {
        let catalog = wide_catalog(4_000, 4_000);
        let own: usize = catalog
            .config()
            .plans
            .iter()
            .map(|p| p.limits.len() + p.prices.len())
            .sum();
        let stored: usize = catalog.plans.values().map(|p| p.table_entries()).sum();
        assert_eq!(
            stored, own,
            "per-plan entries beyond the plans' limits and prices"
        );
        for plan in catalog.plans.values() {
            assert!(
                plan.table_entries() <= 2,
                "{}: {}",
                plan.id,
                plan.table_entries()
            );
        }
    }

    /// Building a catalog stores entries linear in its size: twice the
    /// meters and twice the plans hold at most twice the entries (a table
    /// per plan and meter held four times as many).
    #[test]
    fn catalog_tables_grow_linearly_with_meters_and_plans() {
        let small = wide_catalog(500, 500).table_entries();
        let large = wide_catalog(1_000, 1_000).table_entries();
        assert!(large <= 2 * small + 8, "{small} -> {large}");
        assert!(large >= 2 * small - 8, "{small} -> {large}");
    }

    /// The sparse tables answer every meter index as the dense tables did:
    /// a price where the plan sets one; unpriced for any meter, limited or
    /// not, when the plan has a cost meter, no price for it and it is not
    /// money; nothing for an index past the catalog.
    #[test]
    fn price_and_unpriced_answers_match_the_per_meter_rule() {
        use rust_decimal::Decimal;
        let day = Window::calendar(Period::Day);
        let mut c = CatalogConfig::default()
            .meter(Meter::money("usd", "USD", 6))
            .meter(Meter::money("eur", "EUR", 2))
            .meter(Meter::seconds("runtime"));
        for m in 0..20 {
            c = c.meter(Meter::count(format!("m{m}")));
        }
        // Prices on ten meters (past the scan, into the binary search), in
        // no particular order.
        let mut many = PlanConfig::new("many").cost_meter("usd");
        for m in [17, 3, 9, 0, 12, 5, 19, 1, 14, 7] {
            many = many.price(format!("m{m}"), Decimal::new(m + 1, 3));
        }
        let catalog = c
            .plan(many)
            .plan(
                PlanConfig::new("few")
                    .cost_meter("eur")
                    .limit(LimitConfig::new("m4", day, 10u64))
                    .price("runtime", Decimal::new(25, 1)),
            )
            .plan(PlanConfig::new("free").limit(LimitConfig::new("m4", day, 10u64)))
            .build()
            .unwrap();
        let n = catalog.meters.len();
        for (id, plan) in &catalog.plans {
            let priced = &catalog
                .config()
                .plans
                .iter()
                .find(|p| &p.id == id)
                .unwrap()
                .prices;
            for idx in 0..n + 3 {
                let meter = catalog.meters.get(idx);
                let price = meter.and_then(|m| priced.get(&m.id).copied());
                assert_eq!(
                    plan.price_units_of(idx).is_some(),
                    price.is_some(),
                    "{id} {idx}"
                );
                if let (Some(m), Some(p)) = (meter, price) {
                    assert_eq!(plan.price(&catalog, &m.id), Some(p));
                    let want = u128::try_from(p.mantissa()).unwrap()
                        * 10u128.pow(MAX_PRICE_SCALE - p.scale());
                    assert_eq!(plan.price_units_of(idx), Some(want), "{id} {idx}");
                }
                let want = meter.and_then(|m| {
                    (plan.cost_meter.is_some() && price.is_none() && m.currency().is_none())
                        .then(|| catalog.meter_ids[idx])
                });
                assert_eq!(plan.unpriced_of(idx), want, "{id} {idx}");
            }
        }
        // Spot checks in words: a meter with no limit in the plan is still
        // unpriced; money never is; without a cost meter nothing is.
        let m2 = catalog.meter_idx("m2").unwrap();
        assert_eq!(catalog.plans["few"].unpriced_of(m2).as_deref(), Some("m2"));
        assert_eq!(
            catalog.plans["few"].unpriced_of(catalog.meter_idx("usd").unwrap()),
            None
        );
        assert_eq!(catalog.plans["free"].unpriced_of(m2), None);
    }

    #[test]
    fn pow10_table_holds_the_powers_of_ten() {
        for (n, &p) in super::POW10.iter().enumerate() {
            assert_eq!(p, 10u64.pow(n as u32));
        }
        assert_eq!(super::POW10.len(), MAX_PRICE_SCALE as usize + 1);
    }
}
