"""The launchers under ipyparallel's module name (``ipyparallel.cluster.launcher``), so
``from ferroparallel.cluster.launcher import MPIEngineSetLauncher`` works as it does there.
They are defined in :mod:`.launchers`, :mod:`.mpi`, :mod:`.ssh_engines`,
:mod:`.ssh_controller` and :mod:`.batch` (``SlurmEngineSetLauncher`` is
:class:`~.batch.BatchEngineSetLauncher` for Slurm)."""

from __future__ import annotations

from typing import Any

from .batch import (
    BatchControllerLauncher,
    BatchEngineSetLauncher,
    HTCondorControllerLauncher,
    HTCondorEngineSetLauncher,
    LSFControllerLauncher,
    LSFEngineSetLauncher,
    PBSControllerLauncher,
    PBSEngineSetLauncher,
    SGEControllerLauncher,
    SGEEngineSetLauncher,
    SlurmControllerLauncher,
    SlurmEngineSetLauncher,
)
from .launchers import LauncherError, LocalControllerLauncher, LocalEngineSetLauncher
from .mpi import MPIControllerLauncher, MPIEngineSetLauncher
from .ssh_controller import SSHControllerLauncher
from .ssh_engines import SSHEngineSetLauncher
from .ssh_proxy import SSHProxyEngineSetLauncher

__all__ = [
    "BatchControllerLauncher",
    "BatchEngineSetLauncher",
    "HTCondorControllerLauncher",
    "HTCondorEngineSetLauncher",
    "LSFControllerLauncher",
    "LSFEngineSetLauncher",
    "LauncherError",
    "PBSControllerLauncher",
    "PBSEngineSetLauncher",
    "SGEControllerLauncher",
    "SGEEngineSetLauncher",
    "SlurmControllerLauncher",
    "SlurmEngineSetLauncher",
    "LocalControllerLauncher",
    "LocalEngineSetLauncher",
    "MPIControllerLauncher",
    "MPIEngineSetLauncher",
    "SSHControllerLauncher",
    "SSHEngineSetLauncher",
    "SSHProxyEngineSetLauncher",
    "abbreviate_launcher_class",
    "find_launcher_class",
]


def abbreviate_launcher_class(cls: Any) -> str:
    """The short name of a launcher (``"local"``, ``"mpi"``, ``"ssh"``, ``"sshproxy"``,
    ``"slurm"``, ...) for a class or any spelling of its name, as ``Cluster`` keeps it."""
    from .cluster import _launcher_name

    return _launcher_name(cls)


def find_launcher_class(name: Any, kind: str) -> type:
    """The launcher class ``name`` means for ``kind`` ("controller" or "engine"), as
    ipyparallel's function of this name: ``"mpi"``, ``"MPI"``, ``"MPIEngineSetLauncher"``,
    a dotted path or a class.

    Raises
    ------
    ValueError
        ``kind`` is neither, or ``name`` is no launcher ferroparallel has.
    """
    from .cluster import _known_launcher

    if kind not in ("controller", "engine"):
        raise ValueError(f"kind must be 'controller' or 'engine', not {kind!r}")
    if isinstance(name, type):
        return name
    short = _known_launcher(str(name))
    middle = "Controller" if kind == "controller" else "EngineSet"
    prefix = {"local": "Local", "mpi": "MPI", "ssh": "SSH", "sshproxy": "SSHProxy"}
    if short in BATCH_SYSTEM_NAMES:
        cls_name = f"{BATCH_SYSTEM_NAMES[short]}{middle}Launcher"
    elif short in prefix:
        cls_name = f"{prefix[short]}{middle}Launcher"
    else:
        cls_name = ""
    found = globals().get(cls_name)
    if not isinstance(found, type):
        raise ValueError(f"no {kind} launcher {name!r} in ferroparallel")
    return found


#: batch system -> the prefix of its launchers' names
BATCH_SYSTEM_NAMES = {
    "slurm": "Slurm",
    "pbs": "PBS",
    "sge": "SGE",
    "lsf": "LSF",
    "htcondor": "HTCondor",
    "batch": "Batch",
}
