"""The client's pool of reusable worker threads (``ferroparallel.client.workers``)."""

from __future__ import annotations

import threading
import time

import pytest

from ferroparallel.client.workers import Workers

pytestmark = pytest.mark.timeout(60)


def test_an_idle_worker_is_reused_and_a_busy_pool_grows() -> None:
    pool = Workers("test-worker")
    ran: list[threading.Thread] = []
    done = threading.Event()
    pool.submit(lambda: (ran.append(threading.current_thread()), done.set()))
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while pool._idle == 0 and time.monotonic() < deadline:  # back to waiting for a job
        time.sleep(0.01)
    done.clear()
    pool.submit(lambda: (ran.append(threading.current_thread()), done.set()))
    assert done.wait(5)
    assert ran[0] is ran[1] and pool.threads == 1
    # two jobs that wait for each other only finish if they run at once
    both = threading.Barrier(2, timeout=5)
    finished: list[bool] = []
    for _ in range(2):
        pool.submit(lambda: finished.append(both.wait() >= 0))
    deadline = time.monotonic() + 5
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert finished == [True, True] and pool.threads == 2
    pool.close()
    assert pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_idle_workers_end_and_a_failing_job_keeps_its_worker() -> None:
    pool = Workers("test-worker", idle_timeout=0.2)
    ran = threading.Event()

    def fails() -> None:
        raise ValueError("boom")

    pool.submit(fails)
    pool.submit(ran.set)
    assert ran.wait(5)
    deadline = time.monotonic() + 5
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.threads == 0  # idle past the timeout: ended
    pool.submit(ran.clear)  # a new worker starts
    deadline = time.monotonic() + 5
    while ran.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ran.is_set()
    pool.close()


def test_close_waits_for_running_jobs_and_stops_idle_workers() -> None:
    pool = Workers("test-worker")
    release = threading.Event()
    finished = threading.Event()

    def job() -> None:
        release.wait(5)
        finished.set()

    pool.submit(job)
    pool.submit(lambda: None)
    threading.Timer(0.2, release.set).start()
    pool.close(timeout=5)
    assert finished.is_set() and pool.threads == 0
