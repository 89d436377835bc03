//! How a batch is written for the server-side function (one jsonb
//! argument) and how its answer is read back.

use serde_json::{json, Map, Value};

use crate::name::Name;
use crate::store::{
    event_fingerprint, Applied, BalanceAction, BalanceState, Batch, CounterState, GrantState,
    LeaseAction, Mode, ScopeKey, ScopeKind, SettledHold,
};
use crate::window::{Period, Window};
use crate::Error;

/// A scope's kind as the tables spell it.
pub(super) fn kind_name(scope: &ScopeKey) -> &'static str {
    match scope.kind() {
        ScopeKind::Subject => "subject",
        ScopeKind::Pool => "pool",
    }
}

fn scope_of(kind: &str, id: &str) -> Option<ScopeKey> {
    match kind {
        "subject" => Some(ScopeKey::subject(id)),
        "pool" => Some(ScopeKey::pool(id)),
        _ => None,
    }
}

fn period_name(p: Period) -> &'static str {
    match p {
        Period::Day => "day",
        Period::Week => "week",
        Period::Month => "month",
    }
}

/// A window's code in the `window` column: `day@0` (calendar period @ UTC
/// offset seconds), `rolling:<span secs>s/<buckets>`, `lifetime`,
/// `concurrent`. One code per window, one window per code.
pub(super) fn window_code(w: Window) -> String {
    match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => format!("{}@{utc_offset_secs}", period_name(period)),
        Window::Rolling { span_secs, buckets } => format!("rolling:{span_secs}s/{buckets}"),
        Window::Lifetime => "lifetime".into(),
        Window::Concurrent => "concurrent".into(),
    }
}

/// The window of a code [`window_code`] wrote.
pub(super) fn parse_window(code: &str) -> Option<Window> {
    match code {
        "lifetime" => return Some(Window::Lifetime),
        "concurrent" => return Some(Window::Concurrent),
        _ => {}
    }
    if let Some(rest) = code.strip_prefix("rolling:") {
        let (span, buckets) = rest.split_once("s/")?;
        return Some(Window::Rolling {
            span_secs: span.parse().ok()?,
            buckets: buckets.parse().ok()?,
        });
    }
    let (p, off) = code.split_once('@')?;
    let period = match p {
        "day" => Period::Day,
        "week" => Period::Week,
        "month" => Period::Month,
        _ => return None,
    };
    Some(Window::Calendar {
        period,
        utc_offset_secs: off.parse().ok()?,
    })
}

/// Refuse a batch naming text PostgreSQL cannot keep: a `text` (and a
/// `jsonb` string) holds no NUL byte, so a scope id, meter, event id or
/// grant id with one is [`Error::InvalidBatch`] here, before anything is
/// sent, rather than a server error.
pub(super) fn refuse_nul(batch: &Batch<'_>) -> Result<(), Error> {
    let grant_id = batch.balance.and_then(|b| match b.action {
        BalanceAction::Grant(g) => Some(g.id),
        BalanceAction::Debit { .. } => None,
    });
    let mut texts = batch
        .ops
        .iter()
        .flat_map(|o| [o.scope.id(), o.meter.as_str()])
        .chain(batch.cooldowns.iter().map(|c| c.scope.id()))
        .chain(batch.lease.iter().map(|l| l.owner.id()))
        .chain(batch.event.iter().map(|e| e.id))
        .chain(
            batch
                .balance
                .iter()
                .flat_map(|b| [b.scope.id(), b.meter.as_str()]),
        )
        .chain(grant_id);
    match texts.find(|t| t.as_bytes().contains(&0)) {
        None => Ok(()),
        Some(t) => Err(Error::InvalidBatch {
            reason: format!("PostgresStore keeps text without NUL bytes: {t:?} has one"),
        }),
    }
}

