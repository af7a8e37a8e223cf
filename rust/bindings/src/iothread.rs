//! `IoThread`: the per-process native I/O thread, exposed to Python.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fp_io::{IoHandle, OutFrame, OutgoingMessage, Waiter};

use crate::curve::curve_role;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::convert::to_py;
use crate::delivery::{batch_to_py, error_tuples, socket_spec, Deadline};
use crate::errors::{io_closed, wire_error};
use crate::pybuffer::HeldBuffer;
use crate::session::{ident_list, out_buffers, out_buffers_tracked, Session};
use crate::tracker::SendTracker;

const ADD_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffers at least this large (in total) are digested with the GIL released.
const DETACH_BYTES: usize = 1 << 20;

/// A native thread that owns ZMQ sockets for this process.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct IoThread {
    handle: IoHandle,
    session: Py<Session>,
}

impl IoThread {
    /// Drop (under the GIL) every borrowed buffer libzmq has finished with.
    fn release_sent(&self) {
        drop(self.handle.releases.drain());
    }

    fn check_open(&self, py: Python<'_>) -> PyResult<()> {
        if self.handle.is_closed() {
            return Err(io_closed(py, "the I/O thread is closed".into()));
        }
        Ok(())
    }
}

/// Sign and frame one message; returns its header when `want_header` (the caller's own
/// object when it passed one: no second conversion) and the frames. `parent` is a header
/// dict, or a header packed with the session's packer (`bytes`, e.g. a request's header as
/// received, [`crate::convert::PACKED_HEADER_KEY`]), sent as it is.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_message<'py>(
    py: Python<'py>,
    session: &Session,
    msg_type: &str,
    content: Option<&Bound<'py, PyAny>>,
    parent: Option<&Bound<'py, PyAny>>,
    metadata: Option<&Bound<'py, PyAny>>,
    ident: Option<&Bound<'py, PyAny>>,
    buffers: Option<&Bound<'py, PyAny>>,
    header: Option<&Bound<'py, PyAny>>,
    tracker: Option<&SendTracker>,
    want_header: bool,
) -> PyResult<(Option<Bound<'py, PyAny>>, Vec<OutFrame>)> {
    let packed_parent = match parent {
        Some(p) => p.cast::<PyBytes>().ok().map(|b| b.as_bytes().to_vec()),
        None => None,
    };
    let parent = if packed_parent.is_some() {
        None
    } else {
        parent
    };
    let parts = session.parts(msg_type, content, parent, metadata, header)?;
    let header_obj = if !want_header {
        None
    } else {
        Some(match header {
            Some(h) if !h.is_none() => h.clone(),
            _ => to_py(py, &parts.header)?,
        })
    };
    let msg = OutgoingMessage {
        idents: ident_list(ident)?,
        parts,
        buffers: out_buffers_tracked(buffers, tracker.map(|t| &t.state))?,
    };
    // Digesting large buffers takes a while: do it without holding the GIL.
    let large = session.core.sign_buffers
        && msg.buffers.iter().map(OutFrame::len).sum::<usize>() >= DETACH_BYTES;
    let core = &session.core;
    let frames = if large {
        py.detach(|| core.build_frames_with_parent(msg, packed_parent))
    } else {
        core.build_frames_with_parent(msg, packed_parent)
    }
    .map_err(|e| wire_error(py, e))?;
    Ok((header_obj, frames))
}

pub(crate) fn strings(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(s) = obj.extract::<String>() {
        return Ok(vec![s]);
    }
    obj.try_iter()?.map(|i| i?.extract::<String>()).collect()
}

#[pymethods]
impl IoThread {
    #[new]
    #[pyo3(signature = (session, *, name="ferroparallel-io"))]
    fn new(session: Bound<'_, Session>, name: &str) -> PyResult<Self> {
        let core = session.get().core.clone();
        let handle = IoHandle::spawn(core, name).map_err(PyRuntimeError::new_err)?;
        Ok(IoThread {
            handle,
            session: session.unbind(),
        })
    }

    /// The session this thread signs and verifies with.
    #[getter]
    fn session(&self, py: Python<'_>) -> Py<Session> {
        self.session.clone_ref(py)
    }

