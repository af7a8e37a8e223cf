"""Tests of ``ferroparallel.serialize``: pickles with out-of-band buffers, apply payloads."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from array_strategies import assert_same

try:
    import ferroparallel.serialize as fs
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import ferroparallel.serialize as fs

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers


def received(frames: list[Any]) -> list[memoryview]:
    """What a receiver sees: read-only buffers over fresh memory (not the sender's)."""
    return [memoryview(bytes(f)) for f in frames]


def roundtrip(obj: Any, threshold: int = 1024, namespace: dict | None = None) -> Any:
    return fs.load_object(received(fs.serialize_object(obj, threshold)), namespace)


def address(buf: Any) -> int:
    return np.frombuffer(buf, np.uint8).__array_interface__["data"][0]


def points_into(arr: np.ndarray, buf: Any) -> bool:
    start = address(buf)
    data = arr.__array_interface__["data"][0]
    return start <= data < start + memoryview(buf).nbytes


@pytest.fixture
def restore_pickler():
    yield
    fs.use_pickle()  # the default


# ---------------------------------------------------------------------------------------------
# NumPy arrays

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
    hnp.array_dtypes(allow_subarrays=True),
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


def relayout(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "F":
        return np.asfortranarray(a)
    if a.ndim == 0:
        return a
    if layout == "T":
        return a.T
    if layout == "step":
        return a[..., ::2]
    if layout == "reversed":
        return a[::-1]
    return a


@SETTINGS
@given(
    base=hnp.arrays(DTYPES, SHAPES),
    layout=st.sampled_from(["C", "F", "T", "step", "reversed"]),
    threshold=st.sampled_from([0, 64, 1024, 1 << 40]),
)
def test_array_roundtrip(base: np.ndarray, layout: str, threshold: int) -> None:
    a = relayout(base, layout)
    frames = fs.serialize_object(a, threshold)
    b = fs.load_object(received(frames))
    assert type(b) is np.ndarray
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    assert b.tobytes() == a.tobytes()
    if a.dtype.kind in "biu":
        assert np.array_equal(a, b)
    if a.flags["C_CONTIGUOUS"]:
        assert b.flags["C_CONTIGUOUS"]
    if a.flags["F_CONTIGUOUS"]:
        assert b.flags["F_CONTIGUOUS"]
    assert b.flags["C_CONTIGUOUS"] or b.flags["F_CONTIGUOUS"]
    out_of_band = a.nbytes > threshold and a.dtype.itemsize > 0
    assert len(frames) == (2 if out_of_band else 1)
    if out_of_band:
        assert not b.flags["WRITEABLE"]


def test_fortran_array_keeps_order_and_is_not_copied() -> None:
    a = np.asfortranarray(np.arange(12_000, dtype=np.float64).reshape(100, 120))
    frames = fs.serialize_object(a)
    assert len(frames) == 2
    assert address(frames[1]) == a.__array_interface__["data"][0]  # sender: no copy
    b = fs.load_object(received(frames))
    assert b.flags["F_CONTIGUOUS"] and not b.flags["C_CONTIGUOUS"]
    assert np.array_equal(a, b)


def test_non_contiguous_fortran_slice_stays_fortran() -> None:
    a = np.asfortranarray(np.arange(40_000, dtype=np.int64).reshape(200, 200))[::2, ::2]
    assert not (a.flags["C_CONTIGUOUS"] or a.flags["F_CONTIGUOUS"])
    frames = fs.serialize_object(a)
    assert len(frames) == 2  # copied once, then out-of-band
    b = fs.load_object(received(frames))
    assert b.flags["F_CONTIGUOUS"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "a",
    [
        np.array([1, "two", None, 3.5, [4]], dtype=object),
        np.array([(1, "x"), (2, None)], dtype=[("n", "i4"), ("o", "O")]),
        np.empty((0, 3), dtype=object),
        np.array(None, dtype=object),
    ],
)
def test_object_arrays(a: np.ndarray) -> None:
    b = roundtrip(a, threshold=0)
    assert b.dtype == a.dtype and b.shape == a.shape
    assert b.tolist() == a.tolist()


def test_structured_array_out_of_band() -> None:
    dt = np.dtype([("x", "<f8"), ("y", ">i2", (3,)), ("name", "S5")])
    a = np.zeros(500, dtype=dt)
    a["x"] = np.arange(500)
    a["y"] = np.arange(1500).reshape(500, 3)
    a["name"] = b"abc"
    frames = fs.serialize_object(a)
    assert len(frames) == 2
    b = fs.load_object(received(frames))
    assert b.dtype == dt and b.tobytes() == a.tobytes()


def test_zero_d_and_empty_arrays() -> None:
    for a in [
        np.array(3.5),
        np.array(7, dtype=">u8"),
        np.zeros((0,)),
        np.zeros((3, 0, 2), order="F"),
    ]:
        frames = fs.serialize_object(a, threshold=0)
        assert len(frames) == (2 if a.nbytes else 1)
        assert_same(a, fs.load_object(received(frames)))


def test_received_array_is_zero_copy_and_read_only() -> None:
    a = np.random.default_rng(0).random((256, 512))
    frames = received(fs.serialize_object(a))
    assert len(frames) == 2
    b = fs.load_object(frames)
    assert points_into(b, frames[1])
    assert not b.flags["WRITEABLE"]
    assert np.array_equal(a, b)
    # bytes frames work the same way
    frames = [bytes(f) for f in fs.serialize_object(a)]
    b = fs.load_object(frames)
    assert points_into(b, frames[1])
    assert not b.flags["WRITEABLE"]


def test_received_arrays_are_read_only_even_from_writable_or_in_band_bytes() -> None:
    """As ipyparallel documents it: small arrays (in the pickle) too; empty ones excepted."""
    a = np.arange(1000.0)
    frames = [bytearray(f) for f in fs.serialize_object(a)]
    b = fs.load_object(frames)
    assert points_into(b, frames[1]) and not b.flags.writeable
    for small in (np.zeros(2), np.arange(6).reshape(2, 3).T, np.array(3.5)):
        got = fs.load_object(fs.serialize_object({"x": small}))["x"]
        assert np.array_equal(got, small) and not got.flags.writeable
        assert np.array(got).flags.writeable  # the documented way to a writable copy
    assert fs.load_object(fs.serialize_object(np.zeros((0, 3)))).flags.writeable


def test_read_only_array_comes_back_read_only() -> None:
    a = np.arange(10.0)
    a.flags.writeable = False
    assert not roundtrip(a).flags["WRITEABLE"]  # in-band
    big = np.arange(10_000.0)[::2]
    big.flags.writeable = False
    assert not roundtrip(big).flags["WRITEABLE"]  # non-contiguous, copied, out-of-band


def test_memmap_is_sent_as_ndarray(tmp_path: Path) -> None:
    mm = np.memmap(tmp_path / "data.bin", dtype=np.float32, mode="w+", shape=(100, 50))
    mm[:] = np.arange(5000).reshape(100, 50)
    frames = fs.serialize_object(mm)
    assert len(frames) == 2
    b = fs.load_object(received(frames))
    assert type(b) is np.ndarray
    assert np.array_equal(b, np.asarray(mm))


def test_arrays_nested_in_containers() -> None:
    a = np.arange(1000, dtype=np.int32)
    f = np.asfortranarray(np.ones((30, 40)))
    obj = {"a": a, "list": [f, (a[::3], "text")], "small": np.arange(3)}
    frames = fs.serialize_object(obj)
    # a and f out-of-band; a[::3] (1336 bytes, non-contiguous) copied then out-of-band;
    # the small array stays in the pickle. ``a`` is sent once although it appears twice.
    assert len(frames) == 4
    b = fs.load_object(received(frames))
    assert_same(obj, b)
    assert b["list"][0].flags["F_CONTIGUOUS"]


def test_same_array_twice_is_sent_once_and_stays_shared() -> None:
    a = np.arange(5000.0)
    frames = fs.serialize_object([a, a])
    assert len(frames) == 2
    b = fs.load_object(received(frames))
    assert b[0] is b[1]


# ---------------------------------------------------------------------------------------------
# bytes, bytearray, memoryview


def test_large_bytes_out_of_band_without_copy() -> None:
    data = os.urandom(100_000)
    frames = fs.serialize_object(data)
    assert len(frames) == 2
    assert address(frames[1]) == address(data)  # the frame is the object's own memory
    as_bytes = [bytes(f) for f in frames]
    result = fs.load_object(as_bytes)
    assert result is as_bytes[1]  # a bytes frame is returned as-is
    result = fs.load_object(received(frames))
    assert type(result) is bytes and result == data


def test_threshold_boundary() -> None:
    assert len(fs.serialize_object(b"x" * 1024)) == 1
    assert len(fs.serialize_object(b"x" * 1025)) == 2
    assert len(fs.serialize_object(b"x" * 100, threshold=99)) == 2
    assert len(fs.serialize_object(b"", threshold=0)) == 1
    with pytest.raises(ValueError):
        fs.serialize_object(b"", threshold=-1)


def test_large_bytearray() -> None:
    data = bytearray(os.urandom(5000))
    frames = fs.serialize_object(data)
    assert len(frames) == 2
    assert address(frames[1]) == address(data)
    result = fs.load_object(received(frames))
    assert type(result) is bytearray and result == data


def test_large_memoryview_zero_copy_both_ways() -> None:
    source = np.arange(6000, dtype=np.int32).reshape(60, 100)
    view = memoryview(source)
    frames = fs.serialize_object(view)
    assert len(frames) == 2
    assert address(frames[1]) == address(source)
    got = received(frames)
    result = fs.load_object(got)
    assert type(result) is memoryview
    assert (result.format, result.shape) == (view.format, view.shape)
    assert result.tolist() == view.tolist()
    assert result.readonly
    assert address(result) == address(got[1])


def test_non_contiguous_memoryview() -> None:
    view = memoryview(np.arange(3000, dtype=np.float64))[::3]
    result = roundtrip(view)
    assert (result.format, result.shape, result.tolist()) == (
        view.format,
        view.shape,
        view.tolist(),
    )


def test_small_memoryview_in_band() -> None:
    view = memoryview(bytearray(b"abcdef"))
    frames = fs.serialize_object(view)
    assert len(frames) == 1
    result = fs.load_object(frames)
    assert result.tobytes() == b"abcdef"
    assert not result.readonly  # the original was writable
    assert fs.load_object(fs.serialize_object(memoryview(b"abc"))).readonly


def test_memoryview_with_zero_in_shape() -> None:
    view = memoryview(np.zeros((0, 3)))
    result = roundtrip(view, threshold=0)
    assert result.format == "d" and result.nbytes == 0


@SETTINGS
@given(
    blob=st.binary(min_size=0, max_size=3000),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
    threshold=st.sampled_from([0, 100, 1024]),
)
def test_buffer_types_roundtrip(blob: bytes, kind: type, threshold: int) -> None:
    value = kind(blob) if kind is not memoryview else memoryview(bytearray(blob))
    frames = fs.serialize_object(value, threshold)
    assert len(frames) == (2 if len(blob) > threshold else 1)
    result = fs.load_object(received(frames))
    assert type(result) is kind
    assert bytes(result) == blob


def test_bytes_inside_containers_are_out_of_band_and_shared() -> None:
    big = os.urandom(2000)
    obj = {"a": [big, (big, b"small")], "b": bytearray(3000), "c": "text"}
    frames = fs.serialize_object(obj)
    assert len(frames) == 3  # big once, the bytearray once
    result = fs.load_object(received(frames))
    assert_same(obj, result)
    assert result["a"][0] is result["a"][1][0]
    assert obj["a"][0] is big  # the input was not modified


def test_self_containing_list_falls_back_in_band() -> None:
    obj: list[Any] = [os.urandom(2000)]
    obj.append(obj)
    frames = fs.serialize_object(obj)
    assert len(frames) == 1
    result = fs.load_object(frames)
    assert result[1] is result and result[0] == obj[0]


def test_huge_containers_are_not_scanned() -> None:
    obj = [os.urandom(2000)] + [0] * 70_000
    frames = fs.serialize_object(obj)
    assert len(frames) == 1  # correct, but the bytes were copied into the pickle
    assert fs.load_object(frames) == obj


def test_small_values_stay_in_band() -> None:
    obj = {"n": 1, "s": "x" * 100, "b": b"y" * 100, "a": np.arange(10), "l": [1.5, None]}
    frames = fs.serialize_object(obj)
    assert len(frames) == 1
    assert isinstance(frames[0], bytes)
    assert_same(obj, fs.load_object(frames))


# ---------------------------------------------------------------------------------------------
# nested containers (property)

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=2500),
    st.binary(max_size=2500).map(bytearray),
    hnp.arrays(st.sampled_from([np.float64, np.int32, np.uint8]), SHAPES),
)
NESTED = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=20,
)


