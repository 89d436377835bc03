//! Each engine call's stages in order, written once.
//!
//! A call is prepare ([`prepare`](super::prepare)) → plan
//! ([`plan`](super::plan), pure: the store batch) → the store's `apply`
//! (the only I/O) → conclude ([`conclude`](super::conclude), pure: the
//! decision from the store's answer). The sync front doors (in
//! [`super`]) and the async ones (in `asynchronous`) expand the same
//! macro; they differ only in the `apply` they pass: `self.apply(b)` or
//! `self.apply_async(b).await`.
//!
//! Macros rather than a staged value owning the prepared request and its
//! op lists: the op lists borrow the prepared request, so one value holding
//! both would borrow itself, and returning the pieces through calls moves
//! the inline lists the hot path fills in its own frame. Expanded, the sync
//! body is the hand-written one, instruction for instruction.
//!
//! Every macro takes the engine as `$engine` (the caller's `self`: a macro
//! cannot name it) and `|$b| $apply`, the store call on the batch `$b`,
//! an expression of type `Result<Applied, Error>`.
//!
//! A decision's time is read once, in Unix milliseconds
//! ([`Clock::now_ms`](crate::Clock::now_ms)), the unit of the store seam:
//! no `DateTime` is built on the way to a decision unless an observer or a
//! refusal needs one.

/// One store call timed by `$watch`: the store's answer, or, on an error,
/// the error counted by the watch and returned from the calling function.
/// `$b` names `$batch` inside `$apply` (which may `.await`).
macro_rules! watched_store_call {
    ($watch:ident, |$b:ident| $batch:expr => $apply:expr) => {{
        $watch.store_start();
        let result = {
            let $b = $batch;
            $apply
        };
        $watch.store_end();
        match result {
            Ok(a) => a,
            Err(e) => {
                $watch.failed(&e);
                return Err(e);
            }
        }
    }};
}

/// `check`, `admit` and `record`: the body of a call returning
/// `Result<Decision, Error>`. `on_store_error: |e, p, now| …` answers a
/// store error (`e`) given the prepared request and the call's time (a
/// `DateTime`): the sync calls return it, the async ones may fail open.
macro_rules! decide_call {
    (
        $engine:ident, $req:ident, $call:ident,
        apply: |$b:ident| $apply:expr,
        on_store_error: |$e:ident, $ep:pat_param, $enow:pat_param| $on_error:expr $(,)?
    ) => {{
        use $crate::engine::observe::Call;
        use $crate::engine::plan::{balance_op, usage_batch, OpList, Shape};
        let mut watch = $crate::telemetry::Watch::new($call, $req.subject);
        // Inlined here: the prepared request is built in this frame, not
        // returned through two copies.
        let p = match $engine.prepare_inline($req) {
            Ok(p) => p,
            Err(e) => {
                watch.failed(&e);
                return Err(e);
            }
        };
        let now_ms = $engine.clock.now_ms();

        // `check` and `admit` refuse a model outside the allowlist without
        // touching a counter; `record` still records (the work happened) and
        // reports the refusal.
        if $call != Call::Record && p.model_refused.is_some() {
            let now = $crate::store::ms_to_time(now_ms);
            if let Some(decision) = $engine.refuse_model(&p, $call, $req, now) {
                watch.decided(&decision);
                return Ok(decision);
            }
        }
        let mut list = OpList::new();
        $engine.ops_for(&mut list, &p, $req.model, Shape::Usage);
        let usage = list.limits.len();
        if $call != Call::Check {
            $engine.charge_ops(&mut list, &p);
        }
        let cooldowns = if $call == Call::Record {
            Vec::new()
        } else {
            $engine.cooldowns_for(&p, $req.model, None, true)
        };
        let balance = balance_op(&p);
        let ops = list.ops.as_slice();
        let batch = usage_batch(
            $call,
            $req.event_ref(),
            ops,
            usage,
            &cooldowns,
            balance,
            now_ms,
        );
        // Read where the store wrote it: not moved out of the result.
        watch.store_start();
        let result = {
            let $b = &batch;
            $apply
        };
        watch.store_end();
        let applied = match result {
            Ok(ref applied) => applied,
            Err($e) => {
                watch.failed(&$e);
                let $ep = &p;
                let $enow = $crate::store::ms_to_time(now_ms);
                let answer: Result<$crate::Decision, $crate::Error> = $on_error;
                if let Ok(ref decision) = answer {
                    watch.decided(decision);
                }
                return answer;
            }
        };
        let at_ms = applied.replayed_at_ms.unwrap_or(now_ms);
        let mut decision = $engine.conclude($call, &p, &list, applied, &cooldowns, at_ms);
        $crate::engine::conclude::model_refusal(&mut decision, &p);
        $engine.observe_at($call, $req, at_ms, &decision);
        watch.decided(&decision);
        Ok(decision)
    }};
}

