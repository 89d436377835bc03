//! Edges: amounts past `u64`, `record` past a maximum, allocations that name
//! a model's pool, offsets that are not whole minutes.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, MaxConfig, MemoryStore,
    Meter, Period, PlanConfig, PoolConfig, Request, Status, Window,
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
    assert!(e.deallocate("a"));
    assert_eq!(e.allocation("a"), None);
    assert!(!e.deallocate("a"));
}
