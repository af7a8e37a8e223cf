"""Message signing and connection-file hygiene.

- Keys: a fresh random 256-bit key per controller; running without a key only with
  ``--no-key``, which logs a WARNING, as does an empty key in a connection file.
- Every process verifies the HMAC before it unpickles anything: a forged message whose pickled
  payload would create a marker file when unpickled is sent to an engine, to a client and to a
  controller, signed with the wrong key, unsigned, with a garbage signature, or tampered after
  signing. The marker must never appear, and a properly signed request still works afterwards.
- Replays of a signed request are executed once.
- Connection files looser than 0600 (and security directories looser than 0700) are warned
  about on load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from cluster_util import start_controller, stop_popen, wait_until
from ferroparallel import _core, paths
from ferroparallel.client import Client
from ferroparallel.controller.connection import new_key
from ferroparallel.engine.connection import load_connection_info
from ferroparallel.error import MessageError
from ferroparallel.serialize import pack_apply_message, serialize_object
from test_engine_unit import KEY, EngineProcess, FakeController

pytestmark = pytest.mark.timeout(120)

WAIT = 10.0


class Evil:
    """Unpickling an ``Evil`` creates ``path`` (the marker that must never appear)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def forged_variants(
    good: _core.Session, msg_type: str, ident: list[bytes], buffers: list[Any], **kw: Any
) -> dict[str, list[Any]]:
    """The same message made invalid in every way a forger might try."""
    wrong = _core.Session(b"not-the-key-" + os.urandom(8), packer="msgpack")
    out: dict[str, list[Any]] = {}
    out["wrong key"] = wrong.serialize(msg_type, {}, ident=ident, buffers=buffers, **kw)
    sig = len(ident) + 1
    frames = [bytes(f) for f in good.serialize(msg_type, {}, ident=ident, buffers=buffers, **kw)]
    unsigned = list(frames)
    unsigned[sig] = b""
    out["unsigned"] = unsigned
    garbage = list(frames)
    garbage[sig] = b"0" * 64
    out["garbage signature"] = garbage
    tampered = list(frames)
    tampered[sig + 4] = good.pack({"tampered": True})
    out["tampered content"] = tampered
    upper = list(frames)
    upper[sig] = frames[sig].upper()
    out["uppercase signature"] = upper
    return out


# ----- keys ---------------------------------------------------------------------------------


def test_new_key_is_random_and_256_bit() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for k in keys:
        assert len(k) == 64 and int(k, 16) >= 0  # 32 random bytes as hex


def _controller_log(ctl: Any) -> str:
    return ctl.log_file.read_text(errors="replace")


def test_controller_key_file_modes_and_fresh_keys(tmp_path: Path) -> None:
    ctls = [start_controller(tmp_path / f"p{i}") for i in range(2)]
    try:
        keys = [c.client["key"] for c in ctls]
        assert keys[0] != keys[1] and all(len(k) == 64 for k in keys)
        for c in ctls:
            assert c.client["key"] == c.engine["key"]
            for f in (c.client_file, c.engine_file):
                assert f.stat().st_mode & 0o777 == 0o600
            assert c.client_file.parent.stat().st_mode & 0o777 == 0o700
    finally:
        for c in ctls:
            c.stop()


def test_profile_dir_tightens_security_dir(tmp_path: Path) -> None:
    sec = tmp_path / "prof" / "security"
    sec.mkdir(parents=True)
    sec.chmod(0o755)
    paths.profile_dir(profile_dir=tmp_path / "prof", create=True)
    assert sec.stat().st_mode & 0o777 == 0o700


def test_short_configured_key_is_warned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPP_SESSION_KEY", "abc")
    ctl = start_controller(tmp_path)
    try:
        assert ctl.client["key"] == "abc"
        assert "only 3 characters" in _controller_log(ctl)
    finally:
        ctl.stop()


