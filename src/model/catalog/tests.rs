//! Unit tests of the catalog: prices, costs, table sizes.

use super::plan::{cost_minor, POW10};
use super::{MAX_MONEY_SCALE, MAX_PRICE_SCALE};
use crate::{CatalogConfig, LimitConfig, Meter, Period, PlanConfig, Window};

/// A plan's cost meter carries what the catalog says of that meter (of
/// two money meters, the one named), and its conversion is the meter's.
#[test]
fn a_plans_cost_meter_is_the_catalogs_meter() {
    let day = Window::calendar(Period::Day);
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tok"))
        .meter(Meter::money("eur", "EUR", 2))
        .meter(Meter::money("usd", "USD", 6))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new("tok", day, 10u64))
                .cost_meter("usd"),
        )
        .plan(PlanConfig::new("free").limit(LimitConfig::new("tok", day, 10u64)))
        .build()
        .unwrap();
    let plan = &catalog.plans["p"];
    let cm = plan.cost.expect("a cost meter");
    assert_eq!(Some(cm.idx), plan.cost_meter);
    assert_eq!(&*cm.id, "usd");
    assert_eq!(cm.scale, 6);
    assert_eq!(&*cm.currency, "USD");
    let meter = &catalog.meters[cm.idx];
    for minor in [0, 1, 1_234_567, u64::MAX] {
        assert_eq!(cm.to_decimal(minor), meter.to_decimal(minor));
    }
    assert_eq!(cm.to_decimal(1_234_567).to_string(), "1.234567");
    assert!(catalog.plans["free"].cost.is_none());
}

/// `cost_minor` in plain u128 arithmetic, as it was first written.
fn reference(terms: &[(u64, u128)], scale: u32) -> Option<u64> {
    let mut total: u128 = 0;
    for &(units, price) in terms {
        total = total.checked_add(u128::from(units).checked_mul(price)?)?;
    }
    let div = 10u128.pow(MAX_PRICE_SCALE - scale);
    u64::try_from(total / div + u128::from(total % div != 0)).ok()
}

#[test]
fn cost_minor_is_the_exact_ceiling_on_both_sides_of_u64() {
    let big = u128::from(u64::MAX);
    let units = [
        0,
        1,
        7,
        100,
        999_999,
        u64::from(u32::MAX),
        u64::MAX - 1,
        u64::MAX,
    ];
    let prices = [
        0,
        1,
        3_000_000_000_000,
        10u128.pow(18),
        big,
        big + 1,
        big * 1_000,
        u128::MAX / 2,
        u128::MAX,
    ];
    for scale in 0..=MAX_MONEY_SCALE {
        for &u in &units {
            for &p in &prices {
                let one = [(u, p)];
                assert_eq!(
                    cost_minor(one, scale),
                    reference(&one, scale),
                    "{u} × {p} @ {scale}"
                );
                let two = [(u, p), (u / 3 + 1, p / 7 + 1)];
                assert_eq!(
                    cost_minor(two, scale),
                    reference(&two, scale),
                    "{two:?} @ {scale}"
                );
            }
        }
    }
    // Rounds up, once: 100 tokens at $0.000003 is $0.0003 at scale 6;
    // one token at $0.0000031 is $0.000004.
    assert_eq!(cost_minor([(100, 3_000_000_000_000)], 6), Some(300));
    assert_eq!(cost_minor([(1, 3_100_000_000_000)], 6), Some(4));
    // Past u64 after rounding: an overflow, never a wrapped amount.
    assert_eq!(cost_minor([(u64::MAX, 10u128.pow(18))], 0), Some(u64::MAX));
    assert_eq!(cost_minor([(u64::MAX, 10u128.pow(18) + 1)], 0), None);
}

#[test]
fn short_id_comparison_is_string_equality() {
    let ids = [
        "",
        "a",
        "ab",
        "abc",
        "jobs",
        "cost",
        "costs",
        "abcdefg",
        "abcdefgh",
        "abcdefgi",
        "bbcdefgh",
        "runtime_seconds",
        "runtime_secondz",
        "xuntime_seconds",
        "llm_tokens_input",
        "llm_tokens_inpuT",
        "llm_tokens_input!",
        "ünï",
        "ünïcödé",
    ];
    for a in ids {
        for b in ids {
            assert_eq!(
                super::same_bytes(a.as_bytes(), b.as_bytes()),
                a == b,
                "{a} {b}"
            );
        }
    }
    // Every length from 0 to 20, one byte changed at every position.
    for n in 0..=20usize {
        let a: Vec<u8> = (0..n as u8).collect();
        assert!(super::same_bytes(&a, &a.clone()));
        for i in 0..n {
            let mut b = a.clone();
            b[i] ^= 0x80;
            assert!(!super::same_bytes(&a, &b), "{n} {i}");
        }
    }
}

