//! [`PostgresStore`]: durable counters and prepaid balances in the host's
//! own PostgreSQL (feature `postgres`).
//!
//! See [`PostgresStore`] for the design, the clock and what an error says.

mod encode;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::store::validate::validate;
use crate::store::{
    ms_to_time, Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseInfo, PeriodOp,
};
use crate::Error;

/// The migrations, in order: `(version, SQL)`. `__SCHEMA__` in the SQL is
/// the store's schema.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/001_schema.sql")),
    (2, include_str!("migrations/002_balances.sql")),
    (3, include_str!("migrations/003_history.sql")),
];

/// How a [`PostgresStore`] connects and behaves. Build one with
/// [`PostgresConfig::new`], change what you need, then
/// [`PostgresConfig::connect`].
///
/// ```no_run
/// # async fn run() -> Result<(), tollgate::Error> {
/// use std::time::Duration;
/// use tollgate::store::{FailurePolicy, PostgresConfig};
///
/// let store = PostgresConfig::new("postgres://app@127.0.0.1:5432/billing")
///     .schema("quota")
///     .pool_size(16)
///     .timeout(Duration::from_millis(500))
///     .failure_policy(FailurePolicy::FailClosed)
///     .connect()
///     .await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    url: String,
    schema: String,
    pool_size: usize,
    timeout: Duration,
    policy: FailurePolicy,
    horizon: Duration,
    made_ids: bool,
    history: u32,
}

impl PostgresConfig {
    /// Defaults: schema `tollgate`, a pool of 16 connections, timeout 1 s,
    /// fail closed, event horizon 24 h. `url` is a libpq-style connection
    /// string or URL (`postgres://user@host:port/db`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "tollgate".into(),
            pool_size: 16,
            timeout: Duration::from_secs(1),
            policy: FailurePolicy::FailClosed,
            horizon: Duration::from_secs(86_400),
            made_ids: true,
            history: crate::store::DEFAULT_HISTORY_PERIODS,
        }
    }

    /// How many closed periods of each calendar counter reports may read
    /// back (contract rule 11; default
    /// [`DEFAULT_HISTORY_PERIODS`](crate::store::DEFAULT_HISTORY_PERIODS)).
    /// Every closed period with usage is a row of `counter_history`, made
    /// by the batch that rolls its counter; [`PostgresStore::reclaim`]
    /// deletes those more than `periods` (+ 1) periods old, so the table is
    /// flat in traffic as long as `reclaim` runs. 0 keeps the rows (the
    /// trigger is the schema's) but reports read none back.
    #[must_use]
    pub fn history_periods(mut self, periods: u32) -> Self {
        self.history = periods;
        self
    }

    /// The schema holding the store's tables and functions (default
    /// `tollgate`): lowercase ASCII letters, digits and `_`, starting with a
    /// letter or `_`, at most 63 bytes.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the pool opens (default 16).
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// The longest a store call may take, waiting for a pooled connection
    /// included; past it the call fails with [`Error::Store`] (default 1 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What the engine's async calls do when PostgreSQL fails (default
    /// [`FailurePolicy::FailClosed`]).
    #[must_use]
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How long event ids are replayed (default 24 h).
    #[must_use]
    pub fn event_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// Whether the async engine gives a mutating call without an event id
    /// one of its own (default `true`), so that a call whose outcome is
    /// unknown ([`Error::StoreOutcomeUnknown`]) can be retried with it and
    /// count once (see the [store contract](crate::store#ambiguous-outcomes)).
    /// Each such id is a row of the `events` table until
    /// [`PostgresStore::reclaim`] removes it past the event horizon. Off,
    /// a decision writes no event row unless the host gave an id, and a
    /// call with an unknown outcome cannot be retried without risking a
    /// double count.
    #[must_use]
    pub fn engine_event_ids(mut self, on: bool) -> Self {
        self.made_ids = on;
        self
    }

    /// Check the settings and build the pool. Connections open lazily: a
    /// server that is down is found by the first call (or
    /// [`PostgresStore::migrate`]), not here.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad URL, schema name, pool size,
    /// timeout or horizon.
    pub async fn connect(self) -> Result<PostgresStore, Error> {
        let schema_ok = !self.schema.is_empty()
            && self.schema.len() <= 63
            && !self.schema.starts_with(|c: char| c.is_ascii_digit())
            && self
                .schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !schema_ok {
            return Err(Error::config(
                "postgres.schema",
                "must be lowercase ASCII letters, digits and `_`, not starting with a digit, \
                 at most 63 bytes",
            ));
        }
        if self.pool_size == 0 {
            return Err(Error::config("postgres.pool_size", "must be above zero"));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("postgres.timeout", "must be above zero"));
        }
        let horizon_ms = i64::try_from(self.horizon.as_millis())
            .ok()
            .filter(|&m| (1..=1_i64 << 50).contains(&m))
            .ok_or_else(|| {
                Error::config("postgres.event_horizon", "must be between 1 ms and 2^50 ms")
            })?;
        let history = crate::store::checked_depth("postgres.history_periods", self.history)?;
        let mut pg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| Error::config("postgres.url", e.to_string()))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.timeout);
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(self.timeout))
            .wait_timeout(Some(self.timeout))
            .build()
            .map_err(|e| Error::config("postgres.pool", e.to_string()))?;
        Ok(PostgresStore {
            apply_sql: format!("SELECT \"{}\".apply($1::text::jsonb)::text", self.schema),
            pool,
            schema: self.schema,
            timeout: self.timeout,
            policy: self.policy,
            horizon_ms,
            made_ids: self.made_ids,
            history,
        })
    }
}

