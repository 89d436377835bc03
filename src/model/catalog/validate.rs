//! Validation of plans and limits against the catalog's meters: each
//! refusal an [`Error::InvalidConfig`] naming the field.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rust_decimal::Decimal;

use super::config::{CatalogConfig, LimitConfig, MaxConfig, PlanConfig, PoolConfig};
use super::plan::UnpricedIds;
use super::plan::{
    keep_fraction, CostMeter, Keep, Limit, Plan, PlanBalance, PlanPrice, DEFAULT_WARN_AT,
    MAX_PRICE_SCALE,
};
use super::{Catalog, Meter, Pool, Unit, MAX_MONEY_SCALE};
use crate::model::name::Name;
use crate::model::scope::ScopeKey;
use crate::model::window::{parse_span, Window};
use crate::Error;

impl Catalog {
    /// A catalog of these meters and nothing else, once each meter is
    /// checked: a unique, non-empty id, and for money a scale of at most
    /// [`MAX_MONEY_SCALE`] and a currency.
    pub(super) fn with_meters(meters: &[Meter]) -> Result<Self, Error> {
        let mut meter_index = HashMap::new();
        let mut meter_ids = Vec::new();
        for (i, m) in meters.iter().enumerate() {
            let field = format!("meters[{i}]");
            if m.id.is_empty() {
                return Err(Error::config(format!("{field}.id"), "empty id"));
            }
            // Control characters are the engine's own: the counters of money
            // charged per meter are named with one, so no meter can be
            // named like them (see `charged_name`).
            if m.id.chars().any(char::is_control) {
                return Err(Error::config(
                    format!("{field}.id"),
                    format!("meter id {:?} holds a control character", m.id),
                ));
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

        Ok(Catalog {
            meters: meters.to_vec(),
            currencies: meters
                .iter()
                .map(|m| m.currency().map(Name::intern))
                .collect(),
            unpriced_ids: UnpricedIds::new(meters, &meter_ids),
            meter_ids,
            meter_index,
            plans: HashMap::new(),
            pools: HashMap::new(),
            model_pools: HashMap::new(),
            config: CatalogConfig::default(),
        })
    }

    /// Validate plan `p` and add it.
    pub(super) fn add_plan(&mut self, p: &PlanConfig) -> Result<(), Error> {
        let field = format!("plans[{}]", p.id);
        if p.id.is_empty() {
            return Err(Error::config(field, "empty plan id"));
        }
        if self.plans.contains_key(&p.id) {
            return Err(Error::config(
                format!("{field}.id"),
                format!("duplicate plan id `{}`", p.id),
            ));
        }
        let plan = self.resolve_plan(p, &field)?;
        self.plans.insert(p.id.clone(), Arc::new(plan));
        Ok(())
    }

    /// Validate pool `p` and add it, and to its model's pools if it names one.
    pub(super) fn add_pool(&mut self, p: &PoolConfig) -> Result<(), Error> {
        let field = format!("pools[{}]", p.id);
        if p.id.is_empty() {
            return Err(Error::config(field, "empty pool id"));
        }
        if self.pools.contains_key(&p.id) {
            return Err(Error::config(
                format!("{field}.id"),
                format!("duplicate pool id `{}`", p.id),
            ));
        }
        let limits = self.resolve_limits(&p.limits, &format!("{field}.limits"))?;
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
            self.model_pools
                .entry(model.clone())
                .or_default()
                .push(pool.clone());
        }
        self.pools.insert(p.id.clone(), pool);
        Ok(())
    }

    pub(super) fn resolve_plan(&self, p: &PlanConfig, field: &str) -> Result<Plan, Error> {
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
        let prices = self.resolve_prices(p, cost_meter, field)?;
        let policy = p.refunds.clone().unwrap_or_default();
        let keep = |share: Decimal, name: &str| {
            keep_fraction(share)
                .ok_or_else(|| Error::config(format!("{field}.refunds.{name}"), format!("refund share {share} is not an exact number in [0, 1] with at most 18 decimal places")))
        };
        Ok(Plan {
            id: Arc::from(p.id.as_str()),
            name: Name::intern(&p.id),
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
            balance: self.resolve_balance(p, cost_meter, field)?,
        })
    }

    /// Validate plan `p`'s balance: it needs a cost meter, and its
    /// overdraft is a non-negative amount exact in that meter's smallest
    /// unit. Its pool is checked once the pools are known
    /// ([`Catalog::check_balance_pools`]).
    fn resolve_balance(
        &self,
        p: &PlanConfig,
        cost_meter: Option<usize>,
        field: &str,
    ) -> Result<Option<PlanBalance>, Error> {
        let Some(b) = &p.balance else {
            return Ok(None);
        };
        let Some(idx) = cost_meter else {
            return Err(Error::config(
                format!("{field}.cost_meter"),
                "a plan with a balance needs a money cost_meter (the balance is kept in it)",
            ));
        };
        let meter = &self.meters[idx];
        let f = format!("{field}.balance.overdraft");
        if b.overdraft.is_sign_negative() && !b.overdraft.is_zero() {
            return Err(Error::config(f, "a negative overdraft"));
        }
        let overdraft = meter
            .to_minor_ceil(b.overdraft)
            .filter(|&m| meter.to_decimal(m) == b.overdraft)
            .ok_or_else(|| {
                Error::config(
                    &f,
                    format!(
                        "{} is not a whole number of `{}`'s smallest unit within range",
                        b.overdraft, meter.id
                    ),
                )
            })?;
        if let Some(pool) = &b.pool {
            if pool.is_empty() {
                return Err(Error::config(
                    format!("{field}.balance.pool"),
                    "empty pool id",
                ));
            }
        }
        Ok(Some(PlanBalance {
            overdraft,
            pool: b
                .pool
                .as_deref()
                .map(|id| ScopeKey::pool(Arc::<str>::from(id))),
        }))
    }

    /// Every plan's balance pool names a pool of the catalog.
    pub(super) fn check_balance_pools(&self, config: &CatalogConfig) -> Result<(), Error> {
        for p in &config.plans {
            if let Some(pool) = p.balance.as_ref().and_then(|b| b.pool.as_ref()) {
                let field = || format!("plans[{}].balance.pool", p.id);
                let Some(found) = self.pools.get(pool) else {
                    return Err(Error::config(field(), format!("unknown pool `{pool}`")));
                };
                // No allocation may draw on a model's global pool, so no
                // subject could ever be on this plan.
                if self
                    .model_pools
                    .values()
                    .flatten()
                    .any(|m| m.id == found.id)
                {
                    return Err(Error::config(
                        field(),
                        format!("pool `{pool}` is a model's global pool: it cannot keep a plan's balance"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Validate plan `p`'s prices (`field` is the plan's path) into its
    /// own list, sorted by meter index: one entry per price it sets.
    fn resolve_prices(
        &self,
        p: &PlanConfig,
        cost_meter: Option<usize>,
        field: &str,
    ) -> Result<Vec<PlanPrice>, Error> {
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
            let charged = cost_meter
                .map(|cm| super::plan::charged_name(&self.meters[idx].id, &self.meters[cm].id));
            prices.push(PlanPrice {
                meter_idx: idx,
                price: *price,
                units,
                charged,
            });
        }
        prices.sort_unstable_by_key(|p| p.meter_idx);
        Ok(prices)
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
            scale: crate::model::decision::Scale::of(&meter.unit),
        })
    }
}

/// Check a set of ids for duplicates; used by allocation validation.
pub(crate) fn first_duplicate<'a>(ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    ids.into_iter().find(|id| !seen.insert(*id))
}

/// A configured span (`"10m"`, `"2h"`) in milliseconds, above zero.
pub(super) fn span_ms(span: Option<&str>, field: &str) -> Result<Option<i64>, Error> {
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
