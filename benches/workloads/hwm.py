"""Choosing the scheduler's default HWM: throughput of no-op tasks and balance of uneven tasks
for ``--hwm`` 0 (unlimited), 1, 2 and 4 (strict: an explicit ``--hwm`` has no adaptive budget)
and for the default (HWM 1 with the adaptive 2 ms queue budget), one 2-engine ferroparallel
cluster per setting."""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

from ferroparallel.serialize import interactive

NAME = "hwm"
#: The row of the default setting (HWM 1 plus the adaptive queue budget).
DEFAULT = "1 + 2 ms budget (default)"
#: The previous default, for comparison.
HWM2_BUDGET = "2 + 2 ms budget"
#: The head-of-line case: one long task, then short ones (the other engine is free).
LONG_S, SHORT_S, N_SHORT = 1.0, 0.05, 10


@interactive  # pickled by value: the engines need not import this module
def _noop(*_: Any) -> None:
    return None


@interactive
def _sleep(t: float) -> float:
    import time as _t

    _t.sleep(t)
    return t


def _measure(hwm: int | str, n_noop: int, durations: list[float]) -> dict[str, Any]:
    import ferroparallel as ipp

    if hwm == DEFAULT:
        args: list[str] = []
    elif hwm == HWM2_BUDGET:
        args = ["--hwm", "2", "--hwm-budget", "2"]
    else:
        args = ["--hwm", str(hwm)]
    cluster = ipp.Cluster(n=2, controller_args=args)
    try:
        rc = cluster.start_and_connect_sync()
        lview = rc.load_balanced_view()
        lview.map_sync(_noop, range(200))
        t0 = time.perf_counter()
        ars = [lview.apply_async(_noop) for _ in range(n_noop)]
        for ar in ars:
            ar.get(timeout=120)
        rate = n_noop / (time.perf_counter() - t0)
        # Balance: uneven tasks; the ideal makespan is half the total work on 2 engines.
        t1 = time.perf_counter()
        ars = [lview.apply_async(_sleep, d) for d in durations]
        for ar in ars:
            ar.get(timeout=120)
        makespan = time.perf_counter() - t1
        ideal = max(sum(durations) / 2, max(durations))
        # Head of line: a long task, then short ones submitted at once; the free engine should
        # run all the short ones (ideal: N_SHORT * SHORT_S) instead of one waiting behind
        # the long task.
        t2 = time.perf_counter()
        long_ar = lview.apply_async(_sleep, LONG_S)
        shorts = [lview.apply_async(_sleep, SHORT_S) for _ in range(N_SHORT)]
        for ar in shorts:
            ar.get(timeout=120)
        shorts_done = time.perf_counter() - t2
        long_ar.get(timeout=120)
        return {
            "hwm": hwm,
            "noop_tasks_per_s": round(rate),
            "uneven_makespan_s": round(makespan, 3),
            "ideal_s": round(ideal, 3),
            "balance_overhead": round(makespan / ideal, 2),
            "short_behind_long_s": round(shorts_done, 3),
            "short_ideal_s": round(N_SHORT * SHORT_S, 3),
        }
    finally:
        cluster.stop_cluster_sync()


def run(quick: bool) -> list[dict[str, Any]]:
    """One row per HWM setting."""
    os.environ.setdefault("FERROPARALLEL_DIR", tempfile.mkdtemp(prefix="fp-bench-hwm-"))
    rng = random.Random(42)
    # A few long tasks submitted first among many short ones: eager assignment (hwm 0) can
    # queue short tasks behind long ones on one engine while the other idles.
    durations = [0.4, 0.4, 0.4] + [rng.uniform(0.0, 0.04) for _ in range(60 if quick else 120)]
    rng.shuffle(durations)
    n_noop = 4000 if quick else 20000
    return [_measure(h, n_noop, durations) for h in (0, 1, 2, 4, HWM2_BUDGET, DEFAULT)]
