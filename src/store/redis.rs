//! [`RedisStore`]: counters shared by many replicas through Redis (feature
//! `redis`).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use redis::aio::ConnectionManagerConfig;
use redis::{Client, Script};
use sha2::{Digest, Sha256};

use super::{
    Applied, AsyncAllowanceStore, Batch, CounterOp, CounterState, FailurePolicy, LeaseAction,
    LeaseId, LeaseInfo, Mode, ScopeKey, ScopeKind, SettledHold,
};
use crate::window::{Period, Window};
use crate::Error;

const APPLY_LUA: &str = include_str!("redis_apply.lua");
const OVERDUE_LUA: &str = include_str!("redis_overdue.lua");

/// Whose clock rolls the windows and ends the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimeSource {
    /// The Redis server's clock (`TIME`, read inside the script): one clock
    /// for every replica, so replicas with skewed clocks agree on when a
    /// period ends. The default.
    #[default]
    Server,
    /// The engine's clock, as passed in `Batch::now`: what the conformance
    /// suite and tests with a [`ManualClock`](crate::ManualClock) need.
    Batch,
}

/// How a [`RedisStore`] connects and behaves. Build one with
/// [`RedisConfig::new`], change what you need, then
/// [`RedisConfig::connect`].
///
/// ```no_run
/// # async fn run() -> Result<(), tollgate::Error> {
/// use std::time::Duration;
/// use tollgate::store::{FailurePolicy, RedisConfig};
///
/// let store = RedisConfig::new("redis://127.0.0.1:6379")
///     .prefix("quota")
///     .timeout(Duration::from_millis(200))
///     .failure_policy(FailurePolicy::FailClosed)
///     .connect()
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisConfig {
    url: String,
    prefix: String,
    timeout: Duration,
    policy: FailurePolicy,
    time: TimeSource,
    horizon: Duration,
    margin: Duration,
    lifetime_ttl: Duration,
}

impl RedisConfig {
    /// Defaults: prefix `tollgate`, timeout 250 ms, fail closed, the
    /// server's clock, event horizon 24 h, expiry margin 1 h, lifetime
    /// counters kept 10 years after their last write.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "tollgate".into(),
            timeout: Duration::from_millis(250),
            policy: FailurePolicy::FailClosed,
            time: TimeSource::Server,
            horizon: Duration::from_secs(86_400),
            margin: Duration::from_secs(3_600),
            lifetime_ttl: Duration::from_secs(10 * 366 * 86_400),
        }
    }

    /// The prefix of every key (default `tollgate`). It becomes the keys'
    /// hash tag, `{prefix}`, so it may not contain `{` or `}`.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a store call may take, connecting included; past it the
    /// call fails with [`Error::Store`] (default 250 ms).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What the engine's async calls do when Redis fails (default
    /// [`FailurePolicy::FailClosed`]).
    #[must_use]
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Whose clock rolls windows (default [`TimeSource::Server`]).
    #[must_use]
    pub fn time_source(mut self, time: TimeSource) -> Self {
        self.time = time;
        self
    }

    /// How long event ids (and ended leases) are remembered (default 24 h).
    #[must_use]
    pub fn event_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// How long a key outlives the end of what it counts, to cover clock
    /// skew between the batch clock and the server (default 1 h).
    #[must_use]
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// How long a lifetime counter (a prepaid balance, a grant) is kept
    /// after its last write (default 10 years). Every Redis key tollgate
    /// writes has a TTL; this is the one for counters whose window never
    /// ends.
    #[must_use]
    pub fn lifetime_ttl(mut self, ttl: Duration) -> Self {
        self.lifetime_ttl = ttl;
        self
    }

    /// Connect, within the timeout, and load the scripts.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a prefix with braces, a zero timeout or
    /// horizon, or a URL redis-rs refuses; [`Error::Store`] if Redis cannot
    /// be reached within the timeout.
    pub async fn connect(self) -> Result<RedisStore, Error> {
        if self.prefix.contains(['{', '}']) {
            return Err(Error::config("redis.prefix", "may not contain `{` or `}`"));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("redis.timeout", "must be above zero"));
        }
        let ms = |d: Duration, field: &str| -> Result<i64, Error> {
            i64::try_from(d.as_millis())
                .ok()
                .filter(|&m| (1..=1_i64 << 50).contains(&m))
                .ok_or_else(|| Error::config(field, "must be between 1 ms and 2^50 ms"))
        };
        let horizon_ms = ms(self.horizon, "redis.event_horizon")?;
        let margin_ms = ms(self.margin, "redis.expiry_margin")?;
        let lifetime_ms = ms(self.lifetime_ttl, "redis.lifetime_ttl")?;
        let client = Client::open(self.url.as_str())
            .map_err(|e| Error::config("redis.url", e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| timed_out(self.timeout))?
        .map_err(store_error)?;
        let store = RedisStore {
            conn,
            apply: Script::new(APPLY_LUA),
            overdue: Script::new(OVERDUE_LUA),
            tag: format!("{{{}}}", self.prefix),
            timeout: self.timeout,
            policy: self.policy,
            time: self.time,
            horizon_ms,
            margin_ms,
            lifetime_ms,
        };
        let mut conn = store.conn.clone();
        tokio::time::timeout(
            store.timeout,
            store.apply.prepare_invoke().load_async(&mut conn),
        )
        .await
        .map_err(|_| timed_out(store.timeout))?
        .map_err(store_error)?;
        Ok(store)
    }
}

