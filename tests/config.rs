//! Invalid configuration is refused at load with an error that names the
//! field; valid edge cases load; a good catalog round-trips.
//!
//! Each case is loaded three ways where it can be written that way: JSON
//! (`serde_json`), TOML (`toml`) and `CatalogConfig::build()`. Serde errors
//! carry `tollgate::Error`'s message, so they must contain the field path in
//! backticks; `build()` must return `Error::InvalidConfig` with that exact
//! `field`.

use rust_decimal_macros::dec;
use tollgate::{
    Catalog, CatalogConfig, Error, LimitConfig, MaxConfig, Meter, Period, PlanConfig, PoolConfig,
    Window,
};

// ---------------------------------------------------------------- helpers --

/// A JSON catalog with meters `tokens` (count), `runtime` (seconds) and
/// `cost` (USD, scale 2), and plan `p` with the given limits (a JSON array
/// body) and extra plan fields (starting with a comma, or empty).
fn json_plan(limits: &str, extra: &str) -> String {
    format!(
        r#"{{
  "meters": [
    {{"id": "tokens", "unit": "count"}},
    {{"id": "runtime", "unit": "seconds"}},
    {{"id": "cost", "unit": {{"money": {{"currency": "USD", "scale": 2}}}}}}
  ],
  "plans": [{{"id": "p", "limits": [{limits}]{extra}}}]
}}"#
    )
}

/// The same catalog in TOML; `limits` is a list of inline tables (one per
/// line) and `extra` lines go into the plan table.
fn toml_plan(limits: &[&str], extra: &str) -> String {
    let mut s = String::from(
        r#"
[[meters]]
id = "tokens"
unit = "count"

[[meters]]
id = "runtime"
unit = "seconds"

[[meters]]
id = "cost"
unit = { money = { currency = "USD", scale = 2 } }

[[plans]]
id = "p"
"#,
    );
    s.push_str(extra);
    s.push('\n');
    s.push_str("limits = [\n");
    for l in limits {
        s.push_str("  ");
        s.push_str(l);
        s.push_str(",\n");
    }
    s.push_str("]\n");
    s
}

/// The same meters for `build()`.
fn config_with(plan: PlanConfig) -> CatalogConfig {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::seconds("runtime"))
        .meter(Meter::money("cost", "USD", 2))
        .plan(plan)
}

fn month() -> Window {
    Window::calendar(Period::Month)
}

