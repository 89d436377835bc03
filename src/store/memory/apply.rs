//! The compact path of a batch of counter ops, and the steps both paths share.

use super::counters::Counter;
use super::holds::{held_at, held_in};
use super::keys::{KeyId, KEYS_HIGH_WATER};
use super::report::{report_views, roll_ops, state_of};
use super::shard::{run_end, Locked, Shard, NONE};
use super::{MemoryStore, SIDE_SHARDS, SWEEP_GRACE_MS};
use crate::inline::SmallList;
use crate::name::Name;
use crate::store::validate::invalid;
use crate::store::{fits, Applied, Batch, CounterOp, CounterState, InlineVec, Mode, ScopeKey};
use crate::Error;

/// `apply`'s parts: the compact path of a batch of counter ops only, the
/// general path, and the steps they share.
impl MemoryStore {
    /// A batch with no event id, no lease and no cooldowns: the steps of
    /// [`MemoryStore::apply_general`] that such a batch takes, and no more.
    #[inline]
    pub(super) fn apply_counters(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now_ms;
        let ops = batch.ops;
        // An engine batch names one scope by one reference: one shard, one
        // run, one lookup of its counters for all three phases (saves the
        // shard and run lists and a second map lookup).
        if let (Some(first), true) = (ops.first(), ops.len() <= RUN_OPS) {
            if ops.iter().all(|o| std::ptr::eq(o.scope, first.scope)) {
                return self.apply_one_scope(batch, first.scope);
            }
        }
        let mut op_shards: SmallList<usize> = SmallList::new();
        for op in ops {
            op_shards.push(self.shard_of(op.scope));
        }
        let op_shards = op_shards.as_slice();
        let mut locked = self.lock_shards(op_shards.iter().copied());
        let mut op_at: SmallList<(KeyId, usize)> = SmallList::new();
        let mut runs: SmallList<usize> = SmallList::new();
        let fit = check_ops(
            &mut locked,
            batch,
            op_shards,
            false,
            now_ms,
            &mut op_at,
            &mut runs,
        )?;
        let applied = match batch.mode {
            Mode::Check => false,
            Mode::WithinLimits => fit.all,
            Mode::Force => true,
        };
        // The states are written into the answer, not returned and then
        // moved into it (an answer is several hundred bytes).
        let mut result = Applied {
            applied,
            counters: InlineVec::new(),
            settled: Vec::new(),
            cooldowns: InlineVec::new(),
            replayed_at_ms: None,
            balance: None,
        };
        let (runs, out) = (runs.as_slice(), &mut result.counters);
        if fit.due {
            add_and_report_due(
                &mut locked,
                ops,
                op_shards,
                runs,
                &mut op_at,
                applied,
                now_ms,
                out,
            );
        } else {
            add_and_report(
                &mut locked,
                ops,
                op_shards,
                runs,
                &mut op_at,
                applied,
                now_ms,
                out,
            );
        }
        let sweep_turn = locked.count_batch();
        drop(locked);
        if let Some((first, k)) = sweep_turn {
            self.sweep_in_turn(first, k, now_ms);
        }
        Ok(result)
    }

    /// [`MemoryStore::apply_counters`] for a batch whose ops all name
    /// `scope`: [`apply_run`], or where it finds a counter due a roll or one
    /// to make, the steps of the compact path from phase 2 on.
    // Out of line: `apply` keeps a small frame (saves about 35 instructions
    // a call).
    #[inline(never)]
    fn apply_one_scope(&self, batch: &Batch<'_>, scope: &ScopeKey) -> Result<Applied, Error> {
        let now_ms = batch.now_ms;
        let id = self.shard_of(scope);
        // The shard's guard itself, not a `Locked` (saves building and
        // dropping its list of further shards).
        let mut guard = self.shards[id].lock();
        if guard.keys.0.len() >= KEYS_HIGH_WATER {
            guard.compact_keys();
        }
        let mut result = Applied {
            applied: false,
            counters: InlineVec::new(),
            settled: Vec::new(),
            cooldowns: InlineVec::new(),
            replayed_at_ms: None,
            balance: None,
        };
        let sweep_turn = match apply_run(&mut guard, batch, scope, &mut result.counters)? {
            Some(applied) => {
                result.applied = applied;
                let turn = guard.count_batch(id);
                drop(guard);
                turn
            }
            None => {
                let mut locked = Locked {
                    first_id: id,
                    first: Some(guard),
                    rest: Vec::new(),
                };
                result.applied = finish_one_scope(&mut locked, batch, id, &mut result.counters)?;
                locked.count_batch()
            }
        };
        if let Some((first, k)) = sweep_turn {
            self.sweep_in_turn(first, k, now_ms);
        }
        Ok(result)
    }

