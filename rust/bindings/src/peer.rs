//! Same-host transfers from another process's memory: `read_process_memory` and the address
//! of a buffer the sender lends (see `docs/decisions/0007-reading-peer-memory.md`).

use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

/// A held `Py_buffer` (released on drop; the GIL is taken for that).
struct View(Box<ffi::Py_buffer>);

impl View {
    fn get(obj: &Bound<'_, PyAny>, flags: std::os::raw::c_int, what: &str) -> PyResult<View> {
        // SAFETY: a zeroed Py_buffer is a valid out-parameter for PyObject_GetBuffer.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: obj is a live object (the GIL is held through `obj`); view is writable.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            let _ = PyErr::take(obj.py());
            return Err(PyBufferError::new_err(format!(
                "{what} must be a contiguous{} buffer (bytes-like or a C-contiguous NumPy array)",
                if flags & ffi::PyBUF_WRITABLE != 0 {
                    ", writable"
                } else {
                    ""
                }
            )));
        }
        Ok(View(view))
    }

    fn addr(&self) -> usize {
        self.0.buf as usize
    }

    fn len(&self) -> usize {
        self.0.len.max(0) as usize
    }
}

// SAFETY: the view points at memory its exporter keeps valid until PyBuffer_Release; it is
// moved into a GIL-released section of the thread that took it and released with the GIL.
unsafe impl Send for View {}

impl Drop for View {
    fn drop(&mut self) {
        Python::attach(|_py| {
            // SAFETY: filled by a successful PyObject_GetBuffer, released exactly once.
            unsafe { ffi::PyBuffer_Release(&mut *self.0) };
        });
    }
}

/// `(address, nbytes)` of the contiguous memory of `obj`. The address stays valid only while
/// the caller keeps `obj` (or a view of it) alive and unresized.
#[pyfunction]
pub fn buffer_address(obj: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let view = View::get(obj, ffi::PyBUF_ANY_CONTIGUOUS, "the lent buffer")?;
    Ok((view.addr(), view.len()))
}

/// Most threads one read uses.
const MAX_READ_THREADS: usize = 4;

/// Fill the writable buffer `dest` with `len(dest)` bytes read at address `addr` of process
/// `pid` (`process_vm_readv`, with the GIL released). Large reads are split over up to
/// `threads` threads (default: the CPUs this process may use, at most 4; see
/// `fp_io::read_process_memory_parallel`).
///
/// Raises `OSError` with the errno of the failure: ESRCH (the process is gone), EPERM (not
/// allowed to read it), EFAULT (the range is not mapped there).
#[pyfunction]
#[pyo3(signature = (pid, addr, dest, threads=None))]
pub fn read_process_memory(
    py: Python<'_>,
    pid: i64,
    addr: u64,
    dest: &Bound<'_, PyAny>,
    threads: Option<usize>,
) -> PyResult<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| PyValueError::new_err(format!("not a process id: {pid}")))?;
    let view = View::get(
        dest,
        ffi::PyBUF_WRITABLE | ffi::PyBUF_ANY_CONTIGUOUS,
        "dest",
    )?;
    let (ptr, len) = (view.addr(), view.len());
    let result = py.detach(move || {
        let dst: &mut [u8] = if len == 0 {
            &mut []
        } else {
            // SAFETY: the held writable view guarantees `len` bytes at `ptr` stay valid until
            // `view` drops (after this closure); nothing else in this call aliases them.
            unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
        };
        let limit = threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_READ_THREADS)
        });
        let n = fp_io::read_threads(dst.len(), limit);
        let r = fp_io::read_process_memory_parallel(pid, addr, dst, n);
        (r, view)
    });
    let (r, view) = result;
    drop(view);
    r.map_err(|e| {
        PyOSError::new_err((
            e.raw_os_error().unwrap_or(0),
            format!("cannot read {len} bytes of process {pid} at {addr:#x}: {e}"),
        ))
    })
}

/// Write the bytes of `src` to address `addr` of process `pid` (`process_vm_writev`).
///
/// Raises `OSError` as `read_process_memory` does.
#[pyfunction]
pub fn write_process_memory(pid: i64, addr: u64, src: &[u8]) -> PyResult<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| PyValueError::new_err(format!("not a process id: {pid}")))?;
    fp_io::write_process_memory(pid, addr, src).map_err(|e| {
        PyOSError::new_err((
            e.raw_os_error().unwrap_or(0),
            format!(
                "cannot write {} bytes to process {pid} at {addr:#x}: {e}",
                src.len()
            ),
        ))
    })
}
