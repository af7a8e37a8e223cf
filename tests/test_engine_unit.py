"""The engine process against a fake controller written with raw pyzmq.

The fake binds every controller-side socket on 127.0.0.1, writes an engine connection file,
and speaks the wire protocol with ``_core.Session`` (same key, msgpack). Engines run as real
subprocesses: ``python -m ferroparallel.engine --file PATH``.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from ferroparallel import _core
from ferroparallel.engine.capture import StreamCapture
from ferroparallel.engine.connection import (
    PORT_KEYS,
    EngineUrls,
    channel_urls,
    disambiguate_interface,
    load_connection_info,
)
from ferroparallel.engine.control import AbortSet
from ferroparallel.engine.execute import PlainShell, run_apply
from ferroparallel.engine.signals import InterruptGate
from ferroparallel.error import ConnectionFileError
from ferroparallel.serialize import interactive, load_object, pack_apply_message
from ferroparallel.signal_names import parse_signal
from ferroparallel.wire_names import NO_STATUS_KEY

KEY = b"engine-test-key-0123456789abcdef"
IP = "tcp://127.0.0.1"
CLIENT = b"client-1"
WAIT = 10.0  # upper bound of every wait


def engine_info(ports: dict[str, int]) -> dict[str, Any]:
    """An engine connection dict for controller sockets on ``ports``."""
    return {
        "interface": IP,
        **ports,
        "key": KEY.decode(),
        "signature_scheme": "hmac-sha256",
        "pack": "msgpack",
        "unpack": "msgpack",
        "location": "127.0.0.1",
        "ssh": "",
    }


class FakeController:
    """Controller-side sockets, bound on random ports, plus helpers to talk to one engine."""

    def __init__(self, ctx: zmq.Context, hb_period: int = 60_000) -> None:
        self.session = _core.Session(KEY, packer="msgpack")
        self.hb_period = hb_period
        self.sockets: dict[str, zmq.Socket] = {}
        self.ports: dict[str, int] = {}
        layout = {
            "registration": (zmq.ROUTER, None),
            "mux": (zmq.ROUTER, b"mux_out"),
            "task": (zmq.ROUTER, b"task_out"),
            "control": (zmq.ROUTER, b"control_out"),
            "iopub": (zmq.SUB, None),
            "hb_ping": (zmq.PUB, None),
            "hb_pong": (zmq.ROUTER, None),
        }
        for name, (kind, identity) in layout.items():
            s = ctx.socket(kind)
            s.linger = 0
            if identity is not None:
                s.setsockopt(zmq.IDENTITY, identity)
            if kind == zmq.ROUTER:
                s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if kind == zmq.SUB:
                s.setsockopt(zmq.SUBSCRIBE, b"")
            self.ports[name] = s.bind_to_random_port(IP)
            self.sockets[name] = s
        self.uuid: bytes = b""
        self.engine_id = 0
        self.registration: dict[str, Any] = {}

    def engine_info(self) -> dict[str, Any]:
        return engine_info(self.ports)

    # -- wire helpers -----------------------------------------------------------------------

    def recv(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        s = self.sockets[name]
        if not s.poll(int(timeout * 1000)):
            raise TimeoutError(f"nothing on {name} within {timeout} s")
        return self.session.deserialize(s.recv_multipart())

    def send(
        self,
        name: str,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
        metadata: dict[str, Any] | None = None,
        ident: list[bytes] | None = None,
        parent: dict[str, Any] | None = None,
    ) -> str:
        """Send to the engine (routed by its uuid); retries while it is not connected yet."""
        if ident is None:
            ident = [self.uuid, CLIENT]
        frames = self.session.serialize(
            msg_type, content or {}, parent or {}, metadata or {}, ident=ident, buffers=buffers
        )
        header = self.session.unpack(frames[len(ident) + 2])
        self.send_raw(name, frames)
        return header["msg_id"]

    def send_raw(self, name: str, frames: list[Any]) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.sockets[name].send_multipart(frames)
                return
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def register(self, timeout: float = WAIT, reply: dict[str, Any] | None = None) -> None:
        req = self.recv("registration", timeout)
        assert req["msg_type"] == "registration_request"
        self.registration = req
        self.uuid = req["content"]["uuid"].encode()
        content = reply or {"status": "ok", "id": self.engine_id, "hb_period": self.hb_period}
        frames = self.session.serialize(
            "registration_reply", content, req["header"], {}, ident=req["idents"]
        )
        self.sockets["registration"].send_multipart(frames)

    def sync_iopub(self, timeout: float = WAIT) -> None:
        """Wait until the engine's IOPub messages reach us.

        A bound SUB sends its subscription only once its owner touches the socket, and the
        engine's PUB drops messages until it has the subscription: send kernel_info requests
        until their busy/idle status arrives.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = self.send("mux", "kernel_info_request")
            assert self.reply()["msg_type"] == "kernel_info_reply"
            try:
                self.iopub_for(msg_id, timeout=0.2)
                return
            except TimeoutError:
                continue
        raise TimeoutError("IOPub never connected")

    def iopub_for(self, msg_id: str, timeout: float = WAIT) -> list[dict[str, Any]]:
        """IOPub messages of one request, up to and including its idle status."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv("iopub", max(0.0, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            out.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out

    def apply(self, f: Any, *args: Any, channel: str = "mux", **kwargs: Any) -> str:
        return self.send(channel, "apply_request", {}, buffers=pack_apply_message(f, args, kwargs))

    def reply(self, channel: str = "mux", timeout: float = WAIT) -> dict[str, Any]:
        return self.recv(channel, timeout)

    def ping(self, payload: bytes) -> list[bytes] | None:
        """Publish one ping; return the echoed frames (or None within 200 ms)."""
        self.sockets["hb_ping"].send(payload)
        pong = self.sockets["hb_pong"]
        if pong.poll(200):
            return pong.recv_multipart()
        return None

    def close(self) -> None:
        for s in self.sockets.values():
            s.close(linger=0)


class EngineProcess:
    """A ``python -m ferroparallel.engine`` subprocess; its log is kept in a file."""

    def __init__(self, tmp: Path, info: dict[str, Any] | None, *args: str, env_info=False):
        self.log_path = tmp / f"engine-{time.monotonic_ns()}.log"
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "ferroparallel.engine", "--log-level", "DEBUG", *args]
        if info is not None and env_info:
            env["IPP_CONNECTION_INFO"] = json.dumps(info)
        elif info is not None:
            path = tmp / "ipcontroller-engine.json"
            path.write_text(json.dumps(info))
            cmd += ["--file", str(path)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"engine still running; log:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        self._log.close()


@pytest.fixture(scope="module")
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def fresh(zctx, tmp_path) -> Iterator[tuple[FakeController, Any]]:
    """A new fake controller and a factory of engines attached to it."""
    ctl = FakeController(zctx)
    engines: list[EngineProcess] = []

    def start(*args: str, hb_period: int | None = None, env_info: bool = False):
        if hb_period is not None:
            ctl.hb_period = hb_period
        eng = EngineProcess(tmp_path, ctl.engine_info(), *args, env_info=env_info)
        engines.append(eng)
        return eng

    yield ctl, start
    for eng in engines:
        eng.stop()
    ctl.close()


@pytest.fixture(scope="module")
def shared(zctx, tmp_path_factory) -> Iterator[tuple[FakeController, EngineProcess]]:
    """One registered engine reused by the tests that leave it serving."""
    ctl = FakeController(zctx)
    ctl.engine_id = 7
    eng = EngineProcess(tmp_path_factory.mktemp("shared"), ctl.engine_info(), "--id", "7")
    try:
        ctl.register()
        ctl.sync_iopub()
        yield ctl, eng
    finally:
        if eng.proc.poll() is not None:
            print(eng.log())
        eng.stop()
        ctl.close()


def call_ok(ctl: FakeController, f: Any, *args: Any, **kwargs: Any) -> Any:
    msg_id = ctl.apply(f, *args, **kwargs)
    rep = ctl.reply()
    assert rep["parent_header"]["msg_id"] == msg_id
    assert rep["content"]["status"] == "ok", rep["content"]
    return load_object(rep["buffers"])


# -- registration, heartbeat ------------------------------------------------------------------


def test_registration_handshake(shared):
    ctl, eng = shared
    req = ctl.registration
    assert req["idents"] == [ctl.uuid]  # DEALER identity = uuid
    assert req["content"] == {"uuid": ctl.uuid.decode(), "id": 7}
    assert req["header"]["session"] == ctl.uuid.decode()
    assert req["metadata"]["engine"] == ctl.uuid.decode()
    assert call_ok(ctl, os.getpid) == eng.proc.pid


def test_heartbeat_echo_even_while_busy(shared):
    ctl, _ = shared
    echoed = None
    for _ in range(50):  # the SUB subscription may take a moment
        echoed = ctl.ping(b"1.5")
        if echoed:
            break
    assert echoed == [ctl.uuid, b"1.5"]
    msg_id = ctl.apply(time.sleep, 2)
    time.sleep(0.3)
    for i in range(5):
        payload = f"{2.0 + i}".encode()
        assert ctl.ping(payload) == [ctl.uuid, payload]
        time.sleep(0.2)
    rep = ctl.reply(timeout=5)
    assert rep["parent_header"]["msg_id"] == msg_id and rep["content"]["status"] == "ok"


# -- apply ----------------------------------------------------------------------------------


def test_apply_round_trip_with_large_array(shared):
    ctl, _ = shared
    arr = np.arange(1 << 17, dtype="f8")  # 1 MiB

    def twice(a, k=1):
        return a * 2 * k

    msg_id = ctl.apply(twice, arr, k=3, channel="task")
    rep = ctl.reply("task")
    assert rep["idents"] == [ctl.uuid, CLIENT]
    assert rep["msg_type"] == "apply_reply"
    assert rep["parent_header"]["msg_id"] == msg_id
    assert rep["header"]["session"] == ctl.uuid.decode()
    md = rep["metadata"]
    assert md["engine"] == ctl.uuid.decode() and md["status"] == "ok"
    assert md["dependencies_met"] is True and md["started"].endswith("Z")
    np.testing.assert_array_equal(load_object(rep["buffers"]), arr * 6)


def test_apply_namespace_persists_and_metadata_copied(shared):
    ctl, _ = shared

    @interactive
    def setx():
        global engine_x
        engine_x = 41

    call_ok(ctl, setx)
    ctl.send(
        "mux", "apply_request", {}, buffers=pack_apply_message(lambda: 1), metadata={"label": "L"}
    )
    assert ctl.reply()["metadata"]["label"] == "L"
    ctl.send("mux", "execute_request", {"code": "engine_x += 1", "silent": True})
    c = ctl.reply()["content"]
    assert c["status"] == "ok", c

    @interactive
    def getx():
        return engine_x  # noqa: F821 - lives in the engine namespace

    assert call_ok(ctl, getx) == 42


def test_apply_error_reply(shared):
    ctl, _ = shared

    def boom(x):
        raise ValueError(f"bad {x}")

    msg_id = ctl.apply(boom, 3)
    rep = ctl.reply()
    c = rep["content"]
    assert c["status"] == "error" and c["ename"] == "ValueError" and c["evalue"] == "bad 3"
    assert c["engine_info"] == {"engine_uuid": ctl.uuid.decode(), "engine_id": 7, "method": "apply"}
    assert any("boom" in line for line in c["traceback"])
    assert rep["buffers"] == []
    md = rep["metadata"]
    assert md["status"] == "error" and md["engine_info"]["method"] == "apply"
    types_ = [m["msg_type"] for m in ctl.iopub_for(msg_id)]
    assert "error" in types_ and types_[0] == "status"


# -- execute, IOPub -------------------------------------------------------------------------


def test_execute_publishes_stream_result_and_idle(shared):
    ctl, _ = shared
    msg_id = ctl.send("mux", "execute_request", {"code": "print('hi')\n6 * 7", "silent": False})
    rep = ctl.reply()
    assert rep["msg_type"] == "execute_reply"
    c = rep["content"]
    assert c["status"] == "ok" and c["payload"] == [] and c["user_expressions"] == {}
    count = c["execution_count"]
    out = ctl.iopub_for(msg_id)
    by_type = {m["msg_type"]: m for m in out}
    assert out[0]["msg_type"] == "status" and out[0]["content"]["execution_state"] == "busy"
    assert by_type["execute_input"]["content"] == {
        "code": "print('hi')\n6 * 7",
        "execution_count": count,
    }
    stream = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
    assert stream == "hi\n"
    result = by_type["execute_result"]["content"]
    assert result["data"]["text/plain"] == "42" and result["execution_count"] == count
    assert all(m["metadata"]["engine"] == ctl.uuid.decode() for m in out)
    assert all(m["header"]["session"] == ctl.uuid.decode() for m in out)


def test_iopub_topics_and_live_output(shared):
    ctl, _ = shared
    code = "import sys, time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b', file=sys.stderr)"
    msg_id = ctl.send("mux", "execute_request", {"code": code, "silent": True})
    first = None
    deadline = time.monotonic() + WAIT
    topics = []
    while time.monotonic() < deadline:
        s = ctl.sockets["iopub"]
        assert s.poll(int(WAIT * 1000))
        frames = s.recv_multipart()
        msg = ctl.session.deserialize(frames)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        topics.append(msg["idents"][0])
        if msg["msg_type"] == "stream" and first is None:
            first = (msg["content"], time.monotonic())
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            done = time.monotonic()
            break
    assert first[0] == {"name": "stdout", "text": "a\n"}
    assert done - first[1] > 0.3, "stdout should be published while the code still runs"
    assert b"engine.7.stdout" in topics and b"engine.7.stderr" in topics
    # status under ipyparallel's topic, as every other message
    assert topics[0] == b"engine.7.status" and topics[-1] == b"engine.7.status"
    reply = ctl.reply()
    assert reply["content"]["status"] == "ok"
    # the reply counts the outputs sent before it: the two streams
    assert reply["metadata"]["fp_outputs"] == 2


def test_requests_may_ask_for_no_status_messages(shared):
    """``fp_no_status`` (what ferroparallel clients send): the reply, counted outputs, and no
    busy/idle; requests without it (every other peer) still get both."""
    ctl, _ = shared
    quiet = ctl.send(
        "mux",
        "execute_request",
        {"code": "print('q')", "silent": True},
        metadata={NO_STATUS_KEY: True},
    )
    rep = ctl.reply()
    assert rep["parent_header"]["msg_id"] == quiet and rep["content"]["status"] == "ok"
    assert rep["metadata"]["fp_outputs"] == 1
    loud = ctl.send("mux", "execute_request", {"code": "print('l')", "silent": True})
    assert ctl.reply()["parent_header"]["msg_id"] == loud
    # the loud request's idle status is published after everything of the quiet one
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + WAIT
    while not seen or seen[-1] != (loud, "idle"):
        msg = ctl.recv("iopub", max(0.0, deadline - time.monotonic()))
        parent = msg["parent_header"].get("msg_id")
        if parent in (quiet, loud):
            state = msg["content"].get("execution_state", msg["content"].get("text", ""))
            seen.append((parent, state))
    assert seen.count((quiet, "q\n")) == 1
    assert not [s for s in seen if s[0] == quiet and s[1] in ("busy", "idle")], seen
    assert (loud, "busy") in seen and (loud, "l\n") in seen


def test_execute_error_and_stop_on_error_aborts_queued(shared):
    ctl, _ = shared
    first = ctl.send(
        "mux", "execute_request", {"code": "import time; time.sleep(0.3); 1/0", "silent": False}
    )
    second = ctl.send("mux", "execute_request", {"code": "after_error = 1", "silent": False})
    r1, r2 = ctl.reply(), ctl.reply()
    assert r1["parent_header"]["msg_id"] == first
    c = r1["content"]
    assert c["status"] == "error" and c["ename"] == "ZeroDivisionError"
    assert c["engine_info"]["method"] == "execute"
    assert r2["parent_header"]["msg_id"] == second
    assert r2["content"] == {"status": "aborted"} and r2["metadata"]["status"] == "aborted"
    assert "error" in [m["msg_type"] for m in ctl.iopub_for(first)]


# -- control --------------------------------------------------------------------------------


def test_abort_queued_request(shared):
    ctl, _ = shared
    running = ctl.apply(time.sleep, 0.5)
    queued = ctl.apply(os.getpid)
    later = ctl.apply(abs, -2)
    time.sleep(0.1)
    ctl.send("control", "abort_request", {"msg_ids": [queued]})
    rep = ctl.recv("control")
    assert rep["msg_type"] == "abort_reply" and rep["content"]["status"] == "ok"
    replies = {r["parent_header"]["msg_id"]: r for r in (ctl.reply(), ctl.reply(), ctl.reply())}
    assert replies[running]["content"]["status"] == "ok"
    assert replies[queued]["msg_type"] == "apply_reply"
    assert replies[queued]["content"] == {"status": "aborted"}
    assert replies[queued]["metadata"]["status"] == "aborted"
    assert load_object(replies[later]["buffers"]) == 2
    # an empty list aborts everything queued
    running = ctl.apply(time.sleep, 0.5)
    queued = {ctl.apply(abs, -1), ctl.send("mux", "execute_request", {"code": "1"})}
    time.sleep(0.1)
    ctl.send("control", "abort_request", {"msg_ids": []})
    assert ctl.recv("control")["content"]["status"] == "ok"
    replies = {r["parent_header"]["msg_id"]: r for r in (ctl.reply(), ctl.reply(), ctl.reply())}
    assert replies[running]["content"]["status"] == "ok"
    assert {replies[q]["content"]["status"] for q in queued} == {"aborted"}
    assert call_ok(ctl, abs, -4) == 4


def test_clear_request_resets_namespace(shared):
    ctl, _ = shared
    ctl.send("mux", "execute_request", {"code": "to_clear = 5", "silent": True})
    assert ctl.reply()["content"]["status"] == "ok"
    ctl.send("control", "clear_request", {})
    rep = ctl.recv("control")
    assert rep["msg_type"] == "clear_reply" and rep["content"]["status"] == "ok"
    ctl.send("mux", "execute_request", {"code": "to_clear", "silent": True})
    c = ctl.reply()["content"]
    assert c["status"] == "error" and c["ename"] == "NameError"
    ctl.send("mux", "execute_request", {"code": "len([1])", "silent": True})
    assert ctl.reply()["content"]["status"] == "ok"  # builtins kept


def test_signal_request_interrupts_running_code(shared):
    ctl, _ = shared
    t0 = time.monotonic()
    msg_id = ctl.apply(time.sleep, 30)
    time.sleep(0.5)
    ctl.send("control", "signal_request", {"sig": "SIGINT"})
    rep = ctl.recv("control")
    assert rep["msg_type"] == "signal_reply" and rep["content"]["status"] == "ok"
    r = ctl.reply(timeout=5)
    assert r["parent_header"]["msg_id"] == msg_id
    assert r["content"]["status"] == "error" and r["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 5
    ctl.send("control", "signal_request", {"sig": int(signal.SIGINT)})  # idle: ignored
    assert ctl.recv("control")["content"]["status"] == "ok"
    ctl.send("control", "signal_request", {"sig": "NOSUCHSIGNAL"})
    bad = ctl.recv("control")["content"]
    assert bad["status"] == "error" and bad["ename"] == "ValueError"
    assert call_ok(ctl, abs, -5) == 5  # still serving


def test_unknown_requests_get_errors(shared):
    ctl, _ = shared
    ctl.send("mux", "inspect_request", {"code": "x"})
    rep = ctl.reply()
    assert rep["msg_type"] == "inspect_reply"
    assert rep["content"]["status"] == "error" and rep["content"]["ename"] == "NotImplementedError"
    ctl.send("control", "frobnicate_request", {})
    rep = ctl.recv("control")
    assert (
        rep["msg_type"] == "frobnicate_reply" and rep["content"]["ename"] == "NotImplementedError"
    )
    ctl.send("control", "kernel_info_request", {})
    assert ctl.recv("control")["content"]["implementation"] == "ferroparallel"


def test_garbage_does_not_crash_the_engine(shared):
    ctl, eng = shared
    ctl.send_raw("mux", [ctl.uuid, CLIENT, b"no delimiter at all"])
    ctl.send_raw("mux", [ctl.uuid, CLIENT, b"<IDS|MSG>", b"deadbeef", b"{}", b"{}", b"{}", b"{}"])
    forged = ctl.session.serialize("apply_request", {}, {}, {}, ident=[ctl.uuid, CLIENT])
    forged[3] = b"0" * 64  # bad signature
    ctl.send_raw("mux", forged)
    ctl.send("mux", "apply_request", {}, buffers=[b"not", b"an", b"apply payload"])
    rep = ctl.reply()
    assert rep["content"]["status"] == "error" and rep["content"]["ename"] == "ValueError"
    ctl.send("mux", "apply_request", {}, buffers=[pack_apply_message(abs)[0], b"\x80garbage", b"x"])
    assert ctl.reply()["content"]["status"] == "error"
    assert call_ok(ctl, abs, -3) == 3
    deadline = time.monotonic() + WAIT
    while "dropped a message" not in eng.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "dropped a message on shell" in eng.log()


# -- lifecycle (own engines) ----------------------------------------------------------------


def test_shutdown_request(fresh):
    ctl, start = fresh
    eng = start(env_info=True)  # connection info from $IPP_CONNECTION_INFO
    ctl.register()
    ctl.sync_iopub()
    ctl.send("control", "shutdown_request", {"restart": False})
    rep = ctl.recv("control")
    assert rep["msg_type"] == "shutdown_reply" and rep["content"] == {
        "status": "ok",
        "restart": False,
    }
    while True:
        msg = ctl.recv("iopub")
        if msg["msg_type"] == "shutdown_reply":
            break
    unreg = ctl.recv("registration")
    assert unreg["msg_type"] == "unregistration_request" and unreg["content"] == {"id": 0}
    assert eng.wait() == 0


def test_sigterm_unregisters_and_exits(fresh):
    ctl, start = fresh
    eng = start()
    ctl.register()
    assert "id" not in ctl.registration["content"]
    call_ok(ctl, abs, 1)
    eng.proc.send_signal(signal.SIGTERM)
    assert ctl.recv("registration")["msg_type"] == "unregistration_request"
    assert eng.wait() == 0


def test_startup_script_and_command_of_the_profiles_config(fresh, tmp_path):
    """ipyparallel's c.IPEngine.startup_script / startup_command (ipengine_config.py; ours,
    ferroparallel_engine_config.py, wins) run in the user namespace once registered; a
    failing one is logged and the engine serves anyway."""
    from ferroparallel import Reference

    ctl, start = fresh
    pdir = tmp_path / "profile_startup"
    pdir.mkdir()
    script = tmp_path / "setup_engine.py"
    script.write_text("import math\nfrom_script = math.isqrt(49)\n")
    (pdir / "ipengine_config.py").write_text(
        f"c.IPEngine.startup_script = {str(script)!r}\n"
        "c.IPEngine.startup_command = 'from_command = 1'\n"
        "c.IPEngine.enable_nanny = False\n"
    )
    (pdir / "ferroparallel_engine_config.py").write_text(
        "c.IPEngine.startup_command = 'from_command = from_script * 6'\n"
    )
    eng = start("--profile-dir", str(pdir))
    ctl.register()
    assert call_ok(ctl, divmod, Reference("from_command"), Reference("from_script")) == (6, 0)
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.wait() == 0
    assert "IPEngine.enable_nanny" in eng.log()
    assert ctl.recv("registration")["msg_type"] == "unregistration_request"
    (pdir / "ferroparallel_engine_config.py").write_text("c.IPEngine.startup_command = '1/0'\n")
    eng = start("--profile-dir", str(pdir))
    ctl.register()
    assert call_ok(ctl, abs, -3) == 3  # serving all the same
    log_text = eng.log()
    assert "the startup command failed" in log_text and "ZeroDivisionError" in log_text


def test_startup_options_of_the_command_line(fresh, tmp_path):
    """ipengine's ``-s FILE`` / ``-c CODE`` (startup script, then command) win over the
    profile's config."""
    from ferroparallel import Reference

    ctl, start = fresh
    pdir = tmp_path / "profile_startup_cli"
    pdir.mkdir()
    (pdir / "ipengine_config.py").write_text("c.IPEngine.startup_command = 'from_command = 0'\n")
    script = tmp_path / "setup_cli.py"
    script.write_text("from_script = 7\n")
    eng = start("--profile-dir", str(pdir), "-s", str(script), "-c=from_command = from_script*2")
    ctl.register()
    assert call_ok(ctl, divmod, Reference("from_command"), Reference("from_script")) == (2, 0)
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.wait() == 0


