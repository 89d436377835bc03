//! Spans (feature `tracing`) and metrics (feature `metrics`) for engine
//! calls. Without either feature every hook here is an empty inline
//! function and [`Watch`] is a zero-sized value: the calls compile as
//! before.
//!
//! A [`Watch`] follows one engine call: the `calls` macros open it, mark
//! the store call's start and end around `apply`, and close it with the
//! decision or the error.
//!
//! Span (`tracing`, level DEBUG, target `tollgate`): `tollgate.call` with
//! fields `call`, `subject` (a 64-bit FNV-1a digest of the subject id, never
//! the id), `status`, `reason`, `binding` (the binding limit's meter),
//! `store_us` (the store call's latency) and `error` (the error's kind,
//! such as `unknown_subject`: not its message, which can name the subject). The digest and the
//! clock are read only when a subscriber wants the span.
//!
//! Metrics (`metrics` facade; the README lists them):
//! `tollgate_decisions_total{call, status, reason}`,
//! `tollgate_store_seconds{call}` (histogram),
//! `tollgate_store_errors_total{call}`, `tollgate_fail_open_total{call}`,
//! `tollgate_outcome_unknown_total{call}`,
//! `tollgate_lease_expired_total{found, call}`, `tollgate_reservations_in_flight`
//! (gauge).
//!
//! `renew` and `usage` make no decision: they have a span, store latency
//! and store errors only.
//!
//! A lease expiry is counted once: `found="call"` (with the `call` that
//! found it) when a call on the lease finds it expired, `found="sweep"`
//! (with `call="none"`) when the memory store's sweep finds a lease that
//! expired unsettled before any call did. The memory store tells which
//! expiries it has counted ([`lease_found_expired`], [`lease_swept`]); on
//! a store that does not (Redis, Postgres), each `commit` or `release`
//! that finds its lease expired counts, and a lease never settled is not
//! counted.

use crate::decision::{Decision, Refusal, Status};
use crate::engine::Call;
use crate::Error;

#[cfg(any(feature = "tracing", feature = "metrics"))]
use std::time::Instant;

/// The metric names.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) mod names {
    /// Decisions, by `call`, `status` and `reason`.
    pub(crate) const DECISIONS: &str = "tollgate_decisions_total";
    /// Store call latency in seconds, by `call`.
    pub(crate) const STORE_SECONDS: &str = "tollgate_store_seconds";
    /// Store calls that failed, by `call`.
    pub(crate) const STORE_ERRORS: &str = "tollgate_store_errors_total";
    /// Decisions allowed because the store failed under a fail-open policy.
    pub(crate) const FAIL_OPEN: &str = "tollgate_fail_open_total";
    /// Store calls whose outcome is unknown (sent, no answer).
    pub(crate) const OUTCOME_UNKNOWN: &str = "tollgate_outcome_unknown_total";
    /// Lease expiries, each once: by the call or the sweep that found it.
    pub(crate) const LEASE_EXPIRED: &str = "tollgate_lease_expired_total";
    /// Reservations opened and not yet settled or found expired.
    pub(crate) const IN_FLIGHT: &str = "tollgate_reservations_in_flight";
}

/// Every metric's keys, built once: a key with its labels (and its hash)
/// is made at first use and reused, so a call neither allocates a label
/// list nor hashes one; the recorder only looks the key up.
#[cfg(feature = "metrics")]
mod keys {
    use std::sync::OnceLock;

    use metrics::{Key, Label, Level, Metadata};

    use super::names;

    /// Where the metrics come from, as the `metrics` macros say it.
    pub(super) static META: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    pub(super) const CALLS: [&str; 9] = [
        "check", "admit", "record", "reserve", "grow", "commit", "release", "renew", "usage",
    ];
    pub(super) const STATUSES: [&str; 3] = ["ok", "warning", "exceeded"];
    pub(super) const REASONS: [&str; 5] = [
        "none",
        "limit_exceeded",
        "model_not_allowed",
        "cooldown",
        "insufficient_balance",
    ];

