//! A replay's outcome as text for people and JSON for machines.

use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::replay::{Outcome, Peak, Tally};

/// A plan's subjects together, in order of the plans' first appearance.
pub fn by_plan(out: &Outcome) -> Vec<(String, usize, Tally)> {
    let mut plans: Vec<(String, usize, Tally)> = Vec::new();
    for s in &out.subjects {
        let i = match plans.iter().position(|(p, _, _)| *p == s.plan) {
            Some(i) => i,
            None => {
                plans.push((s.plan.clone(), 0, Tally::default()));
                plans.len() - 1
            }
        };
        plans[i].1 += 1;
        plans[i].2.merge(&s.tally);
    }
    plans
}

fn amount(v: u64, scale: Option<u32>) -> String {
    match scale {
        Some(s) => Decimal::from_i128_with_scale(i128::from(v), s)
            .normalize()
            .to_string(),
        None => v.to_string(),
    }
}

fn scope_label(p: &Peak, per_plan: bool) -> String {
    if per_plan && crate::replay::is_subject(&p.scope) {
        "per subject".to_owned()
    } else {
        p.scope.to_string()
    }
}

fn tally_text(out: &mut String, t: &Tally, per_plan: bool) {
    let refused = t.requests - t.admitted;
    let _ = writeln!(
        out,
        "  requests {}, admitted {}, refused {}",
        t.requests, t.admitted, refused
    );
    if t.duplicates > 0 {
        let _ = writeln!(
            out,
            "    {} repeated an event id (answered as before, not counted again)",
            t.duplicates
        );
    }
    let mut refusals = t.refused.clone();
    refusals.sort();
    for (k, n) in &refusals {
        match &k.meter {
            Some(m) => {
                let _ = writeln!(out, "    refused {n}: {} on {m}", k.reason);
            }
            None => {
                let _ = writeln!(out, "    refused {n}: {}", k.reason);
            }
        }
    }
    if let Some((c, cur)) = &t.cost {
        let _ = writeln!(out, "  cost {} {cur}", c.normalize());
    }
    for p in &t.peaks {
        let max = p.max.map_or("unlimited".to_owned(), |m| amount(m, p.scale));
        let pct = match p.max {
            Some(m) if m > 0 => format!(" ({}%)", u128::from(p.peak) * 100 / u128::from(m)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  peak {} {} [{}]: {} of {max}{pct}",
            p.meter,
            p.window,
            scope_label(p, per_plan),
            amount(p.peak, p.scale)
        );
    }
}

/// The outcome as text.
pub fn text(out: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "replayed {} lines: {} events, {} bad, {} subjects",
        out.lines,
        out.lines - out.bad.len() as u64,
        out.bad.len(),
        out.subjects.len()
    );
    for (plan, n, t) in by_plan(out) {
        let _ = writeln!(
            s,
            "\nplan {plan} ({n} subject{})",
            if n == 1 { "" } else { "s" }
        );
        tally_text(&mut s, &t, true);
    }
    for sub in &out.subjects {
        let _ = writeln!(s, "\nsubject {} (plan {})", sub.id, sub.plan);
        tally_text(&mut s, &sub.tally, false);
    }
    s
}

fn tally_json(t: &Tally, per_plan: bool) -> Value {
    let mut refusals = t.refused.clone();
    refusals.sort();
    json!({
        "requests": t.requests,
        "admitted": t.admitted,
        "duplicates": t.duplicates,
        "refused": refusals.iter().map(|(k, n)| json!({
            "reason": k.reason, "meter": k.meter, "count": n,
        })).collect::<Vec<_>>(),
        "cost": t.cost.as_ref().map(|(c, cur)| json!({
            "amount": c.normalize().to_string(), "currency": cur.to_string(),
        })),
        "peaks": t.peaks.iter().map(|p| json!({
            "scope": scope_label(p, per_plan),
            "meter": p.meter.to_string(),
            "window": p.window.to_string(),
            "peak": amount(p.peak, p.scale),
            "max": p.max.map(|m| amount(m, p.scale)),
        })).collect::<Vec<_>>(),
    })
}

/// The outcome as one JSON document.
pub fn json(out: &Outcome) -> Value {
    json!({
        "lines": out.lines,
        "events": out.lines - out.bad.len() as u64,
        "stopped": out.stopped,
        "bad_lines": out.bad.iter().map(|b| json!({"line": b.line, "reason": b.reason}))
            .collect::<Vec<_>>(),
        "plans": by_plan(out).iter().map(|(plan, n, t)| {
            let mut v = tally_json(t, true);
            v["plan"] = json!(plan);
            v["subjects"] = json!(n);
            v
        }).collect::<Vec<_>>(),
        "subjects": out.subjects.iter().map(|s| {
            let mut v = tally_json(&s.tally, false);
            v["subject"] = json!(s.id);
            v["plan"] = json!(s.plan);
            v
        }).collect::<Vec<_>>(),
    })
}
