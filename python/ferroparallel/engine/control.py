"""The control channel: abort, clear, shutdown, signal (and kernel_info, interrupt).

Control requests are handled before queued shell requests. ``abort_request``,
``signal_request``, ``interrupt_request`` and ``kernel_info_request`` are *urgent*: they are
also handled while a long shell request runs (by the watcher thread), so a client can
interrupt running code or abort what is queued behind it.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import _core
from ..error import IoClosedError
from ..serialize import shm
from ..serialize.netloan import answer_probe as answer_net_probe
from ..serialize.peer import answer_probe, lend_probe
from ..serialize.peer import enabled_by_env as peer_enabled
from ..signal_names import parse_signal
from ..wire_names import NO_STATUS_KEY
from .errors import ErrorInfo
from .inbox import parent_of
from .signals import signal_self

if TYPE_CHECKING:
    from .kernel import EngineKernel

log = logging.getLogger(__name__)

#: Control requests also handled while a shell request runs (a shutdown then stops the
#: running request, as an ipykernel-based engine does).
URGENT = frozenset(
    {
        "abort_request",
        "signal_request",
        "interrupt_request",
        "kernel_info_request",
        "shutdown_request",
    }
)


class AbortSet:
    """msg_ids of shell requests to answer with ``status: aborted`` (thread-safe, bounded).

    Parameters
    ----------
    capacity : int
        Most ids remembered; the oldest are forgotten first.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        # msg_id -> False (marked) or True (already answered by another thread: skip it)
        self._ids: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def add(self, msg_ids: Iterable[str]) -> None:
        """Mark ``msg_ids``."""
        with self._lock:
            for msg_id in msg_ids:
                key = str(msg_id)
                self._ids[key] = self._ids.get(key, False)
                self._ids.move_to_end(key)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def take(self, msg_id: str) -> str | None:
        """What the thread about to run ``msg_id`` must do (and forget it): ``"abort"`` (answer
        it as aborted), ``"skip"`` (another thread already did), or None (run it)."""
        if not self._ids:
            return None
        with self._lock:
            answered = self._ids.pop(msg_id, None)
        if answered is None:
            return None
        return "skip" if answered else "abort"

    def claim(self, msg_id: str) -> bool:
        """For a thread other than the one running requests: True if ``msg_id`` is marked and
        not taken yet; it is then this thread's to answer (the runner will skip it)."""
        with self._lock:
            if self._ids.get(msg_id) is False:
                self._ids[msg_id] = True
                return True
            return False

    def __len__(self) -> int:
        return len(self._ids)


def kernel_info_content() -> dict[str, Any]:
    """Content of a ``kernel_info_reply``."""
    return {
        "status": "ok",
        "protocol_version": _core.PROTOCOL_VERSION,
        "implementation": "ferroparallel",
        "implementation_version": _core.__version__,
        "language_info": {
            "name": "python",
            "version": platform.python_version(),
            "mimetype": "text/x-python",
            "file_extension": ".py",
            "pygments_lexer": "ipython3",
            "codemirror_mode": {"name": "ipython", "version": 3},
            "nbconvert_exporter": "python",
        },
        "banner": f"ferroparallel engine {_core.__version__}",
        "help_links": [],
        # Clients on the same host (equal token) send large arguments through /dev/shm.
        "ferroparallel": {"host": shm.host_token()},
    }