    /// Lock the counter shards `ids` (repeats allowed), in ascending order,
    /// and drop the unused keys of a shard that has too many.
    #[inline]
    pub(super) fn lock_shards(&self, ids: impl Iterator<Item = usize> + Clone) -> Locked<'_> {
        let mut locked = match ids.clone().next() {
            // Most batches name one scope, so one shard: nothing to sort.
            Some(f) if ids.clone().all(|i| i == f) => Locked {
                first_id: f,
                first: Some(self.shards[f].lock()),
                rest: Vec::new(),
            },
            Some(_) => return self.lock_sorted(ids),
            None => Locked {
                first_id: 0,
                first: None,
                rest: Vec::new(),
            },
        };
        if let Some(sh) = &mut locked.first {
            if sh.keys.0.len() >= KEYS_HIGH_WATER {
                sh.compact_keys();
            }
        }
        locked
    }

    /// [`MemoryStore::lock_shards`] for a batch over several shards.
    #[cold]
    #[inline(never)]
    pub(super) fn lock_sorted(&self, ids: impl Iterator<Item = usize>) -> Locked<'_> {
        let mut all: SmallList<usize> = SmallList::new();
        for i in ids {
            all.push(i);
        }
        all.as_mut_slice().sort_unstable();
        let (&f, others) = all.as_slice().split_first().unwrap_or((&0, &[]));
        let mut locked = Locked {
            first_id: f,
            first: Some(self.shards[f].lock()),
            rest: Vec::new(),
        };
        let mut last = f;
        for &i in others {
            if i != last {
                locked.rest.push((i, self.shards[i].lock()));
                last = i;
            }
        }
        for sh in locked
            .first
            .iter_mut()
            .chain(locked.rest.iter_mut().map(|(_, g)| g))
        {
            if sh.keys.0.len() >= KEYS_HIGH_WATER {
                sh.compact_keys();
            }
        }
        locked
    }

    /// The sweep a batch triggered (see [`Locked::count_batch`]), once the
    /// locks are released.
    #[cold]
    #[inline(never)]
    pub(super) fn sweep_in_turn(&self, first: usize, k: u64, now_ms: i64) {
        let i = ((first as u64 + k) % self.shards.len() as u64) as usize;
        // Counters, holds and cooldowns are read a day behind, so a clock
        // stepping back finds nothing a forward call counted swept.
        let behind = now_ms.saturating_sub(SWEEP_GRACE_MS);
        Self::sweep(&mut self.shards[i].lock(), behind);
        self.sweep_side(
            ((first as u64 + k) % SIDE_SHARDS as u64) as usize,
            now_ms,
            false,
        );
    }
}

/// What phase 1 found: whether every op fits, and whether a named counter
/// is not current at `now` or has holds that expired by then (so a batch
/// that applies rolls them first, see [`roll_ops`], and one that does not
/// reports views of them, see [`view_state_of`](super::report::view_state_of)).
#[derive(Debug, Clone, Copy)]
pub(super) struct Fit {
    pub(super) all: bool,
    pub(super) due: bool,
}

