"""IPython magics for interactive parallel work: ``%px``, ``%%px``, ``%pxresult``,
``%pxconfig`` and ``%autopx``, as in ipyparallel.

They run code on the engines of one DirectView (the *active* view). Creating a
:class:`~ferroparallel.Client` inside IPython, while no ``%px`` is registered yet, activates a view
of all engines (later Clients leave the active view alone); ``view.activate()``
or ``rc.activate(targets, suffix)`` activates another one (with a suffix the magics get new
names, e.g. ``%px_even``, so several views can be active at once); ``%load_ext ferroparallel``
registers them with a client connected on first use.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import operator
import re
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class, no_var_expand

import ferroparallel

from ..error import AlreadyDisplayedError, CompositeError
from ..signal_names import parse_signal
from .asyncresult import OUTPUT_GRACE
from .outputs import OutputPrinter
from .streaming import stream_output

if TYPE_CHECKING:
    from .asyncresult import AsyncResult
    from .view import DirectView

GROUPINGS = ("type", "engine", "order")
#: Seconds a blocking ``%px`` waits before it shows a progress bar (ipyparallel's default).
PROGRESS_AFTER = 2.0
#: After Ctrl-C: the longest wait for the engines to answer the signal and finish.
INTERRUPT_WAIT = 3.0


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are IPython UsageErrors (shown as a one-line message),
    never an exit of the interpreter."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError(message or f"{self.prog}: exit {status}")


def _on_off(p: argparse.ArgumentParser, dest: str, on: list[str], off: list[str]) -> None:
    """A pair of exclusive switches setting ``dest`` to True / False (None when neither)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(*on, dest=dest, action="store_const", const=True, default=None)
    group.add_argument(*off, dest=dest, action="store_const", const=False, default=None)


def _config_parser(prog: str) -> _Parser:
    """The options of ``%pxconfig``, which ``%px`` / ``%%px`` accept too (for one run)."""
    p = _Parser(prog=prog, add_help=False)
    p.add_argument("--targets", "-t", default=None)
    _on_off(p, "block", ["--block", "-b"], ["--noblock", "-a"])
    _on_off(p, "verbose", ["--verbose"], ["--no-verbose"])
    _on_off(p, "stream", ["--stream"], ["--no-stream"])
    p.add_argument("--signal-on-interrupt", dest="signal_on_interrupt", default=None)
    p.add_argument("--progress-after", dest="progress_after", type=float, default=None)
    return p


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """How outputs are grouped (``-e``, ``-r``, ``--group-outputs``) and ``--out NAME``."""
    # argparse takes a dest's default from its first option: give each the same one
    p.add_argument("-e", dest="groupby", action="store_const", const="engine", default="type")
    p.add_argument("-r", dest="groupby", action="store_const", const="order", default="type")
    p.add_argument("--group-outputs", "-g", dest="groupby", choices=GROUPINGS, default="type")
    p.add_argument("--out", "-o", dest="save_name", default=None)


def _exec_parser(prog: str, cell: bool) -> _Parser:
    """``%px`` / ``%%px`` options: those of ``%pxconfig``, plus output handling (and for the
    cell magic ``--local``)."""
    p = _config_parser(prog)
    _add_output_options(p)
    if cell:
        p.add_argument("--local", action="store_true", default=False)
    return p


def _option_names() -> tuple[frozenset[str], dict[str, str]]:
    """Every option of the ``%%px`` parser (a superset of the others'): the switches, and the
    options that take a value, each mapped to its long name."""
    flags: set[str] = set()
    valued: dict[str, str] = {}
    for action in _exec_parser("%%px", cell=True)._actions:
        if action.nargs == 0:
            flags.update(action.option_strings)
        else:
            long = max(action.option_strings, key=len)
            valued.update(dict.fromkeys(action.option_strings, long))
    return frozenset(flags), valued


_FLAGS, _WITH_VALUE = _option_names()
_LONG = sorted(o for o in _FLAGS | _WITH_VALUE.keys() if o.startswith("--"))


def _resolve_option(name: str) -> str | None:
    """The option ``name`` stands for: itself when it is one, else the long option it is an
    unambiguous prefix of (``--target`` for ``--targets``, as argparse allows); None when it
    is no option. An ambiguous prefix (``--no``) is a UsageError, as in argparse."""
    if name in _FLAGS or name in _WITH_VALUE:
        return name
    if not name.startswith("--") or len(name) < 3:
        return None
    matches = [o for o in _LONG if o.startswith(name)]
    if len(matches) > 1:
        raise UsageError(f"ambiguous option: {name} could match {', '.join(matches)}")
    return matches[0] if matches else None


