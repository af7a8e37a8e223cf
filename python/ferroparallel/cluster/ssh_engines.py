"""Engines on other hosts, started over SSH (``Cluster(engines="ssh")``, as ipyparallel's
``SSHEngineSetLauncher``).

``c.SSHEngineSetLauncher.engines = {"[user@]host[:port]": n}`` (or ``(n, [engine args])``):
for each engine one local ``ssh host <engine_cmd> --file - ...`` process. The connection info
goes over the SSH channel on the engine's stdin, never on a command line or into a file on
the remote host, and stdin stays open as the link between launcher and engine
(:mod:`ferroparallel.engine.stdin_link`): ``signal N`` lines deliver signals, and losing the
connection stops the engine. That stdin is a named pipe in the profile's security directory,
which the ``ssh`` process itself holds open for writing too: the engines outlive the process
that started them (``cluster start --daemonize``, as ipcluster's), and ``cluster stop`` in
another process signals them through the pipe. The engines must reach the controller: start it
on an address they can connect to (``Cluster(controller_ip=...)``) or give them
``--ssh`` tunnels through ``engine_args``.

The remote engines get the environment of the remote login plus ``environment``
(``c.SSHLauncher.environment``, ``start_engines(environment=...)``, as ipyparallel's) and the
cluster's ``IPP_CLUSTER_ID`` and ``IPP_PROFILE_DIR``, set by ``env NAME=VALUE ...`` in front of
the remote command (:func:`env_argv`): the values are shell-quoted, and visible on both hosts'
process lists, so they are no place for secrets (the connection info is not among them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import paths
from ..ssh import destination_options, parse_server
from .launchers import (
    LocalEngineSetLauncher,
    Process,
    _log_name,
    _proc_stat,
    terminate,
    terminate_sync,
)

__all__ = ["SSHEngineSetLauncher", "SSH_LAUNCHERS", "env_argv", "spawn_on_fifo", "strip_home"]

#: Names of the SSH engine launcher, lower case.
SSH_LAUNCHERS = ("ssh", "sshenginesetlauncher", "sshengineset")

#: A portable environment variable name (what ``env`` and every shell accept).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip_home(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the home directory when it is under it (``~/.ipython/profile_x``
    becomes ``.ipython/profile_x``, which the remote shell resolves in the remote home)."""
    p, home = Path(path), Path.home()
    return str(p.relative_to(home)) if p.is_relative_to(home) and p != home else str(p)


def env_argv(environment: Mapping[str, Any]) -> list[str]:
    """``["env", "NAME=VALUE", ...]``, the prefix of a remote command that runs it with
    ``environment`` added (``[]`` when empty); :func:`shlex.join` quotes it for the remote
    shell.

    Raises
    ------
    ValueError
        A name that is not ``[A-Za-z_][A-Za-z0-9_]*``, or a value with a NUL character.
    """
    out = []
    for name, value in environment.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        text = str(value)
        if "\0" in text:
            raise ValueError(f"environment variable {name}: the value has a NUL character")
        out.append(f"{name}={text}")
    return ["env", *out] if out else []


def host_counts(engines: Mapping[str, Any]) -> list[tuple[str, int, list[str]]]:
    """``[(host, n, extra engine args)]`` from ipyparallel's ``engines`` mapping.

    Raises
    ------
    ValueError
        A count that is not a non-negative int, or a host ``ssh`` would misread.
    """
    out = []
    for host, spec in engines.items():
        parse_server(host)  # validates (no leading '-', a port that is a number...)
        n, extra = (spec[0], list(spec[1])) if isinstance(spec, list | tuple) else (spec, [])
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"engines[{host!r}] must be a count of engines, not {n!r}")
        out.append((host, n, [str(a) for a in extra]))
    return out


