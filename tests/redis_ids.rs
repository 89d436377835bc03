//! `RedisStore` keeps no subject, pool, owner or event id as text: every key
//! and every value under a store's prefix is read back after admits,
//! reservations, settlements and `overdue`, and none holds an id (raw or
//! hex), whatever shape the id has. Needs `TOLLGATE_REDIS_URL`; without it
//! each test prints that it was skipped and passes.

#[path = "support/redis_env.rs"]
mod redis_env;
use redis_env::{unique_prefix, url};

use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::store::{
    AsyncAllowanceStore, BalanceAction, BalanceOp, Batch, GrantOp, LeaseAction, LeaseId, LeaseOp,
    Mode, RedisConfig, TimeSource,
};
use tollgate::{
    Allocation, CatalogConfig, Engine, Error, LimitConfig, ManualClock, Meter, Period, PlanConfig,
    PoolConfig, Request, ScopeKey, Window,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Subject ids of every shape the issue names, and plain ones.
const SUBJECTS: [&str; 10] = [
    "Basic dXNlcjpwYXNzd29yZA==",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "glpat-Xq8vP2mN4kL7sR1tY3wZ",
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "4111111111111111",
    "sk-ant-api03-Zx9yW8vU7tS6",
    "api_key=abc123def",
    "Bearer eyJhbGciOiJIUzI1NiJ9",
    "agent-7",
    "acme",
];
const POOL: &str = "xoxb-1234-team-pool-5678";
/// Payment ids (a prepaid balance's grant ids) of credential-like shapes.
const PAYMENTS: [&str; 6] = [
    "pi_3NxYz2LkdIwHu7ix0Abc1234",
    "ch_1Mq2Lk2eZvKYlo2CkPvNx8Qw",
    "PAYID-MXQ7ZKQ8XV123456AB",
    "whsec_payment_9f8e7d6c5b4a",
    "order:4111111111111111",
    "Bearer pay-eyJhbGciOiJIUzI1NiJ9",
];

/// Every key name, and every string, hash field, hash value and set member
/// under `tag` (the generated secret's key excepted: it holds the secret),
/// binary ones as lossy UTF-8.
async fn everything_under(url: &str, tag: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{tag}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut out = Vec::new();
    for key in keys {
        if key == format!("{tag}:secret") {
            continue;
        }
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("type");
        // Values may be binary (packed counters, the ledger's msgpack):
        // read as bytes, compared as lossy text.
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("get")],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("hgetall"),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .expect("zrange"),
            other => panic!("{key}: unexpected type {other}"),
        };
        out.push(key);
        out.extend(
            values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
        );
    }
    out
}

fn assert_no_id(texts: &[String], ids: &[&str]) {
    for id in ids {
        let hexed = hex::encode(id.as_bytes());
        for t in texts {
            assert!(!t.contains(id), "`{t}` holds the id `{id}`");
            assert!(
                !t.to_ascii_lowercase().contains(&hexed),
                "`{t}` holds the id `{id}` in hex"
            );
        }
    }
}

