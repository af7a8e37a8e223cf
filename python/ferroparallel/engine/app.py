"""``ferroparallel engine``: command line and entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__, paths
from ..config_files import split_trait_options, trait_options_config
from ..controller.config import parse_log_level
from ..curve import SERVERKEY_ENV_VAR, check_key
from ..error import FerroParallelError
from ..ssh import choose_server
from . import stdin_link
from .connection import ENV_VARS, channel_urls, load_connection_info, tunnel_urls, validate
from .kernel import EXIT_FAILED, EngineConfig, EngineKernel
from .logs import setup_logging
from .mpi import init_mpi
from .startup import EngineFileConfig, Startup, load_engine_config

log = logging.getLogger(__name__)


def build_parser(prog: str = "ferroparallel engine") -> argparse.ArgumentParser:
    """The engine's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Start one engine and connect it to a running controller. The connection info "
            "comes from --file, else from $FERROPARALLEL_CONNECTION_INFO or "
            "$IPP_CONNECTION_INFO (JSON of the engine connection file), else from "
            "<profile dir>/security/ipcontroller[-<cluster id>]-engine.json."
        ),
    )
    p.add_argument(
        "--version", action="version", version=__version__, help="print the version and exit"
    )
    p.add_argument("--profile", default=None, help="profile name (default: 'default')")
    p.add_argument("--profile-dir", default=None, help="profile directory (wins over --profile)")
    p.add_argument("--cluster-id", default="", help="cluster id in the connection file name")
    p.add_argument(
        "--file",
        "-f",
        default=None,
        metavar="PATH",
        help="engine connection file to use (default: c.IPEngine.url_file of the profile's "
        "config); '-': its JSON on the first line of stdin, then "
        "stdin links the engine to its launcher (see ferroparallel.engine.stdin_link)",
    )
    p.add_argument(
        "--wait-for-file",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the connection file to appear (default 10, or "
        "c.IPEngine.wait_for_url_file)",
    )
    p.add_argument("--id", type=int, default=None, help="engine id to request")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the registration reply (default 10, or c.IPEngine.timeout)",
    )
    p.add_argument(
        "--max-missed-pings",
        type=int,
        default=None,
        metavar="N",
        help="exit after N checks (one per heartbeat period + 0.5 s) without a ping, as "
        "ipyparallel's engines (default 50, or c.IPEngine.max_heartbeat_misses; 0 never "
        "exits)",
    )
    p.add_argument(
        "--ssh",
        default=None,
        metavar="SERVER",
        help="reach the controller through SSH tunnels to [user@]host[:port] "
        "(default: the file's 'ssh' entry when the controller is on another host; with only "
        "--sshkey, the controller's host)",
    )
    p.add_argument("--sshkey", default=None, metavar="FILE", help="SSH private key file")
    p.add_argument(
        "--no-ipython",
        dest="use_ipython",
        action="store_false",
        help="run execute_request as plain Python even when IPython is installed",
    )
    p.add_argument(
        "--mpi",
        action="store_true",
        help="started by mpiexec: initialise MPI (mpi4py), ask for the MPI rank as engine id, "
        "and give user code MPI, mpi_rank and mpi_size",
    )
    p.add_argument(
        "-c",
        dest="startup_command",
        default=None,
        metavar="CODE",
        help="code to run once registered (ipengine's -c, c.IPEngine.startup_command; "
        "wins over the profile's config)",
    )
    p.add_argument(
        "-s",
        dest="startup_script",
        default=None,
        metavar="FILE",
        help="script to run once registered, before -c (ipengine's -s, "
        "c.IPEngine.startup_script; wins over the profile's config)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=parse_log_level,
        help="logging level: DEBUG, INFO (default), WARNING, ERROR, or a number (e.g. 40)",
    )
    p.epilog = (
        "ipengine's traitlets options are read as a config file after the profile's: "
        "--InteractiveShell.colors=nocolor, --InteractiveShell.xmode=Plain (the IPython "
        "shell's settings), --IPEngine.timeout=30, ...; the options above win over them."
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The engine's options; ``trait_config`` holds the traitlets options
    (``--InteractiveShell.colors=nocolor``) as a traitlets ``Config`` (None without any).
    Bad arguments raise ``SystemExit(2)`` (argparse)."""
    parser = build_parser()
    try:
        rest, options = split_trait_options(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    args.trait_config = trait_options_config(options) if options else None
    return args


def _profile_dir(args: argparse.Namespace) -> Path | None:
    """The engine's profile directory (where its config files are), None if there is none."""
    try:
        return paths.profile_dir(args.profile, args.profile_dir, create=False)
    except (OSError, ValueError):
        return None


def _present_as_kernel() -> None:
    """Show user code the process an ipyparallel (IPython kernel) engine shows it.

    ``sys.argv`` keeps only the program: the engine's own options would trip modules that parse
    the command line when imported (argparse, absl). ``''`` leads ``sys.path``, so that imports
    follow the working directory when user code changes it (``%px cd``, ``os.chdir``).
    """
    del sys.argv[1:]
    if "" not in sys.path:
        sys.path.insert(0, "")
    # ipyparallel's documented engine-side call, ``from ipyparallel.datapub import
    # publish_data``, reaches an ipykernel shell this engine does not have: the name means
    # ours here (the same function and signature), whether or not ipyparallel is installed.
    from .. import datapub

    sys.modules.setdefault("ipyparallel.datapub", datapub)


def _apply_config(args: argparse.Namespace) -> EngineFileConfig:
    """Read the profile's engine config files, then the traitlets command-line options, and
    fill in the options the command line left unset (``--file`` only when no connection info
    is in the environment, which wins as on ipyparallel); change to ``c.IPEngine.work_dir``
    when it is set."""
    cfg = load_engine_config(_profile_dir(args), args.trait_config)
    if args.file is None and cfg.url_file and not any(os.environ.get(v) for v in ENV_VARS):
        args.file = cfg.url_file
    if args.wait_for_file is None:
        args.wait_for_file = 10.0 if cfg.wait_for_url_file is None else cfg.wait_for_url_file
    if args.timeout is None:
        args.timeout = 10.0 if cfg.timeout is None else cfg.timeout
    if args.max_missed_pings is None:
        args.max_missed_pings = 50 if cfg.max_missed_pings is None else cfg.max_missed_pings
    if args.ssh is None and cfg.sshserver:
        args.ssh = cfg.sshserver
    if args.sshkey is None and cfg.sshkey:
        args.sshkey = cfg.sshkey
    if cfg.work_dir:
        os.chdir(cfg.work_dir)
    return cfg


def _startup(args: argparse.Namespace, startup: Startup) -> Startup:
    """The profile's startup settings, with ``-s`` / ``-c`` in place of theirs."""
    if args.startup_script is not None:
        startup.script = args.startup_script or None
    if args.startup_command is not None:
        startup.command = args.startup_command or None
    return startup


def main(argv: Sequence[str] | None = None) -> int:
    """Run one engine until it is shut down.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``ferroparallel engine`` (``sys.argv[1:]`` by default).

    Returns
    -------
    int
        0 after ``shutdown_request`` or SIGTERM; 1 when the connection info is missing or
        invalid or registration failed; 3 when the controller stopped sending heartbeats.
        Bad arguments raise ``SystemExit(2)`` (argparse).
    """
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        file_config = _apply_config(args)
    except OSError as e:  # c.IPEngine.work_dir missing
        log.error("cannot change to c.IPEngine.work_dir: %s", e)
        return EXIT_FAILED
    try:
        if args.file == stdin_link.STDIN:
            info, source = validate(stdin_link.read_info(), "stdin"), "stdin"
        else:
            info, source = load_connection_info(
                file=args.file,
                profile=args.profile,
                profile_dir=args.profile_dir,
                cluster_id=args.cluster_id,
                wait=args.wait_for_file,
            )
    except (FerroParallelError, OSError, ValueError) as e:
        log.error("%s", e)
        return EXIT_FAILED
    log.debug("connection info from %s", source)
    if not info.get("curve_serverkey"):
        env_key = os.environ.get(SERVERKEY_ENV_VAR, "").strip()
        if env_key:
            try:
                info["curve_serverkey"] = check_key(env_key, f"${SERVERKEY_ENV_VAR}")
            except ValueError as e:
                log.error("%s", e)
                return EXIT_FAILED
    if info.get("curve_serverkey"):
        log.info("using CurveZMQ: every connection to the controller is encrypted")
    if info["unpack"] != info["pack"]:
        log.warning(
            "pack %r and unpack %r differ; using %r", info["pack"], info["unpack"], info["pack"]
        )
    mpi = None
    if args.mpi:
        try:
            mpi = init_mpi()
        except RuntimeError as e:
            log.error("%s", e)
            return EXIT_FAILED
    urls = channel_urls(info)
    ssh = choose_server(info, args.ssh, args.sshkey)
    tunnels = None
    try:
        if ssh:
            urls = channel_urls(info, same_host=False)  # tunnels go to the TCP ports
            urls, tunnels = tunnel_urls(urls, ssh, args.sshkey, timeout=args.timeout)
            log.info("reaching the controller through SSH tunnels via %s (%s)", ssh, tunnels.mode)
        kernel = EngineKernel(
            info,
            urls,
            EngineConfig(
                requested_id=args.id if mpi is None else mpi.requested_id(args.id),
                timeout=args.timeout,
                max_missed_pings=args.max_missed_pings,
                use_ipython=args.use_ipython,
                startup=_startup(args, file_config.startup),
                shell_config=file_config.shell,
            ),
        )
    except (FerroParallelError, OSError, ValueError, RuntimeError) as e:
        log.error("cannot start the engine: %s", e)
        if tunnels is not None:
            tunnels.close()
        return EXIT_FAILED
    if mpi is not None:
        kernel.namespace.ns.update(mpi.namespace())
    if args.file == stdin_link.STDIN:
        stdin_link.follow(kernel)
    _present_as_kernel()
    kernel.shell.watch_ipython_import()
    try:
        return kernel.run()
    finally:
        if tunnels is not None:
            tunnels.close(grace=0.3)  # let the unregistration through
