"""CPU and wall time of one round of large blocking push/pull (decision 0016, v3 amendment).

Starts a 2-engine cluster, then for 128 MiB (3 times) and 512 MiB (2 times) measures
``rc[:1].push({'a': a}, block=True)`` and ``rc[:1].pull('a', block=True)`` after one warm-up
of each: wall time and the CPU (utime + stime from ``/proc/<pid>/stat``, Linux only) of the
client, the controller and the engines per op. Prints one line ``RESULT <label> <json>``.
Run it with ``FERROPARALLEL_SHM=0`` for the socket path, alternating two builds (their
``PYTHONPATH``) to compare them on a noisy machine::

    for i in 1 2 3 4; do for b in old new; do
        FERROPARALLEL_SHM=0 PYTHONPATH=<$b>/python python benches/ab_stream_cpu.py $b
    done; done
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import ferroparallel as ipp

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User + system seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / _TICK


def main(label: str) -> None:
    """Run one round and print its rows (``{case: [[cpu_s, wall_s], ...]}``)."""
    cluster = ipp.Cluster(n=2, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=60)
        pids = [os.getpid(), cluster.controller.process.pid]
        pids += [p.pid for es in cluster.engines.values() for p in es.processes]
        out: dict[str, list[tuple[float, float]]] = {}
        for mib, reps in [(128, 3), (512, 2)]:
            a = np.ones(mib << 20, dtype=np.uint8)
            rc[:1].push({"a": a}, block=True)
            rc[:1].pull("a", block=True)
            for op in ("push", "pull"):
                rows = []
                for _ in range(reps):
                    c0, t0 = sum(map(_cpu, pids)), time.perf_counter()
                    if op == "push":
                        rc[:1].push({"a": a}, block=True)
                    else:
                        rc[:1].pull("a", block=True)
                    t1, c1 = time.perf_counter(), sum(map(_cpu, pids))
                    rows.append((c1 - c0, t1 - t0))
                out[f"{op} {mib} MiB"] = rows
            del a
        print("RESULT", label, json.dumps(out), flush=True)
    finally:
        rc.close()
        cluster.stop_cluster_sync()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
