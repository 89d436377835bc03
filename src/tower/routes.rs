//! Route gates: method and path pattern to meters, and usage known after the response.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use ::http::{request, response, Method};

/// Amounts of meters: the usage a [`record_after`](Route::record_after) hook
/// reads from a response, or the estimate a
/// [`reserve_with`](Route::reserve_with) hook computes from a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub(super) amounts: Vec<(Cow<'static, str>, u64)>,
    pub(super) model: Option<String>,
}

impl Usage {
    /// No usage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `n` units of `meter`.
    #[must_use]
    pub fn units(mut self, meter: impl Into<Cow<'static, str>>, n: u64) -> Self {
        self.amounts.push((meter.into(), n));
        self
    }

    /// Name the model the work ran on (its global pools are drawn on).
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.amounts.is_empty()
    }
}

type RecordHook = Arc<dyn Fn(&mut response::Parts) -> Usage + Send + Sync>;
type EstimateHook = Arc<dyn Fn(&request::Parts) -> Usage + Send + Sync>;

/// One entry of a [`Routes`] table: a method, a path pattern, and what a
/// matching request consumes.
///
/// Patterns are matched against the request path as it arrived (still
/// percent-encoded, as axum's router matches it), segment by segment:
/// a literal segment matches exactly the same bytes; `{name}` matches any
/// one segment, the empty one included (axum routes `/a//b` to `/a/{id}/b`);
/// a last segment ending in `*` matches when the rest of the path starts
/// with the text before the `*` (`/api/runs*` matches `/api/runs`,
/// `/api/runs/`, `/api/runs/7` and `/api/runs-all`). Nothing else may hold
/// `{`, `}` or `*`. See the [module docs](super#no-way-around-the-gate) for
/// how the gate stays in step with the router.
#[derive(Clone)]
pub struct Route {
    pub(super) method: Method,
    pub(super) pattern: String,
    pub(super) consumes: Vec<(String, u64)>,
    pub(super) requires: Vec<(String, u64)>,
    pub(super) reserve: Vec<(String, u64)>,
    pub(super) estimate: Option<EstimateHook>,
    pub(super) in_flight: bool,
    pub(super) record: Option<RecordHook>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("method", &self.method)
            .field("pattern", &self.pattern)
            .field("consumes", &self.consumes)
            .field("requires", &self.requires)
            .field("reserve", &self.reserve)
            .field("reserve_with", &self.estimate.is_some())
            .field("in_flight", &self.in_flight)
            .field("record_after", &self.record.is_some())
            .finish()
    }
}

impl Route {
    /// Whether a matching request opens a reservation.
    pub(super) fn reserving(&self) -> bool {
        !self.consumes.is_empty()
            || !self.reserve.is_empty()
            || self.estimate.is_some()
            || self.in_flight
    }

    /// Requests with `method` whose path matches `pattern`. The pattern is
    /// checked by [`QuotaLayer::new`](super::QuotaLayer::new). A `GET` route
    /// also gates `HEAD` requests (axum answers them with the `GET` handler)
    /// that no `HEAD` route matches.
    pub fn new(method: Method, pattern: impl Into<String>) -> Self {
        Self {
            method,
            pattern: pattern.into(),
            consumes: Vec::new(),
            requires: Vec::new(),
            reserve: Vec::new(),
            estimate: None,
            in_flight: false,
            record: None,
        }
    }

    /// A matching request consumes `n` units of `meter`: held atomically
    /// with the route's other amounts before the handler runs (refused with
    /// nothing recorded), and counted once the handler answers. Given back
    /// in full when the app answers 404 or 405; on a 5xx or a handler error
    /// the plan's refund policy for a failure applies; given back in full
    /// when the client goes away first.
    #[must_use]
    pub fn consumes(mut self, meter: impl Into<String>, n: u64) -> Self {
        self.consumes.push((meter.into(), n));
        self
    }

    /// A matching request is refused unless `n` units of `meter` would still
    /// fit, but nothing is recorded or held: a preflight. Concurrent
    /// requests all pass it at once, so usage recorded afterwards
    /// ([`Route::record_after`]) can overshoot the maximum; prefer
    /// [`Route::reserve`] or [`Route::reserve_with`], which hold an estimate.
    #[must_use]
    pub fn requires(mut self, meter: impl Into<String>, n: u64) -> Self {
        self.requires.push((meter.into(), n));
        self
    }

    /// Hold an estimate of `n` units of `meter` before the handler runs
    /// (a reservation: the hold counts for every other request at once, so
    /// concurrent requests cannot overshoot), then settle it with the actual
    /// usage the [`record_after`](Route::record_after) hook reads from the
    /// response. Without a hook, or when the hook returns an empty
    /// [`Usage`], the estimate is what is counted.
    #[must_use]
    pub fn reserve(mut self, meter: impl Into<String>, n: u64) -> Self {
        self.reserve.push((meter.into(), n));
        self
    }

