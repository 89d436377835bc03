//! Sweeps of idle counters and forgotten events, and `reclaim`.

use super::*;

/// A store with `idle` subjects recorded on day 0 and a function that
/// runs `n` batches of one busy subject on day 2 (the idle ones can go: a
/// sweep reads a day behind its batch, and day 0's counters end on day 1).
fn idle_then_busy(shards: usize, idle: usize) -> (MemoryStore, impl Fn(&MemoryStore, u64)) {
    idle_then_busy_on(shards, idle, 2)
}

/// As [`idle_then_busy`], the busy subject on day `busy_day`.
fn idle_then_busy_on(
    shards: usize,
    idle: usize,
    busy_day: i64,
) -> (MemoryStore, impl Fn(&MemoryStore, u64)) {
    fn op(scope: &ScopeKey) -> CounterOp<'_> {
        CounterOp {
            scope,
            meter: Name::new("t"),
            window: Window::calendar(Period::Day),
            delta: 1,
            max: None,
        }
    }
    let store = MemoryStore::with_shards(shards);
    for i in 0..idle {
        let s = ScopeKey::subject(format!("old{i}"));
        store
            .apply(&Batch::new(&[op(&s)], Mode::Force, ms(at(0))))
            .unwrap();
    }
    let busy = ScopeKey::subject("busy");
    let tomorrow = at(0) + chrono::Duration::days(busy_day);
    let run = move |store: &MemoryStore, n: u64| {
        for _ in 0..n {
            store
                .apply(&Batch::new(&[op(&busy)], Mode::Force, ms(tomorrow)))
                .unwrap();
        }
    };
    (store, run)
}

#[test]
fn a_batch_over_many_shards_locks_each_once_and_finds_every_counter() {
    // Scopes spread over most of 8 shards, in no order, several per
    // shard, plus a cooldown on a shard no op names.
    let store = MemoryStore::with_shards(8);
    // Scope hashes are keyed per process: the scopes are picked off the
    // cooled scope's shard (12 scopes picked blindly cover all 8 shards
    // about one run in ten).
    let cooled = ScopeKey::subject("c0");
    let scopes: Vec<ScopeKey> = (0..)
        .map(|i| match i % 3 {
            0 => ScopeKey::pool(format!("p{i}")),
            _ => ScopeKey::subject(format!("s{i}")),
        })
        .filter(|s| store.shard_of(s) != store.shard_of(&cooled))
        .take(12)
        .collect();
    let ops: Vec<CounterOp<'_>> = scopes
        .iter()
        .map(|s| CounterOp {
            scope: s,
            meter: Name::new("t"),
            window: Window::calendar(Period::Day),
            delta: 2,
            max: Some(3),
        })
        .collect();
    let cool = [CooldownOp::new(&cooled, Some(ms(at(5))))];
    let mut batch = Batch::new(&ops, Mode::WithinLimits, ms(at(0)));
    batch.cooldowns = &cool;
    let first = store.apply(&batch).unwrap();
    assert!(first.applied);
    assert!(first.counters.iter().all(|c| c.used == 2));
    assert_eq!(first.cooldowns[..], [Some(ms(at(5)))]);
    // The cooldown now runs: nothing fits, and every counter reads 2.
    let second = store.apply(&batch).unwrap();
    assert!(!second.applied);
    assert!(second.counters.iter().all(|c| c.used == 2));
    assert_eq!(store.counter_count(), scopes.len());
}

#[test]
fn a_clock_stepping_back_a_day_after_sweeps_finds_usage_still_counted() {
    // Subjects used 1 of a daily 1 on day 0; a busy subject's batches on
    // day 1 trigger sweeps of every shard; then the clock steps back to
    // day 0. A sweep at day 1 reads day 0 (a day behind), where that usage
    // still counts, so it is kept and a second unit is refused.
    let (store, run) = idle_then_busy_on(2, 100, 1);
    run(&store, 2 * SWEEP_EVERY);
    assert_eq!(store.counter_count(), 101, "nothing swept within the grace");
    let s = ScopeKey::subject("old7");
    let op = CounterOp {
        scope: &s,
        meter: Name::new("t"),
        window: Window::calendar(Period::Day),
        delta: 1,
        max: Some(1),
    };
    let back = at(1);
    let got = store
        .apply(&Batch::new(&[op], Mode::WithinLimits, ms(back)))
        .unwrap();
    assert!(
        !got.applied,
        "day 0's usage still counts after the step back"
    );
    assert_eq!(got.counters[0].used, 1);
}

