"""Reading traitlets Python config files (``c.Cluster.n = 4``), the one way every part of
ferroparallel reads them: the profile's cluster, controller and engine files and
``cluster start --config``."""

from __future__ import annotations

import os
from typing import Any


def load_py_config(path: str | os.PathLike[str]) -> Any:
    """The traitlets ``Config`` of the Python config file ``path``.

    Raises
    ------
    ValueError
        The file is missing or cannot be loaded; the message names it and the reason.
    """
    from pathlib import Path

    from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

    p = Path(path).expanduser()
    try:
        return PyFileConfigLoader(p.name, path=str(p.parent)).load_config()
    except ConfigFileNotFound:
        raise ValueError(f"config file {p} not found") from None
    except Exception as e:
        raise ValueError(f"cannot load config file {p}: {type(e).__name__}: {e}") from e


def unused_settings(
    cfg: Any, used: set[tuple[str, str]], skip: set[str] = frozenset()
) -> list[str]:
    """``Section.key`` of the settings in ``cfg`` not in ``used`` (sections in ``skip``
    aside), sorted: what a warning should name."""
    return sorted(
        f"{section}.{key}"
        for section, values in cfg.items()
        if section not in skip and hasattr(values, "items")
        for key in values
        if (section, key) not in used
    )
