"""AsyncResult, AsyncMapResult, AsyncHubResult: the results of requests sent to engines.

An :class:`AsyncResult` is a ``concurrent.futures.Future`` over one or more
:class:`~ferroparallel.client.futures.MessageFuture` (one per message sent). It resolves itself
once every message has its reply, so ``concurrent.futures.wait``/``as_completed``, asyncio's
``wrap_future`` and ``add_done_callback`` all work on it; on top of that it offers the
ipyparallel API (``get``, ``wait``, ``ready``, ``metadata``, ``stdout``, ``elapsed``,
``wait_interactive``, ``display_outputs``, ...).

The AsyncResult uses only these members of the client: ``client.metadata`` (msg_id →
Metadata), ``client._futures`` (msg_id → MessageFuture), ``client.abort(msg_ids)`` and
``client._engine_id_of(uuid)``; over a fanned-out request (a :class:`~.fanout.FanoutGroup`),
also ``client._materialize``, which makes its children when first needed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import operator
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from concurrent.futures._base import FINISHED
from datetime import datetime
from numbers import Real
from typing import Any

from ..error import CompositeError, RemoteError
from .fanout import FanoutGroup
from .futures import (
    _DONE_STATES,
    _LOCK,
    SETTLED,
    MessageFuture,
    SlimFuture,
    _notify_settled,
    wait_interruptibly,
    wait_until,
)
from .mapping import _UNJOINED, Map, RoundRobinMap, _kind
from .metadata import ALIASES as _MD_ALIASES
from .metadata import DATE_KEYS, METADATA_KEYS, Metadata, parse_date, utcnow

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
]

log = logging.getLogger("ferroparallel.client")

_NOT_READY = "Result not ready."
# ipyparallel words it so for wall_time, serial_time and display_outputs
_NOT_READY_DISPLAY = "result not ready"

_MESSAGE_FUTURE = frozenset((MessageFuture,))
_msg_id_of = operator.attrgetter("msg_id")

#: Children :meth:`AsyncResult._adopt` looks at per round of the lock (the dispatcher waits
#: that long to settle a reply).
_ADOPT_BLOCK = 512


#: Metadata keys that IOPub output fills in.
_OUTPUT_KEYS = frozenset(
    ("stdout", "stderr", "outputs", "execute_input", "execute_result", "error", "data")
)
#: Seconds a finished result waits for output still on its way (before its output keys are
#: read, its outputs displayed, or a blocking ``execute`` returns): the engine sends output
#: before the reply, but on another channel, so it may arrive a moment later; a lost IOPub
#: message must not hang the caller.
OUTPUT_GRACE = 5.0


def _outcome(fut: concurrent.futures.Future) -> tuple[Any, bool]:
    """``(value, False)`` or ``(exception, True)`` of a finished future."""
    if getattr(fut, "_state", None) == FINISHED:
        # settled for good: read without the future's lock (three lock round trips a
        # chunk, on the path from a map's last reply to its result)
        exc = fut._exception
        return (exc, True) if exc is not None else (fut._result, False)
    if fut.cancelled():
        return concurrent.futures.CancelledError(), True
    exc = fut.exception(timeout=0)
    if exc is not None:
        return exc, True
    return fut.result(timeout=0), False


def _timeout(timeout: float | None) -> float | None:
    """None for "forever" (None or negative), else the number of seconds."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, Real)):
        raise TypeError(
            f"timeout must be a number of seconds (or None / -1 for no limit), "
            f"not {type(timeout).__name__} {timeout!r}"
        )
    if timeout is None or timeout < 0:
        return None
    return float(timeout)


def _parse_dates_in(md: Any) -> Any:
    """Parse string dates of a metadata dict in place (tolerates plain dicts)."""
    if isinstance(md, Metadata):
        return md.parse_dates()
    if isinstance(md, dict):
        for key in DATE_KEYS:
            value = md.get(key)
            if isinstance(value, (str, bytes, datetime)):
                md[key] = parse_date(value)
    return md


