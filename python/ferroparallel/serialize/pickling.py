"""Object serialization: one pickle (protocol 5) plus its out-of-band buffers as frames."""

from __future__ import annotations

import io
import pickle
import sys
from collections import ChainMap
from collections.abc import Callable, Sequence
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any, TypeAlias

import cloudpickle
from cloudpickle.cloudpickle import _should_pickle_by_reference

try:  # cloudpickle's reducer of code objects (it replaces the file name)
    from cloudpickle.cloudpickle import _code_reduce as _cloudpickle_code_reduce
except ImportError:  # pragma: no cover - another cloudpickle layout: its own reduction
    _cloudpickle_code_reduce = None

try:  # the names registered with cloudpickle.register_pickle_by_value (a set), and its test
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES as _BY_VALUE_MODULES
    from cloudpickle.cloudpickle import _is_registered_pickle_by_value
except ImportError:  # pragma: no cover - another cloudpickle layout: never take the shortcut
    _BY_VALUE_MODULES = {"?"}

    def _is_registered_pickle_by_value(module: Any) -> bool:
        return True


from .._core import Frame as _Frame
from . import funcache
from .buffers import (
    DEFAULT_THRESHOLD,
    LargeBytes,
    reduce_memoryview,
    reduce_ndarray,
    wrap_large_buffers,
)
from .funcache import code_like, is_method
from .interactive import HELPER_CODES, keep_globals
from .namespace import resolve_in_namespace
from .shm import OutOfBandSink

if TYPE_CHECKING and sys.version_info >= (3, 12):
    from collections.abc import Buffer as BufferLike
else:
    BufferLike: TypeAlias = Any

#: Most out-of-band buffers of one serialized object: the rest are pickled in-band. A message
#: carries at most ``apply.MAX_BUFFERS`` buffers; this leaves room for a function's frames.
OUT_OF_BAND_LIMIT = (1 << 16) - 1024

#: Pickle protocol of every frame 0 (out-of-band buffers need 5).
PROTOCOL = 5

_END = object()

#: Types pickled the same way by every pickler (no functions or classes inside).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, range})
#: Container items :func:`_is_plain` looks at before giving up (then the full pickler runs).
#: A map chunk's result is a list of as many items as the chunk has; scanning one item costs
#: ~25 ns, and the full pickler costs ~10 us more than ``pickle.dumps`` before its first item.
_PLAIN_BUDGET = 1024


def _not_main(f: FunctionType) -> bool:
    """A received function needs no relinking to the engine namespace (not ``__main__``)."""
    return f.__module__ != "__main__"


def _is_plain(
    obj: Any, threshold: int, plain_function: Callable[[FunctionType], bool] | None = None
) -> bool:
    """Whether ``obj`` is plain data: atoms (and ``range``), ``bytes`` of at most ``threshold``
    bytes, functions pickled by reference (or for which ``plain_function`` is true),
    :class:`Prepickled` objects without out-of-band buffers, and tuples, lists and dicts (with
    atom keys) of them, three levels deep, up to about a thousand items."""
    by_reference = _by_reference if plain_function is None else plain_function
    t = type(obj)
    if t in _ATOMS:
        return True
    if t is bytes:
        return len(obj) <= threshold
    budget = _PLAIN_BUDGET
    stack = [(obj, 3)]
    while stack:
        x, depth = stack.pop()
        t = type(x)
        if t in _ATOMS:
            continue
        if t is bytes:
            if len(x) > threshold:
                return False
            continue
        if t is FunctionType:
            if by_reference(x):  # pickled by module and name, by every pickler alike
                continue
            return False
        if t is Prepickled:
            if len(x.frames) == 1:  # its bytes, as they are (see Prepickled.__reduce__)
                continue
            return False
        if depth == 0 or not (t is tuple or t is list or t is dict):
            return False
        budget -= len(x)
        if budget < 0:
            return False
        if t is tuple or t is list:
            if len(x) > 8 and _ATOMS.issuperset(map(type, x)):
                continue  # (a flat run of atoms, e.g. a map chunk's results: one C loop)
            for v in x:
                if type(v) not in _ATOMS:
                    stack.append((v, depth - 1))
        elif t is dict:
            for k, v in x.items():
                if type(k) not in _ATOMS:
                    return False
                stack.append((v, depth - 1))
    return True


