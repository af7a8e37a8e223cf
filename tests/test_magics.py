"""The IPython parallel magics (%px, %%px, %pxresult, %pxconfig, %autopx) on a real cluster, in
a real IPython InteractiveShell."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
import warnings
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


def test_ipp_noninteractive_turns_streaming_off(
    ip: InteractiveShell, rc: Client, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # $IPP_NONINTERACTIVE (read at import, as ipyparallel's ipp._NONINTERACTIVE): %px waits
    # and shows each engine's output whole, in engine order
    monkeypatch.setattr(ipp, "_NONINTERACTIVE", True)
    rc.activate(suffix="_ni")
    assert _magics_of(ip, "px_ni").stream_output is False
    ip.run_cell_magic("px_ni", "", "import time\nprint('a')\ntime.sleep(0.1)\nprint('b')")
    out = capsys.readouterr().out
    assert out.index("[stdout:0]") < out.index("[stdout:1]")
    # (as ipyparallel prints several lines: the prefix on a line of its own)
    assert "[stdout:0] \na\nb\n" in out and "[stdout:1] \na\nb\n" in out, out
    monkeypatch.setattr(ipp, "_NONINTERACTIVE", False)
    rc.activate(suffix="_int")
    assert _magics_of(ip, "px_int").stream_output is True


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


def test_autopx_keeps_the_shell_s_history_and_syntax_checks(
    magics: Any, rc: Client, capsys
) -> None:
    """As ipyparallel's %autopx: the shell still takes each cell in (raw cell in history, a
    syntax error reported locally, nothing sent), a failing cell shows its error and the
    cell counts as run; %autopx again turns it off."""
    magics.run_cell("%autopx", store_history=True)
    assert capsys.readouterr().out.strip() == "%autopx enabled"
    sent = len(rc.history)
    res = magics.run_cell("w = (1,", store_history=True)  # a SyntaxError: nothing sent
    assert not res.success and isinstance(res.error_before_exec, SyntaxError)
    assert len(rc.history) == sent
    magics.run_cell("w = 6 * 7", store_history=True)
    assert len(rc.history) == sent + len(rc.ids)  # (one message per engine)
    assert "w = 6 * 7" in magics.history_manager.input_hist_raw[-1]
    res = magics.run_cell("1 / 0", store_history=True)
    out = capsys.readouterr()
    assert "ZeroDivisionError" in out.out + out.err
    magics.run_cell("%autopx", store_history=True)
    assert "%autopx disabled" in capsys.readouterr().out
    assert rc[:].pull("w", block=True) == [42, 42]
    assert "w" not in magics.user_ns
    magics.run_cell("w_local = 1")
    assert magics.user_ns["w_local"] == 1


def test_autopx_runs_a_cell_with_top_level_await_as_ipykernel_submits_it(
    magics: Any, rc: Client
) -> None:
    # ipykernel calls run_cell_async itself for a cell with top-level await
    magics.run_cell("%autopx")
    try:
        magics.run_cell("await_counter = globals().get('await_counter', 0) + 1")
        cell = "import asyncio\nawait asyncio.sleep(0)\nb_marker = 2"
        done = magics.transform_cell(cell)  # (as ipykernel does, before both calls)
        assert magics.should_run_async(cell, transformed_cell=done, preprocessing_exc_tuple=None)
        asyncio.run(
            magics.run_cell_async(
                cell, store_history=True, transformed_cell=done, preprocessing_exc_tuple=None
            )
        )
    finally:
        magics.run_cell("%autopx")
    # that cell ran on the engines, and the one before it only once
    assert rc[:].pull("b_marker", block=True) == [2, 2]
    assert rc[:].pull("await_counter", block=True) == [1, 1]
    rc[:].execute("del b_marker, await_counter", block=True)


def test_suffix_and_auto_activation(ip: InteractiveShell, shared_cluster: Cluster, capsys) -> None:
    # a Client created inside IPython activates a blocking view of all engines
    with Client() as rc2:
        ip.run_line_magic("px", "w = 1")
        assert rc2[:].pull("w", block=True) == [1, 1]
        rc2.activate(targets=[0], suffix="0")
        ip.run_line_magic("px0", "print('only zero')")
        out = capsys.readouterr().out
        assert "[stdout:0] \nonly zero" in out and "[stdout:1]" not in out


def test_a_new_client_keeps_the_view_the_user_activated(magics: Any, rc: Client, capsys) -> None:
    """As ipyparallel's (only the first Client in IPython activates): creating another Client
    leaves %px on the view the user activated, even once that view's client is closed."""
    rc.activate(targets=[0])
    with Client():
        magics.run_line_magic("px", "print('who')")
        out = capsys.readouterr().out
        assert "[stdout:0] \nwho" in out and "[stdout:1]" not in out
    other = Client()
    other.activate(targets=[1])
    other.close()
    with Client() as rc3:
        assert _magics_of(magics).view.client is other
        rc3.activate()
        magics.run_line_magic("px", "print('all')")
        out = capsys.readouterr().out
        assert "[stdout:0] \nall" in out and "[stdout:1] \nall" in out
        assert _magics_of(magics).view.client is rc3


