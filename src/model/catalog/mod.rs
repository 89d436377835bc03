//! The domain model: meters, limits, plans and pools, loaded from
//! configuration and validated once.
//!
//! [`CatalogConfig`] is the serde form operators write (JSON, TOML, anything
//! serde reads). [`Catalog`] is the validated form the engine runs on; it
//! deserializes through `CatalogConfig`, so a bad file fails at load with an
//! error naming the field.
//!
//! `meter` holds meters and units, `plan` validated plans and limits,
//! `pool` validated pools, `config` the serde forms, `validate` the checks
//! that turn one into the other.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

use crate::model::name::Name;
use crate::Error;

mod config;
mod meter;
mod plan;
mod pool;
#[cfg(test)]
mod tests;
mod validate;

pub use config::{
    BalanceConfig, CatalogConfig, LimitConfig, MaxConfig, PlanConfig, PoolConfig, RefundPolicy,
};
pub use meter::{Meter, Unit, MAX_MONEY_SCALE};
pub(crate) use plan::{charged_name, cost_minor};
// At their old paths (`crate::catalog::Keep`), for the engine to name.
#[allow(unused_imports)]
pub(crate) use plan::{CostMeter, Keep};
pub use plan::{Limit, Plan, DEFAULT_WARN_AT, MAX_PRICE_SCALE};
pub use pool::Pool;
pub(crate) use validate::first_duplicate;

use plan::UnpricedIds;

/// `a == b`, for the short ids of meters: a length of 4 to 16 bytes is
/// compared as two overlapping words each, without a call to `memcmp`.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    fn word8(s: &[u8], at: usize) -> Option<u64> {
        s.get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_le_bytes)
    }
    fn word4(s: &[u8], at: usize) -> Option<u32> {
        s.get(at..at + 4)
            .and_then(|w| <[u8; 4]>::try_from(w).ok())
            .map(u32::from_le_bytes)
    }
    match n {
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        _ => a == b,
    }
}

/// The validated catalog the engine runs on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "CatalogConfig")]
pub struct Catalog {
    pub(crate) meters: Vec<Meter>,
    pub(crate) meter_ids: Vec<Name>,
    /// Currency of each money meter, interned so a decision clones, not allocates.
    pub(crate) currencies: Vec<Option<Name>>,
    pub(crate) meter_index: HashMap<String, usize>,
    pub(crate) plans: HashMap<String, Arc<Plan>>,
    pub(crate) pools: HashMap<String, Arc<Pool>>,
    pub(crate) model_pools: HashMap<String, Vec<Arc<Pool>>>,
    /// The ids a request lists as unpriced, shared by every plan with a cost meter.
    unpriced_ids: UnpricedIds,
    config: CatalogConfig,
}

impl TryFrom<CatalogConfig> for Catalog {
    type Error = Error;
    fn try_from(c: CatalogConfig) -> Result<Self, Error> {
        Catalog::from_config(c)
    }
}

impl Serialize for Catalog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.config.serialize(s)
    }
}

impl Catalog {
    /// Validate a configuration. Same as [`CatalogConfig::build`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field.
    pub fn from_config(config: CatalogConfig) -> Result<Self, Error> {
        let mut catalog = Catalog::with_meters(&config.meters)?;
        for p in &config.plans {
            catalog.add_plan(p)?;
        }
        for p in &config.pools {
            catalog.add_pool(p)?;
        }
        catalog.check_balance_pools(&config)?;
        catalog.config = config;
        Ok(catalog)
    }

    /// The index of the meter with this id. A handful of meters is scanned
    /// (cheaper than hashing the id); a large catalog uses its map.
    #[inline(always)]
    pub(crate) fn meter_idx(&self, id: &str) -> Option<usize> {
        if self.meter_ids.len() <= 16 {
            let id = id.as_bytes();
            self.meter_ids
                .iter()
                .position(|m| same_bytes(m.as_bytes(), id))
        } else {
            self.meter_index.get(id).copied()
        }
    }

    /// The meter with this id.
    pub fn meter(&self, id: &str) -> Option<&Meter> {
        self.meter_index.get(id).map(|&i| &self.meters[i])
    }

    /// The interned currency of money meter `idx` (empty for other meters).
    pub(crate) fn currency(&self, idx: usize) -> Name {
        self.currencies
            .get(idx)
            .copied()
            .flatten()
            .unwrap_or_else(|| Name::intern(""))
    }

    /// The plan with this id.
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id).map(|p| &**p)
    }

    /// The pool with this id.
    pub fn pool(&self, id: &str) -> Option<&Pool> {
        self.pools.get(id).map(|p| &**p)
    }

    /// The configuration this catalog was built from.
    pub fn config(&self) -> &CatalogConfig {
        &self.config
    }

    /// How many entries the catalog's tables hold in all: its per-meter
    /// tables once, each plan's and each pool's own tables, and the model
    /// pools' lists.
    #[cfg(test)]
    pub(crate) fn table_entries(&self) -> usize {
        let per_meter = self.meters.len()
            + self.meter_ids.len()
            + self.currencies.len()
            + self.meter_index.len()
            + self.unpriced_ids.len();
        let plans: usize = self.plans.values().map(|p| p.table_entries()).sum();
        let pools: usize = self.pools.values().map(|p| p.limits.len()).sum();
        let models: usize = self.model_pools.values().map(Vec::len).sum();
        per_meter + plans + pools + models
    }
}
