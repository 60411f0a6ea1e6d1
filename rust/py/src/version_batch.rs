//! `keylane._native.VersionBatch`: versions and ids converted from Python
//! ahead of a write, so that `VersionTable.write_batch` runs without the GIL
//! from start to end.
//!
//! Why: converting 100,000s of `(key, version)` pairs reads Python objects,
//! so it needs the GIL, and done inside the worker-thread call that writes
//! them it holds the GIL for tens of milliseconds while the event loop's
//! thread waits for it. Filled in small chunks on the loop's thread instead
//! (a checkpoint between chunks), the conversion never holds anything long.

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::args::key_bytes;
use crate::errors::{Result, invalid_type};
use crate::version_table::version_arg;

/// Kept as the chunks they were added in: one growing vector would be
/// reallocated and copied whole as it doubles, in one call on the loop's
/// thread (3-10 ms each for a flush of 150,000 versions, mostly page
/// faults on the fresh copy).
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) versions: Vec<Vec<(Vec<u8>, u64)>>,
    pub(crate) ids: Vec<Vec<Vec<u8>>>,
}

/// Pairs and ids to write with `VersionTable.write_batch`.
#[pyclass(module = "keylane._native", frozen, name = "VersionBatch")]
#[derive(Default)]
pub(crate) struct VersionBatch {
    pub(crate) inner: Mutex<Batch>,
}

#[pymethods]
impl VersionBatch {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Adds `(key, version)` pairs (checked as `check_and_set_many` does).
    fn add_versions(&self, pairs: &Bound<'_, PyAny>) -> Result<()> {
        let mut converted = Vec::new();
        for (index, pair) in pairs.try_iter()?.enumerate() {
            let pair = pair?;
            let tuple = pair.cast::<PyTuple>().ok().filter(|t| t.len() == 2).ok_or_else(|| {
                invalid_type(format!("add_versions entry {index} must be a (key, version) tuple"))
            })?;
            let version = version_arg(&tuple.get_item(1)?).map_err(|e| e.in_batch(pairs.py(), index))?;
            converted.push((key_bytes(&tuple.get_item(0)?)?.into_owned(), version));
        }
        self.inner.lock().versions.push(converted);
        Ok(())
    }

    /// Adds message ids to mark seen.
    fn add_ids(&self, ids: &Bound<'_, PyAny>) -> Result<()> {
        let mut converted = Vec::new();
        for id in ids.try_iter()? {
            converted.push(key_bytes(&id?)?.into_owned());
        }
        self.inner.lock().ids.push(converted);
        Ok(())
    }

    fn __len__(&self) -> usize {
        let inner = self.inner.lock();
        inner.versions.iter().map(Vec::len).sum::<usize>() + inner.ids.iter().map(Vec::len).sum::<usize>()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VersionBatch>()
}