class Prepickled:
    """A function serialized once and sent many times (e.g. the chunk runner of a map):
    :func:`serialize_object` returns its frames without pickling it again.

    Parameters
    ----------
    obj : callable
        The function (or any object; ipyparallel's parameter name); calling the Prepickled
        calls it. Also available as ``.obj`` and ``.function``.
    """

    __slots__ = ("_reduced", "frames", "function")

    def __init__(self, obj: Any) -> None:
        self.function = obj
        self.frames = serialize_object(obj)
        self._reduced: tuple[Any, ...] | None = None

    @property
    def obj(self) -> Any:
        """The wrapped object (ipyparallel's attribute name)."""
        return self.function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # inside another pickle (e.g. the function argument of a map chunk): the stored
        # frames, so the function is not pickled again; it unpickles as the function itself
        # (made once: a map pickles it into every chunk)
        reduced = self._reduced
        if reduced is None:
            head, *buffers = self.frames
            args = (bytes(head), *(pickle.PickleBuffer(b) for b in buffers))
            reduced = self._reduced = (_load_frames, args)
        return reduced


def _load_frames(head: bytes, *buffers: Any) -> Any:
    """The object of :class:`Prepickled` frames (see ``Prepickled.__reduce__``)."""
    return pickle.loads(head, buffers=buffers)


#: Pickles of module-level functions by reference, by ``(module, name)`` (see
#: :func:`_reference_pickle`); bounded, as a program has a bounded set of such functions.
_REFERENCE_PICKLES: dict[tuple[str, str], bytes] = {}
_REFERENCE_PICKLES_MAX = 4096


def _reference_pickle(f: FunctionType) -> bytes | None:
    """The pickle of ``f`` by reference when ``f`` is the module-level function its module
    holds under its name (what cloudpickle and pickle then write: module and name, the same
    bytes every time), else None. Checked on every call, so a function rebound in its module,
    a module registered for pickling by value, or ``__main__`` never take the cached bytes;
    None while dill is the pickler."""
    module, name = f.__module__, f.__qualname__
    if module == "__main__" or _pickler_name == "dill":  # (dill writes its own bytes)
        return None
    mod = sys.modules.get(module)
    if mod is None or getattr(mod, "__dict__", None) is None or mod.__dict__.get(name) is not f:
        return None
    if _BY_VALUE_MODULES and _is_registered_pickle_by_value(mod):
        return None
    key = (module, name)
    data = _REFERENCE_PICKLES.get(key)
    if data is None:
        if not _should_pickle_by_reference(f):
            return None
        data = pickle.dumps(f, protocol=PROTOCOL)
        if len(_REFERENCE_PICKLES) < _REFERENCE_PICKLES_MAX:
            _REFERENCE_PICKLES[key] = data
    return data


def _full_frames(f: Any) -> list[Any]:
    """``serialize_object(f)`` by the full pickler (no shortcut, no cache)."""
    frames: list[Any] = []
    file = io.BytesIO()
    _pickler_class(file, frames.append, None).dump(f)
    return [file.getvalue(), *frames]


def _function_pickle(f: FunctionType) -> bytes | None:
    """The one-frame pickle of function ``f`` when it can be had without pickling it again:
    by reference (see :func:`_reference_pickle`), or a ``__main__`` function's pickle by
    value in the default mode, made once and reused while nothing it is made from changed
    (see :mod:`.funcache`); None otherwise."""
    data = _reference_pickle(f)
    if data is not None:
        return data
    if f.__module__ != "__main__" or _pickler_name != "pickle" or _capture_data:
        return None
    return funcache.cached_value_pickle(f, _full_frames)


def _by_reference(obj: Any) -> bool:
    """Whether cloudpickle would pickle function ``obj`` by reference (module + name), which
    the standard pickler does identically and much faster."""
    return type(obj) is FunctionType and (
        _reference_pickle(obj) is not None or _should_pickle_by_reference(obj)
    )


