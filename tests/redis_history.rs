//! Usage history on Redis (contract rule 11), attacked: differentials
//! against `MemoryStore` (clock steps, values past 2^53, odd offsets,
//! limits, leases, a cluster), TTLs, the server's clock, a flushed library,
//! replicas with different depths, hostile history fields. Needs
//! `TOLLGATE_REDIS_URL` (and `TOLLGATE_REDIS_CLUSTER_URLS` for the cluster
//! test); without it each test prints that it was skipped.

#[path = "support/redis_env.rs"]
mod redis_env;
use redis_env::{unique_prefix, url};

use std::time::Duration;

use tollgate::store::{
    AllowanceStore, AsyncAllowanceStore, Batch, CounterOp, Mode, PeriodOp, RedisConfig, RedisStore,
    TimeSource,
};
use tollgate::{MemoryStore, Name, Period, ScopeKey, Window};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn store(url: &str, prefix: &str, depth: u32) -> RedisStore {
    RedisConfig::new(url)
        .prefix(prefix)
        .time_source(TimeSource::Batch)
        .timeout(Duration::from_secs(10))
        .history_periods(depth)
        .secret([7u8; 32])
        .connect()
        .await
        .expect("connect")
}

fn conn(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut c = conn(url);
    let pat = if url.contains("2330") && !url.contains("23304") {
        format!("{{{prefix}:*")
    } else {
        format!("{{{prefix}}}*")
    };
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, ks): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pat)
            .arg("COUNT")
            .arg(1000)
            .query(&mut c)
            .unwrap();
        out.extend(ks);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out
}

fn cleanup(url: &str, prefix: &str) {
    let mut c = conn(url);
    for k in keys_under(url, prefix) {
        let _: () = redis::cmd("DEL").arg(&k).query(&mut c).unwrap();
    }
}

