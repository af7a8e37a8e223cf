"""Showing what requests printed and displayed, in ipyparallel's forms.

Used by ``AsyncResult.display_outputs``, ``AsyncResult.stream_output`` and the ``%px`` magics:

- streams: a label line (``[stdout:0] ``) whenever the label changes, then the text as the
  engine wrote it (a single-engine result shows its streams without labels);
- rich outputs (``display_data``) and results (``Out[0:3]: 10``) only inside IPython, through
  its display machinery (outside IPython ipyparallel shows neither);
- errors, while streaming: each remote traceback on stderr (after ``tb_limit`` of them, one
  line each).
"""

from __future__ import annotations

import sys
from typing import Any

from ..error import CompositeError


def ipython_shell() -> Any:
    """The running IPython shell, or None (IPython not imported or not running)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        return ipython.get_ipython()
    except Exception:  # noqa: BLE001
        return None


class StreamDisplay:
    """Prints stream text under labels, as ipyparallel does: a label is printed (on its own
    line) only when it differs from the last one printed, and a new label starts on a new
    line even when the previous text did not end with one."""

    def __init__(self) -> None:
        self.last_label = ""
        self.trailing_newline = True

    def show(self, text: str, label: str = "", file: Any = None) -> None:
        """Print ``text`` (under ``label``, e.g. ``"[stdout:0] "``) to ``file`` (stdout)."""
        if not text:
            return
        if label:
            if label == self.last_label:
                label = ""
            else:
                self.last_label = label
        pre = "\n" if label and not self.trailing_newline else ""
        sep = "\n" if label else ""
        self.trailing_newline = text.endswith("\n")
        print(f"{pre}{label}{sep}{text}", file=file or sys.stdout, end="")


def _label(text: str) -> None:
    """Show a label line (``[output:0]``) through IPython's display (inside IPython only)."""
    from IPython.display import display

    display({"text/plain": text}, raw=True)


def _republish(content: dict[str, Any], eid: Any) -> None:
    """Republish one ``display_data`` output of engine ``eid`` (inside IPython only)."""
    if not isinstance(content, dict):
        return
    from IPython.display import publish_display_data

    md = dict(content.get("metadata") or {})
    md["engine"] = eid
    publish_display_data(content.get("data") or {}, md)


def show_display_data(content: dict[str, Any], eid: Any) -> None:
    """``[output:<eid>]`` and one ``display_data`` output (inside IPython only)."""
    if ipython_shell() is None:
        return
    _label(f"[output:{eid}]")
    _republish(content, eid)


def execute_reply(ar: Any, i: int) -> Any:
    """The ExecuteReply of child ``i`` of ``ar`` (built from its metadata when the child holds
    none), or None when it has no ``execute_result``."""
    from .dispatch import ExecuteReply

    md = ar._md(i)
    result = md.get("execute_result") if md is not None else None
    if not isinstance(result, dict):
        return None
    fut = ar._children[i]
    try:
        if fut.done() and not fut.cancelled() and fut.exception(timeout=0) is None:
            value = fut.result(timeout=0)
            if isinstance(value, ExecuteReply):
                return value
    except Exception:  # noqa: BLE001 - a failed child has no reply to show
        pass
    content = {"execution_count": result.get("execution_count")}
    return ExecuteReply(getattr(fut, "msg_id", ""), content, md)


def show_result(reply: Any) -> None:
    """Display an ExecuteReply as IPython shows results (inside IPython only)."""
    if reply is None or ipython_shell() is None:
        return
    from IPython.display import display

    display(reply)


