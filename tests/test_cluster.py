"""The Cluster API and ``ferroparallel cluster``: real controller and engine processes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferroparallel import _core, paths
from ferroparallel.cluster import Cluster
from ferroparallel.cluster._hub import registered_engines
from ferroparallel.cluster.launchers import pid_alive
from ferroparallel.error import ConnectionFileError

pytestmark = pytest.mark.timeout(90)

HAVE_CONTROLLER = hasattr(_core, "Controller")


def _have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # the parent package is missing
        return False


HAVE_ENGINE = _have_module("ferroparallel.engine.app")

needs_controller = pytest.mark.skipif(
    not HAVE_CONTROLLER, reason="ferroparallel._core has no Controller yet"
)
needs_engine = pytest.mark.skipif(
    not (HAVE_CONTROLLER and HAVE_ENGINE), reason="needs the Rust controller and the engine"
)


def _client_available() -> bool:
    try:
        from ferroparallel import Client  # noqa: F401
    except ImportError:
        return False
    return True


needs_client = pytest.mark.skipif(
    not (HAVE_CONTROLLER and HAVE_ENGINE and _client_available()),
    reason="needs the controller, the engine and the Client",
)


@pytest.fixture(autouse=True)
def fp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private profile root; every process recorded in it is killed after the test."""
    root = tmp_path / "fproot"
    monkeypatch.setenv("FERROPARALLEL_DIR", str(root))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # (its profiles' configs apply)
    yield root
    for f in root.glob("profile_*/security/cluster-*.json"):
        with pytest.MonkeyPatch.context():
            try:
                c = Cluster.from_file(f)
            except Exception:
                continue
            for p in c._processes():
                p.send_signal(signal.SIGKILL)


@pytest.fixture
def sleeper(tmp_path: Path) -> list[str]:
    """An engine command that only sleeps until SIGTERM (no registration)."""
    f = tmp_path / "sleeper.py"
    f.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    return [sys.executable, str(f)]


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def wait_registered(cluster: Cluster, n: int, timeout: float = 30.0) -> dict[int, str]:
    info = paths.load_connection_file(cluster.client_file, "client")

    def check() -> dict[int, str] | None:
        engines = registered_engines(info, timeout=2.0)
        return engines if engines is not None and len(engines) == n else None

    return wait_until(check, timeout, f"{n} registered engines")


def all_pids(cluster: Cluster) -> list[int]:
    return [p.pid for p in cluster._processes()]


def assert_gone(pids: list[int], timeout: float = 15.0) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout, f"pids {pids} to exit")


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferroparallel", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- without processes ---------------------------------------------------------------------------


def test_defaults_and_ids(fp_root: Path) -> None:
    c = Cluster(n=3)
    assert c.profile_dir == str(fp_root / "profile_default")
    assert c.cluster_id and c.cluster_id.split("-")[0].isdigit()
    assert Cluster(cluster_id="").cluster_id == ""
    assert Cluster(profile="x").profile_dir == str(fp_root / "profile_x")
    sec = fp_root / "profile_default" / "security"
    assert c.cluster_file == str(sec / f"cluster-{c.cluster_id}.json")  # a str, as ipyparallel
    assert not c.running and c.engine_set is None
    assert Cluster(engines="pbs").engine_launcher_class == "pbs"  # (tests in test_batch.py)
    with pytest.raises(ValueError, match="negative"):
        Cluster(n=-1)
    with pytest.raises(NotImplementedError):
        Cluster(engines="winhpc")
    with pytest.raises(NotImplementedError):
        Cluster(controller="sshproxy")  # (ipyparallel's is for engines only)
    with pytest.raises(TypeError):
        Cluster(controller_args="--ping 100")  # type: ignore[arg-type]


