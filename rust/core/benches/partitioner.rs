//! murmur2 throughput on keys shaped like real ones (16 and 100 bytes).
use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keylane_core::partitioner::{murmur2, partition_for_key};

fn keys(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut k = format!("key-{i:012}").into_bytes();
            k.resize(len, b'x');
            k
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("murmur2");
    let parts = NonZeroU32::new(12).unwrap();
    for len in [16usize, 100] {
        let ks = keys(10_000, len);
        group.throughput(Throughput::Elements(ks.len() as u64));
        group.bench_with_input(BenchmarkId::new("hash", len), &ks, |b, ks| {
            b.iter(|| ks.iter().fold(0i32, |acc, k| acc ^ murmur2(black_box(k))))
        });
        group.bench_with_input(BenchmarkId::new("partition", len), &ks, |b, ks| {
            b.iter(|| ks.iter().fold(0u32, |acc, k| acc ^ partition_for_key(black_box(k), parts)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