/// `meters` count meters, one money meter `usd`, and `plans` plans:
/// plan `i` limits meter `i`, prices meter `i + 1` and charges `usd`;
/// every third plan sets no cost meter and no price.
fn wide_catalog(meters: usize, plans: usize) -> crate::Catalog {
    use rust_decimal::Decimal;
    let day = Window::calendar(Period::Day);
    let mut c = CatalogConfig::default().meter(Meter::money("usd", "USD", 6));
    for m in 0..meters {
        c = c.meter(Meter::count(format!("m{m}")));
    }
    for p in 0..plans {
        let mut plan = PlanConfig::new(format!("p{p}")).limit(LimitConfig::new(
            format!("m{}", p % meters),
            day,
            10u64,
        ));
        if p % 3 != 0 {
            plan = plan
                .cost_meter("usd")
                .price(format!("m{}", (p + 1) % meters), Decimal::new(3, 2));
        }
        c = c.plan(plan);
    }
    c.build().unwrap()
}

/// Issue 13: 4,000 meters × 4,000 plans peaked at 934 MB, because each
/// plan kept three tables with one entry per catalog meter. A plan's own
/// tables now hold its limits and its prices, nothing per meter.
#[test]
fn a_plans_tables_are_sized_by_the_plan_not_the_catalog() {
    let catalog = wide_catalog(4_000, 4_000);
    let own: usize = catalog
        .config()
        .plans
        .iter()
        .map(|p| p.limits.len() + p.prices.len())
        .sum();
    let stored: usize = catalog.plans.values().map(|p| p.table_entries()).sum();
    assert_eq!(
        stored, own,
        "per-plan entries beyond the plans' limits and prices"
    );
    for plan in catalog.plans.values() {
        assert!(
            plan.table_entries() <= 2,
            "{}: {}",
            plan.id,
            plan.table_entries()
        );
    }
}

/// Building a catalog stores entries linear in its size: twice the
/// meters and twice the plans hold at most twice the entries (a table
/// per plan and meter held four times as many).
#[test]
fn catalog_tables_grow_linearly_with_meters_and_plans() {
    let small = wide_catalog(500, 500).table_entries();
    let large = wide_catalog(1_000, 1_000).table_entries();
    assert!(large <= 2 * small + 8, "{small} -> {large}");
    assert!(large >= 2 * small - 8, "{small} -> {large}");
}

/// The sparse tables answer every meter index as the dense tables did:
/// a price where the plan sets one; unpriced for any meter, limited or
/// not, when the plan has a cost meter, no price for it and it is not
/// money; nothing for an index past the catalog.
#[test]
fn price_and_unpriced_answers_match_the_per_meter_rule() {
    use rust_decimal::Decimal;
    let day = Window::calendar(Period::Day);
    let mut c = CatalogConfig::default()
        .meter(Meter::money("usd", "USD", 6))
        .meter(Meter::money("eur", "EUR", 2))
        .meter(Meter::seconds("runtime"));
    for m in 0..20 {
        c = c.meter(Meter::count(format!("m{m}")));
    }
    // Prices on ten meters (past the scan, into the binary search), in
    // no particular order.
    let mut many = PlanConfig::new("many").cost_meter("usd");
    for m in [17, 3, 9, 0, 12, 5, 19, 1, 14, 7] {
        many = many.price(format!("m{m}"), Decimal::new(m + 1, 3));
    }
    let catalog = c
        .plan(many)
        .plan(
            PlanConfig::new("few")
                .cost_meter("eur")
                .limit(LimitConfig::new("m4", day, 10u64))
                .price("runtime", Decimal::new(25, 1)),
        )
        .plan(PlanConfig::new("free").limit(LimitConfig::new("m4", day, 10u64)))
        .build()
        .unwrap();
    let n = catalog.meters.len();
    for (id, plan) in &catalog.plans {
        let priced = &catalog
            .config()
            .plans
            .iter()
            .find(|p| &p.id == id)
            .unwrap()
            .prices;
        for idx in 0..n + 3 {
            let meter = catalog.meters.get(idx);
            let price = meter.and_then(|m| priced.get(&m.id).copied());
            assert_eq!(
                plan.price_units_of(idx).is_some(),
                price.is_some(),
                "{id} {idx}"
            );
            if let (Some(m), Some(p)) = (meter, price) {
                assert_eq!(plan.price(&catalog, &m.id), Some(p));
                let want =
                    u128::try_from(p.mantissa()).unwrap() * 10u128.pow(MAX_PRICE_SCALE - p.scale());
                assert_eq!(plan.price_units_of(idx), Some(want), "{id} {idx}");
            }
            let want = meter.and_then(|m| {
                (plan.cost_meter.is_some() && price.is_none() && m.currency().is_none())
                    .then(|| catalog.meter_ids[idx])
            });
            assert_eq!(plan.unpriced_of(idx), want, "{id} {idx}");
        }
    }
    // Spot checks in words: a meter with no limit in the plan is still
    // unpriced; money never is; without a cost meter nothing is.
    let m2 = catalog.meter_idx("m2").unwrap();
    assert_eq!(catalog.plans["few"].unpriced_of(m2).as_deref(), Some("m2"));
    assert_eq!(
        catalog.plans["few"].unpriced_of(catalog.meter_idx("usd").unwrap()),
        None
    );
    assert_eq!(catalog.plans["free"].unpriced_of(m2), None);
}

#[test]
fn pow10_table_holds_the_powers_of_ten() {
    for (n, &p) in POW10.iter().enumerate() {
        assert_eq!(p, 10u64.pow(n as u32));
    }
    assert_eq!(POW10.len(), MAX_PRICE_SCALE as usize + 1);
}
