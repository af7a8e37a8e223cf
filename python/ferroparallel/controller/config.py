"""Controller settings: defaults, the profile config file, and command-line overrides.

The config file is ``<profile_dir>/ferroparallel_controller_config.py``, a traitlets Python
config file::

    c = get_config()  # noqa
    c.Controller.ip = "0.0.0.0"
    c.Controller.ping = 1000         # heartbeat period, ms
    c.Controller.scheme = "lru"
    c.Controller.ports = "10101-10120"

A few ipyparallel names are read too (``c.IPController.ip``, ``c.HeartMonitor.period``,
``c.TaskScheduler.scheme_name`` ...). Precedence: defaults < config file < command line.
traitlets is imported only when a config file exists, so the common start-up stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config_files import load_py_config, split_trait_options, unused_settings

__all__ = [
    "CONFIG_FILENAME",
    "ENGINE_CHANNELS",
    "IPP_CONFIG_FILENAME",
    "CLIENT_CHANNELS",
    "SCHEMES",
    "ControllerSettings",
    "load_config_file",
    "parse_db",
    "parse_log_level",
    "parse_ports",
]

log = logging.getLogger("ferroparallel.controller")

CONFIG_FILENAME = "ferroparallel_controller_config.py"
#: ipyparallel's controller config file, also read from the profile (before ours, which wins):
#: its settings that ferroparallel knows (``_COMPAT_KEYS``) apply; the others are named in a
#: warning.
IPP_CONFIG_FILENAME = "ipcontroller_config.py"

#: Rust controller channel names, in port-pool allocation order (reference §1.6).
ENGINE_CHANNELS = (
    "registration",
    "control_engine",
    "mux_engine",
    "task_engine",
    "iopub_engine",
    "hb_ping",
    "hb_pong",
    "broadcast_engine",
)
CLIENT_CHANNELS = (
    "control_client",
    "mux_client",
    "task_client",
    "iopub_client",
    "notification",
    "broadcast_client",
)
ALL_CHANNELS = ENGINE_CHANNELS + CLIENT_CHANNELS

#: Task scheduler schemes understood by ipyparallel.
SCHEMES = ("leastload", "lru", "twobin", "weighted", "plainrandom")

_DB_ALIASES = {
    "memory": "memory",
    "dict": "memory",
    "dictdb": "memory",
    "sqlite": "sqlite",
    "sqlitedb": "sqlite",
    "none": "none",
    "nodb": "none",
    "no": "none",
}

_LEVELS = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "ERROR",
    "FATAL": "ERROR",
}

# Config sections/keys of ipyparallel that map onto ours.
_COMPAT_KEYS: dict[tuple[str, str], str] = {
    ("IPController", "ip"): "ip",
    ("IPController", "location"): "location",
    ("IPController", "ssh_server"): "ssh",
    ("IPController", "engine_ssh_server"): "engine_ssh",
    ("IPController", "reuse_files"): "reuse",
    ("IPController", "restore_engines"): "restore",
    ("IPController", "ports"): "ports",
    ("IPController", "engine_ports"): "engine_ports",
    ("IPController", "client_ports"): "client_ports",
    ("IPController", "regport"): "port",
    ("HeartMonitor", "period"): "ping",
    ("HeartMonitor", "max_heartmonitor_misses"): "hb_max_misses",
    ("TaskScheduler", "scheme_name"): "scheme",
    ("TaskScheduler", "hwm"): "hwm",
    ("TaskScheduler", "hwm_budget"): "hwm_budget",
    ("IPController", "db_class"): "db",
    ("IPController", "log_level"): "log_level",
    ("Application", "log_level"): "log_level",
    ("IPController", "enable_curve"): "curve",
    ("IPController", "curve_secretkey"): "curve_secretkey",
    ("IPController", "curve_publickey"): "curve_publickey",
    ("Session", "key"): "key",
    ("Session", "keyfile"): "keyfile",
}


#: ipyparallel's old names of the ``IPController`` section: their settings apply unless
#: ``IPController`` sets the same one (ipyparallel 7+ moves them over the same way).
_DEPRECATED_SECTIONS = ("HubFactory", "IPControllerApp")


class ConfigError(ValueError):
    """A setting has an invalid value (the message names the setting and its source)."""


def split_trait_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """Take ipyparallel's traitlets-style options (``--TaskScheduler.hwm=0``,
    ``--IPController.ip 0.0.0.0``) out of ``argv``.

    Returns
    -------
    tuple
        The other arguments, the settings of the options we know (``{"hwm": "0"}``; values
        are strings, coerced by :meth:`ControllerSettings.update`), and the options we do not
        implement (``"Class.trait"``), which the caller reports and ignores, as traitlets
        does with configuration no class uses.
    """
    try:
        rest, options = split_trait_options(argv)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    known: dict[str, Any] = {}
    unknown: list[str] = []
    for option in options:  # each "--Class.trait=value"
        dotted, _, value = option[2:].partition("=")
        section, _, key = dotted.partition(".")
        name = _COMPAT_KEYS.get((section, key))
        if name is None and section in _DEPRECATED_SECTIONS:
            name = _COMPAT_KEYS.get(("IPController", key))
        if name is None:
            unknown.append(dotted)
        else:
            known[name] = _unquote(value)
    return rest, known, unknown


def _unquote(value: str) -> str:
    """``'x'`` / ``"x"`` as traitlets' command line accepts them: the text inside."""
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def parse_ports(value: Any) -> list[int]:
    """Parse a port pool: ``"10101-10120"``, ``"10101,10105"``, an int or a list of those.

    Parameters
    ----------
    value : str, int or iterable
        The pool specification; ``None`` or ``""`` is an empty pool.

    Returns
    -------
    list of int
    """
    if value is None or value == "":
        return []
    if isinstance(value, bool):
        raise ConfigError(f"invalid port list {value!r}")
    if isinstance(value, int):
        items: Iterable[Any] = [value]
    elif isinstance(value, str):
        items = [part for part in value.replace(" ", ",").split(",") if part]
    else:
        items = value
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and "-" in item.strip("-"):
            lo, _, hi = item.partition("-")
            try:
                a, b = int(lo), int(hi)
            except ValueError:
                raise ConfigError(f"invalid port range {item!r}") from None
            if a > b:
                raise ConfigError(f"invalid port range {item!r}")
            out.extend(range(a, b + 1))
        else:
            try:
                out.append(int(item))
            except (TypeError, ValueError):
                raise ConfigError(f"invalid port {item!r}") from None
    for p in out:
        if not 0 < p < 65536:
            raise ConfigError(f"port {p} out of range")
    return out


