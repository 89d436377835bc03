//! Model-based property tests of reservations, and snapshot round trips.
//!
//! Random sequences of `reserve`, `renew`, `grow`, `commit`, `release`,
//! `admit`, evented `record` and clock moves (which expire leases) run
//! against the engine and against a reference model: usage so far, and the
//! list of reservations with their holds, expiry and state. After every
//! operation the engine's answer (allowed or the error kind) and the usage
//! report's used and held amounts must match the model.
//!
//! The snapshot property runs a random history, snapshots the store through
//! JSON, restores it, and checks that the copy snapshots identically and
//! answers a second random history exactly as the original does.

use std::time::Duration as StdDuration;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rust_decimal::Decimal;
use tollgate::{
    Allocation, Catalog, CatalogConfig, Engine, Error, LimitConfig, ManualClock, MemoryStore,
    Meter, Outcome, Period, PlanConfig, Request, Reservation, Snapshot, Window,
};

const TOKENS: &str = "tokens";
const SLOTS: &str = "slots";
const MAX: u64 = 100;
const MAX_SLOTS: usize = 2;

fn catalog() -> Catalog {
    CatalogConfig::default()
        .meter(Meter::count(TOKENS))
        .meter(Meter::count(SLOTS))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(TOKENS, Window::Lifetime, MAX))
                .limit(LimitConfig::new(
                    SLOTS,
                    Window::Concurrent,
                    MAX_SLOTS as u64,
                )),
        )
        .plan(
            PlanConfig::new("daily")
                .limit(LimitConfig::new(TOKENS, Window::calendar(Period::Day), MAX))
                .limit(LimitConfig::new(
                    TOKENS,
                    Window::Rolling {
                        span_secs: 3_600,
                        buckets: 6,
                    },
                    60u64,
                ))
                .limit(LimitConfig::new(SLOTS, Window::Concurrent, 3u64))
                .cooldown_after_failure("2m"),
        )
        .build()
        .expect("catalog")
}

