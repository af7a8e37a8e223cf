"""Unit tests of MessageFuture, Metadata and the AsyncResult family (no cluster needed).

MessageFutures are built by hand and resolved from helper threads, the way the client's
dispatcher thread resolves them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from cluster_util import raised_by_alarm
from ferroparallel.client.asyncresult import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    AsyncHubResult,
    AsyncMapResult,
    AsyncResult,
)
from ferroparallel.client.futures import MessageFuture
from ferroparallel.client.mapping import Map, RoundRobinMap
from ferroparallel.client.metadata import NO_DEPENDENCIES, Metadata, parse_date
from ferroparallel.error import (
    CompositeError,
    EngineError,
    RemoteError,
    TaskAborted,
    unwrap_exception,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeClient:
    """The members of Client that AsyncResult may use."""

    def __init__(self) -> None:
        self.metadata: collections.defaultdict[str, Metadata] = collections.defaultdict(Metadata)
        self._futures: dict[str, MessageFuture] = {}
        self.aborted: list[list[str]] = []
        self.uuids = {f"uuid-{i}": i for i in range(8)}

    def abort(self, msg_ids: list[str], block: bool = False) -> str:
        self.aborted.append(list(msg_ids))
        return "abort-sent"

    def _engine_id_of(self, uuid: str) -> int | None:
        return self.uuids.get(uuid)

    def send(
        self, n: int, *, engines: list[int] | None = None, with_md: bool = False
    ) -> list[MessageFuture]:
        """Register n messages like Client._register does (``with_md``: each future holds its
        Metadata, as the client's do)."""
        futs = []
        for i in range(n):
            msg_id = f"msg-{len(self._futures)}"
            fut = MessageFuture(msg_id, {"msg_id": msg_id, "msg_type": "apply_request"})
            md = self.metadata[msg_id]
            md["msg_id"] = msg_id
            md["submitted"] = (T0 + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
            if engines is not None:
                md["engine_uuid"] = f"uuid-{engines[i]}"
                md["engine_id"] = engines[i]
            if with_md:
                fut.md = md
            self._futures[msg_id] = fut
            futs.append(fut)
        return futs

    def reply(
        self,
        fut: MessageFuture,
        value: Any = None,
        *,
        exc: BaseException | None = None,
        engine: int | None = None,
        started: float = 0.0,
        completed: float = 1.0,
        received: float = 1.5,
        output: bool = True,
    ) -> None:
        """Update metadata, then resolve, like the dispatcher's handle_reply."""
        md = self.metadata[fut.msg_id]
        if engine is not None:
            md["engine_uuid"] = f"uuid-{engine}"
            md["engine_id"] = engine
        md["started"] = (T0 + timedelta(seconds=started)).isoformat()
        md["completed"] = T0 + timedelta(seconds=completed)
        md["received"] = (T0 + timedelta(seconds=received)).isoformat().replace("+00:00", "Z")
        md["status"] = "error" if exc is not None else "ok"
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
        if output:
            fut.output.set_result(None)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def later(fn: Callable[[], Any], delay: float = 0.05) -> threading.Thread:
    """Run fn on another thread after a delay (a stand-in for the dispatcher)."""

    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def remote(ename: str = "ZeroDivisionError", engine: int = 0) -> RemoteError:
    return unwrap_exception(
        {
            "ename": ename,
            "evalue": "division by zero" if ename == "ZeroDivisionError" else "boom",
            "traceback": ["Traceback (most recent call last):", f"{ename}: ..."],
            "engine_info": {
                "engine_uuid": f"uuid-{engine}",
                "engine_id": engine,
                "method": "apply",
            },
        }
    )


# -- MessageFuture ----------------------------------------------------------------------------


def test_message_future_basics() -> None:
    f = MessageFuture("m1")
    assert isinstance(f, concurrent.futures.Future)
    assert f.msg_id == "m1"
    assert f.header == {"msg_id": "m1"}
    assert f.track is None
    assert isinstance(f.output, concurrent.futures.Future)
    assert not f.output.done()
    assert f.sent and f.wait_for_send(0)
    assert not f.cancel()
    assert not f.wait(0.01)
    f.set_result(3)
    assert f.wait(0) and f.result() == 3
    assert "m1" in repr(f)


def test_message_future_output_is_created_on_demand() -> None:
    # finished before anyone asked: the future handed out later is already resolved
    f = MessageFuture("m4")
    assert not f.output_done()
    f.finish_output()
    f.finish_output()  # idempotent
    assert f.output_done()
    assert f.output.done() and f.output.result() is None
    assert f.output is f.output
    # asked for first: finishing resolves it and wakes a waiter on another thread
    g = MessageFuture("m5")
    out = g.output
    assert not out.done() and not g.output_done()
    later(g.finish_output)
    assert concurrent.futures.wait([out], timeout=5).done == {out}
    assert g.output_done()


def test_single_message_results_leave_little_for_the_garbage_collector() -> None:
    """Thousands of held results must not each keep extra GC-tracked containers alive: the
    msg_id tuple and the completion order of a one-message AsyncResult become untracked."""
    import gc

    client = FakeClient()
    (fut,) = client.send(1)
    ar = AsyncResult(client, [fut])
    client.reply(fut, 1)
    assert ar.get(5) == 1
    gc.collect()
    assert not gc.is_tracked(ar._msg_ids)
    assert not gc.is_tracked(ar._order)


def test_message_future_tracking() -> None:
    tracker: concurrent.futures.Future = concurrent.futures.Future()
    f = MessageFuture("m2", {"msg_id": "m2", "msg_type": "apply_request"}, track=tracker)
    assert not f.sent
    assert not f.wait_for_send(0.01)
    later(lambda: tracker.set_result(None))
    assert f.wait_for_send(5)
    assert f.sent

    class Tracker:  # zmq.MessageTracker-like: ``done`` property, ``wait(timeout)``
        done = False

        def wait(self, timeout: float | None = None) -> None:
            time.sleep(min(timeout or 0.01, 0.01))

    t = Tracker()
    f2 = MessageFuture("m3", track=t)
    assert not f2.sent and not f2.wait_for_send(0.05)
    t.done = True
    assert f2.sent and f2.wait_for_send(None)


def test_wait_for_send_raises_when_still_sending(client: FakeClient) -> None:
    """As ipyparallel's: ``AsyncResult.wait_for_send`` raises TimeoutError("Still waiting to
    be sent") when the tracked send has not completed in time (it returned False)."""
    tracker: concurrent.futures.Future = concurrent.futures.Future()
    f = MessageFuture("m4", {"msg_id": "m4", "msg_type": "apply_request"}, track=tracker)
    ar = AsyncResult(client, [f])
    with pytest.raises(TimeoutError, match="Still waiting to be sent"):
        ar.wait_for_send(0.01)
    with pytest.raises(TimeoutError):
        ar.wait_for_send(0)
    later(lambda: tracker.set_result(None))
    assert ar.wait_for_send() is True


# -- Metadata ---------------------------------------------------------------------------------


def test_metadata_defaults_and_access() -> None:
    md = Metadata()
    assert set(md) == {
        "msg_id", "submitted", "started", "completed", "received", "engine_uuid",
        "engine_id", "follow", "after", "status", "execute_input", "execute_result", "error",
        "stdout", "stderr", "outputs", "data", "label", "is_broadcast", "is_coalescing",
    }  # fmt: skip
    assert md.stdout == "" and md["stderr"] == ""
    assert md.outputs == [] and md.data == {}
    assert md.msg_id is None
    md.stdout += "hi"
    md["engine_id"] = 3
    assert md["stdout"] == "hi" and md.engine_id == 3
    # defaults are not shared between instances
    md.outputs.append({"data": {}})
    assert Metadata().outputs == []
    # IPython < 3 names are readable
    md.execute_result = {"data": {"text/plain": "1"}}
    assert md.pyout == md.execute_result
    with pytest.raises(AttributeError):
        _ = md.nope


def test_metadata_of_a_request_is_the_plain_constructors() -> None:
    """``Metadata._of_request`` (the client's per-task shortcut) makes what the constructor
    makes: same type, keys in the same order, same values, mutable defaults not shared."""
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    for known in ({}, {"label": "L"}, {"engine_uuid": "u", "engine_id": 3}):
        values = {"msg_id": "m1", "submitted": when, **known}
        fast = Metadata._of_request(values)
        plain = Metadata(values)
        assert type(fast) is Metadata
        assert list(fast.items()) == list(plain.items())
        assert fast.outputs is not plain.outputs and fast.data is not plain.data
    values = {"msg_id": "a", "submitted": when}
    assert Metadata._of_request(values).outputs is not Metadata._of_request(values).outputs


def test_metadata_rejects_unknown_keys() -> None:
    md = Metadata(msg_id="a")
    with pytest.raises(KeyError):
        md["nope"] = 1
    with pytest.raises(KeyError):
        md.nope = 1
    with pytest.raises(AttributeError, match="not a metadata key"):  # ipyparallel's exception
        md.nope = 1
    with pytest.raises(KeyError):
        md.update({"stdout": "x", "nope": 1})
    assert md.stdout == ""  # update is all-or-nothing
    with pytest.raises(KeyError):
        md.update(nope=1)
    with pytest.raises(KeyError):
        md.update([("nope", 1)])
    with pytest.raises(KeyError):
        md |= {"nope": 1}
    with pytest.raises(KeyError):
        md.setdefault("nope", 1)
    with pytest.raises(KeyError):
        del md["stdout"]
    with pytest.raises(KeyError):
        md.pop("stdout")
    with pytest.raises(KeyError):
        Metadata(nope=1)
    md.update({"stdout": "x"}, stderr="y")
    md.update([("label", "L")])
    assert (md.stdout, md.stderr, md.label) == ("x", "y", "L")
    assert "nope" not in md


def test_metadata_dates_and_copies() -> None:
    md = Metadata(submitted="2024-05-01T12:00:00.123456Z")
    assert md.submitted == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    md["completed"] = "2024-05-01T12:00:01"  # no offset: UTC
    assert md.completed.tzinfo is not None
    md["received"] = datetime(2024, 5, 1, 13, 0)  # naive datetimes are kept as given
    assert md.parse_dates().received.tzinfo is not None
    md["started"] = "garbage"
    assert md.started == "garbage"
    assert parse_date(None) is None
    assert parse_date(b"2024-05-01T12:00:00+02:00").utcoffset() == timedelta(hours=2)
    for clone in (md.copy(), copy.copy(md), copy.deepcopy(md), pickle.loads(pickle.dumps(md))):
        assert type(clone) is Metadata
        assert clone == md
    deep = copy.deepcopy(md)
    deep.outputs.append(1)
    assert md.outputs == []


def test_shared_empty_dependencies_are_read_only_lists() -> None:
    """Replies that name no dependencies share one empty list: it behaves as ``[]`` and
    refuses changes (which would show in every result) with a message naming the fix."""
    md = Metadata(after=NO_DEPENDENCIES, follow=NO_DEPENDENCIES)
    assert md.after == [] and md["follow"] == [] and isinstance(md.after, list)
    assert not md.after and len(md.after) == 0 and md.after + ["x"] == ["x"]
    for change in (
        lambda deps: deps.append("x"),
        lambda deps: deps.extend(["x"]),
        lambda deps: deps.insert(0, "x"),
        lambda deps: deps.__setitem__(slice(0, 0), ["x"]),
        lambda deps: deps.__iadd__(["x"]),
    ):
        with pytest.raises(TypeError, match="assign a new list"):
            change(md.after)
    assert NO_DEPENDENCIES == []
    md.after = ["m1"]  # assigning a new list is how dependencies are recorded
    assert md.after == ["m1"] and NO_DEPENDENCIES == []
    # copies are ordinary lists that can be changed
    for clone in (copy.copy(NO_DEPENDENCIES), copy.deepcopy(NO_DEPENDENCIES)):
        assert type(clone) is list and clone == []
    assert type(pickle.loads(pickle.dumps(NO_DEPENDENCIES))) is list
    deep = copy.deepcopy(Metadata(follow=NO_DEPENDENCIES))
    deep.follow.append("m2")
    assert deep.follow == ["m2"] and NO_DEPENDENCIES == []


# -- AsyncResult: results and waiting ---------------------------------------------------------


def test_single_result(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f], fname="f", targets=0)
    assert isinstance(ar, concurrent.futures.Future)
    assert repr(ar) == "<AsyncResult(f): pending>"
    assert not ar.ready() and not ar.done()
    assert ar.msg_ids == [f.msg_id]
    assert len(ar) == 1
    later(lambda: client.reply(f, 42, engine=0))
    assert ar.get(5) == 42
    assert ar.result() == 42 and ar.r == 42
    assert ar.ready() and ar.successful()
    assert repr(ar) == "<AsyncResult(f): finished>"
    assert ar.get_dict() == {0: 42}


def test_single_result_rules(client: FakeClient) -> None:
    futs = client.send(4)
    assert AsyncResult(client, [futs[0]])._single_result  # one child, targets None
    assert AsyncResult(client, [futs[1]], targets=3)._single_result
    assert not AsyncResult(client, [futs[2]], targets=[3])._single_result
    assert not AsyncResult(client, [futs[3]], targets=range(1))._single_result
    assert not AsyncResult(client, futs[:2])._single_result
    explicit = AsyncResult(client, [futs[0]], targets=[0], single_result=True)
    client.reply(futs[0], "x")
    assert explicit.get() == "x"
    assert AsyncResult(client, [futs[0]], targets=[0]).get() == ["x"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"fname": "f", "targets": 0},
        {"targets": [0]},
        {"targets": range(1), "return_exceptions": True},
        {"targets": 0, "single_result": False, "owner": True},
    ],
)
def test_one_message_shortcut_matches_the_general_path(
    client: FakeClient, kwargs: dict[str, Any]
) -> None:
    """An AsyncResult over a list of one MessageFuture (what every ``apply_async`` makes) is
    built by a shortcut; it must end up as the general path makes it (children given as a
    tuple take that path), attribute for attribute, and resolve the same way."""
    fast_fut, general_fut = client.send(2)
    fast = AsyncResult(client, [fast_fut], **kwargs)
    general = AsyncResult(client, (general_fut,), **kwargs)
    fast_vars, general_vars = vars(fast), vars(general)
    assert fast_vars.keys() == general_vars.keys()
    for name, value in fast_vars.items():
        if name in ("_kids", "_msg_ids"):
            assert len(value) == 1 and type(value) is type(general_vars[name])
        else:
            assert value == general_vars[name], name
    assert fast._kids == [fast_fut] and fast.msg_ids == [fast_fut.msg_id]
    assert fast_fut._callbacks is not None and len(fast_fut._callbacks) == 1
    client.reply(fast_fut, 7, engine=0)
    client.reply(general_fut, 7, engine=0)
    assert fast.get(1) == general.get(1)
    assert vars(fast).keys() == vars(general).keys()
    assert (fast._order, fast._n_failed) == (general._order, general._n_failed)


