"""``ferroparallel controller``: settings, config file, connection files, signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferroparallel import _core, paths
from ferroparallel.controller import app, config, connection

pytestmark = pytest.mark.timeout(60)

needs_controller = pytest.mark.skipif(
    not hasattr(_core, "Controller"), reason="ferroparallel._core has no Controller yet"
)

CLIENT_KEYS = {
    "interface",
    "registration",
    "control",
    "mux",
    "task",
    "iopub",
    "notification",
    "broadcast",
    "task_scheme",
    "key",
    "signature_scheme",
    "pack",
    "unpack",
    "location",
    "ssh",
    "curve_serverkey",
}
ENGINE_KEYS = {
    "interface",
    "registration",
    "control",
    "mux",
    "task",
    "iopub",
    "hb_ping",
    "hb_pong",
    "broadcast",
    "key",
    "signature_scheme",
    "pack",
    "unpack",
    "location",
    "ssh",
    "curve_serverkey",
}


@pytest.fixture(autouse=True)
def fp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "fproot"
    monkeypatch.setenv("FERROPARALLEL_DIR", str(root))
    return root


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Controller processes started by a test; killed if the test left them running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start_controller(procs: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, "-m", "ferroparallel.controller", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(p)
    return p


def wait_files(p: subprocess.Popen[bytes], *files: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files):
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"controller exited with {p.returncode}:\n{err.decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no connection files after {timeout} s")
        time.sleep(0.01)


def files(pdir: Path, cid: str = "") -> tuple[Path, Path]:
    return paths.connection_file(pdir, "client", cid), paths.connection_file(pdir, "engine", cid)


def write_config(pdir: Path, text: str) -> Path:
    pdir.mkdir(parents=True, exist_ok=True)
    f = pdir / config.CONFIG_FILENAME
    f.write_text("c = get_config()  # noqa\n" + text)
    return f


# -- settings (no processes) ---------------------------------------------------------------------


def test_parse_ports() -> None:
    assert config.parse_ports("10101-10103") == [10101, 10102, 10103]
    assert config.parse_ports("10101,10105") == [10101, 10105]
    assert config.parse_ports([10101, "10102-10103"]) == [10101, 10102, 10103]
    assert config.parse_ports(None) == []
    assert config.parse_ports(5000) == [5000]
    for bad in ("x", "10-5", "70000", [0]):
        with pytest.raises(config.ConfigError):
            config.parse_ports(bad)


def test_parse_db_and_log_level() -> None:
    assert config.parse_db("memory") == "memory"
    assert config.parse_db("DictDB") == "memory"
    assert config.parse_db("sqlitedb") == "sqlite"
    assert config.parse_db("nodb") == "none"
    with pytest.raises(config.ConfigError):
        config.parse_db("mongodb")
    assert config.parse_log_level("debug") == "DEBUG"
    assert config.parse_log_level(30) == "WARNING"
    assert config.parse_log_level("10") == "DEBUG"
    assert config.parse_log_level("CRITICAL") == "ERROR"
    with pytest.raises(config.ConfigError):
        config.parse_log_level("loud")


def test_requested_ports_pool_order() -> None:
    s = config.ControllerSettings(ports=list(range(20000, 20014)))
    req = s.requested_ports()
    assert [req[ch] for ch in config.ENGINE_CHANNELS + config.CLIENT_CHANNELS] == list(
        range(20000, 20014)
    )
    s = config.ControllerSettings(ports=[20000, 20001], port=21000, port_map={"hb_ping": 22000})
    req = s.requested_ports()
    assert req["registration"] == 21000
    assert req["hb_ping"] == 22000
    assert req["control_engine"] == 20000 and req["mux_engine"] == 20001
    assert req["notification"] == 0


def test_defaults_when_no_config(tmp_path: Path) -> None:
    args = app.build_parser().parse_args([])
    s, cfg = app.resolve_settings(args, tmp_path)
    assert cfg is None
    assert s == config.ControllerSettings()
    assert (s.ip, s.ping, s.scheme, s.db, s.pack) == (
        "127.0.0.1",
        3000,
        "leastload",
        "memory",
        "msgpack",
    )


def test_config_file_and_cli_override(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        "c.Controller.ip = '0.0.0.0'\n"
        "c.Controller.ping = 1234\n"
        "c.Controller.scheme = 'lru'\n"
        "c.Controller.db = 'sqlite'\n"
        "c.Controller.ports = '30000-30011'\n"
        "c.Controller.location = 'cfghost'\n",
    )
    args = app.build_parser().parse_args(["--scheme", "twobin", "--ping", "500", "--nodb"])
    s, loaded = app.resolve_settings(args, tmp_path)
    assert loaded == cfg
    assert s.ip == "0.0.0.0" and s.location == "cfghost"
    assert s.ports == list(range(30000, 30012))
    assert (s.scheme, s.ping, s.db) == ("twobin", 500, "none")


def test_ipyparallel_config_names(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        "c.IPController.ip = '10.0.0.1'\n"
        "c.HeartMonitor.period = 750\n"
        "c.TaskScheduler.scheme_name = 'weighted'\n",
    )
    s, _ = app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    assert (s.ip, s.ping, s.scheme) == ("10.0.0.1", 750, "weighted")


def test_ipyparallels_config_file_of_the_profile_is_read_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A profile moved over from ipyparallel keeps its controller settings: its
    ipcontroller_config.py is read (ours wins), and settings we do not use are named."""
    (tmp_path / config.IPP_CONFIG_FILENAME).write_text(
        "c.IPController.ip = '10.0.0.2'\n"
        "c.HeartMonitor.period = 700\n"
        "c.IPController.use_threads = True\n"
    )
    with caplog.at_level("WARNING", logger="ferroparallel.controller"):
        s, loaded = app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    assert loaded == tmp_path / config.IPP_CONFIG_FILENAME
    assert (s.ip, s.ping) == ("10.0.0.2", 700)
    assert "IPController.use_threads" in caplog.text
    write_config(tmp_path, "c.Controller.ping = 900\n")
    s, loaded = app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    assert loaded == tmp_path / config.CONFIG_FILENAME
    assert (s.ip, s.ping) == ("10.0.0.2", 900)


