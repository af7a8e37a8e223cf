"""Finding a controller: connection info from a file, a dict, a profile or a Cluster."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from .. import paths
from ..error import ConnectionFileError

LOCAL_IPS = {"127.0.0.1", "localhost", "0.0.0.0", "*", "::1", ""}


def resolve_connection_info(
    url_or_file: str | os.PathLike[str] | dict[str, Any] | None,
    *,
    connection_info: dict[str, Any] | None,
    url_file: str | os.PathLike[str] | None,
    profile: str | None,
    profile_dir: str | os.PathLike[str] | None,
    cluster_id: str | None,
    timeout: float,
) -> tuple[dict[str, Any], str]:
    """Return the client connection info and a description of where it came from.

    Waits up to ``timeout`` seconds for the profile's connection file to appear; a file named
    by the caller must exist already (as in ipyparallel).
    """
    if isinstance(url_or_file, dict):
        connection_info, url_or_file = url_or_file, None
    if connection_info is not None:
        return paths.validate_connection_info(connection_info, "connection_info", "client"), (
            "the connection_info dict"
        )
    path = url_or_file if url_or_file is not None else url_file
    timeout_left = timeout
    if path is not None:
        text = os.fspath(path)
        if "://" in text:
            raise ValueError(
                f"Client needs a connection file, not a URL ({text!r}): pass the path of the "
                "controller's ipcontroller-client.json (in <profile_dir>/security/), or a dict"
            )
        candidate = Path(text).expanduser()
        if not candidate.is_absolute() and not candidate.exists():
            pdir = paths.profile_dir(profile, profile_dir, create=False)
            candidate = paths.security_dir(pdir) / candidate
        if not candidate.exists():
            raise ConnectionFileError(
                f"connection file {candidate} not found: is a controller running? Pass the "
                "path of its ipcontroller-client.json (in <profile_dir>/security/)"
            )
    else:
        pdir = paths.profile_dir(profile, profile_dir, create=False)
        candidate = paths.connection_file(pdir, "client", cluster_id or "")
        if profile_dir is None:
            # also where ipyparallel's ipcontroller writes it ($IPYTHONDIR/profile_<name>),
            # so a Client finds a controller that ipcluster started
            ipython = paths.ipython_profile_dir(profile)
            alt = paths.connection_file(ipython, "client", cluster_id or "")
            candidate = _first_to_exist([candidate, alt], timeout)
            timeout_left = 0.0
    deadline = time.monotonic() + max(timeout_left, 0)
    while not candidate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not candidate.exists():
        raise ConnectionFileError(
            f"connection file {candidate} does not exist (waited {timeout:g} s); start a "
            "cluster first (e.g. `ferroparallel cluster start -n 4`) or pass the file's path"
        )
    return paths.load_connection_file(candidate, "client"), str(candidate)


def _this_host_ips() -> set[str]:
    ips = set(LOCAL_IPS)
    try:
        ips.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return ips


def interface_address(info: dict[str, Any]) -> str:
    """The ``transport://ip`` to connect to, resolving ``*``/``0.0.0.0`` with ``location``."""
    interface = info["interface"]
    transport, _, ip = interface.partition("://")
    if ip in ("*", "0.0.0.0", ""):
        location = info.get("location") or ""
        if not location or location == socket.gethostname() or location in _this_host_ips():
            ip = "127.0.0.1"
        else:
            ip = location
    return f"{transport}://{ip}"


def data_url(info: dict[str, Any]) -> str:
    """The controller URL whose route this client's data server binds (decision 0014): the
    registration URL, or ``tcp://*:<port>`` for a controller on this host listening on every
    interface (the server then binds this host's routable address, which engines on other
    hosts reach)."""
    from ..serialize.netloan import WILDCARD_HOSTS

    transport, _, ip = info["interface"].partition("://")
    if transport == "tcp" and ip in WILDCARD_HOSTS and is_local(info):
        return f"tcp://*:{info['registration']}"
    return url(info, "registration")


def is_local(info: dict[str, Any]) -> bool:
    """True when the controller runs on this host."""
    _, _, ip = interface_address(info).partition("://")
    return ip.startswith("127.") or ip in _this_host_ips()


def url(info: dict[str, Any], channel: str) -> str:
    """The URL of one channel."""
    return f"{interface_address(info)}:{info[channel]}"


def accepts_connections(url: str, timeout: float = 1.0) -> bool:
    """Whether something accepts stream connections at ``url`` (``tcp://host:port`` or
    ``ipc://`` path, ``@`` for Linux's abstract namespace); ``False`` for other transports.

    Used to tell "no controller there" from "a controller that ignores us" after a timeout.
    """
    proto, _, addr = url.partition("://")
    try:
        if proto == "tcp":
            host, _, port = addr.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        if proto == "ipc" and hasattr(socket, "AF_UNIX"):
            path = "\0" + addr[1:] if addr.startswith("@") else addr
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
                return True
    except (OSError, ValueError):
        return False
    return False


def _first_to_exist(candidates: list[Path], timeout: float) -> Path:
    """The first of ``candidates`` that exists, waiting up to ``timeout`` seconds for one to
    appear; the first one when none does."""
    deadline = time.monotonic() + max(timeout, 0)
    while True:
        for c in candidates:
            if c.exists():
                return c
        if time.monotonic() >= deadline:
            return candidates[0]
        time.sleep(0.05)
