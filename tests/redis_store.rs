//! `RedisStore` against a real Redis named by `TOLLGATE_REDIS_URL`: the
//! conformance suite unchanged (through a blocking adapter), many engines on
//! one limit, an outage and its recovery, and TTLs on every key written.
//! Without the variable every test prints that it was skipped and passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeZone;
use chrono::{DateTime, Utc};
use tollgate::store::{
    AllowanceStore, Applied, AsyncAllowanceStore, Batch, CooldownOp, CounterOp, EventKey,
    FailurePolicy, Fraction, LeaseAction, LeaseId, LeaseInfo, LeaseOp, Mode, RedisConfig,
    RedisStore, TimeSource,
};
use tollgate::{
    conformance, Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, MemoryStore,
    Meter, Period, PlanConfig, Request, ScopeKey, SystemClock, Window,
};

fn url() -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_REDIS_URL not set");
            None
        }
    }
}

/// A prefix no other test run uses.
fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "tollgate-test:{name}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The sync seam over a `RedisStore`: what the conformance suite takes.
struct Blocking {
    rt: Arc<tokio::runtime::Runtime>,
    store: RedisStore,
}

impl AllowanceStore for Blocking {
    fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::apply(&self.store, batch))
    }

    fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        self.rt
            .block_on(AsyncAllowanceStore::overdue(&self.store, now))
    }
}

/// Delete every key under `tag` (the store's own prefix only).
async fn flush(url: &str, tag: &str) -> usize {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
    keys.len()
}

async fn scan(conn: &mut redis::aio::MultiplexedConnection, tag: &str) -> Vec<String> {
    // Match the tag literally: escape glob characters.
    let mut pattern = String::new();
    for ch in tag.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern.push_str(":*");
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Keys under `tag` with no TTL.
async fn keys_without_ttl(url: &str, tag: &str) -> (usize, Vec<String>) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = scan(&mut conn, tag).await;
    let mut without = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        if ttl == -1 {
            without.push(k.clone());
        }
    }
    (keys.len(), without)
}

fn conformance_on(name: &str, run: impl FnOnce(&dyn Fn() -> Blocking)) {
    let Some(url) = url() else { return };
    let rt = Arc::new(runtime());
    let tags = std::sync::Mutex::new(Vec::new());
    let new = || {
        let store = rt
            .block_on(
                RedisConfig::new(url.clone())
                    .prefix(unique_prefix(name))
                    .time_source(TimeSource::Batch)
                    .timeout(Duration::from_secs(5))
                    .connect(),
            )
            .expect("connect to TOLLGATE_REDIS_URL");
        tags.lock().unwrap().push(store.key_tag().to_owned());
        Blocking {
            rt: rt.clone(),
            store,
        }
    };
    run(&new);
    for tag in tags.into_inner().unwrap() {
        let (n, without) = rt.block_on(keys_without_ttl(&url, &tag));
        assert!(without.is_empty(), "{n} keys, without a TTL: {without:?}");
        rt.block_on(flush(&url, &tag));
    }
}

#[test]
fn conformance_batches_are_all_or_nothing() {
    conformance_on("all-or-nothing", |new| {
        conformance::batches_are_all_or_nothing(new)
    });
}

#[test]
fn conformance_bad_batches_change_nothing() {
    conformance_on("bad", |new| conformance::bad_batches_change_nothing(new));
}

#[test]
fn conformance_windows_roll_exactly() {
    conformance_on("windows", |new| conformance::windows_roll_exactly(new));
}

#[test]
fn conformance_holds_count_and_settle() {
    conformance_on("holds", |new| conformance::holds_count_and_settle(new));
}

#[test]
fn conformance_leases_expire_and_renew() {
    conformance_on("leases", |new| conformance::leases_expire_and_renew(new));
}

#[test]
fn conformance_events_apply_once() {
    conformance_on("events", |new| conformance::events_apply_once(new));
}

