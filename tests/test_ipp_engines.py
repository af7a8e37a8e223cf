"""Real ipyparallel engines (``python -m ipyparallel.engine``) on a ferroparallel controller.

The engines are ipyparallel's own processes (registration, heartbeat, IOPub, their shell and
control handling), driven by an ipyparallel Client and by ours: the controller speaks the
protocol to peers it did not write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster_util import assert_results_from_the_hub, stop_popen, wait_until
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster
from ferroparallel.error import RemoteError

ipp = pytest.importorskip("ipyparallel")

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0


class Setup:
    def __init__(self, cluster: Cluster, engines: list[subprocess.Popen[bytes]]) -> None:
        self.cluster = cluster
        self.engines = engines


@pytest.fixture
def setup(fp_root: Path, tmp_path: Path) -> Iterator[Setup]:
    cluster = Cluster(
        n=0,
        profile_dir=fp_root / "profile_ippe",
        controller_args=["--ping", "200"],
        shutdown_atexit=False,
    )
    engines: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start_cluster_sync()
        for i in range(2):
            log = open(tmp_path / f"ipengine{i}.log", "wb")  # noqa: SIM115 - closed by the child
            engines.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ipyparallel.engine", f"--file={cluster.engine_file}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "IPP_NONINTERACTIVE": "1"},
                )
            )
            log.close()
        yield Setup(cluster, engines)
    finally:
        for p in engines:
            stop_popen(p)
        cluster.stop_cluster_sync()


def _ipp_client(setup: Setup) -> Any:
    rc = ipp.Client(str(setup.cluster.client_file), timeout=SHORT)
    try:
        rc.wait_for_engines(2, timeout=60)
    except BaseException:
        rc.close()
        raise
    return rc


def test_ipyparallel_client_and_engines(setup: Setup) -> None:
    rc = _ipp_client(setup)
    try:
        dv = rc[:]
        pids = dv.apply_sync(lambda: __import__("os").getpid())
        assert sorted(pids) == sorted(p.pid for p in setup.engines)
        lview = rc.load_balanced_view()
        assert lview.map_sync(lambda x: x * 2, range(8)) == [x * 2 for x in range(8)]
        assert rc.broadcast_view(is_coalescing=True).apply_sync(lambda: 3) == [3, 3]
        dv.push({"a": 5}, block=True)
        assert dv.pull("a", block=True) == [5, 5]
        ar = dv.execute("print('hello from', a)", block=True)
        assert ar.stdout == ["hello from 5\n"] * 2
        with pytest.raises(ipp.error.CompositeError) as info:
            dv.apply_sync(lambda: 1 / 0)
        assert {e[0] for e in info.value.elist} == {"ZeroDivisionError"}
        status = rc.queue_status()
        assert status["unassigned"] == 0
        assert {k for k in status if k != "unassigned"} == set(rc.ids)
        assert all(s["queue"] == 0 for k, s in status.items() if k != "unassigned")
        # the hub's records of their work
        recs = rc.db_query({"msg_id": {"$in": rc.history[:2]}}, keys=["msg_id", "completed"])
        assert len(recs) == 2 and all(r["completed"] for r in recs)
    finally:
        rc.close()


def test_dead_ipyparallel_engine_is_unregistered(setup: Setup) -> None:
    rc = _ipp_client(setup)
    try:
        victim = setup.engines[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: len(rc.ids) == 1, timeout=SHORT, what="the dead engine to leave")
        assert rc[:].apply_sync(lambda: 7) == [7]
    finally:
        rc.close()


def test_our_client_executes_on_ipyparallel_engines(setup: Setup) -> None:
    """Our Client runs code on ipyparallel engines with ``execute`` (the language-neutral
    request; our apply payload is our own format, which ipyparallel engines do not read)."""
    with Client(setup.cluster.client_file, timeout=SHORT) as rc:
        rc.wait_for_engines(2, timeout=60)
        ar = rc[:].execute("import os; x = 6 * 7; print(x)", block=True)
        assert ar.successful()
        assert ar.stdout == ["42\n", "42\n"]
        # apply cannot work there: the error says why
        with pytest.raises(RemoteError, match="is an ipyparallel engine"):
            rc[0].apply_sync(os.getpid)


def test_our_client_reads_what_ipyparallel_peers_serialized(setup: Setup) -> None:
    """Values ipyparallel serialized reach our Client readable: another (ipyparallel)
    client's results fetched from the hub, and data an ipyparallel engine publishes."""
    irc = _ipp_client(setup)
    try:
        values = [b"abc", [b"x", 1], np.arange(5), np.arange(100_000.0), {"k": (1, "v")}]
        ids = []
        for value in values:
            ar = irc[0].apply_async(lambda v: v, value)
            ar.get(timeout=SHORT)
            ids.append(ar.msg_ids[0])
        with Client(setup.cluster.client_file, timeout=SHORT) as rc:
            rc.wait_for_engines(2, timeout=60)
            assert_results_from_the_hub(rc, ids, values)
            status = rc.result_status(ids[:1], status_only=False)
            assert status["completed"] == ids[:1] and status[ids[0]] == b"abc"
            # publish_data on an ipyparallel engine (topic "datapub", its serialization)
            ar = rc[0].execute(
                "from ipyparallel.datapub import publish_data\n"
                "import numpy\n"
                "publish_data({'small': 5, 'arr': numpy.arange(3000)})",
                block=True,
            )
            assert ar.successful()
            wait_until(lambda: "arr" in ar.data, timeout=SHORT, what="the published data")
            assert ar.data["small"] == 5 and np.array_equal(ar.data["arr"], np.arange(3000))
    finally:
        irc.close()


def test_become_dask_from_an_ipyparallel_client_says_how(setup: Setup) -> None:
    """ipyparallel's hub runs a dask scheduler in its Python process; our controller answers
    the request with an error that names the way that works, and stopping is a no-op."""
    rc = _ipp_client(setup)
    try:
        with pytest.raises(ipp.error.RemoteError) as info:
            rc.become_dask()
        assert info.value.ename == "NotImplementedError"
        assert "ferroparallel.Client" in info.value.evalue
        rc.stop_distributed()  # nothing to stop: no error
        assert rc[:].apply_sync(lambda: 1) == [1, 1]  # the controller goes on
    finally:
        rc.close()
