//! A [`Decision`] as an HTTP response: status, headers and a small JSON body.
//!
//! Framework-neutral: everything here speaks the [`http`] crate's types, so
//! any server (axum, hyper, actix through a shim) can use it. The
//! `tower` module (feature `tower`) builds its middleware on it.
//!
//! # The mapping
//!
//! | decision | status | headers |
//! | --- | --- | --- |
//! | allowed, `Ok` | (the handler's) | `RateLimit-Policy`, `RateLimit` |
//! | allowed, `Warning` | (the handler's) | the above and `X-Quota-Warning: approaching` |
//! | refused, binding limit is a quota or a cost cap | `402 Payment Required` | `Retry-After` when waiting helps, `RateLimit-Policy`, `RateLimit` |
//! | refused, binding limit is a rate (a window of at most [`HttpMapping::rate_window`], one hour by default) | `429 Too Many Requests` | as for 402 |
//! | refused, model outside the allowlist | `403 Forbidden` | none |
//! | refused, the prepaid balance cannot pay ([`Refusal::InsufficientBalance`]) | `402 Payment Required` | none |
//!
//! A limit on a money meter (a cost cap) is always a quota, whatever its
//! window: waiting a minute does not pay for anything.
//!
//! # `RateLimit` and `RateLimit-Policy`
//!
//! The fields follow draft-ietf-httpapi-ratelimit-headers (revision 11):
//! `RateLimit-Policy: "vector_search_count/month";q=100;w=2678400` and
//! `RateLimit: "vector_search_count/month";r=20;t=86400`. They describe one
//! limit: on a refusal the binding limit, otherwise the subject's limit with
//! the least headroom. The policy name is `meter/window` (`month`, `day`,
//! `week`, a rolling span such as `7d`, or `lifetime`; a calendar window in a
//! fixed offset carries it, `day+09:00`). `q` and `r` are in the meter's
//! smallest unit (tokens, seconds; micro-dollars for a money meter of scale
//! 6). `w` is the window's length in seconds (the current month's length for
//! a monthly window) and is left out for a lifetime limit; `t` is the number
//! of seconds until usage next leaves the window (the period end for a
//! calendar window) and is left out when nothing will leave. Unlimited
//! limits are never described; values above the structured-field integer
//! range (10^15 − 1) are capped to it.
//!
//! # What a client is shown
//!
//! Only its own numbers. A pool's counters (an account pool, a model's
//! global budget) are the sum of many subjects' usage, so a pool limit shows
//! its meter, its window, that it is shared, and when it frees up (`reset`,
//! `Retry-After`) — never its `used`, `max` or `remaining`, and never in the
//! `RateLimit` fields. Pools still count toward `X-Quota-Warning`, which
//! says only "approaching".
//!
//! The refusal body is JSON:
//!
//! ```json
//! {"error":"quota_exceeded","max":100,"meter":"vector_search_count","requested":1,
//!  "reset":"2026-04-01T00:00:00Z","retry_after":1036800,"scope":"subject","used":100,"window":"month"}
//! ```
//!
//! `error` is `quota_exceeded` (402), `rate_limited` (429),
//! `model_not_allowed` (403; the body is then only `error` and `model`) or
//! `insufficient_balance` (402; the body is then `error`, `needed`,
//! `available` — exact decimal strings in the major unit, `available`
//! negative in debt, and left out when the balance is a pool's — and
//! `currency`).
//! `scope` is `subject` or `shared`; for `shared`, `used` and `max` are
//! `null`. `used`, `max` and `requested` are JSON integers for count and
//! seconds meters; for money meters they are exact decimal strings in the
//! major unit at the meter's scale (`"1.500000"` for $1.50 at scale 6), and
//! the body carries `currency`. `reset` (RFC 3339, UTC) is
//! when usage next leaves the window, `null` if never; `retry_after` is in
//! whole seconds, `null` when waiting does not help (a maximum of 0, or a
//! request larger than the maximum).
//!
//! ```
//! use tollgate::http::{HttpMapping, X_QUOTA_WARNING};
//! use tollgate::{Allocation, Catalog, Clock, Engine, Request};
//!
//! let catalog: Catalog = serde_json::from_str(r#"{
//!   "meters": [{"id": "vector_search_count", "unit": "count"}],
//!   "plans": [{"id": "plan_free", "limits": [
//!     {"meter": "vector_search_count", "window": {"calendar": {"period": "month"}}, "max": 10}
//!   ]}]
//! }"#)?;
//! let engine = Engine::new(catalog);
//! engine.allocate(Allocation::new("user-1", "plan_free"))?;
//! let mapping = HttpMapping::new();
//!
//! let d = engine.admit(&Request::new("user-1").units("vector_search_count", 8))?;
//! let mut headers = http::HeaderMap::new();
//! mapping.write_headers(&d, engine.clock().now(), &mut headers);
//! assert_eq!(headers[X_QUOTA_WARNING], "approaching");
//!
//! let d = engine.admit(&Request::new("user-1").units("vector_search_count", 3))?;
//! let refusal = mapping.refusal(engine.catalog(), &d, engine.clock().now()).unwrap();
//! assert_eq!(refusal.status(), http::StatusCode::PAYMENT_REQUIRED);
//! assert!(refusal.body().contains(r#""used":8"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use ::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use ::http::{Response, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::store::ScopeKind;
use crate::window::Period;
use crate::Unit;
use crate::{Amount, Catalog, Decision, LimitState, Refusal, Status, Window};

