"""SSH tunnels against a real OpenSSH server started by the tests.

The module starts ``/usr/sbin/sshd`` (Debian ``openssh-server``) in the foreground on a random
loopback port with a throwaway host key, an ``AuthorizedKeysFile`` in the test's temporary
directory holding a generated ed25519 client key, and its own known_hosts file (passed to the
tunnels through ``$FERROPARALLEL_SSH_KNOWN_HOSTS``). Clients and engines then reach a real
controller through tunnels made by the ``ssh`` command and by paramiko. Everything is skipped,
with the reason, when sshd is not installed or cannot start.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster_util import free_port, start_controller, stop_popen, wait_until
from ferroparallel import ssh
from ferroparallel.client import Client

SSHD = "/usr/sbin/sshd"
#: Client timeout in these tests (also the bound for failing tunnels).
TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(120)


@dataclass
class Sshd:
    """A running test sshd."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    key: Path
    wrong_key: Path
    known_hosts: Path
    user: str
    log: Path

    @property
    def server(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _wait_banner(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip(f"{SSHD} or ssh-keygen not installed (Debian package openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    host_key, key, wrong = d / "host_ed25519", d / "client_ed25519", d / "wrong_ed25519"
    for k in (host_key, key, wrong):
        _keygen(k)
    (d / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        try:  # sshd's privilege separation directory, normally made by its service unit
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError as e:
            pytest.skip(f"cannot create /run/sshd for sshd: {e}")
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication yes\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin yes\n"
        "AllowTcpForwarding yes\n"
        "LogLevel VERBOSE\n"
    )
    log = d / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if not _wait_banner(port, proc):
        stop_popen(proc)
        pytest.skip(f"sshd did not start:\n{log.read_text(errors='replace')[-2000:]}")
    host_pub = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    mp = pytest.MonkeyPatch()
    mp.setenv(ssh.KNOWN_HOSTS_ENV, str(known))
    try:
        yield Sshd(proc, port, d, key, wrong, known, getpass.getuser(), log)
    finally:
        mp.undo()
        stop_popen(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list]]:
    """A controller on 127.0.0.1 and one engine connected directly."""
    ctl = start_controller(tmp_path_factory.mktemp("sshcluster"), "--ping", "500")
    engines: list[subprocess.Popen[bytes]] = []
    engines.append(_engine(ctl))
    try:
        with Client(ctl.client_file, timeout=TIMEOUT) as rc:
            rc.wait_for_engines(1, timeout=30)
        yield ctl, engines
    finally:
        for p in engines:
            stop_popen(p)
        ctl.stop()


def _engine(ctl: Any, *args: str) -> subprocess.Popen[bytes]:
    """An engine subprocess; its log is ``<profile>/log/engine-<pid>.log``."""
    log = ctl.profile_dir / "log" / f"engine-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "ferroparallel.engine", "--file", str(ctl.engine_file), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    log.rename(log.with_name(f"engine-{p.pid}.log"))
    return p


def _ssh_children(t: ssh.Tunnels) -> int | None:
    backend = t._backend
    return backend.proc.pid if isinstance(backend, ssh._OpenSSH) else None


# ----- unit tests (no sshd) ---------------------------------------------------------------------


def test_parse_server() -> None:
    assert ssh.parse_server("alice@host.example:2222") == ssh.SSHServer(
        "alice", "host.example", 2222
    )
    assert ssh.parse_server("host") == ssh.SSHServer(None, "host", None)
    assert ssh.parse_server("bob@[::1]:22") == ssh.SSHServer("bob", "::1", 22)
    assert str(ssh.parse_server("bob@[::1]:22")) == "bob@[::1]:22"
    for bad in ("", "u@", "h:0", "h:x", "-oProxyCommand=evil", "-l@h"):
        with pytest.raises(ValueError):
            ssh.parse_server(bad)


def test_choose_server() -> None:
    here = socket.gethostname()
    local = {"interface": "tcp://127.0.0.1", "location": here, "ssh": "gw"}
    remote = {"interface": "tcp://127.0.0.1", "location": "node7.invalid", "ssh": "me@gw:22"}
    assert ssh.choose_server(local) is None
    assert ssh.choose_server(local, sshserver="x@y") == "x@y"
    assert ssh.choose_server(remote) == "me@gw:22"
    assert ssh.choose_server({**remote, "ssh": ""}) is None
    assert ssh.choose_server({**local, "ssh": ""}, sshkey="k") == "127.0.0.1"
    assert ssh.choose_server({"interface": "tcp://10.1.2.3", "ssh": ""}, password="pw") == (
        "10.1.2.3"
    )
    assert not ssh.controller_is_local({"interface": "tcp://10.255.1.2"})
    assert ssh.controller_is_local({"interface": "tcp://*", "location": ""})


def test_non_tcp_url_rejected() -> None:
    with pytest.raises(ValueError, match="tcp://"):
        ssh.open_tunnels({"a": "ipc:///tmp/x"}, "h", paramiko=True)


# ----- client through a tunnel ------------------------------------------------------------------


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_client_through_tunnel(sshd: Sshd, cluster, use_paramiko: bool) -> None:
    ctl, _ = cluster
    rc = Client(
        ctl.client_file,
        sshserver=sshd.server,
        sshkey=str(sshd.key),
        paramiko=use_paramiko,
        timeout=TIMEOUT,
    )
    tunnels = rc._tunnels
    try:
        assert tunnels is not None and tunnels.mode == ("paramiko" if use_paramiko else "openssh")
        assert all(u.startswith("tcp://127.0.0.1:") for u in tunnels.urls.values())
        rc.wait_for_engines(1, timeout=30)
        pids = rc[:].apply_sync(os.getpid)
        assert len(pids) == len(rc.ids) and all(isinstance(p, int) for p in pids)
        data = secrets.token_bytes(3_000_000)  # several SSH packets each way
        assert rc[rc.ids[0]].apply_sync(lambda b: b[::-1], data) == data[::-1]
    finally:
        pid = _ssh_children(tunnels) if tunnels is not None else None
        rc.close()
    assert tunnels.closed and not tunnels.alive()
    if pid is not None:
        wait_until(lambda: _gone(pid), 5, "the ssh process to exit")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_connection_file_ssh_used_for_remote_controller(sshd: Sshd, cluster, tmp_path) -> None:
    """A file whose controller is on another host (``location``) is reached via its ``ssh``."""
    ctl, _ = cluster
    info = json.loads(ctl.client_file.read_text())
    info.update(location="controller-host.invalid", ssh=sshd.server)
    path = tmp_path / "ipcontroller-client.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    with Client(path, sshkey=str(sshd.key), timeout=TIMEOUT) as rc:
        assert rc._tunnels is not None and str(rc._tunnels.server) == sshd.server
        rc.wait_for_engines(1, timeout=30)
        assert rc[:].apply_sync(lambda: 6 * 7) == [42] * len(rc.ids)


def test_remote_loopback_controller_without_ssh_is_warned(cluster, tmp_path) -> None:
    """As ipyparallel's Client: a controller on loopback of another host (``location``) with no
    SSH server to reach it is warned about (connecting would time out), naming the host."""
    ctl, _ = cluster
    info = json.loads(ctl.client_file.read_text())
    with pytest.warns(RuntimeWarning, match=r"sshserver='you@controller-host.invalid'"):
        rc = Client(dict(info, location="controller-host.invalid", ssh=""), timeout=TIMEOUT)
    rc.close()  # (the controller is on this machine after all)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client(info, timeout=TIMEOUT).close()  # the controller's own location: no warning


def test_engine_through_tunnel(sshd: Sshd, cluster) -> None:
    ctl, engines = cluster
    with Client(ctl.client_file, timeout=TIMEOUT) as rc:
        before = set(rc.ids)
        eng = _engine(ctl, "--ssh", sshd.server, "--sshkey", str(sshd.key), "--log-level", "DEBUG")
        engines.append(eng)
        new = wait_until(lambda: set(rc.ids) - before, 30, "the tunnelled engine to register")
        (eid,) = new
        assert rc[eid].apply_sync(lambda x: x * 2, 21) == 42
        assert rc[eid].apply_sync(os.getpid) == eng.pid
        # The engine really used the tunnel (its sockets go to local forwards).
        text = (ctl.profile_dir / "log" / f"engine-{eng.pid}.log").read_text(errors="replace")
        assert f"SSH tunnels via {sshd.server} (openssh)" in text
        eng.send_signal(signal.SIGTERM)
        assert eng.wait(15) == 0
        wait_until(lambda: eid not in rc.ids, 15, "the engine to unregister")


def test_engine_uses_the_engine_files_ssh_entry(sshd: Sshd, tmp_path_factory) -> None:
    """ipcontroller's documented ``--enginessh``: the engine file names the SSH server, and an
    engine on another host than the controller tunnels through it with no ``--ssh`` of its own,
    while clients (whose file has no ``ssh``) connect directly."""
    ctl = start_controller(
        tmp_path_factory.mktemp("enginessh"),
        "--enginessh",
        sshd.server,
        "--location",
        "controller-host.invalid",
    )
    eng = None
    try:
        assert ctl.engine["ssh"] == sshd.server and ctl.client["ssh"] == ""
        with pytest.warns(RuntimeWarning, match="controller-host.invalid"):
            rc = Client(ctl.client_file, timeout=TIMEOUT)  # (it is on this machine after all)
        with rc:
            assert rc._tunnels is None
            eng = _engine(ctl, "--sshkey", str(sshd.key), "--log-level", "DEBUG")
            rc.wait_for_engines(1, timeout=30)
            assert rc[:].apply_sync(os.getpid) == [eng.pid]
        text = (ctl.profile_dir / "log" / f"engine-{eng.pid}.log").read_text(errors="replace")
        assert f"SSH tunnels via {sshd.server} (openssh)" in text
    finally:
        if eng is not None:
            stop_popen(eng)
        ctl.stop()


# ----- passwords ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_user(sshd: Sshd) -> Iterator[tuple[str, str]]:
    """A throwaway system user with a known password (created with useradd, then deleted)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("chpasswd") is None:
        pytest.skip("password test needs root with useradd/chpasswd to make a throwaway user")
    name = f"fpssh{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    made = subprocess.run(
        ["useradd", "-M", "-s", shell, name], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed, cannot make a password user: {made.stderr.strip()}")
    try:
        subprocess.run(
            ["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True
        )
        yield name, password
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.mark.parametrize("use_paramiko", [True, False], ids=["paramiko", "openssh"])
def test_password_authentication(sshd: Sshd, cluster, password_user, use_paramiko) -> None:
    ctl, _ = cluster
    name, password = password_user
    server = f"{name}@127.0.0.1:{sshd.port}"
    with Client(
        ctl.client_file,
        sshserver=server,
        password=password,
        paramiko=use_paramiko,
        timeout=TIMEOUT,
    ) as rc:
        rc.wait_for_engines(1, timeout=30)
        assert rc[:].apply_sync(lambda: "pw") == ["pw"] * len(rc.ids)
    with pytest.raises(ssh.SSHAuthenticationError, match=f"{name}@127.0.0.1"):
        Client(
            ctl.client_file,
            sshserver=server,
            password=password + "x",
            paramiko=use_paramiko,
            timeout=TIMEOUT,
        )


# ----- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_wrong_key_is_an_authentication_error(sshd: Sshd, cluster, use_paramiko) -> None:
    ctl, _ = cluster
    t0 = time.monotonic()
    with pytest.raises(ssh.SSHAuthenticationError) as info:
        Client(
            ctl.client_file,
            sshserver=sshd.server,
            sshkey=str(sshd.wrong_key),
            paramiko=use_paramiko,
            timeout=TIMEOUT,
        )
    assert time.monotonic() - t0 < TIMEOUT
    assert info.value.host == sshd.server and sshd.server in str(info.value)
    assert "authentication" in str(info.value)


def test_missing_key_file(sshd: Sshd, cluster, tmp_path) -> None:
    ctl, _ = cluster
    with pytest.raises(ssh.SSHAuthenticationError, match="does not exist"):
        Client(ctl.client_file, sshserver=sshd.server, sshkey=str(tmp_path / "nope"))


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_unknown_host_key(sshd: Sshd, cluster, tmp_path, monkeypatch, use_paramiko) -> None:
    ctl, _ = cluster
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    monkeypatch.setenv(ssh.KNOWN_HOSTS_ENV, str(empty))
    monkeypatch.delenv(ssh.PARAMIKO_POLICY_ENV, raising=False)
    with pytest.raises(ssh.SSHHostKeyError, match="127.0.0.1") as info:
        Client(
            ctl.client_file,
            sshserver=sshd.server,
            sshkey=str(sshd.key),
            paramiko=use_paramiko,
            timeout=TIMEOUT,
        )
    assert info.value.reason == "host key"


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_closed_port_is_unreachable(sshd: Sshd, cluster, use_paramiko) -> None:
    ctl, _ = cluster
    server = f"{sshd.user}@127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ssh.SSHUnreachableError, match=server):
        Client(
            ctl.client_file,
            sshserver=server,
            sshkey=str(sshd.key),
            paramiko=use_paramiko,
            timeout=TIMEOUT,
        )
    assert time.monotonic() - t0 < TIMEOUT


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_silent_server_times_out(sshd: Sshd, cluster, use_paramiko) -> None:
    """A port that accepts TCP but never speaks SSH: unreachable after ``timeout``."""
    ctl, _ = cluster
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    server = f"{sshd.user}@127.0.0.1:{silent.getsockname()[1]}"
    t0 = time.monotonic()
    try:
        with pytest.raises(ssh.SSHUnreachableError, match=server):
            Client(
                ctl.client_file,
                sshserver=server,
                sshkey=str(sshd.key),
                paramiko=use_paramiko,
                timeout=2,
            )
    finally:
        silent.close()
    assert time.monotonic() - t0 < 2 + 2.5


@pytest.mark.parametrize("use_paramiko", [False, True], ids=["openssh", "paramiko"])
def test_dead_tunnel_fails_calls(sshd: Sshd, cluster, use_paramiko) -> None:
    ctl, _ = cluster
    rc = Client(
        ctl.client_file,
        sshserver=sshd.server,
        sshkey=str(sshd.key),
        paramiko=use_paramiko,
        timeout=TIMEOUT,
    )
    try:
        rc.wait_for_engines(1, timeout=30)
        ar = rc[rc.ids[0]].apply_async(time.sleep, 3)
        backend = rc._tunnels._backend
        if use_paramiko:
            threading.Thread(target=backend.transport.close, daemon=True).start()
        else:  # the ssh process itself dies (as when the network drops)
            lport = int(next(iter(rc._tunnels.urls.values())).rsplit(":", 1)[1])
            for pid in _ssh_forwarding(lport):
                os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ssh.SSHTunnelClosedError, match="died"):
            ar.get(timeout=TIMEOUT)
        assert time.monotonic() - t0 < 5
        with pytest.raises(ssh.SSHTunnelClosedError):
            rc[:].apply_sync(os.getpid)
    finally:
        rc.close()


def _ssh_forwarding(lport: int) -> list[int]:
    """Pids of ssh processes forwarding local port ``lport``."""
    needle = f"127.0.0.1:{lport}:".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ssh") and any(needle in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_ssh_process_dies_with_its_owner(sshd: Sshd, cluster) -> None:
    """An owner killed with SIGKILL (no atexit) does not leave its ssh process behind."""
    ctl, _ = cluster
    script = (
        "import sys\n"
        "from ferroparallel import ssh\n"
        "t = ssh.open_tunnels({'r': sys.argv[1]}, sys.argv[2], keyfile=sys.argv[3], "
        "paramiko=False)\n"
        "print(t.urls['r'], flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, ctl.client_url("registration"), sshd.server, str(sshd.key)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=os.environ,
    )
    try:
        line = owner.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert line.startswith("tcp://127.0.0.1:"), line
        lport = int(line.rsplit(":", 1)[1])
        assert _ssh_forwarding(lport), "no ssh process carries the forward"
        owner.kill()
        owner.wait(5)
        wait_until(lambda: not _ssh_forwarding(lport), 5, "the orphaned ssh process to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(5)
