//! Tower middleware: gate routes by quota.
//!
//! [`QuotaLayer`] wraps a service (an axum `Router`, a hyper service) in
//! [`Quota`]. A [`Routes`] table maps a method and a path pattern to the
//! meters a request consumes; the host says how to find the subject with a
//! [`SubjectSource`] (a header, a request extension its auth layer set).
//!
//! # Any store
//!
//! [`QuotaLayer::new`] takes an engine on a sync store (the embedded
//! [`MemoryStore`](crate::MemoryStore)): its calls are quick and run
//! inline, in `call` and in the response future, with nothing boxed.
//! [`QuotaLayer::new_async`] (feature `async`) takes an engine on an
//! [`AsyncAllowanceStore`](crate::store::AsyncAllowanceStore) such as
//! `RedisStore`: each gated request is one boxed future that awaits the
//! engine's `*_async` calls, so no executor thread ever waits on the
//! store. Both build the same `QuotaLayer` type and gate the same way.
//!
//! # A gated request
//!
//! 1. The subject is read. Missing, or not allocated in the engine: the
//!    configured status (401 by default, see
//!    [`QuotaLayer::unknown_subject`]). Malformed: 400 (see
//!    [`SubjectSource::header`]).
//! 2. The route's [`requires`](Route::requires) amounts are checked (a
//!    preflight that records nothing). Then a route that holds anything
//!    ([`consumes`](Route::consumes), [`reserve`](Route::reserve),
//!    [`reserve_with`](Route::reserve_with), [`in_flight`](Route::in_flight))
//!    opens a reservation with [`Engine::reserve`]: every amount held at
//!    once, all or nothing, with a slot on each concurrent limit of the
//!    subject's plan. A route with no meters only checks that the subject
//!    is allocated.
//! 3. A refused write gets the [`HttpMapping`] response (402, 429 or 403,
//!    with a JSON body) and holds nothing; the inner service is not
//!    called. A refused read (GET or HEAD) is still served, holds and
//!    consumes nothing, and carries the warning header.
//! 4. The inner service answers, and the reservation is settled:
//!    - 404 or 405 (the app has no such route or method): released as
//!      [`Cancelled`](crate::Outcome::Cancelled), all of it given back;
//!    - a 5xx, or the inner service's error: released as
//!      [`Failed`](crate::Outcome::Failed), the plan's refund policy
//!      keeps its share (50 % by default) and starts its cooldown;
//!    - anything else: committed ([`Engine::commit`]) with the `consumes`
//!      amounts plus the usage the [`record_after`](Route::record_after)
//!      hook read from the response, or with the held amounts when there is
//!      no hook or it read nothing;
//!    - the response future dropped first (the client went away):
//!      released as `Cancelled`.
//!
//!    On a route that holds nothing, the hook's usage is recorded with
//!    [`Engine::record`] (not for a 404 or 405).
//! 5. The response carries `X-Quota-Warning: approaching` when any of the
//!    decisions reached the warning ratio, and the `RateLimit` /
//!    `RateLimit-Policy` fields of the subject's tightest limit.
//!
//! Requests matching no route pass through untouched.
//!
//! An engine error other than an unknown subject (a failing store) answers
//! 503 with `{"error":"quota_unavailable"}`; the inner service is not
//! called. A failure to settle after the response cannot un-send the work:
//! the response passes and carries a [`RecordError`] extension, for an
//! outer layer to log; the hold returns at the lease's expiry
//! ([`QuotaLayer::lease_ttl`]). A commit that finds the lease expired
//! records the usage instead.
//!
//! # No way around the gate
//!
//! The gate matches a superset of what the router serves, and gives back
//! what the router turns away. The rules, each tested over real HTTP in
//! `tests/gate_bypass.rs`:
//!
//! - **Paths as sent.** Patterns match the request path still
//!   percent-encoded, byte for byte, as axum's router does: `%73earch` is
//!   not `search` to either.
//! - **Empty segments.** `{id}` matches an empty segment
//!   (`/api/spaces//search`), as axum's router does.
//! - **`*` families and trailing slashes.** `search*` matches `search`,
//!   `search/`, `searchX` and `search/more`; what the app then answers
//!   with 404 or 405 is given back (rule below), so a family gates every
//!   path the app might serve without charging for the ones it does not.
//!   A pattern without `*` matches its path only: `/health` is not
//!   `/health/` (nor to axum).
//! - **HEAD follows GET.** A `HEAD` request is gated by the first `HEAD`
//!   route matching it, or else by the first `GET` route (axum answers
//!   `HEAD` with the `GET` handler).
//! - **404 and 405 give back.** A request the app answers 404 or 405 is
//!   released as cancelled: nothing it held stays used.
//! - **Subject headers** must be one header, non-empty, all visible ASCII
//!   (`!` to `~`): a space, tab, control or non-ASCII byte is 400.
//! - **Holds, not preflights.** A reservation counts for every concurrent
//!   request the moment it is taken, so concurrent requests cannot
//!   overshoot a maximum the way a [`requires`](Route::requires) preflight
//!   followed by a recorded usage can.
//!
//! ```
//! use std::sync::Arc;
//! use http::Method;
//! use tollgate::tower::{QuotaLayer, Route, Routes, SubjectSource};
//! use tollgate::{Catalog, Engine};
//!
//! let catalog: Catalog = serde_json::from_str(r#"{
//!   "meters": [{"id": "vector_search_count", "unit": "count"}],
//!   "plans": [{"id": "plan_free", "limits": [
//!     {"meter": "vector_search_count", "window": {"calendar": {"period": "month"}}, "max": 100}
//!   ]}]
//! }"#)?;
//! let engine = Arc::new(Engine::new(catalog));
//! let routes = Routes::new().route(
//!     Route::new(Method::POST, "/api/spaces/{id}/search*").consumes("vector_search_count", 1),
//! );
//! let layer = QuotaLayer::new(engine, SubjectSource::header("x-api-key"), routes)?;
//! // router.layer(layer) in axum; ServiceBuilder::new().layer(layer) in tower.
//! # let _ = layer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod engine;
mod flow;
mod routes;
mod subject;