def test_ipyparallel_command_line_options(tmp_path: Path) -> None:
    """ipcontroller's traitlets-style options work as on ipyparallel; ours win over them, and
    options we do not implement are ignored with a warning (as traitlets does)."""
    rest, known, ignored = config.split_trait_args(
        [
            "--TaskScheduler.hwm=0",
            "--TaskScheduler.scheme_name",
            "pure",
            "--IPController.ip='0.0.0.0'",
            "--HubFactory.db_class=ipyparallel.controller.dictdb.NoDB",
            "--Session.debug=True",
            "--ping",
            "500",
        ]
    )
    assert rest == ["--ping", "500"] and ignored == ["Session.debug"]
    args = app.build_parser().parse_args(rest)
    args.trait_settings = known
    s, _ = app.resolve_settings(args, tmp_path)
    assert (s.hwm, s.scheme, s.ip, s.db, s.ping) == (0, "lru", "0.0.0.0", "none", 500)
    args = app.build_parser().parse_args(["--hwm", "3"])
    args.trait_settings = {"hwm": "0"}
    assert app.resolve_settings(args, tmp_path)[0].hwm == 3  # our option wins
    with pytest.raises(config.ConfigError, match="needs a value"):
        config.split_trait_args(["--TaskScheduler.hwm"])
    with pytest.raises(config.ConfigError, match="not supported"):
        config.ControllerSettings().update({"scheme": "none"}, "command line")


def test_a_port_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    args = app.build_parser().parse_args(["--port", "99999"])
    with pytest.raises(config.ConfigError, match="at most 65535"):
        app.resolve_settings(args, tmp_path)


