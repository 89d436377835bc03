//! Reservations, leases, refunds, idempotent events, cooldowns and overdue
//! work, through the engine, on a manual clock (no sleeps).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate::{
    Allocation, CatalogConfig, Decision, Engine, Error, LimitConfig, ManualClock, MemoryStore,
    Meter, Outcome, Period, PlanConfig, PoolConfig, RefundPolicy, Refusal, Request, ScopeKey,
    Status, Window,
};

const TOKENS: &str = "tokens";
const JOBS: &str = "jobs";
const SLOTS: &str = "concurrent_jobs";
const COST: &str = "cost";
const MIN: StdDuration = StdDuration::from_secs(60);

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap())
}

/// Seed 002's agent: 10,000 tokens and 20 jobs a day, 2 concurrent jobs, a
/// 1 h maximum job duration, and a repository pool with a 10 minute cooldown
/// after failure. Tokens cost $0.001 each, under a $50 monthly cap.
fn engine() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let day = Window::calendar(Period::Day);
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .meter(Meter::count(JOBS))
        .meter(Meter::count(SLOTS))
        .meter(Meter::money(COST, "USD", 6))
        .plan(
            PlanConfig::new("agent")
                .limit(LimitConfig::new(TOKENS, day, 10_000u64))
                .limit(LimitConfig::new(JOBS, day, 20u64))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 2u64))
                .limit(LimitConfig::new(
                    COST,
                    Window::calendar(Period::Month),
                    Decimal::new(50, 0),
                ))
                .cost_meter(COST)
                .price(TOKENS, Decimal::new(1, 3))
                .max_job_duration("1h"),
        )
        .plan(
            PlanConfig::new("generous")
                .limit(LimitConfig::new(TOKENS, day, 10_000u64))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 4u64))
                .refunds(RefundPolicy {
                    failed: Decimal::new(25, 2),
                    cancelled: Decimal::ONE,
                    completed: Decimal::new(1, 1),
                })
                .cooldown_after_failure("5m"),
        )
        .pool(
            PoolConfig::new("repo:acme/api")
                .limit(LimitConfig::new(JOBS, day, 100u64))
                .cooldown_after_failure("10m"),
        )
        .build()
        .unwrap();
    let c = clock();
    let e = Engine::with_clock(catalog, c.clone());
    e.allocate(Allocation::new("agent-1", "agent")).unwrap();
    e.allocate(Allocation::new("agent-2", "generous")).unwrap();
    (e, c)
}

fn job(subject: &str, tokens: u64) -> Request<'_> {
    Request::new(subject).units(TOKENS, tokens).units(JOBS, 1)
}

fn tokens(e: &Engine<MemoryStore, ManualClock>, subject: &str) -> (Decimal, Decimal) {
    let r = e.usage(subject).unwrap();
    let row = r.meters.iter().find(|m| &*m.meter == TOKENS).unwrap();
    (row.units, row.held)
}

fn limit<'d>(d: &'d Decision, meter: &str) -> &'d tollgate::LimitState {
    d.limits.iter().find(|l| &*l.meter == meter).unwrap()
}

#[test]
fn a_reservation_holds_for_everyone_and_commit_settles_the_difference() {
    let (e, _) = engine();
    let res = e.reserve(&job("agent-1", 6_000), MIN).unwrap().unwrap();
    assert_eq!(res.held(TOKENS), Some(6_000));
    assert_eq!(limit(res.decision(), SLOTS).held, 1, "a slot is taken");
    assert_eq!(tokens(&e, "agent-1"), (Decimal::ZERO, Decimal::from(6_000)));
    // 6,000 held + 5,000 > 10,000: refused while the hold is in flight.
    let d = e
        .admit(&Request::new("agent-1").units(TOKENS, 5_000))
        .unwrap();
    assert!(!d.allowed);
    assert_eq!(limit(&d, TOKENS).held, 6_000);
    assert_eq!(limit(&d, TOKENS).remaining, Some(4_000));
    // The job used 4,500: the hold is replaced by the actual amount.
    let d = e
        .commit(
            &res,
            &Request::new("agent-1").units(TOKENS, 4_500).units(JOBS, 1),
        )
        .unwrap();
    assert!(d.allowed && d.recorded);
    assert_eq!((limit(&d, TOKENS).used, limit(&d, TOKENS).held), (4_500, 0));
    assert_eq!(limit(&d, SLOTS).held, 0, "the slot is free");
    assert_eq!(
        d.cost.as_ref().unwrap().amount,
        Decimal::new(45, 1),
        "4,500 x $0.001"
    );
    assert_eq!(tokens(&e, "agent-1"), (Decimal::from(4_500), Decimal::ZERO));
    let d = e
        .admit(&Request::new("agent-1").units(TOKENS, 5_500))
        .unwrap();
    assert!(d.allowed, "the difference returned to the quota");
}

