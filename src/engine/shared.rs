//! Allocations every replica shares: a source the engine asks on a miss or
//! when its copy is older than a bound, and the audit of every change.
//!
//! Without a source an engine's allocations live in its own process: a
//! replica started later does not know a subject another one allocated.
//! With [`Engine::with_allocation_source`] (or the async twin) the host's
//! system of record, or a shared store's implementation
//! ([`MemoryAllocations`] in one process; `RedisAllocations` with feature
//! `redis`), is the truth and each engine keeps a cache of it:
//!
//! - **A miss asks the source.** A subject the engine has not seen is
//!   loaded, resolved against the catalog and cached.
//! - **Staleness is bounded.** A cached allocation older than `max_age` is
//!   loaded again by the next call that needs it, so a change made through
//!   any replica (or by the host directly in the source) is enforced by
//!   every replica at most `max_age` after it was saved, on the engine's
//!   clock (a copy whose load time is ahead of the clock, after a step
//!   back, counts as stale). `max_age` zero asks the source on every call.
//! - **Writes go through.** [`Engine::allocate`] and
//!   [`Engine::deallocate`] (or their `_async` twins) write the source
//!   first, then the cache: an error from the source changes nothing.
//! - **A source that fails keeps what is cached.** A refresh that fails
//!   leaves the cached allocation in force (and retried after another
//!   `max_age`); with nothing cached the call fails with the source's
//!   error.
//! - **A bad allocation from the source is refused.** One naming a plan,
//!   pool or meter the catalog lacks is [`Error::InvalidAllocation`]
//!   naming the subject; a cached earlier allocation stays in force (and
//!   the refusal reaches the observer's
//!   [`on_audit`](super::Observer::on_audit) as
//!   [`AuditChange::Rejected`]).
//! - **Unknown subjects are not cached.** Each call for a subject the
//!   source does not know asks the source again (a cache of misses would
//!   grow with every id a caller invents).
//!
//! An engine without a source keeps its allocations as before; nothing of
//! this costs it more than one branch per call.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::allocations::{Allocation, Resolved};
use super::audit::{AuditChange, AuditEvent};
use super::Engine;
use crate::clock::Clock;
use crate::Error;

/// The system of record for allocations, shared by every replica (sync).
///
/// A host with its own database implements it over its tables; the crate
/// ships [`MemoryAllocations`] (one process) and, with feature `redis`,
/// `RedisAllocations`.
pub trait AllocationSource: Send + Sync {
    /// The allocation of `subject`; `None` if it has none.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails.
    fn load(&self, subject: &str) -> Result<Option<Allocation>, Error>;

    /// Save `allocation`, replacing the subject's; the one it replaced.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails; then nothing was saved.
    fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error>;

    /// Remove `subject`'s allocation; the one removed.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails; then nothing was removed.
    fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error>;
}

/// [`AllocationSource`] for the engine's async calls (feature `async`).
#[cfg(feature = "async")]
#[async_trait::async_trait]
pub trait AsyncAllocationSource: Send + Sync {
    /// The allocation of `subject`; `None` if it has none.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails.
    async fn load(&self, subject: &str) -> Result<Option<Allocation>, Error>;

    /// Save `allocation`, replacing the subject's; the one it replaced.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails; then nothing was saved.
    async fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error>;

    /// Remove `subject`'s allocation; the one removed.
    ///
    /// # Errors
    /// [`Error::Store`] if the source fails; then nothing was removed.
    async fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error>;
}

/// Allocations in one process's memory, shared by the engines that hold a
/// clone (an `Arc` inside): replicas in one process, or tests. Implements
/// both the sync and the async source.
#[derive(Debug, Clone, Default)]
pub struct MemoryAllocations {
    map: Arc<Mutex<HashMap<String, Allocation>>>,
}

impl MemoryAllocations {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subjects allocated.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no subject is allocated.
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }
}

impl AllocationSource for MemoryAllocations {
    fn load(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        Ok(self.map.lock().get(subject).cloned())
    }

    fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error> {
        Ok(self
            .map
            .lock()
            .insert(allocation.subject.clone(), allocation.clone()))
    }

    fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        Ok(self.map.lock().remove(subject))
    }
}

#[cfg(feature = "async")]
#[async_trait::async_trait]
impl AsyncAllocationSource for MemoryAllocations {
    async fn load(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        AllocationSource::load(self, subject)
    }

    async fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error> {
        AllocationSource::save(self, allocation)
    }

    async fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        AllocationSource::remove(self, subject)
    }
}

