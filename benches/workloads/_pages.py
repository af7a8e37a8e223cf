"""Warm memory for the ``data`` workload on virtual machines that hand freed memory back.

Not a workload (the name starts with ``_``). With virtio-balloon *free page reporting*, the
guest kernel tells the hypervisor about free memory about 2 s after it is freed, and the host
takes it back: the next first touch of such a page costs a host-side fault (about 250 MiB/s on
the development machines, instead of several GiB/s). A transfer allocates fresh receive
buffers, so on such a machine it measures that fault as much as the transport, depending on
what happened to be freed in the last 2 s: noise, and unfair between contenders.

The kernel hands out free pages that were not reported yet before reported ones. So touching
and freeing enough memory just before a timed operation (:func:`prefault`) gives it warm pages,
as on bare metal. Switch it off with ``FERROBENCH_PREFAULT=0`` to measure the cold case.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_MIB = 1024 * 1024

#: Largest amount :func:`prefault` touches at once (MiB).
PREFAULT_CAP_MIB = 3072


def page_reporting() -> bool:
    """Whether this kernel reports free pages to a hypervisor through a virtio balloon."""
    balloon = Path("/sys/bus/virtio/drivers/virtio_balloon")
    return Path("/sys/module/page_reporting").exists() and any(balloon.glob("virtio*"))


def prefault_enabled() -> bool:
    """Whether to prefault: on where pages are reported, unless ``FERROBENCH_PREFAULT=0``."""
    setting = os.environ.get("FERROBENCH_PREFAULT")
    if setting is not None:
        return setting != "0"
    return page_reporting()


def prefault(mib: float) -> None:
    """Touch ``mib`` MiB of fresh memory (at most :data:`PREFAULT_CAP_MIB`) and free it."""
    size = int(min(mib, PREFAULT_CAP_MIB) * _MIB)
    if size > 0:
        buf = np.empty(size, dtype=np.uint8)
        buf.fill(1)
        del buf


def note(enabled: bool, factor: float) -> str:
    """The ``(machine)`` row's note (empty when pages are not reported)."""
    if not page_reporting():
        return ""
    text = (
        "virtio-balloon free page reporting: memory freed goes back to the host within ~2 s "
        "and is slow to touch again"
    )
    if enabled:
        return (
            f"{text}; {factor:g}x the moved MiB were touched and freed before each timed "
            "operation, so that it gets warm pages (FERROBENCH_PREFAULT=0: measure it cold)"
        )
    return f"{text}; measured cold (FERROBENCH_PREFAULT=0): compare the two copy rows"
