//! The version table and idempotency store, on LMDB (crate `heed`).
//!
//! One LMDB environment (a directory) holds five named databases:
//!
//! | name | key | value |
//! |---|---|---|
//! | `meta` | `"keylane"` | msgpack `{format, created_by}` |
//! | `versions` | entity key | highest applied version, `u64` big-endian |
//! | `values` | entity key | version (`u64` BE) followed by the value bytes |
//! | `seen` | message id | expiry, ms since the Unix epoch, `u64` BE (`u64::MAX`: never) |
//! | `expiry` | expiry (`u64` BE) followed by the id | empty (an index for purging) |
//!
//! Big-endian integers sort numerically, so the expiry index is ordered by
//! time and a purge reads only what has expired. Every call is one LMDB
//! transaction: a batch is applied entirely or not at all.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64, Unit};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, MdbError, RoTxn, RwTxn, WithoutTls};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The on-disk format this code reads and writes.
pub const FORMAT: u32 = 1;
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
    /// How many keys' versions to remember in memory (0: none). See
    /// [`KnownVersions`].
    pub cache_keys: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { map_size: 1 << 30, durable: true, create: true, cache_keys: 100_000 }
    }
}

/// Versions this process has seen stored, kept in memory.
///
/// Stored versions only ever grow (nothing lowers or deletes them), in this
/// process or any other sharing the table. So a remembered version is a
/// lower bound of the stored one, however stale the memory: a candidate at
/// or below it is stale for certain, and `check_and_set` can say so without
/// reading LMDB. A batch of nothing but stale versions (a redelivery, a
/// replay) then needs no transaction at all. Anything else still goes to
/// LMDB. Entries are recorded only after their transaction commits.
///
/// Keys are kept exactly (no hashing shortcut that could confuse two keys),
/// laid end to end in one arena, so remembering a key costs no allocation.
/// When `capacity` keys are remembered, everything is forgotten at once.
#[derive(Debug, Default)]
struct KnownVersions {
    /// (start in `arena`, length, version)
    table: hashbrown::HashTable<(u32, u32, u64)>,
    arena: Vec<u8>,
    hasher: foldhash::fast::RandomState,
    capacity: usize,
}

impl KnownVersions {
    fn find(&self, key: &[u8]) -> Option<&(u32, u32, u64)> {
        let arena = &self.arena;
        self.table.find(self.hasher.hash_one(key), |&(start, len, _)| {
            &arena[start as usize..(start + len) as usize] == key
        })
    }

    /// `None`: unknown key. `Some(true)`: stale for certain. `Some(false)`:
    /// the key exists in LMDB (it was stored once, and nothing deletes it)
    /// but may or may not be newer.
    fn judge(&self, key: &[u8], version: u64) -> Option<bool> {
        self.find(key).map(|&(_, _, known)| version <= known)
    }

