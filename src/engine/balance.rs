//! Prepaid balances at the engine (a plan's
//! [`balance`](crate::PlanConfig::balance)): the balance as decisions and
//! usage reports show it, top-ups ([`Engine::top_up`]) and the balance
//! query ([`Engine::balance`]).
//!
//! The store keeps the balance (contract rule 10); every priced call of a
//! plan with a balance carries one debit of its cost in the same batch as
//! its counters ([`balance_op`](super::plan::balance_op)), so the balance
//! and the limits are checked and recorded as one step.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::allocations::Resolved;
use super::observe::Call;
use super::prepare::Prepared;
use super::Engine;
use crate::catalog::CostMeter;
use crate::clock::Clock;
use crate::decision::{Balance, Decision, Grant, Money, Refusal, Status};
use crate::store::{
    ms_to_time, Applied, BalanceAction, BalanceOp, BalanceState, Batch, GrantOp, Mode, ScopeKey,
};
use crate::{Error, Name};

/// A top-up to credit ([`Engine::top_up`]): a credit grant on the balance
/// the subject's plan spends from, idempotent by the host's payment id.
///
/// ```
/// # use rust_decimal::Decimal;
/// use tollgate::TopUp;
///
/// let pack = TopUp::new("pi_3Nx", Decimal::new(2_000, 2), "USD") // $20.00
///     .priority(1);
/// # let _ = pack;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopUp<'a> {
    /// The host's payment id (a Stripe payment intent, an invoice line):
    /// a redelivered webhook with the same id credits once.
    pub payment: &'a str,
    /// The amount, in the currency's major unit (`20.00`), exact in the
    /// plan's cost meter's smallest unit and more than zero.
    pub amount: Decimal,
    /// Its currency: the plan's cost meter's.
    pub currency: &'a str,
    /// From when it counts; `None`: from when it is first credited. A
    /// top-up without one is sent to the store as effective from the Unix
    /// epoch (the same every time, so a webhook redelivered later still
    /// matches it: an effective time of "now" would differ on each
    /// delivery) — it counts as soon as it exists, and among grants of one
    /// priority and expiry it is spent before those with a date.
    pub effective_at: Option<DateTime<Utc>>,
    /// When what it has left stops counting (to the millisecond), if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// Grants are spent lowest priority first (default 0), then the
    /// soonest-expiring (none last), then the earliest effective (a top-up
    /// without `effective_at` first), then by payment id bytes — not by
    /// when they were credited.
    pub priority: u32,
}

impl<'a> TopUp<'a> {
    /// A top-up of `amount` `currency` under `payment`, counting from now,
    /// never expiring, priority 0.
    pub fn new(payment: &'a str, amount: Decimal, currency: &'a str) -> Self {
        Self {
            payment,
            amount,
            currency,
            effective_at: None,
            expires_at: None,
            priority: 0,
        }
    }
    /// Stop counting at `at` (a promotional credit, a yearly pack). An
    /// expiry already past is taken, and the grant never counts: a webhook
    /// redelivered after a promotion ended must still find its payment.
    #[must_use]
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
    /// Count from `at` (a credit bought now for next month).
    #[must_use]
    pub fn effective_at(mut self, at: DateTime<Utc>) -> Self {
        self.effective_at = Some(at);
        self
    }
    /// Set the priority (lower is spent first).
    #[must_use]
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }
}

/// What [`Engine::top_up`] answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Credit {
    /// `false` when this payment id was already credited with the same
    /// terms (a redelivered webhook): nothing changed.
    pub new: bool,
    /// When the store first credited the payment.
    pub granted_at: DateTime<Utc>,
    /// The balance after the top-up.
    pub balance: Balance,
}

/// The longest payment id a top-up takes, in bytes: ids are stored as
/// given (PostgreSQL) or encrypted (Redis) with every grant, for as long as
/// the balance exists; payment providers' ids are far shorter (Stripe's
/// are under 70 bytes).
pub const MAX_PAYMENT_ID_BYTES: usize = 256;

/// The effective time a top-up without one is sent with (the Unix epoch).
const DEFAULT_EFFECTIVE_MS: i64 = 0;

/// The balance op naming `alloc`'s balance with `action`, if its plan
/// keeps one (and so has a cost meter).
pub(super) fn balance_of<'a>(
    alloc: &'a Resolved,
    action: impl FnOnce(u64) -> BalanceAction<'a>,
) -> Option<BalanceOp<'a>> {
    let plan = &alloc.plan;
    let (b, cm) = (plan.balance.as_ref()?, plan.cost.as_ref()?);
    let scope = b.pool.as_ref().unwrap_or(&alloc.scope);
    Some(BalanceOp::new(scope, cm.id, action(b.overdraft)))
}

