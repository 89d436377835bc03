//! The serde forms operators write: [`CatalogConfig`] and the plan, pool,
//! limit, maximum and refund forms in it. Amounts are read as integers or
//! decimal strings, never floats.

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Catalog, Meter};
use crate::model::window::{Window, WindowConfig};
use crate::Error;

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
    /// A prepaid balance the plan's priced usage spends from (seed 003's
    /// pay-as-you-go plan): every cost is debited from it in the same step
    /// as the plan's limits, and `admit` refuses what the balance cannot
    /// pay ([`Refusal::InsufficientBalance`](crate::Refusal::InsufficientBalance)).
    /// Needs a `cost_meter`: the balance is kept in it. Credited with
    /// [`Engine::top_up`](crate::Engine::top_up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceConfig>,
}

/// A plan's prepaid balance as written in configuration:
///
/// ```toml
/// balance = { overdraft = "5.00", pool = "account" }
/// ```
///
/// Both fields are optional (`balance = {}` keeps the balance on the
/// subject, with no overdraft).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    /// How far usage that already happened (`record`, `commit`) may take
    /// the balance below zero, as debt the next top-up repays first, in
    /// the cost meter's major unit; default 0 (no overdraft). `admit` and
    /// `reserve` never spend past the balance, whatever the overdraft.
    #[serde(default, deserialize_with = "strict_decimal")]
    pub overdraft: Decimal,
    /// Keep the balance on this pool (an account shared by its subjects)
    /// instead of on each subject. An allocation to the plan must then draw
    /// on the pool ([`Allocation::with_pool`](crate::Allocation::with_pool)),
    /// else `allocate` is [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl BalanceConfig {
    /// A balance on the subject, no overdraft.
    pub fn new() -> Self {
        Self::default()
    }
    /// Allow an overdraft of `amount` (major units of the cost meter).
    #[must_use]
    pub fn overdraft(mut self, amount: Decimal) -> Self {
        self.overdraft = amount;
        self
    }
    /// Keep the balance on pool `id`.
    #[must_use]
    pub fn pool(mut self, id: impl Into<String>) -> Self {
        self.pool = Some(id.into());
        self
    }
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
            balance: None,
        }
    }
    /// Spend priced usage from a prepaid balance ([`BalanceConfig`]).
    #[must_use]
    pub fn balance(mut self, balance: BalanceConfig) -> Self {
        self.balance = Some(balance);
        self
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
    /// span not divisible into them, a money scale above [`MAX_MONEY_SCALE`](crate::MAX_MONEY_SCALE),
    /// a maximum with more decimals than its meter keeps, prices without a
    /// money cost meter, or a negative price.
    pub fn build(self) -> Result<Catalog, Error> {
        Catalog::from_config(self)
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

/// An exact decimal that is not a price (a refund share, an overdraft).
fn strict_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let v = d.deserialize_any(ExactDecimal {
        what: "amount",
        unlimited: false,
    })?;
    // `unlimited: false` never yields None.
    Ok(v.unwrap_or_default())
}