/// An [`AsyncAllowanceStore`] on Redis: every replica that uses the same
/// Redis and prefix shares the same counters, leases, ledger and cooldowns.
///
/// # One round trip per decision
/// One Lua script, loaded once and run with `EVALSHA` (reloaded by redis-rs
/// on `NOSCRIPT`), applies a whole batch atomically: the ledger, the lease,
/// every counter of every scope with its calendar or rolling window and its
/// holds, the cooldowns. Redis runs a script to its end before any other
/// command, so check and record are one step (contract rule 5).
///
/// # Numbers
/// Amounts are kept as decimal strings and the script does exact u64
/// arithmetic (16-bit limbs above 2^53, where Lua's doubles stop being
/// exact), so the whole `u64` range of the contract holds; a sum past it is
/// [`Error::Overflow`], as in [`MemoryStore`](crate::MemoryStore).
///
/// # Keys
/// Every key starts with the hash tag `{prefix}:`. Scope ids never appear in
/// key names: a scope is named by the first 128 bits of SHA-256 over its
/// kind and id (`s:` or `p:` then the id's bytes), an event id by SHA-256
/// of its bytes. All of one scope's counters live in **one hash per
/// scope**, a counter under the field `<len>:<meter>:<window>` (the meter
/// length-prefixed), so no two counters share a field and no counter field
/// is ever another field's name, whatever their ids contain (delimiters,
/// braces, empty strings).
///
/// | key | what |
/// | --- | --- |
/// | `{p}:c:<scope>` | the scope's counters (hash, below) |
/// | `{p}:c:<scope>:x` | the scope's hold expiries: members `<counter field>\|<lease id>` (sorted set) |
/// | `{p}:l:<lease id>` | a lease: owner, expiry, deadline, held counters (hash) |
/// | `{p}:od` | leases with a deadline, for `overdue` (sorted set) |
/// | `{p}:k:<scope>` | a scope's cooldown end |
/// | `{p}:e:<sha256 of event id>` | an applied event: fingerprint, time, answer |
///
/// A scope's hash holds, per counter, one field packing its state as
/// decimal integers separated by spaces: `used held start end` for a
/// calendar window (the period it counts), `used held newest oldest
/// amount` for a rolling window (the newest and oldest bucket numbers and
/// the newest bucket's amount), `used held` for a lifetime or concurrent
/// limit. Beside them: `<field>|b<n>`, the amount of an older bucket of a
/// rolling window; `<field>|h<lease id>`, an amount a lease holds; `x`,
/// the hash's expiry (server clock). A plain admit therefore reads one
/// field per counter and writes them back packed: one `HMGET` and one
/// `HSET` per scope.
///
/// This is the second layout: the first (before issue 5) kept each counter
/// in a hash of its own (`{p}:c:<scope>:<len>:<meter>:<window>`). Key names carry no layout
/// version; there is no deployed data to migrate, and a store must not be
/// pointed at keys written by the first layout.
///
/// Values hold amounts and times, plus what `overdue` and a settlement must
/// report: a lease's owner and the pools it holds. An id that looks like a
/// secret — it starts like an API key (`sk-`, `sk_`, `pk_`, `rk_`, `api_`,
/// `key_`, `ghp_`, `github_pat_`, `xox`, `AKIA`, `eyJ`, `Bearer `…) or is
/// 24 characters or more of token characters mixing letters and digits —
/// is kept only as `sha256:<hex>` (the first 128 bits), and
/// [`AsyncAllowanceStore::overdue`] reports such an owner as
/// `ScopeKey::subject("sha256:<hex>")`.
///
/// # Expiry
/// Every key gets a TTL when it is written. A scope's hash lives as long as
/// its longest-lived counter needs: a calendar counter until its period
/// ends, a rolling counter until its newest bucket leaves, a lifetime
/// counter [`RedisConfig::lifetime_ttl`] past its last write, each hold
/// until it expires, all plus the expiry margin. The script only ever
/// raises a hash's TTL, never lowers it, so writing a short-lived counter
/// never cuts a longer-lived one's life. Fields of ended windows are never
/// read as live: a calendar counter's field carries its period and is
/// reset when `now` leaves it; a rolling counter's carries its newest and
/// oldest bucket, and buckets that left the window are subtracted and
/// deleted when it is next read; a hold's amount leaves with its expiry
/// (the scope's expiry set). The hold-expiry set gets its hash's TTL. A
/// lease record lives its expiry plus the event horizon; a ledger entry the
/// horizon; a cooldown its end. TTLs are relative (`PEXPIRE`) so they hold
/// whichever clock rolls the windows. On the server's clock a hash also
/// records the expiry it set (field `x`), and a write that would not move
/// it later sends no `PEXPIRE`: most admits within one period or bucket
/// only read and write fields. On the batch's clock the script reads the
/// TTL (`PTTL`) and raises it when needed.
///
/// # Cost
/// A plain admit on two counters of one scope (a day and a rolling window,
/// server clock) makes three `redis.call`s within one period and bucket —
/// `TIME`, one `HMGET` and one `HSET` — and answers an array whose numbers
/// are integer replies; `examples/redis_profile` reads the count and the
/// server's time per call from `INFO commandstats`.
///
/// # Redis Cluster
/// All keys of a store share one hash tag, `{prefix}`, so every key a
/// decision touches is in one slot and the script runs on one node. A
/// store therefore does not spread over a cluster's shards; give tenants
/// their own prefixes to spread load.
///
/// # Outages
/// Every call is bounded by [`RedisConfig::timeout`]; a timeout or a
/// connection error is [`Error::Store`], and the engine's async calls then
/// follow the [`FailurePolicy`]. The connection is a redis-rs
/// `ConnectionManager`: after an outage it reconnects by itself on the
/// next calls.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    apply: Script,
    overdue: Script,
    tag: String,
    timeout: Duration,
    policy: FailurePolicy,
    time: TimeSource,
    horizon_ms: i64,
    margin_ms: i64,
    lifetime_ms: i64,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.tag)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connect with the defaults of [`RedisConfig::new`].
    ///
    /// # Errors
    /// As [`RedisConfig::connect`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        RedisConfig::new(url).connect().await
    }

    /// The hash tag every key starts with: `{prefix}`.
    pub fn key_tag(&self) -> &str {
        &self.tag
    }

    fn scope_hash(scope: &ScopeKey) -> String {
        let mut h = Sha256::new();
        h.update(match scope.kind() {
            ScopeKind::Subject => b"s:",
            ScopeKind::Pool => b"p:",
        });
        h.update(scope.id().as_bytes());
        hex(&h.finalize()[..16])
    }

    /// A scope's hash: every counter of the scope, its buckets and hold
    /// amounts, and the hash's expiry.
    fn scope_key(&self, scope: &ScopeKey) -> String {
        format!("{}:c:{}", self.tag, Self::scope_hash(scope))
    }

    /// A counter's field in its scope's hash: the meter, length-prefixed,
    /// and the window.
    fn counter_field(meter: &str, window: Window) -> String {
        format!("{}:{}:{}", meter.len(), meter, window_key(window))
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| timed_out(self.timeout))?
            .map_err(store_error)
    }

    fn now_arg(&self, now: DateTime<Utc>) -> (String, &'static str) {
        (
            now.timestamp_millis().to_string(),
            if self.time == TimeSource::Server {
                "1"
            } else {
                "0"
            },
        )
    }
}

