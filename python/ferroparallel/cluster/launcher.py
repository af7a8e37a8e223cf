"""The launchers under ipyparallel's module name (``ipyparallel.cluster.launcher``), so
``from ferroparallel.cluster.launcher import MPIEngineSetLauncher`` works as it does there.
They are defined in :mod:`.launchers`, :mod:`.mpi` and :mod:`.ssh_engines`."""

from __future__ import annotations

from .launchers import LocalControllerLauncher, LocalEngineSetLauncher
from .mpi import MPIEngineSetLauncher
from .ssh_engines import SSHEngineSetLauncher

__all__ = [
    "LocalControllerLauncher",
    "LocalEngineSetLauncher",
    "MPIEngineSetLauncher",
    "SSHEngineSetLauncher",
]
