//! `ferroparallel._core`: the PyO3 bindings of the wire core and the I/O thread.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod controller;
mod convert;
mod curve;
mod datastream;
mod delivery;
mod direct;
mod errors;
mod frame;
mod iothread;
mod peer;
mod pybuffer;
mod session;
mod shm_map;
mod tracker;

/// mimalloc for every Rust allocation of the extension (the I/O thread, the controller):
/// buffers are allocated on one thread and freed on another, which glibc's malloc handles with
/// contended arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A jupyter-style session id.
#[pyfunction]
fn new_id() -> String {
    fp_wire::new_id()
}

/// The current UTC time, ISO-8601 with microseconds and `Z`.
#[pyfunction]
fn iso_now() -> String {
    fp_wire::iso_now()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DELIMITER", PyBytes::new(m.py(), fp_wire::DELIMITER))?;
    m.add("PROTOCOL_VERSION", fp_wire::PROTOCOL_VERSION)?;
    m.add("ZERO_COPY_THRESHOLD", fp_io::ZERO_COPY_THRESHOLD)?;
    m.add("PACKED_HEADER_KEY", convert::PACKED_HEADER_KEY)?;
    m.add_function(wrap_pyfunction!(new_id, m)?)?;
    m.add_function(wrap_pyfunction!(iso_now, m)?)?;
    m.add_function(wrap_pyfunction!(curve::has_curve, m)?)?;
    m.add_function(wrap_pyfunction!(curve::curve_keypair, m)?)?;
    m.add_function(wrap_pyfunction!(curve::curve_public_key, m)?)?;
    m.add_function(wrap_pyfunction!(peer::buffer_address, m)?)?;
    m.add_function(wrap_pyfunction!(peer::read_process_memory, m)?)?;
    m.add_function(wrap_pyfunction!(peer::write_process_memory, m)?)?;
    m.add_class::<frame::Frame>()?;
    m.add_class::<datastream::DataListener>()?;
    m.add_class::<datastream::DataStream>()?;
    m.add_class::<datastream::LoanDigest>()?;
    m.add_class::<shm_map::SharedMapping>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<iothread::IoThread>()?;
    m.add_class::<tracker::SendTracker>()?;
    m.add_class::<direct::DirectSockets>()?;
    m.add_class::<controller::Controller>()?;
    Ok(())
}
