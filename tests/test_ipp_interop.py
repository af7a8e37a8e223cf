"""A real ``ipyparallel.Client`` on a ferroparallel cluster: apply, push/pull, scatter/gather,
map and remote errors, in ipyparallel's own serialization (engine side:
``ferroparallel.serialize.ipp_compat``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster_util import assert_results_from_the_hub
from ferroparallel.cluster import Cluster
from ferroparallel.engine.execute import run_apply
from ferroparallel.engine.signals import InterruptGate
from ferroparallel.serialize import ipp_compat, load_object, pack_apply_message

ipp = pytest.importorskip("ipyparallel")
from ipyparallel import serialize as ipp_serialize  # noqa: E402

pytest_plugins = ("cluster_fixtures",)

N_ENGINES = 2
#: Upper bound for anything that should take well under a second on an idle machine.
SHORT = 30.0


def connect_ipp(cluster: Cluster, **kwargs: Any) -> Any:
    """An ``ipyparallel.Client`` on ``cluster`` (from its client connection file)."""
    kwargs.setdefault("timeout", SHORT)
    rc = ipp.Client(str(cluster.client_file), **kwargs)
    try:
        rc.wait_for_engines(N_ENGINES, timeout=SHORT)
    except BaseException:
        rc.close()
        raise
    return rc


@pytest.fixture(scope="module")
def ipp_cluster(fp_session_root: Path) -> Iterator[Cluster]:
    """A ferroparallel cluster of 2 engines for this module."""
    # imported here, once pytest has loaded (and assertion-rewritten) the plugin
    from cluster_fixtures import CONTROLLER_ARGS, _kill, _start

    cluster = Cluster(n=N_ENGINES, controller_args=CONTROLLER_ARGS, cluster_id="ippcompat")
    _start(cluster, N_ENGINES).close()
    try:
        yield cluster
    finally:
        _kill(cluster)


@pytest.fixture(scope="module")
def _module_rc(ipp_cluster: Cluster) -> Iterator[Any]:
    rc = connect_ipp(ipp_cluster)
    try:
        yield rc
    finally:
        rc.close()


@pytest.fixture
def rc(_module_rc: Any) -> Iterator[Any]:
    """The module's ipyparallel client; engine namespaces are cleared after each test."""
    yield _module_rc
    assert _module_rc.wait(timeout=SHORT), f"outstanding: {_module_rc.outstanding}"
    _module_rc.clear(block=True)


@pytest.fixture
def dv(rc: Any) -> Any:
    """An ipyparallel DirectView on all engines."""
    return rc[:]


# -- apply --------------------------------------------------------------------------------


def test_apply_interactive_lambda(dv: Any) -> None:
    assert dv.apply_sync(ipp.interactive(lambda x, y=1: x * 2 + y), 20, y=2) == [42, 42]


def test_apply_module_functions(dv: Any) -> None:
    # a pure-Python stdlib function (canned by ipyparallel) and a builtin
    assert dv.apply_sync(textwrap.dedent, "  a\n  b") == ["a\nb", "a\nb"]
    assert dv.apply_sync(divmod, 7, 2) == [(3, 1), (3, 1)]
    pids = dv.apply_sync(os.getpid)
    assert len(set(pids)) == N_ENGINES and os.getpid() not in pids


def test_apply_plain_lambda_with_cloudpickle(dv: Any) -> None:
    offset = 5
    try:
        dv.use_cloudpickle().get(timeout=SHORT)
        assert dv.apply_sync(lambda x: x + offset, 1) == [6, 6]
    finally:
        dv.use_pickle().get(timeout=SHORT)


def test_interactive_function_reads_pushed_global(dv: Any) -> None:
    dv.push({"scale": 7}, block=True)

    @ipp.interactive
    def scaled(x: int) -> int:
        return x * scale  # type: ignore[name-defined]  # noqa: F821 - engine global

    assert dv.apply_sync(scaled, 3) == [21, 21]


def test_reference_argument(dv: Any) -> None:
    dv["base"] = 10
    assert dv.apply_sync(ipp.interactive(lambda x: x + 1), ipp.Reference("base")) == [11, 11]


# -- push / pull / scatter / gather / execute ----------------------------------------------


