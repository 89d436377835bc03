//! The engine: turns requests into batches and counter states into decisions.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::catalog::{cost_minor, first_duplicate, Catalog, Limit, LimitConfig, Plan, Pool, Unit};
use crate::clock::{Clock, SystemClock};
use crate::decision::{Decision, LimitState, Money, Refusal, Status};
use crate::request::{Quantity, Request};
use crate::store::{
    AllowanceStore, Applied, Batch, CounterOp, CounterState, MemoryStore, Mode, ScopeKey,
};
use crate::window::Window;
use crate::Error;

/// Binds a subject to a plan.
///
/// ```
/// use tollgate::{Allocation, LimitConfig, Period, Window};
/// use rust_decimal_macros::dec;
///
/// let a = Allocation::new("agent-7", "plan_plus")
///     // A monthly cost cap of $50 for this subject only (seed 001).
///     .with_override(LimitConfig::new("cost", Window::calendar(Period::Month), dec!(50)))
///     .with_models(["claude-sonnet", "claude-haiku"])
///     .with_pool("account:acme");
/// # let _ = a;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    /// The subject: an agent, user, API key or account id.
    pub subject: String,
    /// The plan it is on.
    pub plan: String,
    /// Limits for this subject only. An override with the same meter and
    /// window as a plan limit replaces it (same counter, new maximum); any
    /// other override is added. A cap on the plan's cost meter limits the
    /// computed cost of every request; on a plan without a cost meter, a
    /// money limit counts only money the host passes with
    /// [`Request::money`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<LimitConfig>,
    /// The models the subject may use; `None` allows every model. A request
    /// that names no model is not a model call and is not checked. `check` and
    /// `admit` refuse another model with [`Refusal::ModelNotAllowed`] and
    /// record nothing; `record` records the usage (it happened) and reports
    /// the same refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Shared pools the subject also draws on (an account pool). A model's
    /// global pool cannot be listed here: it applies to every request that
    /// names its model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

impl Allocation {
    /// Bind `subject` to `plan` with no overrides.
    pub fn new(subject: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            plan: plan.into(),
            overrides: Vec::new(),
            models: None,
            pools: Vec::new(),
        }
    }

    /// Add a per-allocation limit.
    #[must_use]
    pub fn with_override(mut self, limit: LimitConfig) -> Self {
        self.overrides.push(limit);
        self
    }

    /// Restrict the models the subject may use.
    #[must_use]
    pub fn with_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Draw on a shared pool too.
    #[must_use]
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pools.push(pool.into());
        self
    }
}

/// An allocation resolved against the catalog.
#[derive(Debug)]
struct Resolved {
    allocation: Allocation,
    scope: ScopeKey,
    plan: Arc<Plan>,
    limits: Vec<Limit>,
    pools: Vec<Arc<Pool>>,
    models: Option<Vec<String>>,
}

/// Which engine call made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    /// [`Engine::check`].
    Check,
    /// [`Engine::admit`].
    Admit,
    /// [`Engine::record`].
    Record,
}

/// A decision as an [`Observer`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DecisionEvent<'a> {
    /// The call that made it.
    pub call: Call,
    /// The subject asked about.
    pub subject: &'a str,
    /// The model named, if any.
    pub model: Option<&'a str>,
    /// The engine's clock at the decision.
    pub at: DateTime<Utc>,
    /// The decision.
    pub decision: &'a Decision,
}

/// Sees every decision the engine makes: log rejections with their reason,
/// count unpriced usage, export metrics. Called after the store has applied
/// the batch, outside every lock; keep it quick.
pub trait Observer: Send + Sync {
    /// Called once per decision.
    fn on_decision(&self, event: &DecisionEvent<'_>);
}

impl<F: Fn(&DecisionEvent<'_>) + Send + Sync> Observer for F {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self(event);
    }
}

