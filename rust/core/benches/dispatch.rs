//! push + pop + complete throughput of the dispatcher, 10,000 keys, on one
//! thread and on two (one feeding, one working): the shipped lock-free
//! `Dispatcher` against the sharded, mutex-based design it replaced
//! (`compare/sharded.rs`), alternating in one run.
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as A};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keylane_core::dispatch::{Config, Dispatch, Dispatcher, Ordering, Prepared};

// What the Python extension ships with (rust/py): both designs measured
// under the same allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "compare/offset_window.rs"]
#[allow(dead_code)]
mod offset_window;
#[path = "compare/sharded.rs"]
#[allow(dead_code)]
mod sharded;

const KEYS: u64 = 10_000;
const PARTITIONS: i32 = 12;
const BATCH: usize = 1024;

/// Keys spread like real traffic: a multiplicative hash of a counter, so
/// consecutive messages hit unrelated keys.
fn key_of(n: u64) -> [u8; 8] {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % KEYS).to_le_bytes()
}

struct Feed {
    n: u64,
    offsets: Vec<i64>,
}

impl Feed {
    fn new() -> Self {
        Feed { n: 0, offsets: vec![0; PARTITIONS as usize] }
    }

    fn batch<D: Dispatch<u64>>(&mut self, d: &D, len: usize) -> Vec<Prepared<u64>> {
        (0..len)
            .map(|_| {
                let key = key_of(self.n);
                let partition = (self.n % PARTITIONS as u64) as i32;
                let offset = self.offsets[partition as usize];
                self.offsets[partition as usize] += 1;
                self.n += 1;
                Prepared { lane: d.lane_of(Some(&key), partition), partition, offset, item: self.n }
            })
            .collect()
    }
}

/// One thread: push a batch, pop and complete until it is drained.
fn single_thread<D: Dispatch<u64>>(iters: u64) -> Duration {
    let d = D::new(Config { ordering: Ordering::Key, capacity: 1 << 20, max_in_flight: 1 << 20, seed: None })
        .unwrap();
    let mut feed = Feed::new();
    let start = Instant::now();
    for _ in 0..iters {
        let batch = feed.batch(&d, BATCH);
        d.push_many(batch).unwrap();
        loop {
            let popped = d.pop_ready(BATCH);
            if popped.tickets.is_empty() {
                break;
            }
            let receipts = popped.tickets.into_iter().map(|t| t.receipt).collect();
            black_box(d.complete_many(receipts).unwrap());
        }
    }
    black_box(d.committable());
    start.elapsed()
}

/// Two threads: one pushes batches as capacity allows, the other pops and
/// completes; timed until `iters` batches went through.
fn two_threads<D: Dispatch<u64> + 'static>(iters: u64) -> Duration {
    let d: Arc<D> = Arc::new(
        D::new(Config {
            ordering: Ordering::Key,
            capacity: 16 * BATCH,
            max_in_flight: 4 * BATCH,
            seed: None,
        })
        .unwrap(),
    );
    let total = iters as usize * BATCH;
    let fed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let feeder = {
        let d = Arc::clone(&d);
        let fed = Arc::clone(&fed);
        std::thread::spawn(move || {
            let mut feed = Feed::new();
            let mut sent = 0;
            while sent < total {
                // The only feeder: free room can only grow until we push, so
                // a batch sized to it is accepted whole.
                let room = d.free_capacity().min(BATCH).min(total - sent);
                if room == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                let acc = d.push_many(feed.batch(&*d, room)).unwrap();
                assert_eq!(acc.count, room);
                sent += room;
            }
            fed.store(true, A::Release);
        })
    };
    let mut done = 0;
    while done < total {
        let popped = d.pop_ready(BATCH);
        if popped.tickets.is_empty() {
            std::hint::spin_loop();
            continue;
        }
        let receipts: Vec<_> = popped.tickets.into_iter().map(|t| t.receipt).collect();
        done += receipts.len();
        d.complete_many(receipts).unwrap();
    }
    feeder.join().unwrap();
    assert!(fed.load(A::Acquire));
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch-10k-keys");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (threads, f) in [
        (
            "1-thread",
            [
                single_thread::<Dispatcher<u64>> as fn(u64) -> Duration,
                single_thread::<sharded::Dispatcher<u64>>,
            ],
        ),
        ("2-threads", [two_threads::<Dispatcher<u64>>, two_threads::<sharded::Dispatcher<u64>>]),
    ] {
        for (name, run) in ["lock-free (shipped)", "sharded mutexes (before)"].into_iter().zip(f) {
            g.bench_function(BenchmarkId::new(threads, name), |b| b.iter_custom(run));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
