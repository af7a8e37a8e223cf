"""Acceptance tests of the load-balanced task scheduler and ``LoadBalancedView``.

Real clusters (a Rust controller and Python engines) are used throughout:

- one module-scoped cluster of 2 engines (controller ``--ping 200``, default scheme and HWM) for
  most tests, with ``FERROPARALLEL_DIR`` in a temporary directory;
- small throwaway clusters for the tests that need another ``--scheme`` or ``--hwm``, that kill
  engines, or that add engines.

Every wait is bounded. Functions sent to the engines are either builtins or marked
``@ipp.interactive`` (pickled by value, with their names resolved on the engine), because the
engines cannot import this test module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ferroparallel as ipp
from cluster_util import wait_until as _wait_until
from ferroparallel import error
from ferroparallel.client import Client
from ferroparallel.client.view import LoadBalancedView
from ferroparallel.cluster import Cluster

pytestmark = pytest.mark.timeout(120)

#: Controller arguments of every cluster here: a fast heartbeat, so dead engines are noticed soon.
CONTROLLER_ARGS = ["--ping", "200"]
#: Bound for anything that takes well under a second on an idle machine.
WAIT = 30.0
SCHEMES = ["leastload", "lru", "twobin", "weighted", "plainrandom"]


# -- functions run on the engines -----------------------------------------------------------------


@ipp.interactive
def echo(x: Any) -> Any:
    return x


@ipp.interactive
def double(x: int) -> int:
    return 2 * x


@ipp.interactive
def sleep_echo(x: Any, t: float = 0.2) -> Any:
    import time

    time.sleep(t)
    return x


@ipp.interactive
def engine_pid() -> int:
    import os

    return os.getpid()


@ipp.interactive
def span(t: float) -> tuple[float, float]:
    """Sleep ``t`` seconds; return the wall-clock interval it ran in."""
    import time

    start = time.time()
    time.sleep(t)
    return start, time.time()


@ipp.interactive
def fail(msg: str = "boom") -> None:
    raise ValueError(msg)


@ipp.interactive
def slow_fail(t: float = 0.3) -> None:
    import time

    time.sleep(t)
    raise RuntimeError("failed late")


@ipp.interactive
def fail_on_pid(bad_pid: int) -> int:
    import os

    if os.getpid() == bad_pid:
        raise RuntimeError(f"refusing to run on {bad_pid}")
    return os.getpid()


@ipp.interactive
def is_pid(pid: int) -> bool:
    import os

    return os.getpid() == pid


@ipp.interactive
def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


@ipp.interactive
def noop(x: int) -> int:
    return x


@ipp.interactive
def gated(x: Any, path: str, limit: float = 20.0) -> Any:
    """Return ``x`` once the file ``path`` exists (fail after ``limit`` seconds)."""
    import os
    import time

    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)
    return x


# -- helpers --------------------------------------------------------------------------------------


def wait_until(cond: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (see cluster_util.wait_until)."""
    return _wait_until(cond, timeout, what)


def expect_remote(ar: Any, cls: type[BaseException], ename: str) -> Any:
    """``ar.get()`` raises ``cls``, which is also a RemoteError named ``ename``."""
    with pytest.raises(cls) as info:
        ar.get(timeout=WAIT)
    e = info.value
    assert isinstance(e, ipp.RemoteError), f"{type(e).__mro__} is not a RemoteError"
    assert e.ename == ename, f"ename {e.ename!r} ({e})"
    return e


def outcome(ar: Any) -> Any:
    """The result of a finished AsyncResult, or the exception it raises."""
    try:
        return ar.get(timeout=WAIT)
    except Exception as e:  # noqa: BLE001 - the caller inspects it
        return e


def _stop(cluster: Cluster, rc: Client | None) -> None:
    """Close the client, stop the cluster, SIGKILL whatever survives."""
    if rc is not None:
        with contextlib.suppress(Exception):
            rc.close()
    with contextlib.suppress(Exception):
        cluster.stop_cluster_sync()
    for p in cluster._processes():
        with contextlib.suppress(Exception):
            if p.running:
                p.send_signal(signal.SIGKILL)


_counter = itertools.count()


def _start(n: int, *controller_args: str) -> tuple[Cluster, Client]:
    cluster = ipp.Cluster(
        n=n,
        controller_args=[*CONTROLLER_ARGS, *controller_args],
        cluster_id=f"lb-{os.getpid()}-{next(_counter)}",
    )
    rc: Client | None = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=60)
    except BaseException:
        _stop(cluster, rc)
        raise
    return cluster, rc


class Gate:
    """A file that ``gated`` tasks wait for: they block until ``open()``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()


def _settle(rc: Client) -> None:
    """Wait for (or abort) everything a test left outstanding."""
    if not rc.wait(timeout=WAIT):
        rc.abort(block=True)
        assert rc.wait(timeout=WAIT), f"work still outstanding: {rc.outstanding}"


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ``FERROPARALLEL_DIR`` for this module's clusters."""
    root = tmp_path_factory.mktemp("fp_loadbalanced")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERROPARALLEL_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def cluster_rc(fp_dir: Path) -> Iterator[tuple[Cluster, Client]]:
    """The module's 2-engine cluster and its client."""
    cluster, rc = _start(2)
    yield cluster, rc
    _stop(cluster, rc)


@pytest.fixture
def rc(cluster_rc: tuple[Cluster, Client]) -> Iterator[Client]:
    """The module client (engines 0 and 1), settled after each test."""
    client = cluster_rc[1]
    yield client
    _settle(client)
    assert client.ids == [0, 1], f"the module cluster lost engines: {client.ids}"


@pytest.fixture
def lv(rc: Client) -> LoadBalancedView:
    """A fresh LoadBalancedView on the module cluster."""
    return rc.load_balanced_view()


@pytest.fixture(scope="module")
def pids(cluster_rc: tuple[Cluster, Client]) -> dict[int, int]:
    """Engine id -> engine process id on the module cluster."""
    rc = cluster_rc[1]
    return {i: rc[i].apply_sync(os.getpid) for i in rc.ids}


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    """A closed gate, opened at teardown (list it after ``rc``/``lv`` so that it opens first)."""
    g = Gate(tmp_path / "gate")
    yield g
    g.open()


@pytest.fixture
def make_cluster(fp_dir: Path) -> Iterator[Callable[..., tuple[Cluster, Client]]]:
    """``cluster, rc = make_cluster(n, *controller_args)``: stopped after the test."""
    made: list[tuple[Cluster, Client]] = []

    def make(n: int, *controller_args: str) -> tuple[Cluster, Client]:
        pair = _start(n, *controller_args)
        made.append(pair)
        return pair

    yield make
    for cluster, client in made:
        _stop(cluster, client)


# -- apply ----------------------------------------------------------------------------------------


def test_apply_variants(lv: LoadBalancedView) -> None:
    assert lv.block is False
    ar = lv.apply(double, 21)
    assert isinstance(ar, ipp.AsyncResult)
    assert ar.get(timeout=WAIT) == 42
    assert ar.metadata.engine_id in (0, 1)
    assert lv.apply_sync(double, 5) == 10
    ar = lv.apply_async(sleep_echo, "x", t=0.05)
    assert ar.get(timeout=WAIT) == "x"
    assert lv.apply_sync(pow, 2, 10) == 1024
    lv.block = True
    assert lv.apply(double, 4) == 8
    assert isinstance(lv.apply_async(double, 4), ipp.AsyncResult)


def test_engine_id_of_a_running_silent_task(lv: LoadBalancedView, gate: Gate) -> None:
    """As ipyparallel: while a task runs, ``ar.engine_id`` names its engine (from the hub's
    records here), so ``rc.shutdown(targets=ar.engine_id)`` hits that engine only."""
    ar = lv.apply_async(gated, None, gate.path)  # runs until the gate opens
    deadline = time.monotonic() + WAIT
    eid = None
    while eid is None and time.monotonic() < deadline:
        time.sleep(0.05)
        eid = ar.engine_id
    assert not ar.ready()
    assert eid in lv.client.ids
    gate.open()
    ar.get(timeout=30)
    assert ar.engine_id == eid


def test_apply_remote_error(lv: LoadBalancedView) -> None:
    e = expect_remote(lv.apply_async(fail, "bad input"), ipp.RemoteError, "ValueError")
    assert "bad input" in e.evalue


# -- targets --------------------------------------------------------------------------------------