/// `reserve`: the body of a call returning
/// `Result<Result<Reservation, Decision>, Error>`.
macro_rules! reserve_call {
    ($engine:ident, $request:ident, $lease_ttl:ident, apply: |$b:ident| $apply:expr $(,)?) => {{
        use $crate::engine::plan::{OpList, Shape};
        let mut watch =
            $crate::telemetry::Watch::new($crate::engine::Call::Reserve, $request.subject);
        let o = match $engine.open($request, $lease_ttl) {
            Ok(o) => o,
            Err(e) => {
                watch.failed(&e);
                return Err(e);
            }
        };
        if let Some(refused) = $engine.refused_opening(&o, $request) {
            watch.decided(&refused);
            return Ok(Err(refused));
        }
        let mut list = OpList::new();
        $engine.ops_for(&mut list, &o.p, $request.model, Shape::Reserve);
        $engine.charge_ops(&mut list, &o.p);
        let cooldowns = $engine.cooldowns_for(&o.p, $request.model, None, false);
        let balance = $crate::engine::plan::balance_op(&o.p);
        let batch = o.batch(list.ops.as_slice(), &cooldowns, balance);
        let applied = watched_store_call!(watch, |$b| &batch => $apply);
        let opened = $engine.opened($request, &o, &list, &applied, &cooldowns);
        match &opened {
            Ok(r) => {
                watch.decided(&r.decision);
                watch.opened();
            }
            Err(refused) => watch.decided(refused),
        }
        Ok(opened)
    }};
}

/// `renew`: the body of a call returning `Result<(), Error>`.
macro_rules! renew_call {
    ($engine:ident, $reservation:ident, $lease_ttl:ident, apply: |$b:ident| $apply:expr $(,)?) => {{
        use $crate::store::{Batch, LeaseAction, LeaseOp, Mode};
        let mut watch =
            $crate::telemetry::Watch::new($crate::engine::Call::Renew, $reservation.subject());
        let now = $engine.clock.now();
        let expires_at = match $crate::engine::reservation::after(now, $lease_ttl) {
            Ok(t) => t,
            Err(e) => {
                watch.failed(&e);
                return Err(e);
            }
        };
        let owner = &$reservation.subject.0;
        let renew = LeaseAction::Renew {
            expires_at_ms: expires_at.timestamp_millis(),
        };
        let lease = LeaseOp::new($reservation.id, owner, renew);
        let batch = Batch::new(&[], Mode::Force, now.timestamp_millis()).with_lease(lease);
        watched_store_call!(watch, |$b| &batch => $apply);
        $reservation.expires_at = expires_at;
        Ok(())
    }};
}

