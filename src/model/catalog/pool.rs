//! Validated pools: shared scopes that requests also draw on.

use std::sync::Arc;

use super::plan::Limit;
use crate::model::scope::ScopeKey;

/// A validated pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub(crate) id: Arc<str>,
    pub(crate) scope: ScopeKey,
    pub(crate) limits: Vec<Limit>,
    pub(crate) cooldown_ms: Option<i64>,
}

impl Pool {
    /// The pool's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Its limits.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }
}