def test_push_pull_int_and_array(dv: Any) -> None:
    arr = np.arange(60_000, dtype=np.int32).reshape(200, 300)  # out-of-band frames
    dv.push({"n": 41, "arr": arr}, block=True)
    assert dv.pull("n", block=True) == [41, 41]
    for n, got in dv.pull(("n", "arr"), block=True):
        assert n == 41
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr)


def test_pushed_array_is_a_view_over_the_received_frame(dv: Any) -> None:
    dv.push({"arr": np.ones((100, 100))}, block=True)

    @ipp.interactive
    def describe() -> tuple[bool, bool, list[str]]:
        chain, obj = [], arr  # type: ignore[name-defined]  # noqa: F821 - engine global
        while obj is not None:
            chain.append(type(obj).__name__)
            obj = getattr(obj, "base", None) if not isinstance(obj, memoryview) else obj.obj
        return arr.flags.writeable, arr.flags.owndata, chain  # type: ignore[name-defined]  # noqa: F821

    for writeable, owndata, chain in dv.apply_sync(describe):
        assert not writeable and not owndata
        assert "Frame" in chain, chain


def test_scatter_gather_array(dv: Any) -> None:
    data = np.arange(10_001, dtype=np.float64)
    dv.scatter("part", data, block=True)
    sizes = dv.apply_sync(ipp.interactive(lambda: len(part)))  # noqa: F821 - engine global
    assert sum(sizes) == data.size and min(sizes) > 0
    back = dv.gather("part", block=True)
    assert back.dtype == data.dtype and np.array_equal(back, data)


def test_execute_then_pull(rc: Any) -> None:
    rc[:].execute("made = [i * i for i in range(4)]", block=True)
    assert rc[:].pull("made", block=True) == [[0, 1, 4, 9]] * N_ENGINES


# -- map ------------------------------------------------------------------------------------


def test_directview_map_sync(dv: Any) -> None:
    assert dv.map_sync(ipp.interactive(lambda x: x + 1), range(9)) == list(range(1, 10))


def test_loadbalanced_map_sync(rc: Any) -> None:
    lview = rc.load_balanced_view()
    double = ipp.interactive(lambda x: 2 * x)
    assert lview.map_sync(double, range(12)) == [2 * i for i in range(12)]


# -- errors ---------------------------------------------------------------------------------


def _divide_by_zero() -> float:
    return 1 / 0


def test_direct_error_is_composite_with_ename(dv: Any) -> None:
    with pytest.raises(ipp.error.CompositeError) as info:
        dv.apply_sync(ipp.interactive(_divide_by_zero))
    assert [e[0] for e in info.value.elist] == ["ZeroDivisionError"] * N_ENGINES
    assert {e[3]["method"] for e in info.value.elist} == {"apply"}


def test_loadbalanced_error_is_remote_error(rc: Any) -> None:
    lview = rc.load_balanced_view()
    with pytest.raises(ipp.error.RemoteError) as info:
        lview.apply_sync(ipp.interactive(lambda: {}["missing"]))
    assert info.value.ename == "KeyError"
    assert "missing" in info.value.evalue


def test_ferroparallel_client_still_works(ipp_cluster: Cluster, rc: Any) -> None:
    import ferroparallel

    fp = ferroparallel.Client(ipp_cluster.client_file, timeout=SHORT)
    try:
        assert fp[:].apply_sync(divmod, 9, 4) == [(2, 1), (2, 1)]
    finally:
        fp.close()


def _publish_array() -> int:
    from ipyparallel.datapub import publish_data  # (ours, on a ferroparallel engine)

    publish_data({"arr": np.arange(3000), "n": 3})
    return 1


def test_published_data_reaches_an_ipyparallel_client(rc: Any) -> None:
    ar = rc[0].apply_async(_publish_array)
    assert ar.get(timeout=SHORT) == 1
    deadline = time.monotonic() + SHORT
    while "arr" not in ar.data and time.monotonic() < deadline:
        rc.spin()
        time.sleep(0.05)
    assert ar.data["n"] == 3 and np.array_equal(ar.data["arr"], np.arange(3000))


def test_our_client_reads_an_ipyparallel_clients_results_from_the_hub(
    ipp_cluster: Cluster, rc: Any
) -> None:
    import ferroparallel

    values = [b"abc", np.arange(5), np.arange(100_000.0), [b"x", 1]]
    ids = []
    for value in values:
        ar = rc[0].apply_async(lambda v: v, value)
        ar.get(timeout=SHORT)
        ids.append(ar.msg_ids[0])
    fp = ferroparallel.Client(ipp_cluster.client_file, timeout=SHORT)
    try:
        assert_results_from_the_hub(fp, ids, values)
    finally:
        fp.close()


