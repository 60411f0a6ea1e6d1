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
mod index;
mod journal;

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
const MAX_KEY: usize = 511;
const MAX_ID: usize = MAX_KEY - 8;

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

/// Open environments by canonical path; entries die with their last table.
static OPEN: Mutex<Option<HashMap<PathBuf, Weak<Shared>>>> = Mutex::new(None);

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

fn expiry_key(expiry: u64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&expiry.to_be_bytes());
    k.extend_from_slice(id);
    k
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
    /// Opens (creating if needed) the table in directory `path`. Opening a
    /// path already open in this process shares that environment; its
    /// `durable` setting must then match.
    pub fn open(path: &Path, options: Options) -> Result<Self> {
        let mut open = OPEN.lock();
        let open = open.get_or_insert_with(HashMap::new);
        if let Ok(canonical) = path.canonicalize()
            && let Some(shared) = open.get(&canonical).and_then(Weak::upgrade)
        {
            // One environment per path per process (LMDB's rule), so its
            // settings cannot differ between handles; say so rather than
            // silently keep the first handle's.
            let differs = [
                ("durable", shared.durable.to_string(), options.durable.to_string()),
                ("map_size", shared.map_size.to_string(), options.map_size.to_string()),
                ("cache_keys", shared.cache_keys.to_string(), options.cache_keys.to_string()),
                (
                    "journal_entries",
                    shared.journal_entries.to_string(),
                    options.journal_entries.max(1).to_string(),
                ),
            ];
            if let Some((name, open_with, asked)) = differs.into_iter().find(|(_, a, b)| a != b) {
                return Err(Error::Store(format!(
                    "{} is already open in this process with {name}={open_with} (asked for \
                     {asked}); open it with the same settings, or close every VersionTable on \
                     it first",
                    path.display()
                )));
            }
            return Ok(VersionTable { shared });
        }
        let shared = Arc::new(Self::open_new(path, options)?);
        let canonical = path.canonicalize().map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(canonical, Arc::downgrade(&shared));
        Ok(VersionTable { shared })
    }

    fn open_new(path: &Path, options: Options) -> Result<Shared> {
        if path.exists() && !path.is_dir() {
            return Err(Error::StoreFormat(format!(
                "{} is a file; a keylane version table is a directory (LMDB environment)",
                path.display()
            )));
        }
        if !options.create && !path.join("data.mdb").is_file() {
            return Err(Error::StoreFormat(format!("no keylane version table at {}", path.display())));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Store(format!("cannot create {}: {e}", path.display())))?;
        let data = path.join("data.mdb");
        if data.exists() {
            data_file::check(&data)?;
        }
        let mut builder = EnvOpenOptions::new().read_txn_without_tls();
        builder.map_size(options.map_size).max_dbs(8);
        if !options.durable {
            // SAFETY: MDB_NOSYNC only drops the flush at commit; LMDB stays
            // consistent (see docs/design.md for the exact guarantee).
            #[allow(unsafe_code)]
            unsafe {
                builder.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: heed's precondition is that the files are not modified
        // behind LMDB's back; keylane only touches them through LMDB, and
        // heed itself handles a second open of one path in this process.
        #[allow(unsafe_code)]
        let env = unsafe { builder.open(path) }.map_err(|e| open_error(path, e))?;
        let dbs = Self::prepare(&env, path, options.create)?;
        Ok(Shared {
            env,
            dbs,
            durable: options.durable,
            journal_entries: options.journal_entries.max(1),
            map_size: options.map_size,
            cache_keys: options.cache_keys,
            wrote: AtomicBool::new(false),
            index: Mutex::new(Index::new(options.cache_keys)),
        })
    }

    /// Creates the databases of a new table, or checks an existing one.
    fn prepare(env: &Env<WithoutTls>, path: &Path, create: bool) -> Result<Dbs> {
        let fail = |e: heed::Error| Error::Store(format!("cannot open {}: {e}", path.display()));
        let mut wtxn = env.write_txn().map_err(fail)?;
        let meta: Option<Database<Str, Bytes>> = env.open_database(&wtxn, Some("meta")).map_err(fail)?;
        let mut upgrade = None;
        match meta.map(|m| m.get(&wtxn, "keylane")).transpose().map_err(fail)?.flatten() {
            Some(raw) => {
                let meta: Meta = rmp_serde::from_slice(raw).map_err(|e| {
                    Error::StoreFormat(format!("{} has unreadable keylane metadata: {e}", path.display()))
                })?;
                if meta.format == FORMAT_NO_JOURNAL {
                    upgrade = Some(meta.created_by);
                } else if meta.format != FORMAT {
                    return Err(Error::StoreFormat(format!(
                        "{} is a keylane table in format {} (written by {}); this keylane reads format {FORMAT}",
                        path.display(),
                        meta.format,
                        meta.created_by
                    )));
                }
            }
            None if !create => {
                return Err(Error::StoreFormat(format!("no keylane version table at {}", path.display())));
            }
            None => {
                // A new table is an empty environment: anything else is
                // someone else's data, which we must not write into.
                let main: Option<Database<Bytes, Bytes>> = env.open_database(&wtxn, None).map_err(fail)?;
                if let Some(main) = main
                    && !main.is_empty(&wtxn).map_err(fail)?
                {
                    return Err(Error::StoreFormat(format!(
                        "{} holds an LMDB environment that is not a keylane table; refusing to write into it",
                        path.display()
                    )));
                }
                upgrade = Some(format!("keylane {}", env!("CARGO_PKG_VERSION")));
            }
        }
        let dbs = Dbs {
            meta: env.create_database(&mut wtxn, Some("meta")).map_err(fail)?,
            journal: env.create_database(&mut wtxn, Some("journal")).map_err(fail)?,
            versions: env.create_database(&mut wtxn, Some("versions")).map_err(fail)?,
            values: env.create_database(&mut wtxn, Some("values")).map_err(fail)?,
            seen: env.create_database(&mut wtxn, Some("seen")).map_err(fail)?,
            expiry: env.create_database(&mut wtxn, Some("expiry")).map_err(fail)?,
        };
        if let Some(created_by) = upgrade {
            // A new table, or a format 1 one: its versions are all in the
            // B-tree and its journal is empty.
            let count = dbs.versions.len(&wtxn).map_err(fail)?;
            let raw = rmp_serde::to_vec_named(&Meta { format: FORMAT, created_by })
                .map_err(|e| Error::Store(e.to_string()))?;
            dbs.meta.put(&mut wtxn, "keylane", &raw).map_err(fail)?;
            dbs.meta.put(&mut wtxn, FOLDED, &FIRST_RECORD.to_be_bytes()).map_err(fail)?;
            dbs.meta.put(&mut wtxn, COUNT, &count.to_be_bytes()).map_err(fail)?;
        }
        wtxn.commit().map_err(fail)?;
        Ok(dbs)
    }

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
        self.write_indexed("check_and_set", |txn, index| self.apply(txn, index, pairs))
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
    /// ones as one journal record, and folds the journal if it is full.
    fn apply(&self, txn: &mut RwTxn<'_>, index: &mut Index, pairs: &[(&[u8], u64)]) -> Txn<Vec<bool>> {
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
        if index.journal_entries() >= self.shared.journal_entries {
            self.fold(txn, index)?;
        }
        Ok(out)
    }

    /// Writes the journal's versions into `versions` and empties it.
    fn fold(&self, txn: &mut RwTxn<'_>, index: &mut Index) -> Txn<()> {
        let Dbs { meta, journal, versions, .. } = self.shared.dbs;
        let sorted = index.pending_sorted();
        // Keys in order, one cursor: each B-tree page is copied and written
        // once however many of its keys changed, and keys past the last one
        // (ids that grow) are appended, filling pages whole. When the
        // journal's keys are a good part of the tree, the cursor walks it
        // and overwrites each key where it lies; otherwise each key is put
        // through the cursor, which skips the descent from the root when
        // the key is on the cursor's page.
        if (sorted.len() as u64).saturating_mul(WALK_BELOW) >= versions.len(txn)? {
            fold_walking(versions, txn, &sorted)?;
        } else {
            let last = versions.last(txn)?.map(|(key, _)| key.to_vec());
            let mut cursor = versions.remap_data_type::<Bytes>().iter_mut(txn)?;
            for &(key, version) in &sorted {
                let flags = match &last {
                    Some(last) if key <= last.as_slice() => PutFlags::empty(),
                    _ => PutFlags::APPEND,
                };
                // SAFETY: `key` and `version` live in the index, not in the
                // database, so the put invalidates nothing they point to.
                #[allow(unsafe_code)]
                unsafe {
                    cursor.put_current_with_options::<Bytes>(flags, key, &version.to_be_bytes())?;
                }
            }
        }
        drop(sorted);
        journal.clear(txn)?;
        meta.put(txn, FOLDED, &index.next.to_be_bytes())?;
        index.folded_all();
        Ok(())
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
        let mut index = self.shared.index.lock();
        self.read("get", |txn| {
            self.catch_up(txn, &mut index)?;
            keys.iter().map(|key| self.stored(txn, &mut index, key)).collect()
        })
    }

    /// Number of keys with a version.
    pub fn len(&self) -> Result<u64> {
        let meta = self.shared.dbs.meta;
        self.read("len", |txn| meta_u64(meta, txn, COUNT, 0))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A last-write-wins register: stores `value` with `version` iff the
    /// version is greater than the register's (or it is empty). The version
    /// and value are one record, so they change together. The register's
    /// version is its own, independent of `check_and_set`'s.
    pub fn put_if_newer(&self, key: &[u8], version: u64, value: &[u8]) -> Result<bool> {
        check_key("key", key, MAX_KEY)?;
        check_version(version)?;
        let values = self.shared.dbs.values;
        self.write("put_if_newer", |txn| {
            if let Some(stored) = values.get(txn, key)?
                && version <= be_u64(stored)?
            {
                return Ok(false);
            }
            let mut record = Vec::with_capacity(8 + value.len());
            record.extend_from_slice(&version.to_be_bytes());
            record.extend_from_slice(value);
            values.put(txn, key, &record)?;
            Ok(true)
        })
    }

    /// The register's `(version, value)`, if it was ever written.
    pub fn get_value(&self, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        check_key("key", key, MAX_KEY)?;
        let values = self.shared.dbs.values;
        self.read("get_value", |txn| match values.get(txn, key)? {
            Some(record) => Ok(Some((be_u64(record)?, record[8..].to_vec()))),
            None => Ok(None),
        })
    }

    /// True the first time `id` is marked within its window: it had never
    /// been seen, or its previous window (`ttl_ms` after that marking) has
    /// passed at `now_ms`. `ttl_ms = None` remembers it forever.
    pub fn mark_seen(&self, id: &[u8], ttl_ms: Option<u64>, now_ms: u64) -> Result<bool> {
        Ok(self.mark_seen_many(&[id], ttl_ms, now_ms)?[0])
    }

    /// `mark_seen` for a batch, in one transaction; an id repeated in the
    /// batch is seen by its first occurrence.
    pub fn mark_seen_many(&self, ids: &[&[u8]], ttl_ms: Option<u64>, now_ms: u64) -> Result<Vec<bool>> {
        for id in ids {
            check_key("message id", id, MAX_ID)?;
        }
        if ttl_ms == Some(0) {
            return Err(Error::InvalidArgument("ttl must be positive (or None for no expiry)".into()));
        }
        let expires = ttl_ms.map_or(FOREVER, |ttl| now_ms.saturating_add(ttl).min(FOREVER - 1));
        let Dbs { seen, expiry, .. } = self.shared.dbs;
        self.write("mark_seen", |txn| {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let first = match seen.get(txn, id)? {
                    Some(until) if until > now_ms => false,
                    Some(until) => {
                        expiry.delete(txn, &expiry_key(until, id))?;
                        true
                    }
                    None => true,
                };
                if first {
                    seen.put(txn, id, &expires)?;
                    if expires != FOREVER {
                        expiry.put(txn, &expiry_key(expires, id), &())?;
                    }
                }
                out.push(first);
            }
            Ok(out)
        })
    }

    /// True if `id` was marked and its window has not passed at `now_ms`.
    /// Reads only: it does not mark.
    pub fn is_seen(&self, id: &[u8], now_ms: u64) -> Result<bool> {
        check_key("message id", id, MAX_ID)?;
        let seen = self.shared.dbs.seen;
        self.read("is_seen", |txn| Ok(seen.get(txn, id)?.is_some_and(|until| until > now_ms)))
    }

    /// `is_seen` for each id, in one read transaction.
    pub fn is_seen_many(&self, ids: &[&[u8]], now_ms: u64) -> Result<Vec<bool>> {
        for id in ids {
            check_key("message id", id, MAX_ID)?;
        }
        let seen = self.shared.dbs.seen;
        self.read("is_seen_many", |txn| {
            ids.iter().map(|id| Ok(seen.get(txn, id)?.is_some_and(|until| until > now_ms))).collect()
        })
    }

    /// Forgets ids whose window has passed at `now_ms`; returns how many.
    pub fn purge_expired(&self, now_ms: u64) -> Result<u64> {
        let Dbs { seen, expiry, .. } = self.shared.dbs;
        self.write("purge_expired", |txn| {
            let mut purged = 0;
            loop {
                // Collect a chunk, then delete: LMDB forbids writing through
                // a database while iterating it without a write cursor.
                let due: Vec<Vec<u8>> = expiry
                    .iter(txn)?
                    .take(4096)
                    .map(|kv| kv.map(|(k, ())| k.to_vec()))
                    .take_while(|k| k.as_ref().map_or(true, |k| be_u64(k).map_or(true, |t| t <= now_ms)))
                    .collect::<Result<_, _>>()?;
                if due.is_empty() {
                    return Ok(purged);
                }
                for k in &due {
                    let (until, id) = (be_u64(k)?, &k[8..]);
                    expiry.delete(txn, k)?;
                    if seen.get(txn, id)? == Some(until) {
                        seen.delete(txn, id)?;
                        purged += 1;
                    }
                }
            }
        })
    }

    /// Flushes everything committed to disk (useful with `durable: false`).
    pub fn sync(&self) -> Result<()> {
        self.shared.env.force_sync().map_err(|e| self.err("sync", e))
    }

    /// A snapshot of the version map for iteration; it holds an LMDB read
    /// transaction (and so a view of the data as of now) until dropped.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let txn = self.shared.env.clone().static_read_txn().map_err(|e| self.err("snapshot", e))?;
        let Dbs { meta, journal: records, versions, .. } = self.shared.dbs;
        let mut journal = BTreeMap::new();
        let mut read = || -> Txn<()> {
            for record in records.range(&txn, &(meta_u64(meta, &txn, FOLDED, FIRST_RECORD)?..))? {
                journal::decode(record?.1, |key, version| {
                    let known = journal.entry(key.to_vec()).or_insert(version);
                    *known = (*known).max(version);
                })
                .map_err(Fault::Damaged)?;
            }
            Ok(())
        };
        read().map_err(|e| self.err("snapshot", e))?;
        Ok(Snapshot { txn, versions, journal })
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

/// A consistent view of the version map, read page by page.
pub struct Snapshot {
    txn: RoTxn<'static, WithoutTls>,
    versions: Database<Bytes, U64<BigEndian>>,
    /// The journal's versions as of the snapshot, merged into every page.
    journal: BTreeMap<Vec<u8>, u64>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Up to `limit` entries with keys after `after` (from the start if
    /// `None`), in key order.
    pub fn page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        use std::ops::Bound;
        let store = |e: heed::Error| Error::Store(e.to_string());
        let range = (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
        let mut tree = self.versions.range(&self.txn, &range).map_err(store)?;
        let mut journal = self.journal.range::<[u8], _>(range).map(|(k, &v)| (k.as_slice(), v));
        let (mut t, mut j) = (tree.next().transpose().map_err(store)?, journal.next());
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit {
            let (key, version, advance_tree, advance_journal) = match (t, j) {
                (None, None) => break,
                (Some((k, v)), None) => (k, v, true, false),
                (None, Some((k, v))) => (k, v, false, true),
                (Some((tk, tv)), Some((jk, jv))) => match tk.cmp(jk) {
                    Less => (tk, tv, true, false),
                    Greater => (jk, jv, false, true),
                    Equal => (tk, tv.max(jv), true, true),
                },
            };
            out.push((key.to_vec(), version));
            if advance_tree {
                t = tree.next().transpose().map_err(store)?;
            }
            if advance_journal {
                j = journal.next();
            }
        }
        Ok(out)
    }
}

/// A fold walks the tree when its keys number at least 1/`WALK_BELOW` of
/// the tree's: stepping over the keys between two of them is then cheaper
/// than positioning the cursor on each.
const WALK_BELOW: u64 = 8;

/// Writes `sorted` (strictly increasing keys) into `versions` by walking it
/// with one cursor from the first key: an existing key is overwritten where
/// the cursor stands; a new one is inserted before the entry the cursor has
/// reached, or appended once the walk is past the end.
fn fold_walking(
    versions: Database<Bytes, U64<BigEndian>>,
    txn: &mut RwTxn<'_>,
    sorted: &[(&[u8], u64)],
) -> Txn<()> {
    use std::ops::Bound::{Included, Unbounded};
    let Some(&(first, _)) = sorted.first() else { return Ok(()) };
    let mut walk = versions.remap_data_type::<Bytes>().range_mut(txn, &(Included(first), Unbounded))?;
    // The key under the cursor, copied: nothing borrowed from the database
    // may be held across a write.
    let mut at: Vec<u8> = Vec::new();
    fn step(walk: &mut heed::RwRange<'_, Bytes, Bytes>, at: &mut Vec<u8>) -> Txn<bool> {
        Ok(match walk.next().transpose()? {
            Some((key, _)) => {
                at.clear();
                at.extend_from_slice(key);
                true
            }
            None => false,
        })
    }
    let mut on = step(&mut walk, &mut at)?;
    for &(key, version) in sorted {
        while on && at.as_slice() < key {
            on = step(&mut walk, &mut at)?;
        }
        let value = version.to_be_bytes();
        // SAFETY: `key` and `value` live outside the database, and `at` is a
        // copy, so the writes invalidate nothing still in use; `put_current`
        // is given the key the cursor is on.
        #[allow(unsafe_code)]
        unsafe {
            if on && at.as_slice() == key {
                walk.put_current(key, &value)?;
            } else if on {
                // Inserted before `at`: the cursor moves onto the new key,
                // and one step brings it back to `at`.
                walk.put_current_with_options::<Bytes>(PutFlags::empty(), key, &value)?;
                on = step(&mut walk, &mut at)?;
            } else {
                walk.put_current_with_options::<Bytes>(PutFlags::APPEND, key, &value)?;
            }
        }
    }
    Ok(())
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

fn open_error(path: &Path, e: heed::Error) -> Error {
    let p = path.display();
    match e {
        heed::Error::Mdb(MdbError::Invalid) => Error::StoreFormat(format!(
            "{p} is not an LMDB environment (its data.mdb is not LMDB, or is damaged)"
        )),
        heed::Error::Mdb(MdbError::VersionMismatch) => Error::StoreFormat(format!(
            "{p} is locked by an incompatible LMDB (py-lmdb's lock format differs from keylane's): \
             close the other program, then open it again"
        )),
        heed::Error::EnvAlreadyOpened => Error::Store(format!(
            "{p} is already open in this process with other options (map_size/durable); \
             reuse that VersionTable or close it first"
        )),
        e => Error::Store(format!("cannot open version table {p}: {e}")),
    }
}
