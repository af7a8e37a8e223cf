"""The user namespace: the ``__dict__`` of a fresh ``__main__`` module."""

from __future__ import annotations

import builtins
import sys
import types
from typing import Any


class UserNamespace:
    """The namespace where apply and execute requests run.

    It is the ``__dict__`` of a new module named ``__main__`` that replaces
    ``sys.modules["__main__"]``, so names defined by one request are seen by the next, and
    pickles that refer to ``__main__`` resolve to it.

    Parameters
    ----------
    install : bool
        Put the module in ``sys.modules["__main__"]``.
    """

    def __init__(self, install: bool = True) -> None:
        self.module = types.ModuleType("__main__", "The ferroparallel engine user namespace.")
        self.ns: dict[str, Any] = self.module.__dict__
        self.fill_defaults()
        if install:
            sys.modules["__main__"] = self.module

    def fill_defaults(self) -> None:
        """Put back ``__name__``, ``__builtins__`` and ``__doc__`` if missing."""
        self.ns.setdefault("__name__", "__main__")
        self.ns.setdefault("__builtins__", builtins)
        self.ns.setdefault("__doc__", None)

    def reset(self) -> None:
        """Remove every user name, keeping ``__name__``, ``__doc__`` and ``__builtins__``."""
        self.ns.clear()
        self.fill_defaults()
