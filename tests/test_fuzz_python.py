"""Property-based fuzzing of the Python entry points that take bytes from the network.

- ``ferroparallel.serialize``: random and mutated pickles / apply payloads must raise an
  ordinary exception (never crash or escape as ``BaseException``). Unpickling runs code by
  design once a message's HMAC is verified; what matters is that malformed-but-signed input
  fails cleanly, and that unverified input never gets here (checked below on the Session).
- ``_core.Session.deserialize``: random frames and every kind of mutation of a genuine message
  (flipped bytes in the signature, the four parts or the buffers, dropped or added frames,
  replays, other keys) are refused with a ``MessageError``.
- Connection files: arbitrary bytes and JSON values are refused with ``ConnectionFileError``.

CI runs a short profile. For a long run, set ``FP_FUZZ_EXAMPLES`` (examples per test), e.g.
``FP_FUZZ_EXAMPLES=200000 pytest tests/test_fuzz_python.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferroparallel import _core
from ferroparallel.engine.connection import load_connection_info
from ferroparallel.error import ConnectionFileError, InvalidSignature, MessageError
from ferroparallel.paths import load_connection_file
from ferroparallel.serialize import (
    load_object,
    pack_apply_message,
    serialize_object,
    unpack_apply_message,
)

#: Examples per test: small in CI, large for a long fuzzing run.
EXAMPLES = int(os.environ.get("FP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEY = b"fuzz-key"
DELIM = b"<IDS|MSG>"

frames_st = st.lists(st.binary(max_size=64), max_size=12)


#: Address space a call may add (see ``memory_cap``).
MEMORY_HEADROOM = 2 << 30


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``headroom`` (Linux).

    A mutated pickle can ask for an arbitrary allocation (e.g. a length field turned into
    10^10): with the cap that is a ``MemoryError``, without it the kernel's OOM killer ends the
    test run, and possibly other processes on the machine.
    """
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
    except OSError:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def outcome(call: Any, *args: Any) -> BaseException | None:
    """Run ``call`` under ``memory_cap``; return the exception it raised (None on success).
    Re-raise anything that is not an ordinary ``Exception``: that would take a process down."""
    try:
        with memory_cap():
            call(*args)
    except Exception as e:  # noqa: BLE001 - any ordinary exception is a clean refusal
        return e
    return None


def mutate(frames: Sequence[bytes], data: st.DataObject, first: int = 0) -> list[bytes]:
    """One random mutation of a message: flip a byte, truncate or empty a frame, drop, add,
    duplicate or swap frames. ``first`` is the first frame index that may be touched."""
    out = [bytes(f) for f in frames]
    kind = data.draw(st.sampled_from(["flip", "truncate", "drop", "add", "dup", "swap"]))
    i = data.draw(st.integers(first, max(first, len(out) - 1)))
    if kind == "flip" and out and out[i]:
        j = data.draw(st.integers(0, len(out[i]) - 1))
        bit = 1 << data.draw(st.integers(0, 7))
        f = bytearray(out[i])
        f[j] ^= bit
        out[i] = bytes(f)
    elif kind == "truncate" and out:
        out[i] = out[i][: data.draw(st.integers(0, max(0, len(out[i]) - 1)))]
    elif kind == "drop" and len(out) > first:
        del out[i]
    elif kind == "dup" and out:
        out.insert(i, out[i])
    elif kind == "swap" and len(out) > first + 1:
        j = data.draw(st.integers(first, len(out) - 1))
        out[i], out[j] = out[j], out[i]
    else:
        out.insert(i, data.draw(st.binary(max_size=32)))
    return out


# ----- serialize ------------------------------------------------------------------------------

SAMPLES: list[Any] = [
    None,
    1,
    "text",
    {"a": [1, 2.5, b"x" * 10]},
    b"y" * 5000,  # out-of-band
    bytearray(b"z" * 3000),
    (lambda x: x + 1),
]


@FUZZ
@given(frames=st.lists(st.binary(max_size=200), min_size=1, max_size=6))
def test_random_frames_never_crash_deserialize(frames: list[bytes]) -> None:
    outcome(load_object, frames)


@FUZZ
@given(sample=st.sampled_from(range(len(SAMPLES))), data=st.data())
def test_mutated_pickles_raise_cleanly(sample: int, data: st.DataObject) -> None:
    frames = [bytes(memoryview(f)) for f in serialize_object(SAMPLES[sample], threshold=1024)]
    outcome(load_object, mutate(frames, data))


@FUZZ
@given(data=st.data())
def test_mutated_apply_payloads_raise_cleanly(data: st.DataObject) -> None:
    frames = [bytes(memoryview(f)) for f in pack_apply_message(max, (1, b"q" * 4000), {})]
    bad = mutate(frames, data)
    err = outcome(unpack_apply_message, bad)
    if err is None:
        # Only a mutation that leaves the payload meaningful may succeed.
        f, args, kwargs = unpack_apply_message(bad)
        assert isinstance(args, tuple) and isinstance(kwargs, dict)


