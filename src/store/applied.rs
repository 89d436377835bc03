//! A batch's answer: [`Applied`], its per-op [`CounterState`]s kept inline
//! ([`InlineVec`]), the holds a settlement removed, and what `overdue`
//! reports ([`LeaseInfo`]); with the serde that keeps their serialized
//! form (RFC 3339 times, meter names as strings) as it was when the seam
//! spoke `DateTime`s and strings.

use std::fmt;
use std::ops::{Deref, DerefMut};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use super::{LeaseId, ScopeKey};
use crate::name::Name;
use crate::window::Window;

/// A counter as it stands after a batch. Instants are Unix milliseconds.
///
/// A backend builds one with `CounterState::default()` and sets the fields
/// it knows; fields added later default to "nothing to report". Serialized
/// (in a [`MemoryStore`](super::MemoryStore) snapshot's ledger) with the instants as RFC 3339
/// times under their names without `_ms`, as before they were milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CounterState {
    /// Usage counted in the window now: after the batch if it was applied,
    /// the current usage otherwise. Holds are not usage.
    pub used: u64,
    /// Sum of the counter's live holds (in-flight reservations), after the
    /// batch if it was applied.
    #[serde(default)]
    pub held: u64,
    /// Start of the current period (calendar), `now - span` (rolling), or
    /// `None` (lifetime, concurrent); Unix milliseconds.
    #[serde(rename = "period_start", with = "as_time")]
    pub period_start_ms: Option<i64>,
    /// When usage next leaves: the next period start (calendar), when the
    /// oldest counted bucket leaves (rolling, `None` if empty), `None`
    /// (lifetime, concurrent); Unix milliseconds.
    #[serde(rename = "resets_at", with = "as_time")]
    pub resets_at_ms: Option<i64>,
    /// Set only when `used + held + delta` is past the maximum (for an
    /// applied batch, `delta` counts as 0): the earliest time at which it
    /// would not be, if nothing else were added and every hold stayed, in
    /// Unix milliseconds. `None` there means waiting for the window never
    /// helps (a lifetime or concurrent counter, or `held + delta` above the
    /// maximum).
    #[serde(rename = "available_at", with = "as_time")]
    pub available_at_ms: Option<i64>,
}

/// One hold removed by [`LeaseAction::Settle`](super::LeaseAction::Settle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SettledHold {
    /// Whose counter.
    pub scope: ScopeKey,
    /// Which meter (serialized as its string, interned when read back).
    #[serde(with = "interned")]
    pub meter: Name,
    /// Over which window.
    pub window: Window,
    /// The amount the lease held there.
    pub held: u64,
    /// The part of it charged as usage.
    pub charged: u64,
}

impl SettledHold {
    /// A settled hold.
    pub fn new(scope: ScopeKey, meter: Name, window: Window, held: u64, charged: u64) -> Self {
        Self {
            scope,
            meter,
            window,
            held,
            charged,
        }
    }
}

/// The outcome of [`AllowanceStore::apply`](super::AllowanceStore::apply). Build it with
/// `Applied::default()` and set its fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Applied {
    /// Whether the batch was applied.
    pub applied: bool,
    /// One state per op, in the batch's order; inline up to
    /// [`INLINE_STATES`] ops.
    pub counters: InlineVec<CounterState>,
    /// For [`LeaseAction::Settle`](super::LeaseAction::Settle): every hold
    /// the lease had, and its charge.
    #[serde(default)]
    pub settled: Vec<SettledHold>,
    /// One entry per [`CooldownOp`](super::CooldownOp), in order: when its scope's cooldown
    /// ends (Unix milliseconds), if it runs past `now_ms` after the batch.
    /// Serialized as RFC 3339 times.
    #[serde(default, with = "as_times")]
    pub cooldowns: InlineVec<Option<i64>>,
    /// Set when the batch's event id was already applied: the `now_ms` of
    /// that first batch, whose answer this is. Nothing changed. Serialized
    /// as an RFC 3339 time under `replayed_at`.
    #[serde(rename = "replayed_at", default, with = "as_time")]
    pub replayed_at_ms: Option<i64>,
    /// The batch's balance ([`BalanceOp`](super::BalanceOp)), if it names
    /// one: as of after the batch if it applied, as it stands otherwise.
    /// Boxed: most batches have none, and every answer is moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Box<BalanceState>>,
}