/// The function's argument for `batch` (already validated): the store's
/// lock namespace `ns` and event horizon ride along.
pub(super) fn encode(batch: &Batch<'_>, ns: &str, horizon_ms: i64) -> String {
    let ops: Vec<Value> = batch
        .ops
        .iter()
        .map(|op| {
            let mut o = Map::new();
            o.insert("k".into(), kind_name(op.scope).into());
            o.insert("s".into(), op.scope.id().into());
            o.insert("m".into(), op.meter.as_str().into());
            o.insert("w".into(), window_code(op.window).into());
            let kind = match op.window {
                Window::Calendar { .. } => "C",
                Window::Rolling { .. } => "R",
                Window::Lifetime => "L",
                Window::Concurrent => "X",
            };
            o.insert("t".into(), kind.into());
            match op.window {
                Window::Calendar {
                    period,
                    utc_offset_secs,
                } => {
                    o.insert("p".into(), period_name(period).into());
                    o.insert("o".into(), utc_offset_secs.into());
                }
                Window::Rolling { span_secs, buckets } => {
                    o.insert("bw".into(), Window::bucket_ms(span_secs, buckets).into());
                    o.insert("n".into(), (u64::from(buckets) + 1).into());
                    o.insert(
                        "sp".into(),
                        (i64::try_from(span_secs)
                            .unwrap_or(i64::MAX / 1000)
                            .saturating_mul(1000))
                        .into(),
                    );
                }
                Window::Lifetime | Window::Concurrent => {}
            }
            o.insert("d".into(), op.delta.into());
            o.insert("x".into(), op.max.map_or(Value::Null, Value::from));
            Value::Object(o)
        })
        .collect();
    let cds: Vec<Value> = batch
        .cooldowns
        .iter()
        .map(|c| json!({"k": kind_name(c.scope), "s": c.scope.id(), "u": c.start_until_ms}))
        .collect();
    // The scopes to lock, as "kind:id", sorted bytewise and distinct: one
    // order for every batch, so no two wait on each other.
    let mut locks: Vec<String> = batch
        .ops
        .iter()
        .map(|o| o.scope)
        .chain(batch.cooldowns.iter().map(|c| c.scope))
        .chain(batch.balance.iter().map(|b| b.scope))
        .map(|s| format!("{}:{}", kind_name(s), s.id()))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    let mut b = Map::new();
    b.insert("now".into(), batch.now_ms.into());
    b.insert("lk".into(), locks.into());
    let mode = match batch.mode {
        Mode::Check => "c",
        Mode::WithinLimits => "w",
        Mode::Force => "f",
    };
    b.insert("mode".into(), mode.into());
    b.insert("ns".into(), ns.into());
    b.insert("hz".into(), horizon_ms.into());
    b.insert("ops".into(), Value::Array(ops));
    b.insert("cd".into(), Value::Array(cds));
    if let Some(l) = batch.lease {
        let mut o = Map::new();
        o.insert("id".into(), l.id.to_string().into());
        o.insert("ok".into(), kind_name(l.owner).into());
        o.insert("os".into(), l.owner.id().into());
        match l.action {
            LeaseAction::Open {
                expires_at_ms,
                deadline_ms,
            } => {
                o.insert("a".into(), "open".into());
                o.insert("exp".into(), expires_at_ms.into());
                o.insert("dl".into(), deadline_ms.map_or(Value::Null, Value::from));
            }
            LeaseAction::Renew { expires_at_ms } => {
                o.insert("a".into(), "renew".into());
                o.insert("exp".into(), expires_at_ms.into());
            }
            LeaseAction::Grow => {
                o.insert("a".into(), "grow".into());
            }
            LeaseAction::Settle { keep } => {
                o.insert("a".into(), "settle".into());
                o.insert("num".into(), keep.num().into());
                o.insert("den".into(), keep.den().into());
            }
        }
        b.insert("lease".into(), Value::Object(o));
    }
    if let Some(bal) = batch.balance {
        let mut o = Map::new();
        o.insert("k".into(), kind_name(bal.scope).into());
        o.insert("s".into(), bal.scope.id().into());
        o.insert("m".into(), bal.meter.as_str().into());
        match bal.action {
            BalanceAction::Debit { amount, overdraft } => {
                o.insert("a".into(), "d".into());
                o.insert("n".into(), amount.into());
                o.insert("od".into(), overdraft.into());
            }
            BalanceAction::Grant(g) => {
                o.insert("a".into(), "g".into());
                o.insert("id".into(), g.id.into());
                o.insert("n".into(), g.amount.into());
                o.insert("eff".into(), g.effective_at_ms.into());
                o.insert(
                    "exp".into(),
                    g.expires_at_ms.map_or(Value::Null, Value::from),
                );
                o.insert("pr".into(), g.priority.into());
            }
        }
        b.insert("bal".into(), Value::Object(o));
    }
    if let Some(ev) = batch.event {
        b.insert("event".into(), json!({"id": ev.id, "fp": ev.fingerprint}));
        b.insert("efp".into(), event_fingerprint(batch).into());
    }
    Value::Object(b).to_string()
}

