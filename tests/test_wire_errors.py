"""``_core.Session.deserialize`` raises the right ``ferroparallel.error`` class for bad input.

Every malformed, unsigned, forged, replayed, unpackable or oversized message must raise exactly
the documented subclass of :class:`ferroparallel.error.MessageError` and nothing else (no
``TypeError``, ``OverflowError``, ``PanicException``...). Inputs are built with the independent
pure-Python peer so the sending side never shares code with the receiving side.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from ferroparallel import _core, error
from peer.session import DELIMITER
from peer.session import Session as PeerSession

KEY = b"wire-errors-test-key"
WIRE_ERRORS = (
    error.MalformedMessage,
    error.UnsignedMessage,
    error.InvalidSignature,
    error.DuplicateSignature,
    error.UnpackError,
    error.MessageTooLarge,
)
#: Bytes that the given packer cannot unpack.
UNPACKABLE = {"msgpack": b"\xc1\x00", "json": b"{not json"}


@pytest.fixture(params=["msgpack", "json"])
def packer(request: pytest.FixtureRequest) -> str:
    """Each supported packer."""
    return request.param


def expect(cls: type[error.MessageError], call: Callable[[], Any]) -> error.MessageError:
    """Run ``call`` and check that it raises exactly ``cls`` (not a sibling or a parent)."""
    with pytest.raises(error.MessageError) as info:
        call()
    assert type(info.value) is cls, f"expected {cls.__name__}, got {info.type.__name__}: {info}"
    assert str(info.value), "the error must say what was wrong"
    return info.value


def valid(peer: PeerSession, **kwargs: Any) -> list[bytes]:
    """A valid message from ``peer`` with one ident and one buffer, as bytes frames."""
    frames = peer.serialize(
        "test_request", {"a": 1}, ident=[b"ident"], buffers=[b"buffer"], **kwargs
    )
    return [bytes(f) for f in frames]


def signed(peer: PeerSession, parts: list[bytes], ident: bytes = b"ident") -> list[bytes]:
    """Frames with the four given packed parts and a correct signature for them."""
    return [ident, DELIMITER, peer.sign(parts), *parts]


_DEFAULT = object()


def parts_of(peer: PeerSession, header: Any = _DEFAULT) -> list[bytes]:
    """Four packed parts of a valid message (``header`` replaces the header)."""
    if header is _DEFAULT:
        header = peer.msg_header("test_request")
    return [peer.pack(header), peer.pack({}), peer.pack({}), peer.pack({"a": 1})]


# -- structure -------------------------------------------------------------------------------


def test_valid_message_is_accepted(packer: str) -> None:
    peer = PeerSession(KEY, packer=packer)
    core = _core.Session(KEY, packer=packer)
    msg = core.deserialize(valid(peer))
    assert msg["content"] == {"a": 1}
    assert msg["msg_type"] == "test_request"
    assert [bytes(i) for i in msg["idents"]] == [b"ident"]
    assert [bytes(b) for b in msg["buffers"]] == [b"buffer"]


def test_map_keys_decode_exactly_beyond_the_key_cache(packer: str) -> None:
    """Received map keys are cached as interned strings up to a bound: many thousands of
    distinct keys (a peer sending ever new ones) still decode exactly, and equal keys are one
    shared string object."""
    peer = PeerSession(KEY, packer=packer)
    core = _core.Session(KEY, packer=packer)
    for batch in range(3):
        content = {f"key-{batch}-{i}": i for i in range(2000)}
        frames = peer.serialize("test_request", content, metadata={"status": "ok"})
        msg = core.deserialize([bytes(f) for f in frames])
        assert msg["content"] == content
        assert list(msg["content"]) == list(content)  # order kept
    first = core.deserialize([bytes(f) for f in peer.serialize("a_request", {"k": 1})])
    second = core.deserialize([bytes(f) for f in peer.serialize("a_request", {"k": 2})])
    (k1,), (k2,) = first["content"], second["content"]
    assert k1 == k2 == "k" and k1 is k2


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"ident"],
        [b"a", b"b", b"c", b"d", b"e", b"f", b"g"],
        [b"<IDS|MSG", b"sig", b"h", b"p", b"m", b"c"],
        [b"<ids|msg>", b"sig", b"h", b"p", b"m", b"c"],
        [b"<IDS|MSG> ", b"sig", b"h", b"p", b"m", b"c"],
    ],
    ids=["empty", "one-empty-frame", "ident-only", "seven-frames", "short", "lower", "space"],
)
def test_no_delimiter(frames: list[bytes]) -> None:
    core = _core.Session(KEY)
    expect(error.MalformedMessage, lambda: core.deserialize(frames))


@pytest.mark.parametrize("after", [0, 1, 2, 3, 4])
def test_too_few_frames_after_delimiter(packer: str, after: int) -> None:
    peer = PeerSession(KEY, packer=packer)
    frames = valid(peer)[:-1]  # drop the buffer: ident, delimiter and five parts remain
    truncated = frames[: 2 + after]
    core = _core.Session(KEY, packer=packer)
    expect(error.MalformedMessage, lambda: core.deserialize(truncated))
    # Without a key the frame count is checked just the same.
    expect(error.MalformedMessage, lambda: _core.Session(packer=packer).deserialize(truncated))


def test_first_delimiter_splits(packer: str) -> None:
    """A delimiter-looking buffer after the real delimiter is just a buffer."""
    peer = PeerSession(KEY, packer=packer)
    frames = [*valid(peer), DELIMITER]
    msg = _core.Session(KEY, packer=packer).deserialize(frames)
    assert [bytes(b) for b in msg["buffers"]] == [b"buffer", DELIMITER]


# -- signatures ------------------------------------------------------------------------------


def test_empty_signature_with_key_is_unsigned(packer: str) -> None:
    frames = valid(PeerSession(b"", packer=packer))
    core = _core.Session(KEY, packer=packer)
    expect(error.UnsignedMessage, lambda: core.deserialize(frames))


def test_empty_signature_without_key_is_accepted(packer: str) -> None:
    frames = valid(PeerSession(b"", packer=packer))
    assert _core.Session(packer=packer).deserialize(frames)["content"] == {"a": 1}


def test_signature_ignored_without_key(packer: str) -> None:
    frames = valid(PeerSession(b"some-other-key", packer=packer))
    frames[2] = b"not a signature at all"
    assert _core.Session(packer=packer).deserialize(frames)["content"] == {"a": 1}


def _flip_hex(sig: bytes) -> bytes:
    last = sig[-1:]
    return sig[:-1] + (b"0" if last != b"0" else b"1")


@pytest.mark.parametrize(
    "mutate",
    [
        _flip_hex,
        lambda s: s.upper(),
        lambda s: s[:-2],
        lambda s: s + b"00",
        lambda s: b"z" * len(s),
        lambda s: b"\xff" * 64,
        lambda s: bytes.fromhex(s.decode()),
        lambda s: b"x",
    ],
    ids=["flipped", "uppercase", "short", "long", "non-hex", "binary", "raw-digest", "one-byte"],
)
def test_bad_signature(packer: str, mutate: Callable[[bytes], bytes]) -> None:
    peer = PeerSession(KEY, packer=packer)
    frames = valid(peer)
    frames[2] = mutate(frames[2])
    core = _core.Session(KEY, packer=packer)
    expect(error.InvalidSignature, lambda: core.deserialize(frames))


@pytest.mark.parametrize("index", [3, 4, 5, 6], ids=["header", "parent", "metadata", "content"])
def test_tampered_part_is_invalid(packer: str, index: int) -> None:
    peer = PeerSession(KEY, packer=packer)
    frames = valid(peer)
    frames[index] = (
        peer.pack({"msg_id": "x", "msg_type": "evil"}) if index == 3 else peer.pack({"evil": True})
    )
    core = _core.Session(KEY, packer=packer)
    expect(error.InvalidSignature, lambda: core.deserialize(frames))


def test_wrong_key_is_invalid(packer: str) -> None:
    frames = valid(PeerSession(b"another-key", packer=packer))
    expect(error.InvalidSignature, lambda: _core.Session(KEY, packer=packer).deserialize(frames))


def test_buffers_are_not_signed(packer: str) -> None:
    frames = valid(PeerSession(KEY, packer=packer))
    frames[-1] = b"changed buffer"
    msg = _core.Session(KEY, packer=packer).deserialize(frames)
    assert bytes(msg["buffers"][0]) == b"changed buffer"


def test_replay_is_duplicate(packer: str) -> None:
    frames = valid(PeerSession(KEY, packer=packer))
    core = _core.Session(KEY, packer=packer)
    core.deserialize(frames)
    expect(error.DuplicateSignature, lambda: core.deserialize(frames))
    # Different idents do not make a replay new: idents are not signed.
    frames[0] = b"someone-else"
    expect(error.DuplicateSignature, lambda: core.deserialize(frames))


def test_record_false_does_not_remember(packer: str) -> None:
    frames = valid(PeerSession(KEY, packer=packer))
    core = _core.Session(KEY, packer=packer)
    core.deserialize(frames, record=False)
    core.deserialize(frames, record=False)
    core.deserialize(frames)
    expect(error.DuplicateSignature, lambda: core.deserialize(frames))


def test_peek_does_not_record(packer: str) -> None:
    """``content=False`` verifies but does not record (spec §2.3: the schedulers peek)."""
    frames = valid(PeerSession(KEY, packer=packer))
    core = _core.Session(KEY, packer=packer)
    peeked = core.deserialize(frames, content=False)
    assert peeked["header"]["msg_type"] == "test_request"
    assert core.deserialize(frames)["content"] == {"a": 1}
    expect(error.DuplicateSignature, lambda: core.deserialize(frames))
    # A peek still verifies.
    forged = [*frames[:2], _flip_hex(frames[2]), *frames[3:]]
    expect(error.InvalidSignature, lambda: core.deserialize(forged, content=False))


def test_rejected_message_is_not_remembered(packer: str) -> None:
    """A forged copy must not poison the history for the real message."""
    frames = valid(PeerSession(KEY, packer=packer))
    forged = list(frames)
    forged[6] = PeerSession(KEY, packer=packer).pack({"a": 2})
    core = _core.Session(KEY, packer=packer)
    expect(error.InvalidSignature, lambda: core.deserialize(forged))
    assert core.deserialize(frames)["content"] == {"a": 1}


def test_history_is_bounded(packer: str) -> None:
    """With a tiny history, old signatures are forgotten and new replays still caught."""
    peer = PeerSession(KEY, packer=packer)
    core = _core.Session(KEY, packer=packer, history_size=10)
    messages = [valid(peer) for _ in range(50)]
    for frames in messages:
        core.deserialize(frames)
    expect(error.DuplicateSignature, lambda: core.deserialize(messages[-1]))
    core.deserialize(messages[0])  # forgotten long ago: accepted again


def test_verification_precedes_unpacking(packer: str) -> None:
    """An unpackable part is never looked at before the signature is checked."""
    peer = PeerSession(KEY, packer=packer)
    parts = parts_of(peer)
    parts[3] = UNPACKABLE[packer]
    frames = signed(peer, parts)
    core = _core.Session(KEY, packer=packer)
    frames_unsigned = [*frames[:2], b"", *frames[3:]]
    expect(error.UnsignedMessage, lambda: core.deserialize(frames_unsigned))
    frames_forged = [*frames[:2], _flip_hex(frames[2]), *frames[3:]]
    expect(error.InvalidSignature, lambda: core.deserialize(frames_forged))


# -- unpacking -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["header", "parent", "metadata", "content"])
@pytest.mark.parametrize("with_key", [True, False], ids=["key", "nokey"])
def test_unpackable_part(packer: str, index: int, with_key: bool) -> None:
    key = KEY if with_key else b""
    peer = PeerSession(key, packer=packer)
    parts = parts_of(peer)
    parts[index] = UNPACKABLE[packer]
    core = _core.Session(key, packer=packer)
    expect(error.UnpackError, lambda: core.deserialize(signed(peer, parts)))


@pytest.mark.parametrize(
    "junk",
    [b"", b"\xff\xfe\xfd", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\x91" * 100_000],
    ids=["empty", "invalid-utf8", "truncated-array", "huge-array-len", "deep-nesting"],
)
def test_unpackable_content_variants(junk: bytes) -> None:
    peer = PeerSession(KEY, packer="msgpack")
    parts = parts_of(peer)
    parts[3] = junk
    core = _core.Session(KEY)
    expect(error.UnpackError, lambda: core.deserialize(signed(peer, parts)))


def test_trailing_bytes_are_unpackable(packer: str) -> None:
    peer = PeerSession(KEY, packer=packer)
    parts = parts_of(peer)
    parts[3] = parts[3] + (b"\x00" if packer == "msgpack" else b" x")
    core = _core.Session(KEY, packer=packer)
    expect(error.UnpackError, lambda: core.deserialize(signed(peer, parts)))


#: msgpack maps whose keys Python cannot hash (an array and a map used as keys).
UNHASHABLE_KEY_MAPS = [b"\x81\x90\x01", b"\x81\x81\x01\x01\x02"]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["header", "parent", "metadata", "content"])
@pytest.mark.parametrize("junk", UNHASHABLE_KEY_MAPS, ids=["array-key", "map-key"])
def test_unhashable_map_key_is_unpack_error(index: int, junk: bytes) -> None:
    """msgpack allows any key; one Python cannot hash is a bad message, not a TypeError."""
    peer = PeerSession(KEY)
    parts = parts_of(peer)
    if index == 0:  # a full header (a fixmap of 6) with the bad entry added in front
        assert parts[0][0] == 0x86
        parts[0] = b"\x87" + junk[1:] + parts[0][1:]
    else:
        parts[index] = junk
    expect(error.UnpackError, lambda: _core.Session(KEY).deserialize(signed(peer, parts)))


def test_cross_packer_is_unpack_error() -> None:
    """A msgpack message read by a JSON session (a connection-file mismatch)."""
    frames = valid(PeerSession(KEY, packer="msgpack"))
    expect(error.UnpackError, lambda: _core.Session(KEY, packer="json").deserialize(frames))


@pytest.mark.parametrize(
    "header",
    [
        {"msg_id": "m1", "username": "u", "session": "s", "date": "d", "version": "5.4"},
        {"msg_id": "m1", "msg_type": 7},
        {"msg_id": "m1", "msg_type": None},
        {"msg_type": "test_request"},
        {"msg_id": 12, "msg_type": "test_request"},
        {},
        [],
        "header",
        42,
        None,
    ],
    ids=[
        "no-msg_type",
        "int-msg_type",
        "nil-msg_type",
        "no-msg_id",
        "int-msg_id",
        "empty-map",
        "list",
        "string",
        "int",
        "nil",
    ],
)
def test_bad_header_is_malformed(packer: str, header: Any) -> None:
    peer = PeerSession(KEY, packer=packer)
    frames = signed(peer, parts_of(peer, header))
    expect(error.MalformedMessage, lambda: _core.Session(KEY, packer=packer).deserialize(frames))


@pytest.mark.parametrize("index", [1, 2], ids=["parent", "metadata"])
def test_non_map_parent_or_metadata_is_malformed(packer: str, index: int) -> None:
    peer = PeerSession(KEY, packer=packer)
    parts = parts_of(peer)
    parts[index] = peer.pack([1, 2, 3])
    frames = signed(peer, parts)
    expect(error.MalformedMessage, lambda: _core.Session(KEY, packer=packer).deserialize(frames))


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["header", "parent", "metadata", "content"])
def test_oversized_part(packer: str, index: int) -> None:
    peer = PeerSession(KEY, packer=packer)
    parts = parts_of(peer)
    parts[index] = peer.pack({"msg_id": "m", "msg_type": "t", "pad": "x" * 5000})
    core = _core.Session(KEY, packer=packer, max_part=1024)
    expect(error.MessageTooLarge, lambda: core.deserialize(signed(peer, parts)))


def test_oversized_signature_frame() -> None:
    peer = PeerSession(KEY)
    frames = valid(peer)
    frames[2] = b"a" * 5000
    core = _core.Session(KEY, max_part=1024)
    with pytest.raises((error.MessageTooLarge, error.InvalidSignature)):
        core.deserialize(frames)


def test_large_buffers_are_not_limited_by_max_part() -> None:
    """``max_part`` limits the packed dict parts, not the raw buffers."""
    peer = PeerSession(KEY)
    frames = valid(peer)
    frames[-1] = b"b" * 10_000
    msg = _core.Session(KEY, max_part=1024).deserialize(frames)
    assert len(msg["buffers"][0]) == 10_000


# -- input types -----------------------------------------------------------------------------


def test_accepts_any_buffer(packer: str) -> None:
    frames = valid(PeerSession(KEY, packer=packer))
    views: list[Any] = [memoryview(f) if i % 2 else bytearray(f) for i, f in enumerate(frames)]
    msg = _core.Session(KEY, packer=packer).deserialize(views)
    assert msg["content"] == {"a": 1}


@pytest.mark.parametrize("bad", [None, 5, "text", object()], ids=["none", "int", "str", "object"])
def test_non_buffer_frame_is_a_clean_error(bad: Any) -> None:
    """A non-buffer frame is a usage error (TypeError, ValueError, BufferError), not a crash."""
    frames: list[Any] = [*valid(PeerSession(KEY)), bad]
    with pytest.raises((TypeError, ValueError, BufferError)):
        _core.Session(KEY).deserialize(frames)


# -- fuzz ------------------------------------------------------------------------------------


def _random_frames(rng: random.Random, valid_frames: list[bytes]) -> list[bytes]:
    choice = rng.randrange(4)
    if choice == 0:  # random frames, sometimes with a delimiter in them
        frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 9))]
        if frames and rng.random() < 0.7:
            frames[rng.randrange(len(frames))] = DELIMITER
        return frames
    frames = list(valid_frames)
    if choice == 1:  # flip bytes in one frame
        i = rng.randrange(len(frames))
        data = bytearray(frames[i] or b"\x00")
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif choice == 2:  # truncate one frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    else:  # drop or duplicate frames
        i = rng.randrange(len(frames))
        if rng.random() < 0.5:
            del frames[i]
        else:
            frames.insert(i, frames[i])
    return frames


@pytest.mark.parametrize("with_key", [True, False], ids=["key", "nokey"])
def test_fuzz_only_wire_errors(packer: str, with_key: bool) -> None:
    """Seeded random corruptions raise only the wire errors (or parse, when still valid)."""
    key = KEY if with_key else b""
    rng = random.Random(20240611)
    peer = PeerSession(key, packer=packer, session="fuzz-session", username="fuzz")
    header = {
        **peer.msg_header("test_request"),
        "msg_id": "fuzz-session_1_0",
        "date": "2024-06-11T00:00:00.000000Z",
    }
    template = valid(peer, header=header)  # fixed bytes: the same corruptions every run
    accepted = 0
    for _ in range(3000):
        frames = _random_frames(rng, template)
        core = _core.Session(key, packer=packer)
        try:
            msg = core.deserialize(frames)
        except WIRE_ERRORS:
            continue
        accepted += 1
        assert isinstance(msg["header"], dict)
    assert accepted < 3000


# -- configuration ---------------------------------------------------------------------------


def test_bogus_packer_names_the_fix() -> None:
    with pytest.raises(error.WireConfigError) as info:
        _core.Session(packer="bogus")
    text = str(info.value)
    assert "bogus" in text
    assert "msgpack" in text and "json" in text


@pytest.mark.parametrize("scheme", ["hmac-md5", "hmac-sha1", "sha256", "", "HMAC-SHA256x"])
def test_unsupported_signature_scheme_names_the_fix(scheme: str) -> None:
    with pytest.raises(error.WireConfigError) as info:
        _core.Session(KEY, signature_scheme=scheme)
    assert "hmac-sha256" in str(info.value)


def test_config_errors_are_not_message_errors() -> None:
    with pytest.raises(error.WireConfigError) as info:
        _core.Session(packer="pickle")
    assert not isinstance(info.value, error.MessageError)
    assert isinstance(info.value, ValueError)
