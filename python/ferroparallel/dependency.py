"""Task dependencies: ``Dependency`` (msg_id sets for ``after``/``follow``) and functional
dependencies checked on the engine (``@require``, ``@depend``, ``dependent``)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from .error import UnmetDependency
from .serialize import interactive


class Dependency(set):
    """A set of msg_ids a task depends on.

    Parameters
    ----------
    dependencies : iterable
        msg_ids, AsyncResults (their msg_ids), or other Dependencies.
    all : bool
        Met when all (True) or any (False) of them finished.
    success, failure : bool
        Whether successful / failed tasks count as finished. Both False is an error.
    """

    def __init__(
        self,
        dependencies: Iterable[Any] = (),
        all: bool = True,  # noqa: A002
        success: bool = True,
        failure: bool = False,
    ) -> None:
        ids: list[str] = []
        if isinstance(dependencies, dict) and "dependencies" in dependencies:
            # the wire form, as produced by as_dict()
            form = dependencies
            dependencies = form["dependencies"]
            all = form.get("all", all)  # noqa: A001
            success = form.get("success", success)
            failure = form.get("failure", failure)
        if isinstance(dependencies, (str, bytes)) or hasattr(dependencies, "msg_ids"):
            dependencies = [dependencies]
        for d in dependencies:
            if isinstance(d, bytes):
                d = d.decode()
            if isinstance(d, str):
                ids.append(d)
            elif hasattr(d, "msg_ids"):
                ids.extend(d.msg_ids)
            elif isinstance(d, (set, list, tuple)):
                ids.extend(Dependency(d))
            else:
                raise TypeError(f"dependencies are msg_ids or AsyncResults, not {d!r}")
        super().__init__(ids)
        self.all = all
        if not (success or failure):
            raise ValueError("Must depend on at least one of success or failure!")
        self.success = success
        self.failure = failure

    def check(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency is met given finished (completed/failed) msg_ids."""
        if not self:
            return True
        against: set[str] = set()
        if self.success:
            against |= set(completed)
        if self.failure and failed is not None:
            against |= set(failed)
        return self.issubset(against) if self.all else not self.isdisjoint(against)

    def unreachable(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether it can never be met given finished msg_ids."""
        if not self:
            return False
        bad: set[str] = set()
        if not self.success:
            bad |= set(completed)
        if not self.failure and failed is not None:
            bad |= set(failed)
        return not self.isdisjoint(bad) if self.all else self.issubset(bad)

    def as_dict(self) -> dict[str, Any]:
        """The wire form: ``{dependencies, all, success, failure}``."""
        return {
            "dependencies": sorted(self),
            "all": self.all,
            "success": self.success,
            "failure": self.failure,
        }

    def __repr__(self) -> str:
        return (
            f"Dependency({sorted(self)}, all={self.all}, success={self.success}, "
            f"failure={self.failure})"
        )


class dependent:  # noqa: N801 - ipyparallel's name
    """A function that only runs where ``df(*dargs, **dkwargs)`` is true; elsewhere it raises
    UnmetDependency so the scheduler can place it on another engine."""

    def __init__(
        self, _wrapped_f: Callable[..., Any], _df: Callable[..., Any], *dargs: Any, **dkwargs: Any
    ) -> None:
        self.f = _wrapped_f
        self.df = _df
        self.dargs = dargs
        self.dkwargs = dkwargs
        functools.update_wrapper(self, _wrapped_f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.df(*self.dargs, **self.dkwargs):
            raise UnmetDependency(f"dependency {getattr(self.df, '__name__', self.df)} not met")
        provided = getattr(self, "_provides", None)
        if provided:
            # @require: make the modules and objects visible to the wrapped function,
            # whichever globals it was rebuilt with on this engine.
            g = getattr(self.f, "__globals__", None)
            if g is not None:
                for name, value in provided().items():
                    g.setdefault(name, value)
        return self.f(*args, **kwargs)


def depend(_df: Callable[..., Any], *dargs: Any, **dkwargs: Any) -> Callable[[Callable], dependent]:
    """Decorator: run the function only where ``_df(*dargs, **dkwargs)`` returns True."""

    def deco(f: Callable[..., Any]) -> dependent:
        return dependent(f, _df, *dargs, **dkwargs)

    return deco


@interactive
def _require(*modules: str, **mapping: Any) -> bool:
    g = globals()
    for name in modules:
        try:
            g[name.split(".")[0]] = importlib.import_module(name)
        except ImportError:
            return False
    g.update(mapping)
    return True


def require(*objects: Any, **mapping: Any) -> Callable[[Callable], dependent]:
    """Decorator: the function needs these modules (names or module objects) on the engine;
    they are imported into its namespace first. Objects (functions) are pushed by value."""
    names: list[str] = []
    for obj in objects:
        if isinstance(obj, str):
            names.append(obj)
        elif hasattr(obj, "__name__") and type(obj).__name__ == "module":
            names.append(obj.__name__)
        elif callable(obj):
            mapping[obj.__name__] = obj
        else:
            raise TypeError(f"require() takes module names, modules or functions, not {obj!r}")

    def provides() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in names:
            importlib.import_module(name)
            top = name.split(".")[0]
            out[top] = importlib.import_module(top)
        out.update(mapping)
        return out

    def deco(f: Callable[..., Any]) -> dependent:
        dep = dependent(f, _require, *names, **mapping)
        dep._provides = provides
        return dep

    return deco


__all__ = ["Dependency", "depend", "dependent", "require"]
