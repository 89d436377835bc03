//! Unit tests of the memory store's parts.

use super::*;
use crate::name::Name;
use crate::store::{CooldownOp, CounterOp, EventKey, LeaseAction, LeaseOp, Mode, ScopeMap};
use crate::window::Period;
use chrono::{DateTime, TimeZone, Utc};

mod balances;
mod sweeps;

#[test]
fn a_counter_is_three_words() {
    assert_eq!(std::mem::size_of::<Counter>(), 24);
}

#[test]
fn a_scope_key_is_three_words_and_keeps_its_kind_exactly() {
    use crate::store::ScopeKind;
    assert_eq!(std::mem::size_of::<ScopeKey>(), 24);
    let (s, p) = (ScopeKey::subject("a"), ScopeKey::pool("a"));
    assert_ne!(s, p);
    assert_eq!((s.kind(), p.kind()), (ScopeKind::Subject, ScopeKind::Pool));
    assert_eq!((s.id(), p.id()), ("a", "a"));
    assert_ne!(s.hash_value(), p.hash_value());
    // Equal ids of equal kind are equal, through distinct allocations.
    let s2 = ScopeKey::subject(String::from("a"));
    assert_eq!(s, s2);
    assert_eq!(s.hash_value(), s2.hash_value());
    assert_eq!(ScopeKey::pool("a"), p);
    assert_ne!(ScopeKey::subject("b"), s);
    // Both kinds in one map stay apart.
    let mut m: ScopeMap<u8> = ScopeMap::default();
    m.insert(s.clone(), 1);
    m.insert(p.clone(), 2);
    assert_eq!((m.get(&s2), m.get(&p), m.len()), (Some(&1), Some(&2), 2));
    assert!(s < p, "subjects sort before pools");
    assert_eq!(format!("{s} {p}"), "subject:a pool:a");
    // Many ids of both kinds: no two keys of different kind compare
    // equal, and the kind survives a serde round trip.
    for i in 0..1_000 {
        let id = i.to_string();
        let (s, p) = (ScopeKey::subject(id.as_str()), ScopeKey::pool(id.as_str()));
        assert_ne!(s, p);
        assert_eq!((s.kind(), p.kind()), (ScopeKind::Subject, ScopeKind::Pool));
        let back: ScopeKey = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.hash_value(), p.hash_value());
    }
}

fn at(h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap()
}

/// `t` in Unix milliseconds, as a batch takes it.
fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

const DAY_MS: i64 = 86_400_000;

#[test]
fn rolling_usage_leaves_at_most_one_bucket_late_never_early() {
    let store = MemoryStore::new();
    let scope = ScopeKey::subject("a");
    // 24 h in 4 buckets of 6 h.
    let window = Window::Rolling {
        span_secs: 86_400,
        buckets: 4,
    };
    let op = |delta| CounterOp {
        scope: &scope,
        meter: Name::new("t"),
        window,
        delta,
        max: Some(100),
    };
    let run = |delta, mode, now| {
        store
            .apply(&Batch::new(&[op(delta)], mode, ms(now)))
            .unwrap()
    };
    // Recorded at 01:00, in the bucket [00:00, 06:00).
    run(40, Mode::Force, at(1));
    // Still counted a full span later minus a moment: never early.
    let day_later = at(1) + chrono::Duration::hours(24) - chrono::Duration::seconds(1);
    assert_eq!(run(0, Mode::Check, day_later).counters[0].used, 40);
    // Leaves at the bucket boundary after 01:00 + 24 h: 2026-01-02 06:00.
    let s = run(0, Mode::Check, at(1) + chrono::Duration::hours(24));
    assert_eq!(s.counters[0].used, 40);
    assert_eq!(
        s.counters[0].resets_at_ms,
        Some(ms(Utc.with_ymd_and_hms(2026, 1, 2, 6, 0, 0).unwrap()))
    );
    let s = run(
        0,
        Mode::Check,
        Utc.with_ymd_and_hms(2026, 1, 2, 6, 0, 0).unwrap(),
    );
    assert_eq!(s.counters[0].used, 0);
}

