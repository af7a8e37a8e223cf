"""User-level acceptance tests of ``ferroparallel.Client`` on a real cluster.

Written the way ipyparallel / IPython.parallel users drive a client: ``import ferroparallel as
ipp`` and the classic API. Most tests share one 2-engine cluster (see ``cluster_fixtures``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import traitlets
import zmq

import ferroparallel as ipp
from cluster_util import EngineGate
from ferroparallel import _core, error
from ferroparallel.client import Client, DirectView
from ferroparallel.client.metadata import Metadata
from ferroparallel.cluster import Cluster
from ferroparallel.wire_names import NO_STATUS_KEY

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

SHORT = 30.0
WaitUntil = Callable[..., Any]


def _started_sleeper(seconds: float) -> Callable[[], str]:
    """A task that announces (on stdout) that it runs, then sleeps."""

    def sleeper() -> str:
        import time

        print("started", flush=True)
        time.sleep(seconds)
        return "slept"

    return sleeper


# ----- construction ---------------------------------------------------------------------------


def test_client_from_default_profile(shared_cluster: Cluster) -> None:
    with ipp.Client() as c:
        assert c.ids == [0, 1]
        assert c[:].apply_sync(lambda: "hi") == ["hi", "hi"]
    with ipp.Client(profile="default") as c:
        assert c.ids == [0, 1]


def test_with_client_closes_it(shared_cluster: Cluster) -> None:
    with ipp.Client() as c:
        assert not c.closed
        assert len(c) == 2
    assert c.closed
    with pytest.raises(Exception):  # noqa: B017 - any error, but no hang
        c[0].apply_async(int, 1)


def test_dropped_clients_are_collected_and_many_fit_in_one_process(
    shared_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import threading
    import weakref

    # (when an earlier test made an IPython shell, the %px magics would keep the newest
    # client, as ipyparallel's do: not what this test is about)
    monkeypatch.setattr(Client, "_activate_magics", lambda self: None)
    threads = threading.active_count()
    refs = []
    for i in range(10):
        c = ipp.Client()
        if i % 2:
            assert c[:].apply_sync(lambda: 1) == [1, 1]
            assert c.load_balanced_view().apply_sync(lambda: 2) == 2
        refs.append(weakref.ref(c))
        del c  # no close(): collected, and closed by __del__
    deadline = time.monotonic() + 10
    while gc.collect() is not None and any(r() for r in refs) and time.monotonic() < deadline:
        time.sleep(0.05)  # (a dispatcher may hold its client for the batch it handles)
    assert [r for r in refs if r() is not None] == []
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads  # their dispatcher threads ended
    # more clients at once than libzmq's default 1,023 sockets per context would allow
    many = [ipp.Client() for _ in range(70)]
    try:
        assert {len(c.ids) for c in many} == {2}
        assert many[-1][:].apply_sync(lambda: 3) == [3, 3]
    finally:
        for c in many:
            c.close()


def test_client_from_profile_and_cluster_id(shared_cluster: Cluster, fp_session_root: Path) -> None:
    other = fp_session_root / "profile_elsewhere" / "security"
    other.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_cluster.client_file, other / "ipcontroller-abc123-client.json")
    with ipp.Client(profile="elsewhere", cluster_id="abc123") as c:
        assert c.ids == [0, 1]
        assert c[0].apply_sync(lambda: 5) == 5
    with ipp.Client(profile_dir=other.parent, cluster_id="abc123") as c:
        assert c.ids == [0, 1]


def test_client_finds_a_connection_file_in_the_ipython_profile(
    shared_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ipyparallel's ipcontroller writes it: ``$IPYTHONDIR/profile_<name>/security``."""
    security = tmp_path / "ipython" / "profile_ippstyle" / "security"
    security.mkdir(parents=True)
    shutil.copy(shared_cluster.client_file, security / "ipcontroller-client.json")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    with ipp.Client(profile="ippstyle", timeout=5) as c:
        assert c.ids == [0, 1]
    t0 = time.monotonic()
    with pytest.raises(ipp.error.ConnectionFileError):
        ipp.Client(profile="nowhere", timeout=0.5)
    assert time.monotonic() - t0 < 5  # (one wait, not one per place)


def test_client_from_cluster_object(shared_cluster: Cluster) -> None:
    with ipp.Client(cluster=shared_cluster) as c:
        assert c.ids == [0, 1]
    with shared_cluster.connect_client_sync() as c:
        assert c.ids == [0, 1]


def test_client_from_path(shared_cluster: Cluster) -> None:
    path = shared_cluster.client_file
    for arg in (path, str(path)):
        with ipp.Client(arg) as c:
            assert c.ids == [0, 1]
    with ipp.Client(url_file=str(path)) as c:
        assert c.ids == [0, 1]
    with ipp.Client(url_or_file=str(path)) as c:
        assert c.ids == [0, 1]


def test_client_from_dict(shared_cluster: Cluster) -> None:
    info = json.loads(Path(shared_cluster.client_file).read_text())
    with ipp.Client(info) as c:
        assert c.ids == [0, 1]
        assert c[1].apply_sync(lambda: 7) == 7
    with ipp.Client(connection_info=info) as c:
        assert c.ids == [0, 1]


def test_exec_key_alias(shared_cluster: Cluster, tmp_path: Path) -> None:
    """``exec_key`` (IPython.parallel 0.x) is the HMAC key: the right one works, a wrong one is
    really used (the controller ignores the client, which times out)."""
    info = json.loads(Path(shared_cluster.client_file).read_text())
    key = info.pop("key")
    keyless = tmp_path / "client-nokey.json"
    keyless.write_text(json.dumps({**info, "key": ""}))
    with ipp.Client(str(keyless), exec_key=key) as c:
        assert c[0].apply_sync(lambda: 1) == 1
    with ipp.Client(str(shared_cluster.client_file), exec_key=key.encode()) as c:
        assert c.ids == [0, 1]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ipp.Client(str(shared_cluster.client_file), exec_key="not-the-key", timeout=1)
    assert time.monotonic() - t0 < 1 + 5


