"""Profile directories and connection files.

A *profile* is a directory holding everything one configuration of ferroparallel writes:
``security/`` (connection files and cluster state files, mode 0700), ``log/`` (process logs,
engine state) and the optional ``ferroparallel_controller_config.py``. Profile ``NAME`` lives in
``<root>/profile_NAME``; the root is ``$FERROPARALLEL_DIR`` or ``~/.ferroparallel``.

Connection files are the JSON files the controller writes so that clients and engines can find
it: ``<profile_dir>/security/ipcontroller[-<cluster_id>]-{client,engine}.json``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .error import ConnectionFileError

__all__ = [
    "ROLES",
    "profile_root",
    "profile_dir",
    "ipython_profile_dir",
    "config_files",
    "security_dir",
    "log_dir",
    "connection_file",
    "load_connection_file",
    "validate_connection_info",
    "write_connection_file",
    "check_permissions",
    "warn_if_no_key",
]

log = logging.getLogger("ferroparallel.security")

#: The two kinds of connection file.
ROLES = ("client", "engine")

_ENV_ROOT = "FERROPARALLEL_DIR"
_DEFAULT_PROFILE = "default"

# Keys every connection file must have, and the integer port keys per role.
_COMMON_REQUIRED = ("interface", "registration", "key")
_ROLE_PORTS: dict[str, tuple[str, ...]] = {
    "client": ("registration", "control", "mux", "task", "iopub", "notification"),
    "engine": ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong"),
}


def profile_root() -> Path:
    """The directory holding every profile.

    Returns
    -------
    Path
        ``$FERROPARALLEL_DIR`` when set (and not empty), else ``~/.ferroparallel``; not created.
    """
    env = os.environ.get(_ENV_ROOT)
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".ferroparallel"


def profile_dir(
    profile: str | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    create: bool = True,
) -> Path:
    """Resolve (and by default create) a profile directory.

    Parameters
    ----------
    profile : str, optional
        Profile name; ``"default"`` when neither this nor ``profile_dir`` is given.
    profile_dir : str or os.PathLike, optional
        Explicit directory; wins over ``profile``.
    create : bool
        Create the directory with ``security/`` (mode 0700) and ``log/`` when missing.

    Returns
    -------
    Path
        The absolute profile directory.
    """
    if profile_dir is not None and os.fspath(profile_dir) != "":
        path = Path(profile_dir).expanduser().absolute()
    else:
        name = profile or _DEFAULT_PROFILE
        if os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"invalid profile name {name!r}: use profile_dir for a path")
        path = profile_root() / f"profile_{name}"
    if create:
        sec = path / "security"
        sec.mkdir(parents=True, exist_ok=True)
        if (sec.stat().st_mode & 0o777) != 0o700:
            os.chmod(sec, 0o700)
        (path / "log").mkdir(exist_ok=True)
    return path


def ipython_profile_dir(profile: str | None) -> Path:
    """IPython's directory of profile ``profile``: ``$IPYTHONDIR/profile_<profile>``
    (``~/.ipython`` when ``$IPYTHONDIR`` is not set), where ipyparallel keeps its profiles and
    ``ipython profile create --parallel`` writes their config files; not created."""
    root = os.environ.get("IPYTHONDIR") or "~/.ipython"
    return Path(root).expanduser().absolute() / f"profile_{profile or _DEFAULT_PROFILE}"


def config_files(profile_dir: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """The config files ``names`` of a profile that exist, in the order to load them (later
    ones win); each ``NAME.py`` of ``names`` brings its ``NAME.json`` right after it.

    For a profile of the profile root (``profile_dir("NAME")``), those of IPython's profile of
    the same name come first (:func:`ipython_profile_dir`: what ``ipython profile create
    --parallel --profile=NAME`` wrote), then the profile directory's own.

    Parameters
    ----------
    profile_dir : str or os.PathLike
        The profile directory.
    names : sequence of str
        File names, the ones that win last (``("ipcluster_config.py",
        "ferroparallel_config.py")``).

    Returns
    -------
    list of Path
        The existing files.
    """
    pdir = Path(profile_dir).expanduser().absolute()
    dirs = [pdir]
    if pdir.parent == profile_root() and pdir.name.startswith("profile_"):
        ipython = ipython_profile_dir(pdir.name[len("profile_") :])
        if ipython != pdir:
            dirs.insert(0, ipython)
    found = []
    for d in dirs:
        for name in names:
            # as traitlets' applications: NAME.json beside NAME.py, loaded after it (so it wins)
            twins = [name, name[: -len(".py")] + ".json"] if name.endswith(".py") else [name]
            found += [d / n for n in twins if (d / n).is_file()]
    return found


def security_dir(profile_dir: str | os.PathLike[str]) -> Path:
    """``<profile_dir>/security``."""
    return Path(profile_dir) / "security"


def log_dir(profile_dir: str | os.PathLike[str]) -> Path:
    """``<profile_dir>/log``."""
    return Path(profile_dir) / "log"


def connection_file(profile_dir: str | os.PathLike[str], role: str, cluster_id: str = "") -> Path:
    """Path of a connection file.

    Parameters
    ----------
    profile_dir : str or os.PathLike
        The profile directory.
    role : {"client", "engine"}
        Which file.
    cluster_id : str
        Cluster id; ``""`` for the unnamed cluster of the profile.

    Returns
    -------
    Path
        ``<profile_dir>/security/ipcontroller[-<cluster_id>]-<role>.json``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    stem = f"ipcontroller-{cluster_id}" if cluster_id else "ipcontroller"
    return security_dir(profile_dir) / f"{stem}-{role}.json"


