"""The hub's task records on a real cluster: db_query, hub_history, get_result from another
client, result_status, resubmit, purge, bad queries; one suite per backend (memory, sqlite),
plus ``--db none``, SQLite persistence across a controller restart, and memory culling.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import ferroparallel as ipp
from cluster_util import wait_until as _wait_until
from ferroparallel import error
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster

SHORT = 30.0
BASE_ARGS = ["--ping", "200"]


def wait_until(cond: Callable[[], Any], timeout: float = SHORT, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (see cluster_util.wait_until)."""
    return _wait_until(cond, timeout, what)


def _kill(cluster: Cluster) -> None:
    with contextlib.suppress(Exception):
        cluster.stop_cluster_sync()
    for p in cluster._processes():
        with contextlib.suppress(Exception):
            if p.running:
                p.send_signal(signal.SIGKILL)


def _start(cluster_id: str, args: list[str], n: int = 2) -> tuple[Cluster, Client]:
    cluster = Cluster(n=n, controller_args=BASE_ARGS + args, cluster_id=cluster_id)
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=SHORT)
    except BaseException:
        _kill(cluster)
        raise
    return cluster, rc


@pytest.fixture(scope="module")
def fp_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fprecords")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERROPARALLEL_DIR", str(root))
        yield root


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, fp_root: Path) -> Iterator[tuple[Cluster, Client]]:
    """A 2-engine cluster with ``--db <param>``, and a client on it."""
    cluster, rc = _start(f"records-{request.param}", ["--db", request.param])
    yield cluster, rc
    rc.close()
    _kill(cluster)


@pytest.fixture
def rc(backend: tuple[Cluster, Client]) -> Client:
    return backend[1]


@pytest.fixture
def other(backend: tuple[Cluster, Client]) -> Iterator[Client]:
    """A second client on the same cluster."""
    c = ipp.Client(backend[0].client_file, timeout=SHORT)
    yield c
    c.close()


@ipp.interactive
def echo(x: Any) -> Any:
    print("echo", x)
    return x


def sleep_echo(t: float, x: Any) -> Any:
    import time

    time.sleep(t)
    return x


@ipp.interactive
def fail(msg: str) -> None:
    raise ValueError(msg)


@ipp.interactive
def nap(t: float) -> None:
    import time

    time.sleep(t)


def one(rc: Client, msg_id: str, keys: list[str] | None = None) -> dict[str, Any]:
    recs = rc.db_query({"msg_id": msg_id}, keys)
    assert len(recs) == 1, recs
    return recs[0]


# ----- the shared suite (memory and sqlite) -------------------------------------------------


def test_records_filled_from_traffic(rc: Client) -> None:
    lb = rc.load_balanced_view()
    ar = lb.apply_async(echo, 41)
    dr = rc[0].apply_async(echo, 42)
    assert ar.get(timeout=SHORT) == 41
    assert dr.get(timeout=SHORT) == 42
    before = datetime.now(UTC) - timedelta(minutes=5)
    rec = wait_until(lambda: (r := one(rc, ar.msg_ids[0])) and r["stdout"] and r, what="stdout")
    assert rec["queue"] == "task"
    assert rec["client_uuid"] == rc.session.session
    assert rec["engine_uuid"] in rc._engines.values()
    assert rec["header"]["msg_type"] == "apply_request"
    assert rec["result_content"]["status"] == "ok"
    assert rec["result_header"]["msg_type"] == "apply_reply"
    assert rec["stdout"] == "echo 41\n"
    assert rec["resubmitted"] is None
    for key in ("submitted", "started", "completed", "received"):
        assert isinstance(rec[key], datetime) and rec[key].tzinfo is not None, key
        assert rec[key] > before
    # the headers' dates are datetimes too, and keys=[] means whole records (as ipyparallel)
    assert isinstance(rec["header"]["date"], datetime)
    assert isinstance(rec["result_header"]["date"], datetime)
    assert one(rc, ar.msg_ids[0], []).keys() == rec.keys()
    assert rec["submitted"] <= rec["completed"] <= rec["received"]
    assert "buffers" not in rec and "result_buffers" not in rec
    direct = one(rc, dr.msg_ids[0])
    assert direct["queue"] == "mux"
    assert direct["engine_uuid"] == rc._engines[0]


