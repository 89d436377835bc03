//! End-to-end scenarios on the Takos plans (seed 003): monthly quotas and their
//! rollover, unlimited-but-priced usage, the rolling 7-day runtime limit, cost
//! caps (seed 001), pools, model allowlists, month ends and the observer hook.
//! Time only moves through a `ManualClock`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use common::{takos_config, RUNTIME_MAX, RUNTIME_METER, RUNTIME_WINDOW};
use tollgate::{
    Allocation, Call, Catalog, CatalogConfig, Decision, DecisionEvent, Engine, LimitConfig,
    LimitState, ManualClock, MemoryStore, Meter, MeterUsage, Period, PlanConfig, PoolConfig,
    Refusal, Request, ScopeKey, Status, Window,
};

type TestEngine = Engine<MemoryStore, ManualClock>;

const TOKENS_IN: &str = "llm_tokens_input";

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn engine_with(config: CatalogConfig, start: DateTime<Utc>) -> (TestEngine, ManualClock) {
    let clock = ManualClock::new(start);
    let engine = Engine::with_clock(config.build().expect("catalog builds"), clock.clone());
    (engine, clock)
}

fn takos_engine(start: DateTime<Utc>) -> (TestEngine, ManualClock) {
    engine_with(takos_config(), start)
}

/// The usage row of `meter` (first limit on it) in `subject`'s report.
fn usage_of(engine: &TestEngine, subject: &str, meter: &str) -> MeterUsage {
    engine
        .usage(subject)
        .expect("usage")
        .meters
        .into_iter()
        .find(|m| &*m.meter == meter)
        .unwrap_or_else(|| panic!("{subject} has a limit on {meter}"))
}

/// The one limit state of `meter` for `subject`'s own scope.
fn subject_state<'d>(d: &'d Decision, subject: &str, meter: &str) -> &'d LimitState {
    d.limit(&ScopeKey::subject(subject), meter)
        .unwrap_or_else(|| panic!("decision touched {subject}/{meter}: {d:?}"))
}

fn secs(d: chrono::TimeDelta) -> Duration {
    d.to_std().expect("positive duration")
}

// 1 ─────────────────────────────────────────────────────────────────────────

#[test]
fn free_plan_monthly_input_tokens_warn_at_80_percent_and_refuse_past_20k() {
    let now = utc(2026, 3, 10, 12, 0, 0);
    let (engine, _clock) = takos_engine(now);
    engine.allocate(Allocation::new("a", "plan_free")).unwrap();
    let req = |n| Request::new("a").units(TOKENS_IN, n);

    let d = engine.admit(&req(15_999)).unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.status, Status::Ok);
    assert_eq!(d.reason, None);
    assert_eq!(d.retry_after, None);
    assert_eq!(d.cost, None, "plan_free has no cost meter");
    assert_eq!(d.limits.len(), 1, "only the named meter's limit is touched");
    let b = d.binding_limit().expect("binding limit");
    assert_eq!(&*b.meter, TOKENS_IN);
    assert_eq!(b.scope, ScopeKey::subject("a"));
    assert_eq!(b.window, Window::calendar(Period::Month));
    assert_eq!((b.requested, b.used), (15_999, 15_999));
    assert_eq!(b.max, Some(20_000));
    assert_eq!(b.remaining, Some(4_001));
    assert_eq!(b.status, Status::Ok);
    assert_eq!(b.period_start(), Some(utc(2026, 3, 1, 0, 0, 0)));
    assert_eq!(b.resets_at(), Some(utc(2026, 4, 1, 0, 0, 0)));

    // 16,000 of 20,000 is exactly 80 %: Warning.
    let d = engine.admit(&req(1)).unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.status, Status::Warning);
    assert_eq!(d.binding_limit().unwrap().used, 16_000);
    assert_eq!(d.binding_limit().unwrap().remaining, Some(4_000));

    // Up to exactly the maximum is still allowed.
    let d = engine.admit(&req(4_000)).unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.status, Status::Warning);
    assert_eq!(d.binding_limit().unwrap().used, 20_000);
    assert_eq!(d.binding_limit().unwrap().remaining, Some(0));

    // One more token: refused, nothing recorded.
    let d = engine.admit(&req(1)).unwrap();
    assert!(!d.allowed);
    assert!(!d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(d.reason, Some(Refusal::LimitExceeded));
    let b = d.binding_limit().expect("binding limit when refused");
    assert_eq!(&*b.meter, TOKENS_IN);
    assert_eq!(b.status, Status::Exceeded);
    assert_eq!(b.requested, 1);
    assert_eq!(b.used, 20_000, "a refused request is not counted");
    assert_eq!(b.max, Some(20_000));
    assert_eq!(b.remaining, Some(0));
    // Waiting helps at the 1st of next month, 00:00 UTC: 21.5 days from now.
    assert_eq!(
        d.retry_after,
        Some(secs(utc(2026, 4, 1, 0, 0, 0) - now)),
        "retry at the next period start"
    );
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(21 * 86_400 + 43_200))
    );

    // The counter still reads 20,000: through usage() and a zero check.
    let u = usage_of(&engine, "a", TOKENS_IN);
    assert_eq!(u.units, dec!(20000));
    assert_eq!(u.max, Some(dec!(20000)));
    assert_eq!(u.status, Status::Warning);
    let z = engine.check(&req(0)).unwrap();
    assert!(z.allowed, "a zero request is never refused");
    assert_eq!(
        z.status,
        Status::Warning,
        "a zero request is never Exceeded"
    );
    assert_eq!(z.binding_limit().unwrap().used, 20_000);
    // A check of one more token says the same as admit, and changes nothing.
    let c = engine.check(&req(1)).unwrap();
    assert!(!c.allowed && !c.recorded);
    assert_eq!(c.status, Status::Exceeded);
    assert_eq!(c.retry_after, d.retry_after);
    assert_eq!(usage_of(&engine, "a", TOKENS_IN).units, dec!(20000));
}

