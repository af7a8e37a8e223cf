"""The controller on another host, started over SSH (``Cluster(controller="ssh")``, as
ipyparallel's ``SSHControllerLauncher``).

``c.SSHControllerLauncher.hostname`` (with ``user``, or ``location = "user@host"``) names the
host. One local ``ssh`` process runs the controller there in the foreground, under a small link
program (:mod:`._remote_link`, sent as ``python -c``), with the profile directory
``remote_profile_dir`` on the remote host (default: the local one, relative to the home
directory as ipyparallel's). The controller's output comes back through ``ssh`` into the local
log file. Once the controller has written its connection files there, they are fetched over
SSH into the local profile's security directory (mode 0600), where clients and engines find
them, as ipyparallel fetches them with ``scp``.

As with the SSH engines (:mod:`.ssh_engines`), the link's stdin is a named pipe in the security
directory that the ``ssh`` process holds open itself: the controller outlives the process that
started it (``cluster start --daemonize``), ``cluster stop`` in another process stops it
through the pipe (``signal 15``), and a lost connection stops it too. Engines and clients must
reach the controller: start it on an address they can connect to
(``Cluster(controller_ip="*")`` or ``c.Cluster.controller_ip``, and ``controller_location``),
as with ipyparallel.

The remote controller gets the environment of the remote login plus ``environment``
(``c.SSHLauncher.environment``, ``start_controller(environment=...)``) and the cluster's
``IPP_CLUSTER_ID`` and ``IPP_PROFILE_DIR`` (the remote profile directory), set by
``env NAME=VALUE ...`` in front of the remote command, as for the engines
(:func:`~.ssh_engines.env_argv`: shell-quoted, visible in process lists).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import paths
from ..ssh import destination_options, parse_server
from . import _remote_link
from .launchers import (
    LocalControllerLauncher,
    Process,
    _log_name,
    terminate,
    terminate_sync,
)
from .ssh_engines import env_argv
from .ssh_host import OneHostSSH

__all__ = ["SSHControllerLauncher", "SSH_CONTROLLER_LAUNCHERS"]

#: Names of the SSH controller launcher, lower case.
SSH_CONTROLLER_LAUNCHERS = ("ssh", "sshcontrollerlauncher", "sshcontroller")

#: Read the files named on the command line and print them as one JSON list (run remotely).
_FETCH = "import json,sys;print(json.dumps([json.load(open(f)) for f in sys.argv[1:]]))"


class SSHControllerLauncher(OneHostSSH, LocalControllerLauncher):
    """The controller on ``hostname``, through one ``ssh`` process.

    Parameters are those of :class:`~.launchers.LocalControllerLauncher` (``cmd`` is the
    command run on the remote host), plus:

    hostname : str
        The host (or ``[user@]host[:port]``).
    user : str, optional
        The remote user.
    location : str, optional
        ``user@host`` in one setting (ipyparallel's); used when ``hostname`` is empty.
    ssh_cmd : sequence of str, optional
        The local ssh command (default ``["ssh"]``).
    ssh_args : sequence of str, optional
        Extra ``ssh`` options (``-i key``, ``-p port``, ``-o ...``).
    remote_profile_dir : str, optional
        The profile directory on the remote host (default: the local one, without the leading
        home directory).
    remote_python : str, optional
        The Python that runs the link program remotely (default: ``sys.executable``, the same
        path as here, like the default controller command).
    environment : Mapping, optional
        Variables for the remote controller, on top of ``IPP_CLUSTER_ID`` and
        ``IPP_PROFILE_DIR`` (``env`` is the environment of the local ``ssh`` process).
    fifo : str, optional
        The named pipe of a controller started by another process (:meth:`from_dict`).
    """

    kind = "ssh"
    needs_host = "the SSH controller needs a host: c.SSHControllerLauncher.hostname = 'host'"

    def __init__(
        self,
        *args: Any,
        hostname: str = "",
        user: str = "",
        location: str = "",
        ssh_cmd: Sequence[str] | None = None,
        ssh_args: Sequence[str] = (),
        remote_profile_dir: str = "",
        remote_python: str = "",
        environment: Mapping[str, Any] | None = None,
        fifo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_host(
            hostname, user, location, ssh_cmd, ssh_args, remote_profile_dir, remote_python,
            environment, fifo,
        )  # fmt: skip

    def remote_env(self) -> dict[str, str]:
        """The variables the remote controller gets: the cluster's (as ipyparallel's), then
        ``environment``."""
        return {
            "IPP_CLUSTER_ID": self.cluster_id,
            "IPP_PROFILE_DIR": self.remote_profile_dir,
            **self.environment,
        }

    def ssh_command(self, remote: Sequence[str]) -> list[str]:
        """The local command line that runs ``remote`` (argv) on the host."""
        server = parse_server(self.server)
        cmd = [*self.ssh_cmd, "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10"]
        cmd += destination_options(server, self.env)
        return [*cmd, *self.ssh_args, "--", server.host, shlex.join(remote)]

    def full_cmd(self) -> list[str]:
        """The controller's command line on the remote host."""
        return [
            *self.cmd,
            "--profile-dir",
            self.remote_profile_dir,
            "--cluster-id",
            self.cluster_id,
            *self.args,
        ]

    def start(self) -> Process:
        """Start ``ssh`` running the controller (without waiting for it to be ready).

        Raises
        ------
        ValueError
            No host configured.
        FileNotFoundError
            No ``ssh`` command.
        """
        if self.running:
            raise RuntimeError(f"controller already running (pid {self.process.pid})")  # type: ignore[union-attr]
        server = self.server
        if shutil.which(self.ssh_cmd[0], path=self.env.get("PATH")) is None:
            raise FileNotFoundError(
                f"{self.ssh_cmd[0]!r} not found: an SSH controller needs OpenSSH"
            )
        remote = self.remote_connection_files
        link = Path(_remote_link.__file__).read_text(encoding="utf-8")
        argv = [*env_argv(self.remote_env()), self.remote_python, "-c", link]
        argv += [remote["client"], remote["engine"]]
        cmd = self.ssh_command([*argv, *self.full_cmd()])
        name = _log_name("ipcontroller", self.cluster_id, server.replace("/", "_"))
        log_file = paths.log_dir(self.profile_dir) / name
        fifo = paths.security_dir(self.profile_dir) / (name[:-4] + ".stdin")
        self.started_at = time.time()
        self.process = self._spawn(cmd, log_file, fifo)
        return self.process

    def _ready_in_log(self) -> bool:
        proc = self.process
        if proc is None or not proc.log_file:
            return False
        try:
            with open(proc.log_file, "rb") as f:
                f.seek(proc.log_offset)
                return _remote_link.READY.encode() in f.read()
        except OSError:
            return False

    def fetch_connection_files(self) -> dict[str, Any]:
        """Copy the connection files from the remote host into the local security directory
        (mode 0600) and return them as ``{"client": info, "engine": info}``.

        Raises
        ------
        RuntimeError
            ``ssh`` failed (with its output).
        """
        remote = self.remote_connection_files
        cmd = self.ssh_command(
            [self.remote_python, "-c", _FETCH, remote["client"], remote["engine"]]
        )
        run = subprocess.run(
            cmd, env=dict(self.env), stdin=subprocess.DEVNULL, capture_output=True, timeout=60
        )
        if run.returncode != 0:
            raise RuntimeError(
                f"could not fetch the connection files from {self.server} (ssh exit status "
                f"{run.returncode}): {run.stderr.decode(errors='replace').strip()}"
            )
        client, engine = json.loads(run.stdout)
        paths.write_connection_file(self.client_file, client)
        paths.write_connection_file(self.engine_file, engine)
        return {"client": client, "engine": engine}

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the remote controller has written its connection files, then fetch them.

        Returns
        -------
        dict
            The engine connection info.

        Raises
        ------
        RuntimeError
            ``ssh`` or the controller exited first (the message has the log tail), or the
            files could not be fetched.
        TimeoutError
            Not ready after ``timeout`` seconds.
        """
        import asyncio

        proc = self.process
        if proc is None:
            raise RuntimeError("controller not started")
        deadline = time.monotonic() + timeout
        while not self._ready_in_log():
            if not proc.running:
                raise RuntimeError(
                    f"the controller on {self.server} (ssh pid {proc.pid}) exited with status "
                    f"{proc.exit_code} before writing its connection files; log "
                    f"{proc.log_file}:\n{proc.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the controller on {self.server} (ssh pid {proc.pid}) did not write its "
                    f"connection files within {timeout:g} s; log {proc.log_file}:\n"
                    f"{proc.log_tail()}"
                )
            await asyncio.sleep(0.02)
        infos = await asyncio.to_thread(self.fetch_connection_files)
        return dict(infos["engine"])

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the remote controller through its link; whether the link took it."""
        return self._send(f"signal {int(sig)}\n")

    def _cleanup(self) -> None:
        self._remove_fifo()
        if "--reuse" not in self.args:  # (the fetched copies; the controller removes its own)
            for f in (self.client_file, self.engine_file):
                with contextlib.suppress(OSError):
                    f.unlink()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the controller through its link (it stops, and ``ssh`` exits), then end the
        ``ssh`` process if it still runs after ``timeout`` s; remove the fetched connection
        files and the pipe. The log goes if everything stopped cleanly."""
        if self.process is not None:
            self.signal(signal.SIGTERM)
            await self.process.wait(timeout)
            await terminate([self.process], timeout)
            self.process.remove_log()
        self._cleanup()

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        if self.process is not None:
            self.signal(signal.SIGTERM)
            self.process.wait_sync(timeout)
            terminate_sync([self.process], timeout)
        self._cleanup()

    def describe(self) -> str:
        """How the controller runs, for messages."""
        pid = f" (ssh pid {self.process.pid})" if self.process else ""
        return f"controller on {self.server}{pid}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**super().to_dict(), "kind": self.kind, "hostname": self.hostname,
                "user": self.user, "location": self.location, "ssh_cmd": self.ssh_cmd,
                "ssh_args": self.ssh_args, "remote_profile_dir": self.remote_profile_dir,
                "remote_python": self.remote_python, "fifo": self.fifo}  # fmt: skip

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], profile_dir: str | os.PathLike[str], cluster_id: str
    ) -> SSHControllerLauncher:
        """Rebuild a launcher (for a controller started by another process)."""
        self = cls(
            profile_dir,
            cluster_id,
            d.get("args") or (),
            cmd=d.get("cmd"),
            hostname=d.get("hostname") or "",
            user=d.get("user") or "",
            location=d.get("location") or "",
            ssh_cmd=d.get("ssh_cmd"),
            ssh_args=d.get("ssh_args") or (),
            remote_profile_dir=d.get("remote_profile_dir") or "",
            remote_python=d.get("remote_python") or "",
            fifo=d.get("fifo"),
        )
        self.started_at = d.get("started_at")
        if d.get("process"):
            self.process = Process.from_dict(d["process"])
        return self
