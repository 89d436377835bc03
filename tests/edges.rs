//! Edges: amounts past `u64`, `record` past a maximum, allocations that name
//! a model's pool, offsets that are not whole minutes, decisions on more
//! limits than a decision keeps inline.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, LimitStates, ManualClock, MaxConfig,
    MemoryStore, Meter, MeterList, Period, PlanConfig, PoolConfig, Refusal, Request, Status,
    Window,
};

fn engine() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("jobs"))
        .meter(Meter::count("events"))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(
                    "jobs",
                    Window::calendar(Period::Day),
                    10u64,
                ))
                .limit(LimitConfig::new(
                    "events",
                    Window::Lifetime,
                    MaxConfig::Unlimited,
                )),
        )
        .build()
        .unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap());
    let e = Engine::with_clock(catalog, clock.clone());
    e.allocate(Allocation::new("a", "p")).unwrap();
    (e, clock)
}

#[test]
fn an_amount_past_u64_on_a_limited_counter_is_a_refusal_whatever_the_usage() {
    let (e, _) = engine();
    let huge = Request::new("a").units("jobs", u64::MAX);
    // On an empty counter and on a used one alike: a refusal, not an error.
    for used in [0, 1] {
        if used > 0 {
            e.admit(&Request::new("a").units("jobs", 1)).unwrap();
        }
        for d in [e.check(&huge).unwrap(), e.admit(&huge).unwrap()] {
            assert!(!d.allowed && !d.recorded);
            assert_eq!(d.status, Status::Exceeded);
            assert_eq!(d.limits[0].used, used);
            assert_eq!(d.retry_after, None, "waiting never makes room for it");
        }
    }
    // `record` would have to add it: that is an Overflow, and nothing changes.
    e.record(&Request::new("a").units("jobs", 5)).unwrap();
    assert_eq!(
        e.record(&huge).unwrap_err(),
        Error::Overflow {
            meter: "jobs".into()
        }
    );
    assert_eq!(
        e.check(&Request::new("a").units("jobs", 0)).unwrap().limits[0].used,
        6
    );
}

#[test]
fn an_amount_past_u64_on_an_unlimited_counter_is_an_error_in_every_call() {
    let (e, _) = engine();
    e.record(&Request::new("a").units("events", 2)).unwrap();
    let huge = Request::new("a").units("events", u64::MAX);
    let want = Error::Overflow {
        meter: "events".into(),
    };
    assert_eq!(e.check(&huge).unwrap_err(), want);
    assert_eq!(e.admit(&huge).unwrap_err(), want);
    assert_eq!(e.record(&huge).unwrap_err(), want);
}

#[test]
fn record_past_the_maximum_says_when_usage_is_back_under_it() {
    let (e, clock) = engine();
    let d = e.record(&Request::new("a").units("jobs", 15)).unwrap();
    assert!(d.recorded && !d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(d.binding, Some(0));
    // The day resets at midnight UTC, 12 hours on.
    assert_eq!(d.retry_after, Some(Duration::from_secs(12 * 3600)));
    clock.set(Utc.with_ymd_and_hms(2026, 6, 2, 0, 0, 0).unwrap());
    assert!(
        e.admit(&Request::new("a").units("jobs", 10))
            .unwrap()
            .allowed
    );
}

#[test]
fn a_model_pool_cannot_be_listed_in_an_allocation() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            MaxConfig::Unlimited,
        )))
        .pool(
            PoolConfig::new("model:sonnet")
                .for_model("sonnet")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    100u64,
                )),
        )
        .pool(PoolConfig::new("account:acme").limit(LimitConfig::new(
            "tokens",
            Window::calendar(Period::Day),
            1_000u64,
        )))
        .build()
        .unwrap();
    let e = Engine::new(catalog);
    let first = Allocation::new("a", "p").with_pool("account:acme");
    e.allocate(first.clone()).unwrap();
    // Listed, it would be charged for requests naming any other model.
    let err = e
        .allocate(
            Allocation::new("a", "p")
                .with_pool("account:acme")
                .with_pool("model:sonnet"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "pools[1]"),
        "{err:?}"
    );
    assert_eq!(
        e.allocation("a"),
        Some(first),
        "the earlier allocation stands"
    );
    assert_eq!(e.allocation("nobody"), None);
}

