//! A clock that steps back: a read or a failed call changes nothing, and a
//! backward step never frees usage a forward call counted (contract rule 2),
//! through the public API with a manual clock and the memory store.

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate::{
    conformance, Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, MemoryStore,
    Meter, Period, PlanConfig, Request, Window,
};

const TOKENS: &str = "tokens";

fn at(d: u32, h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 4, d, h, m, 0).unwrap()
}

/// Subject `a`: 10 tokens a day, and its tokens also counted over its
/// lifetime with no maximum (so a huge `record` overflows that counter).
fn daily() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(
                    TOKENS,
                    Window::calendar(Period::Day),
                    10u64,
                ))
                .limit(LimitConfig::new(
                    TOKENS,
                    Window::Lifetime,
                    tollgate::MaxConfig::Unlimited,
                )),
        )
        .build()
        .unwrap();
    let clock = ManualClock::new(at(8, 12, 0));
    let e = Engine::with_clock(catalog, clock.clone());
    e.allocate(Allocation::new("a", "p")).unwrap();
    (e, clock)
}

/// Subject `a`: 20 tokens an hour, rolling in 4 buckets of 15 minutes.
fn hourly() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let w = Window::Rolling {
        span_secs: 3_600,
        buckets: 4,
    };
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(TOKENS, w, 20u64)))
        .build()
        .unwrap();
    let clock = ManualClock::new(at(8, 12, 0));
    let e = Engine::with_clock(catalog, clock.clone());
    e.allocate(Allocation::new("a", "p")).unwrap();
    (e, clock)
}

fn tokens(n: u64) -> Request<'static> {
    Request::new("a").units(TOKENS, n)
}

/// The daily counter's usage, as `usage` reports it.
fn day_used(e: &Engine<MemoryStore, ManualClock>) -> Decimal {
    let r = e.usage("a").unwrap();
    r.meters
        .iter()
        .find(|m| matches!(m.window, Window::Calendar { .. }))
        .unwrap()
        .units
}

/// Back at 04-08 12:05 after whatever happened at 04-10: the 10 admitted at
/// 12:00 still count, so nothing more is admitted that day.
fn assert_day_still_full(e: &Engine<MemoryStore, ManualClock>, clock: &ManualClock) {
    clock.set(at(8, 12, 5));
    let d = e.admit(&tokens(1)).unwrap();
    assert!(!d.allowed, "usage freed by a step back: {d:?}");
    assert_eq!(d.limits[0].used, 10, "{d:?}");
    assert_eq!(day_used(e), Decimal::from(10));
    // The day still ends at midnight.
    clock.set(at(9, 0, 0));
    assert!(e.admit(&tokens(10)).unwrap().allowed);
}

#[test]
fn a_check_after_the_day_then_a_step_back_frees_nothing() {
    let (e, clock) = daily();
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    clock.set(at(10, 9, 0));
    let d = e.check(&tokens(10)).unwrap();
    assert!(d.allowed, "a new day has room: {d:?}");
    assert_eq!(d.limits[0].used, 0);
    assert_day_still_full(&e, &clock);
}

#[test]
fn a_usage_read_after_the_day_then_a_step_back_frees_nothing() {
    let (e, clock) = daily();
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    clock.set(at(10, 9, 0));
    assert_eq!(day_used(&e), Decimal::ZERO);
    assert_day_still_full(&e, &clock);
}

#[test]
fn a_failed_call_after_the_day_then_a_step_back_frees_nothing() {
    let (e, clock) = daily();
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    clock.set(at(10, 9, 0));
    // The lifetime counter holds 10: this passes a u64 there.
    let r = e.record(&tokens(u64::MAX - 5));
    assert!(matches!(r, Err(Error::Overflow { .. })), "{r:?}");
    assert_day_still_full(&e, &clock);
}

#[test]
fn a_refused_admit_after_the_day_then_a_step_back_frees_nothing() {
    let (e, clock) = daily();
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    clock.set(at(10, 9, 0));
    let d = e.admit(&tokens(11)).unwrap();
    assert!(!d.allowed, "{d:?}");
    assert_day_still_full(&e, &clock);
}

#[test]
fn a_forward_write_still_counts_after_a_step_back() {
    let (e, clock) = daily();
    assert!(e.admit(&tokens(3)).unwrap().allowed);
    clock.set(at(10, 9, 0));
    assert!(e.admit(&tokens(4)).unwrap().allowed);
    // Back on 04-08: the 4 written on 04-10 are still counted (the counter
    // keeps its later day; the 3 of 04-08 left when it moved to it).
    clock.set(at(8, 12, 5));
    assert!(!e.admit(&tokens(7)).unwrap().allowed);
    let d = e.admit(&tokens(6)).unwrap();
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.limits[0].used, 10);
    // That usage joined 04-10, and leaves when 04-10 ends.
    clock.set(at(10, 23, 59));
    assert!(!e.admit(&tokens(1)).unwrap().allowed);
    clock.set(at(11, 0, 0));
    assert!(e.admit(&tokens(10)).unwrap().allowed);
}

#[test]
fn rolling_usage_survives_a_read_two_days_on_and_leaves_on_time() {
    let (e, clock) = hourly();
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    clock.set(at(10, 12, 0));
    let d = e.check(&tokens(20)).unwrap();
    assert!(d.allowed, "the hour has passed: {d:?}");
    clock.set(at(8, 12, 5));
    assert!(e.admit(&tokens(10)).unwrap().allowed);
    let d = e.admit(&tokens(1)).unwrap();
    assert!(!d.allowed, "usage freed by a step back: {d:?}");
    assert_eq!(d.limits[0].used, 20);
    // Both were written in the bucket [12:00, 12:15): they leave at 13:15,
    // not two days later.
    clock.set(at(8, 13, 14));
    assert!(!e.admit(&tokens(1)).unwrap().allowed);
    clock.set(at(8, 13, 15));
    let d = e.admit(&tokens(20)).unwrap();
    assert!(d.allowed, "usage stayed late: {d:?}");
}

#[test]
fn rolling_usage_written_forward_still_counts_after_a_step_back() {
    let (e, clock) = hourly();
    assert!(e.admit(&tokens(5)).unwrap().allowed);
    clock.set(at(10, 12, 0));
    assert!(e.admit(&tokens(15)).unwrap().allowed);
    clock.set(at(8, 12, 5));
    let d = e.admit(&tokens(6)).unwrap();
    assert!(!d.allowed, "usage freed by a step back: {d:?}");
    assert_eq!(d.limits[0].used, 15);
}

#[test]
fn memory_store_passes_the_backward_steps_conformance_check() {
    conformance::clock_steps_back_free_nothing(MemoryStore::new);
    conformance::clock_steps_back_free_nothing(|| MemoryStore::with_shards(1));
}
