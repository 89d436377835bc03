//! The background path: settling slices, retrying settles that failed,
//! topping up, rolling over at a period's end, `maintain` and `shutdown`.

use super::*;

impl<S: AsyncAllowanceStore> CapacityStore<S> {
    /// Settle the shape's lease, if any: what it admitted becomes usage,
    /// the rest returns. A settle that fails on store errors, or whose
    /// future is dropped, stays pending (see `settle_lease`).
    pub(super) async fn settle(&self, shape: &Shape, now: i64) {
        // Taken out of the shape and into its guard under one lock, with
        // no await between.
        let unsettled = {
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
            self.unsettled(shape, lease, consumed)
        };
        self.settle_lease(shape, unsettled, now).await;
    }

    /// The guard of a settle of `lease` (no longer the shape's current
    /// one), charging `consumed`.
    pub(super) fn unsettled(
        &self,
        shape: &Shape,
        lease: LeaseId,
        consumed: SmallVec<[u64; 4]>,
    ) -> Unsettled<'_, S> {
        Unsettled {
            store: self,
            item: Some(PendingSettle {
                ops: shape.ops.clone(),
                owner: shape.owner.clone(),
                lease,
                consumed,
                maybe_applied: false,
            }),
            counted: false,
        }
    }

    /// Settle the lease `unsettled` holds. Tried three times; then kept
    /// pending, and retried by every `maintain` and `shutdown` until it
    /// lands. Dropped before it landed, it is kept pending too.
    pub(super) async fn settle_lease(
        &self,
        shape: &Shape,
        mut unsettled: Unsettled<'_, S>,
        now: i64,
    ) {
        for _ in 0..SETTLE_TRIES {
            let Some(p) = unsettled.item.as_mut() else {
                return;
            };
            match self.try_settle(p, now).await {
                SettleTry::Done(Some(a)) => {
                    unsettled.done();
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
                SettleTry::Done(None) => {
                    unsettled.done();
                    return;
                }
                SettleTry::Retry { unknown } => p.maybe_applied |= unknown,
            }
        }
        // Dropped here: pending.
    }

    /// One try of a settle. The settle carries the event id
    /// `tollgate-capacity:{lease}`, so a retry after an unknown outcome
    /// is replayed by the store's ledger, never applied twice. If the
    /// lease is gone (expired, or forgotten after its expiry), what it
    /// admitted is charged as plain usage (mode `Force`, event id
    /// `tollgate-capacity:{lease}:late`): counted late, never lost —
    /// unless an earlier try's outcome was unknown and the store has
    /// forgotten the lease (`UnknownReservation`): that try may have
    /// settled it, so nothing is charged and the settle is counted in
    /// [`CapacityStats::uncertain_settles`].
    pub(super) async fn try_settle(&self, p: &PendingSettle, now: i64) -> SettleTry {
        let (keys, owner, lease, consumed) = (&p.ops, &p.owner, p.lease, &p.consumed[..]);
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
            Err(Error::Store { .. }) => SettleTry::Retry { unknown: false },
            Err(Error::StoreOutcomeUnknown { .. }) => SettleTry::Retry { unknown: true },
            // Settled by an earlier try whose answer was lost, and its
            // ledger entry forgotten since: charged then.
            Err(Error::ReservationSettled { .. }) => {
                bump(&self.counters.settles, 1);
                SettleTry::Done(None)
            }
            // Forgotten, after a try that may have settled it: charging
            // it now could count it twice; not charging may miss it once.
            Err(Error::UnknownReservation { .. }) if p.maybe_applied => {
                bump(&self.counters.uncertain_settles, 1);
                SettleTry::Done(None)
            }
            // Expired unsettled (a settled lease reads as settled), or
            // forgotten with no try that could have settled it.
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
                    // The late charge's own id makes its retry safe; the
                    // settle itself did not apply.
                    Err(Error::Store { .. } | Error::StoreOutcomeUnknown { .. }) => {
                        SettleTry::Retry { unknown: false }
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
    /// ones that fail again. Each stays in a guard while it is tried: a
    /// pass dropped midway puts every settle it had not finished back.
    pub(super) async fn retry_pending(&self, now: i64) {
        let mut work: Vec<Unsettled<'_, S>> = std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .map(|p| Unsettled {
                store: self,
                item: Some(p),
                counted: true,
            })
            .collect();
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|mut u| {
                    Box::pin(async move {
                        let Some(p) = u.item.as_mut() else {
                            return;
                        };
                        match self.try_settle(p, now).await {
                            SettleTry::Done(_) => u.done(),
                            // Back to the list when `u` drops.
                            SettleTry::Retry { unknown } => p.maybe_applied |= unknown,
                        }
                    }) as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
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
            if st.gone {
                // `shutdown` gave the shape up while the slice opened:
                // give the new one back (nothing admitted from it).
                Err(self.unsettled(shape, id, SmallVec::from_elem(0, amounts.len())))
            } else {
                let old = st.lease.replace(id).map(|lease| {
                    let consumed: SmallVec<[u64; 4]> =
                        st.slices.iter().map(|s| s.consumed).collect();
                    self.unsettled(shape, lease, consumed)
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
                Ok(old)
            }
        };
        match old {
            Ok(Some(unsettled)) | Err(unsettled) => self.settle_lease(shape, unsettled, now).await,
            Ok(None) => {}
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
                // `job` marked it busy: unmarked when the job ends or is
                // dropped.
                job => work.push((Claimed::marked(shape), job)),
            }
        }
        // Up to `MAINTAIN_AT_ONCE` shapes' store calls in flight at once,
        // so a pass over many shapes stays within an interval.
        while !work.is_empty() {
            let chunk: Vec<_> = work
                .drain(..work.len().min(MAINTAIN_AT_ONCE))
                .map(|(claimed, job)| {
                    Box::pin(async move { self.run_job(&claimed.0, job, now).await })
                        as Pin<Box<dyn Future<Output = ()> + Send + '_>>
                })
                .collect();
            JoinAll(chunk.into_iter().map(Some).collect()).await;
        }
    }

    /// What `maintain` does with `shape` now; marks it busy for a job
    /// with store calls. After `shutdown`, a slice is settled, never
    /// replaced.
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
                reopen: !idle
                    && !self.near_end(shape, &st, now)
                    && !self.closed.load(Ordering::Relaxed),
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
    ///
    /// A shape whose store call is running (an admit growing its slice, a
    /// `maintain` job) is waited for, at most four top-up intervals from
    /// the start of the call for all of them together; past that (a hung
    /// store call) its slice is settled anyway and the shape is given up: the running call's batch goes to the store, and a
    /// slice it opens meanwhile is given back at once.
    pub async fn shutdown(&self, now: DateTime<Utc>) {
        self.closed.store(true, Ordering::Relaxed);
        let now = now.timestamp_millis();
        // One bound for every busy shape together.
        let started = std::time::Instant::now();
        let wait = self.config.top_up_interval.saturating_mul(4);
        for shape in self.all_shapes() {
            let claimed = loop {
                if let Some(c) = Claimed::try_new(&shape) {
                    break Some(c);
                }
                if started.elapsed() >= wait {
                    break None;
                }
                tokio_free_yield().await;
            };
            if claimed.is_none() {
                shape.state.lock().gone = true;
            }
            self.settle(&shape, now).await;
            drop(claimed);
        }
        self.retry_pending(now).await;
    }
}
