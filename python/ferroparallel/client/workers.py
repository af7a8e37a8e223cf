"""Reusable daemon threads for the client's blocking side jobs (fetching lent results).

A fetch of a result lent over the network (decision 0014) runs off the dispatcher, one thread
per fetch so that fetches from different engines overlap. Starting a thread for each one cost
the dispatcher a hand-over of the GIL and the new thread's start-up on every large pull; here
a finished worker waits for the next job instead, and a new one is started only when every
worker is busy.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("ferroparallel.client")

#: Seconds an idle worker waits for a job before it ends.
IDLE_TIMEOUT = 30.0

_STOP = None  # sentinel job: the worker that takes it ends


class Workers:
    """A pool of daemon threads that grows when every worker is busy.

    Parameters
    ----------
    name : str
        Name of the threads.
    idle_timeout : float
        Seconds an idle worker waits for a job before it ends.
    """

    def __init__(self, name: str, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: workers waiting for a job and not yet promised one
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on a worker (an idle one, or a new one if all are busy).

        Raises
        ------
        RuntimeError
            The pool was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._idle > 0:
                self._idle -= 1  # promised to this job
                self._jobs.put(job)
                return
            thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=True)
            self._threads.add(thread)
        thread.start()

    def _run(self, job: Callable[[], None] | None) -> None:
        me = threading.current_thread()
        try:
            while job is not _STOP:
                try:
                    job()
                except Exception:  # noqa: BLE001 - a job must not end its worker
                    log.debug("%s job failed", self.name, exc_info=True)
                job = None  # (drop its references while idle)
                job = self._next()
        finally:
            with self._lock:
                self._threads.discard(me)

    def _next(self) -> Callable[[], None] | None:
        """The next job, or the stop sentinel once idle for ``idle_timeout``."""
        with self._lock:
            if self._closed:
                return _STOP
            self._idle += 1
        while True:
            try:
                return self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not promised a job: end
                        self._idle -= 1
                        return _STOP
                # a job was promised to this worker meanwhile: it is on its way

    @property
    def threads(self) -> int:
        """Number of workers (busy or idle)."""
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers once their current jobs end; wait up to ``timeout`` seconds for
        each (not for the calling thread, when it is a worker)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(_STOP)
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(timeout=timeout)