# -- unit: which path a payload takes -------------------------------------------------------


def _gate() -> InterruptGate:
    return InterruptGate()


def test_fpap_payload_takes_our_path(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = pack_apply_message(divmod, (7, 2))
    theirs = ipp_serialize.pack_apply_message(divmod, (7, 2), {})
    assert ipp_compat.is_ferroparallel_payload(ours)
    assert not ipp_compat.is_ferroparallel_payload(theirs)

    def forbidden() -> Any:
        raise AssertionError("our payload must not use ipyparallel")

    monkeypatch.setattr(ipp_compat, "ipp_serialize", forbidden)
    out = run_apply(ours, {"__name__": "__main__"}, _gate())
    assert out.error is None and load_object(out.buffers) == (3, 1)


def test_bad_fpap_header_keeps_value_error() -> None:
    ns = {"__name__": "__main__"}
    good = pack_apply_message(divmod, (7, 2))
    bad_magic = [b"XXXX" + bytes(good[0])[4:], *good[1:]]
    bad_version = [b"FPAP\x09\x00" + bytes(good[0])[6:], *good[1:]]
    for frames, text in ((bad_magic, "magic"), (bad_version, "version")):
        error = run_apply(frames, ns, _gate()).error
        assert error is not None and error.ename == "ValueError" and text in error.evalue
    garbage = run_apply([b"garbage"], ns, _gate()).error
    assert garbage is not None and garbage.ename == "ValueError"


def test_ipp_payload_in_process() -> None:
    ns: dict[str, Any] = {"__name__": "__main__", "k": 3}
    f = ipp.interactive(lambda x, y=0: x * k + y)  # noqa: F821 - namespace global
    frames = ipp_serialize.pack_apply_message(f, (np.arange(2000),), {"y": 1})
    out = run_apply(frames, ns, _gate())
    assert out.error is None and out.segment is None
    result, rest = ipp_serialize.deserialize_object(out.buffers)
    assert not rest and np.array_equal(result, np.arange(2000) * 3 + 1)
    push = ipp_serialize.pack_apply_message(ipp.util._push, (), {"a": 1, "b": [2]})
    assert run_apply(push, ns, _gate()).error is None and ns["a"] == 1 and ns["b"] == [2]
    ns["b"] = {}
    indexed = ipp_serialize.pack_apply_message(ipp.util._push, (), {"b['x']": 5})
    assert run_apply(indexed, ns, _gate()).error is None and ns["b"] == {"x": 5}


def test_ipp_payload_errors_are_error_replies() -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}
    failing = ipp_serialize.pack_apply_message(ipp.interactive(_divide_by_zero), (), {})
    error = run_apply(failing, ns, _gate()).error
    assert error is not None and error.ename == "ZeroDivisionError"
    truncated = ipp_serialize.pack_apply_message(divmod, (7, 2), {})[:-1]
    assert run_apply(truncated, ns, _gate()).error is not None


def test_engine_without_ipyparallel_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = ipp_serialize.pack_apply_message(divmod, (7, 2), {})
    monkeypatch.setitem(sys.modules, "ipyparallel.serialize", None)  # import fails
    error = run_apply(frames, {"__name__": "__main__"}, _gate()).error
    assert error is not None and error.ename == "ImportError"
    assert "ipyparallel's serialization" in error.evalue
    assert "install ipyparallel on the engines" in error.evalue
    assert "ferroparallel's Client" in error.evalue