fn timed_out(timeout: Duration) -> Error {
    Error::Store {
        message: format!("redis: no answer within {timeout:?}"),
    }
}

fn store_error(e: redis::RedisError) -> Error {
    Error::Store {
        message: format!("redis: {e}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Whether an id looks like a credential, and is kept only as a digest.
pub(crate) fn looks_secret(id: &str) -> bool {
    const PREFIXES: [&str; 16] = [
        "sk-",
        "sk_",
        "pk_",
        "rk_",
        "api_",
        "api-",
        "key_",
        "key-",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xox",
        "AKIA",
        "eyJ",
        "Bearer ",
    ];
    if PREFIXES.iter().any(|p| id.starts_with(p)) {
        return true;
    }
    id.len() >= 24
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_+/=.".contains(&b))
        && id.bytes().any(|b| b.is_ascii_digit())
        && id.bytes().any(|b| b.is_ascii_alphabetic())
}

fn digest(id: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(id.as_bytes())[..16]))
}

/// A window as it appears in a counter key.
fn window_key(w: Window) -> String {
    match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => format!("c{}{utc_offset_secs}", period_code(period)),
        Window::Rolling { span_secs, buckets } => format!("r{span_secs}/{buckets}"),
        Window::Lifetime => "l".into(),
        Window::Concurrent => "x".into(),
    }
}