// 2 ─────────────────────────────────────────────────────────────────────────

#[test]
fn monthly_quota_resets_at_0000_utc_on_the_first_and_not_a_second_before() {
    let (engine, clock) = takos_engine(utc(2026, 3, 10, 12, 0, 0));
    engine.allocate(Allocation::new("a", "plan_free")).unwrap();
    let req = Request::new("a").units(TOKENS_IN, 500);
    assert!(
        engine
            .admit(&Request::new("a").units(TOKENS_IN, 20_000))
            .unwrap()
            .allowed
    );

    // One second before the rollover: still full.
    clock.set(utc(2026, 3, 31, 23, 59, 59));
    let d = engine.admit(&req).unwrap();
    assert!(!d.allowed && !d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(usage_of(&engine, "a", TOKENS_IN).units, dec!(20000));

    // At 00:00:00 on the 1st the same request is allowed, counted from 0.
    clock.set(utc(2026, 4, 1, 0, 0, 0));
    let u = usage_of(&engine, "a", TOKENS_IN);
    assert_eq!(u.units, Decimal::ZERO);
    assert_eq!(u.period_start, Some(utc(2026, 4, 1, 0, 0, 0)));
    assert_eq!(u.resets_at, Some(utc(2026, 5, 1, 0, 0, 0)));
    let d = engine.admit(&req).unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.status, Status::Ok);
    let s = subject_state(&d, "a", TOKENS_IN);
    assert_eq!(s.used, 500);
    assert_eq!(s.remaining, Some(19_500));
    assert_eq!(s.period_start(), Some(utc(2026, 4, 1, 0, 0, 0)));
    assert_eq!(s.resets_at(), Some(utc(2026, 5, 1, 0, 0, 0)));
}

// 3 ─────────────────────────────────────────────────────────────────────────

#[test]
fn zero_maximum_means_not_available_but_a_zero_request_is_ok() {
    let (engine, _clock) = takos_engine(utc(2026, 3, 10, 12, 0, 0));
    engine.allocate(Allocation::new("a", "plan_free")).unwrap();

    for n in [1, 60, 10_000] {
        let d = engine
            .admit(&Request::new("a").units("browser_seconds", n))
            .unwrap();
        assert!(!d.allowed && !d.recorded, "{n} browser seconds on free");
        assert_eq!(d.status, Status::Exceeded);
        assert_eq!(d.reason, Some(Refusal::LimitExceeded));
        let b = d.binding_limit().unwrap();
        assert_eq!(&*b.meter, "browser_seconds");
        assert_eq!((b.used, b.max, b.remaining), (0, Some(0), Some(0)));
        assert_eq!(d.retry_after, None, "waiting never makes 0 available");
    }

    let d = engine
        .admit(&Request::new("a").units("browser_seconds", 0))
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Ok);
    assert_eq!(d.reason, None);
    let d = engine
        .check(&Request::new("a").units("browser_seconds", 0))
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Ok);
    assert_eq!(
        usage_of(&engine, "a", "browser_seconds").units,
        Decimal::ZERO
    );

    // Not available on free, 120 s on plus.
    engine.allocate(Allocation::new("p", "plan_plus")).unwrap();
    let d = engine
        .admit(&Request::new("p").units("browser_seconds", 120))
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Warning);
}

// 4 ─────────────────────────────────────────────────────────────────────────

