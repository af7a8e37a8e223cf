"""``ferroparallel demo``: start a local cluster, do real work on it, report, and stop.

Runs a Monte Carlo estimate of pi as load-balanced tasks (with a progress bar), moves a large
NumPy array to every engine and back, shows which engine ran what and how fast, then stops the
cluster, leaving no process behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence


def _sample(n: int, seed: int) -> int:
    """Count random points of the unit square inside the quarter circle."""
    import random

    rng = random.Random(seed)
    inside = 0
    for _ in range(n):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


def _whoami() -> tuple[str, int]:
    import os as _os
    import socket as _socket

    return _socket.gethostname(), _os.getpid()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ferroparallel demo", description=__doc__)
    parser.add_argument(
        "-n", type=int, default=os.cpu_count() or 2, help="engines (default: cores)"
    )
    parser.add_argument("--tasks", type=int, default=200, help="Monte Carlo tasks")
    parser.add_argument("--samples", type=int, default=20_000, help="samples per task")
    parser.add_argument("--mib", type=int, default=64, help="array size for the data round trip")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.n < 1 or args.tasks < 1 or args.samples < 1 or args.mib < 1:
        parser.error("-n, --tasks, --samples and --mib must be positive")

    import ferroparallel as ipp

    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=args.n)
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(args.n, timeout=60)
        started = time.perf_counter() - t0
        print(f"started a local cluster with {len(rc)} engines in {started:.2f} s")
        where = rc[:].apply_sync(_whoami)
        for eid, (host, pid) in zip(rc.ids, where, strict=True):
            print(f"  engine {eid}: pid {pid} on {host}")

        lview = rc.load_balanced_view()
        t1 = time.perf_counter()
        ar = lview.map_async(_sample, [args.samples] * args.tasks, range(args.tasks))
        ar.wait_interactive()
        inside = sum(ar.get())
        elapsed = time.perf_counter() - t1
        total = args.tasks * args.samples
        per_engine = Counter(md["engine_id"] for md in ar.metadata)
        print(
            f"pi ~= {4 * inside / total:.5f} from {total:,} samples in {args.tasks} tasks, "
            f"{elapsed:.2f} s ({args.tasks / elapsed:,.0f} tasks/s)"
        )
        print(
            "  tasks per engine: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_engine.items()))
        )

        try:
            import numpy as np
        except ImportError:
            print("numpy is not installed: skipping the array round trip")
        else:
            a = np.random.default_rng(0).random(args.mib * 2**20 // 8)
            dview = rc[:]
            t2 = time.perf_counter()
            dview.push({"a": a}, block=True)
            pushed = time.perf_counter() - t2
            sums = dview.apply_sync(lambda: float(a.sum()))  # noqa: F821 - pushed name
            t3 = time.perf_counter()
            back = rc[0].pull("a", block=True)
            pulled = time.perf_counter() - t3
            ok = np.array_equal(back, a) and all(
                abs(s - float(a.sum())) < 1e-6 * abs(s) for s in sums
            )
            mib = a.nbytes / 2**20
            print(
                f"array round trip ({mib:.0f} MiB): push to {len(rc)} engines {pushed:.2f} s, "
                f"pull {pulled:.2f} s ({mib / pulled:,.0f} MiB/s), "
                f"{'correct' if ok else 'MISMATCH'}"
            )
            if not ok:
                return 1
    finally:
        cluster.stop_cluster_sync()
    print(f"cluster stopped; total {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