def test_sigterm_while_registering_still_unregisters(fresh):
    """Stopped between its registration request and the reply (the controller may already
    have announced it): the engine waits briefly for its id and unregisters."""
    ctl, start = fresh
    eng = start()
    req = ctl.recv("registration")
    assert req["msg_type"] == "registration_request"
    eng.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the engine is stopping now, without its id
    content = {"status": "ok", "id": 5, "hb_period": ctl.hb_period}
    frames = ctl.session.serialize(
        "registration_reply", content, req["header"], {}, ident=req["idents"]
    )
    ctl.sockets["registration"].send_multipart(frames)
    unreg = ctl.recv("registration")
    assert unreg["msg_type"] == "unregistration_request" and unreg["content"] == {"id": 5}
    assert eng.wait() == 0


def test_exits_when_pings_stop(fresh):
    ctl, start = fresh
    eng = start("--max-missed-pings", "2", hb_period=100)  # (0.1 + 0.5) * 2 = 1.2 s
    ctl.register()
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            ctl.sockets["hb_ping"].send(b"%.3f" % time.monotonic())
            time.sleep(0.1)

    pinger = threading.Thread(target=beat, daemon=True)
    pinger.start()
    try:
        time.sleep(3)  # more than twice the limit: pings keep it alive
        assert eng.proc.poll() is None, eng.log()
    finally:
        stop.set()
        pinger.join()
    t0 = time.monotonic()
    assert eng.wait() not in (0, None)
    assert time.monotonic() - t0 < 3
    assert "no heartbeat" in eng.log()


