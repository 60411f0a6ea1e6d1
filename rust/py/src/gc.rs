//! `gc_untrack`: takes objects that can never be part of a reference cycle
//! out of the cyclic garbage collector's lists.
//!
//! Every message a broker adapter builds is a GC-tracked object, and up to
//! `capacity` (100,000 by default) of them are alive at once: each full
//! collection walks all of them, which measured 87-114 ms per collection
//! and a fifth of a Kafka run's time. A delivered message refers only to
//! str, int, float, bytes and a mapping of str to bytes, so it cannot close
//! a cycle; reference counting alone frees it. (msgspec's `gc=False`
//! structs rest on the same reasoning.)

use pyo3::ffi;
use pyo3::prelude::*;

/// Stops the cyclic GC from tracking `obj`; objects the GC never tracks are
/// left alone. Only for objects that cannot be in a reference cycle: one
/// that is would never be freed.
#[pyfunction]
// One of the crate's two unsafe places (coro.rs is the other): no safe PyO3
// API untracks an object.
#[allow(unsafe_code)]
fn gc_untrack(obj: &Bound<'_, PyAny>) {
    let ptr = obj.as_ptr();
    // SAFETY: `ptr` is a live object (we hold a reference through `obj`).
    // PyObject_GC_UnTrack reads the GC header in front of the object, which
    // exists only for GC types: checked first. Untracking an untracked
    // object is a no-op, and the object's deallocator untracks again safely.
    unsafe {
        if ffi::PyObject_IS_GC(ptr) != 0 {
            ffi::PyObject_GC_UnTrack(ptr.cast());
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gc_untrack, m)?)
}
