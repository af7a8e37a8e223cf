"""Same-host IPC endpoints (ferroparallel.ipc): a local cluster talks over the controller's
abstract Unix sockets, peers elsewhere (or told not to) over TCP, and both reach the same
controller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster_util import start_controller
from ferroparallel import ipc
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster

pytest_plugins = ("cluster_fixtures",)

SHORT = 30.0

pytestmark = pytest.mark.skipif(not ipc.available(), reason="abstract Unix sockets are Linux-only")


def _client_info(cluster: Cluster) -> dict[str, Any]:
    return json.loads(Path(cluster.client_file).read_text())


def test_local_cluster_uses_the_unix_sockets(rc: Client, shared_cluster: Cluster) -> None:
    info = _client_info(shared_cluster)
    entry = info[ipc.INFO_KEY]
    assert entry["host"] == ipc.host_token()
    assert all(entry[k].startswith("ipc://@fp-") for k in ("registration", "mux", "iopub"))
    assert rc.transport == "ipc"
    assert rc[:].apply_sync(lambda: 6 * 7) == [42, 42]
    # the engines too: none of them holds a TCP connection to the controller (their direct
    # data channels, decision 0014, are TCP connections with clients)
    ctl = psutil.Process(shared_cluster.controller.process.pid)
    ports = {c.laddr.port for c in ctl.net_connections(kind="tcp") if c.status == "LISTEN"}
    assert ports
    for es in shared_cluster.engines.values():
        for p in es.processes:
            for conn in psutil.Process(p.pid).net_connections(kind="tcp"):
                assert not conn.raddr or conn.raddr.port not in ports, conn


@pytest.mark.parametrize("why", ["disabled here", "another host"])
def test_tcp_when_the_sockets_are_not_for_us(
    shared_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    info = _client_info(shared_cluster)
    if why == "disabled here":
        monkeypatch.setenv(ipc.ENV_ENABLE, "0")
    else:
        info[ipc.INFO_KEY] = dict(info[ipc.INFO_KEY], host="some-other-host/boot/1/net:2")
    with Client(info, timeout=SHORT) as rc:
        assert rc.transport == "tcp"
        assert rc[:].apply_sync(lambda: "over tcp") == ["over tcp", "over tcp"]


def test_a_controller_without_ipc_lists_none(tmp_path: Path) -> None:
    ctl = start_controller(tmp_path / "prof", "--no-ipc")
    try:
        assert ipc.INFO_KEY not in ctl.client and ipc.INFO_KEY not in ctl.engine
        with Client(ctl.client, timeout=SHORT) as rc:
            assert rc.transport == "tcp"
            assert rc.queue_status()["unassigned"] == 0
    finally:
        ctl.stop()


def test_local_urls_take_only_a_complete_entry() -> None:
    keys = ("registration", "mux")
    good = {"host": ipc.host_token(), "registration": "ipc://@a", "mux": "ipc://@b"}
    assert ipc.local_urls({ipc.INFO_KEY: good}, keys) == {
        "registration": "ipc://@a",
        "mux": "ipc://@b",
    }
    assert ipc.local_urls({}, keys) is None
    assert ipc.local_urls({ipc.INFO_KEY: dict(good, mux=None)}, keys) is None
    assert ipc.local_urls({ipc.INFO_KEY: dict(good, mux="tcp://x:1")}, keys) is None
    assert ipc.local_urls({ipc.INFO_KEY: "junk"}, keys) is None
    assert ipc.connection_entry({}, {"registration": "registration"}) is None
    assert ipc.connection_entry({"registration": "ipc://@r"}, {"mux": "mux_client"}) is None
    assert ipc.new_prefix() != ipc.new_prefix()
