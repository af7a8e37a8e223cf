"""Running requests: ``apply_request`` calls and plain-Python ``execute_request`` cells."""

from __future__ import annotations

import ast
import linecache
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..serialize import serialize_object, unpack_apply_message
from ..serialize.apply import check_buffer_count
from ..serialize.ipp_compat import (
    is_ferroparallel_payload,
    serialize_ipp_result,
    unpack_ipp_apply,
)
from ..serialize.netloan import Fetcher, NetLoanWriter, fetching
from ..serialize.peer import serving
from ..serialize.pickling import plain_frames
from ..serialize.shm import DataUnreachable
from ..wire_names import LENT_TO_KEY
from .errors import ErrorInfo
from .results_shm import ResultSegments
from .signals import EngineExit, InterruptGate

#: ``publish(msg_type, content, topic)`` sends one IOPub message for the current request.
log = logging.getLogger("ferroparallel.engine")

IOPubPublisher = Callable[[str, dict[str, Any], str], None]


@dataclass
class ApplyOutcome:
    """Result of one apply: reply buffers on success, else the error."""

    buffers: list[Any] = field(default_factory=list)
    error: ErrorInfo | None = None
    #: The shared-memory segment holding the result's large buffers, or the ``LentResult``
    #: the client copies them from (None: all in frames).
    segment: Any = None
    #: The buffers are in ipyparallel's serialization (the request was an ipyparallel
    #: client's)
    ipp_format: bool = False


def run_apply(
    buffers: Sequence[Any],
    ns: dict[str, Any],
    gate: InterruptGate,
    results: ResultSegments | None = None,
    request_metadata: dict[str, Any] | None = None,
    request_id: str = "",
    before_call: Callable[[], None] | None = None,
    fetcher: Fetcher | None = None,
    engine_uuid: str = "",
) -> ApplyOutcome:
    """Unpack and call ``f(*args, **kwargs)`` in the user namespace.

    Parameters
    ----------
    buffers : sequence of buffer-like
        The request buffers: ``pack_apply_message`` frames, or an ipyparallel client's
        payload (frame 0 is not our 12-byte header), which is unpacked and answered with
        ipyparallel's serialization (:mod:`ferroparallel.serialize.ipp_compat`; no shared
        memory).
    ns : dict
        The user namespace.
    gate : InterruptGate
        Opened while the user function runs (SIGINT → ``KeyboardInterrupt``).
    results : ResultSegments, optional
        Shared-memory policy for the result (see :mod:`.results_shm`).
    request_metadata : dict, optional
        The request's metadata (says whether the client can map a result segment).
    request_id : str, optional
        The request's msg_id: arguments lent from the client's memory are read only for the
        request they were lent to (see :mod:`ferroparallel.serialize.peer`).
    before_call : callable, optional
        Called once the request is unpacked, right before the function (the engine creates
        its IPython shell there when unpacking imported IPython); its errors are logged.
    fetcher : Fetcher, optional
        Fetches arguments lent over the network (decision 0014); without it such arguments
        fail to unpack with a ``ShmError``.
    engine_uuid : str
        This engine's uuid: a load-balanced task whose arguments it cannot reach is answered
        as an unmet dependency unless the client listed it among those that could
        (``LENT_TO_KEY``).

    Returns
    -------
    ApplyOutcome
        ``serialize_object(result)`` frames (large buffers possibly in a shared-memory
        segment), or the error (failed unpack, any exception of the call, unserializable
        result).

    Raises
    ------
    EngineExit
        The engine is stopping (SIGTERM).
    """
    ours = is_ferroparallel_payload(buffers)
    try:
        if ours:
            with serving(request_id), fetching(fetcher):
                f, args, kwargs = unpack_apply_message(buffers, ns)
        else:
            f, args, kwargs = unpack_ipp_apply(buffers, ns)
    except EngineExit:
        raise
    except DataUnreachable as exc:
        return ApplyOutcome(error=_unreachable(exc, request_metadata, engine_uuid))
    except BaseException as exc:
        return ApplyOutcome(error=ErrorInfo.from_exception(exc))
    if before_call is not None:
        try:
            before_call()
        except Exception:
            log.warning("preparing the call failed", exc_info=True)
    try:
        with gate:
            result = f(*args, **kwargs)
    except EngineExit:
        raise
    except BaseException as exc:
        return ApplyOutcome(error=ErrorInfo.from_exception(exc, skip=1))
    finally:
        del f, args, kwargs
    if not ours:
        return _ipp_result(result)
    try:
        frames = plain_frames(result)
        if frames is not None:  # nothing for shared memory or a loan
            if results is not None:
                results.expire()
            return ApplyOutcome(buffers=frames)
        md = request_metadata or {}
        writer = results.writer_for(md, request_id) if results is not None else None
        try:
            frames = serialize_object(result, shm=writer)
            segment = None
            if writer is not None and results is not None and len(writer):
                try:
                    segment = results.commit(writer, md)
                except OSError as e:
                    log.warning("shared memory unavailable (%s): result sent over the socket", e)
                    frames = serialize_object(result)
            check_buffer_count(frames, "result")
        except BaseException:
            if isinstance(writer, NetLoanWriter):
                writer.loan.release()  # lent as the pickler went: served no longer
            raise
        return ApplyOutcome(buffers=frames, segment=segment)
    except EngineExit:
        raise
    except BaseException as exc:
        return ApplyOutcome(error=ErrorInfo.from_exception(exc))


