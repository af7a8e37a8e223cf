"""The client's bookkeeping of a request fanned out to several engines, done when first needed.

A DirectView call on N engines leaves the client as one message (the controller fans it out),
but the client keeps N results: one future, one :class:`~.metadata.Metadata` and one cache
entry per engine. Creating those at submission made the call's cost grow with N (about 9 µs
per engine). A :class:`FanoutGroup` instead records the request once; the per-engine msg_ids
go into ``history`` and ``outstanding`` at once (C-level list and set updates), and the
per-engine futures and metadata are made by :meth:`Client._materialize` when first needed:
when the first reply of the group arrives, when its AsyncResult is asked about its children,
or when the user reads ``client.metadata`` or anything that scans the client's caches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from traitlets import Instance

__all__ = ["FanoutGroup", "FlushingInstance"]


class FanoutGroup:
    """One request sent to several engines, before its per-engine futures exist.

    Parameters
    ----------
    header : dict
        The request's header (``msg_id`` is the base of the engines' msg_ids).
    uuids : sequence of str
        The engines reached, in target order (an engine may be named more than once).
    msg_ids : list of str
        The msg_id of each engine's copy, in the same order.
    label : str or None
        The request's label (goes into each Metadata).
    tracker : object or None
        The send tracker shared by all copies.
    """

    __slots__ = (
        "futures",
        "header",
        "label",
        "listeners",
        "lock",
        "made",
        "msg_ids",
        "owned",
        "tracker",
        "uuids",
    )

    def __init__(
        self,
        header: dict[str, Any],
        uuids: Sequence[str],
        msg_ids: list[str],
        label: str | None,
        tracker: Any,
    ) -> None:
        self.header = header
        self.uuids = uuids
        self.msg_ids = msg_ids
        self.label = label
        self.tracker = tracker
        #: the per-engine futures (in the order of ``pairs``), once made and in the client's
        #: caches; ``made``: once made (the listeners then have them)
        self.futures: list[Any] | None = None
        self.made: list[Any] | None = None
        #: an AsyncResult owns the msg_ids (see ``Client._own``): they join the client's
        #: ``_owned`` when the futures are made
        self.owned = False
        #: called with the futures when they are made, before the client publishes them; None
        #: once they are made. Guarded by ``lock`` (not the client's: the dispatcher holds that
        #: while it handles replies, and submitting must not wait for it)
        self.listeners: list[Callable[[list[Any]], None]] | None = []
        self.lock = threading.Lock()

    def listen(self, listener: Callable[[list[Any]], None]) -> None:
        """Call ``listener`` with the futures when they are made (now, if they are)."""
        with self.lock:
            listeners = self.listeners
            if listeners is not None:
                listeners.append(listener)
                return
            made = self.made
        listener(made)  # type: ignore[arg-type] # (outside the lock: callbacks may run)

    def hand_out(self, futures: list[Any]) -> None:
        """The futures are made: give them to the listeners (before the client publishes
        them, so that no reply can settle one before its listeners listen)."""
        with self.lock:
            listeners, self.listeners = self.listeners or [], None
            self.made = futures
        for listener in listeners:
            listener(futures)

    def __len__(self) -> int:
        return len(self.msg_ids)

    def __repr__(self) -> str:
        state = "pending" if self.futures is None else "made"
        return f"<FanoutGroup {self.header.get('msg_id')} to {len(self)} engines: {state}>"


class FlushingInstance(Instance):
    """An ``Instance`` trait whose reads first make the futures and metadata of every pending
    :class:`FanoutGroup` of its owner (``owner._flush_pending()``), so that what the user
    reads (``client.metadata``) lists every request sent."""

    def get(self, obj: Any, cls: Any = None) -> Any:
        if getattr(obj, "_pending_groups", None):
            obj._flush_pending()
        return super().get(obj, cls)
