"""ipyparallel's canning API (``can`` / ``uncan``) over ferroparallel's serialization.

ipyparallel "cans" objects before pickling them (functions, arrays, buffers, ``Reference``)
and "uncans" them on the receiver against the engine's namespace. ferroparallel's pickler
handles all of those itself (see :mod:`.pickling`), so canning has nothing to do, and
uncanning is the receiver's namespace step: ``Reference`` objects are evaluated and
``__main__`` functions rebuilt over the namespace (see :mod:`.namespace`).
"""

from __future__ import annotations

from typing import Any

from .interactive import interactive
from .namespace import resolve_in_namespace
from .reference import Reference

__all__ = ["Reference", "can", "interactive", "uncan"]


def can(obj: Any) -> Any:
    """Prepare ``obj`` for pickling, as ipyparallel's ``can``: ferroparallel's pickler needs no
    preparation, so this returns ``obj`` itself.

    Parameters
    ----------
    obj : object
        Anything :func:`~ferroparallel.serialize.serialize_object` accepts.

    Returns
    -------
    object
        ``obj``.
    """
    return obj


def uncan(obj: Any, g: dict[str, Any] | None = None) -> Any:
    """Bind a received object to a namespace, as ipyparallel's ``uncan(obj, g)``.

    Parameters
    ----------
    obj : object
        A deserialized object.
    g : dict, optional
        The namespace (an engine's user namespace): ``Reference`` objects are evaluated in it
        and functions from ``__main__`` rebuilt with it as their globals, in ``obj`` and in
        plain lists, tuples and dicts inside it. Without ``g``, ``obj`` is returned as it is.

    Returns
    -------
    object
        The bound object.
    """
    if g is None:
        return obj
    return resolve_in_namespace(obj, g)
