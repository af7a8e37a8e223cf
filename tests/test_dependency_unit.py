"""Unit tests of ``ferroparallel.Dependency`` and the functional-dependency decorators.

No cluster is needed: these exercise the client-side objects only (set semantics, ``check`` and
``unreachable`` against finished msg_ids, the ``as_dict`` wire form, flag validation). The
scheduler's handling of the same wire form is covered by ``test_loadbalanced.py``.
"""

from __future__ import annotations

import math as _math_module
import pickle
from collections.abc import Iterable
from typing import Any

import pytest

import ferroparallel as ipp
from ferroparallel.dependency import Dependency, depend, dependent, require
from ferroparallel.error import UnmetDependency


class FakeAsyncResult:
    """Anything with ``msg_ids`` stands for an AsyncResult when building a Dependency."""

    def __init__(self, *msg_ids: str) -> None:
        self.msg_ids = list(msg_ids)


# -- construction and set semantics ----------------------------------------------------------


def test_public_names() -> None:
    assert ipp.Dependency is Dependency
    assert ipp.depend is depend
    assert ipp.dependent is dependent
    assert ipp.require is require


def test_defaults() -> None:
    d = Dependency()
    assert len(d) == 0
    assert (d.all, d.success, d.failure) == (True, True, False)


def test_is_a_set_of_msg_ids() -> None:
    d = Dependency(["a", "b", "a", "c"])
    assert isinstance(d, set)
    assert d == {"a", "b", "c"}
    assert len(d) == 3
    assert "a" in d and "z" not in d
    d.add("z")
    d.discard("a")
    assert d == {"b", "c", "z"}
    assert d | {"q"} == {"b", "c", "z", "q"}
    assert d & {"b", "nope"} == {"b"}
    assert d - {"b"} == {"c", "z"}
    assert Dependency(("x", "y")) == Dependency({"y", "x"})


def test_single_string_and_bytes_are_one_id() -> None:
    # a msg_id string is one dependency, not a sequence of characters
    assert Dependency("abc") == {"abc"}
    assert Dependency(["abc", b"def"]) == {"abc", "def"}


def test_async_results_contribute_their_msg_ids() -> None:
    one = FakeAsyncResult("m1")
    many = FakeAsyncResult("m2", "m3")
    assert Dependency(one) == {"m1"}
    assert Dependency([one, many, "m4"]) == {"m1", "m2", "m3", "m4"}


def test_nested_collections_and_dependencies() -> None:
    inner = Dependency(["a", "b"], all=False)
    d = Dependency([inner, ["c"], ("d",)])
    assert d == {"a", "b", "c", "d"}
    # the flags are the outer ones
    assert d.all is True


@pytest.mark.parametrize("bad", [1, 2.5, None, object()])
def test_other_element_types_are_rejected(bad: Any) -> None:
    with pytest.raises(TypeError):
        Dependency(["ok", bad])


def test_success_and_failure_cannot_both_be_false() -> None:
    with pytest.raises(ValueError):
        Dependency(["a"], success=False, failure=False)
    with pytest.raises(ValueError):
        Dependency([], success=False, failure=False)
    # either one alone is fine
    assert Dependency(["a"], success=False, failure=True).failure is True
    assert Dependency(["a"], success=True, failure=False).success is True


def test_unhashable_like_a_set() -> None:
    with pytest.raises(TypeError):
        hash(Dependency(["a"]))


def test_repr_names_ids_and_flags() -> None:
    r = repr(Dependency(["b", "a"], all=False, failure=True))
    assert "a" in r and "b" in r
    assert "all=False" in r and "failure=True" in r


def test_pickle_round_trip_keeps_flags() -> None:
    d = Dependency(["a", "b"], all=False, success=False, failure=True)
    back = pickle.loads(pickle.dumps(d))
    assert back == d
    assert (back.all, back.success, back.failure) == (False, False, True)


