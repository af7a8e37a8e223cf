"""The same data movements done by each contender of the ``data`` workload.

Not a workload (the name starts with ``_``). A :class:`Mover` pushes a float64 array to ``k``
engines and pulls it back, scatters and gathers one across two, and sends one with a task
(``apply(lambda x: x.sum(), a)``); it can also report what the engines hold, so the workload
checks outside the timed part that the data really moved. One class per API:

- :class:`ClusterMover`: ferroparallel and ipyparallel (same API: ``view.push``,
  ``view.pull``, ``dview.scatter``/``gather``, ``rc[0].apply_sync``);
- :class:`DaskMover`: ``client.scatter(..., hash=False)`` and ``client.gather``, either
  ``direct=True`` (client <-> workers) or ``direct=False`` (through the scheduler);
- :class:`RawMover`: the raw pyzmq floor (:mod:`_rawzmq`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from _rawzmq import RawPeers
from _tasks import checksum
from _util import restore_env

Checksum = tuple[Any, ...]


class Mover:
    """One contender: how it moves data, and which processes it runs.

    Attributes
    ----------
    label : str
        Row label (framework, version, variant).
    engine_pids : list of int
        Processes that receive the data (engines, workers, raw servers).
    other_pids : list of int
        The other processes of the cluster (controller, schedulers, nannies).
    env : dict
        Environment variables set around every operation (and when the cluster started).
    shm : bool
        Whether it moves data through shared memory (``/dev/shm``).
    """

    label: str = ""
    shm: bool = False
    engine_pids: list[int]
    other_pids: list[int]
    env: dict[str, str]

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Set :attr:`env` for the body, restoring the previous values afterwards."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            restore_env(saved)

    def push(self, a: np.ndarray, k: int) -> None:
        """Send ``a`` to each of the first ``k`` engines (as ``a``); return once all have it."""
        raise NotImplementedError

    def pushed(self, k: int) -> list[Checksum]:
        """Checksums of what the first ``k`` engines hold after :meth:`push` (not timed)."""
        raise NotImplementedError

    def pull(self, k: int) -> list[Any]:
        """Fetch ``a`` from each of the first ``k`` engines (one array-like per engine)."""
        raise NotImplementedError

    def scatter(self, a: np.ndarray) -> None:
        """Split ``a`` in two halves, one per engine."""
        raise NotImplementedError

    def scattered(self) -> list[Checksum]:
        """Checksums of the two halves held by the engines (not timed)."""
        raise NotImplementedError

    def gather(self) -> np.ndarray:
        """Fetch the two halves and join them."""
        raise NotImplementedError

    def apply_sum(self, a: np.ndarray) -> float:
        """Run ``a.sum()`` on one engine, sending ``a`` with the task."""
        raise NotImplementedError

    def clear(self) -> None:
        """Drop the data held on the engines (not timed)."""
        raise NotImplementedError


class ClusterMover(Mover):
    """ferroparallel or ipyparallel (``module`` is the package name).

    Parameters
    ----------
    label : str
        Row label.
    module : str
        ``"ferroparallel"`` or ``"ipyparallel"`` (for its ``Reference``).
    client : Any
        Connected client of a cluster with at least two engines.
    other_pids : list of int
        The cluster's processes that are not engines.
    env : dict, optional
        Environment variables for the operations (see :class:`Mover`).
    """

    def __init__(
        self,
        label: str,
        module: str,
        client: Any,
        other_pids: list[int],
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.rc = client
        self.reference = importlib.import_module(module).Reference
        self.env = env or {}
        self.engine_pids = list(client[:].apply_sync(os.getpid))
        self.other_pids = [pid for pid in other_pids if pid not in self.engine_pids]

    def _view(self, k: int) -> Any:
        return self.rc[0] if k == 1 else self.rc[:k]

    @staticmethod
    def _each(value: Any, k: int) -> list[Any]:
        return [value] if k == 1 else list(value)

    def push(self, a: np.ndarray, k: int) -> None:
        self._view(k).push({"a": a}, block=True)

    def pushed(self, k: int) -> list[Checksum]:
        return self._each(self._view(k).apply_sync(checksum, self.reference("a")), k)

    def pull(self, k: int) -> list[Any]:
        return self._each(self._view(k).pull("a", block=True), k)

    def scatter(self, a: np.ndarray) -> None:
        self.rc[:2].scatter("x", a, block=True)

    def scattered(self) -> list[Checksum]:
        return list(self.rc[:2].apply_sync(checksum, self.reference("x")))

    def gather(self) -> np.ndarray:
        return self.rc[:2].gather("x", block=True)

    def apply_sum(self, a: np.ndarray) -> float:
        return self.rc[0].apply_sync(lambda x: x.sum(), a)

    def clear(self) -> None:
        self.rc[:].execute("a = x = None", block=True)


class DaskMover(Mover):
    """Dask distributed, moving data ``direct``-ly to the workers or through the scheduler.

    Arrays are scattered with ``hash=False`` (no hashing of the data for a key). Pushing to
    two workers scatters a list of two references to the array: Dask's round robin puts one on
    each worker (checked by :meth:`pushed`).

    Parameters
    ----------
    label : str
        Row label.
    client : distributed.Client
        Connected client of a cluster with at least two workers.
    direct : bool
        ``direct=`` of ``scatter`` and ``gather``.
    other_pids : list of int
        The cluster's processes that are not workers (nannies; the scheduler of a
        ``LocalCluster`` runs in the client's process).
    """

    def __init__(self, label: str, client: Any, direct: bool, other_pids: list[int]) -> None:
        self.label = label
        self.client = client
        self.direct = direct
        self.env = {}
        self.workers = sorted(client.scheduler_info()["workers"])
        pids = client.run(os.getpid)
        self.engine_pids = [pids[w] for w in self.workers]
        self.other_pids = [pid for pid in other_pids if pid not in self.engine_pids]
        self.futures: list[Any] = []
        self.parts: list[Any] = []

    def _scatter(self, data: list[Any]) -> list[Any]:
        return self.client.scatter(data, hash=False, direct=self.direct)

    def _checksums(self, futures: list[Any]) -> list[Checksum]:
        where = self.client.who_has(futures)
        holders = [tuple(where[f.key]) for f in futures]
        if len(set(holders)) != len(holders):
            raise RuntimeError(f"the parts are not on distinct workers: {holders}")
        tasks = [self.client.submit(checksum, f, pure=False) for f in futures]
        return self.client.gather(tasks)

    def push(self, a: np.ndarray, k: int) -> None:
        self.futures = []  # release the previous copies first, as a push overwrites
        self.futures = self._scatter([a] * k)

    def pushed(self, k: int) -> list[Checksum]:
        return self._checksums(self.futures[:k])

    def pull(self, k: int) -> list[Any]:
        return self.client.gather(self.futures[:k], direct=self.direct)

    def scatter(self, a: np.ndarray) -> None:
        self.parts = []
        self.parts = self._scatter(np.array_split(a, 2))

    def scattered(self) -> list[Checksum]:
        return self._checksums(self.parts)

    def gather(self) -> np.ndarray:
        return np.concatenate(self.client.gather(self.parts, direct=self.direct))

    def apply_sum(self, a: np.ndarray) -> float:
        [future] = self._scatter([a])
        return self.client.submit(np.sum, future, pure=False).result()

    def clear(self) -> None:
        self.futures, self.parts = [], []


class RawMover(Mover):
    """The raw pyzmq floor: one frame per array, zero-copy, straight to the servers.

    Parameters
    ----------
    label : str
        Row label.
    peers : RawPeers
        At least two running servers.
    """

    def __init__(self, label: str, peers: RawPeers) -> None:
        self.label = label
        self.peers = peers
        self.env = {}
        self.engine_pids = peers.pids
        self.other_pids = peers.relay_pids

    def _checksums(self, replies: list[Any]) -> list[Checksum]:
        return [tuple(json.loads(r.bytes)) for r in replies]

    def push(self, a: np.ndarray, k: int) -> None:
        self.peers.request(k, b"push", b"a", a)

    def pushed(self, k: int) -> list[Checksum]:
        return self._checksums(self.peers.request(k, b"check", b"a"))

    def pull(self, k: int) -> list[Any]:
        return [np.frombuffer(r.buffer) for r in self.peers.request(k, b"pull", b"a")]

    def scatter(self, a: np.ndarray) -> None:
        self.peers.request_each([(b"push", b"x", half) for half in np.array_split(a, 2)])

    def scattered(self) -> list[Checksum]:
        return self._checksums(self.peers.request(2, b"check", b"x"))

    def gather(self) -> np.ndarray:
        return np.concatenate(
            [np.frombuffer(r.buffer) for r in self.peers.request(2, b"pull", b"x")]
        )

    def apply_sum(self, a: np.ndarray) -> float:
        [reply] = self.peers.request(1, b"sum", a)
        return float(reply.bytes)

    def clear(self) -> None:
        self.peers.request(len(self.peers.socks), b"clear")
