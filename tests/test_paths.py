"""Profile directories and connection files (ferroparallel.paths)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ferroparallel import paths
from ferroparallel.error import ConnectionFileError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def fp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own profile root."""
    root = tmp_path / "fproot"
    monkeypatch.setenv("FERROPARALLEL_DIR", str(root))
    return root


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _client_info(**over: object) -> dict[str, object]:
    info: dict[str, object] = {
        "interface": "tcp://127.0.0.1",
        "registration": 10101,
        "control": 10102,
        "mux": 10103,
        "task": 10104,
        "iopub": 10105,
        "notification": 10106,
        "task_scheme": "leastload",
        "key": "abc",
        "signature_scheme": "hmac-sha256",
        "pack": "msgpack",
        "unpack": "msgpack",
        "location": "host",
        "ssh": "",
        "curve_serverkey": None,
    }
    info.update(over)
    return info


def test_profile_root_env(fp_root: Path) -> None:
    assert paths.profile_root() == fp_root


def test_profile_root_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FERROPARALLEL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.profile_root() == tmp_path / "home" / ".ferroparallel"
    monkeypatch.setenv("FERROPARALLEL_DIR", "")
    assert paths.profile_root() == tmp_path / "home" / ".ferroparallel"


def test_profile_dir_default_and_named(fp_root: Path) -> None:
    d = paths.profile_dir()
    assert d == fp_root / "profile_default"
    assert (d / "security").is_dir() and (d / "log").is_dir()
    assert _mode(d / "security") == 0o700
    assert paths.profile_dir("work") == fp_root / "profile_work"
    assert (fp_root / "profile_work" / "security").is_dir()


def test_profile_dir_explicit_wins(tmp_path: Path) -> None:
    explicit = tmp_path / "elsewhere"
    assert paths.profile_dir("ignored", explicit) == explicit
    assert _mode(explicit / "security") == 0o700
    assert not (paths.profile_root() / "profile_ignored").exists()


def test_profile_dir_no_create(fp_root: Path) -> None:
    d = paths.profile_dir("nothere", create=False)
    assert d == fp_root / "profile_nothere"
    assert not d.exists()


def test_profile_dir_fixes_security_mode(fp_root: Path) -> None:
    sec = fp_root / "profile_default" / "security"
    sec.mkdir(parents=True)
    os.chmod(sec, 0o755)
    paths.profile_dir()
    assert _mode(sec) == 0o700


def test_profile_name_with_separator_rejected() -> None:
    with pytest.raises(ValueError):
        paths.profile_dir("a/b")


def test_connection_file_names(tmp_path: Path) -> None:
    sec = tmp_path / "security"
    assert paths.connection_file(tmp_path, "client") == sec / "ipcontroller-client.json"
    assert paths.connection_file(tmp_path, "engine") == sec / "ipcontroller-engine.json"
    assert paths.connection_file(tmp_path, "client", "abc") == sec / "ipcontroller-abc-client.json"
    assert paths.connection_file(str(tmp_path), "engine", "x") == sec / "ipcontroller-x-engine.json"
    with pytest.raises(ValueError):
        paths.connection_file(tmp_path, "hub")


def test_write_and_load_roundtrip() -> None:
    pdir = paths.profile_dir()
    f = paths.connection_file(pdir, "client", "c1")
    paths.write_connection_file(f, _client_info())
    assert _mode(f) == 0o600
    assert paths.load_connection_file(f) == _client_info()
    assert paths.load_connection_file(f, "client")["notification"] == 10106
    # Overwriting keeps the mode and leaves no temporary file behind.
    paths.write_connection_file(f, _client_info(key="def"))
    assert paths.load_connection_file(f)["key"] == "def"
    assert _mode(f) == 0o600
    assert sorted(p.name for p in f.parent.iterdir()) == [f.name]


def test_write_mode_ignores_umask() -> None:
    f = paths.profile_dir() / "security" / "x.json"
    old = os.umask(0)
    try:
        paths.write_connection_file(f, _client_info())
    finally:
        os.umask(old)
    assert _mode(f) == 0o600


def test_load_missing_names_file(tmp_path: Path) -> None:
    f = tmp_path / "nope-client.json"
    with pytest.raises(ConnectionFileError, match=str(f)) as exc:
        paths.load_connection_file(f)
    assert "does not exist" in str(exc.value)
    assert isinstance(exc.value, OSError)