class AsyncResult(SlimFuture):
    """The future result of one or more messages sent to engines.

    Parameters
    ----------
    client : Client
        The client that sent the messages.
    children : list of MessageFuture or str, or FanoutGroup
        One future per message; msg_id strings are looked up in ``client._futures``; a
        fanned-out request's group gives its futures when they are made.
    fname : str
        Name of the called function (for reprs and error messages).
    targets : int, list of int or None
        The engines the messages went to.
    owner : bool
        Whether this AsyncResult owns the cached results (the client drops its copies once
        owned results are complete).
    return_exceptions : bool
        With several results, put exceptions into the result list instead of raising a
        CompositeError.
    single_result : bool, optional
        Whether ``get()`` returns one value rather than a list. Default: True iff there is
        exactly one child and ``targets`` is not a list, tuple or range.

    Notes
    -----
    The AsyncResult resolves itself (``set_result`` / ``set_exception``) when its last child
    finishes, on the thread that finished it (the client's dispatcher thread). Its result is
    what ``get()`` returns: the single value, or the list of values in submission order. A
    failed single result raises the child's exception; several results with failures raise a
    :class:`~ferroparallel.error.CompositeError` (aborted tasks included) unless
    ``return_exceptions``.
    """

    def __init__(
        self,
        client: Any,
        children: Iterable[concurrent.futures.Future | str] | FanoutGroup,
        fname: str = "unknown",
        targets: Any = None,
        owner: bool = False,
        return_exceptions: bool = False,
        single_result: bool | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        if (
            type(children) is list
            and len(children) == 1
            and type(children[0]) is MessageFuture
            and type(self) is AsyncResult
        ):
            # the common ``apply_async``: one message. What the general path below does for
            # it, with less work (once per task; test_asyncresult_unit compares the two)
            fut = children[0]
            self._kids = [fut]
            self._group = None
            self._msg_ids = (fut.msg_id,)
            self._fname = fname
            self._targets = targets
            self.owner = owner
            self._return_exceptions = bool(return_exceptions)
            if single_result is None:
                single_result = not isinstance(targets, (list, tuple, range))
            self._single_result = bool(single_result)
            self._mds = None
            self._cond = SETTLED
            self._order = ()
            self._n_failed = 0
            fut.add_done_callback(self._only_child_done)
            return
        group = children if isinstance(children, FanoutGroup) else None
        #: the children (None until a fanned-out request's futures are made: see _children)
        self._kids: list[concurrent.futures.Future] | None = None
        self._group = group
        if group is not None:
            n = len(group)
            self._msg_ids: tuple[str, ...] = tuple(group.msg_ids)
        elif type(children) is list and _MESSAGE_FUTURE.issuperset(map(type, children)):
            # the client's futures (e.g. a map's chunks): nothing to look up, one C loop each
            futures: list[concurrent.futures.Future] = list(children)
            self._kids = futures
            n = len(futures)
            self._msg_ids = tuple(map(_msg_id_of, futures))
        else:
            futures = []
            for child in children:
                if isinstance(child, str):
                    future_of = getattr(client, "_future_of", None)
                    if future_of is not None:
                        found = future_of(child)
                    else:
                        found = getattr(client, "_futures", {}).get(child)
                    if found is None:
                        raise KeyError(f"no future for msg_id {child!r} in this client")
                    child = found
                futures.append(child)
            self._kids = futures
            n = len(futures)
            # a tuple of strings, which the garbage collector stops tracking (fewer, cheaper
            # collections while thousands of results are held)
            self._msg_ids = tuple(getattr(c, "msg_id", None) for c in futures)
        self._fname = fname
        self._targets = targets
        self.owner = owner
        self._return_exceptions = bool(return_exceptions)
        if single_result is None:
            single_result = n == 1 and not isinstance(targets, (list, tuple, range))
        self._single_result = bool(single_result)
        # references to the client's Metadata objects, kept after the client drops them (a
        # MessageFuture holds its own: ``md``; other futures get an entry when first looked up)
        self._mds: dict[int, Any] | None = None
        # waits re-check their predicate whenever any future settles (see futures.SETTLED)
        self._cond = SETTLED
        # indices of finished children, in completion order (a tuple while there is one child:
        # the garbage collector stops tracking it, which matters with thousands of results)
        self._order: list[int] | tuple[int, ...] = [] if n > 1 else ()
        self._n_failed = 0
        self._init_state()
        if group is not None:
            group.listen(self._adopt)
        elif not n:
            self._resolve()
        elif n == 1 and type(self) is AsyncResult and type(futures[0]) is MessageFuture:
            futures[0].add_done_callback(self._only_child_done)
        else:
            self._adopt(futures)

    def _adopt(self, futures: list[concurrent.futures.Future]) -> None:
        """Take ``futures`` as the children and listen to each one.

        What ``child.add_done_callback(partial(self._child_done, i))`` does for each child,
        with less work per child for the client's MessageFutures (once per task of a map):
        those finished already (the replies to a long map's first tasks arrive while it is
        still sending) are counted here, a block of them per lock round, as ``_child_done``
        would count them; the others get the callback. Children are taken in order, so the
        completion order (``_order``) is the one the callbacks would give."""
        self._kids = futures
        n = len(futures)
        i = 0
        while i < n:
            end = min(i + _ADOPT_BLOCK, n)
            done: list[int] = []
            other = False
            with _LOCK:  # (a child settles under it: none finishes while a block is looked at)
                for k in range(i, end):
                    child = futures[k]
                    if type(child) is not MessageFuture or child.md is None:
                        end, other = k, True  # another kind: add_done_callback, in its turn
                        break
                    if child._state in _DONE_STATES:
                        done.append(k)
                        continue
                    cb = functools.partial(self._child_done, k)
                    if child._callbacks is None:
                        child._callbacks = [cb]
                    else:
                        child._callbacks.append(cb)
                last = bool(done) and self._count_done_locked(done)
            if last:
                self._resolve()
            if other:
                futures[end].add_done_callback(functools.partial(self._child_done, end))
                end += 1
            i = end

    def _count_done_locked(self, done: list[int]) -> bool:
        """Count the finished children ``done`` (call with the lock held); whether they were
        the last ones (then the caller resolves this future, which notifies)."""
        order = self._order
        if type(order) is tuple:
            self._order = order = (*order, *done)
        else:
            order.extend(done)
        kids = self._kids
        for k in done:
            child = kids[k]  # type: ignore[index]
            if child._state != FINISHED or child._exception is not None:
                self._n_failed += 1
        self._on_children_done_locked(done)
        if len(order) == len(kids):  # type: ignore[arg-type]
            return True
        _notify_settled()
        return False

    @property
    def _children(self) -> list[concurrent.futures.Future]:
        """One future per message (a fanned-out request's are made on first use, under the
        client's lock: never read it with ``futures._LOCK`` held before the children exist)."""
        kids = self._kids
        if kids is None:
            self._client._materialize(self._group)
            kids = self._kids
            assert kids is not None  # the group's listeners have run
        return kids

    # -- resolution (runs on the thread that finishes the children) --------------------------

    def _init_state(self) -> None:
        """Subclass hook, called before any child callback can run."""

    def _on_child_done_locked(self, i: int) -> None:
        """Subclass hook, called with the lock held when child ``i`` finishes."""

    def _on_children_done_locked(self, done: list[int]) -> None:
        """:meth:`_on_child_done_locked` for each of ``done`` (a subclass may do it at once)."""
        for i in done:
            self._on_child_done_locked(i)

    def _client_md(self, msg_id: str | None) -> Any:
        mds = getattr(self._client, "metadata", None)
        if mds is None or msg_id is None:
            return None
        try:
            return mds.get(msg_id)
        except Exception:  # noqa: BLE001 - a foreign mapping must not break us
            return None

    def _child_done(self, i: int, fut: concurrent.futures.Future) -> None:
        try:
            if getattr(fut, "md", None) is None:
                self._md(i)  # capture it before the client may drop it
            if type(fut) is MessageFuture:  # (settled: read without the methods' checks)
                failed = fut._state != FINISHED or fut._exception is not None
            else:
                failed = fut.cancelled() or fut.exception(timeout=0) is not None
            with _LOCK:
                order = self._order
                if type(order) is tuple:
                    self._order = order = (*order, i)
                else:
                    order.append(i)
                if failed:
                    self._n_failed += 1
                self._on_child_done_locked(i)
                # (the children are known: a callback is added once they are)
                last = len(order) == len(self._kids)  # type: ignore[arg-type]
                if not last:  # the last one settles this future, which notifies
                    _notify_settled()
            if last:
                self._resolve()
        except Exception:  # pragma: no cover - never let a bug kill the dispatcher
            log.exception("AsyncResult %s: error handling a finished message", self._fname)

    def _only_child_done(self, fut: MessageFuture) -> None:
        """:meth:`_child_done` and :meth:`_resolve` in one, for a plain AsyncResult over one
        message (the common ``apply_async``): the message's outcome becomes this result's."""
        try:
            if fut.md is None:
                self._md(0)  # capture it before the client may drop it
            if fut._state == FINISHED:
                exc, value = fut._exception, fut._result
            else:
                exc, value = concurrent.futures.CancelledError(), None
            with _LOCK:
                self._order = (0,)
                if exc is not None:
                    self._n_failed = 1
            if exc is None:
                self.set_result(value if self._single_result else [value])
            elif self._return_exceptions:
                self.set_result(exc if self._single_result else [exc])
            elif self._single_result:
                self.set_exception(exc)
            else:
                self._resolve()  # a CompositeError
        except concurrent.futures.InvalidStateError:  # pragma: no cover - resolved twice
            pass
        except Exception:  # pragma: no cover - never let a bug kill the dispatcher
            log.exception("AsyncResult %s: error handling a finished message", self._fname)

    def _resolve(self) -> None:
        """Set this future's result or exception from the children (all finished)."""
        try:
            value, exc = self._compute(self._return_exceptions)
        except BaseException as e:  # noqa: BLE001 - e.g. a failing joinPartitions
            value, exc = None, e
        try:
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)
        except concurrent.futures.InvalidStateError:  # pragma: no cover - resolved twice
            pass

    def _outcomes(self) -> list[tuple[Any, bool]]:
        return [_outcome(c) for c in self._children]

    def _error_entry(self, i: int, exc: BaseException) -> Any:
        """An exception for a CompositeError: RemoteErrors as they are, local errors with the
        engine that held the task."""
        if isinstance(exc, RemoteError):
            return exc
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            evalue = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
            evalue = f"<unprintable {type(exc).__name__}>"
        info: dict[str, Any] = {}
        eid = self._engine_id(i)
        if eid is not None:
            header = getattr(self._children[i], "header", None) or {}
            method = str(header.get("msg_type") or "").removesuffix("_request") or "?"
            info = {
                "engine_id": eid,
                "engine_uuid": self._md(i).get("engine_uuid"),
                "method": method,
            }
        return (type(exc).__name__, evalue, tb.rstrip("\n"), info)

    def _failures(self, outcomes: Sequence[tuple[Any, bool]]) -> CompositeError | None:
        """A CompositeError of the failed outcomes, or None."""
        errors = [self._error_entry(i, v) for i, (v, failed) in enumerate(outcomes) if failed]
        if not errors:
            return None
        return CompositeError(f"one or more exceptions raised in: {self._fname}", errors)

    def _failure_of(self, i: int, exc: BaseException) -> CompositeError:
        """The CompositeError of child ``i``'s failure alone: what iterating over the results
        raises at a failed one (as ipyparallel, which wraps even a single error)."""
        return CompositeError(
            f"one or more exceptions raised in: {self._fname}", [self._error_entry(i, exc)]
        )

    def _compute(self, return_exceptions: bool) -> tuple[Any, BaseException | None]:
        """``(result, None)`` or ``(None, error)`` from the finished children."""
        outcomes = self._outcomes()
        if self._single_result:
            value, failed = outcomes[0]
            if failed and not return_exceptions:
                return None, value
            return value, None
        if not return_exceptions:
            composite = self._failures(outcomes)
            if composite is not None:
                return None, composite
        return [v for v, _ in outcomes], None

    def _computed(self, return_exceptions: bool) -> Any:
        value, exc = self._compute(return_exceptions)
        if exc is not None:
            raise exc
        return value

    # -- waiting ------------------------------------------------------------------------------

    def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait (interruptibly) until ``predicate()``, re-checked whenever a child finishes."""
        return wait_until(predicate, timeout)

    def _wait_replies(self, timeout: float | None) -> bool:
        """Wait until every message has its reply; the waiting thread receives and handles
        replies itself when the client can (``Client._wait_here``)."""
        if self.done():
            return True
        here = getattr(self._client, "_wait_here", None)
        if here is None:
            return wait_interruptibly(self, timeout)
        return here(self.done, timeout)

    def _check_ready(self, message: str = _NOT_READY) -> None:
        if not self.done():
            raise TimeoutError(message)

    def ready(self) -> bool:
        """Whether every message has its reply."""
        return self.done()

    def wait(self, timeout: float | None = None, return_when: str | None = None) -> Any:
        """Wait for the results.

        Parameters
        ----------
        timeout : float, optional
            Seconds; None or negative waits forever (Ctrl-C interrupts).
        return_when : str, optional
            None: return a bool. ``ALL_COMPLETED``, ``FIRST_COMPLETED`` or ``FIRST_EXCEPTION``:
            return ``(done, pending)`` sets of single-message AsyncResults (see :meth:`split`),
            like ``concurrent.futures.wait``.

        Returns
        -------
        bool or tuple of set
            Whether everything finished in time, or ``(done, pending)``.
        """
        timeout = _timeout(timeout)
        if return_when is None:
            return self._wait_replies(timeout)
        if return_when == ALL_COMPLETED:
            self._wait_until(self.done, timeout)
        elif return_when == FIRST_COMPLETED:
            self._wait_until(lambda: bool(self._order) or not self._msg_ids, timeout)
        elif return_when == FIRST_EXCEPTION:
            self._wait_until(lambda: self.done() or self._n_failed > 0, timeout)
        else:
            raise ValueError(f"invalid return_when: {return_when!r}")
        done, pending = set(), set()
        for piece, child in zip(self.split(), self._children, strict=True):
            (done if child.done() else pending).add(piece)
        return done, pending

    def get(
        self,
        timeout: float | None = None,
        return_exceptions: bool | None = None,
        return_when: str | None = None,
    ) -> Any:
        """The result: one value, or a list (in submission order) for several messages.

        Parameters
        ----------
        timeout : float, optional
            Seconds; None or negative waits forever (Ctrl-C interrupts).
        return_exceptions : bool, optional
            Override the AsyncResult's ``return_exceptions`` for this call.
        return_when : str, optional
            ``FIRST_EXCEPTION``: raise the first failure (a RemoteError) as soon as there is
            one while others still run (once all are done, as usual). ``ALL_COMPLETED``
            (default) waits for all. ``FIRST_COMPLETED`` is not supported (a warning; waits
            for all).

        Returns
        -------
        object or list

        Raises
        ------
        TimeoutError
            ``"Result not ready."`` when not finished within ``timeout``.
        RemoteError, TaskAborted
            The error of a single result.
        CompositeError
            Errors of several results (unless ``return_exceptions``).
        """
        if self.cancelled():
            raise concurrent.futures.CancelledError()
        timeout = _timeout(timeout)
        if return_when == FIRST_COMPLETED:
            warnings.warn(
                "get(return_when=FIRST_COMPLETED) is not supported; waiting for all results",
                UserWarning,
                stacklevel=2,
            )
            return_when = None
        rex = self._return_exceptions if return_exceptions is None else bool(return_exceptions)
        if return_when == FIRST_EXCEPTION and not rex and not self.done():
            # failures are raised as soon as there is one (with return_exceptions they are
            # values, so everything is waited for)
            if not self._wait_until(lambda: self.done() or self._n_failed > 0, timeout):
                raise TimeoutError(_NOT_READY)
            if not self.done():
                # as ipyparallel: the first failure itself (the others are still running)
                finished = [_outcome(c) if c.done() else (None, False) for c in self._children]
                raise next(v for v, failed in finished if failed)
        if not self._wait_replies(timeout):
            raise TimeoutError(_NOT_READY)
        if rex == self._return_exceptions:
            return SlimFuture.result(self, timeout=0)
        return self._computed(rex)

    def result(self, timeout: float | None = None) -> Any:
        """Same as :meth:`get` (``concurrent.futures.Future`` API)."""
        return self.get(timeout)

    @property
    def r(self) -> Any:
        """Shorthand for ``get()``."""
        return self.get()

    def successful(self) -> bool:
        """Whether the result came without raising: every message succeeded, or failures are
        returned as values (``return_exceptions``). RuntimeError if not finished yet."""
        if not self.done():
            raise RuntimeError("Cannot check successful() if not done.")
        if self.cancelled():
            return False
        return self._return_exceptions or self._n_failed == 0

    def cancel(self) -> bool:
        """As ``concurrent.futures.Future.cancel``: an unfinished AsyncResult becomes cancelled
        (``get()`` raises ``CancelledError``) and True is returned; False once it is done.

        Its unfinished messages are also aborted: tasks that have not started never run; one
        already running finishes on its engine and its result is dropped.
        """
        if self.done():
            return self.cancelled()
        if not SlimFuture.cancel(self):
            return self.cancelled()
        pending = [m for m, c in zip(self._msg_ids, self._children, strict=True) if not c.done()]
        try:
            self._client.abort(pending, block=False)
        except Exception as e:  # noqa: BLE001 - best effort: the result is dropped anyway
            log.debug("cancel of %r: abort failed: %s", self, e)
        return True

    def get_dict(self, timeout: float | None = None) -> dict[Any, Any]:
        """The results as ``{engine_id: result}``.

        Raises
        ------
        ValueError
            If an engine ran more than one of the messages.
        TimeoutError, RemoteError, CompositeError
            As :meth:`get`.
        """
        self.get(timeout)
        ids = [self._engine_id(i) for i in range(len(self._children))]
        if len(set(ids)) != len(ids):
            dups = sorted({e for e in ids if ids.count(e) > 1}, key=repr)
            raise ValueError(f"Cannot build dict, engines {dups} ran more than one job")
        return {eid: v for eid, (v, _) in zip(ids, self._outcomes(), strict=True)}

    @property
    def result_dict(self) -> dict[Any, Any]:
        """``get_dict()``."""
        return self.get_dict()

    def wait_for_output(self, timeout: float | None = None) -> bool:
        """Wait until all IOPub output of the messages has arrived; True if it has."""
        outputs = [o for c in self._children if (o := getattr(c, "output", None)) is not None]
        return wait_interruptibly(outputs, _timeout(timeout))

    @property
    def sent(self) -> bool:
        """Whether every message has left the client (tracked zero-copy sends)."""
        return all(getattr(c, "sent", True) for c in self._children)

    def wait_for_send(self, timeout: float | None = -1) -> bool:
        """Wait until every message has been sent (tracked sends: needed before changing in
        place an array sent with ``track=True``).

        Parameters
        ----------
        timeout : float, optional
            Seconds; negative or None waits as long as it takes.

        Returns
        -------
        bool
            True (everything has left).

        Raises
        ------
        TimeoutError
            Still waiting to be sent after ``timeout`` seconds (as ipyparallel's).
        """
        timeout = _timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        for c in self._children:
            waiter = getattr(c, "wait_for_send", None)
            if waiter is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not waiter(left):
                raise TimeoutError("Still waiting to be sent")
        return True

    # -- metadata -----------------------------------------------------------------------------

    def _md(self, i: int) -> Any:
        md = getattr(self._children[i], "md", None)
        if md is not None:
            return md
        mds = self._mds
        if mds is None:
            mds = self._mds = {}
        md = mds.get(i)
        if md is None:
            md = self._client_md(self._msg_ids[i])
            if md is None:
                return Metadata(msg_id=self._msg_ids[i])
            mds[i] = md
        return md

    def _engine_id(self, i: int) -> int | None:
        md = self._md(i)
        eid = md.get("engine_id")
        if eid is None and md.get("engine_uuid") is not None:
            lookup = getattr(self._client, "_engine_id_of", None)
            if lookup is not None:
                eid = lookup(md["engine_uuid"])
        return eid

    def _ask_hub_for_engines(self) -> None:
        """Which engine runs each started load-balanced task that has not answered yet: the
        hub's records know (ipyparallel's client learns it from the engine's "busy" status,
        which ours does not subscribe to). Best effort: without records it stays None."""
        lookup = [
            (i, c.msg_id)
            for i, c in enumerate(self._children)
            if not c.done()
            and isinstance(c, MessageFuture)
            and self._md(i).get("engine_uuid") is None
        ]
        if not lookup:
            return
        try:
            from .hub import db_query

            ids = [m for _, m in lookup]
            recs = db_query(self._client, {"msg_id": {"$in": ids}}, ["engine_uuid"])
        except Exception as e:  # noqa: BLE001 - e.g. a controller without records
            log.debug("engine of %s unknown: %s", lookup, e)
            return
        found = {r["msg_id"]: r.get("engine_uuid") for r in recs}
        for i, msg_id in lookup:
            uuid = found.get(msg_id)
            if uuid:
                md = self._md(i)
                if md.get("engine_uuid") is None:  # (unless the reply came meanwhile)
                    dict.__setitem__(md, "engine_uuid", uuid)

    def _md_value(self, i: int, key: str) -> Any:
        if key == "engine_id":
            return self._engine_id(i)
        value = self._md(i).get(key)
        if key in DATE_KEYS:
            return parse_date(value)
        return value

    def _md_values(self, key: str) -> Any:
        key = _MD_ALIASES.get(key, key)
        if key not in METADATA_KEYS:
            raise KeyError(key)
        if key in _OUTPUT_KEYS and self.done():
            self._await_output()
        if key == "engine_id":
            self._ask_hub_for_engines()
        values = [self._md_value(i, key) for i in range(len(self._children))]
        return values[0] if self._single_result else values

    def _await_output(self) -> None:
        """Once the replies are in: wait briefly (:data:`OUTPUT_GRACE`) for output announced
        but not yet arrived, so that ``ar.get(); ar.stdout`` shows what the call printed."""
        if any(hasattr(c, "output_done") and not c.output_done() for c in self._children):
            self.wait_for_output(timeout=OUTPUT_GRACE)

    @property
    def msg_ids(self) -> list[str]:
        """The msg_ids of the messages, in submission order."""
        return list(self._msg_ids)

    @property
    def metadata(self) -> Any:
        """The Metadata of the message (single result) or a list of them; dates are aware
        datetimes. These are live: output keeps arriving until :meth:`wait_for_output`."""
        mds = [_parse_dates_in(self._md(i)) for i in range(len(self._children))]
        return mds[0] if self._single_result else mds

    @property
    def stdout(self) -> Any:
        """Captured stdout so far (a str, or a list of them for several messages)."""
        return self._md_values("stdout")

    @property
    def stderr(self) -> Any:
        """Captured stderr so far (a str, or a list of them for several messages)."""
        return self._md_values("stderr")

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if _MD_ALIASES.get(key, key) in METADATA_KEYS:
            return self._md_values(key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(METADATA_KEYS))

    def __getitem__(self, key: Any) -> Any:
        """``ar["stdout"]``: metadata value(s); ``ar[i]``/``ar[a:b]``: results (finished only)."""
        if isinstance(key, str):
            return self._md_values(key)
        if isinstance(key, (int, slice)):
            self._check_ready()
            # as ipyparallel: any failure raises (a CompositeError of all of them)
            return self.get()[key]
        raise TypeError(f"invalid key type {type(key).__name__!r} (use a metadata key or index)")

    # -- timing -------------------------------------------------------------------------------

    def timedelta(
        self,
        start: Any,
        end: Any,
        start_key: Callable[[list[datetime]], datetime] = min,
        end_key: Callable[[list[datetime]], datetime] = max,
    ) -> float:
        """Seconds from ``start`` to ``end``.

        Parameters
        ----------
        start, end : datetime, str or list of them
            Timestamps; lists are reduced with ``start_key`` / ``end_key`` (None entries are
            skipped).
        start_key, end_key : callable
            Reducers for lists (default ``min`` and ``max``).

        Returns
        -------
        float

        Raises
        ------
        ValueError
            If a side has no timestamp.
        """
        s = self._reduce_dates(start, start_key)
        e = self._reduce_dates(end, end_key)
        if s is None or e is None:
            raise ValueError("timedelta needs a start and an end timestamp")
        return (e - s).total_seconds()

    @staticmethod
    def _reduce_dates(value: Any, key: Callable[[list[datetime]], datetime]) -> Any:
        if isinstance(value, (list, tuple)):
            dates = [d for d in (parse_date(v) for v in value) if isinstance(d, datetime)]
            return key(dates) if dates else None
        parsed = parse_date(value)
        return parsed if isinstance(parsed, datetime) else None

    def _dates(self, key: str) -> list[datetime]:
        out = []
        for i in range(len(self._children)):
            d = self._md_value(i, key)
            if isinstance(d, datetime):
                out.append(d)
        return out

    @property
    def elapsed(self) -> float:
        """Seconds since the earliest submission (``wall_time`` once finished)."""
        if self.done():
            return self.wall_time
        submitted = self._dates("submitted")
        if not submitted:
            return 0.0
        return (utcnow() - min(submitted)).total_seconds()

    @property
    def wall_time(self) -> float:
        """Seconds from the earliest submission to the last reply received (finished only;
        0.0 when the timestamps are unknown)."""
        self._check_ready(_NOT_READY_DISPLAY)
        submitted = self._dates("submitted")
        received = self._dates("received") or self._dates("completed")
        if not submitted or not received:
            return 0.0
        return (max(received) - min(submitted)).total_seconds()

    @property
    def serial_time(self) -> float:
        """Sum of the engines' compute times (``completed - started``), finished only."""
        self._check_ready(_NOT_READY_DISPLAY)
        total = 0.0
        for i in range(len(self._children)):
            s, e = self._md_value(i, "started"), self._md_value(i, "completed")
            if isinstance(s, datetime) and isinstance(e, datetime):
                total += (e - s).total_seconds()
        return total

    # -- progress -----------------------------------------------------------------------------

    @property
    def progress(self) -> int:
        """How many messages have finished."""
        return len(self._order)

    def __len__(self) -> int:
        return len(self._children)

    def __bool__(self) -> bool:
        return True

    def wait_interactive(
        self,
        interval: float = 0.1,
        timeout: float | None = -1,
        widget: bool | None = None,
        return_when: str = ALL_COMPLETED,
    ) -> None:
        """Wait while showing a progress bar (tqdm when installed, text otherwise).

        Parameters
        ----------
        interval : float
            Seconds between updates.
        timeout : float, optional
            Give up after this many seconds (None or negative: never).
        widget : bool, optional
            True: a notebook widget; False: a text bar; None: whichever fits (``tqdm.auto``).
        return_when : str
            ``ALL_COMPLETED`` (default), ``FIRST_EXCEPTION`` or ``FIRST_COMPLETED``.
        """
        limit = _timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        bar = _progress_bar(len(self), widget, self._fname)
        try:
            while True:
                bar.update_to(self.progress)
                if self.done():
                    break
                if return_when == FIRST_EXCEPTION and self._n_failed:
                    break
                if return_when == FIRST_COMPLETED and self._order:
                    break
                step = interval
                if deadline is not None:
                    step = min(step, deadline - time.monotonic())
                    if step <= 0:
                        break
                wait_interruptibly(self, step)
        finally:
            bar.close()

    # -- aborting, splitting ------------------------------------------------------------------

    def abort(self) -> None:
        """Abort the messages that have not finished (``client.abort(..., block=True)``).

        Raises
        ------
        RuntimeError
            If everything has already finished.
        """
        if self.done():
            raise RuntimeError("Can't abort, I am already done!")
        pending = [m for m, c in zip(self._msg_ids, self._children, strict=True) if not c.done()]
        self._client.abort(pending, block=True)  # as ipyparallel: waits, returns None

    def split(self) -> tuple[AsyncResult, ...]:
        """One AsyncResult per message, as ipyparallel: ``(self,)`` when there is only one.

        A piece of a map is a plain AsyncResult whose ``get()`` is a one-element list holding
        that message's chunk (a list); any other piece returns its message's value.
        """
        if len(self._msg_ids) == 1:
            return (self,)
        chunked = isinstance(self, AsyncMapResult)
        return tuple(
            AsyncResult(
                self._client,
                [c],
                fname=self._fname,
                targets=self._engine_id(i),
                return_exceptions=self._return_exceptions,
                single_result=not chunked,
            )
            for i, c in enumerate(self._children)
        )

    @classmethod
    def join(cls, *results: AsyncResult) -> AsyncResult:
        """Combine AsyncResults of one client into one multi-result AsyncResult."""
        if not results:
            raise ValueError("join() needs at least one AsyncResult")
        client = results[0]._client
        if any(r._client is not client for r in results):
            raise ValueError("cannot join AsyncResults of different clients")
        children = [c for r in results for c in r._children]
        return AsyncResult(
            client, children, fname=results[0]._fname, targets=None, single_result=False
        )

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self._single_result:
            raise TypeError("AsyncResults with a single result are not iterable.")
        return self._iter_results()

    def _iter_results(self) -> Iterator[Any]:
        if self.done():  # as ipyparallel: a failure anywhere raises the CompositeError
            yield from self.get(0)
            return
        for i, child in enumerate(self._children):
            wait_interruptibly(child)
            value, failed = _outcome(child)
            if failed and not self._return_exceptions:
                raise self._failure_of(i, value)
            yield value

    # -- output -------------------------------------------------------------------------------

    def stream_output(self, interval: float = 0.05) -> Any:
        """A context manager: while its block runs, the messages' stdout/stderr is printed as
        it arrives, each line prefixed ``[stdout:<engine>]``; the rest when the block ends.

        Examples
        --------
        >>> with ar.stream_output():  # doctest: +SKIP
        ...     ar.wait_for_output()
        """
        from .streaming import stream_output

        return stream_output(self, interval)

    def display_outputs(self, groupby: str = "type", result_only: bool = False) -> None:
        """Show the output captured for each message, as ipyparallel does: stdout and stderr
        under ``[stdout:<engine>]`` labels (no labels for a single-engine result); inside
        IPython also the rich outputs (``[output:<engine>]``) and the results
        (``Out[<engine>:<count>]: ...``), which ipyparallel does not show outside IPython.

        Parameters
        ----------
        groupby : {"type", "engine", "order"}
            ``type``: all stdout, then all stderr, then displays, then results; ``engine``:
            everything of one engine together; ``order``: like ``type``, with the rich outputs
            of all engines collated (all first outputs, then all second ones, ...).
        result_only : bool
            Show only the results.

        Raises
        ------
        TimeoutError
            ``"result not ready"`` before every reply is in (as ipyparallel).
        ValueError
            An unknown ``groupby`` (ignored, as by ipyparallel, for a single result).
        """
        self._check_ready(_NOT_READY_DISPLAY)
        self._display_outputs(groupby, result_only)

    def _display_outputs(self, groupby: str = "type", result_only: bool = False) -> None:
        """:meth:`display_outputs` also before the end (what has arrived; ``%px`` when a
        KeyboardInterrupt cut the wait short)."""
        single = self._single_result and len(self._children) == 1
        if not single and groupby not in ("type", "engine", "order"):
            raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
        if self.done():
            self._await_output()  # the reply can arrive before the last output
        from .outputs import display_outputs

        display_outputs(self, groupby, result_only)

    # -- misc ---------------------------------------------------------------------------------

    def __repr__(self) -> str:
        if not self.done():
            state = "pending"
        elif self.cancelled() or self.exception(timeout=0) is not None:
            state = "failed"  # (as ipyparallel's)
        else:
            state = "finished"
        return f"<{type(self).__name__}({self._fname}): {state}>"


