"""SSH tunnels to a controller: one local port forward per channel URL.

A client (or engine) that cannot reach the controller's ports directly forwards each of them
through an SSH server, ``ssh -L 127.0.0.1:<local>:<remote ip>:<remote port>``, and connects its
sockets to the rewritten ``tcp://127.0.0.1:<local>`` URLs. Two implementations, as in pyzmq's
:mod:`zmq.ssh.tunnel`:

- ``openssh``: one ``ssh -N`` subprocess carrying every forward (the user's ``~/.ssh/config``,
  agent, ``ProxyJump`` ... apply), under a tiny guard process that stops it when its owner
  exits, however it exits. Used by default when the ``ssh`` command exists.
- ``paramiko``: an in-process paramiko transport, with one listening socket and accept thread
  per forward. Used with ``paramiko=True``, or when there is no ``ssh`` command.

Unlike pyzmq's helpers, opening never prompts (no ``getpass``): a tunnel that cannot be opened
raises an :class:`SSHTunnelError` naming the host and the reason (authentication, host key,
unreachable) within ``timeout`` seconds. The returned :class:`Tunnels` handle closes everything
(kills the ``ssh`` process, stops the paramiko threads), and reports a tunnel that dies later
to an ``on_death`` callback.

Host keys are checked against the usual known-hosts files; ``$FERROPARALLEL_SSH_KNOWN_HOSTS``
names one more file (used by both implementations). For paramiko, pyzmq's
``$PYZMQ_PARAMIKO_HOST_KEY_POLICY`` (``Reject``, the default here; ``Warning``; ``AutoAdd``)
decides what happens to unknown hosts.
"""

from __future__ import annotations

import atexit
import collections
import getpass
import logging
import math
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .error import FerroParallelError

__all__ = [
    "SSHServer",
    "SSHTunnelError",
    "SSHAuthenticationError",
    "SSHHostKeyError",
    "SSHUnreachableError",
    "SSHTunnelClosedError",
    "Tunnels",
    "parse_server",
    "open_tunnels",
    "use_paramiko",
    "controller_is_local",
    "choose_server",
]

log = logging.getLogger("ferroparallel.ssh")

#: Environment variable naming an extra known_hosts file.
KNOWN_HOSTS_ENV = "FERROPARALLEL_SSH_KNOWN_HOSTS"
#: pyzmq's environment variable choosing paramiko's policy for unknown host keys.
PARAMIKO_POLICY_ENV = "PYZMQ_PARAMIKO_HOST_KEY_POLICY"

_POLL = 0.05
_CHUNK = 1 << 16


# ----- errors -----------------------------------------------------------------------------------


class SSHTunnelError(FerroParallelError, ConnectionError):
    """An SSH tunnel could not be opened, or died.

    Attributes
    ----------
    host : str
        The SSH server (``[user@]host[:port]``).
    reason : str
        ``"authentication"``, ``"host key"``, ``"unreachable"``, ``"closed"`` or ``"error"``.
    """

    reason = "error"

    def __init__(self, message: str, host: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.host, self.reason))


class SSHAuthenticationError(SSHTunnelError):
    """The SSH server refused every key / password offered."""

    reason = "authentication"


class SSHHostKeyError(SSHTunnelError):
    """The server's host key is unknown or does not match the known-hosts file."""

    reason = "host key"


class SSHUnreachableError(SSHTunnelError):
    """The SSH server could not be reached (refused, unresolvable, timed out)."""

    reason = "unreachable"


class SSHTunnelClosedError(SSHTunnelError):
    """An open tunnel died (the ``ssh`` process exited or the transport closed)."""

    reason = "closed"


# ----- server strings -------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHServer:
    """A parsed ``[user@]host[:port]``.

    Attributes
    ----------
    user : str or None
        Login name (``None``: the SSH default, i.e. the local user or ``~/.ssh/config``).
    host : str
        Host name or address.
    port : int or None
        Port (``None``: the SSH default, 22 or ``~/.ssh/config``).
    """

    user: str | None
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port else text


