"""Wire parity with ipyparallel 9.2, checked from the outside with raw pyzmq.

Each test pins an answer where a differential probe against ipyparallel's own controller and
engines found ours different (the ipyparallel behaviour is quoted in each docstring). A raw
client (``tests/peer/session.py``, no ferroparallel I/O on its side) talks to a real
controller with two real ferroparallel engines.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from cluster_util import connect, peer_session, wait_until
from ferroparallel.cluster import Cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

#: Reply metadata every ipyparallel engine sends (``engine/kernel.py`` init_metadata).
IPP_REPLY_METADATA = {
    "started",
    "dependencies_met",
    "engine",
    "is_broadcast",
    "is_coalescing",
    "original_msg_id",
    "label",
    "status",
}


#: A jupyter_client session id (``new_id()``): 8 + 24 hex digits.
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{24}")
#: ISO-8601 UTC with the ``Z`` suffix (reference 2.2).
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def check_header(header: dict[str, Any], msg_type: str, session: str | None = None) -> None:
    """Reference 2.2: every header field, ``msg_id`` = ``<session>_<pid>_<counter>``, a UTC
    ``Z`` date and a protocol 5 ``version`` (else jupyter_client adapts it from v4)."""
    assert header["msg_type"] == msg_type, header
    assert SESSION_ID.fullmatch(header["session"]), header
    if session is not None:
        assert header["session"] == session, header
    assert re.fullmatch(re.escape(header["session"]) + r"_\d+_\d+", header["msg_id"]), header
    assert isinstance(header["username"], str) and header["username"], header
    assert ISO_UTC.fullmatch(header["date"]), header
    assert re.fullmatch(r"5\.\d+", header["version"]), header


class Raw:
    """A raw client: query, mux, control and broadcast DEALERs and an IOPub SUB."""

    def __init__(self, cluster: Cluster, zctx: zmq.Context) -> None:
        self.info = json.loads(cluster.client_file.read_text())
        self.s = peer_session(self.info)
        base = "tcp://127.0.0.1:"
        self.socks = {
            name: connect(zctx, zmq.DEALER, base + str(self.info[name]))
            for name in ("registration", "mux", "task", "control", "broadcast")
        }
        self.iopub = connect(zctx, zmq.SUB, base + str(self.info["iopub"]), subscribe=b"")
        self.engines: dict[int, str] = {}

    def request(
        self, channel: str, msg_type: str, content: dict[str, Any], **kw: Any
    ) -> dict[str, Any]:
        """Send and wait for the reply whose parent is this request."""
        hdr = self.s.send(self.socks[channel], msg_type, content, **kw)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = self.s.recv(self.socks[channel], timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == hdr["msg_id"]:
                assert msg["parent_header"] == hdr  # the whole request header (reference 2.2)
                return msg
        pytest.fail(f"no reply to {msg_type}")

    def query(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        return self.request("registration", msg_type, content)

    def wait_engines(self, n: int = 2) -> None:
        def ask() -> dict[int, str] | None:
            engines = self.query("connection_request", {})["content"].get("engines") or {}
            return {int(k): v for k, v in engines.items()} if len(engines) >= n else None

        self.engines = wait_until(ask, timeout=60, what=f"{n} engines")

    def execute(self, eid: int, code: str, **kw: Any) -> dict[str, Any]:
        content = {"code": code, "silent": True, "user_expressions": {}}
        return self.request(
            "mux", "execute_request", content, ident=self.engines[eid].encode(), **kw
        )

    def outputs_until_idle(self, msg_id: str, timeout: float = 20) -> list[dict[str, Any]]:
        """IOPub messages whose parent is ``msg_id``, up to its ``status: idle``."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.iopub.poll(int(max(0.01, deadline - time.monotonic()) * 1000)):
                break
            msg = self.s.deserialize(self.iopub.recv_multipart(), record=False)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            out.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
        pytest.fail(f"no idle status for {msg_id} (saw {[m['msg_type'] for m in out]})")

    def iopub_for(self, msg_id: str, quiet: float = 0.5) -> list[dict[str, Any]]:
        """IOPub messages whose parent is ``msg_id`` (until ``quiet`` s without any)."""
        out = []
        while self.iopub.poll(int(quiet * 1000)):
            msg = self.s.deserialize(self.iopub.recv_multipart(), record=False)
            if msg["parent_header"].get("msg_id") == msg_id:
                out.append(msg)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("parity")
    with pytest.MonkeyPatch.context() as mp:  # one cluster for the module, in its own root
        mp.setenv("FERROPARALLEL_DIR", str(root / "fproot"))
        c = Cluster(
            n=2,
            profile_dir=root / "profile_parity",
            controller_args=["--ping", "200"],
            shutdown_atexit=False,
        )
        try:
            c.start_cluster_sync()
            yield c
        finally:
            c.stop_cluster_sync()


