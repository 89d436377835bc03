//! Balance edge cases of the memory store beyond the conformance suite.

use super::*;
use crate::store::{BalanceAction, BalanceOp, Fraction, GrantOp, LeaseId};

/// A settlement whose kept hold and own debit are both uncovered past a
/// `u64` together answers a capped `uncovered`, not a panic.
#[test]
fn uncovered_past_a_u64_is_capped_not_a_panic() {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let cost = Name::new("cost");
    let hold = |amount| {
        BalanceOp::new(
            &a,
            cost,
            BalanceAction::Debit {
                amount,
                overdraft: 0,
            },
        )
    };
    let grant = BalanceOp::new(
        &a,
        cost,
        BalanceAction::Grant(GrantOp::new("p", u64::MAX, 0)),
    );
    let force = |b: BalanceOp<'_>| {
        let r = store.apply(&Batch::new(&[], Mode::Force, 1_000).with_balance(b));
        assert!(r.expect("applies").applied);
    };
    force(grant);
    let id = LeaseId::from_u128(7);
    let open = LeaseOp::new(
        id,
        &a,
        LeaseAction::Open {
            expires_at_ms: 10_000,
            deadline_ms: None,
        },
    );
    let r = store
        .apply(
            &Batch::new(&[], Mode::WithinLimits, 1_000)
                .with_lease(open)
                .with_balance(hold(u64::MAX)),
        )
        .expect("a hold of the whole grant applies");
    assert_eq!(r.balance.expect("reported").held, u64::MAX);
    // Usage that happened takes the grant the hold was on.
    force(hold(u64::MAX));
    let settle = LeaseOp::new(
        id,
        &a,
        LeaseAction::Settle {
            keep: Fraction::ONE,
        },
    );
    let r = store
        .apply(
            &Batch::new(&[], Mode::Force, 2_000)
                .with_lease(settle)
                .with_balance(hold(u64::MAX)),
        )
        .expect("the settlement applies");
    let b = r.balance.expect("reported");
    assert_eq!((b.uncovered, b.held, b.debt), (u64::MAX, 0, 0));
}
