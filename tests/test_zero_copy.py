"""No copy on any data path (issue 7 items 1 and 2), on a real cluster.

Socket path (a client with ``shm=False``): the client hands the I/O thread the user's own
memory, and every received array (pushed/scattered/applied on the engine; pulled, gathered or
returned on the client) lies inside the received ``_core.Frame``. Shared-memory path: arrays
are over the mapping. Fan-out: a push to many engines leaves the client as ONE message (one
segment with shared memory), with the same client memory as a push to one engine.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import ferroparallel as ipp
from array_strategies import arrays, assert_same, nested
from ferroparallel import Reference
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster
from ferroparallel.engine.execute import run_apply
from ferroparallel.engine.signals import InterruptGate
from ferroparallel.serialize import pack_apply_message, shm
from transfer_util import (
    assert_over_frame,
    data_address,
    frame_check,
    need_lending,
    owner_kind,
    segments_of,
    status_kib,
)

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
SHORT = 30.0


class RecordingIo:
    """Wraps a client's I/O thread and records the buffers of every ``send``."""

    def __init__(self, io: Any) -> None:
        self._io = io
        self.sent: list[list[Any]] = []

    def send(self, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(list(kwargs.get("buffers") or []))
        return self._io.send(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._io, name)


@pytest.fixture
def sock_rc(rc: Client, shared_cluster: Cluster) -> Iterator[Client]:
    """A client of the shared cluster that never uses shared memory nor the direct data path
    (everything through the controller), its sends recorded."""
    client = ipp.Client(shared_cluster.client_file, shm=False, direct_data=False)
    client.wait_for_engines(2, timeout=SHORT)
    client._io = RecordingIo(client._io)
    try:
        yield client
    finally:
        client.close()


def sent_addresses(client: Client) -> set[int]:
    out = set()
    for bufs in client._io.sent:
        for b in bufs:
            if memoryview(b).nbytes >= 64 * 1024:
                out.add(data_address(np.frombuffer(b, np.uint8)))
    return out


def test_push_and_apply_arguments_are_not_copied(sock_rc: Client) -> None:
    a = np.arange(MIB, dtype=np.float64).reshape(1024, 1024)
    f = np.asfortranarray(a[:512])
    dv = sock_rc[:]
    dv.push({"a": a, "f": f}, block=True)
    assert {data_address(a), data_address(f)} <= sent_addresses(sock_rc)  # the user's memory
    assert dv.apply_sync(frame_check, Reference("a")) == [("frame", True, True)] * 2
    assert dv.apply_sync(frame_check, Reference("f")) == [("frame", True, True)] * 2
    sock_rc._io.sent.clear()
    assert dv.apply_sync(frame_check, a) == [("frame", True, True)] * 2
    assert data_address(a) in sent_addresses(sock_rc)


def test_pull_and_results_are_not_copied(sock_rc: Client) -> None:
    a = np.arange(MIB, dtype=np.float64)
    sock_rc[:].push({"a": a}, block=True)
    pulled = sock_rc[0].pull("a", block=True)
    assert_over_frame(pulled)
    assert np.array_equal(pulled, a)
    result = sock_rc[1].apply_sync(lambda x: x * 2, Reference("a"))
    assert_over_frame(result)
    for part in sock_rc[:].pull("a", block=True):
        assert_over_frame(part)


def test_scatter_sends_views_and_gather_joins_received_frames(sock_rc: Client) -> None:
    a = np.arange(2 * MIB, dtype=np.int64).reshape(-1, 16)
    dv = sock_rc[:]
    dv.scatter("part", a, block=True)
    halves = [a[: len(a) // 2], a[len(a) // 2 :]]
    assert {data_address(h) for h in halves} <= sent_addresses(sock_rc)  # views of a
    assert dv.apply_sync(frame_check, Reference("part")) == [("frame", True, True)] * 2
    parts = dv.pull("part", block=True)
    for p in parts:
        assert_over_frame(p)
    gathered = dv.gather("part", block=True)
    assert np.array_equal(gathered, a)  # parts joined: the one copy a gather needs


def test_engine_sends_its_result_without_copy() -> None:
    result = np.ones(MIB)
    outcome = run_apply(pack_apply_message(lambda: result), {}, InterruptGate())
    assert outcome.error is None
    assert data_address(np.frombuffer(outcome.buffers[1], np.uint8)) == data_address(result)


def test_shm_path_arrays_are_over_the_mapping(rc: Client) -> None:
    a = np.arange(MIB, dtype=np.float64)
    # non-blocking calls: blocking ones lend their arguments (test_peer_read.py)
    assert rc[:].apply_async(frame_check, a).get(timeout=30) == [("shm", True, True)] * 2
    rc[:].push({"a": a}, block=False).get(timeout=30)
    assert rc[:].apply_sync(frame_check, Reference("a")) == [("shm", True, True)] * 2


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(obj=nested(arrays(max_side=6)))
def test_property_roundtrip_through_the_cluster(rc: Client, obj: Any) -> None:
    # Through shared memory for every out-of-band buffer...
    rc._shm.threshold, saved = 0, rc._shm.threshold
    try:
        rc[0].push({"x": obj}, block=True)
    finally:
        rc._shm.threshold = saved
    # ...and back over the socket.
    assert_same(obj, rc[0].pull("x", block=True))
    assert_same(obj, rc[1].apply_sync(lambda x: x, obj))


def client_rss_growth(rc: Client, targets: list[int], a: np.ndarray) -> tuple[int, int, int]:
    """(messages sent, segments written, peak RSS growth in bytes) of one push."""
    sent = rc._io.stats()["sent"]
    commits = []
    real = shm.SegmentWriter.commit

    def counting(self: shm.SegmentWriter) -> shm.Segment:
        commits.append(self.nbytes)
        return real(self)

    shm.SegmentWriter.commit = counting  # type: ignore[method-assign]
    try:
        rss = status_kib("VmRSS")
        rc[targets].push({"a": a}, block=True)
        grown = (status_kib("VmRSS") - rss) * 1024
    finally:
        shm.SegmentWriter.commit = real  # type: ignore[method-assign]
    return rc._io.stats()["sent"] - sent, len(commits), grown


@pytest.mark.parametrize("path", ["socket", "shm", "lent"])
def test_fan_out_to_16_engines_costs_the_client_what_1_engine_does(
    new_cluster: Callable[..., tuple[Cluster, Client]], path: str
) -> None:
    if path == "lent":
        need_lending()
    use_shm = path == "shm"
    cluster, rc = new_cluster(n=16, shm=path != "socket", peer_read=path == "lent")
    a = np.ones(64 * MIB, dtype=np.uint8)
    rc[:].push({"warm": np.ones(2 * MIB, dtype=np.uint8)}, block=True)  # engines probed
    one = client_rss_growth(rc, [0], a)
    many = client_rss_growth(rc, rc.ids, a)
    assert one[0] == many[0] == 1  # one message leaves the client, whatever the fan-out
    assert one[1] == many[1] == (1 if use_shm else 0)
    assert many[2] <= max(1.2 * one[2], 0) + 0.1 * a.nbytes  # no per-engine copy
    kinds = rc[:].apply_sync(owner_kind, Reference("a"))
    assert kinds == [{"socket": "frame", "shm": "shm", "lent": "ndarray"}[path]] * 16
    assert segments_of() == []


def test_a_received_buffer_can_be_sent_on(sock_rc: Client) -> None:
    """A raw PickleBuffer arrives as the received frame itself; that frame can be sent back
    (as a memoryview), instead of failing to pickle."""
    data = bytes(range(256)) * 1024  # 256 KiB: out of band
    v = sock_rc[0]
    v.push({"raw": pickle.PickleBuffer(bytearray(data))}, block=True)
    back = v.pull("raw", block=True)
    assert bytes(back) == data
    assert v.apply_sync(lambda b: bytes(b) == data, Reference("raw")) is True