def test_no_key_only_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``--no-key`` runs unsigned with a WARNING; clients and engines warn and still work."""
    ctl = start_controller(tmp_path, "--no-key")
    engine = None
    try:
        assert ctl.client["key"] == "" and ctl.engine["key"] == ""
        assert "WITHOUT a key" in _controller_log(ctl)
        log = tmp_path / "engine.log"
        with open(log, "wb") as out:
            engine = subprocess.Popen(
                [sys.executable, "-m", "ferroparallel.engine", "--file", str(ctl.engine_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
            rc = Client(ctl.client_file, timeout=WAIT)
        with rc:
            assert any("empty key" in r.getMessage() for r in caplog.records)
            rc.wait_for_engines(1, timeout=30)
            assert rc[:].apply_sync(lambda: "unsigned") == ["unsigned"]
        assert "empty key" in log.read_text(errors="replace")
    finally:
        if engine is not None:
            stop_popen(engine)
        ctl.stop()


# ----- connection-file hygiene ----------------------------------------------------------------


def _write_info(path: Path, key: str = "k" * 64) -> None:
    info = {
        "interface": "tcp://127.0.0.1",
        "registration": 1,
        "control": 2,
        "mux": 3,
        "task": 4,
        "iopub": 5,
        "notification": 6,
        "hb_ping": 7,
        "hb_pong": 8,
        "key": key,
    }
    path.write_text(json.dumps(info))


def test_loose_modes_warned_on_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sec = tmp_path / "security"
    sec.mkdir()
    f = sec / "ipcontroller-client.json"
    _write_info(f)
    sec.chmod(0o700)
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
        paths.load_connection_file(f, "client")
        load_connection_info(f, wait=0)
    assert not caplog.records
    f.chmod(0o644)
    sec.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
        paths.load_connection_file(f, "client")
    texts = [r.getMessage() for r in caplog.records]
    assert any("chmod 600" in t and "0644" in t for t in texts)
    assert any("chmod 700" in t and "0755" in t for t in texts)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
        load_connection_info(f, wait=0)  # the engine's loader checks too
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_empty_key_in_file_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "c.json"
    _write_info(f, key="")
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
        info = paths.load_connection_file(f, "client")
    assert info["key"] == ""
    assert any("empty key" in r.getMessage() for r in caplog.records)


# ----- verify before unpickling: engine -------------------------------------------------------


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[tuple[FakeController, EngineProcess]]:
    ctx = zmq.Context()
    ctl = FakeController(ctx)
    eng = EngineProcess(tmp_path, ctl.engine_info())
    try:
        ctl.register()
        yield ctl, eng
    finally:
        eng.stop()
        ctl.close()
        ctx.destroy(linger=0)


def _no_reply(sock: zmq.Socket, seconds: float) -> bool:
    return not sock.poll(int(seconds * 1000))


def test_engine_drops_forged_messages_before_unpickling(fake_engine, tmp_path: Path) -> None:
    ctl, eng = fake_engine
    marker = tmp_path / "pwned"
    bufs = pack_apply_message(print, (Evil(marker),), {})
    ident = [ctl.uuid, b"client-1"]
    for how, frames in forged_variants(ctl.session, "apply_request", ident, bufs).items():
        for channel in ("mux", "task", "control"):
            ctl.send_raw(channel, frames)
        assert _no_reply(ctl.sockets["mux"], 0.3), f"{how}: the engine answered a forged request"
    # A properly signed request is still served, and nothing forged ran.
    msg_id = ctl.apply(lambda: "alive")
    rep = ctl.reply()
    assert rep["parent_header"]["msg_id"] == msg_id and rep["content"]["status"] == "ok"
    assert not marker.exists(), "a forged payload was unpickled"
    assert eng.proc.poll() is None
    # Control: the same payload, properly signed, is unpickled (so the test is not vacuous).
    ctl.send_raw("mux", ctl.session.serialize("apply_request", {}, ident=ident, buffers=bufs))
    assert ctl.reply()["content"]["status"] == "ok"
    assert marker.exists()


def test_engine_rejects_replayed_request(fake_engine, tmp_path: Path) -> None:
    ctl, _ = fake_engine
    counter = tmp_path / "runs"

    def bump(path: str) -> int:
        with open(path, "a") as f:
            f.write("x")
        return os.path.getsize(path)

    frames = [
        bytes(f)
        for f in ctl.session.serialize(
            "apply_request",
            {},
            ident=[ctl.uuid, b"client-1"],
            buffers=pack_apply_message(bump, (str(counter),), {}),
        )
    ]
    ctl.send_raw("mux", frames)
    assert ctl.reply()["content"]["status"] == "ok"
    ctl.send_raw("mux", frames)  # the replay
    assert _no_reply(ctl.sockets["mux"], 0.5)
    assert counter.read_text() == "x"


# ----- verify before unpickling: client -------------------------------------------------------


class FakeHub:
    """Client-side controller sockets, enough for one Client with one engine."""

    def __init__(self, ctx: zmq.Context, tmp: Path) -> None:
        self.session = _core.Session(KEY, packer="msgpack")
        self.sockets: dict[str, zmq.Socket] = {}
        info: dict[str, Any] = {
            "interface": "tcp://127.0.0.1",
            "key": KEY.decode(),
            "signature_scheme": "hmac-sha256",
            "pack": "msgpack",
            "unpack": "msgpack",
            "location": "",
            "ssh": "",
        }
        kinds = {
            "registration": zmq.ROUTER,
            "mux": zmq.ROUTER,
            "task": zmq.ROUTER,
            "control": zmq.ROUTER,
            "notification": zmq.PUB,
            "iopub": zmq.PUB,
        }
        for name, kind in kinds.items():
            s = ctx.socket(kind)
            s.linger = 0
            info[name] = s.bind_to_random_port("tcp://127.0.0.1")
            self.sockets[name] = s
        self.file = tmp / "ipcontroller-client.json"
        paths.write_connection_file(self.file, info)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer_queries, daemon=True)
        self._thread.start()

    def _answer_queries(self) -> None:
        reg = self.sockets["registration"]
        while not self._stop.is_set():
            if not reg.poll(50):
                continue
            try:
                msg = self.session.deserialize(reg.recv_multipart())
            except MessageError:
                continue  # unsigned / forged: dropped, like the real controller
            content = {"status": "ok", "engines": {"0": "engine-0"}}
            reg.send_multipart(
                self.session.serialize(
                    "connection_reply", content, msg["header"], ident=msg["idents"]
                )
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for s in self.sockets.values():
            s.close(linger=0)


def test_client_drops_forged_replies_before_unpickling(tmp_path: Path) -> None:
    ctx = zmq.Context()
    hub = FakeHub(ctx, tmp_path)
    marker = tmp_path / "pwned"
    try:
        with Client(hub.file, timeout=WAIT) as rc:
            ar = rc[0].apply_async(lambda: None)
            mux = hub.sockets["mux"]
            assert mux.poll(int(WAIT * 1000))
            req = hub.session.deserialize(mux.recv_multipart())
            assert req["msg_type"] == "apply_request"
            ident = list(req["idents"])
            evil = serialize_object(Evil(marker))
            kw = {"parent": req["header"], "metadata": {"status": "ok", "engine": "engine-0"}}
            for frames in forged_variants(hub.session, "apply_reply", ident, evil, **kw).values():
                mux.send_multipart(frames)
            time.sleep(0.3)
            assert not ar.done(), "the client accepted a forged reply"
            good = hub.session.serialize(
                "apply_reply",
                {"status": "ok"},
                req["header"],
                {"status": "ok", "engine": "engine-0"},
                ident=ident,
                buffers=serialize_object(42),
            )
            mux.send_multipart(good)
            assert ar.get(WAIT) == 42
            assert not marker.exists(), "a forged payload was unpickled by the client"
            # Control: the evil result, properly signed, is unpickled by the client.
            ar2 = rc[0].apply_async(lambda: None)
            assert mux.poll(int(WAIT * 1000))
            req = hub.session.deserialize(mux.recv_multipart())
            mux.send_multipart(
                hub.session.serialize(
                    "apply_reply",
                    {"status": "ok"},
                    req["header"],
                    {"status": "ok", "engine": "engine-0"},
                    ident=list(req["idents"]),
                    buffers=evil,
                )
            )
            ar2.get(WAIT).close()
            assert marker.exists()
    finally:
        hub.close()
        ctx.destroy(linger=0)


# ----- verify before relaying: controller -----------------------------------------------------


@contextlib.contextmanager
def _one_engine_cluster(
    tmp_path: Path, *controller_args: str
) -> Iterator[tuple[Any, Client, Any, bytes, zmq.Context]]:
    """A controller, one engine and a Client: ``(controller, client, a session with the
    cluster's key, the engine's uuid, a zmq context for hand-made sockets)``."""
    ctl = start_controller(tmp_path / "prof", *controller_args)
    engine = subprocess.Popen(
        [sys.executable, "-m", "ferroparallel.engine", "--file", str(ctl.engine_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = zmq.Context()
    try:
        with Client(ctl.client_file, timeout=WAIT) as rc:
            rc.wait_for_engines(1, timeout=30)
            uuid = rc._engines[rc.ids[0]].encode()
            good = _core.Session(ctl.client["key"].encode(), packer=ctl.client.get("pack"))
            yield ctl, rc, good, uuid, ctx
    finally:
        ctx.destroy(linger=0)
        stop_popen(engine)
        ctl.stop()


def test_controller_drops_forged_requests(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with _one_engine_cluster(tmp_path) as (ctl, rc, good, uuid, ctx):
        bufs = pack_apply_message(print, (Evil(marker),), {})
        socks = {}
        for channel in ("mux", "task", "control"):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(ctl.client_url(channel))
            socks[channel] = s
        ident = [uuid]
        for frames in forged_variants(good, "apply_request", ident, bufs).values():
            for channel, s in socks.items():
                s.send_multipart(frames[1:] if channel == "task" else frames)
        assert all(_no_reply(s, 0.2) for s in socks.values())
        # The cluster still works, and nothing forged ran anywhere.
        assert rc[:].apply_sync(lambda: "ok") == ["ok"]
        wait_until(lambda: "dropped message" in _controller_log(ctl), 5, "drop log lines")
        assert not marker.exists(), "a forged payload reached an engine and was unpickled"
        # Control: the same payload, properly signed, runs on the engine.
        socks["mux"].send_multipart(good.serialize("apply_request", {}, ident=ident, buffers=bufs))
        assert socks["mux"].poll(int(WAIT * 1000))
        wait_until(marker.exists, 5, "the signed payload to run")


@pytest.mark.parametrize("db", ["memory", "sqlite"])
def test_hub_never_vouches_for_swapped_buffers(tmp_path: Path, db: str) -> None:
    """The controller relays buffers without hashing them (the receiver checks them), so a
    genuine header with swapped buffers reaches the engine, which runs nothing of it and
    answers with a BufferMismatch error; the hub checks
    recorded buffers before it serves them under a digest of its own: refused (memory), or
    never recorded (sqlite, checked when stored)."""
    marker = tmp_path / "pwned"
    with _one_engine_cluster(tmp_path, "--db", db) as (ctl, rc, good, uuid, ctx):
        buffers = pack_apply_message(len, ("abc",), {})
        genuine = [
            bytes(f) for f in good.serialize("apply_request", {}, ident=[uuid], buffers=buffers)
        ]
        head = genuine[:7]  # engine ident, delimiter, signature, the four signed parts
        msg_id = good.unpack(head[3])["msg_id"]
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(ctl.client_url("mux"))
        sock.send_multipart(head + pack_apply_message(print, (Evil(marker),), {}))
        assert sock.poll(int(WAIT * 1000)), "no answer to a message with swapped buffers"
        rep = good.deserialize(sock.recv_multipart())
        assert rep["content"]["ename"] == "BufferMismatch", rep["content"]
        assert not marker.exists(), "a payload swapped into a genuine message was unpickled"
        wait_until(lambda: rc.db_query({"msg_id": msg_id}, keys=["msg_id"]), 5, "a record")
        if db == "memory":
            with pytest.raises(Exception, match="do not match the digest") as info:
                rc.db_query({"msg_id": msg_id}, keys=["msg_id", "buffers"])
            assert getattr(info.value, "ename", "") == "InvalidSignature"
        else:
            [rec] = rc.db_query({"msg_id": msg_id}, keys=["msg_id", "buffers"])
            assert rec["buffers"] == []
        # genuine requests and results are served with their buffers
        ar = rc[0].apply_async(len, "abcd")
        assert ar.get(timeout=WAIT) == 4
        mid = ar.msg_ids[0]
        wait_until(lambda: rc.db_query({"msg_id": mid, "completed": {"$ne": None}}), 5)
        [rec] = rc.db_query({"msg_id": mid}, keys=["buffers", "result_buffers"])
        assert rec["buffers"] and rec["result_buffers"]
        with Client(ctl.client_file, timeout=WAIT) as other:  # from the hub's records
            assert other.get_result(mid).get(timeout=WAIT) == 4
        assert rc[:].apply_sync(lambda: "ok") == ["ok"]


def test_buffers_are_authenticated(fake_engine, tmp_path: Path) -> None:
    ctl, _ = fake_engine
    marker = tmp_path / "pwned"
    ident = [ctl.uuid, b"client-1"]
    genuine = [
        bytes(f)
        for f in ctl.session.serialize(
            "apply_request", {}, ident=ident, buffers=pack_apply_message(len, ("abc",), {})
        )
    ]
    head = genuine[: len(ident) + 6]  # idents, delimiter, signature, the four signed parts
    # The signed metadata carries the digest of the genuine buffers.
    assert len(ctl.session.unpack(head[len(ident) + 4])["buffers_mac"]) == 64
    swapped = [
        head + pack_apply_message(print, (Evil(marker),), {}),
        head,
        head + genuine[len(head) :] + [b"extra"],
        head + genuine[-1:],
    ]
    for tampered in swapped:
        ctl.send_raw("mux", tampered)
        # Nothing of it is unpickled or run; its sender gets an error instead of no answer
        # (an array changed while it was being sent looks the same: it must not hang).
        rep = ctl.reply()
        assert rep["content"]["status"] == "error"
        assert rep["content"]["ename"] == "BufferMismatch", rep["content"]
        assert "was not run" in rep["content"]["evalue"]
    assert not marker.exists(), "a payload swapped into a genuine message was unpickled"
    # Refusing the forgeries did not burn the genuine message's signature.
    ctl.send_raw("mux", genuine)
    rep = ctl.reply()
    assert rep["content"]["status"] == "ok"
    assert rep["metadata"]["buffers_mac"], "the reply's buffers are authenticated too"
    ctl.send_raw("mux", genuine)  # (and it runs once)
    assert _no_reply(ctl.sockets["mux"], 0.5), "a replayed request was answered"


def test_empty_exec_key_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``Client(exec_key="")`` overrides the file's key with nothing: warned, not refused."""
    ctx = zmq.Context()
    hub = FakeHub(ctx, tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="ferroparallel.security"):
            # The hub has a key, so it drops the unsigned connection request.
            with pytest.raises(TimeoutError):
                Client(hub.file, exec_key="", timeout=1)
    finally:
        hub.close()
        ctx.destroy(linger=0)
    assert any("empty key" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ipc", [True, False], ids=["ipc", "tcp"])
def test_a_wrong_key_is_named_in_the_timeout(tmp_path: Path, ipc: bool) -> None:
    """A controller drops requests signed with another key unread, so the client only sees a
    timeout: it says that the controller is there but ignores us, and why that usually is
    (a connection file of an earlier run, a wrong ``exec_key``), unlike a missing one."""
    ctl = start_controller(tmp_path / "prof", *([] if ipc else ["--no-ipc"]))
    try:
        wrong = dict(ctl.client, key=new_key())
        with pytest.raises(TimeoutError, match="not its key") as info:
            Client(wrong, timeout=1)
        assert ("ipc://" in str(info.value)) == ipc
        with pytest.raises(TimeoutError, match="wrong exec_key"):
            Client(ctl.client_file, exec_key=new_key(), timeout=1)
        with Client(ctl.client_file, timeout=WAIT) as rc:  # the right key still works
            assert rc.ids == []
    finally:
        ctl.stop()
    with pytest.raises(TimeoutError) as info:  # nothing listens there any more
        Client(wrong, timeout=1)
    assert "key" not in str(info.value)


def test_an_engine_with_a_wrong_key_says_so(tmp_path: Path) -> None:
    """The engine's registration times out the same way, and its log says why."""
    ctl = start_controller(tmp_path / "prof")
    try:
        wrong = tmp_path / "engine.json"
        wrong.write_text(json.dumps(dict(ctl.engine, key=new_key())))
        wrong.chmod(0o600)
        out = subprocess.run(
            [sys.executable, "-m", "ferroparallel.engine", "--file", str(wrong), "--timeout", "1"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT + 20,
        )
    finally:
        ctl.stop()
    assert out.returncode != 0
    assert "no registration reply" in out.stderr and "not its key" in out.stderr, out.stderr
