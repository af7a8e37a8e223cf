#!/usr/bin/env python3
"""Run the ferroparallel benchmarks side by side with their peers.

Usage::

    python benches/run.py [--quick] [--only NAME] [--json PATH] [--list]

Every module in ``benches/workloads/`` (except those starting with ``_``) is a workload: it
exposes ``NAME`` (str) and ``run(quick: bool) -> list[dict]``. Each returned dict is one row of
the results table. The runner prints one table per workload and writes everything, with a
description of the machine, to JSON (``benches/results/<timestamp>.json`` by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHES = Path(__file__).resolve().parent
WORKLOADS = BENCHES / "workloads"
RESULTS = BENCHES / "results"


def discover() -> dict[str, ModuleType]:
    """Import every workload module and return them by ``NAME``.

    Returns
    -------
    dict
        ``{NAME: module}`` in file-name order.

    Raises
    ------
    RuntimeError
        If a module lacks ``NAME`` or ``run``, or two modules share a name.
    """
    found: dict[str, ModuleType] = {}
    if str(WORKLOADS) not in sys.path:  # workloads share helpers in workloads/_util.py
        sys.path.insert(0, str(WORKLOADS))
    for path in sorted(WORKLOADS.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"ferrobench_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        name = getattr(module, "NAME", None)
        if not isinstance(name, str) or not callable(getattr(module, "run", None)):
            raise RuntimeError(f"{path} must define NAME (str) and run(quick) -> list[dict]")
        if name in found:
            raise RuntimeError(f"two workloads are named {name!r}")
        found[name] = module
    return found


def format_value(value: Any) -> str:
    """Format one table cell: big numbers with thousands separators, small ones with 3 digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render rows as an aligned text table (columns in order of first appearance)."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        parts = []
        for value, width, raw in zip(values, widths, range(len(values)), strict=True):
            numeric = all(isinstance(row.get(columns[raw]), (int, float)) for row in rows)
            parts.append(value.rjust(width) if numeric else value.ljust(width))
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=BENCHES,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    for package in ("ferroparallel", "zmq", "msgpack"):
        try:
            module = __import__(package)
            info[f"{package}_version"] = getattr(module, "__version__", None)
        except ImportError:
            info[f"{package}_version"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this workload (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write results (default: benches/results/<timestamp>.json)",
    )
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads; return the process exit code."""
    args = parse_args(argv)
    workloads = discover()
    if args.list:
        for name, module in workloads.items():
            doc = (module.__doc__ or "").strip().splitlines()
            print(f"{name:20s} {doc[0] if doc else ''}")
        return 0
    only = [n for item in args.only for n in item.split(",") if n]
    unknown = sorted(set(only) - set(workloads))
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}; have {', '.join(workloads)}")
        return 2
    selected = [n for n in workloads if not only or n in only]

    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(),
        "quick": args.quick,
        "argv": sys.argv,
        "machine": machine(),
        "workloads": {},
    }
    failed = []
    for name in selected:
        print(f"\n== {name} {'(quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            rows = workloads[name].run(args.quick)
        except Exception:
            failed.append(name)
            text = traceback.format_exc()
            print(text, file=sys.stderr)
            report["workloads"][name] = {"error": text}
            continue
        elapsed = time.perf_counter() - t0
        print(format_table(rows))
        print(f"({elapsed:.1f} s)")
        report["workloads"][name] = {"seconds": elapsed, "rows": rows}

    path = args.json
    if path is None:
        path = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
