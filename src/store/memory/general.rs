//! The general path of a batch: event ids, leases and cooldowns, in named
//! steps: the ledger, the lease, the locks, phase 1 (settle charges, ops,
//! cooldowns), phase 2 (the lease action or usage, then cooldowns), phase 3
//! (report), and the ledger entry.

use std::collections::hash_map::{Entry as MapEntry, VacantEntry};
use std::ops::ControlFlow;

use parking_lot::MutexGuard;

use super::apply::{add_usage, check_ops};
use smallvec::SmallVec;

use super::balance::{self, Balance, BalanceMap};
use super::holds::{add_to, held_by, settle_hold, BalanceRef, Counted, HoldRef, HoldRefs, Lease};
use super::keys::KeyId;
use super::ledger::{Entry, Ledger};
use super::report::{report, roll_ops};
use super::shard::{Locked, NONE};
use super::{LeaseMap, MemoryStore};
use crate::inline::SmallList;
use crate::store::validate::invalid;
use crate::store::{
    Applied, BalanceAction, Batch, Fraction, InlineVec, LeaseAction, LeaseId, Mode, SettledHold,
};
use crate::window::Window;
use crate::Error;

/// What settling a lease does to one of its holds.
pub(super) struct Charge {
    pub(super) shard: usize,
    pub(super) hold: HoldRef,
    /// The hold's counter (key and position), found once in phase 1.
    pub(super) at: Option<(KeyId, usize)>,
    pub(super) held: u64,
    pub(super) charged: u64,
}

/// What settling a lease does to each hold: inline for up to four holds,
/// saving an allocation per settlement.
pub(super) type Charges = SmallVec<[Charge; 4]>;