/// `grow`: the body of a call returning `Result<Decision, Error>`.
macro_rules! grow_call {
    ($engine:ident, $reservation:ident, $more:ident, apply: |$b:ident| $apply:expr $(,)?) => {{
        use $crate::engine::observe::Call;
        use $crate::engine::plan::{lease_batch, OpList, Shape};
        use $crate::store::{LeaseAction, LeaseOp};
        if $more.event.is_some() {
            return Err($crate::Error::request("grow takes no event id"));
        }
        let p = $engine.prepare_for($reservation, $more)?;
        let now_ms = $engine.clock.now_ms();
        let mut list = OpList::new();
        $engine.ops_for(&mut list, &p, $reservation.model.as_deref(), Shape::Usage);
        let usage = list.limits.len();
        $engine.charge_ops(&mut list, &p);
        let lease = LeaseOp::new($reservation.id, &p.alloc.scope, LeaseAction::Grow);
        let ops = list.ops.as_slice();
        let balance = $crate::engine::balance::settle_op(&p, $reservation.balance.as_ref());
        let batch = lease_batch(Call::Grow, lease, None, ops, usage, &[], balance, now_ms);
        let mut watch = $crate::telemetry::Watch::new(Call::Grow, $more.subject);
        let applied = watched_store_call!(watch, |$b| &batch => $apply);
        let decision = $engine.conclude(Call::Grow, &p, &list, &applied, &[], now_ms);
        $engine.observe_at(Call::Grow, $more, now_ms, &decision);
        watch.decided(&decision);
        $reservation.grown(&p.amounts, &$engine.catalog.meter_ids, &decision);
        Ok(decision)
    }};
}

/// `commit` and `release`: the body of a call returning
/// `Result<Decision, Error>` that applies `$settling`, a
/// [`Settling`](super::reservation::Settling).
macro_rules! settle_call {
    ($engine:ident, $settling:ident, apply: |$b:ident| $apply:expr $(,)?) => {{
        use $crate::engine::plan::{lease_batch, OpList, Shape};
        use $crate::store::{LeaseAction, LeaseOp};
        let (s, now_ms) = (&$settling, $engine.clock.now_ms());
        let (p, model) = (&s.p, s.reservation.model.as_deref());
        let mut list = OpList::new();
        $engine.ops_for(
            &mut list,
            p,
            model,
            Shape::Settle(s.reservation.held.as_slice()),
        );
        let usage = list.limits.len();
        $engine.charge_ops(&mut list, p);
        let cooldowns = $engine.cooldowns_for(p, model, s.failed.then_some(now_ms), false);
        let keep = LeaseAction::Settle { keep: s.keep };
        let lease = LeaseOp::new(s.reservation.id, &p.alloc.scope, keep);
        let ops = list.ops.as_slice();
        let balance = $crate::engine::balance::settle_op(p, s.reservation.balance.as_ref());
        let event = s.request.event_ref();
        let batch = lease_batch(
            s.call, lease, event, ops, usage, &cooldowns, balance, now_ms,
        );
        let mut watch = $crate::telemetry::Watch::new(s.call, s.request.subject);
        let applied = watched_store_call!(watch, |$b| &batch => $apply);
        let at_ms = applied.replayed_at_ms.unwrap_or(now_ms);
        let decision = $engine.conclude(s.call, p, &list, &applied, &[], at_ms);
        $engine.observe_at(s.call, s.request, at_ms, &decision);
        watch.decided(&decision);
        if applied.replayed_at_ms.is_none() {
            watch.settled();
        }
        Ok(decision)
    }};
}

/// `usage`: the body of a call returning `Result<UsageReport, Error>`.
macro_rules! usage_call {
    ($engine:ident, $subject:ident, apply: |$b:ident| $apply:expr $(,)?) => {{
        use $crate::store::{Batch, Mode};
        let mut watch = $crate::telemetry::Watch::new($crate::engine::Call::Usage, $subject);
        let alloc = match $engine.allocation_of($subject) {
            Ok(a) => a,
            Err(e) => {
                watch.failed(&e);
                return Err(e);
            }
        };
        let now = $engine.clock.now();
        let cms = $crate::engine::plan::cost_meters(&$engine.catalog, &alloc);
        let (ops, charged) = $crate::engine::plan::usage_ops(&alloc, &cms);
        let mut batch = Batch::new(&ops, Mode::Check, now.timestamp_millis());
        if let Some(b) = $crate::engine::balance::report_op(&alloc) {
            batch = batch.with_balance(b);
        }
        let applied = watched_store_call!(watch, |$b| &batch => $apply);
        let report = $engine.usage_report($subject, &alloc, &applied, &cms, &charged, now);
        if let Err(ref e) = report {
            watch.failed(e);
        }
        report
    }};
}