#[test]
fn an_actual_above_the_estimate_is_recorded_like_record() {
    let (e, _) = engine();
    let res = e.reserve(&job("agent-1", 1_000), MIN).unwrap().unwrap();
    let d = e
        .commit(&res, &Request::new("agent-1").units(TOKENS, 10_500))
        .unwrap();
    assert!(d.recorded, "usage that happened is recorded");
    assert!(!d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    assert_eq!(limit(&d, TOKENS).used, 10_500);
}

#[test]
fn release_refunds_by_outcome_with_the_default_policy() {
    let (e, _) = engine();
    // Failed: 50 % of 1,001 returns; 501 (rounded up) stays used. The
    // held $1.001 is kept in the same share, rounded up to the micro-dollar,
    // and the decision's cost is that charge.
    for (outcome, used, micro) in [
        (Outcome::Failed, 501u64, 500_500i64),
        (Outcome::Cancelled, 0, 0),
        (Outcome::Completed, 1_001, 1_001_000),
    ] {
        let (e2, _) = engine();
        let res = e2.reserve(&job("agent-1", 1_001), MIN).unwrap().unwrap();
        let d = e2.release(&res, outcome).unwrap();
        assert_eq!(limit(&d, COST).used, micro as u64, "{outcome:?}");
        assert_eq!(
            d.cost.as_ref().map(|c| c.amount),
            Some(Decimal::new(micro, 6)),
            "{outcome:?}: the release's cost is what it charged"
        );
        assert_eq!(limit(&d, TOKENS).used, used, "{outcome:?}");
        assert_eq!(
            limit(&d, TOKENS).requested,
            used,
            "{outcome:?}: the charge is reported"
        );
        assert_eq!(limit(&d, TOKENS).held, 0);
        assert_eq!(limit(&d, SLOTS).held, 0);
    }
    let _ = e;
}

#[test]
fn a_plan_can_set_its_own_refund_policy_and_cooldown() {
    let (e, c) = engine();
    let req = Request::new("agent-2").units(TOKENS, 1_000);
    let res = e.reserve(&req, MIN).unwrap().unwrap();
    e.release(&res, Outcome::Failed).unwrap();
    assert_eq!(
        tokens(&e, "agent-2").0,
        Decimal::from(750),
        "failed returns 25 %"
    );
    // The plan's 5 minute cooldown refuses the next job.
    let refused = e.reserve(&req, MIN).unwrap().unwrap_err();
    assert!(matches!(refused.reason, Some(Refusal::Cooldown { .. })));
    assert_eq!(refused.retry_after, Some(StdDuration::from_secs(300)));
    c.advance(StdDuration::from_secs(300));
    let res = e.reserve(&req, MIN).unwrap().unwrap();
    e.release(&res, Outcome::Completed).unwrap();
    assert_eq!(
        tokens(&e, "agent-2").0,
        Decimal::from(1_650),
        "completed returns 10 %"
    );
}

#[test]
fn a_concurrency_limit_refuses_a_third_job_until_one_ends() {
    let (e, _) = engine();
    let a = e.reserve(&job("agent-1", 10), MIN).unwrap().unwrap();
    let _b = e.reserve(&job("agent-1", 10), MIN).unwrap().unwrap();
    let refused = e.reserve(&job("agent-1", 10), MIN).unwrap().unwrap_err();
    assert!(!refused.allowed);
    assert_eq!(refused.reason, Some(Refusal::LimitExceeded));
    assert_eq!(refused.binding_limit().map(|l| &*l.meter), Some(SLOTS));
    assert_eq!(
        tokens(&e, "agent-1").1,
        Decimal::from(20),
        "the refused job holds nothing"
    );
    e.commit(&a, &Request::new("agent-1").units(TOKENS, 10))
        .unwrap();
    assert!(e.reserve(&job("agent-1", 10), MIN).unwrap().is_ok());
}

#[test]
fn ten_thousand_abandoned_reservations_leave_nothing_held_after_expiry() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .plan(PlanConfig::new("p").limit(LimitConfig::new(
            TOKENS,
            Window::calendar(Period::Month),
            1_000_000u64,
        )))
        .build()
        .unwrap();
    let c = clock();
    let e = Engine::with_clock(catalog, c.clone());
    e.allocate(Allocation::new("crashy", "p")).unwrap();
    for _ in 0..10_000 {
        e.reserve(&Request::new("crashy").units(TOKENS, 100), MIN)
            .unwrap()
            .unwrap();
        c.advance(StdDuration::from_millis(1));
    }
    assert_eq!(tokens(&e, "crashy").1, Decimal::from(1_000_000), "all held");
    assert!(
        !e.admit(&Request::new("crashy").units(TOKENS, 1))
            .unwrap()
            .allowed
    );
    c.advance(StdDuration::from_secs(60));
    let (used, held) = tokens(&e, "crashy");
    assert_eq!(
        (used, held),
        (Decimal::ZERO, Decimal::ZERO),
        "every hold returned, nothing charged"
    );
    let d = e
        .admit(&Request::new("crashy").units(TOKENS, 1_000_000))
        .unwrap();
    assert!(d.allowed, "the whole maximum is back");
    assert!(e.overdue().unwrap().is_empty());
}