def test_children_by_msg_id(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, [f.msg_id for f in futs], targets=[0, 1])
    for i, f in enumerate(futs):
        client.reply(f, i)
    assert ar.get(1) == [0, 1]
    with pytest.raises(KeyError):
        AsyncResult(client, ["no-such-msg"])


def test_get_timeout(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="Result not ready."):
        ar.get(0.1)
    assert 0.09 <= time.monotonic() - t0 < 2
    with pytest.raises(TimeoutError):
        ar.get(0)
    with pytest.raises(TimeoutError):
        ar.result(timeout=0.01)
    assert ar.wait(0.05) is False
    client.reply(futs[0], 1)
    assert ar.wait(0) is False
    later(lambda: client.reply(futs[1], 2))
    assert ar.get(-1) == [1, 2]  # -1 waits forever
    assert ar.wait(0) is True and ar.wait() is True


def test_get_waits_forever_by_default(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f])
    later(lambda: client.reply(f, "late"), delay=0.2)
    assert ar.get() == "late"


def test_successful_requires_ready(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1])
    with pytest.raises(RuntimeError, match="if not done"):
        ar.successful()
    client.reply(futs[0], 1)
    client.reply(futs[1], exc=remote(engine=1))
    assert ar.successful() is False


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_get_is_interruptible(client: FakeClient) -> None:
    """A signal handler (as Ctrl-C's) runs promptly while get() waits forever."""
    (f,) = client.send(1)
    ar = AsyncResult(client, [f])

    class Interrupted(Exception):
        pass

    with raised_by_alarm(Interrupted, after=0.2, within=2):
        ar.get()
    client.reply(f, 1)
    assert ar.get() == 1


