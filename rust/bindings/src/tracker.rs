//! `SendTracker`: when libzmq has finished sending a message's frames from the sender's memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fp_io::ExternalBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::pybuffer::HeldBuffer;

/// How long a wait sleeps between checks for signals (Ctrl-C).
const SLICE: Duration = Duration::from_millis(50);

#[derive(Default)]
pub struct TrackerState {
    pending: Mutex<usize>,
    changed: Condvar,
}

impl TrackerState {
    fn pending(&self) -> usize {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn finish_one(&self) {
        let mut n = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.changed.notify_all();
        }
    }

    /// Wait up to `slice` for every tracked frame to be released; true when they are.
    fn wait_slice(&self, slice: Duration) -> bool {
        let n = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .changed
            .wait_timeout_while(n, slice, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *n == 0
    }
}

/// Tracks the frames of the messages it was given to (``send(..., tracker=t)``) that are sent
/// from their Python objects' memory (the large ones; smaller ones are copied at once): ``done``
/// once libzmq has finished with all of them, after which the objects may be changed.
#[pyclass(frozen, module = "ferroparallel._core")]
pub struct SendTracker {
    pub(crate) state: Arc<TrackerState>,
}

#[pymethods]
impl SendTracker {
    #[new]
    fn new() -> Self {
        SendTracker {
            state: Arc::new(TrackerState::default()),
        }
    }

    /// Whether every tracked frame has been sent (true when there was none).
    #[getter]
    fn done(&self) -> bool {
        self.state.pending() == 0
    }

    /// Tracked frames not sent yet.
    #[getter]
    fn pending(&self) -> usize {
        self.state.pending()
    }

    /// Wait until ``done`` (at most ``timeout`` seconds; None waits as long as it takes,
    /// interruptible with Ctrl-C); returns ``done``.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = match timeout {
            Some(t) if t.is_nan() => return Err(PyValueError::new_err("timeout must be a number")),
            Some(t) if t >= 0.0 => Some(Instant::now() + Duration::from_secs_f64(t.min(1e9))),
            _ => None,
        };
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
                None => SLICE,
            };
            let state = &self.state;
            if py.detach(|| state.wait_slice(slice)) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    fn __repr__(&self) -> String {
        format!("<SendTracker pending={}>", self.state.pending())
    }
}

/// A frame sent from a Python object's memory whose release a tracker counts.
pub struct Tracked {
    held: HeldBuffer,
    state: Arc<TrackerState>,
    finished: AtomicBool,
}

impl Tracked {
    pub fn new(held: HeldBuffer, state: &Arc<TrackerState>) -> Tracked {
        state.add();
        Tracked {
            held,
            state: state.clone(),
            finished: AtomicBool::new(false),
        }
    }

    fn finish(&self) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            self.state.finish_one();
        }
    }
}

impl ExternalBuffer for Tracked {
    fn bytes(&self) -> &[u8] {
        self.held.as_slice()
    }

    fn released(&self) {
        self.finish();
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(); // never sent (a send that failed, a closed socket): nothing in flight
    }
}
