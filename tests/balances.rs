//! Prepaid balances and credit grants at the engine (seed 003's
//! pay-as-you-go plan): top-ups, spending in the same step as the limits,
//! refusals with their own reason, reservations holding balance, overdraft,
//! expiry to the millisecond, snapshots, and bad input that changes nothing.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
#[cfg(feature = "http")]
use tollgate::http::HttpMapping;
use tollgate::{
    Allocation, Balance, Catalog, Engine, Error, ManualClock, MemoryStore, Outcome, Refusal,
    Request, ScopeKey, Status, TopUp,
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
balance = {}
limits = [{ meter = "tokens", window = { calendar = { period = "month" } }, max = -1 }]
prices = { tokens = "0.01" }

[[plans]]
id = "payg_overdraft"
cost_meter = "cost"
balance = { overdraft = "1.00" }
limits = [{ meter = "tokens", window = { calendar = { period = "month" } }, max = -1 }]
prices = { tokens = "0.01" }

[[plans]]
id = "capped"
cost_meter = "cost"
balance = {}
limits = [{ meter = "tokens", window = { calendar = { period = "month" } }, max = 50 }]
prices = { tokens = "0.01" }

[[plans]]
id = "team"
cost_meter = "cost"
balance = { pool = "acct" }
limits = [{ meter = "tokens", window = { calendar = { period = "month" } }, max = -1 }]
prices = { tokens = "0.01" }

[[plans]]
id = "quota_only"
limits = [{ meter = "tokens", window = { calendar = { period = "month" } }, max = 100 }]

[[pools]]
id = "acct"
"#;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap()
}

fn engine() -> (Engine<MemoryStore, Arc<ManualClock>>, Arc<ManualClock>) {
    let catalog: Catalog = toml::from_str(PLANS).expect("catalog");
    let clock = Arc::new(ManualClock::new(start()));
    let engine = Engine::with_clock(catalog, clock.clone());
    for (subject, plan) in [
        ("ann", "payg"),
        ("ovd", "payg_overdraft"),
        ("cap", "capped"),
        ("quota", "quota_only"),
    ] {
        engine.allocate(Allocation::new(subject, plan)).unwrap();
    }
    for subject in ["t1", "t2"] {
        engine
            .allocate(Allocation::new(subject, "team").with_pool("acct"))
            .unwrap();
    }
    (engine, clock)
}

fn usd(cents: i64) -> Decimal {
    Decimal::new(cents, 2)
}

fn tokens(subject: &str, n: u64) -> Request<'_> {
    Request::new(subject).units("tokens", n)
}

fn remaining(b: &Balance) -> Decimal {
    b.remaining
}

