"""A minimal hub query over the registration channel: which engines are registered.

Used by the command line (``cluster start`` waits for its engines, ``cluster list`` shows how
many are registered) without constructing a full :class:`ferroparallel.Client`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["registered_engines"]


def _url(info: Mapping[str, Any], port: int) -> str:
    iface = str(info["interface"])
    transport, _, host = iface.partition("://")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    return f"{transport}://{host}:{port}"


def registered_engines(info: Mapping[str, Any], timeout: float = 2.0) -> dict[int, str] | None:
    """Ask the hub for its registered engines with one ``connection_request``.

    Parameters
    ----------
    info : Mapping
        Client (or engine) connection info: ``interface``, ``registration``, ``key``, ``pack``,
        and ``curve_serverkey`` when the controller uses CurveZMQ.
    timeout : float
        Seconds to wait for the reply.

    Returns
    -------
    dict or None
        Engine id -> uuid, or ``None`` when the hub did not answer in time.
    """
    import zmq

    from .._core import Session

    session = Session(
        str(info.get("key", "")).encode("ascii"),
        packer=str(info.get("pack") or "msgpack"),
        signature_scheme=str(info.get("signature_scheme") or "hmac-sha256"),
    )
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    serverkey = info.get("curve_serverkey")
    if serverkey:
        from ..curve import keypair

        if not zmq.has("curve"):
            sock.close(0)
            raise RuntimeError(
                "the controller uses CurveZMQ, but pyzmq's libzmq was built without CURVE"
            )
        public, secret = keypair()
        sock.curve_serverkey = str(serverkey).encode("ascii")
        sock.curve_publickey = public.encode("ascii")
        sock.curve_secretkey = secret.encode("ascii")
    try:
        sock.connect(_url(info, int(info["registration"])))
        frames = session.serialize("connection_request", {})
        sock.send_multipart([bytes(memoryview(f)) for f in frames])
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return None
            reply = session.deserialize(sock.recv_multipart(copy=True))
            if reply.get("msg_type") != "connection_reply":
                continue
            content = reply.get("content") or {}
            engines = content.get("engines") or {}
            return {int(k): str(v) for k, v in engines.items()}
    finally:
        with contextlib.suppress(Exception):
            sock.close(0)
