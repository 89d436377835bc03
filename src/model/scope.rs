//! Scopes: whose counters they are, and the hashing that finds them.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whose counter it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    /// A subject: an agent, user, API key or account bound to a plan.
    Subject,
    /// A shared pool: an account pool, a model's global budget.
    Pool,
}

/// A scope: the owner of a set of counters. Cheap to clone.
///
/// Serializes as `"subject:<id>"` or `"pool:<id>"`. A scope carries its own
/// hash, computed once when it is made (SipHash under a per-process random
/// key, so callers cannot aim ids at one bucket): a store finds a scope's
/// shard and map entry without hashing the id again.
#[derive(Clone)]
pub struct ScopeKey {
    id: Arc<str>,
    /// The hash of `(kind, id)` with bit [`KIND_BIT`] replaced by the kind
    /// (set for a pool), so a key is three words, not four: a store's maps
    /// hold millions of them.
    word: u64,
}

/// The bit of [`ScopeKey::word`] that holds the kind: below the seven bits
/// `hashbrown` tags entries with, above those a map of fewer than 2^56
/// buckets indexes by, and of no weight in a shard index taken modulo a
/// small count, so every bit a map or shard reads stays hashed.
const KIND_BIT: u64 = 1 << 56;

impl ScopeKey {
    fn new(kind: ScopeKind, id: Arc<str>) -> Self {
        use std::hash::{BuildHasher, Hash as _, Hasher as _};
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let mut h = KEYS.get_or_init(Default::default).build_hasher();
        kind.hash(&mut h);
        id.hash(&mut h);
        let flag = match kind {
            ScopeKind::Subject => 0,
            ScopeKind::Pool => KIND_BIT,
        };
        Self {
            id,
            word: (h.finish() & !KIND_BIT) | flag,
        }
    }

    /// The scope of a subject.
    pub fn subject(id: impl Into<Arc<str>>) -> Self {
        Self::new(ScopeKind::Subject, id.into())
    }

    /// The scope of a pool.
    pub fn pool(id: impl Into<Arc<str>>) -> Self {
        Self::new(ScopeKind::Pool, id.into())
    }

    /// Subject or pool.
    pub fn kind(&self) -> ScopeKind {
        if self.word & KIND_BIT == 0 {
            ScopeKind::Subject
        } else {
            ScopeKind::Pool
        }
    }

    /// The subject's or pool's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The scope's hash, for a store's own maps and shards: the same for
    /// equal scopes within one process, not stable across processes.
    pub fn hash_value(&self) -> u64 {
        self.word
    }
}

impl PartialEq for ScopeKey {
    fn eq(&self, other: &Self) -> bool {
        // The words hold the kinds exactly (and equal ids hash alike), so
        // equal words and equal ids are equal keys; the hash bits only
        // make a mismatch cheap.
        self.word == other.word && (Arc::ptr_eq(&self.id, &other.id) || self.id == other.id)
    }
}

impl Eq for ScopeKey {}

impl std::hash::Hash for ScopeKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.word);
    }
}

impl PartialOrd for ScopeKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ScopeKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.kind(), &self.id).cmp(&(other.kind(), &other.id))
    }
}

/// A hasher for keys that carry their own hash ([`ScopeKey`]): it passes
/// the `u64` through. Any other input is mixed with FNV-1a.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassHasher(u64);

impl Default for PassHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for PassHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Maps keyed by [`ScopeKey`] without hashing the id again.
pub(crate) type ScopeMap<V> =
    std::collections::HashMap<ScopeKey, V, std::hash::BuildHasherDefault<PassHasher>>;

impl fmt::Debug for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            ScopeKind::Subject => write!(f, "subject:{}", self.id),
            ScopeKind::Pool => write!(f, "pool:{}", self.id),
        }
    }
}

impl Serialize for ScopeKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScopeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.split_once(':') {
            Some(("subject", id)) => Ok(ScopeKey::subject(id)),
            Some(("pool", id)) => Ok(ScopeKey::pool(id)),
            _ => Err(serde::de::Error::custom(format_args!(
                "`{text}` is not a scope like subject:<id> or pool:<id>"
            ))),
        }
    }
}
