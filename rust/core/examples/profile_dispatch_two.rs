//! A fixed workload for profilers: the two-thread shape of
//! `benches/dispatch.rs` (one thread pushes batches as room allows, the
//! other pops and completes), with the time each side spends in its calls.
use std::sync::Arc;
use std::time::Instant;

use keylane_core::dispatch::{Config, Dispatch, Dispatcher, Ordering, Prepared};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1024;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let d: Arc<Dispatcher<u64>> = Arc::new(
        Dispatcher::new(Config {
            ordering: Ordering::Key,
            capacity: 16 * BATCH,
            max_in_flight: 4 * BATCH,
            seed: None,
        })
        .unwrap(),
    );
    let total = rounds * BATCH;
    let start = Instant::now();
    let feeder = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            let (mut n, mut offsets, mut sent, mut pushing) = (0u64, [0i64; 12], 0, 0f64);
            while sent < total {
                let room = d.free_capacity().min(BATCH).min(total - sent);
                if room == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                let batch: Vec<Prepared<u64>> = (0..room)
                    .map(|_| {
                        let key = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 10_000).to_le_bytes();
                        let partition = (n % 12) as i32;
                        let offset = offsets[partition as usize];
                        offsets[partition as usize] += 1;
                        n += 1;
                        Prepared { lane: d.lane_of(Some(&key), partition), partition, offset, item: n }
                    })
                    .collect();
                let t = Instant::now();
                d.push_many(batch).unwrap();
                pushing += t.elapsed().as_secs_f64();
                sent += room;
            }
            pushing
        })
    };
    let (mut done, mut popping, mut completing) = (0, 0f64, 0f64);
    while done < total {
        let t = Instant::now();
        let popped = d.pop_ready(BATCH);
        if popped.tickets.is_empty() {
            std::hint::spin_loop();
            continue;
        }
        popping += t.elapsed().as_secs_f64();
        let receipts: Vec<_> = popped.tickets.into_iter().map(|t| t.receipt).collect();
        done += receipts.len();
        let t = Instant::now();
        d.complete_many(receipts).unwrap();
        completing += t.elapsed().as_secs_f64();
    }
    let pushing = feeder.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let per = |s: f64| s * 1e9 / total as f64;
    println!(
        "{:.2} M msg/s; ns per message: push {:.1}, pop {:.1} (calls that got some), complete {:.1}",
        total as f64 / secs / 1e6,
        per(pushing),
        per(popping),
        per(completing)
    );
}
