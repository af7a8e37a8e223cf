"""Exception classes of ferroparallel.

The wire errors (``MessageError`` and subclasses) are raised by the Rust core for malformed,
unsigned, forged, replayed or oversized messages. The remaining classes mirror the names of
IPython.parallel / ipyparallel so code that catches them keeps working.
"""

from __future__ import annotations

import sys
import threading
import traceback as _traceback
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

__all__ = [
    "IPythonError",
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
    "NoSuchEngine",
    "EngineError",
    "TaskAborted",
    "TaskTimeout",
    "UnmetDependency",
    "ImpossibleDependency",
    "DependencyTimeout",
    "InvalidDependency",
    "TaskRejectError",
    "ConnectionFileError",
    "RemoteError",
    "CompositeError",
    "AlreadyDisplayedError",
    "wrap_exception",
    "unwrap_exception",
    "collect_exceptions",
]


class FerroParallelError(Exception):
    """Base class of every ferroparallel error."""


#: ipyparallel's name for the base class of its errors.
IPythonError = FerroParallelError


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


class IoClosedError(FerroParallelError, RuntimeError, OSError):
    """The I/O thread has been closed; no more messages can be sent or received. An
    ``OSError`` too, as ipyparallel's "Connections have been closed" for a closed client."""


class ConnectionFileError(FerroParallelError, OSError):
    """A connection file is missing, unreadable, stale or incomplete (the message names it)."""


# Names shared with ipyparallel.error ------------------------------------------------------------

TimeoutError = TimeoutError  # noqa: A001 - ipyparallel exposes the builtin under this name


class KernelError(FerroParallelError):
    """Base class of errors raised while running tasks."""


class NoEnginesRegistered(KernelError):
    """No engines are connected to the controller."""


class NoSuchEngine(IndexError, KeyError):
    """A list of targets names an engine id that is not registered.

    Both an IndexError (as an unknown ``rc[i]``) and a KeyError (what ipyparallel raises for
    an unknown id in a list of targets), so either ``except`` clause catches it.
    """

    __str__ = BaseException.__str__  # the message, not KeyError's repr of it


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


# Errors raised on engines (or by the scheduler / hub) and re-raised in the client ---------------


def _engine_label(engine_info: Mapping[str, Any] | None) -> str:
    """``"[<id>:<method>]"`` for an engine_info dict, ``"[Engine Exception]"`` without one
    (ipyparallel's labels)."""
    if not engine_info:
        return "[Engine Exception]"
    eid = engine_info.get("engine_id")
    method = engine_info.get("method") or "?"
    return f"[{'?' if eid is None else eid}:{method}]"


def _traceback_text(traceback: str | Iterable[str] | None) -> str:
    if traceback is None:
        return ""
    if isinstance(traceback, str):
        return traceback
    # joined as ipyparallel joins them: an entry ending in a newline (IPython's frames) leaves
    # a blank line before the next one
    return "\n".join(str(line) for line in traceback)


class RemoteError(KernelError):
    """An exception raised remotely (on an engine, or by the scheduler or the hub).

    Parameters
    ----------
    ename : str
        Name of the remote exception class (``"ZeroDivisionError"``).
    evalue : str
        Its message (``str(exc)`` on the remote side).
    traceback : str or list of str, optional
        The remote traceback, one string or a list of lines (joined with newlines).
    engine_info : dict, optional
        ``engine_uuid``, ``engine_id`` and ``method`` of the engine that raised it.

    Attributes
    ----------
    ename, evalue : str
    traceback : str
        The remote traceback, lines joined with ``"\\n"`` (``""`` when unknown).
    engine_info : dict
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str | Iterable[str] | None = None,
        engine_info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = str(ename)
        self.evalue = "" if evalue is None else str(evalue)
        self.traceback = _traceback_text(traceback)
        self.engine_info: dict[str, Any] = dict(engine_info or {})

    def __str__(self) -> str:
        return f"{_engine_label(self.engine_info)} {self.ename}: {self.evalue}"

    def __repr__(self) -> str:
        eid = self.engine_info.get("engine_id", " ")
        return f"<{type(self).__name__}[{eid}]:{self.ename}({self.evalue})>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_remote_error,
            (_base_name(type(self)), self.ename, self.evalue, self.traceback, self.engine_info),
        )

    def render_traceback(self) -> list[str]:
        """The engine label (``[0:apply]``), then the remote traceback, as a list of lines."""
        text = self.traceback or f"{self.ename}: {self.evalue}"
        return [_engine_label(self.engine_info), *text.splitlines()]

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: show the remote traceback instead of the local one."""
        return self.render_traceback()

    def print_traceback(self, excid: int | None = None, file: Any = None) -> None:
        """Print the remote traceback (to ``sys.stdout`` by default).

        ``excid`` is ignored: it is accepted, as ipyparallel's, so that code printing one
        error of a CompositeError works for a single RemoteError too.
        """
        print("\n".join(self.render_traceback()), file=file or sys.stdout)


