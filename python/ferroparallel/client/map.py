"""How sequences are partitioned across engines, under ipyparallel's module name
(``ipyparallel.client.map``): :class:`Map` (contiguous blocks, ``dist='b'``),
:class:`RoundRobinMap` (``dist='r'``), and ``dists`` naming them."""

from __future__ import annotations

from .mapping import Map, RoundRobinMap

__all__ = ["Map", "RoundRobinMap", "dists"]

#: The partitioners by their ``dist`` name.
dists: dict[str, type[Map]] = {"b": Map, "r": RoundRobinMap}