/// `X-Quota-Warning`: set to [`WARNING_APPROACHING`] on a passing response
/// whose usage reached a limit's warning ratio (seed 003).
pub const X_QUOTA_WARNING: &str = "x-quota-warning";
/// The value of [`X_QUOTA_WARNING`].
pub const WARNING_APPROACHING: &str = "approaching";
/// The `RateLimit` field: the current service limit of one policy.
pub const RATELIMIT: &str = "ratelimit";
/// The `RateLimit-Policy` field: the quota policy a request consumes.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";

/// The largest integer a structured field can carry (RFC 9651).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Turns decisions into HTTP statuses, headers and refusal bodies.
///
/// Cheap to clone. See the [module docs](self) for the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMapping {
    rate_window_secs: u64,
    warning_header: bool,
    ratelimit_headers: bool,
}

impl Default for HttpMapping {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpMapping {
    /// The default mapping: windows of at most one hour are rate limits
    /// (429); the warning and `RateLimit` headers are on.
    pub fn new() -> Self {
        Self {
            rate_window_secs: 3_600,
            warning_header: true,
            ratelimit_headers: true,
        }
    }

    /// Limits whose window is at most `max` long are rate limits, refused
    /// with 429; longer windows (and every money limit) are quotas, refused
    /// with 402. A calendar day is 24 h, a week 7 days, a month 28 days for
    /// this comparison; a lifetime window is never a rate.
    #[must_use]
    pub fn rate_window(mut self, max: Duration) -> Self {
        self.rate_window_secs = max.as_secs();
        self
    }

    /// Whether passing responses carry `X-Quota-Warning: approaching` at the
    /// warning ratio (default: yes).
    #[must_use]
    pub fn warning_header(mut self, on: bool) -> Self {
        self.warning_header = on;
        self
    }

    /// Whether responses carry the `RateLimit` and `RateLimit-Policy` fields
    /// (default: yes).
    #[must_use]
    pub fn ratelimit_headers(mut self, on: bool) -> Self {
        self.ratelimit_headers = on;
        self
    }

