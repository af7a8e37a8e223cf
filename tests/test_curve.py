"""CurveZMQ: an encrypted cluster works, peers without the server key are kept out (quickly and
with a clear message), and nothing readable crosses the wire.

Everything runs for real: controller and engine processes, the ferroparallel Client, and a TCP
relay (threads in this process) that records every byte between the peers and the controller.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ferroparallel as ipp
from cluster_util import ENGINE_PORTS, LOCALHOST, start_controller, stop_popen, wait_until
from ferroparallel import _core
from ferroparallel import curve as fpcurve
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster

#: Markers that must be visible in clear text without CURVE and never with it.
PUSH_MARKER = b"FERRO-SECRET-MARKER" * 100
APPLY_MARKER = "ferro-apply-marker-7f3a9c"
CLIENT_CHANNELS = ("registration", "control", "mux", "task", "iopub", "notification")
SHORT = 30.0


# -- a recording TCP relay ----------------------------------------------------------------------


class TcpRelay:
    """Listen on a free 127.0.0.1 port and forward every connection to ``target_port``,
    recording the bytes of both directions (in arrival order, per direction)."""

    def __init__(self, target_port: int) -> None:
        self.target = (LOCALHOST, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOCALHOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.upstream = bytearray()  # peer -> controller
        self.downstream = bytearray()  # controller -> peer
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            conn.settimeout(None)
            with self.lock:
                self.sockets += [conn, up]
            for src, dst, buf in ((conn, up, self.upstream), (up, conn, self.downstream)):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def captured(self) -> bytes:
        with self.lock:
            return bytes(self.upstream) + b"\n--\n" + bytes(self.downstream)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            socks = list(self.sockets)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(2)


def relayed(info: dict[str, Any], keys: tuple[str, ...], relays: list[TcpRelay]) -> dict[str, Any]:
    """A copy of connection info whose ports in ``keys`` go through new relays."""
    out = dict(info)
    out.pop("fp_ipc", None)  # over TCP, through the relays (not the same-host Unix sockets)
    out["interface"] = f"tcp://{LOCALHOST}"
    for k in keys:
        r = TcpRelay(int(info[k]))
        relays.append(r)
        out[k] = r.port
    return out


def start_engine(info: dict[str, Any], workdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """An engine process for connection ``info`` (written to a 0600 file); log in ``workdir``."""
    f = workdir / f"engine-{time.monotonic_ns()}.json"
    f.write_text(json.dumps(info))
    os.chmod(f, 0o600)
    log = workdir / f"{f.stem}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "ferroparallel.engine", "--file", str(f), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return p, log


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Client]]:
    """A 2-engine cluster with ``curve=True`` and a client connected to it."""
    root = tmp_path_factory.mktemp("curve-root")
    old = os.environ.get("FERROPARALLEL_DIR")
    os.environ["FERROPARALLEL_DIR"] = str(root)
    cluster = Cluster(n=2, curve=True, controller_args=["--ping", "200"], cluster_id="curve")
    rc: Client | None = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=SHORT)
        yield cluster, rc
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
        if old is None:
            os.environ.pop("FERROPARALLEL_DIR", None)
        else:
            os.environ["FERROPARALLEL_DIR"] = old


# -- tests --------------------------------------------------------------------------------------


def test_curve_is_available() -> None:
    assert _core.has_curve()
    public, secret = fpcurve.keypair()
    assert len(public) == len(secret) == 40 and public != secret
    assert fpcurve.public_key(secret) == public
    with pytest.raises(ValueError, match="Z85"):
        fpcurve.check_key("x" * 39, "test key")


def test_connection_files_carry_only_the_public_key(curve_cluster: tuple[Cluster, Client]) -> None:
    cluster, rc = curve_cluster
    client = json.loads(cluster.client_file.read_text())
    engine = json.loads(cluster.engine_file.read_text())
    key = client["curve_serverkey"]
    assert isinstance(key, str) and len(key) == 40
    assert engine["curve_serverkey"] == key
    assert not any("secret" in k for k in (*client, *engine))
    assert rc._curve


def test_curve_cluster_runs_work(curve_cluster: tuple[Cluster, Client]) -> None:
    _, rc = curve_cluster
    dv = rc[:]
    assert dv.apply_sync(lambda x: x * 2, 21) == [42, 42]
    dv.push({"payload": PUSH_MARKER, "n": 7}, block=True)
    assert dv.pull("payload", block=True) == [PUSH_MARKER, PUSH_MARKER]
    dv.execute("m = n * 6", block=True)
    assert dv.pull("m", block=True) == [42, 42]
    lv = rc.load_balanced_view()
    assert lv.map_sync(lambda x: x**2, range(10)) == [x**2 for x in range(10)]
    ar = dv.apply_async(lambda: 1)
    assert ar.get(timeout=SHORT) == [1, 1]
    assert rc.queue_status()["unassigned"] == 0


def test_client_curve_keywords_and_traits(curve_cluster: tuple[Cluster, Client]) -> None:
    """ipyparallel's Client takes curve_serverkey/publickey/secretkey as keywords (traits)."""
    cluster, _ = curve_cluster
    info = json.loads(cluster.client_file.read_text())
    serverkey = info.pop("curve_serverkey")
    public, secret = fpcurve.keypair()
    with Client(
        info, timeout=SHORT, curve_serverkey=serverkey.encode(), curve_secretkey=secret
    ) as rc:
        assert rc.curve_serverkey == serverkey.encode()
        assert (rc.curve_publickey, rc.curve_secretkey) == (public.encode(), secret.encode())
        assert {"curve_serverkey", "curve_publickey", "curve_secretkey"} <= set(rc.trait_names())
        assert rc[0].apply_sync(lambda: 5) == 5
    with pytest.raises(ValueError, match="does not belong"):
        Client(info, curve_serverkey=serverkey, curve_secretkey=secret, curve_publickey=serverkey)
    with pytest.raises(ValueError, match="need a server key"):
        Client(info, curve_secretkey=secret)
    with pytest.raises(ValueError, match="Z85"):
        Client(info, curve_serverkey="short")