# -- check ----------------------------------------------------------------------------------


def _check(d: Dependency, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
    return d.check(set(completed), None if failed is None else set(failed))


def test_empty_dependency_is_always_met() -> None:
    assert Dependency().check(set(), set()) is True
    assert Dependency(all=False).check(set()) is True
    assert Dependency().unreachable({"x"}, {"y"}) is False


def test_check_all_success_only() -> None:
    d = Dependency(["a", "b"])
    assert not _check(d, [])
    assert not _check(d, ["a"])
    assert _check(d, ["a", "b"])
    assert _check(d, ["a", "b", "unrelated"])
    # failures do not count by default
    assert not _check(d, ["a"], ["b"])


def test_check_any_success_only() -> None:
    d = Dependency(["a", "b"], all=False)
    assert not _check(d, [])
    assert _check(d, ["a"])
    assert _check(d, ["b"], ["a"])
    assert not _check(d, ["unrelated"], ["a", "b"])


def test_check_failure_only() -> None:
    d = Dependency(["a", "b"], success=False, failure=True)
    assert not _check(d, ["a", "b"])
    assert not _check(d, [], ["a"])
    assert _check(d, [], ["a", "b"])
    assert not _check(d, ["a"], ["b"])
    # without a failed set nothing can count
    assert not _check(d, ["a", "b"], None)


def test_check_success_or_failure() -> None:
    d = Dependency(["a", "b"], success=True, failure=True)
    assert _check(d, ["a"], ["b"])
    assert not _check(d, ["a"], [])
    anyd = Dependency(["a", "b"], all=False, success=True, failure=True)
    assert _check(anyd, [], ["b"])
    assert not _check(anyd, ["c"], ["d"])


def test_check_accepts_any_iterables() -> None:
    d = Dependency(["a", "b"])
    assert d.check(["a", "b"], [])
    assert d.check(("b", "a"))
    assert d.check({"a": 1, "b": 2}.keys())


# -- unreachable -------------------------------------------------------------------------------


def test_unreachable_all_success_only() -> None:
    d = Dependency(["a", "b"])
    assert not d.unreachable(set(), set())
    assert not d.unreachable({"a"}, set())
    assert d.unreachable(set(), {"b"})
    assert d.unreachable({"a"}, {"b"})


def test_unreachable_any_success_only() -> None:
    d = Dependency(["a", "b"], all=False)
    assert not d.unreachable(set(), {"a"})
    assert d.unreachable(set(), {"a", "b"})
    assert not d.unreachable({"b"}, {"a"})


def test_unreachable_failure_only() -> None:
    d = Dependency(["a"], success=False, failure=True)
    assert d.unreachable({"a"}, set())
    assert not d.unreachable(set(), {"a"})


def test_unreachable_when_both_count_never() -> None:
    d = Dependency(["a", "b"], success=True, failure=True)
    assert not d.unreachable({"a"}, {"b"})


# -- as_dict (the wire form) --------------------------------------------------------------------


def test_as_dict_is_the_wire_form() -> None:
    d = Dependency(["b", "a"], all=False, success=True, failure=True)
    wire = d.as_dict()
    assert set(wire) == {"dependencies", "all", "success", "failure"}
    assert isinstance(wire["dependencies"], list)
    assert sorted(wire["dependencies"]) == ["a", "b"]
    assert (wire["all"], wire["success"], wire["failure"]) == (False, True, True)


def test_as_dict_defaults_and_empty() -> None:
    assert Dependency().as_dict() == {
        "dependencies": [],
        "all": True,
        "success": True,
        "failure": False,
    }


def test_as_dict_is_msgpack_and_json_friendly() -> None:
    import json

    import msgpack

    wire = Dependency(["x", "y"], all=False).as_dict()
    assert json.loads(json.dumps(wire))["all"] is False
    assert sorted(msgpack.unpackb(msgpack.packb(wire))["dependencies"]) == ["x", "y"]


def test_dependency_from_its_dict_form() -> None:
    original = Dependency(["a", "b"], all=False, success=False, failure=True)
    back = Dependency(original.as_dict())
    assert back == {"a", "b"}
    assert (back.all, back.success, back.failure) == (False, False, True)


# -- mutable flags ------------------------------------------------------------------------------


def test_flags_are_mutable_and_change_check() -> None:
    d = Dependency(["a", "b"])
    completed, failed = {"a"}, {"b"}
    assert not d.check(completed, failed)
    d.all = False
    assert d.check(completed, failed)
    assert d.as_dict()["all"] is False
    d.all = True
    d.failure = True
    assert d.check(completed, failed)
    assert d.as_dict()["failure"] is True
    d.success = False
    assert not d.check(completed, failed)
    assert d.check(set(), {"a", "b"})
    wire = d.as_dict()
    assert (wire["all"], wire["success"], wire["failure"]) == (True, False, True)
    assert sorted(wire["dependencies"]) == ["a", "b"]


def test_mutating_the_set_changes_check() -> None:
    d = Dependency(["a"])
    assert d.check({"a"})
    d.add("b")
    assert not d.check({"a"})
    d.remove("b")
    assert d.check({"a"})
    d.clear()
    assert d.check(set())


# -- functional dependencies (client side) ------------------------------------------------------


def test_depend_builds_a_dependent_that_keeps_the_name() -> None:
    def cond(flag: bool) -> bool:
        return flag

    @depend(cond, True)
    def add(a: int, b: int) -> int:
        """adds"""
        return a + b

    assert isinstance(add, dependent)
    assert add.__name__ == "add"
    assert add(2, 3) == 5


def test_condition_is_checked_on_the_engine_not_by_a_local_call() -> None:
    # as in ipyparallel: calling a dependent runs it; the engine checks the condition
    def cond(flag: Any) -> Any:
        return flag

    @depend(cond, False)
    def f() -> int:
        return 1

    assert f() == 1
    with pytest.raises(UnmetDependency):
        f.check_dependency()
    # only False is unmet: other falsy values are not
    for value in (None, 0, "", True):
        dependent(f, cond, value).check_dependency()


def test_condition_checked_when_unpacked_into_a_namespace() -> None:
    from ferroparallel.serialize import load_object, serialize_object

    @depend(bool, False)
    def f() -> int:
        return 1

    frames = serialize_object([f])
    assert load_object(frames)[0]() == 1  # no namespace: not on an engine
    with pytest.raises(UnmetDependency):
        load_object(frames, {})


def test_depend_is_a_decorator_class() -> None:
    deco = depend(bool, 1, k=2)
    assert isinstance(deco, depend)
    assert (deco.f, deco.args, deco.kwargs) == (bool, (1,), {"k": 2})
    assert dependent(len, bool).__name__ == "len"


def test_require_missing_module_local_call_runs() -> None:
    @require("ferroparallel_no_such_module_xyz")
    def f() -> int:
        return 1

    assert f() == 1
    with pytest.raises(UnmetDependency, match="ferroparallel_no_such_module_xyz"):
        f.check_dependency()


def test_dependent_is_picklable_by_value() -> None:
    import cloudpickle

    def cond(x: int, *, y: int) -> bool:
        return x < y

    @depend(cond, 1, y=2)
    def f(v: int) -> int:
        return v * 3

    g = pickle.loads(cloudpickle.dumps(f))
    assert g(4) == 12


def test_require_accepts_names_modules_and_functions() -> None:
    def helper() -> int:
        return 7

    @require("math", _math_module, helper)
    def f() -> str:
        return "ran"

    assert isinstance(f, dependent)
    assert f.__name__ == "f"


@pytest.mark.parametrize("bad", [3, 1.5, None])
def test_require_rejects_other_objects(bad: Any) -> None:
    with pytest.raises(TypeError):
        require(bad)
