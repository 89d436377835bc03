//! Running one operation on several threads at once, for `iter_custom`.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::plan::Pick;

/// Run `op` `iters` times on each of `threads` threads, started together,
/// and return the wall time divided by `threads`: criterion then reports the
/// time per operation of the threads together (aggregate throughput), so one
/// thread's figure over two threads' figure is the speed-up.
///
/// `op` gets its thread's index and its own picker.
pub fn run<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn(usize, &mut Pick) + Sync,
{
    let start_line = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start_line, op) = (&start_line, &op);
                s.spawn(move || {
                    let mut pick =
                        Pick::seeded(0x2545_F491_4F6C_DD1D_u64.wrapping_mul(t as u64 + 1));
                    start_line.wait();
                    for _ in 0..iters {
                        op(t, &mut pick);
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for h in handles {
            h.join().expect("bench thread");
        }
        start.elapsed() / threads as u32
    })
}
