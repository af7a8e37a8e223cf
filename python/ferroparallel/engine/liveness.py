"""Is the controller still there? Judged from the heartbeat pings the I/O thread echoes."""

from __future__ import annotations

import threading
import time
from typing import Any


class Liveness:
    """Tracks ``IoThread.stats()["forwarded"]`` (pings echoed by the native heartbeat).

    Parameters
    ----------
    io : ferroparallel._core.IoThread
        The engine's I/O thread.
    period : float
        Controller ping period in seconds.
    max_missed : int
        Periods without a ping after which the controller is considered gone.
    """

    def __init__(self, io: Any, period: float, max_missed: int) -> None:
        self._io = io
        self.period = period
        self.max_missed = max_missed
        self._lock = threading.Lock()
        self._count = -1
        self._last_change = time.monotonic()
        self._last_sample = 0.0

    @property
    def limit(self) -> float:
        """Seconds without pings before the controller is considered gone: ``max_missed``
        checks of ``period`` + 0.5 s each, as ipyparallel's engine watchdog."""
        return (self.period + 0.5) * self.max_missed

    def sample(self) -> None:
        """Read the counter; note the time when it moved."""
        now = time.monotonic()
        count = self._io.stats()["forwarded"]
        with self._lock:
            self._last_sample = now
            if count != self._count:
                self._count = count
                self._last_change = now

    def silent_for(self) -> float:
        """Seconds since the last observed ping (after sampling)."""
        self.sample()
        with self._lock:
            return time.monotonic() - self._last_change

    def alive(self) -> bool:
        """False when no ping has been echoed for ``max_missed`` periods."""
        return self.max_missed <= 0 or self.silent_for() <= self.limit
