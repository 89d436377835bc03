//! Contract rule 10: prepaid balances — grants consumed in order and
//! expiring to the millisecond, idempotent grants, holds under leases,
//! debt within an overdraft, and no overdraw under threads.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{apply, fresh_id, op, t, DAY};
use crate::name::Name;
use crate::store::{
    AllowanceStore, BalanceAction, BalanceOp, BalanceState, Batch, Fraction, GrantOp, LeaseAction,
    LeaseOp, Mode,
};
use crate::{Error, ScopeKey};

fn cost() -> Name {
    Name::new("cost")
}

fn debit(scope: &ScopeKey, amount: u64, overdraft: u64) -> BalanceOp<'_> {
    BalanceOp::new(scope, cost(), BalanceAction::Debit { amount, overdraft })
}

fn grant<'a>(scope: &'a ScopeKey, g: GrantOp<'a>) -> BalanceOp<'a> {
    BalanceOp::new(scope, cost(), BalanceAction::Grant(g))
}

/// Add grant `g` to `scope`'s balance at `now`.
fn top_up<S: AllowanceStore>(s: &S, scope: &ScopeKey, g: GrantOp<'_>, now: i64) -> BalanceState {
    let r = apply(
        s,
        Batch::new(&[], Mode::Force, now).with_balance(grant(scope, g)),
    );
    assert!(r.applied, "a grant applies");
    *r.balance.expect("a grant reports its balance")
}

/// The balance of `scope` at `now` (a check of a zero debit).
fn read<S: AllowanceStore>(s: &S, scope: &ScopeKey, now: i64) -> BalanceState {
    let r = apply(
        s,
        Batch::new(&[], Mode::Check, now).with_balance(debit(scope, 0, 0)),
    );
    *r.balance.expect("a batch naming a balance reports it")
}

/// Grants are consumed in order (priority, soonest expiry, start, id),
/// stop counting at their expiry to the millisecond, count from their
/// start; a debit that does not fit refuses the whole batch; a forced
/// debit runs into debt up to the overdraft and reports the rest as
/// uncovered; a new live grant pays the debt off first (an expired or not
/// yet effective one does not); a clock stepping back
/// never brings an expired grant back.
pub fn balances_consume_grants_in_order<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    let r = read(&s, &a, t(0));
    assert_eq!(
        (r.remaining, r.held, r.debt),
        (0, 0, 0),
        "a new balance is empty"
    );
    let r = apply(
        &s,
        Batch::new(&[], Mode::Check, t(0)).with_balance(debit(&a, 1, 0)),
    );
    assert!(
        !r.balance.expect("reported").fits,
        "an empty balance pays nothing"
    );

    top_up(&s, &a, GrantOp::new("late", 20, t(100)), t(0));
    top_up(&s, &a, GrantOp::new("base", 100, t(0)).priority(1), t(0));
    top_up(&s, &a, GrantOp::new("b", 50, t(0)).expiring(t(10)), t(0));
    let r = top_up(&s, &a, GrantOp::new("c", 30, t(0)).expiring(t(5)), t(0));
    assert_eq!(
        r.remaining, 180,
        "live grants only: `late` starts at t(100)"
    );
    let ids: Vec<&str> = r.grants.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(
        ids,
        ["c", "b", "late", "base"],
        "consumption order: priority, soonest expiry (none last), start"
    );

    let ops = [op(&a, "t", DAY, 1, Some(10))];
    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(1)).with_balance(debit(&a, 40, 0)),
    );
    assert!(r.applied);
    let b = r.balance.expect("reported");
    assert_eq!(b.remaining, 140);
    let left: Vec<(&str, u64)> = b.grants.iter().map(|g| (g.id.as_str(), g.spent)).collect();
    assert_eq!(
        left,
        [("b", 10), ("late", 0), ("base", 0)],
        "`c` (soonest expiry) spent first, then `b`; a spent grant is not listed"
    );

    let just_before = t(10) - 1;
    assert_eq!(read(&s, &a, just_before).remaining, 140);
    assert_eq!(
        read(&s, &a, t(10)).remaining,
        100,
        "`b`'s 40 left stop counting at its expiry, to the millisecond"
    );

    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(10)).with_balance(debit(&a, 101, 0)),
    );
    assert!(!r.applied, "a debit past the balance refuses the batch");
    assert!(!r.balance.expect("reported").fits);
    assert_eq!(r.counters[0].used, 1, "the op that fit was not added");
    assert_eq!(read(&s, &a, t(10)).remaining, 100, "nothing consumed");

    let r = apply(
        &s,
        Batch::new(&ops, Mode::Force, t(11)).with_balance(debit(&a, 130, 20)),
    );
    assert!(r.applied);
    let b = r.balance.expect("reported");
    assert_eq!(
        (b.remaining, b.debt, b.uncovered),
        (0, 20, 10),
        "forced: grants, then debt up to the overdraft, the rest uncovered"
    );
    assert_eq!(b.available(), -20);
    let r = apply(
        &s,
        Batch::new(&[], Mode::WithinLimits, t(11)).with_balance(debit(&a, 1, 20)),
    );
    assert!(!r.applied, "admission never uses the overdraft");

    // Only a live grant pays debt off: one already expired, or one not
    // yet effective, leaves the debt as it was.
    let b = top_up(&s, &a, GrantOp::new("gone", 40, t(0)).expiring(t(5)), t(11));
    assert_eq!(
        (b.remaining, b.debt),
        (0, 20),
        "an expired grant repays nothing"
    );
    let b = top_up(&s, &a, GrantOp::new("next", 40, t(200)), t(11));
    assert_eq!(
        (b.remaining, b.debt),
        (0, 20),
        "a grant not yet effective repays nothing"
    );
    let b = top_up(&s, &a, GrantOp::new("d", 50, t(11)), t(11));
    assert_eq!(
        (b.remaining, b.debt),
        (30, 0),
        "a new grant pays the debt off"
    );

    // The clock steps back past `b`'s expiry: it stays expired.
    let b = read(&s, &a, t(9));
    assert_eq!(b.remaining, 30, "an expired grant never counts again");
    assert_eq!(
        read(&s, &a, t(100)).remaining,
        50,
        "`late` counts from its start"
    );
}

