"""Arrays that change while a message carrying them is being sent.

Large buffers leave from the sender's own memory, after the call that sends them has returned,
and their signed digest (``buffers_mac``) is taken when the call is made. A sender that
changes an array before it has left used to make its receiver drop the message as altered, and
the call never finished. Now: the engine sends nothing from memory its next request could
change (it waits for its last reply to leave), a client on the engines' host sends copies in
its non-blocking calls, and a receiver that still gets buffers that do not match their
digest runs nothing of them and answers with a ``BufferMismatch`` error.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import ferroparallel as ipp
from ferroparallel.client import Client

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(180)

WAIT = 30.0


@pytest.fixture
def socket_rc(rc: Client, shared_cluster: ipp.Cluster) -> Iterator[Client]:
    """A second client of the shared cluster that sends everything over the sockets (as to
    engines on another host)."""
    other = Client(shared_cluster.client_file, shm=False, timeout=WAIT)
    try:
        other.wait_for_engines(2, timeout=WAIT)
        yield other
    finally:
        other.close()


def _outcome(ar: ipp.AsyncResult, expected: float) -> str:
    try:
        value = ar.get(timeout=WAIT)  # never a hang (TimeoutError fails the test)
    except ipp.RemoteError as e:
        assert e.ename == "BufferMismatch", e
        assert "was not run" in str(e.evalue) and "wait_for_send" in str(e.evalue)
        return "refused"
    assert value == expected  # what was sent is what the call was given, never a mix
    return "ok"


def test_non_blocking_sends_on_the_engines_host_are_snapshots(rc: Client) -> None:
    """Above the copy-free size and below the shared-memory threshold: copied at the call."""
    v = rc[0]
    for _ in range(5):
        a = np.zeros(100_000)  # 800 KB
        ar = v.apply_async(lambda x: float(x.sum()), a)
        pushed = v.push({"snap": a}, block=False)
        a += 1
        assert ar.get(timeout=WAIT) == 0.0
        pushed.get(timeout=WAIT)
        assert v.apply_sync(ipp.interactive(lambda: float(snap.sum()))) == 0.0  # noqa: F821


def test_an_array_changed_while_sent_is_an_error_not_a_hang(socket_rc: Client) -> None:
    v = socket_rc[0]
    seen = set()
    for _ in range(5):
        a = np.zeros(1_000_000)  # 8 MB, sent from the array's memory
        ar = v.apply_async(lambda x: float(x.sum()), a)
        a += 1
        seen.add(_outcome(ar, 0.0))
    assert seen <= {"ok", "refused"}
    assert not socket_rc.outstanding
    assert v.apply_sync(lambda: "still serving") == "still serving"


def test_a_result_is_sent_before_the_next_request_changes_it(socket_rc: Client) -> None:
    v = socket_rc[0]
    v.execute("import numpy as np; g = np.zeros(2_000_000)", block=True)  # 16 MB
    for i in range(5):
        pulled = v.pull("g", block=False)
        v.execute("g += 1")
        got = pulled.get(timeout=WAIT)
        assert np.all(got == i), "the pulled array was changed while it was being sent"
    v.execute("del g", block=True)


def test_track_says_when_an_array_may_change(socket_rc: Client) -> None:
    """ipyparallel's recipe: ``track=True``, then ``wait_for_send()`` before changing the
    array. ``sent`` is only true once the buffers sent from the array's memory have left."""
    v = socket_rc[0]
    for view, name in ((v, "one"), (socket_rc[:], "all")):
        b = np.zeros(20_000_000)  # 160 MB
        ar = view.push({name: b}, block=False, track=True)
        assert ar.wait_for_send(WAIT) and ar.sent
        b += 1  # sent: the engines have the zeros, and nothing is refused
        ar.get(timeout=WAIT)
        sums = view.apply_sync(ipp.interactive(lambda n=name: float(globals()[n].sum())))
        assert sums == (0.0 if view is v else [0.0, 0.0])
        view.execute(f"del {name}", block=True)
    lv = socket_rc.load_balanced_view()
    a = np.ones(2_000_000)
    with lv.temp_flags(track=True):
        ar = lv.apply_async(lambda x: float(x.sum()), a)
    assert ar.wait_for_send(WAIT)
    a[:] = 0
    assert ar.get(timeout=WAIT) == 2_000_000.0
    small = v.push({"s": np.zeros(10)}, block=False, track=True)
    assert small.sent  # copied at the call: nothing to wait for
    small.get(timeout=WAIT)
