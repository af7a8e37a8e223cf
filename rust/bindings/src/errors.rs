//! Mapping Rust errors to the Python classes of `ferroparallel.error`.

use fp_wire::WireError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// An exception of class `name` from `ferroparallel.error` (ValueError if unavailable).
pub fn error_class(py: Python<'_>, name: &str, message: String) -> PyErr {
    let class = py
        .import("ferroparallel.error")
        .and_then(|m| m.getattr(name));
    match class {
        Ok(cls) => match cls.call1((message.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(_) => PyValueError::new_err(message),
    }
}

/// A wire error as the matching `ferroparallel.error` exception.
pub fn wire_error(py: Python<'_>, e: WireError) -> PyErr {
    error_class(py, e.kind(), e.to_string())
}

/// The I/O thread is gone.
pub fn io_closed(py: Python<'_>, message: String) -> PyErr {
    let err = error_class(py, "IoClosedError", message.clone());
    if err.is_instance_of::<PyValueError>(py) {
        return PyRuntimeError::new_err(message);
    }
    err
}
