"""Give code run by ``apply`` IPython's shell, as an ipykernel engine would.

An engine creates its IPython shell lazily (importing IPython costs a second or more), yet code
sent with ``apply`` may call ``IPython.display.display`` or ``get_ipython()``, which only
publish rich output when a shell exists. :func:`call_after_import` runs a callback once a
module (``IPython``) has been imported by anyone, so the engine can create its shell at that
moment, before the user's ``display()`` call.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["call_after_import"]


class _NotifyingLoader(importlib.abc.Loader):
    """Wraps a loader: runs ``callback`` after the module has been executed."""

    def __init__(self, loader: Any, callback: Callable[[], None]) -> None:
        self._loader = loader
        self._callback = callback

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """A one-shot finder: on the first import of ``name``, wraps its loader."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _NotifyingLoader(spec.loader, self.callback)
        return spec


def call_after_import(name: str, callback: Callable[[], None]) -> bool:
    """Run ``callback()`` right after the top-level module ``name`` is first imported.

    Parameters
    ----------
    name : str
        A top-level module name, e.g. ``"IPython"``.
    callback : callable
        Called with no arguments in the importing thread, once the module has executed
        (exceptions propagate to the importer, so the callback should not raise).

    Returns
    -------
    bool
        False when ``name`` is already imported (nothing is installed), else True.
    """
    if name in sys.modules:
        return False
    sys.meta_path.insert(0, _AfterImportFinder(name, callback))
    return True
