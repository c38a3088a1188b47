"""Loaded adapters: public names, atomic replacement, refcounts of in-flight requests, drained unloads.

Each loaded version gets a fresh INTERNAL name (``tone@1a2b3c4d.7``) in the engine's adapter store;
the public name maps to the current internal one. Replacing ``tone`` adds the new tensors under a
new internal name, then swaps the mapping under the lock: requests already admitted keep (and
refcount) the old entry and finish on the old weights; the old version leaves the store when its
refcount reaches zero. Every check (path, size, checksum, ABI, dtype) runs before anything
changes, so a failed load leaves the loaded set as it was.

A load reads, hashes, parses and checks the bytes with no lock held that the scheduler takes (the
parse releases the GIL a tensor at a time, see :mod:`slmops.adapter_format`); only the swap and the
store's dict insert are locked. A version whose removal from the store fails is retried with
backoff (``UNLOAD_RETRY_DELAYS_S``) and counted in the metrics until it succeeds.

Bounded memory (``memory_budget``, the server's ``--adapter-memory``): the bytes of every version in
the store (current, and replaced ones still in use) stay within the budget. A load that would pass
it first evicts loaded adapters that no admitted request holds (refcount 0), least recently used
first, never a pinned one (``--pin``); if that cannot make room it fails with RESOURCE_EXHAUSTED and
evicts nothing. An evicted adapter is not forgotten: with ``lazy`` on, the next request that names
it loads it again from where it came from (its file, the bundle, or a spooled copy of an upload),
as it loads any ``<adapter_dir>/<name>.onnx_adapter`` on first use (LoRAX-style). The request that
triggers a load waits for it in its own thread; the scheduler and the other streams do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops import contract
from slmops.adapter_format import read_file
from slmops.bundle import LoraTemplate
from slmops.contract import ADAPTER_SUFFIX, MERGED_BUNDLE_PROBLEM, adapter_name_problem
from slmops.fsutil import pid_alive
from slmops.runtime.memory import arrays_nbytes, release_freed_memory
from slmops_serve.errors import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    ServeError,
)

log = logging.getLogger("slmops.serve")

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Uploads are spooled to <tmp>/slmops-adapter-spool-<pid>-*: a server killed (kill -9) leaves its
# folder behind, and the next server removes the folders of processes that no longer exist.
SPOOL_PREFIX = "slmops-adapter-spool-"
# Waits before each retry of a failed unload (then it is given up: logged, and counted as pending).
UNLOAD_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class AdapterFile:
    """A checked ``.onnx_adapter`` file: it matches the bundle's adapter ABI."""

    path: Path
    sha256: str
    size: int
    rank: int
    modules: list[str]


@dataclass
class LoadedAdapter:
    """One loaded version of an adapter. ``refcount`` = requests admitted with it and not finished."""

    name: str
    internal: str
    file: AdapterFile
    source: str
    loaded_at: float = field(default_factory=time.time)
    refcount: int = 0
    retired: bool = False  # replaced or unloaded: it leaves the store when refcount reaches 0
    unload_failures: int = 0  # failed attempts to remove it from the store
    nbytes: int = 0  # bytes of its tensors in the store
    last_used: float = field(default_factory=time.monotonic)  # admitted or finished a request (LRU order)

    @property
    def sha256(self) -> str:
        return self.file.sha256


@dataclass
class Origin:
    """Where a loaded adapter's bytes came from, to load it again after an eviction."""

    path: Path
    sha256: str
    trusted: bool  # the bundle's own file or a spooled upload: not checked against the adapter dir
    source: str


@dataclass
class LoadResult:
    adapter: LoadedAdapter
    replaced: LoadedAdapter | None
    unchanged: bool
    load_ms: float


def check_name(name: str) -> str:
    problem = adapter_name_problem(name)
    if problem is not None:
        raise ServeError(INVALID_ARGUMENT, "name", problem)
    return name