/// A grant's id credits once: the same grant again changes nothing and
/// says when it was made; other terms under the id are
/// [`Error::GrantConflict`]; a zero amount, an expiry before the start, a
/// grant with ops, and grants past a `u64` are refused, changing nothing.
pub fn grants_are_idempotent<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    top_up(&s, &a, GrantOp::new("pay-1", 100, t(0)), t(0));
    let r = apply(
        &s,
        Batch::new(&[], Mode::Force, t(5))
            .with_balance(grant(&a, GrantOp::new("pay-1", 100, t(0)))),
    );
    assert_eq!(r.replayed_at_ms, Some(t(0)), "a redelivered grant replays");
    assert_eq!(r.balance.expect("reported").remaining, 100, "credited once");

    let refused = |g: GrantOp<'_>, ops: bool| {
        let o = [op(&a, "t", DAY, 1, None)];
        let ops: &[_] = if ops { &o } else { &[] };
        s.apply(&Batch::new(ops, Mode::Force, t(6)).with_balance(grant(&a, g)))
    };
    assert!(
        matches!(refused(GrantOp::new("pay-1", 200, t(0)), false), Err(Error::GrantConflict { ref payment }) if payment == "pay-1"),
        "a payment id reused with another amount"
    );
    assert!(matches!(
        refused(GrantOp::new("pay-1", 100, t(0)).priority(3), false),
        Err(Error::GrantConflict { .. })
    ));
    assert!(matches!(
        refused(GrantOp::new("zero", 0, t(0)), false),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        refused(GrantOp::new("", 5, t(0)), false),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        refused(GrantOp::new("back", 5, t(10)).expiring(t(10)), false),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        refused(GrantOp::new("ops", 5, t(0)), true),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        refused(GrantOp::new("huge", u64::MAX, t(0)), false),
        Err(Error::Overflow { .. })
    ));
    let b = read(&s, &a, t(6));
    assert_eq!(b.remaining, 100, "no refused grant changed the balance");
    assert_eq!(b.grants.len(), 1);
    assert_eq!(
        super::used(&s, &a, "t", DAY, t(6)).0,
        0,
        "no refused grant's op was added"
    );
    let p = ScopeKey::pool("acme");
    assert_eq!(read(&s, &p, t(6)).remaining, 0, "balances are per scope");
}

