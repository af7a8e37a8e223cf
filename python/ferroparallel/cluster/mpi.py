"""Engines (``Cluster(engines="mpi")``) and the controller (``Cluster(controller="mpi")``)
started with ``mpiexec``, as ipyparallel's ``MPIEngineSetLauncher`` and ``MPIControllerLauncher``.

One ``mpiexec -n N [mpi_args] python -m ferroparallel.engine --mpi ...`` process runs the whole
set: the engines are the ranks of one MPI job (``MPI.COMM_WORLD`` spans them) and ask for their
rank as engine id. Stopping the set terminates ``mpiexec``, which ends the job; signals for the
engines (``Cluster.signal_engines``, e.g. SIGINT to interrupt running code) go to the engine
processes on this machine directly, because ``mpiexec`` would take most of them as a request to
abort the job.

The controller runs as the single rank of ``mpiexec -n 1 [mpi_args] <controller command>``
(where a site's policy wants every long-running process under its MPI launcher). Stopping it
sends SIGTERM to the controller process itself, so it removes its connection files and exits
cleanly and ``mpiexec`` exits with status 0.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from .. import paths
from .launchers import (
    LocalControllerLauncher,
    LocalEngineSetLauncher,
    Process,
    _log_name,
    _proc_stat,
    terminate,
    terminate_sync,
)

__all__ = ["MPIControllerLauncher", "MPIEngineSetLauncher", "descendants"]

#: Names of the MPI engine launcher, lower case, as ipyparallel spells them.
MPI_LAUNCHERS = (
    "mpi",
    "mpienginesetlauncher",
    "mpiexecenginesetlauncher",
    "mpiengineset",
    "mpilauncher",
    "mpiexeclauncher",
)

#: Names of the MPI controller launcher, lower case, as ipyparallel spells them.
MPI_CONTROLLER_LAUNCHERS = (
    "mpi",
    "mpicontrollerlauncher",
    "mpiexeccontrollerlauncher",
    "mpicontroller",
    "mpilauncher",
    "mpiexeclauncher",
)


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` on this machine (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        try:
            children.setdefault(int(rest[1]), []).append(int(name))
        except (IndexError, ValueError):
            continue
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return []


def _is_engine(pid: int) -> bool:
    argv = _cmdline(pid)
    return b"ferroparallel.engine" in argv or any(a.endswith(b"ferroparallel-engine") for a in argv)


class _MPICommand:
    """The ``mpiexec`` command and its arguments of a launcher that runs under MPI."""

    kind = "mpi"

    def __init__(
        self,
        *args: Any,
        mpi_cmd: Sequence[str] | None = None,
        mpi_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mpi_cmd = list(mpi_cmd) if mpi_cmd else ["mpiexec"]
        self.mpi_args = [str(a) for a in mpi_args]


class MPIEngineSetLauncher(_MPICommand, LocalEngineSetLauncher):
    """Run ``n`` engines as the ranks of one ``mpiexec`` job.

    Parameters are those of :class:`~.launchers.LocalEngineSetLauncher`, plus:

    mpi_cmd : sequence of str, optional
        The MPI launcher command (default ``["mpiexec"]``).
    mpi_args : sequence of str, optional
        Extra ``mpiexec`` arguments, placed after ``-n N`` (hosts files, binding...).
    """

    def full_cmd(self) -> list[str]:
        """The ``mpiexec`` command line that starts the whole set."""
        return [
            *self.mpi_cmd,
            "-n",
            str(self.n),
            *self.mpi_args,
            *super().full_cmd(),
            "--mpi",
        ]

    @property
    def pids(self) -> list[int]:
        """Pids of the engines (the ranks running on this machine)."""
        return [p for proc in self.processes for p in descendants(proc.pid) if _is_engine(p)]

    def start(self) -> list[Process]:
        """Start ``mpiexec`` (without waiting for the engines to register).

        Raises
        ------
        FileNotFoundError
            The MPI launcher command is not installed (the message says what to install).
        """
        if self.running:
            raise RuntimeError(f"engine set {self.engine_set_id!r} is already running")
        exe = self.mpi_cmd[0]
        if shutil.which(exe, path=self.env.get("PATH")) is None:
            raise FileNotFoundError(
                f"{exe!r} not found: MPI engines need an MPI launcher and mpi4py "
                "(pip install mpich mpi4py, or your system's MPI), or set mpi_cmd"
            )
        log_file = paths.log_dir(self.profile_dir) / _log_name(
            "ipengine", self.cluster_id, self.engine_set_id, "mpi"
        )
        self.processes = [Process.spawn(self.full_cmd(), self.engine_env(), log_file)]
        return self.processes

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every engine of the job on this machine."""
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """End the job: SIGTERM the engines on this machine (they unregister and finalise MPI
        together, so ``mpiexec`` exits by itself), then ``mpiexec`` if it is still running
        (which ends ranks elsewhere); SIGKILL after ``timeout`` s for whatever is left."""
        engines = []
        for pid in self.pids:
            st = _proc_stat(pid)
            engines.append(Process(pid, start_time=st[1] if st else None))
        await terminate(engines, timeout)
        if engines and len(engines) >= self.n:
            # every rank ran here and has ended: mpiexec exits by itself once its proxy has
            # seen them go; a SIGTERM meanwhile would end the job as failed (exit 255)
            for p in self.processes:
                await p.wait(timeout)
        await terminate(self.processes, timeout)

    def get_output(self, remove: bool = False) -> str:
        """What ``mpiexec`` (and so every rank) wrote, as ipyparallel's MPI launcher: one
        output for the whole job.

        Parameters
        ----------
        remove : bool
            Also delete the log file (the text stays available here).
        """
        for p in self.processes:
            if remove:
                p.discard_log()
        return "".join(p.output() for p in self.processes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**super().to_dict(), "kind": self.kind, "mpi_cmd": self.mpi_cmd,
                "mpi_args": self.mpi_args}  # fmt: skip

    @classmethod
    def _options_from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {"mpi_cmd": d.get("mpi_cmd"), "mpi_args": d.get("mpi_args") or ()}


