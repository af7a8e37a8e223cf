"""Same-host shared memory (issue 7 item 3; design in docs/decisions/0003-shared-memory.md).

In-process: one segment per message, read-only mappings, nothing left behind on errors or
interrupts, the sweep of dead creators' segments. On real clusters: push / apply / scatter /
load-balanced arguments above the threshold reach every engine through one segment, which is
unlinked once every engine replied; the socket path is used when engines are on another host
(faked host token), when shared memory is disabled, and when /dev/shm is full; killing an
engine (-9) mid-transfer or the client (-9) leaves nothing in /dev/shm after the sweep.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from ferroparallel import Reference
from ferroparallel.client import Client, DirectView
from ferroparallel.cluster import Cluster
from ferroparallel.error import EngineError, RemoteError
from ferroparallel.serialize import load_object, serialize_object, shm
from ferroparallel.serialize.apply import pack_apply_message, unpack_apply_message
from transfer_util import (
    assert_no_segments_left,
    assert_over_shm,
    fp_mappings,
    owner_kind,
    run_script,
    segments_of,
)

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
SHORT = 30.0


@pytest.fixture(autouse=True)
def segments_even_for_blocking_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """These tests are about segments: the shared client does not lend (test_peer_read.py)."""
    if "rc" not in request.fixturenames:
        yield
        return
    rc = request.getfixturevalue("rc")
    saved, rc._shm.peer_read = rc._shm.peer_read, False
    try:
        yield
    finally:
        rc._shm.peer_read = saved


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave no segment of this process behind."""
    yield
    assert_no_segments_left()


# ----- in-process ---------------------------------------------------------------------------


def test_one_segment_for_thousands_of_buffers() -> None:
    arrays = [np.full(300, i, dtype=np.int64) for i in range(5000)]  # 2400 bytes each
    writer = shm.SegmentWriter(threshold=1024)
    frames = serialize_object(arrays, shm=writer)
    assert len(frames) == 1  # no buffer frame: everything is in the segment
    assert len(writer) == 5000
    seg = writer.commit()
    try:
        assert segments_of() == [seg.name]
        back = load_object(frames)
    finally:
        seg.release()
    assert segments_of() == []  # unlinked; the mapping lives on
    for i, a in enumerate(back):
        assert_over_shm(a)
        assert a.dtype == np.int64 and (a == i).all()
        assert a.__array_interface__["data"][0] % shm.ALIGN == 0


def test_only_buffers_above_the_threshold_go_to_shm() -> None:
    big, mid = np.arange(MIB, dtype=np.uint8), np.arange(100_000, dtype=np.uint8)
    writer = shm.SegmentWriter(threshold=MIB - 1)
    frames = serialize_object({"big": big, "mid": mid, "bytes": b"x" * (2 * MIB)}, shm=writer)
    assert len(writer) == 2 and len(frames) == 2  # mid is an ordinary out-of-band frame
    seg = writer.commit()
    try:
        back = load_object(frames)
    finally:
        seg.release()
    assert_over_shm(back["big"])
    assert np.array_equal(back["big"], big) and np.array_equal(back["mid"], mid)
    assert back["bytes"] == b"x" * (2 * MIB)


def test_apply_message_function_never_in_shm() -> None:
    a = np.ones(2 * MIB, dtype=np.uint8)
    writer = shm.SegmentWriter(threshold=0)
    bufs = pack_apply_message(len, (a,), {}, shm=writer)
    seg = writer.commit()
    try:
        f, args, kwargs = unpack_apply_message(bufs)
    finally:
        seg.release()
    assert f is len and kwargs == {}
    assert_over_shm(args[0])
    assert args[0].sum() == 2 * MIB