/// The compact path (no event id, lease or cooldown) answers and counts
/// as the general path does: every batch is applied to one store as is
/// and to another with an event id, which takes the general path.
#[test]
fn the_compact_path_answers_as_the_general_path() {
    let (plain, general) = (MemoryStore::with_shards(4), MemoryStore::with_shards(4));
    let scopes: Vec<ScopeKey> = (0..6).map(|i| ScopeKey::subject(format!("s{i}"))).collect();
    let windows = [
        Window::calendar(Period::Day),
        Window::Calendar {
            period: Period::Month,
            utc_offset_secs: -5 * 3_600,
        },
        Window::Rolling {
            span_secs: 7 * 86_400,
            buckets: 168,
        },
        Window::Lifetime,
    ];
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut now = at(0);
    for step in 0..600 {
        // Mostly forward, by up to 3 days, now and then a step back.
        now = match next(10) {
            0 => now - chrono::Duration::hours(5),
            _ => now + chrono::Duration::minutes(next(3 * 24 * 60) as i64),
        };
        // One or two scopes (so one shard or more), each op on a window.
        let picked = [next(6) as usize, next(6) as usize];
        let n = if next(3) == 0 { 2 } else { 1 };
        let mut ops = Vec::new();
        for (j, &s) in picked[..n].iter().enumerate() {
            if j == 1 && picked[1] == picked[0] {
                break;
            }
            for (k, &window) in windows.iter().enumerate() {
                if next(5) == 0 {
                    continue;
                }
                ops.push(CounterOp {
                    scope: &scopes[s],
                    meter: Name::new(["tokens", "jobs"][k % 2]),
                    window,
                    delta: next(40),
                    max: (next(4) != 0).then_some(200),
                });
            }
        }
        // Now and then the scopes interleave: runs of one op each, a
        // scope named by runs apart.
        if next(3) == 0 {
            ops.sort_by_key(|o| windows.iter().position(|w| *w == o.window));
        }
        let mode = [Mode::WithinLimits, Mode::Check, Mode::Force][next(3) as usize];
        let id = format!("e{step}");
        let batch = Batch::new(&ops, mode, ms(now));
        let a = plain.apply(&batch).unwrap();
        let b = general
            .apply(&batch.with_event(EventKey::new(&id, 0)))
            .unwrap();
        assert_eq!(a, b, "step {step}");
    }
    assert_eq!(plain.snapshot().scopes, general.snapshot().scopes);
}

/// A batch on one scope takes a path of its own up to 16 ops, and the
/// compact path past them: at 1, 16 and 17 ops, with a counter refused, one
/// made, one due a roll and one current, both answer and count as the
/// general path does.
#[test]
fn a_one_scope_batch_answers_as_the_general_path_at_16_ops_and_past_them() {
    let (plain, general) = (MemoryStore::with_shards(2), MemoryStore::with_shards(2));
    let scope = ScopeKey::subject("s");
    let meters: Vec<Name> = (0..17).map(|i| Name::new(&format!("m{i}"))).collect();
    let windows = [
        Window::calendar(Period::Day),
        Window::Rolling {
            span_secs: 3_600,
            buckets: 60,
        },
        Window::Lifetime,
    ];
    for (day, n) in [(0, 1), (1, 16), (2, 17)] {
        // Seconds after the first batch: made, current, due a roll (a day
        // later), then current again: refused, checked, forced past.
        for (secs, mode, max) in [
            (0, Mode::WithinLimits, 100),
            (1, Mode::WithinLimits, 100),
            (86_400, Mode::WithinLimits, 100),
            (86_401, Mode::WithinLimits, 5),
            (86_402, Mode::Check, 5),
            (86_403, Mode::Force, 5),
        ] {
            let ops: Vec<CounterOp<'_>> = meters[..n]
                .iter()
                .enumerate()
                .map(|(i, &meter)| CounterOp {
                    scope: &scope,
                    meter,
                    window: windows[i % 3],
                    delta: ((i + 1) % 4) as u64 * 3,
                    max: Some(max),
                })
                .collect();
            let now = ms(at(0)) + day * 2 * 86_400_000 + secs * 1_000;
            let batch = Batch::new(&ops, mode, now);
            let id = format!("e{n}-{secs}");
            let a = plain.apply(&batch).unwrap();
            let b = general
                .apply(&batch.with_event(EventKey::new(&id, 0)))
                .unwrap();
            assert_eq!(a, b, "{n} ops, {secs} s, {mode:?}");
            assert_eq!(a.counters.len(), n);
        }
    }
    assert_eq!(plain.snapshot().scopes, general.snapshot().scopes);
}

