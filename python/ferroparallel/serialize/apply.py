"""The buffers of an ``apply_request``: a function and its arguments.

Layout (all frames are the message's buffers, after ``content``)::

    frame 0              12-byte header: b"FPAP", u16 version, u16 reserved (0),
                         u32 n = number of frames of the function (little-endian)
    frames 1 .. n        serialize_object(f)
    frames n+1 ..        serialize_object((args, kwargs))

The function has its own frames so a sender may serialize it once and reuse its frames for
many requests.
"""

from __future__ import annotations

import pickle
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FunctionType
from typing import Any

from . import pickling as _pickling
from .buffers import DEFAULT_THRESHOLD
from .funcload import load_main_function
from .namespace import resolve_in_namespace
from .pickling import (
    _ATOMS,
    PROTOCOL,
    BufferLike,
    Prepickled,
    _function_pickle,
    _is_plain,
    _not_main,
    load_object,
    plain_frames,
    serialize_object,
)
from .reference import Reference
from .shm import OutOfBandSink

#: Most buffers one message may carry: receivers accept 65536 frames per message, and the
#: envelope (routing identities, delimiter, signature, four dict parts) needs a few of them.
MAX_BUFFERS = (1 << 16) - 64

APPLY_MAGIC = b"FPAP"
APPLY_VERSION = 1
_HEADER = struct.Struct("<4sHHI")


def pack_apply_message(
    f: Callable[..., Any] | Reference,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    item_threshold: int | None = None,
    *,
    shm: OutOfBandSink | None = None,
    buffer_threshold: int | None = None,
) -> list[BufferLike]:
    """Serialize a call ``f(*args, **kwargs)`` into the buffers of an ``apply_request``.

    The positional parameters are ipyparallel's (``f, args, kwargs, buffer_threshold,
    item_threshold``); ``buffer_threshold`` / ``item_threshold`` are ipyparallel's names (see
    :func:`~.pickling.serialize_object`).

    Parameters
    ----------
    f : callable or Reference
        The function to call (a ``Reference`` names a callable on the engine).
    args : sequence, optional
        Positional arguments. ``Reference`` values (also inside plain lists, tuples and
        dicts) are evaluated on the engine.
    kwargs : mapping of str, optional
        Keyword arguments, treated like ``args``.
    threshold : int
        Out-of-band size threshold in bytes, as in :func:`serialize_object`.
    shm : OutOfBandSink, optional
        Same-host shared memory for the arguments' large buffers, as in
        :func:`serialize_object` (the function's own frames never use it).

    Returns
    -------
    list
        ``[header, f frames…, (args, kwargs) frames…]``; buffer frames reference the
        arguments' memory (no copy).

    Raises
    ------
    TypeError
        If ``f`` is neither callable nor a ``Reference``, or a keyword is not a str.
    """
    if not (callable(f) or isinstance(f, Reference)):
        raise TypeError(f"f must be callable, not {type(f).__name__}")
    args = tuple(args) if args is not None else ()
    kwargs = dict(kwargs) if kwargs is not None else {}
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError(f"keyword argument names must be str, not {type(key).__name__}")
    if buffer_threshold is not None:
        threshold = buffer_threshold
    f_frames = serialize_object(f, threshold)
    arg_frames = serialize_object((args, kwargs), threshold, shm=shm)
    header = _HEADER.pack(APPLY_MAGIC, APPLY_VERSION, 0, len(f_frames))
    return [header, *f_frames, *arg_frames]


#: The header of a call whose function is one frame, and the frame of ``((), {})``.
_ONE_FRAME_HEADER = _HEADER.pack(APPLY_MAGIC, APPLY_VERSION, 0, 1)
_NO_ARGUMENTS = pickle.dumps(((), {}), protocol=PROTOCOL)