#[derive(Debug, Clone)]
enum Op {
    Reserve { amount: u64, ttl_s: u64 },
    Renew { idx: usize, ttl_s: u64 },
    Grow { idx: usize, amount: u64 },
    Commit { idx: usize, actual: u64 },
    Release { idx: usize, outcome: Outcome },
    Admit { amount: u64 },
    Record { amount: u64, event: u8 },
    Advance { secs: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        Just(Outcome::Completed),
        Just(Outcome::Failed),
        Just(Outcome::Cancelled)
    ];
    prop_oneof![
        5 => (0u64..=60, 1u64..=120).prop_map(|(amount, ttl_s)| Op::Reserve { amount, ttl_s }),
        2 => (0usize..8, 1u64..=120).prop_map(|(idx, ttl_s)| Op::Renew { idx, ttl_s }),
        2 => (0usize..8, 0u64..=30).prop_map(|(idx, amount)| Op::Grow { idx, amount }),
        3 => (0usize..8, 0u64..=80).prop_map(|(idx, actual)| Op::Commit { idx, actual }),
        3 => (0usize..8, outcome).prop_map(|(idx, outcome)| Op::Release { idx, outcome }),
        2 => (0u64..=50).prop_map(|amount| Op::Admit { amount }),
        1 => (0u64..=10, 0u8..3).prop_map(|(amount, event)| Op::Record { amount, event }),
        3 => (1i64..=90).prop_map(|secs| Op::Advance { secs }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    Settled,
}

#[derive(Debug)]
struct Held {
    amount: u64,
    expires: i64,
    state: State,
}

#[derive(Debug, Default)]
struct Model {
    now: i64,
    used: u64,
    holds: Vec<Held>,
    /// Evented records applied: event number -> amount.
    events: Vec<(u8, u64)>,
}

impl Model {
    fn live(&self, h: &Held) -> bool {
        h.state == State::Live && self.now < h.expires
    }
    fn held(&self) -> u64 {
        self.holds
            .iter()
            .filter(|h| self.live(h))
            .map(|h| h.amount)
            .sum()
    }
    fn slots(&self) -> usize {
        self.holds.iter().filter(|h| self.live(h)).count()
    }
    /// The error a lease op on reservation `i` must get, if any.
    fn lease_error(&self, i: usize) -> Option<&'static str> {
        let h = &self.holds[i];
        match h.state {
            State::Settled => Some("settled"),
            State::Live if self.now >= h.expires => Some("expired"),
            State::Live => None,
        }
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::ReservationSettled { .. } => "settled",
        Error::ReservationExpired { .. } => "expired",
        Error::EventConflict { .. } => "conflict",
        _ => "other",
    }
}

fn keep(outcome: Outcome, amount: u64) -> u64 {
    match outcome {
        Outcome::Completed => amount,
        Outcome::Failed => amount.div_ceil(2),
        Outcome::Cancelled => 0,
    }
}

fn run_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let start = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let clock = ManualClock::new(start);
    let e = Engine::with_clock(catalog(), clock.clone());
    e.allocate(Allocation::new("s", "p")).unwrap();
    let mut m = Model::default();
    let mut res: Vec<Reservation> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step}: {op:?}; model {m:?}");
        match *op {
            Op::Reserve { amount, ttl_s } => {
                let fits =
                    (amount == 0 || m.used + m.held() + amount <= MAX) && m.slots() < MAX_SLOTS;
                let r = e
                    .reserve(
                        &Request::new("s").units(TOKENS, amount),
                        StdDuration::from_secs(ttl_s),
                    )
                    .unwrap();
                prop_assert_eq!(r.is_ok(), fits, "{}", ctx);
                if let Ok(r) = r {
                    m.holds.push(Held {
                        amount,
                        expires: m.now + ttl_s as i64 * 1_000,
                        state: State::Live,
                    });
                    res.push(r);
                }
            }
            Op::Renew { idx, ttl_s } => {
                if idx < res.len() {
                    let want = m.lease_error(idx);
                    let got = e.renew(&mut res[idx], StdDuration::from_secs(ttl_s));
                    prop_assert_eq!(got.as_ref().err().map(kind), want, "{}", ctx);
                    if got.is_ok() {
                        m.holds[idx].expires = m.now + ttl_s as i64 * 1_000;
                    }
                }
            }
            Op::Grow { idx, amount } => {
                if idx < res.len() {
                    let want = m.lease_error(idx);
                    let got = e.grow(&mut res[idx], &Request::new("s").units(TOKENS, amount));
                    prop_assert_eq!(got.as_ref().err().map(kind), want, "{}", ctx);
                    if let Ok(d) = got {
                        m.holds[idx].amount += amount;
                        let within = amount == 0 || m.used + m.held() <= MAX;
                        prop_assert_eq!(d.allowed, within, "{}", ctx);
                    }
                }
            }
            Op::Commit { idx, actual } => {
                if idx < res.len() {
                    let want = m.lease_error(idx);
                    let got = e.commit(&res[idx], &Request::new("s").units(TOKENS, actual));
                    prop_assert_eq!(got.as_ref().err().map(kind), want, "{}", ctx);
                    if got.is_ok() {
                        m.holds[idx].state = State::Settled;
                        m.used += actual;
                    }
                }
            }
            Op::Release { idx, outcome } => {
                if idx < res.len() {
                    let want = m.lease_error(idx);
                    let got = e.release(&res[idx], outcome);
                    prop_assert_eq!(got.as_ref().err().map(kind), want, "{}", ctx);
                    if got.is_ok() {
                        m.holds[idx].state = State::Settled;
                        m.used += keep(outcome, m.holds[idx].amount);
                    }
                }
            }
            Op::Admit { amount } => {
                let fits = amount == 0 || m.used + m.held() + amount <= MAX;
                let d = e.admit(&Request::new("s").units(TOKENS, amount)).unwrap();
                prop_assert_eq!(d.allowed, fits, "{}", ctx);
                if fits {
                    m.used += amount;
                }
            }
            Op::Record { amount, event } => {
                let id = format!("ev{event}");
                let got = e.record(&Request::new("s").units(TOKENS, amount).event(&id));
                match m.events.iter().find(|(ev, _)| *ev == event) {
                    Some(&(_, first)) if first != amount => {
                        prop_assert_eq!(got.as_ref().err().map(kind), Some("conflict"), "{}", ctx);
                    }
                    Some(_) => prop_assert!(got.is_ok(), "{}", ctx),
                    None => {
                        prop_assert!(got.is_ok(), "{}", ctx);
                        // A record always applies, so it spends its id.
                        m.events.push((event, amount));
                        m.used += amount;
                    }
                }
            }
            Op::Advance { secs } => {
                clock.advance(StdDuration::from_secs(u64::try_from(secs).unwrap()));
                m.now += secs * 1_000;
            }
        }
        let report = e.usage("s").unwrap();
        let row = &report.meters[0];
        prop_assert_eq!(row.units, Decimal::from(m.used), "used after {}", ctx);
        prop_assert_eq!(row.held, Decimal::from(m.held()), "held after {}", ctx);
        prop_assert_eq!(
            report.meters[1].held,
            Decimal::from(m.slots() as u64),
            "slots after {}",
            ctx
        );
    }
    Ok(())
}