/// An engine's source and how old its cached copies may get.
pub(super) struct Shared {
    pub(super) source: Source,
    /// Cached allocations older than this (ms) are loaded again.
    pub(super) max_age_ms: i64,
}

/// The source, sync or async.
pub(super) enum Source {
    Sync(Arc<dyn AllocationSource>),
    #[cfg(feature = "async")]
    Async(Arc<dyn AsyncAllocationSource>),
}

/// What a cache lookup found, for a source-backed engine.
pub(super) enum Cached {
    /// Fresh enough: use it.
    Fresh(Arc<Resolved>),
    /// Missing or too old: ask the source (the stale copy, if any).
    Stale(Option<Arc<Resolved>>),
}

impl<S, C: Clock> Engine<S, C> {
    /// The allocation of `subject` on an engine with a source: the cached
    /// copy while fresh, else the source's (a sync source is asked here;
    /// an async one was asked by the async call before its stages, so
    /// what is cached is used).
    #[inline(never)]
    pub(super) fn shared_allocation_of(
        &self,
        shared: &Shared,
        subject: &str,
    ) -> Result<Arc<Resolved>, Error> {
        match self.cached(shared, subject) {
            Cached::Fresh(r) => Ok(r),
            Cached::Stale(stale) => match &shared.source {
                Source::Sync(src) => self.take_loaded(subject, stale, src.load(subject)),
                #[cfg(feature = "async")]
                Source::Async(_) => stale.ok_or_else(|| super::prepare::unknown_subject(subject)),
            },
        }
    }

