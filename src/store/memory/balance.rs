//! Prepaid balances (contract rule 10): grants consumed in order, holds
//! under leases, and debt within an overdraft.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::holds::Holds;
use crate::name::Name;
use crate::store::{BalanceState, GrantOp, GrantState, LeaseId, ScopeKey, ScopeMap};
use crate::Error;

/// One side shard's balances: per scope, one per money meter (a scope
/// usually has one).
pub(super) type BalanceMap = ScopeMap<Vec<(Name, Balance)>>;

/// A balance: its grants in consumption order, its holds, its debt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Balance {
    /// Every grant ever added, spent and expired ones too (they are the
    /// record a payment id is checked against), in consumption order.
    pub(super) grants: Vec<Grant>,
    /// Holds of live (or not yet swept) leases.
    pub(super) holds: Holds,
    pub(super) debt: u64,
    /// The latest `now` a batch applied to it: grants are read at this
    /// time when a clock steps back, so an expired grant never counts again.
    pub(super) seen_ms: i64,
}

/// A grant of a balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Grant {
    pub(super) id: Box<str>,
    pub(super) amount: u64,
    pub(super) spent: u64,
    pub(super) effective_ms: i64,
    pub(super) expires_ms: Option<i64>,
    pub(super) priority: u32,
    pub(super) granted_ms: i64,
}

impl Grant {
    fn live(&self, t: i64) -> bool {
        self.effective_ms <= t && self.expires_ms.is_none_or(|e| t < e)
    }

    fn left(&self) -> u64 {
        self.amount - self.spent
    }

    /// Consumption order: priority, expiry (none last), start, id bytes.
    fn order(&self, other: &Grant) -> Ordering {
        (
            self.priority,
            self.expires_ms.is_none(),
            self.expires_ms.unwrap_or(0),
            self.effective_ms,
            self.id.as_bytes(),
        )
            .cmp(&(
                other.priority,
                other.expires_ms.is_none(),
                other.expires_ms.unwrap_or(0),
                other.effective_ms,
                other.id.as_bytes(),
            ))
    }

    fn same_terms(&self, g: &GrantOp<'_>) -> bool {
        self.amount == g.amount
            && self.effective_ms == g.effective_at_ms
            && self.expires_ms == g.expires_at_ms
            && self.priority == g.priority
    }
}

impl Balance {
    /// The time grants are read at: `now`, or the latest time a batch
    /// applied if the clock stepped back since.
    fn t(&self, now_ms: i64) -> i64 {
        now_ms.max(self.seen_ms)
    }

    /// What the live grants have left at `now_ms`.
    pub(super) fn remaining(&self, now_ms: i64) -> u64 {
        let t = self.t(now_ms);
        self.grants
            .iter()
            .filter(|g| g.live(t))
            .fold(0u64, |a, g| a.saturating_add(g.left()))
    }

    /// The live holds at `now_ms` (expired ones read as gone).
    pub(super) fn held(&self, now_ms: i64) -> u64 {
        let n = self
            .holds
            .entries
            .partition_point(|e| e.expires_ms <= now_ms);
        let gone: u64 = self.holds.entries[..n].iter().map(|e| e.amount).sum();
        self.holds.total - gone
    }

    /// `remaining - held - debt` at `now_ms`.
    pub(super) fn available(&self, now_ms: i64) -> i128 {
        i128::from(self.remaining(now_ms)) - i128::from(self.held(now_ms)) - i128::from(self.debt)
    }

    /// Whether a debit of `amount` fits at `now_ms`.
    pub(super) fn fits(&self, amount: u64, now_ms: i64) -> bool {
        amount == 0 || i128::from(amount) <= self.available(now_ms)
    }

    /// Mark `now_ms` as applied: drop expired holds, move the high-water
    /// time.
    pub(super) fn touch(&mut self, now_ms: i64) {
        self.holds.expire(now_ms);
        self.seen_ms = self.seen_ms.max(now_ms);
    }

    /// Consume `n`: live grants in order, then debt up to `overdraft`.
    /// Returns what was left uncovered.
    pub(super) fn consume(&mut self, n: u64, overdraft: u64, now_ms: i64) -> u64 {
        let t = self.t(now_ms);
        let mut left = n;
        for g in self.grants.iter_mut().filter(|g| g.live(t)) {
            if left == 0 {
                break;
            }
            let take = left.min(g.left());
            g.spent += take;
            left -= take;
        }
        let room = overdraft.saturating_sub(self.debt);
        let owed = left.min(room);
        self.debt += owed;
        left - owed
    }

