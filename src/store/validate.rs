//! Batch checks every backend runs before it applies a batch (contract rules 1 and 7).

use super::{Batch, LeaseAction, Mode};
use crate::window::Window;
use crate::Error;

pub(crate) fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidBatch {
        reason: reason.into(),
    }
}

/// Contract rules 1 and 7: valid windows, each counter at most once, lease
/// actions in the right mode, no usage on a concurrent counter.
pub(crate) fn validate(batch: &Batch<'_>) -> Result<(), Error> {
    let ops = batch.ops;
    let holding = matches!(
        batch.lease.map(|l| l.action),
        Some(LeaseAction::Open { .. } | LeaseAction::Grow)
    );
    for (i, op) in ops.iter().enumerate() {
        op.window
            .validate()
            .map_err(|reason| invalid(format!("ops[{i}]: {reason}")))?;
        // The meter first: an interned name, compared by pointer, tells
        // most ops of a batch apart.
        if ops[..i]
            .iter()
            .any(|o| o.meter == op.meter && o.window == op.window && o.scope == op.scope)
        {
            return Err(invalid(format!(
                "ops[{i}]: counter {} {} {} named twice",
                op.scope, op.meter, op.window
            )));
        }
        if op.window == Window::Concurrent && op.delta > 0 && !holding {
            return Err(invalid(format!(
                "ops[{i}]: a concurrent counter takes holds, not usage"
            )));
        }
    }
    if let Some(lease) = batch.lease {
        let ok = match lease.action {
            LeaseAction::Open { .. } => matches!(batch.mode, Mode::WithinLimits | Mode::Check),
            LeaseAction::Renew { .. } => ops.is_empty(),
            LeaseAction::Grow => matches!(batch.mode, Mode::WithinLimits | Mode::Force),
            LeaseAction::Settle { .. } => batch.mode == Mode::Force,
        };
        if !ok {
            return Err(invalid(format!(
                "lease action {:?} cannot run in mode {:?} with {} ops",
                lease.action,
                batch.mode,
                ops.len()
            )));
        }
    }
    Ok(())
}