def _which_or_explain(exe: str, env: Mapping[str, str], what: str) -> None:
    if shutil.which(exe, path=env.get("PATH")) is None:
        raise FileNotFoundError(
            f"{exe!r} not found: {what} needs an MPI launcher "
            "(pip install mpich, or your system's MPI), or set mpi_cmd"
        )


class MPIControllerLauncher(_MPICommand, LocalControllerLauncher):
    """Run the controller as the one rank of ``mpiexec -n 1``.

    Parameters are those of :class:`~.launchers.LocalControllerLauncher`, plus:

    mpi_cmd : sequence of str, optional
        The MPI launcher command (default ``["mpiexec"]``).
    mpi_args : sequence of str, optional
        Extra ``mpiexec`` arguments, placed after ``-n 1``.
    """

    def controller_cmd(self) -> list[str]:
        """The controller's own command line (the program ``mpiexec`` runs)."""
        return super().full_cmd()

    def full_cmd(self) -> list[str]:
        """The ``mpiexec`` command line that :meth:`start` runs."""
        return [*self.mpi_cmd, "-n", "1", *self.mpi_args, *self.controller_cmd()]

    @property
    def pids(self) -> list[int]:
        """Pids of the controller process on this machine (a descendant of ``mpiexec``)."""
        want = [a.encode() for a in self.controller_cmd()]
        return [
            pid
            for proc in ([self.process] if self.process else [])
            for pid in descendants(proc.pid)
            if _cmdline(pid) == want
        ]

    def start(self) -> Process:
        """Start ``mpiexec`` (without waiting for the controller to be ready).

        Raises
        ------
        FileNotFoundError
            The MPI launcher command is not installed.
        """
        _which_or_explain(self.mpi_cmd[0], self.env, "an MPI controller")
        return super().start()

    def _controllers(self) -> list[Process]:
        out = []
        for pid in self.pids:
            st = _proc_stat(pid)
            out.append(Process(pid, start_time=st[1] if st else None))
        return out

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the controller (it removes its connection files and exits; ``mpiexec``
        then exits by itself), then ``mpiexec`` if it still runs; SIGKILL after ``timeout`` s
        for whatever is left."""
        if self.process is not None:
            ctl = self._controllers()
            await terminate(ctl, timeout)
            if ctl:
                await self.process.wait(timeout)
        await super().stop(timeout)

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        if self.process is not None:
            ctl = self._controllers()
            terminate_sync(ctl, timeout)
            if ctl:
                self.process.wait_sync(timeout)
        super().stop_now(timeout)

    def describe(self) -> str:
        """How the controller runs, for messages."""
        return f"controller under mpiexec pid {self.process.pid}" if self.process else "controller"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**super().to_dict(), "kind": self.kind, "mpi_cmd": self.mpi_cmd,
                "mpi_args": self.mpi_args}  # fmt: skip

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], profile_dir: str | os.PathLike[str], cluster_id: str
    ) -> MPIControllerLauncher:
        """Rebuild a launcher (for a controller started by another process)."""
        self = cls(
            profile_dir,
            cluster_id,
            d.get("args") or (),
            cmd=d.get("cmd"),
            mpi_cmd=d.get("mpi_cmd"),
            mpi_args=d.get("mpi_args") or (),
        )
        self.started_at = d.get("started_at")
        if d.get("process"):
            self.process = Process.from_dict(d["process"])
        return self