def test_label_and_execute_output(rc: Client) -> None:
    lb = rc.load_balanced_view()
    lb.apply_async(echo, "x").get(timeout=SHORT)
    dv = rc[1]
    ex = dv.execute("print('out'); 1 + 1", silent=False)
    ex.get(timeout=SHORT)
    rec = wait_until(lambda: (r := one(rc, ex.msg_ids[0])) and r["stdout"] and r, what="stdout")
    assert rec["header"]["msg_type"] == "execute_request"
    assert "print('out')" in (rec["execute_input"] or rec["content"]["code"])
    assert rec["stdout"] == "out\n"
    # label from request metadata
    fut = rc.send_apply_request("task", echo, (1,), metadata={"label": "my-label"})
    fut.result(timeout=SHORT)
    assert rc.db_query({"label": "my-label"}, ["label"])[0]["msg_id"] == fut.msg_id
    assert rc.db_query({"label": {"$glob": "my-*"}}, ["label"])[0]["label"] == "my-label"


def test_operators_dates_and_projection(rc: Client) -> None:
    t0 = datetime.now(UTC)
    time.sleep(0.01)
    lb = rc.load_balanced_view()
    ars = [lb.apply_async(echo, i) for i in range(5)]
    assert [a.get(timeout=SHORT) for a in ars] == list(range(5))
    ids = [a.msg_ids[0] for a in ars]
    wait_until(lambda: all(r["completed"] for r in rc.db_query({"msg_id": {"$in": ids}})))
    # datetime objects and ISO strings (aware or naive = UTC) give the same answers
    for since in (t0, t0.isoformat(), t0.replace(tzinfo=None), t0.strftime("%Y-%m-%dT%H:%M:%S.%f")):
        got = [r["msg_id"] for r in rc.db_query({"submitted": {"$gt": since}}, ["submitted"])]
        assert set(ids) <= set(got), since
        assert all(r["submitted"] > t0 for r in rc.db_query({"submitted": {"$gt": since}}))
    older = rc.db_query({"submitted": {"$lt": t0}}, ["submitted"])
    assert not set(ids) & {r["msg_id"] for r in older}
    assert all(r["submitted"] < t0 for r in older)
    assert {r["msg_id"] for r in rc.db_query({"msg_id": {"$in": ids[:2]}})} == set(ids[:2])
    rest = {
        r["msg_id"] for r in rc.db_query({"msg_id": {"$nin": ids[:2]}, "submitted": {"$gte": t0}})
    }
    assert rest == set(ids[2:])
    # a string operand tests `value in text`, as ipyparallel's DictDB (a substring test)
    joined = " ".join(ids[:2])
    inside = {i for i in ids if i in joined}  # (Python's `in`: ids[:2], and any id they contain)
    assert set(ids[:2]) <= inside
    got = {r["msg_id"] for r in rc.db_query({"msg_id": {"$in": joined}, "submitted": {"$gte": t0}})}
    assert got == inside
    others = rc.db_query({"msg_id": {"$nin": joined}, "submitted": {"$gte": t0}}, ["label"])
    assert {r["msg_id"] for r in others} == set(ids) - inside
    assert [r["msg_id"] for r in rc.db_query({"msg_id": ids[3]})] == [ids[3]]
    assert [r["msg_id"] for r in rc.db_query({"msg_id": {"$eq": ids[3]}})] == [ids[3]]
    assert ids[3] not in {r["msg_id"] for r in rc.db_query({"msg_id": {"$ne": ids[3]}})}
    prefix = ids[0].rsplit("_", 1)[0]
    assert set(ids) <= {r["msg_id"] for r in rc.db_query({"msg_id": {"$glob": prefix + "_*"}})}
    assert rc.db_query({"msg_id": ids[0], "completed": {"$exists": True}})
    assert not rc.db_query({"msg_id": ids[0], "completed": None})
    assert not rc.db_query({"msg_id": ids[0], "resubmitted": {"$exists": True}})
    assert rc.db_query({"msg_id": ids[0], "resubmitted": None})
    # keys: msg_id always, buffers only when asked
    rec = one(rc, ids[0], ["completed"])
    assert set(rec) == {"msg_id", "completed"}
    rec = one(rc, ids[0], ["buffers", "result_buffers"])
    assert set(rec) == {"msg_id", "buffers", "result_buffers"}
    assert len(rec["buffers"]) >= 1 and len(rec["result_buffers"]) >= 1
    from ferroparallel.serialize import load_object

    assert load_object([bytes(b) for b in rec["result_buffers"]]) == 0
    # history is ordered by submission
    hist = rc.hub_history()
    pos = [hist.index(m) for m in ids]
    assert pos == sorted(pos)


