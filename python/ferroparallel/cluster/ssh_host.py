"""What a launcher that runs one ``ssh`` session to one host keeps: the controller started over
SSH (:mod:`.ssh_controller`) and a set of engines started by a remote ``cluster engines``
(:mod:`.ssh_proxy`). The session's stdin is a named pipe (:func:`.ssh_engines.spawn_on_fifo`)
through which any process sends ``signal N`` lines."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .launchers import Process
from .ssh_engines import _write, env_argv, spawn_on_fifo, strip_home

__all__ = ["HOST_OPTIONS", "OneHostSSH"]

#: The settings of the session (``c.<Launcher>.<name>``, as ipyparallel's SSH launchers).
HOST_OPTIONS = (
    "hostname",
    "user",
    "location",
    "ssh_cmd",
    "ssh_args",
    "remote_profile_dir",
    "remote_python",
)


class OneHostSSH:
    """Settings and the stdin pipe of one ``ssh`` session to one host (a mixin for launchers
    with ``profile_dir``, ``env`` and ``connection_files``)."""

    #: Who needs the host, and the setting that names it (for the error when none is given).
    needs_host = "the SSH launcher needs a host: c.SSHLauncher.hostname = 'host'"

    profile_dir: Any
    env: Mapping[str, str]
    connection_files: Mapping[str, Any]

    def _init_host(
        self,
        hostname: str,
        user: str,
        location: str,
        ssh_cmd: Sequence[str] | None,
        ssh_args: Sequence[str],
        remote_profile_dir: str,
        remote_python: str,
        environment: Mapping[str, Any] | None,
        fifo: str | None,
    ) -> None:
        self.environment = {str(k): str(v) for k, v in (environment or {}).items()}
        env_argv(self.environment)  # (invalid names fail here, before anything starts)
        self.hostname = str(hostname)
        self.user = str(user)
        self.location = str(location)
        self.ssh_cmd = list(ssh_cmd) if ssh_cmd else ["ssh"]
        self.ssh_args = [str(a) for a in ssh_args]
        self.remote_profile_dir = str(remote_profile_dir) or strip_home(self.profile_dir)
        self.remote_python = str(remote_python) or sys.executable
        self.fifo = fifo

    @property
    def server(self) -> str:
        """``[user@]host[:port]`` of the remote host.

        Raises
        ------
        ValueError
            No host configured.
        """
        if self.hostname:
            return f"{self.user}@{self.hostname}" if self.user else self.hostname
        if self.location:
            return self.location
        raise ValueError(f"{self.needs_host} (or location = 'user@host')")

    @property
    def remote_connection_files(self) -> dict[str, str]:
        """``{"client": path, "engine": path}`` of the connection files on the remote host."""
        sec = PurePosixPath(self.remote_profile_dir) / "security"
        return {k: str(sec / Path(v).name) for k, v in self.connection_files.items()}

    def _spawn(self, cmd: list[str], log_file: Path, fifo: Path) -> Process:
        proc = spawn_on_fifo(cmd, self.env, log_file, fifo)
        self.fifo = str(fifo)
        return proc

    def _send(self, text: str) -> bool:
        """Write ``text`` into the session's stdin; whether it took it."""
        if not self.fifo:
            return False
        try:
            _write(Path(self.fifo), text.encode())
        except OSError:
            return False  # the ssh process is gone
        return True

    def _remove_fifo(self) -> None:
        if self.fifo:
            with contextlib.suppress(OSError):
                os.unlink(self.fifo)
            self.fifo = None