/// The lease a batch names, found under its shard's lock: the slot a lease
/// the batch opens goes in, or the live lease. Found once, so the id is
/// hashed once per batch (a lookup, then an insert or a second lookup,
/// before).
enum LeaseSlot<'g> {
    /// A batch with no lease (or a slot already used).
    Empty,
    Vacant(VacantEntry<'g, LeaseId, Lease>),
    Live(&'g mut Lease),
}

/// What the steps of one general batch read: the batch, its time, and the
/// counter shard of each op, cooldown and lease hold.
struct Step<'a, 'b> {
    batch: &'a Batch<'b>,
    now_ms: i64,
    op_shards: &'a [usize],
    cooldown_shards: &'a [usize],
    hold_shards: &'a [usize],
    lease_holds: &'a [HoldRef],
    lease_expires: i64,
}

/// Each op's key and counter position, and where each run of ops on one
/// scope ends (see [`check_ops`]).
struct Found {
    op_at: SmallList<(KeyId, usize)>,
    runs: SmallList<usize>,
}

impl MemoryStore {
    /// Any batch: event ids, leases, cooldowns and all.
    #[inline(never)]
    pub(super) fn apply_general(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let now_ms = batch.now_ms;
        // The ledger first (rule 8): a replay changes nothing.
        let ledger = match self.open_ledger(batch, now_ms)? {
            ControlFlow::Break(replay) => return Ok(replay),
            ControlFlow::Continue(ledger) => ledger,
        };
        // Then the lease (rule 7).
        // Filled in this frame, not moved out of calls: saves the copies.
        let mut lease_holds = HoldRefs::new();
        let mut lease_guard = batch
            .lease
            .map(|l| self.leases[self.side_index(&l.id)].lock());
        let (mut slot, lease_expires) =
            open_lease(lease_guard.as_deref_mut(), batch, now_ms, &mut lease_holds)?;

        // The balance the batch acts on: the one it names, or the one its
        // lease holds on (a renewal, a settlement naming none).
        let lease_balance = match &slot {
            LeaseSlot::Live(rec) => rec.balance.clone(),
            _ => None,
        };
        let target = balance_target(batch, lease_balance.as_ref())?;

        // Lock every counter shard the batch touches, in ascending order.
        let mut op_shards: SmallList<usize> = SmallList::new();
        for op in batch.ops {
            op_shards.push(self.shard_of(op.scope));
        }
        // Most batches have no cooldowns and no lease holds: skip the
        // (out of line) collect of an empty list.
        // Inline lists: saves two allocations per settlement.
        let mut cooldown_shards: SmallList<usize, 8> = SmallList::new();
        for c in batch.cooldowns {
            cooldown_shards.push(self.shard_of(c.scope));
        }
        let mut hold_shards: SmallList<usize, 8> = SmallList::new();
        for h in &lease_holds {
            hold_shards.push(self.shard_of(&h.scope));
        }
        let mut locked = self.lock_shards(
            op_shards
                .as_slice()
                .iter()
                .chain(&cooldown_shards)
                .chain(&hold_shards)
                .copied(),
        );
        let step = Step {
            batch,
            now_ms,
            op_shards: op_shards.as_slice(),
            cooldown_shards: cooldown_shards.as_slice(),
            hold_shards: hold_shards.as_slice(),
            lease_holds: &lease_holds,
            lease_expires,
        };

        // Phase 1: read every named counter as of now (rolling none), and
        // decide.
        let mut charges = Charges::new();
        step.settle_charges(&mut locked, &mut charges)?;
        let holding = matches!(
            batch.lease.map(|l| l.action),
            Some(LeaseAction::Open { .. } | LeaseAction::Grow)
        );
        let mut found = Found {
            op_at: SmallList::new(),
            runs: SmallList::new(),
        };
        let fit = check_ops(
            &mut locked,
            batch,
            step.op_shards,
            holding,
            now_ms,
            &mut found.op_at,
            &mut found.runs,
        )?;
        let (cool, mut cooling) = step.running_cooldowns(&mut locked);
        // The balance last (lock order: ledger, lease, counters, balance).
        let mut bal_guard = target
            .as_ref()
            .map(|b| self.balances[self.side_index(&b.scope)].lock());
        let bal_check = check_balance(bal_guard.as_deref(), target.as_ref(), &step)?;
        if let Some(replayed_at) = bal_check.replayed_at {
            // A grant already made: nothing changes.
            let state = bal_state(bal_guard.as_deref(), target.as_ref(), now_ms, true, 0);
            let mut result = Applied {
                applied: true,
                balance: state,
                ..Applied::default()
            };
            result.replayed_at_ms = Some(replayed_at);
            return Ok(result);
        }
        let applied = match batch.mode {
            Mode::Check => false,
            Mode::WithinLimits => fit.all && cool && bal_check.fits,
            Mode::Force => true,
        };

        // Phase 2: apply the whole batch, or nothing; only a batch that
        // applies rolls its counters (contract rule 2).
        let mut settled = Vec::new();
        let mut uncovered = 0;
        if applied {
            if fit.due {
                roll_ops(
                    &mut locked,
                    batch.ops,
                    step.op_shards,
                    found.runs.as_slice(),
                    found.op_at.as_slice(),
                    now_ms,
                );
            }
            settled = step.apply_lease(&mut locked, &mut slot, &mut charges, &mut found);
            step.start_cooldowns(&mut locked, &mut cooling);
            if let (Some(map), Some(b)) = (bal_guard.as_deref_mut(), target.as_ref()) {
                uncovered = step.apply_balance(balance::find_mut(map, &b.scope, b.meter));
            }
        }

        // Phase 3: report.
        let (op_at, runs) = (found.op_at.as_slice(), found.runs.as_slice());
        let mut result = Applied {
            applied,
            counters: InlineVec::new(),
            settled,
            cooldowns: cooling,
            replayed_at_ms: None,
            balance: match batch.balance {
                Some(_) => bal_state(
                    bal_guard.as_deref(),
                    target.as_ref(),
                    now_ms,
                    bal_check.fits,
                    uncovered,
                ),
                None => None,
            },
        };
        drop(bal_guard);
        report(
            &mut locked,
            batch.ops,
            step.op_shards,
            runs,
            op_at,
            applied,
            fit.due && !applied,
            now_ms,
            &mut result.counters,
        );
        let sweep_turn = locked.count_batch();
        drop(locked);
        drop(lease_guard);
        if let (Some(guard), true) = (ledger, applied) {
            record_event(guard, batch, &result, now_ms);
        }
        if let Some((first, k)) = sweep_turn {
            self.sweep_in_turn(first, k, now_ms);
        }
        Ok(result)
    }

    /// Lock the ledger shard of the batch's event id, if it has one: the
    /// answer to replay (`Break`), or the lock to record the batch under.
    ///
    /// # Errors
    /// [`Error::EventConflict`] for an id last applied to another batch.
    fn open_ledger(
        &self,
        batch: &Batch<'_>,
        now_ms: i64,
    ) -> Result<ControlFlow<Applied, Option<MutexGuard<'_, Ledger>>>, Error> {
        let Some(ev) = batch.event else {
            return Ok(ControlFlow::Continue(None));
        };
        let guard = self.ledger[self.side_index(ev.id)].lock();
        if let Some(e) = guard.get(ev.id) {
            if now_ms.saturating_sub(e.at_ms) < self.horizon_ms {
                if Some(e.fingerprint) != crate::store::event_fingerprint(batch) {
                    return Err(Error::EventConflict {
                        event: ev.id.to_owned(),
                    });
                }
                let mut replay = e.applied.clone();
                replay.replayed_at_ms = Some(e.at_ms);
                return Ok(ControlFlow::Break(replay));
            }
        }
        Ok(ControlFlow::Continue(Some(guard)))
    }
}

