"""Receiver side: resolve ``Reference`` objects and relink ``__main__`` functions."""

from __future__ import annotations

import types
from typing import Any

from .buffers import SCAN_BUDGET
from .interactive import Relinker
from .reference import Reference
from .walk import transform_leaves

_LEAF_TYPES: frozenset[type] = frozenset({Reference, types.FunctionType})


def resolve_in_namespace(obj: Any, namespace: dict[str, Any]) -> Any:
    """Bind a freshly unpickled object to the engine namespace.

    ``Reference(name)`` becomes ``eval(name, namespace)`` and functions from ``__main__`` are
    rebuilt with ``namespace`` as their globals (see :mod:`.interactive`). Applies to ``obj``
    itself and to values at any depth of plain lists, tuples and dicts (at most
    :data:`~.buffers.SCAN_BUDGET` container items in all; larger containers are left as they
    are); objects inside other objects (attributes, sets, subclasses of the containers) are
    left as they are.

    Parameters
    ----------
    obj : object
        The unpickled object.
    namespace : dict
        The engine's user namespace.

    Returns
    -------
    object
        ``obj``, or a copy of its containers with the resolved values.
    """
    relinker = Relinker(namespace)

    def leaf(value: Any) -> Any:
        if type(value) is Reference:
            return value.get_object(namespace)
        if value.__module__ == "__main__":
            return relinker.relink(value)
        return value

    return transform_leaves(obj, _LEAF_TYPES, leaf, SCAN_BUDGET)
