//! Who is on which plan: the public [`Allocation`], its resolved form
//! against the catalog, and the sharded table of resolved allocations.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::catalog::{first_duplicate, Catalog, Limit, LimitConfig, Plan, Pool};
use crate::store::ScopeKey;
use crate::Error;

/// Binds a subject to a plan.
///
/// ```
/// use tollgate::{Allocation, LimitConfig, Period, Window};
/// use rust_decimal_macros::dec;
///
/// let a = Allocation::new("agent-7", "plan_plus")
///     // A monthly cost cap of $50 for this subject only (seed 001).
///     .with_override(LimitConfig::new("cost", Window::calendar(Period::Month), dec!(50)))
///     .with_models(["claude-sonnet", "claude-haiku"])
///     .with_pool("account:acme");
/// # let _ = a;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    /// The subject: an agent, user, API key or account id.
    pub subject: String,
    /// The plan it is on.
    pub plan: String,
    /// Limits for this subject only. An override with the same meter and
    /// window as a plan limit replaces it (same counter, new maximum); any
    /// other override is added. A cap on the plan's cost meter limits the
    /// computed cost of every request; on a plan without a cost meter, a
    /// money limit counts only money the host passes with
    /// [`Request::money`](crate::Request::money).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<LimitConfig>,
    /// The models the subject may use; `None` allows every model. A request
    /// that names no model is not a model call and is not checked. `check` and
    /// `admit` refuse another model with
    /// [`Refusal::ModelNotAllowed`](crate::Refusal::ModelNotAllowed) and
    /// record nothing; `record` records the usage (it happened) and reports
    /// the same refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Shared pools the subject also draws on (an account pool). A model's
    /// global pool cannot be listed here: it applies to every request that
    /// names its model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

impl Allocation {
    /// Bind `subject` to `plan` with no overrides.
    pub fn new(subject: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            plan: plan.into(),
            overrides: Vec::new(),
            models: None,
            pools: Vec::new(),
        }
    }

    /// Add a per-allocation limit.
    #[must_use]
    pub fn with_override(mut self, limit: LimitConfig) -> Self {
        self.overrides.push(limit);
        self
    }

    /// Restrict the models the subject may use.
    #[must_use]
    pub fn with_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Draw on a shared pool too.
    #[must_use]
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pools.push(pool.into());
        self
    }
}

/// An allocation resolved against the catalog: one per subject, so it keeps
/// nothing twice. The subject's id lives once, in `scope` (the table finds
/// the entry by it); the limits are the plan's own unless overridden; the
/// plan and pool ids of the [`Allocation`] are those of `plan` and `pools`.
/// What most allocations lack (pools, an allowlist, overrides and the
/// limits they make) sits behind one optional box, so a plain allocation
/// takes 48 bytes beside its id.
#[derive(Debug)]
pub(super) struct Resolved {
    pub(super) scope: ScopeKey,
    pub(super) plan: Arc<Plan>,
    pub(super) more: Option<Box<More>>,
    /// When it was resolved or last confirmed by a shared source (Unix ms,
    /// the engine's clock); read only by an engine with a source.
    pub(super) loaded_ms: AtomicI64,
}

/// The rarer parts of an allocation; never all empty.
#[derive(Debug)]
pub(super) struct More {
    pub(super) pools: Vec<Arc<Pool>>,
    pub(super) models: Option<Vec<String>>,
    pub(super) overrides: Vec<LimitConfig>,
    /// The plan's limits with the overrides applied (`None`: no override).
    pub(super) limits: Option<Arc<[Limit]>>,
}