/// (hash key, field) of every `|p` history field under the prefix.
#[allow(dead_code)]
fn history_fields(url: &str, prefix: &str) -> Vec<(String, String)> {
    let mut c = conn(url);
    let mut out = Vec::new();
    for k in keys_under(url, prefix) {
        let t: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
        if t != "hash" {
            continue;
        }
        let fields: Vec<Vec<u8>> = redis::cmd("HKEYS").arg(&k).query(&mut c).unwrap();
        for f in fields {
            let f = String::from_utf8_lossy(&f).into_owned();
            if f.ends_with("|p") {
                out.push((k.clone(), f));
            }
        }
    }
    out
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
const T0: i64 = 1_767_225_600_000 + 5 * HOUR; // 2026-01-01 05:00 UTC

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

#[allow(dead_code)]
fn cluster_urls() -> Option<Vec<String>> {
    match std::env::var("TOLLGATE_REDIS_CLUSTER_URLS") {
        Ok(u) if !u.is_empty() => Some(u.split(',').map(str::to_owned).collect()),
        _ => {
            eprintln!("skipped: TOLLGATE_REDIS_CLUSTER_URLS not set");
            None
        }
    }
}

#[allow(dead_code)]
fn cleanup_all(urls: &[String], prefix: &str) {
    for u in urls {
        cleanup(u, prefix);
    }
}

fn diff_run(back_steps: bool, big: bool, seeds: std::ops::RangeInclusive<u64>) {
    let Some(url) = url() else { return };
    diff_run_on(&[url], false, back_steps, big, seeds)
}

#[cfg(feature = "redis-cluster")]
async fn cluster_store(urls: &[String], prefix: &str, depth: u32) -> RedisStore {
    RedisConfig::cluster(urls.iter().cloned())
        .prefix(prefix)
        .time_source(TimeSource::Batch)
        .timeout(Duration::from_secs(10))
        .history_periods(depth)
        .secret([7u8; 32])
        .connect()
        .await
        .expect("cluster connect")
}

#[cfg(not(feature = "redis-cluster"))]
#[allow(dead_code)]
async fn cluster_store(_: &[String], _: &str, _: u32) -> RedisStore {
    unreachable!("feature redis-cluster")
}

#[cfg(feature = "redis-cluster")]
#[test]
fn cluster_history_matches_memory_subject_and_pool() {
    let Some(urls) = cluster_urls() else { return };
    diff_run_on(&urls, true, true, false, 1..=4);
}

fn diff_run_on(
    urls: &[String],
    cluster: bool,
    back_steps: bool,
    big: bool,
    seeds: std::ops::RangeInclusive<u64>,
) {
    let url = urls[0].clone();
    let rt = rt();
    // Two of the four runs use odd offsets (+5:30, -12:00, +14:00).
    let odd = back_steps ^ big;
    let windows = if odd {
        [
            Window::calendar_at_offset(Period::Day, 19_800).unwrap(),
            Window::calendar_at_offset(Period::Week, -43_200).unwrap(),
            Window::calendar_at_offset(Period::Month, 50_400).unwrap(),
        ]
    } else {
        [
            Window::calendar_at_offset(Period::Day, -5 * 3600).unwrap(),
            Window::calendar_at_offset(Period::Week, 9 * 3600).unwrap(),
            Window::calendar(Period::Month),
        ]
    };
    let subjects = [ScopeKey::subject("a"), ScopeKey::subject("b")];
    let team = ScopeKey::pool("team");
    for seed in seeds {
        let depth = 1 + (seed % 4) as u32;
        let prefix = unique_prefix("rv4diff");
        let rs = if cluster {
            rt.block_on(cluster_store(urls, &prefix, depth))
        } else {
            rt.block_on(store(&url, &prefix, depth))
        };
        let mem = MemoryStore::new().with_history_periods(depth).unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut now: i64 = T0;
        let t = Name::new("t");
        let mut max_now = now;
        for step in 0..200 {
            let dt = match rng.below(8) {
                0 => rng.below(60) as i64 * 60_000,
                1 | 2 => rng.below(30) as i64 * HOUR,
                3 => rng.below(5) as i64 * DAY,
                4 => rng.below(20) as i64 * DAY,
                5 if back_steps => -(rng.below(3 * DAY as u64) as i64),
                _ => 1_000,
            };
            now += dt;
            max_now = max_now.max(now);
            now = now.max(max_now - 3 * DAY);
            let s = &subjects[rng.below(2) as usize];
            let w = windows[rng.below(3) as usize];
            let amount = |rng: &mut Rng, n: u64| {
                if big && rng.below(3) == 0 {
                    (1u64 << 53) + rng.below(1 << 40)
                } else if big && rng.below(20) == 0 {
                    u64::MAX / 2
                } else {
                    rng.below(n)
                }
            };
            let d1 = amount(&mut rng, 10);
            let limits = rng.below(3) == 0;
            let max = if limits {
                Some(5 + rng.below(30))
            } else {
                None
            };
            let mut ops = vec![CounterOp::new(s, t, w, d1, max)];
            if rng.below(2) == 0 {
                let w2 = windows[rng.below(3) as usize];
                if w2 != w {
                    let d2 = amount(&mut rng, 4);
                    ops.push(CounterOp::new(s, t, w2, d2, None));
                }
            }
            if cluster && rng.below(2) == 0 {
                let w3 = windows[rng.below(3) as usize];
                ops.push(CounterOp::new(&team, t, w3, rng.below(5), None));
            }
            let mode = match rng.below(5) {
                0 => Mode::Check,
                1 | 2 if limits => Mode::WithinLimits,
                _ => Mode::Force,
            };
            let b = Batch::new(&ops, mode, now);
            let m = AllowanceStore::apply(&mem, &b);
            let r = rt.block_on(AsyncAllowanceStore::apply(&rs, &b));
            match (m, r) {
                (Ok(m), Ok(r)) => {
                    assert_eq!(m.counters, r.counters, "seed {seed} step {step}: answers")
                }
                (Err(a), Err(b)) => assert_eq!(
                    format!("{a:?}"),
                    format!("{b:?}"),
                    "seed {seed} step {step}: errors"
                ),
                (m, r) => {
                    cleanup_all(urls, &prefix);
                    panic!("seed {seed} step {step}: mem {m:?} redis {r:?}");
                }
            }
            let mut q = Vec::new();
            for s in subjects.iter().chain(std::iter::once(&team)) {
                for w in windows {
                    for back in 0..=depth {
                        let st = start_back(w, now, back);
                        if st >= start_back(w, max_now, depth) {
                            q.push(PeriodOp::new(s, t, w, st));
                        }
                    }
                }
            }
            let mu = AllowanceStore::period_usage(&mem, &q, now).unwrap();
            let ru = match rt.block_on(AsyncAllowanceStore::period_usage(&rs, &q, now)) {
                Ok(r) => r,
                Err(e) => {
                    cleanup_all(urls, &prefix);
                    panic!("seed {seed} step {step}: redis period_usage failed: {e}");
                }
            };
            if mu != ru {
                let diff: Vec<_> = q
                    .iter()
                    .zip(mu.iter().zip(&ru))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(o, (a, b))| {
                        format!(
                            "{} {:?} start {}: mem {a} redis {b}",
                            o.scope, o.window, o.start_ms
                        )
                    })
                    .collect();
                cleanup_all(urls, &prefix);
                panic!("seed {seed} depth {depth} step {step} now {now}: {diff:#?}");
            }
        }
        cleanup_all(urls, &prefix);
    }
}

