"""``Client.become_dask`` / ``stop_dask``: engines serving as dask.distributed workers (real
cluster, see ``cluster_fixtures``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

import pytest

import ferroparallel as ipp
from ferroparallel.client import Client
from ferroparallel.dask_support import import_distributed

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(180)

distributed = pytest.importorskip("distributed")

SHORT = 60.0


def worker_thread_name() -> str:
    import threading

    return threading.current_thread().name


@contextlib.contextmanager
def _distributed_log() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    """A handler on the ``distributed`` logger for the block (``(its text, the handler)``):
    what dask's logging would show in a user's stream."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    dlog = logging.getLogger("distributed")
    dlog.addHandler(handler)
    try:
        yield buf, handler
    finally:
        dlog.removeHandler(handler)


@pytest.fixture
def dask_rc(rc: Client) -> Iterator[Client]:
    """The shared cluster's client; whatever dask the test started is stopped afterwards."""
    try:
        yield rc
    finally:
        rc.stop_dask()


def test_become_dask_runs_dask_work_on_the_engines(dask_rc: Client) -> None:
    rc = dask_rc
    engine_pids = rc[:].apply_sync(os.getpid)
    with rc.become_dask() as dc:
        workers = dc.scheduler_info()["workers"]
        assert len(workers) == 2
        assert sorted(w["name"] for w in workers.values()) == ["engine-0", "engine-1"]
        assert all(w["nthreads"] == 1 for w in workers.values())
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
        assert dc.scheduler.address.startswith("tcp://127.0.0.1:")
        squares = dc.gather(dc.map(lambda x: x * x, range(20)))
        assert squares == [x * x for x in range(20)]
        pids = set(dc.gather(dc.map(lambda _: os.getpid(), range(20), pure=False)))
        assert pids <= set(engine_pids)
        # the engines keep serving ferroparallel requests, on their own main thread
        assert rc[:].apply_sync(os.getpid) == engine_pids
        threads = set(dc.gather(dc.map(lambda _: worker_thread_name(), range(4), pure=False)))
        assert "MainThread" not in threads
        # as in ipyparallel, the worker is in the engine namespace under both names
        addresses = rc[:].apply_sync(
            ipp.interactive(lambda: (dask_worker.address, distributed_worker is dask_worker))  # noqa: F821
        )
        assert sorted(a for a, _ in addresses) == sorted(workers) and all(s for _, s in addresses)
    rc.stop_dask()
    assert rc[:].apply_sync(ipp.interactive(lambda: "dask_worker" in globals())) == [False] * 2


def test_become_dask_on_some_engines_with_worker_args(dask_rc: Client) -> None:
    rc = dask_rc
    with rc.become_dask(targets=[1], nthreads=2) as dc:
        workers = list(dc.scheduler_info()["workers"].values())
        assert [(w["name"], w["nthreads"]) for w in workers] == [("engine-1", 2)]
        assert dc.submit(os.getpid).result(timeout=SHORT) == rc[1].apply_sync(os.getpid)
    # a second call adds workers to the same scheduler
    with rc.become_distributed(targets=[0]) as dc:
        names = sorted(w["name"] for w in dc.scheduler_info()["workers"].values())
        assert names == ["engine-0", "engine-1"]


def test_stop_dask_stops_workers_and_scheduler(dask_rc: Client) -> None:
    rc = dask_rc
    dc = rc.become_dask()
    address = dc.scheduler.address
    dc.close()
    rc.stop_dask(targets=[0])
    with distributed.Client(address, timeout=SHORT) as dc:
        names = [w["name"] for w in dc.scheduler_info()["workers"].values()]
        assert names == ["engine-1"]
    rc.stop_dask()
    with pytest.raises(OSError):
        distributed.Client(address, timeout=2)
    # and it starts again, with a new scheduler
    with rc.become_dask() as dc:
        assert dc.submit(sum, [1, 2, 3]).result(timeout=SHORT) == 6
    assert rc[:].apply_sync(lambda: 7) == [7, 7]


def test_missing_distributed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'dask\[distributed\]'"):
        import_distributed()


def test_scheduler_in_the_client_does_not_print_info_logs(dask_rc: Client) -> None:
    """ipyparallel's scheduler logs in its controller; ours runs in the user's process, where
    dask's default stream handler would print every worker connection at INFO. The handlers
    are raised to WARNING while the scheduler runs and restored by ``stop_dask``."""
    import io
    import logging

    rc = dask_rc
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.INFO)
    dlog = logging.getLogger("distributed")
    dlog.addHandler(handler)
    try:
        dc = rc.become_dask()
        assert dc.submit(lambda: 3).result(timeout=SHORT) == 3
        assert handler.level == logging.WARNING
        rc.stop_dask()
        assert handler.level == logging.INFO
        assert "Register worker" not in buf.getvalue()
        assert " - INFO - " not in buf.getvalue() and "INFO" not in buf.getvalue()
    finally:
        dlog.removeHandler(handler)


def _square(x: int) -> int:
    return x * x


def test_scheduler_warnings_stay_out_of_the_users_terminal(dask_rc: Client) -> None:
    """The dask notebook of ipyparallel's docs: ``stop_distributed()`` while the dask client
    still holds computed futures, then ``become_dask`` again. The scheduler warns that removing
    the workers loses computed tasks (naming every key); ipyparallel's scheduler logs that in
    its controller, so nothing reaches the user's stream, while the client's own records do."""
    rc = dask_rc
    with _distributed_log() as (buf, handler):
        dc = rc.become_dask()
        squares = dc.map(_square, range(20))
        assert dc.submit(sum, squares).result(timeout=SHORT) == sum(i * i for i in range(20))
        rc.stop_distributed()
        dc.close()
        assert "lose already computed" not in buf.getvalue()
        assert "square" not in buf.getvalue()
        with rc.become_dask() as dc:
            assert dc.submit(_square, 4).result(timeout=SHORT) == 16
            logging.getLogger("distributed.client").warning("from the client")
        assert "from the client" in buf.getvalue()
        rc.stop_dask()
        assert handler.filters == [] and handler.level == logging.NOTSET


def test_stopping_the_scheduler_after_progress_logs_no_cancelled_error(
    dask_rc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dask notebook of ipyparallel's docs shows ``distributed.progress(total)`` and then
    calls ``stop_distributed()``: the scheduler's feed to the (finished) progress bar is
    cancelled as the scheduler closes, which dask logs at ERROR with a CancelledError
    traceback. ipyparallel's scheduler logs that in its controller; a cancellation on closing
    is no error for the user, so it stays out of their terminal."""
    rc = dask_rc
    with _distributed_log() as (buf, handler):
        dc = rc.become_dask()
        total = dc.submit(sum, dc.map(_square, range(20)))
        distributed.progress(total)  # a text bar: returns once the result is computed
        assert total.result(timeout=SHORT) == sum(i * i for i in range(20))
        dc.close()  # (else it retries the stopped scheduler and logs that, as in ipyparallel)
        rc.stop_distributed()
        logging.getLogger("distributed.scheduler").error("a real error, elsewhere")
    assert "CancelledError" not in buf.getvalue()
    assert "a real error, elsewhere" in buf.getvalue()
    capsys.readouterr()
