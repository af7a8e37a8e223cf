"""``ferroparallel controller``: configure and run the Rust controller in this process.

Python parses the settings, starts :class:`ferroparallel._core.Controller` (hub, relays,
scheduler and heartbeat on native threads), writes the two connection files from the ports the
controller actually bound, then only waits: no Python runs on the message path. SIGINT, SIGTERM
and SIGHUP stop the controller, remove the connection files and exit with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .. import __version__, paths
from ..serialize.shm import sweep as sweep_segments
from .config import (
    CONFIG_FILENAME,
    IPP_CONFIG_FILENAME,
    ConfigError,
    ControllerSettings,
    load_config_file,
    split_trait_args,
)

__all__ = ["main", "build_parser", "resolve_settings", "rust_config"]

log = logging.getLogger("ferroparallel.controller")

# CLI dest -> setting name, for options that map one to one.
_CLI_SETTINGS = (
    "ip",
    "location",
    "ssh",
    "engine_ssh",
    "ping",
    "scheme",
    "hwm",
    "hwm_budget",
    "db",
    "db_path",
    "db_record_limit",
    "db_size_limit",
    "ports",
    "port",
    "pack",
    "log_level",
)


class _Terminate(BaseException):
    """Raised from the SIGTERM/SIGHUP handler to leave the wait loop."""


def build_parser(prog: str = "ferroparallel controller") -> argparse.ArgumentParser:
    """The argument parser of the controller command."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a ferroparallel controller (hub, schedulers, heartbeat) in this process.",
    )
    p.add_argument(
        "--version", action="version", version=__version__, help="print the version and exit"
    )
    g = p.add_argument_group("profile")
    g.add_argument("--profile", help="profile name (default: 'default')")
    g.add_argument("--profile-dir", help="profile directory (overrides --profile)")
    g.add_argument("--cluster-id", default="", help="cluster id used in connection file names")
    g.add_argument(
        "--config",
        help=(
            f"config file (default: <profile_dir>/{IPP_CONFIG_FILENAME}, then "
            f"<profile_dir>/{CONFIG_FILENAME}, those that exist; for --profile NAME, "
            "$IPYTHONDIR/profile_NAME's first)"
        ),
    )
    g = p.add_argument_group("network")
    g.add_argument("--ip", help="interface to bind (default 127.0.0.1)")
    g.add_argument("--location", help="hostname written to the connection files")
    g.add_argument("--ssh", help="SSH server for clients, written to the client connection file")
    g.add_argument(
        "--enginessh",
        dest="engine_ssh",
        metavar="SSH",
        help="SSH server for engines, written to the engine connection file",
    )
    g.add_argument("--ports", help="port pool, e.g. 10101-10120 or 10101,10102")
    g.add_argument("--port", type=int, help="registration port")
    g = p.add_argument_group("behaviour")
    g.add_argument("--ping", type=int, metavar="MS", help="heartbeat period in ms (default 3000)")
    g.add_argument("--scheme", help="task scheduler scheme (default leastload)")
    g.add_argument("--hwm", type=int, help="task scheduler high-water mark per engine")
    g.add_argument(
        "--hwm-budget",
        type=float,
        metavar="MS",
        help="adaptive queue budget: engines with short tasks may hold more than the HWM "
        "(default 2 ms, or 0 when --hwm is given: exactly --hwm)",
    )
    g.add_argument("--db", help="task record backend: memory (default), sqlite or none")
    for flag, value in (("--dictdb", "memory"), ("--sqlitedb", "sqlite"), ("--nodb", "none")):
        g.add_argument(flag, dest="db", action="store_const", const=value, help=f"--db {value}")
    g.add_argument("--db-path", help="SQLite file for --db sqlite")
    g.add_argument(
        "--db-record-limit",
        type=int,
        help="most task records kept in memory (--db memory, default 20000); the oldest are culled",
    )
    g.add_argument(
        "--db-size-limit",
        type=int,
        metavar="BYTES",
        help="most bytes of task records kept in memory (--db memory)",
    )
    g.add_argument("--pack", help="message packer: msgpack (default) or json")
    g.add_argument(
        "--restore",
        action="store_true",
        default=None,
        help="re-register the engines of the previous run",
    )
    g.add_argument(
        "--reuse",
        action="store_true",
        default=None,
        help="reuse existing consistent connection files and keep them on exit",
    )
    g.add_argument("--log-level", help="DEBUG, INFO (default), WARNING or ERROR")
    g.add_argument(
        "--ipc",
        dest="ipc",
        action="store_true",
        default=None,
        help="also listen on abstract Unix sockets for clients and engines on this host "
        "(default on Linux, unless $FERROPARALLEL_IPC=0)",
    )
    g.add_argument(
        "--no-ipc", dest="ipc", action="store_false", help="listen on the TCP ports only"
    )
    g = p.add_argument_group("security")
    g.add_argument(
        "--no-key",
        "--insecure",
        dest="no_key",
        action="store_true",
        help="DANGEROUS: do not sign messages (empty key); anyone who can reach the ports can "
        "run code on the engines. Only for trusted, isolated networks.",
    )
    g.add_argument(
        "--curve",
        dest="curve",
        action="store_true",
        default=None,
        help="encrypt and authenticate every connection with CurveZMQ: the controller's public "
        "key goes into the connection files, and peers without it cannot connect "
        "(default: $FERROPARALLEL_CURVE or $IPP_ENABLE_CURVE)",
    )
    g.add_argument(
        "--no-curve",
        dest="curve",
        action="store_false",
        help="do not use CurveZMQ, even when the environment or config file asks for it",
    )
    return p