/// The balance op of a growth or settlement of a reservation whose hold is
/// on `held_on`: that balance, whatever the subject's plan is now (a lease
/// holds on one balance). The debit is the current plan's when it keeps
/// its money in the same meter, else zero (the settlement then only
/// settles the hold); with no hold, the current plan's op.
pub(super) fn settle_op<'a>(
    p: &'a Prepared,
    held_on: Option<&'a (ScopeKey, Name)>,
) -> Option<BalanceOp<'a>> {
    let current = super::plan::balance_op(p);
    let Some((scope, meter)) = held_on else {
        return current;
    };
    let (amount, overdraft) = match current.map(|c| (c.meter, c.action)) {
        Some((m, BalanceAction::Debit { amount, overdraft })) if m == *meter => (amount, overdraft),
        _ => (0, 0),
    };
    Some(BalanceOp::new(
        scope,
        *meter,
        BalanceAction::Debit { amount, overdraft },
    ))
}

/// A store's balance in its public form.
pub(super) fn view(scope: &ScopeKey, cm: CostMeter, b: &BalanceState) -> Balance {
    let available =
        Decimal::try_from_i128_with_scale(b.available(), cm.scale).unwrap_or(Decimal::MIN);
    Balance {
        scope: scope.clone(),
        currency: cm.currency,
        remaining: cm.to_decimal(b.remaining),
        held: cm.to_decimal(b.held),
        debt: cm.to_decimal(b.debt),
        available,
        uncovered: cm.to_decimal(b.uncovered),
        grants: b
            .grants
            .iter()
            .map(|g| Grant {
                id: g.id.clone(),
                amount: cm.to_decimal(g.amount),
                remaining: cm.to_decimal(g.amount.saturating_sub(g.spent)),
                // Sent as the epoch (`TopUp::effective_at` None): it counts
                // from when it was credited.
                effective_at: ms_to_time(if g.effective_at_ms == DEFAULT_EFFECTIVE_MS {
                    g.granted_at_ms
                } else {
                    g.effective_at_ms
                }),
                expires_at: g.expires_at_ms.map(ms_to_time),
                priority: g.priority,
                granted_at: ms_to_time(g.granted_at_ms),
            })
            .collect(),
    }
}

/// A decision's balance part, from the store's answer: the balance shown,
/// and the refusal when the cost did not fit. `admit`, `check`, `reserve`
/// and `grow` are refused (`Exceeded`) when the debit did not fit what the
/// balance had available; `record`, `commit` and `release` (the work
/// happened) when some of the charge went uncovered. A refusal by a limit
/// or a cooldown keeps its reason; the balance's own is
/// [`Refusal::InsufficientBalance`], with no binding limit.
#[cold]
#[inline(never)]
pub(super) fn conclude_balance(
    decision: &mut Decision,
    call: Call,
    p: &Prepared,
    applied: &Applied,
    b: &BalanceState,
) {
    let plan = &p.alloc.plan;
    let (Some(pb), Some(cm)) = (plan.balance.as_ref(), plan.cost) else {
        return;
    };
    let scope = pb.pool.as_ref().unwrap_or(&p.alloc.scope);
    let requested = p
        .amounts
        .iter()
        .find(|(i, _)| *i == cm.idx)
        .map_or(0, |&(_, n)| n);
    let short = match call {
        Call::Check | Call::Admit | Call::Reserve => requested > 0 && !b.fits,
        // A growth is forced (the stream ran): the store holds it whether
        // or not it fit, so it fit exactly when nothing is overdrawn after.
        Call::Grow => requested > 0 && b.available() < 0,
        _ => b.uncovered > 0,
    };
    if applied.applied && requested > 0 && call != Call::Check {
        decision.recorded = true;
    }
    if short {
        // The balance's refusal wins over a limit's or a cooldown's: waiting
        // never helps it (a 429 with a retry time would only lead to a 402).
        decision.status = Status::Exceeded;
        decision.allowed = false;
        decision.retry_after = None;
        let by_limit = decision
            .limits
            .iter()
            .any(|l| l.status == Status::Exceeded && l.requested > 0);
        if !by_limit {
            decision.binding = None;
        }
        let available =
            Decimal::try_from_i128_with_scale(b.available(), cm.scale).unwrap_or(Decimal::MIN);
        // The decision's cost: the request's, or for a release the kept share.
        let needed = decision
            .cost
            .as_ref()
            .map_or_else(|| cm.to_decimal(requested), |c| c.amount);
        decision.reason = Some(Refusal::InsufficientBalance {
            needed: Money {
                amount: needed,
                currency: cm.currency,
            },
            available: Money {
                amount: available,
                currency: cm.currency,
            },
        });
    }
    decision.balance = Some(Box::new(view(scope, cm, b)));
}

