"""The direct data path (docs/decisions/0014): large buffers of waiting calls fetched over TCP
straight from the process that lends them, not carried through the controller.

A client with ``shm=False`` stands for one on another host: its engines cannot use shared
memory or its process memory, so blocking pushes, applies and pulls of large arrays go
direct once the engines proved they can reach the client's data endpoint and the client
theirs. Checked: exact round trips, that the bytes really were fetched (counters on both
sides) and received without a copy, the fallbacks (non-blocking calls, ``direct_data=False``,
an unreachable endpoint, more than two targets), the loans' lifetime, and refusals
(resubmitted requests, results fetched later from the hub, wrong keys, altered bytes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from cluster_fixtures import wait_until
from cluster_util import closed_by_peer, raised_by_alarm
from ferroparallel import Client, Cluster, Reference, _core
from ferroparallel.error import RemoteError
from ferroparallel.serialize import netloan
from ferroparallel.serialize.shm import ShmError
from transfer_util import owner_kind

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
SHORT = 60.0
KEY = b"direct-data-test-key"


def engine_fetches() -> list[int]:
    """``[count, bytes]`` fetched by this engine so far."""
    from ferroparallel.serialize import netloan

    return list(netloan.fetched)


def probed(client: Client) -> bool:
    shm = client._shm
    return (
        all(shm._net_readers.get(u) and shm._net_lenders.get(u) for u in client._uuids)
        and len(client._uuids) == 2
    )


@pytest.fixture
def net_rc(rc: Client, shared_cluster: Cluster) -> Iterator[Client]:
    """A client of the shared cluster that cannot use shared memory (as if remote), with
    both engines probed for the direct data path."""
    with ipp.Client(shared_cluster.client_file, shm=False) as client:
        client.wait_for_engines(2, timeout=SHORT)
        client[:].apply_sync(int)  # starts the probes
        client._shm.known_local(list(client._uuids))
        wait_until(lambda: probed(client), what="the direct data probes")
        yield client


def test_blocking_push_apply_pull_go_direct(net_rc: Client) -> None:
    dv = net_rc[:]
    a = np.random.default_rng(1).random(2 * MIB)  # 16 MiB
    fortran = np.asfortranarray(np.arange(3 * MIB, dtype=np.int32).reshape(1024, -1))
    rec = np.zeros(MIB, dtype=[("x", "f8"), ("y", "i2")])
    rec["x"] = np.arange(MIB)
    before = dv.apply_sync(engine_fetches)
    dv.push({"a": a, "nested": {"f": [fortran], "r": (rec,)}}, block=True)
    after = dv.apply_sync(engine_fetches)
    # one fetch per engine, of the three arrays' bytes
    nbytes = a.nbytes + fortran.nbytes + rec.nbytes
    assert [
        [x - b for x, b in zip(e, eb, strict=True)] for e, eb in zip(after, before, strict=True)
    ] == [[1, nbytes]] * 2
    # received over the fetched frames (no copy), read-only
    assert dv.apply_sync(lambda: owner_kind(a)) == ["frame", "frame"]

    @ipp.interactive
    def check() -> bool:
        f = nested["f"][0]  # noqa: F821 - engine namespace
        return (
            f.flags.f_contiguous
            and not a.flags.writeable  # noqa: F821
            and nested["r"][0].dtype.names == ("x", "y")  # noqa: F821
        )

    assert dv.apply_sync(check) == [True, True]
    client_before = list(netloan.fetched)
    got = dv.pull("a", block=True)
    assert all(np.array_equal(g, a) and not g.flags.writeable for g in got)
    assert [owner_kind(g) for g in got] == ["frame", "frame"]  # over the fetched frames
    pulled = net_rc[0].pull("nested", block=True)
    assert np.array_equal(pulled["f"][0], fortran) and pulled["f"][0].flags.f_contiguous
    assert np.array_equal(pulled["r"][0], rec)
    total = net_rc[1].apply_sync(lambda x: float(x.sum()), a)
    assert total == float(a.sum())
    doubled = net_rc[1].apply_sync(lambda x: x * 2, Reference("a"))
    assert np.array_equal(doubled, a * 2)
    assert netloan.fetched[0] - client_before[0] == 2 + 1 + 1
    assert net_rc._shm.live_loans() == []  # every loan ended with its replies
    assert net_rc._net.server.lent == 1  # only the probe's secret is still served


def test_a_push_to_two_engines_hashes_the_array_once(
    net_rc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines fetch the pushed arrays from the client, which hashes them once for both
    fetches (decision 0016, 2026-12 amendment); each engine gets them exactly."""
    loans: list[Any] = []
    made = netloan._Lent.__init__

    def recorded(self: Any, buffers: list[Any], msg_id: str) -> None:
        made(self, buffers, msg_id)
        loans.append(self)

    monkeypatch.setattr(netloan._Lent, "__init__", recorded)
    rng = np.random.default_rng(7)
    a, b = rng.random(3 * MIB), rng.integers(0, 255, 5 * MIB, dtype=np.uint8)
    before = net_rc[:].apply_sync(engine_fetches)
    net_rc[:].push({"a": a, "b": b}, block=True)
    after = net_rc[:].apply_sync(engine_fetches)
    assert [x[0] - y[0] for x, y in zip(after, before, strict=True)] == [1, 1]
    assert [(lent.served, lent.digest.times_hashed) for lent in loans] == [(2, 1)]

    @ipp.interactive
    def digest() -> tuple[bytes, bytes]:
        import hashlib

        return (hashlib.sha256(a).digest(), hashlib.sha256(b).digest())  # noqa: F821

    import hashlib

    want = (hashlib.sha256(a).digest(), hashlib.sha256(b).digest())
    assert net_rc[:].apply_sync(digest) == [want, want]


