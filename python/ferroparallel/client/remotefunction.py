"""``@view.remote`` and ``@view.parallel`` function wrappers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class RemoteFunction:
    """Calling it runs the wrapped function through a view's ``apply``."""

    def __init__(
        self, view: Any, f: Callable[..., Any], block: bool | None = None, **flags: Any
    ) -> None:
        self.view = view
        self.func = f
        self.block = block
        self.flags = flags
        functools.update_wrapper(self, f)
        if getattr(f, "__doc__", None):
            # say what the wrapper is, then the wrapped function's own doc (as ipyparallel's)
            name = getattr(f, "__name__", type(f).__name__)
            self.__doc__ = f"{type(self).__name__} around {name}():\n\n{f.__doc__}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(block=block, **self.flags):
            return self.view.apply(self.func, *args, **kwargs)


class ParallelFunction(RemoteFunction):
    """Calling it maps the wrapped function over its sequence arguments; ``.map`` is the
    element-wise form."""

    def __init__(
        self,
        view: Any,
        f: Callable[..., Any],
        dist: str = "b",
        block: bool | None = None,
        chunksize: int | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        **flags: Any,
    ) -> None:
        super().__init__(view, f, block=block, **flags)
        if dist not in ("b", "r"):
            raise ValueError(f"dist must be 'b' or 'r', not {dist!r}")
        self.dist = dist
        self.chunksize = chunksize
        self.ordered = bool(ordered)
        self.return_exceptions = bool(return_exceptions)

    @property
    def mapObject(self) -> Any:  # noqa: N802 - ipyparallel's name
        """How the sequences are split across engines (ipyparallel's attribute): a
        :class:`~.map.Map` for ``dist='b'``, a :class:`~.map.RoundRobinMap` for ``'r'``. Read
        only: the split is chosen by ``dist``."""
        from .map import dists

        return dists[self.dist]()

    def __call__(self, *sequences: Any, **kwargs: Any) -> Any:
        """Partition the sequences, call the function once per part (it receives a part and
        returns a sequence), and join the returned parts."""
        block = self.view.block if self.block is None else self.block
        if kwargs:
            raise TypeError("parallel functions take sequences as positional arguments only")
        with self.view.temp_flags(**self.flags):
            return self.view._parallel_call(
                self.func,
                sequences,
                self.dist,
                block,
                self.chunksize,
                return_exceptions=self.return_exceptions,
            )

    def map(self, *sequences: Any) -> Any:
        """Call the function on each element (of the zipped sequences): a load-balanced
        view sends a task per element (``chunksize`` per task, in order unless ``ordered``
        is false), a direct view one task per engine."""
        block = self.view.block if self.block is None else self.block
        options: dict[str, Any] = {"return_exceptions": self.return_exceptions}
        if getattr(self.view, "load_balanced", False):  # order and chunks apply
            options["ordered"] = self.ordered
            if self.chunksize:
                options["chunksize"] = self.chunksize
        with self.view.temp_flags(**self.flags):
            return self.view.map(self.func, *sequences, block=block, **options)


def remote(view: Any, block: bool | None = None, **flags: Any) -> Callable[[Callable], Any]:
    """Decorator (ipyparallel's ``ipp.remote``): calling the function runs it on ``view``,
    as ``view.remote(block, **flags)`` does."""

    def deco(f: Callable[..., Any]) -> RemoteFunction:
        return RemoteFunction(view, f, block=block, **flags)

    return deco


def parallel(
    view: Any, dist: str = "b", block: bool | None = None, ordered: bool = True, **flags: Any
) -> Callable[[Callable], Any]:
    """Decorator (ipyparallel's ``ipp.parallel``): calling the function splits its sequence
    arguments across ``view``'s engines; ``.map`` applies it element-wise."""

    def deco(f: Callable[..., Any]) -> ParallelFunction:
        return ParallelFunction(view, f, dist=dist, block=block, ordered=ordered, **flags)

    return deco