# -- errors -----------------------------------------------------------------------------------


def test_single_error_is_raised_as_is(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f], targets=0)
    err = remote()
    client.reply(f, exc=err, engine=0)
    with pytest.raises(RemoteError) as info:
        ar.get()
    assert info.value is err
    assert str(info.value) == "[0:apply] ZeroDivisionError: division by zero"
    assert ar.exception() is err
    assert not ar.successful()
    assert repr(ar) == "<AsyncResult(unknown): failed>"  # as ipyparallel's


def test_single_task_aborted(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f])
    client.reply(f, exc=TaskAborted(f.msg_id), output=True)
    with pytest.raises(TaskAborted):
        ar.get()


def test_multi_errors_composite(client: FakeClient) -> None:
    futs = client.send(4, engines=[0, 1, 2, 3])
    ar = AsyncResult(client, futs, fname="work", targets=[0, 1, 2, 3])
    client.reply(futs[0], 0)
    client.reply(futs[1], exc=remote("ZeroDivisionError", 1))
    client.reply(futs[2], exc=remote("EngineError", 2))
    client.reply(futs[3], exc=TaskAborted("aborted"))
    with pytest.raises(CompositeError) as info:
        ar.get()
    c = info.value
    assert c.msg == "one or more exceptions raised in: work"
    assert [(e[0], e[3].get("engine_id")) for e in c.elist] == [
        ("ZeroDivisionError", 1),
        ("EngineError", 2),
        ("TaskAborted", 3),
    ]
    assert c.elist[2][3]["method"] == "apply"
    assert str(c).splitlines()[1:] == [
        "[1:apply]ZeroDivisionError: division by zero",
        "[2:apply]EngineError: boom",
        "[3:apply]TaskAborted: aborted",
    ]
    with pytest.raises(EngineError):
        c.raise_exception(1)
    # the same results with exceptions as values
    values = ar.get(return_exceptions=True)
    assert values[0] == 0
    assert isinstance(values[1], RemoteError) and isinstance(values[3], TaskAborted)
    # ipyparallel: even one failure among several results is a CompositeError
    futs2 = client.send(2)
    ar2 = AsyncResult(client, futs2, targets=[0, 1])
    client.reply(futs2[0], 1)
    client.reply(futs2[1], exc=remote(engine=1))
    with pytest.raises(CompositeError):
        ar2.get()


def test_return_exceptions(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2], return_exceptions=True)
    err = remote(engine=1)
    client.reply(futs[0], "a")
    client.reply(futs[1], exc=err)
    client.reply(futs[2], "c")
    assert ar.get() == ["a", err, "c"]
    assert list(ar) == ["a", err, "c"]
    assert ar[1] is err
    with pytest.raises(CompositeError):
        ar.get(return_exceptions=False)
    assert ar.successful()  # as ipyparallel: nothing was raised


def test_first_exception(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    later(lambda: client.reply(futs[1], exc=remote(engine=1)))
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as info:
        ar.get(5, return_when=FIRST_EXCEPTION)
    assert time.monotonic() - t0 < 4
    # as ipyparallel: the failure itself, not a CompositeError
    assert not isinstance(info.value, CompositeError)
    assert info.value.engine_info["engine_id"] == 1
    assert not ar.ready()
    with pytest.raises(TimeoutError):
        AsyncResult(client, client.send(1)).get(0.05, return_when=FIRST_EXCEPTION)
    # with return_exceptions failures are values: FIRST_EXCEPTION waits for everything
    with pytest.raises(TimeoutError):
        ar.get(0.05, return_exceptions=True, return_when=FIRST_EXCEPTION)
    client.reply(futs[0], 0)
    client.reply(futs[2], 2)
    values = ar.get(0, return_exceptions=True, return_when=FIRST_EXCEPTION)
    assert values[0] == 0 and isinstance(values[1], RemoteError) and values[2] == 2
    with pytest.warns(UserWarning):
        with pytest.raises(TimeoutError):
            AsyncResult(client, client.send(2)).get(0.01, return_when=FIRST_COMPLETED)


# -- metadata through the AsyncResult ---------------------------------------------------------


def test_metadata_dates_parsed(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f])
    # a client may store ISO strings (even bypassing Metadata.__setitem__, as C code could)
    dict.__setitem__(client.metadata[f.msg_id], "submitted", "2024-05-01T12:00:00.000000Z")
    dict.__setitem__(client.metadata[f.msg_id], "started", "2024-05-01T12:00:00.5+00:00")
    assert ar.submitted == T0
    client.reply(f, 1, engine=2, started=0.5, completed=2.0, received=2.5)
    md = ar.metadata
    assert isinstance(md, Metadata)
    for key in ("submitted", "started", "completed", "received"):
        assert isinstance(md[key], datetime), key
        assert md[key].tzinfo is not None
        assert ar[key] == md[key]
    assert md.received == T0 + timedelta(seconds=2.5)
    assert ar["engine_id"] == 2 and ar.engine_id == 2 and ar.engine_uuid == "uuid-2"
    assert ar.status == "ok"
    with pytest.raises(AttributeError):
        _ = ar.no_such_key
    with pytest.raises(KeyError):
        _ = ar["no_such_key"]