#[test]
fn a_utc_offset_must_be_whole_minutes() {
    let build = |secs| {
        CatalogConfig::default()
            .meter(Meter::count("t"))
            .plan(PlanConfig::new("p").limit(LimitConfig::new(
                "t",
                Window::Calendar {
                    period: Period::Day,
                    utc_offset_secs: secs,
                },
                1u64,
            )))
            .build()
    };
    // 30 s would otherwise be written back as +00:00 and silently become UTC.
    let err = build(30).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, reason }
            if field == "plans[p].limits[0].window" && reason.contains("whole number of minutes")),
        "{err:?}"
    );
    assert!(build(5 * 3600 + 30 * 60).is_ok());
    assert!(build(-(9 * 3600 + 45 * 60)).is_ok());
}

#[test]
fn an_allocation_reads_back_as_given_and_its_overrides_stay_its_own() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("jobs"))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(
            "jobs",
            Window::calendar(Period::Day),
            10u64,
        )))
        .pool(PoolConfig::new("account:acme").limit(LimitConfig::new(
            "jobs",
            Window::calendar(Period::Day),
            1_000u64,
        )))
        .pool(PoolConfig::new("account:beta"))
        .build()
        .unwrap();
    let e = Engine::new(catalog);
    let given = Allocation::new("a", "p")
        .with_override(LimitConfig::new(
            "jobs",
            Window::calendar(Period::Day),
            2u64,
        ))
        .with_override(LimitConfig::new("jobs", Window::Lifetime, 5u64))
        .with_models(["m2", "m1"])
        .with_pool("account:beta")
        .with_pool("account:acme");
    e.allocate(given.clone()).unwrap();
    e.allocate(Allocation::new("b", "p")).unwrap();
    assert_eq!(e.allocation("a"), Some(given));
    assert_eq!(e.allocation("b"), Some(Allocation::new("b", "p")));

    // `a`'s override replaces the plan's daily maximum for `a` only, and
    // adds a lifetime limit; `b` keeps the plan's limits.
    let d = e.admit(&Request::new("a").units("jobs", 3)).unwrap();
    assert!(!d.allowed);
    let d = e.admit(&Request::new("a").units("jobs", 2)).unwrap();
    assert!(d.allowed);
    let own: Vec<_> = d
        .limits
        .iter()
        .filter(|l| l.scope.id() == "a")
        .map(|l| (l.window, l.max))
        .collect();
    assert_eq!(
        own,
        [
            (Window::calendar(Period::Day), Some(2)),
            (Window::Lifetime, Some(5))
        ]
    );
    let d = e.admit(&Request::new("b").units("jobs", 3)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits.len(), 1);
    assert_eq!(d.limits[0].max, Some(10));

    // Reallocating replaces the binding; deallocating removes it.
    e.allocate(Allocation::new("a", "p")).unwrap();
    assert_eq!(e.allocation("a"), Some(Allocation::new("a", "p")));
    assert!(e.deallocate("a").unwrap());
    assert_eq!(e.allocation("a"), None);
    assert!(!e.deallocate("a").unwrap());
}