def resolve_settings(
    args: argparse.Namespace, profile_dir: Path
) -> tuple[ControllerSettings, Path | None]:
    """Defaults, then the config file, then the command line.

    Returns
    -------
    tuple
        The settings and the config file that was loaded last (``None`` if none).
    """
    settings = ControllerSettings()
    from ..curve import SECRETKEY_ENV_VAR, enabled_by_env

    env_curve = enabled_by_env()
    if env_curve is not None:
        settings.curve = env_curve
    from .. import ipc

    settings.ipc = ipc.enabled_by_env() and ipc.available()
    env_secret = os.environ.get(SECRETKEY_ENV_VAR, "").strip()
    if env_secret:
        settings.update({"curve_secretkey": env_secret}, f"${SECRETKEY_ENV_VAR}")
    cfg_files: list[Path]
    if args.config:
        cfg_file = Path(args.config).expanduser()
        if not cfg_file.is_file():
            raise ConfigError(f"config file {cfg_file} not found")
        cfg_files = [cfg_file]
    else:  # ipyparallel's file of the profile, then ours (which wins)
        cfg_files = paths.config_files(profile_dir, (IPP_CONFIG_FILENAME, CONFIG_FILENAME))
    for cfg_file in cfg_files:
        settings.update(load_config_file(cfg_file), f"config file {cfg_file}")
    traits = getattr(args, "trait_settings", None)
    if traits:  # ipyparallel's --Class.trait=value options, overridden by our own options
        settings.update(traits, "command line")
    cli = {name: getattr(args, name) for name in _CLI_SETTINGS}
    cli["restore"] = args.restore
    cli["reuse"] = args.reuse
    cli["curve"] = args.curve
    cli["ipc"] = args.ipc
    settings.update(cli, "command line")
    return settings, (cfg_files[-1] if cfg_files else None)


