//! Borrowing Python buffer-protocol objects without copying.

use fp_io::ExternalBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// A held `Py_buffer`: the exporter keeps the memory valid and unchanged-in-place until release.
pub struct HeldBuffer {
    view: Box<ffi::Py_buffer>,
}

// SAFETY: the Py_buffer only points at memory that stays valid until PyBuffer_Release; the
// buffer is released in Drop, which acquires the GIL (and in practice runs where the GIL is held,
// because owners coming back from libzmq are parked in a ReleaseQueue drained under the GIL).
unsafe impl Send for HeldBuffer {}

impl HeldBuffer {
    /// Borrow the contiguous memory of `obj`.
    pub fn get(obj: &Bound<'_, PyAny>) -> PyResult<HeldBuffer> {
        for flags in [ffi::PyBUF_SIMPLE, ffi::PyBUF_ANY_CONTIGUOUS] {
            // SAFETY: a zeroed Py_buffer is a valid out-parameter for PyObject_GetBuffer.
            let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
            // SAFETY: obj is a live object (we hold the GIL via `obj`); view is writable.
            let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
            if rc == 0 {
                return Ok(HeldBuffer { view });
            }
            // Clear the error from the first attempt before trying the next flags.
            let _ = PyErr::take(obj.py());
        }
        Err(PyBufferError::new_err(format!(
            "a {} cannot be used as a message frame: frames must be contiguous buffer-protocol \
             objects (bytes, bytearray, memoryview, contiguous NumPy arrays); for arrays use \
             numpy.ascontiguousarray",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )))
    }

    pub fn as_slice(&self) -> &[u8] {
        let len = self.view.len.max(0) as usize;
        if len == 0 || self.view.buf.is_null() {
            return &[];
        }
        // SAFETY: buf/len describe the exporter's contiguous memory, valid while the view is held.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, len) }
    }
}

impl AsRef<[u8]> for HeldBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl ExternalBuffer for HeldBuffer {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for HeldBuffer {
    fn drop(&mut self) {
        Python::attach(|_py| {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released once.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) };
        });
    }
}
