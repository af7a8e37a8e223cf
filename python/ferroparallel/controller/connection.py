"""Connection-file contents of the controller: build, reuse and remove them."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..error import ConnectionFileError
from ..paths import load_connection_file, write_connection_file
from .config import ALL_CHANNELS, ControllerSettings

__all__ = [
    "new_key",
    "client_info",
    "engine_info",
    "reusable_files",
    "write_files",
    "remove_files",
]

log = logging.getLogger("ferroparallel.controller")

# Connection-file key -> Rust channel name, per role.
_CLIENT_KEYS = {
    "registration": "registration",
    "control": "control_client",
    "mux": "mux_client",
    "task": "task_client",
    "iopub": "iopub_client",
    "notification": "notification",
}
_ENGINE_KEYS = {
    "registration": "registration",
    "control": "control_engine",
    "mux": "mux_engine",
    "task": "task_engine",
    "iopub": "iopub_engine",
    "hb_ping": "hb_ping",
    "hb_pong": "hb_pong",
}
# Keys that the two files of one controller must agree on to be reused.
_SHARED_KEYS = ("interface", "key", "registration", "pack", "unpack", "signature_scheme")


def new_key() -> str:
    """A fresh random 256-bit HMAC key as 64 hex digits."""
    return secrets.token_hex(32)


def _common(
    settings: ControllerSettings, key: str, ssh: str, serverkey: str | None = None
) -> dict[str, Any]:
    return {
        "interface": f"tcp://{settings.ip}",
        "key": key,
        "signature_scheme": settings.signature_scheme,
        "pack": settings.pack,
        "unpack": settings.pack,
        "location": settings.resolved_location(),
        "ssh": ssh,
        # The controller's public CURVE key (Z85), or None without CURVE; never the secret.
        "curve_serverkey": serverkey,
    }


def client_info(
    settings: ControllerSettings,
    key: str,
    ports: Mapping[str, Any],
    serverkey: str | None = None,
    ipc_endpoints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The client connection dict for the bound ``ports`` (Rust channel name -> port) and
    ``ipc_endpoints`` (Rust channel name -> ``ipc://`` URL, see :mod:`ferroparallel.ipc`)."""
    info = _common(settings, key, settings.ssh, serverkey)
    for k, ch in _CLIENT_KEYS.items():
        info[k] = int(ports[ch])
    _add_ipc(info, ipc_endpoints, {**_CLIENT_KEYS, "broadcast": "broadcast_client"})
    info["task_scheme"] = settings.scheme
    if "broadcast_client" in ports:
        info["broadcast"] = int(ports["broadcast_client"])
    return info


