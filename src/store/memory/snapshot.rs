//! Snapshots: the store as plain serde data, and restoring it with every invariant checked.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::balance::Balance;
use super::counters::{width_of, Counter, RING_HEADER};
use super::history::Past;
use super::holds::{Holds, Lease};
use super::keys::KeyId;
use super::ledger::Entry;
use super::{MemoryStore, SNAPSHOT_VERSION};
use crate::name::Name;
use crate::store::{LeaseId, PeriodOp, ScopeKey};
use crate::window::Window;
use crate::Error;

/// A counter in a snapshot: its meter and window spelled out, its buckets
/// and holds inline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapCounter {
    pub(super) meter: Arc<str>,
    pub(super) window: Window,
    pub(super) data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) holds: Option<Box<Holds>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Data {
    /// Usage in the period `[start, end)`.
    Calendar {
        start: i64,
        end: i64,
        used: u64,
    },
    Rolling(Rolling),
    Lifetime {
        used: u64,
    },
    /// Holds only.
    Concurrent,
}

/// A rolling window in a snapshot: `slots.len() == buckets + 1` buckets of
/// `width_ms`, the newest at bucket index `head`, the oldest holding usage at
/// `tail`, and their running `total` (see [`Ring`](super::counters::Ring)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Rolling {
    pub(super) width_ms: i64,
    pub(super) head: i64,
    pub(super) tail: i64,
    pub(super) total: u64,
    pub(super) slots: Box<[u64]>,
}

/// Everything a [`MemoryStore`] holds, as plain data: counters with their
/// buckets and holds, leases, cooldowns and the event ledger. Serialize it
/// with any serde format; [`MemoryStore::restore`] checks it before use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub(super) version: u32,
    pub(super) horizon_ms: i64,
    pub(super) scopes: Vec<(ScopeKey, Vec<SnapCounter>)>,
    pub(super) cooldowns: Vec<(ScopeKey, i64)>,
    pub(super) leases: Vec<(LeaseId, Lease)>,
    pub(super) events: Vec<(String, Entry)>,
    /// Prepaid balances: scope, money meter, grants, holds and debt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) balances: Vec<(ScopeKey, Arc<str>, Balance)>,
    /// Closed periods kept per counter (contract rule 11); a snapshot
    /// without it keeps the default.
    #[serde(default = "default_history_periods")]
    pub(super) history_periods: u32,
    /// The totals of closed calendar periods, per scope.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) history: Vec<(ScopeKey, Vec<SnapPast>)>,
}

fn default_history_periods() -> u32 {
    crate::store::DEFAULT_HISTORY_PERIODS
}

/// A closed calendar period's total in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapPast {
    pub(super) meter: Arc<str>,
    pub(super) window: Window,
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) used: u64,
}

impl Snapshot {
    /// Number of counters in the snapshot.
    pub fn counter_count(&self) -> usize {
        self.scopes.iter().map(|(_, c)| c.len()).sum()
    }

    /// Number of leases (live, or ended and not yet forgotten).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Number of remembered event ids.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Number of prepaid balances.
    pub fn balance_count(&self) -> usize {
        self.balances.len()
    }
}

impl Rolling {
    /// Snapshot invariants: the layout matches the window, the total is the
    /// sum of the buckets, and the tail is a counted bucket.
    pub(super) fn check(&self, span_secs: u64, buckets: u32) -> Result<(), String> {
        if self.width_ms != Window::bucket_ms(span_secs, buckets)
            || self.slots.len() != buckets as usize + 1
        {
            return Err("rolling buckets do not match the window".into());
        }
        let sum = self
            .slots
            .iter()
            .try_fold(0u64, |a, &b| a.checked_add(b))
            .ok_or("rolling buckets overflow")?;
        if sum != self.total {
            return Err("rolling total is not the sum of its buckets".into());
        }
        // Every bucket the counter can name, and when it leaves, is a time.
        let n = self.slots.len() as i64;
        let (Some(oldest), Some(_)) = (
            self.head.checked_sub(n - 1),
            self.head
                .checked_add(n)
                .and_then(|b| b.checked_mul(self.width_ms)),
        ) else {
            return Err("rolling head is out of range".into());
        };
        if self.total > 0 && !(oldest <= self.tail && self.tail <= self.head) {
            return Err("rolling tail is outside the window".into());
        }
        Ok(())
    }
}

