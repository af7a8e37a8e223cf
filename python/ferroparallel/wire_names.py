"""Names on the wire that ferroparallel's own client and engine agree on, beyond the
ipyparallel protocol (which peers that do not know them simply ignore).

See ``docs/protocol.md`` ("ferroparallel extensions").
"""

from __future__ import annotations

__all__ = [
    "BUFFERS_CHANGED_KEY",
    "BUFFERS_CHANGED_MESSAGE",
    "LENT_RESULT_KEY",
    "LEND_RESULTS_KEY",
    "LENT_TO_KEY",
    "NET_LENT_KEY",
    "NET_LEND_RESULTS_KEY",
    "NO_STATUS_KEY",
    "OUTPUT_COUNT_KEY",
    "OUTPUT_TOPIC_PREFIX",
    "IPP_FORMAT_KEY",
    "DATAPUB_TOPIC",
    "SHM_HOST_KEY",
    "SHM_SEGMENT_KEY",
]

#: Metadata key that the receiving process's Rust core sets (locally, never sent) on a message
#: whose signature is valid but whose buffers do not match their signed digest
#: (``buffers_mac``): the message arrives without its buffers, so that the receiver can answer
#: it with an error instead of dropping it (which would leave its sender waiting forever).
BUFFERS_CHANGED_KEY = "fp_buffers_changed"

#: What such a message's sender is told.
BUFFERS_CHANGED_MESSAGE = (
    "its buffers changed while they were being sent (an array was modified after a "
    "non-blocking call that sends it without copying, before the call had sent it), or were "
    "altered on the way; nothing was run with them. Send again, and do not modify arrays "
    "until a non-blocking call has sent them (track=True and ar.wait_for_send(), or "
    "block=True, or send a copy)"
)

#: What a ferroparallel client subscribes to on IOPub: every engine's messages
#: (``engine.<id>.<type>``, ``status`` included, as in ipyparallel).
OUTPUT_TOPIC_PREFIX = b"engine."

#: Reply and ``data_message`` metadata key: whether the buffers are in ipyparallel's
#: serialization (a ferroparallel engine answering an ipyparallel client's apply). Our engines'
#: ``data_message`` always has it; their replies only when true (a reply without it is ours if
#: it carries ``OUTPUT_COUNT_KEY``, else an ipyparallel engine's).
IPP_FORMAT_KEY = "fp_ipp_format"

#: The IOPub topic of ``data_message`` (``publish_data``), without an engine prefix: that of
#: ipyparallel's engines (its ``ZMQDataPublisher.topic``), which ours use too.
DATAPUB_TOPIC = b"datapub"

#: Reply metadata key: how many IOPub output messages (all but status) the engine published
#: for the request before replying. A client that has received that many knows the request's
#: output is complete without waiting for the ``idle`` status.
OUTPUT_COUNT_KEY = "fp_outputs"

#: Request metadata key: the client's host token, sent when it accepts large results through
#: shared memory (an engine with the same token may answer with segment descriptors).
SHM_HOST_KEY = "fp_shm_host"

#: Reply metadata key: the name of the shared-memory segment that holds the result's large
#: buffers; the client unlinks it once it has mapped the result.
SHM_SEGMENT_KEY = "fp_shm_segment"

#: Request metadata key: when true, the engine publishes no ``busy``/``idle`` status around the
#: request. Status messages exist for the requester's benefit; a ferroparallel client knows
#: when output is complete from ``OUTPUT_COUNT_KEY`` and never subscribes to them, so it asks
#: engines not to send them (they were half of an engine's and the controller's work per
#: no-op task). Requests without the key (every other peer) get status messages as always.
NO_STATUS_KEY = "fp_no_status"

#: Request metadata key: ``[pid, start time, token]`` of a client that waits for this reply and
#: can read the engine's memory: the engine may lend the result's large buffers instead of
#: copying them (``docs/decisions/0007-reading-peer-memory.md``).
LEND_RESULTS_KEY = "fp_lend_results"

#: Reply metadata key: ``[pid, start time, seal address, nonce]`` of a lent result. The engine
#: waits until the word at the seal address no longer holds the nonce; the client, having read
#: the buffers, checks the word still holds it (the copy is valid) and writes 0.
LENT_RESULT_KEY = "fp_lent_result"

#: Request metadata key of a load-balanced task whose large arguments were put in a segment or
#: lent: the engines (uuids) the client knew could reach them. Any of those that cannot reach
#: them any more reports the failure; another engine (one that joined later) answers the task
#: as an unmet dependency so that the scheduler tries elsewhere.
LENT_TO_KEY = "fp_lent_to"

#: Request metadata: the client waits for the reply and can fetch from this engine's data
#: endpoint (``True``): large result buffers may be lent over the network
#: (``docs/decisions/0014-direct-data-path.md``).
NET_LEND_RESULTS_KEY = "fp_net_results"

#: Reply metadata of a result lent over the network: ``[data endpoint, token, nbytes]``; the engine
#: runs nothing else until the client fetched it (or released it with ``fp_fetch_release``).
NET_LENT_KEY = "fp_net_lent"
