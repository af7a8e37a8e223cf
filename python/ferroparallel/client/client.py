"""The Client: a connection to a ferroparallel (or ipyparallel-protocol) controller.

All sockets live on the native I/O thread of ``ferroparallel._core``. A dispatcher thread takes
received messages from it in batches and resolves results, metadata and futures.
"""

from __future__ import annotations

import atexit
import collections
import logging
import operator
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, NoReturn

from traitlets import Any as AnyTrait
from traitlets import Bool, Bytes, Float, HasTraits, Instance, List, Set, Unicode

from .. import _core, error, paths
from .. import curve as _curve
from .. import ipc as _ipc
from .. import ssh as _ssh
from ..serialize.netloan import NetData
from ..serialize.reference import Reference
from ..signal_names import parse_signal
from ..wire_names import (
    DATAPUB_TOPIC,
    LEND_RESULTS_KEY,
    LENT_TO_KEY,
    NET_LEND_RESULTS_KEY,
    NO_STATUS_KEY,
    OUTPUT_TOPIC_PREFIX,
    SHM_HOST_KEY,
)
from . import connection, dispatch, waiting
from .dispatch import ExecuteReply as ExecuteReply  # (ipyparallel.client.client's)
from .fanout import FanoutGroup, FlushingInstance
from .futures import _DONE_STATES, MessageFuture, SlimFuture
from .metadata import Metadata, parse_date
from .outputs import ipython_shell
from .shm_transport import ShmTransport
from .workers import Workers

log = logging.getLogger("ferroparallel.client")

_SOCKETS = (
    ("query", "DEALER", "registration"),
    ("mux", "DEALER", "mux"),
    ("task", "DEALER", "task"),
    ("control", "DEALER", "control"),
    ("notification", "SUB", "notification"),
    ("iopub", "SUB", "iopub"),
)
_PACKERS = {"msgpack", "json", "orjson", "msgpack.packb", "msgpack.unpackb", "json.dumps"}
#: Seconds without any traffic, while requests are outstanding, before probing the controller.
PROBE_IDLE = 5.0
#: Longest wait for the controller's welcome on a link (decision 0017).
LINK_TIMEOUT = 5.0


#: Clients not yet closed; closed at interpreter exit, before threads are torn down.
_OPEN_CLIENTS: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        try:
            client.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


#: Routing identity of a request the controller fans out to the engines in metadata.fanout.
FANOUT_IDENT = b"fp:fanout"
#: ``connection_reply`` key listing the controller's extensions of the protocol.
FEATURES_KEY = "fp_features"


def _dispatch_loop(ref: weakref.ref[Client], io: Any) -> None:
    """The dispatcher thread: receives replies and notifications and hands them to the client.

    It holds the client only while handling what it received, so a client dropped without
    ``close()`` is collected (its ``__del__`` closes it, which ends this thread); it ends
    itself when it finds the client gone.
    """
    while True:
        try:
            batch = io.recv(timeout=0.1, max_messages=waiting.BATCH)
        except error.IoClosedError:
            return
        except Exception:  # noqa: BLE001
            log.exception("dispatcher: receive failed")
            continue
        client = ref()
        if client is None:
            io.close()
            return
        if client._closed:
            return
        client._dispatch_round(batch)
        del client


def _check_applicable(f: Any) -> None:
    """Raise TypeError unless ``f`` can be applied: a callable, or a ``Reference`` to one on
    the engine (``view.apply(Reference("f"), ...)``, as ipyparallel allows)."""
    if not (callable(f) or isinstance(f, Reference)):
        raise TypeError(f"f must be callable, not {type(f).__name__}")


def _execute_content(code: str, silent: bool) -> dict[str, Any]:
    return {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }


def _engine_error(evalue: str) -> BaseException:
    """An EngineError raised like the controller's (a RemoteError that is also an EngineError)."""
    return error.unwrap_exception(
        {"status": "error", "ename": "EngineError", "evalue": evalue, "traceback": []}
    )


def _named(x: Any) -> bool:
    """Whether a ``jobs`` / ``targets`` argument names something (engine id 0 does)."""
    return isinstance(x, int) or bool(x)


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (str, bytes, int)) or hasattr(x, "msg_ids"):
        return [x]  # one job; an AsyncResult is not a list of jobs
    return list(x)


#: Traits the per-message path reads from ``_trait_values`` (no validation happens on read).
_CURVE_KWARGS = ("curve_serverkey", "curve_publickey", "curve_secretkey")


def _client_curve_options(info: dict[str, Any], given: dict[str, Any]) -> dict[str, str]:
    """CURVE socket options of a client: the server key from ``given`` (Client keywords), the
    connection info or ``$IPP_CURVE_SERVERKEY``; the client's pair from ``given`` or fresh."""
    if "curve_serverkey" in given:
        serverkey, source = given["curve_serverkey"], "Client(curve_serverkey=...)"
    elif info.get("curve_serverkey"):
        serverkey, source = info["curve_serverkey"], "the connection info's curve_serverkey"
    else:
        serverkey = os.environ.get(_curve.SERVERKEY_ENV_VAR) or None
        source = f"${_curve.SERVERKEY_ENV_VAR}"
    if not serverkey:
        if "curve_publickey" in given or "curve_secretkey" in given:
            raise ValueError(
                "curve_publickey/curve_secretkey need a server key: pass curve_serverkey=, or "
                "connect to a controller started with --curve"
            )
        return {}
    serverkey = _curve.check_key(serverkey, source)
    keys = None
    if "curve_secretkey" in given:
        secret = _curve.check_key(given["curve_secretkey"], "Client(curve_secretkey=...)")
        public = _curve.public_key(secret)
        if "curve_publickey" in given:
            claimed = _curve.check_key(given["curve_publickey"], "Client(curve_publickey=...)")
            if claimed != public:
                raise ValueError(
                    "curve_publickey does not belong to curve_secretkey: pass the pair made "
                    "together (zmq.curve_keypair()), or only curve_secretkey"
                )
        keys = (public, secret)
    elif "curve_publickey" in given:
        raise ValueError(
            "curve_publickey without curve_secretkey: pass the secret key too (or neither, for "
            "a fresh pair)"
        )
    return _curve.client_socket_options(serverkey, keys)


_HOT_TRAITS = ("metadata", "outstanding", "results", "history", "debug", "status_messages")


#: Seconds between an engine's unregistration and failing the requests still out on it.
STRANDED_GRACE = 0.3


def _warn_if_remote_loopback(info: dict[str, Any]) -> None:
    """Warn (as ipyparallel does) when the controller listens on loopback on another machine
    (its ``location``) and no SSH server is known to reach it: connecting will time out."""
    _, _, ip = str(info.get("interface", "")).partition("://")
    if not (ip.startswith("127.") or ip in ("::1", "[::1]", "localhost")):
        return
    if _ssh.controller_is_local(info):
        return
    location = info.get("location")
    warnings.warn(
        f"the controller listens on loopback ({ip}) of {location!r}, which is not this machine, "
        "and the connection info names no SSH server: if it really is on another machine, pass "
        f"Client(..., sshserver='you@{location}') or have the controller listen on an address "
        "reachable from here (--ip)",
        RuntimeWarning,
        stacklevel=3,
    )


