"""Apply requests in ipyparallel's own format, for a real ``ipyparallel.Client``.

An ipyparallel client sends ``apply_request`` buffers laid out as
``[f frames…, info, arg frames…, kwarg frames…]`` with ipyparallel's canned pickles, and
decodes the ``apply_reply`` buffers with its own ``deserialize_object``. Our payload starts
with a 12-byte ``FPAP`` header frame; ipyparallel's frame 0 is a pickle (first byte
``0x80``), which is never 12 bytes long. :func:`is_ferroparallel_payload` tells the two
apart: our own requests pay one length check.

``ipyparallel.serialize`` is imported only when such a request arrives (importing it
imports IPython), and it must be installed on the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .apply import _HEADER

#: Size of our apply header frame (frame 0 of every ferroparallel apply payload).
FPAP_HEADER_SIZE = _HEADER.size

#: ipyparallel's helpers behind ``push`` / ``pull`` / ``execute`` look up the namespace with
#: ``get_ipython()``; the engine calls its own equivalents, which use the engine namespace.
_IPP_UTIL = "ipyparallel.util"

#: First byte of every pickle of protocol 2 or later (ipyparallel's frame 0).
_PICKLE_PROTO = 0x80

_MISSING = (
    "this apply_request uses ipyparallel's serialization (it comes from an "
    "ipyparallel.Client), but ipyparallel is not installed on this engine: install "
    "ipyparallel on the engines, or use ferroparallel's Client"
)


def is_ferroparallel_payload(frames: Sequence[Any]) -> bool:
    """Whether apply buffers are ours rather than an ipyparallel client's.

    Parameters
    ----------
    frames : sequence of buffer-like
        The ``apply_request`` buffers.

    Returns
    -------
    bool
        False only for ipyparallel's layout: at least 2 frames, frame 0 is not 12 bytes long
        and starts with the pickle ``PROTO`` opcode. Everything else is left to
        :func:`~.apply.unpack_apply_message`, which reports a bad header (size, magic,
        version) with a ``ValueError``.
    """
    if not frames:
        return True
    head = memoryview(frames[0])
    if head.nbytes == FPAP_HEADER_SIZE or len(frames) < 2 or not head.nbytes:
        return True
    try:
        return head.cast("B")[0] != _PICKLE_PROTO
    except TypeError:  # not C-contiguous: no pickle we could read either
        return True


def ipp_serialize() -> ModuleType:
    """Import ``ipyparallel.serialize``.

    Returns
    -------
    module
        ``ipyparallel.serialize``.

    Raises
    ------
    ImportError
        If ipyparallel is not importable here, with a message saying what to install.
    """
    try:
        return importlib.import_module("ipyparallel.serialize")
    except ImportError as exc:
        raise ImportError(_MISSING) from exc


def unpack_ipp_apply(
    frames: Sequence[Any], ns: dict[str, Any]
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Rebuild ``(f, args, kwargs)`` from an ipyparallel-format ``apply_request``.

    Parameters
    ----------
    frames : sequence of buffer-like
        The request buffers (received frames are used without copies: arrays are read-only
        views over them).
    ns : dict
        The engine's user namespace: ``@interactive`` / ``__main__`` functions get it as
        their globals and ``Reference`` values are evaluated in it.

    Returns
    -------
    tuple
        ``(f, args, kwargs)``; ipyparallel's ``push``/``pull``/``execute`` helpers are
        replaced by equivalents that work on ``ns``.

    Raises
    ------
    ImportError
        If ipyparallel is not installed here.
    Exception
        Whatever ipyparallel's unpacking raises for a malformed payload.
    """
    serialize = ipp_serialize()
    f, args, kwargs = serialize.unpack_apply_message(list(frames), g=ns)
    if getattr(f, "__module__", None) == _IPP_UTIL:
        helper = _HELPERS.get(getattr(f, "__name__", ""))
        if helper is not None:
            return helper, (ns, *args), kwargs
    return f, tuple(args), dict(kwargs)


def serialize_ipp_result(result: Any) -> list[Any]:
    """Serialize a result as ipyparallel's client expects (its default thresholds).

    Parameters
    ----------
    result : object
        The value returned by the call.

    Returns
    -------
    list
        ipyparallel ``serialize_object`` frames: a pickle, then large buffers as views.
    """
    return list(ipp_serialize().serialize_object(result))


#: Our pickles are always of protocol 5; ipyparallel writes ``pickle.DEFAULT_PROTOCOL`` (4
#: before Python 3.14).
_OUR_PROTOCOL = 5


def is_our_protocol(frames: Sequence[Any]) -> bool:
    """Whether frame 0 is a pickle of our protocol (5): ipyparallel's frames of Python 3.14
    are too, so this only says that reading it as ours is worth trying."""
    if not frames:
        return False
    try:
        head = memoryview(frames[0]).cast("B")
    except TypeError:
        return False
    return head.nbytes >= 2 and head[0] == _PICKLE_PROTO and head[1] == _OUR_PROTOCOL


def deserialize_ipp_object(frames: Sequence[Any]) -> Any:
    """Rebuild an object from ipyparallel ``serialize_object`` frames.

    Raises
    ------
    ImportError
        If ipyparallel is not installed here (its canned objects need its classes), with a
        message saying so.
    """
    try:
        serialize = importlib.import_module("ipyparallel.serialize")
    except ImportError as exc:
        raise ImportError(
            "this value was serialized by ipyparallel (an ipyparallel client or engine "
            "produced it), and reading it needs ipyparallel installed here: pip install "
            "ipyparallel"
        ) from exc
    obj, _rest = serialize.deserialize_object(list(frames))
    return obj


def _push(ns: dict[str, Any], /, **values: Any) -> None:
    """``name = value`` in ``ns`` for each keyword (names may be dotted or indexed)."""
    tmp = "_IP_PUSH_TMP_"
    while tmp in ns:
        tmp += "_"
    try:
        for name, value in values.items():
            ns[tmp] = value
            exec(f"{name} = {tmp}", ns)
    finally:
        ns.pop(tmp, None)


def _pull(ns: dict[str, Any], /, keys: Any) -> Any:
    """Evaluate one expression, or each of a list/tuple/set of them, in ``ns``."""
    if isinstance(keys, (list, tuple, set)):
        return [eval(key, ns) for key in keys]
    return eval(keys, ns)


def _execute(ns: dict[str, Any], /, code: str) -> None:
    """Run ``code`` in ``ns``."""
    exec(code, ns)


_HELPERS: dict[str, Callable[..., Any]] = {
    "_push": _push,
    "_pull": _pull,
    "_execute": _execute,
}
