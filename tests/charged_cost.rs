//! Cost as charged (issue 15, deliverable 3): a usage report shows, per
//! meter, the money charged when the usage was counted, at the prices of the
//! plan in force then. A plan change or a new price never re-prices past
//! usage; reservations charge what their decisions' costs said. On the
//! memory store, and through Redis (`TOLLGATE_REDIS_URL`) and PostgreSQL
//! (`TOLLGATE_POSTGRES_URL`) when those are set (skipped otherwise).

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tollgate::{
    Allocation, Catalog, Engine, ManualClock, MemoryStore, Outcome, Request, UsageReport,
};

/// Takos-like plans: `free` has no prices; `payg` prices input tokens at
/// $0.03 and output tokens at $0.15; `payg2` is `payg` with input at $0.05
/// and at most 10 output tokens a month;
/// `odd` prices input at $0.000333 (costs that round) and output at
/// $0.0000005 (half a micro-dollar).
fn catalog_json(payg_input_price: &str) -> String {
    format!(
        r#"{{
      "meters": [{{"id": "tok_in", "unit": "count"}}, {{"id": "tok_out", "unit": "count"}},
                 {{"id": "jobs", "unit": "count"}},
                 {{"id": "cost", "unit": {{"money": {{"currency": "USD", "scale": 6}}}}}}],
      "plans": [
        {{"id": "free",
         "limits": [{{"meter": "tok_in", "window": {{"calendar": {{"period": "month"}}}}, "max": 20000}},
                    {{"meter": "tok_out", "window": {{"calendar": {{"period": "month"}}}}, "max": 10000}}]}},
        {{"id": "payg", "cost_meter": "cost",
         "prices": {{"tok_in": "{payg_input_price}", "tok_out": "0.15"}},
         "limits": [{{"meter": "tok_in", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}},
                    {{"meter": "tok_out", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}},
                    {{"meter": "jobs", "window": "concurrent", "max": 4}},
                    {{"meter": "cost", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}}]}},
        {{"id": "payg2", "cost_meter": "cost",
         "prices": {{"tok_in": "0.05", "tok_out": "0.15"}},
         "limits": [{{"meter": "tok_in", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}},
                    {{"meter": "tok_out", "window": {{"calendar": {{"period": "month"}}}}, "max": 10}},
                    {{"meter": "cost", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}}]}},
        {{"id": "odd", "cost_meter": "cost",
         "prices": {{"tok_in": "0.000333", "tok_out": "0.0000005"}},
         "limits": [{{"meter": "tok_in", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}},
                    {{"meter": "tok_out", "window": {{"rolling": {{"span": "7d", "buckets": 7}}}}, "max": -1}},
                    {{"meter": "cost", "window": {{"calendar": {{"period": "month"}}}}, "max": -1}}]}}
      ]
    }}"#
    )
}

fn catalog() -> Catalog {
    serde_json::from_str(&catalog_json("0.03")).unwrap()
}

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap())
}

/// The report's row for `meter`: (units, cost) with cost as a decimal.
fn row(r: &UsageReport, meter: &str) -> (Decimal, Option<Decimal>) {
    let m = r
        .meters
        .iter()
        .find(|m| m.meter == meter)
        .unwrap_or_else(|| panic!("no row for {meter}"));
    (m.units, m.cost.as_ref().map(|c| c.amount))
}