def engine_info(
    settings: ControllerSettings,
    key: str,
    ports: Mapping[str, Any],
    serverkey: str | None = None,
    ipc_endpoints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The engine connection dict for the bound ``ports`` (Rust channel name -> port) and
    ``ipc_endpoints`` (as :func:`client_info`)."""
    info = _common(settings, key, settings.engine_ssh, serverkey)
    for k, ch in _ENGINE_KEYS.items():
        info[k] = int(ports[ch])
    _add_ipc(info, ipc_endpoints, {**_ENGINE_KEYS, "broadcast": "broadcast_engine"})
    if "broadcast_engine" in ports:
        b = ports["broadcast_engine"]
        info["broadcast"] = [int(x) for x in b] if isinstance(b, list | tuple) else [int(b)]
    return info


def add_link(info: dict[str, Any], endpoint: str | None) -> None:
    """List the link ``endpoint`` (decision 0017) with the IPC endpoints of the connection
    ``info`` (a client's or an engine's): only peers that can use those can use it."""
    from ..ipc import INFO_KEY, LINK_KEY

    entry = info.get(INFO_KEY)
    if endpoint and isinstance(entry, dict):
        entry[LINK_KEY] = endpoint


def _add_ipc(
    info: dict[str, Any], endpoints: Mapping[str, str] | None, keys: Mapping[str, str]
) -> None:
    from ..ipc import INFO_KEY, connection_entry

    entry = connection_entry(endpoints or {}, keys)
    if entry is not None:
        info[INFO_KEY] = entry


def reusable_files(
    settings: ControllerSettings,
    client_file: Path,
    engine_file: Path,
    serverkey: str | None = None,
) -> tuple[str, dict[str, int]] | None:
    """With ``--reuse``, the key and ports of an existing consistent pair of files.

    ``serverkey`` is the CURVE public key of this run (``None`` without CURVE): files written
    with another server key (or without CURVE, or with CURVE when it is now off) cannot be
    reused, because their readers would fail the handshake.

    Returns
    -------
    tuple or None
        ``(key, ports)`` with ports by Rust channel name, or ``None`` when the files are missing,
        invalid or disagree (a warning says why, and fresh files will be written).
    """
    if not (client_file.exists() and engine_file.exists()):
        log.info("--reuse: no existing connection files, writing new ones")
        return None
    try:
        client = load_connection_file(client_file, "client")
        engine = load_connection_file(engine_file, "engine")
    except ConnectionFileError as e:
        log.warning("--reuse: %s; writing new connection files", e)
        return None
    for k in (*_SHARED_KEYS, "curve_serverkey"):
        if client.get(k) != engine.get(k):
            log.warning(
                "--reuse: %s and %s disagree on %r; writing new connection files",
                client_file,
                engine_file,
                k,
            )
            return None
    wanted = _common(settings, client["key"], settings.ssh, serverkey)
    if client.get("curve_serverkey") != serverkey:
        log.warning(
            "--reuse: %s was written for another CurveZMQ server key (or without CURVE); "
            "writing new connection files (to keep the key across runs, configure "
            "curve_secretkey or $IPP_CURVE_SECRETKEY)",
            client_file,
        )
        return None
    for k in ("interface", "pack", "signature_scheme"):
        if client.get(k) != wanted[k]:
            log.warning(
                "--reuse: %s has %s=%r but %r is configured; writing new connection files",
                client_file,
                k,
                client.get(k),
                wanted[k],
            )
            return None
    ports = dict.fromkeys(ALL_CHANNELS, 0)
    for k, ch in _CLIENT_KEYS.items():
        ports[ch] = client[k]
    for k, ch in _ENGINE_KEYS.items():
        ports[ch] = engine[k]
    # files written before the broadcast channel existed have no "broadcast": a random port
    if isinstance(client.get("broadcast"), int):
        ports["broadcast_client"] = client["broadcast"]
    leaves = engine.get("broadcast")
    if isinstance(leaves, list) and leaves and isinstance(leaves[0], int):
        ports["broadcast_engine"] = leaves[0]
    return client["key"], ports


def reused_ipc_prefix(client_file: Path) -> str | None:
    """With ``--reuse``: the IPC endpoint prefix of the existing client file, so that peers
    holding the old files reach the new controller on the same Unix sockets too (None when the
    file lists none, or lists them for another host)."""
    from ..ipc import INFO_KEY, host_token

    try:
        entry = load_connection_file(client_file, "client").get(INFO_KEY)
    except ConnectionFileError:
        return None
    if not isinstance(entry, Mapping) or entry.get("host") != host_token():
        return None
    url = entry.get("registration")
    suffix = _CLIENT_KEYS["registration"]
    if not isinstance(url, str) or not url.startswith("ipc://@fp-") or not url.endswith(suffix):
        return None
    return url[len("ipc://") : -len(suffix)]


def write_files(
    client_file: Path, engine_file: Path, client: Mapping[str, Any], engine: Mapping[str, Any]
) -> None:
    """Write both files (engine first: a reader that sees the client file sees both)."""
    write_connection_file(engine_file, engine)
    write_connection_file(client_file, client)


def remove_files(key: str, *files: Path) -> None:
    """Remove connection files that still hold ``key`` (never another controller's files)."""
    for f in files:
        try:
            info = load_connection_file(f)
        except ConnectionFileError:
            if not f.exists():
                continue
            info = {}
        if info.get("key") not in (key, None):
            log.warning("not removing %s: it was rewritten by another controller", f)
            continue
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", f, e)
