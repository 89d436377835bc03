//! A batch whose keys span Redis Cluster slots (a subject and a shared
//! pool): one script call per slot, ordered so that no call admits what
//! another could refuse.
//!
//! - `Check`: each slot read; nothing changes.
//! - `Force` without a lease (`record`): each slot applies its part; the
//!   event is kept in every slot, so a retry after a failure midway
//!   applies only the parts that had not applied.
//! - `WithinLimits` without a lease (`admit`): phase 1 opens a lease on
//!   each slot holding that slot's deltas (a hold counts toward every
//!   maximum, so two decisions never both fit the same room); if every
//!   slot held, phase 2 settles each lease keeping all of its hold as
//!   usage; if one refused, the others are released. A failure midway
//!   leaves only holds, which expire ([`HOLD_MS`]).
//! - A lease opened across slots (`reserve` with a pool) has a lease
//!   record on each slot; its owner's record lists the others (field
//!   `sp`), and renew and settle visit them all. A grow across slots is
//!   refused ([`Error::CrossSlot`]): its holds could not be taken back.
//! - A prepaid balance goes with the part of its slot: held with the
//!   deltas in an admit's phase 1 and consumed by its settlement, held
//!   under a reservation's lease there. A grant spanning slots (its
//!   cooldowns elsewhere) is refused ([`Error::CrossSlot`]).

use crate::store::{
    Applied, BalanceAction, Batch, CooldownOp, CounterOp, Fraction, InlineVec, LeaseAction,
    LeaseId, LeaseOp, Mode,
};
use crate::Error;

use super::apply::Digests;
use super::RedisStore;

/// How long a phase-1 hold lives past the batch's time if the decision
/// never settles it. Engine clocks must be within this of Redis's on
/// `TimeSource::Server`.
pub(super) const HOLD_MS: i64 = 60_000;

/// One slot's part of a batch.
struct Part {
    home: String,
    ops: Vec<usize>,
    cools: Vec<usize>,
    /// Whether the batch's balance is in this slot.
    bal: bool,
}

/// The parts of a batch by slot, the home slot's first; `extra` are more
/// scopes (by digest) whose slots must be visited (a lease's other slots).
fn parts(store: &RedisStore, digests: &Digests, extra: &[String]) -> Vec<Part> {
    fn at(store: &RedisStore, parts: &mut Vec<(u16, Part)>, d: &str) -> usize {
        let slot = store.layout.slot(d);
        if let Some(i) = parts.iter().position(|(s, _)| *s == slot) {
            return i;
        }
        parts.push((
            slot,
            Part {
                home: d.to_owned(),
                ops: Vec::new(),
                cools: Vec::new(),
                bal: false,
            },
        ));
        parts.len() - 1
    }
    let mut parts: Vec<(u16, Part)> = Vec::new();
    at(store, &mut parts, &digests.home);
    for (i, d) in digests.ops.iter().enumerate() {
        let p = at(store, &mut parts, d);
        parts[p].1.ops.push(i);
    }
    for (i, d) in digests.cools.iter().enumerate() {
        let p = at(store, &mut parts, d);
        parts[p].1.cools.push(i);
    }
    if let Some(d) = &digests.bal {
        let p = at(store, &mut parts, d);
        parts[p].1.bal = true;
    }
    for d in extra {
        at(store, &mut parts, d);
    }
    parts.into_iter().map(|(_, p)| p).collect()
}

/// A part's ops and cooldowns, copied out of the batch (`delta_zero`: the
/// ops report their counters and add nothing).
fn pieces<'a>(
    batch: &Batch<'a>,
    part: &Part,
    delta_zero: bool,
    start_cooldowns: bool,
) -> (Vec<CounterOp<'a>>, Vec<CooldownOp<'a>>) {
    let ops = part
        .ops
        .iter()
        .map(|&i| {
            let mut op = batch.ops[i];
            if delta_zero {
                op.delta = 0;
            }
            op
        })
        .collect();
    let cools = part
        .cools
        .iter()
        .map(|&i| {
            let c = batch.cooldowns[i];
            if start_cooldowns {
                c
            } else {
                CooldownOp::new(c.scope, None)
            }
        })
        .collect();
    (ops, cools)
}

fn sub_digests(digests: &Digests, part: &Part) -> Digests {
    Digests {
        ops: part.ops.iter().map(|&i| digests.ops[i].clone()).collect(),
        cools: part
            .cools
            .iter()
            .map(|&i| digests.cools[i].clone())
            .collect(),
        owner: digests.owner.clone(),
        bal: if part.bal { digests.bal.clone() } else { None },
        home: part.home.clone(),
    }
}

