"""Sync round trip of a no-op on one engine, vs ipyparallel, Dask and a raw pyzmq echo floor.

One 2-engine cluster per framework, all started before measuring and stopped at the end:

- ferroparallel and ipyparallel: ``rc[0].apply_sync(noop)``;
- Dask (reference): ``client.submit(noop, pure=False).result()`` (500 calls in a full run, as
  each takes about 10 ms: the client batches its messages to the scheduler every 10 ms);
- raw pyzmq (the floor): a DEALER in this process sends a 3-frame message shaped like an
  apply request (a ~200-byte JSON header, ``{}`` content, a ~60-byte pickled-function buffer)
  to a ROUTER in a separate Python process that sends it straight back (pyzmq, TCP loopback as
  the clusters use);
- raw pyzmq through a relay: the same, but through a third process running ``zmq.proxy``
  (ROUTER -> DEALER, in C) between the two, as a controller sits between client and engine: the
  floor of that topology;
- the same two floors over abstract Unix sockets (``ipc``): a local ferroparallel cluster talks
  over such sockets (``ferroparallel.ipc``), so these are its floors on one machine, while the
  TCP rows are the floors of a cluster spread over machines (and of ipyparallel's).

Every call is timed on its own (``time.perf_counter``, garbage collector paused per batch),
after a warm-up. The calls are split in rounds and the contenders take turns in each round, so a
burst of load from other processes on the machine hits all of them alike. Dask is measured in a
second phase, alone: an idle Dask cluster keeps about 13% of a core busy (event-loop ticks,
heartbeats, monitors), which would slow the others down on a 2-core machine. Reported: the
median, 10th and 90th percentiles in µs, and ``ratio`` = ferroparallel's median / this row's
median (ipyparallel row: ferroparallel/ipyparallel, below 1 means ferroparallel is faster; raw
rows: how many times the floor ferroparallel costs).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zmq  # noqa: E402
from _frameworks import (  # noqa: E402
    FRAMEWORKS,
    Running,
    gc_paused,
    isolated_env,
    label,
    median,
    missing,
    percentile,
    ratio,
    running,
)
from _tasks import noop  # noqa: E402
from _util import end_process as _end  # noqa: E402

NAME = "roundtrip"

#: The echo server: a ROUTER bound to a random loopback port (printed), echoing every message
#: until it receives the single frame ``b"stop"``.
#: How long the raw pyzmq floors wait for one echo before giving up.
RECV_TIMEOUT_MS = 30_000

_ECHO_SERVER = """
import sys
import zmq

ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.setsockopt(zmq.LINGER, 0)
# no high-water mark: a ROUTER drops what it cannot queue, and a lost echo would stall the
# pipelined floor (ferroparallel's sockets have none either)
sock.setsockopt(zmq.SNDHWM, 0)
sock.setsockopt(zmq.RCVHWM, 0)
if len(sys.argv) > 1:  # an ipc:// endpoint to bind
    sock.bind(sys.argv[1])
    url = sys.argv[1]
else:
    url = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
sys.stdout.write(f"{url}\\n")
sys.stdout.flush()
while True:
    msg = sock.recv_multipart()
    if len(msg) == 2 and msg[1] == b"stop":
        break
    sock.send_multipart(msg)
sock.close()
ctx.term()
"""

#: The relay: ``zmq.proxy`` from a ROUTER bound to a random port (or the ``ipc://`` endpoint
#: ``argv[2]``; its URL printed) to a DEALER connected to the echo server at URL ``argv[1]``;
#: runs until terminated.
_RELAY = """
import sys
import zmq

ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER)
back = ctx.socket(zmq.DEALER)
for s in (front, back):
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
back.connect(sys.argv[1])
if len(sys.argv) > 2:
    front.bind(sys.argv[2])
    url = sys.argv[2]
else:
    url = f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}"
