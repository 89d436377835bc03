//! The peers, written to be fair: the same `String` subject ids, the same
//! picker, the same pre-filled state, and each doing in one call what its
//! users do before paid work.
//!
//! - [`governor_limiter`]: governor's keyed limiter, one limit, `check_key`.
//! - [`FloorU64`] / [`FloorStr`]: one locked hash-map entry-and-add, the floor
//!   for any locked counter update (keyed by `u64` as issue 4 names it, and by
//!   the same `String` ids as everything else).
//! - [`Seed002`]: seed 002's memory store, maps behind one `RwLock`, check and
//!   increment as separate calls (two racing callers can both pass).
//! - [`Seed004`]: seed 004's rolling 24 h budget, a time-ordered list of
//!   events per subject, pruned and summed on every check.
//! - [`HandFour`]: the bench plan's four limits written out by hand for that
//!   plan alone, checked and added under one lock: what the four limits cost
//!   without a library.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};

/// governor's default keyed limiter (a `DashMap` of GCRA cells on the quanta
/// clock) with one limit of 10⁹ cells per second: like tollgate's maxima, far
/// above what a run can spend, so it measures the admitting path. Every key
/// has been checked once.
pub fn governor_limiter(ids: &[String]) -> DefaultKeyedRateLimiter<String> {
    let rate = NonZeroU32::new(1_000_000_000).expect("non-zero");
    let limiter = RateLimiter::keyed(Quota::per_second(rate));
    for id in ids {
        let _ = limiter.check_key(id);
    }
    limiter
}

/// `parking_lot::Mutex<HashMap<u64, u64>>`, entry-and-add.
#[derive(Debug)]
pub struct FloorU64(Mutex<HashMap<u64, u64>>);

impl FloorU64 {
    pub fn new(n: usize) -> Self {
        Self(Mutex::new((0..n as u64).map(|k| (k, 1)).collect()))
    }

    #[inline]
    pub fn add(&self, key: u64, n: u64) -> u64 {
        let mut m = self.0.lock();
        let v = m.entry(key).or_insert(0);
        *v += n;
        *v
    }
}

/// `parking_lot::Mutex<HashMap<String, u64>>` looked up by `&str`: the floor
/// with the key type every other bench uses.
#[derive(Debug)]
pub struct FloorStr(Mutex<HashMap<String, u64>>);

impl FloorStr {
    pub fn new(ids: &[String]) -> Self {
        Self(Mutex::new(ids.iter().map(|id| (id.clone(), 1)).collect()))
    }

    #[inline]
    pub fn add(&self, key: &str, n: u64) -> u64 {
        let mut m = self.0.lock();
        match m.get_mut(key) {
            Some(v) => {
                *v += n;
                *v
            }
            None => {
                m.insert(key.to_owned(), n);
                n
            }
        }
    }
}

/// Seed 002's `AgentAllowance`. Go copies the struct on every read; the
/// allowlist is a slice header there, an `Arc` here (a shallow copy either
/// way).
#[derive(Debug, Clone)]
struct Allowance {
    daily_token_limit: i64,
    daily_job_limit: i64,
    _concurrent_jobs: i64,
    _max_job_duration: Duration,
    _model_allowlist: Arc<[String]>,
}

/// Seed 002's `UsageRecord`, less its `AgentID` string (the caller has it).
#[derive(Debug, Clone, Copy, Default)]
struct UsageRecord {
    tokens_used: i64,
    jobs_started: i64,
    active_jobs: i64,
    period_start: i64,
}

#[derive(Debug, Default)]
struct Seed002Maps {
    allowances: HashMap<String, Allowance>,
    usage: HashMap<String, UsageRecord>,
}

/// Seed 002's `MemoryStore`: maps behind one `RwLock`; `GetAllowance` and
/// `GetUsage` take the read lock and copy, `IncrementUsage` takes the write
/// lock.
#[derive(Debug, Default)]
pub struct Seed002(RwLock<Seed002Maps>);

/// Seed 002's `QuotaCheckResult`, less its reason string. The bench hands
/// it to `black_box`, so every field is computed though none is read.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
pub struct Seed002Check {
    pub allowed: bool,
    pub warning: bool,
    pub remaining_tokens: i64,
    pub remaining_jobs: i64,
}