#[test]
fn redis_history_matches_memory_forward_clock() {
    diff_run(false, false, 1..=8);
}

#[test]
fn redis_history_matches_memory_clock_steps_back() {
    diff_run(true, false, 1..=8);
}

#[test]
fn redis_history_matches_memory_big_values() {
    diff_run(false, true, 1..=8);
}

#[test]
fn redis_history_matches_memory_big_values_clock_back() {
    diff_run(true, true, 1..=12);
}

fn kind(e: &tollgate::Error) -> String {
    let s = format!("{e:?}");
    s.split([' ', '{', '(']).next().unwrap().to_string()
}

/// Leases across period boundaries (open in one day, grow/renew/settle in
/// a later one), subject and pool scopes: answers and `period_usage`
/// against the memory store.
fn lease_run(seeds: std::ops::RangeInclusive<u64>) {
    use tollgate::store::Fraction;
    use tollgate::store::{LeaseAction, LeaseId, LeaseOp};
    let Some(url) = url() else { return };
    let rt = rt();
    let windows = [
        Window::calendar_at_offset(Period::Day, 3 * 3600).unwrap(),
        Window::calendar(Period::Week),
    ];
    let a = ScopeKey::subject("a");
    let team = ScopeKey::pool("team");
    for seed in seeds {
        let depth = 1 + (seed % 3) as u32;
        let prefix = unique_prefix("rv4lease");
        let rs = rt.block_on(store(&url, &prefix, depth));
        let mem = MemoryStore::new().with_history_periods(depth).unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let mut now = T0;
        let t = Name::new("t");
        let mut leases: Vec<LeaseId> = Vec::new();
        let mut oks = 0;
        for step in 0..200 {
            now += match rng.below(4) {
                0 => rng.below(30) as i64 * HOUR,
                1 => rng.below(3) as i64 * DAY,
                _ => rng.below(120) as i64 * 60_000,
            };
            let w = windows[rng.below(2) as usize];
            let d = rng.below(10);
            let ops_a = [
                CounterOp::new(&a, t, w, d, None),
                CounterOp::new(&team, t, w, d, None),
            ];
            let ops: &[CounterOp] = if rng.below(2) == 0 {
                &ops_a[..1]
            } else {
                &ops_a
            };
            let batch = match rng.below(6) {
                0 | 1 => {
                    let id = LeaseId::random();
                    leases.push(id);
                    Batch::new(ops, Mode::WithinLimits, now).with_lease(LeaseOp::new(
                        id,
                        &a,
                        LeaseAction::Open {
                            expires_at_ms: now + rng.below(3 * DAY as u64) as i64,
                            deadline_ms: None,
                        },
                    ))
                }
                2 if !leases.is_empty() => {
                    let id = leases[rng.below(leases.len() as u64) as usize];
                    Batch::new(ops, Mode::Force, now).with_lease(LeaseOp::new(
                        id,
                        &a,
                        LeaseAction::Grow,
                    ))
                }
                3 if !leases.is_empty() => {
                    let id = leases[rng.below(leases.len() as u64) as usize];
                    Batch::new(&[], Mode::Force, now).with_lease(LeaseOp::new(
                        id,
                        &a,
                        LeaseAction::Renew {
                            expires_at_ms: now + rng.below(2 * DAY as u64) as i64,
                        },
                    ))
                }
                4 if !leases.is_empty() => {
                    let id = leases[rng.below(leases.len() as u64) as usize];
                    let keep = Fraction::new(rng.below(4), 3).unwrap_or(Fraction::ONE);
                    Batch::new(ops, Mode::Force, now).with_lease(LeaseOp::new(
                        id,
                        &a,
                        LeaseAction::Settle { keep },
                    ))
                }
                _ => Batch::new(ops, Mode::Force, now),
            };
            let m = AllowanceStore::apply(&mem, &batch);
            let r = rt.block_on(AsyncAllowanceStore::apply(&rs, &batch));
            if m.is_ok() {
                oks += 1;
            } else if step < 30 {
                eprintln!("step {step}: {m:?}");
            }
            match (&m, &r) {
                (Ok(m), Ok(r)) => {
                    assert_eq!(m.counters, r.counters, "seed {seed} step {step}: answers")
                }
                (Err(x), Err(y)) => {
                    assert_eq!(kind(x), kind(y), "seed {seed} step {step}: {x:?} vs {y:?}")
                }
                _ => {
                    cleanup(&url, &prefix);
                    panic!("seed {seed} step {step}: mem {m:?} redis {r:?}");
                }
            }
            let mut q = Vec::new();
            for s in [&a, &team] {
                for w in windows {
                    for back in 0..=depth {
                        q.push(PeriodOp::new(s, t, w, start_back(w, now, back)));
                    }
                }
            }
            let mu = AllowanceStore::period_usage(&mem, &q, now).unwrap();
            let ru = rt
                .block_on(AsyncAllowanceStore::period_usage(&rs, &q, now))
                .inspect_err(|_| cleanup(&url, &prefix))
                .unwrap();
            if mu != ru {
                cleanup(&url, &prefix);
                panic!("seed {seed} depth {depth} step {step} now {now}: mem {mu:?} redis {ru:?} q {q:?}");
            }
        }
        cleanup(&url, &prefix);
        eprintln!("seed {seed}: {oks} of 200 applied");
    }
}

