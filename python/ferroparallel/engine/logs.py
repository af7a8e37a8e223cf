"""Engine logging: ``logging`` to stderr, every line prefixed with the engine id."""

from __future__ import annotations

import logging
import sys
from typing import Any

#: Logger of every engine module (children: ``ferroparallel.engine.kernel`` …).
LOGGER_NAME = "ferroparallel.engine"

_FORMAT = "%(asctime)s.%(msecs)03d [engine %(engine_id)s] %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


class _EngineIdFilter(logging.Filter):
    """Adds ``engine_id`` to every record (``?`` until the engine is registered)."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_id = "?"

    def filter(self, record: logging.LogRecord) -> bool:
        record.engine_id = self.engine_id
        return True


_id_filter = _EngineIdFilter()


def setup_logging(level: str | int = "INFO") -> logging.Logger:
    """Send engine logs to stderr with the engine id prefix.

    Parameters
    ----------
    level : str or int
        A ``logging`` level name (``"DEBUG"``, ``"INFO"``…) or number.

    Returns
    -------
    logging.Logger
        The ``ferroparallel.engine`` logger.

    Raises
    ------
    ValueError
        If ``level`` is not a known level name.
    """
    if isinstance(level, str):
        name = level.upper()
        numeric = logging.getLevelName(name)
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}")
        level = numeric
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_ferroparallel_engine", False) for h in logger.handlers):
        # Bind the real stderr now: user code may replace sys.stderr later.
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        handler.addFilter(_id_filter)
        handler._ferroparallel_engine = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def set_engine_id(engine_id: int | str) -> None:
    """Use ``engine_id`` as the prefix of every following log line."""
    _id_filter.engine_id = str(engine_id)


def set_log_stream(stream: Any) -> None:
    """Write engine log lines to ``stream`` from now on (the engine's old stderr while its
    descriptor 2 is captured, see :mod:`.fdcapture`)."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if getattr(handler, "_ferroparallel_engine", False) and stream is not None:
            handler.setStream(stream)  # type: ignore[attr-defined]
