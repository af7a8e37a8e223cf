"""``ferroparallel cluster start|stop|list|clean``: manage local clusters from the shell."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .. import __version__, paths
from ..config_files import load_py_config
from ..error import ConnectionFileError
from . import _engines_link

__all__ = ["ALREADY_STARTED", "ALREADY_STOPPED", "main", "build_parser"]

#: Exit status of ``cluster start`` when the cluster is already running (ipcluster's).
ALREADY_STARTED = 10
#: Exit status of ``cluster stop`` when there is no such cluster to stop (ipcluster's).
ALREADY_STOPPED = 11


class _Terminate(BaseException):
    """Raised from the SIGTERM/SIGHUP handler of a foreground ``cluster start``."""


def _trap_termination() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP stop the foreground command cleanly (as Ctrl-C does); returns
    the previous handlers, to put back."""
    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, _on_terminate)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # in the background of a shell script, which ignores SIGINT for it: ``kill -INT``
        # still stops it, as ipcluster
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    return old


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate(signum)


def _add_profile_args(p: argparse.ArgumentParser, cluster_id: bool = True) -> None:
    p.add_argument("--profile", help="profile name (default: 'default')")
    p.add_argument("--profile-dir", help="profile directory (overrides --profile)")
    if cluster_id:
        p.add_argument("--cluster-id", default="", help="cluster id (default: '')")