/// Find the lease the batch names in its shard's table `leases` (locked;
/// `None` for a batch with no lease): absent for one the batch opens, live
/// for any other action. Returns its slot and, for a live lease, its expiry
/// (0 for one the batch opens), and copies its counters into `holds`.
///
/// # Errors
/// [`Error::InvalidBatch`] to open a lease that is open;
/// [`Error::UnknownReservation`], [`Error::ReservationSettled`] or
/// [`Error::ReservationExpired`] for any other action on a lease that is
/// not live or not the owner's.
fn open_lease<'g>(
    leases: Option<&'g mut LeaseMap>,
    batch: &Batch<'_>,
    now_ms: i64,
    holds: &mut HoldRefs,
) -> Result<(LeaseSlot<'g>, i64), Error> {
    let (Some(l), Some(leases)) = (batch.lease, leases) else {
        return Ok((LeaseSlot::Empty, 0));
    };
    let id = || l.id.to_string();
    if let LeaseAction::Open { .. } = l.action {
        return match leases.entry(l.id) {
            MapEntry::Occupied(_) => Err(invalid(format!("lease {} is already open", l.id))),
            MapEntry::Vacant(v) => Ok((LeaseSlot::Vacant(v), 0)),
        };
    }
    match leases.get_mut(&l.id) {
        None => Err(Error::UnknownReservation { id: id() }),
        Some(rec) if rec.owner != *l.owner => Err(Error::UnknownReservation { id: id() }),
        Some(rec) if rec.settled => Err(Error::ReservationSettled { id: id() }),
        Some(rec) if now_ms >= rec.expires_ms => {
            // Counted once: the engine counts this call's find only if no
            // call or sweep counted the expiry before.
            let counted = std::mem::replace(&mut rec.expiry_counted.0, true);
            crate::telemetry::lease_found_expired(!counted);
            Err(Error::ReservationExpired { id: id() })
        }
        Some(rec) => {
            holds.extend(rec.holds.iter().cloned());
            let expires = rec.expires_ms;
            Ok((LeaseSlot::Live(rec), expires))
        }
    }
}

