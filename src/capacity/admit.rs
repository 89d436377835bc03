//! The local path: which batches a capacity store decides itself, and how
//! it decides them from its slices (growing them in one round trip when
//! they fall short).

use super::*;

impl<S: AsyncAllowanceStore> CapacityStore<S> {
    pub(super) async fn call(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        bump(&self.counters.store_calls, 1);
        self.inner.apply(batch).await
    }

    pub(super) async fn pass(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        bump(&self.counters.passed_through, 1);
        self.call(batch).await
    }

    /// Whether `batch` may be decided from slices.
    pub(super) fn eligible(&self, batch: &Batch<'_>) -> bool {
        if self.closed.load(Ordering::Relaxed)
            || batch.lease.is_some()
            || batch.balance.is_some()
            || !batch.cooldowns.is_empty()
            || batch.ops.is_empty()
            || batch.ops.len() > 16
            || !matches!(batch.mode, Mode::WithinLimits | Mode::Check)
            || batch.ops.iter().all(|op| op.delta == 0)
            || batch
                .ops
                .iter()
                .any(|op| matches!(op.window, Window::Concurrent))
        {
            return false;
        }
        // Only an id the engine made for this very call (no earlier try of
        // it exists): any other, a host's retry with an id the engine once
        // made included, is applied once by the store's ledger.
        batch.event.is_none_or(|ev| ev.engine_made())
    }

    pub(super) fn hash_ops(&self, ops: &[CounterOp<'_>]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for op in ops {
            op.scope.hash(&mut h);
            // Interned: one name, one address.
            h.write_usize(op.meter.as_str().as_ptr() as usize);
            op.window.hash(&mut h);
            op.max.hash(&mut h);
        }
        h.finish()
    }

    pub(super) fn shard(&self, hash: u64) -> &Shard {
        // The shard count is a power of two; the low bits pick it.
        &self.shards[usize::try_from(hash % SHARDS as u64).unwrap_or(0)]
    }