class Client(HasTraits):
    """A connection to a controller.

    Parameters
    ----------
    url_or_file : str, os.PathLike or dict, optional
        Path of the controller's ``ipcontroller-client.json``, or its contents as a dict.
        By default the file of ``profile`` / ``cluster_id`` is used, waiting up to ``timeout``
        seconds for it to appear.
    profile : str, optional
        Profile name (``~/.ferroparallel/profile_<name>``).
    context : zmq.Context, optional
        Accepted for compatibility; the client's sockets live on the native I/O thread.
    debug : bool
        Log every message at debug level.
    timeout : float
        Seconds to wait for the connection file and for the controller's reply.
    config, username, packer, unpacker
        Classic IPython.parallel arguments: ``username`` goes into message headers;
        ``packer``/``unpacker`` override the connection file's (``"msgpack"`` or ``"json"``).
    sshserver : str, optional
        ``[user@]host[:port]`` of an SSH server to tunnel every channel through (see
        :mod:`ferroparallel.ssh`). By default the connection file's ``ssh`` entry when the
        controller is on another machine; ``sshkey`` or ``password`` alone tunnel through the
        controller's host.
    sshkey : str, optional
        Private key file; when given, only this key is offered.
    password : str, optional
        SSH password (or key passphrase with paramiko); never prompted for.
    paramiko : bool, optional
        ``True``: tunnel with paramiko; ``False``: with the ``ssh`` command; ``None``: the
        ``ssh`` command when it exists. A tunnel that cannot be opened raises
        :class:`ferroparallel.ssh.SSHTunnelError` (naming the host and the reason) within
        ``timeout``; a tunnel that dies fails outstanding and later requests with it.
    exec_key : str, optional
        HMAC key, overriding the connection file's ``key``.

    CurveZMQ is used when a server key is known: the ``curve_serverkey`` keyword, else the
    connection info's ``curve_serverkey``, else ``$IPP_CURVE_SERVERKEY``. Every socket is then
    encrypted, with this client's key pair: ``curve_publickey`` / ``curve_secretkey`` when both
    are given (a secret key alone is enough: its public key is derived), else a fresh pair. The
    keys are Z85 (40 characters, ``str`` or ``bytes``) and stay readable as the ``curve_*``
    traits (``bytes``, as in ipyparallel). Without the right server key the handshake fails,
    and the connection request raises ``TimeoutError`` after ``timeout`` seconds, naming the
    reason.
    connection_info, url_file, profile_dir, cluster_id, cluster
        Other ways to name the controller (ipyparallel 9 keywords).
    shm : bool, optional
        Send large arguments (push, scatter, apply) to engines on this host through shared
        memory: written once into ``/dev/shm``, mapped read-only by every engine. Default: on,
        unless ``$FERROPARALLEL_SHM=0``; engines on other hosts always get the socket path.
        See ``docs/decisions/0003-shared-memory.md``.
    shm_threshold : int, optional
        Buffers above this many bytes use shared memory (default
        ``$FERROPARALLEL_SHM_THRESHOLD`` or 1 MiB).
    peer_read : bool, optional
        For calls that wait for their results (``block=True``, ``apply_sync``, ...), let
        engines on this host copy large arguments straight out of this process's memory
        (``process_vm_readv``: one copy, nothing in ``/dev/shm``) instead of going through a
        segment. Default: on when ``shm`` is, unless ``$FERROPARALLEL_PEER_READ=0``; used only
        with engines that proved they can read this process. See
        ``docs/decisions/0007-reading-peer-memory.md``.
    direct_data : bool, optional
        For calls that wait for their results, let engines that cannot use shared memory (on
        other hosts, or with ``shm=False``) fetch large arguments straight from this client,
        and fetch large results straight from them, over TCP instead of through the
        controller. Default: on, unless ``$FERROPARALLEL_DIRECT_DATA=0``, SSH tunnels or
        CurveZMQ are used; used only with engines that proved both ways reachable. See
        ``docs/decisions/0014-direct-data-path.md``.

    On the controller's host (Linux) the client talks to it over its abstract Unix sockets
    rather than its TCP ports (``transport`` is then ``"ipc"``, else ``"tcp"``;
    ``$FERROPARALLEL_IPC=0`` keeps TCP; see :mod:`ferroparallel.ipc`).
    """

    #: Protocol extensions of the controller (``connection_reply``); none until connected.
    _features: frozenset[str] = frozenset()

    block = Bool(False, help="Wait for results by default").tag(config=True)
    debug = Bool(False).tag(config=True)
    status_messages = Bool(
        False,
        help="Ask engines for busy/idle IOPub status messages around this client's requests "
        "(ferroparallel engines leave them out by default: this client knows from each reply "
        "how many outputs to expect, and never subscribes to them).",
    ).tag(config=True)
    timeout = Float(10.0)
    cluster = AnyTrait(None, allow_none=True, help="the Cluster this client was made by, if any")
    curve_serverkey = Bytes(None, allow_none=True, help="the controller's CURVE public key (Z85)")
    curve_publickey = Bytes(None, allow_none=True, help="this client's CURVE public key (Z85)")
    curve_secretkey = Bytes(None, allow_none=True, help="this client's CURVE secret key (Z85)")
    profile = Unicode("default")
    outstanding = Set(help="msg_ids of requests without a reply")
    results = Instance(
        dict, help="results by msg_id, until their AsyncResult owns them (a missing one reads {})"
    )
    metadata = FlushingInstance(collections.defaultdict)
    history = List(help="msg_ids of every request sent, in order")
    _ids = List()

    def __init__(
        self,
        url_or_file: str | os.PathLike[str] | dict[str, Any] | None = None,
        profile: str | None = None,
        context: Any = None,
        debug: bool = False,
        timeout: float = 10,
        config: Any = None,
        username: str | None = None,
        packer: str | None = None,
        unpacker: str | None = None,
        sshserver: str | None = None,
        sshkey: str | None = None,
        password: str | None = None,
        paramiko: bool | None = None,
        exec_key: str | bytes | None = None,
        *,
        connection_info: dict[str, Any] | None = None,
        url_file: str | os.PathLike[str] | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
        cluster_id: str | None = None,
        cluster: Any = None,
        shm: bool | None = None,
        shm_threshold: int | None = None,
        peer_read: bool | None = None,
        direct_data: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            debug=debug,
            timeout=float(timeout),
            metadata=collections.defaultdict(Metadata),
            results=collections.defaultdict(dict),  # as ipyparallel's
        )
        # The per-message path reads these traits from ``_trait_values`` (a trait read costs
        # ~1 µs); reading each once here puts its default value there.
        for name in _HOT_TRAITS:
            getattr(self, name)
        if kwargs.pop("ipython_dir", None) is not None:
            pass  # accepted for compatibility; profiles live under FERROPARALLEL_DIR
        curve_keys = {k: v for k in _CURVE_KWARGS if (v := kwargs.pop(k, None)) is not None}
        if kwargs:
            raise TypeError(f"Client() got unexpected keyword argument(s): {', '.join(kwargs)}")
        self.cluster = cluster
        if cluster is not None:
            profile_dir = profile_dir or getattr(cluster, "profile_dir", None)
            cluster_id = (
                cluster_id if cluster_id is not None else getattr(cluster, "cluster_id", None)
            )
        self.profile = profile or "default"
        self._closed = True
        info, source = connection.resolve_connection_info(
            url_or_file,
            connection_info=connection_info,
            url_file=url_file,
            profile=profile,
            profile_dir=profile_dir,
            cluster_id=cluster_id,
            timeout=timeout,
        )
        if exec_key is not None:
            info["key"] = exec_key.decode() if isinstance(exec_key, bytes) else exec_key
            paths.warn_if_no_key(info, "exec_key")
        self._tunnels: Any = None
        self._tunnel_error: BaseException | None = None
        urls = {channel: connection.url(info, channel) for _, _, channel in _SOCKETS}
        ssh_server = _ssh.choose_server(info, sshserver, sshkey, password)
        if not ssh_server:
            _warn_if_remote_loopback(info)
        pack = packer or info.get("pack", "msgpack")
        unpack = unpacker or info.get("unpack", pack)
        for name in (pack, unpack):
            if name not in _PACKERS:
                raise ValueError(f"unsupported packer {name!r}: use 'msgpack' or 'json'")
        self._connection_info = info
        self._connection_source = source
        local = None if ssh_server else _ipc.local_urls(info, tuple(urls))
        if local is not None:  # same host: the controller's Unix sockets (ferroparallel.ipc)
            urls = local
        #: "ipc" when this client talks to the controller through its same-host Unix sockets
        self.transport = "ipc" if local is not None else "tcp"
        self._controller_url = connection.url(info, "registration") + (
            f" (via SSH {ssh_server})"
            if ssh_server
            else (f" ({urls['registration']})" if local else "")
        )
        self._task_scheme = info.get("task_scheme", "leastload")
        self.session = _core.Session(
            info["key"].encode(),
            packer=pack,
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            username=username,
        )
        self._session_id = self.session.session
        self._shm = ShmTransport(self, shm, shm_threshold, peer_read)
        curve_options = _client_curve_options(info, curve_keys)
        self._curve = bool(curve_options)
        self._net = NetData(
            self.session.key,
            pack,
            connection.data_url(info),
            enabled=direct_data is not False and not ssh_server and not curve_options,
        )
        self._shm.use_network(self._net)
        #: threads fetching results lent over the network (stopped and joined by close)
        self._net_fetches = Workers("ferroparallel-fetch")
        for name, value in curve_options.items():
            setattr(self, name, value.encode("ascii"))
        if ssh_server:
            self._tunnels = _ssh.open_tunnels(
                urls,
                ssh_server,
                keyfile=sshkey,
                password=password,
                paramiko=paramiko,
                timeout=timeout,
                on_death=self._tunnel_died,
            )
            urls = dict(self._tunnels.urls)
        # where the connection request goes (None through SSH: the forward always accepts)
        self._registration_endpoint = None if ssh_server else urls["registration"]
        try:
            self._io = _core.IoThread(self.session, name="ferroparallel-client")
            for name, kind, channel in _SOCKETS:
                # IOPub: outputs only; ferroparallel engines' status messages have their own
                # topic, and replies say how many outputs to wait for (see wire_names)
                topics = [OUTPUT_TOPIC_PREFIX, DATAPUB_TOPIC] if name == "iopub" else None
                self._io.add_socket(
                    name,
                    kind,
                    connect=urls[channel],
                    linger_ms=1000,
                    subscribe=topics,
                    **curve_options,
                )
            if local is not None and not curve_options:
                self._open_link(info, timeout)
        except BaseException:
            self._close_tunnels()
            raise
        if os.environ.get("FERROPARALLEL_BATCH_SENDS", "1") != "0":
            # requests sent in a quick succession leave together (decision 0010)
            self._io.batch_sends(True)
        self._closed = False
        _OPEN_CLIENTS.add(self)
        self._lock = threading.RLock()
        self._engines: dict[int, str] = {}
        self._uuids: dict[str, int] = {}
        #: ids of engines that unregistered, by uuid (a dead engine's failures name it)
        self._departed: dict[str, int] = {}
        self._futures: dict[str, MessageFuture] = {}
        #: fanned-out requests whose futures are not made yet, by their request's msg_id
        self._pending_groups: dict[str, FanoutGroup] = {}
        #: the last target list of a fan-out found to name no engine twice (see _fanout_ids)
        self._distinct_targets: list[str] = []
        self._owned: set[str] = set()
        self._outstanding_by_engine: dict[str, set[str]] = collections.defaultdict(set)
        self._history_set: set[str] = set()  # see _sent_ids
        self._history_seen = 0
        self._query_futures: dict[str, Future] = {}
        self._engines_changed = threading.Condition()
        self._registration_callbacks: list[Callable[[int], Any]] = []
        self._hub_shutdown = False
        self._last_traffic = time.monotonic()
        self._probe: tuple[str, float] | None = None
        self._dispatcher = threading.Thread(
            target=_dispatch_loop,
            args=(weakref.ref(self), self._io),
            name="ferroparallel-dispatcher",
            daemon=True,
        )
        self._dispatcher.start()
        try:
            reply = self._query(
                "connection_request", {}, timeout=timeout, what="connection request"
            )
        except BaseException:
            self.close()
            raise
        # what this controller adds to the ipyparallel protocol (none: an ipyparallel one)
        self._features = frozenset(reply.get(FEATURES_KEY) or ())
        self._update_engines(reply.get("engines", {}))
        self._activate_magics()

    def _activate_magics(self) -> None:
        """Inside IPython, the first Client registers the ``%px`` magics for a blocking view of
        all engines; once any ``%px`` is registered (by an earlier Client, ``activate()`` or
        ``%load_ext ferroparallel``) a new Client leaves it alone, as ipyparallel's does."""
        shell = ipython_shell()
        if shell is None or not hasattr(shell, "register_magics"):
            return
        manager = getattr(shell, "magics_manager", None)
        if manager is None or "px" in manager.magics.get("line", {}):
            return
        try:
            self.activate()
        except Exception:  # noqa: BLE001 - the magics are a convenience, never a failure
            log.debug("could not register the parallel magics", exc_info=True)

    def activate(self, targets: Any = "all", suffix: str = "") -> Any:
        """Register the IPython parallel magics for a blocking DirectView of ``targets``
        (see :meth:`DirectView.activate`); returns the view."""
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    # ----- connection state -----------------------------------------------------------------

    def _update_engines(self, engines: dict[str, str]) -> None:
        with self._engines_changed:
            for k, uuid in engines.items():
                eid = int(k)
                self._engines[eid] = uuid
                self._uuids[uuid] = eid
            self._ids = sorted(self._engines)
            self._engines_changed.notify_all()

    @property
    def ids(self) -> list[int]:
        """Ids of the registered engines (kept current by notifications)."""
        return list(self._ids)

    def _engine_id_of(self, uuid: str) -> int | None:
        return self._uuids.get(uuid)

    def _uuid_of(self, engine_id: int, in_list: bool = False) -> str:
        """The uuid of engine ``engine_id``.

        Raises NoEnginesRegistered when no engine is registered at all, else IndexError for an
        unknown id; one in a list of targets is also a KeyError (as ipyparallel raises then).
        """
        try:
            return self._engines[engine_id]
        except KeyError:
            if not self._engines:
                self._no_engines()
            msg = f"No such engine: {engine_id!r} (registered: {self.ids})"
            raise (error.NoSuchEngine if in_list else IndexError)(msg) from None

    def _no_engines(self) -> NoReturn:
        self._check_open()  # (no engines because the controller is gone: say that)
        raise error.NoEnginesRegistered(
            "No engines registered (or none selected); start engines or wait for them "
            "with client.wait_for_engines(n)"
        )

    def _build_targets(self, targets: Any) -> tuple[list[str], list[int]]:
        """Uuids and ids for ``targets`` (None/'all', an int, a slice, or a list)."""
        if type(targets) is int and targets >= 0:  # (the usual rc[i]: what the rest gives)
            uuid = self._engines.get(targets)
            if uuid is not None:
                return [uuid], [targets]
        ids = self.ids
        if targets is None or targets == "all":
            chosen = ids
        elif isinstance(targets, int):
            if not ids:
                self._no_engines()
            chosen = [ids[targets] if targets < 0 else targets]
        elif isinstance(targets, slice):
            chosen = ids[targets]
        elif isinstance(targets, range):
            chosen = list(targets)
        else:
            try:
                chosen = list(targets)
            except TypeError:
                raise TypeError(
                    f"targets must be an engine id (int), a slice, a list of ids or 'all', "
                    f"not {type(targets).__name__} {targets!r}"
                ) from None
        if not chosen:
            self._no_engines()
        if set(map(type, chosen)) == {int}:  # (the usual case, at C speed)
            engines = self._engines
            try:
                return list(map(engines.__getitem__, chosen)), list(chosen)
            except KeyError:
                pass  # raised below, naming the engine
        uuids = []
        for t in chosen:
            if not isinstance(t, int):
                raise TypeError(f"targets must be ints, not {type(t).__name__} ({t!r})")
            uuids.append(self._uuid_of(t, in_list=not isinstance(targets, int)))
        return uuids, list(chosen)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        for eid in self.ids:
            yield self.direct_view(eid)

    def __getitem__(self, key: Any):
        """``rc[i]``, ``rc[i:j]``, ``rc[[...]]``: a DirectView on those engines."""
        if key is None or isinstance(key, str):
            raise TypeError(f"index engines with ints, slices or lists of ints, not {key!r}")
        # an int, slice or list names the engines registered now (only 'all' follows new ones)
        return self.direct_view(key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _open_link(self, info: dict[str, Any], timeout: float) -> None:
        """Send the MUX and task traffic over the controller's link for same-host peers
        (decision 0017) when it serves one; before any request, so that none of them can
        overtake another on the way."""
        if not _ipc.links_enabled():
            return
        url = (_ipc.local_urls(info, (_ipc.LINK_KEY,)) or {}).get(_ipc.LINK_KEY)
        if url is None:
            return
        try:
            self._io.add_link(url, self._session_id, min(timeout, LINK_TIMEOUT))
        except ValueError as e:
            log.info("no link to the controller (%s): using its ZMQ sockets", e)

    # ----- dispatcher -----------------------------------------------------------------------

    def _dispatch_round(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """One turn of the dispatcher thread (see :func:`_dispatch_loop`)."""
        io = self._io
        if batch:
            self._last_traffic = time.monotonic()
            self._dispatch_batch(batch)
            io.wake()  # threads waiting in wait_here look at their results again
        for sock, kind, text in io.take_errors():
            if kind == "LinkClosed":
                # the controller closed our link: it is gone (or shutting down), or it
                # refused us; its ZMQ sockets carry our traffic from now on. Ask it now.
                log.info("the link to the controller closed (%s)", text)
                self._last_traffic = 0.0
                continue
            log.warning("dropped a message on %s: %s: %s", sock, kind, text)
        self._check_controller()

    def _wait_here(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``done()``, handling replies in this thread (see ``waiting.wait_here``)."""
        return waiting.wait_here(self, done, timeout)

    def _dispatch_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Handle one batch: caches updated under the lock (taken once), futures settled
        after it is released (their callbacks must not run under a lock of ours)."""
        done: list[dispatch.Settle] = []
        others: list[tuple[str, dict[str, Any]]] = []
        for sock, msg in batch:
            # first, so that replies in this batch see engines registered before them
            if sock == "notification" and msg.get("msg_type") == "registration_notification":
                try:
                    self._handle_notification(msg)
                except Exception:  # noqa: BLE001
                    log.exception("dispatcher: cannot handle a notification")
        with self._lock:
            for sock, msg in batch:
                if self._trait_values["debug"]:
                    log.debug("%s <- %s %s", sock, msg.get("msg_type"), msg.get("content"))
                try:
                    if sock == "iopub":
                        item = dispatch.handle_iopub(self, msg)
                    elif sock in ("mux", "task", "control"):
                        item = dispatch.handle_reply(self, msg, sock)
                    else:
                        if msg.get("msg_type") != "registration_notification":
                            others.append((sock, msg))
                        continue
                except Exception:  # noqa: BLE001 - one bad message must not stop the client
                    log.exception("dispatcher: cannot handle a %s message", sock)
                    continue
                if item is not None:
                    done.append(item)
        if done:
            dispatch.settle(self, done)
        for sock, msg in others:
            try:
                self._dispatch(sock, msg)
            except Exception:  # noqa: BLE001
                log.exception("dispatcher: cannot handle a %s message", sock)

    def _dispatch(self, sock: str, msg: dict[str, Any]) -> None:
        if sock == "notification":
            self._handle_notification(msg)
        elif sock == "query":
            parent_id = (msg.get("parent_header") or {}).get("msg_id")
            fut = self._query_futures.pop(parent_id, None)
            if self._probe and parent_id == self._probe[0]:
                self._probe = None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _handle_notification(self, msg: dict[str, Any]) -> None:
        msg_type = msg.get("msg_type")
        content = msg.get("content") or {}
        if msg_type == "registration_notification":
            self._update_engines({str(content["id"]): content["uuid"]})
            for cb in list(self._registration_callbacks):
                try:
                    cb(content["id"])
                except Exception:  # noqa: BLE001
                    log.exception("registration callback failed")
        elif msg_type == "unregistration_notification":
            with self._engines_changed:
                eid = content.get("id")
                uuid = self._engines.pop(eid, None)
                self._uuids.pop(uuid, None)
                if uuid is not None and isinstance(eid, int):
                    self._departed[uuid] = eid
                self._ids = sorted(self._engines)
                self._engines_changed.notify_all()
            uuid = uuid or content.get("uuid")
            if uuid:
                # not at once: an engine that stops right after a task sends the reply and its
                # unregistration on different sockets, and the notification can overtake the
                # reply by a few milliseconds (the reply then settles the task first)
                timer = threading.Timer(STRANDED_GRACE, self._fail_stranded, (eid, uuid))
                timer.daemon = True
                timer.start()
        elif msg_type == "shutdown_notification":
            self._hub_shutdown = True
            self._fail_outstanding(
                _engine_error("the controller shut down before this task finished")
            )

    def _sent_ids(self) -> set[str]:
        """The msg_ids of :attr:`history` as a set, brought up to date as it grows."""
        history = self._trait_values["history"]
        if self._history_seen > len(history):  # (history replaced)
            self._history_set, self._history_seen = set(), 0
        if self._history_seen < len(history):
            self._history_set.update(history[self._history_seen :])
            self._history_seen = len(history)
        return self._history_set

    def _fail_stranded(self, eid: Any, uuid: str) -> None:
        """As ipyparallel's client: the requests still out on an engine that went away fail
        here with an EngineError (a controller sends no reply for them; load-balanced tasks
        are the scheduler's, which retries or fails them itself)."""
        done: list[dispatch.Settle] = []
        self._flush_pending()
        with self._lock:
            for msg_id in list(self._outstanding_by_engine.get(uuid, ())):
                fut = self._futures.get(msg_id)
                if fut is None or fut.done():
                    continue
                request_type = (fut.header or {}).get("msg_type") or "apply_request"
                method = request_type.removesuffix("_request")
                reply = {
                    "header": {"msg_type": f"{method}_reply", "msg_id": f"{msg_id}_stranded"},
                    "parent_header": {"msg_id": msg_id},
                    "metadata": {"engine": uuid, "status": "error"},
                    "content": {
                        "status": "error",
                        "ename": "EngineError",
                        "evalue": f"Engine {eid!r} died while running task {msg_id!r}",
                        "traceback": [],
                        "engine_info": {"engine_uuid": uuid, "engine_id": eid, "method": method},
                    },
                }
                item = dispatch.handle_reply(self, reply, "mux")
                if item is not None:
                    done.append(item)
        if done:
            dispatch.settle(self, done)

    def _fail_outstanding(self, exc: BaseException) -> None:
        self._flush_pending()
        with self._lock:
            pending = [f for f in self._futures.values() if not f.done()]
            for fut in pending:
                self.outstanding.discard(fut.msg_id)
                self.results[fut.msg_id] = exc
                fut.set_exception(exc)
                if not fut.output_done():
                    fut.finish_output()
            for fut in list(self._query_futures.values()):
                if not fut.done():
                    fut.set_exception(exc)

    def _tunnel_died(self, exc: BaseException) -> None:
        """The SSH tunnels died: fail every outstanding request, refuse new ones."""
        self._tunnel_error = exc
        self._fail_outstanding(exc)

    def _close_tunnels(self) -> None:
        tunnels, self._tunnels = getattr(self, "_tunnels", None), None
        if tunnels is not None:
            tunnels.close()

    def _check_controller(self) -> None:
        """Probe a silent controller while requests are outstanding; fail them if it is gone."""
        waiting = self._trait_values["outstanding"] or self._shm.probing()
        if not waiting or self._hub_shutdown or self._closed:
            return
        now = time.monotonic()
        # Probe after a quiet spell; any message from the controller since the probe counts as
        # a sign of life. Give up when nothing at all arrived within the client's timeout.
        half = max(0.25, min(PROBE_IDLE, self.timeout / 2))
        if self._probe is not None and self._last_traffic >= self._probe[1]:
            self._probe = None
        if self._probe is None:
            if now - self._last_traffic > half:
                header = self.session.msg_header("connection_request")
                self._probe = (header["msg_id"], now)
                self._io.send("query", "connection_request", {}, header=header)
        elif now - self._probe[1] > half:
            self._probe = None
            self._fail_outstanding(
                _engine_error(
                    f"lost contact with the controller at {self._controller_url}: no reply "
                    f"for {self.timeout:g} s"
                )
            )

    def _maybe_release(self, msg_id: str) -> None:
        """Drop a finished message from the caches once an AsyncResult owns it."""
        fut = self._futures.get(msg_id)
        if fut is None or msg_id not in self._owned:
            return
        if fut.done() and fut.output_done():
            self._futures.pop(msg_id, None)
            self._trait_values["results"].pop(msg_id, None)
            self._trait_values["metadata"].pop(msg_id, None)
            self._owned.discard(msg_id)

    def _own(self, msg_ids: Sequence[str], group: FanoutGroup | None = None) -> None:
        """An AsyncResult took references to these messages; the caches may drop them.

        No lock: ownership is recorded before the state is checked, and the dispatcher settles
        before it checks ownership, so one of the two always releases a finished message. (A
        message whose future is not made yet cannot be finished.) ``group``: the messages are
        those of this fanned-out request; while its futures are not made, the group records
        the ownership and :meth:`_materialize` passes it on (one of the two sees the other's
        write: the group is marked before ``made`` is read here, and ``made`` is set before
        ``owned`` is read there).
        """
        if group is not None:
            group.owned = True
            if group.made is None:
                return
        owned = self._owned
        owned.update(msg_ids)
        futures = self._futures
        results = self._trait_values["results"]
        metadata = self._trait_values["metadata"]
        for m in msg_ids:
            fut = futures.get(m)
            # (only a finished message can be released; most are still in flight.) What
            # _maybe_release does, inline: a long map's replies are mostly in by now
            if fut is not None and fut._state in _DONE_STATES and m in owned and fut.output_done():
                futures.pop(m, None)
                results.pop(m, None)
                metadata.pop(m, None)
                owned.discard(m)

    # ----- fanned-out requests (see fanout.py) ----------------------------------------------

    def _fanout_ids(self, base: str, uuids: list[str]) -> list[str]:
        """The msg_ids of the engines' copies of the request ``base`` sent to ``uuids``:
        ``<base>_<uuid>``, and ``<base>_<uuid>_<k>`` for the k-th repeat (k >= 1) of an engine
        named again (the controller derives the same, see docs/protocol.md)."""
        prefix = base + "_"
        ids = [prefix + u for u in uuids]
        if uuids == self._distinct_targets:  # (the usual case: the same targets again)
            return ids
        if len(set(uuids)) == len(uuids):
            self._distinct_targets = list(uuids)
            return ids
        seen: dict[str, int] = {}
        for i, u in enumerate(uuids):
            k = seen[u] = seen.get(u, -1) + 1
            if k:
                ids[i] = f"{ids[i]}_{k}"
        return ids

    def _register_group(
        self,
        header: dict[str, Any],
        uuids: list[str],
        msg_ids: list[str],
        label: str | None,
        tracker: Any,
    ) -> FanoutGroup:
        """Record a request for several engines without making its per-engine futures: its
        msg_ids join ``history`` and ``outstanding`` now, the rest waits for
        :meth:`_materialize`. Costs a few C-level updates, whatever the number of engines."""
        group = FanoutGroup(header, uuids, msg_ids, label, tracker)
        ids = msg_ids
        self._pending_groups[header["msg_id"]] = group
        self._trait_values["outstanding"].update(ids)
        self._trait_values["history"].extend(ids)
        return group

    def _materialize(self, group: FanoutGroup) -> list[MessageFuture]:
        """The per-engine futures of ``group``, made (with their Metadata) if need be. The
        group's listeners get them before they are published, so no reply can settle one of
        them before its AsyncResult listens (and no callback runs here, under our lock)."""
        futs = group.futures
        if futs is not None:
            return futs
        with self._lock:
            futs = group.futures
            if futs is not None:
                return futs
            entries = list(zip(group.msg_ids, group.uuids, strict=True))
            futs = self._register_all(
                group.header, entries, group.label, group.tracker, record=False, publish=False
            )
            group.hand_out(futs)  # (sets group.made: see _own)
            if group.owned:
                self._owned.update(group.msg_ids)
            self._futures.update(zip(group.msg_ids, futs, strict=True))
            group.futures = futs
            self._pending_groups.pop(group.header["msg_id"], None)
        return futs

    def _group_of(self, msg_id: Any) -> FanoutGroup | None:
        """The pending fanned-out request that ``msg_id`` is one engine's copy of, if any.
        A copy's msg_id is its request's followed by ``_`` and more (see :meth:`_fanout_ids`),
        so the request's is one of its prefixes that end before an underscore."""
        groups = self._pending_groups
        if not groups or type(msg_id) is not str:
            return None
        end = len(msg_id)
        while (end := msg_id.rfind("_", 0, end)) > 0:
            group = groups.get(msg_id[:end])
            if group is not None and msg_id in group.msg_ids:
                return group
        return None

    def _future_of(self, msg_id: Any) -> MessageFuture | None:
        """The future of one of this client's messages (made now if it was pending)."""
        fut = self._futures.get(msg_id)
        if fut is None and self._pending_groups:
            group = self._group_of(msg_id)
            if group is not None:
                self._materialize(group)
                fut = self._futures.get(msg_id)
        return fut

    def _flush_pending(self) -> None:
        """Make the futures of every pending fanned-out request (before the caches are
        scanned or shown)."""
        while self._pending_groups:
            for group in list(self._pending_groups.values()):
                self._materialize(group)

    # ----- sending --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise error.IoClosedError("this Client is closed; create a new one")
        if self._tunnel_error is not None:
            raise self._tunnel_error
        if self._hub_shutdown:
            raise error.IoClosedError(
                f"the controller at {self._controller_url} has shut down; start a cluster and "
                "create a new Client"
            )

    def _query(
        self,
        msg_type: str,
        content: dict[str, Any],
        timeout: float | None = None,
        what: str | None = None,
    ) -> dict[str, Any]:
        """Send a hub query and wait for its reply content (errors are raised)."""
        self._check_open()
        header = self.session.msg_header(msg_type)
        fut: Future = Future()
        self._query_futures[header["msg_id"]] = fut
        self._io.send("query", msg_type, content, header=header)
        wait = self.timeout if timeout is None else timeout
        try:
            reply = fut.result(timeout=wait)
        except TimeoutError:
            self._query_futures.pop(header["msg_id"], None)
            failures = self._io.handshake_failures()
            raise TimeoutError(
                f"Hub {what or msg_type} timed out: no reply from the controller at "
                f"{self._controller_url} (connection info from {self._connection_source}) "
                f"within {wait:g} s"
                + _curve.describe_handshake_failures(failures, curve=getattr(self, "_curve", None))
                + ("" if failures or msg_type != "connection_request" else self._silent_hint())
            ) from None
        content = reply.get("content") or {}
        if content.get("status") == "error":
            raise error.unwrap_exception(content)
        return content

    def _silent_hint(self) -> str:
        """Why a controller may not answer the connection request, when one listens there."""
        endpoint = getattr(self, "_registration_endpoint", None)
        if not endpoint or not connection.accepts_connections(endpoint):
            return ""
        return (
            f"; something accepts connections at {endpoint} but did not answer: if it is the "
            "controller, the key in this connection info is not its key (a controller drops "
            "messages signed with another key unread), e.g. a connection file of an earlier "
            "controller run, or a wrong exec_key"
        )

    def _register(
        self,
        header: dict[str, Any],
        track: Any = None,
        engine_uuid: str | None = None,
        label: str | None = None,
        record: bool = True,
    ) -> MessageFuture:
        """:meth:`_register_all` for one message, whose msg_id is the header's (once per
        task: no list, no loop)."""
        submitted = parse_date(header.get("date"))
        msg_id = header["msg_id"]
        return self._register_one(
            header, msg_id, engine_uuid, label, track, submitted, record, publish=True
        )

    def _register_all(
        self,
        header: dict[str, Any],
        entries: Sequence[tuple[str, str | None]],
        label: str | None = None,
        track: Any = None,
        record: bool = True,
        publish: bool = True,
    ) -> list[MessageFuture]:
        """Create the futures and cache entries of messages sent with ``header`` (one per
        ``(msg_id, engine_uuid)``; several for a fanned-out request).

        ``record=False`` (control requests: abort, clear, signals, probes): not in
        ``history`` nor ``outstanding``, as in ipyparallel, where those list tasks only.
        ``publish=False``: not in the future cache either (the caller puts them there)."""
        submitted = parse_date(header.get("date"))
        base = header["msg_id"]
        return [
            self._register_one(
                header if msg_id == base else {**header, "msg_id": msg_id},
                msg_id,
                engine_uuid,
                label,
                track,
                submitted,
                record,
                publish,
            )  # fmt: skip
            for msg_id, engine_uuid in entries
        ]

    def _register_one(
        self,
        header: dict[str, Any],
        msg_id: str,
        engine_uuid: str | None,
        label: str | None,
        track: Any,
        submitted: Any,
        record: bool,
        publish: bool,
    ) -> MessageFuture:
        """The future and cache entries of one message (see :meth:`_register_all`); its
        Metadata is made in one step (the keys are known to be valid), or an entry made by an
        earlier lookup of ``msg_id`` is filled in."""
        tv = self._trait_values
        fut = MessageFuture(msg_id, header, track)
        values: dict[str, Any] = {"msg_id": msg_id, "submitted": submitted}
        if label is not None:
            values["label"] = label
        if engine_uuid is not None:
            eid = self._uuids.get(engine_uuid)
            values["engine_uuid"] = engine_uuid
            values["engine_id"] = self._departed.get(engine_uuid) if eid is None else eid
            self._outstanding_by_engine[engine_uuid].add(msg_id)
        metadata = tv["metadata"]
        md = metadata.get(msg_id)
        if md is None:
            md = metadata[msg_id] = Metadata._of_request(values)
        else:
            dict.update(md, values)
        fut.md = md
        if publish:
            self._futures[msg_id] = fut
        if record:
            tv["outstanding"].add(msg_id)
            tv["history"].append(msg_id)
        return fut

    def _send(
        self,
        socket: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        metadata: dict[str, Any] | None = None,
        ident: Any = None,
        buffers: Sequence[Any] | None = None,
        track: bool = False,
        engine_uuid: str | None = None,
        header: dict[str, Any] | None = None,
        record: bool = True,
        message_future_hook: Callable[[MessageFuture], Any] | None = None,
    ) -> MessageFuture:
        self._check_open()
        if header is None:
            header = self.session.msg_header(msg_type)
        # with track: when libzmq is done with the buffers sent from the caller's memory
        tracker = _core.SendTracker() if track else None
        return self._register_and_send(
            socket, msg_type, content, metadata, ident, buffers, header, tracker, engine_uuid,
            record, message_future_hook,
        )  # fmt: skip

    def _register_and_send(
        self,
        socket: str,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None,
        ident: Any,
        buffers: Sequence[Any] | None,
        header: dict[str, Any],
        tracker: Any,
        engine_uuid: str | None,
        record: bool = True,
        hook: Callable[[MessageFuture], Any] | None = None,
    ) -> MessageFuture:
        """The tail every request shares: its MessageFuture registered, ``hook(future)``
        called, then the message sent (positional arguments: it runs once per task)."""
        # no lock: each cache operation is atomic, and no reply can name msg_id before it is sent
        fut = self._register(header, tracker, engine_uuid, (metadata or {}).get("label"), record)
        if hook is not None:
            hook(fut)
        self._io.send(
            socket, msg_type, content, None, metadata, ident=ident, buffers=buffers,
            header=header, tracker=tracker,
        )  # fmt: skip
        return fut

    def _send_fanout(
        self,
        msg_type: str,
        content: dict[str, Any],
        uuids: Sequence[str],
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Any] | None = None,
        header: dict[str, Any] | None = None,
        track: bool = False,
    ) -> FanoutGroup:
        """One request for several engines: sent once, fanned out by the controller (each
        engine's copy gets its own msg_id ``<msg_id>_<engine uuid>``; an engine named again in
        ``uuids`` runs the request again, under ``<msg_id>_<engine uuid>_<k>``). Returns the
        request's :class:`FanoutGroup` (its futures are made when first needed).

        The message names the engines only (``metadata.fanout``: their uuids): the controller
        derives each copy's msg_id as :meth:`_fanout_ids` does."""
        self._check_open()
        if header is None:
            header = self.session.msg_header(msg_type)
        uuids = list(uuids)
        msg_ids = self._fanout_ids(header["msg_id"], uuids)
        md = dict(metadata or {})
        label = md.get("label")
        tracker = _core.SendTracker() if track else None  # (one for all the copies)
        group = self._register_group(header, uuids, msg_ids, label, tracker)
        if "fanout-uuids" not in self._features:
            # an ipyparallel controller (or an earlier ferroparallel one, whose fan-out took
            # [uuid, msg_id] pairs and was announced as "fanout"): one message per engine
            # (same msg_ids, same buffers)
            for u, mid in zip(uuids, msg_ids, strict=True):
                self._io.send(
                    "mux", msg_type, content, None, md, ident=u.encode(), buffers=buffers,
                    header={**header, "msg_id": mid}, tracker=tracker,
                )  # fmt: skip
            return group
        md["fanout"] = uuids
        self._io.send(
            "mux", msg_type, content, None, md, ident=FANOUT_IDENT, buffers=buffers,
            header=header, tracker=tracker,
        )  # fmt: skip
        return group

    def _request_metadata(
        self, metadata: dict[str, Any] | None, lend_from: Sequence[str] | None | bool = False
    ) -> dict[str, Any]:
        """Metadata of a shell request (a new dict): ``metadata`` plus that large results may
        come back through shared memory (when this client uses it: engines on this host then
        answer with a segment) or be lent by the engines ``lend_from`` (``None``: any engine;
        ``False``: no lending) when this thread waits for them, and that no busy/idle status
        is wanted (unless ``status_messages``: this client counts outputs with the reply's
        ``fp_outputs``)."""
        md = dict(metadata) if metadata else {}
        shm = self._shm
        if shm.enabled:
            md[SHM_HOST_KEY] = shm.host
        # (neither kind of lending applies to a request this thread does not wait for)
        if lend_from is not False and getattr(shm._calls, "waits", False):
            lend = shm.lend_results(lend_from)
            if lend is not None:
                md[LEND_RESULTS_KEY] = lend
            elif shm.net_results(lend_from):
                md[NET_LEND_RESULTS_KEY] = True
        if not self._trait_values["status_messages"]:
            md[NO_STATUS_KEY] = True
        return md

    def apply_to(
        self,
        uuids: Sequence[str],
        f: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        track: bool = False,
    ) -> list[MessageFuture] | FanoutGroup:
        """Apply ``f`` on each engine in ``uuids`` (one message; fanned out by the controller
        when there is more than one engine: then a :class:`FanoutGroup`)."""
        if len(uuids) == 1:
            return [
                self.send_apply_request(
                    "mux", f, args, kwargs, metadata=metadata, track=track, ident=uuids[0]
                )
            ]
        _check_applicable(f)
        header = self.session.msg_header("apply_request")
        bufs, seg = self._shm.pack_apply(
            f, tuple(args or ()), dict(kwargs or {}), uuids, header["msg_id"]
        )
        metadata = self._request_metadata(metadata, uuids)
        if seg is None:
            return self._send_fanout("apply_request", {}, uuids, metadata, bufs, header, track)
        try:
            group = self._send_fanout("apply_request", {}, uuids, metadata, bufs, header, track)
        except BaseException:
            self._shm.drop(seg)
            raise
        self._shm.hold(seg, self._materialize(group))
        return group

    def execute_on(
        self,
        uuids: Sequence[str],
        code: str,
        silent: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> list[MessageFuture] | FanoutGroup:
        """Execute ``code`` on each engine in ``uuids`` (one message, fanned out: then a
        :class:`FanoutGroup`)."""
        if len(uuids) == 1:
            return [self.send_execute_request("mux", code, silent, metadata, ident=uuids[0])]
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        content = _execute_content(code, silent)
        return self._send_fanout(
            "execute_request", content, uuids, self._request_metadata(metadata)
        )

    def send_apply_request(
        self,
        socket: str,
        f: Callable[..., Any],
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        track: bool = False,
        ident: Any = None,
        message_future_hook: Callable[[MessageFuture], Any] | None = None,
    ) -> MessageFuture:
        """Send an ``apply_request`` on ``socket`` (``"mux"`` with ``ident`` = an engine uuid,
        or ``"task"``) and return its MessageFuture; ``message_future_hook(future)`` is called
        with it before the request is sent (as ipyparallel's), so it sees every reply."""
        if not callable(f):  # (no call for the usual case: this runs once per task)
            _check_applicable(f)
        uuid = ident.decode() if isinstance(ident, bytes) else ident
        targets = [uuid] if uuid else (metadata or {}).get("targets") or None
        header = self.session.msg_header("apply_request")
        engines = None if targets else list(self._uuids)  # (a task for any engine)
        bufs, seg = self._shm.pack_apply(
            f, tuple(args or ()), dict(kwargs or {}), targets, header["msg_id"], engines
        )
        metadata = self._request_metadata(metadata, targets)
        if seg is not None and engines is not None:
            # engines that join later may not reach the arguments (LENT_TO_KEY)
            metadata = {**(metadata or {}), LENT_TO_KEY: engines}
        try:
            self._check_open()
            # with track: when libzmq is done with the buffers sent from the caller's memory
            tracker = _core.SendTracker() if track else None
            fut = self._register_and_send(
                socket, "apply_request", {}, metadata,
                ident.encode() if isinstance(ident, str) else ident, bufs, header, tracker, uuid,
                True, message_future_hook,
            )  # fmt: skip
        except BaseException:
            if seg is not None:
                self._shm.drop(seg)
            raise
        if seg is not None:
            self._shm.hold(seg, [fut])
        return fut

    def _send_packed_task(self, buffers: list[bytes], metadata: dict[str, Any]) -> MessageFuture:
        """``send_apply_request("task", ...)`` for a call packed already as plain buffers
        (what ``pack_plain_call`` makes: nothing lent, nothing in shared memory), untracked:
        the chunks of a load-balanced map (see ``apply.plain_chunk_packer``)."""
        header = self.session.msg_header("apply_request")
        md = self._request_metadata(metadata, metadata.get("targets") or None)
        self._check_open()
        return self._register_and_send(
            "task", "apply_request", {}, md, None, buffers, header, None, None
        )

    def send_execute_request(
        self,
        socket: str,
        code: str,
        silent: bool = True,
        metadata: dict[str, Any] | None = None,
        ident: Any = None,
        message_future_hook: Callable[[MessageFuture], Any] | None = None,
    ) -> MessageFuture:
        """Send an ``execute_request`` with ``code``; ``message_future_hook(future)`` is
        called with its MessageFuture before it is sent (as ipyparallel's)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        content = _execute_content(code, silent)
        uuid = ident.decode() if isinstance(ident, bytes) else ident
        return self._send(
            socket,
            "execute_request",
            content,
            metadata=self._request_metadata(metadata),
            ident=ident.encode() if isinstance(ident, str) else ident,
            engine_uuid=uuid,
            message_future_hook=message_future_hook,
        )

    # ----- public API -----------------------------------------------------------------------

    def spin(self) -> None:
        """Process pending notifications and results now (the dispatcher thread does this
        continuously; this waits until it has taken everything already received)."""
        deadline = time.monotonic() + 1.0
        while self._io.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.001)

    def wait(self, jobs: Any = None, timeout: float = -1) -> bool:
        """Wait for ``jobs`` (msg_ids, AsyncResults, or all outstanding) to finish.

        Returns True when all are done, False on timeout.
        """
        futures = self._futures_for(jobs)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        for fut in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if isinstance(fut, SlimFuture):
                # settled, not just done: AsyncResults over it have seen it finish too
                if not fut.wait_settled(remaining):
                    return False
                continue
            try:
                fut.exception(timeout=remaining)
            except TimeoutError:
                return False
            except Exception:  # noqa: BLE001 - cancelled etc.
                pass
        return True

    def wait_interactive(
        self, jobs: Any = None, interval: float = 1.0, timeout: float | None = -1
    ) -> None:
        """Wait for ``jobs`` (default: everything outstanding) while showing a progress bar
        (see :meth:`AsyncResult.wait_interactive`)."""
        from .asyncresult import AsyncResult

        futures: list[Future] = []
        for fut in self._futures_for(jobs):
            children = getattr(fut, "_children", None)
            futures.extend(children if children is not None else [fut])
        AsyncResult(self, futures, fname="wait").wait_interactive(interval, timeout)

    def spin_thread(self, interval: float = 1) -> None:
        """Deprecated no-op (a background thread always processes replies)."""
        warnings.warn(
            "Client.spin_thread is deprecated and does nothing: replies are always processed "
            "in the background",
            DeprecationWarning,
            stacklevel=2,
        )

    def stop_spin_thread(self) -> None:
        """Deprecated no-op (see :meth:`spin_thread`)."""
        warnings.warn(
            "Client.stop_spin_thread is deprecated and does nothing",
            DeprecationWarning,
            stacklevel=2,
        )

    def _futures_for(self, jobs: Any) -> list[Future]:
        self._flush_pending()
        if jobs is None:
            # outstanding ones, and replies being handled (no longer outstanding, not settled)
            return [f for f in list(self._futures.values()) if not f.settled()]
        out: list[Future] = []
        for job in _as_list(jobs):
            if (
                isinstance(job, Future)
                and not isinstance(job, MessageFuture)
                and hasattr(job, "msg_ids")
            ):
                out.append(job)
            elif isinstance(job, MessageFuture):
                out.append(job)
            elif isinstance(job, int):
                fut = self._futures.get(self.history[job])  # (gone from the cache: finished)
                if fut is not None:
                    out.append(fut)
            elif isinstance(job, str):
                if job in self._futures:
                    out.append(self._futures[job])
            elif hasattr(job, "msg_ids") or isinstance(job, Future):
                # (any other Future too, as ipyparallel: waited for like the others)
                out.append(job)
            else:
                raise TypeError(f"cannot wait for {job!r}: pass msg_ids, AsyncResults or Futures")
        return out

    def wait_for_engines(
        self,
        n: int | None = None,
        timeout: float = -1,
        block: bool = True,
        interactive: bool | None = None,
        widget: bool | None = None,
    ) -> Any:
        """Wait until at least ``n`` engines are registered.

        ``interactive`` (default: in IPython, unless ``$IPP_NONINTERACTIVE``) shows a progress
        bar of the engines (``widget``: as in :meth:`AsyncResult.wait_interactive`). Raises
        ``TimeoutError`` naming the count when the timeout passes.
        """
        if n is None:
            n = 1
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError(
                f"n must be an int (engines to wait for), not {type(n).__name__} {n!r}"
            ) from None
        from .asyncresult import _progress_bar, _timeout

        seconds = _timeout(timeout)  # (None for no limit; TypeError for a non-number)
        deadline = None if seconds is None else time.monotonic() + seconds
        if interactive is None:  # as ipyparallel
            import ferroparallel

            interactive = not ferroparallel._NONINTERACTIVE and ipython_shell() is not None

        def _wait() -> None:
            bar = None
            if interactive and len(self._ids) < n:
                bar = _progress_bar(
                    n,
                    widget,
                    "",
                    unit="engine",
                    initial=len(self._ids),
                    counted="engines registered",
                )
            try:
                while len(self._ids) < n:
                    if bar is not None:  # (drawn without the lock the dispatcher needs)
                        bar.update_to(len(self._ids))
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"{len(self._ids)} engine(s) registered after {timeout:g} s; "
                            f"expected {n}"
                        )
                    with self._engines_changed:
                        if len(self._ids) < n:
                            wait = 0.05 if remaining is None else min(0.05, remaining)
                            self._engines_changed.wait(wait)
                if bar is not None:
                    bar.update_to(len(self._ids))
            finally:
                if bar is not None:
                    bar.close()

        if block:
            _wait()
            return None
        fut: Future = Future()

        def run() -> None:
            try:
                _wait()
                fut.set_result(None)
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        threading.Thread(target=run, daemon=True).start()
        return fut

    def direct_view(self, targets: Any = "all", **kwargs: Any):
        """A DirectView on ``targets`` (``'all'`` follows engines that arrive later)."""
        from .view import DirectView

        if targets is not None and not (isinstance(targets, str) and targets == "all"):
            # resolved now, as ipyparallel does: rc[-1] is the engine that is last today
            if self.ids and _selects_none(targets, self.ids):
                ids = []  # as ipyparallel: an empty view (rc[4:] of 4 engines); using it raises
            else:
                ids = self._build_targets(targets)[1]
            targets = ids[0] if isinstance(targets, int) else ids
        return DirectView(client=self, targets=targets, **kwargs)

    def load_balanced_view(self, targets: Any = None, **kwargs: Any):
        """A LoadBalancedView (optionally restricted to ``targets``). As in ipyparallel, the
        targets are resolved now to a list of engine ids (``-1``: the last engine registered
        now; one engine id is a list of one); ``None`` or ``"all"``: every engine, as they
        come and go."""
        from .view import LoadBalancedView

        if isinstance(targets, str) and targets == "all":
            targets = None
        if targets is not None:
            targets = self._build_targets(targets)[1]
        return LoadBalancedView(client=self, targets=targets, **kwargs)

    def broadcast_view(self, targets: Any = "all", is_coalescing: bool = False, **kwargs: Any):
        """A BroadcastView: each request is sent once and fanned out by the controller. As in
        ipyparallel, ``targets`` are resolved now (``"all"``: the engines registered now)."""
        from .view import BroadcastView

        targets = self._build_targets(targets)[1]
        return BroadcastView(client=self, targets=targets, is_coalescing=is_coalescing, **kwargs)

    def executor(self, targets: Any = None, **kwargs: Any):
        """A ``concurrent.futures.Executor`` running on load-balanced engines."""
        return self.load_balanced_view(targets).executor

    def _msg_ids_of(self, jobs: Any) -> list[str]:
        if jobs is None:
            return list(self.outstanding)
        ids: list[str] = []
        if not isinstance(jobs, Iterable) and not isinstance(jobs, int):
            jobs = [jobs]  # reported below, as one job of the wrong type
        for job in _as_list(jobs):
            if isinstance(job, str):
                ids.append(job)
            elif isinstance(job, int):
                ids.append(self.history[job])
            elif hasattr(job, "msg_ids"):
                ids.extend(job.msg_ids)
            else:
                # ipyparallel's wording
                raise TypeError(f"Expected msg_id, int, or AsyncResult, got {job!r}")
        return ids

    def _send_control(
        self, msg_type: str, content: dict[str, Any], targets: Any, block: bool | None
    ) -> Any:
        from .asyncresult import AsyncResult

        uuids, ids = self._build_targets(targets)
        futs = [
            self._send("control", msg_type, content, ident=u.encode(), engine_uuid=u, record=False)
            for u in uuids
        ]
        ar = AsyncResult(self, futs, fname=msg_type, targets=ids)
        self._own(ar.msg_ids)
        block = self.block if block is None else block
        if block:
            ar.get(timeout=self.timeout if self.timeout > 0 else None)
            return None
        return ar

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> Any:
        """Abort queued tasks (``jobs``: msg_ids or AsyncResults; all outstanding by default).

        Tasks still waiting in the controller's scheduler leave it at once; tasks queued on
        engines are skipped there. Either way they finish with ``TaskAborted``.
        """
        msg_ids = self._msg_ids_of(jobs)
        if msg_ids and "abort" in self._features:
            try:
                self._query("abort_request", {"msg_ids": msg_ids}, what="abort request")
            except error.RemoteError as e:  # an ipyparallel hub does not know this request
                log.debug("hub abort: %s", e)
        if targets is None:
            engine_ids = (
                sorted(
                    {
                        md.get("engine_id")
                        for m in msg_ids
                        if (md := self.metadata.get(m)) is not None
                        and md.get("engine_id") is not None
                    }
                )
                or self.ids
            )
        else:
            engine_ids = targets
        if isinstance(engine_ids, (list, tuple, range)) and not engine_ids:
            return None  # no engine to ask (engine 0 is a target, not "none")
        return self._send_control("abort_request", {"msg_ids": msg_ids}, engine_ids, block)

    def clear(self, targets: Any = None, block: bool | None = None) -> Any:
        """Clear the engines' namespaces."""
        return self._send_control("clear_request", {}, targets, block)

    def send_signal(self, sig: int | str, targets: Any = None, block: bool | None = None) -> Any:
        """Send a signal (e.g. ``signal.SIGINT`` to interrupt running code) to engines."""
        number = parse_signal(sig)  # ValueError naming an unknown signal, before sending
        if not isinstance(sig, str):
            sig = number  # a name travels as given (engines read it on their own platform)
        return self._send_control("signal_request", {"sig": sig}, targets, block)

    def become_dask(
        self,
        targets: Any = "all",
        port: int = 0,
        nanny: bool = False,
        scheduler_args: dict[str, Any] | None = None,
        **worker_args: Any,
    ) -> Any:
        """Turn the engines into a dask.distributed cluster and return a dask Client for it.

        A dask scheduler starts on a thread of this process (once; later calls add workers to
        it), and each engine in ``targets`` starts a dask Worker on a thread of its own, so it
        keeps serving ferroparallel requests too. Needs ``dask[distributed]`` here and on the
        engines, and engines that can reach this host.

        Parameters
        ----------
        targets : int, list of int, slice or 'all'
            The engines that become workers.
        port : int
            The scheduler's port (0: any free port).
        nanny : bool
            Start each worker under a dask Nanny (a separate process that restarts it).
        scheduler_args : dict, optional
            Keyword arguments of ``distributed.Scheduler``.
        **worker_args
            Keyword arguments of ``distributed.Worker`` (default ``nthreads=1``).

        Returns
        -------
        distributed.Client
            Connected to the scheduler, once every new worker has joined it.
        """
        from ..dask_support import DaskBridge, import_distributed, start_worker

        distributed = import_distributed()
        self._check_open()
        _, ids = self._build_targets(targets)
        bridge = getattr(self, "_dask", None)
        if bridge is None:
            bridge = self._dask = DaskBridge(self._controller_url)
        address = bridge.ensure_scheduler(port, scheduler_args)
        view = self.direct_view(ids)
        args = bridge.worker_args(worker_args)
        view.apply_async(start_worker, address, nanny, args).get(timeout=self._dask_timeout)
        dask_client = distributed.Client(address, timeout=self._dask_timeout)
        dask_client.wait_for_workers(len(ids), timeout=self._dask_timeout)
        return dask_client

    become_distributed = become_dask

    def stop_dask(self, targets: Any = "all") -> None:
        """Stop the dask workers of ``targets`` (see :meth:`become_dask`); with ``'all'``, the
        scheduler too."""
        from ..dask_support import stop_worker

        bridge = getattr(self, "_dask", None)
        if bridge is None:
            return
        _, ids = self._build_targets(targets)
        self.direct_view(ids).apply_async(stop_worker).get(timeout=self._dask_timeout)
        if targets == "all" or targets is None:
            bridge.stop_scheduler()

    stop_distributed = stop_dask

    #: Seconds become_dask/stop_dask wait for the workers.
    _dask_timeout = 60.0

    def shutdown(
        self,
        targets: Any = "all",
        restart: bool = False,
        hub: bool = False,
        block: bool | None = None,
    ) -> None:
        """Shut down engines (and the controller with ``hub=True``)."""
        if restart:
            raise NotImplementedError("restarting engines is done with Cluster.restart_engines()")
        if self._ids:
            ar = self._send_control("shutdown_request", {"restart": False}, targets, False)
            if block is None or block or hub:
                try:
                    ar.get(timeout=self.timeout)
                except Exception as e:  # noqa: BLE001 - engines may die before replying
                    log.debug("engine shutdown: %s", e)
        if hub:
            try:
                self._query("shutdown_request", {}, what="shutdown request")
            except error.EngineError:
                # the shutdown notification overtook the reply (they travel on different
                # sockets) and failed the pending query: the controller is stopping, as asked
                pass
            finally:
                self._hub_shutdown = True

    def queue_status(self, targets: Any = "all", verbose: bool = False) -> dict[Any, Any]:
        """Queue counts per engine (and ``unassigned`` tasks), from the controller."""
        if targets == "all" or targets is None:
            tlist = None
        else:
            tlist = self._build_targets(targets)[1]
        content = self._query("queue_request", {"targets": tlist, "verbose": verbose})
        content.pop("status", None)
        out: dict[Any, Any] = {}
        if "unassigned" in content:  # first, as in ipyparallel's dict
            out["unassigned"] = content.pop("unassigned")
        for k, v in content.items():
            try:
                out[int(k)] = v
            except ValueError:
                out[k] = v
        if isinstance(targets, int) and targets in out:
            return out[targets]
        return out

    # ----- hub task records (see ferroparallel.client.hub) ---------------------------------

    def db_query(self, query: dict[str, Any], keys: Sequence[str] | None = None) -> list[dict]:
        """Task records from the hub matching a mongo-style ``query``.

        Parameters
        ----------
        query : dict
            ``{field: value}`` (equality; ``None`` matches a missing value) or
            ``{field: {"$op": value}}`` with ``$lt $lte $gt $gte $eq $ne $in $nin $exists $all
            $mod $glob``; dates may be ``datetime`` objects (naive ones are UTC) or ISO strings.
        keys : list of str, optional
            Fields to return (``msg_id`` is always included). Default: every field except
            ``buffers`` and ``result_buffers``.

        Returns
        -------
        list of dict
            One dict per record, oldest first; dates are tz-aware datetimes.

        Raises
        ------
        RemoteError
            A malformed query, an unknown operator or field (``ename`` says which).
        """
        from . import hub

        return hub.db_query(self, query, keys)

    def hub_history(self) -> list[str]:
        """Every msg_id in the hub's task records, ordered by submission time."""
        from . import hub

        return hub.hub_history(self)

    def result_status(self, msg_ids: Any, status_only: bool = True) -> dict[str, Any]:
        """``{"pending": [...], "completed": [...]}`` for ``msg_ids`` (msg_ids, history indices
        or AsyncResults) from the hub; with ``status_only=False`` completed results are also
        fetched (into ``self.results`` and the returned dict)."""
        from . import hub

        return hub.result_status(self, self._msg_ids_of(msg_ids), status_only)

    def resubmit(
        self,
        indices_or_msg_ids: Any = None,
        metadata: dict[str, Any] | None = None,
        block: bool | None = None,
    ):
        """Run tasks again under new msg_ids, finished or still pending (as ipyparallel's
        hub: the original completes too); direct tasks on the same engine, load-balanced ones
        through the scheduler.

        Returns
        -------
        AsyncHubResult
            Over the new msg_ids (results are fetched from the hub's records).
        """
        from . import hub

        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        _, ar = hub.resubmit(self, self._msg_ids_of(indices_or_msg_ids))
        if self.block if block is None else block:
            ar.wait()
        return ar

    def purge_hub_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Drop finished task records from the hub: ``jobs`` (msg_ids, indices, AsyncResults or
        ``'all'``) and/or every finished record of the engines ``targets``. Pending tasks are
        refused with an error naming them."""
        from . import hub

        if not _named(jobs) and not _named(targets):
            raise ValueError("purge_hub_results needs jobs (or 'all') and/or targets")
        msg_ids: Any = "all" if jobs == "all" else (self._msg_ids_of(jobs) if _named(jobs) else [])
        engines: list[Any] = []
        if _named(targets):  # (engine 0 too)
            tlist = self.ids if targets == "all" else _as_list(targets)
            engines = [self._engines.get(t, t) if isinstance(t, int) else t for t in tlist]
        hub.purge_hub(self, msg_ids, engines)

    def purge_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """:meth:`purge_local_results` and :meth:`purge_hub_results`, with the same arguments
        (as ipyparallel's): ``targets`` forgets those engines' results here and in the hub."""
        if not _named(jobs) and not _named(targets):
            raise ValueError("purge_results needs jobs (or 'all') and/or targets")
        self.purge_local_results(jobs, targets)
        self.purge_hub_results(jobs, targets)

    def purge_everything(self) -> None:
        """Drop every finished result, here and in the hub, and clear the history."""
        self.purge_results("all")
        self.history = []

    def get_result(
        self, indices_or_msg_ids: Any = None, block: bool | None = None, owner: bool = True
    ):
        """An AsyncResult for earlier requests (msg_ids, history indices or AsyncResults).

        As ipyparallel's: what this client holds gives a plain AsyncResult over its futures,
        with no request to the hub: a msg_id (or history index) still in its caches (pending,
        or finished and not yet taken by an owning AsyncResult), and an AsyncResult this
        client made (not an AsyncHubResult), even once its results left the caches. Anything
        else (submitted by another client, or purged with :meth:`purge_local_results`) is
        fetched from the hub's task records: the result is then an AsyncHubResult. A msg_id
        the hub does not know fails it: its ``get`` raises the hub's RemoteError (as does
        this call when it blocks). With ``owner`` (the default, as ipyparallel's) the
        AsyncResult takes the results out of the client's caches.
        """
        from . import hub
        from .asyncresult import AsyncResult

        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        # one msg_id or index (or a single-result AsyncResult) gives one value; a list a list
        single = isinstance(indices_or_msg_ids, (str, int)) or bool(
            getattr(indices_or_msg_ids, "_single_result", False)
        )
        msg_ids = self._msg_ids_of(indices_or_msg_ids)
        self._flush_pending()
        futs = self._held_futures(indices_or_msg_ids)
        if futs is None:
            foreign = [m for m in msg_ids if m not in self._futures]
            try:  # as ipyparallel: finished results are ready at once (ready(), get(0))
                hub.fetch_finished(self, foreign)
            except error.RemoteError as exc:
                if self.block if block is None else block:
                    raise  # as ipyparallel: waiting for the result raises the hub's error
                # as ipyparallel: an unknown msg_id fails the AsyncHubResult, not this call
                ar = hub.failed_hub_result(self, msg_ids, exc, "get_result", owner, single)
            else:
                ar = hub.async_hub_result(self, msg_ids, "get_result", owner, single)
        else:
            ar = AsyncResult(self, futs, fname="get_result", owner=owner, single_result=single)
        if owner:  # the client's copies go once the results are in (as ipyparallel)
            self._own(ar.msg_ids)
        if self.block if block is None else block:
            ar.wait()
        return ar

    def _held_futures(self, jobs: Any) -> list[Any] | None:
        """The futures :meth:`get_result` answers ``jobs`` with without the hub, or None when
        one job is not held here: a msg_id or history index must be in ``_futures``; an
        AsyncResult of this client gives its own futures (an AsyncHubResult never does: its
        results are asked of the hub again, as ipyparallel's)."""
        from .asyncresult import AsyncHubResult

        futs: list[Any] = []
        for job in _as_list(jobs):
            if isinstance(job, AsyncHubResult):
                return None
            if hasattr(job, "msg_ids") and getattr(job, "_client", None) is self:
                futs.extend(job._children)
                continue
            ids = self._msg_ids_of(job)
            held = [self._futures.get(m) for m in ids]
            if any(f is None for f in held):
                return None
            futs.extend(held)
        return futs

    def purge_local_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget finished results held by this client: ``jobs`` (msg_ids, history indices,
        AsyncResults, or ``'all'``) and/or the results of the engines ``targets``.

        Raises
        ------
        ValueError
            Neither jobs nor targets given (as ipyparallel).
        RuntimeError
            One of them is still pending.
        """
        if not _named(jobs) and not _named(targets):
            raise ValueError("Must specify at least one of `targets` and `jobs` ('all': every one)")
        self._flush_pending()
        with self._lock:  # the dispatcher thread changes the caches under this lock
            if isinstance(jobs, str) and jobs == "all":
                # as ipyparallel: nothing is purged while anything is still outstanding
                pending = [m for m, f in self._futures.items() if not f.done()]
                if pending:
                    raise RuntimeError(
                        f"cannot purge all results: {len(pending)} still pending "
                        f"(e.g. {pending[0]})"
                    )
                ids = list(self._futures)
            else:
                ids = self._msg_ids_of(jobs) if _named(jobs) else []
                if _named(targets):
                    engines = set(self._build_targets(targets)[1])
                    mds = self._trait_values["metadata"]
                    ids += [m for m in self._futures if mds.get(m, {}).get("engine_id") in engines]
            for m in ids:
                fut = self._futures.get(m)
                if fut is not None and not fut.done():
                    raise RuntimeError(f"cannot purge {m}: it is still pending")
                self._futures.pop(m, None)
                self.results.pop(m, None)
                self.metadata.pop(m, None)

    def close(self, linger: float | None = None) -> None:
        """Stop the I/O and dispatcher threads and close every socket. Idempotent."""
        if getattr(self, "_closed", True):
            return
        shm = getattr(self, "_shm", None)
        if shm is not None:
            # Give requests already sent a moment to be mapped by their engines.
            shm.wait_released(1.0 if linger is None else linger)
        bridge = getattr(self, "_dask", None)
        if bridge is not None:  # the scheduler runs in this process
            try:
                bridge.stop_scheduler()
            except Exception as e:  # noqa: BLE001 - closing goes on
                log.warning("could not stop the dask scheduler: %s", e)
        self._closed = True
        self._io.close()
        t = getattr(self, "_dispatcher", None)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        net = getattr(self, "_net", None)
        if net is not None:
            net.close()  # (first: wakes probes still fetching, which shm.close joins)
            fetches = getattr(self, "_net_fetches", None)
            if fetches is not None:
                fetches.close(timeout=5)
        if shm is not None:
            shm.close()
        self._close_tunnels()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._ids)} engines"
        return f"<Client {self._controller_url} ({state})>"


def _selects_none(targets: Any, ids: list[int]) -> bool:
    """Whether ``targets`` (a slice, or an empty list/tuple/range) selects none of ``ids``."""
    if isinstance(targets, slice):
        return not ids[targets]
    return isinstance(targets, list | tuple | range) and len(targets) == 0