def test_interrupted_or_failed_commit_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls = []

    def interrupted(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", interrupted)
    writer = shm.SegmentWriter(threshold=0)
    serialize_object([np.zeros(MIB), np.zeros(MIB)], shm=writer)
    with pytest.raises(KeyboardInterrupt):
        writer.commit()
    assert segments_of() == []

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = shm.SegmentWriter(threshold=0)
    serialize_object(np.zeros(MIB), shm=writer)
    with pytest.raises(OSError):
        writer.commit()
    assert segments_of() == []


def test_missing_segment_errors_name_the_cause() -> None:
    writer = shm.SegmentWriter(threshold=0)
    frames = serialize_object(np.zeros(1000), shm=writer)
    writer.commit().release()
    with pytest.raises(shm.ShmError, match="already released"):
        load_object(frames)
    writer = shm.SegmentWriter(threshold=0, host="elsewhere")
    frames = serialize_object(np.zeros(1000), shm=writer)
    with pytest.raises(shm.ShmError, match="another host"):
        load_object(frames)
    with pytest.raises(shm.ShmError, match="not a ferroparallel"):
        shm.open_slice("../etc/passwd", 0, 1, "h")


def test_descriptor_outside_the_segment_is_refused() -> None:
    writer = shm.SegmentWriter(threshold=0)
    serialize_object(np.zeros(10), shm=writer)
    seg = writer.commit()
    try:
        with pytest.raises(shm.ShmError, match="outside"):
            shm.open_slice(seg.name, 64, 80, shm.host_token())
    finally:
        seg.release()


def test_sweep_removes_segments_of_dead_creators_only() -> None:
    proc = run_script(
        """
        import os, numpy as np
        from ferroparallel.serialize import serialize_object, shm
        w = shm.SegmentWriter(threshold=0)
        serialize_object(np.zeros(1000), shm=w)
        print(w.commit().name, flush=True)
        os._exit(0)  # no release: as if killed
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    orphan = out.strip()
    mine = shm.SegmentWriter(threshold=0)
    serialize_object(np.zeros(1000), shm=mine)
    seg = mine.commit()
    try:
        assert (shm.SHM_DIR / orphan).exists()
        assert shm.creator_alive(orphan) is False and shm.creator_alive(seg.name) is True
        assert shm.creator_alive("fp-not-ours") is None
        removed = shm.sweep()
        assert orphan in removed and seg.name not in removed
        assert not (shm.SHM_DIR / orphan).exists() and seg.path.exists()
    finally:
        seg.release()


def test_a_detached_segment_outlives_its_creator_until_its_grace_ends() -> None:
    proc = run_script(
        """
        import os, numpy as np
        from ferroparallel.serialize import serialize_object, shm
        w = shm.SegmentWriter(threshold=0)
        serialize_object(np.zeros(1000), shm=w)
        seg = w.commit()
        seg.detach(grace=1.0)  # as a closed client leaves a segment of a queued request
        print(seg.name, flush=True)
        os._exit(0)
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    name = out.strip()
    try:
        assert shm.creator_alive(name) is False
        assert name not in shm.sweep() and (shm.SHM_DIR / name).exists()  # still in its grace
        time.sleep(1.2)
        shm.sweep()  # (another process's sweep may have removed it first: either is right)
        assert not (shm.SHM_DIR / name).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm.SHM_DIR / name)


def test_detach_grace_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(shm.ENV_DETACH_GRACE, raising=False)
    assert shm.detach_grace() == shm.DETACH_GRACE
    monkeypatch.setenv(shm.ENV_DETACH_GRACE, "2.5")
    assert shm.detach_grace() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(shm.ENV_DETACH_GRACE, bad)
        caplog.clear()
        assert shm.detach_grace() == shm.DETACH_GRACE  # (read while a client closes)
        assert shm.ENV_DETACH_GRACE in caplog.text and repr(bad) in caplog.text


def test_env_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.ENV_THRESHOLD, "4096")
    assert shm.threshold_from_env() == 4096
    monkeypatch.setenv(shm.ENV_THRESHOLD, "lots")
    with pytest.raises(ValueError, match=shm.ENV_THRESHOLD):
        shm.threshold_from_env()
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(shm.ENV_ENABLE, off)
        assert not shm.enabled_by_env()
    monkeypatch.setenv(shm.ENV_ENABLE, "1")
    assert shm.enabled_by_env()
    monkeypatch.setenv(shm.ENV_HOST, "fake-host")
    assert shm.host_token() == "fake-host"


# ----- on the shared 2-engine cluster -------------------------------------------------------


def test_push_goes_once_through_one_segment_mapped_by_every_engine(
    rc: Client, dv: DirectView
) -> None:
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    before = dv.apply_sync(fp_mappings)
    dv.push({"a": a, "small": a[:1000].copy()}, block=True)
    assert rc._shm.live_segments() == [] and segments_of() == []  # released after the replies
    assert dv.apply_sync(owner_kind, Reference("a")) == ["shm", "shm"]
    assert dv.apply_sync(owner_kind, Reference("small")) == ["frame", "frame"]  # a frame
    after = dv.apply_sync(fp_mappings)
    new = [sorted(set(m) - set(b)) for m, b in zip(after, before, strict=True)]
    assert len(new[0]) == 1 and new[0] == new[1]  # the same single segment on both engines
    same = dv.apply_sync(lambda x: bool((x == np.arange(len(x))).all()), Reference("a"))
    assert same == [True, True]
    # Replacing the value frees the mapping on the engines.
    dv.execute("a = None", block=True)
    after = dv.apply_sync(fp_mappings)
    assert [sorted(set(m) - set(b)) for m, b in zip(after, before, strict=True)] == [[], []]


