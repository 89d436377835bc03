//! The plan every tollgate bench runs, the subject ids every bench (tollgate
//! and peers) uses, and the subject picker. Also included by
//! `examples/memory_per_subject.rs` and `examples/profile_admit.rs`, so the
//! numbers in BENCHMARKS.md all describe the same plan.

use rust_decimal::Decimal;
use tollgate::{Catalog, CatalogConfig, LimitConfig, Meter, Period, PlanConfig, Request, Window};

/// Hourly buckets over 7 days for the rolling runtime limit.
pub const ROLLING_BUCKETS: u32 = 168;

/// Four limits: daily input tokens, daily jobs, a monthly cost cap (input
/// tokens priced at $3 per million) and a rolling 7-day runtime limit.
///
/// The maxima are finite (so every op is compared with its maximum) but far
/// above what a bench run can spend, so every bench measures the admitting
/// path, as the governor peer's quota does.
pub fn catalog() -> Catalog {
    CatalogConfig::default()
        .meter(Meter::count("llm_tokens_input"))
        .meter(Meter::count("jobs"))
        .meter(Meter::seconds("runtime_seconds"))
        .meter(Meter::money("cost", "USD", 6))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "llm_tokens_input",
                    Window::calendar(Period::Day),
                    1_000_000_000_000u64,
                ))
                .limit(LimitConfig::new(
                    "jobs",
                    Window::calendar(Period::Day),
                    10_000_000_000u64,
                ))
                .limit(LimitConfig::new(
                    "cost",
                    Window::calendar(Period::Month),
                    Decimal::new(1_000_000_000, 0),
                ))
                .limit(LimitConfig::new(
                    "runtime_seconds",
                    Window::Rolling {
                        span_secs: 7 * 86_400,
                        buckets: ROLLING_BUCKETS,
                    },
                    1_000_000_000_000u64,
                ))
                .cost_meter("cost")
                .price("llm_tokens_input", Decimal::new(3, 6)),
        )
        .build()
        .expect("valid catalog")
}

/// The request every bench makes: 100 input tokens, one job, 5 s of runtime
/// (and, through the price, $0.0003 of cost). Built inside the timed loop, as
/// a caller builds it.
pub fn request(subject: &str) -> Request<'_> {
    Request::new(subject)
        .units("llm_tokens_input", 100)
        .units("jobs", 1)
        .units("runtime_seconds", 5)
}

/// The subject ids, `agent-0` … `agent-{n-1}`: the same list, as `String`s,
/// for tollgate and for every keyed peer.
pub fn subject_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("agent-{i}")).collect()
}

/// A tiny xorshift64: a random subject per iteration without a `rand`
/// dependency. Every bench starts from the same seed.
#[derive(Debug, Clone)]
pub struct Pick(u64);

impl Pick {
    pub fn new() -> Self {
        Self(0x9E37_79B9_7F4A_7C15)
    }

    /// A seed of its own, for a second thread.
    pub fn seeded(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// An index in `0..n`.
    #[inline]
    pub fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