sys.stdout.write(f"{url}\\n")
sys.stdout.flush()
zmq.proxy(front, back)
"""


def _request_frames() -> list[bytes]:
    """Three frames the size of an ``apply_request``'s header, content and function buffer."""
    header = {
        "msg_id": "8d2c3f0e-41a7-4bde-9c55-0f3a2b1c9d7e_1234_5",
        "msg_type": "apply_request",
        "username": "bench",
        "session": "4f1e2d3c-5b6a-4798-8a9b-0c1d2e3f4a5b",
        "date": "2026-01-01T00:00:00.000000Z",
        "version": "8.5",
    }
    return [json.dumps(header).encode(), b"{}", pickle.dumps((noop, (), {}))]


def _spawn(script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -c script args...``; return it and the URL it prints first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line.strip():
        _end(proc)
        raise RuntimeError(f"helper process did not start (exit code {proc.poll()})")
    return proc, line.strip()


@contextlib.contextmanager
def pyzmq_sockets(transport: str = "tcp") -> Iterator[tuple[list[bytes], zmq.Socket, zmq.Socket]]:
    """Start the echo server and the relay; yield the request frames and two connected DEALER
    sockets (direct to the echo server, and through the relay).

    ``transport``: ``"tcp"`` (loopback) or ``"ipc"`` (abstract Unix sockets, as a local
    ferroparallel cluster uses; see ``ferroparallel.ipc``). Both helper processes are stopped
    on exit.
    """
    procs: list[subprocess.Popen[str]] = []
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    if transport == "ipc":
        tag = f"@fpbench-{os.getpid()}-{time.monotonic_ns()}"
        names = ((f"ipc://{tag}-echo",), (f"ipc://{tag}-relay",))
    try:
        echo, echo_url = _spawn(_ECHO_SERVER, *names[0])
        procs.append(echo)
        relay, relay_url = _spawn(_RELAY, echo_url, *names[1])
        procs.append(relay)
        for url in (echo_url, relay_url):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)  # a lost echo fails, not hangs
            sock.connect(url)
            socks.append(sock)
        yield _request_frames(), socks[0], socks[1]
    finally:
        if socks:
            with contextlib.suppress(zmq.ZMQError):
                socks[0].send(b"stop", zmq.NOBLOCK)
        for proc in procs:
            if proc is not procs[0]:
                proc.terminate()
            _end(proc)
        for sock in socks:
            sock.close()
        ctx.term()


@contextlib.contextmanager
def pyzmq_floors(
    transport: str = "tcp",
) -> Iterator[tuple[Callable[[], object], Callable[[], object]]]:
    """Start the echo server and the relay; yield two round trips (direct, relayed)."""
    with pyzmq_sockets(transport) as (frames, direct, relayed):
        calls = []
        for sock in (direct, relayed):

            def call(send: Any = sock.send_multipart, recv: Any = sock.recv_multipart) -> object:
                send(frames)
                return recv()

            calls.append(call)
        yield calls[0], calls[1]


def pipelined_rate(sock: zmq.Socket, frames: list[bytes], n: int, window: int = 1000) -> float:
    """Messages per second of ``n`` echoes with up to ``window`` in flight (the pipelined
    floor of task throughput). Raises RuntimeError when an echo does not come back within
    :data:`RECV_TIMEOUT_MS`."""
    t0 = time.perf_counter()
    sent = received = 0
    while received < n:
        while sent < n and sent - received < window:
            sock.send_multipart(frames)
            sent += 1
        try:
            sock.recv_multipart()
        except zmq.Again:
            secs = RECV_TIMEOUT_MS / 1000
            raise RuntimeError(f"echo {received + 1} of {n} not back within {secs:g} s") from None
        received += 1
    return n / (time.perf_counter() - t0)


def _time_calls(call: Callable[[], object], n: int, out: list[float]) -> None:
    """Append the duration in µs of each of ``n`` calls of ``call`` to ``out``."""
    clock = time.perf_counter
    with gc_paused():
        for _ in range(n):
            t0 = clock()
            call()
            out.append((clock() - t0) * 1e6)