#[test]
fn a_batch_that_does_not_fit_changes_nothing() {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let p = ScopeKey::pool("p");
    let w = Window::calendar(Period::Day);
    let ops = [
        CounterOp {
            scope: &a,
            meter: Name::new("t"),
            window: w,
            delta: 5,
            max: Some(10),
        },
        CounterOp {
            scope: &p,
            meter: Name::new("t"),
            window: w,
            delta: 5,
            max: Some(4),
        },
    ];
    let r = store
        .apply(&Batch::new(&ops, Mode::WithinLimits, ms(at(0))))
        .unwrap();
    assert!(!r.applied);
    assert_eq!(r.counters[0].used, 0);
    assert_eq!(r.counters[1].used, 0);
    assert_eq!(
        r.counters[1].available_at_ms, None,
        "5 > max 4: waiting never helps"
    );
    assert_eq!(store.counter_count(), 0);
}

#[test]
fn overflow_is_an_error_and_changes_nothing() {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let w = Window::Lifetime;
    let op = |delta| CounterOp {
        scope: &a,
        meter: Name::new("t"),
        window: w,
        delta,
        max: None,
    };
    store
        .apply(&Batch::new(&[op(u64::MAX - 1)], Mode::Force, ms(at(0))))
        .unwrap();
    let err = store
        .apply(&Batch::new(&[op(2)], Mode::Force, ms(at(0))))
        .unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }));
    let r = store
        .apply(&Batch::new(&[op(0)], Mode::Check, ms(at(0))))
        .unwrap();
    assert_eq!(r.counters[0].used, u64::MAX - 1);
}

#[test]
fn malformed_batches_are_refused_and_change_nothing() {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let w = Window::calendar(Period::Day);
    let op = CounterOp {
        scope: &a,
        meter: Name::new("t"),
        window: w,
        delta: 60,
        max: Some(100),
    };
    // The same counter twice would be checked against the same usage and
    // added twice: 120 past a maximum of 100.
    let twice = [op, op];
    let err = store
        .apply(&Batch::new(&twice, Mode::WithinLimits, ms(at(0))))
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidBatch { reason } if reason.contains("twice")));
    // Buckets narrower than a second, and an empty span.
    for window in [
        Window::Rolling {
            span_secs: 5,
            buckets: 10,
        },
        Window::Rolling {
            span_secs: 0,
            buckets: 1,
        },
    ] {
        let bad = CounterOp { window, ..op };
        let err = store
            .apply(&Batch::new(&[op, bad], Mode::Force, ms(at(0))))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidBatch { .. }), "{window}");
    }
    assert_eq!(store.counter_count(), 0);
}

/// Validation tells a repeated counter from a repeated meter, whatever
/// references name the scope, and checks every calendar offset but UTC's.
#[test]
fn a_counter_named_twice_is_told_from_a_meter_named_twice() {
    let store = MemoryStore::new();
    let (a, a2, b) = (
        ScopeKey::subject("a"),
        ScopeKey::subject(String::from("a")),
        ScopeKey::subject("b"),
    );
    let day = Window::calendar(Period::Day);
    let op = |scope, window| CounterOp {
        scope,
        meter: Name::new("t"),
        window,
        delta: 1,
        max: None,
    };
    // One meter over two windows, and on two scopes: four counters.
    let fine = [
        op(&a, day),
        op(&a, Window::Lifetime),
        op(&b, day),
        op(&b, Window::Lifetime),
    ];
    let r = store
        .apply(&Batch::new(&fine, Mode::WithinLimits, ms(at(0))))
        .unwrap();
    assert!(r.applied);
    assert_eq!(store.counter_count(), 4);
    // The same counter through another reference to an equal scope.
    let twice = [op(&a, day), op(&b, day), op(&a2, day)];
    let err = store
        .apply(&Batch::new(&twice, Mode::Force, ms(at(0))))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidBatch { reason } if reason.starts_with("ops[2]") && reason.contains("twice")),
        "{err}"
    );
    // Offsets off the minute or a day or more are refused; a whole-minute
    // offset within a day is not.
    for (offset, ok) in [(0, true), (-300, true), (30, false), (86_400, false)] {
        let w = Window::Calendar {
            period: Period::Day,
            utc_offset_secs: offset,
        };
        let r = store.apply(&Batch::new(&[op(&b, w)], Mode::Check, ms(at(0))));
        assert_eq!(r.is_ok(), ok, "{offset}");
    }
    let r = store
        .apply(&Batch::new(&fine, Mode::Check, ms(at(0))))
        .unwrap();
    assert_eq!(r.counters.iter().map(|c| c.used).sum::<u64>(), 4);
}

