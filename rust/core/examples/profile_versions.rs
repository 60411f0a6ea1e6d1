//! Times `check_and_set_many` pass by pass, without Python: 100,000 keys,
//! 1,000 per transaction, insert / redelivery / update, in key order and in
//! a fixed random order, fsync off. For profiling (`perf record`):
//! `cargo run --release -p keylane-core --example profile_versions [journal_entries]`.

use std::time::Instant;

use keylane_core::versions::{Options, VersionTable};

fn main() {
    let journal_entries =
        std::env::args().nth(1).map_or(Options::default().journal_entries, |a| a.parse().unwrap());
    let keys: Vec<Vec<u8>> = (0..100_000).map(|i| format!("entity-{i:08}").into_bytes()).collect();
    let key_order: Vec<usize> = (0..keys.len()).collect();
    let mut random_order = key_order.clone();
    random_order.sort_by_key(|&i| (i as u64 * 2_654_435_761) % (1 << 32));
    for (name, order) in [("key order", &key_order), ("random order", &random_order)] {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { durable: false, journal_entries, ..Options::default() };
        let table = VersionTable::open(dir.path(), options).unwrap();
        let all = Instant::now();
        for version in [1, 1, 2] {
            let start = Instant::now();
            for chunk in order.chunks(1_000) {
                let batch: Vec<(&[u8], u64)> = chunk.iter().map(|&i| (keys[i].as_slice(), version)).collect();
                table.check_and_set_many(&batch).unwrap();
            }
            let rate = order.len() as f64 / start.elapsed().as_secs_f64() / 1e6;
            println!("{name:>12}  version {version}: {rate:.2} M ops/s");
        }
        let start = Instant::now();
        table.checkpoint().unwrap();
        println!("{name:>12}  checkpoint: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
        let rate = 3.0 * order.len() as f64 / all.elapsed().as_secs_f64() / 1e6;
        println!("{name:>12}  all passes and the checkpoint: {rate:.2} M ops/s");
    }
}
