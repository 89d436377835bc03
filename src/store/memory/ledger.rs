//! The idempotency ledger: event ids and the batches they applied.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::store::Applied;

/// Event id to the batch it applied, and the oldest entry's time, so a
/// sweep walks the map only when a good share of it can go.
#[derive(Debug)]
pub(super) struct Ledger {
    pub(super) map: HashMap<Box<str>, Entry>,
    /// `at_ms` of the oldest entry (`i64::MAX` when empty).
    pub(super) oldest_ms: i64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            oldest_ms: i64::MAX,
        }
    }
}

impl Ledger {
    pub(super) fn get(&self, id: &str) -> Option<&Entry> {
        self.map.get(id)
    }

    pub(super) fn insert(&mut self, id: Box<str>, entry: Entry) -> Option<Entry> {
        self.oldest_ms = self.oldest_ms.min(entry.at_ms);
        self.map.insert(id, entry)
    }

    /// Forget the entries older than `horizon_ms`. Unless `exact`, walk the
    /// map only once the oldest is an eighth of a horizon past it: each walk
    /// then drops at least that eighth's entries, so walks cost a bounded
    /// number of visits per entry ever inserted, however large the ledger.
    /// Entries kept past the horizon meanwhile are never replayed (`apply`
    /// checks the age), only held in memory a little longer.
    pub(super) fn sweep(&mut self, now_ms: i64, horizon_ms: i64, exact: bool) {
        let slack = if exact { 0 } else { horizon_ms / 8 };
        if now_ms.saturating_sub(self.oldest_ms) < horizon_ms.saturating_add(slack) {
            return;
        }
        let mut oldest = i64::MAX;
        self.map.retain(|_, e| {
            let keep = now_ms.saturating_sub(e.at_ms) < horizon_ms;
            if keep {
                oldest = oldest.min(e.at_ms);
            }
            keep
        });
        self.oldest_ms = oldest;
    }
}

/// An applied event: what it was and what it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) fingerprint: u64,
    pub(super) at_ms: i64,
    pub(super) applied: Applied,
}
