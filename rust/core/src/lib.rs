//! keylane's core: everything that decides *what* may run and *what* may be
//! committed lives here, in plain Rust with no Python in sight. The
//! `keylane-py` crate is a thin binding over it.

pub mod dispatch;
pub mod error;
pub mod guard;
pub mod partitioner;
mod sync;
pub mod versions;
pub mod watermark;

pub use error::{Error, Result};
