"""Small functions the views run on engines (push, pull, map chunks, imports).

Those marked ``@engine_helper`` have the engine's user namespace as their globals, whatever
the pickler.
"""

from __future__ import annotations

from typing import Any

from ..serialize.interactive import engine_helper


@engine_helper
def _push(__fp_ns__: dict[str, Any]) -> None:
    g = globals()
    for __fp_key__, __fp_value__ in __fp_ns__.items():
        if __fp_key__.isidentifier():
            g[__fp_key__] = __fp_value__
        else:  # dotted or indexed names: assign through exec
            g["__fp_value__"] = __fp_value__
            exec(f"{__fp_key__} = __fp_value__", g)  # noqa: S102
            g.pop("__fp_value__", None)


@engine_helper
def _pull(__fp_keys__: Any) -> Any:
    g = globals()
    if isinstance(__fp_keys__, str):
        return eval(__fp_keys__, g)  # noqa: S307
    return [eval(k, g) for k in __fp_keys__]  # noqa: S307


def _map_chunk(__fp_f__: Any, *__fp_seqs__: Any) -> list[Any]:
    # not @interactive: it needs no user globals, and pickled by reference it costs an engine
    # ~1 us to load per chunk instead of ~11 us (rebuilding and relinking a function)
    return list(map(__fp_f__, *__fp_seqs__))


@engine_helper
def _execute(__fp_code__: str) -> None:
    exec(__fp_code__, globals())  # noqa: S102
