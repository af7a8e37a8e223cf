"""Showing the output of running requests as it arrives (``AsyncResult.stream_output``; the
``%px`` magic streams with the same :class:`~.outputs.OutputPrinter`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .outputs import OutputPrinter


@contextlib.contextmanager
def stream_output(ar: Any, interval: float = 0.05) -> Iterator[OutputPrinter]:
    """While the block runs, print ``ar``'s output as it arrives (a background thread looks
    every ``interval`` seconds); what is left is printed when the block ends. Yields the
    :class:`OutputPrinter` (how many errors it showed)."""
    printer = OutputPrinter(ar)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            printer.print_new()

    thread = threading.Thread(target=run, name="ferroparallel-stream-output", daemon=True)
    thread.start()
    try:
        yield printer
    finally:
        stop.set()
        thread.join()
        printer.print_new(final=True)
