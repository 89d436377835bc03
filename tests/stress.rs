//! Many threads against one engine: no over-admission, no under-admission,
//! nothing lost or doubled, all or nothing across scopes.
//!
//! The clock is a fixed [`ManualClock`], so every window stays in one period
//! and counters only grow: a counter read back at the end must equal exactly
//! what the threads saw recorded.

use std::sync::mpsc;
use std::sync::Barrier;
use std::thread;
use std::time::Duration as StdDuration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, ManualClock, MemoryStore, Meter, Period,
    PlanConfig, PoolConfig, Request, ScopeKey, Window,
};

const METER: &str = "tokens";
const THREADS: usize = 8;
const ADMITS_PER_THREAD: usize = 10_000;
/// Largest request size.
const MAX_REQUEST: u64 = 50;
const ROUNDS: u64 = 5;

/// A tiny seeded xorshift64* generator: reproducible, no dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Spread small seeds; never zero.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Midday, so no calendar period ends while the test runs (the clock never
/// moves anyway).
fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 17, 12, 0, 0).unwrap()
}

/// Abort the whole test binary if `f` takes longer than `limit`: a deadlock
/// must fail the test, not hang CI.
fn with_watchdog<T>(name: &str, limit: StdDuration, f: impl FnOnce() -> T) -> T {
    let (done, wait) = mpsc::channel::<()>();
    let name = name.to_owned();
    let dog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("{name}: no progress after {limit:?}; deadlock?");
            std::process::exit(101);
        }
    });
    let out = f();
    drop(done);
    dog.join().unwrap();
    out
}

/// Usage of every limit of `scope` that a zero-amount check of `subject`
/// touches, in decision order.
fn read_back(
    engine: &Engine<MemoryStore, ManualClock>,
    subject: &str,
    scope: &ScopeKey,
) -> Vec<u64> {
    let d = engine
        .check(&Request::new(subject).units(METER, 0))
        .unwrap();
    d.limits
        .iter()
        .filter(|l| &l.scope == scope)
        .map(|l| l.used)
        .collect()
}

