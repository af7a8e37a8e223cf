"""Same-host shared memory for large out-of-band buffers (see docs/decisions/0003).

A sender that knows its receivers run on the same host serializes with a
:class:`SegmentWriter`: every buffer above the writer's threshold is laid out in ONE segment
file under ``/dev/shm`` (one segment per message, however many buffers), and the pickle holds a
small :class:`ShmSlice` descriptor (segment name, offset, length, host) in its place. The bytes
are written once, with ``pwrite`` from the sender's memory (the sender never maps the segment,
so its RSS does not grow). Receivers map the segment read-only and rebuild arrays over the
mapping, so N receivers share one physical copy.

Lifetime: the segment's name exists only while the sender holds the :class:`Segment` (the
client releases it when every reply to the message has arrived, i.e. every receiver has mapped
it, or on close). A mapping outlives the name, so receivers keep their arrays. Names carry the
creator's pid, its start time and its pid namespace (``fp-<ns>-<pid>-<start>-<random>``): if
the creator dies without releasing, :func:`sweep` (run when a client, an engine or a controller
starts) removes segments whose creator is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from .._core import SharedMapping

#: Where segments live (a tmpfs on Linux).
log = logging.getLogger("ferroparallel.shm")

SHM_DIR = Path("/dev/shm")
#: Default size (bytes) above which a buffer goes through shared memory.
DEFAULT_SHM_THRESHOLD = 1 << 20
#: ``FERROPARALLEL_SHM=0`` (or ``off``/``false``/``no``) disables shared memory.
ENV_ENABLE = "FERROPARALLEL_SHM"
#: ``FERROPARALLEL_SHM_THRESHOLD=<bytes>`` overrides :data:`DEFAULT_SHM_THRESHOLD`.
ENV_THRESHOLD = "FERROPARALLEL_SHM_THRESHOLD"
#: ``FERROPARALLEL_HOST_TOKEN=<text>`` overrides the host token (tests, unusual setups).
ENV_HOST = "FERROPARALLEL_HOST_TOKEN"
#: Seconds a segment left behind by a closed client stays for requests still queued on engines
#: (see :meth:`Segment.detach`); overridden by ``$FERROPARALLEL_SHM_DETACH_GRACE``.
DETACH_GRACE = 300.0
ENV_DETACH_GRACE = "FERROPARALLEL_SHM_DETACH_GRACE"

#: Alignment of each buffer inside a segment (enough for any dtype and SIMD loads).
ALIGN = 64
#: Largest single ``pwrite`` (Linux caps one call at ~2 GiB; smaller chunks keep Ctrl-C prompt).
_WRITE_CHUNK = 256 << 20

_NAME_RE = re.compile(r"^fp-(\d+)-(\d+)-(\d+)-([0-9a-f]{16})$")


class ShmError(RuntimeError):
    """A shared-memory segment cannot be created, found or mapped."""


class LenderGone(ShmError):
    """The process that lent buffers (an engine's result, a client's arguments) ended before
    they were read."""


class DataUnreachable(ShmError):
    """Buffers described in a message cannot be reached from this process at all (another
    host, or a lender this process cannot connect to), as opposed to buffers that are gone.
    Another engine may still reach them: an engine that meets this while unpacking a
    load-balanced task answers it as an unmet dependency, so the scheduler tries elsewhere."""


# ----- identity -----------------------------------------------------------------------------


def host_token() -> str:
    """A token equal in two processes iff they can share ``/dev/shm`` segments.

    Hostname, kernel boot id and the device of ``/dev/shm`` (two containers on one kernel with
    separate ``/dev/shm`` mounts differ by the device). ``$FERROPARALLEL_HOST_TOKEN`` wins.
    """
    forced = os.environ.get(ENV_HOST)
    if forced:
        return forced
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    try:
        dev = str(SHM_DIR.stat().st_dev)
    except OSError:
        dev = "?"
    return f"{socket.gethostname()}/{boot}/{dev}"


def enabled_by_env() -> bool:
    """False when ``$FERROPARALLEL_SHM`` says off; True otherwise."""
    value = os.environ.get(ENV_ENABLE, "").strip().lower()
    return value not in ("0", "off", "false", "no")


def threshold_from_env(default: int = DEFAULT_SHM_THRESHOLD) -> int:
    """``$FERROPARALLEL_SHM_THRESHOLD`` as an int (bytes), else ``default``."""
    value = os.environ.get(ENV_THRESHOLD, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV_THRESHOLD} must be a number of bytes, not {value!r}") from None
    if n < 0:
        raise ValueError(f"{ENV_THRESHOLD} must be >= 0, not {n}")
    return n


def available() -> bool:
    """Whether this process can create segments (``/dev/shm`` exists and is writable)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK | os.X_OK)


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None  # a zombie holds nothing
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_prefix: tuple[int, str] = (-1, "")


