"""A DirectView call on several engines: the client's per-engine bookkeeping is made when
first needed (``client/fanout.py``), and everything the user can see is as if it were made
at once: ``history``, ``outstanding``, ``metadata``, ``wait``, ``get_result``, ``abort``,
``purge_local_results``, AsyncResults built from msg_ids, output and replies (issue 4: the
client's cost of a DirectView call must not grow with the number of engines)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cluster_util import EngineGate
from ferroparallel import error
from ferroparallel.client import AsyncResult, Client
from ferroparallel.client.fanout import FanoutGroup

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

SHORT = 30.0


def _triple(x: int) -> int:
    return 3 * x


@pytest.fixture
def held(rc: Client, engine_gate: EngineGate) -> Any:
    """Both engines busy until the gate opens (so no reply to what is sent meanwhile)."""
    running = rc[:].apply_async(engine_gate.task())
    yield engine_gate
    engine_gate.open()
    running.get(timeout=SHORT)
    engine_gate.close()


def test_submission_makes_no_per_engine_futures(rc: Client, held: EngineGate) -> None:
    """Sent to 16 copies (engines named again run the request again): one group, no future
    per copy until something needs one."""
    view = rc[[0, 1] * 8]
    futures_before = len(rc._futures)
    ar = view.apply_async(_triple, 5)
    assert len(ar.msg_ids) == 16
    assert isinstance(ar._group, FanoutGroup) and ar._kids is None
    assert len(rc._futures) == futures_before
    assert not any(m in rc._futures for m in ar.msg_ids)
    # what the user sees is complete all the same
    assert rc.history[-16:] == ar.msg_ids
    assert set(ar.msg_ids) <= rc.outstanding
    assert not ar.ready()
    held.open()
    assert ar.get(timeout=SHORT) == [15] * 16


def test_metadata_before_any_reply(rc: Client, held: EngineGate) -> None:
    ar = rc[:].apply_async(_triple, 1)
    ids = rc.ids
    mds = [rc.metadata[m] for m in ar.msg_ids]
    assert [md["engine_id"] for md in mds] == ids
    assert [md.engine_uuid for md in mds] == [rc._uuid_of(i) for i in ids]
    assert all(md.submitted is not None and md.completed is None for md in mds)
    assert all(m in rc.metadata for m in ar.msg_ids)
    held.open()
    assert ar.get(timeout=SHORT) == [3, 3]
    assert [md["engine_id"] for md in ar.metadata] == ids


def test_asyncresult_from_pending_msg_ids(rc: Client, held: EngineGate) -> None:
    """``AsyncResult(client, msg_ids)``, ``get_result`` and ``wait`` on the msg_ids of a
    fanned-out request whose replies have not come."""
    ar = rc[:].apply_async(_triple, 2)
    again = AsyncResult(rc, list(ar.msg_ids))
    fetched = rc.get_result(ar.msg_ids, owner=False)
    assert type(fetched) is AsyncResult
    assert not rc.wait(ar.msg_ids, timeout=0.2)
    held.open()
    assert rc.wait(ar.msg_ids, timeout=SHORT)
    assert again.get(timeout=SHORT) == [6, 6]
    assert fetched.get(timeout=SHORT) == [6, 6]
    assert ar.get(timeout=SHORT) == [6, 6]


def test_wait_for_everything_includes_pending_groups(rc: Client, held: EngineGate) -> None:
    ar = rc[:].apply_async(_triple, 4)
    assert not rc.wait(timeout=0.2)
    with pytest.raises(RuntimeError, match="still pending"):
        rc.purge_local_results(ar.msg_ids)
    held.open()
    assert rc.wait(timeout=SHORT)
    assert ar.get(timeout=0) == [12, 12]


def test_abort_a_queued_fanned_out_request(rc: Client, held: EngineGate) -> None:
    ar = rc[:].apply_async(_triple, 7)
    rc.abort(ar, block=True)
    held.open()
    with pytest.raises(error.CompositeError) as info:
        ar.get(timeout=SHORT)
    assert {e[0] for e in info.value.elist} == {"TaskAborted"}


def test_output_and_replies_of_an_execute(rc: Client) -> None:
    ar = rc[:].execute("print('hi', 6 * 7)", silent=False)
    ar.get(timeout=SHORT)
    assert ar.wait_for_output(timeout=SHORT)
    assert ar.stdout == ["hi 42\n", "hi 42\n"]


def test_callbacks_see_every_child_when_many_threads_submit(rc: Client) -> None:
    """Groups made by the dispatcher while other threads submit and wait: every AsyncResult
    resolves once, with every value."""
    results: list[Any] = []
    done = threading.Event()

    def submit(k: int) -> None:
        ars = [rc[:].apply_async(_triple, k * 100 + i) for i in range(50)]
        results.append([ar.get(timeout=SHORT) for ar in ars])
        if len(results) == 4:
            done.set()

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SHORT)
    assert done.is_set()
    got = sorted(v for batch in results for pair in batch for v in pair)
    assert got == sorted(3 * (k * 100 + i) for k in range(4) for i in range(50) for _ in (0, 1))


class _SentMetadata:
    """Stands for a client's I/O handle and keeps the metadata of what is sent on ``mux``."""

    def __init__(self, io: Any) -> None:
        self.io = io
        self.mux: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.io, name)

    def send(self, socket: str, msg_type: str, content: Any, parent: Any, metadata: Any, **kw):
        if socket == "mux":
            self.mux.append(dict(metadata or {}))
        return self.io.send(socket, msg_type, content, parent, metadata, **kw)


