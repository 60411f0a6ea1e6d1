//! The single place where errors become Python exceptions. The classes live
//! in `keylane/errors.py` so that each can inherit from both `KeylaneError`
//! and the right built-in (`ValueError`, `TypeError`, ...), which a class
//! created from Rust cannot.

use keylane_core::Error as CoreError;
use pyo3::PyErr;
use pyo3::import_exception;

import_exception!(keylane.errors, InvalidArgument);
import_exception!(keylane.errors, InvalidType);
import_exception!(keylane.errors, OffsetOrderError);
import_exception!(keylane.errors, QueueFull);
import_exception!(keylane.errors, ConcurrentPushError);
import_exception!(keylane.errors, TicketError);
import_exception!(keylane.errors, StoreError);
import_exception!(keylane.errors, StoreFull);
import_exception!(keylane.errors, StoreFormatError);

/// What a binding function can fail with: a core error, or an exception
/// already raised on the Python side (a failing iterator, a bad `__index__`).
#[derive(Debug)]
pub(crate) enum Error {
    Core(CoreError),
    Py(PyErr),
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Core(e)
    }
}

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Self {
        Error::Py(e)
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Py(e) => e,
            Error::Core(e) => {
                // A batch error reads "batch entry N: ..." but is raised as
                // the class of what was wrong with the entry.
                let msg = e.to_string();
                match e.root() {
                    CoreError::InvalidArgument(_) => InvalidArgument::new_err(msg),
                    CoreError::OffsetOrder { .. } => OffsetOrderError::new_err(msg),
                    CoreError::QueueFull { .. } => QueueFull::new_err(msg),
                    CoreError::ConcurrentPush { .. } => ConcurrentPushError::new_err(msg),
                    CoreError::ForeignTicket => TicketError::new_err(msg),
                    CoreError::StoreFull { .. } => StoreFull::new_err(msg),
                    CoreError::StoreFormat(_) => StoreFormatError::new_err(msg),
                    CoreError::Store(_) => StoreError::new_err(msg),
                    CoreError::InBatch { .. } => unreachable!("root() unwraps batch errors"),
                }
            }
        }
    }
}

impl Error {
    /// The same error, its message prefixed with the batch entry it is about.
    pub(crate) fn in_batch(self, py: pyo3::Python<'_>, index: usize) -> Error {
        let err: PyErr = self.into();
        let ty = err.get_type(py);
        let msg = format!("batch entry {index}: {}", err.value(py));
        Error::Py(PyErr::from_type(ty, msg))
    }
}

/// A ticket used twice or given to the wrong dispatcher.
pub(crate) fn ticket_error(msg: impl Into<String>) -> Error {
    Error::Py(TicketError::new_err(msg.into()))
}

/// A storage failure found by the binding (a closed table).
pub(crate) fn store_error(msg: impl Into<String>) -> Error {
    Error::Py(StoreError::new_err(msg.into()))
}

/// A bad value found by the binding's own argument checks.
pub(crate) fn invalid_argument(msg: impl Into<String>) -> Error {
    Error::Py(InvalidArgument::new_err(msg.into()))
}

/// A bad type found by the binding's own argument checks.
pub(crate) fn invalid_type(msg: impl Into<String>) -> Error {
    Error::Py(InvalidType::new_err(msg.into()))
}
