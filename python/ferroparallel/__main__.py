"""The ``ferroparallel`` command: ``ferroparallel {controller,engine,cluster} ...``.

Each subcommand lives in its own module and is imported only when it runs, so starting a
controller or an engine does not pay for the others.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "controller": ("ferroparallel.controller.app", "run a controller in this process"),
    "engine": ("ferroparallel.engine.app", "run an engine in this process"),
    "cluster": (
        "ferroparallel.cluster.app",
        "start, stop, list and clean local clusters; add engines",
    ),
    "demo": ("ferroparallel.demo", "start a local cluster, run real work on it, report, stop"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: ferroparallel [-h] [--version] COMMAND [ARGS...]",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "Run 'ferroparallel COMMAND -h' for the options of a command.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The subcommand's exit status (2 for a usage error).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    cmd, rest = args[0], args[1:]
    if cmd in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if cmd in ("-V", "--version"):
        from . import __version__

        print(f"ferroparallel {__version__}")
        return 0
    if cmd not in COMMANDS:
        print(f"ferroparallel: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[cmd][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"ferroparallel: '{cmd}' is not available in this installation", file=sys.stderr)
            return 1
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
