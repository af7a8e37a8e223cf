"""The functions the cluster workloads send to engines (not a workload: the name starts with ``_``).

They live in their own small module so that every framework can find them by reference on its
engines and workers: the cluster workloads put this directory on ``PYTHONPATH`` before starting
any cluster (see ``_frameworks.isolated_env``), and the engines inherit it.
"""

from __future__ import annotations

from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    """Do nothing and return ``None`` (accepts any arguments, so ``map`` can use it too)."""
    return None
