"""A joblib parallel backend that runs batches on a LoadBalancedView."""

from __future__ import annotations

import weakref
from typing import Any


def register(view: Any, name: str = "ipyparallel", make_default: bool = False) -> None:
    """Register ``view`` as the joblib backend ``name`` (``"ipyparallel"`` by default, so code
    written for ipyparallel's backend runs unchanged).

    With ``view=None``, each use of the backend (each ``joblib.parallel_backend(name)`` block
    or ``Parallel`` call) connects a default ``Client()`` and runs on a LoadBalancedView of all
    its engines, closed when joblib drops the backend.

    Raises
    ------
    ImportError
        If joblib is not installed.
    """
    try:
        from joblib.parallel import ParallelBackendBase, register_parallel_backend
    except ImportError as e:
        raise ImportError("register_joblib_backend needs joblib: pip install joblib") from e

    class FerroBackend(ParallelBackendBase):
        supports_timeout = True
        supports_retrieve_callback = True

        def __init__(self, view: Any = view, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if view is None:
                from .client import Client

                client = Client()
                view = client.load_balanced_view()
                # joblib may run several Parallel calls on one backend: close when it is gone
                weakref.finalize(self, client.close)
            self.view = view

        def effective_n_jobs(self, n_jobs: int) -> int:
            return max(len(self.view.client.ids), 1)

        def submit(self, func: Any, callback: Any = None) -> Any:
            ar = self.view.apply_async(func)
            if callback is not None:
                ar.add_done_callback(callback)
            return ar

        def retrieve_result_callback(self, out: Any) -> Any:
            return out.result()

        def retrieve_result(self, out: Any, timeout: float | None = None) -> Any:
            return out.get(timeout=timeout)

        def apply_async(self, func: Any, callback: Any = None) -> Any:  # older joblib
            return self.submit(func, callback)

    register_parallel_backend(name, FerroBackend, make_default=make_default)


def register_default(name: str = "ipyparallel", make_default: bool = False) -> None:
    """``ferroparallel.register_joblib_backend()``: register a joblib backend that connects a
    default ``Client()`` when used (see :func:`register`; ``view.register_joblib_backend()``
    binds one view instead)."""
    register(None, name, make_default)