#[test]
fn pay_as_you_go_is_unlimited_and_priced_exactly() {
    let now = utc(2026, 3, 10, 12, 0, 0);
    let (engine, _clock) = takos_engine(now);
    engine.allocate(Allocation::new("g", "plan_payg")).unwrap();

    // 1,000 input tokens at 3 cents: $30.00 exactly.
    let d = engine
        .admit(&Request::new("g").units(TOKENS_IN, 1_000))
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.status, Status::Ok);
    let cost = d.cost.clone().expect("payg has a cost meter");
    assert_eq!(cost.amount, dec!(30.00));
    assert_eq!(&*cost.currency, "USD");
    assert!(d.unpriced.is_empty());
    let s = subject_state(&d, "g", TOKENS_IN);
    assert_eq!((s.max, s.remaining), (None, None));

    // Large amounts are always allowed; far past any free quota.
    for _ in 0..3 {
        let d = engine
            .admit(&Request::new("g").units(TOKENS_IN, 100_000_000))
            .unwrap();
        assert!(d.allowed && d.recorded);
        assert_eq!(d.status, Status::Ok);
        assert_eq!(d.cost.unwrap().amount, dec!(3000000));
    }

    // Mixed meters sum exactly:
    // 200 out × 0.15 + 7 emb × 0.01 + 3 exec × 0.05 + 1 GB-month × 23 + 9 queue × 0.01
    // = 30 + 0.07 + 0.15 + 23 + 0.09 = 53.31
    let d = engine
        .admit(
            &Request::new("g")
                .units("llm_tokens_output", 200)
                .units("embedding_count", 7)
                .units("exec_seconds", 3)
                .units("r2_storage_gb_month", 1)
                .units("queue_messages", 9),
        )
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(53.31));
    assert!(d.unpriced.is_empty());
    // A charge below the cost meter's smallest unit rounds up, never to zero.
    let d = engine
        .admit(&Request::new("g").money("cost", dec!(0.0000001), "USD"))
        .unwrap();
    // plan_payg has no limit on `cost`, so no counter holds the money itself.
    assert!(d.allowed && !d.recorded);
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(0.000001));
    // Naming a meter twice adds the amounts (and the cost).
    let d = engine
        .admit(
            &Request::new("g")
                .units("vector_search_count", 1)
                .units("vector_search_count", 2),
        )
        .unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(0.06));
    assert_eq!(subject_state(&d, "g", "vector_search_count").requested, 3);

    // usage(): units and cost per meter for the current month.
    let report = engine.usage("g").unwrap();
    assert_eq!(report.subject, "g");
    assert_eq!(report.plan, "plan_payg");
    assert_eq!(report.at, now);
    let row = |m: &str| {
        report
            .meters
            .iter()
            .find(|r| &*r.meter == m)
            .unwrap_or_else(|| panic!("row for {m}"))
            .clone()
    };
    let tokens = row(TOKENS_IN);
    assert_eq!(tokens.units, dec!(300001000));
    assert_eq!(tokens.max, None);
    assert_eq!(tokens.status, Status::Ok);
    assert_eq!(tokens.cost.as_ref().unwrap().amount, dec!(9000030));
    assert_eq!(&*tokens.cost.as_ref().unwrap().currency, "USD");
    assert_eq!(tokens.window, Window::calendar(Period::Month));
    assert_eq!(tokens.period_start, Some(utc(2026, 3, 1, 0, 0, 0)));
    assert_eq!(tokens.resets_at, Some(utc(2026, 4, 1, 0, 0, 0)));
    assert_eq!(row("llm_tokens_output").cost.unwrap().amount, dec!(30));
    assert_eq!(row("r2_storage_gb_month").cost.unwrap().amount, dec!(23));
    assert_eq!(row("vector_search_count").units, dec!(3));
    assert_eq!(row("vector_search_count").cost.unwrap().amount, dec!(0.06));
    // Untouched meters read zero at zero cost; the runtime meter has no price.
    assert_eq!(row("browser_seconds").units, Decimal::ZERO);
    assert_eq!(row("browser_seconds").cost.unwrap().amount, Decimal::ZERO);
    assert_eq!(row(RUNTIME_METER).cost, None);
    for r in &report.meters {
        if r.window == Window::calendar(Period::Month) {
            assert_eq!(
                r.period_start,
                Some(utc(2026, 3, 1, 0, 0, 0)),
                "{}",
                r.meter
            );
        }
    }
}

// 5 ─────────────────────────────────────────────────────────────────────────

#[test]
fn rolling_seven_day_runtime_frees_usage_day_by_day_never_early() {
    // Monday 2 March 2026, 10:30 UTC: inside the hourly bucket [10:00, 11:00).
    let t0 = utc(2026, 3, 2, 10, 30, 0);
    let day = chrono::Duration::days(1);
    let (engine, clock) = takos_engine(t0);
    engine.allocate(Allocation::new("r", "plan_free")).unwrap();
    let run = |n| Request::new("r").units(RUNTIME_METER, n);
    let used = || usage_of(&engine, "r", RUNTIME_METER).units;

    // 5,000 s on each of days 0, 1, 2 and 3,000 s on day 3: 18,000 in all.
    for (k, n) in [(0, 5_000), (1, 5_000), (2, 5_000), (3, 3_000)] {
        clock.set(t0 + day * k);
        let d = engine.admit(&run(n)).unwrap();
        assert!(d.allowed && d.recorded, "day {k}");
        let s = subject_state(&d, "r", RUNTIME_METER);
        assert_eq!(s.window, RUNTIME_WINDOW);
        assert_eq!(s.max, Some(RUNTIME_MAX));
        assert_eq!(s.period_start(), Some(t0 + day * k - day * 7));
    }
    assert_eq!(used(), dec!(18000));
    let u = usage_of(&engine, "r", RUNTIME_METER);
    assert_eq!(u.status, Status::Warning);
    // The oldest usage (day 0, 10:30) leaves at the first hourly boundary at
    // or after 10:30 + 7 days: day 7, 11:00.
    let day0_leaves = utc(2026, 3, 9, 11, 0, 0);
    let day1_leaves = day0_leaves + day;
    assert_eq!(u.resets_at, Some(day0_leaves));

    // At the limit: one more second is refused, and retry_after points at
    // the moment day 0 leaves.
    let now = clock.now_utc();
    let d = engine.admit(&run(1)).unwrap();
    assert!(!d.allowed && !d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(&*d.binding_limit().unwrap().meter, RUNTIME_METER);
    assert_eq!(d.binding_limit().unwrap().used, 18_000);
    assert_eq!(d.retry_after, Some(secs(day0_leaves - now)));
    // 6,000 s needs day 0 and day 1 to leave.
    let d = engine.admit(&run(6_000)).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(secs(day1_leaves - now)));
    // More than the maximum: waiting never helps.
    let d = engine.admit(&run(RUNTIME_MAX + 1)).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, None);

    // Day by day: nothing leaves before 7 days have passed.
    for k in 4..=6 {
        clock.set(t0 + day * k);
        assert_eq!(used(), dec!(18000), "day {k}");
        assert!(!engine.check(&run(1)).unwrap().allowed, "day {k}");
    }
    clock.set(t0 + day * 7 - chrono::Duration::seconds(1));
    assert_eq!(used(), dec!(18000), "never early");
    clock.set(day0_leaves - chrono::Duration::seconds(1));
    assert_eq!(
        used(),
        dec!(18000),
        "still inside the bucket that holds day 0"
    );
    // At most one hourly bucket late: gone by day 7, 11:00.
    clock.set(day0_leaves);
    assert_eq!(used(), dec!(13000), "day 0's 5,000 s have left");
    assert_eq!(
        usage_of(&engine, "r", RUNTIME_METER).resets_at,
        Some(day1_leaves)
    );
    let d = engine.admit(&run(5_000)).unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(subject_state(&d, "r", RUNTIME_METER).used, 18_000);
    assert!(!engine.check(&run(1)).unwrap().allowed);

    clock.set(day1_leaves - chrono::Duration::seconds(1));
    assert_eq!(used(), dec!(18000));
    clock.set(day1_leaves);
    assert_eq!(used(), dec!(13000), "day 1 left");
    clock.set(day1_leaves + day);
    assert_eq!(used(), dec!(8000), "day 2 left");
    clock.set(day1_leaves + day * 2);
    assert_eq!(used(), dec!(5000), "day 3 left; day 7's 5,000 s remain");
    // Day 7's usage went in at 11:00, in the bucket [11:00, 12:00).
    clock.set(day0_leaves + day * 7 + chrono::Duration::hours(1));
    assert_eq!(used(), Decimal::ZERO, "everything left");
    assert_eq!(usage_of(&engine, "r", RUNTIME_METER).resets_at, None);
}