#[test]
fn redis_history_matches_memory_with_leases() {
    lease_run(1..=6);
}

fn day_window() -> Window {
    Window::calendar(Period::Day)
}

/// Start of the UTC day containing `ms`.
fn day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY)
}

fn admit(
    rt: &tokio::runtime::Runtime,
    rs: &RedisStore,
    s: &ScopeKey,
    d: u64,
    now: i64,
) -> Result<tollgate::store::Applied, tollgate::Error> {
    let ops = [CounterOp::new(s, Name::new("t"), day_window(), d, None)];
    rt.block_on(AsyncAllowanceStore::apply(
        rs,
        &Batch::new(&ops, Mode::Force, now),
    ))
}

/// A host (or anything with write access) leaving a value in a counter's
/// `|p` field that is not a u64 (20 digits past u64::MAX): the entry is
/// skipped, so later admits of the counter and the read still work (found
/// in review: they all failed with a Lua error).
#[test]
fn a_hostile_history_value_is_skipped() {
    let Some(url) = url() else { return };
    let rt = rt();
    let prefix = unique_prefix("rv4hostile");
    let rs = rt.block_on(store(&url, &prefix, 2));
    let a = ScopeKey::subject("a");
    let d0 = day_start(T0);
    admit(&rt, &rs, &a, 5, T0).unwrap();
    admit(&rt, &rs, &a, 7, T0 + DAY).unwrap(); // rolls day 0 into |p
    let fields = history_fields(&url, &prefix);
    assert_eq!(fields.len(), 1, "{fields:?}");
    let (key, field) = &fields[0];
    let mut c = conn(&url);
    let v: String = redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(&mut c)
        .unwrap();
    assert_eq!(v, format!("d2|{d0}:5"));
    // Day 1's total, as a host's garbage (one past u64::MAX).
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(format!("{d0}:5;{}:18446744073709551616", d0 + DAY))
        .query(&mut c)
        .unwrap();
    // Clock back into day 1 is not needed: a counter re-made in day 1
    // after a reclaim merges into the same total. Simplest: day 2 rolls
    // day 1 (7 used) and merges with the kept day-1 value.
    let r = admit(&rt, &rs, &a, 1, T0 + 2 * DAY);
    let r2 = admit(&rt, &rs, &a, 1, T0 + 2 * DAY + 1000);
    let read = rt.block_on(AsyncAllowanceStore::period_usage(
        &rs,
        &[PeriodOp::new(&a, Name::new("t"), day_window(), d0 + DAY)],
        T0 + 2 * DAY,
    ));
    cleanup(&url, &prefix);
    assert!(
        r.is_ok() && r2.is_ok() && read.is_ok(),
        "admit {r:?}\nagain {r2:?}\nread {read:?}"
    );
}

