"""Type stubs for the compiled ``ferroparallel._core`` extension (Rust, PyO3)."""

from collections.abc import Buffer, Callable, Iterable, Sequence
from typing import Any

__version__: str
DELIMITER: bytes
PROTOCOL_VERSION: str
#: Buffers at least this large are sent from their own memory (not copied) until libzmq is done.
ZERO_COPY_THRESHOLD: int
#: Key of a message received by :class:`DirectSockets` holding its header frame as received
#: (``bytes``), for replies to name as their parent without packing the header again.
PACKED_HEADER_KEY: str

def new_id() -> str:
    """A jupyter-style session id: 32 hex digits split 8 + 24 by a dash."""

def iso_now() -> str:
    """The current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""

def has_curve() -> bool:
    """True when libzmq was built with CurveZMQ (libsodium): always, for a normal build."""

def curve_keypair() -> tuple[str, str]:
    """A fresh CURVE key pair ``(public, secret)``, Z85 strings of 40 characters."""

def curve_public_key(secretkey: str | bytes) -> str:
    """The Z85 public key that belongs to a secret key (Z85, or 32 raw bytes)."""

def buffer_address(obj: Buffer) -> tuple[int, int]:
    """``(address, nbytes)`` of a contiguous buffer; valid while ``obj`` stays alive."""

def read_process_memory(pid: int, addr: int, dest: Buffer, threads: int | None = None) -> None:
    """Fill the writable buffer ``dest`` from address ``addr`` of process ``pid``
    (``process_vm_readv``, GIL released; reads of 8 MiB and more split over up to ``threads``
    threads, default the usable CPUs, at most 4). ``OSError`` (ESRCH, EPERM, EFAULT) on
    failure."""

def write_process_memory(pid: int, addr: int, src: bytes) -> None:
    """Write ``src`` to address ``addr`` of process ``pid`` (``process_vm_writev``)."""

class Frame:
    """A read-only buffer over one received message frame (no copy).

    Supports the buffer protocol: ``memoryview(frame)``, ``bytes(frame)``,
    ``numpy.frombuffer(frame)`` and ``pickle.loads(..., buffers=[frame])`` all read the
    received memory directly.
    """

    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    @property
    def address(self) -> int:
        """Address of the first byte (to prove zero-copy in tests)."""

class DataListener:
    """A listening TCP socket of a data server (decision 0016).

    Parameters
    ----------
    host : str
        The interface to listen on (any free port).
    """

    endpoint: str
    closed: bool
    def __init__(self, host: str) -> None: ...
    def accept(self, timeout: float) -> DataStream | None:
        """The next connection, or None after ``timeout`` seconds or once closed."""
    def close(self) -> None:
        """Stop accepting (a waiting ``accept`` returns None)."""

class LoanDigest:
    """The digest of one loan's buffers, shared by the ``DataStream.send`` calls serving
    them: the first send hashes the buffers (while it writes them), the others reuse it."""

    times_hashed: int
    def __init__(self) -> None: ...

class DataStream:
    """One connection of the direct data stream: length-prefixed messages of frames over
    plain TCP (format in ``docs/protocol.md``). Blocking calls run without the GIL and wake
    every quarter of a second for signals, ``abandon()`` and ``close()``."""

    closed: bool
    peer: str
    @staticmethod
    def connect(endpoint: str, timeout: float) -> DataStream:
        """Connect to ``tcp://host:port``; ConnectionError if it cannot."""
    def send(
        self,
        frames: Sequence[Buffer],
        *,
        session: Session | None = None,
        mac_context: str | None = None,
        timeout: float | None = None,
        digest: LoanDigest | None = None,
    ) -> None:
        """Send one message of ``frames`` (not copied); with a keyed ``session`` their MAC
        for ``mac_context`` follows them: a keyed hash of the request and of the frames'
        digest, computed on another thread while they are written or taken from ``digest``
        (shared by the sends of the same buffers)."""
    def recv(
        self,
        *,
        max_bytes: int,
        max_frames: int = 65536,
        timeout: float | None = None,
        message_timeout: float | None = None,
        session: Session | None = None,
        mac_context: str | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> list[Frame]:
        """Receive one message (frames read straight into their own memory).

        Raises
        ------
        EOFError
            The peer closed the connection between messages.
        ConnectionError
            It closed it in the middle of one.
        TimeoutError
            ``timeout`` (the whole message) or ``message_timeout`` (from its first byte)
            passed.
        InterruptedError
            ``close()`` from another thread, or ``abandon()`` returned true.
        ValueError
            Not a message of this protocol, more than ``max_bytes``/``max_frames``, or (with a
            keyed ``session``) frames that do not match their MAC.
        """
    def close(self) -> None:
        """Close the connection (a transfer in progress on another thread fails)."""

class SharedMapping:
    """A read-only mapping of a whole shared-memory file that keeps no file descriptor open
    (``mmap.mmap`` keeps one per mapping); unmapped when it and every view of it are gone.

    Raises the matching ``OSError`` (``FileNotFoundError``, ...) when the file cannot be opened
    or mapped. Supports the buffer protocol, read-only.
    """

    def __init__(self, path: str) -> None: ...
    def __len__(self) -> int: ...

class Session:
    """Message signing, packing and header creation for one session.

    Parameters
    ----------
    key : bytes
        HMAC key. Empty disables signing (signature frame ``b""``, nothing checked).
    packer : str
        ``"msgpack"`` (default) or ``"json"`` (``"orjson"`` is read as json).
    signature_scheme : str
        Only ``"hmac-sha256"``.
    session : str, optional
        Session id; a new one by default.
    username : str, optional
        Username in headers; ``$USER`` by default.
    history_size : int
        Number of signatures remembered to reject replays.
    max_part : int
        Largest accepted packed dict part in bytes.
    sign_buffers : bool, optional
        Put a MAC (keyed BLAKE3) of the buffers into the signed metadata
        (``metadata["buffers_mac"]``) of messages sent with buffers. Default: on, unless the
        environment variable ``FERROPARALLEL_SIGN_BUFFERS`` is ``0``/``false``/``no``/``off``.
        Received digests are always checked.
    """

    session: str
    username: str
    packer: str
    signature_scheme: str
    key: bytes
    sign_buffers: bool
    def __init__(
        self,
        key: bytes = b"",
        *,
        packer: str = "msgpack",
        signature_scheme: str = "hmac-sha256",
        session: str | None = None,
        username: str | None = None,
        history_size: int = 65536,
        max_part: int = 268435456,
        sign_buffers: bool | None = None,
    ) -> None: ...
    def msg_id(self) -> str: ...
    def msg_header(self, msg_type: str) -> dict[str, Any]: ...
    def pack(self, obj: Any) -> bytes: ...
    def unpack(self, data: Buffer) -> Any: ...
    def sign(self, parts: Sequence[Buffer]) -> bytes: ...
    def buffers_digest(self, buffers: Sequence[Buffer]) -> str | None:
        """The keyed BLAKE3 MAC (hex) of ``buffers`` as ``metadata["buffers_mac"]`` holds it;
        ``None`` without a key. Hashes without the GIL."""
    def serialize(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        ident: Sequence[bytes] | bytes | None = None,
        buffers: Sequence[Buffer] | None = None,
        header: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Build the frames of one message: idents, delimiter, signature, the four packed
        parts (bytes), then the given buffers as they are (not copied)."""
    def deserialize(
        self, frames: Sequence[Buffer], *, content: bool = True, record: bool = True
    ) -> dict[str, Any]:
        """Split, verify and unpack a received message.

        Returns a dict with ``idents``, ``header``, ``parent_header``, ``metadata``,
        ``content``, ``buffers``, ``msg_id`` and ``msg_type``. Raises a subclass of
        :class:`ferroparallel.error.MessageError` for every malformed input.
        """

class SendTracker:
    """When libzmq has finished sending, from the objects' own memory, the large buffers of
    the messages it was given to (``IoThread.send(..., tracker=t)``); smaller buffers are
    copied at once and not counted."""

    def __init__(self) -> None: ...
    @property
    def done(self) -> bool:
        """Whether every tracked buffer has been sent (the objects may change now)."""
    @property
    def pending(self) -> int:
        """Tracked buffers not sent yet."""
    def wait(self, timeout: float | None = None) -> bool:
        """Wait (interruptible) until ``done``, at most ``timeout`` seconds; returns ``done``."""

class IoThread:
    """A native thread that owns ZMQ sockets for this process.

    ``send`` signs and sends a message from the calling thread (one call per message, no
    per-frame Python work; a message the socket cannot take yet waits, in order, for the thread
    to send it); the thread receives, verifies and decodes; ``recv`` hands received messages to
    Python in batches.
    Buffers given to ``send`` are borrowed without copying and released (under the GIL) after the
    socket is done with them.
    """

    def __init__(self, session: Session, *, name: str = "ferroparallel-io") -> None: ...
    def add_socket(
        self,
        name: str,
        kind: str,
        *,
        connect: Iterable[str] = (),
        bind: Iterable[str] = (),
        identity: bytes | None = None,
        subscribe: Iterable[bytes] | None = None,
        raw: bool = False,
        linger_ms: int = 1000,
        forward_to: str | None = None,
        curve_server: bool = False,
        curve_serverkey: str | bytes | None = None,
        curve_publickey: str | bytes | None = None,
        curve_secretkey: str | bytes | None = None,
    ) -> list[str]:
        """Create a socket on the I/O thread; returns the bound endpoints (resolved ports).

        ``kind`` is one of ``DEALER ROUTER PUB SUB XPUB XSUB PAIR PUSH PULL REQ REP``.
        A ``raw`` socket delivers unparsed frames. ``forward_to`` relays every frame list
        received on this socket, unchanged, to another socket without involving Python
        (used for the engine heartbeat echo).

        CurveZMQ (keys are Z85 ``str``/``bytes`` or 32 raw bytes): ``curve_serverkey`` makes a
        CURVE client of the server with that public key, using ``curve_secretkey`` (and its
        ``curve_publickey``) or a fresh key pair; ``curve_server=True`` with
        ``curve_secretkey`` makes a CURVE server. Invalid keys raise ``ValueError``.
        """
    def send(
        self,
        socket: str,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | bytes | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        ident: Sequence[bytes] | bytes | None = None,
        buffers: Sequence[Buffer] | None = None,
        header: dict[str, Any] | None = None,
        tracker: SendTracker | None = None,
    ) -> dict[str, Any]:
        """Sign and send a message now; returns its header (``msg_id`` included). ``parent``
        may be a header packed with the session's packer (``bytes``), sent as it is. With
        ``tracker``, the frames sent from the buffers' own memory are counted by it."""
    def send_raw(self, socket: str, frames: Sequence[Buffer]) -> None:
        """Send frames exactly as given (no envelope, no signature)."""
    def recv(
        self, timeout: float | None = None, max_messages: int = 10000, since: int | None = None
    ) -> list[tuple[str, Any]]:
        """Wait up to ``timeout`` seconds (``None``: until something arrives) and return every
        message received so far as ``(socket_name, message)``; ``message`` is the dict of
        :meth:`Session.deserialize` with ``buffers`` as :class:`Frame`, or a list of
        :class:`Frame` for raw sockets. Releases the GIL while waiting and checks for signals at
        least every 50 ms, so Ctrl-C raises KeyboardInterrupt.

        With ``since`` (a :meth:`generation` value) the caller waits with priority: messages
        go to it before any caller without ``since`` (the first such caller receives from the
        sockets itself while the I/O thread steps aside), and it returns at once, possibly
        with nothing, when the generation is no longer ``since`` (see :meth:`wake`)."""
    def generation(self) -> int:
        """The inbox generation, bumped by :meth:`wake`."""
    def wake(self) -> None:
        """Bump the generation: ``recv(since=g)`` calls with an older ``g`` return at once (a
        caller receiving from the sockets is interrupted too)."""
    def batch_sends(self, on: bool) -> None:
        """Hold back messages sent less than 200 µs after the previous one and send them
        together: when 64 wait on a socket, when a thread starts waiting in
        ``recv(since=...)``, or at the latest 500 µs after the first (decision 0010).
        ``batch_sends(False)`` sends what is held."""
    def add_link(self, endpoint: str, ident: str, timeout: float) -> None:
        """Open a link to the controller's ``endpoint`` (``ipc://@<name>``, decision 0017): say
        a signed hello as the client with routing identity ``ident`` and wait up to
        ``timeout`` seconds for the welcome. From then on the ``mux`` and ``task`` sockets'
        messages go over the link (sent from the calling thread, batched as by
        :meth:`batch_sends`), and what the controller sends over it arrives as theirs. When
        the controller closes it, :meth:`take_errors` reports ``LinkClosed`` and the sockets
        carry the traffic again. ValueError says why it could not be opened."""
    @property
    def link_up(self) -> bool:
        """Whether the ``mux`` and ``task`` traffic goes over a link to the controller."""
    def handshake_failures(self) -> list[tuple[str, str, str]]:
        """Connecting sockets whose last ZMTP handshake failed: ``(socket_name, endpoint,
        reason)``, e.g. a CURVE mechanism mismatch or a server that refused our key."""
    def take_errors(self) -> list[tuple[str, str, str]]:
        """Messages dropped since the last call: ``(socket_name, error_class_name, text)``."""
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None:
        """Stop the thread and close every socket. Idempotent."""
    @property
    def closed(self) -> bool: ...

class DirectSockets:
    """Sockets that the calling threads poll and send on themselves, without an I/O thread
    (an engine's shell and control channels: the thread that waits for a request answers it
    with no thread hand-off). Every operation takes one internal lock; a thread that needs
    the sockets while another waits on them in :meth:`recv` wakes it, so it hands over at once.

    Parameters
    ----------
    session : Session
        Verifies received messages and signs sent ones.
    """

    def __init__(self, session: Session) -> None: ...
    def add_socket(
        self,
        name: str,
        kind: str,
        *,
        connect: Sequence[str] | str | None = None,
        bind: Sequence[str] | str | None = None,
        identity: Buffer | None = None,
        raw: bool = False,
        linger_ms: int = 1000,
        curve_serverkey: Buffer | None = None,
        curve_publickey: Buffer | None = None,
        curve_secretkey: Buffer | None = None,
        max_message_size: int | None = None,
    ) -> list[str]:
        """Create a socket (as :meth:`IoThread.add_socket`, without forwarding or handshake
        monitoring); returns the bound endpoints. ``max_message_size``: a peer announcing a
        larger inbound message is disconnected before its bytes are buffered."""
    def send(
        self,
        socket: str,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | bytes | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        ident: Sequence[bytes] | bytes | None = None,
        buffers: Sequence[Buffer] | None = None,
        header: dict[str, Any] | None = None,
        hold: bool = False,
    ) -> None:
        """Sign and send one message now (waiting, without the GIL, up to 30 s for a peer
        that is not taking messages: ValueError then). ``parent`` is a header dict or a header
        packed with the session's packer (``bytes``: a received message's
        :data:`PACKED_HEADER_KEY`), sent as it is. ``hold=True``:
        keep it back until :meth:`send_held` or the next send that is not held (messages
        leave in the order given)."""
    @property
    def held(self) -> int:
        """Number of messages held back by ``send(..., hold=True)``."""
    @property
    def sending(self) -> int:
        """Frames sent from the memory of objects given to :meth:`send` (not copied) that
        libzmq has not finished with; until 0, that memory must not change."""
    def send_held(self) -> None:
        """Send every held message now, in order."""
    def recv(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Wait up to ``timeout`` seconds (``None``: until something arrives) for messages on
        any socket, as :meth:`IoThread.recv` (each message dict also holds its header frame as
        received under :data:`PACKED_HEADER_KEY`); returns early, possibly with nothing, when
        :meth:`wake` is called. Releases the GIL while waiting; Ctrl-C raises
        KeyboardInterrupt within 50 ms."""
    def wait_connected(self, timeout: float) -> bool:
        """Wait (without the GIL) until every connecting socket has completed a handshake with
        each of its endpoints; False after ``timeout`` seconds."""
    def add_link(self, socket: str, endpoint: str, uuid: str, timeout: float) -> None:
        """Open an engine link (decision 0017) to the controller's ``endpoint``
        (``ipc://@<name>``) for the ROUTER ``socket``: say a signed hello as engine ``uuid``
        and wait up to ``timeout`` seconds for the welcome. From then on the link's messages
        arrive on ``socket`` under the identity ``b"fp-link/mux"`` or ``b"fp-link/task"``,
        and replies sent to those identities go back over it. ValueError says why it could
        not be opened."""
    @property
    def link(self) -> str:
        """``"none"`` (no link), ``"up"``, or ``"lost"``: it closed or broke, and the
        controller considers this engine gone."""
    def handshake_failures(self) -> list[tuple[str, str, str]]:
        """As :meth:`IoThread.handshake_failures`, for these sockets."""
    def wake(self) -> None:
        """Interrupt a :meth:`recv` waiting in another thread."""
    def take_errors(self) -> list[tuple[str, str, str]]:
        """Messages dropped since the last call: ``(socket_name, error_class_name, text)``."""
    def close(self) -> None:
        """Close every socket. Idempotent."""
    @property
    def closed(self) -> bool: ...

class Controller:
    """The ferroparallel controller: hub, MUX/control/IOPub relays, task scheduler and heartbeat,
    all on native threads (no Python on the message path).

    Parameters
    ----------
    config : dict
        ``ip`` (str, default ``"127.0.0.1"``): interface to bind.
        ``ports`` (dict[str, int]): port per channel, 0 or missing = random. Channel names:
        ``registration`` (shared by engines and clients), ``notification``, ``mux_client``,
        ``mux_engine``, ``control_client``, ``control_engine``, ``task_client``,
        ``task_engine``, ``iopub_client``, ``iopub_engine``, ``hb_ping``, ``hb_pong``,
        ``broadcast_client``, ``broadcast_engine``.
        ``key`` (bytes), ``signature_scheme`` (str), ``pack`` (``"msgpack"``/``"json"``).
        ``hb_period_ms`` (int, default 3000), ``hb_max_misses`` (int, default 10),
        ``registration_timeout_ms`` (int, default max(30000, 10 * period)).
        ``scheme`` (str, default ``"leastload"``), ``hwm`` (int).
        ``db`` (``"memory"``, ``"sqlite"``, ``"none"``), ``db_path`` (str), ``restore`` (bool).
        ``engine_state_file`` (str, optional): JSON ``{"engines": {id: uuid}, "next_id": n}``
        rewritten on every (un)registration.
        ``log_level`` (``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ``"ERROR"``); the controller
        logs to stderr.
        ``curve_secretkey`` (Z85 ``str``/``bytes``, optional): every bound socket becomes a
        CurveZMQ server with this key (the public key is derived from it).
    """

    def __init__(self, config: dict[str, Any]) -> None: ...
    def start(self) -> dict[str, int]:
        """Bind every socket and start the threads; returns the bound port of each channel."""
    def ipc_endpoints(self) -> dict[str, str]:
        """The ``ipc://`` endpoint of each channel (empty without ``ipc_prefix``, or before
        :meth:`start`)."""
    def link_endpoint(self) -> str | None:
        """The link endpoint (``ipc://@...``, decision 0017), or None: no IPC, CurveZMQ
        on, ``FERROPARALLEL_LINKS=0``, or not started."""
    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the controller stops (True) or the timeout passes (False). Releases the
        GIL and checks for signals every 50 ms."""
    def stop(self) -> None:
        """Publish ``shutdown_notification``, stop the threads and close the sockets."""
    def engines(self) -> dict[int, str]:
        """Registered engines: id -> uuid."""
    def stats(self) -> dict[str, int]: ...
    @property
    def running(self) -> bool: ...
