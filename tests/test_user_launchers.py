"""Launcher classes of the user's own (subclasses of ipyparallel's or ferroparallel's
launchers, as config files define them): they run as the launcher they derive from, with
the settings they change; what is not used is named in a warning. Real processes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from traitlets import List
from traitlets.config import Config

from ferroparallel import Client
from ferroparallel.cluster import Cluster
from ferroparallel.cluster import launcher as fp_launcher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def fp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "fproot"
    monkeypatch.setenv("FERROPARALLEL_DIR", str(root))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return root


def _run_one_task(c: Cluster) -> str | None:
    """Run a task on the cluster's engine; the engine's ``$FP_USER_MARK``."""
    with Client(c.client_file) as rc:
        rc.wait_for_engines(1, timeout=60)
        code = "__import__('os').environ.get('FP_USER_MARK')"
        return rc.load_balanced_view().apply_sync(eval, code)


def test_subclasses_of_ipyparallels_launchers(
    clusters: Callable[..., Cluster], tmp_path: Path
) -> None:
    """ipyparallel's launcher subclassed with plain class attributes (the form of
    ipyparallel's docs and tests): its controller_args reach the controller (here: SQLite task
    records), its engine environment the engines; an overridden method and an attribute
    ferroparallel does not know are named in a warning."""
    launcher = pytest.importorskip("ipyparallel.cluster.launcher")
    db = tmp_path / "records.db"

    class SqliteController(launcher.LocalControllerLauncher):
        controller_args = ["--sqlitedb", f"--db-path={db}"]
        database = "unused"

    class MarkedEngines(launcher.LocalEngineSetLauncher):
        environment = {"FP_USER_MARK": "from-the-subclass"}

        def start(self, n: int) -> None:  # not run by ferroparallel
            raise AssertionError("not called")

    with pytest.warns(UserWarning, match=r"SqliteController .*'local'.*database \(attribute\)"):
        c = clusters(load_profile=False, n=1, controller=SqliteController, engines=MarkedEngines)
    with pytest.warns(UserWarning, match=r"MarkedEngines .*start \(method\)"):
        c.engine_launcher_class = MarkedEngines  # (as config sets it: warned again)
    assert (c.controller_launcher_class, c.engine_launcher_class) == ("local", "local")
    c.start_cluster_sync()
    assert c.controller is not None
    assert c.controller.args[:2] == ["--sqlitedb", f"--db-path={db}"]
    assert _run_one_task(c) == "from-the-subclass"
    assert db.is_file() and db.stat().st_size > 0


def test_subclass_in_config_trait_default_and_class_attribute(
    clusters: Callable[..., Cluster],
) -> None:
    """``c.Cluster.controller_launcher_class = <subclass of ferroparallel's launcher>``: a
    redefined trait's default gives way to the config, as in traitlets, a plain class attribute
    does not; ``c.<SubclassName>`` settings apply; an engine_cmd of the subclass runs."""

    class Pinged(fp_launcher.LocalControllerLauncher):
        controller_args = List(["--ping=4000"]).tag(config=True)

    class Engines(fp_launcher.LocalEngineSetLauncher):
        engine_cmd = [sys.executable, "-m", "ferroparallel.engine"]

    cfg = Config()
    cfg.Cluster.controller_launcher_class = Pinged
    cfg.Cluster.engine_launcher_class = Engines
    cfg.Engines.environment = {"FP_USER_MARK": "by-class-name"}
    c = clusters(load_profile=False, n=1, config=cfg)
    assert c._controller_argv() == ["--ping=4000"]
    cfg.LocalControllerLauncher.controller_args = ["--ping=3000"]
    c = clusters(load_profile=False, n=1, config=cfg, controller_args=["--hwm=1"])
    c.start_cluster_sync()
    assert c.controller is not None and c.controller.args == ["--ping=3000", "--hwm=1"]
    assert c.engine_set is not None
    assert c.engine_set.cmd == [sys.executable, "-m", "ferroparallel.engine"]
    assert _run_one_task(c) == "by-class-name"

    class Fixed(fp_launcher.LocalControllerLauncher):
        controller_args = ["--ping=5000"]

    fixed = Cluster(load_profile=False, controller=Fixed, config=cfg)
    assert fixed._controller_argv() == ["--ping=5000"]


def test_a_class_that_is_no_launcher_is_refused() -> None:
    class NotALauncher:
        controller_args = ["--dictdb"]

    with pytest.raises(NotImplementedError, match="(?i)notalauncher"):
        Cluster(load_profile=False, controller=NotALauncher)


def test_find_launcher_class_and_abbreviation() -> None:
    """ipyparallel's ``find_launcher_class`` / ``abbreviate_launcher_class`` of
    ``ipyparallel.cluster.launcher``: any spelling names ferroparallel's class, and the
    abbreviation is what ``Cluster`` keeps."""
    find = fp_launcher.find_launcher_class
    assert find("local", "engine") is fp_launcher.LocalEngineSetLauncher
    assert find("MPI", "controller") is fp_launcher.MPIControllerLauncher
    assert find("SGE", "engine") is fp_launcher.SGEEngineSetLauncher
    dotted = "ipyparallel.cluster.launcher.LocalEngineSetLauncher"
    assert find(dotted, "engine") is fp_launcher.LocalEngineSetLauncher
    assert find("sshproxy", "engine") is fp_launcher.SSHProxyEngineSetLauncher
    for cls in (fp_launcher.SlurmEngineSetLauncher, fp_launcher.SSHControllerLauncher):
        short = fp_launcher.abbreviate_launcher_class(cls)
        assert Cluster(load_profile=False, engines=short).engine_launcher_class == short
    with pytest.raises(ValueError, match="no engine launcher 'nosuch'"):
        find("nosuch", "engine")
