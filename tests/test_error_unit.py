"""Unit tests of the remote-error classes and helpers in ferroparallel.error."""

from __future__ import annotations

import pickle

import pytest

from ferroparallel import error
from ferroparallel.error import (
    CompositeError,
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    KernelError,
    NoEnginesRegistered,
    RemoteError,
    TaskAborted,
    TaskTimeout,
    UnmetDependency,
    collect_exceptions,
    unwrap_exception,
    wrap_exception,
)

INFO0 = {"engine_uuid": "u-0", "engine_id": 0, "method": "apply"}
INFO3 = {"engine_uuid": "u-3", "engine_id": 3, "method": "execute"}


def zde(info: dict | None = INFO0) -> RemoteError:
    return RemoteError(
        "ZeroDivisionError",
        "division by zero",
        ["Traceback (most recent call last):", '  File "<x>", line 1', "ZeroDivisionError: x"],
        info,
    )


# -- RemoteError -----------------------------------------------------------------------------


def test_remote_error_fields_and_forms() -> None:
    e = zde()
    assert isinstance(e, KernelError)
    assert e.ename == "ZeroDivisionError"
    assert e.evalue == "division by zero"
    assert e.engine_info == INFO0
    assert e.traceback == (
        'Traceback (most recent call last):\n  File "<x>", line 1\nZeroDivisionError: x'
    )
    # ipyparallel's forms
    assert str(e) == "[0:apply] ZeroDivisionError: division by zero"
    assert repr(e) == "<RemoteError[0]:ZeroDivisionError(division by zero)>"


def test_remote_error_without_engine_info() -> None:
    e = RemoteError("ValueError", "bad")
    assert str(e) == "[Engine Exception] ValueError: bad"
    assert repr(e) == "<RemoteError[ ]:ValueError(bad)>"
    assert e.traceback == ""
    assert e.engine_info == {}
    assert e.render_traceback() == ["[Engine Exception]", "ValueError: bad"]


def test_remote_error_traceback_string_kept() -> None:
    e = RemoteError("KeyError", "'a'", "line1\nline2", INFO3)
    assert e.traceback == "line1\nline2"
    assert str(e) == "[3:execute] KeyError: 'a'"
    assert e.render_traceback() == ["[3:execute]", "line1", "line2"]
    assert e._render_traceback_() == ["[3:execute]", "line1", "line2"]


def test_remote_error_print_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    zde().print_traceback()
    out = capsys.readouterr().out
    assert out.startswith("[0:apply]\nTraceback (most recent call last):")
    assert "ZeroDivisionError: x" in out
    # as ipyparallel's, it takes (and ignores) an index, like CompositeError.print_traceback
    zde().print_traceback(1)
    assert capsys.readouterr().out == out


def test_remote_error_pickles() -> None:
    e = zde()
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is RemoteError
    assert (e2.ename, e2.evalue, e2.traceback, e2.engine_info) == (
        e.ename,
        e.evalue,
        e.traceback,
        e.engine_info,
    )


def test_remote_error_raisable_and_catchable() -> None:
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        raise zde()


# -- unwrap_exception / wrap_exception --------------------------------------------------------


@pytest.mark.parametrize(
    ("ename", "bases"),
    [
        ("EngineError", (EngineError,)),
        ("TaskTimeout", (TaskTimeout, DependencyTimeout, ImpossibleDependency)),
        ("TaskAborted", (TaskAborted,)),
        ("ImpossibleDependency", (ImpossibleDependency, UnmetDependency)),
        ("InvalidDependency", (InvalidDependency, ImpossibleDependency)),
        ("UnmetDependency", (UnmetDependency,)),
        ("NoEnginesRegistered", (NoEnginesRegistered,)),
        ("DependencyTimeout", (DependencyTimeout,)),
    ],
)
def test_unwrap_typed(ename: str, bases: tuple[type, ...]) -> None:
    content = {"ename": ename, "evalue": "boom", "traceback": ["a", "b"], "engine_info": INFO0}
    e = unwrap_exception(content)
    assert isinstance(e, RemoteError)
    for base in bases:
        assert isinstance(e, base)
    assert e.ename == ename
    assert e.evalue == "boom"
    assert e.traceback == "a\nb"
    assert str(e) == f"[0:apply] {ename}: boom"
    # the dynamic class is cached
    assert type(unwrap_exception(content)) is type(e)
    # and catchable by either name
    with pytest.raises(bases[0]):
        raise e
    with pytest.raises(RemoteError):
        raise e


