"""Cluster start-and-connect time with 2 engines, until usable; and stop time.

For each framework, repeated (3 times, once with ``--quick``), the frameworks taking turns in each
repetition:

- ferroparallel: ``Cluster(n=2).start_and_connect_sync()``, then ``rc[:].apply_sync(noop)``;
- ipyparallel: the same calls (its default local-process launchers);
- Dask: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` + ``Client`` +
  ``wait_for_workers(2)``, then ``client.submit(noop, pure=False).result()``.

``start_s`` is until the client is connected with both engines registered, ``first_s`` the
first no-op after that, ``usable_s`` their sum; ``stop_s`` is ``rc.close()`` +
``cluster.stop_cluster_sync()`` (Dask: ``client.close()`` + ``cluster.close()``). Medians over
the repetitions. Importing the framework in the client process is not counted (done before);
everything the engine processes import is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _frameworks import (  # noqa: E402
    FRAMEWORKS,
    Running,
    isolated_env,
    label,
    median,
    missing,
    ratio,
    start,
)

NAME = "startup"


def run(quick: bool) -> list[dict[str, Any]]:
    """Start and stop each framework's 2-engine cluster a few times.

    Parameters
    ----------
    quick : bool
        1 repetition instead of 3.

    Returns
    -------
    list of dict
        One row per framework: median ``start_s``, ``first_s``, ``usable_s``, ``stop_s``, the
        best ``usable_s``, and ``ratio`` = ferroparallel's median ``usable_s`` / this one's
        (below 1: ferroparallel is ready sooner).
    """
    reps = 1 if quick else 3
    samples: dict[str, list[Running]] = {name: [] for name in FRAMEWORKS}
    with isolated_env():
        why = {name: missing(name) for name in FRAMEWORKS}
        for _ in range(reps):
            for name in FRAMEWORKS:
                if why[name] is not None:
                    continue
                cluster = start(name)
                try:
                    pass  # usable: start() ran the first no-op on every engine
                finally:
                    cluster.stop()
                samples[name].append(cluster)

    fp_usable = median([r.usable_s for r in samples["ferroparallel"]])
    rows: list[dict[str, Any]] = []
    for name in FRAMEWORKS:
        runs = samples[name]
        if not runs:
            rows.append({"framework": label(name), "note": why[name] or "no run"})
            continue
        usable = median([r.usable_s for r in runs])
        killed = sum(r.killed for r in runs)
        rows.append(
            {
                "framework": label(name),
                "reps": len(runs),
                "start_s": median([r.start_s for r in runs]),
                "first_s": median([r.first_s for r in runs]),
                "usable_s": usable,
                "usable_min_s": min(r.usable_s for r in runs),
                "stop_s": median([r.stop_s or 0.0 for r in runs]),
                "ratio": ratio(fp_usable, usable),
                "note": f"{killed} leftover process(es) killed" if killed else "",
            }
        )
    return rows