/// Run `ops` on `e`, returning every answer as text (decisions or errors).
fn history(
    e: &Engine<MemoryStore, ManualClock>,
    clock: &ManualClock,
    ops: &[Op],
    res: &mut Vec<Reservation>,
) -> Vec<String> {
    let mut out = Vec::new();
    for op in ops {
        let answer = match *op {
            Op::Reserve { amount, ttl_s } => {
                let req = Request::new("d").units(TOKENS, amount);
                match e.reserve(&req, StdDuration::from_secs(ttl_s)) {
                    Ok(Ok(r)) => {
                        let s = format!("{:?}", r.decision());
                        res.push(r);
                        s
                    }
                    other => format!("{other:?}"),
                }
            }
            Op::Renew { idx, ttl_s } => match res.get_mut(idx) {
                Some(r) => format!("{:?}", e.renew(r, StdDuration::from_secs(ttl_s))),
                None => String::new(),
            },
            Op::Grow { idx, amount } => match res.get_mut(idx) {
                Some(r) => format!("{:?}", e.grow(r, &Request::new("d").units(TOKENS, amount))),
                None => String::new(),
            },
            Op::Commit { idx, actual } => match res.get(idx) {
                Some(r) => format!(
                    "{:?}",
                    e.commit(r, &Request::new("d").units(TOKENS, actual))
                ),
                None => String::new(),
            },
            Op::Release { idx, outcome } => match res.get(idx) {
                Some(r) => format!("{:?}", e.release(r, outcome)),
                None => String::new(),
            },
            Op::Admit { amount } => {
                format!("{:?}", e.admit(&Request::new("d").units(TOKENS, amount)))
            }
            Op::Record { amount, event } => {
                let id = format!("ev{event}");
                format!(
                    "{:?}",
                    e.record(&Request::new("d").units(TOKENS, amount).event(&id))
                )
            }
            Op::Advance { secs } => {
                clock.advance(StdDuration::from_secs(u64::try_from(secs).unwrap()));
                String::new()
            }
        };
        out.push(scrub(&answer));
        out.push(format!("{:?}", e.usage("d")));
    }
    out
}

/// Lease ids are random per reservation: replace each (32 hex digits) with
/// `ID` so two engines' answers compare.
fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for ch in text.chars() {
        if ch.is_ascii_hexdigit() {
            run.push(ch);
            continue;
        }
        out.push_str(if run.len() == 32 { "ID" } else { &run });
        run.clear();
        out.push(ch);
    }
    out.push_str(if run.len() == 32 { "ID" } else { &run });
    out
}

fn run_snapshot(before: &[Op], after: &[Op]) -> Result<(), TestCaseError> {
    let start = Utc.with_ymd_and_hms(2026, 5, 31, 23, 30, 0).unwrap();
    let clock = ManualClock::new(start);
    let e = Engine::with_clock(catalog(), clock.clone());
    e.allocate(Allocation::new("d", "daily")).unwrap();
    let mut res = Vec::new();
    history(&e, &clock, before, &mut res);

    let snap = e.store().snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let back: Snapshot = serde_json::from_str(&json).unwrap();
    prop_assert_eq!(&back, &snap, "the snapshot survives JSON");
    let restored = MemoryStore::restore(back).unwrap();
    prop_assert_eq!(
        restored.snapshot(),
        snap.clone(),
        "restore holds exactly the snapshot"
    );

    let clock2 = ManualClock::new(clock.now_utc());
    let e2 = Engine::with_store_and_clock(catalog(), restored, clock2.clone());
    e2.allocate(Allocation::new("d", "daily")).unwrap();
    let mut res2 = res.clone();
    let a = history(&e, &clock, after, &mut res);
    let b = history(&e2, &clock2, after, &mut res2);
    prop_assert_eq!(a, b, "the restored store answers as the original");
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reservations_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run_model(&ops)?;
    }

    #[test]
    fn a_snapshot_round_trips_exactly(
        before in prop::collection::vec(op(), 0..60),
        after in prop::collection::vec(op(), 0..40),
    ) {
        run_snapshot(&before, &after)?;
    }
}