def _large_leaves(obj: Any, threshold: int, seen: dict[int, Any]) -> None:
    if isinstance(obj, list | tuple):
        for x in obj:
            _large_leaves(x, threshold, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            _large_leaves(x, threshold, seen)
    elif isinstance(obj, bytes | bytearray | np.ndarray) and memoryview(obj).nbytes > threshold:
        seen[id(obj)] = obj


@SETTINGS
@given(obj=NESTED, threshold=st.sampled_from([0, 16, 1024]))
def test_nested_containers_roundtrip(obj: Any, threshold: int) -> None:
    frames = fs.serialize_object(obj, threshold)
    large: dict[int, Any] = {}
    _large_leaves(obj, threshold, large)
    assert len(frames) - 1 == len(large)
    assert_same(obj, fs.load_object(received(frames)))


# ---------------------------------------------------------------------------------------------
# functions and classes


class ModuleLevelPoint:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleLevelPoint) and other.x == self.x


def module_level_function(x: int) -> int:
    return x + 1


def make_closure(n: int):
    def add(x: int) -> int:
        return x + n

    return add


def test_lambdas_closures_and_module_objects() -> None:
    assert roundtrip(lambda x: x * 2)(21) == 42
    assert roundtrip(make_closure(10))(5) == 15
    assert roundtrip(module_level_function) is module_level_function
    assert roundtrip(ModuleLevelPoint(3)) == ModuleLevelPoint(3)


