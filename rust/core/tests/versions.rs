//! The version table against a model, plus its failure modes.

use std::collections::HashMap;

use keylane_core::Error;
use keylane_core::versions::{FORMAT, MAX_VERSION, Options, VersionTable};

fn open(dir: &tempfile::TempDir) -> VersionTable {
    VersionTable::open(dir.path(), Options { map_size: 64 << 20, durable: false, ..Options::default() })
        .unwrap()
}

#[test]
fn check_and_set_keeps_the_highest_version() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    assert!(t.check_and_set(b"acct", 5).unwrap());
    assert!(t.check_and_set(b"acct", 6).unwrap());
    // The [5, 6, 5] redelivery: the replayed 5 is stale.
    assert!(!t.check_and_set(b"acct", 5).unwrap());
    assert!(!t.check_and_set(b"acct", 6).unwrap());
    assert_eq!(t.get(b"acct").unwrap(), Some(6));
    assert_eq!(t.get(b"other").unwrap(), None);
    assert!(t.check_and_set(b"zero", 0).unwrap(), "0 is newer than nothing");
    assert_eq!(t.len().unwrap(), 2);
}

#[test]
fn batches_judge_repeats_against_their_own_earlier_entries() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    t.check_and_set(b"b", 10).unwrap();
    let pairs: Vec<(&[u8], u64)> = vec![(b"b", 3), (b"a", 1), (b"a", 1), (b"a", 4), (b"b", 11), (b"a", 2)];
    assert_eq!(t.check_and_set_many(&pairs).unwrap(), vec![false, true, false, true, true, false]);
    assert_eq!(t.get_many(&[b"a", b"b", b"c"]).unwrap(), vec![Some(4), Some(11), None]);
}

/// Random batches against a `HashMap`, for one set of options; the table is
/// reopened (its journal replayed) and checkpointed along the way.
fn match_a_hashmap(journal_entries: usize, cache_keys: usize) {
    let dir = tempfile::tempdir().unwrap();
    let options =
        Options { map_size: 64 << 20, durable: false, journal_entries, cache_keys, ..Options::default() };
    let mut t = VersionTable::open(dir.path(), options).unwrap();
    let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..300 {
        let batch: Vec<(Vec<u8>, u64)> =
            (0..(next() % 50)).map(|_| (format!("k{}", next() % 60).into_bytes(), next() % 100)).collect();
        let pairs: Vec<(&[u8], u64)> = batch.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
        // Every third batch as the runtime writes it: folded at once, so
        // that reads skip the index until the next journaled batch.
        let got = if next() % 3 == 0 {
            t.check_and_set_many_folded(&pairs).unwrap()
        } else {
            t.check_and_set_many(&pairs).unwrap()
        };
        for ((k, v), g) in batch.iter().zip(got) {
            let newer = model.get(k).is_none_or(|old| v > old);
            if newer {
                model.insert(k.clone(), *v);
            }
            assert_eq!(g, newer, "round {round}, key {k:?}");
        }
        match round % 100 {
            40 => {
                drop(t);
                t = VersionTable::open(dir.path(), options).unwrap();
            }
            70 => t.checkpoint().unwrap(),
            _ => {}
        }
        let probe: Vec<Vec<u8>> = (0..5).map(|_| format!("k{}", next() % 70).into_bytes()).collect();
        let probe: Vec<&[u8]> = probe.iter().map(|k| k.as_slice()).collect();
        let want: Vec<Option<u64>> = probe.iter().map(|k| model.get(*k).copied()).collect();
        assert_eq!(t.get_many(&probe).unwrap(), want, "round {round}");
        assert_eq!(t.len().unwrap(), model.len() as u64);
    }
    let snap = t.snapshot().unwrap();
    let all = snap.page(None, usize::MAX).unwrap();
    let mut want: Vec<(Vec<u8>, u64)> = model.into_iter().collect();
    want.sort();
    assert_eq!(all, want);
}

#[test]
fn random_batches_match_a_hashmap() {
    match_a_hashmap(Options::default().journal_entries, Options::default().cache_keys);
}

#[test]
fn random_batches_match_a_hashmap_with_frequent_folds_and_a_small_cache() {
    for (journal_entries, cache_keys) in [(1, 0), (7, 5), (50, 20), (200, 1000)] {
        match_a_hashmap(journal_entries, cache_keys);
    }
}

