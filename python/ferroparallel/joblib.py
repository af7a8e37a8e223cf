"""The joblib backend under ipyparallel's module name: ``ferroparallel.joblib.register()``
registers it as ``ipyparallel.joblib.register()`` does (same as
``ferroparallel.register_joblib_backend()``; ``view.register_joblib_backend()`` binds one view).

Then ``with joblib.parallel_backend("ipyparallel"): Parallel(...)(...)`` runs on the cluster.
"""

from __future__ import annotations

from .client.joblib_backend import register_default

__all__ = ["register"]


def register(name: str = "ipyparallel", make_default: bool = False) -> None:
    """Register the joblib backend ``name`` that runs on a default ``Client()`` (see
    :func:`ferroparallel.client.joblib_backend.register`).

    Raises
    ------
    ImportError
        If joblib is not installed.
    """
    register_default(name, make_default)
