//! Converting between Python objects and wire values.

use std::collections::HashMap;
use std::sync::Mutex;

use fp_wire::{Parts, Value};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

const MAX_DEPTH: usize = 256;

/// Key of a received message dict holding its header frame as received (packed), when the
/// sockets keep it (`DirectSockets`): a reply passes it as its parent (`send(..,
/// parent=msg[PACKED_HEADER_KEY])`) rather than the header dict, which then need not be
/// packed again. Whoever changes a message's header dict must drop this key.
pub const PACKED_HEADER_KEY: &str = "_header_packed";

/// Map keys up to this many bytes become interned Python strings.
const MAX_INTERNED_KEY: usize = 40;

/// Most map keys kept in [`KEYS`] (a peer sending ever new keys cannot grow it further).
const MAX_CACHED_KEYS: usize = 2048;

/// Map keys already seen, as interned Python strings. The same few dozen keys come in every
/// message; finding one here costs less than decoding, hashing and interning it again.
static KEYS: Mutex<Option<HashMap<String, Py<PyString>>>> = Mutex::new(None);

static PACK_DEFAULT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The interned Python string of map key `s` (cached; see [`KEYS`]).
fn key_string<'py>(py: Python<'py>, s: &str) -> Bound<'py, PyString> {
    {
        let keys = KEYS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys.as_ref().and_then(|m| m.get(s)) {
            return k.bind(py).clone();
        }
    }
    // created without the lock held: no Python code runs while it is taken
    let key = PyString::intern(py, s);
    let mut keys = KEYS.lock().unwrap_or_else(|e| e.into_inner());
    let map = keys.get_or_insert_with(HashMap::new);
    if map.len() < MAX_CACHED_KEYS {
        map.entry(s.to_owned())
            .or_insert_with(|| key.clone().unbind());
    }
    key
}

fn pack_default<'py>(py: Python<'py>) -> PyResult<&'py Bound<'py, PyAny>> {
    PACK_DEFAULT
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("ferroparallel._packing")?
                    .getattr("pack_default")?
                    .unbind(),
            )
        })
        .map(|f| f.bind(py))
}

/// Convert a Python object to a packable value.
pub fn to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    convert(obj, 0)
}

/// `None` becomes an empty map (for optional dict parts).
pub fn to_map_value(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Value> {
    match obj {
        None => Ok(Value::empty_map()),
        Some(o) if o.is_none() => Ok(Value::empty_map()),
        Some(o) => {
            if !o.is_instance_of::<PyDict>() {
                return Err(PyTypeError::new_err(format!(
                    "message parts must be dicts, not {}",
                    o.get_type().name()?
                )));
            }
            to_value(o)
        }
    }
}

/// `s` with one U+FFFD for each lone surrogate (through UTF-16, where each is one unit).
fn replace_surrogates(s: &Bound<'_, PyString>) -> PyResult<String> {
    let fixed = s
        .call_method1("encode", ("utf-16-le", "surrogatepass"))?
        .call_method1("decode", ("utf-16-le", "replace"))?;
    Ok(fixed.cast::<PyString>()?.to_str()?.to_owned())
}

fn convert(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "message content nested deeper than {MAX_DEPTH} levels"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Nil);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::Str(match s.to_str() {
            Ok(text) => text.to_owned(),
            // lone surrogates (e.g. a file name decoded with surrogateescape) cannot be UTF-8:
            // U+FFFD in their place, as Jupyter kernels print them, rather than a message
            // that cannot be sent at all
            Err(_) => replace_surrogates(s)?,
        }));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::Int(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::UInt(u));
        }
        return Err(PyOverflowError::new_err("integer does not fit in 64 bits"));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Value::Float(f.value()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut items = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            items.push((convert(&k, depth + 1)?, convert(&v, depth + 1)?));
        }
        return Ok(Value::Map(items));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        let mut items = Vec::with_capacity(l.len());
        for v in l.iter() {
            items.push(convert(&v, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        let mut items = Vec::with_capacity(t.len());
        for v in t.iter() {
            items.push(convert(&v, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Value::Bin(b.as_bytes().to_vec()));
    }
    let replacement = pack_default(obj.py())?.call1((obj,))?;
    convert(&replacement, depth + 1)
}

/// Convert a value to a Python object.
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Nil => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::UInt(u) => u.into_pyobject(py)?.into_any(),
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Bin(b) => PyBytes::new(py, b).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Map(items) => {
            let dict = PyDict::new(py);
            for (k, v) in items {
                // message keys repeat in every message: interned, they are shared and compare
                // by pointer in Python's dict lookups
                let key = match k {
                    Value::Str(s) if s.len() <= MAX_INTERNED_KEY => key_string(py, s).into_any(),
                    _ => to_py(py, k)?,
                };
                if key.hash().is_err() {
                    return Err(crate::errors::error_class(
                        py,
                        "UnpackError",
                        format!("map key of type {} is not hashable", key.get_type().name()?),
                    ));
                }
                dict.set_item(key, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// The message dict handed to Python.
pub fn message_dict<'py>(
    py: Python<'py>,
    idents: Bound<'py, PyList>,
    parts: &Parts,
    content_unpacked: bool,
    buffers: Bound<'py, PyList>,
    packed_header: Option<&[u8]>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let header = to_py(py, &parts.header)?;
    let (msg_id, msg_type) = (intern!(py, "msg_id"), intern!(py, "msg_type"));
    d.set_item(msg_id, header.get_item(msg_id)?)?;
    d.set_item(msg_type, header.get_item(msg_type)?)?;
    d.set_item(intern!(py, "header"), header)?;
    d.set_item(
        intern!(py, "parent_header"),
        to_py(py, &parts.parent_header)?,
    )?;
    d.set_item(intern!(py, "metadata"), to_py(py, &parts.metadata)?)?;
    let content = if content_unpacked {
        to_py(py, &parts.content)?
    } else {
        py.None().into_bound(py)
    };
    d.set_item(intern!(py, "content"), content)?;
    d.set_item(intern!(py, "buffers"), buffers)?;
    d.set_item(intern!(py, "idents"), idents)?;
    if let Some(packed) = packed_header {
        d.set_item(intern!(py, PACKED_HEADER_KEY), PyBytes::new(py, packed))?;
    }
    Ok(d)
}