#[test]
fn rolling_usage_on_a_bucket_boundary_leaves_within_one_bucket_after_seven_days() {
    // Recorded exactly on an hour boundary.
    let t0 = utc(2026, 3, 2, 10, 0, 0);
    let span = chrono::Duration::days(7);
    let bucket = chrono::Duration::hours(1);
    let (engine, clock) = takos_engine(t0);
    engine.allocate(Allocation::new("r", "plan_plus")).unwrap();
    let d = engine
        .admit(&Request::new("r").units(RUNTIME_METER, RUNTIME_MAX))
        .unwrap();
    assert!(d.allowed);
    let used = || usage_of(&engine, "r", RUNTIME_METER).units;

    clock.set(t0 + span - chrono::Duration::milliseconds(1));
    assert_eq!(used(), dec!(18000), "never before 7 days");
    let resets = usage_of(&engine, "r", RUNTIME_METER)
        .resets_at
        .expect("usage to leave");
    assert!(
        resets >= t0 + span && resets <= t0 + span + bucket,
        "{resets}"
    );
    clock.set(t0 + span + bucket);
    assert_eq!(used(), Decimal::ZERO, "at most one bucket late");
}

// 6 ─────────────────────────────────────────────────────────────────────────

#[test]
fn monthly_cost_cap_trips_before_unlimited_tokens() {
    let now = utc(2026, 3, 10, 12, 0, 0);
    let (engine, _clock) = takos_engine(now);
    let cap = LimitConfig::new("cost", Window::calendar(Period::Month), dec!(5));
    engine
        .allocate(Allocation::new("g", "plan_payg").with_override(cap))
        .unwrap();
    let tokens = |n| Request::new("g").units(TOKENS_IN, n);

    // 166 tokens × $0.03 = $4.98.
    let d = engine.admit(&tokens(100)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Ok);
    let d = engine.admit(&tokens(66)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Warning, "$4.98 of $5 is past 80 %");
    let c = subject_state(&d, "g", "cost");
    assert_eq!(c.used, 4_980_000, "micro-dollars");
    assert_eq!(c.max, Some(5_000_000));

    // One more token would make $5.01: refused although tokens are unlimited.
    let d = engine.admit(&tokens(1)).unwrap();
    assert!(!d.allowed && !d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(d.reason, Some(Refusal::LimitExceeded));
    let b = d.binding_limit().unwrap();
    assert_eq!(&*b.meter, "cost", "the cost cap binds");
    assert_eq!(b.window, Window::calendar(Period::Month));
    assert_eq!(b.requested, 30_000);
    assert_eq!(b.remaining, Some(20_000));
    assert_eq!(subject_state(&d, "g", TOKENS_IN).status, Status::Ok);
    assert_eq!(subject_state(&d, "g", TOKENS_IN).max, None);
    assert_eq!(d.retry_after, Some(secs(utc(2026, 4, 1, 0, 0, 0) - now)));
    assert_eq!(usage_of(&engine, "g", TOKENS_IN).units, dec!(166));
    let cost_row = usage_of(&engine, "g", "cost");
    assert_eq!(cost_row.units, dec!(4.98));
    assert_eq!(cost_row.max, Some(dec!(5)));
    assert_eq!(cost_row.cost, None, "the cost meter has no unit price");

    // Any priced meter is governed by the same cap (every endpoint, seed 001).
    let d = engine
        .admit(&Request::new("g").units("web_search_count", 1))
        .unwrap();
    assert!(!d.allowed, "$0.05 more is past the cap");
    assert_eq!(&*d.binding_limit().unwrap().meter, "cost");
    // Exactly up to the cap is allowed: 2 cents of host-priced money.
    let d = engine
        .admit(&Request::new("g").money("cost", dec!(0.02), "USD"))
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(subject_state(&d, "g", "cost").used, 5_000_000);
    assert_eq!(d.cost.unwrap().amount, dec!(0.02));
    assert!(!engine.check(&tokens(1)).unwrap().allowed);
    // A zero request at the cap is fine.
    assert!(engine.check(&tokens(0)).unwrap().allowed);
}

#[test]
fn token_cap_trips_before_a_generous_cost_cap() {
    let now = utc(2026, 3, 10, 12, 0, 0);
    let (engine, _clock) = takos_engine(now);
    // Replace payg's unlimited input tokens with 1,000 a month; cap cost at $100.
    let month = Window::calendar(Period::Month);
    engine
        .allocate(
            Allocation::new("g", "plan_payg")
                .with_override(LimitConfig::new(TOKENS_IN, month, 1_000u64))
                .with_override(LimitConfig::new("cost", month, dec!(100))),
        )
        .unwrap();

    let d = engine
        .admit(&Request::new("g").units(TOKENS_IN, 1_000))
        .unwrap();
    assert!(d.allowed);
    assert_eq!(d.cost.clone().unwrap().amount, dec!(30));
    assert_eq!(
        d.limits.len(),
        2,
        "the override replaced the plan's token limit rather than adding one"
    );

    let d = engine
        .admit(&Request::new("g").units(TOKENS_IN, 1))
        .unwrap();
    assert!(!d.allowed && !d.recorded);
    let b = d.binding_limit().unwrap();
    assert_eq!(&*b.meter, TOKENS_IN, "the token cap binds");
    assert_eq!((b.used, b.max), (1_000, Some(1_000)));
    let c = subject_state(&d, "g", "cost");
    assert_eq!(c.status, Status::Ok, "$30.03 of $100 is fine");
    assert_eq!(c.used, 30_000_000);
    assert_eq!(usage_of(&engine, "g", "cost").units, dec!(30));

    // Other priced meters still spend against the cost cap.
    let d = engine
        .admit(&Request::new("g").units("exec_seconds", 1_000))
        .unwrap();
    assert!(d.allowed, "$50 more makes $80 of $100");
    assert_eq!(subject_state(&d, "g", "cost").status, Status::Warning);
}

// 7 ─────────────────────────────────────────────────────────────────────────

#[test]
fn unpriced_meters_cost_nothing_and_are_listed() {
    let (engine, _clock) = takos_engine(utc(2026, 3, 10, 12, 0, 0));
    engine.allocate(Allocation::new("g", "plan_payg")).unwrap();

    // agent_runtime_seconds has a limit but no price on payg.
    let d = engine
        .admit(
            &Request::new("g")
                .units(TOKENS_IN, 100)
                .units(RUNTIME_METER, 600),
        )
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(3));
    assert_eq!(
        d.unpriced.iter().map(|m| &**m).collect::<Vec<_>>(),
        [RUNTIME_METER]
    );
    assert_eq!(subject_state(&d, "g", RUNTIME_METER).used, 600);

    let d = engine
        .admit(&Request::new("g").units(RUNTIME_METER, 60))
        .unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, Decimal::ZERO);
    assert_eq!(&*d.cost.unwrap().currency, "USD");
    assert_eq!(d.unpriced.len(), 1);
    assert_eq!(&*d.unpriced[0], RUNTIME_METER);
    assert_eq!(usage_of(&engine, "g", RUNTIME_METER).cost, None);
    assert_eq!(usage_of(&engine, "g", RUNTIME_METER).units, dec!(660));

    // A plan without a cost meter prices nothing and reports nothing unpriced.
    engine.allocate(Allocation::new("f", "plan_free")).unwrap();
    let d = engine
        .admit(
            &Request::new("f")
                .units(TOKENS_IN, 10)
                .units(RUNTIME_METER, 1),
        )
        .unwrap();
    assert_eq!(d.cost, None);
    assert!(d.unpriced.is_empty());
}

