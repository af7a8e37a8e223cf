//! What the two Python socket classes (`IoThread`, `DirectSockets`) share: receive deadlines
//! sliced for Ctrl-C, received messages as Python objects, drop reports, socket specs.

use std::time::{Duration, Instant};

use fp_io::{Curve, Delivery, DropReport, Incoming, SocketKind, SocketSpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::convert::message_dict;
use crate::frame::Frame;
use crate::iothread::strings;
use crate::pybuffer::HeldBuffer;

/// Longest single wait without checking for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// When a `recv(timeout)` gives up (`None`: never), waited for in slices.
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// ValueError for a negative or non-finite timeout.
    pub(crate) fn new(timeout: Option<f64>) -> PyResult<Deadline> {
        match timeout {
            Some(t) if !t.is_finite() || t < 0.0 => Err(PyValueError::new_err(
                "timeout must be None or a number >= 0",
            )),
            Some(t) => Ok(Deadline(Some(Instant::now() + Duration::from_secs_f64(t)))),
            None => Ok(Deadline(None)),
        }
    }

    /// How long the next wait may be (at most [`SIGNAL_SLICE`]).
    pub(crate) fn slice(&self) -> Duration {
        match self.0 {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_SLICE),
            None => SIGNAL_SLICE,
        }
    }

    pub(crate) fn passed(&self) -> bool {
        self.0.is_some_and(|d| Instant::now() >= d)
    }
}

/// Received messages as `(socket, message)` tuples; those whose values have no Python
/// equivalent (e.g. an unhashable map key) are dropped and returned as reports, like any
/// other bad message.
pub(crate) fn batch_to_py(
    py: Python<'_>,
    batch: Vec<Incoming>,
) -> PyResult<(Bound<'_, PyList>, Vec<DropReport>)> {
    let out = PyList::empty(py);
    let mut drops = Vec::new();
    for inc in batch {
        let socket = inc.socket.clone();
        match incoming_to_py(py, inc) {
            Ok(item) => out.append(item)?,
            Err(e) => drops.push(DropReport {
                socket,
                kind: "UnpackError",
                text: e.value(py).to_string(),
            }),
        }
    }
    Ok((out, drops))
}

/// Drop reports as `take_errors()` returns them: `(socket, error class, text)`.
pub(crate) fn error_tuples(drops: Vec<DropReport>) -> Vec<(String, &'static str, String)> {
    drops
        .into_iter()
        .map(|d| (d.socket.to_string(), d.kind, d.text))
        .collect()
}

/// The options both socket classes take, as a spec.
#[allow(clippy::too_many_arguments)]
pub(crate) fn socket_spec(
    name: &str,
    kind: &str,
    connect: Option<&Bound<'_, PyAny>>,
    bind: Option<&Bound<'_, PyAny>>,
    identity: Option<&Bound<'_, PyAny>>,
    raw: bool,
    linger_ms: i32,
    curve: Option<Curve>,
) -> PyResult<SocketSpec> {
    let kind = SocketKind::from_name(kind).map_err(PyValueError::new_err)?;
    let mut spec = SocketSpec::new(name, kind);
    spec.connect = strings(connect)?;
    spec.bind = strings(bind)?;
    spec.identity = match identity {
        Some(i) if !i.is_none() => Some(HeldBuffer::get(i)?.as_slice().to_vec()),
        _ => None,
    };
    spec.raw = raw;
    spec.linger_ms = linger_ms;
    spec.curve = curve;
    Ok(spec)
}

/// A received message as the `(socket, message)` tuple handed to Python.
fn incoming_to_py<'py>(py: Python<'py>, inc: Incoming) -> PyResult<Bound<'py, PyTuple>> {
    let name = inc.socket.as_ref();
    let obj = match inc.delivery {
        Delivery::Raw(frames) => {
            let list = PyList::empty(py);
            for f in frames {
                list.append(Py::new(py, Frame::new(f))?)?;
            }
            list.into_any()
        }
        Delivery::Message {
            idents,
            parts,
            buffers,
            header,
        } => {
            let id_list = PyList::empty(py);
            for id in &idents {
                id_list.append(PyBytes::new(py, id.as_ref()))?;
            }
            let buf_list = PyList::empty(py);
            for b in buffers {
                buf_list.append(Py::new(py, Frame::new(b))?)?;
            }
            message_dict(py, id_list, &parts, true, buf_list, header.as_deref())?.into_any()
        }
    };
    PyTuple::new(py, [name.into_pyobject(py)?.into_any(), obj])
}
