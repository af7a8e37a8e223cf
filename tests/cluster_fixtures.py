"""Real-cluster fixtures for the user-level Client / DirectView / AsyncResult tests.

Loaded by those test modules with ``pytest_plugins = ("cluster_fixtures",)``, so one cluster is
shared by all of them:

- ``shared_cluster``: ONE session-scoped cluster of 2 engines (profile ``default``, the unnamed
  cluster id ``""`` so that a bare ``Client()`` finds it), controller ``--ping 500``. The profile
  root (``FERROPARALLEL_DIR``) is a session temporary directory.
- ``rc``: the session client on it, reset after every test (``block`` flag, outstanding work,
  engine namespaces) and checked to still have its 2 responsive engines.
- ``dv``: ``rc[:]``, a fresh DirectView for every test.
- ``growing_cluster``: a second session cluster, only for the tests that add engines.
- ``wait_until``: ``wait_until(cond, timeout, what)`` polls ``cond`` or fails the test.
- ``new_cluster``: a factory of throwaway clusters (shutdown, killed engines, a dead controller),
  stopped, and their processes killed, after the test.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ferroparallel as ipp
from cluster_util import wait_until as _wait_until
from ferroparallel.client import Client, DirectView
from ferroparallel.cluster import Cluster

#: Controller arguments of every test cluster: a fast heartbeat, so dead engines are noticed soon.
# 500 ms (5 s without pings before an engine gives up): 2 GiB socket-path transfers keep the
# controller's event loop busy for a while (MAC check), and CI machines are loaded
CONTROLLER_ARGS = ["--ping", "500"]
#: Upper bound for anything that should take well under a second on an idle machine.
SHORT = 30.0


def wait_until(cond: Callable[[], Any], timeout: float = SHORT, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (see cluster_util.wait_until)."""
    return _wait_until(cond, timeout, what)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """``wait_until(cond, timeout=30, what="...")``: poll until ``cond()`` is truthy, else fail."""
    return wait_until


def _kill(cluster: Cluster) -> None:
    """Stop a cluster; SIGKILL whatever survives."""
    try:
        cluster.stop_cluster_sync()
    except Exception:  # noqa: BLE001 - teardown must not hide the test's own failure
        pass
    for p in cluster._processes():
        with contextlib.suppress(Exception):
            if p.running:
                p.send_signal(signal.SIGKILL)


def engine_report(cluster: Cluster) -> str:
    """Which engine processes of ``cluster`` are still running, with the logs of dead ones."""
    lines = []
    for es in cluster.engines.values():
        for p in es.processes:
            if p.running:
                lines.append(f"engine pid {p.pid}: running")
            else:
                lines.append(f"engine pid {p.pid}: exited ({p.exit_code}); log:\n{p.log_tail(15)}")
    ctl = cluster.controller
    if ctl is not None and ctl.process is not None and not ctl.process.running:
        lines.append(f"controller exited; log:\n{ctl.process.log_tail(15)}")
    return "\n".join(lines)


def _start(cluster: Cluster, n: int) -> Client:
    rc: Client | None = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=SHORT)
    except BaseException:
        if rc is not None:
            rc.close()
        _kill(cluster)
        raise
    return rc


@pytest.fixture(scope="session")
def fp_session_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ``FERROPARALLEL_DIR`` (and ``IPYTHONDIR``, whose profiles' config files
    apply too) for the whole session."""
    root = tmp_path_factory.mktemp("fproot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERROPARALLEL_DIR", str(root))
        mp.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        yield root


@pytest.fixture(scope="session")
def shared_cluster(fp_session_root: Path) -> Iterator[Cluster]:
    """The 2-engine cluster most tests run on."""
    cluster = Cluster(n=2, controller_args=CONTROLLER_ARGS, cluster_id="", profile="default")
    rc = _start(cluster, 2)
    rc.close()
    yield cluster
    _kill(cluster)


@pytest.fixture(scope="session")
def _session_client(shared_cluster: Cluster) -> Iterator[Client]:
    rc = ipp.Client(shared_cluster.client_file, timeout=SHORT)
    try:
        rc.wait_for_engines(2, timeout=SHORT)
    except TimeoutError:
        rc.close()
        pytest.fail(f"the shared cluster has {rc.ids} engines\n{engine_report(shared_cluster)}")
    yield rc
    rc.close()


def _reset(rc: Client, cluster: Cluster) -> None:
    """Put the shared client and its engines back into a clean state."""
    rc.block = False
    if not rc.wait(timeout=SHORT):
        rc.abort(block=True)
        assert rc.wait(timeout=SHORT), f"work still outstanding after a test: {rc.outstanding}"
    assert rc.ids == [0, 1], f"the shared cluster lost engines: {rc.ids}\n{engine_report(cluster)}"
    rc.clear(block=True)
    # every engine still answers
    assert rc[:].apply_async(int, 1).get(timeout=SHORT) == [1, 1]


@pytest.fixture
def rc(_session_client: Client, shared_cluster: Cluster) -> Iterator[Client]:
    """The shared client (2 engines, ids [0, 1]); cleaned up after each test."""
    yield _session_client
    _reset(_session_client, shared_cluster)


@pytest.fixture
def dv(rc: Client) -> DirectView:
    """A fresh DirectView on all engines of the shared cluster."""
    return rc[:]


@pytest.fixture(scope="session")
def growing_cluster(fp_session_root: Path) -> Iterator[tuple[Cluster, Client]]:
    """A cluster that tests may add engines to (starts with 2)."""
    cluster = Cluster(n=2, controller_args=CONTROLLER_ARGS, cluster_id="growing")
    rc = _start(cluster, 2)
    yield cluster, rc
    rc.close()
    _kill(cluster)


@pytest.fixture
def new_cluster(fp_session_root: Path) -> Iterator[Callable[..., tuple[Cluster, Client]]]:
    """Factory: ``cluster, rc = new_cluster(n=2, timeout=...)`` (stopped after the test)."""
    made: list[tuple[Cluster, list[Client]]] = []
    counter = iter(range(1000))

    def make(n: int = 2, **client_kwargs: Any) -> tuple[Cluster, Client]:
        cluster = Cluster(
            n=n,
            controller_args=CONTROLLER_ARGS,
            cluster_id=f"throwaway-{time.monotonic_ns()}-{next(counter)}",
        )
        clients: list[Client] = []
        made.append((cluster, clients))
        first = _start(cluster, n)
        if client_kwargs:
            first.close()
            first = ipp.Client(cluster.client_file, **client_kwargs)
            first.wait_for_engines(n, timeout=SHORT)
        clients.append(first)
        return cluster, first

    yield make
    for cluster, clients in made:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
        _kill(cluster)
