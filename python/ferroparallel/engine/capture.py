"""stdout/stderr of user code, published on IOPub as ``stream`` messages.

During a request :class:`StreamCapture` replaces ``sys.stdout`` and ``sys.stderr`` with
writers that buffer text. Buffered text is published when the request ends, when user code
calls ``flush()``, when a newline is written at least :attr:`StreamCapture.interval` seconds
after the previous publication, and by :meth:`StreamCapture.flush_due` (the engine's watcher
thread calls it periodically while long requests run), so output is live.
``sys.stdin`` reads as empty instead of blocking, and ``input()`` raises IPython's
``StdinNotImplementedError``, as on ipyparallel's engines (no client answers input requests).
"""

from __future__ import annotations

import builtins
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

#: ``publish(name, text, parent)`` sends one ``stream`` message.
Publisher = Callable[[str, str, dict[str, Any]], None]

_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _StdinNotImplementedError(NotImplementedError):
    """Stands for IPython's ``StdinNotImplementedError`` where IPython is not installed."""


def _no_input(prompt: object = "") -> str:
    """``input()`` during a request: nothing can answer it (as ipykernel with
    ``allow_stdin=False``, which ipyparallel's engines are)."""
    try:
        from IPython.core.error import StdinNotImplementedError
    except ImportError:
        StdinNotImplementedError = _StdinNotImplementedError  # noqa: N806
    raise StdinNotImplementedError(
        "input() was called on an engine, which cannot ask anyone for input: "
        "pass the value as an argument"
    )


class StreamWriter(io.TextIOBase):
    """A text stream whose writes go to a :class:`StreamCapture` buffer.

    Parameters
    ----------
    capture : StreamCapture
        Owner of the buffer.
    name : str
        ``"stdout"`` or ``"stderr"``.
    fallback : TextIO or None
        Where writes go when no request is being captured (user threads that kept a
        reference to the writer).
    """

    def __init__(self, capture: StreamCapture, name: str, fallback: TextIO | None) -> None:
        super().__init__()
        self._capture = capture
        self._name = name
        self._fallback = fallback

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"<engine {self._name}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        capture = self._capture
        if capture.sync is not None and capture.active:
            capture.sync()  # what was written to the descriptors before this comes first
        if not capture.write(self._name, text) and self._fallback is not None:
            self._fallback.write(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:  # type: ignore[override]
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._capture.flush() and self._fallback is not None:
            self._fallback.flush()


class StreamCapture:
    """Buffers stdout/stderr text of the running request and publishes it.

    Parameters
    ----------
    publish : callable
        ``publish(name, text, parent)`` sends one ``stream`` message (any thread).
    interval : float
        Minimum seconds between two publications triggered by newlines.
    """

    def __init__(self, publish: Publisher, interval: float = 0.05) -> None:
        self._publish = publish
        self.interval = interval
        self._lock = threading.RLock()
        self._parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._parent: dict[str, Any] | None = None
        self._last_flush = 0.0
        self._saved: tuple[Any, Any, Any, Any] | None = None
        self.stdout = StreamWriter(self, "stdout", sys.__stdout__)
        self.stderr = StreamWriter(self, "stderr", sys.__stderr__)
        self._stdin = io.StringIO("")
        #: Called first by :meth:`stop`: text written elsewhere (the engine's file
        #: descriptors, see :mod:`.fdcapture`) joins the request's output before its last flush.
        self.before_stop: Callable[[], None] | None = None
        #: Called before Python-level text is buffered, for the same reason (keeps the order).
        self.sync: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        """True while a request is being captured."""
        return self._parent is not None

    def start(self, parent: dict[str, Any]) -> None:
        """Capture output for the request with header ``parent``."""
        with self._lock:
            self._parent = parent
            self._last_flush = time.monotonic()
        self._saved = (sys.stdout, sys.stderr, sys.stdin, builtins.input)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        builtins.input = _no_input
        if self._stdin.closed:  # closed by user code (``exit()`` closes stdin): a new one
            self._stdin = io.StringIO("")
        self._stdin.seek(0)
        sys.stdin = self._stdin

    def stop(self) -> None:
        """Publish what is left and restore the previous streams."""
        if self.before_stop is not None:
            self.before_stop()
        with self._lock:  # (one acquisition: this runs for every request)
            parent = self._parent
            if parent is not None and not _forked:
                self._publish_buffered(parent)
            self._parent = None
        if self._saved is not None:
            sys.stdout, sys.stderr, sys.stdin, builtins.input = self._saved
            self._saved = None

    def write(self, name: str, text: str) -> bool:
        """Buffer ``text``; returns False when no request is captured (or in a forked child,
        which cannot use the engine's I/O thread)."""
        if _forked:
            return False
        with self._lock:
            if self._parent is None:
                return False
            if text:
                self._parts[name].append(text)
                if "\n" in text and time.monotonic() - self._last_flush >= self.interval:
                    self.flush()
        return True

    def flush(self) -> bool:
        """Publish buffered text now; returns False when no request is captured."""
        if _forked:
            return False
        with self._lock:
            parent = self._parent
            if parent is None:
                return False
            self._last_flush = time.monotonic()
            self._publish_buffered(parent)
        return True

    def _publish_buffered(self, parent: dict[str, Any]) -> None:
        """Publish the buffered text for ``parent`` (caller holds the lock)."""
        for name, parts in self._parts.items():
            if parts:
                text = "".join(parts)
                parts.clear()
                self._publish(name, text, parent)

    def flush_due(self) -> None:
        """Publish buffered text if the last publication is older than :attr:`interval`."""
        with self._lock:
            if self._parent is not None and time.monotonic() - self._last_flush >= self.interval:
                self.flush()