def _make_pickler_class(base: type, isolate: bool = False, stdlib_files: bool = False) -> type:
    """A subclass of ``base`` that sends large buffers out-of-band; with ``isolate``,
    ``__main__`` functions keep the globals the pickler gives them on the receiver (see
    :func:`~.interactive.keep_globals`) instead of being rebound to its namespace; with
    ``stdlib_files``, open text files are refused as the standard pickler refuses them
    (``TypeError``), not sent as a copy of their contents as cloudpickle sends them."""
    base_override = getattr(base, "reducer_override", None)

    class FerroPickler(base):  # type: ignore[misc, valid-type]
        if base is cloudpickle.Pickler and _cloudpickle_code_reduce is not None:
            dispatch_table = ChainMap({CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

        def __init__(
            self, file: Any, buffer_callback: Any, shm: OutOfBandSink | None = None
        ) -> None:
            super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
            self.shm = shm
            self._isolating: set[int] = set()

        def reducer_override(self, obj: Any) -> Any:
            t = type(obj)
            if t is memoryview:
                rv = reduce_memoryview(obj)
            elif t is _Frame:  # a received buffer sent on (e.g. a PickleBuffer pulled back)
                rv = reduce_memoryview(memoryview(obj))
            elif t is LargeBytes:
                rv = obj.__reduce_ex__(PROTOCOL)
            elif t is FunctionType:
                if (
                    isolate
                    and obj.__module__ == "__main__"
                    and obj.__code__ not in HELPER_CODES
                    and id(obj) not in self._isolating
                ):
                    # keep_globals(f): f itself is pickled (by this pickler) as the argument
                    self._isolating.add(id(obj))
                    return keep_globals, (obj,)
                if base_override is None:
                    return NotImplemented
                rv = base_override(self, obj)
                if _capture_data or obj.__module__ != "__main__" or is_method(obj):
                    return rv
                return _without_data_globals(rv)
            elif t is io.TextIOWrapper and stdlib_files:
                raise TypeError(f"cannot pickle '{t.__module__}.{t.__qualname__}' object")
            else:
                rv = reduce_ndarray(obj)
                if rv is None:
                    if base_override is not None:
                        return base_override(self, obj)
                    return NotImplemented
            if self.shm is not None:
                return _to_shm(rv, self.shm)
            return rv

    FerroPickler.__qualname__ = FerroPickler.__name__ = f"Ferro{base.__name__}"
    return FerroPickler


def _code_reduce(code: CodeType) -> Any:
    """cloudpickle's reduction of a code object, keeping the file name it replaces with
    ``<dynamic-code>``: a remote traceback then names the file and line of the function the
    user wrote (and shows the line where the engine can read that file), as ipyparallel's."""
    rv = _cloudpickle_code_reduce(code)
    try:
        ctor, args = rv[0], rv[1]
        i = args.index("<dynamic-code>")
    except (ValueError, IndexError, AttributeError, TypeError):
        return rv
    return (ctor, (*args[:i], code.co_filename, *args[i + 1 :]), *rv[2:])


#: Whether ``__main__`` functions carry the data they reference (``use_cloudpickle()``).
_capture_data = False


def _without_data_globals(rv: Any) -> Any:
    """cloudpickle's reduce value of a ``__main__`` function (not a method), keeping only the
    code-like globals it references (helpers, classes, imported modules).

    As in ipyparallel, the data such a function names is looked up where it runs (on an
    engine, its namespace: values pushed there): sending the client's values along would
    re-send a large array with every call even when the engine has its own, and would make a
    name that exists only on the client silently resolve there.
    """
    if type(rv) is not tuple or len(rv) < 3 or type(rv[2]) is not tuple or len(rv[2]) != 2:
        return rv  # (another cloudpickle layout: as it is)
    state, slotstate = rv[2]
    captured = slotstate.get("__globals__") if type(slotstate) is dict else None
    if not captured:
        return rv
    kept = {k: v for k, v in captured.items() if code_like(v)}
    if len(kept) == len(captured):
        return rv
    return (rv[0], rv[1], (state, {**slotstate, "__globals__": kept}), *rv[3:])


def _to_shm(rv: tuple[Any, ...], shm: OutOfBandSink) -> tuple[Any, ...]:
    """Move the out-of-band buffer of a reduce value (first argument) into ``shm``."""
    args = rv[1] if len(rv) > 1 else ()
    if args and type(args[0]) is pickle.PickleBuffer:
        raw = args[0].raw()
        if shm.wants(raw.nbytes):
            return (rv[0], (shm.add(raw), *args[1:]), *rv[2:])
    return rv


_pickler_class: type = _make_pickler_class(cloudpickle.Pickler, stdlib_files=True)
#: "pickle" by default (ipyparallel's name for its default; we write with cloudpickle's
#: machinery but, as ipyparallel, send no data globals), "cloudpickle" or "dill".
_pickler_name = "pickle"


def use_cloudpickle() -> None:
    """Pickle functions and classes with cloudpickle, data globals included.

    Lambdas, closures and anything defined in ``__main__`` are pickled by value; functions and
    classes of importable modules by reference (as by default). As with ipyparallel's
    ``use_cloudpickle``, a ``__main__`` function is then cloudpickle's entirely: it carries the
    values of the globals it references and runs over those (the sender's values), not over
    the engine's namespace, which it neither sees nor changes (``@interactive`` has no effect;
    pass engine values with ``Reference``). The default sends only the code-like globals
    (helper functions, classes, modules) and looks data up in the engine's namespace, as
    ipyparallel's default does. ``use_pickle()`` goes back to the default.
    """
    _set_pickler(cloudpickle.Pickler, "cloudpickle", capture_data=True)


def use_pickle() -> None:
    """Back to the default serialization (the state a process starts in), as ipyparallel's
    ``use_pickle`` (which undoes ``use_dill`` / ``use_cloudpickle``).

    Functions and classes of importable modules go by reference, as the standard pickler
    sends them; lambdas, closures and ``__main__`` definitions still go by value (ipyparallel
    sends them by value with its own "canning" in this mode), so code keeps working after the
    switch. Receivers need no switch: any of the picklers' output loads with
    :func:`pickle.loads` as long as the package that wrote it is importable.
    """
    _set_pickler(cloudpickle.Pickler, "pickle")


def use_dill() -> None:
    """Pickle functions and classes with dill (must be installed).

    Raises
    ------
    ImportError
        If dill is not installed (``pip install dill``).
    """
    try:
        import dill
    except ImportError as exc:
        raise ImportError("use_dill() needs dill: pip install dill") from exc
    _set_pickler(dill.Pickler, "dill")


def _set_pickler(base: type, name: str, capture_data: bool = False) -> None:
    global _pickler_class, _pickler_name, _capture_data
    # cloudpickle and dill, as ipyparallel's use_cloudpickle/use_dill: functions are theirs
    # entirely (globals captured by value, or as dill resolves them), not relinked
    _pickler_class = _make_pickler_class(
        base, isolate=name in ("cloudpickle", "dill"), stdlib_files=name == "pickle"
    )
    _pickler_name = name
    _capture_data = capture_data
    funcache.clear()


def current_pickler() -> str:
    """Name of the pickler in use: ``"cloudpickle"``, ``"pickle"`` or ``"dill"``."""
    return _pickler_name


def plain_frames(obj: Any, threshold: int = DEFAULT_THRESHOLD) -> list[bytes] | None:
    """``serialize_object(obj, threshold)`` for plain data (see :func:`_is_plain`) and
    functions pickled by reference: one pickle, written by the standard pickler (the same
    bytes the full pickler would write, without building a Pickler); None for anything else,
    and always None with dill (which pickles some of these differently)."""
    if _pickler_name == "dill":
        return None
    if _by_reference(obj) or _is_plain(obj, threshold):
        return [pickle.dumps(obj, protocol=PROTOCOL)]
    return None


def serialize_object(
    obj: Any,
    threshold: int = DEFAULT_THRESHOLD,
    item_threshold: int | None = None,
    *,
    shm: OutOfBandSink | None = None,
    buffer_threshold: int | None = None,
) -> list[BufferLike]:
    """Serialize one object into a pickle frame and its out-of-band buffer frames.

    The positional parameters are ipyparallel's (``obj, buffer_threshold, item_threshold``).
    ``buffer_threshold`` is ipyparallel's name for ``threshold`` (it wins when given);
    ``item_threshold`` (ipyparallel's per-item canning limit) is accepted and has no effect:
    every object is one pickle here, whatever its length.

    Parameters
    ----------
    obj : object
        Anything the current pickler (cloudpickle by default) can pickle.
    threshold : int
        Buffers (NumPy array data, ``bytes``, ``bytearray``, ``memoryview``) of more than
        ``threshold`` bytes travel as their own frames; smaller ones stay in the pickle.
    shm : OutOfBandSink, optional
        Same-host transfer: buffers larger than ``shm.threshold`` go to this sink and the
        pickle holds a small descriptor instead (no frame). With a ``shm.SegmentWriter`` the
        caller must ``commit()`` before sending and release the segment once received (see
        :mod:`.shm`); with a ``peer.LoanWriter`` it keeps the loan until every reply arrived
        (see :mod:`.peer`).

    Returns
    -------
    list
        ``[pickle_bytes, buffer_1, …, buffer_n]``: frame 0 is the protocol-5 pickle (``bytes``),
        then one flat unsigned-byte ``memoryview`` per out-of-band buffer, in the order the
        pickle refers to them. The views reference the original memory (no copy) and keep
        it alive; do not mutate the objects until the frames are sent.

    Raises
    ------
    ValueError
        If ``threshold`` is negative.
    """
    if buffer_threshold is not None:
        threshold = buffer_threshold
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, not {threshold}")
    t = type(obj)
    if t is Prepickled:
        return list(obj.frames)
    if t is FunctionType:
        data = _function_pickle(obj)
        if data is not None:
            return [data]
    frames = plain_frames(obj, threshold)
    if frames is not None:
        return frames
    frames: list[Any] = [b""]

    def buffer_callback(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        # past the frame budget, buffers go in-band (copied into the pickle): a message may
        # carry only so many frames, and tens of thousands of arrays must still be sendable
        if raw.nbytes > threshold and len(frames) <= OUT_OF_BAND_LIMIT:
            frames.append(raw)
            return False
        return True

    obj = wrap_large_buffers(obj, threshold)
    file = io.BytesIO()
    _pickler_class(file, buffer_callback, shm).dump(obj)
    frames[0] = file.getvalue()
    return frames


def load_object(frames: Sequence[BufferLike], namespace: dict[str, Any] | None = None) -> Any:
    """Rebuild one object from exactly the frames made by :func:`serialize_object`.

    The strict form of :func:`deserialize_object`: every frame must be used, and only the
    object is returned.

    Parameters
    ----------
    frames : sequence of buffer-like
        Frame 0 is the pickle, the rest are its out-of-band buffers (``bytes``,
        ``memoryview``, received ``ferroparallel._core.Frame`` objects…). All must be used.
    namespace : dict, optional
        The engine's user namespace. When given, ``Reference`` objects are evaluated in it and
        functions from ``__main__`` (or ``@interactive``) get it as their globals, for the
        object itself and inside plain lists, tuples and dicts.

    Returns
    -------
    object
        The object. NumPy arrays and memoryviews are views over the given frames (no copy;
        read-only when the frame is read-only), so they keep the frames alive.

    Raises
    ------
    ValueError
        If there are no frames or more buffer frames than the pickle uses.
    pickle.UnpicklingError
        If the pickle is malformed or refers to more buffers than given.
    """
    if len(frames) == 0:
        raise ValueError("no frames to deserialize")
    buffers = iter(frames[1:])
    obj = pickle.loads(frames[0], buffers=buffers)
    if next(buffers, _END) is not _END:
        raise ValueError(f"{len(frames) - 1} buffer frames given, the pickle uses fewer")
    if namespace is not None and not _is_plain(obj, sys.maxsize, _not_main):
        # plain data holds no Reference and no __main__ function: nothing to resolve
        obj = resolve_in_namespace(obj, namespace)
    return obj


def deserialize_object(
    buffers: Sequence[BufferLike], g: dict[str, Any] | None = None
) -> tuple[Any, list[BufferLike]]:
    """Rebuild an object from the leading frames of ``buffers``, as ipyparallel's
    ``deserialize_object``: the object and the frames it did not use.

    Parameters
    ----------
    buffers : sequence of buffer-like
        The frames of :func:`load_object`, then possibly more (e.g. the next object's), which
        are returned untouched.
    g : dict, optional
        The engine's user namespace (``namespace`` of :func:`load_object`).

    Returns
    -------
    tuple
        ``(obj, remaining)``: the object (NumPy arrays and memoryviews are views over the
        given frames, no copy; read-only when the frame is read-only) and the list of frames
        after those it used. :func:`load_object` returns just the object and requires every
        frame to be used.

    Raises
    ------
    ValueError
        If there are no frames.
    pickle.UnpicklingError
        If the pickle is malformed or refers to more buffers than given.
    """
    if len(buffers) == 0:
        raise ValueError("no frames to deserialize")
    rest = iter(list(buffers)[1:])  # the unpickler takes its buffers from it, one at a time
    obj = pickle.loads(buffers[0], buffers=rest)
    if g is not None and not _is_plain(obj, sys.maxsize, _not_main):
        obj = resolve_in_namespace(obj, g)
    return obj, list(rest)


serialize_result = serialize_object
deserialize_result = load_object
