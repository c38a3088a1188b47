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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops import contract
from slmops.adapter_format import read_file
from slmops.bundle import LoraTemplate
from slmops.contract import ADAPTER_SUFFIX, MERGED_BUNDLE_PROBLEM, adapter_name_problem
from slmops_serve.errors import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    ServeError,
)

log = logging.getLogger("slmops.serve")

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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

    @property
    def sha256(self) -> str:
        return self.file.sha256


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
    """

    def __init__(self, store: Any, template: LoraTemplate, adapter_dir: Path, max_upload_bytes: int,
                 on_change: Callable[[], None] | None = None,
                 on_unload_failed: Callable[[str], None] | None = None) -> None:
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

    @property
    def store(self) -> Any:
        return self._store

    # ---- requests -----------------------------------------------------------------------------
    def acquire(self, name: str) -> LoadedAdapter:
        """The current version of ``name``, refcounted until ``release``. NOT_FOUND if not loaded."""
        with self._lock:
            entry = self._current.get(name)
            if entry is None:
                loaded = sorted(self._current) or ["none"]
                raise ServeError(NOT_FOUND, "adapter", f"'{name}' is not loaded (loaded: {', '.join(loaded)}); "
                                 "load it with `slmops adapters load` or leave adapter empty for the base model")
            entry.refcount += 1
            self._requests[name] += 1
            return entry

    def release(self, entry: LoadedAdapter) -> None:
        with self._lock:
            entry.refcount -= 1
            free = entry.retired and entry.refcount == 0
        if free:
            self._free(entry)

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
             source: str = "path", trusted_path: bool = False) -> LoadResult:
        """Load (or atomically replace) ``name`` from a file in the adapter dir or uploaded bytes.

        The bytes are read once, hashed, parsed and checked, and those tensors are what the engine
        uses (nothing reads the file again). ``trusted_path``: the server's own files (the bundle's
        adapters), not checked against the adapter dir.
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
        current = self.get(name)
        if current is not None and current.sha256 == got:  # these very bytes were checked when loaded
            return LoadResult(current, None, True, (time.perf_counter() - started) * 1000)
        # the slow part (parse + ABI check, ~0.3 s for 175 MB) holds no lock
        checked, tensors = check_adapter_bytes(data, self.template, field_name, display, sha=got)
        del data
        with self._swap_lock:
            current = self.get(name)
            if current is not None and current.sha256 == checked.sha256:
                return LoadResult(current, None, True, (time.perf_counter() - started) * 1000)
            self._seq += 1
            internal = f"{name}@{checked.sha256[:8]}.{self._seq}"
            try:
                self._store.add(internal, tensors)
            except Exception as exc:  # noqa: BLE001 - the store's reason, as a status the client can act on
                raise ServeError(FAILED_PRECONDITION, field_name, f"the server could not hold the adapter: {exc}") from exc
            entry = LoadedAdapter(name=name, internal=internal, file=dataclasses.replace(checked, path=shown_path),
                                  source=source)
            with self._lock:
                previous = self._current.get(name)
                self._current[name] = entry
                free_now = self._retire(previous)
        if free_now and previous is not None:
            self._free(previous)
        load_ms = (time.perf_counter() - started) * 1000
        log.info("adapter loaded", extra={"fields": {
            "event": "adapter_load", "adapter": name, "sha256": entry.sha256, "source": source, "rank": checked.rank,
            "replaced_sha256": previous.sha256 if previous else "", "load_ms": round(load_ms, 2)}})
        self._changed()
        return LoadResult(entry, previous, False, load_ms)

    def unload(self, name: str, timeout: float | None = None) -> tuple[LoadedAdapter, bool]:
        """Remove ``name`` at once (new requests get NOT_FOUND), then wait up to ``timeout`` s for
        in-flight requests to finish. Returns (entry, drained)."""
        check_name(name)
        with self._swap_lock, self._lock:
            entry = self._current.pop(name, None)
            if entry is None:
                raise ServeError(NOT_FOUND, "name", f"adapter '{name}' is not loaded (loaded: "
                                 f"{', '.join(sorted(self._current)) or 'none'})")
            free_now = self._retire(entry)
        if free_now:
            self._free(entry)
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
        for timer in timers:
            timer.cancel()

    # ---- internals ----------------------------------------------------------------------------
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