/// The whole batch's answer from its parts' answers, in op order.
fn merge(batch: &Batch<'_>, parts: &[Part], answers: &[Applied], replayed: Option<i64>) -> Applied {
    let mut counters = InlineVec::new();
    let mut cooldowns = InlineVec::new();
    let mut by_op = vec![None; batch.ops.len()];
    let mut by_cool = vec![None; batch.cooldowns.len()];
    let mut settled = Vec::new();
    for (part, a) in parts.iter().zip(answers) {
        for (k, &i) in part.ops.iter().enumerate() {
            by_op[i] = a.counters.get(k).copied();
        }
        for (k, &i) in part.cools.iter().enumerate() {
            by_cool[i] = a.cooldowns.get(k).copied();
        }
        settled.extend(a.settled.iter().cloned());
    }
    for s in by_op {
        counters.push(s.unwrap_or_default());
    }
    for c in by_cool {
        cooldowns.push(c.flatten());
    }
    let balance = parts
        .iter()
        .zip(answers)
        .find(|(p, _)| p.bal)
        .and_then(|(_, a)| a.balance.clone());
    Applied {
        applied: answers.iter().all(|a| a.applied),
        counters,
        settled,
        cooldowns,
        replayed_at_ms: replayed,
        balance,
    }
}

/// The part's sub-batch with the batch's balance, if it is in the part's
/// slot; `amount_zero`: a debit that only reports (and takes the
/// overdraft) where the part's lease already holds the amount.
fn with_bal<'a>(sub: Batch<'a>, batch: &Batch<'a>, part: &Part, amount_zero: bool) -> Batch<'a> {
    match batch.balance {
        Some(mut b) if part.bal => {
            if let (true, BalanceAction::Debit { overdraft, .. }) = (amount_zero, b.action) {
                b.action = BalanceAction::Debit {
                    amount: 0,
                    overdraft,
                };
            }
            sub.with_balance(b)
        }
        _ => sub,
    }
}

/// An error after some part applied: the batch applied in part, so its
/// outcome is not "nothing changed".
fn partly(batch: &Batch<'_>, e: Error) -> Error {
    match e {
        Error::Store { message } | Error::StoreOutcomeUnknown { message, .. } => {
            Error::StoreOutcomeUnknown {
                message: format!("{message} (after part of a batch spanning slots applied)"),
                event: batch.event.map(|e| e.id.to_owned()),
            }
        }
        e => e,
    }
}

impl RedisStore {
    pub(super) async fn apply_spanning(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        extra: &[String],
    ) -> Result<Applied, Error> {
        if let Some(BalanceAction::Grant(_)) = batch.balance.map(|b| b.action) {
            return Err(Error::CrossSlot {
                reason: "a grant whose cooldowns are in another cluster slot than its balance"
                    .into(),
            });
        }
        let parts = parts(self, digests, extra);
        match batch.lease.map(|l| l.action) {
            _ if batch.mode == Mode::Check => self.span_each(batch, digests, &parts, true).await,
            None if batch.mode == Mode::Force => {
                self.span_each(batch, digests, &parts, false).await
            }
            None => self.span_admit(batch, digests, &parts).await,
            Some(LeaseAction::Open { .. }) => self.span_open(batch, digests, &parts).await,
            Some(LeaseAction::Renew { .. } | LeaseAction::Settle { .. }) => {
                self.span_lease(batch, digests, &parts, extra).await
            }
            Some(_) => Err(Error::CrossSlot {
                reason: "a grow whose holds span cluster slots (a subject and a pool)".into(),
            }),
        }
    }

    /// Each part on its own: a check (`check`: in `Mode::Check`, the event
    /// only consulted), or a forced batch (the event kept in every part).
    async fn span_each(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        parts: &[Part],
        check: bool,
    ) -> Result<Applied, Error> {
        let mut answers = Vec::with_capacity(parts.len());
        for part in parts {
            let (ops, cools) = pieces(batch, part, false, true);
            let mode = if check { Mode::Check } else { batch.mode };
            let mut sub = Batch::new(&ops, mode, batch.now_ms).with_cooldowns(&cools);
            sub = with_bal(sub, batch, part, false);
            sub.event = batch.event;
            let r = self
                .apply_one(&sub, &sub_digests(digests, part), check)
                .await;
            match r {
                Ok(a) => answers.push(a),
                Err(e) if answers.iter().any(|a: &Applied| a.applied) => {
                    return Err(partly(batch, e))
                }
                Err(e) => return Err(e),
            }
        }
        let replayed = answers.first().and_then(|a| a.replayed_at_ms);
        Ok(merge(batch, parts, &answers, replayed))
    }