def new_segment_name() -> str:
    """``fp-<pid namespace>-<pid>-<start time>-<16 hex>`` for this process."""
    global _prefix
    pid = os.getpid()
    if _prefix[0] != pid:  # first call, or a forked child
        _prefix = (pid, f"fp-{_pid_namespace()}-{pid}-{_start_time(pid) or 0}-")
    return _prefix[1] + secrets.token_hex(8)


def detach_grace() -> float:
    """Seconds a detached segment is kept (:data:`DETACH_GRACE`, or the environment's: a value
    that is no number of seconds >= 0 is named in a warning and the default used, since this
    is read while a client closes)."""
    raw = os.environ.get(ENV_DETACH_GRACE, "").strip()
    if not raw:
        return DETACH_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not grace >= 0:  # (NaN too)
        log.warning(
            "%s must be a number of seconds >= 0, not %r: using %g",
            ENV_DETACH_GRACE,
            raw,
            DETACH_GRACE,
        )
        return DETACH_GRACE
    return grace


def creator_alive(name: str) -> bool | None:
    """Whether the creator of segment ``name`` still runs; ``None`` if we cannot tell (not
    one of ours, or made in another pid namespace)."""
    m = _NAME_RE.match(name)
    if m is None or int(m.group(1)) != _pid_namespace():
        return None
    return _start_time(int(m.group(2))) == int(m.group(3))


def sweep(directory: Path | None = None) -> list[str]:
    """Unlink segments whose creator is dead; returns their names.

    Only names of our format made in this pid namespace are considered, so a segment whose
    creator we cannot see is never removed.
    """
    d = SHM_DIR if directory is None else directory
    removed: list[str] = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith("fp-") or creator_alive(name) is not False:
            continue
        try:
            if os.stat(d / name).st_mtime > now:
                continue  # detached by a closed client, for requests still queued
            os.unlink(d / name)
            removed.append(name)
        except OSError:
            pass
    return removed


def our_segments(pid: int | None = None, directory: Path | None = None) -> list[str]:
    """Names of the segments created by ``pid`` (default: this process) that still exist."""
    d = SHM_DIR if directory is None else directory
    pid = os.getpid() if pid is None else pid
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for name in names:
        m = _NAME_RE.match(name)
        if m is not None and int(m.group(2)) == pid:
            out.append(name)
    return sorted(out)


# ----- sender -------------------------------------------------------------------------------