@pytest.fixture
def raw(cluster: Cluster, zctx: zmq.Context) -> Raw:
    r = Raw(cluster, zctx)
    r.wait_engines(2)
    return r


def test_shell_reply_metadata_has_every_ipyparallel_key(raw: Raw) -> None:
    """ipyparallel engines always send ``is_broadcast``/``is_coalescing`` (False),
    ``original_msg_id`` ("") and ``label`` (None, or the request's) in reply metadata."""
    rep = raw.execute(0, "x = 1")
    md = rep["metadata"]
    assert IPP_REPLY_METADATA <= set(md), md
    assert md["is_broadcast"] is False and md["is_coalescing"] is False
    assert md["original_msg_id"] == "" and md["label"] is None
    rep = raw.execute(1, "1/0", metadata={"label": "mine"})
    assert rep["content"]["status"] == "error"
    assert IPP_REPLY_METADATA <= set(rep["metadata"])
    assert rep["metadata"]["label"] == "mine"
    rep = raw.request("mux", "kernel_info_request", {}, ident=raw.engines[0].encode())
    assert IPP_REPLY_METADATA <= set(rep["metadata"])
    info = rep["content"]["language_info"]
    assert info["pygments_lexer"] == "ipython3" and info["nbconvert_exporter"] == "python"


def test_comm_info_request_on_shell_and_control(raw: Raw) -> None:
    """ipykernel answers ``comm_info_request`` with ``{status: ok, comms: {}}``."""
    ident = raw.engines[0].encode()
    for channel in ("mux", "control"):
        rep = raw.request(channel, "comm_info_request", {}, ident=ident)
        assert rep["msg_type"] == "comm_info_reply"
        assert rep["content"] == {"status": "ok", "comms": {}}


def test_usage_request_on_control(raw: Raw) -> None:
    """ipykernel answers ``usage_request`` (control) with the kernel's resource usage."""
    rep = raw.request("control", "usage_request", {}, ident=raw.engines[1].encode())
    assert rep["msg_type"] == "usage_reply"
    c = rep["content"]
    assert isinstance(c["hostname"], str) and isinstance(c["pid"], int)
    assert isinstance(c["cpu_count"], int)


def test_control_requests_publish_busy_idle(raw: Raw) -> None:
    """ipykernel publishes ``status`` busy then idle on IOPub around every control request,
    with the request as parent."""
    raw.iopub_for("", quiet=0.3)  # drain
    ident = raw.engines[0].encode()
    for msg_type in ("clear_request", "abort_request", "kernel_info_request"):
        content = {"msg_ids": []} if msg_type == "abort_request" else {}
        rep = raw.request("control", msg_type, content, ident=ident)
        assert rep["content"]["status"] == "ok"
        states = [
            m["content"]["execution_state"]
            for m in raw.iopub_for(rep["parent_header"]["msg_id"])
            if m["msg_type"] == "status"
        ]
        assert states == ["busy", "idle"], (msg_type, states)