def test_classic_positional_signature(shared_cluster: Cluster) -> None:
    """``Client(url_or_file, profile, context, debug, timeout, config, username, packer,
    unpacker, ...)`` of the IPython.parallel reference."""
    path = str(shared_cluster.client_file)
    pack = json.loads(Path(path).read_text()).get("pack", "msgpack")
    with ipp.Client(path, "default", None, False, 10, None, "alice", pack, pack) as c:
        assert c.ids == [0, 1]
        assert c.session.username == "alice"
        assert c[0].apply_sync(lambda: 3) == 3


def test_sshserver_fails_promptly_naming_ssh(shared_cluster: Cluster) -> None:
    """``sshserver`` is accepted by keyword and positionally (10th classic argument). Without
    SSH tunnels the client raises NotImplementedError naming SSH; with them, an unreachable SSH
    server fails within the timeout with an error naming SSH (and the host)."""
    path = str(shared_cluster.client_file)
    t0 = time.monotonic()
    with pytest.raises((NotImplementedError, ConnectionError), match="(?i)ssh") as info:
        ipp.Client(path, sshserver="me@gateway.invalid", timeout=5)
    if not isinstance(info.value, NotImplementedError):
        assert "gateway.invalid" in str(info.value)
    with pytest.raises((NotImplementedError, ConnectionError), match="(?i)ssh"):
        ipp.Client(path, None, None, False, 5, None, None, None, None, "me@gateway.invalid")
    assert time.monotonic() - t0 < 2 * (5 + 5)


def test_url_instead_of_file_is_helpful() -> None:
    with pytest.raises(ValueError) as info:
        ipp.Client("tcp://127.0.0.1:10101")
    text = str(info.value)
    assert "tcp://127.0.0.1:10101" in text
    assert "connection file" in text or "ipcontroller-client.json" in text


# ----- engines, indexing ----------------------------------------------------------------------


def test_len_index_iteration(rc: Client) -> None:
    assert len(rc) == 2
    assert rc.ids == [0, 1]
    v0 = rc[0]
    assert isinstance(v0, DirectView)
    assert v0.apply_sync(lambda: "x") == "x"
    assert len(v0) == 1
    assert rc[:].apply_sync(lambda: 2) == [2, 2]
    assert len(rc[:]) == 2
    assert rc[[0, 1]].apply_sync(lambda: 3) == [3, 3]
    assert rc[[1]].apply_sync(lambda: 4) == [4]
    pids = rc[:].apply_sync(os.getpid)
    assert rc[-1].apply_sync(os.getpid) == pids[-1]
    assert rc[1:].apply_sync(os.getpid) == pids[1:]
    views = list(rc)
    assert len(views) == 2
    assert [v.apply_sync(os.getpid) for v in views] == pids
    with pytest.raises(IndexError):
        rc[5].apply_sync(lambda: 1)


def test_unknown_engine_in_a_list_of_targets_is_a_key_error_too(rc: Client) -> None:
    """ipyparallel raises KeyError for an unknown id in a list of targets (IndexError for a
    single one): code catching either keeps working, and the message names the engine."""
    for call in (
        lambda: rc[[0, 5]],
        lambda: rc.queue_status(targets=[5]),
        lambda: rc.direct_view([5]).apply_sync(lambda: 1),
    ):
        with pytest.raises(KeyError) as info:
            call()
        assert isinstance(info.value, IndexError)
        assert str(info.value) == "No such engine: 5 (registered: [0, 1])"
    with pytest.raises(IndexError) as single:
        rc.queue_status(targets=5)
    assert not isinstance(single.value, KeyError)