/// 8 threads × 10,000 admits of 1..=50 against one subject's limit of
/// 50,000, for five fresh engines, each binding on a different window (the
/// other limits of the plan are generous but present, so every batch has
/// several ops). Admitted sizes, as counted by the threads, equal the counter
/// read back; the counter is within the maximum and at most one request
/// short of it.
#[test]
fn concurrent_admits_never_over_or_under_admit() {
    const MAX: u64 = 50_000;
    let windows = [
        Window::calendar(Period::Day),
        Window::Lifetime,
        Window::Rolling {
            span_secs: 86_400,
            buckets: 24,
        },
        Window::calendar(Period::Week),
        Window::calendar(Period::Month),
    ];
    for round in 0..ROUNDS {
        let binding = windows[round as usize % windows.len()];
        let mut plan = PlanConfig::new("p").limit(LimitConfig::new(METER, binding, MAX));
        for w in windows.iter().filter(|&&w| w != binding) {
            plan = plan.limit(LimitConfig::new(METER, *w, 10 * MAX));
        }
        let catalog = CatalogConfig::default()
            .meter(Meter::count(METER))
            .plan(plan)
            .build()
            .unwrap();
        let engine = Engine::with_clock(catalog, ManualClock::new(noon()));
        engine.allocate(Allocation::new("solo", "p")).unwrap();
        let barrier = Barrier::new(THREADS);

        let admitted: Vec<u64> = with_watchdog("single-scope", StdDuration::from_secs(120), || {
            thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (engine, barrier) = (&engine, &barrier);
                        s.spawn(move || {
                            let mut rng = Rng::new(round * 1_000 + t as u64 + 1);
                            let mut sum = 0u64;
                            barrier.wait();
                            for _ in 0..ADMITS_PER_THREAD {
                                let n = rng.range(1, MAX_REQUEST);
                                let d =
                                    engine.admit(&Request::new("solo").units(METER, n)).unwrap();
                                assert_eq!(d.allowed, d.recorded);
                                let l = &d.limits[0];
                                assert_eq!(l.window, binding);
                                if d.recorded {
                                    sum += n;
                                    assert!(l.used <= MAX, "admitted past max: {}", l.used);
                                } else {
                                    assert!(l.used + n > MAX, "refused with room: {d:?}");
                                }
                            }
                            sum
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        });

        let total: u64 = admitted.iter().sum();
        let counters = read_back(&engine, "solo", &ScopeKey::subject("solo"));
        assert_eq!(counters.len(), windows.len());
        for used in counters {
            assert_eq!(
                used, total,
                "round {round} ({binding}): counter vs admitted by threads"
            );
        }
        assert!(total <= MAX, "round {round}: over-admitted {total}");
        assert!(
            total >= MAX - MAX_REQUEST,
            "round {round}: under-admitted {total}"
        );
    }
}

/// Eight subjects, each with its own daily limit, all drawing on one shared
/// pool whose limit is smaller than their sum. Per subject, the counter
/// equals what its thread saw admitted; the pool counter equals the sum of
/// the subjects' (no partial records across scopes) and stays within its
/// maximum. Repeated with 1, 2, 3 and 64 store shards so batches lock one
/// shard or several in every order.
#[test]
fn concurrent_admits_across_a_shared_pool_are_all_or_nothing() {
    const POOL_MAX: u64 = 30_000;
    let subject_max = |t: usize| 2_000 + 1_000 * t as u64; // 44,000 in all
    let day = Window::calendar(Period::Day);
    let subjects: Vec<String> = (0..THREADS).map(|t| format!("agent-{t}")).collect();
    let pool = ScopeKey::pool("acct");

    for (round, shards) in [1usize, 2, 3, 64].into_iter().enumerate() {
        let mut config = CatalogConfig::default().meter(Meter::count(METER)).pool(
            PoolConfig::new("acct")
                .limit(LimitConfig::new(METER, day, POOL_MAX))
                .limit(LimitConfig::new(METER, Window::Lifetime, 4 * POOL_MAX)),
        );
        for t in 0..THREADS {
            config = config.plan(PlanConfig::new(format!("p{t}")).limit(LimitConfig::new(
                METER,
                day,
                subject_max(t),
            )));
        }
        let engine = Engine::with_store_and_clock(
            config.build().unwrap(),
            MemoryStore::with_shards(shards),
            ManualClock::new(noon()),
        );
        for (t, s) in subjects.iter().enumerate() {
            engine
                .allocate(Allocation::new(s.as_str(), format!("p{t}")).with_pool("acct"))
                .unwrap();
        }
        let barrier = Barrier::new(THREADS);

        let admitted: Vec<u64> = with_watchdog("multi-scope", StdDuration::from_secs(120), || {
            thread::scope(|s| {
                let handles: Vec<_> = subjects
                    .iter()
                    .enumerate()
                    .map(|(t, subject)| {
                        let (engine, barrier) = (&engine, &barrier);
                        s.spawn(move || {
                            let mut rng = Rng::new(0xA11CE + round as u64 * 100 + t as u64);
                            let mut sum = 0u64;
                            barrier.wait();
                            for _ in 0..ADMITS_PER_THREAD {
                                let n = rng.range(1, MAX_REQUEST);
                                let d = engine
                                    .admit(&Request::new(subject).units(METER, n))
                                    .unwrap();
                                assert_eq!(d.allowed, d.recorded);
                                assert_eq!(d.limits.len(), 3);
                                if d.recorded {
                                    sum += n;
                                    for l in &d.limits {
                                        assert!(
                                            l.used <= l.max.unwrap(),
                                            "admitted past max: {l:?}"
                                        );
                                    }
                                } else {
                                    assert!(
                                        d.limits.iter().any(|l| l.used + n > l.max.unwrap()),
                                        "refused with room everywhere: {d:?}"
                                    );
                                }
                            }
                            sum
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        });

        let mut pool_used = None;
        for (t, subject) in subjects.iter().enumerate() {
            let own = read_back(&engine, subject, &ScopeKey::subject(subject.as_str()));
            assert_eq!(
                own,
                vec![admitted[t]],
                "round {round} ({shards} shards): {subject}'s counter vs its admitted sum"
            );
            assert!(admitted[t] <= subject_max(t));
            let p = read_back(&engine, subject, &pool);
            assert_eq!(p.len(), 2);
            pool_used = Some(p);
        }
        let total: u64 = admitted.iter().sum();
        let pool_used = pool_used.unwrap();
        assert_eq!(
            pool_used,
            vec![total, total],
            "round {round} ({shards} shards): pool counters vs sum of admitted"
        );
        assert!(total <= POOL_MAX, "pool over-admitted: {total}");
        // No under-admission: a subject that ended with room for any request
        // must have been stopped by the pool.
        for (t, &own) in admitted.iter().enumerate() {
            assert!(
                own > subject_max(t) - MAX_REQUEST || total > POOL_MAX - MAX_REQUEST,
                "round {round}: agent-{t} under-admitted ({own} of {}, pool {total})",
                subject_max(t)
            );
        }
    }
}

/// Four threads `record` (usage that already happened, small amounts) while
/// four `admit`. No admitted request ever leaves the counter past the
/// maximum (each decision's `used` is the counter right after it, atomically);
/// recording may. At the end the counter is exactly admitted + recorded.
#[test]
fn concurrent_records_and_admits_lose_and_double_nothing() {
    const MAX: u64 = 50_000;
    const RECORDS_PER_THREAD: usize = 2_500;
    let windows = [
        Window::calendar(Period::Day),
        Window::Rolling {
            span_secs: 3_600,
            buckets: 60,
        },
    ];
    for round in 0..3u64 {
        let mut plan = PlanConfig::new("p");
        for w in windows {
            plan = plan.limit(LimitConfig::new(METER, w, MAX));
        }
        let catalog = CatalogConfig::default()
            .meter(Meter::count(METER))
            .plan(plan)
            .build()
            .unwrap();
        let engine = Engine::with_clock(catalog, ManualClock::new(noon()));
        engine.allocate(Allocation::new("mixed", "p")).unwrap();
        let barrier = Barrier::new(THREADS);

        // (admitted, recorded) per thread.
        let sums: Vec<(u64, u64)> = with_watchdog("mixed", StdDuration::from_secs(120), || {
            thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (engine, barrier) = (&engine, &barrier);
                        s.spawn(move || {
                            let mut rng = Rng::new(0xBEEF + round * 100 + t as u64);
                            let (mut admitted, mut recorded) = (0u64, 0u64);
                            barrier.wait();
                            if t % 2 == 0 {
                                for _ in 0..ADMITS_PER_THREAD {
                                    let n = rng.range(1, MAX_REQUEST);
                                    let d = engine
                                        .admit(&Request::new("mixed").units(METER, n))
                                        .unwrap();
                                    assert_eq!(d.allowed, d.recorded);
                                    if d.recorded {
                                        admitted += n;
                                        for l in &d.limits {
                                            assert!(
                                                l.used <= MAX,
                                                "admit left the counter past max: {l:?}"
                                            );
                                        }
                                    }
                                }
                            } else {
                                for _ in 0..RECORDS_PER_THREAD {
                                    let n = rng.range(0, 8);
                                    let d = engine
                                        .record(&Request::new("mixed").units(METER, n))
                                        .unwrap();
                                    assert_eq!(
                                        d.recorded,
                                        n > 0,
                                        "record always records (zero changes nothing)"
                                    );
                                    assert_eq!(
                                        d.allowed,
                                        d.limits.iter().all(|l| n == 0 || l.used <= MAX)
                                    );
                                    recorded += n;
                                }
                            }
                            (admitted, recorded)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        });

        let admitted: u64 = sums.iter().map(|s| s.0).sum();
        let recorded: u64 = sums.iter().map(|s| s.1).sum();
        let counters = read_back(&engine, "mixed", &ScopeKey::subject("mixed"));
        assert_eq!(
            counters,
            vec![admitted + recorded; windows.len()],
            "round {round}: counter vs admitted {admitted} + recorded {recorded}"
        );
        assert!(admitted <= MAX, "round {round}: admitted {admitted}");
        assert!(recorded > 0 && admitted > 0);
        // Records only take room away, so the admitted threads were stopped
        // by a full counter, not early: the counter ends within one request
        // of the maximum or past it.
        assert!(
            admitted + recorded > MAX - MAX_REQUEST,
            "round {round}: under-admitted ({admitted} + {recorded})"
        );
    }
}