/// One row of a [`UsageReport`]: a limit of the subject's own scope.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeterUsage {
    /// The meter.
    pub meter: Arc<str>,
    /// The window the row counts over.
    pub window: Window,
    /// Start of the current period (`None` for lifetime windows).
    pub period_start: Option<DateTime<Utc>>,
    /// When usage next leaves the window.
    pub resets_at: Option<DateTime<Utc>>,
    /// Usage in the meter's major unit (tokens, seconds, dollars).
    pub units: Decimal,
    /// The maximum in the meter's major unit; `None` is unlimited.
    pub max: Option<Decimal>,
    /// `units × unit price`, rounded up to the cost meter's smallest unit;
    /// `None` when the plan has no price for the meter.
    pub cost: Option<Money>,
    /// Status of the usage against the maximum: `Exceeded` when usage is past
    /// it (only `record` can put it there), `Warning` at the warning ratio.
    pub status: Status,
}

/// Usage for one subject in its current periods: units and cost per meter
/// (the shape of seed 003's `/usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The subject.
    pub subject: String,
    /// Its plan.
    pub plan: String,
    /// When the report was read.
    pub at: DateTime<Utc>,
    /// One row per limit of the subject's own scope, in plan order then
    /// override order.
    pub meters: Vec<MeterUsage>,
}

/// The quota engine: plans, allocations, a store and a clock.
///
/// ```
/// use tollgate::{Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig,
///                Request, Status, Window};
///
/// let catalog = CatalogConfig::default()
///     .meter(Meter::count("llm_tokens_input"))
///     .plan(PlanConfig::new("plan_free").limit(LimitConfig::new(
///         "llm_tokens_input", Window::calendar(Period::Month), 20_000u64)))
///     .build()?;
/// let engine = Engine::new(catalog);
/// engine.allocate(Allocation::new("agent-7", "plan_free"))?;
///
/// let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", 16_000))?;
/// assert!(d.allowed);
/// assert_eq!(d.status, Status::Warning);
/// let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", 4_001))?;
/// assert!(!d.allowed);
/// assert_eq!(d.status, Status::Exceeded);
/// # Ok::<(), tollgate::Error>(())
/// ```
pub struct Engine<S = MemoryStore, C = SystemClock> {
    catalog: Arc<Catalog>,
    store: S,
    clock: C,
    allocations: RwLock<HashMap<String, Arc<Resolved>>>,
    observer: Option<Arc<dyn Observer>>,
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for Engine<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .field("clock", &self.clock)
            .field("allocations", &self.allocations.read().len())
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine<MemoryStore, SystemClock> {
    /// An engine on the embedded [`MemoryStore`] and the system clock.
    pub fn new(catalog: Catalog) -> Self {
        Self::with_store_and_clock(catalog, MemoryStore::new(), SystemClock)
    }
}

impl<C: Clock> Engine<MemoryStore, C> {
    /// An engine on a [`MemoryStore`] with the given clock (a
    /// [`ManualClock`](crate::ManualClock) in tests).
    pub fn with_clock(catalog: Catalog, clock: C) -> Self {
        Self::with_store_and_clock(catalog, MemoryStore::new(), clock)
    }
}

/// Capacity reserved for a decision's ops: enough for most plans in one
/// allocation.
const INLINE_OPS: usize = 16;

impl<S: AllowanceStore, C: Clock> Engine<S, C> {
    /// An engine on any store and clock.
    pub fn with_store_and_clock(catalog: Catalog, store: S, clock: C) -> Self {
        Self {
            catalog: Arc::new(catalog),
            store,
            clock,
            allocations: RwLock::new(HashMap::new()),
            observer: None,
        }
    }

