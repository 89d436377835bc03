//! The `(meter, window)` pairs of a shard, named by two-byte ids.

use std::sync::Arc;

use crate::window::Window;

/// `a == b`, for the short names meters have: compared a word at a time
/// inline (two overlapping loads cover 4 to 16 bytes) rather than through a
/// `memcmp` call, which cost a batch's hot path some 25 instructions an op.
#[inline]
pub(super) fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], i: usize| {
        s.get(i..i + 8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
    };
    let w4 = |s: &[u8], i: usize| {
        s.get(i..i + 4)
            .map(|w| u32::from_ne_bytes(w.try_into().unwrap_or_default()))
    };
    match n {
        0 => true,
        // Bytes 0, n / 2 and n - 1 cover 1 to 3 bytes.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// A counter's `(meter, window)`: its index in its shard's [`Keys`].
pub(super) type KeyId = u16;

/// Past this many keys a sweep of the shard drops the keys no counter uses.
pub(super) const KEYS_COMPACT_AT: usize = 64;
/// From this many keys a batch drops the unused ones before it starts, so
/// only a shard whose counters use this many keys can run out of ids.
pub(super) const KEYS_HIGH_WATER: usize = 1 << 15;

/// The `(meter, window)` pairs of one shard, each stored once, so a counter
/// names its own by a two-byte [`KeyId`]. Catalogs have a handful of meters:
/// the list is scanned (under the shard's lock), never hashed.
#[derive(Debug, Default)]
pub(super) struct Keys(pub(super) Vec<(Arc<str>, Window)>);

impl Keys {
    /// The key of `(meter, window)`, trying index `hint` first: a batch's
    /// ops come in the order their keys were first made.
    #[inline]
    pub(super) fn find(&self, meter: &str, window: Window, hint: usize) -> Option<KeyId> {
        // The hint inline (it is right for every op of a usual batch), the
        // scan out of line.
        match self.0.get(hint) {
            Some((m, w)) if *w == window && same_name(m, meter) => KeyId::try_from(hint).ok(),
            _ => self.scan(meter, window),
        }
    }

    #[inline(never)]
    pub(super) fn scan(&self, meter: &str, window: Window) -> Option<KeyId> {
        let i = self
            .0
            .iter()
            .position(|(m, w)| *w == window && **m == *meter)?;
        KeyId::try_from(i).ok()
    }

    /// The key of `(meter, window)`, added if new; `None` when the shard
    /// already has `KeyId::MAX + 1` keys.
    #[inline]
    pub(super) fn intern(&mut self, meter: &str, window: Window, hint: usize) -> Option<KeyId> {
        match self.find(meter, window, hint) {
            Some(k) => Some(k),
            None => self.add(meter, window),
        }
    }

    /// Add `(meter, window)`, known to be new; out of line, as it is rare.
    #[inline(never)]
    pub(super) fn add(&mut self, meter: &str, window: Window) -> Option<KeyId> {
        let k = KeyId::try_from(self.0.len()).ok()?;
        self.0.push((Arc::from(meter), window));
        Some(k)
    }

    pub(super) fn get(&self, key: KeyId) -> Option<&(Arc<str>, Window)> {
        self.0.get(usize::from(key))
    }
}