def parse_server(server: str) -> SSHServer:
    """Parse ``[user@]host[:port]`` (IPv6 hosts in brackets: ``user@[::1]:22``).

    Parameters
    ----------
    server : str
        The server string, as given to ``Client(sshserver=...)`` or ``engine --ssh``.

    Returns
    -------
    SSHServer

    Raises
    ------
    ValueError
        Empty host, bad port, or a host starting with ``-`` (which ``ssh`` would read as an
        option).
    """
    text = server.strip()
    user: str | None = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
        user = user or None
    port: int | None = None
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid SSH port in {server!r}")
        port = int(port_text)
    if not host or host.startswith("-") or (user or "").startswith("-"):
        raise ValueError(f"invalid SSH server {server!r}: use [user@]host[:port]")
    return SSHServer(user, host, port)


def destination_options(server: SSHServer, environ: Mapping[str, str]) -> list[str]:
    """``ssh`` options for ``server``: its port and user, and the known-hosts file named by
    ``$FERROPARALLEL_SSH_KNOWN_HOSTS`` in ``environ`` (before ``~/.ssh/known_hosts``)."""
    opts: list[str] = []
    known = environ.get(KNOWN_HOSTS_ENV)
    if known:
        opts += ["-o", f"UserKnownHostsFile={known} ~/.ssh/known_hosts"]
    if server.port:
        opts += ["-p", str(server.port)]
    if server.user:
        opts += ["-l", server.user]
    return opts


def use_paramiko(paramiko: bool | None) -> bool:
    """Resolve the ``paramiko`` argument.

    Parameters
    ----------
    paramiko : bool or None
        ``True``/``False`` force a mode; ``None`` picks paramiko on Windows or when there is
        no ``ssh`` command, the ``ssh`` command otherwise.

    Returns
    -------
    bool
    """
    if paramiko is not None:
        return bool(paramiko)
    return sys.platform == "win32" or shutil.which("ssh") is None


def _split_url(url: str) -> tuple[str, int]:
    transport, sep, rest = url.partition("://")
    if not sep or transport != "tcp":
        raise ValueError(f"only tcp:// URLs can be tunnelled over SSH, not {url!r}")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"cannot tunnel {url!r}: expected tcp://host:port")
    return host, int(port)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (for ``ssh -L``).

    As pyzmq's ``zmq.ssh.tunnel.select_random_ports``, without importing paramiko.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ----- the handle ---------------------------------------------------------------------------


_OPEN: weakref.WeakSet[Tunnels] = weakref.WeakSet()


class Tunnels:
    """Open SSH forwards; :meth:`close` them when done.

    Attributes
    ----------
    server : SSHServer
        The SSH server.
    mode : str
        ``"openssh"`` or ``"paramiko"``.
    urls : dict
        Channel name -> ``tcp://127.0.0.1:<local port>`` to connect to instead.
    remote : dict
        Channel name -> the original URL (as seen from the SSH server).
    """

    def __init__(
        self,
        server: SSHServer,
        mode: str,
        urls: dict[str, str],
        remote: dict[str, str],
        backend: _OpenSSH | _Paramiko,
        on_death: Callable[[SSHTunnelError], Any] | None,
    ) -> None:
        self.server = server
        self.mode = mode
        self.urls = urls
        self.remote = remote
        self._backend = backend
        self._on_death = on_death
        self._closed = threading.Event()
        self.error: SSHTunnelError | None = None
        _OPEN.add(self)
        self._watcher = threading.Thread(
            target=self._watch, name=f"ferroparallel-ssh-watch-{server.host}", daemon=True
        )
        self._watcher.start()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed.is_set()

    def alive(self) -> bool:
        """True while the tunnels are open and working."""
        return not self._closed.is_set() and self._backend.alive()

    def _watch(self) -> None:
        while not self._closed.wait(0.2):
            if self._backend.alive():
                continue
            if self._closed.is_set():
                return
            self.error = SSHTunnelClosedError(
                f"the SSH tunnel to {self.server} died: {self._backend.why_dead()}",
                str(self.server),
            )
            log.error("%s", self.error)
            if self._on_death is not None:
                try:
                    self._on_death(self.error)
                except Exception:  # noqa: BLE001 - a callback must not kill the watcher
                    log.exception("SSH tunnel death callback failed")
            # Free what is left (listeners, askpass helper): reconnecting sockets then get
            # "connection refused" at once instead of half-open forwards.
            try:
                self._backend.close()
            except Exception:  # noqa: BLE001
                log.debug("cleaning up a dead tunnel failed", exc_info=True)
            return

    def close(self, grace: float = 0.0) -> None:
        """Close every forward (kill ``ssh`` / stop the paramiko threads). Idempotent.

        Parameters
        ----------
        grace : float
            Seconds to wait first, while the tunnels are alive, so that data the caller's
            sockets just flushed (e.g. an engine's unregistration) reaches the server.
        """
        if self._closed.is_set():
            return
        if grace > 0 and self._backend.alive():
            time.sleep(grace)
        self._closed.set()
        self._backend.close()
        _OPEN.discard(self)

    def __enter__(self) -> Tunnels:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self.alive() else "dead")
        return f"<Tunnels {self.mode} via {self.server} ({len(self.urls)} channels, {state})>"


