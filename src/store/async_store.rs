//! The async form of the storage seam, for network backends (feature
//! `async`).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{AllowanceStore, Applied, Batch, LeaseInfo, MemoryStore, PeriodOp};
use crate::Error;

/// What the engine's async calls do when the store fails ([`Error::Store`]:
/// an outage; [`Error::StoreOutcomeUnknown`]: a timeout after the call
/// left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailurePolicy {
    /// The call returns the store's `Err`: nothing is admitted while the
    /// store is unreachable. The safe default.
    #[default]
    FailClosed,
    /// `check_async`, `admit_async` and `record_async` answer an allowing
    /// [`Decision`](crate::Decision) marked
    /// [`allowed_on_error`](crate::Decision::allowed_on_error), which the
    /// observer sees like any other; nothing is recorded, so usage during
    /// the outage is lost. Reservation calls (`reserve_async`, `renew_async`,
    /// `grow_async`, `commit_async`, `release_async`), `usage_async` and
    /// `overdue_async` still fail closed: a reservation without a lease
    /// cannot be made up. So does a priced request on a plan that spends a
    /// prepaid balance: failing open would give its money away.
    FailOpen,
}

/// The async twin of [`AllowanceStore`]: the same contract (see the
/// [module docs](super)), with async methods, for backends that talk to a
/// server. [`MemoryStore`] implements both forms.
///
/// The engine's `*_async` calls (`Engine::admit_async` and the others) take
/// a store of this trait.
#[async_trait]
pub trait AsyncAllowanceStore: Send + Sync {
    /// Apply `batch` atomically and report every counter it names.
    ///
    /// # Errors
    /// As [`AllowanceStore::apply`]: [`Error::Overflow`],
    /// [`Error::InvalidBatch`], the reservation errors,
    /// [`Error::EventConflict`] — nothing changes in any of these cases;
    /// [`Error::Store`] if the backend fails or times out.
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error>;

    /// Live leases whose deadline is at or before `now`, oldest deadline
    /// first.
    ///
    /// # Errors
    /// [`Error::Store`] if the backend fails or times out.
    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error>;

    /// As [`AllowanceStore::history_periods`]: how many closed periods of
    /// each calendar counter the store keeps. Default 0.
    fn history_periods(&self) -> u32 {
        0
    }

    /// As [`AllowanceStore::period_usage`]: the usage each op's counter
    /// counted in the calendar period starting at its `start_ms`.
    ///
    /// # Errors
    /// [`Error::InvalidBatch`] for an op that names no calendar period;
    /// [`Error::HistoryNotKept`] from a store that keeps none (the
    /// default); [`Error::Store`] if the backend fails or times out.
    async fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        let _ = (ops, now_ms);
        Err(super::history::no_history())
    }

    /// What the engine does when this store fails. Fail closed unless the
    /// backend is configured otherwise.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::FailClosed
    }

    /// Whether a call may end without its outcome known
    /// ([`Error::StoreOutcomeUnknown`]): a network store. The engine then
    /// gives every `admit_async`, `record_async` and `commit_async` an
    /// event id when the host gave none, so a retry counts once (see the
    /// [store contract](super#ambiguous-outcomes)). Default `false`.
    fn needs_event_ids(&self) -> bool {
        false
    }
}

#[async_trait]
impl AsyncAllowanceStore for MemoryStore {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        AllowanceStore::apply(self, batch)
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        AllowanceStore::overdue(self, now)
    }

    fn history_periods(&self) -> u32 {
        AllowanceStore::history_periods(self)
    }

    async fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        AllowanceStore::period_usage(self, ops, now_ms)
    }
}

#[async_trait]
impl<T: AsyncAllowanceStore + ?Sized> AsyncAllowanceStore for Arc<T> {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        (**self).apply(batch).await
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        (**self).overdue(now).await
    }

    fn failure_policy(&self) -> FailurePolicy {
        (**self).failure_policy()
    }

    fn needs_event_ids(&self) -> bool {
        (**self).needs_event_ids()
    }

    fn history_periods(&self) -> u32 {
        (**self).history_periods()
    }

    async fn period_usage(&self, ops: &[PeriodOp<'_>], now_ms: i64) -> Result<Vec<u64>, Error> {
        (**self).period_usage(ops, now_ms).await
    }
}