#[test]
fn folded_batches_leave_the_journal_empty() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    t.check_and_set_many(&[(b"a", 1), (b"b", 1)]).unwrap();
    assert_eq!(t.info().unwrap().journal_records, 1);
    assert_eq!(t.check_and_set_many_folded(&[(b"a", 2), (b"a", 1), (b"c", 5)]).unwrap(), [true, false, true]);
    let info = t.info().unwrap();
    assert_eq!((info.journal_records, info.versions), (0, 3));
    assert_eq!(t.get_many(&[b"a", b"b", b"c", b"d"]).unwrap(), [Some(2), Some(1), Some(5), None]);
    // Nothing newer: no write, and the journal stays as it is.
    assert_eq!(t.check_and_set_many_folded(&[(b"a", 2)]).unwrap(), [false]);
    assert_eq!(t.info().unwrap().journal_records, 0);
}

#[test]
fn the_journal_is_replayed_on_open_and_folded_by_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<Vec<u8>> = (0..3000).map(|i| format!("key-{i:05}").into_bytes()).collect();
    {
        let t = open(&dir);
        for version in [1, 2] {
            for chunk in keys.chunks(500) {
                let pairs: Vec<(&[u8], u64)> = chunk.iter().map(|k| (k.as_slice(), version)).collect();
                t.check_and_set_many(&pairs).unwrap();
            }
        }
        assert!(t.has_written());
        assert_eq!(t.info().unwrap().journal_records, 12, "nothing folded yet");
    }
    let t = open(&dir);
    assert!(!t.has_written());
    assert_eq!(t.len().unwrap(), 3000);
    assert_eq!(t.get(&keys[1234]).unwrap(), Some(2), "from the journal");
    assert!(!t.check_and_set(&keys[0], 2).unwrap());
    t.checkpoint().unwrap();
    let info = t.info().unwrap();
    assert_eq!((info.journal_records, info.versions), (0, 3000));
    assert_eq!(t.get(&keys[2999]).unwrap(), Some(2), "from the B-tree");
    assert!(t.check_and_set(&keys[0], 3).unwrap());
    t.checkpoint().unwrap();
    t.checkpoint().unwrap();
    assert_eq!(t.get(&keys[0]).unwrap(), Some(3));
}

#[test]
fn a_full_journal_folds_in_the_commit_that_fills_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = VersionTable::open(
        dir.path(),
        Options { map_size: 64 << 20, durable: false, journal_entries: 100, ..Options::default() },
    )
    .unwrap();
    let keys: Vec<Vec<u8>> = (0..1000).map(|i| format!("k{i:04}").into_bytes()).collect();
    for chunk in keys.chunks(30) {
        let pairs: Vec<(&[u8], u64)> = chunk.iter().map(|k| (k.as_slice(), 1)).collect();
        t.check_and_set_many(&pairs).unwrap();
        assert!(t.info().unwrap().journal_records < 4, "a fold every fourth batch");
    }
    // One hot key: repeated updates count toward the fold, not only new keys.
    for version in 2..500 {
        assert!(t.check_and_set(b"hot", version).unwrap());
        assert!(t.info().unwrap().journal_records <= 100);
    }
    assert_eq!(t.len().unwrap(), 1001);
}

#[test]
fn folds_insert_update_and_append_whatever_the_density() {
    // A tree of even keys; then a journal of odd keys (inserted between),
    // even keys (overwritten) and keys past the end (appended), few or many
    // of them against the tree (the fold walks the tree or positions on
    // each key), folded and checked against a model.
    for (every, past_end) in [(1, 50), (3, 0), (97, 3), (401, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&dir);
        let key = |i: u64| format!("k{i:05}").into_bytes();
        let mut model = std::collections::BTreeMap::new();
        let evens: Vec<Vec<u8>> = (0..2000).step_by(2).map(key).collect();
        let pairs: Vec<(&[u8], u64)> = evens.iter().map(|k| (k.as_slice(), 1)).collect();
        t.check_and_set_many(&pairs).unwrap();
        t.checkpoint().unwrap();
        for k in &evens {
            model.insert(k.clone(), 1);
        }
        let journal: Vec<(Vec<u8>, u64)> = (0..2000)
            .step_by(every)
            .map(|i| (key(i), 2 + i % 3))
            .chain((2000..2000 + past_end).map(|i| (key(i), 7)))
            .collect();
        // In no particular order.
        let mut shuffled = journal.clone();
        shuffled.reverse();
        let third = shuffled.len() / 3;
        shuffled.rotate_left(third);
        let pairs: Vec<(&[u8], u64)> = shuffled.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
        assert!(t.check_and_set_many(&pairs).unwrap().iter().all(|&b| b));
        for (k, v) in journal {
            model.insert(k, v);
        }
        t.checkpoint().unwrap();
        assert_eq!(t.info().unwrap().journal_records, 0);
        drop(t);
        let t = open(&dir);
        let all = t.snapshot().unwrap().page(None, usize::MAX).unwrap();
        let want: Vec<(Vec<u8>, u64)> = model.into_iter().collect();
        assert_eq!(all, want, "every {every}, {past_end} past the end");
        assert_eq!(t.len().unwrap(), want.len() as u64);
    }
}

