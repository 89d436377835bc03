//! Bad input gets a typed `tollgate::Error` and changes nothing.
//!
//! Every test records some usage first, makes the bad call, expects the exact
//! error variant with its fields, and then reads the counters back (the usage
//! report, a zero-amount `check` that also shows pool counters, and the
//! store's counter count) to show they are exactly what they were. Where a bad
//! request mixes a good meter with a bad one, the good meter's counter must not
//! move either: all or nothing.

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tollgate::{
    Allocation, Catalog, Decision, Engine, Error, LimitConfig, ManualClock, MaxConfig, MemoryStore,
    Period, Request, ScopeKey, Status, UsageReport, Window,
};

type TestEngine = Engine<MemoryStore, ManualClock>;

/// Meters:
/// - `tokens` (count, priced 0.001 USD), `jobs` (count, unpriced),
///   `runtime` (seconds, unpriced), `images` (count, priced 10^11 USD),
///   `untracked` (count, no limit in any plan, unpriced), `messages` (count,
///   unlimited lifetime limit, unpriced);
/// - `cost` (USD, scale 6): the cost meter.
///
/// `plan_basic` limits tokens/jobs/cost monthly and runtime over a rolling
/// day; `plan_small` has a lower token maximum. Pool `account:acme` limits
/// tokens and jobs.
const CATALOG: &str = r#"{
  "meters": [
    {"id": "tokens", "unit": "count"},
    {"id": "jobs", "unit": "count"},
    {"id": "runtime", "unit": "seconds"},
    {"id": "images", "unit": "count"},
    {"id": "untracked", "unit": "count"},
    {"id": "messages", "unit": "count"},
    {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}
  ],
  "plans": [
    {
      "id": "plan_basic",
      "cost_meter": "cost",
      "prices": {"tokens": "0.001", "images": "100000000000"},
      "limits": [
        {"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 1000},
        {"meter": "jobs", "window": {"calendar": {"period": "month"}}, "max": 10},
        {"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": "50"},
        {"meter": "runtime", "window": {"rolling": {"span": "1d", "buckets": 24}}, "max": 3600},
        {"meter": "images", "window": "lifetime", "max": "unlimited"},
        {"meter": "messages", "window": "lifetime", "max": -1}
      ]
    },
    {
      "id": "plan_small",
      "limits": [
        {"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 100}
      ]
    }
  ],
  "pools": [
    {
      "id": "account:acme",
      "limits": [
        {"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 5000},
        {"meter": "jobs", "window": "lifetime", "max": -1}
      ]
    }
  ]
}"#;

fn engine() -> TestEngine {
    let catalog: Catalog = serde_json::from_str(CATALOG).expect("test catalog loads");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap());
    Engine::with_clock(catalog, clock)
}

/// An engine with `alice` on `plan_basic` drawing on `account:acme`, and some
/// usage recorded: 100 tokens, 3 jobs, 60 s runtime, and the tokens' cost.
fn engine_with_usage() -> TestEngine {
    let e = engine();
    e.allocate(Allocation::new("alice", "plan_basic").with_pool("account:acme"))
        .unwrap();
    let d = e
        .admit(
            &Request::new("alice")
                .units("tokens", 100)
                .units("jobs", 3)
                .units("runtime", 60),
        )
        .unwrap();
    assert!(d.allowed && d.recorded, "setup admit: {d:?}");
    e
}

/// Everything a bad call could have touched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    report: UsageReport,
    /// A zero-amount check over every limited meter: shows the subject's and
    /// the pool's counters.
    zero_check: Decision,
    counters: usize,
}

fn snapshot(e: &TestEngine, subject: &str) -> Snapshot {
    let zero = Request::new(subject)
        .units("tokens", 0)
        .units("jobs", 0)
        .units("runtime", 0)
        .units("images", 0)
        .money("cost", Decimal::ZERO, "USD");
    Snapshot {
        report: e.usage(subject).unwrap(),
        zero_check: e.check(&zero).unwrap(),
        counters: e.store().counter_count(),
    }
}

/// Usage of `meter` in `subject`'s own scope, in the meter's major unit.
fn units(e: &TestEngine, subject: &str, meter: &str) -> Decimal {
    e.usage(subject)
        .unwrap()
        .meters
        .iter()
        .find(|m| &*m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter}"))
        .units
}

/// Usage of `meter` in the pool `pool`, in the meter's smallest unit.
fn pool_used(e: &TestEngine, subject: &str, pool: &str, meter: &str) -> u64 {
    let d = e
        .check(&Request::new(subject).units(meter, 0))
        .expect("zero check");
    d.limit(&ScopeKey::pool(pool), meter)
        .unwrap_or_else(|| panic!("no pool row for {meter}"))
        .used
}

