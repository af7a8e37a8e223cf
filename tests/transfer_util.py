"""Helpers for the data-transfer tests: who owns an array's memory, RSS, shm segments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

import ferroparallel
from ferroparallel import _core
from ferroparallel.serialize import shm

# Engines cannot import the tests: send the helpers below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Where the ferroparallel under test comes from (the source tree, or the installed wheel in
#: CI): child scripts must import the same one.
PYTHON_DIR = str(Path(ferroparallel.__file__).resolve().parent.parent)


def memory_owner(a: Any) -> Any:
    """The object at the end of ``a``'s ``.base`` / ``memoryview.obj`` chain."""
    obj = a
    while True:
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None:
            return obj
        obj = nxt


def data_address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def assert_over_frame(a: np.ndarray) -> None:
    """``a``'s memory lies inside the received ``_core.Frame`` it was built over (no copy)."""
    owner = memory_owner(a)
    assert type(owner) is _core.Frame, f"array memory is owned by {type(owner).__name__}"
    start = data_address(a)
    assert owner.address <= start and start + a.nbytes <= owner.address + len(owner)
    assert not a.flags.writeable


def assert_over_shm(a: np.ndarray) -> None:
    """``a``'s memory is a read-only mapping of a shared-memory segment."""
    owner = memory_owner(a)
    assert type(owner) is _core.SharedMapping, f"array memory is owned by {type(owner).__name__}"
    assert not a.flags.writeable


def owner_kind(a: Any) -> str:
    """``"frame"``, ``"shm"`` or the owner's type name (runs on engines too)."""
    owner = memory_owner(a)
    if type(owner) is _core.Frame:
        return "frame"
    if type(owner) is _core.SharedMapping:
        return "shm"
    return type(owner).__name__


def fp_mappings() -> list[str]:
    """Names of the fp- segments this process has mapped (runs on engines)."""
    names = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm/fp-" in line:
                names.add(line.split("/dev/shm/")[1].split()[0])
    return sorted(names)


def segments_of(pid: int | None = None) -> list[str]:
    """Segments in /dev/shm created by ``pid`` (default: this process)."""
    return shm.our_segments(pid)


def assert_no_segments_left(timeout: float = 5.0) -> None:
    """This process's segments are all gone within ``timeout`` seconds (they are released as
    the last replies arrive, on the dispatcher thread)."""
    deadline = time.monotonic() + timeout
    while segments_of() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segments_of() == []


def run_script(code: str, *argv: str, **popen: Any) -> subprocess.Popen[str]:
    """Start ``python -c code argv...`` (code dedented) importing the ferroparallel under
    test (``PYTHONPATH``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def status_kib(field: str, pid: str = "self") -> int:
    """A ``/proc/<pid>/status`` field in KiB (``VmRSS``, ``VmHWM``, ``RssShmem``...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def frame_check(a: np.ndarray) -> tuple[str, bool, bool]:
    """(owner kind, data inside the owner, read-only) of an array (runs on engines)."""
    owner = memory_owner(a)
    start = data_address(a)
    inside = True
    if isinstance(owner, _core.Frame):
        inside = owner.address <= start and start + a.nbytes <= owner.address + len(owner)
    return owner_kind(a), inside, not a.flags.writeable


def ends(a: np.ndarray) -> tuple[int, int, int, str, bool]:
    """(size, first, last, owner kind, read-only) of a 1-D array (runs on engines)."""
    return int(a.size), int(a[0]), int(a[-1]), owner_kind(a), not a.flags.writeable


_can_lend: bool | None = None
_LEND_SECRET = os.urandom(16)


def can_lend() -> bool:
    """Whether a child process may read this one's memory (``process_vm_readv``: ptrace
    permission, no seccomp filter against it). Where it may not, ferroparallel falls back to
    shared-memory segments and the tests of lending skip."""
    global _can_lend
    if _can_lend is None:
        addr, n = _core.buffer_address(_LEND_SECRET)
        child = run_script(
            """
            import os, sys
            from ferroparallel import _core
            dest = bytearray(int(sys.argv[3]))
            try:
                _core.read_process_memory(int(sys.argv[1]), int(sys.argv[2]), dest)
            except OSError as e:
                print("error", e)
            else:
                print(dest.hex())
            """,
            str(os.getpid()),
            str(addr),
            str(n),
        )
        out, _ = child.communicate(timeout=60)
        _can_lend = out.strip() == _LEND_SECRET.hex()
    return _can_lend


def need_lending() -> None:
    """Skip the calling test where processes cannot read each other's memory."""
    import pytest

    if not can_lend():
        pytest.skip("process_vm_readv between processes is not allowed here")
