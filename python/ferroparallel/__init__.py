"""ferroparallel: a Rust-accelerated implementation of the IPython.parallel ZMQ cluster.

Code written for IPython.parallel / ipyparallel runs after ``import ferroparallel as ipp``.
"""

from __future__ import annotations

from typing import Any

from . import error
from ._core import Frame, IoThread, Session, __version__
from .error import CompositeError, RemoteError

__all__ = [
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "Cluster",
    "CompositeError",
    "Dependency",
    "DirectView",
    "Frame",
    "IoThread",
    "LoadBalancedView",
    "Reference",
    "RemoteError",
    "Session",
    "__version__",
    "depend",
    "dependent",
    "error",
    "interactive",
    "require",
]

_LAZY = {
    "Client": "ferroparallel.client.client",
    "DirectView": "ferroparallel.client.view",
    "LoadBalancedView": "ferroparallel.client.view",
    "AsyncResult": "ferroparallel.client.asyncresult",
    "AsyncMapResult": "ferroparallel.client.asyncresult",
    "AsyncHubResult": "ferroparallel.client.asyncresult",
    "Cluster": "ferroparallel.cluster.cluster",
    "Dependency": "ferroparallel.dependency",
    "depend": "ferroparallel.dependency",
    "dependent": "ferroparallel.dependency",
    "require": "ferroparallel.dependency",
    "Reference": "ferroparallel.serialize",
    "interactive": "ferroparallel.serialize",
}


def __getattr__(name: str) -> Any:
    """Import the heavier parts (client, cluster) on first use, so engines and the controller
    start fast."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ferroparallel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext ferroparallel``: register the parallel magics (``%px`` …), which connect a
    default Client on first use."""
    from .client.magics import load_ipython_extension as load

    load(shell)
