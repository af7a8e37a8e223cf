"""Conversion hook used by the Rust packer for objects it has no native mapping for.

The Rust core packs ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
``tuple`` and ``dict`` itself. Anything else is passed to :func:`pack_default`, which follows the
conventions of a jupyter_client Session: datetimes become ISO-8601 UTC strings with a ``Z``
suffix (naive datetimes are taken as local time), dates become ISO dates, numbers become ``int``
or ``float``, other iterables become lists.
"""

from __future__ import annotations

import numbers
from datetime import UTC, date, datetime
from typing import Any


def pack_default(obj: Any) -> Any:
    """Return a natively packable stand-in for ``obj`` or raise ``TypeError``."""
    if isinstance(obj, datetime):
        return obj.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (set, frozenset)) or (
        hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes, dict))
    ):
        return list(obj)
    raise TypeError(
        f"cannot pack an object of type {type(obj).__name__} into a message; "
        "use JSON-compatible values (send binary data as buffers)"
    )