impl Seed002 {
    /// An allowance per id (limits far above a run's spend, like tollgate's)
    /// and one recorded job each.
    pub fn new(ids: &[String]) -> Self {
        let s = Self::default();
        {
            let mut m = s.0.write();
            for id in ids {
                m.allowances.insert(
                    id.clone(),
                    Allowance {
                        daily_token_limit: 1_000_000_000_000,
                        daily_job_limit: 10_000_000_000,
                        _concurrent_jobs: 0,
                        _max_job_duration: Duration::ZERO,
                        _model_allowlist: Arc::from(Vec::new()),
                    },
                );
            }
        }
        for id in ids {
            s.increment_usage(id, 100, 1);
        }
        s
    }

    fn get_allowance(&self, id: &str) -> Option<Allowance> {
        self.0.read().allowances.get(id).cloned()
    }

    fn get_usage(&self, id: &str) -> UsageRecord {
        self.0.read().usage.get(id).copied().unwrap_or_default()
    }

    /// The pre-dispatch check: two read-locked copies, then the arithmetic.
    /// A limit of 0 is unlimited; warning at 80 %.
    #[inline]
    pub fn check(&self, id: &str, tokens: i64) -> Option<Seed002Check> {
        let a = self.get_allowance(id)?;
        let u = self.get_usage(id);
        let tokens_ok = a.daily_token_limit == 0 || u.tokens_used + tokens <= a.daily_token_limit;
        let jobs_ok = a.daily_job_limit == 0 || u.jobs_started < a.daily_job_limit;
        let warning = (a.daily_token_limit > 0 && u.tokens_used * 10 >= a.daily_token_limit * 8)
            || (a.daily_job_limit > 0 && u.jobs_started * 10 >= a.daily_job_limit * 8);
        Some(Seed002Check {
            allowed: tokens_ok && jobs_ok,
            warning,
            remaining_tokens: a.daily_token_limit - u.tokens_used,
            remaining_jobs: a.daily_job_limit - u.jobs_started,
        })
    }

    /// `IncrementUsage`: the write lock, then add.
    #[inline]
    pub fn increment_usage(&self, id: &str, tokens: i64, jobs: i64) {
        let mut m = self.0.write();
        let u = match m.usage.get_mut(id) {
            Some(u) => u,
            None => m.usage.entry(id.to_owned()).or_default(),
        };
        u.tokens_used += tokens;
        u.jobs_started += jobs;
        if jobs > 0 {
            u.active_jobs += jobs;
        }
        u.period_start = u.period_start.max(0);
    }

    /// What a caller of seed 002 does instead of an atomic admit: check, then
    /// increment if allowed. Two lock acquisitions; not atomic.
    #[inline]
    pub fn check_then_increment(&self, id: &str, tokens: i64, jobs: i64) -> Option<Seed002Check> {
        let check = self.check(id, tokens)?;
        if check.allowed {
            self.increment_usage(id, tokens, jobs);
        }
        Some(check)
    }
}

const DAY_MS: i64 = 86_400_000;

/// Seed 004's rolling 24 h token budget (a Redis sorted set per agent, score
/// = completion time, member = task and tokens), in memory: one time-ordered
/// list of `(ms, tokens)` per subject behind one lock. `check` prunes entries
/// older than 24 h and sums the rest, as the seed does on every `Check`
/// (`Record` is a push at the back and is not what grows).
/// Generous to the seed: no strings to parse and no network round trip.
#[derive(Debug)]
pub struct Seed004 {
    limit: u64,
    events: Mutex<HashMap<String, VecDeque<(i64, u64)>>>,
}

impl Seed004 {
    /// `events` events of 100 tokens per subject, spread evenly over the 23
    /// hours before `now_ms` (none leaves during a run).
    pub fn new(ids: &[String], events: usize, now_ms: i64) -> Self {
        let step = 23 * 3_600_000 / events.max(1) as i64;
        let first = now_ms - 23 * 3_600_000;
        let map = ids
            .iter()
            .map(|id| {
                let q = (0..events)
                    .map(|k| (first + k as i64 * step, 100))
                    .collect();
                (id.clone(), q)
            })
            .collect();
        Self {
            limit: 1_000_000_000_000,
            events: Mutex::new(map),
        }
    }