def test_engine_modules_do_not_import_ipyparallel() -> None:
    code = (
        "import sys\n"
        "from ferroparallel.engine.execute import run_apply\n"
        "from ferroparallel.engine.kernel import EngineKernel\n"
        "from ferroparallel.engine.signals import InterruptGate\n"
        "from ferroparallel.serialize import pack_apply_message, load_object\n"
        "out = run_apply(pack_apply_message(divmod, (7, 2)), {'__name__': '__main__'},"
        " InterruptGate())\n"
        "assert load_object(out.buffers) == (3, 1)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ipyparallel', 'IPython')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- ipyparallel's BroadcastView, through the controller's broadcast channel ------------------


def _forget_broadcast_ids(rc: Any, before: set[str]) -> None:
    """ipyparallel 9.2's client leaves the original msg_id of each non-coalescing broadcast in
    ``rc.outstanding`` forever (it waits for ``<msg_id>_<uuid>`` replies instead; the same
    against ipyparallel's own controller): drop those, and only those, so ``rc.wait()`` in
    the fixture checks the rest."""
    stuck = rc.outstanding - before
    assert stuck <= set(rc.history)
    for m in stuck:  # their per-engine replies did all arrive
        assert not [o for o in rc.outstanding if o.startswith(m + "_")]
    rc.outstanding.difference_update(stuck)


@pytest.mark.parametrize("coalescing", [False, True])
def test_broadcast_view_apply_and_execute(rc: Any, coalescing: bool) -> None:
    before = set(rc.outstanding)
    bview = rc.broadcast_view(is_coalescing=coalescing)
    bview.execute("import os; tag = 'bv'", block=True)
    pids = bview.apply_sync(ipp.interactive(lambda: (os.getpid(), tag)))  # noqa: F821
    assert len(pids) == N_ENGINES
    assert {t for _, t in pids} == {"bv"}
    assert len({p for p, _ in pids}) == N_ENGINES
    ar = bview.apply_async(ipp.interactive(lambda x: x * 2), 21)
    assert ar.get(timeout=SHORT) == [42] * N_ENGINES
    _forget_broadcast_ids(rc, before)


def test_broadcast_view_push_pull_and_errors(rc: Any) -> None:
    before = set(rc.outstanding)
    bview = rc.broadcast_view()
    bview.push({"a": np.arange(5)}, block=True)
    pulled = bview.pull("a", block=True)
    assert len(pulled) == N_ENGINES
    for arr in pulled:
        np.testing.assert_array_equal(arr, np.arange(5))
    with pytest.raises(ipp.error.CompositeError) as info:
        bview.apply_sync(ipp.interactive(lambda: 1 / 0))
    assert {e[0] for e in info.value.elist} == {"ZeroDivisionError"}
    _forget_broadcast_ids(rc, before)


def test_a_task_on_an_engine_that_dies_fails_and_completes_for_a_stock_client(
    new_cluster: Any,
) -> None:
    """The controller's EngineError for a task stranded on a dead engine is a wrapped
    exception (``engine_info`` empty), as ipyparallel's scheduler sends it: an ipyparallel
    client raises it and expects no more output for the task (with an ``engine_info`` it would
    wait for output forever)."""
    import signal
    import time

    cluster, ours = new_cluster(n=2)
    pid = ours[1].apply_sync(os.getpid)
    stock = connect_ipp(cluster)
    try:
        lview = stock.load_balanced_view(targets=[1])
        ar = lview.apply_async(time.sleep, 60)
        deadline = time.monotonic() + SHORT
        while not ours.queue_status(1)["tasks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ipp.RemoteError) as info:
            ar.get(timeout=SHORT)
        assert info.value.ename == "EngineError"
        assert ar.wait_for_output(SHORT)
    finally:
        stock.close()


def test_frames_ipyparallel_serialized_are_read_by_its_deserializer() -> None:
    from ferroparallel.serialize import serialize_object

    for value in [5, None, b"abc", np.arange(3), np.arange(10_000), {"a": [1, b"x"]}]:
        theirs = list(ipp_serialize.serialize_object(value))
        ours = serialize_object(value)
        assert not ipp_compat.is_our_protocol(theirs), value  # (protocol 4 before 3.14)
        assert ipp_compat.is_our_protocol(ours), value
        back = ipp_compat.deserialize_ipp_object(theirs)
        if isinstance(value, np.ndarray):
            assert np.array_equal(back, value)
        else:
            assert back == value


def test_published_data_of_an_execute_reaches_an_ipyparallel_client(rc: Any) -> None:
    # an execute says nothing of its client: the data goes as one pickle both clients read
    ar = rc[0].execute(
        "from ipyparallel.datapub import publish_data\n"
        "import numpy\n"
        "publish_data({'arr': numpy.arange(3000), 'n': 3})",
        block=False,
    )
    ar.get(timeout=SHORT)
    deadline = time.monotonic() + SHORT
    while "arr" not in ar.data and time.monotonic() < deadline:
        rc.spin()
        time.sleep(0.05)
    assert ar.data.get("n") == 3 and np.array_equal(ar.data["arr"], np.arange(3000)), ar.data
