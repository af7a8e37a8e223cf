"""A pure-Python implementation of the ipyparallel message envelope.

This is the independent reference the conformance tests and the benchmarks compare the Rust core
against. It uses only the standard library, pyzmq and msgpack, and imports nothing from
ferroparallel, so a bug in the Rust wire code cannot hide behind a shared helper.

The wire format (see ``reference/ipyparallel-protocol.md`` §2)::

    [ident_0 ... ident_n, b"<IDS|MSG>", signature, header, parent_header, metadata, content,
     buffer_0 ... buffer_m]

``header``, ``parent_header``, ``metadata`` and ``content`` are packed separately (msgpack or
JSON); the signature is the lowercase hex HMAC-SHA256 of those four packed parts in that order;
buffers are raw and unsigned. With an empty key the signature frame is empty and nothing is
checked.

The module can be imported as ``peer.session`` or loaded by file path (the benchmarks do that),
so it has no package-relative imports.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import msgpack
import zmq

__all__ = [
    "DELIMITER",
    "ERROR_KINDS",
    "PROTOCOL_VERSION",
    "PeerWireError",
    "Session",
    "iso_now",
    "new_id",
]

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.4"
#: Frames at least this long are sent without copying (jupyter_client's ``copy_threshold``).
COPY_THRESHOLD = 65536
#: The error kinds :class:`PeerWireError` can carry; they match the names of the exception
#: classes in ``ferroparallel.error`` so both implementations can be compared.
ERROR_KINDS = (
    "MalformedMessage",
    "UnsignedMessage",
    "InvalidSignature",
    "DuplicateSignature",
    "UnpackError",
    "MessageTooLarge",
    "WireConfigError",
)


class PeerWireError(ValueError):
    """A message the peer cannot accept, or a configuration it does not support.

    Parameters
    ----------
    kind : str
        One of :data:`ERROR_KINDS`, named like the matching ``ferroparallel.error`` class.
    text : str
        What was wrong.
    """

    def __init__(self, kind: str, text: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(f"{kind}: {text}")
        self.kind = kind
        self.text = text


def new_id() -> str:
    """Return a session id: 16 random bytes as hex, split 8 + 24 characters by a dash.

    Returns
    -------
    str
        For example ``"0b1c2d3e-4f5a6b7c8d9e0f1a2b3c4d5e"``.
    """
    raw = os.urandom(16).hex()
    return f"{raw[:8]}-{raw[8:]}"


def _iso(dt: datetime) -> str:
    """Format a datetime as ISO-8601 UTC with microseconds and a ``Z`` suffix.

    Naive datetimes are taken as local time (like jupyter_client).
    """
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_now() -> str:
    """Return the current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""
    return _iso(datetime.now(UTC))


def _msgpack_default(obj: Any) -> Any:
    """Convert what msgpack cannot pack natively: dates become ISO text, bytes stay binary."""
    if isinstance(obj, datetime):
        return _iso(obj)
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (set, frozenset)) or (
        isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict))
    ):
        return list(obj)
    raise TypeError(f"cannot pack {type(obj).__name__!r} with msgpack")