#[test]
fn payg_walks_top_up_spend_refusal_and_top_up_again() {
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/takos_plans.toml")).expect("catalog");
    let engine = Engine::new(catalog.clone());
    engine
        .allocate(Allocation::new("acct-1", "plan_payg"))
        .unwrap();

    // No credit yet: a priced request is refused with its own reason (402).
    let d = engine
        .admit(&Request::new("acct-1").units("llm_tokens_input", 10))
        .unwrap();
    assert!(!d.allowed && !d.recorded);
    assert_eq!(d.status, Status::Exceeded);
    assert!(matches!(
        d.reason,
        Some(Refusal::InsufficientBalance { ref needed, .. }) if needed.amount == Decimal::new(3, 1)
    ));
    // Over HTTP: 402 Payment Required, with its own error code.
    #[cfg(feature = "http")]
    {
        let mapping = HttpMapping::default();
        assert_eq!(
            mapping.status(&catalog, &d),
            Some(http::StatusCode::PAYMENT_REQUIRED)
        );
        let body = mapping.refusal_body(&catalog, &d).unwrap();
        assert!(body.contains(r#""error":"insufficient_balance""#), "{body}");
    }

    // A $1.00 pack, then 30 input tokens at $0.03 = $0.90.
    let c = engine
        .top_up("acct-1", &TopUp::new("pack-1", usd(100), "USD"))
        .unwrap();
    assert!(c.new);
    assert_eq!(c.balance.available, usd(100));
    let d = engine
        .admit(&Request::new("acct-1").units("llm_tokens_input", 30))
        .unwrap();
    assert!(d.allowed && d.recorded, "{d:?}");
    let b = d.balance.as_deref().expect("balance shown");
    assert_eq!(b.remaining, usd(10));
    assert_eq!(b.grants.len(), 1);
    assert_eq!(b.grants[0].id, "pack-1");
    assert_eq!(b.grants[0].remaining, usd(10));

    // $0.15 of output does not fit $0.10: refused, nothing spent.
    let d = engine
        .admit(&Request::new("acct-1").units("llm_tokens_output", 1))
        .unwrap();
    assert!(!d.allowed);
    assert!(matches!(
        d.reason,
        Some(Refusal::InsufficientBalance { ref available, .. }) if available.amount == usd(10)
    ));
    assert_eq!(engine.balance("acct-1").unwrap().remaining, usd(10));

    // Spend to exactly zero, then the next cent is refused.
    assert!(
        engine
            .admit(&Request::new("acct-1").units("embedding_count", 10))
            .unwrap()
            .allowed
    );
    assert_eq!(engine.balance("acct-1").unwrap().available, Decimal::ZERO);
    assert!(
        !engine
            .admit(&Request::new("acct-1").units("wfp_requests", 1))
            .unwrap()
            .allowed
    );

    // Another pack: admitted again; the usage report shows the balance.
    engine
        .top_up("acct-1", &TopUp::new("pack-2", usd(500), "USD"))
        .unwrap();
    assert!(
        engine
            .admit(&Request::new("acct-1").units("llm_tokens_output", 1))
            .unwrap()
            .allowed
    );
    let report = engine.usage("acct-1").unwrap();
    let b = report.balance.expect("report shows the balance");
    assert_eq!(b.remaining, usd(485));
    assert_eq!(b.grants.len(), 1, "the spent pack is gone: {:?}", b.grants);
}

#[test]
fn a_request_of_zero_cost_passes_an_empty_balance() {
    let (engine, _) = engine();
    let d = engine.admit(&tokens("ann", 0)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.status, Status::Ok);
    let b = d.balance.expect("balance shown");
    assert_eq!(b.available, Decimal::ZERO);
}

#[test]
fn a_limit_and_the_balance_are_one_step() {
    let (engine, _) = engine();
    engine
        .top_up("cap", &TopUp::new("p", usd(10_000), "USD"))
        .unwrap();
    // The limit (50 tokens) refuses first: the balance is untouched and
    // the reason is the limit's.
    let d = engine.admit(&tokens("cap", 51)).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.reason, Some(Refusal::LimitExceeded));
    assert_eq!(engine.balance("cap").unwrap().remaining, usd(10_000));
    // With the balance short, the tokens are not counted either.
    let (engine, _) = self::engine();
    engine
        .top_up("cap", &TopUp::new("p", usd(5), "USD"))
        .unwrap();
    let d = engine.admit(&tokens("cap", 10)).unwrap();
    assert!(!d.allowed);
    assert!(matches!(
        d.reason,
        Some(Refusal::InsufficientBalance { .. })
    ));
    assert_eq!(d.binding, None);
    let usage = engine.usage("cap").unwrap();
    assert_eq!(usage.meters[0].units, Decimal::ZERO, "no token counted");
    assert!(engine.admit(&tokens("cap", 5)).unwrap().allowed);
    assert_eq!(
        engine.usage("cap").unwrap().meters[0].units,
        Decimal::from(5)
    );
}

#[test]
fn top_ups_credit_once_per_payment_and_conflicts_are_typed() {
    let (engine, clock) = engine();
    let t = TopUp::new("pi_1", usd(2_000), "USD");
    let first = engine.top_up("ann", &t).unwrap();
    assert!(first.new);
    assert_eq!(first.balance.grants[0].effective_at, clock.now_utc());
    // The webhook comes again an hour later: same payment, credited once.
    clock.advance(Duration::from_secs(3_600));
    let again = engine.top_up("ann", &t).unwrap();
    assert!(!again.new, "a redelivered webhook credits once");
    assert_eq!(again.granted_at, first.granted_at);
    assert_eq!(remaining(&again.balance), usd(2_000));
    assert_eq!(again.balance.grants[0].effective_at, first.granted_at);

    let other = TopUp::new("pi_1", usd(2_500), "USD");
    match engine.top_up("ann", &other) {
        Err(Error::GrantConflict { payment }) => assert_eq!(payment, "pi_1"),
        other => panic!("expected GrantConflict, got {other:?}"),
    }
    let b = engine.balance("ann").unwrap();
    assert_eq!(b.remaining, usd(2_000));
    assert_eq!(b.grants.len(), 1);
}

#[test]
fn bad_top_ups_get_typed_errors_and_change_nothing() {
    let (engine, clock) = engine();
    engine
        .top_up("ann", &TopUp::new("ok", usd(100), "USD"))
        .unwrap();
    let before = engine.balance("ann").unwrap();
    let now = clock.now_utc();
    let long_id = "p".repeat(tollgate::MAX_PAYMENT_ID_BYTES + 1);
    let cases: Vec<(TopUp<'_>, &str)> = vec![
        (TopUp::new("z", Decimal::ZERO, "USD"), "invalid"),
        (TopUp::new("n", usd(-100), "USD"), "invalid"),
        (TopUp::new("f", Decimal::new(1, 3), "USD"), "invalid"),
        (TopUp::new("", usd(100), "USD"), "invalid"),
        (TopUp::new(&long_id, usd(100), "USD"), "invalid"),
        (TopUp::new("pay\u{0}1", usd(100), "USD"), "invalid"),
        (TopUp::new("pay\n1", usd(100), "USD"), "invalid"),
        (
            TopUp::new("e", usd(100), "USD")
                .effective_at(now)
                .expires_at(now - chrono::Duration::seconds(1)),
            "invalid",
        ),
        (
            TopUp::new("e2", usd(100), "USD")
                .effective_at(now + chrono::Duration::hours(1))
                .expires_at(now + chrono::Duration::hours(1)),
            "invalid",
        ),
        (TopUp::new("c", usd(100), "EUR"), "currency"),
        (TopUp::new("ok", usd(200), "USD"), "conflict"),
        (
            TopUp::new("big", Decimal::from(u64::MAX), "USD"),
            "overflow",
        ),
    ];
    for (t, kind) in &cases {
        let e = engine.top_up("ann", t).unwrap_err();
        let matched = match *kind {
            "invalid" => matches!(e, Error::InvalidTopUp { .. }),
            "currency" => matches!(e, Error::CurrencyMismatch { .. }),
            "conflict" => matches!(e, Error::GrantConflict { .. }),
            _ => matches!(e, Error::Overflow { .. }),
        };
        assert!(matched, "{t:?}: expected {kind}, got {e:?}");
        assert_eq!(
            engine.balance("ann").unwrap(),
            before,
            "{t:?} changed the balance"
        );
    }
    // A plan without a balance, an unknown subject.
    assert!(matches!(
        engine.top_up("quota", &TopUp::new("q", usd(1), "USD")),
        Err(Error::NoBalance { .. })
    ));
    assert!(matches!(
        engine.balance("quota"),
        Err(Error::NoBalance { .. })
    ));
    assert!(matches!(
        engine.top_up("nobody", &TopUp::new("q", usd(1), "USD")),
        Err(Error::UnknownSubject { .. })
    ));
    // Grants past a u64 together: overflow, nothing changed.
    let near = Decimal::from(u64::MAX / 100 - 1_000);
    engine.top_up("ovd", &TopUp::new("a", near, "USD")).unwrap();
    let before = engine.balance("ovd").unwrap();
    assert!(matches!(
        engine.top_up("ovd", &TopUp::new("b", near, "USD")),
        Err(Error::Overflow { .. })
    ));
    assert_eq!(engine.balance("ovd").unwrap(), before);
}

#[test]
fn grants_are_spent_by_priority_then_soonest_expiry() {
    let (engine, clock) = engine();
    let now = clock.now_utc();
    let soon = now + chrono::Duration::hours(1);
    let later = now + chrono::Duration::hours(2);
    engine
        .top_up("ann", &TopUp::new("forever", usd(100), "USD"))
        .unwrap();
    engine
        .top_up(
            "ann",
            &TopUp::new("later", usd(100), "USD").expires_at(later),
        )
        .unwrap();
    engine
        .top_up("ann", &TopUp::new("soon", usd(100), "USD").expires_at(soon))
        .unwrap();
    engine
        .top_up("ann", &TopUp::new("last", usd(100), "USD").priority(9))
        .unwrap();
    let order: Vec<String> = engine
        .balance("ann")
        .unwrap()
        .grants
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(order, ["soon", "later", "forever", "last"]);

    // $1.50 takes all of `soon` and half of `later`.
    let d = engine.admit(&tokens("ann", 150)).unwrap();
    let b = d.balance.unwrap();
    let left: Vec<(String, Decimal)> = b
        .grants
        .iter()
        .map(|g| (g.id.clone(), g.remaining))
        .collect();
    assert_eq!(
        left,
        [
            ("later".to_owned(), usd(50)),
            ("forever".to_owned(), usd(100)),
            ("last".to_owned(), usd(100)),
        ]
    );
}

#[test]
fn an_expired_grant_stops_counting_to_the_millisecond() {
    let (engine, clock) = engine();
    let expiry = clock.now_utc() + chrono::Duration::minutes(10);
    engine
        .top_up(
            "ann",
            &TopUp::new("promo", usd(100), "USD").expires_at(expiry),
        )
        .unwrap();
    clock.set(expiry - chrono::Duration::milliseconds(1));
    assert_eq!(engine.balance("ann").unwrap().available, usd(100));
    assert!(engine.check(&tokens("ann", 100)).unwrap().allowed);
    clock.set(expiry);
    let b = engine.balance("ann").unwrap();
    assert_eq!(b.available, Decimal::ZERO);
    assert!(b.grants.is_empty());
    assert!(!engine.admit(&tokens("ann", 1)).unwrap().allowed);
    // Once a call applied at or after the expiry (a top-up here), the
    // clock stepping back does not bring the expired grant back.
    engine
        .top_up("ann", &TopUp::new("pack", usd(50), "USD"))
        .unwrap();
    clock.rewind(Duration::from_secs(60));
    assert_eq!(engine.balance("ann").unwrap().available, usd(50));
    assert!(engine.admit(&tokens("ann", 50)).unwrap().allowed);
    assert!(!engine.admit(&tokens("ann", 1)).unwrap().allowed);
}

#[test]
fn a_top_up_already_expired_is_kept_and_never_counts() {
    let (engine, clock) = engine();
    let promo = TopUp::new("promo", usd(100), "USD").expires_at(clock.now_utc());
    let c = engine.top_up("ann", &promo).unwrap();
    assert!(c.new);
    assert_eq!(c.balance.available, Decimal::ZERO);
    assert!(c.balance.grants.is_empty());
    // Redelivered a day later: found, not credited again, not an error.
    clock.advance(Duration::from_secs(86_400));
    assert!(!engine.top_up("ann", &promo).unwrap().new);
    assert!(!engine.admit(&tokens("ann", 1)).unwrap().allowed);
}

#[test]
fn a_grant_counts_from_when_it_takes_effect() {
    let (engine, clock) = engine();
    let from = clock.now_utc() + chrono::Duration::hours(1);
    engine
        .top_up(
            "ann",
            &TopUp::new("next", usd(100), "USD").effective_at(from),
        )
        .unwrap();
    let b = engine.balance("ann").unwrap();
    assert_eq!(b.available, Decimal::ZERO);
    assert_eq!(b.grants.len(), 1, "a grant not yet effective is listed");
    assert!(!engine.admit(&tokens("ann", 1)).unwrap().allowed);
    clock.set(from);
    assert!(engine.admit(&tokens("ann", 1)).unwrap().allowed);
}

#[test]
fn reservations_hold_balance_and_settle_exactly() {
    let (engine, _) = engine();
    engine
        .top_up("ann", &TopUp::new("p", usd(100), "USD"))
        .unwrap();
    let ttl = Duration::from_secs(300);

    // Hold $0.60; only $0.40 left for anything else.
    let r = engine
        .reserve(&tokens("ann", 60), ttl)
        .unwrap()
        .expect("reserved");
    let b = engine.balance("ann").unwrap();
    assert_eq!(
        (b.remaining, b.held, b.available),
        (usd(100), usd(60), usd(40))
    );
    let refused = engine
        .reserve(&tokens("ann", 41), ttl)
        .unwrap()
        .unwrap_err();
    assert!(matches!(
        refused.reason,
        Some(Refusal::InsufficientBalance { .. })
    ));
    assert!(!engine.admit(&tokens("ann", 41)).unwrap().allowed);

    // Commit $0.25 actually used: the hold goes, $0.25 is spent.
    let d = engine.commit(&r, &tokens("ann", 25)).unwrap();
    assert!(d.allowed);
    let b = engine.balance("ann").unwrap();
    assert_eq!((b.remaining, b.held), (usd(75), Decimal::ZERO));

    // A failed job keeps half its hold (the plan's default refund policy).
    let r = engine
        .reserve(&tokens("ann", 40), ttl)
        .unwrap()
        .expect("reserved");
    engine.release(&r, Outcome::Failed).unwrap();
    let b = engine.balance("ann").unwrap();
    assert_eq!((b.remaining, b.held), (usd(55), Decimal::ZERO));

    // A cancelled one gives everything back.
    let r = engine
        .reserve(&tokens("ann", 40), ttl)
        .unwrap()
        .expect("reserved");
    engine.release(&r, Outcome::Cancelled).unwrap();
    assert_eq!(engine.balance("ann").unwrap().remaining, usd(55));
}

#[test]
fn an_expired_reservation_frees_its_hold() {
    let (engine, clock) = engine();
    engine
        .top_up("ann", &TopUp::new("p", usd(100), "USD"))
        .unwrap();
    let _r = engine
        .reserve(&tokens("ann", 100), Duration::from_secs(60))
        .unwrap()
        .expect("reserved");
    assert_eq!(engine.balance("ann").unwrap().available, Decimal::ZERO);
    clock.advance(Duration::from_secs(61));
    assert_eq!(engine.balance("ann").unwrap().available, usd(100));
    assert!(engine.admit(&tokens("ann", 100)).unwrap().allowed);
}

#[test]
fn record_goes_below_zero_only_within_the_overdraft() {
    let (engine, _) = engine();
    // No overdraft: what the balance cannot cover is uncovered, never debt.
    engine
        .top_up("ann", &TopUp::new("p", usd(50), "USD"))
        .unwrap();
    let d = engine.record(&tokens("ann", 80)).unwrap();
    assert!(d.recorded && !d.allowed);
    assert_eq!(d.status, Status::Exceeded);
    let b = d.balance.unwrap();
    assert_eq!(
        (b.remaining, b.debt, b.uncovered),
        (Decimal::ZERO, Decimal::ZERO, usd(30))
    );

    // $1.00 of overdraft: $0.50 of grants, then debt up to $1.00.
    engine
        .top_up("ovd", &TopUp::new("p", usd(50), "USD"))
        .unwrap();
    let d = engine.record(&tokens("ovd", 120)).unwrap();
    assert!(d.allowed, "within the overdraft: {d:?}");
    let b = d.balance.unwrap();
    assert_eq!(
        (b.remaining, b.debt, b.available),
        (Decimal::ZERO, usd(70), usd(-70))
    );
    // admit never spends into the overdraft.
    assert!(!engine.admit(&tokens("ovd", 1)).unwrap().allowed);
    let d = engine.record(&tokens("ovd", 50)).unwrap();
    let b = d.balance.unwrap();
    assert_eq!((b.debt, b.uncovered), (usd(100), usd(20)));
    assert!(!d.allowed);
    // A top-up repays the debt first.
    let c = engine
        .top_up("ovd", &TopUp::new("q", usd(150), "USD"))
        .unwrap();
    assert_eq!(
        (c.balance.debt, c.balance.available),
        (Decimal::ZERO, usd(50))
    );
}

#[test]
fn a_pool_balance_is_shared_by_its_subjects() {
    let (engine, _) = engine();
    engine
        .top_up("t1", &TopUp::new("acct-pack", usd(100), "USD"))
        .unwrap();
    let d = engine.admit(&tokens("t2", 70)).unwrap();
    assert!(d.allowed);
    let b = d.balance.unwrap();
    assert_eq!(b.scope, ScopeKey::pool("acct"));
    assert_eq!(engine.balance("t1").unwrap().available, usd(30));
    assert!(!engine.admit(&tokens("t1", 31)).unwrap().allowed);
}

#[test]
fn an_event_id_debits_once() {
    let (engine, _) = engine();
    engine
        .top_up("ann", &TopUp::new("p", usd(100), "USD"))
        .unwrap();
    for _ in 0..3 {
        assert!(
            engine
                .record(&tokens("ann", 10).event("ev-1"))
                .unwrap()
                .allowed
        );
    }
    assert_eq!(engine.balance("ann").unwrap().remaining, usd(90));
}

#[test]
fn eight_threads_spending_one_balance_never_overdraw_it() {
    let (engine, _) = engine();
    engine
        .top_up("ann", &TopUp::new("p", usd(100), "USD"))
        .unwrap();
    let engine = Arc::new(engine);
    let admitted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let engine = engine.clone();
                s.spawn(move || {
                    (0..40)
                        .filter(|_| engine.admit(&tokens("ann", 1)).unwrap().allowed)
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(admitted, 100);
    let b = engine.balance("ann").unwrap();
    assert_eq!((b.remaining, b.debt), (Decimal::ZERO, Decimal::ZERO));
}

#[test]
fn a_snapshot_keeps_balances_and_their_payments() {
    let (engine, clock) = engine();
    let expiry = clock.now_utc() + chrono::Duration::hours(1);
    engine
        .top_up("ann", &TopUp::new("p1", usd(100), "USD").expires_at(expiry))
        .unwrap();
    engine.admit(&tokens("ann", 30)).unwrap();
    let before = engine.balance("ann").unwrap();
    let snapshot = engine.store().snapshot();
    assert_eq!(snapshot.balance_count(), 1);
    let json = serde_json::to_string(&snapshot).unwrap();

    let catalog: Catalog = toml::from_str(PLANS).unwrap();
    let store = MemoryStore::restore(serde_json::from_str(&json).unwrap()).unwrap();
    let restored = Engine::with_store_and_clock(catalog, store, clock.clone());
    restored.allocate(Allocation::new("ann", "payg")).unwrap();
    assert_eq!(restored.balance("ann").unwrap(), before);
    // The payment is still known: a redelivery credits nothing.
    let again = restored
        .top_up("ann", &TopUp::new("p1", usd(100), "USD").expires_at(expiry))
        .unwrap();
    assert!(!again.new);
    assert_eq!(again.balance.remaining, usd(70));
}

#[test]
fn a_balance_serializes_with_exact_amounts() {
    let (engine, _) = engine();
    engine
        .top_up("ann", &TopUp::new("p", usd(1_999), "USD"))
        .unwrap();
    let json = serde_json::to_value(engine.balance("ann").unwrap()).unwrap();
    assert_eq!(json["remaining"], "19.99");
    assert_eq!(json["currency"], "USD");
    assert_eq!(json["grants"][0]["id"], "p");
    let d = engine.admit(&tokens("ann", 1)).unwrap();
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["balance"]["remaining"], "19.98");
}

#[test]
fn bad_balance_config_is_refused_with_its_field() {
    let base = |plan: &str| {
        format!(
            "[[meters]]\nid = \"tokens\"\nunit = \"count\"\n[[meters]]\nid = \"cost\"\nunit = {{ money = {{ currency = \"USD\", scale = 2 }} }}\n[[plans]]\nid = \"p\"\n{plan}\n"
        )
    };
    let cases = [
        ("balance = {}", "plans[p].cost_meter"),
        (
            "cost_meter = \"cost\"\nbalance = { overdraft = \"-1\" }",
            "plans[p].balance.overdraft",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { overdraft = \"0.001\" }",
            "plans[p].balance.overdraft",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { pool = \"nope\" }",
            "plans[p].balance.pool",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { overdraft = \"99999999999999999999999\" }",
            "plans[p].balance.overdraft",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { overdraft = 1.5 }",
            "amount 1.5 is a float",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { pool = \"gpt\" }\n[[pools]]\nid = \"gpt\"\nmodel = \"gpt-5\"",
            "is a model's global pool",
        ),
        (
            "cost_meter = \"cost\"\nbalance = { overdraft = \"1\", limit = 3 }",
            "unknown field `limit`",
        ),
    ];
    for (plan, field) in cases {
        let err = toml::from_str::<Catalog>(&base(plan))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{plan}: {err}");
    }
    assert!(toml::from_str::<Catalog>(&base(
        "cost_meter = \"cost\"\nbalance = { overdraft = \"2.50\" }"
    ))
    .is_ok());
}

#[test]
fn a_store_that_keeps_no_balance_is_an_error_not_free_credit() {
    use tollgate::store::{AllowanceStore, Applied, Batch, LeaseInfo};

    /// Answers every batch as the memory store does, without its balance.
    #[derive(Default)]
    struct Forgetful(MemoryStore);
    impl AllowanceStore for Forgetful {
        fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
            let mut without = *batch;
            without.balance = None;
            self.0.apply(&without)
        }
        fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
            self.0.overdue(now)
        }
    }
    let catalog: Catalog = toml::from_str(PLANS).unwrap();
    let engine = Engine::with_store_and_clock(catalog, Forgetful::default(), tollgate::SystemClock);
    engine.allocate(Allocation::new("ann", "payg")).unwrap();
    assert!(matches!(
        engine.admit(&tokens("ann", 1)),
        Err(Error::Store { .. })
    ));
}

#[test]
fn a_reservation_settles_on_its_balance_after_a_plan_change() {
    // Opened on ann's own balance; ann then moves to the team plan, whose
    // balance is the pool's: the commit charges where the hold was.
    let (engine, _) = engine();
    engine
        .top_up("ann", &TopUp::new("own", usd(100), "USD"))
        .unwrap();
    let r = engine
        .reserve(&tokens("ann", 40), Duration::from_secs(60))
        .unwrap()
        .expect("reserved");
    engine
        .allocate(Allocation::new("ann", "team").with_pool("acct"))
        .unwrap();
    let d = engine.commit(&r, &tokens("ann", 30)).unwrap();
    assert!(d.allowed && d.recorded);
    engine.allocate(Allocation::new("ann", "payg")).unwrap();
    let b = engine.balance("ann").unwrap();
    assert_eq!(
        (b.remaining, b.held),
        (usd(70), usd(0)),
        "charged where it held"
    );

    // Moved to a plan with no balance: a release still settles the hold.
    let r = engine
        .reserve(&tokens("ann", 20), Duration::from_secs(60))
        .unwrap()
        .expect("reserved");
    engine
        .allocate(Allocation::new("ann", "quota_only"))
        .unwrap();
    engine.release(&r, Outcome::Cancelled).unwrap();
    engine.allocate(Allocation::new("ann", "payg")).unwrap();
    let b = engine.balance("ann").unwrap();
    assert_eq!((b.remaining, b.held), (usd(70), usd(0)), "hold given back");
}

#[test]
fn a_short_balance_is_the_reason_even_when_a_limit_refuses_too() {
    // 60 tokens: past the 50-token cap and past the $0.05 balance. Waiting
    // for the cap would not help: the reason is the balance (402), the
    // binding limit is still named, and there is no retry time.
    let (engine, _) = engine();
    engine
        .top_up("cap", &TopUp::new("p", usd(5), "USD"))
        .unwrap();
    let d = engine.admit(&tokens("cap", 60)).unwrap();
    assert!(!d.allowed);
    assert!(matches!(
        d.reason,
        Some(Refusal::InsufficientBalance { ref needed, ref available })
            if needed.amount == usd(60) && available.amount == usd(5)
    ));
    assert_eq!(d.retry_after, None);
    assert_eq!(
        d.binding_limit().map(|l| l.meter.to_string()),
        Some("tokens".into())
    );
}

#[test]
fn a_release_whose_kept_share_is_uncovered_says_what_it_needed() {
    // The grant under a reservation expires before the work completes:
    // the kept $1.00 cannot be covered, and the refusal says $1.00.
    let (engine, clock) = engine();
    let expiry = clock.now_utc() + chrono::Duration::seconds(30);
    engine
        .top_up(
            "ann",
            &TopUp::new("promo", usd(100), "USD").expires_at(expiry),
        )
        .unwrap();
    let r = engine
        .reserve(&tokens("ann", 100), Duration::from_secs(60))
        .unwrap()
        .expect("reserved");
    clock.advance(Duration::from_secs(31));
    let d = engine.release(&r, Outcome::Completed).unwrap();
    assert_eq!(d.cost.as_ref().map(|c| c.amount), Some(usd(100)));
    assert_eq!(d.balance.as_ref().unwrap().uncovered, usd(100));
    assert!(matches!(
        d.reason,
        Some(Refusal::InsufficientBalance { ref needed, .. }) if needed.amount == usd(100)
    ));
}

#[test]
fn only_a_pools_members_spend_its_balance() {
    let (engine, _) = engine();
    engine
        .top_up("t1", &TopUp::new("acct-pack", usd(100), "USD"))
        .unwrap();
    // Not drawing on the pool: refused at allocate, and nothing bound.
    let e = engine
        .allocate(Allocation::new("stranger", "team"))
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidConfig { ref field, .. } if field == "pools"),
        "{e:?}"
    );
    assert!(matches!(
        engine.admit(&tokens("stranger", 1)),
        Err(Error::UnknownSubject { .. })
    ));
    // Ann, already on her own plan, keeps it when the move is refused.
    assert!(engine.allocate(Allocation::new("ann", "team")).is_err());
    assert!(matches!(
        engine.top_up("ann", &TopUp::new("own", usd(1), "USD")),
        Ok(c) if c.balance.scope == ScopeKey::subject("ann")
    ));
    assert_eq!(engine.balance("t2").unwrap().available, usd(100));

    // Over HTTP, a member is not shown the account's money.
    #[cfg(feature = "http")]
    {
        let catalog: Catalog = toml::from_str(PLANS).unwrap();
        let d = engine.admit(&tokens("t1", 101)).unwrap();
        assert!(!d.allowed);
        let body = HttpMapping::default().refusal_body(&catalog, &d).unwrap();
        assert!(body.contains(r#""error":"insufficient_balance""#), "{body}");
        assert!(body.contains(r#""needed":"1.01""#), "{body}");
        assert!(!body.contains("available"), "{body}");
    }
}