    /// The status a refused decision maps to: 402, 429 or 403. `None` when
    /// the decision allows the work (the handler picks the status).
    pub fn status(&self, catalog: &Catalog, decision: &Decision) -> Option<StatusCode> {
        if decision.allowed {
            return None;
        }
        Some(match &decision.reason {
            Some(Refusal::ModelNotAllowed { .. }) => StatusCode::FORBIDDEN,
            Some(Refusal::InsufficientBalance { .. }) => StatusCode::PAYMENT_REQUIRED,
            _ => match decision.binding_limit() {
                Some(l) if self.is_rate(catalog, l) => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::PAYMENT_REQUIRED,
            },
        })
    }

    /// Add the quota headers for `decision` to `headers`, replacing any
    /// earlier values of the same fields.
    ///
    /// For an allowed decision: `X-Quota-Warning` at `Warning` or worse, and
    /// the `RateLimit` fields of the subject's limit with the least headroom.
    /// For a refused one: `Retry-After` when waiting helps, and the
    /// `RateLimit` fields of the binding limit when it is the subject's own.
    /// `now` is the time `t` counts from: the engine's clock.
    pub fn write_headers(&self, decision: &Decision, now: DateTime<Utc>, headers: &mut HeaderMap) {
        if decision.allowed {
            self.write_passing_headers(&[decision], now, headers);
        } else {
            self.write_refusal_headers(decision, now, headers);
        }
    }

    /// Headers for a response that passes after one or more decisions (a
    /// preflight check, an admit, a record of actual usage): the warning if
    /// any decision reached `Warning`, and the `RateLimit` fields of the
    /// subject limit with the least headroom across all of them.
    pub(crate) fn write_passing_headers(
        &self,
        decisions: &[&Decision],
        now: DateTime<Utc>,
        headers: &mut HeaderMap,
    ) {
        let worst = decisions.iter().map(|d| d.status).max();
        if self.warning_header && worst.is_some_and(|s| s >= Status::Warning) {
            headers.insert(
                X_QUOTA_WARNING,
                HeaderValue::from_static(WARNING_APPROACHING),
            );
        }
        if self.ratelimit_headers {
            let tightest = least_headroom(
                decisions
                    .iter()
                    .flat_map(|d| d.limits.iter())
                    .filter(|l| l.scope.kind() == ScopeKind::Subject),
            );
            if let Some(l) = tightest {
                write_ratelimit(l, now, headers);
            }
        }
    }

    fn write_refusal_headers(
        &self,
        decision: &Decision,
        now: DateTime<Utc>,
        headers: &mut HeaderMap,
    ) {
        if let Some(wait) = decision.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
        }
        if self.ratelimit_headers {
            if let Some(l) = decision
                .binding_limit()
                .filter(|l| l.scope.kind() == ScopeKind::Subject)
            {
                write_ratelimit(l, now, headers);
            }
        }
    }

