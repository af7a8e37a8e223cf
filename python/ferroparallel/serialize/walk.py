"""Copy-on-write transformation of leaves inside plain list / tuple / dict containers.

Used on the sending side to wrap large ``bytes``/``bytearray`` values so they leave the pickle
as their own frames, and on the receiving side to resolve ``Reference`` objects and relink
interactive functions into the engine namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONTAINER_TYPES: frozenset[type] = frozenset({list, tuple, dict})


class _CycleError(Exception):
    """A container contains itself; the walk gives up and keeps the original object."""


class _Walker:
    def __init__(
        self, leaf_types: frozenset[type], leaf: Callable[[Any], Any], budget: int | None
    ) -> None:
        self.leaf_types = leaf_types
        self.interesting = leaf_types | CONTAINER_TYPES
        self.leaf = leaf
        self.budget = budget
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()

    def visit(self, obj: Any) -> Any:
        t = type(obj)
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if t in self.leaf_types:
            result = self.done[key] = self.leaf(obj)
            return result
        if t not in CONTAINER_TYPES or not obj:
            return obj
        if key in self.active:
            raise _CycleError
        if self.budget is not None:
            if len(obj) > self.budget:
                return obj  # too large to inspect: left as it is
            self.budget -= len(obj)
        values = obj.values() if t is dict else obj
        interesting = self.interesting
        # One pass at C speed: most containers (lists of numbers, dicts of arrays) hold
        # nothing the walk cares about and are returned untouched.
        if interesting.isdisjoint(map(type, values)):
            self.done[key] = obj
            return obj
        self.active.add(key)
        try:
            new = [self.visit(v) if type(v) in interesting else v for v in values]
        finally:
            self.active.discard(key)
        if all(a is b for a, b in zip(new, values, strict=True)):
            result = obj
        elif t is dict:
            result = dict(zip(obj.keys(), new, strict=True))
        elif t is list:
            result = new
        else:
            result = tuple(new)
        self.done[key] = result
        return result


def transform_leaves(
    obj: Any,
    leaf_types: frozenset[type],
    leaf: Callable[[Any], Any],
    budget: int | None = None,
) -> Any:
    """Replace leaves of the given exact types, at any depth of plain containers.

    Parameters
    ----------
    obj : object
        The object to walk. Only exact ``list``, ``tuple`` and ``dict`` (values, not keys)
        are entered; subclasses and other objects are left alone.
    leaf_types : frozenset of type
        Exact types handed to ``leaf``.
    leaf : callable
        ``leaf(x)`` returns the replacement of ``x`` (or ``x`` itself). Called once per
        distinct object.
    budget : int, optional
        Most container items inspected in total; a container with more items than what
        is left of the budget is returned unchanged. ``None`` means no limit.

    Returns
    -------
    object
        ``obj`` itself when nothing changed, otherwise a copy in which only the containers
        on the path to a replaced leaf are new. Shared sub-containers stay shared. If a
        container contains itself, ``obj`` is returned unchanged.
    """
    t = type(obj)
    if t not in CONTAINER_TYPES and t not in leaf_types:
        return obj
    try:
        return _Walker(leaf_types, leaf, budget).visit(obj)
    except _CycleError:
        return obj
