//! `DirectSockets`: sockets that the calling Python threads poll and send on themselves.

use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::curve::curve_role;
use crate::delivery::{batch_to_py, error_tuples, socket_spec, Deadline};
use crate::errors::io_closed;
use crate::iothread::build_message;
use crate::session::Session;

/// How long a send waits for a peer that is not taking messages.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Sockets without an I/O thread (see `fp_io::DirectSockets`).
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct DirectSockets {
    inner: fp_io::DirectSockets,
    session: Py<Session>,
}

impl DirectSockets {
    fn release_sent(&self) {
        drop(self.inner.releases.drain());
    }

    fn check_open(&self, py: Python<'_>) -> PyResult<()> {
        if self.inner.is_closed() {
            return Err(io_closed(py, "the sockets are closed".into()));
        }
        Ok(())
    }
}

#[pymethods]
impl DirectSockets {
    #[new]
    fn new(session: Bound<'_, Session>) -> PyResult<Self> {
        let core = session.get().core.clone();
        let inner = fp_io::DirectSockets::new(core).map_err(PyRuntimeError::new_err)?;
        Ok(DirectSockets {
            inner,
            session: session.unbind(),
        })
    }

    #[pyo3(signature = (name, kind, *, connect=None, bind=None, identity=None, raw=false,
                        linger_ms=1000, curve_serverkey=None, curve_publickey=None,
                        curve_secretkey=None, max_message_size=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_socket(
        &self,
        py: Python<'_>,
        name: &str,
        kind: &str,
        connect: Option<&Bound<'_, PyAny>>,
        bind: Option<&Bound<'_, PyAny>>,
        identity: Option<&Bound<'_, PyAny>>,
        raw: bool,
        linger_ms: i32,
        curve_serverkey: Option<&Bound<'_, PyAny>>,
        curve_publickey: Option<&Bound<'_, PyAny>>,
        curve_secretkey: Option<&Bound<'_, PyAny>>,
        max_message_size: Option<i64>,
    ) -> PyResult<Vec<String>> {
        self.check_open(py)?;
        let curve = curve_role(false, curve_serverkey, curve_publickey, curve_secretkey)?;
        let mut spec = socket_spec(name, kind, connect, bind, identity, raw, linger_ms, curve)?;
        spec.max_msg_size = max_message_size;
        let inner = &self.inner;
        py.detach(|| inner.add_socket(spec))
            .map_err(PyValueError::new_err)
    }

    /// Open an engine link to `endpoint` for socket `socket` (see `fp_io::DirectSockets::
    /// add_link`); ValueError says why it could not be opened.
    fn add_link(
        &self,
        py: Python<'_>,
        socket: &str,
        endpoint: &str,
        uuid: &str,
        timeout: f64,
    ) -> PyResult<()> {
        self.check_open(py)?;
        if !timeout.is_finite() || timeout < 0.0 {
            return Err(PyValueError::new_err("timeout must be a number >= 0"));
        }
        let inner = &self.inner;
        py.detach(|| inner.add_link(socket, endpoint, uuid, Duration::from_secs_f64(timeout)))
            .map_err(PyValueError::new_err)
    }

    /// `"none"` (no engine link), `"up"`, or `"lost"` (it closed: the controller considers
    /// this engine gone).
    #[getter]
    fn link(&self) -> &'static str {
        match self.inner.link_state() {
            fp_io::LINK_UP => "up",
            fp_io::LINK_LOST => "lost",
            _ => "none",
        }
    }

    /// Sign and send one message now (see the type stub).
    #[pyo3(signature = (socket, msg_type, content=None, parent=None, metadata=None, *,
                        ident=None, buffers=None, header=None, hold=false))]
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
        hold: bool,
    ) -> PyResult<()> {
        self.check_open(py)?;
        let session = self.session.bind(py).get();
        let (_, frames) = build_message(
            py, session, msg_type, content, parent, metadata, ident, buffers, header, None, false,
        )?;
        let inner = &self.inner;
        let sent = py.detach(|| inner.send(socket, frames, SEND_TIMEOUT, hold));
        self.release_sent();
        sent.map_err(PyValueError::new_err)
    }

    /// Messages held back by `send(..., hold=True)`.
    #[getter]
    fn held(&self) -> usize {
        self.inner.held()
    }

    /// Frames being sent from the memory of the Python objects given to `send` (buffers
    /// large enough not to be copied) that libzmq has not finished with: until this is 0,
    /// that memory must not change.
    #[getter]
    fn sending(&self) -> usize {
        self.release_sent();
        self.inner.releases.in_flight()
    }

    /// Send every held message now (in order).
    fn send_held(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        let sent = py.detach(|| inner.send_held(SEND_TIMEOUT));
        self.release_sent();
        sent.map_err(PyValueError::new_err)
    }

    /// Wait for messages (see the type stub).
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyList>> {
        let deadline = Deadline::new(timeout)?;
        let inner = &self.inner;
        loop {
            let slice = deadline.slice();
            let (batch, woken) = py
                .detach(|| inner.recv(slice))
                .map_err(|e| io_closed(py, e))?;
            self.release_sent();
            let (out, drops) = batch_to_py(py, batch)?;
            inner.report(drops);
            if out.len() > 0 {
                return Ok(out);
            }
            py.check_signals()?;
            // woken: return (empty) so that the caller can look at its queues
            if woken || deadline.passed() {
                return Ok(out);
            }
        }
    }

    /// Wait (without the GIL) until every connecting socket has completed a handshake with
    /// each of its endpoints; False after `timeout` seconds.
    fn wait_connected(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        if !timeout.is_finite() || timeout < 0.0 {
            return Err(PyValueError::new_err("timeout must be a number >= 0"));
        }
        let inner = &self.inner;
        py.detach(|| inner.wait_connected(Duration::from_secs_f64(timeout)))
            .map_err(|e| io_closed(py, e))
    }

    /// Sockets whose last handshake failed: `(socket, endpoint, reason)`.
    fn handshake_failures(&self) -> Vec<(String, String, String)> {
        self.inner.handshakes.failures()
    }

    /// Interrupt a `recv` waiting in another thread.
    fn wake(&self) {
        self.inner.wake();
    }

    /// Messages dropped since the last call: `(socket, error class, text)`.
    fn take_errors(&self) -> Vec<(String, &'static str, String)> {
        error_tuples(self.inner.take_drops())
    }

    /// Close every socket. Idempotent.
    fn close(&self, py: Python<'_>) {
        let inner = &self.inner;
        py.detach(|| inner.close());
        self.release_sent();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.close(py);
    }
}
