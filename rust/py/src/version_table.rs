//! `keylane.VersionTable`: versions, last-write-wins values and seen ids in
//! LMDB. Keys are converted with the GIL held; LMDB runs with it released.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use keylane_core::versions::{self as core, Options, Snapshot};
use parking_lot::{Mutex, RwLock};
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView, PyTuple};

use crate::args::{int_arg, key_bytes};
use crate::errors::{Result, invalid_argument, invalid_type, store_error};
use crate::version_batch::VersionBatch;
use keylane_core::Error as CoreError;

/// Versions are non-negative and fit a signed 64-bit integer.
pub(crate) fn version_arg(obj: &Bound<'_, PyAny>) -> Result<u64> {
    let v = int_arg(obj, "version")?;
    if v < 0 {
        return Err(invalid_argument(format!("version must be between 0 and {}, got {v}", i64::MAX)));
    }
    Ok(v as u64)
}

/// `None`, or a positive number of seconds, as milliseconds.
pub(crate) fn ttl_arg(obj: Option<&Bound<'_, PyAny>>) -> Result<Option<u64>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid_type("ttl_s must be a number of seconds or None, not bool"));
    }
    let secs: f64 = obj.extract().map_err(|_| invalid_type("ttl_s must be a number of seconds or None"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(invalid_argument(format!("ttl_s must be positive and finite, got {secs}")));
    }
    // At least one millisecond: a positive window never rounds to "expired".
    Ok(Some(((secs * 1000.0).ceil() as u64).max(1)))
}

/// Bytes of a value: bytes-like only (a value is opaque; text is not
/// silently encoded).
fn value_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> Result<Cow<'a, [u8]>> {
    if obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyByteArray>()
        || obj.is_instance_of::<PyMemoryView>()
    {
        return key_bytes(obj);
    }
    let name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    Err(invalid_type(format!("value must be bytes, bytearray or memoryview, not {name}")))
}

/// A durable map of entity key → highest applied version, a last-write-wins
/// register per key, and a store of message ids seen within a window.
#[pyclass(module = "keylane._native", frozen, name = "VersionTable")]
pub(crate) struct VersionTable {
    table: RwLock<Option<Arc<core::VersionTable>>>,
    clock: Option<Py<PyAny>>,
    path: PathBuf,
    durable: bool,
}

impl VersionTable {
    pub(crate) fn open(&self) -> Result<Arc<core::VersionTable>> {
        self.table
            .read()
            .clone()
            .ok_or_else(|| store_error(format!("version table {} is closed", self.path.display())))
    }

    /// Milliseconds since the epoch, from the injected clock or the system.
    pub(crate) fn now_ms(&self, py: Python<'_>) -> Result<u64> {
        let secs: f64 = match &self.clock {
            Some(clock) => clock
                .bind(py)
                .call0()?
                .extract()
                .map_err(|_| invalid_type("clock() must return a number of seconds"))?,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(invalid_argument(format!(
                "clock() returned {secs}; it must be seconds since the epoch"
            )));
        }
        Ok((secs * 1000.0) as u64)
    }
}

/// Keys of a batch, kept alive while their bytes are borrowed.
fn collect_keys<'py>(objs: &Bound<'py, PyAny>) -> Result<Vec<Bound<'py, PyAny>>> {
    let py = objs.py();
    objs.try_iter()?
        .enumerate()
        .map(|(i, k)| {
            breathe(py, i);
            k.map_err(Into::into)
        })
        .collect()
}

fn borrow_keys<'a>(keys: &'a [Bound<'_, PyAny>]) -> Result<Vec<Cow<'a, [u8]>>> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            breathe(k.py(), i);
            key_bytes(k)
        })
        .collect()
}

/// Converting a big batch holds the GIL (it reads Python objects), and the
/// runtime calls these from a worker thread while its event loop waits for
/// the GIL: let other threads run every few thousand items, so a flush of
/// 100,000s of versions never holds the loop for more than a fraction of a
/// millisecond at a time.
fn breathe(py: Python<'_>, index: usize) {
    if index % 2048 == 2047 {
        py.detach(std::thread::yield_now);
    }
}

/// An optional count of at least `min`.
fn count_arg(value: Option<&Bound<'_, PyAny>>, name: &str, min: i64, default: usize) -> Result<usize> {
    let Some(value) = value else { return Ok(default) };
    let n = int_arg(value, name)?;
    if n < min {
        return Err(invalid_argument(format!("{name} must be >= {min}, got {n}")));
    }
    Ok(n as usize)
}