    fn record(&mut self, key: &[u8], version: u64) {
        if self.capacity == 0 {
            return;
        }
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        if let Some((_, _, known)) = self
            .table
            .find_mut(hash, |&(start, len, _)| &arena[start as usize..(start + len) as usize] == key)
        {
            *known = (*known).max(version);
            return;
        }
        if self.table.len() >= self.capacity || self.arena.len() + key.len() > u32::MAX as usize {
            self.table.clear();
            self.arena.clear();
        }
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        let hasher = &self.hasher;
        let arena = &self.arena;
        self.table.insert_unique(hash, (start, key.len() as u32, version), |&(s, l, _)| {
            hasher.hash_one(&arena[s as usize..(s + l) as usize])
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Dbs {
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
    known: Mutex<KnownVersions>,
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
            if shared.durable != options.durable {
                return Err(Error::Store(format!(
                    "{} is already open in this process with durable={}; open it with the same setting",
                    path.display(),
                    shared.durable
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
        let known = KnownVersions { capacity: options.cache_keys, ..KnownVersions::default() };
        Ok(Shared { env, dbs, durable: options.durable, known: Mutex::new(known) })
    }

    /// Creates the databases of a new table, or checks an existing one.
    fn prepare(env: &Env<WithoutTls>, path: &Path, create: bool) -> Result<Dbs> {
        let fail = |e: heed::Error| Error::Store(format!("cannot open {}: {e}", path.display()));
        let mut wtxn = env.write_txn().map_err(fail)?;
        let meta: Option<Database<Str, Bytes>> = env.open_database(&wtxn, Some("meta")).map_err(fail)?;
        match meta.map(|m| m.get(&wtxn, "keylane")).transpose().map_err(fail)?.flatten() {
            Some(raw) => {
                let meta: Meta = rmp_serde::from_slice(raw).map_err(|e| {
                    Error::StoreFormat(format!("{} has unreadable keylane metadata: {e}", path.display()))
                })?;
                if meta.format != FORMAT {
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
                let meta: Database<Str, Bytes> =
                    env.create_database(&mut wtxn, Some("meta")).map_err(fail)?;
                let record =
                    Meta { format: FORMAT, created_by: format!("keylane {}", env!("CARGO_PKG_VERSION")) };
                let raw = rmp_serde::to_vec_named(&record).map_err(|e| Error::Store(e.to_string()))?;
                meta.put(&mut wtxn, "keylane", &raw).map_err(fail)?;
            }
        }
        let dbs = Dbs {
            versions: env.create_database(&mut wtxn, Some("versions")).map_err(fail)?,
            values: env.create_database(&mut wtxn, Some("values")).map_err(fail)?,
            seen: env.create_database(&mut wtxn, Some("seen")).map_err(fail)?,
            expiry: env.create_database(&mut wtxn, Some("expiry")).map_err(fail)?,
        };
        wtxn.commit().map_err(fail)?;
        Ok(dbs)
    }

    fn err(&self, doing: &str, e: heed::Error) -> Error {
        match e {
            heed::Error::Mdb(MdbError::MapFull) => {
                Error::StoreFull { map_size: self.shared.env.info().map_size }
            }
            e => Error::Store(format!(
                "version table {}: {doing} failed: {e}",
                self.shared.env.path().display()
            )),
        }
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    fn write<R>(&self, doing: &str, f: impl FnOnce(&mut RwTxn<'_>) -> Result<R, heed::Error>) -> Result<R> {
        let mut wtxn = self.shared.env.write_txn().map_err(|e| self.err(doing, e))?;
        let out = f(&mut wtxn).map_err(|e| self.err(doing, e))?;
        wtxn.commit().map_err(|e| self.err(doing, e))?;
        Ok(out)
    }

    fn read<R>(
        &self,
        doing: &str,
        f: impl FnOnce(&RoTxn<'_, WithoutTls>) -> Result<R, heed::Error>,
    ) -> Result<R> {
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
        let mut out = vec![false; pairs.len()];
        // Entries the known versions cannot settle go to LMDB, in order,
        // with whether the key is known to exist there.
        let open: Vec<(usize, bool)> = {
            let known = self.shared.known.lock();
            (0..pairs.len())
                .filter_map(|i| match known.judge(pairs[i].0, pairs[i].1) {
                    Some(true) => None,
                    Some(false) => Some((i, true)),
                    None => Some((i, false)),
                })
                .collect()
        };
        if open.is_empty() {
            return Ok(out);
        }
        let versions = self.shared.dbs.versions;
        let stored = self.write("check_and_set", |txn| {
            open.iter()
                .map(|&(i, exists)| {
                    let (key, version) = pairs[i];
                    if exists {
                        update_in_place(versions, txn, key, version)
                    } else {
                        insert_or_update(versions, txn, key, version)
                    }
                })
                .collect::<Result<Vec<(bool, u64)>, heed::Error>>()
        })?;
        // Committed: what was stored is now known.
        let mut known = self.shared.known.lock();
        for (&(i, _), (newer, version)) in open.iter().zip(stored) {
            out[i] = newer;
            known.record(pairs[i].0, version);
        }
        Ok(out)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<u64>> {
        Ok(self.get_many(&[key])?[0])
    }

    /// Stored versions of `keys`, read in one snapshot.
    pub fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<u64>>> {
        for key in keys {
            check_key("key", key, MAX_KEY)?;
        }
        let versions = self.shared.dbs.versions;
        self.read("get", |txn| keys.iter().map(|k| versions.get(txn, k)).collect())
    }

    /// Number of keys with a version.
    pub fn len(&self) -> Result<u64> {
        let versions = self.shared.dbs.versions;
        self.read("len", |txn| versions.len(txn))
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
                && version <= stored_version(stored)
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
        self.read("get_value", |txn| {
            Ok(values.get(txn, key)?.map(|record| (stored_version(record), record[8..].to_vec())))
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
                    .take_while(|k| k.as_ref().map_or(true, |k| be_u64(&k[..8]) <= now_ms))
                    .collect::<Result<_, _>>()?;
                if due.is_empty() {
                    return Ok(purged);
                }
                for k in &due {
                    let (until, id) = (be_u64(&k[..8]), &k[8..]);
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
        Ok(Snapshot { txn, versions: self.shared.dbs.versions })
    }

    pub fn info(&self) -> Result<Info> {
        let Dbs { versions, values, seen, .. } = self.shared.dbs;
        let (format, created_by, counts) = self.read("info", |txn| {
            let meta: Option<Database<Str, Bytes>> = self.shared.env.open_database(txn, Some("meta"))?;
            let raw = meta.map(|m| m.get(txn, "keylane")).transpose()?.flatten().unwrap_or_default();
            let meta: Option<Meta> = rmp_serde::from_slice(raw).ok();
            let counts = (versions.len(txn)?, values.len(txn)?, seen.len(txn)?);
            Ok(meta.map_or((0, String::new(), counts), |m| (m.format, m.created_by, counts)))
        })?;
        Ok(Info {
            path: self.shared.env.path().to_path_buf(),
            format,
            created_by,
            map_size: self.shared.env.info().map_size,
            used_bytes: self.shared.env.non_free_pages_size().map_err(|e| self.err("info", e))?,
            durable: self.shared.durable,
            versions: counts.0,
            values: counts.1,
            seen: counts.2,
        })
    }
}

/// A consistent view of the version map, read page by page.
pub struct Snapshot {
    txn: RoTxn<'static, WithoutTls>,
    versions: Database<Bytes, U64<BigEndian>>,
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
        use std::ops::Bound;
        let range = (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
        let it = self.versions.range(&self.txn, &range).map_err(|e| Error::Store(e.to_string()))?;
        it.take(limit)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v)).map_err(|e| Error::Store(e.to_string())))
            .collect()
    }
}

/// For a key that may be new: one B-tree descent for a new key or a stale
/// version (first sight, redelivery), a second only to overwrite with a
/// newer version. Returns (newer, version now stored).
fn insert_or_update(
    versions: Database<Bytes, U64<BigEndian>>,
    txn: &mut RwTxn<'_>,
    key: &[u8],
    version: u64,
) -> Result<(bool, u64), heed::Error> {
    Ok(match versions.get_or_put(txn, key, &version)? {
        None => (true, version),
        Some(old) if version > old => {
            versions.put(txn, key, &version)?;
            (true, version)
        }
        Some(old) => (false, old),
    })
}

/// For a key known to exist: position a cursor on it (one descent) and, if
/// the version is newer, overwrite the value where it lies.
fn update_in_place(
    versions: Database<Bytes, U64<BigEndian>>,
    txn: &mut RwTxn<'_>,
    key: &[u8],
    version: u64,
) -> Result<(bool, u64), heed::Error> {
    use std::ops::Bound::Included;
    let mut cursor = versions.range_mut(txn, &(Included(key), Included(key)))?;
    let old = match cursor.next() {
        Some(found) => found?.1,
        // Not there after all (only if the file was replaced under us):
        // take the general path.
        None => {
            drop(cursor);
            return insert_or_update(versions, txn, key, version);
        }
    };
    if version <= old {
        return Ok((false, old));
    }
    // SAFETY: heed requires that the key equals the one under the cursor
    // (it does: the range holds exactly `key`) and that no reference into
    // the database outlives the write (`old` is a copied u64).
    #[allow(unsafe_code)]
    unsafe {
        cursor.put_current(key, &version)?;
    }
    Ok((true, version))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn stored_version(record: &[u8]) -> u64 {
    be_u64(record)
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
