//! `first_step`: starts a handler's coroutine, and tells whether it
//! finished without suspending, without the StopIteration a finished
//! `coro.send(None)` raises. Caught in Python, that cost a StopIteration, a
//! traceback and a bound `send` method per message: three of the ~15 Python
//! allocations each message made (scripts/alloc-count).

use pyo3::ffi;
use pyo3::prelude::*;

/// Sends None into `coro`: returns `done` if it returned, else what it
/// yielded (its trap, to be handed to the event loop). What it raises goes
/// up, and the coroutine is then finished.
#[pyfunction]
// The second unsafe place in the crate (see gc.rs): no safe PyO3 API sends
// into a coroutine without raising StopIteration when it returns.
#[allow(unsafe_code)]
fn first_step<'py>(coro: &Bound<'py, PyAny>, done: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = coro.py();
    let mut out: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: `coro` and None are live objects for the call. PyIter_Send
    // accepts any object (an error if it cannot be sent into), leaves a new
    // reference in `out` for RETURN and NEXT, and sets an exception (with
    // `out` NULL) for ERROR; each new reference is owned exactly once below.
    let sent = unsafe { ffi::PyIter_Send(coro.as_ptr(), ffi::Py_None(), &mut out) };
    match sent {
        ffi::PySendResult::PYGEN_ERROR => Err(PyErr::fetch(py)),
        ffi::PySendResult::PYGEN_RETURN => {
            // SAFETY: as above, a new reference: dropped here.
            drop(unsafe { Bound::from_owned_ptr(py, out) });
            Ok(done.clone())
        }
        // SAFETY: as above, a new reference, handed to the caller.
        ffi::PySendResult::PYGEN_NEXT => Ok(unsafe { Bound::from_owned_ptr(py, out) }),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(first_step, m)?)
}