#[pymethods]
impl VersionTable {
    #[new]
    // The constructor's keyword arguments, one per option.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (path, *, map_size = None, durable = true, create = true, clock = None, cache_keys = None, journal_entries = None))]
    fn new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        map_size: Option<&Bound<'_, PyAny>>,
        durable: bool,
        create: bool,
        clock: Option<Py<PyAny>>,
        cache_keys: Option<&Bound<'_, PyAny>>,
        journal_entries: Option<&Bound<'_, PyAny>>,
    ) -> Result<Self> {
        let path: PathBuf = path.extract().map_err(|_| {
            let name = path.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            invalid_type(format!("path must be a str or os.PathLike (a directory), not {name}"))
        })?;
        let map_size = match map_size {
            Some(m) => int_arg(m, "map_size")?,
            None => Options::default().map_size as i64,
        };
        if map_size < 1 << 16 {
            return Err(invalid_argument(format!("map_size must be at least 65536 bytes, got {map_size}")));
        }
        if let Some(c) = &clock
            && !c.bind(py).is_callable()
        {
            return Err(invalid_type("clock must be a callable returning seconds since the epoch"));
        }
        let defaults = Options::default();
        let options = Options {
            map_size: map_size as usize,
            durable,
            create,
            cache_keys: count_arg(cache_keys, "cache_keys", 0, defaults.cache_keys)?,
            journal_entries: count_arg(journal_entries, "journal_entries", 1, defaults.journal_entries)?,
        };
        let table = py.detach(|| core::VersionTable::open(&path, options))?;
        Ok(VersionTable { table: RwLock::new(Some(Arc::new(table))), clock, path, durable })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    #[getter]
    fn durable(&self) -> bool {
        self.durable
    }

    #[getter]
    fn closed(&self) -> bool {
        self.table.read().is_none()
    }

    /// Closes the table, folding its journal first if this process wrote to
    /// it (nothing is lost if that fails: the journal stays, and is read
    /// again on the next open). Iterators from `items()` keep their snapshot
    /// until they are exhausted or dropped.
    fn close(&self, py: Python<'_>) -> Result<()> {
        let Some(table) = self.table.write().take() else { return Ok(()) };
        if table.has_written() {
            py.detach(|| table.checkpoint())?;
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> Result<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "VersionTable('{}', durable={}{})",
            self.path.display(),
            if self.durable { "True" } else { "False" },
            if self.closed() { ", closed" } else { "" }
        )
    }

    /// True iff `version` is greater than the stored version of `key` (or
    /// none is stored); it is then stored.
    fn check_and_set(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        version: &Bound<'_, PyAny>,
    ) -> Result<bool> {
        let table = self.open()?;
        let key = key_bytes(key)?;
        let version = version_arg(version)?;
        Ok(py.detach(|| table.check_and_set(&key, version))?)
    }

    /// `check_and_set` over `(key, version)` pairs in one transaction; a key
    /// repeated in the batch is judged against its earlier entries.
    fn check_and_set_many<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyList>> {
        let table = self.open()?;
        let mut keys = Vec::new();
        let mut versions = Vec::new();
        for (index, pair) in pairs.try_iter()?.enumerate() {
            breathe(py, index);
            let pair = pair?;
            let tuple = pair.cast::<PyTuple>().ok().filter(|t| t.len() == 2).ok_or_else(|| {
                invalid_type(format!("check_and_set_many entry {index} must be a (key, version) tuple"))
            })?;
            versions.push(version_arg(&tuple.get_item(1)?).map_err(|e| e.in_batch(py, index))?);
            keys.push(tuple.get_item(0)?);
        }
        let bytes = borrow_keys(&keys)?;
        let batch: Vec<(&[u8], u64)> = bytes.iter().map(|k| &**k).zip(versions).collect();
        let out = py.detach(|| table.check_and_set_many(&batch))?;
        Ok(PyList::new(py, out)?)
    }

    /// The stored version of `key`, or None.
    fn get(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> Result<Option<u64>> {
        let table = self.open()?;
        let key = key_bytes(key)?;
        Ok(py.detach(|| table.get(&key))?)
    }

    /// Stored versions of `keys`, read in one snapshot.
    fn get_many<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>) -> Result<Bound<'py, PyList>> {
        let table = self.open()?;
        let keys = collect_keys(keys)?;
        let bytes = borrow_keys(&keys)?;
        let slices: Vec<&[u8]> = bytes.iter().map(|k| &**k).collect();
        let out = py.detach(|| table.get_many(&slices))?;
        Ok(PyList::new(py, out)?)
    }

    fn __len__(&self, py: Python<'_>) -> Result<usize> {
        let table = self.open()?;
        Ok(py.detach(|| table.len())? as usize)
    }

    /// `(key, version)` pairs in key order, from a consistent snapshot taken
    /// now; the snapshot is held until the iterator is exhausted or dropped.
    fn items(&self, py: Python<'_>) -> Result<VersionItems> {
        let table = self.open()?;
        let snapshot = py.detach(|| table.snapshot())?;
        Ok(VersionItems::new(ItemsState { snapshot, after: None, buffer: VecDeque::new() }))
    }

    /// A last-write-wins register: stores `value` with `version` iff newer
    /// than the register's; version and value change together.
    fn put_if_newer(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        version: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> Result<bool> {
        let table = self.open()?;
        let key = key_bytes(key)?;
        let version = version_arg(version)?;
        let value = value_bytes(value)?;
        Ok(py.detach(|| table.put_if_newer(&key, version, &value))?)
    }

    /// The register's `(version, value)`, or None.
    fn get_value<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> Result<Option<(u64, Bound<'py, PyBytes>)>> {
        let table = self.open()?;
        let key = key_bytes(key)?;
        let found = py.detach(|| table.get_value(&key))?;
        Ok(found.map(|(v, bytes)| (v, PyBytes::new(py, &bytes))))
    }

    /// True the first time `message_id` is marked within its window
    /// (`ttl_s` seconds, or forever with None).
    #[pyo3(signature = (message_id, *, ttl_s = None))]
    fn mark_seen(
        &self,
        py: Python<'_>,
        message_id: &Bound<'_, PyAny>,
        ttl_s: Option<&Bound<'_, PyAny>>,
    ) -> Result<bool> {
        let table = self.open()?;
        let id = key_bytes(message_id)?;
        let ttl = ttl_arg(ttl_s)?;
        let now = self.now_ms(py)?;
        Ok(py.detach(|| table.mark_seen(&id, ttl, now))?)
    }

    /// `mark_seen` for many ids in one transaction; an id repeated in the
    /// batch is new only at its first occurrence.
    #[pyo3(signature = (ids, *, ttl_s = None))]
    fn mark_seen_many<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        ttl_s: Option<&Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyList>> {
        let table = self.open()?;
        let ttl = ttl_arg(ttl_s)?;
        let ids = collect_keys(ids)?;
        let bytes = borrow_keys(&ids)?;
        let slices: Vec<&[u8]> = bytes.iter().map(|k| &**k).collect();
        let now = self.now_ms(py)?;
        let out = py.detach(|| table.mark_seen_many(&slices, ttl, now))?;
        Ok(PyList::new(py, out)?)
    }

    /// True if `message_id` was marked and its window has not passed.
    /// Only reads: unlike `mark_seen`, it records nothing.
    fn is_seen(&self, py: Python<'_>, message_id: &Bound<'_, PyAny>) -> Result<bool> {
        let table = self.open()?;
        let id = key_bytes(message_id)?;
        let now = self.now_ms(py)?;
        Ok(py.detach(|| table.is_seen(&id, now))?)
    }

    /// Writes a `VersionBatch`: its versions as `check_and_set_many` and
    /// its ids as `mark_seen_many` (with `ttl_s`), each in one transaction,
    /// with the GIL released throughout. The batch is emptied.
    #[pyo3(signature = (batch, *, ttl_s = None))]
    fn write_batch(
        &self,
        py: Python<'_>,
        batch: &Bound<'_, VersionBatch>,
        ttl_s: Option<&Bound<'_, PyAny>>,
    ) -> Result<()> {
        let table = self.open()?;
        let ttl = ttl_arg(ttl_s)?;
        let now = self.now_ms(py)?;
        let taken = std::mem::take(&mut *batch.get().inner.lock());
        let back = py.detach(|| -> Result<(), CoreError> {
            let pairs: Vec<(&[u8], u64)> =
                taken.versions.iter().flatten().map(|(k, v)| (k.as_slice(), *v)).collect();
            if !pairs.is_empty() {
                table.check_and_set_many(&pairs)?;
            }
            let ids: Vec<&[u8]> = taken.ids.iter().flatten().map(Vec::as_slice).collect();
            if !ids.is_empty() {
                table.mark_seen_many(&ids, ttl, now)?;
            }
            Ok(())
        });
        Ok(back?)
    }

    /// `is_seen` for each id, in one transaction (the GIL released).
    fn is_seen_many<'py>(
        &self,
        py: Python<'py>,
        message_ids: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyList>> {
        let table = self.open()?;
        let ids = collect_keys(message_ids)?;
        let bytes = borrow_keys(&ids)?;
        let slices: Vec<&[u8]> = bytes.iter().map(|k| &**k).collect();
        let now = self.now_ms(py)?;
        let out = py.detach(|| table.is_seen_many(&slices, now))?;
        Ok(PyList::new(py, out)?)
    }

    /// Forgets ids whose window has passed; returns how many.
    fn purge_expired(&self, py: Python<'_>) -> Result<u64> {
        let table = self.open()?;
        let now = self.now_ms(py)?;
        Ok(py.detach(|| table.purge_expired(now))?)
    }

    /// Flushes committed data to disk (a no-op cost with `durable=True`).
    fn sync(&self, py: Python<'_>) -> Result<()> {
        let table = self.open()?;
        Ok(py.detach(|| table.sync())?)
    }

    /// Folds the journal into the B-tree now, in one transaction (close()
    /// does it too). For a quiet moment: the commit that fills the journal
    /// otherwise pays for the fold.
    fn checkpoint(&self, py: Python<'_>) -> Result<()> {
        let table = self.open()?;
        Ok(py.detach(|| table.checkpoint())?)
    }

    /// Counts and sizes: path, format, created_by, map_size, used_bytes,
    /// durable, versions, journal_records, values, seen.
    fn info<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let table = self.open()?;
        let info = py.detach(|| table.info())?;
        let out = PyDict::new(py);
        out.set_item("path", info.path)?;
        out.set_item("format", info.format)?;
        out.set_item("created_by", info.created_by)?;
        out.set_item("map_size", info.map_size)?;
        out.set_item("used_bytes", info.used_bytes)?;
        out.set_item("durable", info.durable)?;
        out.set_item("versions", info.versions)?;
        out.set_item("journal_records", info.journal_records)?;
        out.set_item("values", info.values)?;
        out.set_item("seen", info.seen)?;
        Ok(out)
    }
}