#[test]
fn a_clock_stepping_back_keeps_usage_in_its_own_period() {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let op = |delta| CounterOp {
        scope: &a,
        meter: Name::new("t"),
        window: Window::calendar(Period::Month),
        delta,
        max: Some(100),
    };
    let feb = Utc.with_ymd_and_hms(2026, 2, 10, 0, 0, 0).unwrap();
    store
        .apply(&Batch::new(&[op(10)], Mode::Force, ms(feb)))
        .unwrap();
    let jan = Utc.with_ymd_and_hms(2026, 1, 20, 0, 0, 0).unwrap();
    let s = store
        .apply(&Batch::new(&[op(0)], Mode::Check, ms(jan)))
        .unwrap()
        .counters[0];
    assert_eq!(s.used, 10);
    assert_eq!(
        s.period_start_ms,
        Some(ms(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()))
    );
    assert_eq!(
        s.resets_at_ms,
        Some(ms(Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()))
    );
}

/// One counter of each window, one of them holding for a lease.
fn busy_store() -> (MemoryStore, ScopeKey, Vec<Window>) {
    let store = MemoryStore::new();
    let a = ScopeKey::subject("a");
    let windows = vec![
        Window::calendar(Period::Day),
        Window::calendar(Period::Month),
        Window::Rolling {
            span_secs: 86_400,
            buckets: 24,
        },
        Window::Lifetime,
    ];
    for (h, delta) in [(1, 5), (3, 7)] {
        let ops: Vec<_> = windows
            .iter()
            .map(|&window| CounterOp {
                scope: &a,
                meter: Name::new("t"),
                window,
                delta,
                max: None,
            })
            .collect();
        store
            .apply(&Batch::new(&ops, Mode::Force, ms(at(h))))
            .unwrap();
    }
    let hold = [CounterOp {
        scope: &a,
        meter: Name::new("jobs"),
        window: Window::Concurrent,
        delta: 1,
        max: Some(3),
    }];
    let open = LeaseOp::new(
        LeaseId::from_u128(7),
        &a,
        LeaseAction::Open {
            expires_at_ms: ms(at(20)),
            deadline_ms: None,
        },
    );
    let r = store
        .apply(&Batch::new(&hold, Mode::WithinLimits, ms(at(4))).with_lease(open))
        .unwrap();
    assert!(r.applied);
    (store, a, windows)
}

#[test]
fn a_restored_snapshot_keeps_every_counter_and_hold() {
    let (store, a, windows) = busy_store();
    let snap = store.snapshot();
    assert_eq!(snap.counter_count(), 5);
    let json = serde_json::to_string(&snap).unwrap();
    let back: Snapshot = serde_json::from_str(&json).unwrap();
    let restored = MemoryStore::restore(back).unwrap();
    assert_eq!(restored.snapshot(), snap);
    for &window in &windows {
        let op = [CounterOp {
            scope: &a,
            meter: Name::new("t"),
            window,
            delta: 0,
            max: Some(100),
        }];
        let was = store
            .apply(&Batch::new(&op, Mode::Check, ms(at(5))))
            .unwrap();
        let now = restored
            .apply(&Batch::new(&op, Mode::Check, ms(at(5))))
            .unwrap();
        assert_eq!(now.counters, was.counters, "{window}");
        assert_eq!(now.counters[0].used, 12, "{window}");
    }
    let jobs = [CounterOp {
        scope: &a,
        meter: Name::new("jobs"),
        window: Window::Concurrent,
        delta: 0,
        max: Some(3),
    }];
    let r = restored
        .apply(&Batch::new(&jobs, Mode::Check, ms(at(5))))
        .unwrap();
    assert_eq!(r.counters[0].held, 1);
    // The hold still ends with its lease.
    let r = restored
        .apply(&Batch::new(&jobs, Mode::Check, ms(at(20))))
        .unwrap();
    assert_eq!(r.counters[0].held, 0);
}

