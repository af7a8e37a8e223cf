"""Names on the wire that ferroparallel's own client and engine agree on, beyond the
ipyparallel protocol (which peers that do not know them simply ignore).

See ``docs/protocol.md`` ("ferroparallel extensions").
"""

from __future__ import annotations

__all__ = ["OUTPUT_COUNT_KEY", "OUTPUT_TOPIC_PREFIX", "STATUS_TOPIC_PREFIX"]

#: IOPub topic of an engine's ``status`` messages: ``status.engine.<id>``. Every other IOPub
#: message keeps ipyparallel's ``engine.<id>.<type>``.
STATUS_TOPIC_PREFIX = b"status.engine."

#: What a ferroparallel client subscribes to on IOPub: every output, but not the status
#: messages of ferroparallel engines (ipyparallel engines' ``engine.<id>.status`` still match).
OUTPUT_TOPIC_PREFIX = b"engine."

#: Reply metadata key: how many IOPub output messages (all but status) the engine published
#: for the request before replying. A client that has received that many knows the request's
#: output is complete without waiting for the ``idle`` status.
OUTPUT_COUNT_KEY = "fp_outputs"
