"""Engines started through one SSH connection per host (``Cluster(engines="sshproxy")``) on a
real OpenSSH server on loopback (the ``sshd`` fixture of ``test_ssh``): the connection files
travel on the session's stdin, the remote ``cluster engines -n N`` starts the engines, and
that stdin then links them to the launcher (signals, stop, a lost connection)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

import ferroparallel
from cluster_util import assert_sigint_interrupts_engines, pid_running, run_cluster_cli, wait_until
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.cluster import _launcher_name
from ferroparallel.cluster.ssh_proxy import SSHProxyEngineSetLauncher
from ferroparallel.error import RemoteError
from test_ssh import Sshd, sshd  # noqa: F401 - the module-scoped sshd fixture

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0

#: This checkout's package directory, for the remote ``python -m ferroparallel.cluster``.
PYTHONPATH = str(Path(ferroparallel.__file__).resolve().parent.parent)


def proxy_config(sshd: Sshd, remote: Path | None = None) -> Config:  # noqa: F811
    cfg = Config()
    cfg.SSHProxyEngineSetLauncher.hostname = f"127.0.0.1:{sshd.port}"
    cfg.SSHProxyEngineSetLauncher.user = sshd.user
    cfg.SSHProxyEngineSetLauncher.ssh_args = ["-i", str(sshd.key), "-o", "IdentitiesOnly=yes"]
    cfg.SSHProxyEngineSetLauncher.environment = {"PYTHONPATH": PYTHONPATH}
    if remote is not None:
        cfg.SSHProxyEngineSetLauncher.remote_profile_dir = str(remote)
    return cfg


def engine_pids(rc: Any) -> list[int]:
    return rc[:].apply_sync(os.getpid)


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def remote_files(remote: Path) -> list[Path]:
    return sorted(p for p in remote.rglob("*") if p.is_file())


def test_sshproxy_engines(sshd: Sshd, fp_root: Path) -> None:  # noqa: F811
    remote = fp_root / "remote_profile"
    cluster = Cluster(engines="sshproxy", n=3, config=proxy_config(sshd, remote))
    cluster.shutdown_atexit = False
    try:
        rc = cluster.start_and_connect_sync()
        try:
            rc.wait_for_engines(3, timeout=SHORT)
            es = cluster.engine_set
            assert isinstance(es, SSHProxyEngineSetLauncher)
            assert (es.n, es.running_count, len(es.processes), es.failure()) == (3, 3, 1, None)
            assert cluster.n == 3 and rc.ids == [0, 1, 2]
            # the connection files reached the remote profile, 0600, never a command line
            sec = remote / "security"
            for name in (cluster.client_file.name, cluster.engine_file.name):
                assert (sec / name).stat().st_mode & 0o777 == 0o600
                assert json.loads((sec / name).read_text()) == json.loads(
                    (Path(cluster.profile_dir) / "security" / name).read_text()
                )
            key = json.loads(cluster.engine_file.read_text())["key"]
            ssh = es.processes[0]
            assert (
                key not in " ".join(ssh.cmd)
                and key not in Path(f"/proc/{ssh.pid}/cmdline").read_text()
            )
            assert not (sec / f"cluster-{cluster.cluster_id}.json").exists()  # no cluster file

            pids = engine_pids(rc)
            assert len(set(pids)) == 3 and not set(pids) & {ssh.pid}
            # run by the remote `cluster engines` (one process for the set) in the ssh session
            (cmd_pid,) = {parent(p) for p in pids}
            argv = Path(f"/proc/{cmd_pid}/cmdline").read_bytes().split(b"\0")
            assert b"engines" in argv and b"--stdin-link" in argv
            assert proc_environ(pids[0])["IPP_PROFILE_DIR"] == str(remote)
            assert rc.load_balanced_view().map_sync(lambda x: x * x, range(12)) == [
                x * x for x in range(12)
            ]

            # signals reach the engines (not the remote command): running code is interrupted
            ar = rc[:].apply_async(time.sleep, 30)
            time.sleep(0.5)
            cluster.signal_engines_sync(signal.SIGINT)
            with pytest.raises(RemoteError, match="KeyboardInterrupt"):
                ar.get(timeout=SHORT)
            assert rc[:].apply_sync(lambda: "still here") == ["still here"] * 3
            assert pid_running(cmd_pid)
        finally:
            rc.close()
        cluster.stop_cluster_sync()
        for p in [*pids, cmd_pid, ssh.pid]:
            wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"{p} to exit")
        assert remote_files(remote) == []  # connection files and engine logs gone
        assert not list((Path(cluster.profile_dir) / "security").iterdir())
    finally:
        cluster.stop_cluster_sync()


def test_same_profile_on_the_same_host(sshd: Sshd, fp_root: Path) -> None:  # noqa: F811
    """The default remote profile directory is the local one: on the controller's own host the
    files sent are already there, and the proxy leaves them (and the cluster file) alone."""
    cluster = Cluster(engines="sshproxy", config=proxy_config(sshd), shutdown_atexit=False)
    try:
        cluster.start_controller_sync()
        rc = cluster.connect_client_sync()
        try:
            for _ in range(2):
                esid = cluster.start_engines_sync(2)
                rc.wait_for_engines(2, timeout=SHORT)
                assert len(engine_pids(rc)) == 2
                before = json.loads(Path(cluster.cluster_file).read_text())
                assert list(before["engines"]) == [esid]
                cluster.stop_engines_sync()
                wait_until(lambda: not rc.ids, timeout=SHORT, what="the engines to unregister")
                assert cluster.client_file.is_file() and cluster.engine_file.is_file()
                assert json.loads(Path(cluster.cluster_file).read_text())["engines"] == {}
        finally:
            rc.close()
    finally:
        cluster.stop_cluster_sync()
    assert not list((Path(cluster.profile_dir) / "security").iterdir())


def test_lost_connection_stops_remote_engines(sshd: Sshd, fp_root: Path) -> None:  # noqa: F811
    remote = fp_root / "remote_profile"
    cluster = Cluster(engines="sshproxy", n=2, config=proxy_config(sshd, remote))
    cluster.shutdown_atexit = False
    try:
        rc = cluster.start_and_connect_sync()
        try:
            rc.wait_for_engines(2, timeout=SHORT)
            pids = engine_pids(rc)
            es = cluster.engine_set
            os.kill(es.processes[0].pid, signal.SIGKILL)
            wait_until(lambda: not rc.ids, timeout=SHORT, what="the engines to unregister")
        finally:
            rc.close()
        for p in pids:
            wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"engine {p} to exit")
        wait_until(lambda: remote_files(remote) == [], timeout=SHORT, what="the remote files to go")
        assert es.running_count == 0 and "ended with status -9" in (es.failure() or "")
    finally:
        cluster.stop_cluster_sync()


def test_cli_daemonize_and_stop(sshd: Sshd, fp_root: Path) -> None:  # noqa: F811
    """``cluster start --engines=sshproxy --daemonize``: the engines outlive the command, and
    ``cluster stop`` (another process) stops them through the link."""
    pdir = fp_root / "profile_proxy"
    pdir.mkdir(parents=True)
    remote = fp_root / "remote_profile"
    ssh_args = ["-i", str(sshd.key), "-o", "IdentitiesOnly=yes", "-p", str(sshd.port)]
    (pdir / "ipcluster_config.py").write_text(
        f"c.SSHProxyEngineSetLauncher.location = {f'{sshd.user}@127.0.0.1'!r}\n"
        f"c.SSHLauncher.ssh_args = {ssh_args!r}\n"
        f"c.SSHProxyEngineSetLauncher.remote_profile_dir = {str(remote)!r}\n"
        f"c.SSHProxyEngineSetLauncher.environment = {{'PYTHONPATH': {PYTHONPATH!r}}}\n"
        "c.SSHProxyEngineSetLauncher.n = 2\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cluster_cli(*args, "--profile", "proxy", timeout=SHORT * 2)

    r = cli("start", "--engines=sshproxy", "--daemonize")
    pids: list[int] = []
    try:
        assert r.returncode == 0, r.stderr
        assert "2 registered" in r.stdout
        listed = cli("list")
        assert "SSHProxy" in listed.stdout, listed.stdout
        cluster = Cluster.from_file(profile="proxy")
        es = cluster.engine_set
        assert isinstance(es, SSHProxyEngineSetLauncher)
        assert (es.n, es.running_count, es.failure()) == (2, 2, None)
        rc = cluster.connect_client_sync()
        try:
            time.sleep(1.0)  # the engines would be stopping by now without their link
            assert rc.ids == [0, 1]
            pids = engine_pids(rc)
            # a signal from this process, which did not start them, reaches them
            assert_sigint_interrupts_engines(cluster, rc, SHORT)
        finally:
            rc.close()
    finally:
        r = cli("stop")
    assert r.returncode == 0, r.stderr
    for p in pids:
        wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"engine {p} to exit")
    wait_until(lambda: remote_files(remote) == [], timeout=SHORT, what="the remote files to go")
    assert not list((pdir / "security").iterdir())


def test_names_and_settings(fp_root: Path) -> None:
    for name in (
        "sshproxy",
        "SSHProxy",
        "SSHProxyEngineSetLauncher",
        "ipyparallel.cluster.launcher.SSHProxyEngineSetLauncher",
        SSHProxyEngineSetLauncher,
    ):
        assert _launcher_name(name) == "sshproxy"
        assert Cluster(engines=name, shutdown_atexit=False).engine_launcher_class == "sshproxy"
    with pytest.raises(NotImplementedError, match="'sshproxy' is not available"):
        Cluster(controller="sshproxy", shutdown_atexit=False)

    cfg = Config()
    cfg.SSHLauncher.ssh_args = ["-v"]
    cfg.SSHProxyEngineSetLauncher.hostname = "h1.invalid:2200"
    cfg.SSHProxyEngineSetLauncher.user = "me"
    cfg.SSHProxyEngineSetLauncher.remote_profile_dir = "/srv/profile_x"
    cfg.SSHProxyEngineSetLauncher.ipcluster_cmd = ["/opt/py/bin/python", "-m", "ferroparallel"]
    cfg.SSHProxyEngineSetLauncher.ipcluster_args = ["--timeout", "20"]
    cfg.SSHProxyEngineSetLauncher.n = 5
    cluster = Cluster(engines="sshproxy", config=cfg, shutdown_atexit=False)
    es = None
    try:
        cluster.start_controller_sync()
        try:
            cluster.start_engines_sync()  # (no sshd there: the set starts, then fails)
            es = cluster.engine_set
        finally:
            cluster.stop_engines_sync()
        assert isinstance(es, SSHProxyEngineSetLauncher) and es.n == 5 and cluster.n == 5
        cmd = es.ssh_command()
        assert cmd[cmd.index("-p") + 1] == "2200" and cmd[cmd.index("-l") + 1] == "me"
        assert "-v" in cmd and cmd[-2] == "h1.invalid"
        remote = shlex.split(cmd[-1])
        assert remote[:3] == ["env", f"IPP_CLUSTER_ID={cluster.cluster_id}",
                              "IPP_PROFILE_DIR=/srv/profile_x"]  # fmt: skip
        assert remote[-13:] == [
            "/opt/py/bin/python", "-m", "ferroparallel", "engines", "-n", "5",
            "--profile-dir", "/srv/profile_x", "--cluster-id", cluster.cluster_id,
            "--stdin-link", "--timeout", "20",
        ]  # fmt: skip
        key = json.loads(cluster.engine_file.read_text())["key"]
        assert key not in " ".join(cmd) and key in es.files_line().decode()
        assert list(json.loads(es.files_line())["files"]) == [
            f"/srv/profile_x/security/{cluster.client_file.name}",
            f"/srv/profile_x/security/{cluster.engine_file.name}",
        ]
        # the state file round trip (cluster stop from another process)
        again = SSHProxyEngineSetLauncher.from_dict(es.to_dict(), fp_root, "c", "e")
        assert again.ssh_command()[:-1] == cmd[:-1] and again.n == 5
        assert again.remote_cmd()[-3:] == ["--stdin-link", "--timeout", "20"]
    finally:
        cluster.stop_cluster_sync()

    bare = Cluster(engines="sshproxy", n=1, shutdown_atexit=False)
    try:
        bare.start_controller_sync()
        with pytest.raises(ValueError, match="SSHProxyEngineSetLauncher.hostname"):
            bare.start_engines_sync()
        assert not bare.engines
    finally:
        bare.stop_cluster_sync()