    /// Attach an observer that sees every decision.
    #[must_use]
    pub fn with_observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Bind a subject to a plan, replacing any earlier allocation of the same
    /// subject. Usage is kept per subject, meter and window, so moving to a
    /// plan with the same windows keeps the usage already counted.
    ///
    /// # Errors
    /// [`Error::UnknownPlan`], [`Error::UnknownPool`], or
    /// [`Error::InvalidConfig`] for an empty subject or a bad override (the
    /// field is `overrides[i]…`). Nothing changes on error.
    pub fn allocate(&self, allocation: Allocation) -> Result<(), Error> {
        if allocation.subject.is_empty() {
            return Err(Error::config("subject", "empty subject id"));
        }
        let plan = self
            .catalog
            .plans
            .get(&allocation.plan)
            .cloned()
            .ok_or_else(|| Error::UnknownPlan {
                plan: allocation.plan.clone(),
            })?;
        let overrides = self
            .catalog
            .resolve_limits(&allocation.overrides, "overrides")?;
        let mut limits = plan.limits.clone();
        for o in overrides {
            match limits
                .iter_mut()
                .find(|l| l.meter_idx == o.meter_idx && l.window == o.window)
            {
                Some(l) => *l = o,
                None => limits.push(o),
            }
        }
        if let Some(dup) = first_duplicate(allocation.pools.iter().map(String::as_str)) {
            return Err(Error::config("pools", format!("pool `{dup}` listed twice")));
        }
        let pools = allocation
            .pools
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let pool = self
                    .catalog
                    .pools
                    .get(id)
                    .cloned()
                    .ok_or_else(|| Error::UnknownPool { pool: id.clone() })?;
                if self.catalog.model_pools.values().flatten().any(|p| p.id == pool.id) {
                    return Err(Error::config(
                        format!("pools[{i}]"),
                        format!("pool `{id}` is a model's global pool: requests naming the model draw on it"),
                    ));
                }
                Ok(pool)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let resolved = Resolved {
            scope: ScopeKey::subject(allocation.subject.as_str()),
            plan,
            limits,
            pools,
            models: allocation.models.clone(),
            allocation,
        };
        self.allocations
            .write()
            .insert(resolved.allocation.subject.clone(), Arc::new(resolved));
        Ok(())
    }

    /// The allocation binding `subject`, as it was given to [`Engine::allocate`].
    pub fn allocation(&self, subject: &str) -> Option<Allocation> {
        self.allocations
            .read()
            .get(subject)
            .map(|r| r.allocation.clone())
    }

    /// Remove a subject's allocation. Its counters stay in the store until
    /// they age out. Returns whether it was allocated.
    pub fn deallocate(&self, subject: &str) -> bool {
        self.allocations.write().remove(subject).is_some()
    }

    /// Preflight: what would `admit` decide now? Changes nothing.
    ///
    /// # Errors
    /// Bad input (see [`Error`]) or a failing store.
    pub fn check(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Check)
    }