def test_second_client_reads_results(rc: Client, other: Client) -> None:
    lb = rc.load_balanced_view()
    ok = lb.apply_async(echo, "shared")
    bad = lb.apply_async(fail, "boom")
    direct = rc[1].apply_async(echo, [1, 2])
    assert ok.get(timeout=SHORT) == "shared"
    with pytest.raises(error.RemoteError):
        bad.get(timeout=SHORT)
    assert direct.get(timeout=SHORT) == [1, 2]
    ar = other.get_result(ok.msg_ids[0])
    assert ar.get(timeout=SHORT) == "shared"
    md = ar.metadata
    assert md["engine_uuid"] in other._engines.values()
    assert isinstance(md["completed"], datetime)

    def hub_stdout() -> str:
        again = other.get_result(ok.msg_ids[0])  # a fresh look at the hub's record
        return again.wait(SHORT) and again.metadata["stdout"]

    assert wait_until(hub_stdout) == "echo shared\n"
    with pytest.raises(error.RemoteError) as ei:
        other.get_result(bad.msg_ids[0]).get(timeout=SHORT)
    assert ei.value.ename == "ValueError" and "boom" in str(ei.value)
    assert other.get_result(direct.msg_ids, block=True).get(timeout=SHORT) == [[1, 2]]
    recs = other.db_query({"client_uuid": rc.session.session, "msg_id": ok.msg_ids[0]})
    assert recs and recs[0]["stdout"] == "echo shared\n"
    st = other.result_status([ok.msg_ids[0], direct.msg_ids[0]], status_only=False)
    assert st["pending"] == [] and sorted(st["completed"]) == sorted(
        [ok.msg_ids[0], direct.msg_ids[0]]
    )
    assert st[ok.msg_ids[0]] == "shared"
    unknown = other.get_result("no-such-msg-id")  # as ipyparallel: fails when asked, not here
    with pytest.raises(error.RemoteError) as ei:
        unknown.get(timeout=SHORT)
    assert ei.value.ename == "KeyError"


def test_get_result_owner_lets_the_client_forget_hub_results(rc: Client, other: Client) -> None:
    lb = rc.load_balanced_view()
    ar = lb.map_async(echo, range(3))
    assert ar.get(timeout=SHORT) == [0, 1, 2]
    ids = ar.msg_ids
    kept = other.get_result(ids, owner=False)
    assert isinstance(kept, ipp.AsyncHubResult)
    assert kept.get(timeout=SHORT) == [[0], [1], [2]]
    assert all(other.results[m] == [i] for i, m in enumerate(ids))  # not owned: kept
    owned = other.get_result(ids)  # owner=True, ipyparallel's default
    assert owned.get(timeout=SHORT) == [[0], [1], [2]]
    # the owner holds the results (and metadata); the client's caches let them go
    wait_until(lambda: not any(m in other._futures for m in ids), what="the client to forget")
    assert not any(m in other.results or m in other.metadata for m in ids)
    assert owned.get(timeout=SHORT) == [[0], [1], [2]]
    assert owned.metadata[0]["engine_uuid"] in other._engines.values()
    # asked again, they come from the hub's records again
    again = other.get_result(ids[0])
    assert isinstance(again, ipp.AsyncHubResult)
    assert again.get(timeout=SHORT) == [0]