def test_registration_refused_or_unanswered(fresh):
    ctl, start = fresh
    eng = start()
    ctl.register(reply={"status": "error", "ename": "KeyError", "evalue": "duplicate uuid"})
    assert eng.wait() == 1
    assert "duplicate uuid" in eng.log()
    eng2 = start("--timeout", "0.5")
    assert eng2.wait() == 1
    assert "no registration reply" in eng2.log()


def test_missing_connection_file(tmp_path):
    eng = EngineProcess(
        tmp_path, None, "--file", str(tmp_path / "nope.json"), "--wait-for-file", "0"
    )
    assert eng.wait() == 1
    assert "does not exist" in eng.log()
    eng.stop()


# -- in-process pieces ----------------------------------------------------------------------


def test_plain_shell_results_errors_and_silence():
    out: list[tuple[str, dict, str]] = []
    ns: dict[str, Any] = {"__name__": "__main__"}
    shell = PlainShell(ns, lambda t, c, topic: out.append((t, c, topic)), InterruptGate())
    r = shell.run_cell("x = 2\nx * 3", user_expressions={"y": "x + 1", "bad": "nope"})
    assert r.error is None and r.execution_count == 1 and ns["_"] == 6
    assert out == [
        (
            "execute_result",
            {"data": {"text/plain": "6"}, "metadata": {}, "execution_count": 1},
            "execute_result",
        )
    ]
    assert r.user_expressions["y"]["data"] == {"text/plain": "3"}
    assert r.user_expressions["bad"]["ename"] == "NameError"
    out.clear()
    assert shell.run_cell("x;").error is None and out == []
    silent = shell.run_cell("x", silent=True)
    assert silent.error is None and out == []
    # as IPython kernels: an uncounted execution reports the last counted one
    assert silent.execution_count == shell.execution_count - 1
    count = shell.execution_count
    err = shell.run_cell("def g():\n    1/0\ng()").error
    assert err.ename == "ZeroDivisionError" and out[-1][0] == "error"
    text = "\n".join(err.traceback)
    assert "<cell-" in text and "1/0" in text and "execute.py" not in text
    assert shell.execution_count == count + 1
    syn = shell.run_cell("def (").error
    assert syn.ename == "SyntaxError" and not syn.traceback[0].startswith("Traceback")