impl Step<'_, '_> {
    /// For a batch that settles its lease: what each hold held and what it
    /// charges, its counter read as of now (rolled only once the batch
    /// applies, in [`Step::settle`]).
    ///
    /// # Errors
    /// [`Error::Overflow`] when usage plus a charge (and the batch's own
    /// delta on that counter) would pass a `u64` (rule 4).
    fn settle_charges(&self, locked: &mut Locked<'_>, charges: &mut Charges) -> Result<(), Error> {
        let (Some(l), Some(LeaseAction::Settle { keep })) =
            (self.batch.lease, self.batch.lease.map(|l| l.action))
        else {
            return Ok(());
        };
        for (h, &shard) in self.lease_holds.iter().zip(self.hold_shards) {
            let sh = locked.shard(shard);
            // One lookup of the scope's counters serves the hold's position
            // (kept for phase 2) and its usage.
            let counters = sh.scopes.get(&h.scope).map_or(&[][..], |cs| &cs[..]);
            let found = sh.keys.find(h.meter, h.window, 0).and_then(|key| {
                let idx = counters.iter().position(|c| c.key() == key)?;
                Some((key, idx, counters[idx].used_now(h.window, self.now_ms)))
            });
            let at = found.map(|(key, idx, _)| (key, idx));
            let (held, used) = match found {
                Some((key, _, used)) => (
                    // The lease is live, so its own hold has not expired.
                    held_by(&sh.holds, &h.scope, key, l.id, self.lease_expires),
                    used,
                ),
                None => (0, 0),
            };
            let charged = if h.window == Window::Concurrent {
                0
            } else {
                keep_of(keep, held)
            };
            let also = self
                .batch
                .ops
                .iter()
                .find(|o| o.meter == h.meter && o.window == h.window && *o.scope == h.scope)
                .map_or(0, |o| o.delta);
            if used
                .checked_add(charged)
                .and_then(|u| u.checked_add(also))
                .is_none()
            {
                return Err(Error::Overflow {
                    meter: h.meter.to_string(),
                });
            }
            charges.push(Charge {
                shard,
                hold: h.clone(),
                at,
                held,
                charged,
            });
        }
        Ok(())
    }

    /// Each cooldown's end if it still runs at now, and whether none does.
    fn running_cooldowns(&self, locked: &mut Locked<'_>) -> (bool, InlineVec<Option<i64>>) {
        let mut none_runs = true;
        let mut cooling = InlineVec::new();
        for (c, &shard) in self.batch.cooldowns.iter().zip(self.cooldown_shards) {
            let until = locked
                .shard(shard)
                .cooldowns
                .get(c.scope)
                .copied()
                .filter(|&u| u > self.now_ms);
            none_runs &= until.is_none();
            cooling.push(until);
        }
        (none_runs, cooling)
    }

