"""The controller started over SSH (``Cluster(controller="ssh")``, ipyparallel's
``SSHControllerLauncher``) on a real OpenSSH server on loopback (the ``sshd`` fixture of
``test_ssh``): it runs with a remote profile directory of its own, its connection files are
fetched back into the local one, local engines and a client use them, and stopping (from this
process, from another one, or by losing the connection) leaves no process behind."""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from cluster_util import pid_running, run_cluster_cli, wait_until
from ferroparallel import paths
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.launcher import SSHControllerLauncher
from test_ssh import Sshd, sshd  # noqa: F401 - the module-scoped sshd fixture
from test_ssh_engines import TRICKY, proc_environ

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0


def _ssh_config(sshd: Sshd, remote: Path) -> Config:  # noqa: F811
    cfg = Config()
    cfg.SSHControllerLauncher.hostname = "127.0.0.1"
    cfg.SSHControllerLauncher.user = sshd.user
    cfg.SSHControllerLauncher.remote_profile_dir = str(remote)
    cfg.SSHLauncher.ssh_args = ["-p", str(sshd.port), "-i", str(sshd.key)]
    cfg.SSHLauncher.ssh_args += ["-o", "IdentitiesOnly=yes"]
    return cfg


def _controllers_with(marker: str) -> list[int]:
    """Pids of live controller processes whose command line has ``marker``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:2] == [b"-c"]:
            continue  # the link program that runs it
        if b"ferroparallel.controller" in argv and marker.encode() in argv:
            if pid_running(int(name)):
                out.append(int(name))
    return out


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    return tmp_path / "remote_profile"


@pytest.fixture
def ssh_cluster(sshd: Sshd, remote: Path) -> Iterator[Cluster]:  # noqa: F811
    cluster = Cluster(
        n=2, controller="ssh", config=_ssh_config(sshd, remote), shutdown_atexit=False
    )
    try:
        yield cluster
    finally:
        cluster.stop_cluster_sync()


def test_controller_over_ssh(ssh_cluster: Cluster, remote: Path) -> None:
    cluster = ssh_cluster
    rc = cluster.start_and_connect_sync()
    try:
        ctl = cluster.controller
        assert isinstance(ctl, SSHControllerLauncher)
        # the controller runs in the ssh server's session, with the remote profile directory
        (pid,) = wait_until(lambda: _controllers_with(str(remote)), SHORT, "the controller")
        assert pid != ctl.process.pid
        # its connection files were written there and fetched here (private)
        for role in ("client", "engine"):
            theirs = paths.connection_file(remote, role, cluster.cluster_id)
            ours = paths.connection_file(cluster.profile_dir, role, cluster.cluster_id)
            assert paths.load_connection_file(ours) == paths.load_connection_file(theirs)
            assert stat.S_IMODE(ours.stat().st_mode) == 0o600
        # local engines and the client work through the fetched files
        assert sorted(rc.ids) == [0, 1]
        assert rc[:].apply_sync(lambda: 6 * 7) == [42, 42]
        assert rc.load_balanced_view().map_sync(lambda x: x * x, range(8)) == [
            x * x for x in range(8)
        ]
        # another process (a Cluster loaded from the file) can stop it through its link
        again = Cluster.from_file(cluster.cluster_file)
        assert isinstance(again.controller, SSHControllerLauncher) and again.running
        ssh_proc = ctl.process
        engines = [p.pid for es in cluster.engines.values() for p in es.processes]
    finally:
        rc.close()
    again.stop_cluster_sync()
    wait_until(lambda: not pid_running(pid), SHORT, "the remote controller to exit")
    wait_until(lambda: not ssh_proc.running, SHORT, "ssh to exit")
    for p in engines:
        wait_until(lambda p=p: not pid_running(p), SHORT, f"engine {p} to exit")
    assert not cluster.client_file.exists() and not cluster.engine_file.exists()
    assert not paths.connection_file(remote, "client", cluster.cluster_id).exists()
    assert not list(Path(cluster.profile_dir, "security").glob("*.stdin"))
    cluster.controller = None
    cluster.engines.clear()


def test_lost_connection_stops_the_controller(ssh_cluster: Cluster, remote: Path) -> None:
    cluster = ssh_cluster
    cluster.start_controller_sync()
    (pid,) = wait_until(lambda: _controllers_with(str(remote)), SHORT, "the controller")
    assert cluster.controller is not None and cluster.controller.process is not None
    os.kill(cluster.controller.process.pid, signal.SIGKILL)  # the connection is gone
    wait_until(lambda: not pid_running(pid), SHORT, "the unlinked controller to exit")
    assert not cluster.running


def test_names_and_errors(sshd: Sshd, remote: Path, fp_root: Path) -> None:  # noqa: F811
    for name in (
        "ssh",
        "SSH",
        "SSHControllerLauncher",
        "ipyparallel.cluster.launcher.SSHControllerLauncher",
        SSHControllerLauncher,
    ):
        assert Cluster(controller=name).controller_launcher_class == "ssh", name
    cluster = Cluster(controller="ssh", n=0, shutdown_atexit=False)
    try:
        with pytest.raises(ValueError, match=r"SSHControllerLauncher\.hostname"):
            cluster.start_controller_sync()
    finally:
        cluster.stop_cluster_sync()
    # ipyparallel's settings: location, controller_cmd (the command on the host)
    cfg = _ssh_config(sshd, remote)
    del cfg.SSHControllerLauncher["hostname"]
    cfg.SSHControllerLauncher.location = f"{sshd.user}@127.0.0.1"
    cfg.SSHControllerLauncher.controller_cmd = ["no-such-controller-command"]
    cluster = Cluster(controller="ssh", config=cfg, controller_timeout=SHORT)
    try:
        with pytest.raises(RuntimeError, match="no-such-controller-command"):
            cluster.start_controller_sync()
    finally:
        cluster.stop_cluster_sync()
    assert not list(Path(cluster.profile_dir, "security").glob("*.stdin"))


def test_cli_daemonize_with_ssh_controller(sshd: Sshd, fp_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """``ipcluster start --controller=ssh --daemonize`` with the host in the profile's config:
    the controller outlives the command, ``cluster stop`` (another process) stops it."""
    remote = tmp_path / "remote_cli"
    pdir = fp_root / "profile_sshctl"
    pdir.mkdir(parents=True)
    cfg = _ssh_config(sshd, remote)
    lines = [f"c.{s}.{k} = {v!r}\n" for s in cfg for k, v in cfg[s].items()]
    (pdir / "ipcluster_config.py").write_text("".join(lines))

    def cli(*args: str) -> Any:
        return run_cluster_cli(*args, "--profile", "sshctl", timeout=SHORT * 2)

    r = cli("start", "--controller=ssh", "-n", "1", "--daemonize", "--cluster-id", "s")
    try:
        assert r.returncode == 0, r.stderr
        assert "controller on" in r.stdout and "1 registered" in r.stdout
        (pid,) = _controllers_with(str(remote))
        cluster = Cluster.from_file(profile="sshctl", cluster_id="s")
        rc = cluster.connect_client_sync()
        try:
            assert rc[:].apply_sync(lambda: sys.platform) == [sys.platform]
        finally:
            rc.close()
    finally:
        r = cli("stop", "--cluster-id", "s")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not pid_running(pid), SHORT, "the remote controller to exit")
    assert not list((pdir / "security").glob("*.stdin"))
    assert not list((pdir / "security").glob("ipcontroller-*.json"))


def test_environment_reaches_the_remote_controller(
    sshd: Sshd,  # noqa: F811
    remote: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``c.SSHLauncher.environment`` < ``c.SSHControllerLauncher.environment`` <
    ``start_controller(environment=...)``, the cluster's ``env`` and ``IPP_CLUSTER_ID`` /
    ``IPP_PROFILE_DIR`` (the remote one) are in the remote controller's environment, quoted
    for the remote shell; this process's own environment is not, and the local ``ssh`` keeps
    its own."""
    monkeypatch.setenv("FP_ONLY_HERE", "local")
    cfg = _ssh_config(sshd, remote)
    cfg.SSHLauncher.environment = {"FP_SET": "general", "FP_GENERAL_ONLY": "x"}
    cfg.SSHControllerLauncher.environment = {"FP_SET": "specific", "FP_KW": "config"}
    cluster = Cluster(
        controller="ssh", n=0, config=cfg, env={"FP_CLUSTER_ENV": "c"}, shutdown_atexit=False
    )
    try:
        cluster.start_controller_sync(environment={"FP_KW": TRICKY, "PATH": os.defpath})
        (pid,) = wait_until(lambda: _controllers_with(str(remote)), SHORT, "the controller")
        env = proc_environ(pid)
        assert env["FP_KW"] == TRICKY and env["PATH"] == os.defpath
        assert env["FP_SET"] == "specific" and "FP_GENERAL_ONLY" not in env
        assert env["FP_CLUSTER_ENV"] == "c"
        assert env["IPP_CLUSTER_ID"] == cluster.cluster_id
        assert env["IPP_PROFILE_DIR"] == str(remote)
        assert "FP_ONLY_HERE" not in env
        assert cluster.controller is not None and cluster.controller.process is not None
        local = proc_environ(cluster.controller.process.pid)
        assert local["PATH"] == os.environ["PATH"] and "FP_KW" not in local
    finally:
        cluster.stop_cluster_sync()
    wait_until(lambda: not pid_running(pid), SHORT, "the remote controller to exit")
