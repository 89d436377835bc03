//! Tower middleware: gate routes by quota.
//!
//! [`QuotaLayer`] wraps a service (an axum `Router`, a hyper service) in
//! [`Quota`]. A [`Routes`] table maps a method and a path pattern to the
//! meters a request consumes; the host says how to find the subject with a
//! [`SubjectSource`] (a header, a request extension its auth layer set).
//!
//! For a request matching a route:
//!
//! 1. The subject is read. Missing, or not allocated in the engine: the
//!    configured status (401 by default, see
//!    [`QuotaLayer::unknown_subject`]). Malformed (a header that is not
//!    visible ASCII, empty, or sent twice): 400.
//! 2. The route's [`requires`](Route::requires) amounts are checked (a
//!    preflight that records nothing: "has at least one input token left"),
//!    then its [`consumes`](Route::consumes) amounts are admitted with
//!    [`Engine::admit`]: atomically, all or nothing.
//! 3. A refused write gets the [`HttpMapping`] response (402, 429 or 403,
//!    with a JSON body) and consumes nothing; the inner service is not
//!    called. A refused read (GET or HEAD) is still served, consumes
//!    nothing, and carries the warning header.
//! 4. The inner service answers. If the route has a
//!    [`record_after`](Route::record_after) hook, it reads the actual usage
//!    from the response (tokens known only once the work is done) and it is
//!    recorded with [`Engine::record`].
//! 5. The response carries `X-Quota-Warning: approaching` when any of those
//!    decisions reached the warning ratio, and the `RateLimit` /
//!    `RateLimit-Policy` fields of the subject's tightest limit.
//!
//! Requests matching no route pass through untouched.
//!
//! An engine error other than an unknown subject (a failing store) answers
//! 503 with `{"error":"quota_unavailable"}`; the inner service is not
//! called. A failure to record after the response cannot un-send the work:
//! the response passes and carries a [`RecordError`] extension, for an
//! outer layer to log.
//!
//! Engine calls are synchronous and quick on the memory store; they run
//! inside `call` and the response future.
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

mod routes;
mod subject;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::{HeaderValue, CONTENT_TYPE};
use ::http::{Method, Request as HttpRequest, Response, StatusCode};
use chrono::{DateTime, Utc};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::http::HttpMapping;
use crate::{AllowanceStore, Catalog, Clock, Decision, Engine, Error, Request, Unit};

use routes::Pattern;
pub use routes::{Route, Routes, Usage};
pub use subject::{SubjectError, SubjectSource};

#[derive(Debug, Clone)]
struct Gated {
    route: Route,
    pattern: Pattern,
}

