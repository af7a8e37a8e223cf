"""The raw pyzmq floor of the ``data`` workload: array transfers with nothing but pyzmq.

Not a workload (the name starts with ``_``). Run as a script, this file is the *server*: a
ROUTER bound to a random TCP loopback port (printed on stdout) in its own process, standing in
for an engine. :class:`RawPeers` starts one server per engine and talks to them with DEALER
sockets. Every array goes as one frame, zero-copy (``copy=False``) on both sides, and the
replies are small acknowledgements: the least any ZMQ framework has to do to move the data.

Requests (an empty delimiter frame, the command, then the arguments; the reply is the
delimiter and one small frame unless said otherwise):

==========================  ===============================================================
``push <name> <data>``      keep the frame ``data`` under ``name``; reply ``ok``
``pull <name>``             reply with the frame kept under ``name`` (zero-copy)
``check <name>``            reply with ``_tasks.checksum`` of it (JSON)
``sum <data>``              reply with ``data.sum()`` as float64 (repr): ``apply`` floor
``clear``                   forget every frame; reply ``ok``
``stop``                    exit (no reply)
==========================  ===============================================================

With ``relay=True`` a ``zmq.proxy`` process sits between the client and each server, as a
controller sits between a client and an engine: every message crosses one more process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq
from _util import end_process as _end

#: How long a request may wait for its reply before failing (ms).
TIMEOUT_MS = 300_000


def serve() -> None:
    """The server loop (runs in the helper process until ``stop``)."""
    import numpy as np
    from _tasks import checksum

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    kept: dict[bytes, zmq.Frame] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        # The routing frames (one per ROUTER crossed: the relay adds one) end with b"".
        split = next(i for i, f in enumerate(frames) if not f.bytes) + 1
        route, (cmd, *args) = frames[:split], frames[split:]
        command = cmd.bytes
        if command == b"stop":
            break
        if command == b"push":
            kept[args[0].bytes] = args[1]
            reply: Any = b"ok"
        elif command == b"pull":
            reply = kept[args[0].bytes]
        elif command == b"check":
            reply = json.dumps(checksum(np.frombuffer(kept[args[0].bytes].buffer))).encode()
        elif command == b"sum":
            reply = repr(float(np.frombuffer(args[0].buffer).sum())).encode()
        elif command == b"clear":
            kept.clear()
            reply = b"ok"
        else:
            reply = b"unknown command " + command
        sock.send_multipart([*route, reply], copy=False)
    sock.close()
    ctx.term()


def relay(port: int) -> None:
    """``zmq.proxy`` (in C) from a ROUTER on a random port (printed) to a DEALER on ``port``.

    Runs in a helper process until terminated: the floor of a client -> controller -> engine
    topology, where every message crosses a middle process.
    """
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    back.connect(f"tcp://127.0.0.1:{port}")
    front_port = front.bind_to_random_port("tcp://127.0.0.1")
    sys.stdout.write(f"{front_port}\n")
    sys.stdout.flush()
    zmq.proxy(front, back)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Run this file with ``args`` in a new process; it and the port it prints first."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line.strip():
        _end(proc)
        raise RuntimeError(f"raw pyzmq helper {args} did not start (exit code {proc.poll()})")
    return proc, int(line)


class RawPeers:
    """``n`` server processes and a DEALER connected to each; call :meth:`close` when done.

    Must be created inside ``_frameworks.isolated_env`` (the servers import ``_tasks`` from
    ``PYTHONPATH``).

    Parameters
    ----------
    n : int
        Number of servers ("engines").
    relay : bool
        Put a :func:`relay` process in front of each server (the DEALERs connect to those).
    """

    def __init__(self, n: int, relay: bool = False) -> None:
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen[str]] = []
        self.servers: list[int] = []
        self.socks: list[zmq.Socket] = []
        try:
            for _ in range(n):
                proc, port = _spawn()
                self.procs.append(proc)
                self.servers.append(proc.pid)
                if relay:
                    proc, port = _spawn("relay", str(port))
                    self.procs.append(proc)
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
                sock.connect(f"tcp://127.0.0.1:{port}")
                self.socks.append(sock)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """Pids of the server processes."""
        return list(self.servers)

    @property
    def relay_pids(self) -> list[int]:
        """Pids of the relay processes (empty without relays)."""
        return [proc.pid for proc in self.procs if proc.pid not in self.servers]

    def request(self, k: int, *frames: Any) -> list[zmq.Frame]:
        """Send ``frames`` (zero-copy) to the first ``k`` servers; their replies, in order."""
        return self.request_each([frames] * k)

    def request_each(self, parts: list[tuple[Any, ...]]) -> list[zmq.Frame]:
        """Send ``parts[i]`` to server ``i`` (all first, then wait); their replies.

        Raises
        ------
        zmq.Again
            If a server does not answer within :data:`TIMEOUT_MS`.
        """
        socks = self.socks[: len(parts)]
        for sock, frames in zip(socks, parts, strict=True):
            sock.send_multipart([b"", *frames], copy=False)
        return [sock.recv_multipart(copy=False)[-1] for sock in socks]

    def close(self) -> None:
        """Stop the servers and close the sockets (idempotent)."""
        for sock in self.socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([b"", b"stop"], zmq.NOBLOCK)
        for proc in self.procs:
            if proc.pid not in self.servers:
                proc.terminate()  # a relay runs until terminated
            _end(proc)
        for sock in self.socks:
            sock.close()
        self.socks, self.procs = [], []
        if not self.ctx.closed:
            self.ctx.term()


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        relay(int(sys.argv[2]))
    else:
        serve()