/// A prepaid balance as a batch leaves it (contract rule 10). Amounts are
/// in the balance meter's smallest unit; instants are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalanceState {
    /// What the live grants have left.
    pub remaining: u64,
    /// The balance's live holds (reservations).
    pub held: u64,
    /// What consumption took past the grants, within the overdraft.
    pub debt: u64,
    /// Whether the batch's debit fit (`amount <= remaining - held - debt`,
    /// or a zero amount), as `Check` and `WithinLimits` batches decide it;
    /// `true` for a batch with no debit and for a `Force` batch, which
    /// applies either way (its `uncovered`, or for a hold the available
    /// amount after it, tells).
    pub fits: bool,
    /// What the batch's consumption could not cover (grants and overdraft
    /// exhausted); never recorded anywhere.
    pub uncovered: u64,
    /// Every grant not expired at `now` with something left (live ones and
    /// those not yet effective), in consumption order.
    pub grants: Vec<GrantState>,
}

impl BalanceState {
    /// `remaining - held - debt`: what a debit may take now (negative when
    /// holds or debt pass what the grants have left).
    pub fn available(&self) -> i128 {
        i128::from(self.remaining) - i128::from(self.held) - i128::from(self.debt)
    }
}

/// One grant of a balance (contract rule 10).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GrantState {
    /// Its id (the host's payment id).
    pub id: String,
    /// What it credited.
    pub amount: u64,
    /// What has been consumed of it.
    pub spent: u64,
    /// From when it counts.
    pub effective_at_ms: i64,
    /// When it stops counting, if ever.
    pub expires_at_ms: Option<i64>,
    /// Its priority (lower is consumed first).
    pub priority: u32,
    /// When it was granted (the batch's `now_ms`).
    pub granted_at_ms: i64,
}

/// How many items an [`InlineVec`] keeps inline: the counter states of a
/// batch of up to this many ops, and as many cooldowns, are answered
/// without a heap allocation; a longer batch's answer spills to the heap.
///
/// Five: the four limit states a [`Decision`](crate::Decision) keeps
/// inline ([`LimitStates::INLINE`](crate::LimitStates::INLINE)) and the
/// engine's counter of money charged for a priced meter, so a four-limit
/// `admit` of one priced meter allocates nothing (5,351 → 5,108
/// instructions, callgrind, BENCHMARKS.md "Ninth run"). Every answer is
/// moved once on its way to the engine, so each inline slot costs every
/// call (eight cost a four-limit `admit` 75 instructions more).
pub const INLINE_STATES: usize = 5;

/// A list kept inline up to [`INLINE_STATES`] items and on the heap past
/// that: an [`Applied`]'s per-op states and cooldowns.
///
/// Reads as a slice (it derefs to `[T]`); build one with
/// [`InlineVec::new`] (or `Default`) and [`InlineVec::push`], or collect
/// it from an iterator or a `Vec`. Serialized as a sequence.
#[derive(Clone, PartialEq, Eq)]
pub struct InlineVec<T>(SmallVec<[T; INLINE_STATES]>);

impl<T> InlineVec<T> {
    /// An empty list.
    #[inline]
    pub fn new() -> Self {
        Self(SmallVec::new())
    }

    /// Append `item`: inline while there is room, on the heap past
    /// [`INLINE_STATES`] items.
    #[inline]
    pub fn push(&mut self, item: T) {
        self.0.push(item);
    }

    /// The items as a slice.
    #[inline]
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// Whether the items have spilled to the heap.
    pub fn spilled(&self) -> bool {
        self.0.spilled()
    }
}

impl<T> Default for InlineVec<T> {
    #[inline]
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Deref for InlineVec<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T> DerefMut for InlineVec<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for InlineVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T> FromIterator<T> for InlineVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<T> Extend<T> for InlineVec<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl<T> From<Vec<T>> for InlineVec<T> {
    fn from(v: Vec<T>) -> Self {
        Self(SmallVec::from_vec(v))
    }
}

impl<'a, T> IntoIterator for &'a InlineVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: Serialize> Serialize for InlineVec<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for InlineVec<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(deserializer).map(Self::from)
    }
}

/// Unix milliseconds as a `DateTime`, clamped to chrono's range (which
/// every instant a clock or a calendar gives is within).
pub(crate) fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// Serde for a [`Name`] kept by a store (a settled hold's, a lease's in a
/// snapshot): the string, interned when read back (a store's meters are a
/// catalog's).
pub(crate) mod interned {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::name::Name;

