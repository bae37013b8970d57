//! Measures how fast this machine's threads read memory, the bound on decoding speed: each of
//! `THREADS` threads sums its share of a buffer of `MIB` MiB (default 2048, well beyond any
//! cache), best of `ROUNDS` rounds (default 5).
//!
//! `cargo run --release -p pod-inference --example mem_bandwidth [THREADS [MIB [ROUNDS]]]`
//! (threads default to `RAYON_NUM_THREADS`, else the available parallelism).

use std::time::Instant;

fn arg(i: usize) -> Option<usize> {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("a whole number"))
}

fn main() {
    let threads = arg(1)
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mib = arg(2).unwrap_or(2048);
    let rounds = arg(3).unwrap_or(5);
    // Written once, so that every page is really in memory before it is timed.
    let buf: Vec<u64> = (0..mib * 1024 * 1024 / 8).map(|i| i as u64).collect();
    let share = buf.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    let mut check = 0u64;
    for _ in 0..rounds {
        let start = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(share)
                .map(|part| {
                    s.spawn(move || {
                        // Four lanes, so that the additions do not wait on each other.
                        let mut acc = [0u64; 4];
                        for c in part.chunks_exact(4) {
                            for (a, v) in acc.iter_mut().zip(c) {
                                *a = a.wrapping_add(*v);
                            }
                        }
                        acc.iter().fold(0u64, |a, v| a.wrapping_add(*v))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a reader thread"))
                .collect()
        });
        best = best.min(start.elapsed().as_secs_f64());
        check = sums.iter().fold(check, |a, v| a.wrapping_add(*v));
    }
    let gb = (buf.len() * 8) as f64 / 1e9;
    println!(
        "read {gb:.2} GB with {threads} threads: {:.1} GB/s (best of {rounds}; checksum {check:x})",
        gb / best
    );
}
