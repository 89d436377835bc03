//! Closed calendar periods in memory (contract rule 11): the totals a roll
//! or a sweep takes off a counter, kept per scope, at most `depth` per
//! counter and none further back than `depth` periods.

use super::counters::Closed;
use crate::name::Name;
use crate::store::{period_back, ScopeKey, ScopeMap};
use crate::window::Window;

/// One closed period's total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Past {
    pub(super) meter: Name,
    pub(super) window: Window,
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) used: u64,
}

/// A shard's closed periods, per scope.
#[derive(Debug, Default)]
pub(super) struct History {
    /// Closed periods kept per counter; 0 keeps none.
    pub(super) depth: u32,
    pub(super) map: ScopeMap<Vec<Past>>,
}

impl History {
    /// Keep the total a roll or a sweep took off `scope`'s counter
    /// `(meter, window)`; the counter's oldest kept total goes when it has
    /// `depth` already. A period kept twice (a counter swept, made again in
    /// the same period, swept again) adds up: both were usage of it.
    #[cold]
    #[inline(never)]
    pub(super) fn keep(&mut self, scope: &ScopeKey, meter: Name, window: Window, closed: Closed) {
        if self.depth == 0 || closed.used == 0 {
            return;
        }
        let list = match self.map.get_mut(scope) {
            Some(list) => list,
            None => self.map.entry(scope.clone()).or_default(),
        };
        let same = |p: &Past| p.meter == meter && p.window == window;
        if let Some(p) = list.iter_mut().find(|p| same(p) && p.start == closed.start) {
            p.used = p.used.saturating_add(closed.used);
            return;
        }
        list.push(Past {
            meter,
            window,
            start: closed.start,
            end: closed.end,
            used: closed.used,
        });
        if list.iter().filter(|p| same(p)).count() > self.depth as usize {
            if let Some((i, _)) = list
                .iter()
                .enumerate()
                .filter(|(_, p)| same(p))
                .min_by_key(|(_, p)| p.start)
            {
                list.swap_remove(i);
            }
        }
    }

    /// The total kept for `scope`'s counter `(meter, window)` in the period
    /// starting at `start`.
    pub(super) fn get(
        &self,
        scope: &ScopeKey,
        meter: Name,
        window: Window,
        start: i64,
    ) -> Option<u64> {
        self.map
            .get(scope)?
            .iter()
            .find(|p| p.meter == meter && p.window == window && p.start == start)
            .map(|p| p.used)
    }

    /// Forget every total more than `depth` periods before the one
    /// containing `now_ms`, and scopes left with none.
    pub(super) fn prune(&mut self, now_ms: i64) {
        let depth = self.depth;
        self.map.retain(|_, list| {
            list.retain(|p| {
                period_back(p.window, now_ms, depth).is_some_and(|(oldest, _)| p.start >= oldest)
            });
            !list.is_empty()
        });
    }

    /// Number of totals kept.
    pub(super) fn len(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }
}