def test_targets_restrict_where_tasks_run(rc: Client, pids: dict[int, int]) -> None:
    only1 = rc.load_balanced_view(targets=[1])
    ars = [only1.apply_async(sleep_echo, i, 0.05) for i in range(8)]
    assert [ar.get(timeout=WAIT) for ar in ars] == list(range(8))
    assert {ar.metadata.engine_id for ar in ars} == {1}
    assert set(only1.map_sync(lambda _: __import__("os").getpid(), range(6))) == {pids[1]}

    lv = rc.load_balanced_view()
    with lv.temp_flags(targets=0):
        ars = [lv.apply_async(engine_pid) for _ in range(6)]
    assert {ar.get(timeout=WAIT) for ar in ars} == {pids[0]}
    assert {ar.metadata.engine_id for ar in ars} == {0}
    assert lv.targets is None


# -- after ----------------------------------------------------------------------------------------


def test_after_a_list_of_pending_tasks(lv: LoadBalancedView) -> None:
    a = lv.apply_async(sleep_echo, "a", 0.4)
    b = lv.apply_async(sleep_echo, "b", 0.2)
    with lv.temp_flags(after=[a, b]):
        c = lv.apply_async(echo, "c")
    assert c.get(timeout=WAIT) == "c"
    assert c.metadata.started >= a.metadata.completed
    assert c.metadata.started >= b.metadata.completed


@pytest.mark.parametrize("form", ["asyncresult", "msg_id", "msg_id_list", "dependency"])
def test_after_forms(lv: LoadBalancedView, form: str) -> None:
    a = lv.apply_async(sleep_echo, "a", 0.3)
    dep: Any = {
        "asyncresult": a,
        "msg_id": a.msg_ids[0],
        "msg_id_list": list(a.msg_ids),
        "dependency": ipp.Dependency([a]),
    }[form]
    with lv.temp_flags(after=dep):
        c = lv.apply_async(echo, form)
    assert c.get(timeout=WAIT) == form
    assert c.metadata.started >= a.metadata.completed
    assert lv.after is None


def test_after_tasks_that_already_finished(lv: LoadBalancedView) -> None:
    done = [lv.apply_async(echo, i) for i in range(3)]
    assert lv.wait(done, timeout=WAIT)
    with lv.temp_flags(after=done):
        c = lv.apply_async(echo, "ok")
    assert c.get(timeout=WAIT) == "ok"
    with lv.temp_flags(after=ipp.Dependency(done, all=False)):
        assert lv.apply_async(echo, "any").get(timeout=WAIT) == "any"


def test_after_dependency_flag_combinations(lv: LoadBalancedView) -> None:
    ok = lv.apply_async(echo, 1)
    ok2 = lv.apply_async(echo, 2)
    bad = lv.apply_async(fail)
    bad2 = lv.apply_async(fail)
    assert lv.wait([ok, ok2, bad, bad2], timeout=WAIT)
    D = ipp.Dependency
    cases: list[tuple[str, Any, bool]] = [
        ("all/success, all succeeded", D([ok, ok2]), True),
        ("all/success, one failed", D([ok, bad]), False),
        ("any/success, one succeeded", D([ok, bad], all=False), True),
        ("any/success, all failed", D([bad, bad2], all=False), False),
        ("all/success+failure", D([ok, bad], success=True, failure=True), True),
        ("all/failure, all failed", D([bad, bad2], success=False, failure=True), True),
        ("all/failure, one succeeded", D([ok, bad], success=False, failure=True), False),
        ("any/failure, one failed", D([ok, bad], all=False, success=False, failure=True), True),
        ("any/failure, none failed", D([ok, ok2], all=False, success=False, failure=True), False),
    ]
    runs = []
    for label, dep, _ in cases:
        with lv.temp_flags(after=dep):
            runs.append(lv.apply_async(echo, label))
    for (label, _, met), ar in zip(cases, runs, strict=True):
        if met:
            assert outcome(ar) == label, label
        else:
            e = expect_remote(ar, error.ImpossibleDependency, "ImpossibleDependency")
            assert not isinstance(e, error.InvalidDependency), label


def test_after_pending_dependencies_with_flags(lv: LoadBalancedView) -> None:
    """The same combinations, decided when the dependencies finish later."""
    late_bad = lv.apply_async(slow_fail, 0.3)
    late_ok = lv.apply_async(sleep_echo, "ok", 0.3)
    D = ipp.Dependency
    with lv.temp_flags(after=late_bad):
        default = lv.apply_async(echo, "never")
    with lv.temp_flags(after=D([late_bad], success=False, failure=True)):
        on_failure = lv.apply_async(echo, "after failure")
    with lv.temp_flags(after=D([late_ok, late_bad], all=False)):
        on_any = lv.apply_async(echo, "after any")
    with lv.temp_flags(after=D([late_ok], success=False, failure=True)):
        fail_only = lv.apply_async(echo, "never")
    expect_remote(default, error.ImpossibleDependency, "ImpossibleDependency")
    expect_remote(fail_only, error.ImpossibleDependency, "ImpossibleDependency")
    assert on_failure.get(timeout=WAIT) == "after failure"
    assert on_failure.metadata.started >= late_bad.metadata.completed
    assert on_any.get(timeout=WAIT) == "after any"
    assert on_any.metadata.started >= min(late_ok.metadata.completed, late_bad.metadata.completed)


def test_dict_dependency_on_the_wire(rc: Client, lv: LoadBalancedView) -> None:
    """The scheduler reads the dict form ``{dependencies, all, success, failure}``."""
    ok = lv.apply_async(echo, 1)
    bad = lv.apply_async(fail)
    assert lv.wait([ok, bad], timeout=WAIT)
    ids = [ok.msg_ids[0], bad.msg_ids[0]]

    def send(after: Any) -> ipp.AsyncResult:
        fut = rc.send_apply_request("task", echo, ("raw",), {}, metadata={"after": after})
        return ipp.AsyncResult(rc, [fut], fname="echo")

    any_ok = send({"dependencies": ids, "all": False, "success": True, "failure": False})
    all_ok = send({"dependencies": ids, "all": True, "success": True, "failure": False})
    both = send({"dependencies": ids, "all": True, "success": True, "failure": True})
    assert any_ok.get(timeout=WAIT) == "raw"
    assert both.get(timeout=WAIT) == "raw"
    expect_remote(all_ok, error.ImpossibleDependency, "ImpossibleDependency")


# -- follow ---------------------------------------------------------------------------------------


def test_follow_runs_on_the_same_engine(lv: LoadBalancedView) -> None:
    for _ in range(3):
        a = lv.apply_async(sleep_echo, "a", 0.2)
        with lv.temp_flags(follow=[a]):
            pending = [lv.apply_async(engine_pid) for _ in range(3)]
        a.get(timeout=WAIT)
        for f in pending:
            f.get(timeout=WAIT)
            assert f.metadata.engine_id == a.metadata.engine_id
    # following a finished task
    with lv.temp_flags(follow=a):
        later = [lv.apply_async(echo, i) for i in range(4)]
    for f in later:
        f.get(timeout=WAIT)
        assert f.metadata.engine_id == a.metadata.engine_id


def test_follow_a_failure(lv: LoadBalancedView) -> None:
    bad = lv.apply_async(fail)
    with lv.temp_flags(follow=ipp.Dependency([bad], success=False, failure=True)):
        f = lv.apply_async(echo, "here")
    assert f.get(timeout=WAIT) == "here"
    assert f.metadata.engine_id == bad.metadata.engine_id
    # by default a failed task cannot be followed
    with lv.temp_flags(follow=bad):
        g = lv.apply_async(echo, "never")
    expect_remote(g, error.ImpossibleDependency, "ImpossibleDependency")


def test_follow_all_across_two_engines_is_impossible(rc: Client, lv: LoadBalancedView) -> None:
    on0 = rc.load_balanced_view(targets=0).apply_async(echo, 0)
    on1 = rc.load_balanced_view(targets=1).apply_async(echo, 1)
    assert lv.wait([on0, on1], timeout=WAIT)
    assert {on0.metadata.engine_id, on1.metadata.engine_id} == {0, 1}
    with lv.temp_flags(follow=[on0, on1]):
        both = lv.apply_async(echo, "never")
    expect_remote(both, error.ImpossibleDependency, "ImpossibleDependency")
    with lv.temp_flags(follow=ipp.Dependency([on0, on1], all=True)):
        both = lv.apply_async(echo, "never")
    expect_remote(both, error.ImpossibleDependency, "ImpossibleDependency")
    with lv.temp_flags(follow=ipp.Dependency([on0, on1], all=False)):
        either = lv.apply_async(echo, "either")
    assert either.get(timeout=WAIT) == "either"
    assert either.metadata.engine_id in (0, 1)