/// The usage `engine_with_usage` recorded, checked field by field.
fn assert_setup_usage(e: &TestEngine) {
    assert_eq!(units(e, "alice", "tokens"), dec!(100));
    assert_eq!(units(e, "alice", "jobs"), dec!(3));
    assert_eq!(units(e, "alice", "runtime"), dec!(60));
    assert_eq!(units(e, "alice", "cost"), dec!(0.1));
    assert_eq!(pool_used(e, "alice", "account:acme", "tokens"), 100);
    assert_eq!(pool_used(e, "alice", "account:acme", "jobs"), 3);
    // tokens, jobs, runtime, cost and the money charged for tokens for
    // alice; tokens and jobs for the pool.
    assert_eq!(e.store().counter_count(), 7);
}

/// Run `req` through check, admit and record; each must fail with `want`.
fn assert_all_calls_fail(e: &TestEngine, req: &Request<'_>, want: &Error) {
    assert_eq!(e.check(req).as_ref().unwrap_err(), want, "check");
    assert_eq!(e.admit(req).as_ref().unwrap_err(), want, "admit");
    assert_eq!(e.record(req).as_ref().unwrap_err(), want, "record");
}

#[test]
fn unknown_subject_is_refused_by_check_admit_record_and_usage() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::UnknownSubject {
        subject: "nobody".into(),
    };
    let req = Request::new("nobody").units("tokens", 5).units("jobs", 1);
    assert_all_calls_fail(&e, &req, &want);
    assert_eq!(e.usage("nobody").unwrap_err(), want);

    // An empty subject id is just another unknown subject.
    let want_empty = Error::UnknownSubject { subject: "".into() };
    assert_all_calls_fail(&e, &Request::new("").units("tokens", 5), &want_empty);
    assert_eq!(e.usage("").unwrap_err(), want_empty);

    // A deallocated subject is unknown too, and its counters stay.
    let e2 = engine_with_usage();
    assert!(e2.deallocate("alice").unwrap());
    let want_alice = Error::UnknownSubject {
        subject: "alice".into(),
    };
    assert_all_calls_fail(&e2, &Request::new("alice").units("tokens", 5), &want_alice);
    assert_eq!(e2.usage("alice").unwrap_err(), want_alice);
    assert_eq!(e2.store().counter_count(), 7);

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn unknown_meter_in_a_request_records_nothing() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::UnknownMeter {
        meter: "toknes".into(),
    };
    // Good meters before and after the bad one: neither may move.
    let req = Request::new("alice")
        .units("tokens", 5)
        .units("toknes", 1)
        .units("jobs", 1);
    assert_all_calls_fail(&e, &req, &want);
    // Bad meter first.
    let req = Request::new("alice").units("toknes", 1).units("tokens", 5);
    assert_all_calls_fail(&e, &req, &want);
    // An unknown money meter.
    let req = Request::new("alice")
        .units("tokens", 5)
        .money("dollars", dec!(1), "USD");
    assert_all_calls_fail(
        &e,
        &req,
        &Error::UnknownMeter {
            meter: "dollars".into(),
        },
    );
    // Meter ids are case-sensitive.
    let req = Request::new("alice").units("Tokens", 5);
    assert_all_calls_fail(
        &e,
        &req,
        &Error::UnknownMeter {
            meter: "Tokens".into(),
        },
    );

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn failed_allocate_with_unknown_plan_or_pool_keeps_the_previous_allocation() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    assert_eq!(
        e.allocate(Allocation::new("alice", "plan_missing")),
        Err(Error::UnknownPlan {
            plan: "plan_missing".into()
        })
    );
    // A known plan with one known and one unknown pool: refused as a whole.
    assert_eq!(
        e.allocate(
            Allocation::new("alice", "plan_small")
                .with_pool("account:acme")
                .with_pool("account:nope")
        ),
        Err(Error::UnknownPool {
            pool: "account:nope".into()
        })
    );
    // The same pool twice is a config error on `pools`.
    match e.allocate(
        Allocation::new("alice", "plan_small")
            .with_pool("account:acme")
            .with_pool("account:acme"),
    ) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "pools"),
        other => panic!("expected InvalidConfig on pools, got {other:?}"),
    }

    // A new subject with a bad plan is not allocated at all.
    assert_eq!(
        e.allocate(Allocation::new("bob", "plan_missing")),
        Err(Error::UnknownPlan {
            plan: "plan_missing".into()
        })
    );
    assert_eq!(
        e.allocate(Allocation::new("carol", "plan_basic").with_pool("account:nope")),
        Err(Error::UnknownPool {
            pool: "account:nope".into()
        })
    );
    for who in ["bob", "carol"] {
        assert_eq!(
            e.usage(who).unwrap_err(),
            Error::UnknownSubject {
                subject: who.into()
            }
        );
    }

    // Alice is still on plan_basic with the pool, counters untouched.
    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
    let report = e.usage("alice").unwrap();
    assert_eq!(report.plan, "plan_basic");
    assert_eq!(report.meters.len(), 6);
    // plan_basic's 1000-token maximum is in force, not plan_small's 100, and
    // the pool is still drawn on.
    let d = e
        .check(&Request::new("alice").units("tokens", 500))
        .unwrap();
    assert!(d.allowed, "{d:?}");
    let own = d.limit(&ScopeKey::subject("alice"), "tokens").unwrap();
    assert_eq!(own.max, Some(1000));
    assert_eq!(own.remaining, Some(900));
    assert!(d.limit(&ScopeKey::pool("account:acme"), "tokens").is_some());
}

