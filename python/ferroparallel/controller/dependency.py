"""Task dependencies under ipyparallel's old module name (``ipyparallel.controller.dependency``):
the same objects as ``ferroparallel.Dependency``, ``require``, ``depend`` and ``dependent``."""

from __future__ import annotations

from ..dependency import Dependency, depend, dependent, require
from ..error import UnmetDependency
from ..serialize import interactive

__all__ = ["Dependency", "UnmetDependency", "depend", "dependent", "interactive", "require"]