/// An [`AsyncAllowanceStore`] on PostgreSQL: every replica of a service
/// shares its counters through the host's database, and an acknowledged
/// decision is as durable as the server's commit.
///
/// # Design
///
/// - **Client.** `tokio-postgres` (the asynchronous half of the `postgres`
///   crates, pure Rust, no libpq) pooled by `deadpool-postgres`: both well
///   kept, small, and already what most tokio hosts use; statements are
///   prepared once per pooled connection.
/// - **Schema.** Plain tables a host can read and join with its own billing:
///   `counters` (one row per scope, meter and window, with the window's
///   period or buckets), `leases`, `holds`, `events` (the idempotency
///   ledger), `cooldowns`, and the prepaid balances' `balances`, `grants`
///   and `balance_holds` (below), in a schema of the host's choosing
///   (default `tollgate`). [`PostgresStore::migrate`] creates or updates
///   them from the SQL files in `src/store/postgres/migrations/` (version 1
///   the counters, leases, ledger and cooldowns; version 2 the balances),
///   the missing ones in order, in one transaction, and records the version
///   in `schema_version`; a store at version 1 upgrades in place, and
///   running it again changes nothing.
/// - **Prepaid balances** (contract rule 10). `balances` has one row per
///   scope and money meter (`scope_kind`, `scope_id`, `meter`): its `debt`
///   and `seen_ms`, the latest `now` of a batch that applied to it (grants
///   are read at the later of `now` and it, so a clock stepping back never
///   brings an expired grant back). `grants` has one row per grant, keyed
///   by the balance and the payment `id`: `amount`, `spent`, `effective_ms`,
///   `expires_ms`, `priority`, `granted_ms`; a grant is consumed in the
///   order priority, expiry (none last), start, id bytes (`COLLATE "C"`,
///   whatever the database's locale), and its row is the record a
///   redelivered payment id is checked against. `balance_holds` has one row
///   per lease that holds on a balance (at most one each): the amount,
///   counted while the lease is live and moving with its expiry. Balances
///   and grants (spent and expired ones too) are records: kept as long as
///   the schema, never removed by [`PostgresStore::reclaim`]; a hold goes
///   when its lease settles, is zeroed by a batch that applies to the
///   balance at or after the lease's expiry, and goes with the lease row
///   when `reclaim` removes it. A balance's rows are read and written in the
///   same call as the rest of the batch, under its scope's lock (below).
///   Text holds no NUL byte: a batch naming a scope, meter, event or grant
///   id with one is [`Error::InvalidBatch`].
/// - **One round trip.** A batch is one call of the server-side function
///   `<schema>.apply(jsonb)` (PL/pgSQL, a port of the memory store's steps)
///   in its own implicit transaction: it checks everything, then writes
///   everything, or raises and rolls back. Amounts are `numeric(20,0)`, so
///   every sum is exact over the whole `u64` range.
/// - **Isolation and locks.** READ COMMITTED (the server's default) with
///   transaction-scoped advisory locks taken before anything is read, in one
///   fixed order: the event id, then the lease id, then every scope the
///   batch names (its ops, its cooldowns, its balance, its lease's holds and
///   the balance its lease holds on) in ascending (bytewise) order of
///   `kind:id`, each lock a 64-bit hash of it. Every batch that reads or
///   writes a scope's counters, holds, cooldown or balances holds that
///   scope's lock until it commits,
///   and under READ COMMITTED each statement after the lock is granted reads
///   a snapshot taken after it, so it sees every write of the batch that
///   held the lock before. Batches that share a scope therefore run one
///   after the other, exactly as under the memory store's shard mutex: no
///   interleaving can let two batches each see room for the same last unit.
///   The fixed order means no two batches wait on each other (no deadlock);
///   two scopes whose hashes collide only share a lock.
///
/// # Whose clock
///
/// The engine's: windows roll and leases end at `Batch::now_ms`. Replicas
/// whose clocks disagree follow contract rule 2 (a counter's time never goes
/// back), so a replica behind never frees usage one ahead counted.
///
/// # Errors and what is known
///
/// Every failure of the client is mapped by one function (`store_error`),
/// which says whether the statement had been sent. Before it is sent
/// (taking a pooled connection, preparing the statement) nothing changed.
/// After it is sent, a refusal the server answers (bad input, a lease or
/// event error, a serialization or deadlock error) rolled the whole call
/// back: nothing changed. A connection lost, or the call timing out, after
/// the statement was sent leaves its outcome unknown: the server may have
/// committed it.
///
/// Run [`PostgresStore::migrate`] once (at deploy or at start-up) before
/// the first call.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    schema: String,
    apply_sql: String,
    timeout: Duration,
    policy: FailurePolicy,
    horizon_ms: i64,
    made_ids: bool,
    history: u32,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Map a client error to the crate's error. `sent`: whether the statement