fn parse_window_key(s: &str) -> Option<Window> {
    let (head, rest) = s.split_at_checked(1)?;
    match head {
        "c" => {
            let (p, off) = rest.split_at_checked(1)?;
            let period = match p {
                "d" => Period::Day,
                "w" => Period::Week,
                "m" => Period::Month,
                _ => return None,
            };
            Some(Window::Calendar {
                period,
                utc_offset_secs: off.parse().ok()?,
            })
        }
        "r" => {
            let (span, buckets) = rest.split_once('/')?;
            Some(Window::Rolling {
                span_secs: span.parse().ok()?,
                buckets: buckets.parse().ok()?,
            })
        }
        "l" => Some(Window::Lifetime),
        "x" => Some(Window::Concurrent),
        _ => None,
    }
}

fn period_code(p: Period) -> char {
    match p {
        Period::Day => 'd',
        Period::Week => 'w',
        Period::Month => 'm',
    }
}

/// A window as the script reads it: a kind and two parameters, the period
/// and UTC offset of a calendar window, the bucket width (ms) and count
/// (buckets + 1) of a rolling one (separate arguments, so the script
/// parses no spec on the hot path).
fn window_args(inv: &mut redis::ScriptInvocation<'_>, w: Window) {
    match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => {
            let p = match period {
                Period::Day => "d",
                Period::Week => "w",
                Period::Month => "m",
            };
            inv.arg("C").arg(p).arg(utc_offset_secs);
        }
        Window::Rolling { span_secs, buckets } => {
            inv.arg("R")
                .arg(Window::bucket_ms(span_secs, buckets))
                .arg(u64::from(buckets) + 1);
        }
        Window::Lifetime => {
            inv.arg("L").arg("-").arg("-");
        }
        Window::Concurrent => {
            inv.arg("X").arg("-").arg("-");
        }
    }
}

/// A held counter as a lease record keeps it: whose (relative to the
/// lease's owner), which meter, which window; hex, so it is one token.
fn hold_desc(scope: &ScopeKey, owner: Option<&ScopeKey>, meter: &str, w: Window) -> String {
    let who = if Some(scope) == owner {
        "o".to_owned()
    } else if looks_secret(scope.id()) || scope.kind() == ScopeKind::Subject {
        let k = if scope.kind() == ScopeKind::Subject {
            's'
        } else {
            'P'
        };
        format!("{k}{}", RedisStore::scope_hash(scope))
    } else {
        format!("p{}", scope.id())
    };
    hex(format!("{who}\n{meter}\n{}", window_key(w)).as_bytes())
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

fn bad_reply(what: &str) -> Error {
    Error::Store {
        message: format!("redis: unexpected script reply ({what})"),
    }
}

/// One word of a script reply: the script answers an array whose numbers
/// below 2^53 are integer replies and whose other words are strings (a
/// string may hold several words); errors and replays are one string.
#[derive(Clone, Copy)]
enum Word<'a> {
    Str(&'a str),
    Int(i64),
}

struct Reply<'a>(std::vec::IntoIter<Word<'a>>);

