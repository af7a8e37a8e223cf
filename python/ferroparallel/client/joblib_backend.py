"""A joblib parallel backend that runs batches on a LoadBalancedView."""

from __future__ import annotations

import weakref
from typing import Any


def register(view: Any, name: str = "ipyparallel", make_default: bool = False) -> None:
    """Register ``view`` as the joblib backend ``name`` (``"ipyparallel"`` by default, so code
    written for ipyparallel's backend runs unchanged).

    With ``view=None``, each use of the backend (each ``joblib.parallel_backend(name)`` block
    or ``Parallel`` call) finds a cluster as ipyparallel's backend does: the default profile's
    unnamed cluster (``Cluster.from_file()``, starting engines if it has none), else a running
    controller of the default profile (``Client()``), else a new local ``Cluster()`` that it
    stops when joblib is done with the backend; it runs on a LoadBalancedView of all the
    engines.

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
            self._cluster: Any = None
            if view is None:
                client, self._cluster = _default_client()
                view = client.load_balanced_view()
                # joblib may run several Parallel calls on one backend: close when it is gone
                weakref.finalize(self, _release, client, self._cluster)
            self.view = view

        def effective_n_jobs(self, n_jobs: int) -> int:
            targets = self.view.targets
            if targets is not None and not isinstance(targets, str):
                return max(len(targets) if isinstance(targets, list | tuple) else 1, 1)
            return max(len(self.view.client.ids), 1)

        def terminate(self) -> None:
            """Stop the cluster this backend started, if any (as ipyparallel's)."""
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                _release(self.view.client, cluster)

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


def _default_client() -> tuple[Any, Any]:
    """``(client, cluster it started or None)`` for a backend without a view."""
    from ..cluster import Cluster
    from .client import Client

    try:
        cluster = Cluster.from_file()  # the default profile's unnamed cluster
    except (FileNotFoundError, ValueError):
        cluster = None
    if cluster is not None and cluster.running:
        if not cluster.engines:
            cluster.start_engines_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(cluster.n or 1, timeout=cluster.engine_timeout)
        return client, None
    try:
        client = Client(timeout=1)  # a controller of the default profile, started otherwise
    except Exception:  # noqa: BLE001 - none usable (no file, stale, unreachable): start one
        pass
    else:
        if client.ids:
            return client, None
        client.close()
    cluster = Cluster()
    return cluster.start_and_connect_sync(), cluster


def _release(client: Any, cluster: Any) -> None:
    client.close()
    if cluster is not None:
        cluster.stop_cluster_sync()