#[test]
fn conformance_cooldowns_block_until_they_end() {
    conformance_on("cooldowns", |new| {
        conformance::cooldowns_block_until_they_end(new)
    });
}

#[test]
fn conformance_concurrent_batches_never_over_admit() {
    conformance_on("concurrent", |new| {
        conformance::concurrent_batches_never_over_admit(new)
    });
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Random batches, the same on `MemoryStore` and `RedisStore`: every answer
/// (counters, holds, reset and available times, settlements, cooldowns,
/// replays, and which error) must be equal. Amounts reach past 2^53 and up
/// to `u64::MAX`, where the script's limb arithmetic takes over.
#[test]
fn answers_as_the_memory_store_does() {
    let Some(url) = url() else { return };
    let rt = runtime();
    let store = rt
        .block_on(
            RedisConfig::new(url.clone())
                .prefix(unique_prefix("differential"))
                .time_source(TimeSource::Batch)
                .timeout(Duration::from_secs(5))
                .connect(),
        )
        .expect("connect");
    let tag = store.key_tag().to_owned();
    let redis = Blocking {
        rt: Arc::new(rt),
        store,
    };
    let memory = MemoryStore::new();
    let scopes = [
        ScopeKey::subject("a"),
        ScopeKey::subject("sk_live_0123456789abcdefghij"),
        ScopeKey::pool("p{x}:y"),
        ScopeKey::pool(""),
    ];
    let windows = [
        Window::calendar(Period::Day),
        Window::Calendar {
            period: Period::Week,
            utc_offset_secs: -5 * 3600,
        },
        Window::Calendar {
            period: Period::Month,
            utc_offset_secs: 9 * 3600,
        },
        Window::Rolling {
            span_secs: 3600,
            buckets: 4,
        },
        Window::Rolling {
            span_secs: 60,
            buckets: 3,
        },
        Window::Lifetime,
        Window::Concurrent,
    ];
    const BIG: u64 = 1 << 53;
    let deltas = [0, 1, 3, 7, 100, BIG - 1, BIG + 1, u64::MAX / 3, u64::MAX];
    let maxes = [
        None,
        Some(10),
        Some(200),
        Some(BIG),
        Some(u64::MAX / 2 + 7),
        Some(u64::MAX),
    ];
    let fractions = [
        Fraction::ZERO,
        Fraction::ONE,
        Fraction::new(1, 2).unwrap(),
        Fraction::new(1, 3).unwrap(),
        Fraction::new(u64::MAX - 1, u64::MAX).unwrap(),
        Fraction::new(12_345_678_901, 98_765_432_109_876).unwrap(),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut now = Utc.with_ymd_and_hms(2026, 1, 31, 20, 0, 0).unwrap();
    let mut leases: Vec<(LeaseId, usize)> = Vec::new();
    let mut next_lease = 1u128;
    // Applied, settled with a charge, replayed, past 2^53, with a wait time.
    let mut seen = [0usize; 5];
    for step in 0..600 {
        now += chrono::Duration::seconds(rng.pick(&[0, 0, 1, 1, 7, 20, 61, 900, 3600]));
        let n = rng.pick(&[0usize, 1, 2, 3, 4]);
        let mut ops: Vec<CounterOp<'_>> = Vec::new();
        for _ in 0..n {
            let scope = &scopes[(rng.next() % 4) as usize];
            let meter = rng.pick(&["t", "u", ""]);
            let window = rng.pick(&windows);
            if ops
                .iter()
                .any(|o| o.scope == scope && o.meter == meter && o.window == window)
            {
                continue;
            }
            let delta = if rng.next() % 3 == 0 {
                rng.pick(&deltas)
            } else {
                rng.next() % 20
            };
            ops.push(CounterOp::new(
                scope,
                meter,
                window,
                delta,
                rng.pick(&maxes),
            ));
        }
        let mode = rng.pick(&[Mode::Check, Mode::WithinLimits, Mode::Force]);
        let cool: Vec<CooldownOp<'_>> = if rng.next() % 4 == 0 {
            let until = (rng.next() % 2 == 0).then(|| now + chrono::Duration::seconds(30));
            vec![CooldownOp::new(
                &scopes[(rng.next() % 2) as usize * 2],
                until,
            )]
        } else {
            Vec::new()
        };
        let mut batch = Batch::new(&ops, mode, now).with_cooldowns(&cool);
        let event_id;
        if rng.next() % 5 == 0 {
            event_id = format!("ev{}", rng.next() % 6);
            batch = batch.with_event(EventKey::new(&event_id, rng.next() % 2));
        }
        // Leases are owned by scope 0 or 1 and hold only their owner's and
        // the pools' counters (what RedisStore keeps).
        let lease_kind = rng.next() % 6;
        let mut opened = None;
        if lease_kind < 4 {
            let (id, owner) = if lease_kind == 0 || leases.is_empty() {
                next_lease += 1;
                let owner = (rng.next() % 2) as usize;
                (LeaseId::from_u128(next_lease), owner)
            } else {
                leases[(rng.next() % leases.len() as u64) as usize]
            };
            if ops.iter().any(|o| {
                o.scope.kind() == tollgate::store::ScopeKind::Subject && o.scope != &scopes[owner]
            }) {
                // Keep to the owner's counters.
            } else {
                let action = match lease_kind {
                    0 => LeaseAction::Open {
                        expires_at: now
                            + chrono::Duration::seconds(rng.pick(&[1, 30, 5000, 100_000])),
                        deadline: None,
                    },
                    1 => LeaseAction::Grow,
                    2 => LeaseAction::Renew {
                        expires_at: now + chrono::Duration::seconds(rng.pick(&[1, 60, 9000])),
                    },
                    _ => LeaseAction::Settle {
                        keep: rng.pick(&fractions),
                    },
                };
                if lease_kind == 0 {
                    opened = Some((id, owner));
                }
                batch = batch.with_lease(LeaseOp::new(id, &scopes[owner], action));
                batch.mode = match action {
                    LeaseAction::Open { .. } => rng.pick(&[Mode::WithinLimits, Mode::Check]),
                    LeaseAction::Grow => rng.pick(&[Mode::WithinLimits, Mode::Force]),
                    LeaseAction::Settle { .. } => Mode::Force,
                    _ => mode,
                };
                if matches!(action, LeaseAction::Renew { .. }) {
                    batch.ops = &[];
                    batch.mode = Mode::Force;
                }
            }
        }
        let want = AllowanceStore::apply(&memory, &batch);
        let got = redis.apply(&batch);
        match (&want, &got) {
            (Ok(w), Ok(g)) => {
                assert_eq!(w, g, "step {step}: {batch:#?}");
                seen[0] += usize::from(w.applied);
                seen[1] += usize::from(w.settled.iter().any(|h| h.charged > 0));
                seen[2] += usize::from(w.replayed_at.is_some());
                seen[3] += usize::from(w.counters.iter().any(|c| c.used >= 1 << 53));
                seen[4] += usize::from(w.counters.iter().any(|c| c.available_at.is_some()));
            }
            (Err(w), Err(g)) => assert_eq!(
                std::mem::discriminant(w),
                std::mem::discriminant(g),
                "step {step}: {w} / {g}"
            ),
            _ => panic!("step {step}: memory {want:?}, redis {got:?}, batch {batch:#?}"),
        }
        if let (Some(l), Ok(a)) = (opened, &want) {
            if a.applied {
                leases.push(l);
            }
        }
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "every path was taken: {seen:?}"
    );
    let (_, without) = redis.rt.block_on(keys_without_ttl(&url, &tag));
    assert!(without.is_empty(), "keys without a TTL: {without:?}");
    redis.rt.block_on(flush(&url, &tag));
}