    /// The keys, by call index (and status and reason for decisions).
    pub(super) struct Keys {
        pub(super) decisions: Vec<Key>,
        pub(super) store_seconds: Vec<Key>,
        pub(super) store_errors: Vec<Key>,
        pub(super) fail_open: Vec<Key>,
        pub(super) outcome_unknown: Vec<Key>,
        /// By call index (`found="call"`).
        pub(super) lease_expired: Vec<Key>,
        /// `found="sweep"`.
        pub(super) lease_swept: Key,
        pub(super) in_flight: Key,
    }

    fn per_call(name: &'static str) -> Vec<Key> {
        CALLS
            .iter()
            .map(|c| Key::from_parts(name, vec![Label::from_static_parts("call", c)]))
            .collect()
    }

    pub(super) fn get() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut decisions = Vec::with_capacity(CALLS.len() * STATUSES.len() * REASONS.len());
            for c in CALLS {
                for s in STATUSES {
                    for r in REASONS {
                        decisions.push(Key::from_parts(
                            names::DECISIONS,
                            vec![
                                Label::from_static_parts("call", c),
                                Label::from_static_parts("status", s),
                                Label::from_static_parts("reason", r),
                            ],
                        ));
                    }
                }
            }
            Keys {
                decisions,
                store_seconds: per_call(names::STORE_SECONDS),
                store_errors: per_call(names::STORE_ERRORS),
                fail_open: per_call(names::FAIL_OPEN),
                outcome_unknown: per_call(names::OUTCOME_UNKNOWN),
                lease_expired: CALLS
                    .iter()
                    .map(|c| {
                        Key::from_parts(
                            names::LEASE_EXPIRED,
                            vec![
                                Label::from_static_parts("call", c),
                                Label::from_static_parts("found", "call"),
                            ],
                        )
                    })
                    .collect(),
                lease_swept: Key::from_parts(
                    names::LEASE_EXPIRED,
                    vec![
                        Label::from_static_parts("call", "none"),
                        Label::from_static_parts("found", "sweep"),
                    ],
                ),
                in_flight: Key::from_static_name(names::IN_FLIGHT),
            }
        })
    }

    /// Add one to counter `key`.
    pub(super) fn count(key: &Key) {
        metrics::with_recorder(|r| r.register_counter(key, &META).increment(1));
    }
}

#[cfg(feature = "metrics")]
fn call_index(call: Call) -> usize {
    match call {
        Call::Check => 0,
        Call::Admit => 1,
        Call::Record => 2,
        Call::Reserve => 3,
        Call::Grow => 4,
        Call::Commit => 5,
        Call::Release => 6,
        Call::Renew => 7,
        Call::Usage => 8,
    }
}

#[cfg(feature = "metrics")]
fn decision_index(call: Call, decision: &Decision) -> usize {
    let status = match decision.status {
        Status::Ok => 0,
        Status::Warning => 1,
        Status::Exceeded => 2,
    };
    let reason = match &decision.reason {
        None => 0,
        Some(Refusal::LimitExceeded) => 1,
        Some(Refusal::ModelNotAllowed { .. }) => 2,
        Some(Refusal::Cooldown { .. }) => 3,
        Some(Refusal::InsufficientBalance { .. }) => 4,
    };
    (call_index(call) * keys::STATUSES.len() + status) * keys::REASONS.len() + reason
}

/// A call's name as a label.
#[allow(dead_code)]
pub(crate) fn call_name(call: Call) -> &'static str {
    match call {
        Call::Check => "check",
        Call::Admit => "admit",
        Call::Record => "record",
        Call::Reserve => "reserve",
        Call::Grow => "grow",
        Call::Commit => "commit",
        Call::Release => "release",
        Call::Renew => "renew",
        Call::Usage => "usage",
    }
}

#[allow(dead_code)]
fn status_name(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok",
        Status::Warning => "warning",
        Status::Exceeded => "exceeded",
    }
}

#[allow(dead_code)]
fn reason_name(decision: &Decision) -> &'static str {
    match &decision.reason {
        None => "none",
        Some(Refusal::LimitExceeded) => "limit_exceeded",
        Some(Refusal::ModelNotAllowed { .. }) => "model_not_allowed",
        Some(Refusal::Cooldown { .. }) => "cooldown",
        Some(Refusal::InsufficientBalance { .. }) => "insufficient_balance",
    }
}

