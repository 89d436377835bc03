//! Model-based property test of the engine over the memory store.
//!
//! Random sequences of `admit`, `record`, `check` and clock moves run against
//! an [`Engine`] on a [`ManualClock`] and against a tiny reference model: a
//! list of recorded events `(time, subject, amount)`. Calendar usage is the sum
//! of events in the current UTC day / ISO week / month (computed with chrono,
//! independently of the crate's own period arithmetic); rolling usage is the
//! sum of events whose bucket `b = floor(t / width)` satisfies
//! `b + buckets + 1 > floor(now / width)`: usage in bucket `[b, b + width)`
//! leaves at `b + width + span`, never early, at most one bucket late.
//!
//! After every operation the engine's decision — `allowed`, `recorded`,
//! `status`, and per limit `used`, `remaining`, `status`, `period_start` and
//! `resets_at` (the next period start; for rolling windows, when the oldest
//! counted event's bucket leaves) —
//! must match the model's prediction, and an `admit` must never take a
//! counter past its maximum.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tollgate::{
    Allocation, CatalogConfig, Decision, Engine, LimitConfig, ManualClock, Meter, Period,
    PlanConfig, PoolConfig, Request, ScopeKey, Status, Window,
};

const METER: &str = "tokens";
const PLAN: &str = "plan";
const POOL: &str = "shared";
const SUBJECTS: [&str; 2] = ["alice", "bob"];
const DAY_SECS: u64 = 86_400;

/// A limit as the model sees it.
#[derive(Debug, Clone, Copy)]
struct Spec {
    window: Window,
    max: u64,
}

impl Spec {
    /// Smallest usage that is `Warning` at the default ratio 0.8: ceil(0.8 max).
    fn warn_threshold(&self) -> u64 {
        (self.max * 4).div_ceil(5)
    }
}

/// The subject plan: calendar day, ISO week and month, and a rolling 24 h
/// window in `buckets` buckets. Small maxima so limits are hit often.
fn plan_specs(buckets: u32) -> Vec<Spec> {
    vec![
        Spec {
            window: Window::calendar(Period::Day),
            max: 100,
        },
        Spec {
            window: Window::calendar(Period::Week),
            max: 400,
        },
        Spec {
            window: Window::calendar(Period::Month),
            max: 900,
        },
        Spec {
            window: Window::Rolling {
                span_secs: DAY_SECS,
                buckets,
            },
            max: 150,
        },
    ]
}

/// The shared pool: a calendar day and a rolling 6 h window in 6 buckets.
fn pool_specs() -> Vec<Spec> {
    vec![
        Spec {
            window: Window::calendar(Period::Day),
            max: 160,
        },
        Spec {
            window: Window::Rolling {
                span_secs: 6 * 3_600,
                buckets: 6,
            },
            max: 90,
        },
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        who: usize,
        amount: u64,
    },
    Record {
        who: usize,
        amount: u64,
    },
    Check {
        who: usize,
        amount: u64,
    },
    /// Move the clock forward by this many milliseconds.
    Advance(i64),
    /// Move the clock to the next multiple of `unit_ms` (a bucket or day
    /// boundary), shifted by `shift_ms` (-1, 0 or +1), if that is ahead.
    ToBoundary {
        unit_ms: i64,
        shift_ms: i64,
    },
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        10 => 1u64..=40,
        3 => 41u64..=120,
        // Bigger than every maximum.
        1 => 901u64..=2_000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0usize..SUBJECTS.len();
    prop_oneof![
        6 => (who.clone(), amount()).prop_map(|(who, amount)| Op::Admit { who, amount }),
        2 => (who.clone(), amount()).prop_map(|(who, amount)| Op::Record { who, amount }),
        2 => (who, amount()).prop_map(|(who, amount)| Op::Check { who, amount }),
        // Seconds to minutes, hours, several days.
        2 => (1i64..=3_600_000).prop_map(Op::Advance),
        2 => (3_600_000i64..=12 * 3_600_000).prop_map(Op::Advance),
        1 => (86_400_000i64..=5 * 86_400_000).prop_map(Op::Advance),
        1 => (
            prop::sample::select(vec![3_600_000i64, 6 * 3_600_000, 86_400_000]),
            -1i64..=1,
        )
            .prop_map(|(unit_ms, shift_ms)| Op::ToBoundary { unit_ms, shift_ms }),
    ]
}

