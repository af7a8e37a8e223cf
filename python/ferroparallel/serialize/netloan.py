"""Large buffers fetched straight from the process that lends them, over TCP (decision 0014).

On one host a waiting call's large buffers are read from the sender's memory (decision 0007).
Across hosts, or with shared memory turned off, they used to travel with the message through
the controller: two full transfers of an atomic ZMQ message. Here the message carries a
:class:`NetSlice` per large buffer instead (the lender's data endpoint, a random token, the
buffer's index and size, and the msg_id of the request it was lent for), and the receiver
fetches the bytes from the lender's :class:`DataServer` while it unpacks the message: one
transfer, receiver-driven.

The data channel is a plain TCP connection from the receiver to the lender's listener (bound
on the interface that reaches the controller), carrying the length-prefixed messages of
``_core.DataStream`` (decision 0016): no libzmq I/O thread between the socket and the memory
on either side. Requests and acknowledgements are messages signed by the cluster key; the
buffers follow an acknowledgement as they are, then their MAC: a keyed hash of the request and
of the buffers' keyed digest, which the lender computes once per loan (while its first fetch
sends them) and the receiver piece by piece as they arrive; it is checked before anything is
unpickled.

Lent request arguments stay with the client until every reply has arrived (as a peer-memory
loan does); a lent result stays with the engine, which runs nothing else until the client has
fetched it (or released it, or :data:`~ferroparallel.serialize.peer.PICKUP_TIMEOUT` passed).
"""

from __future__ import annotations

import atexit
import contextlib
import hmac
import ipaddress
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from .. import _core
from .peer import Loan, _request
from .shm import DataUnreachable, ShmError

#: ``FERROPARALLEL_DIRECT_DATA=0`` (or ``off``/``false``/``no``) turns the direct data path off.
ENV_ENABLE = "FERROPARALLEL_DIRECT_DATA"
#: Seconds a fetch may take, plus one second per :data:`FETCH_RATE` bytes.
FETCH_TIMEOUT = 30.0
FETCH_RATE = 50e6
#: Seconds an engine waits for a client's data endpoint to answer its probe.
PROBE_TIMEOUT = 2.0
#: Channels a fetcher keeps open (one per lender it fetched from; the least recently used
#: idle ones are closed beyond this).
MAX_CHANNELS = 16

FETCH_REQUEST, FETCH_ACK, FETCH_REPLY, FETCH_MAC, FETCH_RELEASE = (
    "fp_fetch_request",
    "fp_fetch_ack",
    "fp_fetch_reply",
    "fp_fetch_mac",
    "fp_fetch_release",
)
#: Seconds a fetch waits for the lender to acknowledge it (a lender that is gone, or not
#: reachable, fails the fetch this soon; the bytes themselves then get the size-based time).
ACK_TIMEOUT = 5.0
#: Largest message a data server accepts: it only ever receives fetch requests and releases
#: (a peer announcing more is disconnected before anything is buffered).
MAX_REQUEST_BYTES = 64 * 1024
#: Most frames in such a message, and in an acknowledgement (a signed message has 6).
MAX_REQUEST_FRAMES = 16
#: Peers a data server serves at once (a thread each); more connections are refused.
MAX_PEERS = 256

log = logging.getLogger("ferroparallel.netloan")

#: Fetches this process made: ``[count, bytes]`` (tests and diagnostics).
fetched = [0, 0]

#: Data servers running in this process: stopped at interpreter exit (a thread waiting in
#: native code while the interpreter finalizes would abort the process).
_running: weakref.WeakSet[DataServer] = weakref.WeakSet()
#: Fetchers of this process: their connections are closed at exit too.
_fetchers: weakref.WeakSet[Fetcher] = weakref.WeakSet()


@atexit.register
def _stop_servers() -> None:
    for server in list(_running):
        server.close()
    for fetcher in list(_fetchers):
        fetcher.close()


_fetching = threading.local()


def enabled_by_env() -> bool:
    """False when ``$FERROPARALLEL_DIRECT_DATA`` says off; True otherwise."""
    value = os.environ.get(ENV_ENABLE, "").strip().lower()
    return value not in ("0", "off", "false", "no")


