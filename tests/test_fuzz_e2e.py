"""End-to-end robustness: a real cluster survives a barrage of junk on every port.

At least 10^5 random and mutated messages go to every port of the controller that accepts
input (engines only connect, they listen on nothing): random frames, genuine messages with a
flipped bit, unsigned ones, replays, messages signed with another key, truncated and oversized
ones, raw TCP garbage below ZMQ, and a few hundred correctly signed requests carrying garbage
pickles that the engines must refuse cleanly. Work submitted before the barrage must still
complete, and afterwards a normal round trip and a load-balanced map must work on the same
engines.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from ferroparallel import _core
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster
from ferroparallel.serialize import pack_apply_message

pytest_plugins = ("cluster_fixtures",)

#: Messages thrown at the controller in total.
N_MESSAGES = int(os.environ.get("FP_FUZZ_E2E_MESSAGES", "100000"))
DELIM = b"<IDS|MSG>"
HOST = "127.0.0.1"


def slow_square(x: int) -> int:
    import time

    time.sleep(0.05)
    return x * x


class Junk:
    """Random and mutated messages built from a pool of genuine ones."""

    def __init__(self, rng: random.Random, key: bytes, pool: list[list[bytes]]) -> None:
        self.rng = rng
        self.pool = pool
        self.unsigned = [self._resign(m, b"") for m in pool]
        self.wrong_key = [self._resign(m, b"not-the-key") for m in pool]
        self.key = key

    @staticmethod
    def _resign(msg: list[bytes], key: bytes) -> list[bytes]:
        i = msg.index(DELIM)
        sig = _core.Session(key).sign(msg[i + 2 : i + 6]) if key else b""
        return [*msg[: i + 1], sig, *msg[i + 2 :]]

    def random_frames(self) -> list[bytes]:
        rng = self.rng
        frames = [rng.randbytes(rng.randint(0, 48)) for _ in range(rng.randint(1, 9))]
        if rng.random() < 0.5:
            frames.insert(rng.randint(0, len(frames)), DELIM)
        return frames

    def __call__(self) -> list[bytes]:
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return self.random_frames()
        msg = list(rng.choice(self.pool))
        if r < 0.55:  # flipped bit anywhere after the routing frames
            i = rng.randint(msg.index(DELIM), len(msg) - 1)
            if msg[i]:
                f = bytearray(msg[i])
                f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
                msg[i] = bytes(f)
            return msg
        if r < 0.63:
            return list(rng.choice(self.unsigned))
        if r < 0.71:
            return list(rng.choice(self.wrong_key))
        if r < 0.80:  # replay of a genuine message
            return msg
        if r < 0.90:  # truncated: fewer frames, or a shortened frame
            if rng.random() < 0.5:
                return msg[: rng.randint(1, len(msg) - 1)]
            i = rng.randrange(len(msg))
            msg[i] = msg[i][: len(msg[i]) // 2]
            return msg
        if r < 0.99:  # extra or swapped buffers
            return [*msg, rng.randbytes(rng.randint(0, 64))]
        # oversized part
        i = rng.randint(msg.index(DELIM) + 2, len(msg) - 1)
        msg[i] = rng.randbytes(rng.randint(64 << 10, 1 << 20))
        return msg


def subscription_junk(rng: random.Random) -> list[bytes]:
    """What a peer can send to a PUB socket: (un)subscriptions, random single frames, and
    frames over the controller's 4 KiB limit for those sockets (it drops the connection).
    Single frames only: pyzmq's bundled libzmq crashes (stack overflow in its reaper) closing
    an XSUB that sent a flood of random multipart messages."""
    r = rng.random()
    if r < 0.6:
        return [rng.choice([b"\1", b"\0"]) + rng.randbytes(rng.randint(0, 100))]
    if r < 0.97:
        return [rng.randbytes(rng.randint(0, 200))]
    return [b"\2" + rng.randbytes(rng.randint(5000, 70000))]


def genuine_pool(
    session: Any, engines: list[bytes], rng: random.Random
) -> dict[str, list[list[bytes]]]:
    """Harmless genuine messages per kind of port (their first delivery may be accepted)."""

    def msg(msg_type: str, content: dict[str, Any], ident: list[bytes], **kw: Any) -> list[bytes]:
        return [
            bytes(memoryview(f)) for f in session.serialize(msg_type, content, ident=ident, **kw)
        ]

    apply = pack_apply_message(abs, (-1,), {})
    client_side = [
        msg("apply_request", {}, [rng.choice(engines)], buffers=apply, metadata={})
        for _ in range(20)
    ]
    hub = [
        msg("connection_request", {}, []),
        msg("queue_request", {"targets": None, "verbose": True}, []),
        msg("db_request", {"query": {"msg_id": "no-such-id"}, "keys": None}, []),
        msg("result_request", {"msg_ids": ["no-such-id"]}, []),
        msg("bogus_request", {}, []),
    ]
    parent = {"msg_id": "no-such-request", "msg_type": "apply_request"}
    engine_side = [
        msg("apply_reply", {"status": "ok"}, [b"nobody"], parent=parent, buffers=[b"r"])
        for _ in range(10)
    ]
    iopub = [
        msg("stream", {"name": "stdout", "text": "junk\n"}, [b"engine.0.stream"], parent=parent)
        for _ in range(10)
    ]
    return {"client": client_side, "hub": hub, "engine": engine_side, "iopub": iopub}


def wait_reply(sock: zmq.Socket, session: Any, parents: set[str], timeout: float, want: int) -> int:
    """Receive until ``want`` genuine replies to ``parents`` came, or for ``timeout`` seconds;
    return how many came."""
    found = 0
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if not sock.poll(max(0, int(left * 1000))):
            return found
        frames = sock.recv_multipart()
        try:
            msg = session.deserialize(frames, record=False)
        except Exception:  # noqa: BLE001 - answers to junk we sent may be anything
            continue
        if msg["parent_header"].get("msg_id") in parents:
            found += 1
            if found >= want:
                return found


def connect(ctx: zmq.Context, kind: int, port: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 1000)
    s.connect(f"tcp://{HOST}:{port}")
    return s


@pytest.fixture
def cluster_and_client(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> Iterator[tuple[Cluster, Client]]:
    yield new_cluster(n=2)


def test_barrage_on_every_port_loses_nothing(cluster_and_client: tuple[Cluster, Client]) -> None:
    cluster, rc = cluster_and_client
    client_info = json.loads(cluster.client_file.read_text())
    engine_info = json.loads(cluster.engine_file.read_text())
    key = client_info["key"].encode()
    session = _core.Session(key, packer=client_info.get("pack", "msgpack"))
    pids_before = rc[:].apply_sync(os.getpid)
    engines = [rc._uuid_of(i).encode() for i in rc.ids]
    rng = random.Random(20260127)

    # Work in flight across the barrage.
    lview = rc.load_balanced_view()
    pre_map = lview.map_async(slow_square, range(40))
    pre_direct = rc[:].apply_async(slow_square, 7)

    pools = genuine_pool(session, engines, rng)
    # (port, socket type, pool) for every port that accepts input.
    targets = [
        (client_info["registration"], zmq.DEALER, pools["hub"]),
        (client_info["mux"], zmq.DEALER, pools["client"]),
        (client_info["control"], zmq.DEALER, pools["client"]),
        (client_info["task"], zmq.DEALER, pools["client"]),
        (engine_info["mux"], zmq.DEALER, pools["engine"]),
        (engine_info["control"], zmq.DEALER, pools["engine"]),
        (engine_info["task"], zmq.DEALER, pools["engine"]),
        (engine_info["hb_pong"], zmq.DEALER, pools["engine"]),
        (engine_info["iopub"], zmq.PUB, pools["iopub"]),
        (client_info["iopub"], zmq.XSUB, pools["iopub"]),
        (client_info["notification"], zmq.XSUB, pools["iopub"]),
        (engine_info["hb_ping"], zmq.XSUB, pools["engine"]),
        (client_info["broadcast"], zmq.DEALER, pools["client"]),
        (engine_info["broadcast"][0], zmq.DEALER, pools["engine"]),
    ]
    ctx = zmq.Context()
    socks = [(connect(ctx, kind, port), kind, Junk(rng, key, pool)) for port, kind, pool in targets]
    try:
        time.sleep(0.3)  # let the connections come up (PUB drops until then)
        per_port = N_MESSAGES // len(socks) + 1
        sent = 0
        t0 = time.monotonic()
        for sock, kind, junk in socks:
            for _ in range(per_port):
                frames = junk() if kind != zmq.XSUB else subscription_junk(rng)
                sock.send_multipart(frames, copy=False)
                sent += 1
        # Correctly signed requests with garbage pickles (direct and load-balanced): the
        # engines must answer them with errors, not die.
        garbage: set[str] = set()
        for sock, _kind, _ in (socks[1], socks[3]):
            for _ in range(100):
                header = session.msg_header("apply_request")
                bufs = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 4))]
                frames = session.serialize(
                    "apply_request", {}, ident=[rng.choice(engines)], buffers=bufs, header=header
                )
                sock.send_multipart([bytes(memoryview(f)) for f in frames])
                garbage.add(header["msg_id"])
        # Below ZMQ: raw TCP connections sending garbage, or a ZMTP greeting and then garbage.
        greeting = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00NULL" + b"\0" * 16 + b"\0" * 32
        for port in {p for p, _, _ in targets}:
            for i in range(20):
                with socket.create_connection((HOST, port), timeout=5) as raw:
                    head = greeting[: rng.randint(0, len(greeting))] if i % 2 else b""
                    raw.sendall(head + rng.randbytes(rng.randint(1, 2048)))
        barrage_s = time.monotonic() - t0
        assert sent >= 100_000 or N_MESSAGES < 100_000

        # Barrier: a genuine query on the hub port is answered after everything sent before it.
        hub = socks[0][0]
        probe = session.msg_header("connection_request")
        frames = session.serialize("connection_request", {}, header=probe)
        hub.send_multipart([bytes(memoryview(f)) for f in frames])
        assert wait_reply(hub, session, {probe["msg_id"]}, 60, 1) == 1, (
            "no answer after the barrage"
        )
        replies = 0
        deadline = time.monotonic() + 60
        while replies < len(garbage) and time.monotonic() < deadline:
            for sock, _kind, _ in (socks[1], socks[3]):
                replies += wait_reply(sock, session, garbage, 0.05, len(garbage) - replies)
        assert replies == len(garbage), f"{replies} of {len(garbage)} bad requests answered"
    finally:
        for sock, _, _ in socks:
            sock.close(0)
        ctx.term()

    # Nothing lost: the work submitted before the barrage completes correctly.
    assert pre_map.get(timeout=60) == [x * x for x in range(40)]
    assert pre_direct.get(timeout=60) == [49, 49]
    # A normal round trip and a load-balanced map, on the same engines.
    assert rc[:].apply_sync(os.getpid) == pids_before
    assert lview.map_sync(slow_square, range(10)) == [x * x for x in range(10)]
    assert rc.ids == [0, 1]
    ctl = cluster.controller
    assert ctl is not None and ctl.process is not None and ctl.process.running
    # The junk did reach the controller and was dropped (it logs every 1000th drop).
    dropped = re.findall(r"\((\d+) dropped so far\)", ctl.process.log_tail(1_000_000))
    assert max((int(n) for n in dropped), default=0) >= min(50_000, N_MESSAGES // 2)
    for es in cluster.engines.values():
        for p in es.processes:
            assert p.running, f"engine {p.pid} died"
    print(f"sent {sent} junk messages in {barrage_s:.1f} s, {len(garbage)} garbage pickles")