def test_apply_scatter_and_load_balanced_arguments_use_shm(rc: Client, dv: DirectView) -> None:
    a = np.arange(4 * MIB, dtype=np.int32)  # 16 MiB
    assert dv.apply_sync(owner_kind, a) == ["shm", "shm"]
    assert dv.apply_sync(lambda x: int(x.sum()), a) == [int(a.sum())] * 2
    dv.scatter("part", a, block=True)
    assert dv.apply_sync(owner_kind, Reference("part")) == ["shm", "shm"]
    assert np.array_equal(np.concatenate(dv.pull("part", block=True)), a)
    lview = rc.load_balanced_view()
    assert lview.apply_sync(owner_kind, a) == "shm"
    assert rc._shm.live_segments() == []


def test_a_non_blocking_push_holds_its_segment_until_the_reply(rc: Client) -> None:
    a = np.ones(2 * MIB, dtype=np.uint8)
    busy = rc[0].apply_async(time.sleep, 1.0)
    ar = rc[0].push({"a": a}, block=False)
    assert len(rc._shm.live_segments()) == 1
    assert segments_of() == rc._shm.live_segments()
    busy.get(timeout=SHORT)
    ar.get(timeout=SHORT)
    wait_gone = time.monotonic() + 5
    while rc._shm.live_segments() and time.monotonic() < wait_gone:
        time.sleep(0.01)
    assert rc._shm.live_segments() == [] and segments_of() == []
    assert rc[0].apply_sync(owner_kind, Reference("a")) == "shm"


def test_disabled_shm_uses_the_socket_path(
    rc: Client, shared_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = np.arange(MIB, dtype=np.float64)
    with ipp.Client(shared_cluster.client_file, shm=False) as rc2:
        assert rc2[:].apply_sync(owner_kind, a) == ["frame", "frame"]
    monkeypatch.setenv(shm.ENV_ENABLE, "0")
    with ipp.Client(shared_cluster.client_file) as rc3:
        assert not rc3._shm.enabled
        assert rc3[:].apply_sync(owner_kind, a) == ["frame", "frame"]
    monkeypatch.delenv(shm.ENV_ENABLE)
    with ipp.Client(shared_cluster.client_file, shm_threshold=16 * MIB) as rc4:
        assert rc4[:].apply_sync(owner_kind, a) == ["frame", "frame"]  # 8 MiB < threshold


def test_full_dev_shm_falls_back_to_the_socket(
    rc: Client, dv: DirectView, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: shm.SegmentWriter) -> shm.Segment:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.SegmentWriter, "commit", full)
    a = np.arange(MIB, dtype=np.float64)
    assert dv.apply_sync(owner_kind, a) == ["frame", "frame"]


# ----- throwaway clusters -------------------------------------------------------------------