impl<S, C: Clock> Engine<S, C> {
    /// The grant batch of a top-up for `subject`, validated; `Err` for bad
    /// input (nothing reaches the store).
    fn grant_batch<'a>(
        &self,
        alloc: &'a Resolved,
        subject: &str,
        t: &TopUp<'a>,
    ) -> Result<(BalanceOp<'a>, CostMeter), Error> {
        let plan = &alloc.plan;
        let (Some(_), Some(cm)) = (plan.balance.as_ref(), plan.cost) else {
            return Err(Error::NoBalance {
                subject: subject.to_owned(),
            });
        };
        let bad = |reason: &str| Error::InvalidTopUp {
            payment: t.payment.to_owned(),
            reason: reason.to_owned(),
        };
        if t.payment.is_empty() {
            return Err(bad("an empty payment id"));
        }
        if t.payment.len() > MAX_PAYMENT_ID_BYTES {
            return Err(bad("a payment id longer than 256 bytes"));
        }
        if t.payment.chars().any(char::is_control) {
            return Err(bad("a payment id with a control character"));
        }
        if t.currency != cm.currency.as_str() {
            return Err(Error::CurrencyMismatch {
                meter: cm.id.to_string(),
                expected: cm.currency.to_string(),
                found: t.currency.to_owned(),
            });
        }
        if t.amount <= Decimal::ZERO {
            return Err(bad("an amount of zero or less"));
        }
        let meter = &self.catalog.meters[cm.idx];
        let amount = meter
            .to_minor_ceil(t.amount)
            .ok_or_else(|| Error::Overflow {
                meter: cm.id.to_string(),
            })?;
        if cm.to_decimal(amount) != t.amount {
            return Err(bad("an amount finer than the balance's smallest unit"));
        }
        let effective_at_ms = t
            .effective_at
            .map_or(DEFAULT_EFFECTIVE_MS, |at| at.timestamp_millis());
        let expires_at_ms = t.expires_at.map(|at| at.timestamp_millis());
        if expires_at_ms.is_some_and(|e| e <= effective_at_ms) {
            return Err(bad("it expires at or before it takes effect"));
        }
        let mut grant = GrantOp::new(t.payment, amount, effective_at_ms).priority(t.priority);
        if let Some(at) = expires_at_ms {
            grant = grant.expiring(at);
        }
        let op =
            balance_of(alloc, |_| BalanceAction::Grant(grant)).ok_or_else(|| Error::NoBalance {
                subject: subject.to_owned(),
            })?;
        Ok((op, cm))
    }

    /// The answer to a top-up from the store's.
    fn credited(
        op: &BalanceOp<'_>,
        cm: CostMeter,
        applied: &Applied,
        now_ms: i64,
    ) -> Result<Credit, Error> {
        let b = applied.balance.as_deref().ok_or_else(no_answer)?;
        let id = match op.action {
            BalanceAction::Grant(g) => g.id,
            BalanceAction::Debit { .. } => "",
        };
        // The store's time (a Redis store may keep the server's), as a
        // redelivery will answer it; the call's time if it is not listed.
        let listed = b
            .grants
            .iter()
            .find(|g| g.id == id)
            .map(|g| g.granted_at_ms);
        Ok(Credit {
            new: applied.replayed_at_ms.is_none(),
            granted_at: ms_to_time(applied.replayed_at_ms.or(listed).unwrap_or(now_ms)),
            balance: view(op.scope, cm, b),
        })
    }

    /// The balance answer of a balance query.
    fn balance_answer(
        op: &BalanceOp<'_>,
        alloc: &Resolved,
        applied: &Applied,
    ) -> Result<Balance, Error> {
        let cm = alloc.plan.cost.ok_or_else(no_answer)?;
        let b = applied.balance.as_deref().ok_or_else(no_answer)?;
        Ok(view(op.scope, cm, b))
    }
}

/// The error for a store that answered a balance batch without a balance.
fn no_answer() -> Error {
    Error::Store {
        message: "store answered a balance batch without the balance".to_owned(),
    }
}