    /// Before an async call's stages: load `subject`'s allocation from an
    /// async source if the cached copy is missing or too old.
    ///
    /// # Errors
    /// The source's error with nothing cached, or
    /// [`Error::InvalidAllocation`] / [`Error::UnknownSubject`] as
    /// [`Engine::take_loaded`] says.
    #[cfg(feature = "async")]
    pub(super) async fn refresh_async(&self, subject: &str) -> Result<(), Error> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let Source::Async(src) = &shared.source else {
            return Ok(());
        };
        if let Cached::Stale(stale) = self.cached(shared, subject) {
            let loaded = src.load(subject).await;
            self.take_loaded(subject, stale, loaded)?;
        }
        Ok(())
    }

    /// [`Engine::allocate`] on an engine whose source is async (on any
    /// other engine, the same as `allocate`).
    ///
    /// # Errors
    /// As [`Engine::allocate`].
    #[cfg(feature = "async")]
    pub async fn allocate_async(&self, allocation: Allocation) -> Result<(), Error> {
        self.allocate_async_by(allocation, None).await
    }

    /// [`Engine::allocate_async`], audited as made by `actor`.
    ///
    /// # Errors
    /// As [`Engine::allocate`].
    #[cfg(feature = "async")]
    pub async fn allocate_as_async(
        &self,
        allocation: Allocation,
        actor: &str,
    ) -> Result<(), Error> {
        self.allocate_async_by(allocation, Some(actor)).await
    }

    #[cfg(feature = "async")]
    async fn allocate_async_by(
        &self,
        allocation: Allocation,
        actor: Option<&str>,
    ) -> Result<(), Error> {
        let Some(Shared {
            source: Source::Async(src),
            ..
        }) = &self.shared
        else {
            return self.allocate_by(allocation, actor);
        };
        let saved = allocation.clone();
        let (key, resolved) = Resolved::new(&self.catalog, allocation, self.clock.now_ms())?;
        let before = src.save(&saved).await?;
        self.bind(key, resolved, before, true, actor);
        Ok(())
    }

    /// [`Engine::deallocate`] on an engine whose source is async (on any
    /// other engine, the same as `deallocate`).
    ///
    /// # Errors
    /// As [`Engine::deallocate`].
    #[cfg(feature = "async")]
    pub async fn deallocate_async(&self, subject: &str) -> Result<bool, Error> {
        self.deallocate_async_by(subject, None).await
    }

    /// [`Engine::deallocate_async`], audited as made by `actor`.
    ///
    /// # Errors
    /// As [`Engine::deallocate`].
    #[cfg(feature = "async")]
    pub async fn deallocate_as_async(&self, subject: &str, actor: &str) -> Result<bool, Error> {
        self.deallocate_async_by(subject, Some(actor)).await
    }

    #[cfg(feature = "async")]
    async fn deallocate_async_by(&self, subject: &str, actor: Option<&str>) -> Result<bool, Error> {
        let Some(Shared {
            source: Source::Async(src),
            ..
        }) = &self.shared
        else {
            return self.deallocate_by(subject, actor);
        };
        let before = src.remove(subject).await?;
        Ok(self.unbind(subject, before, true, actor))
    }

    /// The cached allocation of `subject`, and whether it is fresh enough
    /// under `shared`'s bound.
    pub(super) fn cached(&self, shared: &Shared, subject: &str) -> Cached {
        let hit = self.allocations.get(subject);
        match hit {
            // A copy loaded "after" now (the clock stepped back) is stale
            // too: the bound holds whichever way the clock moves.
            Some(r)
                if (0..shared.max_age_ms)
                    .contains(&self.clock.now_ms().saturating_sub(r.loaded_ms())) =>
            {
                Cached::Fresh(r)
            }
            other => Cached::Stale(other),
        }
    }

    /// Cache what the source answered for `subject` (`stale`: the copy the
    /// engine had): the allocation resolved and in force, or the error.
    pub(super) fn take_loaded(
        &self,
        subject: &str,
        stale: Option<Arc<Resolved>>,
        loaded: Result<Option<Allocation>, Error>,
    ) -> Result<Arc<Resolved>, Error> {
        let now_ms = self.clock.now_ms();
        match loaded {
            // A failing source: what is cached stays in force for another
            // `max_age`, so a source outage does not fail every call.
            Err(e) => match stale {
                Some(r) => Ok(r.confirm(now_ms)),
                None => Err(e),
            },
            Ok(None) => {
                if stale.is_some() {
                    self.allocations.remove(subject);
                }
                Err(super::prepare::unknown_subject(subject))
            }
            Ok(Some(a)) if a.subject != subject => self.reject_loaded(
                subject,
                stale,
                now_ms,
                "the source answered another subject",
            ),
            Ok(Some(a)) => {
                if let Some(r) = &stale {
                    if r.same_as(&a) {
                        return Ok(r.confirm(now_ms));
                    }
                }
                match Resolved::new(&self.catalog, a, now_ms) {
                    Ok((key, resolved)) => Ok(self.allocations.insert(key, resolved).0),
                    Err(e) => self.reject_loaded(subject, stale, now_ms, &e.to_string()),
                }
            }
        }
    }

    /// A bad allocation from the source: refused, the cached one (if any)
    /// kept in force until the next refresh, the observer told.
    #[cold]
    fn reject_loaded(
        &self,
        subject: &str,
        stale: Option<Arc<Resolved>>,
        now_ms: i64,
        reason: &str,
    ) -> Result<Arc<Resolved>, Error> {
        let err = Error::InvalidAllocation {
            subject: subject.to_owned(),
            reason: reason.to_owned(),
        };
        self.audit(AuditEvent::new(
            subject,
            AuditChange::Rejected {
                reason: err.to_string(),
            },
            stale.as_ref().map(|r| r.allocation()),
            None,
            crate::store::ms_to_time(now_ms),
            None,
        ));
        match stale {
            Some(r) => Ok(r.confirm(now_ms)),
            None => Err(err),
        }
    }

    /// Bind locally and audit: the tail of every `allocate`. `before` is
    /// the source's answer when `from_source`, else the local table's is
    /// used.
    pub(super) fn bind(
        &self,
        key: Arc<str>,
        resolved: Resolved,
        before: Option<Allocation>,
        from_source: bool,
        actor: Option<&str>,
    ) {
        let after = self.observer.is_some().then(|| resolved.allocation());
        let (_, replaced) = self.allocations.insert(key.clone(), resolved);
        if let Some(after) = after {
            let before = if from_source {
                before
            } else {
                replaced.map(|r| r.allocation())
            };
            if let Some(change) = AuditChange::between(before.as_ref(), &after) {
                let now = self.clock.now();
                self.audit(AuditEvent::new(
                    &key,
                    change,
                    before,
                    Some(after),
                    now,
                    actor,
                ));
            }
        }
    }

    /// Unbind locally and audit: the tail of every `deallocate`; whether
    /// the subject was allocated (by the source's answer when
    /// `from_source`).
    pub(super) fn unbind(
        &self,
        subject: &str,
        before: Option<Allocation>,
        from_source: bool,
        actor: Option<&str>,
    ) -> bool {
        let local = self.allocations.remove(subject);
        let before = if from_source {
            before
        } else {
            local.map(|r| r.allocation())
        };
        let was = before.is_some();
        if was && self.observer.is_some() {
            let now = self.clock.now();
            self.audit(AuditEvent::new(
                subject,
                AuditChange::Removed,
                before,
                None,
                now,
                actor,
            ));
        }
        was
    }

    /// Show `event` to the observer, if there is one.
    pub(super) fn audit(&self, event: AuditEvent) {
        if let Some(o) = &self.observer {
            o.on_audit(&event);
        }
    }
}
