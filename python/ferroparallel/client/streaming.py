"""Printing the stdout/stderr of running requests as it arrives (``AsyncResult.stream_output``
and the ``%px`` magic's streaming)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any


class OutputPrinter:
    """Prints what each message of an AsyncResult wrote to stdout/stderr since the last call,
    line by line, each line prefixed ``[stdout:<engine id>]`` (or ``stderr``).

    Parameters
    ----------
    ar : AsyncResult
        Whose output to print.
    """

    def __init__(self, ar: Any) -> None:
        self._ar = ar
        self._shown: dict[tuple[int, str], int] = {}

    def print_new(self, final: bool = False) -> None:
        """Print the complete lines that arrived since the last call (with ``final``, also an
        unfinished last line)."""
        ar = self._ar
        for i in range(len(ar)):
            md = ar._md(i)
            eid = ar._engine_id(i)
            for kind in ("stdout", "stderr"):
                text = md.get(kind) or ""
                start = self._shown.get((i, kind), 0)
                end = len(text) if final else text.rfind("\n", start) + 1
                if end <= start:
                    continue
                self._shown[(i, kind)] = end
                label = f"[{kind}:{'?' if eid is None else eid}]"
                out = sys.stdout if kind == "stdout" else sys.stderr
                for piece in text[start:end].splitlines():
                    print(f"{label} {piece}", file=out)


@contextlib.contextmanager
def stream_output(ar: Any, interval: float = 0.05) -> Iterator[None]:
    """While the block runs, print ``ar``'s output as it arrives (a background thread looks
    every ``interval`` seconds); what is left is printed when the block ends."""
    printer = OutputPrinter(ar)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            printer.print_new()

    thread = threading.Thread(target=run, name="ferroparallel-stream-output", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        printer.print_new(final=True)