#: Host parts of a URL that mean "every interface" (a controller started with ``--ip='*'``).
WILDCARD_HOSTS = frozenset({"*", "0.0.0.0"})


def routable_address() -> str:
    """This host's address on its default route (what other hosts reach it by), found with a
    route lookup that sends nothing; ``127.0.0.1`` without such a route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a route lookup, no packet
            address = str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if ipaddress.ip_address(address).is_loopback else address


def bind_host(controller_url: str) -> str:
    """The address to serve data on: the local interface that reaches the controller
    (``127.0.0.1`` for a controller on this host or behind Unix sockets); for a controller
    on every interface (``tcp://*``), this host's routable address."""
    parts = urlsplit(controller_url)
    host = parts.netloc.rsplit(":", 1)[0] if parts.scheme == "tcp" else ""
    if host in WILDCARD_HOSTS:
        return routable_address()
    host = parts.hostname or ""
    if parts.scheme != "tcp" or host in ("", "localhost"):
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass  # a host name: resolved by the route lookup below
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, parts.port or 9))  # no packet is sent: a route lookup
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


# ----- lender -------------------------------------------------------------------------------


class _Lent:
    __slots__ = ("buffers", "digest", "done", "msg_id", "served")

    def __init__(self, buffers: list[Any], msg_id: str) -> None:
        self.buffers = buffers
        self.msg_id = msg_id
        self.served = 0
        self.done = threading.Event()
        #: the buffers' keyed digest, computed by the first fetch's send and reused by the
        #: others (a push to 2 engines hashes the array once, not once per engine)
        self.digest = _core.LoanDigest()