    /// Atomic check-then-record: the request is recorded on every limit of
    /// every scope it touches only if all of them stay within their maximum;
    /// otherwise nothing is recorded and the decision says why.
    ///
    /// # Errors
    /// Bad input (see [`Error`]) or a failing store; nothing is recorded.
    pub fn admit(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Admit)
    }

    /// Record usage that already happened (actual output tokens, runtime).
    /// Always recorded, even past a maximum; the decision may be `Exceeded`,
    /// telling the host to stop further work.
    ///
    /// # Errors
    /// Bad input (see [`Error`]), a counter that would overflow, or a failing
    /// store; nothing is recorded.
    pub fn record(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide(request, Call::Record)
    }

    /// Usage for `subject` in the current period of each of its own limits:
    /// units and cost per meter.
    ///
    /// # Errors
    /// [`Error::UnknownSubject`], [`Error::Overflow`] if a meter's cost does
    /// not fit the cost meter's integer, or a failing store.
    pub fn usage(&self, subject: &str) -> Result<UsageReport, Error> {
        let alloc = self.allocation_of(subject)?;
        let now = self.clock.now();
        let ops: Vec<CounterOp<'_>> = alloc
            .limits
            .iter()
            .map(|l| CounterOp {
                scope: &alloc.scope,
                meter: &l.meter,
                window: l.window,
                delta: 0,
                max: l.max,
            })
            .collect();
        let applied = self.apply(&ops, Mode::Check, now)?;
        let cost_meter_idx = alloc.plan.cost_meter.unwrap_or_default();
        let cost_meter = alloc.plan.cost_meter.map(|i| &self.catalog.meters[i]);
        let meters = alloc
            .limits
            .iter()
            .zip(&applied.counters)
            .map(|(l, s)| -> Result<MeterUsage, Error> {
                let meter = &self.catalog.meters[l.meter_idx];
                let price = alloc.plan.price_units.get(l.meter_idx).copied().flatten();
                let cost = match (price, cost_meter) {
                    (Some(p), Some(cm)) => Some(Money {
                        amount: cm.to_decimal(cost_minor([(s.used, p)], cm.scale()).ok_or_else(
                            || Error::Overflow {
                                meter: cm.id.clone(),
                            },
                        )?),
                        currency: self.catalog.currency(cost_meter_idx),
                    }),
                    _ => None,
                };
                Ok(MeterUsage {
                    meter: l.meter.clone(),
                    window: l.window,
                    period_start: s.period_start,
                    resets_at: s.resets_at,
                    units: meter.to_decimal(s.used),
                    max: l.max.map(|m| meter.to_decimal(m)),
                    cost,
                    status: report_status(l, s.used),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(UsageReport {
            subject: subject.to_owned(),
            plan: alloc.plan.id.to_string(),
            at: now,
            meters,
        })
    }

    /// One store call, with the contract's answer shape checked.
    fn apply(
        &self,
        ops: &[CounterOp<'_>],
        mode: Mode,
        now: DateTime<Utc>,
    ) -> Result<Applied, Error> {
        let applied = self.store.apply(&Batch::new(ops, mode, now))?;
        if applied.counters.len() != ops.len() {
            return Err(Error::Store {
                message: format!(
                    "store returned {} counters for {} ops",
                    applied.counters.len(),
                    ops.len()
                ),
            });
        }
        Ok(applied)
    }

    fn allocation_of(&self, subject: &str) -> Result<Arc<Resolved>, Error> {
        self.allocations
            .read()
            .get(subject)
            .cloned()
            .ok_or_else(|| Error::UnknownSubject {
                subject: subject.to_owned(),
            })
    }

    fn decide(&self, req: &Request<'_>, call: Call) -> Result<Decision, Error> {
        let alloc = self.allocation_of(req.subject)?;
        let now = self.clock.now();

        // Amounts per meter, in smallest units; bad input fails here, before
        // any store call.
        let mut amounts: Vec<(usize, u64)> = Vec::with_capacity(req.amounts.len() + 1);
        for &(meter_id, qty) in &req.amounts {
            let idx =
                *self
                    .catalog
                    .meter_index
                    .get(meter_id)
                    .ok_or_else(|| Error::UnknownMeter {
                        meter: meter_id.to_owned(),
                    })?;
            let minor = self.to_minor(idx, qty)?;
            add_amount(&mut amounts, idx, minor, &self.catalog.meter_ids[idx])?;
        }

        // Cost: Σ units × price, exact, rounded up once to the cost meter.
        let mut unpriced = Vec::new();
        let mut cost = None;
        if let Some(cm) = alloc.plan.cost_meter {
            let meter = &self.catalog.meters[cm];
            for &(idx, _) in &amounts {
                // Money meters are never priced, so they are not "unpriced".
                let money = matches!(self.catalog.meters[idx].unit, Unit::Money { .. });
                if alloc.plan.price_units[idx].is_none() && !money {
                    unpriced.push(self.catalog.meter_ids[idx].clone());
                }
            }
            let terms = amounts
                .iter()
                .filter_map(|&(idx, units)| Some((units, alloc.plan.price_units[idx]?)));
            let minor = cost_minor(terms, meter.scale()).ok_or_else(|| Error::Overflow {
                meter: meter.id.clone(),
            })?;
            if minor > 0 {
                add_amount(&mut amounts, cm, minor, &self.catalog.meter_ids[cm])?;
            }
            let charged = amounts
                .iter()
                .find(|(i, _)| *i == cm)
                .map_or(0, |&(_, m)| m);
            cost = Some(Money {
                amount: meter.to_decimal(charged),
                currency: self.catalog.currency(cm),
            });
        }

        // Model allowlist. `check` and `admit` refuse without touching a
        // counter; `record` still records (the work happened) and reports the
        // refusal.
        let model_refused = match (req.model, &alloc.models) {
            (Some(model), Some(allowed)) if !allowed.iter().any(|m| m == model) => {
                Some(Refusal::ModelNotAllowed {
                    model: model.to_owned(),
                })
            }
            _ => None,
        };
        if let Some(reason) = &model_refused {
            if call != Call::Record {
                let decision = Decision {
                    status: Status::Exceeded,
                    allowed: false,
                    recorded: false,
                    reason: Some(reason.clone()),
                    limits: Vec::new(),
                    binding: None,
                    retry_after: None,
                    cost,
                    unpriced,
                };
                self.observe(call, req, now, &decision);
                return Ok(decision);
            }
        }

        // One op per limit per scope whose meter the request names: the
        // subject, its pools, then the model's global pools not already listed.
        let model_pools: &[Arc<Pool>] = req
            .model
            .and_then(|m| self.catalog.model_pools.get(m))
            .map_or(&[], Vec::as_slice);
        let scopes = std::iter::once((&alloc.scope, alloc.limits.as_slice()))
            .chain(alloc.pools.iter().map(|p| (&p.scope, p.limits.as_slice())))
            .chain(
                model_pools
                    .iter()
                    .filter(|p| !alloc.pools.iter().any(|q| q.id == p.id))
                    .map(|p| (&p.scope, p.limits.as_slice())),
            );
        let mut ops: Vec<CounterOp<'_>> = Vec::with_capacity(INLINE_OPS);
        let mut op_limits: Vec<&Limit> = Vec::with_capacity(INLINE_OPS);
        for (scope, limits) in scopes {
            for l in limits {
                if let Some(&(_, delta)) = amounts.iter().find(|(i, _)| *i == l.meter_idx) {
                    ops.push(CounterOp {
                        scope,
                        meter: &l.meter,
                        window: l.window,
                        delta,
                        max: l.max,
                    });
                    op_limits.push(l);
                }
            }
        }

        let mode = match call {
            Call::Check => Mode::Check,
            Call::Admit => Mode::WithinLimits,
            Call::Record => Mode::Force,
        };
        let applied = self.apply(&ops, mode, now)?;
        let mut decision = build_decision(&ops, &op_limits, &applied, call, now, cost, unpriced);
        if let Some(reason) = model_refused {
            decision.status = Status::Exceeded;
            decision.allowed = false;
            decision.reason = Some(reason);
            decision.retry_after = None;
        }
        self.observe(call, req, now, &decision);
        Ok(decision)
    }

    fn to_minor(&self, idx: usize, qty: Quantity<'_>) -> Result<u64, Error> {
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

    fn observe(&self, call: Call, req: &Request<'_>, at: DateTime<Utc>, decision: &Decision) {
        if let Some(o) = &self.observer {
            o.on_decision(&DecisionEvent {
                call,
                subject: req.subject,
                model: req.model,
                at,
                decision,
            });
        }
    }
}

fn add_amount(amounts: &mut Vec<(usize, u64)>, idx: usize, n: u64, id: &str) -> Result<(), Error> {
    match amounts.iter_mut().find(|(i, _)| *i == idx) {
        Some((_, v)) => {
            *v = v.checked_add(n).ok_or_else(|| Error::Overflow {
                meter: id.to_owned(),
            })?;
        }
        None => amounts.push((idx, n)),
    }
    Ok(())
}

/// The status rule: `Exceeded` when a positive request takes usage past the
/// maximum; `Warning` when usage after it is positive and reaches the warning
/// threshold; `Ok` otherwise.
fn status_of(limit: &Limit, after: u64, delta: u64) -> Status {
    match limit.max {
        Some(m) if delta > 0 && after > m => Status::Exceeded,
        Some(_) if after > 0 && after >= limit.warn_threshold => Status::Warning,
        _ => Status::Ok,
    }
}

/// A report's status: like [`status_of`] for a zero request, except that
/// usage already past the maximum (through `record`) is `Exceeded`.
fn report_status(limit: &Limit, used: u64) -> Status {
    match limit.max {
        Some(m) if used > m => Status::Exceeded,
        _ => status_of(limit, used, 0),
    }
}

fn build_decision(
    ops: &[CounterOp<'_>],
    limits: &[&Limit],
    applied: &Applied,
    call: Call,
    now: DateTime<Utc>,
    cost: Option<Money>,
    unpriced: Vec<Arc<str>>,
) -> Decision {
    let mut states = Vec::with_capacity(ops.len());
    let mut any_exceeded = false;
    for ((op, limit), s) in ops.iter().zip(limits).zip(&applied.counters) {
        let s: &CounterState = s;
        // Usage as if the request were recorded: for a recorded batch the
        // store already includes it.
        let after = if applied.applied {
            s.used
        } else {
            s.used.saturating_add(op.delta)
        };
        let status = status_of(limit, after, op.delta);
        any_exceeded |= status == Status::Exceeded;
        states.push(LimitState {
            scope: op.scope.clone(),
            meter: limit.meter.clone(),
            window: op.window,
            requested: op.delta,
            used: s.used,
            max: op.max,
            remaining: op.max.map(|m| m.saturating_sub(s.used)),
            period_start: s.period_start,
            resets_at: s.resets_at,
            status,
        });
    }
    let status = states.iter().map(|s| s.status).max().unwrap_or(Status::Ok);
    let allowed = match call {
        Call::Admit => applied.applied,
        Call::Check | Call::Record => !any_exceeded,
    };

    // Binding limit and retry time.
    let mut binding = None;
    let mut retry_at: Option<Option<DateTime<Utc>>> = None;
    if any_exceeded {
        for (i, (st, s)) in states.iter().zip(&applied.counters).enumerate() {
            if st.status != Status::Exceeded {
                continue;
            }
            let later = match (retry_at, s.available_at) {
                (None, _) => true,
                (Some(None), _) => false,
                (Some(Some(_)), None) => true,
                (Some(Some(a)), Some(b)) => b > a,
            };
            if later {
                binding = Some(i);
                retry_at = Some(s.available_at);
            }
        }
    } else {
        // Least headroom as a fraction of the maximum: remaining_a / max_a < remaining_b / max_b.
        let mut best: Option<(u128, u128)> = None;
        for (i, st) in states.iter().enumerate() {
            let (Some(max), Some(rem)) = (st.max, st.remaining) else {
                continue;
            };
            let (r, m) = (u128::from(rem), u128::from(max.max(1)));
            if best.is_none_or(|(br, bm)| r * bm < br * m) {
                best = Some((r, m));
                binding = Some(i);
            }
        }
    }
    let retry_after = if allowed {
        None
    } else {
        retry_at
            .flatten()
            .map(|t| (t - now).to_std().unwrap_or_default())
    };
    Decision {
        status,
        allowed,
        // A request none of whose meters has a limit touches no counter.
        recorded: applied.applied && ops.iter().any(|op| op.delta > 0),
        reason: (!allowed).then_some(Refusal::LimitExceeded),
        limits: states,
        binding,
        retry_after,
        cost,
        unpriced,
    }
}
