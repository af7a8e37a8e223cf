"""Per-message metadata kept by the Client (``client.metadata[msg_id]``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["DATE_KEYS", "METADATA_KEYS", "NO_DEPENDENCIES", "Metadata", "parse_date", "utcnow"]

#: The metadata keys holding timestamps.
DATE_KEYS = ("submitted", "started", "completed", "received")

_DEFAULTS: dict[str, Any] = {
    "msg_id": None,
    "submitted": None,
    "started": None,
    "completed": None,
    "received": None,
    "engine_uuid": None,
    "engine_id": None,
    "follow": None,
    "after": None,
    "status": None,
    "execute_input": None,
    "execute_result": None,
    "error": None,
    "stdout": "",
    "stderr": "",
    "outputs": [],
    "data": {},
    "label": None,
    "is_broadcast": False,
    "is_coalescing": False,
}

#: Every key of a Metadata, in order.
METADATA_KEYS = tuple(_DEFAULTS)


class _ReadOnlyEmptyList(list):
    """An empty list that cannot be changed (see :data:`NO_DEPENDENCIES`)."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "this metadata list is shared and read-only: assign a new list instead "
            "(md['after'] = [...])"
        )

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only  # type: ignore[assignment]

    def __copy__(self) -> list[Any]:
        return []

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return []

    def __reduce__(self) -> tuple[Any, ...]:
        return list, ()


#: The ``after`` / ``follow`` value of a reply that names no dependencies: one shared,
#: read-only empty list. A fresh list per result would be two more objects per task for the
#: garbage collector to walk on every full collection while thousands of results are held.
NO_DEPENDENCIES: list[Any] = _ReadOnlyEmptyList()

#: Names used by IPython.parallel before IPython 3, readable as attributes.
ALIASES = {"pyin": "execute_input", "pyout": "execute_result", "pyerr": "error"}


_fromisoformat = datetime.fromisoformat


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def parse_date(value: Any) -> Any:
    """A timezone-aware datetime for an ISO-8601 string or a datetime.

    Parameters
    ----------
    value : str, bytes, datetime or None
        ISO-8601 text (``Z`` or an offset; none means UTC), or a datetime (naive means UTC).

    Returns
    -------
    datetime or object
        The aware datetime; None and anything unparsable are returned unchanged.
    """
    if type(value) is str:  # the common case (a received date), tried first
        try:
            dt = _fromisoformat(value)
        except ValueError:
            pass  # maybe surrounding blanks: see below
        else:
            return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return value
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
    return value


_new_dict = dict.__new__
_init_dict = dict.__init__


class UnknownMetadataKey(AttributeError, KeyError):
    """An attribute of a Metadata that is none of its keys was assigned."""


class Metadata(dict):
    """The metadata of one message: a dict with a fixed set of keys and attribute access.

    Keys and defaults: ``msg_id``, ``submitted``, ``started``, ``completed``, ``received``,
    ``engine_uuid``, ``engine_id``, ``follow``, ``after``, ``status``, ``execute_input``,
    ``execute_result``, ``error``, ``label`` (None), ``is_broadcast``, ``is_coalescing``
    (False), ``stdout``, ``stderr`` (``""``), ``outputs`` (``[]``), ``data`` (``{}``).

    Setting an unknown key, by item, attribute or ``update()``, raises KeyError; keys cannot
    be deleted. Date keys may hold ISO strings or datetimes; strings are parsed to aware
    datetimes when assigned through Python (see :func:`parse_date`). Once a reply arrived,
    ``after`` and ``follow`` hold the dependencies it names, as ipyparallel's client does, or
    else :data:`NO_DEPENDENCIES`: an empty list shared by all results, which refuses changes
    (assign a new list instead).

    Parameters
    ----------
    *args, **kwargs
        Initial values, as for ``dict.update``.

    Examples
    --------
    >>> md = Metadata(msg_id="abc")
    >>> md.stdout += "hello"
    >>> md["stdout"]
    'hello'
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only "outputs" and "data" are mutable defaults: copy those, share the immutable rest.
        dict.__init__(self, _DEFAULTS, outputs=[], data={})
        if args or kwargs:
            self.update(*args, **kwargs)

    # -- item access ----------------------------------------------------------------------

    @classmethod
    def _of_request(cls, values: dict[str, Any]) -> Metadata:
        """The Metadata of a request just sent: what ``Metadata(values)`` makes, in one
        C-level call (a client makes one per task). ``values`` must hold metadata keys only
        and no ISO-string date (neither is checked)."""
        md = _new_dict(cls)
        _init_dict(md, _DEFAULTS, outputs=[], data={}, **values)
        return md

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in _DEFAULTS:
            raise KeyError(f"{key!r} is not a metadata key (known: {', '.join(_DEFAULTS)})")
        if key in DATE_KEYS and isinstance(value, (str, bytes)):
            value = parse_date(value)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        raise KeyError(f"metadata keys cannot be deleted ({key!r})")

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Set several keys; raises KeyError (changing nothing) if any key is unknown."""
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 positional argument, got {len(args)}")
        items: list[tuple[Any, Any]] = []
        if args:
            other = args[0]
            if isinstance(other, Mapping):
                items.extend(other.items())
            elif hasattr(other, "keys"):
                items.extend((k, other[k]) for k in other.keys())
            else:
                items.extend(_pairs(other))
        items.extend(kwargs.items())
        bad = [k for k, _ in items if k not in _DEFAULTS]
        if bad:
            raise KeyError(f"not metadata keys: {', '.join(map(repr, bad))}")
        for k, v in items:
            self[k] = v

    def __ior__(self, other: Any) -> Metadata:  # type: ignore[override]
        self.update(other)
        return self

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Like ``dict.setdefault``; every key always exists, so this returns ``self[key]``."""
        if key not in _DEFAULTS:
            raise KeyError(f"{key!r} is not a metadata key")
        return self[key]

    def pop(self, key: Any, *default: Any) -> Any:
        raise KeyError(f"metadata keys cannot be removed ({key!r})")

    def popitem(self) -> tuple[Any, Any]:
        raise KeyError("metadata keys cannot be removed")

    def clear(self) -> None:
        raise KeyError("metadata keys cannot be removed")

    # -- attribute access -----------------------------------------------------------------

    def __getattr__(self, key: str) -> Any:
        key = ALIASES.get(key, key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        try:
            self[key] = value
        except KeyError as e:
            # ipyparallel raises AttributeError here; it is a KeyError too, as item assignment
            raise UnknownMetadataKey(*e.args) from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_DEFAULTS))

    # -- copying --------------------------------------------------------------------------

    def copy(self) -> Metadata:
        """A shallow copy (a Metadata)."""
        return Metadata(self)

    def __copy__(self) -> Metadata:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Metadata:
        return Metadata({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self) -> tuple[Any, ...]:
        return (Metadata, (dict(self),))

    def parse_dates(self) -> Metadata:
        """Replace ISO-string dates (written through the C API) by aware datetimes in place."""
        for key in DATE_KEYS:
            value = dict.get(self, key)
            if isinstance(value, (str, bytes)) or (
                isinstance(value, datetime) and value.tzinfo is None
            ):
                parsed = parse_date(value)
                if parsed is not value and dict.get(self, key) is value:
                    dict.__setitem__(self, key, parsed)
        return self


def _pairs(items: Iterable[Any]) -> list[tuple[Any, Any]]:
    out = []
    for item in items:
        k, v = item
        out.append((k, v))
    return out