    /// `WithinLimits` across slots: hold on each, then settle each.
    async fn span_admit(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        parts: &[Part],
    ) -> Result<Applied, Error> {
        let id = LeaseId::random();
        // The phase-1 leases' owner: any scope of the batch will do.
        let Some(owner) = batch
            .ops
            .first()
            .map(|o| o.scope)
            .or_else(|| batch.balance.map(|b| b.scope))
            .or_else(|| batch.cooldowns.first().map(|c| c.scope))
        else {
            return Err(Error::CrossSlot {
                reason: "an admit naming no scope".into(),
            });
        };
        let open = LeaseOp::new(
            id,
            owner,
            LeaseAction::Open {
                expires_at_ms: batch.now_ms.saturating_add(HOLD_MS),
                deadline_ms: None,
            },
        );
        // Phase 1: hold. The event is consulted (a part already applied
        // replays) but not written.
        let mut held: Vec<Option<Applied>> = Vec::with_capacity(parts.len());
        let mut refused = false;
        for part in parts {
            let (ops, cools) = pieces(batch, part, false, false);
            let mut sub = Batch::new(&ops, Mode::WithinLimits, batch.now_ms)
                .with_cooldowns(&cools)
                .with_lease(open);
            // The debit is held, as the ops' deltas are.
            sub = with_bal(sub, batch, part, false);
            sub.event = batch.event;
            match self
                .apply_one(&sub, &sub_digests(digests, part), true)
                .await
            {
                Ok(a) if a.replayed_at_ms.is_some() => held.push(Some(a)),
                Ok(a) => {
                    refused |= !a.applied;
                    held.push(Some(a));
                    if refused {
                        break;
                    }
                }
                Err(e) => {
                    self.release(batch, digests, parts, &held, id, owner).await;
                    return Err(match e {
                        Error::StoreOutcomeUnknown { message, .. } => Error::Store {
                            message: format!("{message} (only holds were placed; they expire)"),
                        },
                        e => e,
                    });
                }
            }
        }
        if refused {
            let released = self.release(batch, digests, parts, &held, id, owner).await;
            let answers: Vec<Applied> = held
                .into_iter()
                .zip(released)
                .map(|(h, r)| match h {
                    Some(h) if !h.applied || h.replayed_at_ms.is_some() => h,
                    _ => r.unwrap_or_default(),
                })
                .collect();
            let used = &parts[..answers.len()];
            let mut out = merge(batch, used, &answers, None);
            out.applied = false;
            // Parts never reached report what a check reads.
            if answers.len() < parts.len() {
                let rest = self
                    .span_each(batch, digests, &parts[answers.len()..], true)
                    .await
                    .ok();
                if let Some(rest) = rest {
                    let idx: Vec<usize> = parts[answers.len()..]
                        .iter()
                        .flat_map(|p| p.ops.clone())
                        .collect();
                    for i in idx {
                        out.counters[i] = rest.counters[i];
                    }
                    if out.balance.is_none() {
                        out.balance = rest.balance;
                    }
                }
            }
            return Ok(out);
        }
        // Phase 2: settle each hold, keeping all of it; the event is kept
        // in every part, so a retry replays the parts that settled.
        let mut answers = Vec::with_capacity(parts.len());
        for (part, h) in parts.iter().zip(&held) {
            if let Some(h) = h.as_ref().filter(|h| h.replayed_at_ms.is_some()) {
                answers.push(h.clone());
                continue;
            }
            let (ops, cools) = pieces(batch, part, true, true);
            let settle = LeaseOp::new(
                id,
                owner,
                LeaseAction::Settle {
                    keep: Fraction::ONE,
                },
            );
            let mut sub = Batch::new(&ops, Mode::Force, batch.now_ms)
                .with_cooldowns(&cools)
                .with_lease(settle);
            // Settling keeps all of the held debit: consumed.
            sub = with_bal(sub, batch, part, true);
            sub.event = batch.event;
            match self
                .apply_one(&sub, &sub_digests(digests, part), false)
                .await
            {
                Ok(mut a) => {
                    a.settled.clear();
                    answers.push(a);
                }
                Err(e) => return Err(partly(batch, e)),
            }
        }
        let replayed = answers
            .iter()
            .all(|a| a.replayed_at_ms.is_some())
            .then(|| answers[0].replayed_at_ms)
            .flatten();
        let mut out = merge(batch, parts, &answers, replayed);
        out.applied = true;
        Ok(out)
    }

    /// Give back phase-1 holds (best effort: a hold not given back
    /// expires). Each part's answer after its release, if it had held.
    async fn release(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        parts: &[Part],
        held: &[Option<Applied>],
        id: LeaseId,
        owner: &crate::store::ScopeKey,
    ) -> Vec<Option<Applied>> {
        let mut out = Vec::with_capacity(held.len());
        for (part, h) in parts.iter().zip(held) {
            let holds = h
                .as_ref()
                .is_some_and(|h| h.applied && h.replayed_at_ms.is_none());
            if !holds {
                out.push(None);
                continue;
            }
            let (ops, _) = pieces(batch, part, true, false);
            let release = LeaseOp::new(
                id,
                owner,
                LeaseAction::Settle {
                    keep: Fraction::ZERO,
                },
            );
            let sub = with_bal(
                Batch::new(&ops, Mode::Force, batch.now_ms).with_lease(release),
                batch,
                part,
                true,
            );
            out.push(
                self.apply_one(&sub, &sub_digests(digests, part), false)
                    .await
                    .ok()
                    .map(|mut a| {
                        a.applied = false;
                        a.settled.clear();
                        a
                    }),
            );
        }
        out
    }

