"""Serialization of apply payloads and results: pickle protocol 5 with out-of-band buffers.

Functions, lambdas, closures and interactively defined classes are pickled with cloudpickle
(switch with :func:`use_pickle` / :func:`use_dill`). NumPy arrays, ``bytes``, ``bytearray``
and ``memoryview`` values larger than a threshold (1024 bytes by default) travel as their own
frames without being copied into the pickle, and are rebuilt over the received frames: received
arrays are read-only views (``numpy.array(x)`` gives a writable copy). With a
:class:`~.shm.SegmentWriter`, buffers above its threshold go through one same-host shared-memory
segment instead (:mod:`.shm`). The frame layout is documented in ``docs/protocol.md``, copies
and read-only semantics in ``docs/data-transfer.md``.
"""

from __future__ import annotations

from .apply import pack_apply_message, unpack_apply_message
from .buffers import DEFAULT_THRESHOLD
from .canning import CANNING_REGISTRIES, can, no_canning_registry, uncan
from .interactive import interactive
from .pickling import (
    Prepickled,
    current_pickler,
    deserialize_object,
    deserialize_result,
    load_object,
    serialize_object,
    serialize_result,
    use_cloudpickle,
    use_dill,
    use_pickle,
)
from .reference import Reference

#: ipyparallel's name (``ipyparallel.serialize.PrePickled``).
PrePickled = Prepickled

__all__ = [
    "DEFAULT_THRESHOLD",
    "PrePickled",
    "Reference",
    "can",
    "current_pickler",
    "deserialize_object",
    "deserialize_result",
    "interactive",
    "load_object",
    "pack_apply_message",
    "serialize_object",
    "serialize_result",
    "uncan",
    "unpack_apply_message",
    "use_cloudpickle",
    "use_dill",
    "use_pickle",
]


def __getattr__(name: str) -> object:
    if name in CANNING_REGISTRIES:
        raise no_canning_registry(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