class AsyncMapResult(AsyncResult):
    """The future result of a map: each child returns one chunk (a list) of the results.

    Parameters
    ----------
    client : Client
    children : list of MessageFuture or str
        One future per chunk, in sequence order.
    mapObject : Map
        Joins the chunks (``mapObject.joinPartitions(chunks)``).
    fname : str
    ordered : bool
        Iteration yields results in sequence order (True) or as chunks finish (False).
        ``get()`` always returns sequence order.
    return_exceptions : bool
        Put exceptions in the result instead of raising a CompositeError: a failed chunk
        contributes its exception once per element (``chunk_sizes``) or once.
    owner : bool
    chunk_sizes : list of int, optional
        Number of elements of each chunk. When given, ``len()`` and ``progress`` count
        elements, else chunks.
    """

    def __init__(
        self,
        client: Any,
        children: Iterable[concurrent.futures.Future | str] | FanoutGroup,
        mapObject: Map,  # noqa: N803 - ipyparallel's name
        fname: str = "",
        ordered: bool = True,
        return_exceptions: bool = False,
        *,
        owner: bool = False,
        chunk_sizes: Sequence[int] | None = None,
    ) -> None:
        self._mapObject = mapObject
        self._ordered = bool(ordered)
        self._chunk_sizes = None if chunk_sizes is None else [int(s) for s in chunk_sizes]
        super().__init__(
            client,
            children,
            fname=fname,
            targets=None,
            owner=owner,
            return_exceptions=return_exceptions,
            single_result=False,
        )
        if self._chunk_sizes is not None and len(self._chunk_sizes) != len(self._children):
            raise ValueError(
                f"{len(self._chunk_sizes)} chunk sizes for {len(self._children)} chunks"
            )

    def _init_state(self) -> None:
        self._done_elems = 0

    def _on_child_done_locked(self, i: int) -> None:
        if self._chunk_sizes is not None and i < len(self._chunk_sizes):
            self._done_elems += self._chunk_sizes[i]

    def _on_children_done_locked(self, done: list[int]) -> None:
        sizes = self._chunk_sizes
        if sizes is not None:
            n = len(sizes)
            self._done_elems += sum([sizes[i] for i in done if i < n])

    def _chunk_size(self, i: int) -> int:
        return 1 if self._chunk_sizes is None else self._chunk_sizes[i]

    def _compute(self, return_exceptions: bool) -> tuple[Any, BaseException | None]:
        outcomes = self._outcomes()
        if not return_exceptions:
            composite = self._failures(outcomes)
            if composite is not None:
                return None, composite
        chunks = [
            [v] * self._chunk_size(i) if failed else v for i, (v, failed) in enumerate(outcomes)
        ]
        return self._mapObject.joinPartitions(chunks), None

    @property
    def progress(self) -> int:
        """Finished elements (with ``chunk_sizes``) or finished chunks."""
        if self._chunk_sizes is not None:
            return self._done_elems
        return len(self._order)

    def __len__(self) -> int:
        if self._chunk_sizes is not None:
            return sum(self._chunk_sizes)
        return len(self._children)

    def get_dict(self, timeout: float | None = None) -> dict[Any, Any]:
        """``{engine_id: chunk}``: the chunk of results each engine computed."""
        return super().get_dict(timeout)

    def _chunk_items(self, i: int) -> list[Any]:
        """The elements of finished chunk ``i`` (raises its error, as a CompositeError, unless
        return_exceptions)."""
        value, failed = _outcome(self._children[i])
        if failed:
            if not self._return_exceptions:
                raise self._failure_of(i, value)
            return [value] * self._chunk_size(i)
        return _items(value)

    def _iter_results(self) -> Iterator[Any]:
        n = len(self._children)
        if not self._ordered:
            k = 0
            while k < n:
                self._wait_until(lambda k=k: len(self._order) > k, None)
                with self._cond:
                    i = self._order[k]
                k += 1
                yield from self._chunk_items(i)
            return
        if isinstance(self._mapObject, RoundRobinMap) and n > 1:
            yield from self._iter_round_robin()
            return
        for i, child in enumerate(self._children):
            wait_interruptibly(child)
            yield from self._chunk_items(i)

    def _iter_round_robin(self) -> Iterator[Any]:
        """Element ``k`` is element ``k // n`` of chunk ``k % n``: yield while it exists."""
        n = len(self._children)
        items: dict[int, list[Any]] = {}
        k = 0
        while True:
            i, j = k % n, k // n
            if i not in items:
                wait_interruptibly(self._children[i])
                items[i] = self._chunk_items(i)
            if j >= len(items[i]):
                return
            yield items[i][j]
            k += 1


