"""Helpers shared by the workloads (not a workload itself: the name starts with ``_``)."""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PEER_SESSION = REPO / "tests" / "peer" / "session.py"


def load_peer_session() -> ModuleType:
    """Import the pure-Python peer (``tests/peer/session.py``) by file path."""
    name = "ferrobench_peer_session"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PEER_SESSION)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {PEER_SESSION}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def time_once(func: Callable[[], object]) -> float:
    """Seconds one call of ``func`` takes, with the garbage collector paused."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        func()
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def best_of_interleaved(
    contenders: Sequence[tuple[str, Callable[[], object]]], repeats: int
) -> dict[str, float]:
    """Best (smallest) time of each contender over ``repeats`` rounds.

    The contenders run alternately within each round, so a burst of noise from the other
    processes on the machine (2 shared cores) hits both sides alike; taking the best run
    discards the disturbed ones.
    """
    best = {name: float("inf") for name, _ in contenders}
    for _ in range(repeats):
        for name, func in contenders:
            best[name] = min(best[name], time_once(func))
    return best


def calibrate(func: Callable[[int], object], target: float, floor: int, cap: int) -> int:
    """How many iterations make ``func(n)`` take about ``target`` seconds.

    Parameters
    ----------
    func : callable
        Runs ``n`` iterations of the operation.
    target : float
        Seconds one timed run should last.
    floor, cap : int
        Bounds for the result.
    """
    n = max(1, floor // 10)
    while True:
        elapsed = time_once(lambda n=n: func(n))
        if elapsed >= target / 10 or n >= cap:
            break
        n *= 4
    # The first runs include warm-up and may have been disturbed: take the best of three.
    elapsed = min(elapsed, *(time_once(lambda n=n: func(n)) for _ in range(2)))
    per_op = elapsed / n
    return int(min(cap, max(floor, target / max(per_op, 1e-9))))


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as ``saved`` recorded them (None: was unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def end_process(proc: subprocess.Popen[str]) -> None:
    """Wait briefly for ``proc`` to exit, terminate it, kill it if it still runs."""
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None:
            stop()
        try:
            proc.wait(timeout=2 if stop is None else 5)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stdout is not None:
        proc.stdout.close()
