//! [`RedisConfig`]: how a [`RedisStore`] connects and behaves, and
//! `connect`, which checks it and loads the function library.

use super::*;

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
    nodes: Vec<String>,
    prefix: String,
    timeout: Duration,
    policy: FailurePolicy,
    time: TimeSource,
    horizon: Duration,
    retry_horizon: Duration,
    made_ids: bool,
    margin: Duration,
    lifetime_ttl: Duration,
    secret: Option<Secret>,
    history: u32,
}

impl RedisConfig {
    /// The shortest secret [`RedisConfig::secret`] takes, in bytes.
    pub const MIN_SECRET_LEN: usize = MIN_SECRET_LEN;

    /// Defaults: prefix `tollgate`, timeout 250 ms, fail closed, the
    /// server's clock, event horizon 24 h, expiry margin 1 h, lifetime
    /// counters kept 10 years after their last write.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            nodes: Vec::new(),
            prefix: "tollgate".into(),
            timeout: Duration::from_millis(250),
            policy: FailurePolicy::FailClosed,
            time: TimeSource::Server,
            horizon: Duration::from_secs(86_400),
            retry_horizon: Duration::from_secs(900),
            made_ids: true,
            margin: Duration::from_secs(3_600),
            lifetime_ttl: Duration::from_secs(10 * 366 * 86_400),
            secret: None,
            history: crate::store::DEFAULT_HISTORY_PERIODS,
        }
    }

    /// How many closed periods of each calendar counter the store keeps
    /// for reports of past periods (contract rule 11; default
    /// [`DEFAULT_HISTORY_PERIODS`](crate::store::DEFAULT_HISTORY_PERIODS),
    /// at most [`MAX_HISTORY_PERIODS`](crate::store::MAX_HISTORY_PERIODS)).
    /// A batch that rolls a calendar counter past a period with usage keeps
    /// its total in the scope's hash (field `<counter>|p`), at most this
    /// many per counter; a calendar counter's hash lives this many of its
    /// window's longest periods past the period's end (plus the margin), so
    /// an ended period not yet rolled stays readable too. Replicas sharing
    /// a prefix should use the same depth; if they differ, a counter's
    /// field keeps the deepest depth any of them wrote it with (a
    /// shallower replica never trims what a deeper one keeps), and a
    /// hash's lifetime follows the depth of the replica that wrote it. A
    /// history entry that is not a time and a `u64` (a field written by
    /// something else) is skipped, never an error.
    #[must_use]
    pub fn history_periods(mut self, periods: u32) -> Self {
        self.history = periods;
        self
    }

    /// The secret the store's keyed digests use (HMAC-SHA-256): every
    /// subject, pool, lease owner and event id is kept in Redis only as its
    /// digest under this secret, never as text, and a prepaid balance's
    /// grant ids (payment ids) are sealed under a key derived from it.
    /// Every replica sharing a prefix must use the same secret, and
    /// changing it orphans every counter and balance written before. At least [`Self::MIN_SECRET_LEN`] bytes.
    ///
    /// Without one, [`connect`](Self::connect) uses the secret stored under
    /// `{prefix}:secret`, generating a random one there if none is (so
    /// every replica agrees without configuration). That key is then the
    /// one key without a TTL, and whoever can read the Redis can read it
    /// and test guessed ids against the digests: give a secret here to keep
    /// it out of Redis.
    #[must_use]
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(Secret(secret.as_ref().to_vec()));
        self
    }

    /// A store on a Redis Cluster (feature `redis-cluster`), reached
    /// through any of `nodes` (`redis://host:port` URLs), with the
    /// defaults of [`RedisConfig::new`]. See [`RedisStore`]'s section on
    /// Redis Cluster.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster<I, S>(nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        Self {
            url: String::new(),
            nodes,
            ..Self::new("")
        }
    }

    /// The prefix of every key (default `tollgate`). It becomes the keys'
    /// hash tag, `{prefix}` (on a cluster `{prefix:<scope digest>}`), so
    /// it may not contain `{` or `}`.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a store call may take, connecting included; past it the
    /// call fails with [`Error::StoreOutcomeUnknown`] (or [`Error::Store`]
    /// for a read) (default 250 ms).
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

    /// How long an event id the engine made is remembered (default 15
    /// minutes): the async engine gives every mutating call without an
    /// event id one of its own (`tollgate:` and 32 hex digits) so that a
    /// retry of an ambiguous call counts once (see the
    /// [store contract](crate::store#ambiguous-outcomes)). A host retries
    /// such a call soon or never, so these ids, one per decision, are kept
    /// for this instead of the event horizon. Only a batch whose key says
    /// the engine made its id for that call
    /// ([`EventKey::engine_made`](crate::store::EventKey::engine_made)) is
    /// kept this long: a host's id, whatever its shape, and the host's
    /// retry with an id the engine made, are kept for the event horizon
    /// (the retry replays the first try's entry while that lasts).
    #[must_use]
    pub fn retry_horizon(mut self, horizon: Duration) -> Self {
        self.retry_horizon = horizon;
        self
    }

    /// Whether the async engine gives a mutating call without an event id
    /// one of its own (default `true`; see
    /// [`retry_horizon`](Self::retry_horizon)). Off, such a call whose
    /// outcome is unknown ([`Error::StoreOutcomeUnknown`] with no event)
    /// cannot be retried without risking a double count, and each
    /// decision saves the ledger's three `redis.call`s.
    #[must_use]
    pub fn engine_event_ids(mut self, on: bool) -> Self {
        self.made_ids = on;
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
    /// ends. A scope's counters on the server's clock may be kept up to a
    /// day (or a sixteenth of this, if less) longer, so that admits need
    /// not move the key's expiry every time.
    #[must_use]
    pub fn lifetime_ttl(mut self, ttl: Duration) -> Self {
        self.lifetime_ttl = ttl;
        self
    }

    /// Connect, within the timeout, and load the function library (see
    /// [`RedisStore`]: Redis 7.0 or later).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a prefix with braces, a zero timeout or
    /// horizon, a secret shorter than [`Self::MIN_SECRET_LEN`], or a URL
    /// redis-rs refuses; [`Error::Store`] if Redis cannot be reached within
    /// the timeout or refuses the library (a Redis before 7.0, a user the
    /// ACL denies `FUNCTION LOAD`).
    pub async fn connect(self) -> Result<RedisStore, Error> {
        if self.prefix.contains(['{', '}']) {
            return Err(Error::config("redis.prefix", "may not contain `{` or `}`"));
        }
        if self
            .secret
            .as_ref()
            .is_some_and(|s| s.0.len() < MIN_SECRET_LEN)
        {
            return Err(Error::config(
                "redis.secret",
                format!("must be at least {MIN_SECRET_LEN} bytes"),
            ));
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
        let retry_horizon_ms = ms(self.retry_horizon, "redis.retry_horizon")?;
        let margin_ms = ms(self.margin, "redis.expiry_margin")?;
        let lifetime_ms = ms(self.lifetime_ttl, "redis.lifetime_ttl")?;
        let history = crate::store::checked_depth("redis.history_periods", self.history)?;
        let conn = self.open().await?;
        let tag = format!("{{{}}}", self.prefix);
        let keyed = match &self.secret {
            Some(s) => Keyed::new(&s.0),
            None => {
                let secret = tokio::time::timeout(
                    self.timeout,
                    stored_secret(&conn, &format!("{tag}:secret")),
                )
                .await
                .map_err(|_| timed_out(self.timeout))??;
                Keyed::new(secret.as_bytes())
            }
        };
        let layout = Layout {
            prefix: self.prefix.clone(),
            cluster: conn.single().is_none(),
        };
        let store = RedisStore {
            conn,
            layout,
            keyed,
            overdue: Script::new(OVERDUE_LUA),
            tag,
            timeout: self.timeout,
            policy: self.policy,
            time: self.time,
            horizon_ms,
            retry_horizon_ms,
            made_ids: self.made_ids,
            margin_ms,
            lifetime_ms,
            history,
        };
        // Load the library now (on a cluster, on every primary); a node
        // that loses it later gets it again on the call that finds it
        // missing.
        tokio::time::timeout(store.timeout, store.load_library())
            .await
            .map_err(|_| timed_out(store.timeout))?
            .map_err(store_error)?;
        Ok(store)
    }

    /// The connection: one node (refused if it is a cluster node), or a
    /// cluster.
    async fn open(&self) -> Result<Conn, Error> {
        #[cfg(feature = "redis-cluster")]
        if !self.nodes.is_empty() {
            let client = redis::cluster::ClusterClient::builder(self.nodes.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                // No hidden retries: a call resent after its connection
                // failed could apply twice (see the store contract).
                .retries(0)
                .build()
                .map_err(|e| Error::config("redis.cluster", e.to_string()))?;
            let conn = tokio::time::timeout(self.timeout, client.get_async_connection())
                .await
                .map_err(|_| timed_out(self.timeout))?
                .map_err(store_error)?;
            return Ok(Conn::Cluster(conn));
        }
        if self.url.is_empty() && !self.nodes.is_empty() {
            return Err(Error::config(
                "redis.cluster",
                "needs feature `redis-cluster`",
            ));
        }
        let client = Client::open(self.url.as_str())
            .map_err(|e| Error::config("redis.url", e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // A reconnect is tried once per failed call: refused at once
            // when Redis is down, so a call that sent nothing says so
            // (`Error::Store`) instead of waiting out its timeout.
            .set_number_of_retries(0);
        let manager = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| timed_out(self.timeout))?
        .map_err(store_error)?;
        let conn = Conn::Single(manager);
        // A cluster node answers only for its own slots: every call would
        // fail with `MOVED`. Refused here, with what to do instead.
        let info: String =
            tokio::time::timeout(self.timeout, conn.query(redis::cmd("INFO").arg("cluster")))
                .await
                .map_err(|_| timed_out(self.timeout))?
                .map_err(store_error)?;
        if info.contains("cluster_enabled:1") {
            return Err(Error::config(
                "redis.url",
                "is a Redis Cluster node: connect with RedisConfig::cluster (feature `redis-cluster`)",
            ));
        }
        Ok(conn)
    }
}