def test_follow_all_of_running_tasks_that_end_on_two_engines_is_impossible(
    rc: Client, lv: LoadBalancedView
) -> None:
    """The dependencies are still running when the task arrives; once they have finished on
    two different engines, no engine can run it (ipyparallel: ImpossibleDependency)."""
    on0 = rc.load_balanced_view(targets=0).apply_async(time.sleep, 0.3)
    on1 = rc.load_balanced_view(targets=1).apply_async(time.sleep, 0.3)
    with lv.temp_flags(follow=[on0, on1]):
        both = lv.apply_async(echo, "never")
    with lv.temp_flags(follow=ipp.Dependency([on0, on1], all=True, failure=True)):
        either_outcome = lv.apply_async(echo, "never")
    assert not both.ready()
    expect_remote(both, error.ImpossibleDependency, "ImpossibleDependency")
    expect_remote(either_outcome, error.ImpossibleDependency, "ImpossibleDependency")
    assert {on0.metadata.engine_id, on1.metadata.engine_id} == {0, 1}


def test_after_and_follow_together(lv: LoadBalancedView) -> None:
    a = lv.apply_async(sleep_echo, "a", 0.2)
    b = lv.apply_async(sleep_echo, "b", 0.4)
    with lv.temp_flags(follow=a, after=b):
        c = lv.apply_async(echo, "c")
    assert c.get(timeout=WAIT) == "c"
    assert c.metadata.engine_id == a.metadata.engine_id
    assert c.metadata.started >= b.metadata.completed


# -- invalid dependencies -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["after", "follow"])
def test_unknown_msg_id_is_an_invalid_dependency(lv: LoadBalancedView, kind: str) -> None:
    known = lv.apply_async(echo, 1)
    known.get(timeout=WAIT)
    with lv.temp_flags(**{kind: [known, "no-such-msg-id-0123"]}):
        ar = lv.apply_async(echo, "never")
    e = expect_remote(ar, error.InvalidDependency, "InvalidDependency")
    assert isinstance(e, error.ImpossibleDependency)
    assert isinstance(e, ipp.RemoteError)
    assert ar.metadata.engine_id is None  # no engine ever saw it
    # the hub records the scheduler's reply under the header it was sent with (another
    # client's get_result takes its completion time from there)
    (rec,) = lv.client.db_query({"msg_id": ar.msg_ids[0]}, keys=["result_header", "completed"])
    header = rec["result_header"]
    assert header["msg_type"] == "apply_reply" and header["msg_id"] != f"{ar.msg_ids[0]}_reply"
    assert {"date", "session", "username", "version"} <= set(header)
    assert rec["completed"] is not None


@pytest.mark.parametrize("kind", ["after", "follow"])
def test_a_direct_request_is_no_dependency(
    rc: Client, lv: LoadBalancedView, kind: str, gate: Gate
) -> None:
    """As ipyparallel's scheduler (reference 8.3): it knows only the tasks submitted to it, so
    a direct request's msg_id, finished or not, is an unknown (invalid) dependency."""
    pending = rc[0].apply_async(gated, None, gate.path)  # running until the gate opens
    direct = rc[1].apply_async(echo, 1)
    direct.get(timeout=WAIT)
    for dep in (direct, pending):
        with lv.temp_flags(**{kind: dep}):
            ar = lv.apply_async(echo, "never")
        e = expect_remote(ar, error.InvalidDependency, "InvalidDependency")
        assert dep.msg_ids[0] in e.evalue
    assert not pending.ready()  # (it was still running when named)
    gate.open()
    pending.get(timeout=WAIT)


# -- timeouts -------------------------------------------------------------------------------------


def test_timeout_while_waiting_for_a_dependency(lv: LoadBalancedView, gate: Gate) -> None:
    blocker = lv.apply_async(gated, "slow", gate.path)
    t0 = time.monotonic()
    with lv.temp_flags(after=blocker, timeout=0.3):
        ar = lv.apply_async(echo, "never")
    e = expect_remote(ar, error.TaskTimeout, "TaskTimeout")
    elapsed = time.monotonic() - t0
    assert isinstance(e, error.DependencyTimeout)
    assert isinstance(e, error.ImpossibleDependency)
    assert elapsed >= 0.29, f"timed out after {elapsed:.3f} s, before its 0.3 s timeout"
    assert not blocker.ready()
    gate.open()
    assert blocker.get(timeout=WAIT) == "slow"


def test_timeout_does_not_limit_run_time(lv: LoadBalancedView) -> None:
    with lv.temp_flags(timeout=0.2):
        ar = lv.apply_async(sleep_echo, "ran", 0.6)
    assert ar.get(timeout=WAIT) == "ran"


# -- retries --------------------------------------------------------------------------------------


def test_retries_move_a_failing_task_elsewhere(rc: Client, pids: dict[int, int]) -> None:
    lv = rc.load_balanced_view()
    # without retries, a task pinned to the bad engine fails
    with lv.temp_flags(targets=[0]):
        expect_remote(lv.apply_async(fail_on_pid, pids[0]), ipp.RemoteError, "RuntimeError")
    with lv.temp_flags(retries=1):
        ars = [lv.apply_async(fail_on_pid, pids[0]) for _ in range(6)]
    assert [ar.get(timeout=WAIT) for ar in ars] == [pids[1]] * 6
    assert {ar.metadata.engine_id for ar in ars} == {1}


def test_retries_exhausted_relay_the_error(lv: LoadBalancedView) -> None:
    with lv.temp_flags(retries=1):
        ar = lv.apply_async(fail, "every time")
    e = expect_remote(ar, ipp.RemoteError, "ValueError")
    assert "every time" in e.evalue


def test_more_retries_than_engines_relay_the_error(lv: LoadBalancedView) -> None:
    with lv.temp_flags(retries=3):
        ar = lv.apply_async(fail, "every time")
    e = expect_remote(ar, ipp.RemoteError, "ValueError")
    assert "every time" in e.evalue


def test_retries_on_targets_all_failed_is_impossible(lv: LoadBalancedView) -> None:
    # as ipyparallel: a retry needs an allowed engine that has not failed the task; with
    # explicit targets, none left makes it an ImpossibleDependency (naming the last failure)
    with lv.temp_flags(retries=2, targets=[0]):
        ar = lv.apply_async(fail, "every time")
    e = expect_remote(ar, error.ImpossibleDependency, "ImpossibleDependency")
    assert "ValueError" in e.evalue and "every time" in e.evalue, e.evalue


def test_a_dependency_unmet_everywhere_with_a_timeout_times_out(lv: LoadBalancedView) -> None:
    # as ipyparallel: with a timeout, the task waits for an engine that meets it until then
    @ipp.require("ferroparallel_no_such_module_xyz")
    def needs_it() -> int:
        return 1

    with lv.temp_flags(timeout=0.5):
        ar = lv.apply_async(needs_it)
    expect_remote(ar, error.TaskTimeout, "TaskTimeout")


def test_retries_beyond_the_engines_with_a_timeout_time_out(rc: Client) -> None:
    # ipyparallel's own test: retries for every engine (and more), and a timeout: once each
    # engine has failed it, the task waits for another until its timeout
    lv = rc.load_balanced_view()
    for r in range(len(rc.ids) - 1):
        with lv.temp_flags(retries=r):
            expect_remote(lv.apply_async(fail, "x"), ipp.RemoteError, "ValueError")
    with lv.temp_flags(retries=len(rc.ids), timeout=0.1):
        e = expect_remote(lv.apply_async(fail, "x"), error.TaskTimeout, "TaskTimeout")
    assert "ValueError" in e.evalue, e.evalue  # (its last failure is not lost)


# -- functional dependencies ----------------------------------------------------------------------


def test_require_missing_module_is_impossible(lv: LoadBalancedView) -> None:
    @ipp.require("ferroparallel_no_such_module_xyz")
    def needs_it() -> int:
        return 1

    e = expect_remote(lv.apply_async(needs_it), error.ImpossibleDependency, "ImpossibleDependency")
    # the scheduler's error repeats what the last engine said
    assert "ferroparallel_no_such_module_xyz" in e.evalue, e.evalue
    with lv.temp_flags(targets=[1]):
        ar = lv.apply_async(needs_it)
    e = expect_remote(ar, error.ImpossibleDependency, "ImpossibleDependency")
    assert "none of the task's target engines" in e.evalue, e.evalue
    assert "ferroparallel_no_such_module_xyz" in e.evalue, e.evalue


