"""CurveZMQ: keys, the environment switches, and the socket options of clients and engines.

With CURVE, every ZMQ connection between a client or an engine and the controller is encrypted
and authenticated (CurveZMQ, Curve25519 + XSalsa20-Poly1305, done by libzmq with libsodium).
The controller holds a long-term key pair; its public key travels in the connection files as
``curve_serverkey`` (40 Z85 characters, as in ipyparallel 7.1+). Clients and engines make a
fresh key pair of their own and pass the server key to every socket they open: a peer that does
not know the server key cannot complete the handshake. The controller's secret key is kept only
in the controller's memory (or in your configuration, when you give one).

See ``docs/security.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from .error import ConnectionFileError

__all__ = [
    "ENABLE_ENV_VARS",
    "SECRETKEY_ENV_VAR",
    "SERVERKEY_ENV_VAR",
    "available",
    "check_key",
    "client_socket_options",
    "describe_handshake_failures",
    "enabled_by_env",
    "keypair",
    "public_key",
    "serverkey_of",
]

log = logging.getLogger("ferroparallel.security")

#: Environment variables that turn CURVE on for a controller (first one set wins).
ENABLE_ENV_VARS = ("FERROPARALLEL_CURVE", "IPP_ENABLE_CURVE")
#: The controller's secret key (Z85), instead of a fresh one per run (ipyparallel's name).
SECRETKEY_ENV_VAR = "IPP_CURVE_SECRETKEY"
#: The controller's public key, for a client or engine whose connection info has none.
SERVERKEY_ENV_VAR = "IPP_CURVE_SERVERKEY"

_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_TRUE = ("1", "true", "yes", "on")


def available() -> bool:
    """True when the native core's libzmq has CURVE (it is built with libsodium)."""
    from . import _core

    return bool(_core.has_curve())


def enabled_by_env(environ: Mapping[str, str] | None = None) -> bool | None:
    """Whether ``$FERROPARALLEL_CURVE`` / ``$IPP_ENABLE_CURVE`` ask for CURVE.

    Returns
    -------
    bool or None
        ``None`` when neither is set (or both are empty).
    """
    env = os.environ if environ is None else environ
    for var in ENABLE_ENV_VARS:
        value = env.get(var, "").strip()
        if value:
            return value.lower() in _TRUE
    return None


def check_key(value: Any, what: str) -> str:
    """Validate a Z85 CURVE key and return it as ``str``.

    Parameters
    ----------
    value : str or bytes
        40 Z85 characters.
    what : str
        What the key is and where it came from, for the error message.

    Raises
    ------
    ValueError
        Not a string of 40 Z85 characters.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not a Z85-encoded CURVE key") from None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) != 40 or not set(value) <= _Z85:
        raise ValueError(
            f"{what} is not a Z85-encoded CURVE key (40 characters of the Z85 alphabet)"
        )
    return value


def serverkey_of(info: Mapping[str, Any], source: str) -> str | None:
    """The validated ``curve_serverkey`` of connection info, or ``None`` without CURVE.

    Raises
    ------
    ConnectionFileError
        The entry is present but not a valid key.
    """
    value = info.get("curve_serverkey")
    if value in (None, ""):
        return None
    try:
        return check_key(value, f"{source}: 'curve_serverkey'")
    except ValueError as e:
        raise ConnectionFileError(str(e)) from None


def keypair() -> tuple[str, str]:
    """A fresh key pair ``(public, secret)``, Z85 strings."""
    from . import _core

    public, secret = _core.curve_keypair()
    return str(public), str(secret)


def public_key(secret: str | bytes) -> str:
    """The public key (Z85) that belongs to ``secret``."""
    from . import _core

    return str(_core.curve_public_key(secret))


def client_socket_options(
    serverkey: str | None, keys: tuple[str, str] | None = None
) -> dict[str, str]:
    """Keyword arguments for ``IoThread.add_socket`` of a client or engine socket.

    Parameters
    ----------
    serverkey : str or None
        The controller's public key; ``None``: no CURVE (an empty dict).
    keys : tuple of str, optional
        This process's ``(public, secret)`` pair; a fresh one by default.

    Returns
    -------
    dict
        ``curve_serverkey``, ``curve_publickey`` and ``curve_secretkey``, or ``{}``.
    """
    if not serverkey:
        return {}
    if not available():
        raise RuntimeError(
            "the connection info asks for CurveZMQ (curve_serverkey), but this build of "
            "ferroparallel._core has no CURVE support"
        )
    public, secret = keys if keys is not None else keypair()
    return {"curve_serverkey": serverkey, "curve_publickey": public, "curve_secretkey": secret}


#: What libzmq's monitor tells when the server hung up during the handshake (handshake.rs).
_PEER_CLOSED = "the peer closed the connection during the handshake"


def describe_handshake_failures(
    failures: list[tuple[str, str, str]], curve: bool | None = None
) -> str:
    """One sentence about failed handshakes (``IoThread.handshake_failures()``), or ``""``.

    ``curve``: whether this side uses CurveZMQ (None: unknown). A server that hangs up on a
    peer without CURVE is one that requires it (libzmq reports either a mechanism mismatch or
    just the hang-up, whichever it sees first), so the hang-up is then described as that.
    """
    if not failures:
        return ""
    reasons: dict[str, list[str]] = {}
    for sock, endpoint, reason in failures:
        if curve is False and reason.startswith(_PEER_CLOSED):
            reason = (
                f"{_PEER_CLOSED}: a security mechanism mismatch, the controller probably "
                "requires CurveZMQ (is curve_serverkey missing from the connection info?)"
            )
        reasons.setdefault(reason, []).append(f"{sock} ({endpoint})")
    parts = [f"{reason} [{', '.join(where)}]" for reason, where in reasons.items()]
    return "; the ZMQ handshake with the controller failed: " + "; ".join(parts)