#[test]
fn format_1_tables_are_upgraded_in_place() {
    use heed::types::{Bytes, Str, U64};
    let dir = tempfile::tempdir().unwrap();
    {
        // A format 1 table: meta and versions, no journal.
        #[allow(unsafe_code)]
        let env = unsafe { heed::EnvOpenOptions::new().max_dbs(8).open(dir.path()) }.unwrap();
        let mut w = env.write_txn().unwrap();
        let meta: heed::Database<Str, Bytes> = env.create_database(&mut w, Some("meta")).unwrap();
        #[derive(serde::Serialize)]
        struct Meta {
            format: u32,
            created_by: &'static str,
        }
        let record = rmp_serde::to_vec_named(&Meta { format: 1, created_by: "keylane 0.0.1" }).unwrap();
        meta.put(&mut w, "keylane", &record).unwrap();
        let versions: heed::Database<Bytes, U64<heed::byteorder::BigEndian>> =
            env.create_database(&mut w, Some("versions")).unwrap();
        versions.put(&mut w, b"a", &3).unwrap();
        versions.put(&mut w, b"b", &4).unwrap();
        w.commit().unwrap();
        env.prepare_for_closing().wait();
    }
    let t = open(&dir);
    let info = t.info().unwrap();
    assert_eq!((info.format, info.versions, info.created_by.as_str()), (FORMAT, 2, "keylane 0.0.1"));
    assert_eq!(t.get_many(&[b"a", b"b", b"c"]).unwrap(), vec![Some(3), Some(4), None]);
    assert!(!t.check_and_set(b"a", 3).unwrap());
    assert!(t.check_and_set(b"c", 1).unwrap());
    assert_eq!(t.len().unwrap(), 3);
}

#[test]
fn a_damaged_journal_record_is_a_format_error() {
    use heed::types::{Bytes, U64};
    let dir = tempfile::tempdir().unwrap();
    {
        let t = open(&dir);
        t.check_and_set(b"k", 1).unwrap();
    }
    {
        #[allow(unsafe_code)]
        let env = unsafe { heed::EnvOpenOptions::new().max_dbs(8).open(dir.path()) }.unwrap();
        let mut w = env.write_txn().unwrap();
        let journal: heed::Database<U64<heed::byteorder::BigEndian>, Bytes> =
            env.open_database(&w, Some("journal")).unwrap().unwrap();
        journal.put(&mut w, &1, b"\xc1 not msgpack").unwrap();
        w.commit().unwrap();
        env.prepare_for_closing().wait();
    }
    let t = open(&dir);
    let err = t.get(b"k").unwrap_err();
    assert!(matches!(err, Error::StoreFormat(ref m) if m.contains("journal")), "{err}");
    assert!(matches!(t.check_and_set(b"k", 2), Err(Error::StoreFormat(_))));
}

#[test]
fn last_write_wins_register() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    assert!(t.put_if_newer(b"balance", 2, b"100").unwrap());
    assert!(!t.put_if_newer(b"balance", 1, b"50").unwrap());
    assert!(!t.put_if_newer(b"balance", 2, b"other").unwrap());
    assert!(t.put_if_newer(b"balance", 3, b"").unwrap());
    assert_eq!(t.get_value(b"balance").unwrap(), Some((3, vec![])));
    assert_eq!(t.get_value(b"missing").unwrap(), None);
    // The register's version is independent of check_and_set's.
    assert_eq!(t.get(b"balance").unwrap(), None);
}

#[test]
fn seen_ids_within_their_window() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let hour = 3_600_000;
    assert!(!t.is_seen(b"m1", 1_000).unwrap());
    assert!(t.mark_seen(b"m1", Some(hour), 1_000).unwrap());
    assert!(t.is_seen(b"m1", 1_000 + hour - 1).unwrap());
    assert!(!t.is_seen(b"m1", 1_000 + hour).unwrap(), "window over");
    assert!(!t.mark_seen(b"m1", Some(hour), 2_000).unwrap());
    assert!(!t.mark_seen(b"m1", Some(hour), 1_000 + hour - 1).unwrap());
    assert!(t.mark_seen(b"m1", Some(hour), 1_000 + hour).unwrap(), "window over");
    assert!(t.mark_seen(b"forever", None, 0).unwrap());
    assert!(!t.mark_seen(b"forever", None, u64::MAX - 10).unwrap());
    assert_eq!(
        t.mark_seen_many(&[b"x", b"y", b"x", b"m1"], Some(10), 5_000).unwrap(),
        vec![true, true, false, false]
    );
}

