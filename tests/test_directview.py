"""User-level acceptance tests of DirectView on a real cluster (see ``cluster_fixtures``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ferroparallel as ipp
from cluster_util import EngineGate
from ferroparallel import error
from ferroparallel.client import AsyncResult, Client, DirectView
from ferroparallel.cluster import Cluster

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)

SHORT = 30.0
WaitUntil = Callable[..., Any]


# ----- execute / run --------------------------------------------------------------------------


def test_execute_blocking_sets_names(dv: DirectView) -> None:
    dv.execute("a = 6 * 7", block=True)
    assert dv.pull("a", block=True) == [42, 42]
    ar = dv.execute("b = a + 1", block=True)
    assert len(ar) == 2
    assert dv["b"] == [43, 43]


def test_blocking_execute_returns_its_asyncresult_with_output(dv: DirectView) -> None:
    """As ipyparallel: a blocking execute waits for the replies and the output, and returns
    the AsyncResult (``display_outputs``, ``stdout`` work on it at once)."""
    ar = dv.execute("print('said', 6 * 7)", block=True)
    assert isinstance(ar, AsyncResult) and ar.ready() and ar.successful()
    assert ar.stdout == ["said 42\n", "said 42\n"]
    assert len(ar.get()) == 2  # the replies are still there
    single = dv.client[0].execute("print('one')", block=True)
    assert isinstance(single, AsyncResult) and single.stdout == "one\n"
    dv.block = True
    try:
        assert isinstance(dv.execute("c = 1"), AsyncResult)
    finally:
        dv.block = False


def test_execute_captures_stdout(dv: DirectView) -> None:
    ar = dv.execute("import os\nprint('hello from', os.getpid())")
    ar.get(timeout=SHORT)
    assert ar.wait_for_output(SHORT)
    pids = dv.apply_sync(os.getpid)
    assert ar.stdout == [f"hello from {pid}\n" for pid in pids]
    single = dv.execute("print('only one')", targets=1)
    single.get(timeout=SHORT)
    assert single.wait_for_output(SHORT)
    assert single.stdout == "only one\n"


def test_execute_errors(rc: Client, dv: DirectView) -> None:
    with pytest.raises(error.RemoteError) as info:
        rc[0].execute("1/0", block=True)
    assert info.value.ename == "ZeroDivisionError"
    assert str(info.value).startswith("[0:execute] ZeroDivisionError:")
    ar = dv.execute("raise ValueError('bad value')")
    with pytest.raises(error.CompositeError) as cinfo:
        ar.get(timeout=SHORT)
    assert [e[0] for e in cinfo.value.elist] == ["ValueError", "ValueError"]
    assert [e[1] for e in cinfo.value.elist] == ["bad value", "bad value"]
    assert sorted(e[3]["engine_id"] for e in cinfo.value.elist) == [0, 1]
    # a syntax error is reported, and the engines keep working
    with pytest.raises(error.CompositeError) as sinfo:
        dv.execute("def (:", block=True)
    assert all(e[0] == "SyntaxError" for e in sinfo.value.elist)
    assert dv.apply_sync(lambda: "ok") == ["ok", "ok"]


def test_run_a_file(dv: DirectView, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("ran = 40 + 2\nprint('running', ran)\n")
    dv.run(str(script), block=True)
    assert dv["ran"] == [42, 42]
    ar = dv.run(str(script))
    ar.get(timeout=SHORT)
    ar.wait_for_output(SHORT)
    assert ar.stdout == ["running 42\n", "running 42\n"]


# ----- apply / map ----------------------------------------------------------------------------


def test_apply_variants(rc: Client, dv: DirectView) -> None:
    def add(a: int, b: int = 0) -> int:
        return a + b

    ar = dv.apply(add, 1, b=2)  # block is False by default
    assert isinstance(ar, ipp.AsyncResult)
    assert ar.get(timeout=SHORT) == [3, 3]
    assert dv.apply_sync(add, 2, 3) == [5, 5]
    ar = dv.apply_async(add, 4)
    assert ar.get(timeout=SHORT) == [4, 4]
    assert rc[0].apply_sync(add, 1, 1) == 2  # one engine: a scalar
    assert rc[[0]].apply_sync(add, 1, 1) == [2]  # a list of engines: a list
    dv.block = True
    assert dv.apply(add, 5, 5) == [10, 10]


def test_an_engine_named_twice_runs_the_request_twice(rc: Client) -> None:
    """As ipyparallel: each target gets its own message, also the same engine twice."""
    rc[:].execute("runs = 0", block=True)
    ar = rc[[0, 1, 0]].execute("runs += 1")
    assert ar.wait(SHORT) and ar.successful() and len(set(ar.msg_ids)) == 3
    assert rc[:].pull("runs", block=True) == [2, 1]
    assert rc[[1, 1]].apply_sync(lambda: 7) == [7, 7]
    ar = rc[[0, 0]].apply_async(os.getpid)
    assert ar.get(timeout=SHORT) == [rc[0].apply_sync(os.getpid)] * 2
    assert [md.engine_id for md in ar.metadata] == [0, 0]


def test_apply_passes_a_keyword_named_f(rc: Client) -> None:
    assert rc[1].apply_sync(lambda f: f * 2, f=21) == 42
    assert rc[1].apply_async(lambda f: f * 2, f=1).get(timeout=SHORT) == 2


def test_apply_sends_and_returns_numpy_arrays(rc: Client) -> None:
    a = np.arange(100_000, dtype=np.float64)
    out = rc[0].apply_sync(lambda x: x * 2, a)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, a * 2)


def test_map_variants(dv: DirectView) -> None:
    assert dv.map_sync(lambda x: x * 2, range(10)) == [x * 2 for x in range(10)]
    ar = dv.map_async(lambda x, y: x + y, range(5), range(10, 15))
    assert isinstance(ar, ipp.AsyncMapResult)
    assert ar.get(timeout=SHORT) == [10, 12, 14, 16, 18]
    ar = dv.map(str, [1, 2, 3])  # non-blocking by default
    assert ar.get(timeout=SHORT) == ["1", "2", "3"]
    # the work really is spread over both engines
    pids = dv.map_sync(lambda _: __import__("os").getpid(), range(4))
    assert len(set(pids)) == 2
    with dv.temp_flags(block=True):
        assert dv.map(abs, [-1, -2]) == [1, 2]
    # more engines than elements
    assert dv.map_sync(lambda x: x + 1, [1]) == [2]


def test_map_flags_and_mappings(rc: Client, dv: DirectView) -> None:
    """As ipyparallel: ``label`` and ``track`` are map arguments, a dict maps over its keys,
    and execute / run take a label too (the hub records it)."""
    ar = dv.map_async(str.upper, {"a": 1, "b": 2}, label="upper", track=True)
    assert ar.get(timeout=SHORT) == ["A", "B"]
    assert {md["label"] for md in ar.metadata} == {"upper"}
    assert dv.map_sync(str.upper, {"x", "y"}) in (["X", "Y"], ["Y", "X"])
    ex = dv.execute("z = 1", label="exec-label", block=True)
    recs = rc.db_query({"label": "exec-label"}, ["msg_id"])
    assert {r["msg_id"] for r in recs} == set(ex.msg_ids)


def test_output_with_lone_surrogates_is_sent_replaced(rc: Client, dv: DirectView) -> None:
    """Text that cannot be UTF-8 (a surrogateescape'd file name) is printed with U+FFFD, as
    Jupyter kernels do, instead of failing the print or losing the reply."""
    ar = dv.execute("print('x\\udcffy')", targets=0, block=True)
    assert ar.stdout == "x\ufffdy\n"

    def shout() -> None:
        print("a\udcffb")
        raise OSError("no such file: \udcff")

    ar = rc[0].apply_async(shout)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=SHORT)
    assert info.value.ename == "OSError" and "\ufffd" in info.value.evalue
    assert ar.wait_for_output(SHORT) and ar.stdout == "a\ufffdb\n"
    # the engine still watches long requests (its watcher thread survived)
    assert rc[0].apply_sync(time.sleep, 0.3) is None


def test_map_errors(dv: DirectView) -> None:
    with pytest.raises(error.CompositeError) as info:
        dv.map_sync(lambda x: 1 / x, [1, 0, 2, 4])
    assert info.value.elist[0][0] == "ZeroDivisionError"


def test_map_return_exceptions(dv: DirectView) -> None:
    out = dv.map_sync(lambda x: 1 / x, [0, 1, 2, 4], return_exceptions=True)
    assert isinstance(out[0], error.RemoteError)
    assert out[-2:] == [0.5, 0.25]  # a failed chunk: its error once (ipyparallel) or per item


# ----- data movement --------------------------------------------------------------------------


def test_push_pull_update_get(rc: Client, dv: DirectView) -> None:
    dv.push({"a": 1, "b": [1, 2]}, block=True)
    assert dv.pull("a", block=True) == [1, 1]
    assert dv.pull(("a", "b"), block=True) == [[1, [1, 2]], [1, [1, 2]]]
    ar = dv.push({"c": "three"})
    ar.get(timeout=SHORT)
    assert dv.pull("c").get(timeout=SHORT) == ["three", "three"]
    dv.update({"d": 4.5})
    dv.wait(timeout=SHORT)
    assert dv.get("d") == [4.5, 4.5]
    rc[0].push({"only0": 0}, block=True)
    assert rc[0].pull("only0", block=True) == 0
    rc[1].push({"arr": np.ones(3)}, block=True)
    np.testing.assert_array_equal(rc[1].pull("arr", block=True), np.ones(3))


def test_item_access(rc: Client, dv: DirectView) -> None:
    dv["x"] = 10
    assert dv["x"] == [10, 10]
    rc[1]["x"] = 11
    assert rc[1]["x"] == 11
    assert dv["x"] == [10, 11]


def test_scatter_gather_block_distribution(dv: DirectView) -> None:
    data = list(range(11))
    dv.scatter("part", data, block=True)
    assert dv.pull("part", block=True) == [list(range(6)), list(range(6, 11))]
    assert dv.gather("part", block=True) == data
    ar = dv.scatter("part2", data)
    ar.get(timeout=SHORT)
    gathered = dv.gather("part2")
    assert gathered.get(timeout=SHORT) == data


def test_blocking_scatter_returns_none_and_view_flags_apply(dv: DirectView) -> None:
    """As ipyparallel: a blocking scatter returns None; clear/abort/shutdown default to the
    view's ``block`` (a blocking view waits for the engines' answers and returns None)."""
    assert dv.scatter("s", list(range(6)), block=True) is None
    assert dv.gather("s", block=True) == list(range(6))
    ar = dv.scatter("s2", list(range(4)))
    assert isinstance(ar, AsyncResult)
    ar.get(timeout=SHORT)
    dv.block = True
    try:
        assert dv.abort() is None
        dv["gone"] = 1
        assert dv.clear() is None
        with pytest.raises(error.RemoteError):
            dv.pull("gone")
    finally:
        dv.block = False
    pending = dv.clear()
    pending.get(timeout=SHORT)


def test_scatter_gather_round_robin(dv: DirectView) -> None:
    data = list(range(11))
    dv.scatter("rr", data, dist="r", block=True)
    assert dv.pull("rr", block=True) == [data[0::2], data[1::2]]
    assert dv.gather("rr", dist="r", block=True) == data


def test_scatter_flatten(dv: DirectView) -> None:
    dv.scatter("one", [7, 8], flatten=True, block=True)
    assert dv.pull("one", block=True) == [7, 8]
    dv.scatter("listed", [7, 8], block=True)
    assert dv.pull("listed", block=True) == [[7], [8]]


def test_scatter_gather_numpy(dv: DirectView) -> None:
    a = np.arange(20.0).reshape(10, 2)
    dv.scatter("a", a, block=True)
    parts = dv.pull("a", block=True)
    assert all(isinstance(p, np.ndarray) for p in parts)
    np.testing.assert_array_equal(parts[0], a[:5])
    np.testing.assert_array_equal(parts[1], a[5:])
    dv.execute("shape = a.shape", block=True)
    assert dv["shape"] == [(5, 2), (5, 2)]
    back = dv.gather("a", block=True)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, a)
    v = np.arange(9)
    dv.scatter("v", v, dist="r", block=True)
    np.testing.assert_array_equal(dv.pull("v", block=True)[0], v[0::2])
    np.testing.assert_array_equal(np.sort(dv.gather("v", dist="r", block=True)), v)


# ----- flags ----------------------------------------------------------------------------------


def test_set_flags(rc: Client, dv: DirectView) -> None:
    dv.set_flags(block=True)
    assert dv.block is True
    assert dv.apply(lambda: 1) == [1, 1]
    dv.set_flags(block=False, targets=[1])
    ar = dv.apply(os.getpid)
    assert ar.get(timeout=SHORT) == [rc[1].apply_sync(os.getpid)]
    with pytest.raises(KeyError):
        dv.set_flags(no_such_flag=1)


def test_temp_flags(dv: DirectView) -> None:
    with dv.temp_flags(block=True, targets=[0]):
        assert dv.block is True
        assert dv.apply(lambda: "t") == ["t"]
    assert dv.block is False
    assert len(dv) == 2
    with pytest.raises(ZeroDivisionError), dv.temp_flags(block=True):
        raise ZeroDivisionError
    assert dv.block is False


# ----- imports, decorators, references --------------------------------------------------------


def test_sync_imports(dv: DirectView, capsys: pytest.CaptureFixture[str]) -> None:
    with dv.sync_imports():
        import statistics
        from fractions import Fraction as _F  # noqa: F401
    # ipyparallel's words
    assert capsys.readouterr().out == (
        "importing statistics on engine(s)\nimporting Fraction from fractions on engine(s)\n"
    )
    assert statistics.mean([1, 2, 3]) == 2  # imported locally too
    use = ipp.interactive(lambda: statistics.median([5, 1, 3]))
    assert dv.apply_sync(use) == [3, 3]
    with dv.sync_imports(quiet=True):
        from fractions import Fraction
    assert capsys.readouterr().out == ""
    assert dv.apply_sync(ipp.interactive(lambda: str(Fraction(2, 6)))) == ["1/3", "1/3"]
    assert Fraction(1, 2) == 0.5


def test_sync_imports_failing_import_raises_before_it_is_announced(
    dv: DirectView, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ipyparallel's: each import runs here first, so a module missing here raises out of
    the block without being announced or sent, and the imports before it were already sent
    to the engines."""
    with pytest.raises(ImportError, match="fp_no_such_module"), dv.sync_imports():
        import calendar  # noqa: F401

        import fp_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert capsys.readouterr().out == "importing calendar on engine(s)\n"
    names = dv.apply_sync(lambda m: m.__name__, ipp.Reference("calendar"))
    assert names == ["calendar", "calendar"]