def test_scatter_gather_and_load_balanced_apply_go_direct(net_rc: Client) -> None:
    a = np.arange(4 * MIB, dtype=np.float64)
    before = sum(x[0] for x in net_rc[:].apply_sync(engine_fetches))
    net_rc[:].scatter("part", a, block=True)
    assert np.array_equal(net_rc[:].gather("part", block=True), a)
    lview = net_rc.load_balanced_view()
    assert lview.apply_sync(lambda x: float(x[-1]), a) == float(a[-1])
    after = sum(x[0] for x in net_rc[:].apply_sync(engine_fetches))
    assert after - before == 2 + 1


def test_small_and_non_blocking_calls_keep_the_controller_path(net_rc: Client) -> None:
    dv = net_rc[:]
    before = dv.apply_sync(engine_fetches)
    dv.push({"small": np.arange(1000)}, block=True)  # under the threshold
    a = np.ones(2 * MIB)
    dv.push({"a": a}, block=False).get(timeout=SHORT)  # the caller may change `a` at once
    assert dv.apply_sync(engine_fetches) == before
    client_before = list(netloan.fetched)
    assert all(np.array_equal(g, a) for g in dv.pull("a", block=False).get(timeout=SHORT))
    assert netloan.fetched == client_before


def test_more_than_two_targets_use_the_fan_out(net_rc: Client) -> None:
    uuids = list(net_rc._uuids)
    assert net_rc._shm._net_ready(uuids, False)
    assert not net_rc._shm._net_ready([*uuids, uuids[0]], False)  # one send, fanned out
    assert net_rc._shm._net_ready(uuids, True)  # load-balanced: one engine fetches


def test_direct_data_false_and_unreachable_endpoints_fall_back(
    rc: Client, shared_cluster: Cluster
) -> None:
    a = np.ones(2 * MIB)
    with ipp.Client(shared_cluster.client_file, shm=False, direct_data=False) as off:
        assert off._shm.net is None
        before = off[:].apply_sync(engine_fetches)
        off[:].push({"a": a}, block=True)
        assert off[:].apply_sync(engine_fetches) == before
        assert all(np.array_equal(g, a) for g in off[:].pull("a", block=True))
    with ipp.Client(shared_cluster.client_file, shm=False) as lost:
        lost.wait_for_engines(2, timeout=SHORT)

        class Nowhere:  # a data endpoint no engine can reach
            request = ["tcp://127.0.0.1:9", "0" * 32]

        lost._net._probe = Nowhere()  # type: ignore[assignment]
        lost._shm.known_local(list(lost._uuids))
        wait_until(lambda: len(lost._shm._net_lenders) == 2, what="probe answers")
        time.sleep(netloan.PROBE_TIMEOUT + 0.5)  # the engines' fetches gave up
        assert not any(lost._shm._net_readers.values())
        before = lost[:].apply_sync(engine_fetches)
        lost[:].push({"a": a}, block=True)
        assert lost[:].apply_sync(engine_fetches) == before
        assert all(np.array_equal(g, a) for g in lost[:].pull("a", block=True))


def test_lent_arguments_and_results_are_for_their_request_only(net_rc: Client) -> None:
    a = np.arange(2 * MIB, dtype=np.float64)
    with net_rc._shm.waiting():
        fut = net_rc.send_apply_request("mux", lambda x: x[::-1], (a,), ident=net_rc._engines[0])
    assert np.array_equal(fut.result(timeout=SHORT), a[::-1])
    # the hub kept descriptors, not the bytes: fetched later, a clear error
    net_rc.purge_local_results("all")
    with pytest.raises(RemoteError, match="lent over the network") as e:
        net_rc.get_result(fut.msg_id, block=False).get(timeout=SHORT)
    assert e.value.ename == "ShmError"
    # resubmitted under a new msg_id: the engine refuses the old loan's descriptors
    ar = net_rc.resubmit(fut.msg_id)
    with pytest.raises(RemoteError, match="run the request again"):
        ar.get(timeout=SHORT)


