"""IPython magics for interactive parallel work: ``%px``, ``%%px``, ``%pxresult``,
``%pxconfig`` and ``%autopx``, as in ipyparallel.

They run code on the engines of one DirectView (the *active* view). Creating a
:class:`~ferroparallel.Client` inside IPython activates a view of all engines; ``view.activate()``
or ``rc.activate(targets, suffix)`` activates another one (with a suffix the magics get new
names, e.g. ``%px_even``, so several views can be active at once); ``%load_ext ferroparallel``
registers them with a client connected on first use.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class

from ..error import AlreadyDisplayedError, CompositeError
from ..signal_names import parse_signal
from .asyncresult import OUTPUT_GRACE
from .outputs import OutputPrinter

if TYPE_CHECKING:
    from .asyncresult import AsyncResult
    from .view import DirectView

GROUPINGS = ("type", "engine", "order")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are IPython UsageErrors (shown as a one-line message),
    never an exit of the interpreter."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError(message or f"{self.prog}: exit {status}")


def _targets(text: str) -> Any:
    """``--targets`` value: ``all``, an int, a slice ``a:b[:c]``, or a Python list."""
    text = text.strip()
    if text == "all":
        return "all"
    if ":" in text and not text.startswith("["):
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        return slice(*parts)
    value = ast.literal_eval(text)
    if isinstance(value, (int, list, tuple, range)):
        return list(value) if isinstance(value, tuple) else value
    raise ValueError(f"--targets must be 'all', an int, a slice or a list, not {text!r}")


def _config_parser(prog: str) -> _Parser:
    """The view options of ``%pxconfig`` (and of ``%px``)."""
    p = _Parser(prog=prog, add_help=False)
    p.add_argument("--targets", "-t", type=_targets, default=None)
    for on, off in (("block", "noblock"), ("verbose", "no-verbose")):
        group = p.add_mutually_exclusive_group()
        group.add_argument(f"--{on}", dest=on, action="store_true", default=None)
        group.add_argument(f"--{off}", dest=on, action="store_false", default=None)
    return p


def _exec_parser(prog: str, cell: bool) -> _Parser:
    """``%px`` / ``%%px`` options: the view options, plus output and interrupt handling."""
    p = _config_parser(prog)
    stream = p.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None)
    stream.add_argument("--no-stream", dest="stream", action="store_false", default=None)
    p.add_argument("--group-outputs", "-g", choices=GROUPINGS, default="type")
    p.add_argument("--out", "-o", dest="save_name", default=None)
    p.add_argument("--signal-on-interrupt", default="SIGINT")
    if cell:
        p.add_argument("--local", action="store_true", default=False)
    return p


_OPTION = re.compile(r"\s*(--?[A-Za-z][\w-]*)(?:=(\S+))?")
_FLAGS = {
    "--block",
    "--noblock",
    "--verbose",
    "--no-verbose",
    "--stream",
    "--no-stream",
    "--local",
}
_WITH_VALUE = {"--targets", "-t", "--group-outputs", "-g", "--out", "-o", "--signal-on-interrupt"}


def _split_options(line: str) -> tuple[list[str], str]:
    """The leading options of a ``%px`` line and the code after them (kept verbatim). A
    ``--targets`` value may be a bracketed list with spaces: ``--targets [0, 2]``."""
    opts: list[str] = []
    pos = 0
    while True:
        m = _OPTION.match(line, pos)
        if not m or m.group(1) not in _FLAGS | _WITH_VALUE:
            break
        name, pos = m.group(1), m.end()
        opts.append(name)
        if m.group(2) is not None:
            opts.append(m.group(2))
        elif name in _WITH_VALUE:
            rest = line[pos:].lstrip()
            pos = len(line) - len(rest)
            if rest.startswith("["):
                close = rest.find("]")
                value = rest[: close + 1] if close >= 0 else rest
            else:
                value = rest.split(None, 1)[0] if rest.strip() else ""
            opts.append(value)
            pos += len(value)
    return opts, line[pos:].strip()


@magics_class
class ParallelMagics(Magics):
    """The parallel magics of one active DirectView (see the module docstring).

    Parameters
    ----------
    shell : IPython.core.interactiveshell.InteractiveShell
    view : DirectView or None
        The active view; None connects a default Client on first use.
    suffix : str
        Appended to every magic name.
    """

    def __init__(self, shell: Any, view: DirectView | None = None, suffix: str = "") -> None:
        self.view = view
        self.suffix = suffix
        self.verbose = False
        self.last_result: AsyncResult | None = None
        self._autopx = False
        self._transformer: Any = None
        # magic names carry the suffix: build the table before Magics.__init__ reads it
        self.magics = {
            "line": {
                f"px{suffix}": "px",
                f"pxresult{suffix}": "pxresult",
                f"pxconfig{suffix}": "pxconfig",
                f"autopx{suffix}": "autopx",
                f"result{suffix}": "pxresult",
            },
            "cell": {f"px{suffix}": "cell_px"},
        }
        super().__init__(shell)

    # -- helpers ----------------------------------------------------------------------------

    def _view(self) -> DirectView:
        if self.view is None:
            from .client import Client

            self.view = Client().direct_view("all")
            self.view.block = True
        return self.view

    def _run(self, code: str, args: argparse.Namespace) -> Any:
        view = self._view()
        targets = view.targets if args.targets is None else args.targets
        block = view.block if args.block is None else args.block
        verbose = self.verbose if args.verbose is None else args.verbose
        stream = block if args.stream is None else args.stream
        if verbose:
            where = "all" if targets == "all" else targets
            kind = "Parallel" if block else "Async parallel"
            print(f"{kind} execution on engine(s): {where}")
        ar = view.execute(code, silent=False, targets=targets, block=False)
        ar._fname = "%px"  # as ipyparallel: its repr, progress bar and errors name the magic
        self.last_result = ar
        if args.save_name:
            self.shell.user_ns[args.save_name] = ar
        if not block:
            return ar
        printer = None
        try:
            if stream:
                printer = _stream_outputs(ar)
            else:
                ar.wait()
        except KeyboardInterrupt:
            if args.signal_on_interrupt:
                sig = args.signal_on_interrupt
                print(f"Sending {sig} to engines and waiting for them", file=sys.stderr)
                view.client.send_signal(_signal_number(sig), targets=targets, block=False)
                ar.wait(timeout=5)
            raise
        return self._finish(ar, args.group_outputs, printer)

    def _finish(self, ar: AsyncResult, groupby: str, printer: OutputPrinter | None) -> None:
        """Show what was not streamed, and raise the remote error, as ipyparallel's %px: after
        streamed tracebacks, a CompositeError is raised as a short AlreadyDisplayedError."""
        if printer is None:
            ar.wait_for_output(timeout=1)
            ar.display_outputs(groupby)
        try:
            ar.get()
        except CompositeError as e:
            if printer is not None and printer.errors_shown:
                raise AlreadyDisplayedError(e) from None
            raise

    # -- the magics -------------------------------------------------------------------------

    def pxconfig(self, line: str) -> None:
        """``%pxconfig [--targets T] [--block | --noblock] [--verbose | --no-verbose]``: set
        the defaults of the active view (used when a ``%px`` gives no option)."""
        opts, rest = _split_options(line)
        if rest:
            raise UsageError(f"%pxconfig: unexpected {rest!r}")
        args = _config_parser("%pxconfig").parse_args(opts)
        view = self._view()
        if args.targets is not None:
            view.targets = args.targets
        if args.block is not None:
            view.block = args.block
        if args.verbose is not None:
            self.verbose = args.verbose

    def px(self, line: str) -> Any:
        """``%px [options] code``: execute one line of code on the active view's engines.

        Options: ``--targets T`` (``all``, an int, a slice ``a:b``, a list), ``--block`` /
        ``--noblock``, ``--verbose`` / ``--no-verbose``, ``--stream`` / ``--no-stream`` (show
        stdout/stderr as they arrive; default when blocking), ``--group-outputs {type,engine,
        order}``, ``--out NAME`` (store the AsyncResult in NAME), ``--signal-on-interrupt SIG``
        (sent to the engines on Ctrl-C; default SIGINT, empty to send none).
        """
        opts, code = _split_options(line)
        args = _exec_parser("%px", cell=False).parse_args(opts)
        if not code.strip() and opts:
            raise UsageError("%px needs code to run, e.g. %px import numpy")
        # a bare %px runs the empty cell on the engines, as ipyparallel's does
        return self._run(code, args)

    def cell_px(self, line: str, cell: str) -> Any:
        """``%%px [options]``: execute the cell on the engines (the options of ``%px``, plus
        ``--local`` to also run it here, after submitting it)."""
        opts, rest = _split_options(line)
        if rest:
            raise UsageError(f"%%px: unexpected {rest!r} (the code goes in the cell)")
        args = _exec_parser("%%px", cell=True).parse_args(opts)
        if not args.local:
            return self._run(cell, args)
        block = self._view().block if args.block is None else args.block
        args.block = False
        ar = self._run(cell, args)
        self.shell.run_cell(cell)
        if block:
            printer = _stream_outputs(ar) if args.stream is not False else None
            if printer is None:
                ar.wait()
            return self._finish(ar, args.group_outputs, printer)
        return ar

    def pxresult(self, line: str) -> None:
        """``%pxresult [--group-outputs G]``: show the outputs of the last ``%px`` (waiting for
        it) and raise its error, if any."""
        p = _Parser(prog="%pxresult", add_help=False)
        p.add_argument("--group-outputs", "-g", choices=GROUPINGS, default="type")
        args = p.parse_args(shlex.split(line))
        if self.last_result is None:
            raise UsageError("no previous %px result: run %px first")
        ar = self.last_result
        ar.get()  # as ipyparallel: a failure raises before anything is shown
        ar.display_outputs(args.group_outputs)

    def autopx(self, line: str = "") -> None:
        """``%autopx``: toggle running every following cell on the engines (as ``%%px``);
        ``%autopx`` again turns it off."""
        if self._autopx:
            self._disable_autopx()
        else:
            self._enable_autopx()

    def _enable_autopx(self) -> None:
        name = f"autopx{self.suffix}"
        magic = f"px{self.suffix}"

        def to_engines(lines: list[str]) -> list[str]:
            text = "".join(lines)
            first = text.lstrip().split("\n", 1)[0].strip()
            if not text.strip() or first in (f"%{name}", f"%%{name}"):
                return lines
            return [f"get_ipython().run_cell_magic({magic!r}, '', {text!r})\n"]

        self._transformer = to_engines
        self.shell.input_transformers_cleanup.append(to_engines)
        self._autopx = True
        print(f"%autopx enabled: cells run on the engines until %{name}")

    def _disable_autopx(self) -> None:
        try:
            self.shell.input_transformers_cleanup.remove(self._transformer)
        except ValueError:
            pass
        self._autopx = False
        print("%autopx disabled")


def _signal_number(sig: str) -> int:
    try:
        return parse_signal(sig)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _stream_outputs(
    ar: AsyncResult, poll: float = 0.05, grace: float = OUTPUT_GRACE
) -> OutputPrinter:
    """Show each engine's output as it arrives, until ``ar`` is done and its output complete
    (or ``grace`` seconds after it finished, for output that never completes); returns the
    printer (how many errors it showed)."""
    printer = OutputPrinter(ar)
    finished_at: float | None = None
    while True:
        # whether everything is in, decided before printing: what arrives later is printed
        # by the next round
        complete = ar.done() and (
            ar.wait_for_output(timeout=0)
            or (finished_at is not None and time.monotonic() - finished_at > grace)
        )
        if ar.done() and finished_at is None:
            finished_at = time.monotonic()
        printer.print_new(final=complete)
        if complete:
            return printer
        ar.wait(poll)


def activate(view: DirectView, suffix: str = "") -> ParallelMagics | None:
    """Register the parallel magics (with ``suffix``) for ``view`` in the running IPython;
    returns them, or None outside IPython (with a warning)."""
    shell = _shell()
    if shell is None:
        import warnings

        warnings.warn(
            "the parallel magics need an IPython session: activate() did nothing",
            UserWarning,  # as ipyparallel's
            stacklevel=3,
        )
        return None
    magics = ParallelMagics(shell, view, suffix)
    shell.register_magics(magics)
    return magics


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext ferroparallel``: the magics, with a default Client connected on first use."""
    shell.register_magics(ParallelMagics(shell, None, ""))