def test_bad_config_values_name_the_source(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "c.Controller.scheme = 'fastest'\n")
    with pytest.raises(config.ConfigError, match=re.escape(str(cfg))):
        app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    cfg = write_config(tmp_path, "c.Controller.colour = 'blue'\n")
    with pytest.raises(config.ConfigError, match="colour"):
        app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    cfg = write_config(tmp_path, "this is not python\n")
    with pytest.raises(config.ConfigError, match=re.escape(str(cfg))):
        app.resolve_settings(app.build_parser().parse_args([]), tmp_path)
    with pytest.raises(config.ConfigError, match="command line"):
        app.resolve_settings(app.build_parser().parse_args(["--db", "mongo"]), tmp_path / "x")


def test_explicit_config_file_option(tmp_path: Path) -> None:
    other = tmp_path / "my_config.py"
    other.write_text("c.Controller.hwm = 4\n")
    s, loaded = app.resolve_settings(
        app.build_parser().parse_args(["--config", str(other)]), tmp_path
    )
    assert loaded == other and s.hwm == 4
    with pytest.raises(config.ConfigError, match="missing.py"):
        app.resolve_settings(
            app.build_parser().parse_args(["--config", str(tmp_path / "missing.py")]), tmp_path
        )


def test_rust_config(tmp_path: Path) -> None:
    s = config.ControllerSettings(ping=250, hwm=2, db="sqlite", restore=True)
    req = s.requested_ports()
    cfg = app.rust_config(s, "k" * 64, req, tmp_path, "cid")
    assert cfg["key"] == b"k" * 64
    assert cfg["hb_period_ms"] == 250 and cfg["hwm"] == 2 and cfg["restore"] is True
    assert cfg["db"] == "sqlite" and cfg["db_path"] == str(tmp_path / "tasks-cid.db")
    assert cfg["engine_state_file"] == str(tmp_path / "log" / "enginescid.json")
    assert set(cfg["ports"]) == set(config.ENGINE_CHANNELS + config.CLIENT_CHANNELS)
    assert "hwm" not in app.rust_config(config.ControllerSettings(), "k", req, tmp_path, "")


def test_connection_dicts_keys() -> None:
    s = config.ControllerSettings()
    ports = {ch: 40000 + i for i, ch in enumerate(config.ALL_CHANNELS)}
    key = connection.new_key()
    assert re.fullmatch("[0-9a-f]{64}", key) and key != connection.new_key()
    client = connection.client_info(s, key, ports)
    engine = connection.engine_info(s, key, ports)
    assert set(client) == CLIENT_KEYS and set(engine) == ENGINE_KEYS
    assert client["registration"] == engine["registration"] == ports["registration"]
    assert client["mux"] == ports["mux_client"] and engine["mux"] == ports["mux_engine"]
    assert (client["pack"], client["unpack"], client["signature_scheme"]) == (
        "msgpack",
        "msgpack",
        "hmac-sha256",
    )
    assert client["interface"] == "tcp://127.0.0.1" and client["curve_serverkey"] is None


def test_missing_controller_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_core, "Controller", raising=False)
    assert app.main(["--cluster-id", "nothere"]) == 1


def test_bad_option_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        app.main(["--ping", "notanumber"])
    assert exc.value.code == 2
    assert app.main(["--scheme", "fastest"]) == 1
    assert "fastest" in capsys.readouterr().err


# -- the real controller process -----------------------------------------------------------------