// 8 ─────────────────────────────────────────────────────────────────────────

fn pooled_config() -> CatalogConfig {
    takos_config()
        .pool(
            PoolConfig::new("model:sonnet")
                .for_model("sonnet")
                .limit(LimitConfig::new(
                    TOKENS_IN,
                    Window::calendar(Period::Day),
                    300_000u64,
                )),
        )
        .pool(PoolConfig::new("account:acme").limit(LimitConfig::new(
            TOKENS_IN,
            Window::calendar(Period::Month),
            300u64,
        )))
}

#[test]
fn per_model_daily_budget_is_shared_by_agents_naming_the_model() {
    let now = utc(2026, 3, 10, 12, 0, 0);
    let (engine, clock) = engine_with(pooled_config(), now);
    engine.allocate(Allocation::new("a", "plan_plus")).unwrap();
    engine.allocate(Allocation::new("b", "plan_plus")).unwrap();
    let pool = ScopeKey::pool("model:sonnet");
    let sonnet = |s, n| Request::new(s).units(TOKENS_IN, n).model("sonnet");

    let d = engine.admit(&sonnet("a", 200_000)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limit(&pool, TOKENS_IN).unwrap().used, 200_000);

    // b has 250k of its own, but the model has only 100k left today.
    let d = engine.admit(&sonnet("b", 150_000)).unwrap();
    assert!(!d.allowed && !d.recorded);
    let b = d.binding_limit().unwrap();
    assert_eq!(b.scope, pool, "the model pool binds");
    assert_eq!((b.used, b.remaining), (200_000, Some(100_000)));
    assert_eq!(subject_state(&d, "b", TOKENS_IN).status, Status::Ok);
    assert_eq!(
        d.retry_after,
        Some(secs(utc(2026, 3, 11, 0, 0, 0) - now)),
        "the daily pool resets at midnight UTC"
    );
    assert_eq!(
        usage_of(&engine, "b", TOKENS_IN).units,
        Decimal::ZERO,
        "all or nothing: b's own counter untouched"
    );

    let d = engine.admit(&sonnet("b", 100_000)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limit(&pool, TOKENS_IN).unwrap().used, 300_000);
    assert_eq!(d.limit(&pool, TOKENS_IN).unwrap().remaining, Some(0));
    assert!(!engine.admit(&sonnet("a", 1)).unwrap().allowed);
    assert!(!engine.admit(&sonnet("b", 1)).unwrap().allowed);
    // Both a's monthly quota (260k > 250k) and the daily pool are exceeded:
    // the binding limit is the one that frees up last, the monthly one.
    let d = engine.admit(&sonnet("a", 60_000)).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.limit(&pool, TOKENS_IN).unwrap().status, Status::Exceeded);
    let b = d.binding_limit().unwrap();
    assert_eq!(b.scope, ScopeKey::subject("a"));
    assert_eq!(b.status, Status::Exceeded);
    assert_eq!(d.retry_after, Some(secs(utc(2026, 4, 1, 0, 0, 0) - now)));

    // Without the model the request does not draw on the model's pool.
    let d = engine
        .admit(&Request::new("b").units(TOKENS_IN, 1_000))
        .unwrap();
    assert!(d.allowed);
    assert!(d.limit(&pool, TOKENS_IN).is_none());
    assert!(d.limits.iter().all(|l| l.scope == ScopeKey::subject("b")));
    // Another model does not either.
    let d = engine
        .admit(&Request::new("b").units(TOKENS_IN, 1_000).model("haiku"))
        .unwrap();
    assert!(d.allowed);
    assert!(d.limit(&pool, TOKENS_IN).is_none());
    let z = engine.check(&sonnet("a", 0)).unwrap();
    assert_eq!(z.limit(&pool, TOKENS_IN).unwrap().used, 300_000);
    assert_eq!(usage_of(&engine, "b", TOKENS_IN).units, dec!(102000));

    // Next day the pool is fresh.
    clock.set(utc(2026, 3, 11, 0, 0, 0));
    let d = engine.admit(&sonnet("b", 1)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limit(&pool, TOKENS_IN).unwrap().used, 1);
}

