"""Error contents sent back for failed requests."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .signals import hide_handler


@dataclass
class ErrorInfo:
    """One failure: exception class name, its text and the formatted traceback lines."""

    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)

    @classmethod
    def from_exception(
        cls, exc: BaseException, skip: int = 0, with_traceback: bool = True
    ) -> ErrorInfo:
        """Describe an exception.

        Parameters
        ----------
        exc : BaseException
            The exception (its ``__traceback__`` is formatted).
        skip : int
            Number of outermost traceback entries to leave out (the engine's own frames).
        with_traceback : bool
            False formats only the exception line(s) (e.g. a ``SyntaxError`` in a cell).

        Returns
        -------
        ErrorInfo
            ``ename`` is the class name, ``evalue`` ``str(exc)``, ``traceback`` one string
            per line without trailing newlines.
        """
        tb: TracebackType | None = exc.__traceback__ if with_traceback else None
        for _ in range(skip):
            if tb is None or tb.tb_next is None:
                break
            tb = tb.tb_next
        try:
            evalue = str(exc)
        except Exception as e:  # a broken __str__ must not break the reply
            evalue = f"<unprintable {type(exc).__name__}: {type(e).__name__}>"
        if isinstance(exc, KeyboardInterrupt):
            hide_handler(exc)
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except Exception:
            text = f"{type(exc).__name__}: {evalue}\n"
        return cls(type(exc).__name__, evalue, text.rstrip("\n").split("\n"))

    def content(self, engine_info: dict[str, Any]) -> dict[str, Any]:
        """The reply content: ``{status: "error", ename, evalue, traceback, engine_info}``."""
        return {
            "status": "error",
            "ename": self.ename,
            "evalue": self.evalue,
            "traceback": list(self.traceback),
            "engine_info": engine_info,
        }
