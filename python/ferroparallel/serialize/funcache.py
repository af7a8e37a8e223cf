"""The pickle of an interactively defined function, made once and reused while it would be
the same bytes.

A function defined in ``__main__`` (a notebook cell, a script, ``@interactive``) travels by
value: cloudpickle's reduction of its code, defaults, closure and the code-like globals it
names (the data it names is looked up on the engine, see ``pickling._without_data_globals``).
Pickling it costs tens of microseconds, more than the rest of submitting a task, and a task
loop sends the same function thousands of times.

A cache entry keeps the pickle with a *fingerprint*: every object the bytes were made from,
compared by identity on each use. The fingerprint covers the function's code, defaults,
keyword defaults, closure contents, name, qualified name, docstring, annotations, its globals
dict, and for each global name its code references: whether it is bound, to data (any
non-code value, which is never pickled) or to which function, class or module. Functions it
calls that are themselves defined in ``__main__`` are fingerprinted the same way, since they
travel inside its pickle. Only what cannot change without one of those identities changing
is cached: immutable defaults and closure contents (atoms, tuples of them, things pickled by
reference), no attributes in the function's ``__dict__``, no class defined in ``__main__``
(its attributes can change in place). Anything else is pickled on every call, as before. A
new import changes which submodules cloudpickle records, so the number of loaded modules is
part of the fingerprint as well.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import Any

from cloudpickle.cloudpickle import _extract_code_globals, _should_pickle_by_reference

#: Types whose values pickle the same way whatever else changes (immutable, no code).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range, type(...)})

#: Marks a global name bound to data (never pickled with the function) or not bound at all.
_DATA = object()
_UNBOUND = object()

#: Most nested ``__main__`` functions one fingerprint follows before giving up.
_MAX_FUNCTIONS = 32


class _Uncacheable(Exception):
    """The function's pickle may change without any fingerprinted identity changing."""


#: ``{function: (fingerprint, module count, pickle)}``; an entry goes with its function.
_CACHE: weakref.WeakKeyDictionary[FunctionType, tuple[list[Any], int, bytes]] = (
    weakref.WeakKeyDictionary()
)


def stable(value: Any, depth: int = 3) -> bool:
    """Whether ``value`` pickles to the same bytes for as long as it is the same object."""
    t = type(value)
    if t in _ATOMS or t is ModuleType or t is BuiltinFunctionType:
        return True
    if t is tuple or t is frozenset:
        return depth > 0 and all(stable(v, depth - 1) for v in value)
    if t is FunctionType or isinstance(value, type):
        return _should_pickle_by_reference(value)
    return t.__name__ == "ufunc"  # NumPy ufuncs pickle by module and name


def code_like(value: Any) -> bool:
    """Functions, classes, modules (and NumPy ufuncs): what a ``__main__`` function may bring
    along by default (see ``pickling._without_data_globals``)."""
    return isinstance(value, FunctionType | BuiltinFunctionType | type | ModuleType) or (
        type(value).__name__ == "ufunc"
    )


def is_method(f: FunctionType) -> bool:
    """Whether ``f`` was defined in a class body (``Cls.meth``): it travels inside its class,
    which the engine does not rebind to its namespace, so it keeps the data it names. Module
    level functions and those defined in functions (``f.<locals>.g``, lambdas) are rebound."""
    parts = f.__qualname__.rsplit(".", 2)
    return len(parts) > 1 and parts[-2] != "<locals>"


def _fingerprint(f: FunctionType, out: list[Any], seen: set[int]) -> None:
    """Append to ``out`` every object ``f``'s pickle is made from (see the module docstring).

    Raises
    ------
    _Uncacheable
        If the pickle could change while those objects stay the same.
    """
    seen.add(id(f))
    if f.__dict__ or is_method(f):  # (a method's pickle keeps the data it names)
        raise _Uncacheable
    defaults, kwdefaults, closure = f.__defaults__, f.__kwdefaults__, f.__closure__
    out += (f.__code__, f.__globals__, defaults, f.__name__, f.__qualname__, f.__doc__)
    if defaults is not None and not stable(defaults):
        raise _Uncacheable
    for mapping in (kwdefaults, f.__annotations__):
        if mapping:  # (dicts: their items, which the pickle holds, may change in place)
            for key, value in mapping.items():
                if not stable(value):
                    raise _Uncacheable
                out += (key, value)
        out.append(len(mapping) if mapping else 0)
    if closure is not None:
        for cell in closure:
            try:
                value = cell.cell_contents
            except ValueError:  # (an empty cell)
                value = _UNBOUND
            if value is not _UNBOUND and not stable(value):
                raise _Uncacheable
            out.append(value)
    g = f.__globals__
    for name in _extract_code_globals(f.__code__):
        value = g.get(name, _UNBOUND)
        if value is _UNBOUND or not code_like(value):
            out.append(_DATA if value is not _UNBOUND else _UNBOUND)
            continue
        out.append(value)
        if type(value) is FunctionType and not _should_pickle_by_reference(value):
            # travels by value inside f's pickle: its own state counts too
            if value.__module__ != "__main__" or len(seen) >= _MAX_FUNCTIONS:
                raise _Uncacheable
            if id(value) not in seen:
                _fingerprint(value, out, seen)
        elif not stable(value):
            raise _Uncacheable  # e.g. a class defined in __main__


def _same(a: list[Any], b: list[Any]) -> bool:
    """Element-wise identity (equal but distinct values, such as ``1`` and ``True``, may
    pickle differently: they count as a change)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is not y:
            return False
    return True


def cached_value_pickle(f: FunctionType, make: Callable[[FunctionType], list[Any]]) -> bytes | None:
    """The one-frame pickle of ``__main__`` function ``f``, from the cache when nothing it is
    made from has changed, else made by ``make(f)`` (the full serializer: its frames) and
    cached when cacheable; None when ``f``'s pickle cannot be cached (call ``make`` as usual).

    The caller checks that ``f`` is pickled by value in the default mode (data globals left
    out); ``make`` must produce exactly the bytes an uncached serialization would.
    """
    out: list[Any] = []
    try:
        _fingerprint(f, out, set())
    except _Uncacheable:
        return None
    modules = len(sys.modules)
    entry = _CACHE.get(f)
    if entry is not None and entry[1] == modules and _same(entry[0], out):
        return entry[2]
    frames = make(f)
    if len(frames) != 1:  # (out-of-band buffers: not a cacheable shape)
        return None
    data = bytes(frames[0])
    try:
        _CACHE[f] = (out, modules, data)
    except TypeError:  # pragma: no cover - (not weak-referenceable)
        pass
    return data


def clear() -> None:
    """Forget every cached pickle (the pickler changed)."""
    _CACHE.clear()
