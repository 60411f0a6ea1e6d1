//! A fixed workload for profilers (`perf record`, `valgrind --tool=callgrind`):
//! the single-thread push/pop/complete loop of `benches/dispatch.rs`.
//! Arguments: rounds of 1,024 messages (2,000), keys (10,000).
use keylane_core::dispatch::{Config, Dispatch, Dispatcher, Ordering};

#[path = "support/feed.rs"]
mod feed;

fn main() {
    let rounds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let keys: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let d: Dispatcher<u64> = Dispatcher::new(Config {
        ordering: Ordering::Key,
        capacity: 1 << 20,
        max_in_flight: 1 << 20,
        seed: None,
    })
    .unwrap();
    let mut feed = feed::Feed::new(keys);
    let start = std::time::Instant::now();
    let (mut t_prep, mut t_push, mut t_pop, mut t_done) = (0f64, 0f64, 0f64, 0f64);
    for _ in 0..rounds {
        let t0 = std::time::Instant::now();
        let batch = feed.batch(&d, 1024);
        let t1 = std::time::Instant::now();
        d.push_many(batch).unwrap();
        let t2 = std::time::Instant::now();
        t_prep += (t1 - t0).as_secs_f64();
        t_push += (t2 - t1).as_secs_f64();
        loop {
            let t3 = std::time::Instant::now();
            let popped = d.pop_ready(1024);
            let t4 = std::time::Instant::now();
            t_pop += (t4 - t3).as_secs_f64();
            if popped.tickets.is_empty() {
                break;
            }
            d.complete_many(popped.tickets.into_iter().map(|t| t.receipt).collect()).unwrap();
            t_done += t4.elapsed().as_secs_f64();
        }
    }
    let el = start.elapsed();
    let per = |t: f64| t * 1e9 / (rounds * 1024) as f64;
    eprintln!(
        "{:.1} M msg/s; ns/msg: prepare {:.1}, push {:.1}, pop {:.1}, complete {:.1}",
        (rounds * 1024) as f64 / el.as_secs_f64() / 1e6,
        per(t_prep),
        per(t_push),
        per(t_pop),
        per(t_done)
    );
}