def _unreachable(
    exc: DataUnreachable, request_metadata: dict[str, Any] | None, engine_uuid: str
) -> ErrorInfo:
    """The error for a request whose lent or shared arguments this engine cannot reach. For a
    load-balanced task sent while this engine was not registered yet (it is not among the
    engines the client knew could reach them, ``LENT_TO_KEY``): an unmet dependency, so that
    the scheduler tries another engine (and fails the task with ImpossibleDependency, naming
    this, once none is left). Otherwise the error itself: the lender is gone, or broken, and
    no other engine would do better."""
    error = ErrorInfo.from_exception(exc)
    lent_to = (request_metadata or {}).get(LENT_TO_KEY)
    if not isinstance(lent_to, list) or engine_uuid in lent_to:
        return error
    text = f"this engine cannot reach the task's arguments: {exc}"
    return ErrorInfo("UnmetDependency", text, [f"UnmetDependency: {text}"])


def _ipp_result(result: Any) -> ApplyOutcome:
    """The reply to an ipyparallel-format request: ipyparallel frames, never shared memory."""
    try:
        frames = serialize_ipp_result(result)
        check_buffer_count(frames, "result")
        return ApplyOutcome(buffers=frames, ipp_format=True)
    except EngineExit:
        raise
    except BaseException as exc:
        return ApplyOutcome(error=ErrorInfo.from_exception(exc))


@dataclass
class CellOutcome:
    """Result of one ``execute_request`` cell."""

    execution_count: int
    error: ErrorInfo | None = None
    user_expressions: dict[str, Any] = field(default_factory=dict)


class PlainShell:
    """Runs ``execute_request`` code with ``exec``; the last expression's value is displayed.

    Parameters
    ----------
    ns : dict
        The user namespace.
    publish : callable
        ``publish(msg_type, content, topic)`` for ``execute_result`` and ``error``.
    gate : InterruptGate
        Opened while user code runs.
    """

    #: Most cells kept in ``linecache`` for tracebacks.
    MAX_CACHED_CELLS = 500

    def __init__(self, ns: dict[str, Any], publish: IOPubPublisher, gate: InterruptGate) -> None:
        self.ns = ns
        self.publish = publish
        self.gate = gate
        self.execution_count = 1
        self._cells: deque[str] = deque()

    def _cache_source(self, code: str) -> str:
        filename = f"<cell-{self.execution_count}-{len(self._cells)}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self._cells.append(filename)
        while len(self._cells) > self.MAX_CACHED_CELLS:
            linecache.cache.pop(self._cells.popleft(), None)
        return filename

    def run_cell(
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> CellOutcome:
        """Execute ``code`` in the namespace.

        Parameters
        ----------
        code : str
            Python source.
        silent : bool
            No ``execute_result``, execution count not incremented.
        store_history : bool
            Increment the execution count.
        user_expressions : dict, optional
            ``{name: expression}`` evaluated after the cell.

        Returns
        -------
        CellOutcome
            The count used (for an execution that is not counted, the last counted one), the
            error if any (also published as IOPub ``error``), and the evaluated user
            expressions.
        """
        count = self.execution_count
        error = self._run(code, silent, count)
        if error is not None:
            self.publish("error", _error_message(error), "error")
        if store_history and not silent:
            self.execution_count += 1
        else:
            count -= 1  # as IPython kernels: the reply names the last counted execution
        return CellOutcome(count, error, self.user_expressions(user_expressions or {}))

    def _run(self, code: str, silent: bool, count: int) -> ErrorInfo | None:
        filename = self._cache_source(code)
        try:
            tree = ast.parse(code, filename, "exec")
            last = None
            display = not silent and not code.rstrip().endswith(";")
            if tree.body and isinstance(tree.body[-1], ast.Expr) and display:
                last = ast.Expression(tree.body.pop().value)
            body = compile(tree, filename, "exec")
            tail = compile(last, filename, "eval") if last is not None else None
        except EngineExit:
            raise
        except BaseException as exc:
            return ErrorInfo.from_exception(exc, with_traceback=False)
        try:
            with self.gate:
                exec(body, self.ns)
                value = eval(tail, self.ns) if tail is not None else None
        except EngineExit:
            raise
        except BaseException as exc:
            return ErrorInfo.from_exception(exc, skip=1)
        if value is not None:
            self.ns["_"] = value
            try:
                text = repr(value)
            except Exception as exc:
                return ErrorInfo.from_exception(exc)
            self.publish(
                "execute_result",
                {"data": {"text/plain": text}, "metadata": {}, "execution_count": count},
                "execute_result",
            )
        return None

    def user_expressions(self, expressions: dict[str, str]) -> dict[str, Any]:
        """Evaluate ``{name: expression}`` in the namespace (jupyter reply format)."""
        out: dict[str, Any] = {}
        for name, expr in expressions.items():
            try:
                value = eval(expr, self.ns)
                out[name] = {
                    "status": "ok",
                    "data": {"text/plain": repr(value)},
                    "metadata": {},
                }
            except EngineExit:
                raise
            except Exception as exc:
                info = ErrorInfo.from_exception(exc)
                out[name] = {
                    "status": "error",
                    "ename": info.ename,
                    "evalue": info.evalue,
                    "traceback": info.traceback,
                }
        return out

    def reset(self) -> None:
        """Forget cached cell sources (the namespace is reset by its owner)."""
        while self._cells:
            linecache.cache.pop(self._cells.popleft(), None)


def _error_message(error: ErrorInfo) -> dict[str, Any]:
    return {"ename": error.ename, "evalue": error.evalue, "traceback": list(error.traceback)}