def test_metadata_list_and_engine_id_lookup(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1])
    # engine_id unknown in metadata: looked up from the uuid through the client
    client.metadata[futs[0].msg_id]["engine_uuid"] = "uuid-5"
    client.metadata[futs[1].msg_id]["engine_uuid"] = "uuid-6"
    assert ar.engine_id == [5, 6]
    mds = ar.metadata
    assert isinstance(mds, list) and len(mds) == 2
    assert all(isinstance(m["submitted"], datetime) for m in mds)
    assert ar.submitted == [T0, T0 + timedelta(seconds=1)]


def test_stdout_live_and_kept_after_client_drops_metadata(client: FakeClient) -> None:
    futs = client.send(2, engines=[0, 1])
    ar = AsyncResult(client, futs, targets=[0, 1])
    assert ar.stdout == ["", ""]
    client.metadata[futs[0].msg_id]["stdout"] += "hello\n"
    client.metadata[futs[1].msg_id]["stderr"] += "warn\n"
    assert ar.stdout == ["hello\n", ""]
    assert ar["stderr"] == ["", "warn\n"]
    for i, f in enumerate(futs):
        client.reply(f, i)
    # the client releases its caches once the AsyncResult owns the results
    for f in futs:
        client.metadata.pop(f.msg_id)
        client._futures.pop(f.msg_id)
    assert ar.stdout == ["hello\n", ""]
    assert ar.get() == [0, 1]
    assert ar.metadata[0]["stdout"] == "hello\n"


