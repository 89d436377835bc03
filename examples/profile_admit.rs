//! A loop of engine calls on the bench plan, for a profiler.
//!
//! ```text
//! cargo build --release --example profile_admit
//! valgrind --tool=callgrind --toggle-collect='*_loop*' \
//!     target/release/examples/profile_admit admit 10000 100000
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! Arguments: the call (`admit`, `check`, `record` or `reserve_commit`
//! (a `reserve` then a `commit` of the same request), or a peer:
//! `governor` for governor's `check_key`, `floor` for the locked
//! `HashMap<String, u64>` entry-and-add, `hand` for the plan's four limits
//! written by hand; default `admit`), the
//! number of subjects (default 10,000) and of calls (default 100,000). The
//! subjects are allocated and hold one recorded request before the loop, as
//! in the benches; `--toggle-collect` keeps that setup out of the profile.
//! The loop also counts heap allocations (a counting global allocator), so
//! the output says how many allocations and bytes one call costs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::{Clock, Engine, MemoryStore};

/// The system allocator, counting allocations and bytes asked for.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[path = "../benches/engine/plan.rs"]
#[allow(dead_code)]
mod plan;

#[path = "../benches/engine/peers.rs"]
#[allow(dead_code)]
mod peers;

#[path = "../benches/engine/tollgate.rs"]
#[allow(dead_code)]
mod tollgate_setup;

fn main() {
    let mut args = std::env::args().skip(1);
    let call = args.next().unwrap_or_else(|| "admit".into());
    let subjects: usize = args.next().map_or(10_000, |a| a.parse().expect("subjects"));
    let calls: u64 = args.next().map_or(100_000, |a| a.parse().expect("calls"));
    let events: Option<usize> = args.next().map(|a| a.parse().expect("events"));

    let ids = plan::subject_ids(subjects);
    let mut engine = None;
    let mut manual = None;
    let mut limiter = None;
    let mut floor = None;
    let mut hand = None;
    match (call.as_str(), events) {
        ("governor", _) => limiter = Some(peers::governor_limiter(&ids)),
        ("floor", _) => floor = Some(peers::FloorStr::new(&ids)),
        ("hand", _) => hand = Some(peers::HandFour::new(&ids)),
        (_, None) => engine = Some(tollgate_setup::engine(&ids)),
        (_, Some(e)) => manual = Some(tollgate_setup::engine_with_events(&ids, e)),
    }
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let t = std::time::Instant::now();
    let allowed = match (&limiter, &floor, &engine, &manual) {
        _ if hand.is_some() => {
            let h = hand.as_ref().expect("built above");
            peer_loop(&ids, calls, |id| h.admit(id, 100, 1, 5))
        }
        (Some(l), ..) => peer_loop(&ids, calls, |id| l.check_key(id).is_ok()),
        (_, Some(f), ..) => peer_loop(&ids, calls, |id| f.add(id, 1) > 0),
        (_, _, Some(e), _) => hot_loop(e, &ids, &call, calls),
        (_, _, _, Some(e)) => hot_loop(e, &ids, &call, calls),
        _ => unreachable!("one of them is built"),
    };
    let el = t.elapsed();
    let (a1, b1) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    println!(
        "{call} x {calls} on {subjects} subjects: {allowed} allowed, {:.0} ns per call, \
         {:.2} allocations and {:.0} bytes allocated per call (tollgate: request included)",
        el.as_nanos() as f64 / calls as f64,
        (a1 - a0) as f64 / calls as f64,
        (b1 - b0) as f64 / calls as f64,
    );
}

/// The profiled part: `calls` calls on random subjects.
#[inline(never)]
fn hot_loop<C: Clock>(
    engine: &Engine<MemoryStore, C>,
    ids: &[String],
    call: &str,
    calls: u64,
) -> u64 {
    let mut pick = plan::Pick::new();
    let mut allowed = 0;
    for _ in 0..calls {
        let req = plan::request(&ids[pick.next(ids.len())]);
        let d = match call {
            "admit" => engine.admit(&req),
            "check" => engine.check(&req),
            "record" => engine.record(&req),
            "reserve_commit" => {
                let res = engine
                    .reserve(&req, std::time::Duration::from_secs(600))
                    .expect("reserve")
                    .expect("a reservation");
                engine.commit(&res, &req)
            }
            other => panic!("unknown call {other}: admit, check, record or reserve_commit"),
        }
        .expect("decision");
        allowed += u64::from(black_box(d).allowed);
    }
    allowed
}

/// The profiled part for a peer: `calls` calls of `op` on random subjects.
#[inline(never)]
fn peer_loop(ids: &[String], calls: u64, op: impl Fn(&String) -> bool) -> u64 {
    let mut pick = plan::Pick::new();
    let mut allowed = 0;
    for _ in 0..calls {
        allowed += u64::from(black_box(op(&ids[pick.next(ids.len())])));
    }
    allowed
}