class DataServer:
    """Serves this process's lent buffers to the peers that fetch them: a TCP listener and one
    daemon thread per connected peer (see :mod:`ferroparallel._core` ``DataStream``).

    Parameters
    ----------
    key : bytes
        The cluster key: fetch requests must be signed with it.
    packer : str
        The cluster's packer.
    host : str
        The interface to bind (see :func:`bind_host`).
    """

    def __init__(self, key: bytes, packer: str, host: str) -> None:
        self.session = _core.Session(key, packer=packer, sign_buffers=False)
        #: whether served buffers are followed by their MAC: yes unless this process was
        #: started with FERROPARALLEL_SIGN_BUFFERS=0 (as for the buffers of every message);
        #: the signed acknowledgement tells the fetcher
        self.mac = _core.Session(key, packer=packer).sign_buffers and bool(key)
        self.listener = _core.DataListener(host)
        self.endpoint: str = self.listener.endpoint
        self._lent: dict[str, _Lent] = {}
        self._lock = threading.Lock()
        self._streams: set[Any] = set()
        self._serving: set[threading.Thread] = set()
        #: connected peers waiting for their next request (or their first), and since when:
        #: with MAX_PEERS connected, the one idle longest is closed to make room for a new one
        self._idle: dict[Any, float] = {}
        self._refusing = False
        #: the token of this process's probe secret, and who to tell when a peer fetched it
        #: (the fetch request names the peer: ``content["peer"]``)
        self.probe_token: str | None = None
        self.on_probe: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._accept, name="ferroparallel-data", daemon=True)
        _running.add(self)
        self._thread.start()

    def lend(self, buffers: list[Any], msg_id: str, token: str | None = None) -> str:
        """Serve ``buffers`` (the list itself: buffers appended later are served too) under a
        new token (or ``token``) to fetches made for request ``msg_id``; returns the token."""
        token = token or os.urandom(16).hex()
        with self._lock:
            self._lent[token] = _Lent(buffers, msg_id)
        return token

    def withdraw(self, token: str) -> None:
        """Stop serving ``token`` (later fetches get ``missing``)."""
        with self._lock:
            lent = self._lent.pop(token, None)
        if lent is not None:
            lent.done.set()

    def wait_fetched(self, token: str, timeout: float) -> bool:
        """Wait until ``token`` was fetched (its bytes handed to the kernel) or released by the
        borrower, at most ``timeout`` seconds; then withdraw it. True if it was picked up in
        time."""
        with self._lock:
            lent = self._lent.get(token)
        if lent is None:
            return False
        picked = lent.done.wait(timeout)
        self.withdraw(token)
        return picked

    @property
    def lent(self) -> int:
        """Number of tokens served now."""
        with self._lock:
            return len(self._lent)

    @property
    def connections(self) -> int:
        """Number of peers connected now."""
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """Stop serving and wait for its threads to end (idempotent); transfers in progress
        fail. (Called at exit too: a thread still in native code when the interpreter
        finalizes would abort the process.)"""
        self.listener.close()  # wakes the thread out of its wait
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            streams, self._streams = set(self._streams), set()
            serving = set(self._serving)
        for stream in streams:
            stream.close()  # wakes its thread at once
        for thread in serving:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        with self._lock:
            lent, self._lent = self._lent, {}
        for item in lent.values():
            item.done.set()

    def _accept(self) -> None:
        listener = self.listener
        while not listener.closed:
            try:
                stream = listener.accept(0.5)
            except Exception:  # noqa: BLE001 - out of descriptors, or closed under us
                if listener.closed:
                    return
                log.warning("data channel accept failed", exc_info=True)
                time.sleep(0.5)
                continue
            if stream is None:
                continue
            idle: tuple[Any, float] | None = None
            with self._lock:
                full = len(self._streams) >= MAX_PEERS
                if full:  # make room: the peer waiting longest for its next request goes
                    idle = min(self._idle.items(), key=lambda kv: kv[1], default=None)
                    if idle is not None:
                        self._idle.pop(idle[0])
                        self._streams.discard(idle[0])
                        full = False
                if not full and not listener.closed:
                    self._streams.add(stream)
            if idle is not None and not listener.closed:
                idle[0].close()  # (its fetcher reconnects when it needs this server again)
            if full or listener.closed:
                if not self._refusing:  # once per burst: a flood must not flood the log
                    log.warning(
                        "refused a data connection from %s: %d peers are being served",
                        stream.peer,
                        MAX_PEERS,
                    )
                self._refusing = True
                stream.close()
                continue
            self._refusing = False
            thread = threading.Thread(
                target=self._serve, args=(stream,), name="ferroparallel-data-peer", daemon=True
            )
            with self._lock:
                self._serving.add(thread)
            thread.start()

    def _serve(self, stream: Any) -> None:
        signed = False  # whether the peer sent a request signed with the key
        try:
            while not stream.closed:
                with self._lock:
                    if stream in self._streams:
                        self._idle[stream] = time.monotonic()
                try:
                    frames = stream.recv(
                        max_bytes=MAX_REQUEST_BYTES,
                        max_frames=MAX_REQUEST_FRAMES,
                        # a peer that proved it has the key may stay connected between its
                        # requests; one that did not must send its first request at once (a
                        # silent connection holds a thread, and a place among MAX_PEERS)
                        timeout=None if signed else ACK_TIMEOUT,
                        message_timeout=ACK_TIMEOUT,  # half a request is not fine
                    )
                except EOFError:
                    return  # the peer closed the connection
                except InterruptedError:
                    return  # closed by this process
                except (OSError, ValueError) as e:
                    if not stream.closed:  # (else: closed to make room, or by close())
                        log.warning("dropped the data connection of %s: %s", stream.peer, e)
                    return
                with self._lock:
                    self._idle.pop(stream, None)
                    if stream not in self._streams:
                        return  # closed to make room meanwhile: its fetcher asks again
                try:
                    msg = self.session.deserialize(frames)
                except Exception as e:  # noqa: BLE001 - unsigned or malformed: the peer goes
                    log.warning("dropped the data connection of %s: %s", stream.peer, e)
                    return
                signed = True
                try:
                    self._answer(stream, msg)
                except (ConnectionError, InterruptedError) as e:
                    log.debug("%s left during a fetch: %s", stream.peer, e)  # (it gave up)
                    return
                except Exception as e:  # noqa: BLE001 - one bad peer must not stop the server
                    if not stream.closed:
                        log.warning("could not answer a fetch from %s: %s", stream.peer, e)
                    return
        finally:
            stream.close()
            with self._lock:
                self._streams.discard(stream)
                self._idle.pop(stream, None)
                self._serving.discard(threading.current_thread())

    def _send(self, stream: Any, kind: str, content: dict[str, Any], parent: Any) -> None:
        stream.send(self.session.serialize(kind, content, parent), timeout=ACK_TIMEOUT)

    def _answer(self, stream: Any, msg: dict[str, Any]) -> None:
        header = msg.get("header") or {}
        content = msg.get("content") or {}
        token = content.get("token")
        kind = header.get("msg_type")
        with self._lock:
            lent = self._lent.get(token) if isinstance(token, str) else None
        if kind == FETCH_RELEASE:
            if lent is not None:
                lent.done.set()
            return
        if kind != FETCH_REQUEST:
            log.debug("ignoring %r on the data channel", kind)
            return
        if lent is None:
            self._send(stream, FETCH_REPLY, {"status": "missing"}, header)
            return
        buffers = list(lent.buffers)
        nbytes = sum(memoryview(b).nbytes for b in buffers)
        announced = {"count": len(buffers), "nbytes": nbytes, "mac": self.mac}
        self._send(stream, FETCH_ACK, announced, header)
        # the bytes go from the buffers' memory to the socket, their digest computed meanwhile
        # by the loan's first fetch (later and concurrent ones reuse it); the MAC binds that
        # digest to this request
        try:
            stream.send(
                buffers,
                session=self.session if self.mac else None,
                mac_context=str(header.get("msg_id")),
                timeout=FETCH_TIMEOUT + nbytes / FETCH_RATE,
                digest=lent.digest,
            )
        finally:
            # sent, or the borrower gave up (or left) during the transfer: either way it will
            # not fetch these bytes again, so a lender waiting for the pickup goes on now
            lent.done.set()
        lent.served += 1
        peer, told = content.get("peer"), self.on_probe
        if token == self.probe_token and isinstance(peer, str) and told is not None:
            try:
                told(peer)  # that peer can fetch from this process
            except Exception:  # noqa: BLE001 - a probe must not stop the server
                log.warning("probe callback failed", exc_info=True)


