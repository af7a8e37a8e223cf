"""Output written to the engine's file descriptors 1 and 2, captured like ``print``.

``sys.stdout`` capture (:mod:`.capture`) only sees Python-level writes. Subprocesses
(``os.system``, ``subprocess.run`` without ``capture_output``), forked children and C/Fortran
code write to the process's file descriptors 1 and 2 directly. As ipyparallel's engines do (the
``watchfd`` of ipykernel's ``OutStream``), :class:`FdCapture` points those descriptors at pipes
and a thread reads them: text read while a request runs joins that request's ``stream``
output; other text goes to where the descriptors pointed before (the engine's log).

``FERROPARALLEL_CAPTURE_FD=0`` in the engine's environment turns this off.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import faulthandler
import logging
import os
import select
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .capture import StreamCapture
from .logs import set_log_stream

log = logging.getLogger(__name__)

#: Environment variable that turns descriptor capture off when set to ``0``.
ENV_VAR = "FERROPARALLEL_CAPTURE_FD"
#: Bytes read from a pipe at a time.
CHUNK = 65536
#: Seconds between two checks of the stop flag by the reader thread.
POLL = 0.5


def enabled() -> bool:
    """Whether descriptor capture is on (POSIX only; ``FERROPARALLEL_CAPTURE_FD=0`` is off)."""
    return os.name == "posix" and os.environ.get(ENV_VAR, "1").strip() != "0"


def _c_fflush() -> Any:
    """The C library's ``fflush`` (looked up once: ``ctypes.CDLL`` costs ~20 µs a call, and
    the output of every request is flushed)."""
    try:
        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None


_FFLUSH = _c_fflush()

#: Forks since this module was imported: a capture made before a fork does nothing in the
#: child, whose descriptors still point at the parent's pipes (counted rather than
#: ``os.getpid()`` compared on every request).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers (``printf`` output of extension modules)."""
    if _FFLUSH is not None:
        try:
            _FFLUSH(None)
        except Exception:  # noqa: BLE001, S110 - nothing to flush into is no error here
            pass


def _faulthandler_to(fd: int) -> None:
    """Point an enabled ``faulthandler`` at ``fd``: a crash report written into a pipe whose
    reader dies with the process would be lost."""
    if faulthandler.is_enabled():
        faulthandler.enable(file=fd, all_threads=True)


@dataclass
class _Pipe:
    """One redirected descriptor: the pipe it now writes to and a copy of its old target."""

    name: str
    fd: int
    original: int
    read_end: int
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    open: bool = True


class FdCapture:
    """Redirects descriptors 1 and 2 into pipes read by a thread.

    Parameters
    ----------
    capture : StreamCapture
        The engine's capture of the running request's output.
    """

    def __init__(self, capture: StreamCapture) -> None:
        self._capture = capture
        self._pipes: list[_Pipe] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_stream: Any = None
        self._generation = _fork_generation
        #: The pipes' read ends, polled by :meth:`sync` (built once: it runs per write)
        self._poll: Any = None

    def start(self) -> None:
        """Redirect the descriptors and start the reader thread (no-op when disabled or if a
        descriptor cannot be redirected)."""
        if not enabled() or self._pipes:
            return
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        try:
            for name, fd in (("stdout", 1), ("stderr", 2)):
                self._pipes.append(self._redirect(name, fd))
        except OSError as e:
            log.warning("not capturing output of subprocesses: %s", e)
            self._restore()
            return
        # engine log lines go straight to the old stderr, never into a request's output
        self._log_stream = open(  # noqa: SIM115 - lives as long as the redirection
            self._pipes[1].original, "w", buffering=1, closefd=False, errors="replace"
        )
        set_log_stream(self._log_stream)
        _faulthandler_to(self._pipes[1].original)
        self._poll = select.poll()
        for pipe in self._pipes:
            self._poll.register(pipe.read_end, select.POLLIN)
        self._thread = threading.Thread(
            target=self._read_loop, name="ferroparallel-fd-capture", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _redirect(name: str, fd: int) -> _Pipe:
        original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_inheritable(original, False)
        os.dup2(write_end, fd)
        os.close(write_end)
        return _Pipe(name, fd, original, read_end)

    def drain(self) -> None:
        """Dispatch everything written so far (the C library's buffers included); called
        before the running request's output is flushed for the last time."""
        if self._pipes and self._generation == _fork_generation:
            _flush_c_stdio()
            self.sync()

    def sync(self) -> None:
        """Dispatch what the pipes hold now (called before each Python-level write of a
        request, so that output keeps the order it was written in). A forked child never
        reads: the pipes are its parent's."""
        if not self._pipes or self._generation != _fork_generation:
            return
        poll = self._poll
        if poll is not None:
            try:
                if not poll.poll(0):
                    return  # nothing written: the usual case, one system call
            except (OSError, ValueError, RuntimeError):
                pass  # closed under us, or polled by another thread now: just read
        with self._lock:
            for pipe in self._pipes:
                self._read_available(pipe)

    def stop(self) -> None:
        """Dispatch what is left, restore the descriptors and stop the thread."""
        if not self._pipes:
            return
        self._stopping.set()
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL)
        self._restore()

    def _restore(self) -> None:
        with self._lock:
            self._poll = None
            if self._log_stream is not None:
                set_log_stream(sys.__stderr__)
                _faulthandler_to(2)
                with contextlib.suppress(Exception):
                    self._log_stream.flush()
                self._log_stream = None
            for pipe in self._pipes:
                with contextlib.suppress(OSError):
                    os.dup2(pipe.original, pipe.fd)
                for end in (pipe.original, pipe.read_end):
                    with contextlib.suppress(OSError):
                        os.close(end)
            self._pipes = []

    def _read_loop(self) -> None:
        while not self._stopping.is_set():
            fds = [p.read_end for p in self._pipes if p.open]
            if not fds:
                return
            try:
                select.select(fds, [], [], POLL)
            except (OSError, ValueError):
                return  # closed under us by stop()
            with self._lock:
                for pipe in self._pipes:
                    self._read_available(pipe)

    def _read_available(self, pipe: _Pipe) -> None:
        """Read and dispatch what ``pipe`` holds (caller holds the lock)."""
        while pipe.open:
            try:
                data = os.read(pipe.read_end, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                self._close(pipe)
                return
            if not data:  # every writer is gone
                self._close(pipe)
                return
            self._dispatch(pipe, data)

    def _close(self, pipe: _Pipe) -> None:
        """Stop reading ``pipe`` (caller holds the lock)."""
        pipe.open = False
        if self._poll is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(pipe.read_end)

    def _dispatch(self, pipe: _Pipe, data: bytes) -> None:
        text = pipe.decoder.decode(data)
        if not text or self._capture.write(pipe.name, text):
            return
        with contextlib.suppress(OSError):
            os.write(pipe.original, text.encode("utf-8", "replace"))
