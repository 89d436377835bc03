//! The audit of allocation changes: who changed which subject's plan, caps,
//! pools or models, when, from what to what (seed 001 audits every cap
//! update).
//!
//! The engine through which a change is made tells its
//! [`Observer::on_audit`](super::Observer::on_audit) once per change:
//! [`Engine::allocate_as`](super::Engine::allocate_as) and
//! [`Engine::deallocate_as`](super::Engine::deallocate_as) carry the actor
//! the host passes (`allocate` and `deallocate` pass none). With a shared
//! [allocation source](super::AllocationSource) the old value is the
//! source's, not a replica's cached copy; a replica that merely loads a
//! change made elsewhere does not audit it again (the one that made it
//! did), but it does audit an allocation from the source that it refuses.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::allocations::Allocation;
use crate::catalog::LimitConfig;

/// One change to a subject's allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditEvent {
    /// The subject whose allocation changed.
    pub subject: String,
    /// What changed.
    pub change: AuditChange,
    /// The allocation before (`None`: the subject had none).
    pub old: Option<Allocation>,
    /// The allocation after (`None`: removed, or a refused change).
    pub new: Option<Allocation>,
    /// When, on the engine's clock.
    pub at: DateTime<Utc>,
    /// Who, as the host named them (`None` when not given).
    pub actor: Option<String>,
}

impl AuditEvent {
    pub(super) fn new(
        subject: &str,
        change: AuditChange,
        old: Option<Allocation>,
        new: Option<Allocation>,
        at: DateTime<Utc>,
        actor: Option<&str>,
    ) -> Self {
        Self {
            subject: subject.to_owned(),
            change,
            old,
            new,
            at,
            actor: actor.map(str::to_owned),
        }
    }
}

/// What an [`AuditEvent`] changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum AuditChange {
    /// The subject was allocated for the first time (or again after a
    /// removal).
    Allocated,
    /// An existing allocation changed; each part that changed, in the
    /// order plan, overrides (caps), pools, models.
    Changed {
        /// The parts that changed.
        parts: Vec<AuditPart>,
    },
    /// The allocation was removed.
    Removed,
    /// An allocation loaded from a shared source was refused (it names a
    /// plan, pool or meter the catalog lacks); the earlier one, if any,
    /// stays in force.
    Rejected {
        /// Why, as [`Error::InvalidAllocation`](crate::Error::InvalidAllocation) says it.
        reason: String,
    },
}

/// One part of an allocation that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "part")]
#[non_exhaustive]
pub enum AuditPart {
    /// The plan binding.
    Plan {
        /// The plan before.
        old: String,
        /// The plan after.
        new: String,
    },
    /// An override (a cap for this subject) on one meter and window:
    /// added (`old` is `None`), changed, or removed (`new` is `None`).
    Override {
        /// The meter it limits.
        meter: String,
        /// The override before.
        old: Option<LimitConfig>,
        /// The override after.
        new: Option<LimitConfig>,
    },
    /// The pools the subject draws on.
    Pools {
        /// The pools before.
        old: Vec<String>,
        /// The pools after.
        new: Vec<String>,
    },
    /// The model allowlist (`None`: every model).
    Models {
        /// The allowlist before.
        old: Option<Vec<String>>,
        /// The allowlist after.
        new: Option<Vec<String>>,
    },
}

impl AuditChange {
    /// The change from `old` to `new`; `None` when nothing changed.
    pub(super) fn between(old: Option<&Allocation>, new: &Allocation) -> Option<Self> {
        let Some(old) = old else {
            return Some(Self::Allocated);
        };
        let mut parts = Vec::new();
        if old.plan != new.plan {
            parts.push(AuditPart::Plan {
                old: old.plan.clone(),
                new: new.plan.clone(),
            });
        }
        let same_limit =
            |a: &LimitConfig, b: &LimitConfig| a.meter == b.meter && a.window == b.window;
        for o in &old.overrides {
            let n = new.overrides.iter().find(|n| same_limit(o, n));
            if n != Some(o) {
                parts.push(AuditPart::Override {
                    meter: o.meter.clone(),
                    old: Some(o.clone()),
                    new: n.cloned(),
                });
            }
        }
        for n in &new.overrides {
            if !old.overrides.iter().any(|o| same_limit(o, n)) {
                parts.push(AuditPart::Override {
                    meter: n.meter.clone(),
                    old: None,
                    new: Some(n.clone()),
                });
            }
        }
        if old.pools != new.pools {
            parts.push(AuditPart::Pools {
                old: old.pools.clone(),
                new: new.pools.clone(),
            });
        }
        if old.models != new.models {
            parts.push(AuditPart::Models {
                old: old.models.clone(),
                new: new.models.clone(),
            });
        }
        (!parts.is_empty()).then_some(Self::Changed { parts })
    }
}