def test_the_request_names_the_engines_only(rc: Client, held: EngineGate) -> None:
    """The one message lists the engines' uuids (not a msg_id per engine: what the client
    writes and signs must not grow by a msg_id per engine); the controller derives each
    copy's msg_id as the client does, repeats included, so every copy's reply is matched."""
    io = rc._io
    rc._io = spy = _SentMetadata(io)
    try:
        ar = rc[[0, 1, 0, 0]].apply_async(_triple, 3)
    finally:
        rc._io = io
    uuids = [rc._uuid_of(i) for i in (0, 1, 0, 0)]
    assert [md["fanout"] for md in spy.mux] == [uuids]
    base = ar._group.header["msg_id"]
    assert ar.msg_ids == [f"{base}_{uuids[0]}", f"{base}_{uuids[1]}"] + [
        f"{base}_{uuids[0]}_{k}" for k in (1, 2)
    ]
    held.open()
    assert ar.get(timeout=SHORT) == [9] * 4
    assert [md["engine_id"] for md in ar.metadata] == [0, 1, 0, 0]


def test_a_controller_without_uuid_fanout_gets_one_request_per_engine(rc: Client) -> None:
    """Before ``fanout-uuids``, our controllers announced ``fanout`` and read only
    ``[uuid, msg_id]`` pairs: a client that does not see ``fanout-uuids`` sends each engine its
    own request (as to an ipyparallel hub), which any controller routes."""
    assert "fanout-uuids" in rc._features
    io, features = rc._io, rc._features
    rc._io = spy = _SentMetadata(io)
    rc._features = frozenset({"fanout", "abort"})
    try:
        ar = rc[[0, 1, 0]].apply_async(_triple, 2)
    finally:
        rc._io, rc._features = io, features
    assert len(spy.mux) == 3 and not any("fanout" in md for md in spy.mux)
    assert ar.get(timeout=SHORT) == [6, 6, 6]
    assert [md["engine_id"] for md in ar.metadata] == [0, 1, 0]


def test_view_outstanding_while_requests_finish(rc: Client, held: EngineGate) -> None:
    """A view's ``outstanding`` lists exactly its unfinished msg_ids, also after its record of
    them was pruned (which keeps a request while any of its engines has not answered)."""
    view = rc[:]
    first = view.apply_async(_triple, 1)
    assert view.outstanding == set(first.msg_ids)
    view._prune_at = 0  # prune at every request from now on
    second = [view.apply_async(_triple, k) for k in range(3)]
    every = {m for ar in [first, *second] for m in ar.msg_ids}
    assert view.outstanding == every
    assert every <= rc.outstanding
    held.open()
    assert [ar.get(timeout=SHORT) for ar in second] == [[0, 0], [3, 3], [6, 6]]
    last = view.apply_async(_triple, 5)  # (prunes the finished ones)
    assert view.outstanding <= set(last.msg_ids)
    assert last.get(timeout=SHORT) == [15, 15]
    assert view.outstanding == set()
    assert view.history[-len(last.msg_ids) :] == last.msg_ids


def test_results_leave_the_client_when_owned_before_any_reply(rc: Client, held: EngineGate) -> None:
    """A view's AsyncResult owns its results: once they are in, the client's caches drop
    them, also when the AsyncResult took them before their futures were made."""
    ar = rc[:].apply_async(_triple, 6)
    assert ar._kids is None  # owned while pending
    held.open()
    assert ar.get(timeout=SHORT) == [18, 18]
    assert ar.wait_for_output(timeout=SHORT)
    deadline = time.monotonic() + SHORT
    while any(m in rc._futures for m in ar.msg_ids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(m in rc._futures or m in rc.results for m in ar.msg_ids)
    assert ar.get(timeout=0) == [18, 18]
