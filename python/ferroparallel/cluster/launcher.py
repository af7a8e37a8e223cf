"""The launchers under ipyparallel's module name (``ipyparallel.cluster.launcher``), so
``from ferroparallel.cluster.launcher import MPIEngineSetLauncher`` works as it does there.
They are defined in :mod:`.launchers`, :mod:`.mpi`, :mod:`.ssh_engines`,
:mod:`.ssh_controller` and :mod:`.batch` (``SlurmEngineSetLauncher`` is
:class:`~.batch.BatchEngineSetLauncher` for Slurm)."""

from __future__ import annotations

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
]