    pub(crate) fn serialize<S: Serializer>(name: &Name, s: S) -> Result<S::Ok, S::Error> {
        name.serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Name::new(&s))
    }
}

/// Serde for an optional instant in Unix milliseconds, as the RFC 3339
/// time it was serialized as when the seam spoke `DateTime`s.
mod as_time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        ms.map(super::ms_to_time).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Ok(Option::<DateTime<Utc>>::deserialize(d)?.map(|t| t.timestamp_millis()))
    }
}

/// [`as_time`] for a list of optional instants.
mod as_times {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    use super::InlineVec;

    pub(super) fn serialize<S: Serializer>(
        list: &InlineVec<Option<i64>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|ms| ms.map(super::ms_to_time)))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<InlineVec<Option<i64>>, D::Error> {
        let times = Vec::<Option<DateTime<Utc>>>::deserialize(d)?;
        Ok(times
            .into_iter()
            .map(|t| t.map(|t| t.timestamp_millis()))
            .collect())
    }
}

/// A live lease past its deadline, as
/// [`AllowanceStore::overdue`](super::AllowanceStore::overdue) reports it.
///
/// Its instants stay `DateTime`s (unlike a batch's, see the [module
/// docs](super#times-names-and-answers)): `overdue` is a maintenance call,
/// its answer read by people and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The lease.
    pub id: LeaseId,
    /// The subject that owns it.
    pub owner: ScopeKey,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// When its holds return unless renewed.
    pub expires_at: DateTime<Utc>,
    /// When the work became overdue.
    pub deadline: Option<DateTime<Utc>>,
}

impl LeaseInfo {
    /// A lease's description.
    pub fn new(
        id: LeaseId,
        owner: ScopeKey,
        opened_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        deadline: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            id,
            owner,
            opened_at,
            expires_at,
            deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Applied, CounterState, InlineVec, INLINE_STATES};

    /// An answer serializes its instants as the RFC 3339 times it did when
    /// the seam spoke `DateTime`s (a snapshot's ledger keeps answers), and
    /// reads them back as the same milliseconds.
    #[test]
    fn an_answer_keeps_its_serialized_form() {
        let day = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        let mut a = Applied {
            applied: true,
            ..Applied::default()
        };
        a.counters.push(CounterState {
            used: 3,
            held: 1,
            period_start_ms: Some(day),
            resets_at_ms: Some(day + 86_400_000),
            available_at_ms: None,
        });
        a.cooldowns.push(Some(day + 1_500));
        a.cooldowns.push(None);
        a.replayed_at_ms = Some(day + 60_000);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            "{\"applied\":true,\"counters\":[{\"used\":3,\"held\":1,\
             \"period_start\":\"2026-01-01T00:00:00Z\",\
             \"resets_at\":\"2026-01-02T00:00:00Z\",\"available_at\":null}],\
             \"settled\":[],\"cooldowns\":[\"2026-01-01T00:00:01.500Z\",null],\
             \"replayed_at\":\"2026-01-01T00:01:00Z\"}"
        );
        let back: Applied = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
        // Written before the fields had defaults: still read.
        let old = "{\"applied\":false,\"counters\":[]}";
        assert_eq!(
            serde_json::from_str::<Applied>(old).unwrap(),
            Applied::default()
        );
    }

    /// Inline up to `INLINE_STATES` items, on the heap past them, in order
    /// either way; a sequence in serde.
    #[test]
    fn an_inline_vec_spills_past_its_inline_items_in_order() {
        let mut v: InlineVec<u64> = InlineVec::new();
        for i in 0..INLINE_STATES as u64 {
            v.push(i);
        }
        assert!(!v.spilled());
        v.push(99);
        assert!(v.spilled());
        let want: Vec<u64> = (0..INLINE_STATES as u64).chain([99]).collect();
        assert_eq!(v.as_slice(), want.as_slice());
        assert_eq!(v, InlineVec::from(want.clone()));
        assert_eq!(v, want.iter().copied().collect::<InlineVec<u64>>());
        assert_eq!(format!("{v:?}"), format!("{want:?}"));
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, serde_json::to_string(&want).unwrap());
        assert_eq!(serde_json::from_str::<InlineVec<u64>>(&json).unwrap(), v);
        v[0] = 7;
        assert_eq!((v.len(), v.first()), (INLINE_STATES + 1, Some(&7)));
    }
}