    /// Like [`Route::reserve`], with the estimate computed from the request
    /// head: a `max_tokens` header or query parameter, the `Content-Length`.
    /// A field of the body is not in the head: have an earlier layer parse
    /// it into a request extension and read that here. The estimate's model,
    /// if it names one, is the reservation's model (its pools are drawn on).
    #[must_use]
    pub fn reserve_with<F>(mut self, estimate: F) -> Self
    where
        F: Fn(&request::Parts) -> Usage + Send + Sync + 'static,
    {
        self.estimate = Some(Arc::new(estimate));
        self
    }

    /// A matching request holds a slot on each concurrent limit of its
    /// subject's plan while the handler runs (the per-subject limit on
    /// requests in flight), even if it holds no amounts; past the limit it
    /// is refused with 429. Every reserving route (`consumes`, `reserve`)
    /// takes the slot too.
    #[must_use]
    pub fn in_flight(mut self) -> Self {
        self.in_flight = true;
        self
    }

    /// After the inner service answers, `hook` reads the actual usage from
    /// the response (a header or extension the handler set; it may remove
    /// it). On a reserving route the usage settles the reservation
    /// ([`Engine::commit`](crate::Engine::commit), the `consumes` amounts
    /// added); otherwise it is recorded with
    /// [`Engine::record`](crate::Engine::record): always counted, even past
    /// a maximum. The hook sees every response, errors included (so it can
    /// strip private headers), but the usage of a 404 or 405 is not
    /// counted, nor on a reserving route that of a 5xx; return an empty
    /// [`Usage`] to record nothing.
    #[must_use]
    pub fn record_after<F>(mut self, hook: F) -> Self
    where
        F: Fn(&mut response::Parts) -> Usage + Send + Sync + 'static,
    {
        self.record = Some(Arc::new(hook));
        self
    }
}

/// A route table: the first route matching a request's method and path
/// gates it; requests matching none pass through.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub(super) routes: Vec<Route>,
}

impl Routes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a route; earlier routes win.
    #[must_use]
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }
}

/// A parsed path pattern.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    /// Every segment but a trailing wildcard one.
    segments: Vec<Segment>,
    /// The text before a trailing `*`, if the pattern ends in one.
    prefix: Option<String>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param,
}

impl Pattern {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| format!("`{text}` does not start with `/`"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        let mut prefix = None;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || name.contains(['{', '}', '*', '/']) {
                    return Err(format!("`{text}`: bad parameter `{part}`"));
                }
                segments.push(Segment::Param);
            } else if let Some(head) = part.strip_suffix('*').filter(|_| last) {
                if head.contains(['{', '}', '*']) {
                    return Err(format!("`{text}`: bad wildcard segment `{part}`"));
                }
                prefix = Some(head.to_owned());
            } else if part.contains(['{', '}', '*']) {
                return Err(format!(
                    "`{text}`: `{part}` mixes text with `{{`, `}}` or `*` (a `*` may only end the pattern)"
                ));
            } else {
                segments.push(Segment::Literal((*part).to_owned()));
            }
        }
        Ok(Self { segments, prefix })
    }

    pub(super) fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        for (i, seg) in self.segments.iter().enumerate() {
            let last = i + 1 == self.segments.len() && self.prefix.is_none();
            let (head, tail) = match rest.split_once('/') {
                Some((h, t)) if !last => (h, Some(t)),
                Some(_) => return false,
                None => (rest, None),
            };
            let ok = match seg {
                Segment::Literal(l) => head == l,
                Segment::Param => true,
            };
            if !ok {
                return false;
            }
            match tail {
                Some(t) => rest = t,
                None if last => return true,
                // The path ended before the pattern did.
                None => return false,
            }
        }
        match &self.prefix {
            Some(p) => rest.starts_with(p.as_str()),
            // Only an empty pattern `/` reaches here: the path must be `/`.
            None => rest.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn patterns_match_segments_params_and_prefixes() {
        assert!(m("/api/spaces/{id}/search*", "/api/spaces/s1/search"));
        assert!(m("/api/spaces/{id}/search*", "/api/spaces/s1/search/q"));
        assert!(m("/api/spaces/{id}/search*", "/api/spaces/s1/searches"));
        assert!(m("/api/spaces/{id}/search*", "/api/spaces//search"));
        assert!(m("/api/spaces/{id}/search*", "/api/spaces/s1/search/"));
        assert!(!m("/api/spaces/{id}/search*", "/api/spaces/s1/%73earch"));
        assert!(!m("/api/spaces/{id}/search*", "/api/spaces/s1/index"));
        assert!(!m("/api/spaces/{id}/search*", "/api/spaces/s1"));
        assert!(m("/api/runs*", "/api/runs"));
        assert!(m("/api/runs*", "/api/runs/7/events"));
        assert!(!m("/api/runs*", "/api/run"));
        assert!(m("/api/*", "/api/x/y"));
        assert!(m("/api/*", "/api/"));
        assert!(!m("/api/*", "/api"));
        assert!(m("/health", "/health"));
        assert!(!m("/health", "/health/"));
        assert!(!m("/health", "/healthz"));
        assert!(!m("/a/{id}", "/a/1/2"));
        assert!(m("/a/{id}", "/a/1"));
        assert!(m("/", "/"));
        assert!(!m("/", "/x"));
        assert!(m("/*", "/anything/at/all"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "api", "/a/{}", "/a/{id", "/a*/b", "/a/x{id}", "/a/**", "/a/{id}*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
