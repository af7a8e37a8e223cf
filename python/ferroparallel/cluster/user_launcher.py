"""Launcher classes written by the user (``Cluster(controller=MyLauncher)``,
``c.Cluster.engine_launcher_class = MyLauncher``).

Such a class subclasses one of ipyparallel's or ferroparallel's launchers, typically to change
a setting's default (``controller_args = ["--sqlitedb"]``). ferroparallel starts it as the launcher
it derives from, with the settings of the subclass that this launcher takes: a plain class
attribute wins over the config (in ipyparallel it hides the configurable trait), a redefined
trait's default loses to it. Everything else the subclass defines (methods, observers, dynamic
defaults, other attributes) is not used, and a warning names it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import batch
from .ssh_host import HOST_OPTIONS
from .ssh_proxy import OPTIONS as SSH_PROXY_OPTIONS

__all__ = ["UserLauncher", "understood_settings", "user_launcher"]

#: What a class body gets from Python or traitlets' metaclass, not from the user.
_BOOKKEEPING = frozenset(
    {
        "_all_trait_default_generators",
        "_descriptors",
        "_instance_inits",
        "_static_immutable_initial_values",
        "_trait_default_generators",
        "_traits",
        "_abc_impl",
    }
)


@dataclass
class UserLauncher:
    """A user's launcher class and what ferroparallel takes from it.

    Attributes
    ----------
    cls : type
        The class given.
    kind : str
        The launcher it runs as (``"local"``, ``"mpi"``, ``"ssh"``, ``"sshproxy"`` or a batch
        system).
    base : type
        The first launcher of ipyparallel or ferroparallel in its MRO.
    fixed : dict
        Plain class attributes that ferroparallel understands (they win over the config).
    defaults : dict
        Default values of redefined traits that ferroparallel understands (the config wins).
    sections : tuple of str
        The names of the user's classes, base first: config sections that apply too
        (``c.MyLauncher.controller_args``, as traitlets applies them).
    ignored : list of str
        What the subclass defines that is not used, as ``"name (what)"``.
    """

    cls: type
    kind: str
    base: type
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    sections: tuple[str, ...] = ()
    ignored: list[str] = field(default_factory=list)

    def setting(self, key: str) -> Any:
        """The class's value of ``key`` (fixed first), or None."""
        return self.fixed.get(key, self.defaults.get(key))


def understood_settings(role: str, kind: str) -> tuple[str, ...]:
    """The launcher settings ferroparallel takes from a ``role`` ("controller" or "engine")
    launcher of ``kind``."""
    common = (f"{role}_args", "environment", f"{role}_cmd")
    if kind == "mpi":
        return (*common, "mpi_cmd", "mpi_args")
    if kind == "ssh" and role == "controller":
        return (*common, *HOST_OPTIONS)
    if kind == "ssh":
        return (*common, "engines", "ssh_cmd", "ssh_args")
    if kind == "sshproxy":
        return ("engine_args", "environment", "n", *SSH_PROXY_OPTIONS)
    if kind in batch.BATCH_SYSTEMS:
        return (*common, *batch.option_names(kind))
    return common


def _describe(value: Any) -> str | None:
    """What an ignored class-body entry is, or None for a plain value."""
    kind = type(value).__name__
    if kind == "DefaultHandler":
        return "dynamic default"
    if kind in ("ObserveHandler", "ValidateHandler"):
        return kind[: -len("Handler")].lower() + "r"
    if isinstance(value, property):
        return "property"
    if isinstance(value, staticmethod | classmethod) or inspect.isroutine(value):
        return "method"
    return None


def _is_trait(value: Any) -> bool:
    try:
        from traitlets import TraitType
    except ImportError:  # pragma: no cover - traitlets is a dependency
        return False
    return isinstance(value, TraitType)


def user_launcher(
    cls: type, role: str, kind_of: Callable[[str], str | None]
) -> UserLauncher | None:
    """Inspect a launcher class given for ``role``.

    Parameters
    ----------
    cls : type
        The class.
    role : str
        ``"controller"`` or ``"engine"``.
    kind_of : callable
        Maps a class name to the launcher kind it means, None for an unknown name.

    Returns
    -------
    UserLauncher or None
        None when no class in its MRO is a launcher ferroparallel knows by name.
    """
    own: list[type] = []
    for base in cls.__mro__:
        kind = kind_of(base.__name__)
        if kind is not None:
            break
        own.append(base)
    else:
        return None
    out = UserLauncher(cls, kind, base, sections=tuple(k.__name__ for k in reversed(own)))
    known = understood_settings(role, kind)
    for klass in reversed(own):  # base first: a subclass's entries win
        for name, value in vars(klass).items():
            if (name.startswith("__") and name.endswith("__")) or name in _BOOKKEEPING:
                continue
            what = _describe(value)
            if what is None and name in known:
                out.ignored = [i for i in out.ignored if not i.startswith(f"{name} (")]
                if _is_trait(value):
                    out.defaults[name] = value.default()
                    out.fixed.pop(name, None)
                else:
                    out.fixed[name] = value
                    out.defaults.pop(name, None)
                continue
            if what is None:
                what = "trait" if _is_trait(value) else "attribute"
            out.ignored.append(f"{name} ({what})")
    if out.ignored:
        warnings.warn(
            f"{role} launcher {cls.__qualname__} runs as ferroparallel's {kind!r} {role} "
            f"launcher ({base.__name__}); what it defines that is not used: "
            f"{', '.join(out.ignored)} (ferroparallel uses only: {', '.join(known)})",
            UserWarning,
            stacklevel=2,
        )
    return out
