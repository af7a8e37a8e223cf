"""Where the CPU time of a no-op task goes, process by process and thread by thread.

Runs ``N`` = 20,000 (4,000 with ``--quick``) no-op calls on a 2-engine ferroparallel cluster,
submitted then collected as in the ``throughput`` workload, for ``rc[0].apply_async``,
``rc[:].apply_async`` (one call runs on both engines: its rows are per call, i.e. per two
tasks), ``lview.apply_async`` and load-balanced maps (chunksize 1, blocking or not, and 100: per
item), and reads every thread's CPU time and context switches from ``/proc`` before and after
(Linux only). One row per thread that used at least 0.5 µs per task, plus a
``total`` row per pattern: on a machine whose cores are all busy during the run, the total CPU
per task bounds the throughput (2 cores / total), so this table says where a microsecond saved
counts.

Thread names: ``main`` and ``dispatcher`` are the client's Python threads; ``io`` is a Rust I/O
thread (the client's receiver, the controller's router); ``zmq`` is libzmq's I/O thread of that
process (it inherits the name of the thread that created the ZMQ context, so it is told apart
by creation order); an engine's ``main`` runs the tasks and uses its shell sockets itself.
Columns: ``cpu_us`` (user + system time per task), ``vcsw`` and ``ivcsw`` (voluntary and
involuntary context switches per task; a voluntary one is a thread going to sleep, usually to
be woken by another, which costs both sides several microseconds on a VM).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _frameworks import gc_paused, isolated_env, missing  # noqa: E402
from _tasks import noop  # noqa: E402

NAME = "cpu"

#: Threads below this many µs per task are left out of the table (they are in the total).
SHOWN_US = 0.5


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[int, tuple[str, float, int, int]]:
    """``{tid: (comm, cpu seconds, voluntary, involuntary switches)}`` of process ``pid``."""
    out = {}
    base = Path(f"/proc/{pid}/task")
    for task in base.iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        cpu = (int(stat[11]) + int(stat[12])) / _ticks()
        vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[int(task.name)] = (comm, cpu, vol, invol)
    return out


def _processes(cluster: Any) -> dict[str, int]:
    """``{role: pid}``: the client (this process), the controller, the engines."""
    roles = {"client": os.getpid(), "controller": cluster.controller.process.pid}
    engines = [p for es in cluster.engines.values() for p in es.processes]
    for i, proc in enumerate(engines):
        roles[f"engine #{i}"] = proc.pid  # in launch order, not engine ids
    return roles


def _labels(role: str, threads: dict[int, tuple[str, float, int, int]], client: Any) -> dict:
    """Readable names for the threads of one process (see the module docstring)."""
    names: dict[int, str] = {}
    if role == "client":
        import threading

        names[threading.main_thread().native_id] = "main"
        names[client._dispatcher.native_id] = "dispatcher"
    elif threads:
        names[min(threads)] = "main"
    seen: dict[str, int] = {}
    for tid in sorted(threads):
        if tid in names:
            continue
        comm = threads[tid][0]
        k = seen.get(comm, 0)
        seen[comm] = k + 1
        if comm.startswith("ferroparallel"):
            names[tid] = "io" if k == 0 else "zmq"
        elif comm == "python" and role == "controller":
            names[tid] = "zmq"  # created by the controller's main thread
        else:
            names[tid] = comm
    return names


def _apply_each(view: Any, n: int) -> None:
    apply = view.apply_async
    for ar in [apply(noop) for _ in range(n)]:
        ar.get()


#: The measured patterns: ``{name: run(rc, n)}``, each submitting ``n`` no-op calls and
#: collecting every result (a map: ``n`` items; the chunked one sends ``n / 100`` tasks, so it
#: runs with ``ITEMS_PER_CHUNKED_TASK`` times more items: CPU times are counted in 10 ms ticks).
PATTERNS: dict[str, Callable[[Any, int], None]] = {
    "rc[0].apply_async(noop)": lambda rc, n: _apply_each(rc[0], n),
    "rc[:].apply_async(noop)": lambda rc, n: _apply_each(rc[:], n),
    "lview.apply_async(noop)": lambda rc, n: _apply_each(rc.load_balanced_view(), n),
    "lview.map(noop, range(N))": lambda rc, n: (
        rc.load_balanced_view().map_async(noop, range(n), chunksize=1).get()
    ),
    "lview.map_sync(noop, range(N))": lambda rc, n: rc.load_balanced_view().map_sync(
        noop, range(n), chunksize=1
    ),
    "lview.map(noop, range(N), chunksize=100)": lambda rc, n: (
        rc.load_balanced_view().map_async(noop, range(n), chunksize=100).get()
    ),
}


#: Items per task of the chunked map pattern, which runs that many times more items.
ITEMS_PER_CHUNKED_TASK = 100


def _measure(rc: Any, roles: dict[str, int], pattern: str, n: int) -> list[dict[str, Any]]:
    """Per-thread CPU of ``pattern`` run with ``n`` items (per item, for the maps)."""
    run_pattern = PATTERNS[pattern]
    if "chunksize" in pattern:
        n *= ITEMS_PER_CHUNKED_TASK
    run_pattern(rc, min(n, 2000))  # warm up
    rc.purge_local_results("all")
    time.sleep(0.5)
    before = {role: _threads(pid) for role, pid in roles.items()}
    with gc_paused():
        t0 = time.perf_counter()
        run_pattern(rc, n)
        wall = time.perf_counter() - t0
    after = {role: _threads(pid) for role, pid in roles.items()}
    rc.purge_local_results("all")
    rows = []
    total = [0.0, 0.0, 0.0]
    for role in roles:
        names = _labels(role, after[role], rc)
        for tid, (_comm, cpu, vol, invol) in sorted(after[role].items()):
            _, cpu0, vol0, invol0 = before[role].get(tid, ("", 0.0, 0, 0))
            d = ((cpu - cpu0) * 1e6 / n, (vol - vol0) / n, (invol - invol0) / n)
            total = [a + b for a, b in zip(total, d, strict=True)]
            if d[0] >= SHOWN_US:
                rows.append(
                    {
                        "pattern": pattern,
                        "process": role,
                        "thread": names.get(tid, str(tid)),
                        "cpu_us": round(d[0], 1),
                        "vcsw": round(d[1], 2),
                        "ivcsw": round(d[2], 2),
                    }
                )
    rows.append(
        {
            "pattern": pattern,
            "process": "total",
            "thread": f"{n / wall:,.0f} items/s",
            "cpu_us": round(total[0], 1),
            "vcsw": round(total[1], 2),
            "ivcsw": round(total[2], 2),
        }
    )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows of per-thread CPU per task for each pattern, then its total."""
    if not Path("/proc/self/task").is_dir():
        return [{"pattern": "-", "process": "-", "thread": "needs Linux /proc", "cpu_us": None}]
    why = missing("ferroparallel")
    if why:
        return [{"pattern": "-", "process": "-", "thread": why, "cpu_us": None}]
    import ferroparallel as ipp

    n = 4000 if quick else 20000
    rows: list[dict[str, Any]] = []
    with isolated_env():
        cluster = ipp.Cluster(n=2, log_level=40)
        try:
            rc = cluster.start_and_connect_sync()
            rc.wait_for_engines(2, timeout=60)
            roles = _processes(cluster)
            for pattern in PATTERNS:
                rows += _measure(rc, roles, pattern, n)
        finally:
            cluster.stop_cluster_sync()
    return rows