def test_require_present_module_runs(lv: LoadBalancedView) -> None:
    @ipp.require("math", "json")
    def uses_them(x: float) -> str:
        import json
        import math

        return json.dumps(math.sqrt(x))

    assert lv.apply_sync(uses_them, 16.0) == "4.0"
    assert lv.map_sync(uses_them, [1.0, 4.0, 9.0]) == ["1.0", "2.0", "3.0"]


@pytest.mark.parametrize("interactive", [True, False], ids=["interactive", "nested"])
def test_require_makes_the_module_name_usable(lv: LoadBalancedView, interactive: bool) -> None:
    def hypot(a: float, b: float) -> float:
        return math.hypot(a, b)  # noqa: F821 - provided on the engine by @require("math")

    if interactive:
        hypot = ipp.interactive(hypot)
    f = ipp.require("math")(hypot)
    assert lv.apply_sync(f, 3.0, 4.0) == 5.0


def test_depend_runs_only_where_met(lv: LoadBalancedView, pids: dict[int, int]) -> None:
    @ipp.depend(is_pid, pids[0])
    def where() -> int:
        import os

        return os.getpid()

    ars = [lv.apply_async(where) for _ in range(8)]
    assert [ar.get(timeout=WAIT) for ar in ars] == [pids[0]] * 8
    assert {ar.metadata.engine_id for ar in ars} == {0}
    # the same with an explicit ``dependent``
    there = ipp.dependent(engine_pid, is_pid, pids[1])
    ars = [lv.apply_async(there) for _ in range(4)]
    assert {ar.get(timeout=WAIT) for ar in ars} == {pids[1]}


def test_depend_met_nowhere_is_impossible(lv: LoadBalancedView) -> None:
    @ipp.depend(is_pid, -1)
    def nowhere() -> int:
        return 1

    expect_remote(lv.apply_async(nowhere), error.ImpossibleDependency, "ImpossibleDependency")
    with lv.temp_flags(targets=[0, 1]):
        ar = lv.apply_async(nowhere)
    expect_remote(ar, error.ImpossibleDependency, "ImpossibleDependency")


@ipp.interactive
def has_marker(value: int) -> bool:
    return globals().get("dep_marker") == value


@ipp.interactive
def read_marker() -> int:
    return dep_marker  # noqa: F821 - pushed to the engines


def test_depend_condition_and_function_see_the_engine_namespace(
    rc: Client, lv: LoadBalancedView
) -> None:
    # the condition and the function of a dependent are bound to the engine's user namespace,
    # as a plain @interactive function is
    rc[0].push({"dep_marker": 10}, block=True)
    rc[1].push({"dep_marker": 11}, block=True)
    try:
        there = ipp.depend(has_marker, 11)(read_marker)
        ars = [lv.apply_async(there) for _ in range(4)]
        assert [ar.get(timeout=WAIT) for ar in ars] == [11] * 4
        assert {ar.metadata.engine_id for ar in ars} == {1}
        # a direct view runs it where it is met; elsewhere the task fails with UnmetDependency
        ar = rc.direct_view([0, 1]).apply_async(ipp.dependent(read_marker, has_marker, 10))
        with pytest.raises(ipp.CompositeError) as info:
            ar.get(timeout=WAIT)
        assert [e[0] for e in info.value.elist] == ["UnmetDependency"]
        assert ar.metadata[0]["status"] == "ok" and ar.metadata[1]["status"] == "error"
    finally:
        rc[:].execute("dep_marker = None", block=True)


def test_depend_only_false_is_unmet(lv: LoadBalancedView) -> None:
    # a condition returning None (or any value but False) is met, as in ipyparallel
    f = ipp.depend(echo, None)(double)
    assert lv.apply_sync(f, 4) == 8


def test_require_submodule_binds_the_package_in_the_namespace(rc: Client) -> None:
    @ipp.require("os", "json.decoder")
    @ipp.interactive
    def names() -> tuple[str, str]:
        return (os.sep, json.decoder.__name__)  # noqa: F821 - imported by @require

    assert rc.load_balanced_view().apply_sync(names) == (os.sep, "json.decoder")
    assert rc[0].apply_sync(ipp.interactive(lambda: json.__name__)) == "json"  # noqa: F821


def test_require_unmet_names_the_module(rc: Client) -> None:
    f = ipp.require("ferroparallel_no_such_module_xyz")(echo)
    assert f(3) == 3  # a local call does not check
    with pytest.raises(ipp.RemoteError) as info:
        rc[0].apply_sync(f, 3)
    assert info.value.ename == "UnmetDependency"
    assert "ferroparallel_no_such_module_xyz" in info.value.evalue