def _json_default(obj: Any) -> Any:
    """The JSON default hook: dates become ISO text, bytes become base64 text."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    return _msgpack_default(obj)


def _view(frame: Any) -> bytes | memoryview:
    """Return ``frame`` as bytes or a flat unsigned-byte memoryview, without copying."""
    if isinstance(frame, bytes):
        return frame
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Session:
    """Signing, packing and header creation for one session (pure Python).

    Parameters
    ----------
    key : bytes
        HMAC key; empty disables signing (signature frame ``b""``, nothing checked).
    packer : str
        ``"msgpack"`` or ``"json"`` (``"orjson"`` is JSON on the wire).
    signature_scheme : str
        ``"hmac-<hashlib name>"``; ``"hmac-sha256"`` by default.
    session : str, optional
        Session id; a new one by default.
    username : str, optional
        Username written in headers; ``$USER`` by default.
    history_size : int
        Signatures remembered to reject replays; the oldest 10% are forgotten when it is full.
    """

    def __init__(
        self,
        key: bytes = b"",
        *,
        packer: str = "msgpack",
        signature_scheme: str = "hmac-sha256",
        session: str | None = None,
        username: str | None = None,
        history_size: int = 65536,
    ) -> None:
        if packer == "msgpack":
            self.pack = self._pack_msgpack
            self.unpack = self._unpack_msgpack
        elif packer in ("json", "orjson"):
            packer = "json"
            self.pack = self._pack_json
            self.unpack = self._unpack_json
        else:
            raise PeerWireError("WireConfigError", f"unsupported packer {packer!r}")
        if not signature_scheme.startswith("hmac-"):
            raise PeerWireError(
                "WireConfigError", f"signature scheme must start with 'hmac-': {signature_scheme}"
            )
        digest_name = signature_scheme[len("hmac-") :]
        try:
            digestmod = getattr(hashlib, digest_name)
        except AttributeError:
            raise PeerWireError(
                "WireConfigError", f"unknown hash in signature scheme {signature_scheme!r}"
            ) from None
        self.packer = packer
        self.signature_scheme = signature_scheme
        self.key = bytes(key)
        self.session = session if session is not None else new_id()
        self.username = username if username is not None else os.environ.get("USER", "username")
        self.pid = os.getpid()
        self.message_count = 0
        self._auth = hmac.new(self.key, digestmod=digestmod) if self.key else None
        self.history_size = max(1, history_size)
        # A dict keeps insertion order, so the oldest entries are the first ones.
        self.digest_history: dict[bytes, None] = {}

    # -- packing ----------------------------------------------------------------------------

    @staticmethod
    def _pack_msgpack(obj: Any) -> bytes:
        return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)

    @staticmethod
    def _unpack_msgpack(data: Any) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    @staticmethod
    def _pack_json(obj: Any) -> bytes:
        return json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )

    @staticmethod
    def _unpack_json(data: Any) -> Any:
        return json.loads(bytes(data).decode("utf-8", "replace"))

    # -- headers ----------------------------------------------------------------------------

    def msg_id(self) -> str:
        """Return a fresh message id ``<session>_<pid>_<counter>``."""
        number = self.message_count
        self.message_count += 1
        return f"{self.session}_{self.pid}_{number}"

    def msg_header(self, msg_type: str) -> dict[str, Any]:
        """Return a new header for ``msg_type``.

        Parameters
        ----------
        msg_type : str
            The message type, e.g. ``"apply_request"``.

        Returns
        -------
        dict
            ``msg_id``, ``msg_type``, ``username``, ``session``, ``date`` (ISO-8601 UTC with
            ``Z``) and ``version``.
        """
        return {
            "msg_id": self.msg_id(),
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": iso_now(),
            "version": PROTOCOL_VERSION,
        }

    # -- signing ----------------------------------------------------------------------------

    def sign(self, parts: Sequence[Any]) -> bytes:
        """Return the lowercase hex HMAC of the packed parts (``b""`` without a key).

        Parameters
        ----------
        parts : sequence of bytes-like
            header, parent_header, metadata and content, packed, in that order.
        """
        if self._auth is None:
            return b""
        mac = self._auth.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def _remember(self, signature: bytes) -> None:
        history = self.digest_history
        history[signature] = None
        if len(history) > self.history_size:
            drop = max(1, self.history_size // 10)
            for old in list(history)[:drop]:
                del history[old]

    def verify(self, signature: Any, parts: Sequence[Any], *, record: bool = True) -> None:
        """Check a received signature; raise :class:`PeerWireError` if it is not acceptable.

        Parameters
        ----------
        signature : bytes-like
            The signature frame.
        parts : sequence of bytes-like
            The four packed parts, in signing order.
        record : bool
            Remember the signature so a replay of it is rejected.
        """
        if self._auth is None:
            return
        signature = bytes(signature)
        if not signature:
            raise PeerWireError("UnsignedMessage", "a signature is required")
        if signature in self.digest_history:
            raise PeerWireError("DuplicateSignature", "message was replayed")
        if not hmac.compare_digest(signature, self.sign(parts)):
            raise PeerWireError("InvalidSignature", "signature does not match")
        if record:
            self._remember(signature)

    # -- messages ---------------------------------------------------------------------------

    def serialize(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        ident: Sequence[bytes] | bytes | None = None,
        buffers: Sequence[Any] | None = None,
        header: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Build the frames of one message.

        Parameters
        ----------
        msg_type : str
            Message type (ignored when ``header`` is given).
        content, parent, metadata : dict, optional
            The message parts; ``{}`` when omitted.
        ident : bytes or sequence of bytes, optional
            Routing identities (or a PUB topic) placed before the delimiter.
        buffers : sequence of bytes-like, optional
            Raw frames appended after the content, unchanged (not copied, not signed).
        header : dict, optional
            A complete header to use instead of a new one.

        Returns
        -------
        list
            ``[*idents, DELIMITER, signature, header, parent, metadata, content, *buffers]``.
        """
        if header is None:
            header = self.msg_header(msg_type)
        packed = [
            self.pack(header),
            self.pack(parent if parent is not None else {}),
            self.pack(metadata if metadata is not None else {}),
            self.pack(content if content is not None else {}),
        ]
        if ident is None:
            idents: list[Any] = []
        elif isinstance(ident, (bytes, bytearray, memoryview)):
            idents = [ident]
        else:
            idents = list(ident)
        return [*idents, DELIMITER, self.sign(packed), *packed, *(buffers or ())]

    def deserialize(
        self, frames: Sequence[Any], *, content: bool = True, record: bool = True
    ) -> dict[str, Any]:
        """Split, verify and unpack a received message.

        Parameters
        ----------
        frames : sequence of bytes-like
            Every frame of the message, idents included (``bytes`` or ``zmq.Frame``).
        content : bool
            Unpack the content (and record the signature); when false, ``content`` stays packed.
        record : bool
            With ``content``, remember the signature to reject replays.

        Returns
        -------
        dict
            ``idents``, ``header``, ``parent_header``, ``metadata``, ``content``, ``buffers``
            (memoryviews or bytes), ``msg_id`` and ``msg_type``.

        Raises
        ------
        PeerWireError
            With ``kind`` ``MalformedMessage``, ``UnsignedMessage``, ``InvalidSignature``,
            ``DuplicateSignature`` or ``UnpackError``.
        """
        views = [_view(f) for f in frames]
        pos = next((i for i, frame in enumerate(views) if frame == DELIMITER), -1)
        if pos < 0:
            raise PeerWireError("MalformedMessage", "no <IDS|MSG> delimiter frame")
        after = len(views) - pos - 1
        if after < 5:
            raise PeerWireError(
                "MalformedMessage", f"{after} frames after the delimiter, at least 5 required"
            )
        signature = views[pos + 1]
        packed = views[pos + 2 : pos + 6]
        self.verify(signature, packed, record=record and content)
        names = ("header", "parent_header", "metadata", "content")
        unpacked: dict[str, Any] = {}
        for name, part in zip(names, packed, strict=True):
            if name == "content" and not content:
                unpacked[name] = bytes(part)
                continue
            try:
                unpacked[name] = self.unpack(part)
            except Exception as exc:  # any packer failure is an unpack error
                raise PeerWireError("UnpackError", f"cannot unpack {name}: {exc}") from exc
        header = unpacked["header"]
        if not isinstance(header, dict):
            raise PeerWireError("MalformedMessage", "header must be a map")
        for field in ("msg_id", "msg_type"):
            if not isinstance(header.get(field), str):
                raise PeerWireError("MalformedMessage", f"header.{field} missing or not a string")
        for name in ("parent_header", "metadata"):
            if not isinstance(unpacked[name], dict):
                raise PeerWireError("MalformedMessage", f"{name} must be a map")
        return {
            "idents": [bytes(f) for f in views[:pos]],
            **unpacked,
            "buffers": views[pos + 6 :],
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
        }

    # -- sockets ----------------------------------------------------------------------------

    def send(
        self,
        socket: zmq.Socket,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        ident: Sequence[bytes] | bytes | None = None,
        buffers: Sequence[Any] | None = None,
        header: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Serialize a message and send it on a pyzmq socket.

        Large frames (at least :data:`COPY_THRESHOLD` bytes) are sent without copying.

        Returns
        -------
        dict
            The header that was sent.
        """
        if header is None:
            header = self.msg_header(msg_type)
        frames = self.serialize(
            msg_type, content, parent, metadata, ident=ident, buffers=buffers, header=header
        )
        longest = max(len(_view(f)) for f in frames)
        socket.send_multipart(frames, copy=longest < COPY_THRESHOLD)
        return header

    def recv(self, socket: zmq.Socket, timeout: float = 5.0, **kwargs: Any) -> dict[str, Any]:
        """Receive and deserialize one message, waiting at most ``timeout`` seconds.

        Parameters
        ----------
        socket : zmq.Socket
            A pyzmq socket.
        timeout : float
            Seconds to wait.
        **kwargs
            Passed to :meth:`deserialize`.

        Raises
        ------
        TimeoutError
            If nothing arrived in time.
        PeerWireError
            If the message is not acceptable.
        """
        return self.deserialize(recv_frames(socket, timeout), **kwargs)


def recv_frames(socket: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    """Receive one multipart message as bytes, waiting at most ``timeout`` seconds.

    Raises
    ------
    TimeoutError
        If nothing arrived in time.
    """
    if not socket.poll(int(timeout * 1000), zmq.POLLIN):
        raise TimeoutError(f"no message within {timeout} s")
    return socket.recv_multipart()