def test_load_unreadable_names_file(tmp_path: Path) -> None:
    d = tmp_path / "adir.json"
    d.mkdir()
    with pytest.raises(ConnectionFileError, match=str(d)):
        paths.load_connection_file(d)
    f = tmp_path / "binary.json"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConnectionFileError, match=str(f)):
        paths.load_connection_file(f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_load_permission_denied_names_file(tmp_path: Path) -> None:
    f = tmp_path / "secret.json"
    f.write_text(json.dumps(_client_info()))
    os.chmod(f, 0)
    with pytest.raises(ConnectionFileError, match=str(f)):
        paths.load_connection_file(f)


def test_load_invalid_json_names_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text('{"interface": "tcp://127.0.0.1", ')
    with pytest.raises(ConnectionFileError, match=str(f)) as exc:
        paths.load_connection_file(f)
    assert "not valid JSON" in str(exc.value)
    f.write_text("")
    with pytest.raises(ConnectionFileError, match=str(f)):
        paths.load_connection_file(f)


def test_load_not_an_object_names_file(tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    f.write_text("[1, 2]")
    with pytest.raises(ConnectionFileError, match=str(f)):
        paths.load_connection_file(f)


def test_load_missing_keys_names_file_and_keys(tmp_path: Path) -> None:
    f = tmp_path / "partial.json"
    info = _client_info()
    del info["key"], info["registration"]
    f.write_text(json.dumps(info))
    with pytest.raises(ConnectionFileError, match=str(f)) as exc:
        paths.load_connection_file(f)
    assert "registration" in str(exc.value) and "key" in str(exc.value)


def test_load_role_requires_role_ports(tmp_path: Path) -> None:
    f = tmp_path / "client.json"
    f.write_text(json.dumps(_client_info()))
    paths.load_connection_file(f, "client")
    with pytest.raises(ConnectionFileError, match="hb_ping") as exc:
        paths.load_connection_file(f, "engine")
    assert str(f) in str(exc.value)


def test_load_bad_port_and_interface(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps(_client_info(registration="10101")))
    with pytest.raises(ConnectionFileError, match="registration"):
        paths.load_connection_file(f)
    f.write_text(json.dumps(_client_info(mux=0)))
    with pytest.raises(ConnectionFileError, match="mux"):
        paths.load_connection_file(f, "client")
    f.write_text(json.dumps(_client_info(interface="127.0.0.1")))
    with pytest.raises(ConnectionFileError, match="interface"):
        paths.load_connection_file(f)


def test_old_ipython_file_hint(tmp_path: Path) -> None:
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"exec_key": "k", "url": "tcp://127.0.0.1:10101", "ssh": ""}))
    with pytest.raises(ConnectionFileError, match="IPython.parallel 0.x"):
        paths.load_connection_file(f)


