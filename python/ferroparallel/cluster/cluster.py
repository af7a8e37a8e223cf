"""The Cluster API: start, stop and connect to a controller and engines on this machine.

Names and semantics follow ipyparallel 9: the methods that start or stop processes are
coroutines, each with a ``*_sync`` twin that works with or without a running event loop (inside
Jupyter it runs the coroutine on a helper thread)::

    import ferroparallel as ipp

    with ipp.Cluster(n=4) as rc:          # start_and_connect_sync(), then stop_cluster_sync()
        print(rc[:].apply_sync(os.getpid))

    cluster = ipp.Cluster(n=2, profile="work")
    rc = await cluster.start_and_connect()
    ...
    await cluster.stop_cluster()

The state of a started cluster is kept in ``<profile_dir>/security/cluster-<cluster_id>.json``
so that another process can find, inspect and stop it (:meth:`Cluster.from_file`,
``ferroparallel cluster stop|list``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import json
import logging
import os
import secrets
import signal
import string
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, Integer, List, Unicode, Union, default, validate
from traitlets.config import LoggingConfigurable
from traitlets.config.loader import LazyConfigValue

from .. import paths
from ..config_files import load_py_config
from ..error import ConnectionFileError
from . import batch, ssh_proxy
from ._sync import run_sync
from .launchers import LocalControllerLauncher, LocalEngineSetLauncher, Process
from .mpi import (
    MPI_CONTROLLER_LAUNCHERS,
    MPI_LAUNCHERS,
    MPIControllerLauncher,
    MPIEngineSetLauncher,
)
from .ssh_controller import SSH_CONTROLLER_LAUNCHERS, SSHControllerLauncher
from .ssh_engines import SSH_LAUNCHERS, SSHEngineSetLauncher
from .ssh_host import HOST_OPTIONS
from .ssh_proxy import SSH_PROXY_LAUNCHERS, SSHProxyEngineSetLauncher
from .user_launcher import UserLauncher, understood_settings, user_launcher

__all__ = ["Cluster", "cluster_file", "new_cluster_id", "run_sync"]

log = logging.getLogger("ferroparallel.cluster")

_ALPHABET = string.ascii_lowercase + string.digits


def new_cluster_id() -> str:
    """A fresh cluster id: ``<unix time>-<4 random characters>``."""
    return f"{int(time.time())}-{''.join(secrets.choice(_ALPHABET) for _ in range(4))}"


def cluster_file(profile_dir: str | os.PathLike[str], cluster_id: str) -> Path:
    """``<profile_dir>/security/cluster-<cluster_id>.json``."""
    return paths.security_dir(profile_dir) / f"cluster-{cluster_id}.json"


_cluster_file = cluster_file  # for methods whose parameter shadows the name


# -- clean-up at exit ----------------------------------------------------------------------------

#: Clusters to stop at exit when their shutdown_atexit is true then: those that started
#: something are held here (a Cluster object nobody keeps still has processes to stop), those
#: loaded from a file only weakly.
_atexit_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()
_started_clusters: set[Cluster] = set()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _stop_at_exit() -> None:
    for cluster in list(_started_clusters) + [
        c for c in list(_atexit_clusters) if c not in _started_clusters
    ]:
        if not cluster.shutdown_atexit:  # (the flag may have changed since it started)
            continue
        if cluster.controller is None and not cluster.engines:
            continue  # stopped already
        try:
            # as ipyparallel (but a closed or broken stderr must not leave it running); not for
            # a cluster stopped meanwhile through another Cluster object (what is left of it
            # is its files, removed quietly)
            alive = any(p.running for p in cluster._processes()) or cluster._batch_jobs()
            if alive:
                with contextlib.suppress(Exception):
                    print(f"Stopping cluster {cluster}", file=sys.stderr)
            cluster._stop_now()
        except Exception as e:  # pragma: no cover - best effort at exit
            log.warning("could not stop cluster %r at exit: %s", cluster.cluster_id, e)


def _track_for_exit(cluster: Cluster, started: bool = True) -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
        _atexit_clusters.add(cluster)
        if started:
            _started_clusters.add(cluster)


# -- the Cluster ---------------------------------------------------------------------------------


def _client_class() -> type:
    """The Client class, imported only when a client is wanted."""
    try:
        from .. import Client  # lazily exported by the package
    except ImportError as e:
        raise ImportError(
            "ferroparallel.Client is not available in this installation, so the cluster cannot "
            f"connect a client ({e}); the cluster itself can still be started and stopped"
        ) from e
    return Client


_LOCAL_LAUNCHERS = (
    "local",
    "localcontrollerlauncher",
    "localenginesetlauncher",
    "localengineset",
    "localenginelauncher",
)


def _known_launcher(name: str) -> str | None:
    """The launcher a class name means (as :func:`_launcher_name`), None if it means none."""
    kind = _launcher_name(name)
    return kind if kind in ("local", "mpi", "ssh", "sshproxy", *batch.BATCH_SYSTEMS) else None


def _launcher_name(value: Any) -> str:
    """``"local"``, ``"mpi"``, ``"ssh"``, ``"sshproxy"`` or a batch system (``"slurm"``, ...)
    for any spelling of those launchers (a name, a dotted path, a class)."""
    name = value if isinstance(value, str) else getattr(value, "__name__", str(value))
    short = name.rsplit(".", 1)[-1].lower()
    if short in _LOCAL_LAUNCHERS:
        return "local"
    if short in SSH_LAUNCHERS or short in SSH_CONTROLLER_LAUNCHERS:
        return "ssh"
    if short in SSH_PROXY_LAUNCHERS:
        return "sshproxy"
    if short in MPI_LAUNCHERS or short in MPI_CONTROLLER_LAUNCHERS:
        return "mpi"
    return batch.batch_system_of(name) or name


#: Settings of an SSH controller (``c.SSHControllerLauncher.<name>``, as ipyparallel's).
_SSH_CONTROLLER_OPTIONS = (*HOST_OPTIONS, "controller_cmd")


#: Config files of a profile read by :class:`Cluster` (ipyparallel's name first).
PROFILE_CONFIG_FILES = ("ipcluster_config.py", "ferroparallel_config.py")


def load_profile_config(profile_dir: str | os.PathLike[str]) -> Any:
    """The merged traitlets ``Config`` of the profile's :data:`PROFILE_CONFIG_FILES` that
    exist (empty when none does), IPython's profile of the same name first
    (:func:`ferroparallel.paths.config_files`).

    Raises
    ------
    ValueError
        If a file cannot be loaded, naming it.
    """
    from traitlets.config import Config

    merged = Config()
    for path in paths.config_files(profile_dir, PROFILE_CONFIG_FILES):
        merged.merge(load_py_config(path))
    return merged


#: ipcluster's older config names that ipyparallel 9 still reads (with a deprecation
#: warning): ``c.IPClusterEngines.engine_launcher_class`` means ``c.Cluster.engine_launcher_class``.
_LEGACY_SETTINGS = (
    ("IPClusterEngines", "engine_launcher_class", "engine_launcher_class"),
    ("IPClusterStart", "engine_launcher_class", "engine_launcher_class"),
    ("IPClusterStart", "controller_launcher_class", "controller_launcher_class"),
    ("IPClusterEngines", "n", "n"),
    ("IPClusterStart", "n", "n"),
    ("IPClusterStart", "delay", "delay"),
)


def _adopt_legacy_settings(config: Any) -> None:
    """Move ipcluster's older settings (:data:`_LEGACY_SETTINGS`) into ``config.Cluster``
    where it does not set them itself, with a warning naming the new spelling."""
    for section, key, name in _LEGACY_SETTINGS:
        if section in config and key in config[section]:
            if name not in config.Cluster:
                config.Cluster[name] = config[section][key]
            log.warning("c.%s.%s is deprecated: use c.Cluster.%s", section, key, name)


#: role -> launcher -> ipyparallel's config sections whose ``<role>_args`` its launcher takes
#: (general first; batch systems: :meth:`Cluster._launcher_arg_sections`)
_LAUNCHER_ARG_SECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "controller": {
        "local": ("ControllerLauncher", "LocalControllerLauncher"),
        "mpi": ("ControllerLauncher", "MPILauncher", "MPIControllerLauncher"),
        "ssh": ("ControllerLauncher", "SSHLauncher", "SSHControllerLauncher"),
    },
    "engine": {
        "local": ("EngineLauncher", "LocalEngineLauncher", "LocalEngineSetLauncher"),
        "mpi": ("EngineLauncher", "MPILauncher", "MPIEngineSetLauncher"),
        "ssh": ("EngineLauncher", "SSHLauncher", "SSHEngineLauncher", "SSHEngineSetLauncher"),
        "sshproxy": ("EngineLauncher", "SSHLauncher", "SSHProxyEngineSetLauncher"),
    },
}


class Cluster(LoggingConfigurable):
    """A controller and sets of engines on this machine, started as subprocesses.

    A traitlets ``Configurable`` as in ipyparallel: every parameter below is a trait, settable
    as a keyword, as an attribute before starting, or through ``config`` (``c.Cluster.n = 4``),
    observable with ``observe``.

    Parameters
    ----------
    n : int, optional
        Number of engines :meth:`start_engines` starts by default (else ``os.cpu_count()``).
    profile : str, optional
        Profile name; ``""`` (the default, as ipyparallel's) is the profile ``"default"``.
    profile_dir : str or os.PathLike, optional
        Profile directory (wins over ``profile``).
    cluster_id : str, optional
        Cluster id; a fresh ``<unix time>-<4 chars>`` id when not given. ``""`` is the profile's
        unnamed cluster (connection files ``ipcontroller-client.json`` etc.).
    controller_args, engine_args : sequence of str
        Extra command-line arguments of the controller / each engine; they follow those of
        ipyparallel's launcher config (``c.LocalControllerLauncher.controller_args``,
        ``c.EngineLauncher.engine_args``, ``c.SlurmEngineSetLauncher.engine_args``, ...).
    controller_ip : str, optional
        ``--ip`` of the controller; ``""`` (the default, as ipyparallel's): the controller's own.
    controller_location : str, optional
        ``--location`` of the controller; ``""`` (the default): the controller's own.
    curve : bool, optional
        ``True``: the controller encrypts and authenticates every connection with CurveZMQ
        (``--curve``); clients and engines take its public key from the connection files.
        ``False``: never (``--no-curve``). ``None`` (default): the controller's choice
        (``$FERROPARALLEL_CURVE`` / ``$IPP_ENABLE_CURVE``, its config file).
    log_level : str or int, optional
        ``--log-level`` of the controller and the engines.
    engine_timeout : float
        Seconds to wait for engines to register in :meth:`start_and_connect`.
    controller_timeout : float
        Seconds to wait for the controller's connection files.
    stop_timeout : float
        Seconds between SIGTERM and SIGKILL when stopping processes.
    delay : float
        Extra pause between the controller being ready and the engines being started (not
        needed: the engines start as soon as the controller wrote its connection files).
    send_engines_connection_env : bool
        Give engines their connection info in ``IPP_CONNECTION_INFO`` (else ``--file``).
    shutdown_atexit : bool
        Stop the processes this object started when the Python process exits.
    env : Mapping, optional
        Extra environment variables for the controller and engines (on top of ``os.environ``;
        SSH launchers send these, not ``os.environ``, to the remote host). Launchers add
        ipyparallel's ``environment`` (``c.BaseLauncher.environment``,
        ``c.SSHLauncher.environment``, ... and ``start_engines(environment=...)``).
    controller, engines : str
        Launchers (aliases of ``controller_launcher_class`` / ``engine_launcher_class``, as in
        ipyparallel): ``"local"`` (subprocesses); a batch system, ``"slurm"``, ``"pbs"``,
        ``"sge"``, ``"lsf"``, ``"htcondor"`` or ``"batch"`` (a job; see
        :mod:`ferroparallel.cluster.batch`, settings as ``c.SlurmEngineSetLauncher.queue``);
        ``"mpi"`` (engines: one ``mpiexec`` job whose ranks are the engines; the controller:
        ``mpiexec -n 1``; see :mod:`ferroparallel.cluster.mpi`, ``c.MPILauncher.mpi_args``);
        ``"ssh"`` (engines: ``c.SSHEngineSetLauncher.engines``, see
        :mod:`~ferroparallel.cluster.ssh_engines`; the controller on
        ``c.SSHControllerLauncher.hostname``, its connection files fetched back, see
        :mod:`~ferroparallel.cluster.ssh_controller`); ``"sshproxy"`` (engines only: one
        ``ssh`` connection to ``c.SSHProxyEngineSetLauncher.hostname`` runs
        ``ferroparallel cluster engines -n N`` there, see
        :mod:`~ferroparallel.cluster.ssh_proxy`). Any of ipyparallel's spellings works
        (``"SSHControllerLauncher"``, ``"ipyparallel.cluster.launcher.MPIControllerLauncher"``,
        a class).
    controller_cmd, engine_cmd : sequence of str, optional
        Commands replacing ``[sys.executable, "-m", "ferroparallel.controller"]`` /
        ``[sys.executable, "-m", "ferroparallel.engine"]``.
    load_profile : bool
        Read the profile's config files first, as ipyparallel does: ``ipcluster_config.py``
        and ``ferroparallel_config.py`` in the profile directory (``c.Cluster.n = 4``,
        ``c.SSHEngineSetLauncher.engines = {...}``, …). ``config`` and keywords win over
        them. Default True.
    config : traitlets.config.Config, optional
        Configuration (section ``Cluster``); keywords win over it.

    Attributes
    ----------
    profile_dir : str
        The resolved profile directory.
    cluster_id : str
        The cluster id.
    controller : LocalControllerLauncher or None
        The controller launcher once started (or loaded).
    engines : dict
        Engine set id -> :class:`LocalEngineSetLauncher`.
    """

    n = Integer(None, allow_none=True, help="engines to start by default").tag(config=True)
    profile = Unicode("", help="profile name ('': the default profile)").tag(config=True)
    profile_dir = Unicode("", help="profile directory (wins over profile)").tag(config=True)
    cluster_id = Unicode(None, allow_none=True, help="cluster id (default: a fresh one)").tag(
        config=True
    )
    controller_args = List(Unicode(), help="extra controller arguments").tag(config=True)
    engine_args = List(Unicode(), help="extra arguments of each engine").tag(config=True)
    controller_ip = Unicode("", help="--ip of the controller ('': its own)").tag(config=True)
    controller_location = Unicode("", help="--location of the controller ('': its own)").tag(
        config=True
    )
    curve = Bool(None, allow_none=True, help="CurveZMQ (None: the controller's choice)").tag(
        config=True
    )
    log_level = Union(
        [Integer(), Unicode()], default_value=None, allow_none=True, help="--log-level"
    ).tag(config=True)
    engine_timeout = Float(60.0, help="seconds to wait for engines to register").tag(config=True)
    controller_timeout = Float(30.0, help="seconds to wait for the controller").tag(config=True)
    stop_timeout = Float(5.0, help="seconds between SIGTERM and SIGKILL").tag(config=True)
    delay = Float(0.0, help="pause between controller and engines").tag(config=True)
    send_engines_connection_env = Bool(
        True, help="connection info in the engines' environment"
    ).tag(config=True)
    shutdown_atexit = Bool(True, help="stop what this object started at exit").tag(config=True)
    env = Dict(help="extra environment of the controller and engines").tag(config=True)
    # a name or a class (as ipyparallel's); validated to "local", "mpi", "ssh" or a batch system
    controller_launcher_class = AnyTrait("local", help="controller launcher").tag(config=True)
    engine_launcher_class = AnyTrait("local", help="engine launcher").tag(config=True)
    controller_cmd = List(Unicode(), default_value=None, allow_none=True).tag(config=True)
    engine_cmd = List(Unicode(), default_value=None, allow_none=True).tag(config=True)
    load_profile = Bool(True, help="read the profile's config files first").tag(config=True)
    controller = AnyTrait(None, allow_none=True, help="the controller launcher, once started")
    engines = Dict(help="engine set id -> engine set launcher")

    def __init__(
        self,
        *,
        engines: Any = None,
        controller: Any = None,
        **kwargs: Any,
    ) -> None:
        for alias, what, name in (
            (engines, "engines", "engine_launcher_class"),
            (controller, "controller", "controller_launcher_class"),
        ):
            if alias is not None:
                if name in kwargs:
                    raise TypeError(f"give only one of {what!r} or {name!r}, not both")
                kwargs[name] = alias
        for name in ("controller_args", "engine_args", "controller_cmd", "engine_cmd"):
            value = kwargs.get(name)
            if isinstance(value, str | bytes):
                raise TypeError(f"{name} must be a sequence of strings, not a string")
            if value is not None:
                kwargs[name] = list(value)
        if kwargs.get("profile_dir") is not None:
            kwargs["profile_dir"] = os.fspath(kwargs["profile_dir"])
        else:
            kwargs.pop("profile_dir", None)
        for name in ("profile", "controller_ip", "controller_location"):
            if name in kwargs and kwargs[name] is None:  # ('' is "not given", as ipyparallel's)
                kwargs[name] = ""
        if kwargs.get("env") is not None:
            kwargs["env"] = dict(kwargs["env"])
        else:
            kwargs.pop("env", None)
        if "cluster_id" in kwargs and kwargs["cluster_id"] is not None:
            kwargs["cluster_id"] = str(kwargs["cluster_id"])
        profile_config = None
        if kwargs.get("load_profile", True):
            pdir = paths.profile_dir(kwargs.get("profile"), kwargs.get("profile_dir"), create=False)
            profile_config = load_profile_config(pdir)
            if profile_config:
                merged = copy.deepcopy(profile_config)
                merged.merge(kwargs.get("config") or {})
                kwargs["config"] = merged
        if kwargs.get("config"):
            kwargs["config"] = copy.deepcopy(kwargs["config"])  # (not the caller's to change)
            _adopt_legacy_settings(kwargs["config"])
        self._profile_config = profile_config or None  # (what the profile's files say)
        super().__init__(**kwargs)
        self.profile_dir = str(
            paths.profile_dir(self.profile, self.profile_dir or None, create=True)
        )
        if self.cluster_id is None:
            self.cluster_id = new_cluster_id()
        self._engine_info: dict[str, Any] | None = None
        self._client: Any = None

    @default("log")
    def _default_log(self) -> logging.Logger:
        return log

    @property
    def profile_config(self) -> Any:
        """The config read from the profile's files when this Cluster was made (ipyparallel's
        attribute): a ``traitlets.config.Config``, empty with ``load_profile=False`` or when
        the profile has no config file. ``config`` is this merged with the given config."""
        from traitlets.config import Config

        read = getattr(self, "_profile_config", None)
        return copy.deepcopy(read) if read else Config()

    @validate("n")
    def _check_n(self, proposal: Any) -> int | None:
        n = proposal["value"]
        if n is not None and n < 0:
            raise ValueError(f"n={n}: the number of engines cannot be negative")
        return n

    @validate("controller_launcher_class", "engine_launcher_class")
    def _check_launcher(self, proposal: Any) -> str:
        """Any spelling of an available launcher becomes its short name (``"local"``,
        ``"slurm"``, ...), from a keyword, an attribute or a config file alike."""
        value = proposal["value"]
        what = proposal["trait"].name.split("_", 1)[0]
        user = None
        if isinstance(value, type) and _known_launcher(value.__name__) is None:
            # a user's subclass of a launcher: it runs as the launcher it derives from
            user = user_launcher(value, what, _known_launcher)
            if user is not None:
                value = user.kind
        if "_user_launchers" not in self.__dict__:
            self._user_launchers: dict[str, UserLauncher | None] = {}
        self._user_launchers[what] = user
        launcher = _launcher_name(value)
        systems = list(batch.BATCH_SYSTEMS)
        if launcher == "local" or launcher in systems:
            return launcher
        if launcher in ("mpi", "ssh") or (launcher == "sshproxy" and what == "engine"):
            return launcher
        available = ["local", "mpi", "ssh", *(["sshproxy"] if what == "engine" else []), *systems]
        raise NotImplementedError(
            f"{what} launcher {launcher!r} is not available; the available ones are "
            + ", ".join(repr(a) for a in available)
        )

    # -- properties --------------------------------------------------------------------------

    @property
    def cluster_file(self) -> str:
        """``<profile_dir>/security/cluster-<cluster_id>.json`` (a ``str``, as ipyparallel's)."""
        return str(self._cluster_path)

    @property
    def _cluster_path(self) -> Path:
        return cluster_file(self.profile_dir, self.cluster_id)

    @property
    def client_file(self) -> Path:
        """The client connection file of this cluster's controller."""
        return paths.connection_file(self.profile_dir, "client", self.cluster_id)

    @property
    def engine_file(self) -> Path:
        """The engine connection file of this cluster's controller."""
        return paths.connection_file(self.profile_dir, "engine", self.cluster_id)

    @property
    def engine_set(self) -> LocalEngineSetLauncher | None:
        """The first engine set, if any."""
        return next(iter(self.engines.values()), None)

    @property
    def running(self) -> bool:
        """True while the controller process is alive."""
        return self.controller is not None and self.controller.running

    def _processes(self) -> list[Process]:
        procs = [p for es in self.engines.values() for p in es.processes]
        if self.controller is not None and self.controller.process is not None:
            procs.append(self.controller.process)
        return procs

    def _batch_jobs(self) -> list[str]:
        """``"<system> job <id>"`` of the batch jobs of this cluster that may still run."""
        launchers = [*self.engines.values(), self.controller]
        return [
            f"{x.system} job {x.job_id}"
            for x in launchers
            if getattr(x, "job_id", None) is not None and x.running
        ]

    def _anything_running(self) -> bool:
        """Whether a process or batch job of this cluster may still run."""
        return any(p.running for p in self._processes()) or bool(self._batch_jobs())

    def __repr__(self) -> str:
        # as ipyparallel's: the profile by name when it is in the profile root, the directory
        # (with ~ for the home directory) otherwise; then what has been started
        fields = [f"cluster_id={self.cluster_id!r}"]
        pdir = Path(self.profile_dir)
        if pdir.parent == paths.profile_root() and pdir.name.startswith("profile_"):
            fields.append(f"profile={pdir.name[len('profile_') :]!r}")
        else:
            home = Path.home()
            shown = f"~/{pdir.relative_to(home)}" if pdir.is_relative_to(home) else str(pdir)
            fields.append(f"profile_dir={shown!r}")
        if self.controller is not None:
            fields.append(f"controller=<{'running' if self.controller.running else 'stopped'}>")
        if self.engines:
            fields.append(f"engine_sets={list(self.engines)}")
        return f"<{type(self).__name__}({', '.join(fields)})>"

    # -- environment and arguments -----------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def _launcher_arg_sections(self, role: str) -> tuple[str, ...]:
        """ipyparallel's config sections whose ``<role>_args`` apply to this cluster's
        ``role`` ("controller" or "engine") launcher, general first (as traitlets' class
        hierarchy: ``c.EngineLauncher`` < ``c.LocalEngineSetLauncher``)."""
        launcher = getattr(self, f"{role}_launcher_class")
        if launcher in batch.BATCH_SYSTEMS:
            kind = "Controller" if role == "controller" else "Engine"
            return (f"{kind}Launcher", *batch.config_sections(launcher, kind))
        return _LAUNCHER_ARG_SECTIONS[role].get(launcher, ())

    def _user_launcher(self, role: str) -> UserLauncher | None:
        """The user's launcher class for ``role`` (:mod:`.user_launcher`), if one was given."""
        return self.__dict__.get("_user_launchers", {}).get(role)

    def _launcher_config(self) -> Any:
        """``self.config`` as the launchers read it: with the settings of the user's launcher
        classes (:mod:`.user_launcher`) in the section of the launcher they run as (a class
        attribute wins over the config, a trait default loses to it, and config sections named
        after the user's classes apply as traitlets applies them)."""
        users = {r: self._user_launcher(r) for r in ("controller", "engine")}
        if not any(users.values()):
            return self.config
        cfg = copy.deepcopy(self.config)
        for role, user in users.items():
            if user is None:
                continue
            sections = ("BaseLauncher", *self._launcher_arg_sections(role))
            target = cfg[sections[-1]]
            for key, value in user.defaults.items():
                if not any(s in cfg and key in cfg[s] for s in sections):
                    target[key] = copy.deepcopy(value)
            for section in user.sections:
                if section in cfg:
                    keys = set(understood_settings(role, user.kind))
                    target.update({k: v for k, v in cfg[section].items() if k in keys})
            for key, value in user.fixed.items():
                target[key] = copy.deepcopy(value)
        return cfg

    def _user_cmd(self, role: str) -> list[str] | None:
        """The ``<role>_cmd`` of the user's launcher class for ``role``, if it sets one."""
        user = self._user_launcher(role)
        cmd = None if user is None else user.setting(f"{role}_cmd")
        return None if cmd is None else [str(a) for a in cmd]

    def _configured_args(self, role: str) -> list[str]:
        """``c.LocalControllerLauncher.controller_args`` / ``c.LocalEngineSetLauncher.
        engine_args`` (or a parent class's) of the config: what ipyparallel's launchers put
        before the cluster's own arguments."""
        key = f"{role}_args"
        args: list[str] = []
        config = self._launcher_config()
        for section in self._launcher_arg_sections(role):
            if section in config and key in config[section]:
                value = config[section][key]
                if isinstance(value, str | bytes):
                    raise TypeError(f"c.{section}.{key} must be a list of strings, not a string")
                args = [str(a) for a in value]
        return args

    def _environment(self, role: str, kwargs: dict[str, Any]) -> dict[str, str]:
        """ipyparallel's launcher ``environment`` for the ``role`` launcher: the config's
        (``c.BaseLauncher.environment``, ``c.SSHLauncher.environment``,
        ``c.LocalEngineSetLauncher.environment``, ...: the most specific section wins, as with
        traitlets), then the ``environment`` keyword of ``start_<role>`` (popped) on top.

        Raises
        ------
        TypeError
            A setting that is not a mapping.
        """
        out: dict[str, Any] = {}
        config = self._launcher_config()
        for section in ("BaseLauncher", *self._launcher_arg_sections(role)):
            if section in config and "environment" in config[section]:
                value = config[section]["environment"]
                if isinstance(value, LazyConfigValue):  # c.X.environment.update({...})
                    value = value.get_value(dict(out))
                if not isinstance(value, Mapping):
                    raise TypeError(f"c.{section}.environment must be a dict, not {value!r}")
                out = dict(value)
        given = kwargs.pop("environment", None) or {}
        if not isinstance(given, Mapping):
            raise TypeError(f"environment must be a dict, not {given!r}")
        return {str(k): str(v) for k, v in {**out, **given}.items()}

    def _controller_argv(self, launcher_args: Sequence[str] | None = None) -> list[str]:
        """The controller's arguments: the launcher's (``launcher_args``, else the config's),
        then the cluster's."""
        if launcher_args is None:
            args: list[str] = self._configured_args("controller")
        elif isinstance(launcher_args, str | bytes):
            raise TypeError("controller_args must be a list of strings, not a string")
        else:
            args = [str(a) for a in launcher_args]
        if self.controller_ip:
            args += ["--ip", self.controller_ip]
        if self.controller_location:
            args += ["--location", self.controller_location]
        if self.curve is not None:
            args.append("--curve" if self.curve else "--no-curve")
        if self.log_level is not None:
            args += ["--log-level", str(self.log_level)]
        return args + self.controller_args

    def _cluster_engine_argv(self) -> list[str]:
        """The engine arguments the cluster itself adds (ipyparallel's ``cluster_args``)."""
        return [] if self.log_level is None else ["--log-level", str(self.log_level)]

    def _engine_argv(self) -> list[str]:
        args = self._configured_args("engine") + self._cluster_engine_argv()
        return args + self.engine_args

    # -- starting ----------------------------------------------------------------------------

    def _check_not_running_elsewhere(self) -> None:
        f = self._cluster_path
        if not f.exists():
            return
        try:
            other = Cluster.from_file(f)
        except Exception:
            return  # unreadable state: a new start overwrites it
        mine = {p.pid for p in self._processes()}
        alive = [p.pid for p in other._processes() if p.pid not in mine and p.running]
        jobs = [j for j in other._batch_jobs() if j not in self._batch_jobs()]
        if alive or jobs:
            what = ", ".join([f"pids {alive}"] * bool(alive) + jobs)
            raise RuntimeError(
                f"cluster {self.cluster_id!r} is already running in {self.profile_dir} "
                f"({what}, state file {f}); stop it first"
            )

    async def start_controller(self, **kwargs: Any) -> None:
        """Start the controller and wait until it has written its connection files.

        Parameters
        ----------
        **kwargs
            Attributes of the launcher to override (``args``, ``env``, ``cmd``, or
            ipyparallel's ``controller_args`` (in place of the config's), ``environment``
            (added to the environment, on top of ``c.<Launcher>.environment``; for an SSH
            controller, sent to the remote host with ``env``) and ``controller_cmd``; for an
            MPI controller
            ``mpi_cmd`` and ``mpi_args``; for an SSH controller ``hostname``, ``user``,
            ``location``, ``ssh_cmd``, ``ssh_args``, ``remote_profile_dir`` and
            ``remote_python``). Unknown ones are ignored with a logged warning, as
            ipyparallel's launchers do.

        Raises
        ------
        RuntimeError
            The controller is already running, or it exited during start-up (with its log tail).
        TimeoutError
            No connection files within ``controller_timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"the controller of cluster {self.cluster_id!r} is already running")
        self._check_not_running_elsewhere()
        env = kwargs.pop("env", self._child_env())
        environment = self._environment("controller", kwargs)
        if self.controller_launcher_class != "ssh":  # (ssh: for the remote host, not here)
            env = {**env, **environment}
        args = self._controller_argv(kwargs.pop("controller_args", None))
        cmd = kwargs.pop("controller_cmd", self.controller_cmd)
        if cmd is None and self.controller_launcher_class != "ssh":  # (ssh: in its options)
            cmd = self._user_cmd("controller")
        common: dict[str, Any] = {
            "args": kwargs.pop("args", args),
            "env": env,
            "cmd": kwargs.pop("cmd", cmd),
        }
        launcher: LocalControllerLauncher
        system = self.controller_launcher_class
        if system in batch.BATCH_SYSTEMS:
            opts = self._batch_options(system, "Controller", kwargs)
            launcher = batch.controller_launcher(
                system, self.profile_dir, self.cluster_id, **common, **opts
            )
        elif system == "mpi":
            opts = self._launcher_options(
                kwargs, ("MPILauncher", "MPIControllerLauncher"), ("mpi_cmd", "mpi_args")
            )
            launcher = MPIControllerLauncher(
                self.profile_dir, self.cluster_id, **common, **{k: list(v) for k, v in opts.items()}
            )
        elif system == "ssh":
            opts = self._launcher_options(
                kwargs, ("SSHLauncher", "SSHControllerLauncher"), _SSH_CONTROLLER_OPTIONS
            )
            remote_cmd = opts.pop("controller_cmd", None)
            if remote_cmd is not None and common["cmd"] is None:  # the command on the host
                common["cmd"] = [str(a) for a in remote_cmd]
            launcher = SSHControllerLauncher(
                self.profile_dir,
                self.cluster_id,
                environment={**self.env, **environment},
                **common,
                **opts,
            )
        else:
            launcher = LocalControllerLauncher(self.profile_dir, self.cluster_id, **common)
        if kwargs:  # ipyparallel's launchers ignore unknown keywords (traitlets warns)
            log.warning("start_controller: ignoring unknown keyword arguments %s", sorted(kwargs))
        self.controller = launcher
        launcher.start()
        _track_for_exit(self)  # stopped at exit if shutdown_atexit is true then
        try:
            self._engine_info = await launcher.wait_ready(self.controller_timeout)
        except BaseException:
            await launcher.stop(self.stop_timeout)
            raise
        self.write_cluster_file()
        log.debug("controller of %r ready", self.cluster_id)

    def _load_engine_info(self) -> dict[str, Any]:
        if self.controller is not None and not self.controller.running:
            raise RuntimeError(
                f"the controller of cluster {self.cluster_id!r} is not running; "
                "start it with start_controller() or start_cluster()"
            )
        if self._engine_info is None:
            # A controller started by someone else: read its engine file.
            try:
                self._engine_info = paths.load_connection_file(self.engine_file, "engine")
            except ConnectionFileError as e:
                if self.controller is not None or self.engine_file.exists():
                    raise
                raise ConnectionFileError(
                    f"{e}: no controller to connect engines to; start one first with "
                    "start_cluster() or start_controller()"
                ) from e
        return self._engine_info

    def _new_engine_set_id(self) -> str:
        while True:
            esid = f"{int(time.time())}-{''.join(secrets.choice(_ALPHABET) for _ in range(4))}"
            if esid not in self.engines:
                return esid

    async def start_engines(
        self, n: int | None = None, engine_set_id: str | None = None, **kwargs: Any
    ) -> str:
        """Start a set of engines connected to this cluster's controller.

        Parameters
        ----------
        n : int, optional
            Number of engines (default ``self.n``, else, for ``"sshproxy"`` engines,
            ``c.SSHProxyEngineSetLauncher.n``, else ``os.cpu_count()``).
        engine_set_id : str, optional
            Id of the new set (default: a fresh one).
        **kwargs
            Launcher attributes to override (``args``, ``env``, ``cmd``, or ipyparallel's
            ``engine_args``, ``environment`` (added to the environment, on top of
            ``c.<Launcher>.environment``; for SSH engines, sent to the remote hosts with
            ``env``) and ``engine_cmd``; for MPI engines ``mpi_cmd`` and ``mpi_args``; for
            SSH proxy engines :data:`~.ssh_proxy.OPTIONS`, such as ``hostname``).
            Unknown ones are ignored with a logged warning, as ipyparallel's launchers do.

        Returns
        -------
        str
            The engine set id.
        """
        if n is not None and n < 0:
            raise ValueError(f"n={n}: the number of engines cannot be negative")
        info = self._load_engine_info()
        if n is None and self.n is None and self.engine_launcher_class == "sshproxy":
            n = self._launcher_options(kwargs, ("SSHProxyEngineSetLauncher",), ("n",)).get("n")
        if n is None:
            n = self.n if self.n is not None else (os.cpu_count() or 1)
        if self.n is None:
            self.n = n
        esid = engine_set_id or self._new_engine_set_id()
        if esid in self.engines and self.engines[esid].running:
            raise RuntimeError(f"engine set {esid!r} is already running")
        env = kwargs.pop("env", self._child_env())
        environment = self._environment("engine", kwargs)
        remote = self.engine_launcher_class in ("ssh", "sshproxy")
        if not remote:  # (ssh: for the remote hosts, not here)
            env = {**env, **environment}
        default_args = self._engine_argv()
        if "engine_args" in kwargs:  # ipyparallel's launcher name: replaces the configured ones
            extra = kwargs.pop("engine_args")
            if isinstance(extra, str | bytes):
                raise TypeError("engine_args must be a list of strings, not a string")
            default_args = self._cluster_engine_argv() + [str(a) for a in extra]
        common: dict[str, Any] = {
            "args": kwargs.pop("args", default_args),
            "env": env,
            "connection_info": info if self.send_engines_connection_env else None,
            "cmd": kwargs.pop("cmd", self.engine_cmd),
        }
        if common["cmd"] is None and not remote:  # (ssh: in its options)
            common["cmd"] = self._user_cmd("engine")
        if "engine_cmd" in kwargs and not remote:
            common["cmd"] = [str(a) for a in kwargs.pop("engine_cmd")]  # ipyparallel's name
        launcher: LocalEngineSetLauncher
        if self.engine_launcher_class == "mpi":
            launcher = MPIEngineSetLauncher(
                self.profile_dir, self.cluster_id, esid, n, **common, **self._mpi_options(kwargs)
            )
        elif self.engine_launcher_class == "ssh":
            opts = self._ssh_options(kwargs)
            if "engine_cmd" in opts:  # ipyparallel's name for the command on the remote hosts
                common["cmd"] = opts.pop("engine_cmd")
            launcher = SSHEngineSetLauncher(
                self.profile_dir,
                self.cluster_id,
                esid,
                n,
                environment={**self.env, **environment},
                **common,
                **opts,
            )
            self.n = launcher.n  # the hosts' counts decide, as in ipyparallel
        elif self.engine_launcher_class == "sshproxy":
            opts = self._launcher_options(
                kwargs, ("SSHLauncher", "SSHProxyEngineSetLauncher"), ssh_proxy.OPTIONS
            )
            launcher = SSHProxyEngineSetLauncher(
                self.profile_dir,
                self.cluster_id,
                esid,
                n,
                environment={**self.env, **environment},
                **common,
                **{k: v if isinstance(v, str) else list(v) for k, v in opts.items()},
            )
        elif self.engine_launcher_class in batch.BATCH_SYSTEMS:
            system = self.engine_launcher_class
            opts = self._batch_options(system, "Engine", kwargs)
            launcher = batch.engine_launcher(
                system, self.profile_dir, self.cluster_id, esid, n, **common, **opts
            )
        else:
            launcher = LocalEngineSetLauncher(self.profile_dir, self.cluster_id, esid, n, **common)
        if kwargs:  # ipyparallel's launchers ignore unknown keywords (traitlets warns)
            log.warning("start_engines: ignoring unknown keyword arguments %s", sorted(kwargs))
        self.engines[esid] = launcher
        try:
            launcher.start()
        except BaseException:
            del self.engines[esid]
            raise
        _track_for_exit(self)  # stopped at exit if shutdown_atexit is true then
        self.write_cluster_file()
        return esid

    def _launcher_options(
        self, kwargs: dict[str, Any], sections: Sequence[str], keys: Sequence[str]
    ) -> dict[str, Any]:
        """Options of a launcher: ipyparallel's config ``sections`` (later ones win), then the
        keyword arguments of :meth:`start_engines` (popped)."""
        opts: dict[str, Any] = {}
        config = self._launcher_config()
        for section in sections:
            if section in config:
                for key in keys:
                    if key in config[section]:
                        opts[key] = config[section][key]
        for key in keys:
            if key in kwargs:
                opts[key] = kwargs.pop(key)
        return opts

    def _ssh_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``engines``, ``ssh_cmd``, ``ssh_args`` and ``engine_cmd`` (the remote command) of an
        SSH engine set (``start_engines`` keywords, else ``c.SSHLauncher`` /
        ``c.SSHEngineSetLauncher``)."""
        opts = self._launcher_options(
            kwargs,
            ("SSHLauncher", "SSHEngineSetLauncher"),
            ("engines", "ssh_cmd", "ssh_args", "engine_cmd"),
        )
        return {k: dict(v) if k == "engines" else list(v) for k, v in opts.items()}

    def _batch_options(self, system: str, role: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Settings of a batch launcher (``queue``, ``batch_template``, ``account``, ...):
        keyword arguments, else ipyparallel's config sections (``c.BatchSystemLauncher``,
        ``c.SlurmLauncher``, ``c.SlurmEngineSetLauncher``, the last winning)."""
        sections = batch.config_sections(system, role)
        names = batch.option_names(system)
        # (the others: _configured_args, _environment)
        used = {*names, "controller_args", "engine_args", "environment"}
        config = self._launcher_config()
        for section in sections:  # a misspelt setting must not go unnoticed
            unknown = sorted(set(config[section]) - used) if section in config else []
            if unknown:
                log.warning(
                    "c.%s: %s not used by the %s launcher (its settings: %s)",
                    section,
                    ", ".join(unknown),
                    system,
                    ", ".join(names),
                )
        return self._launcher_options(kwargs, sections, names)

    def _mpi_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``mpi_cmd`` / ``mpi_args`` of an MPI engine set: keyword arguments of
        :meth:`start_engines`, else ipyparallel's config sections (``c.MPILauncher.mpi_args``,
        ``c.MPIEngineSetLauncher.mpi_args``, the latter winning)."""
        opts = self._launcher_options(
            kwargs, ("MPILauncher", "MPIEngineSetLauncher"), ("mpi_cmd", "mpi_args")
        )
        return {k: list(v) for k, v in opts.items()}

    async def start_cluster(self, n: int | None = None) -> Cluster:
        """Start the controller (unless running) and ``n`` engines.

        Returns
        -------
        Cluster
            ``self``.
        """
        if not self.running:
            await self.start_controller()
            if self.delay > 0:
                await asyncio.sleep(self.delay)
        await self.start_engines(n)
        return self

    async def connect_client(self, **kwargs: Any) -> Any:
        """A :class:`ferroparallel.Client` connected to this cluster.

        Raises
        ------
        ConnectionFileError
            The client connection file is missing, or stale (the controller that wrote it is no
            longer running); the message names the file.
        ImportError
            The Client is not available in this installation.
        """
        f = self.client_file
        if not f.exists():
            raise ConnectionFileError(
                f"connection file {f} does not exist: is the controller of cluster "
                f"{self.cluster_id!r} running?"
            )
        ctl = self.controller
        if ctl is not None and ctl.process is not None and not ctl.process.running:
            raise ConnectionFileError(
                f"connection file {f} is stale: the controller that wrote it "
                f"(pid {ctl.process.pid}) is no longer running"
            )
        if ctl is not None and ctl.process is None and not ctl.running:
            raise ConnectionFileError(
                f"connection file {f} is stale: the controller's job that wrote it has ended"
            )
        client_cls = _client_class()
        import inspect

        try:
            accepts_cluster = "cluster" in inspect.signature(client_cls).parameters
        except (TypeError, ValueError):  # pragma: no cover - exotic Client classes
            accepts_cluster = False
        if accepts_cluster:
            kwargs.setdefault("cluster", self)
        client = client_cls(profile_dir=self.profile_dir, cluster_id=self.cluster_id, **kwargs)
        if not accepts_cluster:
            with contextlib.suppress(Exception):
                client.cluster = self
        return client

    async def _wait_for_engines(self, client: Any, n: int, timeout: float) -> None:
        if not hasattr(client, "ids"):
            await asyncio.to_thread(client.wait_for_engines, n, timeout=timeout)
            return
        deadline = time.monotonic() + timeout
        while len(client.ids) < n:
            failure = next(filter(None, (es.failure() for es in self.engines.values())), None)
            if failure:
                raise RuntimeError(f"{failure}\n(before {n} engines registered)")
            if time.monotonic() >= deadline:
                tails = "\n".join(es.log_tails() for es in self.engines.values())
                raise TimeoutError(
                    f"only {len(client.ids)} of {n} engines registered within {timeout:g} s\n"
                    + tails
                )
            await asyncio.sleep(0.005)

    async def start_and_connect(self, n: int | None = None, activate: bool = False) -> Any:
        """Start the cluster, connect a client and wait for the engines to register.

        Parameters
        ----------
        n : int, optional
            Number of engines (default ``self.n``, else ``os.cpu_count()``).
        activate : bool
            Call ``client.activate()`` (the ``%px`` magics) once connected. Without it the new
            client takes over ``%px`` only when none is registered yet (as any Client created
            inside IPython, and as ipyparallel's).

        Returns
        -------
        Client
            The connected client.
        """
        _client_class()  # fail before starting anything when there is no Client
        await self.start_cluster(n)
        client = await self.connect_client()
        try:
            total = sum(es.n for es in self.engines.values())
            await self._wait_for_engines(client, total, self.engine_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                client.close()
            raise
        if activate:
            client.activate()
        return client

    # -- stopping and signalling -------------------------------------------------------------

    def _engine_sets(self, engine_set_id: str | None) -> list[LocalEngineSetLauncher]:
        if engine_set_id is None:
            return list(self.engines.values())
        try:
            return [self.engines[engine_set_id]]
        except KeyError:
            raise KeyError(
                f"no engine set {engine_set_id!r} in cluster {self.cluster_id!r}"
            ) from None

    async def stop_engines(self, engine_set_id: str | None = None) -> None:
        """Stop one engine set (default: all) with SIGTERM, then SIGKILL after a timeout."""
        sets = self._engine_sets(engine_set_id)
        await asyncio.gather(*(es.stop(self.stop_timeout) for es in sets))
        for es in sets:
            self.engines.pop(es.engine_set_id, None)
        if sets:
            self.update_cluster_file()

    async def stop_controller(self) -> None:
        """Stop the controller with SIGTERM, then SIGKILL after a timeout."""
        stopped = self.controller is not None
        if stopped:
            await self.controller.stop(self.stop_timeout)  # type: ignore[union-attr]
        self.controller = None
        self._engine_info = None
        if stopped:
            self.update_cluster_file()

    async def stop_cluster(self) -> None:
        """Stop every engine set, then the controller, and remove the cluster file."""
        tracked = self.controller is not None or bool(self.engines)
        await self.stop_engines()
        await self.stop_controller()
        if tracked:  # never remove the file of a cluster this object does not know
            self.remove_cluster_file()
        _atexit_clusters.discard(self)
        _started_clusters.discard(self)

    async def signal_engines(self, signum: int | str, engine_set_id: str | None = None) -> None:
        """Send a signal (number or name such as ``"SIGINT"``) to one engine set (default: all)."""
        sig = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        for es in self._engine_sets(engine_set_id):
            es.signal(sig)

    async def restart_engines(self, engine_set_id: str | None = None) -> None:
        """Stop and start again one engine set (default: all), with the same size and id."""
        sets = self._engine_sets(engine_set_id)
        await asyncio.gather(*(es.stop(self.stop_timeout) for es in sets))
        info = self._load_engine_info()
        for es in sets:
            if self.send_engines_connection_env:
                es.connection_info = info
            es.start()
        self.write_cluster_file()

    async def stop_engine(self, engine_id: int) -> None:
        """Not available for local engine sets (ipyparallel raises the same)."""
        raise NotImplementedError("stop a single engine with client.shutdown(targets=...)")

    async def restart_engine(self, engine_id: int) -> None:
        """Not available for local engine sets."""
        raise NotImplementedError("restarting a single engine is not supported")

    async def signal_engine(self, signum: int, engine_id: int) -> None:
        """Not available for local engine sets (use ``client.send_signal``)."""
        raise NotImplementedError("signal a single engine with client.send_signal(...)")

    def _stop_now(self) -> None:
        """Blocking, loop-free stop of everything (interpreter exit)."""
        for es in self.engines.values():
            es.stop_now(self.stop_timeout)
        if self.controller is not None:
            self.controller.stop_now(self.stop_timeout)
        self.engines.clear()
        self.controller = None
        self.remove_cluster_file()

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of the cluster (the content of the cluster file)."""
        return {
            "cluster": {
                "cluster_id": self.cluster_id,
                "profile": self.profile,
                "profile_dir": self.profile_dir,
                "n": self.n,
                "controller_args": self.controller_args,
                "engine_args": self.engine_args,
                "controller_ip": self.controller_ip,
                "controller_location": self.controller_location,
                "curve": self.curve,
                "log_level": self.log_level,
                "engine_timeout": self.engine_timeout,
                "controller_timeout": self.controller_timeout,
                "stop_timeout": self.stop_timeout,
                "send_engines_connection_env": self.send_engines_connection_env,
                "controller_cmd": self.controller_cmd,
                "engine_cmd": self.engine_cmd,
                "engine_launcher_class": self.engine_launcher_class,
                "controller_launcher_class": self.controller_launcher_class,
                "env": dict(self.env),
            },
            "controller": self.controller.to_dict() if self.controller else None,
            "engines": {k: v.to_dict() for k, v in self.engines.items()},
            "owner_pid": os.getpid(),
            "shutdown_atexit": self.shutdown_atexit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **kwargs: Any) -> Cluster:
        """Rebuild a cluster from :meth:`to_dict` output.

        The result tracks the recorded processes (it can stop and signal them) but does not
        stop them at exit unless ``shutdown_atexit=True`` is passed.
        """
        opts = dict(d.get("cluster") or {})
        for alias, name in (
            ("engines", "engine_launcher_class"),
            ("controller", "controller_launcher_class"),
        ):
            if alias in kwargs:  # (the caller's choice, under either name, wins over the file's)
                opts.pop(name, None)
        opts.update(kwargs)
        opts.setdefault("shutdown_atexit", False)
        known = {
            "n",
            "profile",
            "profile_dir",
            "cluster_id",
            "controller_args",
            "engine_args",
            "controller_ip",
            "controller_location",
            "curve",
            "log_level",
            "engine_timeout",
            "controller_timeout",
            "stop_timeout",
            "send_engines_connection_env",
            "shutdown_atexit",
            "controller_cmd",
            "engine_cmd",
            "env",
            "delay",
            "engine_launcher_class",
            "controller_launcher_class",
            "engines",
            "controller",
        }
        self = cls(**{k: v for k, v in opts.items() if k in known})
        ctl = d.get("controller")
        if ctl:
            ctl_kinds: dict[str, Any] = {"mpi": MPIControllerLauncher, "ssh": SSHControllerLauncher}
            ctl_kinds.update(batch.CONTROLLER_LAUNCHERS)
            cls_ = ctl_kinds.get(ctl.get("kind"), LocalControllerLauncher)
            self.controller = cls_.from_dict(ctl, self.profile_dir, self.cluster_id)
        kinds: dict[str, Any] = {
            "mpi": MPIEngineSetLauncher,
            "ssh": SSHEngineSetLauncher,
            "sshproxy": SSHProxyEngineSetLauncher,
        }
        kinds.update(batch.ENGINE_LAUNCHERS)
        for esid, es in (d.get("engines") or {}).items():
            kind = kinds.get(es.get("kind"), LocalEngineSetLauncher)
            self.engines[esid] = kind.from_dict(es, self.profile_dir, self.cluster_id, esid)
        # what they run again (restart) and their batch commands see the cluster's env
        for launcher in [*self.engines.values(), self.controller]:
            if launcher is not None:
                launcher.env = self._child_env()
        _track_for_exit(self, started=False)  # stopped at exit if shutdown_atexit is true then
        return self

    @classmethod
    def from_file(
        cls,
        cluster_file: str | os.PathLike[str] | None = None,
        *,
        profile: str | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
        cluster_id: str = "",
        **kwargs: Any,
    ) -> Cluster:
        """Load a cluster started by (possibly) another process from its cluster file.

        Parameters
        ----------
        cluster_file : str or os.PathLike, optional
            The file; default ``<profile_dir>/security/cluster-<cluster_id>.json``.
        profile, profile_dir, cluster_id
            Locate the file when it is not given.
        **kwargs
            Attributes to override.

        Raises
        ------
        FileNotFoundError
            No such cluster file.
        ValueError
            The file is not a valid cluster file (the message names it).
        """
        if cluster_file is None:
            pdir = paths.profile_dir(profile, profile_dir, create=False)
            f = _cluster_file(pdir, cluster_id)
        else:
            f = Path(cluster_file)
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no cluster file {f}") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read cluster file {f}: {e}") from e
        if not isinstance(d, dict) or "cluster" not in d:
            raise ValueError(f"{f} is not a ferroparallel cluster file")
        d["cluster"].setdefault("profile_dir", str(f.parent.parent))
        return cls.from_dict(d, **kwargs)

    def write_cluster_file(self) -> None:
        """Write the cluster file (atomically, mode 0600)."""
        paths.write_connection_file(self._cluster_path, self.to_dict())

    def update_cluster_file(self) -> None:
        """Write the cluster file, or remove it once nothing of the cluster is left (no
        controller, no engine set), as ipyparallel's."""
        if self.controller is None and not self.engines:
            self.remove_cluster_file()
        else:
            self.write_cluster_file()

    def remove_cluster_file(self) -> None:
        """Remove the cluster file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self._cluster_path.unlink()

    # -- synchronous twins ---------------------------------------------------------------------

    def start_controller_sync(self, **kwargs: Any) -> None:
        """Blocking :meth:`start_controller`."""
        return run_sync(self.start_controller(**kwargs))

    def start_engines_sync(
        self, n: int | None = None, engine_set_id: str | None = None, **kwargs: Any
    ) -> str:
        """Blocking :meth:`start_engines`."""
        return run_sync(self.start_engines(n, engine_set_id, **kwargs))

    def start_cluster_sync(self, n: int | None = None) -> Cluster:
        """Blocking :meth:`start_cluster`."""
        return run_sync(self.start_cluster(n))

    def start_and_connect_sync(self, n: int | None = None, activate: bool = False) -> Any:
        """Blocking :meth:`start_and_connect`."""
        return run_sync(self.start_and_connect(n, activate))

    def connect_client_sync(self, **kwargs: Any) -> Any:
        """Blocking :meth:`connect_client`."""
        return run_sync(self.connect_client(**kwargs))

    def stop_engines_sync(self, engine_set_id: str | None = None) -> None:
        """Blocking :meth:`stop_engines`."""
        return run_sync(self.stop_engines(engine_set_id))

    def stop_controller_sync(self) -> None:
        """Blocking :meth:`stop_controller`."""
        return run_sync(self.stop_controller())

    def stop_cluster_sync(self) -> None:
        """Blocking :meth:`stop_cluster`."""
        return run_sync(self.stop_cluster())

    def signal_engines_sync(self, signum: int | str, engine_set_id: str | None = None) -> None:
        """Blocking :meth:`signal_engines`."""
        return run_sync(self.signal_engines(signum, engine_set_id))

    def restart_engines_sync(self, engine_set_id: str | None = None) -> None:
        """Blocking :meth:`restart_engines`."""
        return run_sync(self.restart_engines(engine_set_id))

    def stop_engine_sync(self, engine_id: int) -> None:
        """Blocking :meth:`stop_engine`."""
        return run_sync(self.stop_engine(engine_id))

    def restart_engine_sync(self, engine_id: int) -> None:
        """Blocking :meth:`restart_engine`."""
        return run_sync(self.restart_engine(engine_id))

    def signal_engine_sync(self, signum: int, engine_id: int) -> None:
        """Blocking :meth:`signal_engine`."""
        return run_sync(self.signal_engine(signum, engine_id))

    # -- context managers ----------------------------------------------------------------------

    def __enter__(self) -> Any:
        self._client = self.start_and_connect_sync()
        return self._client

    def __exit__(self, *exc: object) -> None:
        client = getattr(self, "_client", None)
        self._client = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        self.stop_cluster_sync()

    async def __aenter__(self) -> Any:
        self._client = await self.start_and_connect()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        client = getattr(self, "_client", None)
        self._client = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        await self.stop_cluster()