def test_indexing_engines_before_any_registered_is_no_engines_registered(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> None:
    """As ipyparallel: with no engine registered yet, ``rc[0]`` (or any id) raises
    NoEnginesRegistered, which tells the user to wait for engines, not IndexError."""
    _cluster, c = new_cluster(n=0)
    for call in (lambda: c[0], lambda: c[-1], lambda: c[[0]], lambda: c.queue_status(targets=0)):
        with pytest.raises(error.NoEnginesRegistered, match="wait_for_engines"):
            call()


def test_bad_arguments_say_what_is_expected(rc: Client) -> None:
    """Wrong types are refused on the client with the expected form in the message, before
    anything is sent (not a comparison error from inside, nor an error from the engines)."""
    with pytest.raises(TypeError, match="targets must be an engine id"):
        rc[1.5]
    with pytest.raises(TypeError, match="n must be an int"):
        rc.wait_for_engines("x", timeout=1)
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        rc.wait_for_engines(1, timeout="x")
    ar = rc[0].apply_async(lambda: 1)
    for call in (ar.get, ar.wait):
        with pytest.raises(TypeError, match="timeout must be a number of seconds"):
            call(timeout="x")
    assert ar.get(timeout=np.int64(30)) == 1  # (numbers of any numeric type are fine)
    rc.wait_for_engines(np.int64(2), timeout=np.float32(5))
    with pytest.raises(TypeError, match="names .str keys."):
        rc[:].push({1: 2})
    with pytest.raises(TypeError, match="keys must be a list of record field names"):
        rc.db_query({}, keys=5)
    lview = rc.load_balanced_view()
    with pytest.raises(ValueError, match="Invalid retries"):
        lview.set_flags(retries=-1)
    assert lview.retries == 0 and lview.apply_sync(lambda: 2) == 2


def test_ids_is_a_copy(rc: Client) -> None:
    ids = rc.ids
    ids.append(99)
    assert rc.ids == [0, 1]


def test_ids_update_when_an_engine_is_added(growing_cluster: tuple[Cluster, Client]) -> None:
    cluster, grc = growing_cluster
    before = list(grc.ids)
    cluster.start_engines_sync(1)
    grc.wait_for_engines(len(before) + 1, timeout=10)
    assert len(grc.ids) == len(before) + 1
    assert grc.ids[: len(before)] == before
    assert len(grc) == len(before) + 1
    new = grc.ids[-1]
    assert grc[new].apply_sync(lambda: "new engine") == "new engine"


# ----- bookkeeping: history, outstanding, results, metadata -----------------------------------


def test_history_and_outstanding(rc: Client) -> None:
    ar = rc[0].apply_async(time.sleep, 0.5)
    (msg_id,) = ar.msg_ids
    assert rc.history[-1] == msg_id
    assert msg_id in rc.outstanding
    assert rc.wait(timeout=SHORT) is True
    assert msg_id not in rc.outstanding
    assert rc.outstanding == set()
    assert msg_id in rc.history
    ar2 = rc[:].apply_async(lambda: 1)
    assert rc.history[-2:] == ar2.msg_ids
    ar2.get(timeout=SHORT)
    assert not rc.outstanding
    # as ipyparallel: control requests (abort, clear, signals) are not tasks
    n = len(rc.history)
    rc.abort(block=True)
    rc.clear(block=True)
    rc.send_signal("SIGCONT", block=True)
    assert len(rc.history) == n and not rc.outstanding
    assert rc.get_result(-1).get(timeout=SHORT) == ar2.get()[-1]


def test_first_sync_call_records_one_task(shared_cluster: Any) -> None:
    """A fresh client's first blocking call also probes the engines (kernel_info): only the
    call itself is in the history."""
    with Client(profile="default", cluster_id="") as fresh:
        assert fresh[0].apply_sync(lambda: 5) == 5
        assert len(fresh.history) == 1
        assert fresh.get_result(0).get(timeout=SHORT) == 5


def test_bookkeeping_follows_reassigned_traits(rc: Client) -> None:
    """The per-message path reads the bookkeeping traits without going through traitlets:
    assigning new containers (even equal ones, which traitlets does not announce) is seen."""
    rc.history = list(rc.history)
    rc.outstanding = set()
    rc.results = collections.defaultdict(dict)
    ar = rc[0].apply_async(time.sleep, 0.3)
    (msg_id,) = ar.msg_ids
    assert rc.history[-1] == msg_id
    assert msg_id in rc.outstanding
    fut = rc.send_apply_request("mux", lambda: 7, ident=rc._engines[0])
    assert fut.result(timeout=SHORT) == 7
    assert rc.results[fut.msg_id] == 7
    assert rc.metadata[fut.msg_id].status == "ok"
    ar.get(timeout=SHORT)
    assert rc.wait(timeout=SHORT) is True
    assert msg_id not in rc.outstanding


def test_results_and_metadata_of_low_level_requests(rc: Client) -> None:
    fut = rc.send_apply_request("mux", lambda x: x * 2, (21,), ident=rc._engines[0])
    assert fut.result(timeout=SHORT) == 42
    assert rc.results[fut.msg_id] == 42
    md = rc.metadata[fut.msg_id]
    assert isinstance(md, Metadata)
    assert md["status"] == "ok"
    assert md.status == "ok"
    assert md.engine_id == 0
    assert md.msg_id == fut.msg_id
    assert md.stdout == ""
    for key in ("submitted", "started", "completed", "received"):
        assert md[key] is not None, key
    assert md.after == [] and md.follow == []  # ipyparallel's values for a direct request
    assert isinstance(md.after, list) and isinstance(md.follow, list)


def test_bookkeeping_of_a_request_just_sent(rc: Client) -> None:
    """What a client records for one request as it leaves (the per-task shortcut of
    ``Client._register``): its future, its ``history`` and ``outstanding`` entries, and a
    Metadata with the keys in their order, ``submitted`` (the header's date), the label, and
    for a direct request the engine (``_outstanding_by_engine`` too)."""
    lview = rc.load_balanced_view()
    uuid = rc._engines[1]
    sent = [
        (lview.apply_async(time.sleep, 0.5), None, {}),
        (
            rc.load_balanced_view().set_flags(label="lb").apply_async(time.sleep, 0.5),
            None,
            {"label": "lb"},
        ),
        (rc[1].apply_async(time.sleep, 0.5), uuid, {"engine_uuid": uuid, "engine_id": 1}),
        (
            rc.direct_view(1).set_flags(label="dv").apply_async(time.sleep, 0.5),
            uuid,
            {"label": "dv", "engine_uuid": uuid, "engine_id": 1},
        ),
    ]
    for ar, engine, known in sent:
        (msg_id,) = ar.msg_ids
        fut = rc._futures[msg_id]
        assert fut.header["msg_id"] == msg_id and fut.header["msg_type"] == "apply_request"
        expected = Metadata(msg_id=msg_id, submitted=fut.header["date"], **known)
        md = rc.metadata[msg_id]
        assert type(md) is Metadata and fut.md is md
        assert list(md.items()) == list(expected.items())
        assert md.submitted.tzinfo is not None
        assert msg_id in rc.outstanding and msg_id in rc.history
        if engine is not None:
            assert msg_id in rc._outstanding_by_engine[engine]
    assert [m for ar, _, _ in sent for m in ar.msg_ids] == rc.history[-4:]
    for ar, _, _ in sent:
        assert ar.get(timeout=SHORT) is None


def test_metadata_is_strict(rc: Client) -> None:
    ar = rc[0].apply_async(lambda: print("out"))
    ar.get(timeout=SHORT)
    md = ar.metadata
    assert isinstance(md, Metadata)
    with pytest.raises(KeyError):
        md["no_such_key"] = 1
    with pytest.raises(KeyError):
        md.update(no_such_key=1)
    with pytest.raises(KeyError):
        md.update({"stdout": "x", "bogus": 2})
    assert "bogus" not in md
    with pytest.raises((KeyError, AttributeError)):
        md.no_such_key = 1
    md.label = "mine"
    assert md["label"] == "mine"
    md.update(label="again")
    assert md.label == "again"
    assert md.engine_id == 0
    assert md.status == "ok"


def test_block_flag(rc: Client) -> None:
    assert rc.block is False
    ar = rc[0].apply(lambda: 1)
    assert isinstance(ar, ipp.AsyncResult)
    assert ar.get(timeout=SHORT) == 1
    rc.block = True
    try:
        v = rc[0]
        assert v.block is True
        assert v.apply(lambda: 2) == 2
        assert rc[:].apply(lambda: 3) == [3, 3]
    finally:
        rc.block = False
    assert rc[0].block is False


def test_spin(rc: Client) -> None:
    ar = rc[:].apply_async(lambda: 1)
    rc.spin()
    assert ar.get(timeout=SHORT) == [1, 1]
    rc.spin()


def test_wait_with_jobs_and_timeout(rc: Client) -> None:
    slow = rc[0].apply_async(time.sleep, 1.0)
    fast = rc[1].apply_async(lambda: 1)
    assert rc.wait([fast], timeout=SHORT) is True
    assert rc.wait(fast.msg_ids, timeout=SHORT) is True
    t0 = time.monotonic()
    assert rc.wait([slow], timeout=0.1) is False
    assert time.monotonic() - t0 < 0.9
    assert rc.wait(slow.msg_ids + fast.msg_ids, timeout=SHORT) is True
    assert slow.ready()
    rc[0].apply_async(time.sleep, 0.2)
    assert rc.wait(timeout=SHORT) is True  # everything outstanding
    assert not rc.outstanding


def test_wait_accepts_a_single_asyncresult(rc: Client) -> None:
    ar = rc[0].apply_async(time.sleep, 0.1)
    assert rc.wait(ar, timeout=SHORT) is True


def test_wait_for_engines(rc: Client) -> None:
    assert rc.wait_for_engines(2, timeout=5) is None
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(3, timeout=0.3)
    assert time.monotonic() - t0 < 3
    fut = rc.wait_for_engines(1, timeout=5, block=False)
    assert fut.result(timeout=SHORT) is None


def test_wait_for_engines_shows_a_progress_bar_when_interactive(rc: Client, capsys) -> None:
    # as ipyparallel: a bar of the engines registered (by default only inside IPython)
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(3, timeout=0.2, interactive=True, widget=False)
    out = capsys.readouterr().out
    assert "2/3" in out and "engine" in out, out
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(3, timeout=0.2)  # not in IPython: no bar
    assert "2/3" not in capsys.readouterr().out
    rc.wait_for_engines(2, timeout=5, interactive=True)  # already there: no bar
    assert capsys.readouterr().out == ""


# ----- control: abort, clear, signals, queue status, shutdown ----------------------------------


def test_abort_queued_tasks(rc: Client, engine_gate: EngineGate) -> None:
    # the running task holds the engine until the gate opens: a timed sleep could end (on a
    # loaded machine) before the aborts arrive, and the "queued" tasks would run
    e0 = rc[0]
    running = e0.apply_async(engine_gate.task())
    queued = [e0.apply_async(lambda i=i: i) for i in range(3)]
    time.sleep(0.3)  # (the engine has received them: they wait behind the running one)
    rc.abort(queued, block=True)
    for ar in queued:
        with pytest.raises(error.TaskAborted):
            ar.get(timeout=SHORT)
    # answered at once, not when the engine would have reached them
    assert not running.ready()
    engine_gate.open()
    assert running.get(timeout=SHORT) is None
    engine_gate.close()
    # by msg_id, and AsyncResult.abort()
    running = e0.apply_async(engine_gate.task())
    by_id = e0.apply_async(lambda: "not run")
    by_ar = e0.apply_async(lambda: "not run either")
    rc.abort(by_id.msg_ids, block=True)
    by_ar.abort()
    for ar in (by_id, by_ar):
        with pytest.raises(error.TaskAborted):
            ar.get(timeout=SHORT)
    engine_gate.open()
    running.get(timeout=SHORT)
    assert e0.apply_sync(lambda: "still serving") == "still serving"


def test_abort_accepts_a_single_asyncresult(rc: Client, engine_gate: EngineGate) -> None:
    running = rc[0].apply_async(engine_gate.task())
    queued = rc[0].apply_async(lambda: 1)
    try:
        rc.abort(queued, block=True)
        with pytest.raises(error.TaskAborted):
            queued.get(timeout=SHORT)
    finally:
        engine_gate.open()
        running.get(timeout=SHORT)
        queued.wait(SHORT)


def test_clear(rc: Client) -> None:
    rc[:].push({"leftover": 1}, block=True)
    assert rc[:].pull("leftover", block=True) == [1, 1]
    rc.clear(targets=[0], block=True)
    present = ipp.interactive(lambda: "leftover" in globals())
    assert rc[:].apply_sync(present) == [False, True]
    ar = rc.clear(block=False)
    ar.get(timeout=SHORT)
    assert rc[:].apply_sync(present) == [False, False]


def test_a_result_the_client_cannot_unpickle_names_the_engine_and_the_cause(rc: Client) -> None:
    # a class that exists only on engine 1 (a module made there at run time)
    rc[1].execute(
        "import sys, types\n"
        "_m = types.ModuleType('fp_engine_only_mod')\n"
        "class Thing:\n    pass\n"
        "Thing.__module__ = 'fp_engine_only_mod'\n"
        "_m.Thing = Thing\n"
        "sys.modules['fp_engine_only_mod'] = _m\n",
        block=True,
    )
    try:
        with pytest.raises(error.RemoteError) as info:
            rc[1].apply_sync(lambda: __import__("fp_engine_only_mod").Thing())
        assert info.value.ename == "ModuleNotFoundError"
        assert "cannot deserialize the result on the client" in info.value.evalue
        assert "fp_engine_only_mod" in info.value.evalue
        assert info.value.engine_info["engine_id"] == 1
        assert str(info.value).startswith("[1:apply] ModuleNotFoundError")
        assert "ModuleNotFoundError" in info.value.traceback  # the client's own traceback
        # the client and the engine go on
        assert rc[1].apply_sync(lambda: 7) == 7
    finally:
        rc[1].execute("import sys; sys.modules.pop('fp_engine_only_mod', None)", block=True)


def test_send_signal_interrupts_a_running_task(rc: Client, wait_until: WaitUntil) -> None:
    ar = rc[1].apply_async(_started_sleeper(30))
    wait_until(lambda: "started" in ar.stdout, SHORT, "the task to start")
    t0 = time.monotonic()
    rc.send_signal(signal.SIGINT, targets=1, block=True)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=10)
    assert time.monotonic() - t0 < 10
    assert info.value.ename == "KeyboardInterrupt"
    assert info.value.engine_info.get("engine_id") == 1
    # the traceback ends in the user's code, not in the engine's signal handler
    tb = (
        info.value.traceback
        if isinstance(info.value.traceback, str)
        else "".join(info.value.traceback)
    )
    assert "KeyboardInterrupt" in tb and "signals.py" not in tb and "sleep" in tb, tb
    # the same for a cell (execute: IPython formats its traceback)
    ar = rc[1].execute("import time\nprint('started', flush=True)\ntime.sleep(30)", block=False)
    wait_until(lambda: "started" in ar.stdout, SHORT, "the cell to start")
    rc.send_signal(signal.SIGINT, targets=1, block=True)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=10)
    tb = (
        info.value.traceback
        if isinstance(info.value.traceback, str)
        else "".join(info.value.traceback)
    )
    assert "KeyboardInterrupt" in tb and "signals.py" not in tb and "sleep" in tb, tb
    # the engine keeps serving
    assert rc[1].apply_async(lambda: 42).get(timeout=SHORT) == 42
    assert rc.ids == [0, 1]


