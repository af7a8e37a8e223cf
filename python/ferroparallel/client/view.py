"""Views: DirectView (explicit engines) and LoadBalancedView (the task scheduler)."""

from __future__ import annotations

import builtins
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import FunctionType
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, HasTraits, Instance, Integer, Unicode, observe, validate

from .. import error
from ..dependency import Dependency
from ..serialize.apply import plain_chunk_packer
from ..serialize.pickling import Prepickled, _reference_pickle
from .asyncresult import AsyncMapResult, AsyncResult
from .executor import ViewExecutor
from .imap import LazyMapIterator
from .mapping import chunk_sequence, dists
from .remote_helpers import _execute, _map_chunk, _pull, _push


class View(HasTraits):
    """Base of the views: flags (``block``, ``targets``, ``track``, ``label``) and the
    submission methods shared by DirectView and LoadBalancedView."""

    block = Bool(False)
    track = Bool(False)
    targets = AnyTrait()
    label = Unicode(None, allow_none=True)
    client = Instance("ferroparallel.client.client.Client")
    _flag_names = ("block", "track", "targets", "label")
    #: Whether the scheduler picks the engine of each task (a LoadBalancedView).
    load_balanced = False

    def __init__(self, client: Any = None, targets: Any = None, **flags: Any) -> None:
        super().__init__(client=client, targets=targets)
        self.block = client.block
        self.set_flags(**flags)
        # what was submitted through this view (ipyparallel's view.history / outstanding)
        self._history: list[str] = []
        # the msg_ids of each request that may not have finished (one tuple per request: a
        # request to N engines adds one entry, not N), read by ``outstanding``
        self._unfinished: list[tuple[str, ...]] = []
        self._prune_at = 1024  # number of entries at which finished requests leave it
        self._unfinished_lock = threading.Lock()  # (readers and pruners; appends need none)

    def __repr__(self) -> str:
        t = self.targets
        shown = t if not isinstance(t, list) or len(t) <= 16 else f"{t[:4]}...{t[-4:]}"
        return f"<{type(self).__name__} {shown}>"

    def __len__(self) -> int:
        targets = self.targets
        if targets is None or targets == "all":
            return len(self.client.ids)
        if isinstance(targets, int):
            return 1
        if isinstance(targets, list | tuple | range) and not len(targets):
            return 0  # an empty view (rc[4:] of 4 engines), as in ipyparallel
        return len(self.client._build_targets(targets)[1])

    # ----- flags ----------------------------------------------------------------------------

    def _check_flag_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._flag_names:
                raise KeyError(f"Invalid name: {name!r}; flags are {', '.join(self._flag_names)}")

    def set_flags(self, **kwargs: Any) -> View:
        """Set view flags (``block``, ``track``, ``targets``, ``label``, …); returns the view
        (as ipyparallel: ``view.set_flags(block=True).apply(f)``)."""
        self._check_flag_names(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        return self

    @contextlib.contextmanager
    def temp_flags(self, **kwargs: Any) -> Iterator[None]:
        """Set flags for the duration of a ``with`` block."""
        self._check_flag_names(kwargs)
        saved = {k: getattr(self, k) for k in kwargs}
        self.set_flags(**kwargs)
        try:
            yield
        finally:
            self.set_flags(**saved)

    def _block(self, block: bool | None) -> bool:
        return self.block if block is None else bool(block)

    # ----- apply ----------------------------------------------------------------------------

    def apply(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely; blocks when ``view.block`` is True."""
        return self._really_apply(f, args, kwargs)

    def apply_async(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> AsyncResult:
        """Call ``f(*args, **kwargs)`` remotely; returns an AsyncResult at once."""
        return self._really_apply(f, args, kwargs, block=False)

    def apply_sync(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely and wait for the result."""
        return self._really_apply(f, args, kwargs, block=True)

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        block: bool | None = None,
        **options: Any,
    ) -> Any:
        raise NotImplementedError

    def map(self, f: Callable[..., Any], /, *sequences: Any, **kwargs: Any) -> Any:
        """Map ``f`` over sequences in parallel; blocks when ``view.block`` is True."""
        block = kwargs.pop("block", None)
        return self._map(f, sequences, block=self._block(block), **kwargs)

    def map_async(self, f: Callable[..., Any], /, *sequences: Any, **kwargs: Any) -> AsyncMapResult:
        """``map(..., block=False)``: returns an AsyncMapResult at once."""
        if "block" in kwargs:
            raise TypeError("map_async takes no `block` argument (use map(..., block=...))")
        return self._map(f, sequences, block=False, **kwargs)

    def map_sync(self, f: Callable[..., Any], /, *sequences: Any, **kwargs: Any) -> list[Any]:
        """``map(..., block=True)``: returns the list of results."""
        if "block" in kwargs:
            raise TypeError("map_sync takes no `block` argument (use map(..., block=...))")
        return self._map(f, sequences, block=True, **kwargs)

    def _map(
        self, f: Callable[..., Any], sequences: Sequence[Any], block: bool, **kwargs: Any
    ) -> Any:
        raise NotImplementedError

    def remote(self, block: bool | None = None, **flags: Any) -> Callable[[Callable], Any]:
        """Decorator: calling the function runs it through this view's ``apply``.

        Without ``block``, the function blocks as the view does now (its ``block`` flag is
        read here, at decoration, as ipyparallel's views do).
        """
        from .remotefunction import RemoteFunction

        block = self.block if block is None else block

        def deco(f: Callable[..., Any]) -> Any:
            return RemoteFunction(self, f, block=block, **flags)

        return deco

    def parallel(
        self, dist: str = "b", block: bool | None = None, **flags: Any
    ) -> Callable[[Callable], Any]:
        """Decorator: calling the function maps it over its (sequence) arguments.

        Without ``block``, the function blocks as the view does now (read at decoration, as
        ipyparallel's views do).
        """
        from .remotefunction import ParallelFunction

        block = self.block if block is None else block

        def deco(f: Callable[..., Any]) -> Any:
            return ParallelFunction(self, f, dist=dist, block=block, **flags)

        return deco

    def wait(self, jobs: Any = None, timeout: float = -1) -> bool:
        """Wait for jobs (default: everything submitted through this view); True when they
        are done, False when ``timeout`` seconds passed first."""
        return self.client.wait(list(self.outstanding) if jobs is None else jobs, timeout)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> Any:
        """Abort queued jobs (default: this view's outstanding ones) on this view's engines
        (``block`` and ``targets`` default to the view's; blocking, it returns None once every
        engine answered). As in ipyparallel, an empty list of jobs asks the engines to abort
        everything queued on them."""
        return self.client.abort(
            list(self.outstanding) if jobs is None else jobs,
            targets=self.targets if targets is None else targets,
            block=self._block(block),
        )

    def shutdown(
        self,
        targets: Any = None,
        restart: bool = False,
        hub: bool = False,
        block: bool | None = None,
    ) -> None:
        """Stop engines (default: this view's; all of them for a load-balanced view), and the
        hub too with ``hub=True``; ``block`` defaults to the view's."""
        if targets is None or (isinstance(targets, str) and targets == "all"):
            targets = self.targets if self.targets is not None else "all"
        self.client.shutdown(targets, restart=restart, hub=hub, block=self._block(block))

    def purge_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget finished results here and in the hub (see :meth:`Client.purge_results`);
        ``targets`` None or ``'all'`` means this view's engines."""
        if targets is None or (isinstance(targets, str) and targets == "all"):
            targets = self.targets if self.targets is not None else "all"
        self.client.purge_results(jobs=jobs, targets=targets)

    def imap(self, f: Callable[..., Any], /, *sequences: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate over ``map_async(f, *sequences)``'s results as they become available, in
        order."""
        return iter(self.map_async(f, *sequences, **kwargs))

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict[Any, Any]:
        """Queue counts from the controller."""
        return self.client.queue_status(
            targets if targets is not None else self.targets, verbose=verbose
        )

    def spin(self) -> None:
        self.client.spin()

    def get_result(
        self, indices_or_msg_ids: Any = None, block: bool | None = None, owner: bool = False
    ) -> Any:
        """Results by msg_id, or by index into this view's :attr:`history` (default: the
        last request of this view); see :meth:`Client.get_result`."""
        jobs = -1 if indices_or_msg_ids is None else indices_or_msg_ids
        if isinstance(jobs, int):
            jobs = self._history_entry(jobs)
        elif isinstance(jobs, (list, tuple, set)):
            jobs = [self._history_entry(j) if isinstance(j, int) else j for j in jobs]
        return self.client.get_result(jobs, block=block, owner=owner)

    def _history_entry(self, index: int) -> str:
        try:
            return self._history[index]
        except IndexError:
            raise IndexError(
                f"no request {index} in this view's history ({len(self._history)} requests "
                "submitted through it); pass a msg_id, or use client.get_result for the "
                "client's history"
            ) from None

    @property
    def history(self) -> list[str]:
        """msg_ids of the requests submitted through this view, oldest first."""
        return self._history

    @property
    def outstanding(self) -> set[str]:
        """msg_ids submitted through this view that have not finished."""
        pending = self.client.outstanding
        with self._unfinished_lock:
            entries = self._unfinished
            n = len(entries)  # (requests submitted meanwhile are appended after these)
            # iterate over our own entries only: the dispatcher thread changes the client's set
            left = {m for ids in entries[:n] for m in ids if m in pending}
            entries[:n] = [tuple(left)] if left else []
        return left

    def _prune(self) -> None:
        """Drop the entries of requests that have finished on every engine. Costs little per
        entry: a request still outstanding is recognised by its first msg_id that is."""
        pending = self.client._trait_values["outstanding"]
        with self._unfinished_lock:
            entries = self._unfinished
            n = len(entries)
            entries[:n] = [ids for ids in entries[:n] if not pending.isdisjoint(ids)]
            self._prune_at = 2 * len(entries) + 1024

    @property
    def results(self) -> dict[str, Any]:
        return self.client.results

    @property
    def executor(self) -> Any:
        """The ``concurrent.futures.Executor`` submitting through this view (one per view)."""
        ex = self.__dict__.get("_executor")
        if ex is None:
            ex = self.__dict__["_executor"] = ViewExecutor(self)
        return ex

    def _record(self, ar: AsyncResult) -> None:
        """``ar`` was submitted through this view: the client may drop what ``ar`` owns, and
        the view remembers its msg_ids."""
        ids = ar._msg_ids  # (the tuple: ``msg_ids`` makes a list)
        ar._client._own(ids, getattr(ar, "_group", None))
        ar.owner = True  # as ipyparallel's views: the result leaves the client's caches
        self._history.extend(ids)
        unfinished = self._unfinished
        unfinished.append(ids)
        if len(unfinished) > self._prune_at:  # amortized: never read, still bounded
            self._prune()

    def _finish(self, ar: AsyncResult, block: bool) -> Any:
        self._record(ar)
        if block:
            try:
                return ar.get()
            except KeyboardInterrupt:
                raise
        return ar


class DirectView(View):
    """Run code on explicit engines (``rc[0]``, ``rc[:]``, ``rc[[0, 2]]``)."""

    def __init__(self, client: Any = None, targets: Any = "all", **flags: Any) -> None:
        super().__init__(client=client, targets=targets, **flags)

    def _request_md(self, label: str | None = None) -> dict[str, Any]:
        """Metadata of this view's requests (the engine copies it into the replies); ``label``
        overrides the view's."""
        label = self.label if label is None else label
        return {"label": label} if label else {}

    def _targets(self, targets: Any = None) -> tuple[list[str], list[int], bool]:
        t = self.targets if targets is None else targets
        uuids, ids = self.client._build_targets(t)
        single = isinstance(t, int)
        return uuids, ids, single

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        block: bool | None = None,
        targets: Any = None,
        track: bool | None = None,
        **options: Any,
    ) -> Any:
        block = self.block if block is None else bool(block)
        track = self.track if track is None else track
        client = self.client
        t = self.targets if targets is None else targets
        uuids, ids = client._build_targets(t)
        md = self._request_md()
        shm = client._shm
        if block or getattr(shm._calls, "waits", False):
            with shm.waiting(block):
                futs = client.apply_to(uuids, f, args, kwargs, md, bool(track))
        else:  # (this thread does not wait already: shm.waiting(False) would change nothing)
            futs = client.apply_to(uuids, f, args, kwargs, md, bool(track))
        single = isinstance(t, int)
        ar = AsyncResult(client, futs, fname=_name_of(f), targets=ids[0] if single else ids)
        return self._finish(ar, block)

    def _map(
        self, f: Callable[..., Any], sequences: Sequence[Any], block: bool, **kwargs: Any
    ) -> Any:
        return_exceptions = bool(kwargs.pop("return_exceptions", False))
        track = bool(kwargs.pop("track", False))
        md = self._request_md(kwargs.pop("label", None))
        if kwargs:
            raise TypeError(f"DirectView.map got unexpected arguments: {', '.join(kwargs)}")
        sequences = _as_sequences(sequences, mapping=True)
        uuids, ids, _ = self._targets()
        n = min(len(ids), min(len(s) for s in sequences)) or 1
        mapper = dists["b"]()
        futs = []
        sizes = []
        runner = Prepickled(_map_chunk)  # pickled once for every chunk
        fp = _pickled_once(f)
        with self.client._shm.waiting(block):
            for p in range(n):
                parts = [mapper.getPartition(s, p, n) for s in sequences]
                sizes.append(min(len(x) for x in parts))
                futs.append(
                    self.client.send_apply_request(
                        "mux", runner, (fp, *parts), {}, md, track, ident=uuids[p]
                    )
                )
        ar = AsyncMapResult(
            self.client,
            futs,
            mapper,
            fname=_name_of(f),
            chunk_sizes=sizes,
            return_exceptions=return_exceptions,
        )
        return self._finish(ar, block)

    def _parallel_call(
        self,
        f: Callable[..., Any],
        sequences: Sequence[Any],
        dist: str,
        block: bool,
        chunksize: int | None,
        return_exceptions: bool = False,
    ) -> Any:
        sequences = _as_sequences(sequences, mapping=False)
        uuids, ids, _ = self._targets()
        mapper = dists[dist]()
        n = len(ids)
        futs = []
        with self.client._shm.waiting(block):
            for p, u in enumerate(uuids):
                parts = [mapper.getPartition(s, p, n) for s in sequences]
                if not len(parts[0]):  # as ipyparallel: no call on an empty part (the
                    continue  # sequences are shorter than the engines, or empty)
                futs.append(self.client.send_apply_request("mux", f, parts, {}, ident=u))
        ar = AsyncMapResult(
            self.client, futs, mapper, fname=_name_of(f), return_exceptions=return_exceptions
        )
        return self._finish(ar, block)

    def execute(
        self,
        code: str,
        silent: bool = True,
        targets: Any = None,
        block: bool | None = None,
        label: str | None = None,
    ) -> Any:
        """Run code (a string) in the engines' namespaces (``label``: the tasks' label, default
        the view's)."""
        block = self._block(block)
        uuids, ids, single = self._targets(targets)
        md = self._request_md(label)
        futs = self.client.execute_on(uuids, code, silent=silent, metadata=md)
        ar = AsyncResult(self.client, futs, fname="execute", targets=ids[0] if single else ids)
        self._record(ar)
        if block:
            # as ipyparallel: blocking waits for the replies (raising a failure) and for the
            # output, and still returns the AsyncResult (for display_outputs, stdout, ...)
            ar.get()
            ar._await_output()
        return ar

    def run(
        self,
        filename: str,
        targets: Any = None,
        block: bool | None = None,
        label: str | None = None,
    ) -> Any:
        """Execute a local Python file on the engines."""
        with open(filename, encoding="utf-8") as fh:
            code = fh.read()
        return self.execute(code, targets=targets, block=block, label=label)

    def push(
        self,
        ns: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        """Set names in the engines' namespaces from a dict."""
        if not isinstance(ns, dict):
            raise TypeError(f"push takes a dict of names, not {type(ns).__name__}")
        for key in ns:
            if not isinstance(key, str):
                raise TypeError(
                    f"push takes names (str keys) to set on the engines, not "
                    f"{type(key).__name__} {key!r}"
                )
        return self._really_apply(_push, (ns,), {}, block=block, targets=targets, track=track)

    def update(self, ns: dict[str, Any]) -> Any:
        return self.push(ns)

    def pull(
        self, names: str | Sequence[str], targets: Any = None, block: bool | None = None
    ) -> Any:
        """Get names (or expressions) from the engines' namespaces."""
        if not isinstance(names, str):
            if not isinstance(names, (list, tuple, set)):
                raise TypeError(f"names must be a str or a list of str, not {type(names).__name__}")
            names = list(names)
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"names must be strings, not {type(n).__name__}")
        return self._really_apply(_pull, (names,), {}, block=block, targets=targets)

    def get(self, key_s: str | Sequence[str]) -> Any:
        return self.pull(key_s, block=True)

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.push({key: value}, block=True)

    def scatter(
        self,
        key: str,
        seq: Any,
        dist: str = "b",
        flatten: bool = False,
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        """Partition ``seq`` across the engines, binding each part to ``key``."""
        block = self._block(block)
        track = bool(self.track if track is None else track)
        if dist not in dists:
            raise ValueError(f"dist must be one of {sorted(dists)}, not {dist!r}")
        if isinstance(seq, dict) or not hasattr(seq, "__len__") or not hasattr(seq, "__getitem__"):
            if not hasattr(seq, "__iter__"):
                raise TypeError(
                    f"scatter needs a sequence or iterable (list, tuple, range, array, set"
                    f"...), not {type(seq).__name__}; to send one object to every engine, "
                    "use push"
                )
            seq = list(seq)  # as ipyparallel: a set, a dict's keys... are split as a list
        uuids, ids, _ = self._targets(targets)
        mapper = dists[dist]()
        n = len(ids)
        futs = []
        with self.client._shm.waiting(block):
            for p, u in enumerate(uuids):
                part = mapper.getPartition(seq, p, n)
                if flatten and len(part) == 1:
                    part = part[0]
                futs.append(
                    self.client.send_apply_request(
                        "mux", _push, ({key: part},), {}, track=track, ident=u
                    )
                )
        ar = AsyncResult(self.client, futs, fname="scatter", targets=ids)
        if block:
            self._finish(ar, block)  # waits, and raises a failure
            return None  # as ipyparallel: nothing to return once the parts are in place
        return self._finish(ar, block)

    def gather(
        self, key: str, dist: str = "b", targets: Any = None, block: bool | None = None
    ) -> Any:
        """Collect the parts of ``key`` from the engines into one sequence."""
        block = self._block(block)
        if dist not in dists:
            raise ValueError(f"dist must be one of {sorted(dists)}, not {dist!r}")
        uuids, ids, _ = self._targets(targets)
        with self.client._shm.waiting(block):
            futs = self.client.apply_to(uuids, _pull, (key,), {}, self._request_md())
        ar = AsyncMapResult(self.client, futs, dists[dist](), fname="gather")
        return self._finish(ar, block)

    @property
    def importer(self) -> Any:
        """``sync_imports(local=True)`` as a property: ``with view.importer: import x``."""
        return self.sync_imports(True)

    @contextlib.contextmanager
    def sync_imports(self, local: bool = True, quiet: bool = False) -> Iterator[None]:
        """Imports inside this ``with`` block also run on the engines.

        As ipyparallel's: each import runs locally first (with ``local=True``), so a module
        that cannot be imported here raises ``ImportError`` out of the block before anything
        is said or sent for it; each one that worked is announced (``importing x on
        engine(s)``, unless ``quiet``) and sent to the engines at once. When the block ends
        normally, the engines' imports are waited for (their ``ImportError`` raised as a
        ``RemoteError``/``CompositeError``); when it raises, what was sent still runs.
        """
        real_import = builtins.__import__
        imports: list[str] = []
        sent: list[Any] = []

        def recording_import(name: str, *args: Any, **kwargs: Any) -> Any:
            fromlist = kwargs.get("fromlist", args[2] if len(args) > 2 else ()) or ()
            level = kwargs.get("level", args[3] if len(args) > 3 else 0)
            if level == 0 and not imports_in_progress:
                imports_in_progress.append(name)
                try:
                    mod = real_import(name, *args, **kwargs) if local else None
                    if fromlist:
                        stmt = f"from {name} import {', '.join(fromlist)}"
                        said = f"importing {','.join(fromlist)} from {name} on engine(s)"
                    else:
                        stmt, said = f"import {name}", f"importing {name} on engine(s)"
                    if stmt not in imports:
                        imports.append(stmt)
                        if not quiet:  # ipyparallel's words, once the local import worked
                            print(said)
                        sent.append(self._really_apply(_execute, (stmt,), {}, block=False))
                    return mod
                finally:
                    imports_in_progress.pop()
            return real_import(name, *args, **kwargs)

        imports_in_progress: list[str] = []
        builtins.__import__ = recording_import
        try:
            yield
        finally:
            builtins.__import__ = real_import
        for ar in sent:
            ar.get()

    def use_cloudpickle(self, block: bool | None = None) -> Any:
        from .. import serialize

        serialize.use_cloudpickle()
        # as ipyparallel's: the engines run the same function (so the AsyncResult is named
        # after it)
        return self._really_apply(serialize.use_cloudpickle, (), {}, block=block)

    def use_pickle(self, block: bool | None = None) -> Any:
        from .. import serialize

        serialize.use_pickle()
        return self._really_apply(serialize.use_pickle, (), {}, block=block)

    def use_dill(self, block: bool | None = None) -> Any:
        from .. import serialize

        serialize.use_dill()
        return self._really_apply(serialize.use_dill, (), {}, block=block)

    def clear(self, targets: Any = None, block: bool | None = None) -> Any:
        """Clear the engines' namespaces (``block`` defaults to the view's)."""
        return self.client.clear(
            targets if targets is not None else self.targets, block=self._block(block)
        )

    def activate(self, suffix: str = "") -> None:
        """Make this view the one the IPython magics (``%px``, ``%%px``, ``%pxresult``,
        ``%pxconfig``, ``%autopx``) run on; with ``suffix``, register them under new names
        (``%px<suffix>`` …) so that several views can be active at once. Outside IPython it
        warns and does nothing. Returns None, as ipyparallel's (so that a notebook cell
        ending with it shows nothing)."""
        try:
            from .magics import activate
        except ImportError:
            import warnings

            warnings.warn(
                "the parallel magics need IPython (pip install ferroparallel[magics])",
                UserWarning,  # as ipyparallel's
                stacklevel=2,
            )
            return None
        activate(self, suffix)
        return None


class BroadcastView(DirectView):
    """ipyparallel's BroadcastView: a DirectView (whose requests to several engines already
    leave the client once and are fanned out by the controller).

    ``is_coalescing`` is accepted and recorded for compatibility; replies always come back
    one per engine, and results are the same list either way.
    """

    is_coalescing = Bool(False)
    _flag_names = ("block", "track", "targets", "label", "is_coalescing")

    def _request_md(self, label: str | None = None) -> dict[str, Any]:
        """As ipyparallel's: the requests (and so their results' metadata) say they were
        broadcast, and whether coalescing was asked for."""
        md = super()._request_md(label)
        md.update(is_broadcast=True, is_coalescing=bool(self.is_coalescing))
        return md


class LoadBalancedView(View):
    """Let the controller's scheduler choose the engine for each task."""

    load_balanced = True

    after = AnyTrait(None, allow_none=True)
    follow = AnyTrait(None, allow_none=True)
    timeout = AnyTrait(0.0, help="seconds a task may wait to start (0: no limit)")
    retries = Integer(0)
    _flag_names = ("block", "track", "targets", "label", "after", "follow", "timeout", "retries")

    def __init__(self, client: Any = None, targets: Any = None, **flags: Any) -> None:
        #: the task metadata of the current flags, while they need no per-call work (see
        #: ``_task_metadata``); dropped whenever a flag changes
        self._md_cache: dict[str, Any] | None = None
        super().__init__(client=client, targets=targets, **flags)

    @observe("targets", "after", "follow", "timeout", "retries", "label")
    def _flags_changed(self, change: Any) -> None:
        self._md_cache = None
        if change["name"] == "timeout" and change["new"] is None:
            self.timeout = 0.0  # None (which skips validation) also means no limit

    @validate("after", "follow")
    def _check_dependency(self, proposal: Any) -> Any:
        dep = proposal["value"]
        if not _valid_dependency(dep):
            raise ValueError(
                f"Invalid dependency: {dep!r}; give msg_ids, AsyncResults, a list of them, "
                "or an ipp.Dependency"
            )
        return dep

    @validate("retries")
    def _check_retries(self, proposal: Any) -> int:
        n = proposal["value"]
        if n < 0:
            raise ValueError(f"Invalid retries: {n} (the times a failed task is rerun, >= 0)")
        return n

    @validate("timeout")
    def _check_timeout(self, proposal: Any) -> Any:
        t = proposal["value"]
        if t is None:
            return 0.0  # no limit
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"Invalid type for timeout: {type(t).__name__} (seconds, 0 for none)")
        if t < 0:
            raise ValueError(f"Invalid timeout: {t} (seconds >= 0; 0 for no timeout)")
        return float(t)

    def _task_metadata(self, **overrides: Any) -> dict[str, Any]:
        if not overrides:
            cached = self._md_cache
            if cached is not None:
                return dict(cached)
        md = self._build_task_metadata(**overrides)
        if not overrides and self.targets is None and not md["after"] and not md["follow"]:
            # no engine list to resolve, no dependency that could change: reusable as it is
            self._md_cache = md
            return dict(md)
        return md

    def _build_task_metadata(self, **overrides: Any) -> dict[str, Any]:
        targets = overrides.get("targets", self.targets)
        uuids = self.client._build_targets(targets)[0] if targets is not None else []
        md: dict[str, Any] = {
            "after": _dep_ids(overrides.get("after", self.after)),
            "follow": _dep_ids(overrides.get("follow", self.follow)),
            "timeout": overrides.get("timeout", self.timeout),
            "targets": uuids,
            "retries": overrides.get("retries", self.retries),
        }
        label = overrides.get("label", self.label)
        if label:
            md["label"] = label
        return md

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        block: bool | None = None,
        **options: Any,
    ) -> Any:
        block = self.block if block is None else bool(block)
        track = options.pop("track", None)
        track = bool(self.track if track is None else track)
        # with no engine yet, the task waits in the scheduler until one arrives
        md = None if options else self._md_cache
        if md is None:
            md = self._task_metadata(**options)
        # (else the cached dict itself: send_apply_request copies the metadata it is given)
        client = self.client
        shm = client._shm
        if block or getattr(shm._calls, "waits", False):
            with shm.waiting(block):
                fut = client.send_apply_request("task", f, args, kwargs, md, track)
        else:  # (this thread does not wait already: shm.waiting(False) would change nothing)
            fut = client.send_apply_request("task", f, args, kwargs, md, track)
        ar = AsyncResult(client, [fut], fname=_name_of(f))
        return self._finish(ar, block)

    def _map(
        self,
        f: Callable[..., Any],
        sequences: Sequence[Any],
        block: bool,
        chunksize: int = 1,
        ordered: bool = True,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Any:
        label = kwargs.pop("label", None)
        if kwargs:
            raise TypeError(f"LoadBalancedView.map got unexpected arguments: {', '.join(kwargs)}")
        sequences = _as_sequences(sequences, mapping=True)
        if chunksize < 0:
            raise ValueError("chunksize must be >= 1 (0 is taken as 1, as ipyparallel)")
        chunksize = max(chunksize, 1)
        md = self._task_metadata() if label is None else self._task_metadata(label=label)
        n = min(len(s) for s in sequences)
        futs: list[Any] = []
        sizes: list[int] = []
        mapper = dists["b"]()
        runner = Prepickled(_map_chunk)  # pickled once for every chunk
        fp = _chunk_function(f)
        client = self.client
        # plain data throughout (checked once): each chunk packed without scanning it again
        pack = plain_chunk_packer(runner, fp, sequences)
        with client._shm.waiting(block):
            for start in range(0, n, chunksize):
                stop = min(start + chunksize, n)
                parts = [_chunk_part(s[start:stop]) for s in sequences]
                sizes.append(stop - start)
                if pack is not None:
                    fut = client._send_packed_task(pack(parts), md)
                else:
                    fut = client.send_apply_request("task", runner, (fp, *parts), {}, metadata=md)
                futs.append(fut)
        ar = AsyncMapResult(
            self.client,
            futs,
            mapper,
            fname=_name_of(f),
            ordered=ordered,
            return_exceptions=return_exceptions,
            chunk_sizes=sizes,
        )
        return self._finish(ar, block)

    def _parallel_call(
        self,
        f: Callable[..., Any],
        sequences: Sequence[Any],
        dist: str,
        block: bool,
        chunksize: int | None,
        return_exceptions: bool = False,
    ) -> Any:
        # as ipyparallel: without a chunksize, one task per element (each call gets a part of
        # one element)
        sequences = _as_sequences(sequences, mapping=False)
        n = min(len(s) for s in sequences)
        size = chunksize or 1
        md = self._task_metadata()
        futs = []
        fp = _pickled_once(f)
        with self.client._shm.waiting(block):
            for idx in chunk_sequence(range(n), size):
                start, stop = idx[0], idx[-1] + 1
                parts = [s[start:stop] for s in sequences]
                futs.append(self.client.send_apply_request("task", fp, parts, {}, metadata=md))
        ar = AsyncMapResult(
            self.client, futs, dists["b"](), fname=_name_of(f), return_exceptions=return_exceptions
        )
        return self._finish(ar, block)

    def imap(
        self,
        f: Callable[..., Any],
        *sequences: Any,
        ordered: bool = True,
        max_outstanding: int | str = "auto",
        return_exceptions: bool = False,
    ) -> LazyMapIterator:
        """Lazily map ``f``: consumes the inputs as it goes, from now on, keeping at most
        ``max_outstanding`` tasks in flight (``"auto"``: one per engine; ``0``: no limit, the
        whole input at once), and yields the results (in order unless ``ordered=False``;
        exceptions as values with ``return_exceptions=True``). The iterator's ``cancel()``
        stops submitting and aborts the tasks still queued."""
        if max_outstanding == "auto":
            limit = max(len(self.client.ids), 1)
        else:
            limit = int(max_outstanding)
            if limit < 0:
                raise ValueError("max_outstanding must be >= 0 (0: no limit) or 'auto'")
        return LazyMapIterator(self, _pickled_once(f), sequences, limit, ordered, return_exceptions)

    def register_joblib_backend(
        self, name: str = "ipyparallel", make_default: bool = False
    ) -> None:
        """Register this view as a joblib parallel backend."""
        from .joblib_backend import register

        register(self, name, make_default)


def _as_sequences(sequences: Sequence[Any], mapping: bool) -> list[Any]:
    """What ``map`` and parallel functions accept, as ipyparallel: sequences, or iterables
    (made lists here). ``map`` stops at the shortest sequence, as the builtin ``map`` does; a
    parallel function (``mapping=False``) needs sequences of equal length (ValueError)."""
    if not sequences:
        raise ValueError("map needs at least one sequence")
    out = []
    for s in sequences:
        if not (hasattr(s, "__len__") and hasattr(s, "__getitem__")) or isinstance(
            s, Mapping | AbstractSet
        ):  # (a dict maps over its keys, as the builtin map)
            try:
                s = list(s)
            except TypeError:
                raise TypeError(
                    f"map takes sequences or iterables (list, tuple, range, array, generator"
                    f"...), not {type(s).__name__}"
                ) from None
        out.append(s)
    lengths = [len(s) for s in out]
    if len(set(lengths)) > 1:
        if not mapping:
            raise ValueError(f"all sequences must have equal length, but have {lengths}")
        n = min(lengths)
        out = [s if len(s) == n else s[:n] for s in out]
    return out


def _valid_dependency(dep: Any, depth: int = 0) -> bool:
    """Whether ``dep`` is a dependency form ``after``/``follow`` accept: None, a msg_id, an
    AsyncResult (anything with ``msg_ids``), a Dependency or its dict form, or a list, tuple
    or set of those."""
    if dep is None or isinstance(dep, (str, Dependency)) or hasattr(dep, "msg_ids"):
        return True
    if isinstance(dep, dict):
        ids = dep.get("dependencies")
        return set(dep) == set(Dependency().as_dict()) and (
            isinstance(ids, list) and all(isinstance(d, str) for d in ids)
        )
    if isinstance(dep, (list, tuple, set, frozenset)) and depth < 8:
        return all(_valid_dependency(d, depth + 1) for d in dep if d is not None)
    return False


def _dep_ids(dep: Any) -> Any:
    """Dependencies as msg_ids (lists) or the dict form of a Dependency."""
    if dep is None:
        return []
    if hasattr(dep, "as_dict"):
        return dep.as_dict()
    if isinstance(dep, str):
        return [dep]
    if hasattr(dep, "msg_ids"):
        return list(dep.msg_ids)
    out: list[str] = []
    for d in dep:
        out.extend(_dep_ids(d) if not isinstance(d, str) else [d])
    return out


__all__ = ["BroadcastView", "DirectView", "LoadBalancedView", "View", "ViewExecutor", "error"]


def _name_of(f: Any) -> str:
    """The function name an AsyncResult reports (that of the function a Prepickled holds)."""
    if type(f) is Prepickled:
        f = f.function
    return getattr(f, "__name__", "f")


def _pickled_once(f: Any) -> Any:
    """``f`` serialized once for all the chunks of a map (a lambda or closure goes through
    cloudpickle, which costs far more than the chunk itself)."""
    return f if type(f) is Prepickled else Prepickled(f)


def _chunk_function(f: Any) -> Any:
    """The function argument of every chunk of a load-balanced map: ``f`` itself when it
    pickles by reference (module and name, from a cache: see ``pack_plain_call``), which the
    engine loads with one lookup; otherwise ``f`` serialized once (a lambda or closure)."""
    if type(f) is FunctionType and _reference_pickle(f) is not None:
        return f
    return _pickled_once(f)


#: Longest ``range`` part of a map chunk sent as a list (a list of ints pickles and unpickles
#: without the global lookup of ``range``, ~2 us on each end; a longer one stays a range,
#: which is a few bytes whatever its length).
_RANGE_AS_LIST = 16


def _chunk_part(part: Any) -> Any:
    """A chunk's slice of one sequence as sent: short ranges as lists (the function sees the
    same items)."""
    if type(part) is range and len(part) <= _RANGE_AS_LIST:
        return list(part)
    return part
