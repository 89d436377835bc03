//! Stage one of every call: a request resolved against its allocation
//! (amounts in smallest units, cost, the allowlist's answer). Bad input
//! fails here, before any store call.

use std::sync::Arc;

use super::allocations::{More, Resolved};
use super::reservation::Reservation;
use super::Engine;
use crate::catalog::{cost_minor, Pool, Unit};
use crate::clock::Clock;
use crate::decision::{MeterList, Money, Refusal};
use crate::inline::SmallList;
use crate::request::{Quantity, Request};
use crate::Error;

/// A request resolved against its allocation.
pub(super) struct Prepared {
    pub(super) alloc: Arc<Resolved>,
    /// Pools named by the request and not listed by the allocation.
    pub(super) extra: Vec<Arc<Pool>>,
    /// Amount per meter index, in smallest units, the cost meter included.
    pub(super) amounts: SmallList<(usize, u64), 6>,
    pub(super) cost: Option<Money>,
    pub(super) model_refused: Option<Refusal>,
}

impl Prepared {
    /// Whether every amount of the request is zero (its cost too).
    pub(super) fn is_zero(&self) -> bool {
        self.amounts.iter().all(|&(_, n)| n == 0)
    }

    /// The ids of the request's unpriced meters, in request order, for a
    /// decision. The plan's table has an id only where a meter is
    /// unpriced (never the cost meter, which `amounts` may end with), so
    /// the amounts give them; inline, so no allocation up to
    /// [`MeterList::INLINE`] of them.
    #[inline]
    pub(super) fn unpriced_ids(&self) -> MeterList {
        let plan = &self.alloc.plan;
        let mut ids = MeterList::new();
        for &(i, _) in self.amounts.iter() {
            if let Some(id) = plan.unpriced_of(i) {
                ids.push(id);
            }
        }
        ids
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// The resolved allocation of `subject`.
    ///
    /// # Errors
    /// [`Error::UnknownSubject`].
    #[inline(always)]
    pub(super) fn allocation_of(&self, subject: &str) -> Result<Arc<Resolved>, Error> {
        match &self.shared {
            None => self
                .allocations
                .get(subject)
                .ok_or_else(|| unknown_subject(subject)),
            Some(shared) => self.shared_allocation_of(shared, subject),
        }
    }

    /// Resolve a request: allocation, pools named for it, amounts in smallest
    /// units, cost and the allowlist's answer. Bad input fails here, before
    /// any store call.
    pub(super) fn prepare(&self, req: &Request<'_>) -> Result<Prepared, Error> {
        self.prepare_inline(req)
    }

    /// [`Engine::prepare`], inlined into the hot `decide`.
    #[inline(always)]
    pub(super) fn prepare_inline(&self, req: &Request<'_>) -> Result<Prepared, Error> {
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

        let mut amounts: SmallList<(usize, u64), 6> = SmallList::new();
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
    pub(super) fn prepare_for(
        &self,
        res: &Reservation,
        req: &Request<'_>,
    ) -> Result<Prepared, Error> {
        if req.subject != &*res.subject {
            return Err(Error::request(format!(
                "reservation {} belongs to `{}`, not `{}`",
                res.id, &*res.subject, req.subject
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
        // Most reservations name no pools: the request as it is, not a copy.
        let mut p = if res.pools.is_empty() {
            self.prepare(req)?
        } else {
            let mut full = req.clone();
            full.pools = res.pools.iter().map(String::as_str).collect();
            self.prepare(&full)?
        };
        // The allowlist was checked when the work was admitted.
        p.model_refused = None;
        Ok(p)
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
}

#[inline]
fn add_amount(
    amounts: &mut SmallList<(usize, u64), 6>,
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
pub(super) fn unknown_subject(subject: &str) -> Error {
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
