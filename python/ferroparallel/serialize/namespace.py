"""Receiver side: resolve ``Reference`` objects and relink ``__main__`` functions."""

from __future__ import annotations

import types
from typing import Any

from .buffers import SCAN_BUDGET
from .interactive import Relinker
from .reference import Reference
from .walk import transform_leaves

_LEAF_TYPES: frozenset[type] = frozenset({Reference, types.FunctionType})
#: The leaf types with ``dependent`` (imported on first use: that module imports this package).
_leaf_types: frozenset[type] | None = None


def _all_leaf_types() -> frozenset[type]:
    global _leaf_types  # noqa: PLW0603 - a once-computed cache
    if _leaf_types is None:
        from ..dependency import dependent  # noqa: PLC0415 - circular at import time

        _leaf_types = _LEAF_TYPES | {dependent}
    return _leaf_types


def resolve_in_namespace(obj: Any, namespace: dict[str, Any]) -> Any:
    """Bind a freshly unpickled object to the engine namespace.

    ``Reference(name)`` becomes ``eval(name, namespace)`` and functions from ``__main__`` are
    rebuilt with ``namespace`` as their globals (see :mod:`.interactive`). A ``dependent``
    (``@depend``/``@require``) gets the same treatment of its function, condition and their
    arguments, then its condition is checked (UnmetDependency where it does not hold).
    Applies to ``obj`` itself and to values at any depth of plain lists, tuples and dicts (at
    most :data:`~.buffers.SCAN_BUDGET` container items in all; larger containers are left as
    they are); objects inside other objects (attributes, sets, subclasses of the containers)
    are left as they are.

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
    return _Resolver(namespace).resolve(obj)


class _Resolver:
    """What :func:`resolve_in_namespace` does for one object (a class rather than two nested
    functions calling each other, whose closures would make a reference cycle, left to the
    garbage collector, per resolved request)."""

    __slots__ = ("leaf_types", "namespace", "relinker")

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.relinker = Relinker(namespace)
        self.leaf_types = _all_leaf_types()

    def leaf(self, value: Any) -> Any:
        t = type(value)
        if t is Reference:
            return value.get_object(self.namespace)
        if t is types.FunctionType:
            return self.relinker.relink(value) if value.__module__ == "__main__" else value
        return value._resolve_in(self.resolve)  # a dependent

    def resolve(self, value: Any) -> Any:
        return transform_leaves(value, self.leaf_types, self.leaf, SCAN_BUDGET)
