"""The Cluster API, local launchers and the ``ferroparallel cluster`` command."""

from __future__ import annotations

from .cluster import Cluster, new_cluster_id

__all__ = ["Cluster", "new_cluster_id"]
