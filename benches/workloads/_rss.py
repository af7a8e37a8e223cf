"""Peak resident memory (RSS) growth of a group of processes over a block of code.

Not a workload (the name starts with ``_``). Linux only: reads ``VmRSS`` and ``VmHWM`` (the
peak RSS) from ``/proc/<pid>/status`` and resets the peak by writing ``5`` to
``/proc/<pid>/clear_refs`` (Linux >= 4.0; allowed for the processes of the same user). The
growth of a process over a block is its peak during the block minus its RSS just before it.

Where the peak cannot be reset (another user's process, no ``/proc``), the growth is NaN
rather than a number that could include an older peak.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

_MIB = 1024 * 1024


def status_kib(pid: int, key: str) -> int | None:
    """One ``kB`` field (e.g. ``"VmHWM"``) of ``/proc/<pid>/status``, or ``None``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_peak(pid: int) -> bool:
    """Reset the peak RSS (``VmHWM``) of ``pid`` to its current RSS; whether that worked."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakGrowth:
    """Context manager measuring the peak RSS growth of groups of processes.

    Parameters
    ----------
    groups : mapping of str to iterable of int
        Named groups of pids, e.g. ``{"client": [os.getpid()], "engines": [...]}``.

    Examples
    --------
    >>> with PeakGrowth({"client": [os.getpid()]}) as peak:  # doctest: +SKIP
    ...     data = bytearray(100 * 2**20)
    >>> peak.mib("client")  # doctest: +SKIP
    100.0
    """

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._before: dict[int, int | None] = {}
        self._growth: dict[int, float] = {}

    def __enter__(self) -> PeakGrowth:
        for pids in self._groups.values():
            for pid in pids:
                ok = reset_peak(pid)
                self._before[pid] = status_kib(pid, "VmRSS") if ok else None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for pid, before in self._before.items():
            peak = status_kib(pid, "VmHWM")
            if before is None or peak is None:
                self._growth[pid] = math.nan
            else:
                self._growth[pid] = max(0, peak - before) * 1024 / _MIB

    def mib(self, group: str) -> float:
        """Largest growth in MiB among the processes of ``group`` (NaN if none measurable)."""
        values = [self._growth.get(pid, math.nan) for pid in self._groups.get(group, [])]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else math.nan
