"""ferroparallel: a Rust-accelerated implementation of the IPython.parallel ZMQ cluster.

Code written for IPython.parallel / ipyparallel runs after ``import ferroparallel as ipp``.
"""

from __future__ import annotations

from . import error
from ._core import Frame, IoThread, Session, __version__

__all__ = ["Frame", "IoThread", "Session", "__version__", "error"]
