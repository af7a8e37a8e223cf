"""Partitioning sequences across engines (scatter/gather, map) and joining the parts back.

Two distributions, by name in :data:`dists`:

``'b'`` (:class:`Map`, block)
    Partition ``p`` of ``q`` is a contiguous slice; the first ``len % q`` partitions are one
    element longer.
``'r'`` (:class:`RoundRobinMap`, round robin)
    Partition ``p`` of ``q`` is ``seq[p::q]``.

Lists give lists, tuples tuples, strings strings, NumPy arrays array slices (views, no copy),
pandas objects ``.iloc`` slices; other iterables are materialized as lists first.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["Map", "RoundRobinMap", "chunk_sequence", "dists", "materialize"]


def _ndarray_type() -> type | None:
    np = sys.modules.get("numpy")
    return None if np is None else np.ndarray


def _is_array(obj: Any) -> bool:
    nd = _ndarray_type()
    return nd is not None and isinstance(obj, nd) and obj.ndim > 0


def _is_frame(obj: Any) -> bool:
    return hasattr(obj, "iloc") and type(obj).__module__.startswith("pandas")


def _is_sliceable(obj: Any) -> bool:
    if _is_array(obj) or _is_frame(obj):
        return True
    return isinstance(obj, Sequence) and not isinstance(obj, memoryview)


def materialize(seq: Any) -> Any:
    """``seq`` itself if it can be sliced (sequence, array, pandas object), else ``list(seq)``.

    Call this once before taking several partitions of a one-shot iterable (a generator).
    """
    if _is_sliceable(seq):
        return seq
    return list(seq)


def _slice(seq: Any, start: int, stop: int, step: int = 1) -> Any:
    if _is_frame(seq):
        return seq.iloc[start:stop:step]
    try:
        return seq[start:stop:step]
    except TypeError:  # a Sequence that does not take slices (e.g. deque)
        return list(seq)[start:stop:step]


def _kind(part: Any) -> str:
    """How a partition joins: ``ndarray``, ``frame``, ``str``, ``bytes``, ``tuple``, ``list``,
    ``sequence`` (any other sequence: a range, ...) or ``scalar``."""
    if _is_array(part):
        return "ndarray"
    if _is_frame(part):
        return "frame"
    if isinstance(part, str):
        return "str"
    if isinstance(part, (bytes, bytearray)):
        return "bytes"
    if isinstance(part, tuple):
        return "tuple"
    if isinstance(part, list):
        return "list"
    if isinstance(part, Sequence):
        return "sequence"  # a range, a deque...: not joined, as ipyparallel
    return "scalar"


def _common_kind(parts: Sequence[Any]) -> str:
    kinds = {_kind(p) for p in parts}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds & set(_UNJOINED):
        return "scalar"
    return "list"


#: Partition kinds that ``joinPartitions`` returns as the list of partitions (ipyparallel joins
#: only arrays and lists/tuples).
_UNJOINED = ("scalar", "str", "bytes", "sequence")


class Map:
    """Block distribution: contiguous partitions, the first ``n % q`` one element longer."""

    def bounds(self, n: int, p: int, q: int) -> tuple[int, int]:
        """``(start, stop)`` of partition ``p`` of ``q`` over ``n`` elements."""
        if q < 1:
            raise ValueError(f"the number of partitions must be >= 1, not {q}")
        if not 0 <= p < q:
            raise IndexError(f"partition {p} out of range for {q} partitions")
        base, extra = divmod(n, q)
        start = p * base + min(p, extra)
        return start, start + base + (1 if p < extra else 0)

    def getPartition(self, seq: Any, p: int, q: int, n: int | None = None) -> Any:  # noqa: N802
        """Partition ``p`` (0-based) of ``q`` of ``seq``.

        Parameters
        ----------
        seq : sequence, array or iterable
            Non-sliceable iterables are materialized first (see :func:`materialize`).
        p, q : int
            Which partition, and how many.
        n : int, optional
            Use only the first ``n`` elements (default ``len(seq)``).

        Returns
        -------
        Same type as ``seq`` (a list for materialized iterables); array slices are views.
        """
        seq = materialize(seq)
        n = len(seq) if n is None else min(n, len(seq))
        start, stop = self.bounds(n, p, q)
        return _slice(seq, start, stop)

    def joinPartitions(self, listOfPartitions: Sequence[Any]) -> Any:  # noqa: N802, N803
        """Join partitions made by :meth:`getPartition` back into one sequence."""
        return self.concatenate(listOfPartitions)

    def concatenate(self, listOfPartitions: Sequence[Any]) -> Any:  # noqa: N803
        """Concatenate partitions as ipyparallel does: ``numpy.concatenate`` for arrays,
        ``pandas.concat`` for pandas objects, one list for lists and tuples; anything else
        (scalars, ``str``, ``bytes``) comes back as the list of partitions itself."""
        parts = list(listOfPartitions)
        if not parts:
            return []
        if all(type(p) is list for p in parts):  # (a map's chunks: no per-part kind checks)
            return list(itertools.chain.from_iterable(parts))
        kind = _common_kind(parts)
        if kind in _UNJOINED:
            return parts
        if kind == "ndarray":
            return sys.modules["numpy"].concatenate(parts)
        if kind == "frame":
            return sys.modules["pandas"].concat(parts)
        return list(itertools.chain.from_iterable(parts))


class RoundRobinMap(Map):
    """Round-robin distribution: partition ``p`` of ``q`` is ``seq[p::q]``."""

    def getPartition(self, seq: Any, p: int, q: int, n: int | None = None) -> Any:  # noqa: N802
        """Partition ``p`` (0-based) of ``q``: ``seq[p:n:q]`` (array partitions are views)."""
        if q < 1:
            raise ValueError(f"the number of partitions must be >= 1, not {q}")
        if not 0 <= p < q:
            raise IndexError(f"partition {p} out of range for {q} partitions")
        seq = materialize(seq)
        n = len(seq) if n is None else min(n, len(seq))
        return _slice(seq, p, n, q)

    def joinPartitions(self, listOfPartitions: Sequence[Any]) -> Any:  # noqa: N802, N803
        """Interleave partitions back into the original order (lengths may differ by one, or
        arbitrarily: element ``k`` of each partition is taken while it exists); a list, or an
        array. ``str``, ``bytes`` and scalars come back as the list of partitions."""
        parts = list(listOfPartitions)
        if not parts:
            return []
        kind = _common_kind(parts)
        if kind in _UNJOINED:
            return parts
        q = len(parts)
        total = sum(len(p) for p in parts)
        if kind == "ndarray" and all(
            len(part) == len(range(i, total, q)) for i, part in enumerate(parts)
        ):
            np = sys.modules["numpy"]
            first = parts[0]
            out = np.empty((total, *first.shape[1:]), dtype=np.result_type(*parts))
            for i, part in enumerate(parts):
                out[i::q] = part
            return out
        if kind in ("ndarray", "frame"):
            # concatenate, then pick rows in interleaved order
            offsets = list(itertools.accumulate((len(p) for p in parts), initial=0))
            order = list(_interleave([range(offsets[i], offsets[i + 1]) for i in range(q)]))
            joined = Map.concatenate(self, parts)
            return joined.iloc[order] if kind == "frame" else joined[order]
        return list(_interleave(parts))


def _interleave(parts: Sequence[Any]) -> Iterator[Any]:
    longest = max(len(p) for p in parts)
    for k in range(longest):
        for part in parts:
            if k < len(part):
                yield part[k]


def chunk_sequence(seq: Any, chunksize: int) -> Iterator[Any]:
    """Consecutive chunks of ``chunksize`` elements (the last may be shorter).

    Parameters
    ----------
    seq : sequence, array or iterable
        Sliceable inputs give slices of their own type (ranges give ranges, arrays views);
        other iterables are consumed lazily and give lists.
    chunksize : int
        Elements per chunk, >= 1.

    Returns
    -------
    iterator
        The chunks, in order. Empty input gives no chunks.
    """
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, not {chunksize}")
    if _is_sliceable(seq):
        return (_slice(seq, i, i + chunksize) for i in range(0, len(seq), chunksize))
    return _chunk_iter(iter(seq), chunksize)


def _chunk_iter(it: Iterator[Any], chunksize: int) -> Iterator[list[Any]]:
    while True:
        chunk = list(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


#: Distribution name → Map class.
dists: dict[str, type[Map]] = {"b": Map, "r": RoundRobinMap}
