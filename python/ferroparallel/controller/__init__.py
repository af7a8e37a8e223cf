"""Configuration and start-up of the Rust controller (``ferroparallel controller``).

The controller is one OS process: :mod:`ferroparallel.controller.app` parses the settings
(:mod:`~ferroparallel.controller.config`), starts ``ferroparallel._core.Controller`` and writes
the connection files (:mod:`~ferroparallel.controller.connection`).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``ferroparallel controller`` (see :func:`ferroparallel.controller.app.main`)."""
    from .app import main as _main

    return _main(argv)
