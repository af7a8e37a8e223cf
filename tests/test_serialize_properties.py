"""Property tests: every dtype kind / shape / memory order round-trips exactly (issue 7 item 1).

In-process, through the three ways an array can travel: in the pickle, as an out-of-band frame
(received read-only, as from the socket), and through a shared-memory segment. Also the copy
counts: a contiguous array is never copied by the sender, a non-contiguous one exactly once.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from array_strategies import arrays, assert_same, assert_same_array, nested
from ferroparallel.serialize import load_object, serialize_object, shm
from transfer_util import data_address

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def via_frames(obj: Any, threshold: int) -> Any:
    """Round trip with every out-of-band buffer received as read-only bytes."""
    frames = serialize_object(obj, threshold)
    return load_object([frames[0], *(bytes(f) for f in frames[1:])])


def via_shm(obj: Any) -> Any:
    writer = shm.SegmentWriter(threshold=0)
    frames = serialize_object(obj, threshold=0, shm=writer)
    if not writer:
        return load_object(frames)
    seg = writer.commit()
    try:
        return load_object(frames)
    finally:
        seg.release()


@PROPERTY_SETTINGS
@given(a=arrays(), threshold=st.sampled_from([0, 64, 1 << 30]))
def test_array_roundtrip_through_frames(a: np.ndarray, threshold: int) -> None:
    b = via_frames(a, threshold)
    assert_same_array(a, b)
    if b.nbytes > threshold and not a.dtype.hasobject:
        assert not b.flags.writeable  # over the received (read-only) frame


@PROPERTY_SETTINGS
@given(a=arrays())
def test_array_roundtrip_through_shared_memory(a: np.ndarray) -> None:
    b = via_shm(a)
    assert_same_array(a, b)
    if b.nbytes and not a.dtype.hasobject:
        assert not b.flags.writeable


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=nested(arrays(max_side=4)), use_shm=st.booleans())
def test_arrays_nested_in_containers(obj: Any, use_shm: bool) -> None:
    assert_same(obj, via_shm(obj) if use_shm else via_frames(obj, 0))


@settings(max_examples=40, deadline=None)
@given(a=arrays(object_dtype=False))
def test_writable_copy_on_request(a: np.ndarray) -> None:
    b = via_frames(a, 0)
    w = np.array(b)  # the documented way to get a writable copy
    assert w.flags.writeable and w.flags.owndata
    assert_same_array(np.ascontiguousarray(a) if not a.flags.f_contiguous else a, w)


@pytest.mark.parametrize("order", ["C", "F"])
def test_contiguous_arrays_are_sent_without_copy(order: str) -> None:
    a = np.ones((512, 1024), dtype=np.float64, order=order)  # 4 MiB
    tracemalloc.start()
    try:
        frames = serialize_object(a)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data_address(np.frombuffer(frames[1], np.uint8)) == data_address(a)
    assert peak < a.nbytes // 10


def test_non_contiguous_arrays_are_copied_exactly_once() -> None:
    base = np.ones((1024, 2048), dtype=np.float64)
    a = base[:, ::2]  # 8 MiB, non-contiguous
    tracemalloc.start()
    try:
        frames = serialize_object(a)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert a.nbytes <= peak < 1.2 * a.nbytes
    assert memoryview(frames[1]).nbytes == a.nbytes
