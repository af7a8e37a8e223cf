"""``LoadBalancedView.imap``: a lazy map that consumes its inputs as tasks finish."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .asyncresult import AsyncResult
    from .view import LoadBalancedView


class _ImapFeed:
    """The state an imap shares with its feeder thread (not the iterator itself, so that an
    abandoned iterator can be collected, which stops the feeding)."""

    def __init__(self, view: LoadBalancedView, fp: Any, inputs: list[Iterator[Any]], limit: int):
        self.view = view
        self.fp = fp
        self.inputs = inputs
        self.limit = limit  # 0: no limit
        self.cond = threading.Condition()
        self.submitted: deque[AsyncResult] = deque()  # not yet yielded, in submission order
        self.in_flight = 0
        self.done = False  # no more input will be submitted
        self.stopped = False  # cancel() or the iterator is gone
        self.error: BaseException | None = None  # what consuming the input raised

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.limit and self.in_flight >= self.limit and not self.stopped:
                        self.cond.wait(0.5)
                    if self.stopped:
                        return
                try:
                    args = [next(it) for it in self.inputs]
                except StopIteration:
                    return
                ar = self.view._really_apply(self.fp, args, {}, block=False)
                with self.cond:
                    self.in_flight += 1
                    self.submitted.append(ar)
                    self.cond.notify_all()
                ar.add_done_callback(self._finished)
        except BaseException as e:  # noqa: BLE001 - the input raised: the consumer gets it
            with self.cond:
                self.error = e
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def _finished(self, _ar: Any) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class LazyMapIterator:
    """The iterator of :meth:`LoadBalancedView.imap`. As ipyparallel's, it starts at once: a
    thread consumes the inputs and submits a task for each, keeping at most ``limit`` tasks
    in flight (``0``: no limit) and submitting the next one as a task finishes; results wait
    for the caller. An abandoned iterator stops submitting."""

    def __init__(
        self,
        view: LoadBalancedView,
        fp: Any,
        sequences: Sequence[Any],
        limit: int,
        ordered: bool,
        return_exceptions: bool,
    ) -> None:
        self._view = view
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._feed = _ImapFeed(view, fp, [iter(s) for s in sequences], limit)
        weakref.finalize(self, self._feed.stop)
        self._thread = threading.Thread(
            target=self._feed.run, name="ferroparallel-imap", daemon=True
        )
        self._thread.start()

    @property
    def _pending(self) -> list[AsyncResult]:
        """Submitted tasks whose results have not been taken yet."""
        with self._feed.cond:
            return list(self._feed.submitted)

    def __iter__(self) -> LazyMapIterator:
        return self

    def _take(self) -> AsyncResult:
        feed = self._feed
        with feed.cond:
            while True:
                if self._ordered and feed.submitted:
                    return feed.submitted.popleft()
                if not self._ordered:
                    for ar in feed.submitted:
                        if ar.done():
                            feed.submitted.remove(ar)
                            return ar
                if feed.done and not feed.submitted:
                    error, feed.error = feed.error, None
                    if error is not None:
                        raise error
                    raise StopIteration
                feed.cond.wait(0.1)  # (short: Ctrl-C is seen)

    def __next__(self) -> Any:
        ar = self._take()
        if self._return_exceptions:
            try:
                return ar.get()
            except Exception as e:  # noqa: BLE001 - returned as a value on request
                return e
        return ar.get()

    def cancel(self) -> None:
        """Submit nothing more and abort the tasks not started yet; the iteration ends."""
        feed = self._feed
        feed.stop()
        self._thread.join(30)
        with feed.cond:
            pending = list(feed.submitted)
            feed.submitted.clear()
        waiting = [ar for ar in pending if not ar.done()]
        if waiting:
            self._view.client.abort(waiting, block=False)
