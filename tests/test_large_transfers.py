"""Large frames, many buffers, memory bounds and Ctrl-C (issue 7 items 4 and 5).

- arrays over 2 GiB through shared memory and over the socket;
- thousands of buffers in one message work; more than a message may carry go partly in-band;
- client peak RSS while pushing grows by at most 1.1x the array (subprocess, VmHWM); the
  engine holds one copy;
- a push interrupted by SIGINT leaves the client and the engines usable, and no segment.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

import ferroparallel as ipp
from cluster_fixtures import wait_until
from ferroparallel import Reference
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster
from ferroparallel.serialize import serialize_object
from ferroparallel.serialize.apply import MAX_BUFFERS, check_buffer_count
from ferroparallel.serialize.pickling import OUT_OF_BAND_LIMIT
from transfer_util import ends, need_lending, owner_kind, run_script, segments_of

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
GIB = 1 << 30
SHORT = 60.0


@pytest.fixture
def sock_rc(rc: Client, shared_cluster: Cluster) -> Iterator[Client]:
    """A client of the shared cluster that never uses shared memory nor the direct data path
    (everything through the controller)."""
    with ipp.Client(shared_cluster.client_file, shm=False, direct_data=False) as client:
        client.wait_for_engines(2, timeout=SHORT)
        yield client


def big_zeros(n: int) -> np.ndarray:
    a = np.zeros(n, dtype=np.uint8)  # untouched pages: cheap in RSS and time
    a[0], a[-1] = 3, 7
    return a


@pytest.mark.parametrize("path", ["shm", "lent"])
def test_array_over_2_gib_through_shared_memory(rc: Client, path: str) -> None:
    if path == "lent":
        need_lending()
    n = 2 * GIB + 100 * MIB
    a = big_zeros(n)
    saved, rc._shm.peer_read = rc._shm.peer_read, path == "lent"
    try:
        rc[0].push({"huge": a}, block=True)
    finally:
        rc._shm.peer_read = saved
    kind = "shm" if path == "shm" else "ndarray"
    assert rc[0].apply_sync(ends, Reference("huge")) == (n, 3, 7, kind, True)
    rc[0].execute("del huge", block=True)
    assert segments_of() == []


@pytest.fixture
def net_rc(rc: Client, shared_cluster: Cluster) -> Iterator[Client]:
    """A client of the shared cluster that never uses shared memory, with the direct data
    path probed (large buffers of waiting calls fetched over TCP, decision 0014)."""
    with ipp.Client(shared_cluster.client_file, shm=False) as client:
        client.wait_for_engines(2, timeout=SHORT)
        client._shm.known_local(list(client._uuids))
        wait_until(lambda: direct_ready(client), what="the direct data probes")
        yield client


def direct_ready(client: Client) -> bool:
    shm = client._shm
    return len(client._uuids) == 2 and all(
        shm._net_readers.get(u) and shm._net_lenders.get(u) for u in client._uuids
    )


@pytest.mark.parametrize("path", ["socket", "direct"])
def test_array_over_2_gib_over_the_socket(sock_rc: Client, net_rc: Client, path: str) -> None:
    sock_rc = sock_rc if path == "socket" else net_rc
    n = 2 * GIB + 16 * MIB
    a = big_zeros(n)
    sock_rc[0].push({"huge": a}, block=True)
    assert sock_rc[0].apply_sync(ends, Reference("huge")) == (n, 3, 7, "frame", True)
    back = sock_rc[0].apply_sync(lambda x: x[-3 * MIB :], Reference("huge"))
    assert back[-1] == 7 and back.size == 3 * MIB
    sock_rc[0].execute("del huge", block=True)


@pytest.mark.parametrize("path", ["socket", "shm", "lent"])
def test_thousands_of_buffers(rc: Client, sock_rc: Client, path: str) -> None:
    if path == "lent":
        need_lending()
    arrays = [np.full(300, i, dtype=np.int64) for i in range(5000)]  # 2400 B: out of band
    client = sock_rc if path == "socket" else rc
    saved = rc._shm.threshold, rc._shm.peer_read
    rc._shm.threshold, rc._shm.peer_read = 1024, path == "lent"
    try:
        client[0].push({"many": arrays}, block=True)
    finally:
        rc._shm.threshold, rc._shm.peer_read = saved
    kinds = client[0].apply_sync(lambda m: sorted({owner_kind(x) for x in m}), Reference("many"))
    assert kinds == [{"socket": "frame", "shm": "shm", "lent": "ndarray"}[path]]
    back = client[0].pull("many", block=True)
    assert len(back) == 5000 and all((b == i).all() for i, b in enumerate(back))


def test_more_buffers_than_a_message_carries_go_in_band(sock_rc: Client) -> None:
    """As in ipyparallel, any number of arrays can be sent: past the frame budget of a
    message, the rest are pickled in-band (both ways)."""
    n = MAX_BUFFERS + 2000
    arrays = [np.full(200, i, dtype=float) for i in range(n)]  # 1600 B each: out of band
    assert len(serialize_object(arrays)) - 1 <= OUT_OF_BAND_LIMIT + 1 < MAX_BUFFERS
    sock_rc[0].push({"many": arrays}, block=True)
    check = sock_rc[0].apply_sync(lambda m: (len(m), float(m[-1][0])), Reference("many"))
    assert check == (n, float(n - 1))
    back = sock_rc[0].apply_sync(
        lambda k: [__import__("numpy").full(200, i, dtype=float) for i in range(k)], n
    )
    assert len(back) == n and all(b[0] == i for i, b in enumerate(back))
    # the last guard, before anything is sent: frames the function and arguments need together
    with pytest.raises(ValueError, match=f"more than the {MAX_BUFFERS}"):
        check_buffer_count([b""] * (MAX_BUFFERS + 1), "request")
    sock_rc[0].execute("del many", block=True)


#: How the scripts below connect: ``argv[2]`` names the path (socket, direct, shm, lent).
CONNECT = """
    path = sys.argv[2]
    rc = ipp.Client(sys.argv[1], shm=path not in ("socket", "direct"),
                    peer_read=path == "lent", direct_data=path == "direct")
    rc.wait_for_engines(2, timeout=30)
    if path == "direct":  # wait for the probes: then large buffers are fetched directly
        import time
        rc._shm.known_local(list(rc._uuids))
        t = time.monotonic()
        while time.monotonic() - t < 20 and not all(
            rc._shm._net_readers.get(u) and rc._shm._net_lenders.get(u) for u in rc._uuids
        ):
            time.sleep(0.05)
