//! The engine's async calls, for an [`AsyncAllowanceStore`] (feature
//! `async`).
//!
//! Each call is its sync twin with the store call awaited: the same
//! preparation (`prepare`, `ops_for`, `cooldowns_for`, `usage_ops`), the
//! same batch, the same decision (`finish`, `finish_quiet`,
//! `usage_report`). Only the fail-open policy is
//! new: see [`FailurePolicy`].

use super::{after, fingerprint, usage_ops, Call, Engine, OpList, Reservation, Shape, UsageReport};
use crate::clock::Clock;
use crate::decision::{Decision, Status};
use crate::request::Request;
use crate::store::{
    Applied, AsyncAllowanceStore, Batch, EventKey, FailurePolicy, Fraction, LeaseAction, LeaseInfo,
    LeaseOp, Mode, ScopeKey,
};
use crate::{Error, Outcome};

/// The async calls. They take `&self` and hold no lock across an await, so
/// one engine (in an `Arc`) serves many tasks at once.
impl<S: AsyncAllowanceStore, C: Clock> Engine<S, C> {
    /// [`Engine::check`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::check`]; a failing store only under
    /// [`FailurePolicy::FailClosed`].
    pub async fn check_async(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide_async(request, Call::Check).await
    }

    /// [`Engine::admit`] on an async store: atomic check-then-record, shared
    /// by every engine on the same store.
    ///
    /// # Errors
    /// As [`Engine::admit`]; a failing store only under
    /// [`FailurePolicy::FailClosed`].
    pub async fn admit_async(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide_async(request, Call::Admit).await
    }

    /// [`Engine::record`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::record`]; a failing store only under
    /// [`FailurePolicy::FailClosed`] (under `FailOpen` the usage is lost).
    pub async fn record_async(&self, request: &Request<'_>) -> Result<Decision, Error> {
        self.decide_async(request, Call::Record).await
    }

    /// [`Engine::reserve`] on an async store. Fails closed whatever the
    /// store's policy.
    ///
    /// # Errors
    /// As [`Engine::reserve`].
    pub async fn reserve_async(
        &self,
        request: &Request<'_>,
        lease_ttl: std::time::Duration,
    ) -> Result<Result<Reservation, Decision>, Error> {
        let o = match self.open(request, lease_ttl)? {
            Ok(o) => o,
            Err(refused) => return Ok(Err(refused)),
        };
        let mut list = OpList::new(&o.p.alloc.scope);
        self.ops_for(&mut list, &o.p, request.model, Shape::Reserve);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let cooldowns = self.cooldowns_for(&o.p, request.model, None, false);
        let applied = self.apply_async(&o.batch(ops, &cooldowns)).await?;
        Ok(self.opened(request, &o, ops, limits, &applied, &cooldowns))
    }

    /// [`Engine::renew`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::renew`].
    pub async fn renew_async(
        &self,
        reservation: &mut Reservation,
        lease_ttl: std::time::Duration,
    ) -> Result<(), Error> {
        let now = self.clock.now();
        let expires_at = after(now, lease_ttl)?;
        let owner = ScopeKey::subject(reservation.subject.as_str());
        let lease = LeaseOp::new(reservation.id, &owner, LeaseAction::Renew { expires_at });
        self.apply_async(&Batch::new(&[], Mode::Force, now).with_lease(lease))
            .await?;
        reservation.expires_at = expires_at;
        Ok(())
    }

    /// [`Engine::grow`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::grow`].
    pub async fn grow_async(
        &self,
        reservation: &mut Reservation,
        more: &Request<'_>,
    ) -> Result<Decision, Error> {
        if more.event.is_some() {
            return Err(Error::request("grow takes no event id"));
        }
        let p = self.prepare_for(reservation, more)?;
        let now = self.clock.now();
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(&mut list, &p, reservation.model.as_deref(), Shape::Usage);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let lease = LeaseOp::new(reservation.id, &p.alloc.scope, LeaseAction::Grow);
        let batch = Batch::new(ops, Mode::Force, now).with_lease(lease);
        let applied = self.apply_async(&batch).await?;
        let decision = self.finish(Call::Grow, more, &p, ops, limits, &applied, &[], now);
        for &(i, n) in &p.amounts {
            match reservation.held.iter_mut().find(|(j, _, _)| *j == i) {
                Some((_, _, h)) => *h = h.saturating_add(n),
                None => reservation.held.push((i, self.catalog.meter_ids[i], n)),
            }
        }
        reservation.decision = decision.clone();
        Ok(decision)
    }

    /// [`Engine::commit`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::commit`].
    pub async fn commit_async(
        &self,
        reservation: &Reservation,
        actual: &Request<'_>,
    ) -> Result<Decision, Error> {
        let p = self.prepare_for(reservation, actual)?;
        self.settle_async(reservation, actual, &p, Fraction::ZERO, Call::Commit, None)
            .await
    }