def test_queue_status(rc: Client, wait_until: WaitUntil, engine_gate: EngineGate) -> None:
    qs = rc.queue_status()
    assert {0, 1, "unassigned"} <= set(qs)
    assert next(iter(qs)) == "unassigned"  # first, as in ipyparallel
    for eid in (0, 1):
        assert {"queue", "completed", "tasks"} <= set(qs[eid])
    before = qs[0]["completed"]
    rc[0].apply_sync(lambda: None)
    one = rc.queue_status(0)
    assert set(one) >= {"queue", "completed", "tasks"}
    assert one["completed"] >= before + 1
    busy = rc[0].apply_async(engine_gate.task())
    more = rc[0].apply_async(lambda: None)
    # the hub learns of requests asynchronously; both stay queued until the gate opens (not
    # for a fixed time, which a loaded machine may use up before the hub is asked)
    wait_until(lambda: rc.queue_status(0)["queue"] == 2, SHORT, "the hub to see 2 queued tasks")
    assert rc.queue_status()[1]["queue"] == 0
    verbose = rc.queue_status(verbose=True)
    assert isinstance(verbose[0]["queue"], list)
    engine_gate.open()
    busy.get(timeout=SHORT)
    more.get(timeout=SHORT)
    # verbose: msg_ids, the completed ones too (as ipyparallel's hub)
    done = rc.queue_status(0, verbose=True)["completed"]
    assert isinstance(done, list) and more.msg_ids[0] in done and busy.msg_ids[0] in done
    lb = rc.load_balanced_view(targets=[1])
    t = lb.apply_async(lambda: None)
    t.get(timeout=SHORT)
    wait_until(
        lambda: t.msg_ids[0] in rc.queue_status(1, verbose=True)["completed"],
        SHORT,
        "the hub to list the finished task",
    )
    assert rc.queue_status(1)["completed"] == len(rc.queue_status(1, verbose=True)["completed"])


