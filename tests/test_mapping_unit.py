"""Unit and property tests of scatter/gather and map partitioning (client/mapping.py)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ferroparallel.client.mapping import Map, RoundRobinMap, chunk_sequence, dists, materialize

DISTS = sorted(dists)
nparts = st.integers(min_value=1, max_value=8)


def split(dist: str, seq: Any, q: int) -> list[Any]:
    m = dists[dist]()
    return [m.getPartition(seq, p, q) for p in range(q)]


def join(dist: str, parts: list[Any]) -> Any:
    return dists[dist]().joinPartitions(parts)


def test_dists() -> None:
    assert dists == {"b": Map, "r": RoundRobinMap}
    assert issubclass(RoundRobinMap, Map)


@pytest.mark.parametrize("dist", DISTS)
@given(seq=st.lists(st.integers()), q=nparts)
def test_list_roundtrip(dist: str, seq: list[int], q: int) -> None:
    parts = split(dist, seq, q)
    assert all(type(p) is list for p in parts)
    assert sum(len(p) for p in parts) == len(seq)
    out = join(dist, parts)
    assert type(out) is list
    assert out == seq


@pytest.mark.parametrize("dist", DISTS)
@given(seq=st.lists(st.integers()).map(tuple), q=nparts)
def test_tuple_roundtrip(dist: str, seq: tuple[int, ...], q: int) -> None:
    parts = split(dist, seq, q)
    assert all(type(p) is tuple for p in parts)
    out = join(dist, parts)
    assert type(out) is list  # as ipyparallel: tuples join into a list
    assert out == list(seq)


@pytest.mark.parametrize("dist", DISTS)
@given(seq=st.text(), q=nparts)
def test_str_partitions_are_not_joined(dist: str, seq: str, q: int) -> None:
    parts = split(dist, seq, q)
    assert all(type(p) is str for p in parts)
    # as ipyparallel: strings are split, but gathered back as the list of parts
    assert join(dist, parts) == parts


@pytest.mark.parametrize("dist", DISTS)
@given(seq=st.binary(), q=nparts)
def test_bytes_partitions_are_not_joined(dist: str, seq: bytes, q: int) -> None:
    parts = split(dist, seq, q)
    assert join(dist, parts) == parts


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.int32, np.bool_, np.complex128]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9),
)


@pytest.mark.parametrize("dist", DISTS)
@given(arr=arrays, q=nparts)
def test_ndarray_roundtrip(dist: str, arr: np.ndarray, q: int) -> None:
    parts = split(dist, arr, q)
    for p in parts:
        assert isinstance(p, np.ndarray)
        assert p.shape[1:] == arr.shape[1:]
        assert p.dtype == arr.dtype
        if p.size:
            assert np.shares_memory(p, arr)  # slices are views, not copies
    out = join(dist, parts)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@given(n=st.integers(min_value=0, max_value=200), q=nparts)
def test_block_sizes(n: int, q: int) -> None:
    parts = split("b", list(range(n)), q)
    sizes = [len(p) for p in parts]
    base, extra = divmod(n, q)
    assert sizes == [base + 1] * extra + [base] * (q - extra)
    # contiguous and in order
    assert [x for p in parts for x in p] == list(range(n))


@given(n=st.integers(min_value=0, max_value=200), q=nparts)
def test_round_robin_partitions(n: int, q: int) -> None:
    seq = list(range(n))
    parts = split("r", seq, q)
    assert parts == [seq[p::q] for p in range(q)]


@given(
    parts=st.lists(st.lists(st.integers(), max_size=6), min_size=1, max_size=8),
)
def test_round_robin_join_any_lengths(parts: list[list[int]]) -> None:
    out = RoundRobinMap().joinPartitions(parts)
    assert sorted(out) == sorted(x for p in parts for x in p)
    # element k of partition i precedes element k+1 of any partition
    longest = max(len(p) for p in parts)
    expected = [p[k] for k in range(longest) for p in parts if k < len(p)]
    assert out == expected


def test_round_robin_join_unequal_arrays() -> None:
    out = RoundRobinMap().joinPartitions([np.array([0, 2, 4]), np.array([1]), np.array([3, 5])])
    # not a round-robin length pattern: interleaved element-wise
    np.testing.assert_array_equal(out, [0, 1, 3, 2, 5, 4])
    out = RoundRobinMap().joinPartitions([np.array([0, 3, 6]), np.array([1, 4]), np.array([2, 5])])
    np.testing.assert_array_equal(out, np.arange(7))


def test_n_limits_length() -> None:
    seq = list(range(10))
    assert Map().getPartition(seq, 0, 2, n=6) == [0, 1, 2]
    assert Map().getPartition(seq, 1, 2, n=6) == [3, 4, 5]
    assert RoundRobinMap().getPartition(seq, 1, 2, n=6) == [1, 3, 5]


def test_bad_partition_args() -> None:
    with pytest.raises(ValueError):
        Map().getPartition([1, 2], 0, 0)
    with pytest.raises(IndexError):
        Map().getPartition([1, 2], 2, 2)
    with pytest.raises(IndexError):
        RoundRobinMap().getPartition([1, 2], -1, 2)


def test_non_sliceable_inputs_materialized() -> None:
    assert Map().getPartition((x for x in range(5)), 1, 2) == [3, 4]
    assert sorted(Map().getPartition({1, 2, 3}, 0, 1)) == [1, 2, 3]
    assert Map().getPartition(deque([1, 2, 3, 4]), 1, 2) == [3, 4]
    gen = materialize(x * 2 for x in range(4))
    assert [Map().getPartition(gen, p, 2) for p in range(2)] == [[0, 2], [4, 6]]
    r = range(10)
    assert materialize(r) is r
    assert Map().getPartition(r, 0, 3) == range(0, 4)


def test_join_scalars_and_empty() -> None:
    assert Map().joinPartitions([1, 2, 3]) == [1, 2, 3]
    assert RoundRobinMap().joinPartitions([1, 2]) == [1, 2]
    assert Map().joinPartitions([]) == []
    assert Map().joinPartitions([[1], 2]) == [[1], 2]
    # 0-d arrays are scalars
    out = Map().joinPartitions([np.float64(1.0), np.array(2.0)])
    assert isinstance(out, list) and len(out) == 2
    # mixed sequence types chain into a list
    assert Map().joinPartitions([[1, 2], (3,), np.array([4])]) == [1, 2, 3, 4]


def test_join_of_plain_lists_matches_the_general_join() -> None:
    # all parts exactly lists (a map's chunk results): one list, copied, parts untouched
    parts = [[1, 2], [], [3]]
    for m in (Map(), RoundRobinMap()):
        out = m.joinPartitions(parts)
        assert type(out) is list and out is not parts[0]
    assert Map().joinPartitions(parts) == [1, 2, 3] and parts == [[1, 2], [], [3]]

    # a list subclass, or lists with a non-list part, take the general path as before
    class Items(list):  # noqa: N801 - a local test type
        pass

    assert Map().joinPartitions([Items([1]), [2]]) == [1, 2]
    assert Map().joinPartitions([[1], "ab"]) == [[1], "ab"]
    assert Map().joinPartitions([[1], np.array([2, 3])]) == [1, 2, 3]


def test_ranges_are_split_but_not_joined() -> None:
    # as ipyparallel: only arrays, lists and tuples are joined; a range's parts stay ranges
    parts = split("b", range(7), 3)
    assert parts == [range(0, 3), range(3, 5), range(5, 7)]
    assert Map().joinPartitions(parts) == parts


@given(seq=st.lists(st.integers()), size=st.integers(min_value=1, max_value=10))
def test_chunk_sequence_list(seq: list[int], size: int) -> None:
    chunks = list(chunk_sequence(seq, size))
    assert all(type(c) is list for c in chunks)
    assert all(len(c) == size for c in chunks[:-1])
    assert all(1 <= len(c) <= size for c in chunks)
    assert [x for c in chunks for x in c] == seq


@given(n=st.integers(min_value=0, max_value=50), size=st.integers(min_value=1, max_value=10))
def test_chunk_sequence_iterators_and_ranges(n: int, size: int) -> None:
    lazy = list(chunk_sequence(iter(range(n)), size))
    ranges = list(chunk_sequence(range(n), size))
    assert [list(c) for c in ranges] == lazy
    assert all(isinstance(r, range) for r in ranges)


def test_chunk_sequence_arrays_are_views_and_bad_size() -> None:
    arr = np.arange(10)
    chunks = list(chunk_sequence(arr, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert all(np.shares_memory(c, arr) for c in chunks)
    np.testing.assert_array_equal(Map().joinPartitions(chunks), arr)
    with pytest.raises(ValueError):
        list(chunk_sequence([1], 0))