fn bad_answer(what: &str) -> Error {
    Error::Store {
        message: format!("postgres: unexpected answer from apply(): {what}"),
    }
}

fn opt_i64(v: &Value) -> Result<Option<i64>, Error> {
    match v {
        Value::Null => Ok(None),
        v => v.as_i64().map(Some).ok_or_else(|| bad_answer("an instant")),
    }
}

fn amount(v: &Value) -> Result<u64, Error> {
    v.as_u64().ok_or_else(|| bad_answer("an amount"))
}

/// The function's answer as an [`Applied`].
pub(super) fn decode(text: &str) -> Result<Applied, Error> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad_answer(&e.to_string()))?;
    let mut out = Applied {
        applied: v["a"].as_bool().ok_or_else(|| bad_answer("applied"))?,
        ..Applied::default()
    };
    for s in v["c"].as_array().ok_or_else(|| bad_answer("states"))? {
        let s = s.as_array().filter(|s| s.len() == 5);
        let s = s.ok_or_else(|| bad_answer("a state"))?;
        out.counters.push(CounterState {
            used: amount(&s[0])?,
            held: amount(&s[1])?,
            period_start_ms: opt_i64(&s[2])?,
            resets_at_ms: opt_i64(&s[3])?,
            available_at_ms: opt_i64(&s[4])?,
        });
    }
    for h in v["s"].as_array().map_or(&[][..], |a| a) {
        let h = h.as_array().filter(|h| h.len() == 6);
        let h = h.ok_or_else(|| bad_answer("a settled hold"))?;
        let text = |i: usize| h[i].as_str().ok_or_else(|| bad_answer("a settled hold"));
        let scope = scope_of(text(0)?, text(1)?).ok_or_else(|| bad_answer("a scope"))?;
        let window = parse_window(text(3)?).ok_or_else(|| bad_answer("a window"))?;
        out.settled.push(SettledHold::new(
            scope,
            Name::new(text(2)?),
            window,
            amount(&h[4])?,
            amount(&h[5])?,
        ));
    }
    for c in v["cd"].as_array().map_or(&[][..], |a| a) {
        out.cooldowns.push(opt_i64(c)?);
    }
    out.replayed_at_ms = opt_i64(&v["r"])?;
    if let Some(b) = v.get("b").filter(|b| !b.is_null()) {
        out.balance = Some(Box::new(balance(b)?));
    }
    Ok(out)
}

/// A balance as `bal_state` reports it.
fn balance(b: &Value) -> Result<BalanceState, Error> {
    let bad = || bad_answer("a balance");
    let mut grants = Vec::new();
    for g in b["g"].as_array().ok_or_else(bad)? {
        let g = g.as_array().filter(|g| g.len() == 7).ok_or_else(bad)?;
        let at = |i: usize| g[i].as_i64().ok_or_else(bad);
        grants.push(GrantState {
            id: g[0].as_str().ok_or_else(bad)?.to_owned(),
            amount: amount(&g[1])?,
            spent: amount(&g[2])?,
            effective_at_ms: at(3)?,
            expires_at_ms: opt_i64(&g[4])?,
            priority: g[5]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(bad)?,
            granted_at_ms: at(6)?,
        });
    }
    Ok(BalanceState {
        remaining: amount(&b["rem"])?,
        held: amount(&b["held"])?,
        debt: amount(&b["debt"])?,
        fits: b["fits"].as_bool().ok_or_else(bad)?,
        uncovered: amount(&b["unc"])?,
        grants,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_window, window_code};
    use crate::window::{Period, Window};

    /// Every window has one code and reads back from it.
    #[test]
    fn window_codes_round_trip() {
        for w in [
            Window::Calendar {
                period: Period::Day,
                utc_offset_secs: 0,
            },
            Window::Calendar {
                period: Period::Month,
                utc_offset_secs: -18_000,
            },
            Window::Calendar {
                period: Period::Week,
                utc_offset_secs: 3_600,
            },
            Window::Rolling {
                span_secs: 3_600,
                buckets: 60,
            },
            Window::Lifetime,
            Window::Concurrent,
        ] {
            assert_eq!(parse_window(&window_code(w)), Some(w), "{w}");
        }
        assert_eq!(parse_window("year@0"), None);
        assert_eq!(parse_window("rolling:xs/1"), None);
    }
}
