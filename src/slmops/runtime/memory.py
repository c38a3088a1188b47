"""Caches bounded in bytes, and handing freed memory back to the operating system.

Every cache of LoRA feeds (the bank's concatenations, the runner's OrtValues, the engine's per-batch
feeds) is a :class:`ByteLRU`: it holds at most ``limit`` bytes of arrays, plus the entry put last
(the one the step about to run needs, however large), and drops the least recently used first.

Only the bank's concatenations are new memory; the runner's and the engine's entries are views of
them (or of an adapter's own arrays) plus small row masks. So the server gives the bank one share of
``--adapter-memory`` (:func:`split_adapter_memory`), the adapters the rest, and drops the runner's and
the engine's entries when the bank evicts a concatenation or an adapter is unloaded: one byte budget
covers every cache of adapter weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")

# Bytes each feeds cache may hold when nothing else is said (the server derives it from --adapter-memory).
DEFAULT_FEEDS_CACHE_BYTES = 256 << 20


# Share of --adapter-memory for the concatenations of mixed batches (the rest holds adapter tensors).
MIX_SHARE = 0.25


def split_adapter_memory(budget: int) -> tuple[int, int]:
    """``--adapter-memory`` bytes -> (bytes of adapter tensors, bytes of mix concatenations): one
    budget for both, so the process holds at most ``budget`` bytes of adapter weights in any form."""
    mixes = int(budget * MIX_SHARE)
    return budget - mixes, mixes


def arrays_nbytes(arrays: Iterable[Any]) -> int:
    """Bytes of the distinct numpy arrays in ``arrays`` (a view counts its base once; other items 0)."""
    seen: set[int] = set()
    total = 0
    for array in arrays:
        if not isinstance(array, np.ndarray):
            continue
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        total += int(owner.nbytes)
    return total


class ByteLRU(Generic[V]):
    """An LRU mapping bounded in bytes: ``put(key, value, nbytes)`` drops least recently used entries
    until the rest fit in ``limit`` bytes; the entry just put always stays. Thread-safe.

    ``on_evict(key, value)`` is called (outside the lock) for each entry dropped to make room; more
    listeners can be added with :meth:`add_evict_listener` (e.g. caches that hold views of this one's
    arrays drop them too, so an eviction really frees the memory).
    """

    def __init__(self, limit: int, on_evict: Callable[[Hashable, V], None] | None = None) -> None:
        self.limit = int(limit)
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self._listeners: list[Callable[[Hashable, V], None]] = [on_evict] if on_evict is not None else []

    def add_evict_listener(self, listener: Callable[[Hashable, V], None]) -> None:
        """Call ``listener(key, value)`` (outside the lock) for every entry dropped to make room."""
        self._listeners.append(listener)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def ordered_keys(self) -> list[Hashable]:
        """The keys, least recently used first (a copy)."""
        with self._lock:
            return list(self._items)

    def items(self) -> Iterator[tuple[Hashable, V]]:
        with self._lock:
            pairs = [(k, v) for k, (v, _) in self._items.items()]
        return iter(pairs)

    def get(self, key: Hashable, touch: bool = True) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if touch:
                self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        dropped: list[tuple[Hashable, V]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, int(nbytes))
            self._bytes += int(nbytes)
            while self._bytes > self.limit and len(self._items) > 1:
                dropped_key, (dropped_value, size) = self._items.popitem(last=False)
                self._bytes -= size
                self.evictions += 1
                dropped.append((dropped_key, dropped_value))
        for k, v in dropped:
            for listener in self._listeners:
                listener(k, v)

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def drop_if(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key matches; returns how many."""
        with self._lock:
            keys = [k for k in self._items if predicate(k)]
            for k in keys:
                self._bytes -= self._items.pop(k)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_libc: Any = None
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# Allocations of this size and up are mmap'd and unmapped on free (a fixed threshold: glibc's own
# rises after the first free of a large block, up to 32 MiB, and then adapter tensors, upload
# buffers and mix concatenations land in the heap, where they fragment it and stay resident).
MMAP_THRESHOLD = 1 << 20
# Heaps malloc keeps for threads (glibc's default is 8 per core: with the gRPC pool's threads each
# touching large buffers, every arena keeps its own free pages).
ARENA_MAX = 2


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:
            _libc = False  # not glibc: nothing to tune or trim
    return _libc


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX) -> bool:
    """Make a long-running server give freed large buffers back to the OS as it frees them: a fixed
    mmap threshold and fewer arenas (glibc ``mallopt``; an explicit MALLOC_* environment variable
    wins; ``SLMOPS_MALLOC=default`` leaves glibc's defaults). Call once, early, before the threads
    start. False where nothing was changed."""
    import os

    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc else None
    if mallopt is None or os.environ.get("SLMOPS_MALLOC") == "default":
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, arena_max)
    return True


def release_freed_memory() -> None:
    """Ask the C allocator to hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Large arrays are usually mmap'd and unmapped when freed, but glibc raises its mmap threshold
    after the first such free, so later buffers of that size come from the heap, and their pages
    stay resident after ``free`` until trimmed. A no-op where there is no glibc."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)