impl Resolved {
    /// Resolve `allocation` against `catalog`: its plan, its limits with the
    /// overrides applied, its pools. Returned with the subject's id, which
    /// the scope shares, as the table's key.
    ///
    /// # Errors
    /// [`Error::UnknownPlan`], [`Error::UnknownPool`], or
    /// [`Error::InvalidConfig`] for an empty subject or a bad override.
    pub(super) fn new(
        catalog: &Catalog,
        allocation: Allocation,
        now_ms: i64,
    ) -> Result<(Arc<str>, Self), Error> {
        if allocation.subject.is_empty() {
            return Err(Error::config("subject", "empty subject id"));
        }
        let plan = catalog
            .plans
            .get(&allocation.plan)
            .cloned()
            .ok_or_else(|| Error::UnknownPlan {
                plan: allocation.plan.clone(),
            })?;
        let overrides = catalog.resolve_limits(&allocation.overrides, "overrides")?;
        let limits: Option<Arc<[Limit]>> = if overrides.is_empty() {
            None
        } else {
            let mut limits = plan.limits.to_vec();
            for o in overrides {
                match limits
                    .iter_mut()
                    .find(|l| l.meter_idx == o.meter_idx && l.window == o.window)
                {
                    Some(l) => *l = o,
                    None => limits.push(o),
                }
            }
            Some(limits.into())
        };
        let pools = listed_pools(catalog, &allocation.pools)?;
        // A plan that spends a pool's prepaid balance is for that pool's
        // members only: anyone else would spend money not theirs.
        if let Some(bp) = plan.balance.as_ref().and_then(|b| b.pool.as_ref()) {
            if !pools.iter().any(|p| p.scope == *bp) {
                return Err(Error::config(
                    "pools",
                    format!(
                        "plan `{}` spends the prepaid balance of `{bp}`: the allocation must draw on that pool",
                        allocation.plan
                    ),
                ));
            }
        }
        let subject: Arc<str> = Arc::from(allocation.subject);
        let resolved = Resolved {
            scope: ScopeKey::subject(subject.clone()),
            plan,
            more: (!pools.is_empty()
                || allocation.models.is_some()
                || !allocation.overrides.is_empty())
            .then(|| {
                Box::new(More {
                    pools,
                    models: allocation.models,
                    overrides: allocation.overrides,
                    limits,
                })
            }),
            loaded_ms: AtomicI64::new(now_ms),
        };
        Ok((subject, resolved))
    }

    /// Its limits: the plan's, or the plan's with the overrides applied.
    #[inline]
    pub(super) fn limits(&self) -> &[Limit] {
        match self.more.as_deref() {
            Some(More {
                limits: Some(l), ..
            }) => l,
            _ => &self.plan.limits,
        }
    }

    /// The pools the allocation lists.
    #[inline]
    pub(super) fn pools(&self) -> &[Arc<Pool>] {
        self.more.as_ref().map_or(&[], |m| &m.pools)
    }

    /// When it was resolved or last confirmed (Unix ms).
    pub(super) fn loaded_ms(&self) -> i64 {
        self.loaded_ms.load(Ordering::Relaxed)
    }

    /// Mark it confirmed by the source at `now_ms`.
    pub(super) fn confirm(self: &Arc<Self>, now_ms: i64) -> Arc<Self> {
        self.loaded_ms.store(now_ms, Ordering::Relaxed);
        self.clone()
    }

    /// Whether `allocation` is the one this was resolved from.
    pub(super) fn same_as(&self, allocation: &Allocation) -> bool {
        self.allocation() == *allocation
    }

    /// The allocation as it was given to [`Engine::allocate`](super::Engine::allocate).
    pub(super) fn allocation(&self) -> Allocation {
        let mut a = Allocation::new(self.scope.id(), &*self.plan.id);
        if let Some(m) = &self.more {
            a.overrides.clone_from(&m.overrides);
            a.models.clone_from(&m.models);
            a.pools = m.pools.iter().map(|p| p.id.to_string()).collect();
        }
        a
    }
}

/// The pools an allocation lists, each once and none a model's global pool.
fn listed_pools(catalog: &Catalog, ids: &[String]) -> Result<Vec<Arc<Pool>>, Error> {
    if let Some(dup) = first_duplicate(ids.iter().map(String::as_str)) {
        return Err(Error::config("pools", format!("pool `{dup}` listed twice")));
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let pool = catalog
                .pools
                .get(id)
                .cloned()
                .ok_or_else(|| Error::UnknownPool { pool: id.clone() })?;
            if catalog.model_pools.values().flatten().any(|p| p.id == pool.id) {
                return Err(Error::config(
                    format!("pools[{i}]"),
                    format!("pool `{id}` is a model's global pool: requests naming the model draw on it"),
                ));
            }
            Ok(pool)
        })
        .collect()
}

/// The allocation table: subject → resolved allocation, split in
/// [`TABLE_SHARDS`] locks, each on its own cache line, so calls on different
/// subjects from different threads do not all write one lock word.
///
/// Each shard's map is keyed by the scope's id (one allocation, shared with
/// the scope) under foldhash's fast hasher, keyed at random: one secret per
/// process and one per map (`foldhash::fast::RandomState`). Chosen over
/// std's SipHash because every call hashes one subject id here, and
/// SipHash cost about 180 instructions more per call (callgrind, see
/// `../shared/notes/one-lookup.md`); over `ahash` because foldhash has no
/// dependencies, does not change with the CPU's features, is at least as
/// fast on short keys, and is already in the build (hashbrown's default).
/// It is not a cryptographic hash: see the flood-resistance note on
/// [`Engine`](super::Engine). The shard comes from a cheap unkeyed hash of
/// the id: ids aimed at one shard only bring back a single lock.
#[derive(Default)]
pub(super) struct Table {
    shards: [Shard; TABLE_SHARDS],
}

