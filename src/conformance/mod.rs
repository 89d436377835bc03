//! A conformance suite for [`AllowanceStore`] backends (feature
//! `conformance`).
//!
//! Each function takes a factory that returns a fresh, empty store and
//! panics, naming the broken rule, if the store breaks the
//! [store contract](crate::store). A backend's own tests call
//! [`run_all`] (or each function as its own test):
//!
//! ```
//! # #[cfg(feature = "conformance")] {
//! use tollgate::{conformance, MemoryStore};
//! conformance::run_all(MemoryStore::new);
//! # }
//! ```
//!
//! Every test drives time through `Batch::now_ms` alone, so a backend that
//! keeps its own clock (a server's) must let the batch's `now_ms` rule, or
//! document why it fails a test.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::name::Name;

use crate::store::{
    AllowanceStore, Applied, Batch, CooldownOp, CounterOp, EventKey, Fraction, LeaseAction,
    LeaseId, LeaseOp, Mode,
};
use crate::{Error, Period, ScopeKey, Window};

mod balances;
mod clock_steps;
mod history;
pub use balances::{
    balance_holds_settle, balances_consume_grants_in_order, concurrent_debits_never_overdraw,
    grants_are_idempotent, run_balances,
};
pub use clock_steps::clock_steps_back_free_nothing;
pub use history::closed_periods_are_kept;

/// 2026-01-01 00:00 UTC plus `secs`.
fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
        + Duration::seconds(secs)
}

/// [`at`] in Unix milliseconds, as a batch takes it.
fn t(secs: i64) -> i64 {
    at(secs).timestamp_millis()
}

const DAY: Window = Window::calendar(Period::Day);

fn op<'a>(
    scope: &'a ScopeKey,
    meter: &str,
    window: Window,
    delta: u64,
    max: Option<u64>,
) -> CounterOp<'a> {
    CounterOp::new(scope, Name::new(meter), window, delta, max)
}

fn apply<S: AllowanceStore>(store: &S, batch: Batch<'_>) -> Applied {
    match store.apply(&batch) {
        Ok(a) => a,
        Err(e) => panic!("store refused a valid batch: {e}"),
    }
}

fn used<S: AllowanceStore>(
    store: &S,
    scope: &ScopeKey,
    meter: &str,
    window: Window,
    now: i64,
) -> (u64, u64) {
    let a = apply(
        store,
        Batch::new(&[op(scope, meter, window, 0, None)], Mode::Check, now),
    );
    (a.counters[0].used, a.counters[0].held)
}

fn fresh_id() -> LeaseId {
    static N: AtomicU64 = AtomicU64::new(1);
    LeaseId::from_u128((0x70_11_6a_7e_u128 << 64) | u128::from(N.fetch_add(1, Ordering::Relaxed)))
}

/// Rules 3 and 6: all or nothing across scopes, one state per op in order,
/// `Check` changes nothing, `Force` passes maxima.
pub fn batches_are_all_or_nothing<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let (a, p) = (ScopeKey::subject("a"), ScopeKey::pool("p"));
    let ops = [op(&a, "t", DAY, 5, Some(10)), op(&p, "t", DAY, 5, Some(4))];
    let r = apply(&s, Batch::new(&ops, Mode::WithinLimits, t(0)));
    assert!(
        !r.applied,
        "a batch with one op over its maximum must not apply"
    );
    assert_eq!(r.counters.len(), 2, "one state per op");
    assert_eq!(
        used(&s, &a, "t", DAY, t(0)).0,
        0,
        "nothing added to the op that fit"
    );
    let ops = [op(&a, "t", DAY, 5, Some(10)), op(&p, "t", DAY, 4, Some(4))];
    let r = apply(&s, Batch::new(&ops, Mode::WithinLimits, t(0)));
    assert!(r.applied);
    assert_eq!(
        (r.counters[0].used, r.counters[1].used),
        (5, 4),
        "states in op order"
    );
    let r = apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 6, Some(10))], Mode::Check, t(0)),
    );
    assert!(!r.applied, "Check never applies");
    assert_eq!(r.counters[0].used, 5);
    let r = apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 6, Some(10))], Mode::Force, t(0)),
    );
    assert!(r.applied);
    assert_eq!(r.counters[0].used, 11, "Force passes the maximum");
}