def test_run_apply_errors_never_raise():
    ns: dict[str, Any] = {"__name__": "__main__"}
    gate = InterruptGate()
    bad = run_apply([b"garbage"], ns, gate)
    assert bad.error is not None and bad.error.ename == "ValueError"

    def fail():
        raise KeyError("k")

    err = run_apply(pack_apply_message(fail), ns, gate).error
    assert err.ename == "KeyError" and "execute.py" not in "\n".join(err.traceback)
    unpicklable = run_apply(pack_apply_message(lambda: (x for x in ())), ns, gate).error
    assert unpicklable is not None and not gate.open
    ok = run_apply(pack_apply_message(divmod, (7, 2)), ns, gate)
    assert ok.error is None and load_object(ok.buffers) == (3, 1)


def test_capture_batches_and_restores_streams():
    sent: list[tuple[str, str]] = []
    cap = StreamCapture(lambda name, text, parent: sent.append((name, text)), interval=60)
    before = sys.stdout, sys.stderr
    cap.start({"msg_id": "m"})
    try:
        print("a")
        print("b", file=sys.stderr)
        sys.stdout.write("c")
        assert sent == []  # batched until the end (interval not reached)
        # as on ipyparallel's engines (ipykernel without stdin): nobody can answer input()
        from IPython.core.error import StdinNotImplementedError

        with pytest.raises(StdinNotImplementedError, match="argument"):
            input("prompt? ")
        assert sys.stdin.read() == ""  # reading stdin itself does not block
    finally:
        cap.stop()
    assert (sys.stdout, sys.stderr) == before
    assert input is builtins.input and builtins.input is not None
    assert sorted(sent) == [("stderr", "b\n"), ("stdout", "a\nc")]


