//! [`CapacityConfig`]: how a capacity store sizes, tops up and gives back its slices.

use super::*;

/// How a [`CapacityStore`] sizes, tops up and gives back its slices.
///
/// Build one with [`CapacityConfig::new`] and change what you need; a
/// [`CapacityStore::new`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityConfig {
    pub(super) replicas: u32,
    pub(super) lease_ttl: Duration,
    pub(super) top_up_interval: Duration,
    pub(super) slice_decisions: u32,
    pub(super) min_slice_decisions: u32,
    pub(super) max_shapes: usize,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl CapacityConfig {
    /// The defaults: 8 replicas, a 30 s lease, a 100 ms top-up interval,
    /// slices of 64 requests, straight to the store below 4 requests a
    /// slice, at most 65,536 shapes with slices out.
    pub fn new() -> Self {
        Self {
            replicas: 8,
            lease_ttl: Duration::from_secs(30),
            top_up_interval: Duration::from_millis(100),
            slice_decisions: 64,
            min_slice_decisions: 4,
            max_shapes: 65_536,
        }
    }

    /// How many engines share the store (default 8): a slice takes at most
    /// `1 / replicas` of what is free. At least 1.
    #[must_use]
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long a slice's lease lasts (default 30 s): a killed replica's
    /// holds return this long after they were last opened. At least four
    /// top-up intervals.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often [`CapacityStore::maintain`] is meant to run (default
    /// 100 ms): the usage-report lag, and the slice sizing's unit of time.
    /// At least 1 ms.
    #[must_use]
    pub fn top_up_interval(mut self, interval: Duration) -> Self {
        self.top_up_interval = interval;
        self
    }

    /// How many requests of the last size a fresh slice covers at least
    /// (default 64). At least `min_slice_decisions`.
    #[must_use]
    pub fn slice_decisions(mut self, n: u32) -> Self {
        self.slice_decisions = n;
        self
    }

    /// Below this many requests of the current size in a slice, a shape
    /// goes straight to the store (default 4). At least 1.
    #[must_use]
    pub fn min_slice_decisions(mut self, n: u32) -> Self {
        self.min_slice_decisions = n;
        self
    }

    /// At most this many shapes hold slices at once (default 65,536);
    /// past it, new shapes go straight to the store. At least 1.
    #[must_use]
    pub fn max_shapes(mut self, n: usize) -> Self {
        self.max_shapes = n;
        self
    }

    /// The configured top-up interval (how often to call
    /// [`CapacityStore::maintain`]).
    pub fn top_up_interval_value(&self) -> Duration {
        self.top_up_interval
    }

    /// The configured lease time.
    pub fn lease_ttl_value(&self) -> Duration {
        self.lease_ttl
    }

    /// The configured replica count.
    pub fn replicas_value(&self) -> u32 {
        self.replicas
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        let bad =
            |field: &str, reason: &str| Err(Error::config(format!("capacity.{field}"), reason));
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1");
        }
        if self.top_up_interval < Duration::from_millis(1) {
            return bad("top_up_interval", "must be at least 1 ms");
        }
        if self.top_up_interval > Duration::from_secs(86_400) {
            return bad("top_up_interval", "must be at most a day");
        }
        if self.lease_ttl < self.top_up_interval.saturating_mul(4) {
            return bad("lease_ttl", "must be at least four top-up intervals");
        }
        if self.lease_ttl > Duration::from_secs(86_400 * 7) {
            return bad("lease_ttl", "must be at most a week");
        }
        if self.min_slice_decisions == 0 {
            return bad("min_slice_decisions", "must be at least 1");
        }
        if self.slice_decisions < self.min_slice_decisions {
            return bad("slice_decisions", "must be at least min_slice_decisions");
        }
        if self.max_shapes == 0 {
            return bad("max_shapes", "must be at least 1");
        }
        Ok(())
    }
}