#[test]
fn account_pool_is_shared_by_its_members_all_or_nothing() {
    let (engine, _clock) = engine_with(pooled_config(), utc(2026, 3, 10, 12, 0, 0));
    engine
        .allocate(Allocation::new("c", "plan_plus").with_pool("account:acme"))
        .unwrap();
    engine
        .allocate(Allocation::new("d", "plan_plus").with_pool("account:acme"))
        .unwrap();
    engine.allocate(Allocation::new("x", "plan_plus")).unwrap();
    let acme = ScopeKey::pool("account:acme");
    let req = |s, n| Request::new(s).units(TOKENS_IN, n);

    let d = engine.admit(&req("c", 200)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limit(&acme, TOKENS_IN).unwrap().used, 200);
    assert_eq!(subject_state(&d, "c", TOKENS_IN).used, 200);

    let d = engine.admit(&req("d", 101)).unwrap();
    assert!(!d.allowed && !d.recorded);
    assert_eq!(d.binding_limit().unwrap().scope, acme);
    assert_eq!(usage_of(&engine, "d", TOKENS_IN).units, Decimal::ZERO);

    let d = engine.admit(&req("d", 100)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limit(&acme, TOKENS_IN).unwrap().used, 300);
    assert_eq!(d.status, Status::Warning, "the pool is full");
    assert_eq!(d.binding_limit().unwrap().scope, acme, "least headroom");

    // A subject outside the account is not limited by it.
    let d = engine.admit(&req("x", 5_000)).unwrap();
    assert!(d.allowed);
    assert!(d.limit(&acme, TOKENS_IN).is_none());
}

