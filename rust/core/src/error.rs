//! The one error type of the core. The Python binding maps each variant to a
//! `keylane.KeylaneError` subclass in a single `From` impl, so a new variant
//! here is a compile error there until it is given a Python class.

/// Everything the core can refuse or fail at. Each message says what was
/// wrong and, where there is one, what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument is outside its allowed range (a zero partition count, an
    /// empty key set, ...).
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