/// Start of the calendar period containing `now`, computed with chrono.
fn period_start(period: Period, now: DateTime<Utc>) -> DateTime<Utc> {
    let date = now.date_naive();
    let first = match period {
        Period::Day => date,
        Period::Week => date - Duration::days(i64::from(date.weekday().num_days_from_monday())),
        Period::Month => date.with_day(1).unwrap(),
    };
    Utc.from_utc_datetime(&first.and_time(NaiveTime::MIN))
}

/// Start of the calendar period after the one containing `now`.
fn next_period_start(period: Period, now: DateTime<Utc>) -> DateTime<Utc> {
    let start = period_start(period, now);
    match period {
        Period::Day => start + Duration::days(1),
        Period::Week => start + Duration::days(7),
        Period::Month => {
            let (y, m) = (start.year(), start.month());
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
        }
    }
}

/// When usage recorded at `t` leaves a rolling window.
fn leaves_at(span_secs: u64, buckets: u32, t: DateTime<Utc>) -> DateTime<Utc> {
    let width = (span_secs / u64::from(buckets)) as i64 * 1_000;
    let b = t.timestamp_millis().div_euclid(width);
    DateTime::from_timestamp_millis((b + i64::from(buckets) + 1) * width).unwrap()
}

/// Whether an event at `t` still counts against `window` at `now`.
fn counts(window: Window, t: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    match window {
        Window::Calendar {
            period,
            utc_offset_secs: 0,
        } => match period {
            Period::Day => t.date_naive() == now.date_naive(),
            Period::Week => t.iso_week() == now.iso_week(),
            Period::Month => (t.year(), t.month()) == (now.year(), now.month()),
        },
        Window::Rolling { span_secs, buckets } => {
            let width = (span_secs / u64::from(buckets)) as i64 * 1_000;
            let b = t.timestamp_millis().div_euclid(width);
            let cur = now.timestamp_millis().div_euclid(width);
            b + i64::from(buckets) + 1 > cur
        }
        Window::Lifetime => true,
        other => unreachable!("the model has no {other:?}"),
    }
}

/// The reference model.
struct Model {
    plan: Vec<Spec>,
    pool: Vec<Spec>,
    /// Which subjects draw on the pool.
    in_pool: [bool; 2],
    /// Every recorded event: (time, subject, amount).
    events: Vec<(DateTime<Utc>, usize, u64)>,
}

/// One limit of one scope, with the model's usage before the request.
struct Expected {
    scope: ScopeKey,
    spec: Spec,
    used: u64,
    /// Time of the oldest event still counted.
    oldest: Option<DateTime<Utc>>,
}

impl Model {
    fn usage(&self, spec: Spec, who: impl Fn(usize) -> bool, now: DateTime<Utc>) -> u64 {
        self.events
            .iter()
            .filter(|(t, s, _)| who(*s) && counts(spec.window, *t, now))
            .map(|(_, _, a)| a)
            .sum()
    }

    fn oldest(
        &self,
        spec: Spec,
        who: impl Fn(usize) -> bool,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.events
            .iter()
            .filter(|(t, s, _)| who(*s) && counts(spec.window, *t, now))
            .map(|(t, _, _)| *t)
            .min()
    }