/// Phase 1 for a batch's ops: read every named counter as of now, without
/// rolling it (contract rule 2: only a batch that applies writes), note
/// each op's key (for an op that adds, interned now, so phase 2 cannot fail)
/// and counter position in `op_at` and where each run of ops on one scope
/// ends in `runs`; returns whether every op fits and whether a counter is
/// due a roll. `holding`: the ops take holds (a lease opens or grows), so
/// overflow is of the holds.
#[inline]
pub(super) fn check_ops(
    locked: &mut Locked<'_>,
    batch: &Batch<'_>,
    op_shards: &[usize],
    holding: bool,
    now_ms: i64,
    op_at: &mut SmallList<(KeyId, usize)>,
    runs: &mut SmallList<usize>,
) -> Result<Fit, Error> {
    let ops = batch.ops;
    let mut all_fit = true;
    let mut due = false;
    let mut hint = 0;
    let mut i = 0;
    while i < ops.len() {
        let end = run_end(ops, op_shards, i);
        runs.push(end);
        let Shard {
            keys,
            scopes,
            holds,
            ..
        } = locked.shard(op_shards[i]);
        let scope = ops[i].scope;
        let counters: &[Counter] = scopes.get(scope).map_or(&[], |c| c);
        for op in &ops[i..end] {
            let key = if op.delta > 0 {
                Some(
                    keys.intern(op.meter, op.window, hint)
                        .ok_or_else(keys_full)?,
                )
            } else {
                // A zero delta never makes a counter: no new key.
                keys.find(op.meter, op.window, hint)
            };
            hint = key.map_or(0, |k| usize::from(k) + 1);
            let idx = key.and_then(|k| counters.iter().position(|c| c.key() == k));
            // Phase 2 reads the key only of an op that adds.
            op_at.push((key.unwrap_or_default(), idx.unwrap_or(NONE)));
            let (used, held) = match idx.and_then(|x| counters.get(x)) {
                Some(c) => {
                    let used = if c.current(op.window, now_ms) {
                        c.used()
                    } else {
                        due = true;
                        c.used_at(op.window, now_ms)
                    };
                    let (held, expired) = held_at(holds, scope, c.key(), now_ms);
                    due |= expired;
                    (used, held)
                }
                None => (0, 0),
            };
            // Past u64: an error where the delta would be added
            // regardless (Force, or no maximum); elsewhere it simply does
            // not fit.
            let target = if holding { held } else { used };
            if target.checked_add(op.delta).is_none()
                && (batch.mode == Mode::Force || op.max.is_none())
            {
                return Err(overflow(op.meter));
            }
            all_fit &= fits(used, held, op.delta, op.max);
        }
        i = end;
    }
    Ok(Fit { all: all_fit, due })
}

/// Phases 2 and 3 of a batch of counter ops only with a counter due a roll
/// ([`Fit::due`]): one that applies rolls its counters first, then takes
/// [`add_and_report`]; one that does not reports views and writes nothing
/// ([`report_views`]).
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
fn add_and_report_due(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &mut [(KeyId, usize)],
    applied: bool,
    now_ms: i64,
    out: &mut InlineVec<CounterState>,
) {
    if applied {
        roll_ops(locked, ops, op_shards, runs, op_at, now_ms);
        add_and_report(locked, ops, op_shards, runs, op_at, applied, now_ms, out);
    } else {
        report_views(locked, ops, op_shards, runs, op_at, now_ms, out);
    }
}

/// The error of a shard whose `(meter, window)` ids are all in use.
#[cold]
#[inline(never)]
pub(super) fn keys_full() -> Error {
    invalid(format!(
        "more than {} meter and window pairs in use",
        usize::from(KeyId::MAX) + 1
    ))
}

/// The error of usage or holds that would pass a `u64`.
#[cold]
#[inline(never)]
pub(super) fn overflow(meter: Name) -> Error {
    Error::Overflow {
        meter: meter.as_str().to_owned(),
    }
}

/// Add every op's delta to its counter's usage (checked not to overflow).
pub(super) fn add_usage(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    shards: &[usize],
    runs: &[usize],
    at: &mut [(KeyId, usize)],
    now_ms: i64,
) {
    let mut i = 0;
    for &end in runs {
        add_run(
            locked.shard(shards[i]),
            ops[i].scope,
            &ops[i..end],
            &mut at[i..end],
            now_ms,
        );
        i = end;
    }
}