#[test]
fn no_id_is_stored_or_returned_as_text() {
    let Some(url) = url() else { return };
    runtime().block_on(async {
        let store = RedisConfig::new(&url)
            .prefix(unique_prefix("ids"))
            .time_source(TimeSource::Batch)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let tag = store.key_tag().to_owned();
        let digests: Vec<String> = SUBJECTS
            .iter()
            .map(|s| store.digest_of(&ScopeKey::subject(*s)))
            .collect();
        let catalog = CatalogConfig::default()
            .meter(Meter::count("tokens"))
            .plan(
                PlanConfig::new("plan")
                    .max_job_duration("10m")
                    .cooldown_after_failure("1m")
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::calendar(Period::Day),
                        1_000u64,
                    ))
                    .limit(LimitConfig::new(
                        "tokens",
                        Window::Rolling {
                            span_secs: 3600,
                            buckets: 6,
                        },
                        1_000u64,
                    )),
            )
            .pool(PoolConfig::new(POOL).limit(LimitConfig::new(
                "tokens",
                Window::Lifetime,
                100_000u64,
            )))
            .build()
            .expect("catalog");
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        let engine = Engine::with_store_and_clock(catalog, store.clone(), clock.clone());
        let mut reservations = Vec::new();
        for (i, s) in SUBJECTS.iter().enumerate() {
            engine
                .allocate(Allocation::new(*s, "plan").with_pool(POOL))
                .expect("allocate");
            let event = format!("{s}#event");
            let d = engine
                .admit_async(&Request::new(s).units("tokens", 3).event(&event))
                .await
                .expect("admit");
            assert!(d.recorded);
            let res = engine
                .reserve_async(
                    &Request::new(s).units("tokens", 10),
                    Duration::from_secs(3600),
                )
                .await
                .expect("reserve")
                .expect("admitted");
            if i % 2 == 0 {
                reservations.push((i, res));
            } else {
                let d = engine
                    .release_async(&res, tollgate::Outcome::Failed)
                    .await
                    .expect("release");
                assert!(d.recorded);
            }
        }
        clock.advance(chrono::Duration::minutes(11));
        let overdue = engine.overdue_async().await.expect("overdue");
        assert_eq!(overdue.len(), reservations.len());
        for (i, res) in &reservations {
            let info = overdue
                .iter()
                .find(|l| l.id == res.id())
                .expect("each open reservation is overdue, by its lease id");
            // The owner is the digest the host can compute for its id.
            assert_eq!(info.owner, ScopeKey::subject(digests[*i].as_str()));
        }
        let shown: Vec<String> = overdue.iter().map(|l| format!("{l:?}")).collect();
        assert_no_id(&shown, &SUBJECTS);
        for (i, res) in &reservations {
            let s = SUBJECTS[*i];
            let d = engine
                .commit_async(res, &Request::new(s).units("tokens", 4))
                .await
                .expect("commit");
            let l = d
                .limit(&ScopeKey::pool(POOL), "tokens")
                .expect("the pool's limit, named by the engine");
            assert!(l.used >= 4);
        }

        // Prepaid balances: grants under payment ids (and under the
        // subjects' own ids, as a host might use), debits, a hold.
        let payments: Vec<String> = SUBJECTS
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                [
                    format!("{}-{i}", PAYMENTS[i % PAYMENTS.len()]),
                    (*s).to_owned(),
                ]
            })
            .collect();
        let cost = tollgate::Name::new("cost");
        let now = clock.now_utc().timestamp_millis();
        let pool = ScopeKey::pool(POOL);
        for (i, s) in SUBJECTS.iter().enumerate() {
            let subject = ScopeKey::subject(*s);
            let scope = if i % 3 == 0 { &pool } else { &subject };
            for p in &payments[2 * i..2 * i + 2] {
                let g = BalanceOp::new(
                    scope,
                    cost,
                    BalanceAction::Grant(GrantOp::new(p, 100, now).expiring(now + 86_400_000)),
                );
                let r = AsyncAllowanceStore::apply(
                    &store,
                    &Batch::new(&[], Mode::Force, now).with_balance(g),
                )
                .await
                .expect("grant");
                assert!(r.applied);
            }
            let debit = BalanceOp::new(
                scope,
                cost,
                BalanceAction::Debit {
                    amount: 30,
                    overdraft: 0,
                },
            );
            let open = LeaseOp::new(
                LeaseId::random(),
                &subject,
                LeaseAction::Open {
                    expires_at_ms: now + 60_000,
                    deadline_ms: None,
                },
            );
            let r = AsyncAllowanceStore::apply(
                &store,
                &Batch::new(&[], Mode::WithinLimits, now)
                    .with_lease(open)
                    .with_balance(debit),
            )
            .await
            .expect("hold");
            assert!(r.applied);
            let r = AsyncAllowanceStore::apply(
                &store,
                &Batch::new(&[], Mode::WithinLimits, now + 1)
                    .with_balance(debit)
                    .with_event(tollgate::store::EventKey::new(&format!("{s}#debit"), 7)),
            )
            .await
            .expect("debit");
            assert!(r.applied);
            // The answer names each grant by its payment id, read back.
            let b = r.balance.expect("reported");
            let listed: Vec<&str> = b.grants.iter().map(|g| g.id.as_str()).collect();
            let mut want: Vec<&str> = payments[2 * i..2 * i + 2]
                .iter()
                .map(String::as_str)
                .collect();
            want.sort_unstable();
            if i % 3 == 0 {
                // The pool's balance collects several subjects' grants.
                assert!(want.iter().all(|w| listed.contains(w)), "{listed:?}");
            } else {
                assert_eq!(listed, want, "grants reported by their payment ids");
            }
        }

        let mut ids: Vec<&str> = SUBJECTS.to_vec();
        ids.push(POOL);
        ids.extend(payments.iter().map(String::as_str));
        let events: Vec<String> = SUBJECTS.iter().map(|s| format!("{s}#event")).collect();
        ids.extend(events.iter().map(String::as_str));
        let texts = everything_under(&url, &tag).await;
        assert!(texts.len() > 30, "the store wrote keys: {}", texts.len());
        assert!(
            texts
                .iter()
                .any(|t| t.contains(":b:") && t.ends_with(":4:cost")),
            "the balances' keys were scanned"
        );
        assert_no_id(&texts, &ids);
    });
}

#[test]
fn secrets_are_checked_and_shared() {
    let Some(url) = url() else { return };
    runtime().block_on(async {
        let prefix = unique_prefix("secret");
        let err = RedisConfig::new(&url)
            .prefix(&prefix)
            .secret("short")
            .connect()
            .await
            .expect_err("a short secret is refused");
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "redis.secret"),
            "{err:?}"
        );
        // Two replicas with no secret configured agree through the stored one.
        let a = RedisConfig::new(&url)
            .prefix(&prefix)
            .connect()
            .await
            .expect("a");
        let b = RedisConfig::new(&url)
            .prefix(&prefix)
            .connect()
            .await
            .expect("b");
        let x = ScopeKey::subject("x");
        assert_eq!(a.digest_of(&x), b.digest_of(&x));
        // A configured secret gives other digests, and is never printed.
        let c = RedisConfig::new(&url)
            .prefix(&prefix)
            .secret("0123456789abcdef-configured")
            .connect()
            .await
            .expect("c");
        assert_ne!(a.digest_of(&x), c.digest_of(&x));
        let config = format!(
            "{:?}",
            RedisConfig::new(&url).secret("0123456789abcdef-configured")
        );
        assert!(!config.contains("configured"), "{config}");
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: () = redis::cmd("DEL")
            .arg(format!("{}:secret", a.key_tag()))
            .query_async(&mut conn)
            .await
            .expect("del");
    });
}
