//! `DataListener` and `DataStream`: the direct data stream of `fp_io::stream` for Python
//! (decision 0016). Every blocking call runs without the GIL and wakes up every quarter of a
//! second to take signals (Ctrl-C), an `abandon()` callback and `close()` from another thread.

use crate::frame::Frame;
use crate::pybuffer::HeldBuffer;
use crate::session::Session;
use fp_io::stream::{self, Limits, LoanDigest as LoanDigestCore, MacFor, StreamError};
use pyo3::exceptions::{
    PyConnectionError, PyEOFError, PyInterruptedError, PyOSError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn seconds(timeout: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(PyValueError::new_err(format!(
            "{what} must be a finite number of seconds >= 0 or None, not {t}"
        ))),
    }
}

fn stream_error(e: StreamError, peer: &str) -> PyErr {
    let text = format!("data stream {peer}: {e}");
    match e {
        StreamError::Closed { at_start: true } => PyEOFError::new_err(text),
        StreamError::Closed { at_start: false } => PyConnectionError::new_err(text),
        StreamError::Timeout => PyTimeoutError::new_err(text),
        StreamError::Stopped(_) => PyInterruptedError::new_err(text),
        StreamError::Malformed(_) | StreamError::BadMac(_) => PyValueError::new_err(text),
        StreamError::Io(_) => PyOSError::new_err(text),
    }
}

/// A listening TCP socket of a data server.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct DataListener {
    listener: TcpListener,
    endpoint: String,
    closed: AtomicBool,
}

#[pymethods]
impl DataListener {
    /// Listen on `host`, any free port.
    #[new]
    fn new(host: &str) -> PyResult<DataListener> {
        let (listener, endpoint) = stream::listen(host)
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {host}: {e}")))?;
        Ok(DataListener {
            listener,
            endpoint,
            closed: AtomicBool::new(false),
        })
    }

