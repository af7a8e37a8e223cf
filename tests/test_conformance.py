"""The Rust envelope against the independent pure-Python peer (``tests/peer``).

(a) in process: frames built by ``_core.Session`` parse with the peer and the other way round,
    signatures and msgpack bytes are identical, headers carry every required field;
(b) over real pyzmq sockets on 127.0.0.1: a pyzmq peer exchanging messages with an
    ``_core.IoThread`` (DEALER<->ROUTER both ways, PUB->SUB both ways), with 1 MiB buffers,
    identity routing and replies carrying the parent header;
(c) the I/O thread drops garbage (unsigned, forged, replayed, truncated, undelimited,
    unpackable, 10 MB junk), reports it in ``take_errors()`` with the right class names, and
    keeps serving the next valid message.

Every receive has a timeout, so a missing message fails the test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import zmq

from ferroparallel import _core, error
from peer.session import DELIMITER, PeerWireError, recv_frames
from peer.session import Session as PeerSession

KEY = b"conformance-key-\x00\xff-binary-ok"
LOCAL = "tcp://127.0.0.1"
TIMEOUT = 5.0
MIB = 1 << 20
HEADER_FIELDS = {"msg_id", "msg_type", "username", "session", "date", "version"}
DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SESSION_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{24}$")
WIRE_ERROR_NAMES = {
    "MalformedMessage",
    "UnsignedMessage",
    "InvalidSignature",
    "DuplicateSignature",
    "UnpackError",
    "MessageTooLarge",
}


@pytest.fixture(params=["msgpack", "json"])
def packer(request: pytest.FixtureRequest) -> str:
    """Each supported packer."""
    return request.param


@pytest.fixture(params=[KEY, b""], ids=["key", "nokey"])
def key(request: pytest.FixtureRequest) -> bytes:
    """With and without an HMAC key."""
    return request.param


def as_bytes(frames: list[Any]) -> list[bytes]:
    """Copy every frame to bytes (for comparisons)."""
    return [bytes(f) for f in frames]


def check_header(header: dict[str, Any], session: str, msg_type: str) -> None:
    """A header has every required field, well formed."""
    assert set(header) >= HEADER_FIELDS
    assert header["msg_type"] == msg_type
    assert header["session"] == session
    assert re.fullmatch(rf"{re.escape(session)}_{os.getpid()}_\d+", header["msg_id"])
    assert DATE_RE.match(header["date"]), header["date"]
    assert header["version"] == "5.4"
    assert isinstance(header["username"], str)


# =============================================================================================
# (a) in process
# =============================================================================================


def test_module_constants() -> None:
    assert _core.DELIMITER == DELIMITER
    assert _core.PROTOCOL_VERSION == "5.4"
    ids = {_core.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(SESSION_RE.match(i) for i in ids)
    now = _core.iso_now()
    assert DATE_RE.match(now), now
    parsed = datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((parsed - datetime.now(UTC)).total_seconds()) < 60


def test_core_header_fields(packer: str, key: bytes) -> None:
    core = _core.Session(key, packer=packer, username="alice")
    assert SESSION_RE.match(core.session)
    assert core.username == "alice"
    assert core.key == key
    assert core.packer == packer
    assert core.signature_scheme == "hmac-sha256"
    first = core.msg_header("apply_request")
    second = core.msg_header("apply_request")
    check_header(first, core.session, "apply_request")
    assert first["username"] == "alice"
    n1 = int(first["msg_id"].rsplit("_", 1)[1])
    n2 = int(second["msg_id"].rsplit("_", 1)[1])
    assert n2 == n1 + 1
    assert core.msg_id() != second["msg_id"]


def test_session_id_and_username_are_kept() -> None:
    core = _core.Session(KEY, session="abcd-efgh", username="bob")
    header = core.msg_header("x")
    assert header["session"] == "abcd-efgh"
    assert header["username"] == "bob"
    assert header["msg_id"].startswith(f"abcd-efgh_{os.getpid()}_")


def test_default_username_is_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "carol-from-env")
    assert _core.Session().username == "carol-from-env"


def _request_parts(sender_session: str) -> dict[str, Any]:
    return {
        "content": {
            "code": "a = 1\nprint('héllo ✓')",
            "n": [1, -2, 3.5, None, True, False],
            "nested": {"deep": {"list": list(range(20))}},
            "empty": {},
        },
        "parent": {
            "msg_id": "parent-id",
            "msg_type": "execute_request",
            "session": sender_session,
            "username": "someone",
            "date": "2024-01-01T00:00:00.000000Z",
            "version": "5.4",
        },
        "metadata": {"targets": [0, 1], "after": [], "retries": 0},
    }


def test_core_to_peer(packer: str, key: bytes) -> None:
    core = _core.Session(key, packer=packer)
    peer = PeerSession(key, packer=packer)
    req = _request_parts(core.session)
    buffers = [b"\x00" * 10, bytes(range(256)) * 4096]
    frames = core.serialize(
        "apply_request",
        req["content"],
        req["parent"],
        req["metadata"],
        ident=[b"client", b"\x00engine"],
        buffers=buffers,
    )
    msg = peer.deserialize(frames)
    assert msg["idents"] == [b"client", b"\x00engine"]
    check_header(msg["header"], core.session, "apply_request")
    assert msg["parent_header"] == req["parent"]
    metadata = dict(msg["metadata"])
    if key:
        # The buffers digest ferroparallel adds (docs/protocol.md); a peer just sees one more key.
        assert len(metadata.pop("buffers_mac")) == 64
    assert metadata == req["metadata"]
    assert msg["content"] == req["content"]
    assert as_bytes(msg["buffers"]) == buffers
    assert msg["msg_id"] == msg["header"]["msg_id"]
    assert msg["msg_type"] == "apply_request"


def test_peer_to_core(packer: str, key: bytes) -> None:
    core = _core.Session(key, packer=packer)
    peer = PeerSession(key, packer=packer)
    req = _request_parts(peer.session)
    buffers = [b"", b"\xff" * MIB]
    frames = peer.serialize(
        "apply_request",
        req["content"],
        req["parent"],
        req["metadata"],
        ident=[b"a", b"b"],
        buffers=buffers,
    )
    msg = core.deserialize(frames)
    assert as_bytes(msg["idents"]) == [b"a", b"b"]
    assert msg["header"] == peer.unpack(frames[4])
    check_header(msg["header"], peer.session, "apply_request")
    assert msg["parent_header"] == req["parent"]
    assert msg["metadata"] == req["metadata"]
    assert msg["content"] == req["content"]
    assert as_bytes(msg["buffers"]) == buffers
    assert msg["msg_id"] == msg["header"]["msg_id"]
    assert msg["msg_type"] == "apply_request"


def test_empty_parts_pack_as_empty_maps(packer: str, key: bytes) -> None:
    core = _core.Session(key, packer=packer)
    peer = PeerSession(key, packer=packer)
    frames = as_bytes(core.serialize("status"))
    assert frames[0] == DELIMITER
    assert len(frames) == 6
    for part in frames[3:6]:
        assert peer.unpack(part) == {}
    msg = peer.deserialize(frames)
    assert msg["content"] == {} and msg["parent_header"] == {} and msg["buffers"] == []


def test_given_header_is_used_verbatim(packer: str) -> None:
    core = _core.Session(KEY, packer=packer)
    peer = PeerSession(KEY, packer=packer)
    header = peer.msg_header("custom_request")
    header["extra"] = "kept"
    msg = peer.deserialize(core.serialize("ignored", {"x": 1}, header=header))
    assert msg["header"] == header


def test_single_bytes_ident(packer: str) -> None:
    core = _core.Session(KEY, packer=packer)
    frames = as_bytes(core.serialize("x", ident=b"only-one"))
    assert frames[:2] == [b"only-one", DELIMITER]


def test_outgoing_buffers_are_not_copied() -> None:
    core = _core.Session(KEY)
    buf = bytearray(b"a" * 1000)
    frames = core.serialize("x", buffers=[buf])
    buf[0:1] = b"Z"
    assert bytes(frames[-1])[:1] == b"Z", "the buffer frame must be the caller's memory"


@pytest.mark.parametrize("origin", ["core", "peer"])
def test_signatures_are_identical(packer: str, origin: str) -> None:
    core = _core.Session(KEY, packer=packer)
    peer = PeerSession(KEY, packer=packer)
    sender = core if origin == "core" else peer
    frames = as_bytes(sender.serialize("x", {"k": "v"}, {}, {"m": 1}, buffers=[b"unsigned"]))
    parts = frames[2:6]
    expected = hmac.new(KEY, b"".join(parts), hashlib.sha256).hexdigest().encode()
    assert frames[1] == expected
    assert bytes(core.sign(parts)) == expected
    assert peer.sign(parts) == expected
    assert re.fullmatch(rb"[0-9a-f]{64}", expected)


def test_no_key_signature_is_empty(packer: str) -> None:
    core = _core.Session(b"", packer=packer)
    frames = as_bytes(core.serialize("x", {"a": 1}))
    assert frames[1] == b""
    assert bytes(core.sign(frames[2:6])) == b""


PACK_VALUES: list[Any] = [
    {},
    {"a": 1},
    [],
    [1, 2, 3],
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    -(2**31),
    -(2**31) - 1,
    -(2**63),
    0.0,
    -0.0,
    1.5,
    1e300,
    -2.5e-300,
    "",
    "x" * 31,
    "x" * 32,
    "x" * 255,
    "x" * 256,
    "x" * 65535,
    "x" * 65536,
    "héllo wörld ✓ 🐍",
    None,
    True,
    False,
    list(range(15)),
    list(range(16)),
    list(range(70000)),
    {f"k{i}": i for i in range(15)},
    {f"k{i}": i for i in range(16)},
    {f"k{i}": i for i in range(70000)},
    {"nested": {"list": [{"a": [None, {"b": "c"}]}]}},
    {"z": 1, "a": 2, "m": 3},
]
PACK_IDS = [f"v{i}" for i in range(len(PACK_VALUES))]


@pytest.mark.parametrize("value", PACK_VALUES, ids=PACK_IDS)
def test_msgpack_bytes_identical(value: Any) -> None:
    core = _core.Session()
    peer = PeerSession()
    assert bytes(core.pack(value)) == peer.pack(value)
    assert core.unpack(peer.pack(value)) == value
    assert peer.unpack(core.pack(value)) == value


@pytest.mark.parametrize("value", PACK_VALUES, ids=PACK_IDS)
def test_json_round_trips(value: Any) -> None:
    core = _core.Session(packer="json")
    peer = PeerSession(packer="json")
    core_packed = bytes(core.pack(value))
    peer_packed = peer.pack(value)
    assert json.loads(core_packed) == json.loads(peer_packed)
    assert core.unpack(peer_packed) == peer.unpack(peer_packed)
    assert peer.unpack(core_packed) == peer.unpack(peer_packed)
    # Plain UTF-8, no \\u escapes for non-ASCII text (ensure_ascii=False).
    if isinstance(value, str) and not value.isascii():
        assert value.encode() in core_packed


def test_msgpack_bytes_stay_binary() -> None:
    core = _core.Session()
    peer = PeerSession()
    value = {"raw": b"\x00\x01\xff", "empty": b"", "big": b"b" * 70000}
    assert bytes(core.pack(value)) == peer.pack(value)
    assert core.unpack(peer.pack(value)) == value
    assert peer.unpack(core.pack(value)) == value


def test_json_bytes_become_base64() -> None:
    core = _core.Session(packer="json")
    packed = bytes(core.pack({"raw": b"\x00\x01\xff"}))
    assert json.loads(packed) == {"raw": "AAH/"}


def test_json_int_keys_become_strings() -> None:
    core = _core.Session(packer="json")
    assert json.loads(bytes(core.pack({1: "a"}))) == {"1": "a"}


def test_msgpack_int_keys_survive() -> None:
    core = _core.Session()
    peer = PeerSession()
    assert bytes(core.pack({1: "a"})) == peer.pack({1: "a"})
    assert core.unpack(peer.pack({1: "a", 2: "b"})) == {1: "a", 2: "b"}


def test_json_reads_non_compact_text() -> None:
    """ipyparallel's json packer writes ``", "`` and ``": "`` separators and may indent."""
    core = _core.Session(packer="json")
    text = b'{\n  "a" : [1 , 2],\t"b": {"c": null}  }'
    assert core.unpack(text) == {"a": [1, 2], "b": {"c": None}}


