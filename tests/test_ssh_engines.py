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

from cluster_util import (
    assert_sigint_interrupts_engines,
    connected,
    pid_running,
    run_cluster_cli,
    wait_until,
)
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.ssh_engines import (
    SSHEngineSetLauncher,
    env_argv,
    host_counts,
    strip_home,
)
from ferroparallel.error import RemoteError
from test_ssh import Sshd, sshd  # noqa: F401 - the module-scoped sshd fixture

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0

#: A value the remote shell must not expand or split.
TRICKY = """a b 'c' "d" $HOME `id` $(id) \\ ; & | * \n~ !x"""


def proc_environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


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
    cluster_env = f"env IPP_CLUSTER_ID=c IPP_PROFILE_DIR={strip_home(fp_root)}"
    assert cmd[-2:] == ["h1", f"{cluster_env} /opt/py/bin/python -m ferroparallel.engine --file -"]
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
            assert_sigint_interrupts_engines(cluster, rc, SHORT)
        finally:
            rc.close()
    finally:
        r = cli("stop")
    assert r.returncode == 0, r.stderr
    for p in pids:
        wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"engine {p} to exit")
    assert not list((pdir / "security").glob("*.stdin"))


def test_environment_reaches_ssh_engines(
    sshd: Sshd,  # noqa: F811
    fp_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ipyparallel's ``environment`` (``c.SSHLauncher`` < ``c.SSHEngineSetLauncher`` <
    ``start_engines(environment=...)``), the cluster's ``env`` and ``IPP_CLUSTER_ID`` /
    ``IPP_PROFILE_DIR`` reach the remote engines, quoted for the remote shell; this process's
    own environment and the connection info do not, and the local ``ssh`` keeps its own."""
    monkeypatch.setenv("FP_ONLY_HERE", "local")
    cfg = Config()
    cfg.SSHEngineSetLauncher.engines = {sshd.server: 1}
    cfg.SSHLauncher.ssh_args = ["-i", str(sshd.key), "-o", "IdentitiesOnly=yes"]
    cfg.SSHLauncher.environment = {"FP_SET": "general", "FP_GENERAL_ONLY": "x"}
    cfg.SSHEngineSetLauncher.environment = {"FP_SET": "specific", "FP_KW": "config"}
    cluster = Cluster(engines="ssh", config=cfg, env={"FP_CLUSTER_ENV": "c"}, shutdown_atexit=False)
    try:
        cluster.start_controller_sync()
        cluster.start_engines_sync(environment={"FP_KW": TRICKY, "PATH": "/nowhere"})
        rc = cluster.connect_client_sync()
        try:
            rc.wait_for_engines(1, timeout=SHORT)
            env = rc[0].apply_sync(lambda: dict(os.environ))
            pid = rc[0].apply_sync(os.getpid)
        finally:
            rc.close()
        assert env["FP_KW"] == TRICKY and env["PATH"] == "/nowhere"
        assert env["FP_SET"] == "specific" and "FP_GENERAL_ONLY" not in env  # traitlets' rule
        assert env["FP_CLUSTER_ENV"] == "c"
        assert env["IPP_CLUSTER_ID"] == cluster.cluster_id
        assert env["IPP_PROFILE_DIR"] == strip_home(cluster.profile_dir)
        assert "FP_ONLY_HERE" not in env and "IPP_CONNECTION_INFO" not in env
        assert proc_environ(pid)["FP_KW"] == TRICKY  # (the process's, not just os.environ)
        # the local ssh process found ssh on this PATH, and got none of it
        local = proc_environ(cluster.engine_set.processes[0].pid)
        assert local["PATH"] == os.environ["PATH"] and "FP_KW" not in local
    finally:
        cluster.stop_cluster_sync()


def test_env_argv_and_bad_names(fp_root: Path) -> None:
    import shlex

    assert env_argv({}) == []
    argv = env_argv({"A_1": TRICKY, "_b": ""})
    assert shlex.split(shlex.join(argv)) == ["env", f"A_1={TRICKY}", "_b="]
    for bad in ("", "1A", "A=B", "-u", "A B", "é"):
        with pytest.raises(ValueError, match="not an environment variable name"):
            env_argv({bad: "x"})
    with pytest.raises(ValueError, match="NUL"):
        env_argv({"A": "x\0y"})
    es = SSHEngineSetLauncher(fp_root, "cid", "e", 0, engines={"h": 1}, environment={"X": "1"})
    remote = shlex.split(es.ssh_command("h")[-1])
    assert remote[:4] == [
        "env",
        "IPP_CLUSTER_ID=cid",
        f"IPP_PROFILE_DIR={strip_home(fp_root)}",
        "X=1",
    ]
    cfg = Config()
    cfg.SSHEngineSetLauncher.engines = {"h": 1}
    cluster = Cluster(engines="ssh", config=cfg, shutdown_atexit=False)
    try:
        cluster.start_controller_sync()
        with pytest.raises(ValueError, match="'A=B'"):
            cluster.start_engines_sync(environment={"A=B": "1"})
        assert not cluster.engines  # nothing started
    finally:
        cluster.stop_cluster_sync()