@pytest.mark.parametrize("variant", ["no server key", "wrong server key"])
def test_client_without_the_server_key_cannot_connect(
    curve_cluster: tuple[Cluster, Client], variant: str
) -> None:
    cluster, _ = curve_cluster
    info = json.loads(cluster.client_file.read_text())
    if variant == "no server key":
        info.pop("curve_serverkey")
        expected = "mechanism mismatch"
    else:
        info["curve_serverkey"] = fpcurve.keypair()[0]
        expected = "curve_serverkey is probably wrong"
    start = time.monotonic()
    with pytest.raises(TimeoutError) as exc:
        Client(info, timeout=3)
    elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed
    text = str(exc.value)
    assert "timed out" in text and expected in text, text


def test_engine_without_the_server_key_exits(
    curve_cluster: tuple[Cluster, Client], tmp_path: Path
) -> None:
    cluster, rc = curve_cluster
    info = json.loads(cluster.engine_file.read_text())
    info.pop("curve_serverkey")
    before = len(rc.ids)
    p, log = start_engine(info, tmp_path, "--timeout", "3")
    try:
        assert p.wait(30) == 1
    finally:
        stop_popen(p)
    text = log.read_text()
    # it gives up before registering: its shell/control connections never come up
    assert "could not connect to the controller" in text and "mechanism mismatch" in text, text
    assert len(rc.ids) == before


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_no_plaintext_on_the_wire(fp_root: Path, tmp_path: Path, curve: bool) -> None:
    """Client and engine reach the controller only through recording relays; the pushed bytes
    and the applied string are readable in the capture without CURVE, and absent with it."""
    ctl = start_controller(fp_root / "profile_wire", *(["--curve"] if curve else ["--no-curve"]))
    relays: list[TcpRelay] = []
    engine = None
    rc = None
    try:
        assert bool(ctl.client["curve_serverkey"]) == curve
        einfo = relayed(ctl.engine, ENGINE_PORTS, relays)
        cinfo = relayed(ctl.client, CLIENT_CHANNELS, relays)
        engine, elog = start_engine(einfo, tmp_path)
        rc = ipp.Client(cinfo, timeout=SHORT)
        wait_until(lambda: rc.ids, SHORT, f"the engine to register (log: {elog})")
        dv = rc[:]
        dv.push({"payload": PUSH_MARKER}, block=True)
        assert dv.pull("payload", block=True) == [PUSH_MARKER]
        assert dv.apply_sync(lambda s: s + "!", APPLY_MARKER) == [APPLY_MARKER + "!"]
        lv = rc.load_balanced_view()
        assert lv.apply_sync(lambda s: s[::-1], APPLY_MARKER) == APPLY_MARKER[::-1]
    finally:
        if rc is not None:
            rc.close()
        if engine is not None:
            stop_popen(engine)
        ctl.stop()
        for r in relays:
            r.close()
    wire = b"".join(r.captured() for r in relays)
    # The relays carried the whole conversation (both payloads, in some form).
    assert len(wire) > 4 * len(PUSH_MARKER), len(wire)
    markers = (PUSH_MARKER[:40], APPLY_MARKER.encode(), APPLY_MARKER[::-1].encode())
    found = {m: m in wire for m in markers}
    if curve:
        assert not any(found.values()), found
        assert b"FERRO-SECRET" not in wire
    else:
        assert all(found.values()), found


