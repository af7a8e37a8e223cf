"""The shell channel: ``apply_request``, ``execute_request`` and their replies."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from .. import _core
from ..serialize.ipp_compat import is_ferroparallel_payload
from ..serialize.netloan import NetLentResult
from ..serialize.peer import LentResult
from ..wire_names import (
    BUFFERS_CHANGED_KEY,
    BUFFERS_CHANGED_MESSAGE,
    IPP_FORMAT_KEY,
    LENT_RESULT_KEY,
    NET_LENT_KEY,
    NO_STATUS_KEY,
    OUTPUT_COUNT_KEY,
    SHM_SEGMENT_KEY,
)
from .control import kernel_info_content
from .errors import ErrorInfo
from .execute import PlainShell, run_apply
from .inbox import PACKED_HEADER_KEY, SHELL, SOCKET_KEY
from .ipyhook import call_after_import
from .signals import EngineExit

if TYPE_CHECKING:
    from .kernel import EngineKernel

log = logging.getLogger(__name__)


def _sent_uncopied(buffers: list[Any] | None) -> bool:
    """Whether a reply with ``buffers`` is sent from their memory, not a copy of them."""
    if buffers:
        threshold = _core.ZERO_COPY_THRESHOLD
        for b in buffers:
            # (bytes, what most results are: their length, without a memoryview per reply)
            if (len(b) if type(b) is bytes else memoryview(b).nbytes) >= threshold:
                return True
    return False


class ShellHandler:
    """Answers shell requests for one engine, one at a time, in the main thread.

    Parameters
    ----------
    kernel : EngineKernel
        The engine (its I/O thread, namespace, output capture and watcher).
    """

    def __init__(self, kernel: EngineKernel) -> None:
        self.kernel = kernel
        self.parent: dict[str, Any] | None = None  # header of the request being run
        #: The buffers of the apply being run (None otherwise): see :attr:`ipp_request`
        self._apply_buffers: list[Any] | None = None
        self._shell: PlainShell | Any = None
        self._making_shell = False

    # -- replies ----------------------------------------------------------------------------

    def publish_current(self, msg_type: str, content: dict[str, Any], topic: str) -> None:
        """Publish an IOPub message whose parent is the running request."""
        self.kernel.publish(msg_type, content, self.parent, topic)

    def reply(
        self,
        request: dict[str, Any],
        msg_type: str,
        content: dict[str, Any],
        started: str,
        buffers: list[Any] | None = None,
        extra: dict[str, Any] | None = None,
        may_hold: bool = False,
    ) -> None:
        """Send a reply to the sender of ``request`` with the reply metadata, from this thread
        (the shell sockets are direct): at once, or with ``may_hold`` held back while more
        requests are queued (``EngineKernel.hold_reply``) unless ``request`` came through the
        task scheduler."""
        k = self.kernel
        req_md = request.get("metadata") or {}
        get = req_md.get
        status = content.get("status", "ok")
        metadata = {
            # copied from the request, with the values a request without them implies
            # (ipyparallel's engines always send these four)
            "label": get("label"),
            "is_broadcast": get("is_broadcast", False),
            "is_coalescing": get("is_coalescing", False),
            "original_msg_id": get("original_msg_id", ""),
            "started": started,
            "dependencies_met": content.get("ename") != "UnmetDependency",
            "engine": k.uuid,
            "status": status,
            OUTPUT_COUNT_KEY: k.published,
        }
        if extra:
            metadata.update(extra)
        if status == "error":
            metadata["engine_info"] = content.get("engine_info", k.engine_info(""))
        k.direct.send(
            request.get(SOCKET_KEY, SHELL),
            msg_type,
            content,
            # the request's header as received when kept (see PACKED_HEADER_KEY)
            request.get(PACKED_HEADER_KEY) or request["header"],
            metadata,
            ident=request["idents"],
            buffers=buffers,
            # never a load-balanced task's (metadata with the scheduler's keys): its reply is
            # the scheduler's news that the engine has room, which must not wait
            hold=may_hold and "retries" not in req_md and k.hold_reply(),
        )

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> None:
        """Answer one shell message (busy/idle status around it)."""
        k = self.kernel
        header = msg["header"]
        msg_type = header.get("msg_type", "")
        if not msg_type.endswith("_request"):
            log.debug("ignoring shell message of type %r", msg_type)
            return
        prefix = msg_type.removesuffix("_request")
        if msg_type in ("apply_request", "execute_request"):
            k.wait_sent()  # the last reply's buffers are the user's: unchanged until sent
        started = _core.iso_now()
        k.published = 0
        md = msg.get("metadata") or {}
        status = not md.get(NO_STATUS_KEY)
        if status:
            parent = msg.get(PACKED_HEADER_KEY) or header
            k.publish("status", {"execution_state": "busy"}, parent, "status")
        try:
            fate = k.aborted.take(header.get("msg_id", ""))
            if fate == "skip":
                pass  # answered as aborted while it waited (see ControlHandler.do_abort)
            elif fate == "abort":
                self.reply(msg, prefix + "_reply", {"status": "aborted"}, started)
            elif md.get(BUFFERS_CHANGED_KEY):
                text = f"{msg_type} {header.get('msg_id')} was not run: {BUFFERS_CHANGED_MESSAGE}"
                log.warning("%s", text)
                error = ErrorInfo("BufferMismatch", text, [f"BufferMismatch: {text}"])
                self.reply(msg, prefix + "_reply", error.content(k.engine_info(prefix)), started)
            elif msg_type == "apply_request":
                self._apply(msg, started)
            elif msg_type == "execute_request":
                self._execute(msg, started)
            elif msg_type == "kernel_info_request":
                self.reply(msg, "kernel_info_reply", kernel_info_content(), started)
            elif msg_type == "comm_info_request":  # engines hold no comms
                self.reply(msg, "comm_info_reply", {"status": "ok", "comms": {}}, started)
            else:
                text = f"{msg_type} is not supported by ferroparallel engines"
                error = ErrorInfo("NotImplementedError", text, [f"NotImplementedError: {text}"])
                self.reply(msg, prefix + "_reply", error.content(k.engine_info(prefix)), started)
        except EngineExit:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # a SIGINT just outside user code too
            log.exception("%s %s failed", msg_type, header.get("msg_id"))
            content = ErrorInfo.from_exception(exc).content(k.engine_info(prefix))
            self.reply(msg, prefix + "_reply", content, started)
        finally:
            if status:
                k.publish("status", {"execution_state": "idle"}, parent, "status")

    def answer_aborted(self, msg: dict[str, Any]) -> None:
        """Answer a queued request as aborted now, from whichever thread (it produced no
        output: its reply says so)."""
        prefix = msg["header"].get("msg_type", "").removesuffix("_request")
        self.reply(
            msg,
            prefix + "_reply",
            {"status": "aborted"},
            _core.iso_now(),
            extra={OUTPUT_COUNT_KEY: 0},
        )

    @property
    def ipp_request(self) -> bool:
        """Whether the request being run is an ipyparallel client's apply (data it publishes
        is then serialized as ipyparallel's client reads it). Computed on demand: the apply
        path already tells the two formats apart once."""
        buffers = self._apply_buffers
        return buffers is not None and not is_ferroparallel_payload(buffers)

    def _begin(self, header: dict[str, Any]) -> None:
        self.parent = header
        self.kernel.capture.start(header)
        self.kernel.watcher.begin()

    def _end(self) -> None:
        self.kernel.watcher.end()
        self.kernel.capture.stop()
        self.parent = None  # outputs published from now on belong to no request

    # -- apply ------------------------------------------------------------------------------

    def _apply(self, msg: dict[str, Any], started: str) -> None:
        k = self.kernel
        self._begin(msg["header"])
        self._apply_buffers = msg["buffers"]  # (looked at only if the call publishes data)
        try:
            outcome = run_apply(
                msg["buffers"],
                k.namespace.ns,
                k.gate,
                k.result_segments,
                msg.get("metadata"),
                msg["header"].get("msg_id", ""),
                before_call=self.ensure_ipython_shell,
                fetcher=k.net.fetcher if k.net.enabled else None,
                engine_uuid=k.uuid,
            )
        finally:
            self._apply_buffers = None
            self._end()
        if outcome.error is None:
            held = outcome.segment
            lent = False
            extra: dict[str, Any] | None = None
            if held is None:
                pass  # (most results: all in frames)
            elif isinstance(held, LentResult):
                lent = True
                extra = {LENT_RESULT_KEY: held.reply_metadata()}
            elif isinstance(held, NetLentResult):
                lent = True
                extra = {NET_LENT_KEY: held.reply_metadata()}
            elif held:
                extra = {SHM_SEGMENT_KEY: held.name}
            if outcome.ipp_format:
                extra = {**(extra or {}), IPP_FORMAT_KEY: True}
            try:
                self.reply(
                    msg,
                    "apply_reply",
                    {"status": "ok"},
                    started,
                    outcome.buffers,
                    extra=extra,
                    # a lender waits for its reply; buffers sent from user memory (not
                    # copied) must leave before the next request could change them
                    # (EngineKernel.wait_sent)
                    may_hold=not lent and not _sent_uncopied(outcome.buffers),
                )
            except BaseException:
                if lent:
                    held.loan.release()  # nobody will pick it up
                raise
            if lent:
                held.wait()  # nothing may change the lent buffers before the client has them
            return
        error = outcome.error
        k.publish(
            "error",
            {"ename": error.ename, "evalue": error.evalue, "traceback": error.traceback},
            msg["header"],
            "error",
        )
        self.reply(
            msg, "apply_reply", error.content(k.engine_info("apply")), started, may_hold=True
        )

    # -- execute ----------------------------------------------------------------------------

    def get_shell(self) -> Any:
        """The cell runner: IPython's shell when available (created on first use), else
        :class:`~.execute.PlainShell`."""
        if self._shell is None:
            k = self.kernel
            self._making_shell = True
            try:
                if k.config.use_ipython:
                    try:
                        from .ipyshell import IPythonShell

                        self._shell = IPythonShell(
                            k.namespace.module,
                            self.publish_current,
                            k.gate,
                            settings=k.config.shell_config,
                        )
                    except ImportError:
                        log.debug("IPython is not installed: executing code as plain Python")
                    except Exception:
                        log.warning("IPython shell unavailable, using plain Python", exc_info=True)
                if self._shell is None:
                    self._shell = PlainShell(k.namespace.ns, self.publish_current, k.gate)
            finally:
                self._making_shell = False
        return self._shell

    def ensure_ipython_shell(self) -> None:
        """Create the IPython shell now if IPython is already imported in this process.

        Code run by ``apply`` then finds a shell, as on an ipykernel engine: ``display()``
        publishes ``display_data`` and ``get_ipython()`` returns the shell. Creating it costs
        little once IPython is imported; an engine that never imports IPython never pays.
        """
        if (
            self._shell is None
            and not self._making_shell
            and self.kernel.config.use_ipython
            and "IPython" in sys.modules
        ):
            self.get_shell()

    def watch_ipython_import(self) -> None:
        """Create the IPython shell as soon as anything in this process imports IPython (in
        the main thread; other threads leave it to the next ``apply``), so that the very
        call that first imports ``IPython.display`` already has a shell to display with."""
        if not self.kernel.config.use_ipython:
            return

        def imported() -> None:
            if threading.current_thread() is not threading.main_thread():
                return
            try:
                self.ensure_ipython_shell()
            except Exception:  # never break the user's import
                log.warning("could not create the IPython shell", exc_info=True)

        call_after_import("IPython", imported)

    def _execute(self, msg: dict[str, Any], started: str) -> None:
        k = self.kernel
        content = msg["content"]
        code = content.get("code", "")
        if not isinstance(code, str):
            raise TypeError(f"execute_request code must be a string, not {type(code).__name__}")
        silent = bool(content.get("silent", False))
        store_history = bool(content.get("store_history", not silent))
        expressions = content.get("user_expressions") or {}
        shell = self.get_shell()
        self.parent = msg["header"]
        if not silent:
            self.publish_current(
                "execute_input",
                {"code": code, "execution_count": shell.execution_count},
                "execute_input",
            )
        self._begin(msg["header"])
        try:
            outcome = shell.run_cell(code, silent, store_history, expressions)
        finally:
            self._end()
        reply: dict[str, Any]
        if outcome.error is None:
            reply = {"status": "ok"}
        else:
            reply = outcome.error.content(k.engine_info("execute"))
        reply.update(
            execution_count=outcome.execution_count,
            user_expressions=outcome.user_expressions,
            payload=[],
        )
        queued: list[str] = []
        if outcome.error is not None and not silent and content.get("stop_on_error", True):
            # ipykernel behaviour: the cells queued behind a failed one are not run. Only those
            # here before the reply leaves: a request sent once the client has seen the error
            # is a new decision of the user and runs.
            k.inbox.pull(0)
            queued = k.queued_shell_ids("execute_request")
            if queued:
                log.info("aborting %d queued execute_request(s) after an error", len(queued))
                k.aborted.add(queued)
        self.reply(msg, "execute_reply", reply, started)

    def reset_namespace(self) -> None:
        """``clear_request``: drop every user name (builtins stay)."""
        k = self.kernel
        shell = self._shell
        if shell is None or isinstance(shell, PlainShell):
            k.namespace.reset()
        if shell is not None:
            shell.reset()  # IPython's reset clears the namespace itself
        k.namespace.fill_defaults()
