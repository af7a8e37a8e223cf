"""MPI integration of an engine started by ``mpiexec`` (``ferroparallel engine --mpi``).

As ipyparallel's ``ipengine --mpi``: MPI is initialised (mpi4py) before the engine registers,
the engine asks the controller for its MPI rank as its id, and the user namespace gets
``MPI``, ``mpi_rank`` and ``mpi_size``, so that code sent to the engines can use the
communicator right away (``MPI.COMM_WORLD.allreduce(...)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: What ``--mpi`` needs, for the error message when it is missing.
INSTALL_HINT = (
    "--mpi needs mpi4py and an MPI library: pip install mpi4py mpich "
    "(or mpi4py built against your system's MPI)"
)


@dataclass(frozen=True)
class MPIInfo:
    """This process's place in ``MPI.COMM_WORLD``."""

    rank: int
    size: int
    module: Any  # mpi4py.MPI

    def requested_id(self, explicit: int | None) -> int | None:
        """The engine id to ask for: an explicit ``--id``, else the rank in a job of more than
        one process (ipyparallel's rule)."""
        if explicit is not None:
            return explicit
        return self.rank if self.size > 1 else None

    def namespace(self) -> dict[str, Any]:
        """The names given to user code."""
        return {"MPI": self.module, "mpi_rank": self.rank, "mpi_size": self.size}


def init_mpi() -> MPIInfo:
    """Initialise MPI (importing ``mpi4py.MPI`` does) and return the rank and size.

    Raises
    ------
    RuntimeError
        mpi4py or the MPI library cannot be loaded (the message says what to install).
    """
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from e
    except Exception as e:  # noqa: BLE001 - a missing libmpi raises RuntimeError or OSError
        raise RuntimeError(f"{INSTALL_HINT}: cannot load MPI ({e})") from e
    comm = MPI.COMM_WORLD
    info = MPIInfo(rank=comm.Get_rank(), size=comm.Get_size(), module=MPI)
    log.info("MPI rank %d of %d", info.rank, info.size)
    return info