def test_cluster_curve_flag_and_env(
    monkeypatch: pytest.MonkeyPatch, fp_root: Path, tmp_path: Path
) -> None:
    assert "--curve" in Cluster(curve=True, cluster_id="a")._controller_argv()
    assert "--no-curve" in Cluster(curve=False, cluster_id="b")._controller_argv()
    assert not any("curve" in a for a in Cluster(cluster_id="c")._controller_argv())
    assert Cluster.from_dict(Cluster(curve=True, cluster_id="d").to_dict()).curve is True
    # $IPP_ENABLE_CURVE turns it on for a controller started without flags, and a configured
    # secret key ($IPP_CURVE_SECRETKEY) fixes the public key written to the files.
    public, secret = fpcurve.keypair()
    monkeypatch.setenv("IPP_ENABLE_CURVE", "1")
    monkeypatch.setenv("IPP_CURVE_SECRETKEY", secret)
    ctl = start_controller(fp_root / "profile_env")
    try:
        assert ctl.client["curve_serverkey"] == public == ctl.engine["curve_serverkey"]
        assert secret not in ctl.client_file.read_text() + ctl.engine_file.read_text()
    finally:
        ctl.stop()
    monkeypatch.delenv("IPP_CURVE_SECRETKEY")
    ctl = start_controller(fp_root / "profile_env_off", "--no-curve")
    try:
        assert ctl.client["curve_serverkey"] is None
    finally:
        ctl.stop()


# -- settings, connection files, validation (no processes) ---------------------------------------