/// Rules 1 and 4: malformed batches and overflow are errors that change
/// nothing.
pub fn bad_batches_change_nothing<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    let twice = [op(&a, "t", DAY, 1, None), op(&a, "t", DAY, 1, None)];
    assert!(matches!(
        s.apply(&Batch::new(&twice, Mode::Force, t(0))),
        Err(Error::InvalidBatch { .. })
    ));
    let bad = Window::Rolling {
        span_secs: 10,
        buckets: 3,
    };
    let ops = [op(&a, "t", DAY, 1, None), op(&a, "u", bad, 1, None)];
    assert!(matches!(
        s.apply(&Batch::new(&ops, Mode::Force, t(0))),
        Err(Error::InvalidBatch { .. })
    ));
    let slot = [op(&a, "jobs", Window::Concurrent, 1, Some(2))];
    assert!(
        matches!(
            s.apply(&Batch::new(&slot, Mode::Force, t(0))),
            Err(Error::InvalidBatch { .. })
        ),
        "a concurrent counter takes holds, not usage"
    );
    assert_eq!(used(&s, &a, "t", DAY, t(0)).0, 0);
    apply(
        &s,
        Batch::new(
            &[op(&a, "t", Window::Lifetime, u64::MAX - 1, None)],
            Mode::Force,
            t(0),
        ),
    );
    let ops = [
        op(&a, "x", DAY, 1, None),
        op(&a, "t", Window::Lifetime, 2, None),
    ];
    assert!(matches!(
        s.apply(&Batch::new(&ops, Mode::Force, t(0))),
        Err(Error::Overflow { .. })
    ));
    assert_eq!(
        used(&s, &a, "x", DAY, t(0)).0,
        0,
        "an overflowing batch adds nothing"
    );
    let r = apply(
        &s,
        Batch::new(
            &[op(&a, "t", Window::Lifetime, 2, Some(u64::MAX))],
            Mode::WithinLimits,
            t(0),
        ),
    );
    assert!(!r.applied, "past u64 with a maximum simply does not fit");
}

/// Rule 2: calendar periods reset at their start; rolling usage leaves at
/// `b + width + span`, never early; lifetime never rolls.
pub fn windows_roll_exactly<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 7, None)], Mode::Force, t(3_600)),
    );
    assert_eq!(used(&s, &a, "t", DAY, t(86_399)).0, 7);
    assert_eq!(
        used(&s, &a, "t", DAY, t(86_400)).0,
        0,
        "a day resets at midnight"
    );
    // 24 h in 4 buckets of 6 h: recorded at 01:00 leaves at 06:00 next day.
    let w = Window::Rolling {
        span_secs: 86_400,
        buckets: 4,
    };
    apply(
        &s,
        Batch::new(&[op(&a, "r", w, 40, None)], Mode::Force, t(3_600)),
    );
    assert_eq!(
        used(&s, &a, "r", w, t(86_400 + 6 * 3_600 - 1)).0,
        40,
        "never early"
    );
    assert_eq!(
        used(&s, &a, "r", w, t(86_400 + 6 * 3_600)).0,
        0,
        "at most one bucket late"
    );
    apply(
        &s,
        Batch::new(&[op(&a, "l", Window::Lifetime, 3, None)], Mode::Force, t(0)),
    );
    assert_eq!(
        used(&s, &a, "l", Window::Lifetime, t(10 * 86_400 * 365)).0,
        3
    );
}

