"""Start and stop 2-engine clusters of ferroparallel and its peers for the cluster workloads.

Not a workload (the name starts with ``_``). Used by ``startup``, ``roundtrip`` and
``throughput``:

- :func:`isolated_env` points ``FERROPARALLEL_DIR``, ``IPYTHONDIR``, the Jupyter and Dask
  directories at a fresh temporary directory (so nothing touches the home directory) and puts
  this directory on ``PYTHONPATH`` (so engines and workers import ``_tasks.noop`` by name);
- :func:`start` starts one framework's cluster until it is usable (engines registered and a
  first no-op done on every engine) and returns a :class:`Running` whose :meth:`Running.stop`
  stops everything it started;
- :func:`missing` says whether a peer is installed, so a workload can print a row with a note
  instead of failing.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _tasks import noop
from _util import restore_env

HERE = Path(__file__).resolve().parent

#: The frameworks, in the order the workloads measure them.
FRAMEWORKS = ("ferroparallel", "ipyparallel", "dask")

#: The module that must import for each framework to be measured.
_MODULES = {"ferroparallel": "ferroparallel", "ipyparallel": "ipyparallel", "dask": "distributed"}

#: Environment variables :func:`isolated_env` sets (and restores afterwards).
_ENV_KEYS = (
    "FERROPARALLEL_DIR",
    "IPYTHONDIR",
    "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR",
    "JUPYTER_RUNTIME_DIR",
    "DASK_TEMPORARY_DIRECTORY",
    "PYTHONPATH",
)


def _refresh_dask_config() -> None:
    """Make an already imported Dask read the environment again.

    Dask reads ``DASK_*`` variables into its configuration when first imported; without a
    refresh, a later cluster in this process would still use the temporary directory of the
    first :func:`isolated_env` (recreating it after its removal).
    """
    config = sys.modules.get("dask.config")
    if config is not None:
        config.refresh()


@contextlib.contextmanager
def isolated_env() -> Iterator[Path]:
    """Run the body with every framework directory in a fresh temporary directory.

    Sets ``FERROPARALLEL_DIR``, ``IPYTHONDIR``, ``JUPYTER_{CONFIG,DATA,RUNTIME}_DIR`` and
    ``DASK_TEMPORARY_DIRECTORY`` below the temporary directory, and prepends this directory to
    ``PYTHONPATH``. Engines inherit the environment of the process that starts them, so this
    must be entered before any cluster starts. Everything is restored, and the directory
    removed, on exit (kept, and its path printed, when ``FERROBENCH_KEEP_TMP=1``: the
    controller and engine logs are in there).

    Yields
    ------
    Path
        The temporary directory.
    """
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    tmp = Path(tempfile.mkdtemp(prefix="ferrobench-"))
    try:
        os.environ["FERROPARALLEL_DIR"] = str(tmp / "ferroparallel")
        os.environ["IPYTHONDIR"] = str(tmp / "ipython")
        os.environ["JUPYTER_CONFIG_DIR"] = str(tmp / "jupyter" / "config")
        os.environ["JUPYTER_DATA_DIR"] = str(tmp / "jupyter" / "data")
        os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp / "jupyter" / "runtime")
        os.environ["DASK_TEMPORARY_DIRECTORY"] = str(tmp / "dask")
        path = [str(HERE)] + [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(path)
        _refresh_dask_config()
        yield tmp
    finally:
        restore_env(saved)
        _refresh_dask_config()
        if os.environ.get("FERROBENCH_KEEP_TMP") == "1":
            print(f"(kept {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def missing(name: str) -> str | None:
    """Why framework ``name`` cannot be measured, or ``None`` when it can.

    Imports the framework (so its import time is not counted in a later measurement).
    """
    try:
        importlib.import_module(_MODULES[name])
    except ImportError as e:
        return f"not installed ({e.name or e})"
    return None


def label(name: str) -> str:
    """``"<framework> <version>"`` (``"dask"`` is labelled with the distributed version)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return name
    return f"{name} {getattr(module, '__version__', '?')}"


# -- processes ---------------------------------------------------------------------------------


#: Helper processes of the ``multiprocessing`` module (Dask starts workers with it): they live
#: as long as this process, belong to no cluster, and must not be killed.
_RUNTIME_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def descendants() -> set[int]:
    """Pids of the live (not zombie) descendants of this process; empty without psutil.

    ``multiprocessing``'s resource tracker and fork server are left out.
    """
    try:
        import psutil
    except ImportError:
        return set()
    out = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
            if not any(helper in cmdline for helper in _RUNTIME_HELPERS):
                out.add(child.pid)
    return out


