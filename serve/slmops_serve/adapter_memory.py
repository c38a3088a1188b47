"""Work the scheduler must not do itself: building a mix's LoRA concatenation, and handing freed memory
back to the operating system.

A step whose rows use adapters ``{a, b, c}`` needs their feeds concatenated along the rank (see
:class:`slmops.runtime.runner.LoraBank`): a copy of every adapter in the mix, which for large
adapters takes long enough to be a visible pause of every running stream. The scheduler asks a
:class:`MixBuilder` for it instead and, until it is ready, runs the rows whose adapters are at hand
(split into contiguous groups) while the others wait a step or two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from slmops.runtime.memory import release_freed_memory

log = logging.getLogger("slmops.serve")

# Mixes waiting to be built beyond this many: the oldest requests are dropped (the batch moved on:
# rows joining one by one ask for {a, b}, then {a, b, c}, ...; only the newest is worth a copy).
MAX_PENDING = 2


class MixBuilder:
    """One daemon thread that builds LoRA concatenations (``bank.build``) and trims the heap.

    Args:
        bank: the runner's LoraBank (thread-safe cache of concatenations).
        on_ready: called (no args, from the builder thread) after each build, e.g. to wake the scheduler.
    """

    def __init__(self, bank: Any, on_ready: Callable[[], None] | None = None) -> None:
        self._bank = bank
        self._on_ready = on_ready
        self._cond = threading.Condition()
        self._queue: OrderedDict[frozenset[Any], dict[Any, Any]] = OrderedDict()
        self._busy: frozenset[Any] | None = None
        self._failed: dict[frozenset[Any], BaseException] = {}
        self._trim = False
        self._closed = False
        self.built = 0
        self.build_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="slmops-lora-mix", daemon=True)
        self._thread.start()

    def request(self, tensors_of: dict[Any, Any]) -> None:
        """Build the concatenation of these adapters (``{key: tensors}``) soon; no-op if queued."""
        key = frozenset(tensors_of)
        with self._cond:
            if self._closed or key == self._busy or key in self._queue:
                return
            self._queue[key] = dict(tensors_of)
            while len(self._queue) > MAX_PENDING:
                self._queue.popitem(last=False)
            self._cond.notify_all()

    def failed(self, tensors_of: dict[Any, Any]) -> BaseException | None:
        """The error of the last build of exactly these adapters, if it failed (the caller builds
        inline then, so the step fails its rows loudly instead of waiting forever)."""
        with self._cond:
            return self._failed.pop(frozenset(tensors_of), None)

    def forget(self, key: Any) -> None:
        """Adapter ``key`` was unloaded: drop queued mixes that hold it (and their references to it)."""
        with self._cond:
            for mix in [m for m in self._queue if key in m]:
                del self._queue[mix]
            self._failed = {m: e for m, e in self._failed.items() if key not in m}

    def trim(self) -> None:
        """Hand freed heap memory back to the OS (``malloc_trim``) on this thread, not the caller's."""
        with self._cond:
            self._trim = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        """Sleep until a build finishes or ``timeout`` s (the scheduler, when every row waits)."""
        with self._cond:
            if self._queue or self._busy is not None:
                self._cond.wait(timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (self._busy is not None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queue or self._trim)
                if self._closed:
                    return
                trim, self._trim = self._trim, False
                if self._queue:
                    key, tensors_of = self._queue.popitem(last=False)
                    self._busy = key
                else:
                    key, tensors_of = None, None
            if trim:
                release_freed_memory()
            if key is None or tensors_of is None:
                continue
            started = time.perf_counter()
            try:
                if not self._bank.build(tensors_of):
                    trim = True  # an adapter of the mix was unloaded during the copy: the copy is dropped
            except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which fails the rows
                log.exception("building a LoRA mix failed", extra={"fields": {"event": "mix_build_error"}})
                with self._cond:
                    self._failed[key] = exc
            finally:
                with self._cond:
                    self._busy = None
                    self.built += 1
                    self.build_seconds += time.perf_counter() - started
                    self._cond.notify_all()
                if self._on_ready is not None:
                    self._on_ready()
            key = tensors_of = None  # hold no adapter's tensors while idle: an unload must free them
            if trim:
                release_freed_memory()