#[test]
fn free_to_payg_mid_month_keeps_free_tokens_charged_at_zero() {
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("acct", "free")).unwrap();
    e.admit(&Request::new("acct").units("tok_in", 15_000))
        .unwrap();
    // A plan without prices reports no cost.
    assert_eq!(
        row(&e.usage("acct").unwrap(), "tok_in"),
        (dec!(15000), None)
    );

    e.allocate(Allocation::new("acct", "payg")).unwrap();
    let r = e.usage("acct").unwrap();
    // The free-tier tokens still count (plan change keeps usage) but were
    // charged nothing: $0, not 15,000 × $0.03 = $450.
    assert_eq!(row(&r, "tok_in"), (dec!(15000), Some(dec!(0))));
    assert_eq!(row(&r, "tok_out"), (dec!(0), Some(dec!(0))));

    // New usage is priced at PAYG prices, and only it.
    let d = e
        .admit(
            &Request::new("acct")
                .units("tok_in", 100)
                .units("tok_out", 10),
        )
        .unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(4.5));
    let r = e.usage("acct").unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(15100), Some(dec!(3))));
    assert_eq!(row(&r, "tok_out"), (dec!(10), Some(dec!(1.5))));
    assert_eq!(row(&r, "cost").0, dec!(4.5));

    // Takos's `/usage` mapping (the UsageReport doc example) reads the
    // charged cost: 300 cents for the input tokens, not 45,300.
    let tok = r.meters.iter().find(|m| m.meter == "tok_in").unwrap();
    let cents = tok.cost.as_ref().map(|c| (c.amount * dec!(100)).ceil());
    assert_eq!(cents, Some(dec!(300)));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["meters"][0]["cost"]["amount"], "3.000000");

    // Back to free: the month's charge is still reported as charged, in
    // the cost meter it was charged in, although Free has none.
    e.allocate(Allocation::new("acct", "free")).unwrap();
    assert_eq!(
        row(&e.usage("acct").unwrap(), "tok_in"),
        (dec!(15100), Some(dec!(3)))
    );
    // And on PAYG again, the month's charge is still $3.
    e.allocate(Allocation::new("acct", "payg")).unwrap();
    assert_eq!(
        row(&e.usage("acct").unwrap(), "tok_in"),
        (dec!(15100), Some(dec!(3)))
    );
}

#[test]
fn a_price_change_never_reprices_past_usage() {
    // Through a plan change.
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("a", "payg")).unwrap();
    e.record(&Request::new("a").units("tok_in", 100)).unwrap();
    e.allocate(Allocation::new("a", "payg2")).unwrap();
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(100), Some(dec!(3)))
    );
    e.record(&Request::new("a").units("tok_in", 100)).unwrap();
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(200), Some(dec!(8)))
    );

    // Through a new catalog (same plan id, new price) on the same store.
    let store = Arc::new(MemoryStore::new());
    let old = Engine::with_store_and_clock(catalog(), store.clone(), clock());
    old.allocate(Allocation::new("b", "payg")).unwrap();
    old.admit(&Request::new("b").units("tok_in", 1_000))
        .unwrap();
    let repriced: Catalog = serde_json::from_str(&catalog_json("0.07")).unwrap();
    let new = Engine::with_store_and_clock(repriced, store, clock());
    new.allocate(Allocation::new("b", "payg")).unwrap();
    assert_eq!(
        row(&new.usage("b").unwrap(), "tok_in"),
        (dec!(1000), Some(dec!(30)))
    );
    new.admit(&Request::new("b").units("tok_in", 10)).unwrap();
    assert_eq!(
        row(&new.usage("b").unwrap(), "tok_in"),
        (dec!(1010), Some(dec!(30.7)))
    );
}

#[test]
fn a_retried_event_is_charged_once() {
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("a", "payg")).unwrap();
    let req = Request::new("a").units("tok_in", 100).event("evt-1");
    e.admit(&req).unwrap();
    let again = e.admit(&req).unwrap();
    assert_eq!(again.cost.as_ref().unwrap().amount, dec!(3));
    let rec = Request::new("a").units("tok_in", 10).event("evt-2");
    e.record(&rec).unwrap();
    e.record(&rec).unwrap();
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(110), Some(dec!(3.3)))
    );
}

