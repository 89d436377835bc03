//! The engine's async calls, for an [`AsyncAllowanceStore`] (feature
//! `async`).
//!
//! Each call expands the same stages as its sync twin (see `calls`), with
//! the store call awaited. Only the fail-open policy is new, one stage
//! ([`Engine::fail_open`]): see [`FailurePolicy`].

use chrono::{DateTime, Utc};

use super::check_shape;
use super::observe::Call;
use super::prepare::Prepared;
use super::{Engine, Outcome, Reservation, UsageReport};
use crate::clock::Clock;
use crate::decision::{Decision, Status};
use crate::request::Request;
use crate::store::{Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo};
use crate::Error;

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
        self.refresh_async(request.subject).await?;
        reserve_call!(self, request, lease_ttl, apply: |b| self.apply_async(b).await)
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
        renew_call!(self, reservation, lease_ttl, apply: |b| self.apply_async(b).await)
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
        self.refresh_async(reservation.subject()).await?;
        grow_call!(self, reservation, more, apply: |b| self.apply_async(b).await)
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
        self.refresh_async(reservation.subject()).await?;
        let settling = self.settling_commit(reservation, actual)?;
        settle_call!(self, settling, apply: |b| self.apply_async(b).await)
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
        self.refresh_async(reservation.subject()).await?;
        let request = Request::new(&reservation.subject);
        let settling = self.settling_release(reservation, &request, outcome)?;
        settle_call!(self, settling, apply: |b| self.apply_async(b).await)
    }

    /// [`Engine::usage`] on an async store: the same report, from one
    /// check-mode batch (it records nothing).
    ///
    /// # Errors
    /// As [`Engine::usage`]. A failing store is an error whatever the
    /// store's policy: a report is never made up.
    pub async fn usage_async(&self, subject: &str) -> Result<UsageReport, Error> {
        self.refresh_async(subject).await?;
        usage_call!(self, subject, apply: |b| self.apply_async(b).await)
    }

    /// [`Engine::overdue`] on an async store.
    ///
    /// # Errors
    /// A failing store.
    pub async fn overdue_async(&self) -> Result<Vec<LeaseInfo>, Error> {
        self.store.overdue(self.clock.now()).await
    }

    /// `check_async`, `admit_async` and `record_async`: a store error may
    /// fail open ([`Engine::fail_open`]).
    async fn decide_async(&self, req: &Request<'_>, call: Call) -> Result<Decision, Error> {
        self.refresh_async(req.subject).await?;
        decide_call!(
            self, req, call,
            apply: |b| self.apply_async(b).await,
            on_store_error: |e, p, now| self.fail_open(e, call, req, p, now),
        )
    }

    /// The fail-open stage of `check_async`, `admit_async` and
    /// `record_async`: under [`FailurePolicy::FailOpen`] a store that fails
    /// ([`Error::Store`]) allows the request, unrecorded and observed, with
    /// `allowed_on_error` set; any other error, or any error under
    /// `FailClosed`, is returned.
    ///
    /// # Errors
    /// `error`, unless the policy fails open on it.
    fn fail_open(
        &self,
        error: Error,
        call: Call,
        req: &Request<'_>,
        p: &Prepared,
        now: DateTime<Utc>,
    ) -> Result<Decision, Error> {
        if !matches!(error, Error::Store { .. })
            || self.store.failure_policy() != FailurePolicy::FailOpen
        {
            return Err(error);
        }
        let decision = Decision {
            plan: p.alloc.plan.name,
            status: Status::Ok,
            allowed: true,
            recorded: false,
            reason: None,
            limits: Default::default(),
            binding: None,
            retry_after: None,
            cost: p.cost.clone(),
            unpriced: p.unpriced_ids(),
            allowed_on_error: true,
        };
        self.observe(call, req, now, &decision);
        Ok(decision)
    }

    /// One store call, with the contract's answer shape checked.
    async fn apply_async(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let result = self.store.apply(batch).await;
        if let Ok(applied) = &result {
            check_shape(batch, applied)?;
        }
        result
    }
}
