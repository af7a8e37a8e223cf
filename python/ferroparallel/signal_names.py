"""Signal numbers from what users write (``2``, ``"SIGINT"``, ``"int"``): one reading for the
client (``send_signal``), the ``%px`` magics and the engine that delivers the signal."""

from __future__ import annotations

import signal
from typing import Any


def parse_signal(sig: Any) -> int:
    """Turn a signal number or name (``"SIGINT"``, ``"INT"``, ``"2"``, ``2``) into its number
    (0 is accepted: delivering it only checks the process exists).

    Raises
    ------
    ValueError
        Unknown signal.
    """
    if isinstance(sig, bool):
        raise ValueError(f"not a signal: {sig!r}")
    if isinstance(sig, int):
        return _number(sig)
    if isinstance(sig, str):
        name = sig.strip().upper()
        if name.isdigit():
            return _number(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(
                f"unknown signal {sig!r}: give a number or a name such as 'SIGINT'"
            ) from None
    raise ValueError(f"not a signal: {sig!r}")


def _number(n: int) -> int:
    """``n`` if it is a signal number (0, "is the process there?", included, as ``kill``)."""
    if n == 0:
        return 0
    try:
        return int(signal.Signals(n))
    except ValueError:
        raise ValueError(f"unknown signal number {n}: give a number such as 2 (SIGINT)") from None