def test_get_result(rc: Client) -> None:
    ar = rc[0].apply_async(time.sleep, 0.5)
    again = rc.get_result(ar.msg_ids[0])
    assert again.owner  # as ipyparallel's default
    assert not rc.get_result(ar.msg_ids[0], owner=False).owner
    assert again.get(timeout=SHORT) is None
    assert again.metadata["engine_id"] == 0
    fut = rc.send_apply_request("mux", lambda: "low", ident=rc._engines[1])
    idx = rc.history.index(fut.msg_id)
    assert rc.get_result(idx).get(timeout=SHORT) == "low"
    # that AsyncResult owned it: once the client lets it go, the hub's record answers
    again = rc.get_result(fut.msg_id)
    assert again.get(timeout=SHORT) == "low"
    assert again.metadata["engine_id"] == 1
    ar.get(timeout=SHORT)


def test_results_is_a_defaultdict(rc: Client) -> None:
    # as ipyparallel: ``rc.results`` is a defaultdict(dict): a msg_id it does not hold (never
    # sent, or already owned by its AsyncResult) reads as an empty dict, not a KeyError
    assert type(rc.results) is collections.defaultdict
    ar = rc[0].apply_async(lambda: 1)
    assert ar.get(timeout=SHORT) == 1
    assert rc.results[ar.msg_ids[0]] == {}
    assert rc.results["ferroparallel-no-such-msg"] == {}


def test_get_result_of_an_unknown_msg_id_fails_on_get(rc: Client) -> None:
    # as ipyparallel: the AsyncHubResult is returned; asking it for the result raises
    ar = rc.get_result("ferroparallel-no-such-msg")
    assert isinstance(ar, ipp.AsyncHubResult)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=SHORT)
    assert info.value.ename == "KeyError"
    assert "ferroparallel-no-such-msg" in str(info.value)
    with pytest.raises(error.RemoteError):
        rc.get_result(["ferroparallel-no-such-msg"]).get(timeout=SHORT)
    with pytest.raises(error.RemoteError, match="ferroparallel-no-such-msg"):
        rc.get_result("ferroparallel-no-such-msg", block=True)  # waiting raises at once
    with pytest.raises(TypeError, match="Expected msg_id, int, or AsyncResult, got 3.5"):
        rc.get_result(3.5)