def test_unwrap_typed_pickles() -> None:
    e = unwrap_exception({"ename": "EngineError", "evalue": "died", "traceback": []})
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is type(e)
    assert isinstance(e2, EngineError)
    assert str(e2) == "[Engine Exception] EngineError: died"


def test_traceback_entries_join_as_ipyparallel() -> None:
    """IPython's frame entries end with a newline: joined, they leave a blank line."""
    e = unwrap_exception({"ename": "E", "evalue": "x", "traceback": ["frame\n", "E: x"]})
    assert e.traceback == "frame\n\nE: x"
    assert e.render_traceback()[1:] == ["frame", "", "E: x"]


def test_unwrap_untyped_is_plain_remote_error() -> None:
    e = unwrap_exception({"ename": "ZeroDivisionError", "evalue": "division by zero"})
    assert type(e) is RemoteError
    assert not isinstance(e, ZeroDivisionError)
    assert str(e) == "[Engine Exception] ZeroDivisionError: division by zero"
    # missing fields are tolerated
    assert type(unwrap_exception({})) is RemoteError


def test_wrap_exception_current() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        content = wrap_exception(INFO0)
    assert content["status"] == "error"
    assert content["ename"] == "ZeroDivisionError"
    assert content["evalue"] == "division by zero"
    assert content["engine_info"] == INFO0
    assert isinstance(content["traceback"], list)
    assert all(isinstance(line, str) and "\n" not in line for line in content["traceback"])
    assert content["traceback"][0].startswith("Traceback")
    assert content["traceback"][-1] == "ZeroDivisionError: division by zero"
    e = unwrap_exception(content)
    assert str(e) == "[0:apply] ZeroDivisionError: division by zero"
    assert "1 / 0" in e.traceback


def test_wrap_exception_explicit_and_no_exception() -> None:
    content = wrap_exception(exc=KeyError("k"))
    assert content["ename"] == "KeyError"
    assert content["engine_info"] == {}
    with pytest.raises(ValueError):
        wrap_exception()


def test_wrap_remote_error_forwards_identity() -> None:
    try:
        raise zde()
    except RemoteError:
        content = wrap_exception(INFO3)
    assert content["ename"] == "ZeroDivisionError"
    assert content["evalue"] == "division by zero"
    assert content["traceback"][-1] == "ZeroDivisionError: x"


# -- CompositeError ---------------------------------------------------------------------------


def composite() -> CompositeError:
    return CompositeError(
        "one or more exceptions raised in: f",
        [
            ("ZeroDivisionError", "division by zero", "tb0\nZeroDivisionError", INFO0),
            ("EngineError", "engine 3 died", ["tb3"], INFO3),
        ],
    )


def test_composite_fields_and_str() -> None:
    c = composite()
    assert isinstance(c, RemoteError)
    assert isinstance(c, KernelError)
    assert c.msg == "one or more exceptions raised in: f"
    assert c.elist == [
        ("ZeroDivisionError", "division by zero", "tb0\nZeroDivisionError", INFO0),
        ("EngineError", "engine 3 died", "tb3", INFO3),
    ]
    # ipyparallel's forms (no space between the label and the name)
    assert str(c).splitlines() == [
        "one or more exceptions raised in: f",
        "[0:apply]ZeroDivisionError: division by zero",
        "[3:execute]EngineError: engine 3 died",
    ]
    assert repr(c) == "CompositeError(2)"


def test_composite_raise_exception() -> None:
    c = composite()
    with pytest.raises(RemoteError) as info:
        c.raise_exception()
    assert info.value.ename == "ZeroDivisionError"
    assert info.value.engine_info == INFO0
    with pytest.raises(EngineError) as info2:
        c.raise_exception(1)
    assert isinstance(info2.value, RemoteError)
    assert str(info2.value) == "[3:execute] EngineError: engine 3 died"
    with pytest.raises(IndexError, match="index 2 does not exist"):
        c.raise_exception(2)