#[test]
fn model_allowlist_refuses_other_models_and_record_still_counts_them() {
    let (engine, _clock) = engine_with(pooled_config(), utc(2026, 3, 10, 12, 0, 0));
    engine
        .allocate(Allocation::new("e", "plan_plus").with_models(["haiku"]))
        .unwrap();
    engine.allocate(Allocation::new("a", "plan_plus")).unwrap();

    let d = engine
        .admit(&Request::new("e").units(TOKENS_IN, 10).model("sonnet"))
        .unwrap();
    assert!(!d.allowed);
    assert!(!d.recorded);
    assert_eq!(
        d.reason,
        Some(Refusal::ModelNotAllowed {
            model: "sonnet".to_owned()
        })
    );
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(usage_of(&engine, "e", TOKENS_IN).units, Decimal::ZERO);
    let z = engine
        .check(&Request::new("a").units(TOKENS_IN, 0).model("sonnet"))
        .unwrap();
    assert_eq!(
        z.limit(&ScopeKey::pool("model:sonnet"), TOKENS_IN)
            .unwrap()
            .used,
        0,
        "the refused request did not draw on the model pool"
    );
    // record() of a disallowed model: the work happened, so the usage is
    // recorded (on the subject and the model's pool), and the decision still
    // reports the refusal so the host can stop.
    let d = engine
        .record(&Request::new("e").units(TOKENS_IN, 10).model("sonnet"))
        .unwrap();
    assert!(!d.allowed && d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(
        d.reason,
        Some(Refusal::ModelNotAllowed {
            model: "sonnet".to_owned()
        })
    );
    assert_eq!(usage_of(&engine, "e", TOKENS_IN).units, dec!(10));
    let z = engine
        .check(&Request::new("a").units(TOKENS_IN, 0).model("sonnet"))
        .unwrap();
    assert_eq!(
        z.limit(&ScopeKey::pool("model:sonnet"), TOKENS_IN)
            .unwrap()
            .used,
        10
    );

    let d = engine
        .admit(&Request::new("e").units(TOKENS_IN, 10).model("haiku"))
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(d.reason, None);
    // A request naming no model is not a model call.
    let d = engine
        .admit(&Request::new("e").units(TOKENS_IN, 10))
        .unwrap();
    assert!(d.allowed);
    assert_eq!(usage_of(&engine, "e", TOKENS_IN).units, dec!(30));
}

// 9 ─────────────────────────────────────────────────────────────────────────

#[test]
fn month_ends_reset_at_exact_utc_midnights() {
    let (engine, clock) = takos_engine(utc(2027, 1, 31, 23, 59, 59));
    engine.allocate(Allocation::new("a", "plan_free")).unwrap();
    let req = Request::new("a").units(TOKENS_IN, 100);

    // (moment of use, period start, reset)
    let cases = [
        (
            utc(2027, 1, 31, 23, 59, 59),
            utc(2027, 1, 1, 0, 0, 0),
            utc(2027, 2, 1, 0, 0, 0),
        ),
        (
            utc(2027, 2, 28, 12, 0, 0),
            utc(2027, 2, 1, 0, 0, 0),
            utc(2027, 3, 1, 0, 0, 0),
        ),
        (
            utc(2027, 4, 30, 23, 0, 0),
            utc(2027, 4, 1, 0, 0, 0),
            utc(2027, 5, 1, 0, 0, 0),
        ),
        (
            utc(2027, 12, 31, 23, 59, 59),
            utc(2027, 12, 1, 0, 0, 0),
            utc(2028, 1, 1, 0, 0, 0),
        ),
        (
            utc(2028, 2, 29, 18, 0, 0),
            utc(2028, 2, 1, 0, 0, 0),
            utc(2028, 3, 1, 0, 0, 0),
        ),
    ];
    for (at, start, reset) in cases {
        clock.set(at);
        let d = engine.admit(&req).unwrap();
        assert!(d.allowed, "{at}");
        let s = subject_state(&d, "a", TOKENS_IN);
        assert_eq!(s.used, 100, "{at}: a fresh month");
        assert_eq!(s.period_start(), Some(start), "{at}");
        assert_eq!(s.resets_at(), Some(reset), "{at}");
        clock.set(reset - chrono::Duration::seconds(1));
        assert_eq!(usage_of(&engine, "a", TOKENS_IN).units, dec!(100), "{at}");
        clock.set(reset);
        let u = usage_of(&engine, "a", TOKENS_IN);
        assert_eq!(u.units, Decimal::ZERO, "reset at {reset}");
        assert_eq!(u.period_start, Some(reset));
    }
    // After the leap-year rollover the next reset is 1 April.
    clock.set(utc(2028, 3, 1, 0, 0, 0));
    assert_eq!(
        usage_of(&engine, "a", TOKENS_IN).resets_at,
        Some(utc(2028, 4, 1, 0, 0, 0))
    );
}

const JST_TOML: &str = r#"
[[meters]]
id = "llm_tokens_input"
unit = "count"

[[plans]]
id = "plan_jst"

[[plans.limits]]
meter = "llm_tokens_input"
max = 1000
window = { calendar = { period = "month", utc_offset = "+09:00" } }
"#;

#[test]
fn calendar_month_in_utc_plus_nine_starts_at_1500_utc_the_day_before() {
    let jst = Window::Calendar {
        period: Period::Month,
        utc_offset_secs: 9 * 3600,
    };
    // The same plan from TOML (`utc_offset = "+09:00"`) and from code.
    let from_toml: Catalog = toml::from_str(JST_TOML).expect("toml catalog");
    assert_eq!(
        from_toml.plan("plan_jst").unwrap().limits()[0].window(),
        jst
    );
    let from_code = CatalogConfig::default()
        .meter(Meter::count(TOKENS_IN))
        .plan(PlanConfig::new("plan_jst").limit(LimitConfig::new(TOKENS_IN, jst, 1_000u64)))
        .build()
        .unwrap();
    assert_eq!(from_toml, from_code);

    for catalog in [from_toml, from_code] {
        // 2026-03-31 14:59:59 UTC is 23:59:59 on 31 March in UTC+9.
        let clock = ManualClock::new(utc(2026, 3, 31, 14, 59, 59));
        let engine = Engine::with_clock(catalog, clock.clone());
        engine.allocate(Allocation::new("j", "plan_jst")).unwrap();
        let d = engine
            .admit(&Request::new("j").units(TOKENS_IN, 1_000))
            .unwrap();
        assert!(d.allowed);
        let s = subject_state(&d, "j", TOKENS_IN);
        assert_eq!(s.window, jst);
        assert_eq!(s.period_start(), Some(utc(2026, 2, 28, 15, 0, 0)));
        assert_eq!(s.resets_at(), Some(utc(2026, 3, 31, 15, 0, 0)));
        let d = engine
            .admit(&Request::new("j").units(TOKENS_IN, 1))
            .unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_secs(1)));

        // 15:00 UTC is midnight on 1 April in UTC+9: a new month.
        clock.set(utc(2026, 3, 31, 15, 0, 0));
        let u = engine.usage("j").unwrap().meters.remove(0);
        assert_eq!(u.units, Decimal::ZERO);
        assert_eq!(u.period_start, Some(utc(2026, 3, 31, 15, 0, 0)));
        assert_eq!(u.resets_at, Some(utc(2026, 4, 30, 15, 0, 0)));
        assert!(
            engine
                .admit(&Request::new("j").units(TOKENS_IN, 1))
                .unwrap()
                .allowed
        );

        // Leap year: March begins in UTC+9 at 2028-02-29 15:00 UTC.
        clock.set(utc(2028, 2, 29, 14, 59, 59));
        let u = engine.usage("j").unwrap().meters.remove(0);
        assert_eq!(u.period_start, Some(utc(2028, 1, 31, 15, 0, 0)));
        assert_eq!(u.resets_at, Some(utc(2028, 2, 29, 15, 0, 0)));
        // New year in UTC+9: 2027-12-31 15:00 UTC.
        clock.set(utc(2027, 12, 31, 15, 0, 0));
        let u = engine.usage("j").unwrap().meters.remove(0);
        assert_eq!(u.period_start, Some(utc(2027, 12, 31, 15, 0, 0)));
        assert_eq!(u.resets_at, Some(utc(2028, 1, 31, 15, 0, 0)));
    }
}

