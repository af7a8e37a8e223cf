"""``execute_request`` through IPython's ``InteractiveShell`` (imported only when used).

The shell runs in the engine's user namespace, so ``%magics``, ``!shell`` commands and
rich display work. Its display hook publishes ``execute_result``, ``display()`` publishes
``display_data``, and tracebacks are published as IOPub ``error`` instead of printed.
"""

from __future__ import annotations

import logging
import types
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Any as AnyTrait
from traitlets import Type
from traitlets.config import Config

from .errors import ErrorInfo
from .execute import CellOutcome, IOPubPublisher
from .signals import EngineExit, InterruptGate, hide_handler

log = logging.getLogger(__name__)


class _EngineDisplayHook(DisplayHook):
    """Publishes the value of a cell's last expression as ``execute_result``."""

    def start_displayhook(self) -> None:
        self._fp_content: dict[str, Any] = {}

    def write_output_prompt(self) -> None:
        self._fp_content["execution_count"] = self.prompt_count

    def write_format_data(
        self, format_dict: dict[str, Any], md_dict: dict[str, Any] | None = None
    ) -> None:
        self._fp_content["data"] = format_dict
        self._fp_content["metadata"] = md_dict or {}

    def finish_displayhook(self) -> None:
        content = self._fp_content
        if "data" in content:
            self.shell.fp_publish("execute_result", content, "execute_result")


class _EngineDisplayPublisher(DisplayPublisher):
    """Publishes ``display()`` output as ``display_data`` / ``update_display_data``."""

    def publish(  # type: ignore[override]
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        msg_type = "update_display_data" if update else "display_data"
        content = {"data": data, "metadata": metadata or {}, "transient": transient or {}}
        self.shell.fp_publish(msg_type, content, "displaypub")

    def clear_output(self, wait: bool = False) -> None:
        self.shell.fp_publish("clear_output", {"wait": bool(wait)}, "displaypub")


class _EngineInteractiveShell(InteractiveShell):
    """A non-terminal shell whose outputs go to the engine's IOPub."""

    displayhook_class = Type(_EngineDisplayHook)
    display_pub_class = Type(_EngineDisplayPublisher)
    fp_publisher = AnyTrait(None, allow_none=True)

    def fp_publish(self, msg_type: str, content: dict[str, Any], topic: str) -> None:
        if self.fp_publisher is not None:
            self.fp_publisher(msg_type, content, topic)

    def ask_exit(self) -> None:
        """``exit()`` / ``quit()`` in user code: as on ipyparallel's (ipykernel) engines, a
        request to a frontend that an engine has not; the call returns None and the engine
        keeps serving (``rc.shutdown(targets)`` stops engines)."""
        self.exit_now = True
        log.info("exit() called by user code: ignored (stop engines with Client.shutdown)")

    def _get_exc_info(self, exc_tuple: Any = None) -> Any:
        etype, value, tb = super()._get_exc_info(exc_tuple)
        if isinstance(value, KeyboardInterrupt):  # raised by the engine's SIGINT handler
            hide_handler(value)
            tb = value.__traceback__
        return etype, value, tb

    def _showtraceback(self, etype: type, evalue: BaseException, stb: Any) -> None:
        if isinstance(evalue, EngineExit):
            return
        info = ErrorInfo(etype.__name__, _safe_str(evalue), [str(line) for line in stb])
        self.fp_last_error = info
        self.fp_publish(
            "error",
            {"ename": info.ename, "evalue": info.evalue, "traceback": info.traceback},
            "error",
        )

    def show_usage_error(self, exc: BaseException) -> None:
        info = ErrorInfo("UsageError", _safe_str(exc), [f"UsageError: {_safe_str(exc)}"])
        self.fp_last_error = info
        self.fp_publish(
            "error",
            {"ename": info.ename, "evalue": info.evalue, "traceback": info.traceback},
            "error",
        )


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _shell_config(settings: Config | None) -> Config:
    """The engine shell's config: history off (no shared sqlite file between engines), then
    the user's ``settings``; their ``ZMQInteractiveShell`` section (ipykernel's shell class)
    applies to the engine's shell as on ipykernel: over ``InteractiveShell``."""
    config = Config()
    config.HistoryAccessor.enabled = False
    if settings:
        config.merge(settings)
        zmq_shell = config.pop("ZMQInteractiveShell", None)
        if zmq_shell:
            shell = Config()
            shell.merge(config.pop("InteractiveShell", Config()))
            shell.merge(zmq_shell)
            config.InteractiveShell = shell
    return config


class IPythonShell:
    """Runs ``execute_request`` cells with IPython.

    Parameters
    ----------
    module : types.ModuleType
        The user namespace module (``__main__``).
    publish : callable
        ``publish(msg_type, content, topic)`` for IOPub messages of the current request.
    gate : InterruptGate
        Opened while a cell runs.
    settings : traitlets.config.Config, optional
        The user's shell settings (``InteractiveShell.colors``, ``ZMQInteractiveShell.xmode``,
        ...). Invalid ones are logged, and the shell made with IPython's defaults instead.
    """

    def __init__(
        self,
        module: types.ModuleType,
        publish: IOPubPublisher,
        gate: InterruptGate,
        settings: Config | None = None,
    ) -> None:
        shell = None
        if settings:
            try:
                shell = _EngineInteractiveShell.instance(
                    config=_shell_config(settings), user_module=module
                )
            except Exception as e:  # noqa: BLE001 - IPython 8 raises TraitError, 9 AssertionError
                given = ", ".join(
                    f"{section}.{name}={value!r}"
                    for section, values in settings.items()
                    for name, value in values.items()
                )
                log.error(
                    "invalid IPython shell setting among %s, using IPython's defaults: %s: %s",
                    given,
                    type(e).__name__,
                    e,
                )
        if shell is None:
            shell = _EngineInteractiveShell.instance(config=_shell_config(None), user_module=module)
        self.shell = shell
        self.shell.fp_publisher = publish
        self.shell.fp_last_error = None
        self.gate = gate

    @property
    def execution_count(self) -> int:
        """The count the next stored cell gets."""
        return int(self.shell.execution_count)

    def run_cell(
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> CellOutcome:
        """Run one cell (see :meth:`~.execute.PlainShell.run_cell`).

        Raises
        ------
        EngineExit
            The engine is stopping (SIGTERM while the cell ran).
        """
        count = self.execution_count
        self.shell.fp_last_error = None
        try:
            with self.gate:
                result = self.shell.run_cell(code, store_history=store_history, silent=silent)
        except EngineExit:
            raise
        except BaseException as exc:  # IPython itself failed (or was interrupted)
            info = ErrorInfo.from_exception(exc)
            self.shell._showtraceback(type(exc), exc, info.traceback)
            return CellOutcome(count, info)
        failure = result.error_before_exec or result.error_in_exec
        if isinstance(failure, EngineExit):
            raise failure
        error: ErrorInfo | None = None
        if failure is not None:
            error = self.shell.fp_last_error or ErrorInfo.from_exception(
                failure, with_traceback=False
            )
        exprs = self.shell.user_expressions(user_expressions) if user_expressions else {}
        if silent or not store_history:
            count -= 1  # as IPython kernels: the reply names the last counted execution
        return CellOutcome(count, error, exprs)

    def reset(self) -> None:
        """Clear the user namespace the IPython way (keeps builtins and shell names)."""
        self.shell.reset(new_session=False)
