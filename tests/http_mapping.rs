//! The `http` feature: a Decision as status, headers and JSON body. Time only
//! moves through a `ManualClock`, so every number is exact.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use http::{HeaderMap, StatusCode};
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use tollgate::http::{HttpMapping, RATELIMIT, RATELIMIT_POLICY, X_QUOTA_WARNING};
use tollgate::{
    Allocation, CatalogConfig, Decision, Engine, LimitConfig, ManualClock, MemoryStore, Meter,
    Period, PlanConfig, PoolConfig, Request, Window,
};

type TestEngine = Engine<MemoryStore, ManualClock>;

/// 2026-03-10 12:00 UTC: 21.5 days before April.
fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap()
}

const TO_APRIL: u64 = 21 * 86_400 + 12 * 3_600;
const MARCH: u64 = 31 * 86_400;

fn engine() -> (TestEngine, ManualClock) {
    let config = CatalogConfig::default()
        .meter(Meter::count("vector_search_count"))
        .meter(Meter::count("requests"))
        .meter(Meter::count("browser_seconds"))
        .meter(Meter::count("llm_tokens_input"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("plan_free")
                .cost_meter("cost")
                .price("llm_tokens_input", dec!(0.01))
                .limit(LimitConfig::new(
                    "vector_search_count",
                    Window::calendar(Period::Month),
                    100u64,
                ))
                .limit(LimitConfig::new(
                    "requests",
                    Window::Rolling {
                        span_secs: 3_600,
                        buckets: 60,
                    },
                    10u64,
                ))
                .limit(LimitConfig::new(
                    "browser_seconds",
                    Window::calendar(Period::Month),
                    0u64,
                ))
                .limit(LimitConfig::new(
                    "llm_tokens_input",
                    Window::calendar(Period::Month),
                    1_000_000u64,
                ))
                // A cost cap on a short window is still a quota (402), not a rate.
                .limit(LimitConfig::new(
                    "cost",
                    Window::Rolling {
                        span_secs: 60,
                        buckets: 1,
                    },
                    dec!(1.50),
                )),
        )
        .pool(PoolConfig::new("account:acme").limit(LimitConfig::new(
            "vector_search_count",
            Window::calendar(Period::Day),
            150u64,
        )));
    let clock = ManualClock::new(start());
    let engine = Engine::with_clock(config.build().unwrap(), clock.clone());
    engine
        .allocate(Allocation::new("alice", "plan_free"))
        .unwrap();
    engine
        .allocate(Allocation::new("bob", "plan_free").with_pool("account:acme"))
        .unwrap();
    engine
        .allocate(Allocation::new("carol", "plan_free").with_pool("account:acme"))
        .unwrap();
    (engine, clock)
}

fn admit(engine: &TestEngine, subject: &str, meter: &str, n: u64) -> Decision {
    engine
        .admit(&Request::new(subject).units(meter, n))
        .expect("admit")
}

fn headers(mapping: &HttpMapping, engine: &TestEngine, d: &Decision) -> HeaderMap {
    let mut h = HeaderMap::new();
    mapping.write_headers(d, engine.clock().now_utc(), &mut h);
    h
}

fn body(mapping: &HttpMapping, engine: &TestEngine, d: &Decision) -> Value {
    serde_json::from_str(
        &mapping
            .refusal_body(engine.catalog(), d)
            .expect("a refusal"),
    )
    .expect("the body is JSON")
}

#[test]
fn passing_decisions_carry_ratelimit_fields_and_the_warning_at_80_percent() {
    let (engine, _) = engine();
    let m = HttpMapping::new();

    let d = admit(&engine, "alice", "vector_search_count", 79);
    assert_eq!(m.status(engine.catalog(), &d), None);
    assert_eq!(m.refusal_body(engine.catalog(), &d), None);
    assert!(m.refusal(engine.catalog(), &d, start()).is_none());
    let h = headers(&m, &engine, &d);
    assert!(h.get(X_QUOTA_WARNING).is_none(), "79 % is Ok: {h:?}");
    assert_eq!(
        h[RATELIMIT_POLICY],
        format!("\"vector_search_count/month\";q=100;w={MARCH}")
    );
    assert_eq!(
        h[RATELIMIT],
        format!("\"vector_search_count/month\";r=21;t={TO_APRIL}")
    );
    assert!(h.get(http::header::RETRY_AFTER).is_none());

    let d = admit(&engine, "alice", "vector_search_count", 1);
    let h = headers(&m, &engine, &d);
    assert_eq!(h[X_QUOTA_WARNING], "approaching");
    assert_eq!(
        h[RATELIMIT],
        format!("\"vector_search_count/month\";r=20;t={TO_APRIL}")
    );
}

#[test]
fn an_exceeded_monthly_quota_is_402_with_retry_after_and_a_body() {
    let (engine, _) = engine();
    let m = HttpMapping::new();
    admit(&engine, "alice", "vector_search_count", 100);
    let d = admit(&engine, "alice", "vector_search_count", 1);
    assert!(!d.allowed);

    let r = m
        .refusal(engine.catalog(), &d, engine.clock().now_utc())
        .expect("refused");
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.headers()[http::header::CONTENT_TYPE], "application/json");
    assert_eq!(
        r.headers()[http::header::RETRY_AFTER],
        TO_APRIL.to_string().as_str()
    );
    assert_eq!(
        r.headers()[RATELIMIT],
        format!("\"vector_search_count/month\";r=0;t={TO_APRIL}")
    );
    assert!(r.headers().get(X_QUOTA_WARNING).is_none());
    let b: Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(
        b,
        json!({
            "error": "quota_exceeded",
            "meter": "vector_search_count",
            "window": "month",
            "scope": "subject",
            "used": 100,
            "max": 100,
            "requested": 1,
            "reset": "2026-04-01T00:00:00Z",
            "retry_after": TO_APRIL,
        })
    );
}

