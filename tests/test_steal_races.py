"""Work stealing against its races, driven deterministically by fake engines.

A real controller (``--hwm 2 --hwm-budget 2``: two tasks per engine, the adaptive budget on,
so stealing is on) schedules four tasks on two fake engines written with raw pyzmq. Engine B
answers its two tasks after the steal delay; B is then idle while A holds two tasks, the
oldest "running" for longer than ``STEAL_AFTER``, so the scheduler asks A to give its newest
one back (an ``abort_request`` on A's control channel). The test then plays each outcome a
real engine can produce, in an order it chooses (decision 0013):

- A gives the task back ("aborted"): B gets it and its result reaches the client once;
- A had started it: its result reaches the client once and B never sees the task;
- the user aborts the same task while the steal is in flight: the client gets "aborted"
  once and B never sees the task.

In every case the client receives each reply exactly once, and never the engine's answer to
the scheduler's own abort request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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
    start_controller,
)
from peer.session import new_id

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("fp_root")]

#: Longer than the scheduler's STEAL_AFTER (20 ms) with a wide margin for a loaded machine.
STEAL_DELAY = 0.15


@pytest.fixture
def controller(fp_root: Path) -> Iterator[ControllerProcess]:
    ctl = start_controller(
        fp_root / "profile_steal",
        "--ping",
        "1000",
        "--hwm",
        "2",
        "--hwm-budget",
        "2",
        "--log-level",
        "DEBUG",
    )
    try:
        yield ctl
    finally:
        ctl.stop()


class FakeEngine:
    """A registered engine made of raw sockets: shell (mux + task) and control ROUTERs, a
    heart, and a registration DEALER. It answers only when the test says so."""

    def __init__(self, ctl: ControllerProcess, zctx: zmq.Context, name: str) -> None:
        self.name = name
        self.uuid = new_id()
        ident = self.uuid.encode()
        self.session = peer_session(ctl.engine, session=self.uuid)
        self.shell = connect(
            zctx, zmq.ROUTER, [ctl.engine_url("mux"), ctl.engine_url("task")], identity=ident
        )
        self.control = connect(zctx, zmq.ROUTER, ctl.engine_url("control"), identity=ident)
        self.heart = HeartEcho(zctx, ctl.engine_url("hb_ping"), ctl.engine_url("hb_pong"), ident)
        self.heart.start()
        assert self.heart.ready.wait(10) and self.heart.error is None, self.heart.error
        self.registrar = connect(zctx, zmq.DEALER, ctl.engine_url("registration"), identity=ident)
        self.session.send(self.registrar, "registration_request", {"uuid": self.uuid})
        reg = recv_until(
            self.session, self.registrar, lambda m: m["msg_type"] == "registration_reply"
        )
        assert reg["content"]["status"] == "ok", reg["content"]
        self.id = reg["content"]["id"]

    def next_request(self, sock: zmq.Socket | None = None, what: str = "a request") -> Any:
        return recv_until(
            self.session, sock or self.shell, lambda m: True, what=f"{what} on {self.name}"
        )

    def reply(self, req: dict[str, Any], status: str, result: bytes = b"") -> None:
        """Answer an apply_request: ``ok`` with one buffer, or ``aborted``."""
        content: dict[str, Any] = {"status": status}
        if status == "aborted":
            content = {"status": "aborted", "ename": None, "evalue": None, "traceback": None}
        self.session.send(
            self.shell,
            "apply_reply",
            content,
            parent=req["header"],
            metadata={"engine": self.uuid, "status": status, "dependencies_met": True},
            ident=req["idents"],
            buffers=[result] if status == "ok" else [],
        )

    def answer_abort(self, req: dict[str, Any]) -> None:
        self.session.send(
            self.control,
            "abort_reply",
            {"status": "ok"},
            parent=req["header"],
            metadata={"engine": self.uuid},
            ident=req["idents"],
        )

    def quiet(self, what: str) -> None:
        """Nothing more arrives on the shell (e.g. no task sent here twice)."""
        late = drain(self.shell, quiet=0.5)
        assert late == [], f"{self.name} unexpectedly received {what}: {late}"

    def close(self) -> None:
        self.heart.stop()


@pytest.fixture
def setup(controller: ControllerProcess, zctx: zmq.Context) -> Iterator[dict[str, Any]]:
    """Two fake engines holding two tasks each, and the scheduler's steal request on A."""
    ctl = controller
    client_s = peer_session(ctl.client)
    notif = connect(zctx, zmq.SUB, ctl.client_url("notification"), subscribe=b"")
    task = connect(zctx, zmq.DEALER, ctl.client_url("task"))
    control = connect(zctx, zmq.DEALER, ctl.client_url("control"))
    a = FakeEngine(ctl, zctx, "A")
    b = FakeEngine(ctl, zctx, "B")
    try:
        for _ in range(2):
            recv_until(
                client_s,
                notif,
                lambda m: m["msg_type"] == "registration_notification",
                what="registration_notification",
            )
        sent = [client_s.send(task, "apply_request", {}, buffers=[b"t%d" % i]) for i in range(4)]
        held: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for engine in (a, b):
            for _ in range(2):
                held[engine.name].append(engine.next_request(what="a task"))
        assert {r["header"]["msg_id"] for r in held["A"] + held["B"]} == {h["msg_id"] for h in sent}
        time.sleep(STEAL_DELAY)  # A's oldest task now "runs" longer than STEAL_AFTER
        for req in held["B"]:
            b.reply(req, "ok", b"B:" + req["header"]["msg_id"].encode())
        got = [recv_until(client_s, task, lambda m: True, what="B's results") for _ in range(2)]
        assert {m["parent_header"]["msg_id"] for m in got} == {
            r["header"]["msg_id"] for r in held["B"]
        }
        # B is idle and nothing waits in the scheduler: the newest of A's tasks is asked back
        steal = a.next_request(a.control, what="the scheduler's abort_request")
        assert steal["msg_type"] == "abort_request"
        newest = held["A"][1]["header"]["msg_id"]
        assert steal["content"]["msg_ids"] == [newest]
        yield {
            "client_s": client_s,
            "task": task,
            "control": control,
            "a": a,
            "b": b,
            "held": held["A"],
            "steal": steal,
        }
        assert ctl.alive, ctl.log()
    finally:
        a.close()
        b.close()


