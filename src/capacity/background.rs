//! The background path: settling slices, retrying settles that failed,
//! topping up, rolling over at a period's end, `maintain` and `shutdown`.

use super::*;

impl<S: AsyncAllowanceStore> CapacityStore<S> {
    /// Settle the shape's lease, if any: what it admitted becomes usage,
    /// the rest returns. A settle that fails on store errors stays
    /// pending (see `settle_lease`).
    pub(super) async fn settle(&self, shape: &Shape, now: i64) {
        let (lease, consumed) = {
            let mut st = shape.state.lock();
            let Some(lease) = st.lease.take() else {
                return;
            };
            let consumed: SmallVec<[u64; 4]> = st.slices.iter().map(|s| s.consumed).collect();
            for s in &mut st.slices {
                s.granted = 0;
                s.consumed = 0;
                s.demand = 0;
            }
            st.last_settle_ms = now;
            (lease, consumed)
        };
        self.settle_lease(shape, lease, &consumed, now).await;
    }

    /// Settle `lease` (no longer the shape's current one), charging
    /// `consumed` as usage. Tried three times; then kept pending, and
    /// retried by every `maintain` and `shutdown` until it lands.
    pub(super) async fn settle_lease(
        &self,
        shape: &Shape,
        lease: LeaseId,
        consumed: &[u64],
        now: i64,
    ) {
        for _ in 0..SETTLE_TRIES {
            match self
                .try_settle(&shape.ops, &shape.owner, lease, consumed, now)
                .await
            {
                SettleTry::Done(Some(a)) => {
                    let mut st = shape.state.lock();
                    for (s, c) in st.slices.iter_mut().zip(&a.counters) {
                        s.base_used = c.used;
                        s.base_held_others = c.held.saturating_sub(s.granted);
                        s.period_start_ms = c.period_start_ms;
                        s.resets_at_ms = c.resets_at_ms;
                    }
                    for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
                        s.free = free_of(k, s);
                    }
                    return;
                }
                SettleTry::Done(None) => return,
                SettleTry::Retry => {}
            }
        }
        bump(&self.pending_count, 1);
        self.pending.lock().push(PendingSettle {
            ops: shape.ops.clone(),
            owner: shape.owner.clone(),
            lease,
            consumed: consumed.iter().copied().collect(),
        });
    }

    /// One try of a settle. The settle carries the event id
    /// `tollgate-capacity:{lease}`, so a retry after an unknown outcome
    /// is replayed by the store's ledger, never applied twice. If the
    /// lease is gone (expired, or forgotten after its expiry), what it
    /// admitted is charged as plain usage (mode `Force`, event id
    /// `tollgate-capacity:{lease}:late`): counted late, never lost.
    pub(super) async fn try_settle(
        &self,
        keys: &[OpKey],
        owner: &ScopeKey,
        lease: LeaseId,
        consumed: &[u64],
        now: i64,
    ) -> SettleTry {
        let ops: SmallVec<[CounterOp<'_>; 4]> = keys
            .iter()
            .zip(consumed)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let id = format!("tollgate-capacity:{lease}");
        let fingerprint = consumed.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &c| {
            (h ^ c).wrapping_mul(0x0100_0000_01b3)
        });
        let batch = Batch::new(&ops, Mode::Force, now)
            .with_lease(LeaseOp::new(
                lease,
                owner,
                LeaseAction::Settle {
                    keep: Fraction::ZERO,
                },
            ))
            .with_event(EventKey::new(&id, fingerprint));
        match self.call(&batch).await {
            Ok(a) => {
                bump(&self.counters.settles, 1);
                SettleTry::Done(Some(Box::new(a)))
            }
            Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. }) => SettleTry::Retry,
            // Settled by an earlier try whose answer was lost, and its
            // ledger entry forgotten since: charged then.
            Err(Error::ReservationSettled { .. }) => {
                bump(&self.counters.settles, 1);
                SettleTry::Done(None)
            }
            Err(Error::ReservationExpired { .. } | Error::UnknownReservation { .. }) => {
                let charged: SmallVec<[CounterOp<'_>; 4]> =
                    ops.iter().filter(|op| op.delta > 0).copied().collect();
                if charged.is_empty() {
                    bump(&self.counters.settles, 1);
                    return SettleTry::Done(None);
                }
                let late = format!("{id}:late");
                let batch = Batch::new(&charged, Mode::Force, now)
                    .with_event(EventKey::new(&late, fingerprint));
                match self.call(&batch).await {
                    Ok(_) => {
                        bump(&self.counters.settles, 1);
                        bump(&self.counters.late_charges, 1);
                        SettleTry::Done(None)
                    }
                    Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. }) => {
                        SettleTry::Retry
                    }
                    Err(_) => {
                        bump(&self.counters.lost_units, total(consumed));
                        SettleTry::Done(None)
                    }
                }
            }
            Err(_) => {
                bump(&self.counters.lost_units, total(consumed));
                SettleTry::Done(None)
            }
        }
    }

    /// Try every pending settle once more (up to 16 at once); keep the
    /// ones that fail again.
    pub(super) async fn retry_pending(&self, now: i64) {
        let mut work = std::mem::take(&mut *self.pending.lock());
        let tried = work.len() as u64;
        let failed = Mutex::new(Vec::new());
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|p| {
                    let failed = &failed;
                    Box::pin(async move {
                        if let SettleTry::Retry = self
                            .try_settle(&p.ops, &p.owner, p.lease, &p.consumed, now)
                            .await
                        {
                            failed.lock().push(p);
                        }
                    }) as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
        }
        let failed = failed.into_inner();
        self.pending_count
            .fetch_sub(tried - failed.len() as u64, Ordering::Relaxed);
        if !failed.is_empty() {
            self.pending.lock().extend(failed);
        }
    }

    /// Open a fresh slice, then settle the old one: local admits go on
    /// from the old slice while the new one opens. Falls back to settle
    /// and refill when the store refuses the new slice beside the old.
    pub(super) async fn roll_over(&self, shape: &Shape, now: i64) {
        let amounts: Option<SmallVec<[u64; 4]>> = {
            let st = shape.state.lock();
            shape
                .ops
                .iter()
                .zip(&st.slices)
                .map(|(k, s)| self.slice_size(k, s, s.last_delta, Some(s.free)))
                .collect()
        };
        let opened = match amounts {
            Some(amounts) => match self.open(shape, &amounts, now).await {
                Ok((id, a)) if a.applied => Some((id, amounts, a)),
                _ => None,
            },
            None => None,
        };
        let Some((id, amounts, a)) = opened else {
            self.settle(shape, now).await;
            self.refill(shape, None, now).await;
            return;
        };
        let old = {
            let mut st = shape.state.lock();
            let old = st.lease.replace(id).map(|lease| {
                let consumed: SmallVec<[u64; 4]> = st.slices.iter().map(|s| s.consumed).collect();
                (lease, consumed)
            });
            for ((s, &amt), c) in st.slices.iter_mut().zip(&amounts).zip(&a.counters) {
                s.granted = amt;
                s.consumed = 0;
                s.demand = 0;
                s.base_used = c.used;
                s.period_start_ms = c.period_start_ms;
                s.resets_at_ms = c.resets_at_ms;
            }
            st.expires_at_ms = now.saturating_add(ms(self.config.lease_ttl));
            st.use_until_ms = now.saturating_add(ms(self.config.lease_ttl) / 2);
            st.last_settle_ms = now;
            old
        };
        if let Some((lease, consumed)) = old {
            self.settle_lease(shape, lease, &consumed, now).await;
        }
    }

    /// Open a new lease holding `amounts`; the shape's state is untouched.
    pub(super) async fn open(
        &self,
        shape: &Shape,
        amounts: &[u64],
        now: i64,
    ) -> Result<(LeaseId, Applied), Error> {
        let ops: SmallVec<[CounterOp<'_>; 4]> = shape
            .ops
            .iter()
            .zip(amounts)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let id = LeaseId::random();
        let action = LeaseAction::Open {
            expires_at_ms: now.saturating_add(ms(self.config.lease_ttl)),
            deadline_ms: None,
        };
        let batch = Batch::new(&ops, Mode::WithinLimits, now).with_lease(LeaseOp::new(
            id,
            &shape.owner,
            action,
        ));
        Ok((id, self.call(&batch).await?))
    }

    pub(super) fn all_shapes(&self) -> Vec<Arc<Shape>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .values()
                    .flat_map(|l| l.iter().cloned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Background work, meant to run every [`CapacityConfig::top_up_interval`]
    /// at the engine clock's `now`: replace (open the next, settle the
    /// last) every slice that admitted anything since its last settle an
    /// interval or more ago, or has run half its lease; settle without
    /// replacing the slices near their calendar period's end and those
    /// idle for four intervals; top up slices three quarters used; forget
    /// idle shapes. First, it tries every pending settle again. Up to 16
    /// shapes' store calls run at once. Store errors are absorbed: a slice
    /// that cannot be topped up is grown or reopened on demand, and a
    /// settle that fails three times stays pending
    /// ([`CapacityStats::pending_settles`]) for the next pass.
    pub async fn maintain(&self, now: DateTime<Utc>) {
        let now = now.timestamp_millis();
        self.retry_pending(now).await;
        let mut work = Vec::new();
        for shape in self.all_shapes() {
            match self.job(&shape, now) {
                Job::None => {}
                Job::Forget => self.forget(&shape),
                job => work.push((shape, job)),
            }
        }
        // Up to `MAINTAIN_AT_ONCE` shapes' store calls in flight at once,
        // so a pass over many shapes stays within an interval.
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|(shape, job)| {
                    Box::pin(async move { self.run_job(&shape, job, now).await })
                        as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
        }
    }

    /// What `maintain` does with `shape` now; marks it busy for a job
    /// with store calls.
    pub(super) fn job(&self, shape: &Shape, now: i64) -> Job {
        let interval = ms(self.config.top_up_interval);
        let mut st = shape.state.lock();
        if st.busy {
            return Job::None;
        }
        // The clock stepped back: a last use in the future is a use now.
        st.last_use_ms = st.last_use_ms.min(now);
        let idle = now.saturating_sub(st.last_use_ms) > 4 * interval;
        if st.lease.is_none() {
            return if idle && now >= st.direct_until_ms {
                Job::Forget
            } else {
                Job::None
            };
        }
        let stale = !self.usable(shape, &st, now.saturating_add(interval));
        let used = st.slices.iter().any(|s| s.consumed > 0);
        // A last settle an interval or more in the future (the clock
        // stepped back) is due now, as one an interval in the past.
        let due = now.saturating_sub(st.last_settle_ms) >= interval
            || st.last_settle_ms.saturating_sub(now) >= interval;
        let low = st
            .slices
            .iter()
            .any(|s| s.granted > 0 && s.consumed >= s.granted / 4 * 3);
        if idle || stale || (used && due) {
            st.busy = true;
            Job::Flush {
                reopen: !idle && !self.near_end(shape, &st, now),
            }
        } else if low {
            st.busy = true;
            Job::TopUp
        } else {
            Job::None
        }
    }

    pub(super) async fn run_job(&self, shape: &Shape, job: Job, now: i64) {
        match job {
            Job::None | Job::Forget => {}
            Job::Flush { reopen: true } => self.roll_over(shape, now).await,
            Job::Flush { reopen: false } => self.settle(shape, now).await,
            Job::TopUp => {
                let lease = shape.state.lock().lease;
                self.refill(shape, lease, now).await;
            }
        }
        shape.state.lock().busy = false;
    }

    /// Open (or grow) a slice sized from demand, if there is room to share.
    pub(super) async fn refill(&self, shape: &Shape, lease: Option<LeaseId>, now: i64) {
        let amounts: Option<SmallVec<[u64; 4]>> = {
            let st = shape.state.lock();
            shape
                .ops
                .iter()
                .zip(&st.slices)
                .map(|(k, s)| {
                    let free = s.free.saturating_sub(s.granted.saturating_sub(s.consumed));
                    self.slice_size(k, s, s.last_delta, Some(free))
                })
                .collect()
        };
        let Some(amounts) = amounts else {
            return;
        };
        if let Ok(a) = self.take(shape, lease, &amounts, now).await {
            if a.applied {
                let mut st = shape.state.lock();
                for ((s, &amt), c) in st.slices.iter_mut().zip(&amounts).zip(&a.counters) {
                    s.granted = s.granted.saturating_add(amt);
                    s.base_used = c.used;
                    s.base_held_others = c.held.saturating_sub(s.granted);
                    s.demand = 0;
                }
                for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
                    s.free = free_of(k, s);
                }
            }
        }
    }

    pub(super) fn forget(&self, shape: &Arc<Shape>) {
        let mut shard = self.shard(self.hash_keys(&shape.ops)).write();
        for list in shard.values_mut() {
            let before = list.len();
            list.retain(|s| {
                // Still idle and leaseless under the shard lock: its
                // counts move to the store's.
                !(Arc::ptr_eq(s, shape) && {
                    let mut st = s.state.lock();
                    let gone = st.lease.is_none() && !st.busy;
                    if gone {
                        st.gone = true;
                        bump(&self.counters.local_admits, st.local_admits);
                        bump(&self.counters.local_checks, st.local_checks);
                    }
                    gone
                })
            });
            if list.len() < before {
                self.shapes.fetch_sub(1, Ordering::Relaxed);
            }
        }
        shard.retain(|_, l| !l.is_empty());
    }

    pub(super) fn hash_keys(&self, keys: &[OpKey]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for k in keys {
            k.scope.hash(&mut h);
            h.write_usize(k.meter.as_str().as_ptr() as usize);
            k.window.hash(&mut h);
            k.max.hash(&mut h);
        }
        h.finish()
    }

    /// Give every slice back (their admitted parts become usage), try every
    /// pending settle again, and send every later batch straight to the
    /// store. Call it before the process exits; a replica that never calls
    /// it loses its unsettled admissions and its holds return at their
    /// lease's expiry. Settles that fail on a store error stay pending
    /// ([`CapacityStats::pending_settles`]): call it again to retry them.
    pub async fn shutdown(&self, now: DateTime<Utc>) {
        self.closed.store(true, Ordering::Relaxed);
        let now = now.timestamp_millis();
        for shape in self.all_shapes() {
            // Wait out a running slow path: it clears `busy` when done.
            while !claim(&shape) {
                tokio_free_yield().await;
            }
            self.settle(&shape, now).await;
            shape.state.lock().busy = false;
        }
        self.retry_pending(now).await;
    }
}