#[test]
fn a_snapshot_that_breaks_an_invariant_is_refused() {
    let (store, _, _) = busy_store();
    let snap = store.snapshot();
    let mut tampered = Vec::new();
    for i in 0..snap.scopes[0].1.len() {
        let mut s = snap.clone();
        match &mut s.scopes[0].1[i].data {
            Data::Calendar { start, end, .. } => *end = *start + 60 * DAY_MS,
            Data::Rolling(r) => r.total += 1,
            Data::Lifetime { .. } => s.scopes[0].1[i].window = Window::Concurrent,
            Data::Concurrent => {
                if let Some(h) = &mut s.scopes[0].1[i].holds {
                    h.total += 1;
                }
            }
        }
        tampered.push(s);
    }
    // Extremes that would overflow the arithmetic.
    for i in 0..snap.scopes[0].1.len() {
        let mut s = snap.clone();
        match &mut s.scopes[0].1[i].data {
            Data::Calendar { start, end, .. } => (*start, *end) = (i64::MIN, i64::MAX),
            Data::Rolling(r) => (r.head, r.tail) = (i64::MAX, i64::MAX),
            _ => continue,
        }
        tampered.push(s);
    }
    let mut twice = snap.clone();
    let first = twice.scopes[0].1[0].clone();
    twice.scopes[0].1.push(first);
    tampered.push(twice);
    for s in tampered {
        let err = MemoryStore::restore(s).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::InvalidSnapshot { .. }), "{err}");
    }
    assert!(MemoryStore::restore(snap).is_ok());
}

#[test]
fn a_full_key_table_refuses_the_batch_and_recovers_when_keys_are_unused() {
    let store = MemoryStore::with_shards(1);
    let a = ScopeKey::subject("a");
    let op = |meter, delta| CounterOp {
        scope: &a,
        meter: Name::new(meter),
        window: Window::Lifetime,
        delta,
        max: None,
    };
    // Every id but one in use by an empty counter of another scope.
    {
        let mut sh = store.shards[0].lock();
        let filler: Vec<Counter> = (0..KeyId::MAX)
            .map(|key| {
                // Distinct names: pushed without a search.
                sh.keys
                    .0
                    .push((Name::new(&format!("m{key}")), Window::Lifetime));
                Counter::Lifetime { key, used: 0 }
            })
            .collect();
        sh.scopes
            .insert(ScopeKey::subject("filler"), filler.into_boxed_slice());
    }
    let run = |meter, delta, mode| store.apply(&Batch::new(&[op(meter, delta)], mode, ms(at(0))));
    run("kept", 4, Mode::Force).unwrap();
    let err = run("one too many", 1, Mode::Force).unwrap_err();
    assert!(matches!(err, Error::InvalidBatch { .. }), "{err}");
    assert_eq!(
        run("one too many", 0, Mode::Check).unwrap().counters[0].used,
        0
    );
    assert_eq!(
        store.counter_count(),
        KeyId::MAX as usize + 1,
        "nothing changed"
    );
    // The empty counters go; their keys with them; the kept counter is
    // renumbered and keeps its usage.
    assert_eq!(store.reclaim(at(0)), KeyId::MAX as usize);
    assert_eq!(store.shards[0].lock().keys.0.len(), 1);
    run("one too many", 1, Mode::Force).unwrap();
    assert_eq!(run("kept", 0, Mode::Check).unwrap().counters[0].used, 4);
    assert_eq!(
        run("one too many", 0, Mode::Check).unwrap().counters[0].used,
        1
    );
}

