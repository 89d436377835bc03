//! Money is exact: prices and amounts are never rounded on the way in, and a
//! cost is rounded up once, never down.

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tollgate::{
    Allocation, Amount, Catalog, CatalogConfig, Engine, Error, LimitConfig, ManualClock, MaxConfig,
    MemoryStore, Meter, MeterUsage, Period, PlanConfig, Request, ScopeKey, Status, Window,
};

fn engine(plan: PlanConfig) -> Engine<MemoryStore, ManualClock> {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("big"))
        .meter(Meter::count("tiny"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(plan.cost_meter("cost"))
        .build()
        .expect("catalog builds");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
    let e = Engine::with_clock(catalog, clock);
    e.allocate(Allocation::new("a", "p")).unwrap();
    e
}

fn month() -> Window {
    Window::calendar(Period::Month)
}

#[test]
fn a_tiny_term_beside_a_huge_one_still_rounds_the_cost_up() {
    // 10^12 units at $1 plus 1 unit at $10^-18: exactly 1,000,000,000,000.000000000000000001,
    // which a 28-digit decimal sum would round to a whole number.
    let e = engine(
        PlanConfig::new("p")
            .price("big", dec!(1))
            .price("tiny", dec!(0.000000000000000001)),
    );
    let d = e
        .check(
            &Request::new("a")
                .units("big", 1_000_000_000_000)
                .units("tiny", 1),
        )
        .unwrap();
    assert_eq!(d.cost.unwrap().amount, dec!(1000000000000.000001));
}

#[test]
fn money_with_more_digits_than_the_meter_keeps_rounds_up_exactly() {
    let e =
        engine(PlanConfig::new("p").limit(LimitConfig::new("cost", month(), MaxConfig::Unlimited)));
    // 29 significant digits: scaling this by 10^6 as a Decimal would round the
    // trailing 1 away and charge 1.000000.
    let amount = dec!(1.0000000000000000000000000001);
    let d = e
        .record(&Request::new("a").money("cost", amount, "USD"))
        .unwrap();
    assert_eq!(d.cost.unwrap().amount, dec!(1.000001));
    assert_eq!(d.limits[0].used, 1_000_001);
}

#[test]
fn usage_report_cost_is_exact_and_overflow_is_an_error_not_a_number() {
    let e = engine(
        PlanConfig::new("p")
            .price("tiny", dec!(0.0000001))
            .price("big", dec!(1000000))
            .limit(LimitConfig::new("tiny", month(), MaxConfig::Unlimited))
            .limit(LimitConfig::new("big", month(), MaxConfig::Unlimited)),
    );
    e.record(&Request::new("a").units("tiny", 3)).unwrap();
    let r = e.usage("a").unwrap();
    // 3 × $0.0000001 = $0.0000003, rounded up to the meter's $0.000001.
    assert_eq!(r.meters[0].cost.as_ref().unwrap().amount, dec!(0.000001));

    // 10^7 units at $10^6 is $10^13 = 10^19 micro-dollars: fits a u64.
    e.record(&Request::new("a").units("big", 10_000_000))
        .unwrap();
    let r = e.usage("a").unwrap();
    assert_eq!(r.meters[1].units, dec!(10000000));
    assert_eq!(
        r.meters[1].cost.as_ref().unwrap().amount,
        dec!(10000000000000)
    );
    // Twice that is 2 × 10^19 micro-dollars: past u64. The money charged
    // for the meter is kept as charged, so the second record cannot be kept
    // exactly: it is refused with Overflow and changes nothing, rather than
    // a report printing a made-up number.
    assert_eq!(
        e.record(&Request::new("a").units("big", 10_000_000))
            .unwrap_err(),
        Error::Overflow {
            meter: "cost".into()
        }
    );
    let r = e.usage("a").unwrap();
    assert_eq!(r.meters[1].units, dec!(10000000));
    assert_eq!(
        r.meters[1].cost.as_ref().unwrap().amount,
        dec!(10000000000000)
    );
}

#[test]
fn prices_that_a_decimal_cannot_hold_exactly_are_refused_at_load() {
    let json = |price: &str| {
        format!(
            r#"{{"meters": [{{"id": "t", "unit": "count"}},
                {{"id": "cost", "unit": {{"money": {{"currency": "USD", "scale": 6}}}}}}],
               "plans": [{{"id": "p", "cost_meter": "cost", "prices": {{"t": "{price}"}}}}]}}"#
        )
    };
    // 30 decimal places: parsing would round it to 0, making usage free and silent.
    assert!(serde_json::from_str::<Catalog>(&json("0.000000000000000000000000000001")).is_err());
    // 19 decimal places fits a Decimal but not the exact price unit.
    let err = serde_json::from_str::<Catalog>(&json("0.0000000000000000001"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plans[p].prices.t"), "{err}");
    assert!(err.contains("decimal places"), "{err}");
    // 18 is accepted and exact.
    let c: Catalog = serde_json::from_str(&json("0.000000000000000001")).unwrap();
    assert_eq!(
        c.plan("p").unwrap().price(&c, "t"),
        Some(dec!(0.000000000000000001))
    );
    assert_eq!(c.plan("p").unwrap().cost_meter(&c), Some("cost"));
    // The same through the Rust API.
    let err = CatalogConfig::default()
        .meter(Meter::count("t"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("p")
                .cost_meter("cost")
                .price("t", Decimal::new(1, 19)),
        )
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "plans[p].prices.t"),
        "{err:?}"
    );
}