#[test]
fn an_expired_reservation_cannot_be_renewed_or_settled_and_changes_nothing() {
    let (e, c) = engine();
    let mut res = e.reserve(&job("agent-1", 100), MIN).unwrap().unwrap();
    c.advance(StdDuration::from_secs(30));
    e.renew(&mut res, MIN).unwrap();
    c.advance(StdDuration::from_secs(59));
    assert_eq!(
        tokens(&e, "agent-1").1,
        Decimal::from(100),
        "renewed: still held at 89 s"
    );
    c.advance(StdDuration::from_secs(1));
    assert_eq!(
        tokens(&e, "agent-1").1,
        Decimal::ZERO,
        "gone at the renewed expiry"
    );
    let before = e.usage("agent-1").unwrap();
    assert!(matches!(
        e.renew(&mut res, MIN),
        Err(Error::ReservationExpired { .. })
    ));
    assert!(matches!(
        e.commit(&res, &Request::new("agent-1").units(TOKENS, 100)),
        Err(Error::ReservationExpired { .. })
    ));
    assert!(matches!(
        e.release(&res, Outcome::Failed),
        Err(Error::ReservationExpired { .. })
    ));
    assert!(matches!(
        e.grow(&mut res, &Request::new("agent-1").units(TOKENS, 1)),
        Err(Error::ReservationExpired { .. })
    ));
    assert_eq!(e.usage("agent-1").unwrap(), before, "nothing changed");
}

#[test]
fn bad_settlements_are_typed_errors_that_change_nothing() {
    let (e, _) = engine();
    let mut res = e.reserve(&job("agent-1", 100), MIN).unwrap().unwrap();
    let before = e.usage("agent-1").unwrap();
    // Negative actual money.
    let neg = Request::new("agent-1").money(COST, Decimal::new(-1, 0), "USD");
    assert!(matches!(
        e.commit(&res, &neg),
        Err(Error::NegativeAmount { .. })
    ));
    // Wrong currency, unknown meter, another subject, another model, a pool.
    let eur = Request::new("agent-1").money(COST, Decimal::ONE, "EUR");
    assert!(matches!(
        e.commit(&res, &eur),
        Err(Error::CurrencyMismatch { .. })
    ));
    let unknown = Request::new("agent-1").units("nope", 1);
    assert!(matches!(
        e.commit(&res, &unknown),
        Err(Error::UnknownMeter { .. })
    ));
    let other = Request::new("agent-2").units(TOKENS, 1);
    assert!(matches!(
        e.commit(&res, &other),
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        e.grow(&mut res, &other),
        Err(Error::InvalidRequest { .. })
    ));
    let model = Request::new("agent-1").units(TOKENS, 1).model("gpt");
    assert!(matches!(
        e.commit(&res, &model),
        Err(Error::InvalidRequest { .. })
    ));
    let pool = Request::new("agent-1")
        .units(TOKENS, 1)
        .pool("repo:acme/api");
    assert!(matches!(
        e.commit(&res, &pool),
        Err(Error::InvalidRequest { .. })
    ));
    // Zero and absurd lease lengths.
    assert!(matches!(
        e.renew(&mut res, StdDuration::ZERO),
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        e.renew(&mut res, StdDuration::from_secs(u64::MAX)),
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        e.reserve(&job("agent-1", 1), StdDuration::ZERO),
        Err(Error::InvalidRequest { .. })
    ));
    // Event ids where they do not belong, or empty.
    assert!(matches!(
        e.reserve(&job("agent-1", 1).event("x"), MIN),
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        e.record(&Request::new("agent-1").units(TOKENS, 1).event("")),
        Err(Error::InvalidRequest { .. })
    ));
    assert_eq!(e.usage("agent-1").unwrap(), before, "nothing changed");
    // Settled once: a second settlement is refused and changes nothing.
    e.commit(&res, &Request::new("agent-1").units(TOKENS, 50))
        .unwrap();
    let settled = e.usage("agent-1").unwrap();
    assert!(matches!(
        e.commit(&res, &Request::new("agent-1").units(TOKENS, 50)),
        Err(Error::ReservationSettled { .. })
    ));
    assert!(matches!(
        e.release(&res, Outcome::Cancelled),
        Err(Error::ReservationSettled { .. })
    ));
    assert_eq!(e.usage("agent-1").unwrap(), settled);
    // A reservation unknown to this engine's store.
    let (other_engine, _) = engine();
    assert!(matches!(
        other_engine.release(&res, Outcome::Cancelled),
        Err(Error::UnknownReservation { .. })
    ));
}

