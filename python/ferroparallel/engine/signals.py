"""SIGINT and SIGTERM on the engine.

SIGINT raises ``KeyboardInterrupt`` only while user code runs (inside an
:class:`InterruptGate`); while the engine is idle or doing its own work it is logged and
ignored. SIGTERM raises :class:`EngineExit`, which unwinds to the engine's main loop and ends
the engine cleanly (it unregisters first).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)


class EngineExit(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Raised in the main thread to stop the engine (SIGTERM)."""


class InterruptGate:
    """Context manager marking the stretch where SIGINT interrupts user code."""

    def __init__(self) -> None:
        self.open = False

    def __enter__(self) -> InterruptGate:
        self.open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.open = False


#: Name of the engine's SIGINT handler, whose frame ends the traceback of a KeyboardInterrupt
#: it raised (see :func:`hide_handler`).
_HANDLER = "on_sigint"


def hide_handler(exc: BaseException | None) -> None:
    """Cut the engine's SIGINT handler from the end of ``exc``'s traceback: the user sees the
    interrupt in their own code, as ipyparallel (whose handler is C code) shows it."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None and tb.tb_next is not None:
        code = tb.tb_next.tb_frame.f_code
        if code.co_name == _HANDLER and code.co_filename == __file__:
            tb.tb_next = None
            return
        tb = tb.tb_next


def install_handlers(gate: InterruptGate) -> Callable[[], None] | None:
    """Install the engine's SIGINT and SIGTERM handlers.

    Parameters
    ----------
    gate : InterruptGate
        SIGINT raises ``KeyboardInterrupt`` while ``gate.open``.

    Returns
    -------
    callable or None
        A function restoring the previous handlers; None when not called from the main
        thread (nothing installed).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    if hasattr(signal, "SIGTERM"):
        previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)

    def on_sigint(signum: int, frame: FrameType | None) -> Any:
        if gate.open:
            raise KeyboardInterrupt
        log.info("SIGINT received while idle: ignored")

    def on_sigterm(signum: int, frame: FrameType | None) -> Any:
        raise EngineExit("SIGTERM")

    signal.signal(signal.SIGINT, on_sigint)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    return restore


def signal_self(signum: int) -> None:
    """Deliver ``signum`` to this process, to the main thread when possible (so a blocking
    call there, e.g. ``time.sleep``, is interrupted)."""
    main = threading.main_thread().ident
    if hasattr(signal, "pthread_kill") and main is not None:
        signal.pthread_kill(main, signum)
    else:
        os.kill(os.getpid(), signum)