#[cfg(feature = "async")]
mod async_flow;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::header::{HeaderValue, CONTENT_TYPE};
use ::http::{Method, Request as HttpRequest, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::http::HttpMapping;
use crate::{AllowanceStore, Catalog, Clock, Engine, Error, Unit};

use flow::{Gate, SyncPost};
use routes::Pattern;
pub use routes::{Route, Routes, Usage};
pub use subject::{SubjectError, SubjectSource};

#[derive(Debug, Clone)]
struct Gated {
    route: Route,
    pattern: Pattern,
}

/// How long a gate's reservation lives unless settled: 5 minutes.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct Shared {
    engine: Gate,
    routes: Arc<[Gated]>,
    subject: SubjectSource,
    mapping: HttpMapping,
    unknown_subject: StatusCode,
    lease_ttl: Duration,
    #[cfg(feature = "async")]
    spawn: Option<async_flow::Spawn>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLayer")
            .field(
                "routes",
                &self.routes.iter().map(|g| &g.route).collect::<Vec<_>>(),
            )
            .field("mapping", &self.mapping)
            .field("unknown_subject", &self.unknown_subject)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// Applies [`Quota`] to a service: route gates on a tollgate [`Engine`].
///
/// Cheap to clone. See the [module docs](self) for what it does to a request.
#[derive(Clone)]
pub struct QuotaLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for QuotaLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl QuotaLayer {
    /// A layer gating `routes` on `engine`, on a sync store (the embedded
    /// [`MemoryStore`](crate::MemoryStore)): the engine is called inline, in
    /// `call` and in the response future, and nothing is boxed. Use [`QuotaLayer::new_async`] for an async store. Each
    /// request's subject is found with `subject`; unknown subjects get 401
    /// (see [`QuotaLayer::unknown_subject`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad path pattern (the field is
    /// `routes[i].pattern`) or a money meter in `consumes`, `requires` or
    /// `reserve` (they take whole units); [`Error::UnknownMeter`] for a meter
    /// the catalog does not have.
    pub fn new<S, C>(
        engine: Arc<Engine<S, C>>,
        subject: SubjectSource,
        routes: Routes,
    ) -> Result<Self, Error>
    where
        S: AllowanceStore + 'static,
        C: Clock + 'static,
    {
        let gated = gate_routes(engine.catalog(), routes)?;
        Ok(Self::build(Gate::Sync(engine), gated, subject))
    }

    /// A layer gating `routes` on `engine`, on an async store (such as
    /// `RedisStore`, feature `redis`): each gated request runs as one boxed
    /// future that awaits the engine's `*_async` calls, so no executor
    /// thread waits on the store. Otherwise as [`QuotaLayer::new`].
    ///
    /// A reservation whose response future is dropped (the client went
    /// away) is released on a task started by the
    /// [spawner](QuotaLayer::spawn_with); with the `redis` feature the
    /// default spawns on the current tokio runtime.
    ///
    /// # Errors
    /// As [`QuotaLayer::new`].
    #[cfg(feature = "async")]
    pub fn new_async<S, C>(
        engine: Arc<Engine<S, C>>,
        subject: SubjectSource,
        routes: Routes,
    ) -> Result<Self, Error>
    where
        S: crate::store::AsyncAllowanceStore + 'static,
        C: Clock + Send + Sync + 'static,
    {
        let gated = gate_routes(engine.catalog(), routes)?;
        Ok(Self::build(Gate::Async(engine), gated, subject))
    }

    fn build(engine: Gate, gated: Vec<Gated>, subject: SubjectSource) -> Self {
        Self {
            shared: Arc::new(Shared {
                engine,
                routes: gated.into(),
                subject,
                mapping: HttpMapping::new(),
                unknown_subject: StatusCode::UNAUTHORIZED,
                lease_ttl: DEFAULT_LEASE_TTL,
                #[cfg(feature = "async")]
                spawn: default_spawn(),
            }),
        }
    }

    /// The status for a request whose subject is missing or not allocated
    /// in the engine: 401 Unauthorized (the default) or 403 Forbidden, as the
    /// host's auth model says.
    #[must_use]
    pub fn unknown_subject(mut self, status: StatusCode) -> Self {
        Arc::make_mut(&mut self.shared).unknown_subject = status;
        self
    }

    /// Use `mapping` to turn decisions into statuses and headers.
    #[must_use]
    pub fn mapping(mut self, mapping: HttpMapping) -> Self {
        Arc::make_mut(&mut self.shared).mapping = mapping;
        self
    }

    /// How long a reservation lives unless settled ([`DEFAULT_LEASE_TTL`]
    /// by default): if the process dies mid-request, its holds return then.
    /// A handler that runs longer still has its usage recorded.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `lease_ttl`) for a zero duration or
    /// one over a day; the layer is unchanged.
    pub fn lease_ttl(mut self, ttl: Duration) -> Result<Self, Error> {
        if ttl.is_zero() || ttl > Duration::from_secs(86_400) {
            return Err(Error::InvalidConfig {
                field: "lease_ttl".into(),
                reason: format!("{ttl:?} is not within (0, 1 day]"),
            });
        }
        Arc::make_mut(&mut self.shared).lease_ttl = ttl;
        Ok(self)
    }

    /// How an async layer ([`QuotaLayer::new_async`]) starts the task that
    /// releases a reservation whose response future was dropped: `spawn`
    /// gets the future to run (`|f| { tokio::spawn(f); }`). Without the
    /// `redis` feature there is no default, and such a hold returns only at
    /// its lease's expiry until a spawner is set. A sync layer releases in
    /// place and ignores this.
    #[cfg(feature = "async")]
    #[must_use]
    pub fn spawn_with<F>(mut self, spawn: F) -> Self
    where
        F: Fn(Pin<Box<dyn Future<Output = ()> + Send>>) + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.shared).spawn = Some(Arc::new(spawn));
        self
    }
}