def test_local_class_by_value() -> None:
    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

        def double(self) -> int:
            return 2 * self.v

    cls = roundtrip(Local)
    assert cls.__name__ == "Local" and cls(4).double() == 8
    assert roundtrip(Local(5)).double() == 10


MAIN_SOURCE = """
import math

SCALE = 3

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return math.hypot(self.x, self.y)

def helper(v):
    return v * SCALE

def uses_helper(v):
    return helper(v) + OFFSET

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def counter():
    global COUNT
    COUNT = COUNT + 1
    return COUNT
"""


def make_main() -> dict[str, Any]:
    """Definitions as if typed in a notebook: their module is ``__main__``."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(MAIN_SOURCE, "<notebook>", "exec"), ns)
    return ns


def test_main_class_and_functions_by_value() -> None:
    main = make_main()
    frames = fs.serialize_object(main["Point"])
    assert b"hypot" in frames[0]  # by value: the code travels
    cls = fs.load_object(received(frames))
    assert cls.__name__ == "Point" and cls(3, 4).norm() == 5.0
    assert roundtrip(main["Point"](6, 8)).norm() == 10.0
    assert roundtrip(main["fact"])(5) == 120
    assert roundtrip(main["helper"], namespace={"SCALE": 3})(2) == 6


def test_main_function_resolves_globals_in_namespace() -> None:
    main = make_main()
    engine: dict[str, Any] = {"OFFSET": 100, "SCALE": 4}
    f = roundtrip(main["uses_helper"], namespace=engine)
    assert f.__globals__ is engine
    assert f(2) == 108  # helper came from the client, OFFSET and SCALE are the engine's
    assert "helper" in engine and "math" not in engine
    # recursion through a captured global
    assert roundtrip(main["fact"], namespace=engine)(6) == 720


def test_engine_values_win_over_captured_ones() -> None:
    main = make_main()
    engine: dict[str, Any] = {"OFFSET": 0, "SCALE": 10}
    f = roundtrip(main["uses_helper"], namespace=engine)
    assert f(2) == 20
    assert engine["SCALE"] == 10


def test_redefined_client_helper_replaces_earlier_capture() -> None:
    main = make_main()
    engine: dict[str, Any] = {"OFFSET": 0, "SCALE": 3}
    assert roundtrip(main["uses_helper"], namespace=engine)(2) == 6
    exec("def helper(v):\n    return v * 1000\n", main)
    assert roundtrip(main["uses_helper"], namespace=engine)(2) == 2000
    # but a helper defined on the engine itself is kept
    engine["helper"] = lambda v: -v
    assert roundtrip(main["uses_helper"], namespace=engine)(2) == -2


def test_main_function_leaves_its_data_on_the_sender() -> None:
    """As in ipyparallel, a __main__ function brings its helpers, classes and modules, not
    the data it names: that is looked up where it runs (a large client array referenced by the
    function is not re-sent with every call, and a name only the client has is a NameError)."""
    import builtins

    main = make_main()
    exec(
        "import math\nBIG = bytes(1 << 20)\ndef area(r):\n    return len(BIG) + math.pi * r\n", main
    )
    frames = fs.serialize_object(main["area"], threshold=1024)
    assert len(frames) == 1 and len(frames[0]) < 4096  # no 1 MiB BIG in there
    engine: dict[str, Any] = {"__builtins__": builtins, "BIG": b"xy"}
    assert roundtrip(main["area"], namespace=engine)(0) == 2
    assert "math" in engine  # the module came along (by name)
    with pytest.raises(NameError, match="BIG"):
        roundtrip(main["area"], namespace={"__builtins__": builtins})(0)
    # explicit use_cloudpickle(), as ipyparallel's: the function is cloudpickle's entirely,
    # data globals included; it runs over the sender's values and leaves the engine's
    # namespace alone (neither reads nor fills it)
    fs.use_cloudpickle()
    try:
        assert sum(len(f) for f in fs.serialize_object(main["area"], threshold=1024)) > 1 << 20
        fresh: dict[str, Any] = {"__builtins__": builtins}
        assert roundtrip(main["area"], namespace=fresh)(0) == 1 << 20
        assert set(fresh) == {"__builtins__"}
        engine = {"__builtins__": builtins, "BIG": b"xy"}
        assert roundtrip(main["area"], namespace=engine)(0) == 1 << 20
        assert engine["BIG"] == b"xy" and "math" not in engine
        exec("def engine_only():\n    return ONLY_THERE\n", main)
        with pytest.raises(NameError, match="ONLY_THERE"):
            roundtrip(main["engine_only"], namespace={**engine, "ONLY_THERE": 1})()
        # Reference is how such a function takes an engine value
        from ferroparallel import Reference

        got = fs.load_object(fs.serialize_object([Reference("BIG")]), engine)
        assert got == [b"xy"]
    finally:
        fs.use_pickle()
    assert len(fs.serialize_object(main["area"], threshold=1024)[0]) < 4096


def test_nested_main_functions_leave_their_data_on_the_sender_too() -> None:
    """A lambda or a function defined inside a function (and the functions its closure holds)
    looks its data up where it runs, like a top-level one; only methods, which travel inside
    their class, keep theirs."""
    import builtins

    main = make_main()
    exec(
        "BIG = bytes(1 << 20)\n"
        "def make():\n"
        "    return lambda: len(BIG)\n"
        "def deco(func):\n"
        "    def wrapper():\n"
        "        return func() + 1\n"
        "    return wrapper\n"
        "@deco\n"
        "def wrapped():\n"
        "    return len(BIG)\n"
        "def make_recursive():\n"
        "    def down(n):\n"
        "        return len(BIG) if n == 0 else down(n - 1)\n"
        "    return down\n"
        "class Holder:\n"
        "    def size(self):\n"
        "        return len(BIG)\n",
        main,
    )
    engine: dict[str, Any] = {"__builtins__": builtins, "BIG": b"xyz"}
    for f, expected in ((main["make"](), 3), (main["wrapped"], 4)):
        frames = fs.serialize_object(f, threshold=1024)
        assert sum(len(x) for x in frames) < 8192, f  # BIG stays on the client
        assert roundtrip(f, namespace=engine)() == expected
    down = roundtrip(main["make_recursive"](), namespace=engine)
    assert down(3) == 3 and down.__closure__[0].cell_contents is down
    with pytest.raises(NameError, match="BIG"):
        roundtrip(main["make"](), namespace={"__builtins__": builtins})()
    # a method keeps what it names (its class is not rebound to the engine namespace)
    assert roundtrip(main["Holder"], namespace=engine)().size() == 1 << 20


def test_main_function_keeps_its_file_name() -> None:
    """Remote tracebacks name the file and line the user wrote (cloudpickle alone would say
    ``<dynamic-code>``)."""
    main = make_main()
    f = roundtrip(main["fact"], namespace={})
    assert f.__code__.co_filename == "<notebook>" and f(4) == 24


def test_main_function_global_statement_writes_to_namespace() -> None:
    main = make_main()
    engine: dict[str, Any] = {"COUNT": 41}
    counter = roundtrip(main["counter"], namespace=engine)
    assert counter() == 42
    assert engine["COUNT"] == 42


@fs.interactive
def interactive_uses_pushed(x: int) -> int:
    return x * PUSHED  # noqa: F821 - defined on the engine


@fs.interactive
def interactive_assigns(value: Any) -> None:
    global ASSIGNED
    ASSIGNED = value


def test_interactive_sees_pushed_names() -> None:
    assert interactive_uses_pushed.__module__ == "__main__"
    engine: dict[str, Any] = {"PUSHED": 7}
    f = roundtrip(interactive_uses_pushed, namespace=engine)
    assert f is not interactive_uses_pushed
    assert f(6) == 42
    engine["PUSHED"] = 2  # later pushes are seen too
    assert f(6) == 12
    g = roundtrip(interactive_assigns, namespace=engine)
    g([1, 2])
    assert engine["ASSIGNED"] == [1, 2]


def test_interactive_without_namespace_keeps_captured_globals() -> None:
    f = roundtrip(interactive_uses_pushed)
    with pytest.raises(NameError):
        f(1)


WHERE = "the test module"


def test_interactive_takes_mains_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ipyparallel's ``@interactive``: a function defined in an importable module is
    rebuilt over ``__main__``'s globals (closure, defaults and attributes kept), so called
    locally it sees ``__main__``'s names; ferroparallel's engine helpers keep their own."""
    import ferroparallel.client.remote_helpers as helpers
    import ferroparallel.dependency as dependency

    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "WHERE", "__main__", raising=False)
    step = 10

    def where(prefix: str = "in", *, suffix: str = "!") -> str:
        """Doc."""
        return f"{prefix} {WHERE} +{step}{suffix}"

    where.tag = "kept"  # type: ignore[attr-defined]
    f = fs.interactive(where)
    assert f.__globals__ is vars(main) and where.__globals__ is globals()
    assert f() == "in __main__ +10!" and where() == "in the test module +10!"
    assert f(suffix="?") == "in __main__ +10?" and f.__doc__ == "Doc." and f.tag == "kept"
    assert f.__module__ == "__main__" and f.__qualname__ == where.__qualname__
    assert fs.interactive(f) is f
    assert roundtrip(f, namespace={"WHERE": "engine"})() == "in engine +10!"
    for helper in (helpers._push, helpers._pull, helpers._execute, dependency._require):
        assert helper.__module__ == "__main__"
        assert helper.__globals__ is not vars(main)

    class Point:
        pass

    assert fs.interactive(Point) is Point and Point.__module__ == "__main__"


