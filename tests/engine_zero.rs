//! A request of zero: never `Exceeded`, never refused by a cooldown in
//! `check` and `admit`, still refused for a model outside the allowlist (with
//! its own reason, status `Ok`). A reservation opens work: a cooldown or the
//! allowlist refuses it whatever its amounts, with the status of its limits.

use std::time::Duration as StdDuration;

use chrono::{TimeZone, Utc};
use tollgate::{
    Allocation, CatalogConfig, Decision, Engine, LimitConfig, ManualClock, MemoryStore, Meter,
    Outcome, Period, PlanConfig, PoolConfig, Refusal, Request, Status, Window,
};

const TOKENS: &str = "tokens";
const JOBS: &str = "jobs";
const SLOTS: &str = "slots";
const REPO: &str = "repo:acme/api";
const MIN: StdDuration = StdDuration::from_secs(60);

/// Subject `a` may use only model `m-ok`; its plan cools down 5 minutes
/// after a failure, the repository pool 10 minutes.
fn engine() -> Engine<MemoryStore, ManualClock> {
    let day = Window::calendar(Period::Day);
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .meter(Meter::count(JOBS))
        .meter(Meter::count(SLOTS))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(TOKENS, day, 1_000u64))
                .limit(LimitConfig::new(JOBS, day, 20u64))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 2u64))
                .cooldown_after_failure("5m"),
        )
        .pool(
            PoolConfig::new(REPO)
                .limit(LimitConfig::new(JOBS, day, 100u64))
                .cooldown_after_failure("10m"),
        )
        .build()
        .unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap());
    let e = Engine::with_clock(catalog, clock);
    e.allocate(Allocation::new("a", "p").with_models(["m-ok"]))
        .unwrap();
    e
}

/// Start the cooldowns of the plan and of the repository pool.
fn fail_a_job(e: &Engine<MemoryStore, ManualClock>) {
    let job = Request::new("a")
        .units(TOKENS, 10)
        .units(JOBS, 1)
        .pool(REPO);
    let res = e.reserve(&job, MIN).unwrap().unwrap();
    e.release(&res, Outcome::Failed).unwrap();
}

fn assert_passes(d: &Decision) {
    assert!(d.allowed, "{d:?}");
    assert_ne!(d.status, Status::Exceeded, "{d:?}");
    assert_eq!(d.reason, None, "{d:?}");
    assert!(!d.recorded, "{d:?}");
    assert_eq!(d.retry_after, None, "{d:?}");
}

fn assert_model_refused(d: &Decision) {
    assert!(!d.allowed, "{d:?}");
    assert_ne!(d.status, Status::Exceeded, "{d:?}");
    assert_eq!(
        d.reason,
        Some(Refusal::ModelNotAllowed {
            model: "m-other".into()
        })
    );
    assert!(!d.recorded, "{d:?}");
}

/// The zero requests: an amount of zero on a limited meter, on several, and
/// none at all; with and without the repository pool.
fn zeros() -> Vec<Request<'static>> {
    vec![
        Request::new("a").units(TOKENS, 0),
        Request::new("a").units(TOKENS, 0).units(JOBS, 0),
        Request::new("a"),
        Request::new("a").units(JOBS, 0).pool(REPO),
        Request::new("a").pool(REPO),
    ]
}

#[test]
fn a_zero_request_during_a_cooldown_is_checked_and_admitted() {
    let e = engine();
    fail_a_job(&e);
    for req in zeros() {
        assert_passes(&e.check(&req).unwrap());
        assert_passes(&e.admit(&req).unwrap());
    }
    // A positive request is still refused by the cooldown.
    let d = e.admit(&Request::new("a").units(TOKENS, 1)).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    assert!(matches!(d.reason, Some(Refusal::Cooldown { .. })));
    let d = e
        .check(&Request::new("a").units(JOBS, 1).pool(REPO))
        .unwrap();
    assert!(!d.allowed);
    assert!(matches!(d.reason, Some(Refusal::Cooldown { .. })));
}

#[test]
fn a_zero_request_during_a_cooldown_reports_the_counters() {
    let e = engine();
    fail_a_job(&e);
    let d = e.admit(&Request::new("a").units(TOKENS, 0)).unwrap();
    let l = &d.limits[0];
    assert_eq!((&*l.meter, l.requested, l.used), (TOKENS, 0, 5));
    assert_eq!(d.binding, Some(0));
}

#[test]
fn a_zero_request_naming_a_model_outside_the_allowlist_is_refused_but_not_exceeded() {
    let e = engine();
    for req in zeros() {
        let req = req.model("m-other");
        let d = e.check(&req).unwrap();
        assert_model_refused(&d);
        assert_eq!(d.status, Status::Ok);
        assert!(d.limits.is_empty());
        let d = e.admit(&req).unwrap();
        assert_model_refused(&d);
        assert_eq!(d.status, Status::Ok);
        // `record` reports the counters it read; a zero changes none.
        assert_model_refused(&e.record(&req).unwrap());
    }
    // The allowed model passes; a positive request for another model is
    // still `Exceeded`.
    assert_passes(
        &e.admit(&Request::new("a").units(TOKENS, 0).model("m-ok"))
            .unwrap(),
    );
    let d = e
        .admit(&Request::new("a").units(TOKENS, 1).model("m-other"))
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    assert!(matches!(d.reason, Some(Refusal::ModelNotAllowed { .. })));
}

#[test]
fn a_zero_request_for_a_refused_model_during_a_cooldown_names_the_model() {
    let e = engine();
    fail_a_job(&e);
    let req = Request::new("a").units(TOKENS, 0).model("m-other");
    assert_model_refused(&e.check(&req).unwrap());
    assert_model_refused(&e.admit(&req).unwrap());
}

#[test]
fn a_reservation_of_zero_is_still_refused_by_a_cooldown_and_the_allowlist() {
    let e = engine();
    let d = e
        .reserve(&Request::new("a").model("m-other"), MIN)
        .unwrap()
        .unwrap_err();
    assert!(matches!(d.reason, Some(Refusal::ModelNotAllowed { .. })));
    assert_eq!(d.status, Status::Ok);
    fail_a_job(&e);
    let d = e.reserve(&Request::new("a"), MIN).unwrap().unwrap_err();
    assert!(!d.allowed);
    assert!(matches!(d.reason, Some(Refusal::Cooldown { .. })));
    // The status of its limits: its slot fits.
    assert_eq!(d.status, Status::Ok);
    // A positive reservation is `Exceeded` by the cooldown.
    let d = e
        .reserve(&Request::new("a").units(TOKENS, 1), MIN)
        .unwrap()
        .unwrap_err();
    assert_eq!(d.status, Status::Exceeded);
    assert!(matches!(d.reason, Some(Refusal::Cooldown { .. })));
}

#[cfg(feature = "async")]
#[tokio::test]
async fn the_async_calls_follow_the_same_rule() {
    let e = engine();
    fail_a_job(&e);
    for req in zeros() {
        assert_passes(&e.check_async(&req).await.unwrap());
        assert_passes(&e.admit_async(&req).await.unwrap());
        let req = req.model("m-other");
        assert_model_refused(&e.check_async(&req).await.unwrap());
        assert_model_refused(&e.admit_async(&req).await.unwrap());
        assert_model_refused(&e.record_async(&req).await.unwrap());
    }
    let d = e
        .admit_async(&Request::new("a").units(TOKENS, 1))
        .await
        .unwrap();
    assert!(matches!(d.reason, Some(Refusal::Cooldown { .. })));
}