@atexit.register
def _close_all() -> None:
    for t in list(_OPEN):
        try:
            t.close()
        except Exception:  # noqa: BLE001
            pass


# ----- openssh ------------------------------------------------------------------------------

_AUTH_TEXT = (
    "permission denied",
    "too many authentication failures",
    "no more authentication methods",
    "no supported authentication methods",
)
_HOSTKEY_TEXT = (
    "host key verification failed",
    "remote host identification has changed",
    "no matching host key type",
    "host key for",
)
_UNREACHABLE_TEXT = (
    "connection refused",
    "timed out",
    "no route to host",
    "could not resolve",
    "name or service not known",
    "network is unreachable",
    "connection closed",
    "connection reset",
    "kex_exchange_identification",
)
_BIND_TEXT = ("address already in use", "cannot listen to port", "could not request local")

# Runs ``ssh`` as a child and stops it when the owner goes away: the owner holds the write end of
# the guard's stdin, so EOF means the owning process closed the tunnels or died (even by SIGKILL,
# when no atexit handler runs). The guard exits with ssh's status.
_GUARD = """\
import os, signal, subprocess, sys, threading
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def watch():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    p.terminate()
threading.Thread(target=watch, daemon=True).start()
signal.signal(signal.SIGTERM, lambda *a: p.terminate())
signal.signal(signal.SIGINT, signal.SIG_IGN)
rc = p.wait()
os._exit(rc if rc >= 0 else 128 - rc)
"""

_ASKPASS = """#!/bin/sh
case "$1" in
  *yes/no*|*fingerprint*) echo no ;;
  *) printf '%s\\n' "$FERROPARALLEL_SSH_PASSWORD" ;;
esac
"""


def _classify(text: str, host: str, what: str) -> SSHTunnelError:
    low = text.lower()
    detail = " ".join(line.strip() for line in text.strip().splitlines()[-3:]) or what
    for words, cls, what_failed, hint in (
        (
            _HOSTKEY_TEXT,
            SSHHostKeyError,
            "host key verification failed",
            f"add the host's key to ~/.ssh/known_hosts (or ${KNOWN_HOSTS_ENV})",
        ),
        (
            _AUTH_TEXT,
            SSHAuthenticationError,
            "authentication failed",
            "check the user, key (sshkey) or password",
        ),
        (_UNREACHABLE_TEXT, SSHUnreachableError, "unreachable", "check the host and port"),
    ):
        if any(w in low for w in words):
            return cls(
                f"cannot open an SSH tunnel to {host}: {what_failed} ({detail}); {hint}", host
            )
    return SSHTunnelError(f"cannot open an SSH tunnel to {host}: {detail}", host)


