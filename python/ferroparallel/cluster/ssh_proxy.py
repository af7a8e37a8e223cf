"""A set of engines on another host started by one ``ssh`` connection
(``Cluster(engines="sshproxy")``, as ipyparallel's ``SSHProxyEngineSetLauncher``).

Where :mod:`.ssh_engines` runs one ``ssh`` process per engine, this launcher runs one per set:
on ``c.SSHProxyEngineSetLauncher.hostname`` (with ``user``, or ``location = "user@host"``) it
runs ``ferroparallel cluster engines -n N`` (``ipcluster_cmd``, plus ``ipcluster_args``) in the
foreground, which starts the ``N`` engines there as local processes (the remote profile's
config applies to them: ``c.Cluster.engine_args``, ...).

- The cluster's connection files go first, as the first line of the ``ssh`` session's stdin
  (never on a command line), into ``remote_profile_dir/security`` (mode 0600) by a small link
  program sent as ``python -c`` (:mod:`._remote_engines_link`), which removes them again when
  the remote command ends.
- The rest of that stdin links the set to its launcher (:mod:`._engines_link`): ``signal N``
  lines reach the engines (``Cluster.signal_engines``), ``signal 15`` stops them, and losing the
  ssh connection stops them too. As with the other SSH launchers, the stdin is a named pipe in
  the local security directory held open by the ``ssh`` process itself, so the engines outlive
  the process that started them (``cluster start --daemonize``) and ``cluster stop`` in another
  process stops them through the pipe.

The engines must reach the controller (``Cluster(controller_ip=...)``), and the remote
``cluster engines`` asks the controller how many engines have registered, through the client
ports. The remote command gets the environment of the remote login plus ``environment`` and the
cluster's ``IPP_CLUSTER_ID`` and ``IPP_PROFILE_DIR`` (:func:`~.ssh_engines.env_argv`:
shell-quoted, visible in process lists); the engines inherit it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import paths
from ..ssh import destination_options, parse_server
from . import _remote_engines_link
from .launchers import (
    LocalEngineSetLauncher,
    Process,
    _log_name,
    terminate,
    terminate_sync,
)
from .ssh_engines import _write, env_argv
from .ssh_host import HOST_OPTIONS, OneHostSSH

__all__ = ["SSHProxyEngineSetLauncher", "SSH_PROXY_LAUNCHERS"]

#: Names of the SSH proxy engine launcher, lower case.
SSH_PROXY_LAUNCHERS = ("sshproxy", "sshproxyenginesetlauncher", "sshproxyengineset")

#: Settings of the launcher (``c.SSHProxyEngineSetLauncher.<name>``, as ipyparallel's).
OPTIONS = (*HOST_OPTIONS, "ipcluster_cmd", "ipcluster_args")


class SSHProxyEngineSetLauncher(OneHostSSH, LocalEngineSetLauncher):
    """``n`` engines on ``hostname``, started there by one ``ssh`` process.

    Parameters are those of :class:`~.launchers.LocalEngineSetLauncher` (``cmd`` and ``args``
    are not used: the remote profile decides how the engines run), plus:

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
        The Python that runs the link program and the default ``ipcluster_cmd`` remotely
        (default: ``sys.executable``, the same path as here).
    ipcluster_cmd : sequence of str, optional
        The remote ``cluster`` command (default ``[remote_python, "-m",
        "ferroparallel.cluster"]``); ``engines`` and its options follow it.
    ipcluster_args : sequence of str, optional
        Extra arguments of the remote ``cluster engines`` (``--engines mpi``, ``--timeout``...).
    environment : Mapping, optional
        Variables for the remote command and its engines, on top of ``IPP_CLUSTER_ID`` and
        ``IPP_PROFILE_DIR`` (``env`` is the environment of the local ``ssh`` process).
    fifo : str, optional
        The named pipe of a set started by another process (:meth:`from_dict`).
    """

    kind = "sshproxy"
    needs_host = "SSH proxy engines need a host: c.SSHProxyEngineSetLauncher.hostname = 'host'"

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
        ipcluster_cmd: Sequence[str] | None = None,
        ipcluster_args: Sequence[str] = (),
        environment: Mapping[str, Any] | None = None,
        fifo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_host(
            hostname, user, location, ssh_cmd, ssh_args, remote_profile_dir, remote_python,
            environment, fifo,
        )  # fmt: skip
        self.ipcluster_cmd = (
            [str(a) for a in ipcluster_cmd]
            if ipcluster_cmd
            else [self.remote_python, "-m", "ferroparallel.cluster"]
        )
        self.ipcluster_args = [str(a) for a in ipcluster_args]

    @property
    def connection_files(self) -> dict[str, Path]:
        """``{"client": path, "engine": path}`` of the local connection files."""
        return {k: paths.connection_file(self.profile_dir, k, self.cluster_id)
                for k in ("client", "engine")}  # fmt: skip

    def remote_env(self) -> dict[str, str]:
        """The variables the remote command gets: the cluster's, then ``environment``."""
        return {
            "IPP_CLUSTER_ID": self.cluster_id,
            "IPP_PROFILE_DIR": self.remote_profile_dir,
            **self.environment,
        }

    def remote_cmd(self) -> list[str]:
        """The remote ``cluster engines`` command line (run under the link program)."""
        return [
            *self.ipcluster_cmd,
            "engines",
            "-n",
            str(self.n),
            "--profile-dir",
            self.remote_profile_dir,
            "--cluster-id",
            self.cluster_id,
            "--stdin-link",
            *self.ipcluster_args,
        ]

    def ssh_command(self) -> list[str]:
        """The local command line: ``ssh`` running the link program and :meth:`remote_cmd`."""
        server = parse_server(self.server)
        link = Path(_remote_engines_link.__file__).read_text(encoding="utf-8")
        remote = [*env_argv(self.remote_env()), self.remote_python, "-c", link]
        cmd = [*self.ssh_cmd, "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10"]
        cmd += destination_options(server, self.env)
        return [*cmd, *self.ssh_args, "--", server.host, shlex.join([*remote, *self.remote_cmd()])]

    def files_line(self) -> bytes:
        """The first line the link program reads: the connection files, to write remotely.

        Raises
        ------
        FileNotFoundError
            A local connection file is missing (no controller).
        """
        remote = self.remote_connection_files
        files = {remote[k]: p.read_text(encoding="utf-8") for k, p in self.connection_files.items()}
        return (json.dumps({"files": files}) + "\n").encode()

    @property
    def running_count(self) -> int:
        """``n`` while the ``ssh`` process runs, else 0 (one process stands for the set)."""
        return self.n if self.running else 0

    @property
    def pids(self) -> list[int]:
        """The engines run on another host: no local pids."""
        return []

    def start(self) -> list[Process]:
        """Start ``ssh`` and send the connection files (without waiting for the engines).

        Raises
        ------
        ValueError
            No host configured.
        FileNotFoundError
            No ``ssh`` command, or no connection files.
        """
        if self.running:
            raise RuntimeError(f"engine set {self.engine_set_id!r} is already running")
        server = self.server
        if shutil.which(self.ssh_cmd[0], path=self.env.get("PATH")) is None:
            raise FileNotFoundError(f"{self.ssh_cmd[0]!r} not found: SSH engines need OpenSSH")
        line = self.files_line()
        name = _log_name("ipengine", self.cluster_id, self.engine_set_id, server.replace("/", "_"))
        fifo = paths.security_dir(self.profile_dir) / (name[:-4] + ".stdin")
        proc = self._spawn(self.ssh_command(), paths.log_dir(self.profile_dir) / name, fifo)
        self.processes = [proc]
        try:
            _write(fifo, line)
        except BaseException:
            terminate_sync(self.processes, 2.0)
            self._remove_fifo()
            raise
        return self.processes

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the engines of the set, through the link (SIGTERM and SIGHUP stop
        the whole set)."""
        self._send(f"signal {int(sig)}\n")

    def failure(self) -> str | None:
        """Why the set is gone before being stopped (the ``ssh`` log's tail), or None."""
        for p in self.processes:
            if not p.running:
                return (
                    f"the {self.n} engine(s) on {self.server} (ssh pid {p.pid}) ended with "
                    f"status {p.exit_code}; log {p.log_file}:\n{p.log_tail()}"
                )
        return None

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the engines through the link (the remote command stops them, removes the files
        it sent, and ``ssh`` exits), then end ``ssh`` if it still runs after ``timeout`` s
        more than the remote command's own stop; the log goes if all stopped cleanly."""
        self._send(f"signal {int(signal.SIGTERM)}\n")
        for p in self.processes:
            await p.wait(2 * timeout)
        await terminate(self.processes, timeout)
        for p in self.processes:
            p.remove_log()
        self._remove_fifo()

    def stop_now(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop` (interpreter exit)."""
        self._send(f"signal {int(signal.SIGTERM)}\n")
        for p in self.processes:
            p.wait_sync(2 * timeout)
        terminate_sync(self.processes, timeout)
        self._remove_fifo()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {**super().to_dict(), "kind": self.kind, "hostname": self.hostname,
                "user": self.user, "location": self.location, "ssh_cmd": self.ssh_cmd,
                "ssh_args": self.ssh_args, "remote_profile_dir": self.remote_profile_dir,
                "remote_python": self.remote_python, "ipcluster_cmd": self.ipcluster_cmd,
                "ipcluster_args": self.ipcluster_args, "fifo": self.fifo}  # fmt: skip

    @classmethod
    def _options_from_dict(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **{k: d.get(k) or "" for k in ("hostname", "user", "location")},
            **{k: d.get(k) or "" for k in ("remote_profile_dir", "remote_python")},
            "ssh_cmd": d.get("ssh_cmd"),
            "ssh_args": d.get("ssh_args") or (),
            "ipcluster_cmd": d.get("ipcluster_cmd"),
            "ipcluster_args": d.get("ipcluster_args") or (),
            "fifo": d.get("fifo"),
        }
