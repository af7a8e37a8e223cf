"""Data movement: push/pull, scatter/gather, apply with an array, vs raw pyzmq, ipyparallel, Dask.

Cases (float64 arrays of random numbers):

- ``push`` / ``pull`` of 8, 128 and 512 MiB (8 and 128 with ``--quick``) to / from 1 and 2
  engines: ``view.push({"a": a}, block=True)``, ``view.pull("a", block=True)`` with
  ``view = rc[0]`` or ``rc[:2]``; Dask ``client.scatter([a] * k, hash=False)`` (one copy per
  worker) and ``client.gather``; raw pyzmq one zero-copy frame per engine and a small ack;
- ``scatter`` / ``gather`` of 10^7 float64 across 2 engines: ``rc[:2].scatter("x", a)``,
  ``.gather("x")``; Dask ``client.scatter(np.array_split(a, 2))``, ``np.concatenate(gather)``;
- ``apply``: ``rc[0].apply_sync(lambda x: x.sum(), a)`` with 128 MiB; Dask
  ``client.submit(np.sum, client.scatter(a)).result()`` (the transfer included);
- ``copy``: ``a.copy()`` in this process, the memory floor of the shared-memory target, and
  ``np.copyto`` into an already touched array (the memory bandwidth without page faults).

Raw pyzmq runs twice: straight to its servers, and through a ``zmq.proxy`` relay process in
front of each (the floor of the client -> controller -> engine topology). Dask runs twice:
``direct=True`` (client <-> workers) and ``direct=False`` (through the scheduler).

``mib_s`` counts the MiB that moved: a push to 2 engines moves the array twice.
Times are medians of ``reps`` repetitions (5, 3 for 512 MiB; 1 with ``--quick``), after an
untimed warm-up. After the timed runs, what arrived is checked (dtype, length, sum and three
items; each pulled array as it arrives): a contender whose data is wrong gets no speed.

Peak RSS growth (MiB) of every process in each case: the client (this process: for Dask also
the scheduler), the engines (max over them) and the cluster's other processes (controller,
nannies; max): the peak during the timed operation minus the RSS just before it, the peak
reset through ``/proc/<pid>/clear_refs`` (see ``_rss``); the largest over the repetitions.

ferroparallel, ipyparallel, the raw pyzmq servers and the copy floor take turns within each
repetition; Dask runs afterwards, alone (an idle Dask cluster keeps about 13% of a core busy).

Without shared memory (``FERROPARALLEL_SHM=0``: the rows without ``shm``, standing for engines
on other hosts) the blocking calls timed here use ferroparallel's direct data path
(decision 0014): the engines and the client fetch large buffers over TCP from each other
rather than through the controller; ``FERROPARALLEL_DIRECT_DATA=0`` measures the controller's
path instead.

Shared memory: when ferroparallel has a same-host shared-memory path (``Client(shm=...)``,
``ferroparallel.SHM_AVAILABLE`` or a ``shm`` module: see :func:`shm_unavailable`), a second
ferroparallel cluster runs with ``FERROPARALLEL_SHM=1`` (the first with ``FERROPARALLEL_SHM=0``)
and gets its own rows, ``fp/copy`` being its target ratio; otherwise a row says
``shm not available``. Every timed operation here blocks (``block=True``), so on that cluster
ferroparallel's engines and client copy straight from each other's memory (decision 0007)
rather than through a ``/dev/shm`` segment, which non-blocking calls use.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import inspect
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pages  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
from _frameworks import FRAMEWORKS, Running, descendants, isolated_env, label, missing, start  # noqa: E402
from _movers import ClusterMover, DaskMover, Mover, RawMover  # noqa: E402
from _rawzmq import RawPeers  # noqa: E402
from _rss import PeakGrowth  # noqa: E402
from _samples import Case, Roles, Samples, rows  # noqa: E402
from _tasks import checksum  # noqa: E402
from _util import restore_env  # noqa: E402

NAME = "data"

#: Environment variable choosing ferroparallel's shared-memory path (``"0"`` / ``"1"``).
SHM_ENV = "FERROPARALLEL_SHM"

_MIB = 1024 * 1024
#: Labels of the memory floors.
COPY, WARM_COPY = "a.copy()", "np.copyto(warm, a)"
#: Before each timed operation, touch and free this many times the MiB it moves (see _pages).
PREFAULT_FACTOR = 2
#: float64 items of the scatter/gather case.
SCATTER_ITEMS = 10**7
#: MiB of the apply case.
APPLY_MIB = 128


def shm_unavailable() -> str | None:
    """Why ferroparallel's shared-memory path cannot be measured, or ``None`` when it can.

    The path exists when ``ferroparallel.Client`` takes a ``shm`` argument (switched by
    ``FERROPARALLEL_SHM=0/1`` in every process), or the package says so with
    ``SHM_AVAILABLE`` or a ``shm`` module.
    """
    import ferroparallel

    if getattr(ferroparallel, "SHM_AVAILABLE", False):
        return None
    if "shm" in inspect.signature(ferroparallel.Client).parameters:
        return None
    for module in ("ferroparallel.shm", "ferroparallel.serialize.shm"):
        if importlib.util.find_spec(module) is not None:
            return None
    return "shm not available"


def _devshm_used() -> int:
    """Bytes used in ``/dev/shm`` (0 without it).

    Shared memory written with ``write`` rather than through a mapping is in no process's RSS
    (and a mapping counts only once touched), so the shared-memory rows report this growth.
    """
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return 0


def _array(items: int, seed: int) -> np.ndarray:
    """``items`` random float64 (random, so a wrong byte anywhere shows in the sum)."""
    return np.random.default_rng(seed).random(items)


def _same(got: tuple[Any, ...], want: tuple[Any, ...]) -> bool:
    """Whether two :func:`_tasks.checksum` results describe the same array."""
    if len(got) != len(want) or got[0] != want[0] or got[1] != want[1]:
        return False
    return all(
        math.isclose(g, w, rel_tol=1e-9) or (math.isnan(g) and math.isnan(w))
        for g, w in zip(got[2:], want[2:], strict=True)
    )


def _one_checksum(a: np.ndarray) -> list[tuple[Any, ...]]:
    """``[checksum(a)]``."""
    return [checksum(a)]


class Bench:
    """Runs the cases for a set of movers, recording into :class:`Samples`."""

    def __init__(self, samples: Samples, quick: bool) -> None:
        self.samples = samples
        self.quick = quick
        self.prefault = _pages.prefault_enabled()

    def reps(self, mib: float) -> int:
        """Repetitions of a case with an array of ``mib`` MiB."""
        if self.quick:
            return 1
        return 3 if mib >= 512 else 5

    def timed(self, case: Case, mover: Mover | None, label: str, op: Callable[[], Any]) -> Any:
        """Run ``op`` once, timed, recording its duration and peak RSS growth.

        Returns the result of ``op``, or ``None`` if it failed (the failure is recorded, the
        traceback printed on stderr) or if this contender already failed in this case.
        """
        series = self.samples.get(case, label)
        if series.failure:
            return None
        groups = {"client": [os.getpid()]}
        if mover is not None:
            groups |= {"engines": mover.engine_pids, "other": mover.other_pids}
        env = mover.environment() if mover is not None else contextlib.nullcontext()
        if self.prefault:
            _pages.prefault(PREFAULT_FACTOR * case.moved_mib + 16)
        try:
            with env, PeakGrowth(groups) as peak:
                shm_before = _devshm_used()
                gc.disable()
                try:
                    t0 = time.perf_counter()
                    value = op()
                    elapsed = time.perf_counter() - t0
                finally:
                    gc.enable()
                shm_growth = (_devshm_used() - shm_before) / _MIB
        except Exception as e:  # noqa: BLE001 - a failed row beats losing the whole table
            traceback.print_exc()
            series.failure = f"FAILED: {type(e).__name__}: {e}"
            return None
        series.seconds.append(elapsed)
        series.client_mib.append(peak.mib("client"))
        series.engine_mib.append(peak.mib("engines"))
        series.other_mib.append(peak.mib("other"))
        series.devshm_mib.append(shm_growth if mover is not None and mover.shm else math.nan)
        return value

    def check(self, case: Case, label: str, got: Callable[[], list[Any]], want: list[Any]) -> None:
        """Compare checksums (``got()``, not timed) with ``want``; record a mismatch."""
        series = self.samples.get(case, label)
        if series.failure:
            return
        try:
            have = [tuple(c) for c in got()]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            series.failure = f"FAILED (check): {type(e).__name__}: {e}"
            return
        if len(have) != len(want) or not all(map(_same, have, want)):
            series.failure = f"WRONG DATA: got {have}, want {want}"

    def warm_up(self, movers: list[Mover]) -> None:
        """Every operation once with a small array, untimed (imports, connections, buffers)."""
        gc.collect()  # once: timed runs pause the collector, the arrays are freed by refcount
        a = _array(_MIB // 8, 0)
        for mover in movers:
            with mover.environment():
                mover.push(a, 2)
                mover.pushed(2)
                mover.pull(2)
                mover.scatter(a)
                mover.gather()
                mover.apply_sum(a)
                mover.clear()

    def copy_floor(self, a: np.ndarray, mib: int) -> None:
        """Time ``a.copy()`` (fresh memory, as a receiver gets) and a copy into warm memory."""
        case = Case("copy", mib, 0)
        self.timed(case, None, COPY, a.copy)
        out = np.ones_like(a)  # touched: its pages are backed
        self.timed(case, None, WARM_COPY, partial(np.copyto, out, a))

    def push_pull(self, movers: list[Mover], sizes: tuple[int, ...], floor: bool) -> None:
        """Push then pull each size to 1 and 2 engines; ``floor``: time ``a.copy()`` too."""
        for mib in sizes:
            a = _array(mib * _MIB // 8, mib)
            want = checksum(a)
            for k in (1, 2):
                push, pull = Case("push", mib, k), Case("pull", mib, k)
                for _ in range(self.reps(mib)):
                    if floor and k == 1:
                        self.copy_floor(a, mib)
                    for m in movers:
                        self.timed(push, m, m.label, partial(m.push, a, k))
                for m in movers:
                    self.check(push, m.label, partial(m.pushed, k), [want] * k)
                for _ in range(self.reps(mib)):
                    for m in movers:
                        if self.samples.failed(push, m.label):
                            self.samples.get(pull, m.label).failure = "not run: push failed"
                            continue
                        got = self.timed(pull, m, m.label, partial(m.pull, k))
                        if got is not None:
                            self.check(pull, m.label, partial(map, checksum, got), [want] * k)
                        del got
                for m in movers:  # every contender holds up to 2 copies: free them now
                    with m.environment():
                        m.clear()

    def scatter_gather(self, movers: list[Mover]) -> None:
        """Scatter 10^7 float64 across 2 engines, then gather them back."""
        a = _array(SCATTER_ITEMS, 7)
        mib = a.nbytes / _MIB
        halves = [checksum(h) for h in np.array_split(a, 2)]
        scatter, gather = Case("scatter", mib, 2), Case("gather", mib, 2)
        for _ in range(self.reps(mib)):
            for m in movers:
                self.timed(scatter, m, m.label, lambda m=m: m.scatter(a))
        for m in movers:
            self.check(scatter, m.label, m.scattered, halves)
        for _ in range(self.reps(mib)):
            for m in movers:
                if self.samples.failed(scatter, m.label):
                    self.samples.get(gather, m.label).failure = "not run: scatter failed"
                    continue
                got = self.timed(gather, m, m.label, m.gather)
                if got is not None:
                    self.check(gather, m.label, partial(_one_checksum, got), [checksum(a)])
                del got
        for m in movers:
            with m.environment():
                m.clear()

    def apply(self, movers: list[Mover]) -> None:
        """``a.sum()`` on one engine with ``a`` (128 MiB) sent along."""
        a = _array(APPLY_MIB * _MIB // 8, 11)
        want = float(a.sum())
        case = Case("apply", APPLY_MIB, 1)
        for _ in range(self.reps(APPLY_MIB)):
            for m in movers:
                got = self.timed(case, m, m.label, partial(m.apply_sum, a))
                if got is not None and not math.isclose(float(got), want, rel_tol=1e-9):
                    self.samples.get(case, m.label).failure = f"WRONG DATA: sum {got} != {want}"

    def all_cases(self, movers: list[Mover], floor: bool) -> None:
        """Warm up, then every case."""
        self.warm_up(movers)
        self.push_pull(movers, (8, 128) if self.quick else (8, 128, 512), floor)
        self.scatter_gather(movers)
        self.apply(movers)


@contextlib.contextmanager
def _started(name: str, env: dict[str, str]) -> Iterator[tuple[Running, list[int]]]:
    """Start ``name`` (with ``env`` set meanwhile); yield it and its processes; stop it."""
    saved = {key: os.environ.get(key) for key in env}
    before = descendants()
    os.environ.update(env)
    try:
        run = start(name)
    finally:
        restore_env(saved)
    try:
        yield run, sorted(descendants() - before)
    finally:
        run.stop()


def _cluster_movers(
    stack: contextlib.ExitStack, names: list[str], shm: bool
) -> list[tuple[ClusterMover, Running]]:
    """Start ferroparallel (both paths when ``shm``) and ipyparallel; their movers and runs.

    The clusters are stopped when ``stack`` closes.
    """
    variants: list[tuple[str, str, dict[str, str]]] = []
    for name in names:
        if name == "ferroparallel" and shm:
            variants.append((name, label(name), {SHM_ENV: "0"}))
            variants.append((name, f"{label(name)} shm", {SHM_ENV: "1"}))
        else:
            variants.append((name, label(name), {}))
    out: list[tuple[ClusterMover, Running]] = []
    for name, lab, env in variants:
        run, pids = stack.enter_context(_started(name, env))
        mover = ClusterMover(lab, name, run.client, pids, env)
        mover.shm = env.get(SHM_ENV) == "1"
        out.append((mover, run))
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure every case for every installed contender.

    Parameters
    ----------
    quick : bool
        8 and 128 MiB only, one repetition of each case.

    Returns
    -------
    list of dict
        One row per case and contender (see :func:`_samples.rows`); a row with a note for a
        peer that is not installed, and for the shared-memory path when it is not available.
    """
    samples = Samples()
    bench = Bench(samples, quick)
    fp, raw = label("ferroparallel"), f"raw pyzmq {zmq.__version__}"
    relay = f"{raw} relay"
    dask_labels = [f"{label('dask')} direct", f"{label('dask')} scheduler"]
    with isolated_env():
        why = {name: missing(name) for name in FRAMEWORKS}
        no_shm = shm_unavailable() if why["ferroparallel"] is None else why["ferroparallel"]
        quiet = [name for name in ("ferroparallel", "ipyparallel") if why[name] is None]
        # Phase 1: ferroparallel, ipyparallel, raw pyzmq and the copy floor, taking turns.
        with contextlib.ExitStack() as stack:
            started = _cluster_movers(stack, quiet, no_shm is None)
            peers = RawPeers(2)
            stack.callback(peers.close)
            relayed = RawPeers(2, relay=True)
            stack.callback(relayed.close)
            movers: list[Mover] = [mover for mover, _ in started]
            at = 1 + (no_shm is None) if why["ferroparallel"] is None else 0
            movers[at:at] = [RawMover(raw, peers), RawMover(relay, relayed)]
            bench.all_cases(movers, floor=True)
        for mover, cluster in started:
            if cluster.killed:
                samples.note(mover.label, f"{cluster.killed} leftover process(es) killed")
        # Phase 2: Dask alone.
        if why["dask"] is None:
            with _started("dask", {}) as (cluster, pids):
                dask = [
                    DaskMover(dask_labels[0], cluster.client, True, pids),
                    DaskMover(dask_labels[1], cluster.client, False, pids),
                ]
                bench.all_cases(dask, floor=False)
            for lab in dask_labels:
                samples.note(lab, "measured alone, after the others")
                if cluster.killed:
                    samples.note(lab, f"{cluster.killed} leftover process(es) killed")

    shm = f"{fp} shm" if no_shm is None else None
    roles = Roles(
        ferro=[fp] + ([shm] if shm else []),
        shm=shm,
        raw=raw,
        relay=relay,
        ipp=label("ipyparallel") if why["ipyparallel"] is None else None,
        dask=dask_labels if why["dask"] is None else [],
        copy=COPY,
    )
    order = [COPY, WARM_COPY, fp, *roles.ferro[1:], raw, relay, label("ipyparallel")]
    out = rows(samples, roles, order + dask_labels)
    memory = _pages.note(bench.prefault, PREFAULT_FACTOR)
    if memory:
        out.append({"contender": "(machine)", "note": memory})
    if no_shm is not None and why["ferroparallel"] is None:
        out.append({"contender": f"{fp} shm", "note": no_shm})
    for name in FRAMEWORKS:
        if why[name] is not None:
            out.append({"contender": label(name), "note": why[name]})
    return out