@needs_controller
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_files_written_and_removed(
    procs: list[subprocess.Popen[bytes]], fp_root: Path, sig: signal.Signals
) -> None:
    pdir = fp_root / "profile_default"
    cf, ef = files(pdir, "t1")
    p = start_controller(procs, "--cluster-id", "t1")
    wait_files(p, cf, ef)
    for f in (cf, ef):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    client = paths.load_connection_file(cf, "client")
    engine = paths.load_connection_file(ef, "engine")
    # ferroparallel's same-host Unix sockets (ferroparallel.ipc) come on top of the TCP ports
    assert set(client) == CLIENT_KEYS | {"fp_ipc"}
    assert set(engine) == ENGINE_KEYS | {"fp_ipc"}
    # (and the link endpoint of decision 0017, the same in both files)
    assert set(client["fp_ipc"]) == {"host", "fp_link", *(CLIENT_KEYS & set(client["fp_ipc"]))}
    assert client["fp_ipc"]["fp_link"] == engine["fp_ipc"]["fp_link"]
    assert all(u.startswith("ipc://@fp-") for k, u in engine["fp_ipc"].items() if k != "host")
    assert re.fullmatch("[0-9a-f]{64}", client["key"])
    assert client["key"] == engine["key"]
    assert client["registration"] == engine["registration"]
    assert client["pack"] == engine["pack"] == "msgpack"
    assert client["interface"] == "tcp://127.0.0.1"
    ports = [client[k] for k in ("registration", "control", "mux", "task", "iopub", "notification")]
    ports += [engine[k] for k in ("control", "mux", "task", "iopub", "hb_ping", "hb_pong")]
    assert len(set(ports)) == 12 and all(isinstance(x, int) and x > 0 for x in ports)
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err.decode()
    assert not cf.exists() and not ef.exists()
    assert out == b""


@needs_controller
def test_fresh_key_per_run_and_unnamed_cluster(
    procs: list[subprocess.Popen[bytes]], fp_root: Path
) -> None:
    pdir = fp_root / "profile_work"
    cf, ef = files(pdir)
    assert cf.name == "ipcontroller-client.json"
    keys = []
    for _ in range(2):
        p = start_controller(procs, "--profile", "work")
        wait_files(p, cf, ef)
        keys.append(paths.load_connection_file(cf)["key"])
        p.terminate()
        p.communicate(timeout=20)
        assert not cf.exists()
    assert keys[0] != keys[1]


