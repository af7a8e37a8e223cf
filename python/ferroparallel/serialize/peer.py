"""Same-host arguments read straight from the sender's memory (see docs/decisions/0007).

For a request whose sender waits for its replies (a blocking ``push``, ``apply_sync``,
``scatter``, ...), large buffers are not copied at all on the sending side: the pickle holds a
:class:`PeerSlice` (process id and start time, address, length, host, and the msg_id of the
request that lends it) and the receiving engine copies the bytes into its own memory with
``process_vm_readv`` when it unpacks the request. That is one copy in all, into pages the
receiver allocates as it likes (transparent huge pages for NumPy), instead of a copy into
``/dev/shm`` pages (allocated 4 KiB at a time by tmpfs) plus a mapping per receiver.

The sender keeps every lent buffer alive until each reply to the request has arrived
(:class:`Loan`). A descriptor is honoured only for the request it was made for (its msg_id,
or the per-engine ids ``<msg_id>_<engine>`` of a fanned-out request, also when the scheduler
retries the task elsewhere); a request resubmitted later under a new msg_id cannot read memory
its sender may have reused. The sender's start time guards against a recycled pid.

Received buffers are private copies; like every received buffer they are handed out read-only.
"""

from __future__ import annotations

import array
import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import _core
from .shm import DataUnreachable, LenderGone, ShmError, _pid_namespace, _start_time, host_token

#: ``FERROPARALLEL_PEER_READ=0`` (or ``off``/``false``/``no``) disables lending.
ENV_ENABLE = "FERROPARALLEL_PEER_READ"

#: Reads this process made: ``[count, bytes]`` (tests and diagnostics).
reads = [0, 0]
#: Seconds an engine waits for a client to pick up a lent result before it moves on, plus one
#: second per :data:`PICKUP_RATE` bytes of the result (a huge copy into cold memory is slow).
PICKUP_TIMEOUT = 30.0
PICKUP_RATE = 100e6

log = logging.getLogger("ferroparallel.peer")

_request = threading.local()


def enabled_by_env() -> bool:
    """False when ``$FERROPARALLEL_PEER_READ`` says off; True otherwise."""
    value = os.environ.get(ENV_ENABLE, "").strip().lower()
    return value not in ("0", "off", "false", "no")


_identity: tuple[int, int] = (-1, 0)


def peer_token() -> str:
    """Equal in two processes iff one can name the other by pid: a digest (16 hex digits) of
    the host token and the pid namespace."""
    text = f"{host_token()}/pid:{_pid_namespace()}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def own_identity() -> tuple[int, int]:
    """``(pid, start time)`` of this process (computed once, again in a forked child:
    ``getpid`` is a system call, and this is asked on every waiting request)."""
    global _identity
    if _identity[0] < 0:
        pid = os.getpid()
        _identity = (pid, _start_time(pid) or 0)
    return _identity


def _forget_identity() -> None:
    global _identity
    _identity = (-1, 0)


os.register_at_fork(after_in_child=_forget_identity)


# ----- sender -------------------------------------------------------------------------------


class PeerSlice:
    """Descriptor of one lent buffer; unpickles to a read-only copy read from the sender."""

    __slots__ = ("addr", "host", "loan", "nbytes", "pid", "start")

    def __init__(self, pid: int, start: int, addr: int, nbytes: int, host: str, loan: str) -> None:
        self.pid = pid
        self.start = start
        self.addr = addr
        self.nbytes = nbytes
        self.host = host
        self.loan = loan

    def __reduce__(self) -> tuple[Any, ...]:
        return read_slice, (self.pid, self.start, self.addr, self.nbytes, self.host, self.loan)

    def __repr__(self) -> str:
        return f"<PeerSlice pid {self.pid} {self.addr:#x}+{self.nbytes} for {self.loan}>"


class Loan:
    """The buffers one request lends; :meth:`release` lets them go (idempotent)."""

    __slots__ = ("__weakref__", "buffers", "msg_id", "nbytes")

    def __init__(self, msg_id: str) -> None:
        self.msg_id = msg_id
        self.buffers: list[memoryview] = []
        self.nbytes = 0

    def release(self) -> None:
        """Drop the references to the lent buffers."""
        self.buffers = []

    def __repr__(self) -> str:
        return f"<Loan {self.msg_id}: {len(self.buffers)} buffers, {self.nbytes} bytes>"


