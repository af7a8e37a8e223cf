"""``Reference``: a name (or expression) evaluated in the engine's namespace."""

from __future__ import annotations

from typing import Any


class Reference:
    """A placeholder replaced by ``eval(name, namespace)`` on the engine.

    Pass it as an argument (or inside a list, tuple or dict argument) of ``apply`` to use a
    value that already lives on the engine instead of sending one::

        view.push({"a": numpy.arange(10)})
        view.apply_sync(len, Reference("a"))        # -> 10 on every engine

    Parameters
    ----------
    name : str
        A Python expression, usually a variable name, evaluated in the namespace given to
        :func:`~ferroparallel.serialize.deserialize_object` /
        :func:`~ferroparallel.serialize.unpack_apply_message`. Without a namespace (on the
        client) a ``Reference`` stays a ``Reference``.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Reference name must be a str, not {type(name).__name__}")
        self.name = name

    def get_object(self, g: dict[str, Any] | None = None) -> Any:
        """Evaluate the reference in the namespace ``g`` (ipyparallel's parameter name).

        Parameters
        ----------
        g : dict, optional
            Globals for :func:`eval` (the engine's user namespace); without it, only builtins
            are visible.

        Returns
        -------
        object
            The value of the expression.
        """
        return eval(self.name, {} if g is None else g)  # noqa: S307

    def __repr__(self) -> str:
        return f"<Reference: {self.name!r}>"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Reference:
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash((Reference, self.name))

    def __reduce__(self) -> tuple[Any, ...]:
        return Reference, (self.name,)
