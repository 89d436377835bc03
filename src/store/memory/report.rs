//! Phase 3 of a batch: each op's counter as a `CounterState`; and for a
//! batch with a counter due a roll, the roll (one that applies) or the views
//! (one that does not). Those two live here, not in `apply`: beside the
//! compact path, its unchanged `add_and_report` took 18 more instructions a
//! call (register allocation; callgrind, admit at 10,000 subjects).

use super::counters::{width_of, Counter, Ring};
use super::holds::{expire_holds, held_at, held_in, HoldMap};
use super::keys::KeyId;
use super::shard::{Locked, Shard};
use crate::store::{CounterOp, CounterState, InlineVec, ScopeKey};
use crate::window::Window;

/// The state of a counter of `window` (or of an absent one, `counter ==
/// None`) holding `held`.
// Inlined into both reports (its result is a large value, built in place).
#[inline(always)]
pub(super) fn state_of(
    counter: Option<&Counter>,
    held: u64,
    window: Window,
    now_ms: i64,
    delta: u64,
    max: Option<u64>,
) -> CounterState {
    let used = counter.map_or(0, Counter::used);
    // Past the maximum with this delta: for a zero delta, a counter that
    // `Force` already took past it.
    // In u64, a sum past it counting as over (saves the u128 adds).
    let over = max.is_some_and(|m| {
        used.checked_add(held)
            .and_then(|s| s.checked_add(delta))
            .is_none_or(|s| s > m)
    });
    // Holds are in-flight work: waiting for the window does not free them.
    let pending = held.saturating_add(delta);
    let (period_start, resets_at, available_at) = match window {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => {
            // A counter reports the period its usage belongs to (after a
            // clock step back, that can be later than `now`'s period).
            let (start, next) = match counter {
                Some(&Counter::Calendar { start, len_ms, .. }) => {
                    (start, start.saturating_add(i64::from(len_ms)))
                }
                _ => Window::calendar_bounds(period, utc_offset_secs, now_ms),
            };
            let avail = match max {
                Some(m) if over && pending <= m => Some(next),
                _ => None,
            };
            (Some(start), Some(next), avail)
        }
        Window::Rolling { span_secs, .. } => {
            let start = now_ms.saturating_sub((span_secs as i64).saturating_mul(1_000));
            let ring = counter.and_then(|c| match c {
                Counter::Rolling { back, buf, .. } => Some(Ring {
                    width_ms: width_of(window),
                    back: *back,
                    buf: &**buf,
                }),
                _ => None,
            });
            let resets = ring.as_ref().and_then(Ring::resets_at);
            let avail = match (max, &ring) {
                (Some(m), Some(r)) if over => r.available_at(pending, m),
                _ => None,
            };
            (Some(start), resets, avail)
        }
        Window::Lifetime | Window::Concurrent => (None, None, None),
    };
    CounterState {
        used,
        held,
        period_start_ms: period_start,
        resets_at_ms: resets_at,
        available_at_ms: available_at,
    }
}

