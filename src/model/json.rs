//! Decisions as JSON (serde `Serialize`), for logs, audit trails and APIs.
//!
//! The shape, one key per public field, amounts in their public form
//! ([`Amount`]: a number for counts and seconds, a decimal string of the
//! major unit for money — `"0.99"`, never a float), instants as RFC 3339
//! strings:
//!
//! ```json
//! {"plan": "plan_free", "status": "warning", "allowed": true, "recorded": true,
//!  "reason": null,
//!  "limits": [{"scope": "subject:agent-7", "meter": "llm_tokens_input",
//!              "window": {"calendar": {"period": "month"}},
//!              "requested": 1200, "used": 16000, "held": 0, "max": 20000,
//!              "remaining": 4000, "period_start": "2026-04-01T00:00:00Z",
//!              "resets_at": "2026-05-01T00:00:00Z", "status": "warning"}],
//!  "binding": 0, "retry_after_ms": null, "cost": null, "unpriced": [],
//!  "allowed_on_error": false, "record_unknown": null, "balance": null}
//! ```
//!
//! A refusal's `reason` is `{"kind": "limit_exceeded"}`,
//! `{"kind": "model_not_allowed", "model": …}`,
//! `{"kind": "cooldown", "scope": …, "until": …}` or
//! `{"kind": "insufficient_balance", "needed": …, "available": …}`; `cost`
//! is `{"amount": "0.99", "currency": "usd"}`. `balance`, on a plan that
//! spends from a prepaid balance, is a [`Balance`](crate::Balance): `scope`,
//! `currency`, `remaining`, `held`, `debt`, `available`, `uncovered` (money
//! strings) and `grants` (`id`, `amount`, `remaining`, `effective_at`,
//! `expires_at`, `priority`, `granted_at`).

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::decision::{Amount, Decision, LimitState, LimitStates, MeterList};

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Units(n) => s.serialize_u64(*n),
            Amount::Money(d) => Serialize::serialize(d, s),
        }
    }
}

impl Serialize for LimitState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(12))?;
        m.serialize_entry("scope", &self.scope)?;
        m.serialize_entry("meter", &self.meter)?;
        m.serialize_entry("window", &self.window)?;
        m.serialize_entry("requested", &self.requested_amount())?;
        m.serialize_entry("used", &self.used_amount())?;
        m.serialize_entry("held", &self.held_amount())?;
        m.serialize_entry("max", &self.max_amount())?;
        m.serialize_entry("remaining", &self.remaining_amount())?;
        m.serialize_entry("period_start", &self.period_start())?;
        m.serialize_entry("resets_at", &self.resets_at())?;
        m.serialize_entry("status", &self.status)?;
        m.end()
    }
}

impl Serialize for LimitStates {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl Serialize for MeterList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(13))?;
        m.serialize_entry("plan", &self.plan)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("allowed", &self.allowed)?;
        m.serialize_entry("recorded", &self.recorded)?;
        m.serialize_entry("reason", &self.reason)?;
        m.serialize_entry("limits", &self.limits)?;
        m.serialize_entry("binding", &self.binding)?;
        let retry_ms = self
            .retry_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        m.serialize_entry("retry_after_ms", &retry_ms)?;
        m.serialize_entry("cost", &self.cost)?;
        m.serialize_entry("unpriced", &self.unpriced)?;
        m.serialize_entry("allowed_on_error", &self.allowed_on_error)?;
        m.serialize_entry("record_unknown", &self.record_unknown)?;
        m.serialize_entry("balance", &self.balance)?;
        m.end()
    }
}
