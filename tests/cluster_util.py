"""Helpers for the tests that run real controller and engine processes and raw pyzmq peers.

Everything here waits with a bound: a helper that cannot finish in time fails the test (with the
controller's log tail where that helps) instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from peer.session import Session as PeerSession

LOCALHOST = "127.0.0.1"

T = TypeVar("T")

#: Connection-file port keys per role.
CLIENT_PORTS = ("registration", "control", "mux", "task", "iopub", "notification")
ENGINE_PORTS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong")


@contextlib.contextmanager
def raised_by_alarm(exc: type[BaseException], after: float, within: float) -> Iterator[None]:
    """Expect the body to be ended by ``exc``, raised from a SIGALRM handler ``after`` seconds
    in (as Ctrl-C raises KeyboardInterrupt), and within ``within`` seconds of the start."""

    def handler(signum: int, frame: Any) -> None:
        raise exc

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, after)
        started = time.monotonic()
        with pytest.raises(exc):
            yield
        assert time.monotonic() - started < within
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_until(
    cond: Callable[[], T], timeout: float = 10.0, what: str = "a condition", interval: float = 0.01
) -> T:
    """Return the first truthy value of ``cond()``; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    state = data[data.rfind(b")") + 2 :].split()[0]
    return state not in (b"Z", b"X")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def run_cluster_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m ferroparallel cluster ARGS`` to its end (text output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "ferroparallel", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (``""`` if it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- a controller subprocess -------------------------------------------------------------------


@dataclass
class ControllerProcess:
    """``python -m ferroparallel.controller`` run by a test, with its connection info."""

    popen: subprocess.Popen[bytes]
    profile_dir: Path
    log_file: Path
    client_file: Path
    engine_file: Path
    client: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def client_url(self, key: str) -> str:
        """URL of a client-side channel (``registration``, ``mux``, ``notification``...)."""
        return f"tcp://{LOCALHOST}:{self.client[key]}"

    def engine_url(self, key: str) -> str:
        """URL of an engine-side channel (``registration``, ``mux``, ``hb_ping``...)."""
        return f"tcp://{LOCALHOST}:{self.engine[key]}"

    def log(self, lines: int = 40) -> str:
        return log_tail(self.log_file, lines)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        stop_popen(self.popen, timeout)


def closed_by_peer(s: socket.socket, nbytes: int = 64) -> bool:
    """Whether the other end closed ``s`` (EOF or a reset) without sending anything: how a
    server of ours cuts off a peer that sent something it refuses."""
    try:
        return s.recv(nbytes) == b""
    except ConnectionResetError:
        return True


def stop_popen(p: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM a child, SIGKILL it if it is still alive after ``timeout`` s, and reap it."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def start_controller(
    profile_dir: Path, *args: str, timeout: float = 30.0, cluster_id: str = ""
) -> ControllerProcess:
    """Start a controller in ``profile_dir`` and wait for both of its connection files.

    stdout and stderr go to ``<profile_dir>/log/test-controller.log``.
    """
    sec = profile_dir / "security"
    sec.mkdir(parents=True, exist_ok=True)
    os.chmod(sec, 0o700)
    (profile_dir / "log").mkdir(exist_ok=True)
    log_file = profile_dir / "log" / "test-controller.log"
    stem = f"ipcontroller-{cluster_id}" if cluster_id else "ipcontroller"
    client_file = sec / f"{stem}-client.json"
    engine_file = sec / f"{stem}-engine.json"
    cmd = [sys.executable, "-m", "ferroparallel.controller", "--profile-dir", str(profile_dir)]
    if cluster_id:
        cmd += ["--cluster-id", cluster_id]
    with open(log_file, "ab") as out:
        p = subprocess.Popen(
            [*cmd, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    ctl = ControllerProcess(p, profile_dir, log_file, client_file, engine_file)
    deadline = time.monotonic() + timeout
    while not (client_file.exists() and engine_file.exists()):
        if p.poll() is not None:
            pytest.fail(f"controller exited with status {p.returncode}:\n{ctl.log()}")
        if time.monotonic() > deadline:
            ctl.stop()
            pytest.fail(f"controller wrote no connection files within {timeout:g} s:\n{ctl.log()}")
        time.sleep(0.01)
    ctl.client = json.loads(client_file.read_text())
    ctl.engine = json.loads(engine_file.read_text())
    return ctl


def peer_session(info: dict[str, Any], session: str | None = None) -> PeerSession:
    """A pure-Python peer session with the key and packer of a connection file."""
    return PeerSession(
        str(info["key"]).encode(),
        packer=str(info.get("pack", "msgpack")),
        signature_scheme=str(info.get("signature_scheme", "hmac-sha256")),
        session=session,
    )


# -- raw pyzmq sockets ---------------------------------------------------------------------------


def connect(
    ctx: zmq.Context,
    kind: int,
    urls: str | Iterable[str],
    identity: bytes | None = None,
    subscribe: bytes | None = None,
    timeout: float = 10.0,
) -> zmq.Socket:
    """Connect a socket and wait until the ZMTP handshake with every peer has succeeded.

    Waiting for the handshake makes the tests independent of connection timing: a ROUTER peer
    can route to this socket, and a SUB's subscription is on its way, once this returns.
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    sock = ctx.socket(kind)
    sock.linger = 0
    if identity is not None:
        sock.identity = identity
    if subscribe is not None:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        for url in url_list:
            sock.connect(url)
        done = 0
        deadline = time.monotonic() + timeout
        while done < len(url_list):
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(int(left * 1000)):
                sock.close(0)
                pytest.fail(f"no ZMTP handshake with {url_list} within {timeout:g} s")
            frames = monitor.recv_multipart()
            event = int.from_bytes(frames[0][:2], "little")
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                done += 1
    finally:
        sock.disable_monitor()
        monitor.close(0)
    return sock


def recv_until(
    session: PeerSession,
    sock: zmq.Socket,
    match: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
    what: str = "a message",
) -> dict[str, Any]:
    """Receive (verifying each message) until one satisfies ``match``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            pytest.fail(f"no {what} within {timeout:g} s (saw: {seen[-10:]})")
        msg = session.deserialize(sock.recv_multipart(copy=True))
        if match(msg):
            return msg
        seen.append(str(msg["msg_type"]))


def drain(sock: zmq.Socket, quiet: float = 0.3, limit: float = 5.0) -> list[list[bytes]]:
    """Every message that arrives until ``quiet`` seconds pass without one (at most ``limit``)."""
    out: list[list[bytes]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and sock.poll(int(quiet * 1000)):
        out.append(sock.recv_multipart())
    return out


def collect(
    session: PeerSession,
    sock: zmq.Socket,
    n: int,
    timeout: float = 20.0,
    quiet: float = 0.3,
    what: str = "messages",
) -> list[dict[str, Any]]:
    """Wait (bounded) for ``n`` messages, then keep whatever else arrives until ``quiet``
    seconds pass without one; every message is verified but not recorded (no replay check)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            types = [m["msg_type"] for m in out]
            pytest.fail(f"only {len(out)} of {n} {what} within {timeout:g} s: {types}")
        out.append(session.deserialize(sock.recv_multipart(), record=False))
    out.extend(session.deserialize(f, record=False) for f in drain(sock, quiet=quiet))
    return out


class HeartEcho(threading.Thread):
    """A fake engine's heart: SUB to ``hb_ping``, echo every ping on a DEALER to ``hb_pong``.

    The sockets are created and used in this thread only (pyzmq sockets are not thread-safe).
    """

    def __init__(self, ctx: zmq.Context, ping_url: str, pong_url: str, identity: bytes) -> None:
        super().__init__(name="fake-heart", daemon=True)
        self.ctx = ctx
        self.ping_url = ping_url
        self.pong_url = pong_url
        self.identity = identity
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.echoed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pong = connect(self.ctx, zmq.DEALER, self.pong_url, identity=self.identity)
            ping = connect(self.ctx, zmq.SUB, self.ping_url, subscribe=b"")
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                if ping.poll(20):
                    frames = ping.recv_multipart()
                    # counted before the send: the controller may act on the echo (and the
                    # test thread read the count) before this thread runs again
                    self.echoed += 1
                    pong.send_multipart(frames)
        finally:
            ping.close(0)
            pong.close(0)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def send_all(sock: zmq.Socket, messages: Sequence[Sequence[bytes]]) -> None:
    """Send each frame list (non-blocking sends would hide nothing here: HWM is 0)."""
    for frames in messages:
        sock.send_multipart(list(frames))


@pytest.fixture
def fp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private FERROPARALLEL_DIR: nothing touches ~/.ferroparallel."""
    root = tmp_path / "fproot"
    monkeypatch.setenv("FERROPARALLEL_DIR", str(root))
    return root


class EngineGate:
    """A file that :meth:`task` waits for: the task keeps its engine busy until :meth:`open`
    (or a minute), however long the test takes to get there. Use it instead of a
    ``time.sleep`` task that a loaded machine may outlast before the test acts on it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def task(self) -> Callable[[], None]:
        path = str(self.path)

        def held() -> None:
            import os
            import time

            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)

        return held

    def open(self) -> None:
        self.path.touch()

    def close(self) -> None:
        """Make it hold again (once no task waits on it)."""
        self.path.unlink(missing_ok=True)


@pytest.fixture
def engine_gate(tmp_path: Path) -> Iterator[EngineGate]:
    """An :class:`EngineGate`, opened after the test (a failed test leaves no engine held)."""
    gate = EngineGate(tmp_path / "engine-gate")
    yield gate
    gate.open()


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A private pyzmq context, destroyed (linger 0) after the test."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@contextlib.contextmanager
def running_cluster(profile_dir: Path, n: int, ping_ms: int = 200) -> Iterator[Any]:
    """A real cluster of ``n`` engines in ``profile_dir`` (heartbeat every ``ping_ms``),
    stopped on exit."""
    from ferroparallel.cluster import Cluster

    cluster = Cluster(
        n=n,
        profile_dir=profile_dir,
        controller_args=["--ping", str(ping_ms)],
        shutdown_atexit=False,
    )
    try:
        cluster.start_cluster_sync()
        yield cluster
    finally:
        cluster.stop_cluster_sync()


@contextlib.contextmanager
def connected(cluster: Any, n: int, timeout: float = 30.0) -> Iterator[tuple[Any, Any]]:
    """Start ``cluster``, connect a client and wait for ``n`` engines; close and stop it on
    exit."""
    rc = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=timeout)
        yield cluster, rc
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()


def assert_results_from_the_hub(client: Any, msg_ids: list[str], values: list[Any]) -> None:
    """``client.get_result(msg_id)`` of each request equals its value (arrays by content;
    other values by value and type), fetched with a 30 s timeout."""
    import numpy as np

    for msg_id, value in zip(msg_ids, values, strict=True):
        got = client.get_result(msg_id).get(timeout=30)
        if isinstance(value, np.ndarray):
            assert isinstance(got, np.ndarray) and np.array_equal(got, value)
        else:
            assert got == value and type(got) is type(value)


def assert_sigint_interrupts_engines(cluster: Any, rc: Any, timeout: float) -> None:
    """SIGINT through ``cluster`` (possibly a process that did not start the engines)
    interrupts a running call on every engine, and the engines keep serving."""
    from ferroparallel.error import RemoteError

    ar = rc[:].apply_async(time.sleep, 30)
    time.sleep(0.5)
    cluster.signal_engines_sync(signal.SIGINT)
    with pytest.raises(RemoteError, match="KeyboardInterrupt"):
        ar.get(timeout=timeout)
    assert rc[:].apply_sync(lambda: "still here") == ["still here"] * len(rc.ids)
