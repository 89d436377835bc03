//! tollgate beside its peers, in one criterion run (issue 4).
//!
//! Run with `cargo bench --bench engine`; BENCHMARKS.md holds one run's
//! medians. Groups:
//!
//! - `subjects`: tollgate's `admit`, `check`, `record`, `reserve` + `commit`
//!   (plan of four limits,
//!   memory store, system clock) and the peers — governor's keyed
//!   `check_key`, the locked-hash-map floor, the plan's four limits written
//!   by hand, seed 002's check-then-increment — at 1, 10,000 and 1,000,000
//!   subjects;
//! - `events`: time against events already recorded per subject: tollgate's
//!   `check` and `admit` beside seed 004's prune-and-sum `Check`, at 10 and
//!   1,000 events per subject;
//! - `threads`: one thread against two threads on distinct subjects
//!   (aggregate throughput) and two threads on one hot subject.
//!
//! Every bench picks a random subject per iteration (xorshift over the same
//! `String` id list), and all state is filled before timing, once per subject
//! count. Modules: [`plan`] (the plan, ids, picker), [`tollgate`],
//! [`peers`], [`threads`].

use std::hint::black_box;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod peers;
mod plan;
mod threads;
mod tollgate;

use plan::{request, subject_ids, Pick};

/// The lease of a reserve + commit pair: long enough never to expire
/// mid-iteration.
const LEASE: Duration = Duration::from_secs(600);

/// The subject counts of issue 4.
const SUBJECTS: [usize; 3] = [1, 10_000, 1_000_000];

fn subjects(c: &mut Criterion) {
    let mut g = c.benchmark_group("subjects");
    g.throughput(Throughput::Elements(1));
    for n in SUBJECTS {
        let ids = subject_ids(n);
        {
            let engine = tollgate::engine(&ids);
            g.bench_with_input(BenchmarkId::new("tollgate_admit", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(engine.admit(&request(&ids[pick.next(n)])).unwrap()));
            });
            g.bench_with_input(BenchmarkId::new("tollgate_check", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(engine.check(&request(&ids[pick.next(n)])).unwrap()));
            });
            g.bench_with_input(BenchmarkId::new("tollgate_record", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(engine.record(&request(&ids[pick.next(n)])).unwrap()));
            });
            g.bench_with_input(
                BenchmarkId::new("tollgate_reserve_commit", n),
                &n,
                |b, &n| {
                    let mut pick = Pick::new();
                    b.iter(|| {
                        let req = request(&ids[pick.next(n)]);
                        let res = engine.reserve(&req, LEASE).unwrap().unwrap();
                        black_box(engine.commit(&res, &req).unwrap())
                    });
                },
            );
        }
        {
            let limiter = peers::governor_limiter(&ids);
            g.bench_with_input(BenchmarkId::new("governor_check_key", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(limiter.check_key(&ids[pick.next(n)]).is_ok()));
            });
        }
        {
            let floor = peers::FloorU64::new(n);
            g.bench_with_input(BenchmarkId::new("floor_u64", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(floor.add(pick.next(n) as u64, 1)));
            });
        }
        {
            let floor = peers::FloorStr::new(&ids);
            g.bench_with_input(BenchmarkId::new("floor_string", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(floor.add(&ids[pick.next(n)], 1)));
            });
        }
        {
            let hand = peers::HandFour::new(&ids);
            g.bench_with_input(BenchmarkId::new("hand_four_limits", n), &n, |b, &n| {
                let mut pick = Pick::new();
                b.iter(|| black_box(hand.admit(&ids[pick.next(n)], 100, 1, 5)));
            });
        }
        {
            let seed = peers::Seed002::new(&ids);
            g.bench_with_input(
                BenchmarkId::new("seed002_check_then_increment", n),
                &n,
                |b, &n| {
                    let mut pick = Pick::new();
                    b.iter(|| black_box(seed.check_then_increment(&ids[pick.next(n)], 100, 1)));
                },
            );
        }
    }
    g.finish();
}

