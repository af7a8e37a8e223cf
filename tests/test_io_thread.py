"""The native I/O thread: zero-copy frames in both directions, forwarding, interrupts, cleanup."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import zmq

from ferroparallel import _core, error
from ferroparallel.serialize import load_object, serialize_object
from peer.session import DELIMITER, recv_frames
from peer.session import Session as PeerSession

LOOPBACK = "tcp://127.0.0.1:*"


@pytest.fixture
def pair():
    """An I/O thread with a bound ROUTER and a DEALER connected to it."""
    io = _core.IoThread(_core.Session(b"k" * 32))
    (endpoint,) = io.add_socket("router", "ROUTER", bind=LOOPBACK)
    io.add_socket("dealer", "DEALER", connect=endpoint)
    yield io, endpoint
    io.close()


def recv_one(io: _core.IoThread, timeout: float = 5.0):
    got = io.recv(timeout=timeout, max_messages=1)
    assert got, "nothing received before the timeout"
    return got[0]


def test_received_array_lies_inside_the_received_frame(pair):
    io, _ = pair
    arr = np.arange(1_000_000, dtype="f8").reshape(1000, 1000)
    frames = serialize_object(arr)
    assert len(frames) >= 2, "the array should travel as its own frame"
    io.send("dealer", "apply_reply", {"status": "ok"}, buffers=frames)
    name, msg = recv_one(io)
    assert name == "router"
    received = msg["buffers"]
    assert all(isinstance(f, _core.Frame) for f in received)
    out = load_object(received)
    np.testing.assert_array_equal(out, arr)
    data = out.__array_interface__["data"][0]
    big = max(received, key=len)
    assert big.address <= data < big.address + len(big), "array was copied out of the frame"
    assert not out.flags.writeable, "arrays over received frames are read-only"


def test_frame_is_a_read_only_buffer(pair):
    io, _ = pair
    payload = os.urandom(200_000)
    io.send("dealer", "x", buffers=[payload, b"small"])
    _, msg = recv_one(io)
    big, small = msg["buffers"]
    assert bytes(big) == payload and len(big) == len(payload)
    assert bytes(small) == b"small" and big == payload
    view = memoryview(big)
    assert view.readonly and view.nbytes == len(payload)
    assert np.frombuffer(big, np.uint8).__array_interface__["data"][0] == big.address
    with pytest.raises(ValueError):
        np.frombuffer(big, np.uint8).setflags(write=True)
    with pytest.raises(TypeError):
        memoryview(big)[0:1] = b"x"
    with pytest.raises((TypeError, BufferError)):
        (ctypes.c_char * len(big)).from_buffer(big)  # asks for a writable buffer
    view.release()


def test_sent_buffers_are_borrowed_then_released(pair):
    io, _ = pair
    arr = np.ones(4_000_000, dtype="u1")
    before = sys.getrefcount(arr)
    io.send("dealer", "x", buffers=[arr])
    _, msg = recv_one(io)
    assert len(msg["buffers"][0]) == arr.nbytes
    # libzmq is done with the frame once it was delivered; the next call into the I/O thread
    # releases our borrowed view under the GIL.
    deadline = time.monotonic() + 5
    while sys.getrefcount(arr) != before and time.monotonic() < deadline:
        io.recv(timeout=0.01)
    assert sys.getrefcount(arr) == before
    assert io.stats()["unreleased"] == 0


def test_router_idents_and_reply_routing(pair):
    io, _ = pair
    io.send("dealer", "ping_request", {"n": 1})
    _, req = recv_one(io)
    assert len(req["idents"]) == 1
    io.send("router", "ping_reply", {"n": 2}, parent=req["header"], ident=req["idents"])
    name, rep = recv_one(io)
    assert name == "dealer"
    assert rep["parent_header"]["msg_id"] == req["msg_id"]
    assert rep["content"] == {"n": 2} and rep["idents"] == []


def test_pipelined_messages_keep_their_order(pair):
    io, _ = pair
    n = 5000
    for i in range(n):
        io.send("dealer", "seq", {"i": i})
    seen: list[int] = []
    deadline = time.monotonic() + 20
    while len(seen) < n and time.monotonic() < deadline:
        seen.extend(m["content"]["i"] for _, m in io.recv(timeout=1))
    assert seen == list(range(n))


def test_forward_to_relays_raw_frames_without_python(zmq_ctx):
    """The engine heartbeat pattern: SUB (ping) forwarded to DEALER (pong)."""
    ping = zmq_ctx.socket(zmq.PUB)
    ping_port = ping.bind_to_random_port("tcp://127.0.0.1")
    pong = zmq_ctx.socket(zmq.ROUTER)
    pong_port = pong.bind_to_random_port("tcp://127.0.0.1")
    io = _core.IoThread(_core.Session())
    try:
        io.add_socket("pong", "DEALER", connect=f"tcp://127.0.0.1:{pong_port}", identity=b"eng-1")
        io.add_socket(
            "ping", "SUB", connect=f"tcp://127.0.0.1:{ping_port}", raw=True, forward_to="pong"
        )
        pong.setsockopt(zmq.RCVTIMEO, 200)
        echoed = None
        for _ in range(50):  # the subscription takes a moment to reach the PUB
            ping.send(b"12.5")
            try:
                echoed = pong.recv_multipart()
                break
            except zmq.Again:
                continue
        assert echoed == [b"eng-1", b"12.5"]
        assert io.stats()["forwarded"] >= 1
        assert io.recv(timeout=0.05) == []  # forwarded traffic is not delivered to Python
    finally:
        io.close()


def test_raw_socket_delivers_frames(zmq_ctx):
    io = _core.IoThread(_core.Session())
    try:
        (ep,) = io.add_socket("raw", "ROUTER", bind=LOOPBACK, raw=True)
        d = zmq_ctx.socket(zmq.DEALER)
        d.connect(ep)
        d.send_multipart([b"a", b"bc"])
        name, frames = recv_one(io)
        assert name == "raw" and [bytes(f) for f in frames][1:] == [b"a", b"bc"]
    finally:
        io.close()


def test_bad_arguments_have_clear_errors(pair):
    io, endpoint = pair
    with pytest.raises(ValueError, match='no socket named "nope"'):
        io.send("nope", "x")
    with pytest.raises(ValueError, match="unknown socket kind"):
        io.add_socket("s", "FANCY")
    with pytest.raises(ValueError, match="already exists"):
        io.add_socket("router", "ROUTER")
    with pytest.raises(ValueError, match="forward_to"):
        io.add_socket("s2", "SUB", forward_to="missing")
    with pytest.raises(ValueError, match="bind"):
        io.add_socket("s3", "ROUTER", bind=endpoint)  # address in use
    with pytest.raises(TypeError):
        io.send("dealer", "x", content=[1, 2])
    with pytest.raises(BufferError, match="contiguous"):
        io.send("dealer", "x", buffers=[np.ones((4, 4))[:, ::2]])
    with pytest.raises(ValueError, match="timeout"):
        io.recv(timeout=-1)


def test_closed_thread_refuses_work():
    io = _core.IoThread(_core.Session())
    io.add_socket("d", "DEALER", connect="tcp://127.0.0.1:9")
    io.close()
    io.close()  # idempotent
    assert io.closed
    with pytest.raises(error.IoClosedError):
        io.send("d", "x")
    with pytest.raises(OSError):  # (as ipyparallel's closed client: "Connections have been closed")
        io.recv(timeout=0)


def _tasks_and_fds() -> tuple[int, int]:
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def _quiet_baseline(timeout: float = 10.0) -> tuple[int, int]:
    """Counts once libzmq's reaper has finished closing earlier sockets (it does so
    asynchronously, within their linger time): stable for half a second."""
    deadline = time.monotonic() + timeout
    last = _tasks_and_fds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        gc.collect()
        now = _tasks_and_fds()
        if now == last:
            return now
        last = now
    return last


def _settles_within(baseline: tuple[int, int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        tasks, fds = _tasks_and_fds()
        if tasks == baseline[0] and fds <= baseline[1]:
            return True
        time.sleep(0.1)
    return False


def test_close_leaves_no_thread_socket_or_descriptor():
    def cycle() -> None:
        io = _core.IoThread(_core.Session(b"key"))
        (ep,) = io.add_socket("r", "ROUTER", bind=LOOPBACK)
        io.add_socket("d", "DEALER", connect=ep)
        io.add_socket("s", "SUB", connect=ep)
        io.send("d", "x", buffers=[b"z" * 100_000])
        assert recv_one(io)
        io.close()

    cycle()  # warms up the process-wide libzmq context (its own threads live on)
    baseline = _quiet_baseline()
    for _ in range(5):
        cycle()
    assert _settles_within(baseline), f"{_tasks_and_fds()} != {baseline}"


def test_dropping_without_close_stops_the_thread():
    def make_and_forget() -> None:
        io = _core.IoThread(_core.Session())
        io.add_socket("d", "DEALER", connect="tcp://127.0.0.1:9")

    make_and_forget()
    baseline = _quiet_baseline()
    for _ in range(3):
        make_and_forget()
    assert _settles_within(baseline), f"{_tasks_and_fds()} != {baseline}"


def test_ctrl_c_interrupts_a_blocking_recv_promptly(tmp_path):
    script = tmp_path / "block.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from ferroparallel import _core
            io = _core.IoThread(_core.Session())
            io.add_socket("r", "ROUTER", bind="tcp://127.0.0.1:*")
            print("ready", flush=True)
            t0 = time.monotonic()
            try:
                io.recv()  # no timeout: waits until interrupted
            except KeyboardInterrupt:
                print(f"interrupted {time.monotonic() - t0:.3f}", flush=True)
                io.close()
                sys.exit(0)
            sys.exit(3)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("interrupted")
    assert elapsed < 5, f"Ctrl-C took {elapsed:.2f}s to interrupt recv()"


# -- DirectSockets: sockets driven by the calling thread -------------------------------------


@pytest.mark.parametrize("packer", ["msgpack", "json"])
def test_direct_reply_names_the_request_header_frame_as_received(packer):
    """A received message keeps its header frame; a reply given it as its parent carries those
    very bytes (the reply need not pack the header dict again): with msgpack the same bytes
    the dict gives, with JSON the peer's own text; the peer reads the same header either way.
    ``send`` returns nothing."""
    key = b"k" * 32
    direct = _core.DirectSockets(_core.Session(key, packer=packer))
    peer = PeerSession(key, packer=packer)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        (endpoint,) = direct.add_socket("shell", "ROUTER", bind=LOOPBACK)
        sock.connect(endpoint)
        header = peer.msg_header("apply_request")
        header["extra"] = {"n": -3, "big": 2**40, "f": 0.5, "s": "é\u2603", "l": [1, None, True]}
        frames = peer.serialize("apply_request", {"n": 1}, header=header)
        sock.send_multipart(frames)
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            got = direct.recv(timeout=1.0)
        ((_, msg),) = got
        packed = msg[_core.PACKED_HEADER_KEY]
        assert packed == frames[2] and msg["header"] == header
        for parent in (packed, msg["header"]):
            sent = direct.send(
                "shell", "apply_reply", {"status": "ok"}, parent, {"m": 1}, ident=msg["idents"]
            )
            assert sent is None
        as_received, repacked = recv_frames(sock), recv_frames(sock)
        assert as_received[3] == frames[2]
        for reply in (as_received, repacked):
            assert peer.deserialize(reply)["parent_header"] == header  # (signature checked)
        if packer == "msgpack":
            assert repacked[3] == as_received[3]
    finally:
        sock.close()
        direct.close()


def test_io_thread_send_takes_a_packed_parent(pair):
    """``IoThread.send`` (IOPub) also takes a header as received for its parent."""
    io, _ = pair
    session = _core.Session(b"k" * 32)
    parent = {"msg_id": "abc", "msg_type": "apply_request", "session": "s", "date": "d"}
    packed = session.serialize("x", header=parent)[2]
    header = io.send("dealer", "status", {"execution_state": "busy"}, bytes(packed))
    _, msg = recv_one(io)
    assert msg["parent_header"] == parent and msg["header"] == header
    assert _core.PACKED_HEADER_KEY not in msg  # (kept by DirectSockets only)


def test_direct_sockets_round_trip_wake_and_close():
    session = _core.Session(b"k" * 32)
    direct = _core.DirectSockets(session)
    io = _core.IoThread(session)
    try:
        (endpoint,) = direct.add_socket("shell", "ROUTER", bind=LOOPBACK)
        io.add_socket("peer", "DEALER", connect=endpoint, identity=b"peer")
        arr = np.arange(100_000, dtype="f8")
        io.send("peer", "apply_request", {"n": 1}, buffers=serialize_object(arr))
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            got = direct.recv(timeout=1.0)
        ((name, msg),) = got
        assert name == "shell" and msg["content"] == {"n": 1} and msg["idents"] == [b"peer"]
        np.testing.assert_array_equal(load_object(msg["buffers"]), arr)
        # the reply leaves from this thread, zero-copy buffers included
        direct.send(
            "shell",
            "apply_reply",
            {"ok": True},
            msg["header"],
            ident=msg["idents"],
            buffers=serialize_object(arr * 2),
        )
        _, reply = recv_one(io)
        assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
        np.testing.assert_array_equal(load_object(reply["buffers"]), arr * 2)
        # a forged message is dropped and reported, never delivered
        forged = _core.Session(b"x" * 32)
        io.send_raw("peer", forged.serialize("apply_request", {}))
        time.sleep(0.2)
        assert direct.recv(timeout=0.3) == []
        assert [e[0] for e in direct.take_errors()] == ["shell"]
        # so is one whose values Python cannot hold (a map key it cannot hash)
        peer = PeerSession(b"k" * 32)
        parts = [peer.pack(peer.msg_header("x")), peer.pack({}), peer.pack({}), b"\x81\x90\x01"]
        io.send_raw("peer", [DELIMITER, peer.sign(parts), *parts])
        time.sleep(0.2)
        assert direct.recv(timeout=0.3) == []
        assert [e[:2] for e in direct.take_errors()] == [("shell", "UnpackError")]
        # wake() cuts a long wait short, from another thread
        threading.Timer(0.2, direct.wake).start()
        t0 = time.monotonic()
        assert direct.recv(timeout=30) == []
        assert time.monotonic() - t0 < 5
        with pytest.raises(ValueError, match="no socket named"):
            direct.send("nope", "x")
    finally:
        direct.close()
        io.close()
    assert direct.closed
    with pytest.raises(error.IoClosedError):
        direct.recv(timeout=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="eventfd is Linux's")
def test_libzmq_threads_signal_each_other_through_eventfds():
    """Our libzmq is built with eventfd (as libzmq's own build is on Linux): its mailboxes are
    eventfds, not socketpairs, which cost a trip through the Unix socket stack per wake-up.
    Checked in a fresh process that loads only our extension (pyzmq's libzmq would open
    eventfds of its own)."""
    code = textwrap.dedent(
        """
        import os
        from ferroparallel import _core
        io = _core.IoThread(_core.Session(b"k" * 32))
        io.add_socket("router", "ROUTER", bind="tcp://127.0.0.1:*")
        kinds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        io.close()
        print(sum("eventfd" in k for k in kinds), sum(k.startswith("socket:") for k in kinds))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    eventfds, sockets = int(out[0]), int(out[1])
    # mailboxes of the context's reaper and I/O thread and of the socket, at least
    assert eventfds >= 3, (eventfds, sockets)
    # the bound TCP listener, and no socketpair per mailbox
    assert sockets < eventfds, (eventfds, sockets)