/// Rules 3 and 7: holds count for every other batch at once; `Settle`
/// removes them and charges the kept share, rounded up; concurrent counters
/// hold slots and are never charged.
pub fn holds_count_and_settle<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    let id = fresh_id();
    let open = LeaseOp::new(
        id,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    let ops = [
        op(&a, "t", DAY, 7, Some(10)),
        op(&a, "jobs", Window::Concurrent, 1, Some(1)),
    ];
    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(0)).with_lease(open),
    );
    assert!(r.applied);
    assert_eq!(
        (r.counters[0].used, r.counters[0].held),
        (0, 7),
        "an estimate is held, not used"
    );
    assert_eq!(r.counters[1].held, 1, "a slot is held");
    let r = apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 4, Some(10))], Mode::WithinLimits, t(1)),
    );
    assert!(
        !r.applied,
        "held amounts count for other callers: 7 held + 4 > 10"
    );
    let other = LeaseOp::new(
        fresh_id(),
        &a,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    let r = apply(
        &s,
        Batch::new(
            &[op(&a, "jobs", Window::Concurrent, 1, Some(1))],
            Mode::WithinLimits,
            t(1),
        )
        .with_lease(other),
    );
    assert!(!r.applied, "the only slot is taken");
    // Grow by 1, then settle keeping half: ceil(8 / 2) = 4 charged.
    let grow = LeaseOp::new(id, &a, LeaseAction::Grow);
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 1, Some(10))], Mode::Force, t(2)).with_lease(grow),
    );
    assert_eq!(used(&s, &a, "t", DAY, t(2)), (0, 8));
    let keep = Fraction::new(1, 2).unwrap_or(Fraction::ONE);
    let settle = LeaseOp::new(id, &a, LeaseAction::Settle { keep });
    let report = [
        op(&a, "t", DAY, 0, Some(10)),
        op(&a, "jobs", Window::Concurrent, 0, Some(1)),
    ];
    let r = apply(
        &s,
        Batch::new(&report, Mode::Force, t(3)).with_lease(settle),
    );
    assert_eq!(
        (r.counters[0].used, r.counters[0].held),
        (4, 0),
        "half of 8 kept, hold gone"
    );
    assert_eq!(r.counters[1].held, 0, "the slot is free");
    let mut charged: Vec<(String, u64, u64)> = r
        .settled
        .iter()
        .map(|h| (h.meter.to_string(), h.held, h.charged))
        .collect();
    charged.sort();
    assert_eq!(
        charged,
        vec![("jobs".to_owned(), 1, 0), ("t".to_owned(), 8, 4)]
    );
    // Odd amounts round up: keep 1/2 of 3 is 2.
    let id3 = fresh_id();
    let open = LeaseOp::new(
        id3,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 3, Some(10))], Mode::WithinLimits, t(4)).with_lease(open),
    );
    let settle = LeaseOp::new(id3, &a, LeaseAction::Settle { keep });
    apply(&s, Batch::new(&[], Mode::Force, t(5)).with_lease(settle));
    assert_eq!(
        used(&s, &a, "t", DAY, t(5)),
        (6, 0),
        "a charge is never rounded down"
    );
    // Settling twice is an error that changes nothing.
    let again = LeaseOp::new(
        id3,
        &a,
        LeaseAction::Settle {
            keep: Fraction::ONE,
        },
    );
    assert!(matches!(
        s.apply(&Batch::new(&[], Mode::Force, t(6)).with_lease(again)),
        Err(Error::ReservationSettled { .. })
    ));
    assert_eq!(used(&s, &a, "t", DAY, t(6)), (6, 0));
}

/// Rule 7: a hold counts until `expires_at` and is gone from then on, with
/// nothing charged; renewal moves the expiry; lease ops after expiry, on
/// unknown ids or another owner's lease are errors that change nothing.
pub fn leases_expire_and_renew<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let (a, b) = (ScopeKey::subject("a"), ScopeKey::subject("b"));
    let id = fresh_id();
    let open = LeaseOp::new(
        id,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(100),
            deadline_ms: None,
        },
    );
    apply(
        &s,
        Batch::new(&[op(&a, "t", DAY, 5, Some(10))], Mode::WithinLimits, t(0)).with_lease(open),
    );
    assert_eq!(
        used(&s, &a, "t", DAY, t(99)),
        (0, 5),
        "held until its expiry"
    );
    let renew = LeaseOp::new(
        id,
        &a,
        LeaseAction::Renew {
            expires_at_ms: t(200),
        },
    );
    apply(&s, Batch::new(&[], Mode::Force, t(99)).with_lease(renew));
    assert_eq!(
        used(&s, &a, "t", DAY, t(150)),
        (0, 5),
        "renewal keeps the hold"
    );
    assert_eq!(
        used(&s, &a, "t", DAY, t(200)),
        (0, 0),
        "gone at the renewed expiry, nothing charged"
    );
    let r = apply(
        &s,
        Batch::new(
            &[op(&a, "t", DAY, 10, Some(10))],
            Mode::WithinLimits,
            t(200),
        ),
    );
    assert!(r.applied, "an expired hold leaves the whole maximum");
    for action in [
        LeaseAction::Renew {
            expires_at_ms: t(900),
        },
        LeaseAction::Grow,
        LeaseAction::Settle {
            keep: Fraction::ONE,
        },
    ] {
        let late = LeaseOp::new(id, &a, action);
        assert!(
            matches!(
                s.apply(&Batch::new(&[], Mode::Force, t(201)).with_lease(late)),
                Err(Error::ReservationExpired { .. })
            ),
            "{action:?} after expiry"
        );
        let unknown = LeaseOp::new(fresh_id(), &a, action);
        assert!(matches!(
            s.apply(&Batch::new(&[], Mode::Force, t(201)).with_lease(unknown)),
            Err(Error::UnknownReservation { .. })
        ));
    }
    let id2 = fresh_id();
    let open = LeaseOp::new(
        id2,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(900),
            deadline_ms: Some(t(300)),
        },
    );
    apply(
        &s,
        Batch::new(&[op(&a, "u", DAY, 1, None)], Mode::WithinLimits, t(201)).with_lease(open),
    );
    let theirs = LeaseOp::new(
        id2,
        &b,
        LeaseAction::Settle {
            keep: Fraction::ONE,
        },
    );
    assert!(matches!(
        s.apply(&Batch::new(&[], Mode::Force, t(202)).with_lease(theirs)),
        Err(Error::UnknownReservation { .. })
    ));
    let reopen = LeaseOp::new(
        id2,
        &a,
        LeaseAction::Open {
            expires_at_ms: t(900),
            deadline_ms: None,
        },
    );
    assert!(matches!(
        s.apply(
            &Batch::new(&[op(&a, "u", DAY, 1, None)], Mode::WithinLimits, t(202))
                .with_lease(reopen)
        ),
        Err(Error::InvalidBatch { .. })
    ));
    assert_eq!(
        used(&s, &a, "u", DAY, t(202)),
        (0, 1),
        "failed lease ops changed nothing"
    );
    // The deadline: overdue from 300 on, until the lease ends.
    assert!(s.overdue(at(299)).map(|v| v.is_empty()).unwrap_or(false));
    let due = s.overdue(at(300)).unwrap_or_default();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id, due[0].deadline), (id2, Some(at(300))));
    assert!(
        s.overdue(at(900)).map(|v| v.is_empty()).unwrap_or(false),
        "an expired lease is not overdue work"
    );
}