@pytest.mark.parametrize("asynchronous", [False, True])
def test_start_and_connect_activates_only_when_asked(
    ip: InteractiveShell, fp_session_root: Any, asynchronous: bool
) -> None:
    """``start_and_connect(activate=False)`` leaves %px on the view already active (here a
    closed first client's, as ipyparallel's test_start_and_connect_activate); ``activate=True``
    moves it to the new client."""
    with Client() as first:
        assert _magics_of(ip).view.client is first
    for activate in (False, True):
        cluster = Cluster(n=1, cluster_id=f"activate-{activate}-{asynchronous}")
        try:
            if asynchronous:
                new = asyncio.run(cluster.start_and_connect(activate=activate))
            else:
                new = cluster.start_and_connect_sync(activate=activate)
            with new:
                owner = _magics_of(ip).view.client
                assert (owner is new) is activate
                assert (owner is first) is not activate
        finally:
            cluster.stop_cluster_sync()


def test_suffix_applies_to_every_magic_and_legacy_result_has_none(
    ip: InteractiveShell, rc: Client, capsys
) -> None:
    """The docs' "Multiple Active Views": ``view.activate('_even')`` adds %px_even, %%px_even,
    %pxresult_even, %pxconfig_even and %autopx_even next to the unsuffixed magics; the legacy
    ``%result`` alias of %pxresult exists only unsuffixed (as ipyparallel's)."""
    rc.activate()
    even = rc[::2]
    even.block = True  # (a new view does not block; the magics follow its flags)
    assert even.activate("_even") is None
    for name in ("px_even", "pxresult_even", "pxconfig_even", "autopx_even", "result"):
        assert ip.find_line_magic(name) is not None, name
    assert ip.find_cell_magic("px_even") is not None
    assert ip.find_line_magic("result_even") is None
    ip.run_line_magic("px", "print('hi all')")
    ip.run_line_magic("px_even", "print('not odd')")
    out = capsys.readouterr().out
    assert out.count("hi all") == 2 and out.count("not odd") == 1
    assert "[stdout:0] \nnot odd" in out
    ip.run_line_magic("pxresult_even", "")
    assert capsys.readouterr().out.count("not odd") == 1
    ip.run_line_magic("result", "")
    assert capsys.readouterr().out.count("hi all") == 2


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


def _magics_of(ip: InteractiveShell, name: str = "px") -> Any:
    """The ParallelMagics instance behind ``%name``."""
    return ip.find_line_magic(name).__self__


def test_px_line_is_not_expanded_locally(magics: Any, rc: Client, capsys) -> None:
    """As ipyparallel's (``no_var_expand``): ``{x}`` and ``$x`` in a ``%px`` line reach the
    engines as written; the options line of ``%%px`` is still expanded, as there."""
    assert getattr(magics.find_line_magic("px"), "_ipython_magic_no_var_expand", False)
    magics.user_ns["x"] = "local"
    rc[:].push({"x": "remote"}, block=True)
    res = magics.run_cell("%px print(f'{x}')")
    assert res.success, res.error_in_exec
    out = capsys.readouterr().out
    assert out.count("remote") == 2 and "local" not in out
    assert magics.run_cell("%px s = {x}").success
    assert rc[:].pull("s", block=True) == [{"remote"}, {"remote"}]
    assert magics.run_cell("%px d = '$x'").success
    assert rc[:].pull("d", block=True) == ["$x", "$x"]
    magics.user_ns["t"] = 1
    assert magics.run_cell("%%px --targets {t}\nwhere = 'one'").success
    assert rc[1].pull("where", block=True) == "one"
    with pytest.raises(error.RemoteError, match="NameError"):
        rc[0].pull("where", block=True)


