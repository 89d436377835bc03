//! Stage two of every call, pure: the store batch of a prepared request
//! (its ops, the cooldowns it checks or starts, its event fingerprint).

use std::hash::Hasher as _;

use super::allocations::Resolved;
use super::observe::Call;
use super::prepare::Prepared;
use super::Engine;
use crate::catalog::{cost_minor, Catalog, CostMeter, Limit, Pool};
use crate::clock::Clock;
use crate::inline::SmallList;
use crate::name::Name;
use crate::store::{
    BalanceAction, BalanceOp, Batch, CooldownOp, CounterOp, EventKey, LeaseId, LeaseOp, Mode,
    PeriodOp, ScopeKey,
};
use crate::window::Window;
use std::sync::Arc;

/// A call's ops kept inline (no allocation): enough for a plan's limits
/// and a pool or two; more spill to the heap.
const INLINE_OPS: usize = 8;

/// A call's ops and, for each, the limit it counts against.
pub(super) struct OpList<'a> {
    pub(super) ops: SmallList<CounterOp<'a>, INLINE_OPS>,
    pub(super) limits: SmallList<&'a Limit, INLINE_OPS>,
}

impl<'a> OpList<'a> {
    /// An empty list. Its spare slots stay uninitialised (no fill per call).
    #[inline(always)]
    pub(super) fn new() -> Self {
        OpList {
            ops: SmallList::new(),
            limits: SmallList::new(),
        }
    }
}

/// Which limits a call's batch names.
#[derive(Clone, Copy)]
pub(super) enum Shape<'r> {
    /// Limits whose meter the request names; no concurrent limits.
    Usage,
    /// As `Usage`, plus one slot on every concurrent limit.
    Reserve,
    /// As `Usage`, plus the limits the reservation holds and every
    /// concurrent limit, to report them.
    Settle(&'r [(usize, Name, u64)]),
}

impl<S, C: Clock> Engine<S, C> {
    /// Every scope a call draws on, in order: the subject, its pools, the
    /// pools named for the request, then the model's global pools not
    /// already listed. With each: its limits and its cooldown.
    #[inline]
    fn scopes<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
    ) -> impl Iterator<Item = (&'a ScopeKey, &'a [Limit], Option<i64>)> + 'a {
        let model_pools: &'a [Arc<Pool>] = model
            .and_then(|m| self.catalog.model_pools.get(m))
            .map_or(&[], Vec::as_slice);
        let alloc = &*p.alloc;
        std::iter::once((&alloc.scope, alloc.limits(), alloc.plan.cooldown_ms))
            .chain(
                alloc
                    .pools()
                    .iter()
                    .chain(&p.extra)
                    .map(|pool| (&pool.scope, pool.limits.as_slice(), pool.cooldown_ms)),
            )
            .chain(
                model_pools
                    .iter()
                    .filter(move |mp| !alloc.pools().iter().chain(&p.extra).any(|q| q.id == mp.id))
                    .map(|pool| (&pool.scope, pool.limits.as_slice(), pool.cooldown_ms)),
            )
    }

    /// One op per limit per scope: where the request names the limit's meter
    /// (a reservation also takes a slot on each concurrent limit; a
    /// settlement also reports the limits the reservation held). The scopes
    /// are those of [`Engine::scopes`], in its order, walked without its
    /// iterator chain.
    ///
    /// Appended to `list`, made by the caller ([`OpList::new`]) in its own
    /// frame, so the list is never moved.
    #[inline(always)]
    pub(super) fn ops_for<'a>(
        &'a self,
        list: &mut OpList<'a>,
        p: &'a Prepared,
        model: Option<&str>,
        shape: Shape<'_>,
    ) {
        let alloc = &*p.alloc;
        push_ops(
            list,
            &alloc.scope,
            alloc.limits(),
            p.amounts.as_slice(),
            shape,
        );
        // Pools, listed, named or the model's: out of line.
        if alloc.more.is_some() || !p.extra.is_empty() || model.is_some() {
            self.pool_ops(list, p, model, shape);
        }
    }

    /// The pool part of [`Engine::ops_for`]: the allocation's pools, those
    /// named for the request, then the model's global pools not listed.
    #[inline(never)]
    fn pool_ops<'a>(
        &'a self,
        list: &mut OpList<'a>,
        p: &'a Prepared,
        model: Option<&str>,
        shape: Shape<'_>,
    ) {
        let amounts = p.amounts.as_slice();
        let listed = p.alloc.pools().iter().chain(&p.extra);
        for pool in listed.clone() {
            push_ops(list, &pool.scope, &pool.limits, amounts, shape);
        }
        if let Some(model_pools) = model.and_then(|m| self.catalog.model_pools.get(m)) {
            for pool in model_pools {
                if !listed.clone().any(|q| q.id == pool.id) {
                    push_ops(list, &pool.scope, &pool.limits, amounts, shape);
                }
            }
        }
    }

    /// The cooldowns of the scopes a call draws on; with `start_ms` (Unix
    /// milliseconds), each starts then for its own length. With `zero_passes`, none for a
    /// request whose amounts are all zero: a cooldown does not refuse it.
    #[inline(always)]
    pub(super) fn cooldowns_for<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
        start_ms: Option<i64>,
        zero_passes: bool,
    ) -> Vec<CooldownOp<'a>> {
        // A request drawing only on its own scope, whose plan declares no
        // cooldown, has none to check: skip the walk over the scopes (the
        // check inline in the caller, the walk out of line).
        if model.is_none()
            && p.alloc.plan.cooldown_ms.is_none()
            && p.alloc.more.is_none()
            && p.extra.is_empty()
        {
            return Vec::new();
        }
        self.cooldown_walk(p, model, start_ms, zero_passes)
    }

    /// [`Engine::cooldowns_for`] over every scope of the call.
    #[inline(never)]
    fn cooldown_walk<'a>(
        &'a self,
        p: &'a Prepared,
        model: Option<&str>,
        start_ms: Option<i64>,
        zero_passes: bool,
    ) -> Vec<CooldownOp<'a>> {
        if zero_passes && p.is_zero() {
            return Vec::new();
        }
        self.scopes(p, model)
            .filter_map(|(scope, _, ms)| {
                let ms = ms?;
                // Past the range of a `DateTime`, as adding a `Duration` to
                // one was: no cooldown starts.
                let until = start_ms
                    .and_then(|t| t.checked_add(ms))
                    .filter(|&t| chrono::DateTime::from_timestamp_millis(t).is_some());
                Some(CooldownOp::new(scope, until))
            })
            .collect()
    }
}

