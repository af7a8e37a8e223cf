"""Local launchers: the controller and engines as subprocesses of this machine.

Every process is started with :data:`sys.executable` and the environment of the starting process
(``PYTHONPATH`` included), in its own session (terminal signals such as Ctrl-C reach only the
process that started the cluster), with stdout and stderr appended to a log file in
``<profile_dir>/log``. A launched process is tracked by :class:`Process`, which also works for a
process started by another Python process (after :meth:`Cluster.from_file`): it then checks the
pid and its start time, so a recycled pid is never mistaken for the original process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import paths
from ..error import ConnectionFileError

__all__ = [
    "LauncherError",
    "Process",
    "LocalControllerLauncher",
    "LocalEngineSetLauncher",
    "terminate",
    "terminate_sync",
]

_POLL = 0.005  # seconds between checks while waiting for files or processes


class LauncherError(RuntimeError):
    """A launcher could not start or stop what it launches (ipyparallel's name): a batch
    system's submit command failed, its output had no job id, a template was invalid."""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a pid from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) process, and the same one if ``start_time`` is set.

    Parameters
    ----------
    pid : int
        Process id.
    start_time : int, optional
        The start time (``/proc/<pid>/stat`` field 22) recorded when it was launched.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc (not Linux): trust kill(0)
    state, started = st
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


class _Reaper:
    """Collects the exit status of children that end while nobody waits for them (an engine
    killed from outside), so they do not linger as zombies until the cluster stops: one
    daemon thread, polling every 0.2 s while there are children to watch."""

    INTERVAL = 0.2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[bytes]] = []
        self._thread: threading.Thread | None = None

    def watch(self, popen: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._children.append(popen)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ferroparallel-reaper", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            with self._lock:
                # poll() reaps an ended child and keeps its exit code on the Popen
                self._children = [p for p in self._children if p.poll() is None]
                if not self._children:
                    self._thread = None
                    return


_REAPER = _Reaper()


def _reaper_after_fork() -> None:
    # the parent's thread does not exist here, its lock may have been held at the fork, and
    # its children are not this process's children
    _REAPER._lock = threading.Lock()
    _REAPER._children = []
    _REAPER._thread = None


os.register_at_fork(after_in_child=_reaper_after_fork)


class Process:
    """One launched process: a child of this process, or a pid recorded by another one.

    Parameters
    ----------
    pid : int
        Process id.
    popen : subprocess.Popen, optional
        Set when this process started it (then exit codes are known and it is reaped).
    start_time : int, optional
        Start time from ``/proc``, to recognise a recycled pid.
    cmd : sequence of str, optional
        The command line.
    log_file : str, optional
        Where its stdout and stderr go.
    log_offset : int
        Size of the log file before this process started (its own output follows).
    """

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        start_time: int | None = None,
        cmd: Sequence[str] | None = None,
        log_file: str | None = None,
        log_offset: int = 0,
    ) -> None:
        self.pid = pid
        self.popen = popen
        self.start_time = start_time
        self.cmd = list(cmd) if cmd is not None else []
        self.log_file = log_file
        self.log_offset = log_offset
        self._exit_code: int | None = None
        self._output: str | None = None  # the log's text, kept once the file is removed

    @classmethod
    def spawn(
        cls,
        cmd: Sequence[str],
        env: Mapping[str, str],
        log_file: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
    ) -> Process:
        """Start ``cmd`` in a new session with stdout/stderr appended to ``log_file``."""
        log_path = Path(log_file)
        with open(log_path, "ab") as out:
            offset = out.tell()
            popen = subprocess.Popen(
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        st = _proc_stat(popen.pid)
        _REAPER.watch(popen)
        return cls(
            popen.pid,
            popen=popen,
            start_time=st[1] if st else None,
            cmd=cmd,
            log_file=str(log_path),
            log_offset=offset,
        )

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        if self.popen is not None:
            return self.popen.poll() is None
        if self._exit_code is not None:
            return False
        alive = pid_alive(self.pid, self.start_time)
        if not alive:
            self._exit_code = -1
        return alive

    @property
    def exit_code(self) -> int | None:
        """Exit status (negative: killed by that signal; -1 also when unknown); None if running."""
        if self.popen is not None:
            return self.popen.poll()
        return None if self.running else self._exit_code

    def send_signal(self, sig: int) -> bool:
        """Send ``sig``; False when the process is already gone."""
        if not self.running:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the process has exited; False if still running after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL
        while self.running:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        return True

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Blocking :meth:`wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL
        while self.running:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        return True

    def remove_log(self) -> None:
        """Delete the log file of a process that stopped cleanly (exit status 0, or our
        SIGTERM; unknown for one another process started), as ipyparallel removes its
        launchers' output on stop, so a profile's ``log/`` does not grow with every cluster.
        A process that failed keeps its log for diagnosis."""
        if not self.log_file or self.running:
            return
        if self.exit_code not in (None, -1, 0, -signal.SIGTERM):
            return
        self.discard_log()

    def discard_log(self) -> None:
        """Delete the log file now, keeping its text for :meth:`output`."""
        if not self.log_file:
            return
        self._output = self.output()
        with contextlib.suppress(OSError):
            Path(self.log_file).unlink()

    def output(self) -> str:
        """Everything this process wrote to its log file (also after the file was removed
        by :meth:`remove_log`)."""
        if self._output is not None:
            return self._output
        if not self.log_file:
            return ""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines this process wrote to its log file."""
        text = self.output().rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for the cluster file)."""
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "cmd": self.cmd,
            "log_file": self.log_file,
            "log_offset": self.log_offset,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Process:
        """Rebuild from :meth:`to_dict` output (a process started elsewhere)."""
        return cls(
            int(d["pid"]),
            start_time=d.get("start_time"),
            cmd=d.get("cmd"),
            log_file=d.get("log_file"),
            log_offset=int(d.get("log_offset") or 0),
        )

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.exit_code}"
        return f"<Process pid={self.pid} {state}>"


async def terminate(procs: Iterable[Process], timeout: float = 5.0) -> None:
    """SIGTERM every running process, then SIGKILL the ones still alive after ``timeout`` s."""
    procs = [p for p in procs if p.running]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        await p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.running:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        await p.wait(5.0)


def terminate_sync(procs: Iterable[Process], timeout: float = 5.0) -> None:
    """Blocking :func:`terminate` (used at interpreter exit)."""
    procs = [p for p in procs if p.running]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_sync(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.running:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait_sync(5.0)


def _log_name(prefix: str, cluster_id: str, *parts: object) -> str:
    bits = [prefix, cluster_id or "default", *(str(p) for p in parts)]
    return "-".join(bits) + ".log"


class LocalControllerLauncher:
    """Run ``python -m ferroparallel.controller`` for one cluster.

    Parameters
    ----------
    profile_dir : str or os.PathLike
        Profile directory.
    cluster_id : str
        Cluster id (connection file names).
    args : sequence of str
        Extra controller arguments.
    env : Mapping, optional
        Environment (default: this process's).
    cmd : sequence of str, optional
        Command to run instead of ``[sys.executable, "-m", "ferroparallel.controller"]``.
    """

    default_cmd: tuple[str, ...] = ("-m", "ferroparallel.controller")

    def __init__(
        self,
        profile_dir: str | os.PathLike[str],
        cluster_id: str = "",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cmd: Sequence[str] | None = None,
    ) -> None:
        self.profile_dir = Path(profile_dir)
        self.cluster_id = cluster_id
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.cmd = list(cmd) if cmd else [sys.executable, *self.default_cmd]
        self.process: Process | None = None
        self.started_at: float | None = None

    @property
    def client_file(self) -> Path:
        """The client connection file this controller writes."""
        return paths.connection_file(self.profile_dir, "client", self.cluster_id)

    @property
    def engine_file(self) -> Path:
        """The engine connection file this controller writes."""
        return paths.connection_file(self.profile_dir, "engine", self.cluster_id)

    @property
    def connection_files(self) -> dict[str, str]:
        """``{"client": path, "engine": path}`` of the connection files (as ipyparallel's)."""
        return {"client": str(self.client_file), "engine": str(self.engine_file)}

    @property
    def running(self) -> bool:
        """True while the controller process is alive."""
        return self.process is not None and self.process.running

    def full_cmd(self) -> list[str]:
        """The command line that :meth:`start` runs."""
        return [
            *self.cmd,
            "--profile-dir",
            str(self.profile_dir),
            "--cluster-id",
            self.cluster_id,
            *self.args,
        ]

    def start(self) -> Process:
        """Start the controller process (without waiting for it to be ready)."""
        if self.running:
            raise RuntimeError(f"controller already running (pid {self.process.pid})")  # type: ignore[union-attr]
        log_file = paths.log_dir(self.profile_dir) / _log_name("ipcontroller", self.cluster_id)
        self.started_at = time.time()
        self.process = Process.spawn(self.full_cmd(), self.env, log_file)
        return self.process

    def _fresh(self, path: Path) -> bool:
        if self.started_at is None:
            return path.exists()
        try:
            # Some filesystems stamp with a coarse clock: allow a little slack.
            return path.stat().st_mtime >= self.started_at - 0.05
        except FileNotFoundError:
            return False

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the controller has written both connection files.

        Returns
        -------
        dict
            The engine connection info.

        Raises
        ------
        RuntimeError
            The controller exited first (the message has its log tail).
        TimeoutError
            No files after ``timeout`` seconds (the message names the file).
        """
        proc = self.process
        if proc is None:
            raise RuntimeError("controller not started")
        deadline = time.monotonic() + timeout
        files = (self.engine_file, self.client_file)
        while not all(self._fresh(f) for f in files):
            if not proc.running:
                raise RuntimeError(
                    f"the controller (pid {proc.pid}) exited with status {proc.exit_code} before "
                    f"writing {self.client_file}; log {proc.log_file}:\n{proc.log_tail()}"
                )
            if time.monotonic() >= deadline:
                missing = next(f for f in files if not self._fresh(f))
                raise TimeoutError(
                    f"the controller (pid {proc.pid}) did not write {missing} within "
                    f"{timeout:g} s; log {proc.log_file}:\n{proc.log_tail()}"
                )
            await asyncio.sleep(_POLL)
        try:
            return paths.load_connection_file(self.engine_file, "engine")
        except ConnectionFileError:
            # Extremely unlikely with atomic writes; give it one more poll.
            await asyncio.sleep(0.05)
            return paths.load_connection_file(self.engine_file, "engine")

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the controller (SIGKILL after ``timeout`` s); its log goes if it stopped
        cleanly (:meth:`Process.remove_log`)."""
        if self.process is not None:
            await terminate([self.process], timeout)
            if self.process.exit_code not in (0, None) and "--reuse" not in self.args:
                # Killed (or exit status unknown): it may not have removed its files.
                for f in (self.client_file, self.engine_file):
                    with contextlib.suppress(OSError):
                        f.unlink()
            self.process.remove_log()

    def get_output(self, remove: bool = False) -> str:
        """What the controller wrote to stdout and stderr (as ipyparallel launchers').

        Parameters
        ----------
        remove : bool
            Also delete the log file it went to (the text stays available here).
        """
        if self.process is None:
            return ""
        if remove:
            self.process.discard_log()
        return self.process.output()

    def describe(self) -> str:
        """How the controller runs, for messages (``controller pid 123``)."""
        return f"controller pid {self.process.pid}" if self.process else "controller"

    def stopped_cleanly(self) -> bool:
        """Whether the controller exited with status 0 (a shutdown request or SIGTERM)."""
        return self.process is not None and self.process.exit_code == 0

    def failure(self) -> str | None:
        """Why the controller is gone before being stopped (its log's tail), or None."""
        proc = self.process
        if proc is None or proc.running:
            return None
        return (
            f"the controller (pid {proc.pid}) exited with status {proc.exit_code}; "
            f"log {proc.log_file}:\n{proc.log_tail()}"
        )

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking stop (interpreter exit)."""
        if self.process is not None:
            terminate_sync([self.process], timeout)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "cmd": self.cmd,
            "args": self.args,
            "started_at": self.started_at,
            "process": self.process.to_dict() if self.process else None,
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], profile_dir: str | os.PathLike[str], cluster_id: str
    ) -> LocalControllerLauncher:
        """Rebuild a launcher (for a controller started by another process)."""
        self = cls(profile_dir, cluster_id, d.get("args") or (), cmd=d.get("cmd"))
        self.started_at = d.get("started_at")
        if d.get("process"):
            self.process = Process.from_dict(d["process"])
        return self


class LocalEngineSetLauncher:
    """Run ``n`` engines (``python -m ferroparallel.engine``) as one engine set.

    Parameters
    ----------
    profile_dir : str or os.PathLike
        Profile directory.
    cluster_id : str
        Cluster id.
    engine_set_id : str
        Id of this set within the cluster.
    n : int
        Number of engines.
    args : sequence of str
        Extra engine arguments.
    env : Mapping, optional
        Environment (default: this process's).
    connection_info : dict, optional
        Engine connection info passed as ``IPP_CONNECTION_INFO`` (else engines read the file).
    cmd : sequence of str, optional
        Command to run instead of ``[sys.executable, "-m", "ferroparallel.engine"]``.
    """

    default_cmd: tuple[str, ...] = ("-m", "ferroparallel.engine")

    def __init__(
        self,
        profile_dir: str | os.PathLike[str],
        cluster_id: str,
        engine_set_id: str,
        n: int,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        connection_info: Mapping[str, Any] | None = None,
        cmd: Sequence[str] | None = None,
    ) -> None:
        self.profile_dir = Path(profile_dir)
        self.cluster_id = cluster_id
        self.engine_set_id = engine_set_id
        self.n = int(n)
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.connection_info = dict(connection_info) if connection_info is not None else None
        self.cmd = list(cmd) if cmd else [sys.executable, *self.default_cmd]
        self.processes: list[Process] = []

    @property
    def engine_file(self) -> Path:
        """The engine connection file."""
        return paths.connection_file(self.profile_dir, "engine", self.cluster_id)

    @property
    def running(self) -> bool:
        """True while any engine of the set is alive."""
        return any(p.running for p in self.processes)

    @property
    def running_count(self) -> int:
        """How many engines of the set are alive (as far as this machine can tell)."""
        return sum(p.running for p in self.processes)

    @property
    def pids(self) -> list[int]:
        """Pids of the engines."""
        return [p.pid for p in self.processes]

    def full_cmd(self) -> list[str]:
        """The command line of one engine."""
        cmd = [*self.cmd, "--profile-dir", str(self.profile_dir), "--cluster-id", self.cluster_id]
        if self.connection_info is None:
            cmd += ["--file", str(self.engine_file)]
        return cmd + self.args

    def engine_env(self) -> dict[str, str]:
        """The environment of each engine."""
        env = dict(self.env)
        env["IPP_CLUSTER_ID"] = self.cluster_id
        env["IPP_PROFILE_DIR"] = str(self.profile_dir)
        if self.connection_info is not None:
            env["IPP_CONNECTION_INFO"] = json.dumps(self.connection_info)
        return env

    def start(self) -> list[Process]:
        """Start the engines (without waiting for them to register)."""
        if self.running:
            raise RuntimeError(f"engine set {self.engine_set_id!r} is already running")
        cmd = self.full_cmd()
        env = self.engine_env()
        logs = paths.log_dir(self.profile_dir)
        procs: list[Process] = []
        try:
            for i in range(self.n):
                log_file = logs / _log_name("ipengine", self.cluster_id, self.engine_set_id, i)
                procs.append(Process.spawn(cmd, env, log_file))
        except BaseException:
            terminate_sync(procs, 1.0)
            raise
        self.processes = procs
        return procs

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every running engine of the set."""
        for p in self.processes:
            p.send_signal(sig)

    def failure(self) -> str | None:
        """Why the set lost an engine before being stopped (its log's tail), or None."""
        for p in self.processes:
            if not p.running:
                return (
                    f"engine (pid {p.pid}) exited with status {p.exit_code}; "
                    f"log {p.log_file}:\n{p.log_tail()}"
                )
        return None

    def log_tails(self, lines: int = 10) -> str:
        """The last lines of every engine's log."""
        return "\n".join(f"--- {p.log_file}:\n{p.log_tail(lines)}" for p in self.processes)

    #: At most this many lines of each engine's output in :meth:`get_output` (0: all).
    output_limit: int = 100

    def get_output(self, remove: bool = False) -> str:
        """The output of the engines (as ipyparallel's engine sets): for each engine that wrote
        anything, an ``Output for engine <i>`` line, then its last :attr:`output_limit` lines
        indented by two spaces.

        Parameters
        ----------
        remove : bool
            Also delete the engines' log files (the text stays available here).
        """
        parts = []
        for i, p in enumerate(self.processes):
            if remove:
                p.discard_log()
            text = p.output()
            if not text:
                continue
            if self.output_limit:
                text = "".join(text.splitlines(True)[-self.output_limit :])
            parts += [f"Output for engine {i}", textwrap.indent(text, "  ")]
        return "\n".join(parts)

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        terminate_sync(self.processes, timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the engines (SIGKILL after ``timeout`` s); the logs of those that stopped
        cleanly go (:meth:`Process.remove_log`)."""
        await terminate(self.processes, timeout)
        for p in self.processes:
            p.remove_log()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "n": self.n,
            "cmd": self.cmd,
            "args": self.args,
            "processes": [p.to_dict() for p in self.processes],
        }

    @classmethod
    def _options_from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of a subclass, from its :meth:`to_dict` output."""
        return {}

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        profile_dir: str | os.PathLike[str],
        cluster_id: str,
        engine_set_id: str,
    ) -> LocalEngineSetLauncher:
        """Rebuild a launcher (for engines started by another process)."""
        self = cls(
            profile_dir,
            cluster_id,
            engine_set_id,
            d.get("n", 0),
            d.get("args") or (),
            cmd=d.get("cmd"),
            **cls._options_from_dict(d),
        )
        self.processes = [Process.from_dict(p) for p in d.get("processes", [])]
        return self