/// An idle subject's ended period stays readable `depth` periods: the
/// scope hash's PTTL covers the end of the period plus `depth` periods;
/// with depth 0 it is not extended.
#[test]
fn idle_subject_hash_ttl_covers_depth() {
    let Some(url) = url() else { return };
    let rt = rt();
    let mut c = conn(&url);
    for depth in [0u32, 3] {
        let prefix = unique_prefix("rv4ttl");
        let rs = rt.block_on(store(&url, &prefix, depth));
        let a = ScopeKey::subject("a");
        admit(&rt, &rs, &a, 5, T0).unwrap();
        let end = day_start(T0) + DAY;
        let want = end + i64::from(depth) * DAY - T0 + HOUR; // margin 1 h
        let keys = keys_under(&url, &prefix);
        let mut pttls = Vec::new();
        for k in &keys {
            let t: i64 = redis::cmd("PTTL").arg(k).query(&mut c).unwrap();
            pttls.push((k.clone(), t));
        }
        cleanup(&url, &prefix);
        let hash = pttls.iter().find(|(k, _)| k.contains(":c:")).expect("hash");
        assert!(
            hash.1 <= want && hash.1 > want - 60_000,
            "depth {depth}: pttl {} want ~{want} ({pttls:?})",
            hash.1
        );
    }
}

/// After a roll, the `|p` field (and the hash) lives until the kept
/// period is `depth` periods old, even when the new period's counter is
/// reclaimed (a zero-delta admit).
#[test]
fn rolled_total_readable_for_depth_periods_after_idle() {
    let Some(url) = url() else { return };
    let rt = rt();
    let mut c = conn(&url);
    let prefix = unique_prefix("rv4ttl2");
    let rs = rt.block_on(store(&url, &prefix, 2));
    let a = ScopeKey::subject("a");
    admit(&rt, &rs, &a, 5, T0).unwrap();
    admit(&rt, &rs, &a, 0, T0 + DAY).unwrap();
    let keys = keys_under(&url, &prefix);
    let hk = keys
        .iter()
        .find(|k| k.contains(":c:"))
        .expect("hash")
        .clone();
    let t: i64 = redis::cmd("PTTL").arg(&hk).query(&mut c).unwrap();
    let want = day_start(T0) + DAY + 2 * DAY - (T0 + DAY) + HOUR;
    let read = rt
        .block_on(AsyncAllowanceStore::period_usage(
            &rs,
            &[PeriodOp::new(
                &a,
                Name::new("t"),
                day_window(),
                day_start(T0),
            )],
            T0 + DAY,
        ))
        .unwrap();
    cleanup(&url, &prefix);
    assert_eq!(read, vec![5]);
    assert!(t >= want - 60_000, "pttl {t} want >= {want}");
}

/// The read after the library is gone (`FUNCTION FLUSH`, a restarted
/// server): the periods function loads it again, as apply does. Runs on a
/// private `redis-server` the test starts on a free port (it flushes the
/// server's functions), when the shared one is given.
#[test]
fn periods_read_reloads_a_flushed_library() {
    if url().is_none() {
        return;
    }
    let Some(server) = PrivateRedis::start() else {
        return;
    };
    let url = server.url.clone();
    let rt = rt();
    let prefix = unique_prefix("rv4flush");
    let rs = rt.block_on(store(&url, &prefix, 2));
    let a = ScopeKey::subject("a");
    admit(&rt, &rs, &a, 5, T0).unwrap();
    admit(&rt, &rs, &a, 1, T0 + DAY).unwrap();
    let mut c = conn(&url);
    let _: () = redis::cmd("FUNCTION").arg("FLUSH").query(&mut c).unwrap();
    let read = rt.block_on(AsyncAllowanceStore::period_usage(
        &rs,
        &[PeriodOp::new(
            &a,
            Name::new("t"),
            day_window(),
            day_start(T0),
        )],
        T0 + DAY,
    ));
    cleanup(&url, &prefix);
    assert_eq!(read.unwrap(), vec![5]);
}