impl<'a> Reply<'a> {
    fn new(value: &'a redis::Value) -> Result<Self, Error> {
        fn text(b: &[u8]) -> Result<&str, Error> {
            std::str::from_utf8(b).map_err(|_| bad_reply("not UTF-8"))
        }
        let mut words = Vec::new();
        match value {
            redis::Value::BulkString(b) => {
                words.extend(text(b)?.split_ascii_whitespace().map(Word::Str));
            }
            redis::Value::Array(items) => {
                words.reserve(items.len());
                for item in items {
                    match item {
                        redis::Value::Int(n) => words.push(Word::Int(*n)),
                        redis::Value::BulkString(b) => {
                            words.extend(text(b)?.split_ascii_whitespace().map(Word::Str));
                        }
                        _ => return Err(bad_reply("element")),
                    }
                }
            }
            _ => return Err(bad_reply("type")),
        }
        Ok(Self(words.into_iter()))
    }
    fn word(&mut self) -> Result<Word<'a>, Error> {
        self.0.next().ok_or_else(|| bad_reply("too short"))
    }
    fn token(&mut self) -> Result<&'a str, Error> {
        match self.word()? {
            Word::Str(s) => Ok(s),
            Word::Int(_) => Err(bad_reply("a number for a word")),
        }
    }
    fn int<T: std::str::FromStr + TryFrom<i64>>(&mut self) -> Result<T, Error> {
        match self.word()? {
            Word::Int(n) => T::try_from(n).map_err(|_| bad_reply("out of range")),
            Word::Str(s) => s.parse().map_err(|_| bad_reply("not a number")),
        }
    }
    fn time(&mut self) -> Result<Option<DateTime<Utc>>, Error> {
        match self.word()? {
            Word::Str("-") => Ok(None),
            Word::Int(ms) => Ok(Some(ms_to_time(ms))),
            Word::Str(t) => t
                .parse::<i64>()
                .map(|ms| Some(ms_to_time(ms)))
                .map_err(|_| bad_reply("not a time")),
        }
    }
}

