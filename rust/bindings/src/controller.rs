//! `Controller`: the Rust controller, configured and started from Python.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fp_controller::log::{set_level, Level};
use fp_controller::{ControllerConfig, Scheme, CHANNELS};
use fp_wire::Packer;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// The ferroparallel controller (hub, relays, scheduler, heartbeat) on native threads.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct Controller {
    config: ControllerConfig,
    inner: Mutex<Option<fp_controller::Controller>>,
}

const KNOWN_KEYS: [&str; 20] = [
    "ip",
    "ports",
    "key",
    "signature_scheme",
    "pack",
    "hb_period_ms",
    "hb_max_misses",
    "registration_timeout_ms",
    "scheme",
    "hwm",
    "hwm_budget_ms",
    "db",
    "db_path",
    "restore",
    "db_record_limit",
    "db_size_limit",
    "engine_state_file",
    "log_level",
    "curve_secretkey",
    "ipc_prefix",
];

fn parse_config(config: &Bound<'_, PyDict>) -> PyResult<ControllerConfig> {
    let mut cfg = ControllerConfig::default();
    for key in config.keys() {
        let k: String = key.extract()?;
        if !KNOWN_KEYS.contains(&k.as_str()) {
            return Err(PyKeyError::new_err(format!(
                "unknown controller setting {k:?}; known settings: {}",
                KNOWN_KEYS.join(", ")
            )));
        }
    }
    let get = |k: &str| config.get_item(k).ok().flatten().filter(|v| !v.is_none());
    if let Some(v) = get("ip") {
        cfg.ip = v.extract()?;
    }
    if let Some(v) = get("ipc_prefix") {
        let prefix: String = v.extract()?;
        if prefix.is_empty() || prefix.len() > 80 || prefix.contains('\0') {
            return Err(PyValueError::new_err(
                "ipc_prefix must be a non-empty path or @name of at most 80 bytes",
            ));
        }
        cfg.ipc_prefix = Some(prefix);
    }
    if let Some(v) = get("ports") {
        let ports = v
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err("ports must be a dict"))?;
        for (name, port) in ports.iter() {
            let name: String = name.extract()?;
            let i = CHANNELS.iter().position(|c| *c == name).ok_or_else(|| {
                PyKeyError::new_err(format!(
                    "unknown channel {name:?} in ports; channels: {}",
                    CHANNELS.join(", ")
                ))
            })?;
            cfg.ports[i] = port.extract()?;
        }
    }
    if let Some(v) = get("key") {
        cfg.key = if let Ok(s) = v.cast::<PyString>() {
            s.to_str()?.as_bytes().to_vec()
        } else {
            v.cast::<PyBytes>()
                .map_err(|_| PyTypeError::new_err("key must be bytes or str"))?
                .as_bytes()
                .to_vec()
        };
    }
    if let Some(v) = get("signature_scheme") {
        cfg.signature_scheme = v.extract()?;
    }
    if let Some(v) = get("pack") {
        let name: String = v.extract()?;
        cfg.packer = Packer::from_name(&name).map_err(|e| PyValueError::new_err(e.to_string()))?;
    }
    if let Some(v) = get("hb_period_ms") {
        cfg.hb_period_ms = v.extract()?;
        if cfg.hb_period_ms == 0 {
            return Err(PyValueError::new_err("hb_period_ms must be > 0"));
        }
        cfg.registration_timeout_ms = cfg.registration_timeout_ms.max(10 * cfg.hb_period_ms);
    }
    if let Some(v) = get("hb_max_misses") {
        cfg.hb_max_misses = v.extract()?;
    }
    if let Some(v) = get("registration_timeout_ms") {
        cfg.registration_timeout_ms = v.extract()?;
    }
    if let Some(v) = get("scheme") {
        let name: String = v.extract()?;
        cfg.scheme = Scheme::from_name(&name).map_err(PyValueError::new_err)?;
    }
    if let Some(v) = get("hwm") {
        cfg.hwm = v.extract()?;
    }
    if let Some(v) = get("hwm_budget_ms") {
        let ms: f64 = v.extract()?;
        if !ms.is_finite() || ms < 0.0 {
            return Err(PyValueError::new_err(format!(
                "hwm_budget_ms must be a number >= 0, not {ms}"
            )));
        }
        cfg.hwm_budget_ms = ms;
    }
    if let Some(v) = get("db") {
        let db: String = v.extract()?;
        if !["memory", "sqlite", "none"].contains(&db.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown db backend {db:?}: use memory, sqlite or none"
            )));
        }
        cfg.db = db;
    }
    if let Some(v) = get("db_path") {
        cfg.db_path = Some(v.extract()?);
    }
    if let Some(v) = get("restore") {
        cfg.restore = v.extract()?;
    }
    if let Some(v) = get("db_record_limit") {
        cfg.db_record_limit = v.extract()?;
    }
    if let Some(v) = get("db_size_limit") {
        cfg.db_size_limit = v.extract()?;
    }
    if let Some(v) = get("engine_state_file") {
        cfg.engine_state_file = Some(v.extract()?);
    }
    if let Some(v) = get("curve_secretkey") {
        cfg.curve_secretkey = Some(crate::curve::key_arg("curve_secretkey", &v)?);
        if !fp_io::curve::available() {
            return Err(PyValueError::new_err(
                "curve_secretkey given, but this build of libzmq has no CURVE support",
            ));
        }
    }
    if let Some(v) = get("log_level") {
        let name: String = v.str()?.to_str()?.to_owned();
        let level = Level::from_name(&name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown log level {name:?}: use DEBUG, INFO, WARNING or ERROR"
            ))
        })?;
        set_level(level);
    }
    // Validate the signing settings now, so a bad key/scheme fails before binding.
    fp_wire::Auth::new(&cfg.key, &cfg.signature_scheme)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(cfg)
}