def test_get_result_of_a_list_is_a_list(rc: Client) -> None:
    fut = rc.send_apply_request("mux", lambda: "low", ident=rc._engines[1])
    fut.result(timeout=SHORT)
    assert rc.get_result([fut.msg_id]).get(timeout=SHORT) == ["low"]


def test_get_result_accepts_an_asyncresult(rc: Client) -> None:
    ar = rc[0].apply_async(time.sleep, 0.3)
    assert rc.get_result(ar).get(timeout=SHORT) is None


def test_get_result_of_own_work_is_a_plain_asyncresult(rc: Client) -> None:
    """As ipyparallel's: a pending msg_id of this client, and an AsyncResult it made (even
    finished, its results gone from the caches), give a plain AsyncResult over the same
    futures without asking the hub; a purged msg_id and an AsyncHubResult go to the hub."""
    pending = rc[0].apply_async(time.sleep, 0.3)
    mine = rc.get_result(pending.msg_ids[0], block=False)
    assert type(mine) is ipp.AsyncResult and mine._children == pending._children
    assert mine.get(timeout=SHORT) is None
    ar = rc[1].apply_async(lambda: "mine")
    amr = rc.load_balanced_view().map_async(lambda x: x * 2, range(3), chunksize=1)
    assert ar.get(timeout=SHORT) == "mine" and amr.get(timeout=SHORT) == [0, 2, 4]
    rc.purge_hub_results([ar, amr])  # (the hub could not answer for them now)
    again = rc.get_result(ar, block=False)
    assert type(again) is ipp.AsyncResult and again._children == ar._children
    assert again.get(timeout=SHORT) == "mine"
    chunks = rc.get_result(amr, block=False)
    assert type(chunks) is ipp.AsyncResult and chunks.get(timeout=SHORT) == [[0], [2], [4]]
    done = rc[0].apply_async(lambda: "from the hub")
    done.get(timeout=SHORT)
    rc.purge_local_results(done)
    hub = rc.get_result(done.msg_ids[0], block=False)
    assert isinstance(hub, ipp.AsyncHubResult) and hub.get(timeout=SHORT) == "from the hub"
    assert isinstance(rc.get_result(hub, block=False), ipp.AsyncHubResult)


def test_get_result_of_finished_work(rc: Client) -> None:
    """The seed reference: get_result 'can also be a convenient way to retrieve the metadata
    associated with blocking execution'."""
    ar = rc[0].apply_async(lambda: "answer")
    ar.get(timeout=SHORT)
    ar.wait_for_output(SHORT)
    assert rc[0].apply_sync(lambda: "blocked") == "blocked"
    time.sleep(0.3)  # let the client finish its bookkeeping of both
    last = rc.get_result(-1)
    assert last.get(timeout=SHORT) == "blocked"
    assert last.metadata["engine_id"] == 0
    assert rc.get_result(ar.msg_ids[0]).get(timeout=SHORT) == "answer"


def test_send_apply_and_execute_request(rc: Client) -> None:
    fut = rc.send_apply_request("mux", lambda a, b=0: a + b, (1,), {"b": 2}, ident=rc._engines[1])
    assert fut.result(timeout=SHORT) == 3
    fut = rc.send_execute_request("mux", "via_execute = 11", ident=rc._engines[1])
    fut.result(timeout=SHORT)
    assert rc[1]["via_execute"] == 11
    with pytest.raises(error.RemoteError) as info:
        rc.send_apply_request("mux", lambda: 1 / 0, ident=rc._engines[0]).result(timeout=SHORT)
    assert info.value.ename == "ZeroDivisionError"


def test_purge_local_results(rc: Client) -> None:
    futs = [rc.send_apply_request("mux", lambda i=i: i, ident=rc._engines[0]) for i in range(3)]
    assert [f.result(timeout=SHORT) for f in futs] == [0, 1, 2]
    first = futs[0].msg_id
    assert first in rc.results and first in rc.metadata
    rc.purge_local_results(first)
    assert first not in rc.results
    assert first not in rc.metadata
    rc.purge_local_results("all")
    for f in futs:
        assert f.msg_id not in rc.results
        assert f.msg_id not in rc.metadata
    pending = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(RuntimeError, match="pending"):
        rc.purge_local_results(pending.msg_ids)
    pending.get(timeout=SHORT)
    # as ipyparallel: nothing named is an error; targets purge that engine's results
    with pytest.raises(ValueError, match="at least one of"):
        rc.purge_local_results()
    on1 = rc.send_apply_request("mux", lambda: 1, ident=rc._engines[1])
    on0 = rc.send_apply_request("mux", lambda: 0, ident=rc._engines[0])
    assert (on1.result(timeout=SHORT), on0.result(timeout=SHORT)) == (1, 0)
    rc.purge_local_results(targets=1)
    assert on1.msg_id not in rc.results and on0.msg_id in rc.results


def test_purge_results_by_target_includes_engine_0(rc: Client, wait_until: WaitUntil) -> None:
    """``purge_results(targets=...)`` is ``purge_local_results`` plus ``purge_hub_results`` with
    the same arguments (ipyparallel's docstring): the engine's results go here and in the
    hub; engine id 0 is a target like any other (not "nothing named")."""
    on0 = [rc.send_apply_request("mux", lambda: 0, ident=rc._engines[0]) for _ in range(2)]
    on1 = rc.send_apply_request("mux", lambda: 1, ident=rc._engines[1])
    assert [f.result(timeout=SHORT) for f in [*on0, on1]] == [0, 0, 1]
    ids0 = [f.msg_id for f in on0]
    done = {"msg_id": {"$in": [*ids0, on1.msg_id]}, "completed": {"$ne": None}}
    wait_until(lambda: len(rc.db_query(done, ["msg_id"])) == 3, SHORT, "the hub's records")
    rc.purge_results(targets=0)
    assert not any(m in rc.results or m in rc.metadata for m in ids0)
    assert on1.msg_id in rc.results
    assert [r["msg_id"] for r in rc.db_query(done, ["msg_id"])] == [on1.msg_id]
    rc.purge_results(targets=[1])
    assert on1.msg_id not in rc.results and on1.msg_id not in rc.metadata
    assert rc.db_query(done, ["msg_id"]) == []
    with pytest.raises(ValueError, match="at least one of|needs jobs"):
        rc.purge_results()