    /// Check a grant against the balance: `Ok(Some(granted_ms))` for a
    /// replay, `Ok(None)` for a new one.
    ///
    /// # Errors
    /// [`Error::GrantConflict`] for an id granted with other terms;
    /// [`Error::Overflow`] when the grants' amounts would pass a `u64`.
    pub(super) fn check_grant(&self, g: &GrantOp<'_>, meter: Name) -> Result<Option<i64>, Error> {
        if let Some(old) = self.grants.iter().find(|old| &*old.id == g.id) {
            return if old.same_terms(g) {
                Ok(Some(old.granted_ms))
            } else {
                Err(Error::GrantConflict {
                    payment: g.id.to_owned(),
                })
            };
        }
        let total = self
            .grants
            .iter()
            .try_fold(g.amount, |a, old| a.checked_add(old.amount));
        if total.is_none() {
            return Err(Error::Overflow {
                meter: meter.to_string(),
            });
        }
        Ok(None)
    }

    /// Add a grant checked by [`Balance::check_grant`]; if it is live, it
    /// pays the debt off first (one not yet effective or already expired
    /// leaves the debt alone).
    pub(super) fn add_grant(&mut self, g: &GrantOp<'_>, now_ms: i64) {
        let mut grant = Grant {
            id: Box::from(g.id),
            amount: g.amount,
            spent: 0,
            effective_ms: g.effective_at_ms,
            expires_ms: g.expires_at_ms,
            priority: g.priority,
            granted_ms: now_ms,
        };
        if grant.live(self.t(now_ms)) {
            let repaid = g.amount.min(self.debt);
            self.debt -= repaid;
            grant.spent = repaid;
        }
        let at = self
            .grants
            .partition_point(|old| old.order(&grant) == Ordering::Less);
        self.grants.insert(at, grant);
    }

    /// Hold `n` more under lease `id` (expiring at `expires_ms`).
    pub(super) fn hold(&mut self, id: LeaseId, expires_ms: i64, n: u64) {
        if n > 0 {
            self.holds.add(id, expires_ms, n);
        }
    }

    /// The balance as a batch reports it at `now_ms`.
    pub(super) fn state(&self, now_ms: i64, fits: bool, uncovered: u64) -> BalanceState {
        let t = self.t(now_ms);
        BalanceState {
            remaining: self.remaining(now_ms),
            held: self.held(now_ms),
            debt: self.debt,
            fits,
            uncovered,
            grants: self
                .grants
                .iter()
                .filter(|g| g.left() > 0 && g.expires_ms.is_none_or(|e| t < e))
                .map(|g| GrantState {
                    id: g.id.to_string(),
                    amount: g.amount,
                    spent: g.spent,
                    effective_at_ms: g.effective_ms,
                    expires_at_ms: g.expires_ms,
                    priority: g.priority,
                    granted_at_ms: g.granted_ms,
                })
                .collect(),
        }
    }

    /// Snapshot invariants.
    pub(super) fn check(&self) -> Result<(), String> {
        if !self.holds.entries.is_empty() {
            self.holds.check()?;
        } else if self.holds.total != 0 {
            return Err("balance hold total without holds".into());
        }
        let mut total: u64 = 0;
        for (i, g) in self.grants.iter().enumerate() {
            if g.amount == 0 || g.spent > g.amount || g.id.is_empty() {
                return Err("a balance grant is malformed".into());
            }
            if g.expires_ms.is_some_and(|e| e <= g.effective_ms) {
                return Err("a balance grant expires before it starts".into());
            }
            total = total
                .checked_add(g.amount)
                .ok_or("balance grants overflow")?;
            if self.grants[..i].iter().any(|o| o.id == g.id) {
                return Err("a balance grant id is repeated".into());
            }
            if i > 0 && self.grants[i - 1].order(g) != Ordering::Less {
                return Err("balance grants are out of order".into());
            }
        }
        Ok(())
    }
}

/// The balance `(scope, meter)` in `map`, if it exists.
pub(super) fn find<'m>(map: &'m BalanceMap, scope: &ScopeKey, meter: Name) -> Option<&'m Balance> {
    map.get(scope)?
        .iter()
        .find(|(m, _)| *m == meter)
        .map(|(_, b)| b)
}

/// The balance `(scope, meter)` in `map`, made empty if absent.
pub(super) fn find_mut<'m>(
    map: &'m mut BalanceMap,
    scope: &ScopeKey,
    meter: Name,
) -> &'m mut Balance {
    let list = map.entry(scope.clone()).or_default();
    let i = match list.iter().position(|(m, _)| *m == meter) {
        Some(i) => i,
        None => {
            list.push((meter, Balance::default()));
            list.len() - 1
        }
    };
    &mut list[i].1
}