#[test]
fn reservations_charge_what_their_decisions_said() {
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("a", "odd")).unwrap();
    let ttl = Duration::from_secs(600);
    let cost_of = |d: &tollgate::Decision| d.cost.as_ref().unwrap().amount;

    // Hold: nothing charged yet.
    let mut res = e
        .reserve(&Request::new("a").units("tok_in", 1_000), ttl)
        .unwrap()
        .unwrap();
    assert_eq!(cost_of(res.decision()), dec!(0.333));
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(0), Some(dec!(0)))
    );
    // Grow, then commit the actual: exactly the commit's cost is charged.
    e.grow(&mut res, &Request::new("a").units("tok_in", 7))
        .unwrap();
    let d = e
        .commit(&res, &Request::new("a").units("tok_in", 701))
        .unwrap();
    // 701 × $0.000333 = $0.233433.
    assert_eq!(cost_of(&d), dec!(0.233433));
    let r = e.usage("a").unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(701), Some(dec!(0.233433))));
    assert_eq!(row(&r, "cost").0, dec!(0.233433));

    // Release failed: the plan keeps 50 % of the hold, and the release's
    // decision says what that charges: ceil(0.5 × 333 µ$) = 167 µ$... of a
    // 1,001-token hold: 1,001 × 0.000333 = 0.333333, half rounded up.
    let res = e
        .reserve(&Request::new("a").units("tok_in", 1_001), ttl)
        .unwrap()
        .unwrap();
    assert_eq!(cost_of(res.decision()), dec!(0.333333));
    let d = e.release(&res, Outcome::Failed).unwrap();
    assert_eq!(cost_of(&d), dec!(0.166667));
    let r = e.usage("a").unwrap();
    // Units: 701 + ceil(1,001 / 2) = 1,202; cost: 0.233433 + 0.166667.
    assert_eq!(row(&r, "tok_in"), (dec!(1202), Some(dec!(0.4001))));
    assert_eq!(row(&r, "cost").0, dec!(0.4001));

    // Cancelled: nothing kept, nothing charged.
    let res = e
        .reserve(&Request::new("a").units("tok_in", 50), ttl)
        .unwrap()
        .unwrap();
    let d = e.release(&res, Outcome::Cancelled).unwrap();
    assert_eq!(cost_of(&d), dec!(0));
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(1202), Some(dec!(0.4001)))
    );

    // An expired hold charges nothing either.
    let _res = e
        .reserve(&Request::new("a").units("tok_in", 50), ttl)
        .unwrap()
        .unwrap();
    e.clock().advance(chrono::Duration::minutes(11));
    assert_eq!(
        row(&e.usage("a").unwrap(), "tok_in"),
        (dec!(1202), Some(dec!(0.4001)))
    );
}

#[test]
fn each_meters_share_rounds_up_on_its_own() {
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("a", "odd")).unwrap();
    // 1 × $0.000333 + 1 × $0.0000005 = $0.0003335: the decision's cost is
    // rounded up once (334 µ$); each meter's share is rounded up on its own
    // (333 µ$ and 1 µ$, never 0): they add up to at most one micro-dollar
    // more per further priced meter.
    let d = e
        .record(&Request::new("a").units("tok_in", 1).units("tok_out", 1))
        .unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(0.000334));
    let r = e.usage("a").unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(1), Some(dec!(0.000333))));
    // A rolling window keeps its charge beside its units.
    assert_eq!(row(&r, "tok_out"), (dec!(1), Some(dec!(0.000001))));
    assert_eq!(row(&r, "cost").0, dec!(0.000334));
    // After the rolling window has passed, the output tokens and their
    // charge have both left it; the monthly input row keeps its own.
    e.clock().advance(chrono::Duration::days(8));
    let r = e.usage("a").unwrap();
    assert_eq!(row(&r, "tok_out"), (dec!(0), Some(dec!(0))));
    assert_eq!(row(&r, "tok_in"), (dec!(1), Some(dec!(0.000333))));
}

#[test]
fn a_check_or_a_refused_admit_charges_nothing() {
    let e = Engine::with_clock(catalog(), clock());
    e.allocate(Allocation::new("a", "payg2")).unwrap();
    e.admit(&Request::new("a").units("tok_in", 100)).unwrap();
    let d = e.check(&Request::new("a").units("tok_in", 100)).unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(5));
    // 11 output tokens on a limit of 10: refused, nothing counted or charged.
    let d = e
        .admit(&Request::new("a").units("tok_in", 100).units("tok_out", 11))
        .unwrap();
    assert!(!d.allowed);
    let r = e.usage("a").unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(100), Some(dec!(5))));
    assert_eq!(row(&r, "tok_out"), (dec!(0), Some(dec!(0))));
    // A concurrent limit has no money row.
    e.allocate(Allocation::new("a", "payg")).unwrap();
    assert_eq!(row(&e.usage("a").unwrap(), "jobs").1, None);
}