def test_remote_decorator(rc: Client, dv: DirectView) -> None:
    @dv.remote(block=True)
    def getpid() -> int:
        import os

        return os.getpid()

    pids = getpid()
    assert len(set(pids)) == 2

    @rc[0].remote(block=False)
    def double(x: int) -> int:
        return 2 * x

    ar = double(21)
    assert ar.get(timeout=SHORT) == 42


def test_remote_and_parallel_wrappers_describe_themselves(dv: DirectView) -> None:
    """help() on a decorated function says it runs remotely, then shows the function's doc
    (as ipyparallel's wrappers); its name stays the function's."""

    def area(w: int, h: int = 2) -> int:
        """Width times height."""
        return w * h

    remote_area = ipp.remote(dv, block=True)(area)
    parallel_area = ipp.parallel(dv, block=True)(area)
    for wrapper, kind in ((remote_area, "RemoteFunction"), (parallel_area, "ParallelFunction")):
        assert wrapper.__name__ == "area"
        assert kind in wrapper.__doc__
        assert "Width times height." in wrapper.__doc__
    assert remote_area(3) == [6, 6]
    assert parallel_area.map([1, 2]) == [2, 4]
    undocumented = ipp.remote(dv, block=True)(lambda: 1)
    assert undocumented.__doc__ is None
    assert undocumented() == [1, 1]