#[test]
fn negative_money_is_refused() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::NegativeAmount {
        meter: "cost".into(),
        amount: dec!(-1),
    };
    assert_all_calls_fail(
        &e,
        &Request::new("alice").money("cost", dec!(-1), "USD"),
        &want,
    );
    // Mixed with good meters: nothing moves. A negative amount would otherwise
    // have cancelled the tokens' cost.
    let req = Request::new("alice")
        .units("tokens", 5)
        .money("cost", dec!(-1), "USD")
        .units("jobs", 1);
    assert_all_calls_fail(&e, &req, &want);
    // The smallest negative amount is still negative.
    assert_all_calls_fail(
        &e,
        &Request::new("alice").money("cost", dec!(-0.000000001), "USD"),
        &Error::NegativeAmount {
            meter: "cost".into(),
            amount: dec!(-0.000000001),
        },
    );

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn record_of_u64_max_on_existing_usage_overflows() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::Overflow {
        meter: "jobs".into(),
    };
    // jobs already holds 3: recording u64::MAX more cannot fit. The good
    // runtime amount in the same request must not be recorded either.
    let req = Request::new("alice")
        .units("runtime", 10)
        .units("jobs", u64::MAX);
    assert_eq!(e.record(&req).unwrap_err(), want, "record");
    assert_eq!(e.admit(&req).unwrap_err(), want, "admit");
    // Alone, too.
    let req = Request::new("alice").units("jobs", u64::MAX);
    assert_eq!(e.record(&req).unwrap_err(), want, "record alone");

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn check_reports_the_overflow_that_admit_and_record_would_hit() {
    // `check` is "what would admit decide": for an amount that cannot be
    // added to the counter, admit and record fail with Overflow, so check
    // must not answer Ok. Here the limit is unlimited, so the only thing
    // wrong with the request is the overflow.
    let e = engine_with_usage();
    let d = e
        .admit(&Request::new("alice").units("messages", 5))
        .unwrap();
    assert!(d.recorded);
    let before = snapshot(&e, "alice");

    let want = Error::Overflow {
        meter: "messages".into(),
    };
    let req = Request::new("alice")
        .units("tokens", 5)
        .units("messages", u64::MAX);
    assert_eq!(e.record(&req).unwrap_err(), want, "record");
    assert_eq!(e.admit(&req).unwrap_err(), want, "admit");
    let checked = e.check(&req);
    assert_eq!(snapshot(&e, "alice"), before);
    assert_eq!(checked.unwrap_err(), want, "check");
}

