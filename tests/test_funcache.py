"""The pickle of a ``__main__`` function is made once and reused only while it would be the
same bytes (``ferroparallel.serialize.funcache``): each test changes one thing the pickle is
made from and checks that the next call pickles again, with the new state."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ferroparallel as ipp
from ferroparallel.serialize import funcache, funcload, pickling
from ferroparallel.serialize.apply import (
    pack_apply_message,
    pack_plain_call,
    unpack_apply_message,
)

pytest_plugins = ("cluster_fixtures",)


#: The full serialization, uncounted (the fixture below counts the cache's calls of it).
_FULL = pickling._full_frames


@pytest.fixture
def made() -> Iterator[list[str]]:
    """The names of the functions pickled in full (cache misses) during the test."""
    calls: list[str] = []
    full = pickling._full_frames

    def counting(f: Any) -> list[Any]:
        calls.append(f.__name__)
        return full(f)

    pickling._full_frames = counting
    funcache.clear()
    try:
        yield calls
    finally:
        pickling._full_frames = full
        funcache.clear()


def _main(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` as if typed at the prompt (its globals stay this module's)."""
    f.__module__ = "__main__"
    return f


def _fresh(f: Any) -> bytes:
    """What an uncached serialization writes for ``f`` now."""
    return _FULL(f)[0]


def _sent(f: Any) -> bytes:
    """The function frame of a call of ``f`` as sent (cached or not)."""
    frames = pack_plain_call(f, (), {}) or pack_apply_message(f)
    return frames[1]


@_main
def helper(x: int) -> int:
    return x + 1


SCALE = 3


@_main
def uses_helper(x: int = 2) -> int:
    return helper(x) * SCALE


def test_the_second_call_reuses_the_pickle_and_it_is_the_same_bytes(made: list[str]) -> None:
    first = _sent(uses_helper)
    assert _sent(uses_helper) == first == _fresh(uses_helper)
    assert made == ["uses_helper"]


def test_data_the_function_names_is_not_part_of_its_pickle(made: list[str]) -> None:
    global SCALE
    first = _sent(uses_helper)
    old, SCALE = SCALE, 40  # data: looked up on the engine, never sent with the function
    try:
        assert _sent(uses_helper) == first
        assert made == ["uses_helper"]
    finally:
        SCALE = old


def test_a_redefined_helper_is_sent_anew(made: list[str]) -> None:
    global helper
    _sent(uses_helper)
    old = helper

    @_main
    def helper(x: int) -> int:  # noqa: F811 - redefined, as in a new notebook cell
        return x - 1

    try:
        data = _sent(uses_helper)
        assert made == ["uses_helper", "uses_helper"]
        assert data == _fresh(uses_helper)
        ns: dict[str, Any] = {"SCALE": 1}
        f, _, _ = unpack_apply_message(pack_plain_call(uses_helper, (), {}), ns)
        assert f(5) == 4  # the new helper
    finally:
        helper = old


def test_changed_defaults_code_or_name_are_sent_anew(made: list[str]) -> None:
    @_main
    def f(x: int = 1) -> int:
        return x

    _sent(f)
    f.__defaults__ = (2,)
    assert _sent(f) == _fresh(f)
    f.__code__ = (lambda x=0: -x).__code__
    assert _sent(f) == _fresh(f)
    f.__doc__ = "now documented"
    assert _sent(f) == _fresh(f)
    f.__kwdefaults__ = None
    _sent(f)
    assert made == ["f"] * 4


def test_a_nested_helpers_change_is_seen_through_its_caller(made: list[str]) -> None:
    _sent(uses_helper)
    helper.__defaults__ = (10,)  # (helper takes none: any change to it counts)
    try:
        assert _sent(uses_helper) == _fresh(uses_helper)
        assert made == ["uses_helper", "uses_helper"]
    finally:
        helper.__defaults__ = None


def test_a_closure_cell_that_changes_is_sent_anew(made: list[str]) -> None:
    def outer() -> tuple[Callable[[], int], Callable[[int], None]]:
        n = 1

        def get() -> int:
            return n

        def put(v: int) -> None:
            nonlocal n
            n = v

        return _main(get), put

    get, put = outer()
    ns: dict[str, Any] = {}
    assert unpack_apply_message(pack_plain_call(get, (), {}), ns)[0]() == 1
    put(7)
    assert unpack_apply_message(pack_plain_call(get, (), {}), ns)[0]() == 7
    assert made == ["get", "get"]


def test_a_name_that_becomes_a_function_is_sent_anew(made: list[str]) -> None:
    @_main
    def f() -> Any:
        return later()  # noqa: F821 - defined after the first call

    _sent(f)
    _sent(f)
    globals()["later"] = _main(lambda: 5)
    try:
        assert b"later" in _sent(f) and _sent(f) == _fresh(f)
        assert made == ["f", "f"]
    finally:
        del globals()["later"]


