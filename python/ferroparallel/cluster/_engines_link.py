"""``ferroparallel cluster engines --stdin-link``: the remote end of
:class:`~.ssh_proxy.SSHProxyEngineSetLauncher`.

The command runs in the foreground of an ``ssh`` session (under :mod:`._remote_engines_link`,
which has written the connection files it uses), and its stdin is the launcher's link:

- a line ``signal N`` sends signal ``N`` to the engines of the set (SIGTERM and SIGHUP stop
  them and end the command instead: the signal itself would end only the engines, not the
  command);
- end of stdin (the launcher stopped the set, or the ssh connection is gone) stops them too,
  and so do SIGTERM and SIGHUP to the command.

It reads only the connection files (never a cluster file, which on the launcher's own host may
be the cluster's) and writes no cluster file, so it leaves nothing behind in the profile.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from typing import IO, Any

log = logging.getLogger(__name__)

#: Signals that stop the engine set (and end the command) rather than reach the engines.
STOP_SIGNALS = frozenset({int(signal.SIGTERM), int(signal.SIGHUP)})


class StdinLink:
    """``signal N`` lines of ``stream`` (default: stdin), read on a daemon thread.

    Parameters
    ----------
    stream : binary file, optional
        Where the lines come from.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdin.buffer
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="stdin-link", daemon=True).start()

    def _run(self) -> None:
        for raw in self._stream:
            words = raw.split()
            if len(words) == 2 and words[0] == b"signal" and words[1].isdigit():
                sig = int(words[1])
                if sig in STOP_SIGNALS:
                    break
                self._signals.put(sig)
            elif words:
                log.warning("ignoring launcher line %r", raw[:80])
        self._stop.set()

    def stop(self) -> None:
        """Ask to stop, as the end of stdin does."""
        self._stop.set()

    def trap_signals(self) -> None:
        """Make SIGTERM and SIGHUP to this process :meth:`stop` (no exception: the engines
        are stopped by the command's own flow, whatever it is doing)."""
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.stop())

    def stopping(self) -> bool:
        """Whether the launcher asked to stop (a stop signal, or the end of stdin)."""
        return self._stop.is_set()

    def signals(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        out = []
        while True:
            try:
                out.append(self._signals.get_nowait())
            except queue.Empty:
                return out


def unrecorded(cluster: Any) -> None:
    """Make ``cluster`` write no cluster file (see the module docstring)."""
    cluster.write_cluster_file = lambda: None


def serve(link: StdinLink, cluster: Any, engine_set_id: str, interval: float = 0.05) -> bool:
    """Deliver the link's signals to the engine set until the launcher asks to stop (True) or
    the set's engines have all exited (False)."""
    es = cluster.engines[engine_set_id]
    while True:
        for sig in link.signals():
            try:
                es.signal(sig)
            except (OSError, ValueError) as e:
                log.warning("cannot deliver signal %s to the engines: %s", sig, e)
        if link.stopping():
            return True
        if not es.running:
            return False
        time.sleep(interval)
