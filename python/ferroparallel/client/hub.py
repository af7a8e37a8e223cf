"""Client side of the hub's task records: queries, results fetched from the hub, resubmission
and purging (reference §5.1, §9, §11.1).

The :class:`~ferroparallel.client.Client` methods ``db_query``, ``hub_history``,
``result_status``, ``get_result`` (for msg_ids this client does not hold), ``resubmit`` and
``purge_hub_results`` are thin wrappers around the functions here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from .. import error
from . import dispatch
from .futures import MessageFuture

if TYPE_CHECKING:
    from .asyncresult import AsyncHubResult
    from .client import Client

__all__ = [
    "DATE_FIELDS",
    "HubResults",
    "db_query",
    "hub_history",
    "hub_query",
    "parse_date",
    "purge_hub",
    "result_status",
    "resubmit",
    "to_wire",
]

log = logging.getLogger("ferroparallel.client")

#: Task record fields that hold timestamps (tz-aware UTC datetimes on the client side).
DATE_FIELDS = ("submitted", "started", "completed", "received")
#: First and longest interval between ``result_request`` polls for pending hub results.
POLL_MIN = 0.01
POLL_MAX = 0.25


def parse_date(value: Any) -> Any:
    """An ISO-8601 string as a tz-aware datetime (naive times are UTC); others unchanged."""
    if not isinstance(value, str):
        return value
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        return value
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


def _iso(d: datetime | date) -> str:
    if isinstance(d, datetime):
        if d.tzinfo is None:
            d = d.replace(tzinfo=UTC)
        return d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return d.isoformat()


def to_wire(obj: Any) -> Any:
    """A query with datetimes/dates replaced by ISO strings (naive datetimes taken as UTC),
    tuples and sets by lists."""
    if isinstance(obj, (datetime, date)):
        return _iso(obj)
    if isinstance(obj, Mapping):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_wire(v) for v in obj]
    return obj


def hub_query(
    client: Client, msg_type: str, content: dict[str, Any], timeout: float | None = None
) -> dict[str, Any]:
    """Send a hub query and return the whole reply message (content and buffers).

    Raises
    ------
    RemoteError
        The hub answered with an error (``ename`` says which: KeyError, TypeError, ...).
    TimeoutError
        No reply within ``timeout`` (default: the client's timeout).
    """
    client._check_open()
    header = client.session.msg_header(msg_type)
    fut: Future = Future()
    client._query_futures[header["msg_id"]] = fut
    client._io.send("query", msg_type, content, header=header)
    wait = client.timeout if timeout is None else timeout
    try:
        reply = fut.result(timeout=wait)
    except TimeoutError:
        client._query_futures.pop(header["msg_id"], None)
        raise TimeoutError(
            f"Hub {msg_type} timed out: no reply from the controller at "
            f"{client._controller_url} within {wait:g} s"
        ) from None
    rcontent = reply.get("content") or {}
    if rcontent.get("status") == "error":
        raise error.unwrap_exception(rcontent)
    return reply


def _split(buffers: list[Any], lens: int | list[int] | None, at: int) -> tuple[list[Any], int]:
    """The ``lens`` buffers of one record from ``at``: a count, as ipyparallel's hub (and ours)
    sends, or a list with one entry per buffer (older ferroparallel controllers)."""
    if lens is None:
        n = 0
    elif isinstance(lens, int):
        n = lens
    else:
        n = len(lens)
    return buffers[at : at + n], at + n


def db_query(client: Client, query: Mapping[str, Any], keys: Sequence[str] | None = None):
    """Records matching a mongo-style ``query``; see :meth:`Client.db_query`."""
    if not isinstance(query, Mapping):
        raise TypeError(f"query must be a dict, not {type(query).__name__}")
    if isinstance(keys, str):
        keys = [keys]
    if keys is not None and (
        not isinstance(keys, (list, tuple, set)) or not all(isinstance(k, str) for k in keys)
    ):
        raise TypeError(f"keys must be a list of record field names (str), not {keys!r}")
    # (no keys, or an empty list: whole records, as ipyparallel's hub reads it)
    content = {"query": to_wire(query), "keys": list(keys) if keys else None}
    reply = hub_query(client, "db_request", content)
    rc = reply["content"]
    records: list[dict[str, Any]] = rc.get("records") or []
    # memoryviews, as ipyparallel's records (``.tobytes()``, ``.nbytes``)
    buffers = [memoryview(b) for b in reply.get("buffers") or []]
    blens = rc.get("buffer_lens")
    rblens = rc.get("result_buffer_lens")
    at = 0
    for i, rec in enumerate(records):
        for f in DATE_FIELDS:
            if f in rec:
                rec[f] = parse_date(rec[f])
        for f in ("header", "result_header"):  # their dates too, as ipyparallel's records
            h = rec.get(f)
            if isinstance(h, dict) and isinstance(h.get("date"), str):
                h["date"] = parse_date(h["date"])
        if blens is not None:
            rec["buffers"], at = _split(buffers, blens[i], at)
        if rblens is not None:
            rec["result_buffers"], at = _split(buffers, rblens[i], at)
    return records


def hub_history(client: Client) -> list[str]:
    """Every msg_id in the hub's records, oldest submission first."""
    return list(hub_query(client, "history_request", {})["content"].get("history") or [])


class HubResults:
    """Futures for msg_ids whose results come from the hub's records (tasks of other clients,
    resubmitted tasks), resolved by a polling thread.

    Parameters
    ----------
    client : Client
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: dict[str, MessageFuture] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def future(self, msg_id: str) -> MessageFuture:
        """The future of ``msg_id`` (created, and polled for, if this client has none)."""
        client = self._client
        with client._lock:
            fut = client._future_of(msg_id)
            if fut is None:
                fut = MessageFuture(msg_id, {"msg_id": msg_id})
                client._futures[msg_id] = fut
                with self._lock:
                    self._pending[msg_id] = fut
        self._start()
        return fut

    def resolve(self, msg_id: str, entry: Mapping[str, Any], buffers: list[Any]) -> None:
        """Resolve ``msg_id``'s future from a completed ``result_reply`` entry."""
        client = self._client
        with client._lock:
            fut = client._future_of(msg_id)
            if fut is None:
                fut = MessageFuture(msg_id, {"msg_id": msg_id})
                client._futures[msg_id] = fut
            with self._lock:
                self._pending.pop(msg_id, None)
            if fut.done():
                return
            item = self._apply_entry(msg_id, entry, buffers)
        if item is not None:
            fut, result, exc, _ = item
            dispatch.settle(client, [(fut, result, exc, True)])

    def _apply_entry(
        self, msg_id: str, entry: Mapping[str, Any], buffers: list[Any]
    ) -> dispatch.Settle | None:
        """Fill the client's caches from a task record (``client._lock`` held)."""
        client = self._client
        parent = dict(entry.get("header") or {"msg_id": msg_id})
        parent["msg_id"] = msg_id
        msg = {
            "parent_header": parent,
            "header": entry.get("result_header") or {},
            "content": entry.get("result_content") or {},
            "metadata": entry.get("result_metadata") or {},
            "buffers": buffers,
            "idents": [],
            dispatch.FROM_RECORD: True,
        }
        item = dispatch.handle_reply(client, msg)
        md = client.metadata[msg_id]
        io = entry.get("io") or {}
        for key in ("stdout", "stderr"):
            if io.get(key):
                md[key] = io[key]
        if io.get("execute_input") is not None:
            md["execute_input"] = io["execute_input"]
        if io.get("execute_result") is not None:
            md["execute_result"] = io["execute_result"]
        if io.get("error") is not None:
            md["error"] = error.unwrap_exception(io["error"])
        for key in DATE_FIELDS:
            if entry.get(key) is not None:
                md[key] = parse_date(entry[key])
        if entry.get("engine_uuid"):
            md["engine_uuid"] = entry["engine_uuid"]
            md["engine_id"] = client._uuids.get(entry["engine_uuid"])
        return item

    def fail(self, exc: BaseException) -> None:
        """Fail every pending hub future (the hub cannot answer for them)."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
            if not fut.output_done():
                fut.finish_output()

    def _start(self) -> None:
        self._wake.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._poll_loop, name="ferroparallel-hub-results", daemon=True
                )
                self._thread.start()

    def _poll_loop(self) -> None:
        try:
            self._poll()
        finally:  # however it ends, _start may begin another
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _poll(self) -> None:
        interval = POLL_MIN
        while not self._client._closed:
            with self._lock:
                ids = list(self._pending)
            if not ids:
                self._wake.wait(1.0)
                self._wake.clear()
                with self._lock:
                    if not self._pending:
                        # idle: the thread ends (and holds the client no more); _start
                        # begins another when results are wanted again
                        self._thread = None
                        return
                interval = POLL_MIN
                continue
            try:
                done = _fetch(self._client, ids, self)
            except error.IoClosedError as e:
                self.fail(e)
                return
            except (error.RemoteError, TimeoutError) as e:
                self.fail(e)
                continue
            except Exception:  # noqa: BLE001 - keep polling; log the surprise
                log.exception("polling the hub for results failed")
                done = 0
            interval = POLL_MIN if done else min(POLL_MAX, interval * 2)
            time.sleep(interval)


def _fetch(client: Client, msg_ids: list[str], hub: HubResults) -> int:
    """One ``result_request`` for ``msg_ids``; resolves the completed ones. Returns how many."""
    reply = hub_query(client, "result_request", {"msg_ids": msg_ids, "status_only": False})
    content = reply["content"]
    buffers = list(reply.get("buffers") or [])
    at = 0
    completed = content.get("completed") or []
    for msg_id in sorted(completed):
        entry = content.get(msg_id) or {}
        n = int(entry.get("nbuffers") or 0)
        hub.resolve(msg_id, entry, buffers[at : at + n])
        at += n
    return len(completed)


def fetch_finished(client: Client, msg_ids: list[str]) -> int:
    """Ask the hub once for ``msg_ids``: the finished ones are resolved now (their futures
    created if need be), the others are left to the polling thread. Returns how many finished.

    Raises
    ------
    RemoteError
        The hub's error, e.g. a KeyError naming a msg_id it has no record of.
    """
    return _fetch(client, msg_ids, hub_results(client))


def hub_results(client: Client) -> HubResults:
    """The client's :class:`HubResults` (created on first use)."""
    with client._lock:
        hub = getattr(client, "_hub_results", None)
        if hub is None:
            hub = HubResults(client)
            client._hub_results = hub
        return hub


def result_status(
    client: Client, msg_ids: Iterable[str], status_only: bool = True
) -> dict[str, Any]:
    """``{"status": "ok", "pending": [...], "completed": [...]}`` from the hub; with
    ``status_only=False`` the
    completed results are also fetched into ``client.results`` / ``client.metadata`` (and
    under their msg_ids in the returned dict).

    Raises
    ------
    CompositeError
        When ``status_only`` is False and some fetched results are errors.
    """
    ids = list(msg_ids)
    # as ipyparallel: what this client sent itself it knows without asking the hub (which
    # also answers with a controller that keeps no records)
    client._flush_pending()
    futures = client._futures
    local = {m: f for m in ids if (f := futures.get(m)) is not None}
    finished: list[str] = []  # sent by this client, finished, result no longer cached here
    if status_only and len(local) < len(ids):
        sent, outstanding = client._sent_ids(), client._trait_values["outstanding"]
        finished = [m for m in ids if m not in local and m in sent and m not in outstanding]
    asked = [m for m in ids if m not in local and m not in finished]
    content: dict[str, Any] = {}
    reply: dict[str, Any] = {}
    if asked:
        reply = hub_query(client, "result_request", {"msg_ids": asked, "status_only": status_only})
        content = reply["content"]
    mine_done = [m for m, f in local.items() if f.done()]
    out: dict[str, Any] = {
        "status": content.get("status", "ok"),
        "pending": [m for m, f in local.items() if not f.done()]
        + list(content.get("pending") or []),
        "completed": mine_done + finished + list(content.get("completed") or []),
    }
    if status_only:
        return out
    mine = {m: (local[m].exception() or local[m].result()) for m in mine_done}
    hub = hub_results(client)
    buffers = list(reply.get("buffers") or [])
    at = 0
    for msg_id in sorted(content.get("completed") or []):
        entry = content.get(msg_id) or {}
        n = int(entry.get("nbuffers") or 0)
        hub.resolve(msg_id, entry, buffers[at : at + n])
        at += n
    results = {m: mine[m] if m in mine else client.results.get(m) for m in out["completed"]}
    out.update(results)
    error.collect_exceptions(results, "result_status")
    return out


def async_hub_result(
    client: Client,
    msg_ids: list[str],
    fname: str,
    owner: bool = False,
    single: bool | None = None,
) -> AsyncHubResult:
    """An AsyncHubResult over ``msg_ids`` (local futures where the client has them)."""
    from .asyncresult import AsyncHubResult

    hub = hub_results(client)
    futs = [hub.future(m) for m in msg_ids]
    return AsyncHubResult(client, futs, fname=fname, owner=owner, single_result=single)


def failed_hub_result(
    client: Client,
    msg_ids: list[str],
    exc: BaseException,
    fname: str,
    owner: bool = False,
    single: bool | None = None,
) -> AsyncHubResult:
    """An AsyncHubResult over ``msg_ids`` that the hub refused to look up: the client's own
    futures where it has them, futures failed with ``exc`` for the others."""
    from .asyncresult import AsyncHubResult

    futs = []
    for msg_id in msg_ids:
        fut = client._future_of(msg_id)
        if fut is None:
            fut = MessageFuture(msg_id, {"msg_id": msg_id})
            fut.set_exception(exc)
            fut.finish_output()
        futs.append(fut)
    return AsyncHubResult(client, futs, fname=fname, owner=owner, single_result=single)


def resubmit(client: Client, msg_ids: list[str]) -> tuple[dict[str, str], AsyncHubResult]:
    """Resubmit finished tasks; returns ``{old: new}`` and an AsyncHubResult on the new ids."""
    content = hub_query(client, "resubmit_request", {"msg_ids": msg_ids})["content"]
    mapping: dict[str, str] = dict(content.get("resubmitted") or {})
    new_ids = [mapping[m] for m in msg_ids if m in mapping]
    # as ipyparallel: a list of results, even for one task
    return mapping, async_hub_result(client, new_ids, "resubmit", single=False)


def purge_hub(client: Client, msg_ids: list[str] | str, engines: list[Any]) -> None:
    """Drop finished records from the hub (``msg_ids='all'`` drops every finished one)."""
    hub_query(client, "purge_request", {"msg_ids": msg_ids, "engine_ids": engines})