def parse_db(value: str) -> str:
    """Normalise a task-record backend name to ``"memory"``, ``"sqlite"`` or ``"none"``."""
    key = str(value).strip().lower().rsplit(".", 1)[-1]  # (ipyparallel's class paths)
    if key.endswith("db") and key not in _DB_ALIASES:
        key = key[:-2]
    try:
        return _DB_ALIASES[key]
    except KeyError:
        raise ConfigError(f"unknown db backend {value!r}: use memory, sqlite or none") from None


def parse_log_level(value: str | int) -> str:
    """Normalise a log level (name or number) to one of DEBUG, INFO, WARNING, ERROR."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if n <= logging.DEBUG:
            return "DEBUG"
        if n <= logging.INFO:
            return "INFO"
        if n <= logging.WARNING:
            return "WARNING"
        return "ERROR"
    try:
        return _LEVELS[str(value).strip().upper()]
    except KeyError:
        raise ConfigError(f"unknown log level {value!r}") from None


@dataclasses.dataclass
class ControllerSettings:
    """Every setting of one controller run.

    Attributes
    ----------
    ip : str
        Interface to bind (``--ip``).
    location : str
        Hostname written to the connection files (default: this host's name).
    ssh : str
        SSH server for clients, written to the client connection file (``--ssh``; ``""``:
        none).
    engine_ssh : str
        SSH server for engines, written to the engine connection file (``--enginessh``;
        ``""``: none).
    ping : int
        Heartbeat period in ms (``--ping``).
    hb_max_misses : int
        Consecutive missed heartbeats before an engine is dropped.
    registration_timeout : int or None
        Pending registration timeout in ms (``None``: the controller's default).
    scheme : str
        Task scheduler scheme (``--scheme``).
    hwm : int or None
        Task scheduler high-water mark per engine (``--hwm``).
    hwm_budget : float or None
        Queue budget in ms of the adaptive depth (``--hwm-budget``): an engine whose tasks
        are short may hold as many as fit into this much of its measured service time (at
        most 32, never fewer than ``hwm``); 0 holds every engine to ``hwm`` exactly. Default:
        2 ms, or 0 when ``hwm`` is set (an explicit HWM is a strict bound).
    db : str
        Task record backend: ``memory``, ``sqlite`` or ``none`` (``--db``).
    db_path : str or None
        SQLite file (default ``<profile_dir>/tasks[-<cluster_id>].db``).
    db_record_limit : int or None
        Most task records kept by ``--db memory`` (``None``: the controller's default).
    db_size_limit : int or None
        Most bytes of task records kept by ``--db memory`` (``None``: the default, 1 GiB).
    restore : bool
        Re-register the engines of the previous run (``--restore``).
    reuse : bool
        Reuse existing, consistent connection files and keep them on exit (``--reuse``).
    key : str or None
        HMAC key (default: a fresh random 256-bit hex string per run; ipyparallel's
        ``Session.key``).
    keyfile : str or None
        File holding the HMAC key, surrounding whitespace aside (ipyparallel's
        ``Session.keyfile``); ``key`` wins.
    curve : bool
        Encrypt and authenticate every connection with CurveZMQ (``--curve``; default from
        ``$FERROPARALLEL_CURVE`` / ``$IPP_ENABLE_CURVE``).
    curve_secretkey : str or None
        The controller's CURVE secret key, Z85 (default: ``$IPP_CURVE_SECRETKEY``, else a
        fresh key pair per run). Never written to the connection files.
    curve_publickey : str or None
        Only checked against ``curve_secretkey`` (ipyparallel configures both).
    pack : str
        Message packer, ``msgpack`` or ``json``.
    signature_scheme : str
        Only ``hmac-sha256``.
    ports : list of int
        Port pool, consumed in the order of reference §1.6; the rest are random.
    engine_ports : list of int
        Port pool of the sockets engines connect to (registration included), consumed before
        ``ports`` (ipyparallel's ``IPController.engine_ports``).
    client_ports : list of int
        Port pool of the sockets only clients connect to, consumed before ``ports``
        (ipyparallel's ``IPController.client_ports``).
    port : int
        Registration port (0: from the pool or random).
    port_map : dict
        Explicit port per Rust channel name (wins over ``port`` and ``ports``).
    log_level : str
        DEBUG, INFO, WARNING or ERROR.
    ipc : bool
        Also bind every channel on an abstract Unix socket for peers on this host (Linux;
        ``--no-ipc`` or ``$FERROPARALLEL_IPC=0`` to turn off; see :mod:`ferroparallel.ipc`).
    """

    ip: str = "127.0.0.1"
    location: str = ""
    ssh: str = ""
    engine_ssh: str = ""
    ping: int = 3000
    hb_max_misses: int = 10
    registration_timeout: int | None = None
    scheme: str = "leastload"
    hwm: int | None = None
    hwm_budget: float | None = None
    db: str = "memory"
    db_path: str | None = None
    db_record_limit: int | None = None
    db_size_limit: int | None = None
    restore: bool = False
    reuse: bool = False
    key: str | None = None
    keyfile: str | None = None
    curve: bool = False
    curve_secretkey: str | None = None
    curve_publickey: str | None = None
    pack: str = "msgpack"
    signature_scheme: str = "hmac-sha256"
    ports: list[int] = dataclasses.field(default_factory=list)
    engine_ports: list[int] = dataclasses.field(default_factory=list)
    client_ports: list[int] = dataclasses.field(default_factory=list)
    port: int = 0
    port_map: dict[str, int] = dataclasses.field(default_factory=dict)
    log_level: str = "INFO"
    ipc: bool = True

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every setting."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def update(self, values: Mapping[str, Any], source: str) -> None:
        """Apply ``values`` (setting name -> raw value), validating each.

        Parameters
        ----------
        values : Mapping
            Raw values; ``None`` values are skipped.
        source : str
            Where they came from, for error messages.
        """
        names = set(self.field_names())
        for name, raw in values.items():
            if raw is None:
                continue
            if name not in names:
                raise ConfigError(f"{source}: unknown controller setting {name!r}")
            try:
                setattr(self, name, self._coerce(name, raw))
            except ConfigError as e:
                raise ConfigError(f"{source}: {name}: {e}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: invalid value {raw!r} for {name}: {e}") from None

    @staticmethod
    def _coerce(name: str, raw: Any) -> Any:
        if name in ("ping", "hb_max_misses", "port"):
            v = int(raw)
            if v < 0 or (name == "ping" and v == 0):
                raise ConfigError(f"must be positive, not {raw!r}")
            if name == "port" and v > 65535:
                raise ConfigError(f"a TCP port is at most 65535, not {raw!r}")
            return v
        if name in ("db_record_limit", "db_size_limit"):
            v = int(raw)
            if v <= 0:
                raise ConfigError(f"must be positive, not {raw!r}")
            return v
        if name in ("registration_timeout", "hwm"):
            v = int(raw)
            if v < 0:
                raise ConfigError(f"must not be negative, not {raw!r}")
            return v
        if name == "hwm_budget":
            v = float(raw)
            if not v >= 0 or v == float("inf"):
                raise ConfigError(f"must be a number of ms >= 0, not {raw!r}")
            return v
        if name in ("restore", "reuse", "curve", "ipc"):
            if isinstance(raw, str):
                return raw.strip().lower() in ("1", "true", "yes", "on")
            return bool(raw)
        if name == "db":
            return parse_db(raw)
        if name == "log_level":
            return parse_log_level(raw)
        if name in ("ports", "engine_ports", "client_ports"):
            return parse_ports(raw)
        if name == "scheme":
            v = str(raw).strip().lower()
            if v == "pure":  # ipyparallel's pure-ZMQ scheduler hands tasks out in turn
                return "lru"
            if v == "none":
                raise ConfigError(
                    "scheme 'none' (no task scheduler) is not supported: ferroparallel always "
                    f"schedules load-balanced tasks; use one of {', '.join(SCHEMES)}"
                )
            if v not in SCHEMES:
                raise ConfigError(f"unknown scheme {raw!r}: use one of {', '.join(SCHEMES)}")
            return v
        if name == "pack":
            v = str(raw).strip().lower()
            if v == "orjson":
                v = "json"
            if v not in ("msgpack", "json"):
                raise ConfigError(f"unsupported packer {raw!r}: use msgpack or json")
            return v
        if name == "signature_scheme":
            v = str(raw).strip().lower()
            if v != "hmac-sha256":
                raise ConfigError(f"unsupported signature scheme {raw!r}")
            return v
        if name == "port_map":
            if not isinstance(raw, Mapping):
                raise ConfigError("must be a dict of channel name -> port")
            out = {}
            for k, p in raw.items():
                if k not in ALL_CHANNELS:
                    raise ConfigError(f"unknown channel {k!r}: use {', '.join(ALL_CHANNELS)}")
                out[k] = parse_ports(p)[0] if p else 0
            return out
        if name == "key":
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        if name == "keyfile":
            return str(Path(os.fspath(raw)).expanduser())
        if name in ("curve_secretkey", "curve_publickey"):
            from ..curve import check_key

            try:
                return check_key(raw, name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if name in ("db_path",):
            return os.fspath(raw)
        return str(raw)

    def resolved_location(self) -> str:
        """``location`` or this machine's hostname."""
        return self.location or socket.gethostname()

    def requested_ports(self) -> dict[str, int]:
        """Port per Rust channel: ``port_map``, then ``port``, then the engine or client pool
        of the channel, then the common pool, then 0 (random)."""
        req = dict.fromkeys(ALL_CHANNELS, 0)
        req.update(self.port_map)
        if self.port and not self.port_map.get("registration"):
            req["registration"] = self.port
        taken = set(req.values())
        pools = {
            "engine": [p for p in self.engine_ports if p not in taken],
            "client": [p for p in self.client_ports if p not in taken],
            "common": [p for p in self.ports if p not in taken],
        }
        for ch in ALL_CHANNELS:
            if req[ch]:
                continue
            for pool in (pools["engine" if ch in ENGINE_CHANNELS else "client"], pools["common"]):
                while pool and pool[0] in taken:
                    pool.pop(0)
                if pool:
                    req[ch] = pool.pop(0)
                    taken.add(req[ch])
                    break
        return req


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a traitlets Python config file and extract the controller settings from it.

    Parameters
    ----------
    path : str or os.PathLike
        The ``*_config.py`` file.

    Returns
    -------
    dict
        Setting name -> raw value (validated later by :meth:`ControllerSettings.update`).

    Raises
    ------
    ConfigError
        The file cannot be loaded (the message names it).
    """
    p = Path(path)
    try:
        cfg = load_py_config(p)
    except ValueError as e:
        raise ConfigError(str(e)) from e.__cause__
    out: dict[str, Any] = {}
    for old in _DEPRECATED_SECTIONS:
        for key, value in cfg.get(old, {}).items():
            if key not in cfg["IPController"]:
                cfg["IPController"][key] = value
    for (section, key), name in _COMPAT_KEYS.items():
        if section in cfg and key in cfg[section] and section not in _DEPRECATED_SECTIONS:
            out[name] = cfg[section][key]
    ignored = unused_settings(cfg, set(_COMPAT_KEYS), skip={"Controller", *_DEPRECATED_SECTIONS})
    if ignored:
        log.warning(
            "config file %s: settings ferroparallel does not use: %s", p, ", ".join(ignored)
        )
    if "Controller" in cfg:
        names = set(ControllerSettings.field_names())
        for key, value in cfg["Controller"].items():
            if key not in names:
                raise ConfigError(f"config file {p}: unknown setting Controller.{key}")
            out[key] = value
    return out