impl Counter {
    /// The counter as a snapshot spells it.
    pub(super) fn to_snap(
        &self,
        meter: Arc<str>,
        window: Window,
        holds: Option<&Holds>,
    ) -> SnapCounter {
        let data = match self {
            Counter::Calendar {
                len_ms,
                start,
                used,
                ..
            } => Data::Calendar {
                start: *start,
                end: start.saturating_add(i64::from(*len_ms)),
                used: *used,
            },
            Counter::Rolling { back, buf, .. } => Data::Rolling(Rolling {
                width_ms: width_of(window),
                head: buf[0] as i64,
                tail: buf[0] as i64 - i64::from(*back),
                total: buf[1],
                slots: buf[RING_HEADER..].into(),
            }),
            Counter::Lifetime { used, .. } => Data::Lifetime { used: *used },
            Counter::Concurrent { .. } => Data::Concurrent,
        };
        SnapCounter {
            meter,
            window,
            data,
            holds: holds.map(|h| Box::new(h.clone())),
        }
    }
}

impl SnapCounter {
    /// The counter in memory, once its data is checked against its window.
    pub(super) fn to_counter(&self, key: KeyId) -> Result<Counter, String> {
        let c = match (&self.data, self.window) {
            (
                &Data::Calendar { start, end, used },
                Window::Calendar {
                    period,
                    utc_offset_secs,
                },
            ) if start < end => {
                let len_ms = end
                    .checked_sub(start)
                    .and_then(|len| u32::try_from(len).ok())
                    .ok_or("calendar period is longer than 49 days")?;
                // Exactly one period of the window: a period that ends late
                // would block its subject until then.
                let in_range = DateTime::<Utc>::from_timestamp_millis(start).is_some()
                    && DateTime::<Utc>::from_timestamp_millis(end).is_some();
                if !in_range
                    || Window::calendar_bounds(period, utc_offset_secs, start) != (start, end)
                {
                    return Err(format!(
                        "calendar period [{start}, {end}) is not one period of {}",
                        self.window
                    ));
                }
                Counter::Calendar {
                    key,
                    len_ms,
                    start,
                    used,
                }
            }
            (Data::Rolling(r), Window::Rolling { span_secs, buckets }) => {
                r.check(span_secs, buckets)?;
                // Checked: with usage, the tail is within the window; without,
                // the tail is the head.
                let back = if r.total == 0 {
                    0
                } else {
                    r.head
                        .checked_sub(r.tail)
                        .and_then(|back| u32::try_from(back).ok())
                        .ok_or("rolling tail is outside the window")?
                };
                let mut buf = Vec::with_capacity(RING_HEADER + r.slots.len());
                buf.extend([r.head as u64, r.total]);
                buf.extend_from_slice(&r.slots);
                Counter::Rolling {
                    key,
                    back,
                    buf: buf.into_boxed_slice(),
                }
            }
            (&Data::Lifetime { used }, Window::Lifetime) => Counter::Lifetime { key, used },
            (Data::Concurrent, Window::Concurrent) => Counter::Concurrent { key },
            _ => {
                return Err(format!(
                    "counter data does not match window {}",
                    self.window
                ))
            }
        };
        if let Some(h) = &self.holds {
            h.check()?;
        }
        Ok(c)
    }
}