_UNCLOSED_CLIENT_SCRIPT = (
    "import sys, ferroparallel as ipp\n"
    "rc = ipp.Client(sys.argv[1])\n"
    "print(rc[0].apply_sync(lambda: 'ran'), flush=True)\n"
)


def test_script_exits_cleanly_without_closing_its_client(shared_cluster: Cluster) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _UNCLOSED_CLIENT_SCRIPT, str(shared_cluster.client_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out.strip(), err[-300:]))
    assert all(out == "ran" for _, out, _ in results), results
    assert [code for code, _, _ in results] == [0] * 6, results


def test_close(shared_cluster: Cluster) -> None:
    c = ipp.Client(shared_cluster.client_file)
    assert c[0].apply_sync(lambda: 1) == 1
    c.close()
    assert c.closed
    c.close()  # idempotent
    with pytest.raises(Exception) as info:  # noqa: B017 - any error, but no hang
        c[0].apply_async(lambda: 1)
    assert "closed" in str(info.value).lower()


def test_wait_accepts_any_future(rc: Client) -> None:
    """As ipyparallel, ``rc.wait`` takes plain ``concurrent.futures`` Futures too."""
    import concurrent.futures
    import threading

    plain: concurrent.futures.Future = concurrent.futures.Future()
    threading.Timer(0.2, plain.set_result, ("later",)).start()
    ar = rc[0].apply_async(abs, -3)
    assert rc.wait([plain, ar], timeout=SHORT)
    assert plain.result(timeout=0) == "later" and ar.get(timeout=0) == 3
    never: concurrent.futures.Future = concurrent.futures.Future()
    assert rc.wait([never], timeout=0.05) is False


def test_purge_all_local_results_refuses_while_pending(rc: Client) -> None:
    """``purge_local_results('all')`` raises RuntimeError while anything is outstanding (as
    ipyparallel), and forgets nothing then."""
    # (a bare request: an AsyncResult would take its result out of the client's caches)
    done = rc.send_apply_request("mux", lambda: 1, ident=rc._engines[0])
    assert done.result(timeout=SHORT) == 1
    pending = rc[1].apply_async(time.sleep, 0.5)
    with pytest.raises(RuntimeError, match="pending"):
        rc.purge_local_results("all")
    assert done.msg_id in rc.results and done.msg_id in rc.metadata
    pending.get(timeout=SHORT)
    rc.purge_local_results("all")
    assert done.msg_id not in rc.results and done.msg_id not in rc.metadata


def test_view_targets_resolved_as_ipyparallel(rc: Client) -> None:
    """``rc[None]`` is a TypeError; a load-balanced view's targets are resolved to engine ids
    when it is made (``"all"``: None, every engine)."""
    with pytest.raises(TypeError):
        rc[None]
    assert rc.load_balanced_view(-1).targets == [rc.ids[-1]]
    assert rc.load_balanced_view(slice(0, 1)).targets == [0]
    assert rc.load_balanced_view(range(2)).targets == [0, 1]
    assert rc.load_balanced_view("all").targets is None
    assert rc.load_balanced_view().targets is None
    assert rc.load_balanced_view(-1).apply_sync(lambda: 5) == 5


def test_executor(rc: Client) -> None:
    ex = rc.executor()
    assert isinstance(ex, Executor)
    fut = ex.submit(lambda x, y=1: x * y, 3, y=5)
    assert fut.result(timeout=SHORT) == 15
    assert list(ex.map(lambda x: x + 1, range(6))) == [1, 2, 3, 4, 5, 6]
    assert list(ex.map(pow, [2, 3], [3, 2])) == [8, 9]
    with rc.executor() as ex2:
        futs = [ex2.submit(abs, -i) for i in range(4)]
    assert [f.result(timeout=0) for f in futs] == [0, 1, 2, 3]
    # a DirectView's executor maps too (split by engine, no chunksize)
    dex = rc[:].executor
    assert list(dex.map(lambda x: x * x, range(4))) == [0, 1, 4, 9]


def test_executor_as_a_dask_pool(rc: Client) -> None:
    """Executors are how dask runs on ipyparallel without become_dask: its threaded scheduler
    takes any ``concurrent.futures`` executor as ``pool`` and sizes itself by the executor's
    ``_max_workers``, which ipyparallel's executors set to the view's engine count."""
    dask = pytest.importorskip("dask")
    import operator

    import dask.bag as db

    ex = rc.executor()
    assert ex._max_workers == len(rc.ids) == 2
    assert rc.executor(targets=[1])._max_workers == 1
    total = db.from_sequence(range(10), npartitions=4).map(operator.neg).sum()
    with dask.config.set(pool=ex):
        assert dask.compute(total, scheduler="threads") == (-45,)


# ----- traits ---------------------------------------------------------------------------------


def test_traits(rc: Client) -> None:
    names = set(rc.trait_names())
    assert {"block", "history", "outstanding", "results", "metadata", "debug", "profile"} <= names
    traits = rc.traits()
    assert isinstance(traits["block"], traitlets.Bool)
    assert set(traits) == names
    assert set(type(rc).class_trait_names()) == names
    assert "block" in Client.class_trait_names()


