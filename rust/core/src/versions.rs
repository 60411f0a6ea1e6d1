//! The version table and idempotency store, on LMDB (crate `heed`).
//!
//! One LMDB environment (a directory) holds six named databases:
//!
//! | name | key | value |
//! |---|---|---|
//! | `meta` | `"keylane"` | msgpack `{format, created_by}` |
//! | `meta` | `"journal.folded"`, `"versions.count"` | `u64` big-endian |
//! | `versions` | entity key | highest applied version, `u64` big-endian |
//! | `journal` | record number, `u64` BE | msgpack `[[key, version], ...]` |
//! | `values` | entity key | version (`u64` BE) followed by the value bytes |
//! | `seen` | message id | expiry, ms since the Unix epoch, `u64` BE (`u64::MAX`: never) |
//! | `expiry` | expiry (`u64` BE) followed by the id | empty (an index for purging) |
//!
//! Big-endian integers sort numerically, so the expiry index is ordered by
//! time and a purge reads only what has expired. Every call is one LMDB
//! transaction: a batch is applied entirely or not at all.
//!
//! A version is the newer of its entry in `versions` and its last entry in
//! the `journal` records numbered from `journal.folded` on. A
//! `check_and_set_many` commit appends one record instead of updating the
//! B-tree key by key: with keys in no order, in-place updates copy and write
//! back one 4 KiB page per key, which is what bounds a B-tree version map.
//! When the journal holds `journal_entries` keys, the commit that crossed the
//! line also folds it into `versions` in key order and empties it. Every
//! process keeps the journal's versions in memory ([`index::Index`]), reads
//! the records it has not seen at the start of each transaction, and so
//! answers from memory what an in-place map would read from LMDB.

mod data_file;
mod fold;
mod index;
mod journal;
mod open;
mod registers;
mod seen;
mod snapshot;

pub use self::snapshot::Snapshot;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64, Unit};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, MdbError, PutFlags, RoTxn, RwTxn, WithoutTls};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use self::index::{Index, Judged, Known};
use crate::{Error, Result};

/// The on-disk format this code reads and writes.
pub const FORMAT: u32 = 2;
/// Format 1 had no journal; it is upgraded in place on open.
const FORMAT_NO_JOURNAL: u32 = 1;
const FOLDED: &str = "journal.folded";
const COUNT: &str = "versions.count";
/// Journal records are numbered from 1, so that a new index (at 0) starts
/// over, loading the table, in its first transaction.
const FIRST_RECORD: u64 = 1;
/// Versions are non-negative and fit a signed 64-bit integer.
pub const MAX_VERSION: u64 = i64::MAX as u64;
/// A seen-id expiring "never".
const FOREVER: u64 = u64::MAX;
/// LMDB's key size limit (511 bytes by default); ids also carry an 8-byte
/// expiry prefix in the index.
/// The longest key the table holds (LMDB's key limit).
pub const MAX_KEY: usize = 511;
/// The longest message id (an id's entry also carries its expiry).
pub const MAX_ID: usize = MAX_KEY - 8;

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    created_by: String,
}

/// How to open a table.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Size of the memory map, the most the table can hold. LMDB reserves
    /// address space, not disk: the file grows as data is written.
    pub map_size: usize,
    /// `true`: every commit is flushed to disk before the call returns.
    /// `false`: commits reach the OS page cache only (LMDB's `MDB_NOSYNC`).
    pub durable: bool,
    /// Create the table if `path` holds none. With `false`, a missing table
    /// is an error and nothing is written (for inspection).
    pub create: bool,
    /// How many folded keys' versions to cache in memory (0: none), on top
    /// of the journal's. See [`index::Index`].
    pub cache_keys: usize,
    /// Fold the journal into the B-tree once it holds this many entries
    /// (version changes; at least 1). Bigger: fewer, longer folds and more
    /// memory.
    pub journal_entries: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            map_size: 1 << 30,
            durable: true,
            create: true,
            cache_keys: 100_000,
            journal_entries: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Dbs {
    meta: Database<Str, Bytes>,
    journal: Database<U64<BigEndian>, Bytes>,
    versions: Database<Bytes, U64<BigEndian>>,
    values: Database<Bytes, Bytes>,
    seen: Database<Bytes, U64<BigEndian>>,
    expiry: Database<Bytes, Unit>,
}

/// Counts and sizes, for `keylane inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub path: PathBuf,
    pub format: u32,
    pub created_by: String,
    pub map_size: usize,
    pub used_bytes: u64,
    pub durable: bool,
    pub versions: u64,
    /// Journal records not yet folded into the B-tree.
    pub journal_records: u64,
    pub values: u64,
    pub seen: u64,
}