@needs_controller
def test_config_file_honoured_and_cli_overrides(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    pdir = tmp_path / "prof"
    write_config(
        pdir,
        "c.Controller.scheme = 'lru'\n"
        "c.Controller.location = 'cfghost'\n"
        "c.Controller.ping = 500\n"
        "c.Controller.pack = 'json'\n",
    )
    cf, ef = files(pdir, "cfg")
    p = start_controller(
        procs, "--profile-dir", str(pdir), "--cluster-id", "cfg", "--location", "clihost"
    )
    wait_files(p, cf, ef)
    client = paths.load_connection_file(cf)
    assert client["task_scheme"] == "lru"  # from the config file
    assert client["location"] == "clihost"  # the command line wins
    assert client["pack"] == client["unpack"] == "json"
    p.terminate()
    p.communicate(timeout=20)
    assert p.returncode == 0


@needs_controller
@pytest.mark.parametrize("how", ["cli", "ipp-config"])
def test_ssh_servers_for_clients_and_engines(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path, how: str
) -> None:
    """As ipcontroller's: ``--ssh`` (``IPController.ssh_server``) goes into the client file
    only and ``--enginessh`` (``IPController.engine_ssh_server``) into the engine file only, so
    that engines on a private network do not tunnel through the clients' login node."""
    pdir = tmp_path / "prof"
    pdir.mkdir()
    args = ["--profile-dir", str(pdir), "--cluster-id", "s"]
    if how == "cli":
        args += ["--ssh", "me@login.example", "--enginessh", "node1"]
    else:
        (pdir / config.IPP_CONFIG_FILENAME).write_text(
            "c.IPController.ssh_server = 'me@login.example'\n"
            "c.IPController.engine_ssh_server = 'node1'\n"
        )
    cf, ef = files(pdir, "s")
    p = start_controller(procs, *args)
    wait_files(p, cf, ef)
    assert paths.load_connection_file(cf, "client")["ssh"] == "me@login.example"
    assert paths.load_connection_file(ef, "engine")["ssh"] == "node1"
    p.terminate()
    p.communicate(timeout=20)
    if how == "cli":  # only --ssh: the engines connect directly
        p = start_controller(procs, "--profile-dir", str(pdir), "--ssh", "me@login.example")
        cf, ef = files(pdir)
        wait_files(p, cf, ef)
        assert paths.load_connection_file(cf, "client")["ssh"] == "me@login.example"
        assert paths.load_connection_file(ef, "engine")["ssh"] == ""
        p.terminate()
        p.communicate(timeout=20)


def _free_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1 right now (the OS picks them)."""
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    out = sorted(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    return out


@needs_controller
def test_ports_pool(procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    pool = _free_ports(14)  # one per channel, free now: the pool
    pdir = tmp_path / "prof"
    cf, ef = files(pdir)
    p = start_controller(procs, "--profile-dir", str(pdir), "--ports", ",".join(map(str, pool)))
    wait_files(p, cf, ef)
    client = paths.load_connection_file(cf, "client")
    engine = paths.load_connection_file(ef, "engine")
    assert client["registration"] == pool[0]
    assert engine["control"] == pool[1]
    used = {client[k] for k in ("registration", "control", "mux", "task", "iopub", "notification")}
    used |= {engine[k] for k in ("control", "mux", "task", "iopub", "hb_ping", "hb_pong")}
    used |= {client["broadcast"], *engine["broadcast"]}
    assert used == set(pool)
    p.terminate()
    p.communicate(timeout=20)


@needs_controller
def test_engine_and_client_port_pools(procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """ipcontroller's ``IPController.engine_ports`` / ``client_ports``: what engines connect to
    (registration included) comes from the first pool, what only clients use from the second;
    ``HubFactory.*`` (ipyparallel's old section) applies where ``IPController`` is silent."""
    free = _free_ports(14)
    engine_pool, client_pool = free[:8], free[8:]
    pdir = tmp_path / "prof"
    pdir.mkdir()
    (pdir / config.IPP_CONFIG_FILENAME).write_text(
        f"c.IPController.engine_ports = {engine_pool!r}\n"
        f"c.IPController.client_ports = {client_pool!r}\n"
        "c.HubFactory.location = 'oldname.example'\n"
        "c.HubFactory.ip = '10.255.255.1'\n"
        "c.IPController.ip = '127.0.0.1'\n"
    )
    cf, ef = files(pdir)
    p = start_controller(procs, "--profile-dir", str(pdir))
    wait_files(p, cf, ef)
    client = paths.load_connection_file(cf, "client")
    engine = paths.load_connection_file(ef, "engine")
    engine_used = {engine[k] for k in ("registration", "control", "mux", "task", "iopub")}
    engine_used |= {engine["hb_ping"], engine["hb_pong"], *engine["broadcast"]}
    client_used = {client[k] for k in ("control", "mux", "task", "iopub", "notification")}
    client_used.add(client["broadcast"])
    assert engine_used == set(engine_pool)
    assert client_used == set(client_pool)
    assert client["registration"] == engine_pool[0]
    assert client["location"] == engine["location"] == "oldname.example"
    assert client["interface"] == "tcp://127.0.0.1"  # IPController wins over HubFactory
    p.terminate()
    p.communicate(timeout=20)


@needs_controller
@pytest.mark.parametrize("how", ["config", "cli", "keyfile"])
def test_session_key_of_ipyparallel_config(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path, how: str
) -> None:
    """ipyparallel's ``Session.key`` (bytes in a config file, or ``--Session.key=...``) and
    ``Session.keyfile`` set the HMAC key written to both connection files."""
    pdir = tmp_path / "prof"
    pdir.mkdir()
    secret = "a-configured-key-of-forty-characters-long"
    args = ["--profile-dir", str(pdir)]
    if how == "config":
        (pdir / config.IPP_CONFIG_FILENAME).write_text(f"c.Session.key = {secret.encode()!r}\n")
    elif how == "cli":
        args.append(f"--Session.key={secret}")
    else:
        (tmp_path / "keyfile").write_text(secret + "\n")
        (pdir / config.IPP_CONFIG_FILENAME).write_text(
            f"c.Session.keyfile = {str(tmp_path / 'keyfile')!r}\n"
        )
    cf, ef = files(pdir)
    p = start_controller(procs, *args)
    wait_files(p, cf, ef)
    assert paths.load_connection_file(cf)["key"] == secret
    assert paths.load_connection_file(ef)["key"] == secret
    p.terminate()
    p.communicate(timeout=20)


def test_port_pools_fall_back_to_the_common_pool() -> None:
    s = config.ControllerSettings(
        engine_ports=[20000, 20001], client_ports=[21000], ports=list(range(22000, 22020))
    )
    req = s.requested_ports()
    assert req["registration"] == 20000 and req["control_engine"] == 20001
    assert req["mux_engine"] == 22000  # engine pool exhausted: the common one
    assert req["control_client"] == 21000
    assert len(set(req.values())) == len(req)
    rest, known, ignored = config.split_trait_args(
        ["--IPController.engine_ports=15000-15007", "--HubFactory.ip=0.0.0.0"]
    )
    assert (rest, ignored) == ([], [])
    assert known == {"engine_ports": "15000-15007", "ip": "0.0.0.0"}


@needs_controller
def test_reuse_keeps_key_and_ports(procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    pdir = tmp_path / "prof"
    cf, ef = files(pdir, "r")
    p = start_controller(procs, "--profile-dir", str(pdir), "--cluster-id", "r", "--reuse")
    wait_files(p, cf, ef)
    first = (paths.load_connection_file(cf), paths.load_connection_file(ef))
    p.terminate()
    p.communicate(timeout=20)
    assert cf.exists() and ef.exists()  # kept with --reuse
    p = start_controller(procs, "--profile-dir", str(pdir), "--cluster-id", "r", "--reuse")
    deadline = time.monotonic() + 20
    while p.poll() is None and time.monotonic() < deadline:
        # The files already exist: wait until the controller answers on them.
        from ferroparallel.cluster._hub import registered_engines

        if registered_engines(first[0], timeout=0.5) is not None:
            break
    second = (paths.load_connection_file(cf), paths.load_connection_file(ef))
    assert second == first
    # the reused files' broadcast ports are the ones the new controller listens on
    import socket

    for port in (first[0]["broadcast"], *first[1]["broadcast"]):
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", port))
    p.terminate()
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err.decode()
    # Without --reuse, a new key is used and the files are removed at exit.
    p = start_controller(procs, "--profile-dir", str(pdir), "--cluster-id", "r")
    deadline = time.monotonic() + 20
    while paths.load_connection_file(cf)["key"] == first[0]["key"]:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.01)
    p.terminate()
    p.communicate(timeout=20)
    assert not cf.exists()


@needs_controller
def test_hub_answers_connection_request(
    procs: list[subprocess.Popen[bytes]], fp_root: Path
) -> None:
    from ferroparallel.cluster._hub import registered_engines

    pdir = fp_root / "profile_default"
    cf, ef = files(pdir, "q")
    p = start_controller(procs, "--cluster-id", "q")
    wait_files(p, cf, ef)
    assert registered_engines(paths.load_connection_file(cf), timeout=5) == {}
    p.terminate()
    p.communicate(timeout=20)


@needs_controller
def test_start_failure_reported(procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    busy = s.getsockname()[1]
    try:
        pdir = tmp_path / "prof"
        p = start_controller(procs, "--profile-dir", str(pdir), "--port", str(busy))
        _, err = p.communicate(timeout=20)
    finally:
        s.close()
    assert p.returncode == 1
    assert b"failed to start" in err
    assert not any(paths.security_dir(pdir).glob("ipcontroller*"))


@needs_controller
@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_dispatcher_runs_controller(
    procs: list[subprocess.Popen[bytes]], fp_root: Path, sigint_ignored: bool
) -> None:
    """``ferroparallel controller`` stops cleanly on SIGINT, also when started with SIGINT
    ignored (``ipcontroller &`` in a shell script), as ipcontroller (which installs its own
    handler)."""
    pdir = fp_root / "profile_default"
    cf, ef = files(pdir, "bg" if sigint_ignored else "d")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferroparallel",
            "controller",
            "--cluster-id",
            "bg" if sigint_ignored else "d",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )
    procs.append(p)
    wait_files(p, cf, ef)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0 and not cf.exists() and not ef.exists()
    assert not sigint_ignored or b"SIGINT received" in err


def test_dispatcher_usage() -> None:
    from ferroparallel.__main__ import main

    assert main(["--help"]) == 0
    assert main(["nosuchcommand"]) == 2
    assert main([]) == 2
    r = subprocess.run(
        [sys.executable, "-m", "ferroparallel", "controller", "--help"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0 and b"--profile-dir" in r.stdout and b"--ping" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ferroparallel", "cluster", "start", "--help"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0 and b"--daemonize" in r.stdout


@pytest.mark.parametrize(
    "command", [["cluster"], ["cluster", "start"], ["cluster", "list"], ["engine"], ["controller"]]
)
def test_commands_print_their_version(command: list[str]) -> None:
    """As ``ipcluster/ipengine/ipcontroller --version``: the bare version on stdout, status 0."""
    import ferroparallel

    r = subprocess.run(
        [sys.executable, "-m", "ferroparallel", *command, "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ferroparallel.__version__


def test_dispatcher_runs_engine_help() -> None:
    try:
        import ferroparallel.engine.app  # noqa: F401
    except ImportError:
        pytest.skip("the engine is not available")
    r = subprocess.run(
        [sys.executable, "-m", "ferroparallel", "engine", "--help"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert b"--profile-dir" in r.stdout


def test_console_script() -> None:
    exe = shutil.which("ferroparallel")
    if exe is None:
        pytest.skip("ferroparallel is not installed as a command (source checkout)")
    r = subprocess.run([exe, "--help"], capture_output=True, timeout=30)
    assert r.returncode == 0 and b"controller" in r.stdout and b"cluster" in r.stdout


def test_controller_start_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from ferroparallel.controller import app\n"
        "app.build_parser()\n"
        "bad = [m for m in ('IPython', 'traitlets', 'numpy', 'zmq', 'asyncio') "
        "if m in sys.modules]\n"
        "print(bad)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=30, env={**os.environ}
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.decode().replace("'", '"')) == []


def test_hwm_budget_settings() -> None:
    """The adaptive queue budget: default from the controller, 0 under an explicit --hwm
    unless given too, validated."""
    req = config.ControllerSettings().requested_ports()
    cfg = app.rust_config(config.ControllerSettings(), "k", req, Path("/tmp"), "")
    assert "hwm_budget_ms" not in cfg
    cfg = app.rust_config(config.ControllerSettings(hwm=1), "k", req, Path("/tmp"), "")
    assert cfg["hwm"] == 1 and cfg["hwm_budget_ms"] == 0.0
    s = config.ControllerSettings(hwm=1, hwm_budget=5)
    assert app.rust_config(s, "k", req, Path("/tmp"), "")["hwm_budget_ms"] == 5
    s = config.ControllerSettings()
    s.update({"hwm_budget": "0.5"}, "test")
    assert s.hwm_budget == 0.5
    with pytest.raises(config.ConfigError, match="hwm_budget"):
        s.update({"hwm_budget": "-1"}, "test")


def test_controller_refuses_a_bad_hwm_budget() -> None:
    """The Rust controller names the setting and the rule when the budget is not a number >= 0."""
    from ferroparallel import _core

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="hwm_budget_ms must be a number >= 0"):
            _core.Controller({"hwm_budget_ms": bad, "key": b"k"})
