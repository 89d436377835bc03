//! Validated plans and limits: what a call reads of a plan, with prices
//! and refund shares kept as exact integers.

use std::fmt;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::meter::{minor_to_decimal, Meter, Unit};
use super::Catalog;
use crate::model::lease::Fraction;
use crate::model::name::Name;
use crate::model::scope::ScopeKey;
use crate::model::window::Window;

/// Most decimal places a unit price may have. Prices are kept as exact
/// integers of `10^-18` major units so a cost is summed without rounding.
pub const MAX_PRICE_SCALE: u32 = 18;

/// The default warning ratio: a limit turns `Warning` at 80 % of its maximum.
pub const DEFAULT_WARN_AT: Decimal = Decimal::from_parts(8, 0, 0, false, 1);

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
    // The meter's scale, kept here at validation: `conclude` reads it per limit, no catalog lookup.
    pub(crate) scale: crate::model::decision::Scale,
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

/// A validated refund policy: the share of each hold kept as usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keep {
    pub(crate) failed: Fraction,
    pub(crate) cancelled: Fraction,
    pub(crate) completed: Fraction,
}

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub(crate) id: Arc<str>,
    /// The id, interned: what a [`Decision`](crate::Decision) names the
    /// plan by, copied without touching a shared count.
    pub(crate) name: Name,
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
    /// The prepaid balance its priced usage spends from, if any.
    pub(crate) balance: Option<PlanBalance>,
}

/// A plan's prepaid balance, validated: kept in the plan's cost meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlanBalance {
    /// The overdraft, in the cost meter's smallest unit.
    pub(crate) overdraft: u64,
    /// The pool the balance is kept on; `None`: on the subject.
    pub(crate) pool: Option<ScopeKey>,
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

    /// Whether its priced usage spends from a prepaid balance.
    pub fn has_balance(&self) -> bool {
        self.balance.is_some()
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
    /// The counter of money charged for the meter in the plan's cost meter
    /// ([`charged_name`]), interned at validation so a call never interns.
    /// Always `Some` (a plan with prices has a cost meter).
    pub(crate) charged: Option<Name>,
}

/// The name of the engine's counter of money charged for `meter` in
/// `cost_meter` (in the cost meter's smallest unit), kept beside each of the
/// meter's counters of a limit window: `<meter>` U+001F `charged:` `<cost
/// meter>`. Meter ids may hold no control character (the catalog refuses
/// them), so no catalog meter is ever named like one.
///
/// Interns (a global lock): called when a catalog is validated and when a
/// usage report is read, never on a call's hot path.
pub(crate) fn charged_name(meter: &str, cost_meter: &str) -> Name {
    Name::intern(&format!("{meter}\u{1f}charged:{cost_meter}"))
}

/// The catalog's table, by meter index, of the id a request naming the meter
/// lists as unpriced in a plan with a cost meter and no price for it: every
/// meter's id but a money meter's (money is never priced, so never
/// unpriced). Built once per catalog and shared by its plans through an
/// `Arc`, so a plan pays one pointer for it, whatever the meter count.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct UnpricedIds(Arc<[Option<Name>]>);

impl UnpricedIds {
    /// How many meters the table holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

impl UnpricedIds {
    pub(super) fn new(meters: &[Meter], ids: &[Name]) -> Self {
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

/// `10^n` for `n` in `0..=MAX_PRICE_SCALE`: a call looks its divisor up
/// rather than computing the power.
pub(super) const POW10: [u64; MAX_PRICE_SCALE as usize + 1] = {
    let mut t = [1u64; MAX_PRICE_SCALE as usize + 1];
    let mut i = 1;
    while i < t.len() {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// `ceil(Σ units × price)` in the smallest unit of a money meter with
/// `scale` decimal places, from prices in `10^-MAX_PRICE_SCALE` units. Exact
/// integer arithmetic: `None` when it does not fit a `u64`, never a rounded
/// result.
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

/// `1 - refund` as an exact fraction, if `refund` is in `[0, 1]`.
pub(super) fn keep_fraction(refund: Decimal) -> Option<Fraction> {
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
