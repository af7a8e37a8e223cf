"""Large apply results through shared memory, for clients on the engine's host.

A client that waits for the reply and can read this engine's memory asks for the result to
be lent instead (``LEND_RESULTS_KEY``, see ``docs/decisions/0007-reading-peer-memory.md``):
the reply carries descriptors of the result's own buffers, and the engine waits until the
client has copied them (:meth:`~ferroparallel.serialize.peer.LentResult.wait`) before it runs
anything else, so nothing can change them meanwhile.

A client that can map segments says so in each request (``SHM_HOST_KEY``: its host token).
When the token is this engine's, the result's buffers above the threshold are written into one
new segment and the reply names it (``SHM_SEGMENT_KEY``); the client maps the result and
unlinks the name. The engine keeps every segment it made for :data:`GRACE` seconds and unlinks
whatever is left then (a client that died before reading its reply), and at exit; a crashed
engine's segments are swept by the next process that starts on the host (see
:func:`ferroparallel.serialize.shm.sweep`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from ..serialize import netloan as _net
from ..serialize import peer as _peer
from ..serialize import shm as _shm
from ..wire_names import LEND_RESULTS_KEY, NET_LEND_RESULTS_KEY, SHM_HOST_KEY

log = logging.getLogger("ferroparallel.engine")

#: Seconds a result segment may wait for its client before the engine unlinks it.
GRACE = 300.0


class ResultSegments:
    """The engine's policy for result segments and the segments it still owns."""

    def __init__(self, net: _net.NetData | None = None) -> None:
        #: the direct data path (lends results to clients that fetch them over the network)
        self.net = net if net is not None and net.enabled else None
        self.enabled = _shm.enabled_by_env() and _shm.available()
        self.lending = _peer.enabled_by_env()
        self.threshold = _shm.threshold_from_env()
        self.host = _shm.host_token()
        self.peer_host = _peer.peer_token()
        self._owned: deque[tuple[float, _shm.Segment]] = deque()
        self._seals = _peer.Seals()

    def writer_for(
        self, request_metadata: dict[str, Any], request_id: str = ""
    ) -> _shm.SegmentWriter | _peer.LoanWriter | _net.NetLoanWriter | None:
        """Where the result's large buffers go: lent to a waiting client that can read this
        process (``LEND_RESULTS_KEY``), a segment for a client on this host, lent over the
        network to a waiting client that can fetch from this engine
        (``NET_LEND_RESULTS_KEY``), else None."""
        self.expire()
        lend = request_metadata.get(LEND_RESULTS_KEY)
        if (
            self.lending
            and request_id
            and isinstance(lend, list)
            and len(lend) == 3
            and lend[2] == self.peer_host
        ):
            return _peer.LoanWriter(self.threshold, request_id, self.peer_host)
        if self.enabled and request_metadata.get(SHM_HOST_KEY) == self.host:
            return _shm.SegmentWriter(self.threshold, self.host)
        if self.net is not None and request_id and request_metadata.get(NET_LEND_RESULTS_KEY):
            return _net.NetLoanWriter(self.threshold, request_id, self.net.server)
        return None

    def commit(
        self,
        writer: _shm.SegmentWriter | _peer.LoanWriter | _net.NetLoanWriter,
        request_metadata: dict[str, Any] | None = None,
    ) -> _shm.Segment | _peer.LentResult | _net.NetLentResult | None:
        """Write the segment, or arm the loan for the requester named in
        ``request_metadata`` (None when nothing went into the writer)."""
        if not len(writer):
            return None
        if isinstance(writer, _net.NetLoanWriter):
            return _net.NetLentResult(writer.loan)
        if isinstance(writer, _peer.LoanWriter):
            client = (request_metadata or {})[LEND_RESULTS_KEY]
            return _peer.LentResult(writer.loan, self._seals, client)
        seg = writer.commit()
        self._owned.append((time.monotonic(), seg))
        return seg

    def expire(self, now: float | None = None) -> None:
        """Unlink segments older than :data:`GRACE` (their client never released them)."""
        now = time.monotonic() if now is None else now
        while self._owned and now - self._owned[0][0] > GRACE:
            _, seg = self._owned.popleft()
            seg.release()

    def release_all(self) -> None:
        """Unlink every segment still owned (engine exit)."""
        while self._owned:
            self._owned.popleft()[1].release()