/// An engine at 2026-03-02 09:00 UTC whose plan `four` has the bench's
/// four limits (daily tokens and jobs, a monthly cost cap, a rolling
/// 7-day runtime) and whose plan `six` adds two more: a lifetime limit
/// and an hourly rolling limit on jobs.
fn wide_engine() -> Engine<MemoryStore, ManualClock> {
    let day = Window::calendar(Period::Day);
    let week = Window::Rolling {
        span_secs: 7 * 86_400,
        buckets: 168,
    };
    let hour = Window::Rolling {
        span_secs: 3_600,
        buckets: 60,
    };
    let four = |id| {
        PlanConfig::new(id)
            .limit(LimitConfig::new("tok", day, 1_000u64))
            .limit(LimitConfig::new("jobs", day, 10u64))
            .limit(LimitConfig::new(
                "cost",
                Window::calendar(Period::Month),
                rust_decimal::Decimal::ONE,
            ))
            .limit(LimitConfig::new("run", week, 600u64))
            .cost_meter("cost")
            .price("tok", rust_decimal::Decimal::new(1, 3))
    };
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tok"))
        .meter(Meter::count("jobs"))
        .meter(Meter::seconds("run"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(four("four"))
        .plan(
            four("six")
                .limit(LimitConfig::new("jobs", Window::Lifetime, 100u64))
                .limit(LimitConfig::new("jobs", hour, 3u64)),
        )
        .build()
        .unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap());
    let e = Engine::with_clock(catalog, clock);
    e.allocate(Allocation::new("a", "four")).unwrap();
    e.allocate(Allocation::new("b", "six")).unwrap();
    e
}

/// (meter, used, remaining) of each limit state, in order.
fn rows(limits: &LimitStates) -> Vec<(&str, u64, Option<u64>)> {
    limits
        .iter()
        .map(|l| (l.meter.as_str(), l.used, l.remaining))
        .collect()
}

#[test]
fn a_decision_on_four_limits_keeps_its_states_and_unpriced_meters_inline() {
    let e = wide_engine();
    let req = Request::new("a")
        .units("tok", 100)
        .units("jobs", 1)
        .units("run", 5);
    let d = e.admit(&req).unwrap();
    assert!(d.allowed && d.recorded, "{d:?}");
    assert_eq!(LimitStates::INLINE, 4);
    assert_eq!(d.limits.len(), 4);
    assert!(!d.limits.spilled(), "{d:?}");
    // Plan order; the cost of 100 tokens at $0.001 is $0.10.
    assert_eq!(
        rows(&d.limits),
        [
            ("tok", 100, Some(900)),
            ("jobs", 1, Some(9)),
            ("cost", 100_000, Some(900_000)),
            ("run", 5, Some(595)),
        ]
    );
    assert_eq!(d.binding, Some(0));
    assert_eq!(d.unpriced, ["jobs", "run"]);
    assert!(!d.unpriced.spilled() && d.unpriced.len() <= MeterList::INLINE);
    // The list reads as a slice and compares with a `Vec` both ways.
    let copy: Vec<_> = d.limits.clone().into_vec();
    assert_eq!(d.limits, copy);
    assert_eq!(copy, d.limits);
    assert_eq!(d.limits, *copy.as_slice());
    let mut n = 0;
    for l in &d.limits {
        assert!(
            l.period_start().is_some() && l.resets_at().is_some(),
            "{l:?}"
        );
        n += 1;
    }
    assert_eq!(n, 4);
    assert_eq!(
        d.limits[0].resets_at(),
        Some(Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap())
    );
    // Debug shows the instants as dates.
    assert!(
        format!("{:?}", d.limits[0]).contains("period_start: Some(2026-03-02T00:00:00Z)"),
        "{:?}",
        d.limits[0]
    );
}

#[test]
fn a_decision_on_more_limits_than_inline_spills_and_answers_the_same() {
    let e = wide_engine();
    let job = Request::new("b")
        .units("tok", 100)
        .units("jobs", 1)
        .units("run", 5);
    for k in 1..=3u64 {
        let d = e.admit(&job).unwrap();
        assert!(d.allowed && d.recorded, "{k}: {d:?}");
        assert_eq!(d.limits.len(), 6);
        assert!(d.limits.spilled());
        assert_eq!(
            rows(&d.limits),
            [
                ("tok", 100 * k, Some(1_000 - 100 * k)),
                ("jobs", k, Some(10 - k)),
                ("cost", 100_000 * k, Some(1_000_000 - 100_000 * k)),
                ("run", 5 * k, Some(600 - 5 * k)),
                ("jobs", k, Some(100 - k)),
                ("jobs", k, Some(3 - k)),
            ],
            "{k}"
        );
        // The hourly limit (index 5) has the least headroom.
        assert_eq!(d.binding, Some(5), "{k}");
        assert_eq!(d.limit(&d.limits[5].scope, "jobs"), Some(&d.limits[1]));
    }
    // The fourth job in the hour is refused by the sixth limit, past the
    // inline ones, and records nothing.
    let d = e.admit(&job).unwrap();
    assert!(!d.allowed && !d.recorded, "{d:?}");
    assert_eq!(d.reason, Some(Refusal::LimitExceeded));
    assert_eq!(d.status, Status::Exceeded);
    let exceeded: Vec<usize> = (0..d.limits.len())
        .filter(|&i| d.limits[i].status == Status::Exceeded)
        .collect();
    assert_eq!(exceeded, [5]);
    assert_eq!(d.binding, Some(5));
    assert_eq!(d.binding_limit().map(|l| l.used), Some(3));
    // Used at 09:00 in the bucket [09:00, 09:01): it leaves at 10:01.
    assert_eq!(d.retry_after, Some(Duration::from_secs(3_660)));
    let d = e.check(&Request::new("b").units("tok", 0)).unwrap();
    assert_eq!(d.limits[0].used, 300);
}