/// The ops of one scope's limits for [`Engine::ops_for`], appended to
/// `list`.
#[inline(always)]
fn push_ops<'a>(
    list: &mut OpList<'a>,
    scope: &'a ScopeKey,
    limits: &'a [Limit],
    amounts: &[(usize, u64)],
    shape: Shape<'_>,
) {
    for l in limits {
        let named = amounts
            .iter()
            .find(|(i, _)| *i == l.meter_idx)
            .map(|&(_, d)| d);
        let delta = match (l.window, shape) {
            (Window::Concurrent, Shape::Usage) => None,
            (Window::Concurrent, Shape::Reserve) => Some(1),
            (Window::Concurrent, Shape::Settle(_)) => Some(0),
            (_, Shape::Settle(held)) => {
                named.or_else(|| held.iter().any(|(i, _, _)| *i == l.meter_idx).then_some(0))
            }
            _ => named,
        };
        if let Some(delta) = delta {
            list.ops
                .push(CounterOp::new(scope, l.meter, l.window, delta, l.max));
            list.limits.push(l);
        }
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// The money a call charges, meter by meter, appended to `list` after
    /// every usage op (so `list.ops[..list.limits.len()]` stays the usage,
    /// row for row with its limits): for each op on the subject's own scope
    /// that adds to a priced meter's counter of a limit window, an op adding
    /// that meter's cost, in the cost meter's smallest unit, to the meter's
    /// counter of money charged ([`charged_name`](crate::catalog::charged_name))
    /// in the same window, with no maximum. A usage report reads these back
    /// as the cost charged ([`super::conclude`]).
    ///
    /// Each meter's cost is `delta × price` rounded up on its own (a charge
    /// never rounds down to zero), so the shares of a request pricing `n`
    /// meters sum to its decision's cost (`Σ delta × price`, rounded up
    /// once) or up to `n - 1` smallest units more.
    ///
    /// In a reservation these ops are holds like the usage beside them:
    /// `grow` adds to them, `release` keeps the policy's share of each
    /// (rounded up, as the units), `commit` charges the actual request's.
    /// Nothing for a plan without prices, a zero delta, a zero price, a
    /// concurrent limit or a pool's scope (a report covers only the
    /// subject's own).
    #[inline(always)]
    pub(super) fn charge_ops<'a>(&'a self, list: &mut OpList<'a>, p: &'a Prepared) {
        let plan = &*p.alloc.plan;
        if plan.prices.is_empty() {
            return;
        }
        charge_walk(list, p);
    }
}