def reap(before: set[int], grace: float = 5.0) -> int:
    """Wait for the descendants started since ``before`` to exit; kill any left after ``grace``.

    Parameters
    ----------
    before : set of int
        :func:`descendants` taken before the cluster started.
    grace : float
        Seconds to let them exit on their own.

    Returns
    -------
    int
        How many had to be killed (0 when the framework cleaned up after itself).
    """
    deadline = time.monotonic() + grace
    while True:
        left = descendants() - before
        if not left:
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    import psutil

    killed = 0
    for pid in left:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.kill()
            proc.wait(timeout=5)
            killed += 1
    return killed


# -- clusters ----------------------------------------------------------------------------------


@dataclass
class Running:
    """A started cluster with its connected client.

    Attributes
    ----------
    name : str
        Framework name (one of :data:`FRAMEWORKS`).
    label : str
        Name and version, for the tables.
    client : Any
        The connected client (``ferroparallel.Client``, ``ipyparallel.Client`` or
        ``distributed.Client``).
    start_s : float
        Seconds from nothing to a connected client with every engine registered.
    first_s : float
        Seconds of the first no-op on every engine after that.
    """

    name: str
    label: str
    client: Any
    start_s: float
    first_s: float
    _stop: Callable[[], None]
    _before: set[int] = field(default_factory=set)
    stop_s: float | None = None
    killed: int = 0

    @property
    def usable_s(self) -> float:
        """Seconds from nothing to a first no-op done on every engine."""
        return self.start_s + self.first_s

    def stop(self) -> float:
        """Stop the client and the cluster (idempotent).

        Returns
        -------
        float
            Seconds the orderly stop took. Processes still alive 5 s later are killed and
            counted in :attr:`killed`.
        """
        if self.stop_s is None:
            t0 = time.perf_counter()
            try:
                self._stop()
            finally:
                self.stop_s = time.perf_counter() - t0
                self.killed = reap(self._before)
        return self.stop_s


def _ipp_like(module_name: str, n: int) -> tuple[Any, float, float, Callable[[], None]]:
    """Start ferroparallel or ipyparallel: ``Cluster(n=n).start_and_connect_sync()``."""
    module = importlib.import_module(module_name)
    t0 = time.perf_counter()
    cluster = module.Cluster(n=n)
    rc = None

    def stop() -> None:
        try:
            if rc is not None:
                rc.close()
        finally:
            cluster.stop_cluster_sync()

    try:
        rc = cluster.start_and_connect_sync()
        t1 = time.perf_counter()
        rc[:].apply_sync(noop)
        t2 = time.perf_counter()
    except BaseException:
        with contextlib.suppress(Exception):
            stop()
        raise
    return rc, t1 - t0, t2 - t1, stop


def _dask(n: int) -> tuple[Any, float, float, Callable[[], None]]:
    """Start ``distributed.LocalCluster`` with ``n`` single-threaded worker processes."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        local_directory=os.environ.get("DASK_TEMPORARY_DIRECTORY"),
    )
    client = None

    def stop() -> None:
        try:
            if client is not None:
                client.close()
        finally:
            cluster.close()

    try:
        client = Client(cluster)
        client.wait_for_workers(n)
        t1 = time.perf_counter()
        client.submit(noop, pure=False).result()
        t2 = time.perf_counter()
    except BaseException:
        with contextlib.suppress(Exception):
            stop()
        raise
    return client, t1 - t0, t2 - t1, stop


def start(name: str, n: int = 2) -> Running:
    """Start framework ``name`` with ``n`` engines (workers) and connect a client.

    Must be called inside :func:`isolated_env`. The framework must be installed (check with
    :func:`missing` first, which also imports it, keeping the client-side import out of the
    timings).

    Returns
    -------
    Running
        The client and the start timings; call :meth:`Running.stop` (in a ``finally``).
    """
    before = descendants()
    if name == "dask":
        client, start_s, first_s, stop = _dask(n)
    else:
        client, start_s, first_s, stop = _ipp_like(_MODULES[name], n)
    return Running(name, label(name), client, start_s, first_s, stop, before)


@contextlib.contextmanager
def running(names: Sequence[str], n: int = 2) -> Iterator[dict[str, Running]]:
    """Start the installed frameworks among ``names``; stop all of them on exit.

    Yields
    ------
    dict
        ``{name: Running}`` for each framework that started (in order).
    """
    started: dict[str, Running] = {}
    try:
        for name in names:
            started[name] = start(name, n)
        yield started
    finally:
        errors = []
        for run in reversed(started.values()):
            try:
                run.stop()
            except Exception as e:  # noqa: BLE001 - stop the others, then report
                errors.append(e)
        if errors:
            raise errors[0]


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else math.nan


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, NaN when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the garbage collector off for the body."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