@pytest.mark.parametrize(
    "change",
    [
        lambda f: setattr(f, "__defaults__", ([],)),  # a mutable default
        lambda f: setattr(f, "tag", 1),  # an attribute (pickled with the function)
        lambda f: setattr(f, "__qualname__", "Cls.method"),  # a method keeps its data
    ],
    ids=["mutable-default", "attribute", "method"],
)
def test_what_can_change_in_place_is_never_cached(
    made: list[str], change: Callable[[Any], None]
) -> None:
    @_main
    def f(x: Any = None) -> Any:
        return x

    change(f)
    assert pickling._function_pickle(f) is None  # (pickled in full on every call)
    assert _sent(f) == _fresh(f)
    assert made == [] and f not in funcache._CACHE


class Local:
    pass


def test_a_function_naming_a_main_class_is_never_cached(made: list[str]) -> None:
    Local.__module__ = "__main__"  # a class typed at the prompt travels by value
    try:

        @_main
        def f() -> Any:
            return Local

        assert pickling._function_pickle(f) is None
        before = _sent(f)
        Local.attr = 1  # changes its pickle in place
        assert _sent(f) == _fresh(f) != before
        assert made == []
    finally:
        Local.__module__ = __name__


def test_a_new_import_makes_it_pickle_again(made: list[str]) -> None:
    _sent(uses_helper)
    name = "_fp_funcache_probe"
    sys.modules[name] = types.ModuleType(name)  # (cloudpickle records imported submodules)
    try:
        _sent(uses_helper)
        assert made == ["uses_helper", "uses_helper"]
    finally:
        del sys.modules[name]


def test_other_picklers_never_use_the_cache(made: list[str]) -> None:
    _sent(uses_helper)
    ipp.use_cloudpickle()  # (data captured by value: the conftest fixture switches back)
    assert pickling._function_pickle(uses_helper) is None
    ipp.use_pickle()
    _sent(uses_helper)
    assert made == ["uses_helper", "uses_helper"]  # the switch forgot the cache


def test_an_entry_goes_with_its_function(made: list[str]) -> None:
    @_main
    def f() -> None:
        return None

    _sent(f)
    assert len(funcache._CACHE) == 1
    del f
    assert len(funcache._CACHE) == 0


def test_engines_run_what_the_client_holds_now(dv: ipp.DirectView) -> None:
    """Through a real cluster: the same function sent twice runs the helper of the moment."""
    global helper
    old = helper
    dv.push({"SCALE": 2})
    assert dv.apply_sync(uses_helper, 1) == [4, 4]
    assert dv.apply_sync(uses_helper, 1) == [4, 4]

    @_main
    def helper(x: int) -> int:  # noqa: F811 - a new cell redefines the helper
        return x * 10

    try:
        assert dv.apply_sync(uses_helper, 1) == [20, 20]
        uses_helper.__defaults__ = (5,)
        assert dv.apply_sync(uses_helper) == [100, 100]
    finally:
        helper = old
        uses_helper.__defaults__ = (2,)


def _received(f: Any, ns: dict[str, Any]) -> Any:
    """``f`` as an engine with namespace ``ns`` gets it from a plain call."""
    frames = pack_plain_call(f, (), {}) or pack_apply_message(f)
    return unpack_apply_message(frames, ns)[0]


def test_an_engine_unpickles_a_repeated_function_once_and_relinks_it_per_call() -> None:
    funcload._TEMPLATES.clear()
    ns: dict[str, Any] = {"SCALE": 1}
    first = _received(uses_helper, ns)
    assert len(funcload._TEMPLATES) == 1
    template = next(iter(funcload._TEMPLATES.values()))
    second = _received(uses_helper, ns)
    assert next(iter(funcload._TEMPLATES.values())) is template
    assert first is not second and first.__globals__ is second.__globals__ is ns
    first.tag = 1  # what a call does to its function stays with that call
    assert not hasattr(second, "tag") and not template.__dict__
    assert second(1) == 2 and ns["helper"](1) == 2  # (the helper it brought is in ns)


def test_an_engine_never_reuses_what_a_call_could_change() -> None:
    def outer() -> Callable[[], int]:
        n = 0

        def count() -> int:
            nonlocal n
            n += 1
            return n

        return _main(count)

    @_main
    def collect(x: int, acc: Any = []) -> Any:  # noqa: B006 - the point of the test
        acc.append(x)
        return acc

    funcload._TEMPLATES.clear()
    ns: dict[str, Any] = {}
    count = outer()
    assert [_received(count, ns)() for _ in range(2)] == [1, 1]  # fresh cells per call
    call = pack_apply_message(collect, (5,))
    assert [unpack_apply_message(call, ns)[0](5) for _ in range(2)] == [[5], [5]]
    ipp.use_cloudpickle()  # (keeps its own globals: never a template)
    _received(uses_helper, ns)
    assert not funcload._TEMPLATES