/// [`add_usage`] for one run of ops on `scope`.
pub(super) fn add_run(
    sh: &mut Shard,
    scope: &ScopeKey,
    ops: &[CounterOp<'_>],
    at: &mut [(KeyId, usize)],
    now_ms: i64,
) {
    // Phase 1 found most counters: one lookup for the run.
    if let Some(list) = sh.scopes.get_mut(scope) {
        for (op, &(_, idx)) in ops.iter().zip(&*at) {
            if let (true, Some(c)) = (op.delta > 0, list.get_mut(idx)) {
                c.add(op.window, op.delta);
            }
        }
    }
    // Then the ones that are new.
    for (op, (key, idx)) in ops.iter().zip(at) {
        if op.delta == 0 || *idx != NONE {
            continue;
        }
        if let Some((x, c)) = sh.counter_or_new(scope, *key, op.window, now_ms) {
            *idx = x;
            c.add(op.window, op.delta);
        }
    }
}

/// Phases 2 and 3 of a batch of counter ops only: [`add_usage`] (if
/// `applied`, its counters already rolled), then
/// [`report`](super::report::report) into `counters`, with one
/// counter lookup a run where both would take one. A run's report reads only
/// its own ops' counters, so each run can be reported as soon as it is added
/// to. A batch that did not apply with a counter due a roll is reported by
/// [`report_views`] instead.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub(super) fn add_and_report(
    locked: &mut Locked<'_>,
    ops: &[CounterOp<'_>],
    op_shards: &[usize],
    runs: &[usize],
    op_at: &mut [(KeyId, usize)],
    applied: bool,
    now_ms: i64,
    counters: &mut InlineVec<CounterState>,
) {
    let mut i = 0;
    for &end in runs {
        let sh = locked.shard(op_shards[i]);
        let scope = ops[i].scope;
        let (run, at) = (&ops[i..end], &mut op_at[i..end]);
        // A run that makes a counter takes `add_usage`'s steps first; the
        // usual run adds in the loop below, through the same lookup.
        let mut add = applied;
        if add
            && run
                .iter()
                .zip(&*at)
                .any(|(op, &(_, idx))| op.delta > 0 && idx == NONE)
        {
            add_run(sh, scope, run, at, now_ms);
            add = false;
        }
        let Shard { scopes, holds, .. } = sh;
        let list: &mut [Counter] = scopes.get_mut(scope).map_or(&mut [], |c| c);
        for (op, &(_, idx)) in run.iter().zip(&*at) {
            let mut counter = list.get_mut(idx);
            if let (true, Some(c)) = (add && op.delta > 0, &mut counter) {
                c.add(op.window, op.delta);
            }
            let counter = counter.map(|c| &*c);
            let held = counter.map_or(0, |c| held_in(holds, op.scope, c.key()));
            // As in `report`: once applied, the delta is in `used` or `held`.
            let delta = if applied { 0 } else { op.delta };
            counters.push(state_of(counter, held, op.window, now_ms, delta, op.max));
        }
        i = end;
    }
}

/// The most ops [`apply_run`] takes (its positions are a fixed array).
const RUN_OPS: usize = 16;

/// The three phases of a batch of at most [`RUN_OPS`] counter ops that all
/// name `scope`, on its shard `sh`, through one lookup of the scope's
/// counters: [`check_ops`]'s reads, then [`add_and_report`]'s adds and
/// states into `out`. Returns whether the batch applied, or `None`, having
/// written nothing, for a batch that must roll a counter, report views of
/// counters due a roll, or make a counter: [`finish_one_scope`] takes those.
#[inline]
fn apply_run(
    sh: &mut Shard,
    batch: &Batch<'_>,
    scope: &ScopeKey,
    out: &mut InlineVec<CounterState>,
) -> Result<Option<bool>, Error> {
    let (ops, now_ms) = (batch.ops, batch.now_ms);
    let Shard {
        keys,
        scopes,
        holds,
        ..
    } = sh;
    let list: &mut [Counter] = scopes.get_mut(scope).map_or(&mut [], |c| c);
    // Each op's counter position, `u32::MAX` for none: a fixed array of
    // one value, not an `Inline` of pairs (saves filling 256 bytes slot by
    // slot). A scope has at most 65,536 counters, one per key.
    let mut at = [u32::MAX; RUN_OPS];
    // Most shards hold nothing: tested once a batch, not in a call an op.
    let any_holds = !holds.is_empty();
    let (mut all_fit, mut due, mut new) = (true, false, false);
    let mut hint = 0;
    for (op, at) in ops.iter().zip(&mut at) {
        let key = if op.delta > 0 {
            Some(
                keys.intern(op.meter, op.window, hint)
                    .ok_or_else(keys_full)?,
            )
        } else {
            keys.find(op.meter, op.window, hint)
        };
        hint = key.map_or(0, |k| usize::from(k) + 1);
        let idx = key.and_then(|k| list.iter().position(|c| c.key() == k));
        let (used, held) = match idx.and_then(|x| list.get(x)) {
            Some(c) => {
                *at = idx.map_or(u32::MAX, |x| x as u32);
                let used = if c.current(op.window, now_ms) {
                    c.used()
                } else {
                    due = true;
                    c.used_at(op.window, now_ms)
                };
                let (held, expired) = if any_holds {
                    held_at(holds, scope, c.key(), now_ms)
                } else {
                    (0, false)
                };
                due |= expired;
                (used, held)
            }
            None => {
                new |= op.delta > 0;
                (0, 0)
            }
        };
        if used.checked_add(op.delta).is_none() && (batch.mode == Mode::Force || op.max.is_none()) {
            return Err(overflow(op.meter));
        }
        all_fit &= fits(used, held, op.delta, op.max);
    }
    let applied = match batch.mode {
        Mode::Check => false,
        Mode::WithinLimits => all_fit,
        Mode::Force => true,
    };
    if due || (applied && new) {
        return Ok(None);
    }
    for (op, &idx) in ops.iter().zip(&at) {
        let mut counter = list.get_mut(idx as usize);
        if let (true, Some(c)) = (applied && op.delta > 0, &mut counter) {
            c.add(op.window, op.delta);
        }
        let counter = counter.map(|c| &*c);
        // `any_holds`: no lookup an op in a shard that holds nothing.
        let held = match counter {
            Some(c) if any_holds => held_in(holds, scope, c.key()),
            _ => 0,
        };
        let delta = if applied { 0 } else { op.delta };
        out.push(state_of(counter, held, op.window, now_ms, delta, op.max));
    }
    Ok(Some(applied))
}

/// A one-scope batch that [`apply_run`] handed back, on its shard `id`
/// (nothing written yet): the compact path's steps, [`check_ops`] again
/// then phases 2 and 3 as [`MemoryStore::apply_counters`] takes them.
/// Returns whether the batch applied.
#[cold]
#[inline(never)]
fn finish_one_scope(
    locked: &mut Locked<'_>,
    batch: &Batch<'_>,
    id: usize,
    out: &mut InlineVec<CounterState>,
) -> Result<bool, Error> {
    let (ops, now_ms) = (batch.ops, batch.now_ms);
    let mut shards: SmallList<usize> = SmallList::new();
    for _ in ops {
        shards.push(id);
    }
    let shards = shards.as_slice();
    let mut op_at: SmallList<(KeyId, usize)> = SmallList::new();
    let mut runs: SmallList<usize> = SmallList::new();
    let fit = check_ops(locked, batch, shards, false, now_ms, &mut op_at, &mut runs)?;
    let applied = match batch.mode {
        Mode::Check => false,
        Mode::WithinLimits => fit.all,
        Mode::Force => true,
    };
    let (runs, at) = (runs.as_slice(), op_at.as_mut_slice());
    if fit.due {
        add_and_report_due(locked, ops, shards, runs, at, applied, now_ms, out);
    } else {
        add_and_report(locked, ops, shards, runs, at, applied, now_ms, out);
    }
    Ok(applied)
}