# -- map ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, 7, 50])
def test_map_variants(lv: LoadBalancedView, chunksize: int) -> None:
    data = list(range(23))
    expected = [2 * x for x in data]
    amr = lv.map(double, data, chunksize=chunksize)
    assert isinstance(amr, ipp.AsyncMapResult)
    assert amr.get(timeout=WAIT) == expected
    assert lv.map_sync(double, data, chunksize=chunksize) == expected
    amr = lv.map_async(double, data, chunksize=chunksize)
    assert amr.get(timeout=WAIT) == expected
    assert len(amr.msg_ids) == -(-len(data) // chunksize)
    assert list(lv.map_async(pow, data, [2] * 23, chunksize=chunksize)) == [x**2 for x in data]
    lv.block = True
    assert lv.map(double, data, chunksize=chunksize) == expected


def test_map_chunks_carry_reference_functions_and_short_ranges_plainly() -> None:
    """A map chunk sends a function pickled by reference as itself (the engine loads it by
    name) and anything else pickled once; short range parts go as lists of the same items,
    long ones stay ranges (no cluster needed)."""
    import os.path

    from ferroparallel.client import view
    from ferroparallel.serialize import pickling

    assert view._chunk_function(os.path.join) is os.path.join
    square = lambda x: x * x  # noqa: E731
    once = view._chunk_function(square)
    assert type(once) is pickling.Prepickled and once.function is square
    assert view._chunk_function(once) is once
    assert type(view._chunk_function(len)) is pickling.Prepickled  # not a FunctionType
    assert view._chunk_part(range(3, 5)) == [3, 4]
    assert view._chunk_part(range(0, 10**6)) == range(0, 10**6)
    assert view._chunk_part("abc") == "abc"


def test_map_chunksize_zero_is_one_and_negative_is_refused(lv: LoadBalancedView) -> None:
    amr = lv.map_async(double, range(5), chunksize=0)  # accepted, as ipyparallel
    assert amr.get(timeout=WAIT) == [0, 2, 4, 6, 8] and len(amr.msg_ids) == 5
    with pytest.raises(ValueError, match="chunksize"):
        lv.map_async(double, range(5), chunksize=-1)


def test_map_unordered_yields_in_completion_order(lv: LoadBalancedView) -> None:
    delays = [0.8] + [0.0] * 9
    amr = lv.map_async(sleep_echo, range(10), delays, ordered=False)
    seen = list(amr)
    assert sorted(seen) == list(range(10))
    # task 0 (and whatever the scheduler queued behind it on its engine) comes late: the
    # other engine answers several quick tasks first (how many depends on how deep the
    # scheduler queued behind task 0, which depends on timing: at least 3 of its 9)
    assert seen.index(0) >= 3, seen
    assert amr.get(timeout=WAIT) == list(range(10))


def test_map_unordered_with_chunks(lv: LoadBalancedView) -> None:
    delays = [0.6] * 3 + [0.0] * 9
    amr = lv.map_async(sleep_echo, range(12), delays, chunksize=3, ordered=False)
    seen = list(amr)
    assert sorted(seen) == list(range(12))
    assert seen[:3] != [0, 1, 2], seen
    assert amr.get(timeout=WAIT) == list(range(12))


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_return_exceptions(lv: LoadBalancedView, chunksize: int) -> None:
    out = lv.map_async(fail_on_three, range(6), chunksize=chunksize, return_exceptions=True).get(
        timeout=WAIT
    )
    assert len(out) == 6
    assert isinstance(out[3], ipp.RemoteError) and out[3].ename == "ValueError"
    for i in (0, 1, 4, 5):
        assert out[i] == i
    out = lv.map_sync(fail_on_three, range(6), chunksize=chunksize, return_exceptions=True)
    assert isinstance(out[3], ipp.RemoteError)
    with pytest.raises(ipp.CompositeError) as info:
        lv.map_sync(fail_on_three, range(6), chunksize=chunksize)
    assert [entry[0] for entry in info.value.elist] == ["ValueError"]


def fail_on_137(x: int) -> int:
    if x == 137:
        raise ValueError("137")
    return -x


def test_map_chunks_of_100_keep_order_errors_and_return_exceptions(lv: LoadBalancedView) -> None:
    """Chunks of 100 (what the throughput benchmark maps): results joined in order, iterated
    unordered, a failed chunk's exception once per element with return_exceptions, and
    otherwise one CompositeError naming it."""
    n = 250  # chunks of 100, 100 and 50
    amr = lv.map_async(double, range(n), chunksize=100)
    assert len(amr.msg_ids) == 3
    assert amr.get(timeout=WAIT) == [2 * x for x in range(n)]
    unordered = lv.map_async(double, range(n), chunksize=100, ordered=False)
    assert sorted(unordered) == [2 * x for x in range(n)]
    out = lv.map_async(fail_on_137, range(n), chunksize=100, return_exceptions=True).get(
        timeout=WAIT
    )
    assert len(out) == n
    assert out[:100] == [-x for x in range(100)] and out[200:] == [-x for x in range(200, n)]
    failed = out[100:200]
    assert all(e is failed[0] for e in failed)
    assert isinstance(failed[0], ipp.RemoteError) and failed[0].evalue == "137"
    with pytest.raises(ipp.CompositeError) as info:
        lv.map_sync(fail_on_137, range(n), chunksize=100)
    assert [(e[0], e[1]) for e in info.value.elist] == [("ValueError", "137")]


@pytest.mark.parametrize("chunksize", [1, 7])
def test_map_chunks_packed_or_not_give_the_same_results_and_bookkeeping(
    rc: Client, lv: LoadBalancedView, chunksize: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps over plain data (ranges, lists of atoms: each chunk packed without scanning it)
    and over other data (bytes, containers: each chunk scanned as any call) give the builtin
    map's results, and the client keeps the same books for both: every chunk in ``history``
    in order, nothing ``outstanding`` once done, the results (owned by the AsyncMapResult)
    gone from ``rc.results`` and ``rc.metadata``, the map's metadata and progress whole."""
    n = 400
    cases: list[tuple[Callable[..., Any], list[Any]]] = [
        (echo, [range(n)]),
        (pow, [list(range(n)), [2] * n]),
        (sleep_echo, [tuple(f"s{i}" for i in range(n)), [0.0] * n]),
        (echo, [[b"x%d" % i for i in range(n)]]),
        (echo, [[{"k": i, "v": [i, None]} for i in range(n)]]),
    ]
    packed: list[int] = []
    send_packed = rc._send_packed_task

    def counted(*args: Any) -> Any:
        packed.append(1)
        return send_packed(*args)

    monkeypatch.setattr(rc, "_send_packed_task", counted)
    for k, (f, seqs) in enumerate(cases):
        local = (lambda x, d: x) if f is sleep_echo else (lambda *a: a[0]) if f is echo else f
        packed.clear()
        amr = lv.map_async(f, *seqs, chunksize=chunksize)
        chunks = -(-n // chunksize)
        assert len(packed) == (chunks if k < 3 else 0), (k, len(packed))
        assert len(amr.msg_ids) == chunks and rc.history[-chunks:] == amr.msg_ids
        assert amr.get(timeout=WAIT) == list(map(local, *seqs))
        assert amr.progress == len(amr) == n
        ids = set(amr.msg_ids)
        assert _wait_until(lambda ids=ids: not ids & set(rc.results), WAIT)
        assert not ids & rc.outstanding and not ids & set(rc.metadata)
        mds = amr.metadata
        assert len(mds) == chunks
        assert all(md["status"] == "ok" and md["engine_id"] in rc.ids for md in mds)
        assert [md["msg_id"] for md in mds] == amr.msg_ids


def test_map_results_are_consumed_while_it_runs(lv: LoadBalancedView) -> None:
    amr = lv.map_async(sleep_echo, range(8), [0.25] * 8)
    got: list[int] = []
    ready_at_first: bool | None = None
    for x in amr:
        if ready_at_first is None:
            ready_at_first = amr.ready()
        got.append(x)
    assert got == list(range(8))
    assert ready_at_first is False, "the first result only came once the whole map was done"
    assert amr.ready()


# -- imap -----------------------------------------------------------------------------------------


def test_imap_is_lazy_and_bounded(lv: LoadBalancedView) -> None:
    consumed = 0

    def inputs() -> Iterator[int]:
        nonlocal consumed
        for i in range(30):
            consumed += 1
            yield i

    def in_flight() -> int:
        return sum(not ar.done() for ar in it._pending)

    # as ipyparallel: it starts at once, and keeps at most max_outstanding tasks in flight
    it = lv.imap(sleep_echo, inputs(), itertools.repeat(0.05), max_outstanding=2)
    wait_until(lambda: consumed >= 4, what="the imap to work before it is iterated")
    results = []
    for r in it:
        assert in_flight() <= 2, "more than max_outstanding tasks in flight"
        assert consumed <= 30
        results.append(r)
    assert results == list(range(30))
    assert consumed == 30
    # the default ('auto'): one task per engine in flight
    consumed = 0
    it = lv.imap(sleep_echo, inputs(), itertools.repeat(0.05))
    assert next(it) == 0
    assert in_flight() <= len(lv.client.ids)
    assert list(it) == list(range(1, 30))
    # 0: no limit, the whole input is submitted at once
    consumed = 0
    it = lv.imap(sleep_echo, inputs(), itertools.repeat(0.05), max_outstanding=0)
    wait_until(lambda: consumed == 30, what="the whole input submitted")
    assert list(it) == list(range(30))


def test_imap_one_outstanding_runs_tasks_one_at_a_time(lv: LoadBalancedView) -> None:
    spans = list(lv.imap(span, [0.1] * 6, max_outstanding=1))
    assert len(spans) == 6
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.01, "two tasks overlapped with max_outstanding=1"


def test_imap_takes_an_infinite_generator(lv: LoadBalancedView) -> None:
    it = lv.imap(double, itertools.count(), max_outstanding=4)
    assert list(itertools.islice(it, 10)) == [2 * i for i in range(10)]


def test_imap_unordered(lv: LoadBalancedView) -> None:
    delays = [0.6] + [0.0] * 7
    seen = list(lv.imap(sleep_echo, range(8), delays, ordered=False, max_outstanding=4))
    assert sorted(seen) == list(range(8))
    assert seen[0] != 0


def test_imap_cancel_stops_submitting_and_aborts_the_queued(lv: LoadBalancedView) -> None:
    consumed = 0

    def inputs() -> Iterator[float]:
        nonlocal consumed
        while True:
            consumed += 1
            yield 0.3

    it = lv.imap(span, inputs(), max_outstanding=4)
    assert iter(it) is it
    first = next(it)
    assert {ar._fname for ar in it._pending} == {"span"}  # the function's name, not a wrapper's
    assert first[1] >= first[0]
    it.cancel()
    before = consumed
    assert list(it) == []
    time.sleep(0.5)
    assert consumed == before, "inputs consumed after cancel()"
    assert lv.client.wait(timeout=30), "the aborted or running tasks never finished"


def test_an_abandoned_imap_stops_submitting(lv: LoadBalancedView) -> None:
    consumed = 0

    def inputs() -> Iterator[int]:
        nonlocal consumed
        while True:
            consumed += 1
            yield consumed

    it = lv.imap(double, inputs(), max_outstanding=2)
    assert next(it) == 2
    del it
    gc.collect()
    time.sleep(0.3)
    settled = consumed
    time.sleep(0.5)
    assert consumed == settled, "an abandoned imap kept consuming its input"
    assert lv.client.wait(timeout=30)


def test_imap_input_errors_reach_the_consumer(lv: LoadBalancedView) -> None:
    def inputs() -> Iterator[int]:
        yield 1
        raise RuntimeError("the input broke")

    it = lv.imap(double, inputs())
    assert next(it) == 2
    with pytest.raises(RuntimeError, match="the input broke"):
        next(it)
    assert list(it) == []


def test_imap_raises_the_first_error(lv: LoadBalancedView) -> None:
    it = lv.imap(fail_on_three, range(6), max_outstanding=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ipp.RemoteError):
        next(it)


def test_imap_return_exceptions(lv: LoadBalancedView) -> None:
    out = list(lv.imap(fail_on_three, range(6), return_exceptions=True))
    assert isinstance(out[3], ipp.RemoteError)
    assert [out[i] for i in (0, 1, 2, 4, 5)] == [0, 1, 2, 4, 5]


# -- flags ----------------------------------------------------------------------------------------


def test_set_flags(rc: Client, lv: LoadBalancedView) -> None:
    assert lv.timeout == 0.0  # as ipyparallel: 0 is no limit
    assert lv.set_flags(block=True, retries=2, timeout=5, targets=[1]) is lv  # chainable
    assert (lv.block, lv.retries, lv.timeout, lv.targets) == (True, 2, 5.0, [1])
    assert isinstance(lv.timeout, float)
    assert lv.apply(echo, 9) == 9
    ar = lv.apply_async(engine_pid)
    ar.get(timeout=WAIT)
    assert ar.metadata.engine_id == 1
    lv.set_flags(block=False, retries=0, timeout=None, targets=None)
    assert lv.timeout == 0.0  # None is accepted as "no limit"
    assert isinstance(lv.apply(echo, 1), ipp.AsyncResult)
    with pytest.raises(KeyError):
        lv.set_flags(no_such_flag=1)
    with pytest.raises(KeyError):
        rc.load_balanced_view(no_such_flag=1)
    flagged = rc.load_balanced_view(block=True, retries=1)
    assert flagged.block is True and flagged.retries == 1


def test_temp_flags_restore(lv: LoadBalancedView) -> None:
    a = lv.apply_async(echo, 1)
    with lv.temp_flags(block=True, after=[a], follow=[a], retries=3, timeout=9.0, targets=0):
        assert (lv.block, lv.after, lv.follow) == (True, [a], [a])
        assert (lv.retries, lv.timeout, lv.targets) == (3, 9.0, 0)
    with lv.temp_flags(block=True, after=[a], timeout=9.0):
        assert lv.apply(echo, "in") == "in"
    assert (lv.block, lv.after, lv.follow, lv.retries, lv.timeout, lv.targets) == (
        False,
        None,
        None,
        0,
        0.0,
        None,
    )
    with pytest.raises(ZeroDivisionError), lv.temp_flags(block=True, retries=5):
        raise ZeroDivisionError
    assert lv.block is False and lv.retries == 0


# -- remote / parallel decorators -----------------------------------------------------------------


def test_remote_decorator(lv: LoadBalancedView, pids: dict[int, int]) -> None:
    @lv.remote(block=True)
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert add(1) == 2
    assert add(1, b=5) == 6

    @lv.remote(block=False)
    def later(x: int) -> int:
        return x * 3

    ar = later(4)
    assert isinstance(ar, ipp.AsyncResult)
    assert ar.get(timeout=WAIT) == 12

    @lv.remote(block=True, targets=1)
    def where() -> int:
        import os

        return os.getpid()

    assert {where() for _ in range(4)} == {pids[1]}
    assert lv.targets is None and lv.block is False


def test_parallel_decorator(lv: LoadBalancedView) -> None:
    @lv.parallel(block=True)
    def squares(xs: list[int]) -> list[int]:
        return [x * x for x in xs]

    assert squares(range(10)) == [x * x for x in range(10)]

    @lv.parallel(block=True, chunksize=3)
    def sizes(xs: list[int]) -> list[int]:
        return [len(xs)]

    assert sizes(list(range(10))) == [3, 3, 3, 1]

    @lv.parallel(block=True)
    def one_each(xs: list[int]) -> list[int]:
        return [len(xs)]

    # as ipyparallel: without a chunksize, one task per element
    assert one_each(range(6)) == [1] * 6

    @lv.parallel(block=False)
    def incr(x: int) -> int:
        return x + 1

    amr = incr.map(range(5))
    assert amr.get(timeout=WAIT) == [1, 2, 3, 4, 5]

    @lv.parallel(block=False)
    def echo_part(xs: range) -> range:
        return xs

    # iterating gives what get() gives: a part that is not joined (a range) is one element
    amr = echo_part(range(3))
    assert list(amr) == amr.get(timeout=WAIT) == [range(0, 1), range(1, 2), range(2, 3)]


def test_decorators_keep_the_block_flag_the_view_had(lv: LoadBalancedView) -> None:
    # as ipyparallel: without block=..., @remote/@parallel read the view's flag when they
    # decorate; changing the view's flag later does not change the decorated function
    lv.block = False

    @lv.remote()
    def later(x: int) -> int:
        return x + 1

    @lv.parallel()
    def part(xs: list[int]) -> list[int]:
        return xs

    assert later.block is False and part.block is False
    lv.block = True
    try:
        ar = later(1)
        assert isinstance(ar, ipp.AsyncResult) and ar.get(timeout=WAIT) == 2
        amr = part([0, 1, 2])
        assert isinstance(amr, ipp.AsyncMapResult) and amr.get(timeout=WAIT) == [0, 1, 2]

        @lv.remote()
        def now(x: int) -> int:
            return x + 1

        assert now.block is True and now(1) == 2
    finally:
        lv.block = False


# -- wait / abort ---------------------------------------------------------------------------------


def test_view_wait(lv: LoadBalancedView) -> None:
    ars = [lv.apply_async(sleep_echo, i, 0.4) for i in range(3)]
    assert lv.wait(ars, timeout=0.05) is False
    assert lv.wait(ars, timeout=WAIT) is True
    assert all(ar.ready() for ar in ars)
    more = [lv.apply_async(sleep_echo, i, 0.3) for i in range(2)]
    assert lv.wait(timeout=0.01) is False  # default: everything outstanding
    assert lv.wait(timeout=WAIT) is True
    assert all(ar.ready() for ar in more)


def _wait_all_arrived(rc: Client, unassigned: int) -> None:
    """Wait until both engines hold 1 task (the default HWM, before the engines proved their
    tasks short) and ``unassigned`` wait in the scheduler."""
    wait_until(
        lambda: (
            (q := rc.queue_status())["unassigned"] == unassigned
            and q[0]["tasks"] == 1
            and q[1]["tasks"] == 1
        ),
        what=f"1 task on each engine and {unassigned} in the scheduler",
    )


def test_abort_queued_tasks(rc: Client, lv: LoadBalancedView, gate: Gate) -> None:
    blockers = [lv.apply_async(gated, "blocker", gate.path) for _ in range(2)]
    queued = [lv.apply_async(echo, i) for i in range(6)]
    # with the default HWM (1) the queued tasks wait in the scheduler
    _wait_all_arrived(rc, 6)
    lv.abort(queued, block=True)
    gate.open()
    for ar in queued:
        with pytest.raises(error.TaskAborted):
            ar.get(timeout=WAIT)
        assert ar.ready()
    assert [b.get(timeout=WAIT) for b in blockers] == ["blocker", "blocker"]
    # the engines are still fine
    assert lv.map_sync(double, range(4)) == [0, 2, 4, 6]


def test_abort_a_task_waiting_for_a_dependency(
    rc: Client, lv: LoadBalancedView, gate: Gate
) -> None:
    blocker = lv.apply_async(gated, "blocker", gate.path)
    with lv.temp_flags(after=blocker):
        waiting = lv.apply_async(echo, "never")
    wait_until(
        lambda: rc.queue_status()["unassigned"] == 1, what="the task to wait in the scheduler"
    )
    lv.abort([waiting], block=True)
    with pytest.raises(error.TaskAborted):
        waiting.get(timeout=WAIT)
    assert not blocker.ready()
    gate.open()
    assert blocker.get(timeout=WAIT) == "blocker"


def test_abort_right_after_submission(rc: Client, lv: LoadBalancedView, gate: Gate) -> None:
    blocker = lv.apply_async(gated, "blocker", gate.path)
    wait_until(lambda: rc.queue_status()["unassigned"] == 0, what="the blocker to be assigned")
    # a large submission takes a while to arrive; the small abort request overtakes it
    with lv.temp_flags(after=blocker):
        waiting = lv.apply_async(len, b"x" * 50_000_000)
    lv.abort([waiting], block=True)
    try:
        with pytest.raises(error.TaskAborted):
            waiting.get(timeout=3)
    finally:
        gate.open()
    assert blocker.get(timeout=WAIT) == "blocker"


def test_abort_takes_a_single_asyncresult(rc: Client, lv: LoadBalancedView, gate: Gate) -> None:
    blockers = [lv.apply_async(gated, "blocker", gate.path) for _ in range(2)]
    queued = [lv.apply_async(echo, i) for i in range(6)]
    _wait_all_arrived(rc, 6)
    lv.abort(queued[-1], block=True)
    gate.open()
    with pytest.raises(error.TaskAborted):
        queued[-1].get(timeout=WAIT)
    assert [ar.get(timeout=WAIT) for ar in queued[:-1]] == list(range(5))
    assert [b.get(timeout=WAIT) for b in blockers] == ["blocker"] * 2


def test_abort_takes_a_map_result(rc: Client, lv: LoadBalancedView, gate: Gate) -> None:
    blockers = [lv.apply_async(gated, "blocker", gate.path) for _ in range(2)]
    amr = lv.map_async(echo, range(6))
    _wait_all_arrived(rc, 6)
    lv.abort(amr, block=True)  # answered while the blockers still hold both engines
    assert not any(b.ready() for b in blockers), "abort waited for the engines"
    gate.open()
    out = amr.get(timeout=WAIT, return_exceptions=True)
    assert all(isinstance(x, error.TaskAborted) for x in out), out
    assert [b.get(timeout=WAIT) for b in blockers] == ["blocker"] * 2


# -- executors ------------------------------------------------------------------------------------


def test_view_executor(lv: LoadBalancedView) -> None:
    ex = lv.executor
    assert isinstance(ex, concurrent.futures.Executor)
    fut = ex.submit(pow, 2, 10)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=WAIT) == 1024
    futs = [ex.submit(sleep_echo, i, 0.05) for i in range(6)]
    done, not_done = concurrent.futures.wait(futs, timeout=WAIT)
    assert not not_done and {f.result() for f in done} == set(range(6))
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=WAIT)) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    assert list(ex.map(pow, [1, 2, 3], [2, 2, 2])) == [1, 4, 9]
    assert list(ex.map(double, range(20), chunksize=4)) == [2 * x for x in range(20)]
    with pytest.raises(ipp.RemoteError):
        ex.submit(fail).result(timeout=WAIT)
    # as concurrent.futures: a failed call raises its own error in its turn, and the timeout
    # counts from the map call
    got = []
    with pytest.raises(ipp.RemoteError) as e:
        for x in ex.map(fail_on_three, range(6)):
            got.append(x)
    assert got == [0, 1, 2] and not isinstance(e.value, ipp.CompositeError)
    with pytest.raises(TimeoutError):
        list(ex.map(sleep_echo, [1, 2], [0.0, 2.0], timeout=0.5))
    # one executor per view; shutdown(wait=True) waits for the view's outstanding tasks
    assert lv.executor is ex
    slow = ex.submit(sleep_echo, "slow", 0.5)
    other = lv.apply_async(sleep_echo, "other", 0.5)
    ex.shutdown(wait=True)
    assert slow.done() and other.done()
    assert ex.submit(double, 2).result(timeout=WAIT) == 4  # (still usable, as ipyparallel's)