impl MemoryStore {
    /// A consistent copy of everything the store holds.
    pub fn snapshot(&self) -> Snapshot {
        // Lock order as in `apply`: ledger, leases, counters.
        let ledger: Vec<_> = self.ledger.iter().map(|m| m.lock()).collect();
        let leases: Vec<_> = self.leases.iter().map(|m| m.lock()).collect();
        let shards: Vec<_> = self.shards.iter().map(|m| m.lock()).collect();
        let balance_shards: Vec<_> = self.balances.iter().map(|m| m.lock()).collect();
        let mut balances: Vec<(ScopeKey, Arc<str>, Balance)> = balance_shards
            .iter()
            .flat_map(|m| {
                m.iter().flat_map(|(scope, list)| {
                    list.iter()
                        .map(|(meter, b)| (scope.clone(), Arc::from(meter.as_str()), b.clone()))
                })
            })
            .collect();
        balances.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut scopes: Vec<(ScopeKey, Vec<SnapCounter>)> = shards
            .iter()
            .flat_map(|s| {
                s.scopes.iter().map(|(scope, counters)| {
                    let snap = counters
                        .iter()
                        .filter_map(|c| {
                            let (meter, window) = s.keys.get(c.key())?;
                            let holds = s.holds(scope, c.key());
                            Some(c.to_snap(Arc::from(meter.as_str()), *window, holds))
                        })
                        .collect();
                    (scope.clone(), snap)
                })
            })
            .collect();
        scopes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut cooldowns: Vec<(ScopeKey, i64)> = shards
            .iter()
            .flat_map(|s| s.cooldowns.iter().map(|(k, v)| (k.clone(), *v)))
            .collect();
        cooldowns.sort();
        let mut lease_list: Vec<(LeaseId, Lease)> = leases
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (*k, v.clone())))
            .collect();
        lease_list.sort_by_key(|(id, _)| *id);
        let mut events: Vec<(String, Entry)> = ledger
            .iter()
            .flat_map(|m| m.map.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect();
        events.sort_by(|a, b| a.0.cmp(&b.0));
        let mut history: Vec<(ScopeKey, Vec<SnapPast>)> = shards
            .iter()
            .flat_map(|s| {
                s.history.map.iter().map(|(scope, list)| {
                    let mut list: Vec<SnapPast> = list
                        .iter()
                        .map(|p| SnapPast {
                            meter: Arc::from(p.meter.as_str()),
                            window: p.window,
                            start: p.start,
                            end: p.end,
                            used: p.used,
                        })
                        .collect();
                    list.sort_by(|a, b| (&a.meter, a.start).cmp(&(&b.meter, b.start)));
                    (scope.clone(), list)
                })
            })
            .collect();
        history.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            version: SNAPSHOT_VERSION,
            horizon_ms: self.horizon_ms,
            scopes,
            cooldowns,
            leases: lease_list,
            events,
            balances,
            history_periods: shards.first().map_or(0, |s| s.history.depth),
            history,
        }
    }

    /// A store holding exactly what `snapshot` holds, with the default number
    /// of shards and the snapshot's event horizon.
    ///
    /// A snapshot names meters by their strings; restoring interns them as
    /// [`Name`]s (for the life of the process, as a catalog's names are), so
    /// the engine's batches find the restored counters by pointer.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`] when the snapshot breaks an invariant: an
    /// unknown version, a counter named twice, a calendar counter whose
    /// `[start, end)` is not exactly one period of its window (a day counter
    /// that ends 40 days out would block its subject until then), a rolling
    /// counter whose bucket width or count does not match its window's span
    /// and buckets, buckets that do not add up to their total, holds that are
    /// unsorted or belong to no live lease, a lease or event id listed twice,
    /// a balance listed twice or with malformed, repeated or unordered grants,
    /// a closed period's total that is not one period of its window, is
    /// zero, or is listed twice, more of a counter's totals than the depth, a history depth past
    /// [`MAX_HISTORY_PERIODS`](crate::store::MAX_HISTORY_PERIODS).
    /// Nothing is restored then.
    pub fn restore(snapshot: Snapshot) -> Result<Self, Error> {
        let bad = |reason: String| Error::InvalidSnapshot { reason };
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(bad(format!("unknown version {}", snapshot.version)));
        }
        if snapshot.horizon_ms <= 0 {
            return Err(bad("event horizon must be positive".into()));
        }
        let depth = crate::store::checked_depth("history_periods", snapshot.history_periods)
            .map_err(|e| bad(e.to_string()))?;
        let mut store = Self::new().with_depth(depth);
        store.horizon_ms = snapshot.horizon_ms;
        let mut leases: HashMap<LeaseId, Lease> = HashMap::new();
        for (id, lease) in snapshot.leases {
            if leases.insert(id, lease).is_some() {
                return Err(bad(format!("lease {id} listed twice")));
            }
        }
        for (scope, counters) in snapshot.scopes {
            let shard_id = store.shard_of(&scope);
            let shard = store.shards[shard_id].get_mut();
            if shard.scopes.contains_key(&scope) {
                return Err(bad(format!("scope {scope} listed twice")));
            }
            let mut list: Vec<Counter> = Vec::with_capacity(counters.len());
            for c in &counters {
                let meter = Name::new(&c.meter);
                let key = shard
                    .keys
                    .intern(meter, c.window, list.len())
                    .ok_or_else(|| bad("too many meter and window pairs".into()))?;
                if list.iter().any(|o| o.key() == key) {
                    return Err(bad(format!(
                        "{scope} {} {} listed twice",
                        c.meter, c.window
                    )));
                }
                let counter = c
                    .to_counter(key)
                    .map_err(|r| bad(format!("{scope} {}: {r}", c.meter)))?;
                for h in c.holds.iter().flat_map(|h| &h.entries) {
                    let owned = leases.get(&h.lease).is_some_and(|l| {
                        !l.settled
                            && l.expires_ms == h.expires_ms
                            && l.holds.iter().any(|r| {
                                r.meter == meter && r.window == c.window && r.scope == scope
                            })
                    });
                    if !owned {
                        return Err(bad(format!(
                            "{scope} {} holds for lease {} that does not hold it",
                            c.meter, h.lease
                        )));
                    }
                }
                if let Some(h) = &c.holds {
                    shard
                        .holds
                        .entry(scope.clone())
                        .or_default()
                        .push((key, (**h).clone()));
                }
                list.push(counter);
            }
            shard.scopes.insert(scope, list.into_boxed_slice());
        }
        for (scope, until) in snapshot.cooldowns {
            let shard = store.shard_of(&scope);
            store.shards[shard].get_mut().cooldowns.insert(scope, until);
        }
        for (scope, meter, balance) in snapshot.balances {
            balance
                .check()
                .map_err(|r| bad(format!("{scope} balance {meter}: {r}")))?;
            let meter = Name::new(&meter);
            for h in &balance.holds.entries {
                let owned = leases.get(&h.lease).is_some_and(|l| {
                    !l.settled
                        && l.expires_ms == h.expires_ms
                        && l.balance
                            .as_ref()
                            .is_some_and(|b| b.meter == meter && b.scope == scope)
                });
                if !owned {
                    return Err(bad(format!(
                        "{scope} balance {meter} holds for lease {} that does not hold it",
                        h.lease
                    )));
                }
            }
            let side = store.side_index(&scope);
            let list = store.balances[side]
                .get_mut()
                .entry(scope.clone())
                .or_default();
            if list.iter().any(|(m, _)| *m == meter) {
                return Err(bad(format!("{scope} balance {meter} listed twice")));
            }
            list.push((meter, balance));
        }
        for (scope, list) in snapshot.history {
            let shard_id = store.shard_of(&scope);
            let shard = store.shards[shard_id].get_mut();
            if shard.history.map.contains_key(&scope) {
                return Err(bad(format!("history of {scope} listed twice")));
            }
            let mut kept: Vec<Past> = Vec::with_capacity(list.len());
            let mut periods: std::collections::HashSet<(Name, Window, i64)> =
                std::collections::HashSet::with_capacity(list.len());
            let mut per_counter: HashMap<(Name, Window), usize> = HashMap::new();
            for p in list {
                let meter = Name::new(&p.meter);
                let op = PeriodOp::new(&scope, meter, p.window, p.start);
                if op.end_ms() != Some(p.end) || p.used == 0 {
                    return Err(bad(format!(
                        "history of {scope} {}: [{}, {}) is not one period of {} with usage",
                        p.meter, p.start, p.end, p.window
                    )));
                }
                if !periods.insert((meter, p.window, p.start)) {
                    return Err(bad(format!(
                        "history of {scope} {}: period {} listed twice",
                        p.meter, p.start
                    )));
                }
                let n = per_counter.entry((meter, p.window)).or_insert(0);
                *n += 1;
                if *n > depth as usize {
                    return Err(bad(format!(
                        "history of {scope} {}: more closed periods than the {depth} kept",
                        p.meter
                    )));
                }
                kept.push(Past {
                    meter,
                    window: p.window,
                    start: p.start,
                    end: p.end,
                    used: p.used,
                });
            }
            shard.history.map.insert(scope, kept);
        }
        for (id, lease) in leases {
            let side = store.side_index(&id);
            store.leases[side].get_mut().insert(id, lease);
        }
        for (id, entry) in snapshot.events {
            let side = store.side_index(id.as_str());
            let map = store.ledger[side].get_mut();
            if map.insert(id.clone().into_boxed_str(), entry).is_some() {
                return Err(bad(format!("event `{id}` listed twice")));
            }
        }
        Ok(store)
    }
}