    /// Phase 2 for the ops and the lease: open, renew, grow or settle it, or
    /// add the ops' usage for a batch with no lease. Returns what settling
    /// did to each hold.
    fn apply_lease(
        &self,
        locked: &mut Locked<'_>,
        slot: &mut LeaseSlot<'_>,
        charges: &mut Charges,
        found: &mut Found,
    ) -> Vec<SettledHold> {
        let Some(l) = self.batch.lease else {
            self.add_ops(locked, found);
            return Vec::new();
        };
        match l.action {
            LeaseAction::Open {
                expires_at_ms: expires_ms,
                deadline_ms,
            } => {
                let holds = self.hold_ops(locked, found, l.id, expires_ms, &[]);
                if let LeaseSlot::Vacant(v) = std::mem::replace(slot, LeaseSlot::Empty) {
                    v.insert(Lease {
                        owner: l.owner.clone(),
                        opened_ms: self.now_ms,
                        expires_ms,
                        deadline_ms,
                        settled: false,
                        expiry_counted: Counted(false),
                        holds,
                        balance: self.holding_balance(),
                    });
                }
            }
            LeaseAction::Renew {
                expires_at_ms: new_ms,
            } => {
                for (h, &shard) in self.lease_holds.iter().zip(self.hold_shards) {
                    let sh = locked.shard(shard);
                    if let Some((key, idx)) = sh.find(&h.scope, h.meter, h.window) {
                        // A renewal writes the lease's counters: rolled.
                        sh.advance(&h.scope, idx, h.window, self.now_ms);
                        let amount = sh.remove_hold(&h.scope, key, l.id, self.lease_expires);
                        if amount > 0 {
                            sh.add_hold(&h.scope, key, l.id, new_ms, amount);
                        }
                    }
                }
                if let LeaseSlot::Live(rec) = slot {
                    rec.expires_ms = new_ms;
                }
            }
            LeaseAction::Grow => {
                let added =
                    self.hold_ops(locked, found, l.id, self.lease_expires, self.lease_holds);
                if let LeaseSlot::Live(rec) = slot {
                    rec.holds.extend(added);
                    if rec.balance.is_none() {
                        rec.balance = self.holding_balance();
                    }
                }
            }
            LeaseAction::Settle { .. } => {
                let settled = self.settle(locked, l.id, charges);
                self.add_ops(locked, found);
                if let LeaseSlot::Live(rec) = slot {
                    rec.settled = true;
                    // Freed now, not when the ended lease is swept.
                    rec.holds = Vec::new();
                }
                return settled;
            }
        }
        Vec::new()
    }

    /// Add every op's delta to its counter's usage.
    fn add_ops(&self, locked: &mut Locked<'_>, found: &mut Found) {
        add_usage(
            locked,
            self.batch.ops,
            self.op_shards,
            found.runs.as_slice(),
            found.op_at.as_mut_slice(),
            self.now_ms,
        );
    }

    /// Hold every op's delta under lease `id` until `expires_ms`, making
    /// counters where needed. Returns the counters held that `known` does
    /// not list.
    fn hold_ops(
        &self,
        locked: &mut Locked<'_>,
        found: &mut Found,
        id: LeaseId,
        expires_ms: i64,
        known: &[HoldRef],
    ) -> Vec<HoldRef> {
        // Sized for the batch when the lease is new (every op is added):
        // one allocation, no growth.
        let mut added = Vec::with_capacity(if known.is_empty() {
            self.batch.ops.len()
        } else {
            0
        });
        let ops = self.batch.ops;
        let mut start = 0;
        for &end in found.runs.as_slice() {
            // A run's ops share a scope and a shard.
            let (scope, sh) = (ops[start].scope, locked.shard(self.op_shards[start]));
            let (run, at) = (
                &ops[start..end],
                &mut found.op_at.as_mut_slice()[start..end],
            );
            start = end;
            for (op, (key, idx)) in run.iter().zip(at.iter_mut()) {
                // A counter phase 1 found is not looked up again.
                if op.delta > 0 && *idx == NONE {
                    if let Some((i, _)) = sh.counter_or_new(op.scope, *key, op.window, self.now_ms)
                    {
                        *idx = i;
                    }
                }
            }
            if !run
                .iter()
                .zip(at.iter())
                .any(|(op, &(_, idx))| op.delta > 0 && idx != NONE)
            {
                continue;
            }
            // The scope's holds looked up once per run, not once per op
            // (made only here, for a hold about to be added).
            let list = match sh.holds.get_mut(scope) {
                Some(list) => list,
                // Sized for the run: one allocation, no growth.
                None => sh
                    .holds
                    .entry(scope.clone())
                    .or_insert_with(|| Vec::with_capacity(run.len())),
            };
            for (op, &(key, idx)) in run.iter().zip(at.iter()) {
                if op.delta == 0 || idx == NONE {
                    continue;
                }
                add_to(list, key, id, expires_ms, op.delta);
                let listed = known
                    .iter()
                    .any(|h| h.meter == op.meter && h.window == op.window && h.scope == *op.scope);
                if !listed {
                    added.push(HoldRef {
                        scope: op.scope.clone(),
                        meter: op.meter,
                        window: op.window,
                    });
                }
            }
        }
        added
    }