    /// `Check`: prune entries older than 24 h, sum what is left, compare.
    #[inline]
    pub fn check(&self, id: &str, now_ms: i64) -> bool {
        let mut m = self.events.lock();
        let Some(q) = m.get_mut(id) else {
            return true;
        };
        let cutoff = now_ms - DAY_MS;
        while q.front().is_some_and(|&(t, _)| t <= cutoff) {
            q.pop_front();
        }
        let used: u64 = q.iter().map(|&(_, n)| n).sum();
        used < self.limit
    }
}

/// Hours in the rolling runtime window, plus the bucket being filled.
const HOURS: usize = 7 * 24 + 1;
const HOUR_MS: i64 = 3_600_000;

/// One subject's four counters in [`HandFour`]: the bench plan written out
/// by hand for this plan only.
#[derive(Debug, Clone)]
struct Four {
    /// Day number (days since the epoch) the daily counters are for.
    day: i64,
    tokens: u64,
    jobs: u64,
    /// Month number (`year * 12 + month0`) the cost is for.
    month: i64,
    /// Cost in millionths of a dollar.
    cost_micros: u64,
    /// The newest hour in `hours`, and the runtime summed over all of them.
    head: i64,
    runtime: u64,
    hours: Box<[u64; HOURS]>,
}

/// What issue 4 calls a hand-written counter: the bench plan's four limits
/// (daily input tokens, daily jobs, a monthly cost cap at $3 per million
/// input tokens, runtime over a rolling 7 days in hourly buckets) written
/// out for this one plan, one `Mutex<HashMap<String, Four>>` entry per
/// subject, checked and added under one lock (atomic, like `admit`), with
/// the same maxima. It answers only yes or no: no per-limit numbers, no
/// reset times, no other plan. A lower bound for any engine enforcing these
/// four limits with a locked map, not a quota library.
#[derive(Debug)]
pub struct HandFour(Mutex<HashMap<String, Four>>);

impl HandFour {
    /// One admitted request (100 tokens, 1 job, 5 s) per id, at `now_ms`.
    pub fn new(ids: &[String]) -> Self {
        let now = now_ms();
        let s = Self(Mutex::new(
            ids.iter()
                .map(|id| {
                    let f = Four {
                        day: 0,
                        tokens: 0,
                        jobs: 0,
                        month: 0,
                        cost_micros: 0,
                        head: now / HOUR_MS,
                        runtime: 0,
                        hours: Box::new([0; HOURS]),
                    };
                    (id.clone(), f)
                })
                .collect(),
        ));
        for id in ids {
            s.admit(id, 100, 1, 5);
        }
        s
    }

    /// Roll the windows to now, check all four limits, add all four or
    /// nothing. `true` when admitted.
    #[inline]
    pub fn admit(&self, id: &str, tokens: u64, jobs: u64, runtime_secs: u64) -> bool {
        use chrono::Datelike as _;
        let now = now_ms();
        let day = now.div_euclid(DAY_MS);
        let mut m = self.0.lock();
        let Some(f) = m.get_mut(id) else {
            return false;
        };
        if f.day != day {
            f.day = day;
            f.tokens = 0;
            f.jobs = 0;
            // A new month can only start on a new day.
            let date = chrono::DateTime::from_timestamp_millis(now).map(|t| t.date_naive());
            let month = date.map_or(0, |d| i64::from(d.year()) * 12 + i64::from(d.month0()));
            if f.month != month {
                f.month = month;
                f.cost_micros = 0;
            }
        }
        let hour = now.div_euclid(HOUR_MS);
        if hour > f.head {
            let steps = (hour - f.head).min(HOURS as i64);
            for k in 1..=steps {
                let slot = (f.head + k).rem_euclid(HOURS as i64) as usize;
                f.runtime -= f.hours[slot];
                f.hours[slot] = 0;
            }
            f.head = hour;
        }
        let cost = tokens * 3;
        let fits = f.tokens + tokens <= 1_000_000_000_000
            && f.jobs + jobs <= 10_000_000_000
            && f.cost_micros + cost <= 1_000_000_000 * 1_000_000
            && f.runtime + runtime_secs <= 1_000_000_000_000;
        if fits {
            f.tokens += tokens;
            f.jobs += jobs;
            f.cost_micros += cost;
            f.runtime += runtime_secs;
            f.hours[hour.rem_euclid(HOURS as i64) as usize] += runtime_secs;
        }
        fits
    }
}

/// Unix milliseconds from the system clock, as tollgate's `SystemClock`
/// reads it.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
