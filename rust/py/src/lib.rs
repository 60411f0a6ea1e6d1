//! `keylane._native`: the Python face of keylane-core. Each exposed type or
//! group of functions has its own file; this one only assembles the module.

mod args;
mod coro;
mod dispatcher;
mod errors;
mod gc;
mod guard;
mod partitioner;
mod ticket;
mod version_batch;
mod version_table;

use pyo3::prelude::*;

// The dispatcher allocates a node for a message pushed to a busy lane and
// frees it on the thread that takes it: mimalloc keeps those cross-thread
// frees cheap (the system allocator's arenas made them a quarter of the
// two-thread benchmark). Rust allocations only; Python's are its own.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    partitioner::register(m)?;
    dispatcher::register(m)?;
    version_table::register(m)?;
    version_batch::register(m)?;
    gc::register(m)?;
    coro::register(m)?;
    guard::register(m)?;
    Ok(())
}