    /// `tcp://host:port`.
    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The next connection, or None after `timeout` seconds or once closed.
    fn accept(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<DataStream>> {
        let timeout = seconds(Some(timeout), "timeout")?.unwrap_or_default();
        let deadline = Instant::now() + timeout;
        loop {
            if self.closed() {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.min(stream::TICK);
            match py.detach(|| stream::accept(&self.listener, slice)) {
                Ok(Some(s)) => return Ok(Some(DataStream::new(s))),
                Ok(None) if left <= slice => return Ok(None),
                Ok(None) => py.check_signals()?,
                Err(_) if self.closed() => return Ok(None),
                Err(e) => return Err(PyOSError::new_err(format!("accept failed: {e}"))),
            }
        }
    }

    /// Stop accepting (a waiting `accept` returns None).
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // SAFETY: shutting down our own open listening descriptor; it stays open (closed
            // when the object is dropped), only its queue stops.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// One connection of the data stream (see `fp_io::stream` for the format).
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct DataStream {
    stream: TcpStream,
    peer: String,
    closed: AtomicBool,
}

impl DataStream {
    fn new(stream: TcpStream) -> DataStream {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        DataStream {
            stream,
            peer,
            closed: AtomicBool::new(false),
        }
    }

    /// Run `f` without the GIL; its tick takes signals, `abandon()` and `close()`.
    fn blocking<T: Send>(
        &self,
        py: Python<'_>,
        abandon: Option<Py<PyAny>>,
        f: impl FnOnce(&mut dyn FnMut() -> Result<(), StreamError>) -> Result<T, StreamError> + Send,
    ) -> PyResult<T> {
        let mut raised: Option<PyErr> = None;
        // signals are only taken on the main thread: other threads (a data server's) never
        // need the GIL while they wait
        // SAFETY: plain system calls without arguments.
        let main_thread = unsafe { libc::gettid() == libc::getpid() };
        let attach = main_thread || abandon.is_some();
        let result = py.detach(|| {
            let mut tick = || -> Result<(), StreamError> {
                if self.closed.load(Ordering::Acquire) {
                    return Err(StreamError::Stopped("closed".into()));
                }
                // SAFETY: a query without arguments, valid at any time.
                if !attach || unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
                    return Ok(());
                }
                Python::attach(|py| {
                    if let Err(e) = py.check_signals() {
                        raised = Some(e);
                        return Err(StreamError::Stopped("interrupted".into()));
                    }
                    if let Some(a) = &abandon {
                        match a.call0(py).and_then(|v| v.is_truthy(py)) {
                            Ok(false) => {}
                            Ok(true) => return Err(StreamError::Stopped("abandoned".into())),
                            Err(e) => {
                                raised = Some(e);
                                return Err(StreamError::Stopped("abandon() failed".into()));
                            }
                        }
                    }
                    Ok(())
                })
            };
            f(&mut tick)
        });
        if let Some(e) = raised {
            return Err(e);
        }
        result.map_err(|e| stream_error(e, &self.peer))
    }
}

fn stream_key(session: Option<&Bound<'_, Session>>) -> Option<fp_wire::StreamKey> {
    session?.get().core.stream_key()
}

/// The digest of one loan's buffers, shared by every `DataStream.send` of them (decision
/// 0016, 2026-12 amendment): the buffers are hashed once, however many peers fetch them.
#[pyclass(frozen, module = "ferroparallel._core")]
#[derive(Default)]
pub struct LoanDigest {
    inner: LoanDigestCore,
}

#[pymethods]
impl LoanDigest {
    #[new]
    fn new() -> LoanDigest {
        LoanDigest::default()
    }

    /// How many times the buffers were hashed for the sends that shared this object.
    #[getter]
    fn times_hashed(&self) -> u32 {
        self.inner.times_hashed()
    }
}

#[pymethods]
impl DataStream {
    /// Connect to `tcp://host:port` within `timeout` seconds.
    #[staticmethod]
    fn connect(py: Python<'_>, endpoint: &str, timeout: f64) -> PyResult<DataStream> {
        let timeout = seconds(Some(timeout), "timeout")?.unwrap_or_default();
        let endpoint_owned = endpoint.to_owned();
        let stream = py
            .detach(move || stream::connect(&endpoint_owned, timeout))
            .map_err(|e| match e {
                StreamError::Io(io) => PyConnectionError::new_err(format!(
                    "cannot connect to the data endpoint {endpoint}: {io}"
                )),
                other => stream_error(other, endpoint),
            })?;
        Ok(DataStream::new(stream))
    }

    /// Send one message of `frames` (not copied). With a keyed `session`, the frames' MAC for
    /// `mac_context` follows them; their digest is computed on another thread while they are
    /// written, or taken from `digest` (a `LoanDigest` shared by the sends of the same
    /// buffers: computed by the first of them).
    #[pyo3(signature = (frames, *, session=None, mac_context=None, timeout=None, digest=None))]
    fn send(
        &self,
        py: Python<'_>,
        frames: &Bound<'_, PyAny>,
        session: Option<&Bound<'_, Session>>,
        mac_context: Option<&str>,
        timeout: Option<f64>,
        digest: Option<&Bound<'_, LoanDigest>>,
    ) -> PyResult<()> {
        let deadline = seconds(timeout, "timeout")?.map(|t| Instant::now() + t);
        let held: Vec<HeldBuffer> = frames
            .try_iter()?
            .map(|f| HeldBuffer::get(&f?))
            .collect::<PyResult<_>>()?;
        let slices: Vec<&[u8]> = held.iter().map(HeldBuffer::as_slice).collect();
        let key = stream_key(session);
        let context = mac_context.unwrap_or("").as_bytes();
        let mac = key.as_ref().map(|key| MacFor { key, context });
        let loan = digest.map(|d| &d.get().inner);
        let sent = self.blocking(py, None, |tick| {
            stream::send_message(&self.stream, &slices, mac, loan, deadline, tick)
        });
        drop(slices);
        drop(held); // released under the GIL
        sent
    }

    /// Receive one message: a list of read-only `Frame`s. It may announce at most `max_bytes`
    /// and `max_frames`; with a keyed `session` it must carry the MAC for `mac_context`.
    /// `timeout` (seconds, None: no limit) bounds the whole message, `message_timeout` the time
    /// from its first byte to its last; `abandon()`, asked every
    /// quarter of a second while waiting, returning true gives up (InterruptedError).
    #[pyo3(signature = (*, max_bytes, max_frames=65536, timeout=None, message_timeout=None,
                        session=None, mac_context=None, abandon=None))]
    #[allow(clippy::too_many_arguments)]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        max_bytes: u64,
        max_frames: u32,
        timeout: Option<f64>,
        message_timeout: Option<f64>,
        session: Option<&Bound<'py, Session>>,
        mac_context: Option<&str>,
        abandon: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let deadline = seconds(timeout, "timeout")?.map(|t| Instant::now() + t);
        let limits = Limits {
            max_bytes,
            max_frames,
            message_time: seconds(message_timeout, "message_timeout")?,
        };
        let key = stream_key(session);
        let context = mac_context.unwrap_or("").as_bytes();
        let mac = key.as_ref().map(|key| MacFor { key, context });
        let frames = self.blocking(py, abandon, |tick| {
            stream::recv_message(&self.stream, limits, mac, deadline, tick)
        })?;
        let out = PyList::empty(py);
        for f in frames {
            out.append(Py::new(py, Frame::owned(f))?)?;
        }
        Ok(out)
    }

    /// Close the connection (a transfer in progress on another thread fails).
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `host:port` of the other end.
    #[getter]
    fn peer(&self) -> &str {
        &self.peer
    }

    fn __repr__(&self) -> String {
        format!("<DataStream to {}>", self.peer)
    }
}