/// With tokio present (feature `redis`), spawn on the current runtime.
#[cfg(feature = "async")]
fn default_spawn() -> Option<async_flow::Spawn> {
    #[cfg(feature = "redis")]
    {
        Some(Arc::new(|future| {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(future);
            }
        }))
    }
    #[cfg(not(feature = "redis"))]
    {
        None
    }
}

/// Parse and check a route table against `catalog`.
fn gate_routes(catalog: &Catalog, routes: Routes) -> Result<Vec<Gated>, Error> {
    routes
        .routes
        .into_iter()
        .enumerate()
        .map(|(i, route)| {
            let pattern =
                Pattern::parse(&route.pattern).map_err(|reason| Error::InvalidConfig {
                    field: format!("routes[{i}].pattern"),
                    reason,
                })?;
            for (list, amounts) in [
                ("consumes", &route.consumes),
                ("requires", &route.requires),
                ("reserve", &route.reserve),
            ] {
                for (j, (meter, _)) in amounts.iter().enumerate() {
                    let m = catalog.meter(meter).ok_or_else(|| Error::UnknownMeter {
                        meter: meter.clone(),
                    })?;
                    if matches!(m.unit, Unit::Money { .. }) {
                        return Err(Error::InvalidConfig {
                            field: format!("routes[{i}].{list}[{j}]"),
                            reason: format!("`{meter}` is a money meter; routes take units"),
                        });
                    }
                }
            }
            Ok(Gated { route, pattern })
        })
        .collect()
}