def test_a_line_that_is_python_is_all_code(magics: Any, rc: Client, capsys) -> None:
    """ipyparallel's line %px takes no options: a line that parses as Python runs as it is,
    even when it starts like an option (``-a`` is also the short --noblock)."""
    view = _magics_of(magics).view
    assert view.block is True
    magics.run_line_magic("px", "a = 3")
    capsys.readouterr()
    assert magics.run_line_magic("px", "-a") is None  # blocking: shown, not returned
    assert "Out[0:" in capsys.readouterr().out
    assert magics.run_line_magic("px", "-a + 1; marker = --a") is None
    assert rc[:].pull("marker", block=True) == [3, 3]
    # not Python as a whole: options, then code
    ar = magics.run_line_magic("px", "-a marker = 4")
    assert isinstance(ar, ipp.AsyncResult) and ar.wait(30) and ar.successful()
    assert rc[:].pull("marker", block=True) == [4, 4]
    # a long option first: options, even if the line would parse, -(-noblock(a))
    ar = magics.run_line_magic("px", "--noblock (a)")
    assert isinstance(ar, ipp.AsyncResult) and ar.wait(30) and ar.successful()
    ar = magics.run_line_magic("px", "--noblock neg = -a")
    assert isinstance(ar, ipp.AsyncResult) and ar.wait(30) and ar.successful()
    assert rc[:].pull("neg", block=True) == [-3, -3]
    capsys.readouterr()
    with warnings.catch_warnings():  # nothing is compiled here beyond a quiet parse
        warnings.simplefilter("error")
        magics.run_line_magic("px", r"sw = '\d' if 1 is 1 else 0")


def test_short_options(magics: Any, rc: Client, capsys) -> None:
    view = _magics_of(magics).view
    # -a / -b: noblock / block, for one run and as %pxconfig defaults
    ar = magics.run_cell_magic("px", "-a", "40 + 2")
    assert isinstance(ar, ipp.AsyncResult) and ar.wait(30) and ar.successful()
    ar = magics.run_line_magic("px", "-a -o kept 6 * 7")
    assert magics.user_ns["kept"] is ar and ar.wait(30) and ar.successful()
    magics.run_line_magic("pxconfig", "-a")
    assert view.block is False
    assert isinstance(magics.run_line_magic("px", "1"), ipp.AsyncResult)
    assert magics.run_line_magic("px", "-b 1") is None
    magics.run_line_magic("pxconfig", "-b")
    assert view.block is True
    capsys.readouterr()
    # -e groups the outputs by engine, -r collates them in order (-e labels each engine's
    # results, the default grouping by type does not)
    magics.run_line_magic("px", "--no-stream -e print('hi'); 5")
    out = capsys.readouterr().out
    assert out.index("[stdout:0]") < out.index("[output:0]") < out.index("[stdout:1]")
    assert out.index("[stdout:1]") < out.index("[output:1]")
    magics.run_cell_magic("px", "--no-stream -r", "print('hi'); 5")
    out = capsys.readouterr().out
    assert "[output:" not in out and out.index("[stdout:1]") < out.index("Out[0:")
    magics.run_cell_magic("px", "--no-stream -e", "print('hi'); 5")
    assert "[output:1]" in capsys.readouterr().out
    # %pxresult: -e / -r, and -o NAME stores the last result without showing anything
    last = magics.run_line_magic("px", "-a print('again'); 8")
    magics.run_line_magic("pxresult", "-o latest")
    assert magics.user_ns["latest"] is last
    assert capsys.readouterr().out == ""
    magics.run_line_magic("pxresult", "--out=other")
    assert magics.user_ns["other"] is last
    magics.run_line_magic("pxresult", "-e")
    out = capsys.readouterr().out
    assert out.index("[stdout:0]") < out.index("[output:0]") < out.index("[stdout:1]")
    magics.run_line_magic("pxresult", "-r")
    assert "[output:" not in capsys.readouterr().out