def test_hub_errors_as_ipyparallel(raw: Raw) -> None:
    """ipyparallel's hub: unknown type → ``KeyError`` "Bad Message Type: '<type>'"; purging
    a pending task → ``IndexError``; every error content carries ``engine_info: {}``."""
    rep = raw.query("foo_request", {})
    assert rep["msg_type"] == "hub_error"
    c = rep["content"]
    assert (c["status"], c["ename"]) == ("error", "KeyError")
    assert c["evalue"] == "Bad Message Type: 'foo_request'"
    assert c["engine_info"] == {}

    rep = raw.query("queue_request", {"targets": [99], "verbose": False})
    assert rep["content"]["ename"] == "IndexError" and rep["content"]["engine_info"] == {}
    rep = raw.query("result_request", {"msg_ids": ["no-such-id"], "status_only": False})
    assert rep["content"]["ename"] == "KeyError" and rep["content"]["engine_info"] == {}
    # a records handler's failure is its own reply type, with the error content
    assert rep["msg_type"] == "result_reply"
    for msg_type, content in [
        ("resubmit_request", {"msg_ids": ["no-such-id"]}),
        ("db_request", {"query": {"msg_id": {"$badop": 1}}, "keys": None}),
    ]:
        rep = raw.query(msg_type, content)
        assert rep["msg_type"] == msg_type.replace("_request", "_reply"), rep["msg_type"]
        assert rep["content"]["status"] == "error" and rep["content"]["engine_info"] == {}

    ident = raw.engines[1].encode()
    hdr = raw.s.send(
        raw.socks["mux"],
        "execute_request",
        {"code": "import time; time.sleep(1.5)", "silent": True, "user_expressions": {}},
        ident=ident,
    )
    wait_until(
        lambda: raw.query("result_request", {"msg_ids": [hdr["msg_id"]], "status_only": True})[
            "content"
        ].get("pending"),
        what="the sleeper's pending record",
    )
    rep = raw.query("purge_request", {"msg_ids": [hdr["msg_id"]]})
    assert rep["msg_type"] == "purge_reply" and rep["content"]["status"] == "error"
    assert rep["content"]["ename"] == "IndexError"
    assert rep["content"]["engine_info"] == {}
    raw.s.recv(raw.socks["mux"], timeout=10)  # the sleeper's reply


def test_scheduler_failures_as_ipyparallel(raw: Raw) -> None:
    """Reference 8.5: a failure made by the scheduler is an ``apply_reply`` (or
    ``execute_reply``) whose parent is the request, content a wrapped exception (with an empty
    ``engine_info``: no engine ran it) and metadata empty."""
    content = {"code": "1", "silent": True, "user_expressions": {}}
    for md, ename in [
        ({"after": ["no-such-task"]}, "InvalidDependency"),
        ({"targets": ["no-such-engine"]}, "ImpossibleDependency"),
    ]:
        rep = raw.request("task", "execute_request", content, metadata=md)
        assert rep["msg_type"] == "execute_reply"
        c = rep["content"]
        assert (c["status"], c["ename"], c["engine_info"]) == ("error", ename, {}), c
        assert rep["metadata"] == {}


def test_db_reply_buffer_lens_are_counts(raw: Raw) -> None:
    """ipyparallel's hub sends ``buffer_lens``/``result_buffer_lens`` as the number of
    buffers of each record (its client slices ``buffers[:n]``)."""
    rep = raw.execute(0, "y = 2")
    mid = rep["parent_header"]["msg_id"]
    rep = raw.query(
        "db_request",
        {"query": {"msg_id": mid}, "keys": ["msg_id", "buffers", "result_buffers"]},
    )
    c = rep["content"]
    assert c["status"] == "ok" and [r["msg_id"] for r in c["records"]] == [mid]
    assert c["buffer_lens"] == [0] and c["result_buffer_lens"] == [0]
    rep = raw.query("db_request", {"query": {"msg_id": mid}, "keys": ["msg_id"]})
    assert rep["content"]["buffer_lens"] is None
    assert rep["content"]["result_buffer_lens"] is None


def test_db_query_buffers_through_our_client(cluster: Cluster) -> None:
    """Our client reads the per-record counts back into each record's buffers."""
    from ferroparallel import Client

    rc = Client(cluster.client_file, timeout=20)
    try:
        rc.wait_for_engines(2, timeout=30)
        ar = rc[0].apply_async(lambda: b"r" * 4096)
        ar.get(timeout=20)
        mid = ar.msg_ids[0]
        recs = rc.db_query({"msg_id": mid}, keys=["msg_id", "buffers", "result_buffers"])
        assert len(recs) == 1
        assert len(recs[0]["buffers"]) >= 1 and len(recs[0]["result_buffers"]) >= 1
    finally:
        rc.close()


