"""Futures for single messages sent by the Client.

The client's dispatcher thread resolves a :class:`MessageFuture` when the reply to its message
arrives (``set_result`` / ``set_exception``), and resolves its :attr:`MessageFuture.output`
future when all IOPub output of the message has arrived.

Every future here is a :class:`SlimFuture`: a real ``concurrent.futures.Future`` that owns no
lock of its own. A client keeps several futures per task alive (the message, its output, the
AsyncResult), and ``concurrent.futures.Future`` gives each one a ``Condition``, an ``RLock``,
two lists and five bound methods: at 10^4 tasks in flight that is most of what the garbage
collector walks. A SlimFuture instead settles under one module-wide lock and wakes waiters
through one module-wide condition (:data:`SETTLED`); the per-future condition and waiter list
that ``concurrent.futures.wait``/``as_completed`` use are created only when such a function
actually waits on the future.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any

__all__ = [
    "SETTLED",
    "MessageFuture",
    "SlimFuture",
    "settling_batch",
    "wait_interruptibly",
    "wait_until",
]

log = logging.getLogger("ferroparallel.client")

#: Longest single blocking wait, so that signal handlers (Ctrl-C) run promptly on every platform.
POLL_INTERVAL = 0.05

#: The condition every SlimFuture settles under; notified whenever one of them finishes.
#: Callbacks never run while it is held.
SETTLED = threading.Condition(threading.RLock())
#: SETTLED's lock, entered directly (a ``with SETTLED`` goes through Python-level methods).
_LOCK: Any = SETTLED._lock  # type: ignore[attr-defined]


#: Per thread: whether this thread settles a batch (see :func:`settling_batch`).
_BATCH = threading.local()


def _notify_settled() -> None:
    """``SETTLED.notify_all()`` when someone waits (call with the lock held); inside
    :func:`settling_batch`, once at the end of the batch instead."""
    if getattr(_BATCH, "active", False):
        _BATCH.pending = True
    elif SETTLED._waiters:  # type: ignore[attr-defined]
        SETTLED.notify_all()


class settling_batch:  # noqa: N801 - used like a function: ``with settling_batch():``
    """Within this context, futures settled by the current thread wake waiters once, on exit,
    instead of once per future (and again per callback round): a dispatcher settling a batch
    of replies wakes a thread waiting on one of them once, not hundreds of times while it
    still holds the GIL. Callbacks still run at once; only the waking is deferred.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        _BATCH.active = True
        _BATCH.pending = False

    def __exit__(self, *exc: object) -> None:
        _BATCH.active = False
        if _BATCH.pending:
            _BATCH.pending = False
            with _LOCK:
                if SETTLED._waiters:  # type: ignore[attr-defined]
                    SETTLED.notify_all()