def test_options_end_where_the_code_starts(magics: Any, rc: Client, capsys) -> None:
    """Only known options followed by a space are options: the code after them is kept
    verbatim, and code that merely starts like a short option is code."""
    magics.run_line_magic("px", "a = 3")
    magics.run_line_magic("px", "--targets 0 -a*2")
    assert "]: -6" in capsys.readouterr().out
    ar = magics.run_line_magic("px", "-a -e --progress-after -1 -t [0, 1] spaced = 'a  b'")
    ar.get(timeout=30)
    assert rc[:].pull("spaced", block=True) == ["a  b", "a  b"]
    with pytest.raises(UsageError, match="takes no value"):
        magics.run_line_magic("px", "--block=1 pass")
    with pytest.raises(UsageError, match="expected one argument"):
        magics.run_cell_magic("px", "--progress-after", "pass")
    # (a bare "%px --progress-after" is Python, -(-progress) - after, and runs as code)


def test_long_options_may_be_abbreviated(magics: Any, rc: Client, capsys) -> None:
    """ipyparallel's %%px / %pxconfig options are argparse options, so an unambiguous prefix
    of a long option works: "Monitoring an MPI Simulation - 1" runs ``%%px --target 0 --block``."""
    magics.run_cell_magic("px", "--target 0 --block", "print('only', 'zero')")
    out = capsys.readouterr().out
    assert "[stdout:0] \nonly zero\n" in out and "[stdout:1]" not in out
    magics.run_cell_magic("px", "--targ=1 --group-out engine", "z = 4")
    assert rc[1].pull("z", block=True) == 4
    magics.run_line_magic("pxconfig", "--tar 1 --noblo")
    try:
        view = _magics_of(magics).view
        assert view.targets == 1 and view.block is False
    finally:
        magics.run_line_magic("pxconfig", "--targets all --block")
    with pytest.raises(UsageError, match="ambiguous option: --no could match"):
        magics.run_cell_magic("px", "--no", "pass")


def test_pxconfig_stream_signal_and_progress_defaults(magics: Any, capsys) -> None:
    pm = _magics_of(magics)
    assert (pm.stream_output, pm.progress_after, pm.signal_on_interrupt) == (True, 2.0, "SIGINT")
    magics.run_line_magic("pxconfig", "--no-stream --signal-on-interrupt 2 --progress-after 0")
    assert (pm.stream_output, pm.progress_after, pm.signal_on_interrupt) == (False, 0.0, "2")
    # not streamed: the error is the CompositeError itself; --stream for one run streams it
    with pytest.raises(error.CompositeError):
        magics.run_line_magic("px", "1 / 0")
    with pytest.raises(error.AlreadyDisplayedError):
        magics.run_line_magic("px", "--stream 1 / 0")
    capsys.readouterr()
    # --progress-after 0: the progress bar of finished engines (tqdm, named after the magic)
    magics.run_line_magic("px", "import time; time.sleep(0.3)")
    out = capsys.readouterr().out
    assert "%px" in out and "2/2" in out
    magics.run_cell_magic("px", "--progress-after -1", "time.sleep(0.3)")
    assert "2/2" not in capsys.readouterr().out
    magics.run_line_magic("pxconfig", "--stream --progress-after -1")
    assert (pm.stream_output, pm.progress_after) == (True, -1.0)
    magics.run_line_magic("px", "time.sleep(0.3); print('quiet')")
    out = capsys.readouterr().out
    assert "quiet" in out and "2/2" not in out
    # a bar appears once the run takes longer than --progress-after, with streamed output
    magics.run_line_magic("px", "--progress-after 0.2 print('first'); time.sleep(0.8)")
    out = capsys.readouterr().out
    assert out.count("first") == 2 and "2/2" in out
    magics.run_line_magic("pxconfig", "--signal-on-interrupt ''")
    assert pm.signal_on_interrupt == ""
    with pytest.raises(UsageError, match="SIGBOGUS"):
        magics.run_line_magic("pxconfig", "--signal-on-interrupt SIGBOGUS")
    with pytest.raises(UsageError, match="SIGBOGUS"):
        magics.run_line_magic("px", "--signal-on-interrupt SIGBOGUS 1")
    with pytest.raises(UsageError, match="progress-after"):
        magics.run_line_magic("pxconfig", "--progress-after soon")
    assert pm.signal_on_interrupt == "" and pm.progress_after == -1.0


