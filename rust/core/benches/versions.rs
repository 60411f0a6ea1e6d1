//! `check_and_set_many` on the core, no Python: batches of 1,000 raised
//! versions over 100,000 keys in key order and in a fixed random order, fsync
//! off, in steady state (every iteration raises versions, so the journal
//! fills and folds at its default size, and folds are part of the figure).
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keylane_core::versions::{Options, VersionTable};

const KEYS: usize = 100_000;
const BATCH: usize = 1_000;

fn check_and_set_many(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("entity-{i:08}").into_bytes()).collect();
    let key_order: Vec<usize> = (0..KEYS).collect();
    let mut random_order = key_order.clone();
    random_order.sort_by_key(|&i| (i as u64 * 2_654_435_761) % (1 << 32));
    let mut group = c.benchmark_group("versions");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, order) in [("key order", &key_order), ("random order", &random_order)] {
        let dir = tempfile::tempdir().unwrap();
        let table = VersionTable::open(dir.path(), Options { durable: false, ..Options::default() }).unwrap();
        let (mut chunk, mut version) = (0, 1);
        group.bench_function(format!("check_and_set_many 1,000 raised, {name}"), |b| {
            b.iter(|| {
                let batch: Vec<(&[u8], u64)> =
                    order[chunk * BATCH..][..BATCH].iter().map(|&i| (keys[i].as_slice(), version)).collect();
                chunk += 1;
                if chunk * BATCH == KEYS {
                    (chunk, version) = (0, version + 1);
                }
                black_box(table.check_and_set_many(&batch).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, check_and_set_many);
criterion_main!(benches);
