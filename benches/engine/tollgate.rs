//! tollgate on the memory store, with the four-limit plan of [`crate::plan`].
//!
//! Measured: `admit`, `check`, `record`, and `reserve` + `commit` as one
//! pair (`tollgate_reserve_commit` in the `subjects` group).

use chrono::{DateTime, Duration, TimeZone, Utc};
use tollgate::{Allocation, Engine, ManualClock, MemoryStore, SystemClock};

use crate::plan::{catalog, request};

/// The engine the `subjects` and `threads` groups use: the system clock (a
/// clock read per call, as governor's limiter reads quanta), every subject
/// allocated and holding one recorded request, so all four counters exist.
pub fn engine(ids: &[String]) -> Engine<MemoryStore, SystemClock> {
    let engine = Engine::new(catalog());
    for id in ids {
        engine
            .allocate(Allocation::new(id.as_str(), "plan"))
            .expect("allocate");
        engine.record(&request(id)).expect("record");
    }
    engine
}

/// When the `events` group's engines start filling (00:10 UTC, so the 23
/// hours of events all fall in one calendar day).
pub fn events_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 0, 10, 0).unwrap()
}

/// The `events` group's engine: `events` requests recorded per subject,
/// spread evenly over 23 hours (so the rolling window's running total covers
/// up to 23 filled hourly buckets), on a manual clock left at the end of
/// that span. The same instants the seed-004 peer is filled with.
pub fn engine_with_events(ids: &[String], events: usize) -> Engine<MemoryStore, ManualClock> {
    let clock = ManualClock::new(events_start());
    let engine = Engine::with_clock(catalog(), clock.clone());
    for id in ids {
        engine
            .allocate(Allocation::new(id.as_str(), "plan"))
            .expect("allocate");
    }
    let span = Duration::hours(23);
    let step = span / events.max(1) as i32;
    for k in 0..events {
        clock.set(events_start() + step * k as i32);
        for id in ids {
            engine.record(&request(id)).expect("record");
        }
    }
    clock.set(events_start() + span);
    engine
}