def test_module_function_is_not_relinked() -> None:
    engine: dict[str, Any] = {}
    assert roundtrip(module_level_function, namespace=engine) is module_level_function
    assert engine == {}


# ---------------------------------------------------------------------------------------------
# Reference


def test_reference_resolution() -> None:
    engine = {"a": 5, "data": [1, 2, 3]}
    obj = [fs.Reference("a"), (fs.Reference("data"),), {"k": fs.Reference("a * 2")}]
    assert roundtrip(obj, namespace=engine) == [5, ([1, 2, 3],), {"k": 10}]
    resolved = roundtrip(fs.Reference("data"), namespace=engine)
    assert resolved is engine["data"]


def test_reference_without_namespace_stays() -> None:
    ref = roundtrip(fs.Reference("a"))
    assert type(ref) is fs.Reference and ref == fs.Reference("a")
    assert repr(ref) == "<Reference: 'a'>"
    with pytest.raises(TypeError):
        fs.Reference(3)  # type: ignore[arg-type]


def test_missing_reference_raises_name_error() -> None:
    with pytest.raises(NameError):
        roundtrip(fs.Reference("nope"), namespace={})


# ---------------------------------------------------------------------------------------------
# apply payload


def test_apply_roundtrip_with_references_and_buffers() -> None:
    big = np.arange(10_000.0)
    frames = fs.pack_apply_message(
        lambda x, y, *, scale: (x.sum() + y) * scale,
        (big, fs.Reference("y")),
        {"scale": fs.Reference("s")},
    )
    # header, f pickle, args pickle, one array frame
    assert len(frames) == 4
    assert address(frames[3]) == big.__array_interface__["data"][0]
    got = received(frames)
    f, args, kwargs = fs.unpack_apply_message(got, namespace={"y": 1.0, "s": 2})
    assert type(args) is tuple and type(kwargs) is dict
    assert points_into(args[0], got[3])
    assert f(*args, **kwargs) == (big.sum() + 1.0) * 2


