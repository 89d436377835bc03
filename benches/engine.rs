//! Engine benchmarks on the memory store: a plan of four limits (daily input
//! tokens, daily jobs, a monthly cost cap with a unit price, a rolling 7-day
//! runtime limit), beside the floor of one locked hash-map update.
//!
//! Run with `cargo bench`. Issue-level peers (governor, the seed approaches)
//! join this harness later.

use std::collections::HashMap;
use std::hint::black_box;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use parking_lot::Mutex;
use rust_decimal::Decimal;
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, ManualClock, MaxConfig, MemoryStore, Meter,
    Period, PlanConfig, Request, Window,
};

fn engine(subjects: usize) -> (Engine<MemoryStore, ManualClock>, Vec<String>) {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("llm_tokens_input"))
        .meter(Meter::count("jobs"))
        .meter(Meter::seconds("runtime_seconds"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "llm_tokens_input",
                    Window::calendar(Period::Day),
                    MaxConfig::Unlimited,
                ))
                .limit(LimitConfig::new(
                    "jobs",
                    Window::calendar(Period::Day),
                    MaxConfig::Unlimited,
                ))
                .limit(LimitConfig::new(
                    "cost",
                    Window::calendar(Period::Month),
                    MaxConfig::Unlimited,
                ))
                .limit(LimitConfig::new(
                    "runtime_seconds",
                    Window::Rolling {
                        span_secs: 7 * 86_400,
                        buckets: 168,
                    },
                    MaxConfig::Unlimited,
                ))
                .cost_meter("cost")
                .price("llm_tokens_input", Decimal::new(3, 6)),
        )
        .build()
        .expect("valid catalog");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap());
    let engine = Engine::with_clock(catalog, clock);
    let ids: Vec<String> = (0..subjects).map(|i| format!("agent-{i}")).collect();
    for id in &ids {
        engine
            .allocate(Allocation::new(id.as_str(), "plan"))
            .unwrap();
        engine.record(&request(id)).unwrap();
    }
    (engine, ids)
}

fn request(id: &str) -> Request<'_> {
    Request::new(id)
        .units("llm_tokens_input", 100)
        .units("jobs", 1)
        .units("runtime_seconds", 5)
}

/// A cheap deterministic sequence of subject indices.
struct Pick(u64);
impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("four_limits");
    for subjects in [1usize, 10_000] {
        let (engine, ids) = engine(subjects);
        let mut pick = Pick(0x9E37_79B9_7F4A_7C15);
        g.bench_with_input(BenchmarkId::new("admit", subjects), &subjects, |b, &n| {
            b.iter(|| black_box(engine.admit(&request(&ids[pick.next(n)])).unwrap()));
        });
        g.bench_with_input(BenchmarkId::new("check", subjects), &subjects, |b, &n| {
            b.iter(|| black_box(engine.check(&request(&ids[pick.next(n)])).unwrap()));
        });
        g.bench_with_input(BenchmarkId::new("record", subjects), &subjects, |b, &n| {
            b.iter(|| black_box(engine.record(&request(&ids[pick.next(n)])).unwrap()));
        });
        let floor: Mutex<HashMap<u64, u64>> =
            Mutex::new((0..subjects as u64).map(|i| (i, 0)).collect());
        g.bench_with_input(
            BenchmarkId::new("floor_mutex_hashmap", subjects),
            &subjects,
            |b, &n| {
                b.iter(|| {
                    let k = pick.next(n) as u64;
                    *floor.lock().entry(black_box(k)).or_insert(0) += 1;
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