    /// Settle lease `id`: drop each hold and charge its counter.
    fn settle(
        &self,
        locked: &mut Locked<'_>,
        id: LeaseId,
        charges: &mut Charges,
    ) -> Vec<SettledHold> {
        let mut settled = Vec::with_capacity(charges.len());
        for ch in charges.drain(..) {
            let sh = locked.shard(ch.shard);
            let (scope, window) = (&ch.hold.scope, ch.hold.window);
            if let Some((key, idx)) = ch.at {
                // The counter rolled and charged in one lookup, its holds
                // expired and this lease's removed in one visit.
                if let Some(c) = sh.scopes.get_mut(scope).and_then(|l| l.get_mut(idx)) {
                    if let Some(closed) = c.advance(window, self.now_ms) {
                        sh.history
                            .keep(scope, ch.hold.meter, window, closed, self.now_ms);
                    }
                    c.add(window, ch.charged);
                }
                settle_hold(
                    &mut sh.holds,
                    scope,
                    key,
                    id,
                    self.lease_expires,
                    self.now_ms,
                );
            }
            settled.push(SettledHold::new(
                ch.hold.scope,
                ch.hold.meter,
                ch.hold.window,
                ch.held,
                ch.charged,
            ));
        }
        settled
    }

    /// Start the batch's cooldowns (a running one only ever lengthens), and
    /// note each one's end in `cooling`.
    fn start_cooldowns(&self, locked: &mut Locked<'_>, cooling: &mut [Option<i64>]) {
        for ((c, &shard), until) in self
            .batch
            .cooldowns
            .iter()
            .zip(self.cooldown_shards)
            .zip(cooling)
        {
            if let Some(t) = c.start_until_ms {
                let e = locked
                    .shard(shard)
                    .cooldowns
                    .entry(c.scope.clone())
                    .or_insert(t);
                *e = (*e).max(t);
                if *e > self.now_ms {
                    *until = Some(*e);
                }
            }
        }
    }
}

/// Remember an applied batch under its event id.
fn record_event(
    mut guard: MutexGuard<'_, Ledger>,
    batch: &Batch<'_>,
    result: &Applied,
    now_ms: i64,
) {
    if let Some(ev) = batch.event {
        guard.insert(
            Box::from(ev.id),
            Entry {
                fingerprint: crate::store::event_fingerprint(batch).unwrap_or(ev.fingerprint),
                at_ms: now_ms,
                applied: result.clone(),
            },
        );
    }
}

pub(super) fn keep_of(keep: Fraction, held: u64) -> u64 {
    keep.ceil_of(held)
}

/// Contract rule 10 for one batch, found in phase 1: whether its debit fits,
/// and whether its grant was made before (a replay).
struct BalanceCheck {
    fits: bool,
    replayed_at: Option<i64>,
}

/// The balance a batch acts on: the one it names, else the one its live
/// lease holds on.
///
/// # Errors
/// [`Error::InvalidBatch`] when the batch names another balance than its
/// lease holds on.
fn balance_target(
    batch: &Batch<'_>,
    lease_balance: Option<&BalanceRef>,
) -> Result<Option<BalanceRef>, Error> {
    match (batch.balance, lease_balance) {
        (Some(b), Some(l)) if *b.scope != l.scope || b.meter != l.meter => Err(invalid(
            "a lease holds on one balance: the batch names another",
        )),
        (Some(b), _) => Ok(Some(BalanceRef {
            scope: b.scope.clone(),
            meter: b.meter,
        })),
        (None, l) => Ok(l.cloned()),
    }
}