class LoanWriter:
    """Out-of-band sink for the pickler (the interface of ``shm.SegmentWriter``): buffers above
    ``threshold`` are lent, by address, to the receivers of request ``msg_id``."""

    def __init__(self, threshold: int, msg_id: str, host: str | None = None) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, not {threshold}")
        self.threshold = threshold
        self.host = peer_token() if host is None else host
        self.loan = Loan(msg_id)

    def __len__(self) -> int:
        return len(self.loan.buffers)

    def wants(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` is lent."""
        return nbytes > self.threshold

    def add(self, raw: memoryview) -> PeerSlice:
        """Lend ``raw`` (a flat contiguous view; kept alive by the loan)."""
        addr, nbytes = _core.buffer_address(raw)
        self.loan.buffers.append(raw)
        self.loan.nbytes += nbytes
        pid, start = own_identity()
        return PeerSlice(pid, start, addr, nbytes, self.host, self.loan.msg_id)


_orphans: list[Loan] = []


def orphan(loan: Loan) -> None:
    """Keep ``loan`` until the process exits (its client closed with requests outstanding)."""
    _orphans.append(loan)


# ----- receiver -----------------------------------------------------------------------------


class ThreadSetting:
    """``with ThreadSetting(local, name, value):`` sets a thread-local attribute for the
    block, then restores it (a class: a generator context manager costs ~1.5 µs more, on every
    request)."""

    __slots__ = ("_local", "_name", "_prev", "_value")

    def __init__(self, local: threading.local, name: str, value: Any) -> None:
        self._local = local
        self._name = name
        self._value = value
        self._prev: Any = None

    def __enter__(self) -> None:
        self._prev = getattr(self._local, self._name, None)
        setattr(self._local, self._name, self._value)

    def __exit__(self, *exc: object) -> None:
        setattr(self._local, self._name, self._prev)


def serving(msg_id: str) -> ThreadSetting:
    """Unpack the arguments of request ``msg_id`` inside this ``with`` block (descriptors lent
    to another request are refused)."""
    return ThreadSetting(_request, "msg_id", msg_id)


def _allocate(nbytes: int) -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a test dependency
        return bytearray(nbytes)
    return np.empty(nbytes, dtype=np.uint8)  # NumPy asks for transparent huge pages


def read_slice(pid: int, start: int, addr: int, nbytes: int, host: str, loan: str) -> memoryview:
    """Receiver side of a :class:`PeerSlice`: copy the lent bytes into a new buffer.

    Raises
    ------
    ShmError
        If the descriptor was not made for the request being unpacked, the sender runs on
        another host or is gone, or its memory cannot be read (permissions, unmapped range).
    """
    current = getattr(_request, "msg_id", None)
    if current is None or not (current == loan or current.startswith(loan + "_")):
        raise ShmError(
            f"these buffers were lent from another process's memory for request {loan!r} and "
            f"can only be read while that request's message is delivered (a resubmitted "
            f"request or a result fetched later from the hub cannot reuse them: run the "
            f"request again)"
        )
    here = peer_token()
    if host != here:
        raise DataUnreachable(
            f"buffers lent by a process on another host or pid namespace ({host!r}, this "
            f"is {here!r}): disable lending for clusters spanning hosts ({ENV_ENABLE}=0)"
        )
    if _start_time(pid) != start:
        raise LenderGone(f"the process that lent these buffers (pid {pid}) is gone")
    dest = _allocate(nbytes)
    try:
        _core.read_process_memory(pid, addr, dest)
    except OSError as e:
        raise ShmError(f"cannot read the buffers lent by pid {pid}: {e}") from None
    reads[0] += 1
    reads[1] += nbytes
    return memoryview(dest).toreadonly()


# ----- capability probe ---------------------------------------------------------------------


def make_probe() -> tuple[bytes, list[Any]]:
    """A client's probe: ``(secret, request)``. An engine that can read this process answers
    with the secret's hex (see :func:`answer_probe`); keep ``secret`` alive until then."""
    secret = os.urandom(16)
    pid, start = own_identity()
    addr, nbytes = _core.buffer_address(secret)
    return secret, [pid, start, addr, nbytes, peer_token()]


def answer_probe(request: Any) -> str:
    """An engine's answer to a probe: the hex of the bytes it read, or why it could not."""
    try:
        pid, start, addr, nbytes, token = request
        pid, start, addr, nbytes = int(pid), int(start), int(addr), int(nbytes)
    except (TypeError, ValueError):
        return "error: malformed probe"
    if not 0 < nbytes <= 64:
        return "error: malformed probe"
    if token != peer_token():
        return "error: another host or pid namespace"
    if _start_time(pid) != start:
        return f"error: no process {pid} with that start time here"
    dest = bytearray(nbytes)
    try:
        _core.read_process_memory(pid, addr, dest)
    except (OSError, ValueError) as e:
        return f"error: {e}"
    return dest.hex()


def check_lend_probe(answer: Any) -> bool:
    """Client side of an engine's lend probe ``[pid, start, addr, nbytes, token, hex]`` (in its
    ``kernel_info_reply``): whether this process can read the engine's memory."""
    try:
        pid, start, addr, nbytes, token, expected = answer
        pid, start, addr, nbytes = int(pid), int(start), int(addr), int(nbytes)
    except (TypeError, ValueError):
        return False
    if token != peer_token() or not 0 < nbytes <= 64 or _start_time(pid) != start:
        return False
    dest = bytearray(nbytes)
    try:
        _core.read_process_memory(pid, addr, dest)
    except (OSError, ValueError):
        return False
    return dest.hex() == expected


_lend_secret = os.urandom(16)


def lend_probe() -> list[Any]:
    """An engine's lend probe: where a client can read a secret of this process, and its hex."""
    pid, start = own_identity()
    addr, nbytes = _core.buffer_address(_lend_secret)
    return [pid, start, addr, nbytes, peer_token(), _lend_secret.hex()]


# ----- lent results (engine side) -------------------------------------------------------------


class Seals:
    """Words a client clears once it holds its copy of a lent result (one per lent reply).

    A slot holds the nonce of its result while the engine waits; the client reads the buffers,
    then checks the slot still holds the nonce (so the engine had not moved on while it read)
    and writes 0. Slots are reused round-robin; nonces are random, so a late check of a reused
    slot fails instead of passing.
    """

    SLOTS = 1024

    def __init__(self) -> None:
        self._words = array.array("Q", bytes(8 * self.SLOTS))
        self._base, _ = _core.buffer_address(self._words)
        self._next = 0

    def take(self) -> tuple[int, int]:
        """A slot armed with a fresh nonce: ``(index, nonce)``."""
        i = self._next
        self._next = (i + 1) % self.SLOTS
        nonce = int.from_bytes(os.urandom(8), "little") | 1
        self._words[i] = nonce
        return i, nonce

    def address(self, i: int) -> int:
        return self._base + 8 * i

    def holds(self, i: int, nonce: int) -> bool:
        return self._words[i] == nonce

    def clear(self, i: int) -> None:
        self._words[i] = 0


class LentResult:
    """A result lent to a waiting client: its buffers stay alive until :meth:`wait` returns."""

    def __init__(self, loan: Loan, seals: Seals, client: Sequence[Any]) -> None:
        self.loan = loan
        self.seals = seals
        self.slot, self.nonce = seals.take()
        self.client_pid, self.client_start = int(client[0]), int(client[1])

    def reply_metadata(self) -> list[int]:
        """``[pid, start, seal address, nonce]`` for the reply (``LENT_RESULT_KEY``)."""
        pid, start = own_identity()
        return [pid, start, self.seals.address(self.slot), self.nonce]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the client picked the result up (True), died, or ``timeout`` passed
        (default :data:`PICKUP_TIMEOUT` plus a second per :data:`PICKUP_RATE` bytes); then
        release the buffers. After a False return the client's copy is refused."""
        if timeout is None:
            timeout = PICKUP_TIMEOUT + self.loan.nbytes / PICKUP_RATE
        seals, i, nonce = self.seals, self.slot, self.nonce
        start = time.monotonic()
        deadline, check_alive = start + timeout, start + 0.1
        delay = 20e-6
        picked = True
        while seals.holds(i, nonce):
            now = time.monotonic()
            if now >= check_alive:
                check_alive = now + 0.1
                if _start_time(self.client_pid) != self.client_start:
                    picked = False
                    break
            if now >= deadline:
                log.warning(
                    "client %d did not pick up a lent result in %.0f s: moving on",
                    self.client_pid,
                    timeout,
                )
                picked = False
                break
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        seals.clear(i)  # a pickup from now on sees the slot changed and refuses its copy
        self.loan.release()
        return picked


# ----- lent results (client side) -------------------------------------------------------------


def finish_pickup(lent: Any) -> bool:
    """After reading a lent result (or failing to): whether the copy is valid, i.e. the engine
    was still waiting; in any case tell the engine it may move on. ``lent`` is the reply's
    ``[pid, start, seal address, nonce]``."""
    try:
        pid, start, addr, nonce = (int(x) for x in lent)
    except (TypeError, ValueError):
        return False
    if _start_time(pid) != start:
        return False  # the engine is gone (or its pid now names another process)
    word = bytearray(8)
    try:
        _core.read_process_memory(pid, addr, word)
        valid = int.from_bytes(word, "little") == nonce
        if valid:
            _core.write_process_memory(pid, addr, bytes(8))
    except (OSError, ValueError):
        return False
    return valid
