//! CurveZMQ helpers for Python: key generation and the socket role of `IoThread.add_socket`.

use fp_io::{Curve, CurveKey};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// A key given as `str` (Z85) or `bytes` (Z85 or 32 raw bytes).
pub(crate) fn key_arg(what: &str, obj: &Bound<'_, PyAny>) -> PyResult<CurveKey> {
    let bytes: Vec<u8> = if let Ok(s) = obj.cast::<PyString>() {
        s.to_str()?.as_bytes().to_vec()
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        b.as_bytes().to_vec()
    } else {
        return Err(PyTypeError::new_err(format!(
            "{what} must be str or bytes, not {}",
            obj.get_type().name()?
        )));
    };
    CurveKey::parse(what, &bytes).map_err(PyValueError::new_err)
}

fn opt_key(what: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<CurveKey>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(key_arg(what, o)?)),
        _ => Ok(None),
    }
}

/// The CURVE role described by `add_socket`'s keyword arguments.
pub(crate) fn curve_role(
    server: bool,
    serverkey: Option<&Bound<'_, PyAny>>,
    publickey: Option<&Bound<'_, PyAny>>,
    secretkey: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Curve>> {
    let serverkey = opt_key("curve_serverkey", serverkey)?;
    let publickey = opt_key("curve_publickey", publickey)?;
    let secretkey = opt_key("curve_secretkey", secretkey)?;
    let derive = |secret: &CurveKey, public: Option<CurveKey>| -> PyResult<CurveKey> {
        let derived = fp_io::curve::public_key(secret).map_err(PyRuntimeError::new_err)?;
        match public {
            Some(p) if p != derived => Err(PyValueError::new_err(
                "curve_publickey does not belong to curve_secretkey",
            )),
            _ => Ok(derived),
        }
    };
    if server {
        if serverkey.is_some() {
            return Err(PyValueError::new_err(
                "curve_server=True and curve_serverkey exclude each other",
            ));
        }
        let secret = secretkey
            .ok_or_else(|| PyValueError::new_err("curve_server=True needs curve_secretkey"))?;
        let public = derive(&secret, publickey)?;
        return Ok(Some(Curve::Server { public, secret }));
    }
    let Some(server) = serverkey else {
        if publickey.is_some() || secretkey.is_some() {
            return Err(PyValueError::new_err(
                "curve_publickey/curve_secretkey need curve_serverkey (client) or \
                 curve_server=True",
            ));
        }
        return Ok(None);
    };
    match (secretkey, publickey) {
        (None, None) => Curve::client(server)
            .map(Some)
            .map_err(PyRuntimeError::new_err),
        (Some(secret), public) => Ok(Some(Curve::Client {
            server,
            public: derive(&secret, public)?,
            secret,
        })),
        (None, Some(_)) => Err(PyValueError::new_err(
            "curve_publickey without curve_secretkey",
        )),
    }
}

/// True when libzmq was built with CurveZMQ (always, for a normal build).
#[pyfunction]
pub(crate) fn has_curve() -> bool {
    fp_io::curve::available()
}

/// A fresh CURVE key pair ``(public, secret)``, both Z85 strings of 40 characters.
#[pyfunction]
pub(crate) fn curve_keypair() -> PyResult<(String, String)> {
    let (public, secret) = fp_io::curve::keypair().map_err(PyRuntimeError::new_err)?;
    Ok((public.z85(), secret.z85()))
}

/// The Z85 public key that belongs to a secret key (Z85 ``str``/``bytes`` or 32 raw bytes).
#[pyfunction]
pub(crate) fn curve_public_key(secretkey: &Bound<'_, PyAny>) -> PyResult<String> {
    let secret = key_arg("curve_secretkey", secretkey)?;
    let public = fp_io::curve::public_key(&secret).map_err(PyRuntimeError::new_err)?;
    Ok(public.z85())
}
