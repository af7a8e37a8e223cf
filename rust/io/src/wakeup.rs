//! Plumbing shared by the threads that wait in `poll(2)` on sockets' `ZMQ_FD`s: the poll
//! entry of a descriptor and a non-blocking wake-up socket pair.

use std::io::Read;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

/// A `poll(2)` entry waiting for `fd` to become readable.
pub(crate) fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// A connected pair of non-blocking sockets: write a byte to one end to end a `poll(2)` that
/// watches the other.
pub(crate) fn wake_pair() -> Result<(UnixStream, UnixStream), String> {
    let (tx, rx) =
        UnixStream::pair().map_err(|e| format!("cannot create the wake-up pipe: {e}"))?;
    for s in [&tx, &rx] {
        s.set_nonblocking(true)
            .map_err(|e| format!("cannot set up the wake-up pipe: {e}"))?;
    }
    Ok((tx, rx))
}

/// Read every pending wake-up byte from `rx`.
pub(crate) fn drain(mut rx: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
}