def build_parser(prog: str = "ferroparallel cluster") -> argparse.ArgumentParser:
    """The argument parser of the cluster command."""
    p = argparse.ArgumentParser(
        prog=prog, description="Start, stop, list and clean clusters, or add engines to one."
    )
    p.add_argument(
        "--version", action="version", version=__version__, help="print the version and exit"
    )
    sub = p.add_subparsers(dest="action", metavar="{start,stop,list,clean,engines}")
    sub.required = True

    s = sub.add_parser(
        "start",
        help="start a controller and engines",
        epilog="Arguments after '--' go to the controller, as ipcluster's "
        "(e.g. 'start -n 4 -- --sqlitedb'). Exit status 10 (ipcluster's ALREADY_STARTED): "
        "the cluster is already running.",
    )
    _add_profile_args(s)
    s.add_argument("-n", "--n", type=int, default=None, help="number of engines (default: CPUs)")
    _add_daemonize(s, "return once the cluster is up and leave it running in the background")
    s.add_argument("--ip", help="controller interface (default 127.0.0.1)")
    s.add_argument(
        "--curve",
        dest="curve",
        action="store_true",
        default=None,
        help="encrypt and authenticate every connection with CurveZMQ (default: "
        "$FERROPARALLEL_CURVE / $IPP_ENABLE_CURVE)",
    )
    s.add_argument("--no-curve", dest="curve", action="store_false", help="do not use CurveZMQ")
    s.add_argument("--log-level", help="log level of the controller and engines")
    s.add_argument(
        "--debug", action="store_true", help="the same as --log-level DEBUG (ipcluster's)"
    )
    s.add_argument("--location", help="host name written to the connection files")
    s.add_argument(
        "--delay",
        type=float,
        default=None,
        help="seconds to pause between starting the controller and the engines",
    )
    s.add_argument(
        "--config",
        metavar="FILE",
        help="a config file (ipcluster_config.py style: c.Cluster.n = 4) read after the "
        "profile's; --Class.trait=value options (ipcluster's) go after both",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for engines to register (default 60)",
    )
    s.add_argument(
        "--controller-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra controller argument (repeatable), e.g. --controller-arg=--ping=500",
    )
    s.add_argument(
        "--engine-arg", action="append", default=[], metavar="ARG", help="extra engine argument"
    )
    s.add_argument(
        "--controller",
        default=None,
        metavar="LAUNCHER",
        help="how to start the controller: 'local' (default), 'mpi' (under mpiexec -n 1), "
        "'ssh' (on c.SSHControllerLauncher.hostname, its connection files fetched back) or a "
        "batch system: 'slurm', 'pbs', 'sge', 'lsf', 'htcondor' (ipcluster's --controller=Slurm; "
        "settings in the profile's config, e.g. c.SlurmControllerLauncher.queue)",
    )
    s.add_argument(
        "--engines",
        default=None,
        metavar="LAUNCHER",
        help="how to start the engines: 'local' (default), 'mpi' (one mpiexec job whose "
        "ranks are the engines; ipcluster's --engines=MPI), 'ssh' (hosts from the profile's "
        "config: c.SSHEngineSetLauncher.engines), 'sshproxy' (one ssh connection to "
        "c.SSHProxyEngineSetLauncher.hostname runs 'cluster engines -n N' there) or a batch "
        "system: 'slurm', 'pbs', 'sge', "
        "'lsf', 'htcondor' (one job whose tasks are the engines; c.SlurmEngineSetLauncher.queue, "
        "...)",
    )
    _add_work_dir(s)
    s.add_argument(
        "--mpi-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra mpiexec argument for --engines mpi (repeatable)",
    )

    s = sub.add_parser(
        "stop",
        help="stop a cluster started by 'cluster start' or the API",
        epilog="Exit status 11 (ipcluster's ALREADY_STOPPED): no such cluster to stop; "
        "0 for --all when the profile has none.",
    )
    _add_profile_args(s)
    s.add_argument(
        "cluster_ids",
        nargs="*",
        metavar="CLUSTER_ID",
        help="ids of the clusters to stop (ipcluster's 'stop ID ...'; default: --cluster-id)",
    )
    s.add_argument("--all", action="store_true", help="stop every cluster of the profile")
    s.add_argument(
        "--signal",
        metavar="SIG",
        help="accepted for ipcluster's 'stop --signal=N' (which does not use it either): "
        "the cluster is stopped as by Cluster.stop_cluster",
    )

    s = sub.add_parser("list", help="list clusters")
    _add_profile_args(s, cluster_id=False)
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")

    s = sub.add_parser("clean", help="remove state and connection files of stopped clusters")
    _add_profile_args(s, cluster_id=False)

    s = sub.add_parser(
        "engines",
        help="start more engines for a running cluster (as 'ipcluster engines')",
        description="Start a set of engines connected to a running cluster's controller; "
        "'cluster stop' stops them with the cluster.",
    )
    _add_profile_args(s)
    s.add_argument("-n", "--n", type=int, default=None, help="number of engines (default: CPUs)")
    _add_daemonize(s, "return once the engines are up and leave them running in the background")
    s.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for engines to register"
    )
    _add_work_dir(s)
    s.add_argument(
        "--engines",
        default=None,
        metavar="LAUNCHER",
        help="how to start them (default: as the cluster's engines were started): 'local', "
        "'mpi', 'ssh', 'sshproxy', 'slurm', 'pbs', 'sge', 'lsf', 'htcondor'",
    )
    # (for SSHProxyEngineSetLauncher: see _engines_link)
    s.add_argument("--stdin-link", action="store_true", help=argparse.SUPPRESS)
    # no abbreviations: ipcluster's --controller=Local must not be taken for --controller-arg
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = False
    for parser in sub.choices.values():  # (as ``ipcluster start --version``)
        parser.add_argument(
            "--version", action="version", version=__version__, help=argparse.SUPPRESS
        )
    return p


def _bool_word(value: str) -> bool:
    """``True``/``False`` (any case, or 1/0, yes/no) as ipcluster's ``--daemonize=True``."""
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {value!r}")


def _add_work_dir(p: argparse.ArgumentParser) -> None:
    """ipcluster's ``--work-dir``: the working directory the processes are started in."""
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="working directory of the started processes (ipcluster's; default: the current one)",
    )


def _to_work_dir(args: argparse.Namespace) -> str | None:
    """Change to ``args.work_dir`` (after making the path options absolute, so that they keep
    naming what they named), as ipcluster does before starting anything. Returns an error
    message, or None."""
    work_dir = getattr(args, "work_dir", None)
    if not work_dir:
        return None
    target = os.path.abspath(os.path.expanduser(work_dir))
    if not os.path.isdir(target):
        return f"--work-dir {work_dir}: not a directory"
    for name in ("profile_dir", "config"):
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))
    os.chdir(target)
    return None