    /// [`Engine::release`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::release`].
    pub async fn release_async(
        &self,
        reservation: &Reservation,
        outcome: Outcome,
    ) -> Result<Decision, Error> {
        let request = Request::new(&reservation.subject);
        let p = self.prepare_for(reservation, &request)?;
        let keep = &p.alloc.plan.keep;
        let keep = match outcome {
            Outcome::Completed => keep.completed,
            Outcome::Failed => keep.failed,
            Outcome::Cancelled => keep.cancelled,
        };
        let cooldown = (outcome == Outcome::Failed).then_some(());
        self.settle_async(reservation, &request, &p, keep, Call::Release, cooldown)
            .await
    }

    /// [`Engine::usage`] on an async store: the same report, from one
    /// check-mode batch (it records nothing).
    ///
    /// # Errors
    /// As [`Engine::usage`]. A failing store is an error whatever the
    /// store's policy: a report is never made up.
    pub async fn usage_async(&self, subject: &str) -> Result<UsageReport, Error> {
        let alloc = self.allocation_of(subject)?;
        let now = self.clock.now();
        let ops = usage_ops(&alloc);
        let applied = self
            .apply_async(&Batch::new(&ops, Mode::Check, now))
            .await?;
        self.usage_report(subject, &alloc, &applied, now)
    }

    /// [`Engine::overdue`] on an async store.
    ///
    /// # Errors
    /// A failing store.
    pub async fn overdue_async(&self) -> Result<Vec<LeaseInfo>, Error> {
        self.store.overdue(self.clock.now()).await
    }

    async fn settle_async(
        &self,
        reservation: &Reservation,
        request: &Request<'_>,
        p: &super::Prepared,
        keep: Fraction,
        call: Call,
        failed: Option<()>,
    ) -> Result<Decision, Error> {
        let now = self.clock.now();
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(
            &mut list,
            p,
            reservation.model.as_deref(),
            Shape::Settle(&reservation.held),
        );
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let start = failed.map(|()| now);
        let cooldowns = self.cooldowns_for(p, reservation.model.as_deref(), start, false);
        let lease = LeaseOp::new(reservation.id, &p.alloc.scope, LeaseAction::Settle { keep });
        let fp;
        let mut batch = Batch::new(ops, Mode::Force, now)
            .with_lease(lease)
            .with_cooldowns(&cooldowns);
        if let Some(id) = request.event {
            fp = fingerprint(call, Some(reservation.id), ops);
            batch = batch.with_event(EventKey::new(id, fp));
        }
        let applied = self.apply_async(&batch).await?;
        let at = applied.replayed_at.unwrap_or(now);
        Ok(self.finish(call, request, p, ops, limits, &applied, &[], at))
    }

    async fn decide_async(&self, req: &Request<'_>, call: Call) -> Result<Decision, Error> {
        let p = self.prepare(req)?;
        let now = self.clock.now();
        if call != Call::Record {
            if let Some(decision) = self.refuse_model(&p, call, req, now) {
                return Ok(decision);
            }
        }
        let mut list = OpList::new(&p.alloc.scope);
        self.ops_for(&mut list, &p, req.model, Shape::Usage);
        let (ops, limits) = (list.ops.as_slice(), list.limits.as_slice());
        let cooldowns = if call == Call::Record {
            Vec::new()
        } else {
            self.cooldowns_for(&p, req.model, None, true)
        };
        let mode = match call {
            Call::Check => Mode::Check,
            Call::Admit => Mode::WithinLimits,
            _ => Mode::Force,
        };
        let fp;
        let mut batch = Batch::new(ops, mode, now).with_cooldowns(&cooldowns);
        if let (Some(id), Call::Admit | Call::Record) = (req.event, call) {
            fp = fingerprint(call, None, ops);
            batch = batch.with_event(EventKey::new(id, fp));
        }
        let applied = match self.apply_async(&batch).await {
            Ok(applied) => applied,
            Err(Error::Store { .. }) if self.store.failure_policy() == FailurePolicy::FailOpen => {
                let decision = allowed_on_error(&p);
                self.observe(call, req, now, &decision);
                return Ok(decision);
            }
            Err(e) => return Err(e),
        };
        let at = applied.replayed_at.unwrap_or(now);
        let mut decision = self.finish_quiet(call, &p, ops, limits, &applied, &cooldowns, at);
        if let Some(reason) = &p.model_refused {
            super::refuse(&mut decision, reason, p.is_zero());
        }
        self.observe(call, req, at, &decision);
        Ok(decision)
    }

    /// One store call, with the contract's answer shape checked.
    async fn apply_async(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let applied = self.store.apply(batch).await?;
        check_shape(batch, &applied)?;
        Ok(applied)
    }
}

/// The decision made without the store under [`FailurePolicy::FailOpen`].
fn allowed_on_error(p: &super::Prepared) -> Decision {
    Decision {
        status: Status::Ok,
        allowed: true,
        recorded: false,
        reason: None,
        limits: Vec::new(),
        binding: None,
        retry_after: None,
        cost: p.cost.clone(),
        unpriced: p.unpriced_ids(),
        allowed_on_error: true,
    }
}

fn check_shape(batch: &Batch<'_>, applied: &Applied) -> Result<(), Error> {
    if applied.counters.len() != batch.ops.len() || applied.cooldowns.len() != batch.cooldowns.len()
    {
        return Err(super::shape_error(batch, applied));
    }
    Ok(())
}