def test_parallel_decorator(dv: DirectView) -> None:
    @dv.parallel(block=True)
    def sizes(part: list[int]) -> list[int]:
        return [len(part)] * len(part)

    # called with a list: each engine gets one partition
    assert sizes(list(range(10))) == [5] * 10

    @dv.parallel(block=True)
    def double(x: Any) -> Any:
        return x * 2

    # .map is element-wise
    assert double.map(range(6)) == [0, 2, 4, 6, 8, 10]
    # a call doubles each partition (list repetition): [0,1,2]*2 + [3,4,5]*2
    assert double(list(range(6))) == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]

    @dv.parallel(dist="r", block=False)
    def tag(part: list[int]) -> list[tuple[int, int]]:
        import os

        return [(x, os.getpid()) for x in part]

    ar = tag(list(range(6)))
    pairs = ar.get(timeout=SHORT)
    assert [x for x, _ in pairs] == list(range(6))
    assert pairs[0][1] != pairs[1][1]


def test_parallel_call_skips_engines_without_a_part(dv: DirectView) -> None:
    """As ipyparallel: a parallel function called with fewer elements than engines is not
    called with an empty part (``max`` of an empty part would raise), nor at all with empty
    sequences."""

    @dv.parallel(block=True)
    def largest(part: list[int]) -> list[int]:
        return [max(part)]

    assert largest([7]) == [7]
    assert largest([]) == []
    assert largest(list(range(4))) == [1, 3]

    @dv.parallel(dist="r", block=False)
    def parts(part: Any) -> list[int]:
        return [len(part)]

    ar = parts(range(1))
    assert ar.get(timeout=SHORT) == [1]
    assert len(ar.msg_ids) == 1 and ar.engine_id == [0]
    assert parts([]).get(timeout=SHORT) == []