def test_get_result_of_finished_tasks_is_ready_at_once(rc: Client, other: Client) -> None:
    # as ipyparallel: what the hub already has is there when get_result returns
    lb = rc.load_balanced_view()
    ok, bad = lb.apply_async(echo, 7), lb.apply_async(fail, "late")
    assert ok.get(timeout=SHORT) == 7
    assert bad.wait(SHORT)
    ar = other.get_result(ok.msg_ids[0])
    assert ar.ready() and ar.successful() and ar.get(0) == 7
    assert ar.progress == 1 and ar.metadata["status"] == "ok"
    both = other.get_result(ok.msg_ids + bad.msg_ids)
    assert both.ready() and not both.successful()
    with pytest.raises(error.CompositeError):
        both.get(0)
    # a task still running is waited for as before
    slow = lb.apply_async(nap, 2.0)
    wait_until(lambda: rc.db_query({"msg_id": slow.msg_ids[0]}, ["queue"]), what="a record")
    pending = other.get_result(slow.msg_ids[0])
    assert not pending.ready()
    assert pending.get(timeout=SHORT) is None


def test_record_buffers_are_memoryviews(rc: Client) -> None:
    # as ipyparallel's records: buffers are memoryviews (tobytes, nbytes, slicing)
    ar = rc.load_balanced_view().apply_async(divmod, 17, 5)
    assert ar.get(timeout=SHORT) == (3, 2)
    rec = wait_until(lambda: one(rc, ar.msg_ids[0], ["buffers", "result_buffers"]))
    bufs = rec["buffers"] + rec["result_buffers"]
    assert bufs and all(type(b) is memoryview for b in bufs)
    assert all(b.nbytes == len(b.tobytes()) for b in bufs)
    from ferroparallel.serialize import load_object, unpack_apply_message

    f, args, kwargs = unpack_apply_message(rec["buffers"])
    assert (f, args, kwargs) == (divmod, (17, 5), {})
    assert load_object(rec["result_buffers"]) == (3, 2)


def test_pending_result_and_purge(rc: Client, other: Client) -> None:
    lb = rc.load_balanced_view()
    slow = lb.apply_async(nap, 0.5)
    mid = slow.msg_ids[0]
    # the request travels on the task socket, queries on the hub socket: wait until it is in
    wait_until(lambda: rc.db_query({"msg_id": mid}, ["queue"]), what="the task's record")
    st = rc.result_status([mid])
    assert st == {"status": "ok", "pending": [mid], "completed": []}
    hub_ar = other.get_result(mid)  # polls the hub until the task finishes
    with pytest.raises(error.RemoteError) as ei:
        rc.purge_hub_results(mid)
    assert ei.value.ename == "IndexError" and mid in str(ei.value)
    assert hub_ar.get(timeout=SHORT) is None
    slow.get(timeout=SHORT)
    assert rc.result_status([mid])["completed"] == [mid]
    rc.purge_hub_results(mid)
    assert rc.db_query({"msg_id": mid}) == []
    # by engine
    a = rc[0].apply_async(echo, 1)
    b = rc[1].apply_async(echo, 2)
    a.get(timeout=SHORT), b.get(timeout=SHORT)
    wait_until(
        lambda: rc.db_query({"msg_id": {"$in": a.msg_ids + b.msg_ids}, "completed": {"$ne": None}})
    )
    rc.purge_hub_results(targets=[0])
    assert rc.db_query({"engine_uuid": rc._engines[0], "completed": {"$ne": None}}) == []
    assert [r["msg_id"] for r in rc.db_query({"msg_id": b.msg_ids[0]})] == b.msg_ids
    # everything finished
    rc.purge_hub_results("all")
    assert rc.db_query({"completed": {"$ne": None}}) == []
    with pytest.raises(ValueError):
        rc.purge_hub_results()
    # purge_results also forgets local results
    c = lb.apply_async(echo, 3)
    c.get(timeout=SHORT)
    rc.purge_results(c.msg_ids)
    assert c.msg_ids[0] not in rc.results
    assert rc.db_query({"msg_id": c.msg_ids[0]}) == []
    d = lb.apply_async(echo, 4)
    d.get(timeout=SHORT)
    wait_until(lambda: rc.db_query({"msg_id": d.msg_ids[0], "completed": {"$ne": None}}))
    rc.purge_everything()
    assert rc.history == []
    assert rc.db_query({"completed": {"$ne": None}}) == []