def test_history_lists_submitted_requests_only(raw: Raw) -> None:
    """ipyparallel's hub history lists requests it saw submitted: the per-engine msg_ids of a
    broadcast, known only from their IOPub output, are not in it."""
    md = {
        "targets": [[raw.engines[0], 0], [raw.engines[1], 1]],
        "is_broadcast": True,
        "is_coalescing": False,
    }
    hdr = raw.s.send(
        raw.socks["broadcast"],
        "execute_request",
        {"code": "print('out')", "silent": False, "user_expressions": {}},
        metadata=md,
    )
    replies = [raw.s.recv(raw.socks["broadcast"], timeout=20) for _ in range(2)]
    assert all(r["content"]["status"] == "ok" for r in replies)
    sub_ids = {r["parent_header"]["msg_id"] for r in replies}
    time.sleep(0.5)  # the stream output reaches the hub too
    history = raw.query("history_request", {})["content"]["history"]
    assert not sub_ids & set(history)
    assert hdr["msg_id"] not in history  # broadcasts are not recorded (reference §14.5)
    mid = raw.execute(0, "z = 3")["parent_header"]["msg_id"]
    assert mid in raw.query("history_request", {})["content"]["history"]


def test_iopub_topics_headers_and_contents(raw: Raw) -> None:
    """Reference 1.5 and 5.5: each output of an execute goes out on ``engine.<id>.<kind>``
    (``stdout``, ``stderr``, ``displaypub``, ``execute_input``, ``execute_result``, ``error``,
    ``status``) with the content keys of its type, the engine's session in the header, the
    request header as parent, and the engine uuid in metadata; busy first, idle last."""
    raw.iopub_for("", quiet=0.3)  # drain
    eid, uuid = 1, raw.engines[1]
    code = (
        "import sys\nfrom IPython.display import display\n"
        "print('out')\nprint('err', file=sys.stderr)\ndisplay('D')\n6 * 7"
    )
    rep = raw.request(
        "mux",
        "execute_request",
        {"code": code, "silent": False, "store_history": True, "user_expressions": {}},
        ident=uuid.encode(),
    )
    check_header(rep["header"], "execute_reply", session=uuid)
    assert rep["idents"] == [uuid.encode()]
    request = rep["parent_header"]
    outputs = raw.outputs_until_idle(request["msg_id"])
    kinds = {
        "status": ("status", {"execution_state"}),
        "execute_input": ("execute_input", {"code", "execution_count"}),
        "stream": (None, {"name", "text"}),
        "display_data": ("displaypub", {"data", "metadata", "transient"}),
        "execute_result": ("execute_result", {"data", "metadata", "execution_count"}),
        "error": ("error", {"ename", "evalue", "traceback"}),
    }
    for m in outputs:
        topic, keys = kinds[m["msg_type"]]
        if topic is None:
            topic = m["content"]["name"]
        assert m["idents"] == [f"engine.{eid}.{topic}".encode()], m["idents"]
        assert keys <= set(m["content"]), (m["msg_type"], m["content"])
        check_header(m["header"], m["msg_type"], session=uuid)
        assert m["parent_header"] == request
        assert m["metadata"].get("engine") == uuid
    seen = [m["msg_type"] for m in outputs]
    assert seen[0] == "status" and outputs[0]["content"]["execution_state"] == "busy"
    assert {"execute_input", "stream", "display_data", "execute_result"} <= set(seen), seen
    texts = {
        m["content"]["name"]: m["content"]["text"] for m in outputs if m["msg_type"] == "stream"
    }
    assert texts == {"stdout": "out\n", "stderr": "err\n"}
    result = next(m for m in outputs if m["msg_type"] == "execute_result")["content"]
    assert result["data"]["text/plain"] == "42"
    assert result["execution_count"] == rep["content"]["execution_count"]

    rep = raw.request(
        "mux",
        "execute_request",
        {"code": "1/0", "silent": False, "user_expressions": {}},
        ident=uuid.encode(),
    )
    c = rep["content"]
    assert (c["status"], c["ename"], c["evalue"]) == (
        "error",
        "ZeroDivisionError",
        "division by zero",
    )
    assert isinstance(c["traceback"], list) and all(isinstance(t, str) for t in c["traceback"])
    assert c["engine_info"] == {"engine_uuid": uuid, "engine_id": eid, "method": "execute"}
    outputs = raw.outputs_until_idle(rep["parent_header"]["msg_id"])
    err = [m for m in outputs if m["msg_type"] == "error"]
    assert len(err) == 1 and err[0]["idents"] == [f"engine.{eid}.error".encode()]
    assert err[0]["content"]["ename"] == "ZeroDivisionError"


