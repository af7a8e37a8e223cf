"""The IPython shell settings of engines (``InteractiveShell.colors``, ``xmode``, ...), given as
ipengine takes them: ``--InteractiveShell.colors=nocolor`` on the command line (through
``Cluster(engine_args=...)``) and ``c.InteractiveShell.colors`` in ``ipengine_config.py``.
Real controller and engine processes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("IPython", reason="the engines' shell is IPython's")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import ferroparallel as ipp  # noqa: E402
from ferroparallel.cluster import Cluster  # noqa: E402
from ferroparallel.config_files import split_trait_options  # noqa: E402
from ferroparallel.engine.app import parse_args  # noqa: E402
from ferroparallel.engine.startup import load_engine_config  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ANSI = "\x1b["
FAILING_CELL = "def f():\n    raise RuntimeError('oops')\nf()"


def shell_state() -> tuple[str, str, str]:
    """(run on an engine) The settings of the engine's IPython shell."""
    from IPython import get_ipython

    ip = get_ipython()
    return str(ip.colors).lower(), str(ip.xmode), str(ip.ast_node_interactivity)


def remote_traceback(rc: Any, target: int, code: str = FAILING_CELL) -> str:
    with pytest.raises(ipp.RemoteError) as info:
        rc[target].execute(code, block=True)
    return "\n".join(info.value.render_traceback())


@pytest.fixture
def cluster(tmp_path: Path, fp_root: Path) -> Iterator[Cluster]:
    """A controller without engines in a private profile; stopped after the test."""
    c = Cluster(
        n=0, profile_dir=tmp_path / "profile", controller_args=["--ping", "500"], cluster_id="sh"
    )
    try:
        yield c
    finally:
        c.stop_cluster_sync()


def add_engine(c: Cluster, rc: Any, engine_args: list[str]) -> int:
    """Start one engine with ``engine_args``; its id."""
    before = set(rc.ids)
    c.start_engines_sync(1, engine_args=engine_args)
    rc.wait_for_engines(len(before) + 1, timeout=30)
    (new,) = set(rc.ids) - before
    return new


def test_shell_settings_of_the_engine_command_line(cluster: Cluster) -> None:
    """``--InteractiveShell.colors=nocolor`` / ``--InteractiveShell.xmode Plain`` (ipyparallel's
    test engines are started so): uncoloured, plain tracebacks. An invalid value leaves the
    shell with IPython's defaults (logged); an unknown option is ignored with a warning."""
    cluster.start_controller_sync()
    rc = cluster.connect_client_sync()
    try:
        default = add_engine(cluster, rc, [])
        plain = add_engine(
            cluster,
            rc,
            ["--InteractiveShell.colors=nocolor", "--InteractiveShell.xmode", "Plain", "--Foo.x=1"],
        )
        bad = add_engine(cluster, rc, ["--InteractiveShell.colors=purple"])
        states = rc[[default, plain, bad]].apply_sync(shell_state)
        assert [s[:2] for s in states] == [
            ("neutral", "Context"),
            ("nocolor", "Plain"),
            ("neutral", "Context"),
        ]
        assert ANSI in remote_traceback(rc, default)  # (what the option changes)
        tb = remote_traceback(rc, plain)
        assert ANSI not in tb
        assert "Traceback (most recent call last):" in tb and "RuntimeError: oops" in tb
        assert "-----" not in tb  # the Context mode's banner
        assert ANSI in remote_traceback(rc, bad)
        logs = "\n".join(p.read_text() for p in (Path(cluster.profile_dir) / "log").glob("*.log"))
        assert "options ferroparallel ignores: ['Foo.x']" in logs
        assert "invalid IPython shell setting" in logs and "purple" in logs
    finally:
        rc.close()


def test_shell_settings_of_the_profiles_config(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """``c.InteractiveShell.*`` / ``c.ZMQInteractiveShell.*`` in ``ipengine_config.py`` (ours,
    ``ferroparallel_engine_config.py``, wins; the command line wins over both); ``%%px``
    errors then print as on ipyparallel's uncoloured engines."""
    pdir = Path(cluster.profile_dir)
    (pdir / "ipengine_config.py").write_text(
        "c.InteractiveShell.colors = 'NoColor'\n"
        "c.InteractiveShell.xmode = 'Verbose'\n"
        "c.ZMQInteractiveShell.ast_node_interactivity = 'none'\n"
    )
    (pdir / "ferroparallel_engine_config.py").write_text(
        "c.ZMQInteractiveShell.xmode = 'Minimal'\n"
    )
    cluster.start_controller_sync()
    rc = cluster.connect_client_sync()
    try:
        first = add_engine(cluster, rc, [])
        second = add_engine(cluster, rc, ["--ZMQInteractiveShell.xmode=Plain"])
        assert rc[first].apply_sync(shell_state) == ("nocolor", "Minimal", "none")
        assert rc[second].apply_sync(shell_state) == ("nocolor", "Plain", "none")
        assert remote_traceback(rc, first).splitlines()[1:] == ["RuntimeError: oops"]
        ip = InteractiveShell.instance()
        try:
            view = rc[:]
            view.block = True
            view.activate()
            ip.run_cell_magic("px", "", "print('printed')\n10 * 4")
            out = capsys.readouterr().out
            assert out.count("printed") == 2 and "Out[" not in out  # 'none': no value shown
            with capture_output(display=False) as io:
                with pytest.raises(ipp.error.AlreadyDisplayedError):
                    ip.run_cell_magic("px", "--stream", "raise RuntimeError('oops!')")
        finally:
            InteractiveShell.clear_instance()
        assert ANSI not in io.stderr
        assert io.stderr.count("RuntimeError: oops!") == 2
    finally:
        rc.close()


def test_trait_options_are_read_after_the_profiles_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The command line's traitlets options: both spellings, over the config file; ``IPEngine``
    ones as in the file, below our own options; the others named in a warning."""
    assert split_trait_options(["--A.b=1", "-c", "x=1", "--C.d", "two words", "--e"]) == (
        ["-c", "x=1", "--e"],
        ["--A.b=1", "--C.d=two words"],
    )
    with pytest.raises(ValueError, match="needs a value"):
        split_trait_options(["--A.b"])
    with pytest.raises(SystemExit):
        parse_args(["--InteractiveShell.colors"])
    (tmp_path / "ipengine_config.py").write_text(
        "c.InteractiveShell.colors = 'Linux'\nc.InteractiveShell.xmode = 'Plain'\n"
        "c.IPEngine.timeout = 7\n"
    )
    args = parse_args(
        ["--InteractiveShell.colors=nocolor", "--IPEngine.timeout=3", "--Session.debug=1"]
    )
    with caplog.at_level(logging.WARNING):
        cfg = load_engine_config(tmp_path, args.trait_config)
    assert cfg.timeout == 3.0
    assert cfg.shell.InteractiveShell.colors == "nocolor"
    assert cfg.shell.InteractiveShell.xmode == "Plain"
    assert "Session.debug" in caplog.text
    assert parse_args([]).trait_config is None