def test_connection_info_sources(tmp_path):
    names = ["registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong"]
    data = engine_info({k: 1000 + i for i, k in enumerate(names)})
    got, src = load_connection_info(environ={"IPP_CONNECTION_INFO": json.dumps(data)})
    assert src == "$IPP_CONNECTION_INFO" and got["mux"] == data["mux"]
    path = tmp_path / "e.json"
    old_style = {k: v for k, v in data.items() if k != "key"} | {"exec_key": "abc"}
    path.write_text(json.dumps(old_style))
    got, src = load_connection_info(file=path, environ={"IPP_CONNECTION_INFO": "{"})
    assert src == str(path) and got["key"] == "abc"
    with pytest.raises(ConnectionFileError, match="not valid JSON"):
        load_connection_info(environ={"FERROPARALLEL_CONNECTION_INFO": "{"})
    del data["hb_pong"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConnectionFileError, match="hb_pong"):
        load_connection_info(file=path)
    security = tmp_path / "prof" / "security"
    security.mkdir(parents=True)
    (security / "ipcontroller-c1-engine.json").write_text(json.dumps(old_style))
    got, src = load_connection_info(profile_dir=str(tmp_path / "prof"), cluster_id="c1", environ={})
    assert src == str(security / "ipcontroller-c1-engine.json") and got["key"] == "abc"
    assert disambiguate_interface("tcp://*", "") == "tcp://127.0.0.1"
    assert disambiguate_interface("tcp://10.1.2.3", "x") == "tcp://10.1.2.3"
    urls = channel_urls({**data, "hb_pong": 9, "broadcast": [5, 6]})
    assert urls.hb_pong == "tcp://127.0.0.1:9" and urls.broadcast[1] == "tcp://127.0.0.1:6"