/// Shards of the allocation table.
const TABLE_SHARDS: usize = 16;

/// One shard's map: the resolved allocations, found by subject id under
/// foldhash. A set of `Arc`s keyed by the id inside them, so a slot is one
/// pointer (8 bytes) rather than a key beside a value (24).
type Map = HashSet<Entry, foldhash::fast::RandomState>;

/// A resolved allocation in the table, equal, hashed and borrowed as its
/// subject's id.
#[derive(Debug)]
pub(super) struct Entry(Arc<Resolved>);

impl Borrow<str> for Entry {
    fn borrow(&self) -> &str {
        self.0.scope.id()
    }
}

impl Hash for Entry {
    /// As the id (a `str`) hashes: what `Borrow<str>` requires.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.scope.id().hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.0.scope.id() == other.0.scope.id()
    }
}

impl Eq for Entry {}

/// One lock of the table, alone on its cache line.
#[derive(Default)]
#[repr(align(64))]
struct Shard(RwLock<Map>);

impl Table {
    /// The shard holding `subject`: its last eight bytes (where ids like
    /// `agent-7` differ) and its length, multiplied into the top bits.
    #[inline]
    pub(super) fn shard(&self, subject: &str) -> &RwLock<Map> {
        let b = subject.as_bytes();
        let tail = b
            .len()
            .checked_sub(8)
            .and_then(|i| <[u8; 8]>::try_from(&b[i..]).ok())
            .map_or_else(
                || b.iter().fold(0u64, |h, &x| (h << 8) | u64::from(x)),
                u64::from_le_bytes,
            );
        let h = (tail ^ b.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The top four bits: TABLE_SHARDS is 16.
        &self.shards[(h >> 60) as usize].0
    }

    /// The resolved allocation of `subject`.
    #[inline]
    pub(super) fn get(&self, subject: &str) -> Option<Arc<Resolved>> {
        self.shard(subject).read().get(subject).map(|e| e.0.clone())
    }

    /// Bind `subject` to `resolved`, replacing any earlier allocation: the
    /// new one and the one it replaced.
    pub(super) fn insert(
        &self,
        subject: Arc<str>,
        resolved: Resolved,
    ) -> (Arc<Resolved>, Option<Arc<Resolved>>) {
        let new = Arc::new(resolved);
        let old = self.shard(&subject).write().replace(Entry(new.clone()));
        (new, old.map(|e| e.0))
    }

    /// Unbind `subject`; the allocation it had.
    pub(super) fn remove(&self, subject: &str) -> Option<Arc<Resolved>> {
        self.shard(subject).write().take(subject).map(|e| e.0)
    }

    /// Subjects allocated.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{Table, TABLE_SHARDS};

    fn index(t: &Table, id: &str) -> usize {
        let shard = t.shard(id);
        t.shards
            .iter()
            .position(|s| std::ptr::eq(&s.0, shard))
            .expect("a shard of the table")
    }

    /// Each shard's map hashes ids under keys of its own (a random state),
    /// never one fixed function: the same id hashes differently in two
    /// tables and in two shards of one table.
    #[test]
    fn table_maps_hash_ids_under_keys_of_their_own() {
        use std::hash::BuildHasher;
        let (a, b) = (Table::default(), Table::default());
        let h = |t: &Table, s: usize| t.shards[s].0.read().hasher().hash_one("agent-7");
        assert_ne!(h(&a, 0), h(&b, 0));
        assert_ne!(h(&a, 0), h(&a, 1));
    }

    #[test]
    fn table_shards_spread_ordinary_ids_and_take_any_id() {
        let t = Table::default();
        let mut used = [0usize; TABLE_SHARDS];
        for i in 0..1_000 {
            used[index(&t, &format!("agent-{i}"))] += 1;
        }
        assert!(used.iter().all(|&n| n > 20), "{used:?}");
        for id in [
            "",
            "a",
            "7",
            "ünïcödé-subject-ids",
            "x".repeat(10_000).as_str(),
        ] {
            assert_eq!(index(&t, id), index(&t, id));
        }
        assert_eq!(t.len(), 0);
    }
}