_DONE_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class SlimFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` without a lock of its own (see the module docstring).

    Behaves exactly like ``concurrent.futures.Future`` (``result``, ``exception``,
    ``add_done_callback``, ``cancel``, ``set_result``, ``set_exception``, and it works with
    ``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future``).
    """

    def __init__(self) -> None:  # noqa: D107 - no super().__init__(): that allocates the lock
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Any], Any]] | None = None
        self._cond_: threading.Condition | None = None
        self._waiters_: list[Any] | None = None
        self._callbacks_ran = False

    # -- what concurrent.futures.wait/as_completed use; created on their first use ------------

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond_
        if cond is None:
            with _LOCK:
                if self._cond_ is None:
                    self._waiters_ = []
                    self._cond_ = threading.Condition()
                cond = self._cond_
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        self._condition  # noqa: B018 - creates the waiter list with the condition
        return self._waiters_  # type: ignore[return-value]

    # -- state ---------------------------------------------------------------------------------

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def cancel(self) -> bool:
        with _LOCK:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            callbacks = self._take_callbacks_locked()
            _notify_settled()
        self._notify_external()
        self._run_callbacks(callbacks)
        self._mark_callbacks_ran()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with _LOCK:
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                return False
            if self._state == PENDING:
                self._state = RUNNING
                return True
        raise RuntimeError(f"Future in unexpected state: {self._state}")

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)

    def _settle(self, result: Any, exception: BaseException | None) -> None:
        with _LOCK:
            if self._state in _DONE_STATES:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = FINISHED
            callbacks = self._take_callbacks_locked()
            if callbacks is None:  # nothing to run: settled at once (one lock round, not two)
                self._callbacks_ran = True
            _notify_settled()
        if self._cond_ is not None:
            self._notify_external()
        if callbacks is not None:
            self._run_callbacks(callbacks)
            self._mark_callbacks_ran()

    def _mark_callbacks_ran(self) -> None:
        with _LOCK:
            self._callbacks_ran = True
            _notify_settled()

    def settled(self) -> bool:
        """Whether the future is done and the callbacks it had then have run (so that, e.g.,
        an AsyncResult over this message has seen it finish)."""
        return self._callbacks_ran

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`settled` (interruptible by Ctrl-C); False on timeout."""
        if self._callbacks_ran:
            return True
        return wait_until(self.settled, None if timeout is None or timeout < 0 else timeout)

    def _take_callbacks_locked(self) -> list[Callable[[Any], Any]] | None:
        callbacks, self._callbacks = self._callbacks, None
        return callbacks

    def _notify_external(self) -> None:
        """Wake ``concurrent.futures.wait``/``as_completed`` calls waiting on this future."""
        cond = self._cond_
        if cond is None:
            return
        with cond:
            for waiter in self._waiters_ or ():
                if self._state == FINISHED:
                    if self._exception is not None:
                        waiter.add_exception(self)
                    else:
                        waiter.add_result(self)
                else:
                    waiter.add_cancelled(self)
            cond.notify_all()

    def _run_callbacks(self, callbacks: list[Callable[[Any], Any]] | None) -> None:
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as concurrent.futures: log and go on
                log.exception("exception calling callback for %r", self)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        with _LOCK:
            if self._state not in _DONE_STATES:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        self._run_callbacks([fn])

    # -- results -------------------------------------------------------------------------------

    def _wait_done(self, timeout: float | None) -> None:
        if self._state in _DONE_STATES:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with _LOCK:
            while self._state not in _DONE_STATES:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError()
                SETTLED.wait(left)

    def result(self, timeout: float | None = None) -> Any:
        self._wait_done(timeout)
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise concurrent.futures.CancelledError()
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_done(timeout)
        if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise concurrent.futures.CancelledError()
        return self._exception

    def __repr__(self) -> str:
        state = self._state
        if state == FINISHED:
            if self._exception is not None:
                what = f"raised {type(self._exception).__name__}"
            else:
                what = f"returned {type(self._result).__name__}"
            return f"<{type(self).__name__} at {id(self):#x} state=finished {what}>"
        return f"<{type(self).__name__} at {id(self):#x} state={state.lower()}>"


def wait_until(predicate: Callable[[], bool], timeout: float | None = None) -> bool:
    """Wait until ``predicate()``, re-checked whenever a SlimFuture settles (and at least every
    :data:`POLL_INTERVAL`, so Ctrl-C is seen); False after ``timeout`` seconds (None: no
    limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with SETTLED:
        while not predicate():
            step = POLL_INTERVAL
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return False
            SETTLED.wait(step)
    return True


def wait_interruptibly(
    futures: concurrent.futures.Future | list[concurrent.futures.Future],
    timeout: float | None = None,
    return_when: str = concurrent.futures.ALL_COMPLETED,
) -> bool:
    """Wait for futures in short slices so that KeyboardInterrupt is raised promptly.

    Parameters
    ----------
    futures : Future or list of Future
    timeout : float, optional
        Seconds; None or a negative number waits forever.
    return_when : str
        ``concurrent.futures.ALL_COMPLETED`` (default) or ``FIRST_COMPLETED``.

    Returns
    -------
    bool
        Whether the condition was met before the timeout.
    """
    fs = [futures] if isinstance(futures, concurrent.futures.Future) else list(futures)
    if timeout is not None and timeout < 0:
        timeout = None
    deadline = None if timeout is None else time.monotonic() + timeout

    def met() -> bool:
        if return_when == concurrent.futures.FIRST_COMPLETED:
            return not fs or any(f.done() for f in fs)
        return all(f.done() for f in fs)

    slim = all(isinstance(f, SlimFuture) for f in fs)
    while True:
        pending = [f for f in fs if not f.done()]
        if met():
            return True
        if deadline is None:
            step = POLL_INTERVAL
        else:
            step = min(POLL_INTERVAL, deadline - time.monotonic())
            if step <= 0:
                return False
        if slim:
            # every SlimFuture notifies SETTLED when it finishes: no per-future waiter needed
            with SETTLED:
                if not met():
                    SETTLED.wait(step)
        else:
            concurrent.futures.wait(pending, timeout=step, return_when=return_when)
        if return_when == concurrent.futures.ALL_COMPLETED:
            fs = pending


class MessageFuture(SlimFuture):
    """The future result of one message (apply, execute, control request) sent to an engine.

    Parameters
    ----------
    msg_id : str
        The request's ``msg_id``.
    header : dict, optional
        The request's header (default: ``{"msg_id": msg_id}``).
    track : object, optional
        A send tracker for zero-copy sends (an object with ``done`` and ``wait(timeout)``, such
        as a ``zmq.MessageTracker``, or a ``concurrent.futures.Future`` resolved once sent).

    Attributes
    ----------
    msg_id : str
    header : dict
    track : object or None
    output : concurrent.futures.Future
        Resolved (with None) once all IOPub output of the message has arrived.

    Notes
    -----
    A sent message cannot be taken back, so :meth:`cancel` always returns False; use
    ``client.abort`` to abort a queued task.
    """

    def __init__(
        self, msg_id: str, header: dict[str, Any] | None = None, track: object | None = None
    ) -> None:
        super().__init__()
        self.msg_id = msg_id
        self.header: dict[str, Any] = header if header is not None else {"msg_id": msg_id}
        self.track = track
        #: the client's Metadata of this message (set when the client registers it)
        self.md: Any = None
        # the output future is created only when asked for (most never are): until then,
        # whether the output is complete is this flag
        self._output: SlimFuture | None = None
        self._output_complete = False
        #: IOPub outputs received, and how many the engine said it sent (None: not known yet,
        #: or an engine that does not say; then the ``idle`` status completes the output)
        self.outputs_seen = 0
        self.outputs_expected: int | None = None

    def cancel(self) -> bool:
        """A sent message cannot be cancelled: always False (see ``Client.abort``)."""
        return False

    @property
    def output(self) -> concurrent.futures.Future:
        """Resolved (with None) once all IOPub output of the message has arrived."""
        out = self._output
        if out is None:
            with _LOCK:
                out = self._output
                if out is None:
                    out = self._output = SlimFuture()
                    complete = self._output_complete
                else:
                    complete = False
            if complete:  # outside the lock: settling notifies under it
                out.set_result(None)
        return out

    def output_done(self) -> bool:
        """Whether all IOPub output has arrived (without creating :attr:`output`)."""
        return self._output_complete

    def finish_output(self) -> None:
        """Mark the output complete (idempotent); resolves :attr:`output` if it exists."""
        with _LOCK:
            if self._output_complete:
                return
            self._output_complete = True
            out = self._output
        if out is not None and not out.done():
            try:
                out.set_result(None)
            except concurrent.futures.InvalidStateError:  # pragma: no cover - raced
                pass

    @property
    def sent(self) -> bool:
        """Whether the message has left (always True unless it is tracked and still in flight)."""
        track = self.track
        if track is None or track is False or track is True:
            return True
        done = getattr(track, "done", True)
        return bool(done() if callable(done) else done)

    def wait_for_send(self, timeout: float | None = None) -> bool:
        """Wait until the message has been sent (tracked sends only).

        Parameters
        ----------
        timeout : float, optional
            Seconds; None or negative waits forever.

        Returns
        -------
        bool
            Whether the message has been sent.
        """
        track = self.track
        if self.sent:
            return True
        if isinstance(track, concurrent.futures.Future):
            return wait_interruptibly(track, timeout)
        if timeout is not None and timeout < 0:
            timeout = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.sent:
            step = (
                POLL_INTERVAL
                if deadline is None
                else min(POLL_INTERVAL, deadline - time.monotonic())
            )
            if step <= 0:
                return False
            try:
                track.wait(step)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - zmq raises NotDone on timeout
                pass
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the reply (interruptible); True when it has arrived."""
        return wait_interruptibly(self, timeout)

    def __repr__(self) -> str:
        return f"<MessageFuture({self.msg_id}): {self._state.lower()}>"