def test_reference_argument(rc: Client, dv: DirectView) -> None:
    dv.push({"a": 10}, block=True)
    rc[1].push({"a": 20}, block=True)
    assert dv.apply_sync(lambda x, y: x + y, ipp.Reference("a"), 1) == [11, 21]
    assert dv.apply_sync(lambda *, k: k * 2, k=ipp.Reference("a")) == [20, 40]


def test_reference_as_the_applied_function(rc: Client, dv: DirectView) -> None:
    """A function that only the engines have, named by a Reference, is applied on one engine,
    on several, load-balanced and through a broadcast view (as ipyparallel allows)."""
    dv.execute("offset = 100\ndef bump(x):\n    return x + offset", block=True)
    rc[1].execute("offset = 200", block=True)
    bump = ipp.Reference("bump")
    assert rc[1].apply_sync(bump, 1) == 201
    assert dv.apply_sync(bump, 1) == [101, 201]
    assert rc.broadcast_view().apply_sync(bump, 2) == [102, 202]
    assert rc.load_balanced_view().apply_sync(bump, 3) in (103, 203)
    with pytest.raises(TypeError, match="must be callable"):
        dv.apply_sync(42)


def test_interactive_functions_see_pushed_names(dv: DirectView) -> None:
    dv.push({"scale": 3}, block=True)

    @ipp.interactive
    def scaled(x: int) -> int:
        return scale * x  # noqa: F821 - defined on the engines

    assert dv.apply_sync(scaled, 2) == [6, 6]
    assert dv.map_sync(scaled, [1, 2, 3]) == [3, 6, 9]

    @ipp.interactive
    def set_global() -> None:
        global made_remotely
        made_remotely = "yes"

    dv.apply_sync(set_global)
    assert dv["made_remotely"] == ["yes", "yes"]


def test_engine_process_looks_like_an_ipyparallel_engine(dv: DirectView, tmp_path: Path) -> None:
    # as on an ipyparallel engine: no engine options in sys.argv (a module parsing the command
    # line when imported must not see them), and imports follow the working directory
    argvs = dv.apply_sync(lambda: list(__import__("sys").argv))
    assert all(len(argv) == 1 for argv in argvs)
    (tmp_path / "fp_cwd_module_xyz.py").write_text("VALUE = 'from cwd'\n")

    def import_from(path: str) -> str:
        import importlib
        import os

        old = os.getcwd()
        os.chdir(path)
        try:
            return importlib.import_module("fp_cwd_module_xyz").VALUE
        finally:
            os.chdir(old)

    assert dv.apply_sync(import_from, str(tmp_path)) == ["from cwd", "from cwd"]
    dv.execute("import sys; sys.modules.pop('fp_cwd_module_xyz', None)", block=True)


def test_input_on_an_engine_raises_as_on_ipyparallel(dv: DirectView) -> None:
    with pytest.raises(error.CompositeError) as info:
        dv.execute("input('x')", block=True)
    assert [e[0] for e in info.value.elist] == ["StdinNotImplementedError"] * 2
    with pytest.raises(error.RemoteError) as one:
        dv.client[0].apply_sync(input, "y")
    assert one.value.ename == "StdinNotImplementedError"
    assert dv.apply_sync(lambda: callable(input)) == [True, True]


def test_user_code_closing_stdin_leaves_the_engine_serving(dv: DirectView) -> None:
    # exit() and quit() close sys.stdin before raising SystemExit; the engine's next
    # request gets a fresh (empty) stdin, and prints as before
    with pytest.raises(error.CompositeError, match="SystemExit"):
        dv.apply_sync(lambda: exit())  # noqa: PLR1722
    dv.apply_sync(lambda: __import__("sys").stdin.close())
    assert dv.apply_sync(lambda: (print("still here"), __import__("sys").stdin.read())[1]) == [
        "",
        "",
    ]
    ar = dv.apply_async(print, "out")
    ar.get(timeout=30)
    assert ar.wait_for_output(30) and ar.stdout == ["out\n", "out\n"]