/// Rule 8: an event applies once and replays its first answer; another
/// fingerprint under the same id is a conflict; a batch that did not apply
/// does not spend the id.
pub fn events_apply_once<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    let ops = [op(&a, "t", DAY, 3, Some(5))];
    let first = apply(
        &s,
        Batch::new(&ops, Mode::Force, t(0)).with_event(EventKey::new("e1", 42)),
    );
    assert!(first.replayed_at_ms.is_none());
    for i in 1..50 {
        let again = apply(
            &s,
            Batch::new(&ops, Mode::Force, t(i)).with_event(EventKey::new("e1", 42)),
        );
        assert_eq!(
            again.replayed_at_ms,
            Some(t(0)),
            "a replay names the first batch's time"
        );
        assert_eq!(
            again.counters, first.counters,
            "a replay answers the first states"
        );
    }
    assert_eq!(used(&s, &a, "t", DAY, t(60)).0, 3, "applied once");
    let other = [op(&a, "t", DAY, 4, Some(5))];
    assert!(matches!(
        s.apply(&Batch::new(&other, Mode::Force, t(61)).with_event(EventKey::new("e1", 43))),
        Err(Error::EventConflict { .. })
    ));
    let big = [op(&a, "t", DAY, 4, Some(5))];
    let r = apply(
        &s,
        Batch::new(&big, Mode::WithinLimits, t(62)).with_event(EventKey::new("e2", 7)),
    );
    assert!(!r.applied);
    let small = [op(&a, "t", DAY, 2, Some(5))];
    let r = apply(
        &s,
        Batch::new(&small, Mode::WithinLimits, t(63)).with_event(EventKey::new("e2", 8)),
    );
    assert!(
        r.applied && r.replayed_at_ms.is_none(),
        "a refused batch does not spend its id"
    );
    assert_eq!(used(&s, &a, "t", DAY, t(64)).0, 5);
    // A replayed settlement names its lease owner: another owner's retry
    // under the same id and fingerprint is a conflict, not its answer.
    let (o1, o2) = (ScopeKey::subject("o1"), ScopeKey::subject("o2"));
    let id = fresh_id();
    let open = LeaseOp::new(
        id,
        &o1,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    apply(
        &s,
        Batch::new(&[op(&o1, "t", DAY, 2, None)], Mode::WithinLimits, t(65)).with_lease(open),
    );
    let settle = |owner| {
        Batch::new(&[], Mode::Force, t(66))
            .with_lease(LeaseOp::new(
                id,
                owner,
                LeaseAction::Settle {
                    keep: Fraction::ONE,
                },
            ))
            .with_event(EventKey::new("e3", 9))
    };
    let first = apply(&s, settle(&o1));
    assert!(first.replayed_at_ms.is_none());
    assert!(matches!(
        s.apply(&settle(&o2)),
        Err(Error::EventConflict { .. })
    ));
    let again = apply(&s, settle(&o1));
    assert_eq!(again.replayed_at_ms, Some(t(66)));
    assert_eq!(
        again.settled, first.settled,
        "the owner's replay answers its settlement"
    );
}

