"""Wire parity with ipyparallel 9.2, checked from the outside with raw pyzmq.

Each test pins an answer where a differential probe against ipyparallel's own controller and
engines found ours different (the ipyparallel behaviour is quoted in each docstring). A raw
client (``tests/peer/session.py``, no ferroparallel I/O on its side) talks to a real
controller with two real ferroparallel engines.
"""

from __future__ import annotations

import json
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
