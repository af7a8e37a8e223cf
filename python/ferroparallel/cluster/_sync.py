"""Running the Cluster's coroutines from synchronous code (the ``*_sync`` methods)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..loop_thread import LoopThread

__all__ = ["run_sync"]

T = TypeVar("T")


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def _shared_loop() -> LoopThread:
    """The helper thread's loop for ``*_sync`` calls made inside a running loop (one per
    process, started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread("ferroparallel-cluster-loop")
        return _shared


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code.

    With no event loop running in this thread, the coroutine runs on a private short-lived loop
    (the thread's current event loop is not touched). Inside a running loop (Jupyter), it runs
    on a helper thread's loop and this thread blocks until it is done.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except BaseException:
            if not task.done():  # interrupted (Ctrl-C): let the coroutine clean up
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise
        finally:
            loop.close()
    return _shared_loop().run(coro)
