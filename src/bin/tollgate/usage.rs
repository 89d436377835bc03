//! `tollgate usage --snapshot FILE`: what a memory snapshot holds, per
//! scope and counter.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};
use tollgate::{MemoryStore, Snapshot, Window};

/// One counter of the snapshot.
#[derive(Debug)]
struct Row {
    scope: String,
    meter: String,
    window: String,
    period: Option<(i64, i64)>,
    used: u64,
    held: u64,
    /// A closed calendar period's kept total (contract rule 11), not a
    /// live counter.
    closed: bool,
}

/// Read, check (as `MemoryStore::restore` does) and report the snapshot.
///
/// # Errors
/// The file cannot be read, is not a snapshot, or breaks an invariant.
pub fn run(path: &Path, as_json: bool) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let snapshot: Snapshot = serde_json::from_value(value.clone())
        .map_err(|e| format!("{}: not a snapshot: {e}", path.display()))?;
    let (leases, events) = (snapshot.lease_count(), snapshot.event_count());
    MemoryStore::restore(snapshot).map_err(|e| format!("{}: {e}", path.display()))?;
    let rows = rows(&value);
    if as_json {
        let v = json!({
            "leases": leases,
            "events": events,
            "counters": rows.iter().map(|r| json!({
                "scope": r.scope, "meter": r.meter, "window": r.window,
                "period": r.period.map(|(a, b)| json!({"start": time(a), "end": time(b)})),
                "used": r.used, "held": r.held, "closed": r.closed,
            })).collect::<Vec<_>>(),
        });
        return Ok(format!("{v:#}\n"));
    }
    let mut out = String::new();
    let closed = rows.iter().filter(|r| r.closed).count();
    let _ = writeln!(
        out,
        "{} counters, {closed} closed periods, {leases} leases, {events} event ids (amounts in each meter's smallest unit)",
        rows.len() - closed
    );
    let mut last = "";
    for r in &rows {
        if r.scope != last {
            let _ = writeln!(out, "{}", r.scope);
            last = &r.scope;
        }
        let period = r
            .period
            .map(|(a, b)| format!(" {} .. {}", time(a), time(b)))
            .unwrap_or_default();
        if r.closed {
            let _ = writeln!(
                out,
                "  {} ({}{period}): closed, used {}",
                r.meter, r.window, r.used
            );
        } else {
            let _ = writeln!(
                out,
                "  {} ({}{period}): used {}, held {}",
                r.meter, r.window, r.used, r.held
            );
        }
    }
    Ok(out)
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}

/// The snapshot's counters, from its serialized form (checked by
/// `restore` first, so the shapes are known good).
fn rows(v: &Value) -> Vec<Row> {
    let mut rows = Vec::new();
    let Some(scopes) = v["scopes"].as_array() else {
        return rows;
    };
    for entry in scopes {
        let scope = entry[0].as_str().unwrap_or_default().to_owned();
        for c in entry[1].as_array().into_iter().flatten() {
            let window = serde_json::from_value::<Window>(c["window"].clone())
                .map_or_else(|_| c["window"].to_string(), |w| w.to_string());
            let data = &c["data"];
            let (used, period) = if let Some(cal) = data.get("calendar") {
                let p = (cal["start"].as_i64(), cal["end"].as_i64());
                (cal["used"].as_u64(), p.0.zip(p.1))
            } else if let Some(r) = data.get("rolling") {
                (r["total"].as_u64(), None)
            } else if let Some(l) = data.get("lifetime") {
                (l["used"].as_u64(), None)
            } else {
                (Some(0), None)
            };
            rows.push(Row {
                scope: scope.clone(),
                meter: readable(c["meter"].as_str().unwrap_or_default()),
                window,
                period,
                used: used.unwrap_or(0),
                held: c["holds"]["total"].as_u64().unwrap_or(0),
                closed: false,
            });
        }
    }
    // Closed periods' totals, after each scope's live counters.
    for entry in v["history"].as_array().into_iter().flatten() {
        let scope = entry[0].as_str().unwrap_or_default().to_owned();
        for p in entry[1].as_array().into_iter().flatten() {
            let window = serde_json::from_value::<Window>(p["window"].clone())
                .map_or_else(|_| p["window"].to_string(), |w| w.to_string());
            rows.push(Row {
                scope: scope.clone(),
                meter: readable(p["meter"].as_str().unwrap_or_default()),
                window,
                period: p["start"].as_i64().zip(p["end"].as_i64()),
                used: p["used"].as_u64().unwrap_or(0),
                held: 0,
                closed: true,
            });
        }
    }
    // Stable: a scope's closed periods follow its live counters.
    rows.sort_by(|a, b| (&a.scope, a.closed).cmp(&(&b.scope, b.closed)));
    rows
}

/// A counter's meter as a person reads it: the engine's counter of money
/// charged for a meter (`<meter>` U+001F `charged:<cost meter>`) reads
/// `<meter> (charged, <cost meter>)`; any other control character is
/// escaped, never printed raw.
fn readable(meter: &str) -> String {
    match meter.split_once("\u{1f}charged:") {
        Some((m, cost)) => format!("{} (charged, {})", m.escape_debug(), cost.escape_debug()),
        None => meter.escape_debug().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn charged_counters_read_as_words() {
        assert_eq!(
            super::readable("llm_tokens_input\u{1f}charged:cost"),
            "llm_tokens_input (charged, cost)"
        );
        assert_eq!(super::readable("tokens"), "tokens");
        assert_eq!(super::readable("a\u{7}b"), "a\\u{7}b");
    }
}
