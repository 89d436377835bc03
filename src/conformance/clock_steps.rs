//! The conformance check with a clock that steps back (contract rule 2).

use super::*;

/// Rule 2 with a clock that steps back: a `Check`, a refused batch and a
/// batch that ends in an error change nothing, so usage a forward call
/// counted still counts when `now` steps back into its period (and leaves on
/// time); usage written at a later time stays counted after a step back; a
/// hold read after its expiry still counts before it.
pub fn clock_steps_back_free_nothing<S: AllowanceStore>(new: impl Fn() -> S) {
    let s = new();
    const H: i64 = 3_600;
    // Noon of day 0, and two days later.
    let (noon, later, back) = (t(12 * H), t(2 * 86_400 + 9 * H), t(12 * H + 300));
    let life = Window::Lifetime;
    let (c, r, e) = (
        ScopeKey::subject("c"),
        ScopeKey::subject("r"),
        ScopeKey::subject("e"),
    );
    for x in [&c, &r, &e] {
        let a = apply(
            &s,
            Batch::new(&[op(x, "t", DAY, 10, Some(10))], Mode::WithinLimits, noon),
        );
        assert!(a.applied);
    }
    apply(
        &s,
        Batch::new(&[op(&e, "t", life, u64::MAX - 1, None)], Mode::Force, noon),
    );
    // Two days on: a read, a refused batch, an overflow.
    let a = apply(
        &s,
        Batch::new(&[op(&c, "t", DAY, 10, Some(10))], Mode::Check, later),
    );
    assert_eq!(a.counters[0].used, 0, "a new day reads zero");
    let ops = [op(&r, "t", DAY, 1, Some(10)), op(&r, "u", DAY, 2, Some(1))];
    assert!(!apply(&s, Batch::new(&ops, Mode::WithinLimits, later)).applied);
    let ops = [op(&e, "t", DAY, 1, Some(10)), op(&e, "t", life, 2, None)];
    assert!(matches!(
        s.apply(&Batch::new(&ops, Mode::Force, later)),
        Err(Error::Overflow { .. })
    ));
    for x in [&c, &r, &e] {
        let a = apply(
            &s,
            Batch::new(&[op(x, "t", DAY, 1, Some(10))], Mode::WithinLimits, back),
        );
        assert!(!a.applied, "{x:?}: a step back freed usage");
        assert_eq!(a.counters[0].used, 10, "{x:?}");
        assert_eq!(a.counters[0].period_start_ms, Some(t(0)), "{x:?}");
    }
    assert_eq!(used(&s, &c, "t", DAY, t(86_400)).0, 0, "the day still ends");

    // A rolling hour in 4 buckets of 15 minutes: usage at noon, a read two
    // days on, then back to 12:05.
    let w = Window::Rolling {
        span_secs: 3_600,
        buckets: 4,
    };
    let g = ScopeKey::subject("g");
    apply(
        &s,
        Batch::new(&[op(&g, "t", w, 10, Some(20))], Mode::WithinLimits, noon),
    );
    assert_eq!(used(&s, &g, "t", w, later).0, 0, "the hour has passed");
    let a = apply(
        &s,
        Batch::new(&[op(&g, "t", w, 10, Some(20))], Mode::WithinLimits, back),
    );
    assert!(a.applied);
    assert_eq!(a.counters[0].used, 20, "a step back freed rolling usage");
    assert_eq!(a.counters[0].resets_at_ms, Some(t(13 * H + 900)));
    assert_eq!(used(&s, &g, "t", w, t(13 * H + 899)).0, 20, "never early");
    assert_eq!(
        used(&s, &g, "t", w, t(13 * H + 900)).0,
        0,
        "leaves on time, not days late"
    );

    // Written at the later time: still counted after a step back.
    let (f, fr) = (ScopeKey::subject("f"), ScopeKey::subject("fr"));
    apply(
        &s,
        Batch::new(&[op(&f, "t", DAY, 3, None)], Mode::Force, noon),
    );
    apply(
        &s,
        Batch::new(&[op(&f, "t", DAY, 4, None)], Mode::Force, later),
    );
    assert_eq!(used(&s, &f, "t", DAY, back).0, 4, "forward usage kept");
    apply(
        &s,
        Batch::new(&[op(&fr, "t", w, 5, None)], Mode::Force, noon),
    );
    apply(
        &s,
        Batch::new(&[op(&fr, "t", w, 15, None)], Mode::Force, later),
    );
    assert_eq!(used(&s, &fr, "t", w, back).0, 15, "forward usage kept");

    // A hold read after its lease expired still counts before the expiry.
    let h = ScopeKey::subject("h");
    let open = LeaseOp::new(
        fresh_id(),
        &h,
        LeaseAction::Open {
            expires_at_ms: t(600),
            deadline_ms: None,
        },
    );
    apply(
        &s,
        Batch::new(&[op(&h, "t", DAY, 5, Some(10))], Mode::WithinLimits, t(0)).with_lease(open),
    );
    assert_eq!(used(&s, &h, "t", DAY, t(700)), (0, 0), "expired");
    assert_eq!(
        used(&s, &h, "t", DAY, t(300)),
        (0, 5),
        "a read freed a hold"
    );
}
