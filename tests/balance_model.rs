//! Random sequences of top-ups, admits, records, reservations, growths,
//! settlements
//! and clock moves on one prepaid balance with an overdraft, checked after
//! every step against what a balance must keep:
//!
//! - money is conserved: credited − remaining + debt equals what the
//!   decisions say was charged (each recorded decision's cost less what the
//!   balance could not cover);
//! - `admit` and `reserve` are allowed exactly when the cost fits what was
//!   available just before, and a refused one changes nothing;
//! - debt never passes the overdraft, and what is held is exactly the holds
//!   of the live reservations;
//! - a payment id credits once, and with other terms changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use tollgate::{
    Allocation, Balance, Catalog, Engine, Error, ManualClock, Outcome, Refusal, Request,
    Reservation, TopUp,
};

const PLANS: &str = r#"
[[meters]]
id = "tokens"
unit = "count"

[[meters]]
id = "cost"
unit = { money = { currency = "USD", scale = 2 } }

[[plans]]
id = "payg"
cost_meter = "cost"
balance = { overdraft = "1.00" }
limits = [{ meter = "tokens", window = "lifetime", max = -1 }]
prices = { tokens = "0.01" }
"#;

/// Lease length of every reservation.
const TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
enum Step {
    TopUp { id: u8, cents: i64 },
    Admit(u64),
    Record(u64),
    Reserve(u64),
    Grow { which: usize, more: u64 },
    Commit { which: usize, actual: u64 },
    Release { which: usize, outcome: u8 },
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..6, 1i64..300).prop_map(|(id, cents)| Step::TopUp { id, cents }),
        4 => (0u64..150).prop_map(Step::Admit),
        2 => (0u64..150).prop_map(Step::Record),
        3 => (0u64..120).prop_map(Step::Reserve),
        2 => (0usize..4, 0u64..80).prop_map(|(which, more)| Step::Grow { which, more }),
        2 => (0usize..4, 0u64..150).prop_map(|(which, actual)| Step::Commit { which, actual }),
        2 => (0usize..4, 0u8..3).prop_map(|(which, outcome)| Step::Release { which, outcome }),
        1 => (1u64..90).prop_map(Step::Advance),
    ]
}

fn cents(d: Decimal) -> i128 {
    let c = d * Decimal::from(100);
    assert_eq!(c.fract(), Decimal::ZERO, "{d} is whole cents");
    i128::try_from(c).expect("fits")
}

/// What a recorded decision charged the balance, in cents: its cost less
/// what the balance could not cover.
fn charged(d: &tollgate::Decision) -> i128 {
    if !d.recorded {
        return 0;
    }
    let cost = d.cost.as_ref().map_or(0, |c| cents(c.amount));
    let uncovered = d.balance.as_ref().map_or(0, |b| cents(b.uncovered));
    cost - uncovered
}

struct Model {
    credited: i128,
    charged: i128,
    payments: HashMap<u8, i64>,
    /// Open reservations with their hold (cents) and lease expiry (ms).
    open: Vec<(Reservation, i128, i64)>,
}