def test_data_message_names_its_keys(raw: Raw) -> None:
    """Reference 5.5 (``engine/datapub.py``): ``publish_data`` sends ``data_message`` on topic
    ``datapub`` with content ``{keys: [...]}`` (the published names) and the data as buffers."""
    raw.iopub_for("", quiet=0.3)  # drain
    code = "from ferroparallel.datapub import publish_data\npublish_data({'step': 3, 'loss': 0.5})"
    rep = raw.execute(0, code)
    assert rep["content"]["status"] == "ok", rep["content"]
    outputs = raw.outputs_until_idle(rep["parent_header"]["msg_id"])
    data = [m for m in outputs if m["msg_type"] == "data_message"]
    assert len(data) == 1, [m["msg_type"] for m in outputs]
    assert data[0]["idents"] == [b"datapub"]
    assert sorted(data[0]["content"]["keys"]) == ["loss", "step"]
    assert data[0]["buffers"] and data[0]["metadata"]["engine"] == raw.engines[0]
    check_header(data[0]["header"], "data_message", session=raw.engines[0])


def test_hub_replies_echo_the_request(raw: Raw) -> None:
    """Reference 5.1: every hub query is answered with its ``*_reply`` type, the hub's one
    session in the header, the whole request header as parent, and the content keys the
    reference lists (types included)."""
    uuid0 = raw.engines[0]
    content = {"code": "print('for the record')", "silent": False, "user_expressions": {}}
    rep = raw.request("mux", "execute_request", content, ident=uuid0.encode())
    done = rep["parent_header"]["msg_id"]
    raw.outputs_until_idle(done)
    time.sleep(0.3)  # the hub has the output too
    sessions = set()
    queries: list[tuple[str, dict[str, Any]]] = [
        ("connection_request", {}),
        ("queue_request", {"targets": None, "verbose": False}),
        ("queue_request", {"targets": [uuid0], "verbose": True}),
        ("result_request", {"msg_ids": [done], "status_only": False}),
        ("history_request", {}),
        ("db_request", {"query": {"msg_id": done}, "keys": None}),
        ("resubmit_request", {"msg_ids": [done]}),
        ("purge_request", {"msg_ids": [], "engine_ids": [1]}),
    ]
    replies = {}
    for msg_type, content in queries:
        rep = raw.query(msg_type, content)
        reply_type = msg_type.replace("_request", "_reply")
        check_header(rep["header"], reply_type)
        sessions.add(rep["header"]["session"])
        assert rep["idents"] == [] and rep["metadata"] == {}
        assert rep["content"]["status"] == "ok", (msg_type, rep["content"])
        assert rep["parent_header"]["msg_type"] == msg_type
        replies.setdefault(msg_type, []).append(rep["content"])
    assert len(sessions) == 1, sessions

    conn = replies["connection_request"][0]
    assert conn["engines"] == {str(k): v for k, v in raw.engines.items()}
    brief, verbose = replies["queue_request"]
    for k in ("0", "1"):
        assert {type(brief[k][f]) for f in ("queue", "completed", "tasks")} == {int}
    assert isinstance(brief["unassigned"], int)
    assert set(verbose) == {"status", "0", "unassigned"}  # a uuid target names engine 0
    assert done in verbose["0"]["completed"] and verbose["0"]["queue"] == []
    assert isinstance(verbose["unassigned"], list)

    res = replies["result_request"][0]
    assert res["pending"] == [] and res["completed"] == [done]
    rec = res[done]
    wanted = {"header", "metadata", "result_header", "result_metadata", "result_content"}
    assert wanted | {"received", "io"} <= set(rec), sorted(rec)
    assert rec["header"]["msg_id"] == done and rec["result_header"]["msg_type"] == "execute_reply"
    assert ISO_UTC.fullmatch(rec["received"])
    io = rec["io"]
    assert {"execute_input", "execute_result", "error", "stdout", "stderr"} <= set(io), io
    assert io["stdout"] == "for the record\n" and io["execute_input"] == "print('for the record')"

    assert done in replies["history_request"][0]["history"]
    (record,) = replies["db_request"][0]["records"]
    assert record["msg_id"] == done
    assert not {"buffers", "result_buffers"} & set(record)  # keys=None leaves them out
    for key in ("submitted", "started", "completed", "received"):
        assert ISO_UTC.fullmatch(record[key]), (key, record[key])
    assert record["client_uuid"] == raw.s.session and record["engine_uuid"] == uuid0
    assert record["queue"] == "mux" and record["stdout"] == "for the record\n"
    new = replies["resubmit_request"][0]["resubmitted"]
    assert list(new) == [done] and isinstance(new[done], str) and new[done] != done