/// [`state_of`] for a batch that did not apply: the counter of `scope` as
/// rolling it to `now_ms` (and dropping its expired holds) would leave it,
/// read without changing it (contract rule 2).
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
pub(super) fn view_state_of(
    counter: Option<&Counter>,
    holds: &HoldMap,
    scope: &ScopeKey,
    window: Window,
    now_ms: i64,
    delta: u64,
    max: Option<u64>,
) -> CounterState {
    let held = counter.map_or(0, |c| held_at(holds, scope, c.key(), now_ms).0);
    let (ring, span_secs) = match (counter, window) {
        (Some(c), _) if c.current(window, now_ms) => {
            return state_of(counter, held, window, now_ms, delta, max)
        }
        (Some(Counter::Rolling { back, buf, .. }), Window::Rolling { span_secs, .. }) => (
            Ring {
                width_ms: width_of(window),
                back: *back,
                buf: &**buf,
            },
            span_secs,
        ),
        // A calendar counter due a roll reads as a new one: zero in the
        // period of `now_ms` (a lifetime or concurrent one is always
        // current).
        _ => return state_of(None, held, window, now_ms, delta, max),
    };
    let (tail, used) = ring.view(now_ms);
    // As in `state_of`, over the buckets rolling would keep.
    let over = max
        .is_some_and(|m| u128::from(used) + u128::from(held) + u128::from(delta) > u128::from(m));
    let pending = held.saturating_add(delta);
    let start = now_ms.saturating_sub((span_secs as i64).saturating_mul(1_000));
    let resets_at = ring.resets_at_in(tail, used);
    let available_at = match max {
        Some(m) if over => ring.available_at_in(tail, used, pending, m),
        _ => None,
    };
    CounterState {
        used,
        held,
        period_start_ms: Some(start),
        resets_at_ms: resets_at,
        available_at_ms: available_at,
    }
}

/// Phase 3: each op's counter as it stands (see `state_of`), or for a batch
/// that did not apply with a counter due a roll (`view`), as rolling would
/// leave it (see [`view_state_of`]), appended to `counters`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn report(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &[(KeyId, usize)],
    applied: bool,
    view: bool,
    now_ms: i64,
    counters: &mut InlineVec<CounterState>,
) {
    // When applied, the delta is already in `used` or `held`; ask about
    // a zero delta so `available_at` is not set for a fitting op.
    let delta_of = |op: &CounterOp<'_>| if applied { 0 } else { op.delta };
    let mut i = 0;
    for &end in runs {
        let Shard { scopes, holds, .. } = locked.shard(op_shards[i]);
        let list: &[Counter] = scopes.get(ops[i].scope).map_or(&[], |c| c);
        for (op, &(_, idx)) in ops[i..end].iter().zip(&op_at[i..end]) {
            let counter = list.get(idx);
            if view {
                counters.push(view_state_of(
                    counter,
                    holds,
                    op.scope,
                    op.window,
                    now_ms,
                    delta_of(op),
                    op.max,
                ));
                continue;
            }
            let held = counter.map_or(0, |c| held_in(holds, op.scope, c.key()));
            let (delta, max) = (delta_of(op), op.max);
            counters.push(state_of(counter, held, op.window, now_ms, delta, max));
        }
        i = end;
    }
}

/// The first step of phase 2 for a batch that applies with a counter due a
/// roll ([`Fit::due`](super::apply::Fit::due)): roll every op's counter to now and drop its holds
/// that expired.
#[cold]
#[inline(never)]
pub(super) fn roll_ops(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &[(KeyId, usize)],
    now_ms: i64,
) {
    let mut i = 0;
    for &end in runs {
        let Shard {
            scopes,
            holds,
            history,
            ..
        } = locked.shard(op_shards[i]);
        let scope = ops[i].scope;
        if let Some(list) = scopes.get_mut(scope) {
            for (op, &(_, idx)) in ops[i..end].iter().zip(&op_at[i..end]) {
                if let Some(c) = list.get_mut(idx) {
                    if let Some(closed) = c.advance(op.window, now_ms) {
                        history.keep(scope, op.meter, op.window, closed, now_ms);
                    }
                    expire_holds(holds, scope, c.key(), now_ms);
                }
            }
        }
        i = end;
    }
}

/// Phase 3 of a batch that did not apply with a counter due a roll
/// ([`Fit::due`](super::apply::Fit::due)): each op's counter as rolling it would leave it (see
/// [`view_state_of`]), nothing written, appended to `out`.
#[cold]
#[inline(never)]
pub(super) fn report_views(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &[(KeyId, usize)],
    now_ms: i64,
    out: &mut InlineVec<CounterState>,
) {
    report(
        locked, ops, op_shards, runs, op_at, false, true, now_ms, out,
    );
}
