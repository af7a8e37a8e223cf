"""What a DirectView call costs the client as the number of its engines grows: 1, 2 and 16.

One 16-engine ferroparallel cluster; for a view on 1, 2 and all 16 engines, ``N`` = 2,000
(500 with ``--quick``) ``view.apply_async(noop)`` calls are submitted, then collected. Per
call: the CPU time of the submitting thread (``time.thread_time``, garbage collector paused),
the messages the client handed to its sockets or links (``IoThread.stats()["sent"]``), and
the whole client process's CPU (``/proc``), which includes receiving and resolving one reply
per engine, so that part grows with the engines by necessity. ``per_engine`` rows divide the
process CPU by the engines reached. ``submit_alone`` measures the submission again with every
engine stopped (SIGSTOP), so that no reply competes with the submitting thread for the GIL,
the CPU and its caches. A request to N engines leaves the client as one message
and the controller fans it out (issue 4): the submission columns should not grow with N.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _frameworks import gc_paused, isolated_env, missing  # noqa: E402
from _tasks import noop  # noqa: E402

NAME = "fanout"

ENGINES = 16
TARGETS = (1, 2, 16)


def _process_cpu() -> float:
    """User + system CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def _submit_alone(rc: Any, view: Any, pids: list[int], n: int) -> float:
    """CPU µs per call of submitting ``n`` calls while every engine is stopped (SIGSTOP): no
    reply arrives meanwhile, so the submitting thread shares the process with nobody."""
    apply = view.apply_async
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        cpu0 = time.thread_time()
        ars = [apply(noop) for _ in range(n)]
        cpu = time.thread_time() - cpu0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for ar in ars:
        ar.get(timeout=120)
    return cpu * 1e6 / n


def _measure(rc: Any, k: int, n: int, pids: list[int]) -> dict[str, Any]:
    view = rc[list(range(k))]
    apply = view.apply_async
    [ar.get(timeout=60) for ar in [apply(noop) for _ in range(50)]]  # warm up
    rc.purge_local_results("all")
    sent0 = rc._io.stats()["sent"]
    with gc_paused():
        cpu0, proc0, t0 = time.thread_time(), _process_cpu(), time.perf_counter()
        ars = [apply(noop) for _ in range(n)]
        submit_cpu = time.thread_time() - cpu0
        for ar in ars:
            ar.get(timeout=120)
        wall = time.perf_counter() - t0
        proc = _process_cpu() - proc0
    sent = rc._io.stats()["sent"] - sent0
    rc.purge_local_results("all")
    with gc_paused():
        alone = _submit_alone(rc, view, pids, n)
    rc.purge_local_results("all")
    return {
        "engines": k,
        "calls": n,
        "submit_us_per_call": round(submit_cpu * 1e6 / n, 1),
        "submit_alone_us_per_call": round(alone, 1),
        "messages_per_call": round(sent / n, 2),
        "client_cpu_us_per_call": round(proc * 1e6 / n, 1),
        "client_cpu_us_per_engine": round(proc * 1e6 / n / k, 1),
        "calls_s": round(n / wall, 1),
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """One row per number of engines reached by each call."""
    why = missing("ferroparallel")
    if why:
        return [{"engines": "-", "note": why}]
    import ferroparallel as ipp

    n = 500 if quick else 2000
    rows = []
    with isolated_env():
        cluster = ipp.Cluster(n=ENGINES, log_level=40)
        try:
            rc = cluster.start_and_connect_sync()
            rc.wait_for_engines(ENGINES, timeout=120)
            pids = rc[:].apply_sync(os.getpid)
            for k in TARGETS:
                rows.append(_measure(rc, k, n, pids))
            rc.close()
        finally:
            cluster.stop_cluster_sync()
    base, alone = rows[0]["submit_us_per_call"], rows[0]["submit_alone_us_per_call"]
    for r in rows:
        r["submit_vs_1"] = round(r["submit_us_per_call"] / base, 2) if base else None
        r["alone_vs_1"] = round(r["submit_alone_us_per_call"] / alone, 2) if alone else None
    return rows
