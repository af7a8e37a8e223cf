"""ipyparallel names and helpers that tutorials use: top-level exports, BroadcastView,
``datapub.publish_data``, the default joblib backend (real cluster, see ``cluster_fixtures``)."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from ferroparallel.client import Client, DirectView
from ferroparallel.datapub import publish_data

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

SHORT = 30.0


def publish_steps(n: int) -> int:
    from ferroparallel.datapub import publish_data

    for i in range(n):
        publish_data({"step": i, "square": i * i})
    publish_data({"done": True})
    return n


def publish_then_wait(path: str) -> str:
    from ferroparallel.datapub import publish_data

    publish_data({"stage": "started", "pid": os.getpid()})
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    publish_data({"stage": "finishing"})
    return "finished"


def test_top_level_names_of_ipyparallel() -> None:
    for name in (
        "Client", "Cluster", "ClusterManager", "DirectView", "LoadBalancedView", "BroadcastView",
        "AsyncResult", "AsyncMapResult", "AsyncHubResult", "RemoteError", "CompositeError",
        "Reference", "interactive", "require", "depend", "dependent", "Dependency", "PrePickled",
        "error", "serialize_object", "deserialize_object", "pack_apply_message",
        "unpack_apply_message", "use_cloudpickle", "use_pickle", "use_dill",
        "register_joblib_backend",
    ):  # fmt: skip
        assert name in dir(ipp), name  # (before its first use too: tab completion)
        assert getattr(ipp, name) is not None, name
        assert name in ipp.__all__, name
    assert ipp.ALL_COMPLETED == concurrent.futures.ALL_COMPLETED
    assert ipp.FIRST_COMPLETED == concurrent.futures.FIRST_COMPLETED
    assert ipp.FIRST_EXCEPTION == concurrent.futures.FIRST_EXCEPTION
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        ipp.no_such_name  # noqa: B018


def test_more_of_ipyparallels_top_level_and_modules() -> None:
    """Submodules as attributes right after the import, the canning API, and the names
    ipyparallel exports that code catches or calls."""
    import traitlets.config.configurable as configurable

    for name in ("client", "cluster", "controller", "serialize", "util"):
        assert name in dir(ipp) and getattr(ipp, name).__name__ == f"ferroparallel.{name}"
    assert ipp.client.view.DirectView is ipp.DirectView
    assert ipp.MultipleInstanceError is configurable.MultipleInstanceError
    assert ipp.can(rounder := (1, [2])) is rounder
    import pickle

    offset = 10
    canned = pickle.loads(pickle.dumps(ipp.can(lambda v: v + offset)))  # stdlib pickle
    assert ipp.uncan(canned)(1) == 11
    main_f = ipp.interactive(lambda: x * 2)  # noqa: F821 - resolved in the namespace
    assert ipp.uncan(pickle.loads(pickle.dumps(ipp.can(main_f))), {"x": 41})() == 82
    ns = {"x": 41}
    assert ipp.uncan([ipp.Reference("x")], ns) == [41]
    f = ipp.uncan(ipp.interactive(lambda: x + 1), ns)  # noqa: F821 - resolved in ns
    assert f() == 42
    with pytest.raises(NotImplementedError, match="%px"):
        ipp.bind_kernel()
    from ferroparallel.cluster.launcher import MPIEngineSetLauncher, SSHEngineSetLauncher
    from ferroparallel.serialize.canning import can, uncan

    assert can is ipp.can and uncan is ipp.uncan
    assert MPIEngineSetLauncher.__name__ == "MPIEngineSetLauncher" and SSHEngineSetLauncher


def test_top_level_serialization_round_trip() -> None:
    frames = ipp.serialize_object({"a": [1, 2.5, "x"], "b": b"y" * 5000})
    assert ipp.deserialize_object(frames) == ({"a": [1, 2.5, "x"], "b": b"y" * 5000}, [])
    bufs = ipp.pack_apply_message(pow, (2, 10), {})
    f, args, kwargs = ipp.unpack_apply_message(bufs)
    assert f(*args, **kwargs) == 1024
    ipp.use_cloudpickle()
    try:
        assert ipp.deserialize_object(ipp.serialize_object(lambda x: x * 3))[0](2) == 6
    finally:
        ipp.use_pickle()  # ipyparallel's default, and ours: lambdas still go, by value
    assert ipp.deserialize_object(ipp.serialize_object(lambda x: x + 1))[0](1) == 2


def test_ipyparallel_parameter_names_of_the_serialization_helpers() -> None:
    a = np.arange(1000.0)
    frames = ipp.serialize_object({"a": a}, buffer_threshold=100, item_threshold=4)
    assert len(frames) == 2  # the array out of band, as with threshold=100
    ns = {"y": 3}
    assert ipp.deserialize_object([ipp.serialize_object(ipp.Reference("y"))[0]], g=ns) == (3, [])
    bufs = ipp.pack_apply_message(pow, (2, 3), {}, buffer_threshold=10)
    f, args, _ = ipp.unpack_apply_message(bufs, g={}, copy=False)
    assert f(*args) == 8
    assert ipp.Reference("abs").get_object() is abs
    assert ipp.Reference("y * 2").get_object(ns) == 6
    pre = ipp.PrePickled(obj=len)
    assert pre.obj is len and pre("abc") == 3


def test_serialization_helpers_take_and_return_what_ipyparallels_do() -> None:
    """``deserialize_object(buffers, g=None)`` returns ``(obj, unused buffers)`` and the
    positional parameters of the four helpers are ipyparallel's."""
    import inspect

    from ipyparallel import serialize as theirs

    for name in ("serialize_object", "deserialize_object", "pack_apply_message"):
        ipp_params = list(inspect.signature(getattr(theirs, name)).parameters)
        ours = inspect.signature(getattr(ipp, name)).parameters
        positional = [p for p, v in ours.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
        assert len(positional) == len(ipp_params), name
    assert list(inspect.signature(ipp.deserialize_object).parameters) == ["buffers", "g"]
    unpack = inspect.signature(ipp.unpack_apply_message).parameters
    assert [p for p, v in unpack.items() if v.kind is v.POSITIONAL_OR_KEYWORD][2] == "copy"
    a = np.arange(1000.0)
    for lib in (ipp, theirs):  # two objects' frames back to back, read one after the other
        frames = lib.serialize_object({"a": a}, 100) + lib.serialize_object([b"z" * 2000], 100)
        first, rest = lib.deserialize_object(frames)
        assert isinstance(rest, list) and len(rest) == 2, lib
        second, rest = lib.deserialize_object(rest)
        np.testing.assert_array_equal(first["a"], a)
        assert second == [b"z" * 2000] and rest == []
        ns = {"y": 3}
        got = lib.deserialize_object(lib.serialize_object(lib.Reference("y")), ns)
        assert got == (3, []), lib
        bufs = lib.pack_apply_message(pow, (2, 5), {}, 10, 64)  # (thresholds positionally)
        f, args, kwargs = lib.unpack_apply_message(bufs, {}, False)
        assert f(*args, **kwargs) == 32 and type(args) is tuple and kwargs == {}
        assert len(lib.serialize_object(a, 100, 64)) == 2


def test_parallel_functions_return_exceptions(rc: Client) -> None:
    lv = rc.load_balanced_view()

    @lv.parallel(return_exceptions=True, block=True)
    def inv(x: float) -> float:
        return 1 / x

    out = inv.map(range(2))
    assert isinstance(out[0], ipp.RemoteError) and out[1] == 1.0
    dv = rc[:]
    pinv = dv.parallel(return_exceptions=True, block=True)(inv.func)
    assert any(isinstance(x, ipp.RemoteError) for x in pinv.map([0, 1, 2, 4]))


def test_prepickled_object_is_sent_as_is(dv: DirectView) -> None:
    table = ipp.PrePickled({"k": list(range(100))})
    out = dv.apply_sync(lambda t: sum(t["k"]), table)
    assert out == [4950, 4950]


def test_broadcast_view(rc: Client) -> None:
    bv = rc.broadcast_view()
    assert isinstance(bv, ipp.BroadcastView) and isinstance(bv, ipp.DirectView)
    assert bv.is_coalescing is False
    assert bv.targets == rc.ids  # as ipyparallel: "all" is resolved when the view is made
    assert sorted(bv.apply_sync(os.getpid)) == sorted(rc[:].apply_sync(os.getpid))
    coalescing = rc.broadcast_view(targets=[1], is_coalescing=True)
    assert coalescing.is_coalescing is True
    coalescing.push({"bv_value": 7}, block=True)
    assert coalescing.pull("bv_value", block=True) == [7]
    assert "is_coalescing" in coalescing.trait_names()


def test_broadcast_results_say_they_were_broadcast(rc: Client) -> None:
    """As ipyparallel: results of a BroadcastView carry ``is_broadcast`` (and the view's
    ``is_coalescing``) in their metadata; a DirectView's do not."""
    ar = rc.broadcast_view().apply_async(os.getpid)
    ar.get(timeout=SHORT)
    assert [(m["is_broadcast"], m["is_coalescing"]) for m in ar.metadata] == [(True, False)] * 2
    ar = rc.broadcast_view(is_coalescing=True).execute("bv_x = 1", block=True)
    assert [(m["is_broadcast"], m["is_coalescing"]) for m in ar.metadata] == [(True, True)] * 2
    ar = rc[:].apply_async(os.getpid)
    ar.get(timeout=SHORT)
    assert [m["is_broadcast"] for m in ar.metadata] == [False, False]


def test_publish_data_reaches_metadata(rc: Client, dv: DirectView) -> None:
    ar = dv.apply_async(publish_steps, 3)
    assert ar.get(timeout=SHORT) == [3, 3]
    assert ar.wait_for_output(SHORT)
    assert ar.data == [{"step": 2, "square": 4, "done": True}] * 2
    single = rc[0].apply_async(publish_steps, 2)
    assert single.get(timeout=SHORT) == 2
    assert single.wait_for_output(SHORT)
    assert single.data == {"step": 1, "square": 1, "done": True}


def publish_text_about_ipyparallel_and_an_array() -> int:
    publish_data({"note": "see ipyparallel.serialize", "arr": np.arange(3000)})
    return 1


def test_data_and_results_are_told_apart_by_metadata_not_by_their_bytes(
    rc: Client, shared_cluster: Any
) -> None:
    """Our own data and hub results that merely mention ipyparallel's serializer (user text)
    are read as ours: the format is told by the message's metadata."""
    ar = rc[0].apply_async(publish_text_about_ipyparallel_and_an_array)
    assert ar.get(timeout=SHORT) == 1
    assert ar.wait_for_output(SHORT)
    assert ar.data["note"] == "see ipyparallel.serialize"
    assert np.array_equal(ar.data["arr"], np.arange(3000))
    ar = rc[0].apply_async(lambda: {"note": "ipyparallel.serialize", "arr": np.arange(3000)})
    ar.get(timeout=SHORT)
    with ipp.Client(shared_cluster.client_file, timeout=SHORT) as other:
        got = other.get_result(ar.msg_ids[0]).get(timeout=SHORT)
    assert got["note"] == "ipyparallel.serialize" and np.array_equal(got["arr"], np.arange(3000))


def publish_the_ipyparallel_way() -> str:
    from ipyparallel.datapub import publish_data  # (as ipyparallel's documentation writes it)

    publish_data({"via": "ipyparallel.datapub"})
    return "pub"


def test_ipyparallel_datapub_publishes_on_our_engines(rc: Client) -> None:
    ar = rc[0].apply_async(publish_the_ipyparallel_way)
    assert ar.get(timeout=SHORT) == "pub"
    assert ar.wait_for_output(SHORT)
    assert ar.data == {"via": "ipyparallel.datapub"}


def test_publish_data_is_seen_while_the_task_runs(
    rc: Client, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    flag = tmp_path / "go"
    ar = rc[1].apply_async(publish_then_wait, str(flag))
    wait_until(lambda: ar.data.get("stage") == "started", SHORT, "first published data")
    assert not ar.ready()
    pid = ar.data["pid"]
    flag.touch()
    assert ar.get(timeout=SHORT) == "finished"
    assert ar.wait_for_output(SHORT)
    assert ar.data == {"stage": "finishing", "pid": pid}


def test_publish_data_outside_an_engine() -> None:
    with pytest.raises(RuntimeError, match="only in code running on a ferroparallel engine"):
        publish_data({"x": 1})
    with pytest.raises(TypeError, match="takes a dict"):
        publish_data([("x", 1)])  # type: ignore[arg-type]


def test_default_joblib_backend_connects_a_client(rc: Client) -> None:
    joblib = pytest.importorskip("joblib")
    ipp.register_joblib_backend("ferroparallel-default-client")
    with joblib.parallel_config(backend="ferroparallel-default-client"):
        first = joblib.Parallel(n_jobs=2)(joblib.delayed(pow)(i, 2) for i in range(6))
        second = joblib.Parallel(n_jobs=2)(joblib.delayed(os.getpid)() for _ in range(4))
    assert first == [i * i for i in range(6)]
    assert set(second) <= set(rc[:].apply_sync(os.getpid))


def test_default_joblib_backend_starts_a_cluster_when_none_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ipyparallel's: with no cluster in the default profile, the backend starts one and
    stops it when joblib is done."""
    joblib = pytest.importorskip("joblib")
    psutil = pytest.importorskip("psutil")
    monkeypatch.setenv("FERROPARALLEL_DIR", str(tmp_path / "empty-root"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ipp.register_joblib_backend("ferroparallel-own-cluster")
    with joblib.parallel_config(backend="ferroparallel-own-cluster"):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(pow)(i, 3) for i in range(5))
    assert out == [i**3 for i in range(5)]
    import gc

    gc.collect()  # the backend is gone: its cluster is stopped

    def leftovers() -> set[int]:
        now = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}
        return {pid for pid in now - before if psutil.pid_exists(pid)}

    deadline = time.monotonic() + SHORT
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers()


def test_ipyparallel_top_level_names(rc: Client) -> None:
    """The names ipyparallel exports at its top level that user code reaches for: the error
    classes (``except ipp.TaskAborted``), ``ipp.TimeoutError`` (the builtin), ``remote`` /
    ``parallel`` decorators over a view, and ``version_info``."""
    for name in (
        "EngineError",
        "NoEnginesRegistered",
        "TaskAborted",
        "TaskTimeout",
        "DependencyTimeout",
        "ImpossibleDependency",
        "InvalidDependency",
        "UnmetDependency",
        "KernelError",
        "TaskRejectError",
        "AlreadyDisplayedError",
        "unwrap_exception",
        "collect_exceptions",
        "wrap_exception",
        "RemoteFunction",
        "ParallelFunction",
        "ViewExecutor",
    ):
        assert getattr(ipp, name) is not None, name
    assert ipp.TimeoutError is TimeoutError
    assert ipp.TaskAborted is ipp.error.TaskAborted
    assert issubclass(ipp.RemoteError, ipp.IPythonError)
    assert isinstance(ipp.version_info, tuple) and all(isinstance(p, int) for p in ipp.version_info)
    assert ".".join(map(str, ipp.version_info)) == ipp.__version__.split("+")[0]
    triple = ipp.remote(rc[:], block=True)(lambda x: x * 3)
    assert isinstance(triple, ipp.RemoteFunction) and triple(2) == [6, 6]
    lv = rc.load_balanced_view()
    inc = ipp.parallel(lv, block=True, ordered=False)(lambda x: x + 1)
    assert isinstance(inc, ipp.ParallelFunction)
    assert sorted(inc.map(range(6))) == [1, 2, 3, 4, 5, 6]
    in_order = ipp.parallel(lv, block=True)(lambda x: x * 2)
    assert in_order.map(range(5)) == [0, 2, 4, 6, 8]


def test_view_helpers_and_the_client_cluster(
    rc: Client, dv: DirectView, shared_cluster: Any
) -> None:
    """``view.imap``, ``view.purge_results`` and ``view.shutdown`` exist on every view (as
    ipyparallel's View); a client made by a Cluster knows it (``rc.cluster``)."""
    assert list(dv.imap(lambda x: x * 2, range(5))) == [0, 2, 4, 6, 8]
    ar = dv.apply_async(lambda: "kept")
    ar.get(timeout=30)
    first = ar.msg_ids[0]
    assert rc.db_query({"msg_id": first}, keys=["msg_id"])
    dv.purge_results(jobs=[first])
    assert rc.db_query({"msg_id": first}, keys=["msg_id"]) == []
    assert rc.cluster is None  # made from a connection file
    made = shared_cluster.connect_client_sync()
    try:
        assert made.cluster is shared_cluster
    finally:
        made.close()


def test_load_balanced_view_shutdown_stops_every_engine() -> None:
    """``lview.shutdown()`` (a View method, as in ipyparallel) stops all engines when the view
    names none; it blocks when the view does."""
    with ipp.Cluster(n=2, log_level="ERROR") as own:
        own.wait_for_engines(2, timeout=30)
        lv = own.load_balanced_view()
        lv.block = True
        assert lv.shutdown() is None
        deadline = time.monotonic() + 30
        while own.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert own.ids == []


def test_silent_execute_reports_the_last_counted_execution(dv: DirectView) -> None:
    """As IPython kernels (and so ipyparallel): a silent execute is not counted, and its reply
    names the last counted execution."""
    counted = dv.execute("parity_a = 1", silent=False).get(timeout=SHORT)[0].execution_count
    silent = dv.execute("parity_b = 2").get(timeout=SHORT)[0].execution_count
    assert silent == counted
    again = dv.execute("parity_c = 3", silent=False).get(timeout=SHORT)[0].execution_count
    assert again == counted + 1


def test_load_balanced_view_int_target_is_a_list(rc: Client) -> None:
    assert rc.load_balanced_view(0).targets == [0]  # as ipyparallel
    assert rc.load_balanced_view(0).apply_sync(lambda: 3) == 3


def test_view_results_are_owned_and_metadata_defaults(dv: DirectView) -> None:
    """As ipyparallel: results made by a view own their entries; is_broadcast/is_coalescing
    are False, not None."""
    ar = dv.apply_async(lambda: 1)
    assert ar.get(timeout=SHORT) == [1, 1]
    assert ar.owner is True
    for md in ar.metadata:
        assert md["is_broadcast"] is False and md["is_coalescing"] is False


def test_targeted_joblib_backend_counts_its_engines(rc: Client) -> None:
    joblib = pytest.importorskip("joblib")
    from joblib.parallel import get_active_backend

    rc.load_balanced_view(targets=[0]).register_joblib_backend(name="fp-one-engine")
    with joblib.parallel_config(backend="fp-one-engine"):
        backend, _ = get_active_backend()
        assert backend.effective_n_jobs(-1) == 1  # as ipyparallel: len(view)
    rc.load_balanced_view().register_joblib_backend(name="fp-all-engines")
    with joblib.parallel_config(backend="fp-all-engines"):
        backend, _ = get_active_backend()
        assert backend.effective_n_jobs(-1) == len(rc.ids)


def test_ipyparallel_serialize_module_names() -> None:
    """``ipyparallel.serialize.__all__`` (and the canning module's pickler switches) import
    from ferroparallel's modules; the canning registries, which ferroparallel's pickler never
    consults, are refused with the reason and what to do instead."""
    from ipyparallel import serialize as theirs

    import ferroparallel.serialize as ours
    from ferroparallel.serialize.canning import use_cloudpickle, use_dill, use_pickle

    for name in set(theirs.__all__) - {"can_map", "uncan_map"}:
        assert getattr(ours, name) is getattr(ipp, name), name
    assert (use_cloudpickle, use_dill, use_pickle) == (
        ipp.use_cloudpickle, ipp.use_dill, ipp.use_pickle
    )  # fmt: skip
    for where in (ipp, ours, ipp.serialize.canning):
        for name in ("can_map", "uncan_map"):
            assert not hasattr(where, name)
            with pytest.raises(AttributeError, match="copyreg"):
                getattr(where, name)
    f, args, kwargs = ipp.unpack_apply_message(bufs=ipp.pack_apply_message(pow, (2, 4), {}))
    assert f(*args, **kwargs) == 16
    with pytest.raises(TypeError, match="frames once"):
        ipp.unpack_apply_message(ipp.pack_apply_message(pow, (2, 4), {}), bufs=[b""])
    assert ipp.client.view.ViewExecutor is ipp.ViewExecutor
    from ferroparallel.client.client import ExecuteReply
    from ferroparallel.client.dispatch import ExecuteReply as reply_class

    assert ExecuteReply is reply_class


def test_cluster_profile_config(tmp_path: Path) -> None:
    """``Cluster.profile_config``: what the profile's config file says, before the given
    config is merged in (empty with ``load_profile=False``)."""
    from traitlets.config import Config

    pdir = tmp_path / "profile_cfg"
    pdir.mkdir()
    (pdir / "ipcluster_config.py").write_text("c.Cluster.n = 3\nc.Cluster.engine_args = ['-x']\n")
    given = Config()
    given.Cluster.n = 5
    cluster = ipp.Cluster(profile_dir=str(pdir), config=given)
    assert cluster.profile_config.Cluster.n == 3
    assert cluster.config.Cluster.n == 5 and cluster.n == 5
    assert given.Cluster.n == 5 and "engine_args" not in given.Cluster  # (left as given)
    assert ipp.Cluster(profile_dir=str(pdir), load_profile=False).profile_config == Config()


def test_ipyparallel_executor_map_options_and_message_hooks(rc: Client, dv: DirectView) -> None:
    """As ipyparallel: ``executor.map`` passes the view's ``imap`` options on, the send
    methods call ``message_future_hook`` with the request's future, and a parallel function
    has its ``mapObject``."""
    ex = rc.load_balanced_view().executor
    assert sorted(ex.map(abs, range(-3, 3), ordered=False)) == [0, 1, 1, 2, 2, 3]
    got = list(ex.map(lambda x: 1 / x, [1, 0], return_exceptions=True))
    assert got[0] == 1.0 and isinstance(got[1], ipp.RemoteError)
    with pytest.raises(TypeError, match="timeout and chunksize"):
        ex.map(abs, range(3), timeout=5, ordered=False)
    assert list(ex.map(abs, [-1, -2], timeout=SHORT)) == [1, 2]  # (the executor's own map)
    seen: list[Any] = []
    fut = rc.send_apply_request(
        "mux", abs, (-7,), ident=next(iter(rc._uuids)), message_future_hook=seen.append
    )
    assert seen == [fut]
    fut.result(SHORT)
    fut = rc.send_execute_request(
        "mux", "hooked = 1", ident=next(iter(rc._uuids)), message_future_hook=seen.append
    )
    assert seen[1] is fut
    fut.result(SHORT)
    from ferroparallel.client.map import Map, RoundRobinMap

    assert type(dv.parallel()(len).mapObject) is Map
    assert type(dv.parallel(dist="r")(len).mapObject) is RoundRobinMap