struct ItemsState {
    snapshot: Snapshot,
    after: Option<Vec<u8>>,
    buffer: VecDeque<(Vec<u8>, u64)>,
}

/// Where an iterator is: between calls, inside a call (possibly with the GIL
/// released), or exhausted.
enum Cursor {
    Idle(ItemsState),
    Busy,
    Done,
}

/// Iterator over a `VersionTable`'s `(key, version)` pairs from one snapshot.
#[pyclass(module = "keylane._native", frozen, name = "VersionItems")]
pub(crate) struct VersionItems {
    /// The lock is held only to move the state in or out, never while the
    /// GIL is released: a second thread calling `__next__` meanwhile finds
    /// `Busy` and gets an error, as a generator already executing does.
    /// `Done` once exhausted: the snapshot (an LMDB read transaction) is
    /// released as soon as the last page has been read.
    state: Mutex<Cursor>,
}

impl VersionItems {
    fn new(state: ItemsState) -> Self {
        VersionItems { state: Mutex::new(Cursor::Idle(state)) }
    }
}

#[pymethods]
impl VersionItems {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> Result<(Bound<'py, PyBytes>, u64)> {
        let taken = std::mem::replace(&mut *self.state.lock(), Cursor::Busy);
        let mut state = match taken {
            Cursor::Idle(state) => state,
            Cursor::Done => {
                *self.state.lock() = Cursor::Done;
                return Err(PyStopIteration::new_err(()).into());
            }
            Cursor::Busy => {
                return Err(invalid_argument(
                    "this VersionItems iterator is being advanced by another thread; \
                     give each thread its own table.items()",
                ));
            }
        };
        if state.buffer.is_empty() {
            // The snapshot moves into the GIL-free section and back: its
            // read transaction may be used by one thread at a time only.
            let (back, page) = py.detach(move || {
                let page = state.snapshot.page(state.after.as_deref(), 1024);
                (state, page)
            });
            state = back;
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    *self.state.lock() = Cursor::Idle(state);
                    return Err(e.into());
                }
            };
            if page.is_empty() {
                // Exhausted: the read transaction is released here.
                *self.state.lock() = Cursor::Done;
                return Err(PyStopIteration::new_err(()).into());
            }
            state.after = page.last().map(|(k, _)| k.clone());
            state.buffer.extend(page);
        }
        let Some((key, version)) = state.buffer.pop_front() else {
            *self.state.lock() = Cursor::Done;
            return Err(PyStopIteration::new_err(()).into());
        };
        *self.state.lock() = Cursor::Idle(state);
        Ok((PyBytes::new(py, &key), version))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VersionTable>()?;
    m.add_class::<VersionItems>()?;
    Ok(())
}
