//! `Frame`: a read-only Python buffer over a received ZMQ frame or data stream frame.

use fp_io::RecvFrame;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::raw::{c_int, c_void};

/// The memory of a received frame.
enum Received {
    Zmq(RecvFrame),
    /// Read from a data stream (`fp_io::stream`) straight into this allocation.
    Owned(Vec<u8>),
}

/// A received message frame, exposed through the buffer protocol without a copy.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct Frame {
    frame: Received,
}

impl Frame {
    pub fn new(frame: RecvFrame) -> Frame {
        Frame {
            frame: Received::Zmq(frame),
        }
    }

    pub fn owned(bytes: Vec<u8>) -> Frame {
        Frame {
            frame: Received::Owned(bytes),
        }
    }

    fn data(&self) -> &[u8] {
        match &self.frame {
            Received::Zmq(f) => f.as_ref(),
            Received::Owned(v) => v,
        }
    }
}

static FORMAT_B: &std::ffi::CStr = c"B";

/// Refuse a null `view` or a writable request (`why` says what to do instead).
pub(crate) fn check_readonly_request(
    view: *mut ffi::Py_buffer,
    flags: c_int,
    why: &'static str,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("null Py_buffer"));
    }
    if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
        return Err(PyBufferError::new_err(why));
    }
    Ok(())
}

/// Fill `view` as a read-only, one-dimensional buffer of `len` bytes at `ptr`, owned by `obj`.
///
/// # Safety
/// `view` must be a valid, writable `Py_buffer` given by CPython, and `ptr..ptr + len` must
/// stay valid and unchanged while `obj` lives (the view holds a strong reference to it).
pub(crate) unsafe fn fill_readonly_view(
    view: *mut ffi::Py_buffer,
    obj: Bound<'_, PyAny>,
    ptr: *const u8,
    len: usize,
    flags: c_int,
) {
    // SAFETY: as the caller guarantees (see above).
    unsafe {
        (*view).obj = obj.into_ptr();
        (*view).buf = ptr as *mut c_void;
        (*view).len = len as isize;
        (*view).readonly = 1;
        (*view).itemsize = 1;
        (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
            FORMAT_B.as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        (*view).ndim = 1;
        (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
            &mut (*view).len
        } else {
            std::ptr::null_mut()
        };
        (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
            &mut (*view).itemsize
        } else {
            std::ptr::null_mut()
        };
        (*view).suboffsets = std::ptr::null_mut();
        (*view).internal = std::ptr::null_mut();
    }
}

#[pymethods]
impl Frame {
    fn __len__(&self) -> usize {
        self.data().len()
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.data())
    }

    /// Address of the first byte of the frame's memory.
    #[getter]
    fn address(&self) -> usize {
        self.data().as_ptr() as usize
    }

    fn __repr__(&self) -> String {
        format!("<Frame {} bytes>", self.data().len())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match crate::pybuffer::HeldBuffer::get(other) {
            Ok(buf) => buf.as_slice() == self.data(),
            Err(_) => false,
        }
    }

    /// # Safety
    /// Called by CPython with a valid `view` pointer.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        check_readonly_request(
            view,
            flags,
            "received frames are read-only; copy the data (e.g. bytearray(frame)) to modify it",
        )?;
        let data = slf.get().data();
        let (ptr, len) = (data.as_ptr(), data.len());
        // SAFETY: `view` is valid (checked non-null, provided by CPython). The memory belongs to
        // the frame, which `view.obj` keeps alive (a strong reference) until the view is
        // released; a frozen pyclass never moves or mutates its frame.
        unsafe { fill_readonly_view(view, slf.into_any(), ptr, len, flags) };
        Ok(())
    }

    /// # Safety
    /// Called by CPython; nothing to free (the format string is static).
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