/// An error's kind, for a span: not its message, which can name the subject.
#[cfg(feature = "tracing")]
fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::UnknownSubject { .. } => "unknown_subject",
        Error::UnknownPlan { .. } => "unknown_plan",
        Error::UnknownMeter { .. } => "unknown_meter",
        Error::UnknownPool { .. } => "unknown_pool",
        Error::NegativeAmount { .. } => "negative_amount",
        Error::Overflow { .. } => "overflow",
        Error::CurrencyMismatch { .. } => "currency_mismatch",
        Error::WrongUnit { .. } => "wrong_unit",
        Error::InvalidConfig { .. } => "invalid_config",
        Error::InvalidBatch { .. } => "invalid_batch",
        Error::UnknownReservation { .. } => "unknown_reservation",
        Error::ReservationExpired { .. } => "reservation_expired",
        Error::ReservationSettled { .. } => "reservation_settled",
        Error::EventConflict { .. } => "event_conflict",
        Error::InvalidRequest { .. } => "invalid_request",
        Error::InvalidSnapshot { .. } => "invalid_snapshot",
        Error::Store { .. } => "store",
        Error::InvalidTopUp { .. } => "invalid_top_up",
        Error::NoBalance { .. } => "no_balance",
        Error::GrantConflict { .. } => "grant_conflict",
        Error::StoreOutcomeUnknown { .. } => "store_outcome_unknown",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// The subject as a span shows it: a 64-bit FNV-1a digest in hex.
#[cfg(feature = "tracing")]
pub(crate) fn digest(subject: &str) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(subject.as_bytes());
    format!("{:016x}", h.finish())
}

/// One engine call, watched.
#[derive(Debug)]
pub(crate) struct Watch {
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    call: Call,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
    /// When the store call started, if anyone wants its latency.
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    store_start: Option<Instant>,
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    store_secs: Option<f64>,
}

impl Watch {
    /// Open the watch on `call` for `subject`.
    #[inline(always)]
    #[allow(unused_variables)]
    pub(crate) fn new(call: Call, subject: &str) -> Self {
        #[cfg(feature = "tracing")]
        let span = {
            let span = tracing::debug_span!(
                target: "tollgate",
                "tollgate.call",
                call = call_name(call),
                subject = tracing::field::Empty,
                status = tracing::field::Empty,
                reason = tracing::field::Empty,
                binding = tracing::field::Empty,
                store_us = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            if !span.is_disabled() {
                span.record("subject", digest(subject).as_str());
            }
            span
        };
        Self {
            #[cfg(any(feature = "tracing", feature = "metrics"))]
            call,
            #[cfg(feature = "tracing")]
            span,
            #[cfg(any(feature = "tracing", feature = "metrics"))]
            store_start: None,
            #[cfg(any(feature = "tracing", feature = "metrics"))]
            store_secs: None,
        }
    }

    /// Whether the store call's latency is wanted: always under `metrics`,
    /// under `tracing` only when a subscriber wants the span.
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    #[inline(always)]
    fn timed(&self) -> bool {
        #[cfg(feature = "metrics")]
        return true;
        #[cfg(all(feature = "tracing", not(feature = "metrics")))]
        return !self.span.is_disabled();
    }

    /// The store call starts.
    #[inline(always)]
    pub(crate) fn store_start(&mut self) {
        // A word a store left and no call read (a wrapping store answered
        // otherwise) is not this call's.
        #[cfg(feature = "metrics")]
        STORE_FOUND.set(None);
        #[cfg(any(feature = "tracing", feature = "metrics"))]
        if self.timed() {
            self.store_start = Some(Instant::now());
        }
    }

    /// The store call returned.
    #[inline(always)]
    pub(crate) fn store_end(&mut self) {
        #[cfg(any(feature = "tracing", feature = "metrics"))]
        if let Some(start) = self.store_start.take() {
            let secs = start.elapsed().as_secs_f64();
            self.store_secs = Some(secs);
            #[cfg(feature = "metrics")]
            metrics::with_recorder(|r| {
                let key = &keys::get().store_seconds[call_index(self.call)];
                r.register_histogram(key, &keys::META).record(secs);
            });
            #[cfg(feature = "tracing")]
            self.span.record("store_us", (secs * 1e6) as u64);
        }
    }

    /// The call decided.
    #[inline(always)]
    #[allow(unused_variables)]
    pub(crate) fn decided(&self, decision: &Decision) {
        #[cfg(feature = "metrics")]
        {
            let k = keys::get();
            keys::count(&k.decisions[decision_index(self.call, decision)]);
            if decision.allowed_on_error {
                keys::count(&k.fail_open[call_index(self.call)]);
            }
        }
        #[cfg(feature = "tracing")]
        if !self.span.is_disabled() {
            self.span.record("status", status_name(decision.status));
            self.span.record("reason", reason_name(decision));
            if let Some(l) = decision.binding_limit() {
                self.span
                    .record("binding", tracing::field::display(&l.meter));
            }
        }
    }

    /// The call failed with `error` (bad input, or a failing store).
    #[inline(always)]
    #[allow(unused_variables)]
    pub(crate) fn failed(&self, error: &Error) {
        #[cfg(feature = "metrics")]
        {
            let k = keys::get();
            match error {
                Error::Store { .. } => keys::count(&k.store_errors[call_index(self.call)]),
                Error::ReservationExpired { .. } => {
                    // The store's word first: a memory store says whether
                    // this call is the first to find the expiry.
                    let count = match STORE_FOUND.take() {
                        Some(first) => first,
                        None => matches!(self.call, Call::Commit | Call::Release),
                    };
                    if count {
                        keys::count(&k.lease_expired[call_index(self.call)]);
                        in_flight(-1.0);
                    }
                }
                _ => {}
            }
        }
        if matches!(error, Error::StoreOutcomeUnknown { .. }) {
            #[cfg(feature = "metrics")]
            keys::count(&keys::get().outcome_unknown[call_index(self.call)]);
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: "tollgate",
                call = call_name(self.call),
                "store call outcome unknown"
            );
        }
        #[cfg(feature = "tracing")]
        if !self.span.is_disabled() {
            self.span.record("error", error_kind(error));
        }
    }