    /// A lease opened across slots: the same lease id on each slot, the
    /// deadline on its owner's; the owner's record lists the other slots.
    async fn span_open(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        parts: &[Part],
    ) -> Result<Applied, Error> {
        let Some(lease) = batch.lease else {
            return Err(Error::CrossSlot {
                reason: "no lease".into(),
            });
        };
        let LeaseAction::Open { expires_at_ms, .. } = lease.action else {
            return Err(Error::CrossSlot {
                reason: "no lease".into(),
            });
        };
        let mut held: Vec<Option<Applied>> = Vec::with_capacity(parts.len());
        let mut refused = false;
        for (k, part) in parts.iter().enumerate() {
            let (ops, cools) = pieces(batch, part, false, false);
            // The owner's part (the first) keeps the deadline.
            let action = if k == 0 {
                lease.action
            } else {
                LeaseAction::Open {
                    expires_at_ms,
                    deadline_ms: None,
                }
            };
            let sub = with_bal(
                Batch::new(&ops, batch.mode, batch.now_ms)
                    .with_cooldowns(&cools)
                    .with_lease(LeaseOp::new(lease.id, lease.owner, action)),
                batch,
                part,
                false,
            );
            match self
                .apply_one(&sub, &sub_digests(digests, part), false)
                .await
            {
                Ok(a) => {
                    refused |= !a.applied;
                    held.push(Some(a));
                    if refused {
                        break;
                    }
                }
                Err(e) => {
                    self.release(batch, digests, parts, &held, lease.id, lease.owner)
                        .await;
                    return Err(e);
                }
            }
        }
        if !refused {
            let others: Vec<&str> = parts[1..].iter().map(|p| p.home.as_str()).collect();
            let key = self.layout.lease(&parts[0].home, &lease.id.to_string());
            let set = redis::cmd("HSET")
                .arg(&key)
                .arg("sp")
                .arg(others.join(" "))
                .clone();
            let r: Result<i64, Error> = tokio::time::timeout(self.timeout, self.conn.query(&set))
                .await
                .map_err(|_| super::encode::unanswered(self.timeout))
                .and_then(|r| r.map_err(super::encode::call_error));
            if let Err(e) = r {
                self.release(batch, digests, parts, &held, lease.id, lease.owner)
                    .await;
                return Err(partly(batch, e));
            }
            let answers: Vec<Applied> = held.into_iter().flatten().collect();
            return Ok(merge(batch, parts, &answers, None));
        }
        let released = self
            .release(batch, digests, parts, &held, lease.id, lease.owner)
            .await;
        let answers: Vec<Applied> = held
            .into_iter()
            .zip(released)
            .map(|(h, r)| match (h, r) {
                (_, Some(r)) => r,
                (Some(h), None) => h,
                (None, None) => Applied::default(),
            })
            .collect();
        let mut out = merge(batch, &parts[..answers.len()], &answers, None);
        out.applied = false;
        Ok(out)
    }

    /// Renew or settle a lease on each of its slots (the owner's first),
    /// and apply a settlement's ops on slots it holds nothing in.
    async fn span_lease(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        parts: &[Part],
        extra: &[String],
    ) -> Result<Applied, Error> {
        let Some(lease) = batch.lease else {
            return Err(Error::CrossSlot {
                reason: "no lease".into(),
            });
        };
        let lease_slots: Vec<u16> = std::iter::once(digests.home.as_str())
            .chain(extra.iter().map(String::as_str))
            .map(|d| self.layout.slot(d))
            .collect();
        let mut answers = Vec::with_capacity(parts.len());
        for part in parts {
            let (ops, cools) = pieces(batch, part, false, true);
            let mut sub = Batch::new(&ops, batch.mode, batch.now_ms).with_cooldowns(&cools);
            if lease_slots.contains(&self.layout.slot(&part.home)) {
                sub = sub.with_lease(lease);
            }
            sub = with_bal(sub, batch, part, false);
            sub.event = batch.event;
            match self
                .apply_one(&sub, &sub_digests(digests, part), false)
                .await
            {
                Ok(a) => answers.push(a),
                Err(e) if answers.is_empty() => return Err(e),
                Err(e) => return Err(partly(batch, e)),
            }
        }
        let replayed = answers.first().and_then(|a| a.replayed_at_ms);
        Ok(merge(batch, parts, &answers, replayed))
    }
}