#[async_trait]
impl AsyncAllowanceStore for RedisStore {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        super::memory::validate(batch)?;
        let owner = batch.lease.map(|l| l.owner);
        if let Some(l) = batch.lease {
            if matches!(l.action, LeaseAction::Open { .. } | LeaseAction::Grow) {
                if let Some(op) = batch.ops.iter().find(|o| {
                    o.delta > 0 && o.scope.kind() == ScopeKind::Subject && o.scope != l.owner
                }) {
                    return Err(Error::InvalidBatch {
                        reason: format!(
                            "RedisStore: a lease holds counters of its owner and of pools, not of {}",
                            op.scope
                        ),
                    });
                }
            }
        }
        let (now, server) = self.now_arg(batch.now);
        let mode = match batch.mode {
            Mode::Check => "c",
            Mode::WithinLimits => "w",
            Mode::Force => "f",
        };
        let mut inv = self.apply.prepare_invoke();
        inv.key(format!("{}:od", self.tag));
        let (mut action, mut lkey, mut lid) = ("-", "-".to_owned(), "-".to_owned());
        let (mut owner_sid, mut owner_desc) = ("-".to_owned(), "-".to_owned());
        let (mut p1, mut p2) = ("-".to_owned(), "-".to_owned());
        if let Some(l) = batch.lease {
            lid = l.id.to_string();
            lkey = format!("{}:l:{lid}", self.tag);
            owner_sid = Self::scope_hash(l.owner);
            let shown = if looks_secret(l.owner.id()) {
                digest(l.owner.id())
            } else {
                l.owner.id().to_owned()
            };
            owner_desc = hex(shown.as_bytes());
            match l.action {
                LeaseAction::Open {
                    expires_at,
                    deadline,
                } => {
                    action = "o";
                    p1 = expires_at.timestamp_millis().to_string();
                    p2 = deadline.map_or("-".into(), |d| d.timestamp_millis().to_string());
                }
                LeaseAction::Renew { expires_at } => {
                    action = "r";
                    p1 = expires_at.timestamp_millis().to_string();
                }
                LeaseAction::Grow => action = "g",
                LeaseAction::Settle { keep } => {
                    action = "s";
                    p1 = keep.num().to_string();
                    p2 = keep.den().to_string();
                }
            }
        }
        let (ekey, efp) = match batch.event {
            Some(e) => (
                format!(
                    "{}:e:{}",
                    self.tag,
                    hex(&Sha256::digest(e.id.as_bytes())[..16])
                ),
                super::event_fingerprint(batch)
                    .unwrap_or(e.fingerprint)
                    .to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        inv.arg(now)
            .arg(server)
            .arg(mode)
            .arg(self.horizon_ms)
            .arg(self.margin_ms)
            .arg(self.lifetime_ms)
            .arg(batch.ops.len())
            .arg(batch.cooldowns.len())
            .arg(action)
            .arg(ekey);
        // What only an event or a lease needs is sent only with one (the
        // script reads the layout from `ekey` and `action`).
        if batch.event.is_some() {
            inv.arg(efp);
        }
        if batch.lease.is_some() {
            inv.arg(lkey)
                .arg(owner_sid)
                .arg(owner_desc)
                .arg(p1)
                .arg(p2)
                .arg(lid)
                .arg(format!("{}:od", self.tag));
        }
        // Only a lease stores or reports hold descriptors.
        let descs: Vec<String> = match batch.lease {
            Some(_) => batch
                .ops
                .iter()
                .map(|op| hold_desc(op.scope, owner, op.meter, op.window))
                .collect(),
            None => Vec::new(),
        };
        let mut last: Option<(&ScopeKey, String)> = None;
        for (i, op) in batch.ops.iter().enumerate() {
            // Ops of one scope (the usual batch) hash its id once.
            if last.as_ref().is_none_or(|(scope, _)| *scope != op.scope) {
                last = Some((op.scope, self.scope_key(op.scope)));
            }
            if let Some((_, key)) = &last {
                inv.arg(key.as_str());
            }
            inv.arg(Self::counter_field(op.meter, op.window));
            window_args(&mut inv, op.window);
            inv.arg(op.delta)
                .arg(op.max.map_or("-".into(), |m| m.to_string()));
            if let Some(desc) = descs.get(i) {
                inv.arg(desc.as_str());
            }
        }
        for c in batch.cooldowns {
            inv.arg(format!("{}:k:{}", self.tag, Self::scope_hash(c.scope)))
                .arg(
                    c.start_until
                        .map_or("-".into(), |t| t.timestamp_millis().to_string()),
                );
        }
        let reply: redis::Value = self.run(&inv).await?;
        self.decode(batch, &descs, &reply)
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        let (now, server) = self.now_arg(now);
        let mut inv = self.overdue.prepare_invoke();
        inv.key(format!("{}:od", self.tag))
            .arg(now)
            .arg(server)
            .arg(format!("{}:l:", self.tag));
        let rows: Vec<String> = self.run(&inv).await?;
        let mut out = Vec::with_capacity(rows.len() / 5);
        for row in rows.chunks_exact(5) {
            let id: LeaseId = row[0].parse().map_err(|_| bad_reply("lease id"))?;
            let owner = unhex(&row[1]).ok_or_else(|| bad_reply("owner"))?;
            let ms = |s: &str| s.parse::<i64>().map(ms_to_time).ok();
            out.push(LeaseInfo::new(
                id,
                ScopeKey::subject(owner),
                ms(&row[2]).ok_or_else(|| bad_reply("opened"))?,
                ms(&row[3]).ok_or_else(|| bad_reply("expiry"))?,
                ms(&row[4]),
            ));
        }
        out.sort_by_key(|l| (l.deadline, l.id));
        Ok(out)
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }
}

impl RedisStore {
    fn decode(
        &self,
        batch: &Batch<'_>,
        descs: &[String],
        reply: &redis::Value,
    ) -> Result<Applied, Error> {
        let mut r = Reply::new(reply)?;
        let mut replayed_at = None;
        match r.token()? {
            "OK" => {}
            "RE" => {
                replayed_at = r.time()?;
                if r.token()? != "OK" {
                    return Err(bad_reply("replay"));
                }
            }
            "ERR" => return Err(self.error(batch, descs, &mut r)),
            _ => return Err(bad_reply("status")),
        }
        let applied = r.int::<u8>()? == 1;
        let _now: i64 = r.int()?;
        let nops: usize = r.int()?;
        // A replay answers the first batch, whose ops the fingerprint
        // vouches for; the reply describes itself either way.
        let mut counters = Vec::with_capacity(nops);
        for _ in 0..nops {
            counters.push(CounterState {
                used: r.int()?,
                held: r.int()?,
                period_start: r.time()?,
                resets_at: r.time()?,
                available_at: r.time()?,
            });
        }
        let ncool: usize = r.int()?;
        let mut cooldowns = Vec::with_capacity(ncool);
        for _ in 0..ncool {
            cooldowns.push(r.time()?);
        }
        let nset: usize = r.int()?;
        let mut settled = Vec::with_capacity(nset);
        for _ in 0..nset {
            let desc = r.token()?;
            let held: u64 = r.int()?;
            let charged: u64 = r.int()?;
            let (scope, meter, window) = self.resolve(batch, descs, desc)?;
            settled.push(SettledHold::new(scope, meter.into(), window, held, charged));
        }
        Ok(Applied {
            applied,
            counters,
            settled,
            cooldowns,
            replayed_at,
        })
    }