_ElistEntry = tuple[str, str, str, dict[str, Any]]


class CompositeError(RemoteError):
    """Several remote errors from one multi-engine (or multi-task) call.

    Parameters
    ----------
    message : str
        What failed (``"one or more exceptions raised in: f"``).
    elist : list of tuple or exception
        ``(ename, evalue, traceback, engine_info)`` per error, or exception objects (a
        RemoteError's fields are used; nested CompositeErrors are flattened).

    Attributes
    ----------
    msg : str
    elist : list of tuple
    tb_limit : int
        How many tracebacks ``render_traceback()`` shows when no index is given.
    """

    tb_limit = 4

    def __init__(self, message: str, elist: Iterable[Any]) -> None:
        flat: list[_ElistEntry] = []
        for entry in elist:
            if isinstance(entry, CompositeError):
                flat.extend(entry.elist)
            elif isinstance(entry, BaseException):
                flat.append(_entry_of(entry))
            else:
                ename, evalue, tb, info = entry
                flat.append((str(ename), str(evalue), _traceback_text(tb), dict(info or {})))
        self.msg = str(message)
        self.elist = flat
        super().__init__("CompositeError", self.msg, None, None)
        self.args = (self.msg, self.elist)
        self.traceback = "\n".join(self.render_traceback())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.msg, self.elist))

    def __str__(self) -> str:
        lines = [self.msg]
        for ename, evalue, _tb, info in self.elist[: self.tb_limit]:
            lines.append(f"{_engine_label(info)}{ename}: {evalue}")
        extra = len(self.elist) - self.tb_limit
        if extra > 0:
            lines.append(f".... {extra} more exceptions ...")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CompositeError({len(self.elist)})"

    def _remote(self, excid: int) -> RemoteError:
        try:
            ename, evalue, tb, info = self.elist[excid]
        except (IndexError, TypeError):
            raise IndexError(f"an exception with index {excid} does not exist") from None
        return unwrap_exception(
            {"ename": ename, "evalue": evalue, "traceback": tb, "engine_info": info}
        )

    def raise_exception(self, excid: int = 0) -> NoReturn:
        """Raise the ``excid``-th error as a RemoteError (typed like ``unwrap_exception``)."""
        raise self._remote(excid)

    def render_traceback(self, excid: int | None = None) -> list[str]:
        """Lines of one error's traceback, or of the first ``tb_limit`` ones when ``excid`` is
        None (followed by a count of the rest)."""
        if excid is not None:
            try:
                ename, evalue, tb, info = self.elist[excid]
            except (IndexError, TypeError):
                raise IndexError(f"an exception with index {excid} does not exist") from None
            return [f"{_engine_label(info)}:", *(tb or f"{ename}: {evalue}").splitlines()]
        lines: list[str] = []
        for i in range(min(len(self.elist), self.tb_limit)):
            lines.extend(self.render_traceback(i))
            lines.append("")
        extra = len(self.elist) - self.tb_limit
        if extra > 0:
            lines.append(f"... {extra} more exceptions ...")
        return lines

    def _render_traceback_(self) -> list[str]:
        return self.render_traceback()

    def print_traceback(self, excid: int | None = None, file: Any = None) -> None:
        """Print one error's traceback, or the first ``tb_limit`` of them."""
        print("\n".join(self.render_traceback(excid)), file=file or sys.stdout)


class AlreadyDisplayedError(RemoteError):
    """Raised (by ``%px``) after a CompositeError's tracebacks were already shown: its text is
    only the count (``"2 errors"``), as ipyparallel's.

    Parameters
    ----------
    original_error : RemoteError
        The error whose tracebacks were displayed.
    """

    def __init__(self, original_error: RemoteError) -> None:
        self.original_error = original_error
        self.n = len(original_error.elist) if isinstance(original_error, CompositeError) else 1
        super().__init__(
            "AlreadyDisplayedError",
            f"{self.n} errors",
            original_error.traceback,
            original_error.engine_info,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.original_error,))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}({self.n} errors)>"

    def __str__(self) -> str:
        return self.evalue

    def render_traceback(self) -> list[str]:
        return [str(self)]


def _entry_of(exc: BaseException) -> _ElistEntry:
    """``(ename, evalue, traceback, engine_info)`` of a remote or local exception."""
    if isinstance(exc, RemoteError):
        return (exc.ename, exc.evalue, exc.traceback, dict(exc.engine_info))
    tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
    return (type(exc).__name__, _safe_str(exc), tb, dict(getattr(exc, "engine_info", None) or {}))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as e:  # noqa: BLE001 - a broken __str__ must not hide the error
        return f"<unprintable {type(exc).__name__}: {type(e).__name__}>"


# Classes that a remote ``ename`` maps onto: a remote "EngineError" is raised in the client as an
# instance of a class deriving from both RemoteError and EngineError.
_TYPED_ENAMES: dict[str, type[KernelError]] = {
    cls.__name__: cls
    for cls in (
        KernelError,
        NoEnginesRegistered,
        EngineError,
        TaskAborted,
        TaskRejectError,
        UnmetDependency,
        ImpossibleDependency,
        DependencyTimeout,
        TaskTimeout,
        InvalidDependency,
    )
}
_typed_classes: dict[str, type[RemoteError]] = {}
_typed_lock = threading.Lock()


