//! A fixed workload for profilers: the two-thread shape of
//! `benches/dispatch.rs` (one thread pushes batches as room allows, the
//! other pops and completes), with the time each side spends in its calls.
use std::sync::Arc;
use std::time::Instant;

use keylane_core::dispatch::{Config, Dispatch, Dispatcher, Ordering};

#[path = "support/feed.rs"]
mod feed;

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
            let (mut feed, mut sent, mut pushing) = (feed::Feed::new(10_000), 0, 0f64);
            while sent < total {
                let room = d.free_capacity().min(BATCH).min(total - sent);
                if room == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                let batch = feed.batch(&*d, room);
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