def _add_daemonize(p: argparse.ArgumentParser, text: str) -> None:
    """``--daemonize``, also in ipcluster's ``--daemonize=True`` / ``=False`` form."""
    p.add_argument(
        "--daemonize",
        nargs="?",
        const=True,
        default=False,
        type=_bool_word,
        metavar="BOOL",
        help=text,
    )


def _profile_dirs(args: argparse.Namespace) -> list[Path]:
    """The profile given on the command line, or every profile under the root."""
    if args.profile or args.profile_dir:
        return [paths.profile_dir(args.profile, args.profile_dir, create=False)]
    root = paths.profile_root()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.name.startswith("profile_") and d.is_dir())


def _cluster_files(pdir: Path) -> Iterator[Path]:
    sec = paths.security_dir(pdir)
    if sec.is_dir():
        yield from sorted(sec.glob("cluster-*.json"))


def _profile_name(pdir: Path) -> str:
    """The profile's name when it is in the profile root, else its directory (as
    ``ipcluster list`` shows it)."""
    in_root = pdir.parent == paths.profile_root() and pdir.name.startswith("profile_")
    return pdir.name[len("profile_") :] if in_root else str(pdir)


def _err(msg: str) -> None:
    print(f"ferroparallel cluster: {msg}", file=sys.stderr, flush=True)


# -- start ---------------------------------------------------------------------------------------