def test_exit_in_a_cell_or_interactive_function_returns_none_and_the_engine_serves(
    dv: DirectView,
) -> None:
    # as on ipyparallel's engines, exit() / quit() of the engine's namespace (IPython's
    # exiter) ask a frontend to exit: nothing happens, the call returns None
    ar = dv.execute("exit()\nquit()\nafter_exit = 1", block=True)
    assert ar.successful()
    assert dv.pull("after_exit", block=True) == [1, 1]

    @ipp.interactive
    def leave() -> Any:
        return exit()  # noqa: PLR1722 - the engine namespace's exit

    assert dv.apply_sync(leave) == [None, None]
    assert dv.apply_sync(lambda: 5) == [5, 5]
    dv.execute("del after_exit", block=True)


CLIENT_VALUE = "client-value"


@ipp.interactive
def _read_client_value() -> str:
    return CLIENT_VALUE


def test_cloudpickled_functions_run_over_the_senders_globals(
    dv: DirectView, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ipyparallel's use_cloudpickle: a function carries its globals' values and runs over
    them, not over the engine's namespace, which it neither reads nor fills. An
    ``@interactive`` function's globals are the client's ``__main__`` (not its module's)."""
    # (the __main__ of when it was decorated: IPython shells made by other tests since may
    # have put their own module in sys.modules["__main__"])
    assert _read_client_value.__globals__.get("__name__") == "__main__"
    monkeypatch.setitem(_read_client_value.__globals__, "CLIENT_VALUE", "client-main")
    dv.execute("CLIENT_VALUE = 'engine-value'", block=True)
    try:
        dv.use_cloudpickle(block=True)
        assert dv.apply_sync(_read_client_value) == ["client-main"] * 2
        assert dv.pull("CLIENT_VALUE", block=True) == ["engine-value"] * 2
        # the views' own helpers still reach the namespace (as ipyparallel's push and pull)
        dv.push({"cp_x": 3}, block=True)
        dv.execute("cp_y = cp_x + 1", block=True)
        assert dv.pull("cp_y", block=True) == [4, 4]
        dv.scatter("cp_s", list(range(4)), block=True)
        assert dv.gather("cp_s", block=True) == [0, 1, 2, 3]
        assert dv.apply_sync(lambda v: v, ipp.Reference("cp_y")) == [4, 4]
    finally:
        dv.use_pickle(block=True)
    # the default: __main__ functions look their data up on the engine (as ipyparallel's)
    assert dv.apply_sync(_read_client_value) == ["engine-value"] * 2
    dv.execute("del CLIENT_VALUE, cp_x, cp_y, cp_s", block=True)


def test_use_pickle_and_cloudpickle(dv: DirectView) -> None:
    try:
        ar = dv.use_cloudpickle(block=False)  # the view's block by default, as ipyparallel
        assert isinstance(ar, ipp.AsyncResult)
        # as ipyparallel's: the engines run use_cloudpickle too, and the result is named so
        assert repr(ar).startswith("<AsyncResult(use_cloudpickle): ")
        assert ar.get(timeout=SHORT) == [None, None]
        assert dv.apply_sync(abs, -3) == [3, 3]
        assert dv.apply_sync(os.getpid) == dv.apply_sync(os.getpid)
        k = 5
        assert dv.apply_sync(lambda: k + 1) == [6, 6]
    finally:
        back = dv.use_pickle(block=False)  # the default again, here and on the engines
        assert repr(back).startswith("<AsyncResult(use_pickle): ")
        back.get(timeout=SHORT)
    # as ipyparallel: code keeps working after use_pickle (lambdas, closures, push)
    dv.push({"pp": 5}, block=True)
    assert dv.apply_sync(lambda: 1) == [1, 1]
    assert dv.pull("pp", block=True) == [5, 5]
    k = 6
    assert dv.apply_sync(lambda: k + 1) == [7, 7]


def _closure_over(f: Any) -> Callable[[], str]:
    def read_first_line() -> str:
        return f.readline()

    return read_first_line


def test_default_pickler_refuses_open_files_as_ipyparallel(dv: DirectView, tmp_path: Path) -> None:
    """ipyparallel's default refuses a closure over an open file with the standard pickler's
    ``TypeError`` (its "Using Dill" example shows it); only ``use_cloudpickle`` sends a read
    file as a copy of its contents."""
    path = tmp_path / "lines.txt"
    path.write_text("first\nsecond\n")
    with open(path) as f:
        fn = _closure_over(f)
        with pytest.raises(TypeError, match="cannot pickle '_io.TextIOWrapper' object"):
            dv.apply_sync(fn)
        try:
            dv.use_cloudpickle(block=True)
            assert dv.apply_sync(fn) == ["first\n", "first\n"]
        finally:
            dv.use_pickle(block=True)
        with pytest.raises(TypeError, match="_io.TextIOWrapper"):
            dv.apply_sync(fn)


# ----- control through the view ---------------------------------------------------------------


def test_view_wait(dv: DirectView) -> None:
    dv.apply_async(time.sleep, 0.3)
    assert dv.wait(timeout=SHORT) is True
    slow = dv.apply_async(time.sleep, 1.0)
    assert dv.wait(slow.msg_ids, timeout=0.1) is False
    assert dv.wait([slow], timeout=SHORT) is True
    assert slow.ready()


def test_view_wait_accepts_an_asyncresult(dv: DirectView) -> None:
    ar = dv.apply_async(time.sleep, 0.2)
    assert dv.wait(ar, timeout=SHORT) is True


def test_view_abort(rc: Client, engine_gate: EngineGate) -> None:
    view = rc[0]
    running = view.apply_async(engine_gate.task())  # busy until the aborts are answered
    queued = [view.apply_async(lambda: "never") for _ in range(2)]
    view.abort(queued, block=True)
    for ar in queued:
        with pytest.raises(error.TaskAborted):
            ar.get(timeout=SHORT)
    engine_gate.open()
    assert running.get(timeout=SHORT) is None


def test_each_view_keeps_its_own_history(rc: Client, engine_gate: EngineGate) -> None:
    """As ipyparallel: ``view.history`` / ``outstanding`` hold what was submitted through
    that view; ``wait()``, ``abort()`` and ``get_result()`` default to them."""
    # the load-balanced sleep goes to engine 1, so that nothing of it queues on engine 0
    mine, other, lb = rc[0], rc[0], rc.load_balanced_view(targets=[1])
    first = mine.apply_async(lambda: "first")
    slow = lb.apply_async(time.sleep, 3.0)
    last = mine.apply_async(lambda: "last")
    assert mine.history == [*first.msg_ids, *last.msg_ids]
    assert set(mine.outstanding) <= set(mine.history)
    assert slow.msg_ids[0] in lb.history and slow.msg_ids[0] not in mine.history
    # wait() is this view's: done long before the load-balanced sleep
    started = time.monotonic()
    assert mine.wait(timeout=SHORT)
    assert time.monotonic() - started < 2.5 and not slow.ready()
    assert mine.outstanding == set()
    assert mine.get_result().get(timeout=SHORT) == "last"  # the view's last request
    assert mine.get_result(0).get(timeout=SHORT) == "first"
    assert mine.get_result([0, 1]).get(timeout=SHORT) == ["first", "last"]
    with pytest.raises(IndexError, match="2 requests submitted through it"):
        mine.get_result(5)
    with pytest.raises(IndexError, match="0 requests"):
        rc[1].get_result()
    # abort() aborts this view's queued tasks, not another view's
    busy = other.apply_async(engine_gate.task())  # until the abort is answered
    queued_here = mine.apply_async(lambda: "aborted")
    queued_there = other.apply_async(lambda: "runs")
    mine.abort(block=True)
    with pytest.raises(error.TaskAborted):
        queued_here.get(timeout=SHORT)
    engine_gate.open()
    assert queued_there.get(timeout=SHORT) == "runs"
    assert busy.get(timeout=SHORT) is None
    assert lb.wait(timeout=SHORT) and slow.get(timeout=SHORT) is None


def test_importer_and_resolved_targets(rc: Client, dv: DirectView) -> None:
    """``with view.importer:`` imports here and on the engines; ``rc[-1]``, slices and lists
    name the engines registered when the view is made (as ipyparallel)."""
    with dv.importer:
        import colorsys  # noqa: F401 - imported for the engines
    assert dv.apply_sync(lambda: colorsys.__name__) == ["colorsys", "colorsys"]  # noqa: F821
    assert rc[-1].targets == rc.ids[-1]
    assert rc[-1].apply_sync(lambda: 1) == 1  # a single engine: a single result
    assert rc[::2].targets == rc.ids[::2]
    assert rc.direct_view(rc.ids[:1]).targets == rc.ids[:1]
    assert rc.direct_view("all").targets == "all"
    with pytest.raises(TypeError, match="block"):
        dv.map_async(abs, [1], block=True)


def test_bad_arguments_name_the_fix(rc: Client, dv: DirectView) -> None:
    """Mistakes are caught before anything is sent, with ipyparallel's exception types."""
    lv = rc.load_balanced_view()
    for view in (dv, lv):
        # as ipyparallel (and the builtin map): iterables are taken, the shortest wins
        assert view.map_sync(lambda a, b: a + b, [1, 2, 3], [10, 20]) == [11, 22]
        assert view.map_sync(abs, (-x for x in range(3))) == [0, 1, 2]
        with pytest.raises(TypeError, match="not int"):
            view.map_sync(abs, 5)
        # a parallel function still needs equal lengths
        with pytest.raises(ValueError, match=r"equal length, but have \[2, 1\]"):
            view.parallel(block=True)(lambda a, b: a)([1, 2], [3])
    with pytest.raises(TypeError, match="use push"):
        dv.scatter("x", 5)
    dv.scatter("x", {"a": 1, "b": 2, "c": 3}, block=True)  # as ipyparallel: the keys
    assert dv.pull("x", block=True) == [["a", "b"], ["c"]]
    # as ipyparallel: any iterable is split as a list
    dv.scatter("s", {1, 2, 3}, block=True)
    assert sorted(x for part in dv.pull("s", block=True) for x in part) == [1, 2, 3]
    with pytest.raises(TypeError, match="str or a list of str"):
        dv.pull(5)
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        rc.send_signal("SIGFOO", block=True)
    with pytest.raises(KeyError, match="Invalid name: 'nope'"), dv.temp_flags(nope=1):
        pass
    assert dv.block is False
    assert rc.send_signal(" 18 ", targets=0, block=True) is None  # SIGCONT: harmless
    assert rc.send_signal("cont", targets=0, block=True) is None
    assert rc.send_signal(0, targets=[0], block=True) is None  # as kill: only "is it there"
    with pytest.raises(ValueError, match="unknown signal number 999"):
        rc.send_signal(999)


def test_view_queue_status(rc: Client, dv: DirectView) -> None:
    qs = dv.queue_status()
    assert {0, 1} <= set(qs)
    one = rc[1].queue_status()
    assert "completed" in (one[1] if 1 in one else one)


def test_view_clear(rc: Client, dv: DirectView) -> None:
    dv.push({"junk": 1}, block=True)
    rc[1].clear(block=True)
    has_junk = ipp.interactive(lambda: "junk" in globals())
    assert dv.apply_sync(has_junk) == [True, False]
    dv.clear(block=True)
    assert dv.apply_sync(has_junk) == [False, False]


def test_no_engines_selected(rc: Client) -> None:
    with pytest.raises(error.NoEnginesRegistered):
        rc.direct_view([]).apply_sync(lambda: 1)


def test_a_view_may_select_no_engine(rc: Client) -> None:
    """As ipyparallel: a slice or list selecting none of the engines makes an empty view
    (``rc[2:]`` of 2 engines, e.g. "the workers beside engine 0"); only using it fails."""
    for empty in (rc[2:], rc[[]], rc.direct_view([])):
        assert isinstance(empty, DirectView) and empty.targets == [] and len(empty) == 0
        assert repr(empty) == "<DirectView []>"
        with pytest.raises(error.NoEnginesRegistered):
            empty.apply_sync(lambda: 1)
    with pytest.raises(IndexError):
        rc[5]


# ----- targets='all' follows the cluster ------------------------------------------------------


def test_all_targets_follow_new_engines(growing_cluster: tuple[Cluster, Client]) -> None:
    cluster, grc = growing_cluster
    everyone = grc.direct_view("all")
    before = len(grc.ids)
    assert everyone.apply_sync(lambda: 1) == [1] * before
    cluster.start_engines_sync(1)
    grc.wait_for_engines(before + 1, timeout=10)
    assert len(everyone) == before + 1
    assert everyone.apply_sync(lambda: 1) == [1] * (before + 1)
    assert everyone.map_sync(lambda x: x, range(before + 1)) == list(range(before + 1))


def test_slice_view_is_frozen_at_creation(growing_cluster: tuple[Cluster, Client]) -> None:
    cluster, grc = growing_cluster
    frozen = grc[:]
    before = len(grc.ids)
    cluster.start_engines_sync(1)
    grc.wait_for_engines(before + 1, timeout=10)
    assert frozen.apply_sync(lambda: 1) == [1] * before


# ----- output written to file descriptors 1 and 2 ----------------------------------------------


def test_subprocess_output_is_captured_in_order(dv: DirectView) -> None:
    """As on ipyparallel's engines (ipykernel's ``watchfd``): what subprocesses write to the
    engine's stdout/stderr descriptors is part of the request's output, between the prints
    made before and after it."""
    code = "import os\nprint('a', flush=True)\nos.system('echo b; echo e 1>&2')\nprint('c')"
    ar = dv.execute(code, block=True)
    assert ar.wait_for_output(SHORT)
    assert ar.stdout == ["a\nb\nc\n", "a\nb\nc\n"]
    assert ar.stderr == ["e\n", "e\n"]


C_PRINTF_THEN_FORK = """
import ctypes, multiprocessing
ctypes.CDLL(None).printf(b"from C, no newline")  # left in the C library's buffer
child = multiprocessing.get_context("fork").Process(target=print, args=(" child",))
child.start()
child.join()
"""


def test_c_and_forked_child_output_is_captured(rc: Client) -> None:
    """``printf`` of C code (flushed when the request ends) and the prints of a forked child
    reach ``ar.stdout``."""
    ar = rc[0].execute(C_PRINTF_THEN_FORK, block=True)
    assert rc[0]["child.exitcode"] == 0
    assert ar.wait_for_output(SHORT)
    assert ar.stdout == "from C, no newline child\n"


def _engine_log_file(rc: Client, cluster: Cluster, engine_id: int) -> Path:
    pid = rc[engine_id].apply_sync(os.getpid)
    for es in cluster.engines.values():
        for p in es.processes:
            if p.pid == pid and p.log_file:
                return Path(p.log_file)
    pytest.skip("the engine's output does not go to a log file")


def test_descriptor_output_between_requests_goes_to_the_engine_log(
    rc: Client, shared_cluster: Cluster, wait_until: WaitUntil
) -> None:
    """Engine log lines written during a request, and descriptor output written while no
    request runs, go to the engine's log, never into a request's output."""
    log_file = _engine_log_file(rc, shared_cluster, 0)
    code = (
        "import logging, subprocess\n"
        "logging.getLogger('ferroparallel.engine').warning('engine-log-%s' % 'marker')\n"
        "late = subprocess.Popen('sleep 0.3; echo late-%s' % 'marker', shell=True)"
    )
    ar = rc[0].execute(code, block=True)
    assert ar.wait_for_output(SHORT)
    assert ar.stdout == "" and ar.stderr == ""
    text = wait_until(
        lambda: (t := log_file.read_text(errors="replace")) and "late-marker" in t and t,
        what="the background output in the engine log",
    )
    assert "engine-log-marker" in text
    after = rc[0].execute("late.wait()", block=True)
    assert after.wait_for_output(SHORT) and after.stdout == ""


def test_descriptor_capture_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from ferroparallel.engine import fdcapture

    monkeypatch.delenv(fdcapture.ENV_VAR, raising=False)
    assert fdcapture.enabled() == (os.name == "posix")
    monkeypatch.setenv(fdcapture.ENV_VAR, "0")
    assert not fdcapture.enabled()


def _descriptor_writer(i: int) -> str:
    """Code for request ``i`` of a burst: descriptor output (a raw write, ``printf`` left in
    the C library's buffer, stderr), a print, or nothing."""
    return [
        f"import os\nos.write(1, b'fd-{i}')",
        f"import ctypes\nctypes.CDLL(None).printf(b'c-%d', {i})",
        f"import os\nos.write(2, b'err-{i}')",
        f"print('py-{i}')",
        "x = 1",
    ][i % 5]


def test_descriptor_output_stays_with_its_request(rc: Client) -> None:
    """Requests run back to back (queued on the engine): what each writes to descriptors 1
    and 2, newline or not, is in its own output, never in the next request's (the engine
    skips reading the pipes when nothing was written to them)."""
    n = 40
    ars = [rc[0].execute(_descriptor_writer(i), block=False) for i in range(n)]
    for i, ar in enumerate(ars):
        ar.get(timeout=SHORT)
        assert ar.wait_for_output(SHORT)
        out = {0: f"fd-{i}", 1: f"c-{i}", 3: f"py-{i}\n"}.get(i % 5, "")
        assert (ar.stdout, ar.stderr) == (out, f"err-{i}" if i % 5 == 2 else ""), i


THREADS_WRITING = """
import os, sys, threading
def write(k):
    for j in range(150):
        sys.stdout.write(f"p{k}-{j}\\n")  # (one write: print makes two, which threads split)
        os.write(1, f"d{k}-{j};".encode())
threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
write(4)
for t in threads:
    t.join()
"""


def test_concurrent_prints_and_descriptor_writes_are_all_captured(rc: Client) -> None:
    """Threads printing while others write to descriptor 1 (their reads of the pipes race):
    every piece of text arrives once, in each thread's order."""
    ar = rc[0].execute(THREADS_WRITING, block=True)
    assert ar.wait_for_output(SHORT)
    text = ar.stdout
    for k in range(5):
        for kind, sep in (("p", "\n"), ("d", ";")):
            pieces = [f"{kind}{k}-{j}{sep}" for j in range(150)]
            assert all(text.count(p) == 1 for p in pieces), (k, kind)
            positions = [text.index(p) for p in pieces]
            assert positions == sorted(positions), (k, kind)


def _save_garbage() -> None:
    import gc

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)


def _saved_garbage() -> list[str]:
    import gc

    try:
        gc.collect()
        return [type(o).__qualname__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_requests_leave_no_reference_cycles(rc: Client) -> None:
    """A request's own bookkeeping is freed by reference counting, not left to the garbage
    collector (whose passes cost every request CPU time)."""
    rc[0].apply_sync(_save_garbage)
    try:
        # functions pickled by reference and by value (as those of a notebook)
        ars = [rc[0].apply_async(f) for f in [int, lambda: None] * 50]
        rc.wait(ars, timeout=SHORT)
    finally:
        garbage = rc[0].apply_sync(_saved_garbage)
    assert len(garbage) < 50, sorted(set(garbage))


# ----- rich output from apply ------------------------------------------------------------------


def _display_rich() -> tuple[str, bool]:
    """Run on an engine that has not imported IPython yet: import it here, then display."""
    from IPython import get_ipython
    from IPython.display import HTML, display

    display(HTML("<b>hi</b>"))
    display({"text/plain": "raw"}, raw=True)
    print("after")
    return type(get_ipython()).__name__, get_ipython() is not None


def test_apply_display_publishes_display_data_on_a_fresh_engine(
    new_cluster: Callable[..., tuple[Cluster, Client]],
) -> None:
    """As on ipyparallel's (ipykernel) engines: ``display()`` and ``get_ipython()`` work in
    functions sent with ``apply``, even when that call is the first to import IPython; the
    output lands in ``ar.outputs``, not as text in ``ar.stdout``."""
    _, rc = new_cluster(n=1)
    ar = rc[:].apply_async(_display_rich)
    ((_, has_shell),) = ar.get(timeout=SHORT)
    assert has_shell
    assert ar.wait_for_output(SHORT)
    assert ar.stdout == ["after\n"]
    (outputs,) = ar.outputs
    assert [o["data"]["text/plain"] for o in outputs][1:] == ["raw"]
    assert outputs[0]["data"]["text/html"] == "<b>hi</b>"
    # later calls (IPython now imported) and execute share that shell
    again = rc[:].apply_async(_display_rich)
    again.get(timeout=SHORT)
    assert again.wait_for_output(SHORT)
    assert len(again.outputs[0]) == 2 and again.stdout == ["after\n"]
    rc[:].execute("x = get_ipython() is not None", block=True)
    assert rc[:]["x"] == [True]


def _setter(a: Any) -> Any:
    a[0] = 1
    return a


def _copying_setter(a: Any) -> Any:
    if not a.flags.writeable:  # the ipyparallel docs' recipe
        a = a.copy()
    a[0] = 1
    return a


@pytest.mark.parametrize("n", [2, 1 << 18], ids=["small", "2MiB"])
def test_received_arrays_are_read_only_as_documented(rc: Client, n: int) -> None:
    """ipyparallel's "non-copying sends" example: writing into a received array fails with a
    read-only ValueError on the engine, and on the client; copying when read-only works."""
    with pytest.raises(error.RemoteError) as info:
        rc[0].apply_sync(_setter, np.zeros(n))
    assert info.value.ename == "ValueError" and "read-only" in info.value.evalue
    out = rc[0].apply_sync(_copying_setter, np.zeros(n))
    assert out[0] == 1 and not out[1:].any() and not out.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        out[0] = 2
