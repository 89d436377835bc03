//! [`RedisStore`]: counters shared by many replicas through Redis (feature
//! `redis`).

mod allocations;
mod apply;
mod config;
mod conn;
mod encode;
mod history;
mod keyed;
mod reply;
mod span;

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::aio::ConnectionManagerConfig;
use redis::{Client, Script};

use crate::store::{FailurePolicy, ScopeKey};
use crate::window::Window;
use crate::Error;

use conn::{Conn, Layout};
use encode::*;
use keyed::MIN_SECRET_LEN;
use keyed::{Keyed, Secret};

pub use config::RedisConfig;

pub use allocations::RedisAllocations;

const APPLY_LUA: &str = include_str!("apply.lua");
const OVERDUE_LUA: &str = include_str!("overdue.lua");

/// The apply library as `FUNCTION LOAD` takes it (its version filled in:
/// the first 64 bits of SHA-256 of `apply.lua`, hex) and its function's
/// name; made once per process.
fn apply_library() -> &'static (String, String) {
    static LIB: OnceLock<(String, String)> = OnceLock::new();
    LIB.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let version = hex(&Sha256::digest(APPLY_LUA.as_bytes())[..8]);
        (
            APPLY_LUA.replace("@V@", &version),
            format!("tollgate_apply_{version}"),
        )
    })
}

/// Whether a call failed because the server has not loaded the library
/// (a server restarted without persistence, `FUNCTION FLUSH`, a new
/// node): refused whole, so nothing ran.
fn library_missing(e: &redis::RedisError) -> bool {
    e.detail().is_some_and(|d| d.contains("Function not found"))
}

/// Whose clock rolls the windows and ends the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimeSource {
    /// The Redis server's clock (`TIME`, read inside the script): one clock
    /// for every replica, so replicas with skewed clocks agree on when a
    /// period ends. The default.
    #[default]
    Server,
    /// The engine's clock, as passed in `Batch::now_ms`: what the conformance
    /// suite and tests with a [`ManualClock`](crate::ManualClock) need.
    Batch,
}

