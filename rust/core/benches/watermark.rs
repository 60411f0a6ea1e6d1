//! The commit watermark of the sharded design (a segmented bitmap behind a
//! mutex, `compare/offset_window.rs`), against
//! a lock-free alternative (a crossbeam skip list of outstanding offsets),
//! on one thread and with two threads completing concurrently.
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering as A};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_skiplist::SkipSet;
#[path = "compare/offset_window.rs"]
#[allow(dead_code)]
mod offset_window;

use offset_window::OffsetWindow;
use parking_lot::Mutex;

const WINDOW: i64 = 1024;

trait Watermark: Send + Sync {
    fn push(&self, o: i64);
    fn complete(&self, o: i64);
    fn committable(&self) -> Option<i64>;
}

struct Locked(Mutex<OffsetWindow>);

impl Watermark for Locked {
    fn push(&self, o: i64) {
        self.0.lock().push(o).unwrap();
    }
    fn complete(&self, o: i64) {
        assert!(self.0.lock().complete(o));
    }
    fn committable(&self) -> Option<i64> {
        self.0.lock().committable()
    }
}

struct SkipList {
    outstanding: SkipSet<i64>,
    last: AtomicI64,
}

impl Watermark for SkipList {
    fn push(&self, o: i64) {
        self.outstanding.insert(o);
        self.last.store(o, A::Release);
    }
    fn complete(&self, o: i64) {
        assert!(self.outstanding.remove(&o).is_some());
    }
    fn committable(&self) -> Option<i64> {
        match self.outstanding.front() {
            Some(e) => Some(*e.value()),
            None => Some(self.last.load(A::Acquire) + 1),
        }
    }
}

/// Pushes offsets in order and completes them out of order (odd, then even)
/// in windows of `WINDOW`, reading the watermark after each window.
fn run(w: &dyn Watermark, start: i64, windows: u64) {
    for k in 0..windows as i64 {
        let base = start + k * WINDOW;
        for o in base..base + WINDOW {
            w.push(o);
        }
        for o in
            (base..base + WINDOW).filter(|o| o % 2 == 1).chain((base..base + WINDOW).filter(|o| o % 2 == 0))
        {
            w.complete(o);
        }
        black_box(w.committable());
    }
}

/// One thread pushes, two complete (odd and even offsets), per window.
fn run_two(w: Arc<dyn Watermark>, windows: u64) -> Duration {
    let start = Instant::now();
    for k in 0..windows as i64 {
        let base = k * WINDOW;
        for o in base..base + WINDOW {
            w.push(o);
        }
        let w2 = Arc::clone(&w);
        let t = std::thread::spawn(move || {
            for o in (base..base + WINDOW).filter(|o| o % 2 == 1) {
                w2.complete(o);
            }
        });
        for o in (base..base + WINDOW).filter(|o| o % 2 == 0) {
            w.complete(o);
        }
        t.join().unwrap();
        black_box(w.committable());
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("watermark");
    g.throughput(Throughput::Elements(WINDOW as u64));
    g.bench_function(BenchmarkId::new("1-thread", "mutex-bitmap (shipped)"), |b| {
        b.iter_custom(|iters| {
            let w = Locked(Mutex::new(OffsetWindow::new()));
            let t = Instant::now();
            run(&w, 0, iters);
            t.elapsed()
        })
    });
    g.bench_function(BenchmarkId::new("1-thread", "lock-free-skiplist"), |b| {
        b.iter_custom(|iters| {
            let w = SkipList { outstanding: SkipSet::new(), last: AtomicI64::new(-1) };
            let t = Instant::now();
            run(&w, 0, iters);
            t.elapsed()
        })
    });
    // Spawning a thread per window dominates at small sizes; the same
    // overhead is in both, and the comparison is what matters.
    g.bench_function(BenchmarkId::new("2-threads", "mutex-bitmap (shipped)"), |b| {
        b.iter_custom(|iters| run_two(Arc::new(Locked(Mutex::new(OffsetWindow::new()))), iters))
    });
    g.bench_function(BenchmarkId::new("2-threads", "lock-free-skiplist"), |b| {
        b.iter_custom(|iters| {
            run_two(Arc::new(SkipList { outstanding: SkipSet::new(), last: AtomicI64::new(-1) }), iters)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
