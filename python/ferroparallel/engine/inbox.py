"""Received messages, and the thread that keeps receiving while a long request runs.

The shell, control and broadcast sockets are :class:`~ferroparallel._core.DirectSockets`: the
thread that waits for requests polls them itself (no I/O thread hop). Only one thread at a time
receives: the main thread while idle, the :class:`BusyWatcher` while the main thread runs a
request for longer than a grace period. Both sort what they receive into the same queues, so
control requests that arrive during a long request are seen at once (abort, signal) and jump
ahead of queued shell requests. The other sockets (registration, IOPub, heartbeat) stay on the
engine's I/O thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import _core
from ..error import IoClosedError

log = logging.getLogger(__name__)

#: Socket names of the engine's I/O thread.
SHELL, BROADCAST, CONTROL, IOPUB, REGISTRATION = (
    "shell",
    "broadcast",
    "control",
    "iopub",
    "registration",
)

#: Key added to received shell messages: the socket to reply on.
SOCKET_KEY = "_socket"

#: Key of a received message holding its header as received (packed ``bytes``): replies and
#: IOPub messages name it as their parent as it is, rather than the header dict packed again
#: (the same header either way). Code that changes a message's ``header`` dict must drop it.
PACKED_HEADER_KEY: str = _core.PACKED_HEADER_KEY


def parent_of(msg: dict[str, Any]) -> dict[str, Any] | bytes:
    """The parent to give messages that answer ``msg``: its header as received (packed) when
    the sockets kept it, else its header dict."""
    return msg.get(PACKED_HEADER_KEY) or msg["header"]


class Inbox:
    """Queues of received shell and control messages.

    Parameters
    ----------
    io : ferroparallel._core.IoThread
        The engine's I/O thread (registration replies).
    direct : ferroparallel._core.DirectSockets
        The shell, control and broadcast sockets.
    """

    def __init__(self, io: Any, direct: Any) -> None:
        self._io = io
        self._direct = direct
        self._lock = threading.Lock()
        self.control: deque[dict[str, Any]] = deque()
        self.shell: deque[dict[str, Any]] = deque()
        self.other: deque[tuple[str, Any]] = deque()

    def pull(self, timeout: float) -> int:
        """Receive requests for up to ``timeout`` seconds (less when woken) and queue them.

        Returns
        -------
        int
            Number of messages received.
        """
        if not self._lock.acquire(blocking=False):
            self._direct.wake()  # the other receiver hands over at once
            self._lock.acquire()
        try:
            batch = self._direct.recv(timeout=timeout)
            for name, msg in batch:
                if name == SHELL:
                    self.shell.append(msg)
                elif name == BROADCAST:
                    msg[SOCKET_KEY] = name
                    self.shell.append(msg)
                elif name == CONTROL:
                    self.control.append(msg)
                else:
                    self.other.append((name, msg))
        finally:
            self._lock.release()
        return len(batch)

    def pull_other(self, timeout: float) -> int:
        """Receive on the I/O thread's sockets (the registration reply) into :attr:`other`."""
        batch = self._io.recv(timeout=timeout)
        self.other.extend(batch)
        return len(batch)


class BusyWatcher(threading.Thread):
    """Receives and runs ``on_tick`` while the main thread is busy with a long request.

    Parameters
    ----------
    inbox : Inbox
        Where received messages go.
    direct : ferroparallel._core.DirectSockets
        Woken when the request ends, so that a pending receive hands the sockets back.
    on_tick : callable
        Called (in this thread) after every receive while engaged: handles urgent control
        requests, flushes captured output.
    grace : float
        Seconds a request must run before the watcher starts receiving.
    tick : float
        Receive timeout while engaged, and the polling period while not.
    """

    def __init__(
        self,
        inbox: Inbox,
        direct: Any,
        on_tick: Callable[[], None],
        grace: float = 0.05,
        tick: float = 0.05,
    ) -> None:
        super().__init__(name="ferroparallel-engine-watcher", daemon=True)
        self._inbox = inbox
        self._direct = direct
        self._on_tick = on_tick
        self._grace = grace
        self._tick = tick
        self._busy_since: float | None = None
        self._engaged = False
        self._stop_event = threading.Event()

    def begin(self) -> None:
        """The main thread starts a request."""
        self._busy_since = time.monotonic()

    def end(self) -> None:
        """The main thread finished its request: stop receiving promptly."""
        self._busy_since = None
        if self._engaged:
            self._direct.wake()

    def stop(self) -> None:
        """Ask the thread to exit (it does within one tick)."""
        self._stop_event.set()
        self.end()

    def run(self) -> None:
        while not self._stop_event.wait(self._tick):
            started = self._busy_since
            if started is None or time.monotonic() - started < self._grace:
                continue
            self._engaged = True
            try:
                while self._busy_since == started and not self._stop_event.is_set():
                    self._inbox.pull(self._tick)
                    if self._busy_since != started:
                        break
                    self._on_tick()
            except IoClosedError:
                return
            except Exception:
                log.exception("engine watcher failed; long requests will not be watched")
                return
            finally:
                self._engaged = False