#[test]
fn meter_ids_with_control_characters_are_refused() {
    let json = r#"{"meters": [{"id": "tok\u001fcharged:cost", "unit": "count"}]}"#;
    let err = serde_json::from_str::<Catalog>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("control character"), "{err}");
    let ok = r#"{"meters": [{"id": "tok charged:cost", "unit": "count"}]}"#;
    assert!(serde_json::from_str::<Catalog>(ok).is_ok());
}

/// The same story through the async engine on any store: free usage
/// charged 0 after a move to PAYG, a commit and a failed release charged as
/// their decisions said.
#[cfg(any(feature = "redis", feature = "postgres"))]
async fn charged_story<S: tollgate::store::AsyncAllowanceStore>(
    e: &Engine<S, ManualClock>,
    subject: &str,
) {
    e.allocate(Allocation::new(subject, "free")).unwrap();
    e.admit_async(&Request::new(subject).units("tok_in", 15_000))
        .await
        .unwrap();
    e.allocate(Allocation::new(subject, "odd")).unwrap();
    let r = e.usage_async(subject).await.unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(15000), Some(dec!(0))));

    let ttl = Duration::from_secs(600);
    let res = e
        .reserve_async(&Request::new(subject).units("tok_in", 1_000), ttl)
        .await
        .unwrap()
        .unwrap();
    let d = e
        .commit_async(&res, &Request::new(subject).units("tok_in", 701))
        .await
        .unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(0.233433));
    let res = e
        .reserve_async(&Request::new(subject).units("tok_in", 1_001), ttl)
        .await
        .unwrap()
        .unwrap();
    let d = e.release_async(&res, Outcome::Failed).await.unwrap();
    assert_eq!(d.cost.as_ref().unwrap().amount, dec!(0.166667));
    e.record_async(&Request::new(subject).units("tok_in", 1).units("tok_out", 1))
        .await
        .unwrap();
    let r = e.usage_async(subject).await.unwrap();
    assert_eq!(row(&r, "tok_in"), (dec!(16203), Some(dec!(0.400433))));
    assert_eq!(row(&r, "tok_out"), (dec!(1), Some(dec!(0.000001))));
    assert_eq!(row(&r, "cost").0, dec!(0.400434));
}

#[cfg(any(feature = "redis", feature = "postgres"))]
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[cfg(feature = "redis")]
#[test]
fn charged_cost_through_redis() {
    let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") else {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    };
    if url.is_empty() {
        eprintln!("skipped: TOLLGATE_REDIS_URL not set");
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let store = tollgate::store::RedisConfig::new(url)
            .prefix(format!(
                "tollgate-test:charged:{}:{nanos}",
                std::process::id()
            ))
            .time_source(tollgate::store::TimeSource::Batch)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to TOLLGATE_REDIS_URL");
        let e = Engine::with_store_and_clock(catalog(), store, clock());
        charged_story(&e, "acct-redis").await;
    });
}

#[cfg(feature = "postgres")]
#[test]
fn charged_cost_through_postgres() {
    let Ok(url) = std::env::var("TOLLGATE_POSTGRES_URL") else {
        eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
        return;
    };
    if url.is_empty() {
        eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let store = tollgate::store::PostgresConfig::new(&url)
            .schema(format!("tg_test_charged_{}_{nanos}", std::process::id()))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to TOLLGATE_POSTGRES_URL");
        store.migrate().await.expect("migrate");
        let e = Engine::with_store_and_clock(catalog(), store, clock());
        charged_story(&e, "acct-pg").await;
        e.store().drop_schema().await.expect("drop schema");
    });
}