def _replies(client_s: Any, sock: zmq.Socket) -> list[dict[str, Any]]:
    return [client_s.deserialize(f, record=False) for f in drain(sock, quiet=0.5)]


def _finish_oldest(s: dict[str, Any]) -> None:
    """A completes its first task: the client gets it, once."""
    oldest = s["held"][0]
    s["a"].reply(oldest, "ok", b"A-first")
    rep = recv_until(s["client_s"], s["task"], lambda m: True, what="A's first result")
    assert rep["parent_header"]["msg_id"] == oldest["header"]["msg_id"]
    assert [bytes(x) for x in rep["buffers"]] == [b"A-first"]


def test_a_task_given_back_runs_on_the_idle_engine(setup: dict[str, Any]) -> None:
    s = setup
    a, b, newest = s["a"], s["b"], s["held"][1]
    a.reply(newest, "aborted")
    a.answer_abort(s["steal"])
    moved = b.next_request(what="the stolen task")
    assert moved["header"] == newest["header"]  # the same request, unchanged
    assert [bytes(x) for x in moved["buffers"]] == [bytes(x) for x in newest["buffers"]]
    b.reply(moved, "ok", b"ran on B")
    rep = recv_until(s["client_s"], s["task"], lambda m: True, what="the stolen task's result")
    assert rep["parent_header"]["msg_id"] == newest["header"]["msg_id"]
    assert rep["content"]["status"] == "ok" and rep["metadata"]["engine"] == b.uuid
    assert [bytes(x) for x in rep["buffers"]] == [b"ran on B"]
    _finish_oldest(s)
    assert _replies(s["client_s"], s["task"]) == []  # A's "aborted" never reached the client
    assert _replies(s["client_s"], s["control"]) == []  # nor its answer to the scheduler
    a.quiet("a task")  # (never sent back to the engine it came from)


def test_a_task_that_started_before_the_steal_is_not_moved(setup: dict[str, Any]) -> None:
    s = setup
    a, b, newest = s["a"], s["b"], s["held"][1]
    _finish_oldest(s)
    a.reply(newest, "ok", b"ran on A")  # it had started: the engine cannot give it back
    a.answer_abort(s["steal"])
    rep = recv_until(s["client_s"], s["task"], lambda m: True, what="the second result")
    assert rep["parent_header"]["msg_id"] == newest["header"]["msg_id"]
    assert rep["content"]["status"] == "ok" and rep["metadata"]["engine"] == a.uuid
    assert [bytes(x) for x in rep["buffers"]] == [b"ran on A"]
    assert _replies(s["client_s"], s["task"]) == []
    assert _replies(s["client_s"], s["control"]) == []
    b.quiet("the task that had started on A")


def test_a_user_abort_during_a_steal_wins(setup: dict[str, Any]) -> None:
    s = setup
    a, b, newest = s["a"], s["b"], s["held"][1]
    msg_id = newest["header"]["msg_id"]
    user = s["client_s"].send(
        s["control"], "abort_request", {"msg_ids": [msg_id]}, ident=a.uuid.encode()
    )
    relayed = a.next_request(a.control, what="the user's abort_request")
    assert relayed["header"]["msg_id"] == user["msg_id"]
    a.reply(newest, "aborted")  # one answer for the task, whoever asked
    a.answer_abort(s["steal"])
    a.answer_abort(relayed)
    rep = recv_until(s["client_s"], s["task"], lambda m: True, what="the aborted reply")
    assert rep["parent_header"]["msg_id"] == msg_id
    assert rep["content"]["status"] == "aborted"
    ctl_replies = _replies(s["client_s"], s["control"])
    assert [m["parent_header"]["msg_id"] for m in ctl_replies] == [user["msg_id"]]
    b.quiet("the task the user aborted")
    _finish_oldest(s)
    assert _replies(s["client_s"], s["task"]) == []