    /// Every limit a request of `who` touches, in the engine's order: the
    /// subject's plan limits, then the pool's.
    fn limits(&self, who: usize, now: DateTime<Utc>) -> Vec<Expected> {
        let mut out: Vec<Expected> = self
            .plan
            .iter()
            .map(|&spec| Expected {
                scope: ScopeKey::subject(SUBJECTS[who]),
                spec,
                used: self.usage(spec, |s| s == who, now),
                oldest: self.oldest(spec, |s| s == who, now),
            })
            .collect();
        if self.in_pool[who] {
            out.extend(self.pool.iter().map(|&spec| Expected {
                scope: ScopeKey::pool(POOL),
                spec,
                used: self.usage(spec, |s| self.in_pool[s], now),
                oldest: self.oldest(spec, |s| self.in_pool[s], now),
            }));
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Admit,
    Record,
    Check,
}

fn fits(used: u64, amount: u64, max: u64) -> bool {
    amount == 0 || used + amount <= max
}

fn status_of(spec: Spec, after: u64, amount: u64) -> Status {
    if amount > 0 && after > spec.max {
        Status::Exceeded
    } else if after > 0 && after >= spec.warn_threshold() {
        Status::Warning
    } else {
        Status::Ok
    }
}

/// Compare a decision with the model's prediction; update the model.
fn step(
    model: &mut Model,
    kind: Kind,
    who: usize,
    amount: u64,
    now: DateTime<Utc>,
    d: &Decision,
) -> Result<(), TestCaseError> {
    let expected = model.limits(who, now);
    let all_fit = expected.iter().all(|e| fits(e.used, amount, e.spec.max));
    let (allowed, recorded) = match kind {
        // A request of zero changes no counter, so it is never `recorded`.
        Kind::Admit => (all_fit, all_fit && amount > 0),
        Kind::Record => (all_fit, amount > 0),
        Kind::Check => (all_fit, false),
    };
    let ctx = format!("{kind:?} {amount} for {} at {now}", SUBJECTS[who]);
    prop_assert_eq!(d.allowed, allowed, "allowed: {}; {:#?}", ctx, d);
    prop_assert_eq!(d.recorded, recorded, "recorded: {}; {:#?}", ctx, d);
    prop_assert_eq!(d.limits.len(), expected.len(), "limits: {}", ctx);

    let mut worst = Status::Ok;
    for (e, l) in expected.iter().zip(&d.limits) {
        let lctx = format!("{ctx}, {} {}", e.scope, e.spec.window);
        prop_assert_eq!(&l.scope, &e.scope, "{}", lctx);
        prop_assert_eq!(l.window, e.spec.window, "{}", lctx);
        prop_assert_eq!(&*l.meter, METER, "{}", lctx);
        prop_assert_eq!(l.requested, amount, "{}", lctx);
        prop_assert_eq!(l.max, Some(e.spec.max), "{}", lctx);
        let used = if recorded { e.used + amount } else { e.used };
        prop_assert_eq!(l.used, used, "used: {}; {:#?}", lctx, d);
        prop_assert_eq!(
            l.remaining,
            Some(e.spec.max.saturating_sub(used)),
            "{}",
            lctx
        );
        let status = status_of(e.spec, e.used + amount, amount);
        prop_assert_eq!(l.status, status, "status: {}", lctx);
        worst = worst.max(status);
        let start = match e.spec.window {
            Window::Calendar { period, .. } => period_start(period, now),
            Window::Rolling { span_secs, .. } => now - Duration::seconds(span_secs as i64),
            Window::Lifetime | Window::Concurrent => unreachable!(),
        };
        prop_assert_eq!(l.period_start(), Some(start), "period_start: {}", lctx);
        let resets_at = match e.spec.window {
            Window::Calendar { period, .. } => Some(next_period_start(period, now)),
            Window::Rolling { span_secs, buckets } => e
                .oldest
                .or((recorded && amount > 0).then_some(now))
                .map(|t| leaves_at(span_secs, buckets, t)),
            Window::Lifetime | Window::Concurrent => unreachable!(),
        };
        prop_assert_eq!(l.resets_at(), resets_at, "resets_at: {}", lctx);
        if kind == Kind::Admit && recorded && amount > 0 {
            // Only `record` may take a counter past its maximum.
            prop_assert!(
                l.used <= e.spec.max,
                "admit took a counter past its maximum: {}; {:#?}",
                lctx,
                d
            );
        }
    }
    prop_assert_eq!(d.status, worst, "status: {}", ctx);
    prop_assert_eq!(d.reason.is_some(), !allowed, "reason: {}", ctx);

    if recorded && amount > 0 {
        model.events.push((now, who, amount));
    }
    Ok(())
}

fn limit(spec: Spec) -> LimitConfig {
    LimitConfig::new(METER, spec.window, spec.max)
}

/// Run `ops` against a fresh engine and the model, comparing after each.
fn run(
    buckets: u32,
    in_pool: [bool; 2],
    start: DateTime<Utc>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let plan = plan_specs(buckets);
    let pool = pool_specs();
    let catalog = CatalogConfig::default()
        .meter(Meter::count(METER))
        .plan(
            plan.iter()
                .fold(PlanConfig::new(PLAN), |p, &s| p.limit(limit(s))),
        )
        .pool(
            pool.iter()
                .fold(PoolConfig::new(POOL), |p, &s| p.limit(limit(s))),
        )
        .build()
        .expect("valid catalog");
    let clock = ManualClock::new(start);
    let engine = Engine::with_clock(catalog, clock.clone());
    for (i, subject) in SUBJECTS.iter().enumerate() {
        let mut a = Allocation::new(*subject, PLAN);
        if in_pool[i] {
            a = a.with_pool(POOL);
        }
        engine.allocate(a).expect("allocate");
    }
    let mut model = Model {
        plan,
        pool,
        in_pool,
        events: Vec::new(),
    };

    for op in ops {
        let now = clock.now_utc();
        match *op {
            Op::Admit { who, amount } => {
                let d = engine
                    .admit(&Request::new(SUBJECTS[who]).units(METER, amount))
                    .expect("admit");
                step(&mut model, Kind::Admit, who, amount, now, &d)?;
            }
            Op::Record { who, amount } => {
                let d = engine
                    .record(&Request::new(SUBJECTS[who]).units(METER, amount))
                    .expect("record");
                step(&mut model, Kind::Record, who, amount, now, &d)?;
            }
            Op::Check { who, amount } => {
                let d = engine
                    .check(&Request::new(SUBJECTS[who]).units(METER, amount))
                    .expect("check");
                step(&mut model, Kind::Check, who, amount, now, &d)?;
            }
            Op::Advance(ms) => {
                clock.advance(std::time::Duration::from_millis(u64::try_from(ms).unwrap()))
            }
            Op::ToBoundary { unit_ms, shift_ms } => {
                let t = now.timestamp_millis();
                let next = (t.div_euclid(unit_ms) + 1) * unit_ms + shift_ms;
                if next > t {
                    clock.set(DateTime::from_timestamp_millis(next).unwrap());
                }
            }
        }
    }

    // Usage reports agree with the model too, at the end.
    let now = clock.now_utc();
    for (who, subject) in SUBJECTS.iter().enumerate() {
        let report = engine.usage(subject).expect("usage");
        prop_assert_eq!(report.meters.len(), model.plan.len());
        for (row, e) in report.meters.iter().zip(model.limits(who, now)) {
            prop_assert_eq!(row.window, e.spec.window);
            prop_assert_eq!(
                row.units,
                rust_decimal::Decimal::from(e.used),
                "usage of {} {}",
                subject,
                e.spec.window
            );
        }
    }
    Ok(())
}

fn start_time() -> impl Strategy<Value = DateTime<Utc>> {
    // Anywhere in 2026-2027 (to the millisecond), so month ends, leap-free
    // Februaries and year ends all come up.
    let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    prop_oneof![
        (0i64..2 * 365 * 86_400_000).prop_map(move |ms| base + Duration::milliseconds(ms)),
        // Just before a month end.
        (0u32..24, 0i64..2 * 86_400_000).prop_map(|(m, back)| {
            let first = Utc
                .with_ymd_and_hms(2026 + (m / 12) as i32, m % 12 + 1, 1, 0, 0, 0)
                .unwrap();
            first - Duration::milliseconds(back + 1)
        }),
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs beside them; keep regressions in
        // the crate's proptest-regressions/ directory (cargo runs tests from
        // the package root).
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// One subject, its own limits only.
    #[test]
    fn one_subject_matches_the_model(
        buckets in prop::sample::select(vec![1u32, 4, 24]),
        start in start_time(),
        ops in prop::collection::vec(
            op().prop_map(|o| match o {
                Op::Admit { amount, .. } => Op::Admit { who: 0, amount },
                Op::Record { amount, .. } => Op::Record { who: 0, amount },
                Op::Check { amount, .. } => Op::Check { who: 0, amount },
                other => other,
            }),
            1..250,
        ),
    ) {
        run(buckets, [false, false], start, &ops)?;
    }

    /// Two subjects, one or both drawing on a shared pool.
    #[test]
    fn two_subjects_and_a_pool_match_the_model(
        buckets in prop::sample::select(vec![1u32, 4, 24]),
        in_pool in prop::sample::select(vec![[true, true], [true, false], [false, false]]),
        start in start_time(),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        run(buckets, in_pool, start, &ops)?;
    }
}

/// A decision's meter names compare with strings either way round, as a
/// test or a handler writes them: no `&*l.meter` needed.
#[test]
fn meter_names_compare_with_strings_both_ways() {
    let catalog = CatalogConfig::default()
        .meter(Meter::count(METER))
        .plan(PlanConfig::new(PLAN).limit(LimitConfig::new(
            METER,
            Window::calendar(Period::Day),
            10u64,
        )))
        .build()
        .unwrap();
    let engine = Engine::with_clock(
        catalog,
        ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap()),
    );
    engine.allocate(Allocation::new("alice", PLAN)).unwrap();
    let d = engine
        .admit(&Request::new("alice").units(METER, 3))
        .unwrap();
    let l = &d.limits[0];
    assert!(l.meter == "tokens");
    assert!("tokens" == l.meter);
    assert!(l.meter == *"tokens");
    assert!(*"tokens" == l.meter);
    let owned = String::from("tokens");
    assert!(l.meter == owned);
    assert!(owned == l.meter);
    assert!(l.meter != "token");
    assert!("tokens_" != l.meter);
    assert_eq!(l.meter, "tokens");
}

/// The window constructors build what the configuration form reads: a
/// limit made with them serializes to the JSON an operator would write,
/// and a bad one is a typed error before any catalog is built.
#[test]
fn window_constructors_build_the_configured_windows() {
    use std::time::Duration as StdDuration;
    let rolling = Window::rolling(StdDuration::from_secs(3_600), 4).unwrap();
    let tokyo = Window::calendar_at_offset(Period::Month, 9 * 3_600).unwrap();
    let config = CatalogConfig::default().meter(Meter::count(METER)).plan(
        PlanConfig::new(PLAN)
            .limit(LimitConfig::new(METER, rolling, 10u64))
            .limit(LimitConfig::new(METER, tokyo, 100u64)),
    );
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(
        json["plans"][0]["limits"][0]["window"],
        serde_json::json!({"rolling": {"span": "1h", "buckets": 4}})
    );
    assert_eq!(
        json["plans"][0]["limits"][1]["window"],
        serde_json::json!({"calendar": {"period": "month", "utc_offset": "+09:00"}})
    );
    let catalog = config.build().unwrap();
    let windows: Vec<Window> = catalog
        .plan(PLAN)
        .unwrap()
        .limits()
        .iter()
        .map(|l| l.window())
        .collect();
    assert_eq!(windows, [rolling, tokyo]);
    assert!(matches!(
        Window::rolling(StdDuration::from_secs(3_600), 7),
        Err(tollgate::Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Window::calendar_at_offset(Period::Day, 30),
        Err(tollgate::Error::InvalidConfig { .. })
    ));
}
