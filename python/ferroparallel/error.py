"""Exception classes of ferroparallel.

The wire errors (``MessageError`` and subclasses) are raised by the Rust core for malformed,
unsigned, forged, replayed or oversized messages. The remaining classes mirror the names of
IPython.parallel / ipyparallel so code that catches them keeps working.
"""

from __future__ import annotations

__all__ = [
    "FerroParallelError",
    "MessageError",
    "MalformedMessage",
    "UnsignedMessage",
    "InvalidSignature",
    "DuplicateSignature",
    "UnpackError",
    "MessageTooLarge",
    "WireConfigError",
    "IoClosedError",
    "KernelError",
    "TimeoutError",
    "NoEnginesRegistered",
    "EngineError",
    "TaskAborted",
    "TaskTimeout",
    "UnmetDependency",
    "ImpossibleDependency",
    "DependencyTimeout",
    "InvalidDependency",
    "TaskRejectError",
    "ConnectionFileError",
]


class FerroParallelError(Exception):
    """Base class of every ferroparallel error."""


class MessageError(FerroParallelError, ValueError):
    """A received message could not be accepted (base class of the wire errors)."""


class MalformedMessage(MessageError):
    """No delimiter, too few frames, or a required header field missing."""


class UnsignedMessage(MessageError):
    """A key is configured but the message carries no signature."""


class InvalidSignature(MessageError):
    """The HMAC signature does not match the message."""


class DuplicateSignature(MessageError):
    """The signature was seen before: the message is a replay."""


class UnpackError(MessageError):
    """A packed part (header, parent_header, metadata, content) could not be (un)packed."""


class MessageTooLarge(MessageError):
    """A part, frame count or message exceeds the configured limit."""


class WireConfigError(FerroParallelError, ValueError):
    """An unsupported packer or signature scheme was configured."""


class IoClosedError(FerroParallelError, RuntimeError):
    """The I/O thread has been closed; no more messages can be sent or received."""


class ConnectionFileError(FerroParallelError, OSError):
    """A connection file is missing, unreadable, stale or incomplete (the message names it)."""


# Names shared with ipyparallel.error ------------------------------------------------------------

TimeoutError = TimeoutError  # noqa: A001 - ipyparallel exposes the builtin under this name


class KernelError(FerroParallelError):
    """Base class of errors raised while running tasks."""


class NoEnginesRegistered(KernelError):
    """No engines are connected to the controller."""


class EngineError(KernelError):
    """An engine died or was lost while it held a task."""


class TaskAborted(KernelError):
    """The task was aborted before it ran."""


class TaskRejectError(KernelError):
    """The task was rejected (e.g. a functional dependency that cannot be met)."""


class UnmetDependency(KernelError):
    """A functional dependency is not met on this engine."""


class ImpossibleDependency(UnmetDependency):
    """A dependency can never be met."""


class DependencyTimeout(ImpossibleDependency):
    """A task waited longer than its timeout for its dependencies."""


class TaskTimeout(DependencyTimeout):
    """A task was not started before its timeout."""


class InvalidDependency(ImpossibleDependency):
    """A dependency names the task itself or an unknown msg_id."""
