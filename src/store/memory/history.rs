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
    /// `(meter, window)` at `now_ms`. When the counter then has more than
    /// `depth`, one goes: a total outside the `depth` periods before the one
    /// containing `now_ms` (the oldest such, else the latest: a clock that
    /// stepped back), else the oldest. A period kept twice (a counter swept,
    /// made again in the same period, swept again) adds up: both were usage
    /// of it.
    #[cold]
    #[inline(never)]
    pub(super) fn keep(
        &mut self,
        scope: &ScopeKey,
        meter: Name,
        window: Window,
        closed: Closed,
        now_ms: i64,
    ) {
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
        if list.iter().filter(|p| same(p)).count() <= self.depth as usize {
            return;
        }
        let oldest_kept = period_back(window, now_ms, self.depth).map_or(i64::MIN, |b| b.0);
        let current = period_back(window, now_ms, 0).map_or(i64::MAX, |b| b.0);
        let mine = || list.iter().enumerate().filter(|(_, p)| same(p));
        let victim = mine()
            .filter(|(_, p)| p.start < oldest_kept)
            .min_by_key(|(_, p)| p.start)
            .or_else(|| {
                mine()
                    .filter(|(_, p)| p.start >= current)
                    .max_by_key(|(_, p)| p.start)
            })
            .or_else(|| mine().min_by_key(|(_, p)| p.start))
            .map(|(i, _)| i);
        if let Some(i) = victim {
            list.swap_remove(i);
        }
    }

    /// Keep at most `depth` totals per counter: the newest.
    pub(super) fn trim(&mut self) {
        let depth = self.depth as usize;
        self.map.retain(|_, list| {
            // Newest first, so each counter's first `depth` are kept.
            list.sort_by_key(|p| std::cmp::Reverse(p.start));
            let mut seen: Vec<(Name, Window, usize)> = Vec::new();
            list.retain(|p| {
                match seen
                    .iter_mut()
                    .find(|(m, w, _)| *m == p.meter && *w == p.window)
                {
                    Some((_, _, n)) => *n += 1,
                    None => seen.push((p.meter, p.window, 1)),
                }
                seen.iter()
                    .any(|(m, w, n)| *m == p.meter && *w == p.window && *n <= depth)
            });
            !list.is_empty()
        });
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
    /// containing `now_ms`, and scopes left with none. The oldest start
    /// kept is worked out once per window.
    pub(super) fn prune(&mut self, now_ms: i64) {
        let depth = self.depth;
        let mut oldest: Vec<(Window, i64)> = Vec::new();
        self.map.retain(|_, list| {
            list.retain(|p| {
                let from = match oldest.iter().find(|(w, _)| *w == p.window) {
                    Some(&(_, from)) => from,
                    None => {
                        let from = period_back(p.window, now_ms, depth).map_or(i64::MAX, |b| b.0);
                        oldest.push((p.window, from));
                        from
                    }
                };
                p.start >= from
            });
            !list.is_empty()
        });
    }

    /// Number of totals kept.
    pub(super) fn len(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }
}