def test_composite_render_and_print(capsys: pytest.CaptureFixture[str]) -> None:
    c = composite()
    assert c.render_traceback(0) == ["[0:apply]:", "tb0", "ZeroDivisionError"]
    lines = c.render_traceback()
    assert lines == ["[0:apply]:", "tb0", "ZeroDivisionError", "", "[3:execute]:", "tb3", ""]
    c.print_traceback(1)
    out = capsys.readouterr().out
    assert out.splitlines() == ["[3:execute]:", "tb3"]
    c.print_traceback()
    assert "tb0" in capsys.readouterr().out


def test_composite_tb_limit() -> None:
    elist = [("ValueError", str(i), f"tb{i}", {"engine_id": i, "method": "a"}) for i in range(7)]
    c = CompositeError("m", elist)
    lines = c.render_traceback()
    assert "tb3" in lines and "tb4" not in lines
    assert lines[-1] == "... 3 more exceptions ..."
    # str lists the first tb_limit errors, then how many more
    assert str(c).splitlines()[1:] == [
        "[0:a]ValueError: 0",
        "[1:a]ValueError: 1",
        "[2:a]ValueError: 2",
        "[3:a]ValueError: 3",
        ".... 3 more exceptions ...",
    ]


def test_composite_flattens_nested_and_accepts_exceptions() -> None:
    inner = composite()
    c = CompositeError("outer", [inner, zde(INFO3), TaskAborted("t")])
    assert [e[0] for e in c.elist] == [
        "ZeroDivisionError",
        "EngineError",
        "ZeroDivisionError",
        "TaskAborted",
    ]
    assert c.elist[2][3] == INFO3


def test_composite_pickles() -> None:
    c = composite()
    c2 = pickle.loads(pickle.dumps(c))
    assert type(c2) is CompositeError
    assert c2.elist == c.elist
    assert str(c2) == str(c)


def test_already_displayed_error() -> None:
    a = error.AlreadyDisplayedError(composite())
    assert isinstance(a, RemoteError)
    assert str(a) == "2 errors"
    assert repr(a) == "<AlreadyDisplayedError(2 errors)>"
    assert a.render_traceback() == ["2 errors"]


# -- collect_exceptions -----------------------------------------------------------------------


def test_collect_no_errors_returns_input() -> None:
    values = [1, "a", ValueError("plain exceptions are values")]
    assert collect_exceptions(values, "f") is values
    d = {0: 1, 1: 2}
    assert collect_exceptions(d, "f") is d


def test_collect_raises_composite() -> None:
    with pytest.raises(CompositeError) as info:
        collect_exceptions([1, zde(), 3, zde(INFO3)], "myfunc")
    c = info.value
    assert c.msg == "one or more exceptions raised in: myfunc"
    assert [e[3] for e in c.elist] == [INFO0, INFO3]


def test_collect_dict_and_nested() -> None:
    with pytest.raises(CompositeError) as info:
        collect_exceptions({0: composite(), 1: 5})
    assert len(info.value.elist) == 2
    assert "unspecified" in info.value.msg


def test_collect_includes_task_aborted() -> None:
    # unlike ipyparallel (quirk), aborted tasks are errors, not values
    with pytest.raises(CompositeError) as info:
        collect_exceptions([1, TaskAborted("msg-1 aborted")], "f")
    assert info.value.elist[0][:2] == ("TaskAborted", "msg-1 aborted")
    with pytest.raises(TaskAborted):
        info.value.raise_exception(0)


def test_exports_and_existing_hierarchy() -> None:
    for name in (
        "RemoteError",
        "CompositeError",
        "AlreadyDisplayedError",
        "wrap_exception",
        "unwrap_exception",
        "collect_exceptions",
    ):
        assert name in error.__all__
        assert hasattr(error, name)
    assert error.TimeoutError is TimeoutError
    assert issubclass(TaskTimeout, DependencyTimeout)
    assert issubclass(RemoteError, KernelError)
    assert issubclass(CompositeError, RemoteError)