"""


PEAK_SCRIPT = """
    import json, sys, numpy as np, ferroparallel as ipp
    def kib(field, pid="self"):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0
{connect}    warm = np.ones(2 << 20, dtype=np.uint8)
    rc[:].push({"warm": warm}, block=True)  # imports, probes, first-use allocations
    def engine_mem():
        import numpy as np
        return kib("VmRSS")
    rc[:].execute("a = None", block=True)  # what an earlier run left
    eng0 = rc[:].apply_sync(engine_mem)
    base = kib("VmHWM")
    a = np.ones(int(sys.argv[3]), dtype=np.uint8)
    rc[:].push({"a": a}, block=True)
    peak = kib("VmHWM")
    touched = rc[:].apply_sync(lambda x: int(x[::4096].sum()), ipp.Reference("a"))
    eng1 = rc[:].apply_sync(engine_mem)
    print(json.dumps({"base": base, "peak": peak, "n": a.nbytes,
                      "engine_growth": [b - x for x, b in zip(eng0, eng1)],
                      "touched": touched}))
    rc.close()
"""
PEAK_SCRIPT = PEAK_SCRIPT.replace("{connect}", CONNECT.lstrip("\n"))


@pytest.mark.parametrize("path", ["socket", "direct", "shm", "lent"])
def test_client_peak_rss_and_engine_copies(shared_cluster: Cluster, path: str) -> None:
    if path == "lent":
        need_lending()
    n = 256 * MIB
    proc = run_script(PEAK_SCRIPT, str(shared_cluster.client_file), path, str(n))
    out, err = proc.communicate(timeout=SHORT * 2)
    assert proc.returncode == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    assert growth <= 1.1 * n, f"client peak RSS grew by {growth / n:.2f}x the array"
    for g in r["engine_growth"]:  # one copy on each engine (pages of frame or mapping)
        assert 0.9 * n <= g <= 1.1 * n + 16 * MIB, f"engine RSS grew by {g / n:.2f}x"


INTERRUPT_SCRIPT = """
    import json, sys, time, numpy as np, ferroparallel as ipp
    from ferroparallel.serialize import shm
{connect}    rc[:].push({"warm": np.ones(2 << 20, dtype=np.uint8)}, block=True)
    a = np.ones(1 << 30, dtype=np.uint8)
    print("ready", flush=True)
    outcome = "completed"
    try:
        for _ in range(20):
            rc[:].push({"a": a}, block=True)
    except KeyboardInterrupt:
        outcome = "interrupted"
    rc.wait(timeout=60)
    same = rc[:].apply_sync(lambda x: int(x.sum()), np.arange(1000))
    pulled = rc[0].pull("warm", block=True).nbytes
    live = rc._shm.live_segments()
    rc.close()
    print(json.dumps({"outcome": outcome, "same": same, "pulled": pulled, "live": live,
                      "left": shm.our_segments()}), flush=True)
"""
INTERRUPT_SCRIPT = INTERRUPT_SCRIPT.replace("{connect}", CONNECT.lstrip("\n"))


@pytest.mark.parametrize("path", ["socket", "direct", "shm", "lent"])
def test_ctrl_c_during_a_big_push_leaves_everything_usable(
    rc: Client, shared_cluster: Cluster, path: str
) -> None:
    if path == "lent":
        need_lending()
    proc = run_script(INTERRUPT_SCRIPT, str(shared_cluster.client_file), path)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=SHORT * 2)
    assert proc.returncode == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["outcome"] == "interrupted", r
    assert r["same"] == [499500, 499500]
    assert r["pulled"] == 2 * MIB
    assert r["live"] == [] and r["left"] == []
    assert segments_of(proc.pid) == []
    # the engines serve other clients too
    assert rc[:].apply_sync(lambda: 2) == [2, 2]
    rc[:].execute("a = None", block=True)
