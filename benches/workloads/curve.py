"""What CurveZMQ encryption costs: the same ferroparallel work with and without ``--curve``.

Two 2-engine ferroparallel clusters run side by side, ``Cluster(n=2, curve=False)`` and
``Cluster(n=2, curve=True)`` (every socket of controller, engines and client encrypted), and
take turns in every round, so load from other processes hits both alike. Measured:

- ``roundtrip``: µs per ``rc[0].apply_sync(noop)`` (median, p10, p90; 2,000 calls, 300 with
  ``--quick``), every call timed on its own;
- ``lb map``: no-op tasks/s end to end of ``lview.map(noop, range(N), chunksize=1)`` (N =
  10,000, 2,000 with ``--quick``; best of the rounds);
- ``push+pull``: MiB/s of ``rc[0].push({"x": payload})`` followed by ``rc[0].pull("x")`` of a
  ``bytes`` payload (32 MiB, 8 MiB with ``--quick``), i.e. the payload crosses client ->
  controller -> engine and back (best of the rounds).

``ratio`` is curve / plain: above 1 for the round trip means CURVE is slower; below 1 for the
rates means CURVE is slower.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _frameworks import (  # noqa: E402
    descendants,
    gc_paused,
    isolated_env,
    label,
    median,
    percentile,
    ratio,
    reap,
)
from _tasks import noop  # noqa: E402

NAME = "curve"

ROUNDS = 5
MiB = 1 << 20


@contextlib.contextmanager
def _clusters() -> Iterator[dict[str, Any]]:
    """``{"plain": client, "curve": client}`` of two running 2-engine clusters."""
    import ferroparallel

    before = descendants()
    started: list[tuple[Any, Any]] = []
    try:
        clients = {}
        for name, curve in (("plain", False), ("curve", True)):
            cluster = ferroparallel.Cluster(n=2, curve=curve, cluster_id=f"bench-{name}")
            started.append((cluster, None))
            rc = cluster.start_and_connect_sync()
            started[-1] = (cluster, rc)
            if bool(rc._connection_info.get("curve_serverkey")) != curve:
                raise RuntimeError(f"{name}: the connection file does not match curve={curve}")
            rc[:].apply_sync(noop)
            clients[name] = rc
        yield clients
    finally:
        for cluster, rc in reversed(started):
            with contextlib.suppress(Exception):
                if rc is not None:
                    rc.close()
            with contextlib.suppress(Exception):
                cluster.stop_cluster_sync()
        reap(before)


def _roundtrips(rc: Any, n: int) -> list[float]:
    view = rc[0]
    out = []
    with gc_paused():
        for _ in range(n):
            t0 = time.perf_counter()
            view.apply_sync(noop)
            out.append(time.perf_counter() - t0)
    return out


def _lb_map(rc: Any, n: int) -> float:
    lview = rc.load_balanced_view()
    with gc_paused():
        t0 = time.perf_counter()
        got = lview.map(noop, range(n), chunksize=1, block=False).get()
        dt = time.perf_counter() - t0
    if len(got) != n:
        raise RuntimeError(f"lb map: {len(got)} results for {n} tasks")
    rc.purge_local_results("all")
    return n / dt


def _push_pull(rc: Any, payload: bytes) -> float:
    view = rc[0]
    with gc_paused():
        t0 = time.perf_counter()
        view.push({"x": payload}, block=True)
        back = view.pull("x", block=True)
        dt = time.perf_counter() - t0
    if len(back) != len(payload):
        raise RuntimeError("push+pull: the payload came back with another length")
    view.execute("del x", block=True)
    return 2 * len(payload) / MiB / dt


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure; one row per (metric, variant)."""
    n_rt = 300 if quick else 2000
    n_map = 2000 if quick else 10000
    size = (8 if quick else 32) * MiB
    payload = bytes(range(256)) * (size // 256)
    rt: dict[str, list[float]] = {"plain": [], "curve": []}
    maps: dict[str, list[float]] = {"plain": [], "curve": []}
    bw: dict[str, list[float]] = {"plain": [], "curve": []}
    with isolated_env(), _clusters() as clients:
        for rc in clients.values():  # warm-up
            _roundtrips(rc, 50)
            _push_pull(rc, payload[:MiB])
        for r in range(ROUNDS):
            order = list(clients.items())
            if r % 2:
                order.reverse()
            for name, rc in order:
                rt[name] += _roundtrips(rc, n_rt // ROUNDS)
                maps[name].append(_lb_map(rc, n_map // ROUNDS))
                bw[name].append(_push_pull(rc, payload))
                gc.collect()
    version = label("ferroparallel")
    rows: list[dict[str, Any]] = []
    base_rt = median(rt["plain"]) * 1e6
    for name in ("plain", "curve"):
        med = median(rt[name]) * 1e6
        rows.append(
            {
                "metric": "roundtrip apply_sync(noop)",
                "variant": f"{version} {name}",
                "n": len(rt[name]),
                "median_us": med,
                "p10_us": percentile(rt[name], 10) * 1e6,
                "p90_us": percentile(rt[name], 90) * 1e6,
                "rate": None,
                "ratio": ratio(med, base_rt),
            }
        )
    for metric, data, unit in (
        ("lb map noop (tasks/s)", maps, n_map // ROUNDS),
        (f"push+pull {size // MiB} MiB (MiB/s)", bw, size // MiB),
    ):
        best_plain = max(data["plain"])
        for name in ("plain", "curve"):
            best = max(data[name])
            rows.append(
                {
                    "metric": metric,
                    "variant": f"{version} {name}",
                    "n": unit,
                    "median_us": None,
                    "p10_us": None,
                    "p90_us": None,
                    "rate": best,
                    "ratio": ratio(best, best_plain),
                }
            )
    return rows