/// [`Engine::charge_ops`] past its branch: by the plan's prices (a
/// handful), each priced meter of the request costed once, then its ops.
#[inline(never)]
fn charge_walk<'a>(list: &mut OpList<'a>, p: &'a Prepared) {
    let plan = &*p.alloc.plan;
    let Some(cm) = &plan.cost else {
        return;
    };
    let subject = &p.alloc.scope;
    let amounts = p.amounts.as_slice();
    // The limits are not pushed to: read as one slice. The ops are, so each
    // is read by index (a push may move them to the heap).
    let limits = list.limits.as_slice();
    for price in plan.prices.iter() {
        let Some(&(_, units)) = amounts.iter().find(|(i, _)| *i == price.meter_idx) else {
            continue;
        };
        let (Some(charged), true) = (price.charged, units > 0) else {
            continue;
        };
        // One term of the request's cost, which fitted: so does this.
        let cost = cost_minor([(units, price.units)], cm.scale).unwrap_or(u64::MAX);
        if cost == 0 {
            continue;
        }
        for (i, limit) in limits.iter().enumerate() {
            if limit.meter_idx != price.meter_idx {
                continue;
            }
            let Some(&op) = list.ops.as_slice().get(i) else {
                break;
            };
            // The op adds the request's units (a settlement's report of a
            // held meter adds none; a concurrent limit takes slots).
            if op.delta == 0 || op.window == Window::Concurrent || !std::ptr::eq(op.scope, subject)
            {
                continue;
            }
            list.ops
                .push(CounterOp::new(op.scope, charged, op.window, cost, None));
        }
    }
}

/// The balance op of a call whose plan spends from a prepaid balance:
/// debit the request's cost (in the cost meter's smallest unit) from the
/// subject's balance or the plan's pool's. `None` for every other plan, the
/// one branch the hot path pays.
#[inline(always)]
pub(super) fn balance_op(p: &Prepared) -> Option<BalanceOp<'_>> {
    p.alloc.plan.balance.as_ref()?;
    balance_debit(p)
}

/// [`balance_op`] past its branch.
#[inline(never)]
fn balance_debit(p: &Prepared) -> Option<BalanceOp<'_>> {
    let cm = p.alloc.plan.cost.as_ref()?;
    let amount = p
        .amounts
        .iter()
        .find(|(i, _)| *i == cm.idx)
        .map_or(0, |&(_, n)| n);
    super::balance::balance_of(&p.alloc, |overdraft| BalanceAction::Debit {
        amount,
        overdraft,
    })
}

/// The batch of a check (read only), an admit (within limits) or a record
/// (forced); an event id counts for admit and record, with the
/// fingerprint of what they record: the first `usage` ops, the usage (the
/// money charged per meter after them, [`Engine::charge_ops`], is left
/// out, so a retry after a price change still replays). Part of the hot
/// path, inlined into it.
#[inline(always)]
pub(super) fn usage_batch<'a>(
    call: Call,
    event: Option<(&'a str, bool)>,
    ops: &'a [CounterOp<'a>],
    usage: usize,
    cooldowns: &'a [CooldownOp<'a>],
    balance: Option<BalanceOp<'a>>,
    now_ms: i64,
) -> Batch<'a> {
    let mode = match call {
        Call::Check => Mode::Check,
        Call::Admit => Mode::WithinLimits,
        _ => Mode::Force,
    };
    let mut batch = Batch::new(ops, mode, now_ms).with_cooldowns(cooldowns);
    if let Some(b) = balance {
        batch = batch.with_balance(b);
    }
    if let (Some((id, made)), Call::Admit | Call::Record) = (event, call) {
        let print = fingerprint(call, None, &ops[..usage.min(ops.len())], balance.as_ref());
        batch = batch.with_event(event_key(id, print, made));
    }
    batch
}

/// The forced batch of a call on a reservation (`grow`, `commit`,
/// `release`): `lease` says what it does to the lease; an event id is
/// fingerprinted with the lease's id and the first `usage` ops (as
/// [`usage_batch`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn lease_batch<'a>(
    call: Call,
    lease: LeaseOp<'a>,
    event: Option<(&'a str, bool)>,
    ops: &'a [CounterOp<'a>],
    usage: usize,
    cooldowns: &'a [CooldownOp<'a>],
    balance: Option<BalanceOp<'a>>,
    now_ms: i64,
) -> Batch<'a> {
    let id = lease.id;
    let mut batch = Batch::new(ops, Mode::Force, now_ms)
        .with_lease(lease)
        .with_cooldowns(cooldowns);
    if let Some(b) = balance {
        batch = batch.with_balance(b);
    }
    match event {
        Some((event, made)) => {
            let usage_ops = &ops[..usage.min(ops.len())];
            let print = fingerprint(call, Some(id), usage_ops, balance.as_ref());
            batch.with_event(event_key(event, print, made))
        }
        None => batch,
    }
}