def test_index_results(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    with pytest.raises(TimeoutError):
        _ = ar[0]
    client.reply(futs[0], "a")
    client.reply(futs[2], "c")
    client.reply(futs[1], "b")
    assert ar[0] == "a" and ar[-1] == "c" and ar[1:] == ["b", "c"]
    with pytest.raises(TypeError):
        _ = ar[1.5]
    # as ipyparallel: with a failure anywhere, indexing raises the CompositeError
    failing = AsyncResult(client, client.send(3), targets=[0, 1, 2])
    kids = failing._children
    client.reply(kids[0], "a")
    client.reply(kids[1], exc=remote(engine=1))
    client.reply(kids[2], "c")
    for key in (0, 1, slice(2, None)):
        with pytest.raises(CompositeError) as info:
            _ = failing[key]
        assert [e[3]["engine_id"] for e in info.value.elist] == [1]
    (g,) = client.send(1)
    single = AsyncResult(client, [g])
    client.reply(g, [10, 20])
    assert single[1] == 20  # indexes into the single value, as ipyparallel


# -- timing -----------------------------------------------------------------------------------


def test_timing(client: FakeClient) -> None:
    futs = client.send(2)  # submitted T0 and T0+1s
    ar = AsyncResult(client, futs, targets=[0, 1])
    assert ar.elapsed > 0  # since T0, long ago
    with pytest.raises(TimeoutError):
        _ = ar.wall_time
    with pytest.raises(TimeoutError):
        _ = ar.serial_time
    client.reply(futs[0], 0, started=1.0, completed=3.0, received=3.5)
    client.reply(futs[1], 1, started=2.0, completed=2.5, received=4.0)
    assert ar.wall_time == pytest.approx(4.0)  # last received - first submitted
    assert ar.elapsed == ar.wall_time
    assert ar.serial_time == pytest.approx(2.5)
    assert ar.timedelta(ar.submitted, ar.received) == pytest.approx(4.0)
    assert ar.timedelta(T0, "2024-05-01T12:00:10Z") == pytest.approx(10.0)
    assert ar.timedelta(ar.started, ar.completed, start_key=max, end_key=min) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ar.timedelta([None], T0)


def test_elapsed_uses_earliest_submission(client: FakeClient) -> None:
    futs = client.send(2)
    now = datetime.now(UTC)
    client.metadata[futs[0].msg_id]["submitted"] = now - timedelta(seconds=30)
    client.metadata[futs[1].msg_id]["submitted"] = now - timedelta(seconds=10)
    ar = AsyncResult(client, futs, targets=[0, 1])
    assert 29 < ar.elapsed < 40


def test_wall_time_without_timestamps() -> None:
    f = MessageFuture("bare")
    f.set_result(1)
    ar = AsyncResult(object(), [f])  # a client without metadata at all
    assert ar.get() == 1
    assert ar.wall_time == 0.0 and ar.serial_time == 0.0 and ar.elapsed == 0.0
    assert ar.stdout == ""


# -- progress, iteration ----------------------------------------------------------------------


def test_progress_and_len(client: FakeClient) -> None:
    futs = client.send(5)
    ar = AsyncResult(client, futs, targets=list(range(5)))
    assert len(ar) == 5 and ar.progress == 0
    for k, i in enumerate([3, 0, 4]):
        client.reply(futs[i], i)
        assert ar.progress == k + 1
    assert not ar.ready()
    client.reply(futs[1], 1)
    client.reply(futs[2], 2)
    assert ar.progress == 5 and ar.ready()


def test_iteration_in_order_while_running(client: FakeClient) -> None:
    futs = client.send(4)
    ar = AsyncResult(client, futs, targets=[0, 1, 2, 3])
    seen: list[Any] = []
    two = threading.Event()

    def consume() -> None:
        for x in ar:
            seen.append(x)
            if len(seen) == 2:
                two.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    client.reply(futs[1], 1)  # out of order: nothing can be yielded yet
    time.sleep(0.05)
    assert seen == []
    client.reply(futs[0], 0)
    # waits for both (not the first and then a guessed 50 ms for the second to follow)
    assert two.wait(5)
    time.sleep(0.05)  # and nothing more comes while 2 and 3 still run
    assert seen == [0, 1]  # consumed while the rest is still running
    assert not ar.ready()
    client.reply(futs[3], 3)
    client.reply(futs[2], 2)
    t.join(5)
    assert seen == [0, 1, 2, 3]


def test_iteration_errors_and_single(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    client.reply(futs[0], 0)
    client.reply(futs[1], exc=remote(engine=1))
    client.reply(futs[2], 2)
    # as ipyparallel: a finished result with a failure raises the CompositeError at once
    with pytest.raises(CompositeError):
        next(iter(ar))
    # while running: the results before the failure, then the failure (as a CompositeError)
    running = AsyncResult(client, client.send(2), targets=[0, 1])
    client.reply(running._children[0], 0)
    it = iter(running)
    assert next(it) == 0
    client.reply(running._children[1], exc=remote(engine=1))
    with pytest.raises(CompositeError):
        next(it)
    (g,) = client.send(1)
    with pytest.raises(TypeError):
        iter(AsyncResult(client, [g], targets=0))


# -- abort, cancel ----------------------------------------------------------------------------


def test_abort(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    client.reply(futs[0], 0)
    assert ar.abort() is None  # as ipyparallel: waits for the engines, returns None
    assert client.aborted == [[futs[1].msg_id, futs[2].msg_id]]
    client.reply(futs[1], exc=TaskAborted("a"))
    client.reply(futs[2], exc=TaskAborted("a"))
    with pytest.raises(RuntimeError):
        ar.abort()
    assert ar.cancel() is False  # done: as concurrent.futures
    assert not ar.cancelled()
    with pytest.raises(CompositeError):
        ar.get()


def test_cancel_is_the_futures_cancel_and_aborts_what_is_left(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    client.reply(futs[0], 0)
    assert ar.cancel() is True
    assert ar.cancelled() and ar.done() and not ar.successful()
    assert ar.cancel() is True  # (again: still cancelled)
    assert client.aborted == [[futs[1].msg_id, futs[2].msg_id]]
    with pytest.raises(concurrent.futures.CancelledError):
        ar.get()
    # the replies that still come are dropped without an error
    client.reply(futs[1], exc=TaskAborted("a"))
    client.reply(futs[2], 2)
    assert ar.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        ar.result()


def test_successful_with_returned_exceptions(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1], return_exceptions=True)
    client.reply(futs[0], 0)
    client.reply(futs[1], exc=remote(engine=1))
    assert ar.successful()  # as ipyparallel: the result was set, nothing raised
    assert isinstance(ar.get()[1], RemoteError)
    futs = client.send(2)
    plain = AsyncResult(client, futs, targets=[0, 1])
    client.reply(futs[0], 0)
    client.reply(futs[1], exc=remote(engine=1))
    assert not plain.successful()


# -- get_dict ---------------------------------------------------------------------------------


def test_get_dict(client: FakeClient) -> None:
    futs = client.send(3, engines=[4, 2, 7])
    ar = AsyncResult(client, futs, targets=[4, 2, 7])
    for i, f in enumerate(futs):
        client.reply(f, i * 10)
    assert ar.get_dict() == {4: 0, 2: 10, 7: 20}
    assert ar.result_dict == {4: 0, 2: 10, 7: 20}
    futs2 = client.send(2, engines=[1, 1])
    ar2 = AsyncResult(client, futs2, targets=[1, 1])
    for f in futs2:
        client.reply(f, 0)
    with pytest.raises(ValueError, match="more than one"):
        ar2.get_dict()
    with pytest.raises(TimeoutError):
        AsyncResult(client, client.send(2), targets=[0, 1]).get_dict(0.01)


# -- concurrent.futures integration, callbacks ------------------------------------------------


def test_concurrent_futures_wait_and_as_completed(client: FakeClient) -> None:
    ars = [AsyncResult(client, client.send(1), fname=f"f{i}") for i in range(3)]
    done, pending = concurrent.futures.wait(ars, timeout=0.01)
    assert not done and len(pending) == 3
    order = [2, 0, 1]

    def finish() -> None:
        for i in order:
            client.reply(ars[i]._children[0], i)
            time.sleep(0.02)

    later(finish)
    got = [ar.result() for ar in concurrent.futures.as_completed(ars, timeout=5)]
    assert got == order
    done, pending = concurrent.futures.wait(ars, timeout=5, return_when=ALL_COMPLETED)
    assert len(done) == 3 and not pending


def test_callbacks_can_use_the_result(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1])
    seen: list[Any] = []
    threads: list[str] = []

    def cb(fut: AsyncResult) -> None:
        threads.append(threading.current_thread().name)
        seen.append((fut.ready(), fut.get(), fut.get(timeout=0), fut.successful(), fut.progress))
        fut.wait()
        fut.wait(return_when=ALL_COMPLETED)

    ar.add_done_callback(cb)

    def dispatch() -> None:
        client.reply(futs[0], "a")
        client.reply(futs[1], "b")

    t = threading.Thread(target=dispatch, name="dispatcher", daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "callback deadlocked the dispatcher"
    assert seen == [(True, ["a", "b"], ["a", "b"], True, 2)]
    assert threads == ["dispatcher"]
    # a callback added after completion runs at once
    late: list[Any] = []
    ar.add_done_callback(lambda f: late.append(f.get()))
    assert late == [["a", "b"]]


def test_callback_of_failed_result(client: FakeClient) -> None:
    (f,) = client.send(1)
    ar = AsyncResult(client, [f])
    seen: list[Any] = []
    ar.add_done_callback(lambda fut: seen.append(type(fut.exception())))
    t = later(lambda: client.reply(f, exc=remote()), delay=0)
    t.join(5)
    assert seen and issubclass(seen[0], RemoteError)


def test_many_children_resolved_from_several_threads(client: FakeClient) -> None:
    n = 400
    futs = client.send(n)
    ar = AsyncResult(client, futs, targets=list(range(n)))
    chunks = [futs[i::4] for i in range(4)]
    threads = [
        threading.Thread(target=lambda c=c: [client.reply(f, int(f.msg_id[4:])) for f in c])
        for c in chunks
    ]
    for t in threads:
        t.start()
    assert ar.get(10) == [int(f.msg_id[4:]) for f in futs]
    for t in threads:
        t.join()
    assert ar.progress == n


# -- wait with return_when, split, join -------------------------------------------------------


def test_wait_return_when_and_split(client: FakeClient) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, targets=[0, 1, 2])
    later(lambda: client.reply(futs[2], 2))
    done, pending = ar.wait(5, return_when=FIRST_COMPLETED)
    assert [d.msg_ids for d in done] == [[futs[2].msg_id]]
    assert len(pending) == 2
    assert all(isinstance(p, AsyncResult) for p in pending)
    client.reply(futs[0], exc=remote(engine=0))
    done, pending = ar.wait(5, return_when=FIRST_EXCEPTION)
    assert len(done) == 2 and len(pending) == 1
    done, pending = ar.wait(0.01, return_when=ALL_COMPLETED)
    assert len(pending) == 1
    with pytest.raises(ValueError):
        ar.wait(0, return_when="bogus")
    client.reply(futs[1], 1)
    pieces = ar.split()
    assert [p.get(return_exceptions=True) for p in pieces][1:] == [1, 2]
    with pytest.raises(RemoteError):
        pieces[0].get()
    # a single result with return_exceptions returns its exception
    assert isinstance(pieces[0].get(return_exceptions=True), RemoteError)
    (g,) = client.send(1)
    rex = AsyncResult(client, [g], return_exceptions=True)
    err = remote()
    client.reply(g, exc=err)
    assert rex.get() is err and rex.exception() is None
    joined = AsyncResult.join(pieces[1], pieces[2])
    assert joined.get() == [1, 2]
    with pytest.raises(ValueError):
        AsyncResult.join()


# -- output -----------------------------------------------------------------------------------


def test_wait_for_output(client: FakeClient) -> None:
    futs = client.send(2)
    ar = AsyncResult(client, futs, targets=[0, 1])
    client.reply(futs[0], 0)
    client.reply(futs[1], 1, output=False)
    assert ar.ready()
    assert not ar.wait_for_output(0.01)
    later(lambda: futs[1].output.set_result(None))
    assert ar.wait_for_output(5)
    assert ar.sent and ar.wait_for_send(0)


def _outputs_of_two_engines(client: FakeClient, more: bool = True) -> AsyncResult:
    """A finished result of engines 1 and 0: stdout on both (engine 0's also stderr when
    ``more``), a result on engine 1, a rich output on engine 0."""
    futs = client.send(2, engines=[1, 0])
    ar = AsyncResult(client, futs, targets=[1, 0])
    md1, md0 = (client.metadata[f.msg_id] for f in futs)
    md1["stdout"] = "one\n"
    if more:
        md0["stdout"] = "zero\nzero again\n"
        md0["stderr"] = "oops"
    md1["execute_result"] = {"data": {"text/plain": "41"}, "execution_count": 3}
    md0["outputs"].append({"data": {"text/plain": "<Figure>"}, "metadata": {}})
    for f in futs:
        client.reply(f, None)
    return ar


def test_display_outputs(client: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    """ipyparallel's forms outside IPython: labelled streams only (no displays, no results)."""
    ar = _outputs_of_two_engines(client)
    ar.display_outputs()
    cap = capsys.readouterr()
    assert cap.out == "[stdout:1] \none\n[stdout:0] \nzero\nzero again\n"
    assert cap.err == "[stderr:0] \noops"
    ar.display_outputs(groupby="engine")
    cap = capsys.readouterr()
    assert cap.out == "[stdout:1] \none\n[stdout:0] \nzero\nzero again\n"
    ar.display_outputs(result_only=True)
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError):
        ar.display_outputs(groupby="nope")


def test_display_outputs_in_ipython(client: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    """Inside IPython the rich outputs and results are shown too (``Out[1:3]: 41``)."""
    shell_mod = pytest.importorskip("IPython.core.interactiveshell")
    shell_mod.InteractiveShell.instance()  # display goes through this shell
    try:
        ar = _outputs_of_two_engines(client, more=False)
        ar.display_outputs()
        out = capsys.readouterr().out.splitlines()
        assert out == ["[stdout:1] ", "one", "[output:0]", "<Figure>", "Out[1:3]: 41"]
        ar.display_outputs(result_only=True)
        assert capsys.readouterr().out.splitlines() == ["Out[1:3]: 41"]
        # a single-engine result: no labels
        (f,) = client.send(1, engines=[2])
        one = AsyncResult(client, [f], targets=2)
        client.metadata[f.msg_id]["stdout"] = "alone\n"
        client.reply(f, None)
        one.display_outputs()
        assert capsys.readouterr().out == "alone\n"
    finally:
        shell_mod.InteractiveShell.clear_instance()


def test_wait_interactive(client: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    futs = client.send(3)
    ar = AsyncResult(client, futs, fname="job", targets=[0, 1, 2])

    def finish() -> None:
        for i, f in enumerate(futs):
            client.reply(f, i)
            time.sleep(0.03)

    later(finish)
    t0 = time.monotonic()
    ar.wait_interactive(interval=0.01, widget=False)
    assert ar.ready() and time.monotonic() - t0 < 5
    assert "3/3" in capsys.readouterr().out  # as ipyparallel: the text bar goes to stdout
    # timeout: returns without raising
    pending = AsyncResult(client, client.send(2), targets=[0, 1])
    t0 = time.monotonic()
    pending.wait_interactive(interval=0.01, timeout=0.1)
    assert not pending.ready() and time.monotonic() - t0 < 3
    # FIRST_EXCEPTION stops at the first failure
    client.reply(pending._children[0], exc=remote())
    pending.wait_interactive(interval=0.01, return_when=FIRST_EXCEPTION)
    assert not pending.ready()


def test_wait_interactive_without_tqdm(
    client: FakeClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("tqdm", "tqdm.auto", "tqdm.notebook"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    futs = client.send(2)
    ar = AsyncResult(client, futs, fname="job", targets=[0, 1])
    later(lambda: [client.reply(f, 0) for f in futs])
    ar.wait_interactive(interval=0.01)
    out = capsys.readouterr().out
    assert "2/2 tasks finished" in out


# -- AsyncMapResult ---------------------------------------------------------------------------


def test_map_result_get_and_ordered_iteration(client: FakeClient) -> None:
    futs = client.send(3)
    amr = AsyncMapResult(client, futs, Map(), fname="sq")
    assert isinstance(amr, AsyncResult)
    assert repr(amr) == "<AsyncMapResult(sq): pending>"
    seen: list[int] = []
    got_two = threading.Event()

    def consume() -> None:
        for x in amr:
            seen.append(x)
            if len(seen) == 2:
                got_two.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    client.reply(futs[2], [5, 6])
    client.reply(futs[0], [0, 1])
    assert got_two.wait(5)  # results consumed while the map still runs
    assert seen == [0, 1] and not amr.ready()
    client.reply(futs[1], [2, 3, 4])
    t.join(5)
    assert seen == [0, 1, 2, 3, 4, 5, 6]
    assert amr.get() == [0, 1, 2, 3, 4, 5, 6]
    assert len(amr) == 3 and amr.progress == 3
    with pytest.raises(ValueError):  # every child on no engine: duplicate None ids
        amr.get_dict()


def test_map_result_unordered_iteration(client: FakeClient) -> None:
    futs = client.send(3)
    amr = AsyncMapResult(client, futs, Map(), ordered=False)
    seen: list[int] = []
    two = threading.Event()

    def consume() -> None:
        for x in amr:
            seen.append(x)
            if len(seen) == 2:
                two.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    client.reply(futs[2], [4, 5])
    assert two.wait(5)  # both elements of that part, however slowly the consumer runs
    time.sleep(0.05)
    assert seen == [4, 5]
    client.reply(futs[0], [0, 1])
    client.reply(futs[1], [2, 3])
    t.join(5)
    assert seen == [4, 5, 0, 1, 2, 3]
    assert amr.get() == [0, 1, 2, 3, 4, 5]  # get() is always in order


def test_map_result_round_robin(client: FakeClient) -> None:
    seq = list(range(7))
    m = RoundRobinMap()
    futs = client.send(3)
    amr = AsyncMapResult(client, futs, m)
    for p, f in enumerate(futs):
        client.reply(f, m.getPartition(seq, p, 3))
    assert amr.get() == seq
    assert list(amr) == seq


def test_map_result_numpy_chunks(client: FakeClient) -> None:
    arr = np.arange(10.0)
    futs = client.send(3)
    amr = AsyncMapResult(client, futs, Map())
    for p, f in enumerate(futs):
        client.reply(f, Map().getPartition(arr, p, 3) * 2)
    out = amr.get()
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, arr * 2)
    assert list(amr) == list(arr * 2)


def test_map_result_errors(client: FakeClient) -> None:
    futs = client.send(3, engines=[0, 1, 2])
    amr = AsyncMapResult(client, futs, Map(), fname="f")
    client.reply(futs[0], [0, 1])
    client.reply(futs[1], exc=remote(engine=1))
    client.reply(futs[2], [4])
    with pytest.raises(CompositeError) as info:
        amr.get()
    assert len(info.value.elist) == 1
    it = iter(amr)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RemoteError):
        next(it)
    with pytest.raises(CompositeError):
        amr.get_dict()


def test_map_result_return_exceptions_and_chunk_sizes(client: FakeClient) -> None:
    futs = client.send(3)
    amr = AsyncMapResult(client, futs, Map(), return_exceptions=True, chunk_sizes=[2, 2, 1])
    assert len(amr) == 5 and amr.progress == 0
    client.reply(futs[0], [0, 1])
    assert amr.progress == 2
    err = remote(engine=1)
    client.reply(futs[1], exc=err)
    client.reply(futs[2], [4])
    assert amr.progress == 5
    assert amr.get() == [0, 1, err, err, 4]
    assert list(amr) == [0, 1, err, err, 4]
    with pytest.raises(ValueError):
        AsyncMapResult(client, client.send(2), Map(), chunk_sizes=[1])


def test_map_result_empty_and_scalar_chunks(client: FakeClient) -> None:
    empty = AsyncMapResult(client, [], Map())
    assert empty.ready() and empty.get() == [] and list(empty) == [] and empty.progress == 0
    futs = client.send(2)
    gathered = AsyncMapResult(client, futs, Map(), fname="gather")
    client.reply(futs[0], 3)
    client.reply(futs[1], 4)
    assert gathered.get() == [3, 4]
    assert list(gathered) == [3, 4]


def test_map_result_concurrent_futures(client: FakeClient) -> None:
    futs = client.send(2)
    amr = AsyncMapResult(client, futs, Map())
    later(lambda: [client.reply(f, [i]) for i, f in enumerate(futs)])
    (done,) = list(concurrent.futures.as_completed([amr], timeout=5))
    assert done.result() == [0, 1]


def _settle_as(client: FakeClient, fut: concurrent.futures.Future, i: int) -> None:
    """Settle child ``i`` (every 7th fails)."""
    if isinstance(fut, MessageFuture):
        if i % 7 == 3:
            client.reply(fut, exc=remote(engine=0))
        else:
            client.reply(fut, [i] * (i % 3 + 1))
    elif i % 7 == 3:
        fut.set_exception(remote(engine=0))
    else:
        fut.set_result([i] * (i % 3 + 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_result_adopts_settled_and_pending_children_as_callbacks_do(
    client: FakeClient, seed: int
) -> None:
    """A map's result counts its children that finished before it was made in blocks, and
    adds callbacks to the others (the client's MessageFutures, which hold their Metadata);
    it must see the same as with one callback per child (what it does for other futures,
    and for MessageFutures without their Metadata): the same completion order, progress,
    failures, and results, ordered or not, over several blocks and a foreign future."""
    import random

    rng = random.Random(seed)
    n = 1300  # several blocks of _adopt
    sizes = [i % 3 + 1 for i in range(n)]
    early = set(rng.sample(range(n), n // 2)) | {0, 511, 512, 1299}
    late = [i for i in range(n) if i not in early]
    rng.shuffle(late)
    foreign = {700, 701, 1024}  # plain futures among them, one finished before

    def children(with_md: bool) -> list[concurrent.futures.Future]:
        futs: list[concurrent.futures.Future] = list(client.send(n, with_md=with_md))
        for i in foreign:
            futs[i] = concurrent.futures.Future()
        return futs

    fast_kids, ref_kids = children(True), children(False)
    assert all(f.md is not None for i, f in enumerate(fast_kids) if i not in foreign)
    for i in sorted(early, key=lambda _: rng.random()):
        _settle_as(client, fast_kids[i], i)
        _settle_as(client, ref_kids[i], i)
    results = []
    for kids in (fast_kids, ref_kids):
        results.append(
            [
                AsyncMapResult(client, kids, Map(), return_exceptions=rex, chunk_sizes=sizes)
                for rex in (False, True)
            ]
        )
    fast, ref = results[0][0], results[1][0]
    unordered = [
        AsyncMapResult(client, kids, Map(), ordered=False, return_exceptions=True)
        for kids in (fast_kids, ref_kids)
    ]

    def same() -> None:
        assert fast._order == ref._order
        assert fast.progress == ref.progress
        assert fast._n_failed == ref._n_failed
        assert fast.done() == ref.done()
        assert unordered[0]._order == unordered[1]._order

    same()
    assert fast.progress == sum(sizes[i] for i in early) and not fast.done()
    for k, i in enumerate(late):
        _settle_as(client, fast_kids[i], i)
        _settle_as(client, ref_kids[i], i)
        if k % 97 == 0:
            same()
    same()
    assert fast.done() and fast.progress == len(fast) == sum(sizes)
    assert fast._order == [*sorted(early), *late]
    for a, b in zip(results[0], results[1], strict=True):
        assert type(a.exception()) is type(b.exception())
        if a._return_exceptions:
            assert [str(x) for x in a.get(0)] == [str(x) for x in b.get(0)]
            assert [str(x) for x in a] == [str(x) for x in b]
    assert [str(x) for x in unordered[0]] == [str(x) for x in unordered[1]]


def test_map_result_adoption_races_with_replies(client: FakeClient) -> None:
    """Children finishing on another thread while the map's result adopts them are each
    counted once, and the result resolves once (no "resolved twice"), whichever side counts
    the last one."""
    for round_ in range(20):
        n = 1200
        futs = client.send(n, with_md=True)
        go = threading.Event()

        def replies(futs: list[MessageFuture] = futs, go: threading.Event = go) -> None:
            go.wait(5)
            for i, f in enumerate(futs):
                if not f.done():
                    client.reply(f, [i])

        t = threading.Thread(target=replies, daemon=True)
        t.start()
        for i in range(0, n, 5):  # a few finished before
            if i < round_ * 50:
                futs[i].set_result([i])
        go.set()
        amr = AsyncMapResult(client, futs, Map(), chunk_sizes=[1] * n)
        t.join(10)
        assert amr.get(10) == list(range(n))
        assert sorted(amr._order) == list(range(n)) and amr.progress == n


# -- AsyncHubResult ---------------------------------------------------------------------------


def test_hub_result_with_resolved_futures(client: FakeClient) -> None:
    futs = client.send(2, engines=[0, 1])
    for i, f in enumerate(futs):
        client.reply(f, i)
    hr = AsyncHubResult(client, futs, fname="get_result", targets=[0, 1])
    assert isinstance(hr, AsyncResult)
    assert hr.ready() and hr.get(0) == [0, 1]
    assert hr.get_dict() == {0: 0, 1: 1}
    assert repr(hr) == "<AsyncHubResult(get_result): finished>"
    single = AsyncHubResult(client, [futs[0].msg_id])
    assert single.get() == 0


class _FakeClient:
    """Just what ``client.dispatch`` touches."""

    def __init__(self) -> None:
        import collections
        import threading

        from ferroparallel.client.metadata import Metadata

        self._session_id = "s"
        self._futures: dict[str, Any] = {}
        self.metadata: dict[str, Any] = collections.defaultdict(Metadata)
        self._uuids: dict[str, int] = {"e": 0}
        self.results: dict[str, Any] = {}
        self.outstanding: set[str] = set()
        self._outstanding_by_engine: dict[str, set[str]] = {}
        self._lock = threading.RLock()
        self._owned: set[str] = set()
        # the dispatcher reads the Client's traits from here (traitlets' value store)
        self._trait_values = {
            "metadata": self.metadata,
            "results": self.results,
            "outstanding": self.outstanding,
        }

    def _maybe_release(self, msg_id: str) -> None:
        pass


def _reply(msg_id: str, md: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_header": {"msg_id": msg_id, "date": "2026-01-01T00:00:00Z"},
        "header": {"msg_type": "execute_reply", "date": "2026-01-01T00:00:01Z"},
        "content": {"status": "ok", "execution_count": 1},
        "metadata": {"engine": "e", "status": "ok", **md},
        "idents": [],
    }


def _iopub(msg_id: str, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_header": {"msg_id": msg_id, "session": "s"},
        "msg_type": msg_type,
        "content": content,
        "metadata": {"engine": "e"},
    }


def _run(client: _FakeClient, items: list[tuple[str, dict[str, Any]]]) -> None:
    from ferroparallel.client import dispatch

    for sock, msg in items:
        with client._lock:
            if sock == "iopub":
                item = dispatch.handle_iopub(client, msg)
            else:
                item = dispatch.handle_reply(client, msg, sock)
        if item is not None:
            dispatch.settle(client, [item])


def test_output_completes_by_count_in_any_order() -> None:
    """A ferroparallel engine's reply counts its outputs: output is complete when that many
    arrived, whether they come before or after the reply, with no status message at all."""
    stream = _iopub("a", "stream", {"name": "stdout", "text": "x\n"})
    for order in (["reply", "out", "out"], ["out", "reply", "out"], ["out", "out", "reply"]):
        client = _FakeClient()
        fut = MessageFuture("a")
        client._futures["a"] = fut
        msgs = [
            ("mux", _reply("a", {"fp_outputs": 2})) if o == "reply" else ("iopub", stream)
            for o in order
        ]
        _run(client, msgs[:-1])
        assert not fut.output.done(), order
        _run(client, msgs[-1:])
        assert fut.done() and fut.output.done(), order
        assert client.metadata["a"]["stdout"] == "x\nx\n"


def test_output_of_engines_without_a_count_completes_on_idle() -> None:
    """ipyparallel engines send no count: the idle status completes the output, even when it
    arrives before the reply (which then must still set the result)."""
    client = _FakeClient()
    fut = MessageFuture("b")
    client._futures["b"] = fut
    _run(client, [("iopub", _iopub("b", "stream", {"name": "stdout", "text": "y"}))])
    _run(client, [("iopub", _iopub("b", "status", {"execution_state": "idle"}))])
    assert fut.output.done() and not fut.done()
    _run(client, [("mux", _reply("b", {}))])
    assert fut.done() and fut.result().execution_count == 1
    assert client.metadata["b"]["stdout"] == "y"


def test_one_message_resolves_as_the_general_path_does(client: FakeClient) -> None:
    """A plain AsyncResult over one message settles in one callback (the task loop's shortcut);
    a subclass takes the general per-child path. Both give the same outcome for every
    combination of value or error, single or list target, and ``return_exceptions``."""

    class General(AsyncResult):
        pass

    def outcome(ar: AsyncResult) -> tuple[str, Any]:
        try:
            return "value", ar.get(timeout=5)
        except CompositeError as e:
            return "composite", str(e)
        except Exception as e:  # noqa: BLE001
            return "raised", e

    err = remote(engine=0)
    for value, exc in ((7, None), (None, err), (None, TaskAborted("m"))):
        for targets in (0, [0], None):
            for return_exceptions in (False, True):
                results = []
                for cls in (AsyncResult, General):
                    (f,) = client.send(1)
                    ar = cls(client, [f], targets=targets, return_exceptions=return_exceptions)
                    assert (cls is AsyncResult) == (type(ar) is AsyncResult)
                    client.reply(f, value, exc=exc, engine=0)
                    exc_out = ar.exception()
                    shown = exc_out if not isinstance(exc_out, CompositeError) else str(exc_out)
                    results.append((outcome(ar), ar.successful(), shown))
                assert results[0] == results[1], (value, exc, targets, return_exceptions)
    # a message finished before its AsyncResult exists resolves it at once, the same way
    (f,) = client.send(1)
    client.reply(f, exc=err, engine=0)
    ar = AsyncResult(client, [f])
    assert ar.done() and ar.exception() is err


def test_execute_reply_shows_its_result_as_ipyparallel() -> None:
    from ferroparallel.client.dispatch import ExecuteReply

    md = Metadata(engine_id=1)
    md["execute_result"] = {
        "data": {"text/plain": "<b>", "text/html": "<b>hi</b>"},
        "metadata": {"text/html": {"isolated": True}},
        "execution_count": 4,
        "source": "execute",
    }
    reply = ExecuteReply("m", {"execution_count": 4}, md)
    assert reply.source == "execute"
    assert reply._repr_html_() == ("<b>hi</b>", {"isolated": True})
    assert reply._repr_png_() is None
    data, _ = reply._repr_mimebundle_()
    assert data["text/plain"] == "Out[1:4]: <b>"
    empty = ExecuteReply("n", {}, Metadata())
    assert empty.source is None and empty.data == {}


def test_outcome_of_settled_futures_without_their_locks() -> None:
    """``_outcome`` reads a finished future's value or exception directly;
    cancelled futures take the general path (every kind of future)."""
    from ferroparallel.client.asyncresult import _outcome
    from ferroparallel.client.futures import SlimFuture

    kinds = (lambda: MessageFuture("m", {}), SlimFuture, concurrent.futures.Future)
    for make in kinds:
        ok, bad = make(), make()
        ok.set_result([1, 2])
        err = ValueError("x")
        bad.set_exception(err)
        assert _outcome(ok) == ([1, 2], False)
        assert _outcome(bad) == (err, True)
    for make in kinds[1:]:  # (a sent message cannot be cancelled)
        cancelled = make()
        assert cancelled.cancel()
        value, failed = _outcome(cancelled)
        assert failed and isinstance(value, concurrent.futures.CancelledError)


def test_parse_date_forms() -> None:
    """Received ISO strings take a fast path; every other form is parsed as before."""

    class Text(str):
        pass

    z = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert parse_date("2024-05-01T12:00:00.123456Z") == z
    assert parse_date("2024-05-01T12:00:00.123456") == z  # no offset: UTC
    assert parse_date(" 2024-05-01T12:00:00.123456Z\n") == z  # blanks around it
    assert parse_date(Text("2024-05-01T12:00:00.123456Z")) == z
    assert parse_date("2024-05-01T14:00:00+02:00").utcoffset() == timedelta(hours=2)
    assert parse_date(datetime(2024, 5, 1, 12)).tzinfo is UTC
    for unchanged in ("garbage", "", 12, None):
        assert parse_date(unchanged) is unchanged


def test_settled_after_callbacks_or_at_once_without_them() -> None:
    """``settled()`` turns True once the callbacks the future had when it finished have run
    (at once when it had none), for results and exceptions."""
    from ferroparallel.client.futures import SlimFuture

    seen: list[tuple[bool, bool]] = []
    for settle in ("set_result", "set_exception"):
        plain = MessageFuture("a")
        getattr(plain, settle)(ValueError("x") if settle == "set_exception" else 1)
        assert plain.done() and plain.settled() and plain.wait_settled(0)
        with pytest.raises(concurrent.futures.InvalidStateError):
            plain.set_result(2)
        watched = SlimFuture()
        watched.add_done_callback(lambda f: seen.append((f.done(), f.settled())))
        assert not watched.settled()
        getattr(watched, settle)(ValueError("x") if settle == "set_exception" else 1)
        assert watched.settled()
    assert seen == [(True, False), (True, False)]