#[test]
fn usage_report_says_exceeded_when_record_took_usage_past_the_maximum() {
    let e = engine(PlanConfig::new("p").limit(LimitConfig::new("big", month(), 10u64)));
    e.record(&Request::new("a").units("big", 8)).unwrap();
    assert_eq!(e.usage("a").unwrap().meters[0].status, Status::Warning);
    e.record(&Request::new("a").units("big", 17)).unwrap();
    let row = &e.usage("a").unwrap().meters[0];
    assert_eq!(row.units, dec!(25));
    assert_eq!(row.status, Status::Exceeded);
}

#[test]
fn money_meters_are_not_listed_as_unpriced() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("t"))
        .meter(Meter::money("credit", "USD", 2))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("p")
                .cost_meter("cost")
                .price("t", dec!(0.01))
                .limit(LimitConfig::new("credit", Window::Lifetime, 100u64)),
        )
        .build()
        .unwrap();
    let e = Engine::new(catalog);
    e.allocate(Allocation::new("a", "p")).unwrap();
    let d = e
        .admit(&Request::new("a").money("credit", dec!(1), "USD"))
        .unwrap();
    assert!(d.unpriced.is_empty(), "{:?}", d.unpriced);
    assert_eq!(d.cost.unwrap().amount, dec!(0));
}

/// The row of `meter` in `e.usage("a")`.
fn usage_row(e: &Engine<MemoryStore, ManualClock>, meter: &str) -> MeterUsage {
    e.usage("a")
        .unwrap()
        .meters
        .into_iter()
        .find(|m| &*m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter}"))
}

