"""Loaded adapters: public names, atomic replacement, refcounts of in-flight requests, drained unloads.

onnxruntime-genai's ``og.Adapters`` refuses to load a name twice and to unload an adapter a
generator still holds. So each loaded file gets a fresh INTERNAL name (``tone@1a2b3c4d.7``); the
public name maps to the current internal one. Replacing ``tone`` loads the new file under a new
internal name, then swaps the mapping under the lock: requests already admitted keep (and
refcount) the old entry and finish on the old weights; the old entry is unloaded from og when its
refcount reaches zero. Every check (path, size, checksum, ABI, dtype) runs before anything
changes, so a failed load leaves the loaded set as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops import contract
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
    retired: bool = False  # replaced or unloaded: og unload happens when refcount reaches 0
    owned_path: Path | None = None  # an uploaded copy the server deletes after unloading

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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_adapter_file(path: Path, template: LoraTemplate, field_name: str = "path", display: str | None = None) -> AdapterFile:
    """Read ``path`` and check it against the bundle's adapter ABI (slmops.contract: names, shapes,
    dtype, A/B ranks). Messages name the file ``display`` (the user's name for it; default ``path.name``).

    Raises:
        ServeError: INVALID_ARGUMENT for a file that is not an .onnx_adapter, FAILED_PRECONDITION for
            one that does not match this bundle's lora_template.
    """
    shown = display or path.name
    if not template.inputs:
        raise ServeError(FAILED_PRECONDITION, field_name, MERGED_BUNDLE_PROBLEM)
    data = path.read_bytes()
    sha = sha256_bytes(data)
    check = contract.check_adapter_file(path, template)
    if not check.readable:
        raise ServeError(INVALID_ARGUMENT, field_name, f"'{shown}' is {check.summary()}")
    if check.problems:
        raise ServeError(FAILED_PRECONDITION, field_name, f"'{shown}': {check.summary()}")
    return AdapterFile(path=path, sha256=sha, size=len(data), rank=check.rank, modules=check.modules)


class AdapterRegistry:
    """The adapters one og.Model serves. Thread-safe.

    Args:
        og_adapters: an ``og.Adapters`` of the served model (anything with ``load(path, name)`` and ``unload(name)``).
        template (LoraTemplate): the bundle's adapter ABI every file is checked against.
        adapter_dir (Path): the only folder ``load(path=...)`` may read from.
        max_upload_bytes (int): largest ``load(data=...)``.
        on_change: called (no args) after the loaded set changed, e.g. to update metrics.
    """

    def __init__(self, og_adapters: Any, template: LoraTemplate, adapter_dir: Path, max_upload_bytes: int,
                 upload_dir: Path | None = None, on_change: Callable[[], None] | None = None) -> None:
        self._og = og_adapters
        self.template = template
        self.adapter_dir = Path(adapter_dir)
        self.max_upload_bytes = max_upload_bytes
        self._upload_dir = upload_dir
        self._on_change = on_change
        self._lock = threading.Condition()
        # Serializes og.Adapters calls and generator adapter activation/release: older onnxruntime-genai
        # releases have no lock inside og.Adapters.
        self.og_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load/unload at a time: a replace is check + load + swap
        self._current: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._seq = 0
        self._requests: Counter[str] = Counter()

    @property
    def og_adapters(self) -> Any:
        """The og.Adapters; activate one on a generator only while holding ``og_lock``."""
        return self._og

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

    def load(self, name: str, path: str | Path | None = None, data: bytes | None = None, sha256: str = "",
             source: str = "path", trusted_path: bool = False) -> LoadResult:
        """Load (or atomically replace) ``name`` from a file in the adapter dir or uploaded bytes.

        ``trusted_path``: the server's own files (the bundle's adapters), not checked against the adapter dir.
        """
        check_name(name)
        sha256 = (sha256 or "").strip().lower()
        if sha256 and not SHA256_RE.match(sha256):
            raise ServeError(INVALID_ARGUMENT, "sha256", f"'{sha256}' is not a hex sha256 (64 hex digits)")
        if (path is None) == (data is None):
            raise ServeError(INVALID_ARGUMENT, "path", "set exactly one of path (a file in the adapter directory) or data (bytes)")
        started = time.perf_counter()
        with self._load_lock:
            owned: Path
            if data is not None:
                field_name = "data"
                if len(data) > self.max_upload_bytes:
                    raise ServeError(INVALID_ARGUMENT, "data", f"{len(data)} bytes is larger than the server's limit "
                                     f"--max-upload-bytes {self.max_upload_bytes}")
                if not data:
                    raise ServeError(INVALID_ARGUMENT, "data", "is empty")
                got = sha256_bytes(data)
                if sha256 and got != sha256:
                    raise ServeError(FAILED_PRECONDITION, "sha256", f"checksum mismatch: the uploaded data has sha256 {got}, "
                                     f"not {sha256}; the upload is corrupt or the wrong file")
                owned = self._write_private(name, data)
                file_path = owned
            else:
                field_name = "path"
                source_path = Path(path) if trusted_path else self.resolve_path(str(path))  # type: ignore[arg-type]
                try:
                    data = source_path.read_bytes()
                except OSError as exc:
                    raise ServeError(NOT_FOUND if isinstance(exc, FileNotFoundError) else FAILED_PRECONDITION, "path",
                                     f"cannot read '{path}': {exc.strerror or exc}") from exc
                # check and load the SAME bytes: a private copy, so a file replaced after the
                # check cannot be what onnxruntime reads
                owned = self._write_private(name, data)
                file_path = owned
            display = f"upload for '{name}'" if field_name == "data" else Path(str(path)).name
            try:
                current = self._current.get(name)
                checked = check_adapter_file(file_path, self.template, field_name, display=display)
                if sha256 and checked.sha256 != sha256:
                    raise ServeError(FAILED_PRECONDITION, "sha256", f"checksum mismatch: '{file_path.name}' has sha256 "
                                     f"{checked.sha256}, not {sha256}")
                if current is not None and current.sha256 == checked.sha256:
                    owned.unlink(missing_ok=True)
                    return LoadResult(current, None, True, (time.perf_counter() - started) * 1000)
                self._seq += 1
                internal = f"{name}@{checked.sha256[:8]}.{self._seq}"
                with self.og_lock:
                    try:
                        self._og.load(str(file_path), internal)
                    except Exception as exc:  # noqa: BLE001 - og raises RuntimeError with its reason
                        raise ServeError(FAILED_PRECONDITION, field_name, f"onnxruntime-genai refused the adapter: {exc}") from exc
            except BaseException:
                owned.unlink(missing_ok=True)
                raise
            # the engine holds the tensors in memory: the private copy is not needed any more
            owned.unlink(missing_ok=True)
            shown_path = Path(str(path)) if field_name == "path" else Path(display)
            entry = LoadedAdapter(name=name, internal=internal, file=dataclasses.replace(checked, path=shown_path),
                                  source=source, owned_path=None)
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
        with self._load_lock, self._lock:
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

    def close(self) -> None:
        """Unload everything (server shutdown): entries still in use are freed by their last release."""
        for name in self.names():
            with contextlib.suppress(ServeError):
                self.unload(name, timeout=0)
        if self._upload_dir is not None and self._upload_dir.name.startswith("slmops-uploads-"):
            shutil.rmtree(self._upload_dir, ignore_errors=True)

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
        with self.og_lock:
            try:
                self._og.unload(entry.internal)
            except Exception as exc:  # noqa: BLE001 - should not happen: refcount says no generator holds it
                log.error("adapter unload failed", extra={"fields": {"event": "adapter_unload_failed",
                                                                     "adapter": entry.name, "error": str(exc)}})
        if entry.owned_path is not None:
            entry.owned_path.unlink(missing_ok=True)
        with self._lock:
            if entry in self._retired:
                self._retired.remove(entry)
            self._lock.notify_all()

    def _write_private(self, name: str, data: bytes) -> Path:
        """``data`` in a server-owned file; no partial file is left behind when writing fails."""
        target = self._upload_root() / f"{name}@{sha256_bytes(data)[:12]}.{time.monotonic_ns()}{ADAPTER_SUFFIX}"
        try:
            target.write_bytes(data)
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise ServeError(FAILED_PRECONDITION, "data", f"the server cannot store the adapter: {exc.strerror or exc}") from exc
        return target

    def _upload_root(self) -> Path:
        if self._upload_dir is None:
            self._upload_dir = Path(tempfile.mkdtemp(prefix="slmops-uploads-"))
        self._upload_dir.mkdir(parents=True, exist_ok=True)
        return self._upload_dir

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
