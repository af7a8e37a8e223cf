"""``@interactive`` and the relinking of ``__main__`` functions into the engine namespace.

A function whose ``__module__`` is ``"__main__"`` (defined in a notebook, a script, an
interactive session, or marked with :func:`interactive`) is pickled by value by cloudpickle,
together with the code-like globals it references that exist on the sender (helper functions,
classes, modules; data too after ``use_cloudpickle()``, see ``pickling._without_data_globals``).
When it is unpacked with a
namespace (on the engine, the user namespace) it is rebuilt with that namespace *as* its
globals, so it sees names pushed to the engine and its ``global`` statements write there.

The globals captured on the sender fill the gaps: a captured name is put into the namespace
unless the namespace already defines it with a value that did not come from an earlier
capture. So values pushed or assigned on the engine win, while helpers defined on the client
are available without pushing them, and a helper redefined on the client replaces the copy an
earlier call brought along. Captured functions from ``__main__`` are relinked the same way.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])

#: Namespace key recording which values were put there from captured globals.
CAPTURED_KEY = "__ferroparallel_captured__"

_MISSING = object()


def interactive(f: T) -> T:
    """Mark a function (or class) as interactively defined.

    A function is returned rebuilt with the ``__dict__`` of ``__main__`` (the module running
    when it is decorated) as its globals, as if it had been typed there: called locally, or
    pickled whole after ``use_cloudpickle()``, it sees ``__main__``'s names, not those of the
    module that defines it. It is pickled by value even when defined in an importable module,
    and on an engine its global names are resolved in the user namespace (the namespace passed
    when unpacking): names pushed to the engine are visible to it. Applied to a class, it only
    makes the class pickled by value (its methods keep the globals captured on the sender).

    Parameters
    ----------
    f : callable
        A function or class.

    Returns
    -------
    callable
        For a plain function, a copy sharing its code, defaults, closure and attributes, with
        ``__main__``'s globals (``f`` itself if it already has them); otherwise ``f``. Either
        way with ``__module__`` set to ``"__main__"``.
    """
    if type(f) is types.FunctionType:
        main_globals = sys.modules["__main__"].__dict__
        if f.__globals__ is not main_globals:
            f = _rebuilt(f, main_globals)  # type: ignore[assignment]
    f.__module__ = "__main__"
    return f


def _rebuilt(f: types.FunctionType, g: dict[str, Any]) -> types.FunctionType:
    """A copy of ``f`` with ``g`` as its globals (closure cells shared with ``f``)."""
    new = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    new.__kwdefaults__ = f.__kwdefaults__
    new.__qualname__ = f.__qualname__
    new.__doc__ = f.__doc__
    new.__annotations__ = f.__annotations__
    new.__dict__.update(f.__dict__)
    return new


def _mark_main(f: T) -> T:
    """Set ``__module__`` to ``"__main__"`` only: pickled by value, relinked on the engine."""
    f.__module__ = "__main__"
    return f


#: Code of ferroparallel's own engine-side helpers (see :func:`engine_helper`).
HELPER_CODES: set[types.CodeType] = set()


def engine_helper(f: T) -> T:
    """Mark one of ferroparallel's own functions that run over the engine's namespace (push,
    pull, execute, ``@require``): :func:`interactive`, and rebound to the namespace even when
    the sender pickles with cloudpickle or dill, where user functions keep their own globals
    (ipyparallel's push and pull reach the namespace without ``@interactive`` for the same
    reason).

    Unlike :func:`interactive`, it keeps the helper's own module globals: the code-like ones
    it names (``importlib``, ``UnmetDependency`` for ``@require``) are captured from there and
    put into the engine namespace, where the client's ``__main__`` may not have them."""
    HELPER_CODES.add(f.__code__)  # type: ignore[attr-defined]
    return _mark_main(f)


