"""Envelope build+sign and parse+verify per second: Rust core vs the pure-Python peer.

Two messages: a 100-byte content (the packed content part is 100 bytes), and an empty content
with one 1 MiB buffer. Both signed with HMAC-SHA256, one routing ident, msgpack and JSON.

- ``build+sign``: ``Session.serialize(...)`` -> frames (header creation, packing of the four
  parts, HMAC, frame list).
- ``parse+verify``: ``Session.deserialize(frames)`` on distinct messages (so the replay history
  is exercised as in real traffic): split, verify, record the digest, unpack.

Both sides parse the same frames (bytes, as ``recv_multipart()`` returns them) and run
alternately in each round; the best of several rounds is reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import best_of_interleaved, calibrate, load_peer_session  # noqa: E402

NAME = "envelope"
KEY = b"benchmark-key-0123456789abcdef"
MIB = 1 << 20


def _cases(peer_module: Any) -> list[tuple[str, dict[str, Any], list[bytes]]]:
    """``(label, content, buffers)`` for each message shape."""
    probe = peer_module.Session(packer="msgpack")
    filler = 100 - len(probe.pack({"code": ""})) - 1  # str8 header takes one more byte
    content = {"code": "x" * filler}
    assert len(probe.pack(content)) == 100, len(probe.pack(content))
    return [
        ("100 B content", content, []),
        ("1 MiB buffer", {}, [bytes(MIB)]),
    ]


def _serialize_loop(session: Any, content: dict[str, Any], buffers: list[bytes]) -> Callable:
    serialize = session.serialize
    ident = [b"engine-0"]

    def loop(n: int) -> None:
        for _ in range(n):
            serialize("apply_request", content, None, None, ident=ident, buffers=buffers)

    return loop


def _deserialize_run(factory: Callable[[], Any], messages: list[list[bytes]]) -> Callable:
    """One timed run: a fresh session (empty history) parses every message once."""

    def run() -> None:
        deserialize = factory().deserialize
        for frames in messages:
            deserialize(frames)

    return run


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure both operations for both message shapes and both packers.

    Parameters
    ----------
    quick : bool
        Shorter runs and fewer rounds (a smoke test, numbers are rough).

    Returns
    -------
    list of dict
        One row per (case, operation, packer) with messages per second for each side and the
        Rust/Python ratio.
    """
    from ferroparallel import _core

    peer_module = load_peer_session()
    target = 0.05 if quick else 0.25
    repeats = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    for packer in ("msgpack", "json"):
        for label, content, buffers in _cases(peer_module):
            rust = _core.Session(KEY, packer=packer)
            python = peer_module.Session(KEY, packer=packer)

            # build + sign
            loops = {
                "rust": _serialize_loop(rust, content, buffers),
                "python": _serialize_loop(python, content, buffers),
            }
            n = calibrate(loops["python"], target, floor=200, cap=200_000)
            best = best_of_interleaved(
                [(side, lambda f=f, n=n: f(n)) for side, f in loops.items()], repeats
            )
            rows.append(_row(label, "build+sign", packer, n, best))

            # parse + verify (distinct messages, fresh history per run)
            sender = peer_module.Session(KEY, packer=packer)
            one = sender.serialize("apply_request", content, ident=[b"engine-0"], buffers=buffers)
            probe = peer_module.Session(KEY, packer=packer)

            def probe_loop(k: int, probe: Any = probe, one: list[bytes] = one) -> None:
                for _ in range(k):
                    probe.deserialize(one, record=False)

            n = calibrate(probe_loop, target, floor=200, cap=100_000)
            # The peer's frames are bytes already; the buffer object is shared, not copied.
            messages = [
                sender.serialize("apply_request", content, ident=[b"engine-0"], buffers=buffers)
                for _ in range(n)
            ]
            best = best_of_interleaved(
                [
                    (
                        "rust",
                        _deserialize_run(lambda p=packer: _core.Session(KEY, packer=p), messages),
                    ),
                    (
                        "python",
                        _deserialize_run(
                            lambda p=packer: peer_module.Session(KEY, packer=p), messages
                        ),
                    ),
                ],
                repeats,
            )
            rows.append(_row(label, "parse+verify", packer, n, best))
            del messages
    return rows


def _row(case: str, op: str, packer: str, n: int, best: dict[str, float]) -> dict[str, Any]:
    rust_rate = n / best["rust"]
    python_rate = n / best["python"]
    return {
        "case": case,
        "op": op,
        "packer": packer,
        "n": n,
        "rust_msg_s": rust_rate,
        "python_msg_s": python_rate,
        "rust_us": 1e6 / rust_rate,
        "python_us": 1e6 / python_rate,
        "ratio": rust_rate / python_rate,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
