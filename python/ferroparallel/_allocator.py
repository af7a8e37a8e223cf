"""Load the Rust extension with its allocator kept off transparent huge pages.

The extension allocates with mimalloc, which by default asks the kernel for transparent huge
pages (``madvise(MADV_HUGEPAGE)``) on the memory it maps. Every message the controller and the
client handle allocates and frees a few small buffers, so mimalloc keeps returning parts of
its pages to the kernel and touching them again; with huge pages each such touch makes the
kernel zero 2 MiB. On the no-op task benchmarks that zeroing was 8-14% of the controller's CPU
(``clear_page_erms``), and disabling it cut the controller's CPU per task by about 10%
(decision 0009).

mimalloc reads its options from the environment once, when the library is loaded, and with
``MIMALLOC_ALLOW_THP=0`` it also turns transparent huge pages off for the whole process
(``prctl(PR_SET_THP_DISABLE)``). NumPy relies on them for large arrays, so the process-wide
switch is put back as it was right after loading; mimalloc keeps its own choice.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_OPTION = "MIMALLOC_ALLOW_THP"
_PR_SET_THP_DISABLE = 41
_PR_GET_THP_DISABLE = 42


def _prctl() -> object | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


@contextmanager
def mimalloc_without_huge_pages() -> Iterator[None]:
    """Around the first import of ``ferroparallel._core``: mimalloc leaves transparent huge
    pages alone, the process keeps them for everything else.

    Does nothing off Linux, or when the user set ``MIMALLOC_ALLOW_THP`` themselves.
    """
    if not sys.platform.startswith("linux") or _OPTION in os.environ:
        yield
        return
    prctl = _prctl()
    before = prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) if prctl is not None else -1
    os.environ[_OPTION] = "0"
    try:
        yield
    finally:
        os.environ.pop(_OPTION, None)
        if prctl is not None and before == 0:
            prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)
