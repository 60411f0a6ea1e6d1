//! `keylane._native`: the Python face of keylane-core. Each exposed type or
//! group of functions has its own file; this one only assembles the module.

mod args;
mod dispatcher;
mod errors;
mod partitioner;
mod ticket;
mod version_batch;
mod version_table;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    partitioner::register(m)?;
    dispatcher::register(m)?;
    version_table::register(m)?;
    version_batch::register(m)?;
    Ok(())
}