@pytest.mark.parametrize(
    ("config", "options"),
    [
        ("", ""),
        ("", "--no-stream"),
        ("--signal-on-interrupt 2", "-e"),
        ("", "--signal-on-interrupt ''"),
    ],
    ids=["stream", "no-stream", "configured-signal", "no-signal"],
)
def test_ctrl_c_signals_the_engines_and_ends_the_cell(
    magics: Any, rc: Client, capsys, config: str, options: str
) -> None:
    """As ipyparallel: Ctrl-C during a blocking %px sends the signal to the engines, shows what
    they printed and ends the cell without an error."""
    pm = _magics_of(magics)
    if config:
        magics.run_line_magic("pxconfig", config)
    sent = threading.Event()

    def interrupt() -> None:
        # once both engines run the code (their first line arrived): Ctrl-C, as a user would
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ar = pm.last_result
            if ar is not None and all("started" in (md["stdout"] or "") for md in ar.metadata):
                time.sleep(0.2)
                sent.set()
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    timer = threading.Thread(target=interrupt, daemon=True)
    timer.start()
    t0 = time.monotonic()
    res = magics.run_cell(
        f"%px {options} import time; print('started', flush=True); time.sleep(20)"
    )
    elapsed = time.monotonic() - t0
    timer.join()
    assert sent.is_set()
    assert res.success, res.error_in_exec
    captured = capsys.readouterr()
    assert captured.out.count("started") == 2
    assert "[stdout:0]" in captured.out and "[stdout:1]" in captured.out
    if "''" in options:
        assert "no signal sent" in captured.err
        assert not pm.last_result.done()
        rc.send_signal("SIGINT", block=True)  # the engines go on: stop them here
        assert pm.last_result.wait(30)
    else:
        assert "sending SIGINT to the engines" in captured.err
        assert elapsed < 15
        assert pm.last_result.done()
        with pytest.raises(error.CompositeError, match="KeyboardInterrupt"):
            pm.last_result.get()
        # the engines' KeyboardInterrupts are the expected outcome: not shown (ipyparallel)
        assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err
    # the engines are usable again
    magics.run_line_magic("px", "print('after')")
    assert capsys.readouterr().out.count("after") == 2


def test_targets_values_as_ipyparallel(magics: Any, rc: Client, capsys) -> None:
    """``:`` slices the client's current ids, ``all`` stays, the rest is Python."""
    view = _magics_of(magics).view
    magics.run_line_magic("pxconfig", "--targets ::2 --verbose")
    assert view.targets == [0]
    magics.run_line_magic("px", "'even'")
    out = capsys.readouterr().out
    assert "Parallel execution on engine(s): [0]\n" in out and "Out[1:" not in out
    magics.run_line_magic("pxconfig", "-t 1:")
    assert view.targets == [1]
    magics.run_line_magic("pxconfig", "--targets=-1:")
    assert view.targets == [1]
    magics.run_line_magic("pxconfig", "--targets all")
    assert view.targets == "all"
    for value, shown in [
        ("range(2)", "[0, 1]"),
        ("[0, 1]", "[0, 1]"),
        ("(1,)", "[1]"),
        ("1", "1"),
        (":1", "[0]"),
        ("all", "all"),
    ]:
        magics.run_line_magic("px", f"--targets {value} 'x'")
        assert f"Parallel execution on engine(s): {shown}\n" in capsys.readouterr().out
    magics.user_ns["evens"] = [0]
    magics.run_cell_magic("px", "--targets evens", "print('here')")
    out = capsys.readouterr().out
    assert "engine(s): [0]" in out and "[stdout:1]" not in out
    for bad in ["nope", "str(0)", "1:2:3:4", "a:b"]:
        with pytest.raises(UsageError, match=re.escape(repr(bad))):
            magics.run_line_magic("px", f"--targets {bad} 1")
    with pytest.raises(UsageError, match="nope"):
        magics.run_line_magic("pxconfig", "--targets nope")
    assert view.targets == "all"
