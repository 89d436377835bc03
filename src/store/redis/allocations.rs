//! [`RedisAllocations`]: the allocations every replica shares, in Redis.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Client;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::LimitConfig;
use crate::engine::AsyncAllocationSource;
use crate::{Allocation, Error};

/// An [`AsyncAllocationSource`] in Redis, for hosts without a system of
/// record of their own: pass it to
/// [`Engine::with_async_allocation_source`](crate::Engine::with_async_allocation_source)
/// on every replica.
///
/// One key per subject, `<prefix>:alloc:{<digest>}`, holding the
/// allocation as JSON **without** the subject's id: the digest is a
/// SHA-256 of the subject under a secret the host passes (the same on
/// every replica), so neither keys nor values give an API key or user id
/// back, and a caller cannot aim ids at one cluster slot. Saves and removes
/// are single commands (`SET … GET`, `GETDEL`: Redis 6.2 or later) that
/// answer the value they replaced, so the audit's old value is Redis's.
/// Unlike the counters' keys these have no TTL: they are the record, kept
/// until [`Engine::deallocate_async`](crate::Engine::deallocate_async).
/// It talks to one Redis node (not a Redis Cluster), with a secret of its
/// own (not the `RedisStore`'s).
///
/// ```no_run
/// # async fn run() -> Result<(), tollgate::Error> {
/// use std::time::Duration;
/// use tollgate::store::RedisAllocations;
///
/// let secret = std::env::var("TOLLGATE_ALLOCATION_SECRET").unwrap_or_default();
/// let source = RedisAllocations::connect("redis://127.0.0.1:6379", "quota", secret.as_bytes()).await?;
/// // engine.with_async_allocation_source(source, Duration::from_secs(5))
/// # let _ = (source, Duration::ZERO); Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisAllocations {
    conn: ConnectionManager,
    prefix: String,
    secret: Vec<u8>,
}

impl fmt::Debug for RedisAllocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAllocations")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The JSON kept per subject: an [`Allocation`] less its subject.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    plan: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    overrides: Vec<LimitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pools: Vec<String>,
}

impl RedisAllocations {
    /// Connect to `url` (within 5 s), keeping allocations under `prefix`,
    /// digesting subject ids under `secret`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an empty secret or a prefix with `{` or
    /// `}`; [`Error::Store`] if Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str, secret: &[u8]) -> Result<Self, Error> {
        if secret.is_empty() {
            return Err(Error::config(
                "secret",
                "an empty secret would make subject digests reversible by anyone who can guess ids",
            ));
        }
        if prefix.contains(['{', '}']) {
            return Err(Error::config("prefix", "may not contain `{` or `}`"));
        }
        let client = Client::open(url).map_err(|e| Error::config("url", e.to_string()))?;
        let timeout = Duration::from_secs(5);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(timeout, client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| store("timed out connecting"))?
            .map_err(|e| store(e.to_string()))?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            secret: secret.to_vec(),
        })
    }

    /// The key of `subject`: its keyed digest inside a hash tag.
    fn key(&self, subject: &str) -> String {
        let digest = Sha256::new()
            .chain_update((self.secret.len() as u64).to_le_bytes())
            .chain_update(&self.secret)
            .chain_update(subject.as_bytes())
            .finalize();
        format!("{}:alloc:{{{}}}", self.prefix, hex::encode(digest))
    }

    /// An allocation of `subject` from its stored JSON.
    fn decode(subject: &str, json: Option<String>) -> Result<Option<Allocation>, Error> {
        let Some(json) = json else {
            return Ok(None);
        };
        let s: Stored = serde_json::from_str(&json).map_err(|e| Error::InvalidAllocation {
            subject: subject.to_owned(),
            reason: format!("stored allocation does not parse: {e}"),
        })?;
        Ok(Some(Allocation {
            subject: subject.to_owned(),
            plan: s.plan,
            overrides: s.overrides,
            models: s.models,
            pools: s.pools,
        }))
    }
}

#[async_trait::async_trait]
impl AsyncAllocationSource for RedisAllocations {
    async fn load(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        let json: Option<String> = redis::cmd("GET")
            .arg(self.key(subject))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store(e.to_string()))?;
        Self::decode(subject, json)
    }

    async fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error> {
        let stored = Stored {
            plan: allocation.plan.clone(),
            overrides: allocation.overrides.clone(),
            models: allocation.models.clone(),
            pools: allocation.pools.clone(),
        };
        let json = serde_json::to_string(&stored).map_err(|e| store(e.to_string()))?;
        let old: Option<String> = redis::cmd("SET")
            .arg(self.key(&allocation.subject))
            .arg(json)
            .arg("GET")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store(e.to_string()))?;
        // An old value that does not parse is replaced all the same.
        Ok(Self::decode(&allocation.subject, old).unwrap_or(None))
    }

    async fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        let old: Option<String> = redis::cmd("GETDEL")
            .arg(self.key(subject))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store(e.to_string()))?;
        Ok(Self::decode(subject, old).unwrap_or(None))
    }
}

fn store(message: impl Into<String>) -> Error {
    Error::Store {
        message: message.into(),
    }
}