/// Two replicas sharing a prefix with different depths: the shallower
/// one's roll keeps what the deeper one keeps (the field records the
/// deepest depth; found in review: it trimmed to its own).
#[test]
fn a_shallower_replica_keeps_what_a_deeper_one_kept() {
    let Some(url) = url() else { return };
    let rt = rt();
    let prefix = unique_prefix("rv4depths");
    let deep = rt.block_on(store(&url, &prefix, 4));
    let shallow = rt.block_on(store(&url, &prefix, 1));
    let a = ScopeKey::subject("a");
    for i in 0..4 {
        admit(&rt, &deep, &a, 10 + i as u64, T0 + i * DAY).unwrap();
    }
    // Day 4: the shallow replica rolls day 3.
    admit(&rt, &shallow, &a, 1, T0 + 4 * DAY).unwrap();
    let q: Vec<_> = (0..4)
        .map(|i| PeriodOp::new(&a, Name::new("t"), day_window(), day_start(T0) + i * DAY))
        .collect();
    let got = rt
        .block_on(AsyncAllowanceStore::period_usage(&deep, &q, T0 + 4 * DAY))
        .unwrap();
    cleanup(&url, &prefix);
    assert_eq!(
        got,
        vec![10, 11, 12, 13],
        "the deep replica's history after a shallow roll"
    );
}

/// Two totals of one period (kept at a roll, the period re-made after a
/// clock step back, rolled again) past u64::MAX: the merge saturates, as
/// the memory store's `saturating_add`.
#[test]
fn merged_same_period_total_saturates_like_memory() {
    let Some(url) = url() else { return };
    let rt = rt();
    let prefix = unique_prefix("rv4sat");
    let rs = rt.block_on(store(&url, &prefix, 2));
    let mem = MemoryStore::new().with_history_periods(2).unwrap();
    let a = ScopeKey::subject("a");
    let steps = [
        (u64::MAX - 5, T0),
        (0, T0 + DAY),
        (10, T0 + 1000),
        (0, T0 + DAY + 1000),
    ];
    for (d, now) in steps {
        let ops = [CounterOp::new(&a, Name::new("t"), day_window(), d, None)];
        let b = Batch::new(&ops, Mode::Force, now);
        let m = AllowanceStore::apply(&mem, &b).map(|r| r.counters);
        let r = rt
            .block_on(AsyncAllowanceStore::apply(&rs, &b))
            .map(|r| r.counters);
        assert_eq!(format!("{m:?}"), format!("{r:?}"), "at {now}");
    }
    let q = [PeriodOp::new(
        &a,
        Name::new("t"),
        day_window(),
        day_start(T0),
    )];
    let mu = AllowanceStore::period_usage(&mem, &q, T0 + DAY + 1000).unwrap();
    let ru = rt
        .block_on(AsyncAllowanceStore::period_usage(&rs, &q, T0 + DAY + 1000))
        .unwrap();
    cleanup(&url, &prefix);
    assert_eq!(mu, ru);
    assert_eq!(ru, vec![u64::MAX]);
}