def test_resubmit_direct_and_load_balanced(rc: Client) -> None:
    lb = rc.load_balanced_view()
    t = lb.apply_async(echo, "again")
    d = rc[1].apply_async(echo, "direct")
    assert t.get(timeout=SHORT) == "again" and d.get(timeout=SHORT) == "direct"
    ar = rc.resubmit(t.msg_ids)
    from ferroparallel.client.asyncresult import AsyncHubResult

    assert isinstance(ar, AsyncHubResult)
    assert ar.get(timeout=SHORT) == ["again"]  # as ipyparallel: always a list
    new = ar.msg_ids[0]
    assert new != t.msg_ids[0]
    assert one(rc, t.msg_ids[0], ["resubmitted"])["resubmitted"] == new
    assert one(rc, new, ["queue"])["queue"] == "task"
    dr = rc.resubmit(d.msg_ids)
    assert dr.get(timeout=SHORT) == ["direct"]
    rec = one(rc, dr.msg_ids[0], ["queue", "engine_uuid"])
    assert rec["queue"] == "mux" and rec["engine_uuid"] == rc._engines[1]
    with pytest.raises(error.RemoteError) as ei:
        rc.resubmit(["no-such-id"])
    assert ei.value.ename == "KeyError"
    # a task still running is resubmitted too, as by ipyparallel's hub; both complete
    running = lb.apply_async(sleep_echo, 1.0, "late")
    # (once the hub has it: the request and the query travel on different sockets)
    wait_until(lambda: rc.db_query({"msg_id": running.msg_ids[0]}, ["msg_id"]), what="a record")
    again = rc.resubmit(running.msg_ids)
    assert again.get(timeout=SHORT) == ["late"] and running.get(timeout=SHORT) == "late"
    assert one(rc, running.msg_ids[0], ["resubmitted"])["resubmitted"] == again.msg_ids[0]


@pytest.mark.parametrize(
    "query, keys, ename",
    [
        ({"msg_id": {"$regex": "x"}}, None, "KeyError"),
        ({"msg_id": {"$in": 3}}, None, "TypeError"),
        ({"msg_id": {"$mod": [0, 1]}}, None, "ValueError"),
        ({"msg_id": {"$exists": "yes"}}, None, "TypeError"),
        ({"msg_id": {"$eq": 1, "plain": 2}}, None, "ValueError"),
        ({}, ["nosuch"], "KeyError"),
    ],
)
def test_bad_queries_are_clear_errors(
    rc: Client, query: dict[str, Any], keys: Any, ename: str
) -> None:
    with pytest.raises(error.RemoteError) as ei:
        rc.db_query(query, keys)
    assert ei.value.ename == ename
    # the controller keeps serving
    assert isinstance(rc.hub_history(), list)
    assert rc[0].apply_sync(echo, 5) == 5


def test_unknown_query_field_is_a_field_no_record_has(rc: Client) -> None:
    """As ipyparallel's DictDB: a name that is no record field matches as None."""
    rc[0].apply_sync(echo, 1)
    assert rc.db_query({"nosuch": 1}) == []
    assert rc.db_query({"nosuch": {"$exists": True}}) == []
    everything = {r["msg_id"] for r in rc.db_query({}, ["msg_id"])}
    assert {r["msg_id"] for r in rc.db_query({"nosuch": None}, ["msg_id"])} == everything