#[test]
fn idle_counters_are_swept_without_being_asked() {
    // Two shards: every shard is swept within 2 × 1,024 batches.
    let (store, run) = idle_then_busy(2, 100);
    run(&store, 2 * SWEEP_EVERY);
    assert_eq!(
        store.counter_count(),
        1,
        "only the busy subject's counter is left"
    );
}

#[test]
fn sweeps_wait_four_batches_per_scope_then_reclaim() {
    // One shard: 2,000 subjects idle since yesterday and one busy one.
    // A sweep visits every scope, so it waits for 4 batches per scope
    // (8,004 here, counting the 2,000 that made them), then runs.
    let (store, run) = idle_then_busy(1, 2_000);
    run(&store, 5_000);
    assert_eq!(
        store.counter_count(),
        2_001,
        "no sweep yet at 7,000 batches"
    );
    run(&store, 1_100);
    assert_eq!(store.counter_count(), 1, "swept by 8,100 batches");
}

#[test]
fn sweeps_forget_events_an_eighth_of_a_horizon_after_it() {
    // One hour horizon: an event recorded at 0 is no longer replayed
    // after 1 h; automatic sweeps walk the ledger once its oldest entry
    // is 1 h 7.5 min old, `reclaim` at once.
    let store =
        MemoryStore::with_shards(1).with_event_horizon(std::time::Duration::from_secs(3_600));
    let scope = ScopeKey::subject("s");
    let ops = [CounterOp {
        scope: &scope,
        meter: Name::new("t"),
        window: Window::Lifetime,
        delta: 1,
        max: None,
    }];
    let minutes = |m: i64| at(0) + chrono::Duration::minutes(m);
    store
        .apply(&Batch::new(&ops, Mode::Force, ms(minutes(0))).with_event(EventKey::new("e", 1)))
        .unwrap();
    // 16 side shards, one swept per 1,024 batches here: 20,000 batches
    // reach every one.
    let busy = |m: i64| {
        for _ in 0..20_000 {
            store
                .apply(&Batch::new(&ops, Mode::Force, ms(minutes(m))))
                .unwrap();
        }
    };
    busy(61);
    assert_eq!(store.snapshot().event_count(), 1, "kept within the slack");
    busy(68);
    assert_eq!(store.snapshot().event_count(), 0, "forgotten after it");

    let store =
        MemoryStore::with_shards(1).with_event_horizon(std::time::Duration::from_secs(3_600));
    store
        .apply(&Batch::new(&ops, Mode::Force, ms(minutes(0))).with_event(EventKey::new("e", 1)))
        .unwrap();
    store.reclaim(minutes(61));
    assert_eq!(store.snapshot().event_count(), 0, "reclaim is exact");
}

#[test]
fn reclaim_drops_counters_of_ended_periods() {
    let store = MemoryStore::new();
    let w = Window::calendar(Period::Day);
    for i in 0..100 {
        let s = ScopeKey::subject(format!("s{i}"));
        store
            .apply(&Batch::new(
                &[CounterOp {
                    scope: &s,
                    meter: Name::new("t"),
                    window: w,
                    delta: 1,
                    max: None,
                }],
                Mode::Force,
                ms(at(0)),
            ))
            .unwrap();
    }
    assert_eq!(store.counter_count(), 100);
    assert_eq!(store.reclaim(at(23)), 0, "today's usage stays");
    assert_eq!(store.reclaim(at(0) + chrono::Duration::days(1)), 100);
    assert_eq!(store.counter_count(), 0);
}