def test_the_data_server_binds_the_controllers_tcp_route_even_over_unix_sockets() -> None:
    """An engine beside the controller talks to it over Unix sockets, but its data server
    must be reachable by clients on other hosts: it binds the route of the TCP address."""
    from ferroparallel.engine.connection import data_url
    from ferroparallel.serialize import netloan
    from ferroparallel.serialize.netloan import bind_host

    info = {k: i + 1000 for i, k in enumerate(PORT_KEYS)}
    info |= {"interface": "tcp://10.1.2.3", "location": "10.1.2.3"}
    assert data_url(info, channel_urls(info)) == "tcp://10.1.2.3:1000"
    local = {k: f"ipc://@fp-test-{k}" for k in PORT_KEYS}
    over_ipc = EngineUrls(**local)
    assert data_url(info, over_ipc) == "tcp://10.1.2.3:1000"
    assert bind_host(over_ipc.registration) == "127.0.0.1"  # what it bound before
    loopback = info | {"interface": "tcp://127.0.0.1"}
    assert bind_host(data_url(loopback, over_ipc)) == "127.0.0.1"
    tunnel = EngineUrls(**{k: f"tcp://127.0.0.1:{2000 + i}" for i, k in enumerate(PORT_KEYS)})
    assert data_url(info, tunnel) == "tcp://127.0.0.1:2000"  # an SSH tunnel's end
    # a controller on every interface (--ip='*'), beside this engine: the routable address
    for wildcard in ("tcp://*", "tcp://0.0.0.0"):
        everywhere = info | {"interface": wildcard, "location": socket.gethostname()}
        for urls in (over_ipc, channel_urls(everywhere)):
            assert data_url(everywhere, urls) == "tcp://*:1000"
        assert bind_host("tcp://*:1000") == netloan.routable_address()
    # ... and on another host: the route to it
    remote = info | {"interface": "tcp://*", "location": "10.9.8.7"}
    assert data_url(remote, channel_urls(remote)) == "tcp://10.9.8.7:1000"