def display_outputs(ar: Any, groupby: str = "type", result_only: bool = False) -> None:
    """``AsyncResult.display_outputs``: see there."""
    out = StreamDisplay()
    n = len(ar._children)
    eids = ["?" if (e := ar._engine_id(i)) is None else e for i in range(n)]
    mds = [ar._md(i) or {} for i in range(n)]
    in_ipython = ipython_shell() is not None
    if ar._single_result and n == 1:
        if not result_only:
            out.show(mds[0].get("stdout") or "")
            out.show(mds[0].get("stderr") or "", file=sys.stderr)
            if in_ipython:
                for content in mds[0].get("outputs") or []:
                    _republish(content, eids[0])
        show_result(execute_reply(ar, 0))
        return
    if groupby == "engine":
        for i in range(n):
            if not result_only:
                out.show(mds[i].get("stdout") or "", f"[stdout:{eids[i]}] ")
                out.show(mds[i].get("stderr") or "", f"[stderr:{eids[i]}] ", file=sys.stderr)
            if not in_ipython:
                continue
            reply = execute_reply(ar, i)
            outputs = [] if result_only else list(mds[i].get("outputs") or [])
            if outputs or reply is not None:
                _label(f"[output:{eids[i]}]")
            for content in outputs:
                _republish(content, eids[i])
            show_result(reply)
        return
    if not result_only:
        for kind, file in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            for i in range(n):
                out.show(mds[i].get(kind) or "", f"[{kind}:{eids[i]}] ", file=file)
    if not in_ipython:
        return
    if not result_only:
        if groupby == "order":
            most = max((len(md.get("outputs") or []) for md in mds), default=0)
            for k in range(most):
                for i in range(n):
                    outputs = mds[i].get("outputs") or []
                    if k < len(outputs):
                        show_display_data(outputs[k], eids[i])
        else:
            for i in range(n):
                outputs = mds[i].get("outputs") or []
                if outputs:
                    _label(f"[output:{eids[i]}]")
                for content in outputs:
                    _republish(content, eids[i])
    for i in range(n):
        show_result(execute_reply(ar, i))


class OutputPrinter:
    """Shows what an AsyncResult's requests print, display, return and raise, as it arrives
    (``AsyncResult.stream_output``, ``%px``): streams under ``[stdout:<engine>]`` labels,
    complete lines at a time until ``final``; results and rich outputs inside IPython; remote
    tracebacks on stderr.

    Parameters
    ----------
    ar : AsyncResult
        Whose output to show.
    """

    def __init__(self, ar: Any) -> None:
        self._ar = ar
        self._out = StreamDisplay()
        self._shown: dict[tuple[int, str], int] = {}
        self._done: set[tuple[int, str]] = set()
        self.errors_shown = 0
        #: set once the user interrupted the run: the engines' KeyboardInterrupt errors that
        #: follow are its expected outcome, not shown (as ipyparallel's %px)
        self.interrupted = False

    def print_new(self, final: bool = False) -> None:
        """Show what arrived since the last call (with ``final``, also an unfinished last
        line of text)."""
        ar = self._ar
        for i in range(len(ar._children)):
            md = ar._md(i)
            if md is None:
                continue
            eid = ar._engine_id(i)
            eid = "?" if eid is None else eid
            for kind in ("stdout", "stderr"):
                text = md.get(kind) or ""
                start = self._shown.get((i, kind), 0)
                end = len(text) if final else text.rfind("\n", start) + 1
                if end > start:
                    self._shown[(i, kind)] = end
                    file = sys.stdout if kind == "stdout" else sys.stderr
                    self._out.show(text[start:end], f"[{kind}:{eid}] ", file=file)
            outputs = md.get("outputs") or []
            seen = self._shown.get((i, "outputs"), 0)
            for content in outputs[seen:]:
                show_display_data(content, eid)
            self._shown[(i, "outputs")] = len(outputs)
            err = md.get("error")
            if self.interrupted and getattr(err, "ename", None) == "KeyboardInterrupt":
                err = None
            if err is not None and (i, "error") not in self._done:
                self._done.add((i, "error"))
                self.errors_shown += 1
                if self.errors_shown <= CompositeError.tb_limit and hasattr(
                    err, "render_traceback"
                ):
                    print("\n".join(err.render_traceback()), file=sys.stderr)
                else:
                    print(err, file=sys.stderr)
            if md.get("execute_result") is not None and (i, "result") not in self._done:
                self._done.add((i, "result"))
                reply = execute_reply(ar, i)
                if ipython_shell() is not None:
                    show_result(reply)
                elif reply is not None and reply._plaintext():
                    print(reply._plaintext())
