//! Memory per subject on the memory store, for the bench plan (daily input
//! tokens, daily jobs, a monthly cost cap, a rolling 7-day runtime limit in
//! 168 hourly buckets).
//!
//! ```text
//! cargo run --release --example memory_per_subject -- 1000000 1
//! cargo run --release --example memory_per_subject -- 100000 10
//! cargo run --release --example memory_per_subject -- 100000 1000
//! ```
//!
//! Arguments: subjects (default 1,000,000) and events recorded per subject
//! (default 1). It reads the process's resident size from `/proc/self/statm`
//! (Linux) and, through a counting global allocator, the live heap bytes:
//!
//! 1. after allocating every subject (the engine's allocation table);
//! 2. after one request per subject (its four counters now exist);
//! 3. after the remaining events, spread over 23 hours on a manual clock
//!    (the rolling window's buckets fill; nothing should grow).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{Duration, TimeZone, Utc};
use tollgate::{Allocation, Engine, ManualClock};

#[path = "../benches/engine/plan.rs"]
#[allow(dead_code)]
mod plan;

/// The system allocator, keeping a count of live bytes.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resident bytes: the second field of `/proc/self/statm`, in pages.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (Linux)");
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm resident field");
    pages * page_size()
}

/// The page size from the auxiliary vector (`AT_PAGESZ`), else 4 KiB.
fn page_size() -> i64 {
    const AT_PAGESZ: u64 = 6;
    let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
    auxv.chunks_exact(16)
        .map(|c| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            (word(&c[..8]), word(&c[8..]))
        })
        .find(|&(k, _)| k == AT_PAGESZ)
        .map_or(4096, |(_, v)| v as i64)
}

#[derive(Clone, Copy)]
struct Reading {
    rss: i64,
    heap: i64,
}

fn read() -> Reading {
    Reading {
        rss: rss(),
        heap: LIVE.load(Ordering::Relaxed),
    }
}

fn per(label: &str, from: Reading, to: Reading, n: usize) {
    println!(
        "{label:<44} RSS {:>8.1} B/subject   heap {:>8.1} B/subject",
        (to.rss - from.rss) as f64 / n as f64,
        (to.heap - from.heap) as f64 / n as f64,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("subjects"));
    let events: usize = args.next().map_or(1, |a| a.parse().expect("events"));
    assert!(n > 0 && events > 0, "subjects and events must be positive");

    let ids = plan::subject_ids(n);
    let start = Utc.with_ymd_and_hms(2026, 11, 23, 0, 10, 0).unwrap();
    let clock = ManualClock::new(start);
    let engine = Engine::with_clock(plan::catalog(), clock.clone());
    let r0 = read();

    for id in &ids {
        engine
            .allocate(Allocation::new(id.as_str(), "plan"))
            .expect("allocate");
    }
    let r1 = read();

    for id in &ids {
        engine.record(&plan::request(id)).expect("record");
    }
    let r2 = read();

    let step = Duration::hours(23) / events as i32;
    for k in 1..events {
        clock.set(start + step * k as i32);
        for id in &ids {
            engine.record(&plan::request(id)).expect("record");
        }
    }
    let r3 = read();

    let buckets = plan::ROLLING_BUCKETS as usize + 1;
    println!(
        "{n} subjects, {events} events each; page size {} B; RSS at start {:.1} MiB, at end {:.1} MiB",
        page_size(),
        r0.rss as f64 / 1_048_576.0,
        r3.rss as f64 / 1_048_576.0
    );
    per("allocation (plan binding, engine table)", r0, r1, n);
    per("counters (first request: four counters)", r1, r2, n);
    per(
        &format!("growth over the other {} events", events - 1),
        r2,
        r3,
        n,
    );
    println!(
        "target for the counters: <= 200 B + 8 B x {buckets} rolling buckets = {} B per subject",
        200 + 8 * buckets
    );
    // Keep the engine alive to the last reading.
    drop(engine);
}