def test_routable_address_is_not_loopback_when_there_is_a_route() -> None:
    from ferroparallel.serialize import netloan

    address = netloan.routable_address()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            expected = s.getsockname()[0]
    except OSError:
        expected = "127.0.0.1"
    assert address == (expected if not expected.startswith("127.") else "127.0.0.1")
    with socket.socket() as s:  # and it can be bound
        s.bind((address, 0))


def test_signal_names_and_abort_set():
    assert parse_signal("SIGINT") == parse_signal("int") == parse_signal(2) == signal.SIGINT
    with pytest.raises(ValueError):
        parse_signal("SIGNOPE")
    aborted = AbortSet(capacity=2)
    aborted.add(["a", "b", "c"])
    assert aborted.take("a") is None and aborted.take("c") == "abort"
    assert aborted.take("c") is None
    # another thread answers a queued one first: the runner skips it; once taken, no claim
    assert aborted.claim("b") and not aborted.claim("b") and aborted.take("b") == "skip"
    aborted.add(["d"])
    assert aborted.take("d") == "abort" and not aborted.claim("d")
    aborted.add(["e"])
    aborted.claim("e")
    aborted.add(["e"])  # marked again while claimed: still answered
    assert aborted.take("e") == "skip"


def test_engine_log_level_accepts_names_and_numbers() -> None:
    """ipyparallel passes numeric levels (``Cluster(log_level=40)``)."""
    from ferroparallel.engine.app import build_parser

    parser = build_parser()
    assert parser.parse_args(["--log-level", "40"]).log_level == "ERROR"
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud"])