def curve_keys(settings: ControllerSettings) -> tuple[str, str] | None:
    """The controller's CURVE key pair ``(public, secret)``, or ``None`` without CURVE.

    The configured secret key (``curve_secretkey``, ``$IPP_CURVE_SECRETKEY``) when there is
    one, else a fresh pair.

    Raises
    ------
    ConfigError
        CURVE is not available in this build, or the configured public key does not belong to
        the secret key.
    """
    if not settings.curve:
        return None
    from .. import curve

    if not curve.available():
        raise ConfigError("--curve: this build of ferroparallel._core has no CURVE support")
    if settings.curve_secretkey:
        secret = settings.curve_secretkey
        public = curve.public_key(secret)
        if settings.curve_publickey and settings.curve_publickey != public:
            raise ConfigError("curve_publickey does not belong to curve_secretkey")
        return public, secret
    return curve.keypair()


def rust_config(
    settings: ControllerSettings,
    key: str,
    ports: dict[str, int],
    profile_dir: Path,
    cluster_id: str,
    curve_secretkey: str | None = None,
    ipc_prefix: str | None = None,
) -> dict[str, Any]:
    """The config dict of :class:`ferroparallel._core.Controller` (``ipc_prefix``: the
    endpoint prefix to keep, with ``--reuse``; default a fresh one when IPC is on)."""
    suffix = f"-{cluster_id}" if cluster_id else ""
    cfg: dict[str, Any] = {
        "ip": settings.ip,
        "ports": ports,
        "key": key.encode("ascii"),
        "signature_scheme": settings.signature_scheme,
        "pack": settings.pack,
        "hb_period_ms": settings.ping,
        "hb_max_misses": settings.hb_max_misses,
        "scheme": settings.scheme,
        "db": settings.db,
        "restore": settings.restore,
        "engine_state_file": str(paths.log_dir(profile_dir) / f"engines{cluster_id}.json"),
        "log_level": settings.log_level,
    }
    if settings.ipc:
        from .. import ipc

        if ipc.available():
            cfg["ipc_prefix"] = ipc_prefix or ipc.new_prefix()
    if curve_secretkey:
        cfg["curve_secretkey"] = curve_secretkey
    if settings.registration_timeout is not None:
        cfg["registration_timeout_ms"] = settings.registration_timeout
    if settings.hwm is not None:
        cfg["hwm"] = settings.hwm
    if settings.hwm_budget is not None:
        cfg["hwm_budget_ms"] = settings.hwm_budget
    elif settings.hwm is not None:
        # an explicit --hwm is a strict bound unless a budget is asked for as well
        cfg["hwm_budget_ms"] = 0.0
    if settings.db_record_limit is not None:
        cfg["db_record_limit"] = settings.db_record_limit
    if settings.db_size_limit is not None:
        cfg["db_size_limit"] = settings.db_size_limit
    if settings.db == "sqlite":
        cfg["db_path"] = settings.db_path or str(profile_dir / f"tasks{suffix}.db")
    return cfg


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname).1s %(asctime)s.%(msecs)03d %(name)s] %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the controller until it is stopped.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 after a clean stop, 1 on a configuration or start-up error, 2 on bad usage.
    """
    _setup_logging("INFO")
    try:
        rest, trait_settings, ignored = split_trait_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    args = build_parser().parse_args(rest)
    args.trait_settings = trait_settings
    for name in ignored:
        log.warning("ignoring --%s: not a setting of the ferroparallel controller", name)
    try:
        pdir = paths.profile_dir(args.profile, args.profile_dir, create=True)
        settings, cfg_file = resolve_settings(args, pdir)
    except (ConfigError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1
    _setup_logging(settings.log_level)
    if cfg_file is not None:
        log.debug("loaded config file %s", cfg_file)
    try:
        curve_pair = curve_keys(settings)
    except (ConfigError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    serverkey = curve_pair[0] if curve_pair else None
    file_key = None
    if settings.keyfile and not settings.key:
        try:
            file_key = Path(settings.keyfile).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            log.error("cannot read the key file (Session.keyfile) %s: %s", settings.keyfile, e)
            return 1

    from .. import _core

    if not hasattr(_core, "Controller"):
        log.error("this build of ferroparallel._core has no Controller")
        return 1

    from . import connection

    cid = args.cluster_id or ""
    client_file = paths.connection_file(pdir, "client", cid)
    engine_file = paths.connection_file(pdir, "engine", cid)

    reused = None
    if settings.reuse:
        reused = connection.reusable_files(settings, client_file, engine_file, serverkey)
    ipc_prefix = None
    if reused is not None:
        key, requested = reused
        ipc_prefix = connection.reused_ipc_prefix(client_file)
        log.info("reusing connection files %s and %s", client_file, engine_file)
        if not key and not args.no_key:
            log.warning("--reuse: the existing files have no key; using a fresh random key")
            key = connection.new_key()
    else:
        key = settings.key or file_key or os.environ.get("IPP_SESSION_KEY") or connection.new_key()
        requested = settings.requested_ports()
    if args.no_key:
        key = ""
        log.warning(
            "running WITHOUT a key (--no-key): messages are not signed, and anyone who can reach "
            "the controller's ports can run arbitrary code on the engines"
        )
    elif len(key) < 32:
        log.warning(
            "the configured key is only %d characters long; use a random key of at least 256 "
            "bits (the default when no key is configured)",
            len(key),
        )

    old_handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        if old_handlers[signal.SIGINT] is signal.SIG_IGN:
            # started in the background by a shell script (``ipcontroller &``), which ignores
            # SIGINT for it: ``kill -INT`` still stops it, as ipcontroller
            signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                old_handlers[sig] = signal.signal(sig, _on_terminate)

    controller = None
    wrote = False
    try:
        try:
            controller = _core.Controller(
                rust_config(
                    settings,
                    key,
                    requested,
                    pdir,
                    cid,
                    curve_secretkey=curve_pair[1] if curve_pair else None,
                    ipc_prefix=ipc_prefix,
                )
            )
            ports = controller.start()
        except (_Terminate, KeyboardInterrupt):
            raise
        except Exception as e:
            log.error("controller failed to start: %s: %s", type(e).__name__, e)
            return 1
        sweep_segments()  # /dev/shm segments left by crashed clients (see serialize.shm)
        ipc_endpoints = dict(controller.ipc_endpoints())
        client = connection.client_info(settings, key, ports, serverkey, ipc_endpoints)
        engine = connection.engine_info(settings, key, ports, serverkey, ipc_endpoints)
        for info in (client, engine):
            connection.add_link(info, controller.link_endpoint())
        # as ipyparallel's hub: registration replies carry the engine connection settings
        # (not the key: every engine already has it, and it must not travel in the clear);
        # set before the files exist, so that no engine can register before
        controller.set_engine_info({k: v for k, v in engine.items() if k != "key"})
        wrote = True
        connection.write_files(client_file, engine_file, client, engine)
        log.info(
            "controller ready (pid %d) on %s, registration port %d; client file %s",
            os.getpid(),
            client["interface"],
            client["registration"],
            client_file,
        )
        if serverkey:
            log.info(
                "CurveZMQ on: every connection is encrypted; peers need the server key %s "
                "(it is in the connection files)",
                serverkey,
            )
        while not controller.wait(1.0):
            pass
        log.info("controller stopped")
    except (_Terminate, KeyboardInterrupt) as e:
        name = signal.Signals(e.args[0]).name if isinstance(e, _Terminate) else "SIGINT"
        log.info("%s received, stopping the controller", name)
    finally:
        # A second signal during clean-up must not leave files behind.
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if controller is not None:
                if log.isEnabledFor(logging.DEBUG):
                    with contextlib.suppress(Exception):
                        log.debug("controller stats: %s", controller.stats())
                controller.stop()
        except Exception as e:  # pragma: no cover - depends on the Rust side
            log.warning("error while stopping the controller: %s", e)
        finally:
            if wrote and not settings.reuse:
                connection.remove_files(key, client_file, engine_file)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0
