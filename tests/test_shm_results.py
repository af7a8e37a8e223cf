"""Large apply results (pull, gather, apply) through shared memory for a client on the engines'
host: the engine writes the result's big buffers once into a segment, the client maps it
read-only and unlinks the name; nothing is left in /dev/shm."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

import ferroparallel as ipp
from ferroparallel.client import Client, DirectView
from ferroparallel.cluster import Cluster
from ferroparallel.engine.results_shm import GRACE, ResultSegments
from ferroparallel.serialize import serialize_object, shm
from ferroparallel.wire_names import SHM_HOST_KEY
from transfer_util import assert_over_frame, assert_over_shm, owner_kind

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def _engine_segments(rc: Client) -> list[list[str]]:
    return rc[:].apply_sync(lambda: __import__("ferroparallel").serialize.shm.our_segments())


@pytest.fixture
def no_lending(rc: Client) -> Iterator[None]:
    """Blocking calls of the shared client use segments (lending: test_peer_read.py)."""
    saved, rc._shm.peer_read = rc._shm.peer_read, False
    try:
        yield
    finally:
        rc._shm.peer_read = saved


@pytest.mark.usefixtures("no_lending")
def test_pull_and_apply_results_come_through_shm(rc: Client, dv: DirectView) -> None:
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    dv.push({"big": a}, block=True)
    for got in dv.pull("big", block=True):
        assert_over_shm(got)
        assert np.array_equal(got, a)
    doubled = dv.apply_sync(lambda x: x * 2, a)
    for got in doubled:
        assert_over_shm(got)
        assert np.array_equal(got, a * 2)
    small = rc[0].apply_sync(lambda: np.arange(10))
    assert owner_kind(small) != "shm"  # below the threshold: in the pickle or a frame
    # the client unlinked every result segment as it mapped it
    deadline = time.monotonic() + 5
    while any(_engine_segments(rc)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_segments(rc) == [[], []]


@pytest.mark.usefixtures("no_lending")
def test_a_shm_result_fetched_again_from_the_hub_says_why_it_is_gone(rc: Client) -> None:
    # the hub keeps only the descriptor of a result that came through shared memory; once the
    # client has read it (and dropped it), asking the hub again fails with the reason
    ar = rc[0].apply_async(lambda: __import__("numpy").ones(MIB))
    assert_over_shm(ar.get(timeout=30))
    msg_id = ar.msg_ids[0]
    del ar
    rc.purge_local_results([msg_id])
    with pytest.raises(ipp.RemoteError) as info:
        rc.get_result(msg_id).get(timeout=30)
    assert info.value.ename == "ShmError"
    assert "came through shared memory" in info.value.evalue
    assert "shm=False" in info.value.evalue


def _shm_descriptors() -> int:
    """Open descriptors of this process on shared-memory files."""
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/")
        except OSError:
            pass
    return n


@pytest.mark.usefixtures("no_lending")
def test_kept_shm_arrays_hold_no_descriptors(rc: Client, dv: DirectView) -> None:
    """Each received segment is mapped without a file descriptor: a process can keep many
    more arrays than its descriptor limit (mmap.mmap held one per mapping)."""
    before = _shm_descriptors()
    kept = [rc[0].apply_async(lambda i: np.full(2 * MIB // 8, i), i).get(30) for i in range(40)]
    for i, a in enumerate(kept):
        assert_over_shm(a)
        assert a[0] == i and a[-1] == i
    assert _shm_descriptors() == before
    # and on the engines: arrays pushed under many names
    arrays = {f"a{i}": np.full(2 * MIB // 8, i) for i in range(20)}
    dv.push(arrays, block=True)
    fds = dv.apply_sync(_shm_descriptors)
    assert fds == [0, 0]
    dv.execute("s = sum(int(globals()[f'a{i}'][0]) for i in range(20))", block=True)
    assert dv.pull("s", block=True) == [190, 190]
    dv.execute("for i in range(20): del globals()[f'a{i}']", block=True)


def test_results_use_the_socket_without_shm(shared_cluster: Cluster) -> None:
    a = np.arange(MIB, dtype=np.float64)
    with ipp.Client(shared_cluster.client_file, shm=False) as rc2:
        got = rc2[0].apply_sync(lambda x: x + 1, a)
        assert_over_frame(got)
        assert np.array_equal(got, a + 1)


def test_result_segments_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a client on this host gets a segment; unreleased segments expire; all are
    released at exit; peers cannot make a client unlink other files."""
    results = ResultSegments()
    if not results.enabled:
        pytest.skip("/dev/shm is not usable here")
    assert results.writer_for({}) is None
    assert results.writer_for({SHM_HOST_KEY: "another-host"}) is None
    writer = results.writer_for({SHM_HOST_KEY: results.host})
    assert writer is not None
    frames = serialize_object(np.ones(2 * MIB, dtype=np.uint8), shm=writer)
    assert len(frames) == 1  # the buffer went to the segment, only its descriptor is pickled
    seg = results.commit(writer)
    assert seg is not None and seg.path.exists()
    results.expire(now=time.monotonic() + GRACE / 2)
    assert seg.path.exists()
    results.expire(now=time.monotonic() + GRACE + 1)
    assert not seg.path.exists()
    second = results.writer_for({SHM_HOST_KEY: results.host})
    serialize_object(np.ones(2 * MIB, dtype=np.uint8), shm=second)
    seg2 = results.commit(second)
    assert seg2 is not None and seg2.path.exists()
    results.release_all()
    assert not seg2.path.exists()
    assert shm.release_name("../../etc/passwd") is False
    assert shm.release_name("fp-1-2-3-nothex") is False
