"""Received messages, and the thread that keeps receiving while a long request runs.

Only one thread at a time calls ``IoThread.recv``: the main thread while idle, the
:class:`BusyWatcher` while the main thread runs a request for longer than a grace period. Both
sort what they receive into the same queues, so control requests that arrive during a long
request are seen at once (abort, signal) and jump ahead of queued shell requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..error import IoClosedError

log = logging.getLogger(__name__)

#: Socket names of the engine's I/O thread.
SHELL, BROADCAST, CONTROL, IOPUB, REGISTRATION, WAKE, WAKE_TX = (
    "shell",
    "broadcast",
    "control",
    "iopub",
    "registration",
    "wake",
    "wake_tx",
)

#: Key added to received shell messages: the socket to reply on.
SOCKET_KEY = "_socket"


class Inbox:
    """Queues of received shell and control messages.

    Parameters
    ----------
    io : ferroparallel._core.IoThread
        The engine's I/O thread.
    """

    def __init__(self, io: Any) -> None:
        self._io = io
        self._lock = threading.Lock()
        self.control: deque[dict[str, Any]] = deque()
        self.shell: deque[dict[str, Any]] = deque()
        self.other: deque[tuple[str, Any]] = deque()

    def pull(self, timeout: float) -> int:
        """Receive for up to ``timeout`` seconds and queue what arrived.

        Returns
        -------
        int
            Number of messages received (wake-ups included).
        """
        with self._lock:
            batch = self._io.recv(timeout=timeout)
            for name, msg in batch:
                if name == SHELL:
                    self.shell.append(msg)
                elif name == BROADCAST:
                    msg[SOCKET_KEY] = name
                    self.shell.append(msg)
                elif name == CONTROL:
                    self.control.append(msg)
                elif name != WAKE:
                    self.other.append((name, msg))
        return len(batch)


class BusyWatcher(threading.Thread):
    """Receives and runs ``on_tick`` while the main thread is busy with a long request.

    Parameters
    ----------
    inbox : Inbox
        Where received messages go.
    io : ferroparallel._core.IoThread
        Used to wake a pending receive when the request ends.
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
        io: Any,
        on_tick: Callable[[], None],
        grace: float = 0.05,
        tick: float = 0.05,
    ) -> None:
        super().__init__(name="ferroparallel-engine-watcher", daemon=True)
        self._inbox = inbox
        self._io = io
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
            try:
                self._io.send_raw(WAKE_TX, [b""])
            except (IoClosedError, ValueError):
                pass

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
