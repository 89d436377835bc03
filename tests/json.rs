//! Decisions and usage reports as JSON, and which plan a decision was made
//! under.

use chrono::{TimeZone, Utc};
use serde_json::json;
use tollgate::{Allocation, Catalog, Engine, ManualClock, Request};

fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
      "meters": [{"id": "tok", "unit": "count"}, {"id": "img", "unit": "count"},
                 {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
      "plans": [
        {"id": "free", "cost_meter": "cost", "prices": {"tok": "0.00033"},
         "limits": [{"meter": "tok", "window": {"calendar": {"period": "day"}}, "max": 3000},
                    {"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": 1}]},
        {"id": "plus", "cost_meter": "cost", "prices": {"tok": "0.00033"},
         "limits": [{"meter": "tok", "window": {"calendar": {"period": "day"}}, "max": 10000},
                    {"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": 50}]}
      ]
    }"#,
    )
    .unwrap()
}

fn engine() -> Engine<tollgate::MemoryStore, ManualClock> {
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap());
    let e = Engine::with_clock(catalog(), clock);
    e.allocate(Allocation::new("agent-7", "free")).unwrap();
    e
}

#[test]
fn a_decision_serializes_with_public_amounts_and_rfc3339_instants() {
    let e = engine();
    let d = e
        .admit(&Request::new("agent-7").units("tok", 3000).units("img", 2))
        .unwrap();
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["plan"], "free");
    assert_eq!(v["status"], "warning");
    assert_eq!(
        (v["allowed"].clone(), v["recorded"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(v["reason"], json!(null));
    assert_eq!(v["retry_after_ms"], json!(null));
    // 3,000 × $0.00033 = $0.99, exact, as a decimal string.
    assert_eq!(v["cost"], json!({"amount": "0.990000", "currency": "USD"}));
    assert_eq!(v["unpriced"], json!(["img"]));
    assert_eq!(
        (v["allowed_on_error"].clone(), v["record_unknown"].clone()),
        (json!(false), json!(null))
    );
    let tok = &v["limits"][0];
    assert_eq!(tok["scope"], "subject:agent-7");
    assert_eq!(tok["meter"], "tok");
    assert_eq!(tok["window"], json!({"calendar": {"period": "day"}}));
    assert_eq!(
        (
            tok["requested"].clone(),
            tok["used"].clone(),
            tok["max"].clone(),
            tok["remaining"].clone()
        ),
        (json!(3000), json!(3000), json!(3000), json!(0))
    );
    assert_eq!(tok["period_start"], "2026-04-08T00:00:00Z");
    assert_eq!(tok["resets_at"], "2026-04-09T00:00:00Z");
    assert_eq!(tok["status"], "warning");
    let cost = &v["limits"][1];
    assert_eq!(cost["used"], "0.990000");
    assert_eq!(cost["max"], "1.000000");
    assert_eq!(cost["remaining"], "0.010000");

    // A refusal says why and when to retry.
    let r = e.admit(&Request::new("agent-7").units("tok", 1)).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["reason"], json!({"kind": "limit_exceeded"}));
    assert_eq!(v["retry_after_ms"], 12 * 3_600_000);
    assert_eq!(v["binding"], 0);
}

#[test]
fn a_plan_change_mid_period_keeps_usage_and_each_answer_names_its_plan() {
    let e = engine();
    assert!(
        e.admit(&Request::new("agent-7").units("tok", 2000))
            .unwrap()
            .allowed
    );
    let d = e
        .admit(&Request::new("agent-7").units("tok", 2000))
        .unwrap();
    assert_eq!((&*d.plan, d.allowed), ("free", false));

    e.allocate(Allocation::new("agent-7", "plus")).unwrap();
    let d = e
        .admit(&Request::new("agent-7").units("tok", 2000))
        .unwrap();
    assert_eq!(d.plan, "plus");
    assert!(d.allowed);
    assert_eq!(
        (d.limits[0].used, d.limits[0].max),
        (4000, Some(10_000)),
        "usage kept"
    );
    let report = e.usage("agent-7").unwrap();
    assert_eq!(report.plan, "plus");
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["subject"], "agent-7");
    assert_eq!(v["plan"], "plus");
    assert_eq!(v["at"], "2026-04-08T12:00:00Z");
    assert_eq!(v["meters"][0]["meter"], "tok");
    assert_eq!(v["meters"][0]["units"], 4000);
    assert_eq!(
        v["meters"][0]["cost"],
        json!({"amount": "1.320000", "currency": "USD"})
    );
    assert_eq!(v["meters"][1]["units"], "1.320000");
    assert_eq!(v["meters"][1]["max"], "50.000000");
    assert_eq!(v["meters"][1]["period_start"], "2026-04-01T00:00:00Z");
}