#[pymethods]
impl Controller {
    #[new]
    fn new(config: &Bound<'_, PyDict>) -> PyResult<Self> {
        Ok(Controller {
            config: parse_config(config)?,
            inner: Mutex::new(None),
        })
    }

    /// Bind every socket and start; returns the bound port of each channel.
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        if inner.is_some() {
            return Err(PyRuntimeError::new_err("the controller is already started"));
        }
        let cfg = self.config.clone();
        let ctl = py
            .detach(|| fp_controller::Controller::start(cfg))
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the controller: {e}")))?;
        let ports = PyDict::new(py);
        for (name, port) in &ctl.ports {
            ports.set_item(*name, *port)?;
        }
        *inner = Some(ctl);
        Ok(ports)
    }

    /// The `ipc://` endpoint of each channel (empty without `ipc_prefix`, or before start).
    fn ipc_endpoints<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        let out = PyDict::new(py);
        if let Some(ctl) = inner.as_ref() {
            for (name, url) in &ctl.ipc {
                out.set_item(*name, url)?;
            }
        }
        Ok(out)
    }

    /// The link endpoint (`ipc://@...`, decision 0017), or None (no IPC, CurveZMQ on, links turned
    /// off by `FERROPARALLEL_LINKS=0`, or not started).
    fn link_endpoint(&self) -> PyResult<Option<String>> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        Ok(inner.as_ref().and_then(|ctl| ctl.link.clone()))
    }

    /// Wait until the controller stops (True) or the timeout passes (False).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            if !self.running() {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            py.detach(|| std::thread::sleep(SIGNAL_SLICE));
            py.check_signals()?;
        }
    }

    /// Publish `shutdown_notification`, stop and close every socket. Idempotent.
    fn stop(&self, py: Python<'_>) {
        let ctl = self.inner.lock().ok().and_then(|mut i| i.take());
        if let Some(ctl) = ctl {
            py.detach(move || {
                ctl.stop();
                drop(ctl);
            });
        }
    }

    /// The engine connection settings (a dict) that `registration_reply` carries as its
    /// `connection_info`, as ipyparallel's hub sends them.
    fn set_engine_info(&self, info: &Bound<'_, PyDict>) -> PyResult<()> {
        let value = crate::convert::to_value(info.as_any())?;
        let inner = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        match inner.as_ref() {
            Some(ctl) => {
                ctl.set_engine_info(value);
                Ok(())
            }
            None => Err(PyRuntimeError::new_err("the controller is not started")),
        }
    }

    /// Registered engines: id -> uuid.
    fn engines<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Ok(inner) = self.inner.lock() {
            if let Some(ctl) = inner.as_ref() {
                for (id, uuid) in ctl.engines() {
                    d.set_item(id, uuid)?;
                }
            }
        }
        Ok(d)
    }

    /// Counters: received, dropped, engines, tasks_queued, tasks_assigned, engine_errors.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Ok(inner) = self.inner.lock() {
            if let Some(ctl) = inner.as_ref() {
                let s = &ctl.stats;
                d.set_item("received", s.received.load(Relaxed))?;
                d.set_item("dropped", s.dropped.load(Relaxed))?;
                d.set_item("engines", s.engines.load(Relaxed))?;
                d.set_item("tasks_queued", s.tasks_queued.load(Relaxed))?;
                d.set_item("tasks_assigned", s.tasks_assigned.load(Relaxed))?;
                d.set_item("engine_errors", s.engine_errors.load(Relaxed))?;
            }
        }
        Ok(d)
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.as_ref().is_some_and(|c| c.running()))
            .unwrap_or(false)
    }
}
