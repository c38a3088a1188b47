"""``--watch``: poll the adapter directory; load new or changed ``.onnx_adapter`` files, unload removed ones.

A file is loaded once its size and mtime held still for one poll, so a copy in progress is not
read half-written (copying to a temp name and renaming into place is still the safe way). The
adapter name is the file stem (``tone.onnx_adapter`` -> ``tone``). Polling keeps the serve
image free of inotify dependencies; edge adapter directories hold a handful of files.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from slmops.contract import ADAPTER_SUFFIX, adapter_name_problem
from slmops_serve.errors import ServeError
from slmops_serve.registry import AdapterRegistry

log = logging.getLogger("slmops.serve")

Signature = tuple[int, int]  # (mtime_ns, size)


class AdapterWatcher:
    def __init__(self, registry: AdapterRegistry, directory: Path, interval_s: float = 1.0) -> None:
        self.registry = registry
        self.directory = Path(directory)
        self.interval_s = interval_s
        self._seen: dict[Path, Signature] = {}  # last poll
        self._loaded: dict[Path, Signature] = {}  # what was (tried to be) loaded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slmops-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must survive anything a directory can do
                log.exception("adapter watch failed", extra={"fields": {"event": "watch_error"}})
            self._stop.wait(self.interval_s)

    def _scan(self) -> dict[Path, Signature]:
        found: dict[Path, Signature] = {}
        for path in self.directory.glob(f"*{ADAPTER_SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file():
                found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def poll(self) -> None:
        """One pass: act on files whose signature is stable since the previous pass."""
        now = self._scan()
        for path, signature in sorted(now.items()):
            if self._seen.get(path) != signature or self._loaded.get(path) == signature:
                continue
            self._loaded[path] = signature
            name = path.name[: -len(ADAPTER_SUFFIX)]
            problem = adapter_name_problem(name)
            if problem is not None:
                log.warning("adapter file ignored", extra={"fields": {"event": "watch_skip", "path": str(path),
                                                                      "error": f"file stem: {problem}"}})
                continue
            try:
                result = self.registry.load(name, path=str(path), source="watch")
            except ServeError as exc:
                log.warning("adapter file refused", extra={"fields": {"event": "watch_refused", "path": str(path),
                                                                      "code": exc.code, "error": str(exc)}})
                continue
            if not result.unchanged:
                log.info("adapter file loaded", extra={"fields": {"event": "watch_load", "adapter": name,
                                                                  "sha256": result.adapter.sha256[:12]}})
        for path in sorted(set(self._loaded) - set(now)):
            del self._loaded[path]
            name = path.name[: -len(ADAPTER_SUFFIX)]
            entry = self.registry.get(name)
            if entry is not None and entry.source == "watch" and entry.file.path.resolve() == path.resolve():
                try:
                    self.registry.unload(name, timeout=0)
                    log.info("adapter file removed", extra={"fields": {"event": "watch_unload", "adapter": name}})
                except ServeError:
                    pass
        self._seen = now
