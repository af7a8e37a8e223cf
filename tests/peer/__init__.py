"""An independent pure-Python peer of the ipyparallel wire protocol.

It imports nothing from ferroparallel, so the conformance tests and the benchmarks can check the
Rust core from the outside.
"""

from .session import DELIMITER, PROTOCOL_VERSION, PeerWireError, Session, new_id

__all__ = ["DELIMITER", "PROTOCOL_VERSION", "PeerWireError", "Session", "new_id"]