class OutOfBandSink(Protocol):
    """Where the pickler puts large buffers instead of frames: a :class:`SegmentWriter`, or a
    :class:`~ferroparallel.serialize.peer.LoanWriter` (lent by address)."""

    threshold: int

    def __len__(self) -> int: ...

    def wants(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` goes to this sink."""
        ...

    def add(self, raw: memoryview) -> Any:
        """Take ``raw``; returns the descriptor pickled in its place."""
        ...


class ShmSlice:
    """Descriptor of one buffer inside a segment; unpickles to a read-only memoryview."""

    __slots__ = ("host", "name", "nbytes", "offset")

    def __init__(self, name: str, offset: int, nbytes: int, host: str) -> None:
        self.name = name
        self.offset = offset
        self.nbytes = nbytes
        self.host = host

    def __reduce__(self) -> tuple[Any, ...]:
        return open_slice, (self.name, self.offset, self.nbytes, self.host)

    def __repr__(self) -> str:
        return f"<ShmSlice {self.name}[{self.offset}:{self.offset + self.nbytes}]>"


class Segment:
    """A created segment; :meth:`release` unlinks its name (idempotent, thread-safe enough:
    a second unlink is a no-op)."""

    __slots__ = ("__weakref__", "name", "nbytes", "path")

    def __init__(self, name: str, nbytes: int, directory: Path) -> None:
        self.name = name
        self.nbytes = nbytes
        self.path = directory / name

    def release(self) -> None:
        """Unlink the name; existing mappings stay valid."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def detach(self, grace: float | None = None) -> None:
        """Leave the name for requests still queued on engines, which map it when they reach
        them: its modification time is set ``grace`` seconds (default :data:`DETACH_GRACE`)
        into the future, and :func:`sweep` keeps a segment whose time has not come even
        when its creator is gone; after that it is swept like a crashed client's."""
        if grace is None:
            grace = detach_grace()
        until = time.time() + grace
        try:
            os.utime(self.path, (until, until))
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.nbytes} bytes>"


class SegmentWriter:
    """Collects the buffers of one message, then writes them into one new segment.

    Parameters
    ----------
    threshold : int
        Buffers of more than ``threshold`` bytes go to the segment.
    host : str, optional
        Host token written into the descriptors (default :func:`host_token`).
    directory : Path, optional
        Where to create the segment (default :data:`SHM_DIR`).
    """

    def __init__(
        self, threshold: int, host: str | None = None, directory: Path | None = None
    ) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, not {threshold}")
        self.threshold = threshold
        self.host = host_token() if host is None else host
        self.directory = SHM_DIR if directory is None else directory
        self.name = ""  # chosen with the first buffer
        self.nbytes = 0
        self._parts: list[tuple[memoryview, int]] = []

    def __len__(self) -> int:
        return len(self._parts)

    def wants(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` goes to the segment."""
        return nbytes > self.threshold

    def add(self, raw: memoryview) -> ShmSlice:
        """Reserve room for ``raw`` (a flat contiguous view, kept alive until :meth:`commit`)."""
        if not self.name:
            self.name = new_segment_name()
        offset = -(-self.nbytes // ALIGN) * ALIGN
        self._parts.append((raw, offset))
        self.nbytes = offset + raw.nbytes
        return ShmSlice(self.name, offset, raw.nbytes, self.host)

    def commit(self) -> Segment:
        """Create the segment and copy every buffer into it (one copy, by the kernel).

        Returns
        -------
        Segment
            The owner of the name; release it when every receiver has mapped the segment.

        Raises
        ------
        OSError
            If the segment cannot be created or filled (``/dev/shm`` full: ``ENOSPC``). Nothing
            is left behind, also when interrupted (``KeyboardInterrupt``).
        """
        if not self._parts:
            raise ValueError("no buffer was added: nothing to commit")
        seg = Segment(self.name, self.nbytes, self.directory)
        fd = os.open(seg.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            for raw, offset in self._parts:
                _write_all(fd, raw, offset)
        except BaseException:
            seg.release()
            raise
        finally:
            os.close(fd)
            self._parts.clear()
        return seg


def _write_all(fd: int, raw: memoryview, offset: int) -> None:
    view = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw
    done = 0
    total = view.nbytes
    while done < total:
        n = os.pwrite(fd, view[done : done + _WRITE_CHUNK], offset + done)
        if n <= 0:
            raise OSError(f"short write to a shared-memory segment at {offset + done}")
        done += n


# ----- receiver -----------------------------------------------------------------------------

_mapped: weakref.WeakValueDictionary[str, SharedMapping] = weakref.WeakValueDictionary()


def open_slice(name: str, offset: int, nbytes: int, host: str) -> memoryview:
    """Receiver side of a :class:`ShmSlice`: a read-only view into the mapped segment.

    Each segment is mapped once per process (while any view of it lives), read-only; the
    mapping is unmapped when the last array over it is freed.

    Raises
    ------
    ShmError
        If the segment does not exist here (another host, or already released by its sender)
        or is smaller than the descriptor says.
    """
    if not _NAME_RE.match(name):
        raise ShmError(f"not a ferroparallel shared-memory segment name: {name!r}")
    mm = _mapped.get(name)
    if mm is None:
        path = SHM_DIR / name
        try:
            # mapped without keeping a descriptor (mmap.mmap keeps one per mapping, and a
            # process holding many received arrays would run out of them)
            mm = SharedMapping(str(path))
        except FileNotFoundError:
            here = host_token()
            why = (
                f"the sender is on another host ({host!r}, this is {here!r}): disable shared "
                f"memory for clusters spanning hosts ({ENV_ENABLE}=0)"
                if host != here
                else "its sender already released it (resubmitted requests cannot reuse "
                "shared-memory arguments) or crashed"
            )
            if host != here:
                raise DataUnreachable(
                    f"shared-memory segment {path} does not exist: {why}"
                ) from None
            raise ShmError(f"shared-memory segment {path} does not exist: {why}") from None
        except OSError as e:
            raise ShmError(f"cannot map shared-memory segment {path}: {e}") from None
        _mapped[name] = mm
    if offset < 0 or nbytes < 0 or offset + nbytes > len(mm):
        raise ShmError(
            f"descriptor [{offset}:{offset + nbytes}] is outside segment {name} ({len(mm)} bytes)"
        )
    return memoryview(mm)[offset : offset + nbytes]


def release_name(name: str, directory: Path | None = None) -> bool:
    """Unlink the segment ``name`` (a receiver done with a result segment). Only names of
    ferroparallel segments are accepted, so a peer cannot make us remove other files.

    Returns
    -------
    bool
        Whether ``name`` was a segment name (whether or not it still existed).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return False
    Segment(name, 0, SHM_DIR if directory is None else directory).release()
    return True