# an option name ends at whitespace, the end of the line or "=" (then its value follows)
_OPTION = re.compile(r"\s*(--?[A-Za-z][\w-]*)(=|(?=\s|$))")


def _take_value(text: str, pos: int) -> tuple[str, int]:
    """The option value starting at ``pos`` and where it ends: a quoted string (quotes
    removed, so ``''`` is empty), or text up to whitespace outside brackets (so ``[0, 2]`` and
    ``range(0, 2)`` are one value)."""
    if text[pos : pos + 1] in ("'", '"'):
        close = text.find(text[pos], pos + 1)
        if close < 0:
            return text[pos + 1 :], len(text)
        return text[pos + 1 : close], close + 1
    depth = 0
    quote = ""
    end = pos
    while end < len(text):
        c = text[end]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c.isspace() and depth <= 0:
            break
        end += 1
    return text[pos:end], end


def _is_python(line: str) -> bool:
    """Whether ``line`` parses as Python code (quietly: no SyntaxWarning here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(line)
    except Exception:  # noqa: BLE001 - SyntaxError, and anything a pathological line raises
        return False
    return True


def _line_options(line: str) -> tuple[list[str], str]:
    """The options and the code of a line ``%px``: a line that starts with a long option
    (``--noblock``) has options; otherwise a line that parses as Python is all code, as
    ipyparallel's line magic (which takes no options) runs it, so ``%px -a`` negates ``a``;
    short options are taken only from a line that is not Python as a whole."""
    first = _OPTION.match(line)
    if first and first.group(1).startswith("--") and first.group(1) in _FLAGS | _WITH_VALUE.keys():
        return _split_options(line)
    if _is_python(line):
        return [], line
    return _split_options(line)


def _split_options(line: str) -> tuple[list[str], str]:
    """The leading options of a ``%px`` line and the code after them (kept verbatim).

    Only known options are taken, each followed by whitespace, ``=`` or the end of the line
    (so ``%px -a*2`` is code); a value may be quoted or a bracketed expression with spaces:
    ``--targets [0, 2]``, ``--signal-on-interrupt ''``. A long option may be abbreviated to
    an unambiguous prefix (``%%px --target 0``), as ipyparallel's argparse options can.
    """
    opts: list[str] = []
    pos = 0
    while True:
        m = _OPTION.match(line, pos)
        name = _resolve_option(m.group(1)) if m else None
        if m is None or name is None:
            break
        pos = m.end()
        opts.append(name)
        if name in _FLAGS:
            if m.group(2) == "=":
                raise UsageError(f"option {name} takes no value")
            continue
        if m.group(2) != "=":
            rest = line[pos:].lstrip()
            pos = len(line) - len(rest)
            if not rest:
                break  # argparse: "expected one argument"
        value, pos = _take_value(line, pos)
        # "--name=value": a value starting with "-" ("-1:") is not taken for an option
        opts[-1] = f"{_WITH_VALUE[name]}={value}"
    return opts, line[pos:].strip()


def _check_signal(sig: str) -> str:
    """A ``--signal-on-interrupt`` value, checked: a signal name or number, or empty (none)."""
    sig = sig.strip()
    if sig:
        try:
            parse_signal(sig)
        except ValueError as e:
            raise UsageError(f"--signal-on-interrupt: {e}") from None
    return sig


def _signal_label(sig: str) -> str:
    """``SIGINT`` for ``"2"``, ``"int"`` or ``"SIGINT"``."""
    number = parse_signal(sig)
    return signal.Signals(number).name if number else str(number)


def _index(expr: str, ns: dict[str, Any]) -> int:
    """One bound of a ``--targets`` slice: a Python expression giving an int."""
    return operator.index(eval(expr, ns))


def _describe_targets(targets: Any) -> str:
    """The targets as the verbose line shows them (long lists shortened)."""
    if isinstance(targets, list) and len(targets) > 10:
        head = ", ".join(map(str, targets[:4]))
        tail = ", ".join(map(str, targets[-4:]))
        return f"[{head}, ..., {tail}]"
    return str(targets)


@dataclass
class _Settings:
    """What one ``%px`` / ``%%px`` run does: its options, with the defaults filled in."""

    targets: Any
    block: bool
    verbose: bool
    stream: bool
    progress_after: float
    signal: str
    groupby: str
    save_name: str | None


@contextlib.contextmanager
def _streaming(
    ar: AsyncResult, enabled: bool, poll: float = 0.05
) -> Iterator[OutputPrinter | None]:
    """While the block runs, a background thread shows ``ar``'s output as it arrives (the main
    thread is free to wait, show a progress bar or take Ctrl-C); what is left is shown when
    the block ends. Yields the :class:`OutputPrinter` (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    with stream_output(ar, poll) as printer:
        yield printer


def _wait_with_progress(ar: AsyncResult, progress_after: float) -> None:
    """Wait for ``ar``; if it is not done after ``progress_after`` seconds (0: at once, negative:
    never), show a progress bar of finished engines (``AsyncResult.wait_interactive``)."""
    if progress_after > 0:
        ar.wait(progress_after)
    if progress_after >= 0 and not ar.done():
        ar.wait_interactive()
    ar.wait()


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
        # defaults of %px / %%px, set by %pxconfig (as ipyparallel's)
        self.stream_output = not ferroparallel._NONINTERACTIVE  # ($IPP_NONINTERACTIVE)
        self.progress_after = PROGRESS_AFTER
        self.signal_on_interrupt = "SIGINT"
        self.last_result: AsyncResult | None = None
        self._autopx = False
        self._px_cell = ""
        # magic names carry the suffix: build the table before Magics.__init__ reads it (it
        # binds each method name; IPython reads no_var_expand off the bound method)
        self.magics = {
            "line": {
                f"px{suffix}": "px",
                f"pxresult{suffix}": "pxresult",
                f"pxconfig{suffix}": "pxconfig",
                f"autopx{suffix}": "autopx",
            },
            "cell": {f"px{suffix}": "cell_px"},
        }
        if not suffix:  # as ipyparallel: the legacy %result, only without a suffix
            self.magics["line"]["result"] = "pxresult"
        super().__init__(shell)

    # -- helpers ----------------------------------------------------------------------------

    def _view(self) -> DirectView:
        if self.view is None:
            from .client import Client

            self.view = Client().direct_view("all")
            self.view.block = True
        return self.view

    def _eval_targets(self, text: str) -> Any:
        """A ``--targets`` value, as ipyparallel reads it: ``all``; with ``:``, a slice of the
        client's current engine ids (``::2``: every other engine, as a list); otherwise a
        Python expression (``1``, ``[0, 2]``, ``range(2)``, a name of the user namespace)."""
        text = text.strip()
        if text == "all":
            return "all"
        ns = self.shell.user_ns if self.shell is not None else {}
        try:
            if ":" in text:
                parts = text.split(":")
                if len(parts) > 3:
                    raise ValueError("a slice has at most two ':'")
                bounds = [_index(p, ns) if p.strip() else None for p in parts]
                return list(self._view().client.ids)[slice(*bounds)]
            value = eval(text, ns)  # the user's own expression, as ipyparallel evaluates it
            if isinstance(value, bool) or isinstance(value, (str, bytes)):
                raise TypeError(f"not engine ids: {value!r}")
            if isinstance(value, (int, slice)):
                return value
            return [operator.index(t) for t in value]
        except Exception as e:  # noqa: BLE001 - any failure is a bad option value
            raise UsageError(
                f"--targets {text!r}: expected 'all', a slice of the engine ids (e.g. ::2), an "
                f"id or a list of ids ({type(e).__name__}: {e})"
            ) from None

    def _settings(self, args: argparse.Namespace) -> _Settings:
        """The options of one run, defaults filled in from the view and ``%pxconfig``; checked
        before anything is sent."""
        view = self._view()
        return _Settings(
            targets=view.targets if args.targets is None else self._eval_targets(args.targets),
            block=view.block if args.block is None else args.block,
            verbose=self.verbose if args.verbose is None else args.verbose,
            stream=self.stream_output if args.stream is None else args.stream,
            progress_after=(
                self.progress_after if args.progress_after is None else args.progress_after
            ),
            signal=(
                self.signal_on_interrupt
                if args.signal_on_interrupt is None
                else _check_signal(args.signal_on_interrupt)
            ),
            groupby=args.groupby,
            save_name=args.save_name,
        )

    def _submit(self, code: str, run: _Settings, blocking: bool) -> AsyncResult:
        """Send ``code`` to the engines (announced when verbose); returns its AsyncResult."""
        if run.verbose:
            kind = "Parallel" if blocking else "Async parallel"
            print(f"{kind} execution on engine(s): {_describe_targets(run.targets)}")
        ar = self._view().execute(code, silent=False, targets=run.targets, block=False)
        ar._fname = "%px"  # as ipyparallel: its repr, progress bar and errors name the magic
        self.last_result = ar
        if run.save_name:
            self.shell.user_ns[run.save_name] = ar
        return ar

    def _run(self, code: str, args: argparse.Namespace) -> Any:
        run = self._settings(args)
        ar = self._submit(code, run, run.block)
        if not run.block:
            return ar
        return self._wait_and_show(ar, run)

    def _wait_and_show(self, ar: AsyncResult, run: _Settings) -> None:
        """Wait for a blocking run: its output streamed (or shown at the end), a progress bar
        after ``run.progress_after`` seconds; the remote error raised, as ipyparallel's %px
        (after streamed tracebacks, a CompositeError is raised as a short
        AlreadyDisplayedError). Ctrl-C signals the engines and ends the wait quietly."""
        interrupted = False
        with _streaming(ar, run.stream) as printer:
            try:
                _wait_with_progress(ar, run.progress_after)
                if printer is not None:
                    # the reply can come before the last output: stream until it is all in
                    ar.wait_for_output(timeout=OUTPUT_GRACE)
            except KeyboardInterrupt:
                interrupted = True
                if printer is not None:
                    printer.interrupted = True
                self._interrupt(ar, run)
        if printer is None:
            ar.wait_for_output(timeout=1)
            ar._display_outputs(run.groupby)  # also when interrupted before the end
        if interrupted:
            return  # as ipyparallel: the cell ends, without the engines' KeyboardInterrupts
        try:
            ar.get()
        except CompositeError as e:
            if printer is not None and printer.errors_shown:
                raise AlreadyDisplayedError(e) from None
            raise

    def _interrupt(self, ar: AsyncResult, run: _Settings) -> None:
        """Ctrl-C during a blocking run: send the configured signal to its engines (none when
        empty) and wait a little for them to stop."""
        if ar.done():
            return
        if not run.signal:
            print(
                "Interrupted: no signal sent (--signal-on-interrupt is empty); the engines go on",
                file=sys.stderr,
            )
            return
        print(
            f"Interrupted: sending {_signal_label(run.signal)} to the engines, waiting for them",
            file=sys.stderr,
        )
        deadline = time.monotonic() + INTERRUPT_WAIT
        try:
            sent = self._view().client.send_signal(run.signal, targets=run.targets, block=False)
            if sent is not None:
                sent.wait(INTERRUPT_WAIT)
            if ar.wait(max(0.0, deadline - time.monotonic())):
                ar.wait_for_output(timeout=1)
        except KeyboardInterrupt:
            pass  # Ctrl-C again: stop waiting

    # -- the magics -------------------------------------------------------------------------

    def pxconfig(self, line: str) -> None:
        """``%pxconfig [options]``: set the defaults of later ``%px`` / ``%%px`` runs.

        Options: ``--targets T`` / ``-t T`` (the active view's targets: ``all``, a slice of
        the engine ids such as ``::2``, or a Python expression such as ``1`` or ``[0, 2]``),
        ``--block`` / ``-b``, ``--noblock`` / ``-a`` (the view's ``block``), ``--verbose`` /
        ``--no-verbose``, ``--stream`` / ``--no-stream``, ``--signal-on-interrupt SIG`` and
        ``--progress-after SECONDS`` (see ``%px``).
        """
        opts, rest = _split_options(line)
        if rest:
            raise UsageError(f"%pxconfig: unexpected {rest!r}")
        args = _config_parser("%pxconfig").parse_args(opts)
        view = self._view()
        signal_on_interrupt = (
            None if args.signal_on_interrupt is None else _check_signal(args.signal_on_interrupt)
        )
        if args.targets is not None:
            view.targets = self._eval_targets(args.targets)
        if args.block is not None:
            view.block = args.block
        if args.verbose is not None:
            self.verbose = args.verbose
        if args.stream is not None:
            self.stream_output = args.stream
        if signal_on_interrupt is not None:
            self.signal_on_interrupt = signal_on_interrupt
        if args.progress_after is not None:
            self.progress_after = args.progress_after

    @no_var_expand
    def px(self, line: str) -> Any:
        """``%px [options] code``: execute one line of code on the active view's engines.

        The line reaches the engines as written: ``{x}`` and ``$x`` are not expanded from the
        local namespace (``%px print(f'{x}')`` prints the engines' ``x``).

        Options (before the code): those of ``%pxconfig``, for this run only (``--targets`` /
        ``-t``, ``--block`` / ``-b``, ``--noblock`` / ``-a``, ``--verbose``, ``--stream`` /
        ``--no-stream``: show stdout/stderr as they arrive, ``--progress-after SECONDS``: show
        a progress bar when a blocking run takes longer (default 2, negative: never),
        ``--signal-on-interrupt SIG``: sent to the engines on Ctrl-C, default SIGINT, empty
        for none); ``--group-outputs {type,engine,order}`` (``-e``: by engine, ``-r``: in
        order) and ``--out NAME`` / ``-o NAME`` (store the AsyncResult in NAME).

        A line that starts with a long option has options. Otherwise a line that is valid
        Python as a whole is all code, as ipyparallel's ``%px`` (which takes no options) runs
        it: ``%px -a`` negates ``a``, while ``%px --noblock (a)`` shows ``a`` without blocking.
        """
        opts, code = _line_options(line)
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
        run = self._settings(args)
        ar = self._submit(cell, run, blocking=False)  # waited for after the local run
        self.shell.run_cell(cell)
        if run.block:
            return self._wait_and_show(ar, run)
        return ar

    def pxresult(self, line: str) -> None:
        """``%pxresult [-e | -r | --group-outputs G] [--out NAME]``: show the outputs of the
        last ``%px`` (waiting for it) and raise its error, if any; with ``--out`` / ``-o``,
        store its AsyncResult in the user namespace as NAME instead."""
        p = _Parser(prog="%pxresult", add_help=False)
        _add_output_options(p)
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%pxresult: {e}") from None
        args = p.parse_args(words)
        if self.last_result is None:
            raise UsageError("no previous %px result: run %px first")
        ar = self.last_result
        if args.save_name:
            self.shell.user_ns[args.save_name] = ar
            return
        ar.get()  # as ipyparallel: a failure raises before anything is shown
        ar.display_outputs(args.groupby)

    def autopx(self, line: str = "") -> None:
        """``%autopx``: toggle running every following cell on the engines (as ``%%px``);
        ``%autopx`` again turns it off."""
        if self._autopx:
            self._disable_autopx()
        else:
            self._enable_autopx()

    def _enable_autopx(self) -> None:
        # as ipyparallel: the shell still takes each cell in (history keeps the raw cell, a
        # syntax error is reported here and sends nothing), but runs it on the engines instead
        # of its parsed statements
        shell = self.shell
        self._original_run_cell = shell.run_cell
        self._original_run_cell_async = shell.run_cell_async
        self._original_run_nodes = shell.run_ast_nodes
        pattern = re.compile(rf"^\s*%autopx{re.escape(self.suffix)}\b")

        def pxrun_cell(raw_cell: str, *args: Any, **kwargs: Any) -> Any:
            self._px_cell = raw_cell
            return self._original_run_cell(raw_cell, *args, **kwargs)

        async def pxrun_cell_async(raw_cell: str, *args: Any, **kwargs: Any) -> Any:
            # ipykernel calls run_cell_async itself for a cell with top-level await (and
            # run_cell goes through it too): without this, such a cell would send the
            # previous cell to the engines again
            self._px_cell = raw_cell
            return await self._original_run_cell_async(raw_cell, *args, **kwargs)

        def run_on_engines() -> bool:
            """True when the cell failed (its error shown), as ``run_ast_nodes``."""
            cell = self._px_cell
            if pattern.search(cell):
                self._disable_autopx()
                return False
            try:
                self._run(cell, _exec_parser("%%px", cell=True).parse_args([]))
            except Exception:
                shell.showtraceback()
                return True
            return False

        if inspect.iscoroutinefunction(self._original_run_nodes):

            async def pxrun_nodes(*args: Any, **kwargs: Any) -> bool:
                return run_on_engines()

        else:

            def pxrun_nodes(*args: Any, **kwargs: Any) -> bool:  # type: ignore[misc]
                return run_on_engines()

        shell.run_cell = pxrun_cell
        shell.run_cell_async = pxrun_cell_async
        shell.run_ast_nodes = pxrun_nodes
        self._autopx = True
        print("%autopx enabled")

    def _disable_autopx(self) -> None:
        if self._autopx:
            self.shell.run_cell = self._original_run_cell
            self.shell.run_cell_async = self._original_run_cell_async
            self.shell.run_ast_nodes = self._original_run_nodes
            self._autopx = False
            print("%autopx disabled")


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
