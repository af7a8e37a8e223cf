"""Timed samples of the ``data`` workload and the rows they become.

Not a workload (the name starts with ``_``). :class:`Samples` keeps, per case (operation, size,
engines) and contender, the duration and the peak RSS growth of every repetition, and any
failure; :func:`rows` turns them into table rows with the ratios of ferroparallel to its peers
and a check of the issue's targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from _frameworks import median, ratio

#: The ratio columns (filled on the ferroparallel rows).
RATIOS = ("fp/raw", "fp/relay", "fp/ipp", "fp/dask", "fp/copy")

#: Operations on the data (every one of them is a "data workload" for the Dask target).
DATA_OPS = ("push", "pull", "scatter", "gather", "apply")


@dataclass(frozen=True)
class Case:
    """One measured situation.

    Attributes
    ----------
    op : str
        ``"copy"`` (the memory floor), or one of :data:`DATA_OPS`.
    mib : float
        Size of the array in MiB.
    engines : int
        Engines the data goes to or comes from (0 for ``copy``).
    """

    op: str
    mib: float
    engines: int

    @property
    def moved_mib(self) -> float:
        """MiB that cross between processes (or are copied) in one operation."""
        return self.mib * max(1, self.engines) if self.op in ("push", "pull") else self.mib


@dataclass
class Series:
    """The repetitions of one contender in one case."""

    seconds: list[float] = field(default_factory=list)
    client_mib: list[float] = field(default_factory=list)
    engine_mib: list[float] = field(default_factory=list)
    other_mib: list[float] = field(default_factory=list)
    devshm_mib: list[float] = field(default_factory=list)
    failure: str = ""


def _peak(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return max(known) if known else math.nan


class Samples:
    """Everything measured, in the order cases and contenders first appeared."""

    def __init__(self) -> None:
        self.series: dict[tuple[Case, str], Series] = {}
        self.notes: dict[str, str] = {}

    def get(self, case: Case, contender: str) -> Series:
        """The series of ``contender`` in ``case`` (created empty on first use)."""
        return self.series.setdefault((case, contender), Series())

    def failed(self, case: Case, contender: str) -> bool:
        """Whether ``contender`` already failed in ``case``."""
        return bool(self.get(case, contender).failure)

    def note(self, contender: str, text: str) -> None:
        """Add ``text`` to the note of every row of ``contender``."""
        self.notes[contender] = "; ".join(filter(None, [self.notes.get(contender), text]))

    def mib_s(self, case: Case, contender: str | None) -> float:
        """Median MiB/s of ``contender`` in ``case`` (NaN when missing or failed)."""
        series = self.series.get((case, contender)) if contender else None
        if series is None or series.failure or not series.seconds:
            return math.nan
        return case.moved_mib / median(series.seconds)


@dataclass
class Roles:
    """Which contender labels play which part in the ratios.

    Attributes
    ----------
    ferro : list of str
        ferroparallel rows (the socket path, and the shared-memory path when available).
    shm : str or None
        The ferroparallel shared-memory row, if any.
    raw, relay, ipp : str or None
        The raw pyzmq rows (direct, and through a relay process) and the ipyparallel row.
    dask : list of str
        The Dask rows (the best of them is the one to beat).
    copy : str
        The ``a.copy()`` row.
    """

    ferro: list[str]
    shm: str | None
    raw: str | None
    relay: str | None
    ipp: str | None
    dask: list[str]
    copy: str


def _targets(case: Case, label: str, roles: Roles, got: dict[str, float]) -> str:
    """The issue's targets that apply to this ferroparallel row: ``"raw ok, dask MISS"``."""
    checks: list[tuple[str, float, float]] = []  # (name, value, minimum)
    big_transfer = case.op in ("push", "pull") and case.mib >= 128
    if big_transfer:
        checks.append(("raw>=0.8", got["fp/raw"], 0.8))
        allowed = 1.1 * case.mib * (case.engines if case.op == "pull" else 1)
        checks.append(("rss<=1.1x", allowed / max(got["client_rss_mib"], 1e-9), 1.0))
    if case.op in DATA_OPS:
        checks.append(("dask>1", got["fp/dask"], 1.0 + 1e-12))
    if label == roles.shm and case.op in ("push", "pull"):
        checks.append(("copy>=0.75", got["fp/copy"], 0.75))
    parts = []
    for name, value, minimum in checks:
        if math.isnan(value):
            continue
        parts.append(f"{name} {'ok' if value >= minimum else 'MISS'}")
    return ", ".join(parts)


def rows(samples: Samples, roles: Roles, order: list[str]) -> list[dict[str, Any]]:
    """One row per case and contender, ferroparallel rows with ratios and targets.

    Parameters
    ----------
    samples : Samples
        What was measured.
    roles : Roles
        Which labels are ferroparallel, raw pyzmq, ipyparallel, Dask, the copy floor.
    order : list of str
        The contenders in the order their rows should appear within a case.

    Returns
    -------
    list of dict
        Columns: ``op``, ``mib``, ``engines``, ``contender``, ``reps``, ``median_s``, ``mib_s``,
        ``client_rss_mib``, ``engine_rss_mib``, ``other_rss_mib``, ``devshm_mib`` (only
        when there is a shared-memory row; NaN on the rows that do not use it), the ratios of
        :data:`RATIOS` (ferroparallel rows: its MiB/s over raw pyzmq's, raw pyzmq through a
        relay's, ipyparallel's, the best Dask's, ``a.copy()``'s of the same size), ``targets``,
        ``note``.
    """
    cases = list(dict.fromkeys(case for case, _ in samples.series))
    out: list[dict[str, Any]] = []
    for case in cases:
        best_dask = max(
            (samples.mib_s(case, d) for d in roles.dask),
            key=lambda v: -math.inf if math.isnan(v) else v,
            default=math.nan,
        )
        copy_case = Case("copy", case.mib, 0)
        for label in order:
            series = samples.series.get((case, label))
            if series is None:
                continue
            speed = samples.mib_s(case, label)
            row: dict[str, Any] = {
                "op": case.op,
                "mib": case.mib,
                "engines": case.engines,
                "contender": label,
                "reps": len(series.seconds),
                "median_s": median(series.seconds),
                "mib_s": speed,
                "client_rss_mib": _peak(series.client_mib),
                "engine_rss_mib": _peak(series.engine_mib),
                "other_rss_mib": _peak(series.other_mib),
                **({"devshm_mib": _peak(series.devshm_mib)} if roles.shm else {}),
                **dict.fromkeys(RATIOS + ("targets",), ""),
            }
            if label in roles.ferro:
                row["fp/raw"] = ratio(speed, samples.mib_s(case, roles.raw))
                row["fp/relay"] = ratio(speed, samples.mib_s(case, roles.relay))
                row["fp/ipp"] = ratio(speed, samples.mib_s(case, roles.ipp))
                row["fp/dask"] = ratio(speed, best_dask)
                row["fp/copy"] = ratio(speed, samples.mib_s(copy_case, roles.copy))
                row["targets"] = _targets(case, label, roles, row)
            notes = [series.failure, samples.notes.get(label, "")]
            row["note"] = "; ".join(filter(None, notes))
            out.append(row)
    return out