def test_an_engine_waits_for_its_result_to_be_fetched(net_rc: Client) -> None:
    uuid = net_rc._build_targets(0)[0][0]
    net_rc[0].execute("import numpy as np; big = np.zeros(8 << 20, dtype=np.uint8)", block=True)
    for i in range(3):
        with net_rc._shm.waiting():  # as a blocking pull: the result is lent
            fut = net_rc.send_apply_request("mux", lambda x: x, (Reference("big"),), ident=uuid)
        # queued right behind it: changes the very array in place
        net_rc[0].execute(f"big[:] = {i + 1}", block=False)
        got = fut.result(timeout=SHORT)
        assert not got.any(), f"round {i}: the lent result changed before it was fetched"
        net_rc[0].execute("big[:] = 0", block=True)


def test_lent_results_are_fetched_on_reused_threads(
    net_rc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lent result is fetched off the dispatcher, but not on a thread started for it:
    successive pulls reuse the same worker (starting one per pull cost every pull a thread
    start-up and a hand-over of the GIL)."""
    fetcher = net_rc._net.fetcher
    used: list[threading.Thread] = []
    prefetch = fetcher.prefetch

    def recording(*args: Any, **kwargs: Any) -> bool:
        used.append(threading.current_thread())
        return prefetch(*args, **kwargs)

    monkeypatch.setattr(fetcher, "prefetch", recording)
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB: lent, fetched
    net_rc[:].push({"a": a}, block=True)
    before = list(netloan.fetched)
    workers = net_rc._net_fetches
    for _ in range(4):
        np.testing.assert_array_equal(net_rc[0].pull("a", block=True), a)
        # (the worker goes back to waiting just after it handed the result over)
        wait_until(lambda: workers._idle >= 1, what="the fetch worker to be idle")
    assert netloan.fetched[0] - before[0] == 4
    assert len(used) == 4 and all(t is used[0] for t in used), used
    assert used[0] is not threading.current_thread() and used[0].is_alive()
    for got in net_rc[:].pull("a", block=True):  # two engines
        np.testing.assert_array_equal(got, a)


def test_a_lent_result_nobody_expects_is_released_at_once(net_rc: Client) -> None:
    """A reply lending a result for a message the client no longer tracks: the client tells
    the engine (on a thread of its own), which goes on at once instead of after the pickup
    timeout."""
    uuid = net_rc._build_targets(0)[0][0]
    net_rc[0].execute("import numpy as np; big = np.ones(8 << 20, dtype=np.uint8)", block=True)

    def slow_big(x: object) -> object:
        import time

        time.sleep(1)
        return x

    with net_rc._shm.waiting():  # as a blocking pull: the result is lent
        fut = net_rc.send_apply_request("mux", slow_big, (Reference("big"),), ident=uuid)
    net_rc._futures.pop(fut.msg_id)  # as if the client had forgotten it
    t0 = time.monotonic()
    assert net_rc[0].apply_sync(int, 7) == 7  # queued behind it: not held for 30 s
    assert time.monotonic() - t0 < 15
    assert net_rc[0].apply_sync(lambda: __import__("gc").collect() >= 0)
    fut.cancel()
    net_rc.outstanding.discard(fut.msg_id)


# ----- the data channel on its own --------------------------------------------------------


@pytest.fixture
def server() -> Iterator[netloan.DataServer]:
    s = netloan.DataServer(KEY, "msgpack", "127.0.0.1")
    yield s
    s.close()


def test_fetch_checks_token_key_and_mac(server: netloan.DataServer) -> None:
    data = [np.arange(1000, dtype=np.int64), b"x" * 100]
    token = server.lend([memoryview(d).cast("B") for d in data], "m")
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        frames = fetcher.fetch(server.endpoint, token, 10)
        assert bytes(frames[1]) == b"x" * 100
        assert np.array_equal(np.frombuffer(frames[0], dtype=np.int64), data[0])
        with pytest.raises(ShmError, match="no longer served"):
            fetcher.fetch(server.endpoint, "0" * 32, 10)
        server.withdraw(token)
        with pytest.raises(ShmError, match="no longer served"):
            fetcher.fetch(server.endpoint, token, 10)
    finally:
        fetcher.close()
    stranger = netloan.Fetcher(b"another key", "msgpack")
    token = server.lend([b"secret"], "m")
    try:  # a request signed with another key is dropped, with its connection: no answer
        with pytest.raises(ShmError, match="did not answer within"):
            stranger.fetch(server.endpoint, token, 1.0)
    finally:
        stranger.close()
    # (altered bytes: test_a_fetched_reply_with_altered_bytes_is_refused)


def test_descriptors_are_fetched_only_inside_their_request(server: netloan.DataServer) -> None:
    writer = netloan.NetLoanWriter(100, "req-1", server)
    assert not writer.wants(100) and writer.wants(101)
    desc = writer.add(memoryview(b"y" * 500))
    fetcher = netloan.Fetcher(KEY, "msgpack")
    from ferroparallel.serialize import peer

    try:
        with netloan.fetching(fetcher), pytest.raises(ShmError, match="'req-1'"):
            netloan.fetch_slice(*desc.__reduce__()[1])
        with peer.serving("req-2"), netloan.fetching(fetcher), pytest.raises(ShmError):
            netloan.fetch_slice(*desc.__reduce__()[1])
        with peer.serving("req-1_3"), netloan.fetching(fetcher):  # a fanned-out id
            assert bytes(netloan.fetch_slice(*desc.__reduce__()[1])) == b"y" * 500
        writer.loan.release()
        with peer.serving("req-1"), netloan.fetching(fetcher), pytest.raises(ShmError):
            netloan.fetch_slice(*desc.__reduce__()[1])
    finally:
        fetcher.close()


def test_a_lent_result_waits_for_its_fetch_or_release(server: netloan.DataServer) -> None:
    writer = netloan.NetLoanWriter(0, "req", server)
    writer.add(memoryview(b"z" * 1000))
    lent = netloan.NetLentResult(writer.loan)
    endpoint, token, nbytes = lent.reply_metadata()
    assert nbytes == 1000
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(lent.wait(timeout=30)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # waiting for the client
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        fetcher.release(endpoint, token)  # the client will not fetch it
        t.join(10)
        assert results == [True] and server.lent == 0
        # nobody fetches: the engine moves on after its timeout, and later fetches fail
        writer = netloan.NetLoanWriter(0, "req2", server)
        writer.add(memoryview(b"z" * 1000))
        lent = netloan.NetLentResult(writer.loan)
        assert lent.wait(timeout=0.2) is False
        with pytest.raises(ShmError, match="no longer served"):
            fetcher.fetch(*lent.reply_metadata()[:2], 10)
    finally:
        fetcher.close()


def test_a_lender_started_without_buffer_macs_says_so_in_its_signed_ack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FERROPARALLEL_SIGN_BUFFERS=0 turns the data channel's MAC off too (a trusted network
    that wants every byte of bandwidth); the signed acknowledgement tells the fetcher, so a
    MAC cannot be stripped from a lender that sends one."""
    session = _core.Session(KEY, packer="msgpack", sign_buffers=False)
    for env, mac in [("0", False), ("1", True)]:
        monkeypatch.setenv("FERROPARALLEL_SIGN_BUFFERS", env)
        server = netloan.DataServer(KEY, "msgpack", "127.0.0.1")
        try:
            token = server.lend([b"payload"], "m")
            stream = _core.DataStream.connect(server.endpoint, 10)
            header = session.msg_header(netloan.FETCH_REQUEST)
            stream.send(session.serialize(netloan.FETCH_REQUEST, {"token": token}, header=header))
            ack = session.deserialize(stream.recv(max_bytes=65536, timeout=10))
            assert ack["content"]["mac"] is mac
            if mac:  # the bytes come with their MAC
                got = stream.recv(
                    max_bytes=7, timeout=10, session=session, mac_context=header["msg_id"]
                )
                assert [bytes(g) for g in got] == [b"payload"]
            else:  # the bytes come without: a fetcher reads the ack and does not ask for one
                with pytest.raises(ValueError, match="carries no MAC"):
                    stream.recv(max_bytes=7, timeout=10, session=session, mac_context="x")
            fetcher = netloan.Fetcher(KEY, "msgpack")
            try:
                assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"payload"
            finally:
                fetcher.close()
        finally:
            server.close()


def test_ctrl_c_interrupts_a_wait_on_the_data_stream() -> None:
    """A fetch waits without the GIL; Ctrl-C on the main thread still ends it promptly (the
    wait wakes every quarter of a second to take signals), not at its timeout."""
    listener = _core.DataListener("127.0.0.1")
    stream = _core.DataStream.connect(listener.endpoint, 10)
    silent = listener.accept(10)  # connected, and never sends anything
    try:
        with raised_by_alarm(KeyboardInterrupt, after=0.3, within=5):
            stream.recv(max_bytes=100, timeout=20)
    finally:
        stream.close()
        silent.close()
        listener.close()
    assert listener.accept(0.1) is None  # closed: no more connections


def test_bind_host_follows_the_controller() -> None:
    assert netloan.bind_host("ipc://@fp-123/registration") == "127.0.0.1"
    assert netloan.bind_host("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert netloan.bind_host("tcp://localhost:5555") == "127.0.0.1"
    assert netloan.bind_host("tcp://127.0.0.2:5555") == "127.0.0.1"
    # a client beside a controller on every interface binds this host's routable address
    import socket

    from ferroparallel.client import connection

    info = {"interface": "tcp://*", "location": socket.gethostname(), "registration": 5555}
    assert connection.data_url(info) == "tcp://*:5555"
    assert netloan.bind_host(connection.data_url(info)) == netloan.routable_address()
    assert connection.data_url(info | {"interface": "tcp://127.0.0.1"}) == "tcp://127.0.0.1:5555"
    remote = info | {"location": "10.9.8.7"}
    assert connection.data_url(remote) == "tcp://10.9.8.7:5555"


def test_a_fetcher_keeps_a_bounded_number_of_channels() -> None:
    servers = [netloan.DataServer(KEY, "msgpack", "127.0.0.1") for _ in range(20)]
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        for i, s in enumerate(servers):
            token = s.lend([f"data {i}".encode()], "m")
            assert bytes(fetcher.fetch(s.endpoint, token, 10)[0]) == f"data {i}".encode()
            assert fetcher.channels <= netloan.MAX_CHANNELS
        # an evicted channel is opened again when needed
        token = servers[0].lend([b"again"], "m")
        assert bytes(fetcher.fetch(servers[0].endpoint, token, 10)[0]) == b"again"
    finally:
        fetcher.close()
        for s in servers:
            s.close()


def test_a_resubmitted_request_is_not_lent(net_rc: Client) -> None:
    """The hub drops the lending keys from a resubmitted request: nobody waits for it the way
    the original's client did, so its result comes through the hub, and the engine does not
    wait for a pickup that never comes."""
    net_rc[0].execute("import numpy as np; big = np.arange(4 << 20, dtype=np.int64)", block=True)
    first = net_rc[0].apply_sync(lambda x: x, Reference("big"))
    msg_id = net_rc.history[-1]
    (again,) = net_rc.resubmit(msg_id).get(timeout=SHORT)  # (a list, as in ipyparallel)
    assert np.array_equal(again, first)
    started = time.monotonic()
    assert net_rc[0].apply_sync(lambda: 1) == 1
    assert time.monotonic() - started < 10  # not held for the pickup timeout


def test_an_engine_stopped_before_its_result_is_fetched_fails_the_request_only(
    new_cluster: object,
) -> None:
    """The fetch of a lent result runs on a thread of its own: while it waits for a stalled
    engine the client goes on with its other engines, and the request fails as soon as the
    controller declares that engine dead (not after the fetch timeout)."""
    import os
    import signal

    cluster, rc = new_cluster(n=2, shm=False)  # type: ignore[operator]
    rc[:].apply_sync(int)
    rc._shm.known_local(list(rc._uuids))
    wait_until(lambda: probed(rc), what="the direct data probes")
    pid = rc[0].apply_sync(os.getpid)

    def stalls() -> object:
        import os
        import signal
        import threading

        import numpy as np

        big = np.ones(256 << 20, dtype=np.uint8)
        # stop this engine right after its reply left, while the client fetches the result
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGSTOP)).start()
        return big

    started = time.monotonic()
    ar = rc[0].apply_async(stalls)
    try:
        with rc._shm.waiting():  # meanwhile the other engine answers at once
            for _ in range(5):
                t = time.monotonic()
                assert rc[1].apply_sync(lambda: 2) == 2
                assert time.monotonic() - t < 2
                time.sleep(0.2)
        try:
            got = ar.get(timeout=SHORT)
            assert got.nbytes == 256 << 20  # (the fetch won the race)
        except RemoteError as e:
            assert e.ename == "EngineError", e
        assert time.monotonic() - started < 20  # the fetch timeout would be 35 s
    finally:
        os.kill(pid, signal.SIGCONT)


