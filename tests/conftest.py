"""Shared pytest fixtures: a pyzmq context, free ports, and the pure-Python peer."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, settings

# The pure-Python peer lives in tests/peer; make it importable as ``peer`` however pytest
# was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer.session import Session as PeerSession  # noqa: E402

# No per-example deadline and no "too slow" health check for the property tests that do not set
# their own (test_mapping_unit.py): on a loaded CI machine a 200 ms stall fails them (as
# Hypothesis's own "ci" profile does, which is only loaded when $CI is set).
settings.register_profile(
    "ferroparallel", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ferroparallel")

#: Shared fixtures (fp_root, zctx) of the cluster tests.
pytest_plugins = ["cluster_util"]

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    """A private pyzmq context, destroyed (linger 0) after the test."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def peer_session() -> Callable[..., PeerSession]:
    """A factory of pure-Python peer sessions: ``peer_session(key, packer="json")``."""

    def make(key: bytes = b"", **kwargs: Any) -> PeerSession:
        return PeerSession(key, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _default_pickler() -> Iterator[None]:
    """Each test starts with this process's pickler in its default mode (``use_pickle()``),
    whatever an earlier test switched to (``use_cloudpickle``/``use_dill`` are process-wide)."""
    from ferroparallel.serialize import pickling

    if pickling.current_pickler() != "pickle" or pickling._capture_data:
        pickling.use_pickle()
    yield


@pytest.fixture
def clusters() -> Iterator[Callable[..., Any]]:
    """Make ``ferroparallel.Cluster``s that are stopped (their processes killed if need be)
    after the test."""
    from ferroparallel.cluster import Cluster

    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        c = Cluster(**kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.stop_cluster_sync()
        except Exception:
            for p in c._processes():
                p.send_signal(signal.SIGKILL)