#[test]
fn purge_forgets_only_expired_ids() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    for i in 0..10_000u64 {
        t.mark_seen(format!("id{i}").as_bytes(), Some(1_000 + i), 0).unwrap();
    }
    t.mark_seen(b"forever", None, 0).unwrap();
    // Re-marking after expiry moves the id's expiry: the old index entry
    // must not purge the new window.
    assert!(t.mark_seen(b"id0", Some(1_000_000), 5_000).unwrap());
    assert_eq!(t.purge_expired(5_999).unwrap(), 4_999, "ids 1..=4999 expire at or before 5999");
    assert!(!t.mark_seen(b"id0", Some(1), 6_000).unwrap(), "id0 was re-marked, still in its window");
    assert!(!t.mark_seen(b"id9999", Some(1), 6_000).unwrap());
    assert!(t.mark_seen(b"id1", Some(1), 6_000).unwrap(), "purged, so new again");
    // Left: id0, ids 5000..=9999, and id1 marked again: 5,002 with expiries.
    assert_eq!(t.purge_expired(u64::MAX - 2).unwrap(), 5_002);
    assert!(!t.mark_seen(b"forever", None, u64::MAX - 1).unwrap());
    assert_eq!(t.info().unwrap().seen, 1);
}

#[test]
fn bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    assert!(matches!(t.check_and_set(b"", 1), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.check_and_set(&[b'x'; 512], 1), Err(Error::InvalidArgument(_))));
    assert!(t.check_and_set(&[b'x'; 511], 1).unwrap());
    assert!(matches!(t.check_and_set(b"k", MAX_VERSION + 1), Err(Error::InvalidArgument(_))));
    assert!(t.check_and_set(b"k", MAX_VERSION).unwrap());
    assert!(matches!(t.mark_seen(&[b'x'; 504], None, 0), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.mark_seen(b"m", Some(0), 0), Err(Error::InvalidArgument(_))));
    // A bad entry anywhere in a batch: nothing of it is applied.
    assert!(t.check_and_set_many(&[(b"fresh", 1), (b"", 2)]).is_err());
    assert_eq!(t.get(b"fresh").unwrap(), None);
}

#[test]
fn a_full_map_rolls_the_batch_back() {
    let dir = tempfile::tempdir().unwrap();
    let t =
        VersionTable::open(dir.path(), Options { map_size: 1 << 20, durable: false, ..Options::default() })
            .unwrap();
    let keys: Vec<Vec<u8>> =
        (0..100_000).map(|i| format!("key-{i:08}-padding-padding").into_bytes()).collect();
    let mut applied = 0;
    let err = loop {
        let chunk: Vec<(&[u8], u64)> =
            keys[applied..applied + 1000].iter().map(|k| (k.as_slice(), 1)).collect();
        match t.check_and_set_many(&chunk) {
            Ok(_) => applied += 1000,
            Err(e) => break e,
        }
    };
    assert_eq!(err, Error::StoreFull { map_size: 1 << 20 });
    assert!(err.to_string().contains("map_size=2097152"), "{err}");
    // The failed batch left nothing behind, the earlier ones everything.
    assert_eq!(t.len().unwrap(), applied as u64);
    assert_eq!(t.get(&keys[applied]).unwrap(), None);
    drop(t);
    // Reopened with a larger map, it goes on.
    let t =
        VersionTable::open(dir.path(), Options { map_size: 8 << 20, durable: false, ..Options::default() })
            .unwrap();
    let chunk: Vec<(&[u8], u64)> = keys[applied..applied + 1000].iter().map(|k| (k.as_slice(), 1)).collect();
    assert!(t.check_and_set_many(&chunk).unwrap().iter().all(|&b| b));
}

#[test]
fn reopening_keeps_everything_and_checks_the_format() {
    let dir = tempfile::tempdir().unwrap();
    {
        let t = VersionTable::open(dir.path(), Options::default()).unwrap();
        t.check_and_set(b"k", 7).unwrap();
        t.put_if_newer(b"k", 1, b"v").unwrap();
    }
    let t = VersionTable::open(dir.path(), Options::default()).unwrap();
    assert_eq!(t.get(b"k").unwrap(), Some(7));
    let info = t.info().unwrap();
    assert_eq!((info.format, info.versions, info.values, info.durable), (FORMAT, 1, 1, true));
    assert!(info.created_by.starts_with("keylane "));
}

