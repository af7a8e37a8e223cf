"""Turning received replies and IOPub messages into results, metadata and resolved futures.

Runs on the client's dispatcher thread, one batch of messages at a time.
"""

from __future__ import annotations

import logging
import traceback
from concurrent.futures import InvalidStateError
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import error
from ..serialize import load_object, netloan, peer
from ..serialize.ipp_compat import deserialize_ipp_object, is_our_protocol
from ..serialize.shm import LenderGone, ShmError
from ..serialize.shm import release_name as release_segment
from ..wire_names import (
    BUFFERS_CHANGED_KEY,
    BUFFERS_CHANGED_MESSAGE,
    IPP_FORMAT_KEY,
    LENT_RESULT_KEY,
    NET_LENT_KEY,
    OUTPUT_COUNT_KEY,
    SHM_SEGMENT_KEY,
)
from .futures import settling_batch
from .metadata import NO_DEPENDENCIES, parse_date

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("ferroparallel.client")


class ExecuteReply:
    """The result of ``view.execute(...)`` on one engine.

    Shown as IPython shows a result (``Out[<engine>:<count>]: <text/plain>``) by IPython's
    display machinery (``display(reply)``, the last expression of a cell).

    Attributes
    ----------
    msg_id : str
    execution_count : int or None
    metadata : Metadata
        The message's metadata (``execute_result``, ``stdout``, …).
    """

    def __init__(self, msg_id: str, content: dict[str, Any], metadata: Any) -> None:
        self.msg_id = msg_id
        self._content = content
        self.metadata = metadata

    @property
    def execution_count(self) -> int | None:
        return self._content.get("execution_count")

    @property
    def execute_result(self) -> dict[str, Any] | None:
        return self.metadata.get("execute_result")

    @property
    def data(self) -> dict[str, Any]:
        """The result's mime bundle (``{}`` without a result)."""
        return (self.execute_result or {}).get("data") or {}

    @property
    def source(self) -> str | None:
        """Where the result came from (the ``source`` of its ``execute_result``), if any."""
        result = self.execute_result
        return result.get("source", "") if result else None

    def display(self) -> None:
        """Publish the result's mime bundle here, as IPython displays an output."""
        from IPython.display import publish_display_data

        publish_display_data(self.data, (self.execute_result or {}).get("metadata") or {})

    def _repr_mime_(self, mime: str) -> Any:
        if mime not in self.data:
            return None
        md = (self.execute_result or {}).get("metadata") or {}
        return (self.data[mime], md[mime]) if mime in md else self.data[mime]

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self.metadata[key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        text = self.data.get("text/plain", "")
        if len(text) > 32:
            text = text[:29] + "..."
        return f"<ExecuteReply[{self.execution_count}]: {text}>"

    def _plaintext(self) -> str:
        text = self.data.get("text/plain", "")
        if not text:
            return ""
        if "\n" in text and not text.startswith("\n"):
            text = "\n" + text  # a multi-line repr starts on its own line
        return f"Out[{self.metadata.get('engine_id')}:{self.execution_count}]: {text}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self._plaintext())

    def _repr_mimebundle_(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        data = dict(self.data)
        if "text/plain" in data:
            data["text/plain"] = self._plaintext()
        return data, (self.execute_result or {}).get("metadata") or {}


def _mime_repr(mime: str) -> Any:
    def _repr(self: ExecuteReply) -> Any:
        return self._repr_mime_(mime)

    return _repr


# IPython's rich display hooks, one per mime type of a result, as ipyparallel's ExecuteReply
for _name, _mime in (
    ("_repr_html_", "text/html"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_svg_", "image/svg+xml"),
):
    setattr(ExecuteReply, _name, _mime_repr(_mime))


def _append_stream(old: str, text: str) -> str:
    """Append stream text; a carriage return not followed by a newline rewrites the line."""
    out = old + text
    if "\r" not in text:
        return out
    lines = out.split("\n")
    for i, line in enumerate(lines):
        if "\r" in line:
            lines[i] = line.rsplit("\r", 1)[-1] if not line.endswith("\r") else line
    return "\n".join(lines)


#: What the dispatcher settles once it has released the client's lock: the future of a message,
#: its result (``NO_REPLY`` when only its output completed), its exception (or None), and
#: whether its output is complete.
Settle = tuple[Any, Any, "BaseException | None", bool]

#: The result slot of a settlement for output that completed before the reply arrived.
NO_REPLY = object()


#: Added to the error of an ipyparallel engine that could not unpickle our apply payload.
FOREIGN_ENGINE_HINT = (
    "this engine is an ipyparallel engine, which cannot read ferroparallel's apply requests: "
    "use execute(), or run ferroparallel engines"
)


def _foreign_engine_refusal(
    header: dict[str, Any], content: dict[str, Any], md_in: dict[str, Any]
) -> bool:
    """An ipyparallel engine's failure to unpickle an apply request (our payload starts with a
    12-byte header that is no pickle): an ``apply_reply`` error from an engine that does not
    count its outputs as ours do."""
    return (
        header.get("msg_type") == "apply_reply"
        and content.get("ename") == "UnpicklingError"
        and OUTPUT_COUNT_KEY not in md_in
        and bool(content.get("engine_info"))
    )


#: Key of a reply rebuilt from a hub task record (``get_result`` of a purged result), not
#: received from an engine.
FROM_RECORD = "fp_from_record"


def _lent_how(md: dict[str, Any]) -> tuple[str, str] | None:
    """How a reply's result was lent (words for an error, the Client option that stops it)."""
    if md.get(LENT_RESULT_KEY):
        return "from the engine's memory", "peer_read"
    if md.get(NET_LENT_KEY):
        return "over the network", "direct_data"
    return None


#: Key set on a reply whose lent result was fetched ahead (see :func:`_fetch_first`).
PREFETCHED = "fp_prefetched"


def _net_lent(lent: Any) -> tuple[str, str, int] | None:
    """A reply's ``NET_LENT_KEY`` value ``[endpoint, token, nbytes]``, checked."""
    if not (isinstance(lent, list) and len(lent) == 3):
        return None
    endpoint, token, nbytes = lent
    if not (isinstance(endpoint, str) and endpoint.startswith("tcp://")):
        return None
    if not isinstance(token, str) or type(nbytes) is not int or nbytes < 0:
        return None
    return endpoint, token, nbytes


def _fetch_first(client: Client, msg: dict[str, Any], sock: str, fut: Any) -> bool:
    """A reply whose result an engine lent over the network: fetch it on a thread of its own,
    then handle the reply again (True). The fetch must not hold up other replies, nor
    Ctrl-C in a waiting thread, and it gives up as soon as the request failed otherwise (its
    engine died: the client fails requests stranded on it)."""
    md_in = msg.get("metadata") or {}
    lent = _net_lent(md_in.get(NET_LENT_KEY))
    if lent is None or msg.get(PREFETCHED) or msg.get(FROM_RECORD):
        return False
    if md_in.get(BUFFERS_CHANGED_KEY) or (msg.get("header") or {}).get("msg_type") != (
        "apply_reply"
    ):
        return False
    if (msg.get("content") or {}).get("status", md_in.get("status")) != "ok":
        return False
    endpoint, token, nbytes = lent

    def fetch() -> None:
        fetcher = client._net.fetcher
        try:
            if not fetcher.prefetch(endpoint, token, nbytes, abandon=fut.done):
                return  # the request failed meanwhile
            if fut.done() or client._closed:
                fetcher.forget([(endpoint, token)])
                return
            msg[PREFETCHED] = True
            client._dispatch_batch([(sock, msg)])
            client._io.wake()  # threads waiting in wait_here look at their results again
        except Exception:  # noqa: BLE001 - the client closed under us
            log.debug("fetching a lent result failed", exc_info=True)

    try:
        client._net_fetches.submit(fetch)
    except RuntimeError:  # the client closed: the fetch would drop the result, as here
        pass
    return True


def _forget_prefetched(client: Client, msg: dict[str, Any]) -> None:
    """Drop what was fetched ahead for a reply that will not be unpacked."""
    lent = _net_lent((msg.get("metadata") or {}).get(NET_LENT_KEY))
    if lent is not None:
        client._net.fetcher.forget([lent[:2]])


def _release_net(lent: Any, client: Client) -> None:
    """Tell the engine that lent ``lent`` (a reply's ``[endpoint, token, nbytes]``) over the
    network that nobody will fetch it (from a thread: the caller may hold the client's lock,
    and the channel may be busy with a fetch)."""
    checked = _net_lent(lent)
    if checked is None:
        return
    endpoint, token, _ = checked

    def release() -> None:
        try:
            client._net.fetcher.release(endpoint, token)
        except Exception as e:  # noqa: BLE001 - the engine gives up waiting on its own
            log.debug("could not release a lent result: %s", e)

    try:
        client._net_fetches.submit(release)
    except RuntimeError:
        pass  # the client is closing (the engine gives up waiting on its own)


def _decode(buffers: list[Any], ipp_format: bool) -> Any:
    """``load_object(buffers)``, or ipyparallel's deserializer for frames in its
    format (``ipp_format``: what the message's metadata says, see ``IPP_FORMAT_KEY``); a
    pickle of our protocol that ipyparallel's cannot read is tried as ours (a hub record whose
    metadata was lost)."""
    if not ipp_format:
        return load_object(buffers)
    try:
        return deserialize_ipp_object(buffers)
    except ImportError:
        raise
    except Exception:
        if not is_our_protocol(buffers):
            raise
        return load_object(buffers)


def _ipp_format(md: dict[str, Any], ours: str) -> bool:
    """Whether a message with metadata ``md`` carries ipyparallel-serialized buffers: as its
    ``IPP_FORMAT_KEY`` says (a ferroparallel engine's), else when it lacks the key ``ours``
    that every such message of a ferroparallel engine has (an ipyparallel engine sent it)."""
    flag = md.get(IPP_FORMAT_KEY)
    if flag is not None:
        return bool(flag)
    return ours not in md


def _engine_died(e: BaseException, client: Client, uuid: Any) -> BaseException:
    """The EngineError (as the controller's: a RemoteError that is also an EngineError) of a
    result the engine lent and died before this client read it."""
    exc = error.unwrap_exception(
        {
            "status": "error",
            "ename": "EngineError",
            "evalue": f"the engine died before this client read its result ({e})",
            "traceback": [],
        }
    )
    _label_with_engine(exc, client, uuid, "apply_reply")
    return exc


def _label_with_engine(exc: Any, client: Client, uuid: Any, msg_type: str) -> None:
    """Give ``exc`` (the RemoteError of a controller's EngineError reply, or of a result the
    client could not unpickle) the ``engine_info`` of engine ``uuid``: users see which
    engine died, or sent it."""
    if not isinstance(uuid, str) or not hasattr(exc, "engine_info"):
        return
    exc.engine_info = {
        "engine_uuid": uuid,
        "engine_id": client._uuids.get(uuid, client._departed.get(uuid)),
        "method": msg_type.removesuffix("_reply"),
    }


def _undecodable(e: Exception, client: Client, uuid: Any) -> BaseException:
    """The RemoteError of a result this client cannot unpickle: raised here, in the client,
    but labelled with the engine that sent it."""
    exc = error.RemoteError(
        type(e).__name__,
        f"cannot deserialize the result on the client: {e}",
        "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip(),
    )
    _label_with_engine(exc, client, uuid, "apply_reply")
    return exc


#: Reply metadata keys that take :func:`handle_reply` off its fast path (lent, shared-memory
#: or damaged results), and message keys that do (refetched or rebuilt replies).
_SPECIAL_MD = frozenset((BUFFERS_CHANGED_KEY, LENT_RESULT_KEY, NET_LENT_KEY, SHM_SEGMENT_KEY))
_SPECIAL_MSG = frozenset((PREFETCHED, FROM_RECORD))

_now = datetime.now


def handle_reply(client: Client, msg: dict[str, Any], sock: str = "mux") -> Settle | None:
    """A reply on the mux, task or control channel (control requests have no output).

    Updates the client's caches (call with ``client._lock`` held) and returns what to settle
    with :func:`settle` after releasing the lock, or None for a reply to nothing we sent.
    """
    parent = msg.get("parent_header") or {}
    msg_id = parent.get("msg_id")
    fut = client._futures.get(msg_id)
    if fut is None and client._pending_groups:
        fut = client._future_of(msg_id)  # the first reply of a fanned-out request
    if fut is None or (msg.get(PREFETCHED) and fut.done()):
        log.debug("reply for unknown (or settled) message %s dropped", msg_id)
        lent = (msg.get("metadata") or {}).get(LENT_RESULT_KEY)
        if lent:
            peer.finish_pickup(lent)  # nobody will copy it: let the engine go on
        if msg.get(PREFETCHED):
            _forget_prefetched(client, msg)
        else:
            _release_net((msg.get("metadata") or {}).get(NET_LENT_KEY), client)
        return None
    header = msg["header"]
    content = msg.get("content") or {}
    md_in = msg.get("metadata") or {}
    # the common reply: none of the keys of lent, shared-memory, refetched or rebuilt results
    plain = _SPECIAL_MD.isdisjoint(md_in) and _SPECIAL_MSG.isdisjoint(msg)
    if not plain and _fetch_first(client, msg, sock, fut):
        return None  # handled again once its result is fetched
    md = client._trait_values["metadata"][msg_id]
    status = content["status"] if "status" in content else md_in.get("status")
    engine_uuid = md_in.get("engine")
    if not engine_uuid and msg.get("idents"):
        ident = msg["idents"][0]
        engine_uuid = ident.decode("utf-8", "replace") if isinstance(ident, bytes) else None
    # trusted keys only: dict.update skips Metadata's per-key checks
    values: dict[str, Any] = {
        "msg_id": msg_id,
        "submitted": md.get("submitted") or parse_date(parent.get("date")),
        "started": parse_date(md_in["started"] if "started" in md_in else md.get("started")),
        "completed": parse_date(header.get("date")),
        "received": _now(UTC),
        "status": status,
        "follow": md_in["follow"] if "follow" in md_in else NO_DEPENDENCIES,
        "after": md_in["after"] if "after" in md_in else NO_DEPENDENCIES,
    }
    if engine_uuid and engine_uuid in client._uuids:
        values["engine_uuid"] = engine_uuid
        values["engine_id"] = client._uuids[engine_uuid]
    if "label" in md_in:
        values["label"] = md_in["label"]
    if md_in.get("is_broadcast"):  # a BroadcastView's request (the engine echoes the flags)
        values["is_broadcast"] = True
        values["is_coalescing"] = bool(md_in.get("is_coalescing"))
    dict.update(md, values)
    result: Any = None
    exc: BaseException | None = None
    expect_output = sock != "control"
    if status == "ok" and plain and header.get("msg_type") == "apply_reply":
        # (the last "ok" branch below, without what only special replies need)
        try:
            result = load_object(msg.get("buffers") or [])
        except LenderGone as e:
            exc = _engine_died(e, client, engine_uuid)
        except Exception as e:  # noqa: BLE001 - a bad result must not kill the dispatcher
            exc = _undecodable(e, client, engine_uuid)
    elif status == "ok" and md_in.get(BUFFERS_CHANGED_KEY):
        # (the Rust core delivered it without the buffers that did not match their digest)
        exc = error.RemoteError(
            "BufferMismatch", f"the result of {msg_id} is lost: {BUFFERS_CHANGED_MESSAGE}"
        )
        log.warning("%s", exc.evalue)
        if md_in.get(SHM_SEGMENT_KEY):
            release_segment(md_in[SHM_SEGMENT_KEY])
        if md_in.get(LENT_RESULT_KEY):
            peer.finish_pickup(md_in[LENT_RESULT_KEY])  # nothing will be copied: go on
        if msg.get(PREFETCHED):
            _forget_prefetched(client, msg)
        else:
            _release_net(md_in.get(NET_LENT_KEY), client)
    elif status == "ok" and msg.get(FROM_RECORD) and (lent_how := _lent_how(md_in)):
        # the engine lent it to the client that waited for the reply and has gone on since:
        # its memory is not to be read (nor its seal written) again, nor fetched
        how, option = lent_how
        exc = error.RemoteError(
            "ShmError",
            f"the result of {msg_id} was lent {how} to the client that waited for it and is "
            "not kept by the hub: run the request again (or, to keep results fetchable from "
            f"the hub, Client({option}=False))",
        )
    elif status == "ok":
        if header.get("msg_type") == "apply_reply":
            lent = md_in.get(LENT_RESULT_KEY)
            try:
                if lent:
                    with peer.serving(msg_id):  # a lent result is read for this reply only
                        result = load_object(msg.get("buffers") or [])
                elif md_in.get(NET_LENT_KEY):  # fetched from the engine for this reply only
                    lent_net = _net_lent(md_in[NET_LENT_KEY])
                    keys = [lent_net[:2]] if lent_net else []
                    with peer.serving(msg_id), netloan.fetching(client._net.fetcher, keys):
                        result = load_object(msg.get("buffers") or [])
                elif msg.get(FROM_RECORD):  # (maybe another, ipyparallel, client's request)
                    ipp_format = _ipp_format(md_in, OUTPUT_COUNT_KEY)
                    result = _decode(msg.get("buffers") or [], ipp_format)
                else:  # (a descriptor of lent memory would be refused)
                    result = load_object(msg.get("buffers") or [])
            except LenderGone as e:  # the engine died before its lent result was read
                exc = _engine_died(e, client, engine_uuid)
            except Exception as e:  # noqa: BLE001 - a bad result must not kill the dispatcher
                if isinstance(e, ShmError) and msg.get(FROM_RECORD) and md_in.get(SHM_SEGMENT_KEY):
                    # a hub record of a result that came through shared memory: the client
                    # it went to released the segment once it had read it
                    exc = error.RemoteError(
                        "ShmError",
                        f"the result of {msg_id} came through shared memory to the client "
                        "that asked for it, which released the segment once it had read it; "
                        "the hub keeps only its descriptor: keep the AsyncResult (or the "
                        f"value) to use it again, or run the request again ({e}; "
                        "Client(shm=False) keeps results fetchable from the hub)",
                    )
                else:
                    exc = _undecodable(e, client, engine_uuid)
            finally:
                segment = md_in.get(SHM_SEGMENT_KEY)
                if segment:  # mapped (or failed): the name is no longer needed
                    release_segment(segment)
                # copied (or failed): the engine may go on; a copy it stopped waiting for
                # (it may have changed meanwhile) is refused
                if lent and not peer.finish_pickup(lent) and exc is None:
                    result = None
                    exc = error.RemoteError(
                        "ShmError",
                        "the engine stopped waiting for this client to copy its result: "
                        "run the request again",
                    )
        elif header.get("msg_type") == "execute_reply":
            result = ExecuteReply(msg_id, content, md)
        else:
            result = content
    elif status == "aborted":
        exc = error.TaskAborted(msg_id)  # as ipyparallel: the message is the msg_id
        expect_output = False
    else:
        if _foreign_engine_refusal(header, content, md_in):
            content = {**content, "evalue": f"{content.get('evalue')} ({FOREIGN_ENGINE_HINT})"}
        exc = error.unwrap_exception(content)
        if not content.get("engine_info") or content.get("ename") == "EngineError":
            expect_output = False
        if content.get("ename") == "EngineError" and not content.get("engine_info"):
            # the controller's news of a dead engine: a wrapped exception, as ipyparallel's
            # (no engine_info, which tells stock clients to expect no output), that names the
            # engine in its metadata
            _label_with_engine(exc, client, engine_uuid, header.get("msg_type", ""))
    client._trait_values["results"][msg_id] = exc if exc is not None else result
    client._trait_values["outstanding"].discard(msg_id)
    if engine_uuid:
        pending = client._outstanding_by_engine.get(engine_uuid)
        if pending is not None:
            pending.discard(msg_id)
    output_done = not expect_output
    expected = md_in.get(OUTPUT_COUNT_KEY)
    if expect_output and type(expected) is int:
        # a ferroparallel engine says how many outputs it sent: no need to wait for "idle"
        fut.outputs_expected = expected
        output_done = fut.outputs_seen >= expected
    return fut, result, exc, output_done


def settle(client: Client, done: list[Settle]) -> None:
    """Resolve the futures of handled messages (without the client's lock: their callbacks,
    and the callbacks of the AsyncResults over them, run here), then let the client's caches
    drop what an AsyncResult owns."""
    with settling_batch():  # waiters wake once, when the whole batch is settled
        for fut, result, exc, output_done in done:
            try:
                if result is not NO_REPLY and not fut.done():
                    if exc is not None:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
                if output_done and not fut.output_done():
                    fut.finish_output()
            except InvalidStateError:  # settled meanwhile by another thread (e.g. a failure)
                pass
    owned = client._owned
    if not owned:  # (read without the lock: see Client._own)
        return
    with client._lock:
        release = client._maybe_release
        for item in done:
            msg_id = item[0].msg_id
            if msg_id in owned:  # (what _maybe_release checks first)
                release(msg_id)


def handle_iopub(client: Client, msg: dict[str, Any]) -> Settle | None:
    """An IOPub message: output of one of our requests (call with ``client._lock`` held).

    Returns a settlement for :func:`settle` when the message completes its request's output.
    """
    parent = msg.get("parent_header") or {}
    if parent.get("session") != client._session_id:
        return None
    msg_id = parent.get("msg_id")
    fut = client._futures.get(msg_id)
    if fut is None and client._pending_groups:
        fut = client._future_of(msg_id)  # output before any reply of a fanned-out request
    if fut is None:
        return None
    md = client._trait_values["metadata"][msg_id]
    content = msg.get("content") or {}
    msg_type = msg.get("msg_type")
    if msg_type == "status":
        if content.get("execution_state") == "idle":
            return _output_complete(fut)
        return None
    engine_uuid = (msg.get("metadata") or {}).get("engine")
    if engine_uuid and md.get("engine_uuid") is None:
        md["engine_uuid"] = engine_uuid
        md["engine_id"] = client._uuids.get(engine_uuid)
    if msg_type == "stream":
        name = content.get("name", "stdout")
        if name in ("stdout", "stderr"):
            md[name] = _append_stream(md.get(name) or "", content.get("text", ""))
    elif msg_type == "execute_input":
        md["execute_input"] = content.get("code")
    elif msg_type == "execute_result":
        md["execute_result"] = content
    elif msg_type == "display_data":
        md["outputs"].append(content)
    elif msg_type == "error":
        if "engine_info" not in content:  # as ipyparallel: say which engine, for the traceback
            method = (parent.get("msg_type") or "execute_request").partition("_")[0]
            info = {"engine_id": md.get("engine_id"), "engine_uuid": md.get("engine_uuid")}
            content = {**content, "engine_info": {**info, "method": method}}
        md["error"] = error.unwrap_exception(content)
    elif msg_type == "data_message":
        try:
            # (our engines always say which format their data is in)
            ipp_format = _ipp_format(msg.get("metadata") or {}, IPP_FORMAT_KEY)
            data = _decode(msg.get("buffers") or [], ipp_format)
            if isinstance(data, dict):
                md["data"].update(data)
        except Exception:  # noqa: BLE001
            log.warning("undecodable data_message for %s", msg_id)
    fut.outputs_seen += 1
    expected = fut.outputs_expected
    if expected is not None and fut.outputs_seen >= expected:
        return _output_complete(fut)
    return None


def _output_complete(fut: Any) -> Settle | None:
    if fut.output_done():
        return None
    # the reply may still be on its way: settle only the output (the reply settles the rest)
    return fut, NO_REPLY, None, True
