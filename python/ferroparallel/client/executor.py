"""``concurrent.futures.Executor`` over a view."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from .asyncresult import _outcome
from .futures import wait_interruptibly


class ViewExecutor(Executor):
    """Submit calls through a view; every returned future is an AsyncResult.

    As ipyparallel's, one executor per view (``view.executor``), and :meth:`shutdown` waits
    for the view's outstanding work but stops no engine.
    """

    def __init__(self, view: Any) -> None:
        self.view = view
        self._submitted: list[Future] = []

    @property
    def _max_workers(self) -> int:
        """How many engines the view runs on (the stdlib executors' attribute, which dask's
        ``scheduler="threads"`` with ``pool=executor`` reads, as ipyparallel sets it)."""
        return len(self.view)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._submitted = [f for f in self._submitted if not f.done()]
        self._submitted.append(ar)
        return ar

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """``fn`` over the iterables, submitted at once; the results in order, as
        ``concurrent.futures`` gives them: a failed call raises its own exception when its
        turn comes, and ``TimeoutError`` if a result is not there ``timeout`` seconds after
        this call.

        Other keywords are the view's ``imap`` options, as ipyparallel passes them on
        (``ordered=False``, ``max_outstanding``, ``return_exceptions`` on a load-balanced
        view): the map is then the view's ``imap``, consuming the inputs lazily.

        Raises
        ------
        TypeError
            ``imap`` options with ``timeout`` or ``chunksize`` (``imap`` takes neither), or
            options the view's ``imap`` does not know.
        """
        if kwargs:
            if timeout is not None or chunksize != 1:
                raise TypeError(
                    f"ViewExecutor.map: timeout and chunksize cannot be combined with the "
                    f"view's imap options ({', '.join(sorted(kwargs))})"
                )
            return iter(self.view.imap(fn, *iterables, **kwargs))
        end = None if timeout is None else time.monotonic() + timeout
        seqs = [list(it) for it in iterables]
        # only a load-balanced map takes a chunksize (a direct map splits by engine)
        kwargs: dict[str, Any] = {"return_exceptions": True}
        if getattr(self.view, "load_balanced", False):
            kwargs["chunksize"] = chunksize
        ar = self.view.map_async(fn, *seqs, **kwargs)
        self._submitted.append(ar)
        return _results_in_order(ar, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Abort the queued futures of this executor (``cancel_futures``), then wait for
        everything still outstanding on the view (``wait``). The engines keep running."""
        if cancel_futures:
            pending = [f for f in self._submitted if not f.done()]
            if pending:
                self.view.client.abort(pending)
        if wait:
            self.view.wait()
            wait_interruptibly(self._submitted)
        self._submitted.clear()


def _results_in_order(ar: Any, end: float | None) -> Iterator[Any]:
    for i, child in enumerate(ar._children):
        left = None if end is None else max(end - time.monotonic(), 0.0)
        if not wait_interruptibly(child, left):
            raise TimeoutError(f"map results not ready within the timeout ({len(ar)} calls)")
        value, failed = _outcome(child)
        if failed:
            raise value  # (the call's own error, not a CompositeError)
        yield from ar._chunk_items(i)
