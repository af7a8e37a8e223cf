"""Large apply results through shared memory, for clients on the engine's host.

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

from ..serialize import shm as _shm
from ..wire_names import SHM_HOST_KEY

log = logging.getLogger("ferroparallel.engine")

#: Seconds a result segment may wait for its client before the engine unlinks it.
GRACE = 300.0


class ResultSegments:
    """The engine's policy for result segments and the segments it still owns."""

    def __init__(self) -> None:
        self.enabled = _shm.enabled_by_env() and _shm.available()
        self.threshold = _shm.threshold_from_env()
        self.host = _shm.host_token()
        self._owned: deque[tuple[float, _shm.Segment]] = deque()

    def writer_for(self, request_metadata: dict[str, Any]) -> _shm.SegmentWriter | None:
        """A segment writer when the requesting client is on this host, else None."""
        self.expire()
        if not self.enabled or request_metadata.get(SHM_HOST_KEY) != self.host:
            return None
        return _shm.SegmentWriter(self.threshold, self.host)

    def commit(self, writer: _shm.SegmentWriter) -> _shm.Segment | None:
        """Write the segment (None when nothing went into it)."""
        if not len(writer):
            return None
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
