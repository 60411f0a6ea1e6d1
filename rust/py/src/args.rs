//! Argument conversion shared by every exposed type: keys and integers.
//! The rules are the Python API's contract, so they live in one place.

use std::borrow::Cow;

use pyo3::exceptions::{PyOverflowError, PyUnicodeEncodeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyMemoryView, PyString};

use crate::errors::{Result, invalid_argument, invalid_type};

/// The bytes of a key: borrowed from `bytes` and `str` (the common cases,
/// no copy), copied from the mutable or view types.
pub(crate) type KeyBytes<'a> = Cow<'a, [u8]>;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "<unknown>".to_owned())
}

/// The bytes Kafka would hash for `obj`: `bytes`, `bytearray`, a
/// C-contiguous `memoryview`, or `str` (UTF-8). Anything else, including
/// `None`, is a `TypeError` naming the type.
pub(crate) fn key_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> Result<KeyBytes<'a>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return match s.to_str() {
            Ok(text) => Ok(Cow::Borrowed(text.as_bytes())),
            Err(e) if e.is_instance_of::<PyUnicodeEncodeError>(obj.py()) => Err(invalid_argument(format!(
                "key str cannot be encoded as UTF-8 ({e}); pass the key as bytes instead"
            ))),
            Err(e) => Err(e.into()),
        };
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Cow::Owned(b.to_vec()));
    }
    if obj.cast::<PyMemoryView>().is_ok() {
        if !obj.getattr("c_contiguous")?.extract::<bool>()? {
            return Err(invalid_type(
                "key memoryview must be C-contiguous; pass bytes(view) to hash its logical bytes",
            ));
        }
        let data = obj.call_method0("tobytes")?;
        let data = data.cast::<PyBytes>().map_err(PyErr::from)?;
        return Ok(Cow::Owned(data.as_bytes().to_vec()));
    }
    Err(invalid_type(format!("key must be bytes, bytearray, memoryview or str, not {}", type_name(obj))))
}

/// An integer argument, named `what` in messages. `bool` is refused even
/// though it is an `int` subclass: `True` partitions is always a bug.
/// Objects with `__index__` (numpy integers) are accepted.
pub(crate) fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> Result<i64> {
    if obj.cast::<PyBool>().is_ok() {
        return Err(invalid_type(format!("{what} must be an int, not bool")));
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(invalid_argument(format!(
            "{what} is out of range: {}",
            obj.str().map(|s| s.to_string()).unwrap_or_default()
        ))),
        Err(_) => Err(invalid_type(format!("{what} must be an int, not {}", type_name(obj)))),
    }
}