/// The key of event `id`; `made`: the engine made it for this call.
#[inline(always)]
fn event_key(id: &str, print: u64, made: bool) -> EventKey<'_> {
    let key = EventKey::new(id, print);
    if made {
        key.made_by_engine()
    } else {
        key
    }
}

/// Every cost meter a plan of the catalog keeps money in: the
/// allocation's plan's first (if it has one), then the others in catalog
/// order. A report looks for the money charged for a limit's usage in each,
/// so usage charged under an earlier plan (another cost meter, or a plan
/// now without one) still shows what it was charged.
pub(super) fn cost_meters(catalog: &Catalog, alloc: &Resolved) -> Vec<CostMeter> {
    let mut cms: Vec<CostMeter> = alloc.plan.cost.into_iter().collect();
    let mut rest: Vec<CostMeter> = catalog
        .plans
        .values()
        .filter_map(|p| p.cost)
        .filter(|c| cms.iter().all(|m| m.idx != c.idx))
        .collect();
    rest.sort_by_key(|c| c.idx);
    rest.dedup_by_key(|c| c.idx);
    cms.extend(rest);
    cms
}

/// Whether a limit has counters of money charged beside it: a meter that
/// is not money, on a window that is not concurrent.
fn charged_beside(l: &Limit) -> bool {
    l.window != Window::Concurrent && l.scale.money_scale().is_none()
}

/// The batch behind a usage report, read (delta 0) in check mode: every
/// limit of the allocation, one op each in order; then, for each limit of a
/// meter that is not money and not concurrent, its counter of money charged
/// ([`Engine::charge_ops`]) in each of `cms` ([`cost_meters`]), whether or
/// not the plan prices it now (an earlier plan may have). With the ops, for
/// each limit the index of the first of its `cms.len()` money charged ops,
/// if it has them.
pub(super) fn usage_ops<'a>(
    alloc: &'a Resolved,
    cms: &[CostMeter],
) -> (Vec<CounterOp<'a>>, Vec<Option<usize>>) {
    let limits = alloc.limits();
    let mut ops: Vec<CounterOp<'_>> = limits
        .iter()
        .map(|l| CounterOp::new(&alloc.scope, l.meter, l.window, 0, l.max))
        .collect();
    let mut charged = vec![None; limits.len()];
    if !cms.is_empty() {
        for (l, slot) in limits.iter().zip(&mut charged) {
            if !charged_beside(l) {
                continue;
            }
            *slot = Some(ops.len());
            for cm in cms {
                let name = crate::catalog::charged_name(&l.meter, &cm.id);
                ops.push(CounterOp::new(&alloc.scope, name, l.window, 0, None));
            }
        }
    }
    (ops, charged)
}

/// The query behind a report of a past period (contract rule 11): for each
/// limit of the allocation kept per calendar `period`, its counter's period
/// `back` periods before the one containing `now_ms`; then, as in
/// [`usage_ops`], each such limit's counters of money charged in `cms`.
/// With the ops, the limits read (by index into `alloc.limits()`), and for
/// each the index of the first of its money charged ops, if it has them.
pub(super) fn period_ops<'a>(
    alloc: &'a Resolved,
    cms: &[CostMeter],
    period: crate::window::Period,
    back: u32,
    now_ms: i64,
) -> (Vec<PeriodOp<'a>>, Vec<usize>, Vec<Option<usize>>) {
    let limits = alloc.limits();
    let rows: Vec<usize> = (0..limits.len())
        .filter(|&i| matches!(limits[i].window, Window::Calendar { period: p, .. } if p == period))
        .collect();
    let mut ops: Vec<PeriodOp<'_>> = Vec::with_capacity(rows.len() * (1 + cms.len()));
    let mut starts = Vec::with_capacity(rows.len());
    for &i in &rows {
        let l = &limits[i];
        let (start, _) = crate::store::period_back(l.window, now_ms, back).unwrap_or_default();
        starts.push(start);
        ops.push(PeriodOp::new(&alloc.scope, l.meter, l.window, start));
    }
    let mut charged = vec![None; rows.len()];
    if !cms.is_empty() {
        for ((&i, slot), &start) in rows.iter().zip(&mut charged).zip(&starts) {
            let l = &limits[i];
            if !charged_beside(l) {
                continue;
            }
            *slot = Some(ops.len());
            for cm in cms {
                let name = crate::catalog::charged_name(&l.meter, &cm.id);
                ops.push(PeriodOp::new(&alloc.scope, name, l.window, start));
            }
        }
    }
    (ops, rows, charged)
}

