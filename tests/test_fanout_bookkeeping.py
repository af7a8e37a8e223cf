"""A DirectView call on several engines: the client's per-engine bookkeeping is made when
first needed (``client/fanout.py``), and everything the user can see is as if it were made
at once: ``history``, ``outstanding``, ``metadata``, ``wait``, ``get_result``, ``abort``,
``purge_local_results``, AsyncResults built from msg_ids, output and replies (issue 4: the
client's cost of a DirectView call must not grow with the number of engines)."""

from __future__ import annotations

import threading
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
