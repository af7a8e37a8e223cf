"""Out-of-band buffers: which values leave the pickle as frames, and how they come back.

Pickle protocol 5 hands every :class:`pickle.PickleBuffer` to the pickler's
``buffer_callback``; we keep those larger than the threshold as separate frames. This module
reduces each supported value to a ``PickleBuffer`` over its memory plus what is needed to
rebuild it (smaller buffers are written into the pickle, same reduce):

========================  =====================================  ================================
sent value                sender                                 receiver gets
========================  =====================================  ================================
``bytes``                 buffer of the object itself (no copy)  ``bytes``: the frame itself when
                                                                 it is a ``bytes`` object, else
                                                                 one copy of the frame
``bytearray``             buffer of the object itself (no copy)  ``bytearray`` (one copy: it must
                                                                 own its memory)
``memoryview``            its memory when C-contiguous (no       ``memoryview`` over the frame
                          copy), else one copy in C order        (no copy), same format and shape
                                                                 when ``memoryview.cast`` allows
                                                                 it, read-only when the frame is
C/F-contiguous ndarray    the array's memory (no copy)           ndarray over the frame (no copy)
non-contiguous ndarray    one contiguous copy (layout kept with  ndarray over the frame (no copy)
                          ``order="K"``), then as above
``numpy.memmap``          sent as the plain ndarray it views     ``numpy.ndarray``
========================  =====================================  ================================

Plain ``bytes`` and ``bytearray`` are written into the pickle by the pickler itself (they never
reach ``reducer_override``), so :func:`wrap_large_buffers` replaces the large ones found at the
top level or inside plain lists, tuples and dicts before pickling.
"""

from __future__ import annotations

import sys
from pickle import PickleBuffer
from typing import Any

from .walk import transform_leaves

#: Default size (bytes) above which a buffer travels as its own frame.
DEFAULT_THRESHOLD = 1024

#: Most container items inspected per object, on each side, for large ``bytes`` (sender) and
#: for ``Reference``/``__main__`` functions (receiver); bounds the cost for huge lists.
SCAN_BUDGET = 65536

_BYTES_TYPES: frozenset[type] = frozenset({bytes, bytearray})


def rebuild_bytes(buf: Any) -> bytes:
    """Receiver side of a large ``bytes``: the frame itself if it is ``bytes``, else a copy."""
    if type(buf) is bytes:
        return buf
    return bytes(buf)


def rebuild_bytearray(buf: Any) -> bytearray:
    """Receiver side of a large ``bytearray`` (always one copy)."""
    return bytearray(buf)


def rebuild_memoryview(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """Receiver side of a ``memoryview``: a view over ``buf`` with the original format/shape.

    ``memoryview.cast`` only knows native single-character formats and refuses shapes with a
    zero; in those cases the view keeps the format it can (a 1-D view of ``fmt``, else
    unsigned bytes ``"B"``).
    """
    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if fmt == "B" and len(shape) == 1:
        return view
    try:
        return view.cast(fmt, shape)
    except (TypeError, ValueError):
        pass
    try:
        return view.cast(fmt)
    except (TypeError, ValueError):
        return view


class LargeBytes:
    """Stand-in for a large ``bytes``/``bytearray`` that pickles as an out-of-band buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        rebuild = rebuild_bytes if type(self.data) is bytes else rebuild_bytearray
        return rebuild, (PickleBuffer(self.data),)


def wrap_large_buffers(obj: Any, threshold: int) -> Any:
    """Wrap ``bytes``/``bytearray`` larger than ``threshold`` so they go out-of-band.

    Looks at ``obj`` itself and inside plain lists, tuples and dicts (values), at most
    :data:`SCAN_BUDGET` container items in all; larger containers are pickled as they are
    (their ``bytes`` copied into the pickle). Containers are copied only on the path to a
    wrapped value; the values themselves are never copied.
    """

    def leaf(value: bytes | bytearray) -> Any:
        return LargeBytes(value) if len(value) > threshold else value

    return transform_leaves(obj, _BYTES_TYPES, leaf, SCAN_BUDGET)


def reduce_memoryview(view: memoryview) -> tuple[Any, ...]:
    """Reduce a ``memoryview`` (not picklable by default) to a buffer plus format and shape."""
    buf = PickleBuffer(view) if view.c_contiguous else PickleBuffer(view.tobytes())
    return rebuild_memoryview, (buf, view.format, view.shape)


def _numpy() -> Any:
    # Never import numpy ourselves: if it is not imported, no array can be pickled.
    return sys.modules.get("numpy")


def rebuild_ndarray(buf: Any, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    """Receiver side of an array: a read-only view over ``buf`` (no copy).

    Read-only whatever ``buf`` is, as ipyparallel documents received arrays (there, small
    arrays come out of the pickle read-only too): a received frame or segment may be shared,
    and code must not come to depend on writing into a small array and then fail on a large
    one. ``np.array(a)`` (or ``a.copy()``) is the writable copy. Empty arrays, as NumPy
    pickles them, stay writable.
    """
    import numpy as np

    if memoryview(buf).nbytes == 0:
        return np.empty(shape, dtype=dtype, order=order)
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)
    if arr.flags.writeable:  # (a small array pickled in-band: its bytes are ours alone)
        arr.flags.writeable = False
    return arr


def reduce_ndarray(obj: Any) -> tuple[Any, ...] | None:
    """Reduce an exact ``ndarray`` (or ``memmap``) to one raw buffer; ``None`` for others.

    Object dtypes, zero-size items and subclasses other than ``memmap`` return ``None``:
    NumPy pickles them in-band. Every other array becomes ``rebuild_ndarray(buffer, dtype,
    shape, order)``; its buffer is the array's own memory (C or Fortran order), or one copy
    for a non-contiguous array, made with ``order="K"`` so the layout is kept when it can be.
    Unlike NumPy's own protocol-5 reduce this also covers datetime and timedelta dtypes, which
    cannot be exported through the buffer protocol.
    """
    np = _numpy()
    if np is None:
        return None
    t = type(obj)
    if t is np.memmap:
        obj = obj.view(np.ndarray)
    elif t is not np.ndarray:
        return None
    dtype = obj.dtype
    if dtype.hasobject or dtype.itemsize == 0:
        return obj.__reduce_ex__(5) if t is not np.ndarray else None
    arr = obj
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.array(obj, order="K", copy=True)
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            arr = np.ascontiguousarray(obj)
        if not obj.flags.writeable:
            arr.flags.writeable = False
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    raw = arr.reshape(-1, order=order).view(np.uint8)
    return rebuild_ndarray, (PickleBuffer(raw), dtype, arr.shape, order)