/// had been sent to the server when it failed.
///
/// A refusal the server answered (SQLSTATE `TGxxx`: the function's own
/// typed errors, `TGGRT` a grant conflict) is the error it names, with nothing changed. Any other
/// answered error rolled the call back, so nothing changed either. Without
/// an answer, after the statement was sent (`sent` and no SQLSTATE: a lost
/// connection), the outcome is unknown; the message says so.
fn store_error(e: &tokio_postgres::Error, sent: bool) -> Error {
    if let Some(db) = e.as_db_error() {
        let text = db.message().to_owned();
        let typed = match db.code().code() {
            "TGINV" => Some(Error::InvalidBatch { reason: text }),
            "TGUNK" => Some(Error::UnknownReservation { id: text }),
            "TGSET" => Some(Error::ReservationSettled { id: text }),
            "TGEXP" => Some(Error::ReservationExpired { id: text }),
            "TGCON" => Some(Error::EventConflict { event: text }),
            "TGOVF" => Some(Error::Overflow { meter: text }),
            "TGGRT" => Some(Error::GrantConflict { payment: text }),
            _ => None,
        };
        if let Some(err) = typed {
            return err;
        }
        return Error::Store {
            message: format!(
                "postgres: {} {} (rolled back: nothing changed)",
                db.code().code(),
                db.message()
            ),
        };
    }
    if sent {
        return Error::StoreOutcomeUnknown {
            message: format!("postgres: {e} (after the statement was sent: outcome unknown)"),
            event: None,
        };
    }
    Error::Store {
        message: format!("postgres: {e}"),
    }
}

/// A call that took longer than the store's timeout. `sent`: whether the
/// statement had been sent (its outcome is then unknown).
fn timed_out(timeout: Duration, sent: bool) -> Error {
    let message = format!("postgres: no answer within {timeout:?}");
    if sent {
        return Error::StoreOutcomeUnknown {
            message: format!("{message} (after the statement was sent: outcome unknown)"),
            event: None,
        };
    }
    Error::Store { message }
}