class AsyncHubResult(AsyncResult):
    """An AsyncResult for messages whose results are fetched from the hub's task records.

    It behaves exactly like :class:`AsyncResult` over its futures; the client resolves those
    futures from ``result_request`` replies instead of live replies.
    """


# -- helpers --------------------------------------------------------------------------------


def _items(chunk: Any) -> list[Any]:
    """The elements of a map chunk, as ``get()`` joins them: a chunk that is not joined (a
    scalar, ``str``, ``bytes``, a range: what a ``@parallel`` function may return) is one
    element."""
    kind = _kind(chunk)
    if kind in _UNJOINED:
        return [chunk]
    if kind == "frame":
        return [chunk.iloc[k] for k in range(len(chunk))]
    return list(chunk)


class _TextBar:
    """Fallback progress display without tqdm."""

    def __init__(self, total: int, desc: str, counted: str = "tasks finished") -> None:
        self.total = total
        self.desc = desc
        self.counted = counted
        self.start = time.monotonic()
        self.n = -1

    def update_to(self, n: int) -> None:
        if n == self.n:
            return
        self.n = n
        elapsed = time.monotonic() - self.start
        print(
            f"\r{self.desc}: {n:4}/{self.total} {self.counted} after {elapsed:4.0f} s",
            end="",
            file=sys.stdout,
            flush=True,
        )

    def close(self) -> None:
        print(file=sys.stdout, flush=True)


class _TqdmBar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update_to(self, n: int) -> None:
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(
    total: int,
    widget: bool | None,
    desc: str,
    unit: str = "tasks",
    initial: int = 0,
    counted: str = "tasks finished",
) -> Any:
    """A progress bar (``update_to(n)``, ``close()``): tqdm's (a notebook widget with
    ``widget=True``, text with False, whichever fits with None), else a line of text
    (``n/total <counted>``)."""
    try:
        if widget is True:
            from tqdm.notebook import tqdm
        elif widget is False:
            from tqdm import tqdm
        else:
            from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc, counted)
    # a text bar goes to stdout, as ipyparallel's
    opts = {"total": total, "unit": unit, "desc": desc, "file": sys.stdout, "initial": initial}
    try:
        return _TqdmBar(tqdm(**opts))
    except Exception:  # noqa: BLE001 - e.g. a notebook bar without ipywidgets
        try:
            from tqdm import tqdm as text_tqdm

            return _TqdmBar(text_tqdm(**opts))
        except Exception:  # noqa: BLE001
            return _TextBar(total, desc, counted)
