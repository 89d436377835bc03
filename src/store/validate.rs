//! Batch checks every backend runs before it applies a batch (contract rules 1 and 7).

use super::{BalanceAction, Batch, CounterOp, LeaseAction, Mode};
use crate::window::Window;
use crate::Error;

pub(crate) fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidBatch {
        reason: reason.into(),
    }
}

/// Contract rules 1 and 7: valid windows, each counter at most once, lease
/// actions in the right mode, no usage on a concurrent counter.
// Inlined into each backend's `apply` (saves a call and its saved
// registers, about 20 instructions a batch).
#[inline]
pub(crate) fn validate(batch: &Batch<'_>) -> Result<(), Error> {
    let ops = batch.ops;
    let holding = matches!(
        batch.lease.map(|l| l.action),
        Some(LeaseAction::Open { .. } | LeaseAction::Grow)
    );
    // The loop only tests; the error is built out of line, so the usual
    // call keeps a small frame and no spills (saves about 40 instructions
    // a batch of four ops).
    for (i, op) in ops.iter().enumerate() {
        // A UTC calendar or a lifetime window is valid as it is (saves the
        // offset's division on most ops); others take `Window::validate`.
        let valid = match op.window {
            Window::Calendar {
                utc_offset_secs: 0, ..
            }
            | Window::Lifetime => true,
            w => w.validate().is_ok(),
        };
        let bad = !valid
            || named_before(&ops[..i], op)
            || (op.window == Window::Concurrent && op.delta > 0 && !holding);
        if bad {
            return Err(refuse_op(ops, i, holding));
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
    if let Some(b) = batch.balance {
        validate_balance(batch, b.action)?;
    }
    Ok(())
}

/// Contract rule 10: a grant is a forced batch of its own, with an id, an
/// amount and an expiry after its start; a debit rides on no renewal.
#[inline(never)]
fn validate_balance(batch: &Batch<'_>, action: BalanceAction<'_>) -> Result<(), Error> {
    match action {
        BalanceAction::Grant(g) => {
            if batch.mode != Mode::Force || !batch.ops.is_empty() || batch.lease.is_some() {
                return Err(invalid(
                    "a grant is a forced batch with no ops and no lease",
                ));
            }
            if g.id.is_empty() {
                return Err(invalid("a grant needs an id"));
            }
            if g.amount == 0 {
                return Err(invalid("a grant of zero"));
            }
            if g.expires_at_ms.is_some_and(|e| e <= g.effective_at_ms) {
                return Err(invalid("a grant that expires before it starts"));
            }
        }
        BalanceAction::Debit { .. } => {
            if let Some(LeaseAction::Renew { .. }) = batch.lease.map(|l| l.action) {
                return Err(invalid("a renewal debits no balance"));
            }
        }
    }
    Ok(())
}

/// Whether `earlier` names `op`'s counter. Interned meters compared by
/// pointer alone first: an engine batch names each meter once.
#[inline]
fn named_before(earlier: &[CounterOp<'_>], op: &CounterOp<'_>) -> bool {
    earlier.iter().any(|o| o.meter == op.meter) && same_counter_in(earlier, op)
}

/// Whether `earlier` names `op`'s counter, meter, window and scope; out of
/// line, for a batch that repeats a meter.
#[inline(never)]
fn same_counter_in(earlier: &[CounterOp<'_>], op: &CounterOp<'_>) -> bool {
    earlier
        .iter()
        .any(|o| o.meter == op.meter && o.window == op.window && o.scope == op.scope)
}

/// The error of `ops[i]`, which [`validate`] found wrong: its window, a
/// counter named twice, or usage on a concurrent counter, in that order.
#[cold]
#[inline(never)]
fn refuse_op(ops: &[CounterOp<'_>], i: usize, holding: bool) -> Error {
    let op = &ops[i];
    if let Err(reason) = op.window.validate() {
        return invalid(format!("ops[{i}]: {reason}"));
    }
    if named_before(&ops[..i], op) {
        return invalid(format!(
            "ops[{i}]: counter {} {} {} named twice",
            op.scope, op.meter, op.window
        ));
    }
    debug_assert!(op.window == Window::Concurrent && op.delta > 0 && !holding);
    invalid(format!(
        "ops[{i}]: a concurrent counter takes holds, not usage"
    ))
}
