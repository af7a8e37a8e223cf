"""``concurrent.futures.Executor`` over a view."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any


class ViewExecutor(Executor):
    """Submit calls through a view; every returned future is an AsyncResult."""

    def __init__(self, view: Any) -> None:
        self.view = view
        self._submitted: list[Future] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._submitted.append(ar)
        return ar

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        seqs = [list(it) for it in iterables]
        # only a load-balanced map takes a chunksize (a direct map splits by engine)
        kwargs = {"chunksize": chunksize} if getattr(self.view, "load_balanced", False) else {}
        ar = self.view.map_async(fn, *seqs, **kwargs)
        self._submitted.append(ar)
        if timeout is not None:
            ar.wait(timeout)
        return iter(ar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            pending = [f for f in self._submitted if not f.done()]
            if pending:
                self.view.client.abort(pending)
        if wait:
            for f in self._submitted:
                try:
                    f.exception()
                except Exception:  # noqa: BLE001
                    pass
        self._submitted.clear()
