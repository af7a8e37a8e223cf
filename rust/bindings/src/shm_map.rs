//! `SharedMapping`: a read-only mapping of a shared-memory segment that holds no descriptor.
//!
//! Python's `mmap.mmap` keeps a duplicate of the file descriptor for the mapping's lifetime
//! (until Python 3.13's `trackfd=False`), so every array received through shared memory held
//! one descriptor and a process ran out of them at about a thousand kept arrays. The kernel
//! needs no descriptor once the segment is mapped: this maps it, closes the descriptor at
//! once, and unmaps when the last view of the memory is released.

use pyo3::ffi;
use pyo3::prelude::*;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::ptr::NonNull;

use crate::frame::{check_readonly_request, fill_readonly_view};

/// A read-only mapping of a whole file (a `/dev/shm` segment), exposed through the buffer
/// protocol; unmapped when the object and every view of it are gone.
#[pyclass(frozen, weakref, module = "ferroparallel._core")]
pub struct SharedMapping {
    addr: Option<NonNull<u8>>,
    len: usize,
}

// SAFETY: the mapping is read-only shared memory owned by this object alone; the pointer is
// only read (through buffer views) and unmapped once, in Drop.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: concurrent readers of read-only memory are fine.
unsafe impl Sync for SharedMapping {}

#[pymethods]
impl SharedMapping {
    /// Map the file at `path` read-only; the descriptor is closed before this returns.
    /// Raises the matching `OSError` (e.g. `FileNotFoundError`) when it cannot be opened or
    /// mapped.
    #[new]
    fn new(path: &str) -> PyResult<SharedMapping> {
        let file = File::open(path)?; // O_RDONLY | O_CLOEXEC
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| PyErr::from(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        if len == 0 {
            return Ok(SharedMapping { addr: None, len: 0 });
        }
        // SAFETY: a fresh read-only shared mapping of an open file of `len` bytes; the kernel
        // keeps the mapping valid after the descriptor is closed (when `file` drops).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(SharedMapping {
            addr: NonNull::new(p.cast::<u8>()),
            len,
        })
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<SharedMapping {} bytes>", self.len)
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
            "shared-memory data is read-only; copy it (e.g. numpy.array(a)) to modify it",
        )?;
        let me = slf.get();
        let ptr = me
            .addr
            .map_or(NonNull::dangling().as_ptr(), NonNull::as_ptr);
        let len = me.len;
        // SAFETY: `view` is valid (non-null, from CPython); the mapping lives as long as this
        // object, which the view keeps alive, and a frozen pyclass never remaps it.
        unsafe { fill_readonly_view(view, slf.into_any(), ptr, len, flags) };
        Ok(())
    }

    /// # Safety
    /// Called by CPython; nothing to free per view (the mapping goes with the object).
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        if let Some(p) = self.addr.take() {
            // SAFETY: `p`/`len` are the mapping made in `new`, unmapped only here, once; no
            // view outlives this object (each holds a reference to it).
            unsafe { libc::munmap(p.as_ptr().cast(), self.len) };
        }
    }
}