fn check(b: &Balance, m: &Model, now_ms: i64) -> Result<(), TestCaseError> {
    let (remaining, held, debt) = (cents(b.remaining), cents(b.held), cents(b.debt));
    prop_assert_eq!(
        m.credited - remaining + debt,
        m.charged,
        "conserved: credited {} remaining {} debt {}",
        m.credited,
        remaining,
        debt
    );
    prop_assert!(
        (0..=100).contains(&debt),
        "debt {debt} within the overdraft"
    );
    let live: i128 = m
        .open
        .iter()
        .filter(|(_, _, exp)| *exp > now_ms)
        .map(|(_, h, _)| h)
        .sum();
    prop_assert_eq!(held, live, "held is the live reservations' holds");
    prop_assert_eq!(cents(b.available), remaining - held - debt);
    Ok(())
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let catalog: Catalog = toml::from_str(PLANS).expect("catalog");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap());
    let engine = Engine::with_clock(catalog, clock.clone());
    engine
        .allocate(Allocation::new("s", "payg"))
        .expect("allocate");
    let mut m = Model {
        credited: 0,
        charged: 0,
        payments: HashMap::new(),
        open: Vec::new(),
    };
    let tokens = |n| Request::new("s").units("tokens", n);
    for s in steps {
        let before = engine.balance("s").expect("balance");
        let now_ms = clock.now_utc().timestamp_millis();
        match *s {
            Step::TopUp { id, cents: c } => {
                let payment = format!("pay-{id}");
                let r = engine.top_up("s", &TopUp::new(&payment, Decimal::new(c, 2), "USD"));
                match (m.payments.get(&id), r) {
                    (None, Ok(credit)) => {
                        prop_assert!(credit.new);
                        m.payments.insert(id, c);
                        m.credited += i128::from(c);
                    }
                    (Some(&was), Ok(credit)) => {
                        prop_assert_eq!(was, c, "same terms replay");
                        prop_assert!(!credit.new);
                    }
                    (Some(&was), Err(Error::GrantConflict { .. })) => prop_assert_ne!(was, c),
                    (_, r) => prop_assert!(false, "top-up {payment} {c}: {r:?}"),
                }
            }
            Step::Admit(n) | Step::Reserve(n) => {
                let fits = i128::from(n) <= cents(before.available) || n == 0;
                let reserving = matches!(s, Step::Reserve(_));
                let (allowed, d) = if reserving {
                    match engine.reserve(&tokens(n), TTL).expect("reserve") {
                        Ok(r) => {
                            m.open.push((r, i128::from(n), now_ms + 60_000));
                            (true, None)
                        }
                        Err(d) => (false, Some(d)),
                    }
                } else {
                    let d = engine.admit(&tokens(n)).expect("admit");
                    m.charged += charged(&d);
                    (d.allowed, Some(d))
                };
                prop_assert_eq!(allowed, fits, "{:?} with {} available", s, before.available);
                if let Some(d) = d.filter(|d| !d.allowed) {
                    let is_balance = matches!(d.reason, Some(Refusal::InsufficientBalance { .. }));
                    prop_assert!(is_balance, "{:?}", d.reason);
                    prop_assert_eq!(engine.balance("s").expect("balance"), before.clone());
                }
            }
            Step::Record(n) => {
                let d = engine.record(&tokens(n)).expect("record");
                prop_assert!(d.recorded || n == 0);
                m.charged += charged(&d);
            }
            Step::Grow { which, more } => {
                if m.open.is_empty() {
                    continue;
                }
                let k = which % m.open.len();
                let exp = m.open[k].2;
                match engine.grow(&mut m.open[k].0, &tokens(more)) {
                    Ok(d) => {
                        prop_assert!(exp > now_ms);
                        let fits = more == 0 || i128::from(more) <= cents(before.available);
                        // A growth is held whether or not it fit (the
                        // stream ran); the decision says whether to stop.
                        prop_assert_eq!(d.allowed, fits, "grow {} with {}", more, before.available);
                        m.open[k].1 += i128::from(more);
                        if !fits {
                            let is_balance =
                                matches!(d.reason, Some(Refusal::InsufficientBalance { .. }));
                            prop_assert!(is_balance, "{:?}", d.reason);
                        }
                    }
                    Err(Error::ReservationExpired { .. }) => prop_assert!(exp <= now_ms),
                    Err(e) => prop_assert!(false, "grow: {e:?}"),
                }
            }
            Step::Commit { which, actual } => {
                if m.open.is_empty() {
                    continue;
                }
                let (r, _, exp) = m.open.remove(which % m.open.len());
                match engine.commit(&r, &tokens(actual)) {
                    Ok(d) => {
                        prop_assert!(exp > now_ms);
                        m.charged += charged(&d);
                    }
                    Err(Error::ReservationExpired { .. }) => prop_assert!(exp <= now_ms),
                    Err(e) => prop_assert!(false, "commit: {e:?}"),
                }
            }
            Step::Release { which, outcome } => {
                if m.open.is_empty() {
                    continue;
                }
                let (r, _, exp) = m.open.remove(which % m.open.len());
                let outcome =
                    [Outcome::Completed, Outcome::Failed, Outcome::Cancelled][usize::from(outcome)];
                match engine.release(&r, outcome) {
                    Ok(d) => {
                        prop_assert!(exp > now_ms);
                        m.charged += charged(&d);
                    }
                    Err(Error::ReservationExpired { .. }) => prop_assert!(exp <= now_ms),
                    Err(e) => prop_assert!(false, "release: {e:?}"),
                }
            }
            Step::Advance(secs) => clock.advance(Duration::from_secs(secs)),
        }
        let now_ms = clock.now_utc().timestamp_millis();
        check(&engine.balance("s").expect("balance"), &m, now_ms)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn a_balance_keeps_its_money_exactly(steps in prop::collection::vec(step(), 1..60)) {
        run(&steps)?;
    }
}
