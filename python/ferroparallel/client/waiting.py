"""A thread that waits for its own results receives and handles the replies itself.

Normally the client's dispatcher thread receives replies, settles their futures, and wakes the
thread that waits in ``get()``: two thread hand-offs (I/O thread → dispatcher → waiter) on the
path of every synchronous call. :func:`wait_here` instead makes the waiting thread a priority
receiver (``IoThread.recv(since=...)``): it receives from the sockets itself while the I/O
thread steps aside (decision 0006; when another thread already does, it waits on the inbox,
where replies go to priority receivers first), handles whole batches exactly as the
dispatcher would, and returns as soon as what it waits for is done. The dispatcher bumps the
inbox generation after every batch it handles, so a waiter whose result the dispatcher settled
returns at once too.

In the main thread a batch is handled with SIGINT deferred (:class:`SigintDeferred`): Ctrl-C
while replies are being recorded must not lose them; it is raised right after the batch.
"""

from __future__ import annotations

import _signal  # the C module: ``signal.signal`` converts every value to and from an enum
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from .. import error
from .futures import POLL_INTERVAL, wait_until

#: Most messages handled per receive. A received message is a handful of Python containers
#: until it is handled; a big batch that is alive when the garbage collector runs is promoted
#: to the oldest generation, and with many results outstanding (tens of thousands of
#: AsyncResults) those promotions trigger full collections over all of them again and again.
BATCH = 64

if TYPE_CHECKING:
    from .client import Client

__all__ = ["SigintDeferred", "wait_here"]

_SIGINT = int(signal.SIGINT)


class SigintDeferred:
    """In the main thread: hold SIGINT until the block ends, then deliver it as the handler
    that was installed would have (KeyboardInterrupt for Python's default); ``wake`` is
    called when it arrives, to end a wait early.

    ``usable`` is False when the current handler was not installed from Python (it could not
    be put back); then the block runs without deferring.
    """

    __slots__ = ("_wake", "hit", "old", "usable")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.hit = False
        self.old: Any = _signal.getsignal(_SIGINT)
        self.usable = self.old is not None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.hit = True
        self._wake()

    def __enter__(self) -> SigintDeferred:
        if self.usable:
            _signal.signal(_SIGINT, self._handler)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.usable:
            return
        _signal.signal(_SIGINT, self.old)
        if not self.hit or exc_type is not None:
            return
        old = self.old
        if old is signal.default_int_handler or old == _signal.SIG_DFL:
            raise KeyboardInterrupt
        if callable(old):
            old(signal.SIGINT, None)


def wait_here(client: Client, done: Callable[[], bool], timeout: float | None) -> bool:
    """Wait until ``done()`` (True) or ``timeout`` seconds (False; None or negative: no
    limit), receiving and handling the client's replies in this thread meanwhile.

    Ctrl-C raises KeyboardInterrupt within ~50 ms, never in the middle of a batch.
    """
    if done():
        return True
    if timeout is not None and timeout < 0:
        timeout = None
    deadline = None if timeout is None else time.monotonic() + timeout
    if threading.current_thread() is not threading.main_thread():
        return _receive_until(client, done, deadline, None)
    while True:
        guard = SigintDeferred(client._io.wake)
        if not guard.usable:
            return _settled_until(done, deadline)
        with guard:  # delivers a SIGINT that arrived: KeyboardInterrupt, or the user's handler
            finished = _receive_until(client, done, deadline, guard)
        if not guard.hit or finished:
            return finished
        # the user's handler ran and did not raise: go on waiting


def _step(deadline: float | None) -> float:
    if deadline is None:
        return POLL_INTERVAL
    return min(POLL_INTERVAL, deadline - time.monotonic())


def _settled_until(done: Callable[[], bool], deadline: float | None) -> bool:
    """Wait for ``done()`` as futures settle (the dispatcher thread receives)."""
    return wait_until(done, None if deadline is None else max(0.0, deadline - time.monotonic()))


def _receive_until(
    client: Client, done: Callable[[], bool], deadline: float | None, guard: SigintDeferred | None
) -> bool:
    io = client._io
    while True:
        since = io.generation()
        if done():
            return True
        if guard is not None and guard.hit:
            return False  # the guard raises KeyboardInterrupt (or runs the user's handler)
        step = _step(deadline)
        if step <= 0:
            return False
        if client._closed:
            return _settled_until(done, deadline)
        try:
            batch = io.recv(timeout=step, max_messages=BATCH, since=since)
        except error.IoClosedError:
            continue
        if batch:
            client._last_traffic = time.monotonic()
            client._dispatch_batch(batch)
            io.wake()  # other threads waiting here look at their results again