/// Events per subject, and the subject counts each is run at: 1,000 events
/// for 1,000,000 subjects is 10⁹ events (16 GB for seed 004's list alone),
/// more than this machine holds, so that pair is not run.
const EVENTS: [(usize, &[usize]); 2] = [(10, &SUBJECTS), (1_000, &[1, 10_000])];

fn events(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(1));
    for (e, counts) in EVENTS {
        for &n in counts {
            let ids = subject_ids(n);
            {
                let engine = tollgate::engine_with_events(&ids, e);
                g.bench_with_input(
                    BenchmarkId::new(format!("tollgate_check_{n}_subjects"), e),
                    &n,
                    |b, &n| {
                        let mut pick = Pick::new();
                        b.iter(|| black_box(engine.check(&request(&ids[pick.next(n)])).unwrap()));
                    },
                );
                g.bench_with_input(
                    BenchmarkId::new(format!("tollgate_admit_{n}_subjects"), e),
                    &n,
                    |b, &n| {
                        let mut pick = Pick::new();
                        b.iter(|| black_box(engine.admit(&request(&ids[pick.next(n)])).unwrap()));
                    },
                );
            }
            {
                let now = tollgate::events_start() + ChronoDuration::hours(23);
                let now_ms = now.timestamp_millis();
                let seed = peers::Seed004::new(&ids, e, now_ms);
                g.bench_with_input(
                    BenchmarkId::new(format!("seed004_check_{n}_subjects"), e),
                    &n,
                    |b, &n| {
                        let mut pick = Pick::new();
                        b.iter(|| black_box(seed.check(&ids[pick.next(n)], now_ms)));
                    },
                );
            }
        }
    }
    g.finish();
}

/// Subjects for the `threads` group; each of two threads on distinct subjects
/// takes its own half.
const THREAD_SUBJECTS: usize = 10_000;

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    g.throughput(Throughput::Elements(1));
    let n = THREAD_SUBJECTS;
    let ids = subject_ids(n);
    let half = n / 2;
    // (label, threads, subject picker for thread t).
    type Select = fn(usize, &mut Pick) -> usize;
    let shapes: [(&str, usize, Select); 3] = [
        ("1_thread", 1, |_, p| p.next(THREAD_SUBJECTS)),
        ("2_threads_distinct", 2, |t, p| {
            t * (THREAD_SUBJECTS / 2) + p.next(THREAD_SUBJECTS / 2)
        }),
        ("2_threads_hot", 2, |_, _| 0),
    ];
    debug_assert_eq!(half * 2, n);

    let engine = tollgate::engine(&ids);
    for (label, k, select) in shapes {
        g.bench_function(BenchmarkId::new("tollgate_admit", label), |b| {
            b.iter_custom(|iters| {
                threads::run(k, iters, |t, p| {
                    black_box(engine.admit(&request(&ids[select(t, p)])).unwrap());
                })
            });
        });
    }
    drop(engine);

    let limiter = peers::governor_limiter(&ids);
    for (label, k, select) in shapes {
        g.bench_function(BenchmarkId::new("governor_check_key", label), |b| {
            b.iter_custom(|iters| {
                threads::run(k, iters, |t, p| {
                    black_box(limiter.check_key(&ids[select(t, p)]).is_ok());
                })
            });
        });
    }
    drop(limiter);

    let floor = peers::FloorStr::new(&ids);
    for (label, k, select) in shapes {
        g.bench_function(BenchmarkId::new("floor_string", label), |b| {
            b.iter_custom(|iters| {
                threads::run(k, iters, |t, p| {
                    black_box(floor.add(&ids[select(t, p)], 1));
                })
            });
        });
    }
    g.finish();
}

/// Short runs: the machine is shared, and the full run must stay well under
/// ten minutes. Criterion's median is robust to the odd slow sample.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = subjects, events, threads
}
criterion_main!(benches);