/// Phase 1 of rule 10: the debit's fit, a grant's replay or conflict, and
/// overflow of holds — before anything changes.
///
/// # Errors
/// [`Error::GrantConflict`], or [`Error::Overflow`] for grants or holds
/// past a `u64`.
fn check_balance(
    map: Option<&BalanceMap>,
    target: Option<&BalanceRef>,
    step: &Step<'_, '_>,
) -> Result<BalanceCheck, Error> {
    let mut out = BalanceCheck {
        fits: true,
        replayed_at: None,
    };
    let (Some(map), Some(b), Some(op)) = (map, target, step.batch.balance) else {
        return Ok(out);
    };
    let empty = Balance::default();
    let bal = balance::find(map, &b.scope, b.meter).unwrap_or(&empty);
    match op.action {
        BalanceAction::Grant(g) => out.replayed_at = bal.check_grant(&g, b.meter)?,
        BalanceAction::Debit { amount, .. } => {
            let holding = matches!(
                step.batch.lease.map(|l| l.action),
                Some(LeaseAction::Open { .. } | LeaseAction::Grow)
            );
            if holding && bal.holds.total.checked_add(amount).is_none() {
                return Err(Error::Overflow {
                    meter: b.meter.to_string(),
                });
            }
            if step.batch.mode != Mode::Force {
                out.fits = bal.fits(amount, step.now_ms);
            }
        }
    }
    Ok(out)
}

/// The batch's balance as it reports it.
fn bal_state(
    map: Option<&BalanceMap>,
    target: Option<&BalanceRef>,
    now_ms: i64,
    fits: bool,
    uncovered: u64,
) -> Option<Box<crate::store::BalanceState>> {
    let b = target?;
    let empty = Balance::default();
    let bal = map
        .and_then(|m| balance::find(m, &b.scope, b.meter))
        .unwrap_or(&empty);
    Some(Box::new(bal.state(now_ms, fits, uncovered)))
}

impl Step<'_, '_> {
    /// The balance a lease this batch opens or grows holds on.
    fn holding_balance(&self) -> Option<BalanceRef> {
        match self.batch.balance? {
            b @ crate::store::BalanceOp {
                action: BalanceAction::Debit { amount, .. },
                ..
            } if amount > 0 => Some(BalanceRef {
                scope: b.scope.clone(),
                meter: b.meter,
            }),
            _ => None,
        }
    }

    /// Phase 2 of rule 10 on the batch's balance; returns what was left
    /// uncovered.
    fn apply_balance(&self, bal: &mut Balance) -> u64 {
        bal.touch(self.now_ms);
        let (amount, overdraft, grant) = match self.batch.balance.map(|b| b.action) {
            Some(BalanceAction::Debit { amount, overdraft }) => (amount, overdraft, None),
            Some(BalanceAction::Grant(g)) => (0, 0, Some(g)),
            None => (0, 0, None),
        };
        if let Some(g) = grant {
            bal.add_grant(&g, self.now_ms);
            return 0;
        }
        match self.batch.lease.map(|l| (l.id, l.action)) {
            None => bal.consume(amount, overdraft, self.now_ms),
            Some((id, LeaseAction::Open { expires_at_ms, .. })) => {
                bal.hold(id, expires_at_ms, amount);
                0
            }
            Some((id, LeaseAction::Grow)) => {
                bal.hold(id, self.lease_expires, amount);
                0
            }
            Some((id, LeaseAction::Renew { expires_at_ms })) => {
                let held = bal.holds.remove(id, self.lease_expires);
                bal.hold(id, expires_at_ms, held);
                0
            }
            Some((id, LeaseAction::Settle { keep })) => {
                let held = bal.holds.remove(id, self.lease_expires);
                let kept = keep_of(keep, held);
                // Capped, as PostgreSQL's numeric answer is: the two may pass a u64.
                bal.consume(kept, overdraft, self.now_ms)
                    .saturating_add(bal.consume(amount, overdraft, self.now_ms))
            }
        }
    }
}