    /// The counter a hold descriptor names: an op of the batch, or what the
    /// descriptor itself says.
    fn resolve(
        &self,
        batch: &Batch<'_>,
        descs: &[String],
        desc: &str,
    ) -> Result<(ScopeKey, String, Window), Error> {
        if let Some(op) = descs.iter().position(|d| d == desc).map(|i| batch.ops[i]) {
            return Ok((op.scope.clone(), op.meter.to_owned(), op.window));
        }
        let text = unhex(desc).ok_or_else(|| bad_reply("hold"))?;
        let mut parts = text.splitn(3, '\n');
        let (who, meter, window) = (
            parts.next().unwrap_or_default(),
            parts.next().ok_or_else(|| bad_reply("hold meter"))?,
            parts
                .next()
                .and_then(parse_window_key)
                .ok_or_else(|| bad_reply("hold window"))?,
        );
        let scope = match who.split_at_checked(1) {
            Some(("o", _)) => batch
                .lease
                .map(|l| l.owner.clone())
                .ok_or_else(|| bad_reply("hold owner"))?,
            Some(("p", id)) => ScopeKey::pool(id),
            Some(("P", h)) => ScopeKey::pool(format!("sha256:{h}")),
            Some(("s", h)) => ScopeKey::subject(format!("sha256:{h}")),
            _ => return Err(bad_reply("hold scope")),
        };
        Ok((scope, meter.to_owned(), window))
    }

    fn error(&self, batch: &Batch<'_>, descs: &[String], r: &mut Reply<'_>) -> Error {
        let id = || batch.lease.map(|l| l.id.to_string()).unwrap_or_default();
        match r.token() {
            Ok("conflict") => Error::EventConflict {
                event: batch.event.map(|e| e.id.to_owned()).unwrap_or_default(),
            },
            Ok("open") => Error::InvalidBatch {
                reason: format!("lease {} is already open", id()),
            },
            Ok("unknown") => Error::UnknownReservation { id: id() },
            Ok("settled") => Error::ReservationSettled { id: id() },
            Ok("expired") => Error::ReservationExpired { id: id() },
            Ok("overflow") => {
                let meter = match r.token() {
                    Ok("hold") => r
                        .token()
                        .ok()
                        .and_then(|d| self.resolve(batch, descs, d).ok())
                        .map(|(_, m, _)| m),
                    Ok(i) => i
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| batch.ops.get(i.checked_sub(1)?))
                        .map(|op: &CounterOp<'_>| op.meter.to_owned()),
                    Err(_) => None,
                };
                Error::Overflow {
                    meter: meter.unwrap_or_default(),
                }
            }
            _ => bad_reply("error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_ids_are_recognised() {
        for id in [
            "sk-live-abc",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
            "AKIAIOSFODNN7EXAMPLE",
            "a1b2c3d4e5f6a7b8c9d0e1f2a3",
        ] {
            assert!(looks_secret(id), "{id}");
        }
        for id in ["agent-7", "acme", "user@example.com", "", "repo/tollgate"] {
            assert!(!looks_secret(id), "{id}");
        }
    }

    #[test]
    fn window_keys_round_trip() {
        for w in [
            Window::calendar(Period::Month),
            Window::Calendar {
                period: Period::Week,
                utc_offset_secs: -19_800,
            },
            Window::Rolling {
                span_secs: 86_400,
                buckets: 24,
            },
            Window::Lifetime,
            Window::Concurrent,
        ] {
            assert_eq!(parse_window_key(&window_key(w)), Some(w));
        }
    }

    #[test]
    fn scope_hashes_separate_kinds_and_ids() {
        let a = RedisStore::scope_hash(&ScopeKey::subject("x"));
        let b = RedisStore::scope_hash(&ScopeKey::pool("x"));
        let c = RedisStore::scope_hash(&ScopeKey::subject(""));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 32);
        assert_eq!(unhex(&hex(b"a\nb{c}")).as_deref(), Some("a\nb{c}"));
    }
}
