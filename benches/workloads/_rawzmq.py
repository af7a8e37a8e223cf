"""The raw pyzmq floor of the ``data`` workload: array transfers with nothing but pyzmq.

Not a workload (the name starts with ``_``). Run as a script, this file is the *server*: a
ROUTER bound to a random TCP loopback port (printed on stdout) in its own process, standing in
for an engine. :class:`RawPeers` starts one server per engine and talks to them with DEALER
sockets. Every array goes as one frame, zero-copy (``copy=False``) on both sides, and the
replies are small acknowledgements: the least any ZMQ framework has to do to move the data.

Requests (first frame the command, then the arguments; the reply is one small frame unless
said otherwise):

==========================  ===============================================================
``push <name> <data>``      keep the frame ``data`` under ``name``; reply ``ok``
``pull <name>``             reply with the frame kept under ``name`` (zero-copy)
``check <name>``            reply with ``_tasks.checksum`` of it (JSON)
``sum <data>``              reply with ``data.sum()`` as float64 (repr): ``apply`` floor
``clear``                   forget every frame; reply ``ok``
``stop``                    exit (no reply)
==========================  ===============================================================
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq

HERE = Path(__file__).resolve().parent


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
        ident, cmd, *args = sock.recv_multipart(copy=False)
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
        sock.send_multipart([ident, reply], copy=False)
    sock.close()
    ctx.term()


def _end(proc: subprocess.Popen[str]) -> None:
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


class RawPeers:
    """``n`` server processes and a DEALER connected to each; call :meth:`close` when done.

    Must be created inside ``_frameworks.isolated_env`` (the servers import ``_tasks`` from
    ``PYTHONPATH``).

    Parameters
    ----------
    n : int
        Number of servers ("engines").
    """

    def __init__(self, n: int) -> None:
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen[str]] = []
        self.socks: list[zmq.Socket] = []
        try:
            for _ in range(n):
                proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve())],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                self.procs.append(proc)
                line = proc.stdout.readline() if proc.stdout is not None else ""
                if not line.strip():
                    raise RuntimeError(f"raw pyzmq server did not start ({proc.poll()})")
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://127.0.0.1:{int(line)}")
                self.socks.append(sock)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """Pids of the server processes."""
        return [proc.pid for proc in self.procs]

    def request(self, k: int, *frames: Any) -> list[zmq.Frame]:
        """Send ``frames`` (zero-copy) to the first ``k`` servers; their replies, in order."""
        for sock in self.socks[:k]:
            sock.send_multipart(frames, copy=False)
        return [sock.recv(copy=False) for sock in self.socks[:k]]

    def request_each(self, parts: list[tuple[Any, ...]]) -> list[zmq.Frame]:
        """Send ``parts[i]`` to server ``i`` (all first, then wait); their replies."""
        for sock, frames in zip(self.socks, parts, strict=False):
            sock.send_multipart(frames, copy=False)
        return [sock.recv(copy=False) for sock in self.socks[: len(parts)]]

    def close(self) -> None:
        """Stop the servers and close the sockets (idempotent)."""
        for sock in self.socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.send(b"stop", zmq.NOBLOCK)
        for proc in self.procs:
            _end(proc)
        for sock in self.socks:
            sock.close()
        self.socks, self.procs = [], []
        if not self.ctx.closed:
            self.ctx.term()


if __name__ == "__main__":
    serve()