def _wait_registered(
    cluster: Any, n: int, timeout: float, abort: Callable[[], bool] | None = None
) -> int:
    """Wait until ``n`` engines are registered with the hub; return how many are.

    Raises
    ------
    RuntimeError
        An engine set or the controller failed, or ``abort()`` became true.
    """
    from ._hub import registered_engines

    info = paths.load_connection_file(cluster.client_file, "client")
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        engines = registered_engines(info, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if engines is not None:
            count = len(engines)
            if count >= n:
                return count
        failure = next(filter(None, (es.failure() for es in cluster.engines.values())), None)
        if failure:
            raise RuntimeError(failure)
        if cluster.controller is not None and not cluster.running:
            raise RuntimeError(cluster.controller.failure() or "the controller stopped")
        if abort is not None and abort():
            raise RuntimeError("stopped by the launcher before the engines registered")
        if time.monotonic() >= deadline:
            return count
        time.sleep(0.05)


def _start(args: argparse.Namespace) -> int:
    from traitlets import TraitError
    from traitlets.config import Config

    from .cluster import Cluster

    if args.n is not None and args.n < 0:
        _err("-n must not be negative")
        return 2
    config = Config()
    if args.config:
        try:
            config.merge(load_py_config(args.config))
        except ValueError as e:
            _err(f"--config: {e}")
            return 2
    if getattr(args, "trait_config", None):
        config.merge(args.trait_config)
    if args.mpi_arg:
        config.MPIEngineSetLauncher.mpi_args = list(args.mpi_arg)
    try:
        given = {  # options left out of the command line leave the profile's config alone
            k: v
            for k, v in (
                ("n", args.n),
                ("controller_ip", args.ip),
                ("curve", args.curve),
                ("log_level", "DEBUG" if args.debug else args.log_level),
                ("controller_location", args.location),
                ("delay", args.delay),
                ("engine_timeout", args.timeout),
                ("engines", args.engines),
                ("controller", args.controller),
                ("controller_args", args.controller_arg + args.passthrough or None),
                ("engine_args", args.engine_arg or None),
            )
            if v is not None
        }
        cluster = Cluster(
            profile=args.profile,
            profile_dir=args.profile_dir,
            cluster_id=args.cluster_id,
            shutdown_atexit=not args.daemonize,
            config=config,
            **given,
        )
    except (NotImplementedError, TraitError) as e:  # (a bad --Class.trait=value among them)
        _err(str(e))
        return 2
    try:
        cluster._check_not_running_elsewhere()
    except RuntimeError as e:
        _err(str(e))
        return ALREADY_STARTED
    old = _trap_termination()
    try:
        try:
            cluster.start_cluster_sync(args.n)
            n = cluster.n or 0
            count = _wait_registered(cluster, n, cluster.engine_timeout)
        except (RuntimeError, TimeoutError, OSError, ValueError) as e:
            _err(f"failed to start cluster {cluster.cluster_id!r}: {e}")
            cluster.stop_cluster_sync()
            return 1
        ctl = cluster.controller
        assert ctl is not None  # (started above)
        print(
            f"Cluster {cluster.cluster_id!r} started in {cluster.profile_dir}: "
            f"{ctl.describe()}, {n} engine(s), {count} registered",
            flush=True,
        )
        if count < n:
            _err(f"only {count} of {n} engines registered within {cluster.engine_timeout:g} s")
        if args.daemonize:
            return 0
        print("Press Ctrl-C to stop the cluster.", flush=True)
        while cluster.running:
            time.sleep(0.2)
        clean = ctl.stopped_cleanly()  # 'cluster stop' or a hub shutdown request
        failure = None if clean else ctl.failure()
        cluster.stop_cluster_sync()
        if clean:
            print("The cluster was stopped.", flush=True)
            return 0
        _err(failure or "the controller stopped")
        return 1
    except (KeyboardInterrupt, _Terminate):
        print("Stopping the cluster...", flush=True)
        for sig in (signal.SIGINT, *old):
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop_cluster_sync()
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# -- engines -------------------------------------------------------------------------------------


def _engines(args: argparse.Namespace) -> int:
    from ._hub import registered_engines
    from .cluster import Cluster

    if args.n is not None and args.n < 0:
        _err("-n must not be negative")
        return 2
    link = _engines_link.StdinLink() if args.stdin_link else None
    if link is not None:
        link.trap_signals()
    try:
        if link is not None:  # (the connection files sent by the launcher are all there is)
            raise FileNotFoundError("started by an SSH proxy launcher")
        cluster = Cluster.from_file(
            profile=args.profile,
            profile_dir=args.profile_dir,
            cluster_id=args.cluster_id,
            shutdown_atexit=False,
        )
        standalone = False
    except (FileNotFoundError, ValueError) as e:
        # a controller started on its own (``ferroparallel controller``), as ipcluster engines
        # serves one started by ipcontroller: its connection files are all there is
        cluster = Cluster(
            profile=args.profile,
            profile_dir=args.profile_dir,
            cluster_id=args.cluster_id,
            shutdown_atexit=False,
        )
        if not (cluster.engine_file.is_file() and cluster.client_file.is_file()):
            _err(
                f"no running cluster or controller {args.cluster_id!r} to add engines to ({e}; "
                f"no {cluster.engine_file.name} either)"
            )
            return 1
        standalone = True
    if not standalone and not cluster.running:
        _err(f"the controller of cluster {cluster.cluster_id!r} is not running")
        return 1
    info = paths.load_connection_file(cluster.client_file, "client")
    registered = registered_engines(info, timeout=5.0)
    if registered is None and standalone:
        _err(f"the controller of {cluster.client_file} does not answer")
        return 1
    before = len(registered or [])
    if link is not None:
        _engines_link.unrecorded(cluster)
    try:
        if args.engines is not None:
            cluster.engine_launcher_class = args.engines
        elif link is not None:  # (not the profile's launcher: that may be this proxy itself)
            cluster.engine_launcher_class = "local"
        esid = cluster.start_engines_sync(args.n)
    except (RuntimeError, OSError, NotImplementedError) as e:
        _err(f"failed to start engines: {e}")
        return 1
    n = cluster.engines[esid].n
    if link is not None:
        return _serve_link(link, cluster, esid, before, args.timeout)
    try:
        count = _wait_registered(cluster, before + n, args.timeout) - before
    except RuntimeError as e:
        _err(str(e))
        cluster.stop_engines_sync(esid)
        return 1
    print(
        f"Started {n} engine(s) for cluster {cluster.cluster_id!r} in {cluster.profile_dir} "
        f"(engine set {esid}), {count} registered",
        flush=True,
    )
    if args.daemonize:
        return 0
    old = _trap_termination()
    try:
        print("Press Ctrl-C to stop these engines.", flush=True)
        while cluster.engines[esid].running:
            time.sleep(0.2)
        # they ended by themselves: out of the cluster file (gone with the last of the
        # cluster), unless the cluster was stopped from elsewhere and its file is gone already
        if Path(cluster.cluster_file).exists():
            cluster.stop_engines_sync(esid)
        return 0
    except (KeyboardInterrupt, _Terminate):
        print("Stopping the engines...", flush=True)
        cluster.stop_engines_sync(esid)
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _serve_link(
    link: _engines_link.StdinLink, cluster: Any, esid: str, before: int, timeout: float
) -> int:
    """``cluster engines --stdin-link`` once the engines started: wait for them, then serve
    the link; the engines stop however this ends (the ssh channel that is stdout and stderr
    may be gone: nothing written there may keep them running)."""
    try:
        n = cluster.engines[esid].n
        count = _wait_registered(cluster, before + n, timeout, link.stopping) - before
        with contextlib.suppress(OSError):
            print(f"Started {n} engine(s) in {cluster.profile_dir}, {count} registered", flush=True)
        return 0 if _engines_link.serve(link, cluster, esid) else 1
    except RuntimeError as e:
        with contextlib.suppress(OSError):
            _err(str(e))
        return 1
    finally:
        cluster.stop_engines_sync(esid)


# -- stop ----------------------------------------------------------------------------------------


def _stop(args: argparse.Namespace) -> int:
    from .cluster import Cluster

    pdir = paths.profile_dir(args.profile, args.profile_dir, create=False)
    if args.all:
        files = list(_cluster_files(pdir))
        if not files:  # (nothing to do: ipcluster stop --all exits 0 then)
            print(f"No clusters to stop in {pdir}", flush=True)
            return 0
    else:
        from .cluster import cluster_file

        files = [cluster_file(pdir, cid) for cid in args.cluster_ids or [args.cluster_id]]
    status = 0
    for f in files:
        try:
            cluster = Cluster.from_file(f)
        except (FileNotFoundError, ValueError) as e:
            cid = f.name[len("cluster-") : -len(".json")]
            _err(f"{e}" if args.all else f"no cluster {cid!r} in {pdir} ({e})")
            # ipcluster's status for a cluster file that is not there; 1 for a broken one
            gone = isinstance(e, FileNotFoundError) and not args.all
            status = status or (ALREADY_STOPPED if gone else 1)
            continue
        cluster.stop_cluster_sync()
        print(f"Stopped cluster {cluster.cluster_id!r} in {cluster.profile_dir}", flush=True)
    return status


# -- list ----------------------------------------------------------------------------------------


def _launcher_label(kind: str) -> str:
    """The LAUNCHER column of ``ipcluster list`` for an engine launcher ``kind`` (``"local"``,
    ``"mpi"``, ``"slurm"``…): its class name without ``EngineSetLauncher`` (``"Local"``,
    ``"MPI"``, ``"Slurm"``…), as ipyparallel prints it."""
    from . import batch
    from .launchers import LocalEngineSetLauncher
    from .mpi import MPIEngineSetLauncher
    from .ssh_engines import SSHEngineSetLauncher
    from .ssh_proxy import SSHProxyEngineSetLauncher

    classes: dict[str, type] = {
        "local": LocalEngineSetLauncher,
        "mpi": MPIEngineSetLauncher,
        "ssh": SSHEngineSetLauncher,
        "sshproxy": SSHProxyEngineSetLauncher,
        **batch.ENGINE_LAUNCHERS,
    }
    cls = classes.get(kind)
    return cls.__name__.removesuffix("EngineSetLauncher") if cls is not None else kind


def _list_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .cluster import Cluster

    rows = []
    for pdir in _profile_dirs(args):
        for f in _cluster_files(pdir):
            try:
                cluster = Cluster.from_file(f)
            except (FileNotFoundError, ValueError) as e:
                _err(f"skipping {f}: {e}")
                continue
            running_engines = sum(es.running_count for es in cluster.engines.values())
            rows.append(
                {
                    "profile": _profile_name(pdir),
                    "profile_dir": str(pdir),
                    "cluster_id": cluster.cluster_id,
                    "running": cluster.running,
                    "n": sum(es.n for es in cluster.engines.values()),
                    "engines_running": running_engines,
                    "launcher": _launcher_label(str(cluster.engine_launcher_class)),
                    "controller_pid": (
                        cluster.controller.process.pid
                        if cluster.controller is not None and cluster.controller.process
                        else None
                    ),
                    "cluster_file": str(f),
                    # ipcluster list -o json prints Cluster.to_dict(): its keys too
                    **cluster.to_dict(),
                }
            )
    return sorted(rows, key=lambda r: (r["profile_dir"], r["cluster_id"]))


def _list(args: argparse.Namespace) -> int:
    rows = _list_rows(args)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    # ipcluster list's table: the same columns, widths and order (the unnamed cluster as '')
    print(f"{'PROFILE':16} {'CLUSTER ID':32} {'RUNNING':7} {'ENGINES':7} LAUNCHER")
    for r in rows:
        cid = r["cluster_id"] or repr("")
        print(f"{r['profile']:16} {cid:32} {r['running']!s:7} {r['n']:7} {r['launcher']}")
    return 0


# -- clean ---------------------------------------------------------------------------------------


def _port_open(info: dict[str, Any]) -> bool | None:
    """Whether something listens on the registration port (None: cannot tell from here)."""
    iface = str(info.get("interface", ""))
    host = iface.partition("://")[2]
    local = {"127.0.0.1", "localhost", "*", "0.0.0.0", "", "::1"}
    if host not in local and info.get("location") != socket.gethostname():
        return None
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, int(info["registration"])), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return None


