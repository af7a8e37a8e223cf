"""Engines started over SSH (``Cluster(engines="ssh")``) on a real OpenSSH server on loopback
(the ``sshd`` fixture of ``test_ssh``): the connection info travels on the engine's stdin, which
then links the engine to its launcher (signals, stop, a lost connection)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from cluster_util import connected, pid_running, run_cluster_cli, wait_until
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.ssh_engines import SSHEngineSetLauncher, host_counts
from ferroparallel.error import RemoteError
from test_ssh import Sshd, sshd  # noqa: F401 - the module-scoped sshd fixture

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0


@pytest.fixture
def ssh_cluster(sshd: Sshd, fp_root: Path) -> Iterator[tuple[Cluster, Any]]:  # noqa: F811
    cfg = Config()
    cfg.SSHEngineSetLauncher.engines = {sshd.server: 2}
    cfg.SSHEngineSetLauncher.ssh_args = ["-i", str(sshd.key), "-o", "IdentitiesOnly=yes"]
    with connected(Cluster(engines="ssh", config=cfg, shutdown_atexit=False), 2, SHORT) as both:
        yield both


def test_engines_over_ssh(ssh_cluster: tuple[Cluster, Any]) -> None:
    cluster, rc = ssh_cluster
    es = cluster.engine_set
    assert isinstance(es, SSHEngineSetLauncher) and cluster.n == 2
    dv = rc[:]
    pids = dv.apply_sync(os.getpid)
    assert len(set(pids)) == 2
    # the engines run in the ssh server's sessions, not as children of this process
    assert not set(pids) & {p.pid for p in es.processes}
    assert dv.apply_sync(lambda: 6 * 7) == [42, 42]

    # signals go through the link: running code is interrupted, the engines keep serving
    ar = dv.apply_async(time.sleep, 30)
    time.sleep(0.5)
    cluster.signal_engines_sync(signal.SIGINT)
    with pytest.raises(RemoteError, match="KeyboardInterrupt"):
        ar.get(timeout=SHORT)
    assert dv.apply_sync(lambda: "still here") == ["still here"] * 2

    # an engine whose ssh connection is gone stops (and unregisters)
    os.kill(es.processes[0].pid, signal.SIGKILL)
    wait_until(lambda: len(rc.ids) == 1, timeout=SHORT, what="the unlinked engine to leave")
    wait_until(lambda: sum(not pid_running(p) for p in pids) == 1, timeout=SHORT, what="it to exit")

    cluster.stop_cluster_sync()
    for p in pids:
        wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"engine {p} to exit")


def test_host_counts_and_errors(fp_root: Path) -> None:
    assert host_counts({"a": 2, "me@b:2222": (1, ["--log-level", "DEBUG"])}) == [
        ("a", 2, []),
        ("me@b:2222", 1, ["--log-level", "DEBUG"]),
    ]
    with pytest.raises(ValueError, match="count of engines"):
        host_counts({"a": "two"})
    with pytest.raises(ValueError):
        host_counts({"-oProxyCommand=x": 1})  # ssh would read it as an option
    cluster = Cluster(engines="ssh", shutdown_atexit=False)
    try:
        cluster.start_controller_sync()
        with pytest.raises(ValueError, match="SSHEngineSetLauncher.engines"):
            cluster.start_engines_sync()
    finally:
        cluster.stop_cluster_sync()


def test_ipyparallel_config_names(fp_root: Path) -> None:
    cfg = Config()
    cfg.SSHLauncher.ssh_args = ["-v"]
    cfg.SSHEngineSetLauncher.engines = {"me@h1:2200": 2, "h2": (1, ["--log-level", "DEBUG"])}
    cfg.SSHEngineSetLauncher.engine_cmd = ["/opt/py/bin/python", "-m", "ferroparallel.engine"]
    cluster = Cluster(engines="SSHEngineSetLauncher", config=cfg, shutdown_atexit=False)
    opts = cluster._ssh_options({})
    assert opts["ssh_args"] == ["-v"] and opts["engine_cmd"][0] == "/opt/py/bin/python"
    es = SSHEngineSetLauncher(fp_root, "c", "e", 0, cmd=opts.pop("engine_cmd"), **opts)
    assert es.n == 3
    cmd = es.ssh_command("me@h1:2200")
    assert cmd[cmd.index("-p") + 1] == "2200" and cmd[cmd.index("-l") + 1] == "me"
    assert cmd[-2:] == ["h1", "/opt/py/bin/python -m ferroparallel.engine --file -"]
    assert es.ssh_command("h2", ["--log-level", "DEBUG"])[-1].endswith("--log-level DEBUG")


def test_cli_ssh_without_hosts_is_a_clear_error(fp_root: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "ferroparallel", "cluster", "start", "--engines", "ssh"],
        capture_output=True,
        text=True,
        timeout=SHORT,
    )
    assert run.returncode == 1
    assert "failed to start cluster" in run.stderr
    assert "SSHEngineSetLauncher.engines" in run.stderr


def test_cli_daemonize_keeps_ssh_engines(sshd: Sshd, fp_root: Path) -> None:  # noqa: F811
    """``ipcluster start --daemonize`` with SSH engines: the engines outlive the command that
    started them, and ``cluster stop`` (another process) stops them through their links."""
    import subprocess

    pdir = fp_root / "profile_ssh"
    pdir.mkdir(parents=True)
    ssh_args = ["-i", str(sshd.key), "-o", "IdentitiesOnly=yes"]
    (pdir / "ipcluster_config.py").write_text(
        "c.Cluster.engine_launcher_class = 'ssh'\n"
        f"c.SSHEngineSetLauncher.engines = {{{sshd.server!r}: 2}}\n"
        f"c.SSHLauncher.ssh_args = {ssh_args!r}\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cluster_cli(*args, "--profile", "ssh", timeout=SHORT * 2)

    r = cli("start", "--daemonize")
    try:
        assert r.returncode == 0, r.stderr
        assert "2 registered" in r.stdout
        cluster = Cluster.from_file(profile="ssh")
        rc = cluster.connect_client_sync()
        try:
            time.sleep(1.0)  # the engines would be stopping by now without their links
            assert rc.ids == [0, 1]
            pids = rc[:].apply_sync(os.getpid)
            assert len(set(pids)) == 2

            # a signal from this process, which did not start them, reaches them
            ar = rc[:].apply_async(time.sleep, 30)
            time.sleep(0.5)
            cluster.signal_engines_sync(signal.SIGINT)
            with pytest.raises(RemoteError, match="KeyboardInterrupt"):
                ar.get(timeout=SHORT)
            assert rc[:].apply_sync(lambda: "still here") == ["still here"] * 2
        finally:
            rc.close()
    finally:
        r = cli("stop")
    assert r.returncode == 0, r.stderr
    for p in pids:
        wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"engine {p} to exit")
    assert not list((pdir / "security").glob("*.stdin"))
