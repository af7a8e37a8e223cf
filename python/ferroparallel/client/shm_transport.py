"""The client's choice between shared memory and the socket path for request arguments.

See ``docs/decisions/0003-shared-memory.md``. For every ``apply_request`` (push, scatter and
apply all are one) the arguments are serialized with a :class:`~ferroparallel.serialize.shm.
SegmentWriter`. If no buffer reached the shared-memory threshold nothing else happens. If some
did and every target engine runs on this host, the segment is written (once, whatever the
number of engines) and the message carries descriptors; the segment is released when every
reply has arrived. Otherwise the arguments are serialized again for the socket path.

Calls that wait for their replies (inside :meth:`ShmTransport.waiting`) first try lending:
large buffers are not copied at all here, the engines read them from this process's memory
when they unpack the request (``docs/decisions/0007-reading-peer-memory.md``); the loan ends
when every reply has arrived. Non-blocking calls keep the segment: their caller may change
the array as soon as the call returns.

Whether an engine is local is asked once per engine with a ``kernel_info_request`` on the
control channel (answered even while the engine is busy): its reply carries the engine's host
token, and whether it could read a probe secret out of this process's memory.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _core
from ..serialize import netloan as _net
from ..serialize import peer as _peer
from ..serialize import shm as _shm
from ..serialize.apply import check_buffer_count, pack_apply_message, pack_plain_call

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("ferroparallel.client")

#: Seconds to wait for engines to say which host they are on (then: the socket path).
PROBE_TIMEOUT = 5.0
_HeldT = TypeVar("_HeldT", _shm.Segment, _peer.Loan)

#: A request to more engines than this sends its large arguments through the controller (one
#: send here, fanned out there) rather than serving one fetch per engine (decision 0014).
NET_MAX_TARGETS = 2


class ShmTransport:
    """Per-client shared-memory policy and the segments it owns.

    Parameters
    ----------
    client : Client
        The client whose requests this serves.
    enabled : bool, optional
        Use shared memory with local engines. Default: on unless ``$FERROPARALLEL_SHM=0`` or
        ``/dev/shm`` is not writable.
    threshold : int, optional
        Buffers above this many bytes use shared memory. Default
        ``$FERROPARALLEL_SHM_THRESHOLD`` or 1 MiB.
    peer_read : bool, optional
        Lend large arguments of waiting calls to engines that can read this process. Default:
        when ``enabled`` was not turned off explicitly, unless ``$FERROPARALLEL_PEER_READ=0``.
    """

    def __init__(
        self,
        client: Client,
        enabled: bool | None = None,
        threshold: int | None = None,
        peer_read: bool | None = None,
    ) -> None:
        self._client = client
        if peer_read is None:
            peer_read = enabled is not False and _shm.enabled_by_env() and _peer.enabled_by_env()
        self.peer_read = bool(peer_read)
        self.peer_host = _peer.peer_token()
        self._readers: dict[str, bool] = {}
        self._lenders: dict[str, bool] = {}
        self._probes: dict[str, tuple[Future, bytes]] = {}
        #: engines asked for their host that have not answered yet
        self._unanswered: set[str] = set()
        self._calls = threading.local()
        self.enabled = (_shm.enabled_by_env() if enabled is None else bool(enabled)) and (
            _shm.available()
        )
        self.threshold = _shm.threshold_from_env() if threshold is None else int(threshold)
        if self.threshold < 0:
            raise ValueError(f"shm_threshold must be >= 0, not {self.threshold}")
        self.host = _shm.host_token()
        self._local: dict[str, bool] = {}
        #: the direct data path (see :meth:`use_network`); engines that fetch from us, and
        #: engines we fetch from
        self.net: _net.NetData | None = None
        self._net_readers: dict[str, bool] = {}
        self._net_lenders: dict[str, bool] = {}
        self._net_checks: list[threading.Thread] = []
        self._live: set[_shm.Segment | _peer.Loan] = set()
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        if self.enabled:
            removed = _shm.sweep()
            if removed:
                log.info("removed %d shared-memory segments of dead processes", len(removed))

    def use_network(self, net: _net.NetData) -> None:
        """Lend large buffers of waiting calls over ``net`` to engines that are not on this
        host (or when shared memory is off), once they proved they can fetch from it."""
        self.net = net if net.enabled else None
        if self.net is not None:
            # weakly: the data server's thread must not keep this transport, and through it
            # the client, alive (a client dropped without close() is collected)
            fetched = weakref.WeakMethod(self._engine_fetched)

            def on_probe(uuid: str) -> None:
                method = fetched()
                if method is not None:
                    method(uuid)

            net.on_probe = on_probe

    def _engine_fetched(self, uuid: str) -> None:
        """Engine ``uuid`` fetched this client's probe secret: it can fetch from here."""
        self._net_readers[uuid] = True

    # ----- packing ------------------------------------------------------------------------

    def waiting(self, block: bool = True) -> _peer.ThreadSetting:
        """``with transport.waiting(block):`` requests packed by this thread inside the block
        are waited for (``block``): their large arguments may be lent instead of copied."""
        return _peer.ThreadSetting(self._calls, "waits", bool(block))

    def lend_results(self, uuids: Sequence[str] | None) -> list[Any] | None:
        """The ``LEND_RESULTS_KEY`` value for a request to ``uuids`` (``None``: any engine):
        when this thread waits for the reply and every target can lend to this process."""
        if not (self.peer_read and getattr(self._calls, "waits", False)):
            return None
        targets = self._client._uuids if uuids is None else uuids
        lenders = self._lenders
        for u in targets:
            if not lenders.get(u):
                if u not in self._local:
                    self.known_local(list(targets))  # ask in the background
                return None
        return [*_peer.own_identity(), self.peer_host]

    def net_results(self, uuids: Sequence[str] | None) -> bool:
        """Whether a request to ``uuids`` (``None``: any engine) may have its large results
        lent over the network: this thread waits for the reply and this client can fetch
        from every target (no engine that could lend through memory instead)."""
        if self.net is None or not getattr(self._calls, "waits", False):
            return False
        targets = self._client._uuids if uuids is None else uuids
        lenders = self._net_lenders
        for u in targets:
            if not lenders.get(u):
                if u not in self._local:
                    self.known_local(list(targets))  # ask in the background
                return False
        return True

    def _net_ready(self, targets: Sequence[str], any_engine: bool) -> bool:
        """Whether every engine in ``targets`` can fetch from this client (asks in the
        background those not asked yet) and a direct send to each beats the fan-out."""
        if self.net is None or not targets:
            return False
        if not any_engine and len(targets) > NET_MAX_TARGETS:
            return False
        if self.known_local(targets) and self.enabled:  # (asks engines not asked yet)
            return False  # same host: a segment (or a loan of memory) is cheaper
        return all(self._net_readers.get(u) for u in targets)

    def pack_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        uuids: Sequence[str] | None,
        msg_id: str | None = None,
        engines: Sequence[str] | None = None,
    ) -> tuple[list[Any], _shm.Segment | _peer.Loan | None]:
        """Serialize ``f(*args, **kwargs)`` for ``uuids`` (``None``: any registered engine);
        ``msg_id`` is the request's (needed to lend arguments); ``engines`` the registered
        engines to decide for when ``uuids`` is None (default: those registered now).

        Returns
        -------
        tuple
            ``(buffers, held)``: ``held`` is ``None`` on the socket path; otherwise (a segment,
            or a loan of this process's memory) the caller sends ``buffers`` and then calls
            :meth:`hold` (or :meth:`drop` if the send failed).
        """
        plain = pack_plain_call(f, args, kwargs)
        if plain is not None:  # nothing large to lend or map
            return plain, None
        waits = msg_id is not None and getattr(self._calls, "waits", False)
        if uuids is not None:
            targets = list(uuids)
        else:
            targets = list(self._client._uuids if engines is None else engines)
        if waits and self.peer_read:
            lender = _peer.LoanWriter(self.threshold, msg_id, self.peer_host)
            bufs = self._pack_lending(lender, f, args, kwargs)
            if not lender:
                return bufs, None
            if self.all_local(targets) and all(self._readers.get(u) for u in targets):
                return bufs, self._keep(lender.loan)
        if waits and self.net is not None and self._net_ready(targets, uuids is None):
            netwriter = _net.NetLoanWriter(self.threshold, msg_id, self.net.server)
            bufs = self._pack_lending(netwriter, f, args, kwargs)
            return bufs, (self._keep(netwriter.loan) if netwriter else None)
        if not self.enabled:
            return _socket_path(f, args, kwargs), None
        writer = _shm.SegmentWriter(self.threshold, self.host)
        bufs = pack_apply_message(f, args, kwargs, shm=writer)
        if not getattr(self._calls, "waits", False) and self.all_local(targets):
            bufs = _snapshot(bufs)
        if not writer:
            check_buffer_count(bufs, "request")
            return bufs, None
        if not self.all_local(targets):
            return _socket_path(f, args, kwargs), None
        check_buffer_count(bufs, "request")
        try:
            seg = writer.commit()
        except OSError as e:
            log.warning(
                "shared memory unavailable (%s); sending %d bytes over the socket",
                e,
                writer.nbytes,
            )
            return _socket_path(f, args, kwargs), None
        return bufs, self._keep(seg)

    @staticmethod
    def _pack_lending(
        writer: _peer.LoanWriter | _net.NetLoanWriter,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> list[Any]:
        """Pack the call, lending its large buffers through ``writer``; on failure nothing
        stays lent."""
        try:
            bufs = pack_apply_message(f, args, kwargs, shm=writer)
            check_buffer_count(bufs, "request")
        except BaseException:
            writer.loan.release()  # (lent as the pickler went)
            raise
        return bufs

    def _keep(self, held: _HeldT) -> _HeldT:
        """Count ``held`` (a segment or a loan) as live until :meth:`drop` (see
        :meth:`hold`)."""
        with self._lock:
            self._live.add(held)
        return held

    def hold(self, seg: _shm.Segment | _peer.Loan, futures: Sequence[Future]) -> None:
        """Release ``seg`` (a segment or a loan) once every future is done (every target
        replied or failed)."""
        left = [len(futures)]
        lock = threading.Lock()

        def done(_fut: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.drop(seg)

        if not futures:
            self.drop(seg)
        for fut in futures:
            fut.add_done_callback(done)

    def drop(self, seg: _shm.Segment | _peer.Loan) -> None:
        """Release ``seg`` now."""
        seg.release()
        with self._lock:
            self._live.discard(seg)
            self._released.notify_all()

    def wait_released(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no segment is held; True if none is."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            while self._live:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._released.wait(left)
            return True

    def live_segments(self) -> list[str]:
        """Names of the segments this client still owns."""
        with self._lock:
            return sorted(s.name for s in self._live if isinstance(s, _shm.Segment))

    def live_loans(self) -> list[_peer.Loan]:
        """The loans of this process's memory still outstanding."""
        with self._lock:
            return [s for s in self._live if isinstance(s, _peer.Loan)]

    def close(self) -> None:
        """Let go of every segment and loan. Segments of requests still queued on engines
        are detached (:meth:`~ferroparallel.serialize.shm.Segment.detach`), not unlinked: the
        engines still run what was sent, as with ipyparallel, and a later sweep removes them.
        Outstanding loans are kept until the process exits: an engine may still read them,
        and memory released here could be reused by something else."""
        with self._lock:
            live, self._live = self._live, set()
        for checking in self._net_checks:  # (a thread must not outlive the interpreter)
            if checking is not threading.current_thread():  # (close() may run on it)
                checking.join(timeout=_net.PROBE_TIMEOUT + 1)
        detached = []
        for seg in live:
            if isinstance(seg, _net.NetLoan):
                seg.release()  # the data server stops with the client
            elif isinstance(seg, _peer.Loan):
                _peer.orphan(seg)
            else:
                seg.detach()  # (its requests have not all been answered)
                detached.append(seg)
        if detached:
            # unlinked by this process after the grace if it lives that long (a sweep
            # cannot: its creator is alive), else by the sweep of a later process
            timer = threading.Timer(_shm.detach_grace(), lambda: [s.release() for s in detached])
            timer.daemon = True
            timer.start()

    # ----- locality -----------------------------------------------------------------------

    def all_local(self, uuids: Sequence[str]) -> bool:
        """Whether every engine in ``uuids`` shares this host's ``/dev/shm`` (asks the
        engines not asked yet and waits for them; an engine that does not answer in time
        counts as remote)."""
        if not uuids:
            return False
        if all(map(self._local.get, uuids)):  # (the usual case, at C speed)
            return True
        if any(u not in self._local for u in uuids):
            if threading.current_thread() is getattr(self._client, "_dispatcher", None):
                return False  # replies are handled by this very thread: cannot wait for them
            # Ask every engine not asked yet at once: later requests to them need no round trip.
            self._start_probe(list(dict.fromkeys([*uuids, *self._client._uuids])))
            # (a controller that died meanwhile fails the probes within the client's timeout)
            deadline = time.monotonic() + PROBE_TIMEOUT
            for u in uuids:
                asked = self._probes.get(u)
                if asked is None or u in self._local:
                    continue
                fut, secret = asked
                try:
                    fut.result(timeout=max(deadline - time.monotonic(), 0.0))
                except Exception as e:  # noqa: BLE001 - any failure: "not known to be local"
                    log.info("engine %s did not tell its host (%s): socket path", u, e)
                    self._record(u, {}, b"")
                    continue
                if u not in self._local:  # answered; its callback may not have run yet
                    self._answered(u, fut, secret)
        return all(self._local.get(u, False) for u in uuids)

    def probing(self) -> bool:
        """Whether an engine was asked for its host and has not answered yet."""
        return bool(self._unanswered)

    def known_local(self, uuids: Sequence[str]) -> bool:
        """Like :meth:`all_local` but never waits: engines not asked yet are asked in the
        background and count as remote until they answer."""
        if not uuids:
            return False
        if any(u not in self._local for u in uuids):
            self._start_probe(list(dict.fromkeys([*uuids, *self._client._uuids])))
        return all(self._local.get(u, False) for u in uuids)

    def _start_probe(self, uuids: Sequence[str]) -> None:
        """Send a ``kernel_info_request`` (with the peer-memory probe) to each engine in
        ``uuids`` not asked yet; answers are recorded as they arrive."""
        client = self._client
        with self._lock:
            ask = [u for u in uuids if u not in self._probes and u not in self._local]
            if not ask:
                return
            secret, probe = _peer.make_probe()
            content: dict[str, Any] = {"ferroparallel": {"peer_probe": probe}}
            if self.net is not None:
                content["ferroparallel"]["net_probe"] = self.net.probe().request
            futs = {}
            for u in ask:
                futs[u] = client._send(
                    "control",
                    "kernel_info_request",
                    content,
                    ident=u.encode(),
                    engine_uuid=u,
                    record=False,
                )
                self._probes[u] = (futs[u], secret)
                self._unanswered.add(u)
        client._own([f.msg_id for f in futs.values()])
        for u, fut in futs.items():
            fut.add_done_callback(lambda f, u=u: self._answered(u, f, secret))

    def _answered(self, uuid: str, fut: Future, secret: bytes) -> None:
        self._unanswered.discard(uuid)
        try:
            reply = fut.result(timeout=0)
        except Exception as e:  # noqa: BLE001 - any failure means "not known to be local"
            log.info("engine %s did not tell its host (%s): socket path", uuid, e)
            reply = {}
        info = reply.get("ferroparallel") if isinstance(reply, dict) else None
        self._record(uuid, info if isinstance(info, dict) else {}, secret)

    def _record(self, uuid: str, info: dict[str, Any], secret: bytes) -> None:
        """What an engine's ``kernel_info_reply`` (its ``ferroparallel`` part) tells us."""
        local = info.get("host") == self.host
        read = info.get("peer_probe")
        self._readers[uuid] = bool(secret) and read == secret.hex()
        self._lenders[uuid] = local and _peer.check_lend_probe(info.get("lend_probe"))
        if self.peer_read and local and not self._readers[uuid]:
            log.info("engine %s cannot read this process (%s): shared memory", uuid, read)
        if self.net is not None and "net_lend_probe" in info:
            # (whether the engine can fetch from us, it tells by fetching: _engine_fetched)
            checking = threading.Thread(
                target=self._check_net_lender,
                args=(uuid, info.get("net_lend_probe")),
                name="ferroparallel-net-probe",
                daemon=True,
            )
            self._net_checks.append(checking)
            checking.start()
        self._local[uuid] = local  # last: readers of _local find the rest recorded

    def _check_net_lender(self, uuid: str, probe: Any) -> None:
        """Whether this client can fetch from engine ``uuid``'s data endpoint (a thread: an
        unreachable endpoint takes the probe's whole timeout)."""
        net = self.net
        try:
            ok = net is not None and _net.check_probe(net.fetcher, probe)
        except Exception as e:  # noqa: BLE001 - the client closed meanwhile: not reachable
            log.debug("direct data probe of engine %s failed: %s", uuid, e)
            ok = False
        if not ok:
            log.info(
                "cannot fetch from engine %s's data endpoint: results come through the controller",
                uuid,
            )
        self._net_lenders[uuid] = ok


def _snapshot(bufs: list[Any]) -> list[Any]:
    """``bufs`` with copies of the frames that would be sent from the caller's memory (from
    ``ZERO_COPY_THRESHOLD`` up to the segment threshold: larger ones are in a segment, itself a
    snapshot). A call that does not wait returns before its frames have left, and its caller
    may change the arrays at once; on one host a copy of less than a segment costs less than
    the error the engine would answer when the bytes no longer match their digest."""
    limit = _core.ZERO_COPY_THRESHOLD
    return [
        b if type(b) is bytes or memoryview(b).nbytes < limit else memoryview(b).tobytes()
        for b in bufs
    ]


def _socket_path(
    f: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[Any]:
    bufs = pack_apply_message(f, args, kwargs)
    check_buffer_count(bufs, "request")
    return bufs
