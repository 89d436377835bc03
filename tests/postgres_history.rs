//! Usage history on PostgreSQL: the trigger's `counter_history`
//! against the memory store on the same random batches,
//! and `reclaim` never dropping a period within the depth.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate::store::{
    AllowanceStore, AsyncAllowanceStore, Batch, CounterOp, Mode, PeriodOp, PostgresConfig,
    PostgresStore,
};
use tollgate::{MemoryStore, Name, Period, ScopeKey, Window};

fn url() -> Option<String> {
    match std::env::var("TOLLGATE_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
            None
        }
    }
}

fn unique_schema(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tg_review_{name}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn new_store(url: &str, name: &str, depth: u32) -> PostgresStore {
    let store = PostgresConfig::new(url)
        .schema(unique_schema(name))
        .timeout(Duration::from_secs(20))
        .history_periods(depth)
        .connect()
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Start of the period `back` before the one containing `now`.
fn start_back(w: Window, now: i64, back: u32) -> i64 {
    use chrono::{Datelike, TimeZone};
    let Window::Calendar {
        period,
        utc_offset_secs,
    } = w
    else {
        unreachable!()
    };
    let off = chrono::FixedOffset::east_opt(utc_offset_secs).unwrap();
    let d = chrono::Utc
        .timestamp_millis_opt(now)
        .unwrap()
        .with_timezone(&off)
        .date_naive();
    let first = match period {
        Period::Day => d - chrono::Days::new(u64::from(back)),
        Period::Week => {
            d - chrono::Days::new(u64::from(d.weekday().num_days_from_monday()))
                - chrono::Days::new(7 * u64::from(back))
        }
        Period::Month => d.with_day(1).unwrap() - chrono::Months::new(back),
    };
    first
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_local_timezone(off)
        .unwrap()
        .timestamp_millis()
}

fn run(back_steps: bool, mem_reclaim: bool, seeds: std::ops::RangeInclusive<u64>) {
    let Some(url) = url() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let windows = [
        Window::calendar_at_offset(Period::Day, -5 * 3600).unwrap(),
        Window::calendar_at_offset(Period::Week, 9 * 3600).unwrap(),
        Window::calendar(Period::Month),
    ];
    let subjects = [ScopeKey::subject("a"), ScopeKey::subject("b")];
    for seed in seeds {
        let depth = 1 + (seed % 4) as u32;
        let pg = rt.block_on(new_store(&url, "diff", depth));
        let mem = MemoryStore::new().with_history_periods(depth).unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut now: i64 = 1_767_225_600_000 + 5 * HOUR; // 2026-01-01 05:00 UTC
        let t = Name::new("t");
        let mut max_now = now;
        for step in 0..250 {
            let dt = match rng.below(8) {
                0 => rng.below(60) as i64 * 60_000,
                1 | 2 => rng.below(30) as i64 * HOUR,
                3 => rng.below(5) as i64 * DAY,
                4 => rng.below(20) as i64 * DAY,
                5 if back_steps => -(rng.below(3 * DAY as u64) as i64),
                _ => 1_000,
            };
            now += dt;
            // Never further back than 3 days behind the latest time seen;
            // reclaims run at that floor, so nothing a later query may ask
            // for (within the depth) is past the depth at the reclaim.
            max_now = max_now.max(now);
            now = now.max(max_now - 3 * DAY);
            let slack = if back_steps { 3 * DAY } else { 0 };
            let floor = chrono::DateTime::from_timestamp_millis(max_now - slack).unwrap();
            let s = &subjects[rng.below(2) as usize];
            let w = windows[rng.below(3) as usize];
            let mut ops = vec![CounterOp::new(s, t, w, rng.below(10), None)];
            if rng.below(2) == 0 {
                let w2 = windows[rng.below(3) as usize];
                if w2 != w {
                    ops.push(CounterOp::new(s, t, w2, rng.below(4), None));
                }
            }
            let mode = if rng.below(5) == 0 {
                Mode::Check
            } else {
                Mode::Force
            };
            let b = Batch::new(&ops, mode, now);
            let trace = std::env::var("REVIEW_TRACE").is_ok();
            if trace {
                eprintln!(
                    "step {step} now {now} ({}) {s} {mode:?} {:?}",
                    chrono::DateTime::from_timestamp_millis(now).unwrap(),
                    ops.iter().map(|o| (o.window, o.delta)).collect::<Vec<_>>()
                );
            }
            let m = AllowanceStore::apply(&mem, &b).unwrap();
            let p = rt.block_on(AsyncAllowanceStore::apply(&pg, &b)).unwrap();
            assert_eq!(m.counters, p.counters, "seed {seed} step {step}: answers");
            if rng.below(10) == 0 && mem_reclaim {
                mem.reclaim(floor);
            }
            if rng.below(10) == 0 {
                rt.block_on(pg.reclaim(floor)).unwrap();
                if std::env::var("REVIEW_TRACE").is_ok() {
                    eprintln!("pg reclaim at {now}");
                }
            }
            // Every period within the depth, for each subject and window.
            let mut q = Vec::new();
            for s in &subjects {
                for w in windows {
                    for back in 0..=depth {
                        // Only periods within the depth as of the latest
                        // time seen (a roll or reclaim then may forget the
                        // others: rule 11's "more than N periods behind").
                        let st = start_back(w, now, back);
                        if st >= start_back(w, max_now, depth) {
                            q.push(PeriodOp::new(s, t, w, st));
                        }
                    }
                }
            }
            let mu = AllowanceStore::period_usage(&mem, &q, now).unwrap();
            let pu = rt
                .block_on(AsyncAllowanceStore::period_usage(&pg, &q, now))
                .unwrap();
            if mu != pu {
                let diff: Vec<_> = q
                    .iter()
                    .zip(mu.iter().zip(&pu))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(o, (a, b))| {
                        format!(
                            "{} {:?} start {}: mem {a} pg {b}",
                            o.scope, o.window, o.start_ms
                        )
                    })
                    .collect();
                rt.block_on(pg.drop_schema()).ok();
                panic!("seed {seed} depth {depth} step {step} now {now}: {diff:#?}");
            }
        }
        rt.block_on(pg.drop_schema()).unwrap();
    }
}

#[test]
fn pg_history_matches_memory_forward_clock() {
    run(false, true, 1..=16);
}

#[test]
fn pg_history_matches_memory_clock_steps_back() {
    run(true, true, 1..=6);
}

/// The same without the memory store's reclaim: what diverges is the
/// count-based eviction in `History::keep`, not a prune.
#[test]
fn pg_history_matches_memory_clock_steps_back_no_sweep() {
    let seeds = std::env::var("REVIEW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(1..=12, |s: u64| s..=s);
    run(true, false, seeds);
}
