"""Raw pyzmq peers against the real controller, and a raw client against a real engine.

The fake engine and the fake client are written with plain pyzmq sockets and the pure-Python
envelope of ``tests/peer/session.py``; nothing of ferroparallel's Rust I/O is on their side of
the wire, so these tests check the controller (and the engine) from the outside.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zmq

from cluster_util import (
    ControllerProcess,
    HeartEcho,
    connect,
    drain,
    peer_session,
    recv_until,
    running_cluster,
    start_controller,
    wait_until,
)
from ferroparallel.cluster import Cluster
from ferroparallel.serialize import load_object, pack_apply_message
from peer.session import DELIMITER, new_id, recv_frames

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


# fp_root (a private FERROPARALLEL_DIR) and zctx are fixtures of cluster_util (a pytest plugin).
pytestmark = pytest.mark.usefixtures("fp_root")


@pytest.fixture
def controller(fp_root: Path) -> Iterator[ControllerProcess]:
    """A real controller process (``--ping 200``), stopped after the test."""
    ctl = start_controller(fp_root / "profile_raw", "--ping", "200", "--log-level", "DEBUG")
    try:
        yield ctl
    finally:
        ctl.stop()


def test_fake_engine_and_fake_client_through_real_controller(
    controller: ControllerProcess, zctx: zmq.Context
) -> None:
    ctl = controller
    client_s = peer_session(ctl.client)
    engine_uuid = new_id()
    engine_s = peer_session(ctl.engine, session=engine_uuid)
    ident = engine_uuid.encode()

    # -- the fake client: query, mux and task DEALERs, iopub and notification SUBs -------------
    query = connect(zctx, zmq.DEALER, ctl.client_url("registration"))
    mux = connect(zctx, zmq.DEALER, ctl.client_url("mux"))
    task = connect(zctx, zmq.DEALER, ctl.client_url("task"))
    notif = connect(zctx, zmq.SUB, ctl.client_url("notification"), subscribe=b"")
    iopub = connect(zctx, zmq.SUB, ctl.client_url("iopub"), subscribe=b"")

    hdr = client_s.send(query, "connection_request", {})
    reply = recv_until(client_s, query, lambda m: m["msg_type"] == "connection_reply")
    assert reply["parent_header"]["msg_id"] == hdr["msg_id"]
    assert reply["content"]["status"] == "ok"
    assert engine_uuid not in reply["content"]["engines"].values()

    # -- the fake engine: shell ROUTER on mux and task, iopub PUB, heart, then registration ------
    shell = connect(
        zctx, zmq.ROUTER, [ctl.engine_url("mux"), ctl.engine_url("task")], identity=ident
    )
    eng_iopub = connect(zctx, zmq.PUB, ctl.engine_url("iopub"), identity=ident)
    heart = HeartEcho(zctx, ctl.engine_url("hb_ping"), ctl.engine_url("hb_pong"), ident)
    heart.start()
    try:
        assert heart.ready.wait(10) and heart.error is None, heart.error
        registrar = connect(zctx, zmq.DEALER, ctl.engine_url("registration"), identity=ident)
        hdr = engine_s.send(registrar, "registration_request", {"uuid": engine_uuid})
        reg = recv_until(engine_s, registrar, lambda m: m["msg_type"] == "registration_reply")
        assert reg["parent_header"]["msg_id"] == hdr["msg_id"]
        assert reg["content"]["status"] == "ok", reg["content"]
        eid = reg["content"]["id"]
        assert isinstance(eid, int) and eid >= 0
        assert reg["content"]["hb_period"] == 200
        # as ipyparallel's hub: the engine connection settings, without the key
        info = reg["content"]["connection_info"]
        assert info["registration"] == int(ctl.engine_url("registration").rsplit(":", 1)[1])
        assert info["signature_scheme"] == "hmac-sha256" and "key" not in info

        note = recv_until(
            client_s,
            notif,
            lambda m: m["msg_type"] == "registration_notification",
            what="registration_notification",
        )
        assert note["content"] == {"id": eid, "uuid": engine_uuid}
        assert heart.echoed > 0

        client_s.send(query, "connection_request", {})
        reply = recv_until(client_s, query, lambda m: m["msg_type"] == "connection_reply")
        assert reply["content"]["engines"] == {str(eid): engine_uuid}

        # -- execute_request: client -> mux -> engine; stream on iopub; reply back ----------
        code = "print('hello from the fake engine')"
        ex_hdr = client_s.send(
            mux,
            "execute_request",
            {"code": code, "silent": False, "user_expressions": {}},
            metadata={"label": "raw"},
            ident=ident,
        )
        req = recv_until(engine_s, shell, lambda m: True, what="execute_request on the engine")
        assert req["msg_type"] == "execute_request"
        assert req["header"] == ex_hdr  # relayed untouched, still verifiable with the key
        assert req["content"]["code"] == code
        assert req["metadata"] == {"label": "raw"}
        assert len(req["idents"]) == 2 and req["idents"][0] == b"mux_out"
        client_zid = req["idents"][1]

        engine_s.send(
            eng_iopub,
            "stream",
            {"name": "stdout", "text": "hello from the fake engine\n"},
            parent=req["header"],
            metadata={"engine": engine_uuid},
            ident=f"engine.{eid}.stdout".encode(),
        )
        engine_s.send(
            shell,
            "execute_reply",
            {"status": "ok", "execution_count": 1, "user_expressions": {}, "payload": []},
            parent=req["header"],
            metadata={"engine": engine_uuid, "status": "ok"},
            ident=req["idents"],
        )
        out = recv_until(
            client_s,
            iopub,
            lambda m: m["msg_type"] == "stream",
            what="stream output on iopub",
        )
        assert out["idents"] == [f"engine.{eid}.stdout".encode()]
        assert out["parent_header"]["msg_id"] == ex_hdr["msg_id"]
        assert out["content"]["text"] == "hello from the fake engine\n"
        rep = recv_until(client_s, mux, lambda m: True, what="execute_reply")
        assert rep["msg_type"] == "execute_reply"
        assert rep["idents"] == [ident]
        assert rep["parent_header"]["msg_id"] == ex_hdr["msg_id"]
        assert rep["metadata"]["engine"] == engine_uuid

        # -- apply_request with 1 MiB of buffers, both ways ---------------------------------
        bufs = [os.urandom(MIB // 2), b"\x07" * (MIB // 4), bytes(range(256)) * (MIB // 1024)]
        assert sum(len(b) for b in bufs) == MIB
        ap_hdr = client_s.send(mux, "apply_request", {}, ident=ident, buffers=bufs)
        req = recv_until(engine_s, shell, lambda m: True, what="apply_request on the engine")
        assert req["msg_type"] == "apply_request"
        assert req["header"]["msg_id"] == ap_hdr["msg_id"]
        assert req["idents"] == [b"mux_out", client_zid]
        assert [bytes(b) for b in req["buffers"]] == bufs
        result = [hashlib.sha256(b"".join(bytes(b) for b in req["buffers"])).digest(), bufs[0]]
        engine_s.send(
            shell,
            "apply_reply",
            {"status": "ok"},
            parent=req["header"],
            metadata={"engine": engine_uuid, "status": "ok"},
            ident=req["idents"],
            buffers=result,
        )
        rep = recv_until(client_s, mux, lambda m: True, what="apply_reply")
        assert rep["msg_type"] == "apply_reply"
        assert rep["parent_header"]["msg_id"] == ap_hdr["msg_id"]
        assert rep["content"] == {"status": "ok"}
        assert [bytes(b) for b in rep["buffers"]] == result

        # -- a load-balanced apply_request reaches the only engine through the task channel ---
        tk_hdr = client_s.send(task, "apply_request", {}, buffers=[b"task-payload"])
        req = recv_until(engine_s, shell, lambda m: True, what="task apply_request")
        assert req["header"]["msg_id"] == tk_hdr["msg_id"]
        assert req["idents"][0] == b"task_out" and len(req["idents"]) == 2
        assert [bytes(b) for b in req["buffers"]] == [b"task-payload"]
        engine_s.send(
            shell,
            "apply_reply",
            {"status": "ok"},
            parent=req["header"],
            metadata={"engine": engine_uuid, "status": "ok"},
            ident=req["idents"],
            buffers=[b"done"],
        )
        rep = recv_until(client_s, task, lambda m: True, what="task apply_reply")
        assert rep["parent_header"]["msg_id"] == tk_hdr["msg_id"]
        assert [bytes(b) for b in rep["buffers"]] == [b"done"]

        # -- the engine leaves with a direct request unanswered: unregistration_request ->
        # unregistration_notification, and (as ipyparallel's hub) no reply for the stranded
        # request: the client fails it itself
        stranded = client_s.send(mux, "apply_request", {}, ident=ident, buffers=[b"x"])
        req = recv_until(engine_s, shell, lambda m: True, what="the stranded apply_request")
        assert req["header"]["msg_id"] == stranded["msg_id"]
        engine_s.send(registrar, "unregistration_request", {"id": eid})
        note = recv_until(
            client_s,
            notif,
            lambda m: m["msg_type"] == "unregistration_notification",
            what="unregistration_notification",
        )
        assert note["content"] == {"id": eid, "uuid": engine_uuid}
        assert not mux.poll(1000), "the controller answered a request stranded on a dead engine"
        client_s.send(query, "connection_request", {})
        reply = recv_until(client_s, query, lambda m: m["msg_type"] == "connection_reply")
        assert reply["content"]["engines"] == {}
    finally:
        heart.stop()
    assert ctl.alive, ctl.log()


def test_fake_engine_that_never_beats_is_not_registered(
    controller: ControllerProcess, zctx: zmq.Context
) -> None:
    """A registration without heartbeats stays pending: no notification, not in connection_reply;
    and a second registration of the same uuid is refused."""
    ctl = controller
    client_s = peer_session(ctl.client)
    uuid = new_id()
    engine_s = peer_session(ctl.engine, session=uuid)
    notif = connect(zctx, zmq.SUB, ctl.client_url("notification"), subscribe=b"")
    query = connect(zctx, zmq.DEALER, ctl.client_url("registration"))
    registrar = connect(zctx, zmq.DEALER, ctl.engine_url("registration"), identity=uuid.encode())
    engine_s.send(registrar, "registration_request", {"uuid": uuid})
    reg = recv_until(engine_s, registrar, lambda m: m["msg_type"] == "registration_reply")
    assert reg["content"]["status"] == "ok"
    engine_s.send(registrar, "registration_request", {"uuid": uuid})
    again = recv_until(engine_s, registrar, lambda m: m["msg_type"] == "registration_reply")
    assert again["content"]["status"] == "error"
    assert again["content"]["ename"] == "KeyError"
    # a uuid no ZMQ identity can hold (1..255 bytes) is refused, and not logged in full
    engine_s.send(registrar, "registration_request", {"uuid": "u" * 100_000})
    huge = recv_until(engine_s, registrar, lambda m: m["msg_type"] == "registration_reply")
    assert huge["content"]["ename"] == "ValueError"
    assert "100000 bytes" in huge["content"]["evalue"]
    assert "u" * 300 not in ctl.log()
    assert drain(notif, quiet=0.6) == []
    client_s.send(query, "connection_request", {})
    reply = recv_until(client_s, query, lambda m: m["msg_type"] == "connection_reply")
    assert reply["content"]["engines"] == {}


def _first_engine(client_s: Any, query: zmq.Socket) -> tuple[int, str] | None:
    client_s.send(query, "connection_request", {})
    reply = recv_until(client_s, query, lambda m: m["msg_type"] == "connection_reply")
    engines = reply["content"]["engines"]
    if not engines:
        return None
    k = min(engines, key=int)
    return int(k), engines[k]


def _raw_client(
    cluster: Any, zctx: zmq.Context, *channels: str
) -> tuple[Any, dict[str, zmq.Socket], tuple[int, str]]:
    """A raw client of ``cluster``: its session, sockets (``registration`` and ``channels``;
    ``iopub`` subscribes to everything) and the first engine, once one has registered."""
    info = json.loads(cluster.client_file.read_text())
    s = peer_session(info)
    base = "tcp://127.0.0.1:"
    socks = {
        name: connect(zctx, zmq.SUB, base + str(info[name]), subscribe=b"")
        if name == "iopub"
        else connect(zctx, zmq.DEALER, base + str(info[name]))
        for name in ("registration", *channels)
    }
    first = wait_until(
        lambda: _first_engine(s, socks["registration"]), timeout=30, what="the engine to register"
    )
    return s, socks, first


def test_raw_client_drives_real_engine(fp_root: Path, zctx: zmq.Context) -> None:
    """A raw pyzmq client sends a pack_apply_message payload to a real engine process."""
    with running_cluster(fp_root / "profile_real", 1) as cluster:
        client_s, socks, (eid, uuid) = _raw_client(cluster, zctx, "mux", "iopub")
        query, mux, iopub = socks["registration"], socks["mux"], socks["iopub"]

        # load_request: the requests each engine holds, by id (idle here)
        client_s.send(query, "load_request", {"targets": [eid]})
        load = recv_until(client_s, query, lambda m: True, timeout=10, what="load_reply")
        assert load["msg_type"] == "load_reply" and load["content"] == {"status": "ok", str(eid): 0}

        def work(data: bytes, scale: int) -> tuple[int, bytes, int]:
            print("working on", len(data), "bytes")
            return len(data), data[:4] + data[-4:], scale * 7

        payload = b"\x01\x02\x03\x04" + os.urandom(MIB) + b"\xfa\xfb\xfc\xfd"
        bufs = pack_apply_message(work, (payload,), {"scale": 6})
        assert len(bufs) > 2  # the 1 MiB argument travels as its own frame
        hdr = client_s.send(mux, "apply_request", {}, ident=uuid.encode(), buffers=bufs)
        rep = recv_until(client_s, mux, lambda m: True, timeout=30, what="apply_reply")
        assert rep["idents"] == [uuid.encode()]
        assert rep["msg_type"] == "apply_reply"
        assert rep["parent_header"]["msg_id"] == hdr["msg_id"]
        assert rep["content"]["status"] == "ok", rep["content"]
        assert rep["metadata"]["engine"] == uuid
        assert rep["metadata"]["status"] == "ok"
        result = load_object([bytes(b) for b in rep["buffers"]])
        assert result == (len(payload), b"\x01\x02\x03\x04\xfa\xfb\xfc\xfd", 42)

        out = recv_until(
            client_s,
            iopub,
            lambda m: (
                m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == hdr["msg_id"]
            ),
            timeout=10,
            what="the engine's stdout on iopub",
        )
        assert out["idents"][0].startswith(f"engine.{eid}.".encode())
        assert out["content"]["name"] == "stdout"
        assert out["content"]["text"].startswith(f"working on {len(payload)} bytes")
        assert out["metadata"].get("engine") == uuid

        # IOPub keeps the order of what the code did: text printed before a display, a result
        # or an error is published before it (as Jupyter kernels do)
        code = "print('A')\nfrom IPython.display import display\ndisplay('D1')\nprint('B')\n42"
        hdr = client_s.send(
            mux,
            "execute_request",
            {"code": code, "silent": False, "store_history": True},
            ident=uuid.encode(),
        )
        rep = recv_until(client_s, mux, lambda m: True, timeout=30, what="execute_reply")
        assert rep["content"]["status"] == "ok", rep["content"]
        seen: list[str] = []

        def ordered(m: dict[str, Any]) -> bool:
            mine = m["parent_header"].get("msg_id") == hdr["msg_id"]
            if mine and m["msg_type"] not in ("status", "execute_input"):
                c = m["content"]
                seen.append(c.get("text") or str((c.get("data") or {}).get("text/plain")))
            return "42" in seen

        recv_until(client_s, iopub, ordered, timeout=10, what="the outputs in order")
        assert "".join(seen).replace("\n", "") == "A'D1'B42", seen

        # A remote exception comes back as an error reply with the exception's name.
        def boom() -> None:
            raise ZeroDivisionError("raw boom")

        hdr = client_s.send(
            mux, "apply_request", {}, ident=uuid.encode(), buffers=pack_apply_message(boom)
        )
        rep = recv_until(client_s, mux, lambda m: True, timeout=30, what="error apply_reply")
        assert rep["parent_header"]["msg_id"] == hdr["msg_id"]
        assert rep["content"]["status"] == "error"
        assert rep["content"]["ename"] == "ZeroDivisionError"
        assert rep["content"]["evalue"] == "raw boom"
        assert rep["content"]["engine_info"]["engine_id"] == eid

        # A forged message for the engine is dropped (not relayed) and the engine keeps serving.
        mux.send_multipart([uuid.encode(), DELIMITER, b"0" * 64, b"x", b"{}", b"{}", b"{}"])
        hdr = client_s.send(
            mux,
            "apply_request",
            {},
            ident=uuid.encode(),
            buffers=pack_apply_message(pow, (2, 10)),
        )
        rep = recv_until(client_s, mux, lambda m: True, timeout=30, what="apply_reply")
        assert rep["parent_header"]["msg_id"] == hdr["msg_id"]
        assert load_object([bytes(b) for b in rep["buffers"]]) == 1024


def test_a_signed_task_with_unreadable_parts_does_not_stall_the_scheduler(
    fp_root: Path, zctx: zmq.Context
) -> None:
    """A validly signed task whose parent header (or content) does not unpack is dropped by
    the scheduler, as ipyparallel's: passed on, the engine would drop it unanswered and its
    slot would stay taken, so no later task would ever run there."""
    with running_cluster(fp_root / "profile_badparts", 1) as cluster:
        s, socks, _ = _raw_client(cluster, zctx, "task")
        query, task = socks["registration"], socks["task"]
        for bad_part in (3, 5):  # parent_header, content: [delim, sig, header, parent, md, content]
            header = s.msg_header("execute_request")
            parts = [s.pack(header), s.pack({}), s.pack({}), s.pack({"code": "1", "silent": True})]
            parts[bad_part - 2] = b"\xc1"  # never valid msgpack (nor JSON)
            task.send_multipart([DELIMITER, s.sign(parts), *parts])
            assert not task.poll(500), "the scheduler forwarded an unreadable task, or answered it"
            for _ in range(2):  # the engine's slot is free: well-formed tasks still run
                good = s.send(task, "execute_request", {"code": "x = 1", "silent": True})
                rep = recv_until(s, task, lambda m: True, timeout=15, what="a task reply")
                assert rep["parent_header"]["msg_id"] == good["msg_id"]
                assert rep["content"]["status"] == "ok"
        s.send(query, "queue_request", {"targets": None, "verbose": False})
        q = recv_until(s, query, lambda m: m["msg_type"] == "queue_reply")
        assert q["content"]["unassigned"] == 0 and q["content"]["0"]["tasks"] == 0


def test_signed_messages_that_are_no_requests_are_not_relayed(
    fp_root: Path, zctx: zmq.Context
) -> None:
    """A validly signed task or MUX message whose type is no ``*_request`` is dropped by the
    controller: an engine ignores it, so as a task it would hold the engine's slot for ever
    (no later task would run there) and the hub would list it as pending."""
    with running_cluster(fp_root / "profile_bogus", 1) as cluster:
        s, socks, (_, uuid_s) = _raw_client(cluster, zctx, "task", "mux")
        query, task, mux = socks["registration"], socks["task"], socks["mux"]
        uuid = uuid_s.encode()
        bogus = []
        for _ in range(3):  # more than the engine's slots
            bogus.append(s.send(task, "bogus_type_xyz", {}))
        bogus.append(s.send(mux, "stream", {"name": "stdout", "text": "x"}, ident=uuid))
        for _ in range(300):  # a flood is counted, not logged line by line
            s.send(task, "bogus_type_xyz", {})
        assert not task.poll(300) and not mux.poll(300)  # dropped, not answered
        for _ in range(2):
            good = s.send(task, "execute_request", {"code": "x = 1", "silent": True})
            rep = recv_until(s, task, lambda m: True, timeout=15, what="a task reply")
            assert rep["parent_header"]["msg_id"] == good["msg_id"]
        s.send(query, "db_request", {"query": {"completed": None}, "keys": ["msg_id"]})
        db = recv_until(s, query, lambda m: m["msg_type"] == "db_reply")
        pending = {r["msg_id"] for r in db["content"]["records"]}
        assert not pending & {h["msg_id"] for h in bogus}
        s.send(query, "queue_request", {"targets": None, "verbose": False})
        q = recv_until(s, query, lambda m: m["msg_type"] == "queue_reply")
        assert q["content"]["unassigned"] == 0 and q["content"]["0"]["tasks"] == 0
        log = Path(cluster.controller.process.log_file).read_text()
        assert 4 <= log.count("only *_request messages are relayed") <= 21, log[-2000:]


def _utc(text: str) -> datetime:
    """An ISO-8601 date as an aware datetime (naive means UTC, as ipyparallel's hub)."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def test_json_packer_cluster_for_a_raw_json_peer(fp_root: Path, zctx: zmq.Context) -> None:
    """Reference 2.4: with ``pack = json`` every packed part is JSON text, dates are ISO UTC
    with ``Z``; request header dates with an offset or none (naive = UTC) are recorded as the
    same instant, and ISO date strings in a ``db_request`` query compare as dates."""
    cluster = Cluster(
        n=1,
        profile_dir=fp_root / "profile_json",
        controller_args=["--ping", "200", "--pack", "json"],
        shutdown_atexit=False,
    )
    try:
        cluster.start_cluster_sync()
        info = json.loads(cluster.client_file.read_text())
        assert info["pack"] == info["unpack"] == "json"
        s, socks, (eid, uuid) = _raw_client(cluster, zctx, "mux", "iopub")
        query, mux, iopub = socks["registration"], socks["mux"], socks["iopub"]

        hdr = s.send(query, "connection_request", {})
        frames = recv_frames(query, timeout=10)
        parts = frames[frames.index(DELIMITER) + 2 :]
        assert len(parts) == 4
        header, parent, metadata, content = (json.loads(bytes(p).decode("utf-8")) for p in parts)
        assert header["msg_type"] == "connection_reply" and header["date"].endswith("Z")
        assert parent == hdr and metadata == {}
        assert content["engines"] == {str(eid): uuid}

        sent = {
            "2031-02-03T04:05:06.250000Z": "2031-02-03T04:05:06.250000+00:00",
            "2031-02-03T04:05:07.5+00:00": "2031-02-03T04:05:07.500000+00:00",
            "2031-02-03T04:05:08.125": "2031-02-03T04:05:08.125000+00:00",
            "2031-02-03T06:05:09+02:00": "2031-02-03T04:05:09+00:00",
        }
        msg_ids = []
        for date, instant in sent.items():
            header = s.msg_header("execute_request")
            header["date"] = date
            s.send(
                mux,
                "execute_request",
                {"code": "print('j')", "silent": False, "user_expressions": {}},
                ident=uuid.encode(),
                header=header,
            )
            rep = recv_until(s, mux, lambda m: True, timeout=20, what="execute_reply")
            assert rep["parent_header"] == header and rep["content"]["status"] == "ok"
            assert rep["header"]["date"].endswith("Z")
            assert rep["metadata"]["started"].endswith("Z")
            out = recv_until(s, iopub, lambda m: m["msg_type"] == "stream", timeout=10)
            assert out["idents"] == [f"engine.{eid}.stdout".encode()]
            assert out["parent_header"] == header
            msg_ids.append(header["msg_id"])
            s.send(query, "db_request", {"query": {"msg_id": header["msg_id"]}, "keys": None})
            db = recv_until(s, query, lambda m: m["msg_type"] == "db_reply")
            (record,) = db["content"]["records"]
            assert record["submitted"].endswith("Z"), record["submitted"]
            assert _utc(record["submitted"]) == _utc(instant), (date, record["submitted"])
            assert record["header"] == header  # the request as sent, date text included
            for key in ("started", "completed", "received"):
                assert record[key].endswith("Z"), (key, record[key])

        def ids(query_: dict[str, Any]) -> list[str]:
            s.send(query, "db_request", {"query": query_, "keys": ["msg_id"]})
            db = recv_until(s, query, lambda m: m["msg_type"] == "db_reply")
            assert db["content"]["status"] == "ok", db["content"]
            return sorted(r["msg_id"] for r in db["content"]["records"])

        assert ids({"submitted": {"$gte": "2031-02-03T04:05:07Z"}}) == sorted(msg_ids[1:])
        assert ids({"submitted": {"$lt": "2031-02-03T06:05:07.000+02:00"}}) == msg_ids[:1]
    finally:
        cluster.stop_cluster_sync()


def test_engine_and_hub_shutdown_as_a_raw_peer_sees_them(fp_root: Path, zctx: zmq.Context) -> None:
    """Reference 5.4, 3.2 and 5.2: ``shutdown_request`` on control is answered with
    ``shutdown_reply {status, restart}``, also published on ``engine.<id>.shutdown``, and the
    engine is unregistered; the hub's ``shutdown_request`` is answered, then
    ``shutdown_notification {status: ok}`` goes out with that request as parent."""
    with running_cluster(fp_root / "profile_shutdown", 1) as cluster:
        s, socks, (eid, uuid) = _raw_client(cluster, zctx, "control", "iopub")
        query, control, iopub = socks["registration"], socks["control"], socks["iopub"]
        info = json.loads(cluster.client_file.read_text())
        notif = connect(zctx, zmq.SUB, f"tcp://127.0.0.1:{info['notification']}", subscribe=b"")

        hdr = s.send(control, "shutdown_request", {"restart": False}, ident=uuid.encode())
        rep = recv_until(s, control, lambda m: True, timeout=20, what="shutdown_reply")
        assert rep["msg_type"] == "shutdown_reply" and rep["idents"] == [uuid.encode()]
        assert rep["parent_header"] == hdr and rep["header"]["session"] == uuid
        assert rep["content"] == {"status": "ok", "restart": False}
        pub = recv_until(
            s, iopub, lambda m: m["msg_type"] == "shutdown_reply", timeout=10, what="iopub copy"
        )
        assert pub["idents"] == [f"engine.{eid}.shutdown".encode()]
        assert pub["parent_header"] == hdr and pub["content"] == rep["content"]
        note = recv_until(
            s,
            notif,
            lambda m: m["msg_type"] == "unregistration_notification",
            timeout=20,
            what="unregistration_notification",
        )
        assert note["content"] == {"id": eid, "uuid": uuid}

        hdr = s.send(query, "shutdown_request", {})
        rep = recv_until(s, query, lambda m: m["msg_type"] == "shutdown_reply", timeout=10)
        assert rep["parent_header"] == hdr and rep["content"] == {"status": "ok"}
        note = recv_until(
            s,
            notif,
            lambda m: m["msg_type"] == "shutdown_notification",
            timeout=10,
            what="shutdown_notification",
        )
        assert note["content"] == {"status": "ok"}
        assert note["parent_header"] == hdr  # as ipyparallel's hub


def test_requested_engine_ids_and_heartbeat_frames(
    controller: ControllerProcess, zctx: zmq.Context
) -> None:
    """Reference 3.1-3.3: a requested id is granted when free (and the counter moves past
    it), else the counter's next id; the reply echoes the request and carries ``id``,
    ``hb_period`` and ``connection_info``; a ping is one frame, the ASCII text of a float;
    ``unregistration_request`` is never answered, and a freed id can be requested again."""
    ctl = controller
    client_s = peer_session(ctl.client)
    notif = connect(zctx, zmq.SUB, ctl.client_url("notification"), subscribe=b"")
    ping = connect(zctx, zmq.SUB, ctl.engine_url("hb_ping"), subscribe=b"")
    frames = recv_frames(ping, timeout=5)
    assert len(frames) == 1 and float(frames[0].decode("ascii")) >= 0, frames

    def register(uuid: str, wanted: int) -> tuple[Any, zmq.Socket, dict[str, Any]]:
        s = peer_session(ctl.engine, session=uuid)
        registrar = connect(
            zctx, zmq.DEALER, ctl.engine_url("registration"), identity=uuid.encode()
        )
        hdr = s.send(registrar, "registration_request", {"uuid": uuid, "id": wanted})
        reg = recv_until(s, registrar, lambda m: m["msg_type"] == "registration_reply")
        assert reg["parent_header"] == hdr and reg["idents"] == []
        c = reg["content"]
        assert c["status"] == "ok" and c["hb_period"] == 200, c
        assert isinstance(c["connection_info"], dict) and "key" not in c["connection_info"]
        return s, registrar, reg

    uuid_a, uuid_b, uuid_c = new_id(), new_id(), new_id()
    heart = HeartEcho(zctx, ctl.engine_url("hb_ping"), ctl.engine_url("hb_pong"), uuid_a.encode())
    heart.start()
    try:
        assert heart.ready.wait(10) and heart.error is None, heart.error
        s_a, reg_a, rep = register(uuid_a, 5)
        assert rep["content"]["id"] == 5
        note = recv_until(
            client_s, notif, lambda m: m["msg_type"] == "registration_notification", timeout=10
        )
        assert note["content"] == {"id": 5, "uuid": uuid_a}
        _, _, rep = register(uuid_b, 5)  # taken: the counter, which moved past 5
        assert rep["content"]["id"] == 6
        s_a.send(reg_a, "unregistration_request", {"id": 5})
        note = recv_until(
            client_s, notif, lambda m: m["msg_type"] == "unregistration_notification", timeout=10
        )
        assert note["content"] == {"id": 5, "uuid": uuid_a}
        assert not reg_a.poll(500), "unregistration_request was answered"
    finally:
        heart.stop()
    _, _, rep = register(uuid_c, 5)  # free again
    assert rep["content"]["id"] == 5
    assert ctl.alive, ctl.log()
