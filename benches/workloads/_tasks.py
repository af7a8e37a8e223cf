"""The functions the cluster workloads send to engines (not a workload: the name starts with ``_``).

They live in their own small module so that every framework can find them by reference on its
engines and workers: the cluster workloads put this directory on ``PYTHONPATH`` before starting
any cluster (see ``_frameworks.isolated_env``), and the engines inherit it.
"""

from __future__ import annotations

from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    """Do nothing and return ``None`` (accepts any arguments, so ``map`` can use it too)."""
    return None


def noop_main(*args: Any, **kwargs: Any) -> None:
    """``noop`` as if typed at the prompt or in a notebook cell (``__module__`` is
    ``"__main__"``, set below): every framework sends it by value, the common case of
    interactive use."""
    return None


noop_main.__module__ = "__main__"


def noop_chunk(items: Any) -> list[None]:
    """``noop`` over a chunk of items (Dask's counterpart of a ``map`` with ``chunksize``)."""
    return [noop(x) for x in items]


def checksum(x: Any) -> tuple[str, int, float, float, float, float]:
    """What is needed to tell that a 1-D array arrived whole: dtype, length, sum, three items.

    Used by the ``data`` workload to check, outside the timed part, what each framework
    actually moved (so that none can look fast by not moving the data).

    Parameters
    ----------
    x : array-like
        A 1-D numeric array (anything ``numpy.asarray`` accepts, e.g. a buffer).

    Returns
    -------
    tuple
        ``(dtype, length, sum, first, middle, last)``; the items are NaN for an empty array.
    """
    import numpy as np

    a = np.asarray(x)
    n = int(a.size)
    if n == 0:
        nan = float("nan")
        return str(a.dtype), 0, 0.0, nan, nan, nan
    return str(a.dtype), n, float(a.sum()), float(a[0]), float(a[n // 2]), float(a[-1])