def _raw_peer(endpoint: str) -> socket.socket:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _stream_message(frames: list[bytes]) -> bytes:
    """One message of the data stream format, written by hand (see ``fp_io::stream``)."""
    head = b"FPds" + struct.pack(">II", len(frames), 0)
    return head + b"".join(struct.pack(">Q", len(f)) for f in frames) + b"".join(frames)


def test_garbage_on_the_data_endpoint_is_dropped(server: netloan.DataServer) -> None:
    """Unsigned, malformed or oversized input to a data endpoint costs its sender the
    connection (and is logged), and the server goes on serving everyone else."""
    token = server.lend([b"still served"], "m")
    junk = [
        b"hello",
        b"GET / HTTP/1.0\r\n\r\n" + b"x" * 100,
        _stream_message([b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"]),  # unsigned
        _stream_message([b"<IDS|MSG>", b"0" * 64, b"\xff\xfe", b"", b"", b""]),
        _stream_message([os.urandom(1 << 10) for _ in range(3)]),
        _stream_message([b""] * 200),  # too many frames
        b"FPds" + struct.pack(">II", 1, 8),  # unknown flags
    ]
    for data in junk:
        with _raw_peer(server.endpoint) as peer:
            peer.sendall(data)
            assert closed_by_peer(peer), data[:40]
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"still served"
        # a signed request of an unknown kind, and one without a token: ignored
        with fetcher._channel(server.endpoint) as chan:
            fetcher._request(chan, "fp_something_else", {"token": token}, 5)
            fetcher._request(chan, netloan.FETCH_RELEASE, {"token": 12345}, 5)
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"still served"
        assert fetcher.channels == 1  # the same connection all along
        # a fetch request without a token is answered "missing"
        with pytest.raises(ShmError, match="no longer served"):
            fetcher.fetch(server.endpoint, 12345, 10)  # type: ignore[arg-type]
    finally:
        fetcher.close()
    wait_until(lambda: server.connections == 0, what="the server to drop its connections")


def test_a_lender_that_is_gone_fails_the_fetch_soon(server: netloan.DataServer) -> None:
    """No acknowledgement within ACK_TIMEOUT: the fetch fails then, whatever its size-based
    timeout (an engine must not wait minutes for a client that died)."""
    token = server.lend([b"x"], "m")
    endpoint = server.endpoint
    server.close()
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        started = time.monotonic()
        with pytest.raises(ShmError, match="it is gone or this host cannot reach it"):
            fetcher.fetch(endpoint, token, 300)
        assert time.monotonic() - started < netloan.ACK_TIMEOUT + 2
        # a prefetch keeps the failure for the reply's unpacking to raise
        assert fetcher.prefetch(endpoint, token, 10, abandon=lambda: False)
        with pytest.raises(ShmError, match="gone"):
            fetcher.take(endpoint, token, 0, 1)
        assert not fetcher._kept
    finally:
        fetcher.close()


def test_oversized_input_on_a_data_endpoint_is_refused(server: netloan.DataServer) -> None:
    """The data endpoint only takes small requests: a peer announcing a big message is cut
    off before its bytes are read, and the server goes on serving."""
    token = server.lend([b"fine"], "m")
    with _raw_peer(server.endpoint) as peer:
        head = b"FPds" + struct.pack(">IIQ", 1, 0, netloan.MAX_REQUEST_BYTES + 1)
        peer.sendall(head)  # only the announcement: the server must not wait for the bytes
        assert closed_by_peer(peer), "the oversized message was accepted"
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"fine"
    finally:
        fetcher.close()


def test_a_fetched_reply_with_altered_bytes_is_refused() -> None:
    """The bytes of a fetch are checked against their MAC, which is bound to the request:
    a lender without the key, or a reply recorded for another request, is refused."""
    listener = _core.DataListener("127.0.0.1")
    stranger = _core.Session(b"another key", packer="msgpack", sign_buffers=False)
    ours = _core.Session(KEY, packer="msgpack", sign_buffers=False)

    digest = _core.LoanDigest()  # shared by the cases below: its digest is of b"data"

    def lender(session: Any, context: str | None, shared: Any) -> None:
        stream = listener.accept(10)
        request = ours.deserialize(stream.recv(max_bytes=65536))
        stream.send(ours.serialize(netloan.FETCH_ACK, {"count": 1, "nbytes": 4}, request["header"]))
        ctx = context if context is not None else request["msg_id"]
        stream.send([payload], session=session, mac_context=ctx, digest=shared)
        with contextlib.suppress(EOFError, OSError):
            stream.recv(max_bytes=0, timeout=10)  # until the fetcher hangs up

    try:
        payload = bytearray(b"data")
        for session, context, shared, alter, ok in [
            (stranger, None, None, False, False),
            (ours, "another request", None, False, False),
            (ours, None, digest, False, True),  # (the digest is taken here)
            (ours, "another request", digest, False, False),  # bound to the request
            (ours, None, digest, True, False),  # the bytes changed since: altered on the way
            (stranger, None, digest, False, False),  # (another key: hashed again)
        ]:
            if alter:
                payload[0] ^= 1
            t = threading.Thread(target=lender, args=(session, context, shared), daemon=True)
            t.start()
            fetcher = netloan.Fetcher(KEY, "msgpack")
            try:
                if ok:
                    assert bytes(fetcher.fetch(listener.endpoint, "token", 10)[0]) == b"data"
                else:
                    with pytest.raises(ShmError, match="do not match their MAC"):
                        fetcher.fetch(listener.endpoint, "token", 10)
                    assert fetcher.channels == 0
            finally:
                fetcher.close()
            t.join(10)
        assert digest.times_hashed == 2
    finally:
        listener.close()


def _read_stream_message(peer: socket.socket) -> list[bytes]:
    """One unsigned message of the data stream format, read by hand."""

    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = peer.recv(n - len(out))
            assert chunk, "closed"
            out += chunk
        return out

    magic, count, flags = struct.unpack(">4sII", exactly(12))
    assert (magic, flags) == (b"FPds", 0)
    lens = struct.unpack(f">{count}Q", exactly(8 * count))
    return [exactly(n) for n in lens]


def test_a_reply_of_an_older_version_is_refused_as_such() -> None:
    """A lender of another ferroparallel version (flag 1 or 2: a MAC of keyed BLAKE3 over the
    bytes, without v3's nonce) is told apart from an altered reply and refused."""
    ours = _core.Session(KEY, packer="msgpack", sign_buffers=False)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

        def old_lender(flag: int) -> None:
            peer, _ = listener.accept()
            with peer:
                request = ours.deserialize(_read_stream_message(peer))
                ack = ours.serialize(
                    netloan.FETCH_ACK, {"count": 1, "nbytes": 4}, request["header"]
                )
                peer.sendall(_stream_message([bytes(f) for f in ack]))
                reply = b"FPds" + struct.pack(">IIQ", 1, flag, 4) + b"data" + bytes(32)
                peer.sendall(reply)
                with contextlib.suppress(OSError):
                    peer.recv(1)  # until the fetcher hangs up

        for flag in (1, 2):
            t = threading.Thread(target=old_lender, args=(flag,), daemon=True)
            t.start()
            fetcher = netloan.Fetcher(KEY, "msgpack")
            try:
                with pytest.raises(ShmError, match=f"version {flag} MAC"):
                    fetcher.fetch(endpoint, "token", 10)
                assert fetcher.channels == 0
            finally:
                fetcher.close()
            t.join(10)


def test_a_loan_is_hashed_once_and_changed_bytes_are_refused(
    server: netloan.DataServer,
) -> None:
    """The lender hashes a loan's buffers once for all its fetches (concurrent or later), and
    each fetch's MAC binds that digest to its request: bytes changed after the digest was
    taken (as if altered on the way) are refused by the fetcher, which hashes what it got."""
    data = bytearray(np.random.default_rng(3).bytes(6 * MIB))
    token = server.lend([memoryview(data), b"small"], "m")
    lent = server._lent[token]
    fetchers = [netloan.Fetcher(KEY, "msgpack") for _ in range(3)]
    try:
        got: list[Any] = [None, None]

        def fetch(i: int) -> None:
            got[i] = fetchers[i].fetch(server.endpoint, token, 30)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for frames in got:
            assert bytes(frames[0]) == bytes(data) and bytes(frames[1]) == b"small"
        assert (lent.served, lent.digest.times_hashed) == (2, 1)
        data[12345] ^= 0xFF  # the digest the lender keeps is of the bytes as they were
        with pytest.raises(ShmError, match="do not match their MAC"):
            fetchers[2].fetch(server.endpoint, token, 30)
        assert lent.digest.times_hashed == 1
    finally:
        for f in fetchers:
            f.close()


def test_failed_pickling_lends_nothing(net_rc: Client) -> None:
    """A call whose arguments (or result) fail to pickle after a large buffer was lent leaves
    nothing served, on either side."""
    a = np.ones(2 * MIB)
    for _ in range(2):
        with pytest.raises(TypeError):
            net_rc[0].apply_sync(lambda x, y: None, a, threading.Lock())
    assert net_rc._net.server.lent == 1  # the probe's secret only

    def served() -> int:
        from ferroparallel.engine.kernel import _ACTIVE

        net = _ACTIVE.net  # type: ignore[union-attr]
        return net.server.lent if net.started else 0

    before = net_rc[0].apply_sync(served)
    for _ in range(2):
        with pytest.raises(RemoteError):
            net_rc[0].apply_sync(
                lambda: (__import__("numpy").ones(2 << 20), __import__("threading").Lock())
            )
    assert net_rc[0].apply_sync(served) == before
    assert not net_rc._net.fetcher._kept


def test_a_result_that_fails_to_unpack_keeps_nothing(net_rc: Client) -> None:
    """What was fetched ahead for a reply whose unpacking fails is dropped."""

    def unpicklable_here() -> object:
        import types

        import numpy as np

        mod = types.ModuleType("only_on_engines")
        exec("class Thing:\n    pass", mod.__dict__)
        mod.Thing.__module__ = "only_on_engines"
        __import__("sys").modules["only_on_engines"] = mod
        return (mod.Thing(), np.ones(2 << 20))  # fails before the array is unpacked

    with pytest.raises(RemoteError):
        net_rc[0].apply_sync(unpicklable_here)
    assert not net_rc._net.fetcher._kept
    assert net_rc[0].apply_sync(lambda: 3) == 3


def test_a_fetch_that_gives_up_drops_its_channel(server: netloan.DataServer) -> None:
    """A late answer to an abandoned fetch must not wait in the socket: the channel goes."""
    token = server.lend([b"x" * 1000], "m")
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        with pytest.raises(ShmError, match="abandoned"):
            fetcher.fetch(server.endpoint, token, 10, abandon=lambda: True)
        asked: list[int] = []  # gives up after the acknowledgement
        with pytest.raises(ShmError, match="abandoned"):
            fetcher.fetch(
                server.endpoint, token, 10, abandon=lambda: bool(asked.append(1)) or len(asked) > 1
            )
        assert fetcher.channels == 0
        with pytest.raises(ShmError, match="abandoned"):
            fetcher.fetch(server.endpoint, token, 10, abandon=lambda: True)
        assert fetcher.channels == 0
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"x" * 1000
        assert fetcher.channels == 1
    finally:
        fetcher.close()


def test_a_borrower_that_leaves_mid_transfer_lets_the_lender_go_on(
    server: netloan.DataServer,
) -> None:
    """An engine waits for its lent result to be fetched; a client that hangs up during the
    transfer (closed, interrupted, exited) will not fetch it again: the engine goes on at
    once, not after the pickup timeout."""
    writer = netloan.NetLoanWriter(0, "req", server)
    writer.add(memoryview(np.ones(64 * MIB, dtype=np.uint8)))  # more than the socket buffers
    lent = netloan.NetLentResult(writer.loan)
    endpoint, token, _ = lent.reply_metadata()
    results: list[bool] = []
    waiting = threading.Thread(target=lambda: results.append(lent.wait(timeout=60)))
    waiting.start()
    session = _core.Session(KEY, packer="msgpack", sign_buffers=False)
    borrower = _core.DataStream.connect(endpoint, 10)
    borrower.send(session.serialize(netloan.FETCH_REQUEST, {"token": token}))
    ack = session.deserialize(borrower.recv(max_bytes=65536, timeout=10))
    assert ack["header"]["msg_type"] == netloan.FETCH_ACK
    borrower.close()  # before the bytes (and its descriptor: the unread bytes reset it)
    del borrower
    waiting.join(10)
    assert not waiting.is_alive(), "the lender waits for a borrower that left"
    assert server.lent == 0
    wait_until(lambda: server.connections == 0, what="the server to drop the connection")


def test_a_silent_peer_loses_its_connection(
    server: netloan.DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sends no request holds a thread and a place among MAX_PEERS: it
    must send its first request within ACK_TIMEOUT. A peer that proved it has the key may
    stay connected between its requests."""
    monkeypatch.setattr(netloan, "ACK_TIMEOUT", 0.5)
    token = server.lend([b"data"], "m")
    fetcher = netloan.Fetcher(KEY, "msgpack")
    try:
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"data"
        stream = fetcher._channels[server.endpoint].stream
        with _raw_peer(server.endpoint) as peer:
            started = time.monotonic()
            assert closed_by_peer(peer)  # (the socket times out after 10 s)
            assert time.monotonic() - started < 5
        # (the signed peer was idle longer than ACK_TIMEOUT meanwhile)
        assert bytes(fetcher.fetch(server.endpoint, token, 10)[0]) == b"data"
        assert fetcher._channels[server.endpoint].stream is stream  # the same connection
    finally:
        fetcher.close()


def test_a_full_server_makes_room_by_closing_an_idle_peer(
    server: netloan.DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every engine that fetched from a client keeps its connection: with more than
    MAX_PEERS of them, the one idle longest is closed for a new peer (not the new peer
    refused), and its fetcher reconnects on its next fetch."""
    monkeypatch.setattr(netloan, "MAX_PEERS", 3)
    token = server.lend([b"shared"], "m")
    fetchers = [netloan.Fetcher(KEY, "msgpack") for _ in range(5)]
    try:
        for _ in range(2):
            for f in fetchers:
                assert bytes(f.fetch(server.endpoint, token, 10)[0]) == b"shared"
                assert server.connections <= 3
    finally:
        for f in fetchers:
            f.close()
