"""Receiver side of :mod:`.funcache`: a ``__main__`` function whose pickle arrives again is
unpickled once and rebuilt over the engine namespace for every call.

Unpickling a function sent by value costs several microseconds per task on an engine (code
object, function, globals), and a task loop sends the same bytes thousands of times. The same
bytes unpickle to equivalent objects, so the first result is kept as a *template*. Every call
still gets a fresh function over the namespace (see ``interactive.Relinker``), so what a task
does to its function object stays with that call, as when each request is unpickled anew.
Only templates that a call cannot change are kept: no closure (its cells could be rebound by
the function), defaults and keyword defaults that pickle the same way for as long as they
exist (atoms, tuples of them, what is pickled by reference), no attributes, and likewise for
the ``__main__`` functions it brought along; never a function that keeps its own globals
(sent in ``use_cloudpickle``/``use_dill`` mode).
"""

from __future__ import annotations

import pickle
from types import FunctionType
from typing import Any

from .funcache import stable
from .interactive import _KEEP_GLOBALS, Relinker, is_main_function

#: ``{pickle bytes: template function}``; emptied when it reaches :data:`_MAX` entries.
_TEMPLATES: dict[bytes, FunctionType] = {}
_MAX = 256
#: Most ``__main__`` functions one template may bring along.
_MAX_FUNCTIONS = 32


def _reusable(f: FunctionType, seen: set[int]) -> bool:
    """Whether ``f`` (a received ``__main__`` function) can serve as a template."""
    seen.add(id(f))
    if f.__closure__ is not None or f.__dict__ or f in _KEEP_GLOBALS:
        return False
    if f.__defaults__ is not None and not stable(f.__defaults__):
        return False
    kwdefaults = f.__kwdefaults__
    if kwdefaults and not all(stable(v) for v in kwdefaults.values()):
        return False
    for value in f.__globals__.values():
        if is_main_function(value) and id(value) not in seen:
            if len(seen) >= _MAX_FUNCTIONS or not _reusable(value, seen):
                return False
    return True


def load_main_function(data: Any, namespace: dict[str, Any]) -> Any:
    """The function pickled in ``data`` (one frame, no out-of-band buffer), relinked to
    ``namespace`` when it is a ``__main__`` function, as ``load_object`` would return it.

    Parameters
    ----------
    data : buffer-like
        The function's frame.
    namespace : dict
        The engine's user namespace.

    Returns
    -------
    object
        A new function over ``namespace`` for a ``__main__`` function; otherwise whatever the
        frame holds, unpickled (the caller resolves it as usual).
    """
    key = bytes(data)
    template = _TEMPLATES.get(key)
    if template is None:
        f = pickle.loads(key)
        if not is_main_function(f):
            return f
        if _reusable(f, set()):
            if len(_TEMPLATES) >= _MAX:
                _TEMPLATES.clear()
            _TEMPLATES[key] = f
        template = f
    return Relinker(namespace).relink(template)