def validate_connection_info(
    info: Any, source: str | os.PathLike[str], role: str | None = None
) -> dict[str, Any]:
    """Check a decoded connection dict and return a normalised copy.

    ``exec_key`` (IPython.parallel 0.x) is accepted as an alias of ``key``. An empty key is
    accepted with a WARNING (see :func:`warn_if_no_key`).

    Parameters
    ----------
    info : Any
        The decoded JSON value.
    source : str or os.PathLike
        Where it came from (a file path or e.g. ``"IPP_CONNECTION_INFO"``), used in errors.
    role : {"client", "engine"}, optional
        Also require the ports of that role.

    Returns
    -------
    dict
        A copy of ``info``.

    Raises
    ------
    ConnectionFileError
        Not a JSON object, a required key missing, or a port that is not an integer.
    """
    src = os.fspath(source)
    if not isinstance(info, dict):
        raise ConnectionFileError(
            f"connection file {src} does not hold a JSON object (got {type(info).__name__})"
        )
    out = dict(info)
    if "key" not in out and "exec_key" in out:
        out["key"] = out["exec_key"]
    required = list(_COMMON_REQUIRED)
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        required += [k for k in _ROLE_PORTS[role] if k not in required]
    missing = [k for k in required if k not in out]
    if missing:
        hint = ""
        if "url" in out:
            hint = " (it looks like a file written by IPython.parallel 0.x, which is not supported)"
        raise ConnectionFileError(
            f"connection file {src} is missing key(s) {', '.join(missing)}{hint}"
        )
    ports = _ROLE_PORTS[role] if role is not None else ("registration",)
    for k in ports:
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
            raise ConnectionFileError(f"connection file {src}: {k!r} is not a valid port: {v!r}")
    if not isinstance(out["interface"], str) or "://" not in out["interface"]:
        raise ConnectionFileError(
            f"connection file {src}: 'interface' must look like 'tcp://ip', not "
            f"{out['interface']!r}"
        )
    if not isinstance(out["key"], str):
        raise ConnectionFileError(f"connection file {src}: 'key' must be a string")
    from .curve import serverkey_of

    if "curve_serverkey" in out:
        out["curve_serverkey"] = serverkey_of(out, f"connection file {src}")
    warn_if_no_key(out, src)
    return out


def check_permissions(path: str | os.PathLike[str]) -> list[str]:
    """Warn when a connection file or its security directory is open to other users.

    A connection file holds the HMAC key, and anyone holding the key can run code on the
    engines: the file should be mode 0600 and the profile's ``security/`` directory 0700.
    Nothing is changed; each problem is logged as a WARNING (logger ``ferroparallel.security``)
    and returned. Does nothing on Windows.

    Parameters
    ----------
    path : str or os.PathLike
        The connection file.

    Returns
    -------
    list of str
        The warnings (empty when the modes are tight or cannot be read).
    """
    if os.name != "posix":
        return []
    p = Path(path)
    problems = []
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return []
    if mode & 0o077:
        problems.append(
            f"connection file {p} is accessible by other users (mode {mode:04o}): anyone who can "
            f"read its key can run code on your engines; run `chmod 600 {p}`"
        )
    parent = p.parent
    if parent.name == "security":
        try:
            dmode = stat.S_IMODE(parent.stat().st_mode)
        except OSError:
            dmode = 0
        if dmode & 0o077:
            problems.append(
                f"security directory {parent} is accessible by other users (mode {dmode:04o}); "
                f"run `chmod 700 {parent}`"
            )
    for text in problems:
        log.warning("%s", text)
    return problems


def warn_if_no_key(info: Mapping[str, Any], source: str | os.PathLike[str]) -> bool:
    """Log a WARNING when connection info has an empty key (messages are then not signed).

    Parameters
    ----------
    info : Mapping
        Connection info.
    source : str or os.PathLike
        Where it came from, for the message.

    Returns
    -------
    bool
        True when the key is empty.
    """
    if info.get("key"):
        return False
    log.warning(
        "connection info from %s has an empty key: messages are not signed, and anyone who can "
        "reach the controller's ports can run code on the engines",
        os.fspath(source),
    )
    return True


def load_connection_file(path: str | os.PathLike[str], role: str | None = None) -> dict[str, Any]:
    """Read and validate a connection file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    role : {"client", "engine"}, optional
        Also require the ports of that role.

    Returns
    -------
    dict
        The connection info.

    Raises
    ------
    ConnectionFileError
        The file is missing, unreadable, not valid JSON, or lacks required keys; the message
        names the file.

    Notes
    -----
    File and security-directory modes looser than 0600/0700 are logged as warnings
    (:func:`check_permissions`).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConnectionFileError(f"connection file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConnectionFileError(f"cannot read connection file {p}: {e}") from e
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConnectionFileError(f"connection file {p} is not valid JSON: {e}") from e
    check_permissions(p)
    return validate_connection_info(info, p, role)


def write_connection_file(path: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
    """Write a connection file atomically with mode 0600.

    The JSON goes to a private temporary file in the same directory, which is then renamed
    over ``path``; readers never see a partial file.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory must exist.
    info : Mapping
        JSON-serialisable connection info.
    """
    p = Path(path)
    data = json.dumps(dict(info), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
