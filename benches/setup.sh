#!/usr/bin/env bash
# Create (or reuse) the benchmark virtual environment and install everything the benches need:
# ferroparallel itself (a release build, from this checkout) and its peers (the `bench` extra:
# numpy, ipyparallel, dask[distributed]; plus psutil for the process checks and peak RSS).
#
# Usage:
#   benches/setup.sh                 # venv in benches/.venv (FERROBENCH_VENV to choose another)
#   benches/.venv/bin/python benches/run.py --quick
#
# Environment:
#   FERROBENCH_VENV    where the venv lives (default: benches/.venv)
#   PYTHON             the interpreter that creates it (default: python3; needs >= 3.11)
#   FERROBENCH_NO_SELF=1   do not build ferroparallel: install its dependencies and the peers
#                          only (for a build already on PYTHONPATH, e.g. PYTHONPATH=python)
#
# Building ferroparallel needs a Rust toolchain (cargo) and a C++ compiler (libzmq is built
# from source): the first build takes a few minutes.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERROBENCH_VENV:-$root/benches/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

peers=("ipyparallel>=9.2" "dask[distributed]>=2024.1" "numpy>=1.24" "psutil>=5.9")
if [ "${FERROBENCH_NO_SELF:-0}" = "1" ]; then
    # ferroparallel's own runtime dependencies, read from pyproject.toml, and the peers.
    mapfile -t deps < <("$venv/bin/python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["bench"]))
' "$root/pyproject.toml")
    "${pip[@]}" install "${deps[@]}" "${peers[@]}"
else
    # A regular (non-editable) install: maturin builds in release mode, as the numbers need.
    "${pip[@]}" install "$root[bench]" "${peers[@]}"
fi

"$venv/bin/python" - <<'EOF'
import importlib

for name in ("ferroparallel", "ipyparallel", "distributed", "numpy", "psutil", "zmq"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:14s} {getattr(module, '__version__', '?')}")
    except ImportError as e:
        print(f"  {name:14s} NOT IMPORTABLE ({e})")
EOF
if [ "${FERROBENCH_NO_SELF:-0}" = "1" ]; then
    echo "ready: PYTHONPATH=<ferroparallel build> $venv/bin/python benches/run.py --quick"
else
    echo "ready: $venv/bin/python benches/run.py --quick"
fi