#[test]
fn a_short_window_is_a_rate_limit_429_and_the_threshold_is_configurable() {
    let (engine, clock) = engine();
    admit(&engine, "alice", "requests", 10);
    clock.advance(Duration::from_secs(30));
    let d = admit(&engine, "alice", "requests", 1);
    assert!(!d.allowed);
    let m = HttpMapping::new();
    assert_eq!(
        m.status(engine.catalog(), &d),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    let r = m.refusal(engine.catalog(), &d, clock.now_utc()).unwrap();
    // The usage sits in the bucket [12:00, 12:01): it leaves at 13:01.
    assert_eq!(r.headers()[http::header::RETRY_AFTER], "3630");
    assert_eq!(r.headers()[RATELIMIT_POLICY], "\"requests/1h\";q=10;w=3600");
    assert_eq!(r.headers()[RATELIMIT], "\"requests/1h\";r=0;t=3630");
    assert_eq!(body(&m, &engine, &d)["error"], "rate_limited");

    // With rate windows capped at 30 minutes, an hour is a quota.
    let m = HttpMapping::new().rate_window(Duration::from_secs(1_800));
    assert_eq!(
        m.status(engine.catalog(), &d),
        Some(StatusCode::PAYMENT_REQUIRED)
    );
    assert_eq!(body(&m, &engine, &d)["error"], "quota_exceeded");

    // And with a rate window of a month, the monthly quota is a rate.
    admit(&engine, "alice", "vector_search_count", 100);
    let d = admit(&engine, "alice", "vector_search_count", 1);
    let m = HttpMapping::new().rate_window(Duration::from_secs(31 * 86_400));
    assert_eq!(
        m.status(engine.catalog(), &d),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
}

#[test]
fn a_cost_cap_is_402_even_on_a_short_window_and_shows_money_exactly() {
    let (engine, _) = engine();
    // 100 tokens at $0.01 = $1.00; 60 more would make $1.60 > $1.50.
    assert!(admit(&engine, "alice", "llm_tokens_input", 100).allowed);
    let d = admit(&engine, "alice", "llm_tokens_input", 60);
    assert!(!d.allowed);
    let m = HttpMapping::new();
    assert_eq!(
        m.status(engine.catalog(), &d),
        Some(StatusCode::PAYMENT_REQUIRED)
    );
    let b = body(&m, &engine, &d);
    assert_eq!(b["error"], "quota_exceeded");
    assert_eq!(b["meter"], "cost");
    assert_eq!(b["used"], "1.000000");
    assert_eq!(b["max"], "1.500000");
    assert_eq!(b["requested"], "0.600000");
    assert_eq!(b["currency"], "USD");
    // Money quota units are the meter's smallest unit (micro-dollars).
    let h = headers(&m, &engine, &d);
    assert_eq!(h[RATELIMIT_POLICY], "\"cost/1m\";q=1500000;w=60");
    assert!(h[RATELIMIT]
        .to_str()
        .unwrap()
        .starts_with("\"cost/1m\";r=500000;t="));
}

#[test]
fn a_pool_limit_never_shows_the_pool_counts() {
    let (engine, _) = engine();
    // carol's searches fill most of the shared daily pool.
    assert!(admit(&engine, "carol", "vector_search_count", 100).allowed);
    assert!(admit(&engine, "bob", "vector_search_count", 45).allowed);
    let m = HttpMapping::new();

    // Passing: bob's own limit (45 of 100) is described, not the pool
    // (145 of 150), though the pool has less headroom; the warning still
    // comes from the pool.
    let d = admit(&engine, "bob", "vector_search_count", 1);
    assert!(d.allowed);
    let h = headers(&m, &engine, &d);
    assert_eq!(h[X_QUOTA_WARNING], "approaching");
    assert_eq!(
        h[RATELIMIT],
        format!("\"vector_search_count/month\";r=54;t={TO_APRIL}")
    );
    let text = format!("{h:?}");
    assert!(!text.contains("150") && !text.contains("146"), "{text}");

    // Refused by the pool: status and reset, but no counts.
    let d = admit(&engine, "bob", "vector_search_count", 10);
    assert!(!d.allowed);
    let r = m
        .refusal(engine.catalog(), &d, engine.clock().now_utc())
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    // The daily pool resets at midnight: 12 h.
    assert_eq!(r.headers()[http::header::RETRY_AFTER], "43200");
    assert!(r.headers().get(RATELIMIT).is_none());
    assert!(r.headers().get(RATELIMIT_POLICY).is_none());
    let b: Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(
        b,
        json!({
            "error": "quota_exceeded",
            "meter": "vector_search_count",
            "window": "day",
            "scope": "shared",
            "used": null,
            "max": null,
            "requested": 10,
            "reset": "2026-03-11T00:00:00Z",
            "retry_after": 43_200,
        })
    );
    assert!(!r.body().contains("carol") && !r.body().contains("acme"));
}

#[test]
fn when_waiting_cannot_help_there_is_no_retry_after() {
    let (engine, _) = engine();
    let m = HttpMapping::new();
    // Not available on the plan (max 0).
    let d = admit(&engine, "alice", "browser_seconds", 1);
    let r = m
        .refusal(engine.catalog(), &d, engine.clock().now_utc())
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(r.headers().get(http::header::RETRY_AFTER).is_none());
    let b: Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(b["retry_after"], Value::Null);
    assert_eq!(b["max"], 0);
    assert_eq!(
        r.headers()[RATELIMIT_POLICY],
        format!("\"browser_seconds/month\";q=0;w={MARCH}")
    );

    // Larger than the maximum: never fits.
    let d = admit(&engine, "alice", "vector_search_count", 101);
    let r = m
        .refusal(engine.catalog(), &d, engine.clock().now_utc())
        .unwrap();
    assert!(r.headers().get(http::header::RETRY_AFTER).is_none());
}

#[test]
fn a_model_outside_the_allowlist_is_403_without_limit_fields() {
    let (engine, _) = engine();
    engine
        .allocate(Allocation::new("dave", "plan_free").with_models(["haiku"]))
        .unwrap();
    let d = engine
        .admit(
            &Request::new("dave")
                .units("llm_tokens_input", 1)
                .model("opus"),
        )
        .unwrap();
    let m = HttpMapping::new();
    let r = m
        .refusal(engine.catalog(), &d, engine.clock().now_utc())
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let b: Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(b, json!({"error": "model_not_allowed", "model": "opus"}));
    assert!(r.headers().get(RATELIMIT).is_none());
}

#[test]
fn headers_can_be_switched_off() {
    let (engine, _) = engine();
    let d = admit(&engine, "alice", "vector_search_count", 90);
    let m = HttpMapping::new()
        .warning_header(false)
        .ratelimit_headers(false);
    assert!(headers(&m, &engine, &d).is_empty());
    let d = admit(&engine, "alice", "vector_search_count", 20);
    let h = headers(&m, &engine, &d);
    assert_eq!(h.len(), 1, "only Retry-After: {h:?}");
    assert!(h.get(http::header::RETRY_AFTER).is_some());
}

#[test]
fn policy_names_are_valid_structured_field_strings() {
    const METER: &str = "tokens \"fast\"\\ü";
    let config = CatalogConfig::default()
        .meter(Meter::count(METER))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(
            METER,
            Window::Calendar {
                period: Period::Day,
                utc_offset_secs: 9 * 3_600,
            },
            10u64,
        )))
        .plan(PlanConfig::new("life").limit(LimitConfig::new(METER, Window::Lifetime, 10u64)));
    let engine = Engine::with_clock(config.build().unwrap(), ManualClock::new(start()));
    engine.allocate(Allocation::new("a", "p")).unwrap();
    engine.allocate(Allocation::new("b", "life")).unwrap();
    let m = HttpMapping::new();
    let d = admit(&engine, "a", METER, 1);
    let h = headers(&m, &engine, &d);
    assert_eq!(
        h[RATELIMIT_POLICY],
        r#""tokens \"fast\"\\_/day+09:00";q=10;w=86400"#
    );
    // 12:00 UTC is 21:00 at +09:00: three hours to local midnight.
    assert_eq!(
        h[RATELIMIT],
        r#""tokens \"fast\"\\_/day+09:00";r=9;t=10800"#
    );

    // A lifetime limit has no window and nothing ever leaves it.
    let d = admit(&engine, "b", METER, 1);
    let h = headers(&m, &engine, &d);
    assert_eq!(h[RATELIMIT_POLICY], r#""tokens \"fast\"\\_/lifetime";q=10"#);
    assert_eq!(h[RATELIMIT], r#""tokens \"fast\"\\_/lifetime";r=9"#);
}
