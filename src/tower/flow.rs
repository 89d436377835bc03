//! The gate's steps, shared by the sync and async paths: the requests it
//! sends the engine, how it judges their answers, and how it settles after
//! the response.

use std::sync::Arc;

use ::http::{request, response, Response, StatusCode};
use chrono::{DateTime, Utc};

use super::engine::SyncGate;
use super::routes::{Route, Usage};
use super::{json_response, RecordError, Shared};
use crate::{Catalog, Decision, Error, Outcome, Request, Reservation};

/// The engine the layer runs on.
#[derive(Clone)]
pub(super) enum Gate {
    Sync(Arc<dyn SyncGate>),
    #[cfg(feature = "async")]
    Async(Arc<dyn super::engine::AsyncGate>),
}

impl Gate {
    pub(super) fn catalog(&self) -> &Catalog {
        match self {
            Gate::Sync(g) => g.catalog(),
            #[cfg(feature = "async")]
            Gate::Async(g) => g.catalog(),
        }
    }

    pub(super) fn now(&self) -> DateTime<Utc> {
        match self {
            Gate::Sync(g) => g.now(),
            #[cfg(feature = "async")]
            Gate::Async(g) => g.now(),
        }
    }
}

/// What the gate asks before the handler runs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// A preflight of the route's `requires` (records nothing).
    Preflight,
    /// The route's reservation.
    Reserve,
    /// A route with no meters: is the subject allocated?
    Known,
}

/// The asks of `route`, in order.
pub(super) fn asks(route: &Route) -> impl Iterator<Item = Ask> {
    let preflight = (!route.requires.is_empty()).then_some(Ask::Preflight);
    let main = if route.reserving() {
        Some(Ask::Reserve)
    } else if route.requires.is_empty() {
        Some(Ask::Known)
    } else {
        None
    };
    preflight.into_iter().chain(main)
}

/// The request for a preflight or a subject check.
pub(super) fn check_request<'a>(subject: &'a str, route: &'a Route, ask: Ask) -> Request<'a> {
    let mut request = Request::new(subject);
    if ask == Ask::Preflight {
        for (meter, n) in &route.requires {
            request = request.units(meter, *n);
        }
    }
    request
}

/// The estimate a route's `reserve_with` hook computes, or none.
pub(super) fn estimate(route: &Route, parts: &request::Parts) -> Usage {
    match &route.estimate {
        Some(hook) => hook(parts),
        None => Usage::new(),
    }
}

/// The reservation's request: `consumes`, `reserve` and the estimate.
pub(super) fn reserve_request<'a>(
    subject: &'a str,
    route: &'a Route,
    estimate: &'a Usage,
) -> Request<'a> {
    let mut request = held_amounts(Request::new(subject), route, estimate);
    if let Some(model) = &estimate.model {
        request = request.model(model);
    }
    request
}

fn held_amounts<'a>(
    mut request: Request<'a>,
    route: &'a Route,
    estimate: &'a Usage,
) -> Request<'a> {
    for (meter, n) in route.consumes.iter().chain(&route.reserve) {
        request = request.units(meter, *n);
    }
    for (meter, n) in &estimate.amounts {
        request = request.units(meter, *n);
    }
    request
}

/// What a refused pre-handler decision does: `Some(response)` ends the
/// request there; `None` lets it through (a refused read is served, with
/// nothing consumed).
pub(super) fn refusal(
    shared: &Shared,
    decision: &Decision,
    read: bool,
) -> Option<Response<String>> {
    if decision.allowed || read {
        return None;
    }
    shared
        .mapping
        .refusal(shared.engine.catalog(), decision, shared.engine.now())
}

/// The answer to an engine error before the handler.
pub(super) fn engine_error_response(shared: &Shared, error: &Error) -> Response<String> {
    match error {
        Error::UnknownSubject { .. } => json_response(shared.unknown_subject, "unknown_subject"),
        _ => json_response(StatusCode::SERVICE_UNAVAILABLE, "quota_unavailable"),
    }
}

/// How a request is settled once the app answered.
#[derive(Debug)]
pub(super) enum Settle {
    /// Commit the reservation with the held amounts (`None`) or with
    /// `consumes` plus the hook's usage.
    Commit(Option<Usage>),
    /// Release the reservation.
    Release(Outcome),
    /// Record the hook's usage (a route that holds nothing).
    Record(Usage),
    /// Nothing to do.
    Nothing,
}

/// Whether the app said the route does not exist: 404 or 405.
pub(super) fn not_routed(status: StatusCode) -> bool {
    status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED
}

/// How to settle a response with `parts` on `route`; `held` says whether a
/// reservation is open. The route's hook always runs (it may strip headers).
pub(super) fn settle(route: &Route, held: bool, parts: &mut response::Parts) -> Settle {
    let usage = route.record.as_ref().map(|hook| hook(parts));
    let status = parts.status;
    match (held, usage) {
        _ if not_routed(status) && held => Settle::Release(Outcome::Cancelled),
        _ if not_routed(status) => Settle::Nothing,
        (true, _) if status.is_server_error() => Settle::Release(Outcome::Failed),
        (true, Some(u)) if !u.is_empty() => Settle::Commit(Some(u)),
        (true, _) => Settle::Commit(None),
        (false, Some(u)) if !u.is_empty() => Settle::Record(u),
        (false, _) => Settle::Nothing,
    }
}