def orphan_segment() -> str:
    """A segment left by a process that died without releasing it."""
    proc = run_script(
        """
        import os, numpy as np
        from ferroparallel.serialize import serialize_object, shm
        w = shm.SegmentWriter(threshold=0)
        serialize_object(np.zeros(1000), shm=w)
        print(w.commit().name, flush=True)
        os._exit(0)
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    name = out.strip()
    assert (shm.SHM_DIR / name).exists()
    return name


def test_engines_on_another_host_get_the_socket_path(
    new_cluster: Callable[..., tuple[Cluster, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = orphan_segment()
    monkeypatch.setenv(shm.ENV_HOST, "some-other-host")  # inherited by the engines
    cluster, first = new_cluster(n=2)
    first.close()
    assert not (shm.SHM_DIR / orphan).exists()  # swept by a starting process
    monkeypatch.delenv(shm.ENV_HOST)
    with ipp.Client(cluster.client_file) as rc:
        rc.wait_for_engines(2, timeout=SHORT)
        a = np.arange(MIB, dtype=np.float64)
        assert rc[:].apply_sync(owner_kind, a) == ["frame", "frame"]
        assert rc._shm._local and not any(rc._shm._local.values())
        rc[:].push({"a": a}, block=True)
        assert rc[:].apply_sync(owner_kind, Reference("a")) == ["frame", "frame"]
        assert segments_of() == []


def test_engine_killed_mid_transfer_releases_the_segment(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> None:
    cluster, rc = new_cluster(n=2)
    pids = dict(zip(rc.ids, rc[:].apply_sync(os.getpid), strict=True))
    busy = rc[1].apply_async(time.sleep, 60)
    time.sleep(0.2)
    ar = rc[1].push({"a": np.ones(64 * MIB, dtype=np.uint8)}, block=False)  # queued behind
    names = rc._shm.live_segments()
    assert len(names) == 1 and segments_of() == names
    os.kill(pids[1], signal.SIGKILL)
    for pending in (busy, ar):
        with pytest.raises(EngineError):
            pending.get(timeout=SHORT)
    deadline = time.monotonic() + 5
    while rc._shm.live_segments() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rc._shm.live_segments() == [] and segments_of() == []
    assert not (shm.SHM_DIR / names[0]).exists()
    # the surviving engine still gets shm transfers (non-blocking: blocking calls lend)
    ar = rc[0].apply_async(owner_kind, np.ones(2 * MIB, dtype=np.uint8))
    assert ar.get(timeout=SHORT) == "shm"


def test_client_killed_holding_segments_leaves_nothing_after_the_sweep(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> None:
    cluster, rc = new_cluster(n=1)
    proc = run_script(
        f"""
        import time, numpy as np, ferroparallel as ipp
        rc = ipp.Client({str(cluster.client_file)!r})
        rc.wait_for_engines(1, timeout=30)
        rc[0].apply_async(time.sleep, 3)
        rc[0].push({{"a": np.ones(32 << 20, dtype=np.uint8)}}, block=False)
        rc[0].apply_async(len, np.ones(32 << 20, dtype=np.uint8))
        print(" ".join(rc._shm.live_segments()), flush=True)
        time.sleep(60)
        """
    )
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    try:
        assert len(names) == 2, proc.stderr.read() if proc.stderr else ""
        assert sorted(segments_of(proc.pid)) == sorted(names)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert sorted(segments_of(proc.pid)) == sorted(names)  # nobody released them...
    with ipp.Client(cluster.client_file) as rc2:  # ...until a process starts and sweeps
        assert segments_of(proc.pid) == []
        # the engine survived requests whose segments vanished, and still works
        ar = rc2[0].apply_async(owner_kind, np.ones(2 * MIB, dtype=np.uint8))
        assert ar.get(timeout=SHORT) == "shm"
    rc.wait_for_engines(1, timeout=SHORT)
    assert rc[0].apply_sync(lambda: 5) == 5


def test_a_request_whose_segment_vanished_fails_clearly(
    new_cluster: Callable[..., tuple[Cluster, Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, rc = new_cluster(n=1)
    busy = rc[0].apply_async(time.sleep, 1)
    ar = rc[0].apply_async(len, np.ones(2 * MIB, dtype=np.uint8))
    for name in rc._shm.live_segments():  # as if the client had crashed and been swept
        os.unlink(shm.SHM_DIR / name)
    busy.get(timeout=SHORT)
    with pytest.raises(RemoteError) as e:
        ar.get(timeout=SHORT)
    assert e.value.ename == "ShmError" and "does not exist" in str(e.value)
    assert rc[0].apply_sync(len, np.ones(2 * MIB, dtype=np.uint8)) == 2 * MIB


def test_work_sent_before_close_still_runs_and_its_segments_go_later(
    rc: Client, shared_cluster: Cluster
) -> None:
    """As with ipyparallel, what a client sent before closing still runs: segments of requests
    still queued on engines are left (detached) for them, and swept once their grace ends."""
    proc = run_script(
        f"""
        import os, time, numpy as np, ferroparallel as ipp
        os.environ["{shm.ENV_DETACH_GRACE}"] = "3"  # (read when the client closes)
        rc = ipp.Client({str(shared_cluster.client_file)!r})
        rc.wait_for_engines(2, timeout=30)
        busy = rc[0].apply_async(time.sleep, 1.5)  # the engine is busy: the rest is queued
        rc[0].push({{"pushed_before_close": np.full(2 << 20, 7, dtype=np.uint8)}}, block=False)
        ar = rc[0].apply_async(np.sum, np.ones(2 << 20, dtype=np.uint8))
        print(ar.msg_ids[0], " ".join(rc._shm.live_segments()), flush=True)
        rc.close(linger=0)
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    msg_id, *names = out.split()
    assert len(names) == 2
    # the engine ran both: the push landed and the sum is in the hub's records
    pushed = rc[0].pull("pushed_before_close", block=True)
    assert pushed.shape == (2 << 20,) and int(pushed[0]) == 7
    assert rc.get_result(msg_id).get(timeout=SHORT) == 2 << 20
    rc[0].execute("del pushed_before_close", block=True)
    deadline = time.monotonic() + 30
    while any((shm.SHM_DIR / n).exists() for n in names) and time.monotonic() < deadline:
        shm.sweep()  # (as every client does when it starts)
        time.sleep(0.2)
    assert not any((shm.SHM_DIR / n).exists() for n in names)