class NetSlice:
    """Descriptor of one buffer lent through a :class:`DataServer`; unpickles to the fetched
    bytes (read-only)."""

    __slots__ = ("endpoint", "index", "loan", "nbytes", "token")

    def __init__(self, endpoint: str, token: str, index: int, nbytes: int, loan: str) -> None:
        self.endpoint = endpoint
        self.token = token
        self.index = index
        self.nbytes = nbytes
        self.loan = loan

    def __reduce__(self) -> tuple[Any, ...]:
        return fetch_slice, (self.endpoint, self.token, self.index, self.nbytes, self.loan)

    def __repr__(self) -> str:
        return f"<NetSlice {self.endpoint} {self.token[:8]}[{self.index}] for {self.loan}>"


class NetLoan(Loan):
    """The buffers one message lends through ``server``; :meth:`release` withdraws them."""

    __slots__ = ("server", "token")

    def __init__(self, msg_id: str, server: DataServer) -> None:
        super().__init__(msg_id)
        self.server = server
        self.token = os.urandom(16).hex()

    def release(self) -> None:
        self.server.withdraw(self.token)
        super().release()


class NetLoanWriter:
    """Out-of-band sink for the pickler (the interface of ``shm.SegmentWriter``): buffers above
    ``threshold`` are served by ``server`` to the receivers of message ``msg_id``."""

    def __init__(self, threshold: int, msg_id: str, server: DataServer) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, not {threshold}")
        self.threshold = threshold
        self.loan = NetLoan(msg_id, server)

    def __len__(self) -> int:
        return len(self.loan.buffers)

    def wants(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` is lent."""
        return nbytes > self.threshold

    def add(self, raw: memoryview) -> NetSlice:
        """Lend ``raw`` (a flat contiguous view; kept alive by the loan)."""
        loan = self.loan
        if not loan.buffers:
            loan.server.lend(loan.buffers, loan.msg_id, loan.token)
        index = len(loan.buffers)
        loan.buffers.append(raw)
        loan.nbytes += raw.nbytes
        return NetSlice(loan.server.endpoint, loan.token, index, raw.nbytes, loan.msg_id)


class NetLentResult:
    """A result lent by an engine: its buffers stay alive until :meth:`wait` returns."""

    def __init__(self, loan: NetLoan) -> None:
        self.loan = loan

    def reply_metadata(self) -> list[Any]:
        """``[endpoint, token, nbytes]`` for the reply (``NET_LENT_KEY``)."""
        return [self.loan.server.endpoint, self.loan.token, self.loan.nbytes]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the client fetched the result (or released it), at most ``timeout``
        (default: the peer-memory pickup timeout plus a second per 100 MB); then withdraw it.
        A fetch after that is answered ``missing``."""
        from .peer import PICKUP_RATE, PICKUP_TIMEOUT

        if timeout is None:
            timeout = PICKUP_TIMEOUT + self.loan.nbytes / PICKUP_RATE
        picked = self.loan.server.wait_fetched(self.loan.token, timeout)
        if not picked:
            log.warning("a client did not fetch a lent result in %.0f s: moving on", timeout)
        self.loan.release()
        return picked


# ----- borrower -----------------------------------------------------------------------------


class Fetcher:
    """Fetches lent buffers from other processes' :class:`DataServer` (one connection per
    endpoint, opened on first use; one fetch at a time per endpoint)."""

    def __init__(self, key: bytes, packer: str) -> None:
        self.session = _core.Session(key, packer=packer, sign_buffers=False)
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str], Any] = {}
        _fetchers.add(self)

    @contextlib.contextmanager
    def _channel(self, endpoint: str) -> Iterator[_Channel]:
        """``with self._channel(endpoint) as chan:`` exclusive use of the channel to
        ``endpoint`` (connected by the caller if needed; not evicted while in use). A failure
        in the block closes it: the stream is out of step."""
        with self._lock:
            chan = self._channels.pop(endpoint, None)
            if chan is None:
                chan = _Channel(endpoint)
                self._evict()
            self._channels[endpoint] = chan  # (last: the most recently used)
            chan.users += 1
        try:
            with chan.lock:
                yield chan
        except BaseException:
            with self._lock:
                if self._channels.get(endpoint) is chan:
                    del self._channels[endpoint]
            chan.close()
            raise
        finally:
            with self._lock:
                chan.users -= 1

    def _evict(self) -> None:
        """Close the least recently used idle channels beyond :data:`MAX_CHANNELS` (an engine
        meets many clients over its life; each channel holds a connection). Call with the
        lock."""
        excess = len(self._channels) - MAX_CHANNELS + 1
        for endpoint in list(self._channels):
            if excess <= 0:
                break
            chan = self._channels[endpoint]
            if chan.users == 0:
                del self._channels[endpoint]
                chan.close()
                excess -= 1

    @property
    def channels(self) -> int:
        """Number of open channels."""
        return len(self._channels)

    def _request(
        self, chan: _Channel, kind: str, content: dict[str, Any], timeout: float
    ) -> tuple[str, Any]:
        """Send a signed request on ``chan`` (connecting first); its msg_id and the stream."""
        header = self.session.msg_header(kind)
        frames = self.session.serialize(kind, content, header=header)
        stream = chan.stream
        if stream is None:
            stream = chan.stream = _core.DataStream.connect(chan.endpoint, timeout)
        stream.send(frames, timeout=timeout)
        return str(header["msg_id"]), stream

    def fetch(
        self,
        endpoint: str,
        token: str,
        timeout: float,
        peer: str | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> list[Any]:
        """All buffers lent under ``token`` at ``endpoint`` (checked against their MAC);
        ``peer`` names this process to the lender (a probe's fetch); ``abandon()`` (asked
        every quarter of a second) true gives up (ShmError).

        Raises
        ------
        DataUnreachable
            The lender did not answer within :data:`ACK_TIMEOUT` (gone, or not reachable).
        ShmError
            The lender does not serve the token (any more), did not send the bytes in
            ``timeout`` seconds, or the bytes do not match their MAC.
        """
        started = time.monotonic()
        acked = False

        def failed(e: BaseException) -> ShmError:
            if isinstance(e, InterruptedError) and abandon is not None and abandon():
                return ShmError(f"fetch from {endpoint} abandoned")
            what = "send them" if acked else "answer"
            # not even acknowledged: unreachable from here (or gone)
            return (ShmError if acked else DataUnreachable)(
                f"the process that lent these buffers ({endpoint}) did not {what} within "
                f"{time.monotonic() - started:.0f} s: it is gone or this host cannot reach it "
                f"({e}; the direct data path is turned off with {ENV_ENABLE}=0)"
            )

        asked = {"token": token} if peer is None else {"token": token, "peer": peer}
        if abandon is not None and abandon():
            raise ShmError(f"fetch from {endpoint} abandoned")
        with self._channel(endpoint) as chan:
            first = min(timeout, ACK_TIMEOUT)
            while True:
                reused = chan.stream
                try:
                    msg_id, stream = self._request(chan, FETCH_REQUEST, asked, first)
                    answer = stream.recv(
                        max_bytes=MAX_REQUEST_BYTES,
                        max_frames=MAX_REQUEST_FRAMES,
                        timeout=max(0.0, started + first - time.monotonic()),
                        abandon=abandon,
                    )
                    msg = self.session.deserialize(answer)
                    break
                except (EOFError, ConnectionError) as e:
                    if reused is not None and not reused.closed:
                        # the lender closed this idle connection (to make room for other
                        # peers) before it read the request: ask again on a new one
                        reused.close()
                        if chan.stream is reused:
                            chan.stream = None
                        continue
                    raise failed(e) from e
                except (OSError, ValueError) as e:
                    raise failed(e) from e
                except Exception as e:  # noqa: BLE001 - a bad signature: not our lender
                    raise ShmError(f"the data endpoint {endpoint} answered garbage: {e}") from e
            kind = (msg.get("header") or {}).get("msg_type")
            content = msg.get("content") or {}
            if (msg.get("parent_header") or {}).get("msg_id") != msg_id or kind not in (
                FETCH_ACK,
                FETCH_REPLY,
            ):
                raise ShmError(f"the data endpoint {endpoint} answered out of turn ({kind})")
            if kind == FETCH_REPLY:
                raise ShmError(
                    f"the buffers lent for this message are no longer served by {endpoint} "
                    f"(the lender stopped waiting, or this is a resubmitted request): run the "
                    f"request again"
                )
            acked = True
            if abandon is not None and abandon():
                raise ShmError(f"fetch from {endpoint} abandoned")  # (the channel closes)
            count, size = content.get("count"), content.get("nbytes")
            if type(count) is not int or type(size) is not int or count < 0 or size < 0:
                raise ShmError(f"the data endpoint {endpoint} sent a malformed acknowledgement")
            try:
                frames = stream.recv(
                    max_bytes=size,
                    max_frames=count,
                    timeout=max(0.0, started + timeout + size / FETCH_RATE - time.monotonic()),
                    # checked unless the (signed) acknowledgement says the lender sends none
                    session=None if content.get("mac") is False else self.session,
                    mac_context=msg_id,
                    abandon=abandon,
                )
            except ValueError as e:
                raise ShmError(f"fetched buffers from {endpoint} were refused: {e}") from e
            except (OSError, EOFError) as e:
                raise failed(e) from e
            if len(frames) != count:
                raise ShmError(
                    f"the data endpoint {endpoint} sent {len(frames)} of {count} buffers"
                )
        fetched[0] += 1
        fetched[1] += size
        return frames

    def take(self, endpoint: str, token: str, index: int, nbytes: int) -> Any:
        """Buffer ``index`` of the loan ``token`` (fetched once for all its buffers, or
        fetched ahead with :meth:`prefetch`; kept until each was taken)."""
        key = (endpoint, token)
        with self._lock:
            kept = self._kept.get(key)
        if kept is None:
            frames = self.fetch(endpoint, token, FETCH_TIMEOUT + nbytes / FETCH_RATE)
            kept = (frames, set(range(len(frames))))
            with self._lock:
                self._kept[key] = kept
        if isinstance(kept, BaseException):
            self.forget([key])
            kind = DataUnreachable if isinstance(kept, DataUnreachable) else ShmError
            raise kind(str(kept)) from kept
        frames, left = kept
        if not 0 <= index < len(frames) or memoryview(frames[index]).nbytes != nbytes:
            self.forget([key])
            raise ShmError(f"fetched buffers do not match their descriptor ({index}, {nbytes})")
        left.discard(index)
        if not left:
            self.forget([key])
        return frames[index]

    def prefetch(
        self, endpoint: str, token: str, nbytes: int, abandon: Callable[[], bool] | None = None
    ) -> bool:
        """Fetch the loan ``token`` now for a later :meth:`take` (its failure, too, is kept
        for :meth:`take` to raise); False if ``abandon()`` said to give up."""
        key = (endpoint, token)
        try:
            frames = self.fetch(
                endpoint, token, FETCH_TIMEOUT + nbytes / FETCH_RATE, abandon=abandon
            )
            kept: Any = (frames, set(range(len(frames))))
        except Exception as e:  # noqa: BLE001 - any failure is the request's, raised by take
            if abandon is not None and abandon():
                return False
            kept = e if isinstance(e, ShmError) else ShmError(f"fetch from {endpoint}: {e}")
        with self._lock:
            self._kept[key] = kept
        return True

    def forget(self, keys: Any = None) -> None:
        """Drop what was fetched and not taken for ``keys`` (``(endpoint, token)`` pairs;
        default all): a message that failed to unpack, or that nobody waits for."""
        with self._lock:
            if keys is None:
                self._kept.clear()
            for key in keys or ():
                self._kept.pop(key, None)

    def release(self, endpoint: str, token: str) -> None:
        """Tell a lender its buffers will not be fetched."""
        with self._channel(endpoint) as chan:
            self._request(chan, FETCH_RELEASE, {"token": token}, ACK_TIMEOUT)

    def close(self) -> None:
        """Close every channel (fetches in progress fail)."""
        with self._lock:
            chans, self._channels = self._channels, {}
        for chan in chans.values():
            chan.close()


class _Channel:
    """The connection to one lender (``stream``: None until the first request)."""

    __slots__ = ("endpoint", "lock", "stream", "users")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.stream: Any = None
        self.lock = threading.Lock()
        self.users = 0

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()  # (its descriptor goes with the last reference: unread bytes
            # then reset the connection, so a lender still sending fails at once)


class _Fetching:
    """``with fetching(fetcher):`` lets descriptors unpickled in the block use ``fetcher``
    (then forgets what the block's loans left untaken)."""

    __slots__ = ("_prev", "fetcher", "used")

    def __init__(self, fetcher: Fetcher | None, keys: Any = ()) -> None:
        self.fetcher = fetcher
        self.used: set[tuple[str, str]] = set(keys)
        self._prev: _Fetching | None = None

    # (sets the thread-local itself: a ThreadSetting holding this object would make a
    # reference cycle per request, left to the garbage collector)
    def __enter__(self) -> None:
        self._prev = getattr(_fetching, "context", None)
        _fetching.context = self

    def __exit__(self, *exc: object) -> None:
        _fetching.context, self._prev = self._prev, None
        if self.fetcher is not None and self.used:
            self.fetcher.forget(self.used)


def fetching(fetcher: Fetcher | None, keys: Any = ()) -> _Fetching:
    """Unpickle inside this block to fetch lent buffers with ``fetcher``; what was fetched
    for ``keys`` (``(endpoint, token)`` pairs, e.g. fetched ahead) and the loans the block
    used is forgotten at its end, taken or not."""
    return _Fetching(fetcher, keys)


def fetch_slice(endpoint: str, token: str, index: int, nbytes: int, loan: str) -> memoryview:
    """Receiver side of a :class:`NetSlice`: the fetched bytes (read-only).

    Raises
    ------
    ShmError
        The descriptor was not made for the message being unpacked, no fetcher is set up
        here, or the fetch failed.
    """
    current = getattr(_request, "msg_id", None)
    if current is None or not (current == loan or current.startswith(loan + "_")):
        raise ShmError(
            f"these buffers were lent over the network for request {loan!r} and can only be "
            f"fetched while that request's message is delivered (a resubmitted request or a "
            f"result fetched later from the hub cannot reuse them: run the request again)"
        )
    context: _Fetching | None = getattr(_fetching, "context", None)
    if context is None or context.fetcher is None:
        raise DataUnreachable(f"buffers lent over the network by {endpoint} cannot be fetched here")
    context.used.add((endpoint, token))
    return memoryview(context.fetcher.take(endpoint, token, index, nbytes)).toreadonly()


# ----- reachability probe -------------------------------------------------------------------


class Probe:
    """A secret served by a :class:`DataServer`: a peer that can fetch it proves it reaches
    the server."""

    def __init__(self, server: DataServer) -> None:
        self.secret = os.urandom(16)
        self.token = server.lend([self.secret], "probe")
        server.probe_token = self.token
        self.request = [server.endpoint, self.token]


def answer_probe(
    fetcher: Fetcher, request: Any, timeout: float = PROBE_TIMEOUT, peer: str | None = None
) -> str:
    """Fetch the secret behind ``request`` (``[endpoint, token]``) naming this process as
    ``peer`` (which tells the lender that ``peer`` reaches it); its hex, or why not."""
    try:
        endpoint, token = request
        if not (isinstance(endpoint, str) and endpoint.startswith("tcp://")):
            raise ValueError(endpoint)
        str(token)
    except (TypeError, ValueError):
        return "error: malformed probe"
    try:
        frames = fetcher.fetch(endpoint, str(token), timeout, peer=peer)
    except ShmError as e:
        return f"error: {e}"
    return bytes(frames[0]).hex() if len(frames) == 1 else "error: malformed answer"


def check_probe(fetcher: Fetcher, request: Any, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether this process can fetch the secret of a peer's probe ``[endpoint, token, hex]``."""
    if not isinstance(request, Sequence) or len(request) != 3:
        return False
    expected = request[2]
    answer = answer_probe(fetcher, list(request[:2]), timeout)
    return isinstance(expected, str) and hmac.compare_digest(answer.encode(), expected.encode())


class NetData:
    """A process's direct data path: its :class:`DataServer` (started on first use), its
    :class:`Fetcher` and its reachability :class:`Probe`.

    Parameters
    ----------
    key, packer : the cluster's key and packer.
    controller_url : str
        Where the controller is: the server binds the interface that reaches it.
    enabled : bool
        False turns the path off (as ``$FERROPARALLEL_DIRECT_DATA=0`` does).
    """

    def __init__(self, key: bytes, packer: str, controller_url: str, enabled: bool = True) -> None:
        self.enabled = bool(enabled) and enabled_by_env()
        self._key = key
        self._packer = packer
        self._url = controller_url
        self._server: DataServer | None = None
        self._probe: Probe | None = None
        self._lock = threading.Lock()
        self.fetcher = Fetcher(key, packer)
        #: called with a peer's name when it fetched this process's probe secret
        self.on_probe: Callable[[str], None] | None = None

    @property
    def server(self) -> DataServer:
        """This process's data server (started now if it is not running)."""
        with self._lock:
            if self._server is None:
                self._server = DataServer(self._key, self._packer, bind_host(self._url))
                self._server.on_probe = self.on_probe
            return self._server

    @property
    def started(self) -> bool:
        """Whether the data server runs."""
        return self._server is not None

    def probe(self) -> Probe:
        """The secret peers fetch to prove they reach this process's server."""
        server = self.server
        with self._lock:
            if self._probe is None:
                self._probe = Probe(server)
            return self._probe

    def close(self) -> None:
        """Stop the server and close the fetch channels (idempotent)."""
        with self._lock:
            server, self._server, self._probe = self._server, None, None
        if server is not None:
            server.close()
        self.fetcher.close()