#[test]
fn two_entries_for_one_meter_summing_past_u64_max_overflow() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::Overflow {
        meter: "jobs".into(),
    };
    let req = Request::new("alice")
        .units("runtime", 10)
        .units("jobs", u64::MAX)
        .units("jobs", 1);
    assert_all_calls_fail(&e, &req, &want);
    let req = Request::new("alice")
        .units("jobs", u64::MAX / 2 + 1)
        .units("runtime", 10)
        .units("jobs", u64::MAX / 2 + 1);
    assert_all_calls_fail(&e, &req, &want);
    // Two money entries for the cost meter.
    let big = dec!(18446744073709.551615); // u64::MAX micro-dollars
    let req = Request::new("alice")
        .money("cost", big, "USD")
        .money("cost", dec!(0.000001), "USD");
    assert_all_calls_fail(
        &e,
        &req,
        &Error::Overflow {
            meter: "cost".into(),
        },
    );

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn cost_that_overflows_is_refused() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::Overflow {
        meter: "cost".into(),
    };
    // u64::MAX / 2 tokens fit the tokens counter, but at 0.001 USD each the
    // cost (~9.2e15 USD, ~9.2e21 micro-dollars) does not fit the cost meter.
    let req = Request::new("alice")
        .units("jobs", 1)
        .units("tokens", u64::MAX / 2);
    assert_all_calls_fail(&e, &req, &want);
    // u64::MAX images at 10^11 USD each: the product overflows a Decimal.
    let req = Request::new("alice")
        .units("jobs", 1)
        .units("images", u64::MAX);
    assert_all_calls_fail(&e, &req, &want);
    // A cost that fits alone but not with money given for the cost meter in
    // the same request: 18,446,744,073,709 USD plus 1,000 USD of tokens.
    let req = Request::new("alice")
        .money("cost", dec!(18446744073709), "USD")
        .units("tokens", 1_000_000);
    assert_all_calls_fail(&e, &req, &want);

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn money_too_large_for_the_meter_overflows() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::Overflow {
        meter: "cost".into(),
    };
    // 10^14 USD is 10^20 micro-dollars: more than a u64 holds.
    let req = Request::new("alice")
        .units("tokens", 5)
        .money("cost", dec!(100000000000000), "USD");
    assert_all_calls_fail(&e, &req, &want);
    // Decimal::MAX overflows the scaling itself.
    let req = Request::new("alice")
        .units("tokens", 5)
        .money("cost", Decimal::MAX, "USD");
    assert_all_calls_fail(&e, &req, &want);
    // One micro-dollar past u64::MAX.
    let req = Request::new("alice").money("cost", dec!(18446744073709.551616), "USD");
    assert_all_calls_fail(&e, &req, &want);

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn money_in_another_currency_is_refused() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    let want = Error::CurrencyMismatch {
        meter: "cost".into(),
        expected: "USD".into(),
        found: "EUR".into(),
    };
    assert_all_calls_fail(
        &e,
        &Request::new("alice").money("cost", dec!(1), "EUR"),
        &want,
    );
    let req = Request::new("alice")
        .units("tokens", 5)
        .money("cost", dec!(1), "EUR")
        .units("jobs", 1);
    assert_all_calls_fail(&e, &req, &want);
    // A good USD entry for the same meter does not rescue the EUR one.
    let req = Request::new("alice")
        .money("cost", dec!(1), "USD")
        .money("cost", dec!(1), "EUR");
    assert_all_calls_fail(&e, &req, &want);
    // The currency check comes before the sign check: a negative EUR amount
    // is reported as the wrong currency.
    assert_all_calls_fail(
        &e,
        &Request::new("alice").money("cost", dec!(-1), "EUR"),
        &want,
    );

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn wrong_unit_is_refused() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    // Units for a money meter.
    let req = Request::new("alice").units("tokens", 5).units("cost", 5);
    assert_all_calls_fail(
        &e,
        &req,
        &Error::WrongUnit {
            meter: "cost".into(),
            expected: "money",
        },
    );
    // Money for a count meter.
    let req = Request::new("alice")
        .units("jobs", 1)
        .money("tokens", dec!(1), "USD");
    assert_all_calls_fail(
        &e,
        &req,
        &Error::WrongUnit {
            meter: "tokens".into(),
            expected: "a count",
        },
    );
    // Money for a seconds meter.
    let req = Request::new("alice")
        .money("runtime", dec!(1), "USD")
        .units("tokens", 5);
    assert_all_calls_fail(
        &e,
        &req,
        &Error::WrongUnit {
            meter: "runtime".into(),
            expected: "a count",
        },
    );

    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
}

