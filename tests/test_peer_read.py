"""Arguments lent from the client's memory (docs/decisions/0007-reading-peer-memory.md).

In-process: descriptors round-trip through our own memory, only for the request they were lent
to, and fail clearly for another host, a gone lender or an unreadable range; the capability
probe. On the shared cluster: blocking push / apply / scatter / map / load-balanced calls lend
(the engines copy with ``process_vm_readv``, nothing goes to /dev/shm), non-blocking calls and
``peer_read=False`` keep the shared-memory segment, a loan lasts until every reply arrived, a
resubmitted request cannot read a loan, and a client killed with lent requests queued gives
those requests an error, not someone else's memory.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from cluster_util import EngineGate
from ferroparallel import Reference
from ferroparallel.client import Client, DirectView
from ferroparallel.cluster import Cluster
from ferroparallel.error import EngineError, RemoteError
from ferroparallel.serialize import load_object, peer, serialize_object, shm
from transfer_util import assert_no_segments_left, need_lending, owner_kind, run_script, segments_of

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
SHORT = 30.0


def lent(obj: Any, msg_id: str = "m-1", threshold: int = 1024) -> tuple[list[Any], peer.Loan]:
    writer = peer.LoanWriter(threshold, msg_id)
    frames = serialize_object(obj, shm=writer)
    return frames, writer.loan


def engine_reads() -> list[int]:
    """``[count, bytes]`` of the lent buffers this process read (runs on engines)."""
    from ferroparallel.serialize import peer

    return list(peer.reads)


@pytest.fixture(autouse=True)
def no_segments() -> Iterator[None]:
    """Lending needs permission to read other processes; no test leaves a segment behind."""
    need_lending()
    yield
    assert_no_segments_left()


# ----- in-process ---------------------------------------------------------------------------


def test_lent_buffers_round_trip_exactly_for_their_request() -> None:
    a = np.arange(100_000, dtype=np.float64)
    obj = {
        "a": a,
        "strided": a[::3],
        "fortran": np.asfortranarray(a[:60_000].reshape(300, 200)),
        "rec": np.zeros(5000, dtype=[("x", "i4"), ("y", "f8")]),
        "raw": memoryview(bytes(range(256)) * 40),
        "nested": [(a[:5000] * 2,)],
    }
    frames, loan = lent(obj, "req-7")
    assert len(frames) == 1 and len(loan.buffers) == 6 and loan.nbytes > a.nbytes
    before = list(peer.reads)
    with peer.serving("req-7"):
        back = load_object(frames)
    assert peer.reads[0] - before[0] == 6
    assert np.array_equal(back["a"], a) and not back["a"].flags.writeable
    assert np.array_equal(back["strided"], a[::3])
    assert back["fortran"].flags.f_contiguous and np.array_equal(back["fortran"], obj["fortran"])
    assert back["rec"].dtype == obj["rec"].dtype and np.array_equal(back["rec"], obj["rec"])
    assert bytes(back["raw"]) == bytes(obj["raw"])
    assert np.array_equal(back["nested"][0][0], a[:5000] * 2)
    # a private copy: the lender's memory is not shared
    assert back["a"].__array_interface__["data"][0] != a.__array_interface__["data"][0]
    # the per-engine ids of a fanned-out request may read it too
    with peer.serving("req-7_engine-uuid"):
        assert np.array_equal(load_object(frames)["a"], a)


@pytest.mark.parametrize("current", [None, "req-8", "req-70"])
def test_a_loan_cannot_be_read_for_another_request(current: str | None) -> None:
    frames, _loan = lent(np.ones(10_000), "req-7")
    if current is None:
        with pytest.raises(shm.ShmError, match="cannot reuse them: run the request again"):
            load_object(frames)
    else:
        with peer.serving(current), pytest.raises(shm.ShmError, match="'req-7'"):
            load_object(frames)


def test_foreign_host_gone_lender_and_bad_ranges_fail_clearly() -> None:
    pid, start = peer.own_identity()
    token = peer.peer_token()
    buf = np.ones(4096, dtype=np.uint8)
    addr, n = ipp._core.buffer_address(buf)
    with peer.serving("x"):
        with pytest.raises(shm.ShmError, match="another host"):
            peer.read_slice(pid, start, addr, n, "elsewhere/boot/1/pid:2", "x")
        with pytest.raises(shm.LenderGone, match="is gone"):
            peer.read_slice(pid, start + 1, addr, n, token, "x")
        with pytest.raises(shm.ShmError, match="cannot read the buffers"):
            peer.read_slice(pid, start, 8, n, token, "x")
        assert bytes(peer.read_slice(pid, start, addr, n, token, "x")) == bytes(buf)


def test_a_result_whose_engine_died_before_it_was_read_is_an_engine_error() -> None:
    from ferroparallel.client.dispatch import _engine_died

    class FakeClient:
        _uuids = {"engine-uuid-1": 1}
        _departed: dict[str, int] = {}

    exc = _engine_died(shm.LenderGone("the process ... is gone"), FakeClient(), "engine-uuid-1")
    assert isinstance(exc, ipp.error.EngineError) and isinstance(exc, ipp.RemoteError)
    assert exc.ename == "EngineError" and "died before this client read" in exc.evalue
    assert exc.engine_info["engine_id"] == 1


def test_read_process_memory_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="not a process id"):
        ipp._core.read_process_memory(-1, 0, bytearray(1))
    with pytest.raises(BufferError, match="writable"):
        ipp._core.read_process_memory(os.getpid(), 0, b"read-only")


def test_probe_answers() -> None:
    secret, probe = peer.make_probe()
    assert peer.answer_probe(probe) == secret.hex()
    assert peer.answer_probe("junk").startswith("error: malformed")
    assert peer.answer_probe([1, 2, 3, 10_000, probe[4]]).startswith("error: malformed")
    assert peer.answer_probe([*probe[:4], "other"]) == "error: another host or pid namespace"
    gone = [probe[0], probe[1] + 1, *probe[2:]]
    assert peer.answer_probe(gone).startswith("error: no process")


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for off in ("0", "off", "no", "False"):
        monkeypatch.setenv(peer.ENV_ENABLE, off)
        assert not peer.enabled_by_env()
    monkeypatch.delenv(peer.ENV_ENABLE)
    assert peer.enabled_by_env()


# ----- on the shared 2-engine cluster -------------------------------------------------------


def reads_delta(dv: DirectView, before: list[list[int]]) -> list[list[int]]:
    now = dv.apply_sync(engine_reads)
    return [[x - y for x, y in zip(n, b, strict=True)] for n, b in zip(now, before, strict=True)]


def test_blocking_calls_lend_and_engines_copy(rc: Client, dv: DirectView) -> None:
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    before = dv.apply_sync(engine_reads)
    dv.push({"a": a}, block=True)
    assert reads_delta(dv, before) == [[1, a.nbytes], [1, a.nbytes]]
    assert dv.apply_sync(owner_kind, Reference("a")) == ["ndarray", "ndarray"]
    same = dv.apply_sync(lambda x: bool((x == np.arange(len(x))).all()), Reference("a"))
    assert same == [True, True]
    assert rc._shm.live_loans() == [] and segments_of() == []

    before = dv.apply_sync(engine_reads)
    assert dv.apply_sync(lambda x: int(x.sum()), a) == [int(a.sum())] * 2
    dv.scatter("part", a, block=True)
    assert np.array_equal(np.concatenate(dv.pull("part", block=True)), a)
    assert [d[0] for d in reads_delta(dv, before)] == [2, 2]  # apply, scatter: one read each

    parts = [a[: MIB // 2] + i for i in range(4)]
    lview = rc.load_balanced_view()
    before = dv.apply_sync(engine_reads)
    assert lview.apply_sync(lambda x: float(x[0]), parts[3]) == 3.0
    assert lview.map_sync(lambda x: float(x[-1]), parts) == [float(p[-1]) for p in parts]
    assert dv.map_sync(lambda x: float(x[1]), parts) == [float(p[1]) for p in parts]
    assert sum(d[0] for d in reads_delta(dv, before)) == 1 + 4 + 4
    assert rc._shm.live_loans() == [] and segments_of() == []


def test_non_blocking_calls_and_peer_read_off_use_a_segment(
    rc: Client, dv: DirectView, shared_cluster: Cluster
) -> None:
    a = np.arange(MIB, dtype=np.float64)
    before = dv.apply_sync(engine_reads)
    dv.push({"a": a}, block=False).get(timeout=SHORT)
    assert dv.apply_sync(owner_kind, Reference("a")) == ["shm", "shm"]
    with ipp.Client(shared_cluster.client_file, peer_read=False) as rc2:
        assert not rc2._shm.peer_read
        assert rc2[:].apply_sync(owner_kind, a) == ["shm", "shm"]
    with ipp.Client(shared_cluster.client_file, shm=False) as rc3:
        assert not rc3._shm.peer_read  # shm=False: everything over the socket
        assert rc3[:].apply_sync(owner_kind, a) == ["frame", "frame"]
    assert reads_delta(dv, before) == [[0, 0], [0, 0]]


def test_a_loan_lasts_until_every_reply(rc: Client, dv: DirectView) -> None:
    a = np.ones(2 * MIB, dtype=np.uint8)
    busy = dv.apply_async(time.sleep, 1.0)
    with rc._shm.waiting():  # what a blocking view call does around its submission
        futs = rc.apply_to(rc._build_targets("all")[0], lambda x: int(x.sum()), (a,))
    loans = rc._shm.live_loans()
    assert len(loans) == 1 and loans[0].nbytes == a.nbytes
    ar = ipp.AsyncResult(rc, futs)
    assert ar.get(timeout=SHORT) == [a.size, a.size]
    busy.get(timeout=SHORT)
    deadline = time.monotonic() + 5
    while rc._shm.live_loans() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rc._shm.live_loans() == [] and loans[0].buffers == []


def test_a_resubmitted_loan_fails_with_a_clear_error(rc: Client) -> None:
    a = np.arange(MIB // 4, dtype=np.float64)
    ar = rc[0].apply_async(lambda x: float(x.sum()), a)  # non-blocking: a segment
    with rc._shm.waiting():
        fut = rc.send_apply_request(
            "mux", lambda x: float(x.sum()), (a,), ident=rc._build_targets(0)[0][0]
        )
    assert ar.get(timeout=SHORT) == fut.result(timeout=SHORT) == float(a.sum())
    again = rc.resubmit([fut.msg_id])
    with pytest.raises(RemoteError, match="cannot reuse them"):
        again.get(timeout=SHORT)
    assert rc[0].apply_sync(lambda: "still serving") == "still serving"


def test_a_killed_lender_gives_its_queued_requests_an_error(
    rc: Client, shared_cluster: Cluster, engine_gate: EngineGate
) -> None:
    target = rc.ids[0]
    # keeps the engine busy until the lender is dead (a timed sleep may end first: the lender
    # script alone takes seconds to start on a loaded machine, and the engine would then read
    # the loan while the lender still lives)
    busy = rc[target].apply_async(engine_gate.task())
    script = run_script(
        """
        import sys, numpy as np, ferroparallel as ipp
        rc = ipp.Client(sys.argv[1], timeout=30)
        a = np.full(1 << 20, 7.0)
        with rc._shm.waiting():
            uuid = rc._build_targets(int(sys.argv[2]))[0][0]
            fut = rc.send_apply_request("mux", lambda x: float(x.sum()), (a,), ident=uuid)
        rc.queue_status()  # a round trip: the request has left this process (no batching)
        print(fut.msg_id, flush=True)
        import time; time.sleep(60)
        """,
        str(shared_cluster.client_file),
        str(target),
    )
    try:
        msg_id = script.stdout.readline().strip()
        assert msg_id, script.stderr.read()
    finally:
        script.send_signal(signal.SIGKILL)
        script.wait(timeout=SHORT)
        engine_gate.open()
    busy.get(timeout=SHORT)
    late = rc.get_result(msg_id, block=False)
    with pytest.raises(RemoteError, match="is gone|cannot read the buffers"):
        late.get(timeout=SHORT)
    assert rc[target].apply_sync(lambda: "still serving") == "still serving"


# ----- lent results -------------------------------------------------------------------------


def test_lend_probe_and_pickup_handshake() -> None:
    assert peer.check_lend_probe(peer.lend_probe())
    tampered = peer.lend_probe()
    tampered[5] = "00" * 16
    assert not peer.check_lend_probe(tampered)
    assert not peer.check_lend_probe("junk")

    seals = peer.Seals()
    me = list(peer.own_identity())
    loan = peer.Loan("r-1")
    loan.buffers.append(memoryview(b"x"))
    lent = peer.LentResult(loan, seals, me)
    assert peer.finish_pickup(lent.reply_metadata())  # the client has its copy...
    assert lent.wait(timeout=5)  # ...so the engine goes on at once
    assert loan.buffers == [] and not peer.finish_pickup(lent.reply_metadata())


def test_an_engine_stops_waiting_for_a_slow_or_dead_client() -> None:
    seals = peer.Seals()
    slow = peer.LentResult(peer.Loan("r-2"), seals, list(peer.own_identity()))
    t0 = time.monotonic()
    assert not slow.wait(timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert not peer.finish_pickup(slow.reply_metadata())  # a late copy is refused
    pid, start = peer.own_identity()
    dead = peer.LentResult(peer.Loan("r-3"), seals, [pid, start + 1])  # not this process
    t0 = time.monotonic()
    assert not dead.wait(timeout=30)
    assert time.monotonic() - t0 < 5


def client_reads() -> list[int]:
    return list(peer.reads)


def test_blocking_pulls_gathers_and_results_are_lent(rc: Client, dv: DirectView) -> None:
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    dv.push({"a": a}, block=True)
    before = client_reads()
    got = dv.pull("a", block=True)
    assert all(np.array_equal(g, a) and not g.flags.writeable for g in got)
    assert [owner_kind(g) for g in got] == ["ndarray", "ndarray"]
    dv.scatter("part", a, block=True)
    assert np.array_equal(dv.gather("part", block=True), a)
    doubled = rc[0].apply_sync(lambda x: x * 2, Reference("a"))
    assert np.array_equal(doubled, a * 2)
    assert client_reads()[0] - before[0] == 2 + 2 + 1
    # a non-blocking pull comes back through a segment
    before = client_reads()
    assert [owner_kind(g) for g in dv.pull("a", block=False).get(timeout=SHORT)] == ["shm"] * 2
    assert client_reads() == before
    # a lent result is not kept by the hub: fetched again later, a clear error (its memory
    # is never read again)
    before = client_reads()
    with rc._shm.waiting():
        fut = rc.send_apply_request("mux", lambda x: x, (Reference("a"),), ident=rc._engines[0])
    assert np.array_equal(fut.result(timeout=SHORT), a)
    assert client_reads()[0] == before[0] + 1  # lent
    rc.purge_local_results("all")
    reads = client_reads()
    with pytest.raises(RemoteError, match="not kept by the hub") as e:
        rc.get_result(fut.msg_id, block=False).get(timeout=SHORT)
    assert e.value.ename == "ShmError" and client_reads() == reads


def test_the_engine_changes_nothing_before_the_client_has_its_copy(rc: Client) -> None:
    uuid = rc._build_targets(0)[0][0]
    assert rc._shm.all_local([uuid]) and rc._shm._lenders[uuid]  # probed: results are lent
    rc[0].execute("import numpy as np; big = np.zeros(32 << 20, dtype=np.uint8)", block=True)
    for i in range(5):
        reads = client_reads()[0]
        with rc._shm.waiting():  # as a blocking pull does: the result is lent
            fut = rc.send_apply_request("mux", lambda x: x, (Reference("big"),), ident=uuid)
        # queued right behind it on the engine: changes the very array in place
        change = rc[0].apply_async(lambda x: x.__iadd__(1) is x, Reference("big"))
        got = fut.result(timeout=SHORT)
        assert client_reads()[0] == reads + 1  # lent, and copied by this client
        assert got.min() == got.max() == i  # the values at reply time, never changed ones
        assert change.get(timeout=SHORT) is True


def test_a_new_client_asks_in_the_background_then_lends(
    rc: Client, shared_cluster: Cluster
) -> None:
    a = np.arange(MIB, dtype=np.float64)
    rc[0].push({"a": a}, block=True)
    with ipp.Client(shared_cluster.client_file) as rc2:
        rc2.wait_for_engines(2, timeout=SHORT)
        uuid = rc2._build_targets(0)[0][0]
        assert np.array_equal(rc2[0].pull("a", block=True), a)  # never waits for the probe
        deadline = time.monotonic() + SHORT
        while not rc2._shm._lenders.get(uuid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rc2._shm._lenders.get(uuid) and rc2._shm._readers.get(uuid)
        before = client_reads()
        assert np.array_equal(rc2[0].pull("a", block=True), a)
        assert client_reads()[0] == before[0] + 1


def test_engines_that_failed_the_probe_get_segments(shared_cluster: Cluster) -> None:
    a = np.arange(MIB, dtype=np.float64)
    with ipp.Client(shared_cluster.client_file) as rc2:
        rc2.wait_for_engines(2, timeout=SHORT)
        uuids = rc2._build_targets("all")[0]
        assert rc2._shm.all_local(uuids)  # probed
        for u in uuids:  # as if ptrace or seccomp forbade process_vm_readv / writev
            rc2._shm._readers[u] = rc2._shm._lenders[u] = False
        before = client_reads()
        assert rc2[:].apply_sync(owner_kind, a) == ["shm", "shm"]
        rc2[:].push({"a": a}, block=True)
        assert [owner_kind(x) for x in rc2[:].pull("a", block=True)] == ["shm", "shm"]
        assert client_reads() == before


def test_a_retried_task_reads_its_loan_again(rc: Client, tmp_path: Any) -> None:
    flag = str(tmp_path / "failed-once")

    def fails_once(x: np.ndarray, flag: str) -> float:
        import os

        if not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("first attempt")
        return float(x.sum())

    a = np.ones(MIB, dtype=np.float64)
    lview = rc.load_balanced_view()
    before = rc[:].apply_sync(engine_reads)
    with lview.temp_flags(retries=2):
        assert lview.apply_sync(fails_once, a, flag) == float(a.size)
    after = rc[:].apply_sync(engine_reads)
    assert sum(x[0] - y[0] for x, y in zip(after, before, strict=True)) == 2  # both attempts


def test_own_identity_follows_a_fork() -> None:
    parent = peer.own_identity()
    assert parent[0] == os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it believes it is
        os.write(w, str(peer.own_identity()[0]).encode())
        os._exit(0)
    os.close(w)
    reported = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    assert reported == pid and peer.own_identity() == parent


def test_engines_with_lending_off_get_segments(
    new_cluster: Callable[..., tuple[Cluster, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(peer.ENV_ENABLE, "0")  # inherited by the engines
    cluster, first = new_cluster(n=1)
    first.close()
    monkeypatch.delenv(peer.ENV_ENABLE)
    a = np.arange(MIB, dtype=np.float64)
    with ipp.Client(cluster.client_file) as rc2:
        rc2.wait_for_engines(1, timeout=SHORT)
        assert rc2._shm.peer_read
        before = client_reads()
        assert rc2[0].apply_sync(owner_kind, a) == "shm"
        rc2[0].push({"a": a}, block=True)
        assert owner_kind(rc2[0].pull("a", block=True)) == "shm"
        assert client_reads() == before
        uuid = rc2._build_targets(0)[0][0]
        assert not rc2._shm._readers[uuid] and not rc2._shm._lenders[uuid]


def test_an_engine_killed_before_reading_its_loan_releases_it(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> None:
    cluster, rc2 = new_cluster(n=2)
    pids = dict(zip(rc2.ids, rc2[:].apply_sync(os.getpid), strict=True))
    uuid = rc2._build_targets(1)[0][0]
    assert rc2._shm.all_local([uuid]) and rc2._shm._readers[uuid]
    busy = rc2[1].apply_async(time.sleep, 60)
    a = np.ones(16 * MIB, dtype=np.uint8)
    with rc2._shm.waiting():  # as a blocking call does: the argument is lent
        fut = rc2.send_apply_request("mux", lambda x: int(x.sum()), (a,), ident=uuid)
    assert len(rc2._shm.live_loans()) == 1
    os.kill(pids[1], signal.SIGKILL)
    for pending in (busy.get, fut.result):
        with pytest.raises(EngineError):
            pending(timeout=SHORT)
    deadline = time.monotonic() + 5
    while rc2._shm.live_loans() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rc2._shm.live_loans() == []
    before = rc2[0].apply_sync(engine_reads)
    assert rc2[0].apply_sync(lambda x: int(x.sum()), a) == a.size  # the survivor still reads
    assert rc2[0].apply_sync(engine_reads)[0] == before[0] + 1


def test_a_big_lent_result_gets_more_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer, "PICKUP_TIMEOUT", 0.0)
    monkeypatch.setattr(peer, "PICKUP_RATE", 1e9)
    loan = peer.Loan("r-4")
    loan.nbytes = 300_000_000  # 0.3 s at the patched rate
    slow = peer.LentResult(loan, peer.Seals(), list(peer.own_identity()))
    t0 = time.monotonic()
    assert not slow.wait()
    assert 0.3 <= time.monotonic() - t0 < 5


def test_a_reply_nobody_expects_lets_the_engine_go_on() -> None:
    from ferroparallel.client import dispatch
    from ferroparallel.wire_names import LENT_RESULT_KEY

    class NoFutures:
        _futures: dict[str, Any] = {}
        _pending_groups: dict[str, Any] = {}  # (no fanned-out request waits for its futures)

    lent = peer.LentResult(peer.Loan("r-5"), peer.Seals(), list(peer.own_identity()))
    msg = {
        "parent_header": {"msg_id": "r-5"},
        "header": {"msg_type": "apply_reply"},
        "metadata": {LENT_RESULT_KEY: lent.reply_metadata()},
    }
    assert dispatch.handle_reply(NoFutures(), msg) is None  # type: ignore[arg-type]
    t0 = time.monotonic()
    assert lent.wait(timeout=10)  # released by the client: no wait
    assert time.monotonic() - t0 < 1


def test_closing_a_client_keeps_its_outstanding_loans(shared_cluster: Cluster) -> None:
    a = np.full(2 * MIB, 3, dtype=np.uint8)
    rc2 = ipp.Client(shared_cluster.client_file)
    rc2.wait_for_engines(2, timeout=SHORT)
    uuid = rc2._build_targets(0)[0][0]
    assert rc2._shm.all_local([uuid]) and rc2._shm._readers[uuid]
    rc2[0].apply_async(time.sleep, 1.0)
    with rc2._shm.waiting():
        rc2.send_apply_request("mux", lambda x: int(x.sum()), (a,), ident=uuid)
    (loan,) = rc2._shm.live_loans()
    rc2.close(linger=0)
    assert loan in peer._orphans and loan.buffers  # the engine may still read them


def test_a_task_lent_before_an_engine_that_cannot_read_it_joined_runs_elsewhere(
    new_cluster: Callable[..., tuple[Cluster, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocking load-balanced call lends its argument to the engines known when it was sent;
    an engine that joins later on "another host" (a different host token: it cannot read this
    process's memory) and gets the task answers it as an unmet dependency, and the scheduler
    runs it on the engine that can."""
    cluster, rc2 = new_cluster(n=1)
    lview = rc2.load_balanced_view()
    uuid0 = rc2._build_targets(0)[0][0]
    assert rc2._shm.all_local([uuid0]) and rc2._shm._readers[uuid0]
    pid0 = rc2[0].apply_sync(os.getpid)
    busy = lview.apply_async(time.sleep, 4)  # engine 0 (HWM 1): the next task waits
    a = np.ones(4 * MIB, dtype=np.uint8)
    md = lview._build_task_metadata()
    with rc2._shm.waiting():  # as a blocking call does: the argument is lent
        fut = rc2.send_apply_request(
            "task", lambda x: (int(x.sum()), os.getpid()), (a,), metadata=md
        )
    assert len(rc2._shm.live_loans()) == 1
    monkeypatch.setenv(shm.ENV_HOST, "elsewhere")  # inherited by the new engine
    cluster.start_engines_sync(n=1)
    rc2.wait_for_engines(2, timeout=SHORT)
    ar = ipp.AsyncResult(rc2, [fut])
    assert ar.get(timeout=SHORT) == (a.size, pid0)
    busy.get(timeout=SHORT)
    assert rc2._shm.live_loans() == []
    md = rc2.metadata[fut.msg_id]
    assert md["engine_id"] == 0 and md["status"] == "ok"
    # the newcomer, idle while engine 0 slept, got the task first and said why it passed
    tried = md["error"]
    assert tried.ename == "UnmetDependency" and tried.engine_info["engine_id"] == 1, tried
    assert "another host" in tried.evalue