def _contenders(clusters: dict[str, Running]) -> list[tuple[str, str, Callable[[], object]]]:
    """``(label, operation, one round trip)`` for each running cluster."""
    out: list[tuple[str, str, Callable[[], object]]] = []
    for name, cluster in clusters.items():
        if name == "dask":

            def call(client: Any = cluster.client) -> object:
                return client.submit(noop, pure=False).result()

            out.append((cluster.label, "client.submit(noop).result()", call))
        else:

            def call(view: Any = cluster.client[0]) -> object:
                return view.apply_sync(noop)

            out.append((cluster.label, "rc[0].apply_sync(noop)", call))
    return out


def _measure(
    contenders: list[tuple[str, str, Callable[[], object]]],
    calls: int,
    rounds: int,
    warmup: int,
    samples: dict[str, list[float]],
) -> None:
    """Warm every contender up, then time ``calls`` calls of each, alternating in ``rounds``."""
    for _, _, call in contenders:
        _time_calls(call, warmup, [])
    for _ in range(rounds):
        for lab, _, call in contenders:
            _time_calls(call, calls // rounds, samples.setdefault(lab, []))


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure the sync round trip of every contender.

    Parameters
    ----------
    quick : bool
        300 timed calls per contender (in 3 rounds) instead of 2000 (in 10 rounds; Dask, at
        about 10 ms a call, 500).

    Returns
    -------
    list of dict
        One row per contender (a row with a note for a peer that is not installed).
    """
    calls, rounds, warmup = (300, 3, 50) if quick else (2000, 10, 200)
    dask_calls = 300 if quick else 500  # ~10 ms each: enough for a median, keeps the run short
    raw = f"raw pyzmq {zmq.__version__}"
    samples: dict[str, list[float]] = {}
    order: list[tuple[str, str]] = []
    with isolated_env():
        why = {name: missing(name) for name in FRAMEWORKS}
        installed = [name for name in FRAMEWORKS if why[name] is None]
        # Phase 1: the frameworks that are quiet when idle, and the floors, taking turns.
        quiet = [name for name in installed if name != "dask"]
        with (
            running(quiet) as clusters,
            pyzmq_floors() as (direct, relayed),
            pyzmq_floors("ipc") as (ipc_direct, ipc_relayed),
        ):
            contenders = _contenders(clusters)
            contenders[1:1] = [
                (raw, "DEALER->ROUTER echo, 3 frames, TCP", direct),
                (f"{raw} relay", "same via a zmq.proxy process", relayed),
                (f"{raw} ipc", "same echo over Unix sockets", ipc_direct),
                (f"{raw} ipc relay", "same relay over Unix sockets", ipc_relayed),
            ]
            _measure(contenders, calls, rounds, warmup, samples)
            order += [(lab, op) for lab, op, _ in contenders]
        # Phase 2: Dask alone.
        if "dask" in installed:
            with running(["dask"]) as clusters:
                contenders = _contenders(clusters)
                _measure(contenders, dask_calls, rounds, warmup // 4, samples)
                order += [(lab, op) for lab, op, _ in contenders]

    fp_median = median(samples.get(label("ferroparallel"), []))
    rows: list[dict[str, Any]] = []
    for lab, op in order:
        times = samples[lab]
        rows.append(
            {
                "contender": lab,
                "op": op,
                "calls": len(times),
                "median_us": median(times),
                "p10_us": percentile(times, 10),
                "p90_us": percentile(times, 90),
                "ratio": ratio(fp_median, median(times)),
                "note": "measured alone, after the others" if lab.startswith("dask") else "",
            }
        )
    for name in FRAMEWORKS:
        if why[name] is not None:
            rows.append({"contender": label(name), "note": why[name]})
    return rows