# ----- other backends and lifetimes ---------------------------------------------------------


def test_no_records_backend(fp_root: Path) -> None:
    cluster, rc = _start("records-none", ["--db", "none"])
    try:
        ar = rc.load_balanced_view().apply_async(echo, 1)
        assert ar.get(timeout=SHORT) == 1
        for call in (
            rc.hub_history,
            lambda: rc.db_query({}),
            lambda: rc.get_result("x").get(SHORT),
        ):
            with pytest.raises(error.RemoteError) as ei:
                call()
            assert "--db none" in str(ei.value)
        with pytest.raises(error.RemoteError):
            rc.resubmit(ar.msg_ids)
        # as ipyparallel with NoDB: a client knows the status of what it sent itself, and
        # purging records that are not kept does nothing
        status = rc.result_status(ar.msg_ids)
        assert status["completed"] == ar.msg_ids and status["pending"] == []
        running = rc[0].apply_async(time.sleep, 0.5)
        assert rc.result_status(running.msg_ids)["pending"] == running.msg_ids
        running.get(timeout=SHORT)
        rc.purge_results("all")
    finally:
        rc.close()
        _kill(cluster)


def test_sqlite_survives_restart_with_restore(fp_root: Path) -> None:
    cid = "records-restart"
    cluster, rc = _start(cid, ["--db", "sqlite"])
    try:
        ar = rc.load_balanced_view().apply_async(echo, "persist")
        assert ar.get(timeout=SHORT) == "persist"
        mid = ar.msg_ids[0]
        wait_until(lambda: rc.db_query({"msg_id": mid, "stdout": "echo persist\n"}))
    finally:
        rc.close()
        _kill(cluster)
    cluster, rc = _start(cid, ["--db", "sqlite", "--restore"])
    try:
        rec = one(rc, mid)
        assert rec["stdout"] == "echo persist\n" and isinstance(rec["completed"], datetime)
        assert mid in rc.hub_history()
        assert rc.get_result(mid).get(timeout=SHORT) == "persist"
        # new work is recorded next to the old
        ar2 = rc.load_balanced_view().apply_async(echo, 2)
        ar2.get(timeout=SHORT)
        wait_until(lambda: ar2.msg_ids[0] in rc.hub_history())
    finally:
        rc.close()
        _kill(cluster)
    cluster, rc = _start(cid, ["--db", "sqlite"])
    try:
        assert rc.db_query({"msg_id": mid}) == []  # without --restore: a fresh table
    finally:
        rc.close()
        _kill(cluster)


def test_memory_culling(fp_root: Path) -> None:
    cluster, rc = _start("records-cull", ["--db", "memory", "--db-record-limit", "10"])
    try:
        lb = rc.load_balanced_view()
        ars = [lb.apply_async(echo, i) for i in range(30)]
        assert [a.get(timeout=SHORT) for a in ars] == list(range(30))
        hist = rc.hub_history()
        assert 1 <= len(hist) <= 10
        assert ars[-1].msg_ids[0] in hist
        with ipp.Client(cluster.client_file, timeout=SHORT) as other:
            with pytest.raises(error.RemoteError) as ei:
                other.get_result(ars[0].msg_ids[0]).get(timeout=SHORT)
            assert ei.value.ename == "KeyError" and "culled" in str(ei.value)
            assert other.get_result(ars[-1].msg_ids[0]).get(timeout=SHORT) == 29
    finally:
        rc.close()
        _kill(cluster)


def test_hub_shutdown_notifies_clients(fp_root: Path) -> None:
    cluster, rc = _start("records-shutdown", [])
    other = ipp.Client(cluster.client_file, timeout=SHORT)
    try:
        rc.shutdown(hub=True)
        wait_until(lambda: other._hub_shutdown, what="shutdown_notification")
        with pytest.raises(error.IoClosedError):
            other.db_query({})
        with pytest.raises(error.IoClosedError):
            rc.hub_history()
    finally:
        other.close()
        rc.close()
        _kill(cluster)