def test_controller_settings_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferroparallel.controller import app, config

    for var in (*fpcurve.ENABLE_ENV_VARS, fpcurve.SECRETKEY_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    public, secret = fpcurve.keypair()
    cfg = tmp_path / "ferroparallel_controller_config.py"
    cfg.write_text(
        "c = get_config()\n"
        "c.IPController.enable_curve = True\n"
        f"c.IPController.curve_secretkey = b'{secret}'\n"
        f"c.IPController.curve_publickey = '{public}'\n"
    )
    args = app.build_parser().parse_args(["--config", str(cfg)])
    settings, _ = app.resolve_settings(args, tmp_path)
    assert settings.curve and app.curve_keys(settings) == (public, secret)
    # --no-curve beats the config file; the environment is below the config file.
    args = app.build_parser().parse_args(["--config", str(cfg), "--no-curve"])
    assert app.curve_keys(app.resolve_settings(args, tmp_path)[0]) is None
    monkeypatch.setenv("IPP_ENABLE_CURVE", "0")
    args = app.build_parser().parse_args([])
    assert not app.resolve_settings(args, tmp_path / "none")[0].curve
    monkeypatch.setenv("FERROPARALLEL_CURVE", "yes")
    settings = app.resolve_settings(args, tmp_path / "none")[0]
    fresh = app.curve_keys(settings)
    assert fresh is not None and fresh[0] != public
    # A public key that does not belong to the secret key, and a malformed key, are refused.
    other_public, _ = fpcurve.keypair()
    settings.update({"curve_secretkey": secret, "curve_publickey": other_public}, "test")
    with pytest.raises(config.ConfigError, match="does not belong"):
        app.curve_keys(settings)
    with pytest.raises(config.ConfigError, match="Z85"):
        settings.update({"curve_secretkey": "not-a-key"}, "test")
    rust = app.rust_config(settings, "k" * 64, {}, tmp_path, "", curve_secretkey=secret)
    assert rust["curve_secretkey"] == secret
    ctl = _core.Controller(rust)  # accepted by the Rust side (not started)
    assert ctl is not None
    with pytest.raises(ValueError, match="CURVE key"):
        _core.Controller({**rust, "curve_secretkey": "short"})


def test_reuse_needs_the_same_server_key(tmp_path: Path) -> None:
    from ferroparallel.controller import config, connection

    settings = config.ControllerSettings()
    ports = {ch: 10000 + i for i, ch in enumerate(config.ALL_CHANNELS)}
    public, _ = fpcurve.keypair()
    cf, ef = tmp_path / "c.json", tmp_path / "e.json"
    connection.write_files(
        cf,
        ef,
        connection.client_info(settings, "k" * 64, ports, public),
        connection.engine_info(settings, "k" * 64, ports, public),
    )
    assert json.loads(cf.read_text())["curve_serverkey"] == public
    assert connection.reusable_files(settings, cf, ef, public) is not None
    assert connection.reusable_files(settings, cf, ef, fpcurve.keypair()[0]) is None
    assert connection.reusable_files(settings, cf, ef, None) is None


def test_bad_curve_serverkey_in_connection_info_is_refused(tmp_path: Path) -> None:
    from ferroparallel import paths
    from ferroparallel.engine.connection import validate
    from ferroparallel.error import ConnectionFileError

    info = {
        "interface": "tcp://127.0.0.1",
        "key": "k",
        **{k: 10000 + i for i, k in enumerate(ENGINE_PORTS)},
        "notification": 10010,
        "curve_serverkey": "0" * 41,
    }
    with pytest.raises(ConnectionFileError, match="curve_serverkey"):
        validate(info, "test info")
    with pytest.raises(ConnectionFileError, match="curve_serverkey"):
        paths.validate_connection_info(info, "test info", "client")
    with pytest.raises(ConnectionFileError, match="curve_serverkey"):
        Client({**info, "curve_serverkey": "x" * 39 + "\u00e9"}, timeout=1)
    assert validate({**info, "curve_serverkey": None}, "ok")["curve_serverkey"] is None


def test_a_hang_up_during_the_handshake_is_described_by_which_side_uses_curve() -> None:
    """libzmq reports a plain peer refused by a CURVE server as a mechanism mismatch or as a
    bare hang-up, whichever it sees first: without CURVE the hang-up names the missing key."""
    hang_up = [("query", "tcp://127.0.0.1:1", fpcurve._PEER_CLOSED + "; with CurveZMQ ...")]
    plain = fpcurve.describe_handshake_failures(hang_up, curve=False)
    assert "mechanism mismatch" in plain and "curve_serverkey is missing" not in plain
    assert "curve_serverkey missing from the connection info" in plain
    with_curve = fpcurve.describe_handshake_failures(hang_up, curve=True)
    assert "mechanism mismatch" not in with_curve and "with CurveZMQ" in with_curve
    assert fpcurve.describe_handshake_failures([], curve=False) == ""