/// The Lua error of `hostile_history_value_fails_every_later_admit` is
/// raised in the write-back phase (`keepclosed` runs while phase 2 builds
/// each hash's fields), after the hashes before it were written: a batch
/// over a pool and a subject writes the pool's counter, then reads the
/// subject's malformed `|p` (a 25-digit total): the entry is skipped and
/// the batch applies whole (found in review: it failed with a Lua error
/// after the pool's write, reported as `Error::Store`, so a retry charged
/// the pool twice).
#[test]
fn a_malformed_history_field_never_fails_a_batch() {
    let Some(url) = url() else { return };
    let rt = rt();
    let prefix = unique_prefix("rv4partial");
    let rs = rt.block_on(store(&url, &prefix, 2));
    let a = ScopeKey::subject("a");
    let team = ScopeKey::pool("team");
    let t = Name::new("t");
    let d0 = day_start(T0);
    // Day 0: the subject uses 5 (the pool nothing yet).
    admit(&rt, &rs, &a, 5, T0).unwrap();
    admit(&rt, &rs, &a, 7, T0 + DAY).unwrap(); // |p = d0:5
    let fields = history_fields(&url, &prefix);
    assert_eq!(fields.len(), 1, "{fields:?}");
    let (key, field) = &fields[0];
    let mut c = conn(&url);
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(format!("{}:{}", d0 + DAY, "9".repeat(25)))
        .query(&mut c)
        .unwrap();
    // Day 2: pool first, then the subject (whose roll merges into the
    // garbage total).
    let ops = [
        CounterOp::new(&team, t, day_window(), 3, None),
        CounterOp::new(&a, t, day_window(), 1, None),
    ];
    let now = T0 + 2 * DAY;
    let r = rt.block_on(AsyncAllowanceStore::apply(
        &rs,
        &Batch::new(&ops, Mode::Force, now),
    ));
    let pool = rt
        .block_on(AsyncAllowanceStore::period_usage(
            &rs,
            &[PeriodOp::new(&team, t, day_window(), d0 + 2 * DAY)],
            now,
        ))
        .unwrap();
    let day1 = rt
        .block_on(AsyncAllowanceStore::period_usage(
            &rs,
            &[PeriodOp::new(&a, t, day_window(), d0 + DAY)],
            now,
        ))
        .unwrap();
    cleanup(&url, &prefix);
    assert!(r.as_ref().is_ok_and(|a| a.applied), "{r:?}");
    assert_eq!(pool, vec![3], "the pool's part of the batch");
    assert_eq!(
        day1,
        vec![7],
        "day 1's total, kept; the malformed entry skipped"
    );
}

/// On the server's clock: a counter left in yesterday's period (written
/// on the batch's clock a day back) is rolled by a server-clock admit;
/// yesterday's total is read back and the hash lives `depth` days past
/// yesterday's end.
#[test]
fn server_clock_roll_keeps_yesterday() {
    let Some(url) = url() else { return };
    let rt = rt();
    let prefix = unique_prefix("rv4srv");
    let batch = rt.block_on(store(&url, &prefix, 2));
    let server = rt
        .block_on(
            RedisConfig::new(&url)
                .prefix(&prefix)
                .time_source(TimeSource::Server)
                .timeout(Duration::from_secs(10))
                .history_periods(2)
                .secret([7u8; 32])
                .connect(),
        )
        .unwrap();
    let a = ScopeKey::subject("a");
    let real = chrono::Utc::now().timestamp_millis();
    admit(&rt, &batch, &a, 5, real - DAY).unwrap();
    admit(&rt, &server, &a, 1, real).unwrap();
    let y = day_start(real - DAY);
    let got = rt
        .block_on(AsyncAllowanceStore::period_usage(
            &server,
            &[PeriodOp::new(&a, Name::new("t"), day_window(), y)],
            real,
        ))
        .unwrap();
    let mut c = conn(&url);
    let hk = keys_under(&url, &prefix)
        .into_iter()
        .find(|k| k.contains(":c:"))
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL").arg(&hk).query(&mut c).unwrap();
    cleanup(&url, &prefix);
    assert_eq!(got, vec![5]);
    let want = y + DAY + 2 * DAY - real; // without the margin
    assert!(pttl >= want, "pttl {pttl} < {want}");
}

/// A `redis-server` of its own on a free port, stopped when dropped.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
}

impl PrivateRedis {
    /// `None` (saying the test was skipped) when `redis-server` cannot be
    /// started.
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let child = match std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: cannot start redis-server: {e}");
                return None;
            }
        };
        let server = Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        for _ in 0..100 {
            if let Ok(mut c) =
                redis::Client::open(server.url.as_str()).and_then(|c| c.get_connection())
            {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Some(server);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on port {port} did not answer");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
