"""ferroparallel: a Rust-accelerated implementation of the IPython.parallel ZMQ cluster.

Code written for IPython.parallel / ipyparallel runs after ``import ferroparallel as ipp``.
"""

from __future__ import annotations

import os
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from typing import Any

from ._allocator import mimalloc_without_huge_pages

with mimalloc_without_huge_pages():  # before anything loads the extension
    from ._core import Frame, IoThread, Session, __version__

from . import error
from .error import (
    AlreadyDisplayedError,
    CompositeError,
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    IPythonError,
    KernelError,
    NoEnginesRegistered,
    RemoteError,
    TaskAborted,
    TaskRejectError,
    TaskTimeout,
    UnmetDependency,
    collect_exceptions,
    unwrap_exception,
    wrap_exception,
)

#: ipyparallel exports the builtin under this name too (``except ipp.TimeoutError``).
TimeoutError = TimeoutError  # noqa: A001, PLW0127

#: ``__version__`` as a tuple of ints (as ipyparallel's ``version_info``).
version_info: tuple[int, ...] = tuple(
    int(part) for part in __version__.split("+")[0].split(".") if part.isdigit()
)

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AlreadyDisplayedError",
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "BroadcastView",
    "Client",
    "Cluster",
    "ClusterManager",
    "CompositeError",
    "Dependency",
    "DependencyTimeout",
    "DirectView",
    "EngineError",
    "Frame",
    "ImpossibleDependency",
    "InvalidDependency",
    "IPythonError",
    "IoThread",
    "KernelError",
    "LoadBalancedView",
    "NoEnginesRegistered",
    "ParallelFunction",
    "PrePickled",
    "Reference",
    "RemoteError",
    "RemoteFunction",
    "MultipleInstanceError",
    "Session",
    "TaskAborted",
    "TaskRejectError",
    "TaskTimeout",
    "TimeoutError",
    "UnmetDependency",
    "ViewExecutor",
    "__version__",
    "bind_kernel",
    "can",
    "collect_exceptions",
    "depend",
    "dependent",
    "deserialize_object",
    "error",
    "interactive",
    "pack_apply_message",
    "parallel",
    "register_joblib_backend",
    "remote",
    "require",
    "serialize_object",
    "uncan",
    "unpack_apply_message",
    "unwrap_exception",
    "use_cloudpickle",
    "use_dill",
    "use_pickle",
    "version_info",
    "wrap_exception",
]

#: ``$IPP_NONINTERACTIVE`` set (not empty, not "0"): output for scripts and logs, as in
#: ipyparallel: ``%px`` waits and shows each engine's output whole instead of streaming it.
_NONINTERACTIVE = os.getenv("IPP_NONINTERACTIVE", "") not in {"", "0"}

_LAZY = {
    "Client": "ferroparallel.client.client",
    "DirectView": "ferroparallel.client.view",
    "LoadBalancedView": "ferroparallel.client.view",
    "AsyncResult": "ferroparallel.client.asyncresult",
    "AsyncMapResult": "ferroparallel.client.asyncresult",
    "AsyncHubResult": "ferroparallel.client.asyncresult",
    "Cluster": "ferroparallel.cluster.cluster",
    "ClusterManager": "ferroparallel.cluster.manager",
    "Dependency": "ferroparallel.dependency",
    "depend": "ferroparallel.dependency",
    "dependent": "ferroparallel.dependency",
    "require": "ferroparallel.dependency",
    "Reference": "ferroparallel.serialize",
    "interactive": "ferroparallel.serialize",
    "BroadcastView": "ferroparallel.client.view",
    "serialize_object": "ferroparallel.serialize",
    "deserialize_object": "ferroparallel.serialize",
    "pack_apply_message": "ferroparallel.serialize",
    "unpack_apply_message": "ferroparallel.serialize",
    "use_cloudpickle": "ferroparallel.serialize",
    "use_pickle": "ferroparallel.serialize",
    "use_dill": "ferroparallel.serialize",
    "RemoteFunction": "ferroparallel.client.remotefunction",
    "ParallelFunction": "ferroparallel.client.remotefunction",
    "remote": "ferroparallel.client.remotefunction",
    "parallel": "ferroparallel.client.remotefunction",
    "ViewExecutor": "ferroparallel.client.executor",
    "can": "ferroparallel.serialize.canning",
    "uncan": "ferroparallel.serialize.canning",
    "MultipleInstanceError": "traitlets.config.configurable",
}

#: ipyparallel's names for objects that are called differently here.
_ALIASES = {
    "PrePickled": ("ferroparallel.serialize.pickling", "Prepickled"),
    "register_joblib_backend": ("ferroparallel.client.joblib_backend", "register_default"),
}


#: Submodules reachable as attributes without their own import (``ipp.util``, as in
#: ipyparallel, whose package imports them).
_SUBMODULES = ("client", "cluster", "controller", "serialize", "util")


def bind_kernel(**kwargs: Any) -> None:
    """ipyparallel's way to open an engine to Jupyter frontends as a full IPython kernel.

    ferroparallel engines are not ipykernel kernels, so there is no kernel to bind: use
    ``%px`` / ``%%px`` (or ``view.execute``) to run code on them interactively.

    Raises
    ------
    NotImplementedError
        Always, with that advice.
    """
    raise NotImplementedError(
        "bind_kernel: ferroparallel engines are not IPython kernels and cannot be attached to "
        "a Jupyter frontend; run code on them with %px / %%px or view.execute()"
    )


def __getattr__(name: str) -> Any:
    """Import the heavier parts (client, cluster) on first use, so engines and the controller
    start fast."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"ferroparallel.{name}")
    module, attr = _LAZY.get(name), name
    if module is None and name in _ALIASES:
        module, attr = _ALIASES[name]
    if module is None:
        if name in ("can_map", "uncan_map"):  # (ipyparallel's; see serialize.canning)
            from .serialize.canning import no_canning_registry

            raise no_canning_registry(name)
        raise AttributeError(f"module 'ferroparallel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, with those imported on first use (tab completion on ``ipp.``)."""
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES) | set(_SUBMODULES))


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext ferroparallel``: register the parallel magics (``%px`` …), which connect a
    default Client on first use."""
    from .client.magics import load_ipython_extension as load

    load(shell)
