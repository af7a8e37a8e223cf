"""Links (docs/decisions/0017-links.md): engines and clients on the controller's host
send and receive their MUX and task traffic over one Unix stream each, not through libzmq's
threads.

Every other cluster test runs over links too (they are on by default on one host); these check
that they are in use, that turning them off works, that the controller's listener refuses peers
that do not hold the key, and that a killed engine's link unregisters it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from cluster_util import closed_by_peer
from ferroparallel import error, ipc
from peer.session import Session as PeerSession

pytest_plugins = ("cluster_fixtures",)


def _link_state() -> str:
    from ferroparallel.engine import kernel

    return kernel._ACTIVE.direct.link


def _frame(channel: int, frames: list[bytes]) -> bytes:
    """One message in the link's framing (see rust/io/src/link.rs)."""
    head = struct.pack("<B3xI", channel, len(frames))
    head += b"".join(struct.pack("<Q", len(f)) for f in frames)
    return head + b"".join(frames)


def _link_url(cluster: Any) -> str:
    info = json.loads(cluster.engine_file.read_text())
    return info[ipc.INFO_KEY][ipc.LINK_KEY]


def _connect(url: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect("\0" + url.removeprefix("ipc://@"))
    return s


def test_engines_and_clients_on_this_host_talk_over_links(rc: ipp.Client) -> None:
    assert rc[:].apply_sync(_link_state) == ["up", "up"]
    assert rc._io.link_up
    # direct, fanned-out and load-balanced requests, small and with large buffers
    a = np.arange(1 << 18, dtype="f8")
    rc[:].push({"a": a}, block=True)
    assert rc[0].pull("a", block=True).sum() == a.sum()
    assert rc[:].apply_sync(np.sum, a) == [a.sum(), a.sum()]
    lview = rc.load_balanced_view()
    assert lview.map_sync(pow, range(40), [2] * 40) == [x**2 for x in range(40)]
    ars = [rc[i % 2].apply_async(pow, i, 2) for i in range(200)]
    assert [ar.get(timeout=30) for ar in ars] == [i**2 for i in range(200)]


def test_links_can_be_turned_off(
    new_cluster: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ipc.LINK_ENV, "0")
    cluster, c = new_cluster(n=1)
    info = json.loads(cluster.engine_file.read_text())
    assert ipc.LINK_KEY not in info.get(ipc.INFO_KEY, {})
    assert c[:].apply_sync(_link_state) == ["none"]
    assert not c._io.link_up
    assert c.load_balanced_view().apply_sync(pow, 2, 5) == 32
    assert c[0].apply_sync(pow, 3, 2) == 9


def test_a_client_without_a_link_works_beside_linked_ones(
    rc: ipp.Client, shared_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ipc.LINK_ENV, "0")
    with ipp.Client(shared_cluster.client_file) as other:
        assert not other._io.link_up
        other.wait_for_engines(2)
        assert other[:].apply_sync(pow, 2, 3) == [8, 8]
        assert other.load_balanced_view().map_sync(abs, [-1, -2]) == [1, 2]
    assert rc[:].apply_sync(pow, 3, 2) == [9, 9]


def test_the_link_listener_refuses_peers_without_the_key(
    rc: ipp.Client, shared_cluster: Any
) -> None:
    url = _link_url(shared_cluster)
    key = json.loads(shared_cluster.engine_file.read_text())["key"].encode()
    # bytes that are no message
    with _connect(url) as s:
        s.sendall(b"\xff" * 64)
        assert closed_by_peer(s)
    # a message too large for a peer that has not said hello
    with _connect(url) as s:
        s.sendall(struct.pack("<B3xIQ", 0xFF, 1, 1 << 40))
        assert closed_by_peer(s)
    # a hello signed with another key, and one on the wrong channel
    forged = PeerSession(b"not the key").serialize("fp_link_hello", {"uuid": "intruder"})
    with _connect(url) as s:
        s.sendall(_frame(0xFF, forged))
        assert closed_by_peer(s)
    hello = PeerSession(key).serialize("fp_link_hello", {"uuid": "intruder"})
    with _connect(url) as s:
        s.sendall(_frame(1, hello))
        assert closed_by_peer(s)
    bogus = PeerSession(key).serialize("fp_link_hello", {"uuid": "x", "role": "hub"})
    with _connect(url) as s:
        s.sendall(_frame(0xFF, bogus))
        assert closed_by_peer(s)
    # the identity of a client that has a link
    taken = PeerSession(key).serialize("fp_link_hello", {"uuid": rc._session_id, "role": "client"})
    with _connect(url) as s:
        s.sendall(_frame(0xFF, taken))
        assert closed_by_peer(s)
    # a valid hello for an engine that has a link already: refused, the engine keeps its link
    engine_uuid = rc._engines[0]
    hello = PeerSession(key).serialize("fp_link_hello", {"uuid": engine_uuid})
    with _connect(url) as s:
        s.sendall(_frame(0xFF, hello))
        assert closed_by_peer(s)
    assert rc[:].apply_sync(_link_state) == ["up", "up"]
    assert rc._io.link_up
    assert rc[0].apply_sync(pow, 2, 3) == 8


def test_connections_that_have_not_said_hello_are_capped(shared_cluster: Any) -> None:
    url = _link_url(shared_cluster)
    silent = [_connect(url) for _ in range(64)]
    try:
        with _connect(url) as extra:  # the 65th waiting connection is closed at once
            assert closed_by_peer(extra)
        silent[0].setblocking(False)
        with pytest.raises(BlockingIOError):  # the first ones still wait for their hello
            silent[0].recv(1)
    finally:
        for s in silent:
            s.close()


def test_connections_whose_peer_left_do_not_count_against_the_cap(shared_cluster: Any) -> None:
    url = _link_url(shared_cluster)
    for _ in range(3):
        silent = [_connect(url) for _ in range(64)]
        with _connect(url) as extra:
            assert closed_by_peer(extra)
        for s in silent:
            s.close()
        # at once, before the controller may have read the closed ones: not refused
        with _connect(url) as s:
            s.settimeout(1.0)
            with pytest.raises(TimeoutError):
                s.recv(1)


def test_a_silent_connection_is_closed(shared_cluster: Any) -> None:
    with _connect(_link_url(shared_cluster)) as s:
        t0 = time.monotonic()
        assert closed_by_peer(s)  # after the controller's hello time (5 s)
        assert time.monotonic() - t0 >= 1.0


def test_a_killed_engine_fails_its_task_through_its_link(
    new_cluster: Callable[..., Any],
) -> None:
    cluster, c = new_cluster(n=2)
    pid = c[1].apply_sync(os.getpid)
    ar = c[1].apply_async(time.sleep, 60)
    c.wait_for_engines(2)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(error.EngineError):
        ar.get(timeout=30)
    assert c[0].apply_sync(_link_state) == "up"
    assert c.load_balanced_view().apply_sync(pow, 2, 4) == 16