def sha256_bytes(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def check_adapter_bytes(data: Any, template: LoraTemplate, field_name: str, display: str,
                        sha: str | None = None) -> tuple[AdapterFile, dict[str, Any]]:
    """Parse ``data`` (an .onnx_adapter file's bytes) and check it against the bundle's adapter ABI
    (slmops.contract: names, shapes, dtype, A/B ranks). Returns the file's description and the
    tensors read from exactly these bytes. Messages name the file ``display``.

    Raises:
        ServeError: INVALID_ARGUMENT for bytes that are not an .onnx_adapter, FAILED_PRECONDITION for
            a file that does not match this bundle's lora_template.
    """
    if not template.inputs:
        raise ServeError(FAILED_PRECONDITION, field_name, MERGED_BUNDLE_PROBLEM)
    check = contract.check_adapter_bytes(data, template)
    if not check.readable:
        raise ServeError(INVALID_ARGUMENT, field_name, f"'{display}' is {check.summary()}")
    if check.problems:
        raise ServeError(FAILED_PRECONDITION, field_name, f"'{display}': {check.summary()}")
    described = AdapterFile(path=Path(display), sha256=sha or sha256_bytes(data), size=len(data), rank=check.rank,
                            modules=check.modules)
    return described, check.tensors


def check_adapter_file(path: Path, template: LoraTemplate, field_name: str = "path", display: str | None = None) -> AdapterFile:
    """:func:`check_adapter_bytes` of the file at ``path`` (``display`` defaults to its name)."""
    described, _ = check_adapter_bytes(read_file(path), template, field_name, display or Path(path).name)
    return dataclasses.replace(described, path=Path(path))


class AdapterRegistry:
    """The adapters one engine serves. Thread-safe.

    Args:
        store: the engine's adapter store (anything with ``add(name, tensors)`` and ``unload(name)``).
        template (LoraTemplate): the bundle's adapter ABI every file is checked against.
        adapter_dir (Path): the only folder ``load(path=...)`` may read from.
        max_upload_bytes (int): largest ``load(data=...)``.
        on_change: called (no args) after the loaded set changed, e.g. to update metrics.
        on_unload_failed: called with the adapter name after each failed removal from the store.
        memory_budget (int | None): bytes the store may hold (None = unbounded); loads evict idle,
            unpinned adapters, least recently used first, to stay within it.
        pinned: adapter names never evicted.
        lazy (bool): a request naming an adapter that is not loaded loads it (again) on first use,
            from where it came from or ``<adapter_dir>/<name>.onnx_adapter``.
        on_evict: called with each evicted entry (after it left the store).
        on_lazy_load: called with each entry a request loaded.
    """

    def __init__(self, store: Any, template: LoraTemplate, adapter_dir: Path, max_upload_bytes: int,
                 on_change: Callable[[], None] | None = None,
                 on_unload_failed: Callable[[str], None] | None = None, memory_budget: int | None = None,
                 pinned: Iterable[str] = (), lazy: bool = False,
                 on_evict: Callable[[LoadedAdapter], None] | None = None,
                 on_lazy_load: Callable[[LoadedAdapter], None] | None = None) -> None:
        self._store = store
        self.template = template
        self.adapter_dir = Path(adapter_dir)
        self.max_upload_bytes = max_upload_bytes
        self._on_change = on_change
        self._on_unload_failed = on_unload_failed
        self._lock = threading.Condition()
        # One swap at a time: "is it unchanged? add, swap" of a load and the pop of an unload. Held
        # only for dict work, never while a file is read or checked; the scheduler never takes it.
        self._swap_lock = threading.Lock()
        self._current: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._pending: list[LoadedAdapter] = []  # removal from the store failed; retried by a timer
        self._timers: set[threading.Timer] = set()
        self._closed = False
        self._seq = 0
        self._requests: Counter[str] = Counter()
        self.memory_budget = memory_budget
        self.pinned = frozenset(pinned)
        self.lazy = lazy
        self._on_evict = on_evict
        self._on_lazy_load = on_lazy_load
        self._held = 0  # bytes of every version in the store (current, retired, pending)
        self.evictions = 0
        self._origins: dict[str, Origin] = {}  # name -> where to load it again (loaded or evicted)
        self._evicted: dict[str, LoadedAdapter] = {}  # evicted, not loaded since: an unload still answers for it
        self._loading: dict[str, threading.Event] = {}  # names a request is loading now
        self._spool: Path | None = None  # copies of uploads, so an evicted upload can come back
        remove_stale_spools()  # of a server killed before it could remove its own

    @property
    def store(self) -> Any:
        return self._store

    # ---- requests -----------------------------------------------------------------------------
    def acquire(self, name: str) -> LoadedAdapter:
        """The current version of ``name``, refcounted until ``release``. With ``lazy``, a name that
        is not loaded but can be (evicted, or a file in the adapter dir) is loaded first, in the
        caller's thread. NOT_FOUND if it is neither loaded nor loadable."""
        while True:
            with self._lock:
                entry = self._current.get(name)
                if entry is not None:
                    self._take(entry)
                    return entry
                loading = self._loading.get(name)
                origin = self._origin_of(name) if self.lazy and loading is None else None
                if origin is None and loading is None:
                    loaded = sorted(self._current) or ["none"]
                    where = f" or in {self.adapter_dir}" if self.lazy else ""
                    raise ServeError(NOT_FOUND, "adapter", f"'{name}' is not loaded{where} (loaded: {', '.join(loaded)}); "
                                     "load it with `slmops adapters load` or leave adapter empty for the base model")
                if loading is None:
                    loading = self._loading[name] = threading.Event()
                    mine = True
                else:
                    mine = False
            if not mine:
                loading.wait()  # another request loads it: then take it (or try again if that failed)
                continue
            try:
                assert origin is not None
                result = self.load(name, path=origin.path, sha256=origin.sha256, source=origin.source,
                                   trusted_path=origin.trusted, acquire=True)
            finally:
                with self._lock:
                    self._loading.pop(name, None)
                loading.set()
            if self._on_lazy_load is not None and not result.unchanged:
                self._on_lazy_load(result.adapter)
            return result.adapter

    def servable(self, name: str) -> bool:
        """Whether a request naming ``name`` would be served: loaded, or (``lazy``) loadable."""
        with self._lock:
            return name in self._current or name in self._loading or (self.lazy and self._origin_of(name) is not None)

    def release(self, entry: LoadedAdapter) -> None:
        with self._lock:
            entry.refcount -= 1
            entry.last_used = time.monotonic()
            free = entry.retired and entry.refcount == 0
        if free:
            self._free(entry)

    def _take(self, entry: LoadedAdapter) -> None:
        """Count a request on ``entry`` (caller holds _lock)."""
        entry.refcount += 1
        entry.last_used = time.monotonic()
        self._requests[entry.name] += 1

    def _origin_of(self, name: str) -> Origin | None:
        """Where ``name`` can be loaded from (caller holds _lock): its last origin, else its file in
        the adapter dir. Never a path outside the adapter dir unless the server itself chose it."""
        origin = self._origins.get(name)
        if origin is not None and origin.path.is_file():
            return origin
        if adapter_name_problem(name) is not None:
            return None
        path = self.adapter_dir / f"{name}{ADAPTER_SUFFIX}"
        if not path.is_file():
            return None
        return Origin(path=path, sha256="", trusted=False, source="lazy")

    # ---- admin --------------------------------------------------------------------------------
    def resolve_path(self, path: str) -> Path:
        """A client-given path, checked to lie inside the adapter directory (symlinks resolved)."""
        if not path:
            raise ServeError(INVALID_ARGUMENT, "path", "is empty; give a .onnx_adapter file inside the adapter directory")
        root = self.adapter_dir.resolve()
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise ServeError(PERMISSION_DENIED, "path", f"'{path}' is outside the server's adapter directory {root}; "
                             "copy the file there or upload it (data)")
        if resolved.suffix != ADAPTER_SUFFIX:
            raise ServeError(INVALID_ARGUMENT, "path", f"'{path}' is not a {ADAPTER_SUFFIX} file")
        if not resolved.is_file():
            raise ServeError(NOT_FOUND, "path", f"'{path}' does not exist in the adapter directory {root}")
        return resolved

    def load(self, name: str, path: str | Path | None = None, data: Any = None, sha256: str = "",
             source: str = "path", trusted_path: bool = False, acquire: bool = False) -> LoadResult:
        """Load (or atomically replace) ``name`` from a file in the adapter dir or uploaded bytes.

        The bytes are read once, hashed, parsed and checked, and those tensors are what the engine
        uses (nothing reads the file again). ``trusted_path``: the server's own files (the bundle's
        adapters), not checked against the adapter dir. ``acquire``: the entry comes back already
        counted as in use (``release`` it), so no eviction can take it before the caller does.
        With a memory budget, idle adapters are evicted first to make room (RESOURCE_EXHAUSTED when
        the pinned and in-use ones leave none).
        """
        check_name(name)
        sha256 = (sha256 or "").strip().lower()
        if sha256 and not SHA256_RE.match(sha256):
            raise ServeError(INVALID_ARGUMENT, "sha256", f"'{sha256}' is not a hex sha256 (64 hex digits)")
        if (path is None) == (data is None):
            raise ServeError(INVALID_ARGUMENT, "path", "set exactly one of path (a file in the adapter directory) or data (bytes)")
        started = time.perf_counter()
        if data is not None:
            field_name, display = "data", f"upload for '{name}'"
            if len(data) > self.max_upload_bytes:
                raise ServeError(INVALID_ARGUMENT, "data", f"{len(data)} bytes is larger than the server's limit "
                                 f"--max-upload-bytes {self.max_upload_bytes}")
            if len(data) == 0:
                raise ServeError(INVALID_ARGUMENT, "data", "is empty")
            shown_path = Path(display)
        else:
            field_name, display = "path", Path(str(path)).name
            source_path = Path(str(path)) if trusted_path else self.resolve_path(str(path))
            try:
                data = read_file(source_path)  # read a chunk at a time: the scheduler keeps the GIL
            except OSError as exc:
                raise ServeError(NOT_FOUND if isinstance(exc, FileNotFoundError) else FAILED_PRECONDITION, "path",
                                 f"cannot read '{path}': {exc.strerror or exc}") from exc
            shown_path = Path(str(path))
        got = sha256_bytes(data)
        if sha256 and got != sha256:
            what = "the uploaded data" if field_name == "data" else f"'{display}'"
            raise ServeError(FAILED_PRECONDITION, "sha256", f"checksum mismatch: {what} has sha256 {got}, not {sha256}; "
                             "the file is corrupt or the wrong one")
        unchanged = self._unchanged(name, got, acquire)
        if unchanged is not None:  # these very bytes were checked when loaded
            return LoadResult(unchanged, None, True, (time.perf_counter() - started) * 1000)
        # the slow part (parse + ABI check, ~0.3 s for 175 MB) holds no lock
        checked, tensors = check_adapter_bytes(data, self.template, field_name, display, sha=got)
        origin: Origin | None = None
        if field_name == "path":
            origin = Origin(path=source_path, sha256=got, trusted=trusted_path, source=source)
        elif self.memory_budget is not None:  # an upload may be evicted: keep a copy to load it again
            origin = Origin(path=self._spooled(data, got), sha256=got, trusted=True, source=source)
        del data
        nbytes = arrays_nbytes(tensors.values())
        with self._swap_lock:
            unchanged = self._unchanged(name, checked.sha256, acquire)
            if unchanged is not None:
                return LoadResult(unchanged, None, True, (time.perf_counter() - started) * 1000)
            evicted = self._make_room(name, nbytes, "adapter" if acquire else field_name)
            self._seq += 1
            internal = f"{name}@{checked.sha256[:8]}.{self._seq}"
            try:
                self._store.add(internal, tensors)
            except Exception as exc:  # noqa: BLE001 - the store's reason, as a status the client can act on
                raise ServeError(FAILED_PRECONDITION, field_name, f"the server could not hold the adapter: {exc}") from exc
            del tensors
            entry = LoadedAdapter(name=name, internal=internal, file=dataclasses.replace(checked, path=shown_path),
                                  source=source, nbytes=nbytes)
            with self._lock:
                self._held += nbytes
                if acquire:
                    self._take(entry)
                previous = self._current.get(name)
                self._current[name] = entry
                self._evicted.pop(name, None)
                replaced_origin = self._origins.pop(name, None)
                if origin is not None:
                    self._origins[name] = origin
                free_now = self._retire(previous)
        self._drop_spooled(replaced_origin)
        if free_now and previous is not None:
            self._free(previous)
        if evicted:
            release_freed_memory()
        load_ms = (time.perf_counter() - started) * 1000
        log.info("adapter loaded", extra={"fields": {
            "event": "adapter_load", "adapter": name, "sha256": entry.sha256, "source": source, "rank": checked.rank,
            "replaced_sha256": previous.sha256 if previous else "", "load_ms": round(load_ms, 2)}})
        self._changed()
        return LoadResult(entry, previous, False, load_ms)

    def unload(self, name: str, timeout: float | None = None) -> tuple[LoadedAdapter, bool]:
        """Remove ``name`` at once (new requests get NOT_FOUND, or with ``lazy`` load its file in the
        adapter dir again), then wait up to ``timeout`` s for in-flight requests to finish; its
        memory is freed when the last one ends. Returns (entry, drained)."""
        check_name(name)
        with self._swap_lock, self._lock:
            entry = self._current.pop(name, None)
            origin = self._origins.pop(name, None)  # an explicit unload forgets where it came from
            evicted = self._evicted.pop(name, None)
            if entry is None and evicted is None:
                raise ServeError(NOT_FOUND, "name", f"adapter '{name}' is not loaded (loaded: "
                                 f"{', '.join(sorted(self._current)) or 'none'})")
            free_now = self._retire(entry) if entry is not None else False
        self._drop_spooled(origin)
        if entry is None:  # evicted already (its memory is free): now it is forgotten too
            assert evicted is not None
            self._changed()
            log.info("adapter unloaded", extra={"fields": {"event": "adapter_unload", "adapter": name,
                                                           "sha256": evicted.sha256, "evicted": True}})
            return evicted, True
        if free_now:
            self._free(entry)
            release_freed_memory()
        self._changed()
        log.info("adapter unloaded", extra={"fields": {"event": "adapter_unload", "adapter": name, "sha256": entry.sha256,
                                                       "in_flight": entry.refcount}})
        with self._lock:
            drained = self._lock.wait_for(lambda: entry.refcount == 0, timeout=timeout)
        return entry, drained

    def entries(self) -> list[tuple[LoadedAdapter, int]]:
        """(current entry, requests served under its name) for every loaded name, sorted."""
        with self._lock:
            return [(e, self._requests[n]) for n, e in sorted(self._current.items())]

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._current.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def in_flight(self, entry: LoadedAdapter) -> int:
        with self._lock:
            return entry.refcount

    def retired_count(self) -> int:
        """Replaced/unloaded versions still held by in-flight requests."""
        with self._lock:
            return len(self._retired)

    @property
    def held_bytes(self) -> int:
        """Bytes of the adapter versions in the store (current, replaced-but-in-use, failed to free)."""
        with self._lock:
            return self._held

    def pending_unloads(self) -> list[LoadedAdapter]:
        """Versions no request holds whose removal from the store failed (retried, or given up)."""
        with self._lock:
            return list(self._pending)

    def close(self) -> None:
        """Unload everything (server shutdown): entries still in use are freed by their last release."""
        for name in self.names():
            with contextlib.suppress(ServeError):
                self.unload(name, timeout=0)
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, set()
            spool, self._spool = self._spool, None
        for timer in timers:
            timer.cancel()
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)

    # ---- internals ----------------------------------------------------------------------------
    def _unchanged(self, name: str, sha: str, acquire: bool) -> LoadedAdapter | None:
        """The current entry of ``name`` if it holds exactly these bytes (counted in use if ``acquire``)."""
        with self._lock:
            current = self._current.get(name)
            if current is None or current.sha256 != sha:
                return None
            if acquire:
                self._take(current)
            return current

    def _make_room(self, name: str, nbytes: int, field_name: str) -> bool:
        """Evict idle, unpinned adapters (least recently used first) until ``nbytes`` more fit the
        budget (caller holds _swap_lock). Nothing is evicted when that cannot be done: RESOURCE_EXHAUSTED."""
        if self.memory_budget is None:
            return False
        with self._lock:
            replaced = self._current.get(name)
            freed = replaced.nbytes if replaced is not None and replaced.refcount == 0 else 0
            over = self._held - freed + nbytes - self.memory_budget
            if over <= 0:
                return False
            idle = sorted((e for n, e in self._current.items() if n != name and e.refcount == 0 and n not in self.pinned),
                          key=lambda e: e.last_used)
            victims: list[LoadedAdapter] = []
            for candidate in idle:
                if over <= 0:
                    break
                victims.append(candidate)
                over -= candidate.nbytes
            if over > 0:
                busy = sorted(n for n, e in self._current.items() if n != name and (e.refcount or n in self.pinned))
                raise ServeError(RESOURCE_EXHAUSTED, field_name,
                                 f"'{name}' needs {_mib(nbytes)} and the adapter memory budget is {_mib(self.memory_budget)} "
                                 f"({_mib(self._held)} held; pinned or in use: {', '.join(busy) or 'none'}); retry when "
                                 "requests finish, unload an adapter, or raise --adapter-memory")
            for victim in victims:
                del self._current[victim.name]
                self._evicted[victim.name] = victim
                victim.retired = True
                self.evictions += 1
        for victim in victims:
            self._free(victim)
            log.info("adapter evicted", extra={"fields": {
                "event": "adapter_evict", "adapter": victim.name, "sha256": victim.sha256, "bytes": victim.nbytes,
                "for": name, "budget": self.memory_budget}})
            if self._on_evict is not None:
                self._on_evict(victim)
        if victims:
            self._changed()
        return bool(victims)

    def _spooled(self, data: Any, sha: str) -> Path:
        """A private copy of uploaded bytes (with a budget: an evicted upload loads again from it)."""
        with self._lock:
            if self._spool is None:
                self._spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-"))
            spool = self._spool
        path = spool / f"{sha}{ADAPTER_SUFFIX}"
        if not path.exists():
            partial = spool / f".{sha}.{threading.get_ident()}.part"
            with open(partial, "wb") as out:
                out.write(memoryview(data).cast("B"))
            partial.replace(path)
        return path

    def _drop_spooled(self, origin: Origin | None) -> None:
        """Delete a spooled upload no name refers to any more."""
        spool = self._spool
        if origin is None or spool is None or origin.path.parent != spool:
            return
        with self._lock:
            if any(o.path == origin.path for o in self._origins.values()):
                return
        with contextlib.suppress(OSError):
            origin.path.unlink()

    def _retire(self, entry: LoadedAdapter | None) -> bool:
        """Mark ``entry`` replaced/unloaded (caller holds _lock); True when it can be freed now."""
        if entry is None:
            return False
        entry.retired = True
        if entry.refcount == 0:
            return True
        self._retired.append(entry)
        return False

    def _free(self, entry: LoadedAdapter) -> None:
        """Remove ``entry`` from the store; on failure, retry later (``UNLOAD_RETRY_DELAYS_S``)."""
        try:
            self._store.unload(entry.internal)
        except Exception as exc:  # noqa: BLE001 - kept, counted and retried; never fails the caller
            self._unload_failed(entry, exc)
            return
        with self._lock:
            self._held -= entry.nbytes
            if entry in self._retired:
                self._retired.remove(entry)
            retried = entry in self._pending
            if retried:
                self._pending.remove(entry)
            self._lock.notify_all()
        if retried:
            log.info("adapter unloaded on retry", extra={"fields": {
                "event": "adapter_unload_retried", "adapter": entry.name, "internal": entry.internal,
                "attempts": entry.unload_failures + 1}})
            self._changed()

    def _unload_failed(self, entry: LoadedAdapter, exc: Exception) -> None:
        with self._lock:
            entry.unload_failures += 1
            if entry in self._retired:
                self._retired.remove(entry)
            if entry not in self._pending:
                self._pending.append(entry)
            attempt = entry.unload_failures
            delay = UNLOAD_RETRY_DELAYS_S[attempt - 1] if attempt <= len(UNLOAD_RETRY_DELAYS_S) else None
            timer = None
            if delay is not None and not self._closed:
                timer = threading.Timer(delay, self._retry, (entry,))
                timer.daemon = True
                self._timers.add(timer)
            self._lock.notify_all()
        fields = {"event": "adapter_unload_failed", "adapter": entry.name, "internal": entry.internal,
                  "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"}
        if delay is not None:
            log.warning("adapter unload failed; retrying", extra={"fields": {**fields, "retry_in_s": delay}})
        else:
            log.error("adapter unload failed; giving up: its memory stays held until the server restarts",
                      extra={"fields": fields})
        if self._on_unload_failed is not None:
            self._on_unload_failed(entry.name)
        self._changed()
        if timer is not None:
            timer.start()

    def _retry(self, entry: LoadedAdapter) -> None:
        with self._lock:
            self._timers.discard(threading.current_thread())  # type: ignore[arg-type]  # this Timer
            if self._closed or entry not in self._pending:
                return
        self._free(entry)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def remove_stale_spools(root: str | Path | None = None) -> list[Path]:
    """Remove the upload spools of servers that died without cleaning up (kill -9, power loss):
    ``<root>/slmops-adapter-spool-<pid>-*`` whose process no longer exists (root: the temp dir).
    Uploads are not kept across restarts (the adapter dir and the bundle are the lasting state), so
    nothing there is needed. Returns the folders removed."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(SPOOL_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        pid = path.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed stale upload spools", extra={"fields": {"event": "stale_spool_removed", "count": len(removed)}})
    return removed


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