impl PostgresStore {
    /// A store on `url` with the default [`PostgresConfig`].
    ///
    /// # Errors
    /// As [`PostgresConfig::connect`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        PostgresConfig::new(url).connect().await
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => store_error(&e, false),
            deadpool_postgres::PoolError::Timeout(_) => timed_out(self.timeout, false),
            e => Error::Store {
                message: format!("postgres: {e}"),
            },
        })
    }

    /// Create the schema, its tables and functions, or bring them up to
    /// this version of the crate: in one transaction, under a lock, so
    /// replicas starting together migrate once; running it again changes
    /// nothing. Returns the schema version now in place.
    ///
    /// # Errors
    /// [`Error::Store`] if the server cannot be reached or refuses (the
    /// transaction rolls back: nothing changed).
    pub async fn migrate(&self) -> Result<i32, Error> {
        let fut = async {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| store_error(&e, false))?;
            let s = &self.schema;
            let setup = format!(
                "SELECT pg_advisory_xact_lock(hashtextextended('tollgate-migrate|{s}', 0));
                 CREATE SCHEMA IF NOT EXISTS \"{s}\";
                 CREATE TABLE IF NOT EXISTS \"{s}\".schema_version (
                     version int PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now());"
            );
            tx.batch_execute(&setup)
                .await
                .map_err(|e| store_error(&e, true))?;
            let row = tx
                .query_one(
                    &format!("SELECT coalesce(max(version), 0) FROM \"{s}\".schema_version"),
                    &[],
                )
                .await
                .map_err(|e| store_error(&e, true))?;
            let mut version: i32 = row.get(0);
            for &(v, sql) in MIGRATIONS {
                if v <= version {
                    continue;
                }
                let sql = sql.replace("__SCHEMA__", &format!("\"{s}\""));
                tx.batch_execute(&sql)
                    .await
                    .map_err(|e| store_error(&e, true))?;
                tx.execute(
                    &format!("INSERT INTO \"{s}\".schema_version (version) VALUES ($1)"),
                    &[&v],
                )
                .await
                .map_err(|e| store_error(&e, true))?;
                version = v;
            }
            tx.commit().await.map_err(|e| store_error(&e, true))?;
            Ok(version)
        };
        // Migrations may wait on another replica's: a longer bound.
        tokio::time::timeout(self.timeout.max(Duration::from_secs(30)), fut)
            .await
            .map_err(|_| timed_out(self.timeout, true))?
    }

    /// Drop the store's schema and everything in it (tests, teardown).
    ///
    /// # Errors
    /// [`Error::Store`] if the server cannot be reached or refuses.
    pub async fn drop_schema(&self) -> Result<(), Error> {
        let client = self.client().await?;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await
            .map_err(|e| store_error(&e, true))
    }

    /// Forget what no batch can read any more as of `now`: ended cooldowns,
    /// event ids older than the horizon, leases that settled or expired
    /// more than a horizon ago (with their holds, on counters and on
    /// balances), and `counter_history` rows more than
    /// [`history_periods`](PostgresConfig::history_periods) + 1 periods
    /// before `now` (a period ending more than that many of its window's
    /// longest periods ago). Returns how many rows went. Counters stay (a
    /// host may keep them as history), and so do balances and their grants
    /// (records a redelivered payment id is checked against).
    ///
    /// # Errors
    /// [`Error::Store`] if the server cannot be reached or refuses.
    pub async fn reclaim(&self, now: DateTime<Utc>) -> Result<u64, Error> {
        let (now_ms, h, s) = (now.timestamp_millis(), self.horizon_ms, &self.schema);
        let fut = async {
            let client = self.client().await?;
            let mut n = 0;
            for sql in [
                format!("DELETE FROM \"{s}\".cooldowns WHERE until_ms <= $1"),
                format!("DELETE FROM \"{s}\".events WHERE $1 - at_ms >= $2"),
                format!(
                    "DELETE FROM \"{s}\".leases WHERE (settled OR expires_ms <= $1) \
                     AND $1 - expires_ms >= $2"
                ),
                // Closed periods more than `history_periods` + 1 periods
                // old: a period ending more than (depth + 1) of its
                // window's longest periods before now is past the depth.
                format!(
                    "DELETE FROM \"{s}\".counter_history WHERE $1 - period_end_ms > \
                     ({depth} + 1) * CASE split_part(\"window\", '@', 1) \
                     WHEN 'day' THEN 86400000 WHEN 'week' THEN 604800000 \
                     ELSE 2678400000 END",
                    depth = i64::from(self.history)
                ),
            ] {
                let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = if sql.contains("$2") {
                    &[&now_ms, &h]
                } else {
                    &[&now_ms]
                };
                n += client
                    .execute(&sql, params)
                    .await
                    .map_err(|e| store_error(&e, true))?;
            }
            Ok(n)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| timed_out(self.timeout, true))?
    }

    /// One call of the server-side function.
    async fn call(&self, arg: String) -> Result<Applied, Error> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&self.apply_sql)
            .await
            .map_err(|e| store_error(&e, false))?;
        let row = client
            .query_one(&stmt, &[&arg])
            .await
            .map_err(|e| store_error(&e, true))?;
        let text: String = row.try_get(0).map_err(|e| store_error(&e, true))?;
        encode::decode(&text)
    }
}

