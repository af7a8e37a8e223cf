"""No-op task throughput, direct and load-balanced, vs ipyparallel and Dask (2 engines).

``N`` = 20,000 (4,000 with ``--quick``) calls of each kind:

- direct ``rc[0].apply_async(noop)``, and ``rc[:].apply_async(noop)`` (a DirectView of both
  engines: each call is one task per engine, so N/2 calls make the N tasks), ferroparallel and
  ipyparallel;
- load-balanced ``lview.apply_async(noop)``, the same with ``noop_main`` (a function whose
  module is ``__main__``, as one typed at the prompt: sent by value), and
  ``lview.map(noop, range(N), chunksize=c)`` (non-blocking) with ``c`` = 1 and 100,
  ferroparallel and ipyparallel; and for Dask, as the same load-balanced patterns,
  ``client.submit(noop, pure=False)`` (and of ``noop_main``), ``client.map(noop, range(N),
  pure=False)``, and ``client.map`` of a chunk runner over chunks of 100 (Dask's map has no
  chunksize); rates count items, not chunks.

Four more rows give the floor of the load-balanced patterns: a raw pyzmq DEALER sending the same
number of apply-request-sized messages, pipelined (up to 1,000 in flight), to an echo process,
directly and through a ``zmq.proxy`` relay, over loopback TCP and over abstract Unix sockets
(``ipc``, what a local ferroparallel cluster uses; issue target: load-balanced throughput at
least half the pipelined echo rate).

Two numbers per run: *submit*, the time to return from the submitting loop (or ``map`` call), and
*end to end*, until every result has been fetched (``ar.get()`` of each AsyncResult, ``.get()``
of the map result, ``client.gather``). Rates are tasks per second. ``ratio_*`` columns are
ferroparallel's rate / this row's rate for the same pattern (above 1: ferroparallel is faster);
the Dask rows compare with ferroparallel's load-balanced rows. ferroparallel's rows and the raw
floors are the medians of 3 runs (``RUNS``, ``FLOOR_RUNS``; the ``runs`` column), each column's
median on its own; ipyparallel's and Dask's are single runs that last 20-80 s each.

ferroparallel and ipyparallel run side by side (both clusters up, taking turns per pattern);
Dask afterwards, alone, because an idle Dask cluster keeps about 13% of a core busy, which would
slow the others down on a 2-core machine. The garbage collector is paused during each timed run;
results are purged and the machine left to settle for half a second between runs. A run that
fails (e.g. the client gives up on a controller that does not answer) becomes a row whose note
starts with ``FAILED:`` (traceback on stderr); the other runs still happen.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _frameworks import (  # noqa: E402
    FRAMEWORKS,
    Running,
    gc_paused,
    isolated_env,
    label,
    missing,
    ratio,
    running,
)
from _tasks import noop, noop_chunk, noop_main  # noqa: E402

NAME = "throughput"

#: Pause between timed runs, so that the previous run's tail does not disturb the next.
SETTLE_S = 0.5
#: Timed runs per pattern of the frameworks whose run lasts about a second (ferroparallel, and
#: the raw floors): one such run is at the mercy of a scheduling hiccup on a shared 2-core
#: machine, so the row gives the median of these. ipyparallel and Dask run each pattern once: a
#: run of theirs lasts 20-80 s, which averages the hiccups out by itself (three would add about
#: 15 minutes).
RUNS = {"ferroparallel": 3}
FLOOR_RUNS = 3
#: Items per task of the ``lb map c100`` pattern (``chunksize`` of the map; Dask maps chunks).
CHUNK = 100


@dataclass
class Pattern:
    """One way of submitting ``n`` no-op calls.

    Attributes
    ----------
    key : str
        Short name (the ``pattern`` column).
    call : str
        What is called, for the table.
    fanout : int
        Tasks per call (engines reached by one call); a run makes ``n // fanout`` calls.
    submit : callable
        ``submit(client, n)`` submits ``n`` calls and returns a handle.
    collect : callable
        ``collect(client, handle)`` fetches every result; returns how many there are.
    """

    key: str
    call: str
    fanout: int
    submit: Callable[[Any, int], Any]
    collect: Callable[[Any, Any], int]


#: Seconds a run's results may take in all: a framework that loses a task (ipyparallel 9.2
#: once hung here for good) gives a FAILED row instead of stopping the whole benchmark.
COLLECT_TIMEOUT = 600.0


def _get_each(rc: Any, ars: list[Any]) -> int:
    """``ar.get()`` of every AsyncResult; the number of engine results."""
    deadline = time.monotonic() + COLLECT_TIMEOUT
    count = 0
    for ar in ars:
        value = ar.get(timeout=max(deadline - time.monotonic(), 0.001))
        count += len(value) if isinstance(value, list) else 1
    return count


def _get_map(rc: Any, amr: Any) -> int:
    """The whole map result; its length."""
    return len(amr.get(timeout=COLLECT_TIMEOUT))


def _ipp_patterns(n_engines: int) -> list[Pattern]:
    """The patterns of ferroparallel and ipyparallel (same API)."""

    def direct_one(rc: Any, n: int) -> list[Any]:
        apply = rc[0].apply_async
        return [apply(noop) for _ in range(n)]

    def direct_all(rc: Any, n: int) -> list[Any]:
        apply = rc[:].apply_async
        return [apply(noop) for _ in range(n)]

    def lb_apply(rc: Any, n: int) -> list[Any]:
        apply = rc.load_balanced_view().apply_async
        return [apply(noop) for _ in range(n)]

    def lb_apply_main(rc: Any, n: int) -> list[Any]:
        apply = rc.load_balanced_view().apply_async
        return [apply(noop_main) for _ in range(n)]

    def lb_map(rc: Any, n: int) -> Any:
        return rc.load_balanced_view().map(noop, range(n), chunksize=1, block=False)

    def lb_map_100(rc: Any, n: int) -> Any:
        return rc.load_balanced_view().map(noop, range(n), chunksize=CHUNK, block=False)

    return [
        Pattern("direct rc[0]", "rc[0].apply_async(noop)", 1, direct_one, _get_each),
        Pattern("direct rc[:]", "rc[:].apply_async(noop)", n_engines, direct_all, _get_each),
        Pattern("lb submit", "lview.apply_async(noop)", 1, lb_apply, _get_each),
        Pattern("lb main", "lview.apply_async(noop_main)", 1, lb_apply_main, _get_each),
        Pattern("lb map", "lview.map(noop, range(N), chunksize=1)", 1, lb_map, _get_map),
        Pattern(
            "lb map c100", f"lview.map(noop, range(N), chunksize={CHUNK})", 1, lb_map_100, _get_map
        ),
    ]


def _dask_patterns() -> list[Pattern]:
    """Dask's equivalents of the load-balanced patterns."""

    def submit(client: Any, n: int) -> list[Any]:
        sub = client.submit
        return [sub(noop, pure=False) for _ in range(n)]

    def submit_main(client: Any, n: int) -> list[Any]:
        sub = client.submit
        return [sub(noop_main, pure=False) for _ in range(n)]

    def map_(client: Any, n: int) -> list[Any]:
        return client.map(noop, range(n), pure=False)

    def map_chunks(client: Any, n: int) -> list[Any]:
        chunks = [range(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
        return client.map(noop_chunk, chunks, pure=False)

    def gather(client: Any, futures: list[Any]) -> int:
        return len(client.gather(futures))

    def gather_chunks(client: Any, futures: list[Any]) -> int:
        return sum(len(chunk) for chunk in client.gather(futures))

    return [
        Pattern("lb submit", "client.submit(noop, pure=False)", 1, submit, gather),
        Pattern("lb main", "client.submit(noop_main, pure=False)", 1, submit_main, gather),
        Pattern("lb map", "client.map(noop, range(N), pure=False)", 1, map_, gather),
        Pattern(
            "lb map c100",
            f"client.map(noop_chunk, <chunks of {CHUNK}>, pure=False)",
            1,
            map_chunks,
            gather_chunks,
        ),
    ]


def _purge(cluster: Running) -> str:
    """Forget the finished results held by the client, so runs do not pile up memory.

    Returns
    -------
    str
        ``""``, or why the purge failed (for the ``note`` column). ``purge_local_results`` is
        retried: ferroparallel 0.1.0's iterates its futures without the client lock and can
        raise ``RuntimeError`` while late messages are still being handled.
    """
    if cluster.name == "dask":
        return ""
    error: Exception | None = None
    for _ in range(5):
        try:
            cluster.client.purge_local_results("all")
            return ""
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            error = e
            time.sleep(0.1)
    return f"purge_local_results failed: {type(error).__name__}: {error}"


def _measure(cluster: Running, pattern: Pattern, n: int) -> dict[str, Any]:
    """Time one run of ``pattern`` (``n`` tasks) on ``cluster``; one row (without ratios)."""
    client = cluster.client
    calls = n // pattern.fanout
    tasks = calls * pattern.fanout
    with gc_paused():
        t0 = time.perf_counter()
        handle = pattern.submit(client, calls)
        t1 = time.perf_counter()
        got = pattern.collect(client, handle)
        t2 = time.perf_counter()
    if got != tasks:
        raise RuntimeError(f"{cluster.label} {pattern.key}: {got} results for {tasks} tasks")
    del handle
    note = _purge(cluster)
    gc.collect()
    time.sleep(SETTLE_S)
    return {
        "pattern": pattern.key,
        "framework": cluster.label,
        "call": pattern.call,
        "calls": calls,
        "tasks": tasks,
        "submit_tasks_s": tasks / (t1 - t0),
        "e2e_tasks_s": tasks / (t2 - t0),
        "e2e_s": t2 - t0,
        "note": note,
    }


def _wait_idle(cluster: Running, timeout: float = 120.0) -> bool:
    """Wait until the cluster has no queued or running task (ferroparallel, ipyparallel).

    Returns
    -------
    bool
        Whether it became idle within ``timeout`` seconds (Dask: always True).
    """
    if cluster.name == "dask":
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = cluster.client.queue_status()
            busy = status.get("unassigned", 0) + sum(
                v.get("queue", 0) + v.get("tasks", 0)
                for v in status.values()
                if isinstance(v, dict)
            )
            if busy == 0:
                return True
        except Exception:  # noqa: BLE001 - a client that lost its controller: retry
            pass
        time.sleep(1.0)
    return False


def _measure_or_report(cluster: Running, pattern: Pattern, n: int) -> dict[str, Any]:
    """:func:`_measure`, or a row saying why it failed (traceback on stderr).

    After a failure the cluster is given time to finish the tasks it still has, so that they
    do not disturb the next measurement.
    """
    try:
        return _measure(cluster, pattern, n)
    except Exception as e:  # noqa: BLE001 - a failed row beats losing the whole table
        traceback.print_exc()
        note = f"FAILED: {type(e).__name__}: {e}"
        if not _wait_idle(cluster):
            note += " (still busy 120 s later)"
        _purge(cluster)
        calls = n // pattern.fanout
        return {
            "pattern": pattern.key,
            "framework": cluster.label,
            "call": pattern.call,
            "calls": calls,
            "tasks": calls * pattern.fanout,
            "submit_tasks_s": math.nan,
            "e2e_tasks_s": math.nan,
            "e2e_s": math.nan,
            "note": note,
        }


def _measure_runs(cluster: Running, pattern: Pattern, n: int, quick: bool) -> dict[str, Any]:
    """:func:`_measure_or_report` ``RUNS[name]`` times (once with ``quick``); the median of
    each rate, and the ``runs`` that went into it (a failed run makes the row a failure)."""
    runs = 1 if quick else RUNS.get(cluster.name, 1)
    rows = [_measure_or_report(cluster, pattern, n) for _ in range(runs)]
    failed = [r for r in rows if str(r["note"]).startswith("FAILED")]
    if failed:
        return {**failed[0], "runs": runs}
    out = dict(rows[0])
    for key in ("submit_tasks_s", "e2e_tasks_s"):
        out[key] = statistics.median(r[key] for r in rows)
    out["e2e_s"] = out["tasks"] / out["e2e_tasks_s"]
    out["note"] = "; ".join(dict.fromkeys(filter(None, (r["note"] for r in rows))))
    out["runs"] = runs
    return out


def _warm_up(cluster: Running, patterns: list[Pattern]) -> None:
    """A short untimed run of every pattern (imports, connections, caches)."""
    for pattern in patterns:
        handle = pattern.submit(cluster.client, 50)
        pattern.collect(cluster.client, handle)
    _purge(cluster)


def _raw_floors(n: int, runs: int = 1) -> list[dict[str, Any]]:
    """The pipelined floor: ``n`` apply-request-sized echoes through a raw pyzmq DEALER with
    up to 1,000 in flight, to an echo process directly and through a ``zmq.proxy`` relay (the
    client -> controller -> engine topology), the median of ``runs`` runs. Compared with the
    load-balanced rows."""
    import zmq
    from roundtrip import pipelined_rate, pyzmq_sockets

    rows = []
    for transport in ("tcp", "ipc"):
        with pyzmq_sockets(transport) as (frames, direct, relayed):
            for sock, call in ((direct, "DEALER->ROUTER echo"), (relayed, "echo via zmq.proxy")):
                pipelined_rate(sock, frames, min(n, 2_000))  # warm up
                rate = statistics.median(pipelined_rate(sock, frames, n) for _ in range(runs))
                row = _floor_row(f"{call} ({transport})", n, rate, zmq.__version__)
                rows.append({**row, "runs": runs})
    return rows


def _floor_row(call: str, n: int, rate: float, version: str) -> dict[str, Any]:
    return {
        "pattern": "lb submit",
        "framework": f"raw pyzmq {version}",
        "call": f"{call}, pipelined (1,000 in flight)",
        "calls": n,
        "tasks": n,
        "submit_tasks_s": math.nan,
        "e2e_tasks_s": rate,
        "e2e_s": n / rate,
        "note": "floor: no Python work per message",
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure every pattern of every installed framework once.

    Parameters
    ----------
    quick : bool
        4,000 tasks per pattern instead of 20,000.

    Returns
    -------
    list of dict
        One row per pattern and framework, grouped by pattern; a row with a note for a peer
        that is not installed.
    """
    n = 4_000 if quick else 20_000
    measured: list[dict[str, Any]] = []
    with isolated_env():
        why = {name: missing(name) for name in FRAMEWORKS}
        quiet = [name for name in ("ferroparallel", "ipyparallel") if why[name] is None]
        if quiet:
            with running(quiet) as clusters:
                patterns = _ipp_patterns(n_engines=2)
                for cluster in clusters.values():
                    _warm_up(cluster, patterns)
                for pattern in patterns:
                    for cluster in clusters.values():
                        measured.append(_measure_runs(cluster, pattern, n, quick))
        measured.extend(_raw_floors(n, 1 if quick else FLOOR_RUNS))
        if why["dask"] is None:
            with running(["dask"]) as clusters:
                patterns = _dask_patterns()
                _warm_up(clusters["dask"], patterns)
                for pattern in patterns:
                    row = _measure_runs(clusters["dask"], pattern, n, quick)
                    row["note"] = "; ".join(
                        filter(None, ["measured alone, after the others", row["note"]])
                    )
                    measured.append(row)

    fp = label("ferroparallel")
    reference = {row["pattern"]: row for row in measured if row["framework"] == fp}
    rows: list[dict[str, Any]] = []
    for key in dict.fromkeys(row["pattern"] for row in measured):
        for row in (r for r in measured if r["pattern"] == key):
            ref = reference.get(key, {})
            rows.append(
                {
                    **{k: v for k, v in row.items() if k != "note"},
                    "ratio_submit": ratio(
                        ref.get("submit_tasks_s", math.nan), row["submit_tasks_s"]
                    ),
                    "ratio_e2e": ratio(ref.get("e2e_tasks_s", math.nan), row["e2e_tasks_s"]),
                    "note": row["note"],
                }
            )
    for name in FRAMEWORKS:
        if why[name] is not None:
            rows.append({"framework": label(name), "note": why[name]})
    return rows
