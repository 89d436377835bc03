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
        let made = self.made_event_id(actual, true);
        let with_id;
        let actual = match &made {
            Some(id) => {
                with_id = actual.clone().made_event(id);
                &with_id
            }
            None => actual,
        };
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
        let made = self.made_event_id(req, matches!(call, Call::Admit | Call::Record));
        let with_id;
        let req = match &made {
            Some(id) => {
                with_id = req.clone().made_event(id);
                &with_id
            }
            None => req,
        };
        decide_call!(
            self, req, call,
            apply: |b| self.apply_async(b).await,
            on_store_error: |e, p, now| self.fail_open(e, call, req, p, now),
        )
    }

    /// The event id the engine makes for a mutating call without one, on
    /// a store whose outcomes can be unknown
    /// ([`AsyncAllowanceStore::needs_event_ids`]): a retry of an ambiguous
    /// call with it counts once. Random (a [`LeaseId`](crate::store::LeaseId)'s
    /// 128 bits).
    fn made_event_id(&self, req: &Request<'_>, mutating: bool) -> Option<String> {
        (mutating && req.event.is_none() && self.store.needs_event_ids())
            .then(|| crate::store::LeaseId::random().prefixed("tollgate:"))
    }

    /// The fail-open stage of `check_async`, `admit_async` and
    /// `record_async`: under [`FailurePolicy::FailOpen`] a store that fails
    /// ([`Error::Store`]) or leaves the outcome unknown
    /// ([`Error::StoreOutcomeUnknown`]) allows the request, observed, with
    /// `allowed_on_error` set and `recorded: false`; for an unknown outcome
    /// of `admit_async` or `record_async` `record_unknown` names the event
    /// id to retry with. Any other error, any error under `FailClosed`, and
    /// any error of a priced request on a plan with a prepaid balance is
    /// returned.
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
        // A plan spending a prepaid balance never fails open: that would
        // hand out the money the balance exists to guard.
        let guarded =
            p.alloc.plan.balance.is_some() && p.cost.as_ref().is_some_and(|c| !c.amount.is_zero());
        let record_unknown = match error {
            _ if self.store.failure_policy() != FailurePolicy::FailOpen || guarded => {
                return Err(error)
            }
            Error::Store { .. } => None,
            Error::StoreOutcomeUnknown { event, .. } if call != Call::Check => Some(
                event
                    .or_else(|| req.event.map(str::to_owned))
                    .unwrap_or_default(),
            ),
            Error::StoreOutcomeUnknown { .. } => None,
            _ => return Err(error),
        };
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
            record_unknown,
            balance: None,
        };
        self.observe(call, req, now, &decision);
        Ok(decision)
    }

    /// One store call, with the contract's answer shape checked; an
    /// unknown outcome names the batch's event id.
    pub(super) async fn apply_async(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        match self.store.apply(batch).await {
            Ok(applied) => {
                check_shape(batch, &applied)?;
                Ok(applied)
            }
            Err(Error::StoreOutcomeUnknown {
                message,
                event: None,
            }) => Err(Error::StoreOutcomeUnknown {
                message,
                event: batch.event.map(|e| e.id.to_owned()),
            }),
            Err(e @ Error::Overflow { .. }) => Err(super::charged_overflow(Err(e))),
            Err(e) => Err(e),
        }
    }
}