def _remote_class(ename: str) -> type[RemoteError]:
    """RemoteError, or the cached RemoteError subclass that also derives from ``ename``'s class."""
    base = _TYPED_ENAMES.get(ename)
    if base is None or base is KernelError:
        return RemoteError
    cls = _typed_classes.get(ename)
    if cls is None:
        with _typed_lock:
            cls = _typed_classes.get(ename)
            if cls is None:
                cls = type(
                    f"Remote{ename}",
                    (RemoteError, base),
                    {
                        "__module__": __name__,
                        "__doc__": f"A remote {ename}: both a RemoteError and a {ename}.",
                    },
                )
                _typed_classes[ename] = cls
    return cls


def _base_name(cls: type) -> str:
    """The ename whose typed class ``cls`` is, or ``""`` for plain RemoteError classes."""
    for ename, typed in _typed_classes.items():
        if typed is cls:
            return ename
    return "" if cls is RemoteError else f"{cls.__module__}:{cls.__qualname__}"


def _rebuild_remote_error(
    base: str, ename: str, evalue: str, traceback: str, engine_info: dict[str, Any]
) -> RemoteError:
    """Unpickle a RemoteError (typed classes are created on demand, so they are not importable)."""
    cls: type[RemoteError] = RemoteError
    if base in _TYPED_ENAMES:
        cls = _remote_class(base)
    elif ":" in base:
        import importlib

        module, _, qualname = base.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        cls = obj
    return cls(ename, evalue, traceback, engine_info)


def wrap_exception(
    engine_info: Mapping[str, Any] | None = None, exc: BaseException | None = None
) -> dict[str, Any]:
    """The error content for the exception being handled (or ``exc``).

    Parameters
    ----------
    engine_info : dict, optional
        ``engine_uuid``, ``engine_id``, ``method`` of the engine reporting the error.
    exc : BaseException, optional
        The exception to describe; default: the one currently being handled.

    Returns
    -------
    dict
        ``{"status": "error", "ename", "evalue", "traceback": [lines], "engine_info"}``.
        A RemoteError keeps its remote ``ename``/``evalue`` (re-raised remote errors forward
        their identity).
    """
    if exc is None:
        exc = sys.exc_info()[1]
    if exc is None:
        raise ValueError("wrap_exception() called with no exception being handled")
    if isinstance(exc, RemoteError) and not isinstance(exc, CompositeError):
        ename, evalue = exc.ename, exc.evalue
        lines = exc.render_traceback()
    else:
        ename, evalue = type(exc).__name__, _safe_str(exc)
        try:
            text = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
        except Exception:  # noqa: BLE001
            text = f"{ename}: {evalue}\n"
        lines = text.rstrip("\n").split("\n")
    return {
        "status": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": lines,
        "engine_info": dict(engine_info or {}),
    }


def unwrap_exception(content: Mapping[str, Any]) -> RemoteError:
    """The RemoteError described by an error content.

    Parameters
    ----------
    content : dict
        ``{ename, evalue, traceback, engine_info}`` (as made by ``wrap_exception``).

    Returns
    -------
    RemoteError
        When ``ename`` names a ferroparallel error (``EngineError``, ``TaskAborted``,
        ``TaskTimeout``, ``ImpossibleDependency``, ...) the object is an instance of a class
        deriving from both RemoteError and that class, so either ``except`` clause catches it.
    """
    ename = str(content.get("ename") or "UnknownError")
    cls = _remote_class(ename)
    return cls(
        ename,
        content.get("evalue", ""),
        content.get("traceback"),
        content.get("engine_info") or {},
    )


def collect_exceptions(rdict_or_list: Any, method: str = "unspecified") -> Any:
    """Raise a CompositeError if the results contain task errors; otherwise return them.

    Parameters
    ----------
    rdict_or_list : list or dict
        Results of several tasks (a dict is checked by its values).
    method : str
        The name of the call, used in the CompositeError message.

    Returns
    -------
    list or dict
        ``rdict_or_list`` itself when it holds no error.

    Raises
    ------
    CompositeError
        When any element is a RemoteError (nested CompositeErrors are flattened) or another
        KernelError such as a local TaskAborted (unlike ipyparallel, aborted tasks are not
        silently returned as values).
    """
    values = rdict_or_list.values() if isinstance(rdict_or_list, Mapping) else rdict_or_list
    errors = [r for r in values if isinstance(r, KernelError)]
    if not errors:
        return rdict_or_list
    elist: list[_ElistEntry] = []
    for e in errors:
        if isinstance(e, CompositeError):
            elist.extend(e.elist)
        else:
            elist.append(_entry_of(e))
    raise CompositeError(f"one or more exceptions raised in: {method}", elist)
