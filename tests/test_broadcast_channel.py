"""The controller's broadcast channel (ipyparallel's broadcast scheduler), from the outside.

A raw pyzmq client (``tests/peer/session.py``, no ferroparallel I/O on its side) sends
requests to the ``broadcast`` port of a real controller with real engines, as ipyparallel's
``BroadcastView`` does: ``metadata.targets`` = ``[[uuid, id], ...]``, ``is_coalescing``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from cluster_util import (
    collect,
    connect,
    peer_session,
    recv_until,
    running_cluster,
    wait_until,
)
from ferroparallel.cluster import Cluster
from ferroparallel.serialize import load_object, pack_apply_message
from peer.session import DELIMITER, new_id

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("fp_root")]


def _pid_and_tag(tag: str) -> tuple[int, str]:
    return os.getpid(), tag


class Peer:
    """A raw client of a running cluster: its session and sockets."""

    def __init__(self, cluster: Cluster, zctx: zmq.Context) -> None:
        self.info = json.loads(cluster.client_file.read_text())
        self.session = peer_session(self.info)
        base = "tcp://127.0.0.1:"
        self.query = connect(zctx, zmq.DEALER, base + str(self.info["registration"]))
        self.bcast = connect(zctx, zmq.DEALER, base + str(self.info["broadcast"]))
        self.engines: dict[str, int] = {}

    def wait_engines(self, n: int) -> list[list[Any]]:
        def ask() -> dict[str, int] | None:
            self.session.send(self.query, "connection_request", {})
            rep = self.session.recv(self.query, timeout=5)
            engines = rep["content"].get("engines") or {}
            return {v: int(k) for k, v in engines.items()} if len(engines) >= n else None

        self.engines = wait_until(ask, timeout=60, what=f"{n} engines")
        return [[u, i] for u, i in sorted(self.engines.items(), key=lambda kv: kv[1])]

    def send(self, targets: list[Any], coalescing: bool, f: Any, *args: Any) -> dict[str, Any]:
        md = {"targets": targets, "is_coalescing": coalescing, "is_broadcast": True}
        return self.session.send(
            self.bcast, "apply_request", {}, metadata=md, buffers=pack_apply_message(f, args)
        )


@pytest.fixture
def cluster(fp_root: Path) -> Iterator[Cluster]:
    with running_cluster(fp_root / "profile_bcast", 2) as c:
        yield c


def test_connection_files_list_the_broadcast_ports(cluster: Cluster) -> None:
    client = json.loads(cluster.client_file.read_text())
    engine = json.loads(cluster.engine_file.read_text())
    assert isinstance(client["broadcast"], int) and client["broadcast"] > 0
    assert isinstance(engine["broadcast"], list) and len(engine["broadcast"]) == 1
    ports = [v for k, v in client.items() if isinstance(v, int)]
    assert len(ports) == len(set(ports))  # its own port


def test_each_engine_answers_under_its_own_msg_id(cluster: Cluster, zctx: zmq.Context) -> None:
    peer = Peer(cluster, zctx)
    targets = peer.wait_engines(2)
    hdr = peer.send(targets, False, _pid_and_tag, "plain")
    original = hdr["msg_id"]
    replies = collect(peer.session, peer.bcast, 2, what="two broadcast replies")
    assert len(replies) == 2
    by_parent = {r["parent_header"]["msg_id"]: r for r in replies}
    assert set(by_parent) == {f"{original}_{u}" for u, _ in targets}
    pids = set()
    for uuid, _ in targets:
        rep = by_parent[f"{original}_{uuid}"]
        assert rep["idents"] == []  # nothing but the client's own route
        assert rep["msg_type"] == "apply_reply"
        assert rep["content"]["status"] == "ok", rep["content"]
        assert rep["metadata"]["engine"] == uuid
        assert rep["metadata"]["original_msg_id"] == original
        assert rep["metadata"]["is_coalescing"] is False
        pid, tag = load_object([bytes(b) for b in rep["buffers"]])
        assert tag == "plain"
        pids.add(pid)
    assert len(pids) == 2


def test_coalescing_reply_lists_targets_and_concatenates_results(
    cluster: Cluster, zctx: zmq.Context
) -> None:
    peer = Peer(cluster, zctx)
    targets = peer.wait_engines(2)
    order = list(reversed(targets))  # request order, not engine id order
    hdr = peer.send(order, True, _pid_and_tag, "coalesced")
    rep = recv_until(peer.session, peer.bcast, lambda m: True, what="the coalesced reply")
    assert rep["metadata"]["original_msg_id"] == hdr["msg_id"]
    assert rep["metadata"]["is_coalescing"] is True
    assert rep["metadata"]["broadcast_targets"] == order
    assert rep["content"]["status"] == "ok"
    assert len(rep["buffers"]) == 2  # one small result frame per engine, in request order
    results = [load_object([bytes(b)]) for b in rep["buffers"]]
    assert [tag for _, tag in results] == ["coalesced", "coalesced"]
    assert len({pid for pid, _ in results}) == 2
    assert not peer.bcast.poll(300)  # one message, not one per engine


def test_unknown_target_gets_an_engine_error(cluster: Cluster, zctx: zmq.Context) -> None:
    peer = Peer(cluster, zctx)
    targets = peer.wait_engines(2)
    ghost = [new_id(), 99]
    hdr = peer.send([targets[0], ghost], False, _pid_and_tag, "x")
    replies = collect(peer.session, peer.bcast, 2, what="a reply and an error")
    by_parent = {r["parent_header"]["msg_id"]: r for r in replies}
    err = by_parent[f"{hdr['msg_id']}_{ghost[0]}"]
    assert err["content"]["status"] == "error"
    assert err["content"]["ename"] == "EngineError"
    assert ghost[0] in err["content"]["evalue"]
    ok = by_parent[f"{hdr['msg_id']}_{targets[0][0]}"]
    assert ok["content"]["status"] == "ok"

    # coalescing: one error reply for the whole request, promptly
    hdr = peer.send([targets[0], ghost], True, _pid_and_tag, "x")
    rep = recv_until(peer.session, peer.bcast, lambda m: True, what="the coalesced error")
    assert rep["metadata"]["original_msg_id"] == hdr["msg_id"]
    assert rep["content"]["status"] == "error"
    assert rep["content"]["ename"] == "EngineError"
    assert rep["metadata"]["broadcast_targets"] == [targets[0], ghost]


def test_forged_and_malformed_requests_are_dropped(cluster: Cluster, zctx: zmq.Context) -> None:
    peer = Peer(cluster, zctx)
    targets = peer.wait_engines(2)
    peer.bcast.send_multipart([DELIMITER, b"0" * 64, b"x", b"{}", b"{}", b"{}"])
    peer.bcast.send_multipart([b"garbage"])
    peer.session.send(peer.bcast, "apply_request", {}, metadata={"targets": "nope"})
    hdr = peer.send(targets[:1], False, _pid_and_tag, "after junk")
    rep = recv_until(peer.session, peer.bcast, lambda m: True, what="a reply after junk")
    assert rep["parent_header"]["msg_id"] == f"{hdr['msg_id']}_{targets[0][0]}"
    assert load_object([bytes(b) for b in rep["buffers"]])[1] == "after junk"


def test_engine_dying_mid_request_gives_engine_error(cluster: Cluster, zctx: zmq.Context) -> None:
    peer = Peer(cluster, zctx)
    targets = peer.wait_engines(2)
    hdr = peer.send(targets[:1], False, _pid_and_tag, "pid")
    rep = recv_until(peer.session, peer.bcast, lambda m: True, what="the engine's pid")
    pid = load_object([bytes(b) for b in rep["buffers"]])[0]

    import time

    hdr = peer.send(targets, True, time.sleep, 60)
    peer.send(targets[:1], False, time.sleep, 60)
    os.kill(pid, signal.SIGKILL)
    replies = collect(peer.session, peer.bcast, 2, timeout=30, what="EngineError replies")
    assert {r["content"].get("ename") for r in replies} == {"EngineError"}
    coalesced = [r for r in replies if r["metadata"].get("is_coalescing")]
    assert len(coalesced) == 1
    assert coalesced[0]["metadata"]["original_msg_id"] == hdr["msg_id"]