/// An [`AsyncAllowanceStore`](crate::store::AsyncAllowanceStore) on Redis: every replica that uses the same
/// Redis and prefix shares the same counters, leases, ledger and cooldowns.
///
/// # One round trip per decision
/// One Lua function applies a whole batch atomically: the ledger, the
/// lease, every counter of every scope with its calendar or rolling window
/// and its holds, the cooldowns. Redis runs a function to its end before
/// any other command, so check and record are one step (contract rule 5).
///
/// It is a Redis Functions library (Redis 7.0 or later), `tollgate_<v>`
/// with the function `tollgate_apply_<v>`, where `<v>` is the first 64
/// bits of SHA-256 of its source (hex): [`RedisConfig::connect`] loads it
/// (`FUNCTION LOAD REPLACE`; on a cluster, on every primary) and each
/// batch is one `FCALL`. A server that lacks it (restarted without
/// persistence, `FUNCTION FLUSH`, a node added later) refuses the call
/// whole, and the store loads it and calls once more. Functions rather than
/// `EVALSHA`: a library's helpers are made once, when it loads, where a
/// script makes every one of its closures on every call, and `FCALL` is
/// dispatched faster (together ~1.5 µs of server time per admit, see
/// BENCHMARKS.md). Functions are kept by the server (in its RDB and AOF,
/// and copied to replicas): each tollgate version adds its own small
/// library beside the others, so replicas of two versions can share a
/// Redis during an upgrade; `FUNCTION DELETE tollgate_<v>` removes one no
/// store uses any more.
///
/// # Numbers
/// A counter whose values are all below 2^53 is kept packed (a `#` byte
/// and little-endian doubles, which hold every integer below 2^53
/// exactly), read and written with one `struct.unpack` and one
/// `struct.pack`; at or past 2^53 it is kept as decimal text and the
/// function does exact u64 arithmetic (16-bit limbs, where Lua's doubles
/// stop being exact), so the whole `u64` range of the contract holds; a
/// sum past it is [`Error::Overflow`], as in
/// [`MemoryStore`](crate::MemoryStore). A counter moves between the two
/// forms as it crosses 2^53. Holds, older rolling buckets and balances are
/// decimal text.
///
/// # Keys
/// Every key starts with the hash tag `{prefix}:`. No subject, pool, lease
/// owner or event id is stored or returned as text, in a key or a value: a
/// scope is named by its keyed digest (the first 128 bits of HMAC-SHA-256,
/// under the store's secret ([`RedisConfig::secret`]), over its kind and
/// id), an event id likewise, and an event's fingerprint is kept only as
/// its digest. A grant's payment id is indexed by its keyed digest and
/// kept only sealed (see [Prepaid balances](#prepaid-balances)). Ids
/// shaped like credentials need no special case.
/// All of one scope's counters live in **one hash per
/// scope**, a counter under the field `<len>:<meter>:<window>` (the meter
/// length-prefixed), so no two counters share a field and no counter field
/// is ever another field's name, whatever their ids contain (delimiters,
/// braces, empty strings).
///
/// | key | what |
/// | --- | --- |
/// | `{p}:c:<scope>` | the scope's counters (hash, below) |
/// | `{p}:c:<scope>:x` | the scope's hold expiries: members `<counter field>\|<lease id>` (sorted set) |
/// | `{p}:l:<lease id>` | a lease: owner, expiry, deadline, held counters, the balance key it holds on (hash) |
/// | `{p}:od` | leases with a deadline, for `overdue` (sorted set) |
/// | `{p}:k:<scope>` | a scope's cooldown end |
/// | `{p}:b:<scope>:<len>:<meter>` | a scope's prepaid balance in one money meter (hash, see [Prepaid balances](#prepaid-balances)) |
/// | `{p}:e:<event digest>` | an applied event, one string: fingerprint digest, time, answer (msgpack) |
/// | `{p}:secret` | the generated secret, when none is configured (no TTL) |
///
/// A scope's hash holds, per counter, one field packing its state: `used
/// held start end` for a calendar window (the period it counts), `used
/// held newest oldest amount` for a rolling window (the newest and oldest
/// bucket numbers and the newest bucket's amount), `used held` for a
/// lifetime or concurrent limit — as `#` and doubles while every value is
/// below 2^53, else as decimal integers separated by spaces (see
/// [Numbers](#numbers)). Beside them: `<field>|b<n>`, the amount of an
/// older bucket of a rolling window; `<field>|h<lease id>`, an amount a
/// lease holds; `x`, the hash's expiry (server clock; `#` and a double). A
/// plain admit therefore reads one field per counter and writes them back
/// packed: one `HMGET` and one `HSET` per scope.
///
/// This is the second key layout: the first (before issue 5) kept each
/// counter in a hash of its own (`{p}:c:<scope>:<len>:<meter>:<window>`);
/// key names carry no layout version, and a store must not be pointed at
/// keys written by the first layout. Within it, the packed values (and the
/// ledger's msgpack entries) came with issue 18: this version reads the
/// decimal-text fields and ledger entries earlier versions wrote, and
/// writes them back packed. An earlier version does not read packed
/// values: on the server's clock it fails (a Lua error, [`Error::Store`])
/// on any scope hash this version wrote, since its expiry field `x` is no
/// longer a number; on the batch's clock it would read packed counters as
/// empty. Stop every replica of an earlier version before starting this
/// one on the same prefix (or give this one a new prefix).
///
/// Values hold amounts, times, lease ids, digests and meter names. What
/// `overdue` and a settlement must report about a scope is its digest:
/// [`AsyncAllowanceStore::overdue`](crate::store::AsyncAllowanceStore::overdue)
/// reports each overdue lease by its [`LeaseId`](crate::store::LeaseId)
/// (the id of the host's `Reservation`) with the owner
/// `ScopeKey::subject("hmac:<hex>")`, which [`RedisStore::digest_of`]
/// computes for an id the host knows; a settlement reports a held pool its
/// batch did not name as `ScopeKey::pool("hmac:<hex>")` (the engine names
/// every pool it settles, so it never sees one).
///
/// # Prepaid balances
/// A balance (contract rule 10) is one hash per scope and money meter,
/// `{p}:b:<scope digest>:<len>:<meter>`, in its scope's slot (on a cluster
/// a subject's balance shares the slot of its counters and leases, so a
/// decision on a subject's own limits and balance is one script call). It
/// is read whole (`HGETALL`) and written in the same script as the rest of
/// the batch, so a debit and the counters it rides with are one atomic
/// step. Its fields:
///
/// | field | value |
/// | --- | --- |
/// | `d` | the debt |
/// | `t` | the latest `now` of a batch that applied to it (grants are read at the later of this and `now`, so a clock stepping back never revives an expired grant) |
/// | `g<id digest>` | a grant: `amount spent effective expiry priority granted rank sealed-id` |
/// | `h<lease id>` | a lease's hold: `amount expiry` |
///
/// A grant is indexed (and a redelivered one recognised) by its payment
/// id's keyed digest (HMAC-SHA-256 under the store's secret, domain `g:`),
/// never by the id. Since an answer must report each grant's id
/// ([`GrantState::id`](crate::store::GrantState::id)), the id is also kept
/// *sealed*: AES-256-GCM-SIV (RustCrypto's `aes-gcm-siv`) under a key
/// derived from the same secret (HMAC-SHA-256 of a fixed label), the nonce
/// the id's keyed digest (deterministic, which GCM-SIV is built for, and
/// which reveals only the equality the index digest already shows). Whoever
/// reads Redis without the secret learns neither the id nor a way to test
/// guesses; a store with another secret names the balance by another
/// digest, and cannot open the id either (a sealed id it cannot open is
/// answered [`Error::Store`]). `rank` orders grants whose priority, expiry and start
/// tie, by their ids' bytes: the script cannot read ids, so a new grant
/// that ties with others is answered `TIE` with their sealed ids, and the
/// client makes the call again with the order it computed (the script
/// checks that order names exactly the tied grants; nothing is written
/// before). Amounts are decimal strings with the script's exact u64
/// arithmetic, as counters. A hold counts while `now < expiry` and is
/// deleted by the next batch that applies to the balance; a lease record
/// names the balance it holds on (`bk`), so a renewal or settlement that
/// names no balance still moves or settles its hold. Grants are records:
/// spent and expired ones stay, so a balance's hash grows with its grants
/// and every decision on it reads them all. The hash lives
/// [`RedisConfig::lifetime_ttl`] (plus the margin) past its last write, or
/// past its last hold's expiry if later; its TTL is only ever raised.
///
/// # Expiry
/// Every key gets a TTL when it is written. A scope's hash lives as long as
/// its longest-lived counter needs: a calendar counter until its period
/// ends, a rolling counter until its newest bucket leaves, a lifetime
/// counter [`RedisConfig::lifetime_ttl`] past its last write (on the
/// server's clock, up to a day more: see [Cost](#cost)), each hold
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
/// A plain admit on the counters of one scope (server clock) makes three
/// `redis.call`s within one period and bucket — `TIME`, one `HMGET` and
/// one `HSET` — and answers an array whose numbers are integer replies;
/// with an event id, a `GET` and a `SET` more (the ledger's entry is the
/// answer packed with `cmsgpack`). A lifetime counter's hash, when its
/// expiry must move, is given a day more (or a sixteenth of
/// [`RedisConfig::lifetime_ttl`], if less) so the admits in between send
/// no `PEXPIRE`. `benches/redis.rs` prints the server's µs per `FCALL`
/// from `INFO commandstats` beside a trivial script's and a floor
/// script's (BENCHMARKS.md).
///
/// # Redis Cluster
/// On one node every key shares the hash tag `{prefix}`. On a cluster
/// ([`RedisConfig::cluster`], feature `redis-cluster`; redis-rs's async
/// cluster client, with its own retries off so no call is resent; the
/// function library loaded on every primary) each
/// scope has its own tag, `{prefix:<scope digest>}`: a scope's counters,
/// holds and cooldown, the leases it owns with their deadline index, and
/// the events of the decisions it is home to (the lease owner's, else the
/// first op's) share one slot, and scopes spread over the primaries. A
/// decision whose keys share a slot (a subject's own limits) is one
/// script call, as on one node. One spanning slots (a subject and a
/// shared pool) is one call per slot, ordered so it never over-admits:
///
/// - an admit (`WithinLimits`) first opens a lease on each slot holding
///   that slot's deltas — a hold counts toward every maximum — then, if
///   every slot held, settles each keeping all of it as usage; if one
///   refused, the others are released. A failure midway leaves only holds,
///   which expire 60 s past the batch's time (so engine clocks must be
///   within that of Redis's on [`TimeSource::Server`]);
/// - a record (`Force`) applies each slot's part, keeping the event in
///   each, so a retry after a failure midway applies only what had not
///   applied (the failure is [`Error::StoreOutcomeUnknown`]);
/// - a check reads each slot;
/// - a reservation opens its lease on each slot (its deadline on the
///   owner's, whose record lists the other slots), and renew and settle
///   visit every slot; a grow whose ops span slots is refused with
///   [`Error::CrossSlot`], since a grow cannot be taken back;
/// - a prepaid balance is kept in its scope's slot (a subject's balance in
///   the subject's: a decision on a subject's own limits and balance is
///   one call). A batch whose balance is in another slot than some of its
///   ops (a pool's limit, or a pool's balance) takes the steps above with
///   the balance in its slot's part: an admit holds the debit with the
///   deltas, then settles it (consumed); a reservation holds it on the
///   balance's slot, where renew and settle move and consume it; a record
///   or a check applies or reads it there. Between two steps another
///   decision may consume what a phase-1 hold did not cover (a forced
///   record ignores holds), so an admit's debit may then end partly in
///   debt or uncovered, as a record's does. A grant whose cooldowns are in
///   another slot than its balance is refused with [`Error::CrossSlot`].
///
/// Atomicity across slots is that of these steps, not of one script: a
/// reader between two steps may see one slot applied and not the other,
/// and an admit refused by a slot still held the others for a moment.
/// An event id is remembered in its decision's home slot; a settlement
/// with one also leaves a marker in the event's own slot, so another
/// owner's settlement under the same id is [`Error::EventConflict`].
/// `overdue` scans every primary for deadline indexes (`SCAN`): a pass
/// over the keys, for a maintenance call. A cluster node given to
/// [`RedisConfig::new`] is refused at connect (every call would answer
/// `MOVED`); a prefix with braces is refused in both modes.
///
/// # Outages
/// Every call is bounded by [`RedisConfig::timeout`]. A call Redis never
/// got — the connection refused — or refused whole (a server error) is
/// [`Error::Store`]: nothing changed. A call that timed out or lost its
/// connection after it was written may have run: it is
/// [`Error::StoreOutcomeUnknown`], naming the batch's event id, and the
/// engine gives every mutating call one (see the
/// [store contract](crate::store#ambiguous-outcomes)); a check-mode batch
/// changes nothing either way and fails as [`Error::Store`]. The engine's
/// async calls then follow the [`FailurePolicy`]. The connection is a
/// redis-rs `ConnectionManager`: after an outage it reconnects by itself,
/// once per failed call, and a call refused by a stale connection is
/// retried once on the new one.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    layout: Layout,
    keyed: Keyed,
    overdue: Script,
    tag: String,
    timeout: Duration,
    policy: FailurePolicy,
    time: TimeSource,
    horizon_ms: i64,
    retry_horizon_ms: i64,
    made_ids: bool,
    margin_ms: i64,
    lifetime_ms: i64,
    history: u32,
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
    ///
    /// On a cluster each scope's keys start with `{prefix:<digest>}`
    /// instead, and every other key (the generated secret) with this.
    pub fn key_tag(&self) -> &str {
        &self.tag
    }

    /// How this store names `scope` wherever it reports a scope it does
    /// not store: `hmac:` and the scope's keyed digest (hex). `overdue`
    /// reports a lease's owner as `ScopeKey::subject(digest_of(owner))`,
    /// and a settlement a held pool the batch did not name as
    /// `ScopeKey::pool(digest_of(pool))`: compute this for the ids you know
    /// to map them back (or keep your reservations by lease id).
    pub fn digest_of(&self, scope: &ScopeKey) -> String {
        format!("hmac:{}", self.keyed.scope(scope))
    }

    fn scope_hash(&self, scope: &ScopeKey) -> String {
        self.keyed.scope(scope)
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
        let call = async {
            match self.conn.invoke(invocation).await {
                // Refused: nothing left, and the connection manager has
                // started a new connection; one more try uses it (a store
                // recovers on the first call after an outage).
                Err(e) if e.is_connection_refusal() => self.conn.invoke(invocation).await,
                r => r,
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| unanswered(self.timeout))?
            .map_err(call_error)
    }

    /// `FUNCTION LOAD REPLACE` of the apply library (redis-rs sends it to
    /// every primary of a cluster). The same version is the same code, so
    /// replacing it is harmless.
    async fn load_library(&self) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD")
            .arg("REPLACE")
            .arg(apply_library().0.as_str());
        self.conn.query::<redis::Value>(&cmd).await.map(|_| ())
    }

    /// A new `FCALL` of the apply library's function with `key` (the
    /// routing key); arguments follow.
    fn fcall(key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(apply_library().1.as_str()).arg(1).arg(key);
        cmd
    }

    /// Run an `FCALL` within the timeout: as [`RedisStore::run`], and a
    /// server without the library (the call refused whole) gets it and
    /// the call once more.
    async fn call_apply<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        let call = async {
            let r = match self.conn.query(cmd).await {
                Err(e) if e.is_connection_refusal() => self.conn.query(cmd).await,
                r => r,
            };
            match r {
                Err(e) if library_missing(&e) => {
                    self.load_library().await?;
                    self.conn.query(cmd).await
                }
                r => r,
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| unanswered(self.timeout))?
            .map_err(call_error)
    }

    fn now_arg(&self, now_ms: i64) -> (String, &'static str) {
        (
            now_ms.to_string(),
            if self.time == TimeSource::Server {
                "1"
            } else {
                "0"
            },
        )
    }
}

/// The secret stored under `key`, made there first if none is.
async fn stored_secret(conn: &Conn, key: &str) -> Result<String, Error> {
    let _: Option<String> = conn
        .query(
            redis::cmd("SET")
                .arg(key)
                .arg(keyed::fresh_secret())
                .arg("NX"),
        )
        .await
        .map_err(store_error)?;
    let secret: Option<String> = conn
        .query(redis::cmd("GET").arg(key))
        .await
        .map_err(store_error)?;
    secret
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .ok_or_else(|| Error::config("redis.secret", format!("`{key}` holds no usable secret")))
}