class _OpenSSH:
    """One ``ssh -N -L ... -L ...`` subprocess."""

    def __init__(
        self,
        server: SSHServer,
        forwards: list[tuple[int, str, int]],
        keyfile: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        self.server = server
        self.forwards = forwards
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._askpass_dir: str | None = None
        exe = shutil.which("ssh")
        if exe is None:
            raise SSHTunnelError("no 'ssh' command found; use paramiko=True", str(server))
        cmd = [
            exe,
            "-N",
            "-T",
            "-S",
            "none",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            f"ConnectTimeout={max(1, math.ceil(timeout))}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]
        env = dict(os.environ)
        if password is None:
            cmd += ["-o", "BatchMode=yes"]
        else:
            self._askpass_dir = tempfile.mkdtemp(prefix="ferroparallel-ssh-")
            script = Path(self._askpass_dir) / "askpass"
            script.write_text(_ASKPASS)
            script.chmod(0o700)
            env.update(
                SSH_ASKPASS=str(script),
                SSH_ASKPASS_REQUIRE="force",
                DISPLAY=env.get("DISPLAY", ":0"),
                FERROPARALLEL_SSH_PASSWORD=password,
            )
            cmd += ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"]
        if keyfile:
            cmd += ["-i", keyfile, "-o", "IdentitiesOnly=yes"]
        cmd += destination_options(server, os.environ)
        for lport, rhost, rport in forwards:
            rh = f"[{rhost}]" if ":" in rhost else rhost
            cmd += ["-L", f"127.0.0.1:{lport}:{rh}:{rport}"]
        cmd += ["--", server.host]
        log.debug("starting %s", " ".join(cmd))
        guarded = bool(sys.executable)
        if guarded:
            cmd = [sys.executable, "-I", "-S", "-c", _GUARD, *cmd]
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if guarded else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            if self._askpass_dir is not None:
                shutil.rmtree(self._askpass_dir, ignore_errors=True)
            raise
        self._reader = threading.Thread(
            target=self._read_stderr, name="ferroparallel-ssh-stderr", daemon=True
        )
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("ssh %s: %s", self.server, line)

    def output(self) -> str:
        """The last lines ``ssh`` wrote to stderr."""
        self._reader.join(timeout=1.0)
        return "\n".join(self._stderr)

    def wait_ready(self, deadline: float) -> None:
        """Return once every local port accepts connections; raise if ssh exits or time runs
        out (the process is then killed)."""
        pending = [lport for lport, _, _ in self.forwards]
        while True:
            if self.proc.poll() is not None:
                text = self.output()
                self.close()
                err = _classify(
                    text, str(self.server), f"ssh exited with status {self.proc.returncode}"
                )
                if any(w in text.lower() for w in _BIND_TEXT):
                    err.reason = "local port"
                raise err
            still = []
            for lport in pending:
                try:
                    with socket.create_connection(("127.0.0.1", lport), timeout=0.2):
                        pass
                except OSError:
                    still.append(lport)
            pending = still
            if not pending:
                return
            if time.monotonic() >= deadline:
                text = "\n".join(self._stderr)
                self.close()
                raise SSHUnreachableError(
                    f"cannot open an SSH tunnel to {self.server}: unreachable (no connection "
                    f"within the timeout){'; ssh said: ' + text if text else ''}",
                    str(self.server),
                )
            time.sleep(_POLL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def why_dead(self) -> str:
        text = self.output()
        last = text.strip().splitlines()[-1] if text.strip() else ""
        return f"ssh exited with status {self.proc.returncode}" + (f" ({last})" if last else "")

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # the guard stops ssh and exits
            except OSError:
                pass
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2.0)
        if self._askpass_dir is not None:
            shutil.rmtree(self._askpass_dir, ignore_errors=True)
            self._askpass_dir = None
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


# ----- paramiko -----------------------------------------------------------------------------


def _paramiko_module() -> Any:
    try:
        import paramiko
    except ImportError:
        raise SSHTunnelError(
            "paramiko is not installed (pip install paramiko), and is needed for "
            "paramiko=True or when there is no 'ssh' command"
        ) from None
    return paramiko


class _Forward:
    """One listening socket on 127.0.0.1 forwarding each connection over the transport."""

    def __init__(self, owner: _Paramiko, rhost: str, rport: int) -> None:
        self.owner = owner
        self.rhost = rhost
        self.rport = rport
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.lport: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(
            target=self._accept_loop, name=f"ferroparallel-ssh-fwd-{self.lport}", daemon=True
        )
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.owner.stopping.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.25)
                if not ready:
                    continue
                conn, peer = self.listener.accept()
            except (OSError, ValueError):
                return
            threading.Thread(
                target=self._pump, args=(conn, peer), name="ferroparallel-ssh-pump", daemon=True
            ).start()

    def _pump(self, conn: socket.socket, peer: Any) -> None:
        chan = None
        try:
            chan = self.owner.transport.open_channel(
                "direct-tcpip", (self.rhost, self.rport), peer, timeout=10
            )
            self.owner.track(conn, chan)
            while not self.owner.stopping.is_set():
                ready, _, _ = select.select([conn, chan], [], [], 0.25)
                if conn in ready:
                    data = conn.recv(_CHUNK)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(_CHUNK)
                    if not data:
                        break
                    conn.sendall(data)
        except Exception as e:  # noqa: BLE001 - any failure ends this one connection
            log.debug("forward to %s:%d ended: %r", self.rhost, self.rport, e)
        finally:
            for s in (chan, conn):
                if s is not None:
                    try:
                        s.close()
                    except Exception:  # noqa: BLE001
                        pass
            self.owner.untrack(conn, chan)

    def close(self) -> None:
        try:
            self.listener.close()
        except OSError:
            pass


class _Paramiko:
    """A paramiko transport and one :class:`_Forward` per remote endpoint."""

    def __init__(self, server: SSHServer, keyfile: str | None, password: str | None) -> None:
        self.server = server
        self.keyfile = keyfile
        self.password = password
        self.stopping = threading.Event()
        self.client: Any = None
        self.transport: Any = None
        self.forwards: list[_Forward] = []
        self._conns: set[Any] = set()
        self._lock = threading.Lock()

    def connect(self, deadline: float) -> None:
        """Connect and authenticate; raise a classified :class:`SSHTunnelError`."""
        paramiko = _paramiko_module()
        host = str(self.server)
        client = paramiko.SSHClient()
        self.client = client
        try:
            client.load_system_host_keys()
        except OSError:
            pass
        known = os.environ.get(KNOWN_HOSTS_ENV)
        if known:
            try:
                client.load_system_host_keys(known)
            except OSError as e:
                log.warning("cannot read %s=%s: %s", KNOWN_HOSTS_ENV, known, e)
        policy_name = os.environ.get(PARAMIKO_POLICY_ENV, "Reject")
        policy = getattr(paramiko, f"{policy_name}Policy", None)
        if policy is None:
            raise ValueError(f"unknown {PARAMIKO_POLICY_ENV}={policy_name!r}")
        client.set_missing_host_key_policy(policy())
        remaining = max(0.5, deadline - time.monotonic())
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                client.connect(
                    self.server.host,
                    self.server.port or 22,
                    username=self.server.user or getpass.getuser(),
                    key_filename=self.keyfile,
                    password=self.password,
                    look_for_keys=self.keyfile is None,
                    allow_agent=self.keyfile is None,
                    timeout=remaining,
                    banner_timeout=remaining,
                    auth_timeout=remaining,
                )
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                outcome.append(e)

        worker = threading.Thread(target=run, name="ferroparallel-ssh-connect", daemon=True)
        worker.start()
        worker.join(remaining)
        if not outcome:
            client.close()
            raise SSHUnreachableError(
                f"cannot open an SSH tunnel to {host}: unreachable (no SSH session within "
                f"{remaining:.3g} s)",
                host,
            )
        e = outcome[0]
        if e is None:
            self.transport = client.get_transport()
            self.transport.set_keepalive(10)
            return
        client.close()
        if isinstance(e, paramiko.BadHostKeyException):
            raise SSHHostKeyError(
                f"cannot open an SSH tunnel to {host}: host key verification failed (the "
                f"server's key does not match known_hosts: {e})",
                host,
            ) from e
        if isinstance(e, paramiko.AuthenticationException):
            raise SSHAuthenticationError(
                f"cannot open an SSH tunnel to {host}: authentication failed ({e}); check the "
                "user, key (sshkey) or password",
                host,
            ) from e
        if isinstance(e, paramiko.SSHException) and "known_hosts" in str(e):
            raise SSHHostKeyError(
                f"cannot open an SSH tunnel to {host}: host key verification failed ({e}); "
                f"add the host's key to ~/.ssh/known_hosts (or ${KNOWN_HOSTS_ENV}), or set "
                f"{PARAMIKO_POLICY_ENV}=AutoAdd",
                host,
            ) from e
        if isinstance(e, OSError | EOFError) or (
            isinstance(e, paramiko.SSHException) and "banner" in str(e).lower()
        ):
            raise SSHUnreachableError(
                f"cannot open an SSH tunnel to {host}: unreachable ({e or type(e).__name__})",
                host,
            ) from e
        raise SSHTunnelError(
            f"cannot open an SSH tunnel to {host}: {type(e).__name__}: {e}", host
        ) from e

    def add(self, rhost: str, rport: int) -> int:
        fwd = _Forward(self, rhost, rport)
        self.forwards.append(fwd)
        return fwd.lport

    def track(self, conn: Any, chan: Any) -> None:
        with self._lock:
            self._conns.add((conn, chan))

    def untrack(self, conn: Any, chan: Any) -> None:
        with self._lock:
            self._conns.discard((conn, chan))

    def alive(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def why_dead(self) -> str:
        exc = self.transport.get_exception() if self.transport is not None else None
        return f"the SSH transport closed ({exc or 'connection lost'})"

    def close(self) -> None:
        self.stopping.set()
        for fwd in self.forwards:
            fwd.close()
        with self._lock:
            conns = list(self._conns)
        for conn, chan in conns:
            for s in (conn, chan):
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass
        if self.client is not None:
            self.client.close()
        for fwd in self.forwards:
            fwd.thread.join(timeout=1.0)


# ----- which server -------------------------------------------------------------------------


def _this_host() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", "", socket.gethostname()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


def controller_is_local(info: Mapping[str, Any]) -> bool:
    """True when the connection info describes a controller on this machine.

    A loopback or wildcard interface is local only if ``location`` (the controller's host name,
    written by the controller) is empty or names this machine: a controller bound to
    ``127.0.0.1`` on another host is reachable only through SSH.

    Parameters
    ----------
    info : Mapping
        Connection info (``interface``, optional ``location``).

    Returns
    -------
    bool
    """
    _, _, ip = str(info.get("interface", "")).partition("://")
    location = str(info.get("location") or "")
    here = _this_host()
    if ip in ("*", "0.0.0.0", "", "[::]", "::") or ip.startswith("127.") or ip == "::1":
        if not location or location in here or location.startswith("127."):
            return True
        try:
            return socket.gethostbyname(location) in here
        except OSError:
            return False
    return ip in here


def choose_server(
    info: Mapping[str, Any],
    sshserver: str | None = None,
    sshkey: str | os.PathLike[str] | None = None,
    password: str | None = None,
) -> str | None:
    """The SSH server to tunnel through, or ``None`` for a direct connection.

    As in IPython.parallel: an explicit ``sshserver`` wins; else the connection file's ``ssh``
    entry when the controller is not on this machine; else, when only ``sshkey`` or
    ``password`` is given, the controller's own host.

    Parameters
    ----------
    info : Mapping
        Connection info.
    sshserver : str, optional
        Explicit ``[user@]host[:port]``.
    sshkey, password : optional
        Credentials; either one alone asks for a tunnel to the controller's host.

    Returns
    -------
    str or None
    """
    if sshserver:
        return sshserver
    if info.get("ssh") and not controller_is_local(info):
        return str(info["ssh"])
    if sshkey or password:
        _, _, ip = str(info.get("interface", "")).partition("://")
        if ip in ("*", "0.0.0.0", ""):
            ip = str(info.get("location") or "127.0.0.1")
        return ip
    return None


# ----- entry point --------------------------------------------------------------------------


def open_tunnels(
    urls: Mapping[str, str],
    server: str,
    keyfile: str | os.PathLike[str] | None = None,
    password: str | None = None,
    paramiko: bool | None = None,
    timeout: float = 10.0,
    on_death: Callable[[SSHTunnelError], Any] | None = None,
) -> Tunnels:
    """Forward every URL through the SSH server ``server``.

    Parameters
    ----------
    urls : Mapping
        Name -> ``tcp://host:port`` as seen *from the SSH server* (``127.0.0.1`` means the
        server itself). Equal URLs share one forward.
    server : str
        ``[user@]host[:port]``.
    keyfile : str or os.PathLike, optional
        Private key; when given, only this key (and ``password``) is offered.
    password : str, optional
        Password (or the key's passphrase, with paramiko). Never prompted for.
    paramiko : bool, optional
        ``True``: paramiko; ``False``: the ``ssh`` command; ``None``: see :func:`use_paramiko`.
    timeout : float
        Seconds to connect and authenticate.
    on_death : callable, optional
        Called once (from a watcher thread) with an :class:`SSHTunnelClosedError` if the
        tunnels die before :meth:`Tunnels.close`.

    Returns
    -------
    Tunnels
        ``.urls`` maps each name to its ``tcp://127.0.0.1:<local port>``.

    Raises
    ------
    SSHTunnelError
        :class:`SSHAuthenticationError`, :class:`SSHHostKeyError`,
        :class:`SSHUnreachableError` (also on timeout) or the base class; the message names the
        host and the reason.
    ValueError
        A malformed server string or a URL that is not ``tcp://host:port``.
    """
    srv = parse_server(server)
    remote = dict(urls)
    targets = sorted({_split_url(u) for u in remote.values()})
    key = os.fspath(keyfile) if keyfile is not None else None
    if key is not None:
        key = os.path.expanduser(key)
        if not os.path.isfile(key):
            raise SSHAuthenticationError(
                f"cannot open an SSH tunnel to {srv}: key file {key} does not exist", str(srv)
            )
    deadline = time.monotonic() + max(float(timeout), 0.5)
    if use_paramiko(paramiko):
        mode = "paramiko"
        pbackend = _Paramiko(srv, key, password)
        try:
            pbackend.connect(deadline)
            local = {t: pbackend.add(*t) for t in targets}
        except BaseException:
            pbackend.close()
            raise
        backend: _OpenSSH | _Paramiko = pbackend
    else:
        mode = "openssh"
        for attempt in range(3):
            ports = _free_ports(len(targets))
            local = dict(zip(targets, ports, strict=True))
            obackend = _OpenSSH(
                srv,
                [(lp, rh, rp) for (rh, rp), lp in local.items()],
                key,
                password,
                deadline - time.monotonic(),
            )
            try:
                obackend.wait_ready(deadline)
                break
            except SSHTunnelError as e:
                if e.reason != "local port" or attempt == 2:
                    raise
                log.debug("local port taken, retrying: %s", e)
            except BaseException:  # e.g. KeyboardInterrupt: never leave an ssh process behind
                obackend.close()
                raise
        backend = obackend
    out = {name: f"tcp://127.0.0.1:{local[_split_url(u)]}" for name, u in remote.items()}
    log.info(
        "SSH tunnels via %s (%s): %s",
        srv,
        mode,
        ", ".join(f"{remote[n]} -> {out[n]}" for n in sorted(out)),
    )
    return Tunnels(srv, mode, out, remote, backend, on_death)