impl<S> Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Quota {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The middleware [`QuotaLayer`] builds: gates an inner service's routes by
/// quota.
#[derive(Clone)]
pub struct Quota<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Quota<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("inner", &self.inner)
            .field("layer", &self.shared)
            .finish()
    }
}

impl<S> Quota<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the middleware.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Attached to a response's extensions when the usage a
/// [`record_after`](Route::record_after) hook returned could not be
/// recorded (an unknown meter, a failing store). The response itself passes:
/// the work was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    error: Error,
}

impl RecordError {
    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recording usage after the response failed: {}",
            self.error
        )
    }
}

impl std::error::Error for RecordError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn json_response<B: From<String>>(status: StatusCode, error: &str) -> Response<B> {
    let mut response = Response::new(B::from(format!(r#"{{"error":"{error}"}}"#)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The first route gating `method` on `path`; a `HEAD` request falls back
/// to the `GET` routes.
fn find_route(routes: &[Gated], method: &Method, path: &str) -> Option<usize> {
    let find = |m: &Method| {
        routes
            .iter()
            .position(|g| g.route.method == *m && g.pattern.matches(path))
    };
    find(method).or_else(|| {
        (method == Method::HEAD)
            .then(|| find(&Method::GET))
            .flatten()
    })
}

pin_project! {
    /// The response future of [`Quota`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

#[cfg(feature = "async")]
type Boxed<B, E> = engine::BoxFuture<'static, Result<Response<B>, E>>;
#[cfg(not(feature = "async"))]
type Boxed<B, E> = std::marker::PhantomData<fn() -> (B, E)>;

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Gated { #[pin] future: F, post: Option<SyncPost> },
        Ready { response: Option<Response<B>> },
        Async { future: Boxed<B, E> },
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Gated { .. } => "gated",
            Kind::Ready { .. } => "ready",
            Kind::Async { .. } => "async",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future.poll(cx),
            KindProj::Gated { future, post } => {
                let result = match future.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                Poll::Ready(match (result, post.take()) {
                    (Ok(response), Some(post)) => Ok(post.finish(response)),
                    (Err(e), Some(post)) => {
                        post.fail();
                        Err(e)
                    }
                    (result, None) => result,
                })
            }
            KindProj::Ready { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => panic!("ResponseFuture polled after completion"),
            },
            #[cfg(feature = "async")]
            KindProj::Async { future } => future.as_mut().poll(cx),
            #[cfg(not(feature = "async"))]
            KindProj::Async { .. } => unreachable!("no async gate without the `async` feature"),
        }
    }
}

impl<S, ReqBody, ResBody> Service<HttpRequest<ReqBody>> for Quota<S>
where
    S: Service<HttpRequest<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest<ReqBody>) -> Self::Future {
        let ready = |response: Response<String>| ResponseFuture {
            kind: Kind::Ready {
                response: Some(response.map(ResBody::from)),
            },
        };
        let shared = &self.shared;
        let Some(route) = find_route(&shared.routes, req.method(), req.uri().path()) else {
            return ResponseFuture {
                kind: Kind::Passthrough {
                    future: self.inner.call(req),
                },
            };
        };
        let (parts, body) = req.into_parts();
        let subject = match shared.subject.find(&parts) {
            Ok(s) => s,
            Err(SubjectError::Missing) => {
                return ready(json_response(shared.unknown_subject, "unknown_subject"))
            }
            Err(SubjectError::Malformed) => {
                return ready(json_response(StatusCode::BAD_REQUEST, "malformed_subject"))
            }
        };
        let engine = match &shared.engine {
            Gate::Sync(engine) => engine.clone(),
            #[cfg(feature = "async")]
            Gate::Async(engine) => {
                // The inner service that was polled ready goes into the
                // future; a clone stays for the next call.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let future = async_flow::gated(
                    shared.clone(),
                    engine.clone(),
                    route,
                    subject,
                    parts,
                    body,
                    inner,
                );
                return ResponseFuture {
                    kind: Kind::Async { future },
                };
            }
        };
        let mut post = SyncPost {
            shared: shared.clone(),
            engine,
            route,
            subject,
            estimate: Usage::new(),
            decisions: Vec::new(),
            hold: None,
        };
        if let Err(response) = sync_pre(&mut post, &parts) {
            return ready(response);
        }
        ResponseFuture {
            kind: Kind::Gated {
                future: self.inner.call(HttpRequest::from_parts(parts, body)),
                post: Some(post),
            },
        }
    }
}