    /// A reservation opened (`reserve` returned one).
    #[inline(always)]
    pub(crate) fn opened(&self) {
        #[cfg(feature = "metrics")]
        in_flight(1.0);
    }

    /// A reservation settled (`commit` or `release` applied).
    #[inline(always)]
    pub(crate) fn settled(&self) {
        #[cfg(feature = "metrics")]
        in_flight(-1.0);
    }
}

/// Move the reservations-in-flight gauge by `by`.
#[cfg(feature = "metrics")]
fn in_flight(by: f64) {
    metrics::with_recorder(|r| {
        let g = r.register_gauge(&keys::get().in_flight, &keys::META);
        if by >= 0.0 {
            g.increment(by);
        } else {
            g.decrement(-by);
        }
    });
}

#[cfg(feature = "metrics")]
thread_local! {
    /// What the store said of the last lease it found expired on this
    /// thread: `Some(true)` the first time a call found that lease expired,
    /// `Some(false)` when its expiry was counted before (by a call or the
    /// sweep). `None`: the store said nothing (it does not count expiries).
    /// A store call runs on the caller's thread (the memory store's async
    /// `apply` does not await), so the engine reads it right after.
    static STORE_FOUND: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Hook for the memory store: a call found a lease expired; `first` if no
/// call or sweep counted its expiry before. The engine counts it
/// (`found="call"`) when it sees the error, only if `first`.
#[inline(always)]
#[allow(unused_variables)]
pub(crate) fn lease_found_expired(first: bool) {
    #[cfg(feature = "metrics")]
    STORE_FOUND.set(Some(first));
}

/// Hook for the memory store's sweep: it found a lease expired unsettled
/// that no call had found. Counted `found="sweep"`, and the lease leaves
/// the in-flight gauge.
#[inline(always)]
pub(crate) fn lease_swept() {
    #[cfg(feature = "metrics")]
    {
        keys::count(&keys::get().lease_swept);
        in_flight(-1.0);
    }
}