#[test]
fn one_event_id_recorded_a_hundred_thousand_times_counts_once() {
    let (e, c) = engine();
    let req = Request::new("agent-1")
        .units(TOKENS, 7)
        .event("usage-report-42");
    let first = e.record(&req).unwrap();
    for _ in 0..100_000 {
        c.advance(StdDuration::from_millis(1));
        let again = e.record(&req).unwrap();
        assert_eq!(again, first, "a retry answers the first decision");
    }
    assert_eq!(tokens(&e, "agent-1").0, Decimal::from(7));
}

#[test]
fn an_event_id_reused_for_different_amounts_is_a_conflict_and_changes_nothing() {
    let (e, _) = engine();
    e.record(&Request::new("agent-1").units(TOKENS, 7).event("e"))
        .unwrap();
    let before = e.usage("agent-1").unwrap();
    let more = Request::new("agent-1").units(TOKENS, 8).event("e");
    assert!(matches!(e.record(&more), Err(Error::EventConflict { .. })));
    let other_meter = Request::new("agent-1").units(JOBS, 7).event("e");
    assert!(matches!(
        e.record(&other_meter),
        Err(Error::EventConflict { .. })
    ));
    // The same amounts through another call are another event.
    let same = Request::new("agent-1").units(TOKENS, 7).event("e");
    assert!(matches!(e.admit(&same), Err(Error::EventConflict { .. })));
    assert_eq!(e.usage("agent-1").unwrap(), before);
}

#[test]
fn a_retried_commit_with_an_event_id_answers_the_first_decision() {
    let (e, c) = engine();
    let res = e.reserve(&job("agent-1", 500), MIN).unwrap().unwrap();
    let actual = Request::new("agent-1")
        .units(TOKENS, 400)
        .event("job-9-done");
    let first = e.commit(&res, &actual).unwrap();
    c.advance(StdDuration::from_secs(5));
    assert_eq!(e.commit(&res, &actual).unwrap(), first);
    assert_eq!(tokens(&e, "agent-1"), (Decimal::from(400), Decimal::ZERO));
    // Without the event id, the second commit is refused as settled.
    assert!(matches!(
        e.commit(&res, &Request::new("agent-1").units(TOKENS, 400)),
        Err(Error::ReservationSettled { .. })
    ));
}

#[test]
fn a_failure_starts_the_repository_cooldown_and_the_decision_says_when() {
    let (e, c) = engine();
    let res = e
        .reserve(&job("agent-1", 10).pool("repo:acme/api"), MIN)
        .unwrap()
        .unwrap();
    e.release(&res, Outcome::Failed).unwrap();
    let d = e.admit(&job("agent-1", 10).pool("repo:acme/api")).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    let until = Utc.with_ymd_and_hms(2026, 3, 2, 9, 10, 0).unwrap();
    assert_eq!(
        d.reason,
        Some(Refusal::Cooldown {
            scope: ScopeKey::pool("repo:acme/api"),
            until
        })
    );
    assert_eq!(d.retry_after, Some(StdDuration::from_secs(600)));
    assert!(e
        .reserve(&job("agent-1", 10).pool("repo:acme/api"), MIN)
        .unwrap()
        .is_err());
    assert!(
        !e.check(&job("agent-1", 10).pool("repo:acme/api"))
            .unwrap()
            .allowed
    );
    // Work that does not touch the repository is not blocked.
    assert!(e.admit(&job("agent-1", 10)).unwrap().allowed);
    c.advance(StdDuration::from_secs(600));
    assert!(
        e.admit(&job("agent-1", 10).pool("repo:acme/api"))
            .unwrap()
            .allowed
    );
}