def test_client_executor(rc: Client, pids: dict[int, int]) -> None:
    with rc.executor() as ex:
        assert ex.submit(double, 8).result(timeout=WAIT) == 16
        assert list(ex.map(double, range(5))) == [0, 2, 4, 6, 8]
        slow = ex.submit(sleep_echo, "slow", 0.3)
    # shutdown(wait=True) waited for the work and left the engines running
    assert slow.done() and slow.result() == "slow"
    assert rc.ids == [0, 1]
    pinned = rc.executor(targets=[1])
    assert {pinned.submit(engine_pid).result(timeout=WAIT) for _ in range(4)} == {pids[1]}


# -- joblib ---------------------------------------------------------------------------------------


def _joblib() -> Any:
    return pytest.importorskip("joblib")


def test_joblib_backend(lv: LoadBalancedView, pids: dict[int, int]) -> None:
    joblib = _joblib()
    lv.register_joblib_backend("ferroparallel-test")
    with joblib.parallel_config(backend="ferroparallel-test"):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(pow)(i, 2) for i in range(12))
        where = joblib.Parallel(n_jobs=2)(joblib.delayed(engine_pid)() for _ in range(8))
    assert out == [i * i for i in range(12)]
    assert set(where) <= set(pids.values())


def test_joblib_backend_default_name(lv: LoadBalancedView) -> None:
    joblib = _joblib()
    lv.register_joblib_backend()
    with joblib.parallel_config(backend="ipyparallel"):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(pow)(i, 3) for i in range(5))
    assert out == [i**3 for i in range(5)]


