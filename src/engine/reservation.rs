//! Reservations: the [`Reservation`] a `reserve` opens, the [`Outcome`] a
//! `release` settles it with, and the stages around their store calls.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::observe::Call;
use super::plan::OpList;
use super::prepare::Prepared;
use super::Engine;
use crate::catalog::Plan;
use crate::clock::Clock;
use crate::decision::Decision;
use crate::inline::SmallList;
use crate::name::Name;
use crate::request::Request;
use crate::store::{
    Applied, BalanceOp, Batch, CooldownOp, CounterOp, Fraction, LeaseAction, LeaseId, LeaseOp,
    Mode, ScopeKey,
};
use crate::Error;

/// How a reservation's work ended, for [`Engine::release`]. The plan's
/// [`RefundPolicy`](crate::RefundPolicy) says how much of the hold returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The work finished; by default none of the hold returns (all of it
    /// counts as used). Use [`Engine::commit`] when the actual amounts are
    /// known.
    Completed,
    /// The work failed; by default 50 % of the hold returns, and scopes that
    /// declare a cooldown start it.
    Failed,
    /// The work was cancelled; by default all of the hold returns.
    Cancelled,
}

impl Outcome {
    /// The share of each hold that `plan` keeps as usage for this outcome.
    pub(super) fn keep(self, plan: &Plan) -> Fraction {
        let keep = &plan.keep;
        match self {
            Outcome::Completed => keep.completed,
            Outcome::Failed => keep.failed,
            Outcome::Cancelled => keep.cancelled,
        }
    }
}

/// In-flight work: estimates held on every limit of every scope the request
/// touches, and one slot on each concurrent limit, under a lease that
/// expires unless renewed.
///
/// Settle it exactly once with [`Engine::commit`] or [`Engine::release`]; a
/// reservation that is neither, nor renewed, gives everything back at
/// [`Reservation::expires_at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub(super) id: LeaseId,
    pub(super) subject: Owner,
    pub(super) model: Option<String>,
    pub(super) pools: Vec<String>,
    /// Inline for up to six meters: saves the list's allocation.
    pub(super) held: SmallList<(usize, Name, u64), 6>,
    pub(super) opened_at: DateTime<Utc>,
    pub(super) expires_at: DateTime<Utc>,
    pub(super) deadline: Option<DateTime<Utc>>,
    pub(super) decision: Decision,
    /// The prepaid balance its hold is on (scope, money meter), if its plan
    /// kept one when it opened: growths and the settlement name it even
    /// after a plan change.
    pub(super) balance: Option<(ScopeKey, Name)>,
}

impl Reservation {
    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.id
    }
    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// The model named at reserve time.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    /// When it was opened.
    pub fn opened_at(&self) -> DateTime<Utc> {
        self.opened_at
    }
    /// When its holds return unless renewed.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }
    /// When the work is overdue under the plan's maximum job duration.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.deadline
    }
    /// The amount held on `meter` (estimate plus growth) in its smallest
    /// unit, if the reservation holds any.
    pub fn held(&self, meter: &str) -> Option<u64> {
        self.held
            .iter()
            .find(|(_, m, _)| &**m == meter)
            .map(|&(_, _, n)| n)
    }
    /// The decision that admitted it (the latest `grow` decision after a
    /// growth).
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// After a `grow`: the growth `amounts` added to the holds (`ids` names
    /// the meters by index), and its decision kept.
    pub(super) fn grown(&mut self, amounts: &[(usize, u64)], ids: &[Name], decision: &Decision) {
        for &(i, n) in amounts {
            match self.held.iter_mut().find(|(j, _, _)| *j == i) {
                Some((_, _, h)) => *h = h.saturating_add(n),
                None => self.held.push((i, ids[i], n)),
            }
        }
        self.decision = decision.clone();
    }
}

/// A reservation's subject: its scope key, which reads as the subject's id.
/// A clone of the key the allocation resolved (a reference count), where a
/// `String` was an allocation per reservation; and the lease's owner as it
/// is, so a renewal hashes nothing.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Owner(pub(super) ScopeKey);

/// Prints the subject's id, as the `String` it replaced did.
impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::ops::Deref for Owner {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.id()
    }
}

/// A reservation between its checks and its store call.
pub(super) struct Opening {
    id: LeaseId,
    pub(super) p: Prepared,
    now: DateTime<Utc>,
    /// `now` in Unix milliseconds, the seam's unit.
    now_ms: i64,
    expires_at: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
}

