"""The client's choice between shared memory and the socket path for request arguments.

See ``docs/decisions/0003-shared-memory.md``. For every ``apply_request`` (push, scatter and
apply all are one) the arguments are serialized with a :class:`~ferroparallel.serialize.shm.
SegmentWriter`. If no buffer reached the shared-memory threshold nothing else happens. If some
did and every target engine runs on this host, the segment is written (once, whatever the
number of engines) and the message carries descriptors; the segment is released when every
reply has arrived. Otherwise the arguments are serialized again for the socket path.

Whether an engine is local is asked once per engine with a ``kernel_info_request`` on the
control channel (answered even while the engine is busy): its reply carries the engine's host
token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..serialize import shm as _shm
from ..serialize.apply import check_buffer_count, pack_apply_message

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("ferroparallel.client")

#: Seconds to wait for engines to say which host they are on (then: the socket path).
PROBE_TIMEOUT = 5.0


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
    """

    def __init__(
        self, client: Client, enabled: bool | None = None, threshold: int | None = None
    ) -> None:
        self._client = client
        self.enabled = (_shm.enabled_by_env() if enabled is None else bool(enabled)) and (
            _shm.available()
        )
        self.threshold = _shm.threshold_from_env() if threshold is None else int(threshold)
        if self.threshold < 0:
            raise ValueError(f"shm_threshold must be >= 0, not {self.threshold}")
        self.host = _shm.host_token()
        self._local: dict[str, bool] = {}
        self._live: set[_shm.Segment] = set()
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        if self.enabled:
            removed = _shm.sweep()
            if removed:
                log.info("removed %d shared-memory segments of dead processes", len(removed))

    # ----- packing ------------------------------------------------------------------------

    def pack_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        uuids: Sequence[str] | None,
    ) -> tuple[list[Any], _shm.Segment | None]:
        """Serialize ``f(*args, **kwargs)`` for ``uuids`` (``None``: any registered engine).

        Returns
        -------
        tuple
            ``(buffers, segment)``: ``segment`` is ``None`` on the socket path; otherwise the
            caller sends ``buffers`` and then calls :meth:`hold` (or :meth:`drop` if the send
            failed).
        """
        if not self.enabled:
            return _socket_path(f, args, kwargs), None
        writer = _shm.SegmentWriter(self.threshold, self.host)
        bufs = pack_apply_message(f, args, kwargs, shm=writer)
        if not writer:
            check_buffer_count(bufs, "request")
            return bufs, None
        targets = list(self._client._uuids) if uuids is None else list(uuids)
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
        with self._lock:
            self._live.add(seg)
        return bufs, seg

    def hold(self, seg: _shm.Segment, futures: Sequence[Future]) -> None:
        """Release ``seg`` once every future is done (every target replied or failed)."""
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

    def drop(self, seg: _shm.Segment) -> None:
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
            return sorted(s.name for s in self._live)

    def close(self) -> None:
        """Release every segment (requests still queued on engines then fail to map them)."""
        with self._lock:
            live, self._live = self._live, set()
        for seg in live:
            seg.release()

    # ----- locality -----------------------------------------------------------------------

    def all_local(self, uuids: Sequence[str]) -> bool:
        """Whether every engine in ``uuids`` shares this host's ``/dev/shm`` (asks the
        engines not asked yet; an engine that does not answer in time counts as remote)."""
        if not uuids:
            return False
        if any(u not in self._local for u in uuids):
            if threading.current_thread() is getattr(self._client, "_dispatcher", None):
                return False  # replies are handled by this very thread: cannot wait for them
            # Ask every engine not asked yet at once: later requests to them need no round trip.
            known = self._local
            self._probe(
                [u for u in dict.fromkeys([*uuids, *self._client._uuids]) if u not in known]
            )
        return all(self._local.get(u, False) for u in uuids)

    def _probe(self, uuids: Sequence[str]) -> None:
        client = self._client
        futs = {}
        for u in uuids:
            futs[u] = client._send(
                "control", "kernel_info_request", {}, ident=u.encode(), engine_uuid=u
            )
        client._own([f.msg_id for f in futs.values()])
        deadline = time.monotonic() + PROBE_TIMEOUT
        for u, fut in futs.items():
            try:
                content = fut.result(timeout=max(deadline - time.monotonic(), 0.0))
                info = content.get("ferroparallel") if isinstance(content, dict) else None
                host = info.get("host") if isinstance(info, dict) else None
            except Exception as e:  # noqa: BLE001 - any failure means "not known to be local"
                log.info("engine %s did not tell its host (%s): socket path", u, e)
                host = None
            self._local[u] = host == self.host


def _socket_path(
    f: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[Any]:
    bufs = pack_apply_message(f, args, kwargs)
    check_buffer_count(bufs, "request")
    return bufs
