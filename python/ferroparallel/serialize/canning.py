"""ipyparallel's canning API (``can`` / ``uncan``) over ferroparallel's serialization.

ipyparallel "cans" objects before pickling them (functions, arrays, buffers, ``Reference``)
and "uncans" them on the receiver against the engine's namespace. ferroparallel's pickler
handles all of those itself (see :mod:`.pickling`), so canning has nothing to do, and
uncanning is the receiver's namespace step: ``Reference`` objects are evaluated and
``__main__`` functions rebuilt over the namespace (see :mod:`.namespace`).
"""

from __future__ import annotations

import types
from typing import Any

from .interactive import interactive
from .namespace import resolve_in_namespace
from .pickling import load_object, serialize_object, use_cloudpickle, use_dill, use_pickle
from .reference import Reference

__all__ = [
    "CannedFunction",
    "Reference",
    "can",
    "interactive",
    "uncan",
    "use_cloudpickle",
    "use_dill",
    "use_pickle",
]

#: ipyparallel's canning registries, which ferroparallel's serialization does not consult.
CANNING_REGISTRIES = ("can_map", "uncan_map")


def no_canning_registry(name: str) -> AttributeError:
    """The error for ipyparallel's ``can_map`` / ``uncan_map``: ferroparallel pickles objects
    directly, so a registry entry would never be used; say what to do instead (an
    ``AttributeError``, so ``hasattr`` still answers False)."""
    return AttributeError(
        f"{name}: ferroparallel does not can objects before pickling them, so ipyparallel's "
        "canning registries (can_map / uncan_map) would never be consulted; make a type "
        "picklable with __reduce__ or copyreg.pickle(), or choose the pickler with "
        "use_cloudpickle() / use_dill() / use_pickle()"
    )


def __getattr__(name: str) -> Any:
    if name in CANNING_REGISTRIES:
        raise no_canning_registry(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CannedFunction:
    """A function made picklable by the standard :mod:`pickle`, as ipyparallel's canned
    functions are: it holds the function serialized by ferroparallel (cloudpickle, by value
    for lambdas, closures and ``__main__`` functions). :func:`uncan` rebuilds it.

    Parameters
    ----------
    f : function
        The function.
    """

    def __init__(self, f: types.FunctionType) -> None:
        self.frames = [bytes(memoryview(frame)) for frame in serialize_object(f)]

    def get_object(self, g: dict[str, Any] | None = None) -> Any:
        """The function, rebuilt over namespace ``g`` when it is a ``__main__`` function."""
        return load_object(self.frames, g)


def can(obj: Any) -> Any:
    """Prepare ``obj`` for the standard :mod:`pickle`, as ipyparallel's ``can``: a function
    becomes a :class:`CannedFunction`; anything else is returned as it is (ferroparallel's own
    serialization needs no canning at all).

    Parameters
    ----------
    obj : object
        Any object.

    Returns
    -------
    object
        ``obj``, or its :class:`CannedFunction`.
    """
    if type(obj) is types.FunctionType:
        return CannedFunction(obj)
    return obj


def uncan(obj: Any, g: dict[str, Any] | None = None) -> Any:
    """Bind a received object to a namespace, as ipyparallel's ``uncan(obj, g)``.

    Parameters
    ----------
    obj : object
        A deserialized object, or a :class:`CannedFunction`.
    g : dict, optional
        The namespace (an engine's user namespace): ``Reference`` objects are evaluated in it
        and functions from ``__main__`` rebuilt with it as their globals, in ``obj`` and in
        plain lists, tuples and dicts inside it. Without ``g``, ``obj`` is returned as it is.

    Returns
    -------
    object
        The bound object.
    """
    if isinstance(obj, CannedFunction):
        return obj.get_object(g)
    if g is None:
        return obj
    return resolve_in_namespace(obj, g)