/// FNV-1a, 64 bit ([`fnv::FnvHasher`]): a digest that is the same in every
/// process and build, so a ledger restored from a snapshot (or shared
/// through a backend) still recognises its events. Integers are written as
/// little-endian bytes, never through `Hasher::write_u64` (native endian).
struct Fnv(fnv::FnvHasher);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        self.0.write(b);
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

/// What an event does: the call, the lease, every op (scope, meter,
/// window, delta, maximum) and its balance debit, if any (written after
/// the ops, so an event without one keeps its fingerprint). A retry of the
/// same request on the same plan has the same fingerprint.
#[inline(never)]
fn fingerprint(
    call: Call,
    lease: Option<LeaseId>,
    ops: &[CounterOp<'_>],
    balance: Option<&BalanceOp<'_>>,
) -> u64 {
    let mut h = Fnv(fnv::FnvHasher::default());
    h.u64(match call {
        Call::Check => 0,
        Call::Admit => 1,
        Call::Record => 2,
        Call::Reserve => 3,
        Call::Grow => 4,
        Call::Commit => 5,
        Call::Release => 6,
        // No event of theirs is fingerprinted; numbered after the others,
        // so every existing fingerprint stays.
        Call::Renew => 7,
        Call::Usage => 8,
    });
    let bits = lease.map_or(0, LeaseId::as_u128);
    h.bytes(&bits.to_le_bytes());
    for op in ops {
        h.u64(op.scope.kind() as u64);
        h.str(op.scope.id());
        h.str(op.meter.as_str());
        match op.window {
            Window::Calendar {
                period,
                utc_offset_secs,
            } => {
                h.u64(1);
                h.u64(period as u64);
                h.u64(i64::from(utc_offset_secs) as u64);
            }
            Window::Rolling { span_secs, buckets } => {
                h.u64(2);
                h.u64(span_secs);
                h.u64(u64::from(buckets));
            }
            Window::Lifetime => h.u64(3),
            Window::Concurrent => h.u64(4),
        }
        h.u64(op.delta);
        h.u64(op.max.map_or(u64::MAX, |m| m));
        h.u64(u64::from(op.max.is_some()));
    }
    if let Some(b) = balance {
        h.u64(8);
        h.u64(b.scope.kind() as u64);
        h.str(b.scope.id());
        h.str(b.meter.as_str());
        if let BalanceAction::Debit { amount, overdraft } = b.action {
            h.u64(amount);
            h.u64(overdraft);
        }
    }
    h.0.finish()
}

#[cfg(test)]
mod tests {
    use super::{fingerprint, Call};
    use crate::store::{CounterOp, LeaseId, ScopeKey};
    use crate::{Name, Period, Window};

    /// Fingerprints are compared across processes and builds (a restored
    /// snapshot, a shared Redis ledger): pinned, so a change to the hash or
    /// to what it reads cannot pass unnoticed.
    #[test]
    fn fingerprint_is_pinned() {
        let agent = ScopeKey::subject("agent-7");
        let pool = ScopeKey::pool("account:acme");
        let ops = [
            CounterOp::new(
                &agent,
                Name::new("llm_tokens_input"),
                Window::calendar(Period::Month),
                1_200,
                Some(20_000),
            ),
            CounterOp::new(&agent, Name::new("jobs"), Window::Concurrent, 1, Some(2)),
            CounterOp::new(
                &agent,
                Name::new("requests"),
                Window::Calendar {
                    period: Period::Day,
                    utc_offset_secs: -9 * 3_600,
                },
                0,
                Some(0),
            ),
            CounterOp::new(&pool, Name::new("cost"), Window::Lifetime, 36_000, None),
            CounterOp::new(
                &pool,
                Name::new("exec_seconds"),
                Window::Rolling {
                    span_secs: 7 * 86_400,
                    buckets: 28,
                },
                90,
                Some(18_000),
            ),
        ];
        let lease = LeaseId::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(
            fingerprint(Call::Admit, None, &ops, None),
            0x2aa2_b381_fed4_70d1
        );
        assert_eq!(
            fingerprint(Call::Commit, Some(lease), &ops, None),
            0x9410_4d6a_489b_4ad5
        );
        assert_eq!(
            fingerprint(Call::Record, None, &[], None),
            0xcf21_924e_7b0f_f7c7
        );
    }
}