def test_exec_key_alias(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    info = _client_info()
    info["exec_key"] = info.pop("key")
    f.write_text(json.dumps(info))
    assert paths.load_connection_file(f)["key"] == "abc"


def test_validate_connection_info_source_named() -> None:
    with pytest.raises(ConnectionFileError, match="IPP_CONNECTION_INFO"):
        paths.validate_connection_info({"interface": "tcp://x"}, "IPP_CONNECTION_INFO")


def test_config_files_of_ipythons_profile_of_the_same_name(
    fp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ipython profile create --parallel --profile=x`` writes the config files into
    ``$IPYTHONDIR/profile_x``: the cluster, the controller and the engines of profile ``x``
    read them (before the profile directory's own, which win)."""
    from ferroparallel.cluster.cluster import Cluster
    from ferroparallel.controller import app
    from ferroparallel.engine.startup import load_startup

    ipy = tmp_path / "ipython" / "profile_x"
    ipy.mkdir(parents=True)
    monkeypatch.setenv("IPYTHONDIR", str(ipy.parent))
    (ipy / "ipcluster_config.py").write_text("c.Cluster.n = 3\nc.Cluster.engine_timeout = 7\n")
    (ipy / "ipcontroller_config.py").write_text("c.IPController.ip = '0.0.0.0'\n")
    (ipy / "ipengine_config.py").write_text("c.IPEngine.startup_command = 'a = 1'\n")
    pdir = paths.profile_dir("x")
    (pdir / "ferroparallel_config.py").write_text("c.Cluster.engine_timeout = 8\n")

    assert paths.config_files(pdir, ("ipcluster_config.py", "ferroparallel_config.py")) == [
        ipy / "ipcluster_config.py",
        pdir / "ferroparallel_config.py",
    ]
    c = Cluster(profile="x")
    assert (c.n, c.engine_timeout) == (3, 8)
    s, loaded = app.resolve_settings(app.build_parser().parse_args([]), pdir)
    assert (s.ip, loaded) == ("0.0.0.0", ipy / "ipcontroller_config.py")
    assert load_startup(pdir).command == "a = 1"
    # a profile directory given by path is only itself
    other = tmp_path / "elsewhere" / "profile_x"
    other.mkdir(parents=True)
    assert paths.config_files(other, ("ipcluster_config.py",)) == []


def test_json_config_files_beside_the_python_ones(fp_root: Path, tmp_path: Path) -> None:
    """As traitlets' applications (ipcluster, ipcontroller, ipengine): a profile's
    ``NAME_config.json`` is read too, after ``NAME_config.py`` (so the JSON one wins)."""
    import json

    from ferroparallel.cluster.cluster import Cluster
    from ferroparallel.controller import app
    from ferroparallel.engine.startup import load_startup

    pdir = paths.profile_dir("js")
    (pdir / "ipcluster_config.py").write_text("c.Cluster.n = 1\nc.Cluster.engine_timeout = 7\n")
    (pdir / "ipcluster_config.json").write_text(json.dumps({"Cluster": {"n": 2}}))
    (pdir / "ipcontroller_config.json").write_text(json.dumps({"IPController": {"ip": "0.0.0.0"}}))
    (pdir / "ipengine_config.py").write_text("c.IPEngine.startup_command = 'a = 1'\n")
    (pdir / "ipengine_config.json").write_text(
        json.dumps({"IPEngine": {"startup_command": "b = 2"}})
    )
    assert paths.config_files(pdir, ("ipcluster_config.py", "ferroparallel_config.py")) == [
        pdir / "ipcluster_config.py",
        pdir / "ipcluster_config.json",
    ]
    c = Cluster(profile="js")
    assert (c.n, c.engine_timeout) == (2, 7)
    s, loaded = app.resolve_settings(app.build_parser().parse_args([]), pdir)
    assert (s.ip, loaded) == ("0.0.0.0", pdir / "ipcontroller_config.json")
    assert load_startup(pdir).command == "b = 2"
    (pdir / "ipcluster_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="ipcluster_config.json"):
        Cluster(profile="js")


@pytest.mark.timeout(90)
def test_engine_reads_url_file_and_work_dir_of_ipengine_config(
    fp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipyparallel's documented way to run engines elsewhere: copy
    ``ipcontroller-engine.json`` to any place and name it with ``c.IPEngine.url_file`` in the
    engine profile's ``ipengine_config.py`` (``ipython profile create --parallel``'s file); the
    engine also changes to ``c.IPEngine.work_dir``, and ``EngineFactory`` (the old section
    name) still sets what ``IPEngine`` does not."""
    import shutil
    import subprocess
    import sys

    import ferroparallel as ipp
    from cluster_util import start_controller, stop_popen

    ctl = start_controller(tmp_path / "ctl_profile")
    engine = None
    try:
        copied = tmp_path / "copied" / "my-engine.json"
        copied.parent.mkdir()
        shutil.copy(ctl.engine_file, copied)
        work = tmp_path / "work dir"
        work.mkdir()
        ipy = tmp_path / "ipython" / "profile_eng"
        ipy.mkdir(parents=True)
        monkeypatch.setenv("IPYTHONDIR", str(ipy.parent))
        (ipy / "ipengine_config.py").write_text(
            "c = get_config()\n"
            f"c.IPEngine.url_file = {str(copied)!r}\n"
            f"c.EngineFactory.work_dir = {str(work)!r}\n"
            "c.EngineFactory.timeout = 'not a number'\n"
            "c.IPEngine.timeout = 20.0\n"
        )
        log = tmp_path / "engine.log"
        with open(log, "wb") as out:
            engine = subprocess.Popen(
                [sys.executable, "-m", "ferroparallel", "engine", "--profile", "eng"],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        rc = ipp.Client(ctl.client_file)
        try:
            try:
                rc.wait_for_engines(1, timeout=30)
            except TimeoutError:
                pytest.fail(f"the engine did not register:\n{log.read_text()}")
            assert rc[:].apply_sync(os.getcwd) == [str(work)]
        finally:
            rc.close()
        assert "settings ferroparallel does not use" not in log.read_text()
    finally:
        if engine is not None:
            stop_popen(engine)
        ctl.stop()
