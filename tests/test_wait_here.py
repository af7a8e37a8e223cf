"""A thread waiting in ``get()`` receives and handles replies itself (``client/waiting.py``):
results stay correct with several waiting threads, and Ctrl-C in the main thread is delivered
after a batch, never in the middle of one (real cluster, see ``cluster_fixtures``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from ferroparallel.client import Client

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

SHORT = 30.0


class Interrupted(Exception):
    """Raised by the test's SIGINT handler."""


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.0005)  # so that collecting the results takes a while: get() has to wait
    return x * x


@pytest.fixture
def sigint_handler() -> Iterator[None]:
    old = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _interrupt_repeatedly(stop: threading.Event, every: float = 0.003) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigint_during_get_loses_no_reply(rc: Client, sigint_handler: None) -> None:
    """Interrupts land while the main thread handles batches of replies: each is raised
    between batches, and every result still arrives."""
    hits = []
    armed = [False]  # raise only inside get(): elsewhere the test itself would be interrupted

    def handler(signum: int, frame: object) -> None:
        hits.append(signum)
        if armed[0]:
            raise Interrupted

    signal.signal(signal.SIGINT, handler)
    view = rc.load_balanced_view()
    stop = threading.Event()
    pinger = _interrupt_repeatedly(stop)
    ars = [view.apply_async(slow_square, i) for i in range(3000)]
    results: dict[int, int] = {}
    interrupted: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(results) < len(ars) and time.monotonic() < deadline:
            for i, ar in enumerate(ars):
                if i in results:
                    continue
                try:
                    armed[0] = True
                    results[i] = ar.get(timeout=SHORT)
                except Interrupted:
                    interrupted.append(i)
                    if len(interrupted) > 30:
                        stop.set()
                    break
                finally:
                    armed[0] = False
    finally:
        stop.set()
        pinger.join()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a last queued signal must not escape
        time.sleep(0.05)
    assert hits and interrupted, "no interrupt was raised inside get()"
    assert results == {i: i * i for i in range(3000)}
    assert not rc.outstanding


def test_a_handler_that_does_not_raise_lets_get_finish(rc: Client, sigint_handler: None) -> None:
    hits = []
    signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    ar = rc[0].apply_async(time.sleep, 0.5)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    assert ar.get(timeout=SHORT) is None
    deadline = time.monotonic() + 5
    while not hits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hits == [signal.SIGINT]


def test_many_threads_wait_for_their_own_results(rc: Client) -> None:
    views = [rc[0], rc[1], rc.load_balanced_view()]

    def work(k: int) -> list[int]:
        view = views[k % len(views)]
        return [view.apply_sync(square, k * 1000 + i) for i in range(100)]

    with ThreadPoolExecutor(6) as pool:
        out = list(pool.map(work, range(12)))
    assert out == [[square(k * 1000 + i) for i in range(100)] for k in range(12)]


def test_threads_waiting_for_one_result_all_return(rc: Client) -> None:
    ar = rc[1].apply_async(time.sleep, 0.3)
    with ThreadPoolExecutor(4) as pool:
        waits = [pool.submit(ar.get, SHORT) for _ in range(4)]
        assert ar.get(timeout=SHORT) is None
        assert [w.result(timeout=SHORT) for w in waits] == [None] * 4