def test_string_trait_defaults_are_ipyparallels(fp_root: Path) -> None:
    """``profile``, ``controller_ip`` and ``controller_location`` default to ``""`` as in
    ipyparallel's Cluster (``""``: not given), never ``None``."""
    theirs = pytest.importorskip("ipyparallel").Cluster()
    ours = Cluster()
    for name in ("profile", "controller_ip", "controller_location", "n"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    argv = ours._controller_argv()
    assert "--ip" not in argv and "--location" not in argv
    old = Cluster(profile=None, controller_ip=None, controller_location=None)  # (older files)
    assert (old.profile, old.controller_ip, old.controller_location) == ("", "", "")
    assert old.profile_dir == str(fp_root / "profile_default")
    assert Cluster(controller_ip="127.0.0.1")._controller_argv()[-2:] == ["--ip", "127.0.0.1"]


def test_cluster_is_configurable(fp_root: Path) -> None:
    """As ipyparallel's Cluster: a traitlets Configurable (config, traits, observers)."""
    from traitlets.config import Config

    cfg = Config()
    cfg.Cluster.n = 5
    cfg.Cluster.engine_timeout = 7
    cfg.Cluster.controller_args = ["--ping", "500"]
    c = Cluster(config=cfg, engine_timeout=9)
    assert (c.n, c.engine_timeout, c.controller_args) == (5, 9.0, ["--ping", "500"])
    assert c._controller_argv()[-2:] == ["--ping", "500"]
    names = set(c.trait_names())
    assert {"n", "profile_dir", "cluster_id", "controller", "engines", "log", "config"} <= names
    assert {"engine_launcher_class", "controller_launcher_class"} <= names
    assert c.traits(config=True)["n"].help
    seen: list[object] = []
    c.observe(lambda change: seen.append(change["new"]), names="n")
    c.n = 3
    assert seen == [3]
    assert c.log.name == "ferroparallel.cluster"
    c2 = Cluster(engines="LocalEngineSetLauncher", controller="local")
    assert (c2.engine_launcher_class, c2.controller_launcher_class) == ("local", "local")
    with pytest.raises(TypeError, match="only one of"):
        Cluster(engines="local", engine_launcher_class="local")
    with pytest.raises(NotImplementedError, match="'winhpc' is not available.*'slurm'"):
        Cluster(engine_launcher_class="winhpc")
    # the same check for an attribute set later and for a config file
    with pytest.raises(NotImplementedError, match="'WinHPCControllerLauncher' is not available"):
        c2.controller_launcher_class = "WinHPCControllerLauncher"
    mpi = Config()
    mpi.Cluster.engine_launcher_class = "ipyparallel.cluster.launcher.MPIEngineSetLauncher"
    assert Cluster(config=mpi).engine_launcher_class == "mpi"
    pbs = Config()
    pbs.Cluster.engine_launcher_class = "ipyparallel.cluster.launcher.PBSEngineSetLauncher"
    assert Cluster(config=pbs).engine_launcher_class == "pbs"
    pbs.Cluster.engine_launcher_class = "ipyparallel.cluster.launcher.WindowsHPCEngineSetLauncher"
    with pytest.raises(NotImplementedError, match="WindowsHPCEngineSetLauncher"):
        Cluster(config=pbs)

    class LocalEngineSetLauncher:  # a class is taken by its name, as ipyparallel takes classes
        pass

    assert Cluster(engines=LocalEngineSetLauncher).engine_launcher_class == "local"


def test_sync_twins_exist() -> None:
    for name in (
        "start_controller",
        "start_engines",
        "start_cluster",
        "start_and_connect",
        "connect_client",
        "stop_engines",
        "stop_cluster",
        "signal_engines",
        "restart_engines",
    ):
        assert asyncio.iscoroutinefunction(getattr(Cluster, name)), name
        assert callable(getattr(Cluster, f"{name}_sync")), name


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cluster-nope.json"):
        Cluster.from_file(profile_dir=tmp_path, cluster_id="nope")
    bad = tmp_path / "security" / "cluster-bad.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        Cluster.from_file(bad)


def test_start_engines_without_controller_names_file() -> None:
    c = Cluster(n=1, cluster_id="noctl")
    with pytest.raises(ConnectionFileError, match="ipcontroller-noctl-engine.json") as e:
        c.start_engines_sync()
    assert "start_cluster() or start_controller()" in str(e.value)


# -- the API -------------------------------------------------------------------------------------


@needs_engine
def test_api_start_stop_two_engines(clusters: Callable[..., Cluster], fp_root: Path) -> None:
    c = clusters(n=2, profile="api")
    t0 = time.monotonic()
    assert c.start_cluster_sync() is c
    engines = wait_registered(c, 2)
    elapsed = time.monotonic() - t0
    assert sorted(engines) == [0, 1]
    assert elapsed < 30
    assert c.running and c.engine_set is not None and len(c.engine_set.processes) == 2
    pids = all_pids(c)
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    # The state file lets another process find everything.
    state = json.loads(Path(c.cluster_file).read_text())
    assert state["cluster"]["cluster_id"] == c.cluster_id
    assert state["controller"]["process"]["pid"] == c.controller.process.pid  # type: ignore[union-attr]
    assert c.client_file.exists() and c.engine_file.exists()
    logs = [Path(p.log_file or "") for p in c._processes()]
    assert len(logs) == 3 and all(f.is_file() for f in logs)
    c.stop_cluster_sync()
    assert_gone(pids)
    assert not Path(c.cluster_file).exists()
    assert not c.client_file.exists() and not c.engine_file.exists()
    assert not c.running
    # stopped cleanly: their logs go too, as ipyparallel's (a profile's log/ does not grow)
    assert not [f for f in logs if f.exists()]


@needs_engine
def test_empty_controller_ip_is_the_default(clusters: Callable[..., Cluster]) -> None:
    """``controller_ip=""`` / ``controller_location=""`` (ipyparallel's defaults) start the
    controller on its own address, as when they are not given."""
    c = clusters(n=1, profile="", controller_ip="", controller_location="")
    c.start_cluster_sync()
    assert sorted(wait_registered(c, 1)) == [0]
    again = Cluster.from_file(c.cluster_file)
    assert (again.profile, again.controller_ip, again.profile_dir) == ("", "", c.profile_dir)
    pids = all_pids(c)
    c.stop_cluster_sync()
    assert_gone(pids)


@needs_engine
def test_async_api_and_sync_inside_a_loop(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=1)

    async def run() -> list[int]:
        await c.start_cluster()
        await asyncio.to_thread(wait_registered, c, 1)
        pids = all_pids(c)
        # A *_sync call from inside a running loop runs on a helper thread.
        esid = c.start_engines_sync(1)
        await asyncio.to_thread(wait_registered, c, 2)
        assert esid in c.engines and len(c.engines) == 2
        await c.stop_engines(esid)
        await c.stop_cluster()
        return pids + all_pids(c)

    pids = asyncio.run(run())
    assert_gone(pids)


@needs_engine
def test_launcher_args_of_the_config(clusters: Callable[..., Cluster]) -> None:
    """ipyparallel's ``c.LocalControllerLauncher.controller_args`` and
    ``c.EngineLauncher.engine_args`` (the most specific class wins) come before the
    cluster's own arguments."""
    from traitlets.config import Config

    cfg = Config()
    cfg.LocalControllerLauncher.controller_args = ["--ping=2000"]
    cfg.EngineLauncher.engine_args = ["--log-level=DEBUG"]
    cfg.LocalEngineSetLauncher.engine_args = ["--log-level=INFO"]
    c = clusters(n=1, config=cfg, controller_args=["--hwm=2"])
    c.start_cluster_sync()
    assert c.controller is not None and c.engine_set is not None
    assert c.controller.args == ["--ping=2000", "--hwm=2"]
    assert c.engine_set.args == ["--log-level=INFO"]
    wait_registered(c, 1)
    slurm = Config()
    slurm.EngineLauncher.engine_args = ["--log-level=DEBUG"]
    slurm.SlurmEngineSetLauncher.engine_args = ["--log-level=WARNING"]
    assert Cluster(engines="slurm", config=slurm)._engine_argv() == ["--log-level=WARNING"]
    bad = Config()
    bad.ControllerLauncher.controller_args = "--ping=2000"
    with pytest.raises(TypeError, match="ControllerLauncher.controller_args must be a list"):
        clusters(n=0, config=bad).start_controller_sync()


@needs_engine
def test_start_engines_takes_ipyparallels_launcher_keywords(
    clusters: Callable[..., Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    """``start_engines(engine_args=..., environment=..., engine_cmd=...)`` and
    ``start_controller(controller_args=..., environment=...)`` set ipyparallel's launcher
    attributes; an unknown keyword is ignored (logged), as ipyparallel's launchers do, instead
    of failing the call."""
    c = clusters(n=0, engine_args=["--log-level=DEBUG"], controller_args=["--hwm=2"])
    with caplog.at_level("WARNING", logger="ferroparallel.cluster"):
        c.start_controller_sync(
            controller_args=["--ping=2000"], environment={"FP_TEST_MARK": "ctl"}, unknown_one=1
        )
    assert "ignoring unknown keyword arguments ['unknown_one']" in caplog.text
    assert c.controller is not None and c.controller.args == ["--ping=2000", "--hwm=2"]
    assert c.controller.env["FP_TEST_MARK"] == "ctl"
    with caplog.at_level("WARNING", logger="ferroparallel.cluster"):
        esid = c.start_engines_sync(
            1,
            engine_args=["--log-level=INFO"],
            environment={"FP_TEST_MARK": "yes"},
            engine_cmd=[sys.executable, "-m", "ferroparallel.engine"],
            not_a_launcher_setting=1,
        )
    assert "ignoring unknown keyword arguments ['not_a_launcher_setting']" in caplog.text
    launcher = c.engines[esid]
    assert launcher.args == ["--log-level=INFO"]
    assert launcher.env["FP_TEST_MARK"] == "yes" and "PATH" in launcher.env
    assert launcher.cmd == [sys.executable, "-m", "ferroparallel.engine"]
    assert sorted(wait_registered(c, 1)) == [0]
    with pytest.raises(TypeError, match="engine_args must be a list"):
        c.start_engines_sync(1, engine_args="--log-level=INFO")
    c.stop_cluster_sync()


@needs_engine
def test_configured_launcher_environment(clusters: Callable[..., Cluster]) -> None:
    """ipyparallel's ``c.<Launcher>.environment`` (the most specific section wins, as with
    traitlets), with ``environment=`` of start_engines / start_controller on top."""
    from traitlets.config import Config

    cfg = Config()
    cfg.BaseLauncher.environment = {"FP_WHICH": "base", "FP_BASE_ONLY": "1"}
    cfg.LocalControllerLauncher.environment = {"FP_WHICH": "controller"}
    cfg.LocalEngineSetLauncher.environment = {"FP_WHICH": "engines", "FP_KW": "config"}
    c = clusters(n=0, config=cfg)
    c.start_controller_sync()
    assert c.controller is not None and c.controller.env["FP_WHICH"] == "controller"
    assert "FP_BASE_ONLY" not in c.controller.env
    esid = c.start_engines_sync(1, environment={"FP_KW": "keyword"})
    env = c.engines[esid].engine_env()
    assert env["FP_WHICH"] == "engines" and env["FP_KW"] == "keyword" and "PATH" in env
    with pytest.raises(TypeError, match="environment must be a dict"):
        c.start_engines_sync(1, environment=["FP_KW=x"])
    bad = Config()
    bad.EngineLauncher.environment = "FP_KW=x"
    other = clusters(n=0, config=bad)
    other.start_controller_sync()
    with pytest.raises(TypeError, match=r"c\.EngineLauncher\.environment must be a dict"):
        other.start_engines_sync(1)


@needs_engine
def test_from_file_signal_and_restart(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=2, cluster_id="sig")
    c.start_cluster_sync()
    wait_registered(c, 2)
    other = Cluster.from_file(profile_dir=c.profile_dir, cluster_id="sig")
    assert other.running
    assert sorted(all_pids(other)) == sorted(all_pids(c))
    old = list(c.engine_set.pids)  # type: ignore[union-attr]
    c.restart_engines_sync()
    new = list(c.engine_set.pids)  # type: ignore[union-attr]
    assert len(new) == 2 and not set(new) & set(old)
    assert_gone(old)
    wait_registered(c, 2)
    c.signal_engines_sync("SIGKILL")
    assert_gone(new)
    # The loaded copy can stop what the first one started.
    other = Cluster.from_file(profile_dir=c.profile_dir, cluster_id="sig")
    ctl = other.controller.process.pid  # type: ignore[union-attr]
    other.stop_cluster_sync()
    assert_gone([ctl])
    assert not Path(c.cluster_file).exists()


@needs_controller
def test_cluster_manager_finds_and_drops_clusters(
    clusters: Callable[..., Cluster], tmp_path: Path
) -> None:
    import ferroparallel as ipp

    c = clusters(n=0, cluster_id="managed")
    c.start_cluster_sync()
    manager = ipp.ClusterManager()
    found = manager.load_clusters()
    assert list(found) == ["default:managed"]  # "<profile>:<cluster_id>"
    loaded = manager.get_cluster("default:managed")
    assert loaded.cluster_id == "managed" and loaded.running
    assert manager.load_clusters(profile="default") is manager.clusters  # nothing twice
    assert list(manager.clusters) == ["default:managed"]
    key, new = manager.new_cluster(profile="other", cluster_id="later")
    assert key == "other:later" and not new.running
    with pytest.raises(KeyError, match="already exists"):
        manager.new_cluster(profile="other", cluster_id="later")
    manager.remove_cluster(key)
    with pytest.raises(KeyError):
        manager.get_cluster(key)
    elsewhere = tmp_path / "elsewhere"
    assert list(ipp.ClusterManager().load_clusters(profile_dir=elsewhere)) == []
    assert list(
        ipp.ClusterManager().load_clusters(profile_dirs=[elsewhere], init_default_clusters=True)
    ) == [f"{elsewhere}:"]
    c.stop_cluster_sync()
    assert manager.load_clusters() == {}  # stopped: dropped, and its file is gone


@needs_controller
def test_controller_failure_reports_log(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=1, controller_args=["--scheme", "fastest"])
    with pytest.raises(RuntimeError, match="fastest") as exc:
        c.start_controller_sync()
    assert "ipcontroller" in str(exc.value)  # names the log file
    assert not c.running


def test_get_output_of_failed_processes(clusters: Callable[..., Cluster]) -> None:
    """As ipyparallel's launchers' ``get_output(remove=False)``: what the processes wrote, per
    engine under an ``Output for engine <i>`` line; ``remove=True`` deletes the log files but
    the text stays available."""
    c = clusters(n=1, controller_args=["--scheme", "fastest"])
    with pytest.raises(RuntimeError):
        c.start_controller_sync()
    assert c.controller is not None and "fastest" in c.controller.get_output()
    log_file = Path(c.controller.process.log_file or "")  # type: ignore[union-attr]
    assert "fastest" in c.controller.get_output(remove=True)
    assert not log_file.exists() and "fastest" in c.controller.get_output()

    c = clusters(n=2, engine_args=["--no-such-engine-flag"], profile="output")
    c.start_controller_sync()
    es = c.engines[c.start_engines_sync()]
    wait_until(lambda: not es.running, what="the engines to fail")
    out = es.get_output()
    assert out.startswith("Output for engine 0\n  ") and "\nOutput for engine 1\n  " in out
    assert out.count("no-such-engine-flag") == 2
    logs = [Path(p.log_file or "") for p in es.processes]
    assert all(f.exists() for f in logs)
    assert es.get_output(remove=True) == out
    assert not any(f.exists() for f in logs) and es.get_output() == out


@needs_controller
def test_same_cluster_id_refused_while_running(
    clusters: Callable[..., Cluster], sleeper: list[str]
) -> None:
    c = clusters(n=1, cluster_id="dup", engine_cmd=sleeper)
    c.start_cluster_sync()
    with pytest.raises(RuntimeError, match="already running"):
        clusters(cluster_id="dup").start_controller_sync()
    assert c.running


@needs_controller
def test_cli_refuses_running_cluster_id(
    clusters: Callable[..., Cluster], sleeper: list[str], fp_root: Path
) -> None:
    c = clusters(n=1, cluster_id="taken", engine_cmd=sleeper)
    c.start_cluster_sync()
    r = cli("start", "-n", "1", "--daemonize", "--cluster-id", "taken")
    assert r.returncode == 10  # ipcluster's ALREADY_STARTED
    assert "already running" in r.stderr
    assert Path(c.cluster_file).exists() and c.running


@needs_controller
def test_stale_connection_file_named(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=1, cluster_id="stale")
    c.start_controller_sync()
    c.controller.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    c.controller.process.wait_sync(10)  # type: ignore[union-attr]
    with pytest.raises(ConnectionFileError, match="ipcontroller-stale-client.json") as exc:
        c.connect_client_sync()
    assert "stale" in str(exc.value)
    with pytest.raises(RuntimeError, match="not running"):
        c.start_engines_sync()


@needs_controller
def test_an_engine_killed_from_outside_is_reaped(
    clusters: Callable[..., Cluster], sleeper: list[str]
) -> None:
    # as ipyparallel's launchers: a child that dies is reaped at once, not left a zombie
    # (a pid that still "exists") until the cluster stops
    c = clusters(n=2, engine_cmd=sleeper)
    c.start_cluster_sync()
    victim, other = c._processes()[1:]  # (the controller first)
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{victim.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{victim.pid}").exists(), "the killed engine is still a zombie"
    assert victim.exit_code == -signal.SIGKILL and other.running


def test_the_reaper_starts_afresh_in_a_forked_child() -> None:
    from ferroparallel.cluster import launchers

    child = launchers.Process.spawn([sys.executable, "-c", "pass"], os.environ, os.devnull)
    try:
        pid = os.fork()
        if pid == 0:  # the child: none of the parent's children, no thread, a free lock
            r = launchers._REAPER
            ok = r._children == [] and r._thread is None and r._lock.acquire(timeout=1)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        child.wait_sync(10)


@needs_controller
def test_atexit_stops_processes(tmp_path: Path, sleeper: list[str], fp_root: Path) -> None:
    script = tmp_path / "starter.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from ferroparallel.cluster import Cluster
            mode = sys.argv[1]
            on = mode in ("1", "gc", "late-off", "closed-stderr", "stopped-elsewhere")
            c = Cluster(n=2, engine_cmd={sleeper!r}, shutdown_atexit=on)
            c.start_cluster_sync()
            if mode.startswith("late"):  # changed after the start: what counts is the end
                c.shutdown_atexit = mode == "late-on"
            print(json.dumps([p.pid for p in c._processes()]), flush=True)
            if mode == "closed-stderr":  # printing the exit message fails: still stopped
                sys.stderr.close()
            if mode == "stopped-elsewhere":  # through another Cluster object: nothing to say
                Cluster.from_file(c.cluster_file).stop_cluster_sync()
            if mode == "gc":  # the object dropped: its processes are still stopped at exit
                import gc
                del c
                gc.collect()
            """
        )
    )

    def starter(mode: str) -> list[int]:
        r = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        pids = json.loads(r.stdout)
        assert len(pids) == 3
        # as ipyparallel, a cluster stopped at exit says so on stderr
        assert ("Stopping cluster <Cluster(" in r.stderr) == (mode in ("1", "gc", "late-on"))
        return pids

    def stopped_at_exit(mode: str) -> None:
        assert_gone(starter(mode))
        assert not list(fp_root.glob("profile_default/security/cluster-*.json"))

    def outlives_its_starter(mode: str) -> None:
        pids = starter(mode)
        assert all(pid_alive(p) for p in pids)
        (f,) = fp_root.glob("profile_default/security/cluster-*.json")
        Cluster.from_file(f).stop_cluster_sync()  # (and it can be stopped later)
        assert_gone(pids)

    stopped_at_exit("1")
    stopped_at_exit("gc")
    outlives_its_starter("0")
    # the flag as it is at exit counts, as in ipyparallel: turned off after the start, or on
    outlives_its_starter("late-off")
    stopped_at_exit("late-on")
    stopped_at_exit("closed-stderr")
    stopped_at_exit("stopped-elsewhere")  # (no "Stopping cluster" for it: see starter)


@needs_engine
def test_engines_inherit_pythonpath(
    clusters: Callable[..., Cluster], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "extra_path"
    marks = tmp_path / "marks"
    extra.mkdir()
    marks.mkdir()
    # sitecustomize runs at start-up of every Python process that has `extra` on its path.
    (extra / "sitecustomize.py").write_text(
        f"import os, pathlib\npathlib.Path({str(marks)!r}, str(os.getpid())).write_text('seen')\n"
    )
    (extra / "fp_pythonpath_probe.py").write_text("VALUE = 'from PYTHONPATH'\n")
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(extra) + (os.pathsep + old if old else ""))
    c = clusters(n=2)
    c.start_cluster_sync()
    wait_registered(c, 2)
    for pid in c.engine_set.pids:  # type: ignore[union-attr]
        assert (marks / str(pid)).exists()
    if _client_available():
        rc = c.connect_client_sync()
        try:
            rc.wait_for_engines(2, timeout=30)
            values = rc[:].apply_sync(lambda: __import__("fp_pythonpath_probe").VALUE)
            assert values == ["from PYTHONPATH"] * 2
        finally:
            rc.close()


@needs_client
def test_context_manager_connects_client(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=2)
    with c as rc:
        assert len(rc.ids) == 2
        pids = rc[:].apply_sync(os.getpid)
        assert sorted(pids) == sorted(c.engine_set.pids)  # type: ignore[union-attr]
        all_ = all_pids(c)
    assert_gone(all_)
    assert not Path(c.cluster_file).exists()


# -- the command line ----------------------------------------------------------------------------


@needs_engine
def test_cli_daemonize_list_stop(fp_root: Path) -> None:
    r = cli("start", "-n", "2", "--daemonize", "--cluster-id", "cli")
    assert r.returncode == 0, r.stderr
    assert "2 registered" in r.stdout
    c = Cluster.from_file(profile_dir=fp_root / "profile_default", cluster_id="cli")
    pids = all_pids(c)
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    wait_registered(c, 2)

    r = cli("list", "-o", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert (row["profile"], row["cluster_id"], row["running"], row["n"]) == (
        "default",
        "cli",
        True,
        2,
    )
    r = cli("list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["PROFILE", "CLUSTER", "ID", "RUNNING", "ENGINES", "LAUNCHER"]
    assert lines[1].split() == ["default", "cli", "True", "2", "Local"]
    # ipcluster list's own format: fixed columns, the same text
    assert lines[0] == f"{'PROFILE':16} {'CLUSTER ID':32} {'RUNNING':7} {'ENGINES':7} LAUNCHER"
    assert lines[1] == f"{'default':16} {'cli':32} {'True':7} {2:7} Local"
    assert row["launcher"] == "Local"
    # ipcluster list -o json's form (Cluster.to_dict()) as well
    assert row["cluster"]["cluster_id"] == "cli" and row["controller"] is not None
    assert Cluster.from_dict(row).cluster_id == "cli"

    r = cli("stop", "--cluster-id", "cli")
    assert r.returncode == 0, r.stderr
    assert_gone(pids)
    assert json.loads(cli("list", "-o", "json").stdout) == []
    assert cli("stop", "--cluster-id", "cli").returncode == 11  # ipcluster's ALREADY_STOPPED
    r = cli("stop", "--all")
    assert r.returncode == 0 and "No clusters to stop" in r.stdout  # (as ipcluster stop --all)


@needs_engine
def test_cli_list_columns_are_ipclusters(
    clusters: Callable[..., Cluster], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The console script's ``cluster list`` prints ipcluster list's table: the unnamed
    cluster as ``''``, the engine launcher's class name without ``EngineSetLauncher``, a
    profile outside the profile root as its directory."""
    from ferroparallel.__main__ import main

    c = clusters(cluster_id="", profile="other", engines="mpi")
    c.start_controller_sync()
    away = clusters(cluster_id="b", profile_dir=tmp_path / "elsewhere" / "profile_x")
    away.start_controller_sync()
    assert main(["cluster", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{'PROFILE':16} {'CLUSTER ID':32} {'RUNNING':7} {'ENGINES':7} LAUNCHER",
        f"{'other':16} {repr(''):32} {'True':7} {0:7} MPI",
    ]
    assert main(["cluster", "list", f"--profile-dir={away.profile_dir}"]) == 0
    (_, line) = capsys.readouterr().out.splitlines()
    assert line == f"{away.profile_dir:16} {'b':32} {'True':7} {0:7} Local"
    assert main(["cluster", "list", "-o", "json", "--profile=other"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["cluster_id"], row["launcher"]) == ("", "MPI")


def test_profile_config_files_are_read(tmp_path: Path) -> None:
    """As ipyparallel: the profile's ipcluster_config.py (and ferroparallel_config.py) set
    the Cluster's defaults; a config object and keywords win over them."""
    from traitlets.config import Config

    pdir = tmp_path / "profile_cfg"
    pdir.mkdir()
    (pdir / "ipcluster_config.py").write_text(
        "c.Cluster.n = 1\nc.Cluster.engine_timeout = 7\n"
        "c.SSHEngineSetLauncher.engines = {'localhost': 1}\n"
    )
    (pdir / "ferroparallel_config.py").write_text("c.Cluster.engine_timeout = 8\n")
    c = Cluster(profile_dir=pdir)
    assert (c.n, c.engine_timeout) == (1, 8)
    assert c.config.SSHEngineSetLauncher.engines == {"localhost": 1}
    assert Cluster(profile_dir=pdir, n=3).n == 3
    cfg = Config()
    cfg.Cluster.n = 2
    assert Cluster(profile_dir=pdir, config=cfg).n == 2
    assert Cluster(profile_dir=pdir, load_profile=False).n is None
    (pdir / "ipcluster_config.py").write_text("this is not python\n")
    with pytest.raises(ValueError, match="ipcluster_config.py"):
        Cluster(profile_dir=pdir)


@needs_engine
def test_cli_work_dir_and_stop_signal(fp_root: Path, tmp_path: Path) -> None:
    """ipcluster's ``--work-dir`` starts the engines in that directory (a relative
    ``--profile-dir`` still names the directory it named from where the command was run), and
    ipcluster's ``stop --signal=N`` is accepted."""
    work = tmp_path / "work"
    work.mkdir()
    rel_profile = os.path.relpath(fp_root / "profile_wd")
    r = cli(
        "start", "-n", "1", "--daemonize", f"--profile-dir={rel_profile}", "--cluster-id=wd",
        f"--work-dir={work}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    c = Cluster.from_file(profile_dir=fp_root / "profile_wd", cluster_id="wd")
    try:
        wait_registered(c, 1)
        pids = all_pids(c)
        assert all(os.readlink(f"/proc/{p}/cwd") == str(work) for p in pids)
        r = cli("engines", "-n", "1", "--daemonize", f"--profile-dir={rel_profile}",
                "--cluster-id=wd", f"--work-dir={work}")  # fmt: skip
        assert r.returncode == 0, r.stderr
        c = Cluster.from_file(profile_dir=fp_root / "profile_wd", cluster_id="wd")
        pids = all_pids(c)
        assert len(pids) == 3 and all(os.readlink(f"/proc/{p}/cwd") == str(work) for p in pids)
    finally:
        r = cli("stop", f"--profile-dir={rel_profile}", "--cluster-id=wd", "--signal=2")
    assert r.returncode == 0, r.stderr
    assert_gone(pids)
    r = cli("start", "-n", "1", "--daemonize", f"--work-dir={work / 'missing'}")
    assert r.returncode == 2 and "not a directory" in r.stderr


@needs_engine
def test_cli_ipcluster_forms_and_engines_subcommand(fp_root: Path) -> None:
    """ipcluster's spellings: ``--n=1 --daemonize=True``, and ``engines`` adding a set of
    engines to a running cluster (stopped with it by ``stop``)."""
    r = cli("start", "--n=1", "--daemonize=True", "--profile=ipc", "--cluster-id=x")
    assert r.returncode == 0, r.stderr
    c = Cluster.from_file(profile_dir=fp_root / "profile_ipc", cluster_id="x")
    try:
        r = cli("engines", "--n=2", "--daemonize", "--profile=ipc", "--cluster-id=x")
        assert r.returncode == 0, r.stderr
        assert "2 registered" in r.stdout
        c = Cluster.from_file(profile_dir=fp_root / "profile_ipc", cluster_id="x")
        assert sorted(es.n for es in c.engines.values()) == [1, 2]
        wait_registered(c, 3)
        pids = all_pids(c)
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    finally:
        r = cli("stop", "--profile=ipc", "--cluster-id=x")
    assert r.returncode == 0, r.stderr
    assert_gone(pids)
    r = cli("engines", "-n", "1", "--daemonize", "--profile=ipc", "--cluster-id=x")
    assert r.returncode == 1 and "no running cluster or controller 'x'" in r.stderr
    r = cli("start", "-n", "1", "--daemonize=maybe", "--profile=ipc")
    assert r.returncode == 2 and "expected True or False" in r.stderr
    # ipcluster's --controller=Local is understood (and no longer abbreviates
    # --controller-arg); launchers that do not exist are refused with the reason
    from ferroparallel.cluster.app import build_parser

    assert build_parser().parse_args(["start", "--controller=Local"]).controller == "Local"
    # the profile's config applies to what the command line leaves out
    (fp_root / "profile_ipccfg").mkdir(exist_ok=True)
    (fp_root / "profile_ipccfg" / "ipcluster_config.py").write_text("c.Cluster.n = 1\n")
    r = cli("start", "--daemonize", "--profile=ipccfg", "--cluster-id=cfg")
    try:
        assert r.returncode == 0, r.stderr
        assert "1 engine(s), 1 registered" in r.stdout
    finally:
        assert cli("stop", "--profile=ipccfg", "--cluster-id=cfg").returncode == 0
    r = cli("start", "-n", "1", "--daemonize", "--profile=ipc", "--controller=WinHPC")
    assert r.returncode == 2 and "'WinHPC' is not available" in r.stderr
    # ipcluster's --Class.trait=value, --config FILE, --debug, --location and --delay
    extra = fp_root / "extra_config.py"
    extra.write_text("c.Cluster.engine_timeout = 50.0\n")
    r = cli(
        "start", "--daemonize", "--profile=ipccfg", "--cluster-id=tr", "--Cluster.n=2",
        f"--config={extra}", "--debug", "--location=127.0.0.1", "--delay=0.1",
    )  # fmt: skip
    try:
        assert r.returncode == 0, r.stderr
        assert "2 engine(s), 2 registered" in r.stdout  # the option wins over the profile
        c = Cluster.from_file(profile_dir=fp_root / "profile_ipccfg", cluster_id="tr")
        assert "DEBUG" in c.controller.args and "127.0.0.1" in c.controller.args
    finally:
        assert cli("stop", "--profile=ipccfg", "--cluster-id=tr").returncode == 0
    r = cli("list", "--Cluster.n=2")
    assert r.returncode == 2 and "for 'start'" in r.stderr
    r = cli("start", "--daemonize", "--profile=ipccfg", "--config=/no/such/file.py")
    assert r.returncode == 2 and "/no/such/file.py not found" in r.stderr
    r = cli("start", "--daemonize", "--profile=ipccfg", "--Cluster.n=many")
    assert r.returncode == 2 and "expected an int" in r.stderr and "Traceback" not in r.stderr
    extra.write_text("c.Cluster.n = (\n")
    r = cli("start", "--daemonize", "--profile=ipccfg", f"--config={extra}")
    assert r.returncode == 2 and "cannot load config file" in r.stderr


@needs_engine
def test_cli_controller_args_after_dashes_and_stop_by_ids(fp_root: Path) -> None:
    """ipcluster's ``start -- ARGS`` (ARGS go to the controller) and ``stop ID ...``."""
    pids: list[int] = []
    try:
        for cid in ("a", "b"):
            r = cli("start", "-n", "0", "--daemonize", f"--cluster-id={cid}", "--", "--ping=2000")
            assert r.returncode == 0, r.stderr
            c = Cluster.from_file(profile_dir=fp_root / "profile_default", cluster_id=cid)
            assert c.controller is not None and "--ping=2000" in c.controller.args
            pids += all_pids(c)
        r = cli("stop", "a", "b")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("Stopped cluster") == 2
    finally:
        cli("stop", "a", "b")
    assert_gone(pids)
    r = cli("stop", "a")
    assert r.returncode == 11 and "no cluster 'a'" in r.stderr
    r = cli("list", "--", "--ping=2000")
    assert r.returncode == 2 and "are for 'start'" in r.stderr


@needs_engine
def test_cli_engines_for_a_controller_started_on_its_own(fp_root: Path) -> None:
    """As ``ipcluster engines`` with a controller from ``ipcontroller``: ``cluster engines``
    starts engines for a controller that no cluster started (its connection files are all
    there is); ``cluster stop`` stops those engines and leaves the controller alone."""
    pdir = fp_root / "profile_alone"
    ctl = subprocess.Popen(
        [sys.executable, "-m", "ferroparallel", "controller", "--profile-dir", str(pdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client_file = pdir / "security" / "ipcontroller-client.json"
        wait_until(client_file.is_file, 30, "the controller's connection file")
        r = cli("engines", "-n", "1", "--daemonize", f"--profile-dir={pdir}")
        assert r.returncode == 0, r.stderr
        assert "1 registered" in r.stdout
        c = Cluster.from_file(profile_dir=pdir, cluster_id="")
        assert c.controller is None and len(all_pids(c)) == 1
        pids = all_pids(c)
        r = cli("list", f"--profile-dir={pdir}")
        assert r.returncode == 0, r.stderr
        r = cli("stop", f"--profile-dir={pdir}")
        assert r.returncode == 0, r.stderr
        assert_gone(pids)
        assert ctl.poll() is None  # the controller is not the cluster's to stop
    finally:
        ctl.terminate()
        ctl.wait(30)
    r = cli("engines", "-n", "1", "--daemonize", f"--profile-dir={pdir}")
    assert r.returncode == 1 and "no running cluster or controller" in r.stderr


@needs_engine
def test_cluster_file_goes_with_the_last_of_the_cluster(
    clusters: Callable[..., Cluster], fp_root: Path
) -> None:
    """As ipyparallel's: stopping the controller, or the engines, removes the cluster file
    once nothing of the cluster is left (``cluster list`` showed stopped clusters before)."""
    c = clusters(n=1, profile="left")
    c.start_controller_sync()
    assert Path(c.cluster_file).exists()
    c.stop_controller_sync()
    assert not Path(c.cluster_file).exists()
    c.start_controller_sync()
    esid = c.start_engines_sync(1)
    c.stop_controller_sync()
    state = json.loads(Path(c.cluster_file).read_text())
    assert state["controller"] is None and list(state["engines"]) == [esid]
    c.stop_engines_sync()
    assert not Path(c.cluster_file).exists()
    r = cli("list", "--profile=left")
    assert r.returncode == 0 and r.stdout.splitlines()[1:] == [], r.stdout


@needs_engine
def test_cli_foreground_engines_leave_no_cluster_file(fp_root: Path) -> None:
    """``cluster engines`` in the foreground for a controller started on its own: its cluster
    file goes when its engines stop, by Ctrl-C or by themselves."""
    pdir = fp_root / "profile_fg_engines"
    ctl = subprocess.Popen(
        [sys.executable, "-m", "ferroparallel", "controller", "--profile-dir", str(pdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster_json = pdir / "security" / "cluster-.json"
    try:
        wait_until((pdir / "security" / "ipcontroller-client.json").is_file, 30, "the controller")
        for how in ("ctrl-c", "engine exit"):
            fg = subprocess.Popen(
                [sys.executable, "-m", "ferroparallel", "cluster", "engines", "-n", "1",
                 f"--profile-dir={pdir}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            try:
                assert fg.stdout is not None
                line = fg.stdout.readline()
                assert "1 registered" in line, line + fg.stdout.read()
                line = fg.stdout.readline()  # (Ctrl-C is trapped from here on)
                assert "Press Ctrl-C" in line, line + fg.stdout.read()
                assert cluster_json.exists()
                if how == "ctrl-c":
                    fg.send_signal(signal.SIGINT)
                else:
                    (pid,) = all_pids(Cluster.from_file(cluster_json))
                    os.kill(pid, signal.SIGKILL)
                assert fg.wait(30) == 0, fg.stdout.read()
                assert not cluster_json.exists(), how
            finally:
                if fg.poll() is None:
                    fg.kill()
                    fg.wait(10)
    finally:
        ctl.terminate()
        ctl.wait(30)


@needs_engine
@pytest.mark.parametrize("ignored", [False, True], ids=["terminal", "sigint-ignored"])
def test_cli_foreground_ctrl_c(fp_root: Path, ignored: bool) -> None:
    # ignored: started in the background of a shell script ('ipcluster start &'), which ignores
    # SIGINT for it; 'kill -INT' still stops it, as ipcluster
    p = subprocess.Popen(
        [sys.executable, "-m", "ferroparallel", "cluster", "start", "-n", "1", "--profile", "fg"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None,
    )
    try:
        assert p.stdout is not None
        started = p.stdout.readline()
        assert "started" in started and "1 registered" in started
        f = fp_root / "profile_fg" / "security" / "cluster-.json"
        c = Cluster.from_file(f)
        assert c.cluster_id == ""
        wait_registered(c, 1)
        pids = all_pids(c)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Stopping" in out
    assert_gone(pids)
    assert not f.exists()


@needs_controller
def test_cli_clean(fp_root: Path, sleeper: list[str]) -> None:
    # A cluster whose processes were all killed leaves stale files behind.
    dead = Cluster(n=1, cluster_id="dead", engine_cmd=sleeper, shutdown_atexit=False)
    dead.start_cluster_sync()
    for p in dead._processes():
        p.send_signal(signal.SIGKILL)
    assert_gone(all_pids(dead))
    # A live one must be left alone.
    live = Cluster(n=1, cluster_id="live", engine_cmd=sleeper)
    live.start_cluster_sync()
    try:
        # An orphan connection file pointing at a closed port.
        pdir = Path(live.profile_dir)
        orphan = paths.connection_file(pdir, "client", "orphan")
        info = paths.load_connection_file(live.client_file)
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        info["registration"] = s.getsockname()[1]
        s.close()
        paths.write_connection_file(orphan, info)

        rows = {r["cluster_id"]: r for r in json.loads(cli("list", "-o", "json").stdout)}
        assert rows["dead"]["running"] is False and rows["live"]["running"] is True

        r = cli("clean")
        assert r.returncode == 0, r.stderr
        assert not Path(dead.cluster_file).exists()
        assert not dead.client_file.exists() and not dead.engine_file.exists()
        assert not orphan.exists()
        assert Path(live.cluster_file).exists() and live.client_file.exists()
        assert live.running
        assert cli("clean").stdout.strip() == "nothing to clean"
    finally:
        live.stop_cluster_sync()


@needs_engine
def test_cli_foreground_stopped_from_elsewhere(fp_root: Path) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferroparallel",
            "cluster",
            "start",
            "-n",
            "1",
            "--cluster-id",
            "fg2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert "1 registered" in p.stdout.readline()
        c = Cluster.from_file(profile_dir=fp_root / "profile_default", cluster_id="fg2")
        pids = all_pids(c)
        r = cli("stop", "--cluster-id", "fg2")
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "stopped" in out
    assert_gone(pids)


@needs_client
def test_start_and_connect_reports_dead_engine(clusters: Callable[..., Cluster]) -> None:
    c = clusters(n=1, engine_args=["--no-such-engine-flag"], engine_timeout=30)
    with pytest.raises(RuntimeError, match="no-such-engine-flag") as exc:
        c.start_and_connect_sync()
    assert "ipengine" in str(exc.value)  # names the engine's log file


def test_repr_names_the_profile_as_ipyparallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERROPARALLEL_DIR", str(tmp_path / "root"))
    assert repr(Cluster(cluster_id="abc")) == "<Cluster(cluster_id='abc', profile='default')>"
    other = tmp_path / "elsewhere"
    assert repr(Cluster(cluster_id="x", profile_dir=other)) == (
        f"<Cluster(cluster_id='x', profile_dir={str(other)!r})>"
    )
