"""Engine connection info: where it comes from and the URL of each channel.

The info is the JSON written by the controller as ``ipcontroller[-<cluster_id>]-engine.json``
(keys ``interface``, ``registration``, ``control``, ``mux``, ``task``, ``iopub``, ``hb_ping``,
``hb_pong``, ``key``, ``signature_scheme``, ``pack``, ``unpack``, ``location``, ``ssh``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ipc
from ..error import ConnectionFileError
from ..serialize.netloan import WILDCARD_HOSTS, bind_host

log = logging.getLogger(__name__)

#: Environment variables holding the engine connection info as JSON, in order of preference.
ENV_VARS = ("FERROPARALLEL_CONNECTION_INFO", "IPP_CONNECTION_INFO")

#: Channel keys of an engine connection file (integer ports).
PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong")


@dataclass(frozen=True)
class EngineUrls:
    """The URL the engine connects to for each channel."""

    registration: str
    control: str
    mux: str
    task: str
    iopub: str
    hb_ping: str
    hb_pong: str
    broadcast: tuple[str, ...] = ()
    #: The controller's engine link (decision 0017), when this engine can open one.
    link: str | None = None


def load_connection_info(
    file: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    profile_dir: str | None = None,
    cluster_id: str = "",
    wait: float = 10.0,
    environ: dict[str, str] | None = None,
) -> tuple[dict[str, Any], str]:
    """Find and read the engine connection info.

    Order: ``file`` when given; else the JSON in ``$FERROPARALLEL_CONNECTION_INFO`` or
    ``$IPP_CONNECTION_INFO``; else the profile's
    ``<profile_dir>/security/ipcontroller[-<cluster_id>]-engine.json``.

    Parameters
    ----------
    file : str or os.PathLike, optional
        Explicit connection file.
    profile, profile_dir : str, optional
        Profile name or directory (see :func:`ferroparallel.paths.profile_dir`).
    cluster_id : str
        Cluster id in the file name.
    wait : float
        Seconds to wait for a missing file to appear.
    environ : dict, optional
        Environment to read (``os.environ`` by default).

    Returns
    -------
    tuple
        ``(info, source)``: the validated info dict and a description of where it came from.

    Raises
    ------
    ConnectionFileError
        Missing, unreadable, invalid or incomplete connection info (the message names it).
    """
    env = os.environ if environ is None else environ
    if file is None:
        for var in ENV_VARS:
            text = env.get(var)
            if text:
                try:
                    info = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConnectionFileError(f"${var} is not valid JSON: {e}") from e
                return validate(info, f"${var}"), f"${var}"
        from ..paths import connection_file
        from ..paths import profile_dir as resolve_profile_dir

        file = connection_file(resolve_profile_dir(profile, profile_dir), "engine", cluster_id)
    path = Path(file)
    deadline = time.monotonic() + max(0.0, wait)
    announced = False
    while not path.exists() and time.monotonic() < deadline:
        if not announced:
            log.info("waiting up to %.0f s for connection file %s", wait, path)
            announced = True
        time.sleep(0.1)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConnectionFileError(f"connection file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConnectionFileError(f"cannot read connection file {path}: {e}") from e
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConnectionFileError(f"connection file {path} is not valid JSON: {e}") from e
    from ..paths import check_permissions

    check_permissions(path)
    return validate(info, str(path)), str(path)


def validate(info: Any, source: str) -> dict[str, Any]:
    """Check engine connection info and fill defaults.

    Parameters
    ----------
    info : Any
        The decoded JSON value.
    source : str
        Where it came from, for error messages.

    Returns
    -------
    dict
        A copy with ``key`` (``exec_key`` accepted as alias), ``signature_scheme``
        (``hmac-sha256``), ``pack`` (``msgpack``), ``location`` and ``ssh`` (``""``) set.

    Raises
    ------
    ConnectionFileError
        Not a JSON object, a key missing, or a port that is not an integer.
    """
    if not isinstance(info, dict):
        raise ConnectionFileError(f"{source} does not hold a JSON object")
    out = dict(info)
    if "key" not in out and "exec_key" in out:
        out["key"] = out["exec_key"]
    missing = [k for k in ("interface", *PORT_KEYS) if k not in out]
    if missing:
        raise ConnectionFileError(f"{source} is missing key(s) {', '.join(missing)}")
    for k in PORT_KEYS:
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
            raise ConnectionFileError(f"{source}: {k!r} is not a valid port: {v!r}")
    if not isinstance(out["interface"], str) or "://" not in out["interface"]:
        raise ConnectionFileError(f"{source}: 'interface' must look like 'tcp://ip'")
    key = out.get("key") or ""
    if not isinstance(key, str):
        raise ConnectionFileError(f"{source}: 'key' must be a string")
    out["key"] = key
    from ..curve import serverkey_of

    if "curve_serverkey" in out:
        out["curve_serverkey"] = serverkey_of(out, source)
    from ..paths import warn_if_no_key

    warn_if_no_key(out, source)
    out["signature_scheme"] = out.get("signature_scheme") or "hmac-sha256"
    out["pack"] = out.get("pack") or "msgpack"
    out["unpack"] = out.get("unpack") or out["pack"]
    out["location"] = out.get("location") or ""
    out["ssh"] = out.get("ssh") or ""
    return out


def _local_addresses() -> set[str]:
    names = {"localhost", "127.0.0.1", "0.0.0.0", "::1", socket.gethostname()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


def disambiguate_interface(interface: str, location: str) -> str:
    """Turn a wildcard bind interface into an address to connect to.

    Parameters
    ----------
    interface : str
        ``transport://ip`` as written by the controller (may be ``tcp://*`` or
        ``tcp://0.0.0.0``).
    location : str
        The controller's host name or IP (``""`` if unknown).

    Returns
    -------
    str
        ``interface`` itself unless the ip is a wildcard; then ``tcp://127.0.0.1`` when the
        controller is on this machine (or its location is unknown), else ``tcp://<location>``.
    """
    transport, _, ip = interface.partition("://")
    if ip not in ("*", "0.0.0.0", "[::]", "::"):
        return interface
    if not location or location in _local_addresses():
        return f"{transport}://127.0.0.1"
    try:
        return f"{transport}://{socket.gethostbyname(location)}"
    except OSError:
        return f"{transport}://{location}"


def channel_urls(info: dict[str, Any], same_host: bool = True) -> EngineUrls:
    """The URL of every engine channel.

    Parameters
    ----------
    info : dict
        Validated connection info.
    same_host : bool
        Use the controller's same-host Unix sockets when the info lists them for this host
        (False: the TCP ports, e.g. for SSH tunnels).

    Returns
    -------
    EngineUrls
        ``<interface>:<port>`` per channel (``<interface>-<port>`` for ``ipc://``), or the
        controller's same-host Unix sockets when the info lists them for this host (see
        :mod:`ferroparallel.ipc`); ``broadcast`` lists the broadcast-scheduler leaves when the
        info has them; ``link`` is the controller's engine link with those same-host sockets
        (when it serves one and ``$FERROPARALLEL_LINKS`` does not turn links off).
    """
    base = disambiguate_interface(info["interface"], info.get("location", ""))
    sep = "-" if base.startswith("ipc://") else ":"
    leaves = info.get("broadcast") or ()
    if isinstance(leaves, int):
        leaves = (leaves,)
    urls = {k: f"{base}{sep}{info[k]}" for k in PORT_KEYS}
    broadcast = tuple(f"{base}{sep}{port}" for port in leaves)
    local = ipc.local_urls(info, PORT_KEYS) if same_host else None
    if local is not None and len(leaves) == 1:
        # ferroparallel's controller has one leaf, listed with the other IPC endpoints
        leaf = ipc.local_urls(info, ("broadcast",))
        broadcast = (leaf["broadcast"],) if leaf is not None else broadcast
    link = None
    if local is not None and ipc.links_enabled():
        link = (ipc.local_urls(info, (ipc.LINK_KEY,)) or {}).get(ipc.LINK_KEY)
    return EngineUrls(**(local if local is not None else urls), broadcast=broadcast, link=link)


def data_url(info: dict[str, Any], urls: EngineUrls) -> str:
    """The controller URL whose route the engine's data server binds (decision 0014): the
    TCP registration address even when the engine reaches the controller through same-host
    Unix sockets, so that clients on other hosts can fetch from an engine that runs beside
    the controller (``tcp://*:<port>`` for a controller on every interface: the data server
    then binds this host's routable address); the URL in use otherwise (an SSH tunnel's is
    loopback)."""
    url = urls.registration
    transport, _, ip = str(info.get("interface", "")).partition("://")
    if transport == "tcp" and ip in WILDCARD_HOSTS and bind_host(url) == "127.0.0.1":
        return f"tcp://*:{info['registration']}"  # (a controller on this host)
    if url.startswith("ipc://"):
        return channel_urls(info, same_host=False).registration
    return url


def tunnel_urls(
    urls: EngineUrls,
    server: str,
    keyfile: str | None = None,
    timeout: float = 10.0,
    paramiko: bool | None = None,
) -> tuple[EngineUrls, Any]:
    """Reach every channel through SSH tunnels to ``server``.

    Parameters
    ----------
    urls : EngineUrls
        The direct URLs (as seen from ``server``).
    server : str
        ``[user@]host[:port]`` of the SSH server.
    keyfile : str, optional
        Private key file.
    timeout : float
        Seconds to open the tunnels.
    paramiko : bool, optional
        Tunnel implementation (see :func:`ferroparallel.ssh.open_tunnels`).

    Returns
    -------
    tuple
        ``(urls, tunnels)``: ``tcp://127.0.0.1:<local port>`` URLs forwarded to the originals,
        and the :class:`ferroparallel.ssh.Tunnels` handle to close when the engine exits.

    Raises
    ------
    ferroparallel.ssh.SSHTunnelError
        The tunnels cannot be opened (the message names the host and the reason).
    """
    from ..ssh import open_tunnels

    named = {k: getattr(urls, k) for k in PORT_KEYS}
    named.update({f"broadcast{i}": u for i, u in enumerate(urls.broadcast)})
    tunnels = open_tunnels(named, server, keyfile=keyfile, paramiko=paramiko, timeout=timeout)
    local = tunnels.urls
    out = EngineUrls(
        **{k: local[k] for k in PORT_KEYS},
        broadcast=tuple(local[f"broadcast{i}"] for i in range(len(urls.broadcast))),
    )
    return out, tunnels
