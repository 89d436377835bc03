//! Route gates: method and path pattern to meters, and usage known after the response.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use ::http::{response, Method};

/// Usage known only after the inner service answered, returned by a
/// [`record_after`](Route::record_after) hook.
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

/// One entry of a [`Routes`] table: a method, a path pattern, and what a
/// matching request consumes.
///
/// Patterns are matched against the request path, segment by segment:
/// a literal segment matches itself; `{name}` matches any one non-empty
/// segment; a last segment ending in `*` matches when the rest of the path
/// starts with the text before the `*` (`/api/runs*` matches `/api/runs`,
/// `/api/runs/7` and `/api/runs-all`). Nothing else may hold `{`, `}` or `*`.
#[derive(Clone)]
pub struct Route {
    pub(super) method: Method,
    pub(super) pattern: String,
    pub(super) consumes: Vec<(String, u64)>,
    pub(super) requires: Vec<(String, u64)>,
    pub(super) record: Option<RecordHook>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("method", &self.method)
            .field("pattern", &self.pattern)
            .field("consumes", &self.consumes)
            .field("requires", &self.requires)
            .field("record_after", &self.record.is_some())
            .finish()
    }
}

impl Route {
    /// Requests with `method` whose path matches `pattern`. The pattern is
    /// checked by [`QuotaLayer::new`](super::QuotaLayer::new). `HEAD` is a method of its own: a `GET`
    /// route does not gate `HEAD` requests (axum answers them with the `GET`
    /// handler), so list both to meter both.
    pub fn new(method: Method, pattern: impl Into<String>) -> Self {
        Self {
            method,
            pattern: pattern.into(),
            consumes: Vec::new(),
            requires: Vec::new(),
            record: None,
        }
    }

    /// A matching request consumes `n` units of `meter`: admitted atomically
    /// with the route's other `consumes`, refused with nothing recorded.
    #[must_use]
    pub fn consumes(mut self, meter: impl Into<String>, n: u64) -> Self {
        self.consumes.push((meter.into(), n));
        self
    }

    /// A matching request is refused unless `n` units of `meter` would still
    /// fit, but nothing is recorded: a preflight for usage that is recorded
    /// after the work ([`Route::record_after`]), such as input tokens.
    #[must_use]
    pub fn requires(mut self, meter: impl Into<String>, n: u64) -> Self {
        self.requires.push((meter.into(), n));
        self
    }

    /// After the inner service answers, `hook` reads the actual usage from
    /// the response (a header or extension the handler set; it may remove
    /// it) and the usage is recorded with [`Engine::record`](crate::Engine::record): always
    /// counted, even past a maximum. The hook sees every response, errors
    /// included; return an empty [`Usage`] to record nothing.
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
                Segment::Param => !head.is_empty(),
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
        assert!(!m("/api/spaces/{id}/search*", "/api/spaces//search"));
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