class ControlHandler:
    """Answers control requests for one engine.

    Parameters
    ----------
    kernel : EngineKernel
        The engine (its I/O thread, queues and namespace).
    """

    def __init__(self, kernel: EngineKernel) -> None:
        self.kernel = kernel
        #: threads answering direct-data probes (joined when the engine stops)
        self.net_probes: list[threading.Thread] = []

    def handle(self, msg: dict[str, Any]) -> None:
        """Dispatch one control message; failures become error replies.

        As ipykernel does for control requests, the engine publishes ``status`` busy/idle
        around each one (parent = the request) unless its metadata holds ``fp_no_status``;
        ``signal_request`` has none (ipyparallel's nanny answers it, not the kernel).
        """
        msg_type = msg["header"].get("msg_type", "")
        if not msg_type.endswith("_request"):
            log.debug("ignoring control message of type %r", msg_type)
            return
        status = msg_type != "signal_request" and not (msg.get("metadata") or {}).get(NO_STATUS_KEY)
        if status:
            self._status(msg, "busy")
        try:
            self._dispatch(msg, msg_type)
        finally:
            if status:
                self._status(msg, "idle")

    def _status(self, msg: dict[str, Any], state: str) -> None:
        try:
            self.kernel.publish("status", {"execution_state": state}, parent_of(msg), "status")
        except IoClosedError:  # shutting down
            pass

    def _dispatch(self, msg: dict[str, Any], msg_type: str) -> None:
        handler = getattr(self, "do_" + msg_type.removesuffix("_request"), None)
        try:
            if handler is None:
                raise NotImplementedError(f"{msg_type} is not supported by ferroparallel engines")
            handler(msg)
        except Exception as exc:
            if handler is not None:
                log.exception("control request %s failed", msg_type)
            method = msg_type.removesuffix("_request")
            info = ErrorInfo.from_exception(exc, with_traceback=handler is not None)
            self.reply(msg, info.content(self.kernel.engine_info(method)))

    def reply(self, msg: dict[str, Any], content: dict[str, Any]) -> None:
        """Send ``<prefix>_reply`` with ``content`` to the sender of ``msg``."""
        msg_type = msg["header"].get("msg_type", "")
        self.kernel.send_control(msg, msg_type.removesuffix("_request") + "_reply", content)

    def do_abort(self, msg: dict[str, Any]) -> None:
        """``abort_request {msg_ids}``: mark them; an empty list aborts everything queued."""
        msg_ids = msg["content"].get("msg_ids") or []
        if isinstance(msg_ids, str):
            msg_ids = [msg_ids]
        if not msg_ids:
            self.kernel.inbox.pull(0)
            msg_ids = self.kernel.queued_shell_ids()
        k = self.kernel
        k.aborted.add(msg_ids)
        log.info("aborting %d request(s)", len(msg_ids))
        # requests already received wait behind the running one: answer them now, so that
        # they come back at once (the task scheduler gives them to an idle engine)
        wanted = set(msg_ids)
        for queued in list(k.inbox.shell):
            msg_id = queued["header"].get("msg_id", "")
            if msg_id in wanted and k.aborted.claim(msg_id):
                k.shell.answer_aborted(queued)
        self.reply(msg, {"status": "ok"})

    def do_clear(self, msg: dict[str, Any]) -> None:
        """``clear_request``: reset the user namespace."""
        self.kernel.reset_namespace()
        self.reply(msg, {"status": "ok"})

    def do_shutdown(self, msg: dict[str, Any]) -> None:
        """``shutdown_request {restart}``: reply on control and IOPub, then stop."""
        restart = bool(msg["content"].get("restart", False))
        content = {"status": "ok", "restart": restart}
        self.reply(msg, content)
        self.kernel.publish("shutdown_reply", content, parent_of(msg), "shutdown")
        log.info("shutdown requested")
        self.kernel.request_exit(0)
        if threading.current_thread() is not threading.main_thread():
            # a request is running (control is answered by the busy watcher meanwhile): stop
            # now, as ipyparallel's engines do, rather than after it; its reply is lost and
            # the client reports an EngineError for it when the engine unregisters
            import signal

            signal_self(signal.SIGTERM)

    def do_signal(self, msg: dict[str, Any]) -> None:
        """``signal_request {sig}``: deliver ``sig`` (number or name) to this process."""
        signum = parse_signal(msg["content"].get("sig"))
        self.reply(msg, {"status": "ok"})
        log.info("signal %d requested", signum)
        signal_self(signum)

    def do_interrupt(self, msg: dict[str, Any]) -> None:
        """``interrupt_request``: SIGINT to this process (interrupts running user code)."""
        import signal

        self.reply(msg, {"status": "ok"})
        signal_self(signal.SIGINT)

    def do_comm_info(self, msg: dict[str, Any]) -> None:
        """``comm_info_request``: engines hold no comms."""
        self.reply(msg, {"status": "ok", "comms": {}})

    def do_usage(self, msg: dict[str, Any]) -> None:
        """``usage_request`` (ipykernel's resource usage reply): host name, pid, CPU count and,
        with psutil installed, this process's CPU percent and memory and the host's memory."""
        content: dict[str, Any] = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "cpu_count": os.cpu_count(),
        }
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            proc = psutil.Process()
            content["kernel_cpu"] = proc.cpu_percent()
            content["kernel_memory"] = proc.memory_info().rss
            content["cpu_count"] = psutil.cpu_count()
            content["host_virtual_memory"] = dict(psutil.virtual_memory()._asdict())
        self.reply(msg, content)

    def do_kernel_info(self, msg: dict[str, Any]) -> None:
        """``kernel_info_request``; a ferroparallel client may ask the engine to prove it can
        read the client's memory (``content.ferroparallel.peer_probe``, see
        :func:`~ferroparallel.serialize.peer.answer_probe`)."""
        content = kernel_info_content()
        asked = msg.get("content")
        probe = asked.get("ferroparallel") if isinstance(asked, dict) else None
        if isinstance(probe, dict) and "peer_probe" in probe:
            if peer_enabled():  # FERROPARALLEL_PEER_READ=0 here: clients keep segments
                content["ferroparallel"]["peer_probe"] = answer_probe(probe["peer_probe"])
                content["ferroparallel"]["lend_probe"] = lend_probe()
            else:
                content["ferroparallel"]["peer_probe"] = "error: disabled on this engine"
        net = self.kernel.net
        if isinstance(probe, dict) and "net_probe" in probe and net.enabled:
            # the client fetches this engine's secret to learn it can fetch from here; this
            # engine fetches the client's, naming itself, which tells the client it can be
            # fetched from (a thread: an unreachable client takes the fetch's whole timeout,
            # and neither this reply nor control requests may wait for that)
            mine = net.probe()
            content["ferroparallel"]["net_lend_probe"] = [*mine.request, mine.secret.hex()]
            answering = threading.Thread(
                target=answer_net_probe,
                args=(net.fetcher, probe["net_probe"]),
                kwargs={"peer": self.kernel.uuid},
                name="ferroparallel-net-probe",
                daemon=True,
            )
            self.net_probes = [t for t in self.net_probes if t.is_alive()] + [answering]
            answering.start()
        self.reply(msg, content)
