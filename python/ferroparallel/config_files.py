"""Reading traitlets config files (Python: ``c.Cluster.n = 4``, or JSON), the one way every part of
ferroparallel reads them: the profile's cluster, controller and engine files and
``cluster start --config``."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

#: A traitlets command-line option: ``--Class.trait=value`` or ``--Class.trait`` (value next).
_TRAIT_OPTION = re.compile(r"^--([A-Za-z_]\w*)\.([A-Za-z_]\w*)(=.*)?$", re.S)


def load_py_config(path: str | os.PathLike[str]) -> Any:
    """The traitlets ``Config`` of the config file ``path``: a Python file, or a JSON one
    when its name ends in ``.json`` (as traitlets' ``JSONFileConfigLoader`` reads).

    Raises
    ------
    ValueError
        The file is missing or cannot be loaded; the message names it and the reason.
    """
    from pathlib import Path

    from traitlets.config.loader import (
        ConfigFileNotFound,
        JSONFileConfigLoader,
        PyFileConfigLoader,
    )

    p = Path(path).expanduser()
    loader = JSONFileConfigLoader if p.suffix == ".json" else PyFileConfigLoader
    try:
        return loader(p.name, path=str(p.parent)).load_config()
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


def split_trait_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take traitlets' command-line options (``--InteractiveShell.colors=nocolor``,
    ``--IPEngine.timeout 30``) out of ``argv``.

    Returns
    -------
    tuple
        The other arguments, in order, and the traitlets options, each as one
        ``--Class.trait=value`` argument (see :func:`trait_options_config`).

    Raises
    ------
    ValueError
        An option without a value (``--Class.trait`` last).
    """
    rest: list[str] = []
    options: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        m = _TRAIT_OPTION.match(arg)
        if m is None:
            rest.append(arg)
        elif m.group(3) is not None:
            options.append(arg)
        elif i + 1 < len(items):
            i += 1
            options.append(f"{arg}={items[i]}")
        else:
            raise ValueError(f"{arg} needs a value: {arg}=VALUE")
        i += 1
    return rest, options


def trait_options_config(options: Sequence[str]) -> Any:
    """The traitlets ``Config`` of ``--Class.trait=value`` options (values are kept as
    traitlets keeps command-line values: text, converted by the trait that reads it)."""
    from traitlets.config.loader import KVArgParseConfigLoader

    return KVArgParseConfigLoader(argv=list(options)).load_config()
