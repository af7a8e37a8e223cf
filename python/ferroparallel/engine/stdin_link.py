"""An engine driven through its stdin (``ferroparallel engine --file -``), as the SSH launcher
starts engines on other hosts.

The first line of stdin is the engine connection info (JSON): it never appears on a command
line (where other users of the host could read the key). The launcher then keeps stdin open:

- a line ``signal N`` makes the engine send itself signal ``N`` (``Cluster.signal_engines``
  reaches engines on any host without knowing their pids);
- end of file (the ``ssh`` connection is gone) stops the engine as SIGTERM does (it
  unregisters), so an engine never outlives its ``ssh`` process. (The SSH launcher makes that
  stdin a named pipe the ``ssh`` process holds open itself: the engines outlive the command
  that started them, as ``cluster start --daemonize`` needs.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

#: ``--file`` value that means "read the connection info from stdin".
STDIN = "-"


class _Exits(Protocol):
    def request_exit(self, code: int) -> None: ...


def read_info(stream: IO[bytes] | None = None) -> Any:
    """The connection info from the first line of ``stream`` (stdin by default).

    Raises
    ------
    ValueError
        Nothing was sent, or the line is not JSON.
    """
    stream = stream if stream is not None else sys.stdin.buffer
    line = stream.readline()
    if not line.strip():
        raise ValueError("--file -: no connection info on stdin (end of file)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--file -: the first line of stdin is not JSON: {e}") from e


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # also ends running user code (EngineExit)


def follow(
    kernel: _Exits,
    stream: IO[bytes] | None = None,
    on_eof: Callable[[], None] = _terminate_self,
) -> threading.Thread:
    """Serve the rest of ``stream`` on a daemon thread (see the module docstring); at its end,
    ask ``kernel`` to exit and call ``on_eof`` (default: SIGTERM to this process)."""
    stream = stream if stream is not None else sys.stdin.buffer

    def run() -> None:
        for raw in stream:
            words = raw.decode("ascii", "replace").split()
            if len(words) == 2 and words[0] == "signal" and words[1].isdigit():
                try:
                    os.kill(os.getpid(), int(words[1]))
                except (OSError, ValueError) as e:
                    log.warning("cannot deliver %s: %s", raw.strip(), e)
            elif words:
                log.warning("ignoring launcher line %r", raw[:80])
        log.info("the launcher closed stdin: stopping")
        kernel.request_exit(0)
        on_eof()

    t = threading.Thread(target=run, name="ferroparallel-launcher-link", daemon=True)
    t.start()
    return t