/// Holds: a reservation holds balance (others see less), its hold ends at
/// the lease's expiry to the millisecond and moves with a renewal;
/// settling removes it, consumes `keep` of it and then the batch's debit.
pub fn balance_holds_settle<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    top_up(&s, &a, GrantOp::new("pay", 100, t(0)), t(0));
    let id = fresh_id();
    let open = LeaseOp::new(
        id,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    let ops = [op(&a, "t", DAY, 1, Some(10))];
    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(1))
            .with_lease(open)
            .with_balance(debit(&a, 60, 0)),
    );
    assert!(r.applied);
    let b = r.balance.expect("reported");
    assert_eq!((b.remaining, b.held), (100, 60), "held, not consumed");
    let r = apply(
        &s,
        Batch::new(&[], Mode::WithinLimits, t(2)).with_balance(debit(&a, 41, 0)),
    );
    assert!(!r.applied, "held balance counts for others: 60 + 41 > 100");
    let big = LeaseOp::new(
        fresh_id(),
        &a,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    let r = apply(
        &s,
        Batch::new(&[], Mode::WithinLimits, t(2))
            .with_lease(big)
            .with_balance(debit(&a, 41, 0)),
    );
    assert!(!r.applied, "a hold must fit as a debit does");

    let grow = LeaseOp::new(id, &a, LeaseAction::Grow);
    let r = apply(
        &s,
        Batch::new(&[], Mode::WithinLimits, t(3))
            .with_lease(grow)
            .with_balance(debit(&a, 10, 0)),
    );
    assert_eq!(r.balance.expect("reported").held, 70, "grown");
    let keep = Fraction::new(1, 2).unwrap_or(Fraction::ONE);
    let settle = LeaseOp::new(id, &a, LeaseAction::Settle { keep });
    let r = apply(
        &s,
        Batch::new(&[], Mode::Force, t(4))
            .with_lease(settle)
            .with_balance(debit(&a, 5, 0)),
    );
    let b = r.balance.expect("reported");
    assert_eq!(
        (b.remaining, b.held),
        (100 - 35 - 5, 0),
        "half of the 70 held kept, then the debit"
    );

    // A hold ends with its lease, to the millisecond; a renewal moves it.
    let short = fresh_id();
    let open = LeaseOp::new(
        short,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(10),
            deadline_ms: None,
        },
    );
    apply(
        &s,
        Batch::new(&[], Mode::WithinLimits, t(5))
            .with_lease(open)
            .with_balance(debit(&a, 20, 0)),
    );
    assert_eq!(read(&s, &a, t(10) - 1).held, 20);
    let renew = LeaseOp::new(
        short,
        &a,
        LeaseAction::Renew {
            expires_at_ms: t(20),
        },
    );
    apply(&s, Batch::new(&[], Mode::Force, t(6)).with_lease(renew));
    assert_eq!(read(&s, &a, t(10)).held, 20, "renewed with its lease");
    assert_eq!(read(&s, &a, t(20)).held, 0, "gone at the new expiry");
    assert_eq!(
        read(&s, &a, t(20)).remaining,
        60,
        "an expired hold charges nothing"
    );
}

/// Rules 5 and 10 under threads: 8 threads debiting one balance never take
/// it below zero, and every admitted debit is consumed once.
pub fn concurrent_debits_never_overdraw<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    top_up(&s, &a, GrantOp::new("pay", 1_000, t(0)), t(0));
    let admitted = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for n in 0..8u64 {
            let (s, a, admitted) = (&s, &a, &admitted);
            sc.spawn(move || {
                for i in 0..100u64 {
                    // 1 to 9, every value in any 9 debits: the balance ends at 0.
                    let amount = 1 + (n + i) % 9;
                    let ops = [op(a, "t", DAY, 1, None)];
                    let r = apply(
                        s,
                        Batch::new(&ops, Mode::WithinLimits, t(1))
                            .with_balance(debit(a, amount, 0)),
                    );
                    if r.applied {
                        admitted.fetch_add(amount, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let b = read(&s, &a, t(2));
    let spent = admitted.load(Ordering::Relaxed);
    assert!(spent <= 1_000, "overdrawn: {spent}");
    assert_eq!(
        b.remaining,
        1_000 - spent,
        "every admitted debit consumed once"
    );
    assert_eq!(b.debt, 0);
    assert_eq!(
        spent, 1_000,
        "debits of 1 keep coming after the balance runs low, so all of it is spent"
    );
}

/// Every check of rule 10.
pub fn run_balances<S: AllowanceStore>(new: impl Fn() -> S) {
    balances_consume_grants_in_order(&new);
    grants_are_idempotent(&new);
    balance_holds_settle(&new);
    concurrent_debits_never_overdraw(&new);
}
