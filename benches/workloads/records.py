"""What the hub's task records cost: load-balanced no-op throughput with ``--db memory``,
``--db sqlite`` and ``--db none`` (one 2-engine cluster each, taking turns), and the time of
``db_query`` / ``hub_history`` over 100,000 records (10,000 with ``--quick``) on the memory and
SQLite backends."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from ferroparallel.serialize import interactive

NAME = "records"
BACKENDS = ("none", "memory", "sqlite")


@interactive  # pickled by value: the engines need not import this module
def _noop(*_: Any) -> None:
    return None


def _rate(lview: Any, n: int) -> float:
    t0 = time.perf_counter()
    ars = [lview.apply_async(_noop) for _ in range(n)]
    for ar in ars:
        ar.get(timeout=300)
    return n / (time.perf_counter() - t0)


def _fill(lview: Any, n: int) -> None:
    """Submit no-op tasks until ``n`` more records exist (in batches, to bound memory)."""
    left = n
    while left:
        k = min(left, 10_000)
        ars = [lview.apply_async(_noop) for _ in range(k)]
        for ar in ars:
            ar.get(timeout=300)
        left -= k


def _time(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls, and the last result."""
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _queries(db: str, rc: Any, n_records: int, mid: datetime) -> dict[str, Any]:
    history_s, hist = _time(rc.hub_history, 3)
    one_id = hist[len(hist) // 2]
    by_id_s, _ = _time(lambda: rc.db_query({"msg_id": one_id}), 20)
    range_s, rows = _time(lambda: rc.db_query({"completed": {"$gt": mid}}, keys=["completed"]), 3)
    scan_s, none_rows = _time(
        lambda: rc.db_query({"engine_uuid": {"$glob": "no-such-engine*"}}, keys=["msg_id"]), 3
    )
    full_s, full = _time(lambda: rc.db_query({"msg_id": {"$in": hist[:1000]}}), 3)
    return {
        "case": f"db_query --db {db}",
        "records": len(hist),
        "hub_history_ms": round(history_s * 1e3, 1),
        "by_msg_id_ms": round(by_id_s * 1e3, 2),
        "date_range_ms": round(range_s * 1e3, 1),
        "date_range_rows": len(rows),
        "full_scan_no_match_ms": round(scan_s * 1e3, 1),
        "in_1000_all_fields_ms": round(full_s * 1e3, 1),
        "note": f"{n_records} records requested; {len(none_rows)} scan rows, {len(full)} in-rows",
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """Throughput rows per backend (best of the rounds), then db_query rows."""
    import ferroparallel as ipp

    os.environ.setdefault("FERROPARALLEL_DIR", tempfile.mkdtemp(prefix="fp-bench-records-"))
    n_tasks = 4_000 if quick else 20_000
    n_records = 10_000 if quick else 100_000
    rounds = 1 if quick else 3
    clusters: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        for db in BACKENDS:
            c = ipp.Cluster(
                n=2,
                cluster_id=f"bench-records-{db}",
                controller_args=[
                    "--db",
                    db,
                    "--db-record-limit",
                    str(4 * n_records + 10 * n_tasks),
                ],
            )
            clusters[db] = c
            clients[db] = c.start_and_connect_sync()
            clients[db].wait_for_engines(2, timeout=60)
            clients[db].load_balanced_view().map_sync(_noop, range(200))
        rates: dict[str, list[float]] = {db: [] for db in BACKENDS}
        for _ in range(rounds):  # take turns, so machine noise hits every backend alike
            for db in BACKENDS:
                rates[db].append(_rate(clients[db].load_balanced_view(), n_tasks))
        base = max(rates["none"])
        for db in BACKENDS:
            best = max(rates[db])
            rows.append(
                {
                    "case": f"lb throughput --db {db}",
                    "tasks": n_tasks,
                    "tasks_per_s": round(best),
                    "vs_none": round(best / base, 3),
                    "all_rounds": [round(r) for r in rates[db]],
                }
            )
        # only one cluster at a time from here
        clients.pop("none").close()
        clusters.pop("none").stop_cluster_sync()
        for db in ("memory", "sqlite"):
            rc = clients[db]
            lview = rc.load_balanced_view()
            have = len(rc.hub_history())
            half = max(0, n_records - have) // 2
            _fill(lview, half)
            mid = datetime.now(UTC)
            _fill(lview, max(0, n_records - have - half))
            rows.append(_queries(db, rc, n_records, mid))
    finally:
        for rc in clients.values():
            rc.close()
        for c in clusters.values():
            c.stop_cluster_sync()
    return rows