    pub(super) fn find(&self, hash: u64, ops: &[CounterOp<'_>]) -> Option<Arc<Shape>> {
        let shard = self.shard(hash).read();
        shard
            .get(&hash)?
            .iter()
            .find(|s| same_ops(s, ops))
            .map(Arc::clone)
    }

    pub(super) fn find_or_add(
        &self,
        hash: u64,
        ops: &[CounterOp<'_>],
        now: i64,
    ) -> Option<Arc<Shape>> {
        if let Some(s) = self.find(hash, ops) {
            return Some(s);
        }
        let mut shard = self.shard(hash).write();
        let list = shard.entry(hash).or_default();
        if let Some(s) = list.iter().find(|s| same_ops(s, ops)) {
            return Some(Arc::clone(s));
        }
        if self.shapes.load(Ordering::Relaxed) >= self.config.max_shapes as u64 {
            return None;
        }
        self.shapes.fetch_add(1, Ordering::Relaxed);
        let shape = Arc::new(Shape {
            ops: ops
                .iter()
                .map(|op| OpKey {
                    scope: op.scope.clone(),
                    meter: op.meter,
                    window: op.window,
                    max: op.max,
                })
                .collect(),
            owner: ops[0].scope.clone(),
            // In use from its making: not idle for `maintain` to forget
            // before its first decision.
            state: Mutex::new(ShapeState {
                slices: SmallVec::from_elem(OpSlice::default(), ops.len()),
                last_use_ms: now,
                ..ShapeState::default()
            }),
        });
        list.push(Arc::clone(&shape));
        Some(shape)
    }

    /// The answer of a decision taken from `st`'s slices.
    pub(super) fn local_answer(st: &ShapeState, applied: bool) -> Applied {
        let mut a = Applied {
            applied,
            ..Applied::default()
        };
        for s in &st.slices {
            let c = CounterState {
                used: s.base_used.saturating_add(s.consumed),
                held: s.base_held_others,
                period_start_ms: s.period_start_ms,
                resets_at_ms: s.resets_at_ms,
                ..CounterState::default()
            };
            a.counters.push(c);
        }
        a
    }

    /// The end of the earliest calendar period among `st`'s counters.
    pub(super) fn period_end(shape: &Shape, st: &ShapeState) -> Option<i64> {
        shape
            .ops
            .iter()
            .zip(&st.slices)
            .filter(|(k, _)| matches!(k.window, Window::Calendar { .. }))
            .filter_map(|(_, s)| s.resets_at_ms)
            .min()
    }

    pub(super) fn usable(&self, shape: &Shape, st: &ShapeState, now: i64) -> bool {
        st.lease.is_some()
            && now < st.use_until_ms
            && Self::period_end(shape, st)
                .is_none_or(|end| now < end.saturating_sub(2 * ms(self.config.top_up_interval)))
    }

    /// The slice to ask for on op `i` beyond what a request needs: demand
    /// sized, at most `free / replicas`; `None` when too small to share.
    /// `free` unknown (a shape's first slice) is taken as the whole
    /// maximum. An unlimited counter's maximum is `u64::MAX`: its slices
    /// too are at most `free / replicas`, so no replica's hold can make
    /// another's overflow.
    pub(super) fn slice_size(
        &self,
        key: &OpKey,
        s: &OpSlice,
        delta: u64,
        free: Option<u64>,
    ) -> Option<u64> {
        let size = delta.max(s.last_delta).max(1);
        let want = size
            .saturating_mul(u64::from(self.config.slice_decisions))
            .max(s.demand.saturating_mul(2));
        let free = free.unwrap_or_else(|| key.max.unwrap_or(u64::MAX));
        let share = free / u64::from(self.config.replicas);
        let min = size.saturating_mul(u64::from(self.config.min_slice_decisions));
        (share >= min).then(|| want.min(share))
    }

    /// Decide `batch` from slices, or from the store on their behalf.
    pub(super) async fn apply_sliced(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        let hash = self.hash_ops(batch.ops);
        // The fast path: the shard's read lock and the shape's lock, no
        // store call, no reference count touched.
        let found = {
            let shard = self.shard(hash).read();
            shard
                .get(&hash)
                .and_then(|l| l.iter().find(|s| same_ops(s, batch.ops)))
                .map(|shape| match self.decide(shape, batch) {
                    Ok(a) => Ok(a),
                    Err(plan) => Err((Arc::clone(shape), plan)),
                })
        };
        let (shape, plan) = match found {
            Some(Ok(a)) => return Ok(a),
            Some(Err(slow)) => slow,
            None if batch.mode == Mode::Check => return Box::pin(self.pass(batch)).await,
            None => {
                let Some(shape) = self.find_or_add(hash, batch.ops, batch.now_ms) else {
                    return Box::pin(self.pass(batch)).await;
                };
                match self.decide(&shape, batch) {
                    Ok(a) => return Ok(a),
                    Err(plan) => (shape, plan),
                }
            }
        };
        match plan {
            // Boxed: the slow paths' state (their batches and store calls)
            // would otherwise size every call's future, which the fast
            // path builds and moves on each admit.
            Plan::Pass => Box::pin(self.pass_shape(&shape, batch)).await,
            Plan::Grow | Plan::Reopen => {
                // `decide` marked it busy: unmarked when the slow path
                // ends or its future is dropped (a request timeout).
                let claimed = Claimed::marked(shape);
                Box::pin(self.slow(&claimed.0, batch, matches!(plan, Plan::Grow))).await
            }
        }
    }

    /// Decide `batch` from `shape`'s slice under its lock, or say which
    /// slow path to take (marking the shape busy for `Grow` and `Reopen`).
    pub(super) fn decide(&self, shape: &Shape, batch: &Batch<'_>) -> Result<Applied, Plan> {
        let now = batch.now_ms;
        let mut st = shape.state.lock();
        if st.gone {
            return Err(Plan::Pass);
        }
        let usable = self.usable(shape, &st, now);
        let covered = usable
            && st.slices.iter().zip(batch.ops).all(|(s, op)| {
                s.consumed
                    .checked_add(op.delta)
                    .is_some_and(|c| c <= s.granted)
            });
        if covered {
            if batch.mode == Mode::Check {
                st.local_checks += 1;
                return Ok(Self::local_answer(&st, false));
            }
            for (s, op) in st.slices.iter_mut().zip(batch.ops) {
                s.consumed = s.consumed.saturating_add(op.delta);
                s.demand = s.demand.saturating_add(op.delta);
                s.last_delta = op.delta;
            }
            st.last_use_ms = st.last_use_ms.max(now);
            st.local_admits += 1;
            return Ok(Self::local_answer(&st, true));
        }
        Err(
            if batch.mode == Mode::Check
                || st.busy
                || now < st.direct_until_ms
                || self.closed.load(Ordering::Relaxed)
            {
                Plan::Pass
            } else if usable {
                st.busy = true;
                Plan::Grow
            } else {
                st.busy = true;
                Plan::Reopen
            },
        )
    }

    /// The slow path, with the shape marked busy: grow (or settle and
    /// reopen) the lease to cover the request, or go to the store.
    pub(super) async fn slow(
        &self,
        shape: &Shape,
        batch: &Batch<'_>,
        grow: bool,
    ) -> Result<Applied, Error> {
        let now = batch.now_ms;
        if !grow {
            self.settle(shape, now).await;
        }
        // First try: what is missing plus a slice, sized from what the
        // store last said was free.
        let mut needs: SmallVec<[u64; 4]> = SmallVec::new();
        let (lease, first, share) = {
            let st = shape.state.lock();
            let mut first: SmallVec<[u64; 4]> = SmallVec::new();
            let mut share = true;
            for ((key, s), op) in shape.ops.iter().zip(&st.slices).zip(batch.ops) {
                let need = s
                    .consumed
                    .saturating_add(op.delta)
                    .saturating_sub(s.granted);
                needs.push(need);
                let known = st.lease.is_some() || s.base_used > 0 || s.free > 0;
                match self.slice_size(key, s, op.delta, known.then_some(s.free)) {
                    Some(extra) => first.push(need.saturating_add(extra)),
                    None => {
                        share = false;
                        first.push(need);
                    }
                }
            }
            (st.lease, first, share)
        };
        if !share || self.near_period_end(shape, now) {
            // Too little left to share, or the period is about to roll:
            // give the slice back and let the store decide.
            return self.go_direct(shape, batch).await;
        }
        let a = match self.take(shape, lease, &first, now).await {
            Ok(a) => a,
            Err(
                Error::UnknownReservation { .. }
                | Error::ReservationExpired { .. }
                | Error::ReservationSettled { .. },
            ) => {
                // The lease is gone (the clock passed its expiry): settle
                // charges what it admitted as plain usage. Start over from
                // the store.
                self.settle(shape, now).await;
                return self.pass_shape(shape, batch).await;
            }
            // A slice the counter cannot hold (near `u64::MAX`): the
            // store decides.
            Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
            Err(e) => return Err(e),
        };
        if a.applied {
            if let Some(a) = self.consume(shape, batch, &first, &a, now) {
                return Ok(a);
            }
            return self.pass_shape(shape, batch).await;
        }
        // Refused: what is free now, counting every hold but this slice's
        // unused part?
        let (fits, frees) = {
            let mut fits = true;
            let mut frees: SmallVec<[u64; 4]> = SmallVec::new();
            for ((key, c), need) in shape.ops.iter().zip(&a.counters).zip(&needs) {
                // `held` counts this slice's whole hold: `need` is what
                // the request needs beyond its unused part.
                let free = key
                    .max
                    .unwrap_or(u64::MAX)
                    .saturating_sub(c.used.saturating_add(c.held));
                if *need > free {
                    fits = false;
                }
                frees.push(free);
            }
            (fits, frees)
        };
        if !fits {
            // This engine's other shapes' slices on the same counters are
            // holds too: give them back and ask once more for what is
            // missing.
            if self.give_back_own(shape, &a, &needs, now).await {
                let lease = shape.state.lock().lease;
                match self.take(shape, lease, &needs, now).await {
                    Ok(b) if b.applied => {
                        if let Some(d) = self.consume(shape, batch, &needs, &b, now) {
                            return Ok(d);
                        }
                        return self.pass_shape(shape, batch).await;
                    }
                    Ok(mut b) => {
                        self.refused(shape, batch, &mut b);
                        return Ok(b);
                    }
                    Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
                    Err(e) => return Err(e),
                }
            }
            let mut a = a;
            self.refused(shape, batch, &mut a);
            return Ok(a);
        }
        // It fits: near the limit. Take what is missing and a shrunken
        // slice, or give the slice back and go straight to the store.
        let mut second: SmallVec<[u64; 4]> = SmallVec::new();
        let mut share = true;
        {
            let st = shape.state.lock();
            for (((key, s), op), (need, free)) in shape
                .ops
                .iter()
                .zip(&st.slices)
                .zip(batch.ops)
                .zip(needs.iter().zip(&frees))
            {
                let rest = free.saturating_sub(*need);
                match self.slice_size(key, s, op.delta, Some(rest)) {
                    Some(extra) => second.push(need + extra),
                    None => {
                        share = false;
                        second.push(*need);
                    }
                }
            }
        }
        if !share {
            return self.go_direct(shape, batch).await;
        }
        let lease = shape.state.lock().lease;
        let a = match self.take(shape, lease, &second, now).await {
            Ok(a) => a,
            Err(Error::Overflow { .. }) => return self.go_direct(shape, batch).await,
            Err(e) => return Err(e),
        };
        if a.applied {
            if let Some(a) = self.consume(shape, batch, &second, &a, now) {
                return Ok(a);
            }
        }
        // Another replica took it meanwhile: the store decides.
        self.pass_shape(shape, batch).await
    }

    /// On a refusal that holds make (each counter's usage leaves room for
    /// what the request needs), settle this engine's other shapes' slices
    /// on any of `shape`'s counters; whether any was given back. Scans the
    /// shape table: it runs on such refusals only.
    pub(super) async fn give_back_own(
        &self,
        shape: &Shape,
        a: &Applied,
        needs: &[u64],
        now: i64,
    ) -> bool {
        let by_holds = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(needs)
            .all(|((k, c), &need)| k.max.is_none_or(|m| c.used.saturating_add(need) <= m));
        if !by_holds {
            return false;
        }
        // The counters whose holds are in the way.
        let full: SmallVec<[&OpKey; 4]> = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(needs)
            .filter(|((k, c), &need)| {
                k.max
                    .is_some_and(|m| c.used.saturating_add(c.held).saturating_add(need) > m)
            })
            .map(|((k, _), _)| k)
            .collect();
        if full.is_empty() {
            return false;
        }
        let mut gave = false;
        for other in self.all_shapes() {
            if std::ptr::eq(&*other, shape) {
                continue;
            }
            let shares = other.ops.iter().any(|o| {
                full.iter()
                    .any(|k| k.scope == o.scope && k.meter == o.meter && k.window == o.window)
            });
            if !shares || other.state.lock().lease.is_none() {
                continue;
            }
            let Some(_claimed) = Claimed::try_new(&other) else {
                continue;
            };
            if other.state.lock().lease.is_some() {
                self.settle(&other, now).await;
                gave = true;
            }
        }
        gave
    }

    /// Pass a batch of `shape` to the store; count a refused admit.
    pub(super) async fn pass_shape(
        &self,
        shape: &Shape,
        batch: &Batch<'_>,
    ) -> Result<Applied, Error> {
        let mut a = self.pass(batch).await?;
        if batch.mode == Mode::WithinLimits && !a.applied {
            self.refused(shape, batch, &mut a);
        } else {
            Self::own_slice_is_free(shape, &mut a);
        }
        Ok(a)
    }

    /// Count a refused admit of `shape`, and report its counters with this
    /// engine's own unused slice left out of `held`.
    pub(super) fn refused(&self, shape: &Shape, batch: &Batch<'_>, a: &mut Applied) {
        bump(&self.counters.refusals, 1);
        let by_holds = shape
            .ops
            .iter()
            .zip(&a.counters)
            .zip(batch.ops)
            .all(|((k, c), op)| k.max.is_none_or(|m| c.used.saturating_add(op.delta) <= m));
        if by_holds {
            bump(&self.counters.refused_by_holds, 1);
        }
        Self::own_slice_is_free(shape, a);
    }

    /// This engine's own unused slice is not in its way: leave it out of
    /// the answer's `held`.
    pub(super) fn own_slice_is_free(shape: &Shape, a: &mut Applied) {
        let st = shape.state.lock();
        if st.lease.is_some() {
            for (c, s) in a.counters.iter_mut().zip(&st.slices) {
                c.held = c.held.saturating_sub(s.granted.saturating_sub(s.consumed));
            }
        }
    }

    /// Give the shape's slice back and send its decisions straight to the
    /// store for one top-up interval, starting with `batch`.
    pub(super) async fn go_direct(
        &self,
        shape: &Shape,
        batch: &Batch<'_>,
    ) -> Result<Applied, Error> {
        let now = batch.now_ms;
        self.settle(shape, now).await;
        shape.state.lock().direct_until_ms = now.saturating_add(ms(self.config.top_up_interval));
        self.pass_shape(shape, batch).await
    }

    /// Whether `now` is within two top-up intervals before the end of the
    /// shape's earliest calendar period (as the store last answered).
    pub(super) fn near_period_end(&self, shape: &Shape, now: i64) -> bool {
        let st = shape.state.lock();
        self.near_end(shape, &st, now)
    }

    /// Whether `now` is within three top-up intervals before the end of
    /// the shape's earliest calendar period, or past it (for `maintain`,
    /// which runs once an interval: a slice it would reopen could not be
    /// used).
    pub(super) fn near_end(&self, shape: &Shape, st: &ShapeState, now: i64) -> bool {
        Self::period_end(shape, st)
            .is_some_and(|end| now >= end.saturating_sub(3 * ms(self.config.top_up_interval)))
    }

    /// Open a lease holding `amounts`, or grow `lease` by them.
    pub(super) async fn take(
        &self,
        shape: &Shape,
        lease: Option<LeaseId>,
        amounts: &[u64],
        now: i64,
    ) -> Result<Applied, Error> {
        let ops: SmallVec<[CounterOp<'_>; 4]> = shape
            .ops
            .iter()
            .zip(amounts)
            .map(|(k, &d)| CounterOp::new(&k.scope, k.meter, k.window, d, k.max))
            .collect();
        let (id, action) = match lease {
            Some(id) => (id, LeaseAction::Grow),
            None => (
                LeaseId::random(),
                LeaseAction::Open {
                    expires_at_ms: now.saturating_add(ms(self.config.lease_ttl)),
                    deadline_ms: None,
                },
            ),
        };
        let batch = Batch::new(&ops, Mode::WithinLimits, now).with_lease(LeaseOp::new(
            id,
            &shape.owner,
            action,
        ));
        let mut a = self.call(&batch).await?;
        if a.applied && lease.is_none() {
            let given_up = {
                let mut st = shape.state.lock();
                if st.gone {
                    // `shutdown` gave the shape up while the slice opened:
                    // give it back (nothing admitted from it); the
                    // caller's `consume` finds the shape gone.
                    Some(self.unsettled(shape, id, SmallVec::from_elem(0, amounts.len())))
                } else {
                    st.lease = Some(id);
                    st.expires_at_ms = now.saturating_add(ms(self.config.lease_ttl));
                    st.use_until_ms = now.saturating_add(ms(self.config.lease_ttl) / 2);
                    st.last_settle_ms = now;
                    None
                }
            };
            if let Some(unsettled) = given_up {
                self.settle_lease(shape, unsettled, now).await;
            }
            a.settled.clear();
        }
        Ok(a)
    }

    /// Record a successful open or grow of `amounts`, and consume `batch`.
    pub(super) fn consume(
        &self,
        shape: &Shape,
        batch: &Batch<'_>,
        amounts: &[u64],
        a: &Applied,
        now: i64,
    ) -> Option<Applied> {
        let mut st = shape.state.lock();
        if st.gone || st.lease.is_none() {
            // `shutdown` settled the slice while it grew: the store
            // decides.
            return None;
        }
        for ((s, &amt), c) in st.slices.iter_mut().zip(amounts).zip(&a.counters) {
            s.granted = s.granted.saturating_add(amt);
            s.base_used = c.used;
            s.base_held_others = c.held.saturating_sub(s.granted);
            s.period_start_ms = c.period_start_ms;
            s.resets_at_ms = c.resets_at_ms;
        }
        // `free` as if this slice's unused part were free too.
        for (s, k) in st.slices.iter_mut().zip(&shape.ops) {
            s.free = free_of(k, s);
        }
        // Local admits went on while the store answered: the request is
        // admitted only if the grown slice still covers it.
        let covered = st.slices.iter().zip(batch.ops).all(|(s, op)| {
            s.consumed
                .checked_add(op.delta)
                .is_some_and(|c| c <= s.granted)
        });
        if !covered {
            return None;
        }
        for (s, op) in st.slices.iter_mut().zip(batch.ops) {
            s.consumed = s.consumed.saturating_add(op.delta);
            s.demand = s.demand.saturating_add(op.delta);
            s.last_delta = op.delta;
        }
        st.last_use_ms = st.last_use_ms.max(now);
        st.local_admits += 1;
        Some(Self::local_answer(&st, true))
    }
}
