"""``ClusterManager``: the clusters of one or more profiles, by key, as ipyparallel's.

A manager finds the clusters recorded on disk (the ``security/cluster-*.json`` files of the
profiles) and keeps them, with the ones it creates, in :attr:`ClusterManager.clusters` under the
key ``"<profile>:<cluster_id>"`` (the profile's name for a profile under the profile root, its
directory otherwise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from traitlets import Dict
from traitlets.config import LoggingConfigurable

from .. import paths
from .cluster import Cluster

log = logging.getLogger(__name__)


def _profile_label(profile_dir: str | os.PathLike[str]) -> str:
    """A profile's name when it lives under the profile root, else its directory."""
    pdir = Path(profile_dir).absolute()
    if pdir.parent == paths.profile_root() and pdir.name.startswith("profile_"):
        return pdir.name[len("profile_") :]
    return str(pdir)


def _all_profile_dirs() -> list[Path]:
    root = paths.profile_root()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.name.startswith("profile_") and d.is_dir())


class ClusterManager(LoggingConfigurable):
    """Clusters by key (``"<profile>:<cluster_id>"``): found on disk, or created here.

    Examples
    --------
    >>> manager = ipp.ClusterManager()  # doctest: +SKIP
    >>> for key, cluster in manager.load_clusters().items():  # doctest: +SKIP
    ...     print(key, cluster.running)
    """

    clusters = Dict(help="the managed Cluster objects, by key")

    @staticmethod
    def _cluster_key(cluster: Cluster) -> str:
        """The key of ``cluster``: ``"<profile>:<cluster_id>"``."""
        return f"{_profile_label(cluster.profile_dir)}:{cluster.cluster_id}"

    @staticmethod
    def _cluster_files_in_profile_dir(profile_dir: str | os.PathLike[str]) -> list[str]:
        """The cluster files recorded in a profile directory."""
        sec = paths.security_dir(profile_dir)
        if not sec.is_dir():
            return []
        return [str(f) for f in sorted(sec.glob("cluster-*.json"))]

    def load_clusters(
        self,
        *,
        profile_dirs: Iterable[str | os.PathLike[str]] | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
        profiles: Iterable[str] | None = None,
        profile: str | None = None,
        init_default_clusters: bool = False,
        **kwargs: Any,
    ) -> dict[str, Cluster]:
        """Add the clusters recorded on disk; drop the managed ones that have stopped.

        Parameters
        ----------
        profile_dirs, profile_dir, profiles, profile
            Where to look, first given first: several profile directories, one, several
            profile names, one; by default every profile under the profile root.
        init_default_clusters : bool
            Also add a (not started) ``Cluster`` with cluster_id ``""`` for every profile
            that records no cluster.
        **kwargs
            Ignored (accepted for compatibility).

        Returns
        -------
        dict
            :attr:`clusters`.
        """
        for key, cluster in list(self.clusters.items()):
            # a cluster that ran and stopped goes; one created here and not started yet stays
            if cluster.controller is not None and not cluster.running:
                log.info("dropping stopped cluster %s", key)
                self.clusters.pop(key)
        if profile_dirs is None:
            if profile_dir is not None:
                profile_dirs = [profile_dir]
            elif profiles is not None or profile is not None:
                names = list(profiles) if profiles is not None else [profile]
                profile_dirs = [paths.profile_dir(name, create=False) for name in names]
            else:
                profile_dirs = _all_profile_dirs()
        known = {os.path.abspath(c.cluster_file) for c in self.clusters.values()}
        for pdir in profile_dirs:
            files = self._cluster_files_in_profile_dir(pdir)
            if init_default_clusters and not files:
                cluster = Cluster(profile_dir=os.fspath(pdir), cluster_id="")
                self.clusters.setdefault(self._cluster_key(cluster), cluster)
            for f in files:
                if os.path.abspath(f) in known:
                    continue
                try:
                    cluster = Cluster.from_file(f)
                except (OSError, ValueError) as e:
                    log.warning("cannot load the cluster of %s: %s", f, e)
                    continue
                self.clusters[self._cluster_key(cluster)] = cluster
        return self.clusters

    def new_cluster(self, **kwargs: Any) -> tuple[str, Cluster]:
        """Create a (not started) Cluster and manage it.

        Parameters
        ----------
        **kwargs
            ``Cluster`` arguments.

        Returns
        -------
        tuple
            ``(key, cluster)``.

        Raises
        ------
        KeyError
            A cluster with that key is managed already.
        """
        cluster = Cluster(**kwargs)
        key = self._cluster_key(cluster)
        if key in self.clusters:
            raise KeyError(f"Cluster {key} already exists!")
        self.clusters[key] = cluster
        return key, cluster

    def get_cluster(self, cluster_id: str) -> Cluster:
        """The managed cluster with key ``cluster_id`` (KeyError if none)."""
        return self.clusters[cluster_id]

    def remove_cluster(self, cluster_id: str) -> None:
        """Stop managing the cluster with key ``cluster_id`` (it is not stopped)."""
        del self.clusters[cluster_id]


__all__ = ["ClusterManager"]