# -- many tasks -----------------------------------------------------------------------------------


def test_100k_tasks_through_map(lv: LoadBalancedView) -> None:
    n = 100_000
    out = lv.map_async(noop, range(n), chunksize=1000).get(timeout=120)
    assert out == list(range(n))
    out = lv.map_sync(double, range(n), chunksize=5000)
    assert out == [2 * x for x in range(n)]


#: 100,000 single apply_async calls take ~3 minutes on a loaded 2-core machine (about 1.8 ms
#: per submission there), so this test sends 20,000, in batches.
APPLY_ASYNC_TASKS = 20_000
APPLY_ASYNC_BATCH = 5_000


def test_many_apply_async_in_batches(lv: LoadBalancedView) -> None:
    results: list[int] = []
    for start in range(0, APPLY_ASYNC_TASKS, APPLY_ASYNC_BATCH):
        ars = [lv.apply_async(noop, i) for i in range(start, start + APPLY_ASYNC_BATCH)]
        assert lv.wait(ars, timeout=120)
        results.extend(ar.get(timeout=WAIT) for ar in ars)
    assert results == list(range(APPLY_ASYNC_TASKS))


# -- schemes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme(make_cluster: Callable[..., tuple[Cluster, Client]], scheme: str) -> None:
    cluster, rc = make_cluster(2, "--scheme", scheme)
    assert json.loads(Path(cluster.client_file).read_text())["task_scheme"] == scheme
    lv = rc.load_balanced_view()
    # slow tasks: both engines are used, at the same time
    ars = [lv.apply_async(span, 0.3) for _ in range(6)]
    spans = [ar.get(timeout=WAIT) for ar in ars]
    engines = [ar.metadata.engine_id for ar in ars]
    assert set(engines) == {0, 1}, engines
    assert any(
        engines[i] != engines[j] and spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]
        for i in range(6)
        for j in range(i + 1, 6)
    ), "no two tasks ran concurrently on different engines"
    # quick tasks one after the other
    seq = []
    for i in range(20):
        ar = lv.apply_async(echo, i)
        assert ar.get(timeout=WAIT) == i
        seq.append(ar.metadata.engine_id)
    assert set(seq) == {0, 1}, seq
    if scheme in ("lru", "leastload"):
        # equal loads: the least recently used engine is chosen, so the engines alternate
        assert all(a != b for a, b in itertools.pairwise(seq)), seq
    assert lv.map_sync(double, range(40), chunksize=3) == [2 * x for x in range(40)]


# -- HWM ------------------------------------------------------------------------------------------


def test_hwm_1_holds_tasks_in_the_scheduler(
    make_cluster: Callable[..., tuple[Cluster, Client]], gate: Gate
) -> None:
    _, rc = make_cluster(2, "--hwm", "1")
    lv = rc.load_balanced_view()
    blockers = [lv.apply_async(gated, "blocker", gate.path) for _ in range(2)]
    queued = [lv.apply_async(echo, i) for i in range(3)]
    status = wait_until(
        lambda: (q := rc.queue_status())["unassigned"] == 3 and q,
        what="3 unassigned tasks",
    )
    assert status[0]["tasks"] == 1 and status[1]["tasks"] == 1, status
    assert lv.queue_status()["unassigned"] == 3
    with lv.temp_flags(timeout=0.3):
        timed = lv.apply_async(echo, "never")
    e = expect_remote(timed, error.TaskTimeout, "TaskTimeout")
    assert isinstance(e, error.DependencyTimeout)
    assert not any(ar.ready() for ar in queued)
    gate.open()
    assert [ar.get(timeout=WAIT) for ar in queued] == [0, 1, 2]
    assert [ar.get(timeout=WAIT) for ar in blockers] == ["blocker"] * 2
    # one task at a time per engine: none started before the blocker on its engine ended
    ended = {b.metadata.engine_id: b.metadata.completed for b in blockers}
    for ar in queued:
        assert ar.metadata.started >= ended[ar.metadata.engine_id]
    assert rc.queue_status()["unassigned"] == 0