/// Rule 9: a started cooldown refuses `WithinLimits` and `Check` batches
/// listing the scope until it ends; `Force` still applies.
pub fn cooldowns_block_until_they_end<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let (a, repo) = (ScopeKey::subject("a"), ScopeKey::pool("repo"));
    let start = [CooldownOp::new(&repo, Some(t(600)))];
    let r = apply(
        &s,
        Batch::new(&[], Mode::Force, t(0)).with_cooldowns(&start),
    );
    assert_eq!(r.cooldowns[..], [Some(t(600))]);
    let check = [CooldownOp::new(&repo, None)];
    let ops = [op(&a, "t", DAY, 1, Some(10))];
    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(599)).with_cooldowns(&check),
    );
    assert!(!r.applied, "cooling down");
    assert_eq!(r.cooldowns[..], [Some(t(600))], "the batch says until when");
    assert_eq!(used(&s, &a, "t", DAY, t(599)).0, 0);
    let r = apply(
        &s,
        Batch::new(&ops, Mode::Force, t(599)).with_cooldowns(&check),
    );
    assert!(
        r.applied,
        "usage that happened is recorded during a cooldown"
    );
    let r = apply(
        &s,
        Batch::new(&ops, Mode::WithinLimits, t(600)).with_cooldowns(&check),
    );
    assert!(r.applied && r.cooldowns[..] == [None], "over at its end");
}

/// Rules 3 and 5 under threads: 8 threads admitting and reserving against
/// one maximum never take it past, and every slot returns.
pub fn concurrent_batches_never_over_admit<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    let a = ScopeKey::subject("a");
    let admitted = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                for i in 0..200 {
                    let ops = [op(&a, "t", DAY, 3, Some(1_000))];
                    if i % 2 == 0 {
                        if apply(&s, Batch::new(&ops, Mode::WithinLimits, t(1))).applied {
                            admitted.fetch_add(3, Ordering::Relaxed);
                        }
                    } else {
                        let id = fresh_id();
                        let open = LeaseOp::new(
                            id,
                            &a,
                            LeaseAction::Open {
                                expires_at_ms: t(600),
                                deadline_ms: None,
                            },
                        );
                        let ops = [
                            op(&a, "t", DAY, 3, Some(1_000)),
                            op(&a, "slot", Window::Concurrent, 1, Some(4)),
                        ];
                        if apply(
                            &s,
                            Batch::new(&ops, Mode::WithinLimits, t(1)).with_lease(open),
                        )
                        .applied
                        {
                            let settle = LeaseOp::new(
                                id,
                                &a,
                                LeaseAction::Settle {
                                    keep: Fraction::ONE,
                                },
                            );
                            let r = apply(
                                &s,
                                Batch::new(
                                    &[op(&a, "slot", Window::Concurrent, 0, Some(4))],
                                    Mode::Force,
                                    t(1),
                                )
                                .with_lease(settle),
                            );
                            assert!(r.counters[0].held < 4, "never more than 4 slots held");
                            admitted.fetch_add(3, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let (u, h) = used(&s, &a, "t", DAY, t(2));
    assert_eq!(h, 0, "every hold settled");
    assert!(u <= 1_000, "over-admitted: {u}");
    assert_eq!(
        u,
        admitted.load(Ordering::Relaxed),
        "every admitted unit counted once"
    );
    assert_eq!(
        used(&s, &a, "slot", Window::Concurrent, t(2)).1,
        0,
        "every slot returned"
    );
}

/// Run every test of the suite against stores made by `new`.
pub fn run_all<S: AllowanceStore>(new: impl Fn() -> S) {
    batches_are_all_or_nothing(&new);
    bad_batches_change_nothing(&new);
    windows_roll_exactly(&new);
    holds_count_and_settle(&new);
    leases_expire_and_renew(&new);
    events_apply_once(&new);
    cooldowns_block_until_they_end(&new);
    concurrent_batches_never_over_admit(&new);
    clock_steps_back_free_nothing(&new);
    run_balances(&new);
    closed_periods_are_kept(&new);
}
