"""MPI engines: ``Cluster(engines="mpi")`` runs the engines as the ranks of one real
``mpiexec`` job (MPICH or Open MPI, with mpi4py), as ipyparallel's MPI launcher does."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from traitlets.config import Config

from cluster_util import pid_running, wait_until
from ferroparallel import interactive
from ferroparallel.cluster import Cluster
from ferroparallel.cluster.mpi import MPIEngineSetLauncher
from ferroparallel.error import RemoteError

pytest.importorskip("mpi4py")
if shutil.which("mpiexec") is None:
    pytest.skip("mpiexec is not installed (pip install mpich)", allow_module_level=True)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fp_root")]

SHORT = 60.0


def _mpi_env() -> dict[str, str]:
    # Open MPI refuses to run as root unless told; MPICH ignores these
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def test_mpi_engines_share_a_communicator(fp_root: Path) -> None:
    cluster = Cluster(n=2, engines="mpi", env=_mpi_env(), shutdown_atexit=False)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=SHORT)
        assert sorted(rc.ids) == [0, 1]  # engine id = MPI rank
        dv = rc[:]
        ranks = dv.apply_sync(interactive(lambda: (mpi_rank, mpi_size)))  # noqa: F821
        assert ranks == [(0, 2), (1, 2)]
        dv.execute("total = MPI.COMM_WORLD.allreduce(mpi_rank + 1)", block=True)
        assert dv.pull("total", block=True) == [3, 3]
        es = cluster.engine_set
        assert isinstance(es, MPIEngineSetLauncher)
        engine_pids = es.pids
        assert len(engine_pids) == 2
        assert sorted(dv.apply_sync(os.getpid)) == sorted(engine_pids)

        # SIGINT reaches the engines (not mpiexec, which would end the job): the running code
        # is interrupted and both engines keep serving
        ar = dv.apply_async(time.sleep, 30)
        time.sleep(0.5)
        cluster.signal_engines_sync(signal.SIGINT)
        with pytest.raises(Exception) as info:
            ar.get(timeout=SHORT)
        assert "KeyboardInterrupt" in str(info.value)
        assert dv.apply_sync(interactive(lambda: mpi_rank)) == [0, 1]  # noqa: F821

        # a cluster loaded from its file (another process) can stop the job
        again = Cluster.from_file(cluster.cluster_file)
        assert isinstance(again.engine_set, MPIEngineSetLauncher)
        assert sorted(again.engine_set.pids) == sorted(engine_pids)
        mpiexec = es.processes[0]
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    for pid in engine_pids:
        wait_until(lambda p=pid: not pid_running(p), timeout=SHORT, what=f"engine {pid} to exit")
    wait_until(lambda: not mpiexec.running, timeout=SHORT, what="mpiexec to exit")
    assert mpiexec.exit_code == 0  # the job ended normally: every rank finalised MPI


def test_mpi_options_from_ipyparallel_config(fp_root: Path) -> None:
    cfg = Config()
    cfg.MPILauncher.mpi_args = ["-v"]
    cfg.MPIEngineSetLauncher.mpi_args = ["-n", "1"]  # wins
    cfg.MPIEngineSetLauncher.mpi_cmd = ["mpiexec"]
    cluster = Cluster(n=1, engines="MPI", config=cfg, shutdown_atexit=False)
    assert cluster._mpi_options({}) == {"mpi_args": ["-n", "1"], "mpi_cmd": ["mpiexec"]}
    assert cluster._mpi_options({"mpi_args": ["-x"]})["mpi_args"] == ["-x"]


def test_missing_mpiexec_is_a_clear_error(fp_root: Path) -> None:
    cluster = Cluster(n=1, engines="mpi", shutdown_atexit=False)
    try:
        cluster.start_controller_sync()
        with pytest.raises(FileNotFoundError, match="pip install mpich mpi4py"):
            cluster.start_engines_sync(mpi_cmd=["no-such-mpiexec"])
    finally:
        cluster.stop_cluster_sync()


def test_engine_without_mpi4py_fails_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from ferroparallel.engine import mpi as engine_mpi

    real_import = builtins.__import__

    def no_mpi4py(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(RuntimeError, match="pip install mpi4py"):
        engine_mpi.init_mpi()
    _ = RemoteError  # the error type user code sees for remote failures


def test_cli_starts_mpi_engines(fp_root: Path) -> None:
    import subprocess
    import sys

    from ferroparallel import Client

    env = {**os.environ, **_mpi_env()}
    cli = [sys.executable, "-m", "ferroparallel", "cluster"]
    started = subprocess.run(
        [*cli, "start", "-n", "2", "--engines", "MPI", "--cluster-id", "mpicli", "--daemonize"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SHORT,
    )
    try:
        assert started.returncode == 0, started.stderr
        with Client(cluster_id="mpicli", timeout=SHORT) as rc:
            rc.wait_for_engines(2, timeout=SHORT)
            assert rc[:].apply_sync(interactive(lambda: mpi_size)) == [2, 2]  # noqa: F821
    finally:
        stopped = subprocess.run(
            [*cli, "stop", "--cluster-id", "mpicli"], env=env, capture_output=True, timeout=SHORT
        )
    assert stopped.returncode == 0
    bad = subprocess.run(
        [*cli, "start", "--engines", "winhpc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SHORT,
    )
    assert bad.returncode == 2 and "'winhpc' is not available" in bad.stderr


def test_mpi_controller(fp_root: Path) -> None:
    """``Cluster(controller="mpi")``: the controller is the one rank of ``mpiexec -n 1`` (as
    ipyparallel's MPIControllerLauncher); a cluster loaded from its file stops it cleanly."""
    from ferroparallel.cluster.launcher import MPIControllerLauncher

    for name in (
        "MPI",
        "MPIControllerLauncher",
        "ipyparallel.cluster.launcher.MPIControllerLauncher",
    ):
        assert Cluster(controller=name).controller_launcher_class == "mpi", name
    cfg = Config()
    # (an environment variable set through mpiexec: MPICH's -genv, Open MPI's -x)
    env = _mpi_env()
    cfg.MPIControllerLauncher.mpi_args = ["-genv", "FP_TEST_MPI_CONTROLLER", "yes"]
    if shutil.which("mpiexec.hydra") is None:  # (not MPICH)
        cfg.MPIControllerLauncher.mpi_args = ["-x", "FP_TEST_MPI_CONTROLLER=yes"]
    cluster = Cluster(n=2, controller="mpi", config=cfg, env=env, shutdown_atexit=False)
    rc = cluster.start_and_connect_sync()
    try:
        ctl = cluster.controller
        assert isinstance(ctl, MPIControllerLauncher)
        (pid,) = ctl.pids
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"FP_TEST_MPI_CONTROLLER=yes" in environ  # (mpi_args reached mpiexec)
        assert any(e.startswith(b"PMI_RANK=0") or e.startswith(b"OMPI_COMM_WORLD_RANK=0")
                   for e in environ)  # fmt: skip
        assert rc[:].apply_sync(lambda: 6 * 7) == [42, 42]
        again = Cluster.from_file(cluster.cluster_file)
        assert isinstance(again.controller, MPIControllerLauncher)
        assert again.controller.pids == [pid]
        mpiexec = ctl.process
        engines = [p.pid for es in cluster.engines.values() for p in es.processes]
    finally:
        rc.close()
    again.stop_cluster_sync()
    for p in [pid, *engines]:
        wait_until(lambda p=p: not pid_running(p), timeout=SHORT, what=f"process {p} to exit")
    wait_until(lambda: not mpiexec.running, timeout=SHORT, what="mpiexec to exit")
    assert not cluster.client_file.exists() and not cluster.engine_file.exists()
    cluster.controller = None
    cluster.engines.clear()
    with pytest.raises(FileNotFoundError, match="pip install mpich"):
        Cluster(controller="mpi", shutdown_atexit=False).start_controller_sync(mpi_cmd=["nompi"])


def test_cli_starts_mpi_controller(fp_root: Path) -> None:
    import subprocess
    import sys

    from ferroparallel import Client

    env = {**os.environ, **_mpi_env()}
    cli = [sys.executable, "-m", "ferroparallel", "cluster"]
    started = subprocess.run(
        [*cli, "start", "-n", "1", "--controller=MPI", "--cluster-id", "mpictl", "--daemonize"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SHORT,
    )
    try:
        assert started.returncode == 0, started.stderr
        assert "controller under mpiexec" in started.stdout
        with Client(cluster_id="mpictl", timeout=SHORT) as rc:
            rc.wait_for_engines(1, timeout=SHORT)
            assert rc[:].apply_sync(lambda: "ok") == ["ok"]
        cluster = Cluster.from_file(profile_dir=fp_root / "profile_default", cluster_id="mpictl")
        mpiexec = cluster.controller.process
    finally:
        stopped = subprocess.run(
            [*cli, "stop", "--cluster-id", "mpictl"], env=env, capture_output=True, timeout=SHORT
        )
    assert stopped.returncode == 0
    wait_until(lambda: not mpiexec.running, timeout=SHORT, what="mpiexec to exit")