#[track_caller]
fn json_err(text: &str) -> String {
    match serde_json::from_str::<Catalog>(text) {
        Ok(c) => panic!("JSON catalog loaded but should not have: {c:?}\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn toml_err(text: &str) -> String {
    match toml::from_str::<Catalog>(text) {
        Ok(c) => panic!("TOML catalog loaded but should not have: {c:?}\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn json_ok(text: &str) -> Catalog {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("JSON catalog refused: {e}\n{text}"))
}

#[track_caller]
fn toml_ok(text: &str) -> Catalog {
    toml::from_str(text).unwrap_or_else(|e| panic!("TOML catalog refused: {e}\n{text}"))
}

/// The `field` of the `InvalidConfig` that `build()` returns.
#[track_caller]
fn build_field(config: CatalogConfig) -> String {
    match config.build() {
        Err(Error::InvalidConfig { field, reason }) => {
            assert!(!reason.is_empty(), "empty reason for {field}");
            field
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// The message names the field path, in backticks as `Error` prints it.
#[track_caller]
fn assert_names(message: &str, field: &str) {
    let quoted = format!("`{field}`");
    assert!(
        message.contains(&quoted),
        "error does not name {quoted}: {message}"
    );
    assert!(
        message.contains("invalid config"),
        "not a config error: {message}"
    );
}

/// Refused in JSON and TOML, naming `field` in both.
#[track_caller]
fn assert_refused(json: &str, toml: &str, field: &str) {
    assert_names(&json_err(json), field);
    assert_names(&toml_err(toml), field);
}

fn max_of(c: &Catalog, plan: &str, i: usize) -> Option<u64> {
    c.plan(plan).expect("plan").limits()[i].max()
}

// ------------------------------------------------------------- maximums --

#[test]
fn negative_maximum_other_than_minus_one_is_refused() {
    let field = "plans[p].limits[0].max";
    let month_json = r#""window": {"calendar": {"period": "month"}}"#;
    let month_toml = r#"window = { calendar = { period = "month" } }"#;
    for (json_max, toml_max) in [("-5", "-5"), ("\"-5\"", "\"-5\""), ("-2", "-2")] {
        assert_refused(
            &json_plan(
                &format!(r#"{{"meter": "tokens", {month_json}, "max": {json_max}}}"#),
                "",
            ),
            &toml_plan(
                &[&format!(
                    r#"{{ meter = "tokens", {month_toml}, max = {toml_max} }}"#
                )],
                "",
            ),
            field,
        );
    }
    // -1.5 as a decimal string on a money meter, and -1.00 (not "-1").
    for max in ["\"-1.5\"", "\"-1.00\""] {
        assert_names(
            &json_err(&json_plan(
                &format!(r#"{{"meter": "cost", {month_json}, "max": {max}}}"#),
                "",
            )),
            field,
        );
    }
    assert_eq!(
        build_field(config_with(PlanConfig::new("p").limit(LimitConfig::new(
            "tokens",
            month(),
            MaxConfig::Amount(dec!(-5)),
        )))),
        field
    );
    // In a pool, too.
    let pool =
        CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .pool(PoolConfig::new("q").limit(LimitConfig::new(
                "tokens",
                month(),
                MaxConfig::Amount(dec!(-5)),
            )));
    assert_eq!(build_field(pool), "pools[q].limits[0].max");
}

#[test]
fn minus_one_unlimited_and_zero_are_accepted() {
    let month_json = r#""window": {"calendar": {"period": "month"}}"#;
    let month_toml = r#"window = { calendar = { period = "month" } }"#;
    let json = json_plan(
        &[
            format!(r#"{{"meter": "tokens", {month_json}, "max": -1}}"#),
            format!(r#"{{"meter": "runtime", {month_json}, "max": "unlimited"}}"#),
            format!(r#"{{"meter": "cost", {month_json}, "max": 0}}"#),
            r#"{"meter": "tokens", "window": "lifetime", "max": "-1"}"#.to_string(),
            r#"{"meter": "cost", "window": "lifetime", "max": "0.00"}"#.to_string(),
        ]
        .join(", "),
        "",
    );
    let c = json_ok(&json);
    assert_eq!(max_of(&c, "p", 0), None);
    assert_eq!(max_of(&c, "p", 1), None);
    assert_eq!(max_of(&c, "p", 2), Some(0));
    assert_eq!(max_of(&c, "p", 3), None);
    assert_eq!(max_of(&c, "p", 4), Some(0));

    let toml = toml_plan(
        &[
            &format!(r#"{{ meter = "tokens", {month_toml}, max = -1 }}"#),
            &format!(r#"{{ meter = "runtime", {month_toml}, max = "unlimited" }}"#),
            &format!(r#"{{ meter = "cost", {month_toml}, max = 0 }}"#),
        ],
        "",
    );
    let c = toml_ok(&toml);
    assert_eq!(max_of(&c, "p", 0), None);
    assert_eq!(max_of(&c, "p", 1), None);
    assert_eq!(max_of(&c, "p", 2), Some(0));

    let c = config_with(
        PlanConfig::new("p")
            .limit(LimitConfig::new("tokens", month(), MaxConfig::Unlimited))
            .limit(LimitConfig::new("cost", month(), 0u64)),
    )
    .build()
    .expect("builds");
    assert_eq!(max_of(&c, "p", 0), None);
    assert_eq!(max_of(&c, "p", 1), Some(0));
}

#[test]
fn money_maximum_with_more_decimals_than_the_meter_keeps_is_refused() {
    let field = "plans[p].limits[0].max";
    // cost keeps 2 decimal places.
    assert_refused(
        &json_plan(
            r#"{"meter": "cost", "window": "lifetime", "max": "12.345"}"#,
            "",
        ),
        &toml_plan(
            &[r#"{ meter = "cost", window = "lifetime", max = "12.345" }"#],
            "",
        ),
        field,
    );
    // A fraction on a count meter.
    assert_names(
        &json_err(&json_plan(
            r#"{"meter": "tokens", "window": "lifetime", "max": "12.5"}"#,
            "",
        )),
        field,
    );
    assert_eq!(
        build_field(config_with(PlanConfig::new("p").limit(LimitConfig::new(
            "cost",
            month(),
            dec!(0.001),
        )))),
        field
    );
    // A maximum too large for the meter's integer (u64::MAX cents).
    assert_names(
        &json_err(&json_plan(
            r#"{"meter": "cost", "window": "lifetime", "max": 18446744073709551615}"#,
            "",
        )),
        field,
    );
    // Trailing zeros beyond the scale are the same amount: accepted.
    let c = json_ok(&json_plan(
        r#"{"meter": "cost", "window": "lifetime", "max": "12.5000"}"#,
        "",
    ));
    assert_eq!(max_of(&c, "p", 0), Some(1250));
}

#[test]
fn money_scale_above_twelve_is_refused() {
    let json =
        r#"{"meters": [{"id": "cost", "unit": {"money": {"currency": "USD", "scale": 13}}}]}"#;
    let msg = json_err(json);
    assert!(msg.contains("unit.money.scale"), "{msg}");
    assert!(msg.contains("`meters["), "{msg}");
    let toml = r#"
[[meters]]
id = "cost"
unit = { money = { currency = "USD", scale = 13 } }
"#;
    let msg = toml_err(toml);
    assert!(msg.contains("unit.money.scale"), "{msg}");
    let f = build_field(CatalogConfig::default().meter(Meter::money("cost", "USD", 13)));
    assert!(
        f.starts_with("meters[") && f.ends_with("].unit.money.scale"),
        "{f}"
    );
    // 12 is the most accepted.
    let c = CatalogConfig::default()
        .meter(Meter::money("cost", "USD", tollgate::MAX_MONEY_SCALE))
        .build()
        .expect("scale 12 builds");
    assert_eq!(c.meter("cost").unwrap().scale(), 12);
}

#[test]
fn float_maximum_is_refused_but_a_decimal_string_is_accepted() {
    for max in ["12.5", "12.0", "1e3"] {
        let msg = json_err(&json_plan(
            &format!(r#"{{"meter": "cost", "window": "lifetime", "max": {max}}}"#),
            "",
        ));
        assert!(msg.contains("float"), "{max}: {msg}");
    }
    let msg = toml_err(&toml_plan(
        &[r#"{ meter = "cost", window = "lifetime", max = 12.5 }"#],
        "",
    ));
    assert!(msg.contains("float"), "{msg}");

    let c = json_ok(&json_plan(
        r#"{"meter": "cost", "window": "lifetime", "max": "12.5"}"#,
        "",
    ));
    assert_eq!(max_of(&c, "p", 0), Some(1250));
    let c = toml_ok(&toml_plan(
        &[r#"{ meter = "cost", window = "lifetime", max = "12.5" }"#],
        "",
    ));
    assert_eq!(max_of(&c, "p", 0), Some(1250));
}

// --------------------------------------------------------------- windows --

#[test]
fn rolling_window_with_zero_buckets_or_indivisible_span_is_refused() {
    let field = "plans[p].limits[0].window";
    // Zero buckets.
    assert_refused(
        &json_plan(
            r#"{"meter": "runtime", "window": {"rolling": {"span": "7d", "buckets": 0}}, "max": 100}"#,
            "",
        ),
        &toml_plan(
            &[
                r#"{ meter = "runtime", window = { rolling = { span = "7d", buckets = 0 } }, max = 100 }"#,
            ],
            "",
        ),
        field,
    );
    // 100 s is not divisible into 7 buckets.
    assert_refused(
        &json_plan(
            r#"{"meter": "runtime", "window": {"rolling": {"span": "100s", "buckets": 7}}, "max": 100}"#,
            "",
        ),
        &toml_plan(
            &[
                r#"{ meter = "runtime", window = { rolling = { span = "100", buckets = 7 } }, max = 100 }"#,
            ],
            "",
        ),
        field,
    );
    for (span_secs, buckets) in [(3600, 0), (100, 7)] {
        assert_eq!(
            build_field(config_with(PlanConfig::new("p").limit(LimitConfig::new(
                "runtime",
                Window::Rolling { span_secs, buckets },
                100u64,
            )))),
            field
        );
    }
    // A calendar offset of 24 hours or more, and a span with an unknown unit.
    assert_refused(
        &json_plan(
            r#"{"meter": "tokens", "window": {"calendar": {"period": "day", "utc_offset": "+24:00"}}, "max": 1}"#,
            "",
        ),
        &toml_plan(
            &[
                r#"{ meter = "tokens", window = { calendar = { period = "day", utc_offset = "+24:00" } }, max = 1 }"#,
            ],
            "",
        ),
        field,
    );
    assert_names(
        &json_err(&json_plan(
            r#"{"meter": "runtime", "window": {"rolling": {"span": "7x", "buckets": 7}}, "max": 1}"#,
            "",
        )),
        field,
    );
    // The second limit is named by its index.
    assert_names(
        &json_err(&json_plan(
            r#"{"meter": "tokens", "window": "lifetime", "max": 1},
               {"meter": "runtime", "window": {"rolling": {"span": "1d", "buckets": 0}}, "max": 1}"#,
            "",
        )),
        "plans[p].limits[1].window",
    );
    // A good rolling window loads.
    let c = json_ok(&json_plan(
        r#"{"meter": "runtime", "window": {"rolling": {"span": "7d", "buckets": 168}}, "max": 18000}"#,
        "",
    ));
    assert_eq!(
        c.plan("p").unwrap().limits()[0].window(),
        Window::Rolling {
            span_secs: 7 * 86_400,
            buckets: 168
        }
    );
}

// ---------------------------------------------------------- warning ratio --

#[test]
fn warning_ratio_outside_zero_to_one_is_refused_and_one_is_accepted() {
    let field = "plans[p].limits[0].warn_at";
    for (json_ratio, toml_ratio) in [
        ("0", "0"),
        ("\"0\"", "\"0\""),
        ("\"-0.5\"", "\"-0.5\""),
        ("\"1.01\"", "\"1.01\""),
        ("2", "2"),
    ] {
        assert_refused(
            &json_plan(
                &format!(
                    r#"{{"meter": "tokens", "window": "lifetime", "max": 100, "warn_at": {json_ratio}}}"#
                ),
                "",
            ),
            &toml_plan(
                &[&format!(
                    r#"{{ meter = "tokens", window = "lifetime", max = 100, warn_at = {toml_ratio} }}"#
                )],
                "",
            ),
            field,
        );
    }
    for ratio in [dec!(0), dec!(-0.5), dec!(1.5)] {
        assert_eq!(
            build_field(config_with(
                PlanConfig::new("p")
                    .limit(LimitConfig::new("tokens", month(), 100u64).warn_at(ratio))
            )),
            field
        );
    }

    // Exactly 1 is accepted, as are small ratios.
    let c = json_ok(&json_plan(
        r#"{"meter": "tokens", "window": "lifetime", "max": 100, "warn_at": "1"},
           {"meter": "runtime", "window": "lifetime", "max": 100, "warn_at": "0.01"}"#,
        "",
    ));
    assert_eq!(c.plan("p").unwrap().limits()[0].warn_at(), dec!(1));
    assert_eq!(c.plan("p").unwrap().limits()[1].warn_at(), dec!(0.01));
    let c = toml_ok(&toml_plan(
        &[r#"{ meter = "tokens", window = "lifetime", max = 100, warn_at = "1" }"#],
        "",
    ));
    assert_eq!(c.plan("p").unwrap().limits()[0].warn_at(), dec!(1));
    let c = config_with(
        PlanConfig::new("p").limit(LimitConfig::new("tokens", month(), 100u64).warn_at(dec!(1))),
    )
    .build()
    .expect("warn_at 1 builds");
    assert_eq!(c.plan("p").unwrap().limits()[0].warn_at(), dec!(1));
    // Absent: the default.
    let c = json_ok(&json_plan(
        r#"{"meter": "tokens", "window": "lifetime", "max": 100}"#,
        "",
    ));
    assert_eq!(
        c.plan("p").unwrap().limits()[0].warn_at(),
        tollgate::DEFAULT_WARN_AT
    );
}

// ------------------------------------------------------ meters and prices --

#[test]
fn limit_for_an_unknown_meter_is_refused() {
    let field = "plans[p].limits[0].meter";
    assert_refused(
        &json_plan(
            r#"{"meter": "toknes", "window": "lifetime", "max": 100}"#,
            "",
        ),
        &toml_plan(
            &[r#"{ meter = "toknes", window = "lifetime", max = 100 }"#],
            "",
        ),
        field,
    );
    assert_eq!(
        build_field(config_with(PlanConfig::new("p").limit(LimitConfig::new(
            "toknes",
            month(),
            100u64
        )))),
        field
    );
    let msg = json_err(&json_plan(
        r#"{"meter": "toknes", "window": "lifetime", "max": 100}"#,
        "",
    ));
    assert!(msg.contains("toknes"), "{msg}");
    // In a pool.
    let pool = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .pool(PoolConfig::new("q").limit(LimitConfig::new("toknes", month(), 1u64)));
    assert_eq!(build_field(pool), "pools[q].limits[0].meter");
}

#[test]
fn price_for_an_unknown_meter_is_refused() {
    let field = "plans[p].prices.toknes";
    assert_refused(
        &json_plan(
            "",
            r#", "cost_meter": "cost", "prices": {"toknes": "0.01"}"#,
        ),
        &toml_plan(&[], "cost_meter = \"cost\"\nprices = { toknes = \"0.01\" }"),
        field,
    );
    assert_eq!(
        build_field(config_with(
            PlanConfig::new("p")
                .cost_meter("cost")
                .price("toknes", dec!(0.01))
        )),
        field
    );
    // A negative price, and a price on a money meter, name the price.
    assert_names(
        &json_err(&json_plan(
            "",
            r#", "cost_meter": "cost", "prices": {"tokens": "-0.01"}"#,
        )),
        "plans[p].prices.tokens",
    );
    assert_eq!(
        build_field(config_with(
            PlanConfig::new("p")
                .cost_meter("cost")
                .price("tokens", dec!(-0.01))
        )),
        "plans[p].prices.tokens"
    );
    assert_eq!(
        build_field(config_with(
            PlanConfig::new("p")
                .cost_meter("cost")
                .price("cost", dec!(1))
        )),
        "plans[p].prices.cost"
    );
}

#[test]
fn float_price_is_refused_but_strings_and_integers_are_accepted() {
    // Floats are never money: 0.03 as a float is refused in JSON and TOML.
    let from_json = json_err(&json_plan(
        "",
        r#", "cost_meter": "cost", "prices": {"tokens": 0.03}"#,
    ));
    let from_toml = toml_err(&toml_plan(
        &[],
        "cost_meter = \"cost\"\nprices = { tokens = 0.03 }",
    ));
    for err in [from_json, from_toml] {
        assert!(err.contains("float"), "message says why: {err}");
    }
    // A string and an integer load exactly.
    let c = json_ok(&json_plan(
        "",
        r#", "cost_meter": "cost", "prices": {"tokens": "0.03", "runtime": 2}"#,
    ));
    let prices = &c.config().plans[0].prices;
    assert_eq!(prices["tokens"], dec!(0.03));
    assert_eq!(prices["runtime"], dec!(2));
}

#[test]
fn prices_without_a_cost_meter_are_refused() {
    let field = "plans[p].cost_meter";
    assert_refused(
        &json_plan("", r#", "prices": {"tokens": "0.01"}"#),
        &toml_plan(&[], "prices = { tokens = \"0.01\" }"),
        field,
    );
    assert_eq!(
        build_field(config_with(
            PlanConfig::new("p").price("tokens", dec!(0.01))
        )),
        field
    );
}

#[test]
fn cost_meter_that_is_not_money_or_unknown_is_refused() {
    let field = "plans[p].cost_meter";
    assert_refused(
        &json_plan(
            "",
            r#", "cost_meter": "tokens", "prices": {"runtime": "0.01"}"#,
        ),
        &toml_plan(
            &[],
            "cost_meter = \"tokens\"\nprices = { runtime = \"0.01\" }",
        ),
        field,
    );
    assert_refused(
        &json_plan("", r#", "cost_meter": "runtime""#),
        &toml_plan(&[], "cost_meter = \"runtime\""),
        field,
    );
    assert_eq!(
        build_field(config_with(PlanConfig::new("p").cost_meter("tokens"))),
        field
    );
    assert_eq!(
        build_field(config_with(PlanConfig::new("p").cost_meter("dollars"))),
        field
    );
    // A good cost meter with a price loads.
    let c = json_ok(&json_plan(
        "",
        r#", "cost_meter": "cost", "prices": {"tokens": "0.01"}"#,
    ));
    assert!(c.plan("p").is_some());
}

// ------------------------------------------------------------ duplicates --

#[test]
fn duplicate_meter_ids_are_refused() {
    let json = r#"{"meters": [
        {"id": "tokens", "unit": "count"},
        {"id": "tokens", "unit": "seconds"}
    ]}"#;
    assert_names(&json_err(json), "meters[1].id");
    let toml = r#"
[[meters]]
id = "tokens"
unit = "count"

[[meters]]
id = "tokens"
unit = "seconds"
"#;
    assert_names(&toml_err(toml), "meters[1].id");
    assert_eq!(
        build_field(
            CatalogConfig::default()
                .meter(Meter::count("tokens"))
                .meter(Meter::count("jobs"))
                .meter(Meter::count("tokens"))
        ),
        "meters[2].id"
    );
}

#[test]
fn duplicate_plan_ids_are_refused() {
    let json = r#"{"meters": [{"id": "tokens", "unit": "count"}],
        "plans": [{"id": "p"}, {"id": "p", "limits": []}]}"#;
    assert_names(&json_err(json), "plans[p].id");
    let toml = r#"
[[plans]]
id = "p"

[[plans]]
id = "p"
"#;
    assert_names(&toml_err(toml), "plans[p].id");
    assert_eq!(
        build_field(
            CatalogConfig::default()
                .plan(PlanConfig::new("p"))
                .plan(PlanConfig::new("p"))
        ),
        "plans[p].id"
    );
}

#[test]
fn duplicate_pool_ids_are_refused() {
    let json = r#"{"pools": [{"id": "q"}, {"id": "q", "model": "m"}]}"#;
    assert_names(&json_err(json), "pools[q].id");
    let toml = r#"
[[pools]]
id = "q"

[[pools]]
id = "q"
"#;
    assert_names(&toml_err(toml), "pools[q].id");
    assert_eq!(
        build_field(
            CatalogConfig::default()
                .pool(PoolConfig::new("q"))
                .pool(PoolConfig::new("q").for_model("m"))
        ),
        "pools[q].id"
    );
}

#[test]
fn duplicate_limit_for_the_same_meter_and_window_is_refused() {
    let field = "plans[p].limits[1]";
    assert_refused(
        &json_plan(
            r#"{"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 100},
               {"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 200}"#,
            "",
        ),
        &toml_plan(
            &[
                r#"{ meter = "tokens", window = { calendar = { period = "month" } }, max = 100 }"#,
                r#"{ meter = "tokens", window = { calendar = { period = "month" } }, max = 200 }"#,
            ],
            "",
        ),
        field,
    );
    assert_eq!(
        build_field(config_with(
            PlanConfig::new("p")
                .limit(LimitConfig::new("tokens", Window::Lifetime, 1u64))
                .limit(LimitConfig::new("tokens", month(), 100u64))
                .limit(LimitConfig::new("tokens", month(), 200u64))
        )),
        "plans[p].limits[2]"
    );
    // "+00:00" is the same window as UTC.
    assert_names(
        &json_err(&json_plan(
            r#"{"meter": "tokens", "window": {"calendar": {"period": "day"}}, "max": 100},
               {"meter": "tokens", "window": {"calendar": {"period": "day", "utc_offset": "+00:00"}}, "max": 200}"#,
            "",
        )),
        field,
    );
    // Same meter, different windows: fine.
    let c = json_ok(&json_plan(
        r#"{"meter": "tokens", "window": {"calendar": {"period": "month"}}, "max": 100},
           {"meter": "tokens", "window": {"calendar": {"period": "day"}}, "max": 10},
           {"meter": "tokens", "window": {"calendar": {"period": "day", "utc_offset": "+09:00"}}, "max": 10}"#,
        "",
    ));
    assert_eq!(c.plan("p").unwrap().limits().len(), 3);
}

#[test]
fn empty_ids_and_currency_are_refused() {
    assert_names(
        &json_err(r#"{"meters": [{"id": "", "unit": "count"}]}"#),
        "meters[0].id",
    );
    let msg =
        json_err(r#"{"meters": [{"id": "c", "unit": {"money": {"currency": "", "scale": 2}}}]}"#);
    assert!(msg.contains("unit.money.currency"), "{msg}");
    let f = build_field(CatalogConfig::default().plan(PlanConfig::new("")));
    assert!(f.starts_with("plans["), "{f}");
    let f = build_field(CatalogConfig::default().pool(PoolConfig::new("")));
    assert!(f.starts_with("pools["), "{f}");
}

// -------------------------------------------------------- unknown fields --

#[test]
fn unknown_fields_are_refused() {
    // A typo in a plan.
    let json = r#"{"meters": [{"id": "tokens", "unit": "count"}],
        "plans": [{"id": "p", "limts": []}]}"#;
    let msg = json_err(json);
    assert!(msg.contains("unknown field `limts`"), "{msg}");
    let toml = "[[plans]]\nid = \"p\"\nlimts = []\n";
    let msg = toml_err(toml);
    assert!(msg.contains("unknown field `limts`"), "{msg}");

    // At the top level, in a meter, in a limit, in a window, in a pool.
    for (json, typo) in [
        (r#"{"meterz": []}"#, "meterz"),
        (
            r#"{"meters": [{"id": "tokens", "unit": "count", "scale": 2}]}"#,
            "scale",
        ),
        (
            r#"{"meters": [{"id": "c", "unit": {"money": {"currency": "USD", "scale": 2, "symbol": "$"}}}]}"#,
            "symbol",
        ),
        (
            &json_plan(
                r#"{"meter": "tokens", "window": "lifetime", "max": 1, "warn": "0.5"}"#,
                "",
            ),
            "warn",
        ),
        (
            &json_plan(
                r#"{"meter": "tokens", "window": {"rolling": {"span": "1d", "bucket": 24}}, "max": 1}"#,
                "",
            ),
            "bucket",
        ),
        (r#"{"pools": [{"id": "q", "modle": "m"}]}"#, "modle"),
    ] {
        let msg = json_err(json);
        assert!(
            msg.contains(&format!("unknown field `{typo}`")),
            "{typo}: {msg}"
        );
    }
}

// ------------------------------------------------------------ round trip --

fn good_config() -> CatalogConfig {
    CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::seconds("runtime"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("plan_free")
                .limit(LimitConfig::new("tokens", month(), 20_000u64))
                .limit(
                    LimitConfig::new("tokens", Window::calendar(Period::Day), 2_000u64)
                        .warn_at(dec!(0.9)),
                )
                .limit(LimitConfig::new(
                    "runtime",
                    Window::Rolling {
                        span_secs: 7 * 86_400,
                        buckets: 168,
                    },
                    18_000u64,
                ))
                .limit(LimitConfig::new("cost", month(), dec!(12.5)))
                .cost_meter("cost")
                .price("tokens", dec!(0.000003))
                .price("runtime", dec!(0.01)),
        )
        .plan(
            PlanConfig::new("plan_pro")
                .limit(LimitConfig::new("tokens", month(), MaxConfig::Unlimited))
                .limit(LimitConfig::new(
                    "runtime",
                    Window::Calendar {
                        period: Period::Week,
                        utc_offset_secs: 9 * 3600,
                    },
                    0u64,
                ))
                .limit(LimitConfig::new("cost", Window::Lifetime, dec!(1000))),
        )
        .pool(PoolConfig::new("account:acme").limit(LimitConfig::new(
            "tokens",
            month(),
            1_000_000u64,
        )))
        .pool(
            PoolConfig::new("model:opus")
                .for_model("claude-opus")
                .limit(LimitConfig::new(
                    "cost",
                    Window::calendar(Period::Day),
                    dec!(100.25),
                )),
        )
}

#[test]
fn a_good_catalog_round_trips_through_json_and_toml() {
    let catalog = good_config().build().expect("good config builds");

    let json = serde_json::to_string_pretty(&catalog).expect("serializes to JSON");
    let back: Catalog = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("JSON round trip refused: {e}\n{json}"));
    assert_eq!(back, catalog);
    assert_eq!(back.config(), catalog.config());
    // Serializing again gives the same text.
    assert_eq!(serde_json::to_string_pretty(&back).unwrap(), json);

    let toml_text = toml::to_string(&catalog).expect("serializes to TOML");
    let back: Catalog = toml::from_str(&toml_text)
        .unwrap_or_else(|e| panic!("TOML round trip refused: {e}\n{toml_text}"));
    assert_eq!(back, catalog);

    // The validated values survived.
    let free = back.plan("plan_free").unwrap();
    assert_eq!(free.limits()[0].max(), Some(20_000));
    assert_eq!(free.limits()[1].warn_at(), dec!(0.9));
    assert_eq!(free.limits()[3].max(), Some(12_500_000));
    assert_eq!(back.plan("plan_pro").unwrap().limits()[0].max(), None);
    assert_eq!(back.plan("plan_pro").unwrap().limits()[1].max(), Some(0));
    assert_eq!(
        back.pool("model:opus").unwrap().limits()[0].max(),
        Some(100_250_000)
    );

    // A catalog loaded from hand-written JSON round-trips too.
    let text = json_plan(
        r#"{"meter": "tokens", "window": {"calendar": {"period": "month", "utc_offset": "-05:30"}}, "max": -1},
           {"meter": "cost", "window": "lifetime", "max": "0.50", "warn_at": "1"}"#,
        r#", "cost_meter": "cost", "prices": {"tokens": "0.01"}"#,
    );
    let loaded = json_ok(&text);
    let again: Catalog = serde_json::from_str(&serde_json::to_string(&loaded).unwrap()).unwrap();
    assert_eq!(again, loaded);
}
