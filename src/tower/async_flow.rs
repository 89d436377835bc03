//! The gate on an async store: every engine call awaited inside the
//! response future, none blocking an executor thread.

use std::sync::Arc;

use ::http::{request, Request as HttpRequest, Response};
use tower_service::Service;

use super::engine::{AsyncGate, BoxFuture};
use super::flow::{
    asks, check_request, commit_request, engine_error_response, estimate, record_request, refusal,
    reserve_request, settle, settled, write_headers, Ask, Settle,
};
use super::{is_read, Shared};
use crate::{Error, Outcome, Reservation};

/// How the layer runs a release after its response future was dropped.
pub(super) type Spawn = Arc<dyn Fn(BoxFuture<'static, ()>) + Send + Sync>;

/// An open reservation; dropped still open (the client went away), it is
/// released as `Cancelled` on a spawned task.
struct Hold {
    engine: Arc<dyn AsyncGate>,
    reservation: Option<Reservation>,
    spawn: Option<Spawn>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let (Some(reservation), Some(spawn)) = (self.reservation.take(), &self.spawn) else {
            return;
        };
        let engine = self.engine.clone();
        spawn(Box::pin(async move {
            // Nobody is left to tell of an error: the lease's expiry is the
            // fallback.
            let _ = engine.release(&reservation, Outcome::Cancelled).await;
        }));
    }
}

/// The whole gated request on an async store, as one future.
pub(super) fn gated<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    engine: Arc<dyn AsyncGate>,
    route: usize,
    subject: String,
    parts: request::Parts,
    body: ReqBody,
    mut inner: S,
) -> BoxFuture<'static, Result<Response<ResBody>, S::Error>>
where
    S: Service<HttpRequest<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    Box::pin(async move {
        let gated = &shared.routes[route].route;
        let read = is_read(&parts.method);
        let estimate = estimate(gated, &parts);
        let mut decisions = Vec::new();
        let mut hold = Hold {
            engine: engine.clone(),
            reservation: None,
            spawn: shared.spawn.clone(),
        };
        for ask in asks(gated) {
            let answer = if ask == Ask::Reserve {
                let request = reserve_request(&subject, gated, &estimate);
                match engine.reserve(&request, shared.lease_ttl).await {
                    Ok(Ok(reservation)) => {
                        hold.reservation = Some(reservation);
                        continue;
                    }
                    Ok(Err(decision)) => Ok(decision),
                    Err(e) => Err(e),
                }
            } else {
                engine.check(&check_request(&subject, gated, ask)).await
            };
            let decision = match answer {
                Ok(d) => d,
                Err(e) => return Ok(engine_error_response(&shared, &e).map(ResBody::from)),
            };
            if let Some(response) = refusal(&shared, &decision, read) {
                return Ok(response.map(ResBody::from));
            }
            let refused = !decision.allowed;
            decisions.push(decision);
            if refused {
                break;
            }
        }
        let response = match inner.call(HttpRequest::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(reservation) = hold.reservation.take() {
                    let _ = engine.release(&reservation, Outcome::Failed).await;
                }
                return Err(e);
            }
        };
        let (mut parts, body) = response.into_parts();
        match settle(gated, hold.reservation.is_some(), &mut parts) {
            Settle::Commit(actual) => {
                if let Some(reservation) = &hold.reservation {
                    let request = commit_request(reservation, gated, &estimate, actual.as_ref());
                    let result = match engine.commit(reservation, &request).await {
                        // The lease ran out during the work: the usage happened.
                        Err(Error::ReservationExpired { .. }) => engine.record(&request).await,
                        other => other,
                    };
                    hold.reservation = None;
                    settled(result, &mut decisions, &mut parts);
                }
            }
            Settle::Release(outcome) => {
                if let Some(reservation) = &hold.reservation {
                    let result = engine.release(reservation, outcome).await;
                    hold.reservation = None;
                    settled(result, &mut decisions, &mut parts);
                }
            }
            Settle::Record(usage) => {
                let request = record_request(&subject, &usage);
                settled(engine.record(&request).await, &mut decisions, &mut parts);
            }
            Settle::Nothing => {}
        }
        write_headers(&shared, &decisions, &mut parts);
        Ok(Response::from_parts(parts, body))
    })
}