#[async_trait]
impl AsyncAllowanceStore for PostgresStore {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        validate(batch)?;
        encode::refuse_nul(batch)?;
        let arg = encode::encode(batch, &self.schema, self.horizon_ms);
        // Whether the statement went out is known only inside `call`; a
        // timeout here may have cut it after it was sent.
        let result = tokio::time::timeout(self.timeout, self.call(arg))
            .await
            .map_err(|_| timed_out(self.timeout, true))?;
        match result {
            // A check batch writes nothing: whatever became of it, nothing
            // changed.
            Err(Error::StoreOutcomeUnknown { message, .. })
                if batch.mode == crate::store::Mode::Check =>
            {
                Err(Error::Store { message })
            }
            other => other,
        }
    }

    fn needs_event_ids(&self) -> bool {
        self.made_ids
    }

    fn history_periods(&self) -> u32 {
        self.history
    }

    async fn period_usage(&self, ops: &[PeriodOp<'_>], _now_ms: i64) -> Result<Vec<u64>, Error> {
        crate::store::validate_period_ops(ops)?;
        if let Some(op) = ops
            .iter()
            .find(|o| o.scope.id().contains('\0') || o.meter.as_str().contains('\0'))
        {
            return Err(Error::InvalidBatch {
                reason: format!(
                    "PostgresStore keeps text without NUL bytes: {:?} has one",
                    op.scope.id()
                ),
            });
        }
        let kinds: Vec<&str> = ops.iter().map(|o| encode::kind_name(o.scope)).collect();
        let ids: Vec<&str> = ops.iter().map(|o| o.scope.id()).collect();
        let meters: Vec<&str> = ops.iter().map(|o| o.meter.as_str()).collect();
        let windows: Vec<String> = ops.iter().map(|o| encode::window_code(o.window)).collect();
        let starts: Vec<i64> = ops.iter().map(|o| o.start_ms).collect();
        // The counter's own usage if it still holds the period, plus what
        // rolls kept of it (rule 11), one row per op in order.
        let sql = format!(
            "SELECT (coalesce((SELECT c.used FROM \"{s}\".counters c \
               WHERE c.scope_kind = q.k AND c.scope_id = q.id AND c.meter = q.m \
               AND c.\"window\" = q.w AND c.period_start_ms = q.st), 0) \
             + coalesce((SELECT h.used FROM \"{s}\".counter_history h \
               WHERE h.scope_kind = q.k AND h.scope_id = q.id AND h.meter = q.m \
               AND h.\"window\" = q.w AND h.period_start_ms = q.st), 0))::text \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
               WITH ORDINALITY AS q(k, id, m, w, st, i) ORDER BY q.i",
            s = self.schema
        );
        let fut = async {
            let client = self.client().await?;
            let rows = client
                .query(&sql, &[&kinds, &ids, &meters, &windows, &starts])
                .await
                .map_err(|e| store_error(&e, true))?;
            rows.iter()
                .map(|row| {
                    let text: String = row.try_get(0).map_err(|e| store_error(&e, true))?;
                    // Two u64 totals of one period add up past u64 only
                    // from a corrupt table: read as the most a u64 holds.
                    let n: u128 = text.parse().map_err(|_| Error::Store {
                        message: format!("postgres: period total `{text}` is not a count"),
                    })?;
                    Ok(u64::try_from(n).unwrap_or(u64::MAX))
                })
                .collect::<Result<Vec<u64>, Error>>()
        };
        let used = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| timed_out(self.timeout, false))?;
        // A read changes nothing: whatever became of it, it is a plain
        // store error.
        match used {
            Err(Error::StoreOutcomeUnknown { message, .. }) => Err(Error::Store { message }),
            other => other,
        }
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        let now_ms = now.timestamp_millis();
        let sql = format!(
            "SELECT id, owner_kind, owner_id, opened_ms, expires_ms, deadline_ms \
             FROM \"{}\".leases WHERE NOT settled AND expires_ms > $1 \
             AND deadline_ms <= $1 ORDER BY deadline_ms, id COLLATE \"C\"",
            self.schema
        );
        let fut = async {
            let client = self.client().await?;
            let rows = client
                .query(&sql, &[&now_ms])
                .await
                .map_err(|e| store_error(&e, true))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let get = |e: tokio_postgres::Error| store_error(&e, true);
                let id: String = row.try_get(0).map_err(get)?;
                let kind: String = row.try_get(1).map_err(get)?;
                let owner: String = row.try_get(2).map_err(get)?;
                let opened: i64 = row.try_get(3).map_err(get)?;
                let expires: i64 = row.try_get(4).map_err(get)?;
                let deadline: Option<i64> = row.try_get(5).map_err(get)?;
                let bad = || Error::Store {
                    message: format!("postgres: lease row `{id}` is not tollgate's"),
                };
                let id = id.parse().map_err(|_| bad())?;
                let owner = match kind.as_str() {
                    "subject" => crate::store::ScopeKey::subject(owner),
                    "pool" => crate::store::ScopeKey::pool(owner),
                    _ => return Err(bad()),
                };
                out.push(LeaseInfo::new(
                    id,
                    owner,
                    ms_to_time(opened),
                    ms_to_time(expires),
                    deadline.map(ms_to_time),
                ));
            }
            Ok(out)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| timed_out(self.timeout, true))?
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }
}
