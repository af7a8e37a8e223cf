"""Turning the engines into a dask.distributed cluster: ``Client.become_dask()``.

The dask scheduler runs on an event loop thread of the client process (ipyparallel runs it in
its Python hub; ferroparallel's controller is native code with no Python on it), and each
engine runs a dask ``Worker`` (or ``Nanny``) on an event loop thread of its own, next to the
engine's main thread, so the engine keeps answering ipyparallel requests while it serves dask.
The functions an engine runs (:func:`start_worker`, :func:`stop_worker`) live here so that
they are pickled by reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from .loop_thread import LoopThread

__all__ = ["DaskBridge", "start_worker", "stop_worker"]

#: Seconds to wait for a scheduler or worker to start or to close.
START_TIMEOUT = 60.0
CLOSE_TIMEOUT = 30.0

#: On an engine: the running worker and its loop (see :func:`start_worker`).
_WORKER: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def import_distributed() -> Any:
    """The ``distributed`` module, or an ImportError that names the package to install."""
    try:
        import distributed
    except ImportError as e:
        raise ImportError(
            "become_dask needs dask.distributed on the client and on every engine: "
            "pip install 'dask[distributed]'"
        ) from e
    return distributed


# -- engine side --------------------------------------------------------------------------------


def start_worker(
    address: str, nanny: bool = False, worker_args: Mapping[str, Any] | None = None
) -> str:
    """Run on an engine: start a dask Worker (a Nanny with ``nanny=True``) for the scheduler at
    ``address`` on a loop thread of this process, replacing one started before.

    Returns
    -------
    str
        The worker's (or nanny's) address.
    """
    distributed = import_distributed()
    args = dict(worker_args or {})
    args.setdefault("nthreads", 1)
    from .engine.kernel import active_kernel

    kernel = active_kernel()
    if kernel is not None and kernel.engine_id is not None:
        args.setdefault("name", f"engine-{kernel.engine_id}")
    with _WORKER_LOCK:
        _stop_worker_locked()
        loop = LoopThread("ferroparallel-dask-worker")
        cls = distributed.Nanny if nanny else distributed.Worker

        async def start() -> Any:
            return await cls(address, **args)

        try:
            worker = loop.run(start(), START_TIMEOUT)
        except BaseException:
            loop.stop()
            raise
        _WORKER.update(loop=loop, worker=worker)
        if kernel is not None:  # as ipyparallel: the worker is a name in the engine namespace
            kernel.namespace.ns["dask_worker"] = kernel.namespace.ns["distributed_worker"] = worker
        return str(worker.address)


def stop_worker() -> bool:
    """Run on an engine: stop the dask worker :func:`start_worker` started; False if none."""
    with _WORKER_LOCK:
        return _stop_worker_locked()


def _stop_worker_locked() -> bool:
    worker, loop = _WORKER.pop("worker", None), _WORKER.pop("loop", None)
    if worker is None or loop is None:
        return False
    from .engine.kernel import active_kernel

    kernel = active_kernel()
    if kernel is not None:
        ns = kernel.namespace.ns
        for name in ("dask_worker", "distributed_worker"):
            if ns.get(name) is worker:
                del ns[name]
    try:
        loop.run(worker.close(), CLOSE_TIMEOUT)
    finally:
        loop.stop()
    return True


# -- client side --------------------------------------------------------------------------------


def _loopback_host(url: str | None) -> str | None:
    """``127.0.0.1`` when ``url`` (the controller's) is on a loopback address, else None."""
    host = urlparse(url or "").hostname
    if host is None:
        return None
    if host == "localhost":
        return "127.0.0.1"
    try:
        return "127.0.0.1" if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


#: The name of the thread the client-side scheduler runs on (see :class:`DaskBridge`).
SCHEDULER_THREAD = "ferroparallel-dask-scheduler"


class _SchedulerRecords(logging.Filter):
    """Drop the records the scheduler thread logs below ERROR, and its tracebacks of a
    cancelled handler.

    ipyparallel's scheduler runs in its controller, so what it logs (a worker leaving with
    computed results, the set of every key it held) lands in the controller's log, never in
    the user's terminal or notebook. A handler cancelled as the scheduler closes (the feed of
    a ``distributed.progress`` bar) is logged by dask at ERROR with a CancelledError
    traceback: that is the scheduler stopping as asked, not an error to show the user.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName != SCHEDULER_THREAD:
            return True
        if record.levelno < logging.ERROR:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


def _quiet_distributed_logs(level: int = logging.WARNING) -> contextlib.ExitStack:
    """Raise the stream handlers of the ``distributed`` logger to ``level``, and hide the
    scheduler thread's records below ERROR from them, until the returned stack is closed.

    The scheduler runs in this (the user's) process, where dask's default logging would print
    every worker connection at INFO; ipyparallel's scheduler logs in its controller instead.
    Handler levels set to ``level`` or above by the user are left alone.
    """
    stack = contextlib.ExitStack()
    for handler in logging.getLogger("distributed").handlers:
        if not isinstance(handler, logging.StreamHandler):
            continue
        if handler.level < level:
            stack.callback(handler.setLevel, handler.level)
            handler.setLevel(level)
        records = _SchedulerRecords()
        handler.addFilter(records)
        stack.callback(handler.removeFilter, records)
    return stack


class DaskBridge:
    """The dask scheduler of one ferroparallel Client and the engines that serve it.

    Parameters
    ----------
    controller_url : str
        A URL of the controller: when it is a loopback address, the scheduler and the workers
        listen on 127.0.0.1 only (everything is on this host).
    """

    def __init__(self, controller_url: str | None) -> None:
        self._host = _loopback_host(controller_url)
        self._loop: LoopThread | None = None
        self._scheduler: Any = None
        self._quiet: contextlib.ExitStack | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str | None:
        """The scheduler's address (None when not running)."""
        return None if self._scheduler is None else str(self._scheduler.address)

    def ensure_scheduler(self, port: int, scheduler_args: Mapping[str, Any] | None) -> str:
        """Start the scheduler unless it runs; returns its address."""
        distributed = import_distributed()
        with self._lock:
            if self._scheduler is not None:
                return str(self._scheduler.address)
            args = dict(scheduler_args or {})
            args.setdefault("port", port)
            if self._host is not None:
                args.setdefault("host", self._host)
                args.setdefault("dashboard_address", f"{self._host}:0")
            loop = LoopThread(SCHEDULER_THREAD)

            async def start() -> Any:
                return await distributed.Scheduler(**args)

            quiet = _quiet_distributed_logs()
            try:
                self._scheduler = loop.run(start(), START_TIMEOUT)
            except BaseException:
                loop.stop()
                quiet.close()
                raise
            self._quiet = quiet
            self._loop = loop
            return str(self._scheduler.address)

    def worker_args(self, worker_args: Mapping[str, Any]) -> dict[str, Any]:
        """Worker arguments with this bridge's defaults (listen on loopback when local)."""
        args = dict(worker_args)
        if self._host is not None:
            args.setdefault("host", self._host)
        return args

    def stop_scheduler(self) -> None:
        """Close the scheduler (its workers are told to close) and its loop thread."""
        with self._lock:
            scheduler, loop, quiet = self._scheduler, self._loop, self._quiet
            self._scheduler = self._loop = self._quiet = None
        if scheduler is None or loop is None:
            return
        try:
            loop.run(scheduler.close(), CLOSE_TIMEOUT)
        finally:
            loop.stop()
            if quiet is not None:
                quiet.close()