impl Opening {
    /// The batch that opens the lease over `ops`.
    pub(super) fn batch<'a>(
        &'a self,
        ops: &'a [CounterOp<'a>],
        cooldowns: &'a [CooldownOp<'a>],
        balance: Option<BalanceOp<'a>>,
    ) -> Batch<'a> {
        let lease = LeaseOp::new(
            self.id,
            &self.p.alloc.scope,
            LeaseAction::Open {
                expires_at_ms: self.expires_at.timestamp_millis(),
                deadline_ms: self.deadline.map(|d| d.timestamp_millis()),
            },
        );
        let batch = Batch::new(ops, Mode::WithinLimits, self.now_ms)
            .with_lease(lease)
            .with_cooldowns(cooldowns);
        match balance {
            Some(b) => batch.with_balance(b),
            None => batch,
        }
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// A reservation's checks before its store call: no event id, the
    /// request resolved, the lease's expiry and deadline. The allowlist is
    /// checked next, by [`Engine::refused_opening`]: an `Opening` returned
    /// alone is a third of the size of one beside a `Decision`.
    pub(super) fn open(
        &self,
        request: &Request<'_>,
        lease_ttl: std::time::Duration,
    ) -> Result<Opening, Error> {
        if request.event.is_some() {
            return Err(Error::request(
                "reserve takes no event id: a retried reserve is a new reservation",
            ));
        }
        let p = self.prepare(request)?;
        let now = self.clock.now();
        let expires_at = after(now, lease_ttl)?;
        let deadline = p
            .alloc
            .plan
            .max_job_ms
            .and_then(|ms| now.checked_add_signed(chrono::Duration::milliseconds(ms)));
        Ok(Opening {
            id: LeaseId::random(),
            p,
            now,
            now_ms: now.timestamp_millis(),
            expires_at,
            deadline,
        })
    }

    /// The refusing decision (observed) for an opening whose model is
    /// outside the allowlist.
    pub(super) fn refused_opening(&self, o: &Opening, request: &Request<'_>) -> Option<Decision> {
        o.p.model_refused.as_ref()?;
        self.refuse_model(&o.p, Call::Reserve, request, o.now)
    }

    /// A reservation's answer after its store call: the `Reservation`, or
    /// the refusing decision (as `reserve` returns it).
    #[allow(clippy::result_large_err)]
    pub(super) fn opened(
        &self,
        request: &Request<'_>,
        o: &Opening,
        list: &OpList<'_>,
        applied: &Applied,
        cooldowns: &[CooldownOp<'_>],
    ) -> Result<Reservation, Decision> {
        let decision = self.conclude(Call::Reserve, &o.p, list, applied, cooldowns, o.now_ms);
        self.observe(Call::Reserve, request, o.now, &decision);
        if !applied.applied {
            return Err(decision);
        }
        Ok(Reservation {
            id: o.id,
            subject: Owner(o.p.alloc.scope.clone()),
            model: request.model.map(str::to_owned),
            pools: request.pools.iter().map(|s| (*s).to_owned()).collect(),
            held: {
                let mut held = SmallList::new();
                for &(i, n) in o.p.amounts.iter() {
                    held.push((i, self.catalog.meter_ids[i], n));
                }
                held
            },
            balance: super::plan::balance_op(&o.p).map(|b| (b.scope.clone(), b.meter)),
            opened_at: o.now,
            expires_at: o.expires_at,
            deadline: o.deadline,
            decision,
        })
    }

    /// A `commit`'s settlement: `actual` prepared on the reservation, no
    /// share of the holds kept beyond it.
    pub(super) fn settling_commit<'r, 'q>(
        &self,
        reservation: &'r Reservation,
        actual: &'r Request<'q>,
    ) -> Result<Settling<'r, 'q>, Error> {
        Ok(Settling {
            p: self.prepare_for(reservation, actual)?,
            reservation,
            request: actual,
            keep: Fraction::ZERO,
            call: Call::Commit,
            failed: false,
        })
    }

    /// A `release`'s settlement: `request` (the subject only) prepared on
    /// the reservation, keeping the share of each hold that the plan's
    /// refund policy keeps for `outcome`; a failure starts the cooldowns.
    pub(super) fn settling_release<'r, 'q>(
        &self,
        reservation: &'r Reservation,
        request: &'r Request<'q>,
        outcome: Outcome,
    ) -> Result<Settling<'r, 'q>, Error> {
        let mut p = self.prepare_for(reservation, request)?;
        let keep = outcome.keep(&p.alloc.plan);
        // The decision's cost is what the release charges: the kept share
        // of the held cost, rounded up as the store keeps it.
        if let (Some(cm), Some(cost)) = (p.alloc.plan.cost, p.cost.as_mut()) {
            let held = reservation
                .held
                .iter()
                .find(|&&(i, _, _)| i == cm.idx)
                .map_or(0, |&(_, _, n)| n);
            cost.amount += cm.to_decimal(keep.ceil_of(held));
        }
        Ok(Settling {
            keep,
            p,
            reservation,
            request,
            call: Call::Release,
            failed: outcome == Outcome::Failed,
        })
    }
}

/// A `commit` or `release` between its checks and its batch.
pub(super) struct Settling<'r, 'q> {
    pub(super) reservation: &'r Reservation,
    /// The request settled (for a release: the subject only).
    pub(super) request: &'r Request<'q>,
    pub(super) p: Prepared,
    /// The share of each hold kept as usage beyond the request.
    pub(super) keep: Fraction,
    pub(super) call: Call,
    /// Whether the work failed: the scopes' cooldowns start.
    pub(super) failed: bool,
}

/// `now + ttl`, refusing a zero or unrepresentable lease.
pub(super) fn after(now: DateTime<Utc>, ttl: std::time::Duration) -> Result<DateTime<Utc>, Error> {
    if ttl.is_zero() {
        return Err(Error::request("a lease needs a ttl above zero"));
    }
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| Error::request(format!("lease ttl {ttl:?} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::Owner;
    use crate::store::ScopeKey;

    #[test]
    fn a_reservations_subject_reads_and_prints_as_its_id() {
        let owner = Owner(ScopeKey::subject("agent-7"));
        assert_eq!(&*owner, "agent-7");
        assert_eq!(format!("{owner:?}"), format!("{:?}", "agent-7"));
    }
}