def test_default_hwm_keeps_short_tasks_off_a_busy_engine(lv: LoadBalancedView, gate: Gate) -> None:
    """With the default settings a task never waits behind a long one while another engine
    is free (as ipyparallel's HWM 1), and a task that cannot start in time fails with
    TaskTimeout instead of being queued on a busy engine."""
    blocker = lv.apply_async(gated, "blocker", gate.path)
    shorts = [lv.apply_async(sleep_echo, i, 0.05) for i in range(6)]
    try:
        assert [ar.get(timeout=WAIT) for ar in shorts] == list(range(6))
        assert not blocker.ready(), outcome(blocker)
        busy = blocker.engine_id
        assert busy is not None and all(ar.engine_id != busy for ar in shorts)
        with lv.temp_flags(timeout=0.3, targets=[busy]):
            timed = lv.apply_async(echo, "never")
        expect_remote(timed, error.TaskTimeout, "TaskTimeout")
    finally:
        gate.open()
    assert blocker.get(timeout=WAIT) == "blocker"


def test_hwm_0_sends_everything_to_the_engines(
    make_cluster: Callable[..., tuple[Cluster, Client]], gate: Gate
) -> None:
    _, rc = make_cluster(2, "--hwm", "0")
    lv = rc.load_balanced_view()
    blockers = [lv.apply_async(gated, "blocker", gate.path) for _ in range(2)]
    queued = [lv.apply_async(echo, i) for i in range(6)]
    with lv.temp_flags(timeout=0.2):
        timed = lv.apply_async(echo, "ran anyway")
    status = wait_until(
        lambda: (
            (q := rc.queue_status())["unassigned"] == 0 and q[0]["tasks"] + q[1]["tasks"] == 9 and q
        ),
        what="all 9 tasks assigned to engines",
    )
    assert status[0]["tasks"] >= 2 and status[1]["tasks"] >= 2, status
    # assigned at once, so the timeout (which only covers waiting in the scheduler) never fires
    time.sleep(0.5)
    assert not timed.ready()
    gate.open()
    assert timed.get(timeout=WAIT) == "ran anyway"
    assert [ar.get(timeout=WAIT) for ar in queued] == list(range(6))
    assert [ar.get(timeout=WAIT) for ar in blockers] == ["blocker"] * 2


# -- engines dying and joining --------------------------------------------------------------------


def _kill_busy_engine(
    rc: Client, lv: LoadBalancedView, gate: Gate, n_tasks: int
) -> tuple[list[Any], set[str]]:
    """Submit gated tasks; SIGKILL engine 0 while it has one running and one queued (and the
    scheduler holds more); wait until it is gone; open the gate.

    Returns the AsyncResults and the msg_ids engine 0 held.
    """
    pid = rc[0].apply_sync(os.getpid)  # (the cluster runs with --hwm 2)
    ars = [lv.apply_async(gated, i, gate.path) for i in range(n_tasks)]
    status = wait_until(
        lambda: (
            (q := rc.queue_status(verbose=True))
            and len(q[0]["tasks"]) == 2
            and len(q[1]["tasks"]) == 2
            and len(q["unassigned"]) == n_tasks - 4
            and q
        ),
        what="two tasks on each engine and the rest waiting in the scheduler",
    )
    held = set(status[0]["tasks"])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: rc.ids == [1], what="the killed engine to unregister")
    gate.open()
    return ars, held


def test_dead_engine_tasks_are_retried(
    make_cluster: Callable[..., tuple[Cluster, Client]], gate: Gate
) -> None:
    _, rc = make_cluster(2, "--hwm", "2")  # a queued task on the engine that dies, too
    lv = rc.load_balanced_view(retries=2)
    ars, held = _kill_busy_engine(rc, lv, gate, 8)
    assert [ar.get(timeout=WAIT) for ar in ars] == list(range(8))
    assert {ar.metadata.engine_id for ar in ars} == {1}
    assert {ar.msg_ids[0] for ar in ars} >= held


def test_dead_engine_tasks_fail_without_retries(
    make_cluster: Callable[..., tuple[Cluster, Client]], gate: Gate
) -> None:
    _, rc = make_cluster(2, "--hwm", "2")
    lv = rc.load_balanced_view()
    ars, held = _kill_busy_engine(rc, lv, gate, 8)
    failed = set()
    for i, ar in enumerate(ars):
        res = outcome(ar)
        if ar.msg_ids[0] in held:
            assert isinstance(res, error.EngineError), repr(res)
            assert isinstance(res, ipp.RemoteError) and res.ename == "EngineError"
            failed.add(ar.msg_ids[0])
        else:
            assert res == i
            assert ar.metadata.engine_id == 1
    assert failed == held
    # the survivor still works
    assert lv.map_sync(double, range(6)) == [0, 2, 4, 6, 8, 10]


def test_new_engines_take_queued_tasks(
    make_cluster: Callable[..., tuple[Cluster, Client]], gate: Gate
) -> None:
    cluster, rc = make_cluster(1)
    lv = rc.load_balanced_view()
    ars = [lv.apply_async(gated, i, gate.path) for i in range(10)]
    wait_until(lambda: rc.queue_status()["unassigned"] == 9, what="9 tasks waiting")
    cluster.start_engines_sync(1)
    rc.wait_for_engines(2, timeout=60)
    new_id = max(rc.ids)
    # the new engine gets a waiting task as soon as it registers, before anything finished
    status = wait_until(
        lambda: (q := rc.queue_status())[new_id]["tasks"] == 1 and q,
        what="the new engine to be given tasks",
    )
    assert status["unassigned"] == 8
    gate.open()
    assert [ar.get(timeout=WAIT) for ar in ars] == list(range(10))
    on_new = [ar for ar in ars if ar.metadata.engine_id == new_id]
    assert on_new, [ar.metadata.engine_id for ar in ars]


def test_flag_changes_reach_the_next_task(lv: LoadBalancedView, pids: dict[int, int]) -> None:
    """Task metadata is reused between calls while the flags stay the same: every change of
    a flag must still show in the next task."""
    assert lv.apply_async(engine_pid).get(timeout=WAIT) in pids.values()
    lv.label = "first"
    ar = lv.apply_async(engine_pid)
    ar.get(timeout=WAIT)
    assert ar.metadata["label"] == "first"
    lv.set_flags(label=None, targets=[1])
    assert {lv.apply_async(engine_pid).get(timeout=WAIT) for _ in range(4)} == {pids[1]}
    lv.targets = None
    with lv.temp_flags(targets=[0], label="temp"):
        ar = lv.apply_async(engine_pid)
        assert ar.get(timeout=WAIT) == pids[0]
        assert ar.metadata["label"] == "temp"
    ar = lv.apply_async(engine_pid)
    ar.get(timeout=WAIT)
    assert not ar.metadata["label"]
    slow = lv.apply_async(time.sleep, 0.3)
    lv.after = [slow]
    after = lv.apply_async(time.time)
    started_after = after.get(timeout=WAIT)
    slow.get(timeout=WAIT)
    assert started_after >= slow.metadata["completed"].timestamp() - 0.05
    lv.after = None
    assert lv._task_metadata()["after"] == []
    lv.timeout, lv.retries = 2.5, 3
    md = lv._task_metadata()
    assert (md["timeout"], md["retries"]) == (2.5, 3)
    md["retries"] = 99  # a caller's change to its copy stays there
    assert lv._task_metadata()["retries"] == 3


def test_flags_are_validated_when_set(lv: LoadBalancedView) -> None:
    """As ipyparallel's set_flags: a malformed dependency is a ValueError, a timeout of the
    wrong type a TypeError and a negative one a ValueError; nothing is changed by them."""
    for bad in (5, 1.5, object(), [1, 2], {"dependencies": ["a"]}):
        with pytest.raises(ValueError, match="Invalid dependency"):
            lv.set_flags(after=bad)
        with pytest.raises(ValueError, match="Invalid dependency"):
            lv.set_flags(follow=bad)
    with pytest.raises(TypeError, match="timeout"):
        lv.set_flags(timeout="10")
    with pytest.raises(ValueError, match="timeout"):
        lv.set_flags(timeout=-1)
    assert lv.after is None and lv.follow is None and lv.timeout == 0.0
    done = lv.apply_async(lambda: 1)
    good = ["m1", done, ipp.Dependency(["m2"]), ipp.Dependency(["m3"]).as_dict(), ("m4", "m5")]
    for dep in good:
        with lv.temp_flags(after=dep, timeout=2.5):
            assert lv.after is dep and lv.timeout == 2.5
    assert lv.after is None and lv.timeout == 0.0
    assert done.get(timeout=30) == 1
    for call in (
        lambda: lv.map_async(abs, [1], block=True),
        lambda: lv.map_sync(abs, [1], block=False),
    ):
        with pytest.raises(TypeError, match="block"):
            call()