def test_tuples_pack_as_lists(packer: str) -> None:
    core = _core.Session(packer=packer)
    peer = PeerSession(packer=packer)
    assert peer.unpack(core.pack({"t": (1, 2)})) == {"t": [1, 2]}


@pytest.mark.parametrize(
    "when",
    [
        datetime(2020, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_datetimes_pack_as_iso_utc(packer: str, when: datetime) -> None:
    """Both packers write datetimes as ISO-8601 UTC strings with ``Z`` (spec §2.4)."""
    core = _core.Session(packer=packer)
    peer = PeerSession(packer=packer)
    expected = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert peer.unpack(core.pack({"date": when})) == {"date": expected}
    assert peer.unpack(peer.pack({"date": when})) == {"date": expected}


def test_orjson_is_json_on_the_wire(key: bytes) -> None:
    core = _core.Session(key, packer="orjson")
    peer = PeerSession(key, packer="json")
    msg = peer.deserialize(core.serialize("x", {"a": "b"}))
    assert msg["content"] == {"a": "b"}
    assert core.deserialize(peer.serialize("y", {"c": 1}))["content"] == {"c": 1}


@pytest.mark.parametrize("direction", ["core->peer", "peer->core"])
def test_replays_rejected_both_ways(packer: str, direction: str) -> None:
    core = _core.Session(KEY, packer=packer)
    peer = PeerSession(KEY, packer=packer)
    sender, receiver = (core, peer) if direction == "core->peer" else (peer, core)
    frames = as_bytes(sender.serialize("x", {"a": 1}))
    receiver.deserialize(frames)
    if receiver is peer:
        with pytest.raises(PeerWireError) as info:
            peer.deserialize(frames)
        assert info.value.kind == "DuplicateSignature"
    else:
        with pytest.raises(error.DuplicateSignature):
            core.deserialize(frames)


def test_mismatched_keys_rejected_both_ways(packer: str) -> None:
    core = _core.Session(KEY, packer=packer)
    peer = PeerSession(b"other", packer=packer)
    with pytest.raises(error.InvalidSignature):
        core.deserialize(peer.serialize("x"))
    with pytest.raises(PeerWireError) as info:
        peer.deserialize(core.serialize("x"))
    assert info.value.kind == "InvalidSignature"


def _malformed_catalogue(peer: PeerSession) -> dict[str, list[bytes]]:
    """Bad messages, each built from a fresh valid one (so replay is not an issue)."""

    def fresh() -> list[bytes]:
        return as_bytes(peer.serialize("t", {"a": 1}, ident=b"id"))

    def with_parts(parts: list[bytes]) -> list[bytes]:
        return [b"id", DELIMITER, peer.sign(parts), *parts]

    header = peer.pack(peer.msg_header("t"))
    empty = peer.pack({})
    bad = b"\xc1" if peer.packer == "msgpack" else b"{bad"
    cases: dict[str, list[bytes]] = {
        "no-delimiter": [b"id", b"a", b"b", b"c", b"d", b"e"],
        "truncated": fresh()[:5],
        "unsigned": [*fresh()[:2], b"", *fresh()[3:]],
        "forged": [*fresh()[:2], b"0" * 64, *fresh()[3:]],
        "unpackable-content": with_parts([header, empty, empty, bad]),
        "unpackable-header": with_parts([bad, empty, empty, empty]),
        "no-msg_type": with_parts([peer.pack({"msg_id": "x"}), empty, empty, empty]),
        "header-not-map": with_parts([peer.pack([1]), empty, empty, empty]),
    }
    return cases


def test_error_classification_matches_peer(packer: str) -> None:
    """The Rust core and the peer classify every malformed input the same way."""
    maker = PeerSession(KEY, packer=packer)
    for name, frames in _malformed_catalogue(maker).items():
        peer = PeerSession(KEY, packer=packer)
        with pytest.raises(PeerWireError) as peer_info:
            peer.deserialize(frames)
        core = _core.Session(KEY, packer=packer)
        with pytest.raises(error.MessageError) as core_info:
            core.deserialize(frames)
        assert type(core_info.value).__name__ == peer_info.value.kind, name


# =============================================================================================
# (b) over real sockets
# =============================================================================================


class Inbox:
    """Collects what ``IoThread.recv`` returns and hands it out one message at a time."""

    def __init__(self, io: Any) -> None:
        self.io = io
        self.pending: deque[tuple[str, Any]] = deque()

    def get(self, timeout: float = TIMEOUT) -> tuple[str, Any]:
        """The next ``(socket_name, message)``; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no message from the I/O thread within {timeout} s")
            self.pending.extend(self.io.recv(timeout=min(remaining, 0.5)))
        return self.pending.popleft()

    def message(self, socket: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message, which must come from ``socket``."""
        name, msg = self.get(timeout)
        assert name == socket
        return msg

    def nothing(self, wait: float = 0.2) -> None:
        """Assert that nothing (more) arrives within ``wait`` seconds."""
        self.pending.extend(self.io.recv(timeout=wait))
        assert not self.pending, f"unexpected messages: {list(self.pending)!r}"


@pytest.fixture
def make_io() -> Iterator[Callable[..., tuple[Any, Inbox]]]:
    """A factory of ``(IoThread, Inbox)`` pairs, all closed after the test."""
    threads: list[Any] = []

    def make(session: Any, name: str = "conformance-io") -> tuple[Any, Inbox]:
        io = _core.IoThread(session, name=name)
        threads.append(io)
        return io, Inbox(io)

    yield make
    for io in threads:
        io.close()


def pysocket(ctx: zmq.Context, kind: int, identity: bytes | None = None) -> zmq.Socket:
    """A pyzmq socket with linger 0."""
    s = ctx.socket(kind)
    s.linger = 0
    if identity is not None:
        s.identity = identity
    return s


def bind_random(s: zmq.Socket) -> str:
    """Bind to a random port on 127.0.0.1 and return the endpoint."""
    port = s.bind_to_random_port(LOCAL)
    return f"{LOCAL}:{port}"


def test_bind_returns_resolved_endpoints(make_io: Callable[..., Any]) -> None:
    io, _ = make_io(_core.Session(KEY))
    endpoints = io.add_socket("r", "ROUTER", bind=[f"{LOCAL}:0", f"{LOCAL}:0"])
    assert len(endpoints) == 2
    for ep in endpoints:
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", ep), ep
        assert int(ep.rsplit(":", 1)[1]) > 0
    assert endpoints[0] != endpoints[1]


def test_python_dealer_to_core_router(
    packer: str, key: bytes, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, inbox = make_io(_core.Session(key, packer=packer))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(key, packer=packer)
    dealer = pysocket(zmq_ctx, zmq.DEALER, identity=b"py-client")
    dealer.connect(endpoint)

    big = os.urandom(MIB)
    request = peer.send(
        dealer,
        "apply_request",
        {"code": "x"},
        metadata={"targets": [1]},
        buffers=[big, b"small"],
    )
    msg = inbox.message("shell")
    assert as_bytes(msg["idents"]) == [b"py-client"]
    assert msg["header"] == request
    assert msg["content"] == {"code": "x"}
    assert msg["metadata"] == {"targets": [1]}
    assert msg["parent_header"] == {}
    assert [bytes(b) for b in msg["buffers"]] == [big, b"small"]

    reply_big = os.urandom(MIB)
    reply_header = io.send(
        "shell",
        "apply_reply",
        {"status": "ok"},
        parent=msg["header"],
        metadata={"engine": 0},
        ident=msg["idents"],
        buffers=[reply_big],
    )
    check_header(reply_header, io_session_id(msg, reply_header), "apply_reply")
    reply = peer.recv(dealer, timeout=TIMEOUT)
    assert reply["idents"] == []
    assert reply["header"] == reply_header
    assert reply["parent_header"] == request
    assert reply["content"] == {"status": "ok"}
    metadata = dict(reply["metadata"])
    if key:
        assert len(metadata.pop("buffers_mac")) == 64  # ferroparallel's buffers digest
    assert metadata == {"engine": 0}
    assert as_bytes(reply["buffers"]) == [reply_big]
    assert io.take_errors() == []


def io_session_id(_msg: dict[str, Any], header: dict[str, Any]) -> str:
    """The session id an I/O thread stamped on ``header``."""
    return header["session"]


def test_core_dealer_to_python_router(
    packer: str, key: bytes, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    session = _core.Session(key, packer=packer)
    io, inbox = make_io(session)
    router = pysocket(zmq_ctx, zmq.ROUTER)
    endpoint = bind_random(router)
    io.add_socket("d", "DEALER", connect=[endpoint], identity=b"core-dealer")
    peer = PeerSession(key, packer=packer)

    big = bytes(range(256)) * (MIB // 256)
    sent = io.send("d", "apply_request", {"f": "g"}, buffers=[big])
    check_header(sent, session.session, "apply_request")
    msg = peer.recv(router, timeout=TIMEOUT)
    assert msg["idents"] == [b"core-dealer"]
    assert msg["header"] == sent
    assert msg["content"] == {"f": "g"}
    assert as_bytes(msg["buffers"]) == [big]

    reply = peer.send(
        router, "apply_reply", {"r": 1}, parent=msg["header"], ident=msg["idents"], buffers=[big]
    )
    got = inbox.message("d")
    assert as_bytes(got["idents"]) == []
    assert got["header"] == reply
    assert got["parent_header"] == sent
    assert got["content"] == {"r": 1}
    assert [bytes(b) for b in got["buffers"]] == [big]
    assert io.take_errors() == []


def test_router_routes_by_identity(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    io, inbox = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    dealers = {}
    for name in (b"alpha", b"beta", b"\x00binary-id"):
        d = pysocket(zmq_ctx, zmq.DEALER, identity=name)
        d.connect(endpoint)
        dealers[name] = d
        peer.send(d, "who", {"me": name.hex()})
    requests = {}
    for _ in dealers:
        msg = inbox.message("shell")
        [ident] = as_bytes(msg["idents"])
        assert msg["content"] == {"me": ident.hex()}
        requests[ident] = msg
    assert set(requests) == set(dealers)
    # Reply in a different order than the requests came in.
    for ident in sorted(requests, reverse=True):
        io.send("shell", "you", {"you": ident.hex()}, parent=requests[ident]["header"], ident=ident)
    for ident, d in dealers.items():
        reply = peer.recv(d, timeout=TIMEOUT)
        assert reply["content"] == {"you": ident.hex()}
        assert reply["parent_header"] == requests[ident]["header"]
    for d in dealers.values():
        assert not d.poll(100), "a reply went to the wrong dealer"


def test_multiple_idents_routing(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    """Extra idents (as the controller's relays add) pass through in order."""
    io, inbox = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    d = pysocket(zmq_ctx, zmq.DEALER, identity=b"relay")
    d.connect(endpoint)
    peer.send(d, "x", {}, ident=[b"client-7", b"engine-3"])
    msg = inbox.message("shell")
    assert as_bytes(msg["idents"]) == [b"relay", b"client-7", b"engine-3"]
    io.send("shell", "y", {}, parent=msg["header"], ident=msg["idents"])
    reply = peer.recv(d, timeout=TIMEOUT)
    assert reply["idents"] == [b"client-7", b"engine-3"]


def test_many_messages_in_order(
    packer: str, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, inbox = make_io(_core.Session(KEY, packer=packer))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY, packer=packer)
    d = pysocket(zmq_ctx, zmq.DEALER, identity=b"bulk")
    d.connect(endpoint)
    n = 500
    for i in range(n):
        peer.send(d, "task", {"i": i})
    got = [inbox.message("shell")["content"]["i"] for _ in range(n)]
    assert got == list(range(n))
    for i in range(n):
        io.send("shell", "result", {"i": i}, ident=b"bulk")
    back = [peer.recv(d, timeout=TIMEOUT)["content"]["i"] for _ in range(n)]
    assert back == list(range(n))
    assert io.take_errors() == []


def test_recv_max_messages(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    io, inbox = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    d = pysocket(zmq_ctx, zmq.DEALER)
    d.connect(endpoint)
    for i in range(20):
        peer.send(d, "t", {"i": i})
    seen: list[int] = []
    deadline = time.monotonic() + TIMEOUT
    while len(seen) < 20 and time.monotonic() < deadline:
        batch = io.recv(timeout=0.5, max_messages=3)
        assert len(batch) <= 3
        seen.extend(m["content"]["i"] for _, m in batch)
    assert seen == list(range(20))


def test_recv_timeout_returns_empty(make_io: Callable[..., Any]) -> None:
    io, _ = make_io(_core.Session(KEY))
    io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    assert io.recv(timeout=0.05) == []


def _wait_for_subscription(send: Callable[[], None], receive: Callable[[float], bool]) -> None:
    """PUB/SUB slow joiner: publish probes until one arrives."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        send()
        if receive(0.05):
            return
    pytest.fail("subscription never took effect")


def test_core_pub_to_python_sub(
    packer: str, key: bytes, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, _ = make_io(_core.Session(key, packer=packer))
    [endpoint] = io.add_socket("iopub", "PUB", bind=[f"{LOCAL}:0"])
    peer = PeerSession(key, packer=packer)
    sub = pysocket(zmq_ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"engine.1.")
    sub.connect(endpoint)

    def probe_arrived(timeout: float) -> bool:
        if not sub.poll(int(timeout * 1000)):
            return False
        while sub.poll(0):
            assert peer.deserialize(sub.recv_multipart())["msg_type"] == "probe"
        return True

    def send_probe() -> None:
        io.send("iopub", "probe", ident=b"engine.1.probe")

    _wait_for_subscription(send_probe, probe_arrived)
    while probe_arrived(0.1):  # drain probes still in flight
        pass

    io.send("iopub", "stream", {"text": "not for us"}, ident=b"engine.2.stdout")
    big = b"\x42" * MIB
    sent = io.send(
        "iopub",
        "stream",
        {"name": "stdout", "text": "hi\n"},
        ident=b"engine.1.stdout",
        buffers=[big],
    )
    msg = peer.recv(sub, timeout=TIMEOUT)
    assert msg["idents"] == [b"engine.1.stdout"]
    assert msg["header"] == sent
    assert msg["content"] == {"name": "stdout", "text": "hi\n"}
    assert as_bytes(msg["buffers"]) == [big]
    assert not sub.poll(100), "a message for an unsubscribed topic arrived"


def test_python_pub_to_core_sub(
    packer: str, key: bytes, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, inbox = make_io(_core.Session(key, packer=packer))
    pub = pysocket(zmq_ctx, zmq.PUB)
    endpoint = bind_random(pub)
    io.add_socket("notif", "SUB", connect=[endpoint], subscribe=[b"wanted"])
    peer = PeerSession(key, packer=packer)

    def probe_arrived(timeout: float) -> bool:
        batch = io.recv(timeout=timeout)
        assert all(m["msg_type"] == "probe" for _, m in batch)
        return bool(batch)

    _wait_for_subscription(lambda: peer.send(pub, "probe", ident=b"wanted.probe"), probe_arrived)
    while probe_arrived(0.1):
        pass

    peer.send(pub, "unwanted", {}, ident=b"other")
    sent = peer.send(pub, "registration_notification", {"id": 3}, ident=b"wanted.reg")
    msg = inbox.message("notif")
    assert as_bytes(msg["idents"]) == [b"wanted.reg"]
    assert msg["header"] == sent
    assert msg["content"] == {"id": 3}
    inbox.nothing(0.1)
    assert io.take_errors() == []


def test_received_buffers_are_zero_copy_frames(
    zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    np = pytest.importorskip("numpy")
    io, inbox = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    d = pysocket(zmq_ctx, zmq.DEALER)
    d.connect(endpoint)
    arr = np.arange(MIB // 8, dtype="float64")
    peer.send(d, "push", {}, buffers=[arr])
    msg = inbox.message("shell")
    [frame] = msg["buffers"]
    assert isinstance(frame, _core.Frame)
    assert len(frame) == arr.nbytes
    view = memoryview(frame)
    assert view.readonly
    back = np.frombuffer(frame, dtype="float64")
    assert back.ctypes.data == frame.address
    assert np.array_equal(back, arr)


def test_raw_sockets(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    io, inbox = make_io(_core.Session(KEY))
    router = pysocket(zmq_ctx, zmq.ROUTER)
    endpoint = bind_random(router)
    io.add_socket("raw", "DEALER", connect=[endpoint], identity=b"raw-dealer", raw=True)
    io.send_raw("raw", [b"not", b"an", b"envelope"])
    assert recv_frames(router, TIMEOUT) == [b"raw-dealer", b"not", b"an", b"envelope"]
    router.send_multipart([b"raw-dealer", b"anything", b"\x00goes"])
    frames = inbox.message("raw")
    assert [bytes(f) for f in frames] == [b"anything", b"\x00goes"]
    assert all(isinstance(f, _core.Frame) for f in frames)
    assert io.take_errors() == []


def test_forward_to_echoes_heartbeats(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    """The engine heart: pings from a PUB are relayed unchanged out of a DEALER."""
    io, inbox = make_io(_core.Session(KEY))
    ping = pysocket(zmq_ctx, zmq.PUB)
    pong = pysocket(zmq_ctx, zmq.ROUTER)
    ping_url, pong_url = bind_random(ping), bind_random(pong)
    io.add_socket("hb_pong", "DEALER", connect=[pong_url], identity=b"heart-1", raw=True)
    io.add_socket(
        "hb_ping", "SUB", connect=[ping_url], subscribe=[b""], raw=True, forward_to="hb_pong"
    )

    def pong_arrived(timeout: float) -> bool:
        if not pong.poll(int(timeout * 1000)):
            return False
        ident, beat = pong.recv_multipart()
        assert ident == b"heart-1" and beat.startswith(b"beat-")
        return True

    counter = iter(range(10**6))
    _wait_for_subscription(lambda: ping.send(b"beat-%d" % next(counter)), pong_arrived)
    while pong_arrived(0.1):
        pass
    ping.send(b"beat-final")
    assert recv_frames(pong, TIMEOUT) == [b"heart-1", b"beat-final"]
    inbox.nothing(0.1)  # forwarded frames are not delivered to Python


def test_frames_outlive_the_io_thread(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    io, inbox = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    d = pysocket(zmq_ctx, zmq.DEALER)
    d.connect(endpoint)
    payload = os.urandom(MIB)
    peer.send(d, "push", {}, buffers=[payload])
    [frame] = inbox.message("shell")["buffers"]
    view = memoryview(frame)
    io.close()
    assert bytes(view) == payload
    assert bytes(frame) == payload


def test_bad_socket_config_is_a_clean_error(make_io: Callable[..., Any]) -> None:
    io, _ = make_io(_core.Session(KEY))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    bad: list[tuple[str, str, dict[str, Any]]] = [
        ("a", "NOT-A-KIND", {"bind": [f"{LOCAL}:0"]}),
        ("b", "ROUTER", {"bind": ["tcp://not-an-address"]}),
        ("c", "DEALER", {"connect": ["bogus://x"]}),
        ("shell", "ROUTER", {"bind": [f"{LOCAL}:0"]}),  # duplicate name
        ("d", "ROUTER", {"bind": [endpoint]}),  # port in use
        ("e", "SUB", {"connect": [endpoint], "forward_to": "no-such-socket"}),
    ]
    for name, kind, kwargs in bad:
        with pytest.raises(ValueError):
            io.add_socket(name, kind, **kwargs)
    assert not io.closed
    assert io.recv(timeout=0.01) == []


def test_close_is_idempotent(make_io: Callable[..., Any]) -> None:
    io, _ = make_io(_core.Session(KEY))
    io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    assert not io.closed
    io.close()
    io.close()
    assert io.closed
    with pytest.raises(error.IoClosedError):
        io.send("shell", "x", {})


def test_unknown_socket_name_is_an_error(make_io: Callable[..., Any]) -> None:
    io, _ = make_io(_core.Session(KEY))
    with pytest.raises((KeyError, ValueError)):
        io.send("nope", "x", {})


# =============================================================================================
# (c) garbage never crashes the I/O thread
# =============================================================================================


BIG_JUNK = bytes(range(256)) * (10 * MIB // 256)  # 10 MiB, deterministic


def _garbage(peer: PeerSession) -> list[tuple[str, list[bytes], str]]:
    """``(label, frames, expected error class)`` sent by a DEALER (no ident prefix)."""
    unpackable = b"\xc1" if peer.packer == "msgpack" else b"{nope"

    def fresh() -> list[bytes]:
        return as_bytes(peer.serialize("t", {"a": 1}))

    def with_parts(parts: list[bytes]) -> list[bytes]:
        return [DELIMITER, peer.sign(parts), *parts]

    header = peer.pack(peer.msg_header("t"))
    empty = peer.pack({})
    valid = fresh()
    return [
        ("single-garbage-frame", [b"garbage"], "MalformedMessage"),
        ("empty-frame", [b""], "MalformedMessage"),
        ("no-delimiter", [b"a", b"b", b"c", b"d", b"e", b"f", b"g"], "MalformedMessage"),
        ("truncated-4", fresh()[:5], "MalformedMessage"),
        ("truncated-0", [DELIMITER], "MalformedMessage"),
        ("unsigned", [DELIMITER, b"", *fresh()[2:]], "UnsignedMessage"),
        ("wrong-signature", [DELIMITER, b"f" * 64, *fresh()[2:]], "InvalidSignature"),
        ("tampered", [*valid[:5], peer.pack({"a": 2})], "InvalidSignature"),
        ("replay-first", valid, ""),
        ("replay-second", valid, "DuplicateSignature"),
        ("unpackable-content", with_parts([header, empty, empty, unpackable]), "UnpackError"),
        ("unpackable-header", with_parts([unpackable, empty, empty, empty]), "UnpackError"),
        (
            "no-msg_type",
            with_parts([peer.pack({"msg_id": "m"}), empty, empty, empty]),
            "MalformedMessage",
        ),
        ("junk-10MB", [BIG_JUNK], "MalformedMessage"),
        (
            "junk-10MB-after-delimiter",
            [DELIMITER, b"", BIG_JUNK, BIG_JUNK, b"", b""],
            "UnsignedMessage",
        ),
        ("signed-10MB-junk-header", with_parts([BIG_JUNK, empty, empty, empty]), "UnpackError"),
        *(
            [
                # msgpack allows keys Python cannot hash (here an array).
                (
                    "unhashable-key",
                    with_parts([header, empty, empty, b"\x81\x90\x01"]),
                    "UnpackError",
                )
            ]
            if peer.packer == "msgpack"
            else []
        ),
    ]


def _serve_after_each(
    io: Any,
    inbox: Inbox,
    socket: str,
    send_raw: Callable[[list[bytes]], None],
    send_valid: Callable[[int], dict[str, Any]],
    cases: list[tuple[str, list[bytes], str]],
) -> None:
    """Send each bad message then a valid one; check the error report and the delivery."""
    for i, (label, frames, expected) in enumerate(cases):
        send_raw(frames)
        if not expected:  # a valid message in the catalogue (the first copy of a replay)
            msg = inbox.message(socket)
            assert msg["content"] == {"a": 1}, label
        sent = send_valid(i)
        msg = inbox.message(socket)
        assert msg["header"] == sent, f"{label}: the next valid message was not delivered"
        assert msg["content"] == {"i": i}
        errors = io.take_errors()
        if expected:
            assert len(errors) == 1, f"{label}: {errors!r}"
            [(name, cls, text)] = errors
            assert name == socket, label
            assert cls == expected, f"{label}: {cls}: {text}"
            assert text, label
        else:
            assert errors == [], label
    assert not io.closed


def test_router_survives_garbage(
    packer: str, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, inbox = make_io(_core.Session(KEY, packer=packer))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY, packer=packer)
    d = pysocket(zmq_ctx, zmq.DEALER, identity=b"attacker")
    d.connect(endpoint)
    _serve_after_each(
        io,
        inbox,
        "shell",
        d.send_multipart,
        lambda i: peer.send(d, "ping", {"i": i}),
        _garbage(peer),
    )
    # And it still answers.
    io.send("shell", "pong", {"ok": True}, ident=b"attacker")
    assert peer.recv(d, timeout=TIMEOUT)["content"] == {"ok": True}


def test_dealer_survives_garbage(
    packer: str, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    io, inbox = make_io(_core.Session(KEY, packer=packer))
    router = pysocket(zmq_ctx, zmq.ROUTER)
    endpoint = bind_random(router)
    io.add_socket("d", "DEALER", connect=[endpoint], identity=b"victim")
    peer = PeerSession(KEY, packer=packer)
    io.send("d", "hello")  # lets the ROUTER learn the identity
    peer.recv(router, timeout=TIMEOUT)
    _serve_after_each(
        io,
        inbox,
        "d",
        lambda frames: router.send_multipart([b"victim", *frames]),
        lambda i: peer.send(router, "ping", {"i": i}, ident=b"victim"),
        _garbage(peer),
    )


def test_sub_survives_garbage(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    io, inbox = make_io(_core.Session(KEY))
    pub = pysocket(zmq_ctx, zmq.PUB)
    endpoint = bind_random(pub)
    io.add_socket("iopub", "SUB", connect=[endpoint], subscribe=[b""])
    peer = PeerSession(KEY)

    def probe_arrived(timeout: float) -> bool:
        return bool(io.recv(timeout=timeout))

    _wait_for_subscription(lambda: peer.send(pub, "probe", ident=b"t"), probe_arrived)
    while probe_arrived(0.1):
        pass
    io.take_errors()
    cases = [c for c in _garbage(peer) if not c[0].startswith("replay")]
    _serve_after_each(
        io,
        inbox,
        "iopub",
        pub.send_multipart,
        lambda i: peer.send(pub, "ping", {"i": i}, ident=b"t"),
        cases,
    )


def test_oversized_part_reported(zmq_ctx: zmq.Context, make_io: Callable[..., Any]) -> None:
    """A session's ``max_part`` applies on the I/O thread too."""
    io, inbox = make_io(_core.Session(KEY, max_part=MIB))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY)
    d = pysocket(zmq_ctx, zmq.DEALER)
    d.connect(endpoint)
    empty = peer.pack({})
    parts = [peer.pack(peer.msg_header("t")), empty, empty, BIG_JUNK]
    cases = [("10MB-content", [DELIMITER, peer.sign(parts), *parts], "MessageTooLarge")]
    _serve_after_each(
        io, inbox, "shell", d.send_multipart, lambda i: peer.send(d, "ping", {"i": i}), cases
    )
    # Large buffers are fine: max_part limits the packed parts only.
    peer.send(d, "push", {"i": 99}, buffers=[BIG_JUNK])
    msg = inbox.message("shell")
    assert len(msg["buffers"][0]) == len(BIG_JUNK)


@pytest.mark.parametrize("packer", ["msgpack"])
def test_bad_message_does_not_poison_its_batch(
    packer: str, zmq_ctx: zmq.Context, make_io: Callable[..., Any]
) -> None:
    """Valid messages received in the same batch as a bad one are all delivered."""
    io, inbox = make_io(_core.Session(KEY, packer=packer))
    [endpoint] = io.add_socket("shell", "ROUTER", bind=[f"{LOCAL}:0"])
    peer = PeerSession(KEY, packer=packer)
    d = pysocket(zmq_ctx, zmq.DEALER)
    d.connect(endpoint)
    cases = [c for c in _garbage(peer) if c[2] and not c[0].startswith("replay")]
    for i, (_, frames, _) in enumerate(cases):
        peer.send(d, "ping", {"i": i})
        d.send_multipart(frames)
    peer.send(d, "ping", {"i": len(cases)})
    time.sleep(0.3)  # let everything reach the I/O thread so one recv() sees it all
    got = [inbox.message("shell")["content"]["i"] for _ in range(len(cases) + 1)]
    assert got == list(range(len(cases) + 1))
    errors = io.take_errors()
    assert sorted(cls for _, cls, _ in errors) == sorted(c[2] for c in cases)


def test_error_names_are_wire_error_classes() -> None:
    for name in WIRE_ERROR_NAMES:
        cls = getattr(error, name)
        assert issubclass(cls, error.MessageError)