/// The engine with its store and clock types erased, so the layer is one
/// type whatever the engine's.
trait Gate: Send + Sync {
    fn check(&self, request: &Request<'_>) -> Result<Decision, Error>;
    fn admit(&self, request: &Request<'_>) -> Result<Decision, Error>;
    fn record(&self, request: &Request<'_>) -> Result<Decision, Error>;
    fn catalog(&self) -> &Catalog;
    fn now(&self) -> DateTime<Utc>;
}

impl<S: AllowanceStore, C: Clock> Gate for Engine<S, C> {
    fn check(&self, request: &Request<'_>) -> Result<Decision, Error> {
        Engine::check(self, request)
    }
    fn admit(&self, request: &Request<'_>) -> Result<Decision, Error> {
        Engine::admit(self, request)
    }
    fn record(&self, request: &Request<'_>) -> Result<Decision, Error> {
        Engine::record(self, request)
    }
    fn catalog(&self) -> &Catalog {
        Engine::catalog(self)
    }
    fn now(&self) -> DateTime<Utc> {
        Engine::clock(self).now()
    }
}

#[derive(Clone)]
struct Shared {
    engine: Arc<dyn Gate>,
    routes: Arc<[Gated]>,
    subject: SubjectSource,
    mapping: HttpMapping,
    unknown_subject: StatusCode,
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
    /// A layer gating `routes` on `engine`, finding each request's subject
    /// with `subject`. Unknown subjects get 401; see
    /// [`QuotaLayer::unknown_subject`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad path pattern (the field is
    /// `routes[i].pattern`) or a money meter in `consumes`/`requires` (they
    /// take whole units); [`Error::UnknownMeter`] for a meter the catalog
    /// does not have.
    pub fn new<S, C>(
        engine: Arc<Engine<S, C>>,
        subject: SubjectSource,
        routes: Routes,
    ) -> Result<Self, Error>
    where
        S: AllowanceStore + 'static,
        C: Clock + 'static,
    {
        let catalog = engine.catalog();
        let gated = routes
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, route)| {
                let pattern =
                    Pattern::parse(&route.pattern).map_err(|reason| Error::InvalidConfig {
                        field: format!("routes[{i}].pattern"),
                        reason,
                    })?;
                for (list, amounts) in
                    [("consumes", &route.consumes), ("requires", &route.requires)]
                {
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
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                engine,
                routes: gated.into(),
                subject,
                mapping: HttpMapping::new(),
                unknown_subject: StatusCode::UNAUTHORIZED,
            }),
        })
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

fn engine_error_response<B: From<String>>(shared: &Shared, error: &Error) -> Response<B> {
    match error {
        Error::UnknownSubject { .. } => json_response(shared.unknown_subject, "unknown_subject"),
        _ => json_response(StatusCode::SERVICE_UNAVAILABLE, "quota_unavailable"),
    }
}

/// What happens after the inner service answers.
struct Post {
    shared: Arc<Shared>,
    route: usize,
    subject: String,
    decisions: Vec<Decision>,
}

impl Post {
    fn finish<B>(self, response: Response<B>) -> Response<B> {
        let Post {
            shared,
            route,
            subject,
            mut decisions,
        } = self;
        let (mut parts, body) = response.into_parts();
        if let Some(hook) = &shared.routes[route].route.record {
            let usage = hook(&mut parts);
            if !usage.is_empty() {
                let mut request = Request::new(&subject);
                for (meter, n) in &usage.amounts {
                    request = request.units(meter, *n);
                }
                if let Some(model) = &usage.model {
                    request = request.model(model);
                }
                match shared.engine.record(&request) {
                    Ok(d) => decisions.push(d),
                    Err(error) => {
                        parts.extensions.insert(RecordError { error });
                    }
                }
            }
        }
        let refs: Vec<&Decision> = decisions.iter().collect();
        shared
            .mapping
            .write_passing_headers(&refs, shared.engine.now(), &mut parts.headers);
        Response::from_parts(parts, body)
    }
}

impl fmt::Debug for Post {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Post")
            .field("route", &self.route)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of [`Quota`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Passthrough { #[pin] future: F },
        Gated { #[pin] future: F, post: Option<Post> },
        Ready { response: Option<Response<B>> },
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Gated { .. } => "gated",
            Kind::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future.poll(cx),
            KindProj::Gated { future, post } => {
                let response = match future.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(r)) => r,
                };
                Poll::Ready(Ok(match post.take() {
                    Some(post) => post.finish(response),
                    None => response,
                }))
            }
            KindProj::Ready { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Service<HttpRequest<ReqBody>> for Quota<S>
where
    S: Service<HttpRequest<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<String>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest<ReqBody>) -> Self::Future {
        let ready = |response| ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        };
        let shared = &self.shared;
        let Some(route) = shared
            .routes
            .iter()
            .position(|g| g.route.method == req.method() && g.pattern.matches(req.uri().path()))
        else {
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
        let read = is_read(&parts.method);
        let gated = &shared.routes[route].route;
        let engine = &shared.engine;
        let decide = |amounts: &[(String, u64)], admit: bool| {
            let mut request = Request::new(&subject);
            for (meter, n) in amounts {
                request = request.units(meter, *n);
            }
            if admit {
                engine.admit(&request)
            } else {
                engine.check(&request)
            }
        };
        // The preflight first (it records nothing), then the atomic admit.
        // A route with neither still checks that the subject is allocated.
        let mut decisions = Vec::with_capacity(2);
        let preflight = !gated.requires.is_empty() || gated.consumes.is_empty();
        for (amounts, admit) in [(&gated.requires, false), (&gated.consumes, true)] {
            if (admit && amounts.is_empty()) || (!admit && !preflight) {
                continue;
            }
            let decision = match decide(amounts, admit) {
                Ok(d) => d,
                Err(e) => return ready(engine_error_response(shared, &e)),
            };
            let refused = !decision.allowed;
            if refused && !read {
                let refusal = shared
                    .mapping
                    .refusal(engine.catalog(), &decision, engine.now());
                if let Some(r) = refusal {
                    return ready(r.map(ResBody::from));
                }
            }
            decisions.push(decision);
            // A refused read is still served, but consumes nothing: after a
            // refused preflight it is not admitted either.
            if refused {
                break;
            }
        }
        let post = Post {
            shared: shared.clone(),
            route,
            subject,
            decisions,
        };
        ResponseFuture {
            kind: Kind::Gated {
                future: self.inner.call(HttpRequest::from_parts(parts, body)),
                post: Some(post),
            },
        }
    }
}