def _connection_cluster_id(name: str) -> str | None:
    for role in paths.ROLES:
        suffix = f"-{role}.json"
        if name.startswith("ipcontroller") and name.endswith(suffix):
            middle = name[len("ipcontroller") : -len(suffix)]
            if middle == "":
                return ""
            if middle.startswith("-"):
                return middle[1:]
    return None


def _clean(args: argparse.Namespace) -> int:
    from .cluster import Cluster

    removed: list[Path] = []

    def rm(f: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            removed.append(f)

    for pdir in _profile_dirs(args):
        live_ids: set[str] = set()
        for f in _cluster_files(pdir):
            try:
                cluster = Cluster.from_file(f)
            except (FileNotFoundError, ValueError):
                rm(f)
                continue
            if cluster._anything_running():
                live_ids.add(cluster.cluster_id)
                continue
            rm(f)
            rm(cluster.client_file)
            rm(cluster.engine_file)
        sec = paths.security_dir(pdir)
        if not sec.is_dir():
            continue
        for f in sorted(sec.glob("ipcontroller*-client.json")):
            cid = _connection_cluster_id(f.name)
            if cid is None or cid in live_ids:
                continue
            try:
                info = paths.load_connection_file(f)
            except ConnectionFileError:
                alive: bool | None = False
            else:
                alive = _port_open(info)
            if alive is False:
                rm(f)
                rm(paths.connection_file(pdir, "engine", cid))
    for f in removed:
        print(f"removed {f}")
    if not removed:
        print("nothing to clean")
    return 0


#: ipcluster's traitlets options, ``--Class.trait=value`` (the value in the same argument).
_TRAIT_OPTION = re.compile(r"^--[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` before the first ``--`` and the arguments after it (ipcluster's
    ``start -- --sqlitedb``: extra controller arguments)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ferroparallel cluster``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, passthrough = _split_passthrough(argv)
    trait_args = [a for a in argv if _TRAIT_OPTION.match(a)]  # ipcluster's --Cluster.n=4
    args = build_parser().parse_args([a for a in argv if a not in trait_args])
    args.passthrough = passthrough
    if passthrough and args.action != "start":
        _err(f"arguments after '--' ({' '.join(passthrough)}) are for 'start' (the controller's)")
        return 2
    args.trait_config = None
    if trait_args:
        if args.action != "start":
            _err(f"{' '.join(trait_args)}: configuration options are for 'start'")
            return 2
        from traitlets.config.loader import KVArgParseConfigLoader

        args.trait_config = KVArgParseConfigLoader(argv=trait_args).load_config()
    problem = _to_work_dir(args)
    if problem:
        _err(problem)
        return 2
    handlers = {
        "start": _start,
        "stop": _stop,
        "list": _list,
        "clean": _clean,
        "engines": _engines,
    }
    try:
        return handlers[args.action](args)
    except ValueError as e:
        _err(str(e))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
