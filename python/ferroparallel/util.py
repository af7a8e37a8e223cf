"""Helpers under the names of ``ipyparallel.util``: URLs and addresses, datetimes, and the
engine-side functions of ``Client.become_dask``.

Code written for ipyparallel imports these from ``ipyparallel.util``
(``from ipyparallel.util import interactive, disambiguate_url``); the same imports work from
``ferroparallel.util``.
"""

from __future__ import annotations

import ipaddress
import socket
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .serialize import interactive

__all__ = [
    "become_dask_worker",
    "compare_datetimes",
    "disambiguate_ip_address",
    "disambiguate_url",
    "ensure_timezone",
    "int_keys",
    "interactive",
    "is_ip",
    "is_url",
    "localhost",
    "select_random_ports",
    "split_url",
    "stop_distributed_worker",
    "utcnow",
    "validate_url",
    "validate_url_container",
]

#: The UTC timezone (ipyparallel's ``util.utc``), of every datetime in records and metadata.
utc = UTC

#: The transports ZMQ URLs may name.
_TRANSPORTS = ("tcp", "pgm", "epgm", "ipc", "inproc", "ws", "wss")
#: Addresses that mean "every interface": not connectable as they are.
_WILDCARDS = ("0.0.0.0", "*", "::", "")


def localhost() -> str:
    """The loopback address to connect to on this machine (``127.0.0.1``)."""
    return "127.0.0.1"


def is_ip(location: str) -> bool:
    """Whether ``location`` is an IPv4 or IPv6 address (not a host name)."""
    try:
        ipaddress.ip_address(location)
    except ValueError:
        return False
    return True


def _own_addresses() -> set[str]:
    found = {"127.0.0.1", "::1", "localhost"}
    try:
        name = socket.gethostname()
        found.update((name, socket.getfqdn()))
        found.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
    except OSError:
        pass
    return found


def disambiguate_ip_address(ip: str, location: str | None = None) -> str:
    """A connectable address for ``ip`` as a server bound it: a wildcard (``0.0.0.0``, ``*``)
    becomes ``location`` (the host the server runs on), or the loopback address when
    ``location`` is None or this machine.

    Warns (RuntimeWarning) when ``location`` is a host name that does not resolve: it is
    returned as it is, though nothing may be reachable there.
    """
    if ip not in _WILDCARDS:
        return ip
    if location is None or location in _WILDCARDS or location in _own_addresses():
        return localhost()
    if not is_ip(location):
        try:
            socket.getaddrinfo(location, None)
        except OSError as e:
            warnings.warn(f"could not determine IPs for {location}: {e}", RuntimeWarning, 2)
    return location


def split_url(url: str) -> tuple[str, str, str]:
    """``"tcp://10.0.0.1:5555"`` → ``("tcp", "10.0.0.1", "5555")``.

    Raises
    ------
    ValueError
        If ``url`` has no ``://`` or, for tcp, no ``:port``.
    """
    proto, sep, addr = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL (no '://'): {url!r}")
    host, colon, port = addr.rpartition(":")
    if not colon:
        if proto == "tcp":
            raise ValueError(f"a tcp URL needs host:port, not {url!r}")
        return proto, addr, ""
    return proto, host.strip("[]"), port


def disambiguate_url(url: str, location: str | None = None) -> str:
    """``url`` with a wildcard tcp address replaced by a connectable one (see
    :func:`disambiguate_ip_address`); other URLs, and text that is no URL, are returned as they
    are."""
    if "://" not in url:
        return url
    proto, ip, port = split_url(url)
    if proto != "tcp":
        return url
    return f"{proto}://{disambiguate_ip_address(ip, location)}:{port}"


def is_url(url: Any) -> bool:
    """Whether ``url`` looks like a ZMQ URL (``<transport>://<address>``)."""
    if not isinstance(url, str) or "://" not in url:
        return False
    return url.split("://", 1)[0].lower() in _TRANSPORTS


def validate_url(url: Any) -> bool:
    """Check that ``url`` is a valid ZMQ URL; True if it is.

    Raises
    ------
    TypeError
        If ``url`` is not a string.
    ValueError
        For an unknown transport, or a tcp URL without a numeric port.
    """
    if not isinstance(url, str):
        raise TypeError(f"a URL must be a str, not {type(url).__name__}")
    proto, sep, addr = url.lower().partition("://")
    if not sep:
        raise ValueError(f"not a URL (no '://'): {url!r}")
    if proto not in _TRANSPORTS:
        raise ValueError(f"unknown transport {proto!r} in {url!r}; use one of {_TRANSPORTS}")
    if proto == "tcp":
        _, colon, port = addr.rpartition(":")
        if not colon or not port.isdigit() and port != "*":
            raise ValueError(f"a tcp URL needs host:port with a numeric port, not {url!r}")
    return True


def validate_url_container(container: Any) -> bool:
    """:func:`validate_url` on a URL, or on every URL in a list or in the values of a dict."""
    if isinstance(container, str):
        return validate_url(container)
    items: Iterable[Any] = container.values() if isinstance(container, Mapping) else container
    for item in items:
        validate_url_container(item)
    return True


def select_random_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on this machine now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def ensure_timezone(dt: datetime) -> datetime:
    """``dt`` with a timezone: a naive datetime is taken as local time (as ipyparallel)."""
    if dt.tzinfo is not None:
        return dt
    return dt.astimezone()


def compare_datetimes(a: datetime, b: datetime) -> timedelta:
    """``a - b``, also when one of them is naive (taken as local time)."""
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = ensure_timezone(a), ensure_timezone(b)
    return a - b


def int_keys(dikt: dict[Any, Any]) -> dict[Any, Any]:
    """Turn the string keys of ``dikt`` that are integers (``"3"``) into ints, in place (JSON
    turns int keys into strings); returns ``dikt``.

    Raises
    ------
    KeyError
        If both ``"3"`` and ``3`` are keys.
    """
    for key in list(dikt):
        if isinstance(key, str):
            try:
                number = int(key)
            except ValueError:
                continue
            if number in dikt:
                raise KeyError(f"both {key!r} and {number!r} are keys")
            dikt[number] = dikt.pop(key)
    return dikt


def become_dask_worker(address: str, nanny: bool = False, **kwargs: Any) -> str:
    """Run on an engine: start a dask.distributed Worker (a Nanny with ``nanny=True``) for the
    scheduler at ``address``; it is named ``dask_worker`` in the engine namespace. Returns its
    address. ``Client.become_dask`` does this on every engine."""
    from .dask_support import start_worker

    return start_worker(address, nanny, kwargs)


def stop_distributed_worker() -> bool:
    """Run on an engine: stop the worker :func:`become_dask_worker` started (False if none)."""
    from .dask_support import stop_worker

    return stop_worker()
