"""The Cluster API, local launchers and the ``ferroparallel cluster`` command."""

from __future__ import annotations

from .cluster import Cluster, new_cluster_id
from .manager import ClusterManager

__all__ = ["Cluster", "ClusterManager", "new_cluster_id"]