#[test]
fn invalid_allocation_override_is_refused_and_keeps_the_previous_allocation() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");
    let month = Window::calendar(Period::Month);

    let field_of = |a: Allocation| match e.allocate(a) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let base = || Allocation::new("alice", "plan_small");

    // An override for an unknown meter.
    let f = field_of(base().with_override(LimitConfig::new("toknes", month, 10u64)));
    assert!(f.starts_with("overrides["), "{f}");
    assert_eq!(f, "overrides[0].meter");
    // A negative maximum other than -1.
    let f = field_of(
        base()
            .with_override(LimitConfig::new("jobs", month, 5u64))
            .with_override(LimitConfig::new(
                "tokens",
                month,
                MaxConfig::Amount(dec!(-5)),
            )),
    );
    assert_eq!(f, "overrides[1].max");
    // A warning ratio outside (0, 1].
    let f =
        field_of(base().with_override(LimitConfig::new("tokens", month, 10u64).warn_at(dec!(2))));
    assert_eq!(f, "overrides[0].warn_at");
    let f =
        field_of(base().with_override(LimitConfig::new("tokens", month, 10u64).warn_at(dec!(0))));
    assert_eq!(f, "overrides[0].warn_at");
    // A rolling window with zero buckets.
    let f = field_of(base().with_override(LimitConfig::new(
        "runtime",
        Window::Rolling {
            span_secs: 3600,
            buckets: 0,
        },
        10u64,
    )));
    assert_eq!(f, "overrides[0].window");
    // A money maximum with more decimals than the meter keeps.
    let f = field_of(base().with_override(LimitConfig::new("cost", month, dec!(1.0000001))));
    assert_eq!(f, "overrides[0].max");
    // Two overrides for the same meter and window.
    let f = field_of(
        base()
            .with_override(LimitConfig::new("tokens", month, 10u64))
            .with_override(LimitConfig::new("tokens", month, 20u64)),
    );
    assert!(f.starts_with("overrides[1]"), "{f}");

    // An empty subject id.
    assert_eq!(field_of(Allocation::new("", "plan_basic")), "subject");
    assert_eq!(
        e.usage("").unwrap_err(),
        Error::UnknownSubject { subject: "".into() }
    );

    // Alice is still on plan_basic with its 1000-token maximum.
    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);
    let report = e.usage("alice").unwrap();
    assert_eq!(report.plan, "plan_basic");
    let tokens = report
        .meters
        .iter()
        .find(|m| &*m.meter == "tokens")
        .unwrap();
    assert_eq!(tokens.max, Some(dec!(1000)));
}

#[test]
fn odd_but_valid_input_does_not_panic_or_err() {
    let e = engine_with_usage();
    let before = snapshot(&e, "alice");

    // An empty request: Ok, nothing touched, cost zero.
    for d in [
        e.check(&Request::new("alice")).unwrap(),
        e.admit(&Request::new("alice")).unwrap(),
        e.record(&Request::new("alice")).unwrap(),
    ] {
        assert_eq!(d.status, Status::Ok, "{d:?}");
        assert!(d.allowed);
        assert!(d.limits.is_empty());
        assert_eq!(d.reason, None);
        assert_eq!(d.cost.as_ref().map(|c| c.amount), Some(Decimal::ZERO));
    }
    // Zero amounts, including a negative zero of money.
    let zero = Request::new("alice")
        .units("tokens", 0)
        .units("jobs", 0)
        .money("cost", dec!(-0.00), "USD");
    for d in [
        e.check(&zero).unwrap(),
        e.admit(&zero).unwrap(),
        e.record(&zero).unwrap(),
    ] {
        assert_eq!(d.status, Status::Ok, "{d:?}");
        assert!(d.allowed);
        assert!(d.limits.iter().all(|l| l.requested == 0));
    }
    // A meter the plan does not limit: allowed, unpriced, no counter.
    for d in [
        e.check(&Request::new("alice").units("untracked", 5))
            .unwrap(),
        e.admit(&Request::new("alice").units("untracked", 5))
            .unwrap(),
        e.record(&Request::new("alice").units("untracked", u64::MAX))
            .unwrap(),
    ] {
        assert_eq!(d.status, Status::Ok, "{d:?}");
        assert!(d.allowed);
        assert!(d.limits.is_empty());
        assert_eq!(d.unpriced.len(), 1);
        assert_eq!(&*d.unpriced[0], "untracked");
    }
    assert_eq!(snapshot(&e, "alice"), before);
    assert_setup_usage(&e);

    // A zero request on a limit already past its maximum is never Exceeded.
    let d = e.record(&Request::new("alice").units("jobs", 20)).unwrap();
    assert_eq!(d.status, Status::Exceeded);
    let d = e.admit(&Request::new("alice").units("jobs", 0)).unwrap();
    assert_ne!(d.status, Status::Exceeded, "{d:?}");
    assert!(d.allowed);
    assert_eq!(units(&e, "alice", "jobs"), dec!(23));

    // Money finer than the meter's scale rounds up to one smallest unit.
    let d = e
        .admit(&Request::new("alice").money("cost", dec!(0.0000001), "USD"))
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!(units(&e, "alice", "cost"), dec!(0.100001));
}
