"""The IPython parallel magics (%px, %%px, %pxresult, %pxconfig, %autopx) on a real cluster, in
a real IPython InteractiveShell."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("IPython", reason="the magics need IPython (pip install ferroparallel[magics])")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import ferroparallel as ipp
from ferroparallel import error
from ferroparallel.client import Client
from ferroparallel.cluster import Cluster

pytest_plugins = ("cluster_fixtures",)


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    """A fresh IPython shell, gone after the test (so other tests see no IPython)."""
    shell = InteractiveShell.instance()
    try:
        yield shell
    finally:
        InteractiveShell.clear_instance()


@pytest.fixture
def magics(ip: InteractiveShell, rc: Client) -> Any:
    view = rc.activate()
    assert view.block is True and view.targets == "all"
    return ip


def test_px_runs_on_every_engine_and_shows_output(magics: Any, rc: Client, capsys) -> None:
    magics.run_line_magic("px", "a = 5")
    assert rc[:].pull("a", block=True) == [5, 5]
    magics.run_line_magic("px", "print(a * 2)")
    out = capsys.readouterr().out
    # ipyparallel's form: the label on its own line, then the text as printed
    assert "[stdout:0] \n10\n" in out and "[stdout:1] \n10\n" in out
    magics.run_line_magic("px", "--targets 1 a + 1")
    out = capsys.readouterr().out
    assert "Out[1:" in out and "]: 6" in out and "Out[0:" not in out
    magics.run_line_magic("px", "--no-stream a * 3")
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("Out[")] == [
        line for line in out.splitlines() if "]: 15" in line
    ]
    assert out.count("]: 15") == 2


def test_cell_px_with_options_and_local(magics: Any, rc: Client, capsys) -> None:
    magics.run_cell_magic("px", "--targets [0, 1] --group-outputs engine", "x = 7\nprint('x', x)")
    out = capsys.readouterr().out
    assert out.count("x 7") == 2
    magics.run_cell_magic("px", "--local --targets 0", "y = 11")
    assert magics.user_ns["y"] == 11
    assert rc[0].pull("y", block=True) == 11
    with pytest.raises(UsageError, match="goes in the cell"):
        magics.run_cell_magic("px", "--targets 0 print(1)", "pass")


def test_noblock_out_and_pxresult(magics: Any, capsys) -> None:
    ar = magics.run_line_magic("px", "--noblock -o saved 40 + 2")
    assert isinstance(ar, ipp.AsyncResult)
    assert magics.user_ns["saved"] is ar
    magics.run_line_magic("pxresult", "")
    out = capsys.readouterr().out
    assert out.count("42") == 2


def test_px_results_are_named_after_the_magic(magics: Any, capsys) -> None:
    # as ipyparallel: the AsyncResult of %px / %%px is called "%px" (repr, errors)
    ar = magics.run_line_magic("px", "--noblock 40 + 2")
    assert len(ar.get(timeout=30)) == 2
    assert repr(ar).startswith("<AsyncResult(%px): ")
    cell = magics.run_cell_magic("px", "--noblock", "1 / 0")
    with pytest.raises(error.CompositeError, match="raised in: %px"):
        cell.get(timeout=30)
    capsys.readouterr()


def test_errors_are_raised_with_the_remote_traceback(magics: Any, capsys) -> None:
    # streamed: the tracebacks are shown as they come, then a short AlreadyDisplayedError
    with pytest.raises(error.AlreadyDisplayedError) as shown:
        magics.run_line_magic("px", "1 / 0")
    assert str(shown.value) == "2 errors"
    err = capsys.readouterr().err
    assert "[0:execute]" in err and "[1:execute]" in err and "ZeroDivisionError" in err
    original = shown.value.original_error
    assert [e[0] for e in original.elist] == ["ZeroDivisionError"] * 2
    # not streamed: the CompositeError itself
    with pytest.raises(error.CompositeError) as info:
        magics.run_line_magic("px", "--no-stream 1 / 0")
    assert [e[0] for e in info.value.elist] == ["ZeroDivisionError"] * 2
    with pytest.raises(error.RemoteError, match="ZeroDivisionError"):
        magics.run_line_magic("px", "--targets 0 1 / 0")


def test_pxconfig_sets_defaults(magics: Any, capsys) -> None:
    magics.run_line_magic("pxconfig", "--targets 1 --verbose")
    magics.run_line_magic("px", "'done'")
    out = capsys.readouterr().out
    assert "Parallel execution on engine(s): 1" in out and "Out[1:" in out
    magics.run_line_magic("pxconfig", "--noblock --no-verbose")
    ar = magics.run_line_magic("px", "'later'")
    assert isinstance(ar, ipp.AsyncResult) and ar.wait(30) and ar.successful()
    with pytest.raises(UsageError):
        magics.run_line_magic("pxconfig", "--bogus")


def test_autopx_sends_every_cell_to_the_engines(magics: Any, rc: Client, capsys) -> None:
    magics.run_cell("%autopx")
    magics.run_cell("z = 3 * 4")
    magics.run_cell("print('z is', z)")
    magics.run_cell("%autopx")
    out = capsys.readouterr().out
    assert "enabled" in out and "disabled" in out and out.count("z is 12") == 2
    assert "z" not in magics.user_ns
    assert rc[:].pull("z", block=True) == [12, 12]
    magics.run_cell("local_only = 1")
    assert magics.user_ns["local_only"] == 1


def test_suffix_and_auto_activation(ip: InteractiveShell, shared_cluster: Cluster, capsys) -> None:
    # a Client created inside IPython activates a blocking view of all engines
    with Client() as rc2:
        ip.run_line_magic("px", "w = 1")
        assert rc2[:].pull("w", block=True) == [1, 1]
        rc2.activate(targets=[0], suffix="0")
        ip.run_line_magic("px0", "print('only zero')")
        out = capsys.readouterr().out
        assert "[stdout:0] \nonly zero" in out and "[stdout:1]" not in out


def test_view_activate_returns_none_inside_ipython(ip: InteractiveShell, rc: Client) -> None:
    """As ipyparallel: a notebook cell ending in ``rc[:].activate()`` shows nothing, and the
    magics then follow that view's (non-blocking) flags."""
    assert rc[:].activate() is None
    ar = ip.run_line_magic("px", "d = 4")
    assert ar.get(timeout=30) is not None
    assert rc[:].pull("d", block=True) == [4, 4]


def test_activate_outside_ipython_warns(rc: Client) -> None:
    InteractiveShell.clear_instance()
    with pytest.warns(UserWarning, match="IPython session"):  # ipyparallel's category
        assert rc[:].activate() is None


def test_bare_px_runs_nothing_quietly(magics: Any, capsys) -> None:
    """As ipyparallel's: a bare ``%px`` runs the empty cell on the engines (no error); options
    without code are still refused."""
    res = magics.run_cell("%px")
    assert res.success, res.error_in_exec
    assert capsys.readouterr().out == ""
    with pytest.raises(UsageError, match="needs code"):
        magics.run_line_magic("px", "--targets 0")