def test_observe_client_block(rc: Client) -> None:
    changes: list[tuple[str, Any, Any]] = []
    legacy: list[tuple[str, Any, Any]] = []

    def on_change(change: Any) -> None:
        changes.append((change["name"], change["old"], change["new"]))

    def on_trait(name: str, old: Any, new: Any) -> None:
        legacy.append((name, old, new))

    rc.observe(on_change, "block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rc.on_trait_change(on_trait, "block")
    try:
        rc.block = True
        rc.block = False
    finally:
        rc.unobserve(on_change, "block")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rc.on_trait_change(on_trait, "block", remove=True)
    assert changes == [("block", False, True), ("block", True, False)]
    assert legacy == [("block", False, True), ("block", True, False)]


def test_observe_view_targets_and_block(rc: Client) -> None:
    view = rc.direct_view([0])
    assert {"targets", "block"} <= set(view.trait_names())
    changes: list[tuple[str, Any, Any]] = []
    legacy: list[tuple[str, Any, Any]] = []

    def on_trait(name: str, old: Any, new: Any) -> None:
        legacy.append((name, old, new))

    view.observe(
        lambda ch: changes.append((ch["name"], ch["old"], ch["new"])), ["targets", "block"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        view.on_trait_change(on_trait, "block")
    view.targets = [1]
    view.block = True
    view.set_flags(block=False)
    assert changes == [("targets", [0], [1]), ("block", False, True), ("block", True, False)]
    assert legacy == [("block", False, True), ("block", True, False)]
    assert view.apply_sync(os.getpid) == [rc[1].apply_sync(os.getpid)]


# ----- throwaway clusters ---------------------------------------------------------------------


def test_shutdown(
    new_cluster: Callable[..., tuple[Cluster, Client]], wait_until: WaitUntil
) -> None:
    cluster, c = new_cluster(n=2)
    pids = c[:].apply_sync(os.getpid)
    # as ipyparallel's engines: a busy engine stops at once, and its running task fails
    busy = c[1].apply_async(time.sleep, 60)
    wait_until(lambda: c.queue_status(1)["queue"] == 1, SHORT, "the task to start")
    t0 = time.monotonic()
    c.shutdown(targets=[1], block=True)
    with pytest.raises(error.RemoteError) as e:
        busy.get(timeout=SHORT)
    assert e.value.ename == "EngineError" and time.monotonic() - t0 < 8
    wait_until(lambda: c.ids == [0], SHORT, "engine 1 to unregister")
    assert c[0].apply_sync(lambda: "alive") == "alive"
    assert c.wait(-1, timeout=1)  # a finished job, by its index in history
    c.shutdown(block=True)
    wait_until(lambda: c.ids == [], SHORT, "all engines to unregister")
    procs = [p for es in cluster.engines.values() for p in es.processes]
    assert sorted(p.pid for p in procs) == sorted(pids)
    wait_until(lambda: not any(p.running for p in procs), SHORT, "engine processes to exit")
    with pytest.raises(error.NoEnginesRegistered):
        c[:].apply_sync(lambda: 1)
    c.shutdown(hub=True)
    wait_until(lambda: not cluster.running, SHORT, "the controller to exit")
    # no engines now because the controller is gone: the error says so
    wait_until(lambda: c._hub_shutdown, SHORT, "the shutdown notification")
    with pytest.raises(error.IoClosedError, match="has shut down"):
        c[:].apply_sync(lambda: 1)


def _statuses_seen(
    shared_cluster: Cluster, run: Callable[[], str], probe: Callable[[], Any]
) -> list[str]:
    """Execution states an outside IOPub subscriber (of everything) sees for the request
    that ``run()`` makes (and returns the msg_id of); ``probe()`` makes some IOPub output,
    made until the subscriber sees it (its subscription has then reached the controller)."""
    cinfo = json.loads(shared_cluster.client_file.read_text())
    session = _core.Session(cinfo["key"].encode(), packer=cinfo.get("pack", "msgpack"))
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.subscribe(b"")
    sub.connect(f"tcp://127.0.0.1:{cinfo['iopub']}")
    try:
        deadline = time.monotonic() + 30
        while not sub.poll(100):  # until the subscription has reached the controller
            assert time.monotonic() < deadline, "the IOPub subscription never took effect"
            probe()
        while sub.poll(200):  # what the probes sent
            sub.recv_multipart()
        msg_id = run()
        states: list[str] = []
        deadline = time.monotonic() + 10
        # until the idle status, or one second without any message
        while time.monotonic() < deadline and states[-1:] != ["idle"] and sub.poll(1000):
            msg = session.deserialize(sub.recv_multipart(), record=False)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status":
                states.append(msg["content"]["execution_state"])
        return states
    finally:
        sub.close()


def test_requests_ask_engines_for_no_status_unless_wanted(
    rc: Client, shared_cluster: Cluster
) -> None:
    """Our client counts outputs from the reply (``fp_outputs``), so its requests carry
    ``fp_no_status`` and engines send no busy/idle for them; ``status_messages=True`` brings
    them back (for tools watching IOPub)."""
    assert rc.status_messages is False
    assert rc._request_metadata({"a": 1})[NO_STATUS_KEY] is True

    def run() -> str:
        ar = rc[0].apply_async(print, "hello")
        ar.get(timeout=10)
        assert ar.wait_for_output(10) and ar.stdout == "hello\n"
        return ar.msg_ids[0]

    def probe() -> None:
        rc[0].execute("print('probe')", block=True)

    assert _statuses_seen(shared_cluster, run, probe) == []
    rc.status_messages = True
    try:
        assert NO_STATUS_KEY not in rc._request_metadata(None)
        assert _statuses_seen(shared_cluster, run, probe) == ["busy", "idle"]
    finally:
        rc.status_messages = False


def test_wait_interactive_and_deprecated_spin_thread(rc: Client, capsys) -> None:
    ars = [rc[i % 2].apply_async(time.sleep, 0.05) for i in range(6)]
    rc.wait_interactive(interval=0.05, timeout=30)
    assert all(ar.ready() for ar in ars)
    rc.wait_interactive(ars[:2], interval=0.05)
    with pytest.warns(DeprecationWarning, match="spin_thread"):
        rc.spin_thread(0.1)
    with pytest.warns(DeprecationWarning, match="stop_spin_thread"):
        rc.stop_spin_thread()
