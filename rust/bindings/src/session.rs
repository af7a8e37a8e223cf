//! `Session`: signing, packing and header creation, exposed to Python.

use std::sync::Arc;

use fp_io::{OutFrame, SessionCore};
use fp_wire::{Limits, Packer, Parts, Value, DELIMITER};
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::convert::{message_dict, to_map_value, to_py, to_value};
use crate::errors::wire_error;
use crate::pybuffer::HeldBuffer;

/// Message signing, packing and header creation for one session.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct Session {
    pub core: Arc<SessionCore>,
    /// The header values that never change, as Python strings made once (`msg_header`).
    username_py: Py<PyString>,
    session_py: Py<PyString>,
}

/// Key given as bytes or str.
fn key_bytes(key: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u8>> {
    match key {
        None => Ok(Vec::new()),
        Some(k) if k.is_none() => Ok(Vec::new()),
        Some(k) => {
            if let Ok(s) = k.cast::<PyString>() {
                return Ok(s.to_str()?.as_bytes().to_vec());
            }
            if let Ok(b) = k.cast::<PyBytes>() {
                return Ok(b.as_bytes().to_vec());
            }
            Err(PyTypeError::new_err("key must be bytes or str"))
        }
    }
}

/// Idents given as one bytes object or a sequence of them.
pub fn ident_list(ident: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Vec<u8>>> {
    let Some(ident) = ident else {
        return Ok(Vec::new());
    };
    if ident.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(b) = ident.cast::<PyBytes>() {
        return Ok(vec![b.as_bytes().to_vec()]);
    }
    if let Ok(s) = ident.cast::<PyString>() {
        return Ok(vec![s.to_str()?.as_bytes().to_vec()]);
    }
    let mut out = Vec::new();
    for item in ident.try_iter()? {
        let item = item?;
        if let Ok(s) = item.cast::<PyString>() {
            out.push(s.to_str()?.as_bytes().to_vec());
        } else {
            out.push(HeldBuffer::get(&item)?.as_slice().to_vec());
        }
    }
    Ok(out)
}

/// Buffers to send: large ones borrowed without a copy, small ones copied.
pub fn out_buffers(buffers: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<OutFrame>> {
    out_buffers_tracked(buffers, None)
}

/// [`out_buffers`], with the frames sent from the objects' memory counted by `tracker`.
pub fn out_buffers_tracked(
    buffers: Option<&Bound<'_, PyAny>>,
    tracker: Option<&std::sync::Arc<crate::tracker::TrackerState>>,
) -> PyResult<Vec<OutFrame>> {
    let Some(buffers) = buffers else {
        return Ok(Vec::new());
    };
    if buffers.is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in buffers.try_iter()? {
        let held = HeldBuffer::get(&item?)?;
        if held.as_slice().len() >= fp_io::ZERO_COPY_THRESHOLD {
            match tracker {
                Some(t) => out.push(OutFrame::External(Box::new(crate::tracker::Tracked::new(
                    held, t,
                )))),
                None => out.push(OutFrame::External(Box::new(held))),
            }
        } else {
            out.push(OutFrame::Owned(held.as_slice().to_vec()));
        }
    }
    Ok(out)
}

impl Session {
    /// Build the four parts of a new message.
    pub fn parts(
        &self,
        msg_type: &str,
        content: Option<&Bound<'_, PyAny>>,
        parent: Option<&Bound<'_, PyAny>>,
        metadata: Option<&Bound<'_, PyAny>>,
        header: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Parts> {
        let header = match header {
            Some(h) if !h.is_none() => to_map_value(Some(h))?,
            _ => self.core.headers.header(msg_type),
        };
        Ok(Parts {
            header,
            parent_header: to_map_value(parent)?,
            metadata: to_map_value(metadata)?,
            content: to_map_value(content)?,
        })
    }
}

#[pymethods]
impl Session {
    #[new]
    #[pyo3(signature = (key=None, *, packer="msgpack", signature_scheme="hmac-sha256",
                        session=None, username=None, history_size=65536, max_part=268435456,
                        sign_buffers=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        key: Option<&Bound<'_, PyAny>>,
        packer: &str,
        signature_scheme: &str,
        session: Option<String>,
        username: Option<String>,
        history_size: usize,
        max_part: usize,
        sign_buffers: Option<bool>,
    ) -> PyResult<Self> {
        let packer = Packer::from_name(packer).map_err(|e| wire_error(py, e))?;
        let username = username
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "username".to_owned());
        let limits = Limits {
            max_part,
            ..Limits::default()
        };
        let core = SessionCore::new(
            key_bytes(key)?,
            packer,
            signature_scheme,
            session.unwrap_or_else(fp_wire::new_id),
            username,
            history_size,
            limits,
        )
        .map_err(|e| wire_error(py, e))?
        .with_sign_buffers(sign_buffers.unwrap_or_else(fp_io::sign_buffers_default));
        let username_py = PyString::new(py, &core.headers.username).unbind();
        let session_py = PyString::new(py, &core.headers.session).unbind();
        Ok(Session {
            core: Arc::new(core),
            username_py,
            session_py,
        })
    }

    /// The keyed BLAKE3 MAC (hex) of ``buffers`` as ``metadata["buffers_mac"]`` holds it;
    /// ``None`` without a key. Hashes without the GIL.
    fn buffers_digest(
        &self,
        py: Python<'_>,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Option<String>> {
        let held = buffers
            .iter()
            .map(HeldBuffer::get)
            .collect::<PyResult<Vec<_>>>()?;
        let core = self.core.clone();
        // `held` goes to the hashing closure and comes back to be released under the GIL
        let (digest, _held) = py.detach(move || {
            let digest = core.buffers_digest(held.iter().map(HeldBuffer::as_slice));
            (digest, held)
        });
        Ok(digest)
    }

    /// Whether sent messages carry a digest of their buffers in the signed metadata.
    #[getter]
    fn sign_buffers(&self) -> bool {
        self.core.sign_buffers
    }

    #[getter]
    fn session(&self) -> &str {
        &self.core.headers.session
    }

    #[getter]
    fn username(&self) -> &str {
        &self.core.headers.username
    }

    #[getter]
    fn packer(&self) -> &'static str {
        self.core.packer.name()
    }

    #[getter]
    fn signature_scheme(&self) -> &str {
        &self.core.signature_scheme
    }

    #[getter]
    fn key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.key)
    }

    /// A new msg_id for this session.
    fn msg_id(&self) -> String {
        self.core.headers.next_msg_id()
    }

    /// A new header dict: what `HeaderFactory::header` holds, made as a Python dict directly
    /// (a client makes one per request), with the keys in the same order.
    fn msg_header<'py>(
        &self,
        py: Python<'py>,
        msg_type: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let headers = &self.core.headers;
        let msg_type = if msg_type.is_exact_instance_of::<PyString>() {
            msg_type.clone()
        } else {
            PyString::new(py, msg_type.to_str()?) // (a subclass: a plain str, as on the wire)
        };
        let d = PyDict::new(py);
        d.set_item(
            intern!(py, "msg_id"),
            PyString::new(py, &headers.next_msg_id()),
        )?;
        d.set_item(intern!(py, "msg_type"), msg_type)?;
        d.set_item(intern!(py, "username"), self.username_py.bind(py))?;
        d.set_item(intern!(py, "session"), self.session_py.bind(py))?;
        d.set_item(intern!(py, "date"), PyString::new(py, &fp_wire::iso_now()))?;
        d.set_item(
            intern!(py, "version"),
            intern!(py, fp_wire::PROTOCOL_VERSION),
        )?;
        Ok(d)
    }

    /// Pack one object with this session's packer.
    fn pack<'py>(&self, py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let v = to_value(obj)?;
        let packed = self.core.packer.pack(&v).map_err(|e| wire_error(py, e))?;
        Ok(PyBytes::new(py, &packed))
    }

    /// Unpack bytes packed with this session's packer.
    fn unpack<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let buf = HeldBuffer::get(data)?;
        let v = self
            .core
            .packer
            .unpack(buf.as_slice(), "data")
            .map_err(|e| wire_error(py, e))?;
        to_py(py, &v)
    }

    /// Hex HMAC signature of the four packed parts.
    fn sign<'py>(
        &self,
        py: Python<'py>,
        parts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let held: Vec<HeldBuffer> = parts
            .try_iter()?
            .map(|p| HeldBuffer::get(&p?))
            .collect::<PyResult<_>>()?;
        if held.len() != 4 {
            return Err(PyTypeError::new_err(
                "sign() takes the four packed parts: header, parent_header, metadata, content",
            ));
        }
        let auth = fp_wire::Auth::new(&self.core.key, &self.core.signature_scheme)
            .map_err(|e| wire_error(py, e))?;
        let sig = auth.sign(&[
            held[0].as_slice(),
            held[1].as_slice(),
            held[2].as_slice(),
            held[3].as_slice(),
        ]);
        Ok(PyBytes::new(py, &sig))
    }

    /// The frames of one message; buffers are returned as the objects given (not copied).
    #[pyo3(signature = (msg_type, content=None, parent=None, metadata=None, *, ident=None,
                        buffers=None, header=None))]
    #[allow(clippy::too_many_arguments)]
    fn serialize<'py>(
        &self,
        py: Python<'py>,
        msg_type: &str,
        content: Option<&Bound<'py, PyAny>>,
        parent: Option<&Bound<'py, PyAny>>,
        metadata: Option<&Bound<'py, PyAny>>,
        ident: Option<&Bound<'py, PyAny>>,
        buffers: Option<&Bound<'py, PyAny>>,
        header: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut parts = self.parts(msg_type, content, parent, metadata, header)?;
        if let Some(b) = buffers.filter(|b| !b.is_none()) {
            let held: Vec<HeldBuffer> = b
                .try_iter()?
                .map(|item| HeldBuffer::get(&item?))
                .collect::<PyResult<_>>()?;
            self.core
                .add_buffers_digest(&mut parts, held.iter().map(HeldBuffer::as_slice));
        }
        let (sig, packed) = self
            .core
            .pack_and_sign(&parts)
            .map_err(|e| wire_error(py, e))?;
        let out = PyList::empty(py);
        for id in ident_list(ident)? {
            out.append(PyBytes::new(py, &id))?;
        }
        out.append(PyBytes::new(py, DELIMITER))?;
        out.append(PyBytes::new(py, &sig))?;
        for p in &packed {
            out.append(PyBytes::new(py, p))?;
        }
        if let Some(b) = buffers {
            if !b.is_none() {
                for item in b.try_iter()? {
                    out.append(item?)?;
                }
            }
        }
        Ok(out)
    }

    /// Split, verify and unpack received frames (see the type stub for the result).
    #[pyo3(signature = (frames, *, content=true, record=true))]
    fn deserialize<'py>(
        &self,
        py: Python<'py>,
        frames: &Bound<'py, PyAny>,
        content: bool,
        record: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let objects: Vec<Bound<'py, PyAny>> = frames.try_iter()?.collect::<PyResult<_>>()?;
        let mut held = Vec::with_capacity(objects.len());
        for (i, o) in objects.iter().enumerate() {
            held.push(Indexed(i, HeldBuffer::get(o)?));
        }
        let (idents, parts, buffers) = self
            .core
            .parse(held, content, record && content)
            .map_err(|e| wire_error(py, e))?;
        let id_list = PyList::empty(py);
        for id in &idents {
            id_list.append(PyBytes::new(py, id.1.as_slice()))?;
        }
        let buf_list = PyList::empty(py);
        for b in &buffers {
            buf_list.append(&objects[b.0])?;
        }
        let parts = if content {
            parts
        } else {
            Parts {
                content: Value::Nil,
                ..parts
            }
        };
        message_dict(py, id_list, &parts, content, buf_list, None)
    }

    fn __repr__(&self) -> String {
        format!(
            "Session(session={:?}, packer={:?}, signed={})",
            self.core.headers.session,
            self.core.packer.name(),
            !self.core.key.is_empty()
        )
    }
}

struct Indexed(usize, HeldBuffer);

impl AsRef<[u8]> for Indexed {
    fn as_ref(&self) -> &[u8] {
        self.1.as_slice()
    }
}