    /// The JSON body of a refusal (see the [module docs](self) for its
    /// fields); `None` when the decision allows the work.
    pub fn refusal_body(&self, catalog: &Catalog, decision: &Decision) -> Option<String> {
        if decision.allowed {
            return None;
        }
        let mut body = Map::new();
        if let Some(Refusal::ModelNotAllowed { model }) = &decision.reason {
            body.insert("error".into(), "model_not_allowed".into());
            body.insert("model".into(), model.as_str().into());
            return Some(Value::Object(body).to_string());
        }
        if let Some(Refusal::InsufficientBalance { needed, available }) = &decision.reason {
            body.insert("error".into(), "insufficient_balance".into());
            body.insert("needed".into(), needed.amount.to_string().into());
            // A pool's balance is an account's money: not shown to a member.
            let pooled = decision
                .balance
                .as_ref()
                .is_some_and(|b| b.scope.kind() == crate::store::ScopeKind::Pool);
            if !pooled {
                body.insert("available".into(), available.amount.to_string().into());
            }
            body.insert("currency".into(), needed.currency.as_str().into());
            return Some(Value::Object(body).to_string());
        }
        let rate = decision
            .binding_limit()
            .is_some_and(|l| self.is_rate(catalog, l));
        body.insert(
            "error".into(),
            if rate {
                "rate_limited"
            } else {
                "quota_exceeded"
            }
            .into(),
        );
        if let Some(l) = decision.binding_limit() {
            let shared = l.scope.kind() != ScopeKind::Subject;
            let meter = catalog.meter(&l.meter);
            // The public form: units as integers, money as the exact
            // decimal string of its major unit.
            let amount = |a: Amount| -> Value {
                match a {
                    Amount::Units(n) => n.into(),
                    Amount::Money(d) => d.to_string().into(),
                }
            };
            body.insert("meter".into(), (*l.meter).into());
            body.insert("window".into(), l.window.to_string().into());
            body.insert(
                "scope".into(),
                if shared { "shared" } else { "subject" }.into(),
            );
            let (used, max) = if shared {
                (Value::Null, Value::Null)
            } else {
                (
                    amount(l.used_amount()),
                    l.max_amount().map_or(Value::Null, amount),
                )
            };
            body.insert("used".into(), used);
            body.insert("max".into(), max);
            body.insert("requested".into(), amount(l.requested_amount()));
            if let Some(currency) = meter.and_then(crate::Meter::currency) {
                body.insert("currency".into(), currency.into());
            }
            let reset = l
                .resets_at()
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            body.insert("reset".into(), json!(reset));
        }
        body.insert(
            "retry_after".into(),
            json!(decision.retry_after.map(ceil_secs)),
        );
        Some(Value::Object(body).to_string())
    }

    /// The whole refusal response — status, headers and JSON body — or
    /// `None` when the decision allows the work. Map the body into your
    /// framework's type with [`Response::map`] (axum:
    /// `response.map(axum::body::Body::from)`).
    pub fn refusal(
        &self,
        catalog: &Catalog,
        decision: &Decision,
        now: DateTime<Utc>,
    ) -> Option<Response<String>> {
        let status = self.status(catalog, decision)?;
        let body = self.refusal_body(catalog, decision)?;
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.write_refusal_headers(decision, now, headers);
        Some(response)
    }

    /// Whether `limit` is a rate limit (429) rather than a quota (402).
    fn is_rate(&self, catalog: &Catalog, limit: &LimitState) -> bool {
        let money = catalog
            .meter(&limit.meter)
            .is_some_and(|m| matches!(m.unit, Unit::Money { .. }));
        let nominal = match limit.window {
            Window::Rolling { span_secs, .. } => Some(span_secs),
            Window::Calendar { period, .. } => Some(match period {
                Period::Day => 86_400,
                Period::Week => 7 * 86_400,
                Period::Month => 28 * 86_400,
            }),
            Window::Lifetime => None,
            // Too many at once: waiting for one to end helps, like a rate.
            Window::Concurrent => Some(0),
        };
        !money && nominal.is_some_and(|s| s <= self.rate_window_secs)
    }
}

/// The limit with the least headroom (remaining / max, smallest first; the
/// first on ties), among limited ones.
fn least_headroom<'a>(limits: impl Iterator<Item = &'a LimitState>) -> Option<&'a LimitState> {
    let mut best: Option<(&LimitState, u128, u128)> = None;
    for l in limits {
        let (Some(max), Some(rem)) = (l.max, l.remaining) else {
            continue;
        };
        let (r, m) = (u128::from(rem), u128::from(max.max(1)));
        if best.is_none_or(|(_, br, bm)| r * bm < br * m) {
            best = Some((l, r, m));
        }
    }
    best.map(|(l, _, _)| l)
}