def pack_plain_call(f: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[bytes] | None:
    """The buffers :func:`pack_apply_message` makes for ``f(*args, **kwargs)``, made without
    its general machinery when ``f`` is a module-level function (pickled by reference), a
    ``__main__`` function whose pickle is cached (see :mod:`.funcache`) or a one-frame
    :class:`~.pickling.Prepickled` (a map's chunk runner) and the arguments are
    plain data with no out-of-band buffer; None otherwise (use :func:`pack_apply_message`).
    The common small call of a task loop costs a few dictionary lookups and one
    ``pickle.dumps``."""
    t = type(f)
    if t is FunctionType:
        f_frame = _function_pickle(f)
        if f_frame is None:
            return None
    elif t is Prepickled and len(f.frames) == 1:  # e.g. the chunk runner of a map
        f_frame = f.frames[0]
    else:
        return None
    if not args and not kwargs:
        return [_ONE_FRAME_HEADER, f_frame, _NO_ARGUMENTS]
    call = (tuple(args), dict(kwargs))
    for key in call[1]:
        if type(key) is not str:
            return None  # pack_apply_message raises the error
    frames = plain_frames(call, DEFAULT_THRESHOLD)
    if frames is None:
        return None
    return [_ONE_FRAME_HEADER, f_frame, *frames]


def plain_chunk_packer(
    runner: Any, f: Any, sequences: Sequence[Any]
) -> Callable[[Sequence[Any]], list[bytes]] | None:
    """For a map whose every chunk is the call ``runner(f, *parts)``, ``parts`` being slices
    of ``sequences`` (short ranges as lists): a function of a chunk's parts that returns the
    buffers :func:`pack_plain_call` makes for its call, without scanning each chunk's
    arguments again; None when a chunk's call might not be plain data (then each chunk goes
    through :func:`pack_plain_call` or the general packer, as any call).

    The arguments are vouched for once, for the whole map: ``runner`` a one-frame
    :class:`~.pickling.Prepickled`, ``f`` a function pickled by reference or a one-frame
    Prepickled, every sequence a ``range`` or a list or tuple of atoms (None, bool, numbers,
    str, range), and the pickler not dill (see :func:`~.pickling.plain_frames`). A chunk
    longer than :func:`pack_plain_call` scans (which then leaves it to the general packer)
    is packed the same way: the same call, unpacked alike."""
    if _pickling._pickler_name == "dill":
        return None
    if type(runner) is not Prepickled or len(runner.frames) != 1:
        return None
    if type(f) is Prepickled:
        if len(f.frames) != 1:
            return None
    elif not _pickling._by_reference(f):
        return None
    for s in sequences:
        t = type(s)
        if t is range:
            continue
        if (t is list or t is tuple) and _ATOMS.issuperset(map(type, s)):
            continue
        return None
    f_frame = runner.frames[0]
    dumps = pickle.dumps

    def pack(parts: Sequence[Any]) -> list[bytes]:
        return [_ONE_FRAME_HEADER, f_frame, dumps(((f, *parts), {}), protocol=PROTOCOL)]

    return pack


def _check_payload(payload: Any) -> None:
    """Refuse anything but the ``(args tuple, kwargs dict)`` of an apply payload."""
    if not (
        type(payload) is tuple
        and len(payload) == 2
        and type(payload[0]) is tuple
        and type(payload[1]) is dict
    ):
        raise ValueError("malformed apply payload: expected (args tuple, kwargs dict)")


def _unpack_plain_call(
    frames: Sequence[BufferLike], namespace: dict[str, Any] | None
) -> tuple[Any, tuple[Any, ...], dict[str, Any]] | None:
    """What :func:`unpack_apply_message` returns for three frames whose header says the
    function is one frame (what :func:`pack_plain_call` makes: a task, a map chunk), made
    without its general machinery: two ``pickle.loads`` (a ``__main__`` function's from a
    template when the same bytes arrived before: see :mod:`.funcload`), and the namespace pass
    only for what is not plain (``Reference`` values, ``__main__`` functions), as
    :func:`~.pickling.load_object` does; None for any other header (the general path)."""
    header = memoryview(frames[0])
    if header.nbytes != len(_ONE_FRAME_HEADER) or header != _ONE_FRAME_HEADER:
        return None  # (size first: nothing large is compared)
    # (a one-frame function has no out-of-band buffer)
    if namespace is None:
        f = pickle.loads(frames[1])
    else:  # a __main__ function comes relinked, from a template when it arrived before
        f = load_main_function(frames[1], namespace)
        if type(f) is not FunctionType and not _is_plain(f, sys.maxsize, _not_main):
            f = resolve_in_namespace(f, namespace)
    args = memoryview(frames[2])
    if args.nbytes == len(_NO_ARGUMENTS) and args == _NO_ARGUMENTS:
        return f, (), {}
    payload = pickle.loads(args, buffers=())
    _check_payload(payload)
    if namespace is not None and not _is_plain(payload, sys.maxsize, _not_main):
        payload = resolve_in_namespace(payload, namespace)
    return f, payload[0], payload[1]


def check_buffer_count(buffers: Sequence[Any], what: str = "message") -> None:
    """Refuse, before anything is sent, a message with more buffers than receivers accept.

    Raises
    ------
    ValueError
        If ``len(buffers)`` exceeds :data:`MAX_BUFFERS`, naming both numbers and the ways out.
    """
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(
            f"this {what} needs {len(buffers)} buffers, more than the {MAX_BUFFERS} one message "
            "may carry: send fewer large objects per call (e.g. one stacked array instead of "
            "many), raise the out-of-band threshold, or use shared memory (local engines)"
        )


def unpack_apply_message(
    frames: Sequence[BufferLike] | None = None,
    namespace: dict[str, Any] | None = None,
    copy: bool = True,
    *,
    g: dict[str, Any] | None = None,
    bufs: Sequence[BufferLike] | None = None,
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Rebuild ``(f, args, kwargs)`` from :func:`pack_apply_message` frames.

    The positional parameters are ipyparallel's (``bufs, g, copy``). ``bufs`` and ``g`` are
    ipyparallel's keyword names for ``frames`` and ``namespace``; ``copy`` is accepted for
    ipyparallel's signature and has no effect (received buffers are never copied here).

    Parameters
    ----------
    frames : sequence of buffer-like
        The message buffers (``bytes``, ``memoryview``, ``ferroparallel._core.Frame``…).
    namespace : dict, optional
        The engine's user namespace: ``Reference`` values are evaluated in it and
        ``__main__``/``@interactive`` functions get it as their globals.

    Returns
    -------
    tuple
        ``(f, args, kwargs)`` with ``args`` a tuple and ``kwargs`` a dict.

    Raises
    ------
    ValueError
        If the frames are not an apply payload of a known version.
    """
    if namespace is None:
        namespace = g
    if (frames is None) == (bufs is None):
        raise TypeError("unpack_apply_message takes the frames once (frames, or bufs=)")
    if frames is None:
        frames = bufs
    assert frames is not None
    if len(frames) < 3:
        raise ValueError(f"an apply payload has at least 3 frames, got {len(frames)}")
    if len(frames) == 3:
        call = _unpack_plain_call(frames, namespace)
        if call is not None:
            return call
    header = memoryview(frames[0])
    if header.nbytes != _HEADER.size:
        raise ValueError(f"bad apply header size {header.nbytes}")
    magic, version, _reserved, n_f = _HEADER.unpack(header.cast("B"))
    if magic != APPLY_MAGIC:
        raise ValueError(f"not an apply payload (magic {bytes(magic)!r})")
    if version != APPLY_VERSION:
        raise ValueError(f"unsupported apply payload version {version}")
    if n_f < 1 or 1 + n_f >= len(frames):
        raise ValueError(f"bad apply header: {n_f} function frames of {len(frames) - 1}")
    f = load_object(frames[1 : 1 + n_f], namespace)
    payload = load_object(frames[1 + n_f :], namespace)
    _check_payload(payload)
    return f, payload[0], payload[1]
