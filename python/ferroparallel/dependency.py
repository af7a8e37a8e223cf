"""Task dependencies: ``Dependency`` (msg_id sets for ``after``/``follow``) and functional
dependencies checked on the engine (``@require``, ``@depend``, ``dependent``)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from .error import UnmetDependency
from .serialize.interactive import engine_helper


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
    """A function that only runs on engines where ``df(*dargs, **dkwargs)`` holds.

    The condition is checked on the engine when the task arrives (when the object is unpacked
    into the engine's namespace), not when the object is called: calling it locally runs the
    function. Where ``df`` returns ``False`` (or raises :class:`UnmetDependency`) the task fails
    with UnmetDependency, and a load-balanced scheduler tries it on another engine.

    Parameters
    ----------
    _wrapped_f : callable
        The function to run.
    _df : callable
        The condition, called as ``_df(*dargs, **dkwargs)`` on the engine.
    *dargs, **dkwargs
        Its arguments.
    """

    def __init__(
        self, _wrapped_f: Callable[..., Any], _df: Callable[..., Any], *dargs: Any, **dkwargs: Any
    ) -> None:
        functools.update_wrapper(self, _wrapped_f)  # first: it copies _wrapped_f.__dict__
        self.__dict__.pop("_provides", None)
        if not hasattr(self, "__name__"):
            self.__name__ = "f"
        self.f = _wrapped_f
        self.df = _df
        self.dargs = dargs
        self.dkwargs = dkwargs

    def check_dependency(self) -> None:
        """Raise :class:`UnmetDependency` if the condition returns ``False`` here.

        Raises
        ------
        UnmetDependency
            ``df(*dargs, **dkwargs)`` returned ``False`` (or raised it).
        """
        if self.df(*self.dargs, **self.dkwargs) is False:
            name = getattr(self.df, "__name__", repr(self.df))
            raise UnmetDependency(f"dependency {name} not met")

    def _resolve_in(self, resolve: Callable[[Any], Any]) -> dependent:
        """Engine side: bind the parts to the user namespace, then check the condition."""
        self.f = resolve(self.f)
        self.df = resolve(self.df)
        self.dargs = resolve(self.dargs)
        self.dkwargs = resolve(self.dkwargs)
        self.check_dependency()
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        provided = getattr(self, "_provides", None)
        if provided:
            # @require: make the modules and objects visible to the wrapped function,
            # whichever globals it was rebuilt with on this engine.
            g = getattr(self.f, "__globals__", None)
            if g is not None:
                for name, value in provided().items():
                    g.setdefault(name, value)
        return self.f(*args, **kwargs)


class depend:  # noqa: N801 - ipyparallel's name
    """Decorator: run the function only on engines where ``_df(*dargs, **dkwargs)`` holds.

    Parameters
    ----------
    _df : callable
        The condition, called on the engine before the task runs; returning ``False`` (or
        raising :class:`UnmetDependency`) sends the task to another engine.
    *dargs, **dkwargs
        Its arguments.

    Examples
    --------
    >>> @depend(has_gpu, 0)
    ... def train(x): ...
    >>> lview.apply(train, data)  # doctest: +SKIP
    """

    def __init__(self, _df: Callable[..., Any], *dargs: Any, **dkwargs: Any) -> None:
        self.f = _df
        self.args = dargs
        self.kwargs = dkwargs

    def __call__(self, f: Callable[..., Any]) -> dependent:
        return dependent(f, self.f, *self.args, **self.kwargs)


@engine_helper
def _require(*modules: str, **mapping: Any) -> bool:
    g = globals()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UnmetDependency(name) from None
        top = name.split(".")[0]  # as ``import a.b`` binds ``a``
        g[top] = importlib.import_module(top)
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
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # a local call: the engine checks the requirement, not the caller
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