def test_malformed_pickles_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no frames"):
        load_object([])
    with pytest.raises((pickle.UnpicklingError, EOFError, ValueError)):
        load_object([b"\x80\x05garbage"])
    with pytest.raises(ValueError, match="apply header"):
        unpack_apply_message([b"x", b"y", b"z"])


# ----- Session.deserialize ------------------------------------------------------------------


def session(key: bytes = KEY, packer: str = "msgpack") -> Any:
    return _core.Session(key, packer=packer, history_size=1024)


def genuine(sender: Any, n_buffers: int) -> list[bytes]:
    bufs = [bytes([i]) * (i * 7 + 1) for i in range(n_buffers)]
    frames = sender.serialize(
        "apply_request",
        {"code": "x"},
        {},
        {"targets": [1]},
        ident=[b"client"],
        buffers=bufs,
    )
    return [bytes(memoryview(f)) for f in frames]


@FUZZ
@given(frames=frames_st, delim=st.booleans(), key=st.sampled_from([KEY, b""]))
def test_random_frames_never_pass_verification(
    frames: list[bytes], delim: bool, key: bytes
) -> None:
    if delim:
        frames = [*frames[:1], DELIM, *frames[1:]]
    for packer in ("msgpack", "json"):
        err = outcome(session(key, packer).deserialize, frames)
        if key:
            # Random bytes are never a valid HMAC.
            assert isinstance(err, MessageError), err
        else:
            assert err is None or isinstance(err, MessageError), err


@FUZZ
@given(
    n_buffers=st.integers(0, 3),
    packer=st.sampled_from(["msgpack", "json"]),
    data=st.data(),
)
def test_mutated_messages_are_refused(n_buffers: int, packer: str, data: st.DataObject) -> None:
    sender = session(packer=packer)
    frames = genuine(sender, n_buffers)
    delim = frames.index(DELIM)
    bad = mutate(frames, data, first=delim + 1)
    receiver = session(packer=packer)
    err = outcome(receiver.deserialize, bad)
    if bad == frames:
        assert err is None
        # A second delivery is a replay.
        assert isinstance(outcome(receiver.deserialize, bad), MessageError)
        return
    if err is None:
        # The only accepted changes: an extra trailing buffer or a duplicated/swapped buffer
        # when the message had none to digest. Everything covered by the HMAC is intact.
        assert bad[: delim + 6] == frames[: delim + 6]
        assert n_buffers == 0
    else:
        assert isinstance(err, MessageError), err


@FUZZ
@given(n_buffers=st.integers(1, 4), data=st.data())
def test_swapped_buffers_are_invalid_signatures(n_buffers: int, data: st.DataObject) -> None:
    frames = genuine(session(), n_buffers)
    head = frames[: frames.index(DELIM) + 6]
    others = data.draw(st.lists(st.binary(max_size=40), min_size=0, max_size=4))
    if others == frames[len(head) :]:
        return
    with pytest.raises(InvalidSignature):
        session().deserialize(head + others)


def test_wrong_key_unsigned_and_digestless_peers() -> None:
    frames = genuine(session(), 2)
    with pytest.raises(InvalidSignature):
        session(b"other").deserialize(frames)
    unsigned = genuine(session(b""), 2)
    with pytest.raises(MessageError):
        session().deserialize(unsigned)
    # A peer that does not digest its buffers (ipyparallel) is still understood.
    plain = _core.Session(KEY, sign_buffers=False)
    assert not plain.sign_buffers
    msg = session().deserialize(genuine(plain, 2))
    assert "buffers_mac" not in msg["metadata"]
    assert len(msg["buffers"]) == 2
    signed = session().deserialize(genuine(session(), 2))
    assert len(signed["metadata"]["buffers_mac"]) == 64


# ----- connection files -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
PORT_KEYS = [
    "registration",
    "control",
    "mux",
    "task",
    "iopub",
    "hb_ping",
    "hb_pong",
    "notification",
    "task_scheme",
]


def connection_like() -> st.SearchStrategy[dict[str, Any]]:
    """Dicts that look like connection info, with random values."""
    keys = ["key", "signature_scheme", "location", "interface", "ssh", "pack", "unpack", *PORT_KEYS]
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_connection_files_are_refused_cleanly(raw: bytes, tmp_path_factory: Any) -> None:
    path: Path = tmp_path_factory.mktemp("conn") / "c.json"
    path.write_bytes(raw)
    path.chmod(0o600)
    for role in (None, "client", "engine"):
        err = outcome(load_connection_file, path, role)
        assert err is None or isinstance(err, ConnectionFileError), repr(err)


@FUZZ
@given(info=connection_like())
def test_connection_like_info_is_refused_cleanly(
    info: dict[str, Any], tmp_path_factory: Any
) -> None:
    text = json.dumps(info)
    path: Path = tmp_path_factory.mktemp("conn") / "c.json"
    path.write_text(text)
    path.chmod(0o600)
    for role in (None, "client", "engine"):
        err = outcome(load_connection_file, path, role)
        assert err is None or isinstance(err, ConnectionFileError), repr(err)
    err = outcome(
        lambda: load_connection_info(environ={"FERROPARALLEL_CONNECTION_INFO": text}, wait=0)
    )
    assert err is None or isinstance(err, ConnectionFileError), repr(err)
