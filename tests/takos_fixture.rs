//! The TOML catalog the quickstart loads agrees with the seed-003 plan table.

use rust_decimal::Decimal;
use tollgate::{Catalog, Period, Window};

#[test]
fn toml_catalog_matches_the_takos_csv() {
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/takos_plans.toml")).expect("catalog loads");
    let csv = include_str!("data/takos_plans.csv");
    let mut rows = 0;
    for line in csv.lines().filter(|l| !l.starts_with('#')).skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (plan_id, meter, limit, price) = (f[0], f[1], f[2], f[3]);
        let plan = catalog.plan(plan_id).expect("plan present");
        let l = plan
            .limits()
            .iter()
            .find(|l| l.meter() == meter)
            .unwrap_or_else(|| panic!("{plan_id} has a limit on {meter}"));
        assert_eq!(l.window(), Window::calendar(Period::Month));
        let want: i64 = limit.parse().unwrap();
        assert_eq!(l.max(), u64::try_from(want).ok(), "{plan_id}.{meter}");
        let cost = catalog
            .config()
            .plans
            .iter()
            .find(|p| p.id == plan_id)
            .unwrap();
        let got = cost.prices.get(meter).copied();
        let want = (!price.is_empty())
            .then(|| Decimal::from(price.parse::<i64>().unwrap()) / Decimal::from(100));
        assert_eq!(got, want, "price of {plan_id}.{meter}");
        rows += 1;
    }
    assert_eq!(rows, 30);
    for plan in ["plan_free", "plan_plus", "plan_payg"] {
        let l = catalog
            .plan(plan)
            .unwrap()
            .limits()
            .iter()
            .find(|l| l.meter() == "agent_runtime_seconds")
            .expect("runtime limit");
        assert_eq!(l.max(), Some(18_000));
        assert_eq!(
            l.window(),
            Window::Rolling {
                span_secs: 7 * 86_400,
                buckets: 168
            }
        );
    }
}