#[test]
fn refuses_what_is_not_a_keylane_table() {
    let dir = tempfile::tempdir().unwrap();
    // A file, not a directory.
    let file = dir.path().join("file");
    std::fs::write(&file, b"hello").unwrap();
    let err = VersionTable::open(&file, Options::default()).unwrap_err();
    assert!(matches!(err, Error::StoreFormat(ref m) if m.contains("is a file")), "{err}");
    // A directory whose data.mdb is not LMDB.
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("data.mdb"), vec![0x42u8; 64 * 1024]).unwrap();
    let err = VersionTable::open(&junk, Options::default()).unwrap_err();
    assert!(matches!(err, Error::StoreFormat(ref m) if m.contains("not an LMDB")), "{err}");
    // An LMDB environment with someone else's data in it.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    {
        #[allow(unsafe_code)]
        let env = unsafe { heed::EnvOpenOptions::new().max_dbs(4).open(&other) }.unwrap();
        let mut w = env.write_txn().unwrap();
        let db: heed::Database<heed::types::Str, heed::types::Str> =
            env.create_database(&mut w, Some("theirs")).unwrap();
        db.put(&mut w, "a", "b").unwrap();
        w.commit().unwrap();
        env.prepare_for_closing().wait();
    }
    let err = VersionTable::open(&other, Options::default()).unwrap_err();
    assert!(matches!(err, Error::StoreFormat(ref m) if m.contains("not a keylane table")), "{err}");
    // Inspection never creates a table.
    let empty = dir.path().join("empty");
    let err = VersionTable::open(&empty, Options { create: false, ..Options::default() }).unwrap_err();
    assert!(matches!(err, Error::StoreFormat(ref m) if m.contains("no keylane version table")), "{err}");
    assert!(!empty.exists());
}

#[test]
fn snapshots_do_not_see_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    for i in 0..2500u64 {
        t.check_and_set(format!("k{i:05}").as_bytes(), 1).unwrap();
    }
    let snap = t.snapshot().unwrap();
    t.check_and_set(b"k00000", 2).unwrap();
    t.check_and_set(b"zzz", 1).unwrap();
    let mut seen = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = snap.page(after.as_deref(), 1000).unwrap();
        if page.is_empty() {
            break;
        }
        for (k, v) in &page {
            assert_eq!(*v, 1, "{k:?}");
        }
        seen += page.len();
        after = Some(page.last().unwrap().0.clone());
    }
    assert_eq!(seen, 2500);
}

#[test]
fn known_versions_stay_lower_bounds_across_writers() {
    // Two handles on one table (as two processes would have): what one
    // remembers must never make it answer wrongly after the other writes.
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir);
    let b =
        VersionTable::open(dir.path(), Options { map_size: 64 << 20, durable: false, ..Options::default() })
            .unwrap();
    assert!(a.check_and_set(b"k", 5).unwrap());
    assert!(!a.check_and_set(b"k", 5).unwrap(), "settled from memory");
    assert!(b.check_and_set(b"k", 9).unwrap());
    assert!(!a.check_and_set(b"k", 7).unwrap(), "a remembers 5, but LMDB says 9");
    assert!(!a.check_and_set(b"k", 8).unwrap(), "and now a remembers 9");
    assert!(a.check_and_set(b"k", 10).unwrap());
    // A batch of only stale versions needs no transaction, and still answers.
    assert_eq!(a.check_and_set_many(&[(b"k", 1), (b"k", 10)]).unwrap(), vec![false, false]);
}

#[test]
fn known_versions_are_bounded_and_optional() {
    let dir = tempfile::tempdir().unwrap();
    let t = VersionTable::open(
        dir.path(),
        Options { map_size: 64 << 20, durable: false, cache_keys: 100, ..Options::default() },
    )
    .unwrap();
    for i in 0..1000u64 {
        assert!(t.check_and_set(format!("k{i}").as_bytes(), 1).unwrap());
    }
    for i in 0..1000u64 {
        assert!(!t.check_and_set(format!("k{i}").as_bytes(), 1).unwrap());
    }
    let dir2 = tempfile::tempdir().unwrap();
    let off = VersionTable::open(
        dir2.path(),
        Options { map_size: 64 << 20, durable: false, cache_keys: 0, ..Options::default() },
    )
    .unwrap();
    assert!(off.check_and_set(b"k", 1).unwrap());
    assert!(!off.check_and_set(b"k", 1).unwrap());
}