/// The check-mode batch reading a balance: a debit of zero.
fn read_op(alloc: &Resolved) -> Option<BalanceOp<'_>> {
    balance_of(alloc, |overdraft| BalanceAction::Debit {
        amount: 0,
        overdraft,
    })
}

/// A subject's balance op for a usage report, if its plan keeps one.
pub(super) fn report_op(alloc: &Resolved) -> Option<BalanceOp<'_>> {
    read_op(alloc)
}

/// The balance part of a usage report.
pub(super) fn report_view(alloc: &Resolved, applied: &Applied) -> Option<Balance> {
    let op = read_op(alloc)?;
    let cm = alloc.plan.cost?;
    Some(view(op.scope, cm, applied.balance.as_deref()?))
}

impl<S: crate::store::AllowanceStore, C: Clock> Engine<S, C> {
    /// Credit a top-up to the prepaid balance `subject`'s plan spends from
    /// (the subject's own, or the pool the plan keeps it on). Idempotent by
    /// [`TopUp::payment`]: the same payment with the same terms again
    /// changes nothing and answers `new: false`. A top-up repays the
    /// balance's debt (an overdraft) first.
    ///
    /// # Errors
    /// [`Error::UnknownSubject`]; [`Error::NoBalance`] if the plan keeps no
    /// balance; [`Error::InvalidTopUp`] for an amount of zero or less or
    /// finer than the smallest unit, an empty payment id, one longer than
    /// [`MAX_PAYMENT_ID_BYTES`] or with a control character, or an expiry
    /// at or before the start; [`Error::CurrencyMismatch`] for another
    /// currency; [`Error::GrantConflict`] for a payment id already credited
    /// with other terms; [`Error::Overflow`] past the balance's integers;
    /// or a failing store. On every error nothing changed.
    pub fn top_up(&self, subject: &str, top_up: &TopUp<'_>) -> Result<Credit, Error> {
        let alloc = self.allocation_of(subject)?;
        let now_ms = self.clock.now_ms();
        let (op, cm) = self.grant_batch(&alloc, subject, top_up)?;
        let batch = Batch::new(&[], Mode::Force, now_ms).with_balance(op);
        let applied = self.apply(&batch)?;
        Self::credited(&op, cm, &applied, now_ms)
    }

    /// The prepaid balance `subject`'s plan spends from, with its live
    /// grants. Changes nothing.
    ///
    /// # Errors
    /// [`Error::UnknownSubject`], [`Error::NoBalance`] if the plan keeps no
    /// balance, or a failing store.
    pub fn balance(&self, subject: &str) -> Result<Balance, Error> {
        let alloc = self.allocation_of(subject)?;
        let op = read_op(&alloc).ok_or_else(|| Error::NoBalance {
            subject: subject.to_owned(),
        })?;
        let batch = Batch::new(&[], Mode::Check, self.clock.now_ms()).with_balance(op);
        let applied = self.apply(&batch)?;
        Self::balance_answer(&op, &alloc, &applied)
    }
}

#[cfg(feature = "async")]
impl<S: crate::store::AsyncAllowanceStore, C: Clock> Engine<S, C> {
    /// [`Engine::top_up`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::top_up`]. A store call that left without an answer is
    /// [`Error::StoreOutcomeUnknown`]: the top-up may have been credited;
    /// retry it with the same payment id, which credits once.
    pub async fn top_up_async(&self, subject: &str, top_up: &TopUp<'_>) -> Result<Credit, Error> {
        self.refresh_async(subject).await?;
        let alloc = self.allocation_of(subject)?;
        let now_ms = self.clock.now_ms();
        let (op, cm) = self.grant_batch(&alloc, subject, top_up)?;
        let batch = Batch::new(&[], Mode::Force, now_ms).with_balance(op);
        let applied = self.apply_async(&batch).await?;
        Self::credited(&op, cm, &applied, now_ms)
    }

    /// [`Engine::balance`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::balance`]; a failing store is an error whatever the
    /// store's policy.
    pub async fn balance_async(&self, subject: &str) -> Result<Balance, Error> {
        self.refresh_async(subject).await?;
        let alloc = self.allocation_of(subject)?;
        let op = read_op(&alloc).ok_or_else(|| Error::NoBalance {
            subject: subject.to_owned(),
        })?;
        let batch = Batch::new(&[], Mode::Check, self.clock.now_ms()).with_balance(op);
        let applied = self.apply_async(&batch).await?;
        Self::balance_answer(&op, &alloc, &applied)
    }
}