fn write_ratelimit(l: &LimitState, now: DateTime<Utc>, headers: &mut HeaderMap) {
    let (Some(max), Some(remaining)) = (l.max, l.remaining) else {
        return;
    };
    // Written by hand into two buffers, not with `format!`: this runs on
    // every passing response of the tower gate.
    let mut policy = String::with_capacity(64);
    push_policy_name(&mut policy, l);
    let mut current = String::with_capacity(policy.len() + 24);
    current.push_str(&policy);
    policy.push_str(";q=");
    push_u64(&mut policy, max.min(SF_INTEGER_MAX));
    if let Some(w) = window_secs(l) {
        policy.push_str(";w=");
        push_u64(&mut policy, w.min(SF_INTEGER_MAX));
    }
    current.push_str(";r=");
    push_u64(&mut current, remaining.min(SF_INTEGER_MAX));
    if let Some(reset) = l.resets_at().filter(|t| *t > now) {
        let t = (reset - now).to_std().map_or(0, ceil_secs);
        current.push_str(";t=");
        push_u64(&mut current, t.min(SF_INTEGER_MAX));
    }
    // Both strings are printable ASCII by construction (see `push_policy_name`).
    if let (Ok(p), Ok(c)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&current),
    ) {
        headers.insert(RATELIMIT_POLICY, p);
        headers.insert(RATELIMIT, c);
    }
}

/// `n` in decimal, appended to `out`.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // `n % 10` is below 10: the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits are UTF-8.
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

/// Writes into a structured-field string: quotes and backslashes escaped,
/// anything outside printable ASCII replaced by `_` (a structured-field
/// string cannot carry it).
struct SfString<'a>(&'a mut String);

impl std::fmt::Write for SfString<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '"' | '\\' => {
                    self.0.push('\\');
                    self.0.push(c);
                }
                ' '..='~' => self.0.push(c),
                _ => self.0.push('_'),
            }
        }
        Ok(())
    }
}

/// The policy identifier as a structured-field string, `"meter/window"`,
/// appended to `out`.
fn push_policy_name(out: &mut String, l: &LimitState) {
    use std::fmt::Write;
    out.push('"');
    let mut sf = SfString(out);
    // Writing to a `String` cannot fail.
    let _ = sf.write_str(&l.meter);
    let _ = sf.write_str("/");
    let _ = match l.window {
        // `day`, `week`, `month`, with an offset such as `day+09:00`.
        Window::Calendar { .. } | Window::Lifetime | Window::Concurrent => {
            write!(sf, "{}", l.window)
        }
        Window::Rolling { span_secs, .. } => write_span_label(&mut sf, span_secs),
    };
    out.push('"');
}

fn write_span_label(out: &mut impl std::fmt::Write, secs: u64) -> std::fmt::Result {
    for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs % size == 0 {
            return write!(out, "{}{unit}", secs / size);
        }
    }
    write!(out, "{secs}s")
}

/// The window's length in seconds: the span of a rolling window, the current
/// period of a calendar window, none for a lifetime window.
fn window_secs(l: &LimitState) -> Option<u64> {
    match l.window {
        Window::Rolling { span_secs, .. } => Some(span_secs),
        Window::Calendar { .. } => {
            let (start, end) = (l.period_start()?, l.resets_at()?);
            u64::try_from((end - start).num_seconds()).ok()
        }
        Window::Lifetime | Window::Concurrent => None,
    }
}

/// Whole seconds, rounded up: a client that waits this long is not early.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(0)), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1_000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1_001)), 2);
    }

    fn span_label(secs: u64) -> String {
        let mut out = String::new();
        write_span_label(&mut out, secs).unwrap();
        out
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 1_000_000, SF_INTEGER_MAX, u64::MAX] {
            let mut out = String::from("x=");
            push_u64(&mut out, n);
            assert_eq!(out, format!("x={n}"));
        }
    }

    #[test]
    fn span_labels() {
        assert_eq!(span_label(604_800), "1w");
        assert_eq!(span_label(86_400), "1d");
        assert_eq!(span_label(3_600), "1h");
        assert_eq!(span_label(90), "90s");
        assert_eq!(span_label(120), "2m");
    }
}
