"""Our engines and our Client on ipyparallel's own controller (``ipcontroller``).

ipyparallel's hub and schedulers know none of our protocol extensions: the engines must
register, beat and answer as ipyparallel engines do, and our Client must fall back to what an
ipyparallel hub offers (one request per engine instead of the controller's fan-out, no hub
``abort_request``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_util import stop_popen, wait_until
from ferroparallel.client import Client
from ferroparallel.error import TaskAborted

ipp = pytest.importorskip("ipyparallel")

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fp_root")]

SHORT = 30.0


class Setup:
    def __init__(self, client_file: str, engines: list[subprocess.Popen[bytes]]) -> None:
        self.client_file = client_file
        self.engines = engines


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    cluster = ipp.Cluster(n=0, profile_dir=str(tmp_path / "ipp_profile"), log_level=40)
    engines: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start_controller_sync()
        sec = Path(cluster.profile_dir) / "security"
        engine_file = sec / f"ipcontroller-{cluster.cluster_id}-engine.json"
        client_file = sec / f"ipcontroller-{cluster.cluster_id}-client.json"
        wait_until(engine_file.exists, timeout=SHORT, what="ipcontroller's engine file")
        wait_until(client_file.exists, timeout=SHORT, what="ipcontroller's client file")
        time.sleep(0.2)  # written, not half-written
        for i in range(2):
            log = open(tmp_path / f"engine{i}.log", "wb")  # noqa: SIM115 - closed by the child
            engines.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ferroparallel.engine", "--file", str(engine_file)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        yield Setup(str(client_file), engines)
    finally:
        for p in engines:
            stop_popen(p)
        cluster.stop_cluster_sync()


def test_our_engines_serve_an_ipyparallel_client(setup: Setup) -> None:
    rc = ipp.Client(setup.client_file, timeout=SHORT)
    try:
        rc.wait_for_engines(2, timeout=60)
        dv = rc[:]
        pids = dv.apply_sync(lambda: __import__("os").getpid())
        assert sorted(pids) == sorted(p.pid for p in setup.engines)
        assert rc.load_balanced_view().map_sync(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
        assert rc.broadcast_view(is_coalescing=True).apply_sync(lambda: 3) == [3, 3]
        dv.push({"a": 5}, block=True)
        assert dv.pull("a", block=True) == [5, 5]
        assert dv.execute("print('hi', a)", block=True).stdout == ["hi 5\n"] * 2
    finally:
        rc.close()


def test_our_client_on_an_ipyparallel_controller(setup: Setup) -> None:
    with Client(setup.client_file, timeout=SHORT) as rc:
        rc.wait_for_engines(2, timeout=60)
        assert not rc._features  # an ipyparallel hub: no fan-out, no hub abort
        dv = rc[:]
        assert sorted(dv.apply_sync(os.getpid)) == sorted(p.pid for p in setup.engines)
        dv.push({"b": [1, 2]}, block=True)
        assert dv.pull("b", block=True) == [[1, 2], [1, 2]]
        dv.scatter("x", list(range(6)), block=True)
        assert dv.gather("x", block=True) == list(range(6))
        lview = rc.load_balanced_view()
        assert lview.map_sync(abs, [-1, -2, -3]) == [1, 2, 3]
        # both engines busy; the third task waits in ipyparallel's scheduler (hwm 1). No hub
        # abort there: the engines are told, and skip it when it reaches one of them.
        busy = [lview.apply_async(time.sleep, 2) for _ in range(2)]
        queued: Any = lview.apply_async(os.getpid)
        time.sleep(0.3)
        rc.abort(queued, block=True)
        with pytest.raises(TaskAborted):
            queued.get(timeout=SHORT)
        for ar in busy:
            ar.get(timeout=SHORT)
        status = rc.queue_status()
        assert set(status) >= {"unassigned", *rc.ids}
