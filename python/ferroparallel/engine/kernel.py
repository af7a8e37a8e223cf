"""The engine: sockets, registration, the message loop and shell request dispatch."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from .. import curve as _curve
from ..error import IoClosedError
from ..serialize.netloan import NetData
from ..serialize.shm import sweep as sweep_segments
from . import logs
from .capture import StreamCapture
from .connection import EngineUrls, data_url
from .control import URGENT, AbortSet, ControlHandler
from .fdcapture import FdCapture
from .inbox import (
    BROADCAST,
    CONTROL,
    IOPUB,
    REGISTRATION,
    SHELL,
    BusyWatcher,
    Inbox,
    parent_of,
)
from .liveness import Liveness
from .namespace import UserNamespace
from .results_shm import ResultSegments
from .shell import ShellHandler
from .signals import EngineExit, InterruptGate, install_handlers
from .startup import Startup

log = logging.getLogger(__name__)

# Why a controller whose sockets we are connected to does not answer the registration request.
_SILENT_CONTROLLER = (
    "; the controller's sockets are connected but it did not answer: the key in the connection "
    "file is probably not its key (a controller drops messages signed with another key unread), "
    "e.g. a connection file of an earlier controller run"
)

#: Exit statuses of :meth:`EngineKernel.run`.
EXIT_OK = 0
EXIT_FAILED = 1  # could not start or register
EXIT_CONTROLLER_LOST = 3  # no heartbeat for max_missed_pings checks

#: Heartbeat period assumed when the registration reply has none (ms).
DEFAULT_HB_PERIOD_MS = 3000
#: Most replies held back at once (see ``EngineKernel.hold_reply``).
HOLD_CAP = 16
#: Longest wait (s) for earlier replies sent from user memory before a request runs
#: (:meth:`EngineKernel.wait_sent`).
SENT_WAIT_LIMIT = 30.0
#: Seconds an engine stopped while registering waits for the reply (to unregister).
REGISTRATION_GRACE = 1.0
#: How long an engine waits for the controller's welcome on its engine link.
LINK_TIMEOUT = 5.0


@dataclass
class EngineConfig:
    """Engine options (the command-line flags).

    Attributes
    ----------
    requested_id : int or None
        Engine id to ask the controller for.
    timeout : float
        Seconds to wait for the registration reply.
    max_missed_pings : int
        Checks (one per heartbeat period + 0.5 s) without a ping before the engine exits
        (0: never); 50 as in ipyparallel.
    use_ipython : bool
        Run ``execute_request`` with IPython when it is importable.
    startup : Startup
        Code to run in the user namespace once registered (``IPEngine.startup_script`` /
        ``startup_command`` of the profile's config files).
    shell_config : traitlets.config.Config or None
        Settings of the IPython shell (``InteractiveShell.colors``, ...; see
        :data:`~.startup.SHELL_SECTIONS`), None for IPython's defaults.
    """

    requested_id: int | None = None
    timeout: float = 10.0
    max_missed_pings: int = 50
    use_ipython: bool = True
    startup: Startup = field(default_factory=Startup)
    shell_config: Any = None


#: The engine this process runs (None outside an engine), for code that runs on it
#: (see :mod:`ferroparallel.datapub`).
_ACTIVE: EngineKernel | None = None


def active_kernel() -> EngineKernel | None:
    """The engine running in this process, or None."""
    return _ACTIVE


class EngineKernel:
    """One engine process.

    Parameters
    ----------
    info : dict
        Validated engine connection info (``key``, ``pack``, ``signature_scheme`` are used).
    urls : EngineUrls
        Where each channel is.
    config : EngineConfig
        Options.

    Raises
    ------
    ferroparallel.error.WireConfigError
        Unsupported packer or signature scheme.
    """

    def __init__(self, info: dict[str, Any], urls: EngineUrls, config: EngineConfig) -> None:
        self.config = config
        self.urls = urls
        # CurveZMQ: the controller's public key from the connection info, and one fresh key
        # pair of this engine for all of its sockets.
        self.curve_options = _curve.client_socket_options(info.get("curve_serverkey") or None)
        self.session = _core.Session(
            str(info.get("key", "")).encode(),
            packer=str(info.get("pack", "msgpack")),
            signature_scheme=str(info.get("signature_scheme", "hmac-sha256")),
        )
        self.uuid: str = self.session.session
        self.engine_id: int | None = None
        self._registration_sent = False
        self.hb_period = DEFAULT_HB_PERIOD_MS / 1000
        self.io = _core.IoThread(self.session, name="ferroparallel-engine-io")
        # shell, control, broadcast: polled and answered by the main thread itself
        self.direct = _core.DirectSockets(self.session)
        self.inbox = Inbox(self.io, self.direct)
        self.aborted = AbortSet()
        self.control = ControlHandler(self)
        self.shell = ShellHandler(self)
        self.gate = InterruptGate()
        self.namespace = UserNamespace()
        self.capture = StreamCapture(self._publish_stream)
        #: output of subprocesses and C code (descriptors 1 and 2), redirected while serving
        self.fd_capture = FdCapture(self.capture)
        self.capture.before_stop = self.fd_capture.drain
        self.capture.sync = self.fd_capture.sync
        # the direct data path: large arguments fetched from waiting clients, large results
        # lent to them (not with CurveZMQ: the data channel is not encrypted)
        self.net = NetData(
            self.session.key,
            self.session.packer,
            data_url(info, urls),
            enabled=not self.curve_options,
        )
        self.result_segments = ResultSegments(self.net)
        self.watcher = BusyWatcher(self.inbox, self.direct, self._busy_tick)
        self.hold_replies = os.environ.get("FERROPARALLEL_HOLD_REPLIES", "1") != "0"
        self.liveness: Liveness | None = None
        self.exit_code: int | None = None
        self._metadata = {"engine": self.uuid}
        self._topic_prefix = "engine.?."
        #: IOPub output messages (everything but status) published since the current shell
        #: request started; the reply carries the count (``OUTPUT_COUNT_KEY``)
        self.published = 0
        self._control_lock = threading.Lock()
        self._last_error_check = 0.0

    # -- set-up -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Create every socket (heartbeat first, so the controller sees pongs as soon as it
        has registered us; shell/control/iopub too, so they are connected before the
        controller routes anything here)."""
        ident = self.uuid.encode()
        urls = self.urls
        io = self.io
        cv = self.curve_options
        io.add_socket("hb_pong", "DEALER", connect=[urls.hb_pong], identity=ident, **cv)
        io.add_socket(
            "hb_ping",
            "SUB",
            connect=[urls.hb_ping],
            subscribe=[b""],
            raw=True,
            forward_to="hb_pong",
            **cv,
        )
        io.add_socket(REGISTRATION, "DEALER", connect=[urls.registration], identity=ident, **cv)
        direct = self.direct
        direct.add_socket(SHELL, "ROUTER", connect=[urls.mux, urls.task], identity=ident, **cv)
        direct.add_socket(CONTROL, "ROUTER", connect=[urls.control], identity=ident, **cv)
        if urls.link and not cv:
            # before registering: from its registration on, the controller sends this
            # engine's MUX and task traffic over the link (decision 0017)
            try:
                direct.add_link(SHELL, urls.link, self.uuid, LINK_TIMEOUT)
                log.debug("engine link to %s open", urls.link)
            except ValueError as e:
                log.info("no engine link (%s): the shell traffic goes through ZMQ", e)
        if urls.broadcast:
            # Every leaf, now: the one that serves this engine (id mod leaves, ipyparallel's
            # rule) is only known after registration, and the controller may broadcast to us
            # as soon as it has registered us. The other leaves never route to us.
            direct.add_socket(
                BROADCAST, "ROUTER", connect=list(urls.broadcast), identity=ident, **cv
            )
        io.add_socket(IOPUB, "PUB", connect=[urls.iopub], identity=ident, **cv)

    def register(self) -> bool:
        """Send ``registration_request`` and wait for the reply.

        Returns
        -------
        bool
            True when registered (``engine_id`` and ``hb_period`` set).
        """
        deadline = time.monotonic() + self.config.timeout
        # Register only once the shell and control connections are up: the controller routes
        # requests to us as soon as it has registered us, and drops what it cannot route.
        if not self.direct.wait_connected(self.config.timeout):
            log.error(
                "could not connect to the controller's shell/control channels (%s, %s) within "
                "%.1f s%s",
                self.urls.mux,
                self.urls.control,
                self.config.timeout,
                _curve.describe_handshake_failures(
                    self.io.handshake_failures() + self.direct.handshake_failures(),
                    curve=bool(self.curve_options),
                ),
            )
            return False
        content: dict[str, Any] = {"uuid": self.uuid}
        if self.config.requested_id is not None:
            content["id"] = self.config.requested_id
        self.io.send(REGISTRATION, "registration_request", content, metadata=self._metadata)
        self._registration_sent = True
        log.info("registering %s at %s", self.uuid, self.urls.registration)
        while True:
            while self.inbox.other:
                name, msg = self.inbox.other.popleft()
                if name == REGISTRATION and msg["header"].get("msg_type") == "registration_reply":
                    return self._registered(msg["content"])
                log.debug("ignoring %s message before registration", name)
            left = deadline - time.monotonic()
            if left <= 0:
                failures = self.io.handshake_failures() + self.direct.handshake_failures()
                log.error(
                    "no registration reply from %s within %.1f s%s",
                    self.urls.registration,
                    self.config.timeout,
                    _curve.describe_handshake_failures(failures, curve=bool(self.curve_options))
                    or _SILENT_CONTROLLER,
                )
                return False
            self.inbox.pull_other(min(left, 0.1))

    def _registered(self, content: dict[str, Any]) -> bool:
        if content.get("status") != "ok" or not isinstance(content.get("id"), int):
            log.error(
                "registration refused: %s: %s",
                content.get("ename", "error"),
                content.get("evalue", content),
            )
            return False
        self.engine_id = int(content["id"])
        period_ms = content.get("hb_period") or DEFAULT_HB_PERIOD_MS
        self.hb_period = max(float(period_ms), 1.0) / 1000
        self._topic_prefix = f"engine.{self.engine_id}."
        logs.set_engine_id(self.engine_id)
        log.info("registered as engine %d (heartbeat every %g ms)", self.engine_id, period_ms)
        return True

    # -- running ----------------------------------------------------------------------------

    def run(self) -> int:
        """Connect, register and serve until shutdown.

        Returns
        -------
        int
            :data:`EXIT_OK` after ``shutdown_request`` or SIGTERM, :data:`EXIT_FAILED` when
            registration failed, :data:`EXIT_CONTROLLER_LOST` when heartbeats stopped.
        """
        global _ACTIVE
        restore = install_handlers(self.gate)
        code = EXIT_FAILED
        _ACTIVE = self
        try:
            sweep_segments()  # /dev/shm segments left by crashed clients (see serialize.shm)
            self.connect()
            if not self.register():
                return EXIT_FAILED
            self.config.startup.run(self.namespace.ns)
            self.liveness = Liveness(self.io, self.hb_period, self.config.max_missed_pings)
            self.liveness.sample()
            self.watcher.start()
            self.fd_capture.start()
            code = self.serve()
        except EngineExit:
            log.info("SIGTERM received: stopping")
            code = EXIT_OK
        except Exception:
            log.exception("engine failed")
            code = EXIT_FAILED
        finally:
            _ACTIVE = None
            self.fd_capture.stop()
            self._finish()
            self.result_segments.release_all()
            self.net.close()  # wakes probe answers still fetching
            for answering in self.control.net_probes:
                answering.join(timeout=5)
            if restore is not None:
                restore()
        return code

    def serve(self) -> int:
        """The message loop: control first, then one shell request at a time."""
        poll = min(max(self.hb_period / 2, 0.01), 0.5)
        next_check = 0.0
        inbox = self.inbox
        while self.exit_code is None:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + poll
                self._maintain(now)
                if self.exit_code is not None:
                    break
            if inbox.control:
                self.send_held()  # replies leave in the order they were made
                self._run_control(urgent_only=False)
            elif inbox.shell:
                self.shell.handle(inbox.shell.popleft())
                if inbox.shell:
                    inbox.pull(0)  # control requests that came meanwhile jump the queue
            else:
                self.send_held()
                inbox.pull(poll)
        return self.exit_code

    def hold_reply(self) -> bool:
        """Whether the reply being sent may be held back: more requests are queued behind it
        (their replies follow soon), so they leave together (decision 0010). Held replies
        leave when the queue runs empty, before control requests, at :data:`HOLD_CAP`, and
        from the watcher thread once a request has run for its grace period."""
        return self.hold_replies and bool(self.inbox.shell) and self.direct.held < HOLD_CAP

    def wait_sent(self, limit: float = SENT_WAIT_LIMIT) -> None:
        """Wait until libzmq has sent the buffers of earlier replies that go out from their
        objects' own memory (large results: a pulled array is the user's namespace object), so
        that the request about to run cannot change them mid-send. A reply normally leaves in
        the time its bytes take to reach the socket; after ``limit`` seconds (a controller
        that does not read) the request runs anyway, and a reply whose buffers then change
        reaches its client as an error, not silently altered data."""
        direct = self.direct
        if not direct.sending:
            return
        deadline = time.monotonic() + limit
        pause = 0.0002
        while direct.sending and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        if direct.sending:
            log.warning("replies still being sent after %g s; running the next request", limit)

    def send_held(self) -> None:
        """Send the replies held back by :meth:`hold_reply` (any thread)."""
        if self.direct.held:
            try:
                self.direct.send_held()
            except Exception:  # noqa: BLE001 - a peer gone; the rest of the engine goes on
                log.warning("could not send held replies", exc_info=True)

    def request_exit(self, code: int) -> None:
        """Leave the message loop with ``code`` after the current message."""
        if self.exit_code is None:
            self.exit_code = code

    def _maintain(self, now: float) -> None:
        if self.liveness is not None and not self.liveness.alive():
            log.error(
                "no heartbeat from the controller for %.1f s (%d periods of %g ms): exiting",
                self.liveness.limit,
                self.liveness.max_missed,
                self.hb_period * 1000,
            )
            self.request_exit(EXIT_CONTROLLER_LOST)
            return
        if self.direct.link == "lost":
            log.error("the engine link to the controller closed: exiting")
            self.request_exit(EXIT_CONTROLLER_LOST)
            return
        while self.inbox.other:
            name, _ = self.inbox.other.popleft()
            log.debug("ignoring a message on %s", name)
        if now - self._last_error_check >= 1.0:
            self._last_error_check = now
            for socket, kind, text in [*self.io.take_errors(), *self.direct.take_errors()]:
                log.warning("dropped a message on %s: %s: %s", socket, kind, text)

    def _finish(self) -> None:
        if self.watcher.is_alive():
            self.watcher.stop()
        engine_id = self.engine_id
        if engine_id is None and self._registration_sent and not self.io.closed:
            # stopped while registering: the controller may have registered us already (and
            # told its clients), so learn our id and unregister rather than leave a dead
            # engine listed until the heartbeat notices
            engine_id = self._late_registration_id(REGISTRATION_GRACE)
        if engine_id is not None and not self.io.closed:
            try:
                self.io.send(
                    REGISTRATION,
                    "unregistration_request",
                    {"id": engine_id},
                    metadata=self._metadata,
                )
            except Exception:
                log.debug("could not send unregistration_request", exc_info=True)
        self.direct.close()
        self.io.close()
        if self.watcher.is_alive():
            self.watcher.join(timeout=1.0)

    def _late_registration_id(self, timeout: float) -> int | None:
        """The id of a registration reply that arrives within ``timeout`` seconds (or came
        already), for an engine stopping before it had read it; None if none does."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                while self.inbox.other:
                    name, msg = self.inbox.other.popleft()
                    if (
                        name == REGISTRATION
                        and (msg.get("header") or {}).get("msg_type") == "registration_reply"
                    ):
                        content = msg.get("content") or {}
                        engine_id = content.get("id")
                        ok = content.get("status") == "ok" and isinstance(engine_id, int)
                        return engine_id if ok else None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.inbox.pull_other(min(left, 0.1))
        except (EngineExit, IoClosedError):  # SIGTERM again, or the sockets are gone
            return None

    def _busy_tick(self) -> None:
        """Watcher thread, while a long request runs: live output, liveness, urgent control."""
        self.capture.flush_due()
        self.send_held()  # replies of the requests before this long one
        if self.liveness is not None:
            self.liveness.sample()
        if self.inbox.control:
            self._run_control(urgent_only=True)

    def _run_control(self, urgent_only: bool) -> None:
        queue = self.inbox.control
        with self._control_lock:
            if not urgent_only:
                if queue:
                    self.control.handle(queue.popleft())
                return
            keep = []
            for _ in range(len(queue)):
                msg = queue.popleft()
                if msg["header"].get("msg_type") in URGENT:
                    self.control.handle(msg)
                else:
                    keep.append(msg)
            queue.extendleft(reversed(keep))

    # -- sending ----------------------------------------------------------------------------

    def engine_info(self, method: str) -> dict[str, Any]:
        """``engine_info`` of error contents."""
        return {"engine_uuid": self.uuid, "engine_id": self.engine_id, "method": method}

    def publish(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: dict[str, Any] | bytes | None,
        topic: str,
        buffers: list[Any] | None = None,
        prefixed: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Send one IOPub message with topic ``engine.<id>.<topic>`` (ipyparallel's), or
        ``topic`` as it is when not ``prefixed``; ``metadata`` adds to the engine's. ``parent``
        is a header dict, or a header as received (see :func:`.inbox.parent_of`)."""
        if topic not in ("stdout", "stderr", "status"):
            # text printed before a display, result or error goes out before it
            self.capture.flush()
        ident = (self._topic_prefix + topic if prefixed else topic).encode()
        if topic != "status":
            self.published += 1  # (the outputs the reply counts: OUTPUT_COUNT_KEY)
        self.io.send(
            IOPUB,
            msg_type,
            content,
            parent,
            self._metadata if metadata is None else {**self._metadata, **metadata},
            ident=[ident],
            buffers=buffers,
        )

    def _publish_stream(self, name: str, text: str, parent: dict[str, Any]) -> None:
        try:
            self.publish("stream", {"name": name, "text": text}, parent, name)
        except IoClosedError:
            pass

    def send_control(self, request: dict[str, Any], msg_type: str, content: dict[str, Any]) -> None:
        """Reply on the control channel to the sender of ``request``."""
        metadata = dict(self._metadata)
        metadata["status"] = content.get("status", "ok")
        self.direct.send(
            CONTROL, msg_type, content, parent_of(request), metadata, ident=request["idents"]
        )

    def queued_shell_ids(self, msg_type: str | None = None) -> list[str]:
        """msg_ids of the queued shell requests (of ``msg_type`` if given)."""
        return [
            m["header"].get("msg_id", "")
            for m in list(self.inbox.shell)
            if msg_type is None or m["header"].get("msg_type") == msg_type
        ]

    def reset_namespace(self) -> None:
        """``clear_request``: drop every user name (builtins stay)."""
        self.shell.reset_namespace()