#: Functions received from a sender in ``use_cloudpickle``/``use_dill`` mode: they keep the
#: globals their pickler gave them (ipyparallel does not "can" functions in those modes).
_KEEP_GLOBALS: weakref.WeakSet[types.FunctionType] = weakref.WeakSet()


def keep_globals(f: types.FunctionType) -> types.FunctionType:
    """Receiver side of a function pickled whole by cloudpickle or dill: never relinked to a
    namespace (see :class:`Relinker`). Returns ``f``."""
    if type(f) is types.FunctionType:
        _KEEP_GLOBALS.add(f)
    return f


def is_main_function(obj: Any) -> bool:
    """True for a plain Python function whose module is ``__main__``."""
    return type(obj) is types.FunctionType and obj.__module__ == "__main__"


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> frozenset[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return frozenset(names)


class Relinker:
    """Rebuild ``__main__`` functions with ``namespace`` as their globals.

    Parameters
    ----------
    namespace : dict
        The engine's user namespace; becomes the functions' ``__globals__``.
    """

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self._memo: dict[int, types.FunctionType] = {}

    def relink(self, f: types.FunctionType) -> types.FunctionType:
        """Return ``f`` rebuilt over the namespace, merging its captured globals.

        Parameters
        ----------
        f : function
            A function (normally one with ``__module__ == "__main__"``).

        Returns
        -------
        function
            A new function sharing ``f``'s code, defaults, closure and attributes, whose
            globals are the namespace; ``f`` itself if its globals already are.
        """
        old_globals = f.__globals__
        if old_globals is self.namespace or f in _KEEP_GLOBALS:
            return f
        done = self._memo.get(id(f))
        if done is not None:
            return done
        closure, pending = self._closure(f)
        new = types.FunctionType(f.__code__, self.namespace, f.__name__, f.__defaults__, closure)
        new.__kwdefaults__ = f.__kwdefaults__
        new.__qualname__ = f.__qualname__
        new.__doc__ = f.__doc__
        new.__module__ = f.__module__
        new.__annotations__ = f.__annotations__
        new.__dict__.update(f.__dict__)
        self._memo[id(f)] = new
        for cell, value in pending:  # after the memo: a function may hold itself (recursion)
            cell.cell_contents = self.relink(value)
        for name in _global_names(f.__code__):
            if name.startswith("__") and name.endswith("__"):
                continue
            value = old_globals.get(name, _MISSING)
            if value is _MISSING:
                continue
            if is_main_function(value):
                value = self.relink(value)
            self._merge(name, value)
        return new

    def _closure(
        self, f: types.FunctionType
    ) -> tuple[tuple[types.CellType, ...] | None, list[tuple[types.CellType, Any]]]:
        """``f``'s closure for its rebuilt copy: the cells holding ``__main__`` functions (a
        decorated function inside its wrapper, a helper defined in the enclosing function)
        are replaced by new, empty cells, returned with the function each must hold once
        rebuilt over the namespace too (the sender's cells are shared with nothing here)."""
        cells = f.__closure__
        pending: list[tuple[types.CellType, Any]] = []
        if not cells:
            return cells, pending
        out = []
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later in the outer function)
                out.append(cell)
                continue
            if is_main_function(value) and value.__globals__ is not self.namespace:
                fresh = types.CellType()
                pending.append((fresh, value))
                out.append(fresh)
            else:
                out.append(cell)
        return (tuple(out) if pending else cells), pending

    def _merge(self, name: str, value: Any) -> None:
        ns = self.namespace
        captured = ns.get(CAPTURED_KEY)
        current = ns.get(name, _MISSING)
        if current is not _MISSING:
            if current is value:
                return
            if captured is None or captured.get(name, _MISSING) is not current:
                if captured is not None:
                    captured.pop(name, None)
                return  # defined on the engine: the engine's value wins
        if captured is None:
            captured = ns[CAPTURED_KEY] = {}
        ns[name] = value
        captured[name] = value
