//! Shared fixture: the Takos plans of seed 003 as a `tollgate::CatalogConfig`,
//! built by hand from `tests/data/takos_plans.csv`.

use rust_decimal::Decimal;
use tollgate::{CatalogConfig, LimitConfig, MaxConfig, Meter, Period, PlanConfig, Window};

/// The rolling 7-day agent runtime window every plan has (hourly buckets).
pub const RUNTIME_WINDOW: Window = Window::Rolling {
    span_secs: 7 * 86_400,
    buckets: 168,
};

/// The rolling runtime maximum: 5 hours per 7 days.
pub const RUNTIME_MAX: u64 = 18_000;

/// The money meter that prices are charged to.
pub const COST_METER: &str = "cost";

/// The runtime meter, separate from `exec_seconds`.
pub const RUNTIME_METER: &str = "agent_runtime_seconds";

/// One data row of the CSV.
struct Row {
    plan: String,
    meter: String,
    max: MaxConfig,
    price: Option<Decimal>,
}

fn rows() -> Vec<Row> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/takos_plans.csv");
    let text = std::fs::read_to_string(path).expect("read takos_plans.csv");
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let header = lines.next().expect("csv header");
    assert_eq!(header, "plan,meter,limit,price_cents_per_unit");
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            assert_eq!(f.len(), 4, "bad csv row `{line}`");
            let limit: i64 = f[2].parse().expect("integer limit");
            let max = match limit {
                -1 => MaxConfig::Unlimited,
                n => MaxConfig::Amount(Decimal::from(
                    u64::try_from(n).expect("limit is -1 or non-negative"),
                )),
            };
            let price = (!f[3].is_empty()).then(|| {
                let cents: u64 = f[3].parse().expect("integer cents");
                Decimal::from(cents) / Decimal::from(100)
            });
            Row {
                plan: f[0].to_owned(),
                meter: f[1].to_owned(),
                max,
                price,
            }
        })
        .collect()
}

fn meter_of(id: &str) -> Meter {
    if id.ends_with("_seconds") {
        Meter::seconds(id)
    } else {
        Meter::count(id)
    }
}

/// The Takos catalog configuration: every CSV meter, the runtime meter and the
/// `cost` meter (USD, scale 6); per plan a monthly (UTC) quota per CSV row,
/// the rolling runtime limit, and — for a plan with prices — its unit prices
/// on the `cost` meter. Callers may add pools before building.
pub fn takos_config() -> CatalogConfig {
    let rows = rows();
    let mut config = CatalogConfig::default();
    let mut meter_ids: Vec<&str> = Vec::new();
    let mut plan_ids: Vec<&str> = Vec::new();
    for r in &rows {
        if !meter_ids.contains(&r.meter.as_str()) {
            meter_ids.push(&r.meter);
        }
        if !plan_ids.contains(&r.plan.as_str()) {
            plan_ids.push(&r.plan);
        }
    }
    for id in &meter_ids {
        config = config.meter(meter_of(id));
    }
    config = config
        .meter(Meter::seconds(RUNTIME_METER))
        .meter(Meter::money(COST_METER, "USD", 6));
    for plan_id in plan_ids {
        let mut plan = PlanConfig::new(plan_id);
        let mut priced = false;
        for r in rows.iter().filter(|r| r.plan == plan_id) {
            plan = plan.limit(LimitConfig::new(
                r.meter.as_str(),
                Window::calendar(Period::Month),
                r.max.clone(),
            ));
            if let Some(p) = r.price {
                plan = plan.price(r.meter.as_str(), p);
                priced = true;
            }
        }
        plan = plan.limit(LimitConfig::new(RUNTIME_METER, RUNTIME_WINDOW, RUNTIME_MAX));
        if priced {
            plan = plan.cost_meter(COST_METER);
        }
        config = config.plan(plan);
    }
    config
}