/// A rolling counter's view at `now` (what a batch that does not apply
/// reads) is what rolling it to `now` would leave: usage, tail, reset and
/// available times, over random histories with steps back; and reading it
/// changes nothing.
#[test]
fn a_rolling_view_reads_as_the_rolled_counter() {
    use super::counters::{width_of, Ring};
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let ring_of = |c: &Counter, w: Window| -> (i64, u64, Option<i64>, Option<i64>) {
        let Counter::Rolling { back, buf, .. } = c else {
            unreachable!()
        };
        let r = Ring {
            width_ms: width_of(w),
            back: *back,
            buf: &**buf,
        };
        (r.tail(), r.total(), r.resets_at(), r.available_at(3, 10))
    };
    for buckets in [1u32, 3, 4, 12] {
        let w = Window::Rolling {
            span_secs: 3_600,
            buckets,
        };
        let width = width_of(w);
        let mut now = 1_767_225_600_000_i64;
        let mut c = Counter::new(0, w, now);
        for _ in 0..2_000 {
            let step = [
                -2 * width,
                -1,
                0,
                1,
                width / 2,
                width,
                3 * width,
                90 * width,
            ];
            now += step[(next() % step.len() as u64) as usize];
            if next() % 2 == 0 {
                let _closed = c.advance(w, now);
                c.add(w, next() % 5);
            }
            let before = c.clone();
            let used = c.used_now(w, now);
            let Counter::Rolling { back, buf, .. } = &c else {
                unreachable!()
            };
            let r = Ring {
                width_ms: width,
                back: *back,
                buf: &**buf,
            };
            let (tail, total) = r.view(now);
            let view = (
                r.resets_at_in(tail, total),
                r.available_at_in(tail, total, 3, 10),
            );
            assert_eq!(c, before, "a view writes nothing");
            let mut rolled = c.clone();
            let _closed = rolled.advance(w, now);
            let (rtail, rtotal, rresets, ravail) = ring_of(&rolled, w);
            assert_eq!((used, total), (rtotal, rtotal));
            if total > 0 {
                assert_eq!(tail, rtail);
            }
            // (An available time is asked for only past the maximum.)
            let over = total + 3 > 10;
            assert_eq!(
                (view.0, view.1.filter(|_| over)),
                (rresets, ravail.filter(|_| over)),
                "buckets {buckets} at {now}"
            );
        }
    }
}

/// An answer keeps its states inline for a batch of up to
/// `INLINE_STATES` ops and spills past it, one state per op in order
/// either way (contract rule 6), on both paths.
#[test]
fn answers_are_inline_up_to_their_count_and_in_order_past_it() {
    use crate::store::INLINE_STATES;
    let store = MemoryStore::new();
    let scopes: Vec<ScopeKey> = (0..3).map(|i| ScopeKey::subject(format!("s{i}"))).collect();
    let meters: Vec<Name> = (0..4).map(|i| Name::new(&format!("m{i}"))).collect();
    let ops: Vec<CounterOp<'_>> = scopes
        .iter()
        .flat_map(|s| meters.iter().map(move |&m| (s, m)))
        .enumerate()
        .map(|(i, (scope, meter))| CounterOp {
            scope,
            meter,
            window: Window::Lifetime,
            delta: i as u64 + 1,
            max: None,
        })
        .collect();
    assert!(ops.len() > INLINE_STATES);
    for n in [1, INLINE_STATES, INLINE_STATES + 1, ops.len()] {
        for event in [None, Some(EventKey::new("e", n as u64))] {
            let mut batch = Batch::new(&ops[..n], Mode::Check, ms(at(0)));
            batch.event = event;
            let r = store.apply(&batch).unwrap();
            assert_eq!(r.counters.spilled(), n > INLINE_STATES, "{n}");
            assert_eq!(r.counters.len(), n);
        }
    }
    store
        .apply(&Batch::new(&ops, Mode::Force, ms(at(0))))
        .unwrap();
    let r = store
        .apply(&Batch::new(&ops, Mode::Check, ms(at(1))))
        .unwrap();
    let used: Vec<u64> = r.counters.iter().map(|c| c.used).collect();
    let want: Vec<u64> = (1..=ops.len() as u64).collect();
    assert_eq!(used, want);
}