def test_stdin_link_reads_info_and_follows_the_launcher() -> None:
    import io
    import json as _json

    from ferroparallel.engine import stdin_link

    info = {"key": "k", "interface": "tcp://127.0.0.1"}
    stream = io.BytesIO(_json.dumps(info).encode() + b"\nsignal 0\njunk\n")
    assert stdin_link.read_info(stream) == info
    with pytest.raises(ValueError, match="no connection info"):
        stdin_link.read_info(io.BytesIO(b""))
    with pytest.raises(ValueError, match="not JSON"):
        stdin_link.read_info(io.BytesIO(b"{oops\n"))

    class Kernel:
        code = None

        def request_exit(self, code: int) -> None:
            self.code = code

    kernel, ended = Kernel(), []
    t = stdin_link.follow(kernel, stream, on_eof=lambda: ended.append(True))
    t.join(5)
    assert kernel.code == 0 and ended == [True]  # signal 0 delivered harmlessly, junk ignored


def test_controller_patience_is_ipyparallels() -> None:
    """Reference: the engine gives up after 50 checks, each every heartbeat period + 0.5 s."""
    from ferroparallel.engine.kernel import EngineConfig
    from ferroparallel.engine.liveness import Liveness

    assert EngineConfig().max_missed_pings == 50
    assert Liveness(None, 3.0, 50).limit == 175.0
    assert Liveness(None, 0.2, 3).limit == pytest.approx(2.1)


def test_unreachable_arguments_are_an_unmet_dependency_only_for_engines_that_joined_later() -> None:
    """A load-balanced task lists the engines the client knew could reach its lent arguments;
    one of those failing means the lender is gone (the task fails), another engine answers
    it as an unmet dependency (the scheduler tries elsewhere)."""
    from ferroparallel.engine.execute import _unreachable
    from ferroparallel.serialize.shm import DataUnreachable
    from ferroparallel.wire_names import LENT_TO_KEY

    exc = DataUnreachable("buffers lent by a process on another host")
    md = {"retries": 0, LENT_TO_KEY: ["e0", "e1"]}
    assert _unreachable(exc, md, "e2").ename == "UnmetDependency"
    assert "another host" in _unreachable(exc, md, "e2").evalue
    assert _unreachable(exc, md, "e1").ename == "DataUnreachable"
    assert _unreachable(exc, {"retries": 0}, "e2").ename == "DataUnreachable"
    assert _unreachable(exc, None, "e2").ename == "DataUnreachable"
