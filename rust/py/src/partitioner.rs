//! `murmur2`, `partition_for_key`, `partitions_for_keys`, `repartition_moves`.
//!
//! Single-key calls hash with the GIL held: releasing and re-taking it costs
//! more than hashing a key of ordinary size. Batch calls gather key bytes in
//! chunks under the GIL, then hash each chunk with the GIL released, so other
//! Python threads run while the batch is hashed.

use std::num::NonZeroU32;

use keylane_core::partitioner::{self, Moves};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::args::{int_arg, key_bytes};
use crate::errors::Result;

/// Above this many key bytes a single call releases the GIL while hashing.
const DETACH_SINGLE_BYTES: usize = 64 * 1024;
/// Batch calls hash in chunks of about this many key bytes...
const CHUNK_BYTES: usize = 256 * 1024;
/// ...or this many keys, whichever comes first.
const CHUNK_KEYS: usize = 8192;

fn partitions_arg(obj: &Bound<'_, PyAny>, what: &str) -> Result<NonZeroU32> {
    Ok(partitioner::partition_count(int_arg(obj, what)?, what)?)
}

/// Key bytes laid end to end, with their boundaries: one allocation per
/// chunk instead of one per key.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Chunk {
    fn push(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
    }

    fn full(&self) -> bool {
        self.bytes.len() >= CHUNK_BYTES || self.ends.len() >= CHUNK_KEYS
    }

    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let key = &self.bytes[start..end];
            start = end;
            key
        })
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// Calls `flush` on every full chunk of `keys` and on the last one, with the
/// GIL released.
fn for_each_chunk(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    mut flush: impl FnMut(&Chunk) + Send,
) -> Result<()> {
    let mut chunk = Chunk::default();
    for key in keys.try_iter()? {
        let key = key?;
        chunk.push(&key_bytes(&key)?);
        if chunk.full() {
            py.detach(|| flush(&chunk));
            chunk.clear();
        }
    }
    if !chunk.ends.is_empty() {
        py.detach(|| flush(&chunk));
    }
    Ok(())
}

/// Kafka's murmur2 of `data` (bytes-like or str), as a signed 32-bit int.
#[pyfunction]
fn murmur2(py: Python<'_>, data: &Bound<'_, PyAny>) -> Result<i32> {
    let key = key_bytes(data)?;
    if key.len() >= DETACH_SINGLE_BYTES {
        let key: &[u8] = &key;
        return Ok(py.detach(|| partitioner::murmur2(key)));
    }
    Ok(partitioner::murmur2(&key))
}

/// The partition Kafka's Java producer (and librdkafka's `murmur2_random`)
/// picks for a non-null `key` on a topic with `num_partitions` partitions.
#[pyfunction]
fn partition_for_key(
    py: Python<'_>,
    key: &Bound<'_, PyAny>,
    num_partitions: &Bound<'_, PyAny>,
) -> Result<u32> {
    let n = partitions_arg(num_partitions, "num_partitions")?;
    let key = key_bytes(key)?;
    if key.len() >= DETACH_SINGLE_BYTES {
        let key: &[u8] = &key;
        return Ok(py.detach(|| partitioner::partition_for_key(key, n)));
    }
    Ok(partitioner::partition_for_key(&key, n))
}

/// `partition_for_key` over any iterable of keys, in one native call.
#[pyfunction]
fn partitions_for_keys<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    num_partitions: &Bound<'py, PyAny>,
) -> Result<Bound<'py, PyList>> {
    let n = partitions_arg(num_partitions, "num_partitions")?;
    let mut out: Vec<u32> = Vec::with_capacity(keys.len().unwrap_or(0));
    for_each_chunk(py, keys, |chunk| {
        out.extend(chunk.keys().map(|k| partitioner::partition_for_key(k, n)));
    })?;
    Ok(PyList::new(py, out)?)
}

/// The fraction of `keys` that map to a different partition once the topic
/// goes from `old_partitions` to `new_partitions`.
#[pyfunction]
fn repartition_moves(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    old_partitions: &Bound<'_, PyAny>,
    new_partitions: &Bound<'_, PyAny>,
) -> Result<f64> {
    let old = partitions_arg(old_partitions, "old_partitions")?;
    let new = partitions_arg(new_partitions, "new_partitions")?;
    let mut moves = Moves::default();
    for_each_chunk(py, keys, |chunk| {
        for k in chunk.keys() {
            moves.add(k, old, new);
        }
    })?;
    Ok(moves.fraction()?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(murmur2, m)?)?;
    m.add_function(wrap_pyfunction!(partition_for_key, m)?)?;
    m.add_function(wrap_pyfunction!(partitions_for_keys, m)?)?;
    m.add_function(wrap_pyfunction!(repartition_moves, m)?)?;
    Ok(())
}