/// The commit request: `consumes` plus the hook's usage, or every held
/// amount; the reservation's model.
pub(super) fn commit_request<'a>(
    reservation: &'a Reservation,
    route: &'a Route,
    estimate: &'a Usage,
    actual: Option<&'a Usage>,
) -> Request<'a> {
    let mut request = match actual {
        None => held_amounts(Request::new(reservation.subject()), route, estimate),
        Some(usage) => {
            let mut request = Request::new(reservation.subject());
            for (meter, n) in &route.consumes {
                request = request.units(meter, *n);
            }
            for (meter, n) in &usage.amounts {
                request = request.units(meter, *n);
            }
            request
        }
    };
    if let Some(model) = reservation.model() {
        request = request.model(model);
    }
    request
}

/// The record request for a hook's usage.
pub(super) fn record_request<'a>(subject: &'a str, usage: &'a Usage) -> Request<'a> {
    let mut request = Request::new(subject);
    for (meter, n) in &usage.amounts {
        request = request.units(meter, *n);
    }
    if let Some(model) = &usage.model {
        request = request.model(model);
    }
    request
}

/// A settle's answer into the response: a decision for its headers, or an
/// error for its extensions.
pub(super) fn settled(
    result: Result<Decision, Error>,
    decisions: &mut Vec<Decision>,
    parts: &mut response::Parts,
) {
    match result {
        Ok(d) => decisions.push(d),
        Err(error) => {
            parts.extensions.insert(RecordError { error });
        }
    }
}

/// The passing headers of every decision, written into `parts`.
pub(super) fn write_headers(shared: &Shared, decisions: &[Decision], parts: &mut response::Parts) {
    let now = shared.engine.now();
    let headers = &mut parts.headers;
    // One or two decisions on every path but a preflight's: no list to
    // allocate.
    match decisions {
        [] => shared.mapping.write_passing_headers(&[], now, headers),
        [a] => shared.mapping.write_passing_headers(&[a], now, headers),
        [a, b] => shared.mapping.write_passing_headers(&[a, b], now, headers),
        more => {
            let refs: Vec<&Decision> = more.iter().collect();
            shared.mapping.write_passing_headers(&refs, now, headers);
        }
    }
}

/// What the sync path does after the inner service answers. Dropped with
/// its reservation still open (the client went away, the response future
/// was dropped), it releases it as `Cancelled`.
pub(super) struct SyncPost {
    pub(super) shared: Arc<Shared>,
    pub(super) engine: Arc<dyn SyncGate>,
    pub(super) route: usize,
    pub(super) subject: String,
    pub(super) estimate: Usage,
    pub(super) decisions: Vec<Decision>,
    pub(super) hold: Option<Reservation>,
}

impl SyncPost {
    /// Settle on the inner service's response.
    pub(super) fn finish<B>(mut self, response: Response<B>) -> Response<B> {
        let (mut parts, body) = response.into_parts();
        let shared = self.shared.clone();
        let route = &shared.routes[self.route].route;
        let mut decisions = std::mem::take(&mut self.decisions);
        match settle(route, self.hold.is_some(), &mut parts) {
            Settle::Commit(actual) => {
                if let Some(reservation) = self.hold.take() {
                    let request =
                        commit_request(&reservation, route, &self.estimate, actual.as_ref());
                    let result = self.engine.commit(&reservation, &request);
                    let result = match result {
                        // The lease ran out during the work: the usage happened.
                        Err(Error::ReservationExpired { .. }) => self.engine.record(&request),
                        other => other,
                    };
                    settled(result, &mut decisions, &mut parts);
                }
            }
            Settle::Release(outcome) => {
                if let Some(reservation) = self.hold.take() {
                    settled(
                        self.engine.release(&reservation, outcome),
                        &mut decisions,
                        &mut parts,
                    );
                }
            }
            Settle::Record(usage) => {
                let request = record_request(&self.subject, &usage);
                settled(self.engine.record(&request), &mut decisions, &mut parts);
            }
            Settle::Nothing => {}
        }
        write_headers(&shared, &decisions, &mut parts);
        Response::from_parts(parts, body)
    }

    /// The inner service failed: release the hold as `Failed`.
    pub(super) fn fail(mut self) {
        if let Some(reservation) = self.hold.take() {
            let _ = self.engine.release(&reservation, Outcome::Failed);
        }
    }
}

impl Drop for SyncPost {
    fn drop(&mut self) {
        if let Some(reservation) = self.hold.take() {
            // Nobody is left to tell of an error: the lease's expiry is the
            // fallback.
            let _ = self.engine.release(&reservation, Outcome::Cancelled);
        }
    }
}