// 10 ────────────────────────────────────────────────────────────────────────

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    call: Call,
    subject: String,
    model: Option<String>,
    at: DateTime<Utc>,
    allowed: bool,
    status: Status,
    reason: Option<Refusal>,
}

#[test]
fn observer_sees_every_decision_and_each_rejection_with_its_reason() {
    let start = utc(2026, 3, 10, 12, 0, 0);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let clock = ManualClock::new(start);
    let engine = Engine::with_clock(takos_config().build().unwrap(), clock.clone()).with_observer(
        move |e: &DecisionEvent<'_>| {
            sink.lock().unwrap().push(Seen {
                call: e.call,
                subject: e.subject.to_owned(),
                model: e.model.map(str::to_owned),
                at: e.at,
                allowed: e.decision.allowed,
                status: e.decision.status,
                reason: e.decision.reason.clone(),
            });
        },
    );
    engine
        .allocate(Allocation::new("a", "plan_free").with_models(["haiku"]))
        .unwrap();

    let tokens = |n| Request::new("a").units(TOKENS_IN, n);
    assert!(engine.admit(&tokens(19_000)).unwrap().allowed);
    assert!(!engine.admit(&tokens(2_000)).unwrap().allowed);
    clock.advance(Duration::from_secs(300));
    assert!(!engine.check(&tokens(1_001)).unwrap().allowed);
    assert!(!engine.admit(&tokens(1).model("sonnet")).unwrap().allowed);
    assert!(!engine.record(&tokens(1_500)).unwrap().allowed);
    assert!(engine.check(&tokens(0)).unwrap().allowed);
    // usage() and bad input are not decisions.
    engine.usage("a").unwrap();
    assert!(engine.admit(&Request::new("a").units("nope", 1)).is_err());
    assert!(engine
        .admit(&Request::new("nobody").units(TOKENS_IN, 1))
        .is_err());

    let later = start + chrono::Duration::minutes(5);
    let seen = seen.lock().unwrap().clone();
    let calls: Vec<Call> = seen.iter().map(|s| s.call).collect();
    assert_eq!(
        calls,
        [
            Call::Admit,
            Call::Admit,
            Call::Check,
            Call::Admit,
            Call::Record,
            Call::Check
        ],
        "one event per decision, in order: {seen:#?}"
    );
    assert!(seen.iter().all(|s| s.subject == "a"));
    assert_eq!(seen[0].at, start);
    assert_eq!(seen[1].at, start);
    assert!(seen[2..].iter().all(|s| s.at == later));
    assert_eq!(seen[3].model.as_deref(), Some("sonnet"));
    assert_eq!(seen[0].model, None);

    let rejections: Vec<(Call, Status, Option<Refusal>)> = seen
        .iter()
        .filter(|s| !s.allowed)
        .map(|s| (s.call, s.status, s.reason.clone()))
        .collect();
    assert_eq!(
        rejections,
        [
            (Call::Admit, Status::Exceeded, Some(Refusal::LimitExceeded)),
            (Call::Check, Status::Exceeded, Some(Refusal::LimitExceeded)),
            (
                Call::Admit,
                Status::Exceeded,
                Some(Refusal::ModelNotAllowed {
                    model: "sonnet".to_owned()
                })
            ),
            (Call::Record, Status::Exceeded, Some(Refusal::LimitExceeded)),
        ]
    );
    assert_eq!(seen[0].status, Status::Warning);
    assert_eq!(
        seen[5].status,
        Status::Warning,
        "a zero request is never Exceeded"
    );
    // The record went through even past the maximum.
    assert_eq!(usage_of(&engine, "a", TOKENS_IN).units, dec!(20500));
}