/// The sync path's asks before the handler, into `post`; `Err` is the
/// response that ends the request (returned unboxed: it is sent at once).
#[allow(clippy::result_large_err)]
fn sync_pre(post: &mut SyncPost, parts: &::http::request::Parts) -> Result<(), Response<String>> {
    let shared = post.shared.clone();
    let gated = &shared.routes[post.route].route;
    let read = is_read(&parts.method);
    post.estimate = flow::estimate(gated, parts);
    for ask in flow::asks(gated) {
        let answer = if ask == flow::Ask::Reserve {
            let request = flow::reserve_request(&post.subject, gated, &post.estimate);
            match post.engine.reserve(&request, shared.lease_ttl) {
                Ok(Ok(reservation)) => {
                    post.hold = Some(reservation);
                    continue;
                }
                Ok(Err(decision)) => Ok(decision),
                Err(e) => Err(e),
            }
        } else {
            post.engine
                .check(&flow::check_request(&post.subject, gated, ask))
        };
        let decision = answer.map_err(|e| flow::engine_error_response(&shared, &e))?;
        if let Some(response) = flow::refusal(&shared, &decision, read) {
            return Err(response);
        }
        let refused = !decision.allowed;
        post.decisions.push(decision);
        if refused {
            break;
        }
    }
    Ok(())
}