/// One public form for every amount: a priced request's cost limit reads
/// the same major-unit `Decimal` (0.99) in the decision and in the usage
/// report, and its count limit the same `u64` (1,200), though the store
/// counts the cost in micro-dollars (scale 6).
#[test]
fn a_decision_and_the_usage_report_read_amounts_in_one_form() {
    let e = engine(
        PlanConfig::new("p")
            .limit(LimitConfig::new("big", month(), 10_000u64))
            .limit(LimitConfig::new("cost", month(), dec!(5)))
            .price("big", dec!(0.000825)),
    );
    let d = e.admit(&Request::new("a").units("big", 1_200)).unwrap();
    assert!(d.allowed);
    let me = ScopeKey::subject("a");

    // The cost limit: $0.99 of a $5 cap, counted as 990,000 micro-dollars.
    let cost = d.limit(&me, "cost").expect("the cost limit is touched");
    assert_eq!((cost.used, cost.max), (990_000, Some(5_000_000)));
    assert_eq!(cost.money_scale(), Some(6));
    assert_eq!(cost.used_amount(), Amount::Money(dec!(0.99)));
    assert_eq!(cost.requested_amount(), Amount::Money(dec!(0.99)));
    assert_eq!(cost.max_amount(), Some(Amount::Money(dec!(5))));
    assert_eq!(cost.remaining_amount(), Some(Amount::Money(dec!(4.01))));
    assert_eq!(cost.held_amount(), Amount::Money(Decimal::ZERO));
    // The same number as the decision's cost.
    assert_eq!(
        cost.used_amount().money(),
        Some(d.cost.as_ref().unwrap().amount)
    );

    let row = usage_row(&e, "cost");
    assert_eq!(row.money_scale(), Some(6));
    assert_eq!(row.used_amount(), Amount::Money(dec!(0.99)));
    assert_eq!(row.used_amount(), cost.used_amount());
    assert_eq!(row.held_amount(), cost.held_amount());
    assert_eq!(row.max_amount(), cost.max_amount());
    assert_eq!(row.remaining_amount(), cost.remaining_amount());
    assert_eq!(row.used_amount().to_string(), "0.990000");

    // The count limit: 1,200 tokens everywhere, as a u64.
    let tokens = d.limit(&me, "big").expect("the token limit is touched");
    assert_eq!(tokens.money_scale(), None);
    assert_eq!(tokens.used, 1_200);
    assert_eq!(tokens.used_amount(), Amount::Units(1_200));
    assert_eq!(tokens.used_amount().units(), Some(1_200));
    assert_eq!(tokens.max_amount(), Some(Amount::Units(10_000)));
    assert_eq!(tokens.remaining_amount(), Some(Amount::Units(8_800)));
    let row = usage_row(&e, "big");
    assert_eq!(row.money_scale(), None);
    assert_eq!(row.used_amount(), Amount::Units(1_200));
    assert_eq!(row.used_amount(), tokens.used_amount());
    assert_eq!(row.max_amount(), tokens.max_amount());
    assert_eq!(row.remaining_amount(), tokens.remaining_amount());
    assert_eq!(row.used_amount().to_string(), "1200");
}

/// Holds read the same in both places too: a reservation's $0.99 estimate
/// is held as 0.99 in its decision and in the usage report.
#[test]
fn held_money_reads_in_one_form() {
    let e = engine(
        PlanConfig::new("p")
            .limit(LimitConfig::new("big", month(), MaxConfig::Unlimited))
            .limit(LimitConfig::new("cost", month(), dec!(5)))
            .price("big", dec!(0.000825)),
    );
    let res = e
        .reserve(
            &Request::new("a").units("big", 1_200),
            std::time::Duration::from_secs(60),
        )
        .unwrap()
        .expect("fits");
    let cost = res
        .decision()
        .limit(&ScopeKey::subject("a"), "cost")
        .expect("touched");
    assert_eq!(cost.held, 990_000);
    assert_eq!(cost.held_amount(), Amount::Money(dec!(0.99)));
    let row = usage_row(&e, "cost");
    assert_eq!(row.held_amount(), Amount::Money(dec!(0.99)));
    assert_eq!(row.used_amount(), Amount::Money(Decimal::ZERO));
    assert_eq!(row.remaining_amount(), Some(Amount::Money(dec!(4.01))));
    // An unlimited count limit has no maximum in either place.
    let tokens = res
        .decision()
        .limit(&ScopeKey::subject("a"), "big")
        .unwrap();
    assert_eq!(tokens.max_amount(), None);
    assert_eq!(usage_row(&e, "big").max_amount(), None);
    assert_eq!(tokens.held_amount(), Amount::Units(1_200));
}
