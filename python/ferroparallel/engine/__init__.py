"""The ferroparallel engine: runs user code sent by clients through the controller.

``ferroparallel engine`` (or ``python -m ferroparallel.engine``) loads the engine connection
info, registers with the controller, and serves ``apply_request`` / ``execute_request`` on its
shell channel and ``abort``/``clear``/``shutdown``/``signal`` requests on its control channel.
The sockets and the heartbeat echo live on a native I/O thread (``ferroparallel._core``); the
Python main thread only runs requests.

Modules
-------
app
    Command line, logging, entry point :func:`main`.
connection
    Loading the engine connection info and building the channel URLs.
kernel
    :class:`~.kernel.EngineKernel`: sockets, registration, the message loop.
shell
    Shell-channel requests (apply, execute) and their replies.
control
    Control-channel requests (abort, clear, shutdown, signal).
inbox
    Received-message queues and the thread that watches long-running requests.
execute, ipyshell
    Running ``apply_request`` and ``execute_request`` (plain Python / IPython).
capture, fdcapture
    stdout/stderr redirection to IOPub ``stream`` messages (Python writes; file descriptors
    1 and 2).
namespace
    The user namespace (``__main__``).
signals, liveness, errors, logs
    SIGINT/SIGTERM handling, controller liveness from heartbeats, error contents, logging.
"""

from __future__ import annotations

from .app import main

__all__ = ["main"]