def spawn_on_fifo(cmd: list[str], env: Mapping[str, str], log_file: Path, fifo: Path) -> Process:
    """Start ``cmd`` (an ``ssh`` process) in a session of its own, output appended to
    ``log_file``, stdin the named pipe ``fifo`` (made anew, 0600). The pipe is opened
    read-write for the child: the ssh process holds a writer itself, so its stdin never ends
    while it runs, whichever process started it and whether that one still runs; anyone may
    write ``signal N`` lines into it (:func:`_write`)."""
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo, 0o600)
    rdwr = os.open(fifo, os.O_RDWR)
    try:
        with open(log_file, "ab") as out:
            offset = out.tell()
            popen = subprocess.Popen(
                cmd,
                env=dict(env),
                stdin=rdwr,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
    finally:
        os.close(rdwr)
    st = _proc_stat(popen.pid)
    return Process(popen.pid, popen, st[1] if st else None, cmd, str(log_file), offset)


class SSHEngineSetLauncher(LocalEngineSetLauncher):
    """Engines on the hosts of ``engines``, each through its own ``ssh`` process.

    Parameters are those of :class:`~.launchers.LocalEngineSetLauncher` (``n`` is ignored: the
    counts come from ``engines``; ``cmd`` is the command run on the remote hosts), plus:

    engines : Mapping
        ``{"[user@]host[:port]": n or (n, [extra engine args])}``.
    ssh_cmd : sequence of str, optional
        The local ssh command (default ``["ssh"]``).
    ssh_args : sequence of str, optional
        Extra ``ssh`` options (``-i key``, ``-o ...``).
    environment : Mapping, optional
        Variables for the remote engines, on top of ``IPP_CLUSTER_ID`` and ``IPP_PROFILE_DIR``
        (``env`` is the environment of the local ``ssh`` processes).
    """

    kind = "ssh"

    def __init__(
        self,
        *args: Any,
        engines: Mapping[str, Any] | None = None,
        ssh_cmd: Sequence[str] | None = None,
        ssh_args: Sequence[str] = (),
        environment: Mapping[str, Any] | None = None,
        fifos: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.environment = {str(k): str(v) for k, v in (environment or {}).items()}
        env_argv(self.environment)  # (invalid names fail here, before anything starts)
        self.engines = dict(engines or {})
        self.hosts = host_counts(self.engines)
        self.n = sum(n for _, n, _ in self.hosts)
        self.ssh_cmd = list(ssh_cmd) if ssh_cmd else ["ssh"]
        self.ssh_args = list(ssh_args)
        #: the named pipes that are the engines' stdins (one per engine)
        self.fifos = [str(f) for f in fifos]

    def remote_env(self) -> dict[str, str]:
        """The variables the remote engines get: the cluster's (as ipyparallel's, with the
        profile directory relative to the home directory), then ``environment``."""
        return {
            "IPP_CLUSTER_ID": self.cluster_id,
            "IPP_PROFILE_DIR": strip_home(self.profile_dir),
            **self.environment,
        }

    def ssh_command(self, host: str, extra: Sequence[str] = ()) -> list[str]:
        """The local command line that runs one engine on ``host``."""
        server = parse_server(host)
        remote = [*env_argv(self.remote_env()), *self.cmd, "--file", "-", *self.args, *extra]
        cmd = [*self.ssh_cmd, "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10"]
        cmd += destination_options(server, self.env)
        return [*cmd, *self.ssh_args, "--", server.host, shlex.join(remote)]

    def start(self) -> list[Process]:
        """Start one ``ssh`` per engine and send each its connection info.

        Raises
        ------
        ValueError
            No hosts in ``engines``.
        FileNotFoundError
            No ``ssh`` command.
        """
        if self.running:
            raise RuntimeError(f"engine set {self.engine_set_id!r} is already running")
        if not self.n:
            raise ValueError(
                "SSH engines need hosts: c.SSHEngineSetLauncher.engines = {'host': n}, or "
                "start_engines(engines={'host': n})"
            )
        if shutil.which(self.ssh_cmd[0], path=self.env.get("PATH")) is None:
            raise FileNotFoundError(f"{self.ssh_cmd[0]!r} not found: SSH engines need OpenSSH")
        info = self.connection_info
        if info is None:
            info = json.loads(self.engine_file.read_text())
        line = (json.dumps(info) + "\n").encode()
        logs = paths.log_dir(self.profile_dir)
        procs: list[Process] = []
        try:
            for host, n, extra in self.hosts:
                for i in range(n):
                    name = _log_name(
                        "ipengine", self.cluster_id, self.engine_set_id, host.replace("/", "_"), i
                    )
                    fifo = paths.security_dir(self.profile_dir) / (name[:-4] + ".stdin")
                    procs.append(self._spawn(self.ssh_command(host, extra), logs / name, fifo))
                    self.processes = procs
                    _write(fifo, line)
        except BaseException:
            self._send("signal 15\n")
            terminate_sync(procs, 2.0)
            self._remove_fifos()
            raise
        self.processes = procs
        return procs

    def _spawn(self, cmd: list[str], log_file: Path, fifo: Path) -> Process:
        proc = spawn_on_fifo(cmd, self.env, log_file, fifo)
        self.fifos.append(str(fifo))
        return proc

    def _send(self, text: str) -> bool:
        """Write ``text`` to every engine's pipe; whether any took it."""
        sent = False
        for fifo in self.fifos:
            try:
                _write(Path(fifo), text.encode())
                sent = True
            except OSError:
                pass  # that engine's ssh process is gone
        return sent

    def _remove_fifos(self) -> None:
        for fifo in self.fifos:
            with contextlib.suppress(OSError):
                os.unlink(fifo)
        self.fifos = []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every engine, through its link."""
        if not self._send(f"signal {int(sig)}\n"):
            super().signal(sig)  # no pipes (an older state file): only the ssh processes

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every engine through its link (each stops and unregisters, and its ``ssh``
        exits), then end the ``ssh`` processes that are still running after ``timeout`` s."""
        self._send(f"signal {int(signal.SIGTERM)}\n")
        for p in self.processes:
            await p.wait(timeout)
        await terminate(self.processes, timeout)
        self._remove_fifos()

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        self._send(f"signal {int(signal.SIGTERM)}\n")
        terminate_sync(self.processes, timeout)
        self._remove_fifos()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**super().to_dict(), "kind": self.kind, "engines": self.engines,
                "ssh_cmd": self.ssh_cmd, "ssh_args": self.ssh_args,
                "fifos": self.fifos}  # fmt: skip

    @classmethod
    def _options_from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "engines": d.get("engines") or {},
            "ssh_cmd": d.get("ssh_cmd"),
            "ssh_args": d.get("ssh_args") or (),
            "fifos": d.get("fifos") or (),
        }


def _write(fifo: Path, data: bytes) -> None:
    """Write ``data`` to a named pipe whose reader (an ``ssh`` process) runs.

    Raises
    ------
    OSError
        No reader (``ENXIO``: that ``ssh`` is gone), or the pipe is not there.
    """
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