#[test]
fn a_job_past_its_maximum_duration_is_reported_overdue() {
    let (e, c) = engine();
    let mut res = e
        .reserve(&job("agent-1", 10), StdDuration::from_secs(600))
        .unwrap()
        .unwrap();
    assert_eq!(res.deadline(), Some(res.opened_at() + Duration::hours(1)));
    for _ in 0..6 {
        c.advance(StdDuration::from_secs(540));
        e.renew(&mut res, StdDuration::from_secs(600)).unwrap();
    }
    assert!(e.overdue().unwrap().is_empty(), "54 minutes in");
    c.advance(StdDuration::from_secs(360));
    let due = e.overdue().unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id, res.id());
    assert_eq!(due[0].owner, ScopeKey::subject("agent-1"));
    e.release(&res, Outcome::Cancelled).unwrap();
    assert!(
        e.overdue().unwrap().is_empty(),
        "a settled job is not overdue"
    );
}

#[test]
fn a_growing_stream_is_told_to_stop_at_the_cap() {
    let (e, _) = engine();
    let mut res = e
        .reserve(&Request::new("agent-1").units(TOKENS, 1_000), MIN)
        .unwrap()
        .unwrap();
    let mut stopped_at = None;
    for chunk in 1..=20u64 {
        let d = e
            .grow(&mut res, &Request::new("agent-1").units(TOKENS, 500))
            .unwrap();
        if d.status == Status::Exceeded {
            stopped_at = Some(chunk);
            break;
        }
    }
    // 1,000 + 18 x 500 = 10,000 fits; the 19th chunk passes the cap.
    assert_eq!(stopped_at, Some(19));
    assert_eq!(res.held(TOKENS), Some(10_500));
    // Cost is held too: $10.50 against a $5 monthly cap.
    let cost = limit(res.decision(), COST);
    assert_eq!(cost.held, 10_500_000);
    e.commit(&res, &Request::new("agent-1").units(TOKENS, 10_500))
        .unwrap();
    assert_eq!(
        tokens(&e, "agent-1"),
        (Decimal::from(10_500), Decimal::ZERO)
    );
}

#[test]
fn eight_threads_against_four_slots_never_see_five_in_flight() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .meter(Meter::count(SLOTS))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(
                    TOKENS,
                    Window::calendar(Period::Day),
                    1_000_000u64,
                ))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 4u64)),
        )
        .build()
        .unwrap();
    let e = Arc::new(Engine::with_clock(catalog, clock()));
    e.allocate(Allocation::new("a", "p")).unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (e, in_flight, peak, done) =
                (e.clone(), in_flight.clone(), peak.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let Ok(res) = e
                        .reserve(&Request::new("a").units(TOKENS, 10), MIN)
                        .unwrap()
                    else {
                        std::thread::yield_now();
                        continue;
                    };
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::yield_now();
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    e.commit(&res, &Request::new("a").units(TOKENS, i % 10))
                        .unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(done.load(Ordering::SeqCst) > 0);
    let report = e.usage("a").unwrap();
    for row in &report.meters {
        assert_eq!(row.held, Decimal::ZERO, "{} still held", row.meter);
    }
}

#[test]
fn the_observer_sees_reservation_decisions() {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s = seen.clone();
    let (base, _) = engine();
    let catalog = base.catalog().clone();
    let e = Engine::with_clock(catalog, clock())
        .with_observer(move |ev: &tollgate::DecisionEvent<'_>| s.lock().push(ev.call));
    e.allocate(Allocation::new("agent-1", "agent")).unwrap();
    let mut res = e.reserve(&job("agent-1", 10), MIN).unwrap().unwrap();
    e.grow(&mut res, &Request::new("agent-1").units(TOKENS, 1))
        .unwrap();
    e.release(&res, Outcome::Completed).unwrap();
    use tollgate::Call;
    assert_eq!(*seen.lock(), vec![Call::Reserve, Call::Grow, Call::Release]);
}
