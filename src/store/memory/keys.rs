//! The `(meter, window)` pairs of a shard, named by two-byte ids.

use crate::name::Name;
use crate::window::Window;

/// A counter's `(meter, window)`: its index in its shard's [`Keys`].
pub(super) type KeyId = u16;

/// Past this many keys a sweep of the shard drops the keys no counter uses.
pub(super) const KEYS_COMPACT_AT: usize = 64;
/// From this many keys a batch drops the unused ones before it starts, so
/// only a shard whose counters use this many keys can run out of ids.
pub(super) const KEYS_HIGH_WATER: usize = 1 << 15;

/// The `(meter, window)` pairs of one shard, each stored once, so a counter
/// names its own by a two-byte [`KeyId`]. Catalogs have a handful of meters:
/// the list is scanned (under the shard's lock), never hashed. A meter is
/// an interned [`Name`], so a pair is found by the name's pointer, never by
/// comparing strings.
#[derive(Debug, Default)]
pub(super) struct Keys(pub(super) Vec<(Name, Window)>);

impl Keys {
    /// The key of `(meter, window)`, trying index `hint` first: a batch's
    /// ops come in the order their keys were first made.
    #[inline]
    pub(super) fn find(&self, meter: Name, window: Window, hint: usize) -> Option<KeyId> {
        // The hint inline (it is right for every op of a usual batch), the
        // scan out of line.
        match self.0.get(hint) {
            Some(&(m, w)) if m == meter && w == window => KeyId::try_from(hint).ok(),
            _ => self.scan(meter, window),
        }
    }

    #[inline(never)]
    pub(super) fn scan(&self, meter: Name, window: Window) -> Option<KeyId> {
        let i = self
            .0
            .iter()
            .position(|&(m, w)| m == meter && w == window)?;
        KeyId::try_from(i).ok()
    }

    /// The key of `(meter, window)`, added if new; `None` when the shard
    /// already has `KeyId::MAX + 1` keys.
    #[inline]
    pub(super) fn intern(&mut self, meter: Name, window: Window, hint: usize) -> Option<KeyId> {
        match self.find(meter, window, hint) {
            Some(k) => Some(k),
            None => self.add(meter, window),
        }
    }

    /// Add `(meter, window)`, known to be new; out of line, as it is rare.
    #[inline(never)]
    pub(super) fn add(&mut self, meter: Name, window: Window) -> Option<KeyId> {
        let k = KeyId::try_from(self.0.len()).ok()?;
        self.0.push((meter, window));
        Some(k)
    }

    pub(super) fn get(&self, key: KeyId) -> Option<&(Name, Window)> {
        self.0.get(usize::from(key))
    }
}
