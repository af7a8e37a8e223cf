"""Same-host IPC endpoints (see ``docs/decisions/0008-same-host-ipc.md``).

Besides its TCP ports, a controller on Linux also binds every channel on an abstract-namespace
Unix socket (``ipc://@fp-<pid>-<random>-<channel>``) and lists those endpoints in the
connection files under :data:`INFO_KEY`, with a token of the host and network namespace that
can reach them. A ferroparallel client or engine whose token matches connects there instead
of to the TCP ports: the messages then skip the TCP/IP stack (a round trip between two
processes costs about half of the loopback TCP one on the machines we measured). Peers that do
not know the key (ipyparallel, the wire-protocol peers) use the TCP ports as always, and SSH
tunnels always go to the TCP ports.

Abstract sockets have no file, so nothing is left behind when a controller dies, and no path
length limit applies. Like the TCP ports on ``127.0.0.1`` they are reachable by any local user
(of the same network namespace): every message is signed, and with ``--curve`` encrypted,
exactly as over TCP.

``FERROPARALLEL_IPC=0`` (or ``off``/``false``/``no``) turns it off: in a controller's
environment, no IPC endpoints are bound; in a client's or engine's, the TCP ports are used.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ENV_ENABLE",
    "INFO_KEY",
    "LINK_ENV",
    "LINK_KEY",
    "available",
    "connection_entry",
    "enabled_by_env",
    "host_token",
    "links_enabled",
    "local_urls",
    "new_prefix",
]

#: ``FERROPARALLEL_IPC=0`` (or ``off``/``false``/``no``) disables IPC endpoints.
ENV_ENABLE = "FERROPARALLEL_IPC"
#: Connection-file key of the IPC endpoints: ``{"host": token, <file key>: url, ...}``.
INFO_KEY = "fp_ipc"
#: Key of the controller's link endpoint (``docs/decisions/0017-links.md``) in the IPC
#: entry of a client or engine connection file.
LINK_KEY = "fp_link"
#: ``FERROPARALLEL_LINKS=0`` (or ``off``/``false``/``no``) turns links off: in a
#: controller's environment none is served, in a client's or engine's none is opened.
LINK_ENV = "FERROPARALLEL_LINKS"


def enabled_by_env() -> bool:
    """False when ``$FERROPARALLEL_IPC`` says off; True otherwise."""
    value = os.environ.get(ENV_ENABLE, "").strip().lower()
    return value not in ("0", "off", "false", "no")


def links_enabled() -> bool:
    """False when ``$FERROPARALLEL_LINKS`` says off; True otherwise."""
    return os.environ.get(LINK_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def available() -> bool:
    """Whether abstract-namespace Unix sockets exist here (Linux)."""
    return sys.platform.startswith("linux")


def host_token() -> str:
    """Equal in two processes iff one can connect to the other's abstract sockets: the
    same-host token of shared memory (hostname, boot id, ``/dev/shm`` device) and the network
    namespace (abstract sockets belong to it)."""
    from .serialize.shm import host_token as machine

    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{machine()}/net:{netns}"


def new_prefix() -> str:
    """A fresh endpoint prefix for one controller run: ``@fp-<pid>-<8 hex>-``."""
    return f"@fp-{os.getpid()}-{secrets.token_hex(4)}-"


def connection_entry(
    endpoints: Mapping[str, str], file_keys: Mapping[str, str]
) -> dict[str, str] | None:
    """The :data:`INFO_KEY` value of a connection file.

    Parameters
    ----------
    endpoints : Mapping
        Controller channel name -> ``ipc://`` URL (``_core.Controller.ipc_endpoints()``).
    file_keys : Mapping
        Connection-file key -> controller channel name, for one role (client or engine).

    Returns
    -------
    dict or None
        ``{"host": host_token(), <file key>: url, ...}``, or None without endpoints.
    """
    if not endpoints:
        return None
    entry = {"host": host_token()}
    for key, channel in file_keys.items():
        url = endpoints.get(channel)
        if url is None:
            return None  # a partial set is useless: stay on TCP
        entry[key] = url
    return entry


def local_urls(info: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, str] | None:
    """The IPC URLs of ``keys`` when this process can use the connection info's IPC
    endpoints (listed, same host and network namespace, not disabled here), else None."""
    entry = info.get(INFO_KEY)
    if not isinstance(entry, Mapping) or not enabled_by_env() or not available():
        return None
    if entry.get("host") != host_token():
        return None
    urls = {k: entry.get(k) for k in keys}
    if not all(isinstance(u, str) and u.startswith("ipc://") for u in urls.values()):
        return None
    return urls  # type: ignore[return-value]