/// A durable map of entity key → highest applied version, a last-write-wins
/// register per key, and a store of message ids seen within a window.
#[derive(Debug)]
pub struct VersionTable {
    shared: Arc<Shared>,
}

/// One open environment, shared by every `VersionTable` on its path in this
/// process: LMDB must not open one environment twice in a process (heed
/// refuses to), and sharing also shares what is known.
#[derive(Debug)]
struct Shared {
    env: Env<WithoutTls>,
    dbs: Dbs,
    durable: bool,
    journal_entries: usize,
    /// What it was opened with: a second open in this process must agree.
    map_size: usize,
    cache_keys: usize,
    /// A journal record was written through this environment.
    wrote: AtomicBool,
    /// Held for the whole of every transaction that reads or changes the
    /// version map, so the index always matches the newest snapshot.
    index: Mutex<Index>,
}

fn check_key<'a>(what: &str, key: &'a [u8], max: usize) -> Result<&'a [u8]> {
    if key.is_empty() || key.len() > max {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to {max} bytes long, got {} bytes",
            key.len()
        )));
    }
    Ok(key)
}

fn check_version(version: u64) -> Result<u64> {
    if version > MAX_VERSION {
        return Err(Error::InvalidArgument(format!(
            "version must be between 0 and {MAX_VERSION}, got {version}"
        )));
    }
    Ok(version)
}

/// What can fail inside a transaction.
#[derive(Debug)]
enum Fault {
    Lmdb(heed::Error),
    /// Data keylane wrote cannot be read back.
    Damaged(String),
}

impl From<heed::Error> for Fault {
    fn from(e: heed::Error) -> Self {
        Fault::Lmdb(e)
    }
}

type Txn<T> = std::result::Result<T, Fault>;

fn meta_u64(meta: Database<Str, Bytes>, txn: &RoTxn, key: &str, default: u64) -> Txn<u64> {
    match meta.get(txn, key)? {
        None => Ok(default),
        Some(raw) => raw
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Fault::Damaged(format!("meta {key:?} is {} bytes, not 8", raw.len()))),
    }
}