    #[pyo3(signature = (name, kind, *, connect=None, bind=None, identity=None, subscribe=None,
                        raw=false, linger_ms=1000, forward_to=None, curve_server=false,
                        curve_serverkey=None, curve_publickey=None, curve_secretkey=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_socket(
        &self,
        py: Python<'_>,
        name: &str,
        kind: &str,
        connect: Option<&Bound<'_, PyAny>>,
        bind: Option<&Bound<'_, PyAny>>,
        identity: Option<&Bound<'_, PyAny>>,
        subscribe: Option<&Bound<'_, PyAny>>,
        raw: bool,
        linger_ms: i32,
        forward_to: Option<String>,
        curve_server: bool,
        curve_serverkey: Option<&Bound<'_, PyAny>>,
        curve_publickey: Option<&Bound<'_, PyAny>>,
        curve_secretkey: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<String>> {
        self.check_open(py)?;
        let curve = curve_role(
            curve_server,
            curve_serverkey,
            curve_publickey,
            curve_secretkey,
        )?;
        let mut spec = socket_spec(name, kind, connect, bind, identity, raw, linger_ms, curve)?;
        spec.subscribe = match subscribe {
            Some(s) if !s.is_none() => Some(
                s.try_iter()?
                    .map(|t| Ok(HeldBuffer::get(&t?)?.as_slice().to_vec()))
                    .collect::<PyResult<_>>()?,
            ),
            _ => None,
        };
        spec.forward_to = forward_to;
        let handle = &self.handle;
        py.detach(|| handle.add_socket(spec, ADD_SOCKET_TIMEOUT))
            .map_err(PyValueError::new_err)
    }

    /// Queue one message; returns its header.
    #[pyo3(signature = (socket, msg_type, content=None, parent=None, metadata=None, *,
                        ident=None, buffers=None, header=None, tracker=None))]
    #[allow(clippy::too_many_arguments)]
    fn send<'py>(
        &self,
        py: Python<'py>,
        socket: &str,
        msg_type: &str,
        content: Option<&Bound<'py, PyAny>>,
        parent: Option<&Bound<'py, PyAny>>,
        metadata: Option<&Bound<'py, PyAny>>,
        ident: Option<&Bound<'py, PyAny>>,
        buffers: Option<&Bound<'py, PyAny>>,
        header: Option<&Bound<'py, PyAny>>,
        tracker: Option<PyRef<'py, SendTracker>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check_open(py)?;
        let session = self.session.bind(py).get();
        let (header_obj, frames) = build_message(
            py,
            session,
            msg_type,
            content,
            parent,
            metadata,
            ident,
            buffers,
            header,
            tracker.as_deref(),
            true,
        )?;
        self.handle
            .send(socket, frames)
            .map_err(PyValueError::new_err)?;
        self.release_sent();
        Ok(header_obj.expect("asked for the header"))
    }

    /// Queue frames exactly as given.
    fn send_raw(&self, py: Python<'_>, socket: &str, frames: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open(py)?;
        let out = out_buffers(Some(frames))?;
        self.handle
            .send(socket, out)
            .map_err(PyValueError::new_err)?;
        self.release_sent();
        Ok(())
    }

    /// Wait for received messages (see the type stub).
    #[pyo3(signature = (timeout=None, max_messages=10000, since=None))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
        max_messages: usize,
        since: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let deadline = Deadline::new(timeout)?;
        let inbox = self.handle.inbox.clone();
        let waiter = match since {
            Some(since) => Waiter::Priority { since },
            None => Waiter::Plain,
        };
        loop {
            let slice = deadline.slice();
            let handle = &self.handle;
            let taken = py.detach(|| match waiter {
                // a waiting thread receives for itself (see IoHandle::wait_priority)
                Waiter::Priority { since } => handle.wait_priority(slice, max_messages, since),
                Waiter::Plain => inbox.wait_batch_as(slice, max_messages, waiter),
            });
            let (batch, closed) = (taken.batch, taken.closed);
            self.release_sent();
            if !batch.is_empty() {
                let (out, drops) = batch_to_py(py, batch)?;
                if !drops.is_empty() {
                    self.handle
                        .stats
                        .dropped
                        .fetch_add(drops.len() as u64, Relaxed);
                    self.handle.inbox.report(drops);
                }
                if out.len() > 0 {
                    return Ok(out);
                }
                continue;
            }
            if closed {
                return Err(io_closed(py, "the I/O thread is closed".into()));
            }
            if taken.woken {
                return Ok(PyList::empty(py));
            }
            py.check_signals()?;
            if deadline.passed() {
                return Ok(PyList::empty(py));
            }
        }
    }

    /// The inbox generation, for `recv(since=...)` (see the type stub).
    fn generation(&self) -> u64 {
        self.handle.inbox.generation()
    }

    /// Bump the inbox generation: `recv(since=g)` calls with an older `g` return at once.
    fn wake(&self) {
        self.handle.inbox.wake();
        self.handle.wake_loop(); // a thread receiving for itself polls the sockets
    }

    /// Hold back messages sent in a quick succession and send them together (see the type
    /// stub); off by default.
    fn batch_sends(&self, on: bool) {
        self.handle.set_batching(on);
    }

    /// Open a link to the controller (see the type stub); ValueError says why it could not.
    fn add_link(&self, py: Python<'_>, endpoint: &str, ident: &str, timeout: f64) -> PyResult<()> {
        if !timeout.is_finite() || timeout < 0.0 {
            return Err(PyValueError::new_err("timeout must be a number >= 0"));
        }
        let handle = &self.handle;
        py.detach(|| handle.add_link(endpoint, ident, Duration::from_secs_f64(timeout)))
            .map_err(PyValueError::new_err)
    }

    /// Whether the `mux` and `task` traffic goes over a link to the controller.
    #[getter]
    fn link_up(&self) -> bool {
        self.handle.link_up()
    }

    /// Sockets whose last handshake failed: `(socket, endpoint, reason)`.
    fn handshake_failures(&self) -> Vec<(String, String, String)> {
        self.handle.handshakes.failures()
    }

    /// Messages dropped since the last call: `(socket, error class, text)`.
    fn take_errors(&self) -> Vec<(String, &'static str, String)> {
        error_tuples(self.handle.inbox.take_drops())
    }

    /// Counters: sent, received, dropped, send_errors, forwarded, pending (undelivered).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.handle.stats;
        let d = PyDict::new(py);
        d.set_item("sent", s.sent.load(Relaxed))?;
        d.set_item("received", s.received.load(Relaxed))?;
        d.set_item("dropped", s.dropped.load(Relaxed))?;
        d.set_item("send_errors", s.send_errors.load(Relaxed))?;
        d.set_item("forwarded", s.forwarded.load(Relaxed))?;
        d.set_item("pending", self.handle.inbox.pending())?;
        d.set_item("unreleased", self.handle.releases.len())?;
        d.set_item("sending", self.handle.releases.in_flight())?;
        Ok(d)
    }

    /// Stop the thread and close every socket. Idempotent.
    fn close(&self, py: Python<'_>) {
        let handle = &self.handle;
        py.detach(|| handle.close());
        self.release_sent();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.handle.is_closed()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.close(py);
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.handle.close();
        drop(self.handle.releases.drain());
    }
}
