//! [`CapacityStats`]: what a capacity store has done, and the counters behind it.

use super::*;

/// What a [`CapacityStore`] has done so far (counts since it was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CapacityStats {
    /// Admits decided from a slice, with no store call.
    pub local_admits: u64,
    /// Checks answered from a slice.
    pub local_checks: u64,
    /// Batches passed to the inner store unchanged.
    pub passed_through: u64,
    /// Calls to the inner store, of every kind: `apply` (pass-through,
    /// open, grow, settle, late charge) and `period_usage`.
    pub store_calls: u64,
    /// Admits of a sliceable shape refused (by a lease that could not grow,
    /// or by the store when the shape went straight to it).
    pub refusals: u64,
    /// Of those, the ones that would have fit had no counter had any hold
    /// (an upper bound of the refusals a single store would not make).
    pub refused_by_holds: u64,
    /// Slices settled (given back, their admitted part made usage).
    pub settles: u64,
    /// Units admitted locally that could never be charged: the store
    /// refused both the settle and the late charge with an error other
    /// than an outage (for example [`Error::Overflow`]). Summed over every
    /// counter of the slice, whatever its meter. A settle the store could
    /// not be reached for is not lost: it stays pending
    /// ([`pending_settles`](Self::pending_settles)).
    pub lost_units: u64,
    /// Settles that failed on a store error (or whose future was dropped
    /// midway) and wait for the next
    /// [`CapacityStore::maintain`] or [`CapacityStore::shutdown`] to try
    /// again (now, not a total).
    pub pending_settles: u64,
    /// Slices whose lease had expired when they settled (a store outage
    /// longer than half a lease, a forward clock step, no `maintain`):
    /// what they admitted was charged as plain usage instead.
    pub late_charges: u64,
    /// Settles whose outcome stays uncertain: a try ended with an unknown
    /// outcome (it may have applied), and by the next answer the store had
    /// forgotten the lease (its event horizon past the lease's expiry).
    /// What such a slice admitted is not charged again: charging it could
    /// count it twice. If that try had not applied, the counter is short
    /// by at most what the slice admitted.
    pub uncertain_settles: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) local_admits: AtomicU64,
    pub(super) local_checks: AtomicU64,
    pub(super) passed_through: AtomicU64,
    pub(super) store_calls: AtomicU64,
    pub(super) refusals: AtomicU64,
    pub(super) refused_by_holds: AtomicU64,
    pub(super) settles: AtomicU64,
    pub(super) lost_units: AtomicU64,
    pub(super) late_charges: AtomicU64,
    pub(super) uncertain_settles: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}