impl VersionTable {
    fn err(&self, doing: &str, e: impl Into<Fault>) -> Error {
        let path = self.shared.env.path().display();
        match e.into() {
            Fault::Lmdb(heed::Error::Mdb(MdbError::MapFull)) => {
                Error::StoreFull { map_size: self.shared.env.info().map_size }
            }
            Fault::Lmdb(e) => Error::Store(format!("version table {path}: {doing} failed: {e}")),
            Fault::Damaged(e) => Error::StoreFormat(format!("version table {path}: {e}")),
        }
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    fn write<R>(&self, doing: &str, f: impl FnOnce(&mut RwTxn<'_>) -> Txn<R>) -> Result<R> {
        let mut wtxn = self.shared.env.write_txn().map_err(|e| self.err(doing, e))?;
        let out = f(&mut wtxn).map_err(|e| self.err(doing, e))?;
        wtxn.commit().map_err(|e| self.err(doing, e))?;
        Ok(out)
    }

    fn read<R>(&self, doing: &str, f: impl FnOnce(&RoTxn<'_, WithoutTls>) -> Txn<R>) -> Result<R> {
        let rtxn = self.shared.env.read_txn().map_err(|e| self.err(doing, e))?;
        f(&rtxn).map_err(|e| self.err(doing, e))
    }

    /// True iff `version` is greater than the stored version of `key` (or
    /// none is stored); it is then stored.
    pub fn check_and_set(&self, key: &[u8], version: u64) -> Result<bool> {
        Ok(self.check_and_set_many(&[(key, version)])?[0])
    }

    /// `check_and_set` for a batch, in one transaction. A key repeated in the
    /// batch is judged against the batch's own earlier entries.
    pub fn check_and_set_many(&self, pairs: &[(&[u8], u64)]) -> Result<Vec<bool>> {
        self.set_newer(pairs, false)
    }

    /// `check_and_set_many`, then the journal folded in the same
    /// transaction, so that it is left empty and `get_many` reads the
    /// B-tree without waiting for the next writer. For callers that write
    /// big batches anyway (the runtime's guard, one per flush), where the
    /// journal saves nothing.
    pub fn check_and_set_many_folded(&self, pairs: &[(&[u8], u64)]) -> Result<Vec<bool>> {
        self.set_newer(pairs, true)
    }

    fn set_newer(&self, pairs: &[(&[u8], u64)], fold: bool) -> Result<Vec<bool>> {
        for (key, version) in pairs {
            check_key("key", key, MAX_KEY)?;
            check_version(*version)?;
        }
        // A redelivery or a replay: stale for certain, no transaction needed.
        let stale = {
            let index = self.shared.index.lock();
            pairs.iter().all(|&(key, version)| index.surely_stale(key, version))
        };
        if stale {
            return Ok(vec![false; pairs.len()]);
        }
        self.write_indexed("check_and_set", |txn, index| self.apply(txn, index, pairs, fold))
    }

    /// A write transaction that also changes the index. The index is locked
    /// once the transaction has begun (so waiting for another process's
    /// writer does not hold up this process's readers) and until it has
    /// committed (so no reader sees what may yet roll back); if anything
    /// fails, the index starts over.
    fn write_indexed<R>(
        &self,
        doing: &str,
        f: impl FnOnce(&mut RwTxn<'_>, &mut Index) -> Txn<R>,
    ) -> Result<R> {
        let mut wtxn = self.shared.env.write_txn().map_err(|e| self.err(doing, e))?;
        let mut index = self.shared.index.lock();
        let out = f(&mut wtxn, &mut index).and_then(|out| Ok(wtxn.commit().map(|()| out)?));
        if out.is_err() {
            index.reset();
        }
        out.map_err(|e| self.err(doing, e))
    }

    /// The body of `check_and_set_many`: judges each pair against the index
    /// (reading `versions` for keys it does not hold), appends the newer
    /// ones as one journal record, and folds the journal if it is full (or
    /// `fold`).
    fn apply(
        &self,
        txn: &mut RwTxn<'_>,
        index: &mut Index,
        pairs: &[(&[u8], u64)],
        fold: bool,
    ) -> Txn<Vec<bool>> {
        let Dbs { meta, journal, .. } = self.shared.dbs;
        self.catch_up(txn, index)?;
        let seq = index.next;
        let mut out = Vec::with_capacity(pairs.len());
        let mut raised = Vec::new();
        let mut new_keys = 0;
        for (i, &(key, version)) in pairs.iter().enumerate() {
            let newer = match index.raise(key, version) {
                Judged::Stale => false,
                Judged::Raised { new_key } => {
                    new_keys += u64::from(new_key);
                    true
                }
                Judged::Unknown => {
                    let stored = self.stored(txn, index, key)?;
                    let newer = stored.is_none_or(|stored| version > stored);
                    if newer {
                        new_keys += u64::from(stored.is_none());
                        index.set(key, version, true);
                    }
                    newer
                }
            };
            if newer {
                raised.push(i);
            }
            out.push(newer);
        }
        if raised.is_empty() {
            return Ok(out);
        }
        let record = journal::encode(raised.iter().map(|&i| pairs[i]));
        journal.put_with_flags(txn, PutFlags::APPEND, &seq, &record)?;
        index.applied(seq, raised.len());
        self.shared.wrote.store(true, Ordering::Relaxed);
        if new_keys > 0 {
            let count = meta_u64(meta, txn, COUNT, 0)? + new_keys;
            meta.put(txn, COUNT, &count.to_be_bytes())?;
        }
        if fold || index.journal_entries() >= self.shared.journal_entries {
            self.fold(txn, index)?;
        }
        Ok(out)
    }

    /// Did this process append to the journal since the table was opened?
    pub fn has_written(&self) -> bool {
        self.shared.wrote.load(Ordering::Relaxed)
    }

    /// Folds the journal into the B-tree now (`close()` does, so that a
    /// reopened table has nothing to replay). A no-op when it is empty.
    pub fn checkpoint(&self) -> Result<()> {
        self.write_indexed("checkpoint", |txn, index| {
            self.catch_up(txn, index)?;
            if index.journal_entries() > 0 {
                self.fold(txn, index)?;
            }
            Ok(())
        })
    }

    /// The version of `key` as of the transaction (the index caught up).
    fn stored(&self, txn: &RoTxn, index: &mut Index, key: &[u8]) -> Txn<Option<u64>> {
        Ok(match index.lookup(key) {
            Known::Version(v) => Some(v),
            Known::Absent => None,
            Known::Unknown => {
                let v = self.shared.dbs.versions.get(txn, key)?;
                if let Some(v) = v {
                    index.set(key, v, false);
                }
                v
            }
        })
    }

    /// Brings the index up to the transaction's snapshot: adopts the fold
    /// point, loads the whole table if the index starts over and it fits,
    /// and applies the journal records it has not read.
    fn catch_up(&self, txn: &RoTxn, index: &mut Index) -> Txn<()> {
        let Dbs { meta, journal, versions, .. } = self.shared.dbs;
        index.sync_folded(meta_u64(meta, txn, FOLDED, FIRST_RECORD)?);
        if index.may_load() && index.can_load(meta_u64(meta, txn, COUNT, 0)?) {
            for entry in versions.iter(txn)? {
                let (key, version) = entry?;
                index.set(key, version, false);
            }
            index.loaded();
        }
        for record in journal.range(txn, &(index.next..))? {
            let (seq, record) = record?;
            let mut entries = 0;
            journal::decode(record, |key, version| {
                index.set(key, version, true);
                entries += 1;
            })
            .map_err(Fault::Damaged)?;
            index.applied(seq, entries);
        }
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<u64>> {
        Ok(self.get_many(&[key])?[0])
    }

    /// Stored versions of `keys`, read in one snapshot.
    pub fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<u64>>> {
        for key in keys {
            check_key("key", key, MAX_KEY)?;
        }
        if let Some(found) = self.read("get", |txn| self.get_folded(txn, keys))? {
            return Ok(found);
        }
        let mut index = self.shared.index.lock();
        self.read("get", |txn| {
            self.catch_up(txn, &mut index)?;
            keys.iter().map(|key| self.stored(txn, &mut index, key)).collect()
        })
    }

    /// The versions of `keys` if the snapshot's journal is empty: the
    /// B-tree alone then holds every version, and is read without the
    /// index, whose lock a writer holds through its whole commit (fold and
    /// fsync included). `None`: the journal has entries; ask the index.
    fn get_folded(&self, txn: &RoTxn, keys: &[&[u8]]) -> Txn<Option<Vec<Option<u64>>>> {
        let Dbs { journal, versions, .. } = self.shared.dbs;
        if !journal.is_empty(txn)? {
            return Ok(None);
        }
        Ok(Some(keys.iter().map(|key| versions.get(txn, key)).collect::<Result<_, _>>()?))
    }

    /// Number of keys with a version.
    pub fn len(&self) -> Result<u64> {
        let meta = self.shared.dbs.meta;
        self.read("len", |txn| meta_u64(meta, txn, COUNT, 0))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Flushes everything committed to disk (useful with `durable: false`).
    pub fn sync(&self) -> Result<()> {
        self.shared.env.force_sync().map_err(|e| self.err("sync", e))
    }

    pub fn info(&self) -> Result<Info> {
        let Dbs { meta, journal, values, seen, .. } = self.shared.dbs;
        let (format, created_by, counts) = self.read("info", |txn| {
            let raw = meta.get(txn, "keylane")?.unwrap_or_default();
            let record: Option<Meta> = rmp_serde::from_slice(raw).ok();
            let counts =
                (meta_u64(meta, txn, COUNT, 0)?, journal.len(txn)?, values.len(txn)?, seen.len(txn)?);
            Ok(record.map_or((0, String::new(), counts), |m| (m.format, m.created_by, counts)))
        })?;
        Ok(Info {
            path: self.shared.env.path().to_path_buf(),
            format,
            created_by,
            map_size: self.shared.env.info().map_size,
            used_bytes: self.shared.env.non_free_pages_size().map_err(|e| self.err("info", e))?,
            durable: self.shared.durable,
            versions: counts.0,
            journal_records: counts.1,
            values: counts.2,
            seen: counts.3,
        })
    }
}

/// The big-endian number an entry starts with. A shorter entry can only be
/// damage, reported as such rather than read past.
fn be_u64(b: &[u8]) -> Txn<u64> {
    b.get(..8).and_then(|h| <[u8; 8]>::try_from(h).ok()).map(u64::from_be_bytes).ok_or_else(|| {
        Fault::Damaged(format!(
            "a stored entry of {} bytes is shorter than the 8-byte number it starts with",
            b.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn reads_of_a_folded_table_do_not_wait_for_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(
            VersionTable::open(dir.path(), Options { durable: false, ..Options::default() }).unwrap(),
        );
        t.check_and_set_many_folded(&[(b"a", 3)]).unwrap();
        // Held as a writer holds it through its commit.
        let held = t.shared.index.lock();
        let (tx, rx) = mpsc::channel();
        let reader = Arc::clone(&t);
        let read = std::thread::spawn(move || tx.send(reader.get_many(&[b"a", b"b"]).unwrap()));
        let got = rx.recv_timeout(Duration::from_secs(30));
        drop(held);
        read.join().unwrap().ok();
        assert_eq!(got.expect("the read waited for the index's lock"), [Some(3), None]);
        // With entries in the journal, reads go through the index.
        t.check_and_set_many(&[(b"b", 1)]).unwrap();
        assert_eq!(t.get_many(&[b"a", b"b"]).unwrap(), [Some(3), Some(1)]);
    }
}
