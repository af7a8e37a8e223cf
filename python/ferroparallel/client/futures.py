"""Futures for single messages sent by the Client.

The client's dispatcher thread resolves a :class:`MessageFuture` when the reply to its message
arrives (``set_result`` / ``set_exception``), and resolves its :attr:`MessageFuture.output`
future when all IOPub output of the message has arrived.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

__all__ = ["MessageFuture", "wait_interruptibly"]

#: Longest single blocking wait, so that signal handlers (Ctrl-C) run promptly on every platform.
POLL_INTERVAL = 0.05


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
        concurrent.futures.wait(pending, timeout=step, return_when=return_when)
        if return_when == concurrent.futures.ALL_COMPLETED:
            fs = pending


class MessageFuture(concurrent.futures.Future):
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
        self.output: concurrent.futures.Future = concurrent.futures.Future()

    def cancel(self) -> bool:
        """A sent message cannot be cancelled: always False (see ``Client.abort``)."""
        return False

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