def test_apply_frame_layout() -> None:
    f_frames = fs.serialize_object(module_level_function)
    frames = fs.pack_apply_message(module_level_function, [1], None)
    header = bytes(frames[0])
    assert header[:4] == b"FPAP"
    assert int.from_bytes(header[4:6], "little") == 1
    assert int.from_bytes(header[8:12], "little") == len(f_frames) == 1
    assert frames[1] == f_frames[0]
    assert pickle.loads(frames[2]) == ((1,), {})


def test_apply_interactive_function_and_defaults() -> None:
    engine: dict[str, Any] = {"PUSHED": 3}
    f, args, kwargs = fs.unpack_apply_message(
        received(fs.pack_apply_message(interactive_uses_pushed, (5,), {})), engine
    )
    assert f(*args, **kwargs) == 15
    f, args, kwargs = fs.unpack_apply_message(
        fs.pack_apply_message(fs.Reference("len"), (fs.Reference("PUSHED_LIST"),)),
        {"PUSHED_LIST": [1, 2]},
    )
    assert f(*args) == 2
    f, args, kwargs = fs.unpack_apply_message(fs.pack_apply_message(max))
    assert f is max and args == () and kwargs == {}


def test_apply_errors() -> None:
    with pytest.raises(TypeError):
        fs.pack_apply_message(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fs.pack_apply_message(max, (), {1: 2})  # type: ignore[dict-item]
    frames = fs.pack_apply_message(max, (1, 2))
    with pytest.raises(ValueError):
        fs.unpack_apply_message(frames[:2])
    with pytest.raises(ValueError):
        fs.unpack_apply_message([b"XXXX" + bytes(frames[0])[4:], *frames[1:]])
    with pytest.raises(ValueError):
        fs.unpack_apply_message(
            [bytes(frames[0])[:4] + b"\x09\x00" + bytes(frames[0])[6:], *frames[1:]]
        )
    with pytest.raises(ValueError):
        fs.unpack_apply_message([frames[0], frames[1], fs.serialize_object([1])[0]])


def test_deserialize_checks_frame_count() -> None:
    frames = fs.serialize_object(np.arange(1000.0))
    with pytest.raises(pickle.UnpicklingError):
        fs.load_object(frames[:1])
    with pytest.raises(ValueError):
        fs.load_object([*frames, b"extra"])
    with pytest.raises(ValueError):
        fs.load_object([])


def test_result_aliases() -> None:
    assert fs.serialize_result is fs.serialize_object
    assert fs.deserialize_result is fs.load_object


# ---------------------------------------------------------------------------------------------
# pickler switches and optional numpy


def test_use_pickle(restore_pickler: None) -> None:
    fs.use_pickle()
    assert fs.current_pickler() == "pickle"
    # as ipyparallel's use_pickle: back to the default, lambdas still go (by value)
    assert roundtrip(lambda: 1)() == 1
    assert roundtrip(module_level_function) is module_level_function
    # importable functions go by reference: the standard pickle of it
    head = fs.serialize_object(module_level_function)[0]
    assert b"module_level_function" in bytes(head) and len(bytes(head)) < 200
    a = np.arange(5000.0)[::2]
    frames = fs.serialize_object([a, memoryview(os.urandom(2000)), os.urandom(3000)])
    assert len(frames) == 4
    fs.use_cloudpickle()
    assert fs.current_pickler() == "cloudpickle"
    assert roundtrip(lambda: 1)() == 1


def test_use_dill(restore_pickler: None) -> None:
    try:
        import dill  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install dill"):
            fs.use_dill()
        assert fs.current_pickler() == "pickle"
        return
    fs.use_dill()
    assert fs.current_pickler() == "dill"
    assert roundtrip(lambda x: x + 1)(1) == 2
    frames = fs.serialize_object([np.arange(2000.0), os.urandom(3000)])
    assert len(frames) == 3


def test_imports_and_works_without_numpy() -> None:
    package_root = Path(fs.__file__).parents[2]
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import ferroparallel.serialize as fs\n"
        "frames = fs.serialize_object([b'x' * 5000, memoryview(b'y' * 10)])\n"
        "assert len(frames) == 2, frames\n"
        "assert fs.load_object(frames)[0] == b'x' * 5000\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_fast_path_writes_what_the_full_pickler_writes() -> None:
    """Plain data and importable functions skip the Pickler object but not its output."""
    import io
    import os.path

    from ferroparallel.serialize import load_object, pickling, serialize_object

    samples = [
        None,
        7,
        "x",
        ((), {}),
        ((1, "a", [1, 2.5]), {"k": (True, None)}),
        os.path.join,
        (os.path.join, range(3, 9)),
        [None] * 100,  # a map chunk's result
        [float(i) for i in range(1000)],
        ([1, (2, "x")] * 200, {}),
    ]
    for obj in samples:
        assert pickling._is_plain(obj, 1024) or callable(obj), obj
        full = io.BytesIO()
        pickling._pickler_class(full, lambda b: True).dump(obj)
        assert serialize_object(obj)[0] == full.getvalue(), obj
    # lambdas, closures and deep or large containers still go through cloudpickle
    square = lambda x: x * x  # noqa: E731
    assert load_object(serialize_object(square))(3) == 9
    deep = [[[[1]]]]
    assert load_object(serialize_object(deep)) == deep
    assert not pickling._is_plain(([[[1]]], {}), 1024)
    assert not pickling._is_plain([0] * 5000, 1024)  # past the scan budget
    assert not pickling._is_plain([0] * 500 + [square], 1024)
    assert not pickling._is_plain((square,), 1024)
    assert not pickling._is_plain(b"x" * 2000, 1024)
    # a function pickled once is sent as the same frames every time
    runner = pickling.Prepickled(square)
    assert serialize_object(runner) == runner.frames and runner(4) == 16
    assert load_object(serialize_object(runner))(5) == 25
    # inside another object (a map chunk's arguments) it goes as its stored bytes, pickled no
    # further, and comes back as the function; large closure buffers stay out of band
    args = ((runner, range(3)), {})
    assert pickling._is_plain(args, 1024)
    (f, part), kw = load_object(serialize_object(args))
    assert f(6) == 36 and part == range(3) and kw == {}
    big = np.arange(100_000, dtype="f8")
    heavy = pickling.Prepickled(lambda x: x + big[-1])
    frames = serialize_object(((heavy, [1]), {}))
    assert not pickling._is_plain(((heavy, [1]), {}), 1024)
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == big.nbytes
    (g, _), _ = load_object(frames)
    assert g(1) == 100_000.0


def test_plain_call_frames_are_those_of_the_general_packer(tmp_path: Path) -> None:
    """``pack_plain_call`` (the task loop's shortcut) writes byte for byte what
    ``pack_apply_message`` writes, and declines everything the shortcut cannot vouch for."""
    import os.path

    from ferroparallel.serialize import apply, pickling

    calls = [
        (os.path.join, (), {}),
        (os.path.join, ("a", "b"), {}),
        (os.path.join, ("a", [1, 2.5], {"k": None}), {"x": (True, b"y" * 10)}),
    ]
    for f, args, kwargs in calls:
        plain = apply.pack_plain_call(f, args, kwargs)
        assert plain == apply.pack_apply_message(f, args, kwargs)
        got = apply.unpack_apply_message(received(plain), {})
        assert got == (f, tuple(args), kwargs)
    square = lambda x: x * x  # noqa: E731
    runner = pickling.Prepickled(os.path.join)  # a map's chunk runner, with a by-value f
    chunk = (runner, (pickling.Prepickled(square), range(5)), {})
    plain = apply.pack_plain_call(*chunk)
    assert plain is not None and plain == apply.pack_apply_message(*chunk)
    f, (g, part), kw = apply.unpack_apply_message(received(plain), {})
    assert f is os.path.join and g(3) == 9 and part == range(5) and kw == {}
    assert apply.pack_plain_call(square, (), {}) is None  # by value: cloudpickle
    assert apply.pack_plain_call(len, (), {}) is None  # a builtin, not a FunctionType
    assert apply.pack_plain_call(os.path.join, (b"x" * 100_000,), {}) is None  # out of band
    assert apply.pack_plain_call(os.path.join, (fs.Reference("a"),), {}) is None
    assert apply.pack_plain_call(os.path.join, (), {1: 2}) is None  # the general error
    with pytest.raises(TypeError, match="keyword argument names"):
        apply.pack_apply_message(os.path.join, (), {1: 2})

    # a function that is no longer what its module holds under its name goes by value
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "fp_rebound_mod.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(mod_dir))
    try:
        import fp_rebound_mod as mod

        first = mod.f
        assert apply.pack_plain_call(first, (), {}) is not None
        mod.f = lambda: 2
        assert apply.pack_plain_call(first, (), {}) is None
        assert pickling.load_object(received(pickling.serialize_object(first)))() == 1
        mod.f = first
        # a module registered for pickling by value never takes the cached reference
        import cloudpickle

        cloudpickle.register_pickle_by_value(mod)
        try:
            assert apply.pack_plain_call(first, (), {}) is None
            assert apply.pack_plain_call(os.path.join, (), {}) is not None  # others still do
            frames = pickling.serialize_object(first)
            del sys.modules["fp_rebound_mod"]
            assert pickling.load_object(received(frames))() == 1  # carried its code
        finally:
            cloudpickle.unregister_pickle_by_value(mod)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("fp_rebound_mod", None)


def test_map_chunk_packer_writes_what_each_chunk_call_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``plain_chunk_packer`` (a load-balanced map's chunks, its data vouched for once) packs
    each chunk as ``pack_plain_call`` does (byte for byte; for chunks longer than that scans,
    the general packer's call, which unpacks the same), and declines every map whose chunks
    could need more than the standard pickler."""
    import os.path

    from ferroparallel.client import view
    from ferroparallel.client.remote_helpers import _map_chunk
    from ferroparallel.serialize import apply, pickling

    runner = pickling.Prepickled(_map_chunk)
    square = pickling.Prepickled(lambda x: x * x)
    seqs = [
        [range(5000)],
        [list(range(40)), tuple(f"s{i}" for i in range(40)), [None, True, 1.5, 2j, range(3)] * 8],
        [[1, 2, 3] * 700],  # chunks longer than pack_plain_call scans
    ]
    for f in (os.path.join, square):
        for sequences in seqs:
            pack = apply.plain_chunk_packer(runner, f, sequences)
            assert pack is not None
            n = min(len(s) for s in sequences)
            for start, stop in [(0, 1), (3, 19), (0, min(n, 2000)), (n - 1, n)]:
                parts = [view._chunk_part(s[start:stop]) for s in sequences]
                call = (runner, (f, *parts), {})
                packed = pack(parts)
                plain = apply.pack_plain_call(*call)
                if plain is not None:
                    assert packed == plain
                else:
                    assert stop - start > pickling._PLAIN_BUDGET
                g, args, kw = apply.unpack_apply_message(received(packed), {})
                ref_g, ref_args, ref_kw = apply.unpack_apply_message(
                    received(apply.pack_apply_message(*call)), {}
                )
                assert g is ref_g is _map_chunk and kw == ref_kw == {}
                assert args[1:] == ref_args[1:] == tuple(parts)
                if f is square:  # the function itself, loaded once per chunk
                    assert args[0](7) == ref_args[0](7) == 49
                else:
                    assert args[0] is ref_args[0] is f

    def declined(*args: Any) -> bool:
        return apply.plain_chunk_packer(*args) is None

    atoms = [[1, 2]]
    assert declined(runner, os.path.join, [[1, b"x"]])  # bytes: maybe out of band
    assert declined(runner, os.path.join, [[1, [2]]])  # a container: scanned per chunk
    assert declined(runner, os.path.join, [np.arange(3)])
    assert declined(runner, os.path.join, [range(3), ["a", object()]])
    big = np.zeros(100_000)
    two_frames = pickling.Prepickled(lambda: big)  # the array out of band
    assert len(two_frames.frames) == 2
    assert declined(runner, two_frames, atoms)
    assert declined(runner, len, atoms)  # not a FunctionType: pickled by value, once
    assert declined(pickling.Prepickled(os.path.join), lambda x: x, atoms)
    assert declined(os.path.join, os.path.join, atoms)  # the runner is always Prepickled
    assert not declined(runner, os.path.join, atoms)
    monkeypatch.setattr(pickling, "_pickler_name", "dill")
    assert declined(runner, os.path.join, atoms) and declined(runner, square, atoms)


def test_plain_call_shortcut_stays_off_under_dill(monkeypatch: pytest.MonkeyPatch) -> None:
    """With dill as the pickler (``use_dill``), functions and arguments go through dill, as
    everything else does: no shortcut writes the standard pickler's bytes instead."""
    import os.path

    from ferroparallel.serialize import apply, pickling

    assert apply.pack_plain_call(os.path.join, ("a",), {}) is not None
    monkeypatch.setattr(pickling, "_pickler_name", "dill")
    assert pickling._reference_pickle(os.path.join) is None
    assert pickling.plain_frames(("a", 1)) is None
    assert apply.pack_plain_call(os.path.join, ("a",), {}) is None
    assert apply.pack_plain_call(os.path.join, (), {}) is None


def test_unpacking_a_call_with_arguments_takes_the_shortcut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call of a one-frame function with arguments (a task, a map chunk) is unpacked by
    the receiver's shortcut, with what the general path gives: plain arguments as they are,
    ``Reference`` values and ``__main__`` functions resolved in the namespace."""
    import os.path

    from ferroparallel.client.remote_helpers import _map_chunk
    from ferroparallel.serialize import apply, pickling

    def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("took the general path")

    ns: dict[str, Any] = {"__name__": "__main__", "a": 5, "seen": 41}
    code = compile("def probe(x):\n    return seen + x\n", "<cell>", "exec")
    main_ns: dict[str, Any] = {"__name__": "__main__", "seen": 0}
    exec(code, main_ns)
    probe = main_ns["probe"]
    runner = pickling.Prepickled(_map_chunk)
    chunk = apply.pack_plain_call(runner, (os.path.join, ["x", "y"], ["z", "w"]), {})
    with_ref = apply.pack_apply_message(os.path.join, ("p", fs.Reference("str(a)")), {})
    by_value = apply.pack_apply_message(runner, (pickling.Prepickled(probe), [1, 2]), {})
    assert chunk is not None and len(with_ref) == len(by_value) == 3
    monkeypatch.setattr(apply, "load_object", general_path)
    f, args, kwargs = apply.unpack_apply_message(received(chunk), ns)
    assert f is _map_chunk and args == (os.path.join, ["x", "y"], ["z", "w"]) and kwargs == {}
    assert f(*args) == ["x/z", "y/w"]
    assert apply.unpack_apply_message(received(with_ref), ns) == (os.path.join, ("p", "5"), {})
    f, (g, part), kwargs = apply.unpack_apply_message(received(by_value), ns)
    assert f(g, part) == [42, 43]  # the __main__ function got the namespace as globals
    plain = apply.pack_plain_call(os.path.join, ("a",), {"k": 1})
    assert apply.unpack_apply_message(received(plain), None) == (os.path.join, ("a",), {"k": 1})
    # a malformed argument frame fails as it does on the general path
    bad = [plain[0], plain[1], pickle.dumps([1, 2], protocol=5)]
    with pytest.raises(ValueError, match="malformed apply payload"):
        apply.unpack_apply_message(bad, ns)


def test_flat_runs_of_atoms_are_plain_and_anything_else_is_checked() -> None:
    """``_is_plain`` passes a long flat list or tuple of atoms in one step (a map chunk's
    results) and still looks into one that holds anything else."""
    from ferroparallel.serialize import pickling

    square = lambda x: x * x  # noqa: E731
    assert pickling._is_plain([None] * 100, 1024)
    assert pickling._is_plain(tuple(range(50)) + ("x", 1.5, None, True), 1024)
    assert pickling._is_plain([0] * 20 + [b"x" * 10], 1024)
    assert not pickling._is_plain([0] * 20 + [b"x" * 2000], 1024)
    assert not pickling._is_plain([0] * 20 + [square], 1024)
    assert not pickling._is_plain([0] * 20 + [[[[1]]]], 1024)
    assert not pickling._is_plain([0] * 1100, 1024)  # past the scan budget


def test_unpacking_a_plain_call_relinks_main_functions_as_before() -> None:
    """The receiver's shortcut for a call without arguments leaves ``__main__`` functions to
    the general path, which gives them the engine namespace as globals."""
    from ferroparallel.serialize import apply

    ns: dict[str, Any] = {"__name__": "__main__", "seen": 41}
    code = compile("def probe():\n    return seen + 1\n", "<cell>", "exec")
    main_ns: dict[str, Any] = {"__name__": "__main__", "seen": 0}
    exec(code, main_ns)
    probe = main_ns["probe"]
    frames = apply.pack_apply_message(probe, (), {})
    f, args, kwargs = apply.unpack_apply_message(received(frames), ns)
    assert f() == 42 and args == () and kwargs == {}
    # a header of another layout (two function frames) is not taken for a plain call
    bad = [apply._HEADER.pack(apply.APPLY_MAGIC, apply.APPLY_VERSION, 0, 2), b"x", b"y"]
    with pytest.raises(ValueError, match="bad apply header"):
        apply.unpack_apply_message(bad, ns)
