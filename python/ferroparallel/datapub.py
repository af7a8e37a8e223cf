"""Publishing data from code that runs on an engine, while it runs.

``publish_data({"step": i, "loss": x})`` inside a task sends a ``data_message`` on IOPub; the
client merges each published dict into the task's ``metadata["data"]`` (``ar.data``), so a
client can watch intermediate values of a long computation before its result arrives. As in
ipyparallel (``ipyparallel.datapub.publish_data``).
"""

from __future__ import annotations

import sys
from typing import Any

from .wire_names import IPP_FORMAT_KEY

__all__ = ["publish_data"]


def publish_data(data: dict[str, Any]) -> None:
    """Publish ``data`` to the client that sent the running request.

    Parameters
    ----------
    data : dict
        Names and values (any picklable objects; large arrays travel as out-of-band buffers).
        The client updates the request's ``metadata["data"]`` with it: a later publish of a
        key replaces the earlier value.

    Raises
    ------
    TypeError
        If ``data`` is not a dict.
    RuntimeError
        When not called from code an engine is running (on the client, or between requests).
    """
    if not isinstance(data, dict):
        raise TypeError(f"publish_data takes a dict, not {type(data).__name__}")
    from .engine.kernel import active_kernel
    from .serialize import serialize_object

    kernel = active_kernel()
    parent = kernel.shell.parent if kernel is not None else None
    if kernel is None or parent is None:
        raise RuntimeError(
            "publish_data() works only in code running on a ferroparallel engine (inside "
            "view.apply/execute); on the client, keep the values in a local variable"
        )
    extra = {IPP_FORMAT_KEY: False}  # (always said: ipyparallel's engines send no such key)
    if getattr(kernel.shell, "ipp_request", False):  # for an ipyparallel client's apply
        from .serialize.ipp_compat import serialize_ipp_result

        buffers = serialize_ipp_result(data)
        extra = {IPP_FORMAT_KEY: True}
    elif parent.get("msg_type") == "apply_request":  # our client's (its payload says so)
        buffers = serialize_object(data)
    else:
        # an execute_request says nothing of its client, which may be ipyparallel's: one
        # pickle without out-of-band buffers, which its deserialize_object reads too
        buffers = serialize_object(data, threshold=sys.maxsize)
    # content ``{keys: [...]}`` and ipyparallel's topic (no engine prefix), so that any
    # ipyparallel peer sees it; keys no packer can write are named by their repr
    keys = [k if k is None or isinstance(k, (str, int, float)) else repr(k) for k in data]
    kernel.publish(
        "data_message",
        {"keys": keys},
        parent,
        "datapub",
        buffers=buffers,
        prefixed=False,
        metadata=extra,
    )
